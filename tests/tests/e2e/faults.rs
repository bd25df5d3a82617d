//! Faults on the agent's and the server's hosts (issue "faults and hostile
//! agents"): a full disk under the server's data dir does not poison its
//! store, a full disk under the state dir never stops the agent, a resumed download
//! cannot corrupt the staged file, and a release whose binary reports
//! another version than the one its statement signs is refused before the
//! swap. Full disks are small tmpfs mounts (the tests run as root); a test
//! that cannot mount one fails under `CI=true` instead of skipping.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use stella_tests::release::{Keys, NEXT, enroll_pinning, sha256, signed_release};
use stella_tests::{
    AgentDir, AgentView, DEADLINE, Proc, Server, ServerOptions, TempDir, bin, json, json_str, poll,
    raw, run, skip_or_fail, text,
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
    enroll_pinning(agent, server, keys, &[], "updater")
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
    let sup = agent.supervise();
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

/// A server whose data dir is a tmpfs of `size`: initialized on the usual
/// disk, stopped, moved onto the tmpfs, and started again.
fn server_on_tmpfs(test: &str, size: &str) -> Option<(Server, Tmpfs)> {
    let mut server = Server::start();
    server.kill();
    let saved = server.dir.join("data-saved");
    let copy = |from: &Path, to: &Path| {
        fs::create_dir_all(to).unwrap();
        let out = run(Command::new("cp").arg("-a").arg(from.join(".")).arg(to));
        assert!(out.status.success(), "cp: {:?}", text(&out));
    };
    copy(&server.data, &saved);
    let disk = Tmpfs::mount(test, &server.data, size)?;
    copy(&saved, &server.data);
    server.serve(&ServerOptions::default());
    Some((server, disk))
}

const TOKEN_BODY: &str = r#"{"ttl_ms":600000,"uses":1,"labels":{}}"#;

/// An admin request over raw HTTPS: its answer.
fn admin_request(server: &Server, method: &str, path: &str, body: &str) -> raw::Answer {
    let auth = format!("Bearer {}", server.admin_token);
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let config = raw::tls_config(server, None);
    raw::exchange(
        server,
        &config,
        None,
        &raw::request(method, path, &headers, body.as_bytes()),
    )
    .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn metric(server: &Server, name: &str) -> u64 {
    let (status, body) = server.client().get("/metrics");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{body}"))
}

#[test]
fn a_full_disk_does_not_poison_the_server() {
    let test = "faults::a_full_disk_does_not_poison_the_server";
    let Some((mut server, disk)) = server_on_tmpfs(test, "16m") else {
        return;
    };
    let agent = AgentDir::new();
    let id = agent.enroll(&server, "on-a-full-server");
    let _proc = agent.run();
    server.wait_for_agent(&id, "heartbeating", |a| a.heartbeat_seq >= 2);
    assert_eq!(metric(&server, "stella_store_errors_total"), 0);

    disk.fill();
    // redb may still have room in its file for a write or two: tokens are
    // created until one fails; each that was acknowledged must survive.
    let mut acknowledged = Vec::new();
    let refused = (0..200)
        .find_map(|_| {
            let answer = admin_request(&server, "POST", "/v1/admin/tokens", TOKEN_BODY);
            if answer.status == 201 {
                let token = json_str(&json(&answer.body), "token").unwrap().to_owned();
                acknowledged.push(token);
                return None;
            }
            Some(answer)
        })
        .expect("a full disk never refused a write");
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(refused.is_json_error(), "{refused:?}");
    assert!(
        refused.body.contains("cannot be written now"),
        "{refused:?}"
    );

    // Said where an operator looks.
    let (status, health) = server.client().get("/healthz");
    assert_eq!(status, 503, "{health}");
    assert!(health.contains("store"), "{health}");
    assert!(metric(&server, "stella_store_errors_total") > 0);
    assert_eq!(metric(&server, "stella_store_writable"), 0);

    // A revoke that cannot be written is refused, and nothing changed.
    let out = server.admin(&["agents", "revoke", &id]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("503") && stderr.contains("nothing was changed"),
        "{stderr}"
    );
    assert_eq!(server.agent(&id).status, "active");
    let seq = server.agent(&id).heartbeat_seq;
    server.wait_for_agent(&id, "heartbeating on a full disk", |a| {
        a.heartbeat_seq > seq + 2
    });

    // Room again: the server recovers by itself, without a restart.
    disk.free();
    poll(DEADLINE, || {
        (server.client().get("/healthz").0 == 200).then_some(())
    })
    .unwrap_or_else(|| panic!("/healthz never recovered:\n{}", server.proc.log_text()));
    assert_eq!(metric(&server, "stella_store_writable"), 1);
    let revoked = server.admin_ok(&["agents", "revoke", &id]);
    assert!(revoked.contains("revoked"), "{revoked}");
    let token = server.token(&[]);

    // Everything acknowledged is durable: after a restart the revoke holds
    // and every acknowledged token still enrolls.
    server.kill();
    server.serve(&ServerOptions::default());
    assert_eq!(server.agent(&id).status, "revoked");
    for (n, token) in acknowledged.iter().chain([&token]).enumerate() {
        let other = AgentDir::new();
        let out = other.bootstrap(&server, token, &["--name", &format!("later-{n}")]);
        assert!(out.status.success(), "token {token}: {:?}", text(&out));
    }
}

/// A heartbeat with one field replaced by `value` (JSON).
fn heartbeat_with(field: &str, value: &str) -> String {
    let mut fields = vec![
        ("version", r#""1.0.0""#.to_owned()),
        ("config_error", "null".to_owned()),
        (
            "doctor",
            r#"{"pass":0,"warn":0,"fail":0,"skip":0,"failing":[]}"#.to_owned(),
        ),
        (
            "update",
            r#"{"state":"idle","version":"1.0.0","error":null}"#.to_owned(),
        ),
        ("capabilities", "[]".to_owned()),
    ];
    for (name, v) in &mut fields {
        if *name == field {
            *v = value.to_owned();
        }
    }
    let rest: Vec<String> = fields
        .iter()
        .map(|(name, v)| format!("\"{name}\":{v}"))
        .collect();
    format!(
        r#"{{"seq":1,"uptime_s":1,"config_hash":"","config_drift":false,{}}}"#,
        rest.join(",")
    )
}

#[test]
fn an_enrolled_agent_cannot_drive_the_operators_terminal() {
    let server = Server::start_with(ServerOptions {
        heartbeat_interval: "1h",
        ..ServerOptions::default()
    });
    let agent = AgentDir::new();
    let id = agent.enroll(&server, "liar");
    let tls = raw::tls_config(
        &server,
        Some((&agent.file("agent.pem"), &agent.file("agent.key"))),
    );
    let send = |body: &str| {
        raw::exchange(
            &server,
            &tls,
            None,
            &raw::json_post("/v1/agents/heartbeat", &[], body),
        )
        .expect("an answer")
    };
    let ok = send(&heartbeat_with("version", r#""1.0.1""#));
    assert_eq!(ok.status, 200, "{ok:?}");

    let long = "9".repeat(5000);
    let osc = r#""1.0\u001b]0;pwned\u0007""#;
    let cases: [(&str, String, &str); 9] = [
        ("version", osc.to_owned(), "version"),
        ("version", format!("\"{long}\""), "version"),
        ("version", r#""1.0\u0000""#.to_owned(), "version"),
        ("capabilities", format!("[{osc}]"), "capabilities"),
        ("capabilities", format!("[\"{long}\"]"), "capabilities"),
        (
            "config_error",
            r#"{"hash":"h","error":"bad\u001b[2J"}"#.to_owned(),
            "config_error.error",
        ),
        (
            "update",
            r#"{"state":"failed","version":"2.0.0","error":"no\u009b2J"}"#.to_owned(),
            "update.error",
        ),
        (
            "update",
            format!(r#"{{"state":"idle","version":{osc},"error":null}}"#),
            "update.version",
        ),
        (
            "doctor",
            r#"{"pass":0,"warn":0,"fail":1,"skip":0,"failing":["disk\u0007"]}"#.to_owned(),
            "doctor.failing",
        ),
    ];
    for (field, value, named) in &cases {
        let answer = send(&heartbeat_with(field, value));
        assert_eq!(answer.status, 400, "{field}={value}: {answer:?}");
        assert!(answer.is_json_error(), "{answer:?}");
        assert!(
            answer.body.contains(&format!("invalid {named} ")),
            "{field}: the error names {named}: {answer:?}"
        );
        assert!(answer.body.len() < 600, "{answer:?}");
    }
    // Nothing of it was taken: what operators see is the last good heartbeat.
    let view = server.agent(&id);
    assert_eq!(view.version, "1.0.1");
    assert!(view.capabilities.is_empty());
    for args in [
        &["agents", "list"][..],
        &["agents", "show", &id],
        &["drift"],
        &["release", "list"],
        &["rollout", "list"],
    ] {
        let out = server.admin_ok(args);
        assert!(
            !out.chars().any(|c| c.is_control() && c != '\n'),
            "{args:?}: {out:?}"
        );
    }
}

#[test]
fn rollout_plans_and_release_directories_are_checked() {
    let server = Server::start();
    let keys = Keys::new();
    let release = signed_release(&keys, NEXT, &bin("stella-agent"), &[]);
    let target = stella_tests::release::native_target();

    // The target directory of a release is a link to another one.
    let linked = TempDir::new("linked-release");
    fs::copy(
        release.join("release.dsse.json"),
        linked.join("release.dsse.json"),
    )
    .unwrap();
    std::os::unix::fs::symlink(release.join(target), linked.join(target)).unwrap();
    // And the release directory itself is a link.
    let whole = TempDir::new("whole-link");
    let link = whole.join("release");
    std::os::unix::fs::symlink(release.path(), &link).unwrap();
    for dir in [linked.path(), link.as_path()] {
        let out = server.admin(&["release", "import", dir.to_str().unwrap()]);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{dir:?}: {stdout}{stderr}");
        assert!(stderr.contains("symlink"), "{dir:?}: {stderr}");
    }
    for dir in ["/", "relative/dir", "/nonexistent/release"] {
        let body = format!(r#"{{"dir":"{dir}"}}"#);
        let answer = admin_request(&server, "POST", "/v1/admin/releases", &body);
        assert_eq!(answer.status, 400, "{dir}: {answer:?}");
        assert!(answer.is_json_error(), "{answer:?}");
    }
    let answer = admin_request(
        &server,
        "POST",
        "/v1/admin/releases",
        &format!(r#"{{"dir":"{}"}}"#, linked.path().display()),
    );
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(
        server
            .admin_ok(&["release", "list"])
            .contains("no releases")
    );
    server.admin_ok(&["release", "import", release.path().to_str().unwrap()]);

    // Plans refused by the CLI (usage: exit 2, one line) and by the API.
    let bad = [
        ("1e2", "10m"),
        ("12.5,100", "10m"),
        ("0x10,100", "10m"),
        ("50,10,100", "10m"),
        ("50,50,100", "10m"),
        ("50,count:1,100", "10m"),
        ("100", "31d"),
    ];
    for (stages, soak) in bad {
        let out = server.admin(&[
            "rollout",
            "start",
            "--release",
            NEXT,
            "--stages",
            stages,
            "--soak",
            soak,
        ]);
        let (stdout, stderr) = text(&out);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{stages} {soak}: {stdout}{stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
    let api_bad = [
        (r#"["1e2"]"#, 600_000u64),
        (r#"["12.5","100"]"#, 600_000),
        (r#"["50","10","100"]"#, 600_000),
        (r#"["100"]"#, u64::MAX),
        (r#"["100"]"#, 31 * 86_400_000),
    ];
    for (stages, soak_ms) in api_bad {
        let body = format!(
            r#"{{"release":"{NEXT}","stages":{stages},"soak_ms":{soak_ms},"max_failures":0.05,"selector":{{}}}}"#
        );
        let answer = admin_request(&server, "POST", "/v1/admin/rollouts", &body);
        assert_eq!(answer.status, 400, "{stages} {soak_ms}: {answer:?}");
        assert!(answer.is_json_error(), "{answer:?}");
    }
    assert!(
        server
            .admin_ok(&["rollout", "list"])
            .contains("no rollouts")
    );
    let id = server.admin_ok(&[
        "rollout",
        "start",
        "--release",
        NEXT,
        "--stages",
        "count:1,10,50%,100",
        "--soak",
        "30d",
    ]);
    assert!(!id.trim().is_empty());
}

#[test]
fn leaf_certificates_say_they_are_leaves() {
    let server = Server::start();
    let agent = AgentDir::new();
    agent.enroll(&server, "leaf");
    for pem in [server.data.join("server.pem"), agent.file("agent.pem")] {
        let out = stella_tests::tool(
            "openssl",
            &["x509", "-noout", "-text", "-in", pem.to_str().unwrap()],
        );
        let (shown, stderr) = text(&out);
        assert!(out.status.success(), "{stderr}");
        let after = |heading: &str| {
            let at = shown
                .find(heading)
                .unwrap_or_else(|| panic!("{pem:?} has no {heading}:\n{shown}"));
            shown[at + heading.len()..]
                .lines()
                .nth(1)
                .unwrap_or("")
                .trim()
                .to_owned()
        };
        assert_eq!(
            after("X509v3 Basic Constraints: critical"),
            "CA:FALSE",
            "{pem:?}"
        );
        assert!(
            !after("X509v3 Subject Key Identifier:").is_empty(),
            "{pem:?}"
        );
        assert!(
            !after("X509v3 Authority Key Identifier:").is_empty(),
            "{pem:?}"
        );
        // And they verify against the CA, as before.
        let out = stella_tests::tool(
            "openssl",
            &[
                "verify",
                "-CAfile",
                server.ca_pem().to_str().unwrap(),
                pem.to_str().unwrap(),
            ],
        );
        assert!(out.status.success(), "{pem:?}: {:?}", text(&out));
    }
}

#[test]
fn the_heartbeat_timeout_clock_starts_when_the_server_does() {
    let opts = ServerOptions {
        heartbeat_interval: "1s",
        heartbeat_misses: 2,
        ..ServerOptions::default()
    };
    let mut server = Server::start_with(opts.clone());
    let agent = AgentDir::new();
    let id = agent.enroll(&server, "patient");
    let mut proc = agent.run();
    server.wait_for_agent(&id, "heartbeating", |a| a.heartbeat_seq >= 2);
    // The agent falls silent with the server: its last heartbeat is older
    // than the timeout by far when the server comes back.
    proc.kill();
    server.kill();
    std::thread::sleep(Duration::from_secs(5));
    let started = std::time::Instant::now();
    server.serve(&opts);
    let view = server.agent(&id);
    assert_eq!(
        (view.status.as_str(), view.reason.map(|r| r.as_str())),
        ("active", None),
        "marked inactive at start-up for heartbeats it could not send ({:?} after the start)",
        started.elapsed()
    );
    // Then the usual timeout, counted from the start: two intervals.
    let inactive = server.wait_for_agent(&id, "timed out", |a| a.status == "inactive");
    assert_eq!(
        inactive.reason.map(|r| r.as_str()),
        Some("heartbeat_timeout")
    );
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "timed out {:?} after the start",
        started.elapsed()
    );
}

#[test]
fn sigterm_finishes_requests_flushes_heartbeats_and_exits_0() {
    let opts = ServerOptions::default();
    let mut server = Server::start_with(opts.clone());
    let agent = AgentDir::new();
    let id = agent.enroll(&server, "steady");
    let mut proc = agent.run();
    server.wait_for_agent(&id, "heartbeating", |a| a.heartbeat_seq >= 3);
    proc.kill();
    // What the server holds in memory now; at most a second of it is in the
    // store yet.
    let last = server.agent(&id).heartbeat_seq;

    // A request in flight: its head and half its body sent.
    let config = raw::tls_config(&server, None);
    let mut stream = raw::tls(&server, &config, None).expect("connect");
    let auth = format!("Bearer {}", server.admin_token);
    let bytes = raw::json_post("/v1/admin/tokens", &[("authorization", &auth)], TOKEN_BODY);
    let (first, rest) = bytes.split_at(bytes.len() - 10);
    stream.write_all(first).unwrap();
    stream.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let term = run(Command::new("kill").args(["-TERM", &server.proc.pid().to_string()]));
    assert!(term.status.success(), "{:?}", text(&term));
    // No new connections...
    let refused = poll(DEADLINE, || {
        std::net::TcpStream::connect(raw::addr(&server)).err()
    });
    assert!(
        refused.is_some(),
        "still accepting after SIGTERM:\n{}",
        server.proc.log_text()
    );
    // ...but the request in flight is answered.
    stream.write_all(rest).unwrap();
    stream.flush().unwrap();
    let answer = raw::read_answer(&mut stream).expect("the answer to the request in flight");
    assert_eq!(answer.status, 201, "{answer:?}");
    let token = json_str(&json(&answer.body), "token").unwrap().to_owned();
    assert_eq!(
        server.proc.wait_exit(DEADLINE),
        Some(0),
        "{}",
        server.proc.log_text()
    );
    let log = server.proc.log_text();
    assert!(log.contains("msg=stopped"), "{log}");

    // The heartbeat batch was written, and the token answered is real.
    server.serve(&opts);
    assert_eq!(server.agent(&id).heartbeat_seq, last);
    let out = AgentDir::new().bootstrap(&server, &token, &["--name", "after-stop"]);
    assert!(out.status.success(), "{:?}", text(&out));
}

#[test]
fn wrong_admin_tokens_are_rate_limited_per_source() {
    let server = Server::start();
    let config = raw::tls_config(&server, None);
    let call = |source: [u8; 4], token: &str| {
        let auth = format!("Bearer {token}");
        raw::exchange(
            &server,
            &config,
            Some(source.into()),
            &raw::request("GET", "/v1/admin/agents", &[("authorization", &auth)], b""),
        )
        .expect("an answer")
    };
    let guesser = [127, 0, 0, 7];
    let statuses: Vec<u16> = (0..10)
        .map(|i| call(guesser, &format!("guess{i}")).status)
        .collect();
    assert!(statuses.iter().all(|s| *s == 401), "{statuses:?}");
    let braked = call(guesser, "guess10");
    assert_eq!(braked.status, 429, "{braked:?}");
    assert!(braked.is_json_error(), "{braked:?}");
    let wait: u64 = braked
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("429 without Retry-After: {braked:?}"));
    assert!((1..=60).contains(&wait), "{wait}");
    // The right token from that source is braked too: a 200 would tell a
    // guesser it has won.
    assert_eq!(call(guesser, &server.admin_token).status, 429);
    // Another source is not.
    assert_eq!(call([127, 0, 0, 8], &server.admin_token).status, 200);
    assert!(metric(&server, "stella_rate_limited_total") >= 2);
}
