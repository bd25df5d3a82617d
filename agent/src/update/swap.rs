//! Putting a verified download in place: stage it next to the binary
//! (a rename when the staging dir is on the same filesystem, else a copy),
//! run its `self-test`, keep the old binary as `<binary>.prev` (hard link),
//! rename the new one over the binary, fsync the directory, record the
//! probation and exec the new version in place (same PID). Also the
//! `self-test` command itself.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::download::Download;
use super::now_secs;
use crate::error::Error;
use crate::state::{MarkerPhase, StateDir, StateFile, UpdateMarker};
use crate::{fault, host, log};

const SELF_TEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The binary this process was started from.
pub(super) fn install_path() -> Result<PathBuf, Error> {
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
pub(super) fn prev_path(install: &Path) -> PathBuf {
    with_suffix(install, ".prev")
}

/// The verified new binary, next to the install path (same filesystem, so
/// the final rename is atomic).
pub(super) fn next_path(install: &Path) -> PathBuf {
    let name = install
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    install.with_file_name(format!(".{name}.new"))
}

pub(super) fn sync_dir(path: &Path) -> std::io::Result<()> {
    File::open(path.parent().unwrap_or(Path::new("/")))?.sync_all()
}

/// Replaces this process with `binary`, same arguments and environment.
pub(super) fn exec(binary: &Path) -> Error {
    log::info("exec", &[("binary", &binary.display())]);
    let err = Command::new(binary)
        .args(std::env::args_os().skip(1))
        .exec();
    Error::io(format!("cannot exec {}", binary.display()), err)
}

/// Puts the verified download next to the binary, executable and synced:
/// renamed when both are on one filesystem (nothing is read again), copied
/// when they are not.
pub(super) fn stage_executable(from: &Path, to: &Path) -> std::io::Result<()> {
    let _ = fs::remove_file(to);
    match fs::rename(from, to) {
        Ok(()) => {
            let file = File::open(to)?;
            file.set_permissions(fs::Permissions::from_mode(0o755))?;
            file.sync_all()?;
            sync_dir(to)
        }
        Err(e) if e.kind() == std::io::ErrorKind::CrossesDevices => copy_executable(from, to),
        Err(e) => Err(e),
    }
}

/// Copies the download next to the binary, executable, synced.
fn copy_executable(from: &Path, to: &Path) -> std::io::Result<()> {
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
pub(super) fn self_test(binary: &Path, state: &StateDir) -> Result<(), String> {
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
pub(super) fn swap(
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
    );
    Ok(())
}
