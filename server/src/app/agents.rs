//! Agents at run time: the authentication check every agent endpoint shares,
//! heartbeats (the hot path: in memory, soft state group-committed), status
//! changes (durable first, then mirrored in the fleet), the admin's agent
//! views and actions, the heartbeat-timeout monitor and the group commit.

use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::Duration;

use stella_proto::api::{
    AgentView, FleetSummary, HeartbeatRequest, HeartbeatResponse, Labels, SelfView,
    UpdateFailureReport, UpdateFailureView,
};
use stella_proto::states::UpdatePhase;
use stella_proto::time::rfc3339;

use super::{App, Metrics, lock, now_ms, now_secs};
use crate::error::Error;
use crate::lifecycle::{self, Act, Fleet, LiveAgent, Transition};
use crate::log;
use crate::records::{
    AgentRecord, AgentStatus, HeartbeatState, InactiveReason, UpdateFailureRecord,
};
use crate::refusal::Refusal;
use crate::store::AgentChange;

/// What an admin asks of one agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AgentAction {
    Transition(Transition),
    /// Renew the certificate at the next heartbeat.
    Renew,
}

impl AgentAction {
    /// The action named in `POST /v1/admin/agents/{id}/{action}`.
    pub(crate) fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "deactivate" => AgentAction::Transition(Transition::Deactivate),
            "activate" => AgentAction::Transition(Transition::Activate),
            "revoke" => AgentAction::Transition(Transition::Revoke),
            "renew" => AgentAction::Renew,
            _ => return None,
        })
    }
}

impl App {
    /// The one authentication check of agent endpoints: may the agent
    /// `agent_id`, presenting certificate `serial`, `act` now?
    pub(crate) fn check_agent(
        &self,
        agent_id: &str,
        serial: &str,
        act: Act,
    ) -> Result<(), Refusal> {
        let fleet = lock(&self.fleet);
        let record = fleet.agents.get(agent_id).map(|a| &a.record);
        lifecycle::may_act(record, agent_id, serial, act)
    }

    /// Applies `change` to the named agents in one durable transaction, then
    /// mirrors the written records in memory, under the lifecycle lock so the
    /// two never disagree. Returns the agents' records afterwards. Blocking.
    pub(crate) fn change_agents(
        &self,
        ids: &[&str],
        action: &str,
        change: &mut AgentChange<'_>,
    ) -> Result<Vec<AgentRecord>, Error> {
        let _serial = lock(&self.lifecycle_lock);
        let written = self.store.update_agents(ids, now_secs(), action, change)?;
        let mut fleet = lock(&self.fleet);
        let now = now_ms();
        for record in written {
            log::info(
                "agent changed",
                &[
                    ("agent", &record.id),
                    ("action", &action),
                    ("status", &record.status),
                    ("reason", &record.reason.map_or("-", InactiveReason::as_str)),
                ],
            );
            fleet.mirror(record, now);
        }
        ids.iter()
            .map(|id| match fleet.agents.get(*id) {
                Some(live) => Ok(live.record.clone()),
                None => Err(Refusal::not_found(format!("no agent with id {id}")).into()),
            })
            .collect()
    }

    /// Applies `transition` to the named agents (durable, then in memory).
    /// Blocking.
    pub(crate) fn transition(
        &self,
        ids: &[&str],
        transition: Transition,
    ) -> Result<Vec<AgentRecord>, Error> {
        self.change_agents(ids, transition.action(), &mut |r| transition.apply(r))
    }

