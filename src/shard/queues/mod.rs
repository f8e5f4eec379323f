//! Queue groups on the shard: the runtime that drives `delivery::QueueGroup` state
//! machines with real files, the log and the clock (docs/queues.md).
//!
//! What it is: one [`GroupRuntime`] per (topic, partition, group) whose partition this
//! shard owns (invariant 4: only this shard touches it), with its journal writer
//! (`files`), plus one pump task per shard that feeds every group what it must learn
//! from outside: durable offsets (`appended`, only ever up to the high watermark, so a
//! group never hands out what a crash could take back), the metadata of the messages it
//! admits (read from the log), log-start moves (`retention`) and its timers (`tick`).
//! What it is not: the state machine (sans-IO, `crate::delivery`) or the wire
//! (`server::dispatch` splits requests by owner and merges the answers).
//!
//! Contract, per event: the journal records go to the group's writer in order; an answer
//! (deliveries, per-handle results) is given only once the journal is durable through
//! `answer_after_seq` (group commit: one fdatasync per round covers every record
//! appended during the previous one). A DLQ append starts only once the journal is
//! durable through the request's `after_seq`, and `dead_lettered` is called only once the
//! DLQ append is durable (invariant 5). `RefCell` borrows are never held across `.await`.
//!
//! Time is the broker's wall clock in milliseconds (`storage::now_ms`).

pub mod files;
pub mod records;
pub mod settings;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;

use super::{
    off_reactor, storage_to_wire, ProduceItem, Shard, ShardReply, ShardRequest, TopicConfig,
};
use crate::delivery::{
    encode_snapshot, Actions, DeadLetterLookup, DeadLetterRequest, DeliveryHandle, HandleError,
    HolderId, JournalRecord, LogBounds, MessageMeta, MessageState, NackDelay, QueueGroup,
    ReceiveRequest as GroupReceive, ReconcileRequest,
};
use crate::protocol::batch::BatchBuilder;
use crate::protocol::queue::{
    headers, GroupKind, GroupPartition, Handle, NackDelay as WireNackDelay, QueueSettings,
    ReceivedMessage, RefusedHandle, SettleAction,
};
use crate::protocol::{quote_untrusted, Acks, ErrorCode, Retention, WireError};
use crate::storage::{Notify, PartitionLog, StorageError};
use files::JournalWriter;
use glommio::task::JoinHandle;
use records::StoredRecord;

/// Bytes one log read for queue groups asks for: metadata of the window, delivered
/// records, the source records of dead letters, a DLQ search. Whole batches come back,
/// at least one, so a larger batch is still read.
const READ_BYTES: usize = 1 << 20;
/// Bytes one log read for a receive or a dead letter asks for: they want a few offsets,
/// not a MiB around each (whole batches still come back, at least one).
const DELIVERY_READ_BYTES: usize = 64 << 10;
/// Deliveries whose offsets are at most this far apart are read with one read: a gap
/// this small costs less to read past than another read costs.
const DELIVERY_READ_GAP_MAX: u64 = 64;
/// How long one wait for a maybe-appended DLQ copy to become durable lasts before the
/// worker backs off and asks again.
const DEAD_LETTER_DURABLE_WAIT_MS: u64 = 5_000;
/// A DLQ search after a restart starts this long before the decision's time: the DLQ
/// record's timestamp is the broker's clock when it was built, at or after the decision,
/// and this margin covers a clock that stepped back a little (docs/queues.md §7).
const DEAD_LETTER_SEARCH_MARGIN_MS: u64 = 60_000;
/// First wait before retrying a failed DLQ append or search; doubles up to the maximum.
const DEAD_LETTER_RETRY_MS_MIN: u64 = 100;
const DEAD_LETTER_RETRY_MS_MAX: u64 = 30_000;
/// DLQ records per batch appended at once.
const DEAD_LETTERS_PER_BATCH_MAX: usize = 256;

pub fn now_ms() -> u64 {
    u64::try_from(crate::storage::now_ms()).unwrap_or(0)
}

/// (topic, partition, group).
type GroupKey = (String, u32, String);

/// The long-polls of one (topic, group): their notifier and how many wait on it.
type Waiters = (Rc<Notify>, usize);

/// One owner's answer to a describe: (group name, kind, one partition of it).
pub type DescribedPartition = (String, GroupKind, GroupPartition);

/// Every queue group of the shard and the pump's wake-ups.
#[derive(Default)]
pub struct Queues {
    groups: RefCell<BTreeMap<GroupKey, Rc<GroupRuntime>>>,
    /// Groups being created (their `Created` record on its way to disk).
    creating: RefCell<HashSet<GroupKey>>,
    /// A creation finished (either way): a second creator of the same group looks again.
    created: Notify,
    /// Long-polls waiting, by topic then group, with how many wait: an event wakes only
    /// the polls of its own (topic, group), and only when it made something receivable.
    waiting: RefCell<HashMap<String, HashMap<String, Waiters>>>,
    /// The pump must look again before its deadline (an earlier timer, metadata wanted,
    /// a new group, shutdown).
    pump_wake: Notify,
    /// The time the pump sleeps until (u64::MAX: no timer).
    pump_deadline: Cell<u64>,
    /// Whether the pump runs: until then (start-up), DLQ work waits for it.
    started: Cell<bool>,
    /// Counts receives served here: where each starts among the shard's partitions.
    receive_rotation: Cell<u64>,
}

impl Queues {
    /// Registers a long-poll of (topic, group); it is woken through the returned notifier
    /// until the guard is dropped.
    fn wait_for(&self, topic: &str, group: &str) -> (Rc<Notify>, Waiting<'_>) {
        let mut waiting = self.waiting.borrow_mut();
        let entry = waiting
            .entry(topic.to_owned())
            .or_default()
            .entry(group.to_owned())
            .or_insert_with(|| (Rc::new(Notify::new()), 0));
        entry.1 += 1;
        let notify = Rc::clone(&entry.0);
        (
            notify,
            Waiting {
                queues: self,
                topic: topic.to_owned(),
                group: group.to_owned(),
            },
        )
    }

    /// Wakes the long-polls of (topic, group), if any wait.
    fn wake(&self, topic: &str, group: &str) {
        let notify = self
            .waiting
            .borrow()
            .get(topic)
            .and_then(|groups| groups.get(group))
            .map(|(notify, _)| Rc::clone(notify));
        if let Some(notify) = notify {
            notify.notify_all();
        }
    }

    /// Wakes every long-poll of `topic` (deleted, or its settings changed).
    fn wake_topic(&self, topic: &str) {
        let notifies: Vec<Rc<Notify>> = self
            .waiting
            .borrow()
            .get(topic)
            .map(|groups| {
                groups
                    .values()
                    .map(|(notify, _)| Rc::clone(notify))
                    .collect()
            })
            .unwrap_or_default();
        for notify in notifies {
            notify.notify_all();
        }
    }

    /// Wakes every long-poll (shutdown).
    fn wake_all(&self) {
        let notifies: Vec<Rc<Notify>> = self
            .waiting
            .borrow()
            .values()
            .flat_map(|groups| groups.values().map(|(notify, _)| Rc::clone(notify)))
            .collect();
        for notify in notifies {
            notify.notify_all();
        }
    }
}

/// A registered long-poll; forgotten when dropped (the poll ended or was abandoned).
struct Waiting<'a> {
    queues: &'a Queues,
    topic: String,
    group: String,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut waiting = self.queues.waiting.borrow_mut();
        let Some(groups) = waiting.get_mut(&self.topic) else {
            return;
        };
        if let Some(entry) = groups.get_mut(&self.group) {
            entry.1 -= 1;
            if entry.1 == 0 {
                groups.remove(&self.group);
            }
        }
        if groups.is_empty() {
            waiting.remove(&self.topic);
        }
    }
}

/// What one DLQ batch did: the offsets to settle, and those whose source record could
/// not be read (retried later; the others are not held back by them).
struct BatchOutcome {
    settled: Vec<u64>,
    unreadable: Vec<(u64, WireError)>,
}

/// Why a DLQ batch failed as a whole, and, when the append may have happened, what the
/// retry must wait for: (DLQ, partition, its next offset after the append).
struct BatchFailure {
    error: WireError,
    maybe_appended: Option<(String, u32, u64)>,
}

impl From<WireError> for BatchFailure {
    fn from(error: WireError) -> BatchFailure {
        BatchFailure {
            error,
            maybe_appended: None,
        }
    }
}

/// A DLQ must be placed like its source (same placement name, same partition count):
/// then partition p of both is on one shard and a copy never crosses cores.
fn check_dead_letter_placement(
    source: &str,
    source_config: &TopicConfig,
    dlq: &str,
    dlq_config: &TopicConfig,
) -> Result<(), WireError> {
    let source_placement = source_config.placement.as_deref().unwrap_or(source);
    let dlq_placement = dlq_config.placement.as_deref().unwrap_or(dlq);
    if source_placement == dlq_placement && source_config.partitions == dlq_config.partitions {
        return Ok(());
    }
    Err(WireError::new(
        ErrorCode::InvalidRequest,
        format!(
            "dead-letter topic {} exists with {} partitions placed by {}, but {} has {} placed by {}: the DLQ must be created by the broker (at the first dead letter) or share the source's placement and partition count",
            quote_untrusted(dlq),
            dlq_config.partitions,
            quote_untrusted(dlq_placement),
            quote_untrusted(source),
            source_config.partitions,
            quote_untrusted(source_placement)
        ),
    ))
}

