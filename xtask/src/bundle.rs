//! `cargo xtask bundle` (docs/design.md section 10): the USB bundle for offline
//! hosts. A release directory (both musl targets' agent and server from
//! `dist`), plus `release-key.pub`, `ca.pem` and `bootstrap.json` when asked
//! for, `install.sh` and `README.txt`, all signed into `release.dsse.json` by
//! `sign`; then `DIR.tar`. `stella-server release import DIR` takes it as is.

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use lexopt::Arg;
use stella_proto::RegistrationToken;
use stella_proto::dsse::SigningKey;
use stella_proto::release::Version;

use crate::args::{Args, Usage};
use crate::{dist, run, sign};

/// The targets a bundle carries; `install.sh` maps `uname -m` onto them.
const TARGETS: [&str; 2] = ["x86_64-unknown-linux-musl", "aarch64-unknown-linux-musl"];
/// The binaries of each target.
const BINARIES: [&str; 2] = ["stella-agent", "stella-server"];

/// The bundle's installer (POSIX sh), kept as a file so shellcheck can read it.
const INSTALL_SH: &str = include_str!("bundle/install.sh");

/// `cargo xtask bundle` options.
#[derive(Debug, Default)]
pub(crate) struct Options {
    key: PathBuf,
    out: PathBuf,
    version: Option<String>,
    server: Option<String>,
    token: Option<String>,
    ca: Option<PathBuf>,
    /// Prebuilt `dist/<version>` to take the binaries from instead of running dist.
    dist: Option<PathBuf>,
}

impl Options {
    /// Parses `--key KEY --out DIR [--version V] [--server URL --token T]
    /// [--ca FILE] [--dist DIR]`.
    pub(crate) fn parse<I>(args: I) -> Result<Self, Usage>
    where
        I: IntoIterator,
        I::Item: Into<OsString>,
    {
        const CMD: &str = "bundle";
        let (mut key, mut out) = (None, None);
        let mut opts = Self::default();
        let mut args = Args::new(CMD, args);
        // Every option takes a value, and an empty one is as good as none.
        fn value(args: &mut Args, flag: &str) -> Result<String, Usage> {
            let value = args.string(flag)?;
            if value.is_empty() {
                return Err(Usage::Wrong(format!("{CMD}: {flag} needs a value")));
            }
            Ok(value)
        }
        while let Some(arg) = args.next()? {
            match arg {
                Arg::Long("key") => key = Some(PathBuf::from(value(&mut args, "--key")?)),
                Arg::Long("out") => out = Some(PathBuf::from(value(&mut args, "--out")?)),
                Arg::Long("version") => opts.version = Some(value(&mut args, "--version")?),
                Arg::Long("server") => opts.server = Some(value(&mut args, "--server")?),
                Arg::Long("token") => opts.token = Some(value(&mut args, "--token")?),
                Arg::Long("ca") => opts.ca = Some(PathBuf::from(value(&mut args, "--ca")?)),
                Arg::Long("dist") => opts.dist = Some(PathBuf::from(value(&mut args, "--dist")?)),
                other => return Err(Usage::unexpected(CMD, other)),
            }
        }
        opts.key = key.ok_or("bundle: --key KEY (the offline release key) is required")?;
        opts.out = out.ok_or("bundle: --out DIR is required")?;
        if let Some(v) = &opts.version {
            Version::parse(v).map_err(|e| format!("bundle: --version: {e}"))?;
        }
        match (&opts.server, &opts.token, &opts.ca) {
            (None, None, _) => {}
            (Some(_), Some(_), Some(_)) => {}
            (Some(_), Some(_), None) => {
                return Err(
                    "bundle: bootstrap.json needs --ca FILE too, so the agent can trust the server"
                        .into(),
                );
            }
            _ => return Err("bundle: --server and --token go together".into()),
        }
        if let Some(server) = &opts.server {
            let ok = server.starts_with("https://")
                && server.len() > "https://".len()
                && !server
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\\'));
            if !ok {
                return Err(Usage::Wrong(format!(
                    "bundle: --server {server:?} must be an https:// URL"
                )));
            }
        }
        if let Some(token) = &opts.token {
            RegistrationToken::parse(token).map_err(|e| format!("bundle: --token: {e}"))?;
        }
        Ok(opts)
    }
}

