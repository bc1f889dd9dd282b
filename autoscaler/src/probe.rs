//! The readiness probe of a revision's container, resolved from its `readinessProbe` (the
//! probing itself is [`mecha_common::probe`]).

use std::time::Duration;

use crds::serving::Container;
pub use mecha_common::probe::{AGGRESSIVE_TIMEOUT, ProbeKind, ProbeSpec};

/// The probe for `container`: its `readinessProbe` (`httpGet` or `tcpSocket`) with
/// Kubernetes' defaults, or a TCP connect to its port.
pub fn for_container(container: &Container) -> ProbeSpec {
    let probe = container.readiness_probe.clone().unwrap_or_default();
    let kind = match &probe.http_get {
        Some(http) => ProbeKind::Http {
            path: http.path.clone().unwrap_or_else(|| "/".into()),
            headers: http
                .http_headers
                .iter()
                .map(|h| (h.name.clone(), h.value.clone()))
                .collect(),
        },
        None => ProbeKind::Tcp,
    };
    let period = probe
        .period_seconds
        .filter(|p| *p > 0)
        .map(|p| Duration::from_secs(p.into()));
    ProbeSpec {
        kind,
        initial_delay: Duration::from_secs(probe.initial_delay_seconds.unwrap_or(0).into()),
        timeout: probe
            .timeout_seconds
            .map_or(AGGRESSIVE_TIMEOUT, |t| Duration::from_secs(t.into())),
        period,
        success_threshold: probe.success_threshold.unwrap_or(1).max(1),
        failure_threshold: probe.failure_threshold.unwrap_or(3).max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::serving::{HttpGetAction, Probe};

    #[test]
    fn resolves_the_containers_probe() {
        assert_eq!(for_container(&Container::default()), ProbeSpec::tcp());
        let container = Container {
            readiness_probe: Some(Probe {
                http_get: Some(HttpGetAction {
                    path: Some("/healthz".into()),
                    ..HttpGetAction::default()
                }),
                period_seconds: Some(2),
                failure_threshold: Some(5),
                ..Probe::default()
            }),
            ..Container::default()
        };
        let spec = for_container(&container);
        assert_eq!(
            spec.kind,
            ProbeKind::Http {
                path: "/healthz".into(),
                headers: vec![]
            }
        );
        assert_eq!(spec.period, Some(Duration::from_secs(2)));
        assert_eq!(spec.failure_threshold, 5);
    }
}
