//! The partition log: append into aligned chunks, group commit, reads up to the durable
//! watermark, segment rolling.
//!
//! Chunks. Appends copy batch bytes into the *active chunk*, a 4 KiB-aligned buffer from
//! glommio's registered io_uring arena that mirrors a 4 KiB-aligned range of the active
//! segment file. A chunk is *sealed* (made immutable and queued for writing) in two ways:
//! - it is full: it is cut at its last whole block; the partial block's bytes move to the
//!   front of the next chunk, so consecutive sealed chunks never overlap on disk and can
//!   be written concurrently;
//! - a flush starts: it is padded with zeros to the end of its partial block and written
//!   whole; the partial block's valid bytes are kept (`tail_bytes`) and become the start
//!   of the next chunk, so the next flush rewrites that block with more data in it.
//!
//! Worked example, 4096-byte blocks: 10,000 bytes appended to an empty segment, then a
//! flush: the chunk covers file bytes 0..12,288 (10,000 valid, 2,288 zeros); `tail_bytes`
//! holds bytes 8,192..10,000; the next chunk starts at file position 8,192 with those 1,808
//! bytes and the next flush writes from 8,192 again.
//!
//! Group commit. One flusher task per partition runs rounds: take every sealed chunk (and
//! seal the active one), write them, fdatasync each file written, then advance the durable
//! watermark and release the producers waiting on it. Appends that arrive during a round
//! go into the next one. Rounds never overlap, which is what makes rewriting the partial
//! block safe: two writes of the same block are never in flight together.
//!
//! Zero-fill. When the flusher has no round to run it writes zeros ahead of the active
//! segment's appended end, one chunk or one fdatasync at a time, within the shard's
//! bandwidth budget, so that later rounds write into blocks already written
//! (`storage::zero_fill` has why, and why it never overwrites data).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_channel::oneshot;
use glommio::io::DmaBuffer;
use glommio::sync::StaticPermit;
use glommio::task::JoinHandle;

use super::cache::{PartitionCache, TailCache};
use super::file::{DmaStorage, LogFile, LogStorage};
use super::index::{
    encode_entries, floor_entry, time_floor_entry, IndexEntry, ENTRIES_PER_BLOCK, INDEX_ENTRY_SIZE,
};
use super::producer_snapshot;
use super::producers::{KeptBatch, ProducerTable, SequenceCheck, SnapshotPoint};
use super::recovery::{self, RecoveredSegment};
use super::zero_fill::{self, ZeroFillBudget, ZeroFillConfig};
use super::{align_down, align_up, ChunkBudget, Notify, StorageError, ALIGNMENT_BYTES};
use crate::protocol::batch::{
    check_framing, decode_records, stamp_batch, BatchHeader, BATCH_HEADER_SIZE,
};

#[derive(Debug, Clone, Copy)]
pub struct LogConfig {
    pub segment_size_bytes: u64,
    /// Disk space is reserved (fallocate) this much at a time, ahead of the write
    /// position, rather than a whole segment up front: a new partition costs one step.
    pub preallocate_step_bytes: u64,
    pub chunk_size_bytes: usize,
    pub index_interval_bytes: u32,
    /// How long a partition waits before writing again after the disk said it was full.
    pub storage_full_retry: Duration,
    /// Keep one segment deleted by retention and reuse it for the next roll.
    pub recycle_segments: bool,
    pub failure_policy: FailurePolicy,
    /// Idempotent producers remembered per partition (docs/protocol.md §8.1).
    pub producers_per_partition_max: usize,
    /// The producer table is snapshotted after a round once this many bytes were
    /// appended since the last snapshot (also at a segment roll and at close).
    pub producer_snapshot_interval_bytes: u64,
    /// Zero-filling ahead of the write position (`storage::zero_fill`); the bandwidth
    /// budget is the shard's (`PartitionLog::open`).
    pub zero_fill: ZeroFillConfig,
    /// A round that is one write of at most this many bytes (and grows no file) goes
    /// through the segment's O_DSYNC handle, durable when the write returns, instead of
    /// a write and then an fdatasync: one I/O and one wake-up fewer. 0: every round is a
    /// write and an fdatasync.
    pub dsync_write_bytes_max: usize,
}

/// What a write or fdatasync error other than "disk full" does. Either way the partition
/// stops first: appends are refused and nothing past the last good fdatasync is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Then the whole process exits with `EXIT_STORAGE_FAILED` (the broker's setting: one
    /// shard must not die alone while its siblings serve on the same disk).
    ExitProcess,
    /// Only the partition stops (tests, and embedders that supervise partitions).
    StopPartition,
}

impl LogConfig {
    /// A batch must fit in a chunk behind the partial block the chunk may start with.
    pub fn batch_bytes_max(&self) -> usize {
        self.chunk_size_bytes - ALIGNMENT_BYTES
    }
}

/// The partition's metric handles (crate `metrics`; the shard registers them with its
/// topic and partition labels). Recording is an atomic add on a handle only this shard
/// writes. No-op handles until the shard sets them, and in storage tests.
#[derive(Clone)]
pub struct LogMetrics {
    pub produce_records: metrics::Counter,
    pub produce_bytes: metrics::Counter,
    pub durable_rounds: metrics::Counter,
    pub retention_deleted_segments: metrics::Counter,
    pub retention_deleted_bytes: metrics::Counter,
    pub round_records: metrics::Histogram,
    pub round_bytes: metrics::Histogram,
    pub write_seconds: metrics::Histogram,
    pub fdatasync_seconds: metrics::Histogram,
    /// A round written through the O_DSYNC handle, first write to last (no fdatasync).
    pub dsync_write_seconds: metrics::Histogram,
    pub tail_cache_hits: metrics::Counter,
    pub tail_cache_misses: metrics::Counter,
    /// Zero bytes written ahead of the write position (`storage::zero_fill`).
    pub zero_fill_bytes: metrics::Counter,
    /// How far the active segment is known written past its appended end.
    pub zero_fill_lookahead_bytes: metrics::Gauge,
}

impl Default for LogMetrics {
    fn default() -> Self {
        LogMetrics {
            produce_records: metrics::Counter::noop(),
            produce_bytes: metrics::Counter::noop(),
            durable_rounds: metrics::Counter::noop(),
            retention_deleted_segments: metrics::Counter::noop(),
            retention_deleted_bytes: metrics::Counter::noop(),
            round_records: metrics::Histogram::noop(),
            round_bytes: metrics::Histogram::noop(),
            write_seconds: metrics::Histogram::noop(),
            fdatasync_seconds: metrics::Histogram::noop(),
            dsync_write_seconds: metrics::Histogram::noop(),
            tail_cache_hits: metrics::Counter::noop(),
            tail_cache_misses: metrics::Counter::noop(),
            zero_fill_bytes: metrics::Counter::noop(),
            zero_fill_lookahead_bytes: metrics::Gauge::noop(),
        }
    }
}

/// How much a disk read of batches asks of the file at once, for a read of about
/// `bytes_hint` bytes: at least 64 KiB (small reads are not worth more calls), at most 4
/// MiB, plus one index interval (a read starts at the index entry at or before the
/// offset asked for) and one batch header (to see the next batch's length).
fn read_window_bytes(bytes_hint: u64, index_interval_bytes: u32) -> u64 {
    bytes_hint
        .clamp(64 * 1024, 4 << 20)
        .saturating_add(u64::from(index_interval_bytes))
        .saturating_add(BATCH_HEADER_SIZE as u64)
}

/// The most memory one `PartitionLog::read(_, bytes_max)` holds at once besides the batches
/// it returns: its read window, or a whole batch of up to `batch_bytes_max` when one runs
/// past the window, plus the two partial blocks an O_DIRECT read of an unaligned range
/// adds. (A read served from the tail cache holds no window.) Callers that count memory
/// (the connection byte budgets) reserve this for every read they may have running.
pub fn read_window_bytes_max(
    bytes_max: u64,
    index_interval_bytes: u32,
    batch_bytes_max: u64,
) -> u64 {
    read_window_bytes(bytes_max, index_interval_bytes).max(batch_bytes_max)
        + 2 * ALIGNMENT_BYTES as u64
}

/// Where a batch went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    pub base_offset: u64,
    /// One past the batch's last offset: what `wait_durable` takes.
    pub next_offset: u64,
    /// The batch was an idempotent producer's resend of a batch already stored: nothing
    /// was appended and the offsets are the original's.
    pub duplicate: bool,
}

pub(crate) struct Segment<F> {
    pub base_offset: u64,
    pub path: PathBuf,
    pub file: Rc<F>,
    pub index_path: PathBuf,
    pub index_file: Rc<F>,
    /// Sparse: the first batch, then one batch per `index_interval_bytes`.
    pub index: Vec<IndexEntry>,
    /// Entries already written to the index file.
    pub index_written: usize,
    /// Bytes appended (in memory, maybe not yet on disk).
    pub end_position: u64,
    /// Bytes covered by a completed fdatasync.
    pub durable_position: u64,
    /// The file's size: space reserved so far. Rounds grow it a step at a time before
    /// they write past it.
    pub allocated_bytes: u64,
    /// Every byte of the file below this has been written at least once (data, zeros, or
    /// an earlier life of a recycled file): writes there find written extents. Past it
    /// the file may hold unwritten (fallocated) extents. Only ever an underestimate.
    pub written_bytes: u64,
    /// Zeros were written to the file and no fdatasync has covered them yet.
    pub zero_fill_unsynced: bool,
    pub next_offset: u64,
    /// Largest batch timestamp in the segment (`i64::MIN` while empty).
    pub max_timestamp_ms: i64,
    /// When the broker last appended to it (`i64::MIN` while empty): what time-based
    /// retention goes by, since producers' clocks cannot be trusted to.
    pub last_append_ms: i64,
}