/// Makes the bundle directory and its tar file.
pub(crate) fn bundle(opts: &Options) -> Result<(), String> {
    let key_pem = fs::read_to_string(&opts.key)
        .map_err(|e| format!("bundle: cannot read key {}: {e}", opts.key.display()))?;
    let public = SigningKey::from_pem(&key_pem)
        .map_err(|e| format!("bundle: key {}: {e}", opts.key.display()))?
        .public_key();
    let ca = match &opts.ca {
        Some(path) => {
            let pem = fs::read_to_string(path)
                .map_err(|e| format!("bundle: cannot read --ca {}: {e}", path.display()))?;
            let pin = ca_pin(&pem).map_err(|e| format!("bundle: --ca {}: {e}", path.display()))?;
            Some((pem, pin))
        }
        None => None,
    };
    let version = dist::version(opts.version.as_deref())?;
    Version::parse(&version).map_err(|e| format!("bundle: {e}"))?;
    let dist_dir = match &opts.dist {
        Some(dir) => dir.clone(),
        None => build_dist(&version)?,
    };
    for target in TARGETS {
        for name in BINARIES {
            let path = dist_dir.join(target).join(name);
            if !path.is_file() {
                return Err(format!(
                    "bundle: {} is missing: a bundle needs both targets' binaries",
                    path.display()
                ));
            }
        }
    }

    let out = &opts.out;
    let created = create_empty_dir(out)?;
    let result = fill(opts, out, &dist_dir, &version, &public, ca.as_ref())
        .and_then(|()| sign_dir(opts, out, &version))
        .and_then(|()| make_tar(out));
    match result {
        Ok(tar) => {
            println!(
                "bundle {} (release {version}, release key {}) and {}",
                out.display(),
                public.fingerprint(),
                tar.display()
            );
            Ok(())
        }
        Err(e) => {
            // Leave no half-made bundle that looks usable.
            if created {
                let _ = fs::remove_dir_all(out);
            }
            Err(e)
        }
    }
}

/// Runs `dist` for the version (cargo only rebuilds what changed) and
/// returns its directory; a bundle needs every target.
fn build_dist(version: &str) -> Result<PathBuf, String> {
    let built = dist::build(&dist::Options::for_version(version))?;
    if let Some((target, reason)) = built.skipped.first() {
        return Err(format!(
            "bundle: dist could not build {target}: {reason}; a bundle needs both targets"
        ));
    }
    Ok(built.dir)
}

/// Creates `dir`, or accepts an empty existing one; `true` if we created it.
fn create_empty_dir(dir: &Path) -> Result<bool, String> {
    match fs::create_dir_all(
        dir.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new(".")),
    ) {
        Ok(()) => {}
        Err(e) => return Err(format!("bundle: cannot create {}: {e}", dir.display())),
    }
    match fs::create_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let empty = fs::read_dir(dir)
                .map_err(|e| format!("bundle: cannot read {}: {e}", dir.display()))?
                .next()
                .is_none();
            if empty {
                Ok(false)
            } else {
                // Everything in it would be signed into the release.
                Err(format!(
                    "bundle: {} exists and is not empty; remove it or choose another --out",
                    dir.display()
                ))
            }
        }
        Err(e) => Err(format!("bundle: cannot create {}: {e}", dir.display())),
    }
}

fn write(path: &Path, contents: &[u8], mode: u32) -> Result<(), String> {
    sign::write_atomic(path, contents, mode, sign::WriteMode::New)
        .map_err(|e| format!("bundle: {e}"))
}

/// Copies the binaries and writes the other files of the bundle.
fn fill(
    opts: &Options,
    out: &Path,
    dist_dir: &Path,
    version: &str,
    public: &stella_proto::dsse::PublicKey,
    ca: Option<&(String, String)>,
) -> Result<(), String> {
    for target in TARGETS {
        let dir = out.join(target);
        fs::create_dir(&dir)
            .map_err(|e| format!("bundle: cannot create {}: {e}", dir.display()))?;
        for name in BINARIES {
            let from = dist_dir.join(target).join(name);
            let to = dir.join(name);
            fs::copy(&from, &to)
                .and_then(|_| fs::set_permissions(&to, fs::Permissions::from_mode(0o755)))
                .map_err(|e| format!("bundle: cannot copy {}: {e}", from.display()))?;
        }
    }
    write(
        &out.join("release-key.pub"),
        public.to_pem().as_bytes(),
        0o644,
    )?;
    if let Some((pem, pin)) = ca {
        write(&out.join("ca.pem"), pem.as_bytes(), 0o644)?;
        if let (Some(server), Some(token)) = (&opts.server, &opts.token) {
            // The token is a secret: only the owner reads it.
            let json = format!(
                "{{\"server\":{},\"token\":{},\"ca_hash\":{}}}\n",
                json_string(server.trim_end_matches('/')),
                json_string(token),
                json_string(pin)
            );
            write(&out.join("bootstrap.json"), json.as_bytes(), 0o600)?;
        }
    }
    write(&out.join("install.sh"), INSTALL_SH.as_bytes(), 0o755)?;
    let readme = readme(
        version,
        &public.fingerprint(),
        ca.is_some(),
        opts.token.is_some(),
    );
    write(&out.join("README.txt"), readme.as_bytes(), 0o644)
}

