//! Hostile clients against the real server on loopback (docs/design.md sections 3
//! and 11): oversized and malformed requests, slow and idle connections,
//! non-TLS bytes, foreign and expired client certificates, path traversal,
//! admin calls without the token, token brute force, TLS versions, and
//! secrets at rest. Every case checks the status, that the server still
//! answers, and that nothing changed in its store.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use stella_tests::raw::{
    Answer, addr, csr_json, exchange, json_post, openssl, path, read_answer, register_body,
    request, tcp, tls, tls_config,
};
use stella_tests::release::{Keys, native_target, signed_release};
use stella_tests::{AgentDir, Server, ServerOptions, TempDir, bin, text, tool};

/// Long heartbeats: nothing changes in the store on its own during a test.
fn quiet_server() -> Server {
    Server::start_with(ServerOptions {
        heartbeat_interval: "1h",
        ..ServerOptions::default()
    })
}

fn healthy(server: &Server) {
    let (status, body) = server.client().get("/healthz");
    assert_eq!(
        (status, body.as_str()),
        (200, "ok\n"),
        "server unhealthy; log:\n{}",
        server.proc.log_text()
    );
}

/// A running server with one enrolled (not running) agent and a spare token.
struct Fixture {
    server: Server,
    agent: AgentDir,
    id: String,
    spare: String,
    before: String,
}

impl Fixture {
    fn new() -> Self {
        let server = quiet_server();
        let agent = AgentDir::new();
        let id = agent.enroll(&server, "victim");
        let spare = server.token(&["--ttl", "1h"]);
        let before = server.admin_ok(&["agents", "list", "--json"]);
        Self {
            server,
            agent,
            id,
            spare,
            before,
        }
    }

    fn agent_tls(&self) -> Arc<ClientConfig> {
        tls_config(
            &self.server,
            Some((&self.agent.file("agent.pem"), &self.agent.file("agent.key"))),
        )
    }

    fn anonymous(&self) -> Arc<ClientConfig> {
        tls_config(&self.server, None)
    }

    fn send(&self, config: &Arc<ClientConfig>, bytes: &[u8]) -> Answer {
        exchange(&self.server, config, None, bytes).unwrap_or_else(|e| {
            panic!(
                "no answer to {:?}: {e}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            )
        })
    }

    /// The server answers, its agents are as they were, and the spare token
    /// still enrolls exactly one more agent.
    fn assert_unharmed(&self) {
        healthy(&self.server);
        let now = self.server.admin_ok(&["agents", "list", "--json"]);
        assert_eq!(now, self.before, "the store changed");
        let out = AgentDir::new().bootstrap(&self.server, &self.spare, &["--name", "after"]);
        assert!(
            out.status.success(),
            "the spare token no longer enrolls: {:?}",
            text(&out)
        );
        let agents = self.server.agents();
        assert_eq!(agents.len(), 2);
        assert_eq!(
            agents.iter().filter(|a| a.name == "victim").count(),
            1,
            "{agents:?}"
        );
    }
}

fn heartbeat_body() -> &'static str {
    r#"{"seq":1,"version":"x","uptime_s":1,"config_hash":"","config_drift":false,"doctor":{"pass":0,"warn":0,"fail":0,"skip":0,"failing":[]},"update":{"state":"idle","version":"x"},"capabilities":[]}"#
}

#[test]
fn oversized_heads_get_431_and_oversized_bodies_413() {
    let f = Fixture::new();
    let anon = f.anonymous();
    let big = "a".repeat(20 * 1024);
    let many: Vec<(String, String)> = (0..60).map(|i| (format!("x-h{i}"), "v".into())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let long_path = format!("/v1/releases/{big}/x");
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "a 20 KiB header",
            request("GET", "/healthz", &[("x-big", &big)], b""),
            431,
        ),
        ("60 headers", request("GET", "/healthz", &many, b""), 431),
        (
            "a 20 KiB request line",
            request("GET", &long_path, &[], b""),
            431,
        ),
        (
            "a 70 KiB registration",
            json_post(
                "/v1/agents/register",
                &[],
                &format!(r#"{{"token":"{}"}}"#, "a".repeat(70 * 1024)),
            ),
            413,
        ),
        (
            "a promised 100 GB body",
            b"POST /v1/agents/register HTTP/1.1\r\ncontent-type: application/json\r\ncontent-length: 100000000000\r\n\r\n{".to_vec(),
            413,
        ),
    ];
    for (what, bytes, want) in &cases {
        let answer = f.send(&anon, bytes);
        assert_eq!(answer.status, *want, "{what}: {answer:?}");
        assert!(answer.is_json_error(), "{what}: {answer:?}");
        assert_eq!(answer.header("connection"), Some("close"), "{what}");
    }
    // A head that never ends is cut off at the limit, not buffered for ever.
    let mut endless = b"GET /healthz HTTP/1.1\r\n".to_vec();
    for i in 0..4000 {
        endless.extend_from_slice(format!("x-{i}: {}\r\n", "b".repeat(50)).as_bytes());
    }
    let answer = f.send(&anon, &endless);
    assert_eq!(answer.status, 431, "{answer:?}");
    // Over mTLS too: an agent's oversized heartbeat.
    let padded = heartbeat_body().replacen('{', &format!("{{\"pad\":\"{}\",", big.repeat(4)), 1);
    let answer = f.send(
        &f.agent_tls(),
        &json_post("/v1/agents/heartbeat", &[], &padded),
    );
    assert_eq!(answer.status, 413, "{answer:?}");
    f.assert_unharmed();
}

