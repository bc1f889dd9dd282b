//! Gives the system back the memory a burst left behind.
//!
//! glibc's allocator keeps what a thread freed in that thread's arena for reuse, and returns
//! pages to the system only from the top of a heap. After a burst — 128 clients posting
//! events, a large response relayed — a component stays resident at its peak although most
//! of it is free (measured on the broker: 32 MiB resident after 100,000 events were posted,
//! of which 6.6 MiB in use; `malloc_trim(0)` brought it to 23 MiB).
//!
//! [`release_after_bursts`] watches the process's CPU time once a second and, when a busy
//! second (at least [`BUSY`] of one core) is followed by a quiet one (at most [`QUIET`]),
//! asks the allocator to return its free pages ([`release`]); in a quiet second it also does
//! when resident memory has grown by [`GROWN`] since the last trim without a busy second
//! (held connections that close, bodies that time out free memory cheaply). Trimming walks and locks every
//! arena in turn, so it runs only once the process has gone quiet, once per burst, never on a
//! timer under load. Elsewhere than Linux with glibc it does nothing: musl's and other
//! allocators return memory themselves or have no such call.

use std::time::Duration;

use crate::ShutdownSignal;

/// How often the process's CPU time is read.
const TICK: Duration = Duration::from_secs(1);
/// A second counts as busy from this much CPU time (of one core)...
pub const BUSY: Duration = Duration::from_millis(100);
/// ...and as quiet up to this much.
pub const QUIET: Duration = Duration::from_millis(20);

/// Resident memory this far above what stayed after the last trim also earns a trim in a
/// quiet second: memory freed without a busy second (held connections closing, bodies timing
/// out) would otherwise stay.
pub const GROWN: u64 = 16 << 20;

/// What the watcher remembers between seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Watch {
    /// A busy second was seen since the last trim.
    pub burst_seen: bool,
    /// Resident bytes right after the last trim (or at start).
    pub after_trim: u64,
}

/// What the watcher does after one second of `cpu` time with `resident` bytes: whether to
/// trim now. In a quiet second it trims once after a burst, or when resident memory grew by
/// [`GROWN`] since the last trim; the caller records what stayed with [`Watch::trimmed`].
pub fn decide(cpu: Duration, resident: u64, watch: &mut Watch) -> bool {
    if cpu >= BUSY {
        watch.burst_seen = true;
        false
    } else if cpu <= QUIET
        && (watch.burst_seen || resident >= watch.after_trim.saturating_add(GROWN))
    {
        watch.burst_seen = false;
        true
    } else {
        false
    }
}

impl Watch {
    /// Records what stayed resident after a trim.
    pub fn trimmed(&mut self, resident: u64) {
        self.after_trim = resident;
    }
}

/// Runs until `shutdown`: trims the allocator once after each burst (see the module).
pub fn release_after_bursts(shutdown: ShutdownSignal) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = cpu_time();
        let mut watch = Watch {
            burst_seen: false,
            after_trim: resident(),
        };
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = shutdown.clone().recv() => return,
            }
            let now = cpu_time();
            if decide(now.saturating_sub(last), resident(), &mut watch) {
                let released = release();
                watch.trimmed(resident());
                tracing::debug!(
                    released,
                    "returned the allocator's free pages after a burst"
                );
            }
            last = now;
        }
    })
}

/// Resident bytes of the process (`/proc/self/statm`'s second field, in pages); 0 where it
/// cannot be read, which only turns off the growth rule.
fn resident() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * rustix::param::page_size() as u64)
}

/// CPU time the whole process has used.
fn cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// Asks glibc to return the free pages of every arena to the system (`malloc_trim(0)`);
/// whether anything was returned.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn release() -> bool {
    // SAFETY: `malloc_trim` takes no pointers and touches only glibc's own free lists, which
    // it locks arena by arena like any other allocator call.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Elsewhere there is nothing to ask.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_when_a_busy_second_is_followed_by_a_quiet_one() {
        let ms = Duration::from_millis;
        let rss = 20 << 20;
        let mut watch = Watch {
            burst_seen: false,
            after_trim: rss,
        };
        // Quiet from the start: nothing to give back.
        assert!(!decide(ms(0), rss, &mut watch));
        // A burst, then a middling second (still winding down), then quiet: one trim.
        let trims: Vec<bool> = [ms(900), ms(400), ms(50), ms(5), ms(5), ms(5)]
            .into_iter()
            .map(|cpu| decide(cpu, rss, &mut watch))
            .collect();
        assert_eq!(trims, [false, false, false, true, false, false]);
        // The next burst earns the next trim.
        assert!(!decide(ms(150), rss, &mut watch));
        assert!(decide(ms(0), rss, &mut watch));
    }

    #[test]
    fn memory_grown_without_a_busy_second_is_trimmed_in_a_quiet_one_once() {
        let ms = Duration::from_millis;
        let mut watch = Watch {
            burst_seen: false,
            after_trim: 20 << 20,
        };
        // Grown by less than GROWN: left alone.
        assert!(!decide(ms(5), (20 << 20) + GROWN - 1, &mut watch));
        // Grown by GROWN while the process stayed quiet (connections that held memory
        // closed): trimmed; not in a middling second.
        assert!(!decide(ms(50), 300 << 20, &mut watch));
        assert!(decide(ms(5), 300 << 20, &mut watch));
        // What stayed is the new mark: no trim every second after.
        watch.trimmed(290 << 20);
        assert!(!decide(ms(5), 290 << 20, &mut watch));
        assert!(!decide(ms(5), 295 << 20, &mut watch));
    }

    /// Resident memory of this process, from `/proc/self/status`.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn rss_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0)
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn release_returns_freed_pages_between_live_blocks_and_keeps_the_live_ones() {
        // 1,024 blocks of 64 KiB (under glibc's mmap threshold: they come from an arena),
        // written so their pages are resident; every eighth stays alive, so the freed ones
        // lie between live blocks where glibc never returns them on its own.
        let mut blocks: Vec<Option<Vec<u8>>> = (0..1024)
            .map(|i| Some(vec![(i % 251) as u8; 64 * 1024]))
            .collect();
        for (i, block) in blocks.iter_mut().enumerate() {
            if i % 8 != 0 {
                *block = None;
            }
        }
        let before = rss_kib();
        assert!(release(), "glibc had free pages to return");
        let after = rss_kib();
        // 56 MiB were freed; other tests run alongside, so ask for well under half of it.
        assert!(
            before.saturating_sub(after) >= 24 * 1024,
            "resident {before} KiB before, {after} KiB after"
        );
        for (i, block) in blocks.iter().enumerate() {
            if let Some(block) = block {
                assert!(
                    block.iter().all(|&b| b == (i % 251) as u8),
                    "block {i} changed"
                );
            }
        }
    }
}
