//! What sidecars send the autoscaler. Local mode shares these values in-process; a standalone
//! sidecar posts them as JSON to the autoscaler's [`STATS_PATH`] once a second.

use serde::{Deserialize, Serialize};

use crate::load::LoadSample;

/// Where the autoscaler takes stats.
pub const STATS_PATH: &str = "/api/v1/stats";

/// One replica's load over one reporting interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Stat {
    /// The revision the replica belongs to (`hello-00001`).
    pub revision: String,
    /// Which replica (pod) reports, so a second report replaces the first.
    pub replica: String,
    /// Time-weighted average of requests in flight over the interval.
    pub concurrency: f64,
    /// Requests started in the interval.
    pub requests: u64,
    /// Length of the interval in seconds.
    pub seconds: f64,
}

// === impl Stat ===

impl Stat {
    pub fn new(revision: &str, replica: &str, sample: LoadSample) -> Self {
        Self {
            revision: revision.to_string(),
            replica: replica.to_string(),
            concurrency: sample.concurrency,
            requests: sample.requests,
            seconds: sample.seconds,
        }
    }

    /// Checks the values; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.revision.is_empty() {
            return Err("revision: required".into());
        }
        if self.replica.is_empty() {
            return Err("replica: required".into());
        }
        if !self.concurrency.is_finite() || self.concurrency < 0.0 {
            return Err(format!(
                "concurrency: {} must be a number ≥ 0",
                self.concurrency
            ));
        }
        if !self.seconds.is_finite() || self.seconds <= 0.0 {
            return Err(format!("seconds: {} must be a number > 0", self.seconds));
        }
        Ok(())
    }

    /// Requests per second over the interval.
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_validates() {
        let stat = Stat::new(
            "hello-00001",
            "pod-a",
            LoadSample {
                concurrency: 2.5,
                requests: 30,
                seconds: 1.5,
            },
        );
        let json = serde_json::to_string(&stat).expect("json");
        assert_eq!(serde_json::from_str::<Stat>(&json).expect("back"), stat);
        assert_eq!(stat.rps(), 20.0);
        assert!(stat.validate().is_ok());
        let bad = Stat {
            seconds: 0.0,
            ..stat
        };
        assert!(bad.validate().expect_err("zero").starts_with("seconds:"));
    }
}
