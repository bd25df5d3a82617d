//! The PostgreSQL backend of the store: the same records and the same
//! semantics as the redb backend, in tables that several servers can share.
//! The only module that names a tokio-postgres type; it keeps records and
//! decides nothing.
//!
//! Every write method is one transaction. A domain rule that reads what it
//! changes runs between a `SELECT … FOR UPDATE` of those rows and the
//! writes, so two servers cannot both consume a token's last use or both
//! replace a certificate. Heartbeat soft state is written one batch per
//! statement. The statements are grouped by table below (`sql`), and rows
//! are the records' JSON (`encode`/`decode`), so a new table is a new
//! migration, a few statements and a method. Blobs are 1 MiB chunks in
//! `blob_chunks` plus a `blobs` row written last in the same transaction, so
//! a blob is whole or absent; each chunk is one statement, so a blob of any
//! size passes through bounded memory.

mod cluster;
mod pool;
mod schema;
#[cfg(test)]
mod tests;

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use miniserde::{Deserialize, Serialize, json};
use smol::future::try_zip;
use smol::stream::StreamExt;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Transaction};

use self::cluster::{Listener, publish};
use self::pool::{Pool, Target, pg};
pub(crate) use self::pool::{is_postgres_url, redact};
use super::{
    AdminTokenChange, AgentChange, CertificateChange, ChangeKind, Cluster, EnrollRule,
    EnrollmentState, Export, PriorEnrollment, SnapshotRow, Store, StoreError, StoreHealth,
};
use crate::audit::{self, detail};
use crate::records::{
    AdminTokenRecord, AgentRecord, AuditRecord, CertRecord, ConfigRecord, DoctorReportRecord,
    HeartbeatState, ReleaseRecord, RolloutRecord, TaskRecord, TaskResultRecord, TokenRecord,
    UpdateFailureRecord,
};
use crate::refusal::Refusal;

const ADMIN_HASH_KEY: &str = "admin_token_sha256";
/// Written by the health check while the store could not write.
const PROBE_KEY: &str = "last_write_probe";

/// The statements, one set per table.
mod sql {
    pub(super) const META_GET: &str = "SELECT value FROM meta WHERE key = $1";
    pub(super) const META_PUT: &str = "INSERT INTO meta (key, value) VALUES ($1, $2) \
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value";
    pub(super) const META_ADD: &str =
        "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING";

    pub(super) const AGENT_GET: &str = "SELECT record FROM agents WHERE id = $1";
    /// Locked in id order, so that two writers of the same agents cannot
    /// deadlock.
    pub(super) const AGENTS_LOCK: &str =
        "SELECT id, record FROM agents WHERE id = ANY($1) ORDER BY id FOR UPDATE";
    pub(super) const AGENT_LOCK: &str = "SELECT record FROM agents WHERE id = $1 FOR UPDATE";
    pub(super) const AGENT_INSERT: &str = "INSERT INTO agents (id, record) VALUES ($1, $2)";
    pub(super) const AGENT_UPDATE: &str = "UPDATE agents SET record = $2 WHERE id = $1";
    pub(super) const AGENTS_WITH_HEARTBEATS: &str = "SELECT a.id, a.record, h.state \
         FROM agents a LEFT JOIN heartbeats h ON h.agent_id = a.id ORDER BY a.id";

    /// One statement for a whole batch, stamped with the database's clock
    /// and the server that saved it (the other servers' heartbeat feed).
    pub(super) const HEARTBEATS_PUT: &str = "INSERT INTO heartbeats \
         (agent_id, state, flushed_at, flushed_by) \
         SELECT a, s, stella_now_ms(), $3 FROM unnest($1::text[], $2::text[]) AS t (a, s) \
         ON CONFLICT (agent_id) DO UPDATE SET state = EXCLUDED.state, \
         flushed_at = EXCLUDED.flushed_at, flushed_by = EXCLUDED.flushed_by";

    pub(super) const TOKEN_GET: &str = "SELECT record FROM tokens WHERE id = $1";
    pub(super) const TOKEN_LOCK: &str = "SELECT record FROM tokens WHERE id = $1 FOR UPDATE";
    pub(super) const TOKEN_INSERT: &str =
        "INSERT INTO tokens (id, record) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING";
    pub(super) const TOKEN_UPDATE: &str = "UPDATE tokens SET record = $2 WHERE id = $1";

    pub(super) const ENROLLMENT_GET: &str =
        "SELECT agent_id, at FROM enrollments WHERE token_id = $1 AND key_sha256 = $2";
    pub(super) const ENROLLMENT_PUT: &str = "INSERT INTO enrollments (token_id, key_sha256, agent_id, at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (token_id, key_sha256) DO UPDATE \
         SET agent_id = EXCLUDED.agent_id, at = EXCLUDED.at";

    pub(super) const CERT_GET: &str = "SELECT record FROM certs WHERE serial = $1";
    pub(super) const CERT_PUT: &str = "INSERT INTO certs (serial, agent_id, record) \
         VALUES ($1, $2, $3) ON CONFLICT (serial) DO UPDATE \
         SET agent_id = EXCLUDED.agent_id, record = EXCLUDED.record";

    pub(super) const ROLLOUTS_ALL: &str = "SELECT id, record FROM rollouts ORDER BY id";
    pub(super) const ROLLOUT_PUT: &str = "INSERT INTO rollouts (id, record) VALUES ($1, $2) \
         ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record";
    /// Only over the state the writer read.
    pub(super) const ROLLOUT_REPLACE: &str =
        "UPDATE rollouts SET record = $2 WHERE id = $1 AND record = $3";

    pub(super) const RELEASES_ALL: &str = "SELECT version, record FROM releases ORDER BY version";
    pub(super) const RELEASE_GET: &str = "SELECT record FROM releases WHERE version = $1";
    pub(super) const RELEASE_INSERT: &str = "INSERT INTO releases (version, record) \
         VALUES ($1, $2) ON CONFLICT (version) DO NOTHING";

    pub(super) const CONFIGS_ALL: &str =
        "SELECT scope, version, doc, hash, updated_at FROM configs ORDER BY scope";
    /// The next version is computed by the database, so two servers setting
    /// one scope at once get two versions.
    pub(super) const CONFIG_SET: &str = "INSERT INTO configs (scope, version, doc, hash, updated_at) VALUES ($1, 1, $2, $3, $4) \
         ON CONFLICT (scope) DO UPDATE SET version = configs.version + 1, \
         doc = EXCLUDED.doc, hash = EXCLUDED.hash, updated_at = EXCLUDED.updated_at \
         RETURNING version";

    pub(super) const DOCTOR_REPORT_GET: &str =
        "SELECT record FROM doctor_reports WHERE agent_id = $1";
    pub(super) const DOCTOR_REPORT_PUT: &str = "INSERT INTO doctor_reports (agent_id, record) VALUES ($1, $2) \
         ON CONFLICT (agent_id) DO UPDATE SET record = EXCLUDED.record";

    pub(super) const UPDATE_FAILURE_GET: &str =
        "SELECT record FROM update_failures WHERE agent_id = $1";
    pub(super) const UPDATE_FAILURE_PUT: &str = "INSERT INTO update_failures (agent_id, record) \
         VALUES ($1, $2) ON CONFLICT (agent_id) DO UPDATE SET record = EXCLUDED.record";

    /// In byte order, as the redb store lists them.
    pub(super) const TASKS_ALL: &str = "SELECT id, record FROM tasks ORDER BY id COLLATE \"C\"";
    pub(super) const TASK_INSERT: &str =
        "INSERT INTO tasks (id, record) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING";
    pub(super) const TASK_UPDATE: &str = "UPDATE tasks SET record = $2 WHERE id = $1";
    pub(super) const TASK_RESULTS_ALL: &str = "SELECT task_id, agent_id, record FROM task_results \
         ORDER BY task_id COLLATE \"C\", agent_id COLLATE \"C\"";
    pub(super) const TASK_RESULTS_OF: &str = "SELECT task_id, agent_id, record FROM task_results \
         WHERE task_id = $1 ORDER BY agent_id COLLATE \"C\"";
    pub(super) const TASK_RESULT_PUT: &str = "INSERT INTO task_results (task_id, agent_id, record) \
         VALUES ($1, $2, $3) ON CONFLICT (task_id, agent_id) DO UPDATE SET record = EXCLUDED.record";