    /// Answers a heartbeat: records what changed durably (reactivation after a
    /// timeout, retirement of a replaced certificate) off the async threads,
    /// then the soft state in memory, and says what the agent should do. The
    /// usual heartbeat changes nothing durable and takes the fleet lock once.
    pub(crate) async fn heartbeat(
        self: &Arc<Self>,
        agent_id: &str,
        serial: &str,
        mut body: HeartbeatRequest,
    ) -> Result<HeartbeatResponse, Error> {
        lifecycle::check_heartbeat(&body)?;
        // A failed update's log is stored durably before the answer: the
        // agent stops sending it once this heartbeat is acknowledged.
        if let Some(failure) = body.update_failure.take() {
            {
                let fleet = lock(&self.fleet);
                let record = fleet.agents.get(agent_id).map(|a| &a.record);
                lifecycle::may_act(record, agent_id, serial, Act::Heartbeat)?;
            }
            let app = self.clone();
            let id = agent_id.to_owned();
            smol::unblock(move || app.store_update_failure(&id, failure)).await?;
        }
        // A requested doctor report is stored (and the request cleared)
        // before the answer, which then no longer asks for it.
        // A report nobody asked for is dropped: an agent cannot make the
        // server write at will.
        if let Some(report) = body.doctor_report.take() {
            let asked = {
                let fleet = lock(&self.fleet);
                let record = fleet.agents.get(agent_id).map(|a| &a.record);
                lifecycle::may_act(record, agent_id, serial, Act::Heartbeat)?;
                record.is_some_and(|r| r.doctor_request.is_some())
            };
            if asked {
                let app = self.clone();
                let id = agent_id.to_owned();
                smol::unblock(move || app.store_doctor_report(&id, report)).await?;
            }
        }
        // Results are durable before the answer: an agent forgets a result
        // once a heartbeat carrying it is answered.
        if let Some(results) = body.task_results.take().filter(|r| !r.is_empty()) {
            {
                let fleet = lock(&self.fleet);
                let record = fleet.agents.get(agent_id).map(|a| &a.record);
                lifecycle::may_act(record, agent_id, serial, Act::Heartbeat)?;
            }
            let app = self.clone();
            let id = agent_id.to_owned();
            smol::unblock(move || app.store_task_results(&id, results)).await?;
        }
        let effects = {
            let mut fleet = lock(&self.fleet);
            let record = fleet.agents.get(agent_id).map(|a| &a.record);
            lifecycle::may_act(record, agent_id, serial, Act::Heartbeat)?;
            let effects = record.map_or_else(Default::default, |r| {
                lifecycle::heartbeat_effects(r, serial)
            });
            if !effects.reactivate && !effects.retire_previous {
                let answer = self.answer_heartbeat(&mut fleet, agent_id, serial, body)?;
                drop(fleet);
                Metrics::bump(&self.metrics.heartbeats);
                return Ok(answer);
            }
            effects
        };
        let app = self.clone();
        let (id, presented) = (agent_id.to_owned(), serial.to_owned());
        smol::unblock(move || {
            if effects.reactivate {
                app.transition(&[&id], Transition::HeardFrom)?;
            }
            if effects.retire_previous {
                app.change_agents(&[&id], "agent.certificate_in_use", &mut |r| {
                    Ok(lifecycle::retire_previous(r, &presented))
                })?;
            }
            Ok::<(), Error>(())
        })
        .await?;
        let answer = self.answer_heartbeat(&mut lock(&self.fleet), agent_id, serial, body)?;
        Metrics::bump(&self.metrics.heartbeats);
        Ok(answer)
    }

    /// Records a heartbeat's soft state and makes its answer, with the fleet
    /// locked.
    fn answer_heartbeat(
        &self,
        fleet: &mut Fleet,
        agent_id: &str,
        serial: &str,
        body: HeartbeatRequest,
    ) -> Result<HeartbeatResponse, Refusal> {
        let now = now_ms();
        let agent = fleet.agents.get_mut(agent_id);
        // Again: an admin may have acted since the last check.
        lifecycle::may_act(
            agent.as_ref().map(|a| &a.record),
            agent_id,
            serial,
            Act::Heartbeat,
        )?;
        let Some(agent) = agent else {
            return Err(Refusal::unauthorized(format!(
                "agent {agent_id} is not known to this server"
            )));
        };
        let push = lifecycle::record_heartbeat(agent, body, now);
        let from_rollout = lock(&self.rollouts).offered.get(agent_id).cloned();
        let update =
            lifecycle::offered_version(agent, from_rollout.as_deref()).and_then(|version| {
                lock(&self.releases).offer(
                    version,
                    &agent.record.platform.target,
                    self.settings.update_probation,
                )
            });
        if let Some(offer) = &update {
            lifecycle::note_offer(&mut agent.hb, &offer.version, now);
        }
        let desired = &agent.desired;
        let (tasks, cancel_tasks) = self.tasks_for(agent_id, &agent.record.labels);
        let answer = HeartbeatResponse {
            update,
            interval_ms: agent.interval(self.settings.heartbeat_interval).as_millis() as u64,
            server_time: rfc3339(now / 1000),
            renew: agent.record.renew_requested,
            config_hash: desired.hash.clone(),
            config: push.then(|| desired.doc.clone()),
            doctor: agent.record.doctor_request.clone(),
            tasks,
            cancel_tasks,
        };
        if !fleet.dirty.contains(agent_id) {
            fleet.dirty.insert(agent_id.to_owned());
        }
        Ok(answer)
    }

