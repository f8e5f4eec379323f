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
//! - `SHARDQ_TEST_FDATASYNC_DELAY_MS=<ms>`: every log round waits this long after its
//!   writes, before its fdatasync (a round written through O_DSYNC: before it is
//!   acknowledged) ([`fdatasync_delay`]).
//!
//! [`fdatasync_delay`]: crate::test_hooks::fdatasync_delay

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

/// Passed by each partition's flusher before it writes a round (`PartitionLog`'s
/// flusher, on the shard's reactor, so it waits without blocking the thread). A test
/// closes it to keep appended data from becoming durable: acks=memory produces are
/// answered, durable ones wait, and the durable watermark stays where it is.
pub static DURABLE_ROUNDS: Gate = Gate::new();

/// Passed by shard 0 alone when the broker stops, before its connections stop reading
/// (on its reactor, waiting without blocking it). A test closes it to hold shard 0 still
/// serving while the other shards stop, and sends requests for their partitions through
/// a shard 0 connection opened before the stop.
pub static SHARD_ZERO_STOP: Gate = Gate::new();

/// Fetch long-polls parked on an owning shard, waiting for data (`Shard::fetch_owned`),
/// over every shard of every broker in the process. A test reads it to see a long-poll
/// whose client went away stop on its owner instead of waiting out its `wait_ms_max`.
pub static FETCH_LONG_POLLS_PARKED: Count = Count::new();

/// A count of things in progress, each held by a `Counted`.
pub struct Count(AtomicUsize);

impl Count {
    pub const fn new() -> Count {
        Count(AtomicUsize::new(0))
    }

    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// One more, until the returned guard is dropped.
    pub fn enter(&'static self) -> Counted {
        self.0.fetch_add(1, Ordering::SeqCst);
        Counted(self)
    }
}

impl Default for Count {
    fn default() -> Count {
        Count::new()
    }
}

/// One in a `Count`, while it lives.
pub struct Counted(&'static Count);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::SeqCst);
    }
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

    /// As `pass`, for a caller on a shard's reactor: it sleeps in short steps instead of
    /// blocking the thread, so the shard keeps serving everything else meanwhile.
    pub async fn pass_async(&self) {
        if !*self.lock() {
            return;
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        while *self.lock() {
            glommio::timer::sleep(std::time::Duration::from_millis(2)).await;
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
