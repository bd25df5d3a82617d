//! Messages of the HTTP API under `/v1/`, shared by agent, server and admin CLI.
//! Times are RFC 3339 UTC strings; fields may be added, never renamed.

use std::collections::BTreeMap;

use miniserde::json::Value;
use miniserde::{Deserialize, Serialize};

use crate::states::{AgentStatus, InactiveReason, TaskState, TaskStatus, UpdatePhase};

/// Labels: `key=value` pairs attached to agents and tokens.
pub type Labels = BTreeMap<String, String>;

/// What an agent runs on.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct Platform {
    /// `linux`.
    pub os: String,
    /// `x86_64`, `aarch64`, ...
    pub arch: String,
    /// The Rust target triple the agent was built for.
    pub target: String,
}

/// `POST /v1/agents/register` (no client certificate; the token authenticates).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct RegisterRequest {
    /// `id.secret`.
    pub token: String,
    /// PEM `CERTIFICATE REQUEST` signed by the agent's new key.
    pub csr: String,
    pub name: String,
    pub platform: Platform,
    pub version: String,
    pub capabilities: Vec<String>,
    /// Labels the agent asks for, merged over the token's labels.
    pub labels: Option<Labels>,
}

/// Answer to a registration.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct RegisterResponse {
    pub agent_id: String,
    /// PEM certificate: CN = agent id, URI SAN `stella://agent/<id>`.
    pub certificate: String,
    /// PEM of the CA that signed it (and the server's certificate).
    pub ca: String,
    pub cert_not_after: String,
    pub heartbeat_interval_ms: u64,
    /// Effective labels (token's, then the agent's own).
    pub labels: Labels,
    /// The agent's effective configuration and its hash.
    pub config: Value,
    pub config_hash: String,
}

/// Counts of the last doctor run.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct DoctorSummary {
    pub pass: u32,
    pub warn: u32,
    pub fail: u32,
    pub skip: u32,
    /// Ids of failing checks (`CheckId` spellings). Text, not `CheckId`: an
    /// agent newer than its server may run a check the server does not know,
    /// and its heartbeat must not be refused for that.
    pub failing: Vec<String>,
}

/// Where the agent stands with updates.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct UpdateReport {
    /// `idle`, `downloading`, `probation`, `failed`, ...; a phase this build
    /// does not know is kept (`UpdatePhase::Unknown`), never refused.
    pub state: UpdatePhase,
    /// The version concerned (the running one when idle).
    pub version: String,
    /// Why the update to `version` failed (state `failed` or `rolled_back`).
    pub error: Option<String>,
    /// Bytes of the artifact received so far (state `downloading`).
    pub bytes: Option<u64>,
    /// The artifact's size, once known (state `downloading`).
    pub total: Option<u64>,
}

/// Most log lines an agent keeps (and reports) of its last failed update.
pub const MAX_FAILURE_LINES: usize = 64;
/// Longest log line of a failed update, in bytes.
pub const MAX_FAILURE_LINE: usize = 256;

/// The last failed update and the agent's log lines of it, sent with the
/// heartbeats after the failure until one of them is acknowledged.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct UpdateFailureReport {
    /// The version the update was to.
    pub version: String,
    /// `failed` or `rolled_back`.
    pub phase: UpdatePhase,
    pub reason: String,
    /// At most [`MAX_FAILURE_LINES`] logfmt lines, oldest first, each at
    /// most [`MAX_FAILURE_LINE`] bytes of printable text.
    pub lines: Vec<String>,
}

/// The last failed update of an agent, as `agents show` prints it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct UpdateFailureView {
    pub version: String,
    pub phase: UpdatePhase,
    pub reason: String,
    /// When the server received it (RFC 3339).
    pub received_at: String,
    pub lines: Vec<String>,
}

/// An offer to update, in a heartbeat answer. The envelope is what the agent
/// trusts (with its pinned key); the rest only says where to fetch.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct UpdateOffer {
    pub version: String,
    pub target: String,
    /// `GET` path of the artifact (mTLS, HTTP Range supported).
    pub path: String,
    /// Size the server has for the artifact (not trusted beyond a cap).
    pub size: u64,
    /// The release's `release.dsse.json`.
    pub envelope: String,
    /// How long the new version has to prove itself.
    pub probation_ms: u64,
}

