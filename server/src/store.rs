//! The store: every durable fact of the server, in one redb file, behind a
//! narrow interface (agents, tokens, certificates, enrollments, audit log), so
//! that another backend could replace it without touching the API code.
//!
//! Enrollment, token use and lifecycle changes commit durably before the API
//! answers; heartbeat soft state is written in batches (`save_heartbeats`).

use std::path::Path;

use miniserde::{Deserialize, Serialize, json};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::error::Error;
use crate::records::{
    AgentRecord, AuditRecord, CertRecord, ConfigRecord, EnrollmentRecord, HeartbeatState,
    ReleaseRecord, TokenRecord,
};

const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
const HEARTBEATS: TableDefinition<&str, &[u8]> = TableDefinition::new("heartbeats");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const CERTS: TableDefinition<&str, &[u8]> = TableDefinition::new("certs");
/// Key: `<token id>/<hex sha256 of the public key>`.
const ENROLLMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("enrollments");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
/// Key: rollout id; value: the rollout's JSON (see `rollout::RolloutRecord`).
const ROLLOUTS: TableDefinition<&str, &[u8]> = TableDefinition::new("rollouts");
/// Key: release version.
const RELEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("releases");
/// Key: scope (`global`, `label:K=V`, `agent:ID`).
const CONFIGS: TableDefinition<&str, &[u8]> = TableDefinition::new("configs");

/// redb's page cache (its default is 1 GiB).
const STORE_CACHE_BYTES: usize = 32 * 1024 * 1024;
const SCHEMA_VERSION: &str = "1";
const ADMIN_HASH_KEY: &str = "admin_token_sha256";

/// Handle on the redb file.
pub(crate) struct Store {
    db: Database,
}

/// Outcome of an enrollment attempt, decided inside one write transaction.
pub(crate) enum Enrollment {
    /// A new agent was recorded and the token use consumed.
    Created,
    /// The same token and key enrolled recently: the earlier answer stands.
    Existing(Box<(AgentRecord, CertRecord)>),
}

/// Why an enrollment was refused (nothing was written).
#[derive(Debug)]
pub(crate) enum EnrollRefusal {
    UnknownToken(String),
    WrongSecret(String),
    Expired(String, u64),
    UsedUp(String),
    Revoked(String),
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    json::to_string(value).into_bytes()
}

fn decode<T: Deserialize>(what: &str, bytes: &[u8]) -> Result<T, Error> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| json::from_str(s).ok())
        .ok_or_else(|| Error::Store(format!("corrupt {what} record in the store")))
}

impl Store {
    /// Creates a new store file with the admin token's hash.
    pub(crate) fn create(path: &Path, admin_sha256: &str) -> Result<Self, Error> {
        let db = Database::create(path).map_err(|e| Error::store(path, e))?;
        // It holds token and admin hashes: owner only.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(format!("cannot restrict {}", path.display()), e))?;
        let store = Self { db };
        let txn = store.db.begin_write()?;
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
        Ok(store)
    }

    /// Opens an existing store file (exclusively: one server per data dir).
    pub(crate) fn open(path: &Path) -> Result<Self, Error> {
        if !path.exists() {
            return Err(Error::Invalid(format!(
                "{} does not exist: run `stella-server init` first",
                path.display()
            )));
        }
        // redb's read cache defaults to 1 GiB and keeps every page that
        // load_agents read at start: about 0.9 KiB per agent. 32 MiB holds
        // the hot pages; heartbeats and admin reads come from memory anyway.
        let db = Database::builder()
            .set_cache_size(STORE_CACHE_BYTES)
            .open(path)
            .map_err(|e| Error::store(path, e))?;
        let store = Self { db };
        let schema = store.meta("schema")?;
        if schema.as_deref() != Some(SCHEMA_VERSION) {
            return Err(Error::Store(format!(
                "{} has schema {:?}, this server reads schema {SCHEMA_VERSION}",
                path.display(),
                schema
            )));
        }
        Ok(store)
    }

