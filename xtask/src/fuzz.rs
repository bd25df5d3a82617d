//! `cargo xtask fuzz`: the libFuzzer targets in `fuzz/` (cargo fuzz). `--smoke`
//! replays the kept corpus and crash regressions, then runs every target for a
//! few seconds (CI); `fuzz TARGET` runs one for longer. cargo-fuzz wants a
//! nightly compiler's flags: we pass `RUSTC_BOOTSTRAP=1` to the installed
//! stable toolchain instead of installing another one.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use lexopt::Arg;

use crate::args::{Args, Usage};
use crate::{cargo, project_root, run, target_dir};

/// Seconds per target in `--smoke`, unless `--time` says otherwise.
const SMOKE_SECS: u64 = 15;
/// Longest a `--smoke` run fuzzes in all (the build and replay come on top).
const SMOKE_BUDGET_SECS: u64 = 240;
/// Default length of a run of one target.
const LONG_SECS: u64 = 600;

/// What `cargo xtask fuzz` was asked to do.
#[derive(Debug)]
pub(crate) struct Options {
    /// `None`: every target (`--smoke`).
    target: Option<String>,
    secs: Option<u64>,
    list: bool,
}

impl Options {
    /// Parses `--smoke | TARGET | --list`, `[--time S]`.
    pub(crate) fn parse<I>(args: I) -> Result<Self, Usage>
    where
        I: IntoIterator,
        I::Item: Into<OsString>,
    {
        const CMD: &str = "fuzz";
        let (mut target, mut secs, mut smoke, mut list) = (None, None, false, false);
        let mut args = Args::new(CMD, args);
        while let Some(arg) = args.next()? {
            match arg {
                Arg::Long("smoke") => smoke = true,
                Arg::Long("list") => list = true,
                Arg::Long("time") => secs = Some(parse_secs(&args.string("--time")?)?),
                Arg::Value(name) if target.is_none() => {
                    let name = name.into_string().map_err(|name| {
                        Usage::Wrong(format!("fuzz: target name {name:?} is not valid UTF-8"))
                    })?;
                    target = Some(name);
                }
                other => return Err(Usage::unexpected(CMD, other)),
            }
        }
        if !list && smoke == target.is_some() {
            return Err("fuzz: give either --smoke or one TARGET (--list shows them)".into());
        }
        Ok(Self { target, secs, list })
    }
}

fn parse_secs(s: &str) -> Result<u64, String> {
    match s.trim_end_matches('s').parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        Ok(_) => Err(format!("fuzz: --time {s:?} must be at least one second")),
        Err(e) => Err(format!(
            "fuzz: --time {s:?} is not a number of seconds ({e})"
        )),
    }
}

fn fuzz_dir() -> PathBuf {
    project_root().join("fuzz")
}

/// The targets: the files of `fuzz/fuzz_targets/`.
fn targets() -> Result<Vec<String>, String> {
    let dir = fuzz_dir().join("fuzz_targets");
    let entries =
        std::fs::read_dir(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".rs"))
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    Ok(names)
}

/// `cargo fuzz`, with the nightly flags allowed on the stable compiler.
fn cargo_fuzz() -> Command {
    let mut cmd = cargo();
    cmd.arg("fuzz").env("RUSTC_BOOTSTRAP", "1");
    cmd
}

/// Installs cargo-fuzz from crates.io when it is missing.
fn ensure_cargo_fuzz() -> Result<(), String> {
    let present = cargo()
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    eprintln!("xtask: cargo-fuzz is missing: installing it (cargo install cargo-fuzz --locked)");
    run(cargo().args(["install", "cargo-fuzz", "--locked"]))
}

