//! `cargo xtask bench [--quick] [--store postgres] [--only storm|postgres]`
//! (docs/design.md section 13): builds release binaries, measures the agent
//! (size, RSS, allocations, doctor) and the server (heartbeats/s against a
//! `/healthz` baseline, enrollments/s, RSS and start-up with a big store, a
//! reconnect storm) with real processes on loopback, and prints one table
//! with the budgets, also written to `BENCHMARKS.md` (not by `--only storm`,
//! which measures one phase). `--store postgres` measures the server on
//! PostgreSQL too, next to redb in the same run, into a section of its own;
//! `--only postgres` runs just the server phases on both stores and
//! replaces only that section.
//!
//! The simulated fleet is `stella-loadgen` (the `bench/` crate); these files
//! only start processes, read `/proc` and write the table. A benchmark,
//! never a timed test: nothing here runs under `cargo test`. This file runs
//! the phases in order and writes the report; each phase is its own file.

mod agent;
mod bins;
mod pgcluster;
mod postgres;
mod process;
mod server;
mod size;
mod store;
mod storm;
mod table;

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lexopt::Arg;

use self::agent::Agents;
use self::process::load_average;
use self::table::{MIB, render};
use crate::args::{Args, Usage};
use crate::dist::thousands;
use crate::{project_root, target_dir};

/// The store size the server budget is about.
const FLEET: usize = 100_000;
/// Where BENCHMARKS.md keeps hand-written analysis across runs.
const KEEP_MARKER: &str = "<!-- Everything below this line is kept by `cargo xtask bench`. -->";
/// The PostgreSQL section's first and last lines: a run that does not
/// measure PostgreSQL keeps the section, `--only postgres` replaces it.
const PG_SECTION_START: &str = "## PostgreSQL store (`cargo xtask bench --store postgres`)";
const PG_SECTION_END: &str = "<!-- End of the PostgreSQL section. -->";

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
    /// Simulated agents in the reconnect storm.
    storm_agents: usize,
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
                storm_agents: 1_000,
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
                storm_agents: 10_000,
            }
        }
    }
}

/// `cargo xtask bench` options.
#[derive(Debug)]
pub(crate) struct Options {
    /// About 2 minutes of measuring instead of the full run.
    quick: bool,
    /// Only this phase: `storm` (printed, not written to BENCHMARKS.md) or
    /// `postgres` (the server phases on both stores; written to its own
    /// section of BENCHMARKS.md).
    only: Option<Phase>,
    /// Also measure the server on PostgreSQL (`--store postgres`).
    postgres: bool,
}

/// A phase that can be run alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Storm,
    Postgres,
}

impl Options {
    /// Parses `[--quick] [--store postgres] [--only storm|postgres]`.
    pub(crate) fn parse<I>(args: I) -> Result<Self, Usage>
    where
        I: IntoIterator,
        I::Item: Into<OsString>,
    {
        const CMD: &str = "bench";
        let mut quick = false;
        let mut only = None;
        let mut postgres = false;
        let mut args = Args::new(CMD, args);
        while let Some(arg) = args.next()? {
            match arg {
                Arg::Long("quick") => quick = true,
                Arg::Long("only") => {
                    only = match args.string("--only")?.as_str() {
                        "storm" => Some(Phase::Storm),
                        "postgres" => Some(Phase::Postgres),
                        other => {
                            return Err(Usage::Wrong(format!(
                                "{CMD}: --only {other:?}: the phases run alone are: storm, postgres"
                            )));
                        }
                    }
                }
                Arg::Long("store") => match args.string("--store")?.as_str() {
                    "postgres" => postgres = true,
                    "redb" => {}
                    other => {
                        return Err(Usage::Wrong(format!(
                            "{CMD}: --store {other:?}: the stores are redb (always measured) and postgres"
                        )));
                    }
                },
                other => return Err(Usage::unexpected(CMD, other)),
            }
        }
        Ok(Self {
            quick,
            only,
            postgres,
        })
    }
}

