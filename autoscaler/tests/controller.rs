//! The controller against a fake actuator, under paused time: what it asks the runtime for,
//! and when, with no process and no clock.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use autoscaler::{ActuationError, Actuator, Controller, RevisionSpec, ServingState};
use crds::{Mode, Resource, load_str};
use mecha_common::activation::Poke;
use mecha_common::routing::ServiceKey;
use mecha_common::{Activation, Endpoint, EndpointTable, RevisionEndpoints, Shutdown};
use prometheus::{Registry, TextEncoder};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

const REVISION: &str = "hello-00001";

/// A runtime that records every step, fails as many as it is told to, and whose endpoints the
/// test publishes.
#[derive(Debug, Clone)]
struct FakeActuator {
    steps: mpsc::UnboundedSender<Step>,
    fail: Arc<Mutex<u32>>,
    ready: Arc<Mutex<HashSet<String>>>,
    endpoints: watch::Sender<Arc<EndpointTable>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Step {
    replicas: u32,
    at: Instant,
    ok: bool,
}

impl Actuator for FakeActuator {
    async fn scale(
        &self,
        revision: &Arc<RevisionSpec>,
        replicas: u32,
    ) -> Result<(), ActuationError> {
        assert_eq!(revision.name, REVISION, "only one revision exists");
        let ok = {
            let mut fail = self.fail.lock().expect("lock");
            let ok = *fail == 0;
            *fail = fail.saturating_sub(1);
            ok
        };
        let _ = self.steps.send(Step {
            replicas,
            at: Instant::now(),
            ok,
        });
        if ok {
            Ok(())
        } else {
            Err(ActuationError::Refused(
                "the object has been modified".into(),
            ))
        }
    }

    fn endpoints(&self) -> watch::Receiver<Arc<EndpointTable>> {
        self.endpoints.subscribe()
    }

    fn ever_ready(&self, revision: &str) -> bool {
        self.ready.lock().expect("lock").contains(revision)
    }
}

impl FakeActuator {
    /// One ready replica of the revision, as a runtime would report it.
    fn make_ready(&self) {
        self.ready.lock().expect("lock").insert(REVISION.into());
        let mut table = EndpointTable::default();
        table.set(
            REVISION.into(),
            RevisionEndpoints {
                ready: vec![Endpoint::standalone(
                    "hello-00001-1",
                    "127.0.0.1:9".parse().expect("addr"),
                )],
            },
        );
        self.endpoints.send_replace(Arc::new(table));
    }
}

struct Fixture {
    actuator: FakeActuator,
    steps: mpsc::UnboundedReceiver<Step>,
    state: watch::Sender<Arc<ServingState>>,
    activation: Activation,
    registry: Registry,
    board: autoscaler::StatusBoard,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<()>,
    start: Instant,
}

fn serving(annotations: &str) -> ServingState {
    let yaml = format!(
        "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: hello\nspec:\n  template:\n    metadata:\n      annotations: {{{annotations}}}\n    spec:\n      containers:\n        - command: [serve]\n"
    );
    let (mut loaded, errors) = load_str(Path::new("/tmp/hello.yaml"), &yaml, Mode::Local);
    assert!(errors.is_empty(), "{errors:?}");
    let loaded = loaded.remove(0);
    let Resource::Service(service) = loaded.resource else {
        panic!("not a service")
    };
    let mut state = ServingState::default();
    state.apply(service, loaded.source).expect("apply");
    state
}

/// A controller over `state` and a fake runtime that fails its first `fail` steps, running.
fn start(state: ServingState, fail: u32) -> Fixture {
    let (steps_tx, steps) = mpsc::unbounded_channel();
    let actuator = FakeActuator {
        steps: steps_tx,
        fail: Arc::new(Mutex::new(fail)),
        ready: Arc::default(),
        endpoints: watch::channel(Arc::default()).0,
    };
    let (state, state_rx) = watch::channel(Arc::new(state));
    let (activation, pokes) = Activation::new();
    let registry = Registry::new();
    let controller = Controller::new(
        state_rx,
        actuator.clone(),
        activation.clone(),
        pokes,
        "localhost",
        &registry,
    );
    let board = controller.status_board();
    let shutdown = Shutdown::new();
    let start = Instant::now();
    let task = tokio::spawn(controller.run(shutdown.signal()));
    Fixture {
        actuator,
        steps,
        state,
        activation,
        registry,
        board,
        shutdown,
        task,
        start,
    }
}

impl Fixture {
    async fn next(&mut self) -> Step {
        self.steps.recv().await.expect("the controller runs")
    }

    /// The next step that asks for a different count than `replicas`.
    async fn next_change(&mut self, replicas: u32) -> Step {
        loop {
            let step = self.next().await;
            if step.replicas != replicas {
                return step;
            }
        }
    }

    fn since_start(&self, step: Step) -> Duration {
        step.at - self.start
    }

