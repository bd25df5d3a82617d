//! The server behind a TCP load balancer (docs/operations.md, "Several
//! servers"): Debian's haproxy from the test harness in `mode tcp`, so the
//! agent's mTLS ends in stella-server and the agent, pinning the CA, verifies
//! the server's certificate through the proxy as it would directly. A dead
//! backend in the list costs enrollments nothing: haproxy retries the
//! connection on a live one (`option redispatch`) and its health checks take
//! the dead one out.

use stella_tests::haproxy::{self, Haproxy};
use stella_tests::{AgentDir, Client, DEADLINE, Server, poll};

/// `stella_heartbeats_total` from a server's `/metrics`.
fn heartbeats_total(client: &Client) -> u64 {
    let (status, metrics) = client.get("/metrics");
    assert_eq!(status, 200, "{metrics}");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("stella_heartbeats_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no stella_heartbeats_total in {metrics}"))
}

#[test]
fn agents_enroll_and_heartbeat_through_haproxy_past_a_dead_backend() {
    let test = "agents_enroll_and_heartbeat_through_haproxy_past_a_dead_backend";
    let server = Server::start();
    let backends = [haproxy::address_of(&server.url), haproxy::dead_backend()];
    let Some(mut proxy) = Haproxy::start(test, &backends) else {
        return;
    };

    // Keep the dead backend in the rotation (no health checks: haproxy
    // counts it up, "no check"), so that connections really go to it and
    // are redispatched, whatever the checks would have found by now.
    let answer = proxy
        .command("disable health servers/s1")
        .expect("the admin socket answers");
    assert!(answer.trim().is_empty(), "disable health: {answer}");
    proxy.wait_for_backend(1, true);
    let agents: Vec<AgentDir> = (0..4).map(|_| AgentDir::new()).collect();
    let ids: Vec<String> = agents
        .iter()
        .enumerate()
        .map(|(i, a)| a.enroll_at(&server, &proxy.url(), &format!("lb-{i}")))
        .collect();
    let dead = proxy
        .stats()
        .into_iter()
        .find(|s| s.name == "s1")
        .expect("s1 in the stats");
    assert!(
        dead.retries + dead.redispatches > 0,
        "round robin never tried the dead backend: {:?}",
        proxy.stats()
    );

    // With health checks back, haproxy takes the dead backend out; then
    // enrollment goes straight to the live one.
    proxy
        .command("enable health servers/s1")
        .expect("the admin socket answers");
    proxy.wait_for_backend(1, false);
    proxy.wait_for_backend(0, true);
    let late = AgentDir::new();
    late.enroll_at(&server, &proxy.url(), "lb-late");
    assert_eq!(server.agents().len(), 5);

    // Heartbeats through the proxy reach the server.
    let before = heartbeats_total(&server.client());
    let mut running: Vec<_> = agents.iter().take(2).map(AgentDir::run).collect();
    for id in &ids[..2] {
        server.wait_for_agent(id, "heartbeating through haproxy", |a| {
            a.status == "active" && a.heartbeat_seq >= 2
        });
    }
    let ca = std::fs::read(server.ca_pem()).expect("ca.pem");
    let through_proxy = Client::new(&proxy.url(), &ca, None);
    let counted = poll(DEADLINE, || {
        (heartbeats_total(&through_proxy) >= before + 4).then_some(())
    });
    assert!(
        counted.is_some(),
        "/metrics never showed the heartbeats; server log:\n{}",
        server.proc.log_text()
    );
    let live = proxy.wait_for_backend(0, true);
    assert!(live.sessions >= 5, "{live:?}");
    assert!(
        proxy.log_text().contains("servers/s0"),
        "haproxy logs each connection:\n{}",
        proxy.log_text()
    );

    // Stopped by PID: its port is free again.
    proxy.stop();
    assert_eq!(proxy.pid(), 0);
    let closed = poll(DEADLINE, || {
        std::net::TcpStream::connect(proxy.address())
            .is_err()
            .then_some(())
    });
    assert!(closed.is_some(), "haproxy still listens after stop");
    for p in &mut running {
        p.kill();
    }
}
