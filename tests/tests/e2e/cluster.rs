//! Several servers on one PostgreSQL store behind HAProxy (docs/design.md
//! section 14): three `stella-server` processes sharing a real PostgreSQL,
//! a real HAProxy in `mode tcp` in front of them, and real agents enrolled
//! through it. Heartbeats land on every server; a revoke through one server
//! is enforced by another within the staleness bound; a server killed
//! during an enrollment burst loses no enrollment and consumes no token use
//! without its agent; PostgreSQL stopped for 10 s gives 503s with JSON
//! errors, not crashes or hangs, and the fleet comes back by itself; the
//! leader killed during a staged rollout is replaced, the rollout completes
//! with every stage opened once, and the timeout monitor goes on.

use std::fs;
use std::process::Stdio;
use std::time::{Duration, Instant};

use stella_proto::api::RolloutView;
use stella_tests::haproxy::{self, Haproxy};
use stella_tests::postgres::Postgres;
use stella_tests::raw;
use stella_tests::release::{Keys, NEXT, import, signed_release};
use stella_tests::{
    AgentDir, Client, DEADLINE, Proc, Server, ServerOptions, Supervisor, bin, json, json_str, poll,
    text,
};

/// Heartbeats every second; five missed (not two, as for one server) before
/// the timeout, since a heartbeat another server took reaches the leader
/// through the store's heartbeat feed (about two seconds behind).
fn options() -> ServerOptions {
    ServerOptions {
        heartbeat_misses: 5,
        ..ServerOptions::default()
    }
}

/// Three servers on one database, and HAProxy in front of them.
struct Cluster {
    pg: Postgres,
    db: String,
    servers: Vec<Server>,
    proxy: Haproxy,
}

impl Cluster {
    fn start(test: &str) -> Option<Self> {
        let pg = Postgres::start(test)?;
        let url = pg.database("fleet");
        let db = url.rsplit('/').next().unwrap().to_owned();
        let first = Server::start_on(Some(&url), options());
        let second = first.join(&options());
        let third = first.join(&options());
        let backends: Vec<String> = [&first, &second, &third]
            .iter()
            .map(|s| haproxy::address_of(&s.url))
            .collect();
        let proxy = Haproxy::start(test, &backends)?;
        Some(Self {
            pg,
            db,
            servers: vec![first, second, third],
            proxy,
        })
    }

    /// Which of the servers `among` leads now (each one's
    /// `stella_leader`), once exactly one does, within `deadline`.
    fn leader(&self, among: &[usize], deadline: Duration) -> Option<usize> {
        poll(deadline, || {
            let leading: Vec<usize> = among
                .iter()
                .copied()
                .filter(|&i| self.servers[i].metric("stella_leader") == 1)
                .collect();
            (leading.len() == 1).then(|| leading[0])
        })
    }

    fn logs(&self) -> String {
        self.servers
            .iter()
            .enumerate()
            .map(|(i, s)| format!("--- server {i}:\n{}", s.proc.log_text()))
            .collect()
    }

    fn sql(&self, query: &str) -> String {
        self.pg.sql(&self.db, query)
    }
}

/// Enrolls `n` agents through the proxy with one token (pinning
/// `release_key` when given); returns them with their ids.
fn enroll_through(
    cluster: &Cluster,
    n: usize,
    release_key: Option<&str>,
) -> Vec<(AgentDir, String)> {
    let server = &cluster.servers[0];
    let token = server.token(&["--uses", &n.to_string(), "--ttl", "10m"]);
    (0..n)
        .map(|i| {
            let agent = AgentDir::installed(&bin("stella-agent"));
            let name = format!("node-{i}");
            let mut flags = vec!["--name", name.as_str()];
            if let Some(key) = release_key {
                flags.extend(["--release-key", key]);
            }
            let out = agent.bootstrap_at(&cluster.proxy.url(), &server.pin, &token, &flags);
            let (stdout, stderr) = text(&out);
            assert!(out.status.success(), "bootstrap: {stdout}{stderr}");
            let id = stdout.trim().to_owned();
            (agent, id)
        })
        .collect()
}

/// An HTTPS client with agent `agent`'s identity, straight to `server`.
fn as_agent(server: &Server, agent: &AgentDir) -> Client {
    Client::new(
        &server.url,
        &fs::read(server.ca_pem()).unwrap(),
        Some((
            &fs::read(agent.file("agent.pem")).unwrap(),
            &fs::read(agent.file("agent.key")).unwrap(),
        )),
    )
}