/// A release as `release list` shows it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ReleaseView {
    pub version: String,
    pub imported_at: String,
    pub files: Vec<ReleaseFileView>,
}

/// One file of a release.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ReleaseFileView {
    pub name: String,
    pub sha256: String,
    pub size: u64,
}

/// `POST /v1/admin/releases`: import a release, one of two ways: `envelope`,
/// the release's `release.dsse.json` as text, whose files were uploaded
/// before with `POST /v1/admin/artifacts` (what `release import` sends); or
/// `dir`, a release directory that is a path on the server's host.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct ReleaseImportRequest {
    pub dir: Option<String>,
    pub envelope: Option<String>,
}

/// `POST /v1/admin/rollouts`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct RolloutStartRequest {
    pub release: String,
    /// `count:N` or a percent, cumulative; the last must be 100.
    pub stages: Vec<String>,
    pub soak_ms: u64,
    pub max_failures: f64,
    pub selector: Labels,
    /// How long a member has to commit once offered (`--agent-timeout`);
    /// absent: the server's default (1h).
    pub agent_timeout_ms: Option<u64>,
    /// UTC maintenance window `HH:MM-HH:MM` (`--window`); absent: any time.
    pub window: Option<String>,
    /// Days of the window (`--days mon-fri`); absent: every day.
    pub days: Option<String>,
}

/// One stage of a rollout.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct RolloutStageView {
    /// The stage as given (`count:1`, `10`).
    pub stage: String,
    /// Its share of the eligible fleet, for percent stages.
    pub percent: Option<f64>,
    /// Agents that joined at this stage.
    pub agents: u64,
    pub updated: u64,
    pub failed: u64,
    /// `pending`, `open`, `soaking` or `done`.
    pub state: String,
    /// The members' ids (only when asked for with `?members=1`).
    pub members: Option<Vec<String>>,
    /// Members by update phase (`UpdatePhase` spellings, plus `pending`
    /// before the stage opens, `waiting` for an offer not yet sent and
    /// `skipped` for a member offline for the whole deadline).
    pub phases: Option<BTreeMap<String, u64>>,
}

/// A rollout as `rollout show --json` prints it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct RolloutView {
    pub id: String,
    pub release: String,
    /// `running`, `paused`, `completed` or `aborted`.
    pub status: String,
    pub reason: Option<String>,
    pub stages: Vec<RolloutStageView>,
    pub soak: String,
    pub max_failures: f64,
    pub selector: Labels,
    pub created_at: String,
    /// How long a member has to commit once offered (`1h`).
    pub agent_timeout: Option<String>,
    /// UTC maintenance window for offers (`22:00-04:00`); `null`: any time.
    pub window: Option<String>,
    /// Days of the window (`mon-fri`); `null`: every day.
    pub days: Option<String>,
    /// Whether offers may be made now (inside the window).
    pub window_open: Option<bool>,
}

/// `POST /v1/admin/agents/{id}/update`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct AgentUpdateRequest {
    pub release: String,
}

/// `POST /v1/agents/heartbeat` (mTLS; identity comes from the certificate).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct HeartbeatRequest {
    pub seq: u64,
    pub version: String,
    pub uptime_s: u64,
    /// Hash of the applied configuration (empty before any was applied).
    pub config_hash: String,
    /// The config file on disk differs from what was applied.
    pub config_drift: bool,
    /// The last configuration the agent refused, and why.
    pub config_error: Option<ConfigRefusal>,
    pub doctor: DoctorSummary,
    pub update: UpdateReport,
    pub capabilities: Vec<String>,
    /// The full doctor report the server asked for (`agents doctor`), sent
    /// once with the heartbeat after the request; `null` otherwise.
    pub doctor_report: Option<DoctorReport>,
    /// The last failed update with its log, until a heartbeat carrying it
    /// is acknowledged; `null` otherwise.
    pub update_failure: Option<UpdateFailureReport>,
    /// Task results not yet acknowledged (at most
    /// `task::MAX_RESULTS_PER_HEARTBEAT`); `null` when there are none.
    pub task_results: Option<Vec<TaskResultReport>>,
}

