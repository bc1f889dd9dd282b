//! The running broker: ingestion into the log, one dispatcher task per trigger, and the
//! checkpointer that records cursors and removes events every trigger has handled.
//!
//! Each trigger reads the log on its own from its own cursor and delivers up to its
//! concurrency limit at once, so a slow or failing subscriber only ever holds back its own
//! trigger. The cursor it records is the highest sequence below which every event was handled
//! (delivered, dead-lettered or given up on); after a crash delivery resumes there, so an event
//! can be delivered twice but never lost (at-least-once).

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crds::eventing::{Delivery, Destination};
use crds::{Broker, Trigger};
use mecha_common::ShutdownSignal;
use prometheus::Registry;
use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::delivery::{self, HttpSender, Outcome, Target};
use crate::event::{Event, TTL};
use crate::filter::Filter;
use crate::log::{EventLog, LogError};
use crate::metrics::Metrics;
use crate::state::EventingState;

/// What a fresh event's `knativebrokerttl` is set to.
pub const DEFAULT_TTL: i32 = 255;
/// Events a trigger reads from the log at a time.
const READ_BATCH: usize = 256;
/// How often cursors are recorded and handled events removed.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// The smallest body limit the HTTP binding allows an intermediary.
pub const MIN_EVENT_SIZE: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Largest request body the ingress accepts.
    pub max_event_size: usize,
    /// Per-attempt timeout when a trigger's delivery sets none.
    pub default_timeout: Duration,
    /// Deliveries in flight per trigger.
    pub concurrency: usize,
    /// The gateway: Services and Brokers named by `ref` are reached through it.
    pub ingress: SocketAddr,
    /// Host suffix of Services (`localhost` locally).
    pub domain: String,
}

/// Why events were not accepted.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("broker {0} not found")]
    UnknownBroker(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the event's knativebrokerttl ran out; it was dropped")]
    Expired,
    #[error(transparent)]
    Log(#[from] LogError),
}

/// The broker runtime; cheap to clone.
#[derive(Clone, Debug)]
pub struct EventBroker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    log: EventLog,
    metrics: Metrics,
    config: BrokerConfig,
    state: watch::Receiver<Arc<EventingState>>,
    sender: HttpSender,
    /// How far each broker's log was last truncated, so an idle broker costs no writes.
    truncated: Mutex<HashMap<String, u64>>,
}

/// A trigger's progress through its broker's log.
#[derive(Debug, Default)]
struct Tracker {
    /// The last sequence read (every event up to it was either skipped or dispatched).
    read_upto: u64,
    /// Dispatched and not finished.
    pending: BTreeSet<u64>,
}

/// One running trigger.
struct Running {
    trigger: Trigger,
    delivery: Delivery,
    broker_key: String,
    cursor_key: String,
    tracker: Arc<Mutex<Tracker>>,
    task: JoinHandle<()>,
    saved: u64,
}

// === impl EventBroker ===

