//! Certificate renewal (docs/design.md section 3): scheduled at a random point in
//! 60–75% of the lifetime, over mTLS with the current certificate; after an
//! offline expiry, recovery by signing a server challenge with the old key.
//! The new key and certificate replace the old pair with renames that a
//! crash at any step cannot break (`finish_interrupted_renewal` settles
//! what a crash left).

use std::time::Duration;

use base64::Engine;
use miniserde::json;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::EcdsaKeyPair;
use stella_proto::api::{
    CertificateResponse, ChallengeRequest, ChallengeResponse, RecoverRequest, RenewRequest,
};

use crate::der::{self, CertInfo};
use crate::error::Error;
use crate::identity::{self, Identity, cert_der_from_pem, csr_pem, key_spki, read_key};
use crate::state::{AGENT_CERT, AGENT_KEY, NEXT_CERT, NEXT_KEY, StateDir};
use crate::{fault, log, transport};

/// A point in [60%, 75%] of the certificate's validity, as Unix seconds:
/// when to renew. Drawn at random so a fleet enrolled together spreads out.
pub(crate) fn renewal_due(cert: &CertInfo, rng: &SystemRandom) -> u64 {
    let lifetime = cert.not_after.saturating_sub(cert.not_before);
    let mut b = [0u8; 4];
    let _ = rng.fill(&mut b);
    let unit = f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0);
    cert.not_before + (lifetime as f64 * (0.60 + 0.15 * unit)) as u64
}

/// Why a renewal did not happen.
#[derive(Debug)]
pub(crate) enum RenewError {
    /// The server refuses this agent for good (revoked, beyond the grace,
    /// deactivated while expired): it must be enrolled again.
    Refused(String),
    /// Try again later; the working pair is untouched.
    Failed(Error),
}

impl From<Error> for RenewError {
    fn from(e: Error) -> Self {
        RenewError::Failed(e)
    }
}

impl RenewError {
    /// As the agent's error: a refusal is a network failure to whoever asked
    /// outside the run loop (remediation).
    pub(crate) fn into_error(self) -> Error {
        match self {
            RenewError::Refused(message) => Error::Network {
                context: message,
                source: None,
            },
            RenewError::Failed(e) => e,
        }
    }
}

/// The next key: the one a previous attempt left, or a new one (written 0600
/// before it is used, so a lost answer can be retried with the same key).
fn next_key(state: &StateDir) -> Result<EcdsaKeyPair, Error> {
    if let Ok(Some(key)) = read_key(state, NEXT_KEY) {
        return Ok(key);
    }
    let der = identity::generate_key()?;
    state.write_atomic(
        NEXT_KEY,
        stella_proto::pem::encode("PRIVATE KEY", &der).as_bytes(),
        0o600,
    )?;
    identity::load_key(&der)
}

/// Completes a renewal that a crash interrupted, so that `agent.key` and
/// `agent.pem` match again. The swap renames the key first, then the
/// certificate; every state a crash can leave is handled:
/// - next key and next certificate both present and matching: swap both;
/// - current key matches the next certificate (crash between the renames):
///   rename the certificate;
/// - a next certificate that matches nothing: stale, removed.
///
/// A next key alone is kept: the next renewal reuses it. Returns whether
/// anything changed.
pub(crate) fn finish_interrupted_renewal(state: &StateDir) -> Result<bool, Error> {
    let Ok(next_pem) = state.read_text(NEXT_CERT) else {
        return Ok(false);
    };
    let next_cert = cert_der_from_pem(&next_pem, NEXT_CERT).and_then(|d| der::cert_info(&d));
    let Ok(next_cert) = next_cert else {
        state.remove(NEXT_CERT)?;
        return Ok(true);
    };
    let matches = |name: &str| -> bool {
        matches!(read_key(state, name), Ok(Some(k)) if key_spki(&k) == next_cert.spki)
    };
    if matches(NEXT_KEY) {
        state.rename(NEXT_KEY, AGENT_KEY)?;
        state.rename(NEXT_CERT, AGENT_CERT)?;
        log::info(
            "finished an interrupted certificate renewal",
            &[("serial", &next_cert.serial)],
        );
    } else if matches(AGENT_KEY) {
        state.rename(NEXT_CERT, AGENT_CERT)?;
        log::info(
            "finished an interrupted certificate renewal",
            &[("serial", &next_cert.serial)],
        );
    } else {
        state.remove(NEXT_CERT)?;
    }
    Ok(true)
}

