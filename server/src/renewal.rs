//! Certificate renewal and recovery, as rules: which certificate a new one
//! replaces (the presented one stays accepted as `previous` until the agent
//! uses the new one, anything older is retired), who may renew over mTLS
//! (not a revoked agent; a deactivated one may), and who may recover after an
//! offline expiry by signing a fresh single-use challenge with the old key
//! (neither revoked nor deactivated, expired for less than `--expired-grace`).
//! Pure: `app` signs, stores and mirrors.

use std::collections::HashMap;
use std::time::Duration;

use stella_proto::time::rfc3339;

use crate::lifecycle::{self, Act};
use crate::records::{AgentRecord, AgentStatus, CertRecord};
use crate::refusal::{Refusal, Why};

/// How long a recovery challenge may be answered.
pub(crate) const CHALLENGE_TTL_MS: u64 = 60_000;
/// Most challenges outstanding at once (each is small; this bounds memory).
const MAX_CHALLENGES: usize = 10_000;

/// Outstanding recovery challenges: nonce → (agent id, expiry in ms).
#[derive(Debug, Default)]
pub(crate) struct Challenges {
    open: HashMap<String, (String, u64)>,
}

impl Challenges {
    /// Records `nonce` for `agent_id` until `now_ms + CHALLENGE_TTL_MS`.
    pub(crate) fn issue(
        &mut self,
        nonce: String,
        agent_id: &str,
        now_ms: u64,
    ) -> Result<u64, Refusal> {
        self.open.retain(|_, (_, expires)| *expires > now_ms);
        if self.open.len() >= MAX_CHALLENGES {
            return Err(Refusal::new(
                Why::TooManyRequests,
                "too many recovery challenges outstanding; retry later",
            ));
        }
        let expires = now_ms + CHALLENGE_TTL_MS;
        self.open.insert(nonce, (agent_id.to_owned(), expires));
        Ok(expires)
    }

    /// Uses up `nonce`: it must be open, unexpired and for `agent_id`.
    pub(crate) fn take(&mut self, nonce: &str, agent_id: &str, now_ms: u64) -> Result<(), Refusal> {
        match self.open.remove(nonce) {
            Some((agent, expires)) if agent == agent_id && expires > now_ms => Ok(()),
            _ => Err(Refusal::unauthorized(
                "the recovery challenge is unknown, used or expired",
            )),
        }
    }
}

/// Why a certificate is being replaced.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Reissue {
    /// Over mTLS with the current (or previous) certificate.
    Renew,
    /// After an offline expiry, proven with the old key; the old certificate
    /// expired at `old_not_after`.
    Recover { old_not_after: u64, now: u64 },
}

fn enroll_again(id: &str, why: &str) -> Refusal {
    Refusal::unauthorized(format!(
        "agent {id} cannot recover: {why}; enroll the host again with a new token"
    ))
}

