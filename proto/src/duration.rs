//! Human durations as used on every command line and in config: `90s`, `5m`,
//! `24h`, `30d` (and `500ms` for tests and timeouts).

use std::fmt;
use std::time::Duration;

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationError {
    input: String,
}

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid duration {:?}: expected a whole number and a unit (ms, s, m, h, d), like 90s, 5m, 24h or 30d",
            self.input
        )
    }
}

impl std::error::Error for DurationError {}

/// Parses `<digits><unit>` with unit one of `ms`, `s`, `m`, `h`, `d`.
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let err = || DurationError {
        input: input.to_owned(),
    };
    let split = input.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (digits, unit) = input.split_at(split);
    if digits.is_empty() || digits.len() > 12 {
        return Err(err());
    }
    let n: u64 = digits.parse().map_err(|_| err())?;
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(err()),
    };
    let millis = n.checked_mul(millis_per_unit).ok_or_else(err)?;
    Ok(Duration::from_millis(millis))
}

/// Formats a duration in the largest unit that divides it exactly.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms != 0 && ms.is_multiple_of(size) {
            return format!("{}{}", ms / size, unit);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(
            parse_duration("30d").unwrap(),
            Duration::from_secs(2_592_000)
        );
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
    }

    #[test]
    fn refuses_malformed() {
        for bad in [
            "",
            "s",
            "10",
            "10x",
            "-5s",
            "1.5h",
            " 5s",
            "5s ",
            "5 s",
            "99999999999999d",
            "5S",
        ] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.to_string().contains("invalid duration"), "{bad}");
        }
    }

    #[test]
    fn formats_round_trip() {
        for s in ["90s", "5m", "23h", "30d", "250ms", "36h"] {
            assert_eq!(format_duration(parse_duration(s).unwrap()), s);
        }
        assert_eq!(format_duration(Duration::from_secs(120)), "2m");
        assert_eq!(format_duration(parse_duration("24h").unwrap()), "1d");
    }
}
