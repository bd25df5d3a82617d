//! `cargo xtask sign --key KEY --version V [--allow-downgrade-from V] DIR`
//! (docs/design.md section 5): hashes every file under DIR, signs the in-toto
//! release statement with the offline key, writes `DIR/release.dsse.json`.
//! Also the atomic file write that `keygen` shares.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use lexopt::Arg;
use stella_proto::dsse::{self, SigningKey};
use stella_proto::release::{self, ENVELOPE_FILE, PAYLOAD_TYPE, Statement, Subject, Version};

use crate::args::{Args, Usage};

/// `cargo xtask sign` options.
#[derive(Debug)]
pub(crate) struct Options {
    key: PathBuf,
    version: String,
    allow_downgrade_from: Option<String>,
    dir: PathBuf,
}

impl Options {
    /// Parses `--key KEY --version V [--allow-downgrade-from V] DIR`.
    pub(crate) fn parse<I>(args: I) -> Result<Self, Usage>
    where
        I: IntoIterator,
        I::Item: Into<OsString>,
    {
        const CMD: &str = "sign";
        let (mut key, mut version, mut from, mut dir) = (None, None, None, None);
        let mut args = Args::new(CMD, args);
        while let Some(arg) = args.next()? {
            match arg {
                Arg::Long("key") => key = Some(args.path("--key")?),
                Arg::Long("version") => version = Some(args.string("--version")?),
                Arg::Long("allow-downgrade-from") => {
                    from = Some(args.string("--allow-downgrade-from")?);
                }
                Arg::Value(value) if dir.is_none() => dir = Some(PathBuf::from(value)),
                other => return Err(Usage::unexpected(CMD, other)),
            }
        }
        let key = key.ok_or("sign: --key KEY is required")?;
        let version = version.ok_or("sign: --version V is required")?;
        let dir = dir.ok_or("sign: the release directory DIR is required")?;
        Version::parse(&version).map_err(|e| format!("sign: {e}"))?;
        if let Some(from) = &from {
            release::compare_versions(from, &version).map_err(|e| {
                format!("sign: --allow-downgrade-from {from:?} is not a version ({e})")
            })?;
        }
        Ok(Self {
            key,
            version,
            allow_downgrade_from: from,
            dir,
        })
    }

    /// Signs `dir` with `key` as release `version` (already checked), no
    /// downgrade allowed: what `bundle` asks for.
    pub(crate) fn new(key: &Path, version: &str, dir: &Path) -> Self {
        Self {
            key: key.to_path_buf(),
            version: version.to_owned(),
            allow_downgrade_from: None,
            dir: dir.to_path_buf(),
        }
    }
}

/// Signs the release directory.
pub(crate) fn sign(opts: &Options) -> Result<(), String> {
    let dir = &opts.dir;
    let key = load_key(&opts.key)?;
    refuse_key_inside(&opts.key, dir)?;
    let envelope_path = dir.join(ENVELOPE_FILE);
    // A tmp file left by a crashed run must not be signed as part of the release.
    let _ = fs::remove_file(tmp_path(&envelope_path));

    let mut files = Vec::new();
    walk(dir, "", &mut files)?;
    if files.is_empty() {
        return Err(format!("sign: {} holds no files to sign", dir.display()));
    }
    files.sort();
    let mut subjects = Vec::with_capacity(files.len());
    for (name, path) in &files {
        subjects.push(Subject::new(
            name,
            &crate::sha256_file(path).map_err(|e| format!("sign: {e}"))?,
        ));
    }
    let statement = Statement::new(
        &opts.version,
        opts.allow_downgrade_from.as_deref(),
        subjects,
    )
    .map_err(|e| format!("sign: {e}"))?;
    let envelope = dsse::sign(&key, PAYLOAD_TYPE, statement.to_json().as_bytes());
    let json = envelope.to_json();
    // Check what we are about to publish the way an agent will.
    let payload = dsse::verify(json.as_bytes(), PAYLOAD_TYPE, &key.public_key())
        .map_err(|e| format!("sign: the new envelope does not verify: {e}"))?;
    Statement::from_json(&payload)
        .map_err(|e| format!("sign: the new statement does not parse: {e}"))?;
    write_atomic(
        &envelope_path,
        format!("{json}\n").as_bytes(),
        0o644,
        WriteMode::Replace,
    )
    .map_err(|e| format!("sign: {e}"))?;

    for subject in &statement.subject {
        println!("{}  {}", subject.sha256().unwrap_or_default(), subject.name);
    }
    println!(
        "signed {} files as release {} with key {}: {}",
        statement.subject.len(),
        opts.version,
        key.public_key().fingerprint(),
        envelope_path.display()
    );
    Ok(())
}

fn load_key(path: &Path) -> Result<SigningKey, String> {
    let text = fs::read_to_string(path)
        .map_err(|e| format!("sign: cannot read key {}: {e}", path.display()))?;
    SigningKey::from_pem(&text).map_err(|e| format!("sign: key {}: {e}", path.display()))
}

