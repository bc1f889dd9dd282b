//! A byte budget for the request bodies a listener holds in memory at once.
//!
//! The ports that answer requests themselves (the broker ingress, the webhook receivers, and
//! `mecha up`'s gateway port, which serves both) read each body whole before they can check it:
//! a webhook's signature covers the raw body, an event is parsed from it. Without a bound on
//! their sum, memory is connections × largest body, for anyone who can open connections. With
//! one, it is the budget: [`BodyBudget::collect`] takes budget as the body's buffer grows —
//! as chunks arrive, whatever the `Content-Length` says (a chunked body has none) — and the
//! [`Buffered`] body gives it back when it is dropped. A server that reads the body itself
//! (the data path's fast path) feeds it to [`BodyBudget::start`]'s [`Collecting`] instead,
//! which `collect` is built on: the same rules either way.
//!
//! The rules, in this one place for every such port:
//! - a declared `Content-Length` above the request's maximum: 413 before a byte is read; a
//!   body that grows past it: 413;
//! - the budget exhausted: 503 with `Retry-After` at once, never a wait (why: see
//!   `docs/architecture.md`, "Request bodies in memory");
//! - a body that does not arrive whole within the body timeout: 408, its budget freed (the
//!   listener's pause timeout frees it sooner for a sender that stops);
//! - the client going away mid-body: its budget is freed as the read fails.
//!
//! What is counted is the buffer's capacity, not only its length, so the budget bounds the
//! memory the bodies take (a buffer grows by doubling up to the declared length or the
//! maximum). Per listener, metrics say the budget, the bytes in use, and the requests refused
//! for budget or for time.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body::Body;
use http_body_util::{BodyExt as _, Full};
use prometheus::{IntCounter, IntGauge, Opts, Registry};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::settings::{self, ConfigError};

/// The budget when none is set: 64 MiB per listener. The component Deployments in `deploy/`
/// allow 256 MiB (importers) and 512 MiB (broker); this leaves room for everything else.
pub const DEFAULT_BYTES: usize = 64 << 20;
/// The largest budget that can be set.
pub const MAX_BYTES: usize = 1 << 30;
/// How long a body may take to arrive whole when nothing is set.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// The bounds of the body timeout.
pub const MIN_TIMEOUT: Duration = Duration::from_secs(1);
pub const MAX_TIMEOUT: Duration = Duration::from_secs(600);
/// What a refusal for budget tells the sender: try again in a second.
pub const RETRY_AFTER: &str = "1";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A listener's budget settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetSettings {
    /// Bytes of request bodies held at once.
    pub bytes: usize,
    /// How long a body may take to arrive whole.
    pub body_timeout: Duration,
}

/// The budget of one listener; clones share it.
#[derive(Debug, Clone)]
pub struct BodyBudget {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: BudgetSettings,
    /// One permit per byte.
    bytes: Semaphore,
    in_use: IntGauge,
    refused: IntCounter,
    timed_out: IntCounter,
}

/// Budget taken by one body; given back when dropped.
#[derive(Debug)]
pub struct Held {
    inner: Arc<Inner>,
    bytes: usize,
}

/// A whole request body, holding its budget until it is dropped. Handlers keep it until they
/// have answered, so what they make of the body (a parsed event) is bounded by the budget as
/// well.
#[derive(Debug)]
pub struct Buffered {
    bytes: Bytes,
    held: Held,
}

/// Why a body was not buffered; each is one status.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// 413.
    #[error("the request body is larger than the {limit}-byte limit")]
    TooLarge { limit: usize },
    /// 503 with `Retry-After`.
    #[error(
        "too many request bodies are arriving at once: this port holds at most {budget} bytes of them; retry in a moment"
    )]
    Busy { budget: usize },
    /// 408.
    #[error("the request body did not arrive whole within {0:?}")]
    Timeout(Duration),
    /// 400: the body broke off or broke its framing.
    #[error("cannot read the request body: {0}")]
    Read(BoxError),
}

// === impl BudgetSettings ===