const TASK_DEAD_LETTERS: usize = 0;
const TASK_RECONCILE: usize = 1;
const TASK_SNAPSHOT: usize = 2;

/// What one event returned that its caller needs.
#[derive(Default)]
struct EventOutcome {
    deliveries: Vec<DeliveryHandle>,
    /// `receive`: what the deliveries weigh (`MessageMeta::size_bytes`).
    delivered_bytes: u64,
    results: Vec<Result<(), HandleError>>,
    answer_after_seq: Option<u64>,
}

/// One queue group on one partition, with its files and background work.
pub struct GroupRuntime {
    topic: Arc<str>,
    partition: u32,
    name: String,
    log: Rc<PartitionLog>,
    state: RefCell<QueueGroup>,
    /// Reused by every event: steady state allocates nothing per message for it.
    actions: RefCell<Actions>,
    writer: Rc<JournalWriter>,
    timer_ms: Cell<Option<u64>>,
    /// One past the last offset told to the state machine (`appended`).
    announced_end: Cell<u64>,
    /// The log start the state machine last heard of (`retention`).
    known_log_start: Cell<u64>,
    metadata_reading: Cell<bool>,
    dead_letters: RefCell<VecDeque<DeadLetterRequest>>,
    dead_letter_running: Cell<bool>,
    reconcile: RefCell<Vec<ReconcileRequest>>,
    reconcile_running: Cell<bool>,
    snapshot_running: Cell<bool>,
    /// The group's background tasks, one of each kind at most (`TASK_*`: DLQ worker,
    /// reconcile, snapshot writer): stopped and awaited when the group closes, before its
    /// directory may go. A slot is reused only once its task has finished (the kinds'
    /// `*_running` flags).
    tasks: RefCell<[Option<JoinHandle<()>>; 3]>,
    /// Causes of DLQ failures already logged since the last success: a stuck dead
    /// letter is logged once per cause, not at every retry.
    dead_letter_logged: RefCell<HashSet<String>>,
    /// A DLQ append that may have happened (answered Timeout): (DLQ, partition, its next
    /// offset then). No append is retried before that offset is durable and the DLQ
    /// was searched.
    dead_letter_maybe: RefCell<Option<(String, u32, u64)>>,
    closed: Cell<bool>,
    /// Notified when the group closes: a background task's retry delay ends early.
    closing: Notify,
    /// (lease start ms, offset, attempt), in lease order: the oldest unacked age that
    /// describe reports. Entries whose lease ended are pruned when it doubles past the
    /// in-flight maximum, so it stays within twice that.
    lease_starts: RefCell<VecDeque<(u64, u64, u32)>>,
    /// The group's own settings (`AlterGroup`: only the retry delays), kept in its
    /// `settings` file; they win over the topic's (`settings::group_settings`).
    own_settings: RefCell<QueueSettings>,
    /// One `AlterGroup` at a time writes the `settings` file and applies it: two at once
    /// would share `settings.tmp`, and each must build on what the other set.
    settings_lock: glommio::sync::Semaphore,
}

impl GroupRuntime {
    fn new(
        topic: &str,
        partition: u32,
        name: &str,
        log: Rc<PartitionLog>,
        group: QueueGroup,
        writer: Rc<JournalWriter>,
        announced_end: u64,
    ) -> GroupRuntime {
        let known_log_start = group.ack_floor().min(log.log_start_offset());
        GroupRuntime {
            topic: Arc::from(topic),
            partition,
            name: name.to_owned(),
            log,
            state: RefCell::new(group),
            actions: RefCell::new(Actions::default()),
            writer,
            timer_ms: Cell::new(None),
            announced_end: Cell::new(announced_end),
            known_log_start: Cell::new(known_log_start),
            metadata_reading: Cell::new(false),
            dead_letters: RefCell::new(VecDeque::new()),
            dead_letter_running: Cell::new(false),
            reconcile: RefCell::new(Vec::new()),
            reconcile_running: Cell::new(false),
            snapshot_running: Cell::new(false),
            tasks: RefCell::new([None, None, None]),
            dead_letter_logged: RefCell::new(HashSet::new()),
            dead_letter_maybe: RefCell::new(None),
            closed: Cell::new(false),
            closing: Notify::new(),
            lease_starts: RefCell::new(VecDeque::new()),
            own_settings: RefCell::new(QueueSettings::default()),
            settings_lock: glommio::sync::Semaphore::new(1),
        }
    }

    fn key(&self) -> GroupKey {
        (self.topic.to_string(), self.partition, self.name.clone())
    }

    /// Waits `delay_ms`, or less if the group closes meanwhile.
    async fn pause(&self, delay_ms: u64) {
        if self.closed.get() {
            return;
        }
        let closing = self.closing.listen();
        let _ = glommio::timer::timeout(Duration::from_millis(delay_ms), async {
            let _ = closing.await;
            Ok(())
        })
        .await;
    }

    /// Keeps a background task's handle in its kind's slot (the previous one finished).
    fn keep_task(&self, kind: usize, task: JoinHandle<()>) {
        self.tasks.borrow_mut()[kind] = Some(task);
    }

    /// Logs a DLQ failure once per cause until the next success.
    fn log_dead_letter_failure(&self, cause: String, message: impl FnOnce() -> String) {
        if self.dead_letter_logged.borrow_mut().insert(cause) {
            tracing::warn!(
                topic = %self.topic,
                partition = self.partition,
                group = %self.name,
                "dead-lettering: {} (retried with a growing delay; logged once per cause, see dead_lettering in describe)",
                message()
            );
        }
    }

    fn describe(&self, now: u64) -> GroupPartition {
        let state = self.state.borrow();
        let floor = state.ack_floor();
        let mut waiting = 0u32;
        let mut dead_lettering = 0u32;
        for offset in floor..floor + state.window_len() as u64 {
            match state.state_of(offset) {
                MessageState::Waiting { .. } => waiting += 1,
                MessageState::DeadLettering { .. } => dead_lettering += 1,
                _ => {}
            }
        }
        let oldest = self
            .lease_starts
            .borrow()
            .iter()
            .find(|(_, offset, attempt)| is_leased(&state, *offset, *attempt))
            .map_or(0, |(started, _, _)| now.saturating_sub(*started));
        let counters = state.counters();
        GroupPartition {
            partition: self.partition,
            position: floor,
            log_start_offset: self.log.log_start_offset(),
            high_watermark: self.log.high_watermark(),
            in_flight: state.in_flight(),
            waiting,
            dead_lettering,
            acked: counters.acked,
            dead_lettered: counters.dead_lettered,
            expired_dropped: counters.expired_dropped,
            lost_to_retention: counters.lost_to_retention,
            oldest_unacked_age_ms: oldest,
        }
    }
}

fn is_leased(state: &QueueGroup, offset: u64, attempt: u32) -> bool {
    matches!(state.state_of(offset), MessageState::Leased { attempt: current, .. } if current == attempt)
}

fn handle_error(error: HandleError) -> WireError {
    let code = match error {
        HandleError::Stale { .. } => ErrorCode::HandleStale,
        HandleError::LeaseExpired { .. } => ErrorCode::LeaseExpired,
        HandleError::Settled { .. } => ErrorCode::AlreadySettled,
        HandleError::NotDelivered { .. } | HandleError::WrongPartition { .. } => {
            ErrorCode::NotDelivered
        }
    };
    WireError::new(code, error.to_string())
}

/// A journal failure as the client hears it: the shard's mapping (a closed journal is
/// ShuttingDown only while the broker stops; otherwise its topic was deleted:
/// UnknownTopic).
fn journal_error(error: &StorageError, shutting_down: bool) -> WireError {
    let code = storage_to_wire(error, shutting_down).code;
    WireError::new(code, format!("queue group journal: {error}"))
}

/// Reads the metadata of `range` (at least its first message, when readable): one read.
async fn read_metas(
    log: &PartitionLog,
    range: Range<u64>,
) -> Result<Vec<MessageMeta>, StorageError> {
    let bytes = log.read(range.start, READ_BYTES).await?;
    let mut stored = Vec::new();
    if let Err(error) = records::stored_records(&bytes, range.start, range.end, &mut stored) {
        return Err(StorageError::Corrupt {
            path: log.directory().to_path_buf(),
            position: range.start,
            reason: format!("reading metadata for a queue group: {error}"),
        });
    }
    let mut metas = Vec::with_capacity(stored.len());
    for (index, record) in stored.iter().enumerate() {
        let offset = range.start + index as u64;
        if record.record.offset != offset || offset >= range.end {
            break;
        }
        metas.push(records::meta_of(record));
    }
    Ok(metas)
}

