//! Agent lifecycle: the in-memory fleet (mirror of the store plus heartbeat
//! soft state), status transitions (active, inactive with a reason, revoked),
//! the heartbeat-timeout monitor and the group commit of heartbeats.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use stella_proto::api::AgentView;
use stella_proto::time::rfc3339;

use crate::app::{App, lock, now_ms, now_secs};
use crate::config::{Configs, Desired};
use crate::error::Error;
use crate::log;
use crate::records::{
    ACTIVE, AgentRecord, DEACTIVATED, HEARTBEAT_TIMEOUT, HeartbeatState, INACTIVE, REVOKED,
};

/// One agent as the running server knows it.
#[derive(Debug)]
pub(crate) struct LiveAgent {
    pub(crate) record: AgentRecord,
    pub(crate) hb: HeartbeatState,
    /// When the agent was last heard of or given a fresh start (ms): drives
    /// the heartbeat-timeout monitor.
    pub(crate) last_seen_ms: u64,
    /// The configuration it should run.
    pub(crate) desired: Arc<Desired>,
}

impl LiveAgent {
    /// The heartbeat interval this agent is asked to keep.
    pub(crate) fn interval(&self, default: Duration) -> Duration {
        self.desired.heartbeat_interval.unwrap_or(default)
    }
}

/// All agents, by id.
#[derive(Debug, Default)]
pub(crate) struct Fleet {
    /// Boxed: a `LiveAgent` is ~670 bytes, and a map stores its values in
    /// power-of-two bucket arrays, up to half of them empty.
    pub(crate) agents: HashMap<String, Box<LiveAgent>>,
    /// Agents whose heartbeat state is newer than the store's.
    pub(crate) dirty: HashSet<String>,
}

impl Fleet {
    /// Builds the fleet from the store. Agents get a fresh start from
    /// `started_ms`: the server being down is not the agents' fault.
    /// Rows are streamed from the store into the map: no second copy of the
    /// fleet exists at any time.
    pub(crate) fn load(
        store: &crate::store::Store,
        configs: &mut Configs,
        started_ms: u64,
    ) -> Result<Self, Error> {
        let mut agents = HashMap::new();
        store.load_agents(|record, hb| {
            let last_seen_ms = hb.last_heartbeat_ms.max(started_ms);
            let desired = configs.desired(&record);
            agents.insert(
                record.id.clone(),
                Box::new(LiveAgent {
                    record,
                    hb,
                    last_seen_ms,
                    desired,
                }),
            );
        })?;
        Ok(Self {
            agents,
            dirty: HashSet::new(),
        })
    }

    /// Counts of agents by status, for `/metrics`.
    pub(crate) fn count_by_status(&self) -> [(&'static str, usize); 3] {
        let mut counts = [(ACTIVE, 0), (INACTIVE, 0), (REVOKED, 0)];
        for agent in self.agents.values() {
            if let Some(slot) = counts.iter_mut().find(|(s, _)| *s == agent.record.status) {
                slot.1 += 1;
            }
        }
        counts
    }
}

/// What an admin or the server does to an agent's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    Deactivate,
    Activate,
    Revoke,
    /// No heartbeat for `--heartbeat-misses` intervals.
    TimedOut,
    /// A heartbeat arrived from an agent marked timed out.
    HeardFrom,
}

impl Transition {
    fn action(self) -> &'static str {
        match self {
            Transition::Deactivate => "agent.deactivate",
            Transition::Activate => "agent.activate",
            Transition::Revoke => "agent.revoke",
            Transition::TimedOut => "agent.heartbeat_timeout",
            Transition::HeardFrom => "agent.heartbeat_resumed",
        }
    }

    /// Applies the transition to a record; `Ok(false)` when nothing changes.
    fn apply(self, r: &mut AgentRecord) -> Result<bool, Error> {
        let reason = r.reason.as_deref();
        let (status, reason): (&str, Option<&str>) = match (self, r.status.as_str(), reason) {
            (Transition::Revoke, REVOKED, _) => return Ok(false),
            (_, REVOKED, _) if matches!(self, Transition::Deactivate | Transition::Activate) => {
                return Err(Error::Conflict(format!(
                    "agent {} is revoked, and revoked is final: enroll the host again with a new token",
                    r.id
                )));
            }
            (_, REVOKED, _) => return Ok(false),
            (Transition::Revoke, _, _) => (REVOKED, None),
            (Transition::Deactivate, INACTIVE, Some(DEACTIVATED)) => return Ok(false),
            (Transition::Deactivate, _, _) => (INACTIVE, Some(DEACTIVATED)),
            (Transition::Activate, ACTIVE, _) => return Ok(false),
            (Transition::Activate, _, _) => (ACTIVE, None),
            (Transition::TimedOut, ACTIVE, _) => (INACTIVE, Some(HEARTBEAT_TIMEOUT)),
            (Transition::HeardFrom, INACTIVE, Some(HEARTBEAT_TIMEOUT)) => (ACTIVE, None),
            (Transition::TimedOut | Transition::HeardFrom, _, _) => return Ok(false),
        };
        r.status = status.to_owned();
        r.reason = reason.map(str::to_owned);
        Ok(true)
    }
}

