//! Faults on the agent's host (issue "faults and hostile agents"): a full
//! disk under the state dir never stops the agent, a resumed download
//! cannot corrupt the staged file, and a release whose binary reports
//! another version than the one its statement signs is refused before the
//! swap. Full disks are small tmpfs mounts (the tests run as root); a test
//! that cannot mount one fails under `CI=true` instead of skipping.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use stella_tests::release::{Keys, NEXT, sha256, signed_release};
use stella_tests::{
    AgentDir, AgentView, DEADLINE, Proc, Server, ServerOptions, Supervisor, TempDir, bin, poll,
    run, skip_or_fail, text,
};

const CURRENT: &str = env!("CARGO_PKG_VERSION");

/// A tmpfs of a fixed size mounted over a directory, unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount` syntax: `1m`) over `dir`, mode 0700;
    /// `None` (after [`skip_or_fail`]) when this machine cannot.
    fn mount(test: &str, dir: &Path, size: &str) -> Option<Self> {
        fs::create_dir_all(dir).expect("mount point");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("tmpfs")
            .arg(dir)
            .stdin(std::process::Stdio::null())
            .output();
        let refused = match &mounted {
            Ok(out) if out.status.success() => None,
            Ok(out) => Some(text(out).1.trim().to_owned()),
            Err(e) => Some(format!("cannot run mount: {e}")),
        };
        if let Some(why) = refused {
            skip_or_fail(
                test,
                &format!("cannot mount a tmpfs for a full disk (needs root): {why}"),
            );
            return None;
        }
        Some(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// Changes the size of the mounted filesystem (more room, or less).
    fn resize(&self, size: &str) {
        let out = run(Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.dir));
        assert!(out.status.success(), "remount: {:?}", text(&out));
    }

    /// Fills the filesystem to the last byte with a file that
    /// [`Self::free`] removes again.
    fn fill(&self) {
        let mut file = fs::File::create(self.filler()).expect("filler");
        let block = [0u8; 4096];
        while file.write_all(&block).is_ok() {}
        let _ = file.sync_all();
    }

    fn free(&self) {
        fs::remove_file(self.filler()).expect("remove the filler");
    }

    fn filler(&self) -> PathBuf {
        self.dir.join("filler")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: a process that is still being reaped may hold it.
        let _ = run(Command::new("umount").arg("-l").arg(&self.dir));
    }
}

fn set_config(server: &Server, doc: &str) -> String {
    let dir = TempDir::new("config");
    let file = dir.join("config.json");
    fs::write(&file, doc).unwrap();
    let out = server.admin(&["config", "set", "--scope", "global", file.to_str().unwrap()]);
    assert!(out.status.success(), "config set: {:?}", text(&out));
    // "<scope> version N hash H"
    text(&out).0.split_whitespace().last().unwrap().to_owned()
}

fn canonical(doc: &str) -> String {
    stella_proto::config::canonical(&stella_proto::config::parse(doc).unwrap())
}

