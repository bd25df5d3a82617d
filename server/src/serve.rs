//! `init` (make a data dir) and `serve` (run the HTTPS API): the listener,
//! TLS handshakes (at most `--max-handshakes` at once; the excess is closed
//! at once, see [`HandshakeSlot`]), one task per connection with
//! keep-alive, and the background tasks (timeout monitor, heartbeat group
//! commit).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_signal::{Signal, Signals};
use futures_rustls::LazyConfigAcceptor;
use smol::future::FutureExt;
use smol::net::{TcpListener, TcpStream};
use smol::stream::StreamExt;

use crate::api::{self, Peer};
use crate::app::{self, App, Metrics, Settings};
use crate::backup;
use crate::ca::{self, Ca};
use crate::cli::ServeOptions;
use crate::error::Error;
use crate::fsutil::{create_private_dir, random_bytes, write_atomic};
use crate::http::{self, ReadError};
use crate::log;
use crate::refusal::Refusal;
use crate::store::{PgStore, RedbStore, Store};

pub(crate) const STORE_FILE: &str = "server.redb";
pub(crate) use crate::roles::ADMIN_TOKEN_FILE;
pub(crate) const URL_FILE: &str = "server.url";

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a graceful stop waits for answers beyond the request timeout.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Raises the open-file soft limit to the hard limit (one descriptor per
/// agent connection) and returns how many connections to allow: the limit
/// less a reserve for the store, blobs and logs.
fn raise_open_file_limit() -> usize {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let mut soft = limit.current.unwrap_or(1 << 20);
    if let (Some(cur), Some(max)) = (limit.current, limit.maximum)
        && cur < max
        && setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(max),
                maximum: Some(max),
            },
        )
        .is_ok()
    {
        soft = max;
    }
    (soft.min(1 << 20) as usize).saturating_sub(64).max(16)
}

/// `stella-server init`: CA, server certificate, admin token, empty store
/// (redb in the data dir, or the PostgreSQL database at `store`). The store
/// keeps the admin token's hash; the server makes it the token `root`, role
/// `admin`, when it first opens the store.
pub(crate) fn init(dir: &Path, sans: &[String], store: Option<&str>) -> Result<(), Error> {
    if dir.join(STORE_FILE).exists() {
        return Err(Refusal::conflict(format!(
            "{} is already initialized (it has {STORE_FILE})",
            dir.display()
        ))
        .into());
    }
    // PostgreSQL is checked first: a wrong URL or a database that holds a
    // store already changes nothing in the data dir.
    let postgres = match store {
        Some(url) => {
            let pg = PgStore::open_uninitialized(url)?;
            if pg.is_initialized()? {
                return Err(Refusal::conflict(format!(
                    "{} already holds a Stella store",
                    crate::store::redact(url)
                ))
                .into());
            }
            if dir.join(ca::CA_CERT).exists() {
                return Err(Refusal::conflict(format!(
                    "{} is already initialized (it has {})",
                    dir.display(),
                    ca::CA_CERT
                ))
                .into());
            }
            Some(pg)
        }
        None => None,
    };
    create_private_dir(dir)?;
    // Local admin commands and agents on this host reach us by these names.
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into()];
    names.extend(sans.iter().cloned());
    let pin = ca::init(dir, &names, app::now_secs())?;

    let mut random = [0u8; 32];
    random_bytes(&mut random)?;
    let admin_token = stella_proto::hash::hex(&random);
    write_atomic(
        &dir.join(ADMIN_TOKEN_FILE),
        format!("{admin_token}\n").as_bytes(),
        0o600,
    )?;
    let admin_hash = stella_proto::hash::hex(&stella_proto::token::hash_secret(&admin_token));
    // The store comes last: its presence marks a finished init.
    match postgres {
        Some(pg) => pg.initialize(&admin_hash)?,
        None => drop(RedbStore::create(&dir.join(STORE_FILE), &admin_hash)?),
    }

    crate::log::print(format_args!(
        "initialized {}\nserver names: {}\nCA hash: {pin}\nadmin token: {admin_token}\n  (token root, role admin; shown once; stored hashed, and in {} with mode 0600)\n",
        dir.display(),
        names.join(", "),
        dir.join(ADMIN_TOKEN_FILE).display()
    ))?;
    Ok(())
}

