//! A real TCP load balancer for tests: Debian's `haproxy` in `mode tcp`
//! (passthrough, so mTLS still ends in stella-server) on a free loopback
//! port, in front of a list of backend addresses, in a temp dir with its
//! config, its log and its admin socket. It runs in the foreground (`-db`,
//! no daemon, no master process), so the PID we hold is haproxy's; stopped
//! by that PID (SIGTERM, then wait) and on drop. Nothing in the config
//! needs root (no chroot, no user switch, no port below 1024).
//!
//! Health checks are plain TCP connects every 500 ms, two failures take a
//! backend out (about a second after it dies) and one success brings it
//! back; a new connection that cannot reach its backend is retried on
//! another one (`option redispatch`), so a dead backend costs a client
//! nothing but a retry inside haproxy.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{DEADLINE, TempDir, on_path, poll, skip_or_fail};

/// Where Debian installs it (`/usr/sbin`, which an unprivileged user's
/// `PATH` may lack).
const DEBIAN_BINARY: &str = "/usr/sbin/haproxy";

/// The haproxy binary: on `PATH`, else Debian's path; `None` when neither.
pub fn binary() -> Option<PathBuf> {
    if on_path("haproxy") {
        return Some(PathBuf::from("haproxy"));
    }
    Path::new(DEBIAN_BINARY)
        .is_file()
        .then(|| PathBuf::from(DEBIAN_BINARY))
}

/// A free loopback port (bound and released: nothing listens there after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A loopback address nothing listens on: a backend that is down.
pub fn dead_backend() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// `host:port` of an `https://host:port` URL (a test server's `url`), the
/// form a backend is given in.
pub fn address_of(url: &str) -> String {
    url.trim_start_matches("https://")
        .trim_end_matches('/')
        .to_owned()
}

/// One backend server as haproxy's stats see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendStat {
    /// `s0`, `s1`, … in the order the backends were given.
    pub name: String,
    /// `UP`, `DOWN`, `UP 1/2`, `DOWN 1/2`, `no check`, …
    pub status: String,
    /// Connections haproxy sent to it so far (`stot`).
    pub sessions: u64,
    /// Connection attempts to it that failed and were retried (`wretr`).
    pub retries: u64,
    /// Connections that gave up on it and went to another backend
    /// (`wredis`).
    pub redispatches: u64,
}

impl BackendStat {
    /// Whether haproxy sends new connections to it: `UP` (also while a
    /// failing check has not yet reached `fall`), or `no check` (health
    /// checks disabled: haproxy counts it up).
    pub fn is_up(&self) -> bool {
        self.status.starts_with("UP") || self.status == "no check"
    }
}

/// A running haproxy, stopped (by PID) on drop.
#[derive(Debug)]
pub struct Haproxy {
    pub dir: TempDir,
    /// The port clients connect to, on 127.0.0.1.
    pub port: u16,
    /// The backend addresses, in order: `s0` is the first.
    pub backends: Vec<String>,
    child: Option<Child>,
}

