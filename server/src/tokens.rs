//! Registration tokens and the enrollment rules: minting tokens (only the
//! secret's hash is kept), checking a registration request, and deciding an
//! enrollment from the stored token and any earlier enrollment of the same
//! token and key (expiry, uses, idempotent retry). Pure: the store runs the
//! decision inside its transaction, `app` drives it.

use std::time::Duration;

use stella_proto::RegistrationToken;
use stella_proto::api::{Labels, RegisterRequest};
use stella_proto::hash::hex;
use stella_proto::time::rfc3339;

use crate::records::{AgentRecord, AgentStatus, CertRecord, TokenRecord};
use crate::refusal::Refusal;
use crate::store::{EnrollmentState, NewEnrollment, PriorEnrollment};

/// Failed registrations allowed per source address and window before 429.
const MAX_FAILURES_PER_WINDOW: u32 = 10;
const FAILURE_WINDOW_MS: u64 = 60_000;
/// Addresses tracked at most (oldest windows are dropped first).
const MAX_TRACKED_SOURCES: usize = 100_000;

/// Failed registrations per source address in fixed one-minute windows.
#[derive(Debug, Default)]
pub(crate) struct FailureWindows {
    by_source: std::collections::HashMap<std::net::IpAddr, (u64, u32)>,
}

impl FailureWindows {
    /// Seconds until `source` may try again, if it is over the limit.
    pub(crate) fn blocked_for(&mut self, source: std::net::IpAddr, now_ms: u64) -> Option<u64> {
        let (start, failures) = *self.by_source.get(&source)?;
        if now_ms.saturating_sub(start) >= FAILURE_WINDOW_MS {
            self.by_source.remove(&source);
            return None;
        }
        (failures >= MAX_FAILURES_PER_WINDOW)
            .then(|| (start + FAILURE_WINDOW_MS - now_ms).div_ceil(1000))
    }

    /// Counts one failed registration from `source`.
    pub(crate) fn record(&mut self, source: std::net::IpAddr, now_ms: u64) {
        if self.by_source.len() >= MAX_TRACKED_SOURCES {
            self.by_source
                .retain(|_, (start, _)| now_ms.saturating_sub(*start) < FAILURE_WINDOW_MS);
        }
        let entry = self.by_source.entry(source).or_insert((now_ms, 0));
        if now_ms.saturating_sub(entry.0) >= FAILURE_WINDOW_MS {
            *entry = (now_ms, 0);
        }
        entry.1 += 1;
    }
}

/// Longest lifetime a token may be given.
pub(crate) const MAX_TOKEN_TTL: Duration = Duration::from_secs(365 * 86_400);
const MAX_LABELS: usize = 32;
const MAX_CAPABILITIES: usize = 32;

/// Checks label keys and values: `[A-Za-z0-9._/-]`, 1–63 characters (values may be empty).
pub(crate) fn check_labels(labels: &Labels) -> Result<(), String> {
    if labels.len() > MAX_LABELS {
        return Err(format!(
            "too many labels ({}, at most {MAX_LABELS})",
            labels.len()
        ));
    }
    let ok = |s: &str| {
        s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b))
    };
    for (k, v) in labels {
        if k.is_empty() || !ok(k) || !ok(v) {
            return Err(format!(
                "invalid label {k:?}={v:?}: use 1-63 characters of [A-Za-z0-9._/-] for keys, up to 63 for values"
            ));
        }
    }
    Ok(())
}

fn check_short(what: &str, s: &str, max: usize) -> Result<(), Refusal> {
    check_text(what, s, 1, max)
}

/// The rule for every string an agent sends (registration, heartbeats):
/// `min`-`max` bytes and no control character, since operators read these
/// in a terminal. The message names the field and shows the value escaped
/// (and cut short: it may be megabytes).
pub(crate) fn check_text(what: &str, s: &str, min: usize, max: usize) -> Result<(), Refusal> {
    if s.len() < min || s.len() > max || s.chars().any(char::is_control) {
        let shown: String = s.chars().take(64).collect();
        let more = if shown.len() < s.len() { "..." } else { "" };
        return Err(Refusal::bad_request(format!(
            "invalid {what} {shown:?}{more}: {min}-{max} bytes of printable characters"
        )));
    }
    Ok(())
}

/// Checks what `token create` asks for.
pub(crate) fn check_create(ttl: Duration, uses: u32, labels: &Labels) -> Result<(), Refusal> {
    if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
        return Err(Refusal::bad_request(format!(
            "token ttl must be between 1s and {}",
            stella_proto::format_duration(MAX_TOKEN_TTL)
        )));
    }
    if uses == 0 {
        return Err(Refusal::bad_request("token uses must be at least 1"));
    }
    check_labels(labels).map_err(Refusal::bad_request)
}

