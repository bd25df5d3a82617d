//! `identity.certificate`: the certificate is present, parses, chains to the
//! pinned CA and is within its validity.

use std::time::Duration;

use stella_proto::time::rfc3339;

use super::{Finding, PemProblem, now_secs, pem_cert};
use crate::der::{self, CertInfo};
use crate::identity;
use crate::state::{AGENT_CERT, CA_CERT};

impl super::Doctor<'_> {
    pub(super) fn cert_info(&self) -> Option<CertInfo> {
        pem_cert(self.state, AGENT_CERT)
            .ok()
            .and_then(|d| der::cert_info(&d).ok())
    }

    pub(super) fn certificate(&self) -> Finding {
        let cert_der = match pem_cert(self.state, AGENT_CERT) {
            Ok(d) => d,
            Err(PemProblem::Missing) => {
                return fail!(
                    "identity.certificate/missing",
                    "agent.pem is missing from the state dir"
                );
            }
            Err(PemProblem::Unparsable) => {
                return fail!(
                    "identity.certificate/unparsable",
                    "agent.pem is not a PEM certificate"
                );
            }
        };
        let Ok(info) = der::cert_info(&cert_der) else {
            return fail!(
                "identity.certificate/unparsable",
                "agent.pem is not a valid X.509 certificate"
            );
        };
        let ca_der = match pem_cert(self.state, CA_CERT) {
            Ok(d) => d,
            Err(_) => {
                return fail!(
                    "identity.certificate/ca-missing",
                    "ca.pem is missing or unreadable"
                );
            }
        };
        let pinned = self
            .state
            .agent_file()
            .map(|a| a.ca_hash)
            .unwrap_or_default();
        if identity::ca_pin(&ca_der).ok().as_deref() != Some(pinned.as_str()) {
            return fail!(
                "identity.certificate/ca-pin",
                "ca.pem does not match the pinned CA hash {pinned}"
            );
        }
        let now = now_secs();
        if now < info.not_before {
            return fail!(
                "identity.certificate/not-yet-valid",
                "valid only from {} (check the clock)",
                rfc3339(info.not_before)
            );
        }
        if now >= info.not_after {
            return fail!(
                "identity.certificate/expired",
                "expired at {}",
                rfc3339(info.not_after)
            );
        }
        let anchor = rustls_pki_types::CertificateDer::from(ca_der.as_slice());
        let leaf = rustls_pki_types::CertificateDer::from(cert_der.as_slice());
        let chained = webpki::anchor_from_trusted_cert(&anchor)
            .ok()
            .is_some_and(|ta| {
                webpki::EndEntityCert::try_from(&leaf).is_ok_and(|ee| {
                    ee.verify_for_usage(
                        &[webpki::ring::ECDSA_P256_SHA256],
                        &[ta],
                        &[],
                        rustls_pki_types::UnixTime::since_unix_epoch(Duration::from_secs(now)),
                        webpki::KeyUsage::client_auth(),
                        None,
                        None,
                    )
                    .is_ok()
                })
            });
        if !chained {
            return fail!(
                "identity.certificate/untrusted",
                "agent.pem does not chain to the pinned CA"
            );
        }
        pass!(
            "identity.certificate/ok",
            "valid until {}, chains to the pinned CA",
            rfc3339(info.not_after)
        )
    }
}
