//! Configuration (docs/design.md section 7): scoped desired config pushed on the
//! heartbeat, applied without restart, drift detected and restored, invalid
//! documents refused with the last good one kept.

use std::fs;
use std::time::Instant;

use miniserde::json::Value;
use stella_tests::{AgentDir, DEADLINE, Server, TempDir, poll, text};

fn set(server: &Server, scope: &str, doc: &str) -> String {
    let dir = TempDir::new("config");
    let file = dir.join("config.json");
    fs::write(&file, doc).unwrap();
    let out = server.admin(&["config", "set", "--scope", scope, file.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "config set {scope}: {stdout}{stderr}");
    // "<scope> version N hash H"
    stdout.split_whitespace().last().unwrap().to_owned()
}

fn canonical(doc: &str) -> String {
    stella_proto::config::canonical(&stella_proto::config::parse(doc).unwrap())
}

#[test]
fn a_pushed_config_is_applied_and_changes_the_cadence() {
    let server = Server::start();
    let agent = AgentDir::new();
    let id = agent.enroll(&server, "cfg");
    let mut proc = agent.run();
    server.wait_for_agent(&id, "heartbeating", |a| a.heartbeat_seq >= 1);

    let doc = r#"{"heartbeat_interval":"3s","log_level":"debug"}"#;
    let hash = set(&server, "global", doc);
    let applied = server.wait_for_agent(&id, "running the new config", |a| {
        a.config_hash.as_deref() == Some(&hash)
    });
    // On disk, canonical; recorded for restarts.
    assert_eq!(
        fs::read_to_string(agent.file("config.json")).unwrap(),
        canonical(doc)
    );
    let status = text(&stella_tests::run(
        &mut agent.command(&["status", "--json"]),
    ))
    .0;
    assert_eq!(
        stella_tests::json_str(&stella_tests::json(&status), "config_hash"),
        Some(hash.as_str()),
        "{status}"
    );

    // The cadence follows: two more heartbeats take at least two 3 s intervals (less jitter).
    let start = Instant::now();
    server.wait_for_agent(&id, "two more heartbeats", |a| {
        a.heartbeat_seq >= applied.heartbeat_seq + 3
    });
    assert!(
        start.elapsed().as_secs_f64() >= 5.0,
        "heartbeats still every second: {:?}",
        start.elapsed()
    );
    // The log level changed without a restart.
    poll(DEADLINE, || {
        proc.log_text().contains("level=debug").then_some(())
    })
    .unwrap_or_else(|| panic!("no debug lines after log_level=debug:\n{}", proc.log_text()));
    assert!(proc.try_exit_code().is_none());
}

#[test]
fn an_in_sync_heartbeat_carries_only_the_hash() {
    let server = Server::start();
    let agent = AgentDir::new();
    agent.enroll(&server, "quiet");
    let hash = set(&server, "global", r#"{"remediation":"dry-run"}"#);
    let client = stella_tests::Client::new(
        &server.url,
        &fs::read(server.ca_pem()).unwrap(),
        Some((
            &fs::read(agent.file("agent.pem")).unwrap(),
            &fs::read(agent.file("agent.key")).unwrap(),
        )),
    );
    let beat = |applied: &str| {
        format!(
            r#"{{"seq":1,"version":"t","uptime_s":1,"config_hash":"{applied}","config_drift":false,"doctor":{{"pass":0,"warn":0,"fail":0,"skip":0,"failing":[]}},"update":{{"state":"idle","version":"t"}},"capabilities":[]}}"#
        )
    };
    let (status, in_sync) = client.post(
        "/v1/agents/heartbeat",
        "application/json",
        beat(&hash).as_bytes(),
    );
    assert_eq!(status, 200);
    assert!(in_sync.contains("\"config\":null"), "{in_sync}");
    assert!(in_sync.contains(&hash));
    let (_, behind) = client.post(
        "/v1/agents/heartbeat",
        "application/json",
        beat("old").as_bytes(),
    );
    assert!(
        behind.contains(r#""config":{"remediation":"dry-run"}"#),
        "{behind}"
    );
}

#[test]
fn scopes_merge_global_then_label_then_agent() {
    let server = Server::start();
    let prod = AgentDir::new();
    let token = server.token(&["--label", "env=prod"]);
    let out = prod.bootstrap(&server, &token, &["--name", "prod"]);
    let prod_id = text(&out).0.trim().to_owned();
    let other = AgentDir::new();
    let other_id = other.enroll(&server, "other");
    set(
        &server,
        "global",
        r#"{"log_level":"info","doctor_interval":"10m","max_clock_skew":"5s"}"#,
    );
    set(
        &server,
        "label:env=prod",
        r#"{"log_level":"warn","max_clock_skew":"9s"}"#,
    );
    set(
        &server,
        &format!("agent:{prod_id}"),
        r#"{"log_level":"error"}"#,
    );
    let show = |id: &str| server.admin_ok(&["config", "show", "--agent", id]);
    let prod_view = show(&prod_id);
    assert!(
        prod_view
            .contains(r#"{"doctor_interval":"10m","log_level":"error","max_clock_skew":"9s"}"#),
        "{prod_view}"
    );
    assert!(
        prod_view.contains("label:env=prod") && prod_view.contains(&format!("agent:{prod_id}"))
    );
    let other_view = show(&other_id);
    assert!(
        other_view
            .contains(r#"{"doctor_interval":"10m","log_level":"info","max_clock_skew":"5s"}"#),
        "{other_view}"
    );
    // A bad scope is a clear error.
    let dir = TempDir::new("scope");
    fs::write(dir.join("c.json"), "{}").unwrap();
    let out = server.admin(&[
        "config",
        "set",
        "--scope",
        "planet:mars",
        dir.join("c.json").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out)
            .1
            .contains("must be global, label:KEY=VALUE or agent:AGENT_ID"),
        "{:?}",
        text(&out)
    );
}

#[test]
fn an_invalid_config_is_refused_and_the_last_good_one_kept() {
    let server = Server::start();
    let agent = AgentDir::new();
    let id = agent.enroll(&server, "picky");
    let _proc = agent.run();
    let good = set(&server, "global", r#"{"log_level":"warn"}"#);
    server.wait_for_agent(&id, "on the good config", |a| {
        a.config_hash.as_deref() == Some(&good)
    });

    let dir = TempDir::new("bad");
    fs::write(
        dir.join("bad.json"),
        r#"{"heartbeat_interval":5,"colour":"blue"}"#,
    )
    .unwrap();
    let out = server.admin(&[
        "config",
        "set",
        "--scope",
        &format!("agent:{id}"),
        dir.join("bad.json").to_str().unwrap(),
    ]);
    assert!(out.status.success());
    assert!(
        text(&out).1.contains("warning: agents will refuse"),
        "{:?}",
        text(&out)
    );

    let refused = server.wait_for_agent(&id, "reporting the refusal", |a| a.config_error.is_some());
    let error = refused.config_error.unwrap();
    assert!(
        error.contains("unknown key \"colour\"") && error.contains("heartbeat_interval"),
        "{error}"
    );
    assert_eq!(refused.config_hash.as_deref(), Some(good.as_str()));
    assert_eq!(
        fs::read_to_string(agent.file("config.json")).unwrap(),
        canonical(r#"{"log_level":"warn"}"#)
    );
    let drift = server.admin_ok(&["drift", "--json"]);
    assert!(
        drift.contains(&id) && drift.contains("unknown key"),
        "{drift}"
    );
    // Still heartbeating on the last good config.
    let seq = refused.heartbeat_seq;
    server.wait_for_agent(&id, "heartbeating", |a| a.heartbeat_seq > seq + 1);
}

#[test]
fn a_hand_edit_is_reported_and_with_auto_remediation_restored() {
    let server = Server::start();
    let agent = AgentDir::new();
    let id = agent.enroll(&server, "edited");
    let _proc = agent.run();
    let hash = set(&server, "global", r#"{"log_level":"info"}"#);
    server.wait_for_agent(&id, "on the config", |a| {
        a.config_hash.as_deref() == Some(&hash)
    });
    assert!(server.admin_ok(&["drift"]).contains("no drift"));

    fs::write(agent.file("config.json"), r#"{"log_level":"debug"}"#).unwrap();
    // The agent's row of `drift --json`, once it reports the local edit.
    let row = poll(DEADLINE, || {
        let out = server.admin_ok(&["drift", "--json"]);
        let Value::Array(rows) = stella_tests::json(&out) else {
            panic!("drift --json is not an array: {out}")
        };
        rows.into_iter().find(|row| {
            stella_tests::json_str(row, "agent") == Some(id.as_str())
                && matches!(
                    stella_tests::json_at(row, "local_drift"),
                    Some(Value::Bool(true))
                )
        })
    })
    .expect("the edit is reported as drift");
    assert!(
        stella_tests::json_str(&row, "since").is_some_and(|t| t.starts_with("20")),
        "{row:?}"
    );
    // Not restored without remediation: auto.
    assert_eq!(
        fs::read_to_string(agent.file("config.json")).unwrap(),
        r#"{"log_level":"debug"}"#
    );

    let auto = set(
        &server,
        "global",
        r#"{"log_level":"info","remediation":"auto"}"#,
    );
    server.wait_for_agent(&id, "on the auto config", |a| {
        a.config_hash.as_deref() == Some(&auto)
    });
    fs::write(agent.file("config.json"), "garbage").unwrap();
    let expected = canonical(r#"{"log_level":"info","remediation":"auto"}"#);
    poll(DEADLINE, || {
        (fs::read_to_string(agent.file("config.json")).unwrap() == expected).then_some(())
    })
    .expect("config.json restored");
    poll(DEADLINE, || {
        server
            .admin_ok(&["drift"])
            .contains("no drift")
            .then_some(())
    })
    .expect("drift cleared");
}

#[test]
fn the_applied_config_survives_a_restart_while_the_server_is_down() {
    let mut server = Server::start();
    let agent = AgentDir::new();
    let id = agent.enroll(&server, "offline");
    let mut proc = agent.run();
    let hash = set(
        &server,
        "global",
        r#"{"heartbeat_interval":"2s","log_level":"warn"}"#,
    );
    server.wait_for_agent(&id, "on the config", |a| {
        a.config_hash.as_deref() == Some(&hash)
    });
    proc.kill();
    server.kill();
    let mut offline = agent.run();
    // It runs on the applied config: at warn level its info start line is not logged.
    poll(DEADLINE, || {
        offline
            .log_text()
            .contains("heartbeat failed")
            .then_some(())
    })
    .expect("agent tries");
    assert!(
        !offline.log_text().contains("agent running"),
        "{}",
        offline.log_text()
    );
    let status = text(&stella_tests::run(
        &mut agent.command(&["status", "--json"]),
    ))
    .0;
    assert!(status.contains(&hash), "{status}");
    offline.kill();
}
