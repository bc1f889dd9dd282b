//! `PingSource`: an event on a cron schedule in a time zone.
//!
//! Ticks are computed on the wall clock of the source's time zone (croner over jiff, through
//! the [`Slot`] adapter) and waited for on tokio's clock, so the loop runs under paused time in
//! tests with an anchored [`Clock`]. Each tick's event id is derived from the source and the
//! scheduled time ([`event_id`]): a retried send, or a restart that fires the same slot again,
//! carries the same id, so a receiver can drop the duplicate (Knative uses a random id per
//! tick). Ticks missed while the source was not running are not replayed: after a start (or a
//! late wake-up) the next tick is the first slot after now.

use std::cmp::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use crds::FieldError;
use crds::PingSource;
use crds::sources::{parse_schedule, parse_timezone};
use croner::errors::CronError;
use croner::{CivilDate, CivilDateTime, CivilTime, CronDateTime, Resolution, Weekday};
use eventing_broker::Event;
use jiff::tz::{AmbiguousOffset, TimeZone};
use jiff::{SignedDuration, Timestamp, ZonedDateTime};
use sha2::{Digest, Sha256};
use tokio::task::{JoinHandle, JoinSet};

use crate::context::SourceContext;

/// Knative's event type for PingSource events.
pub const EVENT_TYPE: &str = crds::sources::PING_EVENT_TYPE;

/// A PingSource, read and checked.
#[derive(Debug, Clone)]
pub struct PingConfig {
    /// The CloudEvents `source`: `/apis/v1/namespaces/{ns}/pingsources/{name}`.
    pub source: String,
    schedule: croner::Cron,
    timezone: TimeZone,
    content_type: Option<String>,
    data: Option<Bytes>,
}

/// Where "now" comes from.
#[derive(Debug, Clone)]
pub enum Clock {
    /// The system's wall clock.
    System,
    /// `wall` at tokio's instant `at`, advancing with tokio's clock (paused time in tests).
    Anchored {
        wall: Timestamp,
        at: tokio::time::Instant,
    },
}

/// A zoned date and time as croner sees it.
#[derive(Debug, Clone)]
pub struct Slot(pub ZonedDateTime);

// === impl PingConfig ===

impl PingConfig {
    /// Reads a PingSource; the errors are the ones loading reports.
    pub fn from_resource(ping: &PingSource) -> Result<Self, Vec<FieldError>> {
        let errors = ping.validate();
        if !errors.is_empty() {
            return Err(errors);
        }
        let schedule = parse_schedule(ping.spec.schedule())
            .map_err(|why| vec![FieldError::new("spec.schedule", why)])?;
        let timezone = match &ping.spec.timezone {
            Some(name) => {
                parse_timezone(name).map_err(|why| vec![FieldError::new("spec.timezone", why)])?
            }
            None => TimeZone::UTC,
        };
        let data = ping.spec.payload().map_err(|e| vec![e])?.map(Bytes::from);
        Ok(Self {
            source: ping.event_source(),
            schedule,
            timezone,
            content_type: ping.spec.content_type.clone(),
            data,
        })
    }

