//! RFC 3339 UTC timestamps (`2026-11-23T10:00:00Z`) from and to Unix seconds,
//! without a date library.

/// Formats Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339(unix_secs: u64) -> String {
    let mut out = String::with_capacity(20);
    write_rfc3339(&mut out, unix_secs);
    out
}

/// Writes Unix seconds as `YYYY-MM-DDTHH:MM:SSZ` into `out` (cleared first),
/// reusing its allocation.
pub fn write_rfc3339(out: &mut String, unix_secs: u64) {
    use std::fmt::Write as _;
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    out.clear();
    // Writing into a String cannot fail.
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    );
}

/// Parses `YYYY-MM-DDTHH:MM:SSZ` (optionally with fractional seconds) to Unix seconds.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u64> { s.get(r)?.parse().ok() };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let tail = &s[19..];
    let tail = tail
        .strip_prefix('.')
        .map_or(tail, |t| t.trim_start_matches(|c: char| c.is_ascii_digit()));
    if tail != "Z"
        || !(1..=12).contains(&mo)
        || d == 0
        || d > u64::from(days_in_month(y, mo as u32))
        || h > 23
        || mi > 59
        || sec > 60
    {
        return None;
    }
    let days = days_from_civil(y as i64, mo as u32, d as u32);
    u64::try_from(days * 86_400 + (h * 3600 + mi * 60 + sec) as i64)
        .ok()
        // A leap second at 9999-12-31T23:59:60Z would be in the year 10000,
        // which `rfc3339` cannot write back in four digits.
        .filter(|&t| t < YEAR_10000)
}

/// Days in a month of the proleptic Gregorian calendar (`month` 1 to 12).
fn days_in_month(year: u64, month: u32) -> u32 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => {
            29
        }
        2 => 28,
        _ => 31,
    }
}

/// 10000-01-01T00:00:00Z: the first instant four year digits cannot write.
const YEAR_10000: u64 = 253_402_300_800;

/// Days since 1970-01-01 to (year, month, day); Howard Hinnant's algorithm.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// (year, month, day) to days since 1970-01-01.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_428_000), "2026-11-23T10:00:00Z");
    }

    #[test]
    fn parses_what_it_formats() {
        for t in [0, 951_782_400, 1_795_428_000, 4_102_444_799] {
            assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
        }
        assert_eq!(
            parse_rfc3339("2026-11-23T10:00:00.123Z"),
            Some(1_795_428_000)
        );
        assert_eq!(parse_rfc3339("2026-11-23 10:00:00Z"), None);
        assert_eq!(parse_rfc3339("2026-13-23T10:00:00Z"), None);
        assert_eq!(parse_rfc3339("2026-11-23T10:00:00+01:00"), None);
        // Days a month does not have.
        for impossible in [
            "2026-02-31T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "1900-02-29T00:00:00Z",
            "2026-04-31T00:00:00Z",
            "2026-11-00T00:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(impossible), None, "{impossible}");
        }
        assert_eq!(parse_rfc3339("2000-02-29T00:00:00Z"), Some(951_782_400));
        assert!(parse_rfc3339("2024-02-29T00:00:00Z").is_some());
        assert!(parse_rfc3339("2026-12-31T00:00:00Z").is_some());
        // Fuzzing found this one: it would format as 10000-01-01T00:00:00Z.
        assert_eq!(parse_rfc3339("9999-12-31T23:59:60Z"), None);
        assert_eq!(parse_rfc3339("9999-12-31T23:59:59Z"), Some(YEAR_10000 - 1));
    }
}