impl<F> Segment<F> {
    fn record_index(&mut self, offset: u64, position: u64, timestamp_ms: i64, interval: u32) {
        self.max_timestamp_ms = self.max_timestamp_ms.max(timestamp_ms);
        let due = match self.index.last() {
            None => true,
            Some(last) => position - last.position >= u64::from(interval),
        };
        if due {
            self.index.push(IndexEntry {
                offset,
                position,
                timestamp_ms: self.max_timestamp_ms,
            });
        }
    }

    /// The index blocks to write: whole blocks of new entries, or (when `all`) every
    /// entry not yet written, the partial last block zero-padded. Only entries whose
    /// batch is already durable go out: recovery trusts an index entry it can verify and
    /// scans only after it, so an entry must never survive a crash that its batch, or a
    /// batch before it, did not.
    fn index_write(&mut self, all: bool) -> Option<IndexWrite<F>> {
        let durable_entries = self
            .index
            .partition_point(|entry| entry.position < self.durable_position);
        let target = if all {
            durable_entries
        } else {
            durable_entries / ENTRIES_PER_BLOCK * ENTRIES_PER_BLOCK
        };
        if target <= self.index_written {
            return None;
        }
        let first = self.index_written / ENTRIES_PER_BLOCK * ENTRIES_PER_BLOCK;
        let length = align_up(((target - first) * INDEX_ENTRY_SIZE) as u64) as usize;
        let mut buffer = glommio::allocate_dma_buffer(length);
        encode_entries(
            &self.index[first..target],
            self.base_offset,
            buffer.as_bytes_mut(),
        );
        self.index_written = target;
        Some(IndexWrite {
            file: Rc::clone(&self.index_file),
            path: self.index_path.clone(),
            position: (first * INDEX_ENTRY_SIZE) as u64,
            buffer: Rc::new(buffer),
        })
    }
}

struct ActiveChunk<F> {
    buffer: DmaBuffer,
    permit: StaticPermit,
    file: Rc<F>,
    path: PathBuf,
    /// File position of `buffer[0]`; a multiple of the alignment.
    file_start: u64,
    filled: usize,
    /// Bytes at the front that were carried over from the previous chunk.
    carried: usize,
    /// Whether those carried bytes are already written (they came from a flush, which
    /// writes the partial block) or still only here (a full chunk writes whole blocks).
    carried_written: bool,
    segment_base: u64,
    /// Offset of the first batch appended into this chunk.
    first_offset: Option<u64>,
}

impl<F> ActiveChunk<F> {
    /// A copy of the bytes appended into this chunk, for the tail cache once they are
    /// durable; `None` when caching is off or nothing was appended.
    fn appended_bytes(&self, cache: bool) -> Option<(u64, u64, Bytes)> {
        let first_offset = self.first_offset.filter(|_| cache)?;
        let bytes = Bytes::copy_from_slice(&self.buffer.as_bytes()[self.carried..self.filled]);
        Some((self.segment_base, first_offset, bytes))
    }
}

struct SealedChunk<F> {
    /// Immutable once sealed; shared with the write in flight so a round that must be
    /// retried still has its bytes.
    buffer: Rc<DmaBuffer>,
    _permit: Option<StaticPermit>,
    file: Rc<F>,
    path: PathBuf,
    file_start: u64,
    /// (segment base offset, first offset, bytes) for the tail cache.
    appended: Option<(u64, u64, Bytes)>,
}

struct State<F> {
    segments: Vec<Segment<F>>,
    next_offset: u64,
    durable_offset: u64,
    active: Option<ActiveChunk<F>>,
    /// When no chunk is active: the valid bytes of the active segment's partial last
    /// block, which the next chunk starts with.
    tail_bytes: Vec<u8>,
    /// Whether `tail_bytes` are on disk already.
    tail_written: bool,
    sealed: Vec<SealedChunk<F>>,
    rolling: bool,
    closed: bool,
    /// Set by `close` once the flusher has written its last round.
    flusher_stopped: bool,
    /// Set when the disk reported it was full; cleared by the next successful round.
    /// Appends are refused meanwhile.
    full: bool,
    /// Set when a write or sync failed for another reason: the partition has stopped.
    failed: Option<StorageError>,
    /// The first offset found damaged on disk (by a read's CRC check), and the error:
    /// nothing at or past it is served.
    corrupt: Option<(u64, StorageError)>,
    /// A round the disk refused for lack of space, written again before anything newer.
    retry: Option<Round<F>>,
    durable_waiters: VecDeque<(u64, oneshot::Sender<Result<(), StorageError>>)>,
    /// Idempotent producers' recent batches; checked and updated under the same borrow
    /// that assigns offsets.
    producers: ProducerTable,
    /// Bytes appended since the producer table was last captured for a snapshot.
    producer_snapshot_bytes: u64,
}

enum AppendStep {
    AwaitRoll(oneshot::Receiver<()>),
    Roll,
    AwaitChunk,
}

/// A durable byte range of one segment to walk.
/// The outcome of a bounded lookup by time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeLookup {
    /// The offset found, or None when the lookup gave up at its byte bound.
    pub offset: Option<u64>,
    /// Bytes of batches decoded on the way (those whose max timestamp was not below the
    /// time asked).
    pub scanned_bytes: u64,
}

struct ReadSpan<F> {
    file: Rc<F>,
    path: PathBuf,
    position: u64,
    /// Offset of the batch at `position` (from the index).
    offset: u64,
    end_position: u64,
}

impl<F> ReadSpan<F> {
    fn of(segment: &Segment<F>, entry: &IndexEntry) -> ReadSpan<F> {
        ReadSpan {
            file: Rc::clone(&segment.file),
            path: segment.path.clone(),
            position: entry.position,
            offset: entry.offset,
            end_position: segment.durable_position,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Visit {
    Continue,
    Stop,
}

/// Index blocks on their way to the index file.
struct IndexWrite<F> {
    file: Rc<F>,
    path: PathBuf,
    position: u64,
    buffer: Rc<DmaBuffer>,
}

/// A file to grow (fallocate) before a round writes into it.
struct Extension<F> {
    file: Rc<F>,
    path: PathBuf,
    size: u64,
}

/// What a zero-fill step did, for the flusher loop.
enum ZeroFillStep {
    /// A write or sync ran (or space was reserved): look for a round, then go on.
    Done,
    /// Nothing to do: wait for an append.
    Idle,
    /// The shard's bandwidth budget is spent for this long.
    Wait(Duration),
}

/// A segment's O_DSYNC handle (`PartitionLog::dsync_handle`).
struct DsyncHandle<F> {
    /// The segment's own file, weak so that the handle never keeps the segment from
    /// being recycled (`delete_segments` counts its strong references).
    segment: std::rc::Weak<F>,
    /// None: opening it failed, and that segment's rounds fdatasync.
    handle: Option<Rc<F>>,
}

impl<F> DsyncHandle<F> {
    fn is_for(&self, file: &Rc<F>) -> bool {
        std::ptr::eq(self.segment.as_ptr(), Rc::as_ptr(file))
    }
}

/// How a round's writes were made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RoundSync {
    /// Written, then every file written was fdatasync'ed.
    Synced,
    /// One write through an O_DSYNC handle: durable as written, and nothing else with it.
    Written,
}

/// What one group-commit round writes and what it makes durable.
struct Round<F> {
    /// Space reserved before the writes; kept with a round retried after a full disk.
    extensions: Vec<Extension<F>>,
    chunks: Vec<SealedChunk<F>>,
    /// Written with the chunks but not synced: an index is rebuilt from its segment.
    index: Option<IndexWrite<F>>,
    next_offset: u64,
    segment_base_offset: u64,
    segment_end_position: u64,
    /// The producer table as of `next_offset`, encoded, when a snapshot is due: written
    /// once the round is durable, so a snapshot never covers what a crash could lose.
    producer_snapshot: Option<(SnapshotPoint, Vec<u8>)>,
}

pub struct PartitionLog<S: LogStorage = DmaStorage> {
    storage: Rc<S>,
    directory: PathBuf,
    config: LogConfig,
    budget: Rc<ChunkBudget>,
    state: RefCell<State<S::File>>,
    flush_wanted: Notify,
    /// Recently written batches of this partition, within the shard's cache budget.
    cache: Rc<PartitionCache>,
    tail_cache: Rc<TailCache>,
    /// Shared by every partition of the shard, so one long-poll can wait on many.
    data_arrived: Rc<Notify>,
    roll_done: Notify,
    flusher: RefCell<Option<JoinHandle<()>>>,
    /// One producer snapshot written at a time (the flusher's, a roll's, close's), and
    /// never an older one over a newer: the offset of the last one written.
    producer_snapshot_lock: glommio::sync::Semaphore,
    producer_snapshot_offset: std::cell::Cell<Option<u64>>,
    metrics: RefCell<LogMetrics>,
    /// The shard's bandwidth budget for zero-filling (`storage::zero_fill`).
    zero_fill_budget: Rc<ZeroFillBudget>,
    /// A zero-fill write or sync is in flight (on the flusher): no round may be.
    zero_fill_in_flight: std::cell::Cell<bool>,
    /// Zero bytes this log has written, over its life (the metric counts the same).
    zero_filled_bytes: std::cell::Cell<u64>,
    /// Woken after each zero-fill step, for whoever waits on its progress (tests).
    zero_fill_progress: Notify,
    /// The last zero-fill step found nothing to do, and no round ran since.
    zero_fill_idle: std::cell::Cell<bool>,
    /// The O_DSYNC handle of the last segment rounds wrote through one.
    dsync_handle: RefCell<Option<DsyncHandle<S::File>>>,
}

/// Milliseconds since the Unix epoch by the broker's clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or(0)
}

impl<S: LogStorage> PartitionLog<S> {
    /// Opens (recovering) or creates the log in `directory`, and starts its flusher.
    pub async fn open(
        storage: Rc<S>,
        directory: PathBuf,
        config: LogConfig,
        budget: Rc<ChunkBudget>,
        tail_cache: Rc<TailCache>,
        data_arrived: Rc<Notify>,
        zero_fill_budget: Rc<ZeroFillBudget>,
    ) -> Result<Rc<PartitionLog<S>>, StorageError> {
        assert!(
            config.chunk_size_bytes <= budget.chunk_size_bytes(),
            "chunks must fit the budget's unit"
        );
        let recovered = recovery::recover(&*storage, &directory, &config).await?;
        let RecoveredSegment {
            segments,
            tail_bytes,
        } = recovered;
        let producers = producer_snapshot::recover_table(
            &*storage,
            &directory,
            &segments,
            config.producers_per_partition_max,
        )
        .await?;
        let next_offset = segments
            .last()
            .expect("recovery leaves a segment")
            .next_offset;
        let log = Rc::new(PartitionLog {
            storage,
            directory,
            config,
            budget,
            state: RefCell::new(State {
                segments,
                next_offset,
                durable_offset: next_offset,
                active: None,
                tail_bytes,
                tail_written: true,
                sealed: Vec::new(),
                rolling: false,
                closed: false,
                flusher_stopped: false,
                full: false,
                failed: None,
                corrupt: None,
                retry: None,
                durable_waiters: VecDeque::new(),
                producers,
                producer_snapshot_bytes: 0,
            }),
            flush_wanted: Notify::new(),
            cache: Rc::new(PartitionCache::default()),
            tail_cache,
            data_arrived,
            roll_done: Notify::new(),
            flusher: RefCell::new(None),
            producer_snapshot_lock: glommio::sync::Semaphore::new(1),
            producer_snapshot_offset: std::cell::Cell::new(None),
            metrics: RefCell::new(LogMetrics::default()),
            zero_fill_budget,
            zero_fill_in_flight: std::cell::Cell::new(false),
            zero_filled_bytes: std::cell::Cell::new(0),
            zero_fill_progress: Notify::new(),
            zero_fill_idle: std::cell::Cell::new(false),
            dsync_handle: RefCell::new(None),
        });
        let flusher = glommio::spawn_local(Rc::clone(&log).run_flusher()).detach();
        *log.flusher.borrow_mut() = Some(flusher);
        Ok(log)
    }

