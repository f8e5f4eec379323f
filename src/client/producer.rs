//! The batching producer.
//!
//! `send` routes a record to a partition (explicit, else by key hash with
//! [`placement::partition_for_key`], else round-robin), appends it to that partition's
//! open batch and returns a [`SendHandle`] at once. A sender task seals batches that are
//! full or have lingered `linger_ms`, packs sealed batches of many partitions into one
//! Produce request, and keeps up to `requests_in_flight_max` requests pipelined on the
//! client's connection, with up to `batches_in_flight_per_partition_max` batches of one
//! partition among them. The sender task hands requests to the connection one at a time,
//! in the order it took their batches, and the broker appends one connection's batches
//! of a partition in arrival order (docs/protocol.md §5.5), so a partition's records
//! land in the log in the order they were sent.
//!
//! Contract: a [`SendHandle`] (from `send`, acks `Memory` or `Durable`) resolves once the
//! broker has answered for its batch, with the record's offset (the batch's base offset
//! plus the record's index in it); a [`SentHandle`] (from `send_unacknowledged`, acks
//! `None`) once the batch is written, with no offset, since the broker never answers.
//! Either fails with a [`ClientError::ProduceFailed`] that says why the batch failed for
//! good and whether it may have been written, shared by exactly the records of that
//! batch. Memory is bounded
//! by `buffer_bytes_max`: `send` waits when the records accepted and not yet answered
//! would exceed it.
//!
//! Idempotence and retries (docs/protocol.md §8.1 and "Client retries"). By default the
//! producer is idempotent: it picks a random non-zero producer id, and every batch
//! carries it with the partition's next sequence number, so the broker stores a batch
//! once however often it is sent. A batch that fails with a retriable error (Timeout,
//! ShuttingDown, StorageFull, a broken connection, or no answer within the client's
//! timeout) is sent again, byte for byte, after an exponential backoff with full jitter,
//! until it succeeds or `delivery_timeout_ms` has passed since its first send. Order per
//! partition holds across retries (`accumulator.rs`, "Answers and retries"): when a
//! batch fails, its partition sends nothing more until every batch of it in flight is
//! answered; the later ones the broker refused as out of order (nothing of them was
//! appended, since the failed one left a gap in the sequence) are not failed for that,
//! but sent again right behind the failed one, in order, with the same bytes; later ones
//! already stored stay stored, and a resend of a batch already stored is answered as a
//! duplicate. A batch that fails for good leaves the broker unsure of the partition's
//! sequence (did the last attempt land?): the later batches of its partition not stored
//! by then fail with it (`maybe_written` as their own attempts left it), and the
//! producer takes a new producer id, which the broker does not know and so accepts at
//! any sequence; batches under the new id go out only once the old id's batches of
//! their partition are all answered. When the connection breaks the batch is retried on the client's next
//! connection (the broker keeps producer ids and sequences across restarts, so a batch
//! that did land is not stored again); with `ClientConfig::reconnect` off the error is
//! final, with `maybe_written` true when the request may have reached the broker.
//!
//! Without idempotence (`idempotent: false`, producer id 0) only errors that prove the
//! batch was not stored (StorageFull: refused before append) are retried, so nothing is
//! written twice by a retry.
//!
//! Limits after a reconnect. The broker's largest batch comes from the handshake, and a
//! broker restarted with other settings may take smaller batches than the one the
//! producer started with. After each reconnect the producer builds new batches to the new
//! limit ([`Producer::batch_bytes_max`]), and before each attempt it checks every batch
//! against the handshake of the connection it is about to go out on: a batch built
//! bigger (open, sealed, or being retried) fails with [`ClientError::BatchTooLarge`]
//! under a `ProduceFailed`, not split. A batch already sent must be resent unchanged (its
//! bytes carry its producer id and sequence); one never sent could in principle be
//! split, but is not (its records' handles belong to the batch): only records queued
//! before a reconnect to a broker restarted with a smaller `batch_bytes_max` are
//! affected.
//!
//! Partition counts come from metadata cached per topic; a topic not cached, or an
//! explicit partition past the cached count, triggers one metadata refresh before the
//! send fails. A batch refused with UnknownTopic or UnknownPartition drops the cached
//! entry, so the next send refreshes it.

use std::collections::HashMap;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::accumulator::{
    Accumulator, AccumulatorLimits, Answer, AppendRecord, BatchCompletion, SealedBatch,
};
use super::{Client, ClientError, StartedProduce};
use crate::placement;
use crate::protocol::batch::{BatchBuilder, BATCH_HEADER_SIZE, PRODUCER_ID_NONE, RECORD_OVERHEAD};
use crate::protocol::{
    Acks, ErrorCode, ProducePartition, ProduceRequest, ProduceResponse, ProduceTopic,
};

/// The batches the broker remembers per idempotent producer and partition
/// (docs/protocol.md §8.1): the most an idempotent producer keeps in flight per
/// partition, so that a retry of the oldest is still recognised as a duplicate.
pub const PRODUCER_BATCHES_KEPT: usize = 5;

#[cfg(feature = "server")]
const _: () = assert!(
    PRODUCER_BATCHES_KEPT == crate::storage::producers::PRODUCER_BATCHES_KEPT,
    "the client would keep more batches in flight than the broker can deduplicate"
);

/// Batches of one partition in flight by default: the most an idempotent producer may
/// keep, which did best in the measurement (docs/benchmarks.md, "Ordered pipelining").
pub const BATCHES_IN_FLIGHT_PER_PARTITION_DEFAULT: usize = PRODUCER_BATCHES_KEPT;

/// Producer settings. Every queue has a limit.
///
/// Made with [`ProducerConfig::builder`] (which checks the values) or
/// [`ProducerConfig::default`]; [`Producer::new`] checks them again. Fields are public to
/// read; the struct is `#[non_exhaustive]`, so settings added later are not a breaking
/// change, and code outside this crate sets fields through the builder.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProducerConfig {
    /// Durability asked of the broker for every request. Default [`Acks::Durable`].
    /// With [`Acks::None`] the broker never answers, so records go out with
    /// [`Producer::send_unacknowledged`]; with `Memory` or `Durable`, with
    /// [`Producer::send`].
    pub acks: Acks,
    /// How long an open batch waits for more records before it is sent. 0 sends at the
    /// next opportunity (still batching what arrives while requests are in flight).
    /// Default 5 ms.
    pub linger_ms: u64,
    /// A batch is sealed before it would grow past this. Lowered to the broker's largest
    /// batch (from the handshake) when above it. Default 256 KiB; must hold at least one
    /// empty record.
    pub batch_bytes_max: usize,
    /// A batch is sealed when it holds this many records. Default 10 000; at least 1.
    pub batch_records_max: u32,
    /// The broker's own wait for durability, sent in each request; the client waits this
    /// plus the client's `request_timeout_ms` before giving up on an answer. Default
    /// 30 000 ms.
    pub request_timeout_ms: u32,
    /// Produce requests written and not yet answered. Default 8; at least 1.
    pub requests_in_flight_max: usize,
    /// Batches of one partition written and not yet answered (docs/protocol.md §5.5:
    /// the broker appends them in the order they were written). More than one lets a
    /// producer of small batches keep the disk busy while answers travel: with batch
    /// size 1 and durable acks, one batch in flight caps a partition at one record per
    /// round trip. Default 5 (docs/benchmarks.md, "Ordered pipelining"); at least 1. An
    /// idempotent producer takes at most 5, the batches the broker remembers per
    /// producer (`PRODUCER_BATCHES_KEPT`, §8.1): a retry of the oldest must still be
    /// recognised once the later ones are stored. A producer that is not idempotent and
    /// asks for answers takes only 1: its retries (StorageFull) could otherwise store a
    /// batch after a later one, and nothing on the broker would notice, so it is refused
    /// rather than documented as reordering. Under a new producer id, a partition gets
    /// one batch at a time until the broker has stored one of that id there (§8.1: the
    /// broker takes an unknown id's first batch at any sequence). `idempotent(false)` on
    /// the builder lowers this to 1 unless it was set.
    pub batches_in_flight_per_partition_max: usize,
    /// A request carries batches of many partitions up to about this size (at least one
    /// batch). Below the broker's `frame_body_bytes_max`. Default 8 MiB; at least 1.
    pub request_bytes_max: usize,
    /// Bytes of records accepted by `send` and not yet answered; `send` waits beyond it.
    /// Default 64 MiB; at least 1, at most tokio's `Semaphore::MAX_PERMITS`.
    pub buffer_bytes_max: usize,
    /// Mark batches with a producer id and sequence numbers so that the broker stores a
    /// resent batch once, and retry ambiguous failures (timeouts). Off: producer id 0,
    /// and only failures that prove nothing was stored are retried. Default true.
    pub idempotent: bool,
    /// Backoff before the n-th retry of a batch: a random wait (full jitter) between 0
    /// and `min(retry_backoff_ms_max, retry_backoff_ms_min * 2^(n-1))`. Default 50 ms;
    /// at least 1.
    pub retry_backoff_ms_min: u64,
    /// The cap of the retry backoff. Default 2 000 ms; at least `retry_backoff_ms_min`.
    pub retry_backoff_ms_max: u64,
    /// A batch is not sent again once this long has passed since its first send; the
    /// last error then reaches the caller. Default 30 000 ms; at least 1.
    pub delivery_timeout_ms: u64,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            acks: Acks::Durable,
            linger_ms: 5,
            batch_bytes_max: 256 << 10,
            batch_records_max: 10_000,
            request_timeout_ms: 30_000,
            requests_in_flight_max: 8,
            batches_in_flight_per_partition_max: BATCHES_IN_FLIGHT_PER_PARTITION_DEFAULT,
            request_bytes_max: 8 << 20,
            buffer_bytes_max: 64 << 20,
            idempotent: true,
            retry_backoff_ms_min: 50,
            retry_backoff_ms_max: 2_000,
            delivery_timeout_ms: 30_000,
        }
    }
}

