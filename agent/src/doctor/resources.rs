//! `host.resources`: available memory, the open-file limit and the load per
//! core.

use std::fs;

use super::{Finding, mib};

impl super::Doctor<'_> {
    pub(super) fn resources(&self) -> Finding {
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let available_kib: Option<u64> = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok());
        let limits = fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let nofile: Option<u64> = limits
            .lines()
            .find_map(|l| l.strip_prefix("Max open files"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok());
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let load: Option<f64> = fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next().and_then(|v| v.parse().ok()));
        let per_core = load.map(|l| l / cores);
        if let Some(kib) = available_kib {
            if kib < 16 * 1024 {
                return fail!(
                    "host.resources/memory",
                    "only {} of memory available",
                    mib(kib * 1024)
                );
            }
            if kib < 32 * 1024 {
                return warn!(
                    "host.resources/memory",
                    "only {} of memory available",
                    mib(kib * 1024)
                );
            }
        }
        if nofile.is_some_and(|n| n < 256) {
            return warn!(
                "host.resources/nofile",
                "open-file limit is {}; 256 or more is advised",
                nofile.unwrap_or(0)
            );
        }
        if per_core.is_some_and(|l| l > 4.0) {
            return warn!(
                "host.resources/load",
                "load {:.2} per core",
                per_core.unwrap_or(0.0)
            );
        }
        pass!(
            "host.resources/ok",
            "{} available, open-file limit {}, load {:.2} per core",
            available_kib.map_or("?".to_owned(), |k| mib(k * 1024)),
            nofile.map_or("?".to_owned(), |n| n.to_string()),
            per_core.unwrap_or(0.0)
        )
    }
}
