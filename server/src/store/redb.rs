//! The redb backend of the store: one file in the data dir, one table per
//! kind of record, each record the JSON of its `records` type; blobs are
//! the files of the data dir's `blobs/sha256/` beside it. The only file
//! that names a redb type; it keeps records and decides nothing.

use crate::audit::{self, detail};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use ::redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use miniserde::{Deserialize, Serialize, json};

use super::{
    AdminTokenChange, AgentChange, CertificateChange, EnrollRule, EnrollmentState, PriorEnrollment,
    SnapshotRow, Store, StoreError, StoreHealth, rollout_changed,
};
use crate::records::{
    AdminTokenRecord, AgentRecord, AuditRecord, CertRecord, ConfigRecord, DoctorReportRecord,
    EnrollmentRecord, HeartbeatState, ReleaseRecord, RolloutRecord, TaskRecord, TaskResultRecord,
    TokenRecord, UpdateFailureRecord,
};
use crate::refusal::Refusal;

const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
const HEARTBEATS: TableDefinition<&str, &[u8]> = TableDefinition::new("heartbeats");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const CERTS: TableDefinition<&str, &[u8]> = TableDefinition::new("certs");
/// Key: `<token id>/<hex sha256 of the public key>`.
const ENROLLMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("enrollments");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
/// Key: rollout id.
const ROLLOUTS: TableDefinition<&str, &[u8]> = TableDefinition::new("rollouts");
/// Key: release version.
const RELEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("releases");
/// Key: scope (`global`, `label:K=V`, `agent:ID`).
const CONFIGS: TableDefinition<&str, &[u8]> = TableDefinition::new("configs");
/// Agent id → its last requested doctor report (created on first use: a
/// store made before doctor on demand has no such table).
const DOCTOR_REPORTS: TableDefinition<&str, &[u8]> = TableDefinition::new("doctor_reports");
/// Agent id → the last failed update it reported, with its log lines
/// (created on first use, as `DOCTOR_REPORTS`).
const UPDATE_FAILURES: TableDefinition<&str, &[u8]> = TableDefinition::new("update_failures");
/// Server task id → task (created on first use, like `doctor_reports`).
const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
/// Key: `<server task id>/<agent id>` → that agent's latest result (created
/// on first use).
const TASK_RESULTS: TableDefinition<&str, &[u8]> = TableDefinition::new("task_results");

/// Admin token name → its record (created on first use: a store made
/// before scoped admin tokens has only `meta`'s admin token hash).
const ADMIN_TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("admin_tokens");

/// The tables keyed by text with JSON records (every table but `meta` and
/// `audit`), by name: what `export` copies (a new table is added to
/// `PgStore::import` too) and what a backup snapshot holds.
const EXPORTED_TABLES: [(&str, TableDefinition<&str, &[u8]>); 13] = [
    ("agents", AGENTS),
    ("heartbeats", HEARTBEATS),
    ("tokens", TOKENS),
    ("certs", CERTS),
    ("enrollments", ENROLLMENTS),
    ("rollouts", ROLLOUTS),
    ("releases", RELEASES),
    ("configs", CONFIGS),
    ("doctor_reports", DOCTOR_REPORTS),
    ("update_failures", UPDATE_FAILURES),
    ("tasks", TASKS),
    ("task_results", TASK_RESULTS),
    ("admin_tokens", ADMIN_TOKENS),
];

/// redb's page cache (its default is 1 GiB).
const STORE_CACHE_BYTES: usize = 32 * 1024 * 1024;
const SCHEMA_VERSION: &str = "1";
const ADMIN_HASH_KEY: &str = "admin_token_sha256";
/// Written by the health check while the store could not write.
const PROBE_KEY: &str = "last_write_probe";

/// Opens the database again after an I/O failure.
type Reopen = Box<dyn Fn() -> Result<Database, StoreError> + Send + Sync>;

/// The store in one redb file.
///
/// After an I/O error (a full disk, most often) redb refuses every later
/// transaction until the database is closed and opened again. So the file is
/// reopened here, behind the trait: at the failure, and again at the next
/// call while that does not succeed. A write that fails this way commits
/// nothing (redb's commit is atomic), so what callers were told was
/// written stays written.
pub(crate) struct RedbStore {
    /// `None` while closed after an I/O failure and not yet reopened.
    db: RwLock<Option<Database>>,
    reopen: Reopen,
    /// Why the last write failed, until a write succeeds again.
    unwritable: Mutex<Option<String>>,
    /// Store operations that failed, since start.
    errors: AtomicU64,
    /// Where blobs are kept: `blobs/sha256/` of the data dir that holds the
    /// store file (one server: its data dir is the blob store).
    blob_dir: PathBuf,
}

/// Whether a redb error is an I/O failure: the database must be reopened,
/// and the caller may try again later.
fn is_io(e: &::redb::Error) -> bool {
    matches!(
        e,
        ::redb::Error::Io(_) | ::redb::Error::PreviousIo | ::redb::Error::DatabaseClosed
    )
}

macro_rules! backend_error_from {
    ($($t:ty => $what:literal),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                let e: ::redb::Error = e.into();
                if is_io(&e) {
                    StoreError::Unavailable { context: $what.to_owned(), source: Box::new(e) }
                } else {
                    StoreError::Backend { context: $what.to_owned(), source: Box::new(e) }
                }
            }
        }
    )*};
}
backend_error_from!(
    ::redb::Error => "redb",
    ::redb::TransactionError => "redb transaction",
    ::redb::TableError => "redb table",
    ::redb::StorageError => "redb storage",
    ::redb::CommitError => "redb commit"
);

fn open_error(path: &Path, e: ::redb::DatabaseError) -> StoreError {
    match e {
        ::redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse {
            path: path.to_owned(),
        },
        ::redb::DatabaseError::Storage(storage) => {
            let e: ::redb::Error = storage.into();
            let context = format!("cannot open {}", path.display());
            if is_io(&e) {
                StoreError::Unavailable {
                    context,
                    source: Box::new(e),
                }
            } else {
                StoreError::Backend {
                    context,
                    source: Box::new(e),
                }
            }
        }
        other => StoreError::Backend {
            context: format!("cannot open {}", path.display()),
            source: Box::new(other),
        },
    }
}

/// The blob directory of the data dir that holds the store file `path`.
fn blob_dir_beside(path: &Path) -> PathBuf {
    crate::blobs::blob_dir(path.parent().unwrap_or(Path::new(".")))
}

