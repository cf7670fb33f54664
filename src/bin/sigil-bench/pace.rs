//! Open-loop pacing for `--rate`: a dedicated OS thread releases request
//! slots on schedule (slot `i` at `t0 + i / rate`), and the clients wait for
//! a slot before they take the next prepared request.
//!
//! Why a thread and not `tokio::time::sleep_until`: tokio's timer has a
//! resolution of one millisecond. A sleep rounds its deadline up to the next
//! tick and fires when the runtime next turns its timer wheel, so each
//! request left 0–2 ms after its scheduled instant, and the requests of one
//! tick left together in a burst. Latency is measured from the *scheduled*
//! instant (so that a late client cannot hide queueing), which charged that
//! lateness to the broker: at 200 requests/s, with the broker idle, p50 was
//! 2.1 ms against 0.7 ms for one client back to back. A thread sleeping on
//! the kernel's high-resolution timer releases each slot within tens of
//! microseconds of its instant, and requests arrive evenly spaced.
//!
//! The thread is named `sigil-loadgen-pacer`, so its CPU time is the load
//! generator's in the report.
//!
//! The latency still counts from the scheduled instant: a slot released
//! late (the pacer thread was not scheduled in time) or taken late (every
//! client was busy) is charged to the request, as before.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tokio::sync::Semaphore;

/// Longest single sleep of the pacer thread, so that it notices `stop`
/// promptly even at very low rates.
const MAX_NAP: Duration = Duration::from_millis(50);

/// The schedule: `t0 + i / rate` for `i` in `0..slots`, ending before
/// `deadline`.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub t0: Instant,
    pub rate: f64,
    pub slots: usize,
    pub deadline: Option<Instant>,
}

impl Schedule {
    /// The scheduled instant of slot `i`.
    pub fn at(&self, i: usize) -> Instant {
        self.t0 + Duration::from_secs_f64(i as f64 / self.rate)
    }

    /// Whether slot `i` is part of the schedule.
    pub fn has(&self, i: usize) -> bool {
        i < self.slots && self.deadline.is_none_or(|d| self.at(i) < d)
    }
}

/// Releases the slots of a [`Schedule`] from its own thread; see the module docs.
pub struct Pacer {
    /// The schedule this pacer releases.
    pub schedule: Schedule,
    permits: Arc<Semaphore>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Pacer {
    /// Starts the pacer thread. When the schedule is over it releases
    /// `waiters` more permits, so that every client blocked in
    /// [`Pacer::ready`] wakes up, takes an index past the schedule and stops.
    ///
    /// # Errors
    /// The thread cannot be spawned.
    pub fn start(schedule: Schedule, waiters: usize) -> std::io::Result<Self> {
        let permits = Arc::new(Semaphore::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (permits, stop) = (Arc::clone(&permits), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("sigil-loadgen-pacer".into())
                .spawn(move || {
                    release(&schedule, &permits, &stop);
                    permits.add_permits(waiters);
                })?
        };
        Ok(Self {
            schedule,
            permits,
            stop,
            thread: Some(thread),
        })
    }

    /// Waits until the next slot is released (or the schedule is over).
    pub async fn ready(&self) {
        if let Ok(p) = self.permits.acquire().await {
            p.forget();
        }
    }
}

/// The pacer thread's loop: one permit per slot, each once its instant has
/// passed; slots that fell due while the thread was not running are
/// released together.
fn release(s: &Schedule, permits: &Semaphore, stop: &AtomicBool) {
    let mut next = 0;
    while s.has(next) && !stop.load(Relaxed) {
        let now = Instant::now();
        let at = s.at(next);
        if at > now {
            std::thread::sleep((at - now).min(MAX_NAP));
            continue;
        }
        let first = next;
        while s.has(next) && s.at(next) <= now {
            next += 1;
        }
        permits.add_permits(next - first);
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            // The thread only sleeps and adds permits; it cannot panic.
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_ends_at_the_deadline_or_the_last_slot() {
        let t0 = Instant::now();
        let s = Schedule {
            t0,
            rate: 1000.0,
            slots: 10_000,
            deadline: Some(t0 + Duration::from_millis(5)),
        };
        assert!(s.has(4));
        assert!(!s.has(5), "slot 5 is due at the deadline itself");
        let s = Schedule {
            deadline: None,
            slots: 3,
            ..s
        };
        assert!(s.has(2) && !s.has(3));
        assert_eq!(s.at(2) - t0, Duration::from_millis(2));
    }

    /// Every slot is released at or after its instant, none is lost, and
    /// the waiters are woken at the end.
    #[tokio::test(flavor = "current_thread")]
    async fn releases_each_slot_no_earlier_than_its_instant() {
        let t0 = Instant::now();
        let s = Schedule {
            t0,
            rate: 2000.0,
            slots: 100,
            deadline: None,
        };
        let pacer = Pacer::start(s, 2).unwrap();
        let mut late = Duration::ZERO;
        for i in 0..100 {
            pacer.ready().await;
            let now = Instant::now();
            assert!(now >= s.at(i), "slot {i} released early");
            late = late.max(now - s.at(i));
        }
        // The two extra permits for waiters, then nothing more.
        pacer.ready().await;
        pacer.ready().await;
        assert!(pacer.permits.available_permits() == 0);
        assert!(
            late < Duration::from_secs(1),
            "slots released {late:?} late"
        );
    }

    #[test]
    fn dropping_stops_a_slow_schedule_promptly() {
        let s = Schedule {
            t0: Instant::now(),
            rate: 0.01,
            slots: 10,
            deadline: None,
        };
        let pacer = Pacer::start(s, 1).unwrap();
        let started = Instant::now();
        drop(pacer);
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