/// Builds a [`ProducerConfig`]: [`ProducerConfig::builder`], one setter per field (named
/// like the field, taking its type: times in milliseconds, like the fields), then
/// [`ProducerConfigBuilder::build`]. A setter not called leaves the field at its default.
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until build() is called"]
pub struct ProducerConfigBuilder {
    config: ProducerConfig,
    /// `batches_in_flight_per_partition_max` was set by the caller: `idempotent(false)`
    /// then leaves it alone (and `build` refuses a value it cannot honour).
    batches_in_flight_set: bool,
}

impl ProducerConfigBuilder {
    /// Batches of one partition in flight at once (default 5; 1 to 5 when idempotent, 1
    /// when not idempotent with acks).
    pub fn batches_in_flight_per_partition_max(mut self, batches: usize) -> Self {
        self.config.batches_in_flight_per_partition_max = batches;
        self.batches_in_flight_set = true;
        self
    }

    /// Idempotent batches and retries of ambiguous failures (default true). Turning it
    /// off also lowers `batches_in_flight_per_partition_max` to 1 unless it was set:
    /// without sequence numbers, more than one in flight could reorder on a retry.
    pub fn idempotent(mut self, idempotent: bool) -> Self {
        self.config.idempotent = idempotent;
        if !self.batches_in_flight_set {
            self.config.batches_in_flight_per_partition_max = if idempotent {
                BATCHES_IN_FLIGHT_PER_PARTITION_DEFAULT
            } else {
                1
            };
        }
        self
    }

    config_setters! {
        /// Durability asked of the broker (default [`Acks::Durable`]).
        acks: Acks;
        /// How long an open batch waits for more records, in ms (default 5).
        linger_ms: u64;
        /// Largest batch in bytes (default 256 KiB; lowered to the broker's limit).
        batch_bytes_max: usize;
        /// Most records in a batch (default 10 000; at least 1).
        batch_records_max: u32;
        /// The broker's wait for durability per request, in ms (default 30 000).
        request_timeout_ms: u32;
        /// Produce requests in flight at once (default 8; at least 1).
        requests_in_flight_max: usize;
        /// About the largest request in bytes (default 8 MiB; at least 1).
        request_bytes_max: usize;
        /// Bytes of records sent and not yet answered (default 64 MiB; at least 1).
        buffer_bytes_max: usize;
        /// First retry backoff cap, in ms (default 50; at least 1).
        retry_backoff_ms_min: u64;
        /// Largest retry backoff, in ms (default 2 000; at least `retry_backoff_ms_min`).
        retry_backoff_ms_max: u64;
        /// How long a batch is retried after its first send, in ms (default 30 000; at
        /// least 1).
        delivery_timeout_ms: u64;
    }

    /// Checks the settings and returns them.
    ///
    /// # Errors
    /// [`ClientError::InvalidConfig`] naming the first field that cannot work (a zero
    /// limit, a batch too small for one record, a backoff maximum below its minimum),
    /// with its value.
    ///
    /// ```
    /// use shardq::client::{ClientError, ProducerConfig};
    ///
    /// let error = ProducerConfig::builder().batch_records_max(0).build().unwrap_err();
    /// assert!(matches!(
    ///     error,
    ///     ClientError::InvalidConfig { field: "batch_records_max", value: 0 }
    /// ));
    /// assert_eq!(error.to_string(), "invalid client configuration: batch_records_max = 0");
    /// ```
    pub fn build(self) -> Result<ProducerConfig, ClientError> {
        self.config.validate()?;
        Ok(self.config)
    }
}

impl ProducerConfig {
    /// A builder starting from [`ProducerConfig::default`].
    ///
    /// ```
    /// use shardq::client::{Acks, ProducerConfig};
    ///
    /// let config = ProducerConfig::builder()
    ///     .acks(Acks::Memory)
    ///     .linger_ms(0)
    ///     .build()?;
    /// assert_eq!(config.linger_ms, 0);
    /// # Ok::<(), shardq::client::ClientError>(())
    /// ```
    pub fn builder() -> ProducerConfigBuilder {
        ProducerConfigBuilder {
            config: ProducerConfig::default(),
            batches_in_flight_set: false,
        }
    }

    fn validate(&self) -> Result<(), ClientError> {
        let invalid = |field: &'static str, value: usize| {
            Err(ClientError::InvalidConfig {
                field,
                value: value as u64,
            })
        };
        if self.batch_records_max == 0 {
            return invalid("batch_records_max", 0);
        }
        if self.batch_bytes_max < BATCH_HEADER_SIZE + RECORD_OVERHEAD {
            return invalid("batch_bytes_max", self.batch_bytes_max);
        }
        if self.requests_in_flight_max == 0 {
            return invalid("requests_in_flight_max", 0);
        }
        if self.request_bytes_max == 0 {
            return invalid("request_bytes_max", 0);
        }
        let batches_in_flight = self.batches_in_flight_per_partition_max;
        let batches_in_flight_max = if self.idempotent {
            PRODUCER_BATCHES_KEPT
        } else if self.acks == Acks::None {
            // No answers, so no retries: the broker's order is the whole story.
            usize::MAX
        } else {
            1
        };
        if batches_in_flight == 0 || batches_in_flight > batches_in_flight_max {
            return invalid("batches_in_flight_per_partition_max", batches_in_flight);
        }
        if self.buffer_bytes_max == 0 || self.buffer_bytes_max > Semaphore::MAX_PERMITS {
            return invalid("buffer_bytes_max", self.buffer_bytes_max);
        }
        if self.retry_backoff_ms_min == 0 {
            return invalid("retry_backoff_ms_min", 0);
        }
        if self.retry_backoff_ms_max < self.retry_backoff_ms_min {
            return invalid("retry_backoff_ms_max", self.retry_backoff_ms_max as usize);
        }
        if self.delivery_timeout_ms == 0 {
            return invalid("delivery_timeout_ms", 0);
        }
        Ok(())
    }
}

