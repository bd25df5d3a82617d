//! Self-update from signed releases (docs/design.md section 5), in four parts:
//! `offer` (check an offer against the pinned release key, target and
//! version), `download` (chunks with HTTP Range into the staging dir,
//! hashed as they arrive), `swap` (stage next to the binary, `self-test`,
//! keep `.prev`, rename, exec in place) and `probation` (the new version
//! must get a heartbeat acknowledged and pass doctor within the window, or
//! `.prev` comes back; a start counter catches a crash loop). At every
//! instant a runnable, verified binary is at the install path. This file
//! holds the updater the run loop drives one step at a time, and what the
//! heartbeat reports of it.

use std::fs;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use stella_proto::api::{UpdateFailureReport, UpdateReport};
use stella_proto::states::UpdatePhase;
use stella_proto::text::{report_chars, report_text};

use crate::error::Error;
use crate::state::{FAILURE_LOG, MarkerPhase, StateDir, StateFile, UPDATE_LOG, UpdateFailure};
use crate::{fault, host, log};

mod download;
mod offer;
mod probation;
mod swap;

use download::{ChunkError, Download, Stage};
pub(crate) use probation::finish_rollback;
pub(crate) use swap::run_self_test;
use swap::{
    SwapFailure, check_version, install_path, next_path, self_test, stage_executable, swap,
};

/// Writes `state.json` during an update step. A failure (a full disk) is
/// logged, not fatal: the run loop writes the state again later, and every
/// marker read at start-up is settled safely whether or not it was written.
fn persist(state: &StateDir, saved: &StateFile) {
    if let Err(e) = state.save_state(saved) {
        log::warn("could not save state", &[("error", &e)]);
    }
}

/// Whether a failed write may work later by itself: the disk (or the
/// quota) was full. Such a failure is retried; any other fails the update.
fn out_of_space(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What the run loop should do after an update step.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Nothing pending.
    Idle,
    /// More to download: come back soon.
    Busy,
    /// The update entered a new phase: heartbeat now so the server sees it.
    Report,
}

/// The updater's state in the running agent.
#[derive(Default)]
pub(crate) struct Updater {
    download: Option<Download>,
    /// A release accepted that waits for the agent's own `update_window`.
    waiting: Option<String>,
}

/// The phase a heartbeat reports for a marker in `state.json` (whose own
/// spellings, `swapping` and `rolled-back`, stay as they are on disk).
fn marker_phase(phase: &MarkerPhase) -> UpdatePhase {
    match phase {
        MarkerPhase::Swapping => UpdatePhase::Swapped,
        MarkerPhase::Probation => UpdatePhase::Probation,
        MarkerPhase::RolledBack => UpdatePhase::RolledBack,
        MarkerPhase::Other(text) => UpdatePhase::Unknown(text.clone()),
    }
}

/// Where the agent stands with an update, borrowed from its state.
struct Standing<'a> {
    phase: UpdatePhase,
    version: &'a str,
    error: Option<&'a str>,
    bytes: Option<u64>,
    total: Option<u64>,
}

impl<'a> Standing<'a> {
    fn new(phase: UpdatePhase, version: &'a str, error: Option<&'a str>) -> Self {
        Standing {
            phase,
            version,
            error,
            bytes: None,
            total: None,
        }
    }
}

/// Records a failed update of `version` (`rolled_back`: the new version ran
/// and was put back) and stops keeping log lines: those kept since the
/// offer become the failure's log in the state dir (none kept: the process
/// that rolled back wrote it already).
pub(crate) fn record_failure(
    state: &StateDir,
    saved: &mut StateFile,
    version: String,
    error: String,
    rolled_back: bool,
) {
    let lines = log::capture_take();
    if !lines.is_empty()
        && let Err(e) = state.write_lines(FAILURE_LOG, &lines)
    {
        log::warn("could not keep the failed update's log", &[("error", &e)]);
    }
    let _ = state.remove(UPDATE_LOG);
    saved.committed = None;
    saved.update_failure = Some(UpdateFailure {
        version,
        error,
        rolled_back: rolled_back.then_some(true),
        reported: None,
    });
}

/// The last failed update with its log lines, while no heartbeat carrying
/// it has been acknowledged.
pub(crate) fn failure_to_report(
    state: &StateDir,
    saved: &StateFile,
) -> Option<UpdateFailureReport> {
    let f = saved
        .update_failure
        .as_ref()
        .filter(|f| f.reported != Some(true))?;
    Some(UpdateFailureReport {
        version: f.version.clone(),
        phase: if f.rolled_back == Some(true) {
            UpdatePhase::RolledBack
        } else {
            UpdatePhase::Failed
        },
        reason: report_text(&f.error),
        lines: state.read_lines(FAILURE_LOG),
    })
}

impl Updater {
    /// Where the agent stands, for the heartbeat.
    pub(crate) fn report(&self, saved: &StateFile) -> UpdateReport {
        let mut out = UpdateReport {
            state: UpdatePhase::Idle,
            version: String::new(),
            error: None,
            bytes: None,
            total: None,
        };
        self.fill_report(saved, &mut out);
        out
    }

