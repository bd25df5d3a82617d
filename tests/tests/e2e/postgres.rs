//! The server on PostgreSQL (`--store postgres://…`, docs/operations.md):
//! a real PostgreSQL cluster from the test harness, the real binaries. The
//! fleet works as on redb (enrollment, heartbeats, revoke, configuration,
//! a restart keeps everything), start-up failures are one line and exit 1,
//! and an outage gives 503 with a JSON error until PostgreSQL is back.

use std::fs;
use std::process::Command;

use stella_tests::postgres::Postgres;
use stella_tests::{
    AgentDir, DEADLINE, Server, ServerOptions, TempDir, bin, json, json_str, poll, run, text,
};

/// `config set` through the admin command; the new hash.
fn set_config(server: &Server, doc: &str) -> String {
    let dir = TempDir::new("pg-config");
    let file = dir.join("config.json");
    fs::write(&file, doc).unwrap();
    let out = server.admin(&["config", "set", "--scope", "global", file.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "config set: {stdout}{stderr}");
    stdout.split_whitespace().last().unwrap().to_owned()
}

#[test]
fn a_server_on_postgresql_runs_the_fleet_across_restarts_and_an_outage() {
    let test = "a_server_on_postgresql_runs_the_fleet_across_restarts_and_an_outage";
    let Some(mut pg) = Postgres::start(test) else {
        return;
    };
    let url = pg.database("fleet");
    let mut server = Server::start_on(Some(&url), ServerOptions::default());
    assert!(
        !server.data.join("server.redb").exists(),
        "the store is in PostgreSQL, not the data dir"
    );

    let first = AgentDir::new();
    let first_id = first.enroll(&server, "pg-first");
    let second = AgentDir::new();
    let second_id = second.enroll(&server, "pg-second");
    let mut first_proc = first.run();
    let mut second_proc = second.run();
    for id in [&first_id, &second_id] {
        server.wait_for_agent(id, "active and heartbeating", |a| {
            a.status == "active" && a.heartbeat_seq >= 1
        });
    }
    // Heartbeat soft state lands in PostgreSQL (group-committed).
    let saved = poll(DEADLINE, || {
        (pg.sql("fleet", "SELECT count(*) FROM heartbeats") == "2").then_some(())
    });
    assert!(saved.is_some(), "heartbeats never reached PostgreSQL");

    // Configuration reaches the agent.
    let hash = set_config(&server, r#"{"log_level":"debug"}"#);
    server.wait_for_agent(&first_id, "running the new config", |a| {
        a.config_hash.as_deref() == Some(hash.as_str())
    });

    // Revoke: the agent hears 401 and exits 3.
    server.admin_ok(&["agents", "revoke", &second_id]);
    assert_eq!(
        second_proc.wait_exit(DEADLINE),
        Some(3),
        "revoked agent exits 3; log:\n{}",
        second_proc.log_text()
    );

    // A restart keeps everything.
    server.kill();
    server.serve_same_port(&ServerOptions::default());
    assert_eq!(server.agents().len(), 2);
    assert_eq!(server.agent(&second_id).status, "revoked");
    let shown = server.admin_ok(&["config", "show", "--agent", &first_id]);
    assert!(shown.contains(&format!("hash {hash}")), "{shown}");
    let seq = server.agent(&first_id).heartbeat_seq;
    server.wait_for_agent(&first_id, "heartbeating to the restarted server", |a| {
        a.status == "active" && a.heartbeat_seq > seq
    });

    // PostgreSQL stops for a few seconds: writes answer 503 with a JSON
    // error (no crash, no hang), /healthz says why, and everything comes
    // back by itself.
    // (`agents show` reads the agent's last update failure from the store,
    // so the heartbeat count is taken before the outage.)
    let seq = server.agent(&first_id).heartbeat_seq;
    pg.stop();
    let client = server.client();
    let (status, body) = client.post_auth(
        "/v1/admin/tokens",
        &server.admin_token,
        r#"{"ttl_ms":600000,"uses":1,"labels":{}}"#,
    );
    assert_eq!(status, 503, "{body}");
    let error = json(&body);
    assert!(
        json_str(&error, "error").is_some_and(|e| e.contains("cannot be written now")),
        "{body}"
    );
    let unhealthy = poll(DEADLINE, || (client.get("/healthz").0 == 503).then_some(()));
    assert!(
        unhealthy.is_some(),
        "/healthz stayed ok with PostgreSQL down"
    );
    assert!(
        server.proc.try_exit_code().is_none(),
        "the server exited:\n{}",
        server.proc.log_text()
    );
    pg.start_again();
    let healthy = poll(DEADLINE, || (client.get("/healthz").0 == 200).then_some(()));
    assert!(
        healthy.is_some(),
        "the server did not recover; log:\n{}",
        server.proc.log_text()
    );
    server.wait_for_agent(&first_id, "active after the outage", |a| {
        a.status == "active" && a.heartbeat_seq > seq
    });
    let token = server.token(&["--ttl", "10m"]);
    assert!(!token.is_empty());
    assert!(
        first_proc.try_exit_code().is_none(),
        "the agent kept running"
    );
    first_proc.kill();
}

#[test]
fn a_bad_store_url_refused_connection_or_password_is_one_line_and_exit_1() {
    let test = "a_bad_store_url_refused_connection_or_password_is_one_line_and_exit_1";
    let Some(pg) = Postgres::start(test) else {
        return;
    };
    let url = pg.database("refusals");
    let refused = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        format!("postgres://stella:secret@127.0.0.1:{port}/x")
    };
    let bad_password = url.replace(stella_tests::postgres::PASSWORD, "wrong-secret");
    let cases = [
        (
            "postgres://stella@127.0.0.1:notaport/x",
            "bad PostgreSQL URL",
        ),
        (refused.as_str(), "cannot connect"),
        (bad_password.as_str(), "password authentication failed"),
    ];
    for (store, expect) in cases {
        for command in ["init", "serve"] {
            let dir = TempDir::new("pg-refused");
            let out = run(Command::new(bin("stella-server"))
                .args([command, "--data-dir"])
                .arg(dir.join("data"))
                .args(["--store", store]));
            let (stdout, stderr) = text(&out);
            assert_eq!(
                out.status.code(),
                Some(1),
                "{command} {store}: {stdout}{stderr}"
            );
            assert_eq!(stderr.lines().count(), 1, "{command} {store}: {stderr}");
            assert!(stderr.contains(expect), "{command} {store}: {stderr}");
            assert!(!stderr.contains("secret"), "the password leaked: {stderr}");
            assert!(
                !dir.join("data").join("ca.pem").exists(),
                "{command} {store} wrote the data dir"
            );
        }
    }
    // `serve` on a database `init` did not prepare: one line, exit 1.
    let dir = TempDir::new("pg-uninit");
    let out = run(Command::new(bin("stella-server"))
        .args(["serve", "--data-dir"])
        .arg(dir.join("data"))
        .env("STELLA_STORE", &url));
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("stella-server init"), "{stderr}");
    // `init` twice on one database is refused.
    let server = Server::start_on(Some(&url), ServerOptions::default());
    let again = TempDir::new("pg-init-again");
    let out = run(Command::new(bin("stella-server"))
        .args(["init", "--data-dir"])
        .arg(again.join("data"))
        .args(["--store", &url]));
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("already holds a Stella store"), "{stderr}");
    drop(server);
}