#[test]
fn three_servers_behind_haproxy_share_one_fleet_through_kills_and_an_outage() {
    let test = "cluster::three_servers_behind_haproxy_share_one_fleet_through_kills_and_an_outage";
    let Some(mut cluster) = Cluster::start(test) else {
        return;
    };

    // 20 agents enrolled through the proxy; their heartbeats land on all
    // three servers, and every server sees every agent heartbeating.
    let agents = enroll_through(&cluster, 20, None);
    let mut running: Vec<Proc> = agents.iter().map(|(a, _)| a.run()).collect();
    for server in &cluster.servers {
        let all = poll(DEADLINE, || {
            let list = server.agents();
            (list.len() == 20
                && list
                    .iter()
                    .all(|a| a.status == "active" && a.heartbeat_seq >= 2))
            .then_some(())
        });
        assert!(
            all.is_some(),
            "a server does not see the whole fleet heartbeating: {:?}\n{}",
            server.agents(),
            cluster.logs()
        );
    }
    for (i, server) in cluster.servers.iter().enumerate() {
        assert!(
            server.metric("stella_heartbeats_total") > 0,
            "no heartbeat landed on server {i}; haproxy: {:?}",
            cluster.proxy.stats()
        );
    }

    // A revoke through the first server: the agent's next request to the
    // third gets 401, within the staleness bound (2 s).
    let (revoked_dir, revoked_id) = &agents[0];
    let direct = as_agent(&cluster.servers[2], revoked_dir);
    assert_eq!(direct.get("/v1/agents/self").0, 200);
    cluster.servers[0].admin_ok(&["agents", "revoke", revoked_id]);
    let revoked_at = Instant::now();
    let refused = poll(DEADLINE, || {
        (direct.get("/v1/agents/self").0 == 401).then(|| revoked_at.elapsed())
    });
    let took = refused.unwrap_or_else(|| panic!("server 3 still accepts the revoked agent"));
    assert!(
        took <= Duration::from_secs(2),
        "the revoke took {took:?} to reach server 3"
    );
    eprintln!("revoke enforced by another server after {took:?}");
    assert_eq!(running[0].wait_exit(DEADLINE), Some(3));

    // An enrollment retried through another server (same token, same key)
    // gets the same agent, and uses the token once.
    let work = stella_tests::TempDir::new("retry");
    let csr = raw::csr_json(work.path(), "retry");
    let once = cluster.servers[0].token(&["--uses", "1", "--ttl", "10m"]);
    let body = raw::register_body(&once, &csr, "retried");
    let register = |server: &Server| {
        let (status, answer) =
            server
                .client()
                .post("/v1/agents/register", "application/json", body.as_bytes());
        assert!((200..300).contains(&status), "{status}: {answer}");
        json_str(&json(&answer), "agent_id").unwrap().to_owned()
    };
    assert_eq!(register(&cluster.servers[0]), register(&cluster.servers[2]));

    // A burst of enrollments, one server killed in the middle: every
    // enrollment answered 2xx is in the store, and no token use was
    // consumed without its agent.
    let burst = 24;
    let token = cluster.servers[0].token(&["--uses", &burst.to_string(), "--ttl", "10m"]);
    let token_id = token.split('.').next().unwrap().to_owned();
    let dirs: Vec<AgentDir> = (0..burst).map(|_| AgentDir::new()).collect();
    let mut children = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let child = dir
            .command(&[
                "bootstrap",
                "--server",
                &cluster.proxy.url(),
                "--token",
                &token,
                "--ca-hash",
                &cluster.servers[0].pin,
                "--name",
                &format!("burst-{i}"),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start bootstrap");
        children.push(child);
        if i == burst / 3 {
            cluster.servers[1].kill();
        }
    }
    let mut enrolled = Vec::new();
    for child in children {
        let out = child.wait_with_output().expect("bootstrap ends");
        if out.status.success() {
            enrolled.push(String::from_utf8_lossy(&out.stdout).trim().to_owned());
        }
    }
    assert!(!enrolled.is_empty(), "no enrollment of the burst succeeded");
    let known: Vec<String> = cluster.servers[0]
        .agents()
        .into_iter()
        .map(|a| a.id)
        .collect();
    for id in &enrolled {
        assert!(
            known.contains(id),
            "{id} was answered 2xx but is not stored"
        );
    }
    let consumed: u64 = cluster
        .sql(&format!(
            "SELECT (record::json->>'uses')::int - (record::json->>'uses_left')::int \
             FROM tokens WHERE id = '{token_id}'"
        ))
        .parse()
        .unwrap();
    let with_agent: u64 = cluster
        .sql(&format!(
            "SELECT count(*) FROM enrollments e JOIN agents a ON a.id = e.agent_id \
             WHERE e.token_id = '{token_id}'"
        ))
        .parse()
        .unwrap();
    assert_eq!(
        consumed, with_agent,
        "token uses consumed without their agent"
    );
    assert!(with_agent >= enrolled.len() as u64);

    // PostgreSQL stops for 10 s: the live servers answer 503 with a JSON
    // error (no crash, no hang), and the fleet comes back by itself.
    let live = [0usize, 2];
    let seqs: Vec<(String, u64)> = agents[1..]
        .iter()
        .map(|(_, id)| (id.clone(), cluster.servers[0].agent(id).heartbeat_seq))
        .collect();
    cluster.pg.stop();
    let stopped_at = Instant::now();
    for &i in &live {
        let server = &cluster.servers[i];
        let (status, body) = server.client().post_auth(
            "/v1/admin/tokens",
            &server.admin_token,
            r#"{"ttl_ms":600000,"uses":1,"labels":{}}"#,
        );
        assert_eq!(status, 503, "{body}");
        assert!(json_str(&json(&body), "error").is_some(), "{body}");
    }
    if let Some(rest) = Duration::from_secs(10).checked_sub(stopped_at.elapsed()) {
        std::thread::sleep(rest);
    }
    for &i in &live {
        assert!(
            cluster.servers[i].proc.try_exit_code().is_none(),
            "server {i} exited during the outage:\n{}",
            cluster.servers[i].proc.log_text()
        );
    }
    cluster.pg.start_again();
    for &i in &live {
        let client = cluster.servers[i].client();
        let healthy = poll(DEADLINE, || (client.get("/healthz").0 == 200).then_some(()));
        assert!(
            healthy.is_some(),
            "server {i} did not recover:\n{}",
            cluster.logs()
        );
    }
    for (id, seq) in &seqs {
        cluster.servers[2].wait_for_agent(id, "active again after the outage", |a| {
            a.status == "active" && a.heartbeat_seq > *seq
        });
    }

    // The brakes on failed registrations and admin authentications count
    // across servers: failures from one source through the first server
    // close the third to that source as well (other sources go on).
    let wrong = {
        let real = cluster.servers[0].token(&["--ttl", "10m"]);
        let flipped = if real.ends_with('0') { '1' } else { '0' };
        format!("{}{flipped}", &real[..real.len() - 1])
    };
    let bad = raw::register_body(&wrong, &csr, "guess");
    let first_tls = raw::tls_config(&cluster.servers[0], None);
    let third_tls = raw::tls_config(&cluster.servers[2], None);
    let register_from = |server: &Server, tls, source: [u8; 4], body: &[u8]| {
        raw::exchange(
            server,
            tls,
            Some(source.into()),
            &raw::request(
                "POST",
                "/v1/agents/register",
                &[("content-type", "application/json")],
                body,
            ),
        )
        .expect("an answer")
        .status
    };
    let guesser = [127, 0, 0, 7];
    for _ in 0..10 {
        let status = register_from(&cluster.servers[0], &first_tls, guesser, bad.as_bytes());
        assert_eq!(status, 401);
    }
    // The probe is malformed: 400 while the source may register (and no
    // failure of its own), 429 once the brake holds it.
    let braked = poll(DEADLINE, || {
        let status = register_from(&cluster.servers[2], &third_tls, guesser, b"{}");
        assert!(status == 400 || status == 429, "{status}");
        (status == 429).then_some(())
    });
    assert!(
        braked.is_some(),
        "the third server did not count the first one's failed registrations"
    );
    assert_eq!(
        register_from(&cluster.servers[2], &third_tls, [127, 0, 0, 8], b"{}"),
        400
    );
    let admin_from = |server: &Server, tls, source: [u8; 4], token: &str| {
        let auth = format!("Bearer {token}");
        raw::exchange(
            server,
            tls,
            Some(source.into()),
            &raw::request("GET", "/v1/admin/agents", &[("authorization", &auth)], b""),
        )
        .expect("an answer")
        .status
    };
    let admin_guesser = [127, 0, 0, 9];
    for i in 0..10 {
        let status = admin_from(
            &cluster.servers[0],
            &first_tls,
            admin_guesser,
            &format!("guess{i}"),
        );
        assert_eq!(status, 401);
    }
    // The right token is the probe: 200 until the brake holds, then 429.
    let token = cluster.servers[2].admin_token.clone();
    let braked = poll(DEADLINE, || {
        let status = admin_from(&cluster.servers[2], &third_tls, admin_guesser, &token);
        assert!(status == 200 || status == 429, "{status}");
        (status == 429).then_some(())
    });
    assert!(
        braked.is_some(),
        "the third server did not count the first one's failed admin logins"
    );
    for p in &mut running {
        p.kill();
    }
}

#[test]
fn the_leader_dies_during_a_rollout_and_another_takes_over() {
    let test = "cluster::the_leader_dies_during_a_rollout_and_another_takes_over";
    let Some(mut cluster) = Cluster::start(test) else {
        return;
    };
    let keys = Keys::new();
    let key = keys.public().to_str().unwrap().to_owned();
    let agents = enroll_through(&cluster, 6, Some(&key));
    let mut supervised: Vec<Supervisor> = agents.iter().map(|(a, _)| a.supervise()).collect();
    for (_, id) in &agents {
        cluster.servers[0].wait_for_agent(id, "heartbeating", |a| a.heartbeat_seq >= 1);
    }
    let dir = signed_release(&keys, NEXT, &bin("stella-agent-next"), &[]);
    import(&cluster.servers[0], &dir);

    let leader = cluster
        .leader(&[0, 1, 2], DEADLINE)
        .unwrap_or_else(|| panic!("no single leader:\n{}", cluster.logs()));
    let other = (leader + 1) % 3;
    let out = cluster.servers[other].admin_ok(&[
        "rollout",
        "start",
        "--release",
        NEXT,
        "--stages",
        "count:1,50,100",
        "--soak",
        "2s",
        "--max-failures",
        "0",
    ]);
    let rollout = out.trim().to_owned();
    let show = |server: &Server| -> RolloutView {
        let (status, body) = server.client().get_auth(
            &format!("/v1/admin/rollouts/{rollout}"),
            &server.admin_token,
        );
        assert_eq!(status, 200, "{body}");
        miniserde::json::from_str(&body).unwrap_or_else(|_| panic!("rollout JSON: {body}"))
    };
    // The canary stage completes under the first leader; then it dies.
    let canary = poll(Duration::from_secs(120), || {
        let view = show(&cluster.servers[other]);
        (view.stages[0].state == "done").then_some(view)
    });
    assert!(
        canary.is_some(),
        "the canary never finished:\n{}",
        cluster.logs()
    );
    cluster.servers[leader].kill();
    let killed_at = Instant::now();
    let survivor = (leader + 2) % 3;
    let new_leader = cluster
        .leader(&[other, survivor], Duration::from_secs(30))
        .unwrap_or_else(|| panic!("no server took over:\n{}", cluster.logs()));
    eprintln!(
        "server {new_leader} took over after {:?}",
        killed_at.elapsed()
    );
    assert!(
        killed_at.elapsed() <= Duration::from_secs(15),
        "the takeover took {:?}",
        killed_at.elapsed()
    );
    let done = poll(Duration::from_secs(180), || {
        let view = show(&cluster.servers[survivor]);
        (view.status == "completed").then_some(view)
    });
    let done = done.unwrap_or_else(|| {
        panic!(
            "the rollout did not complete: {:?}\n{}",
            show(&cluster.servers[survivor]),
            cluster.logs()
        )
    });
    assert!(done.stages.iter().all(|s| s.state == "done"), "{done:?}");
    // No stage was opened twice: one advance per stage boundary.
    let advances = cluster.sql(&format!(
        "SELECT count(*) FROM audit WHERE action = 'rollout.advance' AND subject = '{rollout}'"
    ));
    assert_eq!(advances, (done.stages.len() - 1).to_string(), "advances");
    let completions = cluster.sql(&format!(
        "SELECT count(*) FROM audit WHERE action = 'rollout.complete' AND subject = '{rollout}'"
    ));
    assert_eq!(completions, "1");

    // The timeout monitor goes on under the new leader.
    drop(supervised.remove(0));
    let quiet_id = &agents[0].1;
    cluster.servers[survivor].wait_for_agent(quiet_id, "inactive after its silence", |a| {
        a.status == "inactive"
    });
    cluster.pg.stop();
}
