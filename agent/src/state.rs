//! The agent's state dir (0700): its layout, atomic writes, and the small
//! JSON files `agent.json` (who am I, which server) and `state.json` (last
//! acknowledged heartbeat).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use miniserde::{Deserialize, Serialize, json};

use crate::error::Error;

/// Default state dir (also `STELLA_STATE_DIR`).
pub(crate) const DEFAULT_STATE_DIR: &str = "/var/lib/stella-agent";

pub(crate) const AGENT_JSON: &str = "agent.json";
pub(crate) const AGENT_KEY: &str = "agent.key";
pub(crate) const AGENT_CERT: &str = "agent.pem";
pub(crate) const CA_CERT: &str = "ca.pem";
pub(crate) const STATE_JSON: &str = "state.json";

/// `agent.json`: written last at enrollment, so its presence means enrolled.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct AgentFile {
    pub(crate) id: String,
    pub(crate) server: String,
    pub(crate) ca_hash: String,
    pub(crate) name: Option<String>,
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
    pub(crate) update: Option<crate::update::UpdateMarker>,
    /// The last update that failed.
    pub(crate) update_failure: Option<crate::update::UpdateFailure>,
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
        let path = self.path(name);
        let tmp = self.path(&format!(".{name}.tmp"));
        let result = (|| -> std::io::Result<()> {
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&tmp)?;
            file.set_permissions(fs::Permissions::from_mode(mode))?;
            file.write_all(bytes)?;
            file.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(&self.root)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(|e| Error::io(format!("cannot write {}", path.display()), e))
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
        json::from_str(&text).map_err(|_| {
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
