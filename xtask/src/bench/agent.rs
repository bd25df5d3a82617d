//! Phases 2-4: real agents against a real server at the fastest heartbeat it
//! allows. Their RSS after N heartbeats (the native build and the static musl
//! one), heap allocations per steady heartbeat and heap growth (the agent
//! built with the counting allocator), the time from `run` to the first
//! acknowledged heartbeat, and the one-shot `doctor` command's run time,
//! allocations and peak RSS.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::Scale;
use super::bins::Bins;
use super::process::{Proc, Status, output, peak_rss_kb, proc_status, spawn};
use super::server::{self, Server};
use super::table::{Row, median, mib, row, verdict};
use crate::dist::thousands;
use crate::project_root;

/// docs/design.md section 13.
const AGENT_RSS_BUDGET_KB: u64 = 4 * 1024;
const ALLOCS_PER_BEAT_BUDGET: f64 = 16.0;
/// Heap growth between the early and late heartbeat still called "none"
/// (allocator bookkeeping of a log line or a doctor summary).
const GROWTH_TOLERANCE: i64 = 1024;
/// The hook line the run loop needs for the allocation counts.
const HOOK: &str =
    "#[cfg(feature = \"bench-alloc\")] crate::alloc_count::report_if_asked(beat.seq);";
/// What every call of the hook contains, however rustfmt wraps it.
const HOOK_CALL: &str = "alloc_count::report_if_asked(";

