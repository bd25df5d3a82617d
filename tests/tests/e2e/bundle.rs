//! Air-gapped installs (docs/design.md sections 3 and 10): `cargo xtask bundle`
//! makes a signed USB bundle and its tar; `install.sh` picks the agent for
//! `uname -m`; `stella-agent install` verifies the whole bundle before it
//! writes anything, and each tampering is refused with the file named;
//! zero-touch enrollment from `bootstrap.json`; the bundle imports into the
//! server. The bundle carries the static musl binaries `cargo xtask dist`
//! built (`STELLA_DIST_DIR`) where it matters; the refusal tests use small
//! stand-ins, since nothing of theirs may run. Without the static binaries
//! or shellcheck the round trip says SKIPPED (in part), except under
//! `CI=true`, where it fails.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use stella_proto::dsse::{self, PublicKey, SigningKey};
use stella_proto::release::{self, Statement, Subject};
use stella_tests::release::{Keys, sha256};
use stella_tests::{
    AgentDir, DEADLINE, Proc, Server, TempDir, bin, on_path, poll, run, skip_or_fail, text, tool,
};

const X86: &str = "x86_64-unknown-linux-musl";
const ARM: &str = "aarch64-unknown-linux-musl";
const TARGETS: [&str; 2] = [X86, ARM];
const BINARIES: [&str; 2] = ["stella-agent", "stella-server"];
/// What the debug agent reports; bundles of stand-ins use it too.
const CURRENT: &str = env!("CARGO_PKG_VERSION");
/// Where `install --prefix P` puts things, relative to P.
const BIN: &str = "usr/local/bin/stella-agent";
const UNIT: &str = "etc/systemd/system/stella-agent.service";
const STATE: &str = "var/lib/stella-agent";

/// The bundle target of this machine.
fn host_target() -> String {
    format!("{}-unknown-linux-musl", std::env::consts::ARCH)
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Every file and directory under `root`, relative, sorted; directories end in `/`.
fn tree(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if fs::symlink_metadata(&path).unwrap().is_dir() {
                out.push(format!("{rel}/"));
                walk(root, &path, out);
            } else {
                out.push(rel);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// Every file under `root` with its contents.
fn snapshot(root: &Path) -> BTreeMap<String, Vec<u8>> {
    tree(root)
        .into_iter()
        .map(|rel| {
            let bytes = if rel.ends_with('/') {
                Vec::new()
            } else {
                fs::read(root.join(&rel)).unwrap()
            };
            (rel, bytes)
        })
        .collect()
}

/// Copies a directory tree (modes too).
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let dest = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_tree(&path, &dest);
        } else {
            fs::copy(&path, &dest).unwrap();
        }
    }
}

/// A dist dir of stand-in binaries: scripts that say which they are and
/// what they were asked. `host_agent` replaces this machine's agent.
fn fake_dist(host_agent: Option<&Path>) -> TempDir {
    let dir = TempDir::new("dist");
    for target in TARGETS {
        fs::create_dir_all(dir.join(target)).unwrap();
        for name in BINARIES {
            let path = dir.join(&format!("{target}/{name}"));
            fs::write(
                &path,
                format!("#!/bin/sh\necho \"fake {target} {name}: $*\"\n"),
            )
            .unwrap();
            set_mode(&path, 0o755);
        }
    }
    if let Some(agent) = host_agent {
        fs::copy(agent, dir.join(&format!("{}/stella-agent", host_target()))).unwrap();
    }
    dir
}

/// The dist to install from and run: `cargo xtask dist`'s static musl
/// binaries, or (said loudly) stand-ins with the debug agent for this machine.
fn real_dist(test: &str) -> (PathBuf, String, Option<TempDir>) {
    if let Some(dir) = std::env::var_os("STELLA_DIST_DIR") {
        let dir = PathBuf::from(dir);
        let version = dir.file_name().unwrap().to_string_lossy().into_owned();
        return (dir, version, None);
    }
    skip_or_fail(
        &format!("bundle::{test} (in part)"),
        "STELLA_DIST_DIR is not set (`cargo xtask test` sets it when dist built both musl \
         targets), so the bundle carries the debug agent, not the static one",
    );
    let fake = fake_dist(Some(&bin("stella-agent")));
    (fake.path().to_path_buf(), CURRENT.to_owned(), Some(fake))
}

