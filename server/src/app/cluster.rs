//! Several servers on one store, at run time: each server follows the
//! change feed (an event names what another server changed; the cache of it
//! is reloaded from the store) and the heartbeat feed (the soft state the
//! others saved), reads through to the store for an agent it has not heard
//! of yet, shares its brute-force brake, and takes part in the leader
//! lease. The singleton work (`timeout_monitor`, the rollout controller's
//! transitions, pruning the events) runs only on the leader, each write
//! fenced by its token. With a store only this server writes (redb) none of
//! this runs, and this server is the leader by definition.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{App, lock, now_ms};
use crate::cluster::{
    EVENTS_KEPT, EVENTS_PER_READ, EventCursor, HEARTBEAT_OVERLAP, LEADER_LEASE, LEASE_RENEW,
    LEASE_TTL, Leadership, POLL_EVENTS, POLL_HEARTBEATS, Step, Turn,
};
use crate::config::Configs;
use crate::error::Error;
use crate::log;
use crate::releases::Releases;
use crate::store::{ChangeEvent, ChangeKind, Cluster, StoreError, Wake, fenced};
use crate::tasks::Tasks;

/// What a server that shares its store keeps of the others.
#[derive(Debug)]
pub(crate) struct ClusterState {
    /// Where it stands in the change feed.
    pub(super) cursor: EventCursor,
    /// The database's time of the last heartbeat-feed read.
    pub(super) heartbeats_read_ms: u64,
    pub(super) leadership: Leadership,
    /// Whether the last feed or lease call failed: the first failure is
    /// logged, then the recovery, not every retry of an outage.
    pub(super) failing: bool,
    /// Failures shared with the other servers in the current second:
    /// (Unix second, count).
    pub(super) shared_failures: (u64, u32),
}

impl ClusterState {
    /// Taken before the caches load, so that no change after the load is
    /// missed.
    pub(super) fn start(cluster: &dyn Cluster) -> Result<Self, StoreError> {
        Ok(Self {
            cursor: EventCursor::new(cluster.last_change()?),
            heartbeats_read_ms: now_ms().saturating_sub(HEARTBEAT_OVERLAP.as_millis() as u64),
            leadership: Leadership::default(),
            failing: false,
            shared_failures: (0, 0),
        })
    }
}

/// How many failed authentications a server shares with the others each
/// second, at most.
const SHARED_FAILURES_PER_S: u32 = 100;

/// Logs the first failure to reach the store after a success, then
/// nothing until it works again.
fn failed(state: &std::sync::Mutex<ClusterState>, what: &str, e: &StoreError) {
    if !std::mem::replace(&mut lock(state).failing, true) {
        log::warn(what, &[("error", e), ("then", &"retrying quietly")]);
    }
}

/// Logs that the store answers again after failures.
fn answered(state: &std::sync::Mutex<ClusterState>) {
    if std::mem::replace(&mut lock(state).failing, false) {
        log::info("the store answers the cluster loop again", &[]);
    }
}

impl App {
    /// The fencing token to do singleton work under now: `Some(0)` when
    /// this server is the store's only writer, `Some(token)` while it holds
    /// the leader lease, `None` when another server leads.
    pub(crate) fn leads(&self) -> Option<u64> {
        match &self.cluster_state {
            None => Some(0),
            Some(state) => lock(state).leadership.fence(Instant::now()),
        }
    }

    /// Runs singleton work `work` under fencing token `fence` (see
    /// [`leads`](Self::leads)).
    pub(crate) fn as_leader<T>(&self, fence: u64, work: impl FnOnce() -> T) -> T {
        if fence == 0 {
            work()
        } else {
            fenced(LEADER_LEASE, fence, work)
        }
    }

    /// Makes sure an agent another server enrolled is known here before
    /// its request is checked (the change feed brings it within a second;
    /// its first request may be faster).
    pub(crate) async fn know_agent(self: &Arc<Self>, agent_id: &str) {
        if self.store.cluster().is_none() || lock(&self.fleet).agents.contains_key(agent_id) {
            return;
        }
        let app = self.clone();
        let id = agent_id.to_owned();
        let read = smol::unblock(move || app.reload_agent(&id)).await;
        if let Err(e) = read {
            log::warn("could not read an agent from the store", &[("error", &e)]);
        }
    }

    /// Shares a failed registration or admin authentication from `source`
    /// with the other servers' brakes (not waited for).
    pub(crate) fn share_failure(self: &Arc<Self>, kind: ChangeKind, source: IpAddr) {
        if self.store.cluster().is_none() {
            return;
        }
        let app = self.clone();
        smol::unblock(move || app.share_failure_now(kind, source)).detach();
    }

