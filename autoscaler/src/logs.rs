//! Replica output: each line is echoed to the terminal with a `[service/replica]` prefix, kept
//! in a bounded per-service history for `mecha logs` (with when it was read and which
//! revision's replica wrote it), and broadcast to followers.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use mecha_common::routing::ServiceKey;
use tokio::sync::broadcast;

/// Lines kept per service for `mecha logs`.
const HISTORY: usize = 1000;
/// Events kept per service for `mecha describe`.
const EVENTS: usize = 50;

#[derive(Debug, Clone)]
pub struct LogHub {
    services: Arc<Mutex<HashMap<ServiceKey, ServiceLog>>>,
    echo: bool,
}

#[derive(Debug)]
struct ServiceLog {
    recent: VecDeque<LogLine>,
    tx: broadcast::Sender<LogLine>,
    /// What happened to the service's replicas (started, ready, ended, scaled), for
    /// `mecha describe`; not echoed.
    events: VecDeque<LogLine>,
}

/// One line of a replica's output. Displays as `[service/replica] text`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// When `mecha up` read it.
    pub at: SystemTime,
    /// The revision whose replica wrote it.
    pub revision: Arc<str>,
    prefix: Arc<str>,
    pub text: Arc<str>,
}

impl std::fmt::Display for LogLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.prefix, self.text)
    }
}

// === impl LogHub ===

impl LogHub {
    /// `echo` prints every line to stdout as well (what `mecha up` does).
    pub fn new(echo: bool) -> Self {
        Self {
            services: Arc::default(),
            echo,
        }
    }

    /// `replica` is named `{revision}-{n}`, as the supervisor names them.
    pub fn push(&self, service: &ServiceKey, replica: &str, line: &str) {
        let revision = replica
            .rsplit_once('-')
            .map_or(replica, |(revision, _)| revision);
        let line = LogLine {
            at: SystemTime::now(),
            revision: revision.into(),
            prefix: format!("[{}/{replica}]", service.name).into(),
            text: line.into(),
        };
        if self.echo {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
        }
        let mut services = self.services.lock().unwrap_or_else(PoisonError::into_inner);
        let log = services
            .entry(service.clone())
            .or_insert_with(ServiceLog::new);
        if log.recent.len() == HISTORY {
            log.recent.pop_front();
        }
        log.recent.push_back(line.clone());
        // No follower is fine.
        let _ = log.tx.send(line);
    }

    /// Records an event about `subject` (a replica of `revision`, or the revision itself).
    pub fn event(&self, service: &ServiceKey, revision: &str, subject: &str, text: &str) {
        let event = LogLine {
            at: SystemTime::now(),
            revision: revision.into(),
            prefix: subject.into(),
            text: text.into(),
        };
        let mut services = self.services.lock().unwrap_or_else(PoisonError::into_inner);
        let log = services
            .entry(service.clone())
            .or_insert_with(ServiceLog::new);
        if log.events.len() == EVENTS {
            log.events.pop_front();
        }
        log.events.push_back(event);
    }

    /// The service's recent events, oldest first. Each displays as `subject text`.
    pub fn events(&self, service: &ServiceKey) -> Vec<LogLine> {
        let services = self.services.lock().unwrap_or_else(PoisonError::into_inner);
        services
            .get(service)
            .map(|log| log.events.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Forgets a deleted service's output and events.
    pub fn forget(&self, service: &ServiceKey) {
        self.services
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(service);
    }

    /// The last lines of a service, oldest first, and a receiver for the lines that follow.
    pub fn follow(&self, service: &ServiceKey) -> (Vec<LogLine>, broadcast::Receiver<LogLine>) {
        let mut services = self.services.lock().unwrap_or_else(PoisonError::into_inner);
        let log = services
            .entry(service.clone())
            .or_insert_with(ServiceLog::new);
        (log.recent.iter().cloned().collect(), log.tx.subscribe())
    }
}

impl ServiceLog {
    fn new() -> Self {
        Self {
            recent: VecDeque::new(),
            tx: broadcast::channel(HISTORY).0,
            events: VecDeque::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keeps_history_and_broadcasts() {
        let hub = LogHub::new(false);
        let key = ServiceKey::new("default", "hello");
        hub.push(&key, "hello-00001-1", "first");
        let (recent, mut rx) = hub.follow(&key);
        assert_eq!(recent.len(), 1);
        assert_eq!(recent[0].to_string(), "[hello/hello-00001-1] first");
        assert_eq!(&*recent[0].revision, "hello-00001");
        hub.push(&key, "hello-00001-1", "second");
        assert_eq!(
            rx.recv().await.expect("line").to_string(),
            "[hello/hello-00001-1] second"
        );
        for i in 0..HISTORY + 5 {
            hub.push(&key, "r", &i.to_string());
        }
        assert_eq!(hub.follow(&key).0.len(), HISTORY);
    }

    #[test]
    fn events_name_their_revision_and_are_bounded() {
        let hub = LogHub::new(false);
        let key = ServiceKey::new("default", "hello");
        hub.event(
            &key,
            "hello-00002",
            "hello-00002-3",
            "started (pid 1, port 2)",
        );
        hub.event(
            &key,
            "hello-00002",
            "hello-00002",
            "scaled from 0 to 1 replicas",
        );
        let events = hub.events(&key);
        assert_eq!(&*events[0].revision, "hello-00002");
        assert_eq!(
            events[0].to_string(),
            "hello-00002-3 started (pid 1, port 2)"
        );
        assert_eq!(&*events[1].revision, "hello-00002");
        // Events are not output.
        assert!(hub.follow(&key).0.is_empty());
        for i in 0..EVENTS + 5 {
            hub.event(&key, "hello-00002", "hello-00002", &i.to_string());
        }
        assert_eq!(hub.events(&key).len(), EVENTS);
        hub.forget(&key);
        assert!(hub.events(&key).is_empty());
    }
}
