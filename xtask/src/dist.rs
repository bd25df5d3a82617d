//! `cargo xtask dist` (docs/design.md section 10): static musl release binaries in
//! `target/dist/<version>/<target>/`, each checked to be a static ELF file for
//! the right machine, with a `SHA256SUMS` file and a size table.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use lexopt::Arg;

use crate::args::{Args, Usage};
use crate::elf::{self, EM_AARCH64, EM_X86_64, Elf};
use crate::{cargo, project_root, run, target_dir};

/// The release targets, all built by default.
const TARGETS: [&str; 2] = ["x86_64-unknown-linux-musl", "aarch64-unknown-linux-musl"];
/// What each target ships.
const BINARIES: [&str; 2] = ["stella-agent", "stella-server"];
/// docs/design.md section 13: the stripped x86_64 musl agent, 1.85 MiB.
const AGENT_BUDGET: u64 = 1_939_865;

/// `cargo xtask dist` options.
#[derive(Debug, Default)]
pub(crate) struct Options {
    version: Option<String>,
    targets: Vec<String>,
    strict: bool,
}

impl Options {
    /// Parses `[--version V] [--target T]... [--strict]`.
    pub(crate) fn parse<I>(args: I) -> Result<Self, Usage>
    where
        I: IntoIterator,
        I::Item: Into<OsString>,
    {
        const CMD: &str = "dist";
        let mut opts = Self::default();
        let mut args = Args::new(CMD, args);
        while let Some(arg) = args.next()? {
            match arg {
                Arg::Long("version") => opts.version = Some(args.string("--version")?),
                Arg::Long("target") => {
                    let target = args.string("--target")?;
                    if machine_of(&target).is_none() {
                        return Err(Usage::Wrong(format!(
                            "dist: unknown release target {target:?} (known: {})",
                            TARGETS.join(", ")
                        )));
                    }
                    if !opts.targets.contains(&target) {
                        opts.targets.push(target);
                    }
                }
                Arg::Long("strict") => opts.strict = true,
                other => return Err(Usage::unexpected(CMD, other)),
            }
        }
        Ok(opts)
    }

    /// Every release target at `version`: what `bundle` needs.
    pub(crate) fn for_version(version: &str) -> Self {
        Self {
            version: Some(version.to_owned()),
            ..Self::default()
        }
    }
}

/// What a dist run produced.
#[derive(Debug)]
pub(crate) struct Dist {
    /// `target/dist/<version>`.
    pub(crate) dir: PathBuf,
    pub(crate) built: Vec<String>,
    /// Targets skipped for a missing toolchain part, with the reason.
    pub(crate) skipped: Vec<(String, String)>,
}

/// `cargo xtask dist`: fails when no target could be built, or with `--strict`
/// when any was skipped.
pub(crate) fn dist(opts: &Options) -> Result<(), String> {
    let out = build(opts)?;
    if out.built.is_empty() {
        return Err("dist: no target could be built (see the SKIPPED lines above)".into());
    }
    if opts.strict && !out.skipped.is_empty() {
        let names: Vec<&str> = out.skipped.iter().map(|(t, _)| t.as_str()).collect();
        return Err(format!(
            "dist --strict: skipped {} (see the SKIPPED lines above)",
            names.join(", ")
        ));
    }
    Ok(())
}

/// For `cargo xtask test`: builds every release target and returns the dist
/// dir for the cross tests, or `None` (said loudly) when a target had to be
/// skipped. An error means a build or a check failed.
pub(crate) fn for_tests() -> Result<Option<PathBuf>, String> {
    let out = build(&Options::default())?;
    if out.skipped.is_empty() {
        return Ok(Some(out.dir));
    }
    loud(&[
        "the cross-target end-to-end tests will be SKIPPED: dist could not build every release target",
        "(install what the SKIPPED lines above name, or run .ci/run); the native tests still run",
    ]);
    Ok(None)
}