    /// `share_failure`, blocking. At most [`SHARED_FAILURES_PER_S`] a
    /// second: guesses from very many sources must not fill the store's
    /// connections (each source's local brake holds regardless).
    pub(crate) fn share_failure_now(&self, kind: ChangeKind, source: IpAddr) {
        let (Some(cluster), Some(state)) = (self.store.cluster(), &self.cluster_state) else {
            return;
        };
        {
            let mut state = lock(state);
            let second = now_ms() / 1000;
            if state.shared_failures.0 != second {
                state.shared_failures = (second, 0);
            }
            if state.shared_failures.1 >= SHARED_FAILURES_PER_S {
                return;
            }
            state.shared_failures.1 += 1;
        }
        if let Err(e) = cluster.record_failure(kind, &source.to_string()) {
            failed(state, "could not share a failed authentication", &e);
        }
    }

    /// Reads agent `id` from the store into the fleet. Under the lifecycle
    /// lock: a change this server writes meanwhile is not overwritten by
    /// the older record.
    fn reload_agent(&self, id: &str) -> Result<(), Error> {
        let _serial = lock(&self.lifecycle_lock);
        let Some(record) = self.store.agent(id)? else {
            return Ok(());
        };
        let mut configs = lock(&self.configs);
        lock(&self.fleet).adopt(record, &mut configs, now_ms());
        Ok(())
    }

    /// Refreshes what `event` names from the store.
    fn apply_change(&self, cluster: &dyn Cluster, event: &ChangeEvent) -> Result<(), Error> {
        let Some(kind) = event.kind else {
            return Ok(());
        };
        match kind {
            ChangeKind::Agent => self.reload_agent(&event.key)?,
            ChangeKind::Config => self.reload_configs()?,
            ChangeKind::Release => self.reload_releases()?,
            ChangeKind::Rollout => self.reload_rollouts()?,
            ChangeKind::Task => {
                let records = self.store.tasks()?;
                let mut tasks = lock(&self.tasks);
                for record in records.into_iter().filter(|t| t.id == event.key) {
                    tasks.insert(record);
                }
            }
            ChangeKind::TaskResult => {
                if let Some((task, agent)) = event.key.split_once('/')
                    && let Some(result) = cluster.task_result(task, agent)?
                {
                    lock(&self.tasks).record_results(&[result]);
                }
            }
            ChangeKind::AdminToken => {
                let tokens = self.store.admin_tokens()?;
                *lock(&self.admin_tokens) = tokens;
            }
            ChangeKind::RegistrationFailure | ChangeKind::AdminFailure => {
                if let Ok(source) = event.key.parse::<IpAddr>() {
                    let windows = if kind == ChangeKind::AdminFailure {
                        &self.admin_failures
                    } else {
                        &self.registration_failures
                    };
                    lock(windows).record(source, now_ms());
                }
            }
        }
        Ok(())
    }

    fn reload_configs(&self) -> Result<(), Error> {
        let _serial = lock(&self.lifecycle_lock);
        let fresh = Configs::load(self.store.configs()?)?;
        let mut configs = lock(&self.configs);
        *configs = fresh;
        lock(&self.fleet).refresh_desired(&mut configs, now_ms());
        Ok(())
    }

    fn reload_releases(&self) -> Result<(), Error> {
        let fresh = Releases::load(self.store.releases()?);
        *lock(&self.releases) = fresh;
        Ok(())
    }

    pub(super) fn reload_rollouts(&self) -> Result<(), Error> {
        let _serial = lock(&self.lifecycle_lock);
        let records = self.store.rollouts()?;
        let mut rollouts = lock(&self.rollouts);
        rollouts.records = records.into_iter().map(|r| (r.id.clone(), r)).collect();
        Ok(())
    }

    /// Reloads every cache from the store (a lost listener, a feed pruned
    /// past this server): agents are adopted or mirrored, their heartbeat
    /// state taken where it is newer.
    fn resync(&self) -> Result<(), Error> {
        self.reload_configs()?;
        self.reload_releases()?;
        self.reload_rollouts()?;
        let tasks = Tasks::load(self.store.tasks()?, &self.store.task_results(None)?);
        *lock(&self.tasks) = tasks;
        *lock(&self.admin_tokens) = self.store.admin_tokens()?;
        // The lifecycle lock keeps this server's own changes from landing
        // between the read and the mirror (its own events are not applied
        // again).
        let _serial = lock(&self.lifecycle_lock);
        let mut agents = Vec::new();
        self.store
            .load_agents(&mut |record, hb| agents.push((record, hb)))?;
        let now = now_ms();
        let mut configs = lock(&self.configs);
        let mut fleet = lock(&self.fleet);
        for (record, hb) in agents {
            let id = record.id.clone();
            fleet.adopt(record, &mut configs, now);
            fleet.merge_heartbeat(&id, hb);
        }
        log::info(
            "caches resynced from the store",
            &[("agents", &fleet.agents.len())],
        );
        Ok(())
    }

