//! Queue semantics for one (partition, group): leases, acks, nacks, retries with backoff,
//! delayed and expiring messages, dead-lettering, and the journal that makes it durable.
//!
//! What it is: a sans-IO state machine, [`QueueGroup`]. The shard feeds it events
//! (`receive`, `ack`, `nack`, `extend`, `tick`, `appended`, `dead_lettered`,
//! `retention`, and `recover` at start-up) with the current time as a parameter, and it
//! fills an [`Actions`] the caller owns: deliveries to hand out, journal records to append,
//! DLQ appends to make, a range of the log whose metadata it needs, the next timer.
//!
//! What it is not: it reads no clock, opens no file, touches no socket and knows no
//! executor. It does not read records: it deals in offsets and hands the shard offset
//! lists; the shard reads the bytes. Stream groups (committed offsets) are not here.
//!
//! Which core: the shard that owns the partition (invariant 4), one instance per queue
//! group on that partition. It is plain data, but only the owning shard touches it.
//!
//! Contract (docs/queues.md has the model and the reasons):
//! - Every event clears `Actions` first. Records in `Actions::journal` must be appended to
//!   the group's journal in order, and the answer to the event (deliveries, per-handle
//!   results) released only once the journal is durable through `Actions::answer_after_seq`.
//!   That is the last record journaled so far, not only this event's: an answer can depend
//!   on an earlier event's change (an ack refused as `Settled` because of an ack whose
//!   record is still in flight), and must not be given before that change is durable.
//! - A [`DeadLetterRequest`] with `after_seq = Some(s)` may be appended to the DLQ only once
//!   the journal is durable through `s`; when the DLQ append is durable, call
//!   [`QueueGroup::dead_lettered`]. After `recover`, each [`ReconcileRequest`] is answered
//!   with [`QueueGroup::dead_letter_reconciled`] once the DLQ has been searched.
//! - `Actions::read_metadata = Some(range)` asks for `appended` with the metadata of those
//!   offsets (read from the log). It is issued once and stays outstanding (see
//!   `metadata_request`) until an `appended` starting at or before its start answers it;
//!   until then no more of the backlog is admitted.
//! - Time is milliseconds of the broker's wall clock: deadlines and due times are
//!   journaled and must mean the same after a restart. A clock stepping back only
//!   lengthens leases and delays. A lease is valid while `now < deadline_ms`.
//!
//! State: an ack floor (every offset below it is settled) and a window of per-offset slots
//! from the floor, at most `window_messages_max` long; offsets past the window are not in
//! memory at all. Memory is bounded by [`QueueGroupConfig::memory_bytes_max`].

mod journal;
#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Range;

pub use journal::{
    decode_record, decode_snapshot, encode_record, encode_snapshot, Counters, DeadLetterCause,
    DecodedRecord, JournalError, JournalRecord, SettleCause, Snapshot, SnapshotEntry,
    RECORD_HEADER_SIZE, RECORD_SIZE_MAX,
};

use crate::protocol::Decoded;

/// Who holds a lease: the shard's id for one consumer (connection + consumer tag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HolderId(pub u64);

/// What a consumer gets with each message and gives back to ack, nack or extend it. The
/// attempt makes a handle from an earlier delivery stale once the message was delivered
/// again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeliveryHandle {
    pub partition: u32,
    pub offset: u64,
    /// 1 for the first delivery.
    pub attempt: u32,
}

/// Exponential backoff with jitter: attempt n (n >= 1 deliveries failed) waits
/// `min(delay_ms_max, delay_ms_min * (multiplier_percent / 100)^(n - 1))`, less a uniform
/// random part of up to `jitter_percent` of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub delay_ms_min: u64,
    pub delay_ms_max: u64,
    pub multiplier_percent: u32,
    pub jitter_percent: u32,
}

/// What happens to a message whose TTL passed before it was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiryPolicy {
    /// Settled without a copy, counted in `Counters::expired_dropped`.
    Drop,
    /// Sent to the DLQ with cause `expired`.
    DeadLetter,
}

/// Whether messages with the same key wait for each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    /// Any available message may be handed out (competing consumers, SQS standard).
    Unordered,
    /// At most one message per key in flight: a message is handed out only once every
    /// earlier message with its key is settled (or dead-lettering). Messages without a
    /// key are unordered. Like SQS FIFO message groups, per partition.
    PerKey,
}

/// Limits and policy of one queue group on one partition. docs/queues.md lists the config
/// keys these come from (`queue_` prefix in the broker config) and their defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueGroupConfig {
    pub partition: u32,
    /// Offsets from the ack floor kept in memory; admission stops at the edge.
    pub window_messages_max: u32,
    /// Leases held at once; `receive` returns fewer at the edge (backpressure).
    pub in_flight_messages_max: u32,
    /// Most messages one `receive` hands out.
    pub receive_messages_max: u32,
    /// Most handles one `ack`, `nack` or `extend` takes: the protocol refuses more, so
    /// more here is a bug (asserted). Bounds `Actions::results`.
    pub handles_per_request_max: u32,
    pub visibility_timeout_ms_default: u64,
    pub visibility_timeout_ms_max: u64,
    /// Deliveries before a failure sends the message to the DLQ (DESIGN's `max_deliveries`).
    pub deliveries_max: u32,
    pub retry: RetryPolicy,
    /// Cap on an explicit nack delay.
    pub nack_delay_ms_max: u64,
    /// Cap on how far past its append time a `deliver_after` may hold a message.
    pub delivery_delay_ms_max: u64,
    /// Topic TTL from append time; 0 = none. A message's own expiry can only shorten it.
    pub message_ttl_ms: u64,
    pub expiry_policy: ExpiryPolicy,
    pub ordering: Ordering,
    /// Nack reasons are cut to this many bytes.
    pub nack_reason_bytes_max: u16,
    /// `Actions::snapshot_due` is set once this many records were journaled since the
    /// last snapshot: it bounds the journal tail that recovery replays.
    pub journal_records_per_snapshot_max: u64,
    /// Seeds the jitter; tests pass a fixed one.
    pub random_seed: u64,
}

impl Default for QueueGroupConfig {
    fn default() -> Self {
        QueueGroupConfig {
            partition: 0,
            window_messages_max: 8192,
            in_flight_messages_max: 4096,
            receive_messages_max: 1000,
            handles_per_request_max: 1000,
            visibility_timeout_ms_default: 30_000,
            visibility_timeout_ms_max: 43_200_000,
            deliveries_max: 10,
            retry: RetryPolicy {
                delay_ms_min: 1000,
                delay_ms_max: 300_000,
                multiplier_percent: 200,
                jitter_percent: 20,
            },
            nack_delay_ms_max: 43_200_000,
            delivery_delay_ms_max: 900_000,
            message_ttl_ms: 0,
            expiry_policy: ExpiryPolicy::Drop,
            ordering: Ordering::Unordered,
            nack_reason_bytes_max: 128,
            journal_records_per_snapshot_max: 100_000,
            random_seed: 0,
        }
    }
}

/// A config value out of range, named by its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: &'static str,
    pub value: u64,
    pub reason: &'static str,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} = {}: {}", self.key, self.value, self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// Bytes one slot costs, with its share of the ready set and the timer set, as bounded
/// in docs/queues.md: the window's `VecDeque` may hold up to twice its length (growth by
/// doubling), a B-tree key costs at most about twice its size (nodes at least half full)
/// plus node headers.
const READY_ENTRY_BYTES_MAX: u64 = 32;
const TIMER_ENTRY_BYTES_MAX: u64 = 48;
const DEAD_LETTER_ENTRY_BYTES_MAX: u64 = 128;
/// The per-entry figures hold for sets of more than one node; a small set still costs one
/// partly filled node each (about 100, 200 and 560 bytes for the three maps).
const SETS_FIXED_BYTES_MAX: u64 = 1024;
/// Ordered mode: one key's queue entry (8 bytes, in a `VecDeque` that may hold twice its
/// length) plus, if the key is alone, its map entry (key, deque header, control byte, at
/// a load factor down to 7/16 after growth) and the deque's smallest buffer.
const KEY_ENTRY_BYTES_MAX: u64 = 192;

