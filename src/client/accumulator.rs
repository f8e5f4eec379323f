//! The producer's batching core, free of I/O and of the clock: the caller passes `now`.
//!
//! Records are appended to an open batch per (topic, partition). A batch is sealed when
//! it reaches `batch_records_max` or the next record would push it past
//! `batch_bytes_max`, when it has been open for `linger`, or on flush. Sealed batches
//! wait per partition; [`Accumulator::take_request`] hands out at most one batch per
//! partition per request and up to `in_flight_per_partition_max` per partition at once,
//! in the order they were sealed. The producer writes requests to its connection in the
//! order it took them, and the broker appends one connection's batches of a partition in
//! arrival order (docs/protocol.md §5.5), so a partition's batches reach the log in
//! sealing order however many are in flight.
//!
//! Idempotence. A batch gets its producer id and its partition's next sequence number
//! (docs/protocol.md §8.1) when it is first taken for sending, not when it is sealed.
//! From then on its bytes never change: a retry resends them.
//!
//! Answers and retries ([`Accumulator::answered`]). Answers may come in any order; each
//! partition handles them in the order its batches were taken. When one fails, its
//! partition stops taking batches until every batch of it in flight has been answered:
//! then the ones to send again (those that failed retriably, and those refused as out
//! of order because an earlier one was not stored: nothing of them was appended) go
//! back, in order, ahead of everything else of the partition, after a backoff. A batch
//! that fails for good fails every later batch of its partition that was not stored in
//! the same round (they would be refused as out of order), and batches stamped with a
//! new producer id (the producer takes one after such a failure) wait until those of the
//! old id are all answered: the broker cannot tell the order of two ids' batches apart.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::{Notify, OwnedSemaphorePermit};

use super::ClientError;
use crate::protocol::batch::{BatchBuilder, BATCH_HEADER_SIZE, PRODUCER_ID_NONE};

/// First allocation for a batch buffer; it grows (doubling) up to `batch_bytes_max`.
const BATCH_BUFFER_BYTES_INITIAL: usize = 64 << 10;

/// Outcome of one batch, shared by the handles of all its records: one allocation per
/// batch rather than one channel per record.
#[derive(Debug)]
pub(super) struct BatchCompletion {
    pub(super) topic: Arc<str>,
    pub(super) partition: u32,
    /// `Ok(Some(base_offset))` when acked, `Ok(None)` when sent with acks none.
    outcome: OnceLock<Result<Option<u64>, ClientError>>,
    done: Notify,
}

impl BatchCompletion {
    pub(super) fn new(topic: Arc<str>, partition: u32) -> BatchCompletion {
        BatchCompletion {
            topic,
            partition,
            outcome: OnceLock::new(),
            done: Notify::new(),
        }
    }

    /// Records the outcome; the first one wins.
    pub(super) fn complete(&self, outcome: Result<Option<u64>, ClientError>) {
        let _ = self.outcome.set(outcome);
        self.done.notify_waiters();
    }

    pub(super) fn outcome(&self) -> Option<&Result<Option<u64>, ClientError>> {
        self.outcome.get()
    }

    pub(super) async fn wait(&self) -> &Result<Option<u64>, ClientError> {
        loop {
            // Register interest before checking, so a completion between the check and
            // the await is not missed.
            let notified = self.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(outcome) = self.outcome.get() {
                return outcome;
            }
            notified.await;
        }
    }
}

/// A sealed batch waiting to be sent or in flight.
pub(super) struct SealedBatch {
    pub(super) partition: u32,
    pub(super) topic: Arc<str>,
    /// The batch's bytes, producer id and sequence included; empty until the batch is
    /// first taken for sending (`unsent` holds it until then), unchanged afterwards.
    pub(super) batch: Bytes,
    unsent: Option<BatchBuilder>,
    pub(super) completion: Arc<BatchCompletion>,
    /// The producer's memory budget for these records, returned when the batch is done.
    pub(super) _budget: Option<OwnedSemaphorePermit>,
    /// Order of sealing, so that requests serve the longest-waiting partitions first.
    sealed_order: u64,
    /// Sends so far (the producer's retry state).
    pub(super) attempts: u32,
    /// When it was first sent: `delivery_timeout_ms` counts from here.
    pub(super) first_sent: Option<Instant>,
    /// Whether some earlier attempt may have stored it (an unanswered or ambiguous one).
    pub(super) maybe_written: bool,
    /// Order of the latest take: answers of a partition are handled in this order.
    take: u64,
    /// The producer id stamped into `batch` (0: not idempotent, or not yet taken).
    producer_id: u64,
}

impl std::fmt::Debug for SealedBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedBatch")
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .field("bytes", &self.size_bytes())
            .field("attempts", &self.attempts)
            .finish()
    }
}

impl SealedBatch {
    pub(super) fn size_bytes(&self) -> usize {
        match &self.unsent {
            Some(builder) => builder.size_bytes(),
            None => self.batch.len(),
        }
    }
}

struct OpenBatch {
    builder: BatchBuilder,
    completion: Arc<BatchCompletion>,
    budget: Option<OwnedSemaphorePermit>,
    opened_at: Instant,
}

