//! The seam every source implements (vector's shape): a config that checks itself and builds
//! a running source from a [`SourceContext`].

use std::sync::Arc;

use crds::load::Mode;
use crds::sources::SecretRef;
use crds::{
    FieldError, GitHubSource, GitLabSource, MqttSource, NatsSource, PingSource, RedisStreamSource,
    SourceResource,
};
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
            SourceResource::Redis(s) => build_redis(s, cx),
            SourceResource::Nats(s) => build_nats(s, cx),
            SourceResource::Mqtt(s) => build_mqtt(s, cx),
            SourceResource::Container(s) => {
                let processes = cx
                    .processes()
                    .ok_or("this runtime cannot run a ContainerSource's program")?;
                let sink = cx.sink_uri().ok_or("the sink has no URL")?.to_string();
                Ok(Running::Task(crate::bindings::run_container(
                    s, cx, processes, &sink,
                )?))
            }
            // Its variables reach the Services it selects through `bindings::bound_env`; the
            // source itself only waits to be stopped.
            SourceResource::Binding(_) => Ok(Running::Task(tokio::spawn(async move {
                cx.shutdown.clone().recv().await;
            }))),
            SourceResource::ApiServer(s) => {
                let objects = cx
                    .objects()
                    .ok_or("this runtime has no resources for an ApiServerSource to watch")?;
                Ok(Running::Task(
                    crate::apiserver::ApiServerConfig::from_resource(s).build(cx, objects),
                ))
            }
        }
    }
}

#[cfg(feature = "redis")]
fn build_redis(source: &RedisStreamSource, cx: SourceContext) -> Result<Running, String> {
    Ok(Running::Task(
        crate::redis::RedisConfig::from_resource(source)?.build(cx),
    ))
}

#[cfg(not(feature = "redis"))]
fn build_redis(_: &RedisStreamSource, _: SourceContext) -> Result<Running, String> {
    Err(not_built("redis"))
}

#[cfg(feature = "nats")]
fn build_nats(source: &NatsSource, cx: SourceContext) -> Result<Running, String> {
    Ok(Running::Task(
        crate::nats::NatsConfig::from_resource(source)?.build(cx),
    ))
}

#[cfg(not(feature = "nats"))]
fn build_nats(_: &NatsSource, _: SourceContext) -> Result<Running, String> {
    Err(not_built("nats"))
}

#[cfg(feature = "mqtt")]
fn build_mqtt(source: &MqttSource, cx: SourceContext) -> Result<Running, String> {
    Ok(Running::Task(
        crate::mqtt::MqttConfig::from_resource(source)?.build(cx),
    ))
}

#[cfg(not(feature = "mqtt"))]
fn build_mqtt(_: &MqttSource, _: SourceContext) -> Result<Running, String> {
    Err(not_built("mqtt"))
}

/// Why a queue source whose client was left out of this build does not run.
#[cfg_attr(
    all(feature = "redis", feature = "nats", feature = "mqtt"),
    allow(dead_code)
)]
fn not_built(feature: &str) -> String {
    format!(
        "this mecha was built without the {feature} client: build it with `--features {feature}`"
    )
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
