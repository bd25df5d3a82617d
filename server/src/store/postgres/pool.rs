//! Connections to PostgreSQL: the store URL, the TCP stream (and TLS) over
//! smol, a bounded pool, the timeout every query runs under, and which
//! failures mean "the database cannot be reached now".
//!
//! `tokio-postgres` is driven without a tokio runtime: the stream is a smol
//! `TcpStream` behind tokio-util's compat adapter, and each connection's
//! protocol task runs on smol's global executor. The store's methods are
//! blocking (they run on smol's blocking pool), so a query is a
//! `block_on` of its future raced against the timeout.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls_pki_types::ServerName;
use rustls_pki_types::pem::PemObject;
use smol::future::FutureExt;
use smol::net::TcpStream;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::tls::{ChannelBinding, NoTls, TlsConnect};
use tokio_postgres::{Client, Config};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};

use crate::store::StoreError;

/// How long one store call (checkout, connect, every statement of its
/// transaction, commit) may take before it fails as unavailable. Below the
/// server's request timeout, so a client gets the 503 and not a closed
/// connection.
pub(crate) const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Reading every agent at start may take longer with a large fleet.
pub(crate) const LOAD_TIMEOUT: Duration = Duration::from_secs(120);
/// At most this many connections per server: blocking store calls beyond it
/// wait (up to the timeout) for one to be returned.
pub(crate) const MAX_CONNECTIONS: usize = 8;
const DEFAULT_PORT: u16 = 5432;

/// Where the store is and how to reach it, parsed from
/// `postgres://USER:PASSWORD@HOST:PORT/DB?sslmode=…&sslrootcert=…`.
pub(crate) struct Target {
    config: Config,
    host: String,
    port: u16,
    /// Set for `sslmode=require` (or `verify-full`): TLS, verified against
    /// the CA in `sslrootcert`, with the host name checked.
    tls: Option<(futures_rustls::TlsConnector, ServerName<'static>)>,
    /// The URL without its password, for messages.
    shown: String,
}

/// A malformed store URL.
fn bad_url(shown: &str, why: impl Into<String>) -> StoreError {
    StoreError::Backend {
        context: format!("bad PostgreSQL URL {shown}"),
        source: why.into().into(),
    }
}

/// The URL with any password replaced, for logs and errors.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{user}@{host}")
        }
        None => authority.to_owned(),
    };
    // A password may come as an option too.
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let kept: Vec<&str> = query
                .split('&')
                .filter(|pair| !pair.starts_with("password="))
                .collect();
            format!("{path}?{}", kept.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// Whether `s` names a PostgreSQL store (else it is not one we know).
pub(crate) fn is_postgres_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

impl Target {
    pub(crate) fn parse(url: &str) -> Result<Self, StoreError> {
        let shown = redact(url);
        // libpq's `sslrootcert` and the verifying `sslmode`s are ours to
        // handle; tokio-postgres refuses options it does not know.
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut passed = Vec::new();
        let mut mode = "disable";
        let mut root_cert = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("sslmode", value)) => mode = value,
                Some(("sslrootcert", value)) => root_cert = Some(value),
                _ => passed.push(pair),
            }
        }
        let rebuilt = if passed.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", passed.join("&"))
        };
        let mut config: Config = rebuilt
            .parse()
            .map_err(|e: tokio_postgres::Error| bad_url(&shown, e.to_string()))?;
        let host = match config.get_hosts() {
            [Host::Tcp(host)] => host.clone(),
            [] => return Err(bad_url(&shown, "it names no host")),
            [_] => {
                return Err(bad_url(
                    &shown,
                    "Unix sockets are not supported; name a TCP host",
                ));
            }
            _ => return Err(bad_url(&shown, "name one host")),
        };
        let port = match config.get_ports() {
            [] => DEFAULT_PORT,
            [port] => *port,
            _ => return Err(bad_url(&shown, "name one port")),
        };
        if config.get_user().is_none() {
            return Err(bad_url(
                &shown,
                "it names no user (postgres://USER@HOST/DB)",
            ));
        }
        let tls = match mode {
            "disable" => {
                config.ssl_mode(SslMode::Disable);
                None
            }
            "require" | "verify-full" => {
                config.ssl_mode(SslMode::Require);
                let Some(file) = root_cert else {
                    return Err(bad_url(
                        &shown,
                        format!(
                            "sslmode={mode} needs sslrootcert=FILE, the CA that signed the database's certificate"
                        ),
                    ));
                };
                Some((tls_connector(file)?, server_name(&host, &shown)?))
            }
            other => {
                return Err(bad_url(
                    &shown,
                    format!(
                        "sslmode={other} is not supported (use disable, require or verify-full)"
                    ),
                ));
            }
        };
        Ok(Self {
            config,
            host,
            port,
            tls,
            shown,
        })
    }

    /// The URL without its password.
    pub(crate) fn shown(&self) -> &str {
        &self.shown
    }

    /// Opens one connection: TCP, TLS if asked, start-up and
    /// authentication; its protocol task runs on smol's global executor
    /// until the client is dropped or the connection breaks.
    async fn connect(&self) -> Result<Client, StoreError> {
        self.connect_notifying(None).await
    }

    /// `connect`, passing each notification (`LISTEN`) the server sends to
    /// `notify` (a full channel drops it: one wake is as good as many).
    pub(crate) async fn connect_notifying(
        &self,
        notify: Option<smol::channel::Sender<()>>,
    ) -> Result<Client, StoreError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| unavailable(format!("cannot connect to {}", self.shown), e))?;
        let _ = tcp.set_nodelay(true);
        let stream = tcp.compat();
        let refused = |e| pg_error(&format!("cannot connect to {}", self.shown), e);
        let client = match &self.tls {
            None => {
                let (client, connection) = self
                    .config
                    .connect_raw(stream, NoTls)
                    .await
                    .map_err(refused)?;
                smol::spawn(drive(connection, notify)).detach();
                client
            }
            Some((connector, name)) => {
                let tls = RustlsConnect {
                    connector: connector.clone(),
                    name: name.clone(),
                };
                let (client, connection) = self
                    .config
                    .connect_raw(stream, tls)
                    .await
                    .map_err(refused)?;
                smol::spawn(drive(connection, notify)).detach();
                client
            }
        };
        // A statement the client gave up on must not go on holding locks.
        let limit = format!("SET statement_timeout = {}", QUERY_TIMEOUT.as_millis());
        client
            .batch_execute(&limit)
            .await
            .map_err(|e| pg_error("cannot set the statement timeout", e))?;
        Ok(client)
    }
}