    /// The first scheduled time strictly after `after`, in the source's time zone.
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        let now = Slot(after.to_zoned_datetime(self.timezone.clone()));
        self.schedule
            .find_next_occurrence(&now, false)
            .ok()
            .map(|slot| slot.0.timestamp())
    }

    /// The event of the tick scheduled at `slot`.
    pub fn event(&self, slot: Timestamp) -> Event {
        let mut event = Event::new(&event_id(&self.source, slot), &self.source, EVENT_TYPE);
        event.set("time", slot.to_string());
        if let Some(content_type) = &self.content_type {
            event.set("datacontenttype", content_type.clone());
        }
        event.data = self.data.clone();
        event
    }

    /// Runs the schedule on the system clock until the context's shutdown.
    pub fn build(self, cx: SourceContext) -> JoinHandle<()> {
        self.build_with_clock(cx, Clock::System)
    }

    pub fn build_with_clock(self, cx: SourceContext, clock: Clock) -> JoinHandle<()> {
        tokio::spawn(Arc::new(self).run(cx, clock))
    }

    async fn run(self: Arc<Self>, cx: SourceContext, clock: Clock) {
        // Sends run beside the schedule, so a slow sink never delays the next tick; they stop
        // with the source (dropping the set aborts them).
        let mut sends = JoinSet::new();
        let mut after = clock.now();
        loop {
            let Some(slot) = self.next_after(after) else {
                tracing::warn!(source = %self.source, "the schedule has no further ticks");
                cx.shutdown.clone().recv().await;
                return;
            };
            let wait = Duration::try_from(clock.now().duration_until(slot)).unwrap_or_default();
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = cx.shutdown.clone().recv() => return,
            }
            let (cx, event) = (cx.clone(), self.event(slot));
            sends.spawn(async move {
                let _ = cx.emit(event).await;
            });
            while sends.try_join_next().is_some() {}
            // Never the same slot twice (the wall clock may lag tokio's by a hair), and after a
            // late wake-up the slots in between are skipped, not replayed.
            after = clock.now().max(slot);
        }
    }
}

/// A tick's id: a UUID-shaped digest of the source and the scheduled second, the same for
/// every send of that tick.
pub fn event_id(source: &str, slot: Timestamp) -> String {
    digest_id(&format!("{source}\n{}", slot.as_second()))
}

