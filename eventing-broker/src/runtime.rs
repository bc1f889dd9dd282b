//! The running broker: ingestion into the log, one dispatcher task per trigger, and the
//! checkpointer that records cursors and removes events every trigger has handled.
//!
//! Each trigger reads the log on its own from its own cursor and delivers up to its
//! concurrency limit at once, so a slow or failing subscriber only ever holds back its own
//! trigger. The cursor it records is the highest sequence below which every event was handled
//! (delivered, dead-lettered or given up on); after a crash delivery resumes there, so an event
//! can be delivered twice but never lost (at-least-once).
//!
//! A trigger's task that fails — the log cannot be read, or something it calls panics — is
//! caught by a supervisor of its own: the trigger turns not ready with the reason, and the task
//! is started again after a backoff (100 ms doubling to 30 s) from where it got.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crds::eventing::{Delivery, Destination};
use crds::{Broker, Trigger};
use mecha_common::ShutdownSignal;
use prometheus::Registry;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::delivery::{self, HttpSender, Outcome, Target};
use crate::event::{Event, TTL};
use crate::filter::Filter;
use crate::log::{EventLog, LogError, Progress, panic_message};
use crate::metrics::Metrics;
use crate::state::EventingState;

/// What a fresh event's `knativebrokerttl` is set to.
pub const DEFAULT_TTL: i32 = 255;
/// Events a trigger reads from the log at a time.
const READ_BATCH: usize = 256;
/// How often cursors are recorded and handled events removed.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// A trigger that has finished this many events since its last checkpoint asks for one at
/// once, so that under load checkpoints keep pace by count, not only by time; with the time
/// rule this bounds what a crash redelivers (see the crate's docs in docs/architecture.md).
pub const CHECKPOINT_COUNT: usize = 256;
/// Wait before restarting a failed trigger task; doubled on each failure in a row.
const TRIGGER_RETRY: Duration = Duration::from_millis(100);
const MAX_TRIGGER_RETRY: Duration = Duration::from_secs(30);
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
    /// Why a trigger is not working, by `(namespace, name)`; absent when it is.
    problems: Mutex<HashMap<(String, String), String>>,
    /// Wakes the checkpointer before its tick (a trigger reached [`CHECKPOINT_COUNT`]).
    checkpoint_now: Notify,
    /// Tests: every delivery panics, as a broken dependency would.
    panic_deliveries: std::sync::atomic::AtomicBool,
}

/// A trigger's progress through its broker's log.
#[derive(Debug, Default)]
struct Tracker {
    /// The last sequence read (every event up to it was either skipped or dispatched).
    read_upto: u64,
    /// Dispatched and not finished.
    pending: BTreeSet<u64>,
    /// Events finished since the last checkpoint took a snapshot.
    unchecked: usize,
}

