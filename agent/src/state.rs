//! The agent's state dir (0700) and every file in it: the names, atomic
//! writes, `agent.json` (who am I, which server), `state.json` (last
//! acknowledged heartbeat, applied config, the update marker), the staging
//! dir for downloads and the temp files a crash may leave. The bottom layer:
//! it imports no other part of the agent but errors and the build's target.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use miniserde::de::Visitor;
use miniserde::ser::Fragment;
use miniserde::{Deserialize, Serialize, json};

use stella_proto::api::{MAX_FAILURE_LINE, MAX_FAILURE_LINES};
use stella_proto::text::bounded_line;

use crate::error::Error;

/// Default state dir (also `STELLA_STATE_DIR`).
pub(crate) const DEFAULT_STATE_DIR: &str = "/var/lib/stella-agent";

pub(crate) const AGENT_JSON: &str = "agent.json";
pub(crate) const AGENT_KEY: &str = "agent.key";
pub(crate) const AGENT_CERT: &str = "agent.pem";
pub(crate) const CA_CERT: &str = "ca.pem";
pub(crate) const STATE_JSON: &str = "state.json";
/// The applied configuration, as the server sent it (canonical JSON).
pub(crate) const CONFIG_JSON: &str = "config.json";
/// The pinned release key.
pub(crate) const RELEASE_KEY: &str = "release-key.pub";
/// The pinned key that signs tasks (default: a copy of the release key).
pub(crate) const DEPLOY_KEY: &str = "deploy-key.pub";
/// The journal of tasks this agent has seen (`tasks::journal`).
pub(crate) const TASKS_JSON: &str = "tasks.json";
/// Zero-touch enrollment file, in the bundle and (until enrollment
/// succeeds) in the state dir.
pub(crate) const BOOTSTRAP_JSON: &str = "bootstrap.json";
/// The next key, made before a renewal and kept until it is installed, so a
/// retried renewal sends the same key.
pub(crate) const NEXT_KEY: &str = "agent.key.new";
/// The certificate for the next key, written before the swap.
pub(crate) const NEXT_CERT: &str = "agent.pem.new";
/// The log lines of the update under way, kept across the exec of the new
/// version so that a rollback can report them.
pub(crate) const UPDATE_LOG: &str = "update.log";
/// The log lines of the last failed update (bounded; survives the rollback).
pub(crate) const FAILURE_LOG: &str = "update-failure.log";
/// Downloads in progress (mode 0700).
pub(crate) const STAGING_DIR: &str = "staging";
/// Temp files older than this are stale (a running agent's own writes are younger).
const STALE_TEMP_AGE: Duration = Duration::from_secs(60);

/// `agent.json`: written last at enrollment, so its presence means enrolled.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct AgentFile {
    pub(crate) id: String,
    pub(crate) server: String,
    pub(crate) ca_hash: String,
    pub(crate) name: Option<String>,
    /// The effective labels the server answered at enrollment: what a
    /// task's selector is matched against (absent for agents enrolled
    /// before tasks existed).
    pub(crate) labels: Option<stella_proto::api::Labels>,
}

/// `state.json`: soft state the `status` and `doctor` commands read.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub(crate) struct StateFile {
    /// RFC 3339 time of the last heartbeat the server acknowledged.
    pub(crate) last_heartbeat: Option<String>,
    pub(crate) heartbeat_seq: u64,
    /// Interval the server last asked for (ms).
    pub(crate) heartbeat_interval_ms: u64,
    /// RFC 3339 server time at the last acknowledgement.
    pub(crate) server_time: Option<String>,
    /// Canonical JSON of the applied configuration, and its hash.
    pub(crate) config: Option<String>,
    pub(crate) config_hash: Option<String>,
    /// SHA-256 of the binary as installed (bootstrap, install, update).
    pub(crate) binary_sha256: Option<String>,
    /// A swap or probation in progress.
    pub(crate) update: Option<UpdateMarker>,
    /// The last update that failed.
    pub(crate) update_failure: Option<UpdateFailure>,
    /// The version this agent committed, reported (`committed`) until a
    /// heartbeat saying so is acknowledged.
    pub(crate) committed: Option<String>,
}

/// Where a swap stands, as `state.json` spells it. These spellings are on
/// disk: an updated agent reads the marker an older one wrote, so they
/// never change (they are not the heartbeat's update phases).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MarkerPhase {
    /// The old binary is kept as `.prev`; the rename may or may not have happened.
    Swapping,
    /// The new version runs and must prove itself.
    Probation,
    /// The new version failed; `.prev` is back over the binary.
    RolledBack,
    /// A spelling this build does not know: the marker is dropped at start.
    Other(String),
}