/// A record to send: a value, and optionally a key, headers and a partition.
///
/// ```
/// use shardq::client::ProducerRecord;
///
/// let record = ProducerRecord::new("order 17 paid")
///     .with_key("customer-7")
///     .with_header("trace-id", "4bf92f35");
/// assert_eq!(record.partition, None); // routed by the key's hash
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerRecord {
    /// Routes the record when `partition` is `None`: records of one key go to one
    /// partition ([`crate::placement::partition_for_key`]), so they keep their order.
    /// Default `None` (no key: round-robin).
    pub key: Option<Bytes>,
    /// The payload.
    pub value: Bytes,
    /// Name/value pairs stored with the record, in this order. Default none.
    pub headers: Vec<(String, Bytes)>,
    /// Send to this partition rather than routing by key or round-robin.
    pub partition: Option<u32>,
}

impl ProducerRecord {
    /// A record of `value`, with no key, headers or partition.
    pub fn new(value: impl Into<Bytes>) -> ProducerRecord {
        ProducerRecord {
            value: value.into(),
            ..ProducerRecord::default()
        }
    }

    /// The record with this key (routing by its hash unless a partition is set).
    pub fn with_key(mut self, key: impl Into<Bytes>) -> ProducerRecord {
        self.key = Some(key.into());
        self
    }

    /// The record sent to this partition, whatever its key. A partition the topic does
    /// not have fails the send with [`ClientError::UnknownPartition`].
    pub fn with_partition(mut self, partition: u32) -> ProducerRecord {
        self.partition = Some(partition);
        self
    }

    /// The record with one more header (after those already added).
    pub fn with_header(
        mut self,
        name: impl Into<String>,
        value: impl Into<Bytes>,
    ) -> ProducerRecord {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// Where an acknowledged record landed: what a [`SendHandle`] resolves to.
///
/// The offset is a plain `u64` because a producer with acks `Memory` or `Durable` (the
/// only ones [`Producer::send`] serves) always learns it from the broker's answer. A
/// producer with acks `None` gets no answer, so it sends with
/// [`Producer::send_unacknowledged`] and learns only a [`Sent`]: no type here holds an
/// offset that may be missing. `#[non_exhaustive]`: more of the broker's answer (the
/// append time, say) may come.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecordMetadata {
    /// The topic the record was sent to.
    pub topic: Arc<str>,
    /// The partition it was stored in.
    pub partition: u32,
    /// The record's offset in its partition.
    pub offset: u64,
}

/// A record sent with acks none, as far as the client knows: written to the broker's
/// connection, for this partition. The broker never answers, so nothing says whether it
/// was stored or at which offset. What a [`SentHandle`] resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Sent {
    /// The topic the record was sent to.
    pub topic: Arc<str>,
    /// The partition it was sent to.
    pub partition: u32,
}

/// Resolves to a record's [`RecordMetadata`] once its batch is answered. `.await` it, or
/// call [`SendHandle::wait`]; dropping it does not cancel the send. Returned by
/// [`Producer::send`].
#[derive(Debug, Clone)]
pub struct SendHandle {
    completion: Arc<BatchCompletion>,
    index: u32,
}

impl SendHandle {
    /// The partition the record was routed to.
    pub fn partition(&self) -> u32 {
        self.completion.partition
    }

    fn metadata(
        &self,
        outcome: &Result<Option<u64>, ClientError>,
    ) -> Result<RecordMetadata, ClientError> {
        match outcome {
            Ok(base_offset) => Ok(RecordMetadata {
                topic: self.completion.topic.clone(),
                partition: self.completion.partition,
                offset: base_offset.expect(
                    "a SendHandle comes only from a producer with acks Memory or Durable, whose batches are answered with an offset",
                ) + u64::from(self.index),
            }),
            Err(error) => Err(error.clone()),
        }
    }

    /// The outcome if the batch has been answered, without waiting.
    ///
    /// # Errors
    /// As [`SendHandle::wait`].
    pub fn try_result(&self) -> Option<Result<RecordMetadata, ClientError>> {
        self.completion
            .outcome()
            .map(|outcome| self.metadata(outcome))
    }

    /// Waits until the batch is answered.
    ///
    /// # Errors
    /// [`ClientError::ProduceFailed`] when the batch failed for good (it says whether it
    /// may have been written anyway), shared by every record of the batch.
    ///
    /// # Cancel safety
    /// Cancel safe: the record is sent and retried whether or not anything waits for
    /// it; a dropped wait only loses sight of the outcome.
    pub async fn wait(self) -> Result<RecordMetadata, ClientError> {
        let outcome = self.completion.wait().await;
        self.metadata(outcome)
    }
}

impl IntoFuture for SendHandle {
    type Output = Result<RecordMetadata, ClientError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.wait())
    }
}

/// Resolves to a [`Sent`] once the record's batch is written to the connection (acks
/// none: there is no answer to wait for). `.await` it, or call [`SentHandle::wait`];
/// dropping it does not cancel the send. Returned by [`Producer::send_unacknowledged`].
#[derive(Debug, Clone)]
pub struct SentHandle {
    completion: Arc<BatchCompletion>,
}

impl SentHandle {
    /// The partition the record was routed to.
    pub fn partition(&self) -> u32 {
        self.completion.partition
    }

    fn sent(&self, outcome: &Result<Option<u64>, ClientError>) -> Result<Sent, ClientError> {
        match outcome {
            Ok(_) => Ok(Sent {
                topic: self.completion.topic.clone(),
                partition: self.completion.partition,
            }),
            Err(error) => Err(error.clone()),
        }
    }

    /// The outcome if the batch has been written (or failed), without waiting.
    ///
    /// # Errors
    /// As [`SentHandle::wait`].
    pub fn try_result(&self) -> Option<Result<Sent, ClientError>> {
        self.completion.outcome().map(|outcome| self.sent(outcome))
    }

    /// Waits until the batch is written to the connection.
    ///
    /// # Errors
    /// [`ClientError::ProduceFailed`] when it could not be written (no connection, the
    /// client closed); a refusal by the broker is never heard of.
    ///
    /// # Cancel safety
    /// Cancel safe, as [`SendHandle::wait`].
    pub async fn wait(self) -> Result<Sent, ClientError> {
        let outcome = self.completion.wait().await;
        self.sent(outcome)
    }
}

impl IntoFuture for SentHandle {
    type Output = Result<Sent, ClientError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.wait())
    }
}

/// What the producer knows of a topic's partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TopicRoute {
    pub(super) partition_count: u32,
    next_round_robin: u32,
}

impl TopicRoute {
    pub(super) fn new(partition_count: u32) -> TopicRoute {
        assert!(
            partition_count > 0,
            "a route is only made for a topic with partitions"
        );
        TopicRoute {
            partition_count,
            next_round_robin: 0,
        }
    }

    /// Explicit partition, else the key's hash, else the next partition in turn.
    pub(super) fn choose(
        &mut self,
        topic: &str,
        partition: Option<u32>,
        key: Option<&[u8]>,
    ) -> Result<u32, ClientError> {
        match (partition, key) {
            (Some(partition), _) if partition < self.partition_count => Ok(partition),
            (Some(partition), _) => Err(ClientError::UnknownPartition {
                topic: topic.to_owned(),
                partition,
                partition_count: Some(self.partition_count),
            }),
            (None, Some(key)) => Ok(placement::partition_for_key(key, self.partition_count)),
            (None, None) => {
                let partition = self.next_round_robin % self.partition_count;
                self.next_round_robin = self.next_round_robin.wrapping_add(1);
                Ok(partition)
            }
        }
    }
}

