//! Phase 9 (alone: `cargo xtask bench --only storm`): a reconnect storm.
//! The load generator enrolls 10,000 simulated agents; the server is killed
//! (SIGKILL, by PID) and started again on the same data dir and address;
//! then every agent reconnects at the same instant, retrying as
//! `stella-agent run` does. Rows: time until all have a heartbeat
//! acknowledged, handshakes/s, and the restarted server's peak RSS.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use super::bins::Bins;
use super::process::{proc_status, spawn, wait_for, with_nofile};
use super::server::{self, admin, init, parse_kv};
use super::table::{Row, mib, row, verdict};

use crate::dist::thousands;

/// The heartbeat interval of the storm's fleet (the server's default): the
/// agents' retry windows follow it.
const INTERVAL: &str = "30s";

/// Runs the storm with `agents` simulated agents and adds its rows.
pub(super) fn storm(
    bins: &Bins,
    run_dir: &Path,
    agents: usize,
    rows: &mut Vec<Row>,
    problems: &mut Vec<String>,
) -> Result<(), String> {
    let data = run_dir.join("storm-server");
    let _ = fs::remove_dir_all(&data);
    init(bins, &data)?;
    let first = server::start(
        bins,
        &data,
        "127.0.0.1:0",
        INTERVAL,
        &run_dir.join("storm-server.log"),
    )?;
    let token = admin(
        bins,
        &data,
        &[
            "token",
            "create",
            "--uses",
            &(agents + 10).to_string(),
            "--ttl",
            "1h",
        ],
    )?
    .trim()
    .to_owned();
    let (ready, go) = (run_dir.join("storm.ready"), run_dir.join("storm.go"));
    let results = run_dir.join("storm.txt");
    for f in [&ready, &go, &results] {
        let _ = fs::remove_file(f);
    }
    let mut loadgen = {
        let mut cmd = with_nofile(&bins.loadgen);
        cmd.args(["storm", "--server", &first.url, "--token", &token, "--ca"])
            .arg(data.join("ca.pem"))
            .arg("--out")
            .arg(&results)
            .args(["--enroll", &agents.to_string(), "--concurrency", "16"])
            .args(["--interval", INTERVAL, "--timeout", "900s"])
            .arg("--ready")
            .arg(&ready)
            .arg("--go")
            .arg(&go);
        spawn(
            "stella-loadgen",
            &mut cmd,
            &run_dir.join("storm-loadgen.log"),
        )?
    };
    eprintln!(
        "xtask bench: storm: enrolling {} agents (log: {})",
        thousands(agents as u64),
        run_dir.join("storm-loadgen.log").display()
    );
    wait_for(
        "the storm's agents to enroll",
        Duration::from_secs(900),
        || {
            ready
                .exists()
                .then_some(())
                .or_else(|| loadgen.exited().map(|_| ()))
        },
    )?;
    if !ready.exists() {
        return Err(format!(
            "the load generator stopped before the storm; see {}",
            run_dir.join("storm-loadgen.log").display()
        ));
    }
    // The outage: the server dies with every agent's connection; it comes
    // back on the same address, loading the fleet from its store.
    let listen = first.url.trim_start_matches("https://").to_owned();
    let mut first = first;
    first.proc.kill();
    let restarted = Instant::now();
    let back = server::start(
        bins,
        &data,
        &listen,
        INTERVAL,
        &run_dir.join("storm-server-2.log"),
    )?;
    let up_ms = restarted.elapsed().as_millis();
    // The fleet loaded, no agent connected yet: what the storm adds is above.
    let before = proc_status(back.proc.pid()).unwrap_or_default();
    fs::write(&go, b"go\n").map_err(|e| format!("cannot write {}: {e}", go.display()))?;
    eprintln!("xtask bench: storm: server back after {up_ms} ms; all agents reconnecting");
    let mut peak = proc_status(back.proc.pid()).unwrap_or_default();
    let status = loop {
        if let Some(st) = proc_status(back.proc.pid()) {
            peak = st;
        }
        if let Some(status) = loadgen.exited() {
            break status;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let kv = parse_kv(&results);
    if !status.success() {
        problems.push(format!(
            "the storm's load generator failed ({status}); see {}",
            run_dir.join("storm-loadgen.log").display()
        ));
    }
    let get = |k: &str| kv.get(k).cloned().unwrap_or_else(|| "?".into());
    let all_acked =
        kv.get("storm.acked") == kv.get("storm.agents") && kv.contains_key("storm.agents");
    rows.push(row(
        format!(
            "{} agents reconnecting at once after an outage",
            thousands(agents as u64)
        ),
        format!(
            "{} of {} acknowledged, the last {} s after the restart (p50 {} s, p90 {} s, p99 {} s)",
            get("storm.acked"),
            get("storm.agents"),
            get("storm.all_acked_secs"),
            get("storm.p50_secs"),
            get("storm.p90_secs"),
            get("storm.p99_secs"),
        ),
        "all acknowledged, time measured and documented",
        verdict(all_acked),
        format!(
            "SIGKILL of the server, `serve` again on the same data dir and address ({up_ms} ms to `/healthz`), then every simulated agent (own certificate, heartbeat interval {INTERVAL}) opens a connection, handshakes and heartbeats at the same instant; a failed attempt waits as the agent does (uniform in [0, min(4 intervals, interval·2^(n-1))]); {} attempts, at most {} retries for one agent; {} closed by the server, {} timed out, {} other errors",
            get("storm.attempts"),
            get("storm.max_retries"),
            get("storm.closed"),
            get("storm.timed_out"),
            get("storm.other_errors"),
        ),
    ));
    rows.push(row(
        "server TLS handshakes/s during the storm",
        format!(
            "{}/s to the last acknowledgement, {}/s in the busiest second; {} shed",
            get("storm.handshakes_per_s"),
            get("storm.peak_handshakes_per_s"),
            get("storm.server_shed"),
        ),
        "none",
        "-",
        format!(
            "handshakes the simulated agents completed, per second; shed is the server's `stella_handshakes_shed_total` (connections closed at once because `--max-handshakes`, default 256, were in progress; the server counted {} handshakes, {} failed)",
            get("storm.server_handshakes"),
            get("storm.server_handshake_failures"),
        ),
    ));
    let per_connection_kb = peak.rss_kb.saturating_sub(before.rss_kb) as f64 / agents.max(1) as f64;
    rows.push(row(
        "server RSS during the storm",
        format!(
            "{} peak (VmHWM), {} at the end with every agent connected, {} before the storm (about {per_connection_kb:.0} KiB per open connection)",
            mib(peak.hwm_kb),
            mib(peak.rss_kb),
            mib(before.rss_kb),
        ),
        "≤ 200 MiB at the peak (the server's RSS budget)",
        verdict(peak.hwm_kb <= super::store::SERVER_RSS_BUDGET_KB),
        format!(
            "/proc of the restarted server, sampled every 200 ms (store of {} agents; each agent's connection is kept open after its acknowledgement, as agents do; {} threads); a peak equal to the end means the storm's handshakes added no transient above the connected fleet",
            thousands(agents as u64),
            peak.threads
        ),
    ));
    drop(back);
    Ok(())
}
