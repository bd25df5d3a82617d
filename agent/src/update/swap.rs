//! Putting a verified download in place: stage it next to the binary
//! (a rename when the staging dir is on the same filesystem, else a copy),
//! run its `self-test`, check that it reports the version the release
//! signs, keep the old binary as `<binary>.prev` (hard link), rename the new one over the
//! binary, fsync the directory, record the probation and exec the new
//! version in place (same PID). Also the `self-test` command itself.

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

/// What a finished child printed: its exit status, the first line of its
/// stdout and the last line of its stderr (each read up to 4 KiB).
struct Finished {
    status: std::process::ExitStatus,
    first_out: String,
    last_err: String,
}

/// Up to 4 KiB of what a finished child left in a pipe (no `dyn Read`:
/// its vtables would cost bytes for nothing).
fn read_some(pipe: Option<impl Read>) -> String {
    let mut text = String::new();
    if let Some(p) = pipe {
        let _ = p.take(4096).read_to_string(&mut text);
    }
    text
}

/// Runs `cmd` (stdout and stderr piped) to its end within `timeout`; what
/// it is (`what`) names it in the errors.
fn run_bounded(cmd: &mut Command, what: &str, timeout: Duration) -> Result<Finished, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what} could not start: {e}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what} took more than {timeout:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("{what}: {e}")),
        }
    };
    let out = read_some(child.stdout.take());
    let err = read_some(child.stderr.take());
    Ok(Finished {
        status,
        first_out: out.lines().next().unwrap_or("").trim().to_owned(),
        last_err: err.lines().last().unwrap_or("").trim().to_owned(),
    })
}

/// Runs `<binary> self-test`: it must start, read the state dir and reach
/// the server over mTLS, within a time limit.
pub(super) fn self_test(binary: &Path, state: &StateDir) -> Result<(), String> {
    let what = "self-test of the new binary";
    let done = run_bounded(
        Command::new(binary)
            .arg("self-test")
            .arg("--state-dir")
            .arg(state.root()),
        what,
        SELF_TEST_TIMEOUT,
    )?;
    if done.status.success() {
        return Ok(());
    }
    Err(format!(
        "{what} failed ({}): {}",
        done.status, done.last_err
    ))
}

/// Runs `<binary> version`: it must report exactly the version and target
/// the release statement signs, or the update stops before the swap (a
/// signed binary of another version would run under a false name and skip
/// its probation).
pub(super) fn check_version(binary: &Path, version: &str) -> Result<(), String> {
    let signed = format!("stella-agent {version} {}", host::TARGET);
    let done = run_bounded(
        Command::new(binary).arg("version"),
        "`version` of the new binary",
        SELF_TEST_TIMEOUT,
    )?;
    if !done.status.success() {
        return Err(format!(
            "`version` of the new binary failed ({}): {}; the signed release is {signed}",
            done.status, done.last_err
        ));
    }
    if done.first_out != signed {
        return Err(format!(
            "the new binary reports {:?}, the signed release is {signed}",
            done.first_out
        ));
    }
    Ok(())
}

/// Why a swap returned (it does not when it succeeds).
pub(super) enum SwapFailure {
    /// Nothing changed: the old binary is in place and no marker is kept.
    /// `full`: a disk was full, so it may work later.
    NotSwapped { error: String, full: bool },
    /// The new binary is in place but could not be started.
    Exec(Error),
}

/// Keeps the old binary as `.prev`, renames the new one over the binary,
/// records the probation, and execs the new version. Until the rename,
/// every failure is undone; after it, the marker (`swapping` or, once
/// written, `probation`) settles the update at the next start whether or
/// not its last write landed.
pub(super) fn swap(
    state: &StateDir,
    saved: &mut StateFile,
    install: &Path,
    next: &Path,
    d: &Download,
) -> SwapFailure {
    let prev = prev_path(install);
    let _ = fs::remove_file(&prev);
    if let Err(e) = fs::hard_link(install, &prev).and_then(|()| sync_dir(install)) {
        let _ = fs::remove_file(&prev);
        return SwapFailure::NotSwapped {
            error: format!(
                "cannot keep {} as {}: {e}",
                install.display(),
                prev.display()
            ),
            full: super::out_of_space(&e),
        };
    }
    fault::point("update-after-link");
    // The update's log so far goes with it across the exec (a rollback
    // reports it).
    if let Err(e) = state.write_lines(crate::state::UPDATE_LOG, &log::captured()) {
        log::warn("could not keep the update's log", &[("error", &e)]);
    }
    let failure = saved.update_failure.take();
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
    // Without the marker on disk a crash after the rename could not be
    // rolled back: no rename without it.
    let renamed = match state.save_state(saved) {
        Err(e) => {
            let full = matches!(&e, Error::Io { source, .. } if super::out_of_space(source));
            Err((e.to_string(), full))
        }
        Ok(()) => fs::rename(next, install).map_err(|e| {
            (
                format!("cannot install {}: {e}", install.display()),
                super::out_of_space(&e),
            )
        }),
    };
    if let Err((error, full)) = renamed {
        saved.update = None;
        saved.update_failure = failure;
        let _ = fs::remove_file(&prev);
        // The marker may have landed before the rename failed.
        super::persist(state, saved);
        return SwapFailure::NotSwapped { error, full };
    }
    if let Err(e) = sync_dir(install) {
        log::warn("cannot sync the install dir", &[("error", &e)]);
    }
    fault::point("update-after-rename");
    if let Some(m) = saved.update.as_mut() {
        m.phase = MarkerPhase::Probation;
        m.starts = 0;
        m.probation_until = now_secs() + d.offer.probation_ms.div_ceil(1000);
    }
    // Unwritten, the `swapping` marker tells the new version it is live.
    super::persist(state, saved);
    let _ = fs::remove_file(&d.file.path);
    log::info(
        "update installed; starting the new version on probation",
        &[("from", &host::VERSION), ("to", &d.accepted.version)],
    );
    SwapFailure::Exec(exec(install))
}

/// `stella-agent self-test`: start, read the state dir, reach the server.
pub(crate) fn run_self_test(state: &StateDir) -> Result<(), Error> {
    if fault::active("self-test-fail") {
        return Err(Error::Invalid("fault injected: self-test fails".into()));
    }
    let ident = crate::identity::Identity::load(state)?;
    let mut client = crate::transport::http_client(
        &ident.ca_der,
        Some((&ident.cert_der, &ident.key_pem)),
        Duration::from_secs(10),
    )?;
    let (status, text) =
        crate::transport::get(&mut client, &format!("{}/v1/agents/self", ident.server))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_new_binary_must_report_the_signed_version_and_target() {
        let dir = std::env::temp_dir().join(format!("stella-swap-unit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let script = dir.join("stella-agent");
        fs::write(
            &script,
            format!("#!/bin/sh\necho 'stella-agent 9.9.9 {}'\n", host::TARGET),
        )
        .unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(check_version(&script, "9.9.9"), Ok(()));
        let err = check_version(&script, "9.9.10").unwrap_err();
        assert!(
            err.contains(&format!("reports \"stella-agent 9.9.9 {}\"", host::TARGET))
                && err.contains("the signed release is stella-agent 9.9.10"),
            "{err}"
        );
        fs::write(&script, "#!/bin/sh\necho broken >&2\nexit 3\n").unwrap();
        let err = check_version(&script, "9.9.9").unwrap_err();
        assert!(err.contains("failed") && err.contains("broken"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }
}