struct ProducerState {
    accumulator: Accumulator,
    routes: HashMap<String, TopicRoute>,
    /// Batches of each request in flight, for flush to wait on.
    in_flight: HashMap<u64, Vec<Arc<BatchCompletion>>>,
    next_request_id: u64,
    /// The first error of a batch answered since the last flush, so that a flush reports
    /// a refusal even when the batch was answered before the flush began.
    unreported_error: Option<ClientError>,
    /// Set by close (or when the last handle drops): no more sends; the sender drains
    /// what is left and stops.
    closing: bool,
    /// Written into every batch when it is first sent; 0 when not idempotent. Replaced
    /// after a batch fails for good (module docs).
    producer_id: u64,
    /// Jitter and replacement producer ids; seeded from the operating system.
    random: Random,
    /// `Client::reconnects` when the limits below were read from the handshake.
    limits_generation: u64,
    /// The broker's largest batch, from the handshake of the connection counted by
    /// `limits_generation`.
    broker_batch_bytes_max: usize,
}

struct ProducerShared {
    client: Client,
    config: ProducerConfig,
    /// `ProducerConfig::batch_bytes_max` as the caller gave it, before it was lowered to
    /// the broker's limit: a broker with a larger limit after a reconnect raises the
    /// producer's back up to it.
    batch_bytes_max_requested: usize,
    state: Mutex<ProducerState>,
    /// Wakes the sender: a batch was sealed, a batch opened (new linger deadline), a
    /// request finished, or the producer is closing.
    wake: Notify,
    /// `buffer_bytes_max` worth of permits, one per byte of records not yet answered.
    budget: Arc<Semaphore>,
    /// `requests_in_flight_max` permits: one per request on the wire. A request waiting
    /// out a retry backoff gives its permit back meanwhile.
    slots: Arc<Semaphore>,
}

impl ProducerShared {
    fn state(&self) -> MutexGuard<'_, ProducerState> {
        // Every mutation under this lock is completed before anything can panic, so a
        // poisoned lock still guards consistent state.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes the broker's largest batch from the current connection's handshake when
    /// the client has reconnected since the last look, and builds new batches to it
    /// (module docs). One atomic load when nothing changed.
    fn refresh_limits(&self, state: &mut ProducerState) {
        let generation = self.client.reconnects();
        if generation == state.limits_generation {
            return;
        }
        // Read after the count, so the handshake is at least as new as the count says.
        state.limits_generation = generation;
        state.broker_batch_bytes_max = self.client.handshake().batch_bytes_max as usize;
        state.accumulator.set_batch_bytes_max(
            self.batch_bytes_max_requested
                .min(state.broker_batch_bytes_max),
        );
    }

    fn begin_close(&self) {
        {
            let mut state = self.state();
            state.closing = true;
            state.accumulator.seal_all();
        }
        // A send waiting for memory is refused now, not once memory frees up.
        self.budget.close();
        self.wake.notify_one();
    }
}

/// Begins closing when the last [`Producer`] clone drops, so the sender task (which
/// holds the shared state) does not outlive its users; records already sent still go
/// out.
struct Owner(Arc<ProducerShared>);

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.begin_close();
    }
}

/// A batching producer over one [`Client`]. Cheap to clone; clones share the batches.
///
/// [`Producer::send`] queues a record in its partition's open batch and returns a
/// [`SendHandle`] at once; a background task sends batches that are full
/// (`batch_bytes_max`, `batch_records_max`) or have waited `linger_ms`, several
/// partitions' batches per request, up to `requests_in_flight_max` requests at once.
///
/// Guarantees:
/// - records of one partition are stored in the order they were sent, with up to
///   `batches_in_flight_per_partition_max` batches of it in flight: requests are written
///   in the order their batches were taken, the broker appends them in that order, and a
///   retried batch goes out again before any later one of its partition;
/// - nothing is stored twice: an idempotent producer (the default) marks each batch with
///   its producer id and sequence, so the broker stores a resent batch once; without
///   idempotence only failures that prove nothing was stored are retried;
/// - a batch that fails retriably (a timeout, a broken connection, the broker stopping
///   or out of disk) is resent, byte for byte, with backoff, until `delivery_timeout_ms`;
///   then its records' handles fail with one [`ClientError::ProduceFailed`] that says
///   whether it may have been stored anyway ([`ClientError::maybe_written`]);
/// - memory is bounded: `send` waits while `buffer_bytes_max` bytes of records are
///   unanswered.
///
/// ```no_run
/// # async fn example() -> Result<(), shardq::client::ClientError> {
/// use shardq::client::{Client, Producer, ProducerConfig, ProducerRecord};
///
/// let client = Client::connect("127.0.0.1:9740").await?;
/// let producer = Producer::new(client, ProducerConfig::default())?;
/// // Queued at once; many sends share a batch.
/// let handle = producer.send("orders", ProducerRecord::new("paid").with_key("c-7")).await?;
/// for index in 0..100 {
///     producer.send("orders", ProducerRecord::new(format!("item {index}"))).await?;
/// }
/// // Waits for the first record's answer (its batch goes out after linger_ms).
/// let metadata = handle.await?;
/// println!("stored at {}/{}", metadata.partition, metadata.offset);
/// // Sends what lingers and waits for every answer; later sends fail with Closed.
/// producer.close().await?;
/// # Ok(())
/// # }
/// ```
///
/// Closing: [`Producer::close`] refuses later sends at once with [`ClientError::Closed`]
/// (on every clone) and waits until every record already sent is answered. Dropping the
/// last clone without closing does the same in the background: the records already sent
/// still go out and their handles still resolve, but nothing waits for them.
#[derive(Clone)]
pub struct Producer {
    shared: Arc<ProducerShared>,
    _owner: Arc<Owner>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (producer_id, closing) = {
            let state = self.shared.state();
            (state.producer_id, state.closing)
        };
        f.debug_struct("Producer")
            .field("client", &self.shared.client)
            .field("config", &self.shared.config)
            .field("producer_id", &producer_id)
            .field("closing", &closing)
            .finish_non_exhaustive()
    }
}

impl Producer {
    /// Starts the sender task; must be called within a tokio runtime.
    /// `batch_bytes_max` is lowered to the broker's own limit (from the handshake), so
    /// full batches are never refused for their size; after a reconnect the new
    /// handshake's limit applies ([`Producer::batch_bytes_max`]).
    ///
    /// # Errors
    /// [`ClientError::InvalidConfig`] for a setting that cannot work;
    /// [`ClientError::Io`] when the operating system's random source (for the producer
    /// id) fails.
    pub fn new(client: Client, mut config: ProducerConfig) -> Result<Producer, ClientError> {
        let batch_bytes_max_requested = config.batch_bytes_max;
        // Read before the handshake: a reconnect in between is seen at the next look.
        let limits_generation = client.reconnects();
        let broker_batch_bytes_max = client.handshake().batch_bytes_max as usize;
        config.batch_bytes_max = config.batch_bytes_max.min(broker_batch_bytes_max);
        config.validate()?;
        let mut random = Random::from_os(&client)?;
        let producer_id = if config.idempotent {
            random.producer_id()
        } else {
            PRODUCER_ID_NONE
        };
        let limits = AccumulatorLimits {
            batch_records_max: config.batch_records_max,
            batch_bytes_max: config.batch_bytes_max,
            linger: Duration::from_millis(config.linger_ms),
            in_flight_per_partition_max: config.batches_in_flight_per_partition_max,
        };
        let shared = Arc::new(ProducerShared {
            client,
            batch_bytes_max_requested,
            budget: Arc::new(Semaphore::new(config.buffer_bytes_max)),
            slots: Arc::new(Semaphore::new(config.requests_in_flight_max)),
            config,
            state: Mutex::new(ProducerState {
                accumulator: Accumulator::new(limits),
                routes: HashMap::new(),
                in_flight: HashMap::new(),
                next_request_id: 0,
                unreported_error: None,
                closing: false,
                producer_id,
                random,
                limits_generation,
                broker_batch_bytes_max,
            }),
            wake: Notify::new(),
        });
        tokio::spawn(run_sender(shared.clone()));
        Ok(Producer {
            _owner: Arc::new(Owner(shared.clone())),
            shared,
        })
    }

