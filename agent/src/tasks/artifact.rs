//! Fetching a task's artifact (an image archive) from the server over mTLS
//! (`GET /v1/artifacts/{sha256}`) into the staging dir: one 1 MiB chunk per
//! scheduler turn with HTTP Range, so heartbeats go on between chunks and a
//! part file left by an earlier attempt is resumed (its bytes re-hashed),
//! hashed as it arrives and accepted only when its sha256 is the one the
//! signed task names.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::ranged::{ChunkError, PartFile};
use crate::state::{STAGING_DIR, StateDir};
use crate::transport::Client;

/// Largest archive accepted.
const MAX_ARTIFACT: u64 = 4 << 30;

/// A fetch in progress.
pub(crate) struct Fetch {
    sha256: String,
    file: PartFile,
    retry_at: Instant,
    failures: u32,
}

/// How a turn went.
pub(crate) enum Fetched {
    /// More to fetch (or a passing failure, retried later).
    Busy,
    /// All of it, verified: the archive's path.
    Done(PathBuf),
}

impl Fetch {
    /// Starts (or resumes) fetching the artifact `sha256`.
    pub(crate) fn start(state: &StateDir, sha256: &str) -> Self {
        let part = state
            .path(STAGING_DIR)
            .join(format!("artifact-{sha256}.part"));
        Fetch {
            sha256: sha256.to_owned(),
            file: PartFile::resume(part, MAX_ARTIFACT).0,
            retry_at: Instant::now(),
            failures: 0,
        }
    }

    /// Bytes received so far.
    pub(crate) fn received(&self) -> u64 {
        self.file.received
    }

    /// Fetches the next chunk. `Err` is final (the task fails); a passing
    /// failure is retried after a growing wait.
    pub(crate) fn step(
        &mut self,
        state: &StateDir,
        client: &mut Client,
        server: &str,
    ) -> Result<Fetched, String> {
        if Instant::now() < self.retry_at {
            return Ok(Fetched::Busy);
        }
        if self.file.is_complete() {
            return self.finish();
        }
        let url = format!("{server}/v1/artifacts/{}", self.sha256);
        let what = format!("the artifact {}", self.sha256);
        match self
            .file
            .fetch_chunk(state, client, &url, &what, MAX_ARTIFACT)
        {
            Ok(()) => {
                self.failures = 0;
                if self.file.is_complete() {
                    return self.finish();
                }
                Ok(Fetched::Busy)
            }
            Err(ChunkError::Refuse(e)) => {
                self.file.restart();
                Err(e)
            }
            Err(ChunkError::Retry(e)) => {
                self.failures += 1;
                self.retry_at = Instant::now() + Duration::from_secs(1 << self.failures.min(5));
                crate::log::warn(
                    "artifact download failed; will retry",
                    &[("artifact", &self.sha256), ("error", &e)],
                );
                Ok(Fetched::Busy)
            }
        }
    }

    fn finish(&mut self) -> Result<Fetched, String> {
        let got = self.file.digest();
        if got != self.sha256 {
            self.file.restart();
            return Err(format!(
                "the artifact's sha256 is {got}, not {} as the task says",
                self.sha256
            ));
        }
        Ok(Fetched::Done(self.file.path.clone()))
    }

    /// Removes the part file (after the archive was loaded, or given up).
    pub(crate) fn discard(path: &Path) {
        let _ = fs::remove_file(path);
    }
}
