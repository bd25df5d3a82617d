//! Rollouts that never get stuck (docs/design.md section 6): typed update
//! phases with download progress, a member stuck in `downloading` timed out
//! by `--agent-timeout` (the rollout pauses or goes on by its threshold), a
//! lost acknowledgement of the commit, maintenance windows, the log of a
//! rolled-back update kept by agent and server, and bad input refused.

use std::collections::BTreeMap;
use std::fs;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use stella_proto::api::RolloutView;
use stella_tests::release::{Keys, NEXT, enroll_installed, import, sha256, signed_release};
use stella_tests::{
    AgentDir, DEADLINE, Server, ServerOptions, Supervisor, TempDir, bin, poll, raw, text,
};

const CURRENT: &str = env!("CARGO_PKG_VERSION");

/// Runs the agent under a supervisor, with `fault` (if any) in its
/// environment (kept across its exec of a new version).
fn supervise(agent: &AgentDir, fault: Option<&str>) -> Supervisor {
    let (binary, state) = (agent.binary.clone(), agent.state.clone());
    let fault = fault.map(str::to_owned);
    Supervisor::start(
        move || {
            let mut cmd = Command::new(&binary);
            cmd.arg("run").arg("--state-dir").arg(&state);
            if let Some(f) = &fault {
                cmd.env("STELLA_FAULT", f);
            }
            cmd
        },
        &[],
        agent.dir.join("supervised.log"),
    )
}

fn rollout_start(server: &Server, args: &[&str]) -> String {
    let mut all = vec!["rollout", "start"];
    all.extend_from_slice(args);
    server.admin_ok(&all).trim().to_owned()
}

fn show(server: &Server, id: &str) -> RolloutView {
    let out = server.admin_ok(&["rollout", "show", id, "--json"]);
    miniserde::json::from_str(out.trim()).unwrap_or_else(|_| panic!("rollout JSON: {out}"))
}

/// Members of every stage by phase.
fn phases(view: &RolloutView) -> BTreeMap<String, u64> {
    let mut all = BTreeMap::new();
    for stage in &view.stages {
        for (phase, n) in stage.phases.iter().flatten() {
            *all.entry(phase.clone()).or_insert(0) += n;
        }
    }
    all
}

fn wait_rollout(
    server: &Server,
    id: &str,
    deadline: Duration,
    what: &str,
    check: impl Fn(&RolloutView) -> bool,
) -> RolloutView {
    poll(deadline, || Some(show(server, id)).filter(|v| check(v))).unwrap_or_else(|| {
        panic!(
            "rollout {id} never became {what}: {:?}\nserver log:\n{}",
            show(server, id),
            server.proc.log_text()
        )
    })
}