/// The stored form of a new token: its secret only as a hash.
pub(crate) fn record(
    token: &RegistrationToken,
    now: u64,
    ttl: Duration,
    uses: u32,
    labels: Labels,
) -> TokenRecord {
    TokenRecord {
        id: token.id().to_owned(),
        secret_sha256: hex(&token.secret_hash()),
        created_at: now,
        expires_at: now + ttl.as_secs().max(1),
        uses,
        uses_left: uses,
        labels,
    }
}

/// A registration request that passed every check on its own.
#[derive(Debug)]
pub(crate) struct Registration {
    pub(crate) token: RegistrationToken,
    pub(crate) labels: Labels,
    pub(crate) request: RegisterRequest,
}

/// Checks a registration request's fields (not its token's standing: that
/// is `decide`'s, against the store).
pub(crate) fn check_registration(mut req: RegisterRequest) -> Result<Registration, Refusal> {
    let token =
        RegistrationToken::parse(&req.token).map_err(|e| Refusal::bad_request(e.to_string()))?;
    check_short("name", &req.name, 64)?;
    check_short("version", &req.version, 64)?;
    check_short("platform os", &req.platform.os, 32)?;
    check_short("platform arch", &req.platform.arch, 32)?;
    check_short("platform target", &req.platform.target, 64)?;
    if req.capabilities.len() > MAX_CAPABILITIES {
        return Err(Refusal::bad_request(format!(
            "too many capabilities (at most {MAX_CAPABILITIES})"
        )));
    }
    for c in &req.capabilities {
        check_short("capability", c, 32)?;
    }
    let labels = req.labels.take().unwrap_or_default();
    check_labels(&labels).map_err(Refusal::bad_request)?;
    Ok(Registration {
        token,
        labels,
        request: req,
    })
}

/// The record of a newly enrolled agent (before the token's labels are added).
pub(crate) fn new_agent(
    reg: Registration,
    agent_id: String,
    key_sha256: String,
    cert: &CertRecord,
    now: u64,
) -> AgentRecord {
    let req = reg.request;
    AgentRecord {
        id: agent_id,
        name: req.name,
        status: AgentStatus::Active,
        reason: None,
        labels: reg.labels,
        platform: req.platform,
        version: req.version,
        capabilities: req.capabilities,
        enrolled_at: now,
        token_id: reg.token.id().to_owned(),
        key_sha256,
        cert_serial: cert.serial.clone(),
        cert_not_after: cert.not_after,
        previous_serial: None,
        renew_requested: false,
        update_offer: None,
        doctor_request: None,
    }
}

/// What an enrollment comes to.
#[derive(Debug)]
pub(crate) enum Decision {
    /// Record this: a token use consumed, a new agent and its certificate.
    Enroll(Box<NewEnrollment>),
    /// The same token and key enrolled within the retry window: the earlier
    /// answer stands, nothing is written.
    Existing(Box<PriorEnrollment>),
}

