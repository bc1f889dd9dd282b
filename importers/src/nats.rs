//! NatsSource: messages of a NATS subject. With `spec.stream` (JetStream) they are read
//! through a durable pull consumer with explicit acknowledgement, acknowledged (double ack:
//! the server confirms it) only after the sink answered 2xx; while it is being delivered the
//! message is kept in progress (`+WPI` every third of the ack wait), and sent again while the
//! sink fails. Without a stream the subscription is core NATS:
//! at most once (what arrives while the sink is down waits in memory; what arrives while
//! `mecha up` is not running is never seen).
//!
//! The event: type `dev.mecha.sources.nats`, source
//! `/apis/v1alpha1/namespaces/{ns}/natssources/{name}`, `subject` the message's subject, data
//! the payload as it came, `datacontenttype` its `Content-Type` header when it has one. With
//! JetStream the id is `{stream}-{stream sequence}`, the same for every redelivery; core
//! messages get a new id per delivery.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, stream};
use crds::NatsSource;
use eventing_broker::Event;
use futures_util::StreamExt;
use tokio::task::JoinHandle;

use crate::context::SourceContext;

pub const EVENT_TYPE: &str = crds::queues::NATS_EVENT_TYPE;
/// How long the server waits for an acknowledgement before it delivers a message again
/// (reset by the progress acknowledgements sent while the sink fails), unless the source says.
const ACK_WAIT: Duration = Duration::from_secs(30);
const RECONNECT: Duration = Duration::from_secs(1);
const MAX_RECONNECT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// May hold credentials: never logged.
    url: String,
    display: String,
    subject: String,
    stream: Option<String>,
    consumer: String,
    ack_wait: Duration,
    source: String,
}

// === impl NatsConfig ===

impl NatsConfig {
    pub fn from_resource(source: &NatsSource) -> Result<Self, String> {
        let endpoint = source.endpoint()?;
        Ok(Self {
            url: source.spec.url.clone(),
            display: endpoint.display(),
            subject: source.spec.subject.clone(),
            stream: source.spec.stream.clone(),
            consumer: source.consumer(),
            ack_wait: source
                .spec
                .ack_wait_seconds
                .map_or(ACK_WAIT, |s| Duration::from_secs(u64::from(s))),
            source: source.event_source(),
        })
    }

    /// The event of one message; `sequence` is its stream sequence under JetStream.
    pub fn event(&self, message: &async_nats::Message, sequence: Option<u64>) -> Event {
        let id = match (&self.stream, sequence) {
            (Some(stream), Some(sequence)) => format!("{stream}-{sequence}"),
            _ => crate::ping::unique_id(&self.source),
        };
        let mut event = Event::new(&id, &self.source, EVENT_TYPE);
        event.set("subject", message.subject.to_string());
        if let Some(content_type) = message.headers.as_ref().and_then(|h| h.get("Content-Type")) {
            event.set("datacontenttype", content_type.as_str());
        }
        event.data = Some(message.payload.clone());
        event
    }

    pub fn build(self, cx: SourceContext) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut pause = RECONNECT;
            loop {
                let error = tokio::select! {
                    result = self.run(&cx) => match result {
                        Ok(()) => return,
                        Err(error) => error,
                    },
                    () = cx.shutdown.clone().recv() => return,
                };
                cx.set_problem(Some(format!(
                    "nats {} subject {:?}: {error}; connecting again in {pause:?}",
                    self.display, self.subject
                )));
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = cx.shutdown.clone().recv() => return,
                }
                pause = (pause * 2).min(MAX_RECONNECT);
            }
        })
    }

    async fn run(&self, cx: &SourceContext) -> Result<(), String> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(self.url.as_str())
            .await
            .map_err(|e| e.to_string())?;
        let Some(stream_name) = &self.stream else {
            let mut subscription = client
                .subscribe(self.subject.clone())
                .await
                .map_err(|e| e.to_string())?;
            cx.set_problem(None);
            while let Some(message) = subscription.next().await {
                if !cx
                    .emit_acked(self.event(&message, None), None, || async {})
                    .await
                {
                    return Ok(());
                }
            }
            return Err("the subscription ended".into());
        };
        let js = jetstream::new(client);
        let stream = js
            .get_or_create_stream(stream::Config {
                name: stream_name.clone(),
                subjects: vec![self.subject.clone()],
                ..Default::default()
            })
            .await
            .map_err(|e| format!("stream {stream_name}: {e}"))?;
        let consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(
                &self.consumer,
                consumer::pull::Config {
                    durable_name: Some(self.consumer.clone()),
                    filter_subject: self.subject.clone(),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: self.ack_wait,
                    // One at a time, in order: nothing waits here long enough to be sent
                    // again by the server while an earlier message is being retried.
                    max_ack_pending: 1,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("consumer {}: {e}", self.consumer))?;
        let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
        cx.set_problem(None);
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| e.to_string())?;
            let sequence = message.info().ok().map(|info| info.stream_sequence);
            let event = self.event(&message.message, sequence);
            let sent = cx
                .emit_acked(event, Some(self.ack_wait / 3), || async {
                    // Still being worked on: the server waits another ack wait.
                    let _ = message.ack_with(AckKind::Progress).await;
                })
                .await;
            if !sent {
                return Ok(());
            }
            if let Err(error) = message.double_ack().await {
                // Not confirmed: the server sends it again, and the sink sees it twice.
                tracing::warn!(%error, subject = %message.subject, "could not acknowledge a JetStream message; it will be delivered again");
            }
        }
        Err("the consumer's message stream ended".into())
    }
}
