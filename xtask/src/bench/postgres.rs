//! Phase 10 (`--store postgres`): the server on PostgreSQL, next to redb in
//! the same run. A real cluster (pgcluster.rs); a fresh server on it under
//! the same simulated fleet as redb's phases 5-6 (heartbeats/s, enrollments/s,
//! each also as a ratio of redb's); then the redb store the run filled (up to
//! 100,000 agents) copied with `stella-server migrate` into a second
//! database, and the server started on that copy: start-up time and RSS, as
//! phase 8 measures them for redb. The rows form their own section of
//! BENCHMARKS.md, which `--only postgres` replaces in place.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::bins::Bins;
use super::pgcluster::Cluster;
use super::process::{output, wait_for};
use super::server;
use super::store::{SERVER_RSS_BUDGET_KB, StartMeasure, measure_start};
use super::table::{Row, mib, row, verdict};
use super::{FLEET, Scale};
use crate::dist::thousands;

/// docs/design.md section 13 (the same budgets as on redb).
const HEARTBEATS_PER_S_BUDGET: f64 = 20_000.0;
const ENROLLMENTS_PER_S_BUDGET: f64 = 500.0;
/// The bound for a follower taking over the singleton work.
const TAKEOVER_BUDGET: &str = "≤ 15 s (the lease time)";

/// What the redb phases of the same run measured, for the ratios.
pub(super) struct Redb<'a> {
    /// The load generator's results on redb (phases 5-7).
    pub(super) results: &'a BTreeMap<String, String>,
    /// The data dir whose redb store the load filled; no server runs on it.
    pub(super) data: &'a Path,
    /// Agents in that store.
    pub(super) stored: usize,
    /// Phase 8 on that store.
    pub(super) start: &'a StartMeasure,
}

/// The PostgreSQL phase on `cluster`: its rows (for the section); what
/// failed on the way goes to `problems`.
pub(super) fn measure(
    bins: &Bins,
    run_dir: &Path,
    scale: &Scale,
    cluster: &Cluster,
    redb: &Redb,
    rows: &mut Vec<Row>,
    problems: &mut Vec<String>,
) -> Result<(), String> {
    eprintln!("xtask bench: the server on PostgreSQL");

    // Heartbeats and enrollments: a fresh server, the same load as redb's.
    let url = cluster.database("bench_load")?;
    let data = run_dir.join("pg-fleet-server");
    server::init_on(bins, &data, Some(&url))?;
    let fleet = server::start_on(
        bins,
        &data,
        Some(&url),
        "127.0.0.1:0",
        "1h",
        &run_dir.join("pg-fleet-server.log"),
    )?;
    let (kv, peak) = server::run_fleet(
        bins,
        &fleet,
        run_dir,
        "pg-loadgen",
        scale,
        0,
        &mut || Ok(()),
        &mut 0.0,
        problems,
    )?;
    let landed = cluster
        .sql("bench_load", "SELECT count(*) FROM heartbeats")
        .unwrap_or_else(|e| format!("? ({e})"));
    drop(fleet);
    load_rows(scale, &kv, redb.results, &landed, rows);
    rows.push(row(
        "PostgreSQL: server RSS during the load and enrollment phases",
        format!(
            "{} peak (VmHWM), {} at the end",
            mib(peak.hwm_kb),
            mib(peak.rss_kb)
        ),
        "none",
        "-",
        format!(
            "/proc of the server after the load generator finished ({} threads; PostgreSQL's own processes not counted)",
            peak.threads
        ),
    ));

    // The filled redb store, copied into PostgreSQL.
    let filled_url = cluster.database("bench_filled")?;
    let t0 = Instant::now();
    let copied = output(
        Command::new(&bins.server)
            .args(["migrate", "--from"])
            .arg(redb.data)
            .args(["--to", &filled_url]),
    );
    let migrate_secs = t0.elapsed().as_secs_f64();
    match &copied {
        Ok(_) => rows.push(row(
            format!(
                "PostgreSQL: `stella-server migrate` of {} agents from redb",
                thousands(redb.stored as u64)
            ),
            format!("{migrate_secs:.1} s"),
            "none",
            "-",
            "the redb store the load filled, copied into an empty database in one transaction (agents keep their ids and certificates)",
        )),
        Err(e) => problems.push(format!("PostgreSQL: migrate failed: {e}")),
    }
    if copied.is_ok() {
        let listen = free_listen()?;
        let started = measure_start(
            bins,
            redb.data,
            Some(&filled_url),
            &listen,
            &run_dir.join("pg-fleet-server-restart.log"),
            &run_dir.join("pg-restart.txt"),
        )?;
        if let Some(e) = &started.problem {
            problems.push(format!("PostgreSQL: start measurement: {e}"));
        }
        start_rows(redb, &started, rows);
    }

    rows.push(follower_takeover(bins, cluster, run_dir));
    Ok(())
}

