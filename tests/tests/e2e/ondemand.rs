//! Doctor on demand (docs/design.md section 8): an administrator asks one
//! agent or a selection for a doctor report through the server, the agents
//! upload it with a heartbeat (a remediation dry run writes nothing), the
//! request survives a server restart, reports are summarised per check, and
//! bad requests and oversized reports are refused.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use miniserde::json::Value;
use stella_tests::{
    AgentDir, Client, DEADLINE, Proc, Server, ServerOptions, json, json_at, json_str, poll, text,
};

/// Enrolls and runs an agent labelled `env=<env>` and `site=lab`.
fn labelled_agent(server: &Server, name: &str, env: &str) -> (AgentDir, String, Proc) {
    let agent = AgentDir::new();
    let token = server.token(&[
        "--ttl",
        "10m",
        "--label",
        &format!("env={env}"),
        "--label",
        "site=lab",
    ]);
    let out = agent.bootstrap(server, &token, &["--name", name]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "bootstrap failed: {stdout}{stderr}");
    let id = stdout.trim().to_owned();
    let proc = agent.run();
    server.wait_for_agent(&id, "heartbeating", |a| a.heartbeat_seq >= 1);
    (agent, id, proc)
}

/// `agents show ID --doctor --json`.
fn doctor_view(server: &Server, id: &str) -> Value {
    json(&server.admin_ok(&["agents", "show", id, "--doctor", "--json"]))
}

/// Polls until the agent's report has arrived (received after `since`).
fn wait_for_report(server: &Server, id: &str, since: Option<&str>) -> Value {
    poll(DEADLINE, || {
        let view = doctor_view(server, id);
        let at = json_str(&view, "received_at").map(str::to_owned);
        (at.is_some()
            && at.as_deref() != since
            && matches!(json_at(&view, "pending"), Some(Value::Bool(false))))
        .then_some(view)
    })
    .unwrap_or_else(|| {
        panic!(
            "agent {id} uploaded no doctor report; last: {:?}\nserver log:\n{}",
            doctor_view(server, id),
            server.proc.log_text()
        )
    })
}

/// The checks of a report view, as (id, status, code).
fn checks(view: &Value) -> Vec<(String, String, String)> {
    match json_at(view, "report/checks") {
        Some(Value::Array(checks)) => checks
            .iter()
            .map(|c| {
                let field = |k| json_str(c, k).unwrap_or_default().to_owned();
                (field("id"), field("status"), field("code"))
            })
            .collect(),
        other => panic!("no checks in {other:?}"),
    }
}