    pub fn directory(&self) -> &Path {
        &self.directory
    }

    /// The first offset still stored.
    pub fn log_start_offset(&self) -> u64 {
        self.state.borrow().segments[0].base_offset
    }

    /// One past the last durable offset: what consumers may read up to.
    pub fn high_watermark(&self) -> u64 {
        self.state.borrow().durable_offset
    }

    /// One past the last appended offset (durable or not).
    pub fn next_offset(&self) -> u64 {
        self.state.borrow().next_offset
    }

    pub fn segment_count(&self) -> usize {
        self.state.borrow().segments.len()
    }

    /// Bytes of batches in the partition's segments (appended, durable or not).
    pub fn stored_bytes(&self) -> u64 {
        self.state
            .borrow()
            .segments
            .iter()
            .map(|segment| segment.end_position)
            .sum()
    }

    /// Where the partition records its metrics from now on.
    pub fn set_metrics(&self, metrics: LogMetrics) {
        *self.metrics.borrow_mut() = metrics;
    }

    /// Copies a validated batch into the log, assigning its offsets. Resolves once the
    /// batch is in memory; `wait_durable` says when it is on disk. Waits (backpressure)
    /// while the shard's chunk budget is spent or a segment is being rolled.
    pub async fn append(&self, batch: &[u8]) -> Result<AppendOutcome, StorageError> {
        let length = batch.len();
        if length > self.config.batch_bytes_max() {
            return Err(StorageError::BatchTooLarge {
                length,
                length_max: self.config.batch_bytes_max(),
            });
        }
        let header = BatchHeader::read(batch).expect("appended batches are validated first");
        assert_eq!(
            header.batch_length as usize, length,
            "appended batches are validated first"
        );
        loop {
            // Decide under the borrow, then await with no borrow held.
            let step = {
                let mut state = self.state.borrow_mut();
                // Before the writable check: a resend of a batch queued on a full disk is
                // that batch, not a new one refused for space.
                if let Some(duplicate) = state.check_producer(&header)? {
                    return Ok(duplicate);
                }
                state.check_writable(&self.directory)?;
                let segment = state.segments.last().expect("a log has a segment");
                let roll_due = segment.end_position > 0
                    && segment.end_position + length as u64 > self.config.segment_size_bytes;
                let fits = state
                    .active
                    .as_ref()
                    .is_some_and(|active| active.filled + length <= active.buffer.len());
                if state.rolling {
                    AppendStep::AwaitRoll(self.roll_done.listen())
                } else if roll_due {
                    state.rolling = true;
                    AppendStep::Roll
                } else if fits {
                    return Ok(self.copy_into_active(&mut state, batch, &header));
                } else {
                    if state.active.is_some() {
                        // Full: cut at the last whole block and queue it; the partial
                        // block moves to the next chunk.
                        Self::seal_full_chunk(&mut state, self.caching());
                        self.flush_wanted.notify_all();
                    }
                    AppendStep::AwaitChunk
                }
            };
            match step {
                AppendStep::AwaitRoll(done) => {
                    let _ = done.await;
                }
                AppendStep::Roll => self.roll_claimed().await?,
                AppendStep::AwaitChunk => {
                    let permit = self.budget.acquire().await;
                    self.install_chunk(permit)?;
                }
            }
        }
    }

    /// Rolls to a new segment; the caller has set `rolling`. Clears it, wakes appends
    /// waiting for the roll, and applies the failure policy to an error that stops the
    /// partition.
    async fn roll_claimed(&self) -> Result<(), StorageError> {
        let rolled = self.roll().await;
        let stopped = {
            let mut state = self.state.borrow_mut();
            state.rolling = false;
            match &rolled {
                // A full disk is retried by the next append; anything else
                // means the disk cannot be trusted, as for a failed round.
                Err(error)
                    if !matches!(error, StorageError::NoSpace { .. } | StorageError::Closed)
                        && state.failed.is_none() =>
                {
                    state.failed = Some(StorageError::Stopped {
                        reason: error.to_string(),
                    });
                    true
                }
                _ => false,
            }
        };
        self.roll_done.notify_all();
        if stopped {
            let error = rolled.as_ref().expect_err("checked above");
            tracing::error!(
                partition_directory = %self.directory.display(),
                error = %error,
                "rolling to a new segment: {error}; the partition has stopped"
            );
            self.apply_failure_policy("rolling to a new segment", error);
        }
        rolled
    }

    /// Makes a new active chunk that starts with the partial block, unless another
    /// append did so (or started a roll) while this one waited for budget: then the
    /// permit simply goes back.
    fn install_chunk(&self, permit: StaticPermit) -> Result<(), StorageError> {
        let mut state = self.state.borrow_mut();
        state.check_writable(&self.directory)?;
        if state.active.is_some() || state.rolling {
            return Ok(());
        }
        let segment = state.segments.last().expect("a log has a segment");
        let file = Rc::clone(&segment.file);
        let path = segment.path.clone();
        let file_start = align_down(segment.end_position);
        let mut buffer = glommio::allocate_dma_buffer(self.config.chunk_size_bytes);
        let carried = state.tail_bytes.len();
        assert_eq!(
            file_start + carried as u64,
            segment.end_position,
            "the carried partial block ends where the segment does"
        );
        buffer.as_bytes_mut()[..carried].copy_from_slice(&state.tail_bytes);
        let segment_base = segment.base_offset;
        state.tail_bytes.clear();
        let carried_written = state.tail_written;
        state.active = Some(ActiveChunk {
            buffer,
            permit,
            file,
            path,
            file_start,
            filled: carried,
            carried,
            carried_written,
            segment_base,
            first_offset: None,
        });
        Ok(())
    }

    fn copy_into_active(
        &self,
        state: &mut State<S::File>,
        batch: &[u8],
        header: &BatchHeader,
    ) -> AppendOutcome {
        let base_offset = state.next_offset;
        let active = state.active.as_mut().expect("checked by the caller");
        let start = active.filled;
        active.first_offset.get_or_insert(base_offset);
        let target = &mut active.buffer.as_bytes_mut()[start..start + batch.len()];
        target.copy_from_slice(batch);
        let append_time_ms = now_ms();
        stamp_batch(target, base_offset, append_time_ms);
        active.filled += batch.len();
        let position = active.file_start + start as u64;
        let next_offset = base_offset + u64::from(header.record_count);
        let interval = self.config.index_interval_bytes;
        let segment = state.segments.last_mut().expect("a log has a segment");
        assert_eq!(segment.end_position, position, "chunk and segment disagree");
        segment.record_index(base_offset, position, header.max_timestamp_ms, interval);
        segment.last_append_ms = segment.last_append_ms.max(append_time_ms);
        segment.end_position = position + batch.len() as u64;
        segment.next_offset = next_offset;
        state.next_offset = next_offset;
        state.producer_snapshot_bytes += batch.len() as u64;
        if header.producer_id != 0 {
            let kept = KeptBatch {
                sequence: header.sequence,
                base_offset,
                next_offset,
                crc: header.crc,
            };
            state.producers.record(header.producer_id, kept);
        }
        self.flush_wanted.notify_all();
        {
            let metrics = self.metrics.borrow();
            metrics
                .produce_records
                .increment(u64::from(header.record_count));
            metrics.produce_bytes.increment(batch.len() as u64);
        }
        AppendOutcome {
            base_offset,
            next_offset,
            duplicate: false,
        }
    }

    fn caching(&self) -> bool {
        self.tail_cache.bytes_max() > 0
    }

