//! Just enough DER for the agent: build a PKCS#10 CSR for an ECDSA P-256 key,
//! and read a certificate's serial, validity and public key. Kept tiny so the
//! agent needs no X.509 library.

use crate::error::Error;

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const INTEGER: u8 = 0x02;
const BIT_STRING: u8 = 0x03;
const OID: u8 = 0x06;
const UTF8_STRING: u8 = 0x0c;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const CONTEXT_0: u8 = 0xa0;

/// id-ecPublicKey, prime256v1.
const EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const PRIME256V1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// ecdsa-with-SHA256.
const ECDSA_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
/// id-at-commonName.
const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];

/// Appends one TLV.
fn put(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
    out.push(tag);
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else if len <= 0xff {
        out.extend_from_slice(&[0x81, len as u8]);
    } else {
        out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]);
    }
    out.extend_from_slice(content);
}

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 4);
    put(&mut out, tag, content);
    out
}

/// SubjectPublicKeyInfo of an uncompressed P-256 point.
pub fn p256_spki(point: &[u8]) -> Vec<u8> {
    let mut alg = tlv(OID, EC_PUBLIC_KEY);
    put(&mut alg, OID, PRIME256V1);
    let mut bits = vec![0u8];
    bits.extend_from_slice(point);
    let mut body = tlv(SEQUENCE, &alg);
    put(&mut body, BIT_STRING, &bits);
    tlv(SEQUENCE, &body)
}

/// The CertificationRequestInfo to be signed: version 0, subject CN, key, no attributes.
pub fn csr_info(common_name: &str, point: &[u8]) -> Vec<u8> {
    let mut atv = tlv(OID, COMMON_NAME);
    put(&mut atv, UTF8_STRING, common_name.as_bytes());
    let name = tlv(SEQUENCE, &tlv(SET, &tlv(SEQUENCE, &atv)));
    let mut info = tlv(INTEGER, &[0]);
    info.extend_from_slice(&name);
    info.extend_from_slice(&p256_spki(point));
    put(&mut info, CONTEXT_0, &[]);
    tlv(SEQUENCE, &info)
}

/// The whole CSR from its signed info and the ASN.1 ECDSA signature.
pub fn csr(info: &[u8], signature: &[u8]) -> Vec<u8> {
    let mut body = info.to_vec();
    put(&mut body, SEQUENCE, &tlv(OID, ECDSA_SHA256));
    let mut bits = vec![0u8];
    bits.extend_from_slice(signature);
    put(&mut body, BIT_STRING, &bits);
    tlv(SEQUENCE, &body)
}

/// One TLV read from the front of some input.
struct Tlv<'a> {
    tag: u8,
    /// Header and content.
    whole: &'a [u8],
    content: &'a [u8],
    /// What follows it.
    rest: &'a [u8],
}

/// Reads one TLV.
fn take(input: &[u8]) -> Option<Tlv<'_>> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 3 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    let header = input.len() - rest.len();
    Some(Tlv {
        tag,
        whole: &input[..header + len],
        content: &rest[..len],
        rest: &rest[len..],
    })
}

fn expect(input: &[u8], want: u8) -> Option<Tlv<'_>> {
    take(input).filter(|t| t.tag == want)
}

/// What the agent needs to know of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Hex of the serial's content octets.
    pub serial: String,
    pub not_before: u64,
    pub not_after: u64,
    /// The DER SubjectPublicKeyInfo.
    pub spki: Vec<u8>,
}

fn parse_time(tag: u8, s: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(s).ok()?;
    let (year, rest) = match tag {
        UTC_TIME => {
            let yy: i64 = s.get(..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, s.get(2..)?)
        }
        GENERALIZED_TIME => (s.get(..4)?.parse().ok()?, s.get(4..)?),
        _ => return None,
    };
    // MMDDHHMMSSZ
    if rest.len() != 11 || !rest.ends_with('Z') {
        return None;
    }
    let n = |r: std::ops::Range<usize>| -> Option<u64> { rest.get(r)?.parse().ok() };
    let (mo, d, h, mi, sec) = (n(0..2)?, n(2..4)?, n(4..6)?, n(6..8)?, n(8..10)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let days = stella_proto::time::days_from_civil(year, mo as u32, d as u32);
    u64::try_from(days * 86_400 + (h * 3600 + mi * 60 + sec) as i64).ok()
}

/// Reads serial, validity and key of an X.509 certificate.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, Error> {
    let bad = || Error::Invalid("certificate is not valid DER X.509".into());
    let cert = expect(der, SEQUENCE).ok_or_else(bad)?;
    let tbs = expect(cert.content, SEQUENCE).ok_or_else(bad)?;
    let mut rest = tbs.content;
    if rest.first() == Some(&CONTEXT_0) {
        rest = take(rest).ok_or_else(bad)?.rest;
    }
    let serial = expect(rest, INTEGER).ok_or_else(bad)?;
    let signature_alg = expect(serial.rest, SEQUENCE).ok_or_else(bad)?;
    let issuer = expect(signature_alg.rest, SEQUENCE).ok_or_else(bad)?;
    let validity = expect(issuer.rest, SEQUENCE).ok_or_else(bad)?;
    let subject = expect(validity.rest, SEQUENCE).ok_or_else(bad)?;
    let spki = expect(subject.rest, SEQUENCE).ok_or_else(bad)?;
    let not_before = take(validity.content).ok_or_else(bad)?;
    let not_after = take(not_before.rest).ok_or_else(bad)?;
    Ok(CertInfo {
        serial: stella_proto::hash::hex(serial.content),
        not_before: parse_time(not_before.tag, not_before.content).ok_or_else(bad)?,
        not_after: parse_time(not_after.tag, not_after.content).ok_or_else(bad)?,
        spki: spki.whole.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_use_the_short_and_long_forms() {
        assert_eq!(tlv(0x04, &[1, 2]), [0x04, 2, 1, 2]);
        assert_eq!(&tlv(0x04, &[0; 200])[..3], &[0x04, 0x81, 200]);
        assert_eq!(&tlv(0x04, &[0; 300])[..4], &[0x04, 0x82, 1, 44]);
        let t = take(&[0x04, 0x81, 2, 9, 9, 7]).unwrap();
        assert_eq!(
            (t.tag, t.whole.len(), t.content, t.rest),
            (0x04, 5, &[9u8, 9][..], &[7u8][..])
        );
        assert!(take(&[0x04, 5, 1]).is_none());
    }

    #[test]
    fn spki_has_the_standard_p256_prefix() {
        let spki = p256_spki(&[4; 65]);
        assert_eq!(spki.len(), 91);
        assert_eq!(&spki[..4], &[0x30, 0x59, 0x30, 0x13]);
    }

    #[test]
    fn times_parse_in_both_forms() {
        assert_eq!(parse_time(UTC_TIME, b"261123100000Z"), Some(1_795_428_000));
        assert_eq!(
            parse_time(GENERALIZED_TIME, b"20261123100000Z"),
            Some(1_795_428_000)
        );
        assert_eq!(parse_time(UTC_TIME, b"261323100000Z"), None);
        assert_eq!(parse_time(UTC_TIME, b"2611231000Z"), None);
    }
}