impl QueueGroupConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive: [(&'static str, u64); 8] = [
            ("queue_window_messages_max", self.window_messages_max.into()),
            (
                "queue_in_flight_messages_max",
                self.in_flight_messages_max.into(),
            ),
            (
                "queue_receive_messages_max",
                self.receive_messages_max.into(),
            ),
            (
                "queue_handles_per_request_max",
                self.handles_per_request_max.into(),
            ),
            (
                "queue_visibility_timeout_ms_max",
                self.visibility_timeout_ms_max,
            ),
            ("queue_deliveries_max", self.deliveries_max.into()),
            ("queue_retry_delay_ms_max", self.retry.delay_ms_max),
            (
                "queue_journal_records_per_snapshot_max",
                self.journal_records_per_snapshot_max,
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(ConfigError {
                    key,
                    value,
                    reason: "must be at least 1",
                });
            }
        }
        if self.in_flight_messages_max > self.window_messages_max {
            return Err(ConfigError {
                key: "queue_in_flight_messages_max",
                value: self.in_flight_messages_max.into(),
                reason: "must not exceed queue_window_messages_max",
            });
        }
        if self.retry.delay_ms_min > self.retry.delay_ms_max {
            return Err(ConfigError {
                key: "queue_retry_delay_ms_min",
                value: self.retry.delay_ms_min,
                reason: "must not exceed queue_retry_delay_ms_max",
            });
        }
        if self.retry.multiplier_percent < 100 {
            return Err(ConfigError {
                key: "queue_retry_delay_multiplier_percent",
                value: self.retry.multiplier_percent.into(),
                reason: "must be at least 100 (delays never shrink)",
            });
        }
        if self.retry.jitter_percent > 100 {
            return Err(ConfigError {
                key: "queue_retry_jitter_percent",
                value: self.retry.jitter_percent.into(),
                reason: "must be at most 100",
            });
        }
        if self.visibility_timeout_ms_default == 0
            || self.visibility_timeout_ms_default > self.visibility_timeout_ms_max
        {
            return Err(ConfigError {
                key: "queue_visibility_timeout_ms_default",
                value: self.visibility_timeout_ms_default,
                reason: "must be between 1 and queue_visibility_timeout_ms_max",
            });
        }
        Ok(())
    }

    /// The most memory one group's state can take (docs/queues.md, "Memory bound"):
    /// `W * (2 * slot + ready + timer) + W * (dead-letter entry + reason_max) + 1 KiB`,
    /// W the window. Estimated from the structures' layouts (not measured by an
    /// allocator): see the constants above.
    pub fn memory_bytes_max(&self) -> u64 {
        let window = u64::from(self.window_messages_max);
        let slot = std::mem::size_of::<Slot>() as u64;
        let keys = match self.ordering {
            Ordering::Unordered => 0,
            Ordering::PerKey => KEY_ENTRY_BYTES_MAX,
        };
        window * (2 * slot + READY_ENTRY_BYTES_MAX + TIMER_ENTRY_BYTES_MAX + keys)
            + window * (DEAD_LETTER_ENTRY_BYTES_MAX + u64::from(self.nack_reason_bytes_max))
            + SETS_FIXED_BYTES_MAX
    }
}

/// What the shard knows of a message when it is appended (or read back for `appended`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageMeta {
    /// The broker's append time of its batch.
    pub append_time_ms: u64,
    /// From the `deliver_after` record header; 0 = none.
    pub deliver_after_ms: u64,
    /// From the message's own TTL header (absolute); `u64::MAX` = none.
    pub expires_at_ms: u64,
    /// A hash of the record's key, for ordered mode; `None`: no key. Two keys with the
    /// same hash are ordered together (stricter, never wrong).
    pub key_hash: Option<u64>,
    /// What the record weighs in a receive's answer (key, value and headers), so that a
    /// receive can stop at a byte budget (`ReceiveRequest::bytes_max`).
    pub size_bytes: u32,
}

impl MessageMeta {
    pub fn plain(append_time_ms: u64) -> MessageMeta {
        MessageMeta {
            append_time_ms,
            deliver_after_ms: 0,
            expires_at_ms: u64::MAX,
            key_hash: None,
            size_bytes: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiveRequest {
    pub holder: HolderId,
    pub messages_max: u32,
    /// `None`: the group's default. Clamped to [1, visibility_timeout_ms_max].
    pub visibility_timeout_ms: Option<u64>,
    /// Stop handing out once the messages' sizes (`MessageMeta::size_bytes`) would pass
    /// this. `u64::MAX`: no limit.
    pub bytes_max: u64,
    /// Hand out the first message even if it alone is larger than `bytes_max` (so that
    /// a message larger than any budget is still delivered); false when this receive
    /// continues one that already handed out messages elsewhere.
    pub oversized_first: bool,
}

/// When a nacked message becomes available again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NackDelay {
    /// The group's retry policy (exponential backoff with jitter).
    Backoff,
    /// This many ms from now (0: at once), capped at `nack_delay_ms_max`.
    Ms(u64),
}

/// Why a handle was refused. Each carries what a client needs to understand it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandleError {
    WrongPartition {
        partition: u32,
        expected: u32,
    },
    /// Never delivered (or not yet admitted): a forged or corrupted handle.
    NotDelivered {
        offset: u64,
    },
    /// Already acked, dead-lettered, expired or removed by retention.
    Settled {
        offset: u64,
    },
    /// The lease of this attempt ran out; the message has not been delivered again yet.
    LeaseExpired {
        offset: u64,
        attempt: u32,
    },
    /// The message was delivered again since: only the newest attempt's handle counts.
    Stale {
        offset: u64,
        attempt: u32,
        current_attempt: u32,
    },
}

impl std::fmt::Display for HandleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandleError::WrongPartition {
                partition,
                expected,
            } => write!(f, "handle names partition {partition}, this is {expected}"),
            HandleError::NotDelivered { offset } => {
                write!(f, "offset {offset} was never delivered")
            }
            HandleError::Settled { offset } => write!(f, "offset {offset} is already settled"),
            HandleError::LeaseExpired { offset, attempt } => {
                write!(f, "lease of offset {offset} attempt {attempt} expired")
            }
            HandleError::Stale {
                offset,
                attempt,
                current_attempt,
            } => write!(
                f,
                "handle of offset {offset} attempt {attempt} is stale: now attempt {current_attempt}"
            ),
        }
    }
}

impl std::error::Error for HandleError {}

/// Append this message to the DLQ (with headers: source topic, partition, offset,
/// attempts, cause, reason, decided_at_ms), then call `dead_lettered(offset)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterRequest {
    pub offset: u64,
    pub attempts: u32,
    pub cause: DeadLetterCause,
    pub decided_at_ms: u64,
    pub reason: Vec<u8>,
    /// Wait until the journal is durable through this seq before appending; `None`: it
    /// already is (a request re-issued after recovery).
    pub after_seq: Option<u64>,
}

/// After a restart: was this message appended to the DLQ before the crash? Search the DLQ
/// partition for a record whose source headers name (topic, this partition, `offset`),
/// among records appended at or after `decided_at_ms`; answer with
/// `dead_letter_reconciled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconcileRequest {
    pub offset: u64,
    pub attempts: u32,
    pub decided_at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterLookup {
    Found,
    NotFound,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry {
    pub seq: u64,
    pub record: JournalRecord,
}

/// What an event asks of the shard. Owned by the caller and reused: every event clears
/// it first, so steady state allocates nothing per message once the vectors have grown.
#[derive(Debug, Default)]
pub struct Actions {
    /// `receive`: what to hand out, in offset order (the shard reads the records).
    pub deliveries: Vec<DeliveryHandle>,
    /// `receive`: the sum of the deliveries' `MessageMeta::size_bytes`.
    pub delivered_bytes: u64,
    /// `ack`, `nack`, `extend`: one result per handle, in the order given.
    pub results: Vec<Result<(), HandleError>>,
    /// Append in order, then answer once durable through `answer_after_seq`.
    pub journal: Vec<JournalEntry>,
    /// The last record journaled so far (this event's or an earlier one's); `None` while
    /// the journal is empty.
    pub answer_after_seq: Option<u64>,
    pub dead_letters: Vec<DeadLetterRequest>,
    pub reconcile: Vec<ReconcileRequest>,
    /// Call `appended` with the metadata of these offsets, read from the log.
    pub read_metadata: Option<Range<u64>>,
    /// Call `tick` at this time (or earlier); `None`: no timer pending.
    pub timer_ms: Option<u64>,
    /// Enough journal since the last snapshot: take one (`QueueGroup::snapshot`).
    pub snapshot_due: bool,
}

impl Actions {
    pub fn clear(&mut self) {
        self.deliveries.clear();
        self.delivered_bytes = 0;
        self.results.clear();
        self.journal.clear();
        self.answer_after_seq = None;
        self.dead_letters.clear();
        self.reconcile.clear();
        self.read_metadata = None;
        self.timer_ms = None;
        self.snapshot_due = false;
    }

    /// The deliveries as contiguous offset ranges: what the shard reads from the log.
    pub fn delivery_ranges(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        let mut index = 0;
        std::iter::from_fn(move || {
            let first = self.deliveries.get(index)?.offset;
            let mut end = first + 1;
            index += 1;
            while self.deliveries.get(index).map(|d| d.offset) == Some(end) {
                end += 1;
                index += 1;
            }
            Some(first..end)
        })
    }
}

/// The partition's log as the shard sees it at recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogBounds {
    /// First offset retention kept.
    pub start: u64,
    /// One past the last durable offset.
    pub end: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    pub snapshot_seq: u64,
    pub records_applied: u64,
    /// Bytes of the journal that held whole, valid records; the shard truncates the
    /// journal file here (a torn or damaged tail was never answered).
    pub journal_valid_bytes: usize,
    /// Why the scan stopped before the end of the bytes, if it did.
    pub journal_stopped: Option<JournalError>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryError {
    Snapshot(JournalError),
    /// A record is missing between the snapshot (or the previous record) and this one.
    SequenceGap {
        expected: u64,
        found: u64,
        position: usize,
    },
    /// The journal names an offset the log does not have: the wrong log, or a lost one.
    BeyondLog {
        offset: u64,
        log_end: u64,
    },
    /// A CRC-valid record no group could have written: it covers more offsets than any
    /// window, or leases attempt 0. Checked before it is applied, so damage cannot make recovery allocate
    /// without bound.
    Implausible {
        seq: u64,
        first: u64,
        count: u64,
    },
}

impl std::fmt::Display for RecoveryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecoveryError::Snapshot(error) => write!(f, "delivery snapshot: {error}"),
            RecoveryError::SequenceGap {
                expected,
                found,
                position,
            } => write!(
                f,
                "delivery journal at byte {position}: expected seq {expected}, found {found}"
            ),
            RecoveryError::BeyondLog { offset, log_end } => write!(
                f,
                "delivery state names offset {offset} but the log ends at {log_end}"
            ),
            RecoveryError::Implausible { seq, first, count } => write!(
                f,
                "delivery record seq {seq} covers {count} offsets from {first}"
            ),
        }
    }
}

