//! Signed releases on the server: import a release, checking every digest
//! its statement names — from a directory on the server's host (its
//! `release.dsse.json` and files, copied into content-addressed blobs under
//! `blobs/sha256/<hex>`), or from an envelope whose files were uploaded as
//! blobs before (`release import --server`); list releases; offer one to an
//! agent; and find an agent's artifact (served with mTLS and HTTP Range) —
//! only ever from the blob store, never from a path a request names. The
//! server does not need the release key: agents verify the signature with
//! the key pinned on them. `app` records what is imported, keeps the list in
//! memory, and stores the blobs in the store.

use std::fs::{self, File};

use std::path::{Path, PathBuf};

use stella_proto::api::{ReleaseFileView, ReleaseView, UpdateOffer};
use stella_proto::dsse::{self, Envelope};
use stella_proto::release::{self, Statement};
use stella_proto::time::rfc3339;

use crate::error::Error;
use crate::records::{ReleaseFile, ReleaseRecord};
use crate::refusal::Refusal;

/// A bundle's enrollment file (it holds a token): not imported.
const BOOTSTRAP_FILE: &str = "bootstrap.json";

/// Largest file a release may carry.
const MAX_FILE_BYTES: u64 = 512 << 20;

/// The releases the server holds, by version.
#[derive(Debug, Default)]
pub(crate) struct Releases {
    pub(crate) by_version: std::collections::BTreeMap<String, ReleaseRecord>,
}

impl Releases {
    pub(crate) fn load(records: Vec<ReleaseRecord>) -> Self {
        Self {
            by_version: records
                .into_iter()
                .map(|r| (r.version.clone(), r))
                .collect(),
        }
    }
}

fn invalid(message: String) -> Error {
    Error::Refused(Refusal::bad_request(message))
}

impl Releases {
    /// Adds an imported release.
    pub(crate) fn insert(&mut self, record: ReleaseRecord) {
        self.by_version.insert(record.version.clone(), record);
    }

    /// The file of `version`'s agent for `target`.
    fn agent_file(&self, version: &str, target: &str) -> Option<(&ReleaseRecord, &ReleaseFile)> {
        let record = self.by_version.get(version)?;
        let name = agent_artifact(target);
        let file = record.files.iter().find(|f| f.name == name)?;
        Some((record, file))
    }

    /// The offer of `version` to an agent built for `target`, if the release
    /// has an agent for it.
    pub(crate) fn offer(
        &self,
        version: &str,
        target: &str,
        probation: std::time::Duration,
    ) -> Option<UpdateOffer> {
        let (record, file) = self.agent_file(version, target)?;
        Some(UpdateOffer {
            version: record.version.clone(),
            target: target.to_owned(),
            path: format!("/v1/releases/{}/{target}", record.version),
            size: file.size,
            envelope: record.envelope.clone(),
            probation_ms: probation.as_millis() as u64,
        })
    }

    /// The blob holding `version`'s agent for `target`: its sha256.
    pub(crate) fn artifact(&self, version: &str, target: &str) -> Option<String> {
        let (_, file) = self.agent_file(version, target)?;
        Some(file.sha256.clone())
    }

