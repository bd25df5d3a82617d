//! Probation of a new version (docs/design.md section 5): the marker a swap
//! left is settled at start-up (a start counter rolls back a binary that
//! crash-loops), the first acknowledged heartbeat plus a passing doctor
//! commit the update, and a window that runs out without one restores
//! `<binary>.prev` and execs it. Remediation can finish a rollback of an
//! interrupted swap while the agent is stopped. A marker that cannot be
//! written (a full disk) does not stop the agent: each one left on disk
//! is settled safely at the next start.

use std::fs;
use std::path::{Path, PathBuf};

use super::swap::{exec, next_path, prev_path, sync_dir};
use super::{Updater, now_secs, persist, record_failure};
use crate::doctor::Doctor;
use crate::error::Error;
use crate::state::{FAILURE_LOG, MarkerPhase, StateDir, StateFile, UPDATE_LOG};
use crate::{fault, host, log};

/// A new version that starts this many times without passing probation is
/// rolled back.
const MAX_STARTS: u32 = 3;

impl Updater {
    /// At start-up: settles a marker left by a swap, a probation or a
    /// rollback. May exec the previous binary (crash loop) and not return.
    pub(crate) fn on_start(state: &StateDir, saved: &mut StateFile) -> Result<(), Error> {
        let Some(mut m) = saved.update.clone() else {
            return Ok(());
        };
        let running = host::VERSION;
        match m.phase {
            MarkerPhase::Swapping if running == m.to_version => {
                // The rename happened before the crash: the new version is live.
                adopt_update_log(state);
                m.phase = MarkerPhase::Probation;
                m.starts = 1;
                m.probation_until = now_secs() + m.probation_ms.div_ceil(1000);
                saved.update = Some(m);
                persist(state, saved);
            }
            MarkerPhase::Swapping => {
                // The swap did not happen: the old binary is in place. Tidy up.
                let _ = fs::remove_file(next_path(Path::new(&m.install_path)));
                adopt_update_log(state);
                log::warn(
                    "an update swap was interrupted before the rename; staying on this version",
                    &[("version", &m.to_version)],
                );
                saved.update = None;
                record_failure(
                    state,
                    saved,
                    m.to_version,
                    "the swap was interrupted; it will be tried again".into(),
                    false,
                );
                persist(state, saved);
            }
            MarkerPhase::Probation if running == m.to_version => {
                adopt_update_log(state);
                m.starts += 1;
                let starts = m.starts;
                saved.update = Some(m);
                persist(state, saved);
                if starts > MAX_STARTS {
                    return Err(rollback(
                        state,
                        saved,
                        &format!(
                            "the new version started {starts} times without passing probation"
                        ),
                    ));
                }
                if fault::active("probation-crash") {
                    log::warn("fault injected: crashing in probation", &[]);
                    std::process::exit(86);
                }
            }
            MarkerPhase::RolledBack | MarkerPhase::Probation => {
                // We are the old version again: report why, and forget the marker.
                let error = m.error.clone().unwrap_or_else(|| "rolled back".into());
                // The new version wrote the failure's log as it rolled back,
                // unless it died first: then its lines so far are the log.
                adopt_update_log(state);
                log::warn(
                    "the update was rolled back",
                    &[("version", &m.to_version), ("error", &error)],
                );
                saved.update = None;
                record_failure(state, saved, m.to_version, error, true);
                persist(state, saved);
            }
            MarkerPhase::Other(_) => {
                saved.update = None;
                persist(state, saved);
            }
        }
        Ok(())
    }