/// Builds, copies, checks and sums the release binaries.
pub(crate) fn build(opts: &Options) -> Result<Dist, String> {
    let started = Instant::now();
    let version = version(opts.version.as_deref())?;
    let targets: Vec<String> = if opts.targets.is_empty() {
        TARGETS.iter().map(|t| (*t).to_owned()).collect()
    } else {
        opts.targets.clone()
    };
    let dir = target_dir().join("dist").join(&version);
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(|e| format!("cannot clear {}: {e}", dir.display()))?;
    }

    let mut skipped = Vec::new();
    let installed = ensure_rust_targets(&targets);
    let mut buildable = Vec::new();
    for target in &targets {
        if !installed.contains(target) {
            let reason = format!(
                "the Rust standard library for {target} is not installed and \
                 `rustup target add {target}` failed"
            );
            skip(target, &reason, None);
            skipped.push((target.clone(), reason));
            continue;
        }
        match c_toolchain(target) {
            Ok(env) => buildable.push((target.clone(), env)),
            Err((reason, apt)) => {
                skip(target, &reason, Some(&apt));
                skipped.push((target.clone(), reason));
            }
        }
    }

    let mut rows = Vec::new();
    let mut built = Vec::new();
    for (target, env) in &buildable {
        eprintln!("xtask dist: building {target} (version {version})");
        let t0 = Instant::now();
        let mut cmd = cargo();
        cmd.args(["build", "--release", "--target", target])
            .args(BINARIES.iter().flat_map(|b| ["-p", b]))
            .env("STELLA_VERSION", &version)
            .envs(env.iter().map(|(k, v)| (k, v)));
        run(&mut cmd).map_err(|e| format!("dist: building {target} failed: {e}"))?;
        eprintln!(
            "xtask dist: built {target} in {:.1}s",
            t0.elapsed().as_secs_f64()
        );

        let out = dir.join(target);
        fs::create_dir_all(&out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
        let machine = machine_of(target).unwrap_or_default();
        for name in BINARIES {
            let from = target_dir().join(target).join("release").join(name);
            let to = out.join(name);
            fs::copy(&from, &to).map_err(|e| format!("cannot copy {}: {e}", from.display()))?;
            let elf = check_static(&to, machine)?;
            let bytes = fs::metadata(&to)
                .map_err(|e| format!("cannot stat {}: {e}", to.display()))?
                .len();
            rows.push(Row {
                target: target.clone(),
                name,
                bytes,
                link: if elf.pie { "static-pie" } else { "static" },
                sha256: sha256_file(&to)?,
            });
        }
        built.push(target.clone());
    }

    if !rows.is_empty() {
        let sums: String = rows
            .iter()
            .map(|r| format!("{}  {}/{}\n", r.sha256, r.target, r.name))
            .collect();
        let path = dir.join("SHA256SUMS");
        fs::write(&path, sums).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        print_table(&rows);
        println!("{}", dir.display());
    }
    for (target, reason) in &skipped {
        loud(&[&format!("SKIPPED {target}: {reason}")]);
    }
    eprintln!(
        "xtask dist: {} of {} targets built in {:.1}s",
        built.len(),
        targets.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(Dist {
        dir,
        built,
        skipped,
    })
}

/// `--version`, else `STELLA_VERSION`, else `[workspace.package] version`.
pub(crate) fn version(flag: Option<&str>) -> Result<String, String> {
    let env = std::env::var("STELLA_VERSION")
        .ok()
        .filter(|v| !v.is_empty());
    let version = match flag.map(str::to_owned).or(env) {
        Some(v) => v,
        None => {
            let path = project_root().join("Cargo.toml");
            let text = fs::read_to_string(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            workspace_version(&text).ok_or_else(|| {
                format!(
                    "{} has no [workspace.package] version; pass --version",
                    path.display()
                )
            })?
        }
    };
    let ok = !version.is_empty()
        && !version.starts_with('.')
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+' | '_'));
    if ok {
        Ok(version)
    } else {
        Err(format!(
            "version {version:?} is not usable as a directory name (letters, digits, . - + _)"
        ))
    }
}

/// The `version` of the `[workspace.package]` table of a Cargo.toml.
fn workspace_version(manifest: &str) -> Option<String> {
    let mut in_table = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_table = line == "[workspace.package]";
        } else if in_table {
            let Some(rest) = line.strip_prefix("version") else {
                continue;
            };
            let Some(value) = rest.trim_start().strip_prefix('=') else {
                continue;
            };
            let value = value.trim().strip_prefix('"')?;
            return value.split('"').next().map(str::to_owned);
        }
    }
    None
}