    /// Reads the change feed once, to its end, and applies what others
    /// changed. Blocking.
    fn follow_changes(&self, cluster: &dyn Cluster, state: &std::sync::Mutex<ClusterState>) {
        loop {
            let after = lock(state).cursor.after();
            let (events, oldest) = match cluster.changes_since(after, EVENTS_PER_READ) {
                Ok(read) => read,
                Err(e) => {
                    failed(state, "could not read the change feed", &e);
                    return;
                }
            };
            answered(state);
            let full = events.len() == EVENTS_PER_READ;
            let step = lock(state).cursor.take(events, oldest, Instant::now());
            match step {
                Step::Resync => {
                    if let Err(e) = self.resync() {
                        log::warn("could not resync from the store", &[("error", &e)]);
                    }
                }
                Step::Apply(events) => {
                    for event in &events {
                        if let Err(e) = self.apply_change(cluster, event) {
                            log::warn(
                                "could not apply a change",
                                &[
                                    ("kind", &event.kind.map_or("?", ChangeKind::as_str)),
                                    ("error", &e),
                                ],
                            );
                        }
                    }
                    crate::app::Metrics::add(&self.metrics.changes_applied, events.len() as u64);
                }
            }
            if !full {
                return;
            }
        }
    }

    /// Takes the heartbeat states other servers saved since the last read.
    /// Blocking.
    pub(crate) fn follow_heartbeats(&self) {
        let (Some(cluster), Some(state)) = (self.store.cluster(), &self.cluster_state) else {
            return;
        };
        let since = lock(state)
            .heartbeats_read_ms
            .saturating_sub(HEARTBEAT_OVERLAP.as_millis() as u64);
        match cluster.heartbeats_since(since) {
            Ok((states, db_now)) => {
                let mut fleet = lock(&self.fleet);
                for (id, hb) in states {
                    fleet.merge_heartbeat(&id, hb);
                }
                drop(fleet);
                lock(state).heartbeats_read_ms = db_now;
            }
            Err(e) => failed(state, "could not read the heartbeat feed", &e),
        }
    }

    /// One attempt at the leader lease; a new term resyncs what the leader
    /// decides from. Blocking.
    fn contend(&self, cluster: &dyn Cluster, state: &std::sync::Mutex<ClusterState>) {
        let asked = Instant::now();
        let outcome = cluster
            .acquire_lease(LEADER_LEASE, LEASE_TTL)
            .map_err(|e| failed(state, "could not reach the leader lease", &e));
        let turn = lock(state).leadership.attempted(outcome, asked);
        match turn {
            Turn::Took(fence) => {
                // Every write of the last leader has committed (the fence
                // check holds the lease row until then): read them.
                if let Err(e) = self.reload_rollouts() {
                    log::warn("could not reload rollouts", &[("error", &e)]);
                }
                self.follow_heartbeats();
                lock(&self.fleet).fresh_start(now_ms());
                log::info(
                    "leading: the timeout monitor and rollout controller run here",
                    &[("node", &cluster.node()), ("fence", &fence)],
                );
            }
            Turn::Lost => log::info("no longer leading", &[]),
            Turn::Same => {}
        }
    }
}

/// Follows the other servers for the life of the server: the change feed
/// (woken by notifications, read at least every [`POLL_EVENTS`]), the
/// heartbeat feed, and the leader lease.
pub(crate) async fn follow(app: Arc<App>) {
    if app.cluster_state.is_none() {
        return;
    }
    let mut next_heartbeats = Instant::now();
    let mut next_lease = Instant::now();
    let mut next_prune = Instant::now() + Duration::from_secs(60);
    loop {
        let app2 = app.clone();
        let due = (next_heartbeats, next_lease, next_prune);
        let next = smol::unblock(move || {
            let (Some(cluster), Some(state)) = (app2.store.cluster(), &app2.cluster_state) else {
                return due;
            };
            let (mut heartbeats, mut lease, mut prune) = due;
            let now = Instant::now();
            if now >= lease {
                app2.contend(cluster, state);
                lease = now + LEASE_RENEW;
            }
            if now >= heartbeats {
                app2.follow_heartbeats();
                heartbeats = now + POLL_HEARTBEATS;
            }
            if now >= prune {
                if let Some(fence) = app2.leads() {
                    let pruned = app2.as_leader(fence, || cluster.prune_changes(EVENTS_KEPT));
                    if let Err(e) = pruned {
                        log::warn("could not prune the change feed", &[("error", &e)]);
                    }
                }
                prune = now + Duration::from_secs(60);
            }
            app2.follow_changes(cluster, state);
            let wait = POLL_EVENTS.min(heartbeats.saturating_duration_since(Instant::now()));
            if cluster.wait_for_change(wait) == Wake::Resync
                && let Err(e) = app2.resync()
            {
                log::warn("could not resync from the store", &[("error", &e)]);
            }
            (heartbeats, lease, prune)
        })
        .await;
        (next_heartbeats, next_lease, next_prune) = next;
        if app.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
    }
}

/// Gives the leader lease up on a graceful stop, so another server takes
/// over at once rather than after [`LEASE_TTL`].
pub(crate) fn step_down(app: &App) {
    if let (Some(cluster), Some(_)) = (app.store.cluster(), app.leads()) {
        let _ = cluster.release_lease(LEADER_LEASE);
    }
}