#[test]
fn malformed_json_and_wrong_content_types_are_refused() {
    let f = Fixture::new();
    let (anon, agent) = (f.anonymous(), f.agent_tls());
    let bearer = format!("Bearer {}", f.server.admin_token);
    let admin = [("authorization", bearer.as_str())];
    let deep = format!("{}{}", "[".repeat(30_000), "]".repeat(30_000));
    let bad_json = [
        "{",
        "",
        "null",
        "[]",
        r#"{"token":1}"#,
        r#"{"token":"abcdef.0123456789abcdefghijklmnopqrstuv"}"#,
        r#"{"token":"x","csr":"y","name":"z","platform":{},"version":"1","capabilities":"all"}"#,
        "\"\\ud800\"",
        &deep,
    ];
    for body in bad_json {
        let short = &body[..body.len().min(60)];
        for (path, config, headers) in [
            ("/v1/agents/register", &anon, &[][..]),
            ("/v1/agents/heartbeat", &agent, &[][..]),
            ("/v1/agents/certificate", &agent, &[][..]),
            ("/v1/admin/tokens", &anon, &admin[..]),
            ("/v1/admin/config", &anon, &admin[..]),
        ] {
            let answer = f.send(config, &json_post(path, headers, body));
            assert_eq!(answer.status, 400, "{path} with {short:?}: {answer:?}");
            assert!(answer.is_json_error(), "{path}: {answer:?}");
        }
    }
    // Bytes that are not UTF-8.
    let mut latin1 = b"POST /v1/agents/register HTTP/1.1\r\ncontent-type: application/json\r\ncontent-length: 4\r\nconnection: close\r\n\r\n".to_vec();
    latin1.extend_from_slice(&[b'"', 0xe9, 0xff, b'"']);
    assert_eq!(f.send(&anon, &latin1).status, 400);

    let token_body = format!(
        r#"{{"token":"{}","csr":"x","name":"n","platform":{{"os":"linux","arch":"x","target":"t"}},"version":"1","capabilities":[]}}"#,
        f.spare
    );
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/jsonx"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("json"),
    ] {
        let headers: Vec<(&str, &str)> = content_type
            .map(|ct| vec![("content-type", ct)])
            .unwrap_or_default();
        for (path, config, body, auth) in [
            ("/v1/agents/register", &anon, token_body.as_str(), None),
            ("/v1/agents/heartbeat", &agent, heartbeat_body(), None),
            (
                "/v1/admin/tokens",
                &anon,
                r#"{"ttl_ms":60000,"uses":1,"labels":{}}"#,
                Some(&admin[0]),
            ),
        ] {
            let mut all = headers.clone();
            all.extend(auth.copied());
            let answer = f.send(config, &request("POST", path, &all, body.as_bytes()));
            assert_eq!(answer.status, 415, "{path} as {content_type:?}: {answer:?}");
            assert!(answer.is_json_error(), "{answer:?}");
        }
    }
    // The parameter form of the right type is fine (the CSR is what is wrong here).
    let answer = f.send(
        &anon,
        &request(
            "POST",
            "/v1/agents/register",
            &[("content-type", "application/json; charset=utf-8")],
            token_body.as_bytes(),
        ),
    );
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(answer.body.contains("CSR"), "{answer:?}");
    f.assert_unharmed();
}

/// Raises this process's open-file limit (inherited by the server it starts)
/// so that `want` connections fit on both sides.
fn raise_open_files(want: u64) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let current = limit.current.unwrap_or(u64::MAX);
    if current >= want {
        return;
    }
    let maximum = limit.maximum.unwrap_or(u64::MAX);
    assert!(
        maximum >= want,
        "the open-file hard limit {maximum} is below the {want} this test needs"
    );
    setrlimit(
        Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(want),
            maximum: limit.maximum,
        },
    )
    .expect("raise the open-file limit");
}

#[test]
fn a_thousand_idle_tls_connections_do_not_starve_the_server() {
    const CONNECTIONS: usize = 1000;
    raise_open_files(4 * CONNECTIONS as u64);
    let f = Fixture::new();
    let anon = f.anonymous();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(90);
    // Four threads open 250 connections each and keep them open, idle.
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (url, config) = (f.server.url.clone(), anon.clone());
            std::thread::spawn(move || {
                let to: SocketAddr = url.trim_start_matches("https://").parse().unwrap();
                let mut open = Vec::new();
                let mut failures = Vec::new();
                while open.len() < CONNECTIONS / 4 && Instant::now() < deadline {
                    let name = ServerName::try_from("127.0.0.1").unwrap();
                    let result = TcpStream::connect_timeout(&to, Duration::from_secs(10))
                        .map_err(|e| e.to_string())
                        .and_then(|sock| {
                            sock.set_read_timeout(Some(Duration::from_secs(10)))
                                .unwrap();
                            let conn = ClientConnection::new(config.clone(), name)
                                .map_err(|e| e.to_string())?;
                            let mut s = StreamOwned::new(conn, sock);
                            while s.conn.is_handshaking() {
                                s.conn.complete_io(&mut s.sock).map_err(|e| e.to_string())?;
                            }
                            Ok(s)
                        });
                    match result {
                        Ok(s) => open.push(s),
                        Err(e) if failures.len() < 5 => failures.push(e),
                        Err(_) => break,
                    }
                }
                (open, failures)
            })
        })
        .collect();
    let mut open = Vec::new();
    let mut failures = Vec::new();
    for t in threads {
        let (o, e) = t.join().expect("connecting thread");
        open.extend(o);
        failures.extend(e);
    }
    let opened_in = started.elapsed();
    assert_eq!(
        open.len(),
        CONNECTIONS,
        "only {} idle connections were accepted in {opened_in:?}: {failures:?}\nserver log:\n{}",
        open.len(),
        f.server.proc.log_text()
    );
    // With all of them open and idle, the server still answers promptly.
    for _ in 0..10 {
        let asked = Instant::now();
        healthy(&f.server);
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "/healthz took {:?} with {CONNECTIONS} idle connections",
            asked.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The idle connections are still usable.
    for s in open.iter_mut().step_by(100) {
        s.write_all(&request("GET", "/healthz", &[], b""))
            .expect("write on an idle connection");
        let answer = read_answer(s).expect("answer on an idle connection");
        assert_eq!(answer.status, 200);
    }
    drop(open);
    eprintln!("{CONNECTIONS} idle TLS connections opened in {opened_in:?}");
    f.assert_unharmed();
}