    /// The value of the sample of `name` with every one of `labels`.
    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let text = TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .expect("metrics");
        text.lines()
            .filter(|line| line.starts_with(&format!("{name}{{")))
            .find(|line| {
                labels
                    .iter()
                    .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
            })
            .and_then(|line| line.rsplit(' ').next()?.parse().ok())
    }

    async fn stop(self) {
        self.shutdown.trigger();
        self.task.await.expect("the controller stops");
    }
}

#[tokio::test(start_paused = true)]
async fn scales_to_zero_after_the_grace_period_and_back_on_a_poke() {
    let mut fixture = start(serving(""), 0);
    // Initial scale 1, at once.
    let first = fixture.next().await;
    assert_eq!(
        (first.replicas, fixture.since_start(first)),
        (1, Duration::ZERO)
    );
    fixture.actuator.make_ready();

    // No traffic: down to zero, but not before the stable window (60 s) and the scale-to-zero
    // grace period (30 s) have shown that nothing comes.
    let zero = fixture.next_change(1).await;
    assert_eq!(zero.replicas, 0);
    let after = fixture.since_start(zero);
    assert!(
        after >= Duration::from_secs(30) && after <= Duration::from_secs(95),
        "scaled to zero after {after:?}"
    );
    fixture
        .actuator
        .endpoints
        .send_replace(Arc::new(EndpointTable::default()));

    // A caller holds 5 requests and pokes: scaled up at that very instant, not at a tick.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let poked = Instant::now();
    fixture.activation.poke(Poke {
        revision: REVISION.into(),
        waiting: 5,
    });
    let up = fixture.next_change(0).await;
    assert!(up.replicas >= 1, "{up:?}");
    assert_eq!(up.at, poked, "the poke decides at once");
    assert_eq!(
        fixture.metric(
            "mecha_autoscaler_activations_total",
            &[
                ("namespace", "default"),
                ("service", "hello"),
                ("revision", REVISION)
            ]
        ),
        Some(1.0)
    );

    // The Service goes away: its revision is retired to zero replicas.
    let mut state = (**fixture.state.borrow()).clone();
    assert!(state.delete(&ServiceKey::new("default", "hello")));
    fixture.state.send_replace(Arc::new(state));
    let retired = fixture.next_change(up.replicas).await;
    assert_eq!(retired.replicas, 0);
    assert!(fixture.board.get(REVISION).is_none());
    fixture.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_step_is_retried_with_backoff_and_shows_until_it_succeeds() {
    let mut fixture = start(serving("autoscaling.knative.dev/min-scale: \"2\""), 3);
    let mut times = Vec::new();
    for _ in 0..3 {
        let step = fixture.next().await;
        assert_eq!((step.replicas, step.ok), (2, false));
        times.push(fixture.since_start(step));
    }
    // 100 ms, then doubling — no retry in between, not even at the 1 s tick.
    assert_eq!(
        times,
        [
            Duration::ZERO,
            Duration::from_millis(100),
            Duration::from_millis(300)
        ]
    );
    let status = fixture.board.get(REVISION).expect("status");
    let error = status.actuation_error.expect("the failure shows");
    assert!(error.contains("the object has been modified"), "{error}");
    assert_eq!(
        fixture.metric(
            "mecha_autoscaler_actuation_failures_total",
            &[
                ("namespace", "default"),
                ("service", "hello"),
                ("revision", REVISION),
                ("reason", "refused")
            ]
        ),
        Some(3.0)
    );
    assert_eq!(
        fixture.metric(
            "mecha_autoscaler_actuation_failing",
            &[
                ("namespace", "default"),
                ("service", "hello"),
                ("revision", REVISION)
            ]
        ),
        Some(1.0)
    );

    let fourth = fixture.next().await;
    assert!(fourth.ok);
    assert_eq!(fixture.since_start(fourth), Duration::from_millis(700));
    let status = fixture.board.get(REVISION).expect("status");
    assert_eq!((status.desired, status.actuation_error), (2, None));
    assert_eq!(
        fixture.metric(
            "mecha_autoscaler_actuation_failing",
            &[
                ("namespace", "default"),
                ("service", "hello"),
                ("revision", REVISION)
            ]
        ),
        None,
        "no longer failing"
    );
    // Afterwards the count is simply applied again on every tick.
    let next = fixture.next().await;
    assert_eq!((next.replicas, next.ok), (2, true));
    assert_eq!(fixture.since_start(next), Duration::from_secs(1));
    fixture.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_backoff_doubles_up_to_its_cap() {
    let mut fixture = start(serving(""), 12);
    let mut last = fixture.next().await;
    let mut waits = Vec::new();
    for _ in 0..11 {
        let step = fixture.next().await;
        assert!(!step.ok);
        waits.push(step.at - last.at);
        last = step;
    }
    let ms = |n| Duration::from_millis(n);
    assert_eq!(
        waits,
        [
            ms(100),
            ms(200),
            ms(400),
            ms(800),
            ms(1600),
            ms(3200),
            ms(6400),
            ms(12800),
            ms(25600),
            ms(30000),
            ms(30000)
        ]
    );
    fixture.stop().await;
}
