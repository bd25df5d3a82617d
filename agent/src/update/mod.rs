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

use stella_proto::api::UpdateReport;
use stella_proto::states::UpdatePhase;
use stella_proto::text::{report_chars, report_text};

use crate::error::Error;
use crate::state::{MarkerPhase, StateDir, StateFile, UpdateFailure};
use crate::{fault, host, log};

mod download;
mod offer;
mod probation;
mod swap;

use download::{ChunkError, Download};
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
}

/// The updater's state in the running agent.
#[derive(Default)]
pub(crate) struct Updater {
    download: Option<Download>,
}

/// The phase a heartbeat reports for a marker in `state.json`. Swapping and
/// rolled-back predate `UpdatePhase` and keep the spellings agents have
/// always reported (a reader that does not know them shows them as they are).
fn marker_phase(phase: &MarkerPhase) -> UpdatePhase {
    match phase {
        MarkerPhase::Probation => UpdatePhase::Probation,
        MarkerPhase::Swapping | MarkerPhase::RolledBack | MarkerPhase::Other(_) => {
            UpdatePhase::Unknown(phase.as_str().to_owned())
        }
    }
}

impl Updater {
    /// Where the agent stands, for the heartbeat.
    pub(crate) fn report(&self, saved: &StateFile) -> UpdateReport {
        let mut out = UpdateReport {
            state: UpdatePhase::Idle,
            version: String::new(),
            error: None,
        };
        self.fill_report(saved, &mut out);
        out
    }

    /// Where the agent stands: the phase, the version it concerns, and why
    /// it failed.
    fn standing<'a>(&'a self, saved: &'a StateFile) -> (UpdatePhase, &'a str, Option<&'a str>) {
        if let Some(m) = &saved.update {
            (marker_phase(&m.phase), &m.to_version, m.error.as_deref())
        } else if let Some(d) = &self.download {
            // Why it is held up, if it is (a full disk, an unreachable server).
            (
                UpdatePhase::Downloading,
                &d.accepted.version,
                d.last_error.as_deref(),
            )
        } else if let Some(f) = &saved.update_failure {
            (UpdatePhase::Failed, &f.version, Some(&f.error))
        } else {
            (UpdatePhase::Idle, host::VERSION, None)
        }
    }

    /// Writes the report into `out`, allocating only when it changed.
    pub(crate) fn fill_report(&self, saved: &StateFile, out: &mut UpdateReport) {
        let (phase, version, error) = self.standing(saved);
        if out.state != phase {
            out.state = phase;
        }
        if out.version != version {
            out.version = version.to_owned();
        }
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
        if !d.is_complete() {
            match d.fetch_chunk(state, client, server) {
                Ok(()) => {
                    d.failures = 0;
                    d.last_error = None;
                    fault::point("update-after-chunk");
                    return Ok(Step::Busy);
                }
                Err(ChunkError::Refuse(e)) => {
                    self.fail(saved, e);
                    return Ok(Step::Idle);
                }
                Err(ChunkError::Retry(e)) => {
                    log::warn(
                        "update download interrupted; will resume",
                        &[("error", &e), ("received", &d.received)],
                    );
                    if d.received > 0 {
                        d.resumed_at = Some(d.received);
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
                d.received, d.accepted.sha256
            );
            self.fail(saved, error);
            return Ok(Step::Idle);
        }
        let install = install_path()?;
        let next = next_path(&install);
        if let Err(e) = stage_executable(&d.part, &next) {
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
                self.fail(saved, error);
            }
            return Ok(Step::Idle);
        }
        fault::point("update-after-verify");
        if let Err(e) = self_test(&next, state) {
            self.fail(saved, e);
            return Ok(Step::Idle);
        }
        if let Err(e) = check_version(&next, &d.accepted.version) {
            self.fail(saved, e);
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
                    self.fail(saved, error);
                }
                Ok(Step::Idle)
            }
        }
    }

    /// Records a failed update and forgets the download and its files.
    fn fail(&mut self, saved: &mut StateFile, error: String) {
        if let Some(d) = self.download.take() {
            let _ = fs::remove_file(&d.part);
            if let Ok(install) = install_path() {
                let _ = fs::remove_file(next_path(&install));
            }
            log::warn(
                "update failed; staying on this version",
                &[("version", &d.accepted.version), ("error", &error)],
            );
            saved.update_failure = Some(UpdateFailure {
                version: d.accepted.version,
                error,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::UpdateMarker;

    #[test]
    fn the_report_spells_phases_as_agents_always_did() {
        let updater = Updater::default();
        let mut saved = StateFile::default();
        assert_eq!(updater.report(&saved).state, "idle");
        saved.update_failure = Some(UpdateFailure {
            version: "9.9.9".into(),
            error: "no".into(),
        });
        assert_eq!(updater.report(&saved).state, "failed");
        for (phase, text) in [
            (MarkerPhase::Probation, "probation"),
            (MarkerPhase::Swapping, "swapping"),
            (MarkerPhase::RolledBack, "rolled-back"),
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
