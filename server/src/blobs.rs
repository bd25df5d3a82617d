//! Blob files: content-addressed files under `blobs/sha256/<hex>` in the
//! data dir (release files, task artifacts), written through a temp file
//! that is hashed while written, fsynced and renamed under its digest, so a
//! blob file is either whole or absent. With redb this directory is the blob
//! store itself; with PostgreSQL it is this server's cache of the blobs the
//! database holds (`app` fills it). Plain files only: no store, no domain.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Bytes read or written at a time when a blob is copied.
pub(crate) const COPY_BUFFER: usize = 64 * 1024;

/// Where blob `sha256` lives in the blob directory of `data_dir`.
pub(crate) fn blob_path(data_dir: &Path, sha256: &str) -> PathBuf {
    blob_dir(data_dir).join(sha256)
}

/// The directory of `data_dir`'s blobs.
pub(crate) fn blob_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("blobs").join("sha256")
}

/// Whether `s` can name a blob (64 lowercase hex digits): anything else is
/// never turned into a path.
pub(crate) fn is_blob_name(s: &str) -> bool {
    stella_proto::task::is_sha256_hex(s)
}

/// The size of the blob file `sha256` in `dir` (a blob directory), if it
/// is there.
pub(crate) fn size_in(dir: &Path, sha256: &str) -> Option<u64> {
    if !is_blob_name(sha256) {
        return None;
    }
    fs::metadata(dir.join(sha256))
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len())
}

/// Every blob file in the blob directory `dir`: (sha256, size), by sha256.
pub(crate) fn list(dir: &Path) -> io::Result<Vec<(String, u64)>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if let Some(size) = size_in(dir, &name) {
            out.push((name, size));
        }
    }
    out.sort();
    Ok(out)
}

/// A blob being written: hashed while written to a temp file in the blob
/// directory, then stored under its sha256 (`finish`). Dropped unfinished,
/// it leaves nothing behind. Two writers of the same blob at once are safe:
/// each has its own temp file, and the rename of identical bytes over
/// identical bytes changes nothing.
pub(crate) struct BlobWriter {
    dir: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
    ctx: ring::digest::Context,
    size: u64,
}

impl BlobWriter {
    /// Starts a blob in the blob directory `dir` (created if needed).
    pub(crate) fn create_in(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let mut nonce = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| io::Error::other("the system random source failed"))?;
        let tmp = dir.join(format!(".upload.{}.tmp", stella_proto::hash::hex(&nonce)));
        let file = File::create(&tmp)?;
        Ok(Self {
            dir: dir.to_owned(),
            tmp,
            file: Some(file),
            ctx: ring::digest::Context::new(&ring::digest::SHA256),
            size: 0,
        })
    }

    /// Starts a blob in `data_dir`'s blob directory.
    pub(crate) fn create(data_dir: &Path) -> io::Result<Self> {
        Self::create_in(&blob_dir(data_dir))
    }

    /// Appends a piece.
    pub(crate) fn write(&mut self, piece: &[u8]) -> io::Result<()> {
        let Some(file) = self.file.as_mut() else {
            return Err(io::Error::other("blob already finished"));
        };
        file.write_all(piece)?;
        self.ctx.update(piece);
        self.size += piece.len() as u64;
        Ok(())
    }

    /// Appends everything `from` gives, up to `limit` bytes in all (more is
    /// an `InvalidData` error).
    pub(crate) fn copy_from(&mut self, from: &mut dyn Read, limit: u64) -> io::Result<()> {
        let mut buf = vec![0u8; COPY_BUFFER];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if self.size + n as u64 > limit {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("more than {limit} bytes"),
                ));
            }
            self.write(&buf[..n])?;
        }
    }

    /// The hex SHA-256 of what was written so far.
    pub(crate) fn sha256(&self) -> String {
        stella_proto::hash::hex(self.ctx.clone().finish().as_ref())
    }

    /// Bytes written so far.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Makes the blob durable under its sha256 (fsync, rename, fsync of the
    /// directory); returns (sha256, size). A blob that exists already is
    /// replaced by the same bytes.
    pub(crate) fn finish(mut self) -> io::Result<(String, u64)> {
        let file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("blob already finished"))?;
        let stored = (|| {
            file.sync_all()?;
            drop(file);
            let sha256 = self.sha256();
            fs::rename(&self.tmp, self.dir.join(&sha256))?;
            File::open(&self.dir)?.sync_all()?;
            Ok((sha256, self.size))
        })();
        if stored.is_err() {
            let _ = fs::remove_file(&self.tmp);
        }
        stored
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Hashes everything `from` gives: (sha256, size).
pub(crate) fn digest_of(from: &mut dyn Read) -> io::Result<(String, u64)> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut size = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        ctx.update(&buf[..n]);
        size += n as u64;
    }
    Ok((stella_proto::hash::hex(ctx.finish().as_ref()), size))
}