/// Applies `transition` to the named agents: durable first, then mirrored in
/// memory. Returns the agents' records afterwards (changed or not). Blocking.
pub(crate) fn transition(
    app: &App,
    ids: &[&str],
    transition: Transition,
) -> Result<Vec<AgentRecord>, Error> {
    change_agents(app, ids, transition.action(), |r| transition.apply(r))
}

/// Applies `change` to the named agents in one durable transaction, then
/// mirrors the written records in memory, under the lifecycle lock so the two
/// never disagree. Returns the agents' records afterwards. Blocking.
pub(crate) fn change_agents(
    app: &App,
    ids: &[&str],
    action: &str,
    change: impl FnMut(&mut AgentRecord) -> Result<bool, Error>,
) -> Result<Vec<AgentRecord>, Error> {
    let _serial = lock(&app.lifecycle_lock);
    let now = now_secs();
    let written = app.store.update_agents(ids, now, action, change)?;
    let mut fleet = lock(&app.fleet);
    for record in written {
        log::info(
            "agent changed",
            &[
                ("agent", &record.id),
                ("action", &action),
                ("status", &record.status),
                ("reason", &record.reason.as_deref().unwrap_or("-")),
            ],
        );
        mirror(&mut fleet, record);
    }
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        match fleet.agents.get(*id) {
            Some(live) => out.push(live.record.clone()),
            None => return Err(Error::NotFound(format!("no agent with id {id}"))),
        }
    }
    Ok(out)
}

/// Puts a freshly committed record in the in-memory fleet.
pub(crate) fn mirror(fleet: &mut Fleet, record: AgentRecord) {
    if let Some(live) = fleet.agents.get_mut(&record.id) {
        if record.status == ACTIVE && live.record.status != ACTIVE {
            // A fresh start: do not time out again before it could heartbeat.
            live.last_seen_ms = live.last_seen_ms.max(now_ms());
        }
        live.record = record;
    }
}

/// The admin view of one agent.
pub(crate) fn view(live: &LiveAgent) -> AgentView {
    let r = &live.record;
    let hb = &live.hb;
    let version = if hb.version.is_empty() {
        &r.version
    } else {
        &hb.version
    };
    AgentView {
        id: r.id.clone(),
        name: r.name.clone(),
        status: r.status.clone(),
        reason: r.reason.clone(),
        version: version.clone(),
        target: r.platform.target.clone(),
        labels: r.labels.clone(),
        capabilities: if hb.last_heartbeat_ms == 0 {
            r.capabilities.clone()
        } else {
            hb.capabilities.clone()
        },
        last_heartbeat: (hb.last_heartbeat_ms != 0).then(|| rfc3339(hb.last_heartbeat_ms / 1000)),
        cert_not_after: rfc3339(r.cert_not_after),
        config_hash: (!hb.config_hash.is_empty()).then(|| hb.config_hash.clone()),
        platform: r.platform.clone(),
        enrolled_at: rfc3339(r.enrolled_at),
        cert_serial: r.cert_serial.clone(),
        heartbeat_seq: hb.seq,
        uptime_s: hb.uptime_s,
        doctor: hb.doctor.clone(),
        update: hb.update_report(version),
        config_error: hb
            .config_error
            .as_ref()
            .filter(|e| e.hash == live.desired.hash)
            .map(|e| e.error.clone()),
    }
}

/// Marks agents `inactive` (heartbeat_timeout) after `--heartbeat-misses`
/// intervals of silence. Runs for the life of the server.
pub(crate) async fn timeout_monitor(app: Arc<App>) {
    let default = app.settings.heartbeat_interval;
    let tick = (default / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let misses = u64::from(app.settings.heartbeat_misses);
    loop {
        smol::Timer::after(tick).await;
        let now = now_ms();
        let overdue: Vec<String> = {
            let fleet = lock(&app.fleet);
            fleet
                .agents
                .values()
                .filter(|a| {
                    let allowed_ms = a.interval(default).as_millis() as u64 * misses;
                    a.record.status == ACTIVE && now.saturating_sub(a.last_seen_ms) > allowed_ms
                })
                .map(|a| a.record.id.clone())
                .collect()
        };
        if overdue.is_empty() {
            continue;
        }
        let app2 = app.clone();
        let result = smol::unblock(move || {
            let ids: Vec<&str> = overdue.iter().map(String::as_str).collect();
            transition(&app2, &ids, Transition::TimedOut).map(|_| ())
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

/// Commits heartbeat soft state in batches, one transaction per tick.
pub(crate) async fn heartbeat_flusher(app: Arc<App>) {
    loop {
        smol::Timer::after(app.settings.flush_every).await;
        flush_heartbeats(&app).await;
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