/// A member stuck in `downloading` (the `download-stall` fault) is timed
/// out by `--agent-timeout`: with `--max-failures 0` its rollout pauses
/// (and an operator's resume lets it finish without it); with a threshold
/// that allows one failure in two, the other rollout completes.
#[test]
fn a_member_stuck_downloading_is_timed_out_and_the_rollout_pauses_or_proceeds() {
    let keys = Keys::new();
    let server = Server::start();
    let strict: Vec<(AgentDir, String)> = (0..2)
        .map(|i| enroll_installed(&server, &keys, "strict", &format!("s{i}")))
        .collect();
    let lenient: Vec<(AgentDir, String)> = (0..2)
        .map(|i| enroll_installed(&server, &keys, "lenient", &format!("l{i}")))
        .collect();
    let stuck = [&strict[0].1, &lenient[0].1];
    let _running: Vec<Supervisor> = [&strict[0], &lenient[0]]
        .iter()
        .map(|(a, _)| supervise(a, Some("download-stall")))
        .chain(
            [&strict[1], &lenient[1]]
                .iter()
                .map(|(a, _)| supervise(a, None)),
        )
        .collect();
    for (_, id) in strict.iter().chain(&lenient) {
        server.wait_for_agent(id, "heartbeating", |a| a.heartbeat_seq >= 1);
    }
    let dir = signed_release(&keys, NEXT, &bin("stella-agent-next"), &[]);
    import(&server, &dir);
    let timeout = "40s";
    let start = |env: &str, max_failures: &str| {
        rollout_start(
            &server,
            &[
                "--release",
                NEXT,
                "--stages",
                "100",
                "--soak",
                "1s",
                "--max-failures",
                max_failures,
                "--agent-timeout",
                timeout,
                "--selector",
                &format!("env={env}"),
            ],
        )
    };
    let strict_id = start("strict", "0");
    let lenient_id = start("lenient", "0.5");

    // Before its deadline the stuck member is seen downloading, with its
    // progress, and holds its stage.
    let view = server.wait_for_agent(stuck[0], "downloading", |a| {
        a.update.state == "downloading" && a.update.bytes.unwrap_or(0) > 0
    });
    let (bytes, total) = (view.update.bytes.unwrap(), view.update.total.unwrap());
    assert!(bytes < total, "{view:?}");
    assert_eq!(total, fs::metadata(bin("stella-agent-next")).unwrap().len());
    let shown = server.admin_ok(&["agents", "show", stuck[0]]);
    assert!(
        shown.contains(&format!("downloading {NEXT} ({bytes} of {total} bytes)")),
        "{shown}"
    );
    let before = wait_rollout(&server, &strict_id, DEADLINE * 3, "counting phases", |v| {
        phases(v).get("downloading") == Some(&1) && phases(v).get("committed") == Some(&1)
    });
    assert_eq!(before.status, "running", "{before:?}");
    assert_eq!(before.agent_timeout.as_deref(), Some(timeout));

    // Past it: timed out, counted as a failure.
    let paused = wait_rollout(
        &server,
        &strict_id,
        Duration::from_secs(120),
        "paused",
        |v| v.status == "paused",
    );
    let reason = paused.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("1 of 2 agents failed to update (1 timed out after 40s)"),
        "{paused:?}"
    );
    assert_eq!(phases(&paused).get("timed_out"), Some(&1), "{paused:?}");
    assert_eq!(paused.stages[0].failed, 1);
    let text = server.admin_ok(&["rollout", "show", &strict_id]);
    assert!(
        text.contains("timed_out=1") && text.contains("committed=1") && text.contains("40s"),
        "{text}"
    );
    let done = wait_rollout(&server, &lenient_id, DEADLINE * 3, "completed", |v| {
        v.status == "completed"
    });
    assert_eq!(phases(&done).get("timed_out"), Some(&1), "{done:?}");
    assert_eq!(phases(&done).get("committed"), Some(&1), "{done:?}");

    // The operator looked at the paused rollout and resumes it: the member
    // that timed out no longer holds the stage.
    server.admin_ok(&["rollout", "resume", &strict_id]);
    wait_rollout(&server, &strict_id, DEADLINE * 2, "completed", |v| {
        v.status == "completed"
    });
    for id in stuck {
        assert_eq!(server.agent(id).version, CURRENT);
    }
}

/// A member that is off for the whole deadline is `skipped` and does not
/// hold its stage; it still gets the offer when it returns while the
/// rollout runs.
#[test]
fn a_member_offline_for_the_whole_deadline_is_skipped_and_updated_when_it_returns() {
    let keys = Keys::new();
    let server = Server::start();
    let (online, online_id) = enroll_installed(&server, &keys, "prod", "on");
    let (offline, offline_id) = enroll_installed(&server, &keys, "prod", "off");
    let _on = supervise(&online, None);
    server.wait_for_agent(&online_id, "heartbeating", |a| a.heartbeat_seq >= 1);
    server.wait_for_agent(&offline_id, "timed out", |a| a.status == "inactive");
    let dir = signed_release(&keys, NEXT, &bin("stella-agent-next"), &[]);
    import(&server, &dir);
    // A long soak keeps the rollout running after its stage settled.
    let id = rollout_start(
        &server,
        &[
            "--release",
            NEXT,
            "--stages",
            "100",
            "--soak",
            "1h",
            "--agent-timeout",
            "5s",
        ],
    );
    let soaking = wait_rollout(&server, &id, DEADLINE * 3, "soaking without it", |v| {
        v.stages[0].state == "soaking"
            && phases(v).get("skipped") == Some(&1)
            && phases(v).get("committed") == Some(&1)
    });
    assert_eq!(soaking.stages[0].failed, 0, "{soaking:?}");
    // Back while the rollout runs: offered, updated.
    let _off = supervise(&offline, None);
    server.wait_for_agent(&offline_id, "updated after its return", |a| {
        a.status == "active" && a.version == NEXT
    });
    wait_rollout(&server, &id, DEADLINE, "counting it committed", |v| {
        phases(v).get("committed") == Some(&2)
    });
}

