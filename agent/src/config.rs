//! Configuration on the agent: validate what the server pushes, write it
//! atomically to `config.json`, apply it without a restart, and notice when
//! the file on disk is edited by hand (a cheap size/mtime check on every
//! heartbeat, the bytes only when those changed), restoring it on request.
//! The applied document is also kept in `state.json`, so it survives an
//! edit of `config.json` and restarts while the server is unreachable. A
//! valid document whose file cannot be written (a full disk) is kept in
//! memory, reported as refused, and written on a later heartbeat: the
//! server does not send a document again once the agent reported it.

use std::fs;
use std::os::unix::fs::MetadataExt;

use miniserde::json::Value;
use stella_proto::api::ConfigRefusal;
use stella_proto::config::{self, Settings};
use stella_proto::text::report_text;

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
    /// A valid document not applied yet because `config.json` could not be
    /// written.
    pending: Option<Pending>,
}

/// A validated document waiting for its file to be written.
#[derive(Debug)]
struct Pending {
    hash: String,
    canonical: String,
    settings: Settings,
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
            pending: None,
        }
    }

    /// Validates and applies `doc`: writes `config.json`, records it in
    /// `saved` (which the caller persists), and takes it into effect; true
    /// when it did. A refused document changes nothing and is remembered for
    /// the report. A valid one whose file cannot be written is an error, and
    /// is also remembered, reported and kept for [`Self::retry_pending`].
    pub(crate) fn apply(
        &mut self,
        state: &StateDir,
        saved: &mut StateFile,
        doc: &Value,
    ) -> Result<bool, Error> {
        let hash = config::hash(doc);
        let settings = match config::parse_settings(doc) {
            Ok(s) => s,
            Err(e) => {
                log::warn(
                    "configuration refused; keeping the last good one",
                    &[("hash", &hash), ("error", &e)],
                );
                self.pending = None;
                self.refusal = Some(ConfigRefusal {
                    hash,
                    error: report_text(&e.to_string()),
                });
                return Ok(false);
            }
        };
        self.pending = Some(Pending {
            hash,
            canonical: config::canonical(doc),
            settings,
        });
        self.write_pending(state, saved).map(|()| true)
    }

    /// Writes a document that could not be written before, if the server
    /// still wants it (`desired` is the hash it asks for); true when it is
    /// now applied. Without one pending this costs nothing.
    pub(crate) fn retry_pending(
        &mut self,
        state: &StateDir,
        saved: &mut StateFile,
        desired: &str,
    ) -> Result<bool, Error> {
        match &self.pending {
            None => Ok(false),
            Some(p) if p.hash != desired => {
                // The server changed its mind: drop the document and its report.
                if self.refusal.as_ref().is_some_and(|r| r.hash == p.hash) {
                    self.refusal = None;
                }
                self.pending = None;
                Ok(false)
            }
            Some(_) => self.write_pending(state, saved).map(|()| true),
        }
    }

    /// Writes the pending document to `config.json` and takes it into
    /// effect; on failure keeps it pending and reports why.
    fn write_pending(&mut self, state: &StateDir, saved: &mut StateFile) -> Result<(), Error> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        if let Err(e) = state.write_atomic(CONFIG_JSON, p.canonical.as_bytes(), 0o600) {
            let error = e.to_string();
            let repeated = self
                .refusal
                .as_ref()
                .is_some_and(|r| r.hash == p.hash && r.error == error);
            if !repeated {
                log::warn(
                    "configuration not applied: its file cannot be written; keeping the last good one and trying again",
                    &[("hash", &p.hash), ("error", &error)],
                );
                self.refusal = Some(ConfigRefusal {
                    hash: p.hash.clone(),
                    error: report_text(&error),
                });
            }
            self.pending = Some(p);
            return Err(e);
        }
        saved.config = Some(p.canonical.clone());
        saved.config_hash = Some(p.hash.clone());
        self.verified = signature(state);
        self.edited = None;
        self.applied = p.canonical;
        self.hash = p.hash;
        self.settings = p.settings;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> Value {
        config::parse(text).unwrap()
    }

    #[test]
    fn an_unwritable_config_is_reported_kept_and_written_later() {
        let root = std::env::temp_dir().join(format!("stella-config-unit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        // A directory in the way makes every write of config.json fail.
        let blocker = root.join(CONFIG_JSON).join("x");
        fs::create_dir_all(&blocker).unwrap();
        let state = StateDir::new(root.clone());
        let mut saved = StateFile::default();
        let mut config = ConfigState::load(&saved);
        let wanted = doc(r#"{"log_level":"debug"}"#);
        let hash = config::hash(&wanted);

        assert!(config.apply(&state, &mut saved, &wanted).is_err());
        assert_eq!(config.hash, "", "nothing applied");
        assert!(saved.config.is_none());
        let refusal = config.refusal.clone().expect("reported");
        assert_eq!(refusal.hash, hash);
        assert!(refusal.error.contains(CONFIG_JSON), "{}", refusal.error);
        // Still failing: still reported, still pending.
        assert!(config.retry_pending(&state, &mut saved, &hash).is_err());
        assert!(config.refusal.is_some());

        fs::remove_dir_all(root.join(CONFIG_JSON)).unwrap();
        assert!(config.retry_pending(&state, &mut saved, &hash).unwrap());
        assert_eq!(config.hash, hash);
        assert!(config.refusal.is_none());
        assert_eq!(saved.config_hash.as_deref(), Some(hash.as_str()));
        assert_eq!(
            fs::read_to_string(state.path(CONFIG_JSON)).unwrap(),
            config::canonical(&wanted)
        );
        // Nothing pending: a retry is a no-op.
        assert!(!config.retry_pending(&state, &mut saved, &hash).unwrap());
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn a_pending_config_the_server_no_longer_wants_is_dropped() {
        let root =
            std::env::temp_dir().join(format!("stella-config-unit-drop-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join(CONFIG_JSON).join("x")).unwrap();
        let state = StateDir::new(root.clone());
        let mut saved = StateFile::default();
        let mut config = ConfigState::load(&saved);
        let wanted = doc(r#"{"log_level":"debug"}"#);
        assert!(config.apply(&state, &mut saved, &wanted).is_err());
        fs::remove_dir_all(root.join(CONFIG_JSON)).unwrap();
        assert!(!config.retry_pending(&state, &mut saved, "other").unwrap());
        assert!(config.refusal.is_none());
        assert!(
            !config
                .retry_pending(&state, &mut saved, &config::hash(&wanted))
                .unwrap()
        );
        assert!(!state.path(CONFIG_JSON).exists());
        let _ = fs::remove_dir_all(&root);
    }
}