/// What became of one attempt of a batch, as the producer reads the broker's answer.
#[derive(Debug)]
pub(super) enum Answer {
    /// Stored (or written, for acks none), at this base offset.
    Stored(Option<u64>),
    /// Failed, and the same bytes may succeed if sent again (the producer has checked
    /// that it may retry this batch).
    Retriable(ClientError),
    /// Refused with OutOfOrderSequence: nothing was appended. Sent again when an earlier
    /// batch of the partition failed in the same round; a failure for good otherwise.
    OutOfOrder(ClientError),
    /// Failed for good.
    Failed(ClientError),
}

/// A partition's round of failures: from the first failed answer until every batch of
/// the partition then in flight has been answered.
struct Recovery {
    /// Batches to send again, in take order, with the error of their last attempt.
    retry: Vec<(SealedBatch, ClientError)>,
    /// A batch failed for good in this round: later ones not stored fail too.
    failed_for_good: bool,
    /// When the batches may go again (the latest backoff the producer asked for).
    retry_at: Instant,
}

#[derive(Default)]
struct PartitionQueue {
    open: Option<OpenBatch>,
    sealed: VecDeque<SealedBatch>,
    /// Batches to send again, oldest take first, with their last error: they go before
    /// anything in `sealed`, from `retry_at` on.
    retries: VecDeque<(SealedBatch, ClientError)>,
    retry_at: Option<Instant>,
    /// Take numbers of the batches in flight, oldest first.
    in_flight: VecDeque<u64>,
    /// The producer id of the batches in flight.
    in_flight_producer_id: u64,
    /// Answers that came before an earlier batch's, by take number.
    answers: BTreeMap<u64, (SealedBatch, Answer)>,
    recovery: Option<Recovery>,
}

impl PartitionQueue {
    fn is_idle(&self) -> bool {
        self.open.is_none()
            && self.sealed.is_empty()
            && self.retries.is_empty()
            && self.in_flight.is_empty()
            && self.answers.is_empty()
            && self.recovery.is_none()
    }

    /// The batch this partition would send next, if it may send one now.
    fn next_to_send(
        &self,
        producer_id: u64,
        in_flight_max: usize,
        now: Instant,
    ) -> Option<&SealedBatch> {
        if self.recovery.is_some() || self.in_flight.len() >= in_flight_max {
            return None;
        }
        if let Some((retry, _)) = self.retries.front() {
            return self.retry_at.is_none_or(|at| at <= now).then_some(retry);
        }
        let front = self.sealed.front()?;
        // A new producer id's batches wait for the old id's to be answered.
        (self.in_flight.is_empty() || self.in_flight_producer_id == producer_id).then_some(front)
    }
}

/// A record as the accumulator takes it: already routed.
pub(super) struct AppendRecord<'a> {
    pub(super) timestamp_ms: i64,
    pub(super) key: Option<&'a [u8]>,
    pub(super) value: &'a [u8],
    pub(super) headers: &'a [(&'a str, &'a [u8])],
}

#[derive(Debug, Clone, Copy)]
pub(super) struct AccumulatorLimits {
    pub(super) batch_records_max: u32,
    pub(super) batch_bytes_max: usize,
    pub(super) linger: Duration,
    /// Batches of one partition in flight at once (`ProducerConfig`); at least 1.
    pub(super) in_flight_per_partition_max: usize,
}

pub(super) struct AppendOutcome {
    pub(super) completion: Arc<BatchCompletion>,
    pub(super) index: u32,
    pub(super) sealed: bool,
}

pub(super) struct Accumulator {
    limits: AccumulatorLimits,
    topics: HashMap<Arc<str>, HashMap<u32, PartitionQueue>>,
    /// The next batch sequence number of each partition used so far (docs/protocol.md
    /// §8.1). Kept when a partition's queue empties, or the broker would see the
    /// sequence restart. One entry per partition the producer ever wrote to.
    batch_sequences: HashMap<Arc<str>, HashMap<u32, u64>>,
    /// Per partition, the producer id under which a batch was last stored there. Until
    /// one batch of the current id is stored in a partition, the broker does not know
    /// the id there and accepts its first batch whatever the sequence
    /// (docs/protocol.md §8.1): with a batch refused before append (StorageFull) and the
    /// next one stored, the refused one could never be stored after it. So an id goes
    /// one batch at a time in a partition until the broker has stored one of it.
    stored_under: HashMap<Arc<str>, HashMap<u32, u64>>,
    next_sequence: u64,
    /// Numbers the takes of batches, over all partitions.
    next_take: u64,
}

impl Accumulator {
    pub(super) fn new(limits: AccumulatorLimits) -> Accumulator {
        assert!(limits.batch_records_max > 0, "validated by ProducerConfig");
        assert!(
            limits.in_flight_per_partition_max > 0,
            "validated by ProducerConfig"
        );
        Accumulator {
            limits,
            topics: HashMap::new(),
            batch_sequences: HashMap::new(),
            stored_under: HashMap::new(),
            next_sequence: 0,
            next_take: 0,
        }
    }

    /// The largest batch built from now on.
    pub(super) fn batch_bytes_max(&self) -> usize {
        self.limits.batch_bytes_max
    }

