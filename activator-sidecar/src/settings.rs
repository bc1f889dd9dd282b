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

/// How a component's public listener serves: `SIDECAR_FAST_PATH` (true), `DRAIN_TIMEOUT`
/// (30s: after SIGTERM, for requests in flight) and the connection [`limits`].
pub fn serving(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<crate::server::ServeOptions, ConfigError> {
    Ok(crate::server::ServeOptions {
        fast_path: flag(get, "SIDECAR_FAST_PATH", true)?,
        drain_timeout: duration(get, "DRAIN_TIMEOUT", std::time::Duration::from_secs(30))?,
        limits: limits(get)?,
    })
}

/// A component's public and admin ports, `public_var` (`public_default`) and `admin_var`
/// (8022), which must differ.
pub fn listener_ports(
    get: &impl Fn(&str) -> Option<String>,
    (public_var, public_default): (&'static str, u16),
    admin_var: &'static str,
) -> Result<(u16, u16), ConfigError> {
    let public = number(get, public_var, public_default, port)?;
    let admin = number(get, admin_var, 8022u16, port)?;
    if admin == public {
        return Err(ConfigError {
            setting: admin_var,
            value: admin.to_string(),
            reason: format!("must differ from {public_var}"),
        });
    }
    Ok((public, admin))
}

/// `AUTOSCALER_ADDR`, the control plane a standalone component reads its resources from:
/// required (`what` says which resources), a host:port.
pub fn autoscaler_addr(
    get: &impl Fn(&str) -> Option<String>,
    what: &str,
) -> Result<String, ConfigError> {
    let addr = get("AUTOSCALER_ADDR").ok_or_else(|| ConfigError {
        setting: "AUTOSCALER_ADDR",
        value: String::new(),
        reason: format!("required: {what} come from the control plane"),
    })?;
    host_port("AUTOSCALER_ADDR", &addr)?;
    Ok(addr)
}
