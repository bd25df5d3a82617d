//! The admin commands' client side: find the running server (from the data
//! dir, or `--server`/`--ca`/`STELLA_ADMIN_TOKEN`), call the admin API, print
//! tables or JSON.

use std::sync::Arc;
use std::time::Duration;

use miniserde::json;
use stella_proto::admin::{
    AdminTokenCreateRequest, AdminTokenCreateResponse, AdminTokenView, AuditEntry, AuditPage,
    BackupRequest,
};
use stella_proto::api::{
    AgentUpdateRequest, AgentView, ConfigScopeView, ConfigSetRequest, ConfigShowResponse,
    DoctorAsk, DoctorAsked, DoctorReportView, DriftRow, ErrorBody, FleetDoctorReport, Labels,
    ReleaseImportRequest, ReleaseView, RolloutStartRequest, RolloutView, TaskCreated, TaskView,
    TokenCreateRequest, TokenCreateResponse,
};

use crate::cli::{AdminTarget, AgentAction};
use crate::error::Error;
use crate::fsutil::read_text;
use crate::refusal::Refusal;
use crate::serve::{ADMIN_TOKEN_FILE, URL_FILE};

/// `println!` for human-readable output that returns the write error (see
/// `log::print`). Control characters are shown escaped (`\u{1b}`): agents
/// choose many of these strings, and must not drive the operator's terminal.
macro_rules! outln {
    ($($arg:tt)*) => {
        crate::log::print(format_args!(
            "{}\n",
            crate::log::Escaped(&format!($($arg)*))
        ))?
    };
}

/// `println!` for JSON text, as it is: JSON escapes control characters
/// itself, and `--json` output stays byte for byte what the server sent.
macro_rules! outln_json {
    ($text:expr) => {
        crate::log::print(format_args!("{}\n", $text))?
    };
}

/// Largest answer read (a backup is the largest: the store and the release
/// blobs).
const MAX_ANSWER_BYTES: u64 = 16 * 1024 * 1024 * 1024;

/// A connection to the admin API.
pub(crate) struct AdminClient {
    agent: ureq::Agent,
    base: String,
    token: String,
}

impl AdminClient {
    /// Finds the server and credentials for `target`.
    pub(crate) fn connect(target: &AdminTarget) -> Result<Self, Error> {
        let dir = &target.data_dir;
        let base = match &target.server {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => read_text(&dir.join(URL_FILE))
                .map_err(|e| {
                    Error::client(
                        format!(
                            "is `stella-server serve --data-dir {}` running?",
                            dir.display()
                        ),
                        e,
                    )
                })?
                .trim()
                .to_owned(),
        };
        let ca_path = target
            .ca
            .clone()
            .unwrap_or_else(|| dir.join(crate::ca::CA_CERT));
        let ca_pem = read_text(&ca_path)?;
        let token = match std::env::var("STELLA_ADMIN_TOKEN") {
            Ok(t) if !t.trim().is_empty() => t.trim().to_owned(),
            _ => read_text(&dir.join(ADMIN_TOKEN_FILE))
                .map_err(|e| Error::client("no admin token (set STELLA_ADMIN_TOKEN)", e))?
                .trim()
                .to_owned(),
        };
        let ca = ureq::tls::Certificate::from_pem(ca_pem.as_bytes())
            .map_err(|e| Error::crypto(ca_path.display().to_string(), e))?;
        let tls = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .root_certs(ureq::tls::RootCerts::new_with_certs(&[ca]))
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .build();
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .https_only(true)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .new_agent();
        Ok(Self { agent, base, token })
    }

    fn call(&self, method: &str, path: &str, body: Option<String>) -> Result<String, Error> {
        let bytes = self.call_bytes(method, path, body)?;
        self.text(bytes)
    }

    fn text(&self, bytes: Vec<u8>) -> Result<String, Error> {
        String::from_utf8(bytes).map_err(|_| Error::Client {
            context: format!("the answer from {} is not UTF-8", self.base),
            source: None,
        })
    }

    fn call_bytes(&self, method: &str, path: &str, body: Option<String>) -> Result<Vec<u8>, Error> {
        let url = format!("{}{path}", self.base);
        let auth = format!("Bearer {}", self.token);
        let result = match body {
            Some(b) => self
                .agent
                .post(&url)
                .header("authorization", &auth)
                .content_type("application/json")
                .send(b),
            None if method == "POST" => self
                .agent
                .post(&url)
                .header("authorization", &auth)
                .send_empty(),
            None => self.agent.get(&url).header("authorization", &auth).call(),
        };
        self.answer(result)
    }

