//! The producer's batching core, free of I/O and of the clock: the caller passes `now`.
//!
//! Records are appended to an open batch per (topic, partition). A batch is sealed when
//! it reaches `batch_records_max` or the next record would push it past
//! `batch_bytes_max`, when it has been open for `linger`, or on flush. Sealed batches
//! wait per partition; [`Accumulator::take_request`] hands out at most one batch per
//! partition at a time and holds the partition until [`Accumulator::finish`], so batches
//! of one partition reach the broker, and so the log, in the order they were sealed even
//! with many requests in flight. Different partitions pipeline freely.
//!
//! Idempotence. A batch gets its producer id and its partition's next sequence number
//! (docs/protocol.md §8.1) when it is first taken for sending, not when it is sealed: one
//! batch per partition is in flight, so a batch that fails for good can still be followed
//! by the next one without a gap the broker would refuse (the producer picks a new id
//! then, see `producer.rs`). From then on its bytes never change: a retry resends them.

use std::collections::{HashMap, VecDeque};
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

#[derive(Default)]
struct PartitionQueue {
    open: Option<OpenBatch>,
    sealed: VecDeque<SealedBatch>,
    /// A batch of this partition is in flight; the next waits for it.
    in_flight: bool,
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
    next_sequence: u64,
    /// Sealed batches not yet handed out, over all partitions.
    sealed_count: usize,
}

