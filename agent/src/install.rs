//! Air-gapped install from a signed USB bundle (docs/design.md section 10); the
//! bundle's `bootstrap.json` is checked here and used by zero-touch
//! enrollment (`bootstrap::zero_touch`).
//!
//! `stella-agent install --bundle DIR` checks the whole bundle before it
//! writes anything: the DSSE signature with the release key already pinned
//! on the host (else the bundle's own `release-key.pub`), the statement, and
//! that the files are exactly the statement's subjects, regular files with
//! the signed sha256. Then it installs the agent for this machine's
//! architecture (atomically, re-hashed while copied), the systemd unit, and
//! the state dir with the release key, the CA and `bootstrap.json`.
//!
//! `--prefix P` works like `DESTDIR`: every path is written under P, and the
//! unit names the paths as they will be on the target system.

use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use stella_proto::dsse::{Envelope, MAX_ENVELOPE_BYTES, PublicKey};
use stella_proto::release::{ENVELOPE_FILE, PAYLOAD_TYPE, Statement};

use crate::bootstrap::zero_touch::{parse_bootstrap, pin_text};
use crate::error::Error;
use crate::identity;
use crate::state::{BOOTSTRAP_JSON, CA_CERT, RELEASE_KEY, StateDir};

/// Where the agent is installed, on the target system.
const BIN_PATH: &str = "/usr/local/bin/stella-agent";
/// Where the systemd unit is installed, on the target system.
const UNIT_PATH: &str = "/etc/systemd/system/stella-agent.service";
/// Largest bundle file (debug builds are big; release binaries ~2 MiB).
const MAX_FILE_BYTES: u64 = 512 << 20;
/// Largest key, certificate or bootstrap file.
const MAX_SMALL_BYTES: u64 = 64 << 10;
/// Deepest directory nesting a bundle may have.
const MAX_DEPTH: usize = 8;

/// `stella-agent install` arguments.
#[derive(Debug)]
pub(crate) struct InstallOptions {
    pub(crate) bundle: PathBuf,
    /// Root everything is written under (`/` by default).
    pub(crate) prefix: PathBuf,
}

/// `path` (absolute, on the target system) under `prefix`.
fn under(prefix: &Path, path: &Path) -> PathBuf {
    prefix.join(path.strip_prefix("/").unwrap_or(path))
}

/// A bundle that passed every check.
struct Bundle {
    dir: PathBuf,
    version: String,
    files: usize,
    key: PublicKey,
    /// Whether the key is the one pinned on this host (else the bundle's).
    key_pinned: bool,
    /// Subject name of this machine's agent, and its signed sha256.
    agent: String,
    agent_sha256: String,
    /// Verified contents of the files the installer copies into the state dir.
    small: Small,
}

/// The bundle's files that go into the state dir: read once, checked, and
/// written from memory, so what is written is what was verified.
#[derive(Default)]
struct Small {
    key: Option<Vec<u8>>,
    ca: Option<Vec<u8>>,
    bootstrap: Option<Vec<u8>>,
}

impl Small {
    fn slot(&mut self, name: &str) -> Option<&mut Option<Vec<u8>>> {
        match name {
            RELEASE_KEY => Some(&mut self.key),
            CA_CERT => Some(&mut self.ca),
            BOOTSTRAP_JSON => Some(&mut self.bootstrap),
            _ => None,
        }
    }
}

/// A refusal naming the bundle (and, in `msg`, the file).
fn refuse(dir: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("bundle {}: {msg}", dir.display()))
}

/// The bundle's agent for this machine: bundles carry static musl builds,
/// picked by CPU architecture as `install.sh` does with `uname -m`.
fn agent_name() -> String {
    format!("{}-unknown-linux-musl/stella-agent", std::env::consts::ARCH)
}