    pub(super) const AUDIT_APPEND: &str = "INSERT INTO audit \
         (at, action, subject, detail, actor, source, outcome) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)";
    pub(super) const AUDIT_ALL: &str = "SELECT seq, at, action, subject, detail, actor, source, outcome \
         FROM audit ORDER BY seq";
    pub(super) const AUDIT_AFTER: &str = "SELECT seq, at, action, subject, detail, actor, source, outcome \
         FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2";
    /// `restore_rows`: a line with its sequence number.
    pub(super) const AUDIT_RESTORE: &str = "INSERT INTO audit \
         (seq, at, action, subject, detail, actor, source, outcome) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
    pub(super) const AUDIT_SEQ_RESET: &str = "SELECT setval(pg_get_serial_sequence('audit', 'seq'), \
         coalesce((SELECT max(seq) FROM audit), 0) + 1, false)";

    pub(super) const ADMIN_TOKENS_ALL: &str =
        "SELECT name, record FROM admin_tokens ORDER BY name COLLATE \"C\"";
    pub(super) const ADMIN_TOKEN_INSERT: &str =
        "INSERT INTO admin_tokens (name, record) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING";
    pub(super) const ADMIN_TOKEN_LOCK: &str =
        "SELECT record FROM admin_tokens WHERE name = $1 FOR UPDATE";
    pub(super) const ADMIN_TOKEN_UPDATE: &str =
        "UPDATE admin_tokens SET record = $2 WHERE name = $1";

    /// `snapshot` and `restore_rows`: each text-keyed table of the redb
    /// store as (key, record JSON) rows in key byte order, and the
    /// statement that writes one row back.
    pub(super) const SNAPSHOT_RECORDS: [(&str, &str, &str); 10] = [
        (
            "agents",
            "SELECT id, record FROM agents ORDER BY id COLLATE \"C\"",
            "INSERT INTO agents (id, record) VALUES ($1, $2)",
        ),
        (
            "heartbeats",
            "SELECT agent_id, state FROM heartbeats ORDER BY agent_id COLLATE \"C\"",
            "INSERT INTO heartbeats (agent_id, state) VALUES ($1, $2)",
        ),
        (
            "tokens",
            "SELECT id, record FROM tokens ORDER BY id COLLATE \"C\"",
            "INSERT INTO tokens (id, record) VALUES ($1, $2)",
        ),
        (
            "certs",
            "SELECT serial, record FROM certs ORDER BY serial COLLATE \"C\"",
            "",
        ),
        (
            "rollouts",
            "SELECT id, record FROM rollouts ORDER BY id COLLATE \"C\"",
            "INSERT INTO rollouts (id, record) VALUES ($1, $2)",
        ),
        (
            "releases",
            "SELECT version, record FROM releases ORDER BY version COLLATE \"C\"",
            "INSERT INTO releases (version, record) VALUES ($1, $2)",
        ),
        (
            "doctor_reports",
            "SELECT agent_id, record FROM doctor_reports ORDER BY agent_id COLLATE \"C\"",
            "INSERT INTO doctor_reports (agent_id, record) VALUES ($1, $2)",
        ),
        (
            "update_failures",
            "SELECT agent_id, record FROM update_failures ORDER BY agent_id COLLATE \"C\"",
            "INSERT INTO update_failures (agent_id, record) VALUES ($1, $2)",
        ),
        (
            "tasks",
            "SELECT id, record FROM tasks ORDER BY id COLLATE \"C\"",
            "INSERT INTO tasks (id, record) VALUES ($1, $2)",
        ),
        (
            "admin_tokens",
            "SELECT name, record FROM admin_tokens ORDER BY name COLLATE \"C\"",
            "INSERT INTO admin_tokens (name, record) VALUES ($1, $2)",
        ),
    ];
    pub(super) const SNAPSHOT_ENROLLMENTS: &str = "SELECT token_id, key_sha256, agent_id, at \
         FROM enrollments ORDER BY token_id COLLATE \"C\", key_sha256 COLLATE \"C\"";
    pub(super) const SNAPSHOT_META: &str = "SELECT key, value FROM meta ORDER BY key COLLATE \"C\"";
    pub(super) const ENROLLMENT_INSERT: &str =
        "INSERT INTO enrollments (token_id, key_sha256, agent_id, at) VALUES ($1, $2, $3, $4)";
    pub(super) const CONFIG_INSERT: &str = "INSERT INTO configs (scope, version, doc, hash, updated_at) \
         VALUES ($1, $2, $3, $4, $5)";
    pub(super) const CONFIGS_BY_SCOPE: &str = "SELECT scope, version, doc, hash, updated_at \
         FROM configs ORDER BY scope COLLATE \"C\"";

    /// Blobs: chunks in `blob_chunks`, then the `blobs` row, in one
    /// transaction: a blob with a `blobs` row is whole.
    pub(super) const BLOB_SIZE: &str = "SELECT size FROM blobs WHERE sha256 = $1";
    pub(super) const BLOBS_ALL: &str =
        "SELECT sha256, size FROM blobs ORDER BY sha256 COLLATE \"C\"";
    /// Two servers storing one blob: the second waits, then finds it.
    pub(super) const BLOB_LOCK: &str = "SELECT pg_advisory_xact_lock($1, $2)";
    pub(super) const BLOB_CHUNK_PUT: &str =
        "INSERT INTO blob_chunks (sha256, seq, data) VALUES ($1, $2, $3)";
    pub(super) const BLOB_PUT: &str = "INSERT INTO blobs (sha256, size) VALUES ($1, $2)";
    pub(super) const BLOB_CHUNK_GET: &str =
        "SELECT data FROM blob_chunks WHERE sha256 = $1 AND seq = $2";

    /// `migrate`: whether the database holds anything of a store.
    pub(super) const ANY_STORE: &str = "SELECT EXISTS (SELECT 1 FROM meta) \
         OR EXISTS (SELECT 1 FROM agents) OR EXISTS (SELECT 1 FROM tokens) \
         OR EXISTS (SELECT 1 FROM audit)";
    /// `migrate`: the tables of (key, record JSON) rows, by the exported
    /// table name, each filled with one statement per chunk.
    pub(super) const IMPORT_RECORDS: [(&str, &str); 8] = [
        (
            "agents",
            "INSERT INTO agents (id, record) SELECT * FROM unnest($1::text[], $2::text[])",
        ),
        (
            "heartbeats",
            "INSERT INTO heartbeats (agent_id, state) SELECT * FROM unnest($1::text[], $2::text[])",
        ),
        (
            "tokens",
            "INSERT INTO tokens (id, record) SELECT * FROM unnest($1::text[], $2::text[])",
        ),
        (
            "rollouts",
            "INSERT INTO rollouts (id, record) SELECT * FROM unnest($1::text[], $2::text[])",
        ),
        (
            "releases",
            "INSERT INTO releases (version, record) SELECT * FROM unnest($1::text[], $2::text[])",
        ),
        (
            "doctor_reports",
            "INSERT INTO doctor_reports (agent_id, record) \
             SELECT * FROM unnest($1::text[], $2::text[])",
        ),
        (
            "update_failures",
            "INSERT INTO update_failures (agent_id, record) \
             SELECT * FROM unnest($1::text[], $2::text[])",
        ),
        (
            "tasks",
            "INSERT INTO tasks (id, record) SELECT * FROM unnest($1::text[], $2::text[])",
        ),
    ];
    /// `migrate`: task results, keyed `<task>/<agent>` in the redb store.
    pub(super) const IMPORT_TASK_RESULTS: &str = "INSERT INTO task_results (task_id, agent_id, record) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[])";
    pub(super) const IMPORT_CERTS: &str = "INSERT INTO certs (serial, agent_id, record) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[])";
    pub(super) const IMPORT_ENROLLMENTS: &str = "INSERT INTO enrollments (token_id, key_sha256, agent_id, at) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])";
    pub(super) const IMPORT_CONFIGS: &str = "INSERT INTO configs (scope, version, doc, hash, updated_at) \
         SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::bigint[])";
    /// In the exported order, which the sequence then keeps.
    pub(super) const IMPORT_AUDIT: &str = "INSERT INTO audit \
         (at, action, subject, detail, actor, source, outcome) \
         SELECT a, b, c, d, e, f, g FROM unnest($1::bigint[], $2::text[], $3::text[], \
         $4::text[], $5::text[], $6::text[], $7::text[]) \
         WITH ORDINALITY AS t (a, b, c, d, e, f, g, n) ORDER BY n";
}

