//! Text keys (RFC 7143 6, 13): the `key=value\0` format and the negotiation of the operational
//! keys.
//!
//! Each key has a result function (RFC 7143 6.2.2): declarative keys (MaxRecvDataSegmentLength)
//! are only taken note of; numerical keys take the minimum or maximum of the offer and the
//! target's limit; boolean keys are AND or OR; list keys pick the first value of the offer the
//! target supports. A value outside the key's range or of the wrong form is answered `Reject`
//! (6.2.1), a key the target does not know `NotUnderstood` (6.2), and a session-only key in a
//! discovery session `Irrelevant` (13.x "Irrelevant when: SessionType=Discovery").

/// Longest key name (RFC 7143 6.1: up to 63 bytes).
const MAX_KEY: usize = 63;
/// Longest value accepted (RFC 7143 6.1: 255 bytes, 8192 for some; base64/hex CHAP values are
/// the longest).
const MAX_VALUE: usize = 8192;

/// Errors of [`parse`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("Text key without '='")]
    NoEquals,
    #[error("Text key or value is not UTF-8")]
    NotUtf8,
    #[error("Text key or value too long")]
    TooLong,
    #[error("Empty text key")]
    EmptyKey,
}

/// Parse `key=value` pairs separated by NUL bytes. Trailing NULs (padding) are ignored.
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let mut out = Vec::new();
    for item in data.split(|&b| b == 0) {
        if item.is_empty() {
            continue;
        }
        let eq = item
            .iter()
            .position(|&b| b == b'=')
            .ok_or(TextError::NoEquals)?;
        let (k, v) = item.split_at(eq);
        let v = v.get(1..).unwrap_or_default();
        if k.is_empty() {
            return Err(TextError::EmptyKey);
        }
        if k.len() > MAX_KEY || v.len() > MAX_VALUE {
            return Err(TextError::TooLong);
        }
        let k = std::str::from_utf8(k).map_err(|_| TextError::NotUtf8)?;
        let v = std::str::from_utf8(v).map_err(|_| TextError::NotUtf8)?;
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Encode pairs as `key=value\0`.
pub fn encode(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// Parse a numerical value: decimal, or hex with `0x` (RFC 7143 6.1: decimal-constant,
/// hex-constant). Base64 numbers are not used by any numerical key we accept.
pub fn parse_number(v: &str) -> Option<u64> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if h.is_empty() || h.len() > 16 {
            return None;
        }
        u64::from_str_radix(h, 16).ok()
    } else {
        if v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        v.parse().ok()
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yes_no(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_string()
}

/// The target's own limits and preferences.
pub mod ours {
    /// MaxRecvDataSegmentLength the target declares.
    pub const MAX_RECV_DSL: u32 = 256 * 1024;
    pub const MAX_BURST: u32 = 1024 * 1024;
    pub const FIRST_BURST: u32 = 256 * 1024;
    /// One outstanding R2T per task keeps Data-Out sequences strictly ordered.
    pub const MAX_OUTSTANDING_R2T: u32 = 1;
    pub const DEFAULT_TIME2WAIT: u32 = 2;
    pub const DEFAULT_TIME2RETAIN: u32 = 0;
}

/// Keys the target offers in a normal session's operational stage when the initiator has not
/// offered them (RFC 7143 6.2: either side may originate a negotiation), so that an initiator
/// that leaves them out still gets unsolicited and immediate data and large bursts. The
/// FirstBurstLength offered never exceeds the MaxBurstLength of `p` (already negotiated, or
/// its default), as RFC 7143 13.14 requires.
pub fn target_offers(p: &Params) -> [(&'static str, String); 4] {
    [
        ("InitialR2T", "No".into()),
        ("ImmediateData", "Yes".into()),
        ("MaxBurstLength", ours::MAX_BURST.to_string()),
        (
            "FirstBurstLength",
            ours::FIRST_BURST.min(p.max_burst).to_string(),
        ),
    ]
}

/// Errors of [`apply_answer`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    #[error("Answer to {0} is not a value its result function can give")]
    Invalid(&'static str),
}

/// Take the initiator's answer to one of [`target_offers`]. The answer is the negotiation's
/// result (RFC 7143 6.2), so it must be one the result function can produce from our offer:
/// InitialR2T is OR with our No (any Yes/No), ImmediateData AND with our Yes (any Yes/No), the
/// burst lengths the minimum (at most `offered`, the value we offered: 13 "the selected value
/// cannot exceed the offered value"). `Reject`, `NotUnderstood` and `Irrelevant` leave the key
/// at its default (6.2.1).
pub fn apply_answer(
    p: &mut Params,
    key: &str,
    value: &str,
    offered: &str,
) -> Result<(), AnswerError> {
    if matches!(value, "Reject" | "NotUnderstood" | "Irrelevant") {
        return Ok(());
    }
    let burst = |k: &'static str| {
        let ours = parse_number(offered).unwrap_or(0);
        parse_number(value)
            .filter(|n| (512..=ours).contains(n))
            .and_then(|n| u32::try_from(n).ok())
            .ok_or(AnswerError::Invalid(k))
    };
    match key {
        "InitialR2T" => {
            p.initial_r2t = parse_bool(value).ok_or(AnswerError::Invalid("InitialR2T"))?
        }
        "ImmediateData" => {
            p.immediate_data = parse_bool(value).ok_or(AnswerError::Invalid("ImmediateData"))?
        }
        "MaxBurstLength" => p.max_burst = burst("MaxBurstLength")?,
        "FirstBurstLength" => p.first_burst = burst("FirstBurstLength")?,
        _ => return Err(AnswerError::Invalid("an unoffered key")),
    }
    Ok(())
}

/// The operational parameters of a session (RFC 7143 13), starting at the RFC's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    pub header_digest: bool,
    pub data_digest: bool,
    /// The initiator's MaxRecvDataSegmentLength: the largest data segment we may send.
    pub max_send_dsl: u32,
    /// Ours: the largest data segment we accept.
    pub max_recv_dsl: u32,
    pub max_burst: u32,
    pub first_burst: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_outstanding_r2t: u32,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub error_recovery_level: u32,
    pub max_connections: u32,
    pub default_time2wait: u32,
    pub default_time2retain: u32,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            header_digest: false,
            data_digest: false,
            max_send_dsl: 8192,
            max_recv_dsl: ours::MAX_RECV_DSL,
            max_burst: 262_144,
            first_burst: 65_536,
            initial_r2t: true,
            immediate_data: true,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
            max_connections: 1,
            default_time2wait: 2,
            default_time2retain: 20,
        }
    }
}