    /// Builds batches to `batch_bytes_max` from now on (the producer's limit after a
    /// reconnect to a broker with other limits). Batches already sealed keep their size;
    /// an open batch already past it takes no more records (the next append seals it).
    pub(super) fn set_batch_bytes_max(&mut self, batch_bytes_max: usize) {
        self.limits.batch_bytes_max = batch_bytes_max;
    }

    /// Appends a routed record; says which batch took it, at which index, and whether a
    /// batch was sealed (so the sender needs waking). `budget` is the memory reserved for
    /// the record, kept until its batch completes.
    pub(super) fn append(
        &mut self,
        topic: &str,
        partition: u32,
        record: &AppendRecord<'_>,
        budget: Option<OwnedSemaphorePermit>,
        now: Instant,
    ) -> AppendOutcome {
        let topic_key = match self.topics.get_key_value(topic) {
            Some((key, _)) => key.clone(),
            None => Arc::from(topic),
        };
        let record_size = BatchBuilder::record_size(record.key, record.value, record.headers);
        let limits = self.limits;
        let partitions = self.topics.entry(topic_key.clone()).or_default();
        let queue = partitions.entry(partition).or_default();
        // Seal first if this record would overflow the open batch; a record larger than
        // the limit on its own still makes a batch, alone (the producer fails it before
        // sending if it is over the broker's own limit).
        let overflows = queue
            .open
            .as_ref()
            .is_some_and(|open| open.builder.size_bytes() + record_size > limits.batch_bytes_max);
        let mut sealed = false;
        if overflows {
            seal(queue, &mut self.next_sequence);
            sealed = true;
        }
        let open = queue.open.get_or_insert_with(|| OpenBatch {
            builder: BatchBuilder::new(BytesMut::with_capacity(
                BATCH_BUFFER_BYTES_INITIAL
                    .min(limits.batch_bytes_max)
                    .max(BATCH_HEADER_SIZE + record_size),
            )),
            completion: Arc::new(BatchCompletion::new(topic_key.clone(), partition)),
            budget: None,
            opened_at: now,
        });
        let index = open.builder.record_count();
        open.builder.push(
            record.timestamp_ms,
            record.key,
            record.value,
            record.headers,
        );
        match (&mut open.budget, budget) {
            (Some(held), Some(more)) => held.merge(more),
            (held @ None, more) => *held = more,
            (Some(_), None) => {}
        }
        let completion = open.completion.clone();
        if open.builder.record_count() >= limits.batch_records_max
            || open.builder.size_bytes() >= limits.batch_bytes_max
        {
            seal(queue, &mut self.next_sequence);
            sealed = true;
        }
        AppendOutcome {
            completion,
            index,
            sealed,
        }
    }

    /// Seals every open batch that has lingered long enough.
    pub(super) fn seal_expired(&mut self, now: Instant) {
        let linger = self.limits.linger;
        for partitions in self.topics.values_mut() {
            for queue in partitions.values_mut() {
                if queue
                    .open
                    .as_ref()
                    .is_some_and(|open| now >= open.opened_at + linger)
                {
                    seal(queue, &mut self.next_sequence);
                }
            }
        }
    }

    /// Seals every open batch (flush).
    pub(super) fn seal_all(&mut self) {
        for partitions in self.topics.values_mut() {
            for queue in partitions.values_mut() {
                if queue.open.is_some() {
                    seal(queue, &mut self.next_sequence);
                }
            }
        }
    }

