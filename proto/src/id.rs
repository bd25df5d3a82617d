//! Agent ids: `agt_` followed by 26 lowercase RFC 4648 base32 characters that
//! encode 128 random bits.

const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// Prefix of every agent id.
pub const AGENT_ID_PREFIX: &str = "agt_";

/// Builds an agent id from 16 random bytes.
pub fn agent_id_from_bytes(random: [u8; 16]) -> String {
    let mut out = String::with_capacity(30);
    out.push_str(AGENT_ID_PREFIX);
    let value = u128::from_be_bytes(random);
    // 26 groups of 5 bits cover 130 bits; the top two are zero.
    for i in (0..26).rev() {
        out.push(ALPHABET[((value >> (i * 5)) & 31) as usize] as char);
    }
    out
}

/// Whether `s` has the shape of an agent id.
pub fn is_agent_id(s: &str) -> bool {
    match s.strip_prefix(AGENT_ID_PREFIX) {
        Some(rest) => {
            rest.len() == 26
                && rest.bytes().all(|b| ALPHABET.contains(&b))
                // The first character carries only 3 bits of the 128: a..h.
                // (Not `<= b'h'`: the digits 2-7 sort below the letters.)
                && matches!(rest.as_bytes()[0], b'a'..=b'h')
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_the_documented_shape() {
        let zero = agent_id_from_bytes([0; 16]);
        assert_eq!(zero, "agt_aaaaaaaaaaaaaaaaaaaaaaaaaa");
        let ones = agent_id_from_bytes([0xff; 16]);
        assert_eq!(ones, "agt_h7777777777777777777777777");
        assert!(is_agent_id(&zero) && is_agent_id(&ones));
        assert!(!is_agent_id("agt_h777777777777777777777777"));
        assert!(!is_agent_id("agt_i7777777777777777777777777"));
        // Fuzzing found these: a digit first would need 130 bits.
        assert!(!is_agent_id("agt_7777777777777777777777777a"));
        assert!(!is_agent_id("agt_2aaaaaaaaaaaaaaaaaaaaaaaaa"));
        assert!(!is_agent_id("agt_../../etc/passwd"));
        assert!(!is_agent_id("xyz_aaaaaaaaaaaaaaaaaaaaaaaaaa"));
    }
}