impl EventBroker {
    pub fn new(
        log: EventLog,
        state: watch::Receiver<Arc<EventingState>>,
        config: BrokerConfig,
        registry: &Registry,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                log,
                metrics: Metrics::new(registry),
                config,
                state,
                sender: HttpSender::new(),
                truncated: Mutex::default(),
            }),
        }
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.inner.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn log(&self) -> &EventLog {
        &self.inner.log
    }

    pub fn state(&self) -> Arc<EventingState> {
        self.inner.state.borrow().clone()
    }

    /// The URL users post events to.
    pub fn address(&self, namespace: &str, name: &str) -> String {
        format!(
            "http://localhost:{}/{namespace}/{name}",
            self.inner.config.ingress.port()
        )
    }

    /// Validated events for `namespace/name`: applies the TTL rule and appends them durably.
    /// Returns how many were stored (expired ones are dropped and counted).
    pub async fn ingest(
        &self,
        namespace: &str,
        name: &str,
        events: Vec<Event>,
    ) -> Result<usize, IngestError> {
        let metrics = &self.inner.metrics;
        let labels = [namespace, name];
        if self.state().broker(namespace, name).is_none() {
            return Err(IngestError::UnknownBroker(format!("{namespace}/{name}")));
        }
        metrics
            .received
            .with_label_values(&labels)
            .inc_by(events.len() as u64);
        let total = events.len();
        let mut stored = Vec::with_capacity(total);
        for mut event in events {
            let ttl = match event.attributes.get(TTL) {
                None => DEFAULT_TTL,
                Some(value) => {
                    let ttl = value.to_string().parse::<i32>().map_err(|_| {
                        IngestError::Invalid(format!("{TTL} must be an integer, not {value}"))
                    })?;
                    ttl.saturating_sub(1)
                }
            };
            if ttl <= 0 {
                metrics.dropped_ttl.with_label_values(&labels).inc();
                tracing::info!(broker = %format!("{namespace}/{name}"), id = %event.id(), "dropped an event whose knativebrokerttl ran out");
                continue;
            }
            event
                .attributes
                .insert(TTL.into(), cesql::Value::Integer(ttl));
            stored.push(event.to_json_bytes());
        }
        if stored.is_empty() {
            return if total == 0 {
                Ok(0)
            } else {
                Err(IngestError::Expired)
            };
        }
        let count = stored.len();
        self.inner
            .log
            .append(&broker_key(namespace, name), stored)
            .await?;
        metrics
            .stored
            .with_label_values(&labels)
            .inc_by(count as u64);
        Ok(count)
    }

    /// Starts every trigger of the current resources and records where each new one begins,
    /// then keeps following changes until `shutdown` in a task of its own. Call it before the
    /// ingress takes requests: a new trigger starts at its broker's head, so an event accepted
    /// before the trigger started would never reach it.
    pub async fn start(self, shutdown: ShutdownSignal) -> JoinHandle<()> {
        let mut state = self.inner.state.clone();
        let mut running = HashMap::new();
        let snapshot = state.borrow_and_update().clone();
        self.settle(&snapshot, &mut running).await;
        tokio::spawn(self.run(state, running, shutdown))
    }

    async fn run(
        self,
        mut state: watch::Receiver<Arc<EventingState>>,
        mut running: HashMap<(String, String), Running>,
        shutdown: ShutdownSignal,
    ) {
        let mut ticker = tokio::time::interval(CHECKPOINT_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stop = shutdown.recv();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                changed = state.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let snapshot = state.borrow_and_update().clone();
                    self.settle(&snapshot, &mut running).await;
                }
                _ = ticker.tick() => {
                    self.checkpoint(&self.state(), &mut running, Vec::new()).await;
                }
                () = &mut stop => break,
            }
        }
        for run in running.values() {
            run.task.abort();
        }
        self.checkpoint(&self.state(), &mut running, Vec::new())
            .await;
        self.inner.log.close();
    }

    /// Reconciles the trigger tasks with `snapshot`; when a trigger started or went away, its
    /// cursor is recorded (or forgotten) durably before this returns.
    async fn settle(
        &self,
        snapshot: &EventingState,
        running: &mut HashMap<(String, String), Running>,
    ) {
        let (removed, started) = self.reconcile(snapshot, running);
        if started || !removed.is_empty() {
            self.checkpoint(snapshot, running, removed).await;
        }
    }

    /// Starts, restarts and stops trigger tasks to match `state`. Returns the cursor keys of
    /// triggers that are gone, and whether any task started.
    fn reconcile(
        &self,
        state: &EventingState,
        running: &mut HashMap<(String, String), Running>,
    ) -> (Vec<String>, bool) {
        let mut started = false;
        let mut removed = Vec::new();
        running.retain(|key, run| {
            let keep = state.triggers.get(key).is_some_and(|t| {
                *t == run.trigger
                    && t.delivery(state.broker(t.namespace(), &t.spec.broker)) == run.delivery
                    && state.broker(t.namespace(), &t.spec.broker).is_some()
            });
            if !keep {
                run.task.abort();
                let still_same_cursor = state.triggers.get(key).is_some_and(|t| {
                    cursor_key(t) == run.cursor_key
                        && state.broker(t.namespace(), &t.spec.broker).is_some()
                });
                if !still_same_cursor {
                    removed.push(run.cursor_key.clone());
                }
            }
            keep
        });
        for (key, trigger) in &state.triggers {
            if running.contains_key(key) {
                continue;
            }
            let Some(broker) = state.broker(trigger.namespace(), &trigger.spec.broker) else {
                continue;
            };
            match self.start_trigger(trigger, broker) {
                Ok(run) => {
                    running.insert(key.clone(), run);
                    started = true;
                }
                Err(error) => {
                    tracing::error!(trigger = %key.1, %error, "cannot start the trigger");
                }
            }
        }
        (removed, started)
    }

    fn start_trigger(&self, trigger: &Trigger, broker: &Broker) -> Result<Running, LogError> {
        let namespace = trigger.namespace().to_string();
        let broker_key = broker_key(&namespace, &trigger.spec.broker);
        let cursor_key = cursor_key(trigger);
        // A new trigger sees events from now on, as in Knative; a known one resumes.
        let cursor = match self.inner.log.cursor(&cursor_key)? {
            Some(cursor) => cursor,
            None => self.inner.log.head(&broker_key),
        };
        let tracker = Arc::new(Mutex::new(Tracker {
            read_upto: cursor,
            pending: BTreeSet::new(),
        }));
        let delivery = trigger.delivery(Some(broker));
        let task = tokio::spawn(dispatch(
            self.clone(),
            trigger.clone(),
            delivery.clone(),
            broker_key.clone(),
            tracker.clone(),
        ));
        tracing::info!(trigger = %format!("{namespace}/{}", trigger.metadata.name), broker = %broker_key, cursor, "trigger started");
        Ok(Running {
            trigger: trigger.clone(),
            delivery,
            broker_key,
            cursor_key,
            tracker,
            task,
            // Forces the first checkpoint to record the starting cursor.
            saved: u64::MAX,
        })
    }

    /// Records moved cursors, forgets removed ones, and deletes every event all of a broker's
    /// triggers have handled.
    async fn checkpoint(
        &self,
        state: &EventingState,
        running: &mut HashMap<(String, String), Running>,
        removed: Vec<String>,
    ) {
        let mut set = Vec::new();
        let mut low: HashMap<&str, u64> = HashMap::new();
        for run in running.values_mut() {
            let committed = {
                let tracker = run.tracker.lock().unwrap_or_else(PoisonError::into_inner);
                match tracker.pending.first() {
                    Some(first) => first - 1,
                    None => tracker.read_upto,
                }
            };
            if committed != run.saved {
                set.push((run.cursor_key.clone(), committed));
                run.saved = committed;
            }
            let entry = low.entry(run.broker_key.as_str()).or_insert(u64::MAX);
            *entry = (*entry).min(committed);
        }
        let mut truncate = Vec::new();
        {
            let mut truncated = self
                .inner
                .truncated
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for (namespace, name) in state.brokers.keys() {
                let key = broker_key(namespace, name);
                let head = self.inner.log.head(&key);
                // With no trigger, nobody will ever want these events.
                let upto = low.get(key.as_str()).copied().unwrap_or(head).min(head);
                self.inner
                    .metrics
                    .log_events
                    .with_label_values(&[namespace.as_str(), name.as_str()])
                    .set(i64::try_from(head - upto).unwrap_or(i64::MAX));
                if upto > truncated.get(&key).copied().unwrap_or(0) {
                    truncated.insert(key.clone(), upto);
                    truncate.push((key, upto));
                }
            }
        }
        if set.is_empty() && removed.is_empty() && truncate.is_empty() {
            return;
        }
        if let Err(error) = self.inner.log.checkpoint(set, removed, truncate).await {
            tracing::warn!(%error, "cannot record trigger cursors");
        }
        self.inner
            .metrics
            .log_bytes
            .set(i64::try_from(self.inner.log.file_size()).unwrap_or(i64::MAX));
    }

    /// Where a destination's events go.
    pub fn resolve(&self, destination: &Destination, namespace: &str) -> Result<Target, String> {
        let config = &self.inner.config;
        let mut connect = config.ingress;
        if connect.ip().is_unspecified() {
            connect.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let path = destination.uri.as_deref().unwrap_or("/");
        let (url, uri, host) = match &destination.r#ref {
            Some(reference) if reference.kind == crds::eventing::BROKER_KIND => {
                let ns = reference.namespace.as_deref().unwrap_or(namespace);
                let address = self.address(ns, &reference.name);
                let uri = format!("http://{connect}/{ns}/{}", reference.name);
                (address, uri, None)
            }
            Some(reference) => {
                let ns = reference.namespace.as_deref().unwrap_or(namespace);
                let host = format!(
                    "{}.{ns}.{}:{}",
                    reference.name,
                    config.domain,
                    connect.port()
                );
                let path = if path.starts_with('/') { path } else { "/" };
                (
                    format!("http://{host}{path}"),
                    format!("http://{connect}{path}"),
                    Some(host),
                )
            }
            None => (path.to_string(), path.to_string(), None),
        };
        let uri = uri.parse().map_err(|e| format!("{url}: {e}"))?;
        Ok(Target { url, uri, host })
    }
}

