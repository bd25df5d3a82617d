//! Signed releases and self-update (docs/design.md section 5): deploy a new
//! version, every refusal, resume after an interrupted download, a crash at
//! each step of the swap, probation rollback, crash-loop rollback.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use stella_tests::release::{Keys, NEXT, enroll_pinning, sha256, signed_release};
use stella_tests::{
    AgentDir, AgentView, DEADLINE, Server, ServerOptions, Supervisor, TempDir, bin, poll, run, text,
};

const CURRENT: &str = env!("CARGO_PKG_VERSION");

fn release(keys: &Keys, version: &str, binary: &Path, extra: &[&str]) -> TempDir {
    signed_release(keys, version, binary, extra)
}

/// Imports a release and offers it to one agent.
fn offer(server: &Server, dir: &TempDir, version: &str, id: &str) {
    stella_tests::release::import(server, dir);
    server.admin_ok(&["agents", "update", id, "--release", version]);
}

/// A server with a short probation, and an installed agent that pins `keys`.
fn setup(keys: &Keys, probation: &'static str) -> (Server, AgentDir, String) {
    let server = Server::start_with(ServerOptions {
        update_probation: probation,
        ..ServerOptions::default()
    });
    let agent = AgentDir::installed(&bin("stella-agent"));
    let id = enroll_pinning(&agent, &server, keys, &[], "updater");
    (server, agent, id)
}

fn supervise(agent: &AgentDir, env: &[(&str, &str)], first_run_only: &[&str]) -> Supervisor {
    let binary = agent.binary.clone();
    let state = agent.state.clone();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Supervisor::start(
        move || {
            let mut cmd = Command::new(&binary);
            cmd.arg("run").arg("--state-dir").arg(&state);
            for (k, v) in &env {
                cmd.env(k, v);
            }
            cmd
        },
        first_run_only,
        agent.dir.join("supervised.log"),
    )
}

fn wait_failed(server: &Server, id: &str, needle: &str) -> AgentView {
    wait_phase(server, id, "failed", needle)
}

/// Waits for the agent to report `phase` (`failed` or `rolled_back`) with
/// an error containing `needle`.
fn wait_phase(server: &Server, id: &str, phase: &str, needle: &str) -> AgentView {
    let view = server.wait_for_agent(id, "reporting the failed update", |a| {
        a.update.state == phase
    });
    let error = view.update.error.clone().unwrap_or_default();
    assert!(
        error.contains(needle),
        "update error {error:?} lacks {needle:?}"
    );
    view
}

fn assert_untouched(agent: &AgentDir, original: &str) {
    assert_eq!(
        sha256(&agent.binary),
        original,
        "the installed binary changed"
    );
    let staging = agent.file("staging");
    let leftovers: Vec<_> = fs::read_dir(&staging)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "staging holds {leftovers:?}");
    let next = agent.binary.with_file_name(".stella-agent.new");
    assert!(
        !next.exists(),
        "a staged binary is left next to the install path"
    );
}