/// Applies a new certificate `cert` (for key `key_sha256`) to the agent's
/// record in place of `presented`, if the rules allow; returns the audit
/// detail. Every refusal is 401: the caller must enroll again.
pub(crate) fn replace(
    r: &mut AgentRecord,
    presented: &str,
    cert: &CertRecord,
    key_sha256: &str,
    why: Reissue,
    grace: Duration,
) -> Result<String, Refusal> {
    match why {
        // The gate's rule again, inside the transaction that writes.
        Reissue::Renew => lifecycle::may_act(Some(r), &r.id, presented, Act::Renew)?,
        Reissue::Recover { old_not_after, now } => {
            if !r.accepts_serial(presented) {
                return Err(Refusal::unauthorized(format!(
                    "certificate {presented} of agent {} has been superseded or revoked",
                    r.id
                )));
            }
            if r.status == AgentStatus::Revoked {
                return Err(enroll_again(&r.id, "it is revoked"));
            }
            if r.is_deactivated() {
                return Err(enroll_again(&r.id, "it is deactivated"));
            }
            if now > old_not_after + grace.as_secs() {
                return Err(enroll_again(
                    &r.id,
                    &format!(
                        "its certificate expired at {}, more than {} ago",
                        rfc3339(old_not_after),
                        stella_proto::format_duration(grace)
                    ),
                ));
            }
        }
    }
    let retired = std::mem::replace(&mut r.cert_serial, cert.serial.clone());
    r.previous_serial = Some(presented.to_owned());
    r.cert_not_after = cert.not_after;
    r.key_sha256 = key_sha256.to_owned();
    r.renew_requested = false;
    Ok(format!(
        "serial={} replaces={} retired={}",
        cert.serial,
        presented,
        if retired == presented {
            "-"
        } else {
            retired.as_str()
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::InactiveReason;

    fn record(status: AgentStatus, reason: Option<InactiveReason>) -> AgentRecord {
        AgentRecord {
            version: "1".into(),
            key_sha256: "k0".into(),
            cert_serial: "s2".into(),
            cert_not_after: 100,
            previous_serial: Some("s1".into()),
            renew_requested: true,
            ..AgentRecord::sample(status, reason)
        }
    }

    fn cert() -> CertRecord {
        CertRecord {
            agent_id: "agt_a".into(),
            serial: "s3".into(),
            pem: String::new(),
            issued_at: 50,
            not_after: 500,
        }
    }

    const GRACE: Duration = Duration::from_secs(100);

    #[test]
    fn renewal_keeps_the_presented_certificate_and_retires_older_ones() {
        let mut r = record(AgentStatus::Active, None);
        let detail = replace(&mut r, "s1", &cert(), "k1", Reissue::Renew, GRACE).unwrap();
        assert_eq!(detail, "serial=s3 replaces=s1 retired=s2");
        assert_eq!(
            (r.cert_serial.as_str(), r.previous_serial.as_deref()),
            ("s3", Some("s1"))
        );
        assert_eq!((r.cert_not_after, r.key_sha256.as_str()), (500, "k1"));
        assert!(!r.renew_requested);
        let mut r = record(AgentStatus::Active, None);
        let detail = replace(&mut r, "s2", &cert(), "k1", Reissue::Renew, GRACE).unwrap();
        assert_eq!(detail, "serial=s3 replaces=s2 retired=-");
    }

    #[test]
    fn who_may_renew_and_recover() {
        use AgentStatus::*;
        let deactivated = (Inactive, Some(InactiveReason::Deactivated));
        let recover = |now| Reissue::Recover {
            old_not_after: 100,
            now,
        };
        let cases = [
            ((Active, None), "s0", Reissue::Renew, Err(401)),
            ((Revoked, None), "s2", Reissue::Renew, Err(401)),
            (deactivated, "s2", Reissue::Renew, Ok(())),
            ((Active, None), "s2", recover(200), Ok(())),
            ((Active, None), "s2", recover(201), Err(401)),
            (deactivated, "s2", recover(150), Err(401)),
            ((Revoked, None), "s2", recover(150), Err(401)),
        ];
        for ((status, reason), presented, why, want) in cases {
            let mut r = record(status, reason);
            let got = replace(&mut r, presented, &cert(), "k1", why, GRACE)
                .map(|_| ())
                .map_err(|e| e.status());
            assert_eq!(got, want, "{status}/{reason:?} {presented} {why:?}");
        }
    }

    #[test]
    fn a_challenge_is_single_use_for_one_agent_and_expires() {
        let mut c = Challenges::default();
        let expires = c.issue("n1".into(), "agt_a", 1_000).unwrap();
        assert_eq!(expires, 1_000 + CHALLENGE_TTL_MS);
        assert!(c.take("n1", "agt_b", 1_001).is_err(), "another agent's");
        assert!(
            c.take("n1", "agt_a", 1_001).is_err(),
            "used by the failed try"
        );
        c.issue("n2".into(), "agt_a", 1_000).unwrap();
        assert!(c.take("n2", "agt_a", expires).is_err(), "expired");
        c.issue("n3".into(), "agt_a", 1_000).unwrap();
        assert!(c.take("n3", "agt_a", 1_500).is_ok());
        assert!(c.take("n3", "agt_a", 1_500).is_err(), "single use");
    }
}
