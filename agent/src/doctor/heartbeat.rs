//! `heartbeat.recent`: the last acknowledged heartbeat is within three
//! intervals.

use super::{Finding, human, now_secs};

impl super::Doctor<'_> {
    pub(super) fn heartbeat(&self) -> Finding {
        let interval = match self.saved.heartbeat_interval_ms {
            0 => 30_000,
            ms => ms,
        } / 1000;
        let Some(last) = self
            .saved
            .last_heartbeat
            .as_deref()
            .and_then(stella_proto::time::parse_rfc3339)
        else {
            return warn!("heartbeat.recent/never", "no heartbeat acknowledged yet");
        };
        let age = now_secs().saturating_sub(last);
        if age > 3 * interval.max(1) {
            return fail!(
                "heartbeat.recent/stale",
                "last acknowledged {} ago (more than 3 intervals of {})",
                human(age),
                human(interval)
            );
        }
        pass!(
            "heartbeat.recent/ok",
            "last acknowledged {} ago (interval {})",
            human(age),
            human(interval)
        )
    }
}