#[test]
fn a_new_version_is_deployed_and_committed() {
    let keys = Keys::new();
    let (server, agent, id) = setup(&keys, "5m");
    let old = sha256(&agent.binary);
    let sup = supervise(&agent, &[], &[]);
    server.wait_for_agent(&id, "heartbeating", |a| {
        a.heartbeat_seq >= 1 && a.version == CURRENT
    });
    let pid = sup.pid();
    let dir = release(&keys, NEXT, &bin("stella-agent-next"), &[]);
    offer(&server, &dir, NEXT, &id);
    let listed = server.admin_ok(&["release", "list"]);
    assert!(
        listed.contains(NEXT)
            && listed.contains(&format!(
                "{}/stella-agent",
                stella_tests::release::native_target()
            )),
        "{listed}"
    );
    let view = server.wait_for_agent(&id, "running and committed on the new version", |a| {
        a.version == NEXT && a.update.state == "idle"
    });
    assert_eq!(view.status, "active");
    // Same process (exec in place), new binary at the install path, the old one kept.
    assert_eq!(
        sup.pid(),
        pid,
        "the agent was restarted instead of exec'ing in place:\n{}",
        sup.log_text()
    );
    assert_eq!(sup.restarts.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(sha256(&agent.binary), sha256(&bin("stella-agent-next")));
    assert_eq!(
        sha256(&agent.binary.with_file_name("stella-agent.prev")),
        old
    );
    let log = sup.log_text();
    assert!(log.contains("update committed"), "{log}");
    let status = text(&run(&mut agent.command(&["status", "--json"]))).0;
    assert_eq!(
        stella_tests::json_str(&stella_tests::json(&status), "version"),
        Some(NEXT),
        "{status}"
    );
    // Doctor agrees the new binary is the installed one.
    let doctor = text(&run(&mut agent.command(&["doctor", "--json"]))).0;
    assert!(
        stella_tests::doctor_codes(&stella_tests::json(&doctor))
            .contains(&"update.integrity/ok".to_owned()),
        "{doctor}"
    );
}

#[test]
fn a_bad_signature_is_refused() {
    let keys = Keys::new();
    let (server, agent, id) = setup(&keys, "5m");
    let original = sha256(&agent.binary);
    let _sup = supervise(&agent, &[], &[]);
    let dir = release(&keys, NEXT, &bin("stella-agent-next"), &[]);
    // Flip the first characters of the signature.
    let envelope = fs::read_to_string(dir.join("release.dsse.json")).unwrap();
    let at = envelope.find("\"sig\":\"").unwrap() + 7;
    let flipped = if &envelope[at..at + 4] == "AAAA" {
        "BBBB"
    } else {
        "AAAA"
    };
    fs::write(
        dir.join("release.dsse.json"),
        format!("{}{flipped}{}", &envelope[..at], &envelope[at + 4..]),
    )
    .unwrap();
    offer(&server, &dir, NEXT, &id);
    wait_failed(&server, &id, "no signature verifies");
    assert_untouched(&agent, &original);
}

#[test]
fn a_release_signed_by_another_key_is_refused() {
    let keys = Keys::new();
    let (server, agent, id) = setup(&keys, "5m");
    let original = sha256(&agent.binary);
    let _sup = supervise(&agent, &[], &[]);
    let other = Keys::new();
    let dir = release(&other, NEXT, &bin("stella-agent-next"), &[]);
    offer(&server, &dir, NEXT, &id);
    wait_failed(&server, &id, "no signature verifies");
    assert_untouched(&agent, &original);
}

#[test]
fn a_downgrade_is_refused_unless_the_statement_allows_it() {
    let keys = Keys::new();
    let (server, agent, id) = setup(&keys, "5m");
    let original = sha256(&agent.binary);
    let _sup = supervise(&agent, &[], &[]);
    let dir = release(&keys, "0.0.9", &bin("stella-agent"), &[]);
    offer(&server, &dir, "0.0.9", &id);
    wait_failed(&server, &id, "not newer than the running");
    assert_untouched(&agent, &original);
}

#[test]
fn an_allowed_downgrade_is_installed() {
    let keys = Keys::new();
    let server = Server::start();
    // This agent runs the newer build and is offered the current one back.
    let agent = AgentDir::installed(&bin("stella-agent-next"));
    let token = server.token(&[]);
    let out = agent.bootstrap(
        &server,
        &token,
        &["--release-key", keys.public().to_str().unwrap()],
    );
    let id = text(&out).0.trim().to_owned();
    let _sup = supervise(&agent, &[], &[]);
    server.wait_for_agent(&id, "on the newer build", |a| a.version == NEXT);
    let dir = release(
        &keys,
        CURRENT,
        &bin("stella-agent"),
        &["--allow-downgrade-from", NEXT],
    );
    offer(&server, &dir, CURRENT, &id);
    server.wait_for_agent(&id, "downgraded and committed", |a| {
        a.version == CURRENT && a.update.state == "idle"
    });
}

#[test]
fn a_corrupted_artifact_fails_its_digest() {
    let keys = Keys::new();
    let (server, agent, id) = setup(&keys, "5m");
    let original = sha256(&agent.binary);
    let dir = release(&keys, NEXT, &bin("stella-agent-next"), &[]);
    offer(&server, &dir, NEXT, &id);
    // Damage the stored blob (same size): the digest must catch it.
    let blob = server
        .data
        .join("blobs/sha256")
        .join(sha256(&bin("stella-agent-next")));
    let mut bytes = fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&blob, bytes).unwrap();
    let _sup = supervise(&agent, &[], &[]);
    wait_failed(&server, &id, "the signed release says");
    assert_untouched(&agent, &original);
}

#[test]
fn a_truncated_artifact_is_refused() {
    let keys = Keys::new();
    let (server, agent, id) = setup(&keys, "5m");
    let original = sha256(&agent.binary);
    let dir = release(&keys, NEXT, &bin("stella-agent-next"), &[]);
    offer(&server, &dir, NEXT, &id);
    let blob = server
        .data
        .join("blobs/sha256")
        .join(sha256(&bin("stella-agent-next")));
    let len = fs::metadata(&blob).unwrap().len();
    fs::File::options()
        .write(true)
        .open(&blob)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    let _sup = supervise(&agent, &[], &[]);
    wait_failed(&server, &id, "the signed release says");
    assert_untouched(&agent, &original);
}

