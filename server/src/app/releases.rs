//! Releases at run time: importing one (blobs first, in the store too, then
//! the durable record, then the in-memory list), from a directory on this
//! host or from an envelope whose files were uploaded, listing them, and
//! finding an agent's artifact.

use std::path::Path;

use stella_proto::api::ReleaseView;

use super::{App, lock, now_secs};
use crate::error::Error;
use crate::records::ReleaseRecord;
use crate::releases;

impl App {
    /// `release import DIR` with DIR on this host. Blocking.
    pub(crate) fn import_release(&self, dir: &Path) -> Result<ReleaseView, Error> {
        let record = releases::stage_import(&self.data_dir, dir, now_secs())?;
        self.record_release(record)
    }

    /// `release import DIR --server URL`: the release `envelope` signs,
    /// whose files were uploaded (`POST /v1/admin/artifacts`) to this server
    /// or, with PostgreSQL, any other. Blocking.
    pub(crate) fn import_uploaded_release(&self, envelope: &str) -> Result<ReleaseView, Error> {
        let record = releases::stage_envelope(envelope, now_secs(), &mut |sha256| {
            let Some((path, _)) = self.local_blob(sha256)? else {
                return Ok(None);
            };
            std::fs::File::open(&path)
                .map(Some)
                .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))
        })?;
        self.record_release(record)
    }

    /// Stores a staged release's blobs in the store, then its record (the
    /// same envelope again changes nothing, but stores blobs the store
    /// lacks: those of a release imported before blobs were kept there).
    fn record_release(&self, record: ReleaseRecord) -> Result<ReleaseView, Error> {
        for file in &record.files {
            self.store_blob(&file.sha256, file.size)?;
        }
        if let Some(existing) = self.store.insert_release(&record)? {
            releases::check_reimport(&existing, &record)?;
            return Ok(releases::view(&existing));
        }
        let view = releases::view(&record);
        lock(&self.releases).insert(record);
        crate::log::info(
            "release imported",
            &[("version", &view.version), ("files", &view.files.len())],
        );
        Ok(view)
    }

    /// Every imported release.
    pub(crate) fn release_views(&self) -> Vec<ReleaseView> {
        lock(&self.releases)
            .by_version
            .values()
            .map(releases::view)
            .collect()
    }

    /// The sha256 of the blob holding `version`'s agent for `target`.
    pub(crate) fn artifact(&self, version: &str, target: &str) -> Option<String> {
        lock(&self.releases).artifact(version, target)
    }
}