/// Where the agent stands with one task, in a heartbeat. The server keeps
/// the latest report per (task, agent).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TaskResultReport {
    /// The server's task id (`TaskDelivery::id`).
    pub id: String,
    pub status: TaskStatus,
    /// Why it was refused or failed.
    pub reason: Option<String>,
    pub exit_code: Option<i32>,
    /// The last lines of output (`task::output_tail`).
    pub output: Option<String>,
    /// RFC 3339.
    pub started: Option<String>,
    pub finished: Option<String>,
}

/// A task for the agent, in a heartbeat answer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TaskDelivery {
    /// The server's task id, which results name.
    pub id: String,
    /// The DSSE envelope JSON exactly as created (the agent verifies it).
    pub envelope: String,
}

/// `POST /v1/admin/tasks` answer (201).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct TaskCreated {
    /// The server's task id.
    pub id: String,
    /// The signed id.
    pub task_id: String,
}

/// One agent's result, in `task show --json`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TaskResultView {
    pub agent: String,
    pub status: TaskStatus,
    pub exit_code: Option<i32>,
    pub output: Option<String>,
    pub started: Option<String>,
    pub finished: Option<String>,
    pub reason: Option<String>,
    /// When the server last received a report (RFC 3339).
    pub reported_at: String,
}

/// A task as `task show --json` (and `task list --json` rows, whose results
/// carry no output) print it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct TaskView {
    /// The server's task id.
    pub id: String,
    /// The signed id.
    pub task_id: String,
    #[serde(rename = "type")]
    pub task_type: String,
    pub status: TaskState,
    pub not_after: String,
    pub created_at: String,
    /// When it was cancelled, if it was.
    pub cancelled_at: Option<String>,
    /// `agents:ID,...` or `selector:K=V,...`.
    pub audience: String,
    pub results: Vec<TaskResultView>,
}

/// `POST /v1/admin/artifacts` answer (201).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ArtifactCreated {
    pub sha256: String,
    pub size: u64,
}

impl HeartbeatRequest {
    /// Writes the same JSON as `miniserde::json::to_string(self)` into `out`
    /// (cleared first), so the agent reuses one buffer for every heartbeat.
    pub fn write_json(&self, out: &mut String) {
        use std::fmt::Write as _;
        out.clear();
        let _ = write!(out, "{{\"seq\":{},\"version\":", self.seq);
        json_string(out, &self.version);
        let _ = write!(out, ",\"uptime_s\":{},\"config_hash\":", self.uptime_s);
        json_string(out, &self.config_hash);
        let _ = write!(
            out,
            ",\"config_drift\":{},\"config_error\":",
            self.config_drift
        );
        match &self.config_error {
            None => out.push_str("null"),
            Some(e) => {
                out.push_str("{\"hash\":");
                json_string(out, &e.hash);
                out.push_str(",\"error\":");
                json_string(out, &e.error);
                out.push('}');
            }
        }
        let d = &self.doctor;
        let _ = write!(
            out,
            ",\"doctor\":{{\"pass\":{},\"warn\":{},\"fail\":{},\"skip\":{},\"failing\":",
            d.pass, d.warn, d.fail, d.skip
        );
        json_strings(out, &d.failing);
        out.push_str("},\"update\":{\"state\":");
        json_string(out, self.update.state.as_str());
        out.push_str(",\"version\":");
        json_string(out, &self.update.version);
        out.push_str(",\"error\":");
        match &self.update.error {
            None => out.push_str("null"),
            Some(e) => json_string(out, e),
        }
        json_number(out, ",\"bytes\":", self.update.bytes);
        json_number(out, ",\"total\":", self.update.total);
        out.push_str("},\"capabilities\":");
        json_strings(out, &self.capabilities);
        out.push_str(",\"doctor_report\":");
        match &self.doctor_report {
            None => out.push_str("null"),
            // Rare (on request): miniserde's own allocation is fine here.
            Some(report) => out.push_str(&miniserde::json::to_string(report)),
        }
        out.push_str(",\"update_failure\":");
        match &self.update_failure {
            None => out.push_str("null"),
            // Once per failed update: miniserde's allocation is fine here.
            Some(failure) => out.push_str(&miniserde::json::to_string(failure)),
        }
        out.push_str(",\"task_results\":");
        match &self.task_results {
            None => out.push_str("null"),
            // Only after a task ran: miniserde's allocation is fine here too.
            Some(results) => out.push_str(&miniserde::json::to_string(results)),
        }
        out.push('}');
    }
}