/// Reads the records at `offsets` (ascending) from the log, in offset order. Nearby
/// offsets share one read (`read_spans`); each read asks for little
/// (`DELIVERY_READ_BYTES`), decodes nothing past its span, and what is kept is copied out
/// of the read buffers, so they are freed at once.
async fn read_records(
    log: &PartitionLog,
    offsets: &[u64],
) -> Result<Vec<StoredRecord>, StorageError> {
    let mut out = Vec::with_capacity(offsets.len());
    let mut decoded = Vec::new();
    for span in read_spans(offsets) {
        let mut next = span.start;
        while next < span.end {
            let bytes = log.read(next, DELIVERY_READ_BYTES).await?;
            if bytes.is_empty() {
                break;
            }
            decoded.clear();
            records::stored_records(&bytes, next, span.end, &mut decoded).map_err(|error| {
                StorageError::Corrupt {
                    path: log.directory().to_path_buf(),
                    position: next,
                    reason: format!("reading records for a queue group: {error}"),
                }
            })?;
            let Some(last) = decoded.last() else {
                break;
            };
            next = last.record.offset + 1;
            for stored in decoded.drain(..) {
                if offsets.binary_search(&stored.record.offset).is_ok() {
                    out.push(StoredRecord {
                        append_time_ms: stored.append_time_ms,
                        record: records::owned(stored.record),
                    });
                }
            }
        }
    }
    Ok(out)
}

/// The offset ranges to read for `offsets` (ascending): runs, merged when the gap
/// between them is at most `DELIVERY_READ_GAP_MAX`.
fn read_spans(offsets: &[u64]) -> Vec<Range<u64>> {
    let mut spans: Vec<Range<u64>> = Vec::new();
    for &offset in offsets {
        match spans.last_mut() {
            Some(span) if offset >= span.end && offset - span.end <= DELIVERY_READ_GAP_MAX => {
                span.end = offset + 1
            }
            _ => spans.push(offset..offset + 1),
        }
    }
    spans
}

impl Shard {
    fn journal_error(&self, error: &StorageError) -> WireError {
        journal_error(error, self.is_shutting_down())
    }

    fn queue_groups_of(&self, topic: &str) -> Vec<Rc<GroupRuntime>> {
        // Keys sort by topic first: the topic's groups are one run of the map.
        self.queues
            .groups
            .borrow()
            .range((topic.to_owned(), 0, String::new())..)
            .take_while(|((name, _, _), _)| name == topic)
            .map(|(_, group)| Rc::clone(group))
            .collect()
    }

    fn all_queue_groups(&self) -> Vec<Rc<GroupRuntime>> {
        self.queues.groups.borrow().values().cloned().collect()
    }

    /// Runs one event on a group and does what its actions ask: journal records to the
    /// writer, DLQ work and reconciles to their workers, the timer to the pump, a
    /// snapshot when due.
    fn queue_event(
        self: &Rc<Self>,
        group: &Rc<GroupRuntime>,
        event: impl FnOnce(&mut QueueGroup, u64, &mut Actions),
    ) -> EventOutcome {
        let now = now_ms();
        let mut outcome = EventOutcome::default();
        let mut snapshot = None;
        let metadata_wanted;
        let receivable;
        {
            let mut state = group.state.borrow_mut();
            let mut actions = group.actions.borrow_mut();
            event(&mut state, now, &mut actions);
            let mut lease_starts = group.lease_starts.borrow_mut();
            for entry in &actions.journal {
                group.writer.append(entry.seq, &entry.record);
                if let JournalRecord::Lease {
                    first,
                    count,
                    attempt,
                    ..
                } = entry.record
                {
                    for offset in first..first + u64::from(count) {
                        lease_starts.push_back((now, offset, attempt));
                    }
                }
            }
            let in_flight_max = state.config().in_flight_messages_max as usize;
            if lease_starts.len() > 2 * in_flight_max {
                lease_starts.retain(|(_, offset, attempt)| is_leased(&state, *offset, *attempt));
            }
            drop(lease_starts);
            outcome.deliveries = actions.deliveries.clone();
            outcome.results = actions.results.clone();
            outcome.answer_after_seq = actions.answer_after_seq;
            outcome.delivered_bytes = actions.delivered_bytes;
            group
                .dead_letters
                .borrow_mut()
                .extend(actions.dead_letters.drain(..));
            group
                .reconcile
                .borrow_mut()
                .extend(actions.reconcile.drain(..));
            group.timer_ms.set(actions.timer_ms);
            metadata_wanted = actions.read_metadata.is_some();
            receivable = state.receivable();
            if actions.snapshot_due && !group.snapshot_running.get() {
                let taken = state.snapshot();
                // Records after the snapshot go to a new segment: the older ones can be
                // deleted once the snapshot is durable.
                group.writer.rotate(taken.seq + 1);
                let mut bytes = Vec::new();
                encode_snapshot(&taken, &mut bytes);
                snapshot = Some((taken.seq, bytes));
            }
        }
        if let Some((seq, bytes)) = snapshot {
            group.snapshot_running.set(true);
            let task =
                glommio::spawn_local(write_group_snapshot(Rc::clone(group), seq, bytes)).detach();
            group.keep_task(TASK_SNAPSHOT, task);
        }
        self.start_queue_workers(group);
        let timer = group.timer_ms.get().unwrap_or(u64::MAX);
        if metadata_wanted || timer < self.queues.pump_deadline.get() {
            self.queues.pump_wake.notify_all();
        }
        if receivable {
            // Only the long-polls of this group, and only when there is something for
            // them: not every poll of the shard at every event.
            self.queues.wake(&group.topic, &group.name);
        }
        outcome
    }

    /// Starts the DLQ and reconcile workers a group needs, once the pump runs (at
    /// start-up the DLQ topic may not be loaded yet, nor the other shards serving).
    fn start_queue_workers(self: &Rc<Self>, group: &Rc<GroupRuntime>) {
        if !self.queues.started.get() || group.closed.get() {
            return;
        }
        if !group.dead_letters.borrow().is_empty() && !group.dead_letter_running.get() {
            group.dead_letter_running.set(true);
            let task =
                glommio::spawn_local(Rc::clone(self).run_dead_letters(Rc::clone(group))).detach();
            group.keep_task(TASK_DEAD_LETTERS, task);
        }
        if !group.reconcile.borrow().is_empty() && !group.reconcile_running.get() {
            group.reconcile_running.set(true);
            let task =
                glommio::spawn_local(Rc::clone(self).run_reconcile(Rc::clone(group))).detach();
            group.keep_task(TASK_RECONCILE, task);
        }
    }

    /// Tells a group what changed in its log and runs its due timers; serves one read of
    /// the metadata it asked for. Returns whether it still wants more metadata.
    async fn queue_catch_up(self: &Rc<Self>, group: &Rc<GroupRuntime>) -> bool {
        if group.closed.get() {
            return false;
        }
        let start = group.log.log_start_offset();
        if start > group.known_log_start.get() {
            group.known_log_start.set(start);
            self.queue_event(group, |state, now, actions| {
                state.retention(start, now, actions)
            });
        }
        let end = group.log.high_watermark();
        if end > group.announced_end.get() {
            group.announced_end.set(end);
            // Only the end: the metadata is read below, for what fits the window.
            self.queue_event(group, |state, now, actions| {
                state.appended(end, &[], now, actions)
            });
        }
        if group.timer_ms.get().is_some_and(|timer| timer <= now_ms()) {
            self.queue_event(group, |state, now, actions| state.tick(now, actions));
        }
        if group.metadata_reading.get() {
            return false;
        }
        let Some(range) = group.state.borrow().metadata_request() else {
            return false;
        };
        group.metadata_reading.set(true);
        let read = read_metas(&group.log, range.clone()).await;
        group.metadata_reading.set(false);
        if group.closed.get() {
            return false;
        }
        match read {
            Ok(metas) if !metas.is_empty() => {
                self.queue_event(group, |state, now, actions| {
                    state.appended(range.start, &metas, now, actions)
                });
                group.state.borrow().metadata_request().is_some()
            }
            Ok(_) => false,
            // Retention moved the log start: the next round tells the group.
            Err(StorageError::OffsetOutOfRange { .. }) => true,
            Err(error) => {
                tracing::error!(
                    topic = %group.topic,
                    partition = group.partition,
                    group = %group.name,
                    error = %error,
                    "queue group: reading metadata: {error}"
                );
                false
            }
        }
    }

    /// The shard's queue pump: feeds every group durable offsets, metadata, log-start
    /// moves and timers. Sleeps until data arrives, the earliest timer, or a wake-up;
    /// stops at shutdown.
    pub async fn run_queue_pump(self: Rc<Self>) {
        self.queues.started.set(true);
        for group in self.all_queue_groups() {
            self.start_queue_workers(&group);
        }
        loop {
            if self.is_shutting_down() {
                break;
            }
            let data = self.data_arrived.listen();
            let wake = self.queues.pump_wake.listen();
            let mut more = false;
            for group in self.all_queue_groups() {
                more |= self.queue_catch_up(&group).await;
            }
            if more {
                continue;
            }
            let deadline = self
                .all_queue_groups()
                .iter()
                .filter_map(|group| group.timer_ms.get())
                .min()
                .unwrap_or(u64::MAX);
            self.queues.pump_deadline.set(deadline);
            let now = now_ms();
            if deadline <= now {
                continue;
            }
            let sleep = Duration::from_millis((deadline - now).min(3_600_000));
            let _ = glommio::timer::timeout(sleep, async {
                futures_lite::future::or(
                    async {
                        let _ = data.await;
                    },
                    async {
                        let _ = wake.await;
                    },
                )
                .await;
                Ok(())
            })
            .await;
        }
        self.queues.pump_deadline.set(0);
    }