/// Sends `prefix`, then `drip` one byte per second (cycling), and returns the
/// answer and when it came (an error if none came within `limit`).
fn trickle(
    server: &Server,
    config: &Arc<ClientConfig>,
    prefix: &[u8],
    drip: &[u8],
    limit: Duration,
) -> (Result<Answer, String>, Duration) {
    let mut s = match tls(server, config, None) {
        Ok(s) => s,
        Err(e) => return (Err(e), Duration::ZERO),
    };
    let started = Instant::now();
    let _ = s.write_all(prefix).and_then(|()| s.flush());
    s.sock
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("read timeout");
    for byte in drip.iter().cycle() {
        if started.elapsed() > limit {
            return (Err("still open".into()), started.elapsed());
        }
        if s.write_all(&[*byte]).and_then(|()| s.flush()).is_err() {
            // Closed: read what the server said before it went.
            s.sock.set_read_timeout(Some(Duration::from_secs(2))).ok();
            return (read_answer(&mut s), started.elapsed());
        }
        let mut probe = [0u8; 1];
        match s.read(&mut probe) {
            Ok(0) => return (Err("closed without an answer".into()), started.elapsed()),
            Ok(_) => {
                // The answer has begun: read the rest.
                s.sock.set_read_timeout(Some(Duration::from_secs(5))).ok();
                let mut rest = probe.to_vec();
                let _ = s.read_to_end(&mut rest);
                let answer = read_answer(&mut rest.as_slice());
                return (answer, started.elapsed());
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return (Err(format!("read: {e}")), started.elapsed()),
        }
    }
    unreachable!("the drip cycles")
}

/// How long a raw TCP connection that never finishes a TLS handshake stays open.
fn stalled_handshake(server: &Server, first: &[u8], limit: Duration) -> Option<Duration> {
    let mut sock = tcp(server, None);
    sock.set_read_timeout(Some(limit)).expect("read timeout");
    let started = Instant::now();
    sock.write_all(first).expect("write");
    let mut buf = [0u8; 1024];
    loop {
        match sock.read(&mut buf) {
            Ok(0) | Err(_) if started.elapsed() < limit => return Some(started.elapsed()),
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

#[test]
fn slow_clients_are_cut_off_and_others_still_served() {
    // The server's per-request deadline and TLS handshake timeout (serve.rs).
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
    const LIMIT: Duration = Duration::from_secs(16);
    let f = Fixture::new();
    let server = &f.server;
    let anon = f.anonymous();
    std::thread::scope(|scope| {
        // Slowloris: twenty clients trickle a request head, a byte a second.
        let heads: Vec<_> = (0..20)
            .map(|_| {
                let anon = anon.clone();
                scope.spawn(move || {
                    trickle(
                        server,
                        &anon,
                        b"GET /healthz HTTP/1.1\r\n",
                        b"x-slow: aaaaaaaaaaaaaaaaaaaaaa\r\n",
                        LIMIT,
                    )
                })
            })
            .collect();
        // A body that trickles after a complete head.
        let body = scope.spawn(|| {
            trickle(
                server,
                &anon,
                b"POST /v1/agents/register HTTP/1.1\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{",
                b"a",
                LIMIT,
            )
        });
        // A TCP connection that never says hello, and one that stops mid-hello.
        let silent = scope.spawn(|| stalled_handshake(server, b"", LIMIT));
        let half_hello =
            scope.spawn(|| stalled_handshake(server, &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01], LIMIT));

        // Meanwhile everyone else is served promptly.
        let started = Instant::now();
        let mut served = 0;
        while started.elapsed() < REQUEST_TIMEOUT + Duration::from_secs(2) {
            let asked = Instant::now();
            healthy(server);
            assert!(
                asked.elapsed() < Duration::from_secs(2),
                "/healthz took {:?} during the slow clients",
                asked.elapsed()
            );
            served += 1;
            std::thread::sleep(Duration::from_millis(250));
        }
        assert!(served >= 20, "only {served} health checks answered");

        for (i, h) in heads.into_iter().enumerate() {
            let (answer, after) = h.join().expect("slow client");
            let answer = answer.unwrap_or_else(|e| {
                panic!(
                    "slow client {i}: {e} after {after:?}; log:\n{}",
                    server.proc.log_text()
                )
            });
            assert_eq!(answer.status, 408, "slow client {i}: {answer:?}");
            assert!(
                after < REQUEST_TIMEOUT + Duration::from_secs(3),
                "slow client {i} lasted {after:?}"
            );
            assert!(
                after >= REQUEST_TIMEOUT - Duration::from_secs(2),
                "slow client {i} cut at {after:?}"
            );
        }
        let (answer, after) = body.join().expect("slow body");
        let answer = answer.unwrap_or_else(|e| panic!("slow body: {e} after {after:?}"));
        assert_eq!(answer.status, 408, "{answer:?}");
        assert!(
            after < REQUEST_TIMEOUT + Duration::from_secs(3),
            "slow body lasted {after:?}"
        );
        for (what, h) in [("silent", silent), ("half hello", half_hello)] {
            let closed = h.join().expect("stalled handshake");
            let closed =
                closed.unwrap_or_else(|| panic!("{what} connection still open after {LIMIT:?}"));
            assert!(
                closed < REQUEST_TIMEOUT + Duration::from_secs(3),
                "{what}: {closed:?}"
            );
        }
    });
    f.assert_unharmed();
}

#[test]
fn non_tls_bytes_on_the_tls_port_are_dropped() {
    let f = Fixture::new();
    let mut garbage = Vec::with_capacity(64 * 1024);
    let mut x: u32 = 0x9e37_79b9;
    for _ in 0..64 * 1024 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        garbage.push(x as u8);
    }
    let cases: [(&str, &[u8]); 4] = [
        ("plain HTTP", b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"),
        ("plain HTTP admin", b"GET /v1/admin/agents HTTP/1.1\r\n\r\n"),
        (
            "an SSLv2 hello",
            &[
                0x80, 0x2e, 0x01, 0x00, 0x02, 0x00, 0x15, 0x00, 0x00, 0x00, 0x10,
            ],
        ),
        ("64 KiB of noise", &garbage),
    ];
    for (what, bytes) in cases {
        let mut sock = tcp(&f.server, None);
        let started = Instant::now();
        let _ = sock.write_all(bytes);
        let mut back = Vec::new();
        let _ = sock.read_to_end(&mut back);
        assert!(
            started.elapsed() < Duration::from_secs(12),
            "{what}: the connection stayed open {:?}",
            started.elapsed()
        );
        assert!(
            !back.starts_with(b"HTTP/"),
            "{what}: answered in plain text: {:?}",
            String::from_utf8_lossy(&back)
        );
        // At most a TLS alert record.
        assert!(back.len() <= 7 || back[0] == 0x15, "{what}: {back:?}");
    }
    let (_, metrics) = f.server.client().get("/metrics");
    let failures: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("stella_tls_handshake_failures_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no handshake failure counter: {metrics}"));
    assert!(failures >= 4, "{metrics}");
    f.assert_unharmed();
}

/// Issues an agent-shaped client certificate (CN = `cn`, URI SAN
/// `stella://agent/<cn>`, client auth) with `openssl ca`, signed by the given
/// CA, valid from `start` to `end` (`YYMMDDHHMMSSZ`) or for a day from now.
fn openssl_client_cert(
    work: &Path,
    name: &str,
    ca: (&Path, &Path),
    cn: &str,
    validity: Option<(&str, &str)>,
) -> (PathBuf, PathBuf) {
    let dir = work.join(name);
    fs::create_dir_all(&dir).expect("work dir");
    let (key, csr, cert) = (
        dir.join("key.pem"),
        dir.join("req.pem"),
        dir.join("cert.pem"),
    );
    stella_tests::raw::new_key_and_csr(&key, &csr, cn);
    fs::write(dir.join("index.txt"), "").expect("index");
    let config = format!(
        "[ca]\ndefault_ca = test\n[test]\ndatabase = {d}/index.txt\nnew_certs_dir = {d}\n\
         certificate = {cert}\nprivate_key = {key}\ndefault_md = sha256\npolicy = any\n\
         unique_subject = no\nrand_serial = yes\nx509_extensions = agent\ndefault_days = 1\n\
         [any]\ncommonName = supplied\n\
         [agent]\nbasicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\n\
         extendedKeyUsage = clientAuth\nsubjectAltName = URI:stella://agent/{cn}\n\
         authorityKeyIdentifier = keyid\n",
        d = path(&dir),
        cert = path(ca.0),
        key = path(ca.1),
    );
    let cnf = dir.join("ca.cnf");
    fs::write(&cnf, config).expect("openssl config");
    let mut args = vec![
        "ca",
        "-batch",
        "-notext",
        "-config",
        path(&cnf),
        "-in",
        path(&csr),
        "-out",
        path(&cert),
    ];
    if let Some((start, end)) = validity {
        args.extend(["-startdate", start, "-enddate", end]);
    }
    openssl(&args);
    (cert, key)
}

/// What a connection presenting `config` gets for `GET /v1/agents/self`.
fn whoami(f: &Fixture, config: &Arc<ClientConfig>) -> Result<Answer, String> {
    exchange(
        &f.server,
        config,
        None,
        &request("GET", "/v1/agents/self", &[], b""),
    )
}

#[test]
fn client_certificates_from_another_ca_are_refused() {
    let f = Fixture::new();
    let work = TempDir::new("other-ca");
    let (ca_cert, ca_key) = (work.join("ca.pem"), work.join("ca.key"));
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        path(&ca_key),
        "-out",
        path(&ca_cert),
        "-subj",
        "/CN=Other CA",
        "-days",
        "30",
    ]);
    // The real agent's id and shape, from a CA the server does not trust.
    let (cert, key) = openssl_client_cert(work.path(), "forged", (&ca_cert, &ca_key), &f.id, None);
    let forged = tls_config(&f.server, Some((&cert, &key)));
    let refused = whoami(&f, &forged).expect_err("a foreign client certificate was accepted");
    assert!(
        refused.contains("alert") || refused.contains("reset") || refused.contains("closed"),
        "{refused}"
    );
    // The server's own certificate is from the right CA but not for clients.
    let data = &f.server.data;
    let own = tls_config(
        &f.server,
        Some((&data.join("server.pem"), &data.join("server.key"))),
    );
    let refused = whoami(&f, &own).expect_err("the server certificate was accepted as a client");
    assert!(!refused.is_empty());
    // The real agent gets in (the check above is about the certificates).
    let answer = whoami(&f, &f.agent_tls()).expect("the agent's own certificate");
    assert_eq!(answer.status, 200, "{answer:?}");
    f.assert_unharmed();
}

