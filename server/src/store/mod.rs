//! The store: every durable fact of the server behind one narrow trait
//! (agents, heartbeat soft state, tokens, enrollments, certificates,
//! configuration scopes, releases, rollouts, tasks and their results, admin
//! tokens, the audit log), so that a second
//! backend (PostgreSQL) can be added without touching the domain or API code.
//!
//! A backend keeps records and makes writes atomic and durable; it decides
//! nothing. Where a write depends on what is stored (a token's uses, whether a
//! certificate may be replaced), the domain passes its rule in as a closure
//! that the backend runs inside the write transaction, and whatever the rule
//! refuses comes back as [`StoreError::Aborted`] with nothing written.
//!
//! Enrollment, token use, lifecycle, certificate, configuration, release,
//! rollout, task and task result changes are durable when a method returns; heartbeat soft state is
//! written in batches (`save_heartbeats`).
//!
//! Two backends: redb, one file in the data dir (the default, one server),
//! and PostgreSQL (`--store postgres://…`), a database several servers can
//! share.
//!
//! Blobs (release files, task artifacts: content-addressed bytes) are the
//! store's too (`put_blob`, `copy_blob`, `blobs`). With redb the data dir's
//! `blobs/sha256/` is where the store keeps them; with PostgreSQL they are in
//! the database, in chunks, and that directory is only each server's cache
//! of them (filled by `app`), so that any server serves any blob.

mod postgres;
mod redb;

#[cfg(test)]
pub(crate) mod conformance;

use std::cell::Cell;
use std::fmt;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use crate::records::{
    AdminTokenRecord, AgentRecord, AuditRecord, CertRecord, ConfigRecord, DoctorReportRecord,
    HeartbeatState, ReleaseRecord, RolloutRecord, TaskRecord, TaskResultRecord, TokenRecord,
    UpdateFailureRecord,
};
use crate::refusal::Refusal;

pub(crate) use self::postgres::{PgStore, is_postgres_url, redact};
pub(crate) use self::redb::RedbStore;

