//! Deployment tasks on the agent (docs/design.md section 16): a file task
//! reaching two agents by selector, container tasks deploying, replacing and
//! failing a health check with real podman (runc, a test-local storage), and
//! every refusal — unsigned, wrong key, altered payload, expired, replayed,
//! not in the audience, type not in the capabilities — with nothing run and
//! the reason in `task show --json`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use miniserde::json::Value;
use stella_proto::dsse::{self, SigningKey};
use stella_proto::task::PAYLOAD_TYPE;
use stella_tests::release::Keys;
use stella_tests::{
    AgentDir, DEADLINE, Proc, Server, TempDir, json, json_at, json_str, on_path, poll, run,
    skip_or_fail, text, tool,
};

/// An RFC 3339 time `secs` from now.
fn in_secs(secs: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    stella_proto::time::rfc3339((now + secs) as u64)
}

/// Signs `task` (JSON) with `key` into a file in `dir`; returns its path.
fn sign(dir: &TempDir, key: &Path, task: &str, name: &str) -> PathBuf {
    let key = SigningKey::from_pem(&fs::read_to_string(key).unwrap()).unwrap();
    let envelope = dsse::sign(&key, PAYLOAD_TYPE, task.as_bytes());
    let path = dir.join(&format!("{name}.dsse.json"));
    fs::write(&path, envelope.to_json()).unwrap();
    path
}

/// `task create FILE`: the server's task id.
fn create(server: &Server, envelope: &Path) -> String {
    let out = server.admin_ok(&["task", "create", envelope.to_str().unwrap()]);
    out.split_whitespace().next().unwrap_or_default().to_owned()
}

/// `task show ID --json`.
fn show(server: &Server, id: &str) -> Value {
    json(&server.admin_ok(&["task", "show", id, "--json"]))
}

/// The result `agent` reported for task `id`, once it is final.
fn final_result(server: &Server, id: &str, agent: &str) -> Value {
    let found = poll(DEADLINE * 2, || {
        let view = show(server, id);
        let Some(Value::Array(results)) = json_at(&view, "results") else {
            return None;
        };
        results
            .iter()
            .find(|r| {
                json_str(r, "agent") == Some(agent)
                    && !matches!(json_str(r, "status"), Some("running") | None)
            })
            .cloned()
    });
    found.unwrap_or_else(|| {
        panic!(
            "no final result of {agent} for task {id}: {:?}",
            show(server, id)
        )
    })
}

fn status_and_reason(result: &Value) -> (String, String) {
    (
        json_str(result, "status").unwrap_or_default().to_owned(),
        json_str(result, "reason").unwrap_or_default().to_owned(),
    )
}

/// A deploy key pair, a server, and agents enrolled with it pinned.
struct Fleet {
    server: Server,
    keys: Keys,
    dir: TempDir,
}

impl Fleet {
    fn new() -> Self {
        Fleet {
            server: Server::start(),
            keys: Keys::new(),
            dir: TempDir::new("tasks"),
        }
    }

    /// Enrolls an agent with `labels` pinning the deploy key.
    fn enroll(&self, name: &str, labels: &[&str]) -> (AgentDir, String) {
        let agent = AgentDir::new();
        let token = self.server.token(&[]);
        let key = self.keys.public();
        let mut args = vec!["--name", name, "--deploy-key", key.to_str().unwrap()];
        for label in labels {
            args.extend(["--label", label]);
        }
        let out = agent.bootstrap(&self.server, &token, &args);
        assert!(out.status.success(), "{:?}", text(&out));
        let id = text(&out).0.trim().to_owned();
        (agent, id)
    }

    fn sign(&self, task: &str, name: &str) -> PathBuf {
        sign(&self.dir, &self.keys.private(), task, name)
    }
}

