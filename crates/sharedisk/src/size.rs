//! Sizes as people write them: `1G`, `512MiB`, `4096`.

/// Parse a size in bytes: a decimal number with an optional binary suffix `K`, `M`, `G`, `T`,
/// `P` (each may be followed by `iB` or `B`; case-insensitive). Zero is refused.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits);
    if num.is_empty() {
        return Err(format!(
            "Bad size {s:?}: expected a number like 1G, 512M or 1048576"
        ));
    }
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        _ => {
            return Err(format!(
                "Bad size {s:?}: unknown suffix {suffix:?} (use K, M, G, T or P)"
            ))
        }
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("Bad size {s:?}: number too large"))?;
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("Bad size {s:?}: too large"))?;
    if bytes == 0 {
        return Err(format!("Bad size {s:?}: must be more than zero"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn plain_number_is_bytes() {
        assert_eq!(parse_size("1048576"), Ok(1_048_576));
    }

    #[test]
    fn binary_suffixes_multiply_by_powers_of_1024() {
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("1P"), Ok(1 << 50));
    }

    #[test]
    fn suffix_is_case_insensitive_and_may_end_in_ib() {
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1gb"), Ok(1 << 30));
    }

    #[test]
    fn zero_is_refused() {
        assert!(parse_size("0").is_err());
        assert!(parse_size("0G").is_err());
    }

    #[test]
    fn garbage_is_refused() {
        for bad in ["", "G", "1X", "-1G", "1.5G", "1 G G", "0x10"] {
            assert!(parse_size(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn overflow_is_refused() {
        assert!(parse_size("16777216T").is_err());
        assert!(parse_size("99999999999999999999").is_err());
    }
}