impl Haproxy {
    /// Starts haproxy on a free loopback port in front of `backends`
    /// (`127.0.0.1:PORT` each) and waits until it answers on its admin
    /// socket; `None` (after `skip_or_fail`) when haproxy is not installed.
    pub fn start(test: &str, backends: &[String]) -> Option<Self> {
        let Some(binary) = binary() else {
            skip_or_fail(
                test,
                "haproxy is not installed (Debian package haproxy: /usr/sbin/haproxy)",
            );
            return None;
        };
        assert!(!backends.is_empty(), "haproxy needs at least one backend");
        let dir = TempDir::new("haproxy");
        let port = free_port();
        let mut proxy = Self {
            dir,
            port,
            backends: backends.to_vec(),
            child: None,
        };
        fs::write(proxy.config_path(), proxy.config()).expect("write haproxy.cfg");
        let check = Command::new(&binary)
            .arg("-c")
            .arg("-f")
            .arg(proxy.config_path())
            .stdin(Stdio::null())
            .output()
            .expect("run haproxy -c");
        assert!(
            check.status.success(),
            "haproxy rejects its config: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let log = fs::File::create(proxy.log_path()).expect("create haproxy.log");
        let child = Command::new(&binary)
            // Foreground, one process: the PID is haproxy's own.
            .arg("-db")
            .arg("-f")
            .arg(proxy.config_path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log)
            .spawn()
            .expect("start haproxy");
        proxy.child = Some(child);
        let ready = poll(DEADLINE, || proxy.command("show info").map(drop));
        assert!(
            ready.is_some(),
            "haproxy did not start; log:\n{}",
            proxy.log_text()
        );
        Some(proxy)
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("haproxy.cfg")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("haproxy.log")
    }

    fn socket_path(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }

    /// The whole config: TCP passthrough, round robin, fast TCP checks,
    /// retries on another backend, logs (one line per connection) to
    /// stderr, which is the log file.
    fn config(&self) -> String {
        let servers: String = self
            .backends
            .iter()
            .enumerate()
            .map(|(i, addr)| format!("    server s{i} {addr}\n"))
            .collect();
        format!(
            "global
    log stderr format raw local0 info
    maxconn 1000
    stats socket {socket} mode 600 level admin
    stats timeout 10s

defaults
    mode tcp
    log global
    option tcplog
    option dontlognull
    # A connection that cannot reach its backend is retried, each retry
    # on another backend.
    option redispatch 1
    retries 3
    timeout connect 1s
    timeout check 1s
    # Agents keep their connection open between heartbeats.
    timeout client 1h
    timeout server 1h

frontend stella
    bind 127.0.0.1:{port}
    default_backend servers

backend servers
    balance roundrobin
    default-server check inter 500ms fall 2 rise 1
{servers}",
            socket = self.socket_path().display(),
            port = self.port,
        )
    }

    /// The address clients connect to.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The URL agents and admin clients use (the servers' certificates
    /// name 127.0.0.1, so TLS through the proxy verifies as direct).
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// haproxy's log so far (its start-up messages and one line per
    /// connection).
    pub fn log_text(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// PID of the haproxy process (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// One command on the admin socket (`show stat`, `disable server
    /// servers/s1`, …); its answer, or `None` when haproxy is not
    /// answering.
    pub fn command(&self, command: &str) -> Option<String> {
        let mut socket = UnixStream::connect(self.socket_path()).ok()?;
        socket.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        socket.write_all(format!("{command}\n").as_bytes()).ok()?;
        let mut answer = String::new();
        socket.read_to_string(&mut answer).ok()?;
        Some(answer)
    }

    /// The backend servers' stats (`show stat`), in config order.
    pub fn stats(&self) -> Vec<BackendStat> {
        let csv = self
            .command("show stat")
            .unwrap_or_else(|| panic!("haproxy's stats socket does not answer"));
        parse_stats(&csv)
    }

    /// Waits until haproxy sees backend `index` up (`true`) or down.
    pub fn wait_for_backend(&self, index: usize, up: bool) -> BackendStat {
        let name = format!("s{index}");
        poll(DEADLINE, || {
            self.stats()
                .into_iter()
                .find(|s| s.name == name && s.is_up() == up)
        })
        .unwrap_or_else(|| {
            panic!(
                "haproxy never saw {name} {}; stats: {:?}\nlog:\n{}",
                if up { "up" } else { "down" },
                self.stats(),
                self.log_text()
            )
        })
    }

    /// Stops haproxy by PID (SIGTERM: it closes its listener and ends) and
    /// waits for it; SIGKILL if it has not ended within the deadline.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let exited = poll(DEADLINE, || child.try_wait().ok().flatten().map(drop));
        if exited.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The server rows of `show stat`'s CSV (columns found by their names in
/// the `# pxname,svname,…` header).
fn parse_stats(csv: &str) -> Vec<BackendStat> {
    let mut lines = csv.lines();
    let Some(header) = lines.next().and_then(|h| h.strip_prefix("# ")) else {
        return Vec::new();
    };
    let columns: Vec<&str> = header.split(',').collect();
    let at = |name: &str| columns.iter().position(|c| *c == name);
    let (
        Some(proxy),
        Some(server),
        Some(status),
        Some(sessions),
        Some(retries),
        Some(redispatches),
    ) = (
        at("pxname"),
        at("svname"),
        at("status"),
        at("stot"),
        at("wretr"),
        at("wredis"),
    )
    else {
        return Vec::new();
    };
    let number = |f: &[&str], i: usize| f.get(i).and_then(|v| v.parse().ok()).unwrap_or(0);
    lines
        .map(|l| l.split(',').collect::<Vec<&str>>())
        .filter(|f| {
            f.get(proxy) == Some(&"servers") && f.get(server).is_some_and(|s| *s != "BACKEND")
        })
        .map(|f| BackendStat {
            name: f[server].to_owned(),
            status: f.get(status).copied().unwrap_or_default().to_owned(),
            sessions: number(&f, sessions),
            retries: number(&f, retries),
            redispatches: number(&f, redispatches),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_rows_are_the_backend_servers() {
        let csv = "# pxname,svname,qcur,stot,wretr,wredis,status,\nstella,FRONTEND,,7,,,OPEN,\nservers,s0,0,5,0,0,UP,\nservers,s1,0,0,3,2,DOWN,\nservers,BACKEND,0,5,3,2,UP,\n";
        let stats = parse_stats(csv);
        assert_eq!(
            stats,
            vec![
                BackendStat {
                    name: "s0".into(),
                    status: "UP".into(),
                    sessions: 5,
                    retries: 0,
                    redispatches: 0,
                },
                BackendStat {
                    name: "s1".into(),
                    status: "DOWN".into(),
                    sessions: 0,
                    retries: 3,
                    redispatches: 2,
                },
            ]
        );
        assert!(stats[0].is_up() && !stats[1].is_up());
        assert_eq!(address_of("https://127.0.0.1:8443"), "127.0.0.1:8443");
    }
}