    /// Start-up: recovers every queue group of an owned partition from its files.
    pub(super) async fn recover_queue_groups(
        self: &Rc<Self>,
        topic: &str,
        partition: u32,
        log: &Rc<PartitionLog>,
        config: &TopicConfig,
    ) -> Result<(), StorageError> {
        let directory = log.directory().to_path_buf();
        let groups = off_reactor(move || files::list_groups(&directory)).await?;
        for (name, path) in groups {
            let reading = path.clone();
            let found = off_reactor(move || files::read_group_files(&reading)).await?;
            let own_settings = match &found.settings {
                None => QueueSettings::default(),
                Some(text) => {
                    settings::from_group_file(text).map_err(|reason| StorageError::Corrupt {
                        path: path.join(files::SETTINGS_FILE),
                        position: 0,
                        reason: format!("queue group {name:?} settings: {reason}"),
                    })?
                }
            };
            let group_config = settings::resolve(
                &self.config,
                &settings::group_settings(&config.queue, &own_settings),
                topic,
                &name,
                partition,
            );
            let bounds = LogBounds {
                start: log.log_start_offset(),
                end: log.high_watermark(),
            };
            let mut actions = Actions::default();
            let journal = found.journal_bytes();
            let (group, report) = QueueGroup::recover(
                group_config,
                found.snapshot.as_deref(),
                &journal,
                bounds,
                now_ms(),
                &mut actions,
            )
            .map_err(|error| StorageError::Corrupt {
                path: path.clone(),
                position: 0,
                reason: format!("recovering queue group {name:?}: {error}"),
            })?;
            drop(journal);
            if let Some(stopped) = &report.journal_stopped {
                tracing::warn!(
                    topic = %topic,
                    partition,
                    group = %name,
                    valid_bytes = report.journal_valid_bytes,
                    "queue group journal ends in a torn or damaged record ({stopped}) after {} valid bytes; cutting it there",
                    report.journal_valid_bytes
                );
            }
            let cutting = path.clone();
            let valid_bytes = report.journal_valid_bytes;
            let kept =
                off_reactor(move || files::cut_journal(&cutting, &found, valid_bytes)).await?;
            // What recovery itself journaled (expired leases, a log-start move) comes after
            // what is on disk.
            let durable_seq = actions
                .journal
                .first()
                .map_or(group.next_seq() - 1, |entry| entry.seq - 1);
            let (segment, length) = kept.unwrap_or((durable_seq + 1, 0));
            let writer = JournalWriter::start(
                path,
                segment,
                length,
                durable_seq,
                self.config.storage_failure_policy,
            );
            let runtime = Rc::new(GroupRuntime::new(
                topic,
                partition,
                &name,
                Rc::clone(log),
                group,
                writer,
                bounds.end,
            ));
            runtime.known_log_start.set(bounds.start);
            *runtime.own_settings.borrow_mut() = own_settings;
            // Leases that survived: their age counts from now (their start is not kept).
            {
                let state = runtime.state.borrow();
                let floor = state.ack_floor();
                let now = now_ms();
                let mut starts = runtime.lease_starts.borrow_mut();
                for offset in floor..floor + state.window_len() as u64 {
                    if let MessageState::Leased { attempt, .. } = state.state_of(offset) {
                        starts.push_back((now, offset, attempt));
                    }
                }
            }
            self.queues
                .groups
                .borrow_mut()
                .insert(runtime.key(), Rc::clone(&runtime));
            self.queue_event(&runtime, |_, _, out| std::mem::swap(out, &mut actions));
        }
        Ok(())
    }

    /// A topic's queue settings changed: its live groups take the new policy at once;
    /// an ordering change applies when the broker next starts (docs/queues.md §8).
    pub(super) fn update_queue_policies(self: &Rc<Self>, topic: &str, config: &TopicConfig) {
        for group in self.queue_groups_of(topic) {
            self.apply_queue_policy(&group, config);
        }
        self.queues.wake_topic(topic);
    }

    /// Gives one live group the policy its topic's settings and its own resolve to. A
    /// group's own retry delays win over the topic's, so a topic change leaves them.
    fn apply_queue_policy(self: &Rc<Self>, group: &Rc<GroupRuntime>, config: &TopicConfig) {
        let topic = &*group.topic;
        let mut policy = settings::resolve(
            &self.config,
            &settings::group_settings(&config.queue, &group.own_settings.borrow()),
            topic,
            &group.name,
            group.partition,
        );
        let ordering = group.state.borrow().config().ordering;
        if policy.ordering != ordering {
            tracing::info!(
                topic = %topic,
                partition = group.partition,
                group = %group.name,
                "queue group: the new ordering applies from the next start"
            );
            policy.ordering = ordering;
        }
        // An event like any other: a lowered deliveries_max may dead-letter
        // messages at once, and those records are journaled.
        self.queue_event(group, |state, now, actions| {
            state.set_policy(policy, now, actions)
        });
    }

    /// Owner side of `AlterGroup`: sets the group's own settings (`changes`, checked by
    /// `settings::check_group_settings`; a `None` keeps a value) on every partition of
    /// `topic` this shard owns, creating the group there if it does not exist yet (as a
    /// first receive does). Each partition's `settings` file is durable before its live
    /// group takes the new policy; the answer comes once every one has.
    pub(super) async fn alter_group_owned(
        self: &Rc<Self>,
        topic: String,
        group: String,
        changes: QueueSettings,
    ) -> Result<(), WireError> {
        settings::check_group_settings(&changes)?;
        let Some(config) = self.topic(&topic) else {
            return Err(WireError::new(
                ErrorCode::UnknownTopic,
                format!("topic {} does not exist", quote_untrusted(&topic)),
            ));
        };
        let partitions: Vec<u32> = (0..config.partitions)
            .filter(|partition| self.owner_of(&topic, *partition) == self.id)
            .collect();
        // Checked before any group is created: a refused change leaves nothing behind.
        let check = |own: &QueueSettings| {
            let own = settings::merge(own, &changes);
            settings::validate(
                &topic,
                &settings::group_settings(&config.queue, &own),
                &self.config,
            )
        };
        check(&QueueSettings::default())?;
        let partitions_owned = partitions.len();
        for &partition in &partitions {
            if let Some(runtime) = self.queue_group(&topic, partition, &group) {
                check(&runtime.own_settings.borrow())?;
            }
        }
        let mut runtimes = Vec::with_capacity(partitions.len());
        for partition in partitions {
            runtimes.push(
                self.queue_group_or_create(&topic, partition, &group, &config)
                    .await?,
            );
        }
        for runtime in runtimes {
            if runtime.closed.get() {
                // The topic was deleted meanwhile.
                continue;
            }
            let Ok(_permit) = runtime.settings_lock.acquire_permit(1).await else {
                unreachable!("a group's settings lock is never closed");
            };
            // Checked again under the lock: another AlterGroup may have changed the
            // group's own settings since the first look.
            check(&runtime.own_settings.borrow())?;
            let own = settings::merge(&runtime.own_settings.borrow(), &changes);
            let text = settings::group_file_text(&own);
            let directory = runtime.writer.directory().to_path_buf();
            off_reactor(move || files::write_group_settings(&directory, &text))
                .await
                .map_err(|error| self.journal_error(&error))?;
            *runtime.own_settings.borrow_mut() = own;
            // The topic's settings as they are now: an AlterTopic may have run meanwhile.
            let Some(config) = self.topic(&topic) else {
                continue;
            };
            self.apply_queue_policy(&runtime, &config);
        }
        self.queues.wake(&topic, &group);
        // One line per shard that owns partitions of the topic (each applies the change
        // to its own).
        if partitions_owned > 0 {
            tracing::info!(
                shard = self.id,
                topic = %topic,
                group = %group,
                partitions = partitions_owned,
                changes = ?changes,
                "queue group {group:?} of {topic} altered"
            );
        }
        Ok(())
    }

    /// Closes a group's journal (what is appended is written) and stops its workers:
    /// once this returns, nothing of the group touches its directory any more (topic
    /// deletion removes it next).
    async fn close_queue_group(&self, group: &Rc<GroupRuntime>) {
        group.closed.set(true);
        group.closing.notify_all();
        group.writer.close().await;
        let tasks: Vec<JoinHandle<()>> = group
            .tasks
            .borrow_mut()
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        for task in tasks {
            // Awaited, not cancelled: a DLQ append in progress runs to its end (an
            // append is not cancellable); retry delays end at `closing`, and each task
            // stops at its next look at `closed`. Dead letters left pending stay
            // journaled and are reconciled at the next start (or go with the topic).
            let _ = task.await;
        }
    }

    /// Topic deletion: closes and forgets the topic's groups (their files go with the
    /// partition directories).
    pub(super) async fn remove_queue_groups(&self, topic: &str) {
        let groups = self.queue_groups_of(topic);
        for group in &groups {
            self.queues.groups.borrow_mut().remove(&group.key());
        }
        for group in groups {
            self.close_queue_group(&group).await;
        }
        self.queues.wake_topic(topic);
    }

    /// Shutdown: closes every group's journal and stops the pump.
    pub(super) async fn close_queue_groups(&self) {
        for group in self.all_queue_groups() {
            self.close_queue_group(&group).await;
        }
        self.queues.pump_wake.notify_all();
        self.queues.wake_all();
    }