impl Default for BudgetSettings {
    fn default() -> Self {
        Self {
            bytes: DEFAULT_BYTES,
            body_timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl BudgetSettings {
    /// Reads the budget from `bytes_setting` and the body timeout from `timeout_setting`.
    /// `floor` is the largest body the listener takes: a smaller budget could never take one.
    pub fn from_env(
        get: &impl Fn(&str) -> Option<String>,
        bytes_setting: &'static str,
        timeout_setting: &'static str,
        floor: usize,
    ) -> Result<Self, ConfigError> {
        let bytes = settings::number(get, bytes_setting, DEFAULT_BYTES.max(floor), |n| {
            check_bytes(*n, floor)
        })?;
        let body_timeout = settings::duration(get, timeout_setting, DEFAULT_TIMEOUT)?;
        check_timeout(body_timeout).map_err(|reason| ConfigError {
            setting: timeout_setting,
            value: get(timeout_setting).unwrap_or_default(),
            reason,
        })?;
        Ok(Self {
            bytes,
            body_timeout,
        })
    }
}

/// The check of a budget: at least `floor` (the largest body the listener takes), at most
/// [`MAX_BYTES`].
pub fn check_bytes(bytes: usize, floor: usize) -> Result<(), String> {
    if bytes < floor {
        Err(format!(
            "must be at least {floor}, the largest request body this port takes (or no such body could ever be taken)"
        ))
    } else if bytes > MAX_BYTES {
        Err(format!("must be at most {MAX_BYTES} (1 GiB)"))
    } else {
        Ok(())
    }
}

/// The check of a body timeout: from [`MIN_TIMEOUT`] to [`MAX_TIMEOUT`].
pub fn check_timeout(timeout: Duration) -> Result<(), String> {
    if (MIN_TIMEOUT..=MAX_TIMEOUT).contains(&timeout) {
        Ok(())
    } else {
        Err(format!(
            "must be between {MIN_TIMEOUT:?} and {MAX_TIMEOUT:?}"
        ))
    }
}

// === impl BodyBudget ===

impl BodyBudget {
    /// The budget of the listener named `listener` (the metrics' `listener` label), its
    /// metrics registered in `registry`.
    pub fn new(listener: &str, settings: BudgetSettings, registry: &Registry) -> Self {
        let bytes = settings.bytes.min(MAX_BYTES);
        let opts = |name: &str, help: &str| {
            Opts::new(name, help).const_label("listener".to_string(), listener.to_string())
        };
        let gauge = |name, help| {
            let g = IntGauge::with_opts(opts(name, help)).expect("valid metric");
            let _ = registry.register(Box::new(g.clone()));
            g
        };
        let counter = |name, help| {
            let c = IntCounter::with_opts(opts(name, help)).expect("valid metric");
            let _ = registry.register(Box::new(c.clone()));
            c
        };
        gauge(
            "mecha_request_body_budget_bytes",
            "Bytes of request bodies a listener holds in memory at once (its budget).",
        )
        .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        Self {
            inner: Arc::new(Inner {
                settings: BudgetSettings { bytes, ..settings },
                bytes: Semaphore::new(bytes),
                in_use: gauge(
                    "mecha_request_body_bytes_in_use",
                    "Bytes of the budget taken by request bodies being received or handled.",
                ),
                refused: counter(
                    "mecha_request_body_budget_refused_total",
                    "Requests answered 503 because the listener's body budget was used up.",
                ),
                timed_out: counter(
                    "mecha_request_body_timeouts_total",
                    "Requests answered 408 because their body did not arrive whole in time.",
                ),
            }),
        }
    }

    pub fn settings(&self) -> BudgetSettings {
        self.inner.settings
    }

    /// Bytes taken now.
    pub fn in_use(&self) -> usize {
        self.inner.settings.bytes - self.inner.bytes.available_permits()
    }

    /// Nothing taken yet; grow it with [`BodyBudget::take`].
    pub fn hold(&self) -> Held {
        Held {
            inner: self.inner.clone(),
            bytes: 0,
        }
    }

    /// Takes `bytes` more into `held`, at once or not at all.
    pub fn take(&self, held: &mut Held, bytes: usize) -> Result<(), BodyError> {
        let busy = || {
            self.inner.refused.inc();
            BodyError::Busy {
                budget: self.inner.settings.bytes,
            }
        };
        let permits = u32::try_from(bytes).map_err(|_| busy())?;
        let permit = self
            .inner
            .bytes
            .try_acquire_many(permits)
            .map_err(|_| busy())?;
        // Given back by `Held`'s drop, not the permit's.
        permit.forget();
        held.bytes += bytes;
        self.inner
            .in_use
            .add(i64::try_from(bytes).unwrap_or(i64::MAX));
        Ok(())
    }

    /// Reads `body` whole, at most `max` bytes, within the body timeout and the budget (see
    /// the module's documentation). `headers` are the request's: a declared `Content-Length`
    /// above `max` is refused before anything is read.
    pub async fn collect<B>(
        &self,
        headers: &HeaderMap,
        body: B,
        max: usize,
    ) -> Result<Buffered, BodyError>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<usize>().ok());
        let mut collecting = self.start(declared, max)?;
        let deadline = collecting.deadline();
        let mut body = std::pin::pin!(body);
        loop {
            let frame = match tokio::time::timeout_at(deadline, body.as_mut().frame()).await {
                Err(_) => return Err(collecting.timed_out()),
                Ok(None) => break,
                Ok(Some(Err(error))) => return Err(BodyError::Read(error.into())),
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else {
                // Trailers: nothing to keep.
                continue;
            };
            collecting.push(&data)?;
        }
        Ok(collecting.finish())
    }

    /// Starts reading a body of `declared` bytes (if it says), at most `max`, that arrives
    /// in pieces given to [`Collecting::push`] — for a server that reads the body itself
    /// (the data path's fast path); [`BodyBudget::collect`] reads an [`http_body::Body`] with
    /// it. The same rules: a declared length above `max` is refused here, before anything is
    /// read; budget is taken as the pieces arrive; the body timeout starts now.
    pub fn start(&self, declared: Option<usize>, max: usize) -> Result<Collecting, BodyError> {
        if declared.is_some_and(|n| n > max) {
            return Err(BodyError::TooLarge { limit: max });
        }
        Ok(Collecting {
            budget: self.clone(),
            // Where the buffer stops doubling: the body's known length, or the most it may be.
            expected: declared.unwrap_or(max),
            max,
            deadline: Instant::now() + self.inner.settings.body_timeout,
            held: self.hold(),
            buf: Vec::new(),
        })
    }
}

/// A body being read within a [`BodyBudget`]: see [`BodyBudget::start`]. Dropped before
/// [`Collecting::finish`] (the client went away, the body was refused), it gives back what
/// it took.
#[derive(Debug)]
pub struct Collecting {
    budget: BodyBudget,
    expected: usize,
    max: usize,
    deadline: Instant,
    held: Held,
    buf: Vec<u8>,
}

impl Collecting {
    /// When the whole body must have arrived: past it, [`Collecting::timed_out`].
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Bytes received so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Adds the next piece of the body: 413 past the maximum, 503 when the budget cannot
    /// take the room it needs (taken before the memory is: a refused body never grows).
    pub fn push(&mut self, data: &[u8]) -> Result<(), BodyError> {
        let needed = self.buf.len() + data.len();
        if needed > self.max {
            return Err(BodyError::TooLarge { limit: self.max });
        }
        if needed > self.buf.capacity() {
            // Powers of two (however the pieces are cut), up to the expected length.
            let capacity = needed
                .next_power_of_two()
                .max(self.buf.capacity() * 2)
                .min(self.expected.max(needed));
            let more = capacity - self.held.bytes;
            self.budget.take(&mut self.held, more)?;
            self.buf.reserve_exact(capacity - self.buf.len());
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// The body did not arrive whole by the deadline: counted, and its budget given back.
    pub fn timed_out(self) -> BodyError {
        self.budget.inner.timed_out.inc();
        BodyError::Timeout(self.budget.inner.settings.body_timeout)
    }

    /// The whole body, holding its budget.
    pub fn finish(self) -> Buffered {
        Buffered {
            bytes: Bytes::from(self.buf),
            held: self.held,
        }
    }
}

// === impl Held ===

impl Held {
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.inner.bytes.add_permits(self.bytes);
            self.inner
                .in_use
                .sub(i64::try_from(self.bytes).unwrap_or(i64::MAX));
        }
    }
}

// === impl Buffered ===

impl Buffered {
    /// The body. A clone of it outlives the budget it was counted against: keep the
    /// `Buffered` as long as anything made of it is held.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The budget this body holds.
    pub fn held(&self) -> usize {
        self.held.bytes
    }
}

impl std::ops::Deref for Buffered {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

// === impl BodyError ===

impl BodyError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Read(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// The metric label of the refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too-large",
            Self::Busy { .. } => "budget",
            Self::Timeout(_) => "body-timeout",
            Self::Read(_) => "unreadable-body",
        }
    }

    /// The answer: the status, the message as plain text, and `Retry-After` for a 503.
    pub fn response(&self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::from(format!("{self}\n"))));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if matches!(self, Self::Busy { .. }) {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::pin::Pin;
    use std::task::{Context, Poll};

    use http_body::Frame;
    use tokio::sync::mpsc;

    use super::*;

    fn budget(bytes: usize) -> (BodyBudget, Registry) {
        let registry = Registry::new();
        let budget = BodyBudget::new(
            "test",
            BudgetSettings {
                bytes,
                body_timeout: Duration::from_secs(5),
            },
            &registry,
        );
        (budget, registry)
    }

    /// A chunked body (no length) fed by the test, chunk by chunk.
    struct Fed(mpsc::UnboundedReceiver<Result<Bytes, std::io::Error>>);

    impl Body for Fed {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            self.0
                .poll_recv(cx)
                .map(|chunk| chunk.map(|chunk| chunk.map(Frame::data)))
        }
    }

