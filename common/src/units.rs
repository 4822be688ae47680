//! Units in flags: byte sizes (`4GiB`, `512MiB`, `5GB`) and durations (`30s`, `500ms`), parsed
//! the same way by every Caravan binary (as clap value parsers).

use std::time::Duration;

/// Splits "1.5 GiB" into its number and its unit ("GiB"; empty when there is none).
fn number_and_unit<'a>(text: &'a str, what: &str) -> Result<(f64, &'a str), String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number = number
        .parse()
        .map_err(|_| format!("{text:?} is not {what}"))?;
    Ok((number, unit.trim()))
}

/// Parses a byte size: a number with an optional unit (B, KiB, MiB, GiB, TiB, or KB/MB/GB/TB
/// as powers of 1000).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let (number, unit) = number_and_unit(text, "a size like 4GiB or 512MiB")?;
    let scale: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "t" | "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        other => return Err(format!("unknown size unit {other:?} in {text:?}")),
    };
    let bytes = number * scale;
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("{text:?} is not a positive size"));
    }
    Ok(bytes as u64)
}

/// Parses a duration: a number with a unit (ms, s, m, h), or a bare number of seconds. Zero is
/// refused: every timeout here must let something happen.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = number_and_unit(text, "a duration like 30s or 500ms")?;
    let seconds = match unit {
        "" | "s" => number,
        "ms" => number / 1e3,
        "m" | "min" => number * 60.0,
        "h" => number * 3600.0,
        other => return Err(format!("unknown duration unit {other:?} in {text:?}")),
    };
    if !(1e-3..1e9).contains(&seconds) {
        return Err(format!(
            "{text:?} is not a positive duration of 1ms or more"
        ));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// [`parse_duration`] for an option where zero means "never wait" (`0`, `0s`, `0ms`).
pub fn parse_duration_or_zero(text: &str) -> Result<Duration, String> {
    match number_and_unit(text, "a duration like 30s or 500ms")? {
        (0.0, "" | "s" | "ms" | "m" | "min" | "h") => Ok(Duration::ZERO),
        _ => parse_duration(text),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{parse_bytes, parse_duration, parse_duration_or_zero};

    #[test]
    fn zero_durations_parse_where_zero_means_never_wait() {
        assert_eq!(parse_duration_or_zero("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration_or_zero("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration_or_zero("0ms"), Ok(Duration::ZERO));
        assert_eq!(parse_duration_or_zero("90s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration_or_zero("0 weeks").is_err());
        assert!(parse_duration_or_zero("-1s").is_err());
    }

    #[test]
    fn durations_parse_with_units_and_bare_seconds() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3 weeks").is_err());
    }

    #[test]
    fn byte_sizes_parse_with_units() {
        assert_eq!(parse_bytes("4GiB"), Ok(4 << 30));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("1.5 GB"), Ok(1_500_000_000));
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("4 parsecs").is_err());
        assert!(parse_bytes("0").is_err());
    }
}
