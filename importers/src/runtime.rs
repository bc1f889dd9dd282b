//! [`Importers`]: runs one task per source of the current resources and follows their
//! changes (a changed source is stopped and started afresh; a removed one is stopped).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use crds::SourceResource;
use crds::eventing::{BackoffPolicy, Delivery, Format};
use crds::sources::{SinkAddress, SourcesSnapshot};
use eventing_broker::delivery::{self, HttpSender, Target};
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::Full;
use mecha_common::{Shutdown, ShutdownSignal};
use prometheus::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::context::{Health, SourceContext};
use crate::metrics::SourceMetrics;
use crate::sink::HttpSink;
use crate::source::{Running, SourceConfig};
use crate::state::{Key, SourcesState};
use crate::webhook::{Receiver, answer};

/// How often a source that could not start is tried again.
const RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct ImportersConfig {
    /// The gateway: sinks named by `ref` are reached through it.
    pub ingress: SocketAddr,
    /// Host suffix of Services (`localhost` locally).
    pub domain: String,
    /// Retries of every send to a sink.
    pub delivery: Delivery,
    /// Per attempt.
    pub timeout: Duration,
    /// Where ContainerSources' programs run (`None`: they cannot, and say so).
    pub processes: Option<Arc<dyn crate::bindings::Processes>>,
    /// The resources ApiServerSources watch (`None`: they cannot, and say so).
    pub objects: Option<watch::Receiver<Arc<crate::apiserver::Objects>>>,
    /// Where webhook receivers are reached, before their `/webhooks/…` path
    /// (`http://localhost:{ingress port}` unless set).
    pub webhook_base: String,
}

/// The running sources; cheap to clone.
#[derive(Debug, Clone)]
pub struct Importers {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: ImportersConfig,
    metrics: SourceMetrics,
    state: watch::Receiver<Arc<SourcesState>>,
    sender: HttpSender,
    /// Why a source does not run, by key; absent when it does.
    problems: Mutex<HashMap<Key, String>>,
    /// The running sources' own readiness, by key.
    health: Mutex<HashMap<Key, Health>>,
    /// The webhook receivers, by path.
    webhooks: RwLock<HashMap<String, Arc<Receiver>>>,
}

/// What `mecha get sources` shows of one source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceStatus {
    pub sink_uri: Option<String>,
    /// A webhook source's address.
    pub url: Option<String>,
    /// Why it does not run.
    pub problem: Option<String>,
    pub sent: u64,
    pub failed: u64,
}

struct Started {
    resource: SourceResource,
    /// The sink the control plane resolved, when it did: a change restarts the source.
    sink: Option<Result<SinkAddress, String>>,
    stop: Shutdown,
    task: Option<JoinHandle<()>>,
}

/// A resolved sink as the sender's target.
fn target(address: &SinkAddress) -> Result<Target, String> {
    Ok(Target {
        url: address.url.clone(),
        uri: address
            .uri
            .parse()
            .map_err(|e| format!("the sink {}: {e}", address.uri))?,
        host: address.host.clone(),
    })
}

/// Every source's sends, as Knative's PingSource sends: 5 retries, exponential from 50 ms
/// (about 1.5 s in all), binary mode; each attempt up to [`SEND_TIMEOUT`]. The importers and
/// the cluster's ApiServerSource adapter both send this way.
pub fn sink_delivery() -> Delivery {
    Delivery {
        retry: 5,
        backoff_policy: Some(BackoffPolicy::Exponential),
        backoff_delay: Some(Duration::from_millis(50)),
        timeout: None,
        retry_after_max: None,
        dead_letter_sink: None,
        format: Format::Binary,
    }
}

/// The longest one attempt of a send takes: a zero-scaled Service has that long to start.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);

// === impl ImportersConfig ===

impl ImportersConfig {
    /// Sends as [`sink_delivery`] says, each attempt up to [`SEND_TIMEOUT`].
    pub fn new(ingress: SocketAddr, domain: impl Into<String>) -> Self {
        Self {
            ingress,
            domain: domain.into(),
            delivery: sink_delivery(),
            timeout: SEND_TIMEOUT,
            processes: None,
            objects: None,
            webhook_base: format!("http://localhost:{}", ingress.port()),
        }
    }
}

// === impl Importers ===

