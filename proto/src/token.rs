//! Registration tokens, kubeadm-like: `[a-z0-9]{6}.[a-z0-9]{32}`, a public id
//! and a secret. The server keeps only the id and a SHA-256 of the secret and
//! compares in constant time.

use std::fmt;

use subtle::ConstantTimeEq;

const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
const ID_LEN: usize = 6;
const SECRET_LEN: usize = 32;

/// A parsed registration token.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistrationToken {
    id: String,
    secret: String,
}

// Never print the secret, even in debug output.
impl fmt::Debug for RegistrationToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RegistrationToken({}.<secret>)", self.id)
    }
}

/// Why a token string was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenFormatError;

impl fmt::Display for TokenFormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "malformed token: expected 6 characters [a-z0-9], a dot, then 32 characters [a-z0-9]",
        )
    }
}

impl std::error::Error for TokenFormatError {}

fn well_formed(part: &str, len: usize) -> bool {
    part.len() == len && part.bytes().all(|b| ALPHABET.contains(&b))
}

impl RegistrationToken {
    /// Parses `id.secret`.
    pub fn parse(s: &str) -> Result<Self, TokenFormatError> {
        let (id, secret) = s.split_once('.').ok_or(TokenFormatError)?;
        if !well_formed(id, ID_LEN) || !well_formed(secret, SECRET_LEN) {
            return Err(TokenFormatError);
        }
        Ok(Self {
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }

    /// Makes a token from random bytes (38 of them: 6 for the id, 32 for the
    /// secret). Each byte picks one character; the tiny modulo bias of 256 % 36
    /// leaves about 5.1 bits per secret character, 163 bits in all.
    pub fn from_random(random: &[u8; ID_LEN + SECRET_LEN]) -> Self {
        let pick = |b: &u8| ALPHABET[(*b as usize) % ALPHABET.len()] as char;
        Self {
            id: random[..ID_LEN].iter().map(pick).collect(),
            secret: random[ID_LEN..].iter().map(pick).collect(),
        }
    }

    /// The public id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The secret part (show it once, then forget it).
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// SHA-256 of the secret: what the server stores.
    pub fn secret_hash(&self) -> [u8; 32] {
        hash_secret(&self.secret)
    }

    /// Whether this token's secret hashes to `stored`, compared in constant time.
    pub fn matches_hash(&self, stored: &[u8]) -> bool {
        constant_time_eq(&self.secret_hash(), stored)
    }

    /// The full `id.secret` string.
    pub fn expose(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }
}

/// Whether `s` is a well-formed token id.
pub fn is_token_id(s: &str) -> bool {
    well_formed(s, ID_LEN)
}

/// SHA-256 of a secret (registration or admin).
pub fn hash_secret(secret: &str) -> [u8; 32] {
    crate::hash::sha256(secret.as_bytes())
}

/// Constant-time equality of two byte strings (length is not secret).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_well_formed_tokens() {
        let t = RegistrationToken::parse("abc123.0123456789abcdefghijklmnopqrstuv").unwrap();
        assert_eq!(t.id(), "abc123");
        assert_eq!(t.secret(), "0123456789abcdefghijklmnopqrstuv");
        assert_eq!(t.expose(), "abc123.0123456789abcdefghijklmnopqrstuv");
        assert!(!format!("{t:?}").contains("0123456789"));
    }

    #[test]
    fn refuses_malformed_tokens() {
        for bad in [
            "",
            "abc123",
            "abc123.",
            "abc12.0123456789abcdefghijklmnopqrstuv",
            "abc1234.0123456789abcdefghijklmnopqrstu",
            "ABC123.0123456789abcdefghijklmnopqrstuv",
            "abc123.0123456789abcdefghijklmnopqrstu",
            "abc123.0123456789abcdefghijklmnopqrstuvw",
            "abc123:0123456789abcdefghijklmnopqrstuv",
            "abc123.0123456789abcdefghijklmnopqrst-v",
            "abc123.0123456789abcdefghijklmnopqrstuv.x",
        ] {
            assert_eq!(
                RegistrationToken::parse(bad),
                Err(TokenFormatError),
                "{bad}"
            );
        }
    }

    #[test]
    fn generated_tokens_parse_and_match_their_hash() {
        let mut random = [0u8; 38];
        for (i, b) in random.iter_mut().enumerate() {
            *b = (i * 37 + 11) as u8;
        }
        let t = RegistrationToken::from_random(&random);
        let again = RegistrationToken::parse(&t.expose()).unwrap();
        assert_eq!(t, again);
        assert!(again.matches_hash(&t.secret_hash()));
        let other = RegistrationToken::parse("abc123.0123456789abcdefghijklmnopqrstuv").unwrap();
        assert!(!other.matches_hash(&t.secret_hash()));
        assert!(!other.matches_hash(&[]));
    }
}