/// Starts `stella-agent run` with extra environment.
fn start(agent: &AgentDir, env: &[(&str, &str)]) -> Proc {
    let mut cmd = agent.command(&["run"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let n = fs::read_dir(agent.dir.path()).map_or(0, |d| d.count());
    Proc::spawn(cmd, agent.dir.join(&format!("agent-{n}.log")))
}

fn file_task(id: &str, audience: &str, path: &Path, content_base64: &str) -> String {
    file_task_until(id, audience, path, content_base64, &in_secs(3600))
}

fn file_task_until(
    id: &str,
    audience: &str,
    path: &Path,
    content_base64: &str,
    not_after: &str,
) -> String {
    format!(
        r#"{{"id":"{id}","type":"file","not_after":"{not_after}","audience":{audience},"path":"{}","content_base64":"{content_base64}","mode":"0640"}}"#,
        path.display()
    )
}

#[test]
fn a_file_task_reaches_two_agents_by_selector_and_both_write_the_file() {
    let fleet = Fleet::new();
    let (web1, id1) = fleet.enroll("web1", &["role=web"]);
    let (web2, id2) = fleet.enroll("web2", &["role=web"]);
    let (db, id_db) = fleet.enroll("db", &["role=db"]);
    let _procs: Vec<Proc> = [&web1, &web2, &db].iter().map(|a| start(a, &[])).collect();
    let target = fleet.dir.join("motd");
    // With `cargo xtask sign-task`, as an operator signs offline.
    let task = fleet.dir.join("motd.json");
    fs::write(
        &task,
        file_task(
            "motd-1",
            r#"{"selector":{"role":"web"}}"#,
            &target,
            "aGVsbG8K",
        ),
    )
    .unwrap();
    let signed = fleet.dir.join("motd.dsse.json");
    let out = run(Command::new(stella_tests::bin("xtask"))
        .args(["sign-task", "--key"])
        .arg(fleet.keys.private())
        .arg(&task)
        .arg("--out")
        .arg(&signed));
    assert!(out.status.success(), "sign-task: {:?}", text(&out));
    let id = create(&fleet.server, &signed);
    for agent in [&id1, &id2] {
        let result = final_result(&fleet.server, &id, agent);
        assert_eq!(
            status_and_reason(&result).0,
            "succeeded",
            "{agent}: {result:?}"
        );
    }
    // Both agents wrote the same path (one host here): the second one found
    // it in place already, or wrote it again; the content is whole.
    assert_eq!(fs::read(&target).unwrap(), b"hello\n");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&target).unwrap().permissions().mode() & 0o777,
        0o640
    );
    let view = show(&fleet.server, &id);
    let Some(Value::Array(results)) = json_at(&view, "results") else {
        panic!("{view:?}");
    };
    assert!(
        results.iter().all(|r| json_str(r, "agent") != Some(&id_db)),
        "the db agent is not in the audience: {view:?}"
    );
    assert_eq!(json_str(&view, "status"), Some("succeeded"), "{view:?}");
    // The journal remembers the task by its signed id.
    let journal = fs::read_to_string(web1.file("tasks.json")).unwrap();
    assert!(journal.contains("\"motd-1\""), "{journal}");

    // The same content again, in a new task: nothing to write.
    let again = fleet.sign(
        &file_task(
            "motd-2",
            &format!(r#"{{"agents":["{id1}"]}}"#),
            &target,
            "aGVsbG8K",
        ),
        "motd-2",
    );
    let again = create(&fleet.server, &again);
    let (status, reason) = status_and_reason(&final_result(&fleet.server, &again, &id1));
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("succeeded", "unchanged")
    );
}