impl std::error::Error for RecoveryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RecoveryError::Snapshot(error) => Some(error),
            _ => None,
        }
    }
}

/// One offset's state as seen from outside (tests, `group describe`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageState {
    /// Below the floor or settled in the window.
    Settled,
    /// Past the window: not in memory (nothing delivered yet).
    NotAdmitted,
    Available {
        attempts: u32,
    },
    Waiting {
        attempts: u32,
        due_ms: u64,
    },
    Leased {
        attempt: u32,
        deadline_ms: u64,
        holder: HolderId,
    },
    DeadLettering {
        attempts: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Available,
    Waiting { due_ms: u64 },
    Leased { deadline_ms: u64, holder: u64 },
    DeadLettering,
    Settled,
}

const NO_TIMER: u64 = u64::MAX;

#[derive(Debug, Clone, Copy)]
struct Slot {
    state: State,
    /// Deliveries so far.
    attempts: u32,
    /// The message's size from `appended`, or `SIZE_UNKNOWN` until its metadata (and
    /// with it `expires_at_ms` and the initial delay) arrived; after a restart, slots are
    /// rebuilt from the journal and their metadata read back.
    size_bytes: u32,
    expires_at_ms: u64,
    /// The key of this slot in `timers`, or `NO_TIMER`.
    timer_ms: u64,
    /// Ordered mode: the message's key hash, once `meta_known`.
    key_hash: Option<u64>,
}

/// `Slot::size_bytes` of a slot whose metadata has not arrived.
const SIZE_UNKNOWN: u32 = u32::MAX;

impl Slot {
    fn meta_known(&self) -> bool {
        self.size_bytes != SIZE_UNKNOWN
    }

    fn unknown() -> Slot {
        Slot {
            state: State::Available,
            attempts: 0,
            size_bytes: SIZE_UNKNOWN,
            expires_at_ms: u64::MAX,
            timer_ms: NO_TIMER,
            key_hash: None,
        }
    }
}

#[derive(Debug, Clone)]
struct DeadLetterInfo {
    cause: DeadLetterCause,
    decided_at_ms: u64,
    reason: Vec<u8>,
}

/// The delivery state of one queue group on one partition. See the module doc.
#[derive(Debug)]
pub struct QueueGroup {
    config: QueueGroupConfig,
    /// Every offset below is settled.
    floor: u64,
    /// Slot i is offset `floor + i`.
    window: VecDeque<Slot>,
    /// Offsets `[floor, metadata_end)` in the window have their metadata; the rest of the
    /// window (only after a restart) waits for `appended`.
    metadata_end: u64,
    /// One past the last offset the shard said exists.
    log_end: u64,
    /// The `read_metadata` range asked for and not answered yet.
    metadata_requested: Option<Range<u64>>,
    /// Available slots with known metadata, by offset: what `receive` takes from.
    ready: BTreeSet<u64>,
    /// (time, offset): lease deadlines, retry and delay due times, expiries.
    timers: BTreeSet<(u64, u64)>,
    in_flight: u32,
    dead_letters: BTreeMap<u64, DeadLetterInfo>,
    /// Ordered mode: per key hash, its window offsets not settled or dead-lettering, in
    /// offset order. Only the front may be ready.
    keys: HashMap<u64, VecDeque<u64>>,
    next_seq: u64,
    records_since_snapshot: u64,
    counters: Counters,
    random_state: u64,
}

impl QueueGroup {
    /// Creates a group whose first message is `start_offset` (the log start: a new group
    /// sees every message the log still has). `out` holds its first journal record
    /// (`Created`): the group exists once that is durable.
    pub fn create(config: QueueGroupConfig, start_offset: u64, out: &mut Actions) -> QueueGroup {
        out.clear();
        let mut group = QueueGroup::empty(config, start_offset);
        group.journal(
            JournalRecord::Created {
                offset: start_offset,
            },
            out,
        );
        group.finish(out);
        group
    }

    fn empty(config: QueueGroupConfig, start_offset: u64) -> QueueGroup {
        config
            .validate()
            .expect("queue group config validated when the broker config was loaded");
        QueueGroup {
            config,
            floor: start_offset,
            window: VecDeque::new(),
            metadata_end: start_offset,
            log_end: start_offset,
            metadata_requested: None,
            ready: BTreeSet::new(),
            timers: BTreeSet::new(),
            in_flight: 0,
            dead_letters: BTreeMap::new(),
            keys: HashMap::new(),
            next_seq: 1,
            records_since_snapshot: 0,
            counters: Counters::default(),
            random_state: config.random_seed ^ (u64::from(config.partition) << 32),
        }
    }

    pub fn config(&self) -> &QueueGroupConfig {
        &self.config
    }