#[test]
fn a_full_disk_never_stops_the_agent() {
    let test = "faults::a_full_disk_never_stops_the_agent";
    let server = Server::start_with(ServerOptions {
        // Renewal retries are spaced by a share of the lifetime.
        cert_lifetime: "10m",
        ..ServerOptions::default()
    });
    let agent = AgentDir::new();
    let Some(disk) = Tmpfs::mount(test, &agent.state, "1m") else {
        return;
    };
    let id = agent.enroll(&server, "full-disk");
    let mut proc = agent.run();
    let good_doc = r#"{"log_level":"info"}"#;
    let good = set_config(&server, good_doc);
    server.wait_for_agent(&id, "on the first config", |a| {
        a.config_hash.as_deref() == Some(&good)
    });

    disk.fill();
    let full_at = server.agent(&id).heartbeat_seq;
    let next_doc = r#"{"doctor_interval":"10m","log_level":"debug"}"#;
    let next = set_config(&server, next_doc);
    // Reported, not applied, and the last good config kept.
    let refused = server.wait_for_agent(&id, "reporting the unwritable config", |a| {
        a.config_error.is_some()
    });
    let error = refused.config_error.clone().unwrap();
    assert!(
        error.contains("config.json") && error.contains("No space left on device"),
        "{error}"
    );
    assert_eq!(refused.config_hash.as_deref(), Some(good.as_str()));
    assert_eq!(
        fs::read_to_string(agent.file("config.json")).unwrap(),
        canonical(good_doc)
    );
    let shown = server.admin_ok(&["agents", "show", &id]);
    assert!(shown.contains("No space left on device"), "{shown}");
    // A renewal cannot write its next key either: retried, not fatal.
    let serial = refused.cert_serial;
    server.admin_ok(&["agents", "renew", &id]);
    poll(DEADLINE, || {
        proc.log_text()
            .contains("certificate renewal failed")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("no failed renewal on a full disk:\n{}", proc.log_text()));
    // Still heartbeating, on the full disk, with state.json unwritable.
    server.wait_for_agent(&id, "heartbeating on a full disk", |a| {
        a.heartbeat_seq > full_at + 3
    });
    let log = proc.log_text();
    assert!(log.contains("could not save state"), "{log}");
    assert!(
        proc.try_exit_code().is_none(),
        "the agent stopped on a full disk:\n{log}"
    );

    // Space is back: the config is applied and the certificate renewed,
    // without a restart.
    disk.free();
    let applied = server.wait_for_agent(&id, "on the new config", |a| {
        a.config_hash.as_deref() == Some(&next) && a.config_error.is_none()
    });
    assert_eq!(
        fs::read_to_string(agent.file("config.json")).unwrap(),
        canonical(next_doc)
    );
    let status = text(&run(&mut agent.command(&["status", "--json"]))).0;
    assert!(status.contains(&next), "{status}");
    let renewed = server.wait_for_agent(&id, "renewed", |a| a.cert_serial != serial);
    assert!(renewed.heartbeat_seq >= applied.heartbeat_seq);
    assert!(
        proc.try_exit_code().is_none(),
        "the agent stopped:\n{}",
        proc.log_text()
    );
}

/// A server, and an agent installed from the current build (updates
/// replace its copy), not enrolled yet.
fn setup_update() -> (Server, AgentDir) {
    (Server::start(), AgentDir::installed(&bin("stella-agent")))
}

/// Enrolls `agent`, pinning the release key of `keys`; returns its id.
fn enroll_updater(server: &Server, agent: &AgentDir, keys: &Keys) -> String {
    let token = server.token(&[]);
    let out = agent.bootstrap(
        server,
        &token,
        &[
            "--name",
            "updater",
            "--release-key",
            keys.public().to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{:?}", text(&out));
    text(&out).0.trim().to_owned()
}

fn offer(server: &Server, dir: &TempDir, version: &str, id: &str) {
    stella_tests::release::import(server, dir);
    server.admin_ok(&["agents", "update", id, "--release", version]);
}

/// The part file of the download in progress, if there is one.
fn staged_part(agent: &AgentDir) -> Option<PathBuf> {
    fs::read_dir(agent.file("staging"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "part"))
}

/// The `from_byte` of the last "resuming the download" line of a log.
fn resumed_from(log: &str) -> Option<u64> {
    log.lines()
        .rev()
        .filter(|l| l.contains("resuming the download"))
        .filter_map(|l| l.split("from_byte=").nth(1))
        .find_map(|v| v.split_whitespace().next()?.parse().ok())
}

#[test]
fn a_download_interrupted_by_a_full_disk_resumes_without_corruption() {
    let test = "faults::a_download_interrupted_by_a_full_disk_resumes_without_corruption";
    let keys = Keys::new();
    let (server, agent) = setup_update();
    // Room for the identity and two 1 MiB chunks, not for the artifact.
    let Some(disk) = Tmpfs::mount(test, &agent.state, "3m") else {
        return;
    };
    let id = enroll_updater(&server, &agent, &keys);
    let dir = signed_release(&keys, NEXT, &bin("stella-agent-next"), &[]);
    offer(&server, &dir, NEXT, &id);
    let mut first = agent.run();
    let view = server.wait_for_agent(&id, "reporting the full disk", |a| {
        a.update.state == "downloading"
            && a.update
                .error
                .as_deref()
                .is_some_and(|e| e.contains("No space left on device"))
    });
    assert_eq!(view.update.version, NEXT);
    // Killed while the disk is full: the part file holds only whole,
    // hashed bytes (a failed write is cut off again).
    first.kill();
    let held = fs::metadata(staged_part(&agent).expect("a part file"))
        .unwrap()
        .len();
    assert!(held > 0, "nothing was staged:\n{}", first.log_text());
    let mut second = agent.run();
    poll(DEADLINE, || resumed_from(&second.log_text()))
        .unwrap_or_else(|| panic!("the restarted agent did not resume:\n{}", second.log_text()));
    assert_eq!(
        resumed_from(&second.log_text()),
        Some(held),
        "the resume offset is not the staged file's length"
    );
    // Space is back: the download completes, matches its digest and installs.
    disk.resize("256m");
    poll(Duration::from_secs(90), || {
        let a = server.agent(&id);
        (a.version == NEXT && a.update.state == "idle").then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "no update after space came back: {:?}\n{}",
            server.agent(&id),
            second.log_text()
        )
    });
    assert_eq!(sha256(&agent.binary), sha256(&bin("stella-agent-next")));
    let log = second.log_text();
    assert!(!log.contains("does not match"), "{log}");
    second.kill();
}

#[test]
fn a_resumed_download_that_does_not_match_is_fetched_again_from_zero() {
    let keys = Keys::new();
    let (server, agent) = setup_update();
    let id = enroll_updater(&server, &agent, &keys);
    let dir = signed_release(&keys, NEXT, &bin("stella-agent-next"), &[]);
    offer(&server, &dir, NEXT, &id);
    // Stopped after its first chunk...
    let mut cmd = agent.command(&["run"]);
    cmd.env("STELLA_FAULT", "update-after-chunk");
    let mut first = Proc::spawn(cmd, agent.dir.join("first.log"));
    assert_eq!(
        first.wait_exit(DEADLINE * 2),
        Some(86),
        "{}",
        first.log_text()
    );
    // ...and the staged bytes damaged while it was down.
    let part = staged_part(&agent).expect("a part file");
    let mut bytes = fs::read(&part).unwrap();
    assert!(!bytes.is_empty());
    bytes[100] ^= 0xff;
    fs::write(&part, &bytes).unwrap();
    let mut second = agent.run();
    poll(Duration::from_secs(90), || {
        let a = server.agent(&id);
        (a.version == NEXT && a.update.state == "idle").then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "no update after the damaged resume: {:?}\n{}",
            server.agent(&id),
            second.log_text()
        )
    });
    let log = second.log_text();
    assert_eq!(resumed_from(&log), Some(bytes.len() as u64), "{log}");
    assert!(
        log.contains("the resumed download does not match the signed release; downloading it again from the start"),
        "{log}"
    );
    assert_eq!(sha256(&agent.binary), sha256(&bin("stella-agent-next")));
    second.kill();
}

#[test]
fn a_resumed_download_is_retried_from_zero_once_and_the_failure_says_so() {
    let keys = Keys::new();
    let (server, agent) = setup_update();
    let id = enroll_updater(&server, &agent, &keys);
    let original = sha256(&agent.binary);
    let dir = signed_release(&keys, NEXT, &bin("stella-agent-next"), &[]);
    offer(&server, &dir, NEXT, &id);
    // The served artifact is damaged past the first chunk (same size).
    let blob = server
        .data
        .join("blobs/sha256")
        .join(sha256(&bin("stella-agent-next")));
    let mut bytes = fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&blob, bytes).unwrap();
    let mut cmd = agent.command(&["run"]);
    cmd.env("STELLA_FAULT", "update-after-chunk");
    let mut first = Proc::spawn(cmd, agent.dir.join("first.log"));
    assert_eq!(
        first.wait_exit(DEADLINE * 2),
        Some(86),
        "{}",
        first.log_text()
    );
    let mut second = agent.run();
    let view = poll(Duration::from_secs(90), || {
        Some(server.agent(&id)).filter(|a| a.update.state == "failed")
    })
    .unwrap_or_else(|| {
        panic!(
            "the damaged release never failed: {:?}\n{}",
            server.agent(&id),
            second.log_text()
        )
    });
    let error = view.update.error.unwrap_or_default();
    assert!(
        error.contains("fetched in one piece from byte 0")
            && error.contains("the signed release says")
            && error.contains("an earlier, resumed download of it did not match either"),
        "{error}"
    );
    let log = second.log_text();
    assert_eq!(
        log.matches("downloading it again from the start").count(),
        1,
        "{log}"
    );
    assert_eq!(view.version, CURRENT);
    assert_eq!(sha256(&agent.binary), original);
    assert!(staged_part(&agent).is_none());
    second.kill();
}

