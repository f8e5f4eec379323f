//! Rate-limited log events, one limiter per kind of event per shard: a client can make
//! the broker refuse, time out or fail requests as fast as it can send, and the log must
//! not become its amplifier. At most `log_lines_per_window_max` events per
//! `log_window_ms` are emitted; the ones held back are counted, and the count goes out
//! as the `held_back` field of the next event emitted (0 when none were).
//!
//! Runs on the shard's thread only (no locks: `Cell`s); the clock is passed in so that
//! the tests step it instead of sleeping.

use std::cell::Cell;
use std::time::{Duration, Instant};

use crate::config::ServerConfig;

pub struct RateLimitedLog {
    window: Duration,
    lines_per_window_max: u32,
    window_start: Cell<Option<Instant>>,
    emitted: Cell<u32>,
    held_back: Cell<u64>,
    /// Events seen in all, emitted or not.
    total: Cell<u64>,
}

impl RateLimitedLog {
    pub fn new(config: &ServerConfig) -> RateLimitedLog {
        RateLimitedLog {
            window: Duration::from_millis(u64::from(config.log_window_ms)),
            lines_per_window_max: config.log_lines_per_window_max,
            window_start: Cell::new(None),
            emitted: Cell::new(0),
            held_back: Cell::new(0),
            total: Cell::new(0),
        }
    }

    /// Counts the event, and calls `emit(held_back)` (which emits the tracing event)
    /// unless this window's lines are spent.
    pub fn log(&self, emit: impl FnOnce(u64)) {
        self.log_at(Instant::now(), emit);
    }

    fn log_at(&self, now: Instant, emit: impl FnOnce(u64)) {
        self.total.set(self.total.get() + 1);
        let expired = self
            .window_start
            .get()
            .is_none_or(|start| now.duration_since(start) >= self.window);
        if expired {
            self.window_start.set(Some(now));
            self.emitted.set(0);
        }
        if self.emitted.get() >= self.lines_per_window_max {
            self.held_back.set(self.held_back.get() + 1);
            return;
        }
        self.emitted.set(self.emitted.get() + 1);
        emit(self.held_back.replace(0));
    }

    /// Every event counted so far.
    pub fn total(&self) -> u64 {
        self.total.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(lines_per_window_max: u32) -> RateLimitedLog {
        RateLimitedLog::new(&ServerConfig {
            log_lines_per_window_max: lines_per_window_max,
            log_window_ms: 10_000,
            ..ServerConfig::default()
        })
    }

    #[test]
    fn lines_past_the_window_limit_are_counted_then_reported_with_the_next_window() {
        let log = limiter(5);
        let start = Instant::now();
        let mut emitted = Vec::new();
        for _ in 0..100 {
            log.log_at(start, |held_back| emitted.push(held_back));
        }
        assert_eq!(emitted, vec![0; 5]);
        assert_eq!(log.total(), 100);
        // Just before the window ends: still held back.
        log.log_at(start + Duration::from_millis(9_999), |_| {
            panic!("the window is not over")
        });
        let mut next = None;
        log.log_at(start + Duration::from_millis(10_000), |held_back| {
            next = Some(held_back)
        });
        assert_eq!(
            next,
            Some(96),
            "95 of the burst and 1 just before the window ended"
        );
        assert_eq!(log.total(), 102);
    }

    #[test]
    fn a_limit_of_zero_emits_nothing_and_counts_everything() {
        let log = limiter(0);
        for _ in 0..10 {
            log.log(|_| panic!("nothing is emitted"));
        }
        assert_eq!(log.total(), 10);
    }
}