    /// How the server sees the calling agent; changes nothing.
    pub(crate) fn self_view(&self, agent_id: &str) -> Result<SelfView, Refusal> {
        let fleet = lock(&self.fleet);
        let Some(agent) = fleet.agents.get(agent_id) else {
            return Err(Refusal::unauthorized(format!(
                "agent {agent_id} is not known to this server"
            )));
        };
        let r = &agent.record;
        let now = now_ms();
        Ok(SelfView {
            agent_id: r.id.clone(),
            status: r.status,
            reason: r.reason,
            server_time: rfc3339(now / 1000),
            server_time_ms: now,
        })
    }

    /// The admin view of one agent.
    pub(crate) fn agent_view(&self, id: &str) -> Result<AgentView, Refusal> {
        let fleet = lock(&self.fleet);
        fleet
            .agents
            .get(id)
            .map(|live| lifecycle::view(live))
            .ok_or_else(|| Refusal::not_found(format!("no agent with id {id}")))
    }

    /// One page of the agents that `filter` selects, in id order: those
    /// after the id `after`, skipping `offset` of them, at most `limit`;
    /// and how many agents the filter selects in all. One pass over the
    /// fleet and a partial sort of the page: a page of 100,000 agents costs
    /// milliseconds, and only the page is turned into views.
    pub(crate) fn agent_query(
        &self,
        filter: &AgentFilter,
        after: &str,
        offset: usize,
        limit: usize,
    ) -> (Vec<AgentView>, usize) {
        query(&lock(&self.fleet), filter, after, offset, limit)
    }

    /// The fleet in numbers: agents by status, inactive reason, version and
    /// target.
    pub(crate) fn fleet_summary(&self) -> FleetSummary {
        summary(&lock(&self.fleet))
    }

    /// `agents show ID`: the view with the last failed update from the
    /// store. Blocking.
    pub(crate) fn agent_detail(&self, id: &str) -> Result<AgentView, Error> {
        let mut view = self.agent_view(id)?;
        view.last_failure = self.store.update_failure(id)?.map(|f| UpdateFailureView {
            version: f.report.version,
            phase: f.report.phase,
            reason: f.report.reason,
            received_at: rfc3339(f.received_at),
            lines: f.report.lines,
        });
        Ok(view)
    }

    /// Stores the failed update an agent reported, unless it is the one
    /// already stored (an agent resends it until acknowledged). Blocking.
    pub(crate) fn store_update_failure(
        &self,
        id: &str,
        mut report: UpdateFailureReport,
    ) -> Result<(), Error> {
        report.phase = UpdatePhase::parse(&lifecycle::phase_text(report.phase.as_str()));
        if self
            .store
            .update_failure(id)?
            .is_some_and(|stored| stored.report == report)
        {
            return Ok(());
        }
        log::info(
            "update failure reported",
            &[
                ("agent", &id),
                ("version", &report.version),
                ("phase", &report.phase),
                ("lines", &report.lines.len()),
            ],
        );
        let record = UpdateFailureRecord {
            received_at: now_secs(),
            report,
        };
        self.store.put_update_failure(id, &record)?;
        Ok(())
    }

    /// `agents deactivate|activate|revoke|renew ID`. Blocking.
    pub(crate) fn act_on_agent(&self, id: &str, action: AgentAction) -> Result<AgentView, Error> {
        if !stella_proto::id::is_agent_id(id) {
            return Err(Refusal::not_found(format!("no agent with id {id}")).into());
        }
        match action {
            AgentAction::Transition(t) => self.transition(&[id], t)?,
            AgentAction::Renew => self.change_agents(&[id], "agent.renew_requested", &mut |r| {
                if r.status == AgentStatus::Revoked {
                    return Err(Refusal::conflict(format!(
                        "agent {} is revoked: it gets no new certificate",
                        r.id
                    )));
                }
                let changed = !r.renew_requested;
                r.renew_requested = true;
                Ok(changed)
            })?,
        };
        Ok(self.agent_view(id)?)
    }

