//! Deployment tasks on the server side: signing offline with `cargo xtask
//! sign-task`, `task create|list|show|cancel` against a real server,
//! delivery, cancels and results through real mTLS heartbeats (sent with
//! curl and the agent's certificate, standing in for an agent), artifact
//! upload and ranged download, and bad input refused with nothing stored.
//! Delivery to and execution by a real agent are in the agent's tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

use stella_proto::dsse::{self, SigningKey};
use stella_proto::task::{PAYLOAD_TYPE, server_task_id};
use stella_tests::{AgentDir, Client, Server, TempDir, bin, json, json_str, run, text, tool};

const DIGEST: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn path(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// An RFC 3339 time `secs` from now (negative: in the past).
fn from_now(secs: i64) -> String {
    stella_proto::time::rfc3339(now().saturating_add_signed(secs))
}

/// A file task for agents labelled `role=web`, valid for an hour.
fn file_task(id: &str) -> String {
    file_task_until(id, &from_now(3600))
}

fn file_task_until(id: &str, not_after: &str) -> String {
    format!(
        r#"{{"id":"{id}","type":"file","not_after":"{not_after}","audience":{{"selector":{{"role":"web"}}}},"path":"/etc/stella-test.conf","content_base64":"aGVsbG8K","mode":"0644"}}"#
    )
}

/// A deploy key made by `cargo xtask keygen` (its `release.key`).
fn deploy_key(dir: &TempDir) -> PathBuf {
    let out = run(Command::new(bin("xtask")).args(["keygen", "--out", path(&dir.join("deploy"))]));
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "keygen: {stdout}{stderr}");
    dir.join("deploy/release.key")
}

/// `cargo xtask sign-task` of `task` into `name.dsse.json`; returns its path.
fn sign_task(dir: &TempDir, key: &Path, name: &str, task: &str) -> PathBuf {
    let task_path = dir.join(&format!("{name}.json"));
    std::fs::write(&task_path, task).expect("write the task");
    let out_path = dir.join(&format!("{name}.dsse.json"));
    let out = run(Command::new(bin("xtask")).args([
        "sign-task",
        "--key",
        path(key),
        path(&task_path),
        "--out",
        path(&out_path),
    ]));
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "sign-task: {stdout}{stderr}");
    assert!(stdout.contains("signed file task"), "{stdout}");
    out_path
}