/// `cargo xtask bench --only storm`: builds the server and the load
/// generator only, runs the storm and prints its rows.
fn only_storm(scale: &Scale) -> Result<(), String> {
    let root = target_dir().join("bench");
    let bins = bins::build_server_and_loadgen(&root.join("bin"))?;
    let run_dir = root.join("run-storm");
    let _ = fs::remove_dir_all(&run_dir);
    fs::create_dir_all(&run_dir)
        .map_err(|e| format!("cannot create {}: {e}", run_dir.display()))?;
    let load_before = load_average();
    let started = Instant::now();
    let (mut rows, mut problems) = (Vec::new(), Vec::new());
    storm::storm(
        &bins,
        &run_dir,
        scale.storm_agents,
        &mut rows,
        &mut problems,
    )?;
    println!("{}", render(&rows));
    println!(
        "- measured in {:.0} s on {}; 1-minute load average {load_before:.1} at the start, {:.1} at the end (BENCHMARKS.md not written: --only)",
        started.elapsed().as_secs_f64(),
        machine(),
        load_average()
    );
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\nxtask: "))
    }
}

/// Agents in the store the load filled.
fn stored_agents(fleet: &server::Fleet) -> usize {
    fleet.filled.max(
        fleet
            .results
            .get("enroll.count")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    )
}

/// `cargo xtask bench --only postgres [--quick]`: builds the server and the
/// load generator only, runs the server phases (5-8) on redb and then on
/// PostgreSQL, prints both and replaces only the PostgreSQL section of
/// BENCHMARKS.md (every other part of the file stays as it is).
fn only_postgres(scale: &Scale) -> Result<(), String> {
    const COMMAND: &str = "cargo xtask bench --only postgres";
    // Before minutes of building and loading: is PostgreSQL there at all?
    let cluster = pgcluster::Cluster::start()?;
    let root = target_dir().join("bench");
    let bins = bins::build_server_and_loadgen(&root.join("bin"))?;
    let run_dir = root.join("run-postgres");
    let _ = fs::remove_dir_all(&run_dir);
    fs::create_dir_all(&run_dir)
        .map_err(|e| format!("cannot create {}: {e}", run_dir.display()))?;
    let load_before = load_average();
    let mut load_max = load_before;
    let started = Instant::now();
    let (mut redb_rows, mut rows, mut problems) = (Vec::new(), Vec::new(), Vec::new());
    // An almost empty server's memory, for phase 8's extrapolation when
    // the store is not full (--quick).
    let empty = {
        let data = run_dir.join("empty-server");
        server::init(&bins, &data)?;
        let s = server::start(
            &bins,
            &data,
            "127.0.0.1:0",
            "1h",
            &run_dir.join("empty-server.log"),
        )?;
        process::proc_status(s.proc.pid()).unwrap_or_default()
    };
    let mut fleet = server::load(
        &bins,
        &run_dir,
        scale,
        &mut || Ok(()),
        &mut load_max,
        &mut redb_rows,
        &mut problems,
    )?;
    let restarted = store::restart(
        &bins,
        &run_dir,
        &mut fleet,
        &|| empty,
        &mut redb_rows,
        &mut problems,
    )?;
    let redb = postgres::Redb {
        results: &fleet.results,
        data: &fleet.server.data,
        stored: stored_agents(&fleet),
        start: &restarted,
    };
    let measured = postgres::measure(
        &bins,
        &run_dir,
        scale,
        &cluster,
        &redb,
        &mut rows,
        &mut problems,
    );
    drop(cluster);
    if let Err(e) = measured {
        problems.push(format!("the PostgreSQL phase stopped: {e}"));
    }
    let secs = started.elapsed().as_secs_f64();
    let command = if scale.quick {
        format!("{COMMAND} --quick")
    } else {
        COMMAND.to_owned()
    };
    let mut notes_problems = problems.clone();
    notes_problems.push(format!(
        "1-minute load average {load_before:.1} when measuring started, up to {load_max:.1} during the redb load phase, {:.1} at the end.",
        load_average()
    ));
    let section = pg_section_text(&command, secs, &rows, &notes_problems);
    println!("redb, same run:\n{}", render(&redb_rows));
    println!("{section}");
    let path = project_root().join("BENCHMARKS.md");
    let old = fs::read_to_string(&path).unwrap_or_default();
    fs::write(&path, with_pg_section(&old, &section))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    println!(
        "the PostgreSQL section of {} replaced ({secs:.0} s measuring; the rest of the file unchanged)",
        path.display()
    );
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\nxtask: "))
    }
}

