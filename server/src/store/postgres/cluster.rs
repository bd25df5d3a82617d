//! What several servers on one database share besides the records: the
//! events table (written in the same transaction as each change, so it is
//! the truth; `NOTIFY stella_events` only wakes the readers), the
//! `LISTEN` connection that waits for those wakes, the heartbeat feed
//! (rows stamped with the database's clock and the server that saved
//! them), the leases of singleton work with their fencing tokens, and the
//! fence check every write of singleton work passes.

use std::sync::Mutex;
use std::time::Duration;

use smol::future::FutureExt;
use tokio_postgres::{Client, Transaction};

use super::pool::{QUERY_TIMEOUT, Target, pg};
use super::{PgStore, decode, int, lock, uint};
use crate::records::{HeartbeatState, TaskResultRecord};
use crate::store::{ChangeEvent, ChangeKind, ChangesRead, Cluster, StoreError, Wake};

/// The channel `NOTIFY` wakes the servers on.
const CHANNEL: &str = "stella_events";

pub(super) mod sql {
    pub(in super::super) const EVENT_APPEND: &str =
        "INSERT INTO events (at, origin, kind, key) VALUES (stella_now_ms(), $1, $2, $3)";
    /// Delivered at commit, once per transaction however often it is said.
    pub(in super::super) const EVENT_NOTIFY: &str = "SELECT pg_notify('stella_events', '')";
    pub(super) const EVENTS_LAST: &str = "SELECT coalesce(max(seq), 0) FROM events";
    pub(super) const EVENTS_AFTER: &str = "SELECT seq, kind, key, origin FROM events \
         WHERE seq > $1 ORDER BY seq LIMIT $2";
    pub(super) const EVENTS_OLDEST: &str = "SELECT coalesce(min(seq), 0) FROM events";
    pub(super) const EVENTS_PRUNE: &str = "DELETE FROM events WHERE at < stella_now_ms() - $1";
    pub(super) const HEARTBEATS_SINCE: &str = "SELECT agent_id, state FROM heartbeats \
         WHERE flushed_at > $1 AND flushed_by <> $2";
    pub(super) const NOW_MS: &str = "SELECT stella_now_ms()";
    pub(super) const TASK_RESULT_GET: &str =
        "SELECT record FROM task_results WHERE task_id = $1 AND agent_id = $2";
    /// Takes a free or expired lease (with a new token) or renews our own
    /// (keeping the token); answers nothing when another server holds it.
    pub(super) const LEASE_ACQUIRE: &str = "INSERT INTO leases (name, holder, fence, expires_at) \
         VALUES ($1, $2, 1, stella_now_ms() + $3) \
         ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, \
         fence = CASE WHEN leases.holder = EXCLUDED.holder \
                       AND leases.expires_at > stella_now_ms() \
                 THEN leases.fence ELSE leases.fence + 1 END, \
         expires_at = EXCLUDED.expires_at \
         WHERE leases.holder = EXCLUDED.holder OR leases.expires_at <= stella_now_ms() \
         RETURNING fence";
    pub(super) const LEASE_RELEASE: &str =
        "UPDATE leases SET expires_at = 0 WHERE name = $1 AND holder = $2";
    /// Held (shared) until the commit, so a new holder's takeover waits for
    /// a write that passed the check.
    pub(in super::super) const LEASE_CHECK: &str = "SELECT 1 FROM leases WHERE name = $1 \
         AND holder = $2 AND fence = $3 AND expires_at > stella_now_ms() FOR SHARE";
}

/// The `LISTEN` connection, opened on first use and again after it broke.
#[derive(Default)]
pub(super) struct Listener {
    state: Mutex<ListenerState>,
}

#[derive(Default)]
struct ListenerState {
    /// The connection and its notifications, while listening.
    open: Option<(Client, smol::channel::Receiver<()>)>,
    /// Whether a listener was lost since the last one opened.
    lost: bool,
}

impl Listener {
    fn wait(&self, target: &Target, timeout: Duration) -> Wake {
        let mut state = lock(&self.state);
        if state.open.is_none() {
            match smol::block_on(listen(target).or(async {
                smol::Timer::after(QUERY_TIMEOUT).await;
                Err(())
            })) {
                Ok(open) => {
                    state.open = Some(open);
                    if std::mem::take(&mut state.lost) {
                        return Wake::Resync;
                    }
                }
                Err(()) => {
                    state.lost = true;
                    drop(state);
                    std::thread::sleep(timeout);
                    return Wake::Quiet;
                }
            }
        }
        let Some((client, notified)) = &state.open else {
            return Wake::Quiet;
        };
        if client.is_closed() {
            state.open = None;
            state.lost = true;
            return Wake::Quiet;
        }
        let woke = smol::block_on(
            async { notified.recv().await.is_ok().then_some(Wake::Notified) }.or(async {
                smol::Timer::after(timeout).await;
                Some(Wake::Quiet)
            }),
        );
        match woke {
            Some(wake) => {
                // Several wakes pending are one read.
                while notified.try_recv().is_ok() {}
                wake
            }
            None => {
                state.open = None;
                state.lost = true;
                Wake::Quiet
            }
        }
    }
}

