//! The running server: its settings, the store, the CA, and the state it keeps
//! in memory, with the operations the API calls. Each operation parses
//! nothing and formats nothing: it applies a domain module's rules
//! (`tokens`, `lifecycle`, `renewal`, `config`, `releases`, `rollout`,
//! `tasks`) to the
//! store and to the in-memory state, durable first.
//!
//! # Process-local state
//!
//! Everything below lives in this process. With redb this server is the
//! store's only writer and keeps each cache current itself. With several
//! servers on one PostgreSQL store, each cache is also refreshed from the
//! store's change feed and heartbeat feed (`cluster`, docs/design.md
//! section 14), within 2 s of a change through another server:
//!
//! - `fleet`: every agent's record (a cache of the store; the heartbeat hot
//!   path and the "may this agent act" gate read it without a store round
//!   trip) and its heartbeat soft state (newer than the store by at most one
//!   group commit, `flush_every`; losing it loses the last second of
//!   heartbeats, which the next heartbeat restores; other servers' states
//!   come from the heartbeat feed).
//! - `configs`: every configuration scope (a cache of the store) and each
//!   agent's effective document, computed from them.
//! - `releases`: imported releases (a cache of the store). Blobs are in the
//!   store; with PostgreSQL `blobs/sha256/` in the data dir is this server's
//!   cache of them, filled on first use (`blobs`), never stale (a blob never
//!   changes).
//! - `blob_fills`: the blobs being copied from the store into that cache
//!   now.
//! - `rollouts`: rollout records (a cache of the store), and who is offered
//!   which release now and the per-stage numbers: recomputed by the rollout
//!   controller every second from the fleet (on every server; only the
//!   leader changes a rollout's state).
//! - `tasks`: every task with each agent's latest status (a cache of the
//!   store; heartbeat answers read it without a store round trip). Results'
//!   texts stay in the store.
//! - `challenges`: outstanding recovery challenges, single-use and valid for a
//!   minute: losing them costs an agent one retry (not shared).
//! - `admin_tokens`: every admin token (a cache of the store; the gate
//!   checks each admin request against it without a store round trip).
//! - `registration_failures` and `admin_failures`: failed registrations
//!   and admin authentications per source address for the 429 brake (other
//!   servers' failures arrive through the change feed).
//! - `lifecycle_lock`: orders durable agent changes with their mirror in
//!   `fleet` on this server (across servers, the store's transactions do).
//! - `cluster_state`: where this server stands in the feeds and the leader
//!   lease.
//! - `connections`, `requests_in_flight`, `stopping` and `metrics`:
//!   per-process by nature (Prometheus sums
//!   them over servers).

mod agents;
mod blobs;
mod certificates;
mod cluster;
mod configuration;
mod doctor;
mod enrollment;
mod operators;
mod releases;
mod rollouts;
mod tasks;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub(crate) use self::agents::{
    AgentAction, AgentFilter, flush_heartbeats, heartbeat_flusher, timeout_monitor,
};
use self::cluster::ClusterState;
pub(crate) use self::cluster::{follow, step_down};
pub(crate) use self::rollouts::controller;
use crate::ca::Ca;
use crate::config::Configs;
use crate::error::Error;
use crate::lifecycle::Fleet;
use crate::records::AdminTokenRecord;
use crate::refusal::{Refusal, Why};
use crate::releases::Releases;
use crate::renewal::Challenges;
use crate::roles::{self, Caller};
use crate::rollout::Rollouts;
use crate::store::Store;
use crate::tasks::Tasks;
use crate::tokens::FailureWindows;

/// What `serve` was started with.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) heartbeat_interval: Duration,
    pub(crate) heartbeat_misses: u32,
    pub(crate) cert_lifetime: Duration,
    /// How long after expiry an agent may still recover with its old key.
    pub(crate) expired_grace: Duration,
    /// How long a new agent version has to heartbeat and pass doctor.
    pub(crate) update_probation: Duration,
    /// How often soft heartbeat state is committed.
    pub(crate) flush_every: Duration,
    /// How long a keep-alive connection may sit idle between requests.
    pub(crate) idle_timeout: Duration,
    /// How long one request may take to arrive once it started.
    pub(crate) request_timeout: Duration,
    /// TLS handshakes in progress at once; the excess is closed at once.
    pub(crate) max_handshakes: usize,
}

/// Counters exported on `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) enrollments: AtomicU64,
    pub(crate) heartbeats: AtomicU64,
    pub(crate) token_failures: AtomicU64,
    pub(crate) requests: AtomicU64,
    pub(crate) tls_failures: AtomicU64,
    pub(crate) renewals: AtomicU64,
    pub(crate) recoveries: AtomicU64,
    pub(crate) rate_limited: AtomicU64,
    pub(crate) connections_refused: AtomicU64,
    /// Connections closed before their handshake: too many in progress.
    pub(crate) handshakes_shed: AtomicU64,
    /// TLS handshakes in progress now (a gauge; also the gate's count).
    pub(crate) handshakes_in_progress: AtomicU64,
    pub(crate) handshakes: AtomicU64,
    /// Changes other servers made, applied from the change feed.
    pub(crate) changes_applied: AtomicU64,
}

