//! The processes a bench run starts (killed by PID and reaped on drop), the
//! commands it runs, and what `/proc` (or GNU time, for a finished one) says
//! of them and of the machine's load.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed (by its PID) and reaped on drop.
pub(super) struct Proc {
    child: Child,
}

impl Proc {
    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(super) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub(super) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(super) fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Proc, String> {
    let file =
        fs::File::create(log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
    let err = file
        .try_clone()
        .map_err(|e| format!("cannot clone a log handle: {e}"))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start {name} ({cmd:?}): {e}"))?;
    Ok(Proc { child })
}

/// `cmd` run through `sh` with the open-file limit raised to the hard limit
/// (10,000 connections need as many descriptors on each side).
pub(super) fn with_nofile(program: &Path) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("ulimit -n \"$(ulimit -Hn)\" 2>/dev/null; exec \"$0\" \"$@\"")
        .arg(program);
    cmd
}

pub(super) fn output(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(super) fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T, String> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > end {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Memory and threads of a process, from `/proc/PID/status`.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Status {
    pub(super) rss_kb: u64,
    pub(super) hwm_kb: u64,
    pub(super) threads: u64,
}

pub(super) fn proc_status(pid: u32) -> Option<Status> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    Some(Status {
        rss_kb: field("VmRSS:")?,
        hwm_kb: field("VmHWM:")?,
        threads: field("Threads:")?,
    })
}

/// The 1-minute load average: other work on the machine skews every number.
pub(super) fn load_average() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Runs `program args` to its end under GNU time and returns its peak RSS
/// in KiB, or why not. Not wait4's ru_maxrss of our own child: at exec the
/// kernel folds the spawning process's peak (this xtask's, through
/// posix_spawn's shared memory) into it, and /proc loses VmHWM at exit.
pub(super) fn peak_rss_kb(program: &Path, args: &[&std::ffi::OsStr]) -> Result<u64, String> {
    let time = Path::new("/usr/bin/time");
    if !time.exists() {
        return Err("/usr/bin/time (GNU time) is not installed".into());
    }
    let out = Command::new(time)
        .args(["-f", "%M"])
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", time.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    stderr
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| format!("GNU time printed no peak RSS: {stderr}"))
}