async fn listen(target: &Target) -> Result<(Client, smol::channel::Receiver<()>), ()> {
    let (tx, rx) = smol::channel::bounded(1);
    let client = target.connect_notifying(Some(tx)).await.map_err(|_| ())?;
    client
        .batch_execute(&format!("LISTEN {CHANNEL}"))
        .await
        .map_err(|_| ())?;
    Ok((client, rx))
}

/// Appends the event of a change in `txn` and wakes the other servers at
/// its commit.
pub(super) async fn publish(
    txn: &Transaction<'_>,
    origin: &str,
    kind: ChangeKind,
    key: &str,
) -> Result<(), StoreError> {
    txn.execute(sql::EVENT_APPEND, &[&origin, &kind.as_str(), &key])
        .await
        .map_err(pg("record a change event"))?;
    txn.execute(sql::EVENT_NOTIFY, &[])
        .await
        .map_err(pg("notify the other servers"))?;
    Ok(())
}

/// Refuses to go on with `txn` unless this server still holds the lease
/// the calling thread's singleton work runs under (if any).
pub(super) async fn check_fence(
    txn: &Transaction<'_>,
    node: &str,
    fence: Option<(&'static str, u64)>,
) -> Result<(), StoreError> {
    let Some((lease, token)) = fence else {
        return Ok(());
    };
    let held = txn
        .query_opt(sql::LEASE_CHECK, &[&lease, &node, &int(token)])
        .await
        .map_err(pg("check the lease"))?;
    match held {
        Some(_) => Ok(()),
        None => Err(StoreError::Fenced { lease }),
    }
}

impl Cluster for PgStore {
    fn node(&self) -> &str {
        &self.node
    }

    fn last_change(&self) -> Result<u64, StoreError> {
        self.read(async |client| {
            let row = client
                .query_one(sql::EVENTS_LAST, &[])
                .await
                .map_err(pg("read the events"))?;
            Ok(uint(row.get(0)))
        })
    }

    fn changes_since(&self, after: u64, limit: usize) -> Result<ChangesRead, StoreError> {
        let limit = limit as i64;
        self.read(async |client| {
            let rows = client
                .query(sql::EVENTS_AFTER, &[&int(after), &limit])
                .await
                .map_err(pg("read the events"))?;
            let oldest = client
                .query_one(sql::EVENTS_OLDEST, &[])
                .await
                .map_err(pg("read the events"))?;
            let events = rows
                .iter()
                .map(|r| {
                    let event = ChangeEvent {
                        seq: uint(r.get(0)),
                        kind: ChangeKind::parse(r.get(1)),
                        key: r.get(2),
                    };
                    (event, r.get::<_, &str>(3) == self.node)
                })
                .collect();
            Ok((events, uint(oldest.get(0))))
        })
    }

    fn wait_for_change(&self, timeout: Duration) -> Wake {
        self.listener.wait(self.pool.target(), timeout)
    }

    fn record_failure(&self, kind: ChangeKind, source: &str) -> Result<(), StoreError> {
        self.write(async |txn| publish(txn, &self.node, kind, source).await)
    }

    fn heartbeats_since(
        &self,
        since_ms: u64,
    ) -> Result<(Vec<(String, HeartbeatState)>, u64), StoreError> {
        self.read(async |client| {
            let now: i64 = client
                .query_one(sql::NOW_MS, &[])
                .await
                .map_err(pg("read the database's clock"))?
                .get(0);
            let rows = client
                .query(sql::HEARTBEATS_SINCE, &[&int(since_ms), &self.node])
                .await
                .map_err(pg("read heartbeats"))?;
            let states = rows
                .iter()
                .map(|r| {
                    let id: String = r.get(0);
                    let state = decode("heartbeat", &id, r.get(1))?;
                    Ok((id, state))
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            Ok((states, uint(now)))
        })
    }

    fn task_result(&self, task: &str, agent: &str) -> Result<Option<TaskResultRecord>, StoreError> {
        self.read(async |client| {
            let row = client
                .query_opt(sql::TASK_RESULT_GET, &[&task, &agent])
                .await
                .map_err(pg("read a task result"))?;
            let key = format!("{task}/{agent}");
            row.map(|r| decode("task result", &key, r.get(0)))
                .transpose()
        })
    }

    fn acquire_lease(&self, name: &'static str, ttl: Duration) -> Result<Option<u64>, StoreError> {
        let ttl_ms = ttl.as_millis() as i64;
        self.read(async |client| {
            let row = client
                .query_opt(sql::LEASE_ACQUIRE, &[&name, &self.node, &ttl_ms])
                .await
                .map_err(pg("take the lease"))?;
            Ok(row.map(|r| uint(r.get(0))))
        })
    }

    fn release_lease(&self, name: &'static str) -> Result<(), StoreError> {
        self.read(async |client| {
            client
                .execute(sql::LEASE_RELEASE, &[&name, &self.node])
                .await
                .map_err(pg("give the lease up"))?;
            Ok(())
        })
    }

    fn prune_changes(&self, age: Duration) -> Result<u64, StoreError> {
        let age_ms = age.as_millis() as i64;
        self.read(async |client| {
            client
                .execute(sql::EVENTS_PRUNE, &[&age_ms])
                .await
                .map_err(pg("prune the events"))
        })
    }
}