#[test]
fn expired_client_certificates_are_refused() {
    let f = Fixture::new();
    let work = TempDir::new("expired");
    let ca = (f.server.data.join("ca.pem"), f.server.data.join("ca.key"));
    let ca = (ca.0.as_path(), ca.1.as_path());
    let (cert, key) = openssl_client_cert(
        work.path(),
        "expired",
        ca,
        &f.id,
        Some(("200101000000Z", "200102000000Z")),
    );
    let expired = tls_config(&f.server, Some((&cert, &key)));
    let refused = whoami(&f, &expired).expect_err("an expired client certificate was accepted");
    assert!(
        refused.contains("alert") || refused.contains("reset") || refused.contains("closed"),
        "{refused}"
    );
    // Control: the same recipe, in date, passes TLS; the API then refuses it
    // because it is not the agent's current certificate.
    let (cert, key) = openssl_client_cert(work.path(), "current", ca, &f.id, None);
    let answer =
        whoami(&f, &tls_config(&f.server, Some((&cert, &key)))).expect("in-date certificate");
    assert_eq!(answer.status, 401, "{answer:?}");
    assert!(answer.body.contains("superseded"), "{answer:?}");
    f.assert_unharmed();
}

#[test]
fn path_traversal_in_release_paths_serves_nothing() {
    let f = Fixture::new();
    let keys = Keys::new();
    let release = signed_release(&keys, "9.9.9", &bin("stella-agent"), &[]);
    stella_tests::release::import(&f.server, &release);
    let before = f.server.admin_ok(&["agents", "list", "--json"]);
    let agent = f.agent_tls();
    let target = native_target();
    let good = format!("/v1/releases/9.9.9/{target}");
    // Control: the real artifact is served (its first bytes).
    let answer = f.send(
        &agent,
        &request("GET", &good, &[("range", "bytes=0-3")], b""),
    );
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (206, "\x7fELF"),
        "{answer:?}"
    );
    let blob = stella_tests::release::sha256(&bin("stella-agent"));
    let attacks = [
        "/v1/releases/../../etc/passwd".to_owned(),
        "/v1/releases/%2e%2e/%2e%2e/etc/passwd".to_owned(),
        "/v1/releases/..%2f..%2fetc%2fpasswd/x".to_owned(),
        "/v1/releases/9.9.9/..%2f..%2fca.key".to_owned(),
        "/v1/releases/9.9.9/../../../ca.key".to_owned(),
        "/v1/releases/9.9.9/%2e%2e%2f%2e%2e%2fserver.key".to_owned(),
        "/v1/releases/..%5c..%5cca.key/x".to_owned(),
        format!("/v1/releases/9.9.9/{target}/../../../../etc/passwd"),
        format!("/v1/releases/9.9.9/{}etc/passwd", "../".repeat(20)),
        "/v1/releases//etc/passwd".to_owned(),
        "/v1/releases/9.9.9//etc/passwd".to_owned(),
        format!("/v1/releases/9.9.9/{target}%00.key"),
        format!("/v1/releases/9.9.9/{target}/"),
        format!("/v1/releases/9.9.9/{target}/stella-agent"),
        "/v1/releases/9.9.9/x86_64-unknown-linux-gnu%2f..%2f..%2f..%2fca.key".to_owned(),
        format!("/v1/releases/sha256/{blob}"),
        format!("/blobs/sha256/{blob}"),
        "/ca.key".to_owned(),
        "/server.redb".to_owned(),
        "/../ca.key".to_owned(),
        "/v1/../v1/admin/agents".to_owned(),
        "/v1/admin/../agents/self".to_owned(),
    ];
    for path in &attacks {
        for config in [&agent, &f.anonymous()] {
            let answer = match exchange(&f.server, config, None, &request("GET", path, &[], b"")) {
                Ok(a) => a,
                Err(e) => panic!("{path}: no answer: {e}"),
            };
            assert!((400..500).contains(&answer.status), "{path}: {answer:?}");
            assert!(answer.is_json_error(), "{path}: {answer:?}");
            assert!(answer.body.len() < 600, "{path}: {answer:?}");
            for secret in ["PRIVATE KEY", "root:x:", "\u{7f}ELF", "CERTIFICATE"] {
                assert!(
                    !answer.body.contains(secret),
                    "{path} leaked {secret}: {answer:?}"
                );
            }
        }
    }
    // Without a client certificate not even the real artifact.
    let answer = f.send(&f.anonymous(), &request("GET", &good, &[], b""));
    assert_eq!(answer.status, 401, "{answer:?}");
    assert_eq!(f.server.admin_ok(&["agents", "list", "--json"]), before);
    healthy(&f.server);
}