/// `stella-server migrate`: copies the redb store of the data dir `from`
/// (no server may be running on it) into the empty PostgreSQL database `to`:
/// first its blobs (each whole or not at all, kept if there already, so a
/// migration that failed can simply be run again), then every record in one
/// transaction. Agents keep their ids and certificates: the data dir keeps
/// the CA, and `serve --data-dir FROM --store TO` runs on the copy.
pub(crate) fn migrate(from: &Path, to: &str) -> Result<(), Error> {
    let source = RedbStore::open(&from.join(STORE_FILE))?;
    let target = PgStore::open_uninitialized(to)?;
    // Refused before any blob is copied into a database in use.
    if target.holds_store()? {
        return Err(crate::store::StoreError::Exists {
            what: "store in",
            key: crate::store::redact(to),
        }
        .into());
    }
    let export = source.export()?;
    let blobs = source.blobs()?;
    for (sha256, size) in &blobs {
        let path = crate::blobs::blob_path(from, sha256);
        let mut file = std::fs::File::open(&path)
            .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
        target.put_blob(sha256, *size, &mut file)?;
    }
    let mut counts = target.import(&export)?;
    counts.push(("blobs", blobs.len()));
    let summary: Vec<String> = counts
        .iter()
        .map(|(table, n)| format!("{table}={n}"))
        .collect();
    crate::log::print(format_args!(
        "copied {} to {}: {}
start the server with: stella-server serve --data-dir {} --store URL
",
        from.join(STORE_FILE).display(),
        crate::store::redact(to),
        summary.join(" "),
        from.display()
    ))?;
    Ok(())
}

/// `stella-server restore`: a data dir that `serve` starts from, made from a
/// backup, in an empty (or new) directory. The backup is checked whole
/// before anything is written; the store comes last, as with `init`.
pub(crate) fn restore(from: &Path, dir: &Path) -> Result<(), Error> {
    if let Ok(mut entries) = std::fs::read_dir(dir)
        && entries.next().is_some()
    {
        return Err(Refusal::conflict(format!(
            "{} is not empty: restore writes a new data dir into an empty or missing directory",
            dir.display()
        ))
        .into());
    }
    let bytes =
        std::fs::read(from).map_err(|e| Error::io(format!("cannot read {}", from.display()), e))?;
    let contents = backup::read(&bytes)
        .map_err(|m| Refusal::bad_request(format!("{}: {m}", from.display())))?;
    for need in [ca::CA_CERT, ca::SERVER_CERT, ca::SERVER_KEY] {
        if contents.file(need).is_none() {
            return Err(Refusal::bad_request(format!(
                "{}: the backup has no {need}",
                from.display()
            ))
            .into());
        }
    }
    create_private_dir(dir)?;
    for (name, bytes) in &contents.files {
        let path = dir.join(name);
        if let Some(parent) = path.parent()
            && parent != dir
        {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::io(format!("cannot create {}", parent.display()), e))?;
        }
        let mode = if backup::is_secret(name) {
            0o600
        } else {
            0o644
        };
        write_atomic(&path, bytes, mode)?;
    }
    // Written under another name and renamed when complete: a data dir
    // with server.redb is a finished one.
    let partial = dir.join(format!("{STORE_FILE}.restoring"));
    let _ = std::fs::remove_file(&partial);
    let store = RedbStore::create(&partial, "")?;
    crate::store::Store::restore_rows(&store, &contents.rows)?;
    drop(store);
    std::fs::rename(&partial, dir.join(STORE_FILE))
        .map_err(|e| Error::io(format!("cannot rename {}", partial.display()), e))?;
    crate::fsutil::sync_dir(dir)?;
    let ca_key = if contents.file(ca::CA_KEY).is_some() {
        "included".to_owned()
    } else {
        format!(
            "not in this backup: the server serves enrolled agents (heartbeats, downloads, admin commands) but refuses to enroll, renew or recover agents until {} is put back",
            dir.join(ca::CA_KEY).display()
        )
    };
    crate::log::print(format_args!(
        "restored {} from {}
agents: {}
audit lines: {}
files: {}
CA key: {ca_key}
",
        dir.display(),
        from.display(),
        contents.rows_of("agents"),
        contents.rows_of("audit"),
        contents.files.len(),
    ))?;
    Ok(())
}

