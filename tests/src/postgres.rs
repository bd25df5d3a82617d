//! A real PostgreSQL for tests: Debian's `postgresql` binaries, a cluster
//! made by `initdb` in a temp dir, served on a free loopback port (its
//! socket dir in the temp dir too) and stopped by PID. PostgreSQL refuses
//! to run as root, so as root it runs as the `postgres` user (through
//! `setpriv`, which execs: the PID we hold is the postmaster's).
//!
//! Shared by the server crate's store conformance test and the end-to-end
//! tests; later multi-server tests start one and point several servers at it.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::{poll, skip_or_fail};

/// The superuser the tests' stores connect as, and its password.
pub const USER: &str = "stella";
pub const PASSWORD: &str = "stella-test-password";

/// Where Debian puts the server binaries (the newest major version there).
pub fn bin_dir() -> Option<PathBuf> {
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

/// Gives a file the test made (as root) to the `postgres` user, who must
/// read it (a TLS key: PostgreSQL wants it its own and private).
pub fn hand_over(path: &Path) {
    if rustix::process::geteuid().is_root()
        && let Some((uid, gid)) = postgres_account()
    {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown to postgres");
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A running PostgreSQL cluster, stopped (by PID) and removed on drop.
#[derive(Debug)]
pub struct Postgres {
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
    /// uid and gid to run as (set when the tests run as root).
    account: Option<(u32, u32)>,
    child: Option<Child>,
    /// Extra `-c name=value` settings (TLS) for every start.
    settings: Vec<String>,
}

impl Postgres {
    /// Makes and starts a cluster; `None` (after `skip_or_fail`) when
    /// PostgreSQL is not installed.
    pub fn start(test: &str) -> Option<Self> {
        Self::start_with(test, &[])
    }

    /// `start` with extra server settings (`name=value`).
    pub fn start_with(test: &str, settings: &[&str]) -> Option<Self> {
        let Some(bin) = bin_dir() else {
            skip_or_fail(
                test,
                "PostgreSQL is not installed (Debian package postgresql: /usr/lib/postgresql/*/bin)",
            );
            return None;
        };
        let root = rustix::process::geteuid().is_root();
        let account = if root {
            let Some(account) = postgres_account() else {
                skip_or_fail(test, "running as root and there is no `postgres` user");
                return None;
            };
            Some(account)
        } else {
            None
        };
        static NEXT: AtomicU32 = AtomicU32::new(0);
        // Under /tmp, not the target dir: the `postgres` user must reach it.
        let dir = std::env::temp_dir().join(format!(
            "stella-pg-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create the PostgreSQL temp dir");
        let mut pg = Self {
            dir,
            port: free_port(),
            bin,
            account,
            child: None,
            settings: settings.iter().map(|s| (*s).to_owned()).collect(),
        };
        pg.give_to_account(&pg.dir.clone());
        let pwfile = pg.dir.join("pwfile");
        fs::write(&pwfile, PASSWORD).expect("write the password file");
        pg.give_to_account(&pwfile);
        let out = pg
            .command("initdb")
            .arg("-D")
            .arg(pg.data())
            .args([
                "-U",
                USER,
                "--auth=scram-sha-256",
                "--no-sync",
                "-E",
                "UTF8",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdin(Stdio::null())
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        pg.start_again();
        Some(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// The server log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// A file made by the test (as root) that the server must read or
    /// write.
    pub fn give_to_account(&self, path: &Path) {
        if let Some((uid, gid)) = self.account {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown to postgres");
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

    /// Starts the server (again, after `stop`) on its port, and waits
    /// until it accepts connections.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "PostgreSQL is running already");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the PostgreSQL log");
        self.give_to_account(&self.log_path());
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(self.data())
            .args(["-p", &self.port.to_string()])
            .arg("-k")
            .arg(&self.dir)
            .args(["-c", "listen_addresses=127.0.0.1"])
            // A test cluster: durability is not what is tested here.
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"]);
        for s in &self.settings {
            cmd.args(["-c", s]);
        }
        // Counted before the start: a quick start must not be missed.
        let before = self
            .log_text()
            .matches("ready to accept connections")
            .count();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log)
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
        let ready = poll(Duration::from_secs(30), || {
            let log = self.log_text();
            (log.matches("ready to accept connections").count() > before
                && TcpStream::connect(("127.0.0.1", self.port)).is_ok())
            .then_some(())
        });
        assert!(
            ready.is_some(),
            "PostgreSQL did not start; log:\n{}",
            self.log_text()
        );
    }

    /// Stops the server by PID (a fast shutdown: SIGINT, which also ends
    /// client connections) and waits for it to exit.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = rustix::process::Pid::from_raw(child.id() as i32);
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
        }
        let exited = poll(Duration::from_secs(30), || {
            child.try_wait().ok().flatten().map(|_| ())
        });
        if exited.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The URL of database `db` as the test superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{USER}:{PASSWORD}@127.0.0.1:{}/{db}", self.port)
    }

    /// Runs one SQL command with `psql` against database `db`.
    pub fn sql(&self, db: &str, command: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER])
            .args([
                "-d",
                db,
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                command,
            ])
            .env("PGPASSWORD", PASSWORD)
            .stdin(Stdio::null())
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A new empty database; its URL.
    pub fn database(&self, name: &str) -> String {
        self.sql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(name)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        if std::env::var_os("STELLA_KEEP_TEMP").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