/// An I/O failure on a blob file, as a store error (a full disk: try again
/// later, as for the store file).
fn blob_error(context: String, e: std::io::Error) -> StoreError {
    if e.kind() == std::io::ErrorKind::StorageFull {
        StoreError::Unavailable {
            context,
            source: Box::new(e),
        }
    } else {
        StoreError::Backend {
            context,
            source: Box::new(e),
        }
    }
}

/// Opens the store file with the server's settings.
fn open_file(path: &Path) -> Result<Database, StoreError> {
    // redb's read cache defaults to 1 GiB and keeps every page that
    // load_agents read at start: about 0.9 KiB per agent. 32 MiB holds
    // the hot pages; heartbeats and admin reads come from memory anyway.
    Database::builder()
        .set_cache_size(STORE_CACHE_BYTES)
        .open(path)
        .map_err(|e| open_error(path, e))
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    json::to_string(value).into_bytes()
}

fn decode<T: Deserialize>(what: &'static str, key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| json::from_str(s).ok())
        .ok_or_else(|| StoreError::Corrupt {
            what,
            key: key.to_owned(),
        })
}

fn read_lock<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write_lock<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn enrollment_key(token_id: &str, key_sha256: &str) -> String {
    format!("{token_id}/{key_sha256}")
}

impl RedbStore {
    /// Creates a new store file with the admin token's hash.
    pub(crate) fn create(path: &Path, admin_sha256: &str) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|e| open_error(path, e))?;
        // It holds token and admin hashes: owner only.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
            StoreError::Backend {
                context: format!("cannot restrict {}", path.display()),
                source: Box::new(e),
            }
        })?;
        let blob_dir = blob_dir_beside(path);
        let path = path.to_owned();
        Self::initialize(
            db,
            Box::new(move || open_file(&path)),
            blob_dir,
            admin_sha256,
        )
    }

    fn new(db: Database, reopen: Reopen, blob_dir: PathBuf) -> Self {
        Self {
            db: RwLock::new(Some(db)),
            reopen,
            unwritable: Mutex::new(None),
            errors: AtomicU64::new(0),
            blob_dir,
        }
    }

    fn initialize(
        db: Database,
        reopen: Reopen,
        blob_dir: PathBuf,
        admin_sha256: &str,
    ) -> Result<Self, StoreError> {
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            meta.insert("schema", SCHEMA_VERSION)?;
            meta.insert(ADMIN_HASH_KEY, admin_sha256)?;
            txn.open_table(AGENTS)?;
            txn.open_table(HEARTBEATS)?;
            txn.open_table(TOKENS)?;
            txn.open_table(CERTS)?;
            txn.open_table(ENROLLMENTS)?;
            txn.open_table(AUDIT)?;
            txn.open_table(CONFIGS)?;
            txn.open_table(RELEASES)?;
            txn.open_table(ROLLOUTS)?;
        }
        txn.commit()?;
        Ok(Self::new(db, reopen, blob_dir))
    }

    /// Opens an existing store file (exclusively: one server per data dir).
    pub(crate) fn open(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::Missing {
                path: path.to_owned(),
            });
        }
        let db = open_file(path)?;
        let owned = path.to_owned();
        let store = Self::new(
            db,
            Box::new(move || open_file(&owned)),
            blob_dir_beside(path),
        );
        store.check_schema(path)?;
        Ok(store)
    }

    /// Runs `work` on the open database. An I/O failure closes the
    /// database and tries to open it again at once; while that fails,
    /// every call tries again first. A failed `write` marks the store
    /// unwritable until a commit succeeds (see `commit`).
    fn with_db<T>(
        &self,
        write: bool,
        work: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if read_lock(&self.db).is_none() {
            self.reopen_now().inspect_err(|_| self.count_error())?;
        }
        let db = read_lock(&self.db);
        let Some(open) = db.as_ref() else {
            self.count_error();
            return Err(StoreError::Unavailable {
                context: "the store is being reopened after an I/O error".to_owned(),
                source: "closed".into(),
            });
        };
        let result = work(open);
        drop(db);
        match &result {
            Err(e @ StoreError::Unavailable { .. }) => {
                self.count_error();
                if write {
                    *lock(&self.unwritable) = Some(e.to_string());
                }
                *write_lock(&self.db) = None;
                // The caller logs the failure; a failed reopen is tried
                // again at the next call.
                let _ = self.reopen_now();
            }
            Err(StoreError::Backend { .. } | StoreError::Corrupt { .. }) => self.count_error(),
            _ => {}
        }
        result
    }

    /// Commits a write transaction; one that is durable shows that the
    /// store can write again.
    fn commit(&self, txn: ::redb::WriteTransaction) -> Result<(), StoreError> {
        txn.commit()?;
        *lock(&self.unwritable) = None;
        Ok(())
    }

    /// Opens the database again unless another call did already.
    fn reopen_now(&self) -> Result<(), StoreError> {
        let mut db = write_lock(&self.db);
        if db.is_none() {
            *db = Some((self.reopen)()?);
        }
        Ok(())
    }

    fn count_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    fn check_schema(&self, path: &Path) -> Result<(), StoreError> {
        let schema = self.meta("schema")?;
        if schema.as_deref() != Some(SCHEMA_VERSION) {
            return Err(StoreError::Schema {
                path: path.to_owned(),
                found: schema,
                want: SCHEMA_VERSION,
            });
        }
        Ok(())
    }

    /// Every record, as stored, for `migrate` (the store is open
    /// exclusively: no server is running on it).
    pub(crate) fn export(&self) -> Result<super::Export, StoreError> {
        self.with_db(false, |db| {
            let txn = db.begin_read()?;
            let mut out = super::Export::default();
            for row in txn.open_table(META)?.iter()? {
                let (k, v) = row?;
                let key = k.value();
                if key != "schema" && key != PROBE_KEY {
                    out.meta.push((key.to_owned(), v.value().to_owned()));
                }
            }
            for (name, table) in EXPORTED_TABLES {
                // Made on first use (doctor reports): none yet.
                let Some(rows) = optional_table(&txn, table)? else {
                    continue;
                };
                let mut copied = Vec::new();
                for row in rows.iter()? {
                    let (k, v) = row?;
                    let json = std::str::from_utf8(v.value()).map_err(|_| StoreError::Corrupt {
                        what: "record (not UTF-8)",
                        key: k.value().to_owned(),
                    })?;
                    copied.push((k.value().to_owned(), json.to_owned()));
                }
                out.tables.push((name, copied));
            }
            for row in txn.open_table(AUDIT)?.iter()? {
                let (k, v) = row?;
                let json = std::str::from_utf8(v.value()).map_err(|_| StoreError::Corrupt {
                    what: "audit line (not UTF-8)",
                    key: k.value().to_string(),
                })?;
                out.audit.push(json.to_owned());
            }
            Ok(out)
        })
    }

    fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.with_db(false, |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(META)?;
            Ok(table.get(key)?.map(|v| v.value().to_owned()))
        })
    }

    /// One record of a table, decoded (none for a table not made yet).
    fn get<T: Deserialize>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        what: &'static str,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        self.with_db(false, |db| {
            let txn = db.begin_read()?;
            let Some(rows) = optional_table(&txn, table)? else {
                return Ok(None);
            };
            rows.get(key)?
                .map(|v| decode(what, key, v.value()))
                .transpose()
        })
    }

    /// Every value of a table, decoded, in key order (none for a table made
    /// on first use and not made yet).
    fn all<T: Deserialize>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        what: &'static str,
    ) -> Result<Vec<T>, StoreError> {
        self.with_db(false, |db| {
            let txn = db.begin_read()?;
            let Some(rows) = optional_table(&txn, table)? else {
                return Ok(Vec::new());
            };
            let mut out = Vec::new();
            for row in rows.iter()? {
                let (k, v) = row?;
                out.push(decode(what, k.value(), v.value())?);
            }
            Ok(out)
        })
    }
}

