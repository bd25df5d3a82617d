//! SHA-256 helpers and the `sha256:HEX` pin format (kubeadm's discovery hash:
//! the digest of a CA's DER SubjectPublicKeyInfo).

use ring::digest;

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

/// Decodes lowercase or uppercase hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.as_bytes()
        .chunks(2)
        .map(|pair| {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            Some((hi * 16 + lo) as u8)
        })
        .collect()
}

/// SHA-256 digest.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// `sha256:<hex>` of a DER SubjectPublicKeyInfo.
pub fn spki_pin(spki_der: &[u8]) -> String {
    format!("sha256:{}", hex(&sha256(spki_der)))
}

/// Parses a `sha256:<64 hex>` pin into its digest.
pub fn parse_pin(pin: &str) -> Result<[u8; 32], String> {
    let hexpart = pin
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("CA hash {pin:?} must start with \"sha256:\""))?;
    let bytes = unhex(hexpart)
        .filter(|b| b.len() == 32)
        .ok_or_else(|| format!("CA hash {pin:?} must be sha256: followed by 64 hex digits"))?;
    let mut out = [0u8; 32];
    out.copy_from_slice(&bytes);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_abc() {
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn pins_round_trip_and_refuse_garbage() {
        let pin = spki_pin(b"abc");
        assert_eq!(parse_pin(&pin).unwrap(), sha256(b"abc"));
        assert!(parse_pin("md5:00").is_err());
        assert!(parse_pin("sha256:abcd").is_err());
        assert!(parse_pin(&format!("sha256:{}", "zz".repeat(32))).is_err());
    }
}