/// `stella-server serve`: runs until SIGTERM or SIGINT (then stops
/// gracefully, see [`stop`]).
pub(crate) fn serve(opts: ServeOptions) -> Result<(), Error> {
    let dir = &opts.data_dir;
    let store: Box<dyn Store> = match &opts.store {
        Some(url) => Box::new(PgStore::open(url)?),
        None => Box::new(RedbStore::open(&dir.join(STORE_FILE))?),
    };
    let ca = Ca::load(dir)?;
    let tls = ca::server_tls_config(dir, &ca)?;
    let addr: SocketAddr = opts.listen.parse().map_err(|e| {
        Error::Usage(format!(
            "--listen {:?} is not an IP:PORT address ({e})",
            opts.listen
        ))
    })?;
    let max_connections = raise_open_file_limit();
    let settings = Settings {
        heartbeat_interval: opts.heartbeat_interval,
        heartbeat_misses: opts.heartbeat_misses,
        cert_lifetime: opts.cert_lifetime,
        expired_grace: opts.expired_grace,
        update_probation: opts.update_probation,
        flush_every: Duration::from_secs(1),
        idle_timeout: (opts.heartbeat_interval * 3).max(Duration::from_secs(90)),
        request_timeout: Duration::from_secs(10),
        max_handshakes: opts.max_handshakes,
    };
    let app = Arc::new(App::load(
        settings,
        store,
        ca,
        dir.clone(),
        max_connections,
    )?);
    let agents = app::lock(&app.fleet).agents.len();

    let ex = Arc::new(smol::Executor::new());
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8);
    for i in 1..threads {
        let ex = ex.clone();
        std::thread::Builder::new()
            .name(format!("stella-worker-{i}"))
            .spawn(move || smol::block_on(ex.run(smol::future::pending::<()>())))
            .map_err(|e| Error::io("cannot start a worker thread", e))?;
    }
    smol::block_on(ex.run(async {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| Error::io(format!("cannot listen on {addr}"), e))?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::io("cannot read the listening address", e))?;
        let url_host = if local.ip().is_unspecified() {
            "127.0.0.1".to_owned()
        } else if local.is_ipv6() {
            format!("[{}]", local.ip())
        } else {
            local.ip().to_string()
        };
        let url = format!("https://{url_host}:{}", local.port());
        write_atomic(&dir.join(URL_FILE), format!("{url}\n").as_bytes(), 0o644)?;
        log::info(
            "listening",
            &[
                ("url", &url),
                ("agents", &agents),
                (
                    "heartbeat_interval",
                    &stella_proto::format_duration(app.settings.heartbeat_interval),
                ),
                ("ca_hash", &app.ca.pin()),
                ("max_connections", &app.max_connections),
                ("max_handshakes", &app.settings.max_handshakes),
            ],
        );
        ex.spawn(app::timeout_monitor(app.clone())).detach();
        ex.spawn(app::heartbeat_flusher(app.clone())).detach();
        ex.spawn(app::controller(app.clone())).detach();
        ex.spawn(app::follow(app.clone())).detach();
        let mut signals = Signals::new([Signal::Term, Signal::Int])
            .map_err(|e| Error::io("cannot handle SIGTERM", e))?;
        loop {
            let next = async { Some(listener.accept().await) }
                .or(async {
                    let _ = signals.next().await;
                    None
                })
                .await;
            let Some(accepted) = next else {
                drop(listener);
                return stop(&app).await;
            };
            match accepted {
                Ok((tcp, _)) => {
                    let open = app
                        .connections
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if open >= app.max_connections {
                        // Full: close at once rather than let memory grow.
                        app.connections
                            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                        Metrics::bump(&app.metrics.connections_refused);
                        drop(tcp);
                        continue;
                    }
                    ex.spawn(connection(app.clone(), tls.clone(), tcp)).detach();
                }
                Err(e) => {
                    // Out of descriptors and the like: wait, keep serving the rest.
                    log::warn("accept failed", &[("error", &e)]);
                    smol::Timer::after(Duration::from_millis(100)).await;
                }
            }
        }
    }))
}