    /// POSTs the file at `file` as the body, streamed, without the global
    /// timeout (an image archive may take a while).
    fn upload(&self, path: &str, file: &std::path::Path) -> Result<String, Error> {
        let body = std::fs::File::open(file)
            .map_err(|e| Error::io(format!("cannot read {}", file.display()), e))?;
        let url = format!("{}{path}", self.base);
        let result = self
            .agent
            .post(&url)
            .config()
            .timeout_global(None)
            .timeout_send_body(Some(Duration::from_secs(60)))
            .build()
            .header("authorization", &format!("Bearer {}", self.token))
            .content_type("application/octet-stream")
            .send(body);
        self.text(self.answer(result)?)
    }

    fn answer(
        &self,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Vec<u8>, Error> {
        let mut resp =
            result.map_err(|e| Error::client(format!("cannot reach {}", self.base), e))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER_BYTES)
            .read_to_vec()
            .map_err(|e| Error::client(format!("reading the answer from {}", self.base), e))?;
        if (200..300).contains(&status) {
            Ok(bytes)
        } else {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let message = json::from_str::<ErrorBody>(&text).map_or(text, |b| b.error);
            Err(Error::Api { status, message })
        }
    }

    fn parse<T: miniserde::Deserialize>(text: &str) -> Result<T, Error> {
        // miniserde's error carries no detail: the message says what was expected.
        json::from_str(text).map_err(|_| Error::Client {
            context: "the server's answer is not the expected JSON".into(),
            source: None,
        })
    }
}

/// `token create`: prints the token only.
pub(crate) fn token_create(
    target: &AdminTarget,
    ttl: Duration,
    uses: u32,
    labels: Labels,
) -> Result<(), Error> {
    let client = AdminClient::connect(target)?;
    let body = TokenCreateRequest {
        ttl_ms: ttl.as_millis() as u64,
        uses,
        labels,
    };
    let answer: TokenCreateResponse = AdminClient::parse(&client.call(
        "POST",
        "/v1/admin/tokens",
        Some(json::to_string(&body)),
    )?)?;
    outln!("{}", answer.token);
    Ok(())
}

fn labels_text(labels: &Labels) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `agents list`.
pub(crate) fn agents_list(target: &AdminTarget, as_json: bool) -> Result<(), Error> {
    let client = AdminClient::connect(target)?;
    // The server answers in pages (id order); follow them.
    const PAGE: usize = 1000;
    let mut agents: Vec<AgentView> = Vec::new();
    loop {
        let after = agents.last().map_or(String::new(), |a| a.id.clone());
        let page: Vec<AgentView> = AdminClient::parse(&client.call(
            "GET",
            &format!("/v1/admin/agents?limit={PAGE}&after={after}"),
            None,
        )?)?;
        let done = page.len() < PAGE;
        agents.extend(page);
        if done {
            break;
        }
    }
    if as_json {
        outln_json!(json::to_string(&agents));
        return Ok(());
    }
    agents.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
    let rows: Vec<[String; 7]> = agents
        .iter()
        .map(|a| {
            let status = match &a.reason {
                Some(r) => format!("{} ({r})", a.status),
                None => a.status.to_string(),
            };
            [
                a.id.clone(),
                a.name.clone(),
                status,
                a.version.clone(),
                a.target.clone(),
                a.last_heartbeat.clone().unwrap_or_else(|| "-".into()),
                labels_text(&a.labels),
            ]
        })
        .collect();
    let header = [
        "ID",
        "NAME",
        "STATUS",
        "VERSION",
        "TARGET",
        "LAST HEARTBEAT",
        "LABELS",
    ];
    // Escaped before measuring, so that columns line up even around a
    // control character.
    let rows: Vec<[String; 7]> = rows
        .into_iter()
        .map(|row| row.map(|cell| crate::log::Escaped(&cell).to_string()))
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let print_row = |cells: &[&str]| -> Result<(), Error> {
        let line: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        outln!("{}", line.join("  ").trim_end());
        Ok(())
    };
    print_row(&header)?;
    for row in &rows {
        print_row(&row.each_ref().map(String::as_str))?;
    }
    Ok(())
}

