//! Named crash points for crash-consistency tests. With the
//! `fault-injection` feature, `STELLA_FAULT=<point>` makes the agent exit
//! abruptly (code 86, no cleanup) when it reaches that point; without the
//! feature this compiles to nothing. A few names are behaviours instead
//! (`active`): `download-stall` (an update download stops after its first
//! chunk, without an error), `lost-commit-ack` (the answer to the first
//! heartbeat reporting `committed` is dropped after the server took it),
//! `probation-no-heartbeat`, `probation-crash` and `self-test-fail`.

/// Exit here if the tests asked for a crash at `point`.
#[cfg(feature = "fault-injection")]
pub(crate) fn point(point: &str) {
    if std::env::var("STELLA_FAULT").is_ok_and(|p| p == point) {
        crate::log::warn("fault injected: exiting abruptly", &[("point", &point)]);
        std::process::exit(86);
    }
}

/// Whether the tests asked for the fault `name` (a behaviour, not a crash).
#[cfg(feature = "fault-injection")]
pub(crate) fn active(name: &str) -> bool {
    std::env::var("STELLA_FAULT").is_ok_and(|p| p == name)
}

/// Whether the tests asked for the fault `name` (a behaviour, not a crash).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub(crate) fn active(_name: &str) -> bool {
    false
}

/// Exit here if the tests asked for a crash at `point`.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub(crate) fn point(_point: &str) {}