fn key_mode(agent: &AgentDir) -> u32 {
    fs::metadata(agent.file("agent.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn doctor_on_demand_reports_plans_and_writes_nothing() {
    let mut server = Server::start();
    let (prod, prod_id, _prod_proc) = labelled_agent(&server, "prod-1", "prod");
    let (dev, dev_id, mut dev_proc) = labelled_agent(&server, "dev-1", "dev");
    assert!(matches!(
        json_at(&doctor_view(&server, &prod_id), "report"),
        Some(Value::Null)
    ));

    // Break something doctor finds, then ask for a report with a dry run.
    fs::set_permissions(prod.file("agent.key"), fs::Permissions::from_mode(0o644)).unwrap();
    let asked = server.admin_ok(&["agents", "doctor", &prod_id, "--remediate-dry-run"]);
    assert!(asked.contains(&prod_id), "{asked}");
    let view = wait_for_report(&server, &prod_id, None);
    let found = checks(&view);
    assert_eq!(found.len(), 11, "{found:?}");
    assert!(
        found.contains(&(
            "identity.key".into(),
            "fail".into(),
            "identity.key/mode".into()
        )),
        "{found:?}"
    );
    assert!(
        matches!(
            json_at(&view, "report/remediation/dry_run"),
            Some(Value::Bool(true))
        ),
        "{view:?}"
    );
    let plan = match json_at(&view, "report/remediation/actions") {
        Some(Value::Array(a)) => a.clone(),
        other => panic!("no plan: {other:?}"),
    };
    assert!(
        plan.iter()
            .any(|a| json_str(a, "action") == Some("chmod-key")
                && matches!(json_at(a, "applied"), Some(Value::Bool(false)))),
        "{plan:?}"
    );
    assert_eq!(
        key_mode(&prod),
        0o644,
        "a dry run on request writes nothing"
    );
    let plain = server.admin_ok(&["agents", "show", &prod_id, "--doctor"]);
    for needle in [
        "received",
        "identity.key/mode",
        "would chmod 0600",
        "nothing was changed",
    ] {
        assert!(plain.contains(needle), "{needle}: {plain}");
    }

    // The selector form asks both; the request is durable: the dev agent is
    // down while it is asked and the server restarts before it answers.
    dev_proc.kill();
    let prod_before = json_str(&view, "received_at").map(str::to_owned);
    let asked = server.admin_ok(&["agents", "doctor", "--selector", "site=lab"]);
    assert!(
        asked.contains(&prod_id) && asked.contains(&dev_id),
        "{asked}"
    );
    let again = wait_for_report(&server, &prod_id, prod_before.as_deref());
    assert!(
        matches!(json_at(&again, "report/remediation"), Some(Value::Null)),
        "no dry run asked: {again:?}"
    );
    assert!(matches!(
        json_at(&doctor_view(&server, &dev_id), "pending"),
        Some(Value::Bool(true))
    ));
    server.kill();
    server.serve_same_port(&ServerOptions::default());
    assert!(matches!(
        json_at(&doctor_view(&server, &dev_id), "pending"),
        Some(Value::Bool(true))
    ));
    let _dev_proc = dev.run();
    wait_for_report(&server, &dev_id, None);

    // The summary across env=prod names the failing check and its agent.
    let summary = json(&server.admin_ok(&["doctor-report", "--selector", "env=prod", "--json"]));
    assert!(
        matches!(json_at(&summary, "agents"), Some(Value::Number(_))),
        "{summary:?}"
    );
    let Some(Value::Array(rows)) = json_at(&summary, "checks") else {
        panic!("{summary:?}")
    };
    let key = rows
        .iter()
        .find(|r| json_str(r, "id") == Some("identity.key"))
        .unwrap_or_else(|| panic!("identity.key not listed: {summary:?}"));
    let Some(Value::Array(failing)) = json_at(key, "fail") else {
        panic!("{key:?}")
    };
    assert_eq!(failing.len(), 1);
    assert!(matches!(&failing[0], Value::String(s) if *s == prod_id));
    let table = server.admin_ok(&["doctor-report", "--selector", "env=prod"]);
    assert!(
        table.contains("identity.key") && table.contains(&prod_id),
        "{table}"
    );

    // Bad input.
    let unknown = "agt_0000000000000000";
    for args in [
        vec!["agents", "doctor", unknown],
        vec!["agents", "show", unknown, "--doctor"],
    ] {
        let out = server.admin(&args);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
    for args in [
        vec!["agents", "doctor", "--selector", "nope"],
        vec!["doctor-report", "--selector", "env"],
        vec!["doctor-report"],
    ] {
        assert_eq!(server.admin(&args).status.code(), Some(2), "{args:?}");
    }

    // A report over the limit is refused and changes nothing.
    let before = doctor_view(&server, &prod_id);
    let mtls = Client::new(
        &server.url,
        &fs::read(server.ca_pem()).unwrap(),
        Some((
            &fs::read(prod.file("agent.pem")).unwrap(),
            &fs::read(prod.file("agent.key")).unwrap(),
        )),
    );
    let check = format!(
        r#"{{"id":"host.resources","status":"pass","code":"host.resources/ok","message":"{}","duration_us":1}}"#,
        "m".repeat(1000)
    );
    let checks_json = vec![check; 32].join(",");
    let body = format!(
        r#"{{"seq":999999,"version":"0.1.0","uptime_s":1,"config_hash":"","config_drift":false,"config_error":null,"doctor":{{"pass":0,"warn":0,"fail":0,"skip":0,"failing":[]}},"update":{{"state":"idle","version":"0.1.0","error":null}},"capabilities":[],"doctor_report":{{"checks":[{checks_json}],"summary":{{"pass":0,"warn":0,"fail":0,"skip":0}},"remediation":null}}}}"#
    );
    assert!(body.len() > 32 * 1024 && body.len() < 64 * 1024);
    let (status, answer) = mtls.post("/v1/agents/heartbeat", "application/json", body.as_bytes());
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("doctor_report"), "{answer}");
    assert_eq!(
        format!("{:?}", doctor_view(&server, &prod_id)),
        format!("{before:?}")
    );
    assert!(server.agent(&prod_id).heartbeat_seq < 999_999);
    // A report nobody asked for is accepted with its heartbeat but not kept.
    let small = body.replace(&format!("[{checks_json}]"), "[]");
    let (status, answer) = mtls.post("/v1/agents/heartbeat", "application/json", small.as_bytes());
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        format!("{:?}", doctor_view(&server, &prod_id)),
        format!("{before:?}")
    );
}