fn print_agent(a: &AgentView) -> Result<(), Error> {
    let field = |k: &str, v: &str| -> Result<(), Error> {
        outln!("{k:<16}{v}");
        Ok(())
    };
    field("id", &a.id)?;
    field("name", &a.name)?;
    field(
        "status",
        &match &a.reason {
            Some(r) => format!("{} ({r})", a.status),
            None => a.status.to_string(),
        },
    )?;
    field("version", &a.version)?;
    field("target", &a.target)?;
    field(
        "platform",
        &format!("{}/{}", a.platform.os, a.platform.arch),
    )?;
    field("labels", &labels_text(&a.labels))?;
    field("capabilities", &a.capabilities.join(","))?;
    field("enrolled at", &a.enrolled_at)?;
    field("last heartbeat", a.last_heartbeat.as_deref().unwrap_or("-"))?;
    field("heartbeat seq", &a.heartbeat_seq.to_string())?;
    field("uptime", &format!("{}s", a.uptime_s))?;
    field(
        "certificate",
        &format!("serial {} until {}", a.cert_serial, a.cert_not_after),
    )?;
    field("config hash", a.config_hash.as_deref().unwrap_or("-"))?;
    if let Some(e) = &a.config_error {
        field("config refused", e)?;
    }
    let d = &a.doctor;
    field(
        "doctor",
        &format!(
            "{} pass, {} warn, {} fail, {} skip",
            d.pass, d.warn, d.fail, d.skip
        ),
    )?;
    let progress = match (a.update.bytes, a.update.total) {
        (Some(bytes), Some(total)) => format!(" ({bytes} of {total} bytes)"),
        (Some(bytes), None) => format!(" ({bytes} bytes)"),
        _ => String::new(),
    };
    field(
        "update",
        &format!("{} {}{progress}", a.update.state, a.update.version),
    )?;
    if let Some(error) = &a.update.error {
        field("update error", error)?;
    }
    if let Some(f) = &a.last_failure {
        field(
            "last failure",
            &format!(
                "{} {} at {}: {}",
                f.phase, f.version, f.received_at, f.reason
            ),
        )?;
        for line in &f.lines {
            outln!("  | {line}");
        }
    }
    Ok(())
}

/// `agents show ID`.
pub(crate) fn agents_show(target: &AdminTarget, id: &str, as_json: bool) -> Result<(), Error> {
    let client = AdminClient::connect(target)?;
    let text = client.call("GET", &format!("/v1/admin/agents/{id}"), None)?;
    if as_json {
        outln_json!(text);
    } else {
        print_agent(&AdminClient::parse(&text)?)?;
    }
    Ok(())
}

/// `agents doctor ID|--selector`: asks for a report at the next heartbeat.
pub(crate) fn agents_doctor(
    target: &AdminTarget,
    id: Option<&str>,
    selector: Labels,
    remediate_dry_run: bool,
) -> Result<(), Error> {
    let client = AdminClient::connect(target)?;
    let (path, selector) = match id {
        Some(id) => (format!("/v1/admin/agents/{id}/doctor"), None),
        None => ("/v1/admin/doctor".to_owned(), Some(selector)),
    };
    let body = DoctorAsk {
        remediate_dry_run,
        selector,
    };
    let answer: DoctorAsked =
        AdminClient::parse(&client.call("POST", &path, Some(json::to_string(&body)))?)?;
    if answer.asked.is_empty() {
        outln!("no agent matches the selector");
    }
    for id in &answer.asked {
        outln!("{id}: doctor report requested; it reports after its next heartbeat");
    }
    Ok(())
}