fn supervise(agent: &AgentDir) -> Supervisor {
    let binary = agent.binary.clone();
    let state = agent.state.clone();
    Supervisor::start(
        move || {
            let mut cmd = Command::new(&binary);
            cmd.arg("run").arg("--state-dir").arg(&state);
            cmd
        },
        &[],
        agent.dir.join("supervised.log"),
    )
}

fn wait_failed(server: &Server, id: &str) -> AgentView {
    server.wait_for_agent(id, "reporting the failed update", |a| {
        a.update.state == "failed"
    })
}

#[test]
fn a_binary_that_is_not_the_signed_version_is_refused_before_the_swap() {
    let keys = Keys::new();
    let (server, agent) = setup_update();
    let id = enroll_updater(&server, &agent, &keys);
    let original = sha256(&agent.binary);
    // Signed as 0.3.0, but the binary reports 0.2.0.
    let claimed = "0.3.0";
    let dir = signed_release(&keys, claimed, &bin("stella-agent-next"), &[]);
    offer(&server, &dir, claimed, &id);
    let sup = supervise(&agent);
    let view = wait_failed(&server, &id);
    let error = view.update.error.clone().unwrap_or_default();
    let target = stella_tests::release::native_target();
    assert!(
        error.contains(&format!("reports \"stella-agent {NEXT} {target}\""))
            && error.contains(&format!(
                "the signed release is stella-agent {claimed} {target}"
            )),
        "{error}"
    );
    assert_eq!(view.update.version, claimed);
    assert_eq!(view.version, CURRENT);
    // No swap, no probation: the old binary in place, nothing kept aside.
    assert_eq!(
        sha256(&agent.binary),
        original,
        "the installed binary changed"
    );
    assert!(!agent.binary.with_file_name("stella-agent.prev").exists());
    assert!(!agent.binary.with_file_name(".stella-agent.new").exists());
    assert!(staged_part(&agent).is_none());
    let log = sup.log_text();
    assert!(!log.contains("probation"), "{log}");
    assert_eq!(sup.restarts.load(std::sync::atomic::Ordering::SeqCst), 0);
    // Still heartbeating on the old version; the release is not tried again.
    let seq = view.heartbeat_seq;
    let later = server.wait_for_agent(&id, "heartbeating on", |a| a.heartbeat_seq > seq + 3);
    assert_eq!(later.version, CURRENT);
    assert_eq!(later.update.state, "failed");
}
