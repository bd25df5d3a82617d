//! The agent's retry schedule after failed heartbeats, as a rule both the
//! agent and the load generator that simulates a fleet of agents follow:
//! exponential backoff with full jitter, the window doubling from one
//! interval up to a cap (docs/operations.md, "After an outage").

use std::time::Duration;

/// The cap's ceiling: the window grows to four intervals, but no further
/// than this unless one interval is longer (then one interval). Long enough
/// to spread a whole fleet's return after an outage, short enough that the
/// server's timeout monitor (3 missed intervals by default) sees a returned
/// agent within a few minutes.
pub const RETRY_CAP_CEILING: Duration = Duration::from_secs(300);

/// The window the wait before the next attempt is drawn from, after
/// `failures` failures in a row: interval·2^(n-1), at most four intervals
/// and [`RETRY_CAP_CEILING`], and never less than one interval.
pub fn retry_window(interval: Duration, failures: u32) -> Duration {
    let cap = (interval * 4).min(RETRY_CAP_CEILING.max(interval));
    (interval * (1u32 << failures.saturating_sub(1).min(8))).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_windows_double_up_to_the_cap() {
        let windows =
            |i: Duration| -> Vec<u64> { (1..=6).map(|n| retry_window(i, n).as_secs()).collect() };
        // 4 intervals at most.
        assert_eq!(
            windows(Duration::from_secs(30)),
            [30, 60, 120, 120, 120, 120]
        );
        // ...but no more than 5 minutes...
        assert_eq!(
            windows(Duration::from_secs(120)),
            [120, 240, 300, 300, 300, 300]
        );
        // ...unless one interval is longer: then never less than one interval.
        assert_eq!(windows(Duration::from_secs(600)), [600; 6]);
        assert_eq!(
            retry_window(Duration::from_millis(100), u32::MAX),
            Duration::from_millis(400)
        );
    }
}