    /// The settings as in force at the start (`batch_bytes_max` lowered to the first
    /// broker's limit; see [`Producer::batch_bytes_max`] for the one in force now).
    pub fn config(&self) -> &ProducerConfig {
        &self.shared.config
    }

    /// The size new batches are sealed at now: `ProducerConfig::batch_bytes_max`, lowered
    /// to the broker's largest batch from the handshake of the client's current
    /// connection (it follows reconnects to brokers with other limits).
    pub fn batch_bytes_max(&self) -> usize {
        let mut state = self.shared.state();
        self.shared.refresh_limits(&mut state);
        state.accumulator.batch_bytes_max()
    }

    /// The producer id new batches are sent with (0 when not idempotent). It changes
    /// after a batch fails for good.
    pub fn producer_id(&self) -> u64 {
        self.shared.state().producer_id
    }

    /// Routes and queues a record. Waits only for memory (`buffer_bytes_max`) and, the
    /// first time a topic is used, for its metadata. The returned handle resolves when
    /// the record's batch is answered, to the record's offset.
    ///
    /// # Errors
    /// [`ClientError::InvalidConfig`] naming `acks` when the producer's acks are `None`
    /// (no answer will come, so there is no offset to resolve to: use
    /// [`Producer::send_unacknowledged`]); [`ClientError::Closed`] after a close;
    /// [`ClientError::UnknownTopic`] / [`ClientError::UnknownPartition`] for a topic or
    /// explicit partition the broker does not have (after one metadata refresh); the
    /// metadata request's own errors. A failure to store the record is not an error of
    /// `send` but of its handle.
    ///
    /// # Cancel safety
    /// Cancel safe: the record is queued in the same step in which `send` returns, so a
    /// `send` dropped before it returns (while it waits for memory or for metadata) has
    /// queued nothing. Dropping the returned [`SendHandle`] does not unsend the record.
    pub async fn send(
        &self,
        topic: &str,
        record: ProducerRecord,
    ) -> Result<SendHandle, ClientError> {
        if self.shared.config.acks == Acks::None {
            return Err(ClientError::InvalidConfig {
                field: "acks",
                value: Acks::None as u64,
            });
        }
        let (completion, index) = self.enqueue(topic, record).await?;
        Ok(SendHandle { completion, index })
    }

    /// Routes and queues a record for a producer whose acks are `None`, as
    /// [`Producer::send`] does. The returned handle resolves once the record's batch is
    /// written to the connection: the broker never answers, so a refusal or a failure to
    /// store it is not heard of (the broker only logs it).
    ///
    /// # Errors
    /// [`ClientError::InvalidConfig`] naming `acks` (with its value) when the producer's
    /// acks are not `None` (its answers carry offsets: use [`Producer::send`]); the rest
    /// as [`Producer::send`].
    ///
    /// # Cancel safety
    /// As [`Producer::send`].
    pub async fn send_unacknowledged(
        &self,
        topic: &str,
        record: ProducerRecord,
    ) -> Result<SentHandle, ClientError> {
        let acks = self.shared.config.acks;
        if acks != Acks::None {
            return Err(ClientError::InvalidConfig {
                field: "acks",
                value: acks as u64,
            });
        }
        let (completion, _index) = self.enqueue(topic, record).await?;
        Ok(SentHandle { completion })
    }

    /// Routes and appends a record to its partition's open batch (the body of both sends).
    async fn enqueue(
        &self,
        topic: &str,
        record: ProducerRecord,
    ) -> Result<(Arc<BatchCompletion>, u32), ClientError> {
        let headers: Vec<(&str, &[u8])> = record
            .headers
            .iter()
            .map(|(name, value)| (name.as_str(), &value[..]))
            .collect();
        // Refused at once after a close, not after waiting for memory.
        if self.shared.state().closing || self.shared.client.is_closed() {
            return Err(ClientError::Closed);
        }
        let key = record.key.as_deref();
        let size = BatchBuilder::record_size(key, &record.value, &headers);
        // A record larger than the whole budget takes all of it rather than waiting forever.
        let cost = size
            .min(self.shared.config.buffer_bytes_max)
            .min(u32::MAX as usize) as u32;
        let budget = match self.shared.budget.clone().acquire_many_owned(cost).await {
            Ok(budget) => budget,
            Err(_closed) => return Err(ClientError::Closed),
        };
        let append = AppendRecord {
            timestamp_ms: now_ms(),
            key,
            value: &record.value,
            headers: &headers,
        };
        let mut budget = Some(budget);
        let mut refreshed = false;
        loop {
            {
                let mut state = self.shared.state();
                if state.closing {
                    return Err(ClientError::Closed);
                }
                self.shared.refresh_limits(&mut state);
                if let Some(route) = state.routes.get_mut(topic) {
                    match route.choose(topic, record.partition, key) {
                        Ok(partition) => {
                            let outcome = state.accumulator.append(
                                topic,
                                partition,
                                &append,
                                budget.take(),
                                Instant::now(),
                            );
                            drop(state);
                            if outcome.sealed || outcome.index == 0 {
                                self.shared.wake.notify_one();
                            }
                            return Ok((outcome.completion, outcome.index));
                        }
                        Err(error) if refreshed => return Err(error),
                        // Perhaps the topic was recreated with more partitions.
                        Err(_stale) => {
                            state.routes.remove(topic);
                        }
                    }
                }
            }
            if refreshed {
                return Err(ClientError::UnknownTopic {
                    topic: topic.to_owned(),
                });
            }
            refreshed = true;
            let route = self.fetch_route(topic).await?;
            self.shared.state().routes.insert(topic.to_owned(), route);
        }
    }

    async fn fetch_route(&self, topic: &str) -> Result<TopicRoute, ClientError> {
        let metadata = self.shared.client.metadata(&[topic]).await?;
        let entry = metadata
            .topics
            .into_iter()
            .find(|entry| entry.name == topic);
        match entry {
            Some(entry) => match entry.error {
                Some(error) => Err(ClientError::refusal(topic, None, error)),
                None if entry.partitions.is_empty() => Err(ClientError::UnknownTopic {
                    topic: topic.to_owned(),
                }),
                None => Ok(TopicRoute::new(entry.partitions.len() as u32)),
            },
            None => Err(ClientError::UnknownTopic {
                topic: topic.to_owned(),
            }),
        }
    }

    /// Sends every record queued so far, without waiting for linger, and waits until all
    /// of them are answered (with acks `None`: written).
    ///
    /// # Errors
    /// The first error of a batch that failed since the previous flush returned (a
    /// [`ClientError::ProduceFailed`]; each handle still carries its own outcome), even
    /// one that failed before this flush began. `Ok` means every batch answered since
    /// then succeeded.
    ///
    /// # Cancel safety
    /// Cancel safe: the batches go out whether or not the flush is awaited, and an error
    /// not yet reported is kept for the next flush.
    pub async fn flush(&self) -> Result<(), ClientError> {
        let completions: Vec<Arc<BatchCompletion>> = {
            let mut state = self.shared.state();
            state.accumulator.seal_all();
            let mut completions = state.accumulator.sealed_completions();
            completions.extend(state.in_flight.values().flatten().cloned());
            completions
        };
        self.shared.wake.notify_one();
        for completion in completions {
            // Errors are collected by the request that answered them, below.
            let _ = completion.wait().await;
        }
        match self.shared.state().unreported_error.take() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Refuses further sends (on every clone, with [`ClientError::Closed`]), then
    /// flushes: sends what is queued and waits for every answer. The [`Client`] stays
    /// open for other users.
    ///
    /// # Errors
    /// As [`Producer::flush`].
    ///
    /// # Cancel safety
    /// The producer is closed from the first poll on; a dropped `close` leaves the queued
    /// records going out in the background, as dropping the producer does.
    pub async fn close(&self) -> Result<(), ClientError> {
        self.shared.begin_close();
        self.flush().await
    }
}

fn now_ms() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(elapsed) => elapsed.as_millis() as i64,
        // A clock before 1970 is a misconfigured host; the broker stamps its own time.
        Err(_before_epoch) => 0,
    }
}