/// Bytes per row of `blob_chunks`: a blob is written and read one chunk
/// per statement, so memory stays bounded whatever its size.
const BLOB_CHUNK: usize = 1 << 20;
/// The first key of the blob advisory locks (the two-key space does not
/// overlap the one-key space of the migration lock): "blob" in ASCII.
const BLOB_LOCK_CLASS: i32 = 0x626c_6f62;

/// How long storing or copying a blob of `size` bytes may take: the usual
/// deadline plus a second per MiB (a floor of 1 MiB/s).
fn blob_timeout(size: u64) -> std::time::Duration {
    pool::QUERY_TIMEOUT + std::time::Duration::from_secs(size >> 20)
}

/// The second key of blob `sha256`'s advisory lock (its first 32 bits).
fn blob_lock_key(sha256: &str) -> i32 {
    u32::from_str_radix(sha256.get(..8).unwrap_or("0"), 16).unwrap_or(0) as i32
}

/// Fills `buf` from `data` as far as it goes; the bytes read (fewer than
/// `buf.len()` only at the end).
fn read_chunk(data: &mut dyn std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match data.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// A local I/O failure while a blob is moved (a full disk: try later).
fn blob_io(context: String, e: std::io::Error) -> StoreError {
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

/// Rows per statement when `migrate` copies a table.
const IMPORT_CHUNK: usize = 5_000;
/// `migrate` copies a whole store in one transaction.
const IMPORT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3_600);

fn encode<T: Serialize>(value: &T) -> String {
    json::to_string(value)
}

fn decode<T: Deserialize>(what: &'static str, key: &str, text: &str) -> Result<T, StoreError> {
    json::from_str(text).map_err(|_| StoreError::Corrupt {
        what,
        key: key.to_owned(),
    })
}

/// Seconds, counters and versions as PostgreSQL's `bigint`.
fn int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn uint(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The store in a PostgreSQL database.
pub(crate) struct PgStore {
    pool: Pool,
    /// Why the last write failed, until a write succeeds again.
    unwritable: Mutex<Option<String>>,
    /// Store operations that failed, since start.
    errors: AtomicU64,
    /// This server's name in the events, the heartbeat feed and the leases.
    node: String,
    listener: Listener,
}

impl PgStore {
    /// Connects and brings the schema up to date (refusing a newer one).
    /// A failure here is the server's start-up failure: its message names
    /// the database (without the password).
    fn connect(url: &str) -> Result<Self, StoreError> {
        let target = Target::parse(url)?;
        let mut random = [0u8; 8];
        crate::fsutil::random_bytes(&mut random).map_err(|e| StoreError::Backend {
            context: "cannot name this server".to_owned(),
            source: Box::new(e),
        })?;
        let store = Self {
            pool: Pool::new(target),
            unwritable: Mutex::new(None),
            errors: AtomicU64::new(0),
            node: stella_proto::hash::hex(&random),
            listener: Listener::default(),
        };
        let shown = store.pool.target().shown().to_owned();
        let migrated = store
            .pool
            .run(async |client| schema::migrate(client, &shown).await)
            .map_err(|e| match e {
                StoreError::Unavailable { context, source }
                | StoreError::Backend { context, source } => StoreError::Backend {
                    context: if context.contains(&shown) {
                        context
                    } else {
                        format!("cannot open the PostgreSQL store {shown} ({context})")
                    },
                    source,
                },
                other => other,
            })?;
        if migrated.from != migrated.to {
            crate::log::info(
                "PostgreSQL schema migrated",
                &[
                    ("store", &shown),
                    ("from", &migrated.from),
                    ("to", &migrated.to),
                ],
            );
        }
        Ok(store)
    }

    /// An empty store with the admin token's hash (what `init` does in
    /// steps); refuses a database that holds a store already.
    #[cfg(test)]
    pub(crate) fn create(url: &str, admin_sha256: &str) -> Result<Self, StoreError> {
        let store = Self::connect(url)?;
        store.initialize(admin_sha256)?;
        Ok(store)
    }

    /// Connects (and migrates) without initializing, for `init` to check
    /// before it writes anything.
    pub(crate) fn open_uninitialized(url: &str) -> Result<Self, StoreError> {
        Self::connect(url)
    }

    /// Whether `init` ran against this database.
    pub(crate) fn is_initialized(&self) -> Result<bool, StoreError> {
        Ok(self.meta(ADMIN_HASH_KEY)?.is_some())
    }

    /// Records the admin token's hash; what marks a finished `init`.
    pub(crate) fn initialize(&self, admin_sha256: &str) -> Result<(), StoreError> {
        let added = self.write(async |txn| {
            txn.execute(sql::META_ADD, &[&ADMIN_HASH_KEY, &admin_sha256])
                .await
                .map_err(pg("record the admin token"))
        })?;
        if added == 0 {
            return Err(StoreError::Exists {
                what: "store in",
                key: self.pool.target().shown().to_owned(),
            });
        }
        Ok(())
    }

    /// `serve`: an initialized store, schema up to date.
    pub(crate) fn open(url: &str) -> Result<Self, StoreError> {
        let store = Self::connect(url)?;
        if !store.is_initialized()? {
            return Err(StoreError::NotInitialized {
                store: store.pool.target().shown().to_owned(),
            });
        }
        Ok(store)
    }

    /// `migrate`: copies a whole store into this database, which must hold
    /// none, in one transaction (all or nothing). Returns how many rows each
    /// table received.
    pub(crate) fn import(&self, export: &Export) -> Result<Vec<(&'static str, usize)>, StoreError> {
        let shown = self.pool.target().shown().to_owned();
        self.pool.run_within(IMPORT_TIMEOUT, async |client| {
            let txn = client.transaction().await.map_err(pg("begin the copy"))?;
            txn.batch_execute("SET LOCAL statement_timeout = 0")
                .await
                .map_err(pg("begin the copy"))?;
            let used: bool = txn
                .query_one(sql::ANY_STORE, &[])
                .await
                .map_err(pg("look at the target"))?
                .get(0);
            if used {
                return Err(StoreError::Exists {
                    what: "store in",
                    key: shown.clone(),
                });
            }
            let mut counts = Vec::new();
            for (key, value) in &export.meta {
                txn.execute(sql::META_PUT, &[key, value])
                    .await
                    .map_err(pg("copy meta"))?;
            }
            for (table, statement) in sql::IMPORT_RECORDS {
                let rows = export.rows(table);
                for chunk in rows.chunks(IMPORT_CHUNK) {
                    let keys: Vec<&str> = chunk.iter().map(|(k, _)| k.as_str()).collect();
                    let records: Vec<&str> = chunk.iter().map(|(_, v)| v.as_str()).collect();
                    txn.execute(statement, &[&keys, &records])
                        .await
                        .map_err(|e| pool::pg_error(&format!("copy {table}"), e))?;
                }
                counts.push((table, rows.len()));
            }
            let certs = export.rows("certs");
            for chunk in certs.chunks(IMPORT_CHUNK) {
                let mut columns: (Vec<&str>, Vec<String>, Vec<&str>) = Default::default();
                for (serial, json) in chunk {
                    let cert: CertRecord = decode("certificate", serial, json)?;
                    columns.0.push(serial);
                    columns.1.push(cert.agent_id);
                    columns.2.push(json);
                }
                txn.execute(sql::IMPORT_CERTS, &[&columns.0, &columns.1, &columns.2])
                    .await
                    .map_err(pg("copy certs"))?;
            }
            counts.push(("certs", certs.len()));
            let results = export.rows("task_results");
            for chunk in results.chunks(IMPORT_CHUNK) {
                let mut columns: (Vec<&str>, Vec<&str>, Vec<&str>) = Default::default();
                for (key, json) in chunk {
                    let Some((task, agent)) = key.split_once('/') else {
                        return Err(StoreError::Corrupt {
                            what: "task result key",
                            key: key.clone(),
                        });
                    };
                    columns.0.push(task);
                    columns.1.push(agent);
                    columns.2.push(json);
                }
                txn.execute(
                    sql::IMPORT_TASK_RESULTS,
                    &[&columns.0, &columns.1, &columns.2],
                )
                .await
                .map_err(pg("copy task results"))?;
            }
            counts.push(("task_results", results.len()));
            let enrollments = export.rows("enrollments");
            for chunk in enrollments.chunks(IMPORT_CHUNK) {
                let mut columns: (Vec<&str>, Vec<&str>, Vec<String>, Vec<i64>) = Default::default();
                for (key, json) in chunk {
                    let marker: crate::records::EnrollmentRecord = decode("enrollment", key, json)?;
                    let Some((token_id, key_sha256)) = key.split_once('/') else {
                        return Err(StoreError::Corrupt {
                            what: "enrollment key",
                            key: key.clone(),
                        });
                    };
                    columns.0.push(token_id);
                    columns.1.push(key_sha256);
                    columns.2.push(marker.agent_id);
                    columns.3.push(int(marker.at));
                }
                txn.execute(
                    sql::IMPORT_ENROLLMENTS,
                    &[&columns.0, &columns.1, &columns.2, &columns.3],
                )
                .await
                .map_err(pg("copy enrollments"))?;
            }
            counts.push(("enrollments", enrollments.len()));
            let configs = export.rows("configs");
            for chunk in configs.chunks(IMPORT_CHUNK) {
                let (mut scopes, mut versions, mut docs, mut hashes, mut times) =
                    (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
                for (scope, json) in chunk {
                    let c: ConfigRecord = decode("config", scope, json)?;
                    scopes.push(c.scope);
                    versions.push(int(c.version));
                    docs.push(c.doc);
                    hashes.push(c.hash);
                    times.push(int(c.updated_at));
                }
                txn.execute(
                    sql::IMPORT_CONFIGS,
                    &[&scopes, &versions, &docs, &hashes, &times],
                )
                .await
                .map_err(pg("copy configs"))?;
            }
            counts.push(("configs", configs.len()));
            for (n, chunk) in export.audit.chunks(IMPORT_CHUNK).enumerate() {
                let mut columns: AuditColumns = Default::default();
                for (i, json) in chunk.iter().enumerate() {
                    let line: AuditRecord =
                        decode("audit", &(n * IMPORT_CHUNK + i).to_string(), json)?;
                    columns.0.push(int(line.at));
                    columns.1.push(line.action);
                    columns.2.push(line.subject);
                    columns.3.push(line.detail);
                    columns.4.push(line.actor);
                    columns.5.push(line.source);
                    columns.6.push(line.outcome);
                }
                txn.execute(
                    sql::IMPORT_AUDIT,
                    &[
                        &columns.0, &columns.1, &columns.2, &columns.3, &columns.4, &columns.5,
                        &columns.6,
                    ],
                )
                .await
                .map_err(pg("copy the audit log"))?;
            }
            counts.push(("audit", export.audit.len()));
            txn.commit().await.map_err(pg("commit the copy"))?;
            Ok(counts)
        })
    }

    fn count_error(&self, e: &StoreError) {
        if matches!(
            e,
            StoreError::Unavailable { .. }
                | StoreError::Backend { .. }
                | StoreError::Corrupt { .. }
        ) {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Runs `work` on a connection outside a transaction (reads).
    fn read<T>(
        &self,
        work: impl AsyncFnOnce(&mut Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.pool.run(work).inspect_err(|e| self.count_error(e))
    }

    /// Runs `work` in one transaction and commits it; a failure or a
    /// refusal rolls everything back. A write that could not reach the
    /// database marks the store unwritable until one succeeds.
    fn write<T>(
        &self,
        work: impl AsyncFnOnce(&mut Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.write_within(pool::QUERY_TIMEOUT, work)
    }

    /// `write` with another time limit (a blob).
    fn write_within<T>(
        &self,
        timeout: std::time::Duration,
        work: impl AsyncFnOnce(&mut Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let fence = super::current_fence();
        let result = self.pool.run_within(timeout, async |client| {
            let mut txn = client.transaction().await.map_err(pg("begin"))?;
            cluster::check_fence(&txn, &self.node, fence).await?;
            let out = work(&mut txn).await?;
            txn.commit().await.map_err(pg("commit"))?;
            Ok(out)
        });
        match &result {
            Ok(_) => *lock(&self.unwritable) = None,
            Err(e) => {
                self.count_error(e);
                if matches!(e, StoreError::Unavailable { .. }) {
                    *lock(&self.unwritable) = Some(e.to_string());
                }
            }
        }
        result
    }

    /// The size of stored blob `sha256`, if it is stored (whole).
    fn blob_size(&self, sha256: &str) -> Result<Option<u64>, StoreError> {
        self.read(async |client| {
            let row = client
                .query_opt(sql::BLOB_SIZE, &[&sha256])
                .await
                .map_err(pg("read a blob"))?;
            Ok(row.map(|r| uint(r.get(0))))
        })
    }

    /// `migrate`: whether this database holds anything of a store.
    pub(crate) fn holds_store(&self) -> Result<bool, StoreError> {
        self.read(async |client| {
            Ok(client
                .query_one(sql::ANY_STORE, &[])
                .await
                .map_err(pg("look at the target"))?
                .get(0))
        })
    }

    fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.read(async |client| {
            let row = client
                .query_opt(sql::META_GET, &[&key])
                .await
                .map_err(pg("read meta"))?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    /// One record by key, decoded.
    fn get<T: Deserialize>(
        &self,
        statement: &str,
        what: &'static str,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        self.read(async |client| {
            let row = client
                .query_opt(statement, &[&key])
                .await
                .map_err(|e| pool::pg_error(what, e))?;
            row.map(|r| decode(what, key, r.get(0))).transpose()
        })
    }

    /// Every record of a `SELECT key, record` statement, decoded.
    fn all<T: Deserialize>(
        &self,
        statement: &str,
        what: &'static str,
    ) -> Result<Vec<T>, StoreError> {
        self.read(async |client| {
            let rows = client
                .query(statement, &[])
                .await
                .map_err(|e| pool::pg_error(what, e))?;
            rows.iter()
                .map(|r| decode(what, r.get(0), r.get(1)))
                .collect()
        })
    }
}

/// A parameter of a typed statement (`execute_typed`): the value and its
/// PostgreSQL type, so the statement needs no separate prepare.
type Param<'a> = (&'a (dyn tokio_postgres::types::ToSql + Sync), Type);

/// The audit log's columns, for `migrate`'s one statement per chunk.
type AuditColumns = (
    Vec<i64>,
    Vec<String>,
    Vec<String>,
    Vec<String>,
    Vec<Option<String>>,
    Vec<Option<String>>,
    Vec<Option<String>>,
);

/// Appends the line of a change by whoever acts now (`audit::acting_as`:
/// the store runs its work on the caller's thread) in `txn`.
async fn append_audit(
    txn: &Transaction<'_>,
    at: u64,
    action: &str,
    subject: &str,
    detail: &str,
) -> Result<(), StoreError> {
    append_line(txn, &crate::audit::line(at, action, subject, detail)).await
}

async fn append_line(txn: &Transaction<'_>, line: &AuditRecord) -> Result<(), StoreError> {
    txn.execute(
        sql::AUDIT_APPEND,
        &[
            &int(line.at),
            &line.action,
            &line.subject,
            &line.detail,
            &line.actor,
            &line.source,
            &line.outcome,
        ],
    )
    .await
    .map_err(pg("append to the audit log"))?;
    Ok(())
}

/// An audit line from a row of `seq, at, action, subject, detail, actor,
/// source, outcome`, with its sequence number.
fn audit_row(r: &tokio_postgres::Row) -> (u64, AuditRecord) {
    (
        uint(r.get(0)),
        AuditRecord {
            at: uint(r.get(1)),
            action: r.get(2),
            subject: r.get(3),
            detail: r.get(4),
            actor: r.get(5),
            source: r.get(6),
            outcome: r.get(7),
        },
    )
}

/// Inserts a new record with `statement` (`… ON CONFLICT DO NOTHING`);
/// `Exists` when `key` is taken.
async fn insert_new(
    txn: &Transaction<'_>,
    statement: &str,
    what: &'static str,
    key: &str,
    record: &str,
) -> Result<(), StoreError> {
    let added = txn
        .execute(statement, &[&key, &record])
        .await
        .map_err(|e| pool::pg_error(&format!("insert the new {what}"), e))?;
    if added == 0 {
        return Err(StoreError::Exists {
            what,
            key: key.to_owned(),
        });
    }
    Ok(())
}

/// The record in the first column of `row`, if any, decoded.
fn record_of<T: Deserialize>(
    row: Option<tokio_postgres::Row>,
    what: &'static str,
    key: &str,
) -> Result<Option<T>, StoreError> {
    row.map(|r| decode(what, key, r.get(0))).transpose()
}

/// An agent locked for the rest of `txn`.
async fn lock_agent(txn: &Transaction<'_>, id: &str) -> Result<AgentRecord, StoreError> {
    let row = txn
        .query_opt(sql::AGENT_LOCK, &[&id])
        .await
        .map_err(pg("lock an agent"))?;
    record_of(row, "agent", id)?.ok_or_else(|| StoreError::NotFound {
        what: "agent",
        key: id.to_owned(),
    })
}

impl Store for PgStore {
    fn health(&self) -> StoreHealth {
        StoreHealth {
            unwritable: lock(&self.unwritable).clone(),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }

    fn probe_write(&self, now: u64) -> Result<(), StoreError> {
        let at = stella_proto::time::rfc3339(now);
        self.write(async |txn| {
            txn.execute(sql::META_PUT, &[&PROBE_KEY, &at])
                .await
                .map_err(pg("probe write"))?;
            Ok(())
        })
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
        let result = self.pool.run_within(pool::LOAD_TIMEOUT, async |client| {
            // One snapshot, and the longer limit for a large fleet.
            let txn = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(pg("begin reading agents"))?;
            let limit = format!(
                "SET LOCAL statement_timeout = {}",
                pool::LOAD_TIMEOUT.as_millis()
            );
            txn.batch_execute(&limit).await.map_err(pg("read agents"))?;
            let rows = txn
                .query_raw(sql::AGENTS_WITH_HEARTBEATS, std::iter::empty::<&str>())
                .await
                .map_err(pg("read agents"))?;
            let mut rows = std::pin::pin!(rows);
            while let Some(row) = rows.next().await {
                let row = row.map_err(pg("read agents"))?;
                let id: &str = row.get(0);
                let record: AgentRecord = decode("agent", id, row.get(1))?;
                let hb = match row.get::<_, Option<&str>>(2) {
                    Some(state) => decode("heartbeat", id, state)?,
                    None => <HeartbeatState as Default>::default(),
                };
                each(record, hb);
            }
            txn.commit().await.map_err(pg("read agents"))?;
            Ok(())
        });
        result.inspect_err(|e| self.count_error(e))
    }

    fn agent(&self, id: &str) -> Result<Option<AgentRecord>, StoreError> {
        self.get(sql::AGENT_GET, "agent", id)
    }

    fn insert_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        self.write(async |txn| {
            insert_new(txn, sql::TOKEN_INSERT, "token", &token.id, &encode(token)).await?;
            append_audit(
                txn,
                token.created_at,
                "token.create",
                &token.id,
                &detail::token_created(token),
            )
            .await
        })
    }

    fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.get(sql::TOKEN_GET, "token", id)
    }

    fn enroll(
        &self,
        token_id: &str,
        key_sha256: &str,
        rule: &mut EnrollRule<'_>,
    ) -> Result<(), StoreError> {
        self.write(async |txn| {
            // The token row stays locked until the commit: enrollments with
            // one token are serialized across servers. So everything from
            // here to the commit is as few round trips as it can be: typed
            // statements (no separate prepare) and the writes pipelined.
            let row = txn
                .query_typed_opt(sql::TOKEN_LOCK, &[(&token_id, Type::TEXT)])
                .await
                .map_err(pg("lock a token"))?;
            let token: Option<TokenRecord> = record_of(row, "token", token_id)?;
            let marker = txn
                .query_typed_opt(
                    sql::ENROLLMENT_GET,
                    &[(&token_id, Type::TEXT), (&key_sha256, Type::TEXT)],
                )
                .await
                .map_err(pg("read an enrollment"))?;
            let prior = match marker {
                Some(marker) => {
                    let agent_id: String = marker.get(0);
                    let at: i64 = marker.get(1);
                    let key = format!("{token_id}/{key_sha256}");
                    let agent_row = txn
                        .query_opt(sql::AGENT_GET, &[&agent_id])
                        .await
                        .map_err(pg("read an agent"))?;
                    let agent: AgentRecord =
                        record_of(agent_row, "agent", &agent_id)?.ok_or_else(|| {
                            StoreError::Corrupt {
                                what: "enrollment (its agent is missing)",
                                key: key.clone(),
                            }
                        })?;
                    let cert_row = txn
                        .query_opt(sql::CERT_GET, &[&agent.cert_serial])
                        .await
                        .map_err(pg("read a certificate"))?;
                    let cert: CertRecord = record_of(cert_row, "certificate", &agent.cert_serial)?
                        .ok_or_else(|| StoreError::Corrupt {
                            what: "agent (its certificate is missing)",
                            key: agent.id.clone(),
                        })?;
                    Some(PriorEnrollment {
                        at: uint(at),
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
            let (token_record, agent_record) = (encode(&new.token), encode(&new.agent));
            let cert_record = encode(&new.cert);
            let at = int(new.at);
            let audit = audit::enrolled(new.at, &new.token.id, &new.agent, &new.cert.serial);
            let audit_at = int(audit.at);
            let kind = ChangeKind::Agent.as_str();
            let (text, int8) = (Type::TEXT, Type::INT8);
            let token_use: [Param<'_>; 2] =
                [(&new.token.id, text.clone()), (&token_record, text.clone())];
            let agent: [Param<'_>; 2] =
                [(&new.agent.id, text.clone()), (&agent_record, text.clone())];
            let cert: [Param<'_>; 3] = [
                (&new.cert.serial, text.clone()),
                (&new.cert.agent_id, text.clone()),
                (&cert_record, text.clone()),
            ];
            let marker: [Param<'_>; 4] = [
                (&token_id, text.clone()),
                (&key_sha256, text.clone()),
                (&new.agent.id, text.clone()),
                (&at, int8.clone()),
            ];
            let event: [Param<'_>; 3] = [
                (&self.node, text.clone()),
                (&kind, text.clone()),
                (&new.agent.id, text.clone()),
            ];
            let line: [Param<'_>; 7] = [
                (&audit_at, int8),
                (&audit.action, text.clone()),
                (&audit.subject, text.clone()),
                (&audit.detail, text.clone()),
                (&audit.actor, text.clone()),
                (&audit.source, text.clone()),
                (&audit.outcome, text),
            ];
            let token_use = txn.execute_typed(sql::TOKEN_UPDATE, &token_use);
            let agent = txn.execute_typed(sql::AGENT_INSERT, &agent);
            let cert = txn.execute_typed(sql::CERT_PUT, &cert);
            let marker = txn.execute_typed(sql::ENROLLMENT_PUT, &marker);
            let event = txn.execute_typed(cluster::sql::EVENT_APPEND, &event);
            let notify = txn.execute_typed(cluster::sql::EVENT_NOTIFY, &[]);
            let line = txn.execute_typed(sql::AUDIT_APPEND, &line);
            // Polled together, so all go out before the first answer.
            try_zip(
                try_zip(try_zip(token_use, agent), try_zip(cert, marker)),
                try_zip(try_zip(event, notify), line),
            )
            .await
            .map_err(pg("record an enrollment"))?;
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
        self.write(async |txn| {
            let rows = txn
                .query(sql::AGENTS_LOCK, &[&ids])
                .await
                .map_err(pg("lock agents"))?;
            let mut locked: std::collections::HashMap<&str, String> =
                rows.iter().map(|row| (row.get(0), row.get(1))).collect();
            let mut written = Vec::new();
            // In the caller's order, as the redb store does.
            for id in ids {
                let Some(stored) = locked.get(id) else {
                    return Err(StoreError::NotFound {
                        what: "agent",
                        key: (*id).to_owned(),
                    });
                };
                let mut record: AgentRecord = decode("agent", id, stored)?;
                let before = record.status_text();
                if change(&mut record)? {
                    let encoded = encode(&record);
                    txn.execute(sql::AGENT_UPDATE, &[id, &encoded])
                        .await
                        .map_err(pg("update an agent"))?;
                    // An id named twice sees its first change.
                    locked.insert(id, encoded);
                    let after = record.status_text();
                    append_audit(
                        txn,
                        now,
                        action,
                        id,
                        &detail::status_changed(&before, &after),
                    )
                    .await?;
                    publish(txn, &self.node, ChangeKind::Agent, id).await?;
                    written.push(record);
                }
            }
            Ok(written)
        })
    }

    fn cert(&self, serial: &str) -> Result<Option<CertRecord>, StoreError> {
        self.get(sql::CERT_GET, "certificate", serial)
    }

    fn replace_certificate(
        &self,
        cert: &CertRecord,
        change: Box<CertificateChange<'_>>,
    ) -> Result<AgentRecord, StoreError> {
        self.write(async move |txn| {
            let agent_id = cert.agent_id.as_str();
            let mut record = lock_agent(txn, agent_id).await?;
            let detail = change(&mut record)?;
            txn.execute(sql::AGENT_UPDATE, &[&agent_id, &encode(&record)])
                .await
                .map_err(pg("update an agent"))?;
            txn.execute(sql::CERT_PUT, &[&cert.serial, &agent_id, &encode(cert)])
                .await
                .map_err(pg("insert a certificate"))?;
            append_audit(txn, cert.issued_at, "agent.certificate", agent_id, &detail).await?;
            publish(txn, &self.node, ChangeKind::Agent, agent_id).await?;
            Ok(record)
        })
    }

    fn rollouts(&self) -> Result<Vec<RolloutRecord>, StoreError> {
        self.all(sql::ROLLOUTS_ALL, "rollout")
    }

    fn put_rollout(
        &self,
        rollout: &RolloutRecord,
        expected: Option<&RolloutRecord>,
        now: u64,
        action: &str,
        detail: &str,
    ) -> Result<(), StoreError> {
        self.write(async |txn| {
            match expected {
                None => txn
                    .execute(sql::ROLLOUT_PUT, &[&rollout.id, &encode(rollout)])
                    .await
                    .map_err(pg("write a rollout"))?,
                Some(expected) => {
                    let replaced = txn
                        .execute(
                            sql::ROLLOUT_REPLACE,
                            &[&rollout.id, &encode(rollout), &encode(expected)],
                        )
                        .await
                        .map_err(pg("write a rollout"))?;
                    if replaced == 0 {
                        return Err(super::rollout_changed(&rollout.id));
                    }
                    replaced
                }
            };
            publish(txn, &self.node, ChangeKind::Rollout, &rollout.id).await?;
            append_audit(txn, now, action, &rollout.id, detail).await
        })
    }

    fn releases(&self) -> Result<Vec<ReleaseRecord>, StoreError> {
        self.all(sql::RELEASES_ALL, "release")
    }

    fn insert_release(&self, release: &ReleaseRecord) -> Result<Option<ReleaseRecord>, StoreError> {
        self.write(async |txn| {
            let added = txn
                .execute(sql::RELEASE_INSERT, &[&release.version, &encode(release)])
                .await
                .map_err(pg("insert a release"))?;
            if added == 0 {
                let row = txn
                    .query_opt(sql::RELEASE_GET, &[&release.version])
                    .await
                    .map_err(pg("read a release"))?;
                return record_of(row, "release", &release.version);
            }
            append_audit(
                txn,
                release.imported_at,
                "release.import",
                &release.version,
                &detail::release_imported(release),
            )
            .await?;
            publish(txn, &self.node, ChangeKind::Release, &release.version).await?;
            Ok(None)
        })
    }

    fn configs(&self) -> Result<Vec<ConfigRecord>, StoreError> {
        self.read(async |client| {
            let rows = client
                .query(sql::CONFIGS_ALL, &[])
                .await
                .map_err(pg("read configs"))?;
            Ok(rows
                .iter()
                .map(|r| ConfigRecord {
                    scope: r.get(0),
                    version: uint(r.get(1)),
                    doc: r.get(2),
                    hash: r.get(3),
                    updated_at: uint(r.get(4)),
                })
                .collect())
        })
    }

    fn set_config(
        &self,
        scope: &str,
        doc: &str,
        hash: &str,
        now: u64,
    ) -> Result<ConfigRecord, StoreError> {
        self.write(async |txn| {
            let version: i64 = txn
                .query_one(sql::CONFIG_SET, &[&scope, &doc, &hash, &int(now)])
                .await
                .map_err(pg("write a config"))?
                .get(0);
            append_audit(
                txn,
                now,
                "config.set",
                scope,
                &detail::config_set(uint(version), hash),
            )
            .await?;
            publish(txn, &self.node, ChangeKind::Config, scope).await?;
            Ok(ConfigRecord {
                scope: scope.to_owned(),
                version: uint(version),
                doc: doc.to_owned(),
                hash: hash.to_owned(),
                updated_at: now,
            })
        })
    }

    fn put_doctor_report(
        &self,
        id: &str,
        report: &DoctorReportRecord,
    ) -> Result<AgentRecord, StoreError> {
        self.write(async |txn| {
            let mut record = lock_agent(txn, id).await?;
            if record.doctor_request.take().is_some() {
                txn.execute(sql::AGENT_UPDATE, &[&id, &encode(&record)])
                    .await
                    .map_err(pg("update an agent"))?;
                publish(txn, &self.node, ChangeKind::Agent, id).await?;
            }
            txn.execute(sql::DOCTOR_REPORT_PUT, &[&id, &encode(report)])
                .await
                .map_err(pg("write a doctor report"))?;
            append_audit(txn, report.received_at, "agent.doctor_report", id, "").await?;
            Ok(record)
        })
    }

    fn doctor_report(&self, id: &str) -> Result<Option<DoctorReportRecord>, StoreError> {
        self.get(sql::DOCTOR_REPORT_GET, "doctor report", id)
    }

    fn put_update_failure(
        &self,
        id: &str,
        failure: &UpdateFailureRecord,
    ) -> Result<(), StoreError> {
        self.write(async |txn| {
            let known = txn
                .query_opt(sql::AGENT_GET, &[&id])
                .await
                .map_err(pg("read an agent"))?;
            if known.is_none() {
                return Err(StoreError::NotFound {
                    what: "agent",
                    key: id.to_owned(),
                });
            }
            txn.execute(sql::UPDATE_FAILURE_PUT, &[&id, &encode(failure)])
                .await
                .map_err(pg("write an update failure"))?;
            let detail = detail::update_failed(failure);
            append_audit(txn, failure.received_at, "agent.update_failed", id, &detail).await
        })
    }

    fn update_failure(&self, id: &str) -> Result<Option<UpdateFailureRecord>, StoreError> {
        self.get(sql::UPDATE_FAILURE_GET, "update failure", id)
    }

    fn tasks(&self) -> Result<Vec<TaskRecord>, StoreError> {
        self.all(sql::TASKS_ALL, "task")
    }

    fn insert_task(&self, task: &TaskRecord) -> Result<(), StoreError> {
        self.write(async |txn| {
            insert_new(txn, sql::TASK_INSERT, "task", &task.id, &encode(task)).await?;
            publish(txn, &self.node, ChangeKind::Task, &task.id).await?;
            append_audit(
                txn,
                task.created_at,
                "task.create",
                &task.id,
                &detail::task_created(task),
            )
            .await
        })
    }

    fn put_task(&self, task: &TaskRecord, now: u64, action: &str) -> Result<(), StoreError> {
        self.write(async |txn| {
            let changed = txn
                .execute(sql::TASK_UPDATE, &[&task.id, &encode(task)])
                .await
                .map_err(pg("write a task"))?;
            if changed == 0 {
                return Err(StoreError::NotFound {
                    what: "task",
                    key: task.id.clone(),
                });
            }
            publish(txn, &self.node, ChangeKind::Task, &task.id).await?;
            append_audit(txn, now, action, &task.id, "").await
        })
    }

    fn task_results(&self, task: Option<&str>) -> Result<Vec<TaskResultRecord>, StoreError> {
        self.read(async |client| {
            let rows = match task {
                Some(id) => client.query(sql::TASK_RESULTS_OF, &[&id]).await,
                None => client.query(sql::TASK_RESULTS_ALL, &[]).await,
            }
            .map_err(pg("read task results"))?;
            rows.iter()
                .map(|r| {
                    let key = format!("{}/{}", r.get::<_, &str>(0), r.get::<_, &str>(1));
                    decode("task result", &key, r.get(2))
                })
                .collect()
        })
    }

    fn put_task_results(&self, results: &[TaskResultRecord]) -> Result<(), StoreError> {
        if results.is_empty() {
            return Ok(());
        }
        self.write(async |txn| {
            for r in results {
                txn.execute(sql::TASK_RESULT_PUT, &[&r.task, &r.agent, &encode(r)])
                    .await
                    .map_err(pg("write a task result"))?;
                append_audit(
                    txn,
                    r.reported_at,
                    "task.result",
                    &r.task,
                    &detail::task_result(r),
                )
                .await?;
                let key = format!("{}/{}", r.task, r.agent);
                publish(txn, &self.node, ChangeKind::TaskResult, &key).await?;
            }
            Ok(())
        })
    }

    fn save_heartbeats(&self, batch: &[(String, HeartbeatState)]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = batch.iter().map(|(id, _)| id.as_str()).collect();
        let states: Vec<String> = batch.iter().map(|(_, state)| encode(state)).collect();
        self.write(async |txn| {
            // Soft state, group-committed anyway: the batch need not wait
            // for the WAL flush (a database crash may lose the last batches,
            // as a server crash loses the unflushed ones; the next
            // heartbeats restore them).
            txn.batch_execute("SET LOCAL synchronous_commit = off")
                .await
                .map_err(pg("save heartbeats"))?;
            txn.execute(sql::HEARTBEATS_PUT, &[&ids, &states, &self.node])
                .await
                .map_err(pg("save heartbeats"))?;
            Ok(())
        })
    }

    fn audit_page(
        &self,
        after: Option<u64>,
        limit: usize,
        select: &dyn Fn(&AuditRecord) -> bool,
    ) -> Result<Vec<(u64, AuditRecord)>, StoreError> {
        // Read in chunks until `limit` lines are selected or none are left.
        const CHUNK: i64 = 1_000;
        let mut out = Vec::new();
        let mut from = after.map_or(0, int);
        while out.len() < limit {
            let rows = self.read(async |client| {
                client
                    .query(sql::AUDIT_AFTER, &[&from, &CHUNK])
                    .await
                    .map_err(pg("read the audit log"))
            })?;
            for row in &rows {
                let (seq, line) = audit_row(row);
                from = int(seq);
                if out.len() < limit && select(&line) {
                    out.push((seq, line));
                }
            }
            if (rows.len() as i64) < CHUNK {
                break;
            }
        }
        Ok(out)
    }

    fn append_audit(&self, line: &AuditRecord) -> Result<(), StoreError> {
        self.write(async |txn| append_line(txn, line).await)
    }

    fn admin_tokens(&self) -> Result<Vec<AdminTokenRecord>, StoreError> {
        self.all(sql::ADMIN_TOKENS_ALL, "admin token")
    }

    fn insert_admin_token(&self, token: &AdminTokenRecord) -> Result<(), StoreError> {
        self.write(async |txn| {
            insert_new(
                txn,
                sql::ADMIN_TOKEN_INSERT,
                "admin token",
                &token.name,
                &encode(token),
            )
            .await?;
            publish(txn, &self.node, ChangeKind::AdminToken, &token.name).await?;
            append_audit(
                txn,
                token.created_at,
                "admin_token.create",
                &token.name,
                &detail::admin_token_created(token),
            )
            .await
        })
    }

    fn update_admin_token(
        &self,
        name: &str,
        now: u64,
        action: &str,
        change: &mut AdminTokenChange<'_>,
    ) -> Result<AdminTokenRecord, StoreError> {
        self.write(async |txn| {
            let row = txn
                .query_opt(sql::ADMIN_TOKEN_LOCK, &[&name])
                .await
                .map_err(pg("lock an admin token"))?;
            let mut record: AdminTokenRecord =
                record_of(row, "admin token", name)?.ok_or_else(|| StoreError::NotFound {
                    what: "admin token",
                    key: name.to_owned(),
                })?;
            if change(&mut record)? {
                txn.execute(sql::ADMIN_TOKEN_UPDATE, &[&name, &encode(&record)])
                    .await
                    .map_err(pg("update an admin token"))?;
                append_audit(txn, now, action, name, &format!("role={}", record.role)).await?;
                publish(txn, &self.node, ChangeKind::AdminToken, name).await?;
            }
            Ok(record)
        })
    }

    fn snapshot(&self, each: &mut SnapshotRow<'_>) -> Result<(), StoreError> {
        self.read(async |client| {
            // One repeatable-read transaction: every table as of one moment.
            let txn = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(pg("begin the snapshot"))?;
            let snapshot_error = pg("read the snapshot");
            for row in txn
                .query(sql::SNAPSHOT_META, &[])
                .await
                .map_err(&snapshot_error)?
            {
                each("meta", row.get(0), row.get::<_, &str>(1).as_bytes())?;
            }
            for (table, select, _) in sql::SNAPSHOT_RECORDS {
                let rows = txn.query(select, &[]).await.map_err(&snapshot_error)?;
                for row in &rows {
                    each(table, row.get(0), row.get::<_, &str>(1).as_bytes())?;
                }
                if table == "certs" {
                    // Then the tables with columns of their own, in the
                    // order the redb store gives them.
                    let rows = txn
                        .query(sql::SNAPSHOT_ENROLLMENTS, &[])
                        .await
                        .map_err(&snapshot_error)?;
                    for row in &rows {
                        let key = format!("{}/{}", row.get::<_, &str>(0), row.get::<_, &str>(1));
                        let marker = crate::records::EnrollmentRecord {
                            agent_id: row.get(2),
                            at: uint(row.get(3)),
                        };
                        each("enrollments", &key, encode(&marker).as_bytes())?;
                    }
                }
                if table == "releases" {
                    let rows = txn
                        .query(sql::CONFIGS_BY_SCOPE, &[])
                        .await
                        .map_err(&snapshot_error)?;
                    for r in &rows {
                        let config = ConfigRecord {
                            scope: r.get(0),
                            version: uint(r.get(1)),
                            doc: r.get(2),
                            hash: r.get(3),
                            updated_at: uint(r.get(4)),
                        };
                        each("configs", &config.scope, encode(&config).as_bytes())?;
                    }
                }
                if table == "tasks" {
                    let rows = txn
                        .query(sql::TASK_RESULTS_ALL, &[])
                        .await
                        .map_err(&snapshot_error)?;
                    for r in &rows {
                        let key = format!("{}/{}", r.get::<_, &str>(0), r.get::<_, &str>(1));
                        each("task_results", &key, r.get::<_, &str>(2).as_bytes())?;
                    }
                }
            }
            for row in txn
                .query(sql::AUDIT_ALL, &[])
                .await
                .map_err(&snapshot_error)?
            {
                let (seq, line) = audit_row(&row);
                each("audit", &seq.to_string(), encode(&line).as_bytes())?;
            }
            txn.commit().await.map_err(pg("end the snapshot"))
        })
    }

    fn restore_rows(&self, rows: &[(String, String, Vec<u8>)]) -> Result<(), StoreError> {
        self.write(async |txn| {
            for (table, key, value) in rows {
                let corrupt = || StoreError::Corrupt {
                    what: "snapshot row",
                    key: format!("{table}/{key}"),
                };
                let text = std::str::from_utf8(value).map_err(|_| corrupt())?;
                let written = match table.as_str() {
                    "meta" => txn.execute(sql::META_PUT, &[key, &text]).await,
                    "audit" => {
                        let seq: i64 = key.parse().map_err(|_| corrupt())?;
                        let l: AuditRecord = decode("audit", key, text)?;
                        txn.execute(
                            sql::AUDIT_RESTORE,
                            &[
                                &seq,
                                &int(l.at),
                                &l.action,
                                &l.subject,
                                &l.detail,
                                &l.actor,
                                &l.source,
                                &l.outcome,
                            ],
                        )
                        .await
                    }
                    "certs" => {
                        let cert: CertRecord = decode("certificate", key, text)?;
                        txn.execute(sql::CERT_PUT, &[key, &cert.agent_id, &text])
                            .await
                    }
                    "enrollments" => {
                        let (token_id, key_sha256) = key.split_once('/').ok_or_else(corrupt)?;
                        let m: crate::records::EnrollmentRecord = decode("enrollment", key, text)?;
                        txn.execute(
                            sql::ENROLLMENT_INSERT,
                            &[&token_id, &key_sha256, &m.agent_id, &int(m.at)],
                        )
                        .await
                    }
                    "configs" => {
                        let c: ConfigRecord = decode("config", key, text)?;
                        txn.execute(
                            sql::CONFIG_INSERT,
                            &[
                                &c.scope,
                                &int(c.version),
                                &c.doc,
                                &c.hash,
                                &int(c.updated_at),
                            ],
                        )
                        .await
                    }
                    "task_results" => {
                        let (task, agent) = key.split_once('/').ok_or_else(corrupt)?;
                        txn.execute(sql::TASK_RESULT_PUT, &[&task, &agent, &text])
                            .await
                    }
                    name => {
                        let (_, _, insert) = sql::SNAPSHOT_RECORDS
                            .iter()
                            .find(|(n, _, insert)| *n == name && !insert.is_empty())
                            .ok_or_else(corrupt)?;
                        txn.execute(*insert, &[key, &text]).await
                    }
                };
                written.map_err(pg("restore a snapshot row"))?;
            }
            txn.execute(sql::AUDIT_SEQ_RESET, &[])
                .await
                .map_err(pg("restore the audit sequence"))?;
            Ok(())
        })
    }

    fn put_blob(
        &self,
        sha256: &str,
        size: u64,
        data: &mut dyn std::io::Read,
    ) -> Result<(), StoreError> {
        if !crate::blobs::is_blob_name(sha256) {
            return Err(Refusal::bad_request(format!("{sha256:?} is not a SHA-256")).into());
        }
        if self.blob_size(sha256)?.is_some() {
            return Ok(());
        }
        let timeout = blob_timeout(size);
        self.write_within(timeout, async |txn| {
            let limit = format!("SET LOCAL statement_timeout = {}", timeout.as_millis());
            txn.batch_execute(&limit)
                .await
                .map_err(pg("store a blob"))?;
            txn.execute(sql::BLOB_LOCK, &[&BLOB_LOCK_CLASS, &blob_lock_key(sha256)])
                .await
                .map_err(pg("lock a blob"))?;
            let stored = txn
                .query_opt(sql::BLOB_SIZE, &[&sha256])
                .await
                .map_err(pg("read a blob"))?;
            if stored.is_some() {
                return Ok(());
            }
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            let mut buf = vec![0u8; BLOB_CHUNK];
            let (mut seq, mut total) = (0i32, 0u64);
            loop {
                let n = read_chunk(data, &mut buf)
                    .map_err(|e| blob_io(format!("cannot read blob {sha256}"), e))?;
                if n == 0 {
                    break;
                }
                total += n as u64;
                if total > size {
                    return Err(Refusal::bad_request(format!(
                        "blob {sha256} is larger than its {size} bytes"
                    ))
                    .into());
                }
                ctx.update(&buf[..n]);
                let chunk: &[u8] = &buf[..n];
                txn.execute(sql::BLOB_CHUNK_PUT, &[&sha256, &seq, &chunk])
                    .await
                    .map_err(pg("store a blob chunk"))?;
                seq += 1;
                if n < buf.len() {
                    break;
                }
            }
            let got = stella_proto::hash::hex(ctx.finish().as_ref());
            if got != sha256 || total != size {
                return Err(Refusal::bad_request(format!(
                    "blob {sha256} ({size} bytes) was given {total} bytes with sha256 {got}"
                ))
                .into());
            }
            txn.execute(sql::BLOB_PUT, &[&sha256, &int(size)])
                .await
                .map_err(pg("store a blob"))?;
            Ok(())
        })
    }

    fn copy_blob(&self, sha256: &str, out: &mut dyn std::io::Write) -> Result<bool, StoreError> {
        let Some(size) = self.blob_size(sha256)? else {
            return Ok(false);
        };
        self.pool
            .run_within(blob_timeout(size), async |client| {
                let (mut seq, mut copied) = (0i32, 0u64);
                while copied < size {
                    let row = client
                        .query_opt(sql::BLOB_CHUNK_GET, &[&sha256, &seq])
                        .await
                        .map_err(pg("read a blob chunk"))?;
                    let Some(row) = row else {
                        return Err(StoreError::Corrupt {
                            what: "blob",
                            key: format!("{sha256} (chunk {seq} is missing)"),
                        });
                    };
                    let chunk: &[u8] = row.get(0);
                    out.write_all(chunk)
                        .map_err(|e| blob_io(format!("cannot write blob {sha256}"), e))?;
                    copied += chunk.len() as u64;
                    seq += 1;
                }
                if copied != size {
                    return Err(StoreError::Corrupt {
                        what: "blob",
                        key: format!("{sha256} ({copied} bytes, not {size})"),
                    });
                }
                Ok(true)
            })
            .inspect_err(|e| self.count_error(e))
    }

    fn blobs(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.read(async |client| {
            let rows = client
                .query(sql::BLOBS_ALL, &[])
                .await
                .map_err(pg("list blobs"))?;
            Ok(rows.iter().map(|r| (r.get(0), uint(r.get(1)))).collect())
        })
    }

    fn cluster(&self) -> Option<&dyn Cluster> {
        Some(self)
    }

    fn audit_log(&self) -> Result<Vec<AuditRecord>, StoreError> {
        self.read(async |client| {
            let rows = client
                .query(sql::AUDIT_ALL, &[])
                .await
                .map_err(pg("read the audit log"))?;
            Ok(rows.iter().map(|r| audit_row(r).1).collect())
        })
    }
}
