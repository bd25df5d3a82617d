//! cargo xtask: project automation with std `Command`s (`test`, `demo`, `dist`,
//! `keygen`, `sign`, `sign-task`, `bundle`, `bench`, `fuzz`), arguments read
//! with lexopt.
//! Reached through the alias in `.cargo/config.toml`.
#![forbid(unsafe_code)]

mod args;
mod bench;
mod bundle;
mod demo;
mod dist;
mod elf;
mod fuzz;
mod keygen;
mod sign;
mod sign_task;
mod tidy;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use lexopt::Arg;

use crate::args::Usage;

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
  sign-task --key KEY TASK.json --out TASK.dsse.json
                check a deployment task's shape and sign it with the offline
                deploy key (a keygen key) into a DSSE envelope
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
  bench [--quick] [--store postgres] [--only storm|postgres]
                measure the agent and server against docs/design.md section 13
                (release builds, real processes on loopback); prints one
                table and writes BENCHMARKS.md (--quick: about 2 minutes;
                --store postgres: the server on PostgreSQL too, as ratios of
                redb's, in its own section; --only postgres: only the server
                phases on both stores, replacing only that section)";

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

/// Programs the end-to-end tests call: certificate and API checks, the
/// bundle's shell lint, the cross build and the aarch64 agent under qemu,
/// and the container tasks' podman, runc and busybox.
const TEST_TOOLS: [&str; 11] = [
    "openssl",
    "curl",
    "shellcheck",
    "readelf",
    "aarch64-linux-gnu-gcc",
    "qemu-aarch64-static",
    "podman",
    "runc",
    "busybox",
    "chromium",
    "chromedriver",
];

/// Whether Debian's PostgreSQL server binaries are installed (they are not
/// on the PATH: the tests run `initdb` and `postgres` from here).
fn postgres_installed() -> bool {
    std::fs::read_dir("/usr/lib/postgresql").is_ok_and(|versions| {
        versions
            .filter_map(Result::ok)
            .any(|v| v.path().join("bin/initdb").is_file())
    })
}

/// Whether Debian's haproxy is installed (in /usr/sbin, which an
/// unprivileged user's PATH may lack): the load-balancer tests start it.
fn haproxy_installed() -> bool {
    dist::on_path("haproxy") || std::path::Path::new("/usr/sbin/haproxy").is_file()
}

/// The version of the second agent build the update tests install.
const NEXT_AGENT_VERSION: &str = "0.2.0";