fn json_number(out: &mut String, key: &str, value: Option<u64>) {
    use std::fmt::Write as _;
    out.push_str(key);
    match value {
        None => out.push_str("null"),
        Some(n) => {
            let _ = write!(out, "{n}");
        }
    }
}

/// Appends `s` as a JSON string, escaped as miniserde escapes it.
pub fn json_string(out: &mut String, s: &str) {
    use std::fmt::Write as _;
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn json_strings(out: &mut String, items: &[String]) {
    out.push('[');
    for (i, s) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        json_string(out, s);
    }
    out.push(']');
}

/// A configuration the agent refused.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ConfigRefusal {
    pub hash: String,
    pub error: String,
}

/// Largest doctor report (its JSON) a heartbeat may carry.
pub const MAX_DOCTOR_REPORT: usize = 32 * 1024;

/// "Run doctor and upload the report", in a heartbeat answer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DoctorDirective {
    /// Also plan a remediation, without applying anything.
    pub remediate_dry_run: bool,
}

/// `POST /v1/admin/agents/{id}/doctor` and `POST /v1/admin/doctor` (the
/// latter with a selector).
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct DoctorAsk {
    pub remediate_dry_run: bool,
    /// Agents whose labels include all of these (selector form only).
    pub selector: Option<Labels>,
}

/// Answer to a doctor request: the agents asked.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct DoctorAsked {
    pub asked: Vec<String>,
}

/// One check of a doctor report, as `stella-agent doctor --json` prints it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DoctorCheckView {
    /// `CheckId` spelling (text: a newer agent may know more checks).
    pub id: String,
    /// `pass`, `warn`, `fail` or `skip`.
    pub status: String,
    pub code: String,
    pub message: String,
    pub duration_us: u64,
}

/// Counts of a doctor run, as reports print them.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct DoctorCounts {
    pub pass: u32,
    pub warn: u32,
    pub fail: u32,
    pub skip: u32,
}

/// One planned (or applied) remediation action.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RemediationActionView {
    pub pattern: String,
    pub check: String,
    pub action: String,
    pub applied: bool,
    pub result: String,
}

/// What `stella-agent remediate --json` prints.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RemediationView {
    pub dry_run: bool,
    pub actions: Vec<RemediationActionView>,
    pub before: DoctorCounts,
    pub after: DoctorCounts,
}

/// The full report an agent uploads on request.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DoctorReport {
    pub checks: Vec<DoctorCheckView>,
    pub summary: DoctorCounts,
    /// The remediation dry run, when asked for.
    pub remediation: Option<RemediationView>,
}

/// `agents show ID --doctor --json`: the last uploaded report.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct DoctorReportView {
    pub agent_id: String,
    /// When the server received it (RFC 3339); `null` before any report.
    pub received_at: Option<String>,
    pub report: Option<DoctorReport>,
    /// A request not yet answered by the agent.
    pub pending: bool,
}

/// One check across agents, in `doctor-report`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct DoctorCheckSummary {
    pub id: String,
    pub fail: Vec<String>,
    pub warn: Vec<String>,
}

/// `doctor-report --selector ... --json`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct FleetDoctorReport {
    /// Agents selected.
    pub agents: u64,
    /// Of those, agents with an uploaded report.
    pub reported: u64,
    /// Selected agents with a request still pending.
    pub pending: Vec<String>,
    /// Checks that fail or warn somewhere, in check-id order.
    pub checks: Vec<DoctorCheckSummary>,
}

/// Answer to a heartbeat, with directives.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct HeartbeatResponse {
    pub interval_ms: u64,
    pub server_time: String,
    /// "Renew your certificate now."
    pub renew: bool,
    /// Hash of the configuration the agent should run.
    pub config_hash: String,
    /// The full configuration, only when the agent's differs.
    pub config: Option<Value>,
    /// A release to install, if one is offered to this agent.
    pub update: Option<UpdateOffer>,
    /// Run doctor now and upload the report with the next heartbeat.
    pub doctor: Option<DoctorDirective>,
    /// Tasks for this agent it has not reported on yet; `null` when none.
    pub tasks: Option<Vec<TaskDelivery>>,
    /// Server task ids this agent reported `running` that were cancelled;
    /// `null` when none.
    pub cancel_tasks: Option<Vec<String>>,
}

