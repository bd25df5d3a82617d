//! Registration tokens and enrollment: minting tokens (only the secret's hash
//! is kept), and turning a token plus a CSR into an agent with a certificate,
//! in one durable transaction, idempotent for a lost answer.

use std::time::Duration;

use stella_proto::RegistrationToken;
use stella_proto::api::{Labels, RegisterRequest, RegisterResponse, TokenCreateResponse};
use stella_proto::hash::hex;
use stella_proto::time::rfc3339;

use crate::app::{App, Metrics, Refused, lock, now_ms, now_secs};
use crate::ca::Ca;
use crate::error::Error;
use crate::lifecycle::LiveAgent;
use crate::log;
use crate::records::{ACTIVE, AgentRecord, CertRecord, HeartbeatState, TokenRecord};
use crate::store::{EnrollRefusal, Enrollment};

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

fn check_short(what: &str, s: &str, max: usize, allow_empty: bool) -> Result<(), String> {
    if (!allow_empty && s.is_empty()) || s.len() > max || s.chars().any(char::is_control) {
        return Err(format!(
            "invalid {what} {s:?}: 1-{max} printable characters"
        ));
    }
    Ok(())
}

/// Mints a token. Returns the only copy of its secret.
pub(crate) fn create(
    app: &App,
    ttl: Duration,
    uses: u32,
    labels: Labels,
) -> Result<TokenCreateResponse, Error> {
    if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
        return Err(Error::Invalid(format!(
            "token ttl must be between 1s and {}",
            stella_proto::format_duration(MAX_TOKEN_TTL)
        )));
    }
    if uses == 0 {
        return Err(Error::Invalid("token uses must be at least 1".into()));
    }
    check_labels(&labels).map_err(Error::Invalid)?;
    let mut random = [0u8; 38];
    crate::fsutil::random_bytes(&mut random)?;
    let token = RegistrationToken::from_random(&random);
    let now = now_secs();
    let expires_at = now + ttl.as_secs().max(1);
    let record = TokenRecord {
        id: token.id().to_owned(),
        secret_sha256: hex(&token.secret_hash()),
        created_at: now,
        expires_at,
        uses,
        uses_left: uses,
        labels,
    };
    app.store.insert_token(&record)?;
    log::info(
        "token created",
        &[
            ("token", &record.id),
            ("uses", &uses),
            ("expires_at", &rfc3339(expires_at)),
        ],
    );
    Ok(TokenCreateResponse {
        token: token.expose(),
        id: record.id,
        expires_at: rfc3339(expires_at),
        uses,
    })
}

fn new_agent_id() -> Result<String, Error> {
    let mut random = [0u8; 16];
    crate::fsutil::random_bytes(&mut random)?;
    Ok(stella_proto::id::agent_id_from_bytes(random))
}

fn refusal_message(refusal: EnrollRefusal) -> String {
    match refusal {
        EnrollRefusal::UnknownToken(id) => format!("token {id} is not known to this server"),
        EnrollRefusal::WrongSecret(id) => format!("token {id}: the secret does not match"),
        EnrollRefusal::Expired(id, at) => format!("token {id} has expired (at {})", rfc3339(at)),
        EnrollRefusal::UsedUp(id) => format!("token {id} has no uses left"),
        EnrollRefusal::Revoked(agent) => {
            format!("agent {agent}, enrolled with this token and key, has been revoked")
        }
    }
}