/// The PostgreSQL section of BENCHMARKS.md: its heading, what measured it,
/// the rows and the problems (a line starting `1-minute load` is a note).
fn pg_section_text(command: &str, secs: f64, rows: &[table::Row], problems: &[String]) -> String {
    let mut out = format!(
        "{PG_SECTION_START}\n\nMeasured by `{command}` on {} ({secs:.0} s of measuring) on {}. The server on PostgreSQL (Debian's, started by the bench in a temp dir, durable defaults) under the same load as redb in the same run: each ratio divides by redb's number of that run, shown next to it (not by the table above, which may be of another run).\n\n",
        stella_proto::time::rfc3339(unix_now().as_secs()),
        machine()
    );
    out.push_str(&render(rows));
    out.push('\n');
    for p in problems {
        if p.starts_with("1-minute load") {
            let _ = writeln!(out, "- {p}");
        } else {
            let _ = writeln!(out, "- PROBLEM: {p}");
        }
    }
    let _ = writeln!(out, "\n{PG_SECTION_END}");
    out
}

/// The PostgreSQL section of `doc`, through its end marker and newline.
fn pg_section_of(doc: &str) -> Option<String> {
    let start = doc.find(PG_SECTION_START)?;
    let end = start + doc[start..].find(PG_SECTION_END)? + PG_SECTION_END.len();
    let end = if doc[end..].starts_with('\n') {
        end + 1
    } else {
        end
    };
    Some(doc[start..end].to_owned())
}

/// `doc` with its PostgreSQL section replaced by `section`, or `section`
/// put before the kept hand-written part (or at the end) when it has none.
fn with_pg_section(doc: &str, section: &str) -> String {
    if let Some(old) = pg_section_of(doc) {
        return doc.replacen(&old, section, 1);
    }
    match doc.find(KEEP_MARKER) {
        Some(i) => format!("{}{section}\n{}", &doc[..i], &doc[i..]),
        None if doc.is_empty() => section.to_owned(),
        None => format!("{doc}\n{section}"),
    }
}

