//! Self-update from signed releases (DESIGN.md section 5). An offer arrives
//! in a heartbeat answer; the agent checks the DSSE envelope with the release
//! key pinned in its state dir (never one from the server), the target and
//! the version (no downgrade unless the signed statement allows it), then
//! downloads the artifact in chunks with HTTP Range (so heartbeats go on and
//! an interrupted download resumes), hashing as it goes and capping the size.
//! A verified copy next to the binary must pass `self-test`; then the old
//! binary is kept as `<binary>.prev` (hard link), the new one is renamed
//! over the binary, and the agent execs it in place (same PID). The new
//! version is on probation: it must get a heartbeat acknowledged and pass
//! doctor within the window, or it restores `.prev` and execs that. A start
//! counter in the marker rolls back a binary that crash-loops. At every
//! instant a runnable, verified binary is at the install path.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use stella_proto::api::{UpdateOffer, UpdateReport};
use stella_proto::config::Settings;
use stella_proto::dsse::{Envelope, PublicKey};
use stella_proto::release::{self, Statement, Version};

use crate::doctor::Doctor;
use crate::error::Error;
use crate::state::{MarkerPhase, RELEASE_KEY, StateDir, StateFile, UpdateFailure, UpdateMarker};
use crate::{fault, host, log};

/// Largest artifact accepted (debug builds are big; release ones ~2 MiB).
const MAX_DOWNLOAD: u64 = 128 << 20;
/// Bytes fetched per loop turn, so heartbeats are not held up.
const CHUNK: u64 = 1 << 20;
const SELF_TEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A new version that starts this many times without passing probation is
/// rolled back.
const MAX_STARTS: u32 = 3;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The binary this process was started from.
fn install_path() -> Result<PathBuf, Error> {
    std::env::current_exe()
        .and_then(fs::canonicalize)
        .map_err(|e| Error::io("cannot locate the running binary", e))
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// `<binary>.prev`: the previous version, kept for rollback.
pub(crate) fn prev_path(install: &Path) -> PathBuf {
    with_suffix(install, ".prev")
}

/// The verified new binary, next to the install path (same filesystem, so
/// the final rename is atomic).
fn next_path(install: &Path) -> PathBuf {
    let name = install
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    install.with_file_name(format!(".{name}.new"))
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    File::open(path.parent().unwrap_or(Path::new("/")))?.sync_all()
}

/// Replaces this process with `binary`, same arguments and environment.
fn exec(binary: &Path) -> Error {
    log::info("exec", &[("binary", &binary.display())]);
    let err = Command::new(binary)
        .args(std::env::args_os().skip(1))
        .exec();
    Error::io(format!("cannot exec {}", binary.display()), err)
}

/// A release offer the agent accepted, as far as the signed statement says.
#[derive(Debug)]
struct Accepted {
    version: String,
    sha256: String,
}

/// Checks an offer: target, signature with the pinned key, payload type,
/// the artifact's digest, and the version (no downgrade unless allowed).
fn accept(state: &StateDir, offer: &UpdateOffer) -> Result<Accepted, String> {
    if offer.target != host::TARGET {
        return Err(format!(
            "the offer is for {}, this agent is {}",
            offer.target,
            host::TARGET
        ));
    }
    let key_pem = state.read_text(RELEASE_KEY).map_err(|_| {
        format!("no release key is pinned ({RELEASE_KEY} is missing from the state dir)")
    })?;
    let key = PublicKey::from_pem(&key_pem).map_err(|e| format!("{RELEASE_KEY}: {e}"))?;
    let envelope = Envelope::from_json(offer.envelope.as_bytes())
        .map_err(|e| format!("release envelope: {e}"))?;
    let payload = envelope
        .verify(release::PAYLOAD_TYPE, &key)
        .map_err(|e| format!("release {}: {e}", offer.version))?;
    let statement =
        Statement::from_json(&payload).map_err(|e| format!("release statement: {e}"))?;
    let name = format!("{}/stella-agent", host::TARGET);
    let subject = statement
        .subject_for(&name)
        .ok_or_else(|| format!("the signed release has no {name}"))?;
    let version = statement.version().map_err(|e| e.to_string())?;
    let running = Version::parse(host::VERSION).map_err(|e| format!("running version: {e}"))?;
    if version <= running {
        let allowed = statement
            .allow_downgrade_from()
            .map_err(|e| e.to_string())?;
        let permitted = version < running && allowed.is_some_and(|from| running <= from);
        if !permitted {
            return Err(format!(
                "release {version} is not newer than the running {running}, and its statement does not allow a downgrade from {running}"
            ));
        }
    }
    Ok(Accepted {
        version: version.to_string(),
        sha256: subject.sha256().unwrap_or_default().to_owned(),
    })
}

/// A download in progress.
#[derive(Debug)]
struct Download {
    offer: UpdateOffer,
    accepted: Accepted,
    part: PathBuf,
    received: u64,
    total: Option<u64>,
    /// Do not try before this (after a failed chunk).
    retry_at: Instant,
    failures: u32,
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
#[derive(Debug, Default)]
pub(crate) struct Updater {
    download: Option<Download>,
}

impl Updater {
    /// Where the agent stands, for the heartbeat.
    pub(crate) fn report(&self, saved: &StateFile) -> UpdateReport {
        let mut out = UpdateReport {
            state: String::new(),
            version: String::new(),
            error: None,
        };
        self.fill_report(saved, &mut out);
        out
    }

    /// Writes the report into `out`, allocating only when it changed.
    pub(crate) fn fill_report(&self, saved: &StateFile, out: &mut UpdateReport) {
        let (state, version, error): (&str, &str, Option<&str>) = if let Some(m) = &saved.update {
            (m.phase.as_str(), &m.to_version, m.error.as_deref())
        } else if let Some(d) = &self.download {
            ("downloading", &d.accepted.version, None)
        } else if let Some(f) = &saved.update_failure {
            ("failed", &f.version, Some(&f.error))
        } else {
            ("idle", host::VERSION, None)
        };
        if out.state != state {
            out.state = state.to_owned();
        }
        if out.version != version {
            out.version = version.to_owned();
        }
        if out.error.as_deref() != error {
            out.error = error.map(str::to_owned);
        }
    }

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
                m.phase = MarkerPhase::Probation;
                m.starts = 1;
                m.probation_until = now_secs() + m.probation_ms.div_ceil(1000);
                saved.update = Some(m);
                state.save_state(saved)?;
            }
            MarkerPhase::Swapping => {
                // The swap did not happen: the old binary is in place. Tidy up.
                let _ = fs::remove_file(next_path(Path::new(&m.install_path)));
                log::warn(
                    "an update swap was interrupted before the rename; staying on this version",
                    &[("version", &m.to_version)],
                );
                saved.update = None;
                saved.update_failure = Some(UpdateFailure {
                    version: m.to_version,
                    error: "the swap was interrupted; it will be tried again".into(),
                });
                state.save_state(saved)?;
            }
            MarkerPhase::Probation if running == m.to_version => {
                m.starts += 1;
                let starts = m.starts;
                saved.update = Some(m);
                state.save_state(saved)?;
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
                log::warn(
                    "the update was rolled back",
                    &[("version", &m.to_version), ("error", &error)],
                );
                saved.update = None;
                saved.update_failure = Some(UpdateFailure {
                    version: m.to_version,
                    error,
                });
                state.save_state(saved)?;
            }
            MarkerPhase::Other(_) => {
                saved.update = None;
                state.save_state(saved)?;
            }
        }
        Ok(())
    }

    /// Handles an offer from a heartbeat answer: refusals are recorded and
    /// reported, and change nothing on disk.
    pub(crate) fn offer(
        &mut self,
        state: &StateDir,
        saved: &mut StateFile,
        offer: &UpdateOffer,
        settings: &Settings,
    ) {
        if offer.version == host::VERSION || saved.update.is_some() {
            return;
        }
        if self
            .download
            .as_ref()
            .is_some_and(|d| d.offer.version == offer.version)
        {
            return;
        }
        if saved
            .update_failure
            .as_ref()
            .is_some_and(|f| f.version == offer.version)
        {
            return;
        }
        let accepted = match accept(state, offer) {
            Ok(a) => a,
            Err(error) => {
                log::warn(
                    "update refused",
                    &[("version", &offer.version), ("error", &error)],
                );
                saved.update_failure = Some(UpdateFailure {
                    version: offer.version.clone(),
                    error,
                });
                return;
            }
        };
        let hour = ((now_secs() / 3600) % 24) as u8;
        if !settings.update_allowed_at(hour) {
            log::debug(
                "update waits for its window",
                &[("version", &accepted.version)],
            );
            return;
        }
        log::info(
            "update accepted; downloading",
            &[("version", &accepted.version), ("size", &offer.size)],
        );
        let part = state.staging_part(&accepted.version, host::TARGET);
        let received = fs::metadata(&part).map_or(0, |m| m.len());
        if received > 0 {
            log::info(
                "resuming the download",
                &[("version", &accepted.version), ("from_byte", &received)],
            );
        }
        self.download = Some(Download {
            offer: offer.clone(),
            accepted,
            part,
            received,
            total: None,
            retry_at: Instant::now(),
            failures: 0,
        });
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

    /// One turn of work: fetch the next chunk, or, once complete, verify,
    /// self-test, swap and exec (which does not return).
    pub(crate) fn step(
        &mut self,
        state: &StateDir,
        saved: &mut StateFile,
        client: &ureq::Agent,
        server: &str,
    ) -> Result<Step, Error> {
        let Some(d) = self.download.as_mut() else {
            return Ok(Step::Idle);
        };
        if Instant::now() < d.retry_at {
            return Ok(Step::Idle);
        }
        let done = d.total.is_some_and(|t| d.received >= t);
        if !done {
            match fetch_chunk(state, client, server, d) {
                Ok(()) => {
                    d.failures = 0;
                    fault::point("update-after-chunk");
                    return Ok(Step::Busy);
                }
                Err(ChunkError::Refuse(e)) => {
                    self.fail(saved, e);
                    return Ok(Step::Idle);
                }
                Err(ChunkError::Retry(e)) => {
                    d.failures += 1;
                    let wait = Duration::from_secs(1 << d.failures.min(6));
                    d.retry_at = Instant::now() + wait;
                    log::warn(
                        "update download interrupted; will resume",
                        &[("error", &e), ("received", &d.received)],
                    );
                    return Ok(Step::Idle);
                }
            }
        }
        fault::point("update-after-download");
        let Some(d) = self.download.as_ref() else {
            return Ok(Step::Idle);
        };
        let (digest, size) = match host::file_sha256_capped(&d.part, MAX_DOWNLOAD) {
            Ok(x) => x,
            Err(e) => {
                self.fail(saved, format!("cannot read the download: {e}"));
                return Ok(Step::Idle);
            }
        };
        if digest != d.accepted.sha256 {
            let error = format!(
                "the download ({size} bytes) has sha256 {digest}, the signed release says {}",
                d.accepted.sha256
            );
            self.fail(saved, error);
            return Ok(Step::Idle);
        }
        let install = install_path()?;
        let next = next_path(&install);
        if let Err(e) = copy_executable(&d.part, &next) {
            self.fail(
                saved,
                format!(
                    "cannot stage the new binary next to {}: {e}",
                    install.display()
                ),
            );
            return Ok(Step::Idle);
        }
        fault::point("update-after-verify");
        if let Err(e) = self_test(&next, state) {
            self.fail(saved, e);
            return Ok(Step::Idle);
        }
        let d = self.download.take().expect("download present");
        swap(state, saved, &install, &next, &d)?;
        Ok(Step::Idle)
    }

    /// After an acknowledged heartbeat on probation: doctor must pass, then
    /// the update is committed; otherwise it is rolled back.
    pub(crate) fn probation_ack(state: &StateDir, saved: &mut StateFile) -> Result<(), Error> {
        if !saved.in_probation() {
            return Ok(());
        }
        // Doctor reads state.json: let it see the acknowledged heartbeat.
        state.save_state(saved)?;
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
        state.save_state(saved)?;
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

enum ChunkError {
    /// The artifact is unacceptable: give up on this release.
    Refuse(String),
    /// A passing problem: resume later.
    Retry(String),
}

/// Fetches the next chunk with `Range`, appends it to the part file.
fn fetch_chunk(
    state: &StateDir,
    client: &ureq::Agent,
    server: &str,
    d: &mut Download,
) -> Result<(), ChunkError> {
    state
        .create_staging()
        .map_err(|e| ChunkError::Retry(format!("cannot create the staging dir: {e}")))?;
    let end = d.received + CHUNK - 1;
    let url = format!("{server}{}", d.offer.path);
    let mut resp = client
        .get(&url)
        .header("range", &format!("bytes={}-{end}", d.received))
        .call()
        .map_err(|e| ChunkError::Retry(e.to_string()))?;
    let status = resp.status().as_u16();
    let total = match status {
        206 => resp
            .headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit('/').next())
            .and_then(|t| t.parse::<u64>().ok())
            .ok_or_else(|| ChunkError::Retry("206 without a Content-Range total".into()))?,
        200 if d.received == 0 => resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|t| t.parse::<u64>().ok())
            .unwrap_or(MAX_DOWNLOAD + 1),
        416 => {
            // We hold more than the server has: start over.
            let _ = fs::remove_file(&d.part);
            d.received = 0;
            return Err(ChunkError::Retry(
                "range not satisfiable; restarting the download".into(),
            ));
        }
        401 | 403 | 404 => {
            return Err(ChunkError::Refuse(format!(
                "the server refused the download ({status})"
            )));
        }
        other => return Err(ChunkError::Retry(format!("the server answered {other}"))),
    };
    if total > MAX_DOWNLOAD {
        return Err(ChunkError::Refuse(format!(
            "the artifact is {total} bytes, over the limit of {MAX_DOWNLOAD}"
        )));
    }
    d.total = Some(total);
    let mut part = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&d.part)
        .map_err(|e| ChunkError::Retry(format!("cannot write {}: {e}", d.part.display())))?;
    let mut reader = resp.body_mut().with_config().limit(CHUNK + 1).reader();
    let mut buf = [0u8; 16 * 1024];
    let mut got = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| ChunkError::Retry(format!("download: {e}")))?;
        if n == 0 {
            break;
        }
        got += n as u64;
        if d.received + got > total {
            let _ = fs::remove_file(&d.part);
            d.received = 0;
            return Err(ChunkError::Refuse(format!(
                "the server sent more than the {total} bytes it announced"
            )));
        }
        part.write_all(&buf[..n])
            .map_err(|e| ChunkError::Retry(format!("cannot write the download: {e}")))?;
    }
    part.sync_data()
        .map_err(|e| ChunkError::Retry(format!("cannot sync the download: {e}")))?;
    d.received += got;
    if got == 0 && d.received < total {
        return Err(ChunkError::Retry("the server sent an empty chunk".into()));
    }
    Ok(())
}

