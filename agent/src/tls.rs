//! TLS plumbing: the minimal ring provider (only the algorithms our CA and
//! keys use), the server URL's host and port, and kubeadm-style CA
//! discovery — trusting a server only if it presents a CA with the pinned
//! key hash, and only that CA signed its certificate.

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ring::rand::SystemRandom;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::der;
use crate::error::Error;

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
            .map_err(|ring::error::Unspecified| rustls::crypto::GetRandomFailed)
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

/// An `https://` URL cut into the parts a request needs.
pub(crate) struct Target<'a> {
    /// `host[:port]` as written: the Host header.
    pub(crate) authority: &'a str,
    /// Without IPv6 brackets.
    pub(crate) host: &'a str,
    pub(crate) port: u16,
    /// Path and query; `/` when the URL has none.
    pub(crate) path: &'a str,
}

impl<'a> Target<'a> {
    pub(crate) fn parse(url: &'a str) -> io::Result<Self> {
        let bad = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{url:?} is not an https:// URL: {why}"),
            )
        };
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| bad("it must start with https://"))?;
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => rest.split_at(i),
            Some(_) => return Err(bad("a query needs a path")),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err(bad("user info is not supported"));
        }
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
                (host, after.strip_prefix(':'))
            }
            None => match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            },
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = match port {
            Some(p) => p.parse().map_err(|_| bad("the port is not a number"))?,
            None => 443,
        };
        Ok(Target {
            authority,
            host,
            port,
            path,
        })
    }
}

/// Host and port of an `https://` URL.
pub(crate) fn host_port(url: &str) -> Result<(String, u16), Error> {
    let t = Target::parse(url).map_err(|e| Error::Usage(format!("server URL {e}")))?;
    Ok((t.host.to_owned(), t.port))
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
        .map_err(|e| Error::crypto("TLS setup", e))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    let name = ServerName::try_from(host.clone())
        .map_err(|e| Error::Usage(format!("server URL {url:?} has an invalid host: {e}")))?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name)
        .map_err(|e| Error::crypto("TLS setup", e))?;
    let addr = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| Error::network(format!("cannot resolve {host}"), e))?
        .next()
        .ok_or_else(|| Error::Network {
            context: format!("{host} has no address"),
            source: None,
        })?;
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| Error::network(format!("cannot connect to {addr}"), e))?;
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
                Error::Crypto {
                    context: format!(
                        "the server at {url} does not present a CA matching --ca-hash sha256:{pin_hex} (it presented: {}); nothing was sent",
                        if seen.is_empty() {
                            "no CA certificate".to_owned()
                        } else {
                            seen
                        }
                    ),
                    // The message says it all; the handshake error is the cause.
                    source: None,
                }
            } else {
                Error::crypto(format!("TLS handshake with {url} failed"), e)
            });
        }
    }
    conn.send_close_notify();
    let _ = conn.complete_io(&mut tcp);
    let found = verifier.found.lock().ok().and_then(|mut f| f.take());
    found.ok_or_else(|| Error::Crypto {
        context: format!("the server at {url} did not complete the CA check"),
        source: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_cut_into_host_port_and_path() {
        let t = Target::parse("https://example.test:8443/v1/x?a=b").unwrap();
        assert_eq!(
            (t.authority, t.host, t.port, t.path),
            ("example.test:8443", "example.test", 8443, "/v1/x?a=b")
        );
        let t = Target::parse("https://[::1]:9/").unwrap();
        assert_eq!((t.authority, t.host, t.port), ("[::1]:9", "::1", 9));
        let t = Target::parse("https://example.test").unwrap();
        assert_eq!((t.port, t.path), (443, "/"));
        for bad in [
            "http://example.test/",
            "https://:1/",
            "https://h:x/",
            "https://u@h/",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
