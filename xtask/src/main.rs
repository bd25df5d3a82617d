//! cargo xtask: project automation with std only (`test`, `demo`).
//! Reached through the alias in `.cargo/config.toml`.
#![forbid(unsafe_code)]

mod demo;
mod tidy;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const USAGE: &str = "\
usage: cargo xtask <command>
  test [ARGS]   build the binaries the end-to-end tests run, then run every test
                (ARGS go to `cargo test`, e.g. a test name filter)
  demo [--once] run a server and an enrolled agent on loopback (target/demo);
                --once prints the fleet and stops";

/// The workspace root (the parent of this crate's directory).
pub(crate) fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The cargo that runs us.
pub(crate) fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(project_root());
    cmd
}

/// Runs a command, failing with its description when it fails.
pub(crate) fn run(cmd: &mut Command) -> Result<(), String> {
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed ({status})"))
    }
}

/// The cargo target directory.
pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| project_root().join("target"), PathBuf::from)
}

/// Builds what the end-to-end tests start (with crash points compiled in),
/// copies it aside so no other build overwrites it, and runs all tests.
fn test(args: &[String]) -> Result<(), String> {
    run(cargo().args([
        "build",
        "-p",
        "stella-server",
        "-p",
        "stella-agent",
        "--features",
        "stella-agent/fault-injection",
    ]))?;
    let bins = target_dir().join("e2e-bin");
    std::fs::create_dir_all(&bins).map_err(|e| format!("cannot create {}: {e}", bins.display()))?;
    for name in ["stella-server", "stella-agent"] {
        let from = target_dir().join("debug").join(name);
        std::fs::copy(&from, bins.join(name))
            .map_err(|e| format!("cannot copy {}: {e}", from.display()))?;
    }
    run(cargo()
        .args(["test", "--workspace"])
        .args(args)
        .env("STELLA_BIN_DIR", &bins))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(&args[1..]),
        Some("demo") => demo::demo(&args[1..]),
        Some("help" | "--help" | "-h") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => {
            eprintln!("xtask: unknown command {other:?}\n{USAGE}");
            return ExitCode::from(2);
        }
        None => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}
