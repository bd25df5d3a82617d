//! Several servers on one store, as rules: how a server reads the change
//! feed without missing an event (sequence numbers are taken before commit,
//! so a later number may become visible first, and a rolled-back one never
//! does), how long a lease lasts and how often it is renewed, and when this
//! server may act as the leader. Pure: `app::cluster` runs these against
//! the store.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::store::ChangeEvent;

/// The lease of singleton work (heartbeat-timeout monitor, rollout
/// controller, pruning the events).
pub(crate) const LEADER_LEASE: &str = "leader";
/// How long a lease lasts without renewal: a dead leader's work is taken
/// over within this (plus one renewal period).
pub(crate) const LEASE_TTL: Duration = Duration::from_secs(10);
/// How often the leader renews and the others try to take the lease.
pub(crate) const LEASE_RENEW: Duration = Duration::from_secs(2);
/// The leader stops acting this long before its lease runs out by its own
/// clock, so that a slow renewal never lets two servers act at once (the
/// fence in every singleton write is the second guard).
pub(crate) const LEASE_MARGIN: Duration = Duration::from_secs(2);
/// How long a server waits for notifications before it reads the events
/// anyway: the bound on staleness when a notification is lost.
pub(crate) const POLL_EVENTS: Duration = Duration::from_millis(500);
/// How often a server reads the heartbeat states the others saved.
pub(crate) const POLL_HEARTBEATS: Duration = Duration::from_secs(1);
/// How far back each read of the heartbeat feed reaches before the last
/// one: covers a batch whose commit took longer than its timestamp says
/// (a store call never takes longer than 5 s).
pub(crate) const HEARTBEAT_OVERLAP: Duration = Duration::from_secs(6);
/// Events older than this are deleted by the leader; a server further
/// behind resyncs every cache.
pub(crate) const EVENTS_KEPT: Duration = Duration::from_secs(3600);
/// How long a hole in the sequence is waited for before it is taken for a
/// rolled-back transaction: longer than any store call may take.
pub(crate) const HOLE_WAIT: Duration = Duration::from_secs(10);
/// Events read per query.
pub(crate) const EVENTS_PER_READ: usize = 1_000;
/// More holes than this at once: give up waiting for them (a resync is
/// cheaper than tracking them).
const MAX_HOLES: u64 = 10_000;

/// Where a server stands in the change feed.
#[derive(Debug)]
pub(crate) struct EventCursor {
    /// Every event up to this one was applied or given up on.
    done: u64,
    /// Events above `done` already applied.
    applied: BTreeSet<u64>,
    /// Numbers above `done` not seen yet, with when they were first missed.
    holes: BTreeMap<u64, Instant>,
}

/// What a read of the feed asks of the server.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Apply these events, in order.
    Apply(Vec<ChangeEvent>),
    /// The feed was pruned past this server: reload every cache.
    Resync,
}

impl EventCursor {
    /// A cursor after event `last` (read before the caches were loaded, so
    /// that nothing written after the load is missed).
    pub(crate) fn new(last: u64) -> Self {
        Self {
            done: last,
            applied: BTreeSet::new(),
            holes: BTreeMap::new(),
        }
    }

    /// Where the next read starts (exclusive).
    pub(crate) fn after(&self) -> u64 {
        self.done
    }

    /// Takes a read: `events` after [`after`](Self::after) in order (every
    /// server's, this one's included, so that its own numbers are not
    /// holes), and `oldest`, the oldest event the store still keeps.
    /// `mine` tells this server's events, which it applied already.
    pub(crate) fn take(
        &mut self,
        events: Vec<(ChangeEvent, bool)>,
        oldest: u64,
        now: Instant,
    ) -> Step {
        if oldest > self.done + 1 && self.done > 0 {
            let last = events.last().map_or(oldest - 1, |(e, _)| e.seq);
            *self = Self::new(last);
            return Step::Resync;
        }
        let mut fresh = Vec::new();
        for (event, mine) in events {
            if event.seq <= self.done || !self.applied.insert(event.seq) {
                continue;
            }
            self.holes.remove(&event.seq);
            if !mine {
                fresh.push(event);
            }
        }
        let highest = self.applied.last().copied().unwrap_or(self.done);
        if highest - self.done > MAX_HOLES {
            self.holes.clear();
            self.applied.clear();
            self.done = highest;
            return Step::Apply(fresh);
        }
        for seq in self.done + 1..highest {
            if !self.applied.contains(&seq) {
                self.holes.entry(seq).or_insert(now);
            }
        }
        loop {
            let next = self.done + 1;
            if self.applied.remove(&next) {
                self.done = next;
            } else if self
                .holes
                .get(&next)
                .is_some_and(|since| now.duration_since(*since) >= HOLE_WAIT)
            {
                self.holes.remove(&next);
                self.done = next;
            } else {
                break;
            }
        }
        Step::Apply(fresh)
    }
}

/// This server's standing in the leader lease.
#[derive(Debug, Default)]
pub(crate) struct Leadership {
    /// The fencing token while leading.
    fence: Option<u64>,
    /// Until when (by this server's clock) it may act on it.
    until: Option<Instant>,
}

