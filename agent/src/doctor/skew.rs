//! `time.skew`: the local clock against the server's, within
//! `max_clock_skew`.

use stella_proto::states::CheckStatus;

use super::Finding;

impl super::Doctor<'_> {
    pub(super) fn skew(&self) -> Finding {
        if self.probe.borrow().is_none() {
            let (_, probe) = self.probe_server();
            *self.probe.borrow_mut() = Some(probe);
        }
        let probe = self.probe.borrow().clone();
        let Some(skew) =
            probe.and_then(|p| p.skew_ms.filter(|_| p.finding_status != CheckStatus::Fail))
        else {
            return skip!("time.skew/unknown", "the server's clock could not be read");
        };
        let allowed = self.settings.max_clock_skew.as_millis() as i64;
        if skew.abs() > allowed {
            return fail!(
                "time.skew/skew",
                "the local clock is {} ms {} the server's (allowed {})",
                skew.abs(),
                if skew > 0 { "ahead of" } else { "behind" },
                stella_proto::format_duration(self.settings.max_clock_skew)
            );
        }
        pass!(
            "time.skew/ok",
            "within {} ms of the server's clock (allowed {})",
            skew.abs(),
            stella_proto::format_duration(self.settings.max_clock_skew)
        )
    }
}
