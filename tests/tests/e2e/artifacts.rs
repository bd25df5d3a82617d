//! Release artifacts as blobs of the store (docs/design.md section 14):
//! `release import DIR --server URL` uploads the files from the admin's
//! host; with PostgreSQL a release imported through one server is served,
//! with HTTP Range, by another that never saw the files (its data dir holds
//! none until it fills its cache from the database), and an agent enrolled
//! there updates from it. A file that does not match its signed digest is
//! refused and nothing is recorded.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use stella_tests::postgres::Postgres;
use stella_tests::release::{Keys, NEXT, enroll_pinning, native_target, sha256, signed_release};
use stella_tests::{
    AgentDir, Server, ServerOptions, TempDir, bin, json, json_str, run, text, tool,
};

/// `stella-server release import DIR` as an admin on another host runs it:
/// `--server URL --ca FILE`, the token in `STELLA_ADMIN_TOKEN`, and a data
/// dir that holds nothing of the server's.
fn remote_import(server: &Server, dir: &Path) -> Output {
    let elsewhere = TempDir::new("admin-host");
    run(Command::new(bin("stella-server"))
        .args(["release", "import"])
        .arg(dir)
        .args(["--server", &server.url, "--ca"])
        .arg(server.ca_pem())
        .arg("--data-dir")
        .arg(elsewhere.path())
        .env("STELLA_ADMIN_TOKEN", &server.admin_token))
}

/// GETs `path` from `server` with an agent's client certificate (curl, an
/// independent client); `range`: a `Range: bytes=` value. Returns the
/// status and the body.
fn agent_get(server: &Server, agent: &AgentDir, path: &str, range: Option<&str>) -> (u16, Vec<u8>) {
    let out_dir = TempDir::new("download");
    let body = out_dir.join("body");
    let url = format!("{}{path}", server.url);
    let mut args = vec![
        "-s".to_owned(),
        "-o".to_owned(),
        body.display().to_string(),
        "-w".to_owned(),
        "%{http_code}".to_owned(),
        "--cacert".to_owned(),
        server.ca_pem().display().to_string(),
        "--cert".to_owned(),
        agent.file("agent.pem").display().to_string(),
        "--key".to_owned(),
        agent.file("agent.key").display().to_string(),
    ];
    if let Some(range) = range {
        args.push("-H".to_owned());
        args.push(format!("Range: bytes={range}"));
    }
    args.push(url);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = tool("curl", &args);
    let status = text(&out).0.trim().parse().unwrap_or(0);
    (status, fs::read(&body).unwrap_or_default())
}

