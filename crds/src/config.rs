//! The `config-autoscaler` ConfigMap (namespace `knative-serving`): the global defaults of the
//! KPA autoscaler under Knative's own key names. Per-revision annotations override them.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::autoscaling::{float_in as number, parse_go_duration};
use crate::error::FieldError;
use crate::meta::ObjectMeta;

pub const NAME: &str = "config-autoscaler";
pub const NAMESPACE: &str = "knative-serving";

/// A `v1` `ConfigMap` as written in YAML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigMap {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub data: BTreeMap<String, String>,
}

/// Knative's autoscaler defaults, overridable by `config-autoscaler`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalerConfig {
    pub enable_scale_to_zero: bool,
    pub scale_to_zero_grace_period: Duration,
    pub scale_to_zero_pod_retention_period: Duration,
    pub allow_zero_initial_scale: bool,
    pub initial_scale: u32,
    pub min_scale: u32,
    /// 0 means unlimited.
    pub max_scale: u32,
    pub stable_window: Duration,
    pub panic_window_percentage: f64,
    pub panic_threshold_percentage: f64,
    pub container_concurrency_target_default: f64,
    /// Percent of the concurrency target a replica should run at (70).
    pub container_concurrency_target_percentage: f64,
    pub requests_per_second_target_default: f64,
    pub max_scale_up_rate: f64,
    pub max_scale_down_rate: f64,
    pub scale_down_delay: Duration,
}

// === impl AutoscalerConfig ===

impl Default for AutoscalerConfig {
    fn default() -> Self {
        Self {
            enable_scale_to_zero: true,
            scale_to_zero_grace_period: Duration::from_secs(30),
            scale_to_zero_pod_retention_period: Duration::ZERO,
            allow_zero_initial_scale: false,
            initial_scale: 1,
            min_scale: 0,
            max_scale: 0,
            stable_window: Duration::from_secs(60),
            panic_window_percentage: 10.0,
            panic_threshold_percentage: 200.0,
            container_concurrency_target_default: 100.0,
            container_concurrency_target_percentage: 70.0,
            requests_per_second_target_default: 200.0,
            max_scale_up_rate: 1000.0,
            max_scale_down_rate: 2.0,
            scale_down_delay: Duration::ZERO,
        }
    }
}

impl AutoscalerConfig {
    /// Reads the ConfigMap's `data`, reporting each bad or unknown key under `data[...]`.
    pub fn from_data(data: &BTreeMap<String, String>) -> Result<Self, Vec<FieldError>> {
        let mut config = Self::default();
        let mut errors = Vec::new();
        for (key, value) in data {
            let at = format!("data[\"{key}\"]");
            let value = value.trim();
            let result = match key.as_str() {
                // Knative's ConfigMaps carry their documentation under `_example`.
                "_example" => Ok(()),
                "enable-scale-to-zero" => boolean(value).map(|v| config.enable_scale_to_zero = v),
                "allow-zero-initial-scale" => {
                    boolean(value).map(|v| config.allow_zero_initial_scale = v)
                }
                "scale-to-zero-grace-period" => duration(value)
                    .and_then(|d| positive(d, value))
                    .map(|d| config.scale_to_zero_grace_period = d),
                "scale-to-zero-pod-retention-period" => {
                    duration(value).map(|d| config.scale_to_zero_pod_retention_period = d)
                }
                "initial-scale" => whole(value).map(|v| config.initial_scale = v),
                "min-scale" => whole(value).map(|v| config.min_scale = v),
                "max-scale" => whole(value).map(|v| config.max_scale = v),
                "stable-window" => duration(value)
                    .and_then(|d| within(d, value, 6, 3600))
                    .map(|d| config.stable_window = d),
                "panic-window-percentage" => {
                    number(value, 1.0, 100.0).map(|v| config.panic_window_percentage = v)
                }
                "panic-threshold-percentage" => {
                    number(value, 110.0, 1000.0).map(|v| config.panic_threshold_percentage = v)
                }
                "container-concurrency-target-default" => number(value, 0.01, f64::MAX)
                    .map(|v| config.container_concurrency_target_default = v),
                "container-concurrency-target-percentage" => number(value, 1.0, 100.0)
                    .map(|v| config.container_concurrency_target_percentage = v),
                "requests-per-second-target-default" => number(value, 0.01, f64::MAX)
                    .map(|v| config.requests_per_second_target_default = v),
                "max-scale-up-rate" => number(value, f64::MIN_POSITIVE, f64::MAX)
                    .and_then(|v| above_one(v, value))
                    .map(|v| config.max_scale_up_rate = v),
                "max-scale-down-rate" => number(value, f64::MIN_POSITIVE, f64::MAX)
                    .and_then(|v| above_one(v, value))
                    .map(|v| config.max_scale_down_rate = v),
                "scale-down-delay" => duration(value)
                    .and_then(|d| within(d, value, 0, 3600))
                    .map(|d| config.scale_down_delay = d),
                _ => Err(format!(
                    "unknown or unsupported key (supported: {})",
                    SUPPORTED_KEYS.join(", ")
                )),
            };
            if let Err(message) = result {
                errors.push(FieldError::new(at, message));
            }
        }
        if config.max_scale > 0 && config.min_scale > config.max_scale {
            errors.push(FieldError::new(
                "data[\"min-scale\"]",
                format!(
                    "{} is above max-scale {}",
                    config.min_scale, config.max_scale
                ),
            ));
        }
        if config.initial_scale == 0 && !config.allow_zero_initial_scale {
            errors.push(FieldError::new(
                "data[\"initial-scale\"]",
                "0 requires allow-zero-initial-scale: \"true\"",
            ));
        }
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(errors)
        }
    }
}

