//! Reading a component's settings the way Knative's queue-proxy does — environment variables —
//! with command-line flags for the same settings on top. Every error names the setting. One
//! table per role or binary (flag, variable, help) drives both the parsing and `--help`.

use std::collections::HashMap;
use std::time::Duration;

/// A setting that could not be used, named as the user wrote it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting}={value:?}: {reason}")]
pub struct ConfigError {
    pub setting: &'static str,
    pub value: String,
    pub reason: String,
}

/// How every binary's `main` reads its settings: `-h` or `--help` among `args` prints `usage`
/// and ends with exit 0; otherwise `parse` reads them (flags over the environment, see
/// [`process_env`]), and an error is printed with the usage and ends with exit 2.
pub fn read<C, E: std::fmt::Display>(
    args: &[String],
    usage: impl Fn() -> String,
    parse: impl FnOnce(&[String]) -> Result<C, E>,
) -> Result<C, std::process::ExitCode> {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        print!("{}", usage());
        return Err(std::process::ExitCode::SUCCESS);
    }
    parse(args).map_err(|error| {
        eprintln!("error: {error}\n\n{}", usage());
        std::process::ExitCode::from(2)
    })
}

/// The process's environment, as the settings readers take it.
pub fn process_env(key: &str) -> Option<String> {
    std::env::var(key).ok()
}

/// A role's settings: (flag, environment variable, help).
pub type Table = &'static [(&'static str, &'static str, &'static str)];

/// A lookup of settings from `--flag value` (or `--flag=value`) pairs over `env`; an unknown
/// flag or a flag without a value is an error.
pub fn overlay(
    args: &[String],
    table: Table,
    env: impl Fn(&str) -> Option<String>,
) -> Result<impl Fn(&str) -> Option<String>, ConfigError> {
    let mut overrides = HashMap::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f, Some(v.to_string())),
            None => (arg.as_str(), None),
        };
        let Some((_, setting, _)) = table.iter().find(|(f, _, _)| *f == flag) else {
            return Err(ConfigError {
                setting: "arguments",
                value: flag.to_string(),
                reason: "unknown flag (see --help)".into(),
            });
        };
        let value = inline
            .or_else(|| it.next().cloned())
            .ok_or_else(|| ConfigError {
                setting,
                value: String::new(),
                reason: format!("{flag} needs a value"),
            })?;
        overrides.insert(*setting, value);
    }
    Ok(move |key: &str| overrides.get(key).cloned().or_else(|| env(key)))
}

/// A number setting, `default` when unset, checked by `check`.
pub fn number<T: std::str::FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    setting: &'static str,
    default: T,
    check: impl Fn(&T) -> Result<(), String>,
) -> Result<T, ConfigError> {
    let Some(value) = get(setting) else {
        return Ok(default);
    };
    let error = |reason: String| ConfigError {
        setting,
        value: value.clone(),
        reason,
    };
    let parsed = value
        .trim()
        .parse::<T>()
        .map_err(|_| error("not a valid number".into()))?;
    check(&parsed).map_err(error)?;
    Ok(parsed)
}

/// The check of a port setting.
pub fn port(p: &u16) -> Result<(), String> {
    if *p == 0 {
        Err("must be a port between 1 and 65535".to_string())
    } else {
        Ok(())
    }
}

/// Checks a `host:port` setting.
pub fn host_port(setting: &'static str, value: &str) -> Result<(), ConfigError> {
    let valid = value
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if valid {
        Ok(())
    } else {
        Err(ConfigError {
            setting,
            value: value.to_string(),
            reason: "must be host:port".into(),
        })
    }
}

/// A duration setting (`30s`, `1m`, `500ms`), `default` when unset.
pub fn duration(
    get: &impl Fn(&str) -> Option<String>,
    setting: &'static str,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match get(setting) {
        None => Ok(default),
        Some(value) => crate::duration::parse_go(&value).map_err(|reason| ConfigError {
            setting,
            value,
            reason,
        }),
    }
}

/// Help text for a role's settings.
pub fn help(table: Table) -> String {
    let mut text = format!("{:<25} {:<25} meaning\n", "flag", "environment");
    for (flag, env, help) in table {
        text.push_str(&format!("{flag:<25} {env:<25} {help}\n"));
    }
    text
}

/// A `true`/`false` setting, `default` when unset.
pub fn flag(
    get: &impl Fn(&str) -> Option<String>,
    setting: &'static str,
    default: bool,
) -> Result<bool, ConfigError> {
    match get(setting).as_deref() {
        None => Ok(default),
        Some("true" | "1" | "on") => Ok(true),
        Some("false" | "0" | "off") => Ok(false),
        Some(other) => Err(ConfigError {
            setting,
            value: other.to_string(),
            reason: "must be true or false".into(),
        }),
    }
}
