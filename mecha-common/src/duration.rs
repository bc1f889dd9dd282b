//! Durations written the way Go's `time.ParseDuration` reads them, the syntax Knative uses
//! in annotations and ConfigMaps and Mecha uses in its own settings.

use std::time::Duration;

/// Parses a duration as Go's `time.ParseDuration` writes it (`60s`, `1m30s`, `1.5h`, `500ms`),
/// the syntax Knative uses in annotations and `config-autoscaler`. A bare `0` is zero.
pub fn parse_go(value: &str) -> Result<Duration, String> {
    let bad = || format!("{value:?} is not a duration: write it like 30s, 1m30s, 500ms or 1h");
    if value == "0" {
        return Ok(Duration::ZERO);
    }
    if value.is_empty() || value.starts_with('-') {
        return Err(bad());
    }
    let mut total = 0f64;
    let mut rest = value.strip_prefix('+').unwrap_or(value);
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let number: f64 = rest[..number_len].parse().map_err(|_| bad())?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += number * seconds;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_go("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_go("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_go("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_go("0"), Ok(Duration::ZERO));
        assert!(parse_go("60").is_err());
        assert!(parse_go("-1s").is_err());
        assert!(parse_go("1d").is_err());
    }
}