/// The graceful stop on SIGTERM (or SIGINT): the listener is closed already;
/// requests being answered finish (each connection closes after its answer),
/// the heartbeat batch is written, and `serve` returns (exit 0).
async fn stop(app: &Arc<App>) -> Result<(), Error> {
    use std::sync::atomic::Ordering;
    app.stopping.store(true, Ordering::SeqCst);
    log::info(
        "stopping: no new connections, finishing requests",
        &[("in_flight", &app.requests_in_flight.load(Ordering::SeqCst))],
    );
    // A request may take request_timeout to arrive and a little to answer.
    let give_up = std::time::Instant::now() + app.settings.request_timeout + STOP_GRACE;
    while app.requests_in_flight.load(Ordering::SeqCst) > 0 {
        if std::time::Instant::now() >= give_up {
            log::warn(
                "stopping with requests unanswered",
                &[("in_flight", &app.requests_in_flight.load(Ordering::SeqCst))],
            );
            break;
        }
        smol::Timer::after(Duration::from_millis(10)).await;
    }
    app::flush_heartbeats(app).await;
    let app2 = app.clone();
    smol::unblock(move || app::step_down(&app2)).await;
    log::info("stopped", &[]);
    Ok(())
}

/// Counts a request from its head until its answer is written.
struct InFlight<'a>(&'a App);