impl HeartbeatResponse {
    /// Reads a plain acknowledgement (no `config`, `update`, `doctor`, `tasks`,
    /// `cancel_tasks`, strings
    /// without escapes) into `self`, reusing its strings' allocations, and
    /// returns true; returns false, leaving `self` unspecified, for any other
    /// answer, which the caller decodes with miniserde. The agent's steady
    /// heartbeat thus decodes without allocating.
    pub fn read_plain_ack(&mut self, text: &str) -> bool {
        let mut p = PlainJson {
            rest: text.trim_start(),
        };
        let mut seen = 0u16;
        if !p.eat('{') {
            return false;
        }
        loop {
            let Some(key) = p.string() else {
                return false;
            };
            if !p.eat(':') {
                return false;
            }
            let (bit, ok) = match key {
                "interval_ms" => (1, p.number().map(|n| self.interval_ms = n).is_some()),
                "server_time" => (
                    2,
                    p.string()
                        .map(|v| replace(&mut self.server_time, v))
                        .is_some(),
                ),
                "renew" => (4, p.boolean().map(|b| self.renew = b).is_some()),
                "config_hash" => (
                    8,
                    p.string()
                        .map(|v| replace(&mut self.config_hash, v))
                        .is_some(),
                ),
                "config" => (16, p.null()),
                "update" => (32, p.null()),
                // Present (non-null) only on request: miniserde reads that.
                "doctor" => (64, p.null()),
                "tasks" => (128, p.null()),
                "cancel_tasks" => (256, p.null()),
                _ => (0, false),
            };
            if !ok || seen & bit != 0 {
                return false;
            }
            seen |= bit;
            if p.eat(',') {
                continue;
            }
            if !p.eat('}') || !p.rest.trim().is_empty() {
                return false;
            }
            break;
        }
        // Every field, once (`doctor`, `tasks` and `cancel_tasks` may be
        // absent: an older server).
        if seen & 63 != 63 {
            return false;
        }
        self.config = None;
        self.update = None;
        self.doctor = None;
        self.tasks = None;
        self.cancel_tasks = None;
        true
    }
}

fn replace(out: &mut String, value: &str) {
    out.clear();
    out.push_str(value);
}

/// A cursor over JSON text that reads only escape-free strings, unsigned
/// integers, booleans and null.
struct PlainJson<'a> {
    rest: &'a str,
}

impl<'a> PlainJson<'a> {
    fn eat(&mut self, c: char) -> bool {
        match self.rest.trim_start().strip_prefix(c) {
            Some(rest) => {
                self.rest = rest;
                true
            }
            None => false,
        }
    }

    fn string(&mut self) -> Option<&'a str> {
        let body = self.rest.trim_start().strip_prefix('"')?;
        let end = body.find(['"', '\\'])?;
        if body.as_bytes()[end] != b'"' || body[..end].chars().any(|c| c < ' ') {
            return None;
        }
        self.rest = &body[end + 1..];
        Some(&body[..end])
    }

    fn number(&mut self) -> Option<u64> {
        let text = self.rest.trim_start();
        let end = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        // JSON has no leading zeros; miniserde reads a fraction or exponent
        // as a float, which u64 refuses: leave those to it.
        if end == 0
            || (end > 1 && text.starts_with('0'))
            || text[end..].starts_with(['.', 'e', 'E'])
        {
            return None;
        }
        let n = text[..end].parse().ok()?;
        self.rest = &text[end..];
        Some(n)
    }

    fn word(&mut self, word: &str) -> bool {
        match self.rest.trim_start().strip_prefix(word) {
            Some(rest) => {
                self.rest = rest;
                true
            }
            None => false,
        }
    }

    fn boolean(&mut self) -> Option<bool> {
        if self.word("true") {
            Some(true)
        } else if self.word("false") {
            Some(false)
        } else {
            None
        }
    }

    fn null(&mut self) -> bool {
        self.word("null")
    }
}

/// `GET /v1/agents/self` (mTLS): how the server sees the calling agent, with
/// no side effects (doctor's reachability and clock checks use it).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct SelfView {
    pub agent_id: String,
    pub status: AgentStatus,
    pub reason: Option<InactiveReason>,
    pub server_time: String,
    /// Unix milliseconds, for clock-skew measurements.
    pub server_time_ms: u64,
}

