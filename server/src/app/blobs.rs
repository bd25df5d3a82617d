//! Blobs at run time: the local file of a blob, filled from the store when
//! this server has none (with PostgreSQL, another server stored it: the
//! chunks are streamed into a temp file, checked against the digest, fsynced
//! and renamed, so the file is whole or absent), and blobs written here
//! handed to the store before anyone is told they are stored. With redb the
//! data dir is the store's blob directory, so both are no-ops.

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::{App, lock};
use crate::blobs::{self, BlobWriter};
use crate::error::Error;
use crate::store::StoreError;

/// Blobs being filled from the store now, each with the lock its fill
/// holds: a second request for the same blob waits for the first fill and
/// then finds the file, instead of copying it again.
pub(crate) type BlobFills = Mutex<std::collections::HashMap<String, Arc<Mutex<()>>>>;

/// Takes a copied blob's bytes into a temp file, created at the first
/// byte (a blob the store does not have costs no file).
struct Sink<'a> {
    dir: &'a std::path::Path,
    writer: Option<BlobWriter>,
}

impl Sink<'_> {
    fn writer(&mut self) -> io::Result<&mut BlobWriter> {
        if self.writer.is_none() {
            self.writer = Some(BlobWriter::create_in(self.dir)?);
        }
        self.writer
            .as_mut()
            .ok_or_else(|| io::Error::other("no blob file"))
    }
}

impl Write for Sink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer()?.write(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl App {
    /// The local file of blob `sha256` and its size, if it is here now
    /// (no store call: cheap enough for the async threads).
    pub(crate) fn cached_blob(&self, sha256: &str) -> Option<(PathBuf, u64)> {
        let dir = blobs::blob_dir(&self.data_dir);
        blobs::size_in(&dir, sha256).map(|size| (dir.join(sha256), size))
    }

    /// The local file of blob `sha256` and its size, filled from the store
    /// when it is not here; `None` when the store has no such blob either.
    /// Blocking.
    pub(crate) fn local_blob(&self, sha256: &str) -> Result<Option<(PathBuf, u64)>, Error> {
        if !blobs::is_blob_name(sha256) {
            return Ok(None);
        }
        if let Some(found) = self.cached_blob(sha256) {
            return Ok(Some(found));
        }
        let gate = lock(&self.blob_fills)
            .entry(sha256.to_owned())
            .or_default()
            .clone();
        let filled = {
            let _one_fill_at_a_time = lock(&gate);
            match self.cached_blob(sha256) {
                Some(found) => Ok(Some(found)),
                None => self.fill_blob(sha256),
            }
        };
        lock(&self.blob_fills).remove(sha256);
        filled
    }

    /// Copies blob `sha256` from the store into the local blob directory.
    fn fill_blob(&self, sha256: &str) -> Result<Option<(PathBuf, u64)>, Error> {
        let dir = blobs::blob_dir(&self.data_dir);
        let mut sink = Sink {
            dir: &dir,
            writer: None,
        };
        if !self.store.copy_blob(sha256, &mut sink)? {
            return Ok(None);
        }
        let writer = match sink.writer.take() {
            Some(w) => w,
            None => BlobWriter::create_in(&dir)
                .map_err(|e| Error::io(format!("cannot write {}", dir.display()), e))?,
        };
        if writer.sha256() != sha256 {
            // Dropped: the temp file goes, nothing is cached.
            return Err(StoreError::Corrupt {
                what: "blob",
                key: format!(
                    "{sha256} (the stored bytes have sha256 {})",
                    writer.sha256()
                ),
            }
            .into());
        }
        let (_, size) = writer.finish().map_err(|e| {
            Error::io(
                format!("cannot store blob {sha256} in {}", dir.display()),
                e,
            )
        })?;
        crate::log::info(
            "blob copied from the store",
            &[("sha256", &sha256), ("size", &size)],
        );
        Ok(Some((dir.join(sha256), size)))
    }

    /// Hands the local blob file `sha256` (`size` bytes) to the store, so
    /// that every server finds it; a blob the store has is left as it is.
    /// Blocking.
    pub(crate) fn store_blob(&self, sha256: &str, size: u64) -> Result<(), Error> {
        let path = blobs::blob_path(&self.data_dir, sha256);
        let mut file = File::open(&path)
            .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
        self.store.put_blob(sha256, size, &mut file)?;
        Ok(())
    }
}