#[test]
fn an_oversized_artifact_is_refused_before_it_is_downloaded() {
    let keys = Keys::new();
    let (server, agent, id) = setup(&keys, "5m");
    let original = sha256(&agent.binary);
    let dir = release(&keys, NEXT, &bin("stella-agent-next"), &[]);
    offer(&server, &dir, NEXT, &id);
    let blob = server
        .data
        .join("blobs/sha256")
        .join(sha256(&bin("stella-agent-next")));
    fs::File::options()
        .write(true)
        .open(&blob)
        .unwrap()
        .set_len(129 << 20)
        .unwrap();
    let _sup = supervise(&agent, &[], &[]);
    wait_failed(&server, &id, "over the limit");
    assert_untouched(&agent, &original);
}

#[test]
fn a_release_without_this_target_is_not_offered() {
    let keys = Keys::new();
    let (server, _agent, id) = setup(&keys, "5m");
    let dir = TempDir::new("other-target");
    fs::create_dir_all(dir.join("aarch64-unknown-linux-musl")).unwrap();
    fs::copy(
        bin("stella-agent-next"),
        dir.join("aarch64-unknown-linux-musl/stella-agent"),
    )
    .unwrap();
    let out = run(Command::new(bin("xtask"))
        .args(["sign", "--key"])
        .arg(keys.private())
        .args(["--version", NEXT])
        .arg(dir.path()));
    assert!(out.status.success());
    assert!(
        server
            .admin(&["release", "import", dir.path().to_str().unwrap()])
            .status
            .success()
    );
    let out = server.admin(&["agents", "update", &id, "--release", NEXT]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).1.contains("has no agent for"),
        "{:?}",
        text(&out)
    );
}

#[test]
fn a_failing_self_test_is_refused() {
    let keys = Keys::new();
    let (server, agent, id) = setup(&keys, "5m");
    let original = sha256(&agent.binary);
    let scratch = TempDir::new("broken");
    let broken = scratch.join("stella-agent");
    fs::write(
        &broken,
        "#!/bin/sh\necho 'this build is broken' >&2\nexit 1\n",
    )
    .unwrap();
    let dir = release(&keys, NEXT, &broken, &[]);
    offer(&server, &dir, NEXT, &id);
    let _sup = supervise(&agent, &[], &[]);
    wait_failed(&server, &id, "self-test of the new binary failed");
    assert_untouched(&agent, &original);
}

#[test]
fn an_interrupted_download_resumes_with_range_in_bounded_memory() {
    let keys = Keys::new();
    let (server, agent, id) = setup(&keys, "5m");
    let next_size = fs::metadata(bin("stella-agent-next")).unwrap().len();
    let dir = release(&keys, NEXT, &bin("stella-agent-next"), &[]);
    offer(&server, &dir, NEXT, &id);
    let sup = supervise(
        &agent,
        &[("STELLA_FAULT", "update-after-chunk")],
        &["STELLA_FAULT"],
    );
    let mut peak_rss_kib = 0u64;
    poll(Duration::from_secs(60), || {
        if let Ok(status) = fs::read_to_string(format!("/proc/{}/status", sup.pid())) {
            let rss = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok());
            peak_rss_kib = peak_rss_kib.max(rss.unwrap_or(0));
        }
        (server.agent(&id).version == NEXT).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "no update after the interrupted download:\n{}",
            sup.log_text()
        )
    });
    let log = sup.log_text();
    assert!(
        log.contains("resuming the download") && log.contains("from_byte=1048576"),
        "{log}"
    );
    assert!(sup.restarts.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    // Streaming: memory stays far below the artifact's size.
    if next_size > 32 << 20 {
        assert!(
            peak_rss_kib * 1024 < next_size / 2,
            "peak RSS {peak_rss_kib} KiB for a {next_size}-byte download"
        );
    }
}