impl Store for RedbStore {
    fn probe_write(&self, now: u64) -> Result<(), StoreError> {
        self.with_db(true, |db| {
            let txn = db.begin_write()?;
            txn.open_table(META)?
                .insert(PROBE_KEY, stella_proto::time::rfc3339(now).as_str())?;
            self.commit(txn)?;
            Ok(())
        })
    }

    fn health(&self) -> StoreHealth {
        StoreHealth {
            unwritable: lock(&self.unwritable).clone(),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }

    fn admin_token_sha256(&self) -> Result<String, StoreError> {
        self.meta(ADMIN_HASH_KEY)?.ok_or(StoreError::NotFound {
            what: "admin token hash",
            key: ADMIN_HASH_KEY.to_owned(),
        })
    }

    fn load_agents(
        &self,
        each: &mut dyn FnMut(AgentRecord, HeartbeatState),
    ) -> Result<(), StoreError> {
        self.with_db(false, |db| {
            let txn = db.begin_read()?;
            let agents = txn.open_table(AGENTS)?;
            let heartbeats = txn.open_table(HEARTBEATS)?;
            for row in agents.iter()? {
                let (key, value) = row?;
                let record: AgentRecord = decode("agent", key.value(), value.value())?;
                let hb = match heartbeats.get(key.value())? {
                    Some(v) => decode("heartbeat", key.value(), v.value())?,
                    None => <HeartbeatState as Default>::default(),
                };
                each(record, hb);
            }
            Ok(())
        })
    }

    fn agent(&self, id: &str) -> Result<Option<AgentRecord>, StoreError> {
        self.get(AGENTS, "agent", id)
    }

    fn insert_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        self.with_db(true, |db| {
            let txn = db.begin_write()?;
            {
                insert_new(&txn, TOKENS, "token", &token.id, &encode(token))?;
                append_audit(
                    &txn,
                    token.created_at,
                    "token.create",
                    &token.id,
                    &format!(
                        "uses={} expires_at={}",
                        token.uses,
                        stella_proto::time::rfc3339(token.expires_at)
                    ),
                )?;
            }
            self.commit(txn)?;
            Ok(())
        })
    }

    fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.get(TOKENS, "token", id)
    }

    fn enroll(
        &self,
        token_id: &str,
        key_sha256: &str,
        rule: &mut EnrollRule<'_>,
    ) -> Result<(), StoreError> {
        self.with_db(true, |db| {
            let txn = db.begin_write()?;
            let marker_key = enrollment_key(token_id, key_sha256);
            {
                let mut tokens = txn.open_table(TOKENS)?;
                let mut agents = txn.open_table(AGENTS)?;
                let mut certs = txn.open_table(CERTS)?;
                let mut enrollments = txn.open_table(ENROLLMENTS)?;
                let token: Option<TokenRecord> = tokens
                    .get(token_id)?
                    .map(|v| decode("token", token_id, v.value()))
                    .transpose()?;
                let marker: Option<EnrollmentRecord> = enrollments
                    .get(marker_key.as_str())?
                    .map(|v| decode("enrollment", &marker_key, v.value()))
                    .transpose()?;
                let prior = match marker {
                    Some(marker) => {
                        let agent: AgentRecord = agents
                            .get(marker.agent_id.as_str())?
                            .map(|v| decode("agent", &marker.agent_id, v.value()))
                            .transpose()?
                            .ok_or_else(|| StoreError::Corrupt {
                                what: "enrollment (its agent is missing)",
                                key: marker_key.clone(),
                            })?;
                        let cert: CertRecord = certs
                            .get(agent.cert_serial.as_str())?
                            .map(|v| decode("certificate", &agent.cert_serial, v.value()))
                            .transpose()?
                            .ok_or_else(|| StoreError::Corrupt {
                                what: "agent (its certificate is missing)",
                                key: agent.id.clone(),
                            })?;
                        Some(PriorEnrollment {
                            at: marker.at,
                            agent,
                            cert,
                        })
                    }
                    None => None,
                };
                let state = EnrollmentState { token, prior };
                let Some(new) = rule(&state)? else {
                    return Ok(());
                };
                tokens.insert(new.token.id.as_str(), encode(&new.token).as_slice())?;
                agents.insert(new.agent.id.as_str(), encode(&new.agent).as_slice())?;
                certs.insert(new.cert.serial.as_str(), encode(&new.cert).as_slice())?;
                let marker = EnrollmentRecord {
                    agent_id: new.agent.id.clone(),
                    at: new.at,
                };
                enrollments.insert(marker_key.as_str(), encode(&marker).as_slice())?;
                append_line(
                    &txn,
                    &audit::enrolled(new.at, &new.token.id, &new.agent, &new.cert.serial),
                )?;
            }
            self.commit(txn)?;
            Ok(())
        })
    }

    fn update_agents(
        &self,
        ids: &[&str],
        now: u64,
        action: &str,
        change: &mut AgentChange<'_>,
    ) -> Result<Vec<AgentRecord>, StoreError> {
        self.with_db(true, |db| {
            let txn = db.begin_write()?;
            let mut written = Vec::new();
            {
                let mut agents = txn.open_table(AGENTS)?;
                for id in ids {
                    let Some(stored) = agents.get(*id)? else {
                        return Err(StoreError::NotFound {
                            what: "agent",
                            key: (*id).to_owned(),
                        });
                    };
                    let mut record: AgentRecord = decode("agent", id, stored.value())?;
                    drop(stored);
                    let before = record.status_text();
                    if change(&mut record)? {
                        agents.insert(*id, encode(&record).as_slice())?;
                        let after = record.status_text();
                        append_audit(
                            &txn,
                            now,
                            action,
                            id,
                            &detail::status_changed(&before, &after),
                        )?;
                        written.push(record);
                    }
                }
            }
            if written.is_empty() {
                txn.abort()?;
            } else {
                self.commit(txn)?;
            }
            Ok(written)
        })
    }

    fn put_doctor_report(
        &self,
        id: &str,
        report: &DoctorReportRecord,
    ) -> Result<AgentRecord, StoreError> {
        self.with_db(true, |db| {
            let txn = db.begin_write()?;
            let record = {
                let mut agents = txn.open_table(AGENTS)?;
                let Some(stored) = agents.get(id)? else {
                    return Err(StoreError::NotFound {
                        what: "agent",
                        key: id.to_owned(),
                    });
                };
                let mut record: AgentRecord = decode("agent", id, stored.value())?;
                drop(stored);
                if record.doctor_request.take().is_some() {
                    agents.insert(id, encode(&record).as_slice())?;
                }
                txn.open_table(DOCTOR_REPORTS)?
                    .insert(id, encode(report).as_slice())?;
                record
            };
            append_audit(&txn, report.received_at, "agent.doctor_report", id, "")?;
            self.commit(txn)?;
            Ok(record)
        })
    }

    fn doctor_report(&self, id: &str) -> Result<Option<DoctorReportRecord>, StoreError> {
        self.get(DOCTOR_REPORTS, "doctor report", id)
    }

    fn put_update_failure(
        &self,
        id: &str,
        failure: &UpdateFailureRecord,
    ) -> Result<(), StoreError> {
        self.with_db(true, |db| {
            let txn = db.begin_write()?;
            if txn.open_table(AGENTS)?.get(id)?.is_none() {
                return Err(StoreError::NotFound {
                    what: "agent",
                    key: id.to_owned(),
                });
            }
            txn.open_table(UPDATE_FAILURES)?
                .insert(id, encode(failure).as_slice())?;
            let detail = detail::update_failed(failure);
            append_audit(
                &txn,
                failure.received_at,
                "agent.update_failed",
                id,
                &detail,
            )?;
            self.commit(txn)?;
            Ok(())
        })
    }

    fn update_failure(&self, id: &str) -> Result<Option<UpdateFailureRecord>, StoreError> {
        self.get(UPDATE_FAILURES, "update failure", id)
    }

    fn cert(&self, serial: &str) -> Result<Option<CertRecord>, StoreError> {
        self.get(CERTS, "certificate", serial)
    }

    fn replace_certificate(
        &self,
        cert: &CertRecord,
        change: Box<CertificateChange<'_>>,
    ) -> Result<AgentRecord, StoreError> {
        self.with_db(true, |db| {
            let txn = db.begin_write()?;
            let record = {
                let mut agents = txn.open_table(AGENTS)?;
                let agent_id = cert.agent_id.as_str();
                let Some(stored) = agents.get(agent_id)? else {
                    return Err(StoreError::NotFound {
                        what: "agent",
                        key: agent_id.to_owned(),
                    });
                };
                let mut record: AgentRecord = decode("agent", agent_id, stored.value())?;
                drop(stored);
                let detail = change(&mut record)?;
                agents.insert(agent_id, encode(&record).as_slice())?;
                let mut certs = txn.open_table(CERTS)?;
                certs.insert(cert.serial.as_str(), encode(cert).as_slice())?;
                append_audit(&txn, cert.issued_at, "agent.certificate", agent_id, &detail)?;
                record
            };
            self.commit(txn)?;
            Ok(record)
        })
    }

    fn rollouts(&self) -> Result<Vec<RolloutRecord>, StoreError> {
        self.all(ROLLOUTS, "rollout")
    }

    fn put_rollout(
        &self,
        rollout: &RolloutRecord,
        expected: Option<&RolloutRecord>,
        now: u64,
        action: &str,
        detail: &str,
    ) -> Result<(), StoreError> {
        self.with_db(true, |db| {
            let txn = db.begin_write()?;
            {
                let mut rollouts = txn.open_table(ROLLOUTS)?;
                if let Some(expected) = expected {
                    let stored = rollouts
                        .get(rollout.id.as_str())?
                        .map(|v| v.value().to_vec());
                    if stored.as_deref() != Some(encode(expected).as_slice()) {
                        return Err(rollout_changed(&rollout.id));
                    }
                }
                rollouts.insert(rollout.id.as_str(), encode(rollout).as_slice())?;
                append_audit(&txn, now, action, &rollout.id, detail)?;
            }
            self.commit(txn)?;
            Ok(())
        })
    }

    fn releases(&self) -> Result<Vec<ReleaseRecord>, StoreError> {
        self.all(RELEASES, "release")
    }

    fn insert_release(&self, release: &ReleaseRecord) -> Result<Option<ReleaseRecord>, StoreError> {
        self.with_db(true, |db| {
            let txn = db.begin_write()?;
            {
                let mut releases = txn.open_table(RELEASES)?;
                if let Some(existing) = releases.get(release.version.as_str())? {
                    return decode("release", &release.version, existing.value()).map(Some);
                }
                releases.insert(release.version.as_str(), encode(release).as_slice())?;
                append_audit(
                    &txn,
                    release.imported_at,
                    "release.import",
                    &release.version,
                    &detail::release_imported(release),
                )?;
            }
            self.commit(txn)?;
            Ok(None)
        })
    }

    fn configs(&self) -> Result<Vec<ConfigRecord>, StoreError> {
        self.all(CONFIGS, "config")
    }

    fn set_config(
        &self,
        scope: &str,
        doc: &str,
        hash: &str,
        now: u64,
    ) -> Result<ConfigRecord, StoreError> {
        self.with_db(true, |db| {
            let txn = db.begin_write()?;
            let record = {
                let mut configs = txn.open_table(CONFIGS)?;
                let version = match configs.get(scope)? {
                    Some(v) => decode::<ConfigRecord>("config", scope, v.value())?.version + 1,
                    None => 1,
                };
                let record = ConfigRecord {
                    scope: scope.to_owned(),
                    version,
                    doc: doc.to_owned(),
                    hash: hash.to_owned(),
                    updated_at: now,
                };
                configs.insert(scope, encode(&record).as_slice())?;
                append_audit(
                    &txn,
                    now,
                    "config.set",
                    scope,
                    &detail::config_set(version, hash),
                )?;
                record
            };
            self.commit(txn)?;
            Ok(record)
        })
    }

    fn tasks(&self) -> Result<Vec<TaskRecord>, StoreError> {
        self.all(TASKS, "task")
    }

    fn insert_task(&self, task: &TaskRecord) -> Result<(), StoreError> {
        self.with_db(true, |db| {
            let txn = db.begin_write()?;
            {
                insert_new(&txn, TASKS, "task", &task.id, &encode(task))?;
                append_audit(
                    &txn,
                    task.created_at,
                    "task.create",
                    &task.id,
                    &detail::task_created(task),
                )?;
            }
            self.commit(txn)?;
            Ok(())
        })
    }

    fn put_task(&self, task: &TaskRecord, now: u64, action: &str) -> Result<(), StoreError> {
        self.with_db(true, |db| {
            let txn = db.begin_write()?;
            {
                let mut tasks = txn.open_table(TASKS)?;
                if tasks.get(task.id.as_str())?.is_none() {
                    return Err(StoreError::NotFound {
                        what: "task",
                        key: task.id.clone(),
                    });
                }
                tasks.insert(task.id.as_str(), encode(task).as_slice())?;
                append_audit(&txn, now, action, &task.id, "")?;
            }
            self.commit(txn)?;
            Ok(())
        })
    }

    fn task_results(&self, task: Option<&str>) -> Result<Vec<TaskResultRecord>, StoreError> {
        self.with_db(false, |db| {
            let txn = db.begin_read()?;
            let Some(rows) = optional_table(&txn, TASK_RESULTS)? else {
                return Ok(Vec::new());
            };
            // `/` comes just before `0` in ASCII: the keys of one task run
            // from `<id>/` up to (not including) `<id>0`.
            let range = match task {
                Some(id) => rows.range(format!("{id}/").as_str()..format!("{id}0").as_str())?,
                None => rows.range::<&str>(..)?,
            };
            let mut out = Vec::new();
            for row in range {
                let (k, v) = row?;
                out.push(decode("task result", k.value(), v.value())?);
            }
            Ok(out)
        })
    }

    fn put_task_results(&self, results: &[TaskResultRecord]) -> Result<(), StoreError> {
        self.with_db(true, |db| {
            if results.is_empty() {
                return Ok(());
            }
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(TASK_RESULTS)?;
                for r in results {
                    let key = format!("{}/{}", r.task, r.agent);
                    table.insert(key.as_str(), encode(r).as_slice())?;
                    append_audit(
                        &txn,
                        r.reported_at,
                        "task.result",
                        &r.task,
                        &detail::task_result(r),
                    )?;
                }
            }
            self.commit(txn)?;
            Ok(())
        })
    }

    fn save_heartbeats(&self, batch: &[(String, HeartbeatState)]) -> Result<(), StoreError> {
        self.with_db(true, |db| {
            if batch.is_empty() {
                return Ok(());
            }
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(HEARTBEATS)?;
                for (id, state) in batch {
                    table.insert(id.as_str(), encode(state).as_slice())?;
                }
            }
            self.commit(txn)?;
            Ok(())
        })
    }

    fn audit_page(
        &self,
        after: Option<u64>,
        limit: usize,
        select: &dyn Fn(&AuditRecord) -> bool,
    ) -> Result<Vec<(u64, AuditRecord)>, StoreError> {
        self.with_db(false, |db| {
            let txn = db.begin_read()?;
            let rows = txn.open_table(AUDIT)?;
            let mut out = Vec::new();
            let start = after.map_or(0, |a| a.saturating_add(1));
            if after == Some(u64::MAX) {
                return Ok(out);
            }
            for row in rows.range(start..)? {
                if out.len() >= limit {
                    break;
                }
                let (k, v) = row?;
                let line: AuditRecord = decode("audit", &k.value().to_string(), v.value())?;
                if select(&line) {
                    out.push((k.value(), line));
                }
            }
            Ok(out)
        })
    }

    fn append_audit(&self, line: &AuditRecord) -> Result<(), StoreError> {
        self.with_db(true, |db| {
            let txn = db.begin_write()?;
            append_line(&txn, line)?;
            self.commit(txn)?;
            Ok(())
        })
    }

    fn admin_tokens(&self) -> Result<Vec<AdminTokenRecord>, StoreError> {
        self.all(ADMIN_TOKENS, "admin token")
    }

    fn insert_admin_token(&self, token: &AdminTokenRecord) -> Result<(), StoreError> {
        self.with_db(true, |db| {
            let txn = db.begin_write()?;
            insert_new(
                &txn,
                ADMIN_TOKENS,
                "admin token",
                &token.name,
                &encode(token),
            )?;
            append_audit(
                &txn,
                token.created_at,
                "admin_token.create",
                &token.name,
                &detail::admin_token_created(token),
            )?;
            self.commit(txn)?;
            Ok(())
        })
    }

    fn update_admin_token(
        &self,
        name: &str,
        now: u64,
        action: &str,
        change: &mut AdminTokenChange<'_>,
    ) -> Result<AdminTokenRecord, StoreError> {
        self.with_db(true, |db| {
            let txn = db.begin_write()?;
            let (record, changed) = {
                let mut tokens = txn.open_table(ADMIN_TOKENS)?;
                let Some(stored) = tokens.get(name)? else {
                    return Err(StoreError::NotFound {
                        what: "admin token",
                        key: name.to_owned(),
                    });
                };
                let mut record: AdminTokenRecord = decode("admin token", name, stored.value())?;
                drop(stored);
                let changed = change(&mut record)?;
                if changed {
                    tokens.insert(name, encode(&record).as_slice())?;
                }
                (record, changed)
            };
            if changed {
                append_audit(&txn, now, action, name, &format!("role={}", record.role))?;
                self.commit(txn)?;
            } else {
                txn.abort()?;
            }
            Ok(record)
        })
    }

    fn snapshot(&self, each: &mut SnapshotRow<'_>) -> Result<(), StoreError> {
        self.with_db(false, |db| {
            // One read transaction: every table as of one commit.
            let txn = db.begin_read()?;
            for row in txn.open_table(META)?.iter()? {
                let (k, v) = row?;
                each("meta", k.value(), v.value().as_bytes())?;
            }
            for (name, table) in EXPORTED_TABLES {
                copy_table(&txn, name, table, each)?;
            }
            for row in txn.open_table(AUDIT)?.iter()? {
                let (k, v) = row?;
                each("audit", &k.value().to_string(), v.value())?;
            }
            Ok(())
        })
    }

    fn restore_rows(&self, rows: &[(String, String, Vec<u8>)]) -> Result<(), StoreError> {
        self.with_db(true, |db| {
            let txn = db.begin_write()?;
            for (table, key, value) in rows {
                let corrupt = || StoreError::Corrupt {
                    what: "snapshot row",
                    key: format!("{table}/{key}"),
                };
                match table.as_str() {
                    "meta" => {
                        let text = std::str::from_utf8(value).map_err(|_| corrupt())?;
                        if key == "schema" && text != SCHEMA_VERSION {
                            return Err(StoreError::Schema {
                                path: "backup".into(),
                                found: Some(text.to_owned()),
                                want: SCHEMA_VERSION,
                            });
                        }
                        txn.open_table(META)?.insert(key.as_str(), text)?;
                    }
                    "audit" => {
                        let seq: u64 = key.parse().map_err(|_| corrupt())?;
                        txn.open_table(AUDIT)?.insert(seq, value.as_slice())?;
                    }
                    name => {
                        let (_, def) = EXPORTED_TABLES
                            .iter()
                            .find(|(n, _)| *n == name)
                            .ok_or_else(corrupt)?;
                        txn.open_table(*def)?
                            .insert(key.as_str(), value.as_slice())?;
                    }
                }
            }
            self.commit(txn)?;
            Ok(())
        })
    }

    fn put_blob(&self, sha256: &str, size: u64, data: &mut dyn Read) -> Result<(), StoreError> {
        if !crate::blobs::is_blob_name(sha256) {
            return Err(Refusal::bad_request(format!("{sha256:?} is not a SHA-256")).into());
        }
        if crate::blobs::size_in(&self.blob_dir, sha256).is_some() {
            return Ok(());
        }
        let context = || format!("cannot store blob {sha256}");
        let mut writer = crate::blobs::BlobWriter::create_in(&self.blob_dir)
            .map_err(|e| blob_error(context(), e))?;
        match writer.copy_from(data, size) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(Refusal::bad_request(format!(
                    "blob {sha256} is larger than its {size} bytes"
                ))
                .into());
            }
            Err(e) => return Err(blob_error(context(), e)),
        }
        let (got, got_size) = (writer.sha256(), writer.size());
        if got != sha256 || got_size != size {
            return Err(Refusal::bad_request(format!(
                "blob {sha256} ({size} bytes) was given {got_size} bytes with sha256 {got}"
            ))
            .into());
        }
        writer.finish().map_err(|e| blob_error(context(), e))?;
        Ok(())
    }

    fn copy_blob(&self, sha256: &str, out: &mut dyn Write) -> Result<bool, StoreError> {
        if crate::blobs::size_in(&self.blob_dir, sha256).is_none() {
            return Ok(false);
        }
        let path = self.blob_dir.join(sha256);
        let context = || format!("cannot read blob {}", path.display());
        let mut file = std::fs::File::open(&path).map_err(|e| blob_error(context(), e))?;
        std::io::copy(&mut file, out).map_err(|e| blob_error(context(), e))?;
        Ok(true)
    }

    fn blobs(&self) -> Result<Vec<(String, u64)>, StoreError> {
        crate::blobs::list(&self.blob_dir)
            .map_err(|e| blob_error(format!("cannot list {}", self.blob_dir.display()), e))
    }

    fn audit_log(&self) -> Result<Vec<AuditRecord>, StoreError> {
        self.with_db(false, |db| {
            let txn = db.begin_read()?;
            let rows = txn.open_table(AUDIT)?;
            let mut out = Vec::new();
            for row in rows.iter()? {
                let (k, v) = row?;
                out.push(decode("audit", &k.value().to_string(), v.value())?);
            }
            Ok(out)
        })
    }
}