impl Params {
    /// After negotiation: FirstBurstLength never exceeds MaxBurstLength (RFC 7143 13.14).
    pub fn finish(&mut self) {
        self.first_burst = self.first_burst.min(self.max_burst);
    }
}

/// The answer to one offered key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Answer with this value.
    Value(String),
    /// A declarative key: nothing to answer.
    Silent,
    /// Not an operational key: the caller handles it.
    NotOperational,
}

/// Negotiate one operational key offered by the initiator, updating `p`.
pub fn negotiate(p: &mut Params, key: &str, value: &str, discovery: bool) -> Answer {
    const REJECT: &str = "Reject";
    let num = |lo: u64, hi: u64| parse_number(value).filter(|n| (lo..=hi).contains(n));
    let v = |s: String| Answer::Value(s);
    let session_only = matches!(
        key,
        "MaxConnections"
            | "InitialR2T"
            | "ImmediateData"
            | "MaxBurstLength"
            | "FirstBurstLength"
            | "MaxOutstandingR2T"
            | "DataPDUInOrder"
            | "DataSequenceInOrder"
    );
    if discovery && session_only {
        return v("Irrelevant".into());
    }
    match key {
        "HeaderDigest" | "DataDigest" => {
            // List negotiation: the first value of the initiator's list we support.
            let pick = value
                .split(',')
                .find(|d| matches!(*d, "None" | "CRC32C"))
                .map(str::to_string);
            match pick {
                Some(d) => {
                    let on = d == "CRC32C";
                    if key == "HeaderDigest" {
                        p.header_digest = on;
                    } else {
                        p.data_digest = on;
                    }
                    v(d)
                }
                None => v(REJECT.into()),
            }
        }
        "MaxRecvDataSegmentLength" => match num(512, 16_777_215) {
            Some(n) => {
                p.max_send_dsl = n as u32;
                Answer::Silent
            }
            None => v(REJECT.into()),
        },
        "MaxBurstLength" | "FirstBurstLength" => match num(512, 16_777_215) {
            Some(n) => {
                let n = n as u32;
                if key == "MaxBurstLength" {
                    p.max_burst = n.min(ours::MAX_BURST);
                    v(p.max_burst.to_string())
                } else {
                    // FirstBurstLength MUST NOT exceed MaxBurstLength (RFC 7143 13.14): the
                    // one already negotiated, or its default.
                    p.first_burst = n.min(ours::FIRST_BURST).min(p.max_burst);
                    v(p.first_burst.to_string())
                }
            }
            None => v(REJECT.into()),
        },
        "MaxOutstandingR2T" => match num(1, 65535) {
            Some(n) => {
                p.max_outstanding_r2t = (n as u32).min(ours::MAX_OUTSTANDING_R2T);
                v(p.max_outstanding_r2t.to_string())
            }
            None => v(REJECT.into()),
        },
        "ErrorRecoveryLevel" => match num(0, 2) {
            Some(_) => {
                p.error_recovery_level = 0;
                v("0".into())
            }
            None => v(REJECT.into()),
        },
        "MaxConnections" => match num(1, 65535) {
            Some(_) => {
                p.max_connections = 1;
                v("1".into())
            }
            None => v(REJECT.into()),
        },
        "DefaultTime2Wait" => match num(0, 3600) {
            // Result function: Maximum.
            Some(n) => {
                p.default_time2wait = (n as u32).max(ours::DEFAULT_TIME2WAIT);
                v(p.default_time2wait.to_string())
            }
            None => v(REJECT.into()),
        },
        "DefaultTime2Retain" => match num(0, 3600) {
            // Result function: Minimum.
            Some(n) => {
                // Minimum with ours (0: nothing is retained at ERL 0).
                let _ = n;
                p.default_time2retain = ours::DEFAULT_TIME2RETAIN;
                v(p.default_time2retain.to_string())
            }
            None => v(REJECT.into()),
        },
        "InitialR2T" | "DataPDUInOrder" | "DataSequenceInOrder" => match parse_bool(value) {
            // Result function: OR. The target says No to InitialR2T (so the result is the
            // initiator's) and Yes to the ordering keys (so the result is Yes).
            Some(b) => {
                let r = match key {
                    "InitialR2T" => {
                        p.initial_r2t = b;
                        b
                    }
                    "DataPDUInOrder" => {
                        p.data_pdu_in_order = true;
                        true
                    }
                    _ => {
                        p.data_sequence_in_order = true;
                        true
                    }
                };
                v(yes_no(r))
            }
            None => v(REJECT.into()),
        },
        "ImmediateData" => match parse_bool(value) {
            // Result function: AND; the target says Yes.
            Some(b) => {
                p.immediate_data = b;
                v(yes_no(b))
            }
            None => v(REJECT.into()),
        },
        // Markers are obsolete (RFC 7143 13.26): IFMarker and OFMarker are answered No (which
        // it allows instead of Reject), the intervals "MUST" be answered Reject.
        "IFMarker" | "OFMarker" => match parse_bool(value) {
            Some(_) => v("No".into()),
            None => v(REJECT.into()),
        },
        "IFMarkInt" | "OFMarkInt" => v(REJECT.into()),
        // RFC 7144: the level both support.
        "iSCSIProtocolLevel" => match num(0, 31) {
            Some(n) => v(n.min(1).to_string()),
            None => v(REJECT.into()),
        },
        "TaskReporting" => {
            if value.split(',').any(|x| x == "RFC3720") {
                v("RFC3720".into())
            } else {
                v(REJECT.into())
            }
        }
        _ => Answer::NotOperational,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn neg(key: &str, value: &str) -> (Answer, Params) {
        let mut p = Params::default();
        let a = negotiate(&mut p, key, value, false);
        (a, p)
    }

    fn val(s: &str) -> Answer {
        Answer::Value(s.to_string())
    }

    #[test]
    fn parses_nul_separated_pairs() {
        let got = parse(b"InitiatorName=iqn.x\0SessionType=Normal\0\0\0").expect("valid");
        assert_eq!(
            got,
            vec![
                ("InitiatorName".into(), "iqn.x".into()),
                ("SessionType".into(), "Normal".into())
            ]
        );
    }

    #[test]
    fn value_may_contain_equals_and_be_empty() {
        let got = parse(b"A=b=c\0B=\0").expect("valid");
        assert_eq!(got[0], ("A".into(), "b=c".into()));
        assert_eq!(got[1], ("B".into(), "".into()));
    }

    #[test]
    fn pair_without_equals_is_an_error() {
        assert_eq!(parse(b"Junk\0"), Err(TextError::NoEquals));
        assert_eq!(parse(b"=x\0"), Err(TextError::EmptyKey));
    }

    #[test]
    fn numbers_in_decimal_and_hex() {
        assert_eq!(parse_number("8192"), Some(8192));
        assert_eq!(parse_number("0x2000"), Some(8192));
        assert_eq!(parse_number("12a"), None);
        assert_eq!(parse_number(""), None);
        assert_eq!(parse_number("99999999999999999999999"), None);
    }

    #[test]
    fn digest_list_picks_first_supported() {
        let (a, p) = neg("HeaderDigest", "CRC32C,None");
        assert_eq!(a, val("CRC32C"));
        assert!(p.header_digest);
        let (a, p) = neg("DataDigest", "None,CRC32C");
        assert_eq!(a, val("None"));
        assert!(!p.data_digest);
        assert_eq!(neg("HeaderDigest", "MD5").0, val("Reject"));
    }

    #[test]
    fn max_recv_data_segment_length_is_declarative() {
        let (a, p) = neg("MaxRecvDataSegmentLength", "4096");
        assert_eq!(a, Answer::Silent);
        assert_eq!(p.max_send_dsl, 4096);
        assert_eq!(neg("MaxRecvDataSegmentLength", "511").0, val("Reject"));
        assert_eq!(neg("MaxRecvDataSegmentLength", "16777216").0, val("Reject"));
    }

    #[test]
    fn burst_lengths_take_the_minimum() {
        assert_eq!(neg("MaxBurstLength", "262144").0, val("262144"));
        assert_eq!(neg("MaxBurstLength", "16776192").0, val("1048576"));
        assert_eq!(neg("FirstBurstLength", "8192").0, val("8192"));
        assert_eq!(neg("FirstBurstLength", "100").0, val("Reject"));
    }

    #[test]
    fn the_first_burst_answered_never_exceeds_the_max_burst_negotiated() {
        // RFC 7143 13.14: FirstBurstLength MUST NOT exceed MaxBurstLength.
        let mut p = Params::default();
        assert_eq!(
            negotiate(&mut p, "MaxBurstLength", "131072", false),
            val("131072")
        );
        assert_eq!(
            negotiate(&mut p, "FirstBurstLength", "262144", false),
            val("131072")
        );
        assert_eq!(p.first_burst, 131_072);
        // Nor the one offered when the initiator left FirstBurstLength out.
        let offered = target_offers(&p);
        assert_eq!(offered[3], ("FirstBurstLength", "131072".to_string()));
        // With MaxBurstLength at its default (262144), the offer is 262144.
        assert_eq!(
            target_offers(&Params::default())[3],
            ("FirstBurstLength", "262144".to_string())
        );
    }

    #[test]
    fn first_burst_is_capped_by_max_burst() {
        let mut p = Params::default();
        negotiate(&mut p, "MaxBurstLength", "4096", false);
        negotiate(&mut p, "FirstBurstLength", "65536", false);
        p.finish();
        assert_eq!(p.first_burst, 4096);
    }

    #[test]
    fn initial_r2t_is_or_and_immediate_data_is_and() {
        assert_eq!(neg("InitialR2T", "No").0, val("No"));
        assert_eq!(neg("InitialR2T", "Yes").0, val("Yes"));
        assert_eq!(neg("ImmediateData", "Yes").0, val("Yes"));
        let (a, p) = neg("ImmediateData", "No");
        assert_eq!(a, val("No"));
        assert!(!p.immediate_data);
        assert_eq!(neg("ImmediateData", "yes").0, val("Reject"));
    }

    #[test]
    fn ordering_keys_stay_yes() {
        assert_eq!(neg("DataPDUInOrder", "No").0, val("Yes"));
        assert_eq!(neg("DataSequenceInOrder", "No").0, val("Yes"));
    }

    #[test]
    fn error_recovery_and_connections_are_limited() {
        assert_eq!(neg("ErrorRecoveryLevel", "2").0, val("0"));
        assert_eq!(neg("ErrorRecoveryLevel", "3").0, val("Reject"));
        assert_eq!(neg("MaxConnections", "8").0, val("1"));
        assert_eq!(neg("MaxConnections", "0").0, val("Reject"));
        assert_eq!(neg("MaxOutstandingR2T", "16").0, val("1"));
    }

    #[test]
    fn time2wait_is_max_and_time2retain_is_min() {
        assert_eq!(neg("DefaultTime2Wait", "0").0, val("2"));
        assert_eq!(neg("DefaultTime2Wait", "10").0, val("10"));
        assert_eq!(neg("DefaultTime2Retain", "20").0, val("0"));
        assert_eq!(neg("DefaultTime2Retain", "3601").0, val("Reject"));
    }

    #[test]
    fn session_keys_are_irrelevant_in_discovery() {
        let mut p = Params::default();
        assert_eq!(
            negotiate(&mut p, "MaxBurstLength", "262144", true),
            val("Irrelevant")
        );
        assert_eq!(negotiate(&mut p, "HeaderDigest", "None", true), val("None"));
    }

    #[test]
    fn unknown_key_is_not_operational() {
        assert_eq!(neg("X-com.example.Foo", "1").0, Answer::NotOperational);
    }

    /// RFC 7143 13.26: "When an IFMarkInt or OFMarkInt key is received, a compliant iSCSI
    /// implementation MUST respond with the constant 'Reject' value"; IFMarker and OFMarker
    /// SHOULD get Reject and MAY get No, never NotUnderstood.
    #[test]
    fn obsolete_marker_keys() {
        assert_eq!(neg("IFMarkInt", "2048").0, val("Reject"));
        assert_eq!(neg("OFMarkInt", "1~65535").0, val("Reject"));
        assert_eq!(neg("IFMarker", "No").0, val("No"));
        assert_eq!(neg("OFMarker", "Yes").0, val("No"));
    }

    #[test]
    fn encode_round_trips() {
        let pairs = vec![("A".to_string(), "1".to_string())];
        assert_eq!(encode(&pairs), b"A=1\0");
        assert_eq!(parse(&encode(&pairs)).expect("valid"), pairs);
    }

    #[test]
    fn answers_to_target_offers_set_the_result() {
        let mut p = Params::default();
        apply_answer(&mut p, "InitialR2T", "No", "No").expect("valid");
        apply_answer(&mut p, "ImmediateData", "No", "Yes").expect("valid");
        apply_answer(&mut p, "MaxBurstLength", "65536", "1048576").expect("valid");
        apply_answer(&mut p, "FirstBurstLength", "Reject", "262144").expect("valid");
        assert!(!p.initial_r2t);
        assert!(!p.immediate_data);
        assert_eq!(p.max_burst, 65536);
        assert_eq!(p.first_burst, 65_536, "default kept");
    }

    #[test]
    fn answers_a_result_function_cannot_give_are_errors() {
        let mut p = Params::default();
        // Above what was offered: the minimum cannot exceed our offer.
        assert!(apply_answer(&mut p, "MaxBurstLength", "1048577", "1048576").is_err());
        assert!(apply_answer(&mut p, "FirstBurstLength", "65537", "65536").is_err());
        apply_answer(&mut p, "FirstBurstLength", "65536", "65536").expect("at the offer");
        // Below the least legal value (512, RFC 7143 13.13, 13.14).
        assert!(apply_answer(&mut p, "FirstBurstLength", "511", "262144").is_err());
        assert!(apply_answer(&mut p, "InitialR2T", "maybe", "No").is_err());
        assert!(apply_answer(&mut p, "HeaderDigest", "None", "None").is_err());
    }
}
