//! The `autoscaling.knative.dev/*` annotations of a revision template, parsed and range-checked
//! as Knative does. Unknown keys under that prefix are rejected by name.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::error::FieldError;
pub use mecha_common::duration::parse_go as parse_go_duration;

pub const PREFIX: &str = "autoscaling.knative.dev/";

/// The only autoscaler class Mecha implements.
pub const KPA_CLASS: &str = "kpa.autoscaling.knative.dev";

/// What the KPA scales on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    Concurrency,
    Rps,
}

/// Per-revision autoscaling settings; `None` means "use the `config-autoscaler` default".
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ScalingAnnotations {
    pub min_scale: Option<u32>,
    pub max_scale: Option<u32>,
    pub initial_scale: Option<u32>,
    pub activation_scale: Option<u32>,
    pub target: Option<f64>,
    pub metric: Option<Metric>,
    pub target_utilization_percentage: Option<f64>,
    pub window: Option<Duration>,
    pub panic_window_percentage: Option<f64>,
    pub panic_threshold_percentage: Option<f64>,
    pub scale_down_delay: Option<Duration>,
    pub scale_to_zero_pod_retention_period: Option<Duration>,
}

// === impl ScalingAnnotations ===

impl ScalingAnnotations {
    /// Parses every `autoscaling.knative.dev/*` key of `annotations`; problems are reported
    /// under `path` (the annotations map's own field path). Other annotations are left alone.
    pub fn parse(
        annotations: &BTreeMap<String, String>,
        path: &str,
        errors: &mut Vec<FieldError>,
    ) -> Self {
        let mut out = Self::default();
        for (key, value) in annotations {
            let Some(name) = key.strip_prefix(PREFIX) else {
                continue;
            };
            let at = format!("{path}[\"{key}\"]");
            let mut report = |message: String| errors.push(FieldError::new(&at, message));
            let value = value.trim();
            match name {
                "class" => {
                    if value != KPA_CLASS {
                        report(format!(
                            "only the {KPA_CLASS:?} autoscaler class is supported, not {value:?}"
                        ));
                    }
                }
                "min-scale" => {
                    out.min_scale = int_in(value, 0, i32::MAX as u32).map_err(&mut report).ok()
                }
                "max-scale" => {
                    out.max_scale = int_in(value, 0, i32::MAX as u32).map_err(&mut report).ok()
                }
                // 0 is only allowed with `allow-zero-initial-scale: true` in
                // config-autoscaler, checked when the Service is applied.
                "initial-scale" => {
                    out.initial_scale = int_in(value, 0, i32::MAX as u32).map_err(&mut report).ok()
                }
                "activation-scale" => {
                    out.activation_scale =
                        int_in(value, 2, i32::MAX as u32).map_err(&mut report).ok()
                }
                "target" => out.target = float_in(value, 0.01, f64::MAX).map_err(&mut report).ok(),
                "metric" => {
                    out.metric = match value {
                        "concurrency" => Some(Metric::Concurrency),
                        "rps" => Some(Metric::Rps),
                        other => {
                            report(format!(
                                "{other:?} is not a metric the KPA scales on: use \"concurrency\" or \"rps\""
                            ));
                            None
                        }
                    }
                }
                "target-utilization-percentage" => {
                    out.target_utilization_percentage =
                        float_in(value, 1.0, 100.0).map_err(&mut report).ok()
                }
                "window" => {
                    out.window =
                        duration_in(value, Duration::from_secs(6), Duration::from_secs(3600))
                            .and_then(|d| {
                                if d.subsec_nanos() == 0 {
                                    Ok(d)
                                } else {
                                    Err(format!("{value:?} must be a whole number of seconds"))
                                }
                            })
                            .map_err(&mut report)
                            .ok()
                }
                "panic-window-percentage" => {
                    out.panic_window_percentage =
                        float_in(value, 1.0, 100.0).map_err(&mut report).ok()
                }
                "panic-threshold-percentage" => {
                    out.panic_threshold_percentage =
                        float_in(value, 110.0, 1000.0).map_err(&mut report).ok()
                }
                "scale-down-delay" => {
                    out.scale_down_delay =
                        duration_in(value, Duration::ZERO, Duration::from_secs(3600))
                            .map_err(&mut report)
                            .ok()
                }
                "scale-to-zero-pod-retention-period" => {
                    out.scale_to_zero_pod_retention_period =
                        duration_in(value, Duration::ZERO, Duration::from_secs(3600))
                            .map_err(&mut report)
                            .ok()
                }
                _ => report(format!(
                    "unknown autoscaling annotation; supported: {}",
                    SUPPORTED.join(", ")
                )),
            }
        }
        out.check_bounds(path, errors);
        out
    }

