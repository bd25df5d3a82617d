//! What the server persists: one JSON document per agent, token, certificate,
//! enrollment, configuration scope, release, rollout, task, task result and
//! audit event, as
//! every store backend keeps them (the redb tables hold exactly this JSON).

use miniserde::{Deserialize, Serialize};
use stella_proto::api::{
    ConfigRefusal, DoctorDirective, DoctorReport, DoctorSummary, Labels, Platform,
    UpdateFailureReport, UpdateReport,
};
pub(crate) use stella_proto::states::{AgentStatus, InactiveReason};
use stella_proto::states::{TaskStatus, UpdatePhase};

/// The durable identity and lifecycle of one agent.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct AgentRecord {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) status: AgentStatus,
    pub(crate) reason: Option<InactiveReason>,
    pub(crate) labels: Labels,
    pub(crate) platform: Platform,
    /// Version and capabilities declared at enrollment (heartbeats refresh them).
    pub(crate) version: String,
    pub(crate) capabilities: Vec<String>,
    pub(crate) enrolled_at: u64,
    pub(crate) token_id: String,
    /// Hex SHA-256 of the enrolled public key.
    pub(crate) key_sha256: String,
    /// Hex serial of the newest certificate issued to this agent.
    pub(crate) cert_serial: String,
    pub(crate) cert_not_after: u64,
    /// The certificate it replaced, still accepted until the agent first uses
    /// the new one (so a lost renewal answer never locks the agent out).
    pub(crate) previous_serial: Option<String>,
    /// An administrator asked for a renewal; the next heartbeat answer says so.
    pub(crate) renew_requested: bool,
    /// A release offered to this agent directly (`agents update`).
    pub(crate) update_offer: Option<String>,
    /// An administrator asked for a doctor report (`agents doctor`); the
    /// heartbeat answers say so until the report arrives.
    pub(crate) doctor_request: Option<DoctorDirective>,
}

impl AgentRecord {
    /// A plain record for unit tests: agent `agt_a`, current serial `new`,
    /// the previous one `old` still accepted. Tests override what they need.
    #[cfg(test)]
    pub(crate) fn sample(status: AgentStatus, reason: Option<InactiveReason>) -> Self {
        AgentRecord {
            id: "agt_a".into(),
            name: "n".into(),
            status,
            reason,
            labels: Default::default(),
            platform: Default::default(),
            version: "1.0.0".into(),
            capabilities: Vec::new(),
            enrolled_at: 0,
            token_id: "t".into(),
            key_sha256: "k".into(),
            cert_serial: "new".into(),
            cert_not_after: 0,
            previous_serial: Some("old".into()),
            renew_requested: false,
            update_offer: None,
            doctor_request: None,
        }
    }

    /// Whether a certificate with this serial may act as this agent.
    pub(crate) fn accepts_serial(&self, serial: &str) -> bool {
        self.cert_serial == serial || self.previous_serial.as_deref() == Some(serial)
    }

    /// Whether an administrator deactivated the agent.
    pub(crate) fn is_deactivated(&self) -> bool {
        self.status == AgentStatus::Inactive && self.reason == Some(InactiveReason::Deactivated)
    }

    /// `status/reason`, as audit lines show it.
    pub(crate) fn status_text(&self) -> String {
        format!(
            "{}/{}",
            self.status,
            self.reason.map_or("-", InactiveReason::as_str)
        )
    }
}

/// The last doctor report an agent uploaded on request (its own table: a
/// report is kilobytes, and the fleet in memory holds none of them).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct DoctorReportRecord {
    /// Unix seconds when it arrived.
    pub(crate) received_at: u64,
    pub(crate) report: DoctorReport,
}