/// Checks a newly issued certificate and swaps it in with its key.
fn install(
    state: &StateDir,
    ident: &Identity,
    key: &EcdsaKeyPair,
    answer: &CertificateResponse,
) -> Result<Identity, Error> {
    let cert_der = cert_der_from_pem(&answer.certificate, "issued certificate")?;
    let cert = der::cert_info(&cert_der)?;
    if cert.spki != key_spki(key) {
        return Err(Error::Invalid(
            "the issued certificate is not for the new key".into(),
        ));
    }
    if cert_der_from_pem(&answer.ca, "CA in the answer")? != ident.ca_der {
        return Err(Error::Invalid(
            "the server answered with a different CA than the pinned one".into(),
        ));
    }
    state.write_atomic(NEXT_CERT, answer.certificate.as_bytes(), 0o644)?;
    fault::point("renew-after-next-cert");
    state.rename(NEXT_KEY, AGENT_KEY)?;
    fault::point("renew-after-key-swap");
    state.rename(NEXT_CERT, AGENT_CERT)?;
    let renewed = Identity::load(state)?;
    log::info(
        "certificate renewed",
        &[
            ("serial", &renewed.cert.serial),
            (
                "not_after",
                &stella_proto::time::rfc3339(renewed.cert.not_after),
            ),
        ],
    );
    Ok(renewed)
}

fn certificate_answer(status: u16, text: &str) -> Result<CertificateResponse, RenewError> {
    match status {
        // miniserde's error is a unit struct: there is no detail to keep.
        200 => json::from_str(text).map_err(|miniserde::Error| {
            RenewError::Failed(Error::Invalid(
                "the certificate answer is not valid JSON".into(),
            ))
        }),
        401 => Err(RenewError::Refused(transport::error_message(text))),
        other => Err(RenewError::Failed(Error::Invalid(format!(
            "server answered {other}: {}",
            transport::error_message(text)
        )))),
    }
}

/// Renews over mTLS with the current certificate (`client` presents it).
pub(crate) fn renew(
    state: &StateDir,
    ident: &Identity,
    client: &mut transport::Client,
) -> Result<Identity, RenewError> {
    let key = next_key(state)?;
    fault::point("renew-after-next-key");
    let body = json::to_string(&RenewRequest {
        csr: csr_pem(&key, &ident.id)?,
    });
    let url = format!("{}/v1/agents/certificate", ident.server);
    let (status, text) = transport::post_json(client, &url, &body)
        .map_err(|e| Error::network(format!("cannot reach {url}"), e))?;
    fault::point("renew-after-answer");
    let answer = certificate_answer(status, &text)?;
    Ok(install(state, ident, &key, &answer)?)
}

/// Recovers an expired certificate: asks for a challenge, signs it with the
/// current (expired) key, and sends a CSR for the next key, all without a
/// client certificate.
pub(crate) fn recover(state: &StateDir, ident: &Identity) -> Result<Identity, RenewError> {
    let mut client = transport::http_client(&ident.ca_der, None, Duration::from_secs(30))?;
    let url = |p: &str| format!("{}{p}", ident.server);
    let ask = json::to_string(&ChallengeRequest {
        agent_id: ident.id.clone(),
    });
    let challenge_url = url("/v1/agents/challenge");
    let (status, text) = transport::post_json(&mut client, &challenge_url, &ask)
        .map_err(|e| Error::network(format!("cannot reach {challenge_url}"), e))?;
    if status != 200 {
        return Err(certificate_answer(status, &text)
            .err()
            .unwrap_or(RenewError::Failed(Error::Invalid(text))));
    }
    // miniserde's error is a unit struct: there is no detail to keep.
    let challenge: ChallengeResponse = json::from_str(&text).map_err(|miniserde::Error| {
        RenewError::Failed(Error::Invalid(
            "the challenge answer is not valid JSON".into(),
        ))
    })?;
    let old_key = read_key(state, AGENT_KEY)?
        .ok_or_else(|| Error::Invalid(format!("{AGENT_KEY} is missing")))?;
    let message = stella_proto::api::recovery_message(&ident.id, &challenge.challenge);
    let signature =
        old_key
            .sign(&SystemRandom::new(), &message)
            .map_err(|ring::error::Unspecified| {
                Error::opaque_crypto("could not sign the recovery challenge")
            })?;
    let key = next_key(state)?;
    let body = json::to_string(&RecoverRequest {
        agent_id: ident.id.clone(),
        challenge: challenge.challenge,
        signature: base64::engine::general_purpose::STANDARD.encode(signature.as_ref()),
        csr: csr_pem(&key, &ident.id)?,
    });
    let recover_url = url("/v1/agents/recover");
    let (status, text) = transport::post_json(&mut client, &recover_url, &body)
        .map_err(|e| Error::network(format!("cannot reach {recover_url}"), e))?;
    let answer = certificate_answer(status, &text)?;
    Ok(install(state, ident, &key, &answer)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_falls_between_60_and_75_percent_of_the_lifetime() {
        let rng = SystemRandom::new();
        let cert = CertInfo {
            serial: String::new(),
            not_before: 1_000,
            not_after: 1_000 + 10_000,
            spki: Vec::new(),
        };
        let draws: Vec<u64> = (0..2000).map(|_| renewal_due(&cert, &rng)).collect();
        assert!(
            draws.iter().all(|t| (7_000..=8_500).contains(t)),
            "{draws:?}"
        );
        // Spread out, not one fixed point.
        let (lo, hi) = (draws.iter().min().unwrap(), draws.iter().max().unwrap());
        assert!(hi - lo > 1_000, "{lo}..{hi}");
    }
}