/// Runs a connection's protocol until it ends, passing notifications on.
async fn drive<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    notify: Option<smol::channel::Sender<()>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => {
                if let Some(notify) = &notify {
                    let _ = notify.try_send(());
                }
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break,
        }
    }
}

fn tls_connector(file: &str) -> Result<futures_rustls::TlsConnector, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = rustls_pki_types::CertificateDer::pem_file_iter(file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| StoreError::Backend {
            context: format!("cannot read the PostgreSQL CA file {file}"),
            source: Box::new(e),
        })?;
    for cert in certs {
        roots.add(cert).map_err(|e| StoreError::Backend {
            context: format!("bad certificate in the PostgreSQL CA file {file}"),
            source: Box::new(e),
        })?;
    }
    if roots.is_empty() {
        return Err(StoreError::Backend {
            context: format!("the PostgreSQL CA file {file}"),
            source: "holds no certificate".into(),
        });
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Backend {
            context: "TLS for PostgreSQL".to_owned(),
            source: Box::new(e),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(futures_rustls::TlsConnector::from(Arc::new(config)))
}

fn server_name(host: &str, shown: &str) -> Result<ServerName<'static>, StoreError> {
    ServerName::try_from(host.to_owned())
        .map_err(|e| bad_url(shown, format!("{host:?} is not a host name for TLS ({e})")))
}

/// rustls over the smol stream, for tokio-postgres's TLS negotiation.
struct RustlsConnect {
    connector: futures_rustls::TlsConnector,
    name: ServerName<'static>,
}

type PlainStream = Compat<TcpStream>;

impl TlsConnect<PlainStream> for RustlsConnect {
    type Stream = TlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TlsStream>> + Send>>;

    fn connect(self, stream: PlainStream) -> Self::Future {
        Box::pin(async move {
            let tls = self
                .connector
                .connect(self.name, stream.into_inner())
                .await?;
            Ok(TlsStream(tls.compat()))
        })
    }
}

/// A TLS stream as tokio-postgres reads and writes it.
struct TlsStream(Compat<futures_rustls::client::TlsStream<TcpStream>>);

impl tokio::io::AsyncRead for TlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl tokio_postgres::tls::TlsStream for TlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM without channel binding (the server still offers plain
        // SCRAM-SHA-256); the certificate was verified against the CA.
        ChannelBinding::none()
    }
}

/// A PostgreSQL error on one line (a server's DETAIL and HINT come on
/// lines of their own), keeping the error as the cause.
#[derive(Debug)]
pub(crate) struct PgError(tokio_postgres::Error);

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = match self.0.as_db_error() {
            Some(db) => format!("{} ({})", db.message(), db.code().code()),
            None => self.0.to_string(),
        };
        f.write_str(&text.replace('\n', "; "))
    }
}

