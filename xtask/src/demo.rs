//! `cargo xtask demo`: the system on one machine. A server on loopback with its
//! redb file, a registration token, an agent enrolled with the CA hash and
//! heartbeating, and the fleet as `agents list` prints it.

use std::ffi::OsString;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lexopt::Arg;

use crate::args::{Args, Usage};
use crate::{cargo, run, target_dir};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn output(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T, String> {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > end {
            return Err(format!("timed out waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `cargo xtask demo` options.
#[derive(Debug)]
pub(crate) struct Options {
    /// Print the fleet and stop instead of running until Ctrl-C.
    once: bool,
}

impl Options {
    /// Parses `[--once]`.
    pub(crate) fn parse<I>(args: I) -> Result<Self, Usage>
    where
        I: IntoIterator,
        I::Item: Into<OsString>,
    {
        const CMD: &str = "demo";
        let mut once = false;
        let mut args = Args::new(CMD, args);
        while let Some(arg) = args.next()? {
            match arg {
                Arg::Long("once") => once = true,
                other => return Err(Usage::unexpected(CMD, other)),
            }
        }
        Ok(Self { once })
    }
}

/// Runs the demo until Ctrl-C (or once).
pub(crate) fn demo(opts: &Options) -> Result<(), String> {
    run(cargo().args(["build", "-p", "stella-server", "-p", "stella-agent"]))?;
    let bin = target_dir().join("debug");
    let server_bin = bin.join("stella-server");
    let agent_bin = bin.join("stella-agent");
    let root = target_dir().join("demo");
    let _ = std::fs::remove_dir_all(&root);
    let data = root.join("server");
    let state = root.join("agent");
    std::fs::create_dir_all(&root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;

    let init = output(
        Command::new(&server_bin)
            .arg("init")
            .arg("--data-dir")
            .arg(&data),
    )?;
    let pin = init
        .lines()
        .find_map(|l| l.strip_prefix("CA hash: "))
        .ok_or("init did not print the CA hash")?
        .trim()
        .to_owned();
    let log = |name: &str| -> Result<std::fs::File, String> {
        std::fs::File::create(root.join(name)).map_err(|e| format!("cannot create log: {e}"))
    };
    let _server = Killed(
        Command::new(&server_bin)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--heartbeat-interval",
                "5s",
                "--data-dir",
            ])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(log("server.log")?)
            .spawn()
            .map_err(|e| format!("cannot start the server: {e}"))?,
    );
    let url = wait_for("the server to listen", || {
        std::fs::read_to_string(data.join("server.url"))
            .ok()
            .map(|s| s.trim().to_owned())
    })?;
    let admin = |args: &[&str]| {
        output(
            Command::new(&server_bin)
                .args(args)
                .arg("--data-dir")
                .arg(&data),
        )
    };
    let token = admin(&["token", "create", "--ttl", "10m", "--label", "site=demo"])?
        .trim()
        .to_owned();
    let id = output(
        Command::new(&agent_bin)
            .args([
                "bootstrap",
                "--server",
                &url,
                "--token",
                &token,
                "--ca-hash",
                &pin,
                "--name",
                "demo-box",
            ])
            .arg("--state-dir")
            .arg(&state),
    )?
    .trim()
    .to_owned();
    let _agent = Killed(
        Command::new(&agent_bin)
            .arg("run")
            .arg("--state-dir")
            .arg(&state)
            .stdout(Stdio::null())
            .stderr(log("agent.log")?)
            .spawn()
            .map_err(|e| format!("cannot start the agent: {e}"))?,
    );
    wait_for("the first heartbeat", || {
        admin(&["agents", "show", &id, "--json"])
            .ok()
            .filter(|j| j.contains("\"last_heartbeat\":\"20"))
    })?;
    println!(
        "server  {url}  (data dir {}, store {})",
        data.display(),
        data.join("server.redb").display()
    );
    println!("agent   {id}  (state dir {})", state.display());
    println!("CA hash {pin}\n");
    print!("{}", admin(&["agents", "list"])?);
    if opts.once {
        return Ok(());
    }
    let sd = rel(&data);
    println!("\nRunning; logs in {}. Try, in another shell:", rel(&root));
    println!("  target/debug/stella-server agents show {id} --data-dir {sd}");
    println!("  target/debug/stella-server agents deactivate {id} --data-dir {sd}");
    println!(
        "  target/debug/stella-agent status --state-dir {}",
        rel(&state)
    );
    println!("Ctrl-C stops both.");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn rel(p: &Path) -> String {
    p.strip_prefix(crate::project_root())
        .unwrap_or(p)
        .display()
        .to_string()
}
