//! Certificate renewal: over mTLS with the current certificate (or the one
//! it replaced, if the agent never got the answer), on request from an
//! administrator, and recovery after an offline expiry by signing a fresh
//! single-use challenge with the old key, within `--expired-grace`.

use std::collections::HashMap;

use base64::Engine;
use stella_proto::api::{
    CertificateResponse, ChallengeRequest, ChallengeResponse, RecoverRequest, RenewRequest,
};
use stella_proto::time::rfc3339;

use crate::api::Peer;
use crate::app::{App, Metrics, Refused, lock, now_ms, now_secs};
use crate::ca::{self, Ca};
use crate::error::Error;
use crate::lifecycle;
use crate::log;
use crate::records::{AgentRecord, CertRecord, DEACTIVATED, INACTIVE, REVOKED};

/// How long a recovery challenge may be answered.
const CHALLENGE_TTL_MS: u64 = 60_000;
/// Most challenges outstanding at once (each is small; this bounds memory).
const MAX_CHALLENGES: usize = 10_000;

/// Outstanding recovery challenges: nonce → (agent id, expiry in ms).
#[derive(Debug, Default)]
pub(crate) struct Challenges {
    open: HashMap<String, (String, u64)>,
}

fn internal(e: Error) -> Refused {
    log::warn("certificate request failed", &[("error", &e)]);
    Refused::new(
        500,
        format!("certificate request failed on the server: {e}"),
    )
}

fn refusal(e: Error) -> Refused {
    match e {
        Error::Conflict(m) | Error::NotFound(m) => Refused::new(401, m),
        Error::Invalid(m) => Refused::new(403, m),
        other => internal(other),
    }
}

/// Issues a certificate for `csr_pem` and records it in place of `presented`.
fn reissue(
    app: &App,
    agent_id: &str,
    presented: &str,
    csr_pem: &str,
    check: impl FnOnce(&AgentRecord) -> Result<(), Error>,
) -> Result<CertificateResponse, Refused> {
    let csr = Ca::check_csr(csr_pem).map_err(|e| Refused::new(400, e.to_string()))?;
    let now = now_secs();
    let issued = app
        .ca
        .issue_agent_cert(&csr, agent_id, now, app.settings.cert_lifetime)
        .map_err(internal)?;
    let cert = CertRecord {
        agent_id: agent_id.to_owned(),
        serial: issued.serial,
        pem: issued.pem,
        issued_at: now,
        not_after: issued.not_after,
    };
    let _serial = lock(&app.lifecycle_lock);
    let record = app
        .store
        .replace_certificate(agent_id, presented, &cert, &csr.key_sha256, check)
        .map_err(refusal)?;
    lifecycle::mirror(&mut lock(&app.fleet), record);
    log::info(
        "certificate issued",
        &[
            ("agent", &agent_id),
            ("serial", &cert.serial),
            ("replaces", &presented),
            ("not_after", &rfc3339(cert.not_after)),
        ],
    );
    Ok(CertificateResponse {
        certificate: cert.pem,
        ca: app.ca.cert_pem.clone(),
        cert_not_after: rfc3339(cert.not_after),
    })
}

/// Renewal over mTLS. Deactivated agents may renew (so that they are still
/// reachable when activated again); revoked ones may not.
pub(crate) fn renew(
    app: &App,
    peer: &Peer,
    req: &RenewRequest,
) -> Result<CertificateResponse, Refused> {
    let response = reissue(app, &peer.agent_id, &peer.serial, &req.csr, |r| {
        if r.status == REVOKED {
            return Err(Error::Conflict(format!(
                "agent {} is revoked: enroll the host again with a new token",
                r.id
            )));
        }
        Ok(())
    })?;
    Metrics::bump(&app.metrics.renewals);
    Ok(response)
}