    /// Where the agent stands: the phase, the version it concerns, why it
    /// failed, and the download's progress.
    fn standing<'a>(&'a self, saved: &'a StateFile) -> Standing<'a> {
        if let Some(m) = &saved.update {
            let error = m.error.as_deref();
            Standing::new(marker_phase(&m.phase), &m.to_version, error)
        } else if let Some(d) = &self.download {
            // Why it is held up, if it is (a full disk, an unreachable server).
            let version = &d.accepted.version;
            let error = d.last_error.as_deref();
            match d.stage {
                Stage::Fetching => Standing {
                    bytes: Some(d.file.received),
                    total: d.file.total.or((d.offer.size > 0).then_some(d.offer.size)),
                    ..Standing::new(UpdatePhase::Downloading, version, error)
                },
                Stage::Verified => Standing::new(UpdatePhase::Verified, version, error),
                Stage::SelfTest => Standing::new(UpdatePhase::SelfTest, version, error),
            }
        } else if let Some(version) = &self.waiting {
            Standing::new(UpdatePhase::Offered, version, None)
        } else if let Some(version) = &saved.committed {
            Standing::new(UpdatePhase::Committed, version, None)
        } else if let Some(f) = &saved.update_failure {
            let phase = if f.rolled_back == Some(true) {
                UpdatePhase::RolledBack
            } else {
                UpdatePhase::Failed
            };
            Standing::new(phase, &f.version, Some(&f.error))
        } else {
            Standing::new(UpdatePhase::Idle, host::VERSION, None)
        }
    }

    /// Writes the report into `out`, allocating only when it changed.
    pub(crate) fn fill_report(&self, saved: &StateFile, out: &mut UpdateReport) {
        let Standing {
            phase,
            version,
            error,
            bytes,
            total,
        } = self.standing(saved);
        if out.state != phase {
            out.state = phase;
        }
        if out.version != version {
            out.version = version.to_owned();
        }
        out.bytes = bytes;
        out.total = total;
        // The server refuses control characters and over-long texts (a
        // self-test's stderr has both): report the printable, bounded form.
        let same = match (out.error.as_deref(), error) {
            (None, None) => true,
            (Some(have), Some(raw)) => report_chars(raw).eq(have.chars()),
            _ => false,
        };
        if !same {
            out.error = error.map(report_text);
        }
    }

    /// One turn of work: fetch the next chunk, or, once complete, verify,
    /// self-test, swap and exec (which does not return).
    pub(crate) fn step(
        &mut self,
        state: &StateDir,
        saved: &mut StateFile,
        client: &mut crate::transport::Client,
        server: &str,
    ) -> Result<Step, Error> {
        let Some(d) = self.download.as_mut() else {
            return Ok(Step::Idle);
        };
        if Instant::now() < d.retry_at {
            return Ok(Step::Idle);
        }
        match d.stage {
            Stage::Fetching => {}
            Stage::Verified => {
                d.stage = Stage::SelfTest;
                log::info(
                    "running the self-test of the new binary",
                    &[("version", &d.accepted.version)],
                );
                return Ok(Step::Report);
            }
            Stage::SelfTest => return self.install(state, saved),
        }
        if !d.is_complete() {
            if fault::active("download-stall") && d.file.received > 0 {
                // A download that never finishes (for the rollout deadline
                // tests): no more bytes, no error.
                return Ok(Step::Idle);
            }
            match d.fetch_chunk(state, client, server) {
                Ok(()) => {
                    d.failures = 0;
                    d.last_error = None;
                    fault::point("update-after-chunk");
                    return Ok(Step::Busy);
                }
                Err(ChunkError::Refuse(e)) => {
                    self.fail(state, saved, e);
                    return Ok(Step::Idle);
                }
                Err(ChunkError::Retry(e)) => {
                    log::warn(
                        "update download interrupted; will resume",
                        &[("error", &e), ("received", &d.file.received)],
                    );
                    if d.file.received > 0 {
                        d.resumed_at = Some(d.file.received);
                    }
                    d.retry_later(e);
                    return Ok(Step::Idle);
                }
            }
        }
        fault::point("update-after-download");
        // Hashed as it arrived: the staged file is not read again for this.
        let digest = d.digest();
        if digest != d.accepted.sha256 {
            if let Some(at) = d.resumed_at
                && !d.restarted_after_mismatch
            {
                // The bytes kept from before the interruption may be what is
                // wrong: throw them away and fetch the whole artifact once more.
                log::warn(
                    "the resumed download does not match the signed release; downloading it again from the start",
                    &[
                        ("version", &d.accepted.version),
                        ("resumed_at", &at),
                        ("sha256", &digest),
                    ],
                );
                d.restart();
                d.restarted_after_mismatch = true;
                return Ok(Step::Busy);
            }
            let how = match d.resumed_at {
                Some(at) => format!("resumed at byte {at} after an interruption"),
                None => "fetched in one piece from byte 0".to_owned(),
            };
            let again = if d.restarted_after_mismatch {
                "; an earlier, resumed download of it did not match either"
            } else {
                ""
            };
            let error = format!(
                "the download ({} bytes, {how}) has sha256 {digest}, the signed release says {}{again}",
                d.file.received, d.accepted.sha256
            );
            self.fail(state, saved, error);
            return Ok(Step::Idle);
        }
        let install = install_path()?;
        let next = next_path(&install);
        if let Err(e) = stage_executable(&d.file.path, &next) {
            let error = format!(
                "cannot stage the new binary next to {}: {e}",
                install.display()
            );
            d.unstage(&next);
            if out_of_space(&e) {
                // The verified bytes are kept: try again when there is room.
                log::warn("update waits: staging failed", &[("error", &error)]);
                d.retry_later(error);
            } else {
                self.fail(state, saved, error);
            }
            return Ok(Step::Idle);
        }
        fault::point("update-after-verify");
        log::info(
            "update verified",
            &[("version", &d.accepted.version), ("sha256", &digest)],
        );
        d.stage = Stage::Verified;
        Ok(Step::Report)
    }

