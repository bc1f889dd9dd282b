//! The data path's own settings (trusted proxies, the fast path, connection limits) over the
//! shared reading of settings in [`mecha_common::settings`], re-exported here.

pub use mecha_common::settings::*;

/// `SIDECAR_TRUSTED_PROXIES`: `none`, `private`, or `address[/prefix],...`.
pub fn trusted_proxies(
    get: &impl Fn(&str) -> Option<String>,
    default: crate::rules::TrustedProxies,
) -> Result<crate::rules::TrustedProxies, ConfigError> {
    match get("SIDECAR_TRUSTED_PROXIES") {
        None => Ok(default),
        Some(value) => crate::rules::TrustedProxies::parse(&value).map_err(|reason| ConfigError {
            setting: "SIDECAR_TRUSTED_PROXIES",
            value,
            reason,
        }),
    }
}

/// The fast path's setting, the same in every role.
pub const FAST_PATH_HELP: (&str, &str, &str) = (
    "--fast-path",
    "SIDECAR_FAST_PATH",
    "relay plain HTTP/1.1 on the fast path (true) or all through hyper (false)",
);

/// The connection limits, from `SIDECAR_HEADER_READ_TIMEOUT`, `SIDECAR_IDLE_TIMEOUT`,
/// `SIDECAR_BODY_READ_TIMEOUT` and `SIDECAR_MAX_CONNECTIONS` (environment only; defaults in
/// [`crate::limits::Limits`]).
pub fn limits(get: &impl Fn(&str) -> Option<String>) -> Result<crate::limits::Limits, ConfigError> {
    let defaults = crate::limits::Limits::default();
    let positive = |setting: &'static str, value: std::time::Duration| {
        if value.is_zero() {
            Err(ConfigError {
                setting,
                value: "0".into(),
                reason: "must be more than zero".into(),
            })
        } else {
            Ok(value)
        }
    };
    Ok(crate::limits::Limits {
        header_read_timeout: positive(
            "SIDECAR_HEADER_READ_TIMEOUT",
            duration(
                get,
                "SIDECAR_HEADER_READ_TIMEOUT",
                defaults.header_read_timeout,
            )?,
        )?,
        idle_timeout: positive(
            "SIDECAR_IDLE_TIMEOUT",
            duration(get, "SIDECAR_IDLE_TIMEOUT", defaults.idle_timeout)?,
        )?,
        body_read_timeout: positive(
            "SIDECAR_BODY_READ_TIMEOUT",
            duration(get, "SIDECAR_BODY_READ_TIMEOUT", defaults.body_read_timeout)?,
        )?,
        max_connections: number(
            get,
            "SIDECAR_MAX_CONNECTIONS",
            defaults.max_connections,
            |n| {
                if *n >= 1 {
                    Ok(())
                } else {
                    Err("must be at least 1".into())
                }
            },
        )?,
    })
}
