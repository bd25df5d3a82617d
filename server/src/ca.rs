//! The server's certificate authority: the CA key pair made at `init`, the
//! server's own TLS certificate, and the agent certificates it issues from CSRs
//! (CN = agent id, URI SAN `stella://agent/<id>`, client auth only), from
//! CSRs that `check_csr` accepted.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::Error;
use crate::fsutil::{read_text, write_atomic};
use crate::refusal::Refusal;

/// File names in the data dir.
pub(crate) const CA_CERT: &str = "ca.pem";
pub(crate) const CA_KEY: &str = "ca.key";
pub(crate) const SERVER_CERT: &str = "server.pem";
pub(crate) const SERVER_KEY: &str = "server.key";

const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);
const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(5 * 365 * 86_400);
/// Issued certificates start a little in the past so that an agent whose
/// clock is slightly behind the server's accepts them at once (agent
/// certificates by at most a tenth of their lifetime, so short test lifetimes
/// keep their renewal window).
const BACKDATE: Duration = Duration::from_secs(60);

/// A certificate issued to an agent.
pub(crate) struct IssuedCert {
    pub(crate) pem: String,
    pub(crate) serial: String,
    pub(crate) not_after: u64,
}

/// A CSR that passed every check, with the public key it carries.
#[derive(Debug)]
pub struct CheckedCsr {
    params: CertificateSigningRequestParams,
    /// Hex SHA-256 of the DER SubjectPublicKeyInfo.
    pub(crate) key_sha256: String,
}

/// The loaded CA. Without its private key (a data dir restored from a
/// backup made without `--include-ca-key`) it serves agents that hold
/// certificates but issues none: enrollment, renewal and recovery are
/// refused (503) until `ca.key` is put back and the server restarted.
pub(crate) struct Ca {
    issuer: Option<Issuer<'static, KeyPair>>,
    pin: String,
    pub(crate) cert_pem: String,
    pub(crate) cert_der: CertificateDer<'static>,
}

fn offset_time(unix: u64) -> Result<time::OffsetDateTime, Error> {
    time::OffsetDateTime::from_unix_timestamp(unix as i64)
        .map_err(|e| Error::crypto("time out of range", e))
}

fn random_serial() -> Result<(SerialNumber, String), Error> {
    let mut bytes = [0u8; 16];
    crate::fsutil::random_bytes(&mut bytes)?;
    // Positive and without a leading zero byte, so its DER form is these 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok((
        SerialNumber::from_slice(&bytes),
        stella_proto::hash::hex(&bytes),
    ))
}

fn new_p256_key() -> Result<KeyPair, Error> {
    Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?)
}

/// Makes the CA and the server certificate in `dir`; returns the CA's pin.
pub(crate) fn init(dir: &Path, sans: &[String], now: u64) -> Result<String, Error> {
    let ca_key = new_p256_key()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "Stella CA");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Stella");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = offset_time(now - BACKDATE.as_secs())?;
    params.not_after = offset_time(now + CA_LIFETIME.as_secs())?;
    params.serial_number = Some(random_serial()?.0);
    let ca_cert = params.self_signed(&ca_key)?;
    let issuer = Issuer::new(params, ca_key);

    let server_key = new_p256_key()?;
    let mut server = CertificateParams::default();
    server.distinguished_name = DistinguishedName::new();
    server
        .distinguished_name
        .push(DnType::CommonName, "stella-server");
    for san in sans {
        let entry = match san.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(san.as_str().try_into().map_err(|e| {
                Error::Usage(format!(
                    "--san {san:?} is neither a DNS name nor an IP address ({e})"
                ))
            })?),
        };
        if !server.subject_alt_names.contains(&entry) {
            server.subject_alt_names.push(entry);
        }
    }
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.use_authority_key_identifier_extension = true;
    // A leaf: basicConstraints CA:FALSE and a Subject Key Identifier, as
    // openssl and browsers expect.
    server.is_ca = IsCa::ExplicitNoCa;
    server.not_before = offset_time(now - BACKDATE.as_secs())?;
    server.not_after = offset_time(now + SERVER_CERT_LIFETIME.as_secs())?;
    server.serial_number = Some(random_serial()?.0);
    let server_cert = server.signed_by(&server_key, &issuer)?;

    write_atomic(
        &dir.join(CA_KEY),
        issuer.key().serialize_pem().as_bytes(),
        0o600,
    )?;
    write_atomic(&dir.join(CA_CERT), ca_cert.pem().as_bytes(), 0o644)?;
    write_atomic(
        &dir.join(SERVER_KEY),
        server_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_atomic(&dir.join(SERVER_CERT), server_cert.pem().as_bytes(), 0o644)?;
    Ok(stella_proto::hash::spki_pin(
        &issuer.key().subject_public_key_info(),
    ))
}