#[test]
fn the_deploy_key_defaults_to_the_release_key() {
    let fleet = Fleet::new();
    let agent = AgentDir::new();
    stella_tests::release::enroll_pinning(&agent, &fleet.server, &fleet.keys, &[], "plain");
    let key = fleet.keys.public();
    assert_eq!(
        fs::read_to_string(agent.file("deploy-key.pub")).unwrap(),
        fs::read_to_string(&key).unwrap()
    );
    let status = json(&text(&run(&mut agent.command(&["status", "--json"]))).0);
    let fingerprint = json_str(&status, "deploy_key")
        .unwrap_or_default()
        .to_owned();
    assert!(fingerprint.starts_with("sha256:"), "{status:?}");
    // And an agent without either key refuses every task.
    let bare = AgentDir::new();
    let id = bare.enroll(&fleet.server, "bare");
    let _proc = start(&bare, &[]);
    let target = fleet.dir.join("bare");
    let task = fleet.sign(
        &file_task(
            "bare-1",
            &format!(r#"{{"agents":["{id}"]}}"#),
            &target,
            "aGkK",
        ),
        "bare",
    );
    let task = create(&fleet.server, &task);
    let (status, reason) = status_and_reason(&final_result(&fleet.server, &task, &id));
    assert_eq!(status, "refused", "{reason}");
    assert!(reason.contains("no deploy key is pinned"), "{reason}");
    assert!(!target.exists());
}

#[test]
fn refused_tasks_run_nothing_and_say_why() {
    let fleet = Fleet::new();
    let (web, id) = fleet.enroll("web", &["role=web"]);
    // The server knows this agent as role=web; the labels the agent pinned
    // at enrollment say otherwise, as if the server had relabelled it (or
    // lied): a selector task for role=web reaches it and must be refused.
    let agent_json = fs::read_to_string(web.file("agent.json")).unwrap();
    assert!(
        agent_json.contains(r#""labels":{"role":"web"}"#),
        "{agent_json}"
    );
    fs::write(
        web.file("agent.json"),
        agent_json.replace(r#""labels":{"role":"web"}"#, r#""labels":{"role":"db"}"#),
    )
    .unwrap();
    let audience = format!(r#"{{"agents":["{id}"]}}"#);
    // Without podman or docker on PATH: no container capability.
    let proc = start(&web, &[("PATH", "/nonexistent")]);

    // Unsigned, and expired: refused at create, nothing stored.
    let (other, other_pem) = SigningKey::generate().unwrap();
    let unsigned = fleet.dir.join("unsigned.dsse.json");
    let mut envelope = dsse::sign(
        &other,
        PAYLOAD_TYPE,
        file_task("unsigned-1", &audience, &fleet.dir.join("unsigned"), "aGkK").as_bytes(),
    );
    envelope.signatures.clear();
    fs::write(&unsigned, envelope.to_json()).unwrap();
    let expired = fleet.sign(
        &file_task_until(
            "expired-1",
            &audience,
            &fleet.dir.join("expired"),
            "aGkK",
            "2020-01-01T00:00:00Z",
        ),
        "expired",
    );
    for (file, why) in [(&unsigned, "no signatures"), (&expired, "expired")] {
        let out = fleet
            .server
            .admin(&["task", "create", file.to_str().unwrap()]);
        let (stdout, stderr) = text(&out);
        assert!(!out.status.success(), "{stdout}");
        assert!(stderr.contains(why), "{stderr}");
    }
    assert!(!fleet.dir.join("unsigned").exists() && !fleet.dir.join("expired").exists());

    let mut cases: Vec<(String, PathBuf, &str)> = Vec::new();
    // Signed by another key.
    let other_key = fleet.dir.join("other.key");
    fs::write(&other_key, other_pem).unwrap();
    let wrong = fleet.dir.join("wrong-key");
    let path = sign(
        &fleet.dir,
        &other_key,
        &file_task("wrong-key-1", &audience, &wrong, "aGkK"),
        "wrong-key",
    );
    cases.push((create(&fleet.server, &path), wrong, "task signature"));
    // A payload altered after signing (as a compromised server would).
    let altered = fleet.dir.join("altered");
    let honest = fleet.sign(
        &file_task("altered-1", &audience, &altered, "aGkK"),
        "honest",
    );
    let mut envelope = dsse::Envelope::from_json(&fs::read(&honest).unwrap()).unwrap();
    envelope.payload = dsse::sign(
        &other,
        PAYLOAD_TYPE,
        file_task("altered-1", &audience, &altered, "ZXZpbAo=").as_bytes(),
    )
    .payload;
    let tampered = fleet.dir.join("altered.dsse.json");
    fs::write(&tampered, envelope.to_json()).unwrap();
    cases.push((create(&fleet.server, &tampered), altered, "task signature"));
    // Not in the audience (by the agent's pinned labels).
    let elsewhere = fleet.dir.join("elsewhere");
    let path = fleet.sign(
        &file_task(
            "audience-1",
            r#"{"selector":{"role":"web"}}"#,
            &elsewhere,
            "aGkK",
        ),
        "audience",
    );
    cases.push((
        create(&fleet.server, &path),
        elsewhere,
        "not in the task's audience",
    ));
    // A container task, and this agent has neither podman nor docker.
    let container = format!(
        r#"{{"id":"container-1","type":"container","not_after":"{}","audience":{audience},"name":"web","image":"localhost/none@sha256:{}"}}"#,
        in_secs(3600),
        "ab".repeat(32)
    );
    let path = fleet.sign(&container, "container");
    cases.push((
        create(&fleet.server, &path),
        fleet.dir.join("no-such-file"),
        "needs one of the capabilities podman, docker",
    ));
    // A path inside the agent's state dir.
    let inside = web.file("planted");
    let path = fleet.sign(&file_task("inside-1", &audience, &inside, "aGkK"), "inside");
    cases.push((
        create(&fleet.server, &path),
        inside,
        "inside the agent's state dir",
    ));
    for (task, target, why) in &cases {
        let (status, reason) = status_and_reason(&final_result(&fleet.server, task, &id));
        assert_eq!(status, "refused", "{task}: {reason}");
        assert!(reason.contains(why), "{task}: {reason} should say {why}");
        assert!(!target.exists(), "{} was written", target.display());
    }

    // Replayed: the same signed id with other content, after the first ran.
    let replayed = fleet.dir.join("replayed");
    let first = create(
        &fleet.server,
        &fleet.sign(
            &file_task("replay-1", &audience, &replayed, "Zmlyc3QK"),
            "first",
        ),
    );
    let (status, reason) = status_and_reason(&final_result(&fleet.server, &first, &id));
    assert_eq!(status, "succeeded", "{reason}");
    assert_eq!(fs::read(&replayed).unwrap(), b"first\n");
    fs::remove_file(&replayed).unwrap();
    let second = create(
        &fleet.server,
        &fleet.sign(
            &file_task("replay-1", &audience, &replayed, "c2Vjb25kCg=="),
            "second",
        ),
    );
    let (status, reason) = status_and_reason(&final_result(&fleet.server, &second, &id));
    assert_eq!(status, "refused", "{reason}");
    assert!(reason.contains("replayed task id"), "{reason}");
    assert!(!replayed.exists(), "the replay ran");
    let log = proc.log_text();
    assert!(log.contains("task refused"), "{log}");
}

#[test]
fn a_task_that_expires_before_the_agent_is_back_never_runs() {
    let fleet = Fleet::new();
    let (agent, id) = fleet.enroll("late", &[]);
    let target = fleet.dir.join("late");
    let task = file_task_until(
        "late-1",
        &format!(r#"{{"agents":["{id}"]}}"#),
        &target,
        "aGkK",
        &in_secs(2),
    );
    let task = create(&fleet.server, &fleet.sign(&task, "late"));
    assert!(
        poll(DEADLINE, || (json_str(
            &show(&fleet.server, &task),
            "status"
        ) == Some("expired"))
        .then_some(()))
        .is_some()
    );
    let _proc = start(&agent, &[]);
    agent.wait_for_saved_heartbeat();
    let view = show(&fleet.server, &task);
    assert_eq!(json_str(&view, "status"), Some("expired"), "{view:?}");
    assert!(!target.exists());
}

/// podman with runc, cgroupfs and a storage of its own in a temp dir, as
/// this test's agent and the test itself run it (via `CONTAINERS_CONF` and
/// `CONTAINERS_STORAGE_CONF`). Its containers are removed on drop.
struct Podman {
    dir: TempDir,
}

impl Podman {
    fn new(test: &str) -> Option<Self> {
        for (program, path) in [
            ("podman", None),
            ("runc", None),
            ("busybox", Some("/bin/busybox")),
        ] {
            let found = on_path(program) || path.is_some_and(|p| Path::new(p).exists());
            if !found {
                skip_or_fail(test, &format!("{program} is not installed"));
                return None;
            }
        }
        let dir = TempDir::new("podman");
        let root = dir.path().display().to_string();
        // crun refuses this VM's cgroup layout; runc with cgroupfs works.
        fs::write(
            dir.join("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\ntmp_dir = \"{root}/tmp\"\n"
            ),
        )
        .unwrap();
        fs::write(
            dir.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = \"{root}/graph\"\nrunroot = \"{root}/run\"\n"
            ),
        )
        .unwrap();
        Some(Podman { dir })
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "CONTAINERS_CONF",
                self.dir.join("containers.conf").display().to_string(),
            ),
            (
                "CONTAINERS_STORAGE_CONF",
                self.dir.join("storage.conf").display().to_string(),
            ),
        ]
    }

    fn run(&self, args: &[&str]) -> (bool, String) {
        let mut cmd = Command::new("podman");
        cmd.args(args);
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
        let out = run(&mut cmd);
        let (stdout, stderr) = text(&out);
        (out.status.success(), format!("{stdout}{stderr}"))
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, out) = self.run(args);
        assert!(ok, "podman {args:?}: {out}");
        out
    }

    /// A busybox image whose `/version` holds `version`, saved as an OCI
    /// archive and removed from the storage again (the agent must load it):
    /// the archive and the image reference by digest.
    fn image(&self, version: &str) -> (PathBuf, String) {
        let rootfs = self.dir.join(&format!("rootfs-{version}"));
        fs::create_dir_all(rootfs.join("bin")).unwrap();
        fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
        for applet in ["sh", "sleep", "test", "cat", "echo", "true", "false"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
        }
        fs::write(rootfs.join("version"), version).unwrap();
        let tar = self.dir.join(&format!("rootfs-{version}.tar"));
        let out = tool(
            "tar",
            &[
                "-C",
                rootfs.to_str().unwrap(),
                "-cf",
                tar.to_str().unwrap(),
                ".",
            ],
        );
        assert!(out.status.success(), "{:?}", text(&out));
        let tag = format!("localhost/stella-test:{version}");
        self.ok(&[
            "import",
            "--change",
            r#"CMD ["/bin/sleep","100000"]"#,
            tar.to_str().unwrap(),
            &tag,
        ]);
        let archive = self.dir.join(&format!("image-{version}.tar"));
        self.ok(&[
            "save",
            "--format",
            "oci-archive",
            "-o",
            archive.to_str().unwrap(),
            &tag,
        ]);
        self.ok(&["rmi", &tag]);
        // The digest podman knows the image by once the archive is loaded:
        // the manifest's, from the archive's index.json.
        let out = tool("tar", &["-xOf", archive.to_str().unwrap(), "index.json"]);
        let index = json(&text(&out).0);
        let Some(Value::Array(manifests)) = json_at(&index, "manifests") else {
            panic!("no manifests in {index:?}");
        };
        let digest = json_str(&manifests[0], "digest").unwrap().to_owned();
        (archive, format!("localhost/stella-test@{digest}"))
    }

    /// `NAME IMAGE` of every running container.
    fn running(&self) -> Vec<String> {
        self.ok(&["ps", "--format", "{{.Names}} {{.Image}}"])
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run(&["rm", "-f", "-a", "-t", "0"]);
    }
}

/// `task artifact FILE`: the artifact's sha256.
fn import_artifact(server: &Server, file: &Path) -> String {
    let out = server.admin_ok(&["task", "artifact", file.to_str().unwrap()]);
    let sha = stella_tests::release::sha256(file);
    assert!(out.contains(&sha), "task artifact printed {out:?}");
    sha
}

fn container_task(
    id: &str,
    agent: &str,
    image: &str,
    archive: Option<&str>,
    health: &str,
) -> String {
    container_task_within(id, agent, image, archive, health, "3m")
}

fn container_task_within(
    id: &str,
    agent: &str,
    image: &str,
    archive: Option<&str>,
    health: &str,
    timeout: &str,
) -> String {
    let archive = archive
        .map(|a| format!(r#","image_archive":"{a}""#))
        .unwrap_or_default();
    format!(
        r#"{{"id":"{id}","type":"container","not_after":"{}","timeout":"{timeout}","audience":{{"agents":["{agent}"]}},"name":"web","image":"{image}"{archive},"env":{{"GREETING":"hi"}},"health":{health}}}"#,
        in_secs(3600)
    )
}

#[test]
fn a_container_task_deploys_by_digest_replaces_and_survives_a_failed_health_check() {
    let test = "a_container_task_deploys_by_digest_replaces_and_survives_a_failed_health_check";
    let Some(podman) = Podman::new(test) else {
        return;
    };
    let fleet = Fleet::new();
    let (agent, id) = fleet.enroll("edge", &[]);
    let env = podman.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let _proc = start(&agent, &env);
    let (archive1, image1) = podman.image("v1");
    let (archive2, image2) = podman.image("v2");
    assert_ne!(image1, image2);
    let sha1 = import_artifact(&fleet.server, &archive1);
    let sha2 = import_artifact(&fleet.server, &archive2);
    let healthy = r#"{"cmd":["/bin/sh","-c","test -f /version && echo healthy"],"timeout":"20s"}"#;

    // Deploy v1 from its archive, by digest.
    let task = fleet.sign(
        &container_task("web-1", &id, &image1, Some(&sha1), healthy),
        "web-1",
    );
    let task = create(&fleet.server, &task);
    let result = final_result(&fleet.server, &task, &id);
    assert_eq!(status_and_reason(&result).0, "succeeded", "{result:?}");
    assert_eq!(podman.running(), [format!("web {image1}")]);
    let version = podman.ok(&["exec", "web", "cat", "/version"]);
    assert_eq!(version.trim(), "v1");

    // v2 replaces it: one container, the new digest, the same name.
    let task = fleet.sign(
        &container_task("web-2", &id, &image2, Some(&sha2), healthy),
        "web-2",
    );
    let task = create(&fleet.server, &task);
    let result = final_result(&fleet.server, &task, &id);
    assert_eq!(status_and_reason(&result).0, "succeeded", "{result:?}");
    assert_eq!(podman.running(), [format!("web {image2}")]);
    assert_eq!(podman.ok(&["exec", "web", "cat", "/version"]).trim(), "v2");
    assert_eq!(
        podman
            .ok(&["exec", "web", "sh", "-c", "echo $GREETING"])
            .trim(),
        "hi"
    );

    // v1 again with a health check that fails: v2 keeps running.
    let failing = r#"{"cmd":["/bin/sh","-c","echo health-says-no; exit 1"],"timeout":"3s"}"#;
    let task = fleet.sign(
        &container_task("web-3", &id, &image1, None, failing),
        "web-3",
    );
    let task = create(&fleet.server, &task);
    let result = final_result(&fleet.server, &task, &id);
    let (status, reason) = status_and_reason(&result);
    assert_eq!(status, "failed", "{result:?}");
    assert!(reason.contains("health check failed"), "{reason}");
    let output = json_str(&result, "output").unwrap_or_default();
    assert!(output.contains("health-says-no"), "{output}");
    assert_eq!(podman.running(), [format!("web {image2}")]);
    let all = podman.ok(&["ps", "-a", "--format", "{{.Names}}"]);
    assert_eq!(all.trim(), "web", "the new container was removed");
    // The archive was loaded and dropped from the staging dir.
    let staged: Vec<_> = fs::read_dir(agent.file("staging"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(staged.is_empty(), "{staged:?}");
}

/// Waits until `agent` reports task `id` running.
fn wait_running(server: &Server, id: &str, agent: &str) {
    let running = poll(DEADLINE, || {
        let view = show(server, id);
        let Some(Value::Array(results)) = json_at(&view, "results") else {
            return None;
        };
        results
            .iter()
            .any(|r| {
                json_str(r, "agent") == Some(agent) && json_str(r, "status") == Some("running")
            })
            .then_some(())
    });
    assert!(running.is_some(), "{id} never ran: {:?}", show(server, id));
}

#[test]
fn a_container_task_times_out_is_cancelled_or_is_interrupted_never_run_twice() {
    let test = "a_container_task_times_out_is_cancelled_or_is_interrupted_never_run_twice";
    let Some(podman) = Podman::new(test) else {
        return;
    };
    let fleet = Fleet::new();
    let (agent, id) = fleet.enroll("edge", &[]);
    let env = podman.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut proc = start(&agent, &env);
    let (archive, image) = podman.image("v1");
    let sha = import_artifact(&fleet.server, &archive);
    // Never healthy: the health check is retried until the task ends.
    let never = r#"{"cmd":["/bin/sh","-c","echo not-yet; exit 1"],"timeout":"10m"}"#;

    let task = fleet.sign(
        &container_task_within("slow-1", &id, &image, Some(&sha), never, "3s"),
        "slow-1",
    );
    let task = create(&fleet.server, &task);
    let (status, reason) = status_and_reason(&final_result(&fleet.server, &task, &id));
    assert_eq!(status, "timed_out", "{reason}");
    assert!(podman.running().is_empty(), "{:?}", podman.running());

    let task = fleet.sign(
        &container_task("slow-2", &id, &image, None, never),
        "slow-2",
    );
    let task = create(&fleet.server, &task);
    wait_running(&fleet.server, &task, &id);
    fleet.server.admin_ok(&["task", "cancel", &task]);
    let (status, reason) = status_and_reason(&final_result(&fleet.server, &task, &id));
    assert_eq!(status, "cancelled", "{reason}");
    let gone = poll(DEADLINE, || podman.running().is_empty().then_some(()));
    assert!(gone.is_some(), "{:?}", podman.running());

    let task = fleet.sign(
        &container_task("slow-3", &id, &image, None, never),
        "slow-3",
    );
    let task = create(&fleet.server, &task);
    wait_running(&fleet.server, &task, &id);
    proc.kill();
    let proc = start(&agent, &env);
    let (status, reason) = status_and_reason(&final_result(&fleet.server, &task, &id));
    assert_eq!(status, "interrupted", "{reason}");
    agent.wait_for_saved_heartbeat();
    let log = proc.log_text();
    assert!(
        log.contains("task interrupted by an agent restart"),
        "{log}"
    );
    assert!(!log.contains("task accepted"), "run again: {log}");
}