/// A UUID-shaped SHA-256 digest of `text`: the ids sources derive.
pub fn digest_id(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// An id for an event its upstream gives none that survives a redelivery: a digest of the
/// source, the time and a counter of this process, so never the same twice.
pub fn unique_id(source: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    digest_id(&format!(
        "{source}\n{}\n{}\n{n}",
        Timestamp::now().as_nanosecond(),
        std::process::id()
    ))
}

// === impl Clock ===

impl Clock {
    /// The system's time now, advancing with tokio's clock from here on.
    pub fn anchored_now() -> Self {
        Clock::Anchored {
            wall: Timestamp::now(),
            at: tokio::time::Instant::now(),
        }
    }

    pub fn now(&self) -> Timestamp {
        match self {
            Clock::System => Timestamp::now(),
            Clock::Anchored { wall, at } => SignedDuration::try_from(at.elapsed())
                .ok()
                .and_then(|elapsed| wall.checked_add(elapsed).ok())
                .unwrap_or(*wall),
        }
    }
}

// === impl Slot ===

impl CronDateTime for Slot {
    fn to_civil(&self) -> CivilDateTime {
        let dt = self.0.datetime();
        // jiff keeps every part in range.
        CivilDateTime::new(
            CivilDate::from_parts_unchecked(
                i32::from(dt.year()),
                dt.month() as u32,
                dt.day() as u32,
            ),
            CivilTime::from_parts_unchecked(
                dt.hour() as u32,
                dt.minute() as u32,
                dt.second() as u32,
            ),
        )
    }

    fn civil_weekday(&self) -> Weekday {
        Weekday::from_days_from_sunday(self.0.weekday().to_sunday_zero_offset() as u32)
    }

    fn resolve_civil(&self, civil: CivilDateTime) -> Result<Resolution<Self>, CronError> {
        let year = i16::try_from(civil.year()).map_err(|_| CronError::InvalidDate)?;
        let datetime = jiff::civil::DateTime::new(
            year,
            civil.month() as i8,
            civil.day() as i8,
            civil.hour() as i8,
            civil.minute() as i8,
            civil.second() as i8,
            0,
        )
        .map_err(|_| CronError::InvalidDate)?;
        let ambiguous = self.0.time_zone().to_ambiguous_zoned_datetime(datetime);
        Ok(match ambiguous.offset() {
            AmbiguousOffset::Unambiguous { .. } => Resolution::Single(Slot(
                ambiguous
                    .unambiguous()
                    .map_err(|_| CronError::InvalidTime)?,
            )),
            AmbiguousOffset::Fold { .. } => {
                let earlier = ambiguous
                    .clone()
                    .earlier()
                    .map_err(|_| CronError::InvalidTime)?;
                let later = ambiguous.later().map_err(|_| CronError::InvalidTime)?;
                Resolution::Ambiguous(Slot(earlier), Slot(later))
            }
            AmbiguousOffset::Gap { .. } => Resolution::Gap,
        })
    }

    fn checked_add_seconds(&self, seconds: i64) -> Option<Self> {
        self.0
            .checked_add(SignedDuration::from_secs(seconds))
            .ok()
            .map(Slot)
    }

    fn cmp_instant(&self, other: &Self) -> Ordering {
        self.0.timestamp().cmp(&other.0.timestamp())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;

    use mecha_common::{Shutdown, ShutdownSignal};
    use prometheus::Registry;

    use super::*;
    use crate::metrics::SourceMetrics;
    use crate::sink::MemorySink;

    fn ping(schedule: &str, timezone: Option<&str>) -> PingConfig {
        let yaml = format!(
            "apiVersion: sources.knative.dev/v1\nkind: PingSource\nmetadata: {{name: tick, namespace: ns}}\nspec:\n  schedule: {schedule:?}\n{}  contentType: application/json\n  data: '{{\"hello\":\"world\"}}'\n  sink: {{uri: http://127.0.0.1:1/}}\n",
            timezone
                .map(|tz| format!("  timezone: {tz}\n"))
                .unwrap_or_default()
        );
        let (loaded, errors) =
            crds::load_str(std::path::Path::new("p.yaml"), &yaml, crds::Mode::Local);
        assert!(errors.is_empty(), "{errors:?}");
        let crds::Resource::Source(crds::SourceResource::Ping(source)) = &loaded[0].resource else {
            panic!("not a PingSource")
        };
        PingConfig::from_resource(source).unwrap()
    }

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn context(sink: &MemorySink, shutdown: ShutdownSignal) -> SourceContext {
        SourceContext::new(
            ("PingSource".into(), "ns".into(), "tick".into()),
            shutdown,
            Arc::new(sink.clone()),
            BTreeMap::from([("team".to_string(), "blue".to_string())]),
            SourceMetrics::new(&Registry::new()),
        )
    }

    #[test]
    fn ticks_follow_the_time_zone() {
        // 09:00 in Tokyo is 00:00 UTC; at 09:30 Tokyo time the next one is tomorrow's.
        let daily = ping("0 9 * * *", Some("Asia/Tokyo"));
        assert_eq!(
            daily.next_after(at("2026-11-30T00:30:00Z")),
            Some(at("2026-12-01T00:00:00Z"))
        );
        // Without a time zone, UTC.
        let utc = ping("0 9 * * *", None);
        assert_eq!(
            utc.next_after(at("2026-11-30T00:30:00Z")),
            Some(at("2026-11-30T09:00:00Z"))
        );
        // New York's 02:30 does not exist on 2026-03-08 (clocks jump from 02:00 to 03:00):
        // the tick fires when the clocks jump (03:00 EDT, 07:00 UTC), as in Vixie cron, and
        // the next day at 02:30 EDT (06:30 UTC).
        let gap = ping("30 2 * * *", Some("America/New_York"));
        assert_eq!(
            gap.next_after(at("2026-03-08T05:00:00Z")),
            Some(at("2026-03-08T07:00:00Z"))
        );
        assert_eq!(
            gap.next_after(at("2026-03-08T07:00:00Z")),
            Some(at("2026-03-09T06:30:00Z"))
        );
        // The seconds field: every 15 s, strictly after.
        let quarter = ping("*/15 * * * * *", Some("Europe/Berlin"));
        assert_eq!(
            quarter.next_after(at("2026-11-30T10:00:15Z")),
            Some(at("2026-11-30T10:00:30Z"))
        );
        assert_eq!(
            quarter.next_after(at("2026-11-30T10:00:15.5Z")),
            Some(at("2026-11-30T10:00:30Z"))
        );
    }

    #[test]
    fn ids_are_derived_from_source_and_slot() {
        let config = ping("* * * * * *", None);
        let slot = at("2026-11-30T10:00:01Z");
        let event = config.event(slot);
        assert_eq!(event.id(), config.event(slot).id());
        assert_ne!(event.id(), config.event(at("2026-11-30T10:00:02Z")).id());
        assert_ne!(
            event.id(),
            event_id("/apis/v1/namespaces/ns/pingsources/other", slot)
        );
        assert_eq!(event.id().len(), 36);
        assert_eq!(event.string("type").as_deref(), Some(EVENT_TYPE));
        assert_eq!(
            event.string("source").as_deref(),
            Some("/apis/v1/namespaces/ns/pingsources/tick")
        );
        assert_eq!(
            event.string("time").as_deref(),
            Some("2026-11-30T10:00:01Z")
        );
        assert_eq!(event.data.as_deref(), Some(&br#"{"hello":"world"}"#[..]));
    }

    #[tokio::test(start_paused = true)]
    async fn the_loop_fires_on_each_slot_and_stops_on_shutdown() {
        let config = ping("*/2 * * * * *", Some("Europe/Berlin"));
        let sink = MemorySink::default();
        let shutdown = Shutdown::new();
        let start = tokio::time::Instant::now();
        let clock = Clock::Anchored {
            wall: at("2026-11-30T10:00:00.250Z"),
            at: start,
        };
        let task = config.build_with_clock(context(&sink, shutdown.signal()), clock);
        let events = sink.wait_for(3).await;
        // 10:00:02, :04, :06 — the first 1.75 s after the start, then every 2 s.
        let times: Vec<_> = events.iter().map(|e| e.string("time").unwrap()).collect();
        assert_eq!(
            times,
            [
                "2026-11-30T10:00:02Z",
                "2026-11-30T10:00:04Z",
                "2026-11-30T10:00:06Z"
            ]
        );
        assert_eq!(start.elapsed(), Duration::from_millis(5_750));
        assert!(
            events
                .iter()
                .all(|e| e.string("team").as_deref() == Some("blue"))
        );
        shutdown.trigger();
        task.await.unwrap();
        let after = sink.events().len();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(sink.events().len(), after, "no tick after shutdown");
    }

    #[tokio::test(start_paused = true)]
    async fn missed_ticks_are_not_replayed_and_failures_are_counted() {
        // A minutely schedule started at 10:00:59.5: the first tick is 10:01:00, half a second
        // on, not the one at 10:00:00 that passed.
        let config = ping("* * * * *", None);
        let sink = MemorySink::default();
        sink.refuse(Some(crate::SinkError {
            code: 503,
            message: "down".into(),
            attempts: 6,
        }));
        let metrics = SourceMetrics::new(&Registry::new());
        let cx = SourceContext::new(
            ("PingSource".into(), "ns".into(), "tick".into()),
            ShutdownSignal::never(),
            Arc::new(sink.clone()),
            BTreeMap::new(),
            metrics.clone(),
        );
        let clock = Clock::Anchored {
            wall: at("2026-11-30T10:00:59.500Z"),
            at: tokio::time::Instant::now(),
        };
        let task = config.build_with_clock(cx, clock);
        tokio::time::sleep(Duration::from_millis(600)).await;
        tokio::task::yield_now().await;
        assert_eq!(metrics.counts("PingSource", "ns", "tick"), (0, 1));
        sink.refuse(None);
        tokio::time::sleep(Duration::from_secs(60)).await;
        let events = sink.wait_for(1).await;
        assert_eq!(
            events[0].string("time").as_deref(),
            Some("2026-11-30T10:02:00Z")
        );
        assert_eq!(metrics.counts("PingSource", "ns", "tick"), (1, 1));
        task.abort();
    }
}
