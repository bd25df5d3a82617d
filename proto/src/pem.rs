//! PEM armour (RFC 7468): encoding, and decoding of the first block with a
//! given label.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// Encodes DER as a PEM block with 64-column lines.
pub fn encode(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// Decodes every PEM block labelled `label`, in order.
pub fn decode_all(label: &str, text: &str) -> Result<Vec<Vec<u8>>, String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(&begin) {
        let after = &rest[start + begin.len()..];
        let stop = after
            .find(&end)
            .ok_or_else(|| format!("PEM block {label} has no END line"))?;
        let body: String = after[..stop].split_whitespace().collect();
        let der = STANDARD
            .decode(body.as_bytes())
            .map_err(|e| format!("PEM block {label} is not valid base64: {e}"))?;
        blocks.push(der);
        rest = &after[stop + end.len()..];
    }
    Ok(blocks)
}

/// Decodes the first PEM block labelled `label`.
pub fn decode(label: &str, text: &str) -> Result<Vec<u8>, String> {
    decode_all(label, text)?
        .into_iter()
        .next()
        .ok_or_else(|| format!("no PEM block labelled {label}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_wraps_lines() {
        let der: Vec<u8> = (0..=255).collect();
        let text = encode("CERTIFICATE", &der);
        assert!(text.lines().all(|l| l.len() <= 64));
        assert_eq!(decode("CERTIFICATE", &text).unwrap(), der);
        let two = format!("{text}{}", encode("CERTIFICATE", b"x"));
        assert_eq!(decode_all("CERTIFICATE", &two).unwrap().len(), 2);
        assert!(decode("PRIVATE KEY", &text).is_err());
        assert!(
            decode(
                "CERTIFICATE",
                "-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----"
            )
            .is_err()
        );
    }
}