fn broker_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// Keyed by broker as well, so re-pointing a trigger starts it afresh.
fn cursor_key(trigger: &Trigger) -> String {
    format!(
        "{}/{}/{}",
        trigger.namespace(),
        trigger.spec.broker,
        trigger.metadata.name
    )
}

/// One trigger's dispatch loop: read, filter, deliver with bounded concurrency.
async fn dispatch(
    broker: EventBroker,
    trigger: Trigger,
    delivery: Delivery,
    broker_key: String,
    tracker: Arc<Mutex<Tracker>>,
) {
    let namespace = trigger.namespace().to_string();
    let name = trigger.metadata.name.clone();
    let filter = Filter::for_trigger(&trigger);
    let target = match broker.resolve(&trigger.spec.subscriber, &namespace) {
        Ok(target) => Arc::new(target),
        Err(error) => {
            tracing::error!(trigger = %name, %error, "cannot resolve the subscriber");
            return;
        }
    };
    let dead_letter = delivery
        .dead_letter_sink
        .as_ref()
        .and_then(|sink| broker.resolve(sink, &namespace).ok())
        .map(Arc::new);
    let delivery = Arc::new(delivery);
    let permits = Arc::new(Semaphore::new(broker.inner.config.concurrency.max(1)));
    let mut head = broker.inner.log.subscribe(&broker_key);
    let mut deliveries = JoinSet::new();
    let mut next = tracker
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .read_upto;
    loop {
        while deliveries.try_join_next().is_some() {}
        head.borrow_and_update();
        let batch = match broker.inner.log.read(&broker_key, next, READ_BATCH) {
            Ok(batch) => batch,
            Err(error) => {
                tracing::error!(trigger = %name, %error, "cannot read the event log");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if batch.is_empty() {
            tokio::select! {
                changed = head.changed() => if changed.is_err() { return },
                Some(_) = deliveries.join_next(), if !deliveries.is_empty() => {}
            }
            continue;
        }
        for (seq, bytes) in batch {
            next = seq;
            let event = serde_json::from_slice(&bytes)
                .map_err(|e| e.to_string())
                .and_then(|json| Event::from_json(json).map_err(|e| e.to_string()));
            let event = match event {
                Ok(event) if filter.matches(&event) => event,
                Ok(_) => {
                    tracker
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .read_upto = seq;
                    continue;
                }
                Err(error) => {
                    tracing::error!(trigger = %name, seq, %error, "skipping an unreadable event in the log");
                    tracker
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .read_upto = seq;
                    continue;
                }
            };
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            {
                let mut t = tracker.lock().unwrap_or_else(PoisonError::into_inner);
                t.pending.insert(seq);
                t.read_upto = seq;
            }
            let job = Job {
                broker: broker.clone(),
                namespace: namespace.clone(),
                trigger: name.clone(),
                broker_name: trigger.spec.broker.clone(),
                target: target.clone(),
                dead_letter: dead_letter.clone(),
                delivery: delivery.clone(),
            };
            let tracker = tracker.clone();
            deliveries.spawn(async move {
                job.run(event).await;
                tracker
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .pending
                    .remove(&seq);
                drop(permit);
            });
        }
    }
}

/// Everything one delivery needs.
struct Job {
    broker: EventBroker,
    namespace: String,
    trigger: String,
    broker_name: String,
    target: Arc<Target>,
    dead_letter: Option<Arc<Target>>,
    delivery: Arc<Delivery>,
}

impl Job {
    async fn run(self, mut event: Event) {
        let inner = &self.broker.inner;
        let labels = [self.namespace.as_str(), self.trigger.as_str()];
        let started = Instant::now();
        // The TTL is the broker's business: taken off for the subscriber, put back on its reply.
        let ttl = event.attributes.remove(TTL);
        let outcome = delivery::deliver(
            &inner.sender,
            &self.target,
            &event,
            &self.delivery,
            inner.config.default_timeout,
            |mut reply| {
                if let Some(ttl) = &ttl {
                    reply.attributes.insert(TTL.into(), ttl.clone());
                }
                let broker = self.broker.clone();
                let (namespace, name) = (self.namespace.clone(), self.broker_name.clone());
                async move {
                    match broker.ingest(&namespace, &name, vec![reply]).await {
                        Ok(_) | Err(IngestError::Expired) => Ok(()),
                        Err(error) => Err(error.to_string()),
                    }
                }
            },
        )
        .await;
        let attempts = match &outcome {
            Outcome::Delivered { attempts, .. } | Outcome::Failed { attempts, .. } => *attempts,
        };
        inner
            .metrics
            .retried
            .with_label_values(&labels)
            .inc_by(u64::from(attempts.saturating_sub(1)));
        let Outcome::Failed { code, body, .. } = outcome else {
            inner.metrics.delivered.with_label_values(&labels).inc();
            inner
                .metrics
                .latency
                .with_label_values(&labels)
                .observe(started.elapsed().as_secs_f64());
            return;
        };
        let Some(sink) = &self.dead_letter else {
            tracing::warn!(trigger = %self.trigger, id = %event.id(), code, attempts, "delivery failed; no dead-letter sink, the event is dropped");
            inner.metrics.failed.with_label_values(&labels).inc();
            return;
        };
        let failed = delivery::dead_letter(&event, &self.target, code, &body);
        let dead = delivery::deliver(
            &inner.sender,
            sink,
            &failed,
            &self.delivery,
            inner.config.default_timeout,
            |_| async { Ok(()) },
        )
        .await;
        if matches!(dead, Outcome::Delivered { .. }) {
            inner.metrics.dead_lettered.with_label_values(&labels).inc();
        } else {
            tracing::warn!(trigger = %self.trigger, id = %event.id(), "the dead-letter sink failed too; the event is dropped");
            inner.metrics.failed.with_label_values(&labels).inc();
        }
    }
}
