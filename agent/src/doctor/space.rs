//! `storage.space`: free space and inodes in the state dir, enough to stage
//! an update on top of the configured reserve.

use std::fs;
use std::path::Path;

use super::{Finding, mib};
use crate::sys;

impl super::Doctor<'_> {
    pub(super) fn space(&self) -> Finding {
        let dir = if self.state.root().exists() {
            self.state.root()
        } else {
            Path::new("/")
        };
        let stats = match sys::statvfs(dir) {
            Ok(s) => s,
            Err(e) => {
                return fail!(
                    "storage.space/unknown",
                    "cannot read free space of {}: {e}",
                    dir.display()
                );
            }
        };
        // Room for one staged update on top of the configured reserve.
        let binary = std::env::current_exe()
            .and_then(fs::metadata)
            .map_or(0, |m| m.len());
        let needed = self.settings.disk_min_free + 2 * binary;
        if stats.avail_bytes < needed {
            return fail!(
                "storage.space/low",
                "{} free, {} needed ({} reserve + room to stage an update; {} in staging/)",
                mib(stats.avail_bytes),
                mib(needed),
                mib(self.settings.disk_min_free),
                mib(self.state.staging_bytes())
            );
        }
        if stats.avail_inodes < 1024 {
            return fail!(
                "storage.space/inodes",
                "only {} inodes free",
                stats.avail_inodes
            );
        }
        pass!(
            "storage.space/ok",
            "{} and {} inodes free (need {})",
            mib(stats.avail_bytes),
            stats.avail_inodes,
            mib(needed)
        )
    }
}