#[test]
fn migrate_moves_a_single_node_store_to_postgresql_without_re_enrolling() {
    let test = "migrate_moves_a_single_node_store_to_postgresql_without_re_enrolling";
    let Some(pg) = Postgres::start(test) else {
        return;
    };
    let mut server = Server::start();
    let agent = AgentDir::new();
    let id = agent.enroll(&server, "moving");
    let mut proc = agent.run();
    server.wait_for_agent(&id, "heartbeating on redb", |a| a.heartbeat_seq >= 1);
    let url = pg.database("moved");

    // The server must be stopped: the redb file is opened exclusively.
    let busy = run(Command::new(bin("stella-server"))
        .args(["migrate", "--from"])
        .arg(&server.data)
        .args(["--to", &url]));
    assert_eq!(busy.status.code(), Some(1), "{:?}", text(&busy));
    server.kill();
    let out = run(Command::new(bin("stella-server"))
        .args(["migrate", "--from"])
        .arg(&server.data)
        .args(["--to", &url]));
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "migrate: {stdout}{stderr}");
    assert!(stdout.contains("agents=1"), "{stdout}");
    // Once only: the target holds a store now.
    let again = run(Command::new(bin("stella-server"))
        .args(["migrate", "--from"])
        .arg(&server.data)
        .args(["--to", &url]));
    let (_, stderr) = text(&again);
    assert_eq!(again.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("exists already"), "{stderr}");

    // The same data dir (CA), the store in PostgreSQL: the agent carries on
    // with its id and certificate.
    server.store = Some(url);
    server.serve_same_port(&ServerOptions::default());
    let copied = server.agent(&id);
    server.wait_for_agent(&id, "heartbeating on PostgreSQL", |a| {
        a.status == "active" && a.heartbeat_seq > copied.heartbeat_seq
    });
    assert_eq!(server.agents().len(), 1);
    assert!(proc.try_exit_code().is_none(), "{}", proc.log_text());
    proc.kill();
}