/// Gives every row of a text-keyed table to `each` (none for a table not
/// made yet).
fn copy_table(
    txn: &::redb::ReadTransaction,
    name: &str,
    table: TableDefinition<&str, &[u8]>,
    each: &mut SnapshotRow<'_>,
) -> Result<(), StoreError> {
    let Some(rows) = optional_table(txn, table)? else {
        return Ok(());
    };
    for row in rows.iter()? {
        let (k, v) = row?;
        each(name, k.value(), v.value())?;
    }
    Ok(())
}

/// Appends the line of a change by whoever acts now (`audit::acting_as`).
fn append_audit(
    txn: &::redb::WriteTransaction,
    at: u64,
    action: &str,
    subject: &str,
    detail: &str,
) -> Result<(), StoreError> {
    append_line(txn, &crate::audit::line(at, action, subject, detail))
}

fn append_line(txn: &::redb::WriteTransaction, line: &AuditRecord) -> Result<(), StoreError> {
    let mut audit = txn.open_table(AUDIT)?;
    let next = audit.last()?.map_or(0, |(k, _)| k.value() + 1);
    audit.insert(next, encode(line).as_slice())?;
    Ok(())
}

/// Inserts a new record keyed `key` into `table`; `Exists` (nothing
/// written) when the key is taken.
fn insert_new(
    txn: &::redb::WriteTransaction,
    table: TableDefinition<&str, &[u8]>,
    what: &'static str,
    key: &str,
    record: &[u8],
) -> Result<(), StoreError> {
    let mut rows = txn.open_table(table)?;
    if rows.get(key)?.is_some() {
        return Err(StoreError::Exists {
            what,
            key: key.to_owned(),
        });
    }
    rows.insert(key, record)?;
    Ok(())
}

