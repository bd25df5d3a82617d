//! A real PostgreSQL for `cargo xtask bench --store postgres`: Debian's
//! `postgresql` binaries, a cluster made by `initdb` in a temp dir, served
//! on a free loopback port and stopped by PID (the approach of the test
//! harness, tests/src/postgres.rs, in the small form a benchmark needs).
//! PostgreSQL refuses to run as root, so as root it runs as the `postgres`
//! user through `setpriv`, which execs: the PID held is the postmaster's.
//! Unlike the tests' clusters it keeps PostgreSQL's durable defaults
//! (fsync on), as redb's commits are durable in the same run.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::process::{Proc, output, spawn, wait_for};

const USER: &str = "stella";
const PASSWORD: &str = "stella-bench-password";

/// Where Debian puts the server binaries (the newest major version there).
fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let major: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((major, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// The `postgres` account's uid and gid, to drop root to.
fn postgres_account() -> Option<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&"postgres"))
            .then(|| Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?)))
            .flatten()
    })
}

/// A running cluster, stopped (by PID) and removed on drop.
pub(super) struct Cluster {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
    account: Option<(u32, u32)>,
    postmaster: Option<Proc>,
}

impl Cluster {
    /// Makes and starts a cluster, or says why not (PostgreSQL missing:
    /// `.ci/deps` installs it).
    pub(super) fn start() -> Result<Self, String> {
        let bin = bin_dir().ok_or(
            "PostgreSQL is not installed (Debian package postgresql: initdb under \
             /usr/lib/postgresql/*/bin); `.ci/deps` installs it",
        )?;
        // /proc/self belongs to the effective user.
        let root = fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        let account =
            if root {
                Some(postgres_account().ok_or(
                    "running as root and there is no `postgres` user to run PostgreSQL as",
                )?)
            } else {
                None
            };
        // Under /tmp, not the target dir: the `postgres` user must reach it.
        let dir = std::env::temp_dir().join(format!("stella-bench-pg-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| format!("no free loopback port: {e}"))?;
        let mut cluster = Self {
            dir,
            port,
            bin,
            account,
            postmaster: None,
        };
        cluster.give_to_account(&cluster.dir.clone())?;
        let pwfile = cluster.dir.join("pwfile");
        fs::write(&pwfile, PASSWORD)
            .map_err(|e| format!("cannot write {}: {e}", pwfile.display()))?;
        cluster.give_to_account(&pwfile)?;
        output(
            cluster
                .command("initdb")
                .arg("-D")
                .arg(cluster.dir.join("data"))
                .args(["-U", USER, "--auth=scram-sha-256", "-E", "UTF8"])
                .arg(format!("--pwfile={}", pwfile.display())),
        )?;
        let log = cluster.dir.join("postgres.log");
        let mut postgres = cluster.command("postgres");
        postgres
            .arg("-D")
            .arg(cluster.dir.join("data"))
            .args(["-p", &port.to_string()])
            .arg("-k")
            .arg(&cluster.dir)
            .args(["-c", "listen_addresses=127.0.0.1"]);
        // The log is opened by us (root): PostgreSQL only writes to the
        // descriptor it is given.
        cluster.postmaster = Some(spawn("postgres", &mut postgres, &log)?);
        wait_for(
            "PostgreSQL to accept connections",
            Duration::from_secs(60),
            || {
                let text = fs::read_to_string(&log).unwrap_or_default();
                (text.contains("ready to accept connections")
                    && TcpStream::connect(("127.0.0.1", port)).is_ok())
                .then_some(())
            },
        )
        .map_err(|e| {
            format!(
                "{e}; log:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            )
        })?;
        Ok(cluster)
    }

    fn give_to_account(&self, path: &std::path::Path) -> Result<(), String> {
        match self.account {
            Some((uid, gid)) => std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .map_err(|e| format!("cannot give {} to postgres: {e}", path.display())),
            None => Ok(()),
        }
    }

    /// A command of the PostgreSQL binaries, run as the unprivileged user
    /// when we are root.
    fn command(&self, program: &str) -> Command {
        match self.account {
            Some((uid, gid)) => {
                let mut cmd = Command::new("setpriv");
                cmd.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .args(["--clear-groups", "--"])
                    .arg(self.bin.join(program));
                cmd
            }
            None => Command::new(self.bin.join(program)),
        }
    }

    /// A new empty database; its URL (the password is the bench's own, for
    /// a throwaway cluster).
    pub(super) fn database(&self, name: &str) -> Result<String, String> {
        self.sql("postgres", &format!("CREATE DATABASE {name}"))?;
        Ok(format!(
            "postgres://{USER}:{PASSWORD}@127.0.0.1:{}/{name}",
            self.port
        ))
    }

    /// One SQL command with `psql`; its unaligned output.
    pub(super) fn sql(&self, db: &str, command: &str) -> Result<String, String> {
        output(
            Command::new(self.bin.join("psql"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER])
                .args(["-d", db, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c"])
                .arg(command)
                .env("PGPASSWORD", PASSWORD)
                .stdin(Stdio::null()),
        )
        .map(|s| s.trim().to_owned())
    }

    /// Stops the postmaster by PID (SIGINT: a fast shutdown) and waits for
    /// it; SIGKILL when it has not ended within a minute.
    fn stop(&mut self) {
        let Some(mut postmaster) = self.postmaster.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-INT", &postmaster.pid().to_string()])
            .status();
        let _ = wait_for("PostgreSQL to stop", Duration::from_secs(60), || {
            postmaster.exited().map(drop)
        });
        // Proc's drop kills (if still running) and reaps.
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
