//! Desired configuration: versioned documents at three scopes (global,
//! `label:K=V`, `agent:ID`), merged in that order into each agent's effective
//! configuration, whose canonical hash the heartbeat compares with what the
//! agent applied. Also the drift report.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use miniserde::json::Value;
use stella_proto::api::{ConfigScopeView, ConfigShowResponse, DriftRow};
use stella_proto::config;
use stella_proto::time::rfc3339;

use crate::app::{App, lock, now_ms, now_secs};
use crate::error::Error;
use crate::lifecycle::Fleet;
use crate::log;
use crate::records::{AgentRecord, ConfigRecord};

/// Largest configuration document accepted per scope (canonical bytes).
const MAX_DOC_BYTES: usize = 32 * 1024;

/// What one agent should run.
#[derive(Debug)]
pub(crate) struct Desired {
    pub(crate) hash: String,
    pub(crate) doc: Value,
    /// The `heartbeat_interval` the document sets, if valid.
    pub(crate) heartbeat_interval: Option<Duration>,
}

/// A parsed scope name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Scope {
    Global,
    Label(String, String),
    Agent(String),
}

impl Scope {
    pub(crate) fn parse(s: &str) -> Result<Self, Error> {
        if s == "global" {
            return Ok(Scope::Global);
        }
        if let Some((k, v)) = s.strip_prefix("label:").and_then(|kv| kv.split_once('=')) {
            let mut one = stella_proto::api::Labels::new();
            one.insert(k.to_owned(), v.to_owned());
            crate::tokens::check_labels(&one).map_err(Error::Invalid)?;
            return Ok(Scope::Label(k.to_owned(), v.to_owned()));
        }
        if let Some(id) = s.strip_prefix("agent:")
            && stella_proto::id::is_agent_id(id)
        {
            return Ok(Scope::Agent(id.to_owned()));
        }
        Err(Error::Invalid(format!(
            "scope {s:?} must be global, label:KEY=VALUE or agent:AGENT_ID"
        )))
    }

    fn name(&self) -> String {
        match self {
            Scope::Global => "global".into(),
            Scope::Label(k, v) => format!("label:{k}={v}"),
            Scope::Agent(id) => format!("agent:{id}"),
        }
    }
}

/// Every scope's current document.
#[derive(Debug, Default)]
pub(crate) struct Configs {
    scopes: BTreeMap<Scope, (ConfigRecord, Value)>,
    /// Effective documents shared by hash (most agents share a few).
    cache: BTreeMap<String, Arc<Desired>>,
}

impl Configs {
    pub(crate) fn load(records: Vec<ConfigRecord>) -> Result<Self, Error> {
        let mut configs = Self::default();
        for record in records {
            let scope = Scope::parse(&record.scope)?;
            let doc = config::parse(&record.doc).ok_or_else(|| {
                Error::Store(format!("stored config of {} is not JSON", record.scope))
            })?;
            configs.scopes.insert(scope, (record, doc));
        }
        Ok(configs)
    }

    /// The scopes that apply to an agent, widest first.
    fn applicable<'a>(
        &'a self,
        agent: &'a AgentRecord,
    ) -> impl Iterator<Item = &'a (ConfigRecord, Value)> + 'a {
        self.scopes.iter().filter_map(move |(scope, entry)| {
            let applies = match scope {
                Scope::Global => true,
                Scope::Label(k, v) => agent.labels.get(k) == Some(v),
                Scope::Agent(id) => *id == agent.id,
            };
            applies.then_some(entry)
        })
    }

    /// The effective configuration of an agent.
    pub(crate) fn desired(&mut self, agent: &AgentRecord) -> Arc<Desired> {
        let doc = config::merge(self.applicable(agent).map(|(_, doc)| doc));
        let hash = config::hash(&doc);
        if let Some(d) = self.cache.get(&hash) {
            return d.clone();
        }
        let heartbeat_interval = config::parse_settings(&doc)
            .ok()
            .and_then(|s| s.heartbeat_interval);
        let desired = Arc::new(Desired {
            hash: hash.clone(),
            doc,
            heartbeat_interval,
        });
        self.cache.insert(hash, desired.clone());
        desired
    }

    fn views<'a>(entries: impl Iterator<Item = &'a (ConfigRecord, Value)>) -> Vec<ConfigScopeView> {
        entries
            .map(|(r, _)| ConfigScopeView {
                scope: r.scope.clone(),
                version: r.version,
                hash: r.hash.clone(),
                updated_at: rfc3339(r.updated_at),
            })
            .collect()
    }
}