/// Soft state from heartbeats, group-committed.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub(crate) struct HeartbeatState {
    /// Unix milliseconds of the last accepted heartbeat (0 = never).
    pub(crate) last_heartbeat_ms: u64,
    pub(crate) seq: u64,
    pub(crate) uptime_s: u64,
    pub(crate) version: String,
    pub(crate) config_hash: String,
    pub(crate) config_drift: bool,
    pub(crate) doctor: DoctorSummary,
    pub(crate) update_state: String,
    pub(crate) update_version: String,
    pub(crate) update_error: Option<String>,
    pub(crate) capabilities: Vec<String>,
    /// The last configuration the agent refused.
    pub(crate) config_error: Option<ConfigRefusal>,
    /// Since when (ms) the agent's config has differed from the desired one
    /// or drifted on disk (0 = in sync).
    pub(crate) drift_since_ms: u64,
    /// Download progress of the reported update: bytes received, and of how
    /// many (absent in state written before phases had progress).
    pub(crate) update_bytes: Option<u64>,
    pub(crate) update_total: Option<u64>,
    /// The release last offered to the agent in a heartbeat answer, and when
    /// (ms) it was first offered: a rollout's `--agent-timeout` runs from it.
    pub(crate) offered_version: Option<String>,
    pub(crate) offered_at_ms: Option<u64>,
}

impl HeartbeatState {
    /// The update report as the API shows it.
    pub(crate) fn update_report(&self, running: &str) -> UpdateReport {
        UpdateReport {
            state: if self.update_state.is_empty() {
                UpdatePhase::Idle
            } else {
                UpdatePhase::parse(&self.update_state)
            },
            version: if self.update_version.is_empty() {
                running.to_owned()
            } else {
                self.update_version.clone()
            },
            error: self.update_error.clone(),
            bytes: self.update_bytes,
            total: self.update_total,
        }
    }

    /// The version whose update the agent reported failed or rolled back.
    pub(crate) fn failed_version(&self) -> Option<&str> {
        let failed = self.update_state == UpdatePhase::Failed.as_str()
            || self.update_state == UpdatePhase::RolledBack.as_str();
        failed.then_some(self.update_version.as_str())
    }
}

/// The last failed update an agent reported, with its log lines (its own
/// table: the fleet in memory holds none of them).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct UpdateFailureRecord {
    /// Unix seconds when it arrived.
    pub(crate) received_at: u64,
    pub(crate) report: UpdateFailureReport,
}

/// A registration token, with only a hash of its secret.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct TokenRecord {
    pub(crate) id: String,
    pub(crate) secret_sha256: String,
    pub(crate) created_at: u64,
    pub(crate) expires_at: u64,
    pub(crate) uses: u32,
    pub(crate) uses_left: u32,
    pub(crate) labels: Labels,
}

/// An issued certificate (kept for the idempotent enrollment answer and audit).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct CertRecord {
    pub(crate) agent_id: String,
    pub(crate) serial: String,
    pub(crate) pem: String,
    pub(crate) issued_at: u64,
    pub(crate) not_after: u64,
}

/// Which agent a (token, public key) pair enrolled, and when.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct EnrollmentRecord {
    pub(crate) agent_id: String,
    pub(crate) at: u64,
}

/// The stored configuration of one scope.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct ConfigRecord {
    /// `global`, `label:K=V` or `agent:ID`.
    pub(crate) scope: String,
    pub(crate) version: u64,
    /// Canonical JSON of the document.
    pub(crate) doc: String,
    pub(crate) hash: String,
    pub(crate) updated_at: u64,
}

/// One file of an imported release, stored under `blobs/sha256/<hex>`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct ReleaseFile {
    pub(crate) name: String,
    pub(crate) sha256: String,
    pub(crate) size: u64,
}

/// An imported release: its signed envelope and where its files are.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct ReleaseRecord {
    pub(crate) version: String,
    /// `release.dsse.json` as imported.
    pub(crate) envelope: String,
    pub(crate) files: Vec<ReleaseFile>,
    pub(crate) imported_at: u64,
}

