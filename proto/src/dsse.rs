//! DSSE v1 envelopes (secure-systems-lab/dsse `protocol.md`): PAE, signing
//! with an Ed25519 release key, and verification against one pinned public key.
//! Also the PEM encodings of those keys: PKCS#8 private, SubjectPublicKeyInfo public.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::{
    STANDARD, STANDARD_PAD_INDIFFERENT, URL_SAFE_PAD_INDIFFERENT,
};
use miniserde::{Deserialize, Serialize};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

/// Largest envelope the verifier reads (bytes): a release statement is a few
/// hundred bytes per file, so this only stops a hostile server wasting memory.
pub const MAX_ENVELOPE_BYTES: usize = 1 << 20;

/// Most signatures the verifier tries on one envelope (each costs a verification).
pub const MAX_SIGNATURES: usize = 16;

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): the 32-byte key follows.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// DER prefix of an Ed25519 PKCS#8 v1 private key (RFC 8410): the 32-byte seed follows.
const PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// Why an envelope or a key was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DsseError {
    /// The envelope is larger than [`MAX_ENVELOPE_BYTES`].
    TooLarge { len: usize },
    /// The envelope is not UTF-8 JSON of the DSSE shape.
    Json,
    /// A base64 field did not decode; `field` names it (`payload`, `signatures[1].sig`).
    Base64 { field: String },
    /// The envelope's payloadType is not the one the caller expects.
    PayloadType { found: String, expected: String },
    /// The envelope carries no signature.
    NoSignatures,
    /// The envelope carries more than [`MAX_SIGNATURES`] signatures.
    TooManySignatures { count: usize },
    /// No signature verifies under the pinned key.
    BadSignature,
    /// A key file is not what it should be; the text says what.
    Key(String),
    /// The system random number generator failed.
    Random,
}

impl fmt::Display for DsseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge { len } => write!(
                f,
                "DSSE envelope is {len} bytes, more than the {MAX_ENVELOPE_BYTES} allowed"
            ),
            Self::Json => f.write_str(
                "DSSE envelope is not JSON with string fields payloadType and payload and a \
                 signatures list of {keyid, sig}",
            ),
            Self::Base64 { field } => write!(f, "bad base64 in DSSE envelope field {field}"),
            Self::PayloadType { found, expected } => {
                write!(f, "payload type {found:?} is not {expected:?}")
            }
            Self::NoSignatures => f.write_str("DSSE envelope has no signatures"),
            Self::TooManySignatures { count } => write!(
                f,
                "DSSE envelope has {count} signatures, more than the {MAX_SIGNATURES} allowed"
            ),
            Self::BadSignature => f.write_str("no signature verifies with the pinned release key"),
            Self::Key(what) => f.write_str(what),
            Self::Random => f.write_str("the system random number generator failed"),
        }
    }
}

impl std::error::Error for DsseError {}

/// One signature of an envelope. `keyid` is a hint for humans only: it is
/// never used to pick or trust a key.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub keyid: Option<String>,
    /// Base64 of the raw signature over the PAE.
    pub sig: String,
}

/// A DSSE envelope as JSON carries it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    /// Base64 of the serialized body.
    pub payload: String,
    pub signatures: Vec<Signature>,
}

impl Envelope {
    /// The envelope as one line of JSON.
    pub fn to_json(&self) -> String {
        miniserde::json::to_string(self)
    }