impl Metrics {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn load(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Everything a request handler may need.
pub(crate) struct App {
    pub(crate) settings: Settings,
    pub(crate) store: Box<dyn Store>,
    pub(crate) ca: Ca,
    pub(crate) data_dir: PathBuf,
    /// Every admin token, revoked and expired ones too.
    pub(crate) admin_tokens: Mutex<Vec<AdminTokenRecord>>,
    pub(crate) started_ms: u64,
    pub(crate) fleet: Mutex<Fleet>,
    /// Desired configuration by scope. Lock order: lifecycle_lock, configs, fleet.
    pub(crate) configs: Mutex<Configs>,
    /// Imported releases. Lock order: after fleet.
    pub(crate) releases: Mutex<Releases>,
    /// Rollouts and current offers. Lock order: after fleet and releases.
    pub(crate) rollouts: Mutex<Rollouts>,
    /// Tasks and each agent's latest status. Lock order: after fleet.
    pub(crate) tasks: Mutex<Tasks>,
    /// Outstanding recovery challenges.
    pub(crate) challenges: Mutex<Challenges>,
    /// Blobs being copied from the store into the data dir now.
    pub(crate) blob_fills: blobs::BlobFills,
    /// Failed registrations per source address (brute-force brake).
    pub(crate) registration_failures: Mutex<FailureWindows>,
    /// Failed admin authentications per source address (the same brake).
    pub(crate) admin_failures: Mutex<FailureWindows>,
    /// Held across a durable agent change and its mirror in `fleet`, so the
    /// two never disagree in order.
    pub(crate) lifecycle_lock: Mutex<()>,
    /// Open connections, and how many are allowed.
    pub(crate) connections: AtomicUsize,
    pub(crate) max_connections: usize,
    /// Requests read but not yet answered: a graceful stop waits for them.
    pub(crate) requests_in_flight: AtomicUsize,
    /// Set on SIGTERM: answers close their connection, nothing new is
    /// accepted.
    pub(crate) stopping: AtomicBool,
    pub(crate) metrics: Metrics,
    /// Where this server stands among the others sharing its store (`None`
    /// when it is the store's only writer).
    pub(crate) cluster_state: Option<Mutex<ClusterState>>,
}

impl App {
    /// Loads everything the server keeps in memory from `store`.
    pub(crate) fn load(
        settings: Settings,
        store: Box<dyn Store>,
        ca: Ca,
        data_dir: PathBuf,
        max_connections: usize,
    ) -> Result<Self, Error> {
        let cluster_state = store
            .cluster()
            .map(ClusterState::start)
            .transpose()?
            .map(Mutex::new);
        let admin_tokens = operators::load_admin_tokens(store.as_ref())?;
        let started_ms = now_ms();
        let mut configs = Configs::load(store.configs()?)?;
        let releases = Releases::load(store.releases()?);
        let rollouts = crate::rollout::load(store.rollouts()?);
        let tasks = Tasks::load(store.tasks()?, &store.task_results(None)?);
        let fleet = Fleet::load(store.as_ref(), &mut configs, started_ms)?;
        Ok(Self {
            settings,
            store,
            ca,
            data_dir,
            admin_tokens: Mutex::new(admin_tokens),
            started_ms,
            fleet: Mutex::new(fleet),
            configs: Mutex::new(configs),
            releases: Mutex::new(releases),
            rollouts: Mutex::new(rollouts),
            tasks: Mutex::new(tasks),
            challenges: Mutex::new(Challenges::default()),
            blob_fills: Mutex::default(),
            registration_failures: Mutex::new(FailureWindows::default()),
            admin_failures: Mutex::new(FailureWindows::default()),
            lifecycle_lock: Mutex::new(()),
            connections: AtomicUsize::new(0),
            max_connections,
            requests_in_flight: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            metrics: Metrics::default(),
            cluster_state,
        })
    }

    /// Checks an admin's bearer token from `source`, with the same brake as
    /// registrations: after too many failures from one address in a minute,
    /// it gets 429 whatever it presents (the right token too, or a 200 would
    /// tell a guesser it has won).
    pub(crate) fn check_admin_from(
        &self,
        source: IpAddr,
        authorization: Option<&str>,
    ) -> Result<Caller, Refusal> {
        if let Some(wait) = lock(&self.admin_failures).blocked_for(source, now_ms()) {
            Metrics::bump(&self.metrics.rate_limited);
            let mut refusal = Refusal::new(
                Why::TooManyRequests,
                format!("too many failed admin authentications from {source}; retry in {wait}s"),
            );
            refusal.retry_after = Some(wait);
            return Err(refusal);
        }
        self.check_admin(authorization).inspect_err(|_| {
            lock(&self.admin_failures).record(source, now_ms());
        })
    }

    /// Finds the admin token behind a bearer header (constant time; see
    /// `roles::authenticate`).
    pub(crate) fn check_admin(&self, authorization: Option<&str>) -> Result<Caller, Refusal> {
        roles::authenticate(&lock(&self.admin_tokens), authorization, now_secs())
    }
}

/// Unix milliseconds now.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Unix seconds now.
pub(crate) fn now_secs() -> u64 {
    now_ms() / 1000
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it (the
/// data is plain state that every writer leaves consistent).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