/// What a lease attempt changed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Turn {
    /// Became the leader (or leads again under a new token): resync what
    /// the leader decides from, then act.
    Took(u64),
    /// Renewed or still not leading.
    Same,
    /// Lost the lease.
    Lost,
}

impl Leadership {
    /// The outcome of an attempt started at `asked`: `Ok(Some(token))`
    /// holds the lease, `Ok(None)` another server holds it, `Err(())` the
    /// store did not answer (the lease runs out on its own).
    pub(crate) fn attempted(&mut self, outcome: Result<Option<u64>, ()>, asked: Instant) -> Turn {
        let was = self.fence;
        match outcome {
            Ok(Some(token)) => {
                self.fence = Some(token);
                self.until = Some(asked + LEASE_TTL - LEASE_MARGIN);
                if was == Some(token) {
                    Turn::Same
                } else {
                    Turn::Took(token)
                }
            }
            Ok(None) => {
                *self = Self::default();
                if was.is_some() {
                    Turn::Lost
                } else {
                    Turn::Same
                }
            }
            Err(()) => {
                if self.until.is_some_and(|until| Instant::now() >= until) {
                    *self = Self::default();
                    return Turn::Lost;
                }
                Turn::Same
            }
        }
    }

    /// The token to act under now, if leading.
    pub(crate) fn fence(&self, now: Instant) -> Option<u64> {
        match (self.fence, self.until) {
            (Some(fence), Some(until)) if now < until => Some(fence),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ChangeKind;

    fn event(seq: u64) -> (ChangeEvent, bool) {
        (
            ChangeEvent {
                seq,
                kind: Some(ChangeKind::Agent),
                key: format!("a{seq}"),
            },
            false,
        )
    }

    fn seqs(step: Step) -> Vec<u64> {
        match step {
            Step::Apply(events) => events.iter().map(|e| e.seq).collect(),
            Step::Resync => panic!("unexpected resync"),
        }
    }

    #[test]
    fn events_apply_once_in_order_and_the_cursor_moves_past_them() {
        let now = Instant::now();
        let mut cursor = EventCursor::new(10);
        assert_eq!(
            seqs(cursor.take(vec![event(11), event(12)], 1, now)),
            [11, 12]
        );
        assert_eq!(cursor.after(), 12);
        assert_eq!(
            seqs(cursor.take(vec![event(12)], 1, now)),
            Vec::<u64>::new()
        );
    }

    #[test]
    fn a_hole_holds_the_cursor_until_it_fills_or_times_out() {
        let now = Instant::now();
        let mut cursor = EventCursor::new(0);
        // 2 committed after 3: 3 is applied at once, the cursor waits at 1.
        assert_eq!(seqs(cursor.take(vec![event(1), event(3)], 1, now)), [1, 3]);
        assert_eq!(cursor.after(), 1);
        // Read again from 1: 3 is not applied twice; 2 arrives.
        assert_eq!(seqs(cursor.take(vec![event(2), event(3)], 1, now)), [2]);
        assert_eq!(cursor.after(), 3);
        // 5 arrives, 4 never does (rolled back): given up after the wait.
        assert_eq!(seqs(cursor.take(vec![event(5)], 1, now)), [5]);
        assert_eq!(cursor.after(), 3);
        assert_eq!(
            seqs(cursor.take(vec![event(5)], 1, now + HOLE_WAIT)),
            Vec::<u64>::new()
        );
        assert_eq!(cursor.after(), 5);
    }

    #[test]
    fn own_events_are_not_applied_but_are_no_holes() {
        let now = Instant::now();
        let mut cursor = EventCursor::new(0);
        let (mine, _) = event(2);
        let step = cursor.take(vec![event(1), (mine, true), event(3)], 1, now);
        assert_eq!(seqs(step), [1, 3]);
        assert_eq!(cursor.after(), 3);
    }

    #[test]
    fn a_cursor_behind_the_pruned_feed_resyncs() {
        let now = Instant::now();
        let mut cursor = EventCursor::new(5);
        assert_eq!(cursor.take(vec![event(50)], 40, now), Step::Resync);
        assert_eq!(cursor.after(), 50);
    }

    #[test]
    fn leadership_is_taken_renewed_and_lost() {
        let asked = Instant::now();
        let mut lead = Leadership::default();
        assert_eq!(lead.attempted(Ok(None), asked), Turn::Same);
        assert_eq!(lead.fence(asked), None);
        assert_eq!(lead.attempted(Ok(Some(7)), asked), Turn::Took(7));
        assert_eq!(lead.fence(asked), Some(7));
        assert_eq!(lead.attempted(Ok(Some(7)), asked), Turn::Same);
        // No answer from the store: it leads until its margin, then not.
        assert_eq!(lead.attempted(Err(()), asked), Turn::Same);
        assert_eq!(lead.fence(asked + LEASE_TTL - LEASE_MARGIN), None);
        // A new term is a new token.
        assert_eq!(lead.attempted(Ok(Some(8)), asked), Turn::Took(8));
        assert_eq!(lead.attempted(Ok(None), asked), Turn::Lost);
        assert_eq!(lead.fence(asked), None);
    }
}
