//! The binaries a bench run measures: the release server and agent, the agent
//! with the counting allocator, the load generator (built for speed) and the
//! static musl agents from `dist`, all copied aside so other builds cannot
//! change them under a run.

use std::fs;
use std::path::{Path, PathBuf};

use super::Scale;
use crate::{cargo, dist, run, target_dir};

/// The binaries a run measures, copied aside so other builds cannot change them.
pub(super) struct Bins {
    pub(super) server: PathBuf,
    pub(super) agent: PathBuf,
    pub(super) agent_alloc: PathBuf,
    pub(super) loadgen: PathBuf,
    /// Static musl agents from `dist`: (target, path) or (target, why not).
    pub(super) dist: Vec<(String, Result<PathBuf, String>)>,
}

/// Only the server and the load generator (`--only storm`); the agent
/// paths are empty.
pub(super) fn build_server_and_loadgen(bin: &Path) -> Result<Bins, String> {
    fs::create_dir_all(bin).map_err(|e| format!("cannot create {}: {e}", bin.display()))?;
    run(cargo()
        .args(["build", "--release", "-p", "stella-server"])
        .env_remove("STELLA_VERSION"))?;
    let server = copy_aside(
        target_dir().join("release/stella-server"),
        bin,
        "stella-server",
    )?;
    let loadgen = build_loadgen(bin)?;
    Ok(Bins {
        server,
        agent: PathBuf::new(),
        agent_alloc: PathBuf::new(),
        loadgen,
        dist: Vec::new(),
    })
}

/// Copies `from` to `bin/name`, then renames: a binary still running from
/// an earlier run cannot be written over ("text file busy"), but it can be
/// replaced.
fn copy_aside(from: PathBuf, bin: &Path, name: &str) -> Result<PathBuf, String> {
    let to = bin.join(name);
    let tmp = bin.join(format!(".{name}.tmp"));
    fs::copy(&from, &tmp)
        .and_then(|_| fs::rename(&tmp, &to))
        .map_err(|e| format!("cannot copy {} to {}: {e}", from.display(), to.display()))?;
    Ok(to)
}

/// The load generator is built for speed (it shares the cores with the server).
fn build_loadgen(bin: &Path) -> Result<PathBuf, String> {
    let loadgen_target = target_dir().join("bench-loadgen");
    run(cargo()
        .args(["build", "--release", "-p", "stella-bench"])
        .arg("--target-dir")
        .arg(&loadgen_target)
        .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "3")
        .env("CARGO_PROFILE_RELEASE_LTO", "false")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "16"))?;
    copy_aside(
        loadgen_target.join("release/stella-loadgen"),
        bin,
        "stella-loadgen",
    )
}

pub(super) fn build(scale: &Scale, bin: &Path) -> Result<Bins, String> {
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
    let copy = |from: PathBuf, name: &str| copy_aside(from, bin, name);
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
    let loadgen = build_loadgen(bin)?;

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