    /// Parses an envelope, refusing anything over [`MAX_ENVELOPE_BYTES`].
    pub fn from_json(bytes: &[u8]) -> Result<Self, DsseError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(DsseError::TooLarge { len: bytes.len() });
        }
        let text = std::str::from_utf8(bytes).map_err(|_| DsseError::Json)?;
        miniserde::json::from_str(text).map_err(|_| DsseError::Json)
    }

    /// Checks the payload type, then that at least one signature verifies under
    /// `key`; returns the payload bytes that were signed.
    pub fn verify(&self, expected_type: &str, key: &PublicKey) -> Result<Vec<u8>, DsseError> {
        if self.payload_type != expected_type {
            return Err(DsseError::PayloadType {
                found: self.payload_type.clone(),
                expected: expected_type.to_owned(),
            });
        }
        if self.signatures.is_empty() {
            return Err(DsseError::NoSignatures);
        }
        if self.signatures.len() > MAX_SIGNATURES {
            return Err(DsseError::TooManySignatures {
                count: self.signatures.len(),
            });
        }
        let payload = decode_base64("payload", &self.payload)?;
        let message = pae(&self.payload_type, &payload);
        let pinned = UnparsedPublicKey::new(&ED25519, key.0);
        // Another signer's entry may use an encoding we do not know; skip it
        // and only report it if nothing verifies.
        let mut undecodable = None;
        for (i, entry) in self.signatures.iter().enumerate() {
            match decode_base64(&format!("signatures[{i}].sig"), &entry.sig) {
                Ok(sig) => {
                    if pinned.verify(&message, &sig).is_ok() {
                        return Ok(payload);
                    }
                }
                Err(e) => {
                    undecodable.get_or_insert(e);
                }
            }
        }
        Err(undecodable.unwrap_or(DsseError::BadSignature))
    }
}

/// Parses `bytes` as an envelope and verifies it (see [`Envelope::verify`]).
pub fn verify(bytes: &[u8], expected_type: &str, key: &PublicKey) -> Result<Vec<u8>, DsseError> {
    Envelope::from_json(bytes)?.verify(expected_type, key)
}

/// Signs `payload` into an envelope with one signature, whose keyid is the
/// key's fingerprint.
pub fn sign(key: &SigningKey, payload_type: &str, payload: &[u8]) -> Envelope {
    let sig = key.pair.sign(&pae(payload_type, payload));
    Envelope {
        payload_type: payload_type.to_owned(),
        payload: STANDARD.encode(payload),
        signatures: vec![Signature {
            keyid: Some(key.public_key().fingerprint()),
            sig: STANDARD.encode(sig.as_ref()),
        }],
    }
}

/// Pre-Authentication Encoding:
/// `"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`, lengths in ASCII decimal.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let head = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    );
    let mut out = Vec::with_capacity(head.len() + payload.len());
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(payload);
    out
}

/// Decodes standard or URL-safe base64, padded or not; `field` names the
/// input in the error.
pub fn decode_base64(field: &str, text: &str) -> Result<Vec<u8>, DsseError> {
    // The alphabets share all but two characters each, so one of them decides.
    let engine = if text.contains(['-', '_']) {
        &URL_SAFE_PAD_INDIFFERENT
    } else {
        &STANDARD_PAD_INDIFFERENT
    };
    engine.decode(text).map_err(|_| DsseError::Base64 {
        field: field.to_owned(),
    })
}

/// A pinned Ed25519 public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// The key from its 32 raw bytes.
    pub fn from_bytes(raw: [u8; 32]) -> Self {
        Self(raw)
    }

    /// Parses a DER SubjectPublicKeyInfo holding an Ed25519 key.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, DsseError> {
        match der.strip_prefix(&SPKI_PREFIX[..]) {
            Some(raw) if raw.len() == 32 => {
                let mut key = [0u8; 32];
                key.copy_from_slice(raw);
                Ok(Self(key))
            }
            _ => Err(DsseError::Key(
                "public key is not an Ed25519 SubjectPublicKeyInfo (OID 1.3.101.112)".to_owned(),
            )),
        }
    }

    /// Parses a PEM `PUBLIC KEY` block holding an Ed25519 key.
    pub fn from_pem(text: &str) -> Result<Self, DsseError> {
        let der = crate::pem::decode("PUBLIC KEY", text).map_err(DsseError::Key)?;
        Self::from_spki_der(&der)
    }

    /// The 32 raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// DER SubjectPublicKeyInfo.
    pub fn to_spki_der(&self) -> Vec<u8> {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.0);
        der
    }

    /// PEM `PUBLIC KEY`, as `openssl pkey -pubout` writes it.
    pub fn to_pem(&self) -> String {
        crate::pem::encode("PUBLIC KEY", &self.to_spki_der())
    }

    /// `sha256:<hex>` of the DER SubjectPublicKeyInfo, as `openssl pkey -pubin
    /// -outform DER | sha256sum` prints it.
    pub fn fingerprint(&self) -> String {
        crate::hash::spki_pin(&self.to_spki_der())
    }
}