    fn seal_full_chunk(state: &mut State<S::File>, cache: bool) {
        let mut active = state.active.take().expect("sealing needs an active chunk");
        let whole = align_down(active.filled as u64) as usize;
        assert!(
            whole >= ALIGNMENT_BYTES,
            "a full chunk holds at least one whole block, since batches are a block smaller than chunks"
        );
        let appended = active.appended_bytes(cache);
        state.tail_bytes.clear();
        state
            .tail_bytes
            .extend_from_slice(&active.buffer.as_bytes()[whole..active.filled]);
        // This chunk writes only whole blocks: the partial block reaches the disk with
        // the next chunk, which must therefore be written even if nothing else is added.
        state.tail_written = false;
        active.buffer.trim_to_size(whole);
        state.sealed.push(SealedChunk {
            buffer: Rc::new(active.buffer),
            _permit: Some(active.permit),
            file: active.file,
            path: active.path,
            file_start: active.file_start,
            appended,
        });
    }

    /// Seals the active chunk for a flush: zero-pad to the block end, keep the partial
    /// block's bytes for the next chunk.
    fn seal_for_flush(state: &mut State<S::File>, cache: bool) {
        let Some(mut active) = state.active.take() else {
            // A full chunk was sealed (whole blocks only) and no chunk has taken over its
            // partial block yet (an append is waiting for budget): that block must be in
            // this round, or the round would mark bytes durable that were never written.
            if !state.tail_written && !state.tail_bytes.is_empty() {
                let segment = state.segments.last().expect("a log has a segment");
                let mut buffer = glommio::allocate_dma_buffer(ALIGNMENT_BYTES);
                let bytes = buffer.as_bytes_mut();
                bytes[..state.tail_bytes.len()].copy_from_slice(&state.tail_bytes);
                bytes[state.tail_bytes.len()..].fill(0);
                let sealed = SealedChunk {
                    buffer: Rc::new(buffer),
                    // One block, at most one per partition at a time: outside the chunk
                    // budget.
                    _permit: None,
                    file: Rc::clone(&segment.file),
                    path: segment.path.clone(),
                    file_start: align_down(segment.end_position),
                    appended: None,
                };
                state.sealed.push(sealed);
                state.tail_written = true;
            }
            return;
        };
        if active.filled == active.carried && active.carried_written {
            // Nothing new since the chunk was started, and what it carried is on disk.
            state.tail_bytes.clear();
            state
                .tail_bytes
                .extend_from_slice(&active.buffer.as_bytes()[..active.filled]);
            return;
        }
        let appended = active.appended_bytes(cache);
        let padded = align_up(active.filled as u64) as usize;
        let partial_start = align_down(active.filled as u64) as usize;
        let bytes = active.buffer.as_bytes_mut();
        // The arena recycles memory: padding must be zeros, not a previous chunk's bytes,
        // or recovery could mistake them for a batch.
        bytes[active.filled..padded].fill(0);
        state.tail_bytes.clear();
        state
            .tail_bytes
            .extend_from_slice(&bytes[partial_start..active.filled]);
        state.tail_written = true;
        active.buffer.trim_to_size(padded);
        state.sealed.push(SealedChunk {
            buffer: Rc::new(active.buffer),
            _permit: Some(active.permit),
            file: active.file,
            path: active.path,
            file_start: active.file_start,
            appended,
        });
    }

    /// Starts a new segment at the next offset. The old segment is made durable first, so
    /// a segment file exists only once every segment before it is complete on disk: after
    /// a crash, only the last segment can have a torn tail.
    async fn roll(&self) -> Result<(), StorageError> {
        let base_offset = {
            let mut state = self.state.borrow_mut();
            Self::seal_for_flush(&mut state, self.caching());
            state.next_offset
        };
        self.flush_wanted.notify_all();
        self.wait_durable(base_offset).await?;
        // On failure (a full disk, say) the old segment stays the active one, with its
        // partial block kept, and a later append tries the roll again.
        self.seal_index().await?;
        // The producer table as of the old segment's end, before the new segment exists:
        // then recovery never needs to scan more than the last segment to rebuild it.
        // Appends are held off (rolling) and everything is durable, so the table is
        // exactly that of `base_offset`. This is the one snapshot not written by the
        // flusher; a roll already waits on the disk for the index and the new file.
        let (point, bytes) = self.state.borrow_mut().capture_producer_snapshot();
        assert_eq!(point.offset, base_offset, "a roll holds appends off");
        self.write_producer_snapshot(point, &bytes).await;
        let segment =
            recovery::create_segment(&*self.storage, &self.directory, base_offset, &self.config)
                .await?;
        let mut state = self.state.borrow_mut();
        state.tail_bytes.clear();
        state.segments.push(segment);
        Ok(())
    }

    /// Deletes whole segments from the head while the partition would still hold at
    /// least `bytes_max` bytes without them, or while their last append is older than
    /// `ms_max` milliseconds (0: no limit). The active segment is never deleted, and a
    /// sealed one is entirely durable (a roll waits for that), so nothing unwritten goes.
    /// Returns how many segments went.
    pub async fn apply_retention(
        &self,
        bytes_max: u64,
        ms_max: u64,
    ) -> Result<usize, StorageError> {
        self.apply_retention_at(bytes_max, ms_max, now_ms()).await
    }

    /// `apply_retention` with the current time given (ms since the Unix epoch): the age
    /// rule is the only part with time in it, so tests step this clock instead of
    /// waiting for segments to age (retention_tests.rs).
    pub async fn apply_retention_at(
        &self,
        bytes_max: u64,
        ms_max: u64,
        now: i64,
    ) -> Result<usize, StorageError> {
        let removed: Vec<Segment<S::File>> = {
            let mut state = self.state.borrow_mut();
            let mut total: u64 = state
                .segments
                .iter()
                .map(|segment| segment.end_position)
                .sum();
            let mut removed = Vec::new();
            while state.segments.len() > 1 {
                let head = &state.segments[0];
                let by_size = bytes_max > 0 && total - head.end_position >= bytes_max;
                let by_age = ms_max > 0
                    && head.last_append_ms != i64::MIN
                    && now.saturating_sub(head.last_append_ms)
                        > i64::try_from(ms_max).unwrap_or(i64::MAX);
                if !(by_size || by_age) {
                    break;
                }
                total -= head.end_position;
                removed.push(state.segments.remove(0));
            }
            removed
        };
        self.delete_segments(removed).await
    }

    /// Deletes every record stored before this call: rolls to a new segment (unless the
    /// active one is empty), then deletes every segment before it, so the log start moves
    /// to what was the high watermark. Appends made meanwhile go to the new segment and
    /// stay. Returns the new log start.
    pub async fn purge(&self) -> Result<u64, StorageError> {
        let purge_point = loop {
            let step = {
                let mut state = self.state.borrow_mut();
                state.check_writable(&self.directory)?;
                let active = state.segments.last().expect("a log has a segment");
                if state.rolling {
                    Some(self.roll_done.listen())
                } else if active.end_position == 0 {
                    break active.base_offset;
                } else {
                    state.rolling = true;
                    None
                }
            };
            match step {
                Some(done) => {
                    let _ = done.await;
                }
                None => self.roll_claimed().await?,
            }
        };
        let removed: Vec<Segment<S::File>> = {
            let mut state = self.state.borrow_mut();
            let mut removed = Vec::new();
            while state.segments.len() > 1 && state.segments[1].base_offset <= purge_point {
                removed.push(state.segments.remove(0));
            }
            removed
        };
        self.delete_segments(removed).await?;
        Ok(self.log_start_offset())
    }

    /// Deletes segments already taken out of the log (its head). Returns how many.
    async fn delete_segments(&self, removed: Vec<Segment<S::File>>) -> Result<usize, StorageError> {
        if removed.is_empty() {
            return Ok(0);
        }
        for segment in &removed {
            assert_eq!(
                segment.durable_position, segment.end_position,
                "only segments that are entirely durable are deleted"
            );
        }
        // A removed segment's O_DSYNC handle goes with it, before the file may be kept as
        // the spare (and written again as another segment).
        {
            let mut handle = self.dsync_handle.borrow_mut();
            let held_by_removed = handle
                .as_ref()
                .is_some_and(|kept| removed.iter().any(|segment| kept.is_for(&segment.file)));
            if held_by_removed {
                *handle = None;
            }
        }
        // The log start has already moved: reads below it get OffsetOutOfRange, and a
        // read in flight keeps its own handle on the file until it finishes. One deleted
        // segment is kept as the spare the next roll recycles (fast fresh writes).
        let spare = self.directory.join(recovery::SPARE_SEGMENT_FILE);
        for segment in &removed {
            self.cache.drop_segment(segment.base_offset);
            // Only a file no read or write still holds: a lagging reader must not see it
            // overwritten as the next segment.
            // The segment is out of the log already, so no new read can take its file
            // while the calls below run (on the blocking thread, off the reactor).
            if self.config.recycle_segments
                && Rc::strong_count(&segment.file) == 1
                && !self.storage.exists(&spare).await.unwrap_or(true)
            {
                self.storage
                    .rename(&segment.path, &spare)
                    .await
                    .map_err(|source| {
                        StorageError::io("keeping a spare segment", &segment.path, source)
                    })?;
            }
            for path in [&segment.path, &segment.index_path] {
                self.storage
                    .remove_file(path)
                    .await
                    .map_err(|source| StorageError::io("deleting segment", path, source))?;
            }
        }
        self.storage
            .sync_directory(&self.directory)
            .await
            .map_err(|source| StorageError::io("syncing directory", &self.directory, source))?;
        let metrics = self.metrics.borrow();
        metrics
            .retention_deleted_segments
            .increment(removed.len() as u64);
        metrics
            .retention_deleted_bytes
            .increment(removed.iter().map(|segment| segment.end_position).sum());
        Ok(removed.len())
    }