    /// When the earliest open batch's linger ends.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.topics
            .values()
            .flat_map(HashMap::values)
            .filter_map(|queue| {
                queue
                    .open
                    .as_ref()
                    .map(|open| open.opened_at + self.limits.linger)
            })
            .min()
    }

    /// Takes the batches for one request: at most one per partition, each partition's
    /// next (a batch to send again first, once its backoff is over, else its oldest
    /// sealed one), from partitions with fewer than `in_flight_per_partition_max` in
    /// flight and no failure being sorted out, longest waiting first, until
    /// `request_bytes_max` is reached (always at least one). Empty when nothing can be
    /// sent now. A batch taken for the first time is finished here with `producer_id`
    /// and its partition's next sequence number (with producer id 0, not idempotent, the
    /// sequence is 0); a batch sent again keeps its bytes.
    pub(super) fn take_request(
        &mut self,
        request_bytes_max: usize,
        producer_id: u64,
        now: Instant,
    ) -> Vec<SealedBatch> {
        let in_flight_max = self.limits.in_flight_per_partition_max;
        let stored_under = &self.stored_under;
        let mut candidates: Vec<(u64, Arc<str>, u32)> = self
            .topics
            .iter()
            .flat_map(|(topic, partitions)| {
                partitions.iter().filter_map(|(partition, queue)| {
                    let known = producer_id == PRODUCER_ID_NONE
                        || stored_under
                            .get(topic)
                            .and_then(|partitions| partitions.get(partition))
                            == Some(&producer_id);
                    let limit = if known { in_flight_max } else { 1 };
                    let next = queue.next_to_send(producer_id, limit, now)?;
                    Some((next.sealed_order, topic.clone(), *partition))
                })
            })
            .collect();
        if candidates.is_empty() {
            return Vec::new();
        }
        candidates.sort_unstable_by_key(|(sequence, _, _)| *sequence);
        let mut taken = Vec::new();
        let mut bytes = 0;
        for (_, topic, partition) in candidates {
            let queue = self
                .topics
                .get_mut(&topic)
                .and_then(|partitions| partitions.get_mut(&partition))
                .expect("candidate came from the map");
            let size = match queue.retries.front() {
                Some((retry, _)) => retry.size_bytes(),
                None => queue
                    .sealed
                    .front()
                    .expect("candidate has a batch")
                    .size_bytes(),
            };
            if !taken.is_empty() && bytes + size > request_bytes_max {
                break;
            }
            bytes += size;
            let mut batch = match queue.retries.pop_front() {
                Some((retry, _)) => retry,
                None => queue.sealed.pop_front().expect("candidate has a batch"),
            };
            if queue.retries.is_empty() {
                queue.retry_at = None;
            }
            if let Some(mut builder) = batch.unsent.take() {
                if producer_id != PRODUCER_ID_NONE {
                    let next = self
                        .batch_sequences
                        .entry(topic.clone())
                        .or_default()
                        .entry(partition)
                        .or_insert(0);
                    builder.set_producer(producer_id, *next);
                    *next = next.wrapping_add(1);
                }
                batch.producer_id = producer_id;
                batch.batch = builder.finish();
            }
            assert!(
                queue.in_flight.is_empty() || queue.in_flight_producer_id == batch.producer_id,
                "{topic}/{partition}: a batch of producer {} taken while batches of producer {} are in flight",
                batch.producer_id,
                queue.in_flight_producer_id
            );
            batch.take = self.next_take;
            self.next_take += 1;
            queue.in_flight.push_back(batch.take);
            queue.in_flight_producer_id = batch.producer_id;
            taken.push(batch);
        }
        taken
    }

    /// When the earliest retry backoff ends, for the sender to wake then.
    pub(super) fn next_retry(&self) -> Option<Instant> {
        self.topics
            .values()
            .flat_map(HashMap::values)
            .filter_map(|queue| queue.retry_at)
            .min()
    }

    /// An attempt of `batch` (taken by [`Accumulator::take_request`]) ended with
    /// `answer`. Returns the batches now done, with their outcomes, in their partition's
    /// order (module docs). `retry_at` is when a batch may go again if this answer
    /// sends it back; a batch is not sent again when that is past its first send plus
    /// `delivery_timeout`, and fails with its last error instead.
    pub(super) fn answered(
        &mut self,
        batch: SealedBatch,
        answer: Answer,
        retry_at: Instant,
        delivery_timeout: Duration,
    ) -> Vec<(SealedBatch, Result<Option<u64>, ClientError>)> {
        let topic = batch.topic.clone();
        let partition = batch.partition;
        let partitions = self
            .topics
            .get_mut(&topic)
            .expect("a batch in flight keeps its partition queue");
        let queue = partitions
            .get_mut(&partition)
            .expect("a batch in flight keeps its partition queue");
        assert!(
            queue.in_flight.contains(&batch.take),
            "{topic}/{partition}: an answer for take {} that is not in flight",
            batch.take
        );
        if matches!(answer, Answer::Stored(_)) && batch.producer_id != PRODUCER_ID_NONE {
            self.stored_under
                .entry(topic.clone())
                .or_default()
                .insert(partition, batch.producer_id);
        }
        queue.answers.insert(batch.take, (batch, answer));
        let mut settled = Vec::new();
        while let Some(front) = queue.in_flight.front().copied() {
            let Some((batch, answer)) = queue.answers.remove(&front) else {
                break;
            };
            queue.in_flight.pop_front();
            handle_answer(queue, batch, answer, retry_at, &mut settled);
        }
        if queue.in_flight.is_empty() {
            if let Some(recovery) = queue.recovery.take() {
                end_recovery(queue, recovery, delivery_timeout, &mut settled);
            }
        }
        if queue.is_idle() {
            partitions.remove(&partition);
            if partitions.is_empty() {
                self.topics.remove(&topic);
            }
        }
        settled
    }

    /// The batches not in flight and not done (open, sealed, answered out of order,
    /// waiting to be sent again); in-flight ones are tracked by the producer. Flush
    /// waits on these after `seal_all`.
    pub(super) fn sealed_completions(&self) -> Vec<Arc<BatchCompletion>> {
        self.topics
            .values()
            .flat_map(HashMap::values)
            .flat_map(|queue| {
                queue
                    .sealed
                    .iter()
                    .chain(queue.retries.iter().map(|(batch, _)| batch))
                    .chain(queue.answers.values().map(|(batch, _)| batch))
                    .chain(
                        queue
                            .recovery
                            .iter()
                            .flat_map(|recovery| recovery.retry.iter().map(|(batch, _)| batch)),
                    )
                    .map(|batch| batch.completion.clone())
                    .chain(queue.open.iter().map(|open| open.completion.clone()))
            })
            .collect()
    }

    /// Nothing open, sealed or in flight.
    pub(super) fn is_empty(&self) -> bool {
        self.topics.is_empty()
    }
}

