//! Crash consistency with real SIGKILLs (docs/design.md sections 3 and 4): the
//! server killed while agents enroll and heartbeat, and the agent killed at a
//! random moment of its enrollment (at least once between its request and
//! its end, or the test fails). Enrollment and token use are durable
//! before the server answers, so after a restart every answered enrollment is
//! there, every used token stays used, and a retry finds the same identity.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use stella_tests::{AgentDir, Proc, Server, ServerOptions, TempDir, raw, run, text, tool};

/// A number that differs from run to run, to pick kill points.
fn jitter(modulo: u64) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    (nanos ^ (nanos >> 7) ^ u64::from(std::process::id())) % modulo
}

/// `stella-agent bootstrap` against a server by URL and pin (so that threads
/// need no reference to the `Server`, which the test kills and restarts).
fn bootstrap_cmd(agent: &AgentDir, url: &str, pin: &str, token: &str, name: &str) -> Command {
    agent.command(&[
        "bootstrap",
        "--server",
        url,
        "--token",
        token,
        "--ca-hash",
        pin,
        "--name",
        name,
    ])
}

/// What became of one enrollment attempt during the load.
#[derive(Debug)]
enum Outcome {
    /// Bootstrap succeeded: the server answered 2xx with this id.
    Answered(String),
    /// Bootstrap failed (the server died under it, or refused).
    Failed(String),
    /// Not tried before the kill.
    NotTried,
}