impl Ca {
    /// Loads the CA from the data dir.
    pub(crate) fn load(dir: &Path) -> Result<Self, Error> {
        let cert_pem = read_text(&dir.join(CA_CERT))?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| Error::crypto(dir.join(CA_CERT).display().to_string(), e))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| Error::crypto(dir.join(CA_CERT).display().to_string(), e.to_string()))?;
        let pin = stella_proto::hash::spki_pin(cert.public_key().raw);
        let key_path = dir.join(CA_KEY);
        let issuer = if key_path.exists() {
            let key = KeyPair::from_pem(&read_text(&key_path)?)
                .map_err(|e| Error::crypto(key_path.display().to_string(), e))?;
            Some(Issuer::from_ca_cert_der(&cert_der, key)?)
        } else {
            None
        };
        Ok(Self {
            issuer,
            pin,
            cert_pem,
            cert_der,
        })
    }

    /// The CA pin agents use with `--ca-hash`.
    pub(crate) fn pin(&self) -> String {
        self.pin.clone()
    }

    /// Whether this server holds the CA key (can issue certificates).
    pub(crate) fn can_issue(&self) -> bool {
        self.issuer.is_some()
    }

    fn issuer(&self) -> Result<&Issuer<'static, KeyPair>, Refusal> {
        self.issuer.as_ref().ok_or_else(|| {
            Refusal::new(
                crate::refusal::Why::Unavailable,
                format!(
                    "this server has no CA key ({CA_KEY} is missing from its data dir: it was restored from a backup made without --include-ca-key); it cannot enroll, renew or recover agents until {CA_KEY} is put back and the server restarted"
                ),
            )
        })
    }

    /// Issues an agent certificate for the CSR's key. Everything the CSR asked
    /// for besides its key is ignored: the server decides the name and usages.
    pub(crate) fn issue_agent_cert(
        &self,
        csr: &CheckedCsr,
        agent_id: &str,
        now: u64,
        lifetime: Duration,
    ) -> Result<IssuedCert, Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, agent_id);
        let uri = format!("{}{agent_id}", stella_proto::AGENT_URI_PREFIX);
        params.subject_alt_names =
            vec![SanType::URI(uri.as_str().try_into().map_err(|e| {
                Error::crypto(format!("bad URI SAN {uri}"), e)
            })?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        // A leaf: CA:FALSE, and a Subject Key Identifier with it.
        params.is_ca = IsCa::ExplicitNoCa;
        let not_after = now + lifetime.as_secs();
        let backdate = BACKDATE.min(lifetime / 10).as_secs();
        params.not_before = offset_time(now.saturating_sub(backdate))?;
        params.not_after = offset_time(not_after)?;
        let (serial_number, serial) = random_serial()?;
        params.serial_number = Some(serial_number);
        let cert = params.signed_by(&csr.params.public_key, self.issuer()?)?;
        Ok(IssuedCert {
            pem: cert.pem(),
            serial,
            not_after,
        })
    }
}

/// Parses a PEM CSR, verifies its self-signature, and accepts only ECDSA
/// P-256 keys with no extensions we would not honour. A refusal is a
/// `Error::Refused` (400) naming what was wrong.
pub fn check_csr(csr_pem: &str) -> Result<CheckedCsr, Error> {
    let malformed = |e: &dyn std::fmt::Display| {
        Error::Refused(Refusal::bad_request(format!("malformed CSR: {e}")))
    };
    let der =
        stella_proto::pem::decode("CERTIFICATE REQUEST", csr_pem).map_err(|e| malformed(&e))?;
    let params = CertificateSigningRequestParams::from_der(&der.as_slice().into())
        .map_err(|e| malformed(&e))?;
    if params.public_key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
        return Err(Error::Refused(Refusal::bad_request(
            "CSR key must be ECDSA P-256 (signed with SHA-256)",
        )));
    }
    let key_sha256 = stella_proto::hash::hex(&stella_proto::hash::sha256(
        &params.public_key.subject_public_key_info(),
    ));
    Ok(CheckedCsr { params, key_sha256 })
}

/// Checks an ECDSA P-256 signature over `message` by the key of a certificate
/// we issued (PEM).
pub(crate) fn verify_by_cert_key(cert_pem: &str, message: &[u8], signature: &[u8]) -> bool {
    let Ok(der) = stella_proto::pem::decode("CERTIFICATE", cert_pem) else {
        return false;
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
        return false;
    };
    let point = &cert.public_key().subject_public_key.data;
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_ASN1,
        point.as_ref(),
    )
    .verify(message, signature)
    .is_ok()
}

/// The rustls server config: our certificate chain (server, CA), client
/// certificates optional at the TLS layer (registration has none) but verified
/// against our CA whenever presented; TLS 1.3 and 1.2 with the ring provider.
pub(crate) fn server_tls_config(dir: &Path, ca: &Ca) -> Result<Arc<rustls::ServerConfig>, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der.clone())?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| Error::crypto("client verifier", e))?;
    let server_pem = read_text(&dir.join(SERVER_CERT))?;
    let server_cert = CertificateDer::from_pem_slice(server_pem.as_bytes())
        .map_err(|e| Error::crypto(dir.join(SERVER_CERT).display().to_string(), e))?;
    let key = PrivateKeyDer::from_pem_file(dir.join(SERVER_KEY))
        .map_err(|e| Error::crypto(dir.join(SERVER_KEY).display().to_string(), e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![server_cert, ca.cert_der.clone()], key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