/// `cargo xtask bundle` from `dist` into `<temp>/stella-bundle`.
fn make_bundle(keys: &Keys, dist: &Path, version: &str, extra: &[&str]) -> (TempDir, PathBuf) {
    let dir = TempDir::new("bundle");
    let out = dir.join("stella-bundle");
    let output = run(Command::new(bin("xtask"))
        .args(["bundle", "--key"])
        .arg(keys.private())
        .arg("--out")
        .arg(&out)
        .arg("--dist")
        .arg(dist)
        .args(["--version", version])
        .args(extra));
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "xtask bundle: {stdout}{stderr}");
    (dir, out)
}

/// `stella-agent install --bundle B --prefix P` with the given agent binary.
fn install(agent: &Path, bundle: &Path, prefix: &Path) -> Output {
    run(Command::new(agent)
        .args(["install", "--bundle"])
        .arg(bundle)
        .arg("--prefix")
        .arg(prefix)
        .env_remove("STELLA_STATE_DIR"))
}

/// The statement in a bundle's envelope, checked with `key`.
fn statement(bundle: &Path, key: &Path) -> Statement {
    let key = PublicKey::from_pem(&fs::read_to_string(key).unwrap()).unwrap();
    let raw = fs::read(bundle.join(release::ENVELOPE_FILE)).unwrap();
    let payload = dsse::verify(&raw, release::PAYLOAD_TYPE, &key).expect("the bundle verifies");
    Statement::from_json(&payload).unwrap()
}

/// Re-signs a bundle with `statement` as it is (no validation: a hostile signer).
fn resign(bundle: &Path, signer: &SigningKey, statement: &Statement) {
    let env = dsse::sign(
        signer,
        release::PAYLOAD_TYPE,
        statement.to_json().as_bytes(),
    );
    fs::write(bundle.join(release::ENVELOPE_FILE), env.to_json()).unwrap();
}

fn flip_a_byte(path: &Path) {
    let mut bytes = fs::read(path).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x01;
    fs::write(path, bytes).unwrap();
}

/// The files of a bundle made with `--server`, `--token` and `--ca`.
fn bundle_files() -> Vec<String> {
    let mut want: Vec<String> = TARGETS
        .iter()
        .flat_map(|t| BINARIES.iter().map(move |b| format!("{t}/{b}")))
        .chain(
            [
                "README.txt",
                "bootstrap.json",
                "ca.pem",
                "install.sh",
                "release-key.pub",
                "release.dsse.json",
            ]
            .map(str::to_owned),
        )
        .collect();
    want.sort();
    want
}