impl Accumulator {
    pub(super) fn new(limits: AccumulatorLimits) -> Accumulator {
        assert!(limits.batch_records_max > 0, "validated by ProducerConfig");
        Accumulator {
            limits,
            topics: HashMap::new(),
            batch_sequences: HashMap::new(),
            next_sequence: 0,
            sealed_count: 0,
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
            seal(queue, &mut self.next_sequence, &mut self.sealed_count);
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
            seal(queue, &mut self.next_sequence, &mut self.sealed_count);
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
                    seal(queue, &mut self.next_sequence, &mut self.sealed_count);
                }
            }
        }
    }

    /// Seals every open batch (flush).
    pub(super) fn seal_all(&mut self) {
        for partitions in self.topics.values_mut() {
            for queue in partitions.values_mut() {
                if queue.open.is_some() {
                    seal(queue, &mut self.next_sequence, &mut self.sealed_count);
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

    /// Takes the sealed batches for one request: at most one per partition (whose
    /// partition is then in flight until `finish`), oldest first, until `request_bytes_max`
    /// is reached (always at least one). Empty when nothing can be sent. Each batch is
    /// finished here with `producer_id` and its partition's next sequence number (with
    /// producer id 0, not idempotent, the sequence is 0).
    pub(super) fn take_request(
        &mut self,
        request_bytes_max: usize,
        producer_id: u64,
    ) -> Vec<SealedBatch> {
        if self.sealed_count == 0 {
            return Vec::new();
        }
        let mut candidates: Vec<(u64, Arc<str>, u32)> = self
            .topics
            .iter()
            .flat_map(|(topic, partitions)| {
                partitions.iter().filter_map(|(partition, queue)| {
                    let front = queue.sealed.front().filter(|_| !queue.in_flight)?;
                    Some((front.sealed_order, topic.clone(), *partition))
                })
            })
            .collect();
        candidates.sort_unstable_by_key(|(sequence, _, _)| *sequence);
        let mut taken = Vec::new();
        let mut bytes = 0;
        for (_, topic, partition) in candidates {
            let queue = self
                .topics
                .get_mut(&topic)
                .and_then(|partitions| partitions.get_mut(&partition))
                .expect("candidate came from the map");
            let size = queue
                .sealed
                .front()
                .expect("candidate has a sealed batch")
                .size_bytes();
            if !taken.is_empty() && bytes + size > request_bytes_max {
                break;
            }
            bytes += size;
            queue.in_flight = true;
            let mut sealed = queue
                .sealed
                .pop_front()
                .expect("candidate has a sealed batch");
            if let Some(mut builder) = sealed.unsent.take() {
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
                sealed.batch = builder.finish();
            }
            taken.push(sealed);
            self.sealed_count -= 1;
        }
        taken
    }

    /// The in-flight batch of this partition is done; the next may go.
    pub(super) fn finish(&mut self, topic: &str, partition: u32) {
        let Some(partitions) = self.topics.get_mut(topic) else {
            return;
        };
        if let Some(queue) = partitions.get_mut(&partition) {
            queue.in_flight = false;
            if queue.open.is_none() && queue.sealed.is_empty() {
                partitions.remove(&partition);
            }
        }
        if partitions.is_empty() {
            self.topics.remove(topic);
        }
    }

    /// The batches not yet handed out (sealed, and open if any); in-flight ones are
    /// tracked by the producer. Flush waits on these after `seal_all`.
    pub(super) fn sealed_completions(&self) -> Vec<Arc<BatchCompletion>> {
        self.topics
            .values()
            .flat_map(HashMap::values)
            .flat_map(|queue| {
                queue
                    .sealed
                    .iter()
                    .map(|sealed| sealed.completion.clone())
                    .chain(queue.open.iter().map(|open| open.completion.clone()))
            })
            .collect()
    }

    /// Nothing open, sealed or in flight.
    pub(super) fn is_empty(&self) -> bool {
        self.topics.is_empty()
    }
}

fn seal(queue: &mut PartitionQueue, next_sequence: &mut u64, sealed_count: &mut usize) {
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
    });
    *next_sequence += 1;
    *sealed_count += 1;
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
        }
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
        let request = accumulator.take_request(usize::MAX, 0);
        assert_eq!(request.len(), 1);
        let header = validate_batch(&request[0].batch, 10).unwrap();
        assert_eq!(header.record_count, 3);
        assert!(
            accumulator.take_request(usize::MAX, 0).is_empty(),
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
            let request = accumulator.take_request(usize::MAX, 0);
            let Some(sealed) = request.into_iter().next() else {
                break;
            };
            assert!(sealed.batch.len() <= 2 * one_record + 10);
            counts.push(validate_batch(&sealed.batch, 10).unwrap().record_count);
            accumulator.finish("t", 0);
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
        assert!(accumulator.take_request(usize::MAX, 0).is_empty());
        accumulator.seal_expired(start + Duration::from_millis(5));
        assert_eq!(accumulator.next_deadline(), None);
        assert_eq!(accumulator.take_request(usize::MAX, 0).len(), 1);
    }

    #[test]
    fn one_batch_per_partition_in_flight_and_many_partitions_per_request() {
        let mut accumulator = Accumulator::new(limits(1, 1 << 20, 0));
        let now = Instant::now();
        accumulator.append("a", 0, &record(b"1"), None, now);
        accumulator.append("a", 0, &record(b"2"), None, now);
        accumulator.append("a", 1, &record(b"3"), None, now);
        accumulator.append("b", 0, &record(b"4"), None, now);
        let first = accumulator.take_request(usize::MAX, 0);
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
            accumulator.take_request(usize::MAX, 0).is_empty(),
            "a/0 is still in flight"
        );
        accumulator.finish("a", 0);
        let second = accumulator.take_request(usize::MAX, 0);
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
        assert_eq!(accumulator.take_request(1, 0).len(), 1);
        let batch_bytes = accumulator.take_request(usize::MAX, 0);
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
            let mut taken = accumulator.take_request(usize::MAX, 77);
            taken.sort_by_key(|batch| batch.partition);
            for batch in &taken {
                let header = validate_batch(&batch.batch, 10).unwrap();
                assert_eq!(header.producer_id, 77);
                sequences.push((batch.partition, header.sequence));
                // The queue empties between rounds: the sequence must not restart.
                accumulator.finish("t", batch.partition);
            }
            assert_eq!(taken.len(), 2, "round {round}");
        }
        assert_eq!(
            sequences,
            vec![(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
        );
        // Not idempotent: producer id 0, sequence 0, and no sequence is used up.
        accumulator.append("t", 0, &record(b"z"), None, now);
        let taken = accumulator.take_request(usize::MAX, 0);
        let header = validate_batch(&taken[0].batch, 10).unwrap();
        assert_eq!((header.producer_id, header.sequence), (0, 0));
        accumulator.finish("t", 0);
        accumulator.append("t", 0, &record(b"w"), None, now);
        let taken = accumulator.take_request(usize::MAX, 78);
        assert_eq!(validate_batch(&taken[0].batch, 10).unwrap().sequence, 3);
    }
}
