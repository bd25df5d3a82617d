//! The agent's identity: its ECDSA P-256 key (made here, never sent), the CSR,
//! its certificate and the pinned CA; kubeadm-style CA discovery that trusts a
//! server only if it presents a CA with the pinned key hash; and certificate
//! renewal — scheduled at 60–75% of the lifetime, over mTLS, or after an
//! offline expiry by signing a server challenge with the old key — with an
//! atomic key/certificate swap that a crash at any step cannot break.

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use base64::Engine;
use miniserde::json;
use ring::rand::SecureRandom;
use stella_proto::api::{
    CertificateResponse, ChallengeRequest, ChallengeResponse, RecoverRequest, RenewRequest,
};

use crate::der::{self, CertInfo};
use crate::error::Error;
use crate::state::{AGENT_CERT, AGENT_KEY, CA_CERT, StateDir};
use crate::{fault, log, transport};

/// The next key, made before a renewal and kept until it is installed, so a
/// retried renewal sends the same key.
pub(crate) const NEXT_KEY: &str = "agent.key.new";
/// The certificate for the next key, written before the swap.
pub(crate) const NEXT_CERT: &str = "agent.pem.new";

/// Makes a new key pair; returns its PKCS#8 DER.
pub(crate) fn generate_key() -> Result<Vec<u8>, Error> {
    let rng = SystemRandom::new();
    EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map(|doc| doc.as_ref().to_vec())
        .map_err(|_| Error::Crypto("could not generate a P-256 key pair".into()))
}

/// Loads a PKCS#8 P-256 key.
pub(crate) fn load_key(pkcs8: &[u8]) -> Result<EcdsaKeyPair, Error> {
    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8, &SystemRandom::new())
        .map_err(|e| Error::Crypto(format!("agent key is not a valid P-256 PKCS#8 key: {e}")))
}

/// A PEM CSR for `key`, with subject CN = `name` (the server picks the real
/// subject; the CSR proves possession of the key).
pub(crate) fn csr_pem(key: &EcdsaKeyPair, name: &str) -> Result<String, Error> {
    let info = der::csr_info(name, key.public_key().as_ref());
    let signature = key
        .sign(&SystemRandom::new(), &info)
        .map_err(|_| Error::Crypto("could not sign the CSR".into()))?;
    Ok(stella_proto::pem::encode(
        "CERTIFICATE REQUEST",
        &der::csr(&info, signature.as_ref()),
    ))
}

/// The DER SubjectPublicKeyInfo of `key`.
pub(crate) fn key_spki(key: &EcdsaKeyPair) -> Vec<u8> {
    der::p256_spki(key.public_key().as_ref())
}

/// Decodes a PEM certificate.
pub(crate) fn cert_der_from_pem(pem: &str, what: &str) -> Result<Vec<u8>, Error> {
    stella_proto::pem::decode("CERTIFICATE", pem)
        .map_err(|e| Error::Invalid(format!("{what}: {e}")))
}

/// `sha256:HEX` of a certificate's SubjectPublicKeyInfo.
pub(crate) fn ca_pin(ca_der: &[u8]) -> Result<String, Error> {
    Ok(stella_proto::hash::spki_pin(&der::cert_info(ca_der)?.spki))
}

/// Everything needed to talk to the server as this agent.
#[derive(Debug)]
pub(crate) struct Identity {
    pub(crate) id: String,
    pub(crate) server: String,
    pub(crate) ca_der: Vec<u8>,
    pub(crate) cert_der: Vec<u8>,
    pub(crate) key_pem: String,
    pub(crate) cert: CertInfo,
}

impl Identity {
    /// Loads and cross-checks the enrolled identity from the state dir.
    pub(crate) fn load(state: &StateDir) -> Result<Self, Error> {
        let agent = state.agent_file()?;
        let ca_der = cert_der_from_pem(&state.read_text(CA_CERT)?, CA_CERT)?;
        let cert_der = cert_der_from_pem(&state.read_text(AGENT_CERT)?, AGENT_CERT)?;
        let key_pem = state.read_text(AGENT_KEY)?;
        let key_der = stella_proto::pem::decode("PRIVATE KEY", &key_pem)
            .map_err(|e| Error::Invalid(format!("{AGENT_KEY}: {e}")))?;
        let key = load_key(&key_der)?;
        let cert = der::cert_info(&cert_der)?;
        if cert.spki != key_spki(&key) {
            return Err(Error::Invalid(format!(
                "{AGENT_CERT} does not belong to {AGENT_KEY} in {}",
                state.root().display()
            )));
        }
        Ok(Self {
            id: agent.id,
            server: agent.server,
            ca_der,
            cert_der,
            key_pem,
            cert,
        })
    }
}

