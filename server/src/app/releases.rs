//! Releases at run time: importing one (blobs first, then the durable record,
//! then the in-memory list), listing them, and finding an agent's artifact.

use std::path::{Path, PathBuf};

use stella_proto::api::ReleaseView;

use super::{App, lock, now_secs};
use crate::error::Error;
use crate::releases;

impl App {
    /// `release import DIR`. Blocking.
    pub(crate) fn import_release(&self, dir: &Path) -> Result<ReleaseView, Error> {
        let record = releases::stage_import(&self.data_dir, dir, now_secs())?;
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

    /// The blob holding `version`'s agent for `target`: (path, size).
    pub(crate) fn artifact(&self, version: &str, target: &str) -> Option<(PathBuf, u64)> {
        lock(&self.releases).artifact(&self.data_dir, version, target)
    }
}