impl Importers {
    pub fn new(
        state: watch::Receiver<Arc<SourcesState>>,
        config: ImportersConfig,
        registry: &Registry,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                metrics: SourceMetrics::new(registry),
                state,
                sender: HttpSender::new(),
                problems: Mutex::default(),
                health: Mutex::default(),
                webhooks: RwLock::default(),
            }),
        }
    }

    pub fn metrics(&self) -> &SourceMetrics {
        &self.inner.metrics
    }

    pub fn state(&self) -> Arc<SourcesState> {
        self.inner.state.borrow().clone()
    }

    /// Where a source's events go: as the control plane resolved it, when it did (the
    /// standalone importers), or through this runtime's gateway.
    pub fn sink(&self, source: &SourceResource) -> Result<Target, String> {
        let resolved = self
            .inner
            .state
            .borrow()
            .sinks
            .get(&SourcesState::key(source))
            .cloned();
        match resolved {
            Some(Ok(address)) => target(&address),
            Some(Err(why)) => Err(why),
            None => self.resolve_here(source),
        }
    }

    /// A source's sink resolved by this runtime: Brokers and Services through the gateway.
    pub fn resolve_here(&self, source: &SourceResource) -> Result<Target, String> {
        let config = &self.inner.config;
        delivery::resolve(
            source.sink(),
            source.namespace(),
            config.ingress,
            &config.domain,
        )
    }

    /// Every source of `state` with its sink as this runtime resolves it: what `mecha up`'s
    /// control plane streams to standalone importers.
    pub fn snapshot(&self, state: &SourcesState) -> SourcesSnapshot {
        state.snapshot(|source| {
            self.resolve_here(source).map(|target| SinkAddress {
                url: target.url,
                uri: target.uri.to_string(),
                host: target.host,
            })
        })
    }

    pub fn status(&self, source: &SourceResource) -> SourceStatus {
        let key = SourcesState::key(source);
        let (sent, failed) = self.inner.metrics.counts(&key.0, &key.1, &key.2);
        SourceStatus {
            sink_uri: self.sink(source).ok().map(|t| t.url),
            url: source
                .webhook_path()
                .map(|path| format!("{}{path}", self.inner.config.webhook_base)),
            problem: self.problems().get(&key).cloned().or_else(|| {
                let health = self.health().get(&key).cloned()?;
                health
                    .lock()
                    .map_or_else(|p| p.into_inner().clone(), |g| g.clone())
            }),
            sent,
            failed,
        }
    }

    fn problems(&self) -> std::sync::MutexGuard<'_, HashMap<Key, String>> {
        self.inner
            .problems
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Answers a request for `/webhooks/…`, its body read within `budget` (the listener's).
    pub async fn handle_webhook<B>(
        &self,
        budget: &mecha_common::BodyBudget,
        request: Request<B>,
    ) -> Response<Full<Bytes>>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let receiver = self
            .inner
            .webhooks
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(request.uri().path())
            .cloned();
        match receiver {
            Some(receiver) => receiver.handle(budget, request).await,
            None => answer(
                StatusCode::NOT_FOUND,
                &format!(
                    "no webhook source at {}: webhooks are at /webhooks/{{github|gitlab}}/{{namespace}}/{{name}}",
                    request.uri().path()
                ),
            ),
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Health>> {
        self.inner
            .health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn webhooks(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<Receiver>>> {
        self.inner
            .webhooks
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps `snapshots` current with [`snapshot`](Self::snapshot)s of the sources until
    /// `shutdown`: what a control plane serves on `/api/v1/sources/watch`. Only real changes
    /// are sent (each is a line to every reader).
    pub async fn publish(
        self,
        snapshots: watch::Sender<Arc<SourcesSnapshot>>,
        shutdown: ShutdownSignal,
    ) {
        let mut state = self.inner.state.clone();
        let stop = shutdown.recv();
        tokio::pin!(stop);
        loop {
            let next = self.snapshot(&state.borrow_and_update());
            snapshots.send_if_modified(|current| {
                let changed = **current != next;
                if changed {
                    *current = Arc::new(next);
                }
                changed
            });
            tokio::select! {
                changed = state.changed() => if changed.is_err() { return },
                () = &mut stop => return,
            }
        }
    }

    /// Starts the sources of the current resources before it returns (so a webhook source's
    /// receiver answers as soon as `mecha up` says it listens), then follows changes until
    /// `shutdown` in a task of its own.
    pub fn start(self, shutdown: ShutdownSignal) -> JoinHandle<()> {
        let mut state = self.inner.state.clone();
        let mut running: HashMap<Key, Started> = HashMap::new();
        let snapshot = state.borrow_and_update().clone();
        self.reconcile(&snapshot, &mut running);
        tokio::spawn(self.run(state, running, shutdown))
    }

    async fn run(
        self,
        mut state: watch::Receiver<Arc<SourcesState>>,
        mut running: HashMap<Key, Started>,
        shutdown: ShutdownSignal,
    ) {
        loop {
            let failing = !self.problems().is_empty();
            tokio::select! {
                changed = state.changed() => if changed.is_err() { break },
                // A source that could not start (its secret file or variable is missing) is
                // tried again, so providing the secret is enough to start it.
                () = tokio::time::sleep(RETRY), if failing => {
                    let problems = self.problems();
                    running.retain(|key, _| !problems.contains_key(key));
                }
                () = shutdown.clone().recv() => break,
            }
            let snapshot = state.borrow_and_update().clone();
            self.reconcile(&snapshot, &mut running);
        }
        for (_, run) in running {
            run.stop.trigger();
            if let Some(task) = run.task {
                let _ = task.await;
            }
        }
    }

    fn reconcile(&self, snapshot: &SourcesState, running: &mut HashMap<Key, Started>) {
        running.retain(|key, run| {
            let keep = snapshot.sources.get(key) == Some(&run.resource)
                && snapshot.sinks.get(key) == run.sink.as_ref();
            if !keep {
                run.stop.trigger();
                if let Some(task) = run.task.take() {
                    task.abort();
                }
                self.problems().remove(key);
                self.health().remove(key);
                if let Some(path) = run.resource.webhook_path() {
                    self.webhooks().remove(&path);
                }
                tracing::info!(kind = %key.0, source = %format!("{}/{}", key.1, key.2), "source stopped");
            }
            keep
        });
        for (key, resource) in &snapshot.sources {
            if running.contains_key(key) {
                continue;
            }
            let stop = Shutdown::new();
            let task = match self.build(key, resource, stop.signal()) {
                Ok(task) => {
                    if let Some(path) = resource.webhook_path() {
                        tracing::info!(kind = %key.0, source = %format!("{}/{}", key.1, key.2), url = %format!("{}{path}", self.inner.config.webhook_base), "webhook source listening; Mecha does not register webhooks (accessToken is not used): register this URL with the provider");
                    }
                    self.problems().remove(key);
                    tracing::info!(kind = %key.0, source = %format!("{}/{}", key.1, key.2), "source started");
                    task
                }
                Err(why) => {
                    let mut problems = self.problems();
                    if problems.get(key) != Some(&why) {
                        tracing::warn!(kind = %key.0, source = %format!("{}/{}", key.1, key.2), reason = %why, "source cannot start; trying again every {RETRY:?}");
                    }
                    problems.insert(key.clone(), why);
                    None
                }
            };
            running.insert(
                key.clone(),
                Started {
                    resource: resource.clone(),
                    sink: snapshot.sinks.get(key).cloned(),
                    stop,
                    task,
                },
            );
        }
    }

    fn build(
        &self,
        key: &Key,
        resource: &SourceResource,
        shutdown: ShutdownSignal,
    ) -> Result<Option<JoinHandle<()>>, String> {
        let target = self.sink(resource).map_err(|why| format!("sink: {why}"))?;
        let config = &self.inner.config;
        let sink_uri = target.url.clone();
        let sink = HttpSink::new(
            target,
            config.delivery.clone(),
            config.timeout,
            self.inner.sender.clone(),
        );
        let cx = SourceContext::new(
            key.clone(),
            shutdown,
            Arc::new(sink),
            resource.extensions(),
            self.inner.metrics.clone(),
        )
        .with_sink_uri(sink_uri)
        .with_processes(config.processes.clone())
        .with_objects(config.objects.clone());
        self.health().insert(key.clone(), cx.health());
        match resource.build(cx)? {
            Running::Task(task) => Ok(Some(task)),
            Running::Webhook(receiver) => {
                let path = resource.webhook_path().ok_or("not a webhook source")?;
                self.webhooks().insert(path, receiver);
                Ok(None)
            }
        }
    }
}
