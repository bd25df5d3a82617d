//! Messages of the operator's admin routes that are not about agents: scoped
//! admin tokens (`/v1/admin/admin-tokens`, `/v1/admin/whoami`), the audit log
//! (`/v1/admin/audit`) and backups (`/v1/admin/backup`). Fields may be added,
//! never renamed.

use miniserde::{Deserialize, Serialize};

/// `GET /v1/admin/whoami`: the token that called.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WhoAmI {
    pub name: String,
    /// `read`, `operate` or `admin`.
    pub role: String,
}

/// `POST /v1/admin/admin-tokens`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct AdminTokenCreateRequest {
    pub name: String,
    pub role: String,
    /// Lifetime in milliseconds; absent: the token does not expire.
    pub ttl_ms: Option<u64>,
}

/// The new admin token, shown once.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct AdminTokenCreateResponse {
    pub token: String,
    pub name: String,
    pub role: String,
    pub expires_at: Option<String>,
}

/// One admin token as `admin-token list` shows it (no secret, no hash).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct AdminTokenView {
    pub name: String,
    pub role: String,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
    /// `active`, `expired` or `revoked`.
    pub state: String,
}

/// One line of the audit log.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// Position in the log: strictly increasing, never reused.
    pub seq: u64,
    pub time: String,
    /// Admin token name or agent id; `server` for the server's own acts;
    /// empty when a refused caller could not be identified.
    pub actor: String,
    /// The caller's IP address; empty for the server's own acts.
    pub source: String,
    pub action: String,
    pub target: String,
    /// `ok`, `refused` or `failed`.
    pub outcome: String,
    pub detail: String,
}

/// `GET /v1/admin/audit`: a page of entries, oldest first.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    /// Pass as `after=` for the next page; null on the last page.
    pub next: Option<u64>,
}

/// `POST /v1/admin/backup`.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct BackupRequest {
    /// Put the CA private key into the backup too.
    pub include_ca_key: bool,
}
