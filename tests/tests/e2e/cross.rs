//! Release binaries (docs/design.md section 10): what `cargo xtask dist` built is
//! static, for the right machine and matches its SHA256SUMS, checked with
//! binutils rather than xtask's own reader; and the aarch64 agent enrolls and
//! heartbeats under qemu against the native server. `cargo xtask test` sets
//! `STELLA_DIST_DIR` only when it could build every release target; without it
//! (or without qemu) these tests say SKIPPED and pass, so the native suite runs
//! anywhere, except under `CI=true`, where they fail.

use std::path::{Path, PathBuf};
use std::process::Command;

use stella_tests::{AgentDir, DEADLINE, Proc, Server, on_path, poll, skip_or_fail, text, tool};

/// Each release target with the machine `readelf -h` names for it.
const TARGETS: [(&str, &str); 2] = [
    ("x86_64-unknown-linux-musl", "Advanced Micro Devices X86-64"),
    ("aarch64-unknown-linux-musl", "AArch64"),
];
const BINARIES: [&str; 2] = ["stella-agent", "stella-server"];

/// `STELLA_DIST_DIR`, or `None` after [`skip_or_fail`].
fn dist_dir(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("STELLA_DIST_DIR").map(PathBuf::from);
    if dir.is_none() {
        skip_or_fail(
            &format!("cross::{test}"),
            "STELLA_DIST_DIR is not set (`cargo xtask test` sets it when `cargo xtask dist` \
             built both musl targets; .ci/deps installs what that needs)",
        );
    }
    dir
}

/// The version the binaries were built as: the dist dir is `dist/<version>`.
fn dist_version(dist: &Path) -> String {
    dist.file_name()
        .expect("STELLA_DIST_DIR names dist/<version>")
        .to_string_lossy()
        .into_owned()
}

/// The value of a `Name:   value` line in `readelf -h` output.
fn header_field<'a>(readelf: &'a str, name: &str) -> Option<&'a str> {
    readelf
        .lines()
        .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

#[test]
fn dist_binaries_are_static_and_of_the_right_machine() {
    let Some(dist) = dist_dir("dist_binaries_are_static_and_of_the_right_machine") else {
        return;
    };
    let version = dist_version(&dist);
    for (target, machine) in TARGETS {
        for name in BINARIES {
            let path = dist.join(target).join(name);
            assert!(path.is_file(), "{} is missing", path.display());
            let shown = path.display().to_string();
            let out = tool("readelf", &["-h", "-l", "-d", "-W", &shown]);
            let (stdout, stderr) = text(&out);
            assert!(out.status.success(), "readelf {shown}: {stderr}");
            assert_eq!(header_field(&stdout, "Class"), Some("ELF64"), "{shown}");
            assert!(
                header_field(&stdout, "Data").is_some_and(|d| d.contains("little endian")),
                "{shown}: {stdout}"
            );
            assert_eq!(header_field(&stdout, "Machine"), Some(machine), "{shown}");
            // Static: no interpreter; static-pie keeps a dynamic section for
            // its relocations, but it needs no shared library.
            assert!(
                !stdout.contains("INTERP") && !stdout.contains("program interpreter"),
                "{shown} has a program interpreter:\n{stdout}"
            );
            assert!(
                !stdout.contains("(NEEDED)"),
                "{shown} needs shared libraries:\n{stdout}"
            );
        }
    }

    // The x86_64 agent runs here and reports the version it was built as.
    let agent = dist.join(TARGETS[0].0).join("stella-agent");
    let out = stella_tests::run(Command::new(&agent).arg("version"));
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert_eq!(
        stdout.trim(),
        format!("stella-agent {version} x86_64-unknown-linux-musl")
    );

    // SHA256SUMS lists exactly the four binaries, and `sha256sum -c` agrees.
    let sums = std::fs::read_to_string(dist.join("SHA256SUMS")).expect("SHA256SUMS");
    let mut listed: Vec<&str> = sums
        .lines()
        .map(|l| l.split_once("  ").expect("`<hex>  <file>` lines").1)
        .collect();
    listed.sort_unstable();
    let mut want: Vec<String> = TARGETS
        .iter()
        .flat_map(|(t, _)| BINARIES.iter().map(move |b| format!("{t}/{b}")))
        .collect();
    want.sort_unstable();
    assert_eq!(listed, want);
    let out = stella_tests::run(
        Command::new("sha256sum")
            .args(["-c", "SHA256SUMS"])
            .current_dir(&dist),
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "sha256sum -c: {stdout}{stderr}");
    assert_eq!(stdout.lines().filter(|l| l.ends_with(": OK")).count(), 4);
}

#[test]
fn aarch64_agent_under_qemu_enrolls_and_heartbeats() {
    let Some(dist) = dist_dir("aarch64_agent_under_qemu_enrolls_and_heartbeats") else {
        return;
    };
    if !on_path("qemu-aarch64-static") {
        skip_or_fail(
            "cross::aarch64_agent_under_qemu_enrolls_and_heartbeats",
            "qemu-aarch64-static is not installed \
             (apt-get install -y --no-install-recommends qemu-user-static)",
        );
        return;
    }
    let version = dist_version(&dist);
    let agent_bin = dist.join("aarch64-unknown-linux-musl").join("stella-agent");
    let qemu = |args: &[&str], state: &Path| {
        let mut cmd = Command::new("qemu-aarch64-static");
        cmd.arg(&agent_bin).args(args).arg("--state-dir").arg(state);
        cmd
    };

    let server = Server::start();
    let token = server.token(&["--ttl", "10m", "--label", "arch=arm64"]);
    let agent = AgentDir::new();
    let out = stella_tests::run(&mut qemu(
        &[
            "bootstrap",
            "--server",
            &server.url,
            "--token",
            &token,
            "--ca-hash",
            &server.pin,
            "--name",
            "arm1",
        ],
        &agent.state,
    ));
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "bootstrap under qemu: {stdout}{stderr}"
    );
    let id = stdout.trim().to_owned();
    assert!(
        stella_proto::id::is_agent_id(&id),
        "bootstrap printed {id:?}"
    );

    let mut proc = Proc::spawn(
        qemu(&["run"], &agent.state),
        agent.dir.join("agent-qemu.log"),
    );
    // Emulated TLS is slower: allow more than the usual deadline.
    let view = poll(DEADLINE * 3, || {
        Some(server.agent(&id)).filter(|a| a.heartbeat_seq >= 2)
    })
    .unwrap_or_else(|| {
        panic!(
            "the aarch64 agent never heartbeat twice; last: {:?}\nagent log:\n{}\nserver log:\n{}",
            server.agent(&id),
            proc.log_text(),
            server.proc.log_text()
        )
    });
    assert_eq!(view.status, "active");
    assert_eq!(view.target, "aarch64-unknown-linux-musl");
    assert_eq!(view.platform.target, "aarch64-unknown-linux-musl");
    assert_eq!(view.platform.arch, "aarch64");
    assert_eq!(view.version, version);
    assert_eq!(view.labels.get("arch").map(String::as_str), Some("arm64"));
    proc.kill();
}
