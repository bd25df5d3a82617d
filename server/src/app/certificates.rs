//! Certificates at run time: renewal over mTLS, recovery challenges, and
//! recovery after an offline expiry. Signs with the CA, then records the new
//! certificate under the `renewal` rules in one store transaction, then
//! mirrors the agent in the fleet.

use base64::Engine;
use stella_proto::api::{
    CertificateResponse, ChallengeRequest, ChallengeResponse, RecoverRequest, RenewRequest,
};
use stella_proto::time::rfc3339;

use super::{App, Metrics, lock, now_ms, now_secs};
use crate::ca;
use crate::error::Error;
use crate::log;
use crate::records::CertRecord;
use crate::refusal::Refusal;
use crate::renewal::{self, Reissue};
use crate::store::StoreError;

impl App {
    /// Issues a certificate for `csr_pem` and records it in place of
    /// `presented`, if `why` allows. Blocking.
    fn reissue(
        &self,
        agent_id: &str,
        presented: &str,
        csr_pem: &str,
        why: Reissue,
    ) -> Result<CertificateResponse, Error> {
        let csr = ca::check_csr(csr_pem)?;
        let now = now_secs();
        let issued = self
            .ca
            .issue_agent_cert(&csr, agent_id, now, self.settings.cert_lifetime)?;
        let cert = CertRecord {
            agent_id: agent_id.to_owned(),
            serial: issued.serial,
            pem: issued.pem,
            issued_at: now,
            not_after: issued.not_after,
        };
        let grace = self.settings.expired_grace;
        let _serial = lock(&self.lifecycle_lock);
        let record = self
            .store
            .replace_certificate(
                &cert,
                Box::new(|r| {
                    // The audit line says which way the certificate came.
                    let how = match why {
                        Reissue::Renew => "renewal",
                        Reissue::Recover { .. } => "recovery",
                    };
                    renewal::replace(r, presented, &cert, &csr.key_sha256, why, grace)
                        .map(|detail| format!("{how} {detail}"))
                }),
            )
            .map_err(|e| match e {
                StoreError::NotFound { .. } => {
                    Refusal::unauthorized(format!("agent {agent_id} is not known to this server"))
                        .into()
                }
                other => Error::from(other),
            })?;
        lock(&self.fleet).mirror(record, now_ms());
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
            ca: self.ca.cert_pem.clone(),
            cert_not_after: rfc3339(cert.not_after),
        })
    }

    /// Renewal over mTLS with certificate `serial`. Blocking.
    pub(crate) fn renew(
        &self,
        agent_id: &str,
        serial: &str,
        req: &RenewRequest,
    ) -> Result<CertificateResponse, Error> {
        let response = self.reissue(agent_id, serial, &req.csr, Reissue::Renew)?;
        Metrics::bump(&self.metrics.renewals);
        Ok(response)
    }

    /// Hands out a single-use nonce for an agent to sign with its old key.
    pub(crate) fn challenge(&self, req: &ChallengeRequest) -> Result<ChallengeResponse, Error> {
        if !stella_proto::id::is_agent_id(&req.agent_id) {
            return Err(
                Refusal::bad_request(format!("{:?} is not an agent id", req.agent_id)).into(),
            );
        }
        let mut random = [0u8; 32];
        crate::fsutil::random_bytes(&mut random)?;
        let nonce = stella_proto::hash::hex(&random);
        let expires = lock(&self.challenges).issue(nonce.clone(), &req.agent_id, now_ms())?;
        Ok(ChallengeResponse {
            challenge: nonce,
            expires_at: rfc3339(expires / 1000),
        })
    }

    /// Recovery after an offline expiry: the challenge must be fresh and for
    /// this agent, the signature must verify with the key of its current (or
    /// previous) certificate, and `renewal` must allow it. Blocking.
    pub(crate) fn recover(&self, req: &RecoverRequest) -> Result<CertificateResponse, Error> {
        lock(&self.challenges).take(&req.challenge, &req.agent_id, now_ms())?;
        let signature = base64::engine::general_purpose::STANDARD
            .decode(req.signature.as_bytes())
            .map_err(|e| {
                Refusal::bad_request(format!("the recovery signature is not base64: {e}"))
            })?;
        // Rare and security-relevant: read the agent from the store itself.
        let record = self.store.agent(&req.agent_id)?.ok_or_else(|| {
            Refusal::unauthorized(format!(
                "agent {} is not known to this server",
                req.agent_id
            ))
        })?;
        let message = stella_proto::api::recovery_message(&req.agent_id, &req.challenge);
        let mut proven = None;
        for serial in std::iter::once(&record.cert_serial).chain(record.previous_serial.as_ref()) {
            let Some(cert) = self.store.cert(serial)? else {
                continue;
            };
            if ca::verify_by_cert_key(&cert.pem, &message, &signature) {
                proven = Some(cert);
                break;
            }
        }
        let Some(old) = proven else {
            return Err(Refusal::unauthorized(format!(
                "the signature does not match the key of agent {}'s certificate",
                req.agent_id
            ))
            .into());
        };
        let why = Reissue::Recover {
            old_not_after: old.not_after,
            now: now_secs(),
        };
        let response = self.reissue(&req.agent_id, &old.serial, &req.csr, why)?;
        Metrics::bump(&self.metrics.recoveries);
        log::info(
            "agent recovered after expiry",
            &[("agent", &req.agent_id), ("old_serial", &old.serial)],
        );
        Ok(response)
    }
}