    /// Every offset below is settled.
    pub fn ack_floor(&self) -> u64 {
        self.floor
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    pub fn window_len(&self) -> usize {
        self.window.len()
    }

    /// Messages not settled: lag, as `group describe` shows it.
    pub fn lag(&self) -> u64 {
        self.log_end.max(self.window_end()) - self.floor
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Takes a changed policy (a topic's queue settings altered): deliveries, the default
    /// lease, retries, TTL and expiry policy apply from the next event on (an admitted
    /// message keeps the expiry it was given). What shapes the state — the window, the
    /// in-flight maximum, the ordering, the partition — must not change (asserted): a
    /// restart applies a new ordering, rebuilding its key lists from the log.
    ///
    /// A lowered `deliveries_max` takes effect at once: an available message that has
    /// had that many deliveries already is never handed out again; it goes to the DLQ
    /// now (journaled in `out`, like any dead letter). Waiting and leased ones go when
    /// their retry comes due or their lease ends.
    pub fn set_policy(&mut self, config: QueueGroupConfig, now_ms: u64, out: &mut Actions) {
        out.clear();
        config
            .validate()
            .expect("a topic's queue settings are validated before they are stored");
        assert!(
            config.window_messages_max == self.config.window_messages_max
                && config.in_flight_messages_max == self.config.in_flight_messages_max
                && config.ordering == self.config.ordering
                && config.partition == self.config.partition,
            "a live policy change keeps the window, in-flight maximum, ordering and partition"
        );
        self.run_timers(now_ms, out);
        self.config = config;
        let spent: Vec<u64> = self
            .window
            .iter()
            .enumerate()
            .filter(|(_, slot)| {
                slot.state == State::Available
                    && slot.attempts > 0
                    && slot.attempts >= config.deliveries_max
            })
            .map(|(index, _)| self.floor + index as u64)
            .collect();
        for offset in spent {
            self.dead_letter(
                offset,
                DeadLetterCause::Nacked,
                b"deliveries_max lowered",
                now_ms,
                out,
            );
        }
        self.finish(out);
    }

    /// Whether `receive` would hand out something now: a message is ready and the group
    /// is below its in-flight maximum. What a long-poll waits for.
    pub fn receivable(&self) -> bool {
        !self.ready.is_empty() && self.in_flight < self.config.in_flight_messages_max
    }

    /// One past the last offset the group knows the log has.
    pub fn log_end(&self) -> u64 {
        self.log_end
    }

    /// The `read_metadata` request still unanswered, if any: it is issued once, in the
    /// `Actions` of the event that made room; a shard whose read failed asks here again.
    pub fn metadata_request(&self) -> Option<Range<u64>> {
        self.metadata_requested.clone()
    }

    /// The seq the next journal record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn state_of(&self, offset: u64) -> MessageState {
        let Some(index) = self.index(offset) else {
            return if offset < self.floor {
                MessageState::Settled
            } else {
                MessageState::NotAdmitted
            };
        };
        let slot = &self.window[index];
        match slot.state {
            State::Available => MessageState::Available {
                attempts: slot.attempts,
            },
            State::Waiting { due_ms } => MessageState::Waiting {
                attempts: slot.attempts,
                due_ms,
            },
            State::Leased {
                deadline_ms,
                holder,
            } => MessageState::Leased {
                attempt: slot.attempts,
                deadline_ms,
                holder: HolderId(holder),
            },
            State::DeadLettering => MessageState::DeadLettering {
                attempts: slot.attempts,
            },
            State::Settled => MessageState::Settled,
        }
    }

    /// An upper estimate of the memory this group uses now; never above
    /// `config.memory_bytes_max()` (asserted).
    pub fn memory_bytes(&self) -> u64 {
        let slot = std::mem::size_of::<Slot>() as u64;
        let reasons: u64 = self
            .dead_letters
            .values()
            .map(|info| info.reason.capacity() as u64)
            .sum();
        self.window.capacity() as u64 * slot
            + self.ready.len() as u64 * READY_ENTRY_BYTES_MAX
            + self.timers.len() as u64 * TIMER_ENTRY_BYTES_MAX
            + self.dead_letters.len() as u64 * DEAD_LETTER_ENTRY_BYTES_MAX
            + reasons
            + self
                .keys
                .values()
                .map(|queue| 64 + queue.capacity() as u64 * 8)
                .sum::<u64>()
            + SETS_FIXED_BYTES_MAX
    }

    // -----------------------------------------------------------------------------------
    // Events
    // -----------------------------------------------------------------------------------

    /// Hands out up to `messages_max` available messages, lowest offset first, each under
    /// a lease until `now + visibility timeout`. Fewer at the in-flight maximum.
    pub fn receive(&mut self, request: ReceiveRequest, now_ms: u64, out: &mut Actions) {
        out.clear();
        self.run_timers(now_ms, out);
        let visibility = self.visibility(request.visibility_timeout_ms);
        let room = self
            .config
            .in_flight_messages_max
            .saturating_sub(self.in_flight);
        let limit = request
            .messages_max
            .min(self.config.receive_messages_max)
            .min(room) as usize;
        let deadline_ms = now_ms.saturating_add(visibility);
        let mut bytes: u64 = 0;
        while out.deliveries.len() < limit {
            let Some(&offset) = self.ready.first() else {
                break;
            };
            let index = self.index(offset).expect("ready offsets are in the window");
            let size = u64::from(self.window[index].size_bytes);
            let exempt = out.deliveries.is_empty() && request.oversized_first;
            if !exempt && bytes.saturating_add(size) > request.bytes_max {
                break;
            }
            bytes = bytes.saturating_add(size);
            out.delivered_bytes = bytes;
            self.ready.pop_first();
            let slot = &mut self.window[index];
            assert!(
                slot.state == State::Available && slot.meta_known(),
                "ready set holds only available slots with metadata: offset {offset}"
            );
            if let Some(key_hash) = slot.key_hash {
                assert_eq!(
                    self.keys[&key_hash].front(),
                    Some(&offset),
                    "ordered mode: offset {offset} handed out before an earlier one of its key"
                );
            }
            let attempt = slot.attempts + 1;
            assert!(
                attempt <= self.config.deliveries_max,
                "offset {offset} would be delivered a {attempt}th time, past deliveries_max"
            );
            slot.attempts = attempt;
            self.set_state(
                offset,
                State::Leased {
                    deadline_ms,
                    holder: request.holder.0,
                },
            );
            self.journal(
                JournalRecord::Lease {
                    first: offset,
                    count: 1,
                    attempt,
                    deadline_ms,
                    holder: request.holder.0,
                },
                out,
            );
            out.deliveries.push(DeliveryHandle {
                partition: self.config.partition,
                offset,
                attempt,
            });
        }
        assert!(
            self.in_flight <= self.config.in_flight_messages_max,
            "in-flight maximum exceeded: {} > {}",
            self.in_flight,
            self.config.in_flight_messages_max
        );
        self.finish(out);
    }

    /// Settles the messages whose handles are current.
    pub fn ack(&mut self, handles: &[DeliveryHandle], now_ms: u64, out: &mut Actions) {
        out.clear();
        self.check_handle_count(handles);
        self.run_timers(now_ms, out);
        for handle in handles {
            let result = self.check_handle(handle);
            if result.is_ok() {
                self.settle(handle.offset, SettleCause::Acked, out);
            }
            out.results.push(result);
        }
        self.finish(out);
    }

    /// Gives the messages back: available again after `delay`, or to the DLQ if this was
    /// their `deliveries_max`-th delivery.
    pub fn nack(
        &mut self,
        handles: &[DeliveryHandle],
        delay: NackDelay,
        reason: &[u8],
        now_ms: u64,
        out: &mut Actions,
    ) {
        out.clear();
        self.check_handle_count(handles);
        self.run_timers(now_ms, out);
        let delay_ms = match delay {
            NackDelay::Backoff => None,
            NackDelay::Ms(ms) => Some(ms.min(self.config.nack_delay_ms_max)),
        };
        for handle in handles {
            let result = self.check_handle(handle);
            if result.is_ok() {
                let failure = Failure {
                    cause: DeadLetterCause::Nacked,
                    delay_ms,
                    since_ms: now_ms,
                };
                self.fail(handle.offset, failure, reason, now_ms, out);
            }
            out.results.push(result);
        }
        self.finish(out);
    }

    /// Moves the leases' deadlines to `now + visibility_timeout_ms` (SQS
    /// ChangeMessageVisibility: it may also shorten them).
    pub fn extend(
        &mut self,
        handles: &[DeliveryHandle],
        visibility_timeout_ms: u64,
        now_ms: u64,
        out: &mut Actions,
    ) {
        out.clear();
        self.check_handle_count(handles);
        self.run_timers(now_ms, out);
        let deadline_ms = now_ms.saturating_add(self.visibility(Some(visibility_timeout_ms)));
        for handle in handles {
            let result = self.check_handle(handle);
            if result.is_ok() {
                let index = self.index(handle.offset).expect("checked");
                let State::Leased { holder, .. } = self.window[index].state else {
                    unreachable!("a current handle's slot is leased");
                };
                self.set_state(
                    handle.offset,
                    State::Leased {
                        deadline_ms,
                        holder,
                    },
                );
                self.journal(
                    JournalRecord::Extend {
                        first: handle.offset,
                        count: 1,
                        deadline_ms,
                    },
                    out,
                );
            }
            out.results.push(result);
        }
        self.finish(out);
    }

    /// Runs every timer due at `now`: expired leases, retries and delays that came due,
    /// TTLs.
    pub fn tick(&mut self, now_ms: u64, out: &mut Actions) {
        out.clear();
        self.run_timers(now_ms, out);
        self.finish(out);
    }

    /// The log holds `metas.len()` more messages from `first_offset` (durable), or the
    /// answer to a `read_metadata` request. Admits into the window what fits; the rest is
    /// asked for again through `read_metadata` when room opens.
    pub fn appended(
        &mut self,
        first_offset: u64,
        metas: &[MessageMeta],
        now_ms: u64,
        out: &mut Actions,
    ) {
        out.clear();
        let end = first_offset + metas.len() as u64;
        self.log_end = self.log_end.max(end);
        if self.metadata_requested.is_some() && first_offset <= self.metadata_end {
            // An answer starts at (or before) the cursor; a live append past a gap does not
            // answer the request.
            self.metadata_requested = None;
        }
        let skip = self.metadata_end.saturating_sub(first_offset);
        let mut admitted = 0;
        for meta in metas.iter().skip(skip.try_into().unwrap_or(usize::MAX)) {
            let offset = self.metadata_end;
            if offset < first_offset {
                break; // A gap: what lies before first_offset is asked for later.
            }
            if offset >= self.window_end() {
                if self.window.len() >= self.config.window_messages_max as usize {
                    break;
                }
                self.window.push_back(Slot::unknown());
                admitted += 1;
            }
            self.fill_meta(offset, meta, now_ms);
            self.metadata_end += 1;
        }
        assert!(
            admitted == 0 || self.window.len() <= self.config.window_messages_max as usize,
            "invariant 6: admission grew the window past window_messages_max"
        );
        self.run_timers(now_ms, out);
        self.finish(out);
    }

    /// The DLQ copy of `offset` is durable: settle it in the source.
    pub fn dead_lettered(&mut self, offset: u64, now_ms: u64, out: &mut Actions) {
        out.clear();
        self.run_timers(now_ms, out);
        self.record_dead_lettered(offset, out);
        self.finish(out);
    }

    /// The answer to a `ReconcileRequest`.
    pub fn dead_letter_reconciled(
        &mut self,
        offset: u64,
        lookup: DeadLetterLookup,
        now_ms: u64,
        out: &mut Actions,
    ) {
        out.clear();
        self.run_timers(now_ms, out);
        match lookup {
            DeadLetterLookup::Found => self.record_dead_lettered(offset, out),
            DeadLetterLookup::NotFound => {
                if let (Some(index), Some(info)) =
                    (self.index(offset), self.dead_letters.get(&offset))
                {
                    assert_eq!(self.window[index].state, State::DeadLettering);
                    out.dead_letters.push(DeadLetterRequest {
                        offset,
                        attempts: self.window[index].attempts,
                        cause: info.cause,
                        decided_at_ms: info.decided_at_ms,
                        reason: info.reason.clone(),
                        after_seq: None,
                    });
                }
            }
        }
        self.finish(out);
    }

    /// Retention removed the log below `log_start`: those messages are gone, settled or
    /// not (docs/queues.md, "Retention"); the unsettled ones are counted as lost.
    pub fn retention(&mut self, log_start: u64, now_ms: u64, out: &mut Actions) {
        out.clear();
        self.run_timers(now_ms, out);
        if log_start > self.floor {
            self.journal(JournalRecord::LogStart { offset: log_start }, out);
            self.apply_log_start(log_start);
        }
        self.finish(out);
    }

    /// The state for a snapshot: everything journaled so far, through `next_seq() - 1`.
    /// The shard writes it (temp file, fsync, rename) and may then drop the journal up to
    /// that seq.
    pub fn snapshot(&mut self) -> Snapshot {
        self.records_since_snapshot = 0;
        let mut entries = Vec::new();
        for (index, slot) in self.window.iter().enumerate() {
            let offset = self.floor + index as u64;
            let entry = match slot.state {
                State::Settled => {
                    if let Some(SnapshotEntry::Settled {
                        offset: first,
                        count,
                    }) = entries.last_mut()
                    {
                        if *first + u64::from(*count) == offset {
                            *count += 1;
                            continue;
                        }
                    }
                    SnapshotEntry::Settled { offset, count: 1 }
                }
                State::Leased {
                    deadline_ms,
                    holder,
                } => SnapshotEntry::Leased {
                    offset,
                    attempts: slot.attempts,
                    deadline_ms,
                    holder,
                },
                // Only deliveries are state: a first delay comes back from the log.
                State::Available | State::Waiting { .. } if slot.attempts == 0 => continue,
                State::Available => SnapshotEntry::Waiting {
                    offset,
                    attempts: slot.attempts,
                    due_ms: 0,
                },
                State::Waiting { due_ms } => SnapshotEntry::Waiting {
                    offset,
                    attempts: slot.attempts,
                    due_ms,
                },
                State::DeadLettering => {
                    let info = &self.dead_letters[&offset];
                    SnapshotEntry::DeadLettering {
                        offset,
                        attempts: slot.attempts,
                        cause: info.cause,
                        decided_at_ms: info.decided_at_ms,
                        reason: info.reason.clone(),
                    }
                }
            };
            entries.push(entry);
        }
        Snapshot {
            seq: self.next_seq - 1,
            floor: self.floor,
            counters: self.counters.clone(),
            entries,
        }
    }

    /// Rebuilds a group from its last snapshot (if any) and the journal after it, then
    /// brings it to `now`: leases that ran out meanwhile expire (journaled in `out`),
    /// metadata of the window is asked for, and every message whose DLQ append may or
    /// may not have happened gets a `ReconcileRequest`.
    ///
    /// Policy for what a crash keeps (docs/queues.md, "Recovery"): acks, nacks, attempts,
    /// leases and their deadlines are restored as journaled. A lease survives the restart
    /// until its deadline, so a worker that reconnects can still ack.
    pub fn recover(
        config: QueueGroupConfig,
        snapshot: Option<&[u8]>,
        journal_bytes: &[u8],
        log: LogBounds,
        now_ms: u64,
        out: &mut Actions,
    ) -> Result<(QueueGroup, RecoveryReport), RecoveryError> {
        out.clear();
        let mut group = QueueGroup::empty(config, log.start);
        let mut snapshot_seq = 0;
        if let Some(bytes) = snapshot {
            let snapshot = decode_snapshot(bytes).map_err(RecoveryError::Snapshot)?;
            snapshot_seq = snapshot.seq;
            check_snapshot(&snapshot, log)?;
            group.load_snapshot(snapshot);
        }
        let mut position = 0;
        let mut records_applied = 0;
        let mut journal_stopped = None;
        while position < journal_bytes.len() {
            match decode_record(&journal_bytes[position..]) {
                Ok(Decoded::Complete(decoded)) => {
                    if decoded.seq > snapshot_seq {
                        if decoded.seq != group.next_seq {
                            return Err(RecoveryError::SequenceGap {
                                expected: group.next_seq,
                                found: decoded.seq,
                                position,
                            });
                        }
                        check_record(&decoded.record, decoded.seq, log)?;
                        if let JournalRecord::Created { offset } = decoded.record {
                            if snapshot_seq == 0 && records_applied == 0 {
                                // Where the group began: retention since is counted below.
                                group.floor = offset;
                                group.metadata_end = offset;
                                group.log_end = offset;
                            }
                        }
                        group.apply(&decoded.record);
                        group.next_seq += 1;
                        group.records_since_snapshot += 1;
                        records_applied += 1;
                    }
                    position += decoded.length;
                }
                Ok(Decoded::Incomplete { need }) => {
                    journal_stopped = Some(JournalError::BadLength {
                        length: u32::try_from(need).unwrap_or(u32::MAX),
                    });
                    break;
                }
                Err(error) => {
                    journal_stopped = Some(error);
                    break;
                }
            }
        }
        if group.window_end() > log.end {
            let offset = group.window_end() - 1;
            if offset >= log.start {
                return Err(RecoveryError::BeyondLog {
                    offset,
                    log_end: log.end,
                });
            }
        }
        if log.start > group.floor {
            group.journal(JournalRecord::LogStart { offset: log.start }, out);
            group.apply_log_start(log.start);
        }
        group.log_end = group.log_end.max(log.end);
        group.metadata_end = group.floor;
        for (&offset, info) in &group.dead_letters {
            let index = group.index(offset).expect("dead letters are in the window");
            out.reconcile.push(ReconcileRequest {
                offset,
                attempts: group.window[index].attempts,
                decided_at_ms: info.decided_at_ms,
            });
        }
        group.run_timers(now_ms, out);
        group.finish(out);
        let report = RecoveryReport {
            snapshot_seq,
            records_applied,
            journal_valid_bytes: position,
            journal_stopped,
        };
        Ok((group, report))
    }

    /// Checks every invariant that can be checked from the inside; O(window). Tests call
    /// it after every step.
    pub fn check_invariants(&self) {
        let mut in_flight = 0;
        let mut timers = 0;
        for (index, slot) in self.window.iter().enumerate() {
            let offset = self.floor + index as u64;
            if index == 0 {
                assert_ne!(
                    slot.state,
                    State::Settled,
                    "a settled front slot stays behind the floor"
                );
            }
            assert!(
                slot.state != State::Available || slot.attempts < self.config.deliveries_max,
                "offset {offset}: available after its last delivery"
            );
            let key_head = slot.key_hash.is_none_or(|key_hash| {
                self.keys.get(&key_hash).and_then(|queue| queue.front()) == Some(&offset)
            });
            let ready = slot.state == State::Available && slot.meta_known() && key_head;
            if let Some(key_hash) = slot.key_hash {
                assert!(
                    slot.meta_known(),
                    "offset {offset}: a key before its metadata"
                );
                let queued = self
                    .keys
                    .get(&key_hash)
                    .is_some_and(|queue| queue.binary_search(&offset).is_ok());
                let active = !matches!(slot.state, State::DeadLettering | State::Settled);
                assert_eq!(queued, active, "offset {offset}: key queue out of step");
            }
            assert_eq!(
                self.ready.contains(&offset),
                ready,
                "offset {offset}: ready set out of step"
            );
            if slot.timer_ms != NO_TIMER {
                timers += 1;
                assert!(
                    self.timers.contains(&(slot.timer_ms, offset)),
                    "offset {offset}: timer missing"
                );
            }
            match slot.state {
                State::Leased { .. } => {
                    in_flight += 1;
                    assert!(
                        slot.attempts >= 1,
                        "offset {offset}: leased but never delivered"
                    );
                    assert_ne!(
                        slot.timer_ms, NO_TIMER,
                        "offset {offset}: lease without a deadline timer"
                    );
                }
                State::DeadLettering => {
                    assert!(
                        self.dead_letters.contains_key(&offset),
                        "offset {offset}: dead-lettering without info"
                    );
                }
                _ => {}
            }
            assert_eq!(
                offset < self.metadata_end,
                slot.meta_known(),
                "offset {offset}: metadata cursor out of step"
            );
        }
        assert_eq!(in_flight, self.in_flight, "in-flight count out of step");
        let queued: usize = self.keys.values().map(VecDeque::len).sum();
        let keyed = self
            .window
            .iter()
            .filter(|slot| {
                slot.key_hash.is_some()
                    && !matches!(slot.state, State::DeadLettering | State::Settled)
            })
            .count();
        assert_eq!(queued, keyed, "key queues hold offsets outside the window");
        assert_eq!(timers, self.timers.len(), "timer set out of step");
        assert_eq!(
            self.dead_letters.len(),
            self.window
                .iter()
                .filter(|s| s.state == State::DeadLettering)
                .count()
        );
        assert!(
            self.memory_bytes() <= self.config.memory_bytes_max()
                || self.window.len() > self.config.window_messages_max as usize,
            "invariant 6: {} bytes of delivery state, bound {}",
            self.memory_bytes(),
            self.config.memory_bytes_max()
        );
    }

    // -----------------------------------------------------------------------------------
    // Inside
    // -----------------------------------------------------------------------------------

    fn window_end(&self) -> u64 {
        self.floor + self.window.len() as u64
    }

    fn index(&self, offset: u64) -> Option<usize> {
        if offset >= self.floor && offset < self.window_end() {
            Some((offset - self.floor) as usize)
        } else {
            None
        }
    }

    fn visibility(&self, requested_ms: Option<u64>) -> u64 {
        requested_ms
            .unwrap_or(self.config.visibility_timeout_ms_default)
            .clamp(1, self.config.visibility_timeout_ms_max)
    }

    fn check_handle_count(&self, handles: &[DeliveryHandle]) {
        assert!(
            handles.len() <= self.config.handles_per_request_max as usize,
            "{} handles in one request, at most {} (the protocol checks this first)",
            handles.len(),
            self.config.handles_per_request_max
        );
    }

    fn check_handle(&self, handle: &DeliveryHandle) -> Result<(), HandleError> {
        if handle.partition != self.config.partition {
            return Err(HandleError::WrongPartition {
                partition: handle.partition,
                expected: self.config.partition,
            });
        }
        let offset = handle.offset;
        if offset < self.floor {
            return Err(HandleError::Settled { offset });
        }
        let Some(index) = self.index(offset) else {
            return Err(HandleError::NotDelivered { offset });
        };
        let slot = &self.window[index];
        match slot.state {
            State::Settled | State::DeadLettering => Err(HandleError::Settled { offset }),
            _ if slot.attempts == 0 || handle.attempt == 0 => {
                Err(HandleError::NotDelivered { offset })
            }
            State::Leased { .. } if slot.attempts == handle.attempt => Ok(()),
            _ if slot.attempts == handle.attempt => Err(HandleError::LeaseExpired {
                offset,
                attempt: handle.attempt,
            }),
            _ => Err(HandleError::Stale {
                offset,
                attempt: handle.attempt,
                current_attempt: slot.attempts,
            }),
        }
    }

    /// Changes a slot's state and keeps the derived indexes (ready set, timers, in-flight
    /// count) in step: the only place that writes `Slot::state`.
    fn set_state(&mut self, offset: u64, state: State) {
        let index = self
            .index(offset)
            .expect("state changes happen inside the window");
        let slot = &mut self.window[index];
        if matches!(slot.state, State::Leased { .. }) {
            self.in_flight -= 1;
        }
        if matches!(state, State::Leased { .. }) {
            self.in_flight += 1;
        }
        if slot.state == State::DeadLettering && state != State::DeadLettering {
            self.dead_letters.remove(&offset);
        }
        let done = |state: State| matches!(state, State::DeadLettering | State::Settled);
        let leaves_key = !done(slot.state) && done(state);
        let key_hash = slot.key_hash;
        slot.state = state;
        self.refresh(index);
        if let (true, Some(key_hash)) = (leaves_key, key_hash) {
            self.leave_key(key_hash, offset);
        }
    }

    /// Ordered mode: `offset` is settled or dead-lettering; the next message with its key
    /// may become ready.
    fn leave_key(&mut self, key_hash: u64, offset: u64) {
        let Some(queue) = self.keys.get_mut(&key_hash) else {
            unreachable!("offset {offset}: its key has no queue");
        };
        let position = queue
            .binary_search(&offset)
            .unwrap_or_else(|_| panic!("offset {offset} missing from its key's queue"));
        queue.remove(position);
        let next_head = if position == 0 {
            queue.front().copied()
        } else {
            None
        };
        if queue.is_empty() {
            self.keys.remove(&key_hash);
        }
        if let Some(index) = next_head.and_then(|head| self.index(head)) {
            self.refresh(index);
        }
    }

    fn refresh(&mut self, index: usize) {
        let offset = self.floor + index as u64;
        let slot = &mut self.window[index];
        if slot.timer_ms != NO_TIMER {
            self.timers.remove(&(slot.timer_ms, offset));
        }
        let expiry = if slot.meta_known() {
            slot.expires_at_ms
        } else {
            NO_TIMER
        };
        // Ordered mode: only the oldest unsettled message of a key may be handed out.
        let key_head = match slot.key_hash {
            Some(key_hash) => {
                self.keys.get(&key_hash).and_then(|queue| queue.front()) == Some(&offset)
            }
            None => true,
        };
        let (ready, timer_ms) = match slot.state {
            State::Available => (slot.meta_known() && key_head, expiry),
            State::Waiting { due_ms } => (false, due_ms.min(expiry)),
            State::Leased { deadline_ms, .. } => (false, deadline_ms),
            State::DeadLettering | State::Settled => (false, NO_TIMER),
        };
        slot.timer_ms = timer_ms;
        if timer_ms != NO_TIMER {
            self.timers.insert((timer_ms, offset));
        }
        if ready {
            self.ready.insert(offset);
        } else {
            self.ready.remove(&offset);
        }
    }

    fn fill_meta(&mut self, offset: u64, meta: &MessageMeta, now_ms: u64) {
        let index = self.index(offset).expect("filled slots are in the window");
        let mut expires_at_ms = meta.expires_at_ms;
        if self.config.message_ttl_ms > 0 {
            expires_at_ms = expires_at_ms.min(
                meta.append_time_ms
                    .saturating_add(self.config.message_ttl_ms),
            );
        }
        let slot = &mut self.window[index];
        debug_assert!(!slot.meta_known(), "offset {offset}: metadata given twice");
        // One below the sentinel at most: a known size is never "unknown".
        slot.size_bytes = meta.size_bytes.min(SIZE_UNKNOWN - 1);
        slot.expires_at_ms = expires_at_ms;
        if self.config.ordering == Ordering::PerKey {
            slot.key_hash = meta.key_hash;
        }
        if let Some(key_hash) = slot.key_hash {
            if !matches!(slot.state, State::DeadLettering | State::Settled) {
                // Metadata arrives in offset order, so each key's queue stays sorted.
                let queue = self.keys.entry(key_hash).or_default();
                assert!(
                    queue.back().is_none_or(|&last| last < offset),
                    "offset {offset}: metadata out of order"
                );
                queue.push_back(offset);
            }
        }
        let due_ms = meta.deliver_after_ms.min(
            meta.append_time_ms
                .saturating_add(self.config.delivery_delay_ms_max),
        );
        if slot.state == State::Available && slot.attempts == 0 && due_ms > now_ms {
            self.set_state(offset, State::Waiting { due_ms });
        } else {
            self.refresh(index);
        }
    }

    fn run_timers(&mut self, now_ms: u64, out: &mut Actions) {
        while let Some(&(time_ms, offset)) = self.timers.first() {
            if time_ms > now_ms {
                break;
            }
            self.timers.pop_first();
            let index = self.index(offset).expect("timers are in the window");
            self.window[index].timer_ms = NO_TIMER;
            let slot = self.window[index];
            match slot.state {
                State::Leased { deadline_ms, .. } if now_ms >= deadline_ms => {
                    // The retry delay counts from the deadline, so a late tick does not
                    // postpone the retry.
                    let failure = Failure {
                        cause: DeadLetterCause::LeaseExpired,
                        delay_ms: None,
                        since_ms: deadline_ms,
                    };
                    self.fail(offset, failure, b"", now_ms, out)
                }
                State::Available | State::Waiting { .. }
                    if slot.meta_known() && now_ms >= slot.expires_at_ms =>
                {
                    self.expire(offset, now_ms, out)
                }
                State::Waiting { due_ms }
                    if now_ms >= due_ms && slot.attempts >= self.config.deliveries_max =>
                {
                    // Released while `deliveries_max` was higher (the config was lowered
                    // across a restart): it has had its deliveries.
                    self.dead_letter(
                        offset,
                        DeadLetterCause::Nacked,
                        b"deliveries_max lowered",
                        now_ms,
                        out,
                    )
                }
                State::Waiting { due_ms } if now_ms >= due_ms => {
                    self.set_state(offset, State::Available)
                }
                _ => self.refresh(index),
            }
        }
    }

    /// A delivery ended without an ack.
    fn fail(
        &mut self,
        offset: u64,
        failure: Failure,
        reason: &[u8],
        now_ms: u64,
        out: &mut Actions,
    ) {
        let index = self
            .index(offset)
            .expect("failed deliveries are in the window");
        let attempts = self.window[index].attempts;
        if attempts >= self.config.deliveries_max {
            self.dead_letter(offset, failure.cause, reason, now_ms, out);
            return;
        }
        let delay_ms = failure
            .delay_ms
            .unwrap_or_else(|| self.backoff_ms(attempts));
        let due_ms = failure.since_ms.saturating_add(delay_ms);
        self.set_state(offset, State::Waiting { due_ms });
        self.journal(
            JournalRecord::Release {
                first: offset,
                count: 1,
                due_ms,
            },
            out,
        );
    }

    fn expire(&mut self, offset: u64, now_ms: u64, out: &mut Actions) {
        match self.config.expiry_policy {
            ExpiryPolicy::Drop => self.settle(offset, SettleCause::ExpiredDropped, out),
            ExpiryPolicy::DeadLetter => {
                self.dead_letter(offset, DeadLetterCause::Expired, b"", now_ms, out)
            }
        }
    }

    fn dead_letter(
        &mut self,
        offset: u64,
        cause: DeadLetterCause,
        reason: &[u8],
        now_ms: u64,
        out: &mut Actions,
    ) {
        let index = self.index(offset).expect("dead letters are in the window");
        let attempts = self.window[index].attempts;
        assert!(
            cause == DeadLetterCause::Expired || attempts >= self.config.deliveries_max,
            "invariant 5: offset {offset} dead-lettered after {attempts} deliveries, \
             deliveries_max {}",
            self.config.deliveries_max
        );
        assert!(
            matches!(
                self.window[index].state,
                State::Available | State::Waiting { .. } | State::Leased { .. }
            ),
            "invariant 5: offset {offset} dead-lettered twice"
        );
        let reason = reason[..reason.len().min(self.config.nack_reason_bytes_max.into())].to_vec();
        self.set_state(offset, State::DeadLettering);
        let seq = self.journal(
            JournalRecord::DeadLetterPending {
                offset,
                attempts,
                cause,
                decided_at_ms: now_ms,
                reason: reason.clone(),
            },
            out,
        );
        out.dead_letters.push(DeadLetterRequest {
            offset,
            attempts,
            cause,
            decided_at_ms: now_ms,
            reason: reason.clone(),
            after_seq: Some(seq),
        });
        self.dead_letters.insert(
            offset,
            DeadLetterInfo {
                cause,
                decided_at_ms: now_ms,
                reason,
            },
        );
    }

    fn record_dead_lettered(&mut self, offset: u64, out: &mut Actions) {
        let Some(index) = self.index(offset) else {
            // Retention removed it meanwhile; its DLQ copy stands, once.
            assert!(
                offset < self.floor,
                "dead-lettered offset {offset} was never admitted"
            );
            return;
        };
        assert_eq!(
            self.window[index].state,
            State::DeadLettering,
            "invariant 5: offset {offset} reported dead-lettered without a pending DLQ append"
        );
        self.journal(JournalRecord::DeadLettered { offset }, out);
        self.apply_dead_lettered(offset);
    }

    fn apply_dead_lettered(&mut self, offset: u64) {
        self.dead_letters.remove(&offset);
        self.set_state(offset, State::Settled);
        self.counters.dead_lettered += 1;
    }

    fn settle(&mut self, offset: u64, cause: SettleCause, out: &mut Actions) {
        self.apply_settle(offset, cause);
        self.journal(
            JournalRecord::Settle {
                first: offset,
                count: 1,
                cause,
            },
            out,
        );
    }

    fn apply_settle(&mut self, offset: u64, cause: SettleCause) {
        self.set_state(offset, State::Settled);
        match cause {
            SettleCause::Acked => self.counters.acked += 1,
            SettleCause::ExpiredDropped => self.counters.expired_dropped += 1,
        }
    }

    fn apply_log_start(&mut self, log_start: u64) {
        let mut left_keys = Vec::new();
        while self.floor < log_start {
            let Some(slot) = self.window.pop_front() else {
                break;
            };
            let offset = self.floor;
            if let Some(key_hash) = slot.key_hash {
                if !matches!(slot.state, State::DeadLettering | State::Settled) {
                    left_keys.push((key_hash, offset));
                }
            }
            if slot.timer_ms != NO_TIMER {
                self.timers.remove(&(slot.timer_ms, offset));
            }
            self.ready.remove(&offset);
            match slot.state {
                State::Settled => {}
                State::Leased { .. } => {
                    self.in_flight -= 1;
                    self.counters.lost_to_retention += 1;
                }
                State::DeadLettering => {
                    self.dead_letters.remove(&offset);
                    self.counters.lost_to_retention += 1;
                }
                State::Available | State::Waiting { .. } => {
                    self.counters.lost_to_retention += 1;
                }
            }
            self.floor += 1;
        }
        for (key_hash, offset) in left_keys {
            self.leave_key(key_hash, offset);
        }
        if self.floor < log_start {
            // Never admitted, so counted by offset.
            self.counters.lost_to_retention += log_start - self.floor;
            self.floor = log_start;
        }
        self.metadata_end = self.metadata_end.max(self.floor);
        self.log_end = self.log_end.max(self.floor);
        if self
            .metadata_requested
            .as_ref()
            .is_some_and(|range| range.end <= self.floor)
        {
            self.metadata_requested = None;
        }
    }

    /// Adds a record to `out`, merging it into the previous one when it continues its
    /// range with the same parameters. Returns the seq of the record holding it.
    fn journal(&mut self, record: JournalRecord, out: &mut Actions) -> u64 {
        if let Some(last) = out.journal.last_mut() {
            if merge(&mut last.record, &record) {
                return last.seq;
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.records_since_snapshot += 1;
        out.journal.push(JournalEntry { seq, record });
        seq
    }

    fn finish(&mut self, out: &mut Actions) {
        while self
            .window
            .front()
            .is_some_and(|slot| slot.state == State::Settled)
        {
            self.window.pop_front();
            self.floor += 1;
        }
        self.metadata_end = self.metadata_end.max(self.floor);
        let wanted_end = self
            .log_end
            .min(self.floor + u64::from(self.config.window_messages_max));
        if self.metadata_requested.is_none() && self.metadata_end < wanted_end {
            out.read_metadata = Some(self.metadata_end..wanted_end);
            self.metadata_requested = Some(self.metadata_end..wanted_end);
        }
        out.timer_ms = self.timers.first().map(|&(time_ms, _)| time_ms);
        out.answer_after_seq = (self.next_seq > 1).then(|| self.next_seq - 1);
        out.snapshot_due =
            self.records_since_snapshot >= self.config.journal_records_per_snapshot_max;
    }

    fn backoff_ms(&mut self, attempts: u32) -> u64 {
        let policy = self.config.retry;
        let mut delay_ms = policy.delay_ms_min;
        for _ in 1..attempts {
            if delay_ms >= policy.delay_ms_max {
                break;
            }
            delay_ms = delay_ms.saturating_mul(policy.multiplier_percent.into()) / 100;
        }
        let delay_ms = delay_ms.min(policy.delay_ms_max);
        let jitter_ms = delay_ms * u64::from(policy.jitter_percent) / 100;
        if jitter_ms == 0 {
            return delay_ms;
        }
        delay_ms - self.next_random() % (jitter_ms + 1)
    }

    /// SplitMix64: small, seeded, and good enough to spread retries.
    fn next_random(&mut self) -> u64 {
        self.random_state = self.random_state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.random_state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    // -----------------------------------------------------------------------------------
    // Recovery
    // -----------------------------------------------------------------------------------

    /// The slot of `offset`, growing the window to it; `None` below the floor.
    fn ensure_slot(&mut self, offset: u64) -> Option<usize> {
        if offset < self.floor {
            return None;
        }
        while self.window_end() <= offset {
            self.window.push_back(Slot::unknown());
        }
        self.index(offset)
    }

    fn load_snapshot(&mut self, snapshot: Snapshot) {
        // The snapshot's floor is authoritative; a later log start is applied (and
        // counted) after the journal replay.
        self.floor = snapshot.floor;
        self.metadata_end = snapshot.floor;
        self.log_end = snapshot.floor;
        self.counters = snapshot.counters;
        self.next_seq = snapshot.seq + 1;
        for entry in snapshot.entries {
            match entry {
                SnapshotEntry::Settled { offset, count } => {
                    for offset in offset..offset + u64::from(count) {
                        if self.ensure_slot(offset).is_some() {
                            self.set_state(offset, State::Settled);
                        }
                    }
                }
                SnapshotEntry::Leased {
                    offset,
                    attempts,
                    deadline_ms,
                    holder,
                } => self.restore(
                    offset,
                    attempts,
                    State::Leased {
                        deadline_ms,
                        holder,
                    },
                ),
                SnapshotEntry::Waiting {
                    offset,
                    attempts,
                    due_ms,
                } => self.restore(offset, attempts, State::Waiting { due_ms }),
                SnapshotEntry::DeadLettering {
                    offset,
                    attempts,
                    cause,
                    decided_at_ms,
                    reason,
                } => self.restore_dead_lettering(
                    offset,
                    attempts,
                    DeadLetterInfo {
                        cause,
                        decided_at_ms,
                        reason,
                    },
                ),
            }
        }
    }

    /// A message whose DLQ append may or may not have happened, from a snapshot or the
    /// journal (outside the window: already settled, nothing to restore).
    fn restore_dead_lettering(&mut self, offset: u64, attempts: u32, info: DeadLetterInfo) {
        if self.ensure_slot(offset).is_some() {
            self.restore(offset, attempts, State::DeadLettering);
            self.dead_letters.insert(offset, info);
        }
    }

    fn restore(&mut self, offset: u64, attempts: u32, state: State) {
        if let Some(index) = self.ensure_slot(offset) {
            let slot = &mut self.window[index];
            slot.attempts = slot.attempts.max(attempts);
            self.set_state(offset, state);
        }
    }

    /// Replays one journal record. Records are state, so this sets rather than adds.
    fn apply(&mut self, record: &JournalRecord) {
        match *record {
            JournalRecord::Lease {
                first,
                count,
                attempt,
                deadline_ms,
                holder,
            } => {
                for offset in first..first + u64::from(count) {
                    self.restore(
                        offset,
                        attempt,
                        State::Leased {
                            deadline_ms,
                            holder,
                        },
                    );
                }
            }
            JournalRecord::Settle {
                first,
                count,
                cause,
            } => {
                for offset in first..first + u64::from(count) {
                    if self.ensure_slot(offset).is_some() {
                        self.apply_settle(offset, cause);
                    }
                }
            }
            JournalRecord::Release {
                first,
                count,
                due_ms,
            } => {
                for offset in first..first + u64::from(count) {
                    self.restore(offset, 0, State::Waiting { due_ms });
                }
            }
            JournalRecord::Extend {
                first,
                count,
                deadline_ms,
            } => {
                for offset in first..first + u64::from(count) {
                    if let Some(index) = self.ensure_slot(offset) {
                        if let State::Leased { holder, .. } = self.window[index].state {
                            self.set_state(
                                offset,
                                State::Leased {
                                    deadline_ms,
                                    holder,
                                },
                            );
                        }
                    }
                }
            }
            JournalRecord::DeadLetterPending {
                offset,
                attempts,
                cause,
                decided_at_ms,
                ref reason,
            } => self.restore_dead_lettering(
                offset,
                attempts,
                DeadLetterInfo {
                    cause,
                    decided_at_ms,
                    reason: reason.clone(),
                },
            ),
            JournalRecord::DeadLettered { offset } => {
                if self.ensure_slot(offset).is_some() {
                    self.apply_dead_lettered(offset);
                }
            }
            JournalRecord::LogStart { offset } => self.apply_log_start(offset),
            // Read by `recover` before it is applied; nothing to change here.
            JournalRecord::Created { .. } => {}
        }
        while self
            .window
            .front()
            .is_some_and(|slot| slot.state == State::Settled)
        {
            self.window.pop_front();
            self.floor += 1;
        }
    }
}

/// No record covers more offsets: one event only touches its window, and windows are far
/// smaller. Not tied to the configured window, which may have been lowered since.
const RECORD_OFFSETS_MAX: u64 = 1 << 20;

/// The offsets a record names, as (first, count).
fn record_range(record: &JournalRecord) -> (u64, u64) {
    match *record {
        JournalRecord::Lease { first, count, .. }
        | JournalRecord::Settle { first, count, .. }
        | JournalRecord::Release { first, count, .. }
        | JournalRecord::Extend { first, count, .. } => (first, u64::from(count)),
        JournalRecord::DeadLetterPending { offset, .. }
        | JournalRecord::DeadLettered { offset } => (offset, 1),
        JournalRecord::LogStart { .. } => (0, 0),
        JournalRecord::Created { offset } => (offset, 0),
    }
}

/// Refuses a record naming more offsets than any window or offsets past the log, before
/// it is applied: the window grows to what records name.
fn check_record(record: &JournalRecord, seq: u64, log: LogBounds) -> Result<(), RecoveryError> {
    let (first, count) = record_range(record);
    let never_delivered = matches!(record, JournalRecord::Lease { attempt: 0, .. });
    if count > RECORD_OFFSETS_MAX || never_delivered {
        return Err(RecoveryError::Implausible { seq, first, count });
    }
    let end = first.saturating_add(count);
    if count > 0 && end > log.end {
        return Err(RecoveryError::BeyondLog {
            offset: end - 1,
            log_end: log.end,
        });
    }
    Ok(())
}

fn check_snapshot(snapshot: &Snapshot, log: LogBounds) -> Result<(), RecoveryError> {
    for entry in &snapshot.entries {
        let (offset, count) = match *entry {
            SnapshotEntry::Settled { offset, count } => (offset, count),
            SnapshotEntry::Leased { offset, .. }
            | SnapshotEntry::Waiting { offset, .. }
            | SnapshotEntry::DeadLettering { offset, .. } => (offset, 1),
        };
        let record = JournalRecord::Release {
            first: offset,
            count,
            due_ms: 0,
        };
        check_record(&record, snapshot.seq, log)?;
    }
    Ok(())
}

/// How a delivery ended without an ack.
#[derive(Debug, Clone, Copy)]
struct Failure {
    /// The cause recorded if this was the last delivery allowed.
    cause: DeadLetterCause,
    /// An explicit delay (nack), else the retry policy's.
    delay_ms: Option<u64>,
    /// Where the delay counts from: the nack's time, or the lease's deadline.
    since_ms: u64,
}

/// Merges `next` into `last` when it extends `last`'s range with the same parameters.
fn merge(last: &mut JournalRecord, next: &JournalRecord) -> bool {
    match (last, next) {
        (
            JournalRecord::Lease {
                first,
                count,
                attempt,
                deadline_ms,
                holder,
            },
            JournalRecord::Lease {
                first: next_first,
                count: 1,
                attempt: next_attempt,
                deadline_ms: next_deadline,
                holder: next_holder,
            },
        ) if *first + u64::from(*count) == *next_first
            && attempt == next_attempt
            && deadline_ms == next_deadline
            && holder == next_holder =>
        {
            *count += 1;
            true
        }
        (
            JournalRecord::Settle {
                first,
                count,
                cause,
            },
            JournalRecord::Settle {
                first: next_first,
                count: 1,
                cause: next_cause,
            },
        ) if *first + u64::from(*count) == *next_first && cause == next_cause => {
            *count += 1;
            true
        }
        (
            JournalRecord::Release {
                first,
                count,
                due_ms,
            },
            JournalRecord::Release {
                first: next_first,
                count: 1,
                due_ms: next_due,
            },
        ) if *first + u64::from(*count) == *next_first && due_ms == next_due => {
            *count += 1;
            true
        }
        (
            JournalRecord::Extend {
                first,
                count,
                deadline_ms,
            },
            JournalRecord::Extend {
                first: next_first,
                count: 1,
                deadline_ms: next_deadline,
            },
        ) if *first + u64::from(*count) == *next_first && deadline_ms == next_deadline => {
            *count += 1;
            true
        }
        _ => false,
    }
}