/// One line of the audit log. Lines written before scoped admin tokens
/// have no actor, source or outcome: they read as the server's, ok.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct AuditRecord {
    pub(crate) at: u64,
    pub(crate) action: String,
    /// What was acted on (agent id, token id, scope, version, ...).
    pub(crate) subject: String,
    pub(crate) detail: String,
    /// Admin token name or agent id (see `audit::Actor`).
    pub(crate) actor: Option<String>,
    /// The caller's IP address.
    pub(crate) source: Option<String>,
    /// `ok` (absent), `refused` or `failed`.
    pub(crate) outcome: Option<String>,
}

/// A scoped admin token, with only a hash of its secret.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct AdminTokenRecord {
    pub(crate) name: String,
    /// `read`, `operate` or `admin` (see `roles::Role`).
    pub(crate) role: String,
    pub(crate) secret_sha256: String,
    pub(crate) created_at: u64,
    /// Unix seconds; `None`: never.
    pub(crate) expires_at: Option<u64>,
    pub(crate) revoked_at: Option<u64>,
}

/// A rollout as stored (see `rollout` for what the fields mean to the engine).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct RolloutRecord {
    pub(crate) id: String,
    pub(crate) release: String,
    /// Stage specs as given (`count:1`, `10`, ...).
    pub(crate) stages: Vec<String>,
    pub(crate) soak_ms: u64,
    pub(crate) max_failures: f64,
    /// Labels every member must carry; `target` selects a target triple.
    pub(crate) selector: Labels,
    pub(crate) status: String,
    pub(crate) reason: Option<String>,
    /// Index of the open stage (== stages.len() when completed).
    pub(crate) open_stage: u32,
    /// Since when (ms) the open stage's members have all been updated and
    /// healthy (0: not yet); the soak timer.
    pub(crate) healthy_since_ms: u64,
    pub(crate) created_at: u64,
    /// Failures already seen when an admin resumed: not counted again.
    pub(crate) ignored_failures: Vec<String>,
    /// How long (ms) a member has to commit once offered; absent (a rollout
    /// stored before deadlines): the default, 1h.
    pub(crate) agent_timeout_ms: Option<u64>,
    /// UTC maintenance window for offers, `HH:MM-HH:MM`; absent: any time.
    pub(crate) window: Option<String>,
    /// Days of the window, as given (`mon-fri`); absent: every day.
    pub(crate) days: Option<String>,
    /// When (ms) the open stage opened; absent: at `created_at`.
    pub(crate) stage_opened_ms: Option<u64>,
    /// When (ms) an admin last resumed it: members' deadlines run from
    /// no earlier than this.
    pub(crate) resumed_ms: Option<u64>,
}

/// A deployment task as created: the envelope exactly as received (the
/// server never alters it), and what the server read from it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct TaskRecord {
    /// The server's id: `task::server_task_id` of the payload.
    pub(crate) id: String,
    /// The signed id.
    pub(crate) task_id: String,
    pub(crate) task_type: String,
    pub(crate) envelope: String,
    /// Unix seconds.
    pub(crate) not_after: u64,
    /// The audience: agent ids, or a selector (exactly one is set).
    pub(crate) agents: Option<Vec<String>>,
    pub(crate) selector: Option<Labels>,
    pub(crate) created_at: u64,
    pub(crate) cancelled_at: Option<u64>,
}

/// The latest report of one agent on one task.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct TaskResultRecord {
    /// The server's task id.
    pub(crate) task: String,
    pub(crate) agent: String,
    pub(crate) status: TaskStatus,
    pub(crate) reason: Option<String>,
    pub(crate) exit_code: Option<i32>,
    pub(crate) output: Option<String>,
    /// RFC 3339, as the agent reported them.
    pub(crate) started: Option<String>,
    pub(crate) finished: Option<String>,
    /// Unix seconds of the last report.
    pub(crate) reported_at: u64,
}