#[test]
fn server_killed_under_enrollment_and_heartbeat_load_keeps_every_answered_enrollment() {
    const ENROLLMENTS: usize = 30;
    const THREADS: usize = 3;
    let opts = ServerOptions::default();
    let mut server = Server::start_with(opts.clone());

    // Two agents heartbeat (every second) through the crash.
    let beating: Vec<(AgentDir, String)> = (0..2)
        .map(|i| {
            let agent = AgentDir::new();
            let id = agent.enroll(&server, &format!("beat{i}"));
            (agent, id)
        })
        .collect();
    let _running: Vec<Proc> = beating.iter().map(|(a, _)| a.run()).collect();
    for (_, id) in &beating {
        server.wait_for_agent(id, "heartbeating", |a| a.heartbeat_seq >= 1);
    }

    // One one-time token per enrollment; each agent is named after its token.
    let tokens: Vec<String> = (0..ENROLLMENTS)
        .map(|_| server.token(&["--ttl", "1h"]))
        .collect();
    let agents: Vec<AgentDir> = (0..ENROLLMENTS).map(|_| AgentDir::new()).collect();
    let outcomes: Vec<Mutex<Outcome>> = (0..ENROLLMENTS)
        .map(|_| Mutex::new(Outcome::NotTried))
        .collect();
    let next = AtomicUsize::new(0);
    let answered = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let kill_after = 4 + jitter(12) as usize;
    let (url, pin) = (server.url.clone(), server.pin.clone());
    let started = Instant::now();

    std::thread::scope(|scope| {
        for _ in 0..THREADS {
            scope.spawn(|| {
                while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(60) {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= ENROLLMENTS {
                        break;
                    }
                    let name = format!("load{i}");
                    let out = run(&mut bootstrap_cmd(
                        &agents[i], &url, &pin, &tokens[i], &name,
                    ));
                    let (stdout, stderr) = text(&out);
                    let outcome = if out.status.success() {
                        answered.fetch_add(1, Ordering::SeqCst);
                        Outcome::Answered(stdout.trim().to_owned())
                    } else {
                        Outcome::Failed(stderr.trim().to_owned())
                    };
                    *outcomes[i].lock().unwrap() = outcome;
                }
            });
        }
        // Kill -9 once `kill_after` enrollments were answered, while more are
        // in flight.
        let reached = loop {
            if answered.load(Ordering::SeqCst) >= kill_after {
                break true;
            }
            if started.elapsed() > Duration::from_secs(60) {
                break false;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        server.kill();
        stop.store(true, Ordering::SeqCst);
        assert!(
            reached,
            "only {} enrollments in 60 s",
            answered.load(Ordering::SeqCst)
        );
    });
    let outcomes: Vec<Outcome> = outcomes
        .into_iter()
        .map(|m| m.into_inner().unwrap())
        .collect();
    let count = |f: fn(&Outcome) -> bool| outcomes.iter().filter(|o| f(o)).count();
    eprintln!(
        "killed the server after {kill_after} answered: {} answered, {} failed, {} not tried",
        count(|o| matches!(o, Outcome::Answered(_))),
        count(|o| matches!(o, Outcome::Failed(_))),
        count(|o| matches!(o, Outcome::NotTried)),
    );

    // Restart on the same port: the store opens after the SIGKILL.
    server.serve_same_port(&opts);
    let after = server.agents();
    let by_name = |name: &str| after.iter().filter(|a| a.name == name).collect::<Vec<_>>();

    // Lost in the crash, before or after the commit: the agent's retry with
    // the same key finds the same registration, or enrolls anew with the
    // token that was not used. Tokens never tried still work.
    for (i, outcome) in outcomes.iter().enumerate() {
        let name = format!("load{i}");
        let found = by_name(&name);
        assert!(found.len() <= 1, "{name} enrolled twice: {found:?}");
        match outcome {
            Outcome::Answered(id) => {
                // Answered means durable.
                assert_eq!(found.len(), 1, "answered enrollment {name} ({id}) is gone");
                assert_eq!(&found[0].id, id);
                assert_eq!(found[0].status, "active");
            }
            Outcome::Failed(why) => {
                let out = agents[i].bootstrap(&server, &tokens[i], &["--name", &name]);
                let (stdout, stderr) = text(&out);
                assert!(
                    out.status.success(),
                    "{name} (failed with {why:?}) cannot retry: {stderr}"
                );
                if let Some(before) = found.first() {
                    assert_eq!(
                        stdout.trim(),
                        before.id,
                        "{name} got another identity on retry"
                    );
                }
            }
            Outcome::NotTried => {
                assert!(found.is_empty(), "{name} was never tried but exists");
                let out = agents[i].bootstrap(&server, &tokens[i], &["--name", &name]);
                assert!(
                    out.status.success(),
                    "unused token {i} was lost: {:?}",
                    text(&out)
                );
            }
        }
    }
    // Every answered enrollment's one-time token stays used: another key gets
    // 401. (Each from its own loopback address, so that these deliberate
    // failures do not trip the per-source brake on token guessing.)
    let work = TempDir::new("reuse");
    let csr = raw::csr_json(work.path(), "intruder");
    let anonymous = raw::tls_config(&server, None);
    for (i, outcome) in outcomes.iter().enumerate() {
        if let Outcome::Answered(_) = outcome {
            let body = raw::register_body(&tokens[i], &csr, "intruder");
            let source = Ipv4Addr::new(127, 0, 1, 1 + i as u8);
            let request = raw::json_post("/v1/agents/register", &[], &body);
            let answer = raw::exchange(&server, &anonymous, Some(source), &request)
                .unwrap_or_else(|e| panic!("reuse of token {i}: {e}"));
            assert_eq!(answer.status, 401, "token {i} reused: {answer:?}");
            assert!(answer.body.contains("has no uses left"), "{answer:?}");
        }
    }
    let all = server.agents();
    assert_eq!(all.len(), 2 + ENROLLMENTS, "{all:?}");
    for i in 0..ENROLLMENTS {
        assert_eq!(
            all.iter().filter(|a| a.name == format!("load{i}")).count(),
            1
        );
    }
    // The heartbeating agents carry on with the restarted server.
    for (_, id) in &beating {
        let seq = server.agent(id).heartbeat_seq;
        server.wait_for_agent(id, "heartbeating after the restart", |a| {
            a.heartbeat_seq > seq && a.status == "active"
        });
    }
}

/// Whether the agent's certificate is for its key (by openssl).
fn cert_matches_key(agent: &AgentDir) -> bool {
    let cert = tool(
        "openssl",
        &[
            "x509",
            "-in",
            agent.file("agent.pem").to_str().unwrap(),
            "-noout",
            "-pubkey",
        ],
    );
    let key = tool(
        "openssl",
        &[
            "pkey",
            "-in",
            agent.file("agent.key").to_str().unwrap(),
            "-pubout",
        ],
    );
    cert.status.success() && text(&cert).0 == text(&key).0
}

/// Where a kill landed in one enrollment, as the test sees it afterwards in
/// the agent's state dir and the server's store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Landed {
    /// No key yet: the agent was starting or pinning the CA.
    BeforeItsKey,
    /// Key made (the request was being built or sent), nothing recorded.
    BeforeTheServerRecordedIt,
    /// Recorded by the server, no `agent.json`: after the agent sent its
    /// request and before it finished, so the answer was lost.
    AnswerLost,
    /// `agent.json` written: the enrollment had finished.
    Finished,
}

/// When to SIGKILL the agent's `bootstrap`.
#[derive(Debug, Clone, Copy)]
enum Aim {
    /// After this long.
    After(Duration),
    /// As soon as the server's log says it recorded this enrollment (the
    /// agent is then between its request and `agent.json`, unless it is
    /// quicker than a look at the log).
    AtTheServerRecord,
}

/// Whether the server log has a line with the field `name=<name>` (the
/// server logs each recorded enrollment with the agent's name).
fn server_logged_name(server: &Server, name: &str) -> bool {
    let field = format!("name={name}");
    server
        .proc
        .log_text()
        .lines()
        .any(|line| line.split_whitespace().any(|f| f == field))
}

#[test]
fn agent_killed_at_random_moments_of_enrollment_retries_to_one_identity() {
    use std::os::unix::fs::PermissionsExt;
    // Kills spread at random over one enrollment's duration.
    const SPREAD: usize = 6;
    // Kills aimed at the server's record, only while no kill has yet landed
    // between the request and the end, so that the test cannot pass without
    // one.
    const AIMED_AT_MOST: usize = 8;
    let server = Server::start();

    // How long one enrollment takes here, to spread the kills over it.
    let control = AgentDir::new();
    let token = server.token(&[]);
    let started = Instant::now();
    let out = run(&mut bootstrap_cmd(
        &control,
        &server.url,
        &server.pin,
        &token,
        "control",
    ));
    let whole = started.elapsed();
    assert!(out.status.success(), "{:?}", text(&out));

    let mut phases = Vec::new();
    let mut landed = Vec::new();
    let mut aimed = 0;
    for attempt in 0.. {
        let answer_lost = landed.iter().filter(|l| **l == Landed::AnswerLost).count();
        let aim = if attempt < SPREAD {
            // Spread over 10%..110% of a whole enrollment, at random within each slot.
            let slot = whole.as_micros() as u64 / SPREAD as u64;
            Aim::After(Duration::from_micros(
                whole.as_micros() as u64 / 10 + slot * attempt as u64 + jitter(slot.max(1)),
            ))
        } else if answer_lost == 0 && aimed < AIMED_AT_MOST {
            aimed += 1;
            Aim::AtTheServerRecord
        } else {
            break;
        };
        let name = format!("killed{attempt}");
        let token = server.token(&["--ttl", "1h"]);
        let agent = AgentDir::new();
        let mut proc = Proc::spawn(
            bootstrap_cmd(&agent, &server.url, &server.pin, &token, &name),
            agent.dir.join("bootstrap.log"),
        );
        match aim {
            Aim::After(delay) => std::thread::sleep(delay),
            Aim::AtTheServerRecord => {
                let deadline = Instant::now() + stella_tests::DEADLINE;
                while !server_logged_name(&server, &name)
                    && proc.try_exit_code().is_none()
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        let finished = proc.try_exit_code().is_some();
        proc.kill();
        let key_made = agent.file("agent.key").exists();
        let local = std::fs::read_to_string(agent.file("agent.json")).ok();
        if key_made && local.is_none() {
            // A request that reached the server before the kill is still
            // recorded: give the server a moment to finish it.
            std::thread::sleep(Duration::from_millis(300));
        }

        let on_server: Vec<_> = server
            .agents()
            .into_iter()
            .filter(|a| a.name == name)
            .collect();
        assert!(on_server.len() <= 1, "{on_server:?}");
        let (spot, phase) = match (&local, on_server.first(), key_made) {
            (Some(_), _, _) => (Landed::Finished, "enrolled on both sides"),
            (None, Some(_), _) => (
                Landed::AnswerLost,
                "enrolled on the server only (answer lost)",
            ),
            (None, None, true) => (Landed::BeforeTheServerRecordedIt, "key made, not enrolled"),
            (None, None, false) => (Landed::BeforeItsKey, "not enrolled, no key"),
        };
        landed.push(spot);
        phases.push(format!(
            "{aim:?}: {phase}{}",
            if finished { " (had exited)" } else { "" }
        ));
        if let Some(json) = &local {
            // The agent keeps an identity only after the server recorded it.
            let server_id = &on_server
                .first()
                .expect("local enrollment unknown to the server")
                .id;
            assert!(json.contains(server_id.as_str()), "{json} vs {server_id}");
            continue;
        }
        // Retry with the same state dir and token.
        let out = agent.bootstrap(&server, &token, &["--name", &name]);
        let (stdout, stderr) = text(&out);
        assert!(
            out.status.success(),
            "retry after a kill ({phase}) failed: {stderr}\nfirst try:\n{}",
            proc.log_text()
        );
        let id = stdout.trim();
        if let Some(earlier) = on_server.first() {
            assert_eq!(id, earlier.id, "the retry got another identity");
        }
        let now: Vec<_> = server
            .agents()
            .into_iter()
            .filter(|a| a.name == name)
            .collect();
        assert_eq!(now.len(), 1, "{now:?}");
        assert_eq!(now[0].id, id);
        assert!(
            cert_matches_key(&agent),
            "{name}: certificate and key differ"
        );
        let mode = std::fs::metadata(agent.file("agent.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        // The used token cannot enroll anyone else.
        let out = AgentDir::new().bootstrap(&server, &token, &[]);
        assert!(
            text(&out).1.contains("has no uses left"),
            "{:?}",
            text(&out)
        );
    }
    eprintln!("one enrollment takes {whole:?}; kills landed: {phases:#?}");
    // Not a test of nothing: at least one kill landed after the agent's
    // request reached the server and before the agent finished, and its
    // retry above found the same identity.
    assert!(
        landed.contains(&Landed::AnswerLost),
        "no kill landed between the request and the end of an enrollment \
         ({aimed} aimed at the server's record); kills landed: {phases:#?}\nserver log:\n{}",
        server.proc.log_text()
    );
}