/// Decides an enrollment: an unknown token, a wrong secret, an expired or
/// used-up token all refuse (401) and change nothing; a retry of the same
/// token and key within `ENROLL_RETRY_WINDOW_SECS` returns the earlier
/// registration (unless that agent was revoked); otherwise one use of the
/// token is consumed and the agent, carrying the token's labels over its
/// own, is recorded.
pub(crate) fn decide(
    state: &EnrollmentState,
    presented: &RegistrationToken,
    now: u64,
    mut agent: AgentRecord,
    cert: CertRecord,
) -> Result<Decision, Refusal> {
    let Some(stored) = &state.token else {
        return Err(Refusal::unauthorized(format!(
            "token {} is not known to this server",
            presented.id()
        )));
    };
    let hash_ok = stella_proto::hash::unhex(&stored.secret_sha256)
        .is_some_and(|h| presented.matches_hash(&h));
    if !hash_ok {
        return Err(Refusal::unauthorized(format!(
            "token {}: the secret does not match",
            stored.id
        )));
    }
    if let Some(prior) = &state.prior
        && now.saturating_sub(prior.at) <= stella_proto::ENROLL_RETRY_WINDOW_SECS
    {
        if prior.agent.status == AgentStatus::Revoked {
            return Err(Refusal::unauthorized(format!(
                "agent {}, enrolled with this token and key, has been revoked",
                prior.agent.id
            )));
        }
        return Ok(Decision::Existing(Box::new(prior.clone())));
    }
    if now >= stored.expires_at {
        return Err(Refusal::unauthorized(format!(
            "token {} has expired (at {})",
            stored.id,
            rfc3339(stored.expires_at)
        )));
    }
    if stored.uses_left == 0 {
        return Err(Refusal::unauthorized(format!(
            "token {} has no uses left",
            stored.id
        )));
    }
    let mut token = stored.clone();
    token.uses_left -= 1;
    // The token's labels are the administrator's: they win over the agent's.
    for (k, v) in &token.labels {
        agent.labels.insert(k.clone(), v.clone());
    }
    Ok(Decision::Enroll(Box::new(NewEnrollment {
        token,
        agent,
        cert,
        at: now,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET_RANDOM: [u8; 38] = [7; 38];

    fn token() -> RegistrationToken {
        RegistrationToken::from_random(&SECRET_RANDOM)
    }

    fn stored(uses_left: u32, expires_at: u64) -> TokenRecord {
        let mut r = record(
            &token(),
            100,
            Duration::from_secs(1),
            3,
            Labels::from([("env".to_owned(), "prod".to_owned())]),
        );
        r.uses_left = uses_left;
        r.expires_at = expires_at;
        r
    }

    fn cert(serial: &str) -> CertRecord {
        CertRecord {
            agent_id: "agt_a".into(),
            serial: serial.into(),
            pem: String::new(),
            issued_at: 100,
            not_after: 200,
        }
    }

    fn agent(id: &str) -> AgentRecord {
        AgentRecord {
            id: id.into(),
            labels: Labels::from([
                ("env".to_owned(), "dev".to_owned()),
                ("own".to_owned(), "x".to_owned()),
            ]),
            version: "1".into(),
            enrolled_at: 100,
            token_id: token().id().to_owned(),
            cert_serial: "01".into(),
            cert_not_after: 200,
            previous_serial: None,
            ..AgentRecord::sample(AgentStatus::Active, None)
        }
    }

    fn state(token: Option<TokenRecord>, prior: Option<(u64, AgentStatus)>) -> EnrollmentState {
        EnrollmentState {
            token,
            prior: prior.map(|(at, status)| PriorEnrollment {
                at,
                agent: AgentRecord {
                    status,
                    ..agent("agt_prior")
                },
                cert: cert("01"),
            }),
        }
    }

    fn decide_at(state: &EnrollmentState, now: u64) -> Result<Decision, Refusal> {
        decide(state, &token(), now, agent("agt_new"), cert("02"))
    }

    #[test]
    fn a_good_token_is_consumed_once_and_its_labels_win() {
        let Ok(Decision::Enroll(new)) = decide_at(&state(Some(stored(2, 1000)), None), 500) else {
            panic!("expected an enrollment");
        };
        assert_eq!(new.token.uses_left, 1);
        assert_eq!(new.agent.labels["env"], "prod", "the token's label wins");
        assert_eq!(new.agent.labels["own"], "x", "the agent's own labels stay");
        assert_eq!(new.at, 500);
    }

    #[test]
    fn unknown_wrong_expired_and_used_up_tokens_are_refused_with_401() {
        let mut wrong = stored(1, 1000);
        wrong.secret_sha256 = hex(&[0; 32]);
        for (what, st, now, needle) in [
            ("unknown", state(None, None), 500, "not known"),
            (
                "wrong secret",
                state(Some(wrong), None),
                500,
                "does not match",
            ),
            (
                "expired",
                state(Some(stored(1, 1000)), None),
                1000,
                "expired",
            ),
            (
                "used up",
                state(Some(stored(0, 1000)), None),
                500,
                "no uses left",
            ),
        ] {
            match decide_at(&st, now) {
                Err(r) => {
                    assert_eq!(r.status(), 401, "{what}");
                    assert!(r.message.contains(needle), "{what}: {}", r.message);
                }
                Ok(d) => panic!("{what}: accepted as {d:?}"),
            }
        }
    }

    #[test]
    fn a_retry_within_the_window_returns_the_earlier_registration() {
        let window = stella_proto::ENROLL_RETRY_WINDOW_SECS;
        // Even when the token is used up or expired by now.
        let st = state(Some(stored(0, 1000)), Some((900, AgentStatus::Active)));
        let Ok(Decision::Existing(prior)) = decide_at(&st, 900 + window) else {
            panic!("expected the earlier registration");
        };
        assert_eq!(prior.agent.id, "agt_prior");
        // Past the window, the token's standing decides again.
        let st = state(Some(stored(1, 10_000)), Some((900, AgentStatus::Active)));
        assert!(matches!(
            decide_at(&st, 901 + window),
            Ok(Decision::Enroll(_))
        ));
        // A revoked agent is not handed back.
        let st = state(Some(stored(1, 10_000)), Some((900, AgentStatus::Revoked)));
        assert_eq!(decide_at(&st, 901).unwrap_err().status(), 401);
    }

    #[test]
    fn token_create_limits() {
        let none = Labels::new();
        assert!(check_create(Duration::from_secs(60), 1, &none).is_ok());
        assert!(check_create(Duration::ZERO, 1, &none).is_err());
        assert!(check_create(MAX_TOKEN_TTL + Duration::from_secs(1), 1, &none).is_err());
        assert!(check_create(Duration::from_secs(60), 0, &none).is_err());
        let bad = Labels::from([("a b".to_owned(), "v".to_owned())]);
        assert_eq!(
            check_create(Duration::from_secs(60), 1, &bad)
                .unwrap_err()
                .status(),
            400
        );
    }
}