/// The sender task: waits for an in-flight slot, then for sendable batches (or a linger
/// or retry deadline), and hands one request at a time to the connection, in the order
/// it took them: that order, with the broker's (docs/protocol.md §5.5), is what keeps a
/// partition's batches in order with several in flight. A task per request then waits
/// for the answer. Stops once closing and drained.
async fn run_sender(shared: Arc<ProducerShared>) {
    let delivery_timeout = Duration::from_millis(shared.config.delivery_timeout_ms);
    loop {
        let slot = match shared.slots.clone().acquire_owned().await {
            Ok(slot) => slot,
            Err(_closed) => unreachable!("the in-flight semaphore is never closed"),
        };
        let (request_id, mut batches) = loop {
            let notified = shared.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let deadline = {
                let mut state = shared.state();
                shared.refresh_limits(&mut state);
                let now = Instant::now();
                state.accumulator.seal_expired(now);
                let producer_id = state.producer_id;
                let batches = state.accumulator.take_request(
                    shared.config.request_bytes_max,
                    producer_id,
                    now,
                );
                if !batches.is_empty() {
                    let request_id = state.next_request_id;
                    state.next_request_id += 1;
                    let completions = batches
                        .iter()
                        .map(|batch| batch.completion.clone())
                        .collect();
                    state.in_flight.insert(request_id, completions);
                    break (request_id, batches);
                }
                if state.closing && state.accumulator.is_empty() {
                    return;
                }
                match (
                    state.accumulator.next_deadline(),
                    state.accumulator.next_retry(),
                ) {
                    (Some(linger), Some(retry)) => Some(linger.min(retry)),
                    (linger, retry) => linger.or(retry),
                }
            };
            match deadline {
                Some(deadline) => {
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep_until(deadline.into()) => {}
                    }
                }
                None => notified.await,
            }
        };
        let reconnects = shared.client.config().reconnect;
        // The delivery timeout counts from the first try, waiting for a reconnect included.
        let started = Instant::now();
        for batch in &mut batches {
            batch.first_sent.get_or_insert(started);
            batch.attempts += 1;
        }
        // Reconnect first (if needed), so the batches are checked against the limits of
        // the broker they go to. Waited on no longer than the oldest batch may live: the
        // reconnect goes on in its own task, and the batches fail as not written.
        let oldest = batches
            .iter()
            .filter_map(|batch| batch.first_sent)
            .min()
            .unwrap_or(started);
        let connected = tokio::time::timeout_at(
            (oldest + delivery_timeout).into(),
            shared.client.connected(),
        )
        .await
        .unwrap_or_else(|_elapsed| {
            Err(ClientError::Connect {
                address: shared.client.address().to_owned(),
                source: Arc::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no connection within the producer's delivery timeout",
                )),
            })
        });
        // Nothing of this try left when there was no connection to send it on.
        let broken_before = connected.is_err()
            || shared.client.is_closed()
            || (!reconnects && shared.client.is_broken());
        let start = match connected {
            Ok(()) => {
                let too_large = take_too_large(&shared, &mut batches);
                hand_answers(&shared, too_large);
                if batches.is_empty() {
                    shared.state().in_flight.remove(&request_id);
                    shared.wake.notify_one();
                    continue;
                }
                // Handed to the connection here, in take order.
                let request = build_request(&shared.config, &batches);
                shared.client.start_produce(request).await
            }
            Err(error) => Err(error),
        };
        tokio::spawn(finish_request(
            shared.clone(),
            request_id,
            batches,
            start,
            broken_before,
            slot,
        ));
    }
}

fn build_request(config: &ProducerConfig, batches: &[SealedBatch]) -> ProduceRequest {
    let mut topics: Vec<ProduceTopic> = Vec::new();
    for batch in batches {
        let partition = ProducePartition {
            partition: batch.partition,
            batch: batch.batch.clone(),
        };
        match topics.iter_mut().find(|topic| *topic.name == *batch.topic) {
            Some(topic) => topic.partitions.push(partition),
            None => topics.push(ProduceTopic {
                name: batch.topic.to_string(),
                partitions: vec![partition],
            }),
        }
    }
    ProduceRequest {
        acks: config.acks,
        timeout_ms: config.request_timeout_ms,
        topics,
    }
}

/// The outcome of one batch from the request's result.
fn batch_outcome(
    batch: &SealedBatch,
    result: &Result<Option<ProduceResponse>, ClientError>,
) -> Result<Option<u64>, ClientError> {
    let response = match result {
        Ok(None) => return Ok(None),
        Ok(Some(response)) => response,
        Err(error) => return Err(error.clone()),
    };
    let found = response
        .topics
        .iter()
        .filter(|topic| *topic.name == *batch.topic)
        .flat_map(|topic| topic.partitions.iter())
        .find(|partition| partition.partition == batch.partition);
    match found {
        Some(partition) => match &partition.result {
            Ok(base_offset) => Ok(Some(*base_offset)),
            Err(error) => Err(ClientError::refusal(
                &batch.topic,
                Some(batch.partition),
                error.clone(),
            )),
        },
        None => Err(ClientError::UnexpectedResponse {
            correlation_id: 0,
            reason: format!(
                "produce response has no result for topic {:?} partition {}",
                batch.topic, batch.partition
            ),
        }),
    }
}

/// What one failed attempt says about a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Verdict {
    /// Sending the same bytes again may succeed.
    retriable: bool,
    /// This attempt may have stored the batch.
    maybe_written: bool,
}

/// Reads a failed attempt. `broken_before` says the request could not have left: the
/// client was closed, or its connection broken with reconnecting off. `reconnects` says
/// the client opens a new connection for the next attempt.
fn verdict(error: &ClientError, broken_before: bool, reconnects: bool) -> Verdict {
    let verdict = |retriable, maybe_written| Verdict {
        retriable,
        maybe_written,
    };
    match error {
        // No answer in time: the broker may have stored it and lost only the answer.
        ClientError::Timeout { .. } => verdict(true, true),
        // The whole request refused before anything was done.
        ClientError::Broker(error) => match error.code {
            ErrorCode::ShuttingDown => verdict(true, false),
            ErrorCode::StorageError | ErrorCode::Internal | ErrorCode::Timeout => {
                verdict(error.code == ErrorCode::Timeout, true)
            }
            _ => verdict(false, false),
        },
        ClientError::PartitionRefused { error, .. } => match error.code {
            // Appended, not (yet) durable: it may still become durable.
            ErrorCode::Timeout => verdict(true, true),
            // The partition closed; an append already made may have been flushed.
            ErrorCode::ShuttingDown => verdict(true, true),
            // Refused before append: nothing was stored (protocol.md §6).
            ErrorCode::StorageFull => verdict(true, false),
            // A stopped partition may hold what it wrote before it stopped.
            ErrorCode::StorageError | ErrorCode::Internal => verdict(false, true),
            _ => verdict(false, false),
        },
        // The connection broke, perhaps after the request was written; the next attempt
        // goes out on a new connection if the client reconnects.
        ClientError::Disconnected { .. } => {
            verdict(reconnects && error.is_connection_lost(), !broken_before)
        }
        ClientError::Io { .. } => verdict(reconnects, !broken_before),
        // Refused before anything was appended (protocol.md §6).
        ClientError::UnknownTopic { .. } | ClientError::UnknownPartition { .. } => {
            verdict(false, false)
        }
        // No connection could be opened, so this attempt never left.
        ClientError::Connect { .. } => verdict(reconnects, false),
        ClientError::Closed => verdict(false, !broken_before),
        _ => verdict(false, true),
    }
}