#[test]
fn bundle_round_trip_through_install_sh_then_zero_touch_enrollment() {
    let (dist, version, fake) =
        real_dist("bundle_round_trip_through_install_sh_then_zero_touch_enrollment");
    let server = Server::start();
    let token = server.token(&["--ttl", "10m", "--label", "site=usb"]);
    let keys = Keys::new();
    let ca = server.ca_pem();
    let (tmp, bundle) = make_bundle(
        &keys,
        &dist,
        &version,
        &[
            "--server",
            &server.url,
            "--token",
            &token,
            "--ca",
            ca.to_str().unwrap(),
        ],
    );

    // What the bundle holds, with which modes.
    let files: Vec<String> = tree(&bundle)
        .into_iter()
        .filter(|f| !f.ends_with('/'))
        .collect();
    assert_eq!(files, bundle_files());
    for target in TARGETS {
        for name in BINARIES {
            let file = bundle.join(target).join(name);
            assert_eq!(mode(&file), 0o755, "{}", file.display());
            assert_eq!(sha256(&file), sha256(&dist.join(target).join(name)));
        }
    }
    assert_eq!(mode(&bundle.join("install.sh")), 0o755);
    assert_eq!(mode(&bundle.join("bootstrap.json")), 0o600);
    assert_eq!(mode(&bundle.join("release-key.pub")), 0o644);
    assert_eq!(
        fs::read(bundle.join("release-key.pub")).unwrap(),
        fs::read(keys.public()).unwrap()
    );
    assert_eq!(
        fs::read(bundle.join("ca.pem")).unwrap(),
        fs::read(&ca).unwrap()
    );
    let boot = fs::read_to_string(bundle.join("bootstrap.json")).unwrap();
    assert_eq!(
        boot.trim(),
        format!(
            r#"{{"server":"{}","token":"{token}","ca_hash":"{}"}}"#,
            server.url, server.pin
        )
    );
    let readme = fs::read_to_string(bundle.join("README.txt")).unwrap();
    assert!(
        readme.contains("install.sh") && readme.contains(&version),
        "{readme}"
    );
    // Signed over every other file, as the release version.
    let signed = statement(&bundle, &keys.public());
    assert_eq!(signed.predicate.version, version);
    let mut names: Vec<String> = signed.subject.iter().map(|s| s.name.clone()).collect();
    names.sort();
    let mut others = bundle_files();
    others.retain(|f| f != release::ENVELOPE_FILE);
    assert_eq!(names, others);

    // The tar holds the same files under one directory.
    let tar = tmp.join("stella-bundle.tar");
    let out = tool("tar", &["-tf", tar.to_str().unwrap()]);
    let mut listed: Vec<String> = text(&out)
        .0
        .lines()
        .filter(|l| !l.ends_with('/'))
        .map(|l| l.strip_prefix("stella-bundle/").expect(l).to_owned())
        .collect();
    listed.sort();
    assert_eq!(listed, bundle_files());

    // Install from the extracted tar, as from a USB stick.
    let usb = TempDir::new("usb");
    let out = tool(
        "tar",
        &[
            "-xf",
            tar.to_str().unwrap(),
            "-C",
            usb.path().to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{:?}", text(&out));
    let media = usb.join("stella-bundle");
    let script = media.join("install.sh");
    let out = tool("sh", &["-n", script.to_str().unwrap()]);
    assert!(out.status.success(), "sh -n install.sh: {:?}", text(&out));
    if on_path("shellcheck") {
        let out = tool("shellcheck", &["-s", "sh", script.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "shellcheck install.sh: {:?}",
            text(&out)
        );
    } else {
        skip_or_fail(
            "bundle (in part)",
            "shellcheck is not installed, so install.sh is not linted (.ci/deps installs it)",
        );
    }
    let root = TempDir::new("root");
    let out = run(Command::new("sh")
        .arg(&script)
        .arg("--prefix")
        .arg(root.path())
        .env_remove("STELLA_STATE_DIR"));
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "install.sh: {stdout}{stderr}");
    assert!(stdout.contains("taken from the bundle"), "{stdout}");
    assert!(
        stdout.contains("systemctl daemon-reload && systemctl enable --now stella-agent"),
        "{stdout}"
    );

    // The binary for this machine, atomically in place, with the signed digest.
    let binary = root.join(BIN);
    assert_eq!(mode(&binary), 0o755);
    let want = sha256(&dist.join(host_target()).join("stella-agent"));
    assert_eq!(sha256(&binary), want);
    assert_eq!(
        tree(&root.join("usr/local/bin")),
        ["stella-agent"],
        "no temp file is left"
    );
    // The unit names the real paths.
    let unit_path = root.join(UNIT);
    assert_eq!(mode(&unit_path), 0o644);
    let unit = fs::read_to_string(&unit_path).unwrap();
    for line in [
        "ExecStart=/usr/local/bin/stella-agent run --state-dir /var/lib/stella-agent",
        "Restart=always",
        "RestartPreventExitStatus=3",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line} missing:\n{unit}");
    }
    // The state dir with the key, the CA and the token.
    let state = root.join(STATE);
    assert_eq!(mode(&state), 0o700);
    assert_eq!(
        tree(&state),
        ["bootstrap.json", "ca.pem", "release-key.pub", "state.json"]
    );
    assert_eq!(
        fs::read(state.join("release-key.pub")).unwrap(),
        fs::read(keys.public()).unwrap()
    );
    assert_eq!(mode(&state.join("release-key.pub")), 0o644);
    assert_eq!(
        fs::read(state.join("ca.pem")).unwrap(),
        fs::read(&ca).unwrap()
    );
    assert_eq!(mode(&state.join("bootstrap.json")), 0o600);
    assert_eq!(
        fs::read_to_string(state.join("bootstrap.json")).unwrap(),
        boot
    );
    let saved = fs::read_to_string(state.join("state.json")).unwrap();
    assert!(
        saved.contains(&format!("\"binary_sha256\":\"{want}\"")),
        "{saved}"
    );

    // Again: now the key pinned on the host is the one that counts.
    let out = run(Command::new("sh")
        .arg(&script)
        .arg("--prefix")
        .arg(root.path())
        .env_remove("STELLA_STATE_DIR"));
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "install.sh again: {stdout}{stderr}");
    assert!(stdout.contains("pinned on this host"), "{stdout}");

    // Zero-touch: the installed binary enrolls with bootstrap.json, deletes
    // it, and heartbeats.
    let mut proc = Proc::spawn(
        {
            let mut cmd = Command::new(&binary);
            cmd.args(["run", "--state-dir"]).arg(&state);
            cmd
        },
        tmp.join("agent.log"),
    );
    let view = poll(DEADLINE, || {
        server.agents().into_iter().find(|a| a.heartbeat_seq >= 1)
    })
    .unwrap_or_else(|| {
        panic!(
            "the installed agent never heartbeat; agent log:\n{}\nserver log:\n{}",
            proc.log_text(),
            server.proc.log_text()
        )
    });
    assert_eq!(view.status, "active");
    assert_eq!(view.version, version);
    assert_eq!(view.labels.get("site").map(String::as_str), Some("usb"));
    if fake.is_none() {
        assert_eq!(view.target, host_target());
    }
    assert!(
        !state.join("bootstrap.json").exists(),
        "the token stays on disk"
    );
    assert!(state.join("agent.json").is_file());
    assert!(
        proc.log_text().contains("bootstrap.json deleted"),
        "{}",
        proc.log_text()
    );
    // doctor's integrity check matches the binary with what install recorded.
    let out = run(Command::new(&binary)
        .args(["doctor", "--json", "--state-dir"])
        .arg(&state));
    let (stdout, _) = text(&out);
    assert!(
        stella_tests::doctor_codes(&stella_tests::json(&stdout))
            .contains(&"update.integrity/ok".to_owned()),
        "{stdout}"
    );
    proc.kill();

    // A bootstrap.json left behind (a crash right after enrolling) is
    // deleted at the next start of an enrolled agent.
    fs::write(state.join("bootstrap.json"), &boot).unwrap();
    let mut proc = Proc::spawn(
        {
            let mut cmd = Command::new(&binary);
            cmd.args(["run", "--state-dir"]).arg(&state);
            cmd
        },
        tmp.join("agent-again.log"),
    );
    let gone = poll(DEADLINE, || {
        (!state.join("bootstrap.json").exists()).then_some(())
    });
    assert!(gone.is_some(), "{}", proc.log_text());
    assert_eq!(server.agents().len(), 1, "it did not enroll again");
    proc.kill();
}