/// `agents show ID --doctor`: the last report asked for, with its time.
pub(crate) fn doctor_show(target: &AdminTarget, id: &str, as_json: bool) -> Result<(), Error> {
    let client = AdminClient::connect(target)?;
    let text = client.call("GET", &format!("/v1/admin/agents/{id}/doctor"), None)?;
    if as_json {
        outln_json!(text);
        return Ok(());
    }
    let view: DoctorReportView = AdminClient::parse(&text)?;
    let (Some(at), Some(report)) = (&view.received_at, &view.report) else {
        match view.pending {
            true => outln!("{id}: no doctor report yet; one is requested"),
            false => outln!("{id}: no doctor report; ask with `agents doctor {id}`"),
        }
        return Ok(());
    };
    outln!("doctor report of {id}, received {at}");
    for c in &report.checks {
        outln!("{:<5} {:<24} {:<32} {}", c.status, c.id, c.code, c.message);
    }
    let s = &report.summary;
    outln!(
        "{} pass, {} warn, {} fail, {} skip",
        s.pass,
        s.warn,
        s.fail,
        s.skip
    );
    if let Some(plan) = &report.remediation {
        outln!("remediation dry run (nothing was changed):");
        if plan.actions.is_empty() {
            outln!("  nothing to remediate");
        }
        for a in &plan.actions {
            outln!("  {:<32} {:<30} {}", a.check, a.pattern, a.result);
        }
    }
    if view.pending {
        outln!("(a newer report is requested)");
    }
    Ok(())
}

/// `doctor-report --selector`: failing and warning checks across agents.
pub(crate) fn doctor_report(
    target: &AdminTarget,
    selector: Labels,
    as_json: bool,
) -> Result<(), Error> {
    let client = AdminClient::connect(target)?;
    let body = DoctorAsk {
        remediate_dry_run: false,
        selector: Some(selector),
    };
    let text = client.call(
        "POST",
        "/v1/admin/doctor-report",
        Some(json::to_string(&body)),
    )?;
    if as_json {
        outln_json!(text);
        return Ok(());
    }
    let report: FleetDoctorReport = AdminClient::parse(&text)?;
    outln!(
        "{} agents selected, {} with a report, {} pending",
        report.agents,
        report.reported,
        report.pending.len()
    );
    if report.checks.is_empty() {
        outln!("no failing or warning checks");
    }
    for c in &report.checks {
        outln!("{:<24} {} fail, {} warn", c.id, c.fail.len(), c.warn.len());
        if !c.fail.is_empty() {
            outln!("  fail: {}", c.fail.join(" "));
        }
        if !c.warn.is_empty() {
            outln!("  warn: {}", c.warn.join(" "));
        }
    }
    Ok(())
}

/// `agents deactivate|activate|revoke ID`.
pub(crate) fn agents_act(target: &AdminTarget, id: &str, action: AgentAction) -> Result<(), Error> {
    let client = AdminClient::connect(target)?;
    let text = client.call(
        "POST",
        &format!("/v1/admin/agents/{id}/{}", action.as_str()),
        None,
    )?;
    let agent: AgentView = AdminClient::parse(&text)?;
    if let AgentAction::Renew = action {
        outln!(
            "{}: renewal requested; it renews at its next heartbeat",
            agent.id
        );
        return Ok(());
    }
    match agent.reason {
        Some(r) => outln!("{} {} ({r})", agent.id, agent.status),
        None => outln!("{} {}", agent.id, agent.status),
    }
    Ok(())
}

/// `config set --scope S FILE.json`: stores a new version of that scope.
pub(crate) fn config_set(
    target: &AdminTarget,
    scope: &str,
    file: &std::path::Path,
) -> Result<(), Error> {
    let text = read_text(file)?;
    let doc = stella_proto::config::parse(&text)
        .ok_or_else(|| Refusal::bad_request(format!("{} is not valid JSON", file.display())))?;
    // Agents validate what they get; warn now about what they would refuse.
    if let Err(e) = stella_proto::config::parse_settings(&doc) {
        eprintln!("warning: agents will refuse this config on its own: {e}");
    }
    let client = AdminClient::connect(target)?;
    let body = ConfigSetRequest {
        scope: scope.to_owned(),
        config: doc,
    };
    let view: ConfigScopeView = AdminClient::parse(&client.call(
        "POST",
        "/v1/admin/config",
        Some(json::to_string(&body)),
    )?)?;
    outln!("{} version {} hash {}", view.scope, view.version, view.hash);
    Ok(())
}

/// `config show [--agent ID]`: the effective config and its hash.
pub(crate) fn config_show(target: &AdminTarget, agent: Option<&str>) -> Result<(), Error> {
    let client = AdminClient::connect(target)?;
    let path = match agent {
        Some(id) => format!("/v1/admin/config?agent={id}"),
        None => "/v1/admin/config".to_owned(),
    };
    let view: ConfigShowResponse = AdminClient::parse(&client.call("GET", &path, None)?)?;
    match &view.agent {
        Some(id) => outln!("effective config of {id}"),
        None => outln!("global config"),
    }
    outln!("hash {}", view.hash);
    outln_json!(stella_proto::config::canonical(&view.config));
    if !view.scopes.is_empty() {
        outln!("scopes:");
        for s in &view.scopes {
            outln!(
                "  {:<40} version {:<4} {}  {}",
                s.scope,
                s.version,
                s.updated_at,
                s.hash
            );
        }
    }
    Ok(())
}