    fn check_bounds(&self, path: &str, errors: &mut Vec<FieldError>) {
        let at = |key: &str| format!("{path}[\"{PREFIX}{key}\"]");
        if let (Some(min), Some(max)) = (self.min_scale, self.max_scale)
            && max > 0
            && min > max
        {
            errors.push(FieldError::new(
                at("min-scale"),
                format!("min-scale {min} is above max-scale {max}"),
            ));
        }
        if let Some(activation) = self.activation_scale
            && let Some(max) = self.max_scale.filter(|m| *m > 0)
            && activation > max
        {
            errors.push(FieldError::new(
                at("activation-scale"),
                format!("activation-scale {activation} is above max-scale {max}"),
            ));
        }
    }
}

const SUPPORTED: &[&str] = &[
    "class",
    "min-scale",
    "max-scale",
    "initial-scale",
    "activation-scale",
    "target",
    "metric",
    "target-utilization-percentage",
    "window",
    "panic-window-percentage",
    "panic-threshold-percentage",
    "scale-down-delay",
    "scale-to-zero-pod-retention-period",
];

fn int_in(value: &str, min: u32, max: u32) -> Result<u32, String> {
    let parsed: i64 = value
        .parse()
        .map_err(|_| format!("{value:?} is not a whole number"))?;
    if parsed < i64::from(min) || parsed > i64::from(max) {
        return Err(format!(
            "{parsed} is out of range: must be between {min} and {max}"
        ));
    }
    Ok(parsed as u32)
}

/// A number within `[min, max]`, or a message saying which bound it breaks.
pub(crate) fn float_in(value: &str, min: f64, max: f64) -> Result<f64, String> {
    let parsed: f64 = value
        .parse()
        .map_err(|_| format!("{value:?} is not a number"))?;
    if !parsed.is_finite() || parsed < min || parsed > max {
        return Err(format!(
            "{parsed} is out of range: must be between {min} and {max}"
        ));
    }
    Ok(parsed)
}

fn duration_in(value: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let parsed = parse_go_duration(value)?;
    if parsed < min || parsed > max {
        return Err(format!(
            "{value:?} is out of range: must be between {} and {}",
            fmt_duration(min),
            fmt_duration(max)
        ));
    }
    Ok(parsed)
}

fn fmt_duration(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> (ScalingAnnotations, Vec<FieldError>) {
        let map = pairs
            .iter()
            .map(|(k, v)| (format!("{PREFIX}{k}"), v.to_string()))
            .collect();
        let mut errors = Vec::new();
        let parsed = ScalingAnnotations::parse(&map, "a", &mut errors);
        (parsed, errors)
    }

    #[test]
    fn parses_every_supported_key() {
        let (parsed, errors) = parse(&[
            ("min-scale", "1"),
            ("max-scale", "5"),
            ("initial-scale", "2"),
            ("activation-scale", "3"),
            ("target", "10"),
            ("metric", "rps"),
            ("target-utilization-percentage", "80"),
            ("window", "2m"),
            ("panic-window-percentage", "20"),
            ("panic-threshold-percentage", "300"),
            ("scale-down-delay", "15s"),
            ("scale-to-zero-pod-retention-period", "1m"),
            ("class", KPA_CLASS),
        ]);
        assert_eq!(errors, vec![]);
        assert_eq!(parsed.min_scale, Some(1));
        assert_eq!(parsed.max_scale, Some(5));
        assert_eq!(parsed.metric, Some(Metric::Rps));
        assert_eq!(parsed.window, Some(Duration::from_secs(120)));
        assert_eq!(parsed.scale_down_delay, Some(Duration::from_secs(15)));
        assert_eq!(parsed.initial_scale, Some(2));
    }

    #[test]
    fn rejects_out_of_range_and_unknown_keys() {
        let (_, errors) = parse(&[
            ("window", "5s"),
            ("panic-threshold-percentage", "100"),
            ("min-scale", "-1"),
            ("activation-scale", "1"),
            ("minScale", "1"),
            ("class", "hpa.autoscaling.knative.dev"),
        ]);
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(errors.len(), 6, "{errors:?}");
        assert!(paths.contains(&"a[\"autoscaling.knative.dev/minScale\"]"));
        assert!(
            errors
                .iter()
                .any(|e| e.message.contains("between 6s and 3600s"))
        );
    }

    #[test]
    fn min_above_max_is_an_error() {
        let (_, errors) = parse(&[("min-scale", "3"), ("max-scale", "2")]);
        assert_eq!(errors.len(), 1);
        let (_, errors) = parse(&[("min-scale", "2"), ("max-scale", "0")]);
        assert_eq!(errors, vec![], "max-scale 0 is unlimited");
    }
}
