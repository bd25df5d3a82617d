//! The running server's shared state: settings, store, CA, the in-memory fleet
//! and counters. Handlers reach everything through one `Arc<App>`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::ca::Ca;
use crate::lifecycle::Fleet;
use crate::store::Store;

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
}

impl Metrics {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Everything a request handler may need.
pub(crate) struct App {
    pub(crate) settings: Settings,
    pub(crate) store: Store,
    pub(crate) ca: Ca,
    pub(crate) fleet: Mutex<Fleet>,
    /// Desired configuration by scope. Lock order: lifecycle_lock, configs, fleet.
    pub(crate) configs: Mutex<crate::config::Configs>,
    /// Imported releases. Lock order: after fleet.
    pub(crate) releases: Mutex<crate::releases::Releases>,
    /// Rollouts and current offers. Lock order: after fleet and releases.
    pub(crate) rollouts: Mutex<crate::rollout::Rollouts>,
    pub(crate) data_dir: std::path::PathBuf,
    /// Failed registrations per source address (brute-force brake).
    pub(crate) registration_failures: Mutex<crate::tokens::FailureWindows>,
    /// Open connections, and how many are allowed.
    pub(crate) connections: std::sync::atomic::AtomicUsize,
    pub(crate) max_connections: usize,
    /// Held across a durable agent change and its mirror in `fleet`, so the
    /// two never disagree in order.
    pub(crate) lifecycle_lock: Mutex<()>,
    pub(crate) admin_sha256: Vec<u8>,
    /// Outstanding recovery challenges.
    pub(crate) challenges: Mutex<crate::renewal::Challenges>,
    pub(crate) metrics: Metrics,
    pub(crate) started_ms: u64,
}

/// A request refused: the HTTP status and a message for the caller.
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) status: u16,
    pub(crate) message: String,
}

impl Refused {
    pub(crate) fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
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
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