/// Heartbeats/s per connection count and enrollments/s on PostgreSQL, each
/// with redb's number of the same run and the ratio.
fn load_rows(
    scale: &Scale,
    pg: &BTreeMap<String, String>,
    redb: &BTreeMap<String, String>,
    landed: &str,
    rows: &mut Vec<Row>,
) {
    let get =
        |kv: &BTreeMap<String, String>, k: &str| kv.get(k).cloned().unwrap_or_else(|| "?".into());
    let num =
        |kv: &BTreeMap<String, String>, k: &str| kv.get(k).and_then(|v| v.parse::<f64>().ok());
    let ratio = |pg: Option<f64>, redb: Option<f64>| match (pg, redb) {
        (Some(p), Some(r)) if r > 0.0 => format!("{:.2} × redb's {}/s", p / r, thousands(r as u64)),
        _ => "redb's not measured".to_owned(),
    };
    for n in scale.conns.split(',') {
        let k = format!("load.{n}");
        let hb = num(pg, &format!("{k}.heartbeat.rps"));
        let redb_hb = num(redb, &format!("{k}.heartbeat.rps"));
        match hb {
            Some(rps) => rows.push(row(
                format!(
                    "PostgreSQL: server heartbeats/s, {} agents (asked {n})",
                    get(pg, &format!("{k}.opened"))
                ),
                format!(
                    "{}/s = {}; p50 {:.2} ms, p99 {:.2} ms; heartbeat = {} × `/healthz` on the same connections (redb: {})",
                    thousands(rps as u64),
                    ratio(hb, redb_hb),
                    num(pg, &format!("{k}.heartbeat.p50_us")).unwrap_or(f64::NAN) / 1000.0,
                    num(pg, &format!("{k}.heartbeat.p99_us")).unwrap_or(f64::NAN) / 1000.0,
                    get(pg, &format!("{k}.ratio")),
                    get(redb, &format!("{k}.ratio"))
                ),
                "≥ 20,000/s",
                verdict(rps >= HEARTBEATS_PER_S_BUDGET),
                format!(
                    "as on redb: closed loop, one mTLS keep-alive connection per enrolled agent, median of {} × {} windows (each/s: {}), {} errors; the `/healthz` ratio is the comparison the machine's load skews least (both stores' runs are alternated with `/healthz` windows); the server group-commits heartbeat soft state to PostgreSQL (rows in `heartbeats` after the run: {landed}); PostgreSQL, the server and the load generator share the cores",
                    scale.rounds,
                    scale.window,
                    get(pg, &format!("{k}.heartbeat.rps_rounds")),
                    get(pg, &format!("{k}.heartbeat.errors"))
                ),
            )),
            None => rows.push(row(
                format!("PostgreSQL: server heartbeats/s, {n} agents"),
                "not measured (see pg-loadgen.log)",
                "≥ 20,000/s",
                "-",
                "",
            )),
        }
    }
    match num(pg, "enroll.rate") {
        Some(rate) => rows.push(row(
            format!(
                "PostgreSQL: server enrollments/s, first {} agents",
                get(pg, "enroll.count")
            ),
            format!(
                "{rate:.0}/s = {}; p50 {} ms, p99 {} ms",
                ratio(Some(rate), num(redb, "enroll.rate")),
                get(pg, "enroll.p50_ms"),
                get(pg, "enroll.p99_ms")
            ),
            "≥ 500/s",
            verdict(rate >= ENROLLMENTS_PER_S_BUDGET),
            format!(
                "as on redb: `POST /v1/agents/register` with real CSRs, {} keep-alive connections, one token with many uses (its use count is one row every enrollment updates); {} errors",
                get(pg, "enroll.concurrency"),
                get(pg, "enroll.errors")
            ),
        )),
        None => rows.push(row(
            "PostgreSQL: server enrollments/s",
            "not measured (see pg-loadgen.log)",
            "≥ 500/s",
            "-",
            "",
        )),
    }
}