/// `drift [--json]`: agents out of step with their desired config.
pub(crate) fn drift(target: &AdminTarget, as_json: bool) -> Result<(), Error> {
    let client = AdminClient::connect(target)?;
    let text = client.call("GET", "/v1/admin/drift", None)?;
    if as_json {
        outln_json!(text);
        return Ok(());
    }
    let rows: Vec<DriftRow> = AdminClient::parse(&text)?;
    if rows.is_empty() {
        outln!("no drift: every agent runs its desired config");
        return Ok(());
    }
    outln!(
        "{:<31} {:<16} {:<14} {:<14} {:<11} SINCE",
        "AGENT",
        "NAME",
        "DESIRED",
        "APPLIED",
        "LOCAL EDIT"
    );
    for r in &rows {
        let short = |h: &str| h.get(..12).unwrap_or(h).to_owned();
        outln!(
            "{:<31} {:<16} {:<14} {:<14} {:<11} {}{}",
            r.agent,
            r.name,
            short(&r.desired_hash),
            r.applied_hash.as_deref().map_or("-".into(), short),
            if r.local_drift { "yes" } else { "no" },
            r.since.as_deref().unwrap_or("-"),
            r.error
                .as_deref()
                .map_or(String::new(), |e| format!("  refused: {e}")),
        );
    }
    Ok(())
}

/// `release import DIR`: uploads each file the release's signed statement
/// names (streamed, `POST /v1/admin/artifacts`), after checking every digest
/// here, then asks the server to import the envelope, which checks them
/// again against what it stored. DIR is on this host: the server may be on
/// another (`--server URL`), and with PostgreSQL any server sees the files.
pub(crate) fn release_import(target: &AdminTarget, dir: &std::path::Path) -> Result<(), Error> {
    let (envelope, files) = crate::releases::upload_plan(dir)?;
    let client = AdminClient::connect(target)?;
    for file in &files {
        let stored: stella_proto::api::ArtifactCreated =
            AdminClient::parse(&client.upload("/v1/admin/artifacts", &file.path)?)?;
        if stored.sha256 != file.sha256 {
            return Err(Refusal::conflict(format!(
                "{} changed while it was uploaded (the server stored sha256 {}, the statement says {})",
                file.path.display(),
                stored.sha256,
                file.sha256
            ))
            .into());
        }
    }
    let body = ReleaseImportRequest {
        dir: None,
        envelope: Some(envelope),
    };
    let view: ReleaseView = AdminClient::parse(&client.call(
        "POST",
        "/v1/admin/releases",
        Some(json::to_string(&body)),
    )?)?;
    outln!(
        "imported release {} ({} files)",
        view.version,
        view.files.len()
    );
    Ok(())
}

/// `release list [--json]`.
pub(crate) fn release_list(target: &AdminTarget, as_json: bool) -> Result<(), Error> {
    let client = AdminClient::connect(target)?;
    let text = client.call("GET", "/v1/admin/releases", None)?;
    if as_json {
        outln_json!(text);
        return Ok(());
    }
    let releases: Vec<ReleaseView> = AdminClient::parse(&text)?;
    if releases.is_empty() {
        outln!("no releases imported");
    }
    for r in &releases {
        outln!("{}  imported {}", r.version, r.imported_at);
        for f in &r.files {
            outln!("  {:<44} {:>10} bytes  sha256:{}", f.name, f.size, f.sha256);
        }
    }
    Ok(())
}

/// `agents update ID --release V`: offer one agent a release directly.
pub(crate) fn agents_update(target: &AdminTarget, id: &str, release: &str) -> Result<(), Error> {
    let client = AdminClient::connect(target)?;
    let body = AgentUpdateRequest {
        release: release.to_owned(),
    };
    let agent: AgentView = AdminClient::parse(&client.call(
        "POST",
        &format!("/v1/admin/agents/{id}/update"),
        Some(json::to_string(&body)),
    )?)?;
    outln!(
        "{}: offered release {release}; it updates at its next heartbeat",
        agent.id
    );
    Ok(())
}

