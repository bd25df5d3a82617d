//! Phases 5-7: the fleet server under a simulated fleet (`stella-loadgen`):
//! heartbeats/s against a `GET /healthz` baseline on the same connections,
//! enrollments/s while the store grows, and the server's RSS meanwhile. Also
//! the server process every phase starts.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::Scale;
use super::bins::Bins;
use super::process::{
    Proc, Status, load_average, output, proc_status, spawn, wait_for, with_nofile,
};
use super::table::{Row, mib, row, verdict};
use crate::dist::thousands;

/// docs/design.md section 13.
const HEARTBEATS_PER_S_BUDGET: f64 = 20_000.0;
const ENROLLMENTS_PER_S_BUDGET: f64 = 500.0;

/// A server with its data dir.
pub(super) struct Server {
    pub(super) data: PathBuf,
    pub(super) url: String,
    pub(super) proc: Proc,
}

pub(super) fn start(
    bin: &Bins,
    data: &Path,
    listen: &str,
    interval: &str,
    log: &Path,
) -> Result<Server, String> {
    start_on(bin, data, None, listen, interval, log)
}

/// `start` with the store in PostgreSQL (`store`: its URL) or, `None`,
/// redb in the data dir.
pub(super) fn start_on(
    bin: &Bins,
    data: &Path,
    store: Option<&str>,
    listen: &str,
    interval: &str,
    log: &Path,
) -> Result<Server, String> {
    let _ = fs::remove_file(data.join("server.url"));
    let mut serve = serve_command(bin, data, store, listen, interval);
    serve.args(["--heartbeat-misses", "50"]);
    let proc = spawn("stella-server", &mut serve, log)?;
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

/// `stella-server serve` on data dir `data` (its store: redb there, or
/// the PostgreSQL URL `store`) at `listen`, asking for heartbeats every
/// `interval`.
pub(super) fn serve_command(
    bin: &Bins,
    data: &Path,
    store: Option<&str>,
    listen: &str,
    interval: &str,
) -> Command {
    let mut serve = with_nofile(&bin.server);
    serve
        .args([
            "serve",
            "--listen",
            listen,
            "--heartbeat-interval",
            interval,
        ])
        .arg("--data-dir")
        .arg(data);
    if let Some(store) = store {
        serve.args(["--store", store]);
    }
    serve
}

pub(super) fn init(bin: &Bins, data: &Path) -> Result<(), String> {
    init_on(bin, data, None)
}

/// `init` with the store in PostgreSQL (`store`: its URL) or redb.
pub(super) fn init_on(bin: &Bins, data: &Path, store: Option<&str>) -> Result<(), String> {
    let mut init = Command::new(&bin.server);
    init.args(["init", "--data-dir"]).arg(data);
    if let Some(store) = store {
        init.args(["--store", store]);
    }
    output(&mut init).map(drop)
}

pub(super) fn admin(bin: &Bins, data: &Path, args: &[&str]) -> Result<String, String> {
    output(
        Command::new(&bin.server)
            .args(args)
            .arg("--data-dir")
            .arg(data),
    )
}

pub(super) fn parse_kv(path: &Path) -> BTreeMap<String, String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Runs `stella-loadgen fleet` against `server` (a fresh store): it
/// enrolls `scale.enroll` agents, loads `scale.conns` connections and grows
/// the store to `fill` agents (none when `fill` is not above the enrolled).
/// Writes `{name}.txt` (its results) and `{name}.log` in `run_dir`; returns
/// the results and the server's last `/proc` status meanwhile.
#[allow(clippy::too_many_arguments)]
pub(super) fn run_fleet(
    bins: &Bins,
    server: &Server,
    run_dir: &Path,
    name: &str,
    scale: &Scale,
    fill: usize,
    poll_agents: &mut dyn FnMut() -> Result<(), String>,
    load_max: &mut f64,
    problems: &mut Vec<String>,
) -> Result<(BTreeMap<String, String>, Status), String> {
    let fleet_token = admin(
        bins,
        &server.data,
        &[
            "token",
            "create",
            "--uses",
            &(fill.max(scale.enroll) + 10).to_string(),
            "--ttl",
            "1h",
        ],
    )?
    .trim()
    .to_owned();
    let results = run_dir.join(format!("{name}.txt"));
    let log = run_dir.join(format!("{name}.log"));
    let mut loadgen = {
        let mut cmd = with_nofile(&bins.loadgen);
        cmd.args([
            "fleet",
            "--server",
            &server.url,
            "--token",
            &fleet_token,
            "--ca",
        ])
        .arg(server.data.join("ca.pem"))
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
            &fill.to_string(),
            "--fill-deadline",
            scale.fill_deadline,
        ]);
        spawn("stella-loadgen", &mut cmd, &log)?
    };
    eprintln!(
        "xtask bench: load generator running (log: {})",
        log.display()
    );
    let mut server_peak_load = Status::default();
    let status = loop {
        poll_agents()?;
        if let Some(st) = proc_status(server.proc.pid()) {
            server_peak_load = st;
        }
        *load_max = load_max.max(load_average());
        if let Some(status) = loadgen.exited() {
            break status;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if !status.success() {
        problems.push(format!(
            "the load generator failed ({status}); see {}",
            log.display()
        ));
    }
    Ok((parse_kv(&results), server_peak_load))
}

/// The fleet server after the load, with what the load generator wrote.
pub(super) struct Fleet {
    pub(super) server: Server,
    /// The load generator's results (`key=value` lines).
    pub(super) results: BTreeMap<String, String>,
    /// Agents in the store after the fill phase.
    pub(super) filled: usize,
    /// The load generator's thread count, for the notes.
    pub(super) loadgen_threads: String,
}

/// Runs the load generator against a fresh server and adds its rows;
/// `poll_agents` keeps the agents of phases 2-4 sampled meanwhile, and
/// `load_max` follows the machine's load.
pub(super) fn load(
    bins: &Bins,
    run_dir: &Path,
    scale: &Scale,
    poll_agents: &mut dyn FnMut() -> Result<(), String>,
    load_max: &mut f64,
    rows: &mut Vec<Row>,
    problems: &mut Vec<String>,
) -> Result<Fleet, String> {
    let s1_data = run_dir.join("fleet-server");
    init(bins, &s1_data)?;
    let s1 = start(
        bins,
        &s1_data,
        "127.0.0.1:0",
        "1h",
        &run_dir.join("fleet-server.log"),
    )?;
    let (kv, server_peak_load) = run_fleet(
        bins,
        &s1,
        run_dir,
        "loadgen",
        scale,
        scale.fill,
        poll_agents,
        load_max,
        problems,
    )?;
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
    Ok(Fleet {
        server: s1,
        results: kv,
        filled,
        loadgen_threads: threads,
    })
}
