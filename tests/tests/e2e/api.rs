//! The HTTP API directly: bad input is refused with a 4xx JSON error and
//! changes nothing; admin calls need the admin token; health and metrics;
//! curl with the agent's certificate.

use stella_tests::{AgentDir, Client, Server, text, tool};

fn is_json_error(body: &str) -> bool {
    body.starts_with("{\"error\":\"") && body.ends_with("\"}")
}

#[test]
fn bad_registrations_get_a_json_4xx_and_change_nothing() {
    let server = Server::start();
    let token = server.token(&[]);
    let client = server.client();
    let good_shape = |csr: &str| {
        format!(
            r#"{{"token":"{token}","csr":"{csr}","name":"x","platform":{{"os":"linux","arch":"x86_64","target":"t"}},"version":"1","capabilities":[]}}"#
        )
    };
    let cases: Vec<(&str, String, u16)> = vec![
        (
            "malformed CSR",
            good_shape(
                "-----BEGIN CERTIFICATE REQUEST-----\\nAAAA\\n-----END CERTIFICATE REQUEST-----",
            ),
            400,
        ),
        ("no CSR at all", good_shape("hello"), 400),
        ("not JSON", "{not json".to_owned(), 400),
        ("missing fields", format!(r#"{{"token":"{token}"}}"#), 400),
        (
            "oversized body",
            format!(r#"{{"pad":"{}"}}"#, "a".repeat(70 * 1024)),
            413,
        ),
    ];
    for (what, body, want) in cases {
        let (status, answer) =
            client.post("/v1/agents/register", "application/json", body.as_bytes());
        assert_eq!(status, want, "{what}: {answer}");
        assert!(is_json_error(&answer), "{what}: {answer}");
    }
    let (status, answer) = client.post(
        "/v1/agents/register",
        "text/plain",
        good_shape("x").as_bytes(),
    );
    assert_eq!(status, 415, "{answer}");
    assert!(server.agents().is_empty());
    // None of that used the token up.
    assert!(
        AgentDir::new()
            .bootstrap(&server, &token, &[])
            .status
            .success()
    );
}

#[test]
fn admin_endpoints_need_the_admin_token() {
    let server = Server::start();
    let client = server.client();
    let (status, body) = client.get("/v1/admin/agents");
    assert_eq!(status, 401);
    assert!(is_json_error(&body), "{body}");
    let (status, _) = client.get_auth("/v1/admin/agents", "wrong");
    assert_eq!(status, 401);
    let (status, body) = client.get_auth("/v1/admin/agents", &server.admin_token);
    assert_eq!((status, body.as_str()), (200, "[]"));

    // The CLI also works from anywhere with --server, --ca and STELLA_ADMIN_TOKEN.
    let elsewhere = stella_tests::TempDir::new("nowhere");
    let mut cmd = std::process::Command::new(stella_tests::bin("stella-server"));
    cmd.args([
        "token",
        "create",
        "--server",
        &server.url,
        "--ca",
        server.ca_pem().to_str().unwrap(),
    ])
    .arg("--data-dir")
    .arg(elsewhere.path())
    .env("STELLA_ADMIN_TOKEN", &server.admin_token);
    let out = stella_tests::run(&mut cmd);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(stella_proto::RegistrationToken::parse(text(&out).0.trim()).is_ok());
    cmd.env("STELLA_ADMIN_TOKEN", "not-it");
    let out = stella_tests::run(&mut cmd);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).1.contains("401"), "{:?}", text(&out));
}

#[test]
fn health_metrics_and_unknown_paths() {
    let server = Server::start();
    let agent = AgentDir::new();
    agent.enroll(&server, "m");
    let _ = AgentDir::new().bootstrap(&server, "zzzzzz.0123456789abcdefghijklmnopqrstuv", &[]);
    let client = server.client();
    assert_eq!(client.get("/healthz"), (200, "ok\n".to_owned()));
    let (status, metrics) = client.get("/metrics");
    assert_eq!(status, 200);
    let enrolled: u64 = ["active", "inactive", "revoked"]
        .iter()
        .map(|s| {
            let prefix = format!("stella_agents{{status=\"{s}\"}} ");
            let line = metrics
                .lines()
                .find_map(|l| l.strip_prefix(prefix.as_str()));
            line.unwrap_or_else(|| panic!("no {prefix} in {metrics}"))
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(enrolled, 1, "{metrics}");
    assert!(metrics.contains("stella_enrollments_total 1"), "{metrics}");
    assert!(
        metrics.contains("stella_token_failures_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("stella_heartbeats_total"), "{metrics}");
    let (status, body) = client.get("/nope");
    assert_eq!(status, 404);
    assert!(is_json_error(&body));
}

#[test]
fn the_agent_certificate_works_with_curl_and_only_over_mtls() {
    let server = Server::start();
    let agent = AgentDir::new();
    let id = agent.enroll(&server, "curl");
    let body = r#"{"seq":1,"version":"curl","uptime_s":1,"config_hash":"","config_drift":false,"doctor":{"pass":0,"warn":0,"fail":0,"skip":0,"failing":[]},"update":{"state":"idle","version":"curl"},"capabilities":[]}"#;
    let url = format!("{}/v1/agents/heartbeat", server.url);
    let out = tool(
        "curl",
        &[
            "-sS",
            "--fail-with-body",
            "--cacert",
            server.ca_pem().to_str().unwrap(),
            "--cert",
            agent.file("agent.pem").to_str().unwrap(),
            "--key",
            agent.file("agent.key").to_str().unwrap(),
            "-H",
            "content-type: application/json",
            "-d",
            body,
            &url,
        ],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("\"interval_ms\":1000"), "{stdout}");
    assert_eq!(server.agent(&id).version, "curl");

    // Without a client certificate the heartbeat endpoint refuses.
    let anonymous = Client::new(&server.url, &std::fs::read(server.ca_pem()).unwrap(), None);
    let (status, answer) =
        anonymous.post("/v1/agents/heartbeat", "application/json", body.as_bytes());
    assert_eq!(status, 401, "{answer}");
    assert!(answer.contains("client certificate"), "{answer}");
}

#[test]
fn the_agent_list_comes_in_pages_and_the_cli_follows_them() {
    let server = Server::start();
    for i in 0..5 {
        AgentDir::new().enroll(&server, &format!("page{i}"));
    }
    let client = server.client();
    let page = |q: &str| -> Vec<stella_tests::AgentView> {
        let (status, body) = client.get_auth(&format!("/v1/admin/agents{q}"), &server.admin_token);
        assert_eq!(status, 200, "{body}");
        miniserde::json::from_str(&body).unwrap()
    };
    let first = page("?limit=2");
    assert_eq!(first.len(), 2);
    assert!(first[0].id < first[1].id, "pages are in id order");
    let second = page(&format!("?limit=2&after={}", first[1].id));
    let third = page(&format!("?limit=2&after={}", second[1].id));
    assert_eq!((second.len(), third.len()), (2, 1));
    assert!(first[1].id < second[0].id && second[1].id < third[0].id);
    let (status, body) = client.get_auth("/v1/admin/agents?limit=0", &server.admin_token);
    assert_eq!(status, 400, "{body}");
    assert_eq!(server.agents().len(), 5);
}

/// Runs `cmd` with its stdout a pipe whose reading end is already closed,
/// as `cmd | head -0` would; returns the exit code and stderr.
fn into_a_closed_pipe(mut cmd: std::process::Command) -> (Option<i32>, String) {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let out = cmd
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run the command");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_closed_stdout_ends_commands_quietly_with_exit_0() {
    let server = Server::start();
    let agent = AgentDir::new();
    agent.enroll(&server, "piped");
    for args in [
        &["agents", "list"][..],
        &["agents", "list", "--json"],
        &["release", "list"],
        &["rollout", "list"],
    ] {
        let mut cmd = std::process::Command::new(stella_tests::bin("stella-server"));
        cmd.args(args).arg("--data-dir").arg(&server.data);
        let (code, stderr) = into_a_closed_pipe(cmd);
        assert_eq!(
            (code, stderr.as_str()),
            (Some(0), ""),
            "stella-server {args:?}"
        );
    }
    for args in [&["status"][..], &["status", "--json"], &["version"]] {
        let (code, stderr) = into_a_closed_pipe(agent.command(args));
        assert_eq!(
            (code, stderr.as_str()),
            (Some(0), ""),
            "stella-agent {args:?}"
        );
    }
}