/// `cargo xtask bench [--quick] [--store postgres] [--only storm|postgres]`.
pub(crate) fn bench(opts: &Options) -> Result<(), String> {
    let quick = opts.quick;
    let scale = Scale::new(quick);
    match opts.only {
        Some(Phase::Storm) => return only_storm(&scale),
        Some(Phase::Postgres) => return only_postgres(&scale),
        None => {}
    }
    let command = match (quick, opts.postgres) {
        (false, false) => "cargo xtask bench",
        (true, false) => "cargo xtask bench --quick",
        (false, true) => "cargo xtask bench --store postgres",
        (true, true) => "cargo xtask bench --quick --store postgres",
    };
    let root = target_dir().join("bench");
    let t_build = Instant::now();
    let bins = bins::build(&scale, &root.join("bin"))?;
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
    size::agent_binaries(&bins, &mut rows)?;

    // 2-4. Real agents against a real server at the fastest heartbeat it
    // allows; they keep running (and are sampled) through the next phases.
    let mut agents = Agents::start(&bins, &run_dir, &scale)?;
    agents.doctor(&bins, &scale, &mut rows)?;
    agents.start_and_doctor_rss(&bins, &mut rows)?;

    // 5-7. The fleet server under a simulated fleet.
    let mut fleet = server::load(
        &bins,
        &run_dir,
        &scale,
        &mut || agents.poll(),
        &mut load_max,
        &mut rows,
        &mut problems,
    )?;
    let threads = fleet.loadgen_threads.clone();

    // 8. Restart with the filled store: start-up time and RSS.
    let restarted = store::restart(
        &bins,
        &run_dir,
        &mut fleet,
        &|| agents.server_status(),
        &mut rows,
        &mut problems,
    )?;

    // 10 (--store postgres). The server on PostgreSQL, against redb's
    // numbers of phases 5-8, on a copy of the store phase 8 started on.
    let pg_section = if opts.postgres {
        let pg_started = Instant::now();
        let (mut pg_rows, mut pg_problems) = (Vec::new(), Vec::new());
        let redb = postgres::Redb {
            results: &fleet.results,
            data: &fleet.server.data,
            stored: stored_agents(&fleet),
            start: &restarted,
        };
        let measured = pgcluster::Cluster::start().and_then(|cluster| {
            postgres::measure(
                &bins,
                &run_dir,
                &scale,
                &cluster,
                &redb,
                &mut pg_rows,
                &mut pg_problems,
            )
        });
        if let Err(e) = measured {
            pg_problems.push(format!("the PostgreSQL phase stopped: {e}"));
        }
        problems.extend(pg_problems.iter().cloned());
        Some(pg_section_text(
            command,
            pg_started.elapsed().as_secs_f64(),
            &pg_rows,
            &pg_problems,
        ))
    } else {
        None
    };

    // 9. A reconnect storm against a server of its own.
    storm::storm(
        &bins,
        &run_dir,
        scale.storm_agents,
        &mut rows,
        &mut problems,
    )?;

    // 2-3 again: wait for the agents to reach their heartbeat counts.
    let measured_agents = agents.count();
    agents.finish(&scale, &mut rows, &mut problems)?;

    let run_secs = started.elapsed().as_secs_f64();
    if quick {
        notes.push(format!(
            "--quick: agent RSS after {} heartbeats (not 1,000), heap compared at {} vs {} (not 10,000), {} enrolled and {} connections (not 10,000), one {} window per load, store of {} agents at most ({}) with the RSS extrapolated to 100,000.",
            scale.rss_beats, scale.alloc_early, scale.alloc_late, scale.enroll, scale.conns, scale.window, thousands(scale.fill as u64), scale.fill_deadline
        ));
    }
    notes.push(format!(
        "The load generator (`stella-loadgen`, {threads} threads), the fleet server, the agent server and the {} measured agents all share the machine's cores; the agents and their server add about 30 requests/s.",
        measured_agents
    ));
    notes.push(format!(
        "1-minute load average {load_before:.1} when measuring started, up to {load_max:.1} during the load phase; with 2 cores, anything above ~3 means other work (builds, tests) competed with the measured processes and the server numbers are lower bounds."
    ));
    notes.push("The agent and server are the workspace release profile (fat LTO, opt-level \"z\"), native target; sizes are of the static musl dist binaries.".into());
    let table = render(&rows);
    let head = format!(
        "# Benchmarks\n\nMeasured by `{command}` on {} ({run_secs:.0} s of measuring after {build_secs:.0} s of building).\n\nMachine: {}.\n\nEvery number below was measured by that run; nothing is copied from an earlier run. Budgets are docs/design.md section 13.\n\n",
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
    let old = fs::read_to_string(&path).unwrap_or_default();
    // A run without --store postgres keeps the last PostgreSQL section,
    // which says when and by what it was measured.
    if let Some(section) = pg_section.clone().or_else(|| pg_section_of(&old)) {
        let _ = write!(doc, "\n{section}");
    }
    let kept = old
        .find(KEEP_MARKER)
        .map(|i| old[i..].to_owned())
        .unwrap_or_else(|| format!("{KEEP_MARKER}\n"));
    let _ = write!(doc, "\n{kept}");
    fs::write(&path, &doc).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    println!("{table}");
    for n in &notes {
        println!("- {n}");
    }
    if let Some(section) = &pg_section {
        println!("\n{section}");
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

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_postgresql_section_is_replaced_in_place_and_everything_else_kept() {
        let section = |n: &str| format!("{PG_SECTION_START}\n\nrun {n}\n\n{PG_SECTION_END}\n");
        let head = "# Benchmarks\n\n| table |\n\n";
        let tail = format!("{KEEP_MARKER}\n\n## Findings\n");
        let without = format!("{head}{tail}");
        let first = with_pg_section(&without, &section("1"));
        assert_eq!(first, format!("{head}{}\n{tail}", section("1")));
        assert_eq!(pg_section_of(&first), Some(section("1")));
        let second = with_pg_section(&first, &section("2"));
        assert_eq!(second, format!("{head}{}\n{tail}", section("2")));
        assert_eq!(pg_section_of(&without), None);
        assert_eq!(with_pg_section("", &section("3")), section("3"));
    }
}
