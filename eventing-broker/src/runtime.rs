//! The running broker: ingestion into the log, one dispatcher task per trigger, and the
//! periodic maintenance of the log (consumer positions and retention, where the log wants it).
//!
//! Each trigger reads the log through a durable consumer of its own and delivers up to its
//! concurrency limit at once, so a slow or failing subscriber only ever holds back its own
//! trigger. An event is acknowledged only once it was handled (delivered, dead-lettered or
//! given up on by the rules); after a crash the log hands out again what was not, so an event
//! can be delivered twice but never lost (at-least-once). Which log it is — the embedded file
//! or NATS JetStream — is the log's business ([`crate::log::EventLog`]).
//!
//! A trigger's task that fails — the log cannot be read, or something it calls panics — is
//! caught by a supervisor of its own: the trigger turns not ready with the reason, and the task
//! is started again after a backoff (100 ms doubling to 30 s) from where it got.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crds::eventing::{Delivery, Destination};
use crds::{Broker, Trigger};
use futures_util::FutureExt as _;
use mecha_common::ShutdownSignal;
use prometheus::Registry;
use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::delivery::{self, HttpSender, Outcome, Target};
use crate::event::{Event, TTL};
use crate::filter::Filter;
use crate::log::redb::panic_message;
use crate::log::{Consumer, EventLog, LogError, Message, Record};
use crate::metrics::Metrics;
use crate::state::EventingState;

/// What a fresh event's `knativebrokerttl` is set to.
pub const DEFAULT_TTL: i32 = 255;
/// Events a trigger reads from the log at a time.
const READ_BATCH: usize = 256;
/// How often the log's maintenance runs (positions recorded, handled events removed).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
pub use crate::log::redb::CHECKPOINT_COUNT;
/// Wait before restarting a failed trigger task; doubled on each failure in a row.
const TRIGGER_RETRY: Duration = Duration::from_millis(100);
const MAX_TRIGGER_RETRY: Duration = Duration::from_secs(30);
/// The smallest body limit the HTTP binding allows an intermediary.
pub const MIN_EVENT_SIZE: usize = 64 * 1024;
/// The largest body limit the broker takes: an event is held whole in memory at every step
/// (the request body, its record, each delivery), and 16 MiB is well above what the transports
/// events come from carry by default (NATS and Kafka: 1 MiB).
pub const MAX_EVENT_SIZE: usize = 16 << 20;

/// Whether `size` is an allowed body limit ([`MIN_EVENT_SIZE`] to [`MAX_EVENT_SIZE`]); says
/// why not. The one check of `mecha up --max-event-size` and `BROKER_MAX_EVENT_SIZE`.
pub fn check_event_size(size: usize) -> Result<(), String> {
    if size < MIN_EVENT_SIZE {
        return Err(format!(
            "{size} is below the {MIN_EVENT_SIZE} bytes the CloudEvents HTTP binding requires brokers to accept"
        ));
    }
    if size > MAX_EVENT_SIZE {
        return Err(format!(
            "{size} is above the broker's largest event size, {MAX_EVENT_SIZE} bytes (16 MiB): every event is held whole in memory"
        ));
    }
    Ok(())
}

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
    /// Where Brokers named by `ref` (subscribers, dead-letter sinks) are posted instead of the
    /// gateway: the standalone broker's own ingress (any replica shares the log). `None` in
    /// `mecha up`, whose gateway port is the broker ingress too.
    pub broker_ingress: Option<SocketAddr>,
    /// Host suffix of Services (`localhost` locally).
    pub domain: String,
    /// How long deliveries in flight may go on after shutdown, once no new event is taken;
    /// then they are cut off, and their events, never acknowledged, are delivered again by
    /// whoever consumes the trigger next. Zero cuts them off at once (`mecha up`, whose
    /// gateway — the way to most subscribers — has stopped by then).
    pub drain_timeout: Duration,
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
    log: Arc<dyn EventLog>,
    metrics: Metrics,
    config: BrokerConfig,
    state: watch::Receiver<Arc<EventingState>>,
    sender: HttpSender,
    /// Why a trigger is not working, by `(namespace, name)`; absent when it is.
    problems: Mutex<HashMap<(String, String), String>>,
    /// Brokers (`namespace/name`) with a trigger whose consumer could not be made yet. They
    /// take no events: a trigger starts at its broker's head once it can, so an event accepted
    /// before would never reach it.
    unstarted: Mutex<std::collections::HashSet<String>>,
    /// Tests: every delivery panics, as a broken dependency would.
    panic_deliveries: std::sync::atomic::AtomicBool,
    /// Set once shutdown begins: trigger tasks take no more events and finish what they have.
    draining: watch::Sender<bool>,
    /// The log's maintenance failure last logged, so that one lasting (a full disk) is said
    /// once a minute, not every tick.
    maintenance_failure: Mutex<Quieted>,
}