/// Recomputes every agent's desired configuration (after a change).
pub(crate) fn refresh_all(configs: &mut Configs, fleet: &mut Fleet) {
    configs.cache.clear();
    let now = now_ms();
    for live in fleet.agents.values_mut() {
        live.desired = configs.desired(&live.record);
        if live.hb.config_hash != live.desired.hash && live.hb.drift_since_ms == 0 {
            live.hb.drift_since_ms = now;
        }
    }
}

/// `config set`: validates the scope and document, stores a new version, and
/// recomputes what every agent should run. Blocking.
pub(crate) fn set(app: &App, scope: &str, doc: &Value) -> Result<ConfigScopeView, Error> {
    let parsed = Scope::parse(scope)?;
    if !matches!(doc, Value::Object(_)) {
        return Err(Error::Invalid(
            "the configuration must be a JSON object".into(),
        ));
    }
    let canonical = config::canonical(doc);
    // miniserde does not read every float back as the same number (1.3e-221
    // comes back as 1.2999999999999999e-221, and that as 1.3e-221): an agent
    // would hash such a document differently, refuse it under another hash,
    // and be sent it again with every heartbeat.
    let reread = config::parse(&canonical).map(|again| config::canonical(&again));
    if reread.as_deref() != Some(canonical.as_str()) {
        return Err(Error::Invalid(
            "the configuration holds a number that does not read back as itself \
             (some fractions and integers past 64 bits do not): write it as a string"
                .into(),
        ));
    }
    if canonical.len() > MAX_DOC_BYTES {
        return Err(Error::Invalid(format!(
            "the configuration is {} bytes, over the limit of {MAX_DOC_BYTES}",
            canonical.len()
        )));
    }
    if let Scope::Agent(id) = &parsed
        && !lock(&app.fleet).agents.contains_key(id)
    {
        return Err(Error::NotFound(format!("no agent with id {id}")));
    }
    let hash = config::hash(doc);
    let _serial = lock(&app.lifecycle_lock);
    let record = app
        .store
        .set_config(&parsed.name(), &canonical, &hash, now_secs())?;
    let view = ConfigScopeView {
        scope: record.scope.clone(),
        version: record.version,
        hash: record.hash.clone(),
        updated_at: rfc3339(record.updated_at),
    };
    let mut configs = lock(&app.configs);
    configs.scopes.insert(parsed, (record, doc.clone()));
    refresh_all(&mut configs, &mut lock(&app.fleet));
    log::info(
        "config set",
        &[
            ("scope", &view.scope),
            ("version", &view.version),
            ("hash", &view.hash),
        ],
    );
    Ok(view)
}

/// `config show`: the effective configuration of one agent, or the global one
/// and the list of every scope.
pub(crate) fn show(app: &App, agent: Option<&str>) -> Result<ConfigShowResponse, Error> {
    let configs = lock(&app.configs);
    match agent {
        Some(id) => {
            let fleet = lock(&app.fleet);
            let live = fleet
                .agents
                .get(id)
                .ok_or_else(|| Error::NotFound(format!("no agent with id {id}")))?;
            Ok(ConfigShowResponse {
                agent: Some(id.to_owned()),
                hash: live.desired.hash.clone(),
                config: live.desired.doc.clone(),
                scopes: Configs::views(configs.applicable(&live.record)),
            })
        }
        None => {
            let global = configs
                .scopes
                .get(&Scope::Global)
                .map(|(_, d)| d.clone())
                .unwrap_or_else(config::empty);
            Ok(ConfigShowResponse {
                agent: None,
                hash: config::hash(&global),
                config: global,
                scopes: Configs::views(configs.scopes.values()),
            })
        }
    }
}

/// `drift`: agents whose applied configuration differs from the desired one,
/// or whose file on disk was edited, with since when.
pub(crate) fn drift(app: &App) -> Vec<DriftRow> {
    let fleet = lock(&app.fleet);
    let mut rows: Vec<DriftRow> = fleet
        .agents
        .values()
        .filter(|a| a.record.status != crate::records::REVOKED)
        .filter(|a| a.hb.config_hash != a.desired.hash || a.hb.config_drift)
        .map(|a| DriftRow {
            agent: a.record.id.clone(),
            name: a.record.name.clone(),
            desired_hash: a.desired.hash.clone(),
            applied_hash: (!a.hb.config_hash.is_empty()).then(|| a.hb.config_hash.clone()),
            local_drift: a.hb.config_drift,
            since: (a.hb.drift_since_ms != 0).then(|| rfc3339(a.hb.drift_since_ms / 1000)),
            error: a
                .hb
                .config_error
                .as_ref()
                .filter(|e| e.hash == a.desired.hash)
                .map(|e| e.error.clone()),
        })
        .collect();
    rows.sort_by(|a, b| (&a.name, &a.agent).cmp(&(&b.name, &b.agent)));
    rows
}