/// Adds the missing Rust targets with rustup; returns those installed after.
fn ensure_rust_targets(targets: &[String]) -> Vec<String> {
    let installed = installed_targets();
    let missing: Vec<&String> = targets.iter().filter(|t| !installed.contains(t)).collect();
    if missing.is_empty() {
        return installed;
    }
    eprintln!(
        "xtask dist: adding Rust targets: rustup target add {}",
        missing
            .iter()
            .map(|t| t.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let added = Command::new("rustup")
        .args(["target", "add"])
        .args(&missing)
        .current_dir(project_root())
        .status();
    match added {
        Ok(s) if s.success() => {}
        Ok(s) => loud(&[&format!("`rustup target add` failed ({s})")]),
        Err(e) => loud(&[&format!("cannot run rustup: {e}")]),
    }
    installed_targets()
}

/// Targets whose standard library is installed: rustup's list, or without
/// rustup, those present in the sysroot.
fn installed_targets() -> Vec<String> {
    let listed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .current_dir(project_root())
        .output();
    if let Ok(out) = listed
        && out.status.success()
    {
        return String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect();
    }
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let sysroot = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let Some(sysroot) = sysroot else {
        return Vec::new();
    };
    TARGETS
        .iter()
        .filter(|t| sysroot.join("lib/rustlib").join(t).join("lib").is_dir())
        .map(|t| (*t).to_owned())
        .collect()
}

/// The C compiler and linker a target needs (docs/development.md): extra environment
/// for cargo, or why the target cannot be built and the apt command that fixes it.
fn c_toolchain(target: &str) -> Result<Vec<(String, String)>, (String, String)> {
    let apt = |pkgs: &str| format!("apt-get install -y --no-install-recommends {pkgs}");
    match target {
        "aarch64-unknown-linux-musl" => {
            // Linker, runner and CC are set in .cargo/config.toml.
            if on_path("aarch64-linux-gnu-gcc") {
                Ok(Vec::new())
            } else {
                Err((
                    "the cross linker and C compiler aarch64-linux-gnu-gcc is not installed".into(),
                    apt("gcc-aarch64-linux-gnu libc6-dev-arm64-cross"),
                ))
            }
        }
        "x86_64-unknown-linux-musl" => {
            // ring's C code: musl-gcc, else the host gcc (the same bytes).
            let var = "CC_x86_64_unknown_linux_musl";
            if on_path("x86_64-linux-musl-gcc") || std::env::var_os(var).is_some() {
                Ok(Vec::new())
            } else if on_path("gcc") {
                eprintln!("xtask dist: x86_64-linux-musl-gcc not found, using {var}=gcc");
                Ok(vec![(var.into(), "gcc".into())])
            } else {
                Err((
                    "neither x86_64-linux-musl-gcc nor gcc is installed".into(),
                    apt("musl-tools"),
                ))
            }
        }
        _ => Err((format!("{target} is not a release target"), String::new())),
    }
}

pub(crate) fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// A message that must not scroll by unnoticed.
fn loud(lines: &[&str]) {
    let bar = "!".repeat(78);
    eprintln!("{bar}");
    for line in lines {
        eprintln!("!! xtask dist: {line}");
    }
    eprintln!("{bar}");
}

fn skip(target: &str, reason: &str, apt: Option<&str>) {
    let mut lines = vec![format!("SKIPPING {target}: {reason}")];
    if let Some(apt) = apt.filter(|a| !a.is_empty()) {
        lines.push(format!("install it (as root) with: {apt}"));
    }
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    loud(&lines);
}

/// One line of the size table.
struct Row {
    target: String,
    name: &'static str,
    bytes: u64,
    link: &'static str,
    sha256: String,
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<28} {:<14} {:>11} {:>6}  {:<10}  budget",
        "target", "binary", "bytes", "MiB", "link"
    );
    for r in rows {
        let budget = if r.name != "stella-agent" {
            "-"
        } else if r.bytes <= AGENT_BUDGET {
            "within 1.85 MiB"
        } else {
            "OVER 1.85 MiB"
        };
        #[allow(clippy::cast_precision_loss)] // a few MiB print exactly enough
        let mib = r.bytes as f64 / (1024.0 * 1024.0);
        println!(
            "{:<28} {:<14} {:>11} {:>6.2}  {:<10}  {budget}",
            r.target,
            r.name,
            thousands(r.bytes),
            mib,
            r.link
        );
    }
    for r in rows {
        if r.name == "stella-agent" && r.target.starts_with("x86_64") && r.bytes > AGENT_BUDGET {
            loud(&[&format!(
                "the {} agent is {} bytes, over the 1.85 MiB budget (docs/design.md section 13)",
                r.target,
                thousands(r.bytes)
            )]);
        }
    }
}