/// A failure that repeats on every tick, said when it is new and then once every
/// [`Quieted::EVERY`]; readiness and metrics carry it in between.
#[derive(Debug, Default)]
struct Quieted {
    last: Option<(String, std::time::Instant)>,
}

impl Quieted {
    const EVERY: Duration = Duration::from_secs(60);

    /// Whether `failure` is to be logged at `now`: new, or last logged [`Quieted::EVERY`] ago.
    fn say(&mut self, failure: &str, now: std::time::Instant) -> bool {
        let due = match &self.last {
            Some((said, at)) => said != failure || now.duration_since(*at) >= Self::EVERY,
            None => true,
        };
        if due {
            self.last = Some((failure.to_string(), now));
        }
        due
    }

    /// The failure is over; whether one had been said.
    fn clear(&mut self) -> bool {
        self.last.take().is_some()
    }
}

/// One running trigger.
struct Running {
    trigger: Trigger,
    delivery: Delivery,
    broker_key: String,
    cursor_key: String,
    task: JoinHandle<()>,
}

// === impl EventBroker ===

impl EventBroker {
    pub fn new(
        log: Arc<dyn EventLog>,
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
                problems: Mutex::default(),
                unstarted: Mutex::default(),
                panic_deliveries: std::sync::atomic::AtomicBool::new(false),
                draining: watch::channel(false).0,
                maintenance_failure: Mutex::default(),
            }),
        }
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.inner.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn log(&self) -> &Arc<dyn EventLog> {
        &self.inner.log
    }

    pub fn state(&self) -> Arc<EventingState> {
        self.inner.state.borrow().clone()
    }

    /// Why the trigger `namespace/name` is not working (cannot start, its task failed and is
    /// being retried), or `None` when it runs.
    pub fn trigger_problem(&self, namespace: &str, name: &str) -> Option<String> {
        lock(&self.inner.problems)
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    #[doc(hidden)]
    pub fn inject_delivery_panics(&self, on: bool) {
        self.inner
            .panic_deliveries
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// What keeps the broker from working as a whole (its log cannot be read or written).
    pub fn problem(&self) -> Option<String> {
        self.inner.log.problem()
    }

    /// Records (or clears) a trigger's problem; returns whether it changed.
    fn set_trigger_problem(&self, key: &(String, String), problem: Option<String>) -> bool {
        let mut problems = lock(&self.inner.problems);
        let labels = [key.0.as_str(), key.1.as_str()];
        self.inner
            .metrics
            .trigger_ready
            .with_label_values(&labels)
            .set(i64::from(problem.is_none()));
        match problem {
            Some(why) => {
                if problems.get(key) == Some(&why) {
                    return false;
                }
                self.inner
                    .metrics
                    .trigger_failures
                    .with_label_values(&labels)
                    .inc();
                problems.insert(key.clone(), why);
                true
            }
            None => problems.remove(key).is_some(),
        }
    }

    /// Forgets a trigger that is gone: its problem and its readiness series.
    fn forget_trigger(&self, key: &(String, String)) {
        lock(&self.inner.problems).remove(key);
        let labels = [key.0.as_str(), key.1.as_str()];
        let _ = self
            .inner
            .metrics
            .trigger_ready
            .remove_label_values(&labels);
    }

    /// The URL users post events to.
    pub fn address(&self, namespace: &str, name: &str) -> String {
        delivery::broker_address(self.inner.config.ingress, namespace, name)
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
        let key = broker_key(namespace, name);
        if lock(&self.inner.unstarted).contains(&key) {
            return Err(IngestError::Log(LogError::Unavailable(format!(
                "a trigger of broker {key} has no position in the event log yet"
            ))));
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
            stored.push(Record {
                key: dedup_key(&event),
                data: crate::record::encode(&event),
            });
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
                    // Also retries triggers that could not start.
                    let snapshot = self.state();
                    self.settle(&snapshot, &mut running).await;
                    self.maintain(&snapshot).await;
                }
                () = self.inner.log.maintenance_due() => {
                    self.maintain(&self.state()).await;
                }
                () = &mut stop => break,
            }
        }
        self.drain(running).await;
        self.maintain(&self.state()).await;
        if let Err(error) = self.inner.log.close().await {
            tracing::warn!(%error, "closing the event log");
        }
    }

    /// Stops the trigger tasks: they take no more events and hand back (unacknowledged) what
    /// they took and did not start; deliveries in flight get `drain_timeout` to finish and are
    /// cut off after it.
    async fn drain(&self, running: HashMap<(String, String), Running>) {
        self.inner.draining.send_replace(true);
        // `None` once finished and awaited (a `JoinHandle` must not be polled again).
        let mut tasks: Vec<Option<JoinHandle<()>>> =
            running.into_values().map(|run| Some(run.task)).collect();
        let timeout = self.inner.config.drain_timeout;
        if !timeout.is_zero() {
            let started = Instant::now();
            let finished = tokio::time::timeout(timeout, async {
                for slot in &mut tasks {
                    if let Some(task) = slot {
                        let _ = task.await;
                    }
                    *slot = None;
                }
            })
            .await;
            match finished {
                Ok(()) => {
                    tracing::info!(took = ?started.elapsed(), "deliveries in flight finished")
                }
                Err(_) => tracing::warn!(
                    ?timeout,
                    "deliveries still in flight after the drain timeout are cut off; their events will be delivered again"
                ),
            }
        }
        for task in tasks.into_iter().flatten() {
            task.abort();
            let _ = task.await;
        }
    }

    fn draining(&self) -> watch::Receiver<bool> {
        self.inner.draining.subscribe()
    }

    /// Reconciles the trigger tasks with `snapshot`: stops what changed or went away (and
    /// forgets the consumers of triggers that are gone), then starts what is missing — each
    /// new trigger's consumer exists, at its broker's head, before this returns.
    async fn settle(
        &self,
        snapshot: &EventingState,
        running: &mut HashMap<(String, String), Running>,
    ) {
        let mut removed = Vec::new();
        running.retain(|key, run| {
            let keep = snapshot.triggers.get(key).is_some_and(|t| {
                *t == run.trigger
                    && t.delivery(snapshot.broker(t.namespace(), &t.spec.broker)) == run.delivery
                    && snapshot.broker(t.namespace(), &t.spec.broker).is_some()
            });
            if !keep {
                run.task.abort();
                if !snapshot.triggers.contains_key(key) {
                    self.forget_trigger(key);
                }
                let still_same_cursor = snapshot.triggers.get(key).is_some_and(|t| {
                    cursor_key(t) == run.cursor_key
                        && snapshot.broker(t.namespace(), &t.spec.broker).is_some()
                });
                if !still_same_cursor {
                    removed.push((run.broker_key.clone(), run.cursor_key.clone()));
                }
            }
            keep
        });
        for (broker, trigger) in removed {
            if let Err(error) = self.inner.log.remove_consumer(&broker, &trigger).await {
                tracing::warn!(%trigger, %error, "cannot remove the consumer of a trigger that is gone");
            }
        }
        let mut unstarted = std::collections::HashSet::new();
        for (key, trigger) in &snapshot.triggers {
            if running.contains_key(key) {
                continue;
            }
            let Some(broker) = snapshot.broker(trigger.namespace(), &trigger.spec.broker) else {
                continue;
            };
            match self.start_trigger(key, trigger, broker).await {
                Ok(run) => {
                    running.insert(key.clone(), run);
                }
                Err(error) => {
                    unstarted.insert(broker_key(trigger.namespace(), &trigger.spec.broker));
                    // Retried on every tick; said once per reason.
                    let why = format!("cannot start: {error}");
                    if self.set_trigger_problem(key, Some(why)) {
                        tracing::error!(trigger = %key.1, %error, "cannot start the trigger; retrying");
                    }
                }
            }
        }
        *lock(&self.inner.unstarted) = unstarted;
    }

    async fn start_trigger(
        &self,
        key: &(String, String),
        trigger: &Trigger,
        broker: &Broker,
    ) -> Result<Running, LogError> {
        let namespace = trigger.namespace().to_string();
        let broker_key = broker_key(&namespace, &trigger.spec.broker);
        let cursor_key = cursor_key(trigger);
        // A new trigger sees events from now on, as in Knative; a known one resumes, and
        // first redelivers what was in flight when it last stopped.
        let consumer = self.inner.log.consumer(&broker_key, &cursor_key).await?;
        let delivery = trigger.delivery(Some(broker));
        self.set_trigger_problem(key, None);
        let task = tokio::spawn(supervise(
            self.clone(),
            key.clone(),
            trigger.clone(),
            delivery.clone(),
            (broker_key.clone(), cursor_key.clone()),
            consumer,
        ));
        tracing::info!(trigger = %format!("{namespace}/{}", trigger.metadata.name), broker = %broker_key, "trigger started");
        Ok(Running {
            trigger: trigger.clone(),
            delivery,
            broker_key,
            cursor_key,
            task,
        })
    }

    /// The log's housekeeping (positions recorded, handled events removed) and the gauges it
    /// feeds.
    async fn maintain(&self, state: &EventingState) {
        let names: HashMap<String, (&str, &str)> = state
            .brokers
            .keys()
            .map(|(namespace, name)| {
                (
                    broker_key(namespace, name),
                    (namespace.as_str(), name.as_str()),
                )
            })
            .collect();
        let brokers: Vec<String> = names.keys().cloned().collect();
        match self.inner.log.maintain(&brokers).await {
            Ok(backlog) => {
                if lock(&self.inner.maintenance_failure).clear() {
                    tracing::info!("event log maintenance works again");
                }
                for (key, waiting) in backlog {
                    if let Some((namespace, name)) = names.get(&key) {
                        self.inner
                            .metrics
                            .log_events
                            .with_label_values(&[*namespace, *name])
                            .set(i64::try_from(waiting).unwrap_or(i64::MAX));
                    }
                }
            }
            // The log reports the failure to readiness.
            Err(error) => {
                let error = error.to_string();
                if lock(&self.inner.maintenance_failure).say(&error, std::time::Instant::now()) {
                    tracing::warn!(%error, "event log maintenance failed (said again in a minute while it lasts)");
                } else {
                    tracing::debug!(%error, "event log maintenance failed");
                }
            }
        }
        if let Some(size) = self.inner.log.size_bytes() {
            self.inner
                .metrics
                .log_bytes
                .set(i64::try_from(size).unwrap_or(i64::MAX));
        }
    }

    /// Where a destination's events go.
    pub fn resolve(&self, destination: &Destination, namespace: &str) -> Result<Target, String> {
        let config = &self.inner.config;
        let to_broker = destination
            .r#ref
            .as_ref()
            .is_some_and(|r| r.kind == crds::eventing::BROKER_KIND);
        let ingress = match config.broker_ingress {
            Some(own) if to_broker => own,
            _ => config.ingress,
        };
        delivery::resolve(destination, namespace, ingress, &config.domain)
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

/// What a log that deduplicates knows an event by: its `source` and `id`, which CloudEvents
/// makes unique together. Percent-encoded (no spaces, no control characters), so the space
/// between them is unambiguous and the key fits a header.
fn dedup_key(event: &Event) -> String {
    let (source, id) = (
        event.text("source").unwrap_or_default(),
        event.text("id").unwrap_or_default(),
    );
    let mut key = String::with_capacity(source.len() + id.len() + 1);
    crate::event::percent_encode_into(&mut key, source);
    key.push(' ');
    crate::event::percent_encode_into(&mut key, id);
    key
}

/// Runs a trigger's dispatch loop in a task of its own and starts it again when it fails (an
/// error it returns, or a panic anywhere under it): the trigger is not ready, with the reason,
/// until the loop reads the log again. Each run has a fresh consumer, which hands out again
/// what the failed run had not acknowledged. Aborting this task aborts the loop and its
/// deliveries (a `JoinSet` aborts what it holds when dropped).
async fn supervise(
    broker: EventBroker,
    key: (String, String),
    trigger: Trigger,
    delivery: Delivery,
    (broker_key, cursor_key): (String, String),
    consumer: Box<dyn Consumer>,
) {
    let mut backoff = TRIGGER_RETRY;
    let mut consumer = Some(consumer);
    let mut draining = broker.draining();
    loop {
        if *draining.borrow() {
            return;
        }
        let why = match consumer.take() {
            None => match broker.inner.log.consumer(&broker_key, &cursor_key).await {
                Ok(next) => {
                    consumer = Some(next);
                    continue;
                }
                Err(error) => format!("cannot read the event log: {error}"),
            },
            Some(consumer) => {
                let mut task = JoinSet::new();
                task.spawn(dispatch(
                    broker.clone(),
                    key.clone(),
                    trigger.clone(),
                    delivery.clone(),
                    consumer,
                ));
                match task.join_next().await {
                    // The log went away: `mecha up` is stopping.
                    None | Some(Ok(Ok(()))) => return,
                    Some(Ok(Err(why))) => why,
                    Some(Err(error)) if error.is_panic() => format!(
                        "its delivery task panicked: {}",
                        panic_message(&*error.into_panic())
                    ),
                    Some(Err(_)) => return,
                }
            }
        };
        // A failure after a healthy run starts the backoff afresh.
        if broker.trigger_problem(&key.0, &key.1).is_none() {
            backoff = TRIGGER_RETRY;
        }
        broker.set_trigger_problem(&key, Some(why.clone()));
        if *draining.borrow() {
            return;
        }
        tracing::error!(trigger = %format!("{}/{}", key.0, key.1), reason = %why, "trigger failed; retrying in {backoff:?}");
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = drained(&mut draining) => return,
        }
        backoff = (backoff * 2).min(MAX_TRIGGER_RETRY);
    }
}