/// The failure of `batch`, for its handles.
fn failed(batch: &SealedBatch, cause: ClientError) -> Result<Option<u64>, ClientError> {
    Err(ClientError::ProduceFailed {
        cause: Arc::new(cause),
        maybe_written: batch.maybe_written,
        attempts: batch.attempts,
    })
}

type Settled = Vec<(SealedBatch, Result<Option<u64>, ClientError>)>;

/// Handles the answer of a partition's oldest batch in flight (`Accumulator::answered`).
fn handle_answer(
    queue: &mut PartitionQueue,
    batch: SealedBatch,
    answer: Answer,
    retry_at: Instant,
    settled: &mut Settled,
) {
    let (error, retriable) = match answer {
        Answer::Stored(offset) => {
            settled.push((batch, Ok(offset)));
            return;
        }
        Answer::Retriable(error) => (error, true),
        // Sent again only after an earlier batch of the round that was not stored.
        Answer::OutOfOrder(error) => (error, queue.recovery.is_some()),
        Answer::Failed(error) => (error, false),
    };
    // Without an earlier failure an out-of-order refusal means the broker's table
    // disagrees with this producer (it was evicted, say), which resending cannot fix.
    let recovery = queue.recovery.get_or_insert_with(|| Recovery {
        retry: Vec::new(),
        failed_for_good: false,
        retry_at,
    });
    recovery.retry_at = recovery.retry_at.max(retry_at);
    if retriable && !recovery.failed_for_good {
        recovery.retry.push((batch, error));
    } else {
        recovery.failed_for_good = true;
        let outcome = failed(&batch, error);
        settled.push((batch, outcome));
    }
}

/// Every batch of a round of failures has been answered: the ones to send again go to
/// the front of the partition's retries, in order, unless one of them (or one before it)
/// is past its delivery timeout, which fails it and everything after it.
fn end_recovery(
    queue: &mut PartitionQueue,
    recovery: Recovery,
    delivery_timeout: Duration,
    settled: &mut Settled,
) {
    let retry_at = recovery.retry_at;
    let mut giving_up = false;
    let waiting = std::mem::take(&mut queue.retries);
    let mut again = VecDeque::with_capacity(recovery.retry.len() + waiting.len());
    for (batch, error) in recovery.retry.into_iter().chain(waiting) {
        let first_sent = batch.first_sent.expect("a batch answered was sent");
        giving_up |= retry_at > first_sent + delivery_timeout;
        if giving_up {
            let outcome = failed(&batch, error);
            settled.push((batch, outcome));
        } else {
            again.push_back((batch, error));
        }
    }
    queue.retry_at = (!again.is_empty()).then_some(retry_at);
    queue.retries = again;
}