/// The agent's last acknowledged heartbeat, from its `state.json`.
fn heartbeat_seq(state_dir: &Path) -> Option<u64> {
    let text = fs::read_to_string(state_dir.join("state.json")).ok()?;
    let rest = &text[text.find("\"heartbeat_seq\":")? + "\"heartbeat_seq\":".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
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

/// The agents measured while the rest of the bench runs, and their server.
pub(super) struct Agents {
    server: Server,
    /// The native build, and the static musl one when it was built.
    rss: Vec<Agent>,
    /// The build with the counting allocator.
    alloc: Agent,
    alloc_report: PathBuf,
    /// The heartbeats at which RSS is sampled.
    rss_marks: [u64; 2],
    started: Instant,
    run_dir: PathBuf,
    /// A use of the enrollment token left for the start-time agent.
    token: String,
}

impl Agents {
    /// Starts the agent server and enrolls and runs every measured agent.
    pub(super) fn start(bins: &Bins, run_dir: &Path, scale: &Scale) -> Result<Self, String> {
        let s0_data = run_dir.join("agent-server");
        server::init(bins, &s0_data)?;
        let s0 = server::start(
            bins,
            &s0_data,
            "127.0.0.1:0",
            "100ms",
            &run_dir.join("agent-server.log"),
        )?;
        let token = server::admin(
            bins,
            &s0_data,
            &["token", "create", "--uses", "5", "--ttl", "1h"],
        )?
        .trim()
        .to_owned();
        let alloc_report = run_dir.join("alloc-run.txt");
        let mut agents = vec![start_agent(
            "native",
            &bins.agent,
            &s0,
            &token,
            run_dir,
            &[],
        )?];
        if let Some(musl) = musl_agent(bins) {
            agents.push(start_agent("musl", musl, &s0, &token, run_dir, &[])?);
        }
        let alloc_agent = start_agent(
            "alloc",
            &bins.agent_alloc,
            &s0,
            &token,
            run_dir,
            &[("STELLA_ALLOC_REPORT", &alloc_report)],
        )?;
        Ok(Self {
            server: s0,
            rss: agents,
            alloc: alloc_agent,
            alloc_report,
            rss_marks: [scale.rss_beats / 2, scale.rss_beats],
            started: Instant::now(),
            run_dir: run_dir.to_path_buf(),
            token,
        })
    }

    /// Fails when an agent exited; samples the RSS of those at a mark.
    pub(super) fn poll(&mut self) -> Result<(), String> {
        for a in self.rss.iter_mut().chain(std::iter::once(&mut self.alloc)) {
            if let Some(status) = a.proc.exited() {
                return Err(format!(
                    "the {} agent exited ({status}); see {}",
                    a.label,
                    self.run_dir
                        .join(format!("agent-{}.log", a.label))
                        .display()
                ));
            }
            sample(a, &self.rss_marks);
        }
        Ok(())
    }

    /// The agent server's memory (an almost empty store: the measured agents).
    pub(super) fn server_status(&self) -> Status {
        proc_status(self.server.proc.pid()).unwrap_or_default()
    }

    /// The agents measured, for the notes.
    pub(super) fn count(&self) -> usize {
        self.rss.len() + 1
    }

    /// Doctor: wall time of the one-shot command, and its allocations.
    pub(super) fn doctor(
        &mut self,
        bins: &Bins,
        scale: &Scale,
        rows: &mut Vec<Row>,
    ) -> Result<(), String> {
        let mut walls = Vec::new();
        let mut doctor_exit = None;
        for _ in 0..scale.doctor_runs {
            let t0 = Instant::now();
            let out = Command::new(&bins.agent)
                .args(["doctor", "--json", "--state-dir"])
                .arg(&self.rss[0].state)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run doctor: {e}"))?;
            walls.push(t0.elapsed().as_secs_f64() * 1000.0);
            doctor_exit = out.status.code();
            self.poll()?;
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
            let report = self.run_dir.join(format!("alloc-doctor-{i}.txt"));
            let _ = Command::new(&bins.agent_alloc)
                .args(["doctor", "--json", "--state-dir"])
                .arg(&self.alloc.state)
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
        Ok(())
    }

    /// Start time: from spawning `stella-agent run` (the shipped static
    /// binary where it was built) to its first acknowledged heartbeat, over
    /// several restarts of one enrolled agent; and doctor's peak RSS.
    pub(super) fn start_and_doctor_rss(
        &mut self,
        bins: &Bins,
        rows: &mut Vec<Row>,
    ) -> Result<(), String> {
        let (binary, kind) = match musl_agent(bins) {
            Some(musl) => (musl.to_path_buf(), "static musl x86_64"),
            None => (bins.agent.clone(), "native build"),
        };
        let state = self.run_dir.join("agent-start");
        output(
            Command::new(&binary)
                .args(["bootstrap", "--server", &self.server.url, "--token"])
                .arg(&self.token)
                .args(["--name", "bench-start", "--ca-file"])
                .arg(self.server.data.join("ca.pem"))
                .arg("--state-dir")
                .arg(&state),
        )?;
        let mut starts = Vec::new();
        for i in 0..START_RUNS {
            let before = heartbeat_seq(&state).unwrap_or(0);
            let t0 = Instant::now();
            let mut proc = spawn(
                "stella-agent",
                Command::new(&binary)
                    .args(["run", "--state-dir"])
                    .arg(&state),
                &self.run_dir.join(format!("agent-start-{i}.log")),
            )?;
            // state.json is written at the first acknowledgement.
            let acked = loop {
                if heartbeat_seq(&state).unwrap_or(0) > before {
                    break Some(t0.elapsed());
                }
                if proc.exited().is_some() || t0.elapsed() > Duration::from_secs(30) {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(1));
            };
            proc.kill();
            self.poll()?;
            match acked {
                Some(t) => starts.push(t.as_secs_f64() * 1000.0),
                None => {
                    return Err(format!(
                        "the start-time agent did not get a heartbeat through; see {}",
                        self.run_dir.join(format!("agent-start-{i}.log")).display()
                    ));
                }
            }
        }
        let (lo, hi) = starts
            .iter()
            .fold((f64::MAX, 0f64), |(l, h), w| (l.min(*w), h.max(*w)));
        rows.push(row(
            format!("agent start, `run` to the first acknowledged heartbeat, {kind}"),
            format!("{:.1} ms median (min {lo:.1}, max {hi:.1})", median(&mut starts)),
            "none",
            "-",
            format!(
                "{START_RUNS} restarts of one enrolled agent against the agent server on loopback: from spawn to `state.json` showing the next heartbeat sequence (polled every 1 ms; includes process start, loading the identity and the mTLS handshake)"
            ),
        ));
        let mut peaks = Vec::new();
        let mut why_not = None;
        for _ in 0..3 {
            let args = [
                "doctor".as_ref(),
                "--json".as_ref(),
                "--state-dir".as_ref(),
                state.as_os_str(),
            ];
            match peak_rss_kb(&binary, &args) {
                Ok(kb) => peaks.push(kb as f64),
                Err(e) => why_not = Some(e),
            }
            self.poll()?;
        }
        let what = format!("doctor peak RSS (`stella-agent doctor --json`), {kind}");
        match why_not {
            None => rows.push(row(
                what,
                format!("{} (maximum resident set)", mib(median(&mut peaks) as u64)),
                "none",
                "-",
                "GNU time's %M (the kernel's ru_maxrss of the finished process), median of 3 runs against the agent server on loopback",
            )),
            Some(e) => rows.push(row(what, format!("not measured: {e}"), "none", "-", "")),
        }
        Ok(())
    }

    /// Waits for the agents to reach their heartbeat counts, then adds the
    /// RSS and allocation rows and stops the agents and their server.
    pub(super) fn finish(
        mut self,
        scale: &Scale,
        rows: &mut Vec<Row>,
        problems: &mut Vec<String>,
    ) -> Result<(), String> {
        let alloc_deadline = Duration::from_secs(if scale.quick { 150 } else { 1500 });
        let mut hook_missing = false;
        loop {
            self.poll()?;
            let seq = heartbeat_seq(&self.alloc.state).unwrap_or(0);
            // Without the hook the report stays empty: say so, but still let
            // the RSS agents reach their count.
            if seq >= 20 && read_alloc_report(&self.alloc_report).is_empty() {
                hook_missing = true;
            }
            let rss_done = self
                .rss
                .iter()
                .all(|a| a.samples.len() == self.rss_marks.len());
            if rss_done && (hook_missing || seq >= scale.alloc_late) {
                break;
            }
            if self.started.elapsed() > alloc_deadline {
                problems.push(format!(
                "the agents did not reach their heartbeat counts within {alloc_deadline:?} (alloc agent at {seq})"
            ));
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        for a in &self.rss {
            let kind = if a.label == "musl" {
                "static musl x86_64 (as shipped)"
            } else {
                "native glibc build"
            };
            match (
                a.samples.iter().find(|(m, _)| *m == self.rss_marks[0]),
                a.samples.iter().find(|(m, _)| *m == self.rss_marks[1]),
            ) {
                (Some((_, mid)), Some((_, end))) => {
                    rows.push(row(
                    format!("agent RSS, steady, after {} heartbeats, {kind}", scale.rss_beats),
                    format!("{} (VmRSS; {} at heartbeat {})", mib(end.rss_kb), mib(mid.rss_kb), self.rss_marks[0]),
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
            problems.push(hook_missing_problem(
                &project_root().join("agent").join("src"),
            ));
            rows.push(row(
                "agent heap allocations per steady heartbeat",
                "NOT MEASURED: the hook is missing",
                "≤ 16",
                "-",
                HOOK,
            ));
        } else {
            let report = read_alloc_report(&self.alloc_report);
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
            "≤ 16",
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
        for a in self.rss.iter_mut() {
            a.proc.kill();
        }
        self.alloc.proc.kill();
        self.server.proc.kill();
        Ok(())
    }
}

/// Runs of the start-time measurement.
const START_RUNS: usize = 7;

/// The static x86_64 musl agent from `dist`, when it was built.
fn musl_agent(bins: &Bins) -> Option<&Path> {
    bins.dist
        .iter()
        .find(|(t, _)| cfg!(target_arch = "x86_64") && t.starts_with("x86_64"))
        .and_then(|(_, p)| p.as_ref().ok())
        .map(PathBuf::as_path)
}

/// The first `.rs` file under `dir` (searched recursively, in name order)
/// that calls the allocation hook: wherever the agent's run loop lives.
fn hook_site(dir: &Path) -> Option<PathBuf> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    entries.into_iter().find_map(|path| {
        if path.is_dir() {
            hook_site(&path)
        } else if path.extension().is_some_and(|e| e == "rs")
            && fs::read_to_string(&path).is_ok_and(|text| text.contains(HOOK_CALL))
        {
            Some(path)
        } else {
            None
        }
    })
}

/// Why the allocation report stayed empty, naming where the hook is (or
/// that no file under `agent_src` has it).
fn hook_missing_problem(agent_src: &Path) -> String {
    match hook_site(agent_src) {
        Some(file) => format!(
            "the allocation hook in {} wrote no report: `{HOOK}` must run after each acknowledged heartbeat",
            file.display()
        ),
        None => format!(
            "the allocation hook is missing: add `{HOOK}` under {} after each acknowledged heartbeat",
            agent_src.display()
        ),
    }
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
    fn the_hook_is_found_in_any_file_under_the_agent_sources() {
        let dir = std::env::temp_dir().join(format!("xtask-bench-hook-{}", std::process::id()));
        let nested = dir.join("run");
        fs::create_dir_all(&nested).unwrap();
        fs::write(dir.join("lib.rs"), "//! x\n").unwrap();
        assert_eq!(hook_site(&dir), None);
        assert!(hook_missing_problem(&dir).contains("is missing"));
        fs::write(
            nested.join("beat.rs"),
            "#[cfg(feature = \"bench-alloc\")]\n        crate::alloc_count::report_if_asked(beat.seq);\n",
        )
        .unwrap();
        assert_eq!(hook_site(&dir), Some(nested.join("beat.rs")));
        assert!(hook_missing_problem(&dir).contains("beat.rs wrote no report"));
        fs::remove_dir_all(&dir).unwrap();
        // Today's agent calls it somewhere.
        assert!(hook_site(&project_root().join("agent").join("src")).is_some());
    }
}
