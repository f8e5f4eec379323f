//! Rate-limited log lines, one limiter per kind of event per shard: a client can make
//! the broker refuse, time out or fail requests as fast as it can send, and the log must
//! not become its amplifier. At most `LINES_PER_WINDOW` lines per `WINDOW`; the lines
//! held back are counted and the count goes out with the next line printed.

use std::cell::Cell;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(10);
const LINES_PER_WINDOW: u32 = 5;

#[derive(Default)]
pub struct RateLimitedLog {
    window_start: Cell<Option<Instant>>,
    printed: Cell<u32>,
    held_back: Cell<u64>,
    /// Events seen in all, printed or not.
    total: Cell<u64>,
}

impl RateLimitedLog {
    /// Counts the event, and prints `line()` unless this window's lines are spent.
    pub fn log(&self, line: impl FnOnce() -> String) {
        self.total.set(self.total.get() + 1);
        let now = Instant::now();
        let expired = self
            .window_start
            .get()
            .is_none_or(|start| now.duration_since(start) >= WINDOW);
        if expired {
            self.window_start.set(Some(now));
            self.printed.set(0);
        }
        if self.printed.get() >= LINES_PER_WINDOW {
            self.held_back.set(self.held_back.get() + 1);
            return;
        }
        self.printed.set(self.printed.get() + 1);
        let held_back = self.held_back.replace(0);
        if held_back == 0 {
            eprintln!("{}", line());
        } else {
            eprintln!("{} ({held_back} more like it not logged)", line());
        }
    }

    /// Every event counted so far.
    pub fn total(&self) -> u64 {
        self.total.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_past_the_window_limit_are_counted_not_printed() {
        let log = RateLimitedLog::default();
        let mut printed = 0;
        for _ in 0..100 {
            log.log(|| {
                printed += 1;
                "event".into()
            });
        }
        assert_eq!(printed, LINES_PER_WINDOW);
        assert_eq!(log.total(), 100);
        assert_eq!(log.held_back.get(), 100 - u64::from(LINES_PER_WINDOW));
    }
}