/// `POST /v1/agents/certificate` (mTLS with the current certificate).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct RenewRequest {
    /// PEM CSR signed by the agent's new key.
    pub csr: String,
}

/// A newly issued agent certificate (renewal or recovery).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct CertificateResponse {
    pub certificate: String,
    pub ca: String,
    pub cert_not_after: String,
}

/// `POST /v1/agents/challenge` (no client certificate): an agent whose
/// certificate expired while it was offline asks for a nonce to sign.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ChallengeRequest {
    pub agent_id: String,
}

/// A single-use nonce, valid briefly.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ChallengeResponse {
    pub challenge: String,
    pub expires_at: String,
}

/// `POST /v1/agents/recover` (no client certificate): proof of the old key
/// (an ECDSA signature over [`recovery_message`]) and a CSR for the new one.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct RecoverRequest {
    pub agent_id: String,
    pub challenge: String,
    /// Base64 of the ASN.1 DER ECDSA P-256/SHA-256 signature.
    pub signature: String,
    pub csr: String,
}

/// The bytes an agent signs with its old key to recover after expiry.
pub fn recovery_message(agent_id: &str, challenge: &str) -> Vec<u8> {
    let mut m = b"stella-recover-v1\0".to_vec();
    m.extend_from_slice(agent_id.as_bytes());
    m.push(0);
    m.extend_from_slice(challenge.as_bytes());
    m
}

/// Every 4xx/5xx body.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ErrorBody {
    pub error: String,
}

/// `POST /v1/admin/tokens`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct TokenCreateRequest {
    pub ttl_ms: u64,
    pub uses: u32,
    pub labels: Labels,
}

/// The new token, shown once.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct TokenCreateResponse {
    pub token: String,
    pub id: String,
    pub expires_at: String,
    pub uses: u32,
}

/// An agent as admins see it (`agents list --json` rows, `agents show --json`).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct AgentView {
    pub id: String,
    pub name: String,
    pub status: AgentStatus,
    /// Set when `inactive`.
    pub reason: Option<InactiveReason>,
    pub version: String,
    pub target: String,
    pub labels: Labels,
    pub capabilities: Vec<String>,
    pub last_heartbeat: Option<String>,
    pub cert_not_after: String,
    pub config_hash: Option<String>,
    pub platform: Platform,
    pub enrolled_at: String,
    pub cert_serial: String,
    pub heartbeat_seq: u64,
    pub uptime_s: u64,
    pub doctor: DoctorSummary,
    pub update: UpdateReport,
    /// Why the agent refused the desired configuration, if it did.
    pub config_error: Option<String>,
    /// The last failed update the agent reported, with its log lines.
    pub last_failure: Option<UpdateFailureView>,
}

/// `POST /v1/admin/config`: a new version of one scope's configuration.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ConfigSetRequest {
    /// `global`, `label:K=V` or `agent:ID`.
    pub scope: String,
    pub config: Value,
}

/// One stored scope.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ConfigScopeView {
    pub scope: String,
    pub version: u64,
    pub hash: String,
    pub updated_at: String,
}

/// `GET /v1/admin/config[?agent=ID]`: the effective configuration.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ConfigShowResponse {
    pub agent: Option<String>,
    pub hash: String,
    pub config: Value,
    /// The scopes that apply (all scopes without an agent), widest first.
    pub scopes: Vec<ConfigScopeView>,
}

/// `drift --json` rows.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct DriftRow {
    pub agent: String,
    pub name: String,
    pub desired_hash: String,
    pub applied_hash: Option<String>,
    pub local_drift: bool,
    pub since: Option<String>,
    pub error: Option<String>,
}