    /// `agents update ID --release V`: offers one agent a release directly.
    /// Blocking.
    pub(crate) fn offer_release(&self, id: &str, release: &str) -> Result<AgentView, Error> {
        let target = match lock(&self.fleet).agents.get(id) {
            Some(live) => live.record.platform.target.clone(),
            None => return Err(Refusal::not_found(format!("no agent with id {id}")).into()),
        };
        lock(&self.releases).check_offer(release, &target, id)?;
        self.change_agents(&[id], "agent.update_offered", &mut |r| {
            if r.status == AgentStatus::Revoked {
                return Err(Refusal::conflict(format!("agent {} is revoked", r.id)));
            }
            let changed = r.update_offer.as_deref() != Some(release);
            r.update_offer = Some(release.to_owned());
            Ok(changed)
        })?;
        Ok(self.agent_view(id)?)
    }
}

/// See [`App::agent_query`].
fn query(
    fleet: &Fleet,
    filter: &AgentFilter,
    after: &str,
    offset: usize,
    limit: usize,
) -> (Vec<AgentView>, usize) {
    // Ordered by a fixed-size prefix first: most comparisons then touch no
    // string behind a pointer, and without a filter no agent record
    // either. One pass keeps the first `offset + limit` in a bounded heap,
    // so a page of 100,000 agents allocates for the page, not the fleet (a
    // large temporary per request would stay in the allocator's arenas),
    // and the scan stays within a few milliseconds of the fleet lock.
    let all = filter.is_empty();
    let after = (!after.is_empty()).then(|| (sort_key(after), after));
    let end = offset.saturating_add(limit);
    let mut first: BinaryHeap<(u128, &str)> =
        BinaryHeap::with_capacity(end.min(fleet.agents.len()));
    let mut total = 0;
    for (id, live) in &fleet.agents {
        if !all && !filter.matches(live) {
            continue;
        }
        total += 1;
        let key = (sort_key(id), id.as_str());
        if after.is_some_and(|after| key <= after) {
            continue;
        }
        if first.len() < end {
            first.push(key);
        } else if first.peek().is_some_and(|last| key < *last) {
            first.pop();
            first.push(key);
        }
    }
    let ids = first.into_sorted_vec();
    let page = ids
        .iter()
        .skip(offset)
        .filter_map(|(_, id)| fleet.agents.get(*id))
        .map(|a| lifecycle::view(a))
        .collect();
    (page, total)
}

/// The first 16 bytes of `id`, big-endian, zero-padded: ordering by it,
/// then by the whole id, is the ids' string order.
fn sort_key(id: &str) -> u128 {
    let mut bytes = [0u8; 16];
    let n = id.len().min(16);
    bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
    u128::from_be_bytes(bytes)
}

/// See [`App::fleet_summary`].
fn summary(fleet: &Fleet) -> FleetSummary {
    let mut summary = FleetSummary {
        agents: fleet.agents.len() as u64,
        ..FleetSummary::default()
    };
    for status in AgentStatus::ALL {
        summary.status.insert(status.as_str().to_owned(), 0);
    }
    let bump = |map: &mut std::collections::BTreeMap<String, u64>, key: &str| match map.get_mut(key)
    {
        Some(n) => *n += 1,
        None => {
            map.insert(key.to_owned(), 1);
        }
    };
    for live in fleet.agents.values() {
        let r = &live.record;
        bump(&mut summary.status, r.status.as_str());
        if let Some(reason) = r.reason {
            bump(&mut summary.reasons, reason.as_str());
        }
        bump(&mut summary.versions, live.version());
        bump(&mut summary.targets, &r.platform.target);
    }
    summary
}

/// Which agents a listing selects: every condition given must hold.
#[derive(Debug, Default, Clone)]
pub(crate) struct AgentFilter {
    pub(crate) status: Option<AgentStatus>,
    /// Labels the agent must carry, each with this value.
    pub(crate) labels: Labels,
    /// The version it runs, exactly.
    pub(crate) version: Option<String>,
    /// Its target triple, exactly.
    pub(crate) target: Option<String>,
    /// Part of its name or id, in any case.
    pub(crate) name: Option<String>,
}

impl AgentFilter {
    /// Whether it selects every agent.
    fn is_empty(&self) -> bool {
        self.status.is_none()
            && self.labels.is_empty()
            && self.version.is_none()
            && self.target.is_none()
            && self.name.is_none()
    }