/// `1643240` as `1,643,240`.
pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The SHA-256 of a file, in lowercase hex.
fn sha256_file(path: &Path) -> Result<String, String> {
    crate::sha256_file(path).map(|d| stella_proto::hash::hex(&d))
}

/// The ELF machine (`e_machine`) a release target's binaries must have.
fn machine_of(target: &str) -> Option<u16> {
    match target {
        "x86_64-unknown-linux-musl" => Some(EM_X86_64),
        "aarch64-unknown-linux-musl" => Some(EM_AARCH64),
        _ => None,
    }
}

fn machine_name(machine: u16) -> &'static str {
    match machine {
        EM_X86_64 => "x86_64",
        EM_AARCH64 => "aarch64",
        3 => "x86",
        40 => "arm",
        243 => "riscv",
        _ => "unknown",
    }
}

/// Checks parsed ELF facts: the expected machine, and static (no interpreter,
/// no shared libraries needed).
fn verify(elf: &Elf, machine: u16) -> Result<(), String> {
    if elf.machine != machine {
        return Err(format!(
            "is for ELF machine {} ({}), expected {} ({})",
            elf.machine,
            machine_name(elf.machine),
            machine,
            machine_name(machine)
        ));
    }
    if let Some(interp) = &elf.interp {
        return Err(format!(
            "is dynamically linked: it has a PT_INTERP program header (interpreter {interp})"
        ));
    }
    if elf.needed > 0 {
        return Err(format!(
            "is dynamically linked: its dynamic segment needs {} shared librar{} (DT_NEEDED)",
            elf.needed,
            if elf.needed == 1 { "y" } else { "ies" }
        ));
    }
    Ok(())
}

