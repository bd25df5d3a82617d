//! `cargo xtask bench [--quick]` (DESIGN.md section 13): builds release
//! binaries, measures the agent (size, RSS, allocations, doctor) and the
//! server (heartbeats/s against a `/healthz` baseline, enrollments/s, RSS and
//! start-up with a big store) with real processes on loopback, and prints one
//! table with the budgets, also written to `BENCHMARKS.md`.
//!
//! The simulated fleet is `stella-loadgen` (the `bench/` crate); this file
//! only starts processes, reads `/proc` and writes the table. A benchmark,
//! never a timed test: nothing here runs under `cargo test`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lexopt::Arg;

use crate::args::{Args, Usage};
use crate::dist::{self, thousands};
use crate::{cargo, project_root, run, target_dir};

const MIB: f64 = 1024.0 * 1024.0;
/// DESIGN.md section 13.
const AGENT_SIZE_BUDGET: u64 = 2 * 1024 * 1024;
const AGENT_RSS_BUDGET_KB: u64 = 4 * 1024;
const ALLOCS_PER_BEAT_BUDGET: f64 = 32.0;
const HEARTBEATS_PER_S_BUDGET: f64 = 20_000.0;
const ENROLLMENTS_PER_S_BUDGET: f64 = 500.0;
const SERVER_RSS_BUDGET_KB: u64 = 200 * 1024;
/// The store size the server budget is about.
const FLEET: usize = 100_000;
/// Heap growth between the early and late heartbeat still called "none"
/// (allocator bookkeeping of a log line or a doctor summary).
const GROWTH_TOLERANCE: i64 = 1024;
/// Where BENCHMARKS.md keeps hand-written analysis across runs.
const KEEP_MARKER: &str = "<!-- Everything below this line is kept by `cargo xtask bench`. -->";
/// The hook line the run loop needs for the allocation counts.
const HOOK: &str =
    "#[cfg(feature = \"bench-alloc\")] crate::alloc_count::report_if_asked(beat.seq);";

/// How big a run is.
struct Scale {
    quick: bool,
    /// Heartbeats before the agent's RSS is read.
    rss_beats: u64,
    /// The allocation counts compare the heap at these two heartbeats.
    alloc_early: u64,
    alloc_late: u64,
    doctor_runs: usize,
    /// Agents enrolled (and timed) for the load phase.
    enroll: usize,
    conns: &'static str,
    rounds: usize,
    warmup: &'static str,
    window: &'static str,
    /// Agents in the store for the restart measurement, and the time allowed.
    fill: usize,
    fill_deadline: &'static str,
}

impl Scale {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                quick,
                rss_beats: 500,
                alloc_early: 100,
                alloc_late: 500,
                doctor_runs: 10,
                enroll: 1_000,
                conns: "1000",
                rounds: 1,
                warmup: "1s",
                window: "5s",
                fill: 10_000,
                fill_deadline: "75s",
            }
        } else {
            Self {
                quick,
                rss_beats: 1_000,
                alloc_early: 100,
                alloc_late: 10_000,
                doctor_runs: 20,
                enroll: 10_000,
                conns: "1000,10000",
                rounds: 3,
                warmup: "2s",
                window: "10s",
                fill: FLEET,
                fill_deadline: "600s",
            }
        }
    }
}

