//! `identity.renewal`: time left against the renewal window (warn when
//! due, fail when less than 10% of the lifetime is left).

use stella_proto::time::rfc3339;

use super::{Finding, human, now_secs};

impl super::Doctor<'_> {
    pub(super) fn renewal(&self) -> Finding {
        let Some(info) = self.cert_info() else {
            return skip!("identity.renewal/no-certificate", "no readable certificate");
        };
        let now = now_secs();
        let lifetime = info.not_after.saturating_sub(info.not_before).max(1);
        let left = info.not_after.saturating_sub(now);
        let due = info.not_before + lifetime * 60 / 100;
        if left == 0 {
            return fail!(
                "identity.renewal/expired",
                "the certificate expired at {}",
                rfc3339(info.not_after)
            );
        }
        if left * 10 < lifetime {
            return fail!(
                "identity.renewal/overdue",
                "only {} left of {}: renewal is overdue",
                human(left),
                human(lifetime)
            );
        }
        if now >= due {
            return warn!(
                "identity.renewal/due",
                "renewal due: {} left of {}",
                human(left),
                human(lifetime)
            );
        }
        pass!(
            "identity.renewal/ok",
            "renewal window opens in {} ({} left)",
            human(due - now),
            human(left)
        )
    }
}