/// One running trigger.
struct Running {
    trigger: Trigger,
    delivery: Delivery,
    broker_key: String,
    cursor_key: String,
    tracker: Arc<Mutex<Tracker>>,
    task: JoinHandle<()>,
    /// What the last checkpoint recorded; `None` forces the next one to record.
    saved: Option<Progress>,
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
                problems: Mutex::default(),
                checkpoint_now: Notify::new(),
                panic_deliveries: std::sync::atomic::AtomicBool::new(false),
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
                    // Also retries triggers that could not start.
                    let snapshot = self.state();
                    self.settle(&snapshot, &mut running).await;
                    self.checkpoint(&snapshot, &mut running, Vec::new()).await;
                }
                () = self.inner.checkpoint_now.notified() => {
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
                if !state.triggers.contains_key(key) {
                    self.forget_trigger(key);
                }
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
            match self.start_trigger(key, trigger, broker) {
                Ok(run) => {
                    running.insert(key.clone(), run);
                    started = true;
                }
                Err(error) => {
                    // Retried on every checkpoint tick; said once per reason.
                    let why = format!("cannot start: {error}");
                    if self.set_trigger_problem(key, Some(why)) {
                        tracing::error!(trigger = %key.1, %error, "cannot start the trigger; retrying");
                    }
                }
            }
        }
        (removed, started)
    }

    fn start_trigger(
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
        let progress = match self.inner.log.progress(&cursor_key)? {
            Some(progress) => progress,
            None => Progress {
                read_upto: self.inner.log.head(&broker_key),
                pending: Vec::new(),
            },
        };
        let cursor = progress.cursor();
        let tracker = Arc::new(Mutex::new(Tracker {
            read_upto: progress.read_upto,
            pending: progress.pending.into_iter().collect(),
            unchecked: 0,
        }));
        let delivery = trigger.delivery(Some(broker));
        self.set_trigger_problem(key, None);
        let task = tokio::spawn(supervise(
            self.clone(),
            key.clone(),
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
            saved: None,
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
            let progress = {
                let mut tracker = lock(&run.tracker);
                tracker.unchecked = 0;
                Progress {
                    read_upto: tracker.read_upto,
                    pending: tracker.pending.iter().copied().collect(),
                }
            };
            let committed = progress.cursor();
            if run.saved.as_ref() != Some(&progress) {
                set.push((run.cursor_key.clone(), progress.clone()));
                run.saved = Some(progress);
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
        let recorded: Vec<String> = set.iter().map(|(key, _)| key.clone()).collect();
        let truncating: Vec<String> = truncate.iter().map(|(key, _)| key.clone()).collect();
        if let Err(error) = self.inner.log.checkpoint(set, removed, truncate).await {
            // Nothing of it was written: make the next checkpoint try all of it again. The
            // log reports the failure to readiness.
            tracing::warn!(%error, "cannot record trigger cursors");
            for run in running.values_mut() {
                if recorded.contains(&run.cursor_key) {
                    run.saved = None;
                }
            }
            let mut truncated = lock(&self.inner.truncated);
            for key in truncating {
                truncated.remove(&key);
            }
        }
        self.inner
            .metrics
            .log_bytes
            .set(i64::try_from(self.inner.log.file_size()).unwrap_or(i64::MAX));
    }

    /// Where a destination's events go.
    pub fn resolve(&self, destination: &Destination, namespace: &str) -> Result<Target, String> {
        let config = &self.inner.config;
        delivery::resolve(destination, namespace, config.ingress, &config.domain)
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

/// Runs a trigger's dispatch loop in a task of its own and starts it again when it fails (an
/// error it returns, or a panic anywhere under it): the trigger is not ready, with the reason,
/// until the loop reads the log again. Aborting this task aborts the loop and its deliveries
/// (a `JoinSet` aborts what it holds when dropped).
async fn supervise(
    broker: EventBroker,
    key: (String, String),
    trigger: Trigger,
    delivery: Delivery,
    broker_key: String,
    tracker: Arc<Mutex<Tracker>>,
) {
    let mut backoff = TRIGGER_RETRY;
    loop {
        let mut task = JoinSet::new();
        task.spawn(dispatch(
            broker.clone(),
            key.clone(),
            trigger.clone(),
            delivery.clone(),
            broker_key.clone(),
            tracker.clone(),
        ));
        let why = match task.join_next().await {
            // The log went away: `mecha up` is stopping.
            None | Some(Ok(Ok(()))) => return,
            Some(Ok(Err(why))) => why,
            Some(Err(error)) if error.is_panic() => format!(
                "its delivery task panicked: {}",
                panic_message(&*error.into_panic())
            ),
            Some(Err(_)) => return,
        };
        // A failure after a healthy run starts the backoff afresh.
        if broker.trigger_problem(&key.0, &key.1).is_none() {
            backoff = TRIGGER_RETRY;
        }
        broker.set_trigger_problem(&key, Some(why.clone()));
        tracing::error!(trigger = %format!("{}/{}", key.0, key.1), reason = %why, "trigger failed; retrying in {backoff:?}");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_TRIGGER_RETRY);
    }
}

/// One trigger's dispatch loop: redeliver what was in flight when it last stopped, then read,
/// filter, deliver with bounded concurrency. Returns an error when it cannot go on.
async fn dispatch(
    broker: EventBroker,
    key: (String, String),
    trigger: Trigger,
    delivery: Delivery,
    broker_key: String,
    tracker: Arc<Mutex<Tracker>>,
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
    let mut head = broker.inner.log.subscribe(&broker_key);
    let mut deliveries = JoinSet::new();
    // Whatever was pending is not in flight any more (a crash, or the previous task failed):
    // deliver it again first.
    let (redo, mut next) = {
        let tracker = lock(&tracker);
        (
            tracker.pending.iter().copied().collect::<Vec<u64>>(),
            tracker.read_upto,
        )
    };
    for seq in redo {
        let bytes = broker
            .inner
            .log
            .read_one(&broker_key, seq)
            .map_err(|error| format!("cannot read the event log: {error}"))?;
        let event =
            bytes.and_then(|bytes| decode(&name, seq, &bytes).filter(|e| filter.matches(e)));
        let Some(event) = event else {
            lock(&tracker).pending.remove(&seq);
            continue;
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return Ok(());
        };
        spawn_delivery(&mut deliveries, &broker, &job, &tracker, seq, event, permit);
    }
    let mut healthy = false;
    loop {
        while let Some(finished) = deliveries.try_join_next() {
            delivery_failed(finished)?;
        }
        head.borrow_and_update();
        let batch = broker
            .inner
            .log
            .read(&broker_key, next, READ_BATCH)
            .map_err(|error| format!("cannot read the event log: {error}"))?;
        if !healthy {
            // Reading works: whatever made the trigger fail before has gone away.
            healthy = true;
            if broker.set_trigger_problem(&key, None) {
                tracing::info!(trigger = %format!("{namespace}/{name}"), "trigger recovered");
            }
        }
        if batch.is_empty() {
            tokio::select! {
                changed = head.changed() => if changed.is_err() { return Ok(()) },
                Some(finished) = deliveries.join_next(), if !deliveries.is_empty() => {
                    delivery_failed(finished)?;
                }
            }
            continue;
        }
        for (seq, bytes) in batch {
            next = seq;
            let Some(event) = decode(&name, seq, &bytes).filter(|e| filter.matches(e)) else {
                lock(&tracker).read_upto = seq;
                continue;
            };
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return Ok(());
            };
            {
                let mut t = lock(&tracker);
                t.pending.insert(seq);
                t.read_upto = seq;
            }
            spawn_delivery(&mut deliveries, &broker, &job, &tracker, seq, event, permit);
        }
    }
}

/// A delivery that panicked fails the whole trigger task: its event would otherwise stay
/// pending for ever and hold the cursor back without anyone knowing.
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
fn decode(trigger: &str, seq: u64, bytes: &[u8]) -> Option<Event> {
    let event = serde_json::from_slice(bytes)
        .map_err(|e| e.to_string())
        .and_then(|json| Event::from_json(json).map_err(|e| e.to_string()));
    match event {
        Ok(event) => Some(event),
        Err(error) => {
            tracing::error!(%trigger, seq, %error, "skipping an unreadable event in the log");
            None
        }
    }
}

/// Delivers `seq` (already in the tracker's pending set) and marks it finished; asks for a
/// checkpoint once enough have finished since the last one.
fn spawn_delivery(
    deliveries: &mut JoinSet<()>,
    broker: &EventBroker,
    job: &Job,
    tracker: &Arc<Mutex<Tracker>>,
    seq: u64,
    event: Event,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let (job, tracker, broker) = (job.clone(), tracker.clone(), broker.clone());
    deliveries.spawn(async move {
        job.run(event).await;
        let due = {
            let mut t = lock(&tracker);
            t.pending.remove(&seq);
            t.unchecked += 1;
            t.unchecked >= CHECKPOINT_COUNT
        };
        if due {
            broker.inner.checkpoint_now.notify_one();
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
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

    use super::*;
    use crate::log::Fault;

    /// A keep-alive subscriber that answers 202 and counts what it got.
    async fn subscriber() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let count = Arc::new(AtomicUsize::new(0));
        let counted = count.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let mut stream = BufReader::new(stream);
                    loop {
                        let mut length = 0;
                        loop {
                            let mut line = String::new();
                            if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if line == "\r\n" {
                                break;
                            }
                            let lower = line.to_ascii_lowercase();
                            if let Some(v) = lower.strip_prefix("content-length:") {
                                length = v.trim().parse().unwrap_or(0);
                            }
                        }
                        let mut body = vec![0; length];
                        if stream.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        counted.fetch_add(1, Ordering::SeqCst);
                        let answer = b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n";
                        if stream.get_mut().write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, count)
    }

    fn state(subscriber: SocketAddr) -> EventingState {
        let yaml = format!(
            "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata:\n  name: b\n---\napiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata:\n  name: t\nspec:\n  broker: b\n  subscriber:\n    uri: http://{subscriber}/\n"
        );
        let (loaded, errors) = crds::load_str(Path::new("/tmp/t.yaml"), &yaml, crds::Mode::Local);
        assert!(errors.is_empty(), "{errors:?}");
        let mut state = EventingState::default();
        for loaded in loaded {
            match loaded.resource {
                crds::Resource::Broker(b) => {
                    state.apply_broker(b);
                }
                crds::Resource::Trigger(t) => {
                    state.apply_trigger(t);
                }
                _ => {}
            }
        }
        state
    }

    fn event(id: &str) -> Event {
        let json = serde_json::json!({"specversion": "1.0", "id": id, "source": "/t", "type": "t"});
        Event::from_json(json).expect("event")
    }

    async fn until(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_trigger_is_not_ready_with_the_reason_and_recovers() {
        let dir = std::env::temp_dir().join(format!("mecha-runtime-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let log = EventLog::open(&dir.join("events.redb")).expect("open");
        let (addr, received) = subscriber().await;
        let (_state_tx, state_rx) = watch::channel(Arc::new(state(addr)));
        let registry = Registry::new();
        let broker = EventBroker::new(
            log.clone(),
            state_rx,
            BrokerConfig {
                max_event_size: MIN_EVENT_SIZE,
                default_timeout: Duration::from_secs(5),
                concurrency: 4,
                ingress: addr,
                domain: "localhost".into(),
            },
            &registry,
        );
        let shutdown = mecha_common::Shutdown::new();
        let task = broker.clone().start(shutdown.signal()).await;
        let ready = || {
            broker
                .metrics()
                .trigger_ready
                .with_label_values(&["default", "t"])
                .get()
        };
        broker
            .ingest("default", "b", vec![event("1")])
            .await
            .expect("ingest");
        until("the first event", || received.load(Ordering::SeqCst) == 1).await;
        assert_eq!(broker.trigger_problem("default", "t"), None);

        // A dependency of delivery panics: the trigger says so, and delivers once it stops.
        broker.inject_delivery_panics(true);
        broker
            .ingest("default", "b", vec![event("2")])
            .await
            .expect("ingest");
        until("the trigger to report the panic", || {
            broker
                .trigger_problem("default", "t")
                .is_some_and(|p| p.contains("injected delivery panic"))
        })
        .await;
        assert_eq!(ready(), 0);
        broker.inject_delivery_panics(false);
        until("the event delivered after recovery", || {
            received.load(Ordering::SeqCst) == 2
        })
        .await;
        until("the trigger ready again", || {
            broker.trigger_problem("default", "t").is_none()
        })
        .await;
        assert_eq!(ready(), 1);

        // The log cannot be read: the trigger and the broker both say so, until it can.
        log.inject_fault(Fault::ReadError);
        broker
            .ingest("default", "b", vec![event("3")])
            .await
            .expect("the writer still works");
        until("the read failure reported", || {
            broker
                .trigger_problem("default", "t")
                .is_some_and(|p| p.contains("cannot read the event log"))
        })
        .await;
        assert!(
            broker
                .problem()
                .is_some_and(|p| p.contains("cannot read default/b")),
            "{:?}",
            broker.problem()
        );
        log.inject_fault(Fault::None);
        until("the event delivered after the log heals", || {
            received.load(Ordering::SeqCst) == 3
        })
        .await;
        until("everything ready again", || {
            broker.trigger_problem("default", "t").is_none() && broker.problem().is_none()
        })
        .await;
        let failures = broker
            .metrics()
            .trigger_failures
            .with_label_values(&["default", "t"])
            .get();
        assert_eq!(failures, 2);
        shutdown.trigger();
        task.await.expect("broker task");
    }
}