/// The wait before retry number `retry` (1 for the first): full jitter over
/// `[0, min(max, min * 2^(retry-1))]`, from a caller's random value.
fn backoff(retry: u32, min_ms: u64, max_ms: u64, random: u64) -> Duration {
    let cap = min_ms
        .checked_shl(retry.saturating_sub(1))
        .filter(|cap| *cap >> retry.saturating_sub(1) == min_ms)
        .unwrap_or(u64::MAX)
        .min(max_ms);
    // `cap + 1` wraps to 0 only for a cap of u64::MAX, where any value is in range.
    Duration::from_millis(random.checked_rem(cap.wrapping_add(1)).unwrap_or(random))
}

/// A small generator for jitter and new producer ids, seeded from the operating system
/// (getrandom(2)). Ids need no more: the seed is random, and ids of different producers
/// come from independent seeds.
struct Random(u64);

impl Random {
    fn from_os(client: &Client) -> Result<Random, ClientError> {
        let mut seed = [0u8; 8];
        getrandom::getrandom(&mut seed).map_err(|error| ClientError::Io {
            context: "reading the operating system's random source for a producer id",
            peer: client.peer_address(),
            source: Arc::new(match error.raw_os_error() {
                Some(code) => std::io::Error::from_raw_os_error(code),
                None => std::io::Error::other(error.to_string()),
            }),
        })?;
        Ok(Random(u64::from_le_bytes(seed) | 1))
    }

    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn producer_id(&mut self) -> u64 {
        loop {
            let id = self.next();
            if id != PRODUCER_ID_NONE {
                return id;
            }
        }
    }
}

/// Waits for the answer of a request handed to the connection (or takes the error that
/// kept it from going) and gives each batch's answer to the accumulator, which settles
/// the batches that are done and queues again the ones to retry (module docs).
async fn finish_request(
    shared: Arc<ProducerShared>,
    request_id: u64,
    batches: Vec<SealedBatch>,
    start: Result<StartedProduce, ClientError>,
    broken_before: bool,
    slot: OwnedSemaphorePermit,
) {
    let result = match start {
        Ok(started) => started.wait().await,
        Err(error) => Err(error),
    };
    drop(slot);
    answer(&shared, batches, &result, broken_before);
    shared.state().in_flight.remove(&request_id);
    shared.wake.notify_one();
}

/// Reads each batch's outcome from `result` (a request's, or an error that kept the
/// batches from going, with `broken_before` saying they did not leave) and hands it to
/// the accumulator; settles what that finishes.
fn answer(
    shared: &ProducerShared,
    batches: Vec<SealedBatch>,
    result: &Result<Option<ProduceResponse>, ClientError>,
    broken_before: bool,
) {
    let reconnects = shared.client.config().reconnect;
    let answers = batches
        .into_iter()
        .map(|mut batch| {
            let answer = match batch_outcome(&batch, result) {
                Ok(offset) => Answer::Stored(offset),
                Err(error) => {
                    let verdict = verdict(&error, broken_before, reconnects);
                    batch.maybe_written |= verdict.maybe_written;
                    if shared.config.idempotent
                        && error.wire_code() == Some(ErrorCode::OutOfOrderSequence)
                    {
                        Answer::OutOfOrder(error)
                    } else if verdict.retriable
                        && shared.config.acks != Acks::None
                        && (shared.config.idempotent || !batch.maybe_written)
                    {
                        Answer::Retriable(error)
                    } else {
                        Answer::Failed(error)
                    }
                }
            };
            (batch, answer)
        })
        .collect();
    hand_answers(shared, answers);
}

/// Gives the accumulator each batch's answer, with the backoff it waits if sent again,
/// and settles the batches that are done.
fn hand_answers(shared: &ProducerShared, answers: Vec<(SealedBatch, Answer)>) {
    if answers.is_empty() {
        return;
    }
    let delivery_timeout = Duration::from_millis(shared.config.delivery_timeout_ms);
    let mut settled = Vec::new();
    {
        let mut state = shared.state();
        for (batch, answer) in answers {
            let random = state.random.next();
            let delay = backoff(
                batch.attempts,
                shared.config.retry_backoff_ms_min,
                shared.config.retry_backoff_ms_max,
                random,
            );
            let done =
                state
                    .accumulator
                    .answered(batch, answer, Instant::now() + delay, delivery_timeout);
            settled.extend(done);
        }
    }
    settle(shared, settled);
}

/// Takes out of `batches` those bigger than the broker's largest batch on the current
/// connection, each failed for good with [`ClientError::BatchTooLarge`] (module docs);
/// `maybe_written` stays as earlier attempts left it. Allocates only when one is found.
fn take_too_large(
    shared: &ProducerShared,
    batches: &mut Vec<SealedBatch>,
) -> Vec<(SealedBatch, Answer)> {
    let limit = {
        let mut state = shared.state();
        shared.refresh_limits(&mut state);
        state.broker_batch_bytes_max
    };
    if batches.iter().all(|batch| batch.batch.len() <= limit) {
        return Vec::new();
    }
    let (fit, too_large): (Vec<SealedBatch>, Vec<SealedBatch>) = std::mem::take(batches)
        .into_iter()
        .partition(|batch| batch.batch.len() <= limit);
    *batches = fit;
    too_large
        .into_iter()
        .map(|batch| {
            let error = ClientError::BatchTooLarge {
                topic: batch.topic.to_string(),
                partition: batch.partition,
                size_bytes: batch.batch.len() as u64,
                limit_bytes: limit as u64,
            };
            (batch, Answer::Failed(error))
        })
        .collect()
}

