//! Fault points for integration tests (debug builds only): places in the broker that a
//! test can hold still, to look at what the rest of the broker does meanwhile.
//!
//! Not for anything but tests: a gate left closed stalls the calls that pass it for good.
//!
//! The environment's fault points (debug builds only, read by `shardq serve` and by an
//! in-process broker alike; `SHARDQ_TEST_*` is never a config key):
//! - `SHARDQ_TEST_SHARD_DIES_AT_START=<shard>`: that shard's thread ends before it joins
//!   (`server::start`);
//! - `SHARDQ_TEST_RECOVERY_DELAY_MS=<ms>`: each shard waits this long before recovering
//!   its partitions (`server::start_shard`);
//! - `SHARDQ_TEST_STALL_SHARD=<shard>:<after ms>:<for ms>`: blocks that shard's thread
//!   once it serves (`server::run_shard`);
//! - `SHARDQ_TEST_STOP_DELAY_MS=<ms>`: a stop takes this much longer (`server::run_shard`);
//! - `SHARDQ_TEST_PANIC_ON_TOPIC=<topic>`: the last shard panics installing that topic
//!   (`shard::Shard::install_topic`);
//! - `SHARDQ_TEST_FDATASYNC_DELAY_MS=<ms>`: every log round waits this long before its
//!   fdatasync ([`fdatasync_delay`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

/// Passed by every creation of a partition directory, on the blocking thread that makes
/// it (`LogStorage::create_directory`). A test closes it to hold topic creation inside
/// that call, and checks that the shard keeps serving (the call is off its reactor).
pub static PARTITION_DIRECTORY_GATE: Gate = Gate::new();

/// `SHARDQ_TEST_FDATASYNC_DELAY_MS=<ms>`: every round a partition log writes waits this
/// long before its fdatasync (`PartitionLog::write_round`), as a slow disk would make it.
/// For tests of `acks = durable` produces that are not durable within their
/// `timeout_ms` (protocol.md §5.5, Timeout): the batch is appended, its answer times out,
/// and it becomes durable once the delayed fdatasync completes. Read once per process;
/// unset, unparsable or 0: no delay.
pub fn fdatasync_delay() -> Option<Duration> {
    static DELAY: OnceLock<Option<Duration>> = OnceLock::new();
    *DELAY.get_or_init(|| {
        std::env::var("SHARDQ_TEST_FDATASYNC_DELAY_MS")
            .ok()
            .and_then(|value| value.parse::<u64>().ok())
            .filter(|delay| *delay > 0)
            .map(Duration::from_millis)
    })
}

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
