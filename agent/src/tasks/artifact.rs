//! Fetching a task's artifact (an image archive) from the server over mTLS
//! (`GET /v1/artifacts/{sha256}`) into the staging dir: one 1 MiB chunk per
//! scheduler turn with HTTP Range, so heartbeats go on between chunks and a
//! part file left by an earlier attempt is resumed (its bytes re-hashed),
//! hashed as it arrives and accepted only when its sha256 is the one the
//! signed task names.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ring::digest::{Context, SHA256};

use crate::state::{STAGING_DIR, StateDir};
use crate::transport::{Client, Extra};

/// Largest archive accepted.
const MAX_ARTIFACT: u64 = 4 << 30;
/// Bytes fetched per scheduler turn.
const CHUNK: u64 = 1 << 20;

/// A fetch in progress.
pub(crate) struct Fetch {
    sha256: String,
    part: PathBuf,
    received: u64,
    total: Option<u64>,
    hasher: Context,
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
        let mut fetch = Fetch {
            sha256: sha256.to_owned(),
            part,
            received: 0,
            total: None,
            hasher: Context::new(&SHA256),
            retry_at: Instant::now(),
            failures: 0,
        };
        if let Ok(mut file) = File::open(&fetch.part) {
            let mut buf = [0u8; 16 * 1024];
            loop {
                match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        fetch.hasher.update(&buf[..n]);
                        fetch.received += n as u64;
                    }
                    Err(_) => {
                        fetch.restart();
                        break;
                    }
                }
            }
        }
        fetch
    }

    fn restart(&mut self) {
        let _ = fs::remove_file(&self.part);
        self.received = 0;
        self.hasher = Context::new(&SHA256);
    }

    /// Bytes received so far.
    pub(crate) fn received(&self) -> u64 {
        self.received
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
        if self.total.is_some_and(|t| self.received >= t) {
            return self.finish();
        }
        match self.chunk(state, client, server) {
            Ok(()) => {
                self.failures = 0;
                if self.total.is_some_and(|t| self.received >= t) {
                    return self.finish();
                }
                Ok(Fetched::Busy)
            }
            Err(Chunk::Final(e)) => {
                self.restart();
                Err(e)
            }
            Err(Chunk::Retry(e)) => {
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
        let got = stella_proto::hash::hex(self.hasher.clone().finish().as_ref());
        if got != self.sha256 {
            self.restart();
            return Err(format!(
                "the artifact's sha256 is {got}, not {} as the task says",
                self.sha256
            ));
        }
        Ok(Fetched::Done(self.part.clone()))
    }

    fn chunk(&mut self, state: &StateDir, client: &mut Client, server: &str) -> Result<(), Chunk> {
        state
            .create_staging()
            .map_err(|e| Chunk::Retry(format!("cannot create the staging dir: {e}")))?;
        let url = format!("{server}/v1/artifacts/{}", self.sha256);
        let extra = Extra {
            range: Some((self.received, self.received + CHUNK - 1)),
            ..Default::default()
        };
        let resp = client
            .send("GET", &url, &extra)
            .map_err(|e| Chunk::Retry(format!("GET {url}: {e}")))?;
        let status = resp.head.status;
        let total = match status {
            206 => resp
                .head
                .content_range_total
                .ok_or_else(|| Chunk::Retry("206 without a Content-Range total".into()))?,
            200 if self.received == 0 => resp.head.content_length.unwrap_or(MAX_ARTIFACT + 1),
            416 => {
                self.restart();
                return Err(Chunk::Retry("range not satisfiable; starting over".into()));
            }
            401 | 403 | 404 => {
                return Err(Chunk::Final(format!(
                    "the server refused the artifact {} ({status})",
                    self.sha256
                )));
            }
            other => return Err(Chunk::Retry(format!("the server answered {other}"))),
        };
        if total > MAX_ARTIFACT {
            return Err(Chunk::Final(format!(
                "the artifact is {total} bytes, over the limit of {MAX_ARTIFACT}"
            )));
        }
        self.total = Some(total);
        let mut part = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.part)
            .map_err(|e| Chunk::Retry(format!("cannot write {}: {e}", self.part.display())))?;
        let mut hasher = self.hasher.clone();
        let mut reader = resp.take(CHUNK + 1);
        let mut buf = [0u8; 16 * 1024];
        let mut got = 0u64;
        let streamed = loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) => break Err(Chunk::Retry(format!("download: {e}"))),
            };
            got += n as u64;
            if self.received + got > total {
                self.restart();
                return Err(Chunk::Final(format!(
                    "the server sent more than the {total} bytes it announced"
                )));
            }
            if let Err(e) = part.write_all(&buf[..n]) {
                break Err(Chunk::Retry(format!("cannot write the download: {e}")));
            }
            hasher.update(&buf[..n]);
        };
        if let Err(e) = streamed {
            // Cut what this chunk appended, so file and hash agree.
            if part.set_len(self.received).is_err() {
                self.restart();
            }
            return Err(e);
        }
        self.received += got;
        self.hasher = hasher;
        if got == 0 && self.received < total {
            return Err(Chunk::Retry("the server sent an empty chunk".into()));
        }
        Ok(())
    }

    /// Removes the part file (after the archive was loaded, or given up).
    pub(crate) fn discard(path: &Path) {
        let _ = fs::remove_file(path);
    }
}

enum Chunk {
    Final(String),
    Retry(String),
}
