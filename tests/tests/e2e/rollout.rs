//! Staged rollouts (docs/design.md section 6): real agents update stage by stage,
//! a failing release pauses at the canary, membership survives a server
//! restart, overlapping rollouts are refused, pause/resume/abort act at once.

use std::collections::BTreeMap;
use std::fs;
use std::time::Duration;

use stella_proto::api::RolloutView;
use stella_tests::release::{Keys, NEXT, enroll_installed, import, signed_release};
use stella_tests::{AgentDir, DEADLINE, Server, Supervisor, TempDir, bin, poll, text};

fn rollout_start(server: &Server, args: &[&str]) -> String {
    let mut all = vec!["rollout", "start"];
    all.extend_from_slice(args);
    server.admin_ok(&all).trim().to_owned()
}

/// The rollout with its stage members (admin API).
fn show(server: &Server, id: &str) -> RolloutView {
    let client = server.client();
    let (status, body) = client.get_auth(
        &format!("/v1/admin/rollouts/{id}?members=1"),
        &server.admin_token,
    );
    assert_eq!(status, 200, "{body}");
    miniserde::json::from_str(&body).unwrap_or_else(|_| panic!("rollout JSON: {body}"))
}

#[test]
fn agents_update_stage_by_stage() {
    let keys = Keys::new();
    let server = Server::start();
    let agents: Vec<(AgentDir, String)> = (0..6)
        .map(|i| enroll_installed(&server, &keys, "prod", &format!("box{i}")))
        .collect();
    let _running: Vec<Supervisor> = agents.iter().map(|(a, _)| a.supervise()).collect();
    for (_, id) in &agents {
        server.wait_for_agent(id, "heartbeating", |a| a.heartbeat_seq >= 1);
    }
    let dir = signed_release(&keys, NEXT, &bin("stella-agent-next"), &[]);
    import(&server, &dir);
    let id = rollout_start(
        &server,
        &[
            "--release",
            NEXT,
            "--stages",
            "count:1,50,100",
            "--soak",
            "2s",
            "--max-failures",
            "0",
            "--selector",
            "env=prod",
        ],
    );
    assert!(id.starts_with("rol_"), "{id}");

    // Watch: no agent outside the open stages ever runs the new version.
    let mut updated_at: BTreeMap<String, usize> = BTreeMap::new();
    let mut tick = 0usize;
    let done = poll(Duration::from_secs(180), || {
        tick += 1;
        let view = show(&server, &id);
        let open = view.stages.iter().take_while(|s| s.state == "done").count();
        let allowed: Vec<&String> = view
            .stages
            .iter()
            .take(open + 1)
            .flat_map(|s| s.members.iter().flatten())
            .collect();
        for (_, agent_id) in &agents {
            if server.agent(agent_id).version == NEXT {
                assert!(
                    allowed.contains(&agent_id),
                    "{agent_id} updated before its stage opened: {view:?}"
                );
                updated_at.entry(agent_id.clone()).or_insert(tick);
            }
        }
        (view.status == "completed").then_some(view)
    })
    .unwrap_or_else(|| panic!("the rollout did not complete: {:?}", show(&server, &id)));
    assert_eq!(
        done.stages.iter().map(|s| s.agents).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert!(
        done.stages
            .iter()
            .all(|s| s.state == "done" && s.updated == s.agents && s.failed == 0),
        "{done:?}"
    );
    // Stage order: every member of a stage updated no earlier than the members of the stage before.
    let first_of = |k: usize| {
        done.stages[k]
            .members
            .iter()
            .flatten()
            .map(|m| updated_at[m])
            .min()
            .unwrap()
    };
    let last_of = |k: usize| {
        done.stages[k]
            .members
            .iter()
            .flatten()
            .map(|m| updated_at[m])
            .max()
            .unwrap()
    };
    assert!(
        last_of(0) < first_of(1) && last_of(1) < first_of(2),
        "stages overlapped: {updated_at:?}"
    );
    let shown = server.admin_ok(&["rollout", "show", &id]);
    assert!(
        shown.contains("completed") && shown.contains("count:1"),
        "{shown}"
    );
}

#[test]
fn a_failing_release_pauses_at_the_canary() {
    let keys = Keys::new();
    let server = Server::start();
    let agents: Vec<(AgentDir, String)> = (0..4)
        .map(|i| enroll_installed(&server, &keys, "prod", &format!("n{i}")))
        .collect();
    let _running: Vec<Supervisor> = agents.iter().map(|(a, _)| a.supervise()).collect();
    for (_, id) in &agents {
        server.wait_for_agent(id, "heartbeating", |a| a.heartbeat_seq >= 1);
    }
    // Signed, but the binary fails its self-test.
    let scratch = TempDir::new("broken");
    let broken = scratch.join("stella-agent");
    fs::write(&broken, "#!/bin/sh\necho broken >&2\nexit 1\n").unwrap();
    let dir = signed_release(&keys, NEXT, &broken, &[]);
    import(&server, &dir);
    let id = rollout_start(
        &server,
        &[
            "--release",
            NEXT,
            "--stages",
            "count:1,100",
            "--soak",
            "1s",
            "--max-failures",
            "0",
        ],
    );
    let paused = poll(DEADLINE * 3, || {
        Some(show(&server, &id)).filter(|v| v.status == "paused")
    })
    .unwrap_or_else(|| panic!("not paused: {:?}", show(&server, &id)));
    assert!(
        paused
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("1 of 1 agents failed"),
        "{paused:?}"
    );
    assert_eq!(
        (paused.stages[0].failed, paused.stages[1].state.as_str()),
        (1, "pending")
    );
    let canary = paused.stages[0].members.clone().unwrap()[0].clone();
    // The others never receive the offer: several heartbeats later they are still idle.
    let others: Vec<&String> = agents
        .iter()
        .map(|(_, id)| id)
        .filter(|id| **id != canary)
        .collect();
    let seq = server.agent(others[0]).heartbeat_seq;
    server.wait_for_agent(others[0], "heartbeating on", |a| a.heartbeat_seq >= seq + 4);
    for id in others {
        let view = server.agent(id);
        assert_eq!(
            (view.update.state.as_str(), view.version.as_str()),
            ("idle", env!("CARGO_PKG_VERSION")),
            "{id}"
        );
    }
    assert_eq!(show(&server, &id).status, "paused");
}

#[test]
fn membership_and_state_survive_a_server_restart() {
    let keys = Keys::new();
    let mut server = Server::start();
    let mut ids: Vec<String> = (0..10)
        .map(|i| enroll_installed(&server, &keys, "prod", &format!("m{i}")).1)
        .collect();
    let dir = signed_release(&keys, NEXT, &bin("stella-agent-next"), &[]);
    import(&server, &dir);
    let id = rollout_start(
        &server,
        &["--release", NEXT, "--stages", "30,100", "--soak", "1h"],
    );
    let before = show(&server, &id);
    assert_eq!(before.stages[0].members.as_ref().unwrap().len(), 3);
    server.admin_ok(&["rollout", "pause", &id]);
    server.kill();
    server.serve(&Default::default());
    let after = show(&server, &id);
    assert_eq!(after.status, "paused");
    for (a, b) in before.stages.iter().zip(&after.stages) {
        let (mut x, mut y) = (a.members.clone().unwrap(), b.members.clone().unwrap());
        x.sort();
        y.sort();
        assert_eq!(x, y, "stage membership changed across a restart");
    }
    // Every enrolled agent is in exactly one stage.
    let mut members: Vec<String> = after
        .stages
        .iter()
        .flat_map(|s| s.members.clone().unwrap())
        .collect();
    members.sort();
    ids.sort();
    assert_eq!(members, ids);
}

#[test]
fn overlapping_rollouts_are_refused_and_admin_actions_act_at_once() {
    let keys = Keys::new();
    let server = Server::start();
    for i in 0..2 {
        enroll_installed(&server, &keys, "prod", &format!("p{i}"));
        enroll_installed(&server, &keys, "dev", &format!("d{i}"));
    }
    let dir = signed_release(&keys, NEXT, &bin("stella-agent-next"), &[]);
    import(&server, &dir);
    let prod = rollout_start(
        &server,
        &[
            "--release",
            NEXT,
            "--stages",
            "50,100",
            "--soak",
            "1h",
            "--selector",
            "env=prod",
        ],
    );
    let out = server.admin(&["rollout", "start", "--release", NEXT, "--stages", "100"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).1.contains(&format!("already in rollout {prod}")),
        "{:?}",
        text(&out)
    );
    // A disjoint selector is fine.
    let dev = rollout_start(
        &server,
        &[
            "--release",
            NEXT,
            "--stages",
            "100",
            "--soak",
            "1h",
            "--selector",
            "env=dev",
        ],
    );
    assert_ne!(dev, prod);

    assert!(
        server
            .admin_ok(&["rollout", "pause", &prod])
            .contains("paused")
    );
    assert_eq!(show(&server, &prod).status, "paused");
    assert!(
        server
            .admin_ok(&["rollout", "resume", &prod])
            .contains("running")
    );
    assert!(
        server
            .admin_ok(&["rollout", "abort", &prod])
            .contains("aborted")
    );
    let out = server.admin(&["rollout", "resume", &prod]);
    assert!(
        text(&out).1.contains("cannot be changed"),
        "{:?}",
        text(&out)
    );
    // Aborted, it no longer holds its agents.
    rollout_start(
        &server,
        &[
            "--release",
            NEXT,
            "--stages",
            "100",
            "--selector",
            "env=prod",
        ],
    );
    // Bad input is a clear error.
    let out = server.admin(&["rollout", "start", "--release", NEXT, "--stages", "10,50"]);
    assert!(
        text(&out).1.contains("the last stage must be 100"),
        "{:?}",
        text(&out)
    );
    let out = server.admin(&["rollout", "start", "--release", "9.9.9", "--stages", "100"]);
    assert!(
        text(&out).1.contains("no release 9.9.9"),
        "{:?}",
        text(&out)
    );
    let json = server.admin_ok(&["rollout", "show", &dev, "--json"]);
    for field in [
        "\"id\"",
        "\"release\"",
        "\"status\"",
        "\"reason\"",
        "\"stages\"",
        "\"percent\"",
        "\"agents\"",
        "\"updated\"",
        "\"failed\"",
        "\"state\"",
    ] {
        assert!(json.contains(field), "{field} missing from {json}");
    }
}
