//! Heartbeats and the agent lifecycle (docs/design.md section 4): active on
//! heartbeat, inactive after missed intervals, deactivate/activate, revoke.

use std::fs;

use miniserde::json::{self, Value};
use stella_tests::{AgentDir, DEADLINE, Server, poll, text};

#[test]
fn heartbeats_make_the_agent_active_with_its_details() {
    let server = Server::start();
    let token = server.token(&["--label", "site=lab"]);
    let agent = AgentDir::new();
    let out = agent.bootstrap(&server, &token, &["--name", "hb1"]);
    assert!(out.status.success(), "{:?}", text(&out));
    let id = text(&out).0.trim().to_owned();
    let mut proc = agent.run();
    let view = server.wait_for_agent(&id, "heartbeating", |a| a.heartbeat_seq >= 2);
    assert_eq!(view.status, "active");
    assert!(view.reason.is_none());
    assert!(
        view.last_heartbeat
            .as_deref()
            .is_some_and(|t| t.ends_with('Z'))
    );
    assert_eq!(view.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(view.labels.get("site").map(String::as_str), Some("lab"));
    assert_eq!(view.update.state, "idle");

    // `agents list --json` has the documented fields, each of its JSON type.
    let listed = server.admin_ok(&["agents", "list", "--json"]);
    let rows = match json::from_str::<Value>(listed.trim()) {
        Ok(Value::Array(rows)) => rows,
        other => panic!("agents list --json is not a JSON array ({other:?}): {listed}"),
    };
    let row = rows
        .iter()
        .find_map(|row| match row {
            Value::Object(o) if matches!(o.get("id"), Some(Value::String(s)) if *s == id) => {
                Some(o)
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("{id} is not a row of {listed}"));
    let string = |field: &str| match row.get(field) {
        Some(Value::String(s)) => s.clone(),
        other => panic!("{field} is not a string but {other:?} in {listed}"),
    };
    assert_eq!(string("name"), "hb1");
    assert_eq!(string("status"), "active");
    assert!(
        matches!(row.get("reason"), Some(Value::Null)),
        "reason of an active agent: {listed}"
    );
    assert_eq!(string("version"), env!("CARGO_PKG_VERSION"));
    assert_eq!(string("target"), view.target);
    assert!(string("last_heartbeat").ends_with('Z'), "{listed}");
    assert!(string("cert_not_after").ends_with('Z'), "{listed}");
    assert!(
        matches!(row.get("config_hash"), Some(Value::String(_) | Value::Null)),
        "config_hash is neither a string nor null in {listed}"
    );
    match row.get("labels") {
        Some(Value::Object(labels)) => assert!(
            matches!(labels.get("site"), Some(Value::String(v)) if v == "lab"),
            "{listed}"
        ),
        other => panic!("labels is not an object but {other:?} in {listed}"),
    }
    assert!(
        matches!(row.get("capabilities"), Some(Value::Array(_))),
        "capabilities is not an array in {listed}"
    );
    // The table names the agent too.
    assert!(server.admin_ok(&["agents", "list"]).contains("hb1"));

    // The agent keeps to one OS thread.
    let status = fs::read_to_string(format!("/proc/{}/status", proc.pid())).unwrap();
    assert!(status.lines().any(|l| l == "Threads:\t1"), "{status}");

    // `status` reads the state dir.
    let out = stella_tests::run(&mut agent.command(&["status", "--json"]));
    let (stdout, _) = text(&out);
    let status = stella_tests::json(&stdout);
    assert_eq!(
        stella_tests::json_str(&status, "agent_id"),
        Some(id.as_str()),
        "{stdout}"
    );
    assert!(
        stella_tests::json_str(&status, "last_heartbeat").is_some_and(|t| t.starts_with("20")),
        "{stdout}"
    );
    proc.kill();
}

#[test]
fn a_silent_agent_becomes_inactive_and_comes_back() {
    let server = Server::start();
    let agent = AgentDir::new();
    let id = agent.enroll(&server, "quiet");
    let mut proc = agent.run();
    server.wait_for_agent(&id, "active with heartbeats", |a| {
        a.status == "active" && a.heartbeat_seq >= 1
    });
    proc.kill();
    let view = server.wait_for_agent(&id, "timed out", |a| a.status == "inactive");
    assert_eq!(view.reason.map(|r| r.as_str()), Some("heartbeat_timeout"));
    let seq = view.heartbeat_seq;
    let _proc = agent.run();
    server.wait_for_agent(&id, "active again", |a| {
        a.status == "active" && a.heartbeat_seq > seq
    });
}

#[test]
fn deactivate_activate_and_revoke() {
    let server = Server::start();
    let agent = AgentDir::new();
    let id = agent.enroll(&server, "cycle");
    let mut proc = agent.run();
    server.wait_for_agent(&id, "heartbeating", |a| a.heartbeat_seq >= 1);

    let out = server.admin_ok(&["agents", "deactivate", &id]);
    assert!(out.contains("inactive (deactivated)"), "{out}");
    // The agent hears 403 and keeps trying.
    poll(DEADLINE, || {
        proc.log_text()
            .contains("agent is deactivated")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("agent never saw the 403:\n{}", proc.log_text()));
    let view = server.agent(&id);
    assert_eq!(
        (view.status.as_str(), view.reason.map(|r| r.as_str())),
        ("inactive", Some("deactivated"))
    );
    assert!(
        proc.try_exit_code().is_none(),
        "a deactivated agent keeps running"
    );

    let seq = server.agent(&id).heartbeat_seq;
    server.admin_ok(&["agents", "activate", &id]);
    server.wait_for_agent(&id, "active again", |a| {
        a.status == "active" && a.heartbeat_seq > seq
    });

    server.admin_ok(&["agents", "revoke", &id]);
    let code = proc.wait_exit(DEADLINE);
    assert_eq!(
        code,
        Some(3),
        "revoked agent exits 3; log:\n{}",
        proc.log_text()
    );
    assert!(proc.log_text().contains("enroll this host again"));
    assert_eq!(server.agent(&id).status, "revoked");

    // Revoked is final.
    let out = server.admin(&["agents", "activate", &id]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).1.contains("revoked is final"),
        "{:?}",
        text(&out)
    );
    // A restarted agent is refused at once, with the same exit code.
    let mut again = agent.run();
    assert_eq!(again.wait_exit(DEADLINE), Some(3));
}

#[test]
fn lifecycle_survives_a_server_restart() {
    let mut server = Server::start();
    let agent = AgentDir::new();
    let id = agent.enroll(&server, "durable");
    server.admin_ok(&["agents", "deactivate", &id]);
    server.kill();
    server.serve(&Default::default());
    let view = server.agent(&id);
    assert_eq!(
        (view.status.as_str(), view.reason.map(|r| r.as_str())),
        ("inactive", Some("deactivated"))
    );
    // The agent was enrolled durably: it is still known after a kill -9.
    assert_eq!(server.agents().len(), 1);
}