/// An agent enrolled with label `role=web` (not running: curl speaks for it).
fn web_agent(server: &Server) -> (AgentDir, String) {
    let agent = AgentDir::new();
    let token = server.token(&["--ttl", "10m", "--label", "role=web"]);
    let out = agent.bootstrap(server, &token, &["--name", "web"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "bootstrap: {stdout}{stderr}");
    (agent, stdout.trim().to_owned())
}

/// curl with the agent's client certificate and `extra` arguments.
fn agent_curl(server: &Server, agent: &AgentDir, extra: &[&str], url_path: &str) -> Output {
    let url = format!("{}{url_path}", server.url);
    let (ca, cert, key) = (
        server.ca_pem(),
        agent.file("agent.pem"),
        agent.file("agent.key"),
    );
    let mut args = vec![
        "-sS",
        "--cacert",
        path(&ca),
        "--cert",
        path(&cert),
        "--key",
        path(&key),
    ];
    args.extend_from_slice(extra);
    args.push(&url);
    tool("curl", &args)
}

/// One heartbeat from `agent`, with `results` (JSON list or `null`); the
/// answer's JSON.
fn heartbeat(server: &Server, agent: &AgentDir, seq: u64, results: &str) -> String {
    let body = format!(
        r#"{{"seq":{seq},"version":"curl","uptime_s":1,"config_hash":"","config_drift":false,"doctor":{{"pass":0,"warn":0,"fail":0,"skip":0,"failing":[]}},"update":{{"state":"idle","version":"curl"}},"capabilities":[],"task_results":{results}}}"#
    );
    let out = agent_curl(
        server,
        agent,
        &[
            "--fail-with-body",
            "-H",
            "content-type: application/json",
            "-d",
            &body,
        ],
        "/v1/agents/heartbeat",
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "heartbeat: {stdout}{stderr}");
    stdout
}

fn show(server: &Server, id: &str) -> miniserde::json::Value {
    json(&server.admin_ok(&["task", "show", id, "--json"]))
}

fn results_of(view: &miniserde::json::Value) -> &Vec<miniserde::json::Value> {
    match stella_tests::json_at(view, "results") {
        Some(miniserde::json::Value::Array(list)) => list,
        other => panic!("results is not a list: {other:?}"),
    }
}

#[test]
fn tasks_are_created_delivered_reported_and_cancelled() {
    let server = Server::start();
    let work = TempDir::new("tasks");
    let key = deploy_key(&work);
    let task = file_task("web-conf-1");
    let signed = sign_task(&work, &key, "web", &task);
    let (agent, agent_id) = web_agent(&server);

    let id = server
        .admin_ok(&["task", "create", path(&signed)])
        .trim()
        .to_owned();
    assert_eq!(
        id,
        server_task_id(task.as_bytes()),
        "the id is the payload's hash"
    );

    // The same envelope again: 409, nothing new.
    let again = server.admin(&["task", "create", path(&signed)]);
    let (stdout, stderr) = text(&again);
    assert!(!again.status.success(), "{stdout}");
    assert!(
        stderr.contains("409") && stderr.contains("exists"),
        "{stderr}"
    );

    let view = show(&server, &id);
    assert_eq!(json_str(&view, "id"), Some(id.as_str()));
    assert_eq!(json_str(&view, "task_id"), Some("web-conf-1"));
    assert_eq!(json_str(&view, "type"), Some("file"));
    assert_eq!(json_str(&view, "status"), Some("pending"));
    assert!(json_str(&view, "not_after").is_some_and(|t| t.ends_with('Z')));
    assert!(results_of(&view).is_empty());
    let list = json(&server.admin_ok(&["task", "list", "--json"]));
    assert!(
        matches!(&list, miniserde::json::Value::Array(l) if l.len() == 1),
        "{list:?}"
    );
    let mine = server.admin_ok(&["task", "list", "--agent", &agent_id, "--json"]);
    assert!(mine.contains(&id), "{mine}");
    let human = server.admin_ok(&["task", "list"]);
    assert!(human.contains(&id) && human.contains("pending"), "{human}");

    // The heartbeat answer carries the envelope exactly as signed.
    let answer = heartbeat(&server, &agent, 1, "null");
    let hb: stella_proto::api::HeartbeatResponse =
        miniserde::json::from_str(&answer).expect("a heartbeat answer");
    let delivered = hb.tasks.expect("a task is delivered");
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].id, id);
    assert_eq!(
        delivered[0].envelope,
        std::fs::read_to_string(&signed).unwrap(),
        "byte for byte"
    );
    assert!(hb.cancel_tasks.is_none());

    // Running: no longer delivered; shown as running.
    let running = format!(
        r#"[{{"id":"{id}","status":"running","started":"{}"}}]"#,
        from_now(0)
    );
    let answer = heartbeat(&server, &agent, 2, &running);
    assert!(answer.contains(r#""tasks":null"#), "{answer}");
    let view = show(&server, &id);
    assert_eq!(json_str(&view, "status"), Some("running"));
    assert_eq!(
        json_str(&results_of(&view)[0], "agent"),
        Some(agent_id.as_str())
    );
    assert_eq!(json_str(&results_of(&view)[0], "status"), Some("running"));

    // Cancelled: the running agent is told until it reports a final status.
    let out = server.admin_ok(&["task", "cancel", &id]);
    assert!(out.contains("cancelled"), "{out}");
    for seq in [3, 4] {
        let answer = heartbeat(&server, &agent, seq, "null");
        assert!(
            answer.contains(&format!(r#""cancel_tasks":["{id}"]"#)),
            "{answer}"
        );
    }
    let stopped = format!(
        r#"[{{"id":"{id}","status":"cancelled","exit_code":143,"output":"stopping\nbye\n","started":"{}","finished":"{}"}}]"#,
        from_now(-1),
        from_now(0)
    );
    heartbeat(&server, &agent, 5, &stopped);
    // The same result again is harmless.
    let answer = heartbeat(&server, &agent, 6, &stopped);
    assert!(answer.contains(r#""cancel_tasks":null"#), "{answer}");
    let view = show(&server, &id);
    assert_eq!(json_str(&view, "status"), Some("cancelled"));
    let result = &results_of(&view)[0];
    assert_eq!(json_str(result, "status"), Some("cancelled"));
    assert_eq!(json_str(result, "output"), Some("stopping\nbye"));
    let human = server.admin_ok(&["task", "show", &id]);
    assert!(
        human.contains("exit 143") && human.contains("| bye"),
        "{human}"
    );

    // Results are durable: a restarted server still has them.
    let mut server = server;
    server.kill();
    server.serve(&Default::default());
    let view = show(&server, &id);
    assert_eq!(json_str(&view, "status"), Some("cancelled"));
    assert_eq!(results_of(&view).len(), 1);
}

#[test]
fn artifacts_upload_and_download_in_ranges_over_mtls() {
    let server = Server::start();
    let work = TempDir::new("artifact");
    let (agent, _) = web_agent(&server);
    // Larger than any request body the server reads whole.
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let file = work.join("image.tar");
    std::fs::write(&file, &bytes).unwrap();
    let sha256 = server
        .admin_ok(&["task", "artifact", path(&file)])
        .trim()
        .to_owned();
    assert_eq!(
        sha256,
        stella_proto::hash::hex(&stella_proto::hash::sha256(&bytes))
    );
    let blob = server.data.join("blobs/sha256").join(&sha256);
    assert_eq!(
        std::fs::read(&blob).unwrap(),
        bytes,
        "stored content-addressed"
    );
    // The same archive again: the same digest, one blob.
    let again = server.admin_ok(&["task", "artifact", path(&file)]);
    assert_eq!(again.trim(), sha256);

    let whole = work.join("whole");
    let out = agent_curl(
        &server,
        &agent,
        &["--fail", "-o", path(&whole)],
        &format!("/v1/artifacts/{sha256}"),
    );
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(std::fs::read(&whole).unwrap(), bytes);
    let part = work.join("part");
    let out = agent_curl(
        &server,
        &agent,
        &[
            "--fail",
            "-r",
            "1000-1999",
            "-o",
            path(&part),
            "-w",
            "%{http_code}",
        ],
        &format!("/v1/artifacts/{sha256}"),
    );
    let (code, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(code, "206");
    assert_eq!(std::fs::read(&part).unwrap(), &bytes[1000..2000]);

    let missing = agent_curl(
        &server,
        &agent,
        &["-o", "/dev/null", "-w", "%{http_code}"],
        &format!("/v1/artifacts/{}", "f".repeat(64)),
    );
    assert_eq!(text(&missing).0, "404");
    let anonymous = Client::new(&server.url, &std::fs::read(server.ca_pem()).unwrap(), None);
    assert_eq!(anonymous.get(&format!("/v1/artifacts/{sha256}")).0, 401);

    // An upload without the admin token is refused before its body is read.
    let (status, body) =
        anonymous.post("/v1/admin/artifacts", "application/octet-stream", b"sneaky");
    assert_eq!(status, 401, "{body}");
    let sneaky = stella_proto::hash::hex(&stella_proto::hash::sha256(b"sneaky"));
    assert!(!server.data.join("blobs/sha256").join(sneaky).exists());
    let empty = work.join("empty");
    std::fs::write(&empty, b"").unwrap();
    let out = server.admin(&["task", "artifact", path(&empty)]);
    assert!(
        !out.status.success() && text(&out).1.contains("400"),
        "{:?}",
        text(&out)
    );
}

#[test]
fn bad_tasks_are_refused_at_create_and_nothing_is_stored() {
    let server = Server::start();
    let work = TempDir::new("bad-tasks");
    let (key, _) = SigningKey::generate().unwrap();
    let signed = |payload: &str| dsse::sign(&key, PAYLOAD_TYPE, payload.as_bytes()).to_json();
    let good = file_task("t");
    let container = format!(
        r#"{{"id":"c","type":"container","not_after":"{}","audience":{{"selector":{{}}}},"name":"web","image":"localhost/web@sha256:{DIGEST}"}}"#,
        from_now(3600)
    );
    let mut unsigned = dsse::sign(&key, PAYLOAD_TYPE, good.as_bytes());
    unsigned.signatures.clear();
    let cases: Vec<(&str, String, &str)> = vec![
        ("not JSON", "{ nope".to_owned(), "DSSE envelope"),
        ("malformed task", signed("{\"id\":"), "not a JSON object"),
        (
            "unknown type",
            signed(&good.replace("\"file\"", "\"shell\"")),
            "unknown",
        ),
        (
            "tag, not digest",
            signed(&container.replace(&format!("@sha256:{DIGEST}"), ":latest")),
            "digest",
        ),
        (
            "relative path",
            signed(&good.replace("/etc/stella", "etc/stella")),
            "absolute",
        ),
        (
            "traversal",
            signed(&good.replace("/etc/", "/etc/../")),
            "..",
        ),
        (
            "expired",
            signed(&file_task_until("t", &from_now(-60))),
            "expired",
        ),
        (
            "release payload type",
            dsse::sign(&key, stella_proto::release::PAYLOAD_TYPE, good.as_bytes()).to_json(),
            "payload type",
        ),
        ("unsigned", unsigned.to_json(), "no signatures"),
    ];
    for (what, body, want) in &cases {
        let file = work.join("bad.dsse.json");
        std::fs::write(&file, body).unwrap();
        let out = server.admin(&["task", "create", path(&file)]);
        let (stdout, stderr) = text(&out);
        assert!(!out.status.success(), "{what}: {stdout}");
        assert!(stderr.contains("(400)"), "{what}: {stderr}");
        assert!(stderr.contains(want), "{what}: {stderr} should say {want}");
    }
    // The container task itself is fine; the bad ones left nothing behind.
    let file = work.join("good.dsse.json");
    std::fs::write(&file, signed(&container)).unwrap();
    let id = server.admin_ok(&["task", "create", path(&file)]);
    let list = json(&server.admin_ok(&["task", "list", "--json"]));
    match &list {
        miniserde::json::Value::Array(rows) => {
            assert_eq!(rows.len(), 1, "{list:?}");
            assert_eq!(json_str(&rows[0], "id"), Some(id.trim()));
            assert_eq!(json_str(&rows[0], "type"), Some("container"));
        }
        other => panic!("{other:?}"),
    }
    let missing = server.admin(&["task", "show", "0000000000000000"]);
    assert!(text(&missing).1.contains("(404)"), "{:?}", text(&missing));
    let missing = server.admin(&["task", "cancel", "0000000000000000"]);
    assert!(text(&missing).1.contains("(404)"), "{:?}", text(&missing));
}
