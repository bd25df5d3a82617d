//! The PostgreSQL schema and its migrations: versioned, forward-only,
//! applied at start in one transaction under an advisory lock (two servers
//! starting together apply each migration once); a database whose schema is
//! newer than this server knows is refused.
//!
//! A migration is never edited once released: a change is a new entry at the
//! end of [`MIGRATIONS`].

use tokio_postgres::Client;

use super::pool::pg;
use crate::store::StoreError;

/// Each migration: its version (1, 2, … in order) and its SQL.
///
/// Records are the same JSON as in the redb store (`records`), in `text`
/// columns keyed by what the store looks them up by; the columns a write
/// must compute atomically in SQL (a configuration's next version) are
/// columns of their own.
pub(super) const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "
    CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
    CREATE TABLE agents (id text PRIMARY KEY, record text NOT NULL);
    CREATE TABLE heartbeats (agent_id text PRIMARY KEY, state text NOT NULL);
    CREATE TABLE tokens (id text PRIMARY KEY, record text NOT NULL);
    CREATE TABLE certs (
        serial text PRIMARY KEY,
        agent_id text NOT NULL,
        record text NOT NULL
    );
    CREATE TABLE enrollments (
        token_id text NOT NULL,
        key_sha256 text NOT NULL,
        agent_id text NOT NULL,
        at bigint NOT NULL,
        PRIMARY KEY (token_id, key_sha256)
    );
    CREATE TABLE audit (
        seq bigserial PRIMARY KEY,
        at bigint NOT NULL,
        action text NOT NULL,
        subject text NOT NULL,
        detail text NOT NULL
    );
    CREATE TABLE rollouts (id text PRIMARY KEY, record text NOT NULL);
    CREATE TABLE releases (version text PRIMARY KEY, record text NOT NULL);
    CREATE TABLE configs (
        scope text PRIMARY KEY,
        version bigint NOT NULL,
        doc text NOT NULL,
        hash text NOT NULL,
        updated_at bigint NOT NULL
    );
    CREATE TABLE doctor_reports (agent_id text PRIMARY KEY, record text NOT NULL);
    ",
    ),
    (
        2,
        "
    CREATE TABLE update_failures (agent_id text PRIMARY KEY, record text NOT NULL);
    CREATE TABLE tasks (id text PRIMARY KEY, record text NOT NULL);
    CREATE TABLE task_results (
        task_id text NOT NULL,
        agent_id text NOT NULL,
        record text NOT NULL,
        PRIMARY KEY (task_id, agent_id)
    );
    ",
    ),
    (
        3,
        "
    ALTER TABLE audit ADD COLUMN actor text, ADD COLUMN source text, ADD COLUMN outcome text;
    CREATE TABLE admin_tokens (name text PRIMARY KEY, record text NOT NULL);
    ",
    ),
    (
        4,
        "
    CREATE FUNCTION stella_now_ms() RETURNS bigint LANGUAGE sql VOLATILE
        AS $$ SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint $$;
    CREATE TABLE events (
        seq bigserial PRIMARY KEY,
        at bigint NOT NULL,
        origin text NOT NULL,
        kind text NOT NULL,
        key text NOT NULL
    );
    CREATE INDEX events_by_age ON events (at);
    CREATE TABLE leases (
        name text PRIMARY KEY,
        holder text NOT NULL,
        fence bigint NOT NULL,
        expires_at bigint NOT NULL
    );
    ALTER TABLE heartbeats
        ADD COLUMN flushed_at bigint NOT NULL DEFAULT 0,
        ADD COLUMN flushed_by text NOT NULL DEFAULT '';
    CREATE INDEX heartbeats_by_flush ON heartbeats (flushed_at);
    ",
    ),
    (
        5,
        "
    CREATE TABLE blob_chunks (
        sha256 text NOT NULL,
        seq integer NOT NULL,
        data bytea NOT NULL,
        PRIMARY KEY (sha256, seq)
    );
    CREATE TABLE blobs (sha256 text PRIMARY KEY, size bigint NOT NULL);
    ",
    ),
];

/// The schema version this server writes.
pub(super) fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |(version, _)| *version)
}

/// Serializes schema changes across servers (any constant, the same in
/// every version of the server: "stella" in ASCII).
const MIGRATION_LOCK: i64 = 0x7374_656c_6c61;

/// What `migrate` found and did.
#[derive(Debug, Clone, Copy)]
pub(super) struct Migrated {
    pub(super) from: i32,
    pub(super) to: i32,
}

/// Brings the schema up to [`latest`], or refuses a newer one; all in one
/// transaction holding the migration lock.
pub(super) async fn migrate(client: &mut Client, shown: &str) -> Result<Migrated, StoreError> {
    let txn = client
        .transaction()
        .await
        .map_err(pg("begin the migration"))?;
    txn.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg("take the migration lock"))?;
    txn.batch_execute(
        "CREATE TABLE IF NOT EXISTS stella_schema (
            version integer PRIMARY KEY,
            applied_at timestamptz NOT NULL DEFAULT now()
        )",
    )
    .await
    .map_err(pg("create the schema table"))?;
    let found: i32 = txn
        .query_one("SELECT coalesce(max(version), 0) FROM stella_schema", &[])
        .await
        .map_err(pg("read the schema version"))?
        .get(0);
    let want = latest();
    if found > want {
        return Err(StoreError::SchemaTooNew {
            store: shown.to_owned(),
            found: i64::from(found),
            known: i64::from(want),
        });
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
        txn.batch_execute(sql)
            .await
            .map_err(pg("apply a schema migration"))?;
        txn.execute(
            "INSERT INTO stella_schema (version) VALUES ($1)",
            &[version],
        )
        .await
        .map_err(pg("record a schema migration"))?;
    }
    txn.commit()
        .await
        .map_err(pg("commit the schema migration"))?;
    Ok(Migrated {
        from: found,
        to: want,
    })
}