/// Hands out a single-use nonce for an agent to sign with its old key.
pub(crate) fn challenge(app: &App, req: &ChallengeRequest) -> Result<ChallengeResponse, Refused> {
    if !stella_proto::id::is_agent_id(&req.agent_id) {
        return Err(Refused::new(
            400,
            format!("{:?} is not an agent id", req.agent_id),
        ));
    }
    let mut random = [0u8; 32];
    crate::fsutil::random_bytes(&mut random).map_err(internal)?;
    let nonce = stella_proto::hash::hex(&random);
    let now = now_ms();
    let mut challenges = lock(&app.challenges);
    challenges.open.retain(|_, (_, expires)| *expires > now);
    if challenges.open.len() >= MAX_CHALLENGES {
        return Err(Refused::new(
            429,
            "too many recovery challenges outstanding; retry later",
        ));
    }
    challenges.open.insert(
        nonce.clone(),
        (req.agent_id.clone(), now + CHALLENGE_TTL_MS),
    );
    Ok(ChallengeResponse {
        challenge: nonce,
        expires_at: rfc3339((now + CHALLENGE_TTL_MS) / 1000),
    })
}

fn enroll_again(id: &str, why: &str) -> Error {
    Error::Conflict(format!(
        "agent {id} cannot recover: {why}; enroll the host again with a new token"
    ))
}

/// Recovery after an offline expiry: the challenge must be fresh and for this
/// agent, the signature must verify with the key of its current (or previous)
/// certificate, that certificate must be expired for less than the grace, and
/// the agent neither revoked nor deactivated.
pub(crate) fn recover(app: &App, req: &RecoverRequest) -> Result<CertificateResponse, Refused> {
    let denied = |m: String| Refused::new(401, m);
    let issued_for = {
        let mut challenges = lock(&app.challenges);
        challenges.open.remove(&req.challenge)
    };
    match issued_for {
        Some((agent, expires)) if agent == req.agent_id && expires > now_ms() => {}
        _ => {
            return Err(denied(
                "the recovery challenge is unknown, used or expired".into(),
            ));
        }
    }
    let signature = base64::engine::general_purpose::STANDARD
        .decode(req.signature.as_bytes())
        .map_err(|_| Refused::new(400, "the recovery signature is not base64"))?;
    let record = {
        let fleet = lock(&app.fleet);
        match fleet.agents.get(&req.agent_id) {
            Some(live) => live.record.clone(),
            None => {
                return Err(denied(format!(
                    "agent {} is not known to this server",
                    req.agent_id
                )));
            }
        }
    };
    let message = stella_proto::api::recovery_message(&req.agent_id, &req.challenge);
    let mut proven = None;
    for serial in std::iter::once(&record.cert_serial).chain(record.previous_serial.as_ref()) {
        let Some(cert) = app.store.cert(serial).map_err(internal)? else {
            continue;
        };
        if ca::verify_by_cert_key(&cert.pem, &message, &signature) {
            proven = Some(cert);
            break;
        }
    }
    let Some(old) = proven else {
        return Err(denied(format!(
            "the signature does not match the key of agent {}'s certificate",
            req.agent_id
        )));
    };
    let grace = app.settings.expired_grace.as_secs();
    let now = now_secs();
    let response = reissue(app, &req.agent_id, &old.serial, &req.csr, |r| {
        if r.status == REVOKED {
            return Err(enroll_again(&r.id, "it is revoked"));
        }
        if r.status == INACTIVE && r.reason.as_deref() == Some(DEACTIVATED) {
            return Err(enroll_again(&r.id, "it is deactivated"));
        }
        if now > old.not_after + grace {
            return Err(enroll_again(
                &r.id,
                &format!(
                    "its certificate expired at {}, more than {} ago",
                    rfc3339(old.not_after),
                    stella_proto::format_duration(app.settings.expired_grace)
                ),
            ));
        }
        Ok(())
    })?;
    Metrics::bump(&app.metrics.recoveries);
    log::info(
        "agent recovered after expiry",
        &[("agent", &req.agent_id), ("old_serial", &old.serial)],
    );
    Ok(response)
}