    /// The log start of a partition moved (retention, purge): its groups hear of it.
    pub fn queue_log_start_moved(&self) {
        self.queues.pump_wake.notify_all();
    }

    fn queue_group(&self, topic: &str, partition: u32, name: &str) -> Option<Rc<GroupRuntime>> {
        self.queues
            .groups
            .borrow()
            .get(&(topic.to_owned(), partition, name.to_owned()))
            .cloned()
    }

    /// The group, created (durably) if it does not exist yet.
    async fn queue_group_or_create(
        self: &Rc<Self>,
        topic: &str,
        partition: u32,
        name: &str,
        config: &TopicConfig,
    ) -> Result<Rc<GroupRuntime>, WireError> {
        let key: GroupKey = (topic.to_owned(), partition, name.to_owned());
        loop {
            if let Some(group) = self.queue_group(topic, partition, name) {
                return Ok(group);
            }
            if !self.queues.creating.borrow().contains(&key) {
                break;
            }
            let created = self.queues.created.listen();
            if self.queues.creating.borrow().contains(&key) {
                let _ = created.await;
            }
        }
        let held = self.queues.groups.borrow().len() + self.queues.creating.borrow().len();
        if held >= self.config.queue_groups_per_shard_max as usize {
            return Err(WireError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "shard {} holds {held} queue groups (partitions x groups), the most queue_groups_per_shard_max ({}) allows",
                    self.id, self.config.queue_groups_per_shard_max
                ),
            ));
        }
        let log = self.log(topic, partition)?;
        self.queues.creating.borrow_mut().insert(key.clone());
        let created = self
            .create_queue_group(topic, partition, name, config, log)
            .await;
        self.queues.creating.borrow_mut().remove(&key);
        self.queues.created.notify_all();
        created
    }

    async fn create_queue_group(
        self: &Rc<Self>,
        topic: &str,
        partition: u32,
        name: &str,
        config: &TopicConfig,
        log: Rc<PartitionLog>,
    ) -> Result<Rc<GroupRuntime>, WireError> {
        let directory: PathBuf = log.directory().join(files::GROUPS_DIRECTORY).join(name);
        let creating = directory.clone();
        off_reactor(move || files::create_group_directory(&creating))
            .await
            .map_err(|error| self.journal_error(&error))?;
        if self.topic(topic).is_none() || self.is_shutting_down() {
            return Err(WireError::new(
                ErrorCode::UnknownTopic,
                format!("topic {} was deleted", quote_untrusted(topic)),
            ));
        }
        let group_config = settings::resolve(&self.config, &config.queue, topic, name, partition);
        let mut actions = Actions::default();
        // Every group sees every message still stored: its floor is the log start.
        let group = QueueGroup::create(group_config, log.log_start_offset(), &mut actions);
        let writer = JournalWriter::start(directory, 1, 0, 0, self.config.storage_failure_policy);
        let start = group.ack_floor();
        let runtime = Rc::new(GroupRuntime::new(
            topic, partition, name, log, group, writer, start,
        ));
        self.queues
            .groups
            .borrow_mut()
            .insert(runtime.key(), Rc::clone(&runtime));
        let outcome = self.queue_event(&runtime, |_, _, out| std::mem::swap(out, &mut actions));
        let created = runtime
            .writer
            .wait_durable(outcome.answer_after_seq.expect("Created is journaled"))
            .await;
        if let Err(error) = created {
            self.queues.groups.borrow_mut().remove(&runtime.key());
            self.close_queue_group(&runtime).await;
            return Err(self.journal_error(&error));
        }
        // Once per group and partition (a group comes to a partition with its first
        // receive or settings change there), never per request.
        tracing::info!(
            shard = self.id,
            topic = %topic,
            partition,
            group = %name,
            start_offset = start,
            "queue group {name:?} created on partition {partition} of {topic}"
        );
        Ok(runtime)
    }

    /// Owner side of a receive: leases up to `messages_max` messages of the group, and
    /// at most `bytes_max` bytes of them (but the first whatever its size when
    /// `oversized_first`), from the partitions of `topic` this shard owns, then reads
    /// them.
    pub(super) async fn queue_receive_owned(
        self: &Rc<Self>,
        topic: String,
        group: String,
        (messages_max, bytes_max, oversized_first): (u32, u64, bool),
        visibility_timeout_ms: Option<u64>,
        holder: u64,
    ) -> Result<Vec<ReceivedMessage>, WireError> {
        let Some(config) = self.topic(&topic) else {
            return Err(WireError::new(
                ErrorCode::UnknownTopic,
                format!("topic {} does not exist", quote_untrusted(&topic)),
            ));
        };
        let mut partitions: Vec<u32> = (0..config.partitions)
            .filter(|partition| self.owner_of(&topic, *partition) == self.id)
            .collect();
        if !partitions.is_empty() {
            let rotation = self.queues.receive_rotation.get();
            self.queues.receive_rotation.set(rotation.wrapping_add(1));
            let start = (rotation % partitions.len() as u64) as usize;
            partitions.rotate_left(start);
        }
        // Every group is looked up (or created) before anything is leased: a failure here
        // (LimitExceeded, a journal error) leaves no lease behind for a client that only
        // hears the error.
        let mut runtimes = Vec::with_capacity(partitions.len());
        for partition in partitions {
            runtimes.push(
                self.queue_group_or_create(&topic, partition, &group, &config)
                    .await?,
            );
        }
        let mut remaining = messages_max;
        let mut bytes_left = bytes_max;
        let mut leased = Vec::new();
        for runtime in runtimes {
            if remaining == 0 || bytes_left == 0 {
                break;
            }
            if runtime.closed.get() {
                // The topic was deleted meanwhile.
                continue;
            }
            self.queue_catch_up(&runtime).await;
            let outcome = self.queue_event(&runtime, |state, now, actions| {
                state.receive(
                    GroupReceive {
                        holder: HolderId(holder),
                        messages_max: remaining,
                        visibility_timeout_ms,
                        bytes_max: bytes_left,
                        // Once something was leased, the budget is a hard limit: a later
                        // partition's first message must fit too.
                        oversized_first: oversized_first && remaining == messages_max,
                    },
                    now,
                    actions,
                )
            });
            remaining -= outcome.deliveries.len() as u32;
            bytes_left = bytes_left.saturating_sub(outcome.delivered_bytes);
            leased.push((runtime, outcome));
        }
        let mut messages = Vec::new();
        let mut failure = None;
        for (runtime, outcome) in leased {
            if outcome.deliveries.is_empty() {
                continue;
            }
            if let Some(seq) = outcome.answer_after_seq {
                if let Err(error) = runtime.writer.wait_durable(seq).await {
                    // Not handed out: the leases run out and the messages come back.
                    failure.get_or_insert(self.journal_error(&error));
                    continue;
                }
            }
            // Deliveries come in offset order (the state machine's contract).
            let offsets: Vec<u64> = outcome
                .deliveries
                .iter()
                .map(|delivery| delivery.offset)
                .collect();
            match read_records(&runtime.log, &offsets).await {
                Ok(stored) => {
                    let counters =
                        self.metrics
                            .queue(&runtime.topic, runtime.partition, &runtime.name);
                    for item in stored {
                        let offset = item.record.offset;
                        let Ok(index) = offsets.binary_search(&offset) else {
                            continue;
                        };
                        let delivery = outcome.deliveries[index];
                        counters.delivered.increment(1);
                        if delivery.attempt > 1 {
                            counters.redelivered.increment(1);
                        }
                        messages.push(ReceivedMessage {
                            handle: Handle {
                                partition: delivery.partition,
                                offset,
                                attempt: delivery.attempt,
                            },
                            timestamp_ms: item.record.timestamp_ms,
                            key: item.record.key,
                            value: item.record.value,
                            headers: item.record.headers,
                        });
                    }
                }
                Err(error) => {
                    // Leased but unreadable (retention took it meanwhile): the lease
                    // runs out; the group hears of the log start on its next round.
                    tracing::warn!(
                        topic = %topic,
                        partition = runtime.partition,
                        group = %runtime.name,
                        offset = offsets[0],
                        error = %error,
                        "queue group: reading {} leased offsets from {} for a receive: {error}",
                        offsets.len(),
                        offsets[0]
                    );
                }
            }
        }
        match failure {
            Some(error) if messages.is_empty() => Err(error),
            _ => Ok(messages),
        }
    }

    /// Owner side of a long-poll: resolves once a group of `topic` named `group` on this
    /// shard has a message to hand out, the deadline passes, or the shard stops.
    pub(super) async fn queue_wait_owned(
        self: &Rc<Self>,
        topic: String,
        group: String,
        wait: Duration,
    ) {
        let deadline = std::time::Instant::now() + wait;
        let (ready, _waiting) = self.queues.wait_for(&topic, &group);
        loop {
            let listener = ready.listen();
            let groups: Vec<Rc<GroupRuntime>> = self
                .queue_groups_of(&topic)
                .into_iter()
                .filter(|runtime| runtime.name == group)
                .collect();
            let mut receivable = self.is_shutting_down() || self.topic(&topic).is_none();
            for runtime in &groups {
                if runtime.state.borrow().receivable() {
                    receivable = true;
                }
            }
            let now = std::time::Instant::now();
            if receivable || now >= deadline {
                return;
            }
            let _ = glommio::timer::timeout(deadline - now, async {
                let _ = listener.await;
                Ok(())
            })
            .await;
        }
    }

    /// Owner side of ack / nack / extend: applies `action` to the handles (all of
    /// partitions this shard owns) and returns those refused.
    pub(super) async fn queue_settle_owned(
        self: &Rc<Self>,
        topic: String,
        group: String,
        action: SettleAction,
        handles: Vec<Handle>,
    ) -> Vec<RefusedHandle> {
        let mut by_partition: BTreeMap<u32, Vec<DeliveryHandle>> = BTreeMap::new();
        for handle in &handles {
            by_partition
                .entry(handle.partition)
                .or_default()
                .push(DeliveryHandle {
                    partition: handle.partition,
                    offset: handle.offset,
                    attempt: handle.attempt,
                });
        }
        let mut refused = Vec::new();
        let mut waits = Vec::new();
        let refuse_all =
            |refused: &mut Vec<RefusedHandle>, handles: &[DeliveryHandle], error: &WireError| {
                for handle in handles {
                    refused.push(RefusedHandle {
                        handle: Handle {
                            partition: handle.partition,
                            offset: handle.offset,
                            attempt: handle.attempt,
                        },
                        error: error.clone(),
                    });
                }
            };
        for (partition, partition_handles) in by_partition {
            if let Err(error) = self.log(&topic, partition) {
                refuse_all(&mut refused, &partition_handles, &error);
                continue;
            }
            let Some(runtime) = self.queue_group(&topic, partition, &group) else {
                for handle in &partition_handles {
                    refused.push(RefusedHandle {
                        handle: Handle {
                            partition,
                            offset: handle.offset,
                            attempt: handle.attempt,
                        },
                        error: WireError::new(
                            ErrorCode::NotDelivered,
                            format!(
                                "queue group {} has never received from {} partition {partition}",
                                quote_untrusted(&group),
                                quote_untrusted(&topic)
                            ),
                        ),
                    });
                }
                continue;
            };
            let outcome = self.queue_event(&runtime, |state, now, actions| match &action {
                SettleAction::Ack => state.ack(&partition_handles, now, actions),
                SettleAction::Nack { delay, reason } => {
                    let delay = match delay {
                        WireNackDelay::Backoff => NackDelay::Backoff,
                        WireNackDelay::Ms(ms) => NackDelay::Ms(*ms),
                    };
                    state.nack(&partition_handles, delay, reason.as_bytes(), now, actions)
                }
                SettleAction::Extend {
                    visibility_timeout_ms,
                } => state.extend(
                    &partition_handles,
                    u64::from(*visibility_timeout_ms),
                    now,
                    actions,
                ),
            });
            waits.push((runtime, partition_handles, outcome));
        }
        for (runtime, partition_handles, outcome) in waits {
            if let Some(seq) = outcome.answer_after_seq {
                if let Err(error) = runtime.writer.wait_durable(seq).await {
                    refuse_all(
                        &mut refused,
                        &partition_handles,
                        &self.journal_error(&error),
                    );
                    continue;
                }
            }
            let settled = outcome
                .results
                .iter()
                .filter(|result| result.is_ok())
                .count();
            if matches!(action, SettleAction::Nack { .. }) && settled > 0 {
                self.metrics
                    .queue(&runtime.topic, runtime.partition, &runtime.name)
                    .nacked
                    .increment(settled as u64);
            }
            for (handle, result) in partition_handles.iter().zip(outcome.results) {
                if let Err(error) = result {
                    refused.push(RefusedHandle {
                        handle: Handle {
                            partition: handle.partition,
                            offset: handle.offset,
                            attempt: handle.attempt,
                        },
                        error: handle_error(error),
                    });
                }
            }
        }
        refused
    }

    /// Owner side of a describe: every queue group of `topic` (or the one named) on the
    /// partitions this shard owns, and the stream groups' committed positions.
    pub(super) fn describe_groups_owned(
        &self,
        topic: &str,
        group: &str,
    ) -> Result<Vec<DescribedPartition>, WireError> {
        let Some(config) = self.topic(topic) else {
            return Err(WireError::new(
                ErrorCode::UnknownTopic,
                format!("topic {} does not exist", quote_untrusted(topic)),
            ));
        };
        let now = now_ms();
        let mut out = Vec::new();
        for runtime in self.queue_groups_of(topic) {
            if group.is_empty() || runtime.name == group {
                out.push((
                    runtime.name.clone(),
                    GroupKind::Queue,
                    runtime.describe(now),
                ));
            }
        }
        for partition in 0..config.partitions {
            if self.owner_of(topic, partition) != self.id {
                continue;
            }
            let Ok(log) = self.log(topic, partition) else {
                continue;
            };
            for (name, position) in self.stream_group_positions(topic, partition) {
                if group.is_empty() || name == group {
                    out.push((
                        name,
                        GroupKind::Stream,
                        GroupPartition {
                            partition,
                            position,
                            log_start_offset: log.log_start_offset(),
                            high_watermark: log.high_watermark(),
                            ..GroupPartition::default()
                        },
                    ));
                }
            }
        }
        Ok(out)
    }

    /// Whether `topic` is a dead-letter queue the broker created: it has no DLQ of its
    /// own, and dead-lettering from it settles the message (it stays in its log).
    fn is_dead_letter_queue(&self, topic: &str) -> bool {
        self.topic(topic)
            .is_some_and(|config| config.dead_letter_source.is_some())
    }

    /// Create / alter: the topic's DLQ name must be a valid topic name, and a DLQ that
    /// exists already must be placed like the topic (same placement name and partition
    /// count), so that partition p's dead letters stay on p's shard. A DLQ the broker
    /// creates always is; one a user created under that name usually is not.
    pub(super) fn validate_dead_letter_target(
        &self,
        name: &str,
        topic: &TopicConfig,
    ) -> Result<(), WireError> {
        if topic.dead_letter_source.is_some() {
            return Ok(());
        }
        settings::validate_dead_letter_name(name, &topic.queue)?;
        let dlq = settings::dlq_topic_of(name, &topic.queue);
        match self.topic(&dlq) {
            Some(existing) => check_dead_letter_placement(name, topic, &dlq, &existing),
            None => Ok(()),
        }
    }

    /// The DLQ topic of `source` and the partition that takes `partition`'s dead letters;
    /// the topic is created (placed like its source) when it does not exist.
    async fn dead_letter_target(
        self: &Rc<Self>,
        source: &str,
        partition: u32,
        create: bool,
    ) -> Result<Option<(String, u32)>, WireError> {
        let Some(config) = self.topic(source) else {
            return Err(WireError::new(
                ErrorCode::UnknownTopic,
                format!("topic {} was deleted", quote_untrusted(source)),
            ));
        };
        let dlq = settings::dlq_topic_of(source, &config.queue);
        if self.topic(&dlq).is_none() {
            if !create {
                return Ok(None);
            }
            let dlq_config = TopicConfig {
                partitions: config.partitions,
                retention: Retention::default(),
                queue: Default::default(),
                placement: Some(
                    config
                        .placement
                        .clone()
                        .unwrap_or_else(|| source.to_owned()),
                ),
                dead_letter_source: Some(source.to_owned()),
            };
            let reply = self
                .route(
                    0,
                    ShardRequest::CreateTopic {
                        name: dlq.clone(),
                        topic: dlq_config,
                    },
                )
                .await;
            match reply {
                ShardReply::Done(Ok(())) => {}
                ShardReply::Done(Err(error)) if error.code == ErrorCode::TopicAlreadyExists => {}
                ShardReply::Done(Err(error)) => return Err(error),
                other => {
                    return Err(WireError::new(
                        ErrorCode::Internal,
                        format!("unexpected reply {other:?} creating the DLQ"),
                    ))
                }
            }
        }
        let Some(dlq_config) = self.topic(&dlq) else {
            return Err(WireError::new(
                ErrorCode::UnknownTopic,
                format!("dead-letter topic {dlq:?} is not installed here yet"),
            ));
        };
        // Created by someone else since the source's create / alter checked it: a copy
        // never crosses shards, so such a DLQ is refused (and the worker keeps retrying,
        // logged, until an operator fixes the topics).
        check_dead_letter_placement(source, &config, &dlq, &dlq_config)?;
        Ok(Some((dlq, partition)))
    }

    /// A group's DLQ worker: appends its dead letters, in batches, each only once the
    /// journal is durable through its `after_seq`, and settles them once the DLQ append
    /// is durable. Failures are retried with a growing delay (up to 30 s) and logged once
    /// per cause; the group's describe counts them in `dead_lettering` meanwhile. After a
    /// failure the DLQ is searched first, so a batch whose append did happen is not
    /// appended twice; after a "maybe appended" (Timeout) the search waits until what
    /// was appended then is durable.
    async fn run_dead_letters(self: Rc<Self>, group: Rc<GroupRuntime>) {
        let mut delay_ms = DEAD_LETTER_RETRY_MS_MIN;
        let mut search_first = false;
        loop {
            if group.closed.get() || self.is_shutting_down() {
                break;
            }
            let maybe = group.dead_letter_maybe.borrow().clone();
            if let Some((dlq, dlq_partition, end)) = maybe {
                let waited = futures_lite::future::or(
                    async {
                        Some(
                            self.dead_letter_end(
                                &dlq,
                                dlq_partition,
                                Some(end),
                                Duration::from_millis(DEAD_LETTER_DURABLE_WAIT_MS),
                            )
                            .await,
                        )
                    },
                    async {
                        // A read: given up on when the group closes.
                        group.pause(DEAD_LETTER_DURABLE_WAIT_MS * 2).await;
                        None
                    },
                )
                .await;
                let Some(waited) = waited else {
                    continue;
                };
                match waited {
                    Ok((_, true)) => {
                        group.dead_letter_maybe.borrow_mut().take();
                        search_first = true;
                    }
                    outcome => {
                        let why = match outcome {
                            Err(error) => error.to_string(),
                            Ok(_) => format!("not durable through offset {end} yet"),
                        };
                        group.log_dead_letter_failure("maybe-appended".into(), || {
                            format!(
                                "a DLQ append to {dlq} partition {dlq_partition} may have happened; waiting for it to become durable before searching for it: {why}"
                            )
                        });
                        group.pause(delay_ms).await;
                        delay_ms = (delay_ms * 2).min(DEAD_LETTER_RETRY_MS_MAX);
                        continue;
                    }
                }
            }
            let batch: Vec<DeadLetterRequest> = {
                let mut queue = group.dead_letters.borrow_mut();
                let count = queue.len().min(DEAD_LETTERS_PER_BATCH_MAX);
                queue.drain(..count).collect()
            };
            if batch.is_empty() {
                break;
            }
            let (settled, retry) = match self.dead_letter_batch(&group, &batch, search_first).await
            {
                Ok(outcome) => (outcome.settled, outcome.unreadable),
                Err(failure) => {
                    if let Some(maybe) = failure.maybe_appended {
                        *group.dead_letter_maybe.borrow_mut() = Some(maybe);
                    }
                    let error = failure.error;
                    let count = batch.len();
                    group.log_dead_letter_failure(format!("{:?}", error.code), || {
                        format!("dead-lettering {count} messages failed: {error}")
                    });
                    {
                        let mut queue = group.dead_letters.borrow_mut();
                        for request in batch.into_iter().rev() {
                            queue.push_front(request);
                        }
                    }
                    group.pause(delay_ms).await;
                    delay_ms = (delay_ms * 2).min(DEAD_LETTER_RETRY_MS_MAX);
                    search_first = true;
                    continue;
                }
            };
            for offset in settled {
                self.queue_event(&group, |state, now, actions| {
                    state.dead_lettered(offset, now, actions)
                });
            }
            if retry.is_empty() {
                delay_ms = DEAD_LETTER_RETRY_MS_MIN;
                search_first = false;
                group.dead_letter_logged.borrow_mut().clear();
                continue;
            }
            // Source records that could not be read: the others went; these wait.
            let count = retry.len();
            let first_error = retry[0].1.clone();
            group.log_dead_letter_failure(format!("unreadable {:?}", first_error.code), || {
                format!(
                    "reading {count} source records to dead-letter failed (first: offset {}): {first_error}",
                    retry[0].0
                )
            });
            {
                let mut queue = group.dead_letters.borrow_mut();
                for request in batch
                    .into_iter()
                    .rev()
                    .filter(|request| retry.iter().any(|(offset, _)| *offset == request.offset))
                {
                    queue.push_front(request);
                }
            }
            group.pause(delay_ms).await;
            delay_ms = (delay_ms * 2).min(DEAD_LETTER_RETRY_MS_MAX);
        }
        group.dead_letter_running.set(false);
        // Requests queued after the last take (a race with the loop's end) get a worker.
        if !group.closed.get() && !group.dead_letters.borrow().is_empty() {
            self.start_queue_workers(&group);
        }
    }

    /// The DLQ partition's next offset and, with `durable_through`, whether every offset
    /// below it became durable within `wait` (asked of its owner).
    async fn dead_letter_end(
        self: &Rc<Self>,
        dlq: &str,
        dlq_partition: u32,
        durable_through: Option<u64>,
        wait: Duration,
    ) -> Result<(u64, bool), WireError> {
        let owner = self.owner_of(dlq, dlq_partition);
        let reply = self
            .route(
                owner,
                ShardRequest::DeadLetterEnd {
                    dlq: dlq.to_owned(),
                    partition: dlq_partition,
                    durable_through,
                    wait,
                },
            )
            .await;
        match reply {
            ShardReply::DeadLetterEnd(outcome) => outcome,
            ShardReply::Done(Err(error)) => Err(error),
            other => Err(WireError::new(
                ErrorCode::Internal,
                format!("unexpected reply {other:?} to a DLQ end"),
            )),
        }
    }

    /// Owner side of `dead_letter_end`.
    pub(super) async fn dead_letter_end_owned(
        &self,
        dlq: &str,
        partition: u32,
        durable_through: Option<u64>,
        wait: Duration,
    ) -> Result<(u64, bool), WireError> {
        let log = self.log(dlq, partition)?;
        let Some(end) = durable_through else {
            return Ok((log.next_offset(), true));
        };
        if end > 0 && log.high_watermark() < end {
            log.wait_for_data(end - 1, wait).await;
        }
        Ok((log.next_offset(), log.high_watermark() >= end))
    }

    /// Appends one batch of dead letters; returns the offsets to settle and those whose
    /// source record could not be read (to retry).
    async fn dead_letter_batch(
        self: &Rc<Self>,
        group: &Rc<GroupRuntime>,
        batch: &[DeadLetterRequest],
        search_first: bool,
    ) -> Result<BatchOutcome, BatchFailure> {
        if let Some(after) = batch.iter().filter_map(|request| request.after_seq).max() {
            group
                .writer
                .wait_durable(after)
                .await
                .map_err(|error| BatchFailure::from(self.journal_error(&error)))?;
        }
        let mut offsets: Vec<u64> = batch.iter().map(|request| request.offset).collect();
        if self.is_dead_letter_queue(&group.topic) {
            // A DLQ has no DLQ: the message stays in this topic's log; settle it.
            return Ok(BatchOutcome {
                settled: offsets,
                unreadable: Vec::new(),
            });
        }
        let (dlq, dlq_partition) = self
            .dead_letter_target(&group.topic, group.partition, true)
            .await?
            .expect("created when missing");
        let mut outcome = BatchOutcome {
            settled: Vec::new(),
            unreadable: Vec::new(),
        };
        if search_first {
            let from_ms = batch
                .iter()
                .map(|request| request.decided_at_ms)
                .min()
                .unwrap_or(0);
            let found = self
                .find_dead_letters(&dlq, dlq_partition, group, &offsets, from_ms)
                .await?;
            offsets.retain(|offset| !found.contains(offset));
            outcome.settled.extend(found);
        }
        let now = crate::storage::now_ms();
        let mut builder = BatchBuilder::new(BytesMut::new());
        let batch_bytes_max = self.config.batch_bytes_max();
        let mut items = Vec::new();
        let mut in_batch = Vec::new();
        for request in batch
            .iter()
            .filter(|request| offsets.contains(&request.offset))
        {
            let stored = match read_records(&group.log, &[request.offset]).await {
                Ok(mut stored) if !stored.is_empty() => stored.remove(0),
                Ok(_) | Err(StorageError::OffsetOutOfRange { .. }) => {
                    // Retention took it before its DLQ append (docs/queues.md §9): the
                    // group learns of the log start and counts it lost.
                    self.queues.pump_wake.notify_all();
                    continue;
                }
                Err(error) => {
                    // Damaged or unreadable: the others go ahead; this one is retried.
                    outcome
                        .unreadable
                        .push((request.offset, self.wire_error(&error)));
                    continue;
                }
            };
            let record = stored.record;
            let mut copy_headers =
                records::dead_letter_headers(&record, &group.topic, group.partition, request);
            let mut key = record.key.as_deref();
            // A source record at the size limit no longer fits once the broker's headers
            // are added: its value is cut (`shardq-truncated` says so). Should the key
            // and headers alone not fit, the source's own headers go, then the key.
            let mut value =
                records::fit_value(key, &record.value, &mut copy_headers, batch_bytes_max);
            if value.is_none() {
                copy_headers.retain(|(name, _)| name.starts_with(headers::BROKER_PREFIX));
                value = records::fit_value(key, &record.value, &mut copy_headers, batch_bytes_max);
            }
            if value.is_none() {
                key = None;
                value = records::fit_value(key, &record.value, &mut copy_headers, batch_bytes_max);
            }
            let Some(value) = value else {
                outcome.unreadable.push((
                    request.offset,
                    WireError::new(
                        ErrorCode::InvalidBatch,
                        format!(
                            "the DLQ copy of offset {} does not fit a batch of {batch_bytes_max} bytes even without its value, key and headers",
                            request.offset
                        ),
                    ),
                ));
                continue;
            };
            let header_views: Vec<(&str, &[u8])> = copy_headers
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_slice()))
                .collect();
            let size = BatchBuilder::record_size(key, value, &header_views);
            if builder.record_count() > 0 && builder.size_bytes() + size > batch_bytes_max {
                let full = std::mem::replace(&mut builder, BatchBuilder::new(BytesMut::new()));
                items.push(ProduceItem {
                    topic: Arc::from(dlq.as_str()),
                    partition: dlq_partition,
                    batch: full.finish(),
                });
            }
            builder.push(now, key, value, &header_views);
            in_batch.push(request.offset);
        }
        if builder.record_count() > 0 {
            items.push(ProduceItem {
                topic: Arc::from(dlq.as_str()),
                partition: dlq_partition,
                batch: builder.finish(),
            });
        }
        if !items.is_empty() {
            let owner = self.owner_of(&dlq, dlq_partition);
            let reply = self
                .route(
                    owner,
                    ShardRequest::Produce {
                        acks: Acks::Durable,
                        timeout: Duration::from_secs(30),
                        items,
                    },
                )
                .await;
            let failed = match reply {
                ShardReply::Produce(results) => results.into_iter().find_map(Result::err),
                ShardReply::Done(Err(error)) => Some(error),
                other => Some(WireError::new(
                    ErrorCode::Internal,
                    format!("unexpected reply {other:?} to a DLQ append"),
                )),
            };
            if let Some(error) = failed {
                // Timeout: appended, and may still become durable (protocol.md §6). The
                // retry must not append again before that is settled: it waits for the
                // DLQ to be durable through what it held then, and searches it.
                let maybe_appended = if error.code == ErrorCode::Timeout {
                    let (end, _) = self
                        .dead_letter_end(&dlq, dlq_partition, None, Duration::ZERO)
                        .await?;
                    Some((dlq.clone(), dlq_partition, end))
                } else {
                    None
                };
                return Err(BatchFailure {
                    error,
                    maybe_appended,
                });
            }
        }
        outcome.settled.extend(in_batch);
        Ok(outcome)
    }

    /// Searches the DLQ partition for copies of `offsets` of the group's partition,
    /// appended at or after `from_ms` less the margin.
    async fn find_dead_letters(
        self: &Rc<Self>,
        dlq: &str,
        dlq_partition: u32,
        group: &GroupRuntime,
        offsets: &[u64],
        from_ms: u64,
    ) -> Result<Vec<u64>, WireError> {
        let owner = self.owner_of(dlq, dlq_partition);
        let reply = self
            .route(
                owner,
                ShardRequest::FindDeadLetters {
                    dlq: dlq.to_owned(),
                    partition: dlq_partition,
                    source_topic: group.topic.to_string(),
                    source_partition: group.partition,
                    offsets: offsets.to_vec(),
                    from_ms: from_ms.saturating_sub(DEAD_LETTER_SEARCH_MARGIN_MS),
                },
            )
            .await;
        match reply {
            ShardReply::FoundDeadLetters(found) => found,
            ShardReply::Done(Err(error)) => Err(error),
            other => Err(WireError::new(
                ErrorCode::Internal,
                format!("unexpected reply {other:?} to a DLQ search"),
            )),
        }
    }

    /// Owner side of a DLQ search: the source offsets among `offsets` that some record of
    /// the DLQ partition from time `from_ms` on copies.
    pub(super) async fn find_dead_letters_owned(
        &self,
        dlq: String,
        partition: u32,
        source_topic: String,
        source_partition: u32,
        offsets: Vec<u64>,
        from_ms: u64,
    ) -> Result<Vec<u64>, WireError> {
        let log = self.log(&dlq, partition)?;
        let wanted: BTreeSet<u64> = offsets.into_iter().collect();
        let mut found = Vec::new();
        let start = log
            .offset_for_timestamp(i64::try_from(from_ms).unwrap_or(i64::MAX))
            .await
            .map_err(|error| self.wire_error(&error))?;
        let end = log.high_watermark();
        let mut next = start.max(log.log_start_offset());
        while next < end && found.len() < wanted.len() {
            let bytes = match log.read(next, READ_BYTES).await {
                Ok(bytes) => bytes,
                Err(StorageError::OffsetOutOfRange {
                    log_start_offset, ..
                }) if log_start_offset > next => {
                    next = log_start_offset;
                    continue;
                }
                Err(error) => return Err(self.wire_error(&error)),
            };
            if bytes.is_empty() {
                break;
            }
            let mut stored = Vec::new();
            records::stored_records(&bytes, next, end, &mut stored).map_err(|error| {
                WireError::new(
                    ErrorCode::StorageError,
                    format!("searching the DLQ: {error}"),
                )
            })?;
            let Some(last) = stored.last() else {
                break;
            };
            next = last.record.offset + 1;
            for item in &stored {
                if let Some(offset) =
                    records::dead_letter_source(&item.record, &source_topic, source_partition)
                {
                    if wanted.contains(&offset) && !found.contains(&offset) {
                        found.push(offset);
                    }
                }
            }
        }
        Ok(found)
    }

    /// After a restart: searches the DLQ for each message that was dead-lettering, and
    /// settles it (found) or appends it again (not found). Retries on failure.
    async fn run_reconcile(self: Rc<Self>, group: Rc<GroupRuntime>) {
        let mut delay_ms = DEAD_LETTER_RETRY_MS_MIN;
        loop {
            if group.closed.get() || self.is_shutting_down() {
                break;
            }
            let requests: Vec<ReconcileRequest> = group.reconcile.borrow_mut().drain(..).collect();
            if requests.is_empty() {
                break;
            }
            let outcome = async {
                if self.is_dead_letter_queue(&group.topic) {
                    return Ok(Vec::new());
                }
                let Some((dlq, dlq_partition)) = self
                    .dead_letter_target(&group.topic, group.partition, false)
                    .await?
                else {
                    return Ok(Vec::new());
                };
                let offsets: Vec<u64> = requests.iter().map(|request| request.offset).collect();
                let from_ms = requests
                    .iter()
                    .map(|request| request.decided_at_ms)
                    .min()
                    .unwrap_or(0);
                self.find_dead_letters(&dlq, dlq_partition, &group, &offsets, from_ms)
                    .await
            }
            .await;
            match outcome {
                Ok(found) => {
                    for request in requests {
                        let lookup = if found.contains(&request.offset) {
                            DeadLetterLookup::Found
                        } else {
                            DeadLetterLookup::NotFound
                        };
                        self.queue_event(&group, |state, now, actions| {
                            state.dead_letter_reconciled(request.offset, lookup, now, actions)
                        });
                    }
                }
                Err(error) => {
                    let failed = error;
                    group.log_dead_letter_failure(format!("search {:?}", failed.code), || {
                        format!("searching the DLQ failed: {failed}")
                    });
                    group.reconcile.borrow_mut().extend(requests);
                    group.pause(delay_ms).await;
                    delay_ms = (delay_ms * 2).min(DEAD_LETTER_RETRY_MS_MAX);
                }
            }
        }
        group.reconcile_running.set(false);
    }
}