/// The TLS provider: ring, with only what talking to our server needs —
/// ECDSA and Ed25519 (our CA and keys are P-256; no RSA code is linked),
/// X25519 and P-256 key exchange, AES-GCM and ChaCha20 suites.
pub(crate) fn ring_provider() -> Arc<CryptoProvider> {
    use rustls::crypto::WebPkiSupportedAlgorithms;
    use rustls::crypto::ring::{cipher_suite as suite, kx_group};
    use webpki::ring as alg;
    static ALGORITHMS: WebPkiSupportedAlgorithms = WebPkiSupportedAlgorithms {
        all: &[
            alg::ECDSA_P256_SHA256,
            alg::ECDSA_P256_SHA384,
            alg::ECDSA_P384_SHA256,
            alg::ECDSA_P384_SHA384,
            alg::ED25519,
        ],
        mapping: &[
            (
                SignatureScheme::ECDSA_NISTP384_SHA384,
                &[alg::ECDSA_P384_SHA384, alg::ECDSA_P256_SHA384],
            ),
            (
                SignatureScheme::ECDSA_NISTP256_SHA256,
                &[alg::ECDSA_P256_SHA256, alg::ECDSA_P384_SHA256],
            ),
            (SignatureScheme::ED25519, &[alg::ED25519]),
        ],
    };
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            suite::TLS13_AES_128_GCM_SHA256,
            suite::TLS13_AES_256_GCM_SHA384,
            suite::TLS13_CHACHA20_POLY1305_SHA256,
            suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ],
        kx_groups: vec![kx_group::X25519, kx_group::SECP256R1],
        signature_verification_algorithms: ALGORITHMS,
        secure_random: &EcdsaKeys,
        key_provider: &EcdsaKeys,
    })
}

/// Loads only ECDSA private keys (the agent's own), and draws randomness
/// from the system.
#[derive(Debug)]
struct EcdsaKeys;

impl rustls::crypto::SecureRandom for EcdsaKeys {
    fn fill(&self, buf: &mut [u8]) -> Result<(), rustls::crypto::GetRandomFailed> {
        ring::rand::SecureRandom::fill(&SystemRandom::new(), buf)
            .map_err(|_| rustls::crypto::GetRandomFailed)
    }
}

impl rustls::crypto::KeyProvider for EcdsaKeys {
    fn load_private_key(
        &self,
        key_der: rustls_pki_types::PrivateKeyDer<'static>,
    ) -> Result<Arc<dyn rustls::sign::SigningKey>, rustls::Error> {
        rustls::crypto::ring::sign::any_ecdsa_type(&key_der)
    }
}

/// Trusts a server whose chain carries a CA with the pinned SPKI hash, and
/// whose certificate that CA signed for the name we dialled. Remembers the CA.
#[derive(Debug)]
struct PinnedCaVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
    found: Mutex<Option<Vec<u8>>>,
    seen: Mutex<Vec<String>>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        for candidate in intermediates {
            let Ok(info) = der::cert_info(candidate) else {
                continue;
            };
            let digest = stella_proto::hash::sha256(&info.spki);
            if let Ok(mut seen) = self.seen.lock() {
                seen.push(format!("sha256:{}", stella_proto::hash::hex(&digest)));
            }
            if !stella_proto::token::constant_time_eq(&digest, &self.pin) {
                continue;
            }
            let mut roots = rustls::RootCertStore::empty();
            roots.add(candidate.clone().into_owned())?;
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                self.provider.clone(),
            )
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
            let verified =
                inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)?;
            if let Ok(mut found) = self.found.lock() {
                *found = Some(candidate.to_vec());
            }
            return Ok(verified);
        }
        Err(rustls::Error::General(
            "no certificate in the server's chain matches the CA pin".into(),
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Host and port of an `https://` URL.
pub(crate) fn host_port(url: &str) -> Result<(String, u16), Error> {
    let uri: ureq::http::Uri = url
        .parse()
        .map_err(|_| Error::Usage(format!("server URL {url:?} is not a URL")))?;
    if uri.scheme_str() != Some("https") {
        return Err(Error::Usage(format!(
            "server URL {url:?} must start with https://"
        )));
    }
    let host = uri
        .host()
        .ok_or_else(|| Error::Usage(format!("server URL {url:?} has no host")))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    Ok((host, uri.port_u16().unwrap_or(443)))
}

/// Connects to the server, and returns the DER of the CA in its chain whose
/// public key hash is `pin`, after checking that this CA signed the server's
/// certificate for this host. Nothing secret is sent on this connection.
pub(crate) fn discover_pinned_ca(url: &str, pin: [u8; 32]) -> Result<Vec<u8>, Error> {
    let (host, port) = host_port(url)?;
    let verifier = Arc::new(PinnedCaVerifier {
        pin,
        provider: ring_provider(),
        found: Mutex::new(None),
        seen: Mutex::new(Vec::new()),
    });
    let config = rustls::ClientConfig::builder_with_provider(ring_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| Error::Crypto(format!("TLS setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    let name = ServerName::try_from(host.clone())
        .map_err(|_| Error::Usage(format!("server URL {url:?} has an invalid host")))?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name)
        .map_err(|e| Error::Crypto(format!("TLS setup: {e}")))?;
    let addr = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| Error::Network(format!("cannot resolve {host}: {e}")))?
        .next()
        .ok_or_else(|| Error::Network(format!("{host} has no address")))?;
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| Error::Network(format!("cannot connect to {addr}: {e}")))?;
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = tcp.set_write_timeout(Some(Duration::from_secs(10)));
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut tcp) {
            let seen = verifier
                .seen
                .lock()
                .map(|s| s.join(", "))
                .unwrap_or_default();
            let pin_hex = stella_proto::hash::hex(&pin);
            return Err(if seen.is_empty() || e.to_string().contains("CA pin") {
                Error::Crypto(format!(
                    "the server at {url} does not present a CA matching --ca-hash sha256:{pin_hex} (it presented: {}); nothing was sent",
                    if seen.is_empty() {
                        "no CA certificate".to_owned()
                    } else {
                        seen
                    }
                ))
            } else {
                Error::Crypto(format!("TLS handshake with {url} failed: {e}"))
            });
        }
    }
    conn.send_close_notify();
    let _ = conn.complete_io(&mut tcp);
    let found = verifier.found.lock().ok().and_then(|mut f| f.take());
    found.ok_or_else(|| Error::Crypto(format!("the server at {url} did not complete the CA check")))
}

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
    Failed(String),
}

