//! Enrollment with one-time tokens (docs/design.md section 3): the issued
//! certificate, CA pinning, every token refusal, and the lost-answer retry.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use stella_tests::{AgentDir, Server, poll, text, tool};

fn mode(path: &std::path::Path) -> u32 {
    fs::metadata(path).expect("metadata").permissions().mode() & 0o777
}

#[test]
fn enrollment_issues_a_certificate_that_chains_to_the_ca() {
    let server = Server::start();
    let token = server.token(&["--ttl", "10m", "--label", "site=lab"]);
    let agent = AgentDir::new();
    let out = agent.bootstrap(&server, &token, &["--name", "box1", "--label", "env=dev"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    let id = stdout.trim();

    // Files and modes, on both sides.
    assert_eq!(mode(&server.data), 0o700);
    for secret in ["ca.key", "server.key", "admin.token", "server.redb"] {
        assert_eq!(mode(&server.data.join(secret)), 0o600, "{secret}");
    }
    assert_eq!(mode(&agent.state), 0o700);
    assert_eq!(mode(&agent.file("agent.key")), 0o600);
    let agent_json = fs::read_to_string(agent.file("agent.json")).unwrap();
    let parsed = stella_tests::json(&agent_json);
    assert_eq!(
        stella_tests::json_str(&parsed, "id"),
        Some(id),
        "{agent_json}"
    );
    assert_eq!(
        stella_tests::json_str(&parsed, "ca_hash"),
        Some(server.pin.as_str()),
        "{agent_json}"
    );

    // openssl agrees: chains to the CA, CN = id, URI SAN, client auth.
    let cert = agent.file("agent.pem");
    let cert = cert.to_str().unwrap();
    let verify = tool(
        "openssl",
        &["verify", "-CAfile", server.ca_pem().to_str().unwrap(), cert],
    );
    assert!(
        verify.status.success(),
        "openssl verify: {:?}",
        text(&verify)
    );
    let shown = tool(
        "openssl",
        &[
            "x509",
            "-in",
            cert,
            "-noout",
            "-subject",
            "-ext",
            "subjectAltName,extendedKeyUsage",
        ],
    );
    let (shown, _) = text(&shown);
    assert!(
        shown.contains(&format!("CN = {id}")) || shown.contains(&format!("CN={id}")),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("URI:stella://agent/{id}")),
        "{shown}"
    );
    assert!(shown.contains("TLS Web Client Authentication"), "{shown}");

    // The key on disk matches the certificate.
    let cert_pub = tool("openssl", &["x509", "-in", cert, "-noout", "-pubkey"]);
    let key_pub = tool(
        "openssl",
        &[
            "pkey",
            "-in",
            agent.file("agent.key").to_str().unwrap(),
            "-pubout",
        ],
    );
    assert_eq!(text(&cert_pub).0, text(&key_pub).0);

    // The server has the agent with the token's and its own labels.
    let view = server.agent(id);
    assert_eq!(view.name, "box1");
    assert_eq!(view.status, "active");
    assert_eq!(view.labels.get("site").map(String::as_str), Some("lab"));
    assert_eq!(view.labels.get("env").map(String::as_str), Some("dev"));
    assert_eq!(view.platform.os, "linux");
    assert!(!view.target.is_empty());
}

#[test]
fn ca_hash_matches_the_kubeadm_openssl_recipe() {
    let server = Server::start();
    let ca = server.ca_pem();
    let script = format!(
        "openssl x509 -in {} -pubkey -noout | openssl pkey -pubin -outform der | sha256sum",
        ca.display()
    );
    let out = tool("sh", &["-c", &script]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let hex = stdout.split_whitespace().next().unwrap();
    assert_eq!(format!("sha256:{hex}"), server.pin);
}

#[test]
fn wrong_ca_pin_aborts_before_the_token_is_sent() {
    let server = Server::start();
    let token = server.token(&["--ttl", "10m"]);
    let agent = AgentDir::new();
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let out = stella_tests::run(&mut agent.command(&[
        "bootstrap",
        "--server",
        &server.url,
        "--token",
        &token,
        "--ca-hash",
        &wrong,
    ]));
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("does not present a CA matching --ca-hash"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(!agent.file("agent.json").exists());
    assert!(server.agents().is_empty());
    // The token was never sent, so it still works.
    let out = agent.bootstrap(&server, &token, &[]);
    assert!(out.status.success(), "{:?}", text(&out));
}

#[test]
fn ca_file_is_an_alternative_to_the_hash() {
    let server = Server::start();
    let token = server.token(&[]);
    let agent = AgentDir::new();
    let out = stella_tests::run(&mut agent.command(&[
        "bootstrap",
        "--server",
        &server.url,
        "--token",
        &token,
        "--ca-file",
        server.ca_pem().to_str().unwrap(),
        "--name",
        "filebox",
    ]));
    assert!(out.status.success(), "{:?}", text(&out));
    // A CA file from another server is refused by TLS, before the token counts.
    let other = Server::start();
    let token2 = server.token(&[]);
    let agent2 = AgentDir::new();
    let out = stella_tests::run(&mut agent2.command(&[
        "bootstrap",
        "--server",
        &server.url,
        "--token",
        &token2,
        "--ca-file",
        other.ca_pem().to_str().unwrap(),
    ]));
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    assert_eq!(server.agents().len(), 1);
}

#[test]
fn a_one_time_token_cannot_be_used_twice() {
    let server = Server::start();
    let token = server.token(&["--ttl", "10m"]);
    let first = AgentDir::new();
    assert!(
        first
            .bootstrap(&server, &token, &["--name", "a"])
            .status
            .success()
    );
    let second = AgentDir::new();
    let out = second.bootstrap(&server, &token, &["--name", "b"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("has no uses left"), "{stderr}");
    assert!(stderr.contains("401"), "{stderr}");
    assert!(!second.file("agent.json").exists());
    let agents = server.agents();
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].name, "a");
}

#[test]
fn a_token_with_three_uses_enrolls_three_agents_and_no_more() {
    let server = Server::start();
    let token = server.token(&["--uses", "3"]);
    for i in 0..3 {
        let agent = AgentDir::new();
        let out = agent.bootstrap(&server, &token, &["--name", &format!("n{i}")]);
        assert!(out.status.success(), "{:?}", text(&out));
    }
    let out = AgentDir::new().bootstrap(&server, &token, &[]);
    assert!(text(&out).1.contains("has no uses left"));
    assert_eq!(server.agents().len(), 3);
}

#[test]
fn an_expired_token_is_refused() {
    let server = Server::start();
    let token = server.token(&["--ttl", "1s"]);
    // Wait on the clock for the expiry instant to pass (the token's state).
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    poll(Duration::from_secs(5), || {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        (now >= created + 2).then_some(())
    })
    .unwrap();
    let agent = AgentDir::new();
    let out = agent.bootstrap(&server, &token, &[]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("has expired (at 20"), "{stderr}");
    assert!(server.agents().is_empty());
}

#[test]
fn unknown_tokens_and_wrong_secrets_are_refused() {
    let server = Server::start();
    let token = server.token(&[]);
    let (id, _) = token.split_once('.').unwrap();
    let agent = AgentDir::new();
    let out = agent.bootstrap(&server, "zzzzzz.0123456789abcdefghijklmnopqrstuv", &[]);
    assert!(
        text(&out).1.contains("token zzzzzz is not known"),
        "{:?}",
        text(&out)
    );
    let forged = format!("{id}.{}", "a".repeat(32));
    let out = agent.bootstrap(&server, &forged, &[]);
    assert!(
        text(&out).1.contains("secret does not match"),
        "{:?}",
        text(&out)
    );
    // The real token still has its one use.
    assert!(agent.bootstrap(&server, &token, &[]).status.success());
    // A malformed token is a usage error (exit 2), caught before any network.
    let out = AgentDir::new().bootstrap(&server, "not-a-token", &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("malformed token"));
}

#[test]
fn a_lost_answer_is_recovered_by_retrying_with_the_same_key() {
    let server = Server::start();
    let token = server.token(&["--ttl", "10m"]);
    let agent = AgentDir::new();
    // The server enrolls us and answers, but the agent dies before keeping it.
    let out = stella_tests::run(
        agent
            .command(&[
                "bootstrap",
                "--server",
                &server.url,
                "--token",
                &token,
                "--ca-hash",
                &server.pin,
                "--name",
                "lost",
            ])
            .env("STELLA_FAULT", "bootstrap-after-register"),
    );
    assert_eq!(
        out.status.code(),
        Some(86),
        "fault point not reached: {:?}",
        text(&out)
    );
    assert!(!agent.file("agent.json").exists());
    let enrolled = server.agents();
    assert_eq!(enrolled.len(), 1);

    // Retrying with the same token (now used up) and the same key gets the same agent.
    let out = agent.bootstrap(&server, &token, &["--name", "lost"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert_eq!(stdout.trim(), enrolled[0].id);
    let after = server.agents();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].cert_serial, enrolled[0].cert_serial);

    // Another key cannot ride on the used token.
    let other = AgentDir::new();
    let out = other.bootstrap(&server, &token, &[]);
    assert!(
        text(&out).1.contains("has no uses left"),
        "{:?}",
        text(&out)
    );
}

#[test]
fn bootstrap_refuses_an_already_enrolled_state_dir() {
    let server = Server::start();
    let agent = AgentDir::new();
    let id = agent.enroll(&server, "once");
    let token = server.token(&[]);
    let out = agent.bootstrap(&server, &token, &[]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains(&format!("already enrolled as {id}")),
        "{stderr}"
    );
    // The token was not consumed.
    assert!(
        AgentDir::new()
            .bootstrap(&server, &token, &[])
            .status
            .success()
    );
}
