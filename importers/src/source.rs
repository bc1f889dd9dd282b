//! The seam every source implements (vector's shape): a config that checks itself and builds
//! a running source from a [`SourceContext`].

use std::sync::Arc;

use crds::load::Mode;
use crds::sources::SecretRef;
use crds::{FieldError, GitHubSource, GitLabSource, PingSource, SourceResource};
use tokio::task::JoinHandle;

use crate::context::SourceContext;
use crate::ping::PingConfig;
use crate::webhook::{Receiver, Secret, WebhookConfig};

/// A source's configuration.
pub trait SourceConfig {
    /// Every problem, each naming its field (what loading reports).
    fn validate(&self, mode: Mode) -> Vec<FieldError>;

    /// Starts the source; `Err` says why it cannot run (shown as its reason, never holding a
    /// secret).
    fn build(&self, cx: SourceContext) -> Result<Running, String>;
}

/// A started source.
#[derive(Debug)]
pub enum Running {
    /// A task that runs until the context's shutdown signal.
    Task(JoinHandle<()>),
    /// A receiver the gateway hands the source's webhook deliveries to.
    Webhook(Arc<Receiver>),
}

// === impl SourceConfig ===

impl SourceConfig for PingSource {
    fn validate(&self, _: Mode) -> Vec<FieldError> {
        PingSource::validate(self)
    }

    fn build(&self, cx: SourceContext) -> Result<Running, String> {
        let config = PingConfig::from_resource(self).map_err(|errors| joined(&errors))?;
        Ok(Running::Task(config.build(cx)))
    }
}

impl SourceConfig for GitHubSource {
    fn validate(&self, mode: Mode) -> Vec<FieldError> {
        GitHubSource::validate(self, mode)
    }

    fn build(&self, cx: SourceContext) -> Result<Running, String> {
        build_webhook(&SourceResource::GitHub(self.clone()), cx)
    }
}

impl SourceConfig for GitLabSource {
    fn validate(&self, mode: Mode) -> Vec<FieldError> {
        GitLabSource::validate(self, mode)
    }

    fn build(&self, cx: SourceContext) -> Result<Running, String> {
        build_webhook(&SourceResource::GitLab(self.clone()), cx)
    }
}

impl SourceConfig for SourceResource {
    fn validate(&self, mode: Mode) -> Vec<FieldError> {
        SourceResource::validate(self, mode)
    }

    fn build(&self, cx: SourceContext) -> Result<Running, String> {
        match self {
            SourceResource::Ping(s) => s.build(cx),
            SourceResource::GitHub(s) => s.build(cx),
            SourceResource::GitLab(s) => s.build(cx),
        }
    }
}

/// A webhook source: its secret read from where its annotation says (the environment of
/// this process for `-env`).
fn build_webhook(resource: &SourceResource, cx: SourceContext) -> Result<Running, String> {
    let errors = resource.validate(Mode::Local);
    if !errors.is_empty() {
        return Err(joined(&errors));
    }
    let from: SecretRef = resource
        .secret_ref()
        .ok_or("no mecha.dev/secret-token-file or mecha.dev/secret-token-env annotation")?;
    let secret = Secret::read(&from, |name| std::env::var(name).ok())?;
    let config = WebhookConfig::from_resource(resource, secret).ok_or("not a webhook source")?;
    Ok(Running::Webhook(Arc::new(config.build(cx))))
}

fn joined(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}