    /// Writes every index entry of the last segment and syncs the index file. Called
    /// with no round in flight that could write the same block (a roll has waited for
    /// durability and holds appends off; close runs after the flusher stopped).
    async fn seal_index(&self) -> Result<(), StorageError> {
        let write = {
            let mut state = self.state.borrow_mut();
            let segment = state.segments.last_mut().expect("a log has a segment");
            segment.index_write(true)
        };
        let Some(write) = write else {
            return Ok(());
        };
        write_whole(
            &*write.file,
            write.buffer,
            write.position,
            &write.path,
            "writing index",
        )
        .await?;
        write
            .file
            .fdatasync()
            .await
            .map_err(|source| StorageError::io("syncing index", &write.path, source))
    }

    /// Resolves once every offset below `next_offset` is durable.
    pub async fn wait_durable(&self, next_offset: u64) -> Result<(), StorageError> {
        let receiver = {
            let mut state = self.state.borrow_mut();
            if state.durable_offset >= next_offset {
                return Ok(());
            }
            if let Some(error) = &state.failed {
                return Err(error.clone());
            }
            // Closing still writes what was appended: only once the flusher has stopped
            // is an undurable offset lost to this log.
            if state.flusher_stopped {
                return Err(StorageError::Closed);
            }
            let (sender, receiver) = oneshot::channel();
            // Appends that finished in one order may wait in another: keep the queue
            // sorted so a round releases exactly a prefix.
            let at = state
                .durable_waiters
                .partition_point(|(target, _)| *target <= next_offset);
            state.durable_waiters.insert(at, (next_offset, sender));
            receiver
        };
        self.flush_wanted.notify_all();
        receiver.await.unwrap_or(Err(StorageError::Closed))
    }

    /// Waits until data beyond `offset` is readable, the log closes, or `wait` passes.
    pub async fn wait_for_data(&self, offset: u64, wait: Duration) {
        let deadline = std::time::Instant::now() + wait;
        loop {
            let listener = self.data_arrived.listen();
            {
                let state = self.state.borrow();
                if state.durable_offset > offset || state.closed {
                    return;
                }
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return;
            }
            let _ = glommio::timer::timeout(deadline - now, async {
                let _ = listener.await;
                Ok(())
            })
            .await;
        }
    }

    /// Reads whole batches starting with the one that holds `offset`, up to `bytes_max`
    /// (at least one batch when any is readable), never past the durable watermark and
    /// never across a segment end: the next read continues in the next segment.
    pub async fn read(&self, offset: u64, bytes_max: usize) -> Result<Bytes, StorageError> {
        let span = {
            let state = self.state.borrow();
            let log_start_offset = state.segments[0].base_offset;
            if offset < log_start_offset || offset > state.durable_offset {
                return Err(StorageError::OffsetOutOfRange {
                    requested: offset,
                    log_start_offset,
                    high_watermark: state.durable_offset,
                });
            }
            if let Some((corrupt_offset, error)) = &state.corrupt {
                if offset >= *corrupt_offset {
                    return Err(error.clone());
                }
            }
            if offset == state.durable_offset {
                return Ok(Bytes::new());
            }
            let segment_index = state
                .segments
                .partition_point(|segment| segment.base_offset <= offset)
                - 1;
            let segment = &state.segments[segment_index];
            let ranges =
                self.cache
                    .ranges_from(segment.base_offset, offset, CACHED_RANGES_PER_READ_MAX);
            if let Some(batches) = cached_batches(&ranges, offset, bytes_max) {
                self.metrics.borrow().tail_cache_hits.increment(1);
                return Ok(batches);
            }
            self.metrics.borrow().tail_cache_misses.increment(1);
            let entry = floor_entry(&segment.index, offset)
                .expect("a readable offset lies at or after its segment's first batch");
            ReadSpan::of(segment, entry)
        };
        // Sized once: what is asked for or what the segment holds past the read's start,
        // whichever is less (the answer holds about that much, or one larger batch). A
        // buffer grown by doubling could hold twice its length, and each growth copies.
        let mut out = BytesMut::with_capacity(
            (span.end_position - span.position).min(bytes_max as u64) as usize,
        );
        let scanned = self
            .scan_batches(span, bytes_max as u64, |header, batch| {
                if header.next_offset() <= offset {
                    return Visit::Continue;
                }
                if !out.is_empty() && out.len() + batch.len() > bytes_max {
                    return Visit::Stop;
                }
                out.extend_from_slice(batch);
                if out.len() >= bytes_max {
                    Visit::Stop
                } else {
                    Visit::Continue
                }
            })
            .await;
        match scanned {
            Ok(()) => Ok(out.freeze()),
            // What came before the damage is good; the next read starts at the damage
            // and gets the error.
            Err(StorageError::Corrupt { .. }) if !out.is_empty() => Ok(out.freeze()),
            Err(error) => Err(error),
        }
    }

    /// The first offset whose record has a timestamp at or after `timestamp_ms`, or the
    /// high watermark when no readable record is that late.
    pub async fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<u64, StorageError> {
        let lookup = self
            .offset_for_timestamp_bounded(timestamp_ms, u64::MAX)
            .await?;
        Ok(lookup.offset.expect("an unbounded lookup always ends"))
    }

    /// `offset_for_timestamp`, giving up once the batches it has examined add up to more
    /// than `scan_bytes_max` (then `offset` is None). Batches are skipped by their
    /// header's max timestamp, which a producer can overstate: without a bound one
    /// lookup could walk every segment of the partition.
    pub async fn offset_for_timestamp_bounded(
        &self,
        timestamp_ms: i64,
        scan_bytes_max: u64,
    ) -> Result<TimeLookup, StorageError> {
        let mut scanned_bytes = 0u64;
        let (spans, high_watermark) = {
            let state = self.state.borrow();
            let spans: Vec<ReadSpan<S::File>> = state
                .segments
                .iter()
                .filter(|segment| {
                    segment.max_timestamp_ms >= timestamp_ms && segment.durable_position > 0
                })
                .map(|segment| {
                    let entry = time_floor_entry(&segment.index, timestamp_ms)
                        .expect("a segment with data has an index entry");
                    ReadSpan::of(segment, entry)
                })
                .collect();
            (spans, state.durable_offset)
        };
        for span in spans {
            let mut found = None;
            let mut failure = None;
            let mut gave_up = false;
            self.scan_batches(span, u64::MAX, |header, batch| {
                if header.max_timestamp_ms < timestamp_ms {
                    return Visit::Continue;
                }
                scanned_bytes += batch.len() as u64;
                if scanned_bytes > scan_bytes_max {
                    gave_up = true;
                    return Visit::Stop;
                }
                let batch = Bytes::copy_from_slice(batch);
                let mut records = Vec::new();
                match decode_records(&batch, 0, &mut records) {
                    Ok(()) => {
                        found = records
                            .iter()
                            .find(|record| record.timestamp_ms >= timestamp_ms)
                            .map(|record| record.offset);
                    }
                    Err(error) => failure = Some(error),
                }
                if found.is_some() || failure.is_some() {
                    Visit::Stop
                } else {
                    Visit::Continue
                }
            })
            .await?;
            if let Some(error) = failure {
                return Err(StorageError::Corrupt {
                    path: self.directory.clone(),
                    position: 0,
                    reason: format!("a stored batch does not decode: {error}"),
                });
            }
            if let Some(offset) = found {
                return Ok(TimeLookup {
                    offset: Some(offset.min(high_watermark)),
                    scanned_bytes,
                });
            }
            if gave_up {
                return Ok(TimeLookup {
                    offset: None,
                    scanned_bytes,
                });
            }
        }
        Ok(TimeLookup {
            offset: Some(high_watermark),
            scanned_bytes,
        })
    }

    /// Walks the durable batches of one segment from `span.position`, checking each
    /// one's framing and CRC before handing it to `visit`. Damage is reported as
    /// `Corrupt` with its position, and remembered: the partition serves nothing at or
    /// past that offset again (invariant: never hand out data it cannot vouch for).
    async fn scan_batches(
        &self,
        span: ReadSpan<S::File>,
        bytes_hint: u64,
        mut visit: impl FnMut(&BatchHeader, &[u8]) -> Visit,
    ) -> Result<(), StorageError> {
        let ReadSpan {
            file,
            path,
            mut position,
            offset: mut expected_offset,
            end_position,
        } = span;
        let window_max = read_window_bytes(bytes_hint, self.config.index_interval_bytes);
        let mut need = 0u64;
        while position < end_position {
            let length = (end_position - position).min(window_max.max(need));
            let data = file
                .read_at(position, length as usize)
                .await
                .map_err(|source| StorageError::io("reading segment", &path, source))?;
            need = 0;
            let mut at = 0usize;
            while at + BATCH_HEADER_SIZE <= data.len() {
                let header = BatchHeader::read(&data[at..]).expect("length checked");
                let batch_length = header.batch_length as usize;
                let batch_position = position + at as u64;
                // Durable data ends on a batch boundary, so a batch running past it (or
                // shorter than a header) is damage, as is a failed CRC.
                let damage = if batch_length < BATCH_HEADER_SIZE
                    || batch_position + batch_length as u64 > end_position
                {
                    Some(format!("impossible batch length {batch_length}"))
                } else if at + batch_length > data.len() {
                    // The batch runs past this window: read again from its start.
                    need = batch_length as u64;
                    break;
                } else {
                    check_framing(&data[at..at + batch_length])
                        .err()
                        .map(|error| error.to_string())
                };
                let damage = damage.or_else(|| {
                    (header.base_offset != expected_offset).then(|| {
                        format!(
                            "batch has base offset {}, expected {expected_offset}",
                            header.base_offset
                        )
                    })
                });
                if let Some(reason) = damage {
                    let error = StorageError::Corrupt {
                        path: path.clone(),
                        position: batch_position,
                        reason,
                    };
                    let mut state = self.state.borrow_mut();
                    if !state
                        .segments
                        .iter()
                        .any(|segment| Rc::ptr_eq(&segment.file, &file))
                    {
                        // Retention removed this segment during the read: what changed
                        // is not damage of the log.
                        return Err(StorageError::OffsetOutOfRange {
                            requested: expected_offset,
                            log_start_offset: state.segments[0].base_offset,
                            high_watermark: state.durable_offset,
                        });
                    }
                    // Logged once per damage found, not once per read that meets it:
                    // fetches from before a known damaged offset scan across it again.
                    // The damaged header's own offset cannot be trusted; the offset the
                    // walk expected here can.
                    if state
                        .corrupt
                        .as_ref()
                        .is_none_or(|(known, _)| expected_offset < *known)
                    {
                        tracing::error!(
                            partition_directory = %self.directory.display(),
                            error = %error,
                            offset = expected_offset,
                            "damaged batch: {error}; not serving at or past offset {expected_offset}"
                        );
                    }
                    let corrupt_offset = state
                        .corrupt
                        .as_ref()
                        .map_or(expected_offset, |(known, _)| (*known).min(expected_offset));
                    state.corrupt = Some((corrupt_offset, error.clone()));
                    return Err(error);
                }
                if visit(&header, &data[at..at + batch_length]) == Visit::Stop {
                    return Ok(());
                }
                expected_offset = header.next_offset();
                at += batch_length;
            }
            position += at as u64;
            if at == 0 && need == 0 {
                break;
            }
        }
        Ok(())
    }