impl MarkerPhase {
    /// The spelling in `state.json`.
    pub(crate) fn as_str(&self) -> &str {
        match self {
            MarkerPhase::Swapping => "swapping",
            MarkerPhase::Probation => "probation",
            MarkerPhase::RolledBack => "rolled-back",
            MarkerPhase::Other(text) => text,
        }
    }

    fn parse(text: &str) -> Self {
        match text {
            "swapping" => MarkerPhase::Swapping,
            "probation" => MarkerPhase::Probation,
            "rolled-back" => MarkerPhase::RolledBack,
            other => MarkerPhase::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for MarkerPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for MarkerPhase {
    fn begin(&self) -> Fragment<'_> {
        Fragment::Str(self.as_str().into())
    }
}

impl Deserialize for MarkerPhase {
    fn begin(out: &mut Option<Self>) -> &mut dyn Visitor {
        miniserde::make_place!(Place);
        impl Visitor for Place<MarkerPhase> {
            fn string(&mut self, s: &str) -> miniserde::Result<()> {
                self.out = Some(MarkerPhase::parse(s));
                Ok(())
            }
        }
        Place::new(out)
    }
}

/// `state.json`'s update marker: a swap or probation in progress.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct UpdateMarker {
    pub(crate) phase: MarkerPhase,
    pub(crate) from_version: String,
    pub(crate) to_version: String,
    pub(crate) to_sha256: String,
    pub(crate) install_path: String,
    /// Starts of the new version so far.
    pub(crate) starts: u32,
    pub(crate) probation_ms: u64,
    /// Unix seconds by which probation must be passed.
    pub(crate) probation_until: u64,
    pub(crate) error: Option<String>,
}

/// The last update that failed, reported until another one is tried.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct UpdateFailure {
    pub(crate) version: String,
    pub(crate) error: String,
    /// The new version ran and was put back (`rolled_back`), rather than
    /// refused before the swap (`failed`). Absent in older state files.
    pub(crate) rolled_back: Option<bool>,
    /// A heartbeat carrying it with its log lines was acknowledged.
    pub(crate) reported: Option<bool>,
}

impl StateFile {
    /// Writes the same JSON as `miniserde::json::to_string(self)` into
    /// `out` (cleared first) when no update is in progress or failed, and
    /// returns true; returns false otherwise. The run loop's steady
    /// `state.json` writes thus reuse one buffer.
    pub(crate) fn write_plain_json(&self, out: &mut String) -> bool {
        use std::fmt::Write as _;
        use stella_proto::api::json_string;
        if self.update.is_some() || self.update_failure.is_some() || self.committed.is_some() {
            return false;
        }
        let optional = |out: &mut String, key: &str, value: &Option<String>| {
            out.push_str(key);
            match value {
                Some(v) => json_string(out, v),
                None => out.push_str("null"),
            }
        };
        out.clear();
        optional(out, "{\"last_heartbeat\":", &self.last_heartbeat);
        // Writing into a String cannot fail.
        let _ = write!(
            out,
            ",\"heartbeat_seq\":{},\"heartbeat_interval_ms\":{}",
            self.heartbeat_seq, self.heartbeat_interval_ms
        );
        optional(out, ",\"server_time\":", &self.server_time);
        optional(out, ",\"config\":", &self.config);
        optional(out, ",\"config_hash\":", &self.config_hash);
        optional(out, ",\"binary_sha256\":", &self.binary_sha256);
        out.push_str(",\"update\":null,\"update_failure\":null,\"committed\":null}");
        true
    }

    /// Whether a new version is on probation.
    pub(crate) fn in_probation(&self) -> bool {
        self.update
            .as_ref()
            .is_some_and(|m| m.phase == MarkerPhase::Probation)
    }
}

/// What `save_state_with` reuses from one write to the next.
#[derive(Debug, Default)]
pub(crate) struct SaveBuffers {
    json: String,
    path: PathBuf,
    tmp: PathBuf,
}