/// Every key [`AutoscalerConfig::from_data`] reads (besides `_example`, which it skips).
pub const SUPPORTED_KEYS: &[&str] = &[
    "enable-scale-to-zero",
    "scale-to-zero-grace-period",
    "scale-to-zero-pod-retention-period",
    "allow-zero-initial-scale",
    "initial-scale",
    "min-scale",
    "max-scale",
    "stable-window",
    "panic-window-percentage",
    "panic-threshold-percentage",
    "container-concurrency-target-default",
    "container-concurrency-target-percentage",
    "requests-per-second-target-default",
    "max-scale-up-rate",
    "max-scale-down-rate",
    "scale-down-delay",
];

fn boolean(value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!(
            "{value:?} is not a boolean: use \"true\" or \"false\""
        )),
    }
}

fn whole(value: &str) -> Result<u32, String> {
    value
        .parse::<u32>()
        .map_err(|_| format!("{value:?} is not a whole number ≥ 0"))
}

fn above_one(v: f64, value: &str) -> Result<f64, String> {
    if v > 1.0 {
        Ok(v)
    } else {
        Err(format!("{value} must be greater than 1"))
    }
}

fn duration(value: &str) -> Result<Duration, String> {
    parse_go_duration(value)
}

fn positive(d: Duration, value: &str) -> Result<Duration, String> {
    if d.is_zero() {
        Err(format!("{value} must be greater than 0"))
    } else {
        Ok(d)
    }
}

fn within(d: Duration, value: &str, min_secs: u64, max_secs: u64) -> Result<Duration, String> {
    if d < Duration::from_secs(min_secs) || d > Duration::from_secs(max_secs) {
        return Err(format!(
            "{value} is out of range: must be between {min_secs}s and {max_secs}s"
        ));
    }
    if d.subsec_nanos() != 0 {
        return Err(format!("{value} must be a whole number of seconds"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_knatives() {
        let config = AutoscalerConfig::from_data(&BTreeMap::new()).expect("empty is fine");
        assert_eq!(config.stable_window, Duration::from_secs(60));
        assert_eq!(config.container_concurrency_target_percentage, 70.0);
        assert_eq!(config.max_scale_down_rate, 2.0);
        assert!(config.enable_scale_to_zero);
    }

    #[test]
    fn reads_keys_and_rejects_bad_ones_by_name() {
        let config = AutoscalerConfig::from_data(&data(&[
            ("stable-window", "6s"),
            ("scale-to-zero-grace-period", "1s"),
            ("enable-scale-to-zero", "false"),
            ("_example", "anything"),
        ]))
        .expect("valid");
        assert_eq!(config.stable_window, Duration::from_secs(6));
        assert!(!config.enable_scale_to_zero);
        let errors = AutoscalerConfig::from_data(&data(&[
            ("stable-window", "5s"),
            ("max-scale-down-rate", "1"),
            ("tick-interval", "1s"),
            ("initial-scale", "0"),
        ]))
        .expect_err("invalid");
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "data[\"max-scale-down-rate\"]",
                "data[\"stable-window\"]",
                "data[\"tick-interval\"]",
                "data[\"initial-scale\"]"
            ]
        );
    }
}