/// Refuses to sign a directory that holds the private key: it would ship it.
fn refuse_key_inside(key: &Path, dir: &Path) -> Result<(), String> {
    let dir = fs::canonicalize(dir)
        .map_err(|e| format!("sign: cannot open release directory {}: {e}", dir.display()))?;
    if fs::canonicalize(key).is_ok_and(|k| k.starts_with(&dir)) {
        return Err(format!(
            "sign: the key {} is inside the release directory {}; refusing to publish it",
            key.display(),
            dir.display()
        ));
    }
    Ok(())
}

/// Collects `(relative name, path)` of every regular file under `dir`,
/// refusing symlinks, special files and names a verifier would refuse.
fn walk(dir: &Path, prefix: &str, out: &mut Vec<(String, PathBuf)>) -> Result<(), String> {
    let entries =
        fs::read_dir(dir).map_err(|e| format!("sign: cannot read {}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("sign: cannot read {}: {e}", dir.display()))?;
        let path = entry.path();
        let name = entry
            .file_name()
            .into_string()
            .map_err(|_| format!("sign: {}: file name is not UTF-8", path.display()))?;
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let meta = fs::symlink_metadata(&path)
            .map_err(|e| format!("sign: cannot stat {}: {e}", path.display()))?;
        let kind = meta.file_type();
        if kind.is_symlink() {
            return Err(format!(
                "sign: {} is a symlink; refusing to sign it (copy the file in instead)",
                path.display()
            ));
        } else if kind.is_dir() {
            walk(&path, &rel, out)?;
        } else if !kind.is_file() {
            return Err(format!(
                "sign: {} is not a regular file; refusing to sign it",
                path.display()
            ));
        } else if rel != ENVELOPE_FILE {
            release::check_subject_name(&rel).map_err(|e| format!("sign: {e}"))?;
            out.push((rel, path));
        }
    }
    Ok(())
}

/// Whether [`write_atomic`] may replace an existing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteMode {
    /// Fail if the file exists (the check and the write are one step).
    New,
    /// Replace the file if it exists.
    Replace,
}

fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.tmp"))
}

/// Writes `contents` to `path` with `mode` so that readers see the old file or
/// the whole new one, never a part: a synced tmp file, then a rename (or a
/// hard link, which refuses an existing file), then a synced directory.
pub(crate) fn write_atomic(
    path: &Path,
    contents: &[u8],
    mode: u32,
    how: WriteMode,
) -> Result<(), String> {
    let tmp = tmp_path(path);
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        match how {
            WriteMode::Replace => fs::rename(&tmp, path),
            WriteMode::New => fs::hard_link(&tmp, path).and_then(|()| fs::remove_file(&tmp)),
        }?;
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
        File::open(dir.unwrap_or(Path::new(".")))?.sync_all()
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        format!("cannot write {}: {e}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn parses_the_documented_arguments() {
        let opts = Options::parse(args(&[
            "--key",
            "k.pem",
            "--version=1.4.0",
            "--allow-downgrade-from",
            "1.5.0",
            "dist",
        ]))
        .unwrap();
        assert_eq!(opts.key, PathBuf::from("k.pem"));
        assert_eq!(opts.version, "1.4.0");
        assert_eq!(opts.allow_downgrade_from.as_deref(), Some("1.5.0"));
        assert_eq!(opts.dir, PathBuf::from("dist"));
    }

    #[test]
    fn usage_errors_say_what_is_missing() {
        let cases: [(&[&str], &str); 7] = [
            (&["--version", "1.0.0", "d"], "--key KEY is required"),
            (&["--key", "k", "d"], "--version V is required"),
            (&["--key", "k", "--version", "1.0.0"], "DIR is required"),
            (&["--key", "k", "--version", "1.0", "d"], "version \"1.0\""),
            (
                &[
                    "--key",
                    "k",
                    "--version",
                    "1.0.0",
                    "--allow-downgrade-from",
                    "x",
                    "d",
                ],
                "--allow-downgrade-from \"x\"",
            ),
            (
                &["--key", "k", "--version", "1.0.0", "d", "e"],
                "unexpected argument \"e\"",
            ),
            (&["--key"], "--key needs a value"),
        ];
        for (list, want) in cases {
            let err = Options::parse(args(list)).unwrap_err().to_string();
            assert!(err.contains(want), "{list:?}: {err}");
        }
    }

    #[test]
    fn new_files_are_never_replaced() {
        let dir = std::env::temp_dir().join(format!("xtask-write-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("f");
        write_atomic(&file, b"one", 0o600, WriteMode::New).unwrap();
        assert!(write_atomic(&file, b"two", 0o600, WriteMode::New).is_err());
        assert_eq!(fs::read(&file).unwrap(), b"one");
        write_atomic(&file, b"three", 0o600, WriteMode::Replace).unwrap();
        assert_eq!(fs::read(&file).unwrap(), b"three");
        // No tmp file is left behind either way.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }
}
