//! MqttSource: messages of MQTT topic filters (MQTT 3.1.1, QoS 1), acknowledged (`PUBACK`)
//! only after the sink answered 2xx.
//!
//! The session is persistent (`cleanSession` false, a stable client id), so what the broker
//! delivered and was not acknowledged — the sink was down, or `mecha up` died — is delivered
//! again when the source connects next, and messages published while it was away are kept by
//! the broker (within its own queue limits, e.g. mosquitto's `max_queued_messages`). rumqttc
//! runs with `manual_acks`: its event loop keeps the connection alive while a message waits
//! for the sink, and the message is acknowledged by the sending task once the sink took it.
//!
//! The event: type `dev.mecha.sources.mqtt`, source
//! `/apis/v1alpha1/namespaces/{ns}/mqttsources/{name}`, `subject` the message's topic, data
//! the payload as it came (no content type: MQTT 3.1.1 carries none). MQTT gives a message no
//! id that survives a redelivery, so the id is new per delivery ([`crate::ping::unique_id`]).

use std::time::Duration;

use crds::MqttSource;
use eventing_broker::Event;
use rumqttc::{AsyncClient, MqttOptions, Packet, Publish, QoS, SubscribeFilter};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::context::SourceContext;

pub const EVENT_TYPE: &str = crds::queues::MQTT_EVENT_TYPE;
/// Largest message accepted from the broker.
pub const MAX_MESSAGE: usize = 1024 * 1024;
/// Messages the broker may have delivered and not had acknowledged (MQTT's receive maximum
/// is the broker's; this bounds what waits here for the sink).
const QUEUE: usize = 256;
const RECONNECT: Duration = Duration::from_secs(1);
const MAX_RECONNECT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct MqttConfig {
    host: String,
    port: u16,
    display: String,
    credentials: Option<(String, String)>,
    client_id: String,
    topics: Vec<String>,
    source: String,
}

// === impl MqttConfig ===

impl MqttConfig {
    pub fn from_resource(source: &MqttSource) -> Result<Self, String> {
        let endpoint = source.endpoint()?;
        Ok(Self {
            display: endpoint.display(),
            host: endpoint.host.clone(),
            port: endpoint.port,
            credentials: endpoint
                .user
                .clone()
                .map(|user| (user, endpoint.password.clone().unwrap_or_default())),
            client_id: source.client_id(),
            topics: source.spec.topics.clone(),
            source: source.event_source(),
        })
    }

    pub fn event(&self, publish: &Publish) -> Event {
        let id = crate::ping::unique_id(&self.source);
        let mut event = Event::new(&id, &self.source, EVENT_TYPE);
        event.set("subject", publish.topic.clone());
        event.set("time", jiff::Timestamp::now().to_string());
        event.data = Some(publish.payload.clone());
        event
    }

    fn options(&self) -> MqttOptions {
        let mut options = MqttOptions::new(&self.client_id, &self.host, self.port);
        options
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_keep_alive(Duration::from_secs(15))
            .set_max_packet_size(MAX_MESSAGE, 64 * 1024);
        if let Some((user, password)) = &self.credentials {
            options.set_credentials(user, password);
        }
        options
    }

    /// Runs the connection and the sending task until the context's shutdown.
    pub fn build(self, cx: SourceContext) -> JoinHandle<()> {
        tokio::spawn(async move {
            let (client, mut eventloop) = AsyncClient::new(self.options(), 64);
            let (queue, mut received) = mpsc::channel::<Publish>(QUEUE);
            // Sends in order; acknowledges each message once the sink took it.
            let sender = {
                let (cx, client, config) = (cx.clone(), client.clone(), self.clone());
                tokio::spawn(async move {
                    while let Some(publish) = received.recv().await {
                        if !cx
                            .emit_acked(config.event(&publish), None, || async {})
                            .await
                        {
                            return;
                        }
                        if let Err(error) = client.ack(&publish).await {
                            tracing::warn!(%error, topic = %publish.topic, "could not acknowledge an MQTT message; the broker sends it again");
                        }
                    }
                })
            };
            let mut pause = RECONNECT;
            loop {
                let polled = tokio::select! {
                    polled = eventloop.poll() => polled,
                    () = cx.shutdown.clone().recv() => break,
                };
                match polled {
                    Ok(rumqttc::Event::Incoming(Packet::ConnAck(ack))) => {
                        pause = RECONNECT;
                        tracing::info!(broker = %self.display, client_id = %self.client_id, session_present = ack.session_present, "connected to the MQTT broker");
                        let filters = self
                            .topics
                            .iter()
                            .map(|topic| SubscribeFilter::new(topic.clone(), QoS::AtLeastOnce));
                        if let Err(error) = client.subscribe_many(filters).await {
                            cx.set_problem(Some(format!(
                                "mqtt {}: subscribe: {error}",
                                self.display
                            )));
                        }
                    }
                    Ok(rumqttc::Event::Incoming(Packet::SubAck(ack))) => {
                        let refused = ack
                            .return_codes
                            .iter()
                            .any(|code| matches!(code, rumqttc::SubscribeReasonCode::Failure));
                        cx.set_problem(refused.then(|| {
                            format!("mqtt {}: the broker refused a subscription", self.display)
                        }));
                    }
                    Ok(rumqttc::Event::Incoming(Packet::Publish(publish))) => {
                        tokio::select! {
                            sent = queue.send(publish) => if sent.is_err() { break },
                            () = cx.shutdown.clone().recv() => break,
                        }
                    }
                    Ok(_) => {}
                    Err(error) => {
                        cx.set_problem(Some(format!(
                            "mqtt {}: {error}; connecting again in {pause:?}",
                            self.display
                        )));
                        tokio::select! {
                            () = tokio::time::sleep(pause) => {}
                            () = cx.shutdown.clone().recv() => break,
                        }
                        pause = (pause * 2).min(MAX_RECONNECT);
                    }
                }
            }
            sender.abort();
            // Unacknowledged messages stay in the session, for the next connection.
            let _ = client.try_disconnect();
        })
    }
}
