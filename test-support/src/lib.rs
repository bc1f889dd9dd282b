//! Dev-only helpers shared by the tests of several crates (and the benchmarks in `loadtests`,
//! which start the same servers). Nothing that ships depends on this crate.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used)]

pub mod hostile;
pub mod nats;
pub mod servers;
pub mod subscriber;

/// `N` distinct ports on 127.0.0.1 that were free a moment ago, for processes a test starts.
/// All `N` are held until all are picked: a port picked and released can be handed out again
/// by the very next `bind(0)`.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&held) {
        *port = listener.local_addr().unwrap().port();
    }
    ports
}