#[test]
fn admin_calls_without_the_admin_token_get_401_and_change_nothing() {
    let f = Fixture::new();
    let config_before = f.server.admin_ok(&["config", "show"]);
    let anon = f.anonymous();
    let token = f.server.admin_token.clone();
    let hashed = stella_proto::hash::hex(&stella_proto::token::hash_secret(&token));
    let calls: Vec<(&str, String, &str)> = vec![
        ("GET", "/v1/admin/agents".into(), ""),
        (
            "POST",
            "/v1/admin/tokens".into(),
            r#"{"ttl_ms":60000,"uses":5,"labels":{}}"#,
        ),
        ("POST", format!("/v1/admin/agents/{}/revoke", f.id), ""),
        ("POST", format!("/v1/admin/agents/{}/deactivate", f.id), ""),
        ("POST", format!("/v1/admin/agents/{}/renew", f.id), ""),
        (
            "POST",
            "/v1/admin/config".into(),
            r#"{"scope":"global","config":{"log_level":"debug"}}"#,
        ),
        ("GET", "/v1/admin/config".into(), ""),
        ("GET", "/v1/admin/drift".into(), ""),
        ("POST", "/v1/admin/releases".into(), r#"{"dir":"/"}"#),
        ("GET", "/v1/admin/releases".into(), ""),
        (
            "POST",
            "/v1/admin/rollouts".into(),
            r#"{"release":"9.9.9","stages":["100"],"soak_ms":0,"max_failures":1.0,"selector":{}}"#,
        ),
        ("GET", "/v1/admin/nothing-here".into(), ""),
    ];
    let wrong = [
        None,
        Some("Bearer wrong".to_owned()),
        Some("Bearer ".to_owned()),
        Some(format!("Bearer {token}x")),
        Some(format!("Bearer {}", &token[..token.len() - 1])),
        Some(format!("Bearer {hashed}")),
        Some(format!("Bearer {}", f.spare)),
        Some(format!("Basic {token}")),
        Some(token),
    ];
    // Each call from its own loopback address: wrong admin tokens are braked
    // per source (429 after 10 a minute), as registrations are.
    for (n, (method, path, body)) in calls.iter().enumerate() {
        let source = Some(Ipv4Addr::new(127, 0, 1, 10 + n as u8));
        for auth in &wrong {
            let mut headers = vec![("content-type", "application/json")];
            if let Some(a) = auth {
                headers.push(("authorization", a.as_str()));
            }
            let bytes = request(method, path, &headers, body.as_bytes());
            let answer = exchange(&f.server, &anon, source, &bytes)
                .unwrap_or_else(|e| panic!("no answer to {method} {path}: {e}"));
            assert_eq!(
                answer.status, 401,
                "{method} {path} with {auth:?}: {answer:?}"
            );
            assert!(answer.is_json_error(), "{answer:?}");
        }
    }
    // An agent's client certificate is no admin credential either.
    let answer = f.send(
        &f.agent_tls(),
        &request("GET", "/v1/admin/agents", &[], b""),
    );
    assert_eq!(answer.status, 401, "{answer:?}");
    assert_eq!(f.server.admin_ok(&["config", "show"]), config_before);
    assert_eq!(f.server.agent(&f.id).status, "active");
    f.assert_unharmed();
}

#[test]
fn registration_brute_force_is_rate_limited_per_source() {
    const ATTEMPTS: usize = 40;
    let f = Fixture::new();
    let work = TempDir::new("brute");
    let csr = csr_json(work.path(), "brute");
    let (id, _) = f.spare.split_once('.').expect("token");
    let anon = f.anonymous();
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for i in 0..ATTEMPTS {
        let guess = format!("{id}.{:032}", i);
        let body = register_body(&guess, &csr, "brute");
        let answer = f.send(&anon, &json_post("/v1/agents/register", &[], &body));
        assert!(answer.is_json_error(), "{answer:?}");
        if answer.status == 429 {
            retry_after = retry_after.or(answer.header("retry-after").map(str::to_owned));
        }
        statuses.push(answer.status);
    }
    assert!(
        statuses.iter().all(|s| matches!(s, 401 | 429)),
        "{statuses:?}"
    );
    let first_429 = statuses.iter().position(|s| *s == 429);
    let Some(first_429) = first_429 else {
        panic!(
            "{ATTEMPTS} wrong secrets for token {id} from one address were all answered 401; \
             expected 429 (rate limited per source) after a few: {statuses:?}"
        );
    };
    assert!(
        first_429 <= 20,
        "the limit came only after {first_429} failures: {statuses:?}"
    );
    assert!(
        statuses[first_429..].iter().all(|s| *s == 429),
        "once limited, a source stays limited within the window: {statuses:?}"
    );
    assert!(retry_after.is_some(), "429 without Retry-After");
    // A limited source cannot test guesses at all, not even the right one: a
    // 201 for it would tell a brute forcer when it has won.
    let body = register_body(&f.spare, &csr, "brute");
    let answer = f.send(&anon, &json_post("/v1/agents/register", &[], &body));
    assert_eq!(answer.status, 429, "{answer:?}");
    // Another source is not limited, and the token was not used up.
    let other = Some(Ipv4Addr::new(127, 0, 0, 2));
    let body = register_body(&f.spare, &csr_json(work.path(), "honest"), "honest");
    let answer = exchange(
        &f.server,
        &anon,
        other,
        &json_post("/v1/agents/register", &[], &body),
    )
    .expect("answer to 127.0.0.2");
    assert_eq!(answer.status, 201, "{answer:?}");
    let agents = f.server.agents();
    assert_eq!(agents.len(), 2, "{agents:?}");
    assert!(agents.iter().any(|a| a.name == "honest"));
    healthy(&f.server);
}

#[test]
fn only_tls_1_2_and_1_3_and_agent_endpoints_need_a_client_certificate() {
    let f = Fixture::new();
    let connect = addr(&f.server).to_string();
    let ca = f.server.ca_pem();
    let s_client = |extra: &[&str]| {
        let mut args = vec![
            "s_client",
            "-connect",
            &connect,
            "-CAfile",
            path(&ca),
            "-verify_return_error",
            "-verify_ip",
            "127.0.0.1",
            "-brief",
        ];
        args.extend_from_slice(extra);
        let out = tool("openssl", &args);
        let (stdout, stderr) = text(&out);
        (out.status.success(), format!("{stdout}{stderr}"))
    };
    for (flag, version) in [("-tls1_3", "TLSv1.3"), ("-tls1_2", "TLSv1.2")] {
        let (ok, out) = s_client(&[flag]);
        assert!(ok, "{flag} refused: {out}");
        assert!(
            out.contains(&format!("Protocol version: {version}")),
            "{flag}: {out}"
        );
    }
    // Older versions: the client is allowed to offer them (security level 0),
    // so the refusal is the server's.
    for flag in ["-tls1_1", "-tls1"] {
        let (ok, out) = s_client(&[flag, "-cipher", "DEFAULT:@SECLEVEL=0"]);
        assert!(!ok, "{flag} accepted: {out}");
        assert!(
            !out.contains("no protocols available"),
            "{flag} never offered: {out}"
        );
        assert!(!out.contains("Protocol version: TLSv1."), "{flag}: {out}");
    }
    // TLS 1.2 without forward secrecy (RSA key exchange) is not offered.
    let (ok, out) = s_client(&["-tls1_2", "-cipher", "AES128-SHA:@SECLEVEL=0"]);
    assert!(!ok, "a static-RSA suite was accepted: {out}");

    // No agent endpoint answers without a client certificate.
    let anon = f.anonymous();
    let target = native_target();
    for (method, path, body) in [
        ("POST", "/v1/agents/heartbeat", heartbeat_body()),
        ("POST", "/v1/agents/certificate", r#"{"csr":"x"}"#),
        ("GET", "/v1/agents/self", ""),
        ("GET", &*format!("/v1/releases/0.1.0/{target}"), ""),
    ] {
        let mut headers = vec![];
        if method == "POST" {
            headers.push(("content-type", "application/json"));
        }
        let answer = f.send(&anon, &request(method, path, &headers, body.as_bytes()));
        assert_eq!(answer.status, 401, "{method} {path}: {answer:?}");
        assert!(answer.body.contains("client certificate"), "{answer:?}");
    }
    // With the agent's certificate, openssl gets in over TLS 1.2 and 1.3.
    let (cert, key) = (f.agent.file("agent.pem"), f.agent.file("agent.key"));
    for flag in ["-tls1_2", "-tls1_3"] {
        let (ok, out) = s_client(&[flag, "-cert", path(&cert), "-key", path(&key)]);
        assert!(ok, "{flag} with the agent certificate: {out}");
    }
    f.assert_unharmed();
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// 40 base64 characters from inside the private scalar of a PKCS#8 P-256
/// key file (the DER header before it is the same in every such key): what
/// would show if the key leaked.
fn key_text(p: &Path) -> String {
    let body: String = fs::read_to_string(p)
        .expect("PEM file")
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    body.get(48..88).expect("a P-256 key").to_owned()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    !needle.is_empty()
        && haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
}

#[test]
fn secrets_stay_out_of_logs_and_the_store_and_files_keep_their_modes() {
    let server = Server::start();
    let token = server.token(&["--ttl", "10m"]);
    let secret = token.split_once('.').expect("token").1.to_owned();
    let agent = AgentDir::new();
    let out = agent.bootstrap(&server, &token, &["--name", "secretive"]);
    assert!(out.status.success(), "{:?}", text(&out));
    let id = text(&out).0.trim().to_owned();
    let mut running = agent.run();
    let first = server.wait_for_agent(&id, "heartbeating", |a| a.heartbeat_seq >= 2);
    let old_key = key_text(&agent.file("agent.key"));
    server.admin_ok(&["agents", "renew", &id]);
    server.wait_for_agent(&id, "renewed", |a| {
        a.cert_serial != first.cert_serial && a.heartbeat_seq > first.heartbeat_seq + 1
    });
    running.kill();

    // Modes.
    assert_eq!(mode(&server.data), 0o700, "data dir");
    for file in ["ca.key", "server.key", "admin.token", "server.redb"] {
        assert_eq!(mode(&server.data.join(file)), 0o600, "{file}");
    }
    assert_eq!(mode(&agent.state), 0o700, "agent state dir");
    assert_eq!(
        mode(&agent.file("agent.key")),
        0o600,
        "agent.key after renewal"
    );
    assert_ne!(
        key_text(&agent.file("agent.key")),
        old_key,
        "renewal makes a new key"
    );

    let admin = server.admin_token.clone();
    let keys = [
        ("the CA key", key_text(&server.data.join("ca.key"))),
        ("the server key", key_text(&server.data.join("server.key"))),
        ("the agent key", key_text(&agent.file("agent.key"))),
        ("the agent's old key", old_key),
    ];
    // Logs: the server's, the agent's, and what bootstrap printed.
    let mut logs: Vec<(String, Vec<u8>)> = files_under(server.dir.path())
        .into_iter()
        .chain(files_under(agent.dir.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .map(|p| (p.display().to_string(), fs::read(&p).expect("log")))
        .collect();
    assert!(logs.len() >= 2, "{logs:?}");
    logs.push(("bootstrap output".into(), [out.stdout, out.stderr].concat()));
    for (name, bytes) in &logs {
        for (what, needle) in [("the admin token", &admin), ("the token secret", &secret)] {
            assert!(!contains(bytes, needle), "{what} is in {name}");
        }
        assert!(
            !contains(bytes, "PRIVATE KEY"),
            "a private key is in {name}"
        );
        for (what, body) in &keys {
            assert!(!contains(bytes, body), "{what} is in {name}");
        }
    }
    // The data dir: only admin.token holds the admin token, only the key files
    // their keys; the store holds hashes.
    let data_files = files_under(&server.data);
    assert!(data_files.iter().any(|p| p.ends_with("server.redb")));
    for file in &data_files {
        let bytes = fs::read(file).expect("data file");
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name != "admin.token" {
            assert!(
                !contains(&bytes, &admin),
                "the admin token is in {}",
                file.display()
            );
        }
        assert!(
            !contains(&bytes, &secret),
            "the token secret is in {}",
            file.display()
        );
        for (what, body) in &keys {
            let own = matches!(
                (name, *what),
                ("ca.key", "the CA key") | ("server.key", "the server key")
            );
            if !own {
                assert!(!contains(&bytes, body), "{what} is in {}", file.display());
            }
        }
    }
    // The agent's state dir: the token is gone; its keys only in agent.key.
    for file in files_under(&agent.state) {
        let bytes = fs::read(&file).expect("state file");
        assert!(
            !contains(&bytes, &secret),
            "the token secret is in {}",
            file.display()
        );
        if !file.ends_with("agent.key") {
            assert!(
                !contains(&bytes, "PRIVATE KEY"),
                "a private key is in {}",
                file.display()
            );
        }
    }
    // What the server stores is the hash of each secret.
    let redb = fs::read(server.data.join("server.redb")).expect("server.redb");
    let admin_hash = stella_proto::hash::hex(&stella_proto::token::hash_secret(&admin));
    assert!(
        contains(&redb, &admin_hash),
        "the admin token hash is not in the store"
    );
    let parsed = stella_proto::RegistrationToken::parse(&token).expect("token");
    let token_hash = stella_proto::hash::hex(&parsed.secret_hash());
    assert!(
        contains(&redb, &token_hash),
        "the token hash is not in the store"
    );
}

#[test]
fn a_config_document_is_refused_once_not_on_every_heartbeat() {
    // Fuzzing found numbers that change when miniserde reads back their
    // canonical text (fuzz/regressions/config/): 1.3e-221 reads back as
    // 1.2999999999999999e-221 and that as 1.3e-221 again, so the agent hashes
    // the document differently from the server, which then pushes it again
    // with every heartbeat. Either the server refuses such a document, or the
    // agent refuses it once and the server stops pushing it.
    let server = Server::start();
    let agent = AgentDir::new();
    let id = agent.enroll(&server, "floaty");
    let mut running = agent.run();
    server.wait_for_agent(&id, "heartbeating", |a| a.heartbeat_seq >= 1);
    let doc = server.dir.join("float.json");
    fs::write(&doc, r#"{"log_level":"info","disk_min_free":1.3e-221}"#).expect("config file");
    let out = server.admin(&["config", "set", "--scope", "global", path(&doc)]);
    if out.status.success() {
        // Six heartbeats after the document was set.
        let seq = server.agent(&id).heartbeat_seq;
        server.wait_for_agent(&id, "heartbeating on", |a| a.heartbeat_seq >= seq + 6);
        running.kill();
        let log = fs::read_to_string(&running.log).unwrap_or_default();
        let refusals = log.matches("configuration refused").count();
        assert!(refusals >= 1, "the agent took the document:\n{log}");
        assert!(
            refusals <= 2,
            "the server pushed the refused document {refusals} times (every heartbeat): the \
             agent's hash of it differs from the server's\n{log}"
        );
    } else {
        let (_, stderr) = text(&out);
        assert!(stderr.contains("400"), "{stderr}");
        assert_eq!(server.agent(&id).config_error, None);
    }
    healthy(&server);
}

/// The bodies a caller who fails authentication may send: whatever they are,
/// the answer is the refusal of the caller (401/403), never a complaint about
/// the body (400, 413, 415).
fn garbage_bodies() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("application/json", b"{}".to_vec()),
        ("application/json", b"not json at all".to_vec()),
        ("text/plain", heartbeat_body().as_bytes().to_vec()),
        ("application/json", vec![0xff, 0xfe, 0x00]),
        ("application/json", vec![b'x'; 200 * 1024]),
    ]
}

#[test]
fn callers_who_fail_authentication_are_refused_before_their_body_is_read() {
    let f = Fixture::new();
    let agent_tls = f.agent_tls();
    let anon = f.anonymous();
    let agent_routes = [
        ("POST", "/v1/agents/heartbeat"),
        ("POST", "/v1/agents/certificate"),
        ("GET", "/v1/agents/self"),
    ];
    // No client certificate at all.
    for (method, path) in agent_routes {
        for (content_type, body) in garbage_bodies() {
            let answer = f.send(
                &anon,
                &request(method, path, &[("content-type", content_type)], &body),
            );
            assert_eq!(
                answer.status,
                401,
                "{method} {path} without a certificate, {content_type}, {} bytes: {answer:?}",
                body.len()
            );
            assert!(answer.is_json_error(), "{answer:?}");
        }
    }
    // A wrong admin token, whatever the body.
    for (content_type, body) in garbage_bodies() {
        let answer = f.send(
            &anon,
            &request(
                "POST",
                "/v1/admin/tokens",
                &[
                    ("content-type", content_type),
                    ("authorization", "Bearer wrong"),
                ],
                &body,
            ),
        );
        assert_eq!(
            answer.status,
            401,
            "admin, {} bytes: {answer:?}",
            body.len()
        );
        assert!(answer.is_json_error(), "{answer:?}");
    }
    // A deactivated agent's heartbeat: 403, whatever the body.
    f.server.admin_ok(&["agents", "deactivate", &f.id]);
    for (content_type, body) in garbage_bodies() {
        let answer = f.send(
            &agent_tls,
            &request(
                "POST",
                "/v1/agents/heartbeat",
                &[("content-type", content_type)],
                &body,
            ),
        );
        assert_eq!(
            answer.status,
            403,
            "deactivated heartbeat, {content_type}, {} bytes: {answer:?}",
            body.len()
        );
    }
    // A revoked agent: 401 on every agent route, whatever the body.
    f.server.admin_ok(&["agents", "revoke", &f.id]);
    for (method, path) in agent_routes {
        for (content_type, body) in garbage_bodies() {
            let answer = f.send(
                &agent_tls,
                &request(method, path, &[("content-type", content_type)], &body),
            );
            assert_eq!(
                answer.status,
                401,
                "revoked {method} {path}, {content_type}, {} bytes: {answer:?}",
                body.len()
            );
            assert!(answer.is_json_error(), "{answer:?}");
        }
    }
    healthy(&f.server);
    assert_eq!(f.server.agent(&f.id).status, "revoked");
}