    fn meta(&self, key: &str) -> Result<Option<String>, Error> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(META)?;
        Ok(table.get(key)?.map(|v| v.value().to_owned()))
    }

    /// Hex SHA-256 of the admin token.
    pub(crate) fn admin_token_sha256(&self) -> Result<String, Error> {
        self.meta(ADMIN_HASH_KEY)?
            .ok_or_else(|| Error::Store("the store has no admin token hash".into()))
    }

    /// Every agent with its last saved heartbeat state, one at a time.
    pub(crate) fn load_agents(
        &self,
        mut each: impl FnMut(AgentRecord, HeartbeatState),
    ) -> Result<(), Error> {
        let txn = self.db.begin_read()?;
        let agents = txn.open_table(AGENTS)?;
        let heartbeats = txn.open_table(HEARTBEATS)?;
        for row in agents.iter()? {
            let (key, value) = row?;
            let record: AgentRecord = decode("agent", value.value())?;
            let hb = match heartbeats.get(key.value())? {
                Some(v) => decode("heartbeat", v.value())?,
                None => <HeartbeatState as Default>::default(),
            };
            each(record, hb);
        }
        Ok(())
    }

    /// Records a new token.
    pub(crate) fn insert_token(&self, token: &TokenRecord) -> Result<(), Error> {
        let txn = self.db.begin_write()?;
        {
            let mut tokens = txn.open_table(TOKENS)?;
            if tokens.get(token.id.as_str())?.is_some() {
                return Err(Error::Invalid(format!(
                    "token id {} exists already",
                    token.id
                )));
            }
            tokens.insert(token.id.as_str(), encode(token).as_slice())?;
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
        txn.commit()?;
        Ok(())
    }

    /// Consumes one use of a token and records the agent and its certificate,
    /// all in one durable transaction; or returns the earlier registration of
    /// the same token and key within the retry window; or refuses, writing
    /// nothing.
    pub(crate) fn enroll(
        &self,
        token: &stella_proto::RegistrationToken,
        now: u64,
        agent: &mut AgentRecord,
        cert: &CertRecord,
    ) -> Result<Result<Enrollment, EnrollRefusal>, Error> {
        let txn = self.db.begin_write()?;
        let enrollment_key = format!("{}/{}", token.id(), agent.key_sha256);
        {
            let mut tokens = txn.open_table(TOKENS)?;
            let Some(stored) = tokens.get(token.id())? else {
                return Ok(Err(EnrollRefusal::UnknownToken(token.id().to_owned())));
            };
            let mut record: TokenRecord = decode("token", stored.value())?;
            drop(stored);
            let hash_ok = stella_proto::hash::unhex(&record.secret_sha256)
                .is_some_and(|h| token.matches_hash(&h));
            if !hash_ok {
                return Ok(Err(EnrollRefusal::WrongSecret(record.id)));
            }
            let enrollments = txn.open_table(ENROLLMENTS)?;
            if let Some(prior) = enrollments.get(enrollment_key.as_str())? {
                let prior: EnrollmentRecord = decode("enrollment", prior.value())?;
                if now.saturating_sub(prior.at) <= stella_proto::ENROLL_RETRY_WINDOW_SECS {
                    let agents = txn.open_table(AGENTS)?;
                    let certs = txn.open_table(CERTS)?;
                    let existing: AgentRecord = match agents.get(prior.agent_id.as_str())? {
                        Some(v) => decode("agent", v.value())?,
                        None => {
                            return Err(Error::Store(format!(
                                "enrollment names missing agent {}",
                                prior.agent_id
                            )));
                        }
                    };
                    if existing.status == crate::records::REVOKED {
                        return Ok(Err(EnrollRefusal::Revoked(existing.id)));
                    }
                    let cert: CertRecord = match certs.get(existing.cert_serial.as_str())? {
                        Some(v) => decode("certificate", v.value())?,
                        None => {
                            return Err(Error::Store(format!(
                                "agent {} has no certificate record",
                                existing.id
                            )));
                        }
                    };
                    return Ok(Ok(Enrollment::Existing(Box::new((existing, cert)))));
                }
            }
            drop(enrollments);
            if now >= record.expires_at {
                return Ok(Err(EnrollRefusal::Expired(record.id, record.expires_at)));
            }
            if record.uses_left == 0 {
                return Ok(Err(EnrollRefusal::UsedUp(record.id)));
            }
            record.uses_left -= 1;
            tokens.insert(token.id(), encode(&record).as_slice())?;
            // The token's labels are the administrator's: they win over the agent's.
            for (k, v) in &record.labels {
                agent.labels.insert(k.clone(), v.clone());
            }

            let mut agents = txn.open_table(AGENTS)?;
            agents.insert(agent.id.as_str(), encode(agent).as_slice())?;
            let mut certs = txn.open_table(CERTS)?;
            certs.insert(cert.serial.as_str(), encode(cert).as_slice())?;
            let mut enrollments = txn.open_table(ENROLLMENTS)?;
            let marker = EnrollmentRecord {
                agent_id: agent.id.clone(),
                at: now,
            };
            enrollments.insert(enrollment_key.as_str(), encode(&marker).as_slice())?;
            append_audit(
                &txn,
                now,
                "agent.enroll",
                &agent.id,
                &format!(
                    "token={} name={} serial={}",
                    token.id(),
                    agent.name,
                    cert.serial
                ),
            )?;
        }
        txn.commit()?;
        Ok(Ok(Enrollment::Created))
    }

    /// Applies `change` to each named agent record in one durable transaction,
    /// with an audit line per changed agent; returns the records written.
    /// `change` returns `Ok(false)` to leave a record as it is.
    pub(crate) fn update_agents<F>(
        &self,
        ids: &[&str],
        now: u64,
        action: &str,
        mut change: F,
    ) -> Result<Vec<AgentRecord>, Error>
    where
        F: FnMut(&mut AgentRecord) -> Result<bool, Error>,
    {
        let txn = self.db.begin_write()?;
        let mut written = Vec::new();
        {
            let mut agents = txn.open_table(AGENTS)?;
            for id in ids {
                let Some(stored) = agents.get(*id)? else {
                    return Err(Error::NotFound(format!("no agent with id {id}")));
                };
                let mut record: AgentRecord = decode("agent", stored.value())?;
                drop(stored);
                let before = format!(
                    "{}/{}",
                    record.status,
                    record.reason.as_deref().unwrap_or("-")
                );
                if change(&mut record)? {
                    agents.insert(*id, encode(&record).as_slice())?;
                    let after = format!(
                        "{}/{}",
                        record.status,
                        record.reason.as_deref().unwrap_or("-")
                    );
                    append_audit(&txn, now, action, id, &format!("{before} -> {after}"))?;
                    written.push(record);
                }
            }
        }
        if written.is_empty() {
            txn.abort()?;
        } else {
            txn.commit()?;
        }
        Ok(written)
    }

    /// A certificate by serial.
    pub(crate) fn cert(&self, serial: &str) -> Result<Option<CertRecord>, Error> {
        let txn = self.db.begin_read()?;
        let certs = txn.open_table(CERTS)?;
        certs
            .get(serial)?
            .map(|v| decode("certificate", v.value()))
            .transpose()
    }

    /// Records a new certificate for an agent that proved it holds the one
    /// with serial `presented` (current or previous). The presented one stays
    /// accepted as `previous` until the new one is used; anything older is
    /// retired. `check` may refuse (nothing is written then).
    pub(crate) fn replace_certificate(
        &self,
        agent_id: &str,
        presented: &str,
        cert: &CertRecord,
        key_sha256: &str,
        check: impl FnOnce(&AgentRecord) -> Result<(), Error>,
    ) -> Result<AgentRecord, Error> {
        let txn = self.db.begin_write()?;
        let record = {
            let mut agents = txn.open_table(AGENTS)?;
            let Some(stored) = agents.get(agent_id)? else {
                return Err(Error::NotFound(format!("no agent with id {agent_id}")));
            };
            let mut record: AgentRecord = decode("agent", stored.value())?;
            drop(stored);
            if !record.accepts_serial(presented) {
                return Err(Error::Conflict(format!(
                    "certificate {presented} of agent {agent_id} has been superseded or revoked"
                )));
            }
            check(&record)?;
            let retired = record.cert_serial.clone();
            record.previous_serial = Some(presented.to_owned());
            record.cert_serial = cert.serial.clone();
            record.cert_not_after = cert.not_after;
            record.key_sha256 = key_sha256.to_owned();
            record.renew_requested = false;
            agents.insert(agent_id, encode(&record).as_slice())?;
            let mut certs = txn.open_table(CERTS)?;
            certs.insert(cert.serial.as_str(), encode(cert).as_slice())?;
            append_audit(
                &txn,
                cert.issued_at,
                "agent.certificate",
                agent_id,
                &format!(
                    "serial={} replaces={} retired={}",
                    cert.serial,
                    presented,
                    if retired == presented {
                        "-"
                    } else {
                        retired.as_str()
                    }
                ),
            )?;
            record
        };
        txn.commit()?;
        Ok(record)
    }

    /// Every rollout.
    pub(crate) fn rollouts(&self) -> Result<Vec<crate::rollout::RolloutRecord>, Error> {
        self.all(ROLLOUTS, "rollout")
    }

    /// Writes a rollout's new state durably, with an audit line.
    pub(crate) fn put_rollout(
        &self,
        id: &str,
        json: &str,
        action: &str,
        detail: &str,
    ) -> Result<(), Error> {
        let txn = self.db.begin_write()?;
        {
            let mut rollouts = txn.open_table(ROLLOUTS)?;
            rollouts.insert(id, json.as_bytes())?;
            append_audit(&txn, crate::app::now_secs(), action, id, detail)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Every imported release.
    pub(crate) fn releases(&self) -> Result<Vec<ReleaseRecord>, Error> {
        self.all(RELEASES, "release")
    }

    /// Records an imported release; the same version may only be imported
    /// again with the same envelope.
    pub(crate) fn insert_release(&self, release: &ReleaseRecord) -> Result<bool, Error> {
        let txn = self.db.begin_write()?;
        {
            let mut releases = txn.open_table(RELEASES)?;
            if let Some(existing) = releases.get(release.version.as_str())? {
                let existing: ReleaseRecord = decode("release", existing.value())?;
                if existing.envelope == release.envelope {
                    return Ok(false);
                }
                return Err(Error::Conflict(format!(
                    "release {} was imported before with a different envelope",
                    release.version
                )));
            }
            releases.insert(release.version.as_str(), encode(release).as_slice())?;
            append_audit(
                &txn,
                release.imported_at,
                "release.import",
                &release.version,
                &format!("files={}", release.files.len()),
            )?;
        }
        txn.commit()?;
        Ok(true)
    }

    /// Every stored configuration scope.
    pub(crate) fn load_configs(&self) -> Result<Vec<ConfigRecord>, Error> {
        self.all(CONFIGS, "config")
    }

    /// Every value of a table, decoded, in key order (read-only: `create`
    /// made every table).
    fn all<T: Deserialize>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        what: &str,
    ) -> Result<Vec<T>, Error> {
        let txn = self.db.begin_read()?;
        let rows = txn.open_table(table)?;
        let mut out = Vec::new();
        for row in rows.iter()? {
            let (_, v) = row?;
            out.push(decode(what, v.value())?);
        }
        Ok(out)
    }

    /// Stores a new version of one scope's configuration, durably.
    pub(crate) fn set_config(
        &self,
        scope: &str,
        doc: &str,
        hash: &str,
        now: u64,
    ) -> Result<ConfigRecord, Error> {
        let txn = self.db.begin_write()?;
        let record = {
            let mut configs = txn.open_table(CONFIGS)?;
            let version = match configs.get(scope)? {
                Some(v) => decode::<ConfigRecord>("config", v.value())?.version + 1,
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
                &format!("version={version} hash={hash}"),
            )?;
            record
        };
        txn.commit()?;
        Ok(record)
    }

    /// Writes a batch of heartbeat states (one commit for the whole batch).
    pub(crate) fn save_heartbeats(&self, batch: &[(String, HeartbeatState)]) -> Result<(), Error> {
        if batch.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(HEARTBEATS)?;
            for (id, state) in batch {
                table.insert(id.as_str(), encode(state).as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }
}

fn append_audit(
    txn: &redb::WriteTransaction,
    at: u64,
    action: &str,
    subject: &str,
    detail: &str,
) -> Result<(), Error> {
    let mut audit = txn.open_table(AUDIT)?;
    let next = audit.last()?.map_or(0, |(k, _)| k.value() + 1);
    let line = AuditRecord {
        at,
        action: action.to_owned(),
        subject: subject.to_owned(),
        detail: detail.to_owned(),
    };
    audit.insert(next, encode(&line).as_slice())?;
    Ok(())
}