/// Start-up and RSS on the migrated store, with redb's of phase 8.
fn start_rows(redb: &Redb, pg: &StartMeasure, rows: &mut Vec<Row>) {
    let exact = redb.stored >= FLEET;
    let scope = if exact {
        thousands(FLEET as u64)
    } else {
        format!(
            "{} (of {}; no extrapolation)",
            thousands(redb.stored as u64),
            thousands(FLEET as u64)
        )
    };
    let times = |a: f64, b: f64| {
        if b > 0.0 {
            format!("{:.2} ×", a / b)
        } else {
            "? ×".to_owned()
        }
    };
    rows.push(row(
        format!("PostgreSQL: server start-up, {scope} agents in the store"),
        match (pg.startup_ms(), redb.start.startup_ms()) {
            (Some(p), Some(r)) => format!(
                "{p:.1} ms to the first `/healthz` 200 = {} redb's {r:.1} ms",
                times(p, r)
            ),
            (Some(p), None) => format!("{p:.1} ms to the first `/healthz` 200"),
            _ => "not measured (see pg-fleet-server-restart.log)".to_owned(),
        },
        "none",
        "-",
        "`serve --store postgres://…` on the migrated copy (the redb data dir for the CA); from spawn to an answer, polled every 5 ms with fresh TLS connections",
    ));
    let rss = |what: &str, p: u64, r: u64, how: String| {
        row(
            format!("PostgreSQL: server RSS {what}, {scope} agents"),
            format!(
                "{} (VmRSS) = {} redb's {}",
                mib(p),
                times(p as f64, r as f64),
                mib(r)
            ),
            "≤ 200 MiB",
            if exact {
                verdict(p <= SERVER_RSS_BUDGET_KB)
            } else {
                "-"
            },
            how,
        )
    };
    rows.push(rss(
        "after start",
        pg.after_start.rss_kb,
        redb.start.after_start.rss_kb,
        format!(
            "/proc right after the first `/healthz` answer (peak {})",
            mib(pg.after_start.hwm_kb)
        ),
    ));
    rows.push(rss(
        "after `GET /v1/admin/agents`",
        pg.after_list.rss_kb,
        redb.start.after_list.rss_kb,
        format!(
            "/proc after the whole list, in pages of 1,000 ({} bytes of JSON in {} ms; redb: {} ms), was read (peak {})",
            pg.results.get("get.bytes").map_or("?", String::as_str),
            pg.results.get("get.ms").map_or("?", String::as_str),
            redb.start.results.get("get.ms").map_or("?", String::as_str),
            mib(pg.after_list.hwm_kb)
        ),
    ));
}

/// Time for a follower to take over the singleton work (heartbeat-timeout
/// monitor, rollout controller) when the leader dies: three servers on one
/// database (the second and third from copies of the first's data dir, as a
/// node joins), the leader found by its log line, SIGKILLed, and the time
/// until another server logs that it leads.
fn follower_takeover(bins: &Bins, cluster: &Cluster, run_dir: &Path) -> Row {
    let what = "PostgreSQL: time for a follower to take over leadership";
    let how = "three servers on one database; SIGKILL of the leader, to another server logging that it leads (lease 10 s, renewed every 2 s)";
    match measure_takeover(bins, cluster, run_dir) {
        Ok(secs) => row(
            what,
            format!("{secs:.1} s"),
            TAKEOVER_BUDGET,
            verdict(secs <= 15.0),
            how,
        ),
        Err(e) => row(
            what,
            format!("failed: {e}"),
            TAKEOVER_BUDGET,
            "**MISS**",
            how,
        ),
    }
}

/// What a server logs when it takes the leader lease.
const LEADING: &str = "msg=\"leading:";

fn measure_takeover(bins: &Bins, cluster: &Cluster, run_dir: &Path) -> Result<f64, String> {
    let url = cluster.database("bench_lease")?;
    let first = run_dir.join("lease-0");
    server::init_on(bins, &first, Some(&url))?;
    let mut servers = Vec::new();
    let mut logs = Vec::new();
    for i in 0..3 {
        let data = run_dir.join(format!("lease-{i}"));
        if i > 0 {
            output(Command::new("cp").arg("-a").arg(&first).arg(&data))?;
        }
        let log = run_dir.join(format!("lease-{i}.log"));
        servers.push(server::start_on(
            bins,
            &data,
            Some(&url),
            &free_listen()?,
            "1s",
            &log,
        )?);
        logs.push(log);
    }
    let leads =
        |i: usize| std::fs::read_to_string(&logs[i]).is_ok_and(|text| text.contains(LEADING));
    let measured = (|| {
        let leader = wait_for("a leader", Duration::from_secs(60), || {
            (0..servers.len()).find(|&i| leads(i))
        })?;
        servers[leader].proc.kill();
        let killed = Instant::now();
        wait_for("a follower to take over", Duration::from_secs(60), || {
            (0..servers.len()).find(|&i| i != leader && leads(i))
        })?;
        Ok(killed.elapsed().as_secs_f64())
    })();
    for server in &mut servers {
        server.proc.kill();
    }
    measured
}

/// `127.0.0.1:PORT` of a free port, for a server whose URL must be known
/// before it starts (the start-up is timed from the spawn).
fn free_listen() -> Result<String, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.to_string())
        .map_err(|e| format!("no free loopback port: {e}"))
}