    fn matches(&self, live: &LiveAgent) -> bool {
        let r = &live.record;
        self.status.is_none_or(|s| s == r.status)
            && self
                .labels
                .iter()
                .all(|(k, v)| r.labels.get(k).is_some_and(|have| have == v))
            && self.version.as_deref().is_none_or(|v| v == live.version())
            && self
                .target
                .as_deref()
                .is_none_or(|t| t == r.platform.target)
            && self.name.as_deref().is_none_or(|part| {
                contains_ignoring_case(&r.name, part) || contains_ignoring_case(&r.id, part)
            })
    }
}

/// Whether `text` contains `part`, ASCII case ignored (names and ids are
/// mostly ASCII; other letters match exactly).
fn contains_ignoring_case(text: &str, part: &str) -> bool {
    let (text, part) = (text.as_bytes(), part.as_bytes());
    part.is_empty()
        || text
            .windows(part.len())
            .any(|w| w.eq_ignore_ascii_case(part))
}

/// Marks agents `inactive` (heartbeat_timeout) after `--heartbeat-misses`
/// intervals of silence. Runs for the life of the server.
pub(crate) async fn timeout_monitor(app: Arc<App>) {
    let default = app.settings.heartbeat_interval;
    let tick = (default / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let misses = app.settings.heartbeat_misses;
    loop {
        smol::Timer::after(tick).await;
        // Singleton work: only the leader marks agents (see app::cluster).
        let Some(fence) = app.leads() else {
            continue;
        };
        let now = now_ms();
        let overdue: Vec<String> = {
            let fleet = lock(&app.fleet);
            fleet
                .agents
                .values()
                .filter(|a| a.is_overdue(now, default, misses))
                .map(|a| a.record.id.clone())
                .collect()
        };
        if overdue.is_empty() {
            continue;
        }
        let app2 = app.clone();
        let result = smol::unblock(move || {
            // Heartbeats other servers took are read first: an agent that
            // heartbeats elsewhere is not overdue.
            app2.follow_heartbeats();
            let now = now_ms();
            let still: Vec<&str> = {
                let fleet = lock(&app2.fleet);
                overdue
                    .iter()
                    .filter(|id| {
                        fleet
                            .agents
                            .get(id.as_str())
                            .is_some_and(|a| a.is_overdue(now, default, misses))
                    })
                    .map(String::as_str)
                    .collect()
            };
            if still.is_empty() {
                return Ok(());
            }
            app2.as_leader(fence, || app2.transition(&still, Transition::TimedOut))
                .map(|_| ())
        })
        .await;
        if let Err(e) = result {
            log::warn(
                "heartbeat timeout monitor could not record",
                &[("error", &e)],
            );
        }
    }
}

/// Commits heartbeat soft state in batches, one transaction per tick; while
/// the store cannot write, tries a small write each tick so that `/healthz`
/// turns ok again once there is room, whether or not anyone writes.
pub(crate) async fn heartbeat_flusher(app: Arc<App>) {
    loop {
        smol::Timer::after(app.settings.flush_every).await;
        flush_heartbeats(&app).await;
        if app.store.health().unwritable.is_some() {
            let app2 = app.clone();
            if smol::unblock(move || app2.store.probe_write(now_secs()))
                .await
                .is_ok()
            {
                log::info("the store can write again", &[]);
            }
        }
    }
}

/// Writes every dirty heartbeat state now.
pub(crate) async fn flush_heartbeats(app: &Arc<App>) {
    let batch: Vec<(String, HeartbeatState)> = {
        let mut fleet = lock(&app.fleet);
        let dirty = std::mem::take(&mut fleet.dirty);
        dirty
            .into_iter()
            .filter_map(|id| {
                let hb = fleet.agents.get(&id)?.hb.clone();
                Some((id, hb))
            })
            .collect()
    };
    if batch.is_empty() {
        return;
    }
    let app2 = app.clone();
    let result = smol::unblock(move || {
        let r = app2.store.save_heartbeats(&batch);
        (r, batch)
    })
    .await;
    if let (Err(e), batch) = result {
        log::warn(
            "could not save heartbeats; will retry",
            &[("error", &e), ("agents", &batch.len())],
        );
        let mut fleet = lock(&app.fleet);
        fleet.dirty.extend(batch.into_iter().map(|(id, _)| id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Configs;

    /// A fleet of `n` agents: every fifth revoked, else every third
    /// inactive; labels `site=a|b` alternating; every fourth runs 2.0.0.
    fn fleet(n: usize) -> Fleet {
        let mut configs = Configs::default();
        let mut fleet = Fleet::default();
        for i in 0..n {
            let (status, reason) = match i {
                _ if i % 5 == 0 => (AgentStatus::Revoked, None),
                _ if i % 3 == 0 => (
                    AgentStatus::Inactive,
                    Some(InactiveReason::HeartbeatTimeout),
                ),
                _ => (AgentStatus::Active, None),
            };
            let mut record = AgentRecord::sample(status, reason);
            record.id = format!("agt_{i:08}");
            record.name = format!("Edge-{i}");
            record.platform.target = "x86_64-unknown-linux-musl".into();
            record
                .labels
                .insert("site".into(), if i % 2 == 0 { "a" } else { "b" }.into());
            let mut hb = HeartbeatState::default();
            if i % 4 == 0 {
                hb.version = "2.0.0".into();
            }
            let desired = configs.desired(&record);
            fleet.agents.insert(
                record.id.clone(),
                Box::new(LiveAgent {
                    record,
                    hb,
                    last_seen_ms: 0,
                    desired,
                }),
            );
        }
        fleet
    }

    fn ids(page: &[AgentView]) -> Vec<&str> {
        page.iter().map(|a| a.id.as_str()).collect()
    }

    #[test]
    fn listing_filters_and_pages_in_id_order() {
        let fleet = fleet(100_000);
        let all = AgentFilter::default();
        let (page, total) = query(&fleet, &all, "", 0, 3);
        assert_eq!(total, 100_000);
        assert_eq!(ids(&page), ["agt_00000000", "agt_00000001", "agt_00000002"]);
        let (page, _) = query(&fleet, &all, "", 99_998, 50);
        assert_eq!(ids(&page), ["agt_00099998", "agt_00099999"]);
        let (page, _) = query(&fleet, &all, "agt_00000001", 1, 2);
        assert_eq!(ids(&page), ["agt_00000003", "agt_00000004"]);
        let (page, total) = query(&fleet, &all, "", 200_000, 10);
        assert!(page.is_empty());
        assert_eq!(total, 100_000);

        let active_b_v1 = AgentFilter {
            status: Some(AgentStatus::Active),
            labels: [("site".to_owned(), "b".to_owned())].into(),
            version: Some("1.0.0".into()),
            ..AgentFilter::default()
        };
        let (page, total) = query(&fleet, &active_b_v1, "", 0, 1000);
        let want = (0..100_000)
            .filter(|i| i % 5 != 0 && i % 3 != 0 && i % 2 == 1 && i % 4 != 0)
            .count();
        assert_eq!(total, want);
        assert_eq!(page.len(), 1000);
        assert!(page.windows(2).all(|w| w[0].id < w[1].id));
        assert!(page.iter().all(|a| a.status == AgentStatus::Active
            && a.labels["site"] == "b"
            && a.version == "1.0.0"));

        let by_name = AgentFilter {
            name: Some("edge-4242".into()),
            ..AgentFilter::default()
        };
        let (page, total) = query(&fleet, &by_name, "", 0, 10);
        assert_eq!(total, 11, "Edge-4242 and Edge-42420..Edge-42429");
        assert_eq!(page[0].name, "Edge-4242");
        let by_id = AgentFilter {
            name: Some("AGT_00000007".into()),
            ..AgentFilter::default()
        };
        assert_eq!(query(&fleet, &by_id, "", 0, 10).1, 1);
        let nobody = AgentFilter {
            labels: [("site".to_owned(), "c".to_owned())].into(),
            ..AgentFilter::default()
        };
        assert_eq!(query(&fleet, &nobody, "", 0, 10).1, 0);
    }

    #[test]
    fn the_summary_counts_by_status_reason_version_and_target() {
        let s = summary(&fleet(30));
        assert_eq!(s.agents, 30);
        assert_eq!(s.status["revoked"], 6);
        assert_eq!(s.status["inactive"], 8);
        assert_eq!(s.status["active"], 16);
        assert_eq!(s.reasons["heartbeat_timeout"], 8);
        assert_eq!(s.versions["2.0.0"], 8);
        assert_eq!(s.versions["1.0.0"], 22);
        assert_eq!(s.targets["x86_64-unknown-linux-musl"], 30);
        let empty = summary(&Fleet::default());
        assert_eq!(empty.status.len(), 3, "every status is there, at 0");
    }
}
