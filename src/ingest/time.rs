//! RFC 3339 timestamps, parsed by hand: this sits on the per-event path and a
//! general date library costs more than the whole feature update.

/// A point in event time: seconds since the Unix epoch (UTC) plus the offset
/// it was written with, so calendar features use the local wall clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EventTime {
    pub utc: i64,
    pub offset: i32,
}

impl EventTime {
    /// Seconds since the epoch on the local wall clock.
    pub fn local(self) -> i64 {
        self.utc + self.offset as i64
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp as i64 + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The calendar date of a day number, inverse of [`days_from_civil`].
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn digits(b: &[u8]) -> Option<u32> {
    let mut v = 0u32;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (c - b'0') as u32;
    }
    Some(v)
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fff][Z|±HH:MM]`. A space may stand for the
/// `T`, and a missing offset means UTC, so naive exports still load.
/// Fractions of a second are dropped: windows have one-second resolution.
pub fn parse_timestamp(s: &[u8]) -> Option<EventTime> {
    if s.len() < 19 || s[4] != b'-' || s[7] != b'-' || s[13] != b':' || s[16] != b':' {
        return None;
    }
    if !matches!(s[10], b'T' | b't' | b' ') {
        return None;
    }
    let year = digits(&s[0..4])? as i64;
    let month = digits(&s[5..7])?;
    let day = digits(&s[8..10])?;
    let hour = digits(&s[11..13])?;
    let minute = digits(&s[14..16])?;
    let second = digits(&s[17..19])?;
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(b'.') = rest.first() {
        let n = rest[1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return None;
        }
        rest = &rest[1 + n..];
    }
    let offset = match rest {
        [] | [b'Z'] | [b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let h = digits(&[*h1, *h2])? as i32;
            let m = digits(&[*m1, *m2])? as i32;
            if h > 23 || m > 59 {
                return None;
            }
            let off = h * 3600 + m * 60;
            if *sign == b'-' { -off } else { off }
        }
        _ => return None,
    };
    let local = days_from_civil(year, month, day) * 86_400
        + hour as i64 * 3600
        + minute as i64 * 60
        + second.min(59) as i64;
    Some(EventTime {
        utc: local - offset as i64,
        offset,
    })
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Parses a `YYYY-MM-DD` date as UTC midnight, in seconds since the epoch.
pub fn parse_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let y = digits(&b[0..4])? as i64;
    let m = digits(&b[5..7])?;
    let d = digits(&b[8..10])?;
    if !(1..=12).contains(&m) || d == 0 || d > days_in_month(y, m) {
        return None;
    }
    Some(days_from_civil(y, m, d) * 86_400)
}

/// Writes an RFC 3339 UTC timestamp (`2018-04-01T07:05:09Z`) into `out`.
pub fn format_utc(t: i64, out: &mut String) {
    use std::fmt::Write;
    let (y, mo, d) = civil_from_days(t.div_euclid(86_400));
    let s = t.rem_euclid(86_400);
    let _ = write!(
        out,
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    );
}

/// `YYYY-MM-DD` of a UTC instant.
pub fn format_date(t: i64) -> String {
    let (y, m, d) = civil_from_days(t.div_euclid(86_400));
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_utc_and_offsets() {
        let t = parse_timestamp(b"2018-04-01T00:07:56Z").unwrap();
        assert_eq!(t.utc, 1_522_541_276);
        assert_eq!(t.offset, 0);
        let t2 = parse_timestamp(b"2018-04-01T02:07:56+02:00").unwrap();
        assert_eq!(t2.utc, t.utc);
        assert_eq!(t2.offset, 7200);
        assert_eq!(t2.local() - t2.utc, 7200);
        let t3 = parse_timestamp(b"2018-04-01 00:07:56.123").unwrap();
        assert_eq!(t3.utc, t.utc);
        assert_eq!(
            parse_timestamp(b"2018-03-31T19:07:56-05:00").unwrap().utc,
            t.utc
        );
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            &b"2018-13-01T00:00:00Z"[..],
            b"2018-02-30T00:00:00Z",
            b"2018-04-01T24:00:00Z",
            b"2018-04-01",
            b"2018-04-01T00:00:00+2:00",
            b"2018-04-01T00:00:00.Z",
            b"yesterday at noon!!",
        ] {
            assert!(
                parse_timestamp(bad).is_none(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn civil_round_trip() {
        for z in [-1000, 0, 17_622, 20_000, 40_000] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
        let mut s = String::new();
        format_utc(1_522_541_276, &mut s);
        assert_eq!(s, "2018-04-01T00:07:56Z");
        assert_eq!(parse_date("2018-08-01"), Some(1_533_081_600));
        assert_eq!(format_date(1_533_081_600), "2018-08-01");
    }
}
