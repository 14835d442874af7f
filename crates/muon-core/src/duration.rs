//! The one duration grammar, for resources and flags alike: the Gateway API's (GEP-2257) —
//! one to four `<1-5 digits><unit>` with units `h`, `m`, `s`, `ms`, e.g. `10s`, `500ms`,
//! `1m30s`. Flags also take a bare number, as seconds ([`parse_flag`]).

use std::time::Duration;

/// A resource's duration (`timeouts.request` and the like): GEP-2257 exactly.
pub fn parse(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration: use e.g. 500ms, 10s, 1m30s or 1h");
    if s.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        parts += 1;
        if digits == 0 || digits > 5 || parts > 4 {
            return Err(bad());
        }
        let n: u32 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return Err(bad());
        };
        rest = &rest[len..];
        total += unit * n;
    }
    Ok(total)
}

/// A flag's duration: the grammar of [`parse`], or a bare number of seconds (`30`).
pub fn parse_flag(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t
            .parse::<u32>()
            .map(|n| Duration::from_secs(n.into()))
            .map_err(|_| format!("{s:?} is too large a number of seconds"));
    }
    parse(t)
}

/// A flag's time limit: as [`parse_flag`], above zero.
pub fn parse_flag_positive(s: &str) -> Result<Duration, String> {
    match parse_flag(s)? {
        d if d.is_zero() => Err(format!("{s:?} must be more than zero")),
        d => Ok(d),
    }
}

/// Formats a duration the way [`parse`] reads it, in the largest exact unit.
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0 => "0s".into(),
        _ if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        _ if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        _ if ms % 1000 == 0 => format!("{}s", ms / 1000),
        _ => format!("{ms}ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateway_api_grammar() {
        assert_eq!(parse("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("1h2m3s"), Ok(Duration::from_secs(3723)));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
        for bad in [
            "",
            "10",
            "s",
            "1.5s",
            "-1s",
            "10 s",
            "1d",
            "123456s",
            "1s1s1s1s1s",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn flags_also_take_seconds_and_round_trip() {
        for (text, d) in [
            ("500ms", Duration::from_millis(500)),
            ("5s", Duration::from_secs(5)),
            ("7", Duration::from_secs(7)),
            (" 2m ", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("1m30s", Duration::from_secs(90)),
        ] {
            assert_eq!(parse_flag(text), Ok(d), "{text}");
            assert_eq!(parse_flag(&format(d)), Ok(d));
        }
        for bad in ["", "s", "1d", "-1s", "1.5s", "99999999999999999999"] {
            assert!(parse_flag(bad).is_err(), "{bad}");
        }
        assert!(parse_flag_positive("0s").is_err());
        assert_eq!(parse_flag_positive("1"), Ok(Duration::from_secs(1)));
    }
}