    /// The last steps of an update, once verified and staged: the new
    /// binary's self-test and version, then the swap and exec (which does
    /// not return).
    fn install(&mut self, state: &StateDir, saved: &mut StateFile) -> Result<Step, Error> {
        let Some(d) = self.download.as_mut() else {
            return Ok(Step::Idle);
        };
        let install = install_path()?;
        let next = next_path(&install);
        if let Err(e) = self_test(&next, state) {
            self.fail(state, saved, e);
            return Ok(Step::Idle);
        }
        if let Err(e) = check_version(&next, &d.accepted.version) {
            self.fail(state, saved, e);
            return Ok(Step::Idle);
        }
        match swap(state, saved, &install, &next, d) {
            SwapFailure::Exec(e) => Err(e),
            SwapFailure::NotSwapped { error, full } => {
                d.unstage(&next);
                if full {
                    log::warn(
                        "update waits: the swap could not start; the old binary stays",
                        &[("error", &error)],
                    );
                    d.retry_later(error);
                } else {
                    self.fail(state, saved, error);
                }
                Ok(Step::Idle)
            }
        }
    }

    /// Records a failed update and forgets the download and its files.
    fn fail(&mut self, state: &StateDir, saved: &mut StateFile, error: String) {
        if let Some(d) = self.download.take() {
            let _ = fs::remove_file(&d.file.path);
            if let Ok(install) = install_path() {
                let _ = fs::remove_file(next_path(&install));
            }
            log::warn(
                "update failed; staying on this version",
                &[("version", &d.accepted.version), ("error", &error)],
            );
            record_failure(state, saved, d.accepted.version, error, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::UpdateMarker;

    #[test]
    fn the_report_spells_every_phase_as_update_phase_does() {
        let updater = Updater::default();
        let mut saved = StateFile::default();
        assert_eq!(updater.report(&saved).state, "idle");
        saved.update_failure = Some(UpdateFailure {
            version: "9.9.9".into(),
            error: "no".into(),
            ..Default::default()
        });
        assert_eq!(updater.report(&saved).state, "failed");
        saved.update_failure.as_mut().unwrap().rolled_back = Some(true);
        assert_eq!(updater.report(&saved).state, "rolled_back");
        saved.committed = Some("9.9.9".into());
        assert_eq!(updater.report(&saved).state, "committed");
        let waiting = Updater {
            waiting: Some("9.9.9".into()),
            ..Updater::default()
        };
        assert_eq!(waiting.report(&saved).state, "offered");
        for (phase, text) in [
            (MarkerPhase::Probation, "probation"),
            (MarkerPhase::Swapping, "swapped"),
            (MarkerPhase::RolledBack, "rolled_back"),
            (MarkerPhase::Other("paused".into()), "paused"),
        ] {
            saved.update = Some(UpdateMarker {
                phase,
                from_version: "1.0.0".into(),
                to_version: "9.9.9".into(),
                to_sha256: String::new(),
                install_path: String::new(),
                starts: 0,
                probation_ms: 0,
                probation_until: 0,
                error: None,
            });
            assert_eq!(updater.report(&saved).state, text);
        }
    }

    #[test]
    fn a_failure_is_reported_printable_and_bounded_and_only_rebuilt_when_it_changes() {
        let updater = Updater::default();
        let mut saved = StateFile::default();
        let raw = format!("self-test failed:\n\u{1b}[31m{}", "x".repeat(5000));
        saved.update_failure = Some(UpdateFailure {
            version: "9.9.9".into(),
            error: raw,
            ..Default::default()
        });
        let mut report = updater.report(&saved);
        let error = report.error.clone().unwrap();
        assert!(stella_proto::text::is_report_text(&error), "{error:?}");
        assert!(error.starts_with("self-test failed:  [31mxxx"));
        let before = report.error.as_ref().unwrap().as_ptr();
        updater.fill_report(&saved, &mut report);
        assert_eq!(report.error.as_ref().unwrap().as_ptr(), before);
        saved.update_failure.as_mut().unwrap().error = "other".into();
        updater.fill_report(&saved, &mut report);
        assert_eq!(report.error.as_deref(), Some("other"));
    }
}
