//! Downloading an accepted release into the staging dir: chunks fetched
//! with HTTP Range (so heartbeats go on between them and an interruption
//! resumes), appended to a part file, capped in size, and hashed as they
//! arrive. The digest state travels with the download, so the finished file
//! is never read again to hash it; a download resumed by a new process
//! re-hashes the bytes already on disk and resumes from their real length
//! (never from a count recorded elsewhere). A write that fails (a full disk)
//! is cut from the file again and retried later.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use stella_proto::api::UpdateOffer;

use super::offer::Accepted;
use crate::log;
pub(super) use crate::ranged::ChunkError;
use crate::ranged::PartFile;
use crate::state::StateDir;

/// Largest artifact accepted (debug builds are big; release ones ~2 MiB).
pub(super) const MAX_DOWNLOAD: u64 = 128 << 20;

/// How far a download got past fetching (each step is reported before the
/// next one runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    /// Bytes are still arriving.
    Fetching,
    /// Size, digest and signature checked; staged next to the binary.
    Verified,
    /// The new binary's self-test is next.
    SelfTest,
}

/// A download in progress.
pub(super) struct Download {
    pub(super) offer: UpdateOffer,
    pub(super) accepted: Accepted,
    /// The part file, its bytes and their hash.
    pub(super) file: PartFile,
    pub(super) stage: Stage,
    /// Do not try before this (after a failed chunk).
    pub(super) retry_at: Instant,
    pub(super) failures: u32,
    /// Why the last attempt failed, reported until a chunk lands.
    pub(super) last_error: Option<String>,
    /// The byte this download last resumed at after an interruption (None:
    /// fetched from byte 0 without one).
    pub(super) resumed_at: Option<u64>,
    /// A resumed download did not match and this is the one retry from zero.
    pub(super) restarted_after_mismatch: bool,
}

impl Download {
    /// A download of `accepted` into `part`, resuming from what `part`
    /// already holds (an earlier process got that far).
    pub(super) fn start(offer: &UpdateOffer, accepted: Accepted, part: PathBuf) -> Self {
        // Never more than the artifact can hold: such a file is not a prefix.
        let limit = match offer.size {
            0 => MAX_DOWNLOAD,
            size => MAX_DOWNLOAD.min(size),
        };
        let (file, resumed_at) = PartFile::resume(part, limit);
        if let Some(size) = resumed_at {
            log::info(
                "resuming the download",
                &[("version", &accepted.version), ("from_byte", &size)],
            );
        }
        Download {
            offer: offer.clone(),
            accepted,
            file,
            stage: Stage::Fetching,
            retry_at: Instant::now(),
            failures: 0,
            last_error: None,
            resumed_at,
            restarted_after_mismatch: false,
        }
    }

    /// Whether every announced byte is here.
    pub(super) fn is_complete(&self) -> bool {
        self.file.is_complete()
    }

    /// Hex SHA-256 of the bytes received so far.
    pub(super) fn digest(&self) -> String {
        self.file.digest()
    }

    /// Forgets what was received: the part file and its hash.
    pub(super) fn restart(&mut self) {
        self.file.restart();
        self.resumed_at = None;
    }

    /// Tries again later, with a growing wait, and reports why.
    pub(super) fn retry_later(&mut self, error: String) {
        self.failures += 1;
        self.retry_at = Instant::now() + Duration::from_secs(1 << self.failures.min(6));
        self.last_error = Some(error);
    }

    /// Takes a verified download that could not be put in place back from
    /// `staged` into its part file; where that fails too, it is fetched again.
    pub(super) fn unstage(&mut self, staged: &Path) {
        if !self.file.path.exists() && fs::rename(staged, &self.file.path).is_err() {
            self.restart();
        }
        let _ = fs::remove_file(staged);
    }

    /// Fetches the next chunk of the release file.
    pub(super) fn fetch_chunk(
        &mut self,
        state: &StateDir,
        client: &mut crate::transport::Client,
        server: &str,
    ) -> Result<(), ChunkError> {
        let url = format!("{server}{}", self.offer.path);
        let fetched = self
            .file
            .fetch_chunk(state, client, &url, "the download", MAX_DOWNLOAD);
        if self.file.received == 0 {
            // Started over (the bytes held were wrong): nothing was resumed.
            self.resumed_at = None;
        }
        fetched
    }
}
