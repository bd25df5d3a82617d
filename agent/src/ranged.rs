//! A file fetched from the server in ranged chunks (HTTP Range), as release
//! downloads and task artifacts are: each chunk is appended to a part file
//! in the staging dir and hashed as it arrives, so heartbeats go on between
//! chunks, an interruption resumes where the bytes on disk end, and the
//! finished file is never read again to hash it. A chunk that breaks off is
//! cut from the file again, so file and hash always hold the same bytes.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use ring::digest::{Context, SHA256};

use crate::state::StateDir;
use crate::transport::{Client, Extra};

/// Bytes fetched per scheduler turn, so heartbeats are not held up.
const CHUNK: u64 = 1 << 20;

/// Why a chunk did not arrive.
pub(crate) enum ChunkError {
    /// The file is unacceptable: give up on it.
    Refuse(String),
    /// A passing problem: resume later.
    Retry(String),
}

/// A part file and the hash of the bytes it holds.
pub(crate) struct PartFile {
    pub(crate) path: PathBuf,
    /// Bytes in the part file, all of them hashed into `hasher`.
    pub(crate) received: u64,
    /// The size the server announced, once a chunk came.
    pub(crate) total: Option<u64>,
    hasher: Context,
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

impl PartFile {
    /// A part file at `path`, resuming from the bytes it already holds (an
    /// earlier process got that far) unless they are more than `limit` or
    /// cannot be read: then it starts over. `Some(n)`: resumed at byte n.
    pub(crate) fn resume(path: PathBuf, limit: u64) -> (Self, Option<u64>) {
        let mut part = PartFile {
            path,
            received: 0,
            total: None,
            hasher: Context::new(&SHA256),
        };
        let held = fs::metadata(&part.path).map_or(0, |m| m.len());
        if held == 0 {
            return (part, None);
        }
        match File::open(&part.path).and_then(|mut f| hash_prefix(&mut f, held)) {
            Ok((hasher, size)) if size == held && size <= limit => {
                part.hasher = hasher;
                part.received = size;
                (part, Some(size))
            }
            _ => {
                part.restart();
                (part, None)
            }
        }
    }

    /// Whether every announced byte is here.
    pub(crate) fn is_complete(&self) -> bool {
        self.total.is_some_and(|t| self.received >= t)
    }

    /// Hex SHA-256 of the bytes received so far.
    pub(crate) fn digest(&self) -> String {
        stella_proto::hash::hex(self.hasher.clone().finish().as_ref())
    }

    /// Forgets what was received: the part file and its hash.
    pub(crate) fn restart(&mut self) {
        let _ = fs::remove_file(&self.path);
        self.received = 0;
        self.hasher = Context::new(&SHA256);
    }

    /// Fetches the next chunk of `url` (`what` names it in refusals) and
    /// refuses a file announced larger than `max`.
    pub(crate) fn fetch_chunk(
        &mut self,
        state: &StateDir,
        client: &mut Client,
        url: &str,
        what: &str,
        max: u64,
    ) -> Result<(), ChunkError> {
        state
            .create_staging()
            .map_err(|e| ChunkError::Retry(format!("cannot create the staging dir: {e}")))?;
        let extra = Extra {
            range: Some((self.received, self.received + CHUNK - 1)),
            ..Default::default()
        };
        let resp = client
            .send("GET", url, &extra)
            .map_err(|e| ChunkError::Retry(format!("GET {url}: {e}")))?;
        let status = resp.head.status;
        let total = match status {
            206 => resp
                .head
                .content_range_total
                .ok_or_else(|| ChunkError::Retry("206 without a Content-Range total".into()))?,
            200 if self.received == 0 => resp.head.content_length.unwrap_or(max + 1),
            416 => {
                // We hold more than the server has: start over.
                self.restart();
                return Err(ChunkError::Retry(
                    "range not satisfiable; starting over".into(),
                ));
            }
            401 | 403 | 404 => {
                return Err(ChunkError::Refuse(format!(
                    "the server refused {what} ({status})"
                )));
            }
            other => return Err(ChunkError::Retry(format!("the server answered {other}"))),
        };
        if total > max {
            return Err(ChunkError::Refuse(format!(
                "{what} is {total} bytes, over the limit of {max}"
            )));
        }
        self.total = Some(total);
        let mut part = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(|e| ChunkError::Retry(format!("cannot write {}: {e}", self.path.display())))?;
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
        let dir = std::env::temp_dir().join(format!("stella-ranged-unit-{}", std::process::id()));
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
