//! `update.integrity`: the running binary matches its installed digest, and
//! no update swap was interrupted.

use super::Finding;
use crate::state::MarkerPhase;

impl super::Doctor<'_> {
    pub(super) fn integrity(&self) -> Finding {
        if let Some(m) = &self.saved.update
            && m.phase == MarkerPhase::Swapping
        {
            return fail!(
                "update.integrity/interrupted",
                "an update to {} was interrupted during the binary swap",
                m.to_version
            );
        }
        // On probation the new binary is the one to match.
        let probation = self
            .saved
            .update
            .as_ref()
            .filter(|m| m.phase == MarkerPhase::Probation)
            .map(|m| &m.to_sha256);
        let Some(recorded) = probation.or(self.saved.binary_sha256.as_ref()) else {
            return skip!(
                "update.integrity/unrecorded",
                "no installed digest recorded for this binary"
            );
        };
        let exe = match std::env::current_exe() {
            Ok(p) => p,
            Err(e) => {
                return fail!(
                    "update.integrity/unreadable",
                    "cannot locate the running binary: {e}"
                );
            }
        };
        match crate::host::file_sha256(&exe) {
            Ok(digest) if &digest == recorded => {
                pass!(
                    "update.integrity/ok",
                    "{} matches its installed digest {}",
                    exe.display(),
                    &digest[..12]
                )
            }
            Ok(digest) => fail!(
                "update.integrity/mismatch",
                "{} has digest {} but {} was installed",
                exe.display(),
                &digest[..12],
                &recorded[..recorded.len().min(12)]
            ),
            Err(e) => fail!(
                "update.integrity/unreadable",
                "cannot read {}: {e}",
                exe.display()
            ),
        }
    }
}
