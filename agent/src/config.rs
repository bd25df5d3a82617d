//! Configuration on the agent: validate what the server pushes, write it
//! atomically to `config.json`, apply it without a restart, and notice when
//! the file on disk is edited by hand (a cheap size/mtime check on every
//! heartbeat, the bytes only when those changed), restoring it on request.
//! The applied document is also kept in `state.json`, so it survives an
//! edit of `config.json` and restarts while the server is unreachable.

use std::fs;
use std::os::unix::fs::MetadataExt;

use miniserde::json::Value;
use stella_proto::api::ConfigRefusal;
use stella_proto::config::{self, Settings};

use crate::error::Error;
use crate::log;
use crate::state::{CONFIG_JSON, StateDir, StateFile};

/// Size and modification time of `config.json` as last verified.
type FileSignature = (u64, i64, i64);

/// The applied configuration and what the agent knows about its file.
#[derive(Debug)]
pub(crate) struct ConfigState {
    pub(crate) settings: Settings,
    /// Hash of the applied document ("" before any was applied).
    pub(crate) hash: String,
    /// Canonical bytes of the applied document.
    applied: String,
    /// The file as it was when it last matched `applied`.
    verified: Option<FileSignature>,
    /// The file as it was when it was last found edited.
    edited: Option<FileSignature>,
    /// The file on disk differs from the applied document.
    pub(crate) drift: bool,
    /// The last document refused, and why.
    pub(crate) refusal: Option<ConfigRefusal>,
}

fn signature(state: &StateDir) -> Option<FileSignature> {
    let meta = fs::metadata(state.path(CONFIG_JSON)).ok()?;
    Some((meta.len(), meta.mtime(), meta.mtime_nsec()))
}

impl ConfigState {
    /// The applied configuration recorded in `state.json` (defaults if none).
    pub(crate) fn load(saved: &StateFile) -> Self {
        let doc = saved.config.as_deref().and_then(config::parse);
        let (settings, hash, applied) = match doc {
            Some(doc) => match config::parse_settings(&doc) {
                Ok(settings) => (settings, config::hash(&doc), config::canonical(&doc)),
                Err(_) => (Settings::default(), String::new(), String::new()),
            },
            None => (Settings::default(), String::new(), String::new()),
        };
        Self {
            settings,
            hash,
            applied,
            verified: None,
            edited: None,
            drift: false,
            refusal: None,
        }
    }

    /// Validates and applies `doc`: writes `config.json`, records it in
    /// `saved` (which the caller persists), and takes it into effect. A
    /// refused document changes nothing and is remembered for the report.
    pub(crate) fn apply(
        &mut self,
        state: &StateDir,
        saved: &mut StateFile,
        doc: &Value,
    ) -> Result<(), Error> {
        let hash = config::hash(doc);
        let settings = match config::parse_settings(doc) {
            Ok(s) => s,
            Err(e) => {
                log::warn(
                    "configuration refused; keeping the last good one",
                    &[("hash", &hash), ("error", &e)],
                );
                self.refusal = Some(ConfigRefusal {
                    hash,
                    error: e.to_string(),
                });
                return Ok(());
            }
        };
        let canonical = config::canonical(doc);
        state.write_atomic(CONFIG_JSON, canonical.as_bytes(), 0o600)?;
        saved.config = Some(canonical.clone());
        saved.config_hash = Some(hash.clone());
        self.verified = signature(state);
        self.edited = None;
        self.applied = canonical;
        self.hash = hash;
        self.settings = settings;
        self.drift = false;
        self.refusal = None;
        log::info("configuration applied", &[("hash", &self.hash)]);
        Ok(())
    }

    /// Whether `config.json` still holds the applied document. Reads the
    /// file only when its size or mtime changed since it was last checked.
    pub(crate) fn check_drift(&mut self, state: &StateDir) -> bool {
        if self.hash.is_empty() {
            return false;
        }
        let sig = signature(state);
        if sig.is_some() && sig == self.verified {
            self.drift = false;
        } else if sig.is_some() && sig == self.edited {
            self.drift = true;
        } else {
            let same = fs::read(state.path(CONFIG_JSON))
                .is_ok_and(|bytes| bytes == self.applied.as_bytes());
            if same {
                self.verified = sig;
            } else {
                if !self.drift {
                    log::warn(
                        "config.json was changed on disk; it differs from the applied configuration",
                        &[("applied_hash", &self.hash)],
                    );
                }
                self.edited = sig;
            }
            self.drift = !same;
        }
        self.drift
    }

    /// Writes the applied document back over an edited `config.json`.
    pub(crate) fn restore(&mut self, state: &StateDir) -> Result<(), Error> {
        state.write_atomic(CONFIG_JSON, self.applied.as_bytes(), 0o600)?;
        self.verified = signature(state);
        self.edited = None;
        self.drift = false;
        log::info(
            "restored config.json to the applied configuration",
            &[("hash", &self.hash)],
        );
        Ok(())
    }
}
