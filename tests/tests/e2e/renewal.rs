//! Certificate lifecycle (docs/design.md section 3): scheduled renewal with a fresh
//! key, renewal on request, refusal of revoked and superseded certificates,
//! recovery after an offline expiry within the grace, and a crash at each step
//! of the key/certificate swap.

use std::fs;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use stella_tests::{AgentDir, DEADLINE, Server, ServerOptions, poll, text, tool};

fn short_lived(lifetime: &'static str, grace: &'static str) -> Server {
    Server::start_with(ServerOptions {
        cert_lifetime: lifetime,
        expired_grace: grace,
        ..ServerOptions::default()
    })
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Waits on the clock until `unix` has passed.
fn wait_until(unix: u64) {
    poll(Duration::from_secs(60), || (now() > unix).then_some(())).expect("clock");
}

fn not_after(server: &Server, id: &str) -> u64 {
    stella_proto::time::parse_rfc3339(&server.agent(id).cert_not_after)
        .expect("RFC 3339 cert_not_after")
}

/// The public key of a certificate or private key, as openssl prints it.
fn public_key(path: &std::path::Path, is_cert: bool) -> String {
    let p = path.to_str().unwrap();
    let out = if is_cert {
        tool("openssl", &["x509", "-in", p, "-noout", "-pubkey"])
    } else {
        tool("openssl", &["pkey", "-in", p, "-pubout"])
    };
    assert!(out.status.success(), "openssl on {p}: {:?}", text(&out));
    text(&out).0
}

fn assert_pair_matches(agent: &AgentDir) {
    assert_eq!(
        public_key(&agent.file("agent.pem"), true),
        public_key(&agent.file("agent.key"), false),
        "agent.pem and agent.key must match"
    );
}

fn heartbeat_with(server: &Server, cert: &std::path::Path, key: &std::path::Path) -> (u16, String) {
    let client = stella_tests::Client::new(
        &server.url,
        &fs::read(server.ca_pem()).unwrap(),
        Some((&fs::read(cert).unwrap(), &fs::read(key).unwrap())),
    );
    let body = r#"{"seq":1,"version":"t","uptime_s":1,"config_hash":"","config_drift":false,"doctor":{"pass":0,"warn":0,"fail":0,"skip":0,"failing":[]},"update":{"state":"idle","version":"t"},"capabilities":[]}"#;
    client.post("/v1/agents/heartbeat", "application/json", body.as_bytes())
}

#[test]
fn renews_before_expiry_without_missing_a_heartbeat() {
    let server = short_lived("30s", "30d");
    let agent = AgentDir::new();
    let id = agent.enroll(&server, "renewer");
    let first = server.agent(&id);
    // Keep the original pair to try it after it is superseded.
    fs::copy(agent.file("agent.pem"), agent.dir.join("old.pem")).unwrap();
    fs::copy(agent.file("agent.key"), agent.dir.join("old.key")).unwrap();

    let mut proc = agent.run();
    let renewed = poll(Duration::from_secs(45), || {
        Some(server.agent(&id)).filter(|a| a.cert_serial != first.cert_serial)
    })
    .unwrap_or_else(|| panic!("no renewal within 45s; agent log:\n{}", proc.log_text()));
    assert!(renewed.cert_not_after > first.cert_not_after);
    // Heartbeats go on over the new certificate.
    server.wait_for_agent(&id, "heartbeating after renewal", |a| {
        a.heartbeat_seq > renewed.heartbeat_seq + 1
    });
    let log = proc.log_text();
    assert!(log.contains("certificate renewed"), "{log}");
    assert!(
        !log.contains("heartbeat failed"),
        "a heartbeat was missed:\n{log}"
    );
    assert!(proc.try_exit_code().is_none());
    proc.kill();

    // The new certificate: a new key, chained to the CA, the serial the server has.
    assert_pair_matches(&agent);
    assert_ne!(
        public_key(&agent.file("agent.pem"), true),
        public_key(&agent.dir.join("old.pem"), true)
    );
    let pem = agent.file("agent.pem");
    let verify = tool(
        "openssl",
        &[
            "verify",
            "-CAfile",
            server.ca_pem().to_str().unwrap(),
            pem.to_str().unwrap(),
        ],
    );
    assert!(verify.status.success(), "{:?}", text(&verify));
    let serial = tool(
        "openssl",
        &["x509", "-in", pem.to_str().unwrap(), "-noout", "-serial"],
    );
    let serial = text(&serial)
        .0
        .trim()
        .trim_start_matches("serial=")
        .to_ascii_lowercase();
    assert_eq!(serial, server.agent(&id).cert_serial);
    assert!(!agent.file("agent.key.new").exists() && !agent.file("agent.pem.new").exists());

    // The superseded certificate is refused now that the new one is in use.
    let (status, body) = heartbeat_with(
        &server,
        &agent.dir.join("old.pem"),
        &agent.dir.join("old.key"),
    );
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("superseded"), "{body}");
    let (status, _) = heartbeat_with(&server, &agent.file("agent.pem"), &agent.file("agent.key"));
    assert_eq!(status, 200);
}