/// `GET /v1/admin/fleet`: the fleet in numbers, for an overview.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct FleetSummary {
    /// Every agent the server knows, revoked ones included.
    pub agents: u64,
    /// Agents by status (`active`, `inactive`, `revoked`; each present).
    pub status: BTreeMap<String, u64>,
    /// Inactive agents by reason (`heartbeat_timeout`, `deactivated`).
    pub reasons: BTreeMap<String, u64>,
    /// Agents by the version they run.
    pub versions: BTreeMap<String, u64>,
    /// Agents by target triple.
    pub targets: BTreeMap<String, u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_ack_reader_agrees_with_miniserde() {
        let plain = HeartbeatResponse {
            interval_ms: 30_000,
            server_time: "2026-11-30T04:00:00Z".into(),
            renew: true,
            config_hash: "ab12".into(),
            config: None,
            update: None,
            doctor: None,
            tasks: None,
            cancel_tasks: None,
        };
        let text = miniserde::json::to_string(&plain);
        let spaced = r#" { "renew" : false , "config_hash":"", "interval_ms": 7,
            "server_time":"t", "update":null, "config":null } "#;
        for text in [text.as_str(), spaced] {
            let want: HeartbeatResponse = miniserde::json::from_str(text).unwrap();
            let mut got = HeartbeatResponse {
                server_time: "stale".into(),
                ..Default::default()
            };
            assert!(got.read_plain_ack(text), "{text}");
            assert_eq!(
                (
                    got.interval_ms,
                    &got.server_time,
                    got.renew,
                    &got.config_hash
                ),
                (
                    want.interval_ms,
                    &want.server_time,
                    want.renew,
                    &want.config_hash
                ),
                "{text}"
            );
            assert!(got.config.is_none() && got.update.is_none() && got.doctor.is_none());
            assert!(got.tasks.is_none() && got.cancel_tasks.is_none());
        }
        // An older server's answer, without `doctor`, is still plain.
        let older = r#"{"interval_ms":1,"server_time":"a","renew":false,"config_hash":"","config":null,"update":null}"#;
        assert!(<HeartbeatResponse as Default>::default().read_plain_ack(older));
        // A doctor directive is left to miniserde, which reads it.
        let asked = r#"{"interval_ms":1,"server_time":"a","renew":false,"config_hash":"","config":null,"update":null,"doctor":{"remediate_dry_run":true}}"#;
        assert!(!<HeartbeatResponse as Default>::default().read_plain_ack(asked));
        let full: HeartbeatResponse = miniserde::json::from_str(asked).unwrap();
        assert_eq!(
            full.doctor,
            Some(DoctorDirective {
                remediate_dry_run: true
            })
        );
        // Tasks and cancels are left to miniserde, which reads them.
        let tasks = r#"{"interval_ms":1,"server_time":"a","renew":false,"config_hash":"","config":null,"update":null,"doctor":null,"tasks":[{"id":"0123456789abcdef","envelope":"{\"payloadType\":\"x\"}"}],"cancel_tasks":["fedcba9876543210"]}"#;
        assert!(!<HeartbeatResponse as Default>::default().read_plain_ack(tasks));
        let full: HeartbeatResponse = miniserde::json::from_str(tasks).unwrap();
        assert_eq!(
            full.tasks,
            Some(vec![TaskDelivery {
                id: "0123456789abcdef".into(),
                envelope: r#"{"payloadType":"x"}"#.into()
            }])
        );
        assert_eq!(full.cancel_tasks, Some(vec!["fedcba9876543210".into()]));
        let cancels_only = r#"{"interval_ms":1,"server_time":"a","renew":false,"config_hash":"","config":null,"update":null,"doctor":null,"tasks":null,"cancel_tasks":["x"]}"#;
        assert!(!<HeartbeatResponse as Default>::default().read_plain_ack(cancels_only));
        // Everything else is left to miniserde.
        for other in [
            r#"{"interval_ms":1,"server_time":"a\"b","renew":false,"config_hash":"","config":null,"update":null}"#,
            r#"{"interval_ms":1,"server_time":"a","renew":false,"config_hash":"","config":{"x":1},"update":null}"#,
            r#"{"interval_ms":1,"server_time":"a","renew":false,"config_hash":"","config":null}"#,
            r#"{"interval_ms":1,"server_time":"a","renew":false,"config_hash":"","config":null,"update":null,"doctor":{}}"#,
            r#"{"interval_ms":1,"server_time":"a","renew":false,"config_hash":"","config":null,"update":null,"tasks":[]}"#,
            r#"{"interval_ms":1,"server_time":"a","renew":false,"config_hash":"","config":null,"update":null,"tasks":null,"tasks":null}"#,
            r#"{"interval_ms":1,"server_time":"a","renew":false,"config_hash":"","config":null,"update":null,"new":1}"#,
            r#"{"interval_ms":1,"interval_ms":1,"renew":false,"config_hash":"","config":null,"update":null}"#,
            r#"{"interval_ms":1.5,"server_time":"a","renew":false,"config_hash":"","config":null,"update":null}"#,
            r#"{"interval_ms":1,"server_time":"a","renew":false,"config_hash":"","config":null,"update":null}x"#,
            "",
        ] {
            assert!(
                !<HeartbeatResponse as Default>::default().read_plain_ack(other),
                "{other}"
            );
        }
    }

    #[test]
    fn unknown_fields_are_ignored_and_optional_fields_may_be_missing() {
        let body = r#"{"token":"t","csr":"c","name":"n","platform":{"os":"linux","arch":"x86_64","target":"x","extra":1},
            "version":"1.0.0","capabilities":["docker"],"future":"field"}"#;
        let req: RegisterRequest = miniserde::json::from_str(body).unwrap();
        assert_eq!(req.platform.arch, "x86_64");
        assert!(req.labels.is_none());
        assert_eq!(req.capabilities, ["docker"]);
    }

    #[test]
    fn heartbeat_round_trips() {
        let hb = HeartbeatRequest {
            seq: 7,
            version: "1.2.3".into(),
            uptime_s: 99,
            config_hash: String::new(),
            config_drift: false,
            config_error: None,
            doctor: Default::default(),
            update: UpdateReport {
                state: UpdatePhase::Idle,
                version: "1.2.3".into(),
                error: None,
                bytes: None,
                total: None,
            },
            capabilities: vec!["systemd".into()],
            doctor_report: None,
            update_failure: None,
            task_results: None,
        };
        let text = miniserde::json::to_string(&hb);
        let mut fast = String::new();
        hb.write_json(&mut fast);
        assert_eq!(fast, text);
        let odd = HeartbeatRequest {
            version: "1.0.0-\"q\"\\\n\t\u{1}é".into(),
            config_error: Some(ConfigRefusal {
                hash: "h".into(),
                error: "bad \u{1f}".into(),
            }),
            doctor: DoctorSummary {
                pass: 1,
                warn: 2,
                fail: 3,
                skip: 4,
                failing: vec!["a".into(), "b\r".into()],
            },
            update: UpdateReport {
                state: UpdatePhase::Downloading,
                version: "2".into(),
                error: Some("x\u{8}\u{c}".into()),
                bytes: Some(1 << 20),
                total: Some(52_428_800),
            },
            update_failure: Some(UpdateFailureReport {
                version: "2".into(),
                phase: UpdatePhase::RolledBack,
                reason: "doctor \"failed\"".into(),
                lines: vec!["level=warn msg=\"x\"".into(), String::new()],
            }),
            doctor_report: Some(DoctorReport {
                checks: vec![DoctorCheckView {
                    id: "identity.key".into(),
                    status: "warn".into(),
                    code: "identity.key/mode".into(),
                    message: "mode \"0644\"\n".into(),
                    duration_us: 5,
                }],
                summary: <DoctorCounts as Default>::default(),
                remediation: None,
            }),
            task_results: Some(vec![
                TaskResultReport {
                    id: "0123456789abcdef".into(),
                    status: TaskStatus::Failed,
                    reason: Some("health \"check\" failed".into()),
                    exit_code: Some(-1),
                    output: Some("line 1\nline\t2".into()),
                    started: Some("2026-11-30T04:00:00Z".into()),
                    finished: Some("2026-11-30T04:00:05Z".into()),
                },
                TaskResultReport {
                    id: "fedcba9876543210".into(),
                    status: TaskStatus::Unknown("paused".into()),
                    reason: None,
                    exit_code: None,
                    output: None,
                    started: None,
                    finished: None,
                },
            ]),
            ..hb.clone()
        };
        odd.write_json(&mut fast);
        assert_eq!(fast, miniserde::json::to_string(&odd));
        let back: HeartbeatRequest = miniserde::json::from_str(&fast).unwrap();
        assert_eq!(back.task_results, odd.task_results);
        // An older agent's heartbeat, without task results, still parses.
        let older = text.replace(",\"task_results\":null", "");
        assert!(!older.contains("task_results"));
        let back: HeartbeatRequest = miniserde::json::from_str(&older).unwrap();
        assert!(back.task_results.is_none());
        let back: HeartbeatRequest = miniserde::json::from_str(&text).unwrap();
        assert_eq!(back.seq, 7);
        assert_eq!(back.update, hb.update);
        assert!(!text.contains(' '));
    }
}
