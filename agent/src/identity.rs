//! The agent's identity: its ECDSA P-256 key (made here, never sent), the
//! CSR that proves it, its certificate and the pinned CA, loaded and
//! cross-checked from the state dir. TLS plumbing is in `tls`, renewal in
//! `renewal`.

use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};

use crate::der::{self, CertInfo};
use crate::error::Error;
use crate::state::{AGENT_CERT, AGENT_KEY, CA_CERT, StateDir};

/// Makes a new key pair; returns its PKCS#8 DER.
pub(crate) fn generate_key() -> Result<Vec<u8>, Error> {
    let rng = SystemRandom::new();
    EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map(|doc| doc.as_ref().to_vec())
        .map_err(|ring::error::Unspecified| {
            Error::opaque_crypto("could not generate a P-256 key pair")
        })
}

/// Loads a PKCS#8 P-256 key.
pub(crate) fn load_key(pkcs8: &[u8]) -> Result<EcdsaKeyPair, Error> {
    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8, &SystemRandom::new())
        .map_err(|e| Error::crypto("agent key is not a valid P-256 PKCS#8 key", e.to_string()))
}

/// Loads a PEM (PKCS#8) key; `name` says where it came from.
pub(crate) fn key_from_pem(pem: &str, name: &str) -> Result<EcdsaKeyPair, Error> {
    let der =
        stella_proto::pem::decode("PRIVATE KEY", pem).map_err(|e| Error::malformed(name, e))?;
    load_key(&der)
}

/// The key stored as `name` in the state dir; `None` when there is no such file.
pub(crate) fn read_key(state: &StateDir, name: &str) -> Result<Option<EcdsaKeyPair>, Error> {
    match state.read_text(name) {
        Ok(pem) => key_from_pem(&pem, name).map(Some),
        Err(_) => Ok(None),
    }
}

/// A PEM CSR for `key`, with subject CN = `name` (the server picks the real
/// subject; the CSR proves possession of the key).
pub(crate) fn csr_pem(key: &EcdsaKeyPair, name: &str) -> Result<String, Error> {
    let info = der::csr_info(name, key.public_key().as_ref());
    let signature = key
        .sign(&SystemRandom::new(), &info)
        .map_err(|ring::error::Unspecified| Error::opaque_crypto("could not sign the CSR"))?;
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
    stella_proto::pem::decode("CERTIFICATE", pem).map_err(|e| Error::malformed(what, e))
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
        let key = key_from_pem(&key_pem, AGENT_KEY)?;
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
