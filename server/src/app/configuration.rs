//! Configuration at run time: `config set` (checked by `config`, stored
//! durably, then every agent's desired document recomputed), `config show`
//! and the drift report, from memory.

use miniserde::json::Value;
use stella_proto::api::{ConfigScopeView, ConfigShowResponse, DriftRow};

use super::{App, lock, now_ms, now_secs};
use crate::config::{self, Scope};
use crate::error::Error;
use crate::log;
use crate::refusal::Refusal;

impl App {
    /// `config set`: stores a new version of one scope. Blocking.
    pub(crate) fn set_config(&self, scope: &str, doc: &Value) -> Result<ConfigScopeView, Error> {
        let checked = config::check(scope, doc)?;
        if let Scope::Agent(id) = &checked.scope
            && !lock(&self.fleet).agents.contains_key(id)
        {
            return Err(Refusal::not_found(format!("no agent with id {id}")).into());
        }
        let _serial = lock(&self.lifecycle_lock);
        let record = self.store.set_config(
            &checked.scope.name(),
            &checked.canonical,
            &checked.hash,
            now_secs(),
        )?;
        let view = config::scope_view(&record);
        let mut configs = lock(&self.configs);
        configs.insert(checked.scope, record, doc.clone());
        lock(&self.fleet).refresh_desired(&mut configs, now_ms());
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

    /// `config show [--agent ID]`.
    pub(crate) fn show_config(&self, agent: Option<&str>) -> Result<ConfigShowResponse, Refusal> {
        let configs = lock(&self.configs);
        match agent {
            Some(id) => {
                let fleet = lock(&self.fleet);
                let live = fleet
                    .agents
                    .get(id)
                    .ok_or_else(|| Refusal::not_found(format!("no agent with id {id}")))?;
                Ok(config::show_agent(&configs, &live.record, &live.desired))
            }
            None => Ok(config::show_global(&configs)),
        }
    }

    /// `drift`: agents out of step with their desired configuration.
    pub(crate) fn drift(&self) -> Vec<DriftRow> {
        let fleet = lock(&self.fleet);
        let mut rows: Vec<DriftRow> = fleet
            .agents
            .values()
            .filter_map(|a| config::drift_row(&a.record, &a.hb, &a.desired))
            .collect();
        config::sort_drift(&mut rows);
        rows
    }
}