    fn fed() -> (mpsc::UnboundedSender<Result<Bytes, std::io::Error>>, Fed) {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, Fed(rx))
    }

    fn length(n: usize) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        headers
    }

    /// A metric's value, as `/metrics` shows it.
    fn metric(registry: &Registry, name: &str) -> f64 {
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap();
        text.lines()
            .find(|line| line.starts_with(&format!("{name}{{listener=\"test\"}}")))
            .and_then(|line| line.rsplit(' ').next()?.parse().ok())
            .unwrap_or(f64::NAN)
    }

    #[tokio::test]
    async fn a_body_holds_its_bytes_until_it_is_dropped() {
        let (budget, registry) = budget(1000);
        let body = Full::new(Bytes::from(vec![7u8; 600]));
        let buffered = budget.collect(&length(600), body, 800).await.unwrap();
        assert_eq!(buffered.bytes().len(), 600);
        assert!(buffered.iter().all(|b| *b == 7));
        // A declared length is where the buffer stops: exactly that much is held.
        assert_eq!(buffered.held(), 600);
        assert_eq!(budget.in_use(), 600);
        assert_eq!(metric(&registry, "mecha_request_body_bytes_in_use"), 600.0);
        assert_eq!(metric(&registry, "mecha_request_body_budget_bytes"), 1000.0);
        // 600 of 1000 taken: another 600 does not fit, and says so with a 503.
        let refused = budget
            .collect(&length(600), Full::new(Bytes::from(vec![1u8; 600])), 800)
            .await
            .unwrap_err();
        assert!(
            matches!(refused, BodyError::Busy { budget: 1000 }),
            "{refused}"
        );
        let response = refused.response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], RETRY_AFTER);
        assert_eq!(
            metric(&registry, "mecha_request_body_budget_refused_total"),
            1.0
        );
        // The refused body gave back what it had taken.
        assert_eq!(budget.in_use(), 600);
        drop(buffered);
        assert_eq!(budget.in_use(), 0);
        assert_eq!(metric(&registry, "mecha_request_body_bytes_in_use"), 0.0);
        let again = budget
            .collect(&length(600), Full::new(Bytes::from(vec![1u8; 600])), 800)
            .await
            .unwrap();
        assert_eq!(again.held(), 600);
    }

    #[tokio::test]
    async fn a_chunked_body_takes_budget_as_its_chunks_arrive() {
        let (budget, _registry) = budget(1 << 20);
        let (tx, body) = fed();
        let collecting = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.collect(&HeaderMap::new(), body, 100_000).await })
        };
        let mut sent = Vec::new();
        for i in 0..10u8 {
            let chunk = vec![i; 1000];
            sent.extend_from_slice(&chunk);
            tx.send(Ok(Bytes::from(chunk))).unwrap();
            // Taken as the chunks come: at least what arrived, at most twice as much (the
            // buffer doubles), never the maximum up front.
            let arrived = sent.len();
            let deadline = Instant::now() + Duration::from_secs(5);
            while budget.in_use() < arrived {
                assert!(Instant::now() < deadline, "{} < {arrived}", budget.in_use());
                tokio::task::yield_now().await;
            }
            assert!(budget.in_use() <= 2 * arrived, "{}", budget.in_use());
        }
        drop(tx);
        let buffered = collecting.await.unwrap().unwrap();
        assert_eq!(buffered.bytes().as_ref(), sent.as_slice());
        assert!(buffered.held() >= sent.len() && buffered.held() <= 2 * sent.len());
        drop(buffered);
        assert_eq!(budget.in_use(), 0);
    }

    #[test]
    fn pieces_fed_by_a_server_take_budget_in_powers_of_two() {
        let (budget, _registry) = budget(1 << 20);
        // However the pieces are cut, the buffer (and the budget taken) grows in powers of two
        // up to the declared length.
        let mut collecting = budget.start(Some(65_536), 100_000).unwrap();
        for (piece, held) in [
            (16_210, 16_384),
            (16_384, 32_768),
            (7_406, 65_536),
            (1, 65_536),
        ] {
            collecting.push(&vec![1u8; piece]).unwrap();
            assert_eq!(budget.in_use(), held, "after {} bytes", collecting.len());
        }
        let body = collecting.finish();
        assert_eq!((body.len(), body.held()), (40_001, 65_536));
        drop(body);
        assert_eq!(budget.in_use(), 0);
        // Declared too large: refused before anything is taken; growing past the maximum too.
        let refused = budget.start(Some(100_001), 100_000).unwrap_err();
        assert!(matches!(refused, BodyError::TooLarge { limit: 100_000 }));
        let mut collecting = budget.start(None, 1000).unwrap();
        collecting.push(&[0u8; 600]).unwrap();
        let refused = collecting.push(&[0u8; 600]).unwrap_err();
        assert!(matches!(refused, BodyError::TooLarge { .. }));
        // A body given up on (its client left) gives its budget back when dropped.
        assert_eq!(budget.in_use(), 1000);
        drop(collecting);
        assert_eq!(budget.in_use(), 0);
    }

    #[tokio::test]
    async fn a_chunked_body_is_refused_where_the_budget_ends() {
        let (budget, _registry) = budget(4096);
        let (tx, body) = fed();
        for _ in 0..8 {
            tx.send(Ok(Bytes::from(vec![0u8; 1024]))).unwrap();
        }
        drop(tx);
        let refused = budget
            .collect(&HeaderMap::new(), body, 1 << 20)
            .await
            .unwrap_err();
        assert!(matches!(refused, BodyError::Busy { .. }), "{refused}");
        assert_eq!(budget.in_use(), 0);
    }

    #[tokio::test]
    async fn too_large_is_refused_before_reading_or_when_the_body_grows_past_it() {
        let (budget, _registry) = budget(1 << 20);
        // Declared too large: refused without polling the body, which would never end.
        let (_tx, body) = fed();
        let refused = budget.collect(&length(2000), body, 1000).await.unwrap_err();
        assert!(matches!(refused, BodyError::TooLarge { limit: 1000 }));
        assert_eq!(refused.response().status(), StatusCode::PAYLOAD_TOO_LARGE);
        // Chunked, growing past the maximum.
        let (tx, body) = fed();
        tx.send(Ok(Bytes::from(vec![0u8; 800]))).unwrap();
        tx.send(Ok(Bytes::from(vec![0u8; 800]))).unwrap();
        let refused = budget
            .collect(&HeaderMap::new(), body, 1000)
            .await
            .unwrap_err();
        assert!(matches!(refused, BodyError::TooLarge { .. }));
        assert_eq!(budget.in_use(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_body_gives_its_budget_back_at_the_timeout() {
        let (budget, registry) = budget(1 << 20);
        let (tx, body) = fed();
        tx.send(Ok(Bytes::from(vec![0u8; 5000]))).unwrap();
        let collecting = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.collect(&HeaderMap::new(), body, 100_000).await })
        };
        // The clock is paused: it moves only when told to, once the body holds its bytes.
        while budget.in_use() < 5000 {
            tokio::task::yield_now().await;
        }
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(budget.in_use() >= 5000, "held while it trickles");
        tokio::time::advance(Duration::from_secs(2)).await;
        let refused = collecting.await.unwrap().unwrap_err();
        assert!(matches!(refused, BodyError::Timeout(_)), "{refused}");
        assert_eq!(refused.response().status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(budget.in_use(), 0);
        assert_eq!(metric(&registry, "mecha_request_body_timeouts_total"), 1.0);
        drop(tx);
    }

    #[tokio::test]
    async fn a_body_that_breaks_off_gives_its_budget_back() {
        let (budget, _registry) = budget(1 << 20);
        let (tx, body) = fed();
        tx.send(Ok(Bytes::from(vec![0u8; 5000]))).unwrap();
        tx.send(Err(std::io::Error::other("connection reset")))
            .unwrap();
        let refused = budget
            .collect(&HeaderMap::new(), body, 100_000)
            .await
            .unwrap_err();
        assert!(matches!(refused, BodyError::Read(_)), "{refused}");
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
        assert_eq!(budget.in_use(), 0);
        // An empty body takes nothing.
        let empty = budget
            .collect(&HeaderMap::new(), Full::new(Bytes::new()), 10)
            .await
            .unwrap();
        assert_eq!((empty.held(), budget.in_use()), (0, 0));
    }

    #[test]
    fn settings_are_bounded_and_name_the_setting() {
        let read = |pairs: &[(&str, &str)]| {
            let pairs: Vec<(String, String)> = pairs
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect();
            BudgetSettings::from_env(
                &move |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()),
                "X_BODY_BUDGET",
                "X_BODY_TIMEOUT",
                1 << 20,
            )
        };
        assert_eq!(read(&[]).unwrap(), BudgetSettings::default());
        let set = read(&[("X_BODY_BUDGET", "8388608"), ("X_BODY_TIMEOUT", "5s")]).unwrap();
        assert_eq!(set.bytes, 8 << 20);
        assert_eq!(set.body_timeout, Duration::from_secs(5));
        for (setting, value, says) in [
            ("X_BODY_BUDGET", "1000", "at least 1048576"),
            ("X_BODY_BUDGET", "1073741825", "at most 1073741824"),
            ("X_BODY_BUDGET", "lots", "not a valid number"),
            ("X_BODY_TIMEOUT", "0s", "between"),
            ("X_BODY_TIMEOUT", "11m", "between"),
            ("X_BODY_TIMEOUT", "soon", ""),
        ] {
            let error = read(&[(setting, value)]).unwrap_err();
            assert_eq!(error.setting, setting, "{error}");
            assert!(error.to_string().contains(says), "{error}");
        }
    }
}