impl<'a> InFlight<'a> {
    fn new(app: &'a App) -> Self {
        app.requests_in_flight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(app)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0
            .requests_in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Discards incoming bytes for a short while (at most 1 MiB or 2 s).
async fn drain<S: smol::io::AsyncRead + Unpin>(stream: &mut S) {
    use smol::io::AsyncReadExt;
    let read_all = async {
        // On the heap: an array here would be part of every connection's
        // future, and so of every open connection's memory.
        let mut chunk = vec![0u8; 8192];
        let mut total = 0usize;
        while total < 1 << 20 {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let give_up = async {
        smol::Timer::after(Duration::from_secs(2)).await;
    };
    read_all.or(give_up).await;
}

/// Counts a connection for its lifetime.
struct ConnectionSlot<'a>(&'a App);

impl Drop for ConnectionSlot<'_> {
    fn drop(&mut self) {
        self.0
            .connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// One of the `--max-handshakes` TLS handshakes allowed at once, held from
/// the client's hello to the end of the handshake.
///
/// A reconnect storm (a fleet returning after an outage) would otherwise
/// start thousands of handshakes together: all would progress slowly,
/// most would time out, and their clients would come back for more. With a
/// bound the handshakes in progress finish quickly and the excess is closed
/// at once, a fast failure its agent retries after its jittered backoff;
/// nothing queues. The slot is taken only once a ClientHello has arrived
/// (reading it costs no cryptography), so connections that send nothing
/// cannot hold the slots; they time out as before.
struct HandshakeSlot<'a>(&'a Metrics);

impl<'a> HandshakeSlot<'a> {
    /// A slot if fewer than `limit` are taken; otherwise the connection is
    /// counted as shed.
    fn take(metrics: &'a Metrics, limit: usize) -> Option<Self> {
        use std::sync::atomic::Ordering;
        let before = metrics
            .handshakes_in_progress
            .fetch_add(1, Ordering::AcqRel);
        if before >= limit as u64 {
            metrics
                .handshakes_in_progress
                .fetch_sub(1, Ordering::AcqRel);
            Metrics::bump(&metrics.handshakes_shed);
            log_shedding(metrics);
            return None;
        }
        Some(Self(metrics))
    }
}

impl Drop for HandshakeSlot<'_> {
    fn drop(&mut self) {
        self.0
            .handshakes_in_progress
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// When shedding was last logged (ms since the epoch).
static SHED_LOGGED_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One warning every 10 s at most while handshakes are shed: a storm sheds
/// thousands, and the operator needs to know it happens, not each one.
fn log_shedding(metrics: &Metrics) {
    use std::sync::atomic::Ordering;
    let now = app::now_ms();
    let last = SHED_LOGGED_MS.load(Ordering::Relaxed);
    if now.saturating_sub(last) >= 10_000
        && SHED_LOGGED_MS
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        log::warn(
            "too many TLS handshakes at once; closing the excess (clients retry with backoff)",
            &[("shed_total", &Metrics::load(&metrics.handshakes_shed))],
        );
    }
}

/// Why a connection got no TLS session.
enum NoSession {
    /// Shed: too many handshakes in progress (counted already).
    Shed,
    Failed,
}

/// The TLS handshake of one connection, within [`HANDSHAKE_TIMEOUT`] and
/// the handshake bound.
async fn handshake(
    app: &App,
    tls: Arc<rustls::ServerConfig>,
    tcp: TcpStream,
) -> Result<futures_rustls::server::TlsStream<TcpStream>, NoSession> {
    let handshake = async {
        let hello = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
            .await
            .map_err(|_| NoSession::Failed)?;
        let Some(_slot) = HandshakeSlot::take(&app.metrics, app.settings.max_handshakes) else {
            // Dropping the hello closes the connection.
            return Err(NoSession::Shed);
        };
        hello.into_stream(tls).await.map_err(|_| NoSession::Failed)
    };
    let timeout = async {
        smol::Timer::after(HANDSHAKE_TIMEOUT).await;
        Err(NoSession::Failed)
    };
    handshake.or(timeout).await
}

/// What waiting for a connection's next request came to.
enum Idle {
    /// Bytes have arrived (or the peer closed, or reading fails): read the
    /// request, which tells which.
    Readable,
    /// Nothing arrived within the idle timeout.
    TimedOut,
    /// The session broke (a bad record); rustls has queued its alert.
    Broken,
}

/// Waits until the next request's first bytes arrive, holding no buffer.
///
/// An open connection spends nearly all its life here (one heartbeat per
/// interval), so this wait decides what an open connection costs: the read
/// buffer is allocated only once bytes are there to read. Bytes that rustls
/// holds already (a pipelined request, a close) are answered at once; only
/// with nothing held does it wait on the socket itself, with a one-byte peek.
async fn next_request(
    tls: &mut futures_rustls::server::TlsStream<TcpStream>,
    until: Instant,
) -> Idle {
    let (tcp, session) = tls.get_mut();
    match session.process_new_packets() {
        Ok(io)
            if io.plaintext_bytes_to_read() == 0
                && io.tls_bytes_to_write() == 0
                && !io.peer_has_closed() => {}
        Ok(_) => return Idle::Readable,
        Err(_) => return Idle::Broken,
    }
    let readable = async {
        let mut probe = [0u8; 1];
        let _ = tcp.peek(&mut probe).await;
        Idle::Readable
    };
    let timeout = async {
        smol::Timer::at(until).await;
        Idle::TimedOut
    };
    readable.or(timeout).await
}

async fn connection(app: Arc<App>, tls: Arc<rustls::ServerConfig>, tcp: TcpStream) {
    let _slot = ConnectionSlot(&app);
    let source = tcp
        .peer_addr()
        .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |a| a.ip());
    let _ = tcp.set_nodelay(true);
    // Boxed: the handshake's state is large and lives only until the session
    // is up; inline, it would size the task of every open connection.
    let mut tls = match Box::pin(handshake(&app, tls, tcp)).await {
        Ok(s) => {
            Metrics::bump(&app.metrics.handshakes);
            s
        }
        Err(NoSession::Shed) => return,
        Err(NoSession::Failed) => {
            Metrics::bump(&app.metrics.tls_failures);
            return;
        }
    };
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|der| Peer::from_certificate(der));
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let max_body = stella_proto::MAX_BODY_BYTES;
    loop {
        let idle_until = Instant::now() + app.settings.idle_timeout;
        if buf.is_empty() {
            // Between requests the buffers are given back (about 5 KiB per
            // open connection; a fleet keeps its connections open): taking
            // them again for the next heartbeat costs two allocations.
            buf = Vec::new();
            out = Vec::new();
            match next_request(&mut tls, idle_until).await {
                Idle::Readable => {}
                Idle::TimedOut | Idle::Broken => break,
            }
        }
        let read = http::read_head(
            &mut tls,
            &mut buf,
            idle_until.saturating_duration_since(Instant::now()),
            app.settings.request_timeout,
        )
        .await;
        let head = match read {
            Ok(head) => head,
            Err(ReadError::Reject(resp)) => {
                let _ = http::write_response(&mut tls, &resp, false, &mut out).await;
                // Read (and drop) a bounded amount of what the client is still
                // sending, so closing does not reset the connection before the
                // client has read our answer.
                drain(&mut tls).await;
                break;
            }
            Err(ReadError::Timeout) => {
                if !buf.is_empty() {
                    let resp = http::Response::error(408, "the request took too long to arrive");
                    let _ = http::write_response(&mut tls, &resp, false, &mut out).await;
                }
                break;
            }
            Err(ReadError::Closed | ReadError::Io(_)) => break,
        };
        let _in_flight = InFlight::new(&app);
        // Stopping: this answer is the connection's last.
        let keep_alive =
            head.request.keep_alive && !app.stopping.load(std::sync::atomic::Ordering::SeqCst);
        // The gate, on the head alone: a caller who fails is answered before
        // a byte of its body is looked at.
        if let Some(peer) = &peer {
            app.know_agent(&peer.agent_id).await;
        }
        let admitted = match api::admit(&app, peer.as_ref(), source, &head.request) {
            Ok(admitted) => admitted,
            Err(resp) => {
                // A body within the limit is skipped so that the connection
                // serves the next request; a larger one is not read at all.
                let reusable = head.body_len <= max_body
                    && http::skip_body(&mut tls, &mut buf, &head).await.is_ok();
                let keep = keep_alive && reusable;
                let written = http::write_response(&mut tls, &resp, keep, &mut out).await;
                if !reusable {
                    drain(&mut tls).await;
                }
                if written.is_err() || !keep {
                    break;
                }
                continue;
            }
        };
        if admitted.streams_body() {
            let (resp, whole) = Box::pin(api::upload_artifact(
                &app,
                &admitted.actor(source),
                &mut tls,
                &mut buf,
                head,
            ))
            .await;
            let keep = keep_alive && whole;
            let written = http::write_response(&mut tls, &resp, keep, &mut out).await;
            if !whole {
                drain(&mut tls).await;
            }
            if written.is_err() || !keep {
                break;
            }
            continue;
        }
        let req = match http::read_body(&mut tls, &mut buf, head, max_body).await {
            Ok(req) => req,
            Err(ReadError::Reject(resp)) => {
                let _ = http::write_response(&mut tls, &resp, false, &mut out).await;
                drain(&mut tls).await;
                break;
            }
            Err(ReadError::Timeout) => {
                let resp = http::Response::error(408, "the request took too long to arrive");
                let _ = http::write_response(&mut tls, &resp, false, &mut out).await;
                break;
            }
            Err(ReadError::Closed | ReadError::Io(_)) => break,
        };
        // Boxed, as the handshake: answering takes a few KiB of future state
        // for a moment; inline, every idle connection would hold them.
        let resp = Box::pin(api::handle(&app, admitted, peer.as_ref(), source, req)).await;
        if http::write_response(&mut tls, &resp, keep_alive, &mut out)
            .await
            .is_err()
            || !keep_alive
        {
            break;
        }
    }
    use smol::io::AsyncWriteExt;
    let _ = tls.close().await;
}

#[cfg(test)]
mod tests {
    use stella_tests::postgres::Postgres;

