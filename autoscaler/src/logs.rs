//! Replica output: each line is echoed to the terminal with a `[service/replica]` prefix, kept
//! in a bounded per-service history for `mecha logs`, and broadcast to followers.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

use mecha_common::routing::ServiceKey;
use tokio::sync::broadcast;

/// Lines kept per service for `mecha logs`.
const HISTORY: usize = 1000;

#[derive(Debug, Clone)]
pub struct LogHub {
    services: Arc<Mutex<HashMap<ServiceKey, ServiceLog>>>,
    echo: bool,
}

#[derive(Debug)]
struct ServiceLog {
    recent: VecDeque<Arc<str>>,
    tx: broadcast::Sender<Arc<str>>,
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

    pub fn push(&self, service: &ServiceKey, replica: &str, line: &str) {
        let line: Arc<str> = format!("[{}/{replica}] {line}", service.name).into();
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

    /// The last lines of a service, oldest first, and a receiver for the lines that follow.
    pub fn follow(&self, service: &ServiceKey) -> (Vec<Arc<str>>, broadcast::Receiver<Arc<str>>) {
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
        assert_eq!(recent, vec![Arc::from("[hello/hello-00001-1] first")]);
        hub.push(&key, "hello-00001-1", "second");
        assert_eq!(
            &*rx.recv().await.expect("line"),
            "[hello/hello-00001-1] second"
        );
        for i in 0..HISTORY + 5 {
            hub.push(&key, "r", &i.to_string());
        }
        assert_eq!(hub.follow(&key).0.len(), HISTORY);
    }
}
