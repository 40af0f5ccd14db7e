//! Sizes as people write them: `4096`, `512K`, `4M`, `1.5G`, `2T` (powers of 1024; a trailing
//! `B` or `iB` is allowed: `4MiB`, `4MB` are 4 MiB).

/// Parse a size with an optional unit.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                _ => return Err(format!("{s:?}: unknown unit {c:?} (use K, M, G, T or P)")),
            };
            (&t[..t.len() - 1], shift)
        }
        _ => (t, 0),
    };
    let bad = || format!("{s:?} is not a size (e.g. 4096, 512K, 4M, 1.5G)");
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_shl(shift)
            .filter(|v| v >> shift == n)
            .ok_or_else(bad);
    }
    let f: f64 = num.parse().map_err(|_| bad())?;
    let v = f * (1u64 << shift) as f64;
    if !f.is_finite() || f < 0.0 || v >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok(v.round() as u64)
}

/// [`parse_size`] for values that must fit in 32 bits (chunk sizes).
pub fn parse_size_u32(s: &str) -> Result<u32, String> {
    let v = parse_size(s)?;
    u32::try_from(v).map_err(|_| format!("{s:?} is too large (at most 4G - 1)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_with_and_without_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("4M"), Ok(4 << 20));
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(
            parse_size("4mb"),
            Err("\"4mb\": unknown unit 'b' (use K, M, G, T or P)".into())
        );
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size(" 2T "), Ok(2 << 40));
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("4X").is_err());
        assert!(parse_size("99999999999P").is_err());
        assert_eq!(parse_size_u32("1M"), Ok(1 << 20));
        assert!(parse_size_u32("4G").is_err());
    }
}

/// A size in a config file: a number of bytes (`readahead = 8388608`) or a string with a unit
/// (`readahead = "8M"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> serde::Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(Size(n)),
            Raw::Text(t) => parse_size(&t).map(Size).map_err(serde::de::Error::custom),
        }
    }
}
