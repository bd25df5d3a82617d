//! Reconnect storms (docs/design.md section 6, docs/operations.md "After an
//! outage"): a fleet that lost its server comes back by itself (agents retry
//! with capped, fully jittered backoff), and a server whose handshakes are
//! bounded (`--max-handshakes`) sheds the excess without refusing anyone for
//! good, answering `/healthz` all along.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use stella_proto::api::AgentView;
use stella_tests::{AgentDir, Client, Proc, Server, ServerOptions, poll};

/// Generous: after an outage each agent waits up to four intervals between
/// attempts, and the machine is shared.
const RECOVERY: Duration = Duration::from_secs(60);

/// `agents list --json`, or `None` while the admin command cannot get
/// through (a shed handshake, a server starting).
fn agents_now(server: &Server) -> Option<Vec<AgentView>> {
    let out = server.admin(&["agents", "list", "--json"]);
    if !out.status.success() {
        return None;
    }
    miniserde::json::from_str(String::from_utf8_lossy(&out.stdout).trim()).ok()
}

/// A counter from `/metrics` on a fresh connection (`None` if shed).
fn metric(server: &Server, name: &str) -> Option<u64> {
    let (status, body) = server.client().get("/metrics");
    if status != 200 {
        return None;
    }
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Enrolls and starts `n` agents; returns their ids and processes.
fn fleet(server: &Server, n: usize) -> Vec<(String, AgentDir, Proc)> {
    (0..n)
        .map(|i| {
            let agent = AgentDir::new();
            let id = agent.enroll(server, &format!("storm-{i}"));
            let proc = agent.run();
            (id, agent, proc)
        })
        .collect()
}

/// Polls until every agent in `want` is active with a heartbeat sequence
/// above the one given; panics with the stragglers otherwise.
fn wait_all_active(
    server: &Server,
    fleet: &[(String, AgentDir, Proc)],
    above: &BTreeMap<String, u64>,
) {
    let mut last = Vec::new();
    let done = poll(RECOVERY, || {
        let agents = agents_now(server)?;
        last = agents
            .iter()
            .filter(|a| {
                a.status.as_str() != "active"
                    || a.heartbeat_seq <= above.get(&a.id).copied().unwrap_or(0)
            })
            .map(|a| format!("{} {} seq {}", a.id, a.status.as_str(), a.heartbeat_seq))
            .collect();
        (agents.len() == fleet.len() && last.is_empty()).then_some(())
    });
    if done.is_none() {
        let logs: Vec<String> = fleet
            .iter()
            .map(|(id, _, p)| format!("--- {id}\n{}", p.log_text()))
            .collect();
        panic!(
            "not every agent became active again within {RECOVERY:?}; still waiting for {last:?}\nserver log:\n{}\nagent logs:\n{}",
            server.proc.log_text(),
            logs.join("\n")
        );
    }
}

#[test]
fn a_fleet_comes_back_by_itself_after_a_server_outage() {
    let opts = ServerOptions {
        heartbeat_interval: "1s",
        heartbeat_misses: 2,
        ..ServerOptions::default()
    };
    let mut server = Server::start_with(opts.clone());
    let agents = fleet(&server, 8);
    let none = BTreeMap::new();
    wait_all_active(&server, &agents, &none);
    let before: BTreeMap<String, u64> = agents_now(&server)
        .expect("agents list")
        .into_iter()
        .map(|a| (a.id, a.heartbeat_seq))
        .collect();

    // The outage: longer than the heartbeat timeout (2 × 1 s), and long
    // enough that every agent has failed twice and is backing off.
    server.kill();
    let down = Instant::now();
    let failing = poll(RECOVERY, || {
        let all_failed = agents
            .iter()
            .all(|(_, _, p)| p.log_text().matches("heartbeat failed").count() >= 2);
        (all_failed && down.elapsed() > Duration::from_secs(3)).then_some(())
    });
    assert!(
        failing.is_some(),
        "the agents did not notice the outage; logs:\n{}",
        agents
            .iter()
            .map(|(_, _, p)| p.log_text())
            .collect::<String>()
    );

    // Back on the same data dir and address: nobody is told to reconnect.
    server.serve_same_port(&opts);
    wait_all_active(&server, &agents, &before);
    for (id, _, proc) in &agents {
        let log = proc.log_text();
        assert!(
            log.contains("heartbeat accepted again"),
            "agent {id} did not log its return:\n{log}"
        );
    }
}

#[test]
fn a_handshake_bound_of_one_sheds_the_excess_and_refuses_no_one_for_good() {
    let server = Server::start_with(ServerOptions {
        heartbeat_interval: "1s",
        heartbeat_misses: 5,
        max_handshakes: Some(1),
        ..ServerOptions::default()
    });
    // Enrolled before the storm; they start heartbeating during it.
    let dirs: Vec<(String, AgentDir)> = (0..6)
        .map(|i| {
            let agent = AgentDir::new();
            let id = agent.enroll(&server, &format!("shed-{i}"));
            (id, agent)
        })
        .collect();

    // The storm: threads opening fresh TLS connections as fast as they can.
    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicU64::new(0));
    let ca = std::fs::read(server.ca_pem()).expect("ca.pem");
    let stormers: Vec<_> = (0..16)
        .map(|_| {
            let (stop, attempts, ca, url) = (
                stop.clone(),
                attempts.clone(),
                ca.clone(),
                server.url.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // A new client each time: a new connection and handshake.
                    let _ = Client::new(&url, &ca, None).get("/healthz");
                    attempts.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let agents: Vec<(String, AgentDir, Proc)> = dirs
        .into_iter()
        .map(|(id, agent)| {
            let proc = agent.run();
            (id, agent, proc)
        })
        .collect();

    // The bound is reached and the excess shed...
    let shed = poll(RECOVERY, || {
        metric(&server, "stella_handshakes_shed_total").filter(|n| *n > 0)
    });
    assert!(
        shed.is_some(),
        "nothing was shed after {} connection attempts; log:\n{}",
        attempts.load(Ordering::Relaxed),
        server.proc.log_text()
    );
    // ...while /healthz still answers a client that asks again...
    let healthy = poll(RECOVERY, || {
        (server.client().get("/healthz") == (200, "ok\n".to_owned())).then_some(())
    });
    assert!(
        healthy.is_some(),
        "/healthz never answered during the storm"
    );
    // ...and every agent gets its heartbeats acknowledged.
    wait_all_active(&server, &agents, &BTreeMap::new());
    stop.store(true, Ordering::Relaxed);
    for s in stormers {
        let _ = s.join();
    }
    assert!(
        server
            .proc
            .log_text()
            .contains("too many TLS handshakes at once"),
        "the server did not say it was shedding; log:\n{}",
        server.proc.log_text()
    );
}