    use super::*;

    #[test]
    fn handshakes_beyond_the_bound_are_shed_and_slots_come_back() {
        let metrics = Metrics::default();
        let first = HandshakeSlot::take(&metrics, 2);
        let second = HandshakeSlot::take(&metrics, 2);
        assert!(first.is_some() && second.is_some());
        assert!(HandshakeSlot::take(&metrics, 2).is_none());
        assert!(HandshakeSlot::take(&metrics, 2).is_none());
        assert_eq!(Metrics::load(&metrics.handshakes_shed), 2);
        assert_eq!(Metrics::load(&metrics.handshakes_in_progress), 2);
        // A finished handshake (or a failed one) gives its slot back.
        drop(first);
        assert_eq!(Metrics::load(&metrics.handshakes_in_progress), 1);
        let again = HandshakeSlot::take(&metrics, 2);
        assert!(again.is_some());
        drop((second, again));
        assert_eq!(Metrics::load(&metrics.handshakes_in_progress), 0);
        assert_eq!(Metrics::load(&metrics.handshakes_shed), 2);
    }

    #[test]
    fn migrate_copies_the_data_dirs_blobs_and_refuses_a_used_target_first() {
        let test = "migrate_copies_the_data_dirs_blobs_and_refuses_a_used_target_first";
        let Some(pg) = Postgres::start(test) else {
            return;
        };
        let dir = stella_tests::TempDir::new("pg-migrate-blobs");
        let redb = RedbStore::create(&dir.join("server.redb"), "ab12").unwrap();
        let bytes: Vec<u8> = (0..(3u32 << 19)).map(|i| (i % 253) as u8).collect();
        let sha256 = stella_proto::hash::hex(&stella_proto::hash::sha256(&bytes));
        redb.put_blob(&sha256, bytes.len() as u64, &mut &bytes[..])
            .unwrap();
        assert!(dir.join(&format!("blobs/sha256/{sha256}")).is_file());
        drop(redb);

        let url = pg.database("migrate_blobs");
        migrate(dir.path(), &url).unwrap();
        let store = PgStore::open(&url).unwrap();
        assert_eq!(
            store.blobs().unwrap(),
            [(sha256.clone(), bytes.len() as u64)]
        );
        let mut copied = Vec::new();
        assert!(store.copy_blob(&sha256, &mut copied).unwrap());
        assert!(copied == bytes);

        // A database that holds a store is refused before any blob is copied.
        let used = pg.database("migrate_used");
        PgStore::create(&used, "cd").unwrap();
        let refused = migrate(dir.path(), &used).expect_err("a used target is refused");
        assert!(refused.to_string().contains("exists already"), "{refused}");
        assert!(PgStore::open(&used).unwrap().blobs().unwrap().is_empty());
    }
}