#[test]
fn zero_touch_with_a_used_token_keeps_bootstrap_json_and_exits_1() {
    let server = Server::start();
    let token = server.token(&["--ttl", "10m"]);
    let keys = Keys::new();
    let dist = fake_dist(None);
    let ca = server.ca_pem();
    let (_tmp, bundle) = make_bundle(
        &keys,
        dist.path(),
        CURRENT,
        &[
            "--server",
            &server.url,
            "--token",
            &token,
            "--ca",
            ca.to_str().unwrap(),
        ],
    );
    // Someone else spent the one-time token first.
    let other = AgentDir::new();
    let out = other.bootstrap(&server, &token, &["--name", "first"]);
    assert!(out.status.success(), "{:?}", text(&out));

    let root = TempDir::new("root");
    let out = install(&bin("stella-agent"), &bundle, root.path());
    assert!(out.status.success(), "install: {:?}", text(&out));
    let state = root.join(STATE);
    let out = run(Command::new(bin("stella-agent"))
        .args(["run", "--state-dir"])
        .arg(&state));
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("stella-agent: "))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    for needle in [
        "zero-touch enrollment with",
        "bootstrap.json",
        "no uses left",
        "kept",
    ] {
        assert!(line.contains(needle), "{needle:?} not in {line}");
    }
    assert!(
        state.join("bootstrap.json").is_file(),
        "bootstrap.json was deleted"
    );
    assert!(!state.join("agent.json").exists());
    assert_eq!(server.agents().len(), 1, "only the first agent enrolled");
}