impl From<Error> for RenewError {
    fn from(e: Error) -> Self {
        RenewError::Failed(e.to_string())
    }
}

fn pem_key(state: &StateDir, name: &str) -> Result<Option<EcdsaKeyPair>, Error> {
    match state.read_text(name) {
        Ok(pem) => {
            let der = stella_proto::pem::decode("PRIVATE KEY", &pem)
                .map_err(|e| Error::Invalid(format!("{name}: {e}")))?;
            load_key(&der).map(Some)
        }
        Err(_) => Ok(None),
    }
}

/// The next key: the one a previous attempt left, or a new one (written 0600
/// before it is used, so a lost answer can be retried with the same key).
fn next_key(state: &StateDir) -> Result<EcdsaKeyPair, Error> {
    if let Ok(Some(key)) = pem_key(state, NEXT_KEY) {
        return Ok(key);
    }
    let der = generate_key()?;
    state.write_atomic(
        NEXT_KEY,
        stella_proto::pem::encode("PRIVATE KEY", &der).as_bytes(),
        0o600,
    )?;
    load_key(&der)
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
        matches!(pem_key(state, name), Ok(Some(k)) if key_spki(&k) == next_cert.spki)
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
        200 => json::from_str(text)
            .map_err(|_| RenewError::Failed("the certificate answer is not valid JSON".into())),
        401 => Err(RenewError::Refused(transport::error_message(text))),
        other => Err(RenewError::Failed(format!(
            "server answered {other}: {}",
            transport::error_message(text)
        ))),
    }
}

/// Renews over mTLS with the current certificate (`client` presents it).
pub(crate) fn renew(
    state: &StateDir,
    ident: &Identity,
    client: &ureq::Agent,
) -> Result<Identity, RenewError> {
    let key = next_key(state)?;
    fault::point("renew-after-next-key");
    let body = json::to_string(&RenewRequest {
        csr: csr_pem(&key, &ident.id)?,
    });
    let url = format!("{}/v1/agents/certificate", ident.server);
    let (status, text) = transport::post_json(client, &url, &body).map_err(RenewError::Failed)?;
    fault::point("renew-after-answer");
    let answer = certificate_answer(status, &text)?;
    Ok(install(state, ident, &key, &answer)?)
}

/// Recovers an expired certificate: asks for a challenge, signs it with the
/// current (expired) key, and sends a CSR for the next key, all without a
/// client certificate.
pub(crate) fn recover(state: &StateDir, ident: &Identity) -> Result<Identity, RenewError> {
    let client = transport::http_client(&ident.ca_der, None, Duration::from_secs(30))?;
    let url = |p: &str| format!("{}{p}", ident.server);
    let ask = json::to_string(&ChallengeRequest {
        agent_id: ident.id.clone(),
    });
    let (status, text) = transport::post_json(&client, &url("/v1/agents/challenge"), &ask)
        .map_err(RenewError::Failed)?;
    if status != 200 {
        return Err(certificate_answer(status, &text)
            .err()
            .unwrap_or(RenewError::Failed(text)));
    }
    let challenge: ChallengeResponse = json::from_str(&text)
        .map_err(|_| RenewError::Failed("the challenge answer is not valid JSON".into()))?;
    let old_key = pem_key(state, AGENT_KEY)?
        .ok_or_else(|| Error::Invalid(format!("{AGENT_KEY} is missing")))?;
    let message = stella_proto::api::recovery_message(&ident.id, &challenge.challenge);
    let signature = old_key
        .sign(&SystemRandom::new(), &message)
        .map_err(|_| Error::Crypto("could not sign the recovery challenge".into()))?;
    let key = next_key(state)?;
    let body = json::to_string(&RecoverRequest {
        agent_id: ident.id.clone(),
        challenge: challenge.challenge,
        signature: base64::engine::general_purpose::STANDARD.encode(signature.as_ref()),
        csr: csr_pem(&key, &ident.id)?,
    });
    let (status, text) = transport::post_json(&client, &url("/v1/agents/recover"), &body)
        .map_err(RenewError::Failed)?;
    let answer = certificate_answer(status, &text)?;
    Ok(install(state, ident, &key, &answer)?)
}