/// One trigger's dispatch loop: take events from the consumer (first what was in flight when
/// the trigger last stopped), filter, deliver with bounded concurrency, acknowledge each once
/// handled. Returns an error when it cannot go on.
async fn dispatch(
    broker: EventBroker,
    key: (String, String),
    trigger: Trigger,
    delivery: Delivery,
    mut consumer: Box<dyn Consumer>,
) -> Result<(), String> {
    let namespace = trigger.namespace().to_string();
    let name = trigger.metadata.name.clone();
    let filter = Filter::for_trigger(&trigger);
    let target = broker
        .resolve(&trigger.spec.subscriber, &namespace)
        .map(Arc::new)
        .map_err(|error| format!("cannot resolve the subscriber: {error}"))?;
    let dead_letter = delivery
        .dead_letter_sink
        .as_ref()
        .and_then(|sink| broker.resolve(sink, &namespace).ok())
        .map(Arc::new);
    let job = Job {
        broker: broker.clone(),
        namespace: namespace.clone(),
        trigger: name.clone(),
        broker_name: trigger.spec.broker.clone(),
        target,
        dead_letter,
        delivery: Arc::new(delivery),
    };
    let permits = Arc::new(Semaphore::new(broker.inner.config.concurrency.max(1)));
    let mut deliveries = JoinSet::new();
    // A delivery that panics says so here. The loop waits on this and on the consumer, not on
    // the deliveries themselves: a `fetch` is abandoned only when the loop fails anyway, since
    // a log whose fetch pulls from a server loses (until their deadline) what an abandoned
    // one had pulled.
    let (panicked_tx, mut panicked) = tokio::sync::mpsc::unbounded_channel();
    let mut healthy = false;
    let mut draining = broker.draining();
    loop {
        while let Some(finished) = deliveries.try_join_next() {
            delivery_failed(finished)?;
        }
        // No more than can be delivered at once: an event waiting here for a free slot is
        // not yet being worked on, which a log with acknowledgement deadlines would not know.
        let max = READ_BATCH.min(permits.available_permits()).max(1);
        let batch = tokio::select! {
            batch = consumer.fetch(max) => {
                batch.map_err(|error| format!("cannot read the event log: {error}"))?
            }
            Some(why) = panicked.recv() => {
                return Err(format!("a delivery panicked: {why}"));
            }
            _ = drained(&mut draining) => {
                return finish(deliveries).await;
            }
        };
        if !healthy {
            // Reading works: whatever made the trigger fail before has gone away.
            healthy = true;
            if broker.set_trigger_problem(&key, None) {
                tracing::info!(trigger = %format!("{namespace}/{name}"), "trigger recovered");
            }
        }
        for message in batch {
            let Some(event) =
                decode(&name, message.seq, &message.data).filter(|e| filter.matches(e))
            else {
                // Not for this trigger (or never deliverable): handled.
                ack(&name, message).await;
                continue;
            };
            if *draining.borrow() {
                message.release().await;
                continue;
            }
            let permit = tokio::select! {
                biased;
                permit = permits.clone().acquire_owned() => permit,
                _ = drained(&mut draining) => {
                    // Not started: handed back at once, for whoever consumes the trigger next.
                    message.release().await;
                    continue;
                }
            };
            let Ok(permit) = permit else {
                return Ok(());
            };
            spawn_delivery(&mut deliveries, &job, message, event, permit, &panicked_tx);
        }
        if *draining.borrow() {
            return finish(deliveries).await;
        }
    }
}