#[test]
fn install_sh_picks_the_agent_for_uname_m_and_refuses_other_architectures() {
    let keys = Keys::new();
    let dist = fake_dist(None);
    let (_tmp, bundle) = make_bundle(&keys, dist.path(), CURRENT, &[]);
    let canonical = fs::canonicalize(&bundle).unwrap();
    let shim = TempDir::new("shim");
    let path = format!(
        "{}:{}",
        shim.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let fake_uname = |machine: &str| {
        let file = shim.join("uname");
        fs::write(
            &file,
            format!("#!/bin/sh\ncase \"$1\" in -s) echo Linux ;; *) echo {machine} ;; esac\n"),
        )
        .unwrap();
        set_mode(&file, 0o755);
    };
    let install_sh = |root: &Path| {
        run(Command::new("sh")
            .arg(bundle.join("install.sh"))
            .arg("--prefix")
            .arg(root)
            .env("PATH", &path))
    };
    for (machine, target) in [
        ("x86_64", X86),
        ("amd64", X86),
        ("aarch64", ARM),
        ("arm64", ARM),
    ] {
        fake_uname(machine);
        let root = TempDir::new("root");
        let out = install_sh(root.path());
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{machine}: {stdout}{stderr}");
        // The stand-in agent prints what it was asked: the arguments pass through.
        assert_eq!(
            stdout.trim(),
            format!(
                "fake {target} stella-agent: install --bundle {} --prefix {}",
                canonical.display(),
                root.path().display()
            ),
            "{machine}"
        );
    }
    for machine in ["sparc64", "armv7l"] {
        fake_uname(machine);
        let root = TempDir::new("root");
        let out = install_sh(root.path());
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{machine}: {stdout}{stderr}");
        assert!(
            stderr.contains(&format!("unsupported architecture \"{machine}\"")),
            "{stderr}"
        );
        assert!(tree(root.path()).is_empty());
    }
}

#[test]
fn tampered_bundles_are_refused_before_anything_is_written() {
    let keys = Keys::new();
    let dist = fake_dist(None);
    let (_tmp, pristine) = make_bundle(&keys, dist.path(), CURRENT, &[]);
    let signer = SigningKey::from_pem(&fs::read_to_string(keys.private()).unwrap()).unwrap();
    let signed = statement(&pristine, &keys.public());
    let agent = format!("{}/stella-agent", host_target());

    // The untouched bundle installs (the refusals below are not for nothing).
    let root = TempDir::new("root");
    let out = install(&bin("stella-agent"), &pristine, root.path());
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(sha256(&root.join(BIN)), sha256(&pristine.join(&agent)));

    let with_subject = |name: &str, bytes: &[u8]| {
        let mut s = signed.clone();
        s.subject
            .push(Subject::new(name, &stella_proto::hash::sha256(bytes)));
        s
    };
    type Tamper<'a> = Box<dyn Fn(&Path) + 'a>;
    let cases: Vec<(&str, Tamper, String)> = vec![
        (
            "a byte of this machine's agent",
            Box::new(|b: &Path| flip_a_byte(&b.join(&agent))),
            format!("{agent} has sha256"),
        ),
        (
            "a byte of README.txt",
            Box::new(|b: &Path| flip_a_byte(&b.join("README.txt"))),
            "README.txt has sha256".into(),
        ),
        (
            "a byte of the other target's server",
            Box::new(|b: &Path| flip_a_byte(&b.join(ARM).join("stella-server"))),
            format!("{ARM}/stella-server has sha256"),
        ),
        (
            "a missing file",
            Box::new(|b: &Path| fs::remove_file(b.join(X86).join("stella-server")).unwrap()),
            format!("{X86}/stella-server is missing"),
        ),
        (
            "an extra file",
            Box::new(|b: &Path| fs::write(b.join("extra.sh"), "#!/bin/sh\n").unwrap()),
            "extra.sh is not named in release.dsse.json".into(),
        ),
        (
            "an extra file in a target dir",
            Box::new(|b: &Path| fs::write(b.join(X86).join("stella-helper"), "x").unwrap()),
            format!("{X86}/stella-helper is not named in release.dsse.json"),
        ),
        (
            "a symlink in place of a signed file",
            Box::new(|b: &Path| {
                let real = b.parent().unwrap().join("README.real");
                fs::rename(b.join("README.txt"), &real).unwrap();
                std::os::unix::fs::symlink(&real, b.join("README.txt")).unwrap();
            }),
            "README.txt is a symlink".into(),
        ),
        (
            "a statement naming ../evil",
            Box::new(|b: &Path| {
                fs::write(b.parent().unwrap().join("evil"), "evil").unwrap();
                resign(b, &signer, &with_subject("../evil", b"evil"));
            }),
            "subject name \"../evil\" is unsafe".into(),
        ),
        (
            "a statement naming /etc/passwd",
            Box::new(|b: &Path| {
                let passwd = fs::read("/etc/passwd").unwrap_or_default();
                resign(b, &signer, &with_subject("/etc/passwd", &passwd));
            }),
            "subject name \"/etc/passwd\" is unsafe".into(),
        ),
        (
            "a signature that does not verify",
            Box::new(|b: &Path| {
                let mut s = signed.clone();
                s.predicate.version = "9.9.9".into();
                let good = dsse::sign(&signer, release::PAYLOAD_TYPE, s.to_json().as_bytes());
                let mut env =
                    dsse::sign(&signer, release::PAYLOAD_TYPE, signed.to_json().as_bytes());
                // The payload of one, the signature of the other.
                env.signatures = good.signatures;
                fs::write(b.join(release::ENVELOPE_FILE), env.to_json()).unwrap();
            }),
            "release.dsse.json: no signature verifies".into(),
        ),
        (
            "no envelope",
            Box::new(|b: &Path| fs::remove_file(b.join(release::ENVELOPE_FILE)).unwrap()),
            "release.dsse.json is missing".into(),
        ),
    ];
    for (what, tamper, needle) in cases {
        let case = TempDir::new("tampered");
        let bundle = case.join("stella-bundle");
        copy_tree(&pristine, &bundle);
        tamper(&bundle);
        let root = TempDir::new("root");
        let out = install(&bin("stella-agent"), &bundle, root.path());
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{what}: {stdout}{stderr}");
        assert!(
            stderr.contains(&needle),
            "{what}: {needle:?} not in {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{what}: one line: {stderr}");
        assert!(
            stderr.contains(&bundle.display().to_string()),
            "{what}: {stderr}"
        );
        assert!(
            tree(root.path()).is_empty(),
            "{what}: written: {:?}",
            tree(root.path())
        );
    }
}

#[test]
fn a_bundle_signed_with_another_key_is_refused_where_a_key_is_pinned() {
    let pinned = Keys::new();
    let other = Keys::new();
    let dist = fake_dist(None);
    let root = TempDir::new("root");
    let state = root.join(STATE);
    fs::create_dir_all(&state).unwrap();
    set_mode(&state, 0o700);
    fs::copy(pinned.public(), state.join("release-key.pub")).unwrap();
    let before = snapshot(root.path());

    // Signed with another key, carrying that key: refused, nothing changed.
    let (_tmp, bundle) = make_bundle(&other, dist.path(), CURRENT, &[]);
    let out = install(&bin("stella-agent"), &bundle, root.path());
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    for needle in [
        "release.dsse.json: no signature verifies",
        "pinned at",
        &state.join("release-key.pub").display().to_string(),
    ] {
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    }
    assert_eq!(snapshot(root.path()), before, "the host changed");

    // Signed with the pinned key: installs, and the pinned key stays.
    let (_tmp2, good) = make_bundle(&pinned, dist.path(), CURRENT, &[]);
    let out = install(&bin("stella-agent"), &good, root.path());
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("pinned on this host"), "{stdout}");
    assert_eq!(
        fs::read(state.join("release-key.pub")).unwrap(),
        fs::read(pinned.public()).unwrap()
    );
}

#[test]
fn the_bundle_imports_into_an_offline_server() {
    let server = Server::start();
    let keys = Keys::new();
    let dist = fake_dist(None);
    let ca = server.ca_pem();
    let (_tmp, bundle) = make_bundle(&keys, dist.path(), "3.1.4", &["--ca", ca.to_str().unwrap()]);
    let out = server.admin(&["release", "import", bundle.to_str().unwrap()]);
    assert!(out.status.success(), "import: {:?}", text(&out));
    let listed = server.admin_ok(&["release", "list"]);
    for needle in [
        "3.1.4",
        "x86_64-unknown-linux-musl/stella-agent",
        "aarch64-unknown-linux-musl/stella-agent",
        "x86_64-unknown-linux-musl/stella-server",
        "install.sh",
        "release-key.pub",
    ] {
        assert!(listed.contains(needle), "{needle} not in {listed}");
    }

    // A non-empty output dir is refused: its leftovers would be signed.
    let out = run(Command::new(bin("xtask"))
        .args(["bundle", "--key"])
        .arg(keys.private())
        .arg("--out")
        .arg(&bundle)
        .arg("--dist")
        .arg(dist.path()));
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(stderr.contains("is not empty"), "{stderr}");
}