/// Signs every file of the bundle with `sign`, as any release directory.
fn sign_dir(opts: &Options, out: &Path, version: &str) -> Result<(), String> {
    sign::sign(&sign::Options::new(&opts.key, version, out))
}

/// `tar` of the bundle next to it (`DIR.tar`, one top-level directory).
fn make_tar(out: &Path) -> Result<PathBuf, String> {
    let name = out
        .file_name()
        .ok_or_else(|| format!("bundle: {} has no file name", out.display()))?;
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tar_name = name.to_owned();
    tar_name.push(".tar");
    let tar = parent.join(&tar_name);
    let mut tmp_name = tar_name.clone();
    tmp_name.push(".tmp");
    let tmp = parent.join(tmp_name);
    let _ = fs::remove_file(&tmp);
    // GNU tar (every Debian has it): stable order, no builder's user names.
    let made = run(Command::new("tar")
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "-cf",
        ])
        .arg(&tmp)
        .arg("-C")
        .arg(parent)
        .arg(name))
    .and_then(|()| {
        fs::rename(&tmp, &tar).map_err(|e| format!("cannot rename {}: {e}", tmp.display()))
    });
    if let Err(e) = made {
        let _ = fs::remove_file(&tmp);
        return Err(format!("bundle: {e}"));
    }
    Ok(tar)
}

/// A JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn readme(version: &str, fingerprint: &str, ca: bool, bootstrap: bool) -> String {
    let mut files = String::from(
        "  install.sh                    the installer: picks the agent for `uname -m`\n\
         \x20 x86_64-unknown-linux-musl/    static stella-agent and stella-server for x86_64\n\
         \x20 aarch64-unknown-linux-musl/   the same for aarch64 (ARM64)\n\
         \x20 release-key.pub               the offline release key's public half\n",
    );
    if ca {
        files.push_str("  ca.pem                        the CA certificate of the Stella server\n");
    }
    if bootstrap {
        files.push_str(
            "  bootstrap.json                server URL and a registration token: a SECRET\n",
        );
    }
    files.push_str("  release.dsse.json             the signature over every other file\n");
    let enroll = if bootstrap {
        "With bootstrap.json the agent enrolls itself on its first start and then\n\
         deletes the token from the host."
    } else {
        "Then enroll it: stella-agent bootstrap --server URL --token T \\\n\
         \x20   --ca-file /var/lib/stella-agent/ca.pem (or --ca-hash sha256:...)"
    };
    format!(
        "Stella offline bundle, release {version}\n\
         \n\
         {files}\n\
         Install the agent (as root):\n\
         \n\
         \x20 sh /path/to/this/bundle/install.sh\n\
         \n\
         Before it writes anything, stella-agent install checks release.dsse.json:\n\
         with the release key already pinned on the host if there is one, else with\n\
         this bundle's release-key.pub, whose fingerprint is\n\
         \n\
         \x20 {fingerprint}\n\
         \n\
         (compare it with the one you were given). Any changed, missing or extra\n\
         file is refused. It then installs /usr/local/bin/stella-agent,\n\
         /etc/systemd/system/stella-agent.service and the state dir\n\
         /var/lib/stella-agent (--prefix DIR installs under DIR instead). Start it:\n\
         \n\
         \x20 systemctl daemon-reload && systemctl enable --now stella-agent\n\
         \n\
         {enroll}\n\
         \n\
         On an offline server, load this release for rollouts with:\n\
         \n\
         \x20 stella-server release import /path/to/this/bundle\n"
    )
}

/// `sha256:HEX` of a PEM CA certificate's SubjectPublicKeyInfo, the pin the
/// agent checks (kubeadm's discovery hash).
fn ca_pin(pem: &str) -> Result<String, String> {
    let der = stella_proto::pem::decode("CERTIFICATE", pem)?;
    spki_of(&der)
        .map(stella_proto::hash::spki_pin)
        .ok_or_else(|| "not a DER X.509 certificate".to_owned())
}

/// One DER TLV at the front of some input: tag, whole TLV, content, rest.
type Tlv<'a> = (u8, &'a [u8], &'a [u8], &'a [u8]);

/// Reads one DER TLV from the front of `input`.
fn take(input: &[u8]) -> Option<Tlv<'_>> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 3 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    let content = rest.get(..len)?;
    let header = input.len() - rest.len();
    Some((tag, &input[..header + len], content, &rest[len..]))
}