#[test]
fn renewal_failures_are_retried_and_keep_the_working_pair() {
    let opts = ServerOptions {
        cert_lifetime: "30s",
        ..ServerOptions::default()
    };
    let mut server = Server::start_with(opts.clone());
    let agent = AgentDir::new();
    let id = agent.enroll(&server, "patient");
    let first = server.agent(&id);
    let mut proc = agent.run();
    server.wait_for_agent(&id, "heartbeating", |a| a.heartbeat_seq >= 1);
    server.kill();
    // The renewal falls due while the server is down: it fails and is retried.
    poll(Duration::from_secs(45), || {
        (proc
            .log_text()
            .matches("certificate renewal failed")
            .count()
            >= 2)
            .then_some(())
    })
    .unwrap_or_else(|| panic!("no retried renewal failures:\n{}", proc.log_text()));
    assert_pair_matches(&agent);
    assert!(proc.try_exit_code().is_none());
    server.serve_same_port(&opts);
    server.wait_for_agent(&id, "renewed after the outage", |a| {
        a.cert_serial != first.cert_serial && a.status == "active"
    });
    proc.kill();
    assert_pair_matches(&agent);
}

#[test]
fn an_admin_can_ask_for_a_renewal_now() {
    let server = Server::start();
    let agent = AgentDir::new();
    let id = agent.enroll(&server, "asked");
    let before = server.agent(&id).cert_serial;
    let _proc = agent.run();
    server.wait_for_agent(&id, "heartbeating", |a| a.heartbeat_seq >= 1);
    let out = server.admin_ok(&["agents", "renew", &id]);
    assert!(out.contains("renewal requested"), "{out}");
    let after = server.wait_for_agent(&id, "renewed", |a| a.cert_serial != before);
    // Once renewed, the request is cleared: the serial stays put.
    server.wait_for_agent(&id, "heartbeating", |a| {
        a.heartbeat_seq >= after.heartbeat_seq + 3
    });
    assert_eq!(server.agent(&id).cert_serial, after.cert_serial);
}

#[test]
fn a_revoked_agent_cannot_renew() {
    let server = Server::start();
    let agent = AgentDir::new();
    let id = agent.enroll(&server, "gone");
    server.admin_ok(&["agents", "revoke", &id]);
    let csr = tool(
        "openssl",
        &[
            "req",
            "-new",
            "-key",
            agent.file("agent.key").to_str().unwrap(),
            "-subj",
            "/CN=gone",
        ],
    );
    assert!(csr.status.success(), "{:?}", text(&csr));
    let body = format!("{{\"csr\":\"{}\"}}", text(&csr).0.replace('\n', "\\n"));
    let client = stella_tests::Client::new(
        &server.url,
        &fs::read(server.ca_pem()).unwrap(),
        Some((
            &fs::read(agent.file("agent.pem")).unwrap(),
            &fs::read(agent.file("agent.key")).unwrap(),
        )),
    );
    let (status, answer) = client.post(
        "/v1/agents/certificate",
        "application/json",
        body.as_bytes(),
    );
    assert_eq!(status, 401, "{answer}");
    assert!(answer.contains("revoked"), "{answer}");
}