impl std::error::Error for PgError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// Whether a failure means the database cannot be reached or cannot serve
/// now (a later try may work), as opposed to a refused or wrong statement.
fn is_unavailable(e: &tokio_postgres::Error) -> bool {
    if let Some(code) = e.code() {
        let code = code.code();
        // 08: connection exception; 53: insufficient resources; 57P: the
        // server is shutting down or starting; 58: system error; 40001 and
        // 40P01: a serialization failure or deadlock (try again).
        return ["08", "53", "57P", "58", "40001", "40P01"]
            .iter()
            .any(|prefix| code.starts_with(prefix));
    }
    use std::error::Error as _;
    e.is_closed() || e.source().is_some_and(|s| s.is::<io::Error>())
}

/// A PostgreSQL failure as a store error.
pub(crate) fn pg_error(context: &str, e: tokio_postgres::Error) -> StoreError {
    let unavailable = is_unavailable(&e);
    let source = Box::new(PgError(e));
    if unavailable {
        StoreError::Unavailable {
            context: context.to_owned(),
            source,
        }
    } else {
        StoreError::Backend {
            context: context.to_owned(),
            source,
        }
    }
}

/// `pg_error` with a fixed context, for `map_err`.
pub(crate) fn pg(context: &'static str) -> impl Fn(tokio_postgres::Error) -> StoreError {
    move |e| pg_error(context, e)
}

fn unavailable(
    context: impl Into<String>,
    source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> StoreError {
    StoreError::Unavailable {
        context: context.into(),
        source: source.into(),
    }
}

/// Open connections, at most [`MAX_CONNECTIONS`].
pub(crate) struct Pool {
    target: Target,
    state: Mutex<PoolState>,
    returned: Condvar,
}

struct PoolState {
    idle: Vec<Client>,
    /// Idle and checked out.
    open: usize,
}

/// A checked-out connection; back to the pool when dropped, unless it
/// broke.
struct Lease<'a> {
    pool: &'a Pool,
    client: Option<Client>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let mut state = self.pool.lock();
        match self.client.take() {
            Some(client) if !client.is_closed() => state.idle.push(client),
            _ => state.open -= 1,
        }
        drop(state);
        self.pool.returned.notify_one();
    }
}

impl Pool {
    pub(crate) fn new(target: Target) -> Self {
        Self {
            target,
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                open: 0,
            }),
            returned: Condvar::new(),
        }
    }

    pub(crate) fn target(&self) -> &Target {
        &self.target
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle connection, or a slot to open one, waiting until `deadline`
    /// while all are in use.
    fn checkout(&self, deadline: Instant) -> Result<Lease<'_>, StoreError> {
        let mut state = self.lock();
        loop {
            while let Some(client) = state.idle.pop() {
                if !client.is_closed() {
                    return Ok(Lease {
                        pool: self,
                        client: Some(client),
                    });
                }
                state.open -= 1;
            }
            if state.open < MAX_CONNECTIONS {
                state.open += 1;
                return Ok(Lease {
                    pool: self,
                    client: None,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(unavailable(
                    "PostgreSQL",
                    format!("all {MAX_CONNECTIONS} connections stayed busy for {QUERY_TIMEOUT:?}"),
                ));
            }
            state = self
                .returned
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Runs `work` on a pooled connection (opened if needed), all of it
    /// within [`QUERY_TIMEOUT`]. A connection that timed out or broke is
    /// closed, not reused.
    pub(crate) fn run<T>(
        &self,
        work: impl AsyncFnOnce(&mut Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.run_within(QUERY_TIMEOUT, work)
    }

    /// `run` with another time limit.
    pub(crate) fn run_within<T>(
        &self,
        timeout: Duration,
        work: impl AsyncFnOnce(&mut Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let deadline = Instant::now() + timeout;
        let mut lease = self.checkout(deadline)?;
        let timed_out = async {
            smol::Timer::at(deadline).await;
            Err(unavailable(
                format!("PostgreSQL at {}", self.target.shown),
                format!("no answer within {timeout:?}"),
            ))
        };
        let result = smol::block_on(
            async {
                let client = match &mut lease.client {
                    Some(client) => client,
                    None => lease.client.insert(self.target.connect().await?),
                };
                work(client).await
            }
            .or(timed_out),
        );
        if matches!(result, Err(StoreError::Unavailable { .. })) {
            // The connection's state is unknown: drop it.
            lease.client = None;
        }
        result
    }
}