/// `rollout start`: prints the new rollout's id.
pub(crate) fn rollout_start(target: &AdminTarget, body: RolloutStartRequest) -> Result<(), Error> {
    let client = AdminClient::connect(target)?;
    let view: RolloutView = AdminClient::parse(&client.call(
        "POST",
        "/v1/admin/rollouts",
        Some(json::to_string(&body)),
    )?)?;
    outln!("{}", view.id);
    Ok(())
}

fn print_rollout(r: &RolloutView) -> Result<(), Error> {
    let status = match &r.reason {
        Some(reason) => format!("{} ({reason})", r.status),
        None => r.status.clone(),
    };
    outln!("rollout {}  release {}  {}", r.id, r.release, status);
    outln!(
        "  soak {}, max failures {}, selector {}",
        r.soak,
        r.max_failures,
        if r.selector.is_empty() {
            "-".into()
        } else {
            labels_text(&r.selector)
        }
    );
    let window = match (&r.window, &r.days) {
        (None, None) => "any time".to_owned(),
        (w, d) => format!(
            "{} UTC{}{}",
            w.as_deref().unwrap_or("00:00-24:00"),
            d.as_deref().map(|d| format!(" on {d}")).unwrap_or_default(),
            match r.window_open {
                Some(true) => " (open now)",
                Some(false) => " (closed now)",
                None => "",
            }
        ),
    };
    outln!(
        "  agent timeout {}, offers {window}; each agent's own update_window also applies",
        r.agent_timeout.as_deref().unwrap_or("-")
    );
    outln!(
        "  {:<4} {:<10} {:>7} {:>8} {:>7}  {:<8} PHASES",
        "#",
        "STAGE",
        "AGENTS",
        "UPDATED",
        "FAILED",
        "STATE"
    );
    for (i, s) in r.stages.iter().enumerate() {
        let phases = s
            .phases
            .iter()
            .flatten()
            .map(|(phase, n)| format!("{phase}={n}"))
            .collect::<Vec<_>>()
            .join(" ");
        outln!(
            "  {:<4} {:<10} {:>7} {:>8} {:>7}  {:<8} {}",
            i + 1,
            s.stage,
            s.agents,
            s.updated,
            s.failed,
            s.state,
            phases
        );
    }
    Ok(())
}

/// `rollout show ID [--json]`, or `rollout list` without an id.
pub(crate) fn rollout_show(
    target: &AdminTarget,
    id: Option<&str>,
    as_json: bool,
) -> Result<(), Error> {
    let client = AdminClient::connect(target)?;
    let path = match id {
        Some(id) => format!("/v1/admin/rollouts/{id}"),
        None => "/v1/admin/rollouts".to_owned(),
    };
    let text = client.call("GET", &path, None)?;
    if as_json {
        outln_json!(text);
        return Ok(());
    }
    if id.is_some() {
        print_rollout(&AdminClient::parse(&text)?)?;
    } else {
        let all: Vec<RolloutView> = AdminClient::parse(&text)?;
        if all.is_empty() {
            outln!("no rollouts");
        }
        for r in &all {
            print_rollout(r)?;
        }
    }
    Ok(())
}

/// `rollout pause|resume|abort ID`.
pub(crate) fn rollout_act(target: &AdminTarget, id: &str, action: &str) -> Result<(), Error> {
    let client = AdminClient::connect(target)?;
    let view: RolloutView = AdminClient::parse(&client.call(
        "POST",
        &format!("/v1/admin/rollouts/{id}/{action}"),
        None,
    )?)?;
    outln!("{} {}", view.id, view.status);
    Ok(())
}

/// `task create FILE`: sends the signed envelope as it is; prints the
/// server's task id.
pub(crate) fn task_create(target: &AdminTarget, file: &std::path::Path) -> Result<(), Error> {
    let envelope = read_text(file)?;
    let client = AdminClient::connect(target)?;
    let created: TaskCreated =
        AdminClient::parse(&client.call("POST", "/v1/admin/tasks", Some(envelope))?)?;
    outln!("{}", created.id);
    Ok(())
}