/// The state dir and the files in it.
#[derive(Debug, Clone)]
pub(crate) struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub(crate) fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// Path of a file in the state dir.
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the state dir (and parents) with mode 0700.
    pub(crate) fn create(&self) -> Result<(), Error> {
        fs::create_dir_all(&self.root)
            .and_then(|()| fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700)))
            .map_err(|e| {
                Error::io(
                    format!("cannot create state dir {}", self.root.display()),
                    e,
                )
            })
    }

    /// Whether this host has finished enrolling.
    pub(crate) fn is_enrolled(&self) -> bool {
        self.path(AGENT_JSON).exists()
    }

    /// Reads a text file of the state dir.
    pub(crate) fn read_text(&self, name: &str) -> Result<String, Error> {
        let path = self.path(name);
        fs::read_to_string(&path)
            .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))
    }

    /// Writes a file atomically: temp file with `mode`, fsync, rename, fsync
    /// of the directory. A crash leaves the old content or the new, never a mix.
    pub(crate) fn write_atomic(&self, name: &str, bytes: &[u8], mode: u32) -> Result<(), Error> {
        self.write_atomic_at(
            &self.path(name),
            &self.path(&format!(".{name}.tmp")),
            bytes,
            mode,
        )
    }

    /// `write_atomic` with the paths already made.
    fn write_atomic_at(
        &self,
        path: &Path,
        tmp: &Path,
        bytes: &[u8],
        mode: u32,
    ) -> Result<(), Error> {
        write_file_atomically(path, tmp, bytes, mode)
            .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))
    }

    /// Renames one state file over another and makes it durable (fsync of the dir).
    pub(crate) fn rename(&self, from: &str, to: &str) -> Result<(), Error> {
        fs::rename(self.path(from), self.path(to))
            .and_then(|()| File::open(&self.root)?.sync_all())
            .map_err(|e| {
                Error::io(
                    format!("cannot rename {from} to {to} in {}", self.root.display()),
                    e,
                )
            })
    }

    /// Removes a state file (a missing one is fine).
    pub(crate) fn remove(&self, name: &str) -> Result<(), Error> {
        match fs::remove_file(self.path(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(
                format!("cannot remove {}", self.path(name).display()),
                e,
            )),
        }
    }

    /// Reads `agent.json`.
    pub(crate) fn agent_file(&self) -> Result<AgentFile, Error> {
        let text = self.read_text(AGENT_JSON)?;
        // miniserde's error is a unit struct: the file is named instead.
        json::from_str(&text).map_err(|miniserde::Error| {
            Error::Invalid(format!(
                "{} is not valid agent JSON",
                self.path(AGENT_JSON).display()
            ))
        })
    }

    /// Reads `state.json`; a missing or unreadable file is an empty state.
    pub(crate) fn state_file(&self) -> StateFile {
        self.read_text(STATE_JSON)
            .ok()
            .and_then(|t| json::from_str(&t).ok())
            .unwrap_or_default()
    }

    /// Writes `state.json`.
    pub(crate) fn save_state(&self, state: &StateFile) -> Result<(), Error> {
        self.write_atomic(STATE_JSON, json::to_string(state).as_bytes(), 0o600)
    }

    /// `save_state` reusing `buf`'s text and paths: the run loop writes
    /// `state.json` every other heartbeat.
    pub(crate) fn save_state_with(
        &self,
        state: &StateFile,
        buf: &mut SaveBuffers,
    ) -> Result<(), Error> {
        if !state.write_plain_json(&mut buf.json) {
            buf.json = json::to_string(state);
        }
        if buf.path.as_os_str().is_empty() {
            buf.path = self.path(STATE_JSON);
            buf.tmp = self.path(&format!(".{STATE_JSON}.tmp"));
        }
        self.write_atomic_at(&buf.path, &buf.tmp, buf.json.as_bytes(), 0o600)
    }

    /// Writes log lines, one a line, atomically (at most
    /// `MAX_FAILURE_LINES`, the last ones).
    pub(crate) fn write_lines(&self, name: &str, lines: &[String]) -> Result<(), Error> {
        let keep = &lines[lines.len().saturating_sub(MAX_FAILURE_LINES)..];
        let mut text = String::new();
        for line in keep {
            text.push_str(line);
            text.push('\n');
        }
        self.write_atomic(name, text.as_bytes(), 0o600)
    }

    /// Reads log lines written by `write_lines` (none when the file is
    /// missing), bounded and printable whatever the file holds.
    pub(crate) fn read_lines(&self, name: &str) -> Vec<String> {
        let Ok(text) = fs::read_to_string(self.path(name)) else {
            return Vec::new();
        };
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(MAX_FAILURE_LINES)..]
            .iter()
            .map(|line| bounded_line(line, MAX_FAILURE_LINE))
            .collect()
    }

    /// Writes a JSON file.
    pub(crate) fn write_json<T: Serialize>(
        &self,
        name: &str,
        value: &T,
        mode: u32,
    ) -> Result<(), Error> {
        self.write_atomic(name, json::to_string(value).as_bytes(), mode)
    }
}

impl StateDir {
    /// The part file a download of `version` for `target` is staged in.
    pub(crate) fn staging_part(&self, version: &str, target: &str) -> PathBuf {
        self.path(STAGING_DIR)
            .join(format!("stella-agent-{version}-{target}.part"))
    }