/// Resolves once the broker drains. (The watch's guard is dropped here, not held in the
/// caller's future, which must stay `Send`.)
async fn drained(draining: &mut watch::Receiver<bool>) {
    let _ = draining.wait_for(|draining| *draining).await;
}

/// Draining: lets the deliveries in flight finish (each acknowledges its event when it is
/// done); the broker cuts them off after its drain timeout.
async fn finish(mut deliveries: JoinSet<()>) -> Result<(), String> {
    while deliveries.join_next().await.is_some() {}
    Ok(())
}

/// Acknowledges a handled event. A lost acknowledgement only means the event is handed out
/// again (at-least-once), so it is logged, not fatal.
async fn ack(trigger: &str, message: Message) {
    let seq = message.seq;
    if let Err(error) = message.ack().await {
        tracing::warn!(%trigger, seq, %error, "cannot acknowledge an event; it may be delivered again");
    }
}

/// A delivery that panicked fails the whole trigger task: its event would otherwise stay
/// unacknowledged for ever and hold its trigger back without anyone knowing.
fn delivery_failed(finished: Result<(), tokio::task::JoinError>) -> Result<(), String> {
    match finished {
        Err(error) if error.is_panic() => Err(format!(
            "a delivery panicked: {}",
            panic_message(&*error.into_panic())
        )),
        _ => Ok(()),
    }
}

