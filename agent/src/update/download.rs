//! Downloading an accepted release into the staging dir: chunks fetched
//! with HTTP Range (so heartbeats go on between them and an interruption
//! resumes), appended to a part file, capped in size, and hashed as they
//! arrive. The digest state travels with the download, so the finished file
//! is never read again to hash it; a download resumed by a new process
//! re-hashes the bytes already on disk and resumes from their real length
//! (never from a count recorded elsewhere). A write that fails (a full disk)
//! is cut from the file again and retried later.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ring::digest::{Context, SHA256};
use stella_proto::api::UpdateOffer;

use super::offer::Accepted;
use crate::log;
use crate::state::StateDir;

/// Largest artifact accepted (debug builds are big; release ones ~2 MiB).
pub(super) const MAX_DOWNLOAD: u64 = 128 << 20;
/// Bytes fetched per loop turn, so heartbeats are not held up.
const CHUNK: u64 = 1 << 20;

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
    pub(super) part: PathBuf,
    /// Bytes in the part file, all of them hashed into `hasher`.
    pub(super) received: u64,
    /// The size the server announced (Content-Range), once a chunk came.
    pub(super) total: Option<u64>,
    pub(super) stage: Stage,
    hasher: Context,
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

/// Why a chunk did not arrive.
pub(super) enum ChunkError {
    /// The artifact is unacceptable: give up on this release.
    Refuse(String),
    /// A passing problem: resume later.
    Retry(String),
}

/// The SHA-256 state of the first `limit` bytes of `file` and their count
/// (fewer when the file is shorter).
fn hash_prefix(file: &mut File, limit: u64) -> std::io::Result<(Context, u64)> {
    let mut hasher = Context::new(&SHA256);
    let mut buf = [0u8; 16 * 1024];
    let mut size = 0u64;
    let mut reader = file.take(limit);
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hasher, size))
}

impl Download {
    /// A download of `accepted` into `part`, resuming from what `part`
    /// already holds (an earlier process got that far).
    pub(super) fn start(offer: &UpdateOffer, accepted: Accepted, part: PathBuf) -> Self {
        let mut download = Download {
            offer: offer.clone(),
            accepted,
            part,
            received: 0,
            total: None,
            stage: Stage::Fetching,
            hasher: Context::new(&SHA256),
            retry_at: Instant::now(),
            failures: 0,
            last_error: None,
            resumed_at: None,
            restarted_after_mismatch: false,
        };
        let held = fs::metadata(&download.part).map_or(0, |m| m.len());
        if held == 0 {
            return download;
        }
        // Never more than the artifact can hold: such a file is not a prefix.
        let limit = match offer.size {
            0 => MAX_DOWNLOAD,
            size => MAX_DOWNLOAD.min(size),
        };
        let resumed = File::open(&download.part).and_then(|mut f| hash_prefix(&mut f, held));
        match resumed {
            Ok((hasher, size)) if size == held && size <= limit => {
                log::info(
                    "resuming the download",
                    &[
                        ("version", &download.accepted.version),
                        ("from_byte", &size),
                    ],
                );
                download.hasher = hasher;
                download.received = size;
                download.resumed_at = Some(size);
            }
            _ => download.restart(),
        }
        download
    }

    /// Whether every announced byte is here.
    pub(super) fn is_complete(&self) -> bool {
        self.total.is_some_and(|t| self.received >= t)
    }

    /// Hex SHA-256 of the bytes received so far.
    pub(super) fn digest(&self) -> String {
        stella_proto::hash::hex(self.hasher.clone().finish().as_ref())
    }

    /// Forgets what was received: the part file and its hash.
    pub(super) fn restart(&mut self) {
        let _ = fs::remove_file(&self.part);
        self.received = 0;
        self.resumed_at = None;
        self.hasher = Context::new(&SHA256);
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
        if !self.part.exists() && fs::rename(staged, &self.part).is_err() {
            self.restart();
        }
        let _ = fs::remove_file(staged);
    }

    /// Fetches the next chunk with `Range`, appends it to the part file and
    /// hashes it. A chunk that breaks off is cut from the file again, so
    /// the file and the hash always hold the same bytes.
    pub(super) fn fetch_chunk(
        &mut self,
        state: &StateDir,
        client: &mut crate::transport::Client,
        server: &str,
    ) -> Result<(), ChunkError> {
        state
            .create_staging()
            .map_err(|e| ChunkError::Retry(format!("cannot create the staging dir: {e}")))?;
        let end = self.received + CHUNK - 1;
        let url = format!("{server}{}", self.offer.path);
        let extra = crate::transport::Extra {
            range: Some((self.received, end)),
            ..Default::default()
        };
        let resp = client
            .send("GET", &url, &extra)
            .map_err(|e| ChunkError::Retry(e.to_string()))?;
        let status = resp.head.status;
        let total = match status {
            206 => resp
                .head
                .content_range_total
                .ok_or_else(|| ChunkError::Retry("206 without a Content-Range total".into()))?,
            200 if self.received == 0 => resp.head.content_length.unwrap_or(MAX_DOWNLOAD + 1),
            416 => {
                // We hold more than the server has: start over.
                self.restart();
                return Err(ChunkError::Retry(
                    "range not satisfiable; restarting the download".into(),
                ));
            }
            401 | 403 | 404 => {
                return Err(ChunkError::Refuse(format!(
                    "the server refused the download ({status})"
                )));
            }
            other => return Err(ChunkError::Retry(format!("the server answered {other}"))),
        };
        if total > MAX_DOWNLOAD {
            return Err(ChunkError::Refuse(format!(
                "the artifact is {total} bytes, over the limit of {MAX_DOWNLOAD}"
            )));
        }
        self.total = Some(total);
        let mut part = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.part)
            .map_err(|e| ChunkError::Retry(format!("cannot write {}: {e}", self.part.display())))?;
        // Hashed into a copy that is kept only when the whole chunk landed.
        let mut hasher = self.hasher.clone();
        let mut reader = resp.take(CHUNK + 1);
        let mut buf = [0u8; 16 * 1024];
        let mut got = 0u64;
        let streamed = loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) => break Err(ChunkError::Retry(format!("download: {e}"))),
            };
            got += n as u64;
            if self.received + got > total {
                self.restart();
                return Err(ChunkError::Refuse(format!(
                    "the server sent more than the {total} bytes it announced"
                )));
            }
            if let Err(e) = part.write_all(&buf[..n]) {
                break Err(ChunkError::Retry(format!("cannot write the download: {e}")));
            }
            hasher.update(&buf[..n]);
        }
        .and_then(|()| {
            part.sync_data()
                .map_err(|e| ChunkError::Retry(format!("cannot sync the download: {e}")))
        });
        if let Err(e) = streamed {
            // Cut what this chunk appended; if even that fails, start over.
            if part.set_len(self.received).is_err() {
                self.restart();
            }
            return Err(e);
        }
        self.received += got;
        self.hasher = hasher;
        if got == 0 && self.received < total {
            return Err(ChunkError::Retry("the server sent an empty chunk".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_hash_equals_the_hash_of_the_whole() {
        let dir = std::env::temp_dir().join(format!("stella-download-unit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.part");
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(&path, &bytes[..40_000]).unwrap();
        let (mut hasher, size) = hash_prefix(&mut File::open(&path).unwrap(), u64::MAX).unwrap();
        assert_eq!(size, 40_000);
        hasher.update(&bytes[40_000..]);
        assert_eq!(
            stella_proto::hash::hex(hasher.finish().as_ref()),
            stella_proto::hash::hex(&stella_proto::hash::sha256(&bytes))
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