/// What went wrong in the store. A backend's own error is boxed as the
/// source of `Backend`, so that no backend type leaks out.
#[derive(Debug)]
#[non_exhaustive]
pub enum StoreError {
    /// The store file does not exist (`init` was not run).
    Missing { path: PathBuf },
    /// Another server has the store open.
    InUse { path: PathBuf },
    /// The store was written by a server with another schema.
    Schema {
        path: PathBuf,
        found: Option<String>,
        want: &'static str,
    },
    /// The backend failed (I/O, transaction, commit).
    Backend {
        context: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The store cannot be written now (an I/O error: a full disk, most
    /// often); nothing was changed, and a later try may succeed.
    Unavailable {
        context: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The database holds no store (`init` was not run against it).
    NotInitialized { store: String },
    /// The database's schema is newer than this server knows (a newer
    /// server migrated it).
    SchemaTooNew {
        store: String,
        found: i64,
        known: i64,
    },
    /// A stored record does not decode.
    Corrupt { what: &'static str, key: String },
    /// No record with that key.
    NotFound { what: &'static str, key: String },
    /// A record with that key exists already.
    Exists { what: &'static str, key: String },
    /// The caller's rule refused the change; nothing was written.
    Aborted(Refusal),
    /// Singleton work fenced off: this server no longer holds the lease it
    /// acted under (another server leads now); nothing was written.
    Fenced { lease: &'static str },
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Missing { path } => write!(
                f,
                "{} does not exist: run `stella-server init` first",
                path.display()
            ),
            StoreError::InUse { path } => write!(
                f,
                "{} is in use by another stella-server process",
                path.display()
            ),
            StoreError::Schema { path, found, want } => write!(
                f,
                "{} has schema {found:?}, this server reads schema {want}",
                path.display()
            ),
            StoreError::NotInitialized { store } => write!(
                f,
                "{store} holds no Stella store: run `stella-server init --store URL` first"
            ),
            StoreError::SchemaTooNew {
                store,
                found,
                known,
            } => write!(
                f,
                "{store} has schema version {found}, newer than this server knows ({known}): run a newer stella-server"
            ),
            StoreError::Backend { context, source } => write!(f, "store: {context}: {source}"),
            StoreError::Unavailable { context, source } => write!(
                f,
                "the store cannot be written now ({context}: {source}); nothing was changed, try again later"
            ),
            StoreError::Corrupt { what, key } => {
                write!(f, "corrupt {what} record {key:?} in the store")
            }
            StoreError::NotFound { what, key } => write!(f, "no {what} with id {key}"),
            StoreError::Exists { what, key } => write!(f, "{what} {key} exists already"),
            StoreError::Aborted(refusal) => refusal.fmt(f),
            StoreError::Fenced { lease } => write!(
                f,
                "this server no longer holds the {lease} lease (another server leads now); nothing was written"
            ),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Backend { source, .. } | StoreError::Unavailable { source, .. } => {
                Some(source.as_ref())
            }
            StoreError::Aborted(r) => Some(r),
            _ => None,
        }
    }
}

impl From<Refusal> for StoreError {
    fn from(r: Refusal) -> Self {
        StoreError::Aborted(r)
    }
}

/// A whole store as `migrate` copies it: every table's rows as stored (key,
/// record JSON), by the redb table names.
#[derive(Debug, Default)]
pub(crate) struct Export {
    /// Admin token hash and the like (not the schema version).
    pub(crate) meta: Vec<(String, String)>,
    /// `(table, rows)`, for the tables keyed by a string.
    pub(crate) tables: Vec<(&'static str, Vec<(String, String)>)>,
    /// The audit log, in order.
    pub(crate) audit: Vec<String>,
}

impl Export {
    /// The rows of `table`.
    pub(crate) fn rows(&self, table: &str) -> &[(String, String)] {
        self.tables
            .iter()
            .find(|(name, _)| *name == table)
            .map_or(&[], |(_, rows)| rows.as_slice())
    }
}

/// What an enrollment rule sees, read inside the enrollment's transaction.
#[derive(Debug, Clone)]
pub(crate) struct EnrollmentState {
    /// The token presented, as stored (None: unknown id).
    pub(crate) token: Option<TokenRecord>,
    /// The earlier enrollment of the same token and public key, if any.
    pub(crate) prior: Option<PriorEnrollment>,
}

/// An earlier enrollment of the same token and key.
#[derive(Debug, Clone)]
pub(crate) struct PriorEnrollment {
    /// When it happened (unix seconds).
    pub(crate) at: u64,
    pub(crate) agent: AgentRecord,
    /// The agent's current certificate.
    pub(crate) cert: CertRecord,
}

/// What an accepted enrollment writes, all in one transaction: the token with
/// one use consumed, the new agent, its certificate, and the (token, key)
/// marker that makes a retry idempotent.
#[derive(Debug, Clone)]
pub(crate) struct NewEnrollment {
    pub(crate) token: TokenRecord,
    pub(crate) agent: AgentRecord,
    pub(crate) cert: CertRecord,
    pub(crate) at: u64,
}

/// Decides an enrollment from what is stored: `Ok(Some)` writes it,
/// `Ok(None)` writes nothing (the earlier answer stands), `Err` refuses.
pub(crate) type EnrollRule<'a> =
    dyn FnMut(&EnrollmentState) -> Result<Option<NewEnrollment>, Refusal> + 'a;

/// Changes one agent record: `Ok(true)` writes it, `Ok(false)` leaves it.
pub(crate) type AgentChange<'a> = dyn FnMut(&mut AgentRecord) -> Result<bool, Refusal> + 'a;

/// Changes an agent record for a new certificate; returns the audit detail.
pub(crate) type CertificateChange<'a> =
    dyn FnOnce(&mut AgentRecord) -> Result<String, Refusal> + 'a;

/// Whether the store can write, as `/healthz` and `/metrics` report it.
#[derive(Debug, Clone, Default)]
pub(crate) struct StoreHealth {
    /// Why the last write failed, while writing does not work again.
    pub(crate) unwritable: Option<String>,
    /// Store operations that failed since the server started.
    pub(crate) errors: u64,
}

/// Every durable operation of the server. Implementations must be safe to
/// share between threads; every write method is one atomic, durable
/// transaction with its audit line.
pub(crate) trait Store: Send + Sync {
    /// Whether the last write succeeded, and how many operations failed.
    /// Cheap: no I/O.
    fn health(&self) -> StoreHealth;

    /// A small write (a timestamp), to learn whether writing works again
    /// after a failure.
    fn probe_write(&self, now: u64) -> Result<(), StoreError>;

    /// Hex SHA-256 of the admin token.
    fn admin_token_sha256(&self) -> Result<String, StoreError>;

    /// Every agent with its last saved heartbeat state, one at a time.
    fn load_agents(
        &self,
        each: &mut dyn FnMut(AgentRecord, HeartbeatState),
    ) -> Result<(), StoreError>;

    /// One agent.
    fn agent(&self, id: &str) -> Result<Option<AgentRecord>, StoreError>;

    /// Records a new token; refuses an id that exists.
    fn insert_token(&self, token: &TokenRecord) -> Result<(), StoreError>;

    /// One token. (Read by the conformance and crash-consistency tests;
    /// nothing in the server needs it yet.)
    #[allow(dead_code)]
    fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError>;

    /// Runs `rule` on the token `token_id` and the earlier enrollment of
    /// (`token_id`, `key_sha256`), and writes what it returns, in one
    /// transaction.
    fn enroll(
        &self,
        token_id: &str,
        key_sha256: &str,
        rule: &mut EnrollRule<'_>,
    ) -> Result<(), StoreError>;

    /// Applies `change` to each named agent in one transaction, with an audit
    /// line `action` per changed agent; returns the records written. An
    /// unknown id fails the whole call.
    fn update_agents(
        &self,
        ids: &[&str],
        now: u64,
        action: &str,
        change: &mut AgentChange<'_>,
    ) -> Result<Vec<AgentRecord>, StoreError>;

    /// A certificate by serial.
    fn cert(&self, serial: &str) -> Result<Option<CertRecord>, StoreError>;

    /// Records `cert` and applies `change` to its agent, in one transaction.
    fn replace_certificate(
        &self,
        cert: &CertRecord,
        change: Box<CertificateChange<'_>>,
    ) -> Result<AgentRecord, StoreError>;

    /// Every rollout.
    fn rollouts(&self) -> Result<Vec<RolloutRecord>, StoreError>;

    /// Writes a rollout's new state, with an audit line. With `expected`,
    /// only over that stored state: a rollout another server changed
    /// meanwhile is refused (`Aborted`, a conflict) with nothing written.
    fn put_rollout(
        &self,
        rollout: &RolloutRecord,
        expected: Option<&RolloutRecord>,
        now: u64,
        action: &str,
        detail: &str,
    ) -> Result<(), StoreError>;

    /// Every imported release.
    fn releases(&self) -> Result<Vec<ReleaseRecord>, StoreError>;

    /// Records a release unless its version exists; returns the existing
    /// record then (nothing written).
    fn insert_release(&self, release: &ReleaseRecord) -> Result<Option<ReleaseRecord>, StoreError>;

    /// Every configuration scope.
    fn configs(&self) -> Result<Vec<ConfigRecord>, StoreError>;

    /// Stores the next version of one scope's configuration.
    fn set_config(
        &self,
        scope: &str,
        doc: &str,
        hash: &str,
        now: u64,
    ) -> Result<ConfigRecord, StoreError>;

    /// Stores agent `id`'s doctor report (replacing the last) and clears its
    /// doctor request, in one transaction; returns the agent written.
    fn put_doctor_report(
        &self,
        id: &str,
        report: &DoctorReportRecord,
    ) -> Result<AgentRecord, StoreError>;

    /// Agent `id`'s last doctor report.
    fn doctor_report(&self, id: &str) -> Result<Option<DoctorReportRecord>, StoreError>;

    /// Stores the last failed update agent `id` reported (replacing the
    /// one before), durably, with an audit line.
    fn put_update_failure(&self, id: &str, failure: &UpdateFailureRecord)
    -> Result<(), StoreError>;

    /// The last failed update agent `id` reported.
    fn update_failure(&self, id: &str) -> Result<Option<UpdateFailureRecord>, StoreError>;
    /// Every task, in server id order.
    fn tasks(&self) -> Result<Vec<TaskRecord>, StoreError>;

    /// Records a new task; refuses an id that exists (`Exists`).
    fn insert_task(&self, task: &TaskRecord) -> Result<(), StoreError>;

    /// Replaces a stored task (a cancel), with an audit line; refuses an
    /// unknown id (`NotFound`).
    fn put_task(&self, task: &TaskRecord, now: u64, action: &str) -> Result<(), StoreError>;

    /// The results of task `task`, or of every task, in (task, agent) order.
    fn task_results(&self, task: Option<&str>) -> Result<Vec<TaskResultRecord>, StoreError>;

    /// Stores each result, replacing the earlier one of the same (task,
    /// agent), in one transaction.
    fn put_task_results(&self, results: &[TaskResultRecord]) -> Result<(), StoreError>;

    /// Writes a batch of heartbeat states (one commit for the whole batch).
    fn save_heartbeats(&self, batch: &[(String, HeartbeatState)]) -> Result<(), StoreError>;

    /// The audit log, oldest first. (Read by the conformance tests; the
    /// server reads it in pages, `audit_page`.)
    #[allow(dead_code)]
    fn audit_log(&self) -> Result<Vec<AuditRecord>, StoreError>;

    /// Up to `limit` audit lines after sequence number `after` (from the
    /// first when `None`) that `select` keeps, oldest first, each with its
    /// sequence number.
    fn audit_page(
        &self,
        after: Option<u64>,
        limit: usize,
        select: &dyn Fn(&AuditRecord) -> bool,
    ) -> Result<Vec<(u64, AuditRecord)>, StoreError>;

    /// Appends one audit line on its own: an act that changed nothing (a
    /// refusal) or that changed no record (a backup).
    fn append_audit(&self, line: &AuditRecord) -> Result<(), StoreError>;

    /// Every admin token (revoked and expired ones too), by name.
    fn admin_tokens(&self) -> Result<Vec<AdminTokenRecord>, StoreError>;

    /// Records a new admin token with its audit line; refuses a name that
    /// exists.
    fn insert_admin_token(&self, token: &AdminTokenRecord) -> Result<(), StoreError>;

    /// Applies `change` to admin token `name` (`Ok(true)` writes it, with an
    /// audit line `action`); returns the token as stored afterwards.
    fn update_admin_token(
        &self,
        name: &str,
        now: u64,
        action: &str,
        change: &mut AdminTokenChange<'_>,
    ) -> Result<AdminTokenRecord, StoreError>;

    /// Every stored row, from one read transaction (a consistent copy while
    /// the server writes): `each(table, key, value)`, table by table in key
    /// order. Table names and values are the same for every backend:
    /// `meta` (text), and one JSON record per row for the others (see
    /// [`SNAPSHOT_TABLES`]); `audit` keys are decimal sequence numbers.
    fn snapshot(&self, each: &mut SnapshotRow<'_>) -> Result<(), StoreError>;

    /// Writes rows from `snapshot` into this (new, empty) store, in one
    /// transaction; refuses a table it does not know.
    fn restore_rows(&self, rows: &[(String, String, Vec<u8>)]) -> Result<(), StoreError>;

    /// Stores blob `sha256`, `size` bytes read from `data` (streamed: never
    /// whole in memory), durably and whole or not at all; refuses bytes whose
    /// digest or size differ (`Aborted`, nothing stored). A blob stored
    /// already is kept and `data` is not read. Blobs are never changed or
    /// removed, and are not part of `snapshot` (they may be large: the redb
    /// data dir's backup carries its blob files, PostgreSQL's own backups
    /// its blob tables).
    fn put_blob(&self, sha256: &str, size: u64, data: &mut dyn Read) -> Result<(), StoreError>;

    /// Writes stored blob `sha256` into `out`, streamed; `Ok(false)`, with
    /// nothing written, when no such blob is stored. After an error `out`
    /// may hold part of it: the caller discards it.
    fn copy_blob(&self, sha256: &str, out: &mut dyn Write) -> Result<bool, StoreError>;

    /// Every stored blob: (sha256, size), by sha256.
    fn blobs(&self) -> Result<Vec<(String, u64)>, StoreError>;

    /// What a store that several servers share offers them to stay in step
    /// (`None`: this server is the store's only writer, as with redb).
    fn cluster(&self) -> Option<&dyn Cluster> {
        None
    }
}

/// What changed, as the events table names it: which cache to refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChangeKind {
    /// An agent's record (key: its id): enrolled, changed status, renewed.
    Agent,
    /// A configuration scope (key: the scope).
    Config,
    /// An imported release (key: its version).
    Release,
    /// A rollout (key: its id).
    Rollout,
    /// A task created or cancelled (key: its id).
    Task,
    /// An agent's result of a task (key: `<task>/<agent>`).
    TaskResult,
    /// An admin token created or revoked (key: its name).
    AdminToken,
    /// A failed registration (key: the source address), for the brake.
    RegistrationFailure,
    /// A failed admin authentication (key: the source address).
    AdminFailure,
}

impl ChangeKind {
    pub(crate) const ALL: [ChangeKind; 9] = [
        ChangeKind::Agent,
        ChangeKind::Config,
        ChangeKind::Release,
        ChangeKind::Rollout,
        ChangeKind::Task,
        ChangeKind::TaskResult,
        ChangeKind::AdminToken,
        ChangeKind::RegistrationFailure,
        ChangeKind::AdminFailure,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Agent => "agent",
            ChangeKind::Config => "config",
            ChangeKind::Release => "release",
            ChangeKind::Rollout => "rollout",
            ChangeKind::Task => "task",
            ChangeKind::TaskResult => "task_result",
            ChangeKind::AdminToken => "admin_token",
            ChangeKind::RegistrationFailure => "registration_failure",
            ChangeKind::AdminFailure => "admin_failure",
        }
    }

    /// `None` for a kind a newer server wrote: skipped, not an error.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == text)
    }
}

/// One change another server made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChangeEvent {
    /// Its place in the events table (increasing, with gaps).
    pub(crate) seq: u64,
    pub(crate) kind: Option<ChangeKind>,
    pub(crate) key: String,
}

/// A read of the events: each with whether this server wrote it, and the
/// oldest sequence number kept.
pub(crate) type ChangesRead = (Vec<(ChangeEvent, bool)>, u64);

/// How a wait for changes ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// A notification arrived: read the events.
    Notified,
    /// Nothing arrived in time: read the events anyway (a notification can
    /// be lost; the table cannot).
    Quiet,
    /// The listener was lost and is listening again: changes may have been
    /// missed while it was away, so resync every cache.
    Resync,
}

/// A store several servers share: the change feed that keeps their caches
/// in step (an events table written in the same transaction as each change
/// is the truth; a notification only wakes the readers), the heartbeat
/// feed, and the lease that elects one server for singleton work.
pub(crate) trait Cluster: Send + Sync {
    /// This server's name in the feeds and the lease (random per process).
    fn node(&self) -> &str;

    /// The newest event's sequence number (0 when there is none): where a
    /// server that just loaded its caches starts reading.
    fn last_change(&self) -> Result<u64, StoreError>;

    /// Up to `limit` events after `after`, in sequence order, each with
    /// whether this server wrote it, and the oldest sequence number still
    /// kept (events older than an hour are pruned: a reader behind that
    /// must resync).
    fn changes_since(&self, after: u64, limit: usize) -> Result<ChangesRead, StoreError>;

    /// Waits up to `timeout` for a notification of new events.
    fn wait_for_change(&self, timeout: Duration) -> Wake;

    /// Records a failed registration or admin authentication from `source`
    /// for every server's brake.
    fn record_failure(&self, kind: ChangeKind, source: &str) -> Result<(), StoreError>;

    /// Heartbeat states other servers saved since `since_ms` (the
    /// database's clock), with the database's time now.
    fn heartbeats_since(
        &self,
        since_ms: u64,
    ) -> Result<(Vec<(String, HeartbeatState)>, u64), StoreError>;

    /// One task result.
    fn task_result(&self, task: &str, agent: &str) -> Result<Option<TaskResultRecord>, StoreError>;

    /// Takes or renews lease `name` for `ttl` (by the database's clock);
    /// returns its fencing token when this server holds it, `None` when
    /// another server does. A new holder gets a greater token.
    fn acquire_lease(&self, name: &'static str, ttl: Duration) -> Result<Option<u64>, StoreError>;

    /// Gives lease `name` up at once (a graceful stop), if held.
    fn release_lease(&self, name: &'static str) -> Result<(), StoreError>;

    /// Deletes events older than `age`.
    fn prune_changes(&self, age: Duration) -> Result<u64, StoreError>;
}

thread_local! {
    /// The lease and fencing token the singleton work on this thread acts
    /// under (see [`fenced`]).
    static FENCE: Cell<Option<(&'static str, u64)>> = const { Cell::new(None) };
}

/// Runs `work` with every store write on this thread fenced by lease
/// `lease` held with token `fence`: a backend that several servers share
/// checks, inside each write's transaction, that the lease is still held
/// with that token, and refuses the write otherwise ([`StoreError::Fenced`]),
/// so a server that lost its lease (paused, partitioned) cannot act as the
/// leader any more. The store runs its work on the caller's thread.
pub(crate) fn fenced<T>(lease: &'static str, fence: u64, work: impl FnOnce() -> T) -> T {
    let before = FENCE.with(|f| f.replace(Some((lease, fence))));
    let out = work();
    FENCE.with(|f| f.set(before));
    out
}

/// The lease and token writes on this thread are fenced by, if any.
pub(crate) fn current_fence() -> Option<(&'static str, u64)> {
    FENCE.with(Cell::get)
}

/// The refusal of a rollout write over a state that is no longer stored.
pub(crate) fn rollout_changed(id: &str) -> StoreError {
    StoreError::Aborted(Refusal::conflict(format!(
        "rollout {id} changed meanwhile (through another server); look again and retry"
    )))
}

/// Takes one row of a snapshot: `(table, key, value)`.
pub(crate) type SnapshotRow<'a> = dyn FnMut(&str, &str, &[u8]) -> Result<(), StoreError> + 'a;

/// Changes one admin token record: `Ok(true)` writes it, `Ok(false)` leaves it.
pub(crate) type AdminTokenChange<'a> =
    dyn FnMut(&mut AdminTokenRecord) -> Result<bool, Refusal> + 'a;

/// The tables of a snapshot, in the order `snapshot` gives them.
pub(crate) const SNAPSHOT_TABLES: &[&str] = &[
    "meta",
    "agents",
    "heartbeats",
    "tokens",
    "certs",
    "enrollments",
    "rollouts",
    "releases",
    "configs",
    "doctor_reports",
    "update_failures",
    "tasks",
    "task_results",
    "admin_tokens",
    "audit",
];