/// Copies the verified download next to the binary, executable, synced.
fn copy_executable(from: &Path, to: &Path) -> std::io::Result<()> {
    let _ = fs::remove_file(to);
    let mut src = File::open(from)?;
    let mut dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .open(to)?;
    std::io::copy(&mut src, &mut dst)?;
    dst.set_permissions(fs::Permissions::from_mode(0o755))?;
    dst.sync_all()?;
    sync_dir(to)
}

/// Runs `<binary> self-test`: it must start, read the state dir and reach
/// the server over mTLS, within a time limit.
fn self_test(binary: &Path, state: &StateDir) -> Result<(), String> {
    let mut child = Command::new(binary)
        .arg("self-test")
        .arg("--state-dir")
        .arg(state.root())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("self-test of the new binary could not start: {e}"))?;
    let deadline = Instant::now() + SELF_TEST_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.by_ref().take(4096).read_to_string(&mut err);
                }
                let line = err.lines().last().unwrap_or("").trim().to_owned();
                return Err(format!(
                    "self-test of the new binary failed ({status}): {line}"
                ));
            }
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "self-test of the new binary took more than {SELF_TEST_TIMEOUT:?}"
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("self-test: {e}")),
        }
    }
}

/// Keeps the old binary as `.prev`, renames the new one over the binary,
/// records the probation, and execs the new version.
fn swap(
    state: &StateDir,
    saved: &mut StateFile,
    install: &Path,
    next: &Path,
    d: &Download,
) -> Result<(), Error> {
    let prev = prev_path(install);
    let _ = fs::remove_file(&prev);
    fs::hard_link(install, &prev).map_err(|e| {
        Error::io(
            format!("cannot keep {} as {}", install.display(), prev.display()),
            e,
        )
    })?;
    sync_dir(install).map_err(|e| Error::io("cannot sync the install dir", e))?;
    fault::point("update-after-link");
    saved.update = Some(UpdateMarker {
        phase: MarkerPhase::Swapping,
        from_version: host::VERSION.to_owned(),
        to_version: d.accepted.version.clone(),
        to_sha256: d.accepted.sha256.clone(),
        install_path: install.display().to_string(),
        starts: 0,
        probation_ms: d.offer.probation_ms,
        probation_until: 0,
        error: None,
    });
    saved.update_failure = None;
    state.save_state(saved)?;
    fs::rename(next, install)
        .map_err(|e| Error::io(format!("cannot install {}", install.display()), e))?;
    sync_dir(install).map_err(|e| Error::io("cannot sync the install dir", e))?;
    fault::point("update-after-rename");
    if let Some(m) = saved.update.as_mut() {
        m.phase = MarkerPhase::Probation;
        m.starts = 0;
        m.probation_until = now_secs() + d.offer.probation_ms.div_ceil(1000);
    }
    state.save_state(saved)?;
    let _ = fs::remove_file(&d.part);
    log::info(
        "update installed; starting the new version on probation",
        &[("from", &host::VERSION), ("to", &d.accepted.version)],
    );
    Err(exec(install))
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
        saved.update_failure = Some(UpdateFailure {
            version,
            error: failure.clone(),
        });
        let _ = state.save_state(saved);
        return Error::Invalid(failure);
    }
    m.phase = MarkerPhase::RolledBack;
    m.error = Some(error.to_owned());
    if let Err(e) = state.save_state(saved) {
        return e;
    }
    exec(&install)
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
    saved.update_failure = Some(UpdateFailure {
        version: m.to_version,
        error: "an interrupted update was rolled back".into(),
    });
    state.save_state(&saved)?;
    Ok(result)
}

