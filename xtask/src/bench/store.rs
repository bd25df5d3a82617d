//! Phase 8: the fleet server restarted on the store the load filled (up to
//! 100,000 agents): time to the first `/healthz` answer, and RSS after start
//! and after the whole admin agent list was read, extrapolated linearly to
//! 100,000 agents when the store holds fewer.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use super::bins::Bins;
use super::process::{Status, output, proc_status, spawn};
use super::server::{Fleet, parse_kv};
use super::table::{Row, mib, row, verdict};
use super::{FLEET, unix_now};
use crate::dist::thousands;

/// docs/design.md section 13.
pub(super) const SERVER_RSS_BUDGET_KB: u64 = 200 * 1024;

/// Kills the fleet server, starts it again on its store and adds the rows;
/// `empty_server` reads the memory of a server with an almost empty store.
pub(super) fn restart(
    bins: &Bins,
    run_dir: &Path,
    fleet: &mut Fleet,
    empty_server: &dyn Fn() -> Status,
    rows: &mut Vec<Row>,
    problems: &mut Vec<String>,
) -> Result<StartMeasure, String> {
    let (filled, kv, s1) = (fleet.filled, &fleet.results, &mut fleet.server);
    let s1_data = s1.data.clone();
    let stored = filled.max(
        kv.get("enroll.count")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    s1.proc.kill();
    let listen = s1.url.trim_start_matches("https://").to_owned();
    let measured = measure_start(
        bins,
        &s1_data,
        None,
        &listen,
        &run_dir.join("fleet-server-restart.log"),
        &run_dir.join("restart.txt"),
    )?;
    let (after_start, after_list) = (measured.after_start, measured.after_list);
    let empty = empty_server();
    let rk = measured.results.clone();
    if let Some(e) = &measured.problem {
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
    Ok(measured)
}

/// What one start of a server on a filled store measured.
pub(super) struct StartMeasure {
    /// The load generator's `healthz.after_ms`, `get.bytes`, `get.ms`.
    pub(super) results: BTreeMap<String, String>,
    pub(super) after_start: Status,
    pub(super) after_list: Status,
    /// Why a step failed (the numbers it should give are missing).
    pub(super) problem: Option<String>,
}

impl StartMeasure {
    /// Milliseconds from spawn to the first `/healthz` 200.
    pub(super) fn startup_ms(&self) -> Option<f64> {
        self.results.get("healthz.after_ms")?.parse().ok()
    }
}

/// Starts `serve` on the data dir `data` (its store: redb there, or the
/// PostgreSQL URL `store`) at `listen`, times it to the first `/healthz`
/// answer, reads its RSS then and after the whole admin agent list, and
/// stops it.
pub(super) fn measure_start(
    bins: &Bins,
    data: &Path,
    store: Option<&str>,
    listen: &str,
    log: &Path,
    results: &Path,
) -> Result<StartMeasure, String> {
    let url = format!("https://{listen}");
    let mut serve = super::server::serve_command(bins, data, store, listen, "1h");
    let t0 = unix_now();
    let mut proc = spawn("stella-server", &mut serve, log)?;
    let waited = output(
        Command::new(&bins.loadgen)
            .args([
                "healthz",
                "--server",
                &url,
                "--since-unix-ns",
                &t0.as_nanos().to_string(),
                "--timeout",
                "300s",
                "--ca",
            ])
            .arg(data.join("ca.pem"))
            .arg("--out")
            .arg(results),
    );
    let after_start = proc_status(proc.pid()).unwrap_or_default();
    let listed = output(
        Command::new(&bins.loadgen)
            .args([
                "get",
                "--server",
                &url,
                "--path",
                "/v1/admin/agents",
                "--ca",
            ])
            .arg(data.join("ca.pem"))
            .arg("--bearer-file")
            .arg(data.join("admin.token"))
            .arg("--out")
            .arg(results),
    );
    let after_list = proc_status(proc.pid()).unwrap_or_default();
    proc.kill();
    Ok(StartMeasure {
        results: parse_kv(results),
        after_start,
        after_list,
        problem: waited.and(listed).err(),
    })
}