/// Opens `name` in the bundle as a regular file reached through real
/// directories only (no symlink anywhere), no larger than `cap`.
fn open_regular(dir: &Path, name: &str, cap: u64) -> Result<(File, Metadata), Error> {
    let mut path = dir.to_path_buf();
    let parts: Vec<&str> = name.split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        path.push(part);
        let shown = parts[..=i].join("/");
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let why = if name == ENVELOPE_FILE {
                    "this is not a signed bundle"
                } else {
                    "release.dsse.json names it"
                };
                return Err(refuse(dir, format!("{name} is missing ({why})")));
            }
            Err(e) => return Err(Error::io(format!("cannot read {}", path.display()), e)),
        };
        let last = i + 1 == parts.len();
        if meta.file_type().is_symlink() {
            return Err(refuse(
                dir,
                format!("{shown} is a symlink; a bundle holds only regular files"),
            ));
        }
        if !last && !meta.is_dir() {
            return Err(refuse(dir, format!("{shown} is not a directory")));
        }
        if last {
            if !meta.is_file() {
                return Err(refuse(dir, format!("{name} is not a regular file")));
            }
            if meta.len() > cap {
                return Err(refuse(
                    dir,
                    format!(
                        "{name} is {} bytes, more than the {cap} allowed",
                        meta.len()
                    ),
                ));
            }
            let file = File::open(&path)
                .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
            let opened = file
                .metadata()
                .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
            // Swapped for something else between the check and the open?
            if (opened.dev(), opened.ino()) != (meta.dev(), meta.ino()) {
                return Err(refuse(dir, format!("{name} changed while it was checked")));
            }
            return Ok((file, opened));
        }
    }
    Err(refuse(dir, format!("{name:?} is not a file name")))
}

/// Reads at most `cap` bytes of `name`; more is an error.
fn read_small(dir: &Path, name: &str, cap: u64) -> Result<Vec<u8>, Error> {
    let (file, _) = open_regular(dir, name, cap)?;
    let mut bytes = Vec::new();
    file.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(format!("cannot read {name} in {}", dir.display()), e))?;
    if bytes.len() as u64 > cap {
        return Err(refuse(dir, format!("{name} grew past {cap} bytes")));
    }
    Ok(bytes)
}

/// Streams `input` into `out` (if any), hashing and capping; returns the hex sha256.
fn hash_stream(
    dir: &Path,
    name: &str,
    input: &mut impl Read,
    mut out: Option<&mut File>,
) -> Result<String, Error> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(Error::io(
                    format!("cannot read {name} in {}", dir.display()),
                    e,
                ));
            }
        };
        size += n as u64;
        if size > MAX_FILE_BYTES {
            return Err(refuse(
                dir,
                format!("{name} grew past {MAX_FILE_BYTES} bytes"),
            ));
        }
        ctx.update(&buf[..n]);
        if let Some(out) = out.as_deref_mut() {
            out.write_all(&buf[..n])
                .map_err(|e| Error::io(format!("cannot copy {name}"), e))?;
        }
    }
    Ok(stella_proto::hash::hex(ctx.finish().as_ref()))
}

fn mismatch(dir: &Path, name: &str, found: &str, want: &str) -> Error {
    refuse(
        dir,
        format!(
            "{name} has sha256 {found}, but release.dsse.json says {want}: \
             the file was changed after signing"
        ),
    )
}