/// A child process killed (by its PID) and reaped on drop.
struct Proc {
    child: Child,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Proc, String> {
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
fn with_nofile(program: &Path) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("ulimit -n \"$(ulimit -Hn)\" 2>/dev/null; exec \"$0\" \"$@\"")
        .arg(program);
    cmd
}

fn output(cmd: &mut Command) -> Result<String, String> {
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

fn wait_for<T>(
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
struct Status {
    rss_kb: u64,
    hwm_kb: u64,
    threads: u64,
}

fn proc_status(pid: u32) -> Option<Status> {
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

/// The agent's last acknowledged heartbeat, from its `state.json`.
fn heartbeat_seq(state_dir: &Path) -> Option<u64> {
    let text = fs::read_to_string(state_dir.join("state.json")).ok()?;
    let rest = &text[text.find("\"heartbeat_seq\":")? + "\"heartbeat_seq\":".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

fn mib(kb: u64) -> String {
    format!("{:.2} MiB", kb as f64 * 1024.0 / MIB)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "pass" } else { "**MISS**" }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// One line of the table.
struct Row {
    what: String,
    measured: String,
    budget: String,
    verdict: String,
    how: String,
}

fn row(
    what: impl Into<String>,
    measured: impl Into<String>,
    budget: &str,
    verdict: &str,
    how: impl Into<String>,
) -> Row {
    Row {
        what: what.into(),
        measured: measured.into(),
        budget: budget.into(),
        verdict: verdict.into(),
        how: how.into(),
    }
}

/// The binaries a run measures, copied aside so other builds cannot change them.
struct Bins {
    server: PathBuf,
    agent: PathBuf,
    agent_alloc: PathBuf,
    loadgen: PathBuf,
    /// Static musl agents from `dist`: (target, path) or (target, why not).
    dist: Vec<(String, Result<PathBuf, String>)>,
}

fn build(scale: &Scale, bin: &Path) -> Result<Bins, String> {
    fs::create_dir_all(bin).map_err(|e| format!("cannot create {}: {e}", bin.display()))?;
    // The shipped profile (fat LTO, opt-level z) for what is measured.
    run(cargo()
        .args([
            "build",
            "--release",
            "-p",
            "stella-server",
            "-p",
            "stella-agent",
        ])
        .env_remove("STELLA_VERSION"))?;
    let release = target_dir().join("release");
    let copy = |from: PathBuf, name: &str| -> Result<PathBuf, String> {
        // Copy, then rename: a binary still running from an earlier run
        // cannot be written over ("text file busy"), but it can be replaced.
        let to = bin.join(name);
        let tmp = bin.join(format!(".{name}.tmp"));
        fs::copy(&from, &tmp)
            .and_then(|_| fs::rename(&tmp, &to))
            .map_err(|e| format!("cannot copy {} to {}: {e}", from.display(), to.display()))?;
        Ok(to)
    };
    let server = copy(release.join("stella-server"), "stella-server")?;
    let agent = copy(release.join("stella-agent"), "stella-agent")?;
    // Its own target dir, so the two feature sets do not rebuild each other.
    let alloc_target = target_dir().join("bench-alloc");
    run(cargo()
        .args([
            "build",
            "--release",
            "-p",
            "stella-agent",
            "--features",
            "stella-agent/bench-alloc",
        ])
        .arg("--target-dir")
        .arg(&alloc_target)
        .env_remove("STELLA_VERSION"))?;
    let agent_alloc = copy(
        alloc_target.join("release/stella-agent"),
        "stella-agent-alloc",
    )?;
    // The load generator is built for speed (it shares the cores with the server).
    let loadgen_target = target_dir().join("bench-loadgen");
    run(cargo()
        .args(["build", "--release", "-p", "stella-bench"])
        .arg("--target-dir")
        .arg(&loadgen_target)
        .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "3")
        .env("CARGO_PROFILE_RELEASE_LTO", "false")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "16"))?;
    let loadgen = copy(
        loadgen_target.join("release/stella-loadgen"),
        "stella-loadgen",
    )?;

    let targets = ["x86_64-unknown-linux-musl", "aarch64-unknown-linux-musl"];
    let dist = if scale.quick {
        // --quick reuses what the last `cargo xtask dist` built.
        let dir = target_dir().join("dist").join(dist::version(None)?);
        targets
            .iter()
            .map(|t| {
                let p = dir.join(t).join("stella-agent");
                let found = if p.is_file() {
                    Ok(p)
                } else {
                    Err("not built (--quick uses `cargo xtask dist` output; none found)".into())
                };
                ((*t).to_owned(), found)
            })
            .collect()
    } else {
        match dist::build(&dist::Options::default()) {
            Ok(out) => targets
                .iter()
                .map(|t| {
                    let found = match out.skipped.iter().find(|(s, _)| s == t) {
                        Some((_, why)) => Err(format!("not built: {why}")),
                        None => Ok(out.dir.join(t).join("stella-agent")),
                    };
                    ((*t).to_owned(), found)
                })
                .collect(),
            Err(e) => targets
                .iter()
                .map(|t| ((*t).to_owned(), Err(format!("not built: {e}"))))
                .collect(),
        }
    };
    Ok(Bins {
        server,
        agent,
        agent_alloc,
        loadgen,
        dist,
    })
}

/// The 1-minute load average: other work on the machine skews every number.
fn load_average() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let ram = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or_else(
            || "unknown RAM".into(),
            |kb| format!("{:.1} GiB RAM", kb as f64 / MIB),
        );
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |s| s.trim().to_owned());
    let rustc = Command::new(std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into()))
        .arg("-V")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!("{cores} cores ({cpu}), {ram}, Linux {kernel}, {rustc}")
}

/// A server with its data dir.
struct Server {
    data: PathBuf,
    url: String,
    proc: Proc,
}

fn start_server(
    bin: &Bins,
    data: &Path,
    listen: &str,
    interval: &str,
    log: &Path,
) -> Result<Server, String> {
    let _ = fs::remove_file(data.join("server.url"));
    let proc = spawn(
        "stella-server",
        with_nofile(&bin.server)
            .args([
                "serve",
                "--listen",
                listen,
                "--heartbeat-interval",
                interval,
            ])
            .args(["--heartbeat-misses", "50", "--data-dir"])
            .arg(data),
        log,
    )?;
    let url = wait_for("the server to listen", Duration::from_secs(120), || {
        fs::read_to_string(data.join("server.url"))
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    })?;
    Ok(Server {
        data: data.to_path_buf(),
        url,
        proc,
    })
}

fn init_server(bin: &Bins, data: &Path) -> Result<(), String> {
    output(
        Command::new(&bin.server)
            .args(["init", "--data-dir"])
            .arg(data),
    )
    .map(drop)
}

fn admin(bin: &Bins, data: &Path, args: &[&str]) -> Result<String, String> {
    output(
        Command::new(&bin.server)
            .args(args)
            .arg("--data-dir")
            .arg(data),
    )
}

/// A real agent: enrolled, then `run`.
struct Agent {
    label: &'static str,
    state: PathBuf,
    proc: Proc,
    /// (heartbeat, status) samples taken on the way.
    samples: Vec<(u64, Status)>,
}

fn start_agent(
    label: &'static str,
    binary: &Path,
    server: &Server,
    token: &str,
    dir: &Path,
    env: &[(&str, &Path)],
) -> Result<Agent, String> {
    let state = dir.join(format!("agent-{label}"));
    output(
        Command::new(binary)
            .args([
                "bootstrap",
                "--server",
                &server.url,
                "--token",
                token,
                "--name",
            ])
            .arg(format!("bench-{label}"))
            .arg("--ca-file")
            .arg(server.data.join("ca.pem"))
            .arg("--state-dir")
            .arg(&state),
    )?;
    let mut cmd = Command::new(binary);
    cmd.args(["run", "--state-dir"]).arg(&state);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let proc = spawn(
        "stella-agent",
        &mut cmd,
        &dir.join(format!("agent-{label}.log")),
    )?;
    Ok(Agent {
        label,
        state,
        proc,
        samples: Vec::new(),
    })
}

/// Samples an agent's memory at the heartbeats in `at` as they pass.
fn sample(agent: &mut Agent, at: &[u64]) {
    let Some(seq) = heartbeat_seq(&agent.state) else {
        return;
    };
    for &mark in at {
        if seq >= mark
            && !agent.samples.iter().any(|(m, _)| *m == mark)
            && let Some(st) = proc_status(agent.proc.pid())
        {
            agent.samples.push((mark, st));
        }
    }
}

/// The allocation report: (seq, allocs+reallocs, in_use) per heartbeat.
fn read_alloc_report(path: &Path) -> Vec<(u64, u64, u64)> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let n = |i: usize| f.get(i)?.parse::<u64>().ok();
            Some((n(0)?, n(1)? + n(2)?, n(4)?))
        })
        .collect()
}