    /// Flushes what is pending, stops the flusher and fails anyone still waiting.
    pub async fn close(&self) {
        {
            let mut state = self.state.borrow_mut();
            if state.closed {
                return;
            }
            state.closed = true;
        }
        self.flush_wanted.notify_all();
        let flusher = self.flusher.borrow_mut().take();
        if let Some(flusher) = flusher {
            flusher.await;
        }
        // No round writes again: the segment's O_DSYNC descriptor goes now, not when the
        // log is dropped.
        self.dsync_handle.take();
        if self.state.borrow().failed.is_none() {
            if let Err(error) = self.seal_index().await {
                // The index is rebuilt from the segment on the next open.
                tracing::warn!(
                    partition_directory = %self.directory.display(),
                    error = %error,
                    "sealing the index at close: {error} (rebuilt from the segment on the next open)"
                );
            }
            // Only when everything appended is durable (closing abandons a round waiting
            // on a full disk): a snapshot must not cover what the disk does not hold.
            let snapshot = {
                let mut state = self.state.borrow_mut();
                (state.durable_offset == state.next_offset)
                    .then(|| state.capture_producer_snapshot())
            };
            if let Some((point, bytes)) = snapshot {
                self.write_producer_snapshot(point, &bytes).await;
            }
        }
        let waiters: Vec<_> = {
            let mut state = self.state.borrow_mut();
            state.flusher_stopped = true;
            state.durable_waiters.drain(..).collect()
        };
        for (_, waiter) in waiters {
            let _ = waiter.send(Err(StorageError::Closed));
        }
        self.cache.clear();
        self.data_arrived.notify_all();
        self.roll_done.notify_all();
    }

    fn take_round(&self, state: &mut State<S::File>) -> Option<Round<S::File>> {
        if state.failed.is_some() {
            return None;
        }
        if let Some(round) = state.retry.take() {
            if state.closed {
                // Closing (shutdown, or the topic deleted to free space) must not wait for
                // a disk that stays full; those appends were never acknowledged durable.
                return None;
            }
            return Some(round);
        }
        Self::seal_for_flush(state, self.caching());
        if state.sealed.is_empty() {
            return None;
        }
        let extensions = self.extensions_for(state);
        let segment = state.segments.last_mut().expect("a log has a segment");
        let index = segment.index_write(false);
        let (segment_base_offset, segment_end_position) =
            (segment.base_offset, segment.end_position);
        let snapshot_due =
            state.producer_snapshot_bytes >= self.config.producer_snapshot_interval_bytes;
        let producer_snapshot = snapshot_due.then(|| state.capture_producer_snapshot());
        Some(Round {
            extensions,
            chunks: std::mem::take(&mut state.sealed),
            index,
            next_offset: state.next_offset,
            segment_base_offset,
            segment_end_position,
            producer_snapshot,
        })
    }

    /// The files the sealed chunks need grown first. Growing keeps at least half a step
    /// reserved past the furthest write, so most rounds find their space ready, and
    /// never reserves past the segment size (a file that is already larger, a recycled
    /// or older segment, is left as it is).
    fn extensions_for(&self, state: &mut State<S::File>) -> Vec<Extension<S::File>> {
        let step = self.config.preallocate_step_bytes;
        let mut extensions: Vec<Extension<S::File>> = Vec::new();
        for chunk in &state.sealed {
            let end = chunk.file_start + chunk.buffer.len() as u64;
            let segment = state
                .segments
                .iter_mut()
                .rev()
                .find(|segment| Rc::ptr_eq(&segment.file, &chunk.file))
                .expect("a sealed chunk belongs to a segment of the log");
            let cap = self.config.segment_size_bytes.max(segment.allocated_bytes);
            if end + step / 2 <= segment.allocated_bytes || segment.allocated_bytes >= cap {
                continue;
            }
            let size = (end.div_ceil(step) * step + step).min(cap);
            assert!(size >= end, "a chunk never reaches past its segment's size");
            segment.allocated_bytes = size;
            match extensions
                .iter_mut()
                .find(|extension| Rc::ptr_eq(&extension.file, &chunk.file))
            {
                Some(extension) => extension.size = size,
                None => extensions.push(Extension {
                    file: Rc::clone(&chunk.file),
                    path: chunk.path.clone(),
                    size,
                }),
            }
        }
        extensions
    }

    async fn run_flusher(self: Rc<Self>) {
        loop {
            let wanted = self.flush_wanted.listen();
            let (round, closed) = {
                let mut state = self.state.borrow_mut();
                // While a roll is creating the next segment, the old segment's last chunk
                // is already sealed; writing it now is fine.
                (self.take_round(&mut state), state.closed)
            };
            match round {
                Some(round) => {
                    // Tests hold rounds here to look at data acknowledged in memory
                    // but not yet durable (debug builds only).
                    #[cfg(debug_assertions)]
                    crate::test_hooks::DURABLE_ROUNDS.pass_async().await;
                    self.run_round(round).await
                }
                None if closed => return,
                None => match self.zero_fill_step().await {
                    ZeroFillStep::Done => {}
                    ZeroFillStep::Idle => {
                        let _ = wanted.await;
                    }
                    ZeroFillStep::Wait(wait) => {
                        // The budget is spent: back when it has room, or at once for an
                        // append.
                        let _ = glommio::timer::timeout(wait, async {
                            let _ = wanted.await;
                            Ok(())
                        })
                        .await;
                    }
                },
            }
        }
    }

    /// One step of zero-filling the active segment ahead of its write position
    /// (`storage::zero_fill` has why, and why it never overwrites data): at most one chunk
    /// write or one fdatasync. Runs on the flusher only, and only when it has no round to
    /// run, so a round waits for at most one such step. A full disk pauses it until the
    /// next round; any other error stops the partition as a failed round does (the segment
    /// file can no longer be trusted).
    async fn zero_fill_step(&self) -> ZeroFillStep {
        let (plan, file, path, segment_base, grow_to) = {
            let mut state = self.state.borrow_mut();
            if state.failed.is_some()
                || state.full
                || state.closed
                || state.rolling
                || !self.zero_fill_budget.enabled()
            {
                return ZeroFillStep::Idle;
            }
            let segment_size_bytes = self.config.segment_size_bytes;
            let step = self.config.preallocate_step_bytes;
            let segment = state.segments.last_mut().expect("a log has a segment");
            let view = zero_fill::SegmentView {
                end_position: segment.end_position,
                written_bytes: segment.written_bytes,
                zero_fill_unsynced: segment.zero_fill_unsynced,
                segment_size_bytes,
            };
            let plan = zero_fill::plan(
                &self.config.zero_fill,
                &self.zero_fill_budget,
                &view,
                std::time::Instant::now(),
            );
            let mut grow_to = None;
            if let zero_fill::Plan::Write { position, length } = plan {
                // Space first: a write past the reserved size would grow the file
                // unreserved. Steps as a round grows it (`extensions_for`); the size
                // change reaches the disk with the zero-fill's fdatasync.
                let end = position + length;
                if end > segment.allocated_bytes {
                    let cap = segment_size_bytes.max(segment.allocated_bytes);
                    let size = (end.div_ceil(step) * step).min(cap);
                    assert!(size >= end, "zero-filling never passes the segment size");
                    // Recorded once the allocation succeeded: a failed one (a full disk)
                    // must leave the next round to reserve the space itself.
                    grow_to = Some(size);
                }
            }
            (
                plan,
                Rc::clone(&segment.file),
                segment.path.clone(),
                segment.base_offset,
                grow_to,
            )
        };
        self.zero_fill_in_flight.set(true);
        if let Some(size) = grow_to {
            if let Err(source) = file.pre_allocate(size).await {
                return self.zero_fill_failed(StorageError::io(
                    "preallocating for zero-fill",
                    &path,
                    source,
                ));
            }
            self.with_zero_filled_segment(segment_base, |segment| {
                segment.allocated_bytes = segment.allocated_bytes.max(size);
            });
        }
        let step = match plan {
            zero_fill::Plan::Idle => ZeroFillStep::Idle,
            zero_fill::Plan::Wait(wait) => ZeroFillStep::Wait(wait),
            zero_fill::Plan::Sync => match file.fdatasync().await {
                Ok(()) => {
                    self.with_zero_filled_segment(segment_base, |segment| {
                        segment.zero_fill_unsynced = false;
                    });
                    ZeroFillStep::Done
                }
                Err(source) => self.zero_fill_failed(StorageError::io(
                    "syncing zero-filled segment",
                    &path,
                    source,
                )),
            },
            zero_fill::Plan::Write { position, length } => {
                let mut buffer = file.allocate_buffer(length as usize);
                // The arena recycles memory: the bytes must be zeros, which recovery
                // reads as the end of the log.
                buffer.as_bytes_mut().fill(0);
                match write_whole(
                    &*file,
                    Rc::new(buffer),
                    position,
                    &path,
                    "zero-filling segment",
                )
                .await
                {
                    Ok(()) => {
                        self.with_zero_filled_segment(segment_base, |segment| {
                            segment.written_bytes = segment.written_bytes.max(position + length);
                            segment.zero_fill_unsynced = true;
                        });
                        self.metrics.borrow().zero_fill_bytes.increment(length);
                        self.zero_filled_bytes
                            .set(self.zero_filled_bytes.get() + length);
                        ZeroFillStep::Done
                    }
                    Err(error) => self.zero_fill_failed(error),
                }
            }
        };
        self.zero_fill_in_flight.set(false);
        self.zero_fill_idle.set(matches!(step, ZeroFillStep::Idle));
        self.zero_fill_progress.notify_all();
        step
    }