/// An event as stored; an unreadable one is logged and skipped (it can never be delivered).
fn decode(trigger: &str, seq: u64, bytes: &bytes::Bytes) -> Option<Event> {
    match crate::record::decode(bytes) {
        Ok(event) => Some(event),
        Err(error) => {
            tracing::error!(%trigger, seq, %error, "skipping an unreadable event in the log");
            None
        }
    }
}

/// Delivers `message`'s event and acknowledges it once handled; a panic is reported to the
/// dispatch loop (and the event stays unacknowledged).
fn spawn_delivery(
    deliveries: &mut JoinSet<()>,
    job: &Job,
    message: Message,
    event: Event,
    permit: tokio::sync::OwnedSemaphorePermit,
    panicked: &tokio::sync::mpsc::UnboundedSender<String>,
) {
    let (job, panicked) = (job.clone(), panicked.clone());
    deliveries.spawn(async move {
        let trigger = job.trigger.clone();
        match AssertUnwindSafe(job.run(event)).catch_unwind().await {
            Ok(()) => ack(&trigger, message).await,
            Err(panic) => {
                let _ = panicked.send(panic_message(&*panic));
            }
        }
        drop(permit);
    });
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Everything one delivery needs.
#[derive(Clone)]
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
        assert!(
            !inner
                .panic_deliveries
                .load(std::sync::atomic::Ordering::Relaxed),
            "injected delivery panic"
        );
        let labels = [self.namespace.as_str(), self.trigger.as_str()];
        let started = Instant::now();
        // The TTL is the broker's business: taken off for the subscriber, put back on its reply.
        let ttl = event.attributes.remove(TTL);
        let trace_id = event.trace_id().unwrap_or_default();
        tracing::debug!(trigger = %self.trigger, id = %event.id(), %trace_id, target = %self.target.url, "delivering an event");
        let outcome = delivery::deliver(
            &inner.sender,
            &self.target,
            &event,
            &self.delivery,
            inner.config.default_timeout,
            |mut reply| {
                // What a function answers belongs to the trace of what it was sent.
                reply.inherit_trace(&event);
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
            tracing::debug!(trigger = %self.trigger, id = %event.id(), %trace_id, target = %self.target.url, attempts, "event delivered");
            inner.metrics.delivered.with_label_values(&labels).inc();
            inner
                .metrics
                .latency
                .with_label_values(&labels)
                .observe(started.elapsed().as_secs_f64());
            return;
        };
        let Some(sink) = &self.dead_letter else {
            tracing::warn!(trigger = %self.trigger, id = %event.id(), %trace_id, code, attempts, "delivery failed; no dead-letter sink, the event is dropped");
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
            tracing::debug!(trigger = %self.trigger, id = %event.id(), %trace_id, sink = %sink.url, code, "event dead-lettered");
            inner.metrics.dead_lettered.with_label_values(&labels).inc();
        } else {
            tracing::warn!(trigger = %self.trigger, id = %event.id(), %trace_id, "the dead-letter sink failed too; the event is dropped");
            inner.metrics.failed.with_label_values(&labels).inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lasting_failure_is_said_when_new_then_once_a_minute() {
        let start = std::time::Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut quiet = Quieted::default();
        assert!(quiet.say("disk full", at(0)), "new");
        // Every tick (250 ms) for most of a minute: quiet.
        assert!((1..240).all(|tick| !quiet.say("disk full", at(tick * 250))));
        assert!(quiet.say("disk full", at(60_000)), "a minute later");
        assert!(
            quiet.say("permission denied", at(60_250)),
            "another failure"
        );
        assert!(quiet.clear(), "it had been said");
        assert!(!quiet.clear());
        assert!(
            quiet.say("disk full", at(60_500)),
            "new again after it was over"
        );
    }
}