/// `task list [--agent ID] [--json]`.
pub(crate) fn task_list(
    target: &AdminTarget,
    agent: Option<&str>,
    as_json: bool,
) -> Result<(), Error> {
    let client = AdminClient::connect(target)?;
    let path = match agent {
        Some(id) => format!("/v1/admin/tasks?agent={id}"),
        None => "/v1/admin/tasks".to_owned(),
    };
    let text = client.call("GET", &path, None)?;
    if as_json {
        outln_json!(text);
        return Ok(());
    }
    let tasks: Vec<TaskView> = AdminClient::parse(&text)?;
    if tasks.is_empty() {
        outln!("no tasks");
        return Ok(());
    }
    outln!(
        "{:<16}  {:<24}  {:<9}  {:<9}  {:<20}  RESULTS",
        "ID",
        "TASK ID",
        "TYPE",
        "STATUS",
        "NOT AFTER"
    );
    for t in &tasks {
        outln!(
            "{:<16}  {:<24}  {:<9}  {:<9}  {:<20}  {}",
            t.id,
            t.task_id,
            t.task_type,
            t.status,
            t.not_after,
            t.results.len()
        );
    }
    Ok(())
}

/// `task show ID [--json]`.
pub(crate) fn task_show(target: &AdminTarget, id: &str, as_json: bool) -> Result<(), Error> {
    let client = AdminClient::connect(target)?;
    let text = client.call("GET", &format!("/v1/admin/tasks/{id}"), None)?;
    if as_json {
        outln_json!(text);
        return Ok(());
    }
    let t: TaskView = AdminClient::parse(&text)?;
    outln!("id:         {}", t.id);
    outln!("task id:    {}", t.task_id);
    outln!("type:       {}", t.task_type);
    outln!("status:     {}", t.status);
    outln!("audience:   {}", t.audience);
    outln!("not after:  {}", t.not_after);
    outln!("created:    {}", t.created_at);
    if let Some(at) = &t.cancelled_at {
        outln!("cancelled:  {at}");
    }
    if t.results.is_empty() {
        outln!("results:    none yet");
    }
    for r in &t.results {
        let exit = r.exit_code.map_or(String::new(), |c| format!(" exit {c}"));
        let reason = r
            .reason
            .as_deref()
            .map_or(String::new(), |r| format!(": {r}"));
        outln!("agent {}  {}{exit}{reason}", r.agent, r.status);
        if let (Some(started), finished) = (&r.started, &r.finished) {
            outln!(
                "  started {started}{}",
                finished
                    .as_deref()
                    .map_or(String::new(), |f| format!(", finished {f}"))
            );
        }
        if let Some(output) = r.output.as_deref().filter(|o| !o.is_empty()) {
            for line in output.lines() {
                outln!("  | {line}");
            }
        }
    }
    Ok(())
}

/// `task cancel ID`.
pub(crate) fn task_cancel(target: &AdminTarget, id: &str) -> Result<(), Error> {
    let client = AdminClient::connect(target)?;
    let t: TaskView =
        AdminClient::parse(&client.call("POST", &format!("/v1/admin/tasks/{id}/cancel"), None)?)?;
    outln!("task {} cancelled", t.id);
    Ok(())
}

/// `task artifact FILE`: uploads an image archive; prints its sha256.
pub(crate) fn task_artifact(target: &AdminTarget, file: &std::path::Path) -> Result<(), Error> {
    let client = AdminClient::connect(target)?;
    let created: stella_proto::api::ArtifactCreated =
        AdminClient::parse(&client.upload("/v1/admin/artifacts", file)?)?;
    outln!("{}", created.sha256);
    Ok(())
}

/// `admin-token create`: prints the token only.
pub(crate) fn admin_token_create(
    target: &AdminTarget,
    name: &str,
    role: &str,
    ttl: Option<Duration>,
) -> Result<(), Error> {
    let client = AdminClient::connect(target)?;
    let body = AdminTokenCreateRequest {
        name: name.to_owned(),
        role: role.to_owned(),
        ttl_ms: ttl.map(|t| t.as_millis() as u64),
    };
    let answer: AdminTokenCreateResponse = AdminClient::parse(&client.call(
        "POST",
        "/v1/admin/admin-tokens",
        Some(json::to_string(&body)),
    )?)?;
    outln!("{}", answer.token);
    Ok(())
}