#[test]
fn an_agent_offline_past_expiry_recovers_within_the_grace() {
    let server = short_lived("10s", "1h");
    let agent = AgentDir::new();
    let id = agent.enroll(&server, "sleeper");
    let first = server.agent(&id);
    wait_until(not_after(&server, &id) + 1);
    let mut proc = agent.run();
    let back = server.wait_for_agent(&id, "recovered and heartbeating", |a| {
        a.cert_serial != first.cert_serial && a.heartbeat_seq >= 2
    });
    assert_eq!(back.status, "active");
    assert!(
        proc.log_text().contains("recovering with the old key"),
        "{}",
        proc.log_text()
    );
    proc.kill();
    assert_pair_matches(&agent);
}

#[test]
fn past_the_grace_the_agent_must_enroll_again() {
    let server = short_lived("10s", "1s");
    let agent = AgentDir::new();
    let id = agent.enroll(&server, "too-late");
    let first = server.agent(&id);
    wait_until(not_after(&server, &id) + 2);
    let mut proc = agent.run();
    assert_eq!(proc.wait_exit(DEADLINE), Some(3), "{}", proc.log_text());
    let log = proc.log_text();
    assert!(
        log.contains("expired at") && log.contains("enroll the host again"),
        "{log}"
    );
    assert_eq!(server.agent(&id).cert_serial, first.cert_serial);
}

#[test]
fn a_deactivated_agent_cannot_recover_after_expiry() {
    let server = short_lived("10s", "1h");
    let agent = AgentDir::new();
    let id = agent.enroll(&server, "benched");
    server.admin_ok(&["agents", "deactivate", &id]);
    wait_until(not_after(&server, &id) + 1);
    let mut proc = agent.run();
    assert_eq!(proc.wait_exit(DEADLINE), Some(3), "{}", proc.log_text());
    assert!(
        proc.log_text().contains("deactivated"),
        "{}",
        proc.log_text()
    );
}

#[test]
fn a_crash_at_any_step_of_the_renewal_leaves_a_working_pair() {
    let server = Server::start();
    for point in [
        "renew-after-next-key",
        "renew-after-answer",
        "renew-after-next-cert",
        "renew-after-key-swap",
    ] {
        let agent = AgentDir::new();
        let id = agent.enroll(&server, point);
        let mut cmd = agent.command(&["run"]);
        cmd.env("STELLA_FAULT", point);
        let mut crashing = stella_tests::Proc::spawn(cmd, agent.dir.join("crash.log"));
        server.wait_for_agent(&id, "heartbeating", |a| a.heartbeat_seq >= 1);
        server.admin_ok(&["agents", "renew", &id]);
        assert_eq!(
            crashing.wait_exit(DEADLINE),
            Some(86),
            "{point}: {}",
            crashing.log_text()
        );

        // Restarted, the agent works with whatever the crash left.
        let seq = server.agent(&id).heartbeat_seq;
        let mut proc = agent.run();
        server.wait_for_agent(&id, "heartbeating after the crash", |a| {
            a.heartbeat_seq >= seq + 2
        });
        assert!(
            proc.try_exit_code().is_none(),
            "{point}: {}",
            proc.log_text()
        );
        proc.kill();
        assert_pair_matches(&agent);
        assert!(!agent.file("agent.pem.new").exists(), "{point}");
        // The pair on disk is the one the server accepts.
        let (status, body) =
            heartbeat_with(&server, &agent.file("agent.pem"), &agent.file("agent.key"));
        assert_eq!(status, 200, "{point}: {body}");
    }
}