/// The blob files in a server's data dir.
fn blob_files(server: &Server) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(server.data.join("blobs/sha256"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn hex_sha256(bytes: &[u8]) -> String {
    stella_proto::hash::hex(&stella_proto::hash::sha256(bytes))
}

#[test]
fn a_release_uploaded_through_one_server_is_served_by_another_with_range() {
    let test = "a_release_uploaded_through_one_server_is_served_by_another_with_range";
    let Some(pg) = Postgres::start(test) else {
        return;
    };
    let url = pg.database("artifacts");
    let opts = ServerOptions {
        update_probation: "5m",
        ..ServerOptions::default()
    };
    let a = Server::start_on(Some(&url), opts.clone());
    let keys = Keys::new();
    let next = bin("stella-agent-next");
    let release = signed_release(&keys, NEXT, &next, &[]);
    let digest = sha256(&next);
    let bytes = fs::read(&next).unwrap();

    // Through server A, from a directory A cannot see: the CLI uploads.
    let out = remote_import(&a, release.path());
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "import: {stdout}{stderr}");
    assert!(
        stdout.contains(&format!("imported release {NEXT}")),
        "{stdout}"
    );
    assert_eq!(
        pg.sql(
            "artifacts",
            &format!("SELECT size FROM blobs WHERE sha256 = '{digest}'")
        ),
        bytes.len().to_string(),
        "the file is in PostgreSQL"
    );
    assert!(
        pg.sql(
            "artifacts",
            &format!("SELECT count(*) > 1 FROM blob_chunks WHERE sha256 = '{digest}'")
        ) == "t"
            || bytes.len() <= 1 << 20,
        "a file over 1 MiB is stored in chunks"
    );

    // An agent A knows (live sync of agents between servers is not this
    // test's business).
    let on_a = AgentDir::new();
    on_a.enroll(&a, "on-a");

    // Server B starts after the import, from a copy of A's CA and keys only.
    let b = a.join(&opts);
    assert!(blob_files(&b).is_empty(), "B starts without blobs");
    let listed = b.admin_ok(&["release", "list"]);
    assert!(listed.contains(NEXT), "{listed}");

    // An agent enrolled on B fetches a range of the artifact from B, then
    // the whole of it.
    let agent = AgentDir::installed(&bin("stella-agent"));
    let id = enroll_pinning(&agent, &b, &keys, &["--ttl", "10m"], "on-b");
    let path = format!("/v1/releases/{NEXT}/{}", native_target());
    let (status, part) = agent_get(&b, &agent, &path, Some("100-4195"));
    assert_eq!(status, 206, "{}", String::from_utf8_lossy(&part));
    assert!(part == bytes[100..4196], "the range has the file's bytes");
    assert_eq!(
        blob_files(&b),
        std::slice::from_ref(&digest),
        "B cached the blob"
    );
    let (status, whole) = agent_get(&b, &agent, &path, None);
    assert_eq!(status, 200);
    assert_eq!(hex_sha256(&whole), digest, "the whole artifact, by digest");
    let log = b.proc.log_text();
    assert!(log.contains("blob copied from the store"), "{log}");

    // A task artifact uploaded through B is served by A (whose data dir
    // never had it), by its digest, with a range.
    let archive_dir = TempDir::new("archive");
    let archive = archive_dir.join("image.tar");
    let archive_bytes: Vec<u8> = (0..(1u32 << 21) + 77).map(|i| (i % 251) as u8).collect();
    fs::write(&archive, &archive_bytes).unwrap();
    let uploaded = b.admin_ok(&["task", "artifact", archive.to_str().unwrap()]);
    let archive_digest = hex_sha256(&archive_bytes);
    assert!(uploaded.contains(&archive_digest), "{uploaded}");
    assert!(!blob_files(&a).contains(&archive_digest));
    let (status, got) = agent_get(
        &a,
        &on_a,
        &format!("/v1/artifacts/{archive_digest}"),
        Some("2097152-"),
    );
    assert_eq!(status, 206);
    assert!(got == archive_bytes[2_097_152..], "the tail of the archive");

    // And the agent enrolled on B updates from B.
    let sup = agent.supervise();
    b.wait_for_agent(&id, "heartbeating", |v| v.heartbeat_seq >= 1);
    b.admin_ok(&["agents", "update", &id, "--release", NEXT]);
    b.wait_for_agent(&id, "running and committed on the new version", |v| {
        v.version == NEXT && v.update.state == "idle"
    });
    assert_eq!(sha256(&agent.binary), digest);
    drop(sup);
}

#[test]
fn an_upload_import_with_a_file_that_does_not_match_changes_nothing() {
    let server = Server::start();
    let keys = Keys::new();
    let release = signed_release(&keys, NEXT, &bin("stella-agent-next"), &[]);
    let file = release.join(&format!("{}/stella-agent", native_target()));
    let good = fs::read(&file).unwrap();
    let envelope = fs::read_to_string(release.join("release.dsse.json")).unwrap();
    let want = sha256(&file);

    // A file changed after signing: the CLI refuses it before it uploads
    // anything.
    let mut bad = good.clone();
    bad[10] ^= 0xff;
    fs::write(&file, &bad).unwrap();
    let out = remote_import(&server, release.path());
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains("but the signed statement says") && stderr.contains(&want),
        "{stderr}"
    );
    assert!(blob_files(&server).is_empty(), "nothing was uploaded");

    // The API checks too: an envelope whose file was never uploaded, or
    // whose upload was other bytes, is refused (400) and nothing recorded.
    let client = server.client();
    let body = format!(
        r#"{{"envelope":{}}}"#,
        miniserde::json::to_string(&envelope)
    );
    let (status, answer) = client.post_auth("/v1/admin/releases", &server.admin_token, &body);
    assert_eq!(status, 400, "{answer}");
    assert!(
        json_str(&json(&answer), "error").is_some_and(|e| e.contains("has not been uploaded")),
        "{answer}"
    );
    let uploaded = server.admin_ok(&["task", "artifact", file.to_str().unwrap()]);
    assert!(uploaded.contains(&hex_sha256(&bad)), "{uploaded}");
    let (status, answer) = client.post_auth("/v1/admin/releases", &server.admin_token, &body);
    assert_eq!(status, 400, "{answer}");

    // A blob whose stored bytes differ from its name is refused as well.
    let blob = server.data.join(format!("blobs/sha256/{want}"));
    fs::write(&blob, &bad).unwrap();
    let (status, answer) = client.post_auth("/v1/admin/releases", &server.admin_token, &body);
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("the stored blob"), "{answer}");
    fs::remove_file(&blob).unwrap();

    // Both fields, or neither: refused.
    for body in [
        r#"{}"#.to_owned(),
        r#"{"dir":"/x","envelope":"{}"}"#.to_owned(),
    ] {
        let (status, answer) = client.post_auth("/v1/admin/releases", &server.admin_token, &body);
        assert_eq!(status, 400, "{body}: {answer}");
    }
    assert!(
        server
            .admin_ok(&["release", "list"])
            .contains("no releases"),
        "nothing was recorded"
    );

    // With the file as signed, the same import works, through the upload.
    fs::write(&file, &good).unwrap();
    let out = remote_import(&server, release.path());
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(blob_files(&server).contains(&want));
    assert!(server.admin_ok(&["release", "list"]).contains(NEXT));
}