/// Runs one target for `secs` seconds, from its kept corpus; new inputs go to
/// a working corpus under the target dir, crashes to `fuzz/artifacts/TARGET/`.
fn fuzz_one(target: &str, secs: u64) -> Result<(), String> {
    let work = target_dir().join("fuzz-corpus").join(target);
    std::fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
    let seeds = fuzz_dir().join("corpus").join(target);
    let started = Instant::now();
    let status = cargo_fuzz()
        .args(["run", target])
        .arg(&work)
        .arg(&seeds)
        .args([
            "--",
            &format!("-max_total_time={secs}"),
            // An input that takes seconds is a denial of service: report it.
            "-timeout=10",
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
        ])
        .status()
        .map_err(|e| format!("cannot run cargo fuzz: {e}"))?;
    eprintln!(
        "xtask: fuzz {target}: {} after {:.0?}",
        if status.success() { "ok" } else { "FAILED" },
        started.elapsed()
    );
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "fuzz target {target} found a crash, a hang or a leak: the input is in \
             fuzz/artifacts/{target}/; fix the bug, then keep the input in \
             fuzz/regressions/{target}/ (cargo test in fuzz/ replays it)"
        ))
    }
}

/// Replays every seed and kept crash through its target (plain `cargo test`,
/// no libFuzzer), so a regression fails before any fuzzing starts.
fn replay() -> Result<(), String> {
    run(cargo()
        .args(["test", "--lib", "--manifest-path"])
        .arg(fuzz_dir().join("Cargo.toml")))
}

/// `cargo xtask fuzz`.
pub(crate) fn fuzz(opts: &Options) -> Result<(), String> {
    let all = targets()?;
    if opts.list {
        println!("{}", all.join("\n"));
        return Ok(());
    }
    if let Some(target) = &opts.target
        && !all.contains(target)
    {
        return Err(format!(
            "fuzz: no target {target:?} (targets: {})",
            all.join(", ")
        ));
    }
    replay()?;
    ensure_cargo_fuzz()?;
    match &opts.target {
        Some(target) => {
            run(cargo_fuzz().args(["build", target]))?;
            fuzz_one(target, opts.secs.unwrap_or(LONG_SECS))
        }
        None => smoke(&all, opts.secs.unwrap_or(SMOKE_SECS)),
    }
}

/// Every target briefly, within [`SMOKE_BUDGET_SECS`] in all.
fn smoke(all: &[String], secs: u64) -> Result<(), String> {
    run(cargo_fuzz().arg("build"))?;
    let secs = secs.min(SMOKE_BUDGET_SECS / all.len().max(1) as u64).max(1);
    let started = Instant::now();
    let mut failed = Vec::new();
    for target in all {
        if let Err(e) = fuzz_one(target, secs) {
            eprintln!("xtask: {e}");
            failed.push(target.as_str());
        }
    }
    eprintln!(
        "xtask: fuzz --smoke: {} targets, {secs} s each, {:.0?} in all",
        all.len(),
        started.elapsed()
    );
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "fuzz --smoke: failing targets: {}",
            failed.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(list: &[&str]) -> Result<Options, Usage> {
        Options::parse(list)
    }

    #[test]
    fn parses_smoke_one_target_and_list() {
        let o = parse(&["--smoke", "--time=5s"]).unwrap();
        assert_eq!((o.target, o.secs, o.list), (None, Some(5), false));
        let o = parse(&["dsse", "--time", "3600"]).unwrap();
        assert_eq!((o.target.as_deref(), o.secs), (Some("dsse"), Some(3600)));
        assert!(parse(&["--list"]).unwrap().list);
    }

    #[test]
    fn usage_errors_say_what_is_wrong() {
        let cases: [(&[&str], &str); 6] = [
            (&[], "either --smoke or one TARGET"),
            (&["--smoke", "dsse"], "either --smoke or one TARGET"),
            (&["a", "b"], "unexpected argument \"b\""),
            (&["--smoke", "--time"], "--time needs a value"),
            (&["--smoke", "--time", "0"], "at least one second"),
            (&["--smoke", "--fast"], "unexpected argument \"--fast\""),
        ];
        for (list, want) in cases {
            let err = parse(list).unwrap_err().to_string();
            assert!(err.contains(want), "{list:?}: {err}");
        }
    }
}