    /// Zero bytes written ahead of the write position so far (`storage::zero_fill`).
    pub fn zero_filled_bytes(&self) -> u64 {
        self.zero_filled_bytes.get()
    }

    /// How far the active segment is known written: its written high-water mark.
    pub fn active_segment_written_bytes(&self) -> u64 {
        let state = self.state.borrow();
        state
            .segments
            .last()
            .expect("a log has a segment")
            .written_bytes
    }

    /// Resolves after the flusher's next zero-fill step (tests).
    #[cfg(test)]
    pub(crate) async fn wait_zero_fill_step(&self) {
        let _ = self.zero_fill_progress.listen().await;
    }

    /// Bytes appended to the active segment (tests).
    #[cfg(test)]
    pub(crate) fn active_segment_end(&self) -> u64 {
        let state = self.state.borrow();
        state
            .segments
            .last()
            .expect("a log has a segment")
            .end_position
    }

    /// Waits until the active segment is written (and synced) up to `bytes`, or the
    /// flusher has nothing left to do (zero-fill found nothing to write since the last
    /// round), or the partition stopped; for tests, which must wait on a condition and
    /// then check how far the fill got.
    #[cfg(test)]
    pub(crate) async fn wait_zero_filled(&self, bytes: u64) {
        loop {
            let progress = self.zero_fill_progress.listen();
            {
                let state = self.state.borrow();
                let segment = state.segments.last().expect("a log has a segment");
                if segment.written_bytes >= bytes && !segment.zero_fill_unsynced {
                    return;
                }
                if state.failed.is_some() || state.closed || self.zero_fill_idle.get() {
                    return;
                }
            }
            let _ = progress.await;
        }
    }

    /// Updates the segment a zero-fill step worked on, if it is still in the log, and
    /// the lookahead gauge.
    fn with_zero_filled_segment(
        &self,
        base_offset: u64,
        update: impl FnOnce(&mut Segment<S::File>),
    ) {
        let mut state = self.state.borrow_mut();
        if let Some(segment) = state
            .segments
            .iter_mut()
            .rev()
            .find(|segment| segment.base_offset == base_offset)
        {
            update(segment);
            let lookahead = segment
                .written_bytes
                .saturating_sub(align_up(segment.end_position));
            self.metrics
                .borrow()
                .zero_fill_lookahead_bytes
                .set(lookahead as f64);
        }
    }

    /// A zero-fill write or sync failed. A full disk is left to the rounds (which refuse
    /// appends and retry); anything else stops the partition: an fdatasync error on the
    /// segment file means writes before it may be lost while later syncs report success.
    fn zero_fill_failed(&self, error: StorageError) -> ZeroFillStep {
        self.zero_fill_in_flight.set(false);
        self.zero_fill_progress.notify_all();
        if matches!(error, StorageError::NoSpace { .. }) {
            tracing::debug!(
                partition_directory = %self.directory.display(),
                error = %error,
                "zero-filling ahead of the write position: {error}; paused until the next append"
            );
            return ZeroFillStep::Idle;
        }
        let waiters: Vec<_> = {
            let mut state = self.state.borrow_mut();
            state.failed = Some(StorageError::Stopped {
                reason: error.to_string(),
            });
            state.sealed.clear();
            state.active = None;
            state.durable_waiters.drain(..).collect()
        };
        tracing::error!(
            partition_directory = %self.directory.display(),
            error = %error,
            "{error}; the partition has stopped"
        );
        let reported = StorageError::Stopped {
            reason: error.to_string(),
        };
        for (_, waiter) in waiters {
            let _ = waiter.send(Err(reported.clone()));
        }
        self.apply_failure_policy("zero-filling ahead of the write position", &error);
        ZeroFillStep::Idle
    }

    /// Writes a round and settles its outcome: durable, to be retried (disk full), or
    /// the partition stops.
    async fn run_round(&self, round: Round<S::File>) {
        self.zero_fill_idle.set(false);
        let error = match self.write_round(&round).await {
            Ok(sync) => {
                self.round_durable(&round, sync);
                // On the flusher, after the round's waiters are released; the next round
                // waits for it (about one small write and two syncs per
                // `producer_snapshot_interval_bytes`).
                if let Some((point, bytes)) = &round.producer_snapshot {
                    self.write_producer_snapshot(*point, bytes).await;
                }
                return;
            }
            Err(error) => error,
        };
        let retryable = matches!(error, StorageError::NoSpace { .. });
        let waiters: Vec<_> = {
            let mut state = self.state.borrow_mut();
            if retryable {
                state.full = true;
                state.retry = Some(round);
            } else {
                state.failed = Some(StorageError::Stopped {
                    reason: error.to_string(),
                });
                // Nothing pending can become durable now: give the shard its chunk
                // budget back.
                state.sealed.clear();
                state.active = None;
            }
            state.durable_waiters.drain(..).collect()
        };
        if retryable {
            tracing::warn!(
                partition_directory = %self.directory.display(),
                error = %error,
                retry_ms = self.config.storage_full_retry.as_millis() as u64,
                "{error}; appends are refused and the write is retried"
            );
        } else {
            tracing::error!(
                partition_directory = %self.directory.display(),
                error = %error,
                "{error}; the partition has stopped"
            );
        }
        // Waiters learn now; their batches stay queued and may still become durable once
        // the write succeeds (a retrying producer may then store a record twice, as after
        // a timeout).
        let reported = match &error {
            StorageError::NoSpace { .. } => error.clone(),
            _ => StorageError::Stopped {
                reason: error.to_string(),
            },
        };
        for (_, waiter) in waiters {
            let _ = waiter.send(Err(reported.clone()));
        }
        if retryable {
            glommio::timer::sleep(self.config.storage_full_retry).await;
        } else {
            self.apply_failure_policy("writing and syncing", &error);
        }
    }

    /// After the partition stopped on a write, sync or roll error other than a full disk:
    /// with `ExitProcess` the whole broker exits, so no shard serves on a disk that can
    /// no longer be trusted while its siblings go on.
    fn apply_failure_policy(&self, doing: &str, error: &StorageError) {
        if self.config.failure_policy == FailurePolicy::ExitProcess {
            crate::logs::fatal(format_args!(
                "the log can no longer be trusted: {} failed while {doing}: {error}",
                self.directory.display()
            ));
            std::process::exit(super::EXIT_STORAGE_FAILED);
        }
    }

    async fn write_round(&self, round: &Round<S::File>) -> Result<RoundSync, StorageError> {
        // Zero-fill and rounds share the flusher task: a zero-fill write never overlaps a
        // round's writes of the same blocks (storage::zero_fill, the contract).
        assert!(
            !self.zero_fill_in_flight.get(),
            "a round must not start while a zero-fill write or sync is in flight"
        );
        for extension in &round.extensions {
            // The size change reaches the disk with this round's fdatasync of the file.
            extension
                .file
                .pre_allocate(extension.size)
                .await
                .map_err(|source| StorageError::io("preallocating", &extension.path, source))?;
        }
        // One write and nothing to grow: durable as it is written (O_DSYNC), with no
        // fdatasync after it.
        let dsync = match round.chunks.as_slice() {
            [chunk]
                if round.extensions.is_empty()
                    && chunk.buffer.len() <= self.config.dsync_write_bytes_max =>
            {
                self.dsync_handle(chunk).await
            }
            _ => None,
        };
        let started = std::time::Instant::now();
        let mut writes = Vec::with_capacity(round.chunks.len());
        let mut files: Vec<(Rc<S::File>, PathBuf)> = Vec::new();
        for chunk in &round.chunks {
            if !files.iter().any(|(file, _)| Rc::ptr_eq(file, &chunk.file)) {
                files.push((Rc::clone(&chunk.file), chunk.path.clone()));
            }
            let file = dsync.clone().unwrap_or_else(|| Rc::clone(&chunk.file));
            let buffer = Rc::clone(&chunk.buffer);
            let path = chunk.path.clone();
            let file_start = chunk.file_start;
            writes.push(glommio::spawn_local(async move {
                let expected = buffer.len();
                let written = file
                    .write_at(buffer, file_start)
                    .await
                    .map_err(|source| StorageError::io("writing segment", &path, source))?;
                if written != expected {
                    // With O_DIRECT a short write means the file system ran out of room
                    // part-way; the whole chunk is written again later.
                    return Err(StorageError::NoSpace {
                        operation: "writing segment",
                        path,
                        detail: format!(
                            "short write of {written} of {expected} bytes at {file_start}"
                        ),
                    });
                }
                Ok(())
            }));
        }
        if let Some(index) = &round.index {
            let file = Rc::clone(&index.file);
            let buffer = Rc::clone(&index.buffer);
            let path = index.path.clone();
            let position = index.position;
            writes.push(glommio::spawn_local(async move {
                write_whole(&*file, buffer, position, &path, "writing index").await
            }));
        }
        let mut first_error = None;
        for write in writes {
            if let Err(error) = write.await {
                first_error.get_or_insert(error);
            }
        }
        if let Some(error) = first_error {
            return Err(error);
        }
        let metrics = self.metrics.borrow().clone();
        metrics
            .write_seconds
            .record(started.elapsed().as_secs_f64());
        // A fault point for tests of durable produces that time out (debug builds only):
        // `SHARDQ_TEST_FDATASYNC_DELAY_MS` holds every round here, before its fdatasync
        // (after its O_DSYNC write), unacknowledged.
        #[cfg(debug_assertions)]
        if let Some(delay) = crate::test_hooks::fdatasync_delay() {
            glommio::timer::sleep(delay).await;
        }
        if dsync.is_some() {
            metrics
                .dsync_write_seconds
                .record(started.elapsed().as_secs_f64());
            return Ok(RoundSync::Written);
        }
        for (file, path) in &files {
            let sync_started = std::time::Instant::now();
            file.fdatasync()
                .await
                .map_err(|source| StorageError::io("syncing segment", path, source))?;
            metrics
                .fdatasync_seconds
                .record(sync_started.elapsed().as_secs_f64());
        }
        Ok(RoundSync::Synced)
    }

