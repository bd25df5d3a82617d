//! cargo xtask: project automation with std `Command`s (`test`, `demo`, `dist`,
//! `keygen`, `sign`, `bundle`, `bench`).
//! Reached through the alias in `.cargo/config.toml`.
#![forbid(unsafe_code)]

mod bench;
mod bundle;
mod demo;
mod dist;
mod elf;
mod fuzz;
mod keygen;
mod sign;
mod tidy;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const USAGE: &str = "\
usage: cargo xtask <command>
  test [ARGS]   build the binaries the end-to-end tests run, then run every test
                (ARGS go to `cargo test`, e.g. a test name filter)
  demo [--once] run a server and an enrolled agent on loopback (target/demo);
                --once prints the fleet and stops
  dist [--version V] [--target T]... [--strict]
                static musl release binaries (x86_64 and aarch64 by default)
                in target/dist/<version>, checked static, with SHA256SUMS and
                sizes; a target whose toolchain is missing is skipped loudly
                (--strict: then fail)
  keygen --out DIR
                make the offline release key: DIR/release.key (0600, never
                overwritten) and DIR/release.pub; prints its fingerprint
  sign --key KEY --version V [--allow-downgrade-from V] DIR
                sign every file under DIR into DIR/release.dsse.json
  fuzz --smoke [--time S] | fuzz TARGET [--time S] | fuzz --list
                libFuzzer targets in fuzz/ (cargo fuzz, installed if missing):
                replay the kept corpus and crash regressions, then run every
                target S s (default 15, 4 min in all), or one target (600 s)
  bundle --key KEY --out DIR [--version V] [--server URL --token T] [--ca FILE]
         [--dist DIST]
                the USB bundle for offline hosts: both targets' binaries (from
                dist, or a prebuilt DIST dir), release-key.pub, ca.pem,
                bootstrap.json, install.sh, README.txt, all signed into
                DIR/release.dsse.json; and DIR.tar
  bench [--quick]
                measure the agent and server against DESIGN.md section 13
                (release builds, real processes on loopback); prints one
                table and writes BENCHMARKS.md (--quick: about 2 minutes)";

/// The workspace root (the parent of this crate's directory).
pub(crate) fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// SHA-256 of a file, read in 64 KiB pieces (for dist, sign and bundle).
pub(crate) fn sha256_file(path: &Path) -> Result<[u8; 32], String> {
    use std::io::Read;
    let fail = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    let mut file = std::fs::File::open(path).map_err(fail)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => ctx.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(fail(e)),
        }
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok(out)
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

/// The version of the second agent build the update tests install.
const NEXT_AGENT_VERSION: &str = "0.2.0";

/// Builds the release binaries (`dist`, for the cross tests), then what the
/// end-to-end tests start (with crash points compiled in), copies it aside so
/// no other build overwrites it, and runs all tests. A failed `dist` fails the
/// run only after the native tests have run.
fn test(args: &[String]) -> Result<(), String> {
    let dist = dist::for_tests();
    if let Err(e) = &dist {
        eprintln!("xtask: {e}\nxtask: the cross tests are SKIPPED; the native tests still run");
    }
    let bins = target_dir().join("e2e-bin");
    std::fs::create_dir_all(&bins).map_err(|e| format!("cannot create {}: {e}", bins.display()))?;
    // The update tests need a second agent that reports a newer version
    // (STELLA_VERSION at build time): build it first, keep it aside.
    run(cargo()
        .args([
            "build",
            "-p",
            "stella-agent",
            "--features",
            "stella-agent/fault-injection",
        ])
        .env("STELLA_VERSION", NEXT_AGENT_VERSION))?;
    let next = target_dir().join("debug").join("stella-agent");
    std::fs::copy(&next, bins.join("stella-agent-next"))
        .map_err(|e| format!("cannot copy {}: {e}", next.display()))?;
    run(cargo()
        .args([
            "build",
            "-p",
            "stella-server",
            "-p",
            "stella-agent",
            "--features",
            "stella-agent/fault-injection",
        ])
        .env_remove("STELLA_VERSION"))?;
    for name in ["stella-server", "stella-agent"] {
        let from = target_dir().join("debug").join(name);
        std::fs::copy(&from, bins.join(name))
            .map_err(|e| format!("cannot copy {}: {e}", from.display()))?;
    }
    // The signing tests run keygen and sign: this very binary.
    let me = std::env::current_exe().map_err(|e| format!("cannot find the xtask binary: {e}"))?;
    std::fs::copy(&me, bins.join("xtask"))
        .map_err(|e| format!("cannot copy {}: {e}", me.display()))?;
    let mut cmd = cargo();
    cmd.args(["test", "--workspace"])
        .args(args)
        .env("STELLA_BIN_DIR", &bins);
    if let Ok(Some(dir)) = &dist {
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.clone());
        cmd.env("STELLA_DIST_DIR", dir);
    }
    run(&mut cmd)?;
    dist.map(drop)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(&args[1..]),
        Some("demo") => demo::demo(&args[1..]),
        Some("bench") => bench::bench(&args[1..]),
        Some("fuzz") => match fuzz::Options::parse(&args[1..]) {
            Ok(opts) => fuzz::fuzz(&opts),
            Err(e) => {
                eprintln!("xtask: {e}\n{USAGE}");
                return ExitCode::from(2);
            }
        },
        Some("dist") => match dist::Options::parse(&args[1..]) {
            Ok(opts) => dist::dist(&opts),
            Err(e) => {
                eprintln!("xtask: {e}\n{USAGE}");
                return ExitCode::from(2);
            }
        },
        Some("keygen") => match keygen::Options::parse(&args[1..]) {
            Ok(opts) => keygen::keygen(&opts),
            Err(e) => {
                eprintln!("xtask: {e}\n{USAGE}");
                return ExitCode::from(2);
            }
        },
        Some("bundle") => match bundle::Options::parse(&args[1..]) {
            Ok(opts) => bundle::bundle(&opts),
            Err(e) => {
                eprintln!("xtask: {e}\n{USAGE}");
                return ExitCode::from(2);
            }
        },
        Some("sign") => match sign::Options::parse(&args[1..]) {
            Ok(opts) => sign::sign(&opts),
            Err(e) => {
                eprintln!("xtask: {e}\n{USAGE}");
                return ExitCode::from(2);
            }
        },
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