/// A private Ed25519 release key.
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

// Never print key material, even in debug output.
impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.public_key().fingerprint())
    }
}

impl SigningKey {
    /// Makes a new key; returns it with its PEM `PRIVATE KEY` (PKCS#8 v1, the
    /// form `openssl genpkey -algorithm ed25519` writes and every reader accepts).
    pub fn generate() -> Result<(Self, String), DsseError> {
        let mut der = [0u8; 48];
        der[..16].copy_from_slice(&PKCS8_V1_PREFIX);
        SystemRandom::new()
            .fill(&mut der[16..])
            .map_err(|_| DsseError::Random)?;
        let key = Self::from_pkcs8_der(&der)?;
        Ok((key, crate::pem::encode("PRIVATE KEY", &der)))
    }

    /// Parses a DER PKCS#8 Ed25519 private key, v1 (seed only) or v2 (with the
    /// public key, which must match).
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, DsseError> {
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map(|pair| Self { pair })
            .map_err(|e| DsseError::Key(format!("private key is not an Ed25519 PKCS#8 key: {e}")))
    }

    /// Parses a PEM `PRIVATE KEY` block (as `openssl genpkey -algorithm ed25519` writes).
    pub fn from_pem(text: &str) -> Result<Self, DsseError> {
        let der = crate::pem::decode("PRIVATE KEY", text).map_err(DsseError::Key)?;
        Self::from_pkcs8_der(&der)
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        let mut raw = [0u8; 32];
        raw.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(raw)
    }
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};

    use super::*;

    const TYPE: &str = "application/vnd.in-toto+json";

    /// RFC 8032 section 7.1, test 1: secret key seed and public key.
    const RFC8032_SEED: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
    const RFC8032_PUBLIC: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

    fn rfc8032_key() -> SigningKey {
        let mut der = PKCS8_V1_PREFIX.to_vec();
        der.extend(crate::hash::unhex(RFC8032_SEED).unwrap());
        SigningKey::from_pkcs8_der(&der).unwrap()
    }

    #[test]
    fn pae_matches_the_spec_example() {
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ");
        // Lengths are bytes, not characters.
        assert_eq!(pae("é", "ü".as_bytes()), "DSSEv1 2 é 2 ü".as_bytes());
    }

    #[test]
    fn signatures_match_rfc8032_ed25519() {
        let key = rfc8032_key();
        assert_eq!(
            crate::hash::hex(key.public_key().as_bytes()),
            RFC8032_PUBLIC
        );
        // Ed25519 is deterministic: RFC 8032 test 1 signs the empty message.
        let sig = key.pair.sign(b"");
        assert!(crate::hash::hex(sig.as_ref()).starts_with("e5564300c360ac729086e2cc806e828a"));
    }

    #[test]
    fn sign_then_verify_round_trips_through_json() {
        let (key, _) = SigningKey::generate().unwrap();
        let env = sign(&key, TYPE, b"{\"a\":1}");
        assert_eq!(
            env.signatures[0].keyid.as_deref(),
            Some(key.public_key().fingerprint().as_str())
        );
        let json = env.to_json();
        assert!(json.starts_with("{\"payloadType\":\"application/vnd.in-toto+json\",\"payload\":"));
        let payload = verify(json.as_bytes(), TYPE, &key.public_key()).unwrap();
        assert_eq!(payload, b"{\"a\":1}");
    }

    #[test]
    fn accepts_every_base64_flavour_and_ignores_keyid() {
        let key = rfc8032_key();
        // Bytes chosen so that standard and URL-safe encodings differ and need padding.
        let payload = [0xfbu8, 0xff, 0xfe, 0x3e, 0x3f];
        let env = sign(&key, TYPE, &payload);
        let sig = STANDARD.decode(&env.signatures[0].sig).unwrap();
        for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
            let mut other = env.clone();
            other.payload = engine.encode(payload);
            other.signatures[0].sig = engine.encode(&sig);
            other.signatures[0].keyid = None;
            assert_eq!(other.verify(TYPE, &key.public_key()).unwrap(), payload);
            // A keyid naming some other key changes nothing.
            other.signatures[0].keyid = Some("someone-else".to_owned());
            assert_eq!(other.verify(TYPE, &key.public_key()).unwrap(), payload);
        }
        // keyid may be absent from the JSON altogether.
        let json = format!(
            r#"{{"payloadType":"{TYPE}","payload":"{}","signatures":[{{"sig":"{}"}}]}}"#,
            env.payload, env.signatures[0].sig
        );
        assert!(verify(json.as_bytes(), TYPE, &key.public_key()).is_ok());
    }

    #[test]
    fn any_signature_under_the_pinned_key_is_enough() {
        let key = rfc8032_key();
        let (other, _) = SigningKey::generate().unwrap();
        let mut env = sign(&other, TYPE, b"x");
        assert_eq!(
            env.verify(TYPE, &key.public_key()),
            Err(DsseError::BadSignature)
        );
        env.signatures.push(Signature {
            keyid: Some("not base64 ***".to_owned()),
            sig: "***".to_owned(),
        });
        // Nothing verifies, and the undecodable entry is named.
        assert_eq!(
            env.verify(TYPE, &key.public_key()),
            Err(DsseError::Base64 {
                field: "signatures[1].sig".to_owned()
            })
        );
        env.signatures
            .push(sign(&key, TYPE, b"x").signatures[0].clone());
        assert_eq!(env.verify(TYPE, &key.public_key()).unwrap(), b"x");
    }

    #[test]
    fn refusals_name_what_was_wrong() {
        let key = rfc8032_key();
        let pinned = key.public_key();
        let env = sign(&key, TYPE, b"payload");

        let mut wrong_type = sign(&key, "text/plain", b"payload");
        let err = wrong_type.verify(TYPE, &pinned).unwrap_err();
        assert_eq!(
            err.to_string(),
            "payload type \"text/plain\" is not \"application/vnd.in-toto+json\""
        );
        // Relabelling a signed envelope breaks the signature (the type is in the PAE).
        wrong_type.payload_type = TYPE.to_owned();
        assert_eq!(
            wrong_type.verify(TYPE, &pinned),
            Err(DsseError::BadSignature)
        );

        let mut tampered = env.clone();
        tampered.payload = STANDARD.encode(b"payloaD");
        let err = tampered.verify(TYPE, &pinned).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no signature verifies with the pinned release key"
        );

        let mut bad_b64 = env.clone();
        bad_b64.payload.push('!');
        assert_eq!(
            bad_b64.verify(TYPE, &pinned).unwrap_err().to_string(),
            "bad base64 in DSSE envelope field payload"
        );

        let mut mixed = env.clone();
        mixed.payload = "+/-_".to_owned();
        assert!(matches!(
            mixed.verify(TYPE, &pinned),
            Err(DsseError::Base64 { .. })
        ));

        let mut none = env.clone();
        none.signatures.clear();
        assert_eq!(none.verify(TYPE, &pinned), Err(DsseError::NoSignatures));

        let mut many = env.clone();
        many.signatures = vec![env.signatures[0].clone(); MAX_SIGNATURES + 1];
        assert_eq!(
            many.verify(TYPE, &pinned),
            Err(DsseError::TooManySignatures {
                count: MAX_SIGNATURES + 1
            })
        );

        let mut short_sig = env;
        short_sig.signatures[0].sig = STANDARD.encode([0u8; 63]);
        assert_eq!(
            short_sig.verify(TYPE, &pinned),
            Err(DsseError::BadSignature)
        );
    }

    #[test]
    fn refuses_oversized_and_malformed_envelopes() {
        let key = rfc8032_key().public_key();
        let big = vec![b' '; MAX_ENVELOPE_BYTES + 1];
        assert_eq!(
            verify(&big, TYPE, &key),
            Err(DsseError::TooLarge {
                len: MAX_ENVELOPE_BYTES + 1
            })
        );
        for bad in [
            &b""[..],
            b"{",
            b"[]",
            b"\xff\xfe",
            br#"{"payloadType":"t","payload":"","signatures":{}}"#,
            br#"{"payloadType":1,"payload":"","signatures":[]}"#,
            br#"{"payload":"","signatures":[]}"#,
            br#"{"payloadType":"t","payload":"","signatures":[{"keyid":"k"}]}"#,
        ] {
            assert_eq!(
                verify(bad, TYPE, &key),
                Err(DsseError::Json),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn keys_round_trip_through_pem() {
        let (key, private_pem) = SigningKey::generate().unwrap();
        assert!(private_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let der = crate::pem::decode("PRIVATE KEY", &private_pem).unwrap();
        assert_eq!(der.len(), 48);
        assert_eq!(der[..16], PKCS8_V1_PREFIX);
        let again = SigningKey::from_pem(&private_pem).unwrap();
        assert_eq!(again.public_key(), key.public_key());

        let public_pem = key.public_key().to_pem();
        assert!(public_pem.starts_with("-----BEGIN PUBLIC KEY-----\n"));
        assert_eq!(PublicKey::from_pem(&public_pem).unwrap(), key.public_key());
        assert_eq!(key.public_key().to_spki_der().len(), 44);
        assert!(key.public_key().fingerprint().starts_with("sha256:"));
        assert!(!format!("{key:?}").contains(&private_pem[28..60]));
    }

    #[test]
    fn loads_openssl_and_ring_key_forms() {
        // `openssl genpkey -algorithm ed25519` (PKCS#8 v1), the RFC 8410 example key.
        let openssl = "-----BEGIN PRIVATE KEY-----\n\
            MC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n\
            -----END PRIVATE KEY-----\n";
        let key = SigningKey::from_pem(openssl).unwrap();
        // RFC 8410 section 10.1 gives the matching public key.
        let public = "-----BEGIN PUBLIC KEY-----\n\
            MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n\
            -----END PUBLIC KEY-----\n";
        assert_eq!(key.public_key(), PublicKey::from_pem(public).unwrap());
        assert_eq!(key.public_key().to_pem(), public);

        // ring's own PKCS#8 v2 (with the public key).
        let v2 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        assert!(SigningKey::from_pkcs8_der(v2.as_ref()).is_ok());
    }

    #[test]
    fn refuses_keys_of_the_wrong_kind() {
        assert!(PublicKey::from_pem("nothing here").is_err());
        // A P-256 SubjectPublicKeyInfo prefix.
        let p256 = crate::pem::encode("PUBLIC KEY", &[0x30, 0x59, 0x30, 0x13, 0x06, 0x07]);
        let err = PublicKey::from_pem(&p256).unwrap_err();
        assert!(err.to_string().contains("Ed25519"), "{err}");
        let mut long = rfc8032_key().public_key().to_spki_der();
        long.push(0);
        assert!(PublicKey::from_spki_der(&long).is_err());
        let err = SigningKey::from_pem(&crate::pem::encode("PRIVATE KEY", b"junk")).unwrap_err();
        assert!(err.to_string().contains("PKCS#8"), "{err}");
        assert!(SigningKey::from_pem("-----BEGIN PUBLIC KEY-----").is_err());
    }
}