    /// The targets `version` has an agent for.
    pub(crate) fn targets(&self, version: &str) -> std::collections::HashSet<String> {
        self.by_version
            .get(version)
            .map(|r| {
                r.files
                    .iter()
                    .filter_map(|f| f.name.strip_suffix("/stella-agent").map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Refuses a direct offer of `version` to agent `agent`, built for `target`.
    pub(crate) fn check_offer(
        &self,
        version: &str,
        target: &str,
        agent: &str,
    ) -> Result<(), Refusal> {
        if !self.by_version.contains_key(version) {
            return Err(Refusal::not_found(format!(
                "no release {version} has been imported"
            )));
        }
        if self.agent_file(version, target).is_none() {
            return Err(Refusal::conflict(format!(
                "release {version} has no agent for {target} (agent {agent}'s target)"
            )));
        }
        Ok(())
    }
}

/// A release imported again: fine with the same envelope (nothing changes),
/// refused with another.
pub(crate) fn check_reimport(existing: &ReleaseRecord, new: &ReleaseRecord) -> Result<(), Refusal> {
    if existing.envelope == new.envelope {
        Ok(())
    } else {
        Err(Refusal::conflict(format!(
            "release {} was imported before with a different envelope",
            new.version
        )))
    }
}

/// Reads and checks an envelope's statement (structure only: the signature
/// is for agents to check with their pinned key).
pub(crate) fn statement_of(envelope: &str) -> Result<Statement, Error> {
    let env = Envelope::from_json(envelope.as_bytes())
        .map_err(|e| invalid(format!("release.dsse.json: {e}")))?;
    if env.payload_type != release::PAYLOAD_TYPE {
        return Err(invalid(format!(
            "release.dsse.json: payload type {:?} is not {}",
            env.payload_type,
            release::PAYLOAD_TYPE
        )));
    }
    let payload = dsse::decode_base64("payload", &env.payload)
        .map_err(|e| invalid(format!("release.dsse.json: {e}")))?;
    Statement::from_json(&payload).map_err(|e| invalid(format!("release.dsse.json: {e}")))
}

/// Copies `src` into the blob store while hashing it; refuses a digest other
/// than `want`. Returns the size.
fn store_blob(data_dir: &Path, src: &Path, want: &str) -> Result<u64, Error> {
    check_release_file(src)?;
    let mut input =
        File::open(src).map_err(|e| Error::io(format!("cannot read {}", src.display()), e))?;
    let mut blob = crate::blobs::BlobWriter::create(data_dir)
        .map_err(|e| Error::io("cannot start a blob in the data dir", e))?;
    blob.copy_from(&mut input, MAX_FILE_BYTES).map_err(|e| {
        if e.kind() == std::io::ErrorKind::InvalidData {
            invalid(format!(
                "{} grew past {MAX_FILE_BYTES} bytes",
                src.display()
            ))
        } else {
            Error::io(
                format!("cannot copy {} into the blob store", src.display()),
                e,
            )
        }
    })?;
    let digest = blob.sha256();
    if digest != want {
        // Dropped unfinished: nothing is left behind.
        return Err(invalid(format!(
            "{} has sha256 {digest}, but the signed statement says {want}",
            src.display()
        )));
    }
    let (_, size) = blob
        .finish()
        .map_err(|e| Error::io(format!("cannot store {}", src.display()), e))?;
    Ok(size)
}

/// Refuses a release file that is not a regular file (a symlink, a
/// directory) or is larger than [`MAX_FILE_BYTES`].
fn check_release_file(path: &Path) -> Result<(), Error> {
    let meta = fs::symlink_metadata(path)
        .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
    if !meta.is_file() {
        return Err(invalid(format!("{} is not a regular file", path.display())));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(invalid(format!(
            "{} is larger than {MAX_FILE_BYTES} bytes",
            path.display()
        )));
    }
    Ok(())
}

/// Refuses a release directory that is not an absolute path to a real
/// directory (a symlink to one is refused: what is imported must be what the
/// operator named).
fn check_release_dir(dir: &Path) -> Result<(), Error> {
    if !dir.is_absolute() {
        return Err(invalid(format!(
            "the release directory {} must be an absolute path",
            dir.display()
        )));
    }
    match fs::symlink_metadata(dir) {
        Ok(meta) if meta.file_type().is_symlink() => Err(invalid(format!(
            "the release directory {} is a symlink: name the directory itself",
            dir.display()
        ))),
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(invalid(format!("{} is not a directory", dir.display()))),
        Err(e) => Err(invalid(format!("cannot read {}: {e}", dir.display()))),
    }
}

/// Refuses a file of the release reached through a symlinked directory
/// (`<target>/` a link elsewhere), as the file itself may not be a link.
fn check_no_symlink_below(dir: &Path, name: &str) -> Result<(), Error> {
    let mut path = dir.to_path_buf();
    let parts: Vec<&str> = name.split('/').collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        path.push(part);
        if fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(invalid(format!(
                "{} is a symlink: a release's directories and files must be real ones",
                path.display()
            )));
        }
    }
    Ok(())
}

/// The envelope of release directory `dir`, and its statement.
fn read_envelope(dir: &Path) -> Result<(String, Statement), Error> {
    let envelope_path = dir.join(release::ENVELOPE_FILE);
    let meta = match fs::symlink_metadata(&envelope_path) {
        Ok(meta) if meta.is_file() => meta,
        _ => {
            return Err(invalid(format!(
                "{} is not a release directory: it has no {} file",
                dir.display(),
                release::ENVELOPE_FILE
            )));
        }
    };
    if meta.len() > dsse::MAX_ENVELOPE_BYTES as u64 {
        return Err(invalid(format!("{} is too large", envelope_path.display())));
    }
    let envelope = fs::read_to_string(&envelope_path)
        .map_err(|e| Error::io(format!("cannot read {}", envelope_path.display()), e))?;
    let statement = statement_of(&envelope)?;
    Ok((envelope, statement))
}

/// `release import DIR`: checks and stores every file the statement names
/// as a blob; returns the release to record. Blocking.
pub(crate) fn stage_import(data_dir: &Path, dir: &Path, now: u64) -> Result<ReleaseRecord, Error> {
    check_release_dir(dir)?;
    let (envelope, statement) = read_envelope(dir)?;
    let mut files = Vec::with_capacity(statement.subject.len());
    for subject in &statement.subject {
        if subject.name == BOOTSTRAP_FILE {
            // A USB bundle may carry a registration token: never keep it.
            crate::log::info(
                "release import: skipped a file that holds a token",
                &[("file", &subject.name)],
            );
            continue;
        }
        // Names were checked to be plain relative paths (no `..`, not absolute).
        check_no_symlink_below(dir, &subject.name)?;
        let want = subject.sha256().unwrap_or_default();
        let size = store_blob(data_dir, &dir.join(&subject.name), want)?;
        files.push(ReleaseFile {
            name: subject.name.clone(),
            sha256: want.to_owned(),
            size,
        });
    }
    Ok(ReleaseRecord {
        version: statement.predicate.version,
        envelope,
        files,
        imported_at: now,
    })
}

/// A file of a release directory to upload, checked.
#[derive(Debug)]
pub(crate) struct UploadFile {
    pub(crate) path: PathBuf,
    pub(crate) sha256: String,
}

/// `release import DIR` on the admin's side: reads DIR's envelope and checks
/// every file its statement names as an import on the server would (real
/// files, no symlinks, size, sha256), so that nothing is uploaded from a
/// release that cannot be imported. Returns the envelope and the files.
pub(crate) fn upload_plan(dir: &Path) -> Result<(String, Vec<UploadFile>), Error> {
    // A symlinked directory is refused; resolving it first would hide that.
    if fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(invalid(format!(
            "the release directory {} is a symlink: name the directory itself",
            dir.display()
        )));
    }
    let dir = fs::canonicalize(dir)
        .map_err(|e| Error::io(format!("cannot find {}", dir.display()), e))?;
    let (envelope, statement) = read_envelope(&dir)?;
    let mut files = Vec::with_capacity(statement.subject.len());
    for subject in &statement.subject {
        if subject.name == BOOTSTRAP_FILE {
            continue;
        }
        check_no_symlink_below(&dir, &subject.name)?;
        let path = dir.join(&subject.name);
        check_release_file(&path)?;
        let want = subject.sha256().unwrap_or_default();
        let mut input = File::open(&path)
            .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
        let (digest, _) = crate::blobs::digest_of(&mut input)
            .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
        if digest != want {
            return Err(invalid(format!(
                "{} has sha256 {digest}, but the signed statement says {want}",
                path.display()
            )));
        }
        files.push(UploadFile {
            path,
            sha256: want.to_owned(),
        });
    }
    Ok((envelope, files))
}

/// `release import --server`: the release that `envelope` (a DSSE
/// envelope's JSON) signs, its files checked against blobs uploaded before.
/// `blob(sha256)` opens the local file of a blob (filling it from the store
/// when needed), `None` when no such blob is stored. Every file is hashed
/// again, as an import from a directory does; nothing is recorded here.
/// Blocking.
pub(crate) fn stage_envelope(
    envelope: &str,
    now: u64,
    blob: &mut dyn FnMut(&str) -> Result<Option<File>, Error>,
) -> Result<ReleaseRecord, Error> {
    if envelope.len() > dsse::MAX_ENVELOPE_BYTES {
        return Err(invalid(format!(
            "the envelope is larger than {} bytes",
            dsse::MAX_ENVELOPE_BYTES
        )));
    }
    let statement = statement_of(envelope)?;
    let mut files = Vec::with_capacity(statement.subject.len());
    for subject in &statement.subject {
        if subject.name == BOOTSTRAP_FILE {
            continue;
        }
        let want = subject.sha256().unwrap_or_default();
        let missing = || {
            invalid(format!(
                "{} (sha256 {want}) has not been uploaded: upload it with POST /v1/admin/artifacts first",
                subject.name
            ))
        };
        if !crate::blobs::is_blob_name(want) {
            return Err(missing());
        }
        let mut file = blob(want)?.ok_or_else(missing)?;
        let on_disk = file
            .metadata()
            .map_err(|e| Error::io(format!("cannot read blob {want}"), e))?
            .len();
        if on_disk > MAX_FILE_BYTES {
            return Err(invalid(format!(
                "{} is larger than {MAX_FILE_BYTES} bytes",
                subject.name
            )));
        }
        let (digest, size) = crate::blobs::digest_of(&mut file)
            .map_err(|e| Error::io(format!("cannot read blob {want}"), e))?;
        if digest != want {
            return Err(invalid(format!(
                "the stored blob for {} has sha256 {digest}, but the signed statement says {want}",
                subject.name
            )));
        }
        files.push(ReleaseFile {
            name: subject.name.clone(),
            sha256: want.to_owned(),
            size,
        });
    }
    Ok(ReleaseRecord {
        version: statement.predicate.version,
        envelope: envelope.to_owned(),
        files,
        imported_at: now,
    })
}

/// The admin view of a release.
pub(crate) fn view(r: &ReleaseRecord) -> ReleaseView {
    ReleaseView {
        version: r.version.clone(),
        imported_at: rfc3339(r.imported_at),
        files: r
            .files
            .iter()
            .map(|f| ReleaseFileView {
                name: f.name.clone(),
                sha256: f.sha256.clone(),
                size: f.size,
            })
            .collect(),
    }
}

/// The agent artifact name for a target.
pub(crate) fn agent_artifact(target: &str) -> String {
    format!("{target}/stella-agent")
}