    /// Creates the staging dir (mode 0700).
    pub(crate) fn create_staging(&self) -> std::io::Result<()> {
        let dir = self.path(STAGING_DIR);
        fs::create_dir_all(&dir)
            .and_then(|()| fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)))
    }

    /// Files in the staging dir, sorted.
    pub(crate) fn staged_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<_> = fs::read_dir(self.path(STAGING_DIR))
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_file())
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
    }

    /// Bytes held in the staging dir.
    pub(crate) fn staging_bytes(&self) -> u64 {
        fs::read_dir(self.path(STAGING_DIR))
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Stale temp files (`.*.tmp`) in the state dir and its staging dir.
    pub(crate) fn stale_temp_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for dir in [self.root.clone(), self.path(STAGING_DIR)] {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if !(name.starts_with('.') && name.ends_with(".tmp")) {
                    continue;
                }
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age >= STALE_TEMP_AGE);
                if old {
                    out.push(e.path());
                }
            }
        }
        out.sort();
        out
    }
}

/// Writes `bytes` to `path` through `tmp` (in the same directory) with
/// `mode`: temp file, fsync, rename, fsync of the directory. A crash leaves
/// the old content or the new, never a mix; a failed write removes `tmp`.
pub(crate) fn write_file_atomically(
    path: &Path,
    tmp: &Path,
    bytes: &[u8],
    mode: u32,
) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("no parent directory"))?;
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(tmp)?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_state_json_is_what_miniserde_writes() {
        let mut state = <StateFile as Default>::default();
        let mut out = String::from("stale");
        assert!(state.write_plain_json(&mut out));
        assert_eq!(out, json::to_string(&state));
        state.last_heartbeat = Some("2026-11-30T04:00:00Z".into());
        state.heartbeat_seq = 42;
        state.heartbeat_interval_ms = 30_000;
        state.server_time = Some("t\u{1}\n".into());
        state.config = Some(r#"{"a":"b\\c"}"#.into());
        state.config_hash = Some("ab".into());
        state.binary_sha256 = Some("cd".into());
        assert!(state.write_plain_json(&mut out));
        assert_eq!(out, json::to_string(&state));
        state.update_failure = Some(UpdateFailure {
            version: "1".into(),
            error: "e".into(),
            ..Default::default()
        });
        assert!(!state.write_plain_json(&mut out));
        state.update_failure = None;
        state.committed = Some("1".into());
        assert!(!state.write_plain_json(&mut out));
        // A state file written before `committed` and the failure's flags.
        let old = r#"{"last_heartbeat":null,"heartbeat_seq":1,"heartbeat_interval_ms":0,"server_time":null,"config":null,"config_hash":null,"binary_sha256":null,"update":null,"update_failure":{"version":"2","error":"e"}}"#;
        let read: StateFile = json::from_str(old).unwrap();
        assert_eq!(read.update_failure.unwrap().rolled_back, None);
    }

    #[test]
    fn failure_log_lines_are_bounded_and_printable() {
        let dir = std::env::temp_dir().join(format!("stella-state-lines-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let state = StateDir::new(dir.clone());
        state.create().unwrap();
        assert!(state.read_lines(FAILURE_LOG).is_empty());
        let lines: Vec<String> = (0..100).map(|i| format!("line {i}")).collect();
        state.write_lines(FAILURE_LOG, &lines).unwrap();
        let read = state.read_lines(FAILURE_LOG);
        assert_eq!(read.len(), MAX_FAILURE_LINES);
        assert_eq!(read[0], "line 36");
        fs::write(
            dir.join(FAILURE_LOG),
            format!("a\u{1b}b\n{}\n", "é".repeat(400)),
        )
        .unwrap();
        let read = state.read_lines(FAILURE_LOG);
        assert_eq!(read[0], "a b");
        assert!(read[1].len() <= MAX_FAILURE_LINE && read[1].len() > MAX_FAILURE_LINE - 2);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn marker_phases_keep_their_on_disk_spellings() {
        for (phase, text) in [
            (MarkerPhase::Swapping, "\"swapping\""),
            (MarkerPhase::Probation, "\"probation\""),
            (MarkerPhase::RolledBack, "\"rolled-back\""),
        ] {
            assert_eq!(json::to_string(&phase), text);
            assert_eq!(json::from_str::<MarkerPhase>(text).unwrap(), phase);
        }
        let odd: MarkerPhase = json::from_str("\"paused\"").unwrap();
        assert_eq!(odd, MarkerPhase::Other("paused".into()));
        assert_eq!(json::to_string(&odd), "\"paused\"");
    }
}