/// Refuses any file under `dir` that is not `release.dsse.json` or named
/// by the statement, and any symlink.
fn check_no_extras(
    root: &Path,
    dir: &Path,
    prefix: &str,
    statement: &Statement,
    depth: usize,
) -> Result<(), Error> {
    let entries =
        fs::read_dir(dir).map_err(|e| Error::io(format!("cannot read {}", dir.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("cannot read {}", dir.display()), e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let kind = entry
            .file_type()
            .map_err(|e| Error::io(format!("cannot read {}", entry.path().display()), e))?;
        if kind.is_symlink() {
            return Err(refuse(
                root,
                format!("{rel} is a symlink; a bundle holds only regular files"),
            ));
        }
        if kind.is_dir() {
            if depth >= MAX_DEPTH {
                return Err(refuse(root, format!("{rel} is nested too deep")));
            }
            check_no_extras(root, &entry.path(), &rel, statement, depth + 1)?;
        } else if rel != ENVELOPE_FILE && statement.subject_for(&rel).is_none() {
            return Err(refuse(
                root,
                format!("{rel} is not named in release.dsse.json (an extra file)"),
            ));
        }
    }
    Ok(())
}

/// Checks the whole bundle; reads the pinned key from `state` but writes nothing.
fn verify(dir: &Path, state: &StateDir) -> Result<Bundle, Error> {
    let meta = fs::metadata(dir)
        .map_err(|e| Error::io(format!("cannot open bundle {}", dir.display()), e))?;
    if !meta.is_dir() {
        return Err(refuse(dir, "is not a directory"));
    }
    // The key: the one pinned here wins; a bundle cannot replace it.
    let pinned = state.path(RELEASE_KEY);
    let (key, key_pinned) = match fs::symlink_metadata(&pinned) {
        Ok(_) => {
            let pem = state.read_text(RELEASE_KEY)?;
            let key = PublicKey::from_pem(&pem).map_err(|e| {
                Error::Invalid(format!(
                    "the release key pinned at {}: {e}",
                    pinned.display()
                ))
            })?;
            (key, true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let pem = read_small(dir, RELEASE_KEY, MAX_SMALL_BYTES)?;
            let key = std::str::from_utf8(&pem)
                .map_err(|e| refuse(dir, format!("{RELEASE_KEY} is not text: {e}")))
                .and_then(|t| {
                    PublicKey::from_pem(t).map_err(|e| refuse(dir, format!("{RELEASE_KEY}: {e}")))
                })?;
            (key, false)
        }
        Err(e) => return Err(Error::io(format!("cannot read {}", pinned.display()), e)),
    };
    let source = if key_pinned {
        format!(
            "release key {} pinned at {}",
            key.fingerprint(),
            pinned.display()
        )
    } else {
        format!(
            "release key {} from the bundle's {RELEASE_KEY}",
            key.fingerprint()
        )
    };

    let raw = read_small(dir, ENVELOPE_FILE, MAX_ENVELOPE_BYTES as u64)?;
    let payload = Envelope::from_json(&raw)
        .and_then(|env| env.verify(PAYLOAD_TYPE, &key))
        .map_err(|e| refuse(dir, format!("{ENVELOPE_FILE}: {e} ({source})")))?;
    let statement =
        Statement::from_json(&payload).map_err(|e| refuse(dir, format!("{ENVELOPE_FILE}: {e}")))?;
    let version = statement
        .version()
        .map_err(|e| refuse(dir, format!("{ENVELOPE_FILE}: {e}")))?
        .to_string();

    check_no_extras(dir, dir, "", &statement, 0)?;

    let mut small = Small::default();
    for subject in &statement.subject {
        // validate() made sure every subject has one.
        let want = subject.sha256().unwrap_or_default();
        let name = subject.name.as_str();
        if let Some(slot) = small.slot(name) {
            let bytes = read_small(dir, name, MAX_SMALL_BYTES)?;
            let found = stella_proto::hash::hex(&stella_proto::hash::sha256(&bytes));
            if found != want {
                return Err(mismatch(dir, name, &found, want));
            }
            *slot = Some(bytes);
        } else {
            let (mut file, _) = open_regular(dir, name, MAX_FILE_BYTES)?;
            let found = hash_stream(dir, name, &mut file, None)?;
            if found != want {
                return Err(mismatch(dir, name, &found, want));
            }
        }
    }

    let agent = agent_name();
    let agent_sha256 = statement
        .subject_for(&agent)
        .and_then(|s| s.sha256())
        .ok_or_else(|| {
            refuse(
                dir,
                format!(
                    "it has no {agent}, the agent for this machine ({})",
                    std::env::consts::ARCH
                ),
            )
        })?
        .to_owned();
    if !key_pinned && small.key.is_none() {
        return Err(refuse(
            dir,
            format!("release.dsse.json does not name {RELEASE_KEY}"),
        ));
    }
    let ca_pin = match &small.ca {
        Some(pem) => {
            let der = std::str::from_utf8(pem)
                .map_err(|e| refuse(dir, format!("{CA_CERT} is not text: {e}")))
                .and_then(|t| {
                    identity::cert_der_from_pem(t, CA_CERT).map_err(|e| refuse(dir, e))
                })?;
            Some(identity::ca_pin(&der).map_err(|e| refuse(dir, format!("{CA_CERT}: {e}")))?)
        }
        None => None,
    };
    if let Some(bytes) = &small.bootstrap {
        let boot =
            parse_bootstrap(bytes).map_err(|e| refuse(dir, format!("{BOOTSTRAP_JSON}: {e}")))?;
        let pin = pin_text(&boot.pin);
        if let Some(ca) = &ca_pin
            && *ca != pin
        {
            return Err(refuse(
                dir,
                format!("{BOOTSTRAP_JSON} pins the CA {pin}, but {CA_CERT} is {ca}"),
            ));
        }
    }
    Ok(Bundle {
        dir: dir.to_path_buf(),
        version,
        files: statement.subject.len(),
        key,
        key_pinned,
        agent,
        agent_sha256,
        small,
    })
}

/// Copies the verified agent to `dest` atomically: a temp file in the same
/// directory, hashed while written and compared with the signed digest
/// again (the bundle may be on removable media), fsync, rename, fsync dir.
fn install_binary(bundle: &Bundle, dest: &Path) -> Result<(), Error> {
    let dir = dest.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    let (mut src, _) = open_regular(&bundle.dir, &bundle.agent, MAX_FILE_BYTES)?;
    let tmp = dir.join(".stella-agent.install.tmp");
    let _ = fs::remove_file(&tmp);
    let result = (|| -> Result<(), Error> {
        let fail = |e| Error::io(format!("cannot write {}", tmp.display()), e);
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(&tmp)
            .map_err(fail)?;
        let found = hash_stream(&bundle.dir, &bundle.agent, &mut src, Some(&mut out))?;
        if found != bundle.agent_sha256 {
            return Err(mismatch(
                &bundle.dir,
                &bundle.agent,
                &found,
                &bundle.agent_sha256,
            ));
        }
        // The umask may have taken bits away.
        out.set_permissions(fs::Permissions::from_mode(0o755))
            .and_then(|()| out.sync_all())
            .map_err(fail)?;
        fs::rename(&tmp, dest)
            .and_then(|()| File::open(dir)?.sync_all())
            .map_err(|e| Error::io(format!("cannot install {}", dest.display()), e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The systemd unit as the repository ships it (`packaging/`), naming the
/// default paths.
const UNIT_TEMPLATE: &str = include_str!("../../packaging/stella-agent.service");
/// The unit's start line for the default paths, replaced by the chosen ones.
const DEFAULT_EXEC_START: &str =
    "ExecStart=/usr/local/bin/stella-agent run --state-dir /var/lib/stella-agent\n";

/// The systemd unit; it names the paths of the target system.
fn unit(version: &str, state_dir: &Path) -> String {
    let exec_start = format!(
        "ExecStart={BIN_PATH} run --state-dir {}\n",
        state_dir.display()
    );
    format!(
        "# Installed by `stella-agent install` from a signed bundle (release {version}).\n{}",
        UNIT_TEMPLATE.replacen(DEFAULT_EXEC_START, &exec_start, 1)
    )
}

/// The state dir must be a plain absolute path: the unit names it.
fn check_state_dir(state_dir: &Path) -> Result<(), Error> {
    let ok = state_dir.is_absolute()
        && state_dir.to_str().is_some_and(|s| {
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b'-'))
        })
        && !state_dir
            .components()
            .any(|c| c == std::path::Component::ParentDir);
    if ok {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "install needs an absolute --state-dir of letters, digits and / . _ - \
             (it goes into the systemd unit), not {}",
            state_dir.display()
        )))
    }
}

/// `stella-agent install --bundle DIR [--prefix P]`.
pub(crate) fn install(state_dir: &Path, opts: &InstallOptions) -> Result<(), Error> {
    check_state_dir(state_dir)?;
    let prefix = &opts.prefix;
    let state = StateDir::new(under(prefix, state_dir));
    let bundle = verify(&opts.bundle, &state)?;
    outln!(
        "verified bundle {}: release {}, {} files, signed with release key {} ({})",
        bundle.dir.display(),
        bundle.version,
        bundle.files,
        bundle.key.fingerprint(),
        if bundle.key_pinned {
            "pinned on this host"
        } else {
            "taken from the bundle: compare it with the fingerprint you were given"
        }
    );

    let bin = under(prefix, Path::new(BIN_PATH));
    install_binary(&bundle, &bin)?;
    outln!(
        "installed {} ({}, sha256 {})",
        bin.display(),
        bundle.agent,
        bundle.agent_sha256
    );

    state.create()?;
    let mut wrote = Vec::new();
    if !bundle.key_pinned
        && let Some(pem) = &bundle.small.key
    {
        state.write_atomic(RELEASE_KEY, pem, 0o644)?;
        wrote.push(RELEASE_KEY);
    }
    let enrolled = state.is_enrolled();
    if enrolled {
        outln!(
            "{} is already enrolled: its CA is kept and no bootstrap.json is installed",
            state.root().display()
        );
    } else {
        if let Some(pem) = &bundle.small.ca {
            state.write_atomic(CA_CERT, pem, 0o644)?;
            wrote.push(CA_CERT);
        }
        if let Some(boot) = &bundle.small.bootstrap {
            state.write_atomic(BOOTSTRAP_JSON, boot, 0o600)?;
            wrote.push(BOOTSTRAP_JSON);
        }
    }
    // What `doctor`'s update.integrity check compares the binary with.
    let mut saved = state.state_file();
    saved.binary_sha256 = Some(bundle.agent_sha256.clone());
    state.save_state(&saved)?;
    wrote.push(crate::state::STATE_JSON);
    outln!(
        "state dir {} (0700): {}",
        state.root().display(),
        wrote.join(", ")
    );

    // The unit last: its presence marks a finished install.
    let unit_path = under(prefix, Path::new(UNIT_PATH));
    let unit_dir = unit_path.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(unit_dir)
        .map_err(|e| Error::io(format!("cannot create {}", unit_dir.display()), e))?;
    StateDir::new(unit_dir.to_path_buf()).write_atomic(
        "stella-agent.service",
        unit(&bundle.version, state_dir).as_bytes(),
        0o644,
    )?;
    outln!("installed {}", unit_path.display());
    if prefix != Path::new("/") {
        outln!(
            "(installed under {}: the unit names {BIN_PATH} and {} as they will be on the target system)",
            prefix.display(),
            state_dir.display()
        );
    }
    outln!("start it with: systemctl daemon-reload && systemctl enable --now stella-agent");
    if !enrolled && bundle.small.bootstrap.is_none() {
        outln!(
            "then enroll it: {BIN_PATH} bootstrap --server URL --token T --ca-file {}/{CA_CERT} --state-dir {}",
            state_dir.display(),
            state_dir.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_go_under_the_prefix() {
        assert_eq!(
            under(Path::new("/tmp/p"), Path::new(BIN_PATH)),
            PathBuf::from("/tmp/p/usr/local/bin/stella-agent")
        );
        assert_eq!(
            under(Path::new("/"), Path::new("/var/lib/stella-agent")),
            PathBuf::from("/var/lib/stella-agent")
        );
    }

    #[test]
    fn the_unit_is_the_packaged_one_with_the_paths_filled_in() {
        assert!(UNIT_TEMPLATE.contains(DEFAULT_EXEC_START));
        assert!(DEFAULT_EXEC_START.starts_with(&format!("ExecStart={BIN_PATH} ")));
        let expected = "# Installed by `stella-agent install` from a signed bundle (release 1.2.3).\n\
             [Unit]\n\
             Description=Stella edge agent\n\
             Wants=network-online.target\n\
             After=network-online.target\n\
             \n\
             [Service]\n\
             Type=simple\n\
             ExecStart=/usr/local/bin/stella-agent run --state-dir /srv/stella\n\
             Restart=always\n\
             RestartSec=5\n\
             # Exit code 3: this agent was revoked; restarting cannot help.\n\
             RestartPreventExitStatus=3\n\
             \n\
             [Install]\n\
             WantedBy=multi-user.target\n";
        assert_eq!(unit("1.2.3", Path::new("/srv/stella")), expected);
    }

    #[test]
    fn the_unit_restarts_except_when_revoked() {
        let unit = unit("1.2.3", Path::new("/var/lib/stella-agent"));
        for line in [
            "ExecStart=/usr/local/bin/stella-agent run --state-dir /var/lib/stella-agent",
            "Restart=always",
            "RestartPreventExitStatus=3",
            "WantedBy=multi-user.target",
        ] {
            assert!(unit.lines().any(|l| l == line), "{line} missing:\n{unit}");
        }
    }

    #[test]
    fn state_dirs_must_be_plain_absolute_paths() {
        assert!(check_state_dir(Path::new("/var/lib/stella-agent")).is_ok());
        for bad in [
            "state",
            "/var/lib/a b",
            "/var/../etc",
            "/var/lib/%i",
            "/x\ny",
        ] {
            assert!(check_state_dir(Path::new(bad)).is_err(), "{bad:?}");
        }
    }
}