/// The SubjectPublicKeyInfo of a certificate: the seventh field of
/// tbsCertificate, after the optional `[0]` version.
fn spki_of(der: &[u8]) -> Option<&[u8]> {
    const SEQUENCE: u8 = 0x30;
    let (SEQUENCE, _, cert, _) = take(der)? else {
        return None;
    };
    let (SEQUENCE, _, tbs, _) = take(cert)? else {
        return None;
    };
    let mut rest = tbs;
    if rest.first() == Some(&0xa0) {
        rest = take(rest)?.3;
    }
    // serial, signature, issuer, validity, subject
    for want in [0x02, SEQUENCE, SEQUENCE, SEQUENCE, SEQUENCE] {
        let (tag, _, _, next) = take(rest)?;
        if tag != want {
            return None;
        }
        rest = next;
    }
    match take(rest)? {
        (SEQUENCE, whole, _, _) => Some(whole),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    const TOKEN: &str = "abc123.0123456789abcdefghijklmnopqrstuv";

    #[test]
    fn parses_the_documented_arguments() {
        let o = Options::parse(args(&[
            "--key",
            "k",
            "--out=b",
            "--server",
            "https://10.0.0.1:8443",
            "--token",
            TOKEN,
            "--ca",
            "ca.pem",
            "--version",
            "1.2.3",
        ]))
        .unwrap();
        assert_eq!(o.key, PathBuf::from("k"));
        assert_eq!(o.out, PathBuf::from("b"));
        assert_eq!(o.version.as_deref(), Some("1.2.3"));
        assert_eq!(o.ca, Some(PathBuf::from("ca.pem")));
        assert!(Options::parse(args(&["--key", "k", "--out", "b", "--ca", "c"])).is_ok());
    }

    #[test]
    fn usage_errors_say_what_is_wrong() {
        let cases: [(&[&str], &str); 8] = [
            (&["--out", "b"], "--key KEY"),
            (&["--key", "k"], "--out DIR"),
            (
                &["--key", "k", "--out", "b", "--token", TOKEN],
                "go together",
            ),
            (
                &[
                    "--key",
                    "k",
                    "--out",
                    "b",
                    "--server",
                    "https://x",
                    "--token",
                    TOKEN,
                ],
                "needs --ca",
            ),
            (
                &[
                    "--key", "k", "--out", "b", "--server", "http://x", "--token", TOKEN, "--ca",
                    "c",
                ],
                "https:// URL",
            ),
            (
                &[
                    "--key",
                    "k",
                    "--out",
                    "b",
                    "--server",
                    "https://x",
                    "--token",
                    "t",
                    "--ca",
                    "c",
                ],
                "malformed token",
            ),
            (
                &["--key", "k", "--out", "b", "--version", "1.0"],
                "--version",
            ),
            (
                &["--key", "k", "--out", "b", "extra"],
                "unexpected argument",
            ),
        ];
        for (list, want) in cases {
            let err = Options::parse(args(list)).unwrap_err().to_string();
            assert!(err.contains(want), "{list:?}: {err}");
        }
    }

    /// DER of a minimal certificate-shaped structure with `spki`.
    fn cert_with(spki: &[u8], with_version: bool) -> Vec<u8> {
        fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
            let mut out = vec![tag];
            if content.len() < 0x80 {
                out.push(content.len() as u8);
            } else {
                out.extend_from_slice(&[0x82, (content.len() >> 8) as u8, content.len() as u8]);
            }
            out.extend_from_slice(content);
            out
        }
        let mut tbs = Vec::new();
        if with_version {
            tbs.extend(tlv(0xa0, &tlv(0x02, &[2])));
        }
        tbs.extend(tlv(0x02, &[1, 2, 3]));
        for _ in 0..4 {
            tbs.extend(tlv(0x30, &[0x05, 0x00]));
        }
        tbs.extend_from_slice(spki);
        let mut cert = tlv(0x30, &tbs);
        cert.extend(tlv(0x30, &[0x05, 0x00]));
        cert.extend(tlv(0x03, &[0; 200]));
        tlv(0x30, &cert)
    }

    #[test]
    fn finds_the_subject_public_key_info() {
        let spki = [0x30, 0x03, 0x02, 0x01, 0x07];
        for with_version in [true, false] {
            let der = cert_with(&spki, with_version);
            assert_eq!(spki_of(&der), Some(&spki[..]));
            let pem = stella_proto::pem::encode("CERTIFICATE", &der);
            assert_eq!(ca_pin(&pem).unwrap(), stella_proto::hash::spki_pin(&spki));
        }
        // Every truncation is refused, never a panic.
        let der = cert_with(&spki, true);
        for len in 0..der.len() {
            assert!(spki_of(&der[..len]).is_none(), "length {len}");
        }
        assert!(ca_pin("not pem").is_err());
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }

    #[test]
    fn the_installer_is_posix_sh() {
        assert!(INSTALL_SH.starts_with("#!/bin/sh\n"));
        let out = Command::new("sh")
            .args(["-n", "-c", INSTALL_SH])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
}
