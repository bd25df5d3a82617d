//! The operator's surface (docs/operations.md): scoped admin tokens and
//! their roles, the audit log (CLI, API, refusals, restarts), and backup and
//! restore under heartbeat load.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use stella_proto::admin::{AdminTokenView, AuditEntry, AuditPage};
use stella_tests::{AgentDir, DEADLINE, Server, ServerOptions, bin, poll, run, text};

/// An admin command run with another admin token than the data dir's.
fn admin_as(server: &Server, token: &str, args: &[&str]) -> Output {
    run(Command::new(bin("stella-server"))
        .args(args)
        .arg("--data-dir")
        .arg(&server.data)
        .env("STELLA_ADMIN_TOKEN", token))
}

/// Fails unless `out` failed with `code` and one stderr line containing
/// `needle`.
fn assert_failed(out: &Output, code: i32, needle: &str) {
    let (stdout, stderr) = text(out);
    assert_eq!(out.status.code(), Some(code), "{stdout}{stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in {stderr:?}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
}

fn audit_lines(server: &Server, args: &[&str]) -> Vec<AuditEntry> {
    let mut all = vec!["audit", "--json"];
    all.extend_from_slice(args);
    server
        .admin_ok(&all)
        .lines()
        .map(|l| miniserde::json::from_str(l).unwrap_or_else(|_| panic!("not an audit entry: {l}")))
        .collect()
}

/// Polls the audit log until a line satisfies `check`.
fn wait_for_line(server: &Server, what: &str, check: impl Fn(&AuditEntry) -> bool) -> AuditEntry {
    poll(DEADLINE, || {
        audit_lines(server, &[]).into_iter().find(|e| check(e))
    })
    .unwrap_or_else(|| {
        panic!(
            "no audit line {what}; log:\n{:#?}",
            audit_lines(server, &[])
        )
    })
}

#[test]
fn scoped_admin_tokens_may_do_what_their_role_allows() {
    let server = Server::start();
    let agent = AgentDir::new();
    let id = agent.enroll(&server, "roles");
    let client = server.client();

    // The token `init` made is root, role admin.
    let (status, body) = client.get_auth("/v1/admin/whoami", &server.admin_token);
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"name":"root","role":"admin"}"#)
    );

    let make = |name: &str, role: &str| -> String {
        let out = server.admin_ok(&["admin-token", "create", "--name", name, "--role", role]);
        let token = out.trim().to_owned();
        assert!(
            !token.is_empty() && !token.contains(' '),
            "prints the token only: {out:?}"
        );
        token
    };
    let viewer = make("viewer", "read");
    let operator = make("operator", "operate");
    let boss = make("boss", "admin");
    let (_, who) = client.get_auth("/v1/admin/whoami", &operator);
    assert_eq!(who, r#"{"name":"operator","role":"operate"}"#);

    // read: lists and shows, nothing more; 403 names the role needed.
    assert!(
        admin_as(&server, &viewer, &["agents", "list"])
            .status
            .success()
    );
    assert!(
        admin_as(&server, &viewer, &["agents", "show", &id])
            .status
            .success()
    );
    let out = admin_as(&server, &viewer, &["agents", "deactivate", &id]);
    assert_failed(&out, 1, "needs role operate");
    let (status, body) = client.post_auth("/v1/admin/config", &viewer, "{}");
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("needs role operate") && body.contains("viewer has role read"),
        "{body}"
    );

    // operate: acts on agents and config, but neither revokes nor mints.
    let out = admin_as(&server, &operator, &["agents", "deactivate", &id]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(
        server.agent(&id).reason.map(|r| r.as_str()),
        Some("deactivated")
    );
    assert!(
        admin_as(&server, &operator, &["agents", "activate", &id])
            .status
            .success()
    );
    assert_failed(
        &admin_as(&server, &operator, &["agents", "revoke", &id]),
        1,
        "needs role admin",
    );
    assert_failed(
        &admin_as(&server, &operator, &["token", "create"]),
        1,
        "needs role admin",
    );
    assert_failed(
        &admin_as(
            &server,
            &operator,
            &["admin-token", "create", "--name", "x", "--role", "read"],
        ),
        1,
        "needs role admin",
    );
    assert_eq!(server.agent(&id).status, "active", "nothing changed");

    // admin: everything.
    let out = admin_as(&server, &boss, &["token", "create"]);
    assert!(out.status.success(), "{:?}", text(&out));

    // The list shows names, roles and states, never a secret or its hash.
    let listed = server.admin_ok(&["admin-token", "list", "--json"]);
    let tokens: Vec<AdminTokenView> = miniserde::json::from_str(listed.trim()).unwrap();
    let names: Vec<(&str, &str, &str)> = tokens
        .iter()
        .map(|t| (t.name.as_str(), t.role.as_str(), t.state.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("boss", "admin", "active"),
            ("operator", "operate", "active"),
            ("root", "admin", "active"),
            ("viewer", "read", "active")
        ]
    );
    for secret in [&viewer, &operator, &boss, &server.admin_token] {
        assert!(!listed.contains(secret.as_str()), "a secret in {listed}");
    }
    assert!(!listed.contains("sha256"), "{listed}");
    assert!(server.admin_ok(&["admin-token", "list"]).contains("viewer"));

    // Revoked and expired tokens get 401.
    server.admin_ok(&["admin-token", "revoke", "viewer"]);
    let (status, body) = client.get_auth("/v1/admin/agents", &viewer);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("viewer was revoked"), "{body}");
    let brief = make_with_ttl(&server, "brief", "1s");
    let expired = poll(DEADLINE, || {
        let (status, body) = client.get_auth("/v1/admin/agents", &brief);
        (status == 401).then_some(body)
    })
    .expect("a token with --ttl 1s expires");
    assert!(expired.contains("brief expired"), "{expired}");

    // Bad input: one stderr line, exit 2 for usage, 4xx on the API, and
    // nothing changed.
    let before = server.admin_ok(&["admin-token", "list", "--json"]);
    assert_failed(
        &server.admin(&["admin-token", "create", "--name", "x", "--role", "root"]),
        2,
        "invalid role",
    );
    assert_failed(
        &server.admin(&["admin-token", "create", "--name", "../x", "--role", "read"]),
        2,
        "invalid admin token name",
    );
    assert_failed(
        &server.admin(&["admin-token", "create", "--role", "read"]),
        2,
        "needs --name",
    );
    assert_failed(&server.admin(&["admin-token", "revoke"]), 2, "needs a NAME");
    assert_failed(
        &server.admin(&["admin-token", "create", "--name", "boss", "--role", "read"]),
        1,
        "exists already",
    );
    assert_failed(
        &server.admin(&["admin-token", "revoke", "nobody"]),
        1,
        "no admin token",
    );
    for body in [
        "not json",
        r#"{"name":"ok","role":"superuser"}"#,
        r#"{"name":"","role":"read"}"#,
        r#"{"name":"ok","role":"read","ttl_ms":0}"#,
    ] {
        let (status, answer) =
            client.post_auth("/v1/admin/admin-tokens", &server.admin_token, body);
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(answer.starts_with(r#"{"error":"#), "{answer}");
    }
    let (status, _) = client.post_auth(
        "/v1/admin/admin-tokens/nobody/revoke",
        &server.admin_token,
        "",
    );
    assert_eq!(status, 404);
    assert_eq!(server.admin_ok(&["admin-token", "list", "--json"]), before);
    let (status, _) = client.get_auth("/v1/admin/whoami", "not-a-token");
    assert_eq!(status, 401);
}

fn make_with_ttl(server: &Server, name: &str, ttl: &str) -> String {
    server
        .admin_ok(&[
            "admin-token",
            "create",
            "--name",
            name,
            "--role",
            "read",
            "--ttl",
            ttl,
        ])
        .trim()
        .to_owned()
}

#[test]
fn the_audit_log_says_who_did_what_from_where_refusals_too() {
    let mut server = Server::start();
    let agent = AgentDir::new();
    let id = agent.enroll(&server, "audited");
    let mut proc = agent.run();
    server.wait_for_agent(&id, "heartbeating", |a| a.heartbeat_seq >= 2);
    let viewer = server
        .admin_ok(&[
            "admin-token",
            "create",
            "--name",
            "viewer",
            "--role",
            "read",
        ])
        .trim()
        .to_owned();
    let client = server.client();

    server.admin_ok(&["agents", "deactivate", &id]);
    let config = server.dir.join("global.json");
    fs::write(&config, r#"{"log_level":"info"}"#).unwrap();
    server.admin_ok(&[
        "config",
        "set",
        "--scope",
        "global",
        config.to_str().unwrap(),
    ]);
    server.admin_ok(&["agents", "activate", &id]);
    assert_failed(
        &admin_as(&server, &viewer, &["agents", "revoke", &id]),
        1,
        "needs role admin",
    );
    let (status, _) = client.get_auth("/v1/admin/agents", "wrong-token");
    assert_eq!(status, 401);
    let (status, _) = client.post_auth(
        &format!("/v1/admin/agents/{id}/update"),
        &server.admin_token,
        r#"{"release":"9.9.9"}"#,
    );
    assert_eq!(status, 404);
    let refused =
        AgentDir::new().bootstrap(&server, "zzzzzz.0123456789abcdefghijklmnopqrstuv", &[]);
    assert!(!refused.status.success());

    let enrolled = wait_for_line(&server, "of the enrollment", |e| {
        e.action == "agent.enroll" && e.outcome == "ok"
    });
    assert_eq!(
        (enrolled.actor.as_str(), enrolled.target.as_str()),
        (id.as_str(), id.as_str())
    );
    assert_eq!(enrolled.source, "127.0.0.1");
    assert!(enrolled.time.ends_with('Z'));
    let deactivated = wait_for_line(&server, "of the deactivation", |e| {
        e.action == "agent.deactivate"
    });
    assert_eq!(
        (
            deactivated.actor.as_str(),
            deactivated.source.as_str(),
            deactivated.target.as_str(),
            deactivated.outcome.as_str()
        ),
        ("root", "127.0.0.1", id.as_str(), "ok")
    );
    let set = wait_for_line(&server, "of the config set", |e| e.action == "config.set");
    assert_eq!(
        (set.actor.as_str(), set.target.as_str()),
        ("root", "global")
    );
    let forbidden = wait_for_line(&server, "of the refused revocation", |e| {
        e.action == "agent.revoke"
    });
    assert_eq!(
        (
            forbidden.actor.as_str(),
            forbidden.outcome.as_str(),
            forbidden.target.as_str()
        ),
        ("viewer", "refused", id.as_str())
    );
    assert!(
        forbidden.detail.contains("needs role admin"),
        "{forbidden:?}"
    );
    let unknown = wait_for_line(&server, "of the bad token", |e| {
        e.action == "agents.list" && e.outcome == "refused"
    });
    assert_eq!(
        (unknown.actor.as_str(), unknown.source.as_str()),
        ("", "127.0.0.1")
    );
    let missing = wait_for_line(&server, "of the update of a missing release", |e| {
        e.action == "agent.update_offered"
    });
    assert_eq!(
        (missing.actor.as_str(), missing.outcome.as_str()),
        ("root", "refused")
    );
    let bad_enroll = wait_for_line(&server, "of the refused enrollment", |e| {
        e.action == "agent.enroll" && e.outcome == "refused"
    });
    assert_eq!(bad_enroll.target, "zzzzzz");
    let admin_made = wait_for_line(&server, "of the admin token", |e| {
        e.action == "admin_token.create" && e.target == "viewer"
    });
    assert_eq!(admin_made.actor, "root");
    // A renewal is the agent's own act, from its address.
    server.admin_ok(&["agents", "renew", &id]);
    let renewed = wait_for_line(&server, "of the renewal", |e| {
        e.action == "agent.certificate" && e.detail.starts_with("renewal")
    });
    assert_eq!(
        (
            renewed.actor.as_str(),
            renewed.source.as_str(),
            renewed.target.as_str()
        ),
        (id.as_str(), "127.0.0.1", id.as_str())
    );
    let asked = wait_for_line(&server, "of the renewal request", |e| {
        e.action == "agent.renew_requested"
    });
    assert_eq!(asked.actor, "root");
    let all = audit_lines(&server, &[]);
    assert!(
        all.iter().all(|e| e.action != "agent.heartbeat"),
        "heartbeats are not audited"
    );
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq), "oldest first");

    // Filters.
    let by_agent = audit_lines(&server, &["--agent", &id]);
    assert!(
        by_agent.iter().all(|e| e.actor == id || e.target == id),
        "{by_agent:#?}"
    );
    assert!(by_agent.iter().any(|e| e.action == "agent.deactivate"));
    let by_viewer = audit_lines(&server, &["--actor", "viewer"]);
    assert!(!by_viewer.is_empty() && by_viewer.iter().all(|e| e.actor == "viewer"));
    assert_eq!(audit_lines(&server, &["--since", "1h"]).len(), all.len());
    assert!(audit_lines(&server, &["--since", "2099-01-01T00:00:00Z"]).is_empty());
    let table = server.admin_ok(&["audit", "--actor", "root"]);
    assert!(
        table.contains("agent.deactivate") && !table.contains('{'),
        "{table}"
    );

    // The API pages, oldest first, and `next` leads through all of them.
    let mut paged = Vec::new();
    let mut after = String::new();
    loop {
        let (status, body) = client.get_auth(&format!("/v1/admin/audit?limit=2{after}"), &viewer);
        assert_eq!(status, 200, "{body}");
        let page: AuditPage = miniserde::json::from_str(&body).unwrap();
        assert!(page.entries.len() <= 2);
        paged.extend(page.entries);
        match page.next {
            Some(n) => after = format!("&after={n}"),
            None => break,
        }
    }
    let total = audit_lines(&server, &[]);
    assert_eq!(paged, total[..paged.len()], "pages give the log in order");
    let (_, body) = client.get_auth(&format!("/v1/admin/audit?agent={id}&limit=1000"), &viewer);
    let page: AuditPage = miniserde::json::from_str(&body).unwrap();
    assert!(page.next.is_none() && !page.entries.is_empty());

    // Bad input: 400, and no way to change or delete a line.
    for query in [
        "limit=0",
        "limit=1001",
        "limit=x",
        "since=yesterday",
        "after=-1",
        "agent=",
    ] {
        let (status, body) = client.get_auth(&format!("/v1/admin/audit?{query}"), &viewer);
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body.starts_with(r#"{"error":"#), "{body}");
    }
    assert_failed(
        &server.admin(&["audit", "--since", "yesterday"]),
        2,
        "--since",
    );
    for method_path in ["/v1/admin/audit", "/v1/admin/audit/0"] {
        let (status, _) = client.post_auth(method_path, &server.admin_token, "{}");
        assert_eq!(status, 404, "{method_path}");
    }

    // It survives a restart.
    let before = audit_lines(&server, &[]);
    server.kill();
    server.serve_same_port(&ServerOptions::default());
    let after_restart = audit_lines(&server, &[]);
    assert!(after_restart.len() >= before.len());
    assert_eq!(after_restart[..before.len()], before[..]);
    proc.kill();
}

#[test]
fn a_backup_under_heartbeat_load_restores_a_server_the_agents_keep_using() {
    let opts = ServerOptions::default();
    let mut server = Server::start_with(opts.clone());
    let agents: Vec<AgentDir> = (0..3).map(|_| AgentDir::new()).collect();
    let ids: Vec<String> = agents
        .iter()
        .enumerate()
        .map(|(i, a)| a.enroll(&server, &format!("box{i}")))
        .collect();
    let mut procs: Vec<_> = agents.iter().map(AgentDir::run).collect();
    for id in &ids {
        server.wait_for_agent(id, "heartbeating", |a| a.heartbeat_seq >= 2);
    }

    // Taken while the agents heartbeat: the server is not stopped.
    let with_key = server.dir.join("with-key.backup");
    let without_key = server.dir.join("without-key.backup");
    let out = server.admin_ok(&[
        "backup",
        "--out",
        with_key.to_str().unwrap(),
        "--include-ca-key",
    ]);
    assert!(out.contains("CA key included"), "{out}");
    server.admin_ok(&["backup", "--out", without_key.to_str().unwrap()]);
    for file in [&with_key, &without_key] {
        let mode = fs::metadata(file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", file.display());
    }
    let taken = wait_for_line(&server, "of the backup", |e| e.action == "server.backup");
    assert_eq!(taken.actor, "root");
    let ca_key = fs::read(server.data.join("ca.key")).unwrap();
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    assert!(contains(&fs::read(&with_key).unwrap(), &ca_key));
    assert!(
        !contains(&fs::read(&without_key).unwrap(), &ca_key),
        "no CA key unless asked"
    );

    // Restore refuses a non-empty dir and a damaged file, changing nothing.
    let busy = server.dir.join("busy");
    fs::create_dir_all(&busy).unwrap();
    fs::write(busy.join("keep"), "x").unwrap();
    let restore = |from: &std::path::Path, to: &std::path::Path| {
        run(Command::new(bin("stella-server"))
            .args(["restore", "--from"])
            .arg(from)
            .arg("--data-dir")
            .arg(to))
    };
    assert_failed(&restore(&with_key, &busy), 1, "not empty");
    assert_eq!(fs::read_dir(&busy).unwrap().count(), 1);
    let bytes = fs::read(&with_key).unwrap();
    let damaged = server.dir.join("damaged.backup");
    fs::write(&damaged, &bytes[..bytes.len() / 2]).unwrap();
    let empty = server.dir.join("empty");
    assert_failed(&restore(&damaged, &empty), 1, "damaged");
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 0x20;
    fs::write(&damaged, &flipped).unwrap();
    assert_failed(&restore(&damaged, &empty), 1, "checksum does not match");
    fs::write(&damaged, "hello\n").unwrap();
    assert_failed(&restore(&damaged, &empty), 1, "not a Stella backup");
    assert!(!empty.exists() || fs::read_dir(&empty).unwrap().count() == 0);
    assert_failed(
        &run(Command::new(bin("stella-server")).args(["restore", "--from", "x"])),
        2,
        "needs --data-dir",
    );

    let restored = server.dir.join("restored");
    let out = restore(&with_key, &restored);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("agents: 3") && stdout.contains("CA key: included"),
        "{stdout}"
    );
    assert_eq!(
        fs::metadata(restored.join("ca.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    // The first server stops; the restored one takes its address, and the
    // agents carry on against it: same CA, same ids, still active.
    let seqs: Vec<u64> = ids
        .iter()
        .map(|id| server.agent(id).heartbeat_seq)
        .collect();
    server.kill();
    server.data = restored;
    server.serve_same_port(&opts);
    for (id, seq) in ids.iter().zip(&seqs) {
        let view = server.wait_for_agent(id, "heartbeating against the restored server", |a| {
            a.status == "active" && a.heartbeat_seq > seq + 1
        });
        assert!(view.reason.is_none());
    }
    let listed = server.admin_ok(&["agents", "list"]);
    for id in &ids {
        assert!(listed.contains(id.as_str()), "{listed}");
    }
    // With the CA key it enrolls, too.
    AgentDir::new().enroll(&server, "after-restore");

    // Without the CA key: it serves the fleet's records, and refuses to
    // enroll with a clear error (not a crash).
    let keyless = server.dir.join("keyless");
    let out = restore(&without_key, &keyless);
    let (stdout, _) = text(&out);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("refuses to enroll, renew or recover"),
        "{stdout}"
    );
    assert!(!keyless.join("ca.key").exists());
    server.kill();
    server.data = keyless;
    server.serve_same_port(&opts);
    for id in &ids {
        server.wait_for_agent(id, "heartbeating against the keyless server", |a| {
            a.status == "active"
        });
    }
    let token = server.token(&[]);
    let out = AgentDir::new().bootstrap(&server, &token, &[]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(stderr.contains("no CA key"), "{stdout}{stderr}");
    let failed = wait_for_line(&server, "of the keyless enrollment", |e| {
        e.action == "agent.enroll" && e.outcome == "failed"
    });
    assert!(failed.detail.contains("--include-ca-key"), "{failed:?}");
    assert!(server.proc.try_exit_code().is_none(), "still serving");
    let (_, body) = server
        .client()
        .get_auth("/v1/admin/whoami", &server.admin_token);
    assert!(body.contains("root"), "{body}");
    for p in &mut procs {
        p.kill();
    }
}