fn seal(queue: &mut PartitionQueue, next_sequence: &mut u64) {
    let Some(open) = queue.open.take() else {
        return;
    };
    queue.sealed.push_back(SealedBatch {
        partition: open.completion.partition,
        topic: open.completion.topic.clone(),
        batch: Bytes::new(),
        unsent: Some(open.builder),
        completion: open.completion,
        _budget: open.budget,
        sealed_order: *next_sequence,
        attempts: 0,
        first_sent: None,
        maybe_written: false,
        take: 0,
        producer_id: PRODUCER_ID_NONE,
    });
    *next_sequence += 1;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::batch::{decode_records, validate_batch};

    fn limits(batch_records_max: u32, batch_bytes_max: usize, linger_ms: u64) -> AccumulatorLimits {
        AccumulatorLimits {
            batch_records_max,
            batch_bytes_max,
            linger: Duration::from_millis(linger_ms),
            in_flight_per_partition_max: 1,
        }
    }

    const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

    /// Answers `batch` as stored at `offset`; returns what that settled.
    fn stored(
        accumulator: &mut Accumulator,
        batch: SealedBatch,
        offset: u64,
    ) -> Vec<(String, Result<Option<u64>, ClientError>)> {
        answer(accumulator, batch, Answer::Stored(Some(offset)))
    }

    /// Hands `answer` for `batch` to the accumulator (retry at once); returns the values
    /// of the first record of each batch settled, with its outcome, in settling order.
    fn answer(
        accumulator: &mut Accumulator,
        mut batch: SealedBatch,
        answer: Answer,
    ) -> Vec<(String, Result<Option<u64>, ClientError>)> {
        batch.first_sent.get_or_insert_with(Instant::now);
        batch.attempts += 1;
        accumulator
            .answered(batch, answer, Instant::now(), DELIVERY_TIMEOUT)
            .into_iter()
            .map(|(batch, outcome)| (first_value(&batch), outcome))
            .collect()
    }

    /// The offsets of settled batches (`None` for a failure).
    fn offsets(
        settled: Vec<(String, Result<Option<u64>, ClientError>)>,
    ) -> Vec<(String, Option<u64>)> {
        settled
            .into_iter()
            .map(|(value, outcome)| (value, outcome.ok().flatten()))
            .collect()
    }

    fn first_value(batch: &SealedBatch) -> String {
        let mut records = Vec::new();
        decode_records(&batch.batch, 0, &mut records).unwrap();
        String::from_utf8_lossy(&records[0].value).into_owned()
    }

    fn record(value: &[u8]) -> AppendRecord<'_> {
        AppendRecord {
            timestamp_ms: 1_000,
            key: None,
            value,
            headers: &[],
        }
    }

    #[test]
    fn batch_seals_at_record_count_and_indexes_records() {
        let mut accumulator = Accumulator::new(limits(3, 1 << 20, 1_000));
        let now = Instant::now();
        let mut indexes = Vec::new();
        for value in [b"a", b"b", b"c", b"d"] {
            indexes.push(accumulator.append("t", 0, &record(value), None, now).index);
        }
        assert_eq!(indexes, vec![0, 1, 2, 0], "fourth record opens a new batch");
        let request = accumulator.take_request(usize::MAX, 0, Instant::now());
        assert_eq!(request.len(), 1);
        let header = validate_batch(&request[0].batch, 10).unwrap();
        assert_eq!(header.record_count, 3);
        assert!(
            accumulator
                .take_request(usize::MAX, 0, Instant::now())
                .is_empty(),
            "the open batch has not lingered"
        );
    }

    #[test]
    fn batch_seals_before_exceeding_bytes_max() {
        let value = [7u8; 100];
        let one_record = BATCH_HEADER_SIZE + BatchBuilder::record_size(None, &value, &[]);
        let mut accumulator = Accumulator::new(limits(1_000, 2 * one_record + 10, 1_000));
        let now = Instant::now();
        for _ in 0..3 {
            accumulator.append("t", 0, &record(&value), None, now);
        }
        accumulator.seal_all();
        let mut counts = Vec::new();
        loop {
            let request = accumulator.take_request(usize::MAX, 0, Instant::now());
            let Some(sealed) = request.into_iter().next() else {
                break;
            };
            assert!(sealed.batch.len() <= 2 * one_record + 10);
            counts.push(validate_batch(&sealed.batch, 10).unwrap().record_count);
            stored(&mut accumulator, sealed, 0);
        }
        assert_eq!(counts, vec![2, 1]);
    }

    #[test]
    fn linger_seals_after_deadline_only() {
        let mut accumulator = Accumulator::new(limits(100, 1 << 20, 5));
        let start = Instant::now();
        accumulator.append("t", 1, &record(b"x"), None, start);
        assert_eq!(
            accumulator.next_deadline(),
            Some(start + Duration::from_millis(5))
        );
        accumulator.seal_expired(start + Duration::from_millis(4));
        assert!(accumulator
            .take_request(usize::MAX, 0, Instant::now())
            .is_empty());
        accumulator.seal_expired(start + Duration::from_millis(5));
        assert_eq!(accumulator.next_deadline(), None);
        assert_eq!(
            accumulator
                .take_request(usize::MAX, 0, Instant::now())
                .len(),
            1
        );
    }

    #[test]
    fn one_batch_per_partition_in_flight_and_many_partitions_per_request() {
        let mut accumulator = Accumulator::new(limits(1, 1 << 20, 0));
        let now = Instant::now();
        accumulator.append("a", 0, &record(b"1"), None, now);
        accumulator.append("a", 0, &record(b"2"), None, now);
        accumulator.append("a", 1, &record(b"3"), None, now);
        accumulator.append("b", 0, &record(b"4"), None, now);
        let mut first = accumulator.take_request(usize::MAX, 0, Instant::now());
        let mut names: Vec<(String, u32)> = first
            .iter()
            .map(|s| (s.topic.to_string(), s.partition))
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec![("a".into(), 0), ("a".into(), 1), ("b".into(), 0)]
        );
        assert!(
            accumulator
                .take_request(usize::MAX, 0, Instant::now())
                .is_empty(),
            "a/0 is still in flight"
        );
        let position = first
            .iter()
            .position(|batch| (&*batch.topic, batch.partition) == ("a", 0))
            .unwrap();
        stored(&mut accumulator, first.remove(position), 0);
        let second = accumulator.take_request(usize::MAX, 0, Instant::now());
        assert_eq!(second.len(), 1);
        let mut records = Vec::new();
        decode_records(&second[0].batch, 0, &mut records).unwrap();
        assert_eq!(
            &records[0].value[..],
            b"2",
            "the partition's batches keep their order"
        );
    }

    #[test]
    fn request_bytes_max_splits_requests_but_takes_at_least_one() {
        let mut accumulator = Accumulator::new(limits(1, 1 << 20, 0));
        let now = Instant::now();
        for partition in 0..4 {
            accumulator.append("t", partition, &record(&[0u8; 50]), None, now);
        }
        assert_eq!(accumulator.take_request(1, 0, Instant::now()).len(), 1);
        let batch_bytes = accumulator.take_request(usize::MAX, 0, Instant::now());
        assert_eq!(batch_bytes.len(), 3);
    }

    #[test]
    fn batches_get_producer_id_and_per_partition_sequences_when_first_taken() {
        let mut accumulator = Accumulator::new(limits(1, 1 << 20, 0));
        let now = Instant::now();
        let mut sequences = Vec::new();
        for round in 0..3u64 {
            accumulator.append("t", 0, &record(b"x"), None, now);
            accumulator.append("t", 1, &record(b"y"), None, now);
            let mut taken = accumulator.take_request(usize::MAX, 77, Instant::now());
            taken.sort_by_key(|batch| batch.partition);
            assert_eq!(taken.len(), 2, "round {round}");
            for batch in taken {
                let header = validate_batch(&batch.batch, 10).unwrap();
                assert_eq!(header.producer_id, 77);
                sequences.push((batch.partition, header.sequence));
                // The queue empties between rounds: the sequence must not restart.
                stored(&mut accumulator, batch, 0);
            }
        }
        assert_eq!(
            sequences,
            vec![(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
        );
        // Not idempotent: producer id 0, sequence 0, and no sequence is used up.
        accumulator.append("t", 0, &record(b"z"), None, now);
        let mut taken = accumulator.take_request(usize::MAX, 0, Instant::now());
        let header = validate_batch(&taken[0].batch, 10).unwrap();
        assert_eq!((header.producer_id, header.sequence), (0, 0));
        stored(&mut accumulator, taken.remove(0), 0);
        accumulator.append("t", 0, &record(b"w"), None, now);
        let taken = accumulator.take_request(usize::MAX, 78, Instant::now());
        assert_eq!(validate_batch(&taken[0].batch, 10).unwrap().sequence, 3);
    }

    /// An accumulator with `in_flight` batches per partition in flight, and one sealed
    /// one-record batch per value on partition 0 of "t".
    fn pipelined(in_flight: usize, values: &[&str]) -> Accumulator {
        let mut accumulator = Accumulator::new(AccumulatorLimits {
            in_flight_per_partition_max: in_flight,
            ..limits(1, 1 << 20, 0)
        });
        for value in values {
            accumulator.append("t", 0, &record(value.as_bytes()), None, Instant::now());
        }
        // As if a batch of producer 9 had been stored in the partition before (see
        // `a_new_producer_id_sends_one_batch_of_a_partition_until_one_is_stored`).
        accumulator
            .stored_under
            .entry("t".into())
            .or_default()
            .insert(0, 9);
        accumulator
    }

    #[test]
    fn a_new_producer_id_sends_one_batch_of_a_partition_until_one_is_stored() {
        let mut accumulator = Accumulator::new(AccumulatorLimits {
            in_flight_per_partition_max: 3,
            ..limits(1, 1 << 20, 0)
        });
        for value in ["1", "2", "3", "4"] {
            accumulator.append("t", 0, &record(value.as_bytes()), None, Instant::now());
        }
        let first = take_all(&mut accumulator, 9);
        assert_eq!(
            sequences(&first),
            vec![0],
            "the broker does not know producer 9 in this partition yet"
        );
        // Refused before append: still unknown there, still one at a time.
        use crate::protocol::ErrorCode::StorageFull;
        let refused = first.into_iter().next().unwrap();
        assert!(answer(
            &mut accumulator,
            refused,
            Answer::Retriable(refusal(StorageFull))
        )
        .is_empty());
        let again = take_all(&mut accumulator, 9);
        assert_eq!(sequences(&again), vec![0], "the refused one again, alone");
        assert_eq!(
            offsets(stored(
                &mut accumulator,
                again.into_iter().next().unwrap(),
                0
            )),
            vec![("1".into(), Some(0))]
        );
        // Stored under 9: the rest go up to the limit.
        assert_eq!(sequences(&take_all(&mut accumulator, 9)), vec![1, 2, 3]);
    }

    /// Takes one request after another (one batch of partition 0 each) until nothing
    /// more may go.
    /// The three batches taken, in take order.
    fn three_batches(taken: Vec<SealedBatch>) -> [SealedBatch; 3] {
        let count = taken.len();
        taken
            .try_into()
            .unwrap_or_else(|_| panic!("{count} batches taken, three expected"))
    }

    fn take_all(accumulator: &mut Accumulator, producer_id: u64) -> Vec<SealedBatch> {
        let mut taken = Vec::new();
        loop {
            let request = accumulator.take_request(usize::MAX, producer_id, Instant::now());
            if request.is_empty() {
                return taken;
            }
            assert_eq!(request.len(), 1, "one batch of a partition per request");
            taken.extend(request);
        }
    }

    fn sequences(batches: &[SealedBatch]) -> Vec<u64> {
        batches
            .iter()
            .map(|batch| validate_batch(&batch.batch, 10).unwrap().sequence)
            .collect()
    }

    fn refusal(code: crate::protocol::ErrorCode) -> ClientError {
        ClientError::PartitionRefused {
            topic: "t".into(),
            partition: 0,
            error: crate::protocol::WireError::new(code, "x"),
        }
    }

    #[test]
    fn several_batches_of_a_partition_go_out_in_order_up_to_the_limit() {
        let mut accumulator = pipelined(3, &["a", "b", "c", "d"]);
        let taken = take_all(&mut accumulator, 9);
        assert_eq!(
            sequences(&taken),
            vec![0, 1, 2],
            "three in flight, in order"
        );
        let [a, b, c] = three_batches(taken);
        // Answers out of order settle in order: b waits for a.
        assert!(stored(&mut accumulator, b, 1).is_empty());
        assert_eq!(
            offsets(stored(&mut accumulator, a, 0)),
            vec![("a".into(), Some(0)), ("b".into(), Some(1))]
        );
        let next = take_all(&mut accumulator, 9);
        assert_eq!(sequences(&next), vec![3]);
        stored(&mut accumulator, c, 2);
        stored(&mut accumulator, next.into_iter().next().unwrap(), 3);
        assert!(accumulator.is_empty());
    }

    #[test]
    fn a_retriable_failure_sends_it_and_the_batches_refused_behind_it_again_in_order() {
        let mut accumulator = pipelined(3, &["1", "2", "3", "4"]);
        let [one, two, three] = three_batches(take_all(&mut accumulator, 9));
        // 3 and 2 are answered first: refused as out of order, since 1 was not stored.
        use crate::protocol::ErrorCode::{OutOfOrderSequence, StorageFull};
        assert!(answer(
            &mut accumulator,
            three,
            Answer::OutOfOrder(refusal(OutOfOrderSequence))
        )
        .is_empty());
        assert!(answer(
            &mut accumulator,
            two,
            Answer::OutOfOrder(refusal(OutOfOrderSequence))
        )
        .is_empty());
        // Nothing of the partition goes while its round of failures is open.
        assert!(take_all(&mut accumulator, 9).is_empty());
        assert!(
            answer(
                &mut accumulator,
                one,
                Answer::Retriable(refusal(StorageFull))
            )
            .is_empty(),
            "nothing failed for good"
        );
        // Then 1, 2, 3 go again, same bytes, in order, ahead of 4.
        let again = take_all(&mut accumulator, 9);
        assert_eq!(sequences(&again), vec![0, 1, 2]);
        let mut again = again.into_iter();
        let mut settled = Vec::new();
        for offset in 0..3 {
            settled.extend(stored(&mut accumulator, again.next().unwrap(), offset));
        }
        let values: Vec<String> = settled.iter().map(|(value, _)| value.clone()).collect();
        assert_eq!(values, vec!["1", "2", "3"]);
        let four = take_all(&mut accumulator, 9);
        assert_eq!(sequences(&four), vec![3]);
    }

    #[test]
    fn a_failure_for_good_fails_the_later_batches_refused_behind_it() {
        let mut accumulator = pipelined(3, &["1", "2", "3", "4"]);
        let [one, two, three] = three_batches(take_all(&mut accumulator, 9));
        use crate::protocol::ErrorCode::{InvalidBatch, OutOfOrderSequence};
        let failed = answer(&mut accumulator, one, Answer::Failed(refusal(InvalidBatch)));
        assert!(
            matches!(&failed[..], [(value, Err(ClientError::ProduceFailed { maybe_written: false, .. }))] if value == "1")
        );
        // Stored anyway (it was appended before the refusal was known): stays stored.
        assert_eq!(
            offsets(stored(&mut accumulator, two, 1)),
            vec![("2".into(), Some(1))]
        );
        let refused = answer(
            &mut accumulator,
            three,
            Answer::OutOfOrder(refusal(OutOfOrderSequence)),
        );
        assert!(
            matches!(&refused[..], [(value, Err(ClientError::ProduceFailed { maybe_written: false, .. }))] if value == "3")
        );
        // The producer takes a new id after a failure for good; 4 goes under it.
        let four = take_all(&mut accumulator, 10);
        assert_eq!(four.len(), 1);
        assert_eq!(validate_batch(&four[0].batch, 10).unwrap().producer_id, 10);
    }

    #[test]
    fn a_new_producer_id_waits_for_the_old_ids_batches_in_flight() {
        let mut accumulator = pipelined(3, &["1", "2"]);
        let first = take_all(&mut accumulator, 9);
        assert_eq!(first.len(), 2);
        accumulator.append("t", 0, &record(b"3"), None, Instant::now());
        assert!(
            take_all(&mut accumulator, 10).is_empty(),
            "the broker could not tell 3 (new id) from 1 and 2 (old id)"
        );
        for (offset, batch) in first.into_iter().enumerate() {
            stored(&mut accumulator, batch, offset as u64);
        }
        assert_eq!(take_all(&mut accumulator, 10).len(), 1);
    }

    #[test]
    fn a_retry_past_the_delivery_timeout_fails_it_and_the_batches_behind_it() {
        let mut accumulator = pipelined(2, &["1", "2"]);
        let mut taken = take_all(&mut accumulator, 9).into_iter();
        let (mut one, two) = (taken.next().unwrap(), taken.next().unwrap());
        use crate::protocol::ErrorCode::{OutOfOrderSequence, StorageFull};
        one.first_sent = Some(Instant::now() - DELIVERY_TIMEOUT);
        one.attempts += 1;
        let far = Instant::now() + Duration::from_secs(1);
        assert!(accumulator
            .answered(
                one,
                Answer::Retriable(refusal(StorageFull)),
                far,
                DELIVERY_TIMEOUT
            )
            .is_empty());
        let settled = answer(
            &mut accumulator,
            two,
            Answer::OutOfOrder(refusal(OutOfOrderSequence)),
        );
        let values: Vec<&str> = settled.iter().map(|(value, _)| value.as_str()).collect();
        assert_eq!(values, vec!["1", "2"]);
        assert!(settled.iter().all(|(_, outcome)| outcome.is_err()));
        assert!(accumulator.is_empty());
    }
}