/// A table made on first use, for reading: `None` while it does not exist.
fn optional_table(
    txn: &::redb::ReadTransaction,
    table: TableDefinition<&str, &[u8]>,
) -> Result<Option<::redb::ReadOnlyTable<&'static str, &'static [u8]>>, StoreError> {
    match txn.open_table(table) {
        Ok(rows) => Ok(Some(rows)),
        Err(::redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
impl RedbStore {
    /// A store over any redb backend: a new one, or the existing one on it.
    fn with_backend(backend: impl ::redb::StorageBackend, new: bool) -> Result<Self, StoreError> {
        let db = Database::builder()
            .create_with_backend(backend)
            .map_err(|e| open_error(Path::new("(test backend)"), e))?;
        let reopen: Reopen = Box::new(|| {
            Err(StoreError::Unavailable {
                context: "(test backend)".to_owned(),
                source: "this backend cannot be reopened".into(),
            })
        });
        Self::over(db, reopen, new)
    }

    /// A store over a backend that can be opened again (a shared disk).
    fn with_reopenable_backend<B>(backend: B, new: bool) -> Result<Self, StoreError>
    where
        B: ::redb::StorageBackend + Clone + Sync,
    {
        let db = Database::builder()
            .create_with_backend(backend.clone())
            .map_err(|e| open_error(Path::new("(test backend)"), e))?;
        let reopen: Reopen = Box::new(move || {
            Database::builder()
                .create_with_backend(backend.clone())
                .map_err(|e| open_error(Path::new("(test backend)"), e))
        });
        Self::over(db, reopen, new)
    }

    fn over(db: Database, reopen: Reopen, new: bool) -> Result<Self, StoreError> {
        // Test stores have no data dir: blobs go to a directory of their own.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let blob_dir = std::env::temp_dir().join(format!(
            "stella-redb-blobs-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        if new {
            return Self::initialize(db, reopen, blob_dir, super::conformance::ADMIN_SHA256);
        }
        let store = Self::new(db, reopen, blob_dir);
        store.check_schema(Path::new("(test backend)"))?;
        Ok(store)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::records::AgentStatus;
    use crate::refusal::Refusal;
    use crate::store::conformance::{self, store_conformance};

    fn in_memory() -> Box<dyn Store> {
        Box::new(
            RedbStore::with_backend(::redb::backends::InMemoryBackend::new(), true).expect("store"),
        )
    }

    store_conformance!(in_memory);

    #[test]
    fn an_existing_data_dir_opens_with_its_records() {
        let dir = std::env::temp_dir().join(format!("stella-redb-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("server.redb");
        let _ = std::fs::remove_file(&path);
        {
            let store = RedbStore::create(&path, "ab").unwrap();
            store
                .insert_token(&conformance::token("abcdef", 1))
                .unwrap();
            conformance::enroll(&store, "abcdef", "agt_a", "01").unwrap();
        }
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.admin_token_sha256().unwrap(), "ab");
        let agent = store.agent("agt_a").unwrap().unwrap();
        assert_eq!(agent.status, AgentStatus::Active);
        // The records are the same JSON as before states were typed.
        let open = read_lock(&store.db);
        let txn = open.as_ref().unwrap().begin_read().unwrap();
        let raw = txn.open_table(AGENTS).unwrap();
        let json = raw.get("agt_a").unwrap().unwrap().value().to_vec();
        let json = String::from_utf8(json).unwrap();
        assert!(
            json.contains(r#""status":"active","reason":null"#),
            "{json}"
        );
        assert!(matches!(
            RedbStore::open(&path),
            Err(StoreError::InUse { .. })
        ));
        drop(txn);
        drop(open);
        drop(store);
        assert!(matches!(
            RedbStore::open(&dir.join("nothing.redb")),
            Err(StoreError::Missing { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A disk in memory: what was written, what was synced (what survives a
    /// crash), and a fault armed at the Nth write or sync.
    #[derive(Debug, Default)]
    struct Disk {
        current: Vec<u8>,
        durable: Vec<u8>,
        /// Writes, length changes and syncs since the fault was armed.
        ops: u64,
        fail_at: Option<u64>,
        failed: bool,
    }

    impl Disk {
        /// Counts one operation; fails it (and everything after) at the
        /// armed one.
        fn op(&mut self) -> std::io::Result<()> {
            self.ops += 1;
            if self.failed || self.fail_at == Some(self.ops) {
                self.failed = true;
                return Err(std::io::Error::other("injected fault"));
            }
            Ok(())
        }
    }

    #[derive(Debug, Clone, Default)]
    struct FaultyBackend(Arc<Mutex<Disk>>);

    impl FaultyBackend {
        fn disk(&self) -> std::sync::MutexGuard<'_, Disk> {
            self.0.lock().unwrap_or_else(|p| p.into_inner())
        }

        fn arm(&self, at: u64) {
            let mut disk = self.disk();
            disk.ops = 0;
            disk.fail_at = Some(at);
        }

        /// The disk has room again.
        fn heal(&self) {
            let mut disk = self.disk();
            disk.fail_at = None;
            disk.failed = false;
        }

        /// The machine stops: only what was synced is on the disk.
        fn crash(&self) {
            let mut disk = self.disk();
            disk.current = disk.durable.clone();
            disk.fail_at = None;
            disk.failed = false;
        }
    }

    impl ::redb::StorageBackend for FaultyBackend {
        fn len(&self) -> std::io::Result<u64> {
            Ok(self.disk().current.len() as u64)
        }

        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            let disk = self.disk();
            let start = offset as usize;
            let bytes = disk
                .current
                .get(start..start + out.len())
                .ok_or_else(|| std::io::Error::other("read past the end"))?;
            out.copy_from_slice(bytes);
            Ok(())
        }

        fn set_len(&self, len: u64) -> std::io::Result<()> {
            let mut disk = self.disk();
            disk.op()?;
            disk.current.resize(len as usize, 0);
            Ok(())
        }

        fn sync_data(&self) -> std::io::Result<()> {
            let mut disk = self.disk();
            disk.op()?;
            disk.durable = disk.current.clone();
            Ok(())
        }

        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            let mut disk = self.disk();
            disk.op()?;
            let start = offset as usize;
            let end = start + data.len();
            if disk.current.len() < end {
                disk.current.resize(end, 0);
            }
            disk.current[start..end].copy_from_slice(data);
            Ok(())
        }
    }

    /// Runs `change` on a store prepared by `prepare`, with a fault at each
    /// write or sync in turn, crashes, reopens, and checks `invariant` on what
    /// survived (told whether `change` had reported success). Ends when
    /// `change` ran to the end without reaching the fault.
    fn crash_at_every_write(
        prepare: impl Fn(&dyn Store),
        change: impl Fn(&dyn Store) -> Result<(), StoreError>,
        invariant: impl Fn(&dyn Store, bool),
    ) {
        for at in 1..1_000 {
            // Every earlier run reached its fault.
            let faults = at - 1;
            let backend = FaultyBackend::default();
            {
                let store = RedbStore::with_backend(backend.clone(), true).expect("new store");
                prepare(&store);
                backend.arm(at);
                let result = change(&store);
                let reached = {
                    let disk = backend.disk();
                    disk.fail_at.is_some_and(|n| disk.ops >= n)
                };
                if !reached {
                    result.expect("the change without a fault");
                    drop(store);
                    backend.crash();
                    let store = RedbStore::with_backend(backend, false).expect("reopen");
                    invariant(&store, true);
                    assert!(faults > 2, "only {faults} faults injected");
                    return;
                }
                drop(store);
                backend.crash();
                let reopened =
                    RedbStore::with_backend(backend.clone(), false).unwrap_or_else(|e| {
                        panic!("fault at write {at}: the store does not reopen: {e}")
                    });
                invariant(&reopened, result.is_ok());
            }
        }
        panic!("the change never finished");
    }

    #[test]
    fn a_crash_during_enrollment_consumes_the_token_iff_the_agent_is_recorded() {
        crash_at_every_write(
            |store| {
                store
                    .insert_token(&conformance::token("abcdef", 2))
                    .unwrap()
            },
            |store| conformance::enroll(store, "abcdef", "agt_a", "01"),
            |store, succeeded| {
                let token = store.token("abcdef").unwrap().expect("the token survives");
                let agent = store.agent("agt_a").unwrap();
                let cert = store.cert("01").unwrap();
                let consumed = token.uses_left == 1;
                assert_eq!(consumed, agent.is_some(), "token use and agent");
                assert_eq!(agent.is_some(), cert.is_some(), "agent and certificate");
                if succeeded {
                    assert!(consumed, "an answered enrollment is durable");
                }
            },
        );
    }

    #[test]
    fn a_crash_during_renewal_keeps_agent_and_certificate_together() {
        crash_at_every_write(
            |store| {
                store
                    .insert_token(&conformance::token("abcdef", 1))
                    .unwrap();
                conformance::enroll(store, "abcdef", "agt_a", "01").unwrap();
            },
            |store| {
                store
                    .replace_certificate(
                        &conformance::cert("agt_a", "02"),
                        Box::new(|r| {
                            r.previous_serial = Some(r.cert_serial.clone());
                            r.cert_serial = "02".into();
                            Ok("serial=02".into())
                        }),
                    )
                    .map(|_| ())
            },
            |store, succeeded| {
                let agent = store.agent("agt_a").unwrap().expect("the agent survives");
                let renewed = agent.cert_serial == "02";
                assert_eq!(renewed, store.cert("02").unwrap().is_some());
                if renewed {
                    assert_eq!(agent.previous_serial.as_deref(), Some("01"));
                } else {
                    assert_eq!(
                        (agent.cert_serial.as_str(), agent.previous_serial.as_deref()),
                        ("01", None),
                        "the old pair stays usable"
                    );
                }
                assert!(store.cert("01").unwrap().is_some());
                if succeeded {
                    assert!(renewed, "an answered renewal is durable");
                }
            },
        );
    }

    #[test]
    fn a_crash_during_config_set_leaves_one_whole_version() {
        crash_at_every_write(
            |store| {
                store.set_config("global", "{}", "h1", 100).unwrap();
            },
            |store| {
                store
                    .set_config("global", r#"{"a":1}"#, "h2", 101)
                    .map(|_| ())
            },
            |store, succeeded| {
                let configs = store.configs().unwrap();
                assert_eq!(configs.len(), 1);
                let c = &configs[0];
                let whole = matches!(
                    (c.version, c.doc.as_str(), c.hash.as_str()),
                    (1, "{}", "h1") | (2, r#"{"a":1}"#, "h2")
                );
                assert!(whole, "{c:?}");
                let sets = store
                    .audit_log()
                    .unwrap()
                    .iter()
                    .filter(|l| l.action == "config.set")
                    .count();
                assert_eq!(sets as u64, c.version, "one audit line per version");
                if succeeded {
                    assert_eq!(c.version, 2, "an answered config set is durable");
                }
            },
        );
    }

    #[test]
    fn a_crash_during_a_rollout_change_leaves_the_old_or_the_new_state() {
        crash_at_every_write(
            |store| {
                store
                    .put_rollout(
                        &conformance::rollout("rol_a", "running"),
                        None,
                        100,
                        "rollout.start",
                        "",
                    )
                    .unwrap();
            },
            |store| {
                let mut paused = conformance::rollout("rol_a", "paused");
                paused.reason = Some("paused by an administrator".into());
                let running = conformance::rollout("rol_a", "running");
                store.put_rollout(&paused, Some(&running), 101, "rollout.pause", "")
            },
            |store, succeeded| {
                let all = store.rollouts().unwrap();
                assert_eq!(all.len(), 1);
                let r = &all[0];
                let paused = match r.status.as_str() {
                    "running" => {
                        assert_eq!(r.reason, None);
                        false
                    }
                    "paused" => {
                        assert!(r.reason.is_some());
                        true
                    }
                    other => panic!("status {other}"),
                };
                let logged = store
                    .audit_log()
                    .unwrap()
                    .iter()
                    .any(|l| l.action == "rollout.pause");
                assert_eq!(paused, logged, "the change and its audit line");
                if succeeded {
                    assert!(paused, "an answered rollout change is durable");
                }
            },
        );
    }

    #[test]
    fn a_refused_rule_inside_a_transaction_is_reported_as_such() {
        let store = in_memory();
        let refused = store.enroll("x", "k", &mut |_| Err(Refusal::unauthorized("no")));
        let Err(StoreError::Aborted(r)) = refused else {
            panic!("{refused:?}");
        };
        assert_eq!(r.status(), 401);
    }

    #[test]
    fn an_io_failure_reopens_the_store_and_loses_no_acknowledged_write() {
        let disk = FaultyBackend::default();
        let store = RedbStore::with_reopenable_backend(disk.clone(), true).unwrap();
        store
            .insert_token(&conformance::token("before", 1))
            .unwrap();
        // The disk is full from the next write on.
        disk.arm(1);
        for id in ["full1", "full2"] {
            let failed = store.insert_token(&conformance::token(id, 1));
            assert!(
                matches!(failed, Err(StoreError::Unavailable { .. })),
                "{failed:?}"
            );
        }
        let health = store.health();
        assert!(health.unwritable.is_some());
        assert!(health.errors >= 2, "{health:?}");
        assert!(store.probe_write(1).is_err());
        // Room again: the store recovers without a restart.
        disk.heal();
        store.probe_write(2).unwrap();
        assert!(store.health().unwritable.is_none());
        store.insert_token(&conformance::token("after", 1)).unwrap();
        assert!(store.token("before").unwrap().is_some(), "acknowledged");
        assert!(store.token("full1").unwrap().is_none(), "refused");
        assert!(store.token("after").unwrap().is_some());
        // And what it says after a crash is the same.
        disk.crash();
        drop(store);
        let store = RedbStore::with_backend(disk, false).unwrap();
        assert!(store.token("before").unwrap().is_some());
        assert!(store.token("after").unwrap().is_some());
        assert!(store.token("full2").unwrap().is_none());
    }
}