    /// After an acknowledged heartbeat on probation: doctor must pass, then
    /// the update is committed; otherwise it is rolled back.
    pub(crate) fn probation_ack(state: &StateDir, saved: &mut StateFile) -> Result<(), Error> {
        if !saved.in_probation() {
            return Ok(());
        }
        // Doctor reads state.json: let it see the acknowledged heartbeat.
        persist(state, saved);
        let report = Doctor::new(state).run_all();
        if report.any_failed() {
            let failing = report.summary().failing.join(", ");
            return Err(rollback(
                state,
                saved,
                &format!("doctor failed on the new version: {failing}"),
            ));
        }
        fault::point("update-before-confirm");
        let Some(m) = saved.update.take() else {
            return Ok(());
        };
        saved.binary_sha256 = Some(m.to_sha256.clone());
        saved.update_failure = None;
        // Reported (`committed`) until a heartbeat saying so is acknowledged.
        saved.committed = Some(m.to_version.clone());
        log::capture_take();
        let _ = state.remove(UPDATE_LOG);
        persist(state, saved);
        log::info(
            "update committed",
            &[("from", &m.from_version), ("to", &m.to_version)],
        );
        Ok(())
    }

    /// Rolls back when probation ran out without an acknowledged heartbeat.
    pub(crate) fn check_probation_deadline(
        state: &StateDir,
        saved: &mut StateFile,
    ) -> Result<(), Error> {
        let expired = saved
            .update
            .as_ref()
            .is_some_and(|m| m.phase == MarkerPhase::Probation && now_secs() > m.probation_until);
        if expired {
            return Err(rollback(
                state,
                saved,
                "no heartbeat was acknowledged within the probation window",
            ));
        }
        Ok(())
    }
}

/// Puts `.prev` back over the binary, records why, and execs it.
fn rollback(state: &StateDir, saved: &mut StateFile, error: &str) -> Error {
    let Some(m) = saved.update.as_mut() else {
        return Error::Invalid("rollback without an update marker".into());
    };
    let install = PathBuf::from(&m.install_path);
    let prev = prev_path(&install);
    log::error(
        "rolling back the update",
        &[("to", &m.from_version), ("error", &error)],
    );
    if let Err(e) = fs::rename(&prev, &install).and_then(|()| sync_dir(&install)) {
        // Nothing to go back to: keep running this version and say so.
        let failure = format!("{error}; rollback impossible: {e}");
        let version = m.to_version.clone();
        saved.update = None;
        record_failure(state, saved, version, failure.clone(), false);
        let _ = state.save_state(saved);
        return Error::Invalid(failure);
    }
    // The log survives the exec of the old version, which reports it.
    let lines = log::capture_take();
    if !lines.is_empty() {
        let _ = state.write_lines(FAILURE_LOG, &lines);
    }
    let _ = state.remove(UPDATE_LOG);
    m.phase = MarkerPhase::RolledBack;
    m.error = Some(error.to_owned());
    // Unwritten (a full disk), the `probation` marker still tells the old
    // version that the update was rolled back.
    persist(state, saved);
    exec(&install)
}

/// Keeps logging into the update's log that the process before this one
/// left (the exec of a new or the old version), if it left one.
fn adopt_update_log(state: &StateDir) {
    let lines = state.read_lines(UPDATE_LOG);
    if !lines.is_empty() {
        log::capture_start(lines);
    }
}

/// Remediation of an interrupted swap (agent not running): put `.prev` back
/// if it is there, and clear the marker.
pub(crate) fn finish_rollback(state: &StateDir) -> Result<String, Error> {
    let mut saved = state.state_file();
    let Some(m) = saved.update.clone() else {
        return Ok("no update in progress".into());
    };
    let install = PathBuf::from(&m.install_path);
    let prev = prev_path(&install);
    let result = if prev.exists() {
        fs::rename(&prev, &install)
            .and_then(|()| sync_dir(&install))
            .map_err(|e| Error::io(format!("cannot restore {}", prev.display()), e))?;
        format!("restored {} from {}", install.display(), prev.display())
    } else {
        format!("{} has no .prev; left as it is", install.display())
    };
    let _ = fs::remove_file(next_path(&install));
    saved.update = None;
    adopt_update_log(state);
    record_failure(
        state,
        &mut saved,
        m.to_version,
        "an interrupted update was rolled back".into(),
        true,
    );
    state.save_state(&saved)?;
    Ok(result)
}
