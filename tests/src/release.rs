//! Release helpers for the end-to-end tests: offline keys made with `cargo
//! xtask keygen`, release dirs signed with `cargo xtask sign`, importing and
//! offering them through the real server CLI.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{AgentDir, Server, TempDir, bin, run, text};

/// The version the second agent build reports (`cargo xtask test` makes it).
pub const NEXT: &str = "0.2.0";

/// The target triple of the debug test binaries (native builds).
pub fn native_target() -> &'static str {
    if cfg!(target_arch = "aarch64") {
        "aarch64-unknown-linux-gnu"
    } else {
        "x86_64-unknown-linux-gnu"
    }
}

/// Hex SHA-256 of a file (by `sha256sum`, independent of our code).
pub fn sha256(path: &Path) -> String {
    let out = crate::tool("sha256sum", &[path.to_str().unwrap_or_default()]);
    text(&out)
        .0
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// An offline release key pair made with `cargo xtask keygen`.
#[derive(Debug)]
pub struct Keys {
    dir: TempDir,
}

impl Default for Keys {
    fn default() -> Self {
        Self::new()
    }
}

impl Keys {
    pub fn new() -> Self {
        let dir = TempDir::new("keys");
        let out = run(Command::new(bin("xtask"))
            .args(["keygen", "--out"])
            .arg(dir.path()));
        assert!(out.status.success(), "keygen: {:?}", text(&out));
        Self { dir }
    }

    pub fn public(&self) -> PathBuf {
        self.dir.join("release.pub")
    }

    pub fn private(&self) -> PathBuf {
        self.dir.join("release.key")
    }
}

/// A release dir with `binary` as the native target's agent, signed with
/// `keys` (`extra`: more `xtask sign` arguments).
pub fn signed_release(keys: &Keys, version: &str, binary: &Path, extra: &[&str]) -> TempDir {
    let dir = TempDir::new("release");
    let agent = dir.join(&format!("{}/stella-agent", native_target()));
    fs::create_dir_all(agent.parent().expect("parent")).expect("release dir");
    fs::copy(binary, &agent).expect("copy the release binary");
    let mut cmd = Command::new(bin("xtask"));
    cmd.args(["sign", "--key"])
        .arg(keys.private())
        .args(["--version", version])
        .args(extra)
        .arg(dir.path());
    let out = run(&mut cmd);
    assert!(out.status.success(), "sign: {:?}", text(&out));
    dir
}

/// `stella-server release import DIR`, which must succeed.
pub fn import(server: &Server, dir: &TempDir) {
    let out = server.admin(&["release", "import", dir.path().to_str().unwrap_or_default()]);
    assert!(out.status.success(), "import: {:?}", text(&out));
}

/// Enrolls `agent` with a new token made with `token_args`, named `name`,
/// pinning the release key of `keys`; returns its id.
pub fn enroll_pinning(
    agent: &AgentDir,
    server: &Server,
    keys: &Keys,
    token_args: &[&str],
    name: &str,
) -> String {
    let token = server.token(token_args);
    let key = keys.public();
    let flags = ["--name", name, "--release-key", key.to_str().unwrap()];
    let out = agent.bootstrap(server, &token, &flags);
    assert!(out.status.success(), "{:?}", text(&out));
    text(&out).0.trim().to_owned()
}

/// A new installed agent (one that can swap its binary), labelled
/// `env=ENV`, enrolled pinning `keys`.
pub fn enroll_installed(server: &Server, keys: &Keys, env: &str, name: &str) -> (AgentDir, String) {
    let agent = AgentDir::installed(&bin("stella-agent"));
    let label = format!("env={env}");
    let id = enroll_pinning(&agent, server, keys, &["--label", &label], name);
    (agent, id)
}