/// `stella-agent self-test`: start, read the state dir, reach the server.
pub(crate) fn run_self_test(state: &StateDir) -> Result<(), Error> {
    if fault::active("self-test-fail") {
        return Err(Error::Invalid("fault injected: self-test fails".into()));
    }
    let ident = crate::identity::Identity::load(state)?;
    let client = crate::transport::http_client(
        &ident.ca_der,
        Some((&ident.cert_der, &ident.key_pem)),
        Duration::from_secs(10),
    )?;
    let (status, text) =
        crate::transport::get(&client, &format!("{}/v1/agents/self", ident.server))
            .map_err(|e| Error::network(format!("self-test cannot reach {}", ident.server), e))?;
    if status != 200 {
        return Err(Error::Refused {
            status,
            message: crate::transport::error_message(&text),
        });
    }
    outln!(
        "self-test ok: stella-agent {} {}",
        host::VERSION,
        host::TARGET
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use stella_proto::dsse::SigningKey;
    use stella_proto::release::Subject;

    struct Fixture {
        dir: PathBuf,
        key: SigningKey,
    }

    impl Fixture {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("stella-update-unit-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            let (key, _) = SigningKey::generate().unwrap();
            fs::write(dir.join(RELEASE_KEY), key.public_key().to_pem()).unwrap();
            Self { dir, key }
        }

        fn state(&self) -> StateDir {
            StateDir::new(self.dir.clone())
        }

        fn offer(
            &self,
            signer: &SigningKey,
            payload_type: &str,
            version: &str,
            downgrade: Option<&str>,
            target: &str,
        ) -> UpdateOffer {
            let subject = vec![Subject::new(&format!("{target}/stella-agent"), &[7; 32])];
            let statement = Statement::new(version, downgrade, subject).unwrap();
            let envelope =
                stella_proto::dsse::sign(signer, payload_type, statement.to_json().as_bytes());
            UpdateOffer {
                version: version.to_owned(),
                target: host::TARGET.to_owned(),
                path: "/x".into(),
                size: 1,
                envelope: envelope.to_json(),
                probation_ms: 1000,
            }
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn accepts_a_newer_release_signed_with_the_pinned_key() {
        let f = Fixture::new("ok");
        let offer = f.offer(&f.key, release::PAYLOAD_TYPE, "99.0.0", None, host::TARGET);
        let accepted = accept(&f.state(), &offer).unwrap();
        assert_eq!(accepted.version, "99.0.0");
        assert_eq!(accepted.sha256, "07".repeat(32));
    }

    #[test]
    fn refuses_each_bad_offer() {
        let f = Fixture::new("bad");
        let (other, _) = SigningKey::generate().unwrap();
        let cases = [
            (
                f.offer(&other, release::PAYLOAD_TYPE, "99.0.0", None, host::TARGET),
                "no signature verifies",
            ),
            (
                f.offer(&f.key, "application/json", "99.0.0", None, host::TARGET),
                "application/json",
            ),
            (
                f.offer(&f.key, release::PAYLOAD_TYPE, "0.0.1", None, host::TARGET),
                "not newer",
            ),
            (
                f.offer(
                    &f.key,
                    release::PAYLOAD_TYPE,
                    "0.0.1",
                    Some("0.0.5"),
                    host::TARGET,
                ),
                "not newer",
            ),
            (
                f.offer(
                    &f.key,
                    release::PAYLOAD_TYPE,
                    "99.0.0",
                    None,
                    "sparc-unknown-none",
                ),
                "has no",
            ),
        ];
        for (offer, needle) in cases {
            let err = accept(&f.state(), &offer).unwrap_err();
            assert!(err.contains(needle), "{needle}: {err}");
        }
        let mut foreign = f.offer(&f.key, release::PAYLOAD_TYPE, "99.0.0", None, host::TARGET);
        foreign.target = "mips-unknown-linux-musl".into();
        assert!(
            accept(&f.state(), &foreign)
                .unwrap_err()
                .contains("the offer is for mips")
        );
        fs::remove_file(f.dir.join(RELEASE_KEY)).unwrap();
        let unpinned = f.offer(&f.key, release::PAYLOAD_TYPE, "99.0.0", None, host::TARGET);
        assert!(
            accept(&f.state(), &unpinned)
                .unwrap_err()
                .contains("no release key is pinned")
        );
    }

    #[test]
    fn a_downgrade_needs_the_running_version_in_the_allowance() {
        let f = Fixture::new("down");
        let running = Version::parse(host::VERSION).unwrap();
        let allowed = f.offer(
            &f.key,
            release::PAYLOAD_TYPE,
            "0.0.1",
            Some(&running.to_string()),
            host::TARGET,
        );
        assert!(accept(&f.state(), &allowed).is_ok());
    }
}
