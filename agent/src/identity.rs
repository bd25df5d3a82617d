//! The agent's identity: its ECDSA P-256 key (made here, never sent), the CSR,
//! its certificate and the pinned CA, and the TLS clients built from them
//! (ring provider, TLS 1.3/1.2), including the kubeadm-style CA discovery
//! that trusts a server only if it presents a CA with the pinned key hash.

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::der::{self, CertInfo};
use crate::error::Error;
use crate::state::{AGENT_CERT, AGENT_KEY, CA_CERT, StateDir};

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

fn ring_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// An HTTPS client that trusts only our CA, optionally presenting the agent's
/// certificate (DER) and key (PKCS#8 PEM). Keep-alive connections are reused between heartbeats. No
/// global or resolve timeout is set: ureq would start a resolver thread for
/// those, and the agent stays on one thread.
pub(crate) fn http_client(
    ca_der: &[u8],
    client: Option<(&[u8], &str)>,
    idle: Duration,
) -> Result<ureq::Agent, Error> {
    use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig, TlsProvider};
    let client_cert = match client {
        Some((cert, key_pem)) => {
            let key = PrivateKey::from_pem(key_pem.as_bytes())
                .map_err(|e| Error::Crypto(format!("agent key: {e}")))?;
            Some(ClientCert::new_with_certs(
                &[Certificate::from_der(cert).to_owned()],
                key,
            ))
        }
        None => None,
    };
    let tls = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .root_certs(RootCerts::new_with_certs(&[
            Certificate::from_der(ca_der).to_owned()
        ]))
        .client_cert(client_cert)
        .unversioned_rustls_crypto_provider(ring_provider())
        .build();
    Ok(ureq::Agent::config_builder()
        .tls_config(tls)
        .http_status_as_error(false)
        .https_only(true)
        .user_agent(concat!("stella-agent/", env!("CARGO_PKG_VERSION")))
        .timeout_connect(Some(Duration::from_secs(10)))
        .timeout_send_request(Some(Duration::from_secs(10)))
        .timeout_send_body(Some(Duration::from_secs(10)))
        .timeout_recv_response(Some(Duration::from_secs(20)))
        .timeout_recv_body(Some(Duration::from_secs(20)))
        .max_idle_connections(1)
        .max_idle_connections_per_host(1)
        .max_idle_age(idle)
        .max_response_header_size(16 * 1024)
        .build()
        .new_agent())
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
