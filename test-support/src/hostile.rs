//! Clients that hold a server's memory: requests whose bodies stop part way, or trickle in,
//! on raw sockets; and the resident memory of the process they are aimed at.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Resident memory of process `pid` (`VmRSS` in `/proc/PID/status`), in bytes.
pub fn resident(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .unwrap_or_else(|| panic!("no VmRSS for {pid}"));
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap();
    kib * 1024
}

/// A request whose head and part of its body are sent on a thread of its own, at once; then
/// the connection stays open (a byte of the body sent every `trickle`, if set) until the
/// client is closed or dropped, or the server answers or closes.
#[derive(Debug)]
pub struct PartialBody {
    state: Arc<(Mutex<State>, Condvar)>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, Default, Clone)]
struct State {
    /// The part was written whole.
    sent: bool,
    /// The server closed the connection (or reset it).
    closed: bool,
    /// What the server answered.
    answer: Vec<u8>,
}

/// How far a [`PartialBody`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Its part is written and the server holds the connection open.
    Holding,
    /// The server answered or closed the connection before or after the part was written.
    Refused,
}

impl PartialBody {
    /// Connects to `addr` and sends `head` (a request head, blank line included) and `part`.
    pub fn start(
        addr: SocketAddr,
        head: impl Into<Vec<u8>>,
        part: impl Into<Vec<u8>>,
        trickle: Option<Duration>,
    ) -> Self {
        let (head, part) = (head.into(), part.into());
        let state = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || run(addr, &head, &part, trickle, &state, &stop))
        };
        Self {
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// Waits (up to `within`) until the part is written or the server refused it.
    pub fn settled(&self, within: Duration) -> Outcome {
        let (lock, ready) = &*self.state;
        let state = lock.lock().unwrap();
        let (state, _) = ready
            .wait_timeout_while(state, within, |s| {
                !(s.closed || !s.answer.is_empty() || s.sent)
            })
            .unwrap();
        if state.closed || !state.answer.is_empty() {
            Outcome::Refused
        } else {
            assert!(state.sent, "neither written nor refused within {within:?}");
            Outcome::Holding
        }
    }

    /// Waits (up to `within`) for the server's answer; its text, or what came before the
    /// server closed (possibly nothing).
    pub fn answer(&self, within: Duration) -> String {
        let (lock, ready) = &*self.state;
        let state = lock.lock().unwrap();
        let (state, timeout) = ready
            .wait_timeout_while(state, within, |s| !s.closed)
            .unwrap();
        assert!(!timeout.timed_out(), "no answer within {within:?}");
        String::from_utf8_lossy(&state.answer).into_owned()
    }

    /// Whether the server answered or closed the connection.
    pub fn refused(&self) -> bool {
        let state = self.state.0.lock().unwrap();
        state.closed || !state.answer.is_empty()
    }

    /// Closes the connection in the middle of the body.
    pub fn close(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for PartialBody {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn run(
    addr: SocketAddr,
    head: &[u8],
    part: &[u8],
    trickle: Option<Duration>,
    state: &(Mutex<State>, Condvar),
    stop: &AtomicBool,
) {
    let update = |change: &dyn Fn(&mut State)| {
        let (lock, ready) = state;
        change(&mut lock.lock().unwrap());
        ready.notify_all();
    };
    let Ok(mut stream) = TcpStream::connect(addr) else {
        update(&|s| s.closed = true);
        return;
    };
    let written = stream
        .write_all(head)
        .and_then(|()| part.chunks(16 * 1024).try_for_each(|c| stream.write_all(c)));
    if written.is_err() {
        read_answer(&mut stream, state, stop);
        update(&|s| s.closed = true);
        return;
    }
    update(&|s| s.sent = true);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(20)));
    let mut next_byte = trickle.map(|every| Instant::now() + every);
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Acquire) {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => update(&|s| s.answer.extend_from_slice(&buf[..n])),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
        if let (Some(at), Some(every)) = (next_byte, trickle)
            && Instant::now() >= at
        {
            if stream.write_all(b"x").is_err() {
                break;
            }
            next_byte = Some(at + every);
        }
    }
    if !stop.load(Ordering::Acquire) {
        update(&|s| s.closed = true);
    }
}

/// After a failed write: whatever answer the server sent before it closed.
fn read_answer(stream: &mut TcpStream, state: &(Mutex<State>, Condvar), stop: &AtomicBool) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Acquire) {
        match stream.read(&mut buf) {
            Ok(n) if n > 0 => {
                let (lock, _) = state;
                lock.lock().unwrap().answer.extend_from_slice(&buf[..n]);
            }
            _ => return,
        }
    }
}
