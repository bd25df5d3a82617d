//! Doctor on demand (docs/design.md section 8): an administrator asks one
//! agent or a selection for a full doctor report (durably, in the agent
//! record, until the report arrives with a heartbeat), the report is kept in
//! its own table, and reports are summarised per check across a selection.

use std::collections::BTreeMap;

use stella_proto::api::{
    DoctorCheckSummary, DoctorDirective, DoctorReport, DoctorReportView, FleetDoctorReport, Labels,
};
use stella_proto::time::rfc3339;

use super::{App, lock, now_secs};
use crate::error::Error;
use crate::records::{AgentStatus, DoctorReportRecord};
use crate::refusal::Refusal;

impl App {
    /// The ids of the agents whose labels include all of `selector`, in id
    /// order.
    fn select(&self, selector: &Labels) -> Vec<String> {
        let fleet = lock(&self.fleet);
        let mut ids: Vec<String> = fleet
            .agents
            .values()
            .filter(|a| {
                selector
                    .iter()
                    .all(|(k, v)| a.record.labels.get(k) == Some(v))
            })
            .map(|a| a.record.id.clone())
            .collect();
        ids.sort_unstable();
        ids
    }

    /// `agents doctor ID|--selector`: asks the agents for a report at their
    /// next heartbeat; returns the ids asked. Blocking.
    pub(crate) fn ask_doctor(
        &self,
        id: Option<&str>,
        selector: Option<&Labels>,
        remediate_dry_run: bool,
    ) -> Result<Vec<String>, Error> {
        let ids = match (id, selector) {
            (Some(id), None) => {
                if !stella_proto::id::is_agent_id(id) {
                    return Err(Refusal::not_found(format!("no agent with id {id}")).into());
                }
                vec![id.to_owned()]
            }
            (None, Some(selector)) => {
                crate::tokens::check_labels(selector).map_err(Refusal::bad_request)?;
                if selector.is_empty() {
                    return Err(Refusal::bad_request("an empty selector selects nothing").into());
                }
                self.select(selector)
            }
            _ => {
                return Err(
                    Refusal::bad_request("give an agent id or a selector, not both").into(),
                );
            }
        };
        if ids.is_empty() {
            return Ok(ids);
        }
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let directive = DoctorDirective { remediate_dry_run };
        // A revoked agent never heartbeats again: asking it is an error for
        // one id, and skipped for a selection.
        let single = id.is_some();
        self.change_agents(&refs, "agent.doctor_requested", &mut |r| {
            if r.status == AgentStatus::Revoked {
                if single {
                    return Err(Refusal::conflict(format!(
                        "agent {} is revoked: it sends no more reports",
                        r.id
                    )));
                }
                return Ok(false);
            }
            let changed = r.doctor_request.as_ref() != Some(&directive);
            r.doctor_request = Some(directive.clone());
            Ok(changed)
        })?;
        Ok(ids)
    }

    /// Stores a report an agent uploaded and clears its request. Blocking.
    pub(crate) fn store_doctor_report(&self, id: &str, report: DoctorReport) -> Result<(), Error> {
        let _serial = lock(&self.lifecycle_lock);
        let record = DoctorReportRecord {
            received_at: now_secs(),
            report,
        };
        let written = self.store.put_doctor_report(id, &record)?;
        crate::log::info("doctor report received", &[("agent", &id)]);
        lock(&self.fleet).mirror(written, super::now_ms());
        Ok(())
    }

    /// `agents show ID --doctor`. Blocking.
    pub(crate) fn doctor_report_view(&self, id: &str) -> Result<DoctorReportView, Error> {
        let pending = {
            let fleet = lock(&self.fleet);
            let Some(agent) = fleet.agents.get(id) else {
                return Err(Refusal::not_found(format!("no agent with id {id}")).into());
            };
            agent.record.doctor_request.is_some()
        };
        let stored = self.store.doctor_report(id)?;
        Ok(DoctorReportView {
            agent_id: id.to_owned(),
            received_at: stored.as_ref().map(|s| rfc3339(s.received_at)),
            report: stored.map(|s| s.report),
            pending,
        })
    }

    /// `doctor-report --selector`: per check, the agents failing or warning.
    /// Blocking.
    pub(crate) fn fleet_doctor_report(
        &self,
        selector: &Labels,
    ) -> Result<FleetDoctorReport, Error> {
        crate::tokens::check_labels(selector).map_err(Refusal::bad_request)?;
        let ids = self.select(selector);
        let pending: Vec<String> = {
            let fleet = lock(&self.fleet);
            ids.iter()
                .filter(|id| {
                    fleet
                        .agents
                        .get(*id)
                        .is_some_and(|a| a.record.doctor_request.is_some())
                })
                .cloned()
                .collect()
        };
        let mut checks: BTreeMap<String, DoctorCheckSummary> = BTreeMap::new();
        let mut reported = 0;
        for id in &ids {
            let Some(stored) = self.store.doctor_report(id)? else {
                continue;
            };
            reported += 1;
            for c in &stored.report.checks {
                let list = match c.status.as_str() {
                    "fail" => 0,
                    "warn" => 1,
                    _ => continue,
                };
                let entry = checks
                    .entry(c.id.clone())
                    .or_insert_with(|| DoctorCheckSummary {
                        id: c.id.clone(),
                        fail: Vec::new(),
                        warn: Vec::new(),
                    });
                if list == 0 {
                    entry.fail.push(id.clone());
                } else {
                    entry.warn.push(id.clone());
                }
            }
        }
        Ok(FleetDoctorReport {
            agents: ids.len() as u64,
            reported,
            pending,
            checks: checks.into_values().collect(),
        })
    }
}
