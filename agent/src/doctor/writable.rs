//! `storage.writable`: the state dir is mode 0700 and writable (checked
//! without writing), with no stale temp files.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use super::Finding;
use crate::sys;

impl super::Doctor<'_> {
    pub(super) fn writable(&self) -> Finding {
        let root = self.state.root();
        let Ok(meta) = fs::metadata(root) else {
            return fail!(
                "storage.writable/missing",
                "the state dir {} is missing",
                root.display()
            );
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode != 0o700 {
            return fail!(
                "storage.writable/mode",
                "the state dir has mode {mode:04o}; it must be 0700"
            );
        }
        if sys::statvfs(root).is_ok_and(|s| s.read_only) {
            return fail!(
                "storage.writable/read-only",
                "the state dir is on a read-only filesystem"
            );
        }
        if !sys::can_write(root).unwrap_or(false) {
            return fail!(
                "storage.writable/denied",
                "this process cannot write to the state dir"
            );
        }
        let stale = self.state.stale_temp_files();
        if let Some(first) = stale.first() {
            return warn!(
                "storage.writable/stale-temp",
                "{} stale temp file(s), e.g. {}",
                stale.len(),
                first
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            );
        }
        pass!(
            "storage.writable/ok",
            "mode 0700, writable, no stale temp files"
        )
    }
}
