//! Desired configuration: versioned documents at three scopes (global,
//! `label:K=V`, `agent:ID`), merged in that order into each agent's effective
//! configuration, whose canonical hash the heartbeat compares with what the
//! agent applied. Also the drift report. Pure: `app` stores and applies.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use miniserde::json::Value;
use stella_proto::api::{ConfigScopeView, ConfigShowResponse, DriftRow};
use stella_proto::config;
use stella_proto::time::rfc3339;

use crate::records::{AgentRecord, AgentStatus, ConfigRecord, HeartbeatState};
use crate::refusal::Refusal;
use crate::store::StoreError;

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
    pub(crate) fn parse(s: &str) -> Result<Self, Refusal> {
        if s == "global" {
            return Ok(Scope::Global);
        }
        if let Some((k, v)) = s.strip_prefix("label:").and_then(|kv| kv.split_once('=')) {
            let mut one = stella_proto::api::Labels::new();
            one.insert(k.to_owned(), v.to_owned());
            crate::tokens::check_labels(&one).map_err(Refusal::bad_request)?;
            return Ok(Scope::Label(k.to_owned(), v.to_owned()));
        }
        if let Some(id) = s.strip_prefix("agent:")
            && stella_proto::id::is_agent_id(id)
        {
            return Ok(Scope::Agent(id.to_owned()));
        }
        Err(Refusal::bad_request(format!(
            "scope {s:?} must be global, label:KEY=VALUE or agent:AGENT_ID"
        )))
    }

    pub(crate) fn name(&self) -> String {
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
    pub(crate) fn load(records: Vec<ConfigRecord>) -> Result<Self, StoreError> {
        let mut configs = Self::default();
        for record in records {
            let corrupt = || StoreError::Corrupt {
                what: "config",
                key: record.scope.clone(),
            };
            let scope = Scope::parse(&record.scope).map_err(|_| corrupt())?;
            let doc = config::parse(&record.doc).ok_or_else(corrupt)?;
            configs.scopes.insert(scope, (record, doc));
        }
        Ok(configs)
    }

    /// Puts a newly stored version of a scope in place (then refresh every
    /// agent's desired configuration).
    pub(crate) fn insert(&mut self, scope: Scope, record: ConfigRecord, doc: Value) {
        self.scopes.insert(scope, (record, doc));
    }

    /// Forgets the effective documents computed so far.
    pub(crate) fn clear_cache(&mut self) {
        self.cache.clear();
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

    pub(crate) fn views<'a>(
        entries: impl Iterator<Item = &'a (ConfigRecord, Value)>,
    ) -> Vec<ConfigScopeView> {
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

/// A `config set` that passed its checks: the scope, the canonical
/// document and its hash.
#[derive(Debug)]
pub(crate) struct CheckedConfig {
    pub(crate) scope: Scope,
    pub(crate) canonical: String,
    pub(crate) hash: String,
}

/// Checks a scope and document for `config set`.
pub(crate) fn check(scope: &str, doc: &Value) -> Result<CheckedConfig, Refusal> {
    let scope = Scope::parse(scope)?;
    if !matches!(doc, Value::Object(_)) {
        return Err(Refusal::bad_request(
            "the configuration must be a JSON object",
        ));
    }
    let canonical = config::canonical(doc);
    // miniserde does not read every float back as the same number (1.3e-221
    // comes back as 1.2999999999999999e-221, and that as 1.3e-221): an agent
    // would hash such a document differently, refuse it under another hash,
    // and be sent it again with every heartbeat.
    let reread = config::parse(&canonical).map(|again| config::canonical(&again));
    if reread.as_deref() != Some(canonical.as_str()) {
        return Err(Refusal::bad_request(
            "the configuration holds a number that does not read back as itself \
             (some fractions and integers past 64 bits do not): write it as a string",
        ));
    }
    if canonical.len() > MAX_DOC_BYTES {
        return Err(Refusal::bad_request(format!(
            "the configuration is {} bytes, over the limit of {MAX_DOC_BYTES}",
            canonical.len()
        )));
    }
    Ok(CheckedConfig {
        scope,
        hash: config::hash(doc),
        canonical,
    })
}

/// The admin view of one stored scope.
pub(crate) fn scope_view(record: &ConfigRecord) -> ConfigScopeView {
    ConfigScopeView {
        scope: record.scope.clone(),
        version: record.version,
        hash: record.hash.clone(),
        updated_at: rfc3339(record.updated_at),
    }
}

/// `config show --agent ID`: the agent's effective configuration and the
/// scopes it is made of.
pub(crate) fn show_agent(
    configs: &Configs,
    record: &AgentRecord,
    desired: &Desired,
) -> ConfigShowResponse {
    ConfigShowResponse {
        agent: Some(record.id.clone()),
        hash: desired.hash.clone(),
        config: desired.doc.clone(),
        scopes: Configs::views(configs.applicable(record)),
    }
}

/// `config show`: the global configuration and every scope.
pub(crate) fn show_global(configs: &Configs) -> ConfigShowResponse {
    let global = configs
        .scopes
        .get(&Scope::Global)
        .map(|(_, d)| d.clone())
        .unwrap_or_else(config::empty);
    ConfigShowResponse {
        agent: None,
        hash: config::hash(&global),
        config: global,
        scopes: Configs::views(configs.scopes.values()),
    }
}

/// One line of `drift`, if the agent (not revoked) runs another configuration
/// than `desired` or edited its file on disk.
pub(crate) fn drift_row(
    record: &AgentRecord,
    hb: &HeartbeatState,
    desired: &Desired,
) -> Option<DriftRow> {
    if record.status == AgentStatus::Revoked || (hb.config_hash == desired.hash && !hb.config_drift)
    {
        return None;
    }
    Some(DriftRow {
        agent: record.id.clone(),
        name: record.name.clone(),
        desired_hash: desired.hash.clone(),
        applied_hash: (!hb.config_hash.is_empty()).then(|| hb.config_hash.clone()),
        local_drift: hb.config_drift,
        since: (hb.drift_since_ms != 0).then(|| rfc3339(hb.drift_since_ms / 1000)),
        error: hb
            .config_error
            .as_ref()
            .filter(|e| e.hash == desired.hash)
            .map(|e| e.error.clone()),
    })
}

/// Orders drift lines by agent name, then id.
pub(crate) fn sort_drift(rows: &mut [DriftRow]) {
    rows.sort_by(|a, b| (&a.name, &a.agent).cmp(&(&b.name, &b.agent)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use miniserde::json;

    fn doc(text: &str) -> Value {
        config::parse(text).expect("JSON")
    }

    #[test]
    fn scopes_and_documents_are_checked() {
        assert_eq!(Scope::parse("global"), Ok(Scope::Global));
        assert_eq!(
            Scope::parse("label:env=prod"),
            Ok(Scope::Label("env".into(), "prod".into()))
        );
        for bad in ["", "globals", "label:env", "label:a b=c", "agent:nope"] {
            assert_eq!(Scope::parse(bad).unwrap_err().status(), 400, "{bad:?}");
        }
        let ok = check("global", &doc(r#"{"b":1,"a":"x"}"#)).unwrap();
        assert_eq!(ok.canonical, r#"{"a":"x","b":1}"#);
        assert_eq!(ok.hash, config::hash(&doc(r#"{"a":"x","b":1}"#)));
        assert!(check("global", &doc("[1]")).is_err(), "not an object");
        assert!(
            check("global", &doc(r#"{"f":1.3e-221}"#)).is_err(),
            "a float that moves"
        );
        let big = format!(r#"{{"a":"{}"}}"#, "x".repeat(MAX_DOC_BYTES));
        assert!(check("global", &doc(&big)).is_err(), "too large");
    }

    #[test]
    fn scopes_merge_widest_first_and_drift_is_reported() {
        let record = |scope: &str, text: &str| ConfigRecord {
            scope: scope.into(),
            version: 1,
            doc: text.into(),
            hash: String::new(),
            updated_at: 0,
        };
        let mut configs = Configs::load(vec![
            record("global", r#"{"a":1,"b":1}"#),
            record("label:env=prod", r#"{"b":2}"#),
        ])
        .unwrap();
        let agent: AgentRecord = json::from_str(
            r#"{"id":"agt_a","name":"n","status":"active","reason":null,"labels":{"env":"prod"},"platform":{"os":"","arch":"","target":""},"version":"1","capabilities":[],"enrolled_at":0,"token_id":"t","key_sha256":"k","cert_serial":"s","cert_not_after":0,"previous_serial":null,"renew_requested":false,"update_offer":null}"#,
        )
        .expect("agent record");
        let desired = configs.desired(&agent);
        assert_eq!(config::canonical(&desired.doc), r#"{"a":1,"b":2}"#);
        let mut hb = HeartbeatState {
            config_hash: desired.hash.clone(),
            ..HeartbeatState::default()
        };
        assert!(drift_row(&agent, &hb, &desired).is_none(), "in sync");
        hb.config_drift = true;
        assert!(drift_row(&agent, &hb, &desired).unwrap().local_drift);
        hb.config_drift = false;
        hb.config_hash = "other".into();
        let row = drift_row(&agent, &hb, &desired).unwrap();
        assert_eq!(row.applied_hash.as_deref(), Some("other"));
    }
}