/// Resolves the handles of batches that are done and frees their partitions.
fn settle(shared: &ProducerShared, settled: Vec<(SealedBatch, Result<Option<u64>, ClientError>)>) {
    if settled.is_empty() {
        return;
    }
    let mut stale_topics = Vec::new();
    let mut failed_for_good = false;
    for (batch, outcome) in &settled {
        if let Err(error) = outcome {
            failed_for_good = true;
            if matches!(
                error.wire_code(),
                Some(ErrorCode::UnknownTopic | ErrorCode::UnknownPartition)
            ) {
                stale_topics.push(batch.topic.clone());
            }
        }
    }
    // Recorded before any handle resolves, so a flush that wakes on one of them sees it.
    if let Some(error) = settled
        .iter()
        .find_map(|(_, outcome)| outcome.as_ref().err())
    {
        shared
            .state()
            .unreported_error
            .get_or_insert_with(|| error.clone());
    }
    for (batch, outcome) in &settled {
        batch.completion.complete(outcome.clone());
    }
    {
        let mut state = shared.state();
        for topic in stale_topics {
            state.routes.remove(&*topic);
        }
        if failed_for_good && shared.config.idempotent {
            // The broker may or may not hold the failed batch, so neither its sequence
            // nor the next one is sure to be accepted under this id; a new id is.
            state.producer_id = state.random.producer_id();
        }
    }
    // Return the memory budget before waking anyone.
    drop(settled);
    shared.wake.notify_one();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::WireError;

    #[test]
    fn explicit_partition_wins_and_is_checked() {
        let mut route = TopicRoute::new(4);
        assert_eq!(route.choose("t", Some(3), Some(b"k")).unwrap(), 3);
        assert!(matches!(
            route.choose("t", Some(4), None),
            Err(ClientError::UnknownPartition {
                partition: 4,
                partition_count: Some(4),
                ..
            })
        ));
    }

    #[test]
    fn keyed_records_follow_placement_and_unkeyed_round_robin() {
        let mut route = TopicRoute::new(3);
        for key in [&b"alpha"[..], b"beta", b""] {
            let expected = placement::partition_for_key(key, 3);
            assert_eq!(route.choose("t", None, Some(key)).unwrap(), expected);
            assert_eq!(
                route.choose("t", None, Some(key)).unwrap(),
                expected,
                "stable per key"
            );
        }
        let chosen: Vec<u32> = (0..7)
            .map(|_| route.choose("t", None, None).unwrap())
            .collect();
        assert_eq!(chosen, vec![0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn builder_refuses_each_limit_that_cannot_work_by_name() {
        assert!(ProducerConfig::builder().build().is_ok());
        let builder = ProducerConfig::builder;
        crate::client::assert_each_refused([
            (
                builder().batch_records_max(0).build(),
                "batch_records_max",
                0,
            ),
            (builder().batch_bytes_max(10).build(), "batch_bytes_max", 10),
            (
                builder().requests_in_flight_max(0).build(),
                "requests_in_flight_max",
                0,
            ),
            (
                builder().request_bytes_max(0).build(),
                "request_bytes_max",
                0,
            ),
            (builder().buffer_bytes_max(0).build(), "buffer_bytes_max", 0),
            (
                builder().retry_backoff_ms_min(0).build(),
                "retry_backoff_ms_min",
                0,
            ),
            (
                builder().retry_backoff_ms_max(10).build(),
                "retry_backoff_ms_max",
                10,
            ),
            (
                builder().delivery_timeout_ms(0).build(),
                "delivery_timeout_ms",
                0,
            ),
            (
                builder().batches_in_flight_per_partition_max(0).build(),
                "batches_in_flight_per_partition_max",
                0,
            ),
            // Past the broker's memory of a producer's batches.
            (
                builder()
                    .batches_in_flight_per_partition_max(PRODUCER_BATCHES_KEPT + 1)
                    .build(),
                "batches_in_flight_per_partition_max",
                PRODUCER_BATCHES_KEPT as u64 + 1,
            ),
            // Not idempotent, with answers, and more asked for: its retries could
            // reorder.
            (
                builder()
                    .batches_in_flight_per_partition_max(2)
                    .idempotent(false)
                    .build(),
                "batches_in_flight_per_partition_max",
                2,
            ),
            (
                builder()
                    .idempotent(false)
                    .acks(Acks::Memory)
                    .batches_in_flight_per_partition_max(2)
                    .build(),
                "batches_in_flight_per_partition_max",
                2,
            ),
        ]);
        // Turning idempotence off without asking for a number gives 1, and back on the
        // default again.
        let config = builder().idempotent(false).build().unwrap();
        assert_eq!(config.batches_in_flight_per_partition_max, 1);
        let config = builder()
            .idempotent(false)
            .idempotent(true)
            .build()
            .unwrap();
        assert_eq!(
            config.batches_in_flight_per_partition_max,
            BATCHES_IN_FLIGHT_PER_PARTITION_DEFAULT
        );
        // The edges that do work: the broker's memory, and any number without answers.
        assert!(builder()
            .batches_in_flight_per_partition_max(PRODUCER_BATCHES_KEPT)
            .build()
            .is_ok());
        assert!(builder()
            .idempotent(false)
            .acks(Acks::None)
            .batches_in_flight_per_partition_max(64)
            .build()
            .is_ok());
        // The edges that do work.
        let config = builder()
            .batch_records_max(1)
            .batch_bytes_max(BATCH_HEADER_SIZE + RECORD_OVERHEAD)
            .retry_backoff_ms_min(7)
            .retry_backoff_ms_max(7)
            .linger_ms(0)
            .acks(Acks::Memory)
            .idempotent(false)
            .batches_in_flight_per_partition_max(1)
            .build()
            .unwrap();
        assert_eq!(
            (config.batch_records_max, config.batch_bytes_max),
            (1, BATCH_HEADER_SIZE + RECORD_OVERHEAD)
        );
        assert_eq!(
            (config.linger_ms, config.acks, config.idempotent),
            (0, Acks::Memory, false)
        );
    }

    #[test]
    fn backoff_is_full_jitter_under_an_exponential_cap() {
        // Retry n waits at most min(max, min * 2^(n-1)), and anything from 0 up to it.
        for (retry, cap) in [
            (1, 50),
            (2, 100),
            (3, 200),
            (6, 1_600),
            (7, 2_000),
            (64, 2_000),
        ] {
            assert_eq!(
                backoff(retry, 50, 2_000, cap),
                Duration::from_millis(cap),
                "retry {retry}"
            );
            assert_eq!(backoff(retry, 50, 2_000, cap + 1), Duration::ZERO);
            for random in [0, 7, 12_345, u64::MAX] {
                assert!(backoff(retry, 50, 2_000, random) <= Duration::from_millis(cap));
            }
        }
        assert_eq!(
            backoff(200, u64::MAX / 2, u64::MAX, 5),
            Duration::from_millis(5)
        );
    }

    #[test]
    fn verdicts_separate_retriable_from_final_and_written_from_not() {
        let refused = |code| ClientError::PartitionRefused {
            topic: "t".into(),
            partition: 0,
            error: WireError::new(code, "x"),
        };
        let timeout = ClientError::Timeout {
            operation: "produce",
            timeout_ms: 1,
        };
        let disconnected = ClientError::Disconnected {
            peer: "127.0.0.1:1".parse().unwrap(),
            cause: Arc::new(ClientError::Closed),
        };
        let cases = [
            (timeout, false, (true, true)),
            (refused(ErrorCode::Timeout), false, (true, true)),
            (refused(ErrorCode::ShuttingDown), false, (true, true)),
            (refused(ErrorCode::StorageFull), false, (true, false)),
            (
                refused(ErrorCode::OutOfOrderSequence),
                false,
                (false, false),
            ),
            (refused(ErrorCode::InvalidBatch), false, (false, false)),
            (
                ClientError::refusal("t", Some(0), WireError::new(ErrorCode::UnknownTopic, "x")),
                false,
                (false, false),
            ),
            (
                ClientError::refusal(
                    "t",
                    Some(9),
                    WireError::new(ErrorCode::UnknownPartition, "x"),
                ),
                false,
                (false, false),
            ),
            (refused(ErrorCode::StorageError), false, (false, true)),
            (
                ClientError::Broker(WireError::new(ErrorCode::ShuttingDown, "x")),
                false,
                (true, false),
            ),
            (disconnected.clone(), false, (false, true)),
            (disconnected, true, (false, false)),
            (ClientError::Closed, false, (false, true)),
            (ClientError::Closed, true, (false, false)),
        ];
        for (error, broken_before, (retriable, maybe_written)) in cases {
            assert_eq!(
                verdict(&error, broken_before, false),
                Verdict {
                    retriable,
                    maybe_written
                },
                "{error}"
            );
        }
        // With reconnecting on, a lost connection is retried on the next one; a batch
        // whose connection could not even be opened was not written; a connection given
        // up over bytes that made no sense is not retried (the next would break alike).
        let peer: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        let disconnected = ClientError::Disconnected {
            peer,
            cause: Arc::new(ClientError::Io {
                context: "reading responses",
                peer,
                source: Arc::new(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
            }),
        };
        let garbled = ClientError::Disconnected {
            peer,
            cause: Arc::new(ClientError::Protocol(
                crate::protocol::ProtocolError::UnsupportedVersion { version: 9 },
            )),
        };
        let connect = ClientError::Connect {
            address: "127.0.0.1:1".into(),
            source: Arc::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        };
        for (error, broken_before, (retriable, maybe_written)) in [
            (disconnected, false, (true, true)),
            (garbled, false, (false, true)),
            (connect, false, (true, false)),
            (ClientError::Closed, true, (false, false)),
        ] {
            assert_eq!(
                verdict(&error, broken_before, true),
                Verdict {
                    retriable,
                    maybe_written
                },
                "{error} (reconnecting)"
            );
        }
    }
}