/// Builds the release binaries (`dist`, for the cross tests), then what the
/// end-to-end tests start (with crash points compiled in), copies it aside so
/// no other build overwrites it, and runs all tests. A failed `dist` fails the
/// run only after the native tests have run.
fn test(args: &[OsString]) -> Result<(), String> {
    // Stop at once, naming the one command that installs what is missing,
    // rather than build for minutes and then skip or fail test by test.
    let mut missing: Vec<&str> = TEST_TOOLS
        .iter()
        .copied()
        .filter(|tool| !dist::on_path(tool))
        .collect();
    if !postgres_installed() {
        missing.push("PostgreSQL (initdb under /usr/lib/postgresql)");
    }
    if !haproxy_installed() {
        missing.push("haproxy (/usr/sbin/haproxy)");
    }
    if !missing.is_empty() {
        return Err(format!(
            "the end-to-end tests need {}, which this machine lacks: install everything \
             they need with `.ci/deps` (as root or with sudo), then run `cargo xtask test` again",
            missing.join(", ")
        ));
    }
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

/// One parsed command line.
#[derive(Debug)]
enum Task {
    /// `test`: its arguments go to `cargo test` as they are.
    Test(Vec<OsString>),
    Demo(demo::Options),
    Dist(dist::Options),
    Keygen(keygen::Options),
    Sign(sign::Options),
    SignDeployment(sign_task::Options),
    Bundle(bundle::Options),
    Bench(bench::Options),
    Fuzz(fuzz::Options),
}

impl Task {
    /// Parses `<command> [ARGS]`: the command here, its arguments in its module.
    fn parse<I>(args: I) -> Result<Self, Usage>
    where
        I: IntoIterator,
        I::Item: Into<OsString>,
    {
        let mut parser = lexopt::Parser::from_args(args);
        let command = match parser.next() {
            Ok(Some(Arg::Value(command))) => command,
            Ok(Some(Arg::Short('h') | Arg::Long("help"))) => return Err(Usage::Help),
            Ok(Some(other)) => {
                return Err(Usage::Wrong(format!(
                    "unknown command {:?}",
                    args::text(&other)
                )));
            }
            Ok(None) => return Err(Usage::Wrong("no command given".into())),
            Err(e) => return Err(Usage::Wrong(e.to_string())),
        };
        let rest: Vec<OsString> = parser
            .raw_args()
            .map_err(|e| Usage::Wrong(e.to_string()))?
            .collect();
        match command.to_str() {
            Some("test") => Ok(Self::Test(rest)),
            Some("demo") => demo::Options::parse(rest).map(Self::Demo),
            Some("dist") => dist::Options::parse(rest).map(Self::Dist),
            Some("keygen") => keygen::Options::parse(rest).map(Self::Keygen),
            Some("sign") => sign::Options::parse(rest).map(Self::Sign),
            Some("sign-task") => sign_task::Options::parse(rest).map(Self::SignDeployment),
            Some("bundle") => bundle::Options::parse(rest).map(Self::Bundle),
            Some("bench") => bench::Options::parse(rest).map(Self::Bench),
            Some("fuzz") => fuzz::Options::parse(rest).map(Self::Fuzz),
            Some("help") => Err(Usage::Help),
            _ => Err(Usage::Wrong(format!("unknown command {command:?}"))),
        }
    }

    fn run(&self) -> Result<(), String> {
        match self {
            Self::Test(args) => test(args),
            Self::Demo(opts) => demo::demo(opts),
            Self::Dist(opts) => dist::dist(opts),
            Self::Keygen(opts) => keygen::keygen(opts),
            Self::Sign(opts) => sign::sign(opts),
            Self::SignDeployment(opts) => sign_task::sign_task(opts),
            Self::Bundle(opts) => bundle::bundle(opts),
            Self::Bench(opts) => bench::bench(opts),
            Self::Fuzz(opts) => fuzz::fuzz(opts),
        }
    }
}

/// Exit 0 when done (or the usage was asked for), 1 when a step failed, 2 on a
/// usage error.
fn main() -> ExitCode {
    let task = match Task::parse(std::env::args_os().skip(1)) {
        Ok(task) => task,
        Err(Usage::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(Usage::Wrong(e)) => {
            eprintln!("xtask: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match task.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_and_help_parse() {
        assert!(matches!(
            Task::parse(["test", "--", "--nocapture", "x"]),
            Ok(Task::Test(args)) if args == ["--", "--nocapture", "x"]
        ));
        assert!(matches!(Task::parse(["demo", "--once"]), Ok(Task::Demo(_))));
        assert!(matches!(Task::parse(["bench"]), Ok(Task::Bench(_))));
        for bench in [
            &["bench", "--store", "postgres"][..],
            &["bench", "--only", "postgres", "--quick"],
        ] {
            assert!(
                matches!(Task::parse(bench), Ok(Task::Bench(_))),
                "{bench:?}"
            );
        }
        for help in [
            &["help"][..],
            &["--help"],
            &["-h"],
            &["sign", "--help"],
            &["bench", "-h"],
        ] {
            assert_eq!(Task::parse(help).unwrap_err(), Usage::Help, "{help:?}");
        }
    }

    #[test]
    fn usage_errors_say_what_is_wrong() {
        let cases: [(&[&str], &str); 7] = [
            (&[], "no command given"),
            (&["build"], "unknown command \"build\""),
            (&["--version"], "unknown command \"--version\""),
            (
                &["bench", "--fast"],
                "bench: unexpected argument \"--fast\"",
            ),
            (&["demo", "now"], "demo: unexpected argument \"now\""),
            (&["bench", "--store", "mysql"], "bench: --store \"mysql\""),
            (&["bench", "--only", "agent"], "storm, postgres"),
        ];
        for (list, want) in cases {
            let err = Task::parse(list).unwrap_err().to_string();
            assert!(err.contains(want), "{list:?}: {err}");
        }
    }
}