fn exit_report(path: &Path) -> Option<(u64, u64)> {
    let text = fs::read_to_string(path).ok()?;
    let f: Vec<u64> = text
        .lines()
        .find_map(|l| l.strip_prefix("exit "))?
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    Some((f.first()? + f.get(1)?, *f.get(4)?))
}

fn parse_kv(path: &Path) -> BTreeMap<String, String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// `cargo xtask bench` options.
#[derive(Debug)]
pub(crate) struct Options {
    /// About 2 minutes of measuring instead of the full run.
    quick: bool,
}

impl Options {
    /// Parses `[--quick]`.
    pub(crate) fn parse<I>(args: I) -> Result<Self, Usage>
    where
        I: IntoIterator,
        I::Item: Into<OsString>,
    {
        const CMD: &str = "bench";
        let mut quick = false;
        let mut args = Args::new(CMD, args);
        while let Some(arg) = args.next()? {
            match arg {
                Arg::Long("quick") => quick = true,
                other => return Err(Usage::unexpected(CMD, other)),
            }
        }
        Ok(Self { quick })
    }
}

/// `cargo xtask bench [--quick]`.
pub(crate) fn bench(opts: &Options) -> Result<(), String> {
    let quick = opts.quick;
    let scale = Scale::new(quick);
    let command = if quick {
        "cargo xtask bench --quick"
    } else {
        "cargo xtask bench"
    };
    let root = target_dir().join("bench");
    let t_build = Instant::now();
    let bins = build(&scale, &root.join("bin"))?;
    let build_secs = t_build.elapsed().as_secs_f64();
    let started = Instant::now();
    let load_before = load_average();
    let mut load_max = load_before;
    let run_dir = root.join("run");
    let _ = fs::remove_dir_all(&run_dir);
    fs::create_dir_all(&run_dir)
        .map_err(|e| format!("cannot create {}: {e}", run_dir.display()))?;
    eprintln!(
        "xtask bench: binaries built in {build_secs:.0}s; measuring in {}",
        run_dir.display()
    );
    let mut rows = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let mut problems: Vec<String> = Vec::new();

    // 1. Binary sizes.
    for (target, found) in &bins.dist {
        let budget = if target.starts_with("x86_64") {
            "≤ 2 MiB"
        } else {
            "none (x86_64's is 2 MiB)"
        };
        match found {
            Ok(path) => {
                let bytes =
                    fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                let n = bytes.len() as u64;
                let stripped = match crate::elf::has_symtab(&bytes) {
                    Some(false) => "stripped: no .symtab",
                    Some(true) => "NOT stripped: has .symtab",
                    None => "not an ELF file",
                };
                let v = if target.starts_with("x86_64") {
                    verdict(n <= AGENT_SIZE_BUDGET)
                } else {
                    "-"
                };
                rows.push(row(
                    format!("agent binary, {target}"),
                    format!("{} B ({:.2} MiB)", thousands(n), n as f64 / MIB),
                    budget,
                    v,
                    format!("file size of `cargo xtask dist` output ({stripped}; fat LTO, opt-level z, panic=abort)"),
                ));
            }
            Err(why) => rows.push(row(
                format!("agent binary, {target}"),
                why.clone(),
                budget,
                "-",
                "",
            )),
        }
    }

    // 2-4. Real agents against a real server at the fastest heartbeat it allows.
    let s0_data = run_dir.join("agent-server");
    init_server(&bins, &s0_data)?;
    let s0 = start_server(
        &bins,
        &s0_data,
        "127.0.0.1:0",
        "100ms",
        &run_dir.join("agent-server.log"),
    )?;
    let token = admin(
        &bins,
        &s0_data,
        &["token", "create", "--uses", "4", "--ttl", "1h"],
    )?
    .trim()
    .to_owned();
    let alloc_report = run_dir.join("alloc-run.txt");
    let mut agents = vec![start_agent(
        "native",
        &bins.agent,
        &s0,
        &token,
        &run_dir,
        &[],
    )?];
    let musl = bins
        .dist
        .iter()
        .find(|(t, _)| cfg!(target_arch = "x86_64") && t.starts_with("x86_64"))
        .and_then(|(_, p)| p.as_ref().ok());
    if let Some(musl) = musl {
        agents.push(start_agent("musl", musl, &s0, &token, &run_dir, &[])?);
    }
    let mut alloc_agent = start_agent(
        "alloc",
        &bins.agent_alloc,
        &s0,
        &token,
        &run_dir,
        &[("STELLA_ALLOC_REPORT", &alloc_report)],
    )?;
    let agents_started = Instant::now();
    let rss_marks = [scale.rss_beats / 2, scale.rss_beats];
    let poll_agents = |agents: &mut Vec<Agent>, alloc_agent: &mut Agent| -> Result<(), String> {
        for a in agents.iter_mut().chain(std::iter::once(&mut *alloc_agent)) {
            if let Some(status) = a.proc.exited() {
                return Err(format!(
                    "the {} agent exited ({status}); see {}",
                    a.label,
                    run_dir.join(format!("agent-{}.log", a.label)).display()
                ));
            }
            sample(a, &rss_marks);
        }
        Ok(())
    };

    // Doctor: wall time of the one-shot command, and its allocations.
    let mut walls = Vec::new();
    let mut doctor_exit = None;
    for _ in 0..scale.doctor_runs {
        let t0 = Instant::now();
        let out = Command::new(&bins.agent)
            .args(["doctor", "--json", "--state-dir"])
            .arg(&agents[0].state)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run doctor: {e}"))?;
        walls.push(t0.elapsed().as_secs_f64() * 1000.0);
        doctor_exit = out.status.code();
        poll_agents(&mut agents, &mut alloc_agent)?;
    }
    let (lo, hi) = walls
        .iter()
        .fold((f64::MAX, 0f64), |(l, h), w| (l.min(*w), h.max(*w)));
    rows.push(row(
        "doctor run time (`stella-agent doctor --json`, 11 checks)",
        format!("{:.1} ms median (min {lo:.1}, max {hi:.1})", median(&mut walls)),
        "none",
        "-",
        format!(
            "wall time of {} runs of the release binary against the agent server on loopback (includes process start, mTLS handshake; exit code {})",
            scale.doctor_runs,
            doctor_exit.map_or("signal".into(), |c| c.to_string())
        ),
    ));
    let mut doctor_allocs = Vec::new();
    let mut doctor_peak = 0;
    for i in 0..3 {
        let report = run_dir.join(format!("alloc-doctor-{i}.txt"));
        let _ = Command::new(&bins.agent_alloc)
            .args(["doctor", "--json", "--state-dir"])
            .arg(&alloc_agent.state)
            .env("STELLA_ALLOC_REPORT", &report)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status();
        if let Some((allocs, peak)) = exit_report(&report) {
            doctor_allocs.push(allocs as f64);
            doctor_peak = doctor_peak.max(peak);
        }
    }
    if doctor_allocs.is_empty() {
        rows.push(row(
            "doctor heap allocations",
            "not measured (no exit report)",
            "none",
            "-",
            "",
        ));
    } else {
        rows.push(row(
            "doctor heap allocations",
            format!(
                "{:.0} allocations, heap peak {:.1} KiB",
                median(&mut doctor_allocs),
                doctor_peak as f64 / 1024.0
            ),
            "none",
            "-",
            "counting global allocator (feature bench-alloc), whole process, median of 3 runs",
        ));
    }

    // 5-7. The fleet server under a simulated fleet.
    let s1_data = run_dir.join("fleet-server");
    init_server(&bins, &s1_data)?;
    let mut s1 = start_server(
        &bins,
        &s1_data,
        "127.0.0.1:0",
        "1h",
        &run_dir.join("fleet-server.log"),
    )?;
    let fleet_token = admin(
        &bins,
        &s1_data,
        &[
            "token",
            "create",
            "--uses",
            &(scale.fill.max(scale.enroll) + 10).to_string(),
            "--ttl",
            "1h",
        ],
    )?
    .trim()
    .to_owned();
    let results = run_dir.join("loadgen.txt");
    let mut loadgen = {
        let mut cmd = with_nofile(&bins.loadgen);
        cmd.args([
            "fleet",
            "--server",
            &s1.url,
            "--token",
            &fleet_token,
            "--ca",
        ])
        .arg(s1_data.join("ca.pem"))
        .arg("--out")
        .arg(&results)
        .args(["--enroll", &scale.enroll.to_string(), "--concurrency", "16"])
        .args([
            "--conns",
            scale.conns,
            "--rounds",
            &scale.rounds.to_string(),
        ])
        .args(["--warmup", scale.warmup, "--window", scale.window])
        .args([
            "--fill",
            &scale.fill.to_string(),
            "--fill-deadline",
            scale.fill_deadline,
        ]);
        spawn("stella-loadgen", &mut cmd, &run_dir.join("loadgen.log"))?
    };
    eprintln!(
        "xtask bench: load generator running (log: {})",
        run_dir.join("loadgen.log").display()
    );
    let mut server_peak_load = Status::default();
    let status = loop {
        poll_agents(&mut agents, &mut alloc_agent)?;
        if let Some(st) = proc_status(s1.proc.pid()) {
            server_peak_load = st;
        }
        load_max = load_max.max(load_average());
        if let Some(status) = loadgen.exited() {
            break status;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let kv = parse_kv(&results);
    if !status.success() {
        problems.push(format!(
            "the load generator failed ({status}); see {}",
            run_dir.join("loadgen.log").display()
        ));
    }
    let get = |k: &str| kv.get(k).cloned().unwrap_or_else(|| "?".into());
    let num = |k: &str| kv.get(k).and_then(|v| v.parse::<f64>().ok());
    let threads = get("loadgen.threads");
    for n in scale.conns.split(',') {
        let k = format!("load.{n}");
        let opened = get(&format!("{k}.opened"));
        let hb = num(&format!("{k}.heartbeat.rps"));
        let hz = num(&format!("{k}.healthz.rps"));
        let rounds = |kind: &str| get(&format!("{k}.{kind}.rps_rounds"));
        let lat = |kind: &str| {
            format!(
                "p50 {:.2} ms, p99 {:.2} ms",
                num(&format!("{k}.{kind}.p50_us")).unwrap_or(f64::NAN) / 1000.0,
                num(&format!("{k}.{kind}.p99_us")).unwrap_or(f64::NAN) / 1000.0
            )
        };
        let errors = |kind: &str| get(&format!("{k}.{kind}.errors"));
        match hb {
            Some(rps) => rows.push(row(
                format!("server heartbeats/s, {opened} agents (asked {n})"),
                format!("{}/s; {}", thousands(rps as u64), lat("heartbeat")),
                "≥ 20,000/s",
                verdict(rps >= HEARTBEATS_PER_S_BUDGET),
                format!(
                    "closed loop, one mTLS keep-alive connection and client certificate per enrolled agent, `POST /v1/agents/heartbeat`; median of {} × {} windows (each/s: {}), {} errors; load generator ({threads} threads) and server share the cores",
                    scale.rounds, scale.window, rounds("heartbeat"), errors("heartbeat")
                ),
            )),
            None => rows.push(row(format!("server heartbeats/s, {n} agents"), "not measured (see loadgen.log)", "≥ 20,000/s", "-", "")),
        }
        if let Some(rps) = hz {
            rows.push(row(
                format!("baseline `GET /healthz`/s, same {opened} connections"),
                format!(
                    "{}/s; {}; heartbeat = {} × baseline",
                    thousands(rps as u64),
                    lat("healthz"),
                    get(&format!("{k}.ratio"))
                ),
                "none",
                "-",
                format!(
                    "same loop and connections, alternated with the heartbeat windows (each/s: {}), {} errors: the cost of TLS + HTTP alone",
                    rounds("healthz"),
                    errors("healthz")
                ),
            ));
        }
    }
    if let Some(rate) = num("enroll.rate") {
        rows.push(row(
            format!("server enrollments/s, first {} agents", get("enroll.count")),
            format!(
                "{rate:.0}/s; p50 {} ms, p99 {} ms",
                get("enroll.p50_ms"),
                get("enroll.p99_ms")
            ),
            "≥ 500/s",
            verdict(rate >= ENROLLMENTS_PER_S_BUDGET),
            format!(
                "`POST /v1/agents/register` with real CSRs (made before the clock), {} keep-alive connections, redb file on disk; {} errors",
                get("enroll.concurrency"),
                get("enroll.errors")
            ),
        ));
    }
    let filled: usize = kv
        .get("fill.total")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if let Some(rate) = num("fill.rate") {
        rows.push(row(
            format!(
                "server enrollments/s, growing the store to {}",
                thousands(filled as u64)
            ),
            format!("{rate:.0}/s (per 5,000: {})", get("fill.chunk_rates")),
            "≥ 500/s",
            verdict(rate >= ENROLLMENTS_PER_S_BUDGET),
            format!(
                "as above, {:.0} s of enrolling{}",
                num("fill.secs").unwrap_or(f64::NAN),
                if get("fill.deadline_hit") == "true" {
                    format!(
                        "; stopped at the {} limit before {}",
                        scale.fill_deadline,
                        thousands(scale.fill as u64)
                    )
                } else {
                    String::new()
                }
            ),
        ));
    }
    rows.push(row(
        "server RSS during the load and enrollment phases",
        format!(
            "{} peak (VmHWM), {} at the end",
            mib(server_peak_load.hwm_kb),
            mib(server_peak_load.rss_kb)
        ),
        "none",
        "-",
        format!(
            "/proc of the server after the load generator finished ({} threads)",
            server_peak_load.threads
        ),
    ));

    // 8. Restart with the filled store: start-up time and RSS.
    let stored = filled.max(
        kv.get("enroll.count")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    s1.proc.kill();
    let listen = s1.url.trim_start_matches("https://").to_owned();
    let t0 = unix_now();
    s1.proc = spawn(
        "stella-server",
        with_nofile(&bins.server)
            .args([
                "serve",
                "--listen",
                &listen,
                "--heartbeat-interval",
                "1h",
                "--data-dir",
            ])
            .arg(&s1_data),
        &run_dir.join("fleet-server-restart.log"),
    )?;
    let restart = run_dir.join("restart.txt");
    let waited = output(
        Command::new(&bins.loadgen)
            .args([
                "healthz",
                "--server",
                &s1.url,
                "--since-unix-ns",
                &t0.as_nanos().to_string(),
                "--timeout",
                "300s",
                "--ca",
            ])
            .arg(s1_data.join("ca.pem"))
            .arg("--out")
            .arg(&restart),
    );
    let after_start = proc_status(s1.proc.pid()).unwrap_or_default();
    let listed = output(
        Command::new(&bins.loadgen)
            .args([
                "get",
                "--server",
                &s1.url,
                "--path",
                "/v1/admin/agents",
                "--ca",
            ])
            .arg(s1_data.join("ca.pem"))
            .arg("--bearer-file")
            .arg(s1_data.join("admin.token"))
            .arg("--out")
            .arg(&restart),
    );
    let after_list = proc_status(s1.proc.pid()).unwrap_or_default();
    let empty = proc_status(s0.proc.pid()).unwrap_or_default();
    s1.proc.kill();
    let rk = parse_kv(&restart);
    if let Err(e) = waited.and(listed) {
        problems.push(format!("restart measurement: {e}"));
    }
    let scaled = |kb: u64| -> u64 {
        // Linear in the agents, over an empty server's RSS.
        let per = kb.saturating_sub(empty.rss_kb) as f64 / stored.max(1) as f64;
        empty.rss_kb + (per * FLEET as f64) as u64
    };
    let exact = stored >= FLEET;
    let rss_line = |st: Status| {
        if exact {
            format!(
                "{} (VmRSS), peak {} (VmHWM)",
                mib(st.rss_kb),
                mib(st.hwm_kb)
            )
        } else {
            format!(
                "{} (VmRSS) with {} agents → ~{} extrapolated to {}; peak {}",
                mib(st.rss_kb),
                thousands(stored as u64),
                mib(scaled(st.rss_kb)),
                thousands(FLEET as u64),
                mib(st.hwm_kb)
            )
        }
    };
    let rss_ok =
        |st: Status| if exact { st.rss_kb } else { scaled(st.rss_kb) } <= SERVER_RSS_BUDGET_KB;
    let scope = if exact {
        thousands(FLEET as u64)
    } else {
        format!(
            "{} (of {})",
            thousands(stored as u64),
            thousands(FLEET as u64)
        )
    };
    rows.push(row(
        format!("server start-up, {scope} agents in the store"),
        format!("{} ms to the first `/healthz` 200", rk.get("healthz.after_ms").map_or("?", String::as_str)),
        "none",
        "-",
        "SIGKILL, then `serve` on the same redb file; from spawn to an answer, polled every 5 ms with fresh TLS connections",
    ));
    rows.push(row(
        format!("server RSS after start, {scope} agents"),
        rss_line(after_start),
        "≤ 200 MiB",
        verdict(rss_ok(after_start)),
        format!(
            "/proc right after the first `/healthz` answer{}",
            if exact {
                String::new()
            } else {
                format!(
                    "; extrapolation is linear over the agent server's {} with 4 agents",
                    mib(empty.rss_kb)
                )
            }
        ),
    ));
    rows.push(row(
        format!("server RSS after `GET /v1/admin/agents`, {scope} agents"),
        rss_line(after_list),
        "≤ 200 MiB",
        verdict(rss_ok(after_list)),
        format!(
            "/proc after the whole list, in pages of 1,000 as the CLI reads it ({} bytes of JSON in {} ms), was read",
            rk.get("get.bytes").map_or("?", String::as_str),
            rk.get("get.ms").map_or("?", String::as_str)
        ),
    ));

    // 2-3 again: wait for the agents to reach their heartbeat counts.
    let alloc_deadline = Duration::from_secs(if quick { 150 } else { 1500 });
    let mut hook_missing = false;
    loop {
        poll_agents(&mut agents, &mut alloc_agent)?;
        let seq = heartbeat_seq(&alloc_agent.state).unwrap_or(0);
        // Without the hook the report stays empty: say so, but still let
        // the RSS agents reach their count.
        if seq >= 20 && read_alloc_report(&alloc_report).is_empty() {
            hook_missing = true;
        }
        let rss_done = agents.iter().all(|a| a.samples.len() == rss_marks.len());
        if rss_done && (hook_missing || seq >= scale.alloc_late) {
            break;
        }
        if agents_started.elapsed() > alloc_deadline {
            problems.push(format!(
                "the agents did not reach their heartbeat counts within {alloc_deadline:?} (alloc agent at {seq})"
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for a in &agents {
        let kind = if a.label == "musl" {
            "static musl x86_64 (as shipped)"
        } else {
            "native glibc build"
        };
        match (
            a.samples.iter().find(|(m, _)| *m == rss_marks[0]),
            a.samples.iter().find(|(m, _)| *m == rss_marks[1]),
        ) {
            (Some((_, mid)), Some((_, end))) => {
                rows.push(row(
                    format!("agent RSS, steady, after {} heartbeats, {kind}", scale.rss_beats),
                    format!("{} (VmRSS; {} at heartbeat {})", mib(end.rss_kb), mib(mid.rss_kb), rss_marks[0]),
                    "≤ 4 MiB",
                    verdict(end.rss_kb <= AGENT_RSS_BUDGET_KB),
                    format!("/proc/PID/status of `stella-agent run`, server asking for 100 ms heartbeats; {} thread(s)", end.threads),
                ));
                rows.push(row(
                    format!("agent RSS, peak, after {} heartbeats, {kind}", scale.rss_beats),
                    format!("{} (VmHWM)", mib(end.hwm_kb)),
                    "none (the budget is for steady RSS)",
                    "-",
                    "same process; the peak includes start-up, the first doctor run and the TLS handshake",
                ));
            }
            _ => rows.push(row(
                format!("agent RSS, {kind}"),
                "not measured (too few heartbeats)",
                "≤ 4 MiB",
                "-",
                "",
            )),
        }
    }
    if hook_missing {
        problems.push(format!(
            "the allocation hook is missing: add `{HOOK}` to agent/src/heartbeat.rs after each acknowledged heartbeat"
        ));
        rows.push(row(
            "agent heap allocations per steady heartbeat",
            "NOT MEASURED: the hook is missing",
            "≤ 32",
            "-",
            HOOK,
        ));
    } else {
        let report = read_alloc_report(&alloc_report);
        let mut per_beat: Vec<f64> = report
            .windows(2)
            .filter(|w| w[1].0 == w[0].0 + 1 && w[0].0 >= scale.alloc_early)
            .map(|w| w[1].1.saturating_sub(w[0].1) as f64)
            .collect();
        let n = per_beat.len();
        let max = per_beat.iter().copied().fold(0.0, f64::max);
        let med = median(&mut per_beat);
        let p90 = per_beat
            .get((n * 9 / 10).min(n.saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN);
        let last = report.last().map_or(0, |r| r.0);
        rows.push(row(
            "agent heap allocations per steady heartbeat",
            format!("{med:.0} median (p90 {p90:.0}, max {max:.0})"),
            "≤ 32",
            verdict(med <= ALLOCS_PER_BEAT_BUDGET),
            format!(
                "counting global allocator (feature bench-alloc): alloc + realloc calls between consecutive acknowledged heartbeats {}..{last} ({n} intervals)",
                scale.alloc_early
            ),
        ));
        let at = |seq: u64| report.iter().find(|r| r.0 == seq).map(|r| r.2);
        let late = scale.alloc_late.min(last);
        match (at(scale.alloc_early), at(late)) {
            (Some(early), Some(end)) => {
                let growth = end as i64 - early as i64;
                rows.push(row(
                    format!("agent heap in use, heartbeat {} vs {}", scale.alloc_early, late),
                    format!("{} B vs {} B ({growth:+} B)", thousands(early), thousands(end)),
                    "no growth",
                    verdict(growth <= GROWTH_TOLERANCE && late >= scale.alloc_late),
                    format!("bytes allocated and not freed, from the same counters (growth up to {GROWTH_TOLERANCE} B counts as none)"),
                ));
            }
            _ => rows.push(row(
                "agent heap in use",
                format!("not measured (report ends at {last})"),
                "no growth",
                "-",
                "",
            )),
        }
    }
    for a in agents.iter_mut() {
        a.proc.kill();
    }
    alloc_agent.proc.kill();
    drop(s0);

    let run_secs = started.elapsed().as_secs_f64();
    if quick {
        notes.push(format!(
            "--quick: agent RSS after {} heartbeats (not 1,000), heap compared at {} vs {} (not 10,000), {} enrolled and {} connections (not 10,000), one {} window per load, store of {} agents at most ({}) with the RSS extrapolated to 100,000.",
            scale.rss_beats, scale.alloc_early, scale.alloc_late, scale.enroll, scale.conns, scale.window, thousands(scale.fill as u64), scale.fill_deadline
        ));
    }
    notes.push(format!(
        "The load generator (`stella-loadgen`, {threads} threads), the fleet server, the agent server and the {} measured agents all share the machine's cores; the agents and their server add about 30 requests/s.",
        agents.len() + 1
    ));
    notes.push(format!(
        "1-minute load average {load_before:.1} when measuring started, up to {load_max:.1} during the load phase; with 2 cores, anything above ~3 means other work (builds, tests) competed with the measured processes and the server numbers are lower bounds."
    ));
    notes.push("The agent and server are the workspace release profile (fat LTO, opt-level \"z\"), native target; sizes are of the static musl dist binaries.".into());
    let table = render(&rows);
    let head = format!(
        "# Benchmarks\n\nMeasured by `{command}` on {} ({run_secs:.0} s of measuring after {build_secs:.0} s of building).\n\nMachine: {}.\n\nEvery number below was measured by that run; nothing is copied from an earlier run. Budgets are DESIGN.md section 13.\n\n",
        stella_proto::time::rfc3339(unix_now().as_secs()),
        machine()
    );
    let mut doc = head;
    doc.push_str(&table);
    doc.push('\n');
    for n in &notes {
        let _ = writeln!(doc, "- {n}");
    }
    for p in &problems {
        let _ = writeln!(doc, "- PROBLEM: {p}");
    }
    let path = project_root().join("BENCHMARKS.md");
    let kept = fs::read_to_string(&path)
        .ok()
        .and_then(|old| old.find(KEEP_MARKER).map(|i| old[i..].to_owned()))
        .unwrap_or_else(|| format!("{KEEP_MARKER}\n"));
    let _ = write!(doc, "\n{kept}");
    fs::write(&path, &doc).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    println!("{table}");
    for n in &notes {
        println!("- {n}");
    }
    println!(
        "written to {} ({run_secs:.0} s measuring, {build_secs:.0} s building)",
        path.display()
    );
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\nxtask: "))
    }
}

fn render(rows: &[Row]) -> String {
    let mut out = String::from(
        "| what | measured | budget | verdict | how it was measured |\n|---|---|---|---|---|\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            r.what,
            r.measured,
            r.budget,
            r.verdict,
            r.how.replace('|', "\\|")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_heartbeat_seq_and_alloc_lines() {
        let dir = std::env::temp_dir().join(format!("xtask-bench-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("state.json"),
            r#"{"last_heartbeat":"x","heartbeat_seq":1234,"a":1}"#,
        )
        .unwrap();
        assert_eq!(heartbeat_seq(&dir), Some(1234));
        let report = dir.join("r.txt");
        fs::write(
            &report,
            "1 10 2 5 900 1000\n2 20 3 9 900 1000\nexit 40 4 30 100 2000\n",
        )
        .unwrap();
        assert_eq!(read_alloc_report(&report), vec![(1, 12, 900), (2, 23, 900)]);
        assert_eq!(exit_report(&report), Some((44, 2000)));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