    /// The O_DSYNC handle of `chunk`'s segment: the one kept from the last round if it
    /// wrote the same segment, else opened now (once a segment; the last one is
    /// dropped). None when opening it failed: that segment's rounds then fdatasync, as
    /// they would with `dsync_write_bytes_max` 0, and one warning says so.
    async fn dsync_handle(&self, chunk: &SealedChunk<S::File>) -> Option<Rc<S::File>> {
        if let Some(kept) = &*self.dsync_handle.borrow() {
            if kept.is_for(&chunk.file) {
                return kept.handle.clone();
            }
        }
        let handle = match self.storage.open_dsync(&chunk.path).await {
            Ok(handle) => Some(Rc::new(handle)),
            Err(source) => {
                let error =
                    StorageError::io("opening segment for O_DSYNC writes", &chunk.path, source);
                tracing::warn!(
                    partition_directory = %self.directory.display(),
                    error = %error,
                    "{error}; this segment's rounds use write + fdatasync instead"
                );
                None
            }
        };
        self.dsync_handle.replace(Some(DsyncHandle {
            segment: Rc::downgrade(&chunk.file),
            handle: handle.clone(),
        }));
        handle
    }

    fn round_durable(&self, round: &Round<S::File>, sync: RoundSync) {
        let released = {
            let mut state = self.state.borrow_mut();
            state.full = false;
            assert!(
                round.next_offset >= state.durable_offset,
                "the durable watermark only moves forward"
            );
            let metrics = self.metrics.borrow();
            metrics.durable_rounds.increment(1);
            metrics
                .round_records
                .record((round.next_offset - state.durable_offset) as f64);
            let bytes: usize = round.chunks.iter().map(|chunk| chunk.buffer.len()).sum();
            metrics.round_bytes.record(bytes as f64);
            drop(metrics);
            state.durable_offset = round.next_offset;
            for chunk in &round.chunks {
                let end = chunk.file_start + chunk.buffer.len() as u64;
                if let Some(segment) = state
                    .segments
                    .iter_mut()
                    .rev()
                    .find(|segment| Rc::ptr_eq(&segment.file, &chunk.file))
                {
                    segment.written_bytes = segment.written_bytes.max(end);
                    // Whatever zeros the round's fdatasync covered are synced too; an
                    // O_DSYNC write covers only itself.
                    if sync == RoundSync::Synced {
                        segment.zero_fill_unsynced = false;
                    }
                }
            }
            for segment in state.segments.iter_mut() {
                match segment.base_offset.cmp(&round.segment_base_offset) {
                    std::cmp::Ordering::Less => segment.durable_position = segment.end_position,
                    std::cmp::Ordering::Equal => {
                        segment.durable_position = round.segment_end_position
                    }
                    std::cmp::Ordering::Greater => {}
                }
            }
            let mut released = Vec::new();
            while state
                .durable_waiters
                .front()
                .is_some_and(|(target, _)| *target <= round.next_offset)
            {
                released.push(state.durable_waiters.pop_front().expect("checked").1);
            }
            released
        };
        for waiter in released {
            let _ = waiter.send(Ok(()));
        }
        for chunk in &round.chunks {
            if let Some((segment_base, first_offset, bytes)) = &chunk.appended {
                self.tail_cache
                    .insert(&self.cache, *segment_base, *first_offset, bytes.clone());
            }
        }
        self.data_arrived.notify_all();
    }
}

/// Most cached ranges one read stitches together.
const CACHED_RANGES_PER_READ_MAX: usize = 64;

/// What a read at `offset` returns from cached ranges: the batch holding `offset`, then
/// following batches while they fit in `bytes_max` and the ranges are contiguous. A slice
/// of one range when it holds it all (no copy); one copy when several ranges are joined.
/// `None` when the cache does not hold `offset`'s batch.
fn cached_batches(ranges: &[(u64, Bytes)], offset: u64, bytes_max: usize) -> Option<Bytes> {
    let mut parts: Vec<Bytes> = Vec::new();
    let mut taken = 0usize;
    let mut wanted = offset;
    'ranges: for (first_offset, range) in ranges {
        if *first_offset > wanted {
            break; // a gap: evicted or never cached
        }
        let mut at = 0usize;
        let mut start: Option<usize> = None;
        while at + BATCH_HEADER_SIZE <= range.len() {
            let header = BatchHeader::read(&range[at..]).expect("length checked");
            let length = header.batch_length as usize;
            assert!(
                length >= BATCH_HEADER_SIZE && at + length <= range.len(),
                "cached ranges are whole batches that were validated before they were appended"
            );
            if header.next_offset() > wanted {
                if taken > 0 && taken + length > bytes_max {
                    if let Some(start) = start {
                        parts.push(range.slice(start..at));
                    }
                    break 'ranges;
                }
                start.get_or_insert(at);
                taken += length;
                wanted = header.next_offset();
            }
            at += length;
        }
        if let Some(start) = start {
            parts.push(range.slice(start..at));
        }
        if taken >= bytes_max {
            break;
        }
    }
    match parts.len() {
        0 => None,
        1 => parts.pop(),
        _ => {
            let mut joined = BytesMut::with_capacity(taken);
            for part in &parts {
                joined.extend_from_slice(part);
            }
            Some(joined.freeze())
        }
    }
}

/// Writes a whole buffer; a short write counts as a full disk.
async fn write_whole<F: LogFile>(
    file: &F,
    buffer: Rc<DmaBuffer>,
    position: u64,
    path: &Path,
    operation: &'static str,
) -> Result<(), StorageError> {
    let expected = buffer.len();
    let written = file
        .write_at(buffer, position)
        .await
        .map_err(|source| StorageError::io(operation, path, source))?;
    if written != expected {
        return Err(StorageError::NoSpace {
            operation,
            path: path.to_path_buf(),
            detail: format!("short write of {written} of {expected} bytes at {position}"),
        });
    }
    Ok(())
}

impl<S: LogStorage> PartitionLog<S> {
    /// Writes a producer snapshot; a failure is logged and otherwise ignored: recovery
    /// then starts from an older snapshot (or a scan), which is slower, not wrong.
    async fn write_producer_snapshot(&self, point: SnapshotPoint, bytes: &[u8]) {
        let Ok(_permit) = self.producer_snapshot_lock.acquire_permit(1).await else {
            return; // never closed
        };
        if self
            .producer_snapshot_offset
            .get()
            .is_some_and(|written| written >= point.offset)
        {
            return;
        }
        match producer_snapshot::write_snapshot(&*self.storage, &self.directory, bytes).await {
            Ok(()) => self.producer_snapshot_offset.set(Some(point.offset)),
            Err(error) => tracing::warn!(
                partition_directory = %self.directory.display(),
                offset = point.offset,
                error = %error,
                "writing the producer snapshot at offset {}: {error}",
                point.offset
            ),
        }
    }
}

impl<F> State<F> {
    /// Deduplication of an idempotent producer's batch (docs/protocol.md §8.1):
    /// `Some(original)` for a resend of a batch already stored, `None` to append.
    fn check_producer(&self, header: &BatchHeader) -> Result<Option<AppendOutcome>, StorageError> {
        if header.producer_id == 0 {
            return Ok(None);
        }
        match self
            .producers
            .check(header.producer_id, header.sequence, header.crc)
        {
            Ok(SequenceCheck::Append) => Ok(None),
            Ok(SequenceCheck::Duplicate(kept)) => Ok(Some(AppendOutcome {
                base_offset: kept.base_offset,
                next_offset: kept.next_offset,
                duplicate: true,
            })),
            Err(error) => Err(StorageError::OutOfOrderSequence(error)),
        }
    }

    /// The producer table as of `next_offset`, encoded, and where that offset lies.
    fn capture_producer_snapshot(&mut self) -> (SnapshotPoint, Vec<u8>) {
        let segment = self.segments.last().expect("a log has a segment");
        let point = SnapshotPoint {
            offset: self.next_offset,
            segment_base: segment.base_offset,
            position: segment.end_position,
        };
        self.producer_snapshot_bytes = 0;
        let mut bytes = Vec::new();
        super::producers::encode_snapshot(&self.producers, point, &mut bytes);
        (point, bytes)
    }

    fn check_writable(&self, directory: &Path) -> Result<(), StorageError> {
        if self.closed {
            return Err(StorageError::Closed);
        }
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        if self.full {
            return Err(StorageError::NoSpace {
                operation: "appending",
                path: directory.to_path_buf(),
                detail: "the disk was full at the last write; retrying".into(),
            });
        }
        Ok(())
    }
}
