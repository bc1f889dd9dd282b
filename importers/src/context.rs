//! What a running source gets: its identity, the shutdown signal, and the sink behind the
//! rules every source shares (`ceOverrides` applied, counted per source).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use eventing_broker::Event;
use mecha_common::ShutdownSignal;

use crate::metrics::SourceMetrics;
use crate::sink::{Sink, SinkError};

#[derive(Debug, Clone)]
pub struct SourceContext {
    /// `(kind, namespace, name)` of the source, for metrics and logs.
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub shutdown: ShutdownSignal,
    sink: Arc<dyn Sink>,
    extensions: BTreeMap<String, String>,
    metrics: SourceMetrics,
    /// Why the running source is not ready (its server unreachable, its sink failing);
    /// `None` when it is. Read by [`Importers::status`](crate::Importers::status).
    health: Health,
    /// The sink's URL (`K_SINK` of a program that sends the events itself).
    sink_uri: Option<String>,
    /// Where a ContainerSource's program runs.
    processes: Option<Arc<dyn crate::bindings::Processes>>,
    /// The resources an ApiServerSource watches.
    objects: Option<tokio::sync::watch::Receiver<Arc<crate::apiserver::Objects>>>,
}

/// A running source's readiness, shared with whoever shows it.
pub type Health = Arc<Mutex<Option<String>>>;

/// The first pause between two rounds of sends of an event its source must not lose...
const ROUND_PAUSE: Duration = Duration::from_secs(1);
/// ...doubling up to this.
const MAX_ROUND_PAUSE: Duration = Duration::from_secs(30);

// === impl SourceContext ===

impl SourceContext {
    pub fn new(
        (kind, namespace, name): (String, String, String),
        shutdown: ShutdownSignal,
        sink: Arc<dyn Sink>,
        extensions: BTreeMap<String, String>,
        metrics: SourceMetrics,
    ) -> Self {
        Self {
            kind,
            namespace,
            name,
            shutdown,
            sink,
            extensions,
            metrics,
            health: Health::default(),
            sink_uri: None,
            processes: None,
            objects: None,
        }
    }

    pub fn with_objects(
        mut self,
        objects: Option<tokio::sync::watch::Receiver<Arc<crate::apiserver::Objects>>>,
    ) -> Self {
        self.objects = objects;
        self
    }

    pub fn objects(&self) -> Option<tokio::sync::watch::Receiver<Arc<crate::apiserver::Objects>>> {
        self.objects.clone()
    }

    pub fn with_sink_uri(mut self, uri: String) -> Self {
        self.sink_uri = Some(uri);
        self
    }

    pub fn with_processes(
        mut self,
        processes: Option<Arc<dyn crate::bindings::Processes>>,
    ) -> Self {
        self.processes = processes;
        self
    }

    pub fn sink_uri(&self) -> Option<&str> {
        self.sink_uri.as_deref()
    }

    pub fn processes(&self) -> Option<Arc<dyn crate::bindings::Processes>> {
        self.processes.clone()
    }

    /// The handle [`set_problem`](Self::set_problem) writes to.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Marks the running source not ready with `why` (logged once per change), or ready.
    pub fn set_problem(&self, why: Option<String>) {
        let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        if *health != why {
            match &why {
                Some(reason) => {
                    tracing::warn!(source = %format!("{}/{}", self.namespace, self.name), kind = %self.kind, %reason, "source not ready");
                }
                None => {
                    tracing::info!(source = %format!("{}/{}", self.namespace, self.name), kind = %self.kind, "source ready");
                }
            }
            *health = why;
        }
    }

    /// Sends `event` until the sink accepts it — for sources whose upstream redelivers what
    /// is not acknowledged, so the caller acknowledges only after this returns `true`.
    /// Between two rounds of the sink's own retries it pauses (1 s, doubling to 30 s) and shows
    /// the source not ready. All along, every `every`, it calls `keep_alive` (to tell the
    /// upstream the message is still being worked on, so it is not handed out again meanwhile;
    /// `None`: never).
    /// `false` when the source was shut down first (nothing to acknowledge).
    pub async fn emit_acked<F, Fut>(
        &self,
        event: Event,
        every: Option<Duration>,
        mut keep_alive: F,
    ) -> bool
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = ()>,
    {
        let delivery = async {
            let mut pause = ROUND_PAUSE;
            loop {
                match self.emit(event.clone()).await {
                    Ok(()) => {
                        self.set_problem(None);
                        return;
                    }
                    Err(error) => {
                        self.set_problem(Some(format!(
                            "sink: {error}; event {} is kept upstream and sent again in {pause:?}",
                            event.id()
                        )));
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(MAX_ROUND_PAUSE);
                    }
                }
            }
        };
        tokio::pin!(delivery);
        let mut ticks = every.map(|every| {
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks
        });
        loop {
            tokio::select! {
                () = &mut delivery => return true,
                _ = async { ticks.as_mut()?.tick().await; Some(()) }, if ticks.is_some() => keep_alive().await,
                () = self.shutdown.clone().recv() => return false,
            }
        }
    }

    /// Counts a refused webhook delivery.
    pub fn rejected(&self, reason: &str) {
        self.metrics
            .rejected
            .with_label_values(&[&self.kind, &self.namespace, &self.name, reason])
            .inc();
    }

    /// Sends one event to the sink with the source's `ceOverrides.extensions` set, and counts
    /// the outcome. `Ok` once the sink accepted it.
    pub async fn emit(&self, mut event: Event) -> Result<(), SinkError> {
        for (name, value) in &self.extensions {
            event.set(name, value.clone());
        }
        let id = event.id();
        let labels = [
            self.kind.as_str(),
            self.namespace.as_str(),
            self.name.as_str(),
        ];
        match self.sink.send(event).await {
            Ok(()) => {
                self.metrics.sent.with_label_values(&labels).inc();
                Ok(())
            }
            Err(error) => {
                self.metrics.failed.with_label_values(&labels).inc();
                tracing::warn!(source = %format!("{}/{}", self.namespace, self.name), kind = %self.kind, %id, %error, "an event was not delivered to the sink");
                Err(error)
            }
        }
    }
}