#[test]
fn a_crash_at_each_step_leaves_a_runnable_agent() {
    let keys = Keys::new();
    let old = sha256(&bin("stella-agent"));
    let new = sha256(&bin("stella-agent-next"));
    for point in [
        "update-after-download",
        "update-after-verify",
        "update-after-link",
        "update-after-rename",
        "update-before-confirm",
    ] {
        let (server, agent, id) = setup(&keys, "5m");
        let dir = release(&keys, NEXT, &bin("stella-agent-next"), &[]);
        offer(&server, &dir, NEXT, &id);
        let sup = supervise(&agent, &[("STELLA_FAULT", point)], &["STELLA_FAULT"]);
        poll(DEADLINE * 2, || {
            (sup.restarts.load(std::sync::atomic::Ordering::SeqCst) >= 1).then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "{point}: the crash point was not reached:\n{}",
                sup.log_text()
            )
        });
        // At every instant after the crash, the install path holds the old or the new binary.
        let installed = sha256(&agent.binary);
        assert!(
            installed == old || installed == new,
            "{point}: the install path holds neither version"
        );
        // Restarted without the fault, it ends up committed on the new version.
        server.wait_for_agent(&id, "running after the crash", |a| {
            a.heartbeat_seq >= 1 && a.update.state != "probation"
        });
        let view = server.wait_for_agent(&id, "settled", |a| {
            a.version == NEXT && a.update.state == "idle"
        });
        assert_eq!(view.status, "active", "{point}");
        assert_eq!(sha256(&agent.binary), new, "{point}");
    }
}

#[test]
fn a_new_version_that_cannot_heartbeat_is_rolled_back() {
    let keys = Keys::new();
    let (server, agent, id) = setup(&keys, "4s");
    let original = sha256(&agent.binary);
    let dir = release(&keys, NEXT, &bin("stella-agent-next"), &[]);
    offer(&server, &dir, NEXT, &id);
    let sup = supervise(&agent, &[("STELLA_FAULT", "probation-no-heartbeat")], &[]);
    let view = wait_phase(&server, &id, "rolled_back", "probation window");
    assert_eq!(view.version, CURRENT);
    assert_eq!(sha256(&agent.binary), original, "the old binary is back");
    assert!(
        sup.log_text().contains("rolling back the update"),
        "{}",
        sup.log_text()
    );
    // The server stops offering the failed release: the agent stays put.
    let seq = view.heartbeat_seq;
    let later = server.wait_for_agent(&id, "heartbeating on", |a| a.heartbeat_seq > seq + 3);
    assert_eq!(later.version, CURRENT);
}

#[test]
fn a_crash_looping_new_version_is_rolled_back() {
    let keys = Keys::new();
    let (server, agent, id) = setup(&keys, "5m");
    let original = sha256(&agent.binary);
    let dir = release(&keys, NEXT, &bin("stella-agent-next"), &[]);
    offer(&server, &dir, NEXT, &id);
    let sup = supervise(&agent, &[("STELLA_FAULT", "probation-crash")], &[]);
    let view = wait_phase(&server, &id, "rolled_back", "started 4 times");
    assert_eq!(view.version, CURRENT);
    assert_eq!(sha256(&agent.binary), original);
    assert!(sup.restarts.load(std::sync::atomic::Ordering::SeqCst) >= 3);
}

#[test]
fn doctor_and_remediate_finish_an_interrupted_swap() {
    let keys = Keys::new();
    let (server, agent, id) = setup(&keys, "5m");
    let original = sha256(&agent.binary);
    let dir = release(&keys, NEXT, &bin("stella-agent-next"), &[]);
    offer(&server, &dir, NEXT, &id);
    let mut cmd = agent.command(&["run"]);
    // Killed between the rename and the start of the new version.
    cmd.env("STELLA_FAULT", "update-after-rename");
    let mut crashing = stella_tests::Proc::spawn(cmd, agent.dir.join("crash.log"));
    assert_eq!(
        crashing.wait_exit(DEADLINE * 2),
        Some(86),
        "{}",
        crashing.log_text()
    );
    let doctor = text(&run(&mut agent.command(&["doctor", "--json"]))).0;
    assert!(
        stella_tests::doctor_codes(&stella_tests::json(&doctor))
            .contains(&"update.integrity/interrupted".to_owned()),
        "{doctor}"
    );
    let out = run(&mut agent.command(&["remediate", "--json"]));
    let report = text(&out).0;
    assert!(
        report.contains(r#""action":"finish-rollback","applied":true"#),
        "{report}"
    );
    let doctor = text(&run(&mut agent.command(&["doctor", "--json"]))).0;
    assert!(
        stella_tests::doctor_codes(&stella_tests::json(&doctor))
            .contains(&"update.integrity/ok".to_owned()),
        "{doctor}"
    );
    assert_eq!(sha256(&agent.binary), original);
}