/// Reads and verifies one binary; the error names the file.
fn check_static(path: &Path, machine: u16) -> Result<Elf, String> {
    let bytes = fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let elf = elf::parse(&bytes)
        .and_then(|elf| verify(&elf, machine).map(|()| elf))
        .map_err(|e| format!("dist: {} {e}", path.display()))?;
    Ok(elf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `elf::parse` reads of a static executable for `machine`.
    fn static_elf(machine: u16, pie: bool) -> Elf {
        Elf {
            machine,
            pie,
            interp: None,
            dynamic: pie,
            needed: 0,
        }
    }

    #[test]
    fn a_static_executable_passes() {
        verify(&static_elf(EM_X86_64, false), EM_X86_64).unwrap();
    }

    #[test]
    fn a_static_pie_with_a_dynamic_segment_but_no_needed_passes() {
        verify(&static_elf(EM_AARCH64, true), EM_AARCH64).unwrap();
    }

    #[test]
    fn needed_libraries_fail() {
        let elf = Elf {
            needed: 2,
            ..static_elf(EM_X86_64, true)
        };
        let err = verify(&elf, EM_X86_64).unwrap_err();
        assert!(err.contains("2 shared libraries (DT_NEEDED)"), "{err}");
        let elf = Elf {
            needed: 1,
            ..static_elf(EM_X86_64, true)
        };
        let err = verify(&elf, EM_X86_64).unwrap_err();
        assert!(err.contains("1 shared library (DT_NEEDED)"), "{err}");
    }

    #[test]
    fn an_interpreter_fails() {
        let elf = Elf {
            interp: Some("/lib/ld-musl-x86_64.so.1".into()),
            ..static_elf(EM_X86_64, true)
        };
        let err = verify(&elf, EM_X86_64).unwrap_err();
        assert!(
            err.contains("PT_INTERP") && err.contains("/lib/ld-musl-x86_64.so.1"),
            "{err}"
        );
    }

    #[test]
    fn the_wrong_machine_fails() {
        let err = verify(&static_elf(EM_X86_64, false), EM_AARCH64).unwrap_err();
        assert_eq!(
            err,
            "is for ELF machine 62 (x86_64), expected 183 (aarch64)"
        );
    }

    #[test]
    fn a_file_that_is_not_elf_is_named_in_the_error() {
        let path = std::env::temp_dir().join(format!("xtask-dist-sh-{}", std::process::id()));
        fs::write(&path, "#!/bin/sh\n").unwrap();
        let err = check_static(&path, EM_X86_64).unwrap_err();
        assert_eq!(err, format!("dist: {} not an ELF file", path.display()));
        fs::remove_file(&path).unwrap();
    }

    #[test]
    fn this_xtask_binary_reads_as_a_dynamic_host_executable() {
        let exe = std::env::current_exe().unwrap();
        let parsed = elf::parse(&fs::read(&exe).unwrap()).unwrap();
        let host = if cfg!(target_arch = "x86_64") {
            EM_X86_64
        } else if cfg!(target_arch = "aarch64") {
            EM_AARCH64
        } else {
            parsed.machine
        };
        assert_eq!(parsed.machine, host);
        if cfg!(target_env = "gnu") {
            // Built for the host's glibc: an interpreter and libc.so.6 at least.
            assert!(parsed.interp.as_deref().is_some_and(|i| i.contains("ld-")));
            assert!(parsed.dynamic && parsed.needed >= 1, "{parsed:?}");
            let err = check_static(&exe, host).unwrap_err();
            assert!(
                err.contains(&exe.display().to_string()) && err.contains("PT_INTERP"),
                "{err}"
            );
        }
    }

    #[test]
    fn sha256_matches_the_fips_180_2_vectors() {
        let dir = std::env::temp_dir().join(format!("xtask-dist-sha-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let cases: [(&[u8], &str); 3] = [
            (
                b"",
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            ),
            (
                b"abc",
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            ),
            (
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
                "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
            ),
        ];
        for (i, (input, want)) in cases.iter().enumerate() {
            let path = dir.join(i.to_string());
            fs::write(&path, input).unwrap();
            assert_eq!(sha256_file(&path).unwrap(), *want);
        }
        // One million 'a's spans many read chunks.
        let path = dir.join("million");
        fs::write(&path, vec![b'a'; 1_000_000]).unwrap();
        assert_eq!(
            sha256_file(&path).unwrap(),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_workspace_version_is_read_from_its_table() {
        let manifest = "[package]\nversion = \"9.9.9\"\n\n[workspace.package]\n\
                        versions = 1\nversion = \"1.2.3-rc.1\" # comment\nedition = \"2024\"\n";
        assert_eq!(workspace_version(manifest).as_deref(), Some("1.2.3-rc.1"));
        assert_eq!(workspace_version("[package]\nversion = \"1\"\n"), None);
        let real = fs::read_to_string(project_root().join("Cargo.toml")).unwrap();
        assert!(workspace_version(&real).is_some());
    }

    #[test]
    fn options_parse() {
        let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let o = Options::parse(args(&[
            "--version",
            "1.0.0",
            "--target=aarch64-unknown-linux-musl",
            "--strict",
        ]))
        .unwrap();
        assert_eq!(o.version.as_deref(), Some("1.0.0"));
        assert_eq!(o.targets, ["aarch64-unknown-linux-musl"]);
        assert!(o.strict);
        assert!(Options::parse(args(&["--target", "armv7-unknown-linux-musleabihf"])).is_err());
        assert!(Options::parse(args(&["--version"])).is_err());
        assert!(Options::parse(args(&["--bogus"])).is_err());
        assert!(Options::parse(args(&["--strict=yes"])).is_err());
        assert_eq!(Options::parse(args(&["-h"])).unwrap_err(), Usage::Help);
    }

    #[test]
    fn versions_must_be_directory_names() {
        assert_eq!(version(Some("1.2.3+build_4")).unwrap(), "1.2.3+build_4");
        for bad in ["", "..", "../x", "1 2", "a/b"] {
            assert!(version(Some(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_643_240), "1,643,240");
    }
}