/// `admin-token list [--json]`: names, roles and states; never a secret.
pub(crate) fn admin_token_list(target: &AdminTarget, as_json: bool) -> Result<(), Error> {
    let client = AdminClient::connect(target)?;
    let text = client.call("GET", "/v1/admin/admin-tokens", None)?;
    if as_json {
        outln_json!(text);
        return Ok(());
    }
    let tokens: Vec<AdminTokenView> = AdminClient::parse(&text)?;
    let width = tokens
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    outln!(
        "{:<width$}  {:<7}  {:<7}  {:<20}  EXPIRES",
        "NAME",
        "ROLE",
        "STATE",
        "CREATED"
    );
    for t in &tokens {
        outln!(
            "{:<width$}  {:<7}  {:<7}  {:<20}  {}",
            t.name,
            t.role,
            t.state,
            t.created_at,
            t.expires_at.as_deref().unwrap_or("never")
        );
    }
    Ok(())
}

/// `admin-token revoke NAME`.
pub(crate) fn admin_token_revoke(target: &AdminTarget, name: &str) -> Result<(), Error> {
    let client = AdminClient::connect(target)?;
    let view: AdminTokenView = AdminClient::parse(&client.call(
        "POST",
        &format!("/v1/admin/admin-tokens/{name}/revoke"),
        None,
    )?)?;
    outln!("admin token {} {}", view.name, view.state);
    Ok(())
}

/// Percent-encodes a query parameter value.
fn query_value(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `audit [--since] [--agent] [--actor] [--json]`: every selected line,
/// oldest first (following the server's pages); `--json` prints one JSON
/// object per line, for a SIEM.
pub(crate) fn audit(
    target: &AdminTarget,
    since: Option<u64>,
    agent: Option<&str>,
    actor: Option<&str>,
    as_json: bool,
) -> Result<(), Error> {
    let client = AdminClient::connect(target)?;
    let mut filter = format!("limit={}", crate::audit::MAX_LIMIT);
    if let Some(t) = since {
        filter += &format!("&since={}", query_value(&stella_proto::time::rfc3339(t)));
    }
    if let Some(a) = agent {
        filter += &format!("&agent={}", query_value(a));
    }
    if let Some(a) = actor {
        filter += &format!("&actor={}", query_value(a));
    }
    let mut after: Option<u64> = None;
    loop {
        let path = match after {
            Some(seq) => format!("/v1/admin/audit?{filter}&after={seq}"),
            None => format!("/v1/admin/audit?{filter}"),
        };
        let page: AuditPage = AdminClient::parse(&client.call("GET", &path, None)?)?;
        for e in &page.entries {
            print_audit_entry(e, as_json)?;
        }
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    Ok(())
}

fn print_audit_entry(e: &AuditEntry, as_json: bool) -> Result<(), Error> {
    if as_json {
        outln_json!(json::to_string(e));
        return Ok(());
    }
    let or_dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    outln!(
        "{} {:>6} {:<7} {:<24} {:<16} {:<28} {:<32} {}",
        e.time,
        e.seq,
        e.outcome,
        or_dash(&e.actor),
        or_dash(&e.source),
        e.action,
        or_dash(&e.target),
        e.detail
    );
    Ok(())
}

/// `backup --out FILE [--include-ca-key]`: the running server writes the
/// snapshot into its answer; it lands in FILE (0600) atomically.
pub(crate) fn backup(
    target: &AdminTarget,
    out: &std::path::Path,
    include_ca_key: bool,
) -> Result<(), Error> {
    if out.is_dir() {
        return Err(Error::Usage(format!(
            "--out {} is a directory; name a file",
            out.display()
        )));
    }
    let client = AdminClient::connect(target)?;
    let body = BackupRequest { include_ca_key };
    let bytes = client.call_bytes("POST", "/v1/admin/backup", Some(json::to_string(&body)))?;
    // Checked before it replaces anything: a backup that does not read back
    // is no backup.
    let contents = crate::backup::read(&bytes).map_err(|m| Error::Client {
        context: format!("the server's backup does not check: {m}"),
        source: None,
    })?;
    crate::fsutil::write_atomic(out, &bytes, 0o600)?;
    outln!(
        "backup written to {} ({} bytes, {} agents, CA key {})",
        out.display(),
        bytes.len(),
        contents.rows_of("agents"),
        if include_ca_key {
            "included"
        } else {
            "not included"
        }
    );
    Ok(())
}