/// The answer to the heartbeat that reports `committed` is lost (the
/// `lost-commit-ack` fault): the agent stays on the new version, reports it
/// again, and server and rollout converge.
#[test]
fn a_lost_commit_acknowledgement_converges() {
    let keys = Keys::new();
    let server = Server::start();
    let (agent, id) = enroll_installed(&server, &keys, "prod", "lost");
    let sup = supervise(&agent, Some("lost-commit-ack"));
    server.wait_for_agent(&id, "heartbeating", |a| a.heartbeat_seq >= 1);
    let dir = signed_release(&keys, NEXT, &bin("stella-agent-next"), &[]);
    import(&server, &dir);
    let rollout = rollout_start(
        &server,
        &["--release", NEXT, "--stages", "100", "--soak", "1s"],
    );
    let done = wait_rollout(&server, &rollout, DEADLINE * 4, "completed", |v| {
        v.status == "completed"
    });
    assert_eq!(phases(&done).get("committed"), Some(&1), "{done:?}");
    let view = server.wait_for_agent(&id, "settled on the new version", |a| {
        a.version == NEXT && a.update.state == "idle"
    });
    assert_eq!(view.status, "active");
    let log = sup.log_text();
    assert!(
        log.contains("the answer to the committing heartbeat is lost"),
        "{log}"
    );
    assert_eq!(log.matches("update committed").count(), 1, "{log}");
    assert!(!log.contains("rolling back"), "{log}");
    assert_eq!(sha256(&agent.binary), sha256(&bin("stella-agent-next")));
    assert_eq!(sup.restarts.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// `HH:MM` of the UTC time `hours` from now (may be negative).
fn utc_hhmm(hours: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let minute = (now / 60 + hours * 60).rem_euclid(24 * 60);
    format!("{:02}:{:02}", minute / 60, minute % 60)
}

/// Offers are made only inside the rollout's window; inside it, the
/// agent's own `update_window` still applies (it waits, `offered`).
#[test]
fn a_rollout_window_offers_only_inside_it_and_the_agents_own_window_applies() {
    let keys = Keys::new();
    let server = Server::start();
    let (agent, id) = enroll_installed(&server, &keys, "prod", "windowed");
    let _sup = supervise(&agent, None);
    server.wait_for_agent(&id, "heartbeating", |a| a.heartbeat_seq >= 1);
    let dir = signed_release(&keys, NEXT, &bin("stella-agent-next"), &[]);
    import(&server, &dir);

    // A window that excludes now: no offer.
    let closed = format!("{}-{}", utc_hhmm(2), utc_hhmm(3));
    let outside = rollout_start(
        &server,
        &["--release", NEXT, "--stages", "100", "--window", &closed],
    );
    let view = wait_rollout(&server, &outside, DEADLINE, "evaluated", |v| {
        phases(v).get("waiting") == Some(&1)
    });
    assert_eq!(
        (view.window.as_deref(), view.window_open),
        (Some(closed.as_str()), Some(false))
    );
    let seq = server.agent(&id).heartbeat_seq;
    let later = server.wait_for_agent(&id, "heartbeating on", |a| a.heartbeat_seq >= seq + 4);
    assert_eq!(
        (later.update.state.as_str(), later.version.as_str()),
        ("idle", CURRENT)
    );
    let text = server.admin_ok(&["rollout", "show", &outside]);
    assert!(
        text.contains(&format!("offers {closed} UTC (closed now)")) && text.contains("waiting=1"),
        "{text}"
    );
    server.admin_ok(&["rollout", "abort", &outside]);

    // The agent's own window excludes this hour; the rollout's includes now.
    let hour = |h: i64| utc_hhmm(h)[..2].to_owned();
    let config = TempDir::new("config");
    let file = config.join("agent.json");
    fs::write(
        &file,
        format!(r#"{{"update_window":"{}-{}"}}"#, hour(2), hour(3)),
    )
    .unwrap();
    server.admin_ok(&[
        "config",
        "set",
        "--scope",
        &format!("agent:{id}"),
        file.to_str().unwrap(),
    ]);
    let open = format!("{}-{}", utc_hhmm(-1), utc_hhmm(1));
    let inside = rollout_start(
        &server,
        &[
            "--release",
            NEXT,
            "--stages",
            "100",
            "--window",
            &open,
            "--days",
            "mon-sun",
        ],
    );
    let view = server.wait_for_agent(&id, "offered, waiting for its own window", |a| {
        a.update.state == "offered" && a.update.version == NEXT
    });
    assert_eq!(view.version, CURRENT);
    let shown = wait_rollout(&server, &inside, DEADLINE, "offered", |v| {
        phases(v).get("offered") == Some(&1)
    });
    assert_eq!(
        (shown.days.as_deref(), shown.window_open),
        (Some("mon-sun"), Some(true))
    );
    assert!(
        !agent.file("staging").exists()
            || fs::read_dir(agent.file("staging"))
                .unwrap()
                .next()
                .is_none()
    );
}

/// A new version that fails probation is rolled back; the agent keeps the
/// log lines of the failed update across the rollback and sends them once;
/// the server keeps them (across a restart) and `agents show` prints them.
#[test]
fn a_rolled_back_update_keeps_its_log_and_agents_show_prints_it() {
    let keys = Keys::new();
    let mut server = Server::start_with(ServerOptions {
        update_probation: "4s",
        ..ServerOptions::default()
    });
    let (agent, id) = enroll_installed(&server, &keys, "prod", "failing");
    let sup = supervise(&agent, Some("probation-no-heartbeat"));
    let dir = signed_release(&keys, NEXT, &bin("stella-agent-next"), &[]);
    import(&server, &dir);
    server.admin_ok(&["agents", "update", &id, "--release", NEXT]);
    let view = server.wait_for_agent(&id, "rolled back with its log", |a| {
        a.update.state == "rolled_back" && a.last_failure.is_some()
    });
    assert_eq!(view.version, CURRENT);
    assert!(
        view.update
            .error
            .as_deref()
            .unwrap_or("")
            .contains("probation window"),
        "{view:?}"
    );
    let failure = view.last_failure.unwrap();
    assert_eq!(
        (failure.version.as_str(), failure.phase.as_str()),
        (NEXT, "rolled_back")
    );
    assert!(failure.reason.contains("probation window"), "{failure:?}");
    let lines = failure.lines.join("\n");
    for needle in [
        "update accepted",
        "update verified",
        "rolling back the update",
    ] {
        assert!(lines.contains(needle), "{needle} missing from:\n{lines}");
    }
    assert!(failure.lines.len() <= 64 && failure.lines.iter().all(|l| l.len() <= 256));
    // In the state dir, across the rollback.
    let kept = fs::read_to_string(agent.file("update-failure.log")).unwrap();
    assert!(kept.contains("rolling back the update"), "{kept}");
    assert!(sup.log_text().contains("rolling back the update"));
    // Sent once: the server logged one report.
    let seq = server.agent(&id).heartbeat_seq;
    server.wait_for_agent(&id, "heartbeating on", |a| a.heartbeat_seq >= seq + 3);
    assert_eq!(
        server
            .proc
            .log_text()
            .matches("update failure reported")
            .count(),
        1,
        "{}",
        server.proc.log_text()
    );
    // Durable: a restarted server still shows it.
    server.kill();
    server.serve_same_port(&ServerOptions::default());
    let shown = server.admin_ok(&["agents", "show", &id]);
    assert!(
        shown.contains(&format!("last failure    rolled_back {NEXT}"))
            && shown.contains("  | ")
            && shown.contains("rolling back the update"),
        "{shown}"
    );
    let json = server.admin_ok(&["agents", "show", &id, "--json"]);
    assert!(json.contains("\"last_failure\":{"), "{json}");
}

/// Bad `--window`, `--days` and `--agent-timeout` get one clear line and
/// exit 2; the API answers 400 with a JSON error and starts nothing; a
/// phase the server does not know is kept and shown, never refused.
#[test]
fn bad_schedules_are_refused_and_unknown_phases_are_kept() {
    let keys = Keys::new();
    let server = Server::start_with(ServerOptions {
        heartbeat_interval: "1h",
        ..ServerOptions::default()
    });
    let dir = signed_release(&keys, NEXT, &bin("stella-agent-next"), &[]);
    import(&server, &dir);
    for (flag, value, needle) in [
        (
            "--window",
            "25:00-01:00",
            "--window \"25:00-01:00\" must be HH:MM-HH:MM",
        ),
        (
            "--window",
            "22-04",
            "--window \"22-04\" must be HH:MM-HH:MM",
        ),
        ("--window", "04:00-04:00", "is empty or the whole day"),
        ("--days", "funday", "\"funday\" is not a day"),
        ("--agent-timeout", "soon", "--agent-timeout"),
        ("--agent-timeout", "0s", "must be more than 0"),
    ] {
        let out = server.admin(&[
            "rollout",
            "start",
            "--release",
            NEXT,
            "--stages",
            "100",
            flag,
            value,
        ]);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(needle), "{flag} {value}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stdout.is_empty(), "{stdout}");
    }
    let admin_tls = raw::tls_config(&server, None);
    let bearer = format!("Bearer {}", server.admin_token);
    for body in [
        format!(
            r#"{{"release":"{NEXT}","stages":["100"],"soak_ms":0,"max_failures":0,"selector":{{}},"window":"9am-5pm"}}"#
        ),
        format!(
            r#"{{"release":"{NEXT}","stages":["100"],"soak_ms":0,"max_failures":0,"selector":{{}},"days":"someday"}}"#
        ),
        format!(
            r#"{{"release":"{NEXT}","stages":["100"],"soak_ms":0,"max_failures":0,"selector":{{}},"agent_timeout_ms":0}}"#
        ),
    ] {
        let answer = raw::exchange(
            &server,
            &admin_tls,
            None,
            &raw::json_post("/v1/admin/rollouts", &[("authorization", &bearer)], &body),
        )
        .expect("an answer");
        assert_eq!(answer.status, 400, "{body}: {answer:?}");
        assert!(answer.is_json_error(), "{answer:?}");
    }
    assert!(
        server
            .admin_ok(&["rollout", "list"])
            .contains("no rollouts"),
        "nothing was started"
    );

    // An agent reports a phase this server does not know.
    let agent = AgentDir::new();
    let id = agent.enroll(&server, "future");
    let tls = raw::tls_config(
        &server,
        Some((&agent.file("agent.pem"), &agent.file("agent.key"))),
    );
    let body = r#"{"seq":1,"version":"1.0.0","uptime_s":1,"config_hash":"","config_drift":false,"config_error":null,"doctor":{"pass":0,"warn":0,"fail":0,"skip":0,"failing":[]},"update":{"state":"hibernating","version":"1.0.0","error":null},"capabilities":[]}"#;
    let answer = raw::exchange(
        &server,
        &tls,
        None,
        &raw::json_post("/v1/agents/heartbeat", &[], body),
    )
    .expect("an answer");
    assert_eq!(answer.status, 200, "{answer:?}");
    let view = server.agent(&id);
    assert_eq!(view.update.state.as_str(), "hibernating");
    let shown = server.admin_ok(&["agents", "show", &id]);
    assert!(shown.contains("unknown(hibernating)"), "{shown}");
}