/// Enrolls an agent (blocking: signs and commits).
pub(crate) fn enroll(app: &App, req: RegisterRequest) -> Result<RegisterResponse, Refused> {
    let token =
        RegistrationToken::parse(&req.token).map_err(|e| Refused::new(400, e.to_string()))?;
    check_short("name", &req.name, 64, false).map_err(|m| Refused::new(400, m))?;
    check_short("version", &req.version, 64, false).map_err(|m| Refused::new(400, m))?;
    check_short("platform os", &req.platform.os, 32, false).map_err(|m| Refused::new(400, m))?;
    check_short("platform arch", &req.platform.arch, 32, false)
        .map_err(|m| Refused::new(400, m))?;
    check_short("platform target", &req.platform.target, 64, false)
        .map_err(|m| Refused::new(400, m))?;
    if req.capabilities.len() > MAX_CAPABILITIES {
        return Err(Refused::new(
            400,
            format!("too many capabilities (at most {MAX_CAPABILITIES})"),
        ));
    }
    for c in &req.capabilities {
        check_short("capability", c, 32, false).map_err(|m| Refused::new(400, m))?;
    }
    let asked_labels = req.labels.unwrap_or_default();
    check_labels(&asked_labels).map_err(|m| Refused::new(400, m))?;
    let csr = Ca::check_csr(&req.csr).map_err(|e| Refused::new(400, e.to_string()))?;

    let internal = |e: Error| {
        log::warn("enrollment failed", &[("error", &e)]);
        Refused::new(500, format!("enrollment failed on the server: {e}"))
    };
    let now = now_secs();
    let agent_id = new_agent_id().map_err(internal)?;
    let issued = app
        .ca
        .issue_agent_cert(&csr, &agent_id, now, app.settings.cert_lifetime)
        .map_err(internal)?;
    let mut agent = AgentRecord {
        id: agent_id,
        name: req.name,
        status: ACTIVE.to_owned(),
        reason: None,
        labels: asked_labels,
        platform: req.platform,
        version: req.version,
        capabilities: req.capabilities,
        enrolled_at: now,
        token_id: token.id().to_owned(),
        key_sha256: csr.key_sha256,
        cert_serial: issued.serial.clone(),
        cert_not_after: issued.not_after,
        previous_serial: None,
        renew_requested: false,
        update_offer: None,
    };
    let cert = CertRecord {
        agent_id: agent.id.clone(),
        serial: issued.serial,
        pem: issued.pem,
        issued_at: now,
        not_after: issued.not_after,
    };

    let _serial = lock(&app.lifecycle_lock);
    let mut configs = lock(&app.configs);
    let outcome = app
        .store
        .enroll(&token, now, &mut agent, &cert)
        .map_err(internal)?;
    let (agent, cert) = match outcome {
        Ok(Enrollment::Created) => {
            Metrics::bump(&app.metrics.enrollments);
            let desired = configs.desired(&agent);
            let mut fleet = lock(&app.fleet);
            fleet.agents.insert(
                agent.id.clone(),
                Box::new(LiveAgent {
                    record: agent.clone(),
                    hb: <HeartbeatState as Default>::default(),
                    last_seen_ms: now_ms(),
                    desired,
                }),
            );
            log::info(
                "agent enrolled",
                &[
                    ("agent", &agent.id),
                    ("name", &agent.name),
                    ("token", &token.id()),
                ],
            );
            (agent, cert)
        }
        Ok(Enrollment::Existing(earlier)) => {
            let (agent, cert) = *earlier;
            log::info(
                "enrollment retried: answering with the earlier registration",
                &[("agent", &agent.id), ("token", &token.id())],
            );
            (agent, cert)
        }
        Err(refusal) => {
            Metrics::bump(&app.metrics.token_failures);
            let message = refusal_message(refusal);
            log::warn("enrollment refused", &[("error", &message)]);
            return Err(Refused::new(401, message));
        }
    };
    let desired = configs.desired(&agent);
    drop(configs);
    Ok(RegisterResponse {
        config: desired.doc.clone(),
        config_hash: desired.hash.clone(),
        agent_id: agent.id,
        certificate: cert.pem,
        ca: app.ca.cert_pem.clone(),
        cert_not_after: rfc3339(cert.not_after),
        heartbeat_interval_ms: app.settings.heartbeat_interval.as_millis() as u64,
        labels: agent.labels,
    })
}