/// Writes a group's snapshot once the journal is durable through its seq, then deletes
/// the journal segments it covers.
async fn write_group_snapshot(group: Rc<GroupRuntime>, seq: u64, bytes: Vec<u8>) {
    let directory = group.writer.directory().to_path_buf();
    let outcome = async {
        group.writer.wait_durable(seq).await?;
        files::write_snapshot(&directory, bytes).await?;
        files::remove_journals_before(&directory, seq + 1).await
    }
    .await;
    if let Err(error) = outcome {
        if !group.closed.get() {
            tracing::warn!(
                topic = %group.topic,
                partition = group.partition,
                group = %group.name,
                seq,
                error = %error,
                "queue group: writing the snapshot at seq {seq}: {error}"
            );
        }
    }
    group.snapshot_running.set(false);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A journal closed under a request: the broker stopping says ShuttingDown; a topic
    /// deleted meanwhile says UnknownTopic, as the shard's other paths do.
    #[test]
    fn a_closed_journal_is_unknown_topic_unless_the_broker_stops() {
        assert_eq!(
            journal_error(&StorageError::Closed, false).code,
            ErrorCode::UnknownTopic
        );
        assert_eq!(
            journal_error(&StorageError::Closed, true).code,
            ErrorCode::ShuttingDown
        );
        let error = journal_error(
            &StorageError::NoSpace {
                operation: "appending",
                path: PathBuf::from("/x"),
                detail: "full".into(),
            },
            false,
        );
        assert_eq!(error.code, ErrorCode::StorageFull);
        assert!(error.message.starts_with("queue group journal"), "{error}");
    }

    /// Receive reads: runs and nearby offsets share a read; far ones get their own (a
    /// thousand scattered deliveries are not a thousand MiB reads, nor one read of
    /// everything between them).
    #[test]
    fn deliveries_are_read_in_spans_of_nearby_offsets() {
        assert_eq!(read_spans(&[]), Vec::<Range<u64>>::new());
        assert_eq!(read_spans(&[5, 6, 7]), vec![5..8]);
        let gap = DELIVERY_READ_GAP_MAX;
        assert_eq!(read_spans(&[0, 1 + gap]), vec![0..2 + gap]);
        assert_eq!(read_spans(&[0, 2 + gap]), vec![0..1, 2 + gap..3 + gap]);
        let scattered: Vec<u64> = (0..1000).map(|index| index * 10_000).collect();
        assert_eq!(read_spans(&scattered).len(), 1000);
        assert!(read_spans(&scattered)
            .iter()
            .all(|span| span.end - span.start == 1));
    }
}
