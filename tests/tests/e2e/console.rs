//! The web console in a real browser (docs/design.md section 15): headless
//! Chromium driven over WebDriver logs in with the admin token, sees the
//! fleet, filters it, opens an agent and revokes it (confirmed), which
//! `stella-server agents list` then shows; a wrong token gets a clear
//! message. A screenshot of each page goes to `target/ui-screenshots/`.

use stella_tests::release::{Keys, import, signed_release};
use stella_tests::webdriver::{Browser, screenshot_dir};
use stella_tests::{AgentDir, DEADLINE, Server, bin, poll, text, tool};

/// Enrolls an agent named `name` with `label` and starts it.
fn agent(server: &Server, name: &str, label: &str) -> (AgentDir, String) {
    let token = server.token(&["--ttl", "10m", "--label", label]);
    let dir = AgentDir::new();
    let out = dir.bootstrap(server, &token, &["--name", name]);
    assert!(out.status.success(), "{:?}", text(&out));
    let id = text(&out).0.trim().to_owned();
    (dir, id)
}

#[test]
fn the_console_shows_the_fleet_and_revokes_an_agent() {
    let Some(browser) = Browser::start("console") else {
        return;
    };
    let server = Server::start();
    let agents = [
        agent(&server, "edge-north-1", "site=north"),
        agent(&server, "edge-north-2", "site=north"),
        agent(&server, "edge-south-1", "site=south"),
    ];
    let _running: Vec<_> = agents.iter().map(|(dir, _)| dir.run()).collect();
    let south = agents[2].1.clone();
    poll(DEADLINE, || {
        let all = server.agents();
        (all.len() == 3
            && all
                .iter()
                .all(|a| a.status == "active" && a.heartbeat_seq > 0))
        .then_some(())
    })
    .unwrap_or_else(|| panic!("3 active agents; got {:?}", server.agents()));

    // The console is served with a strict policy, and without a token.
    let head = tool(
        "curl",
        &[
            "-sS",
            "-o",
            "/dev/null",
            "-D",
            "-",
            "--cacert",
            &server.ca_pem().display().to_string(),
            &format!("{}/ui/", server.url),
        ],
    );
    let head = text(&head).0.to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains("content-security-policy: default-src 'self'"),
        "{head}"
    );
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");
    assert!(!head.contains("set-cookie"), "{head}");

    let shots = screenshot_dir();
    browser.goto(&format!("{}/ui/", server.url));
    browser.wait_for("#token");
    browser.screenshot(&shots.join("login.png"));

    // A wrong token: a clear message, and still the login form.
    browser.type_into("#token", "not-the-admin-token");
    browser.click("#login-button");
    browser.wait_for("#login-error");
    let message = browser.text("#login-error");
    assert!(message.contains("token was refused"), "{message}");
    assert!(message.contains("admin token is not valid"), "{message}");
    browser.screenshot(&shots.join("login-wrong-token.png"));

    // The right one: the fleet overview with 3 active agents.
    browser.type_into("#token", &server.admin_token);
    browser.click("#login-button");
    browser.wait_until("3 active agents shown", |b| {
        b.text("#count-active") == "3" && b.find_all("#agents-table tbody tr[data-id]").len() == 3
    });
    let rows = browser.texts("#agents-table tbody tr[data-id]");
    for (_, id) in &agents {
        assert!(
            rows.iter().any(|r| r.contains(id.as_str())),
            "{id} in {rows:?}"
        );
    }
    // The token lives in the tab's sessionStorage, not in a cookie.
    let stored =
        browser.execute("return [sessionStorage.getItem('stella.token'), document.cookie];");
    match stored {
        miniserde::json::Value::Array(v) => {
            assert!(
                matches!(&v[0], miniserde::json::Value::String(t) if *t == server.admin_token),
                "{v:?}"
            );
            assert!(
                matches!(&v[1], miniserde::json::Value::String(c) if c.is_empty()),
                "{v:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    browser.screenshot(&shots.join("fleet.png"));

    // Filter by label: only the southern agent.
    browser.type_into("#filter-label", "site=south");
    browser.click("#filter-apply");
    browser.wait_until("the label filter applied", |b| {
        let rows = b.texts("#agents-table tbody tr[data-id]");
        rows.len() == 1 && rows[0].contains("edge-south-1")
    });
    browser.screenshot(&shots.join("fleet-filtered.png"));

    // Open it: its details.
    browser.click("#agents-table tbody tr[data-id] a");
    browser.wait_until("the agent's page", |b| {
        b.text("#agent-title") == "edge-south-1" && b.text("#agent-fields").contains(&south)
    });
    let fields = browser.text("#agent-fields");
    for want in ["active", "site=south", "Certificate expires"] {
        assert!(fields.contains(want), "{want} in {fields}");
    }
    assert!(browser.text("#agent-update").contains("idle"));
    browser.screenshot(&shots.join("agent.png"));

    // Revoke, after a confirmation.
    browser.click("button[data-action=revoke]");
    browser.wait_for("#confirm-dialog");
    assert!(browser.text("#confirm-text").contains("cannot be undone"));
    browser.screenshot(&shots.join("agent-revoke-confirm.png"));
    browser.click("#confirm-yes");
    browser.wait_until("the page showing the agent revoked", |b| {
        b.text("#agent-fields").contains("revoked")
    });
    assert!(
        browser.find_all("button[data-action]").is_empty(),
        "a revoked agent offers no action"
    );
    let listed = server.admin_ok(&["agents", "list"]);
    let line = listed
        .lines()
        .find(|l| l.contains(&south))
        .unwrap_or_else(|| panic!("{south} in {listed}"));
    assert!(line.contains("revoked"), "{listed}");
    browser.screenshot(&shots.join("agent-revoked.png"));

    // A rollout to the northern agents (which pin no release key, so it
    // stays running): pause, resume and abort it, each confirmed.
    let keys = Keys::new();
    let release = signed_release(&keys, "9.9.9", &bin("stella-agent"), &[]);
    import(&server, &release);
    let rollout = server
        .admin_ok(&[
            "rollout",
            "start",
            "--release",
            "9.9.9",
            "--stages",
            "count:1,100",
            "--soak",
            "1h",
            "--max-failures",
            "1.0",
            "--selector",
            "site=north",
        ])
        .trim()
        .to_owned();
    browser.goto(&format!("{}/ui/#/rollouts", server.url));
    let card = format!(".rollout[data-id='{rollout}']");
    browser.wait_until("the rollout with its stages", |b| {
        let text = b.text(&card);
        text.contains("9.9.9") && text.contains("count:1") && text.contains("running")
    });
    assert_eq!(browser.find_all(&format!("{card} progress")).len(), 2);
    browser.screenshot(&shots.join("rollouts.png"));
    for (action, status) in [
        ("pause", "paused"),
        ("resume", "running"),
        ("abort", "aborted"),
    ] {
        browser.click(&format!("{card} button[data-action={action}]"));
        browser.wait_for("#confirm-dialog");
        browser.click("#confirm-yes");
        browser.wait_until(&format!("the rollout {status}"), |b| {
            b.text(&format!("{card} h2")).contains(status)
        });
        let shown = server.admin_ok(&["rollout", "show", &rollout]);
        assert!(shown.contains(status), "{action}: {shown}");
    }
    assert!(
        browser.find_all(&format!("{card} button")).is_empty(),
        "an aborted rollout offers no action"
    );

    // The other pages render (and keep refreshing without a reload).
    for (page, ready) in [("config", "#config-doc"), ("audit", "#audit-table")] {
        browser.goto(&format!("{}/ui/#/{page}", server.url));
        browser.wait_for(ready);
        browser.wait_until(&format!("the {page} page loaded"), |b| {
            !b.text("#refreshed").is_empty()
        });
        browser.screenshot(&shots.join(format!("{page}.png")));
    }
    browser.goto(&format!("{}/ui/#/fleet", server.url));
    browser.wait_until("the overview counting the revocation", |b| {
        b.text("#count-revoked") == "1" && b.text("#count-active") == "2"
    });

    // A read-only token sees everything and no action button. (Only on a
    // server with scoped tokens, which answers `GET /v1/admin/whoami`; the
    // console treats a server without it as having one admin token.)
    let (whoami, _) = server
        .client()
        .get_auth("/v1/admin/whoami", &server.admin_token);
    if whoami == 200 {
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
        browser.click("#logout");
        browser.type_into("#token", &viewer);
        browser.click("#login-button");
        browser.wait_until("the fleet for the read token", |b| {
            b.text("#count-active") == "2" && b.text("#who").contains("read")
        });
        let north = &agents[0].1;
        browser.goto(&format!("{}/ui/#/agent/{north}", server.url));
        browser.wait_until("the agent's page for the read token", |b| {
            b.text("#agent-fields").contains(north.as_str())
        });
        assert!(
            browser.find_all("#agent-actions button").is_empty(),
            "a read token sees no action"
        );
        browser.screenshot(&shots.join("agent-read-only.png"));
    }
}
