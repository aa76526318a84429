//! CHAP (RFC 1994, as used by RFC 7143 12.1.3): the response is MD5 over the one-byte
//! identifier, the secret and the challenge. Binary values travel as hex (`0x...`) or base64
//! (`0b...`) constants (RFC 7143 6.1).

use md5::{Digest, Md5};

/// MD5 CHAP response: MD5(identifier || secret || challenge) (RFC 1994 4.1).
pub fn response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// Compare without an early exit, so timing tells nothing about the expected response.
pub fn equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Encode as a hex constant.
pub fn to_hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(2 + 2 * b.len());
    s.push_str("0x");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

/// Decode a binary value: `0x`/`0X` hex or `0b`/`0B` base64 (RFC 7143 6.1).
pub fn decode_binary(v: &str) -> Option<Vec<u8>> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        decode_hex(h)
    } else if let Some(b) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        decode_base64(b)
    } else {
        None
    }
}

fn decode_hex(h: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = h
        .bytes()
        .map(|c| (c as char).to_digit(16).map(|d| d as u8))
        .collect::<Option<_>>()?;
    if digits.is_empty() {
        return None;
    }
    // An odd number of digits has an implied leading zero.
    let mut out = Vec::with_capacity(digits.len().div_ceil(2));
    let mut iter = digits.iter();
    if digits.len() % 2 == 1 {
        out.push(*iter.next()?);
    }
    while let (Some(hi), Some(lo)) = (iter.next(), iter.next()) {
        out.push(hi << 4 | lo);
    }
    Some(out)
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let s = s.trim_end_matches('=');
    if s.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        acc = (acc << 6) | val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_chap_response_known_vector() {
        // MD5(0x01 || "secret" || 0x00..0x0f), computed independently of this code with
        // Python's hashlib.md5(b'\x01secret' + bytes(range(16))).
        let challenge: Vec<u8> = (0u8..16).collect();
        let r = response(1, b"secret", &challenge);
        assert_eq!(to_hex(&r), "0x740e86463bda3a4d7017d6e0fba0699d");
    }

    #[test]
    fn md5_of_empty_input_is_the_rfc_1321_vector() {
        // Identifier 0x61 ('a') with an empty secret and challenge hashes the string "a".
        assert_eq!(
            to_hex(&response(b'a', b"", b"")),
            "0x0cc175b9c0f1b6a831c399e269772661" // MD5("a"), RFC 1321 A.5
        );
    }

    #[test]
    fn hex_and_base64_decode_the_same_bytes() {
        assert_eq!(decode_binary("0x0102ff"), Some(vec![1, 2, 255]));
        assert_eq!(decode_binary("0X102ff"), Some(vec![1, 2, 255]));
        assert_eq!(decode_binary("0bAQL/"), Some(vec![1, 2, 255]));
        assert_eq!(decode_binary("0bAQI="), Some(vec![1, 2]));
        assert_eq!(decode_binary("0xzz"), None);
        assert_eq!(decode_binary("1234"), None);
    }

    #[test]
    fn equal_compares_content_and_length() {
        assert!(equal(b"abc", b"abc"));
        assert!(!equal(b"abc", b"abd"));
        assert!(!equal(b"abc", b"ab"));
    }
}
