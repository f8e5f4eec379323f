//! Fault points for integration tests (debug builds only): places in the broker that a
//! test can hold still, to look at what the rest of the broker does meanwhile.
//!
//! Not for anything but tests: a gate left closed stalls the calls that pass it for good.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

/// Passed by every creation of a partition directory, on the blocking thread that makes
/// it (`LogStorage::create_directory`). A test closes it to hold topic creation inside
/// that call, and checks that the shard keeps serving (the call is off its reactor).
pub static PARTITION_DIRECTORY_GATE: Gate = Gate::new();

/// A gate callers wait at while it is closed.
pub struct Gate {
    closed: Mutex<bool>,
    changed: Condvar,
    waiting: AtomicUsize,
}

impl Gate {
    pub const fn new() -> Gate {
        Gate {
            closed: Mutex::new(false),
            changed: Condvar::new(),
            waiting: AtomicUsize::new(0),
        }
    }

    pub fn close(&self) {
        *self.lock() = true;
    }

    pub fn open(&self) {
        *self.lock() = false;
        self.changed.notify_all();
    }

    /// How many callers wait at the gate now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Returns at once while the gate is open; blocks the calling thread while it is
    /// closed.
    pub fn pass(&self) {
        let mut closed = self.lock();
        if !*closed {
            return;
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        while *closed {
            closed = self
                .changed
                .wait(closed)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, bool> {
        self.closed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Default for Gate {
    fn default() -> Gate {
        Gate::new()
    }
}
