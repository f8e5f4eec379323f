//! Reading: one-partition fetch helpers and a simple [`Consumer`] that tracks the next
//! offset of several partitions and polls them all with one Fetch request.
//!
//! Contract: records come back in offset order per partition, each batch's CRC32C
//! checked; a position advances only past records returned to the caller, so an error
//! from `poll` loses nothing (the next poll fetches the same offsets again).
//!
//! Stream groups: with `ConsumerConfig::group` set, `assign_from` and `assign_topic`
//! start each partition at the group's committed offset (moved into the stored range if
//! retention overtook it), and only where the group never committed at the `StartPosition`
//! given. `commit` records every position that moved since the last commit; with
//! `auto_commit_interval` set, `poll` does that itself before fetching, at most that
//! often. A poll's positions are those past every record handed out by earlier polls, so
//! what is committed is what the caller has had (and, at the next poll, is taken to have
//! processed): after a crash the group re-reads at most what was handed out since the last
//! commit (at-least-once).

use std::collections::VecDeque;
use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_core::Stream;

use super::groups::CommittedPosition;
use super::{Client, ClientError};
use crate::protocol::batch::{decode_records, Record};
use crate::protocol::{
    ErrorCode, FetchPartition, FetchRequest, FetchResponse, FetchTopic, TIMESTAMP_EARLIEST,
    TIMESTAMP_LATEST,
};

/// Records of one partition from one fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedRecords {
    /// At or after the requested offset, in offset order.
    pub records: Vec<Record>,
    /// One past the last offset a consumer may read now.
    pub high_watermark: u64,
    /// The first offset still stored.
    pub log_start_offset: u64,
}

/// Finds one partition in a fetch response and decodes its records from `offset` on.
///
/// # Errors
/// [`ClientError::OffsetOutOfRange`] when `offset` is outside the stored range;
/// [`ClientError::UnknownTopic`] / [`ClientError::UnknownPartition`] or
/// [`ClientError::PartitionRefused`] for the partition's refusal;
/// [`ClientError::Batch`] for a batch that fails its CRC or framing check;
/// [`ClientError::UnexpectedResponse`] when the response has no such partition.
pub fn fetch_records_from_response(
    response: &FetchResponse,
    topic: &str,
    partition: u32,
    offset: u64,
) -> Result<FetchedRecords, ClientError> {
    let found = response
        .topics
        .iter()
        .filter(|entry| entry.name == topic)
        .flat_map(|entry| entry.partitions.iter())
        .find(|entry| entry.partition == partition);
    let Some(found) = found else {
        return Err(ClientError::UnexpectedResponse {
            correlation_id: 0,
            reason: format!(
                "fetch response has no result for topic {topic:?} partition {partition}"
            ),
        });
    };
    let data = &found.data;
    let batches = match &data.batches {
        Ok(batches) => batches,
        Err(error) if error.code == ErrorCode::OffsetOutOfRange => {
            return Err(ClientError::OffsetOutOfRange {
                topic: topic.to_owned(),
                partition,
                requested: offset,
                log_start_offset: data.log_start_offset,
                high_watermark: data.high_watermark,
            })
        }
        Err(error) => return Err(ClientError::refusal(topic, Some(partition), error.clone())),
    };
    let mut records = Vec::new();
    decode_records(batches, offset, &mut records).map_err(|source| ClientError::Batch {
        topic: topic.to_owned(),
        partition,
        source,
    })?;
    Ok(FetchedRecords {
        records,
        high_watermark: data.high_watermark,
        log_start_offset: data.log_start_offset,
    })
}

/// Where a consumer starts reading a partition.
///
/// `#[non_exhaustive]`: more ways to start (say, some records before the end) may come,
/// so a `match` needs a wildcard arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StartPosition {
    /// The first offset still stored.
    Beginning,
    /// The high watermark: only records produced from now on.
    End,
    /// This offset, as given (the broker is not asked; a fetch outside the stored range
    /// fails with [`ClientError::OffsetOutOfRange`]).
    Offset(u64),
    /// The first record with a timestamp at or after this time (ms since the epoch; a
    /// time before the epoch is the epoch); the high watermark when there is none.
    Time(i64),
}

/// Which offset [`Client::list_offsets`] asks the broker for, per partition.
///
/// A separate type from [`StartPosition`] because every query here is answered by the
/// broker (an offset the caller already knows needs no request). `#[non_exhaustive]`:
/// more queries (the largest timestamp, say) may come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OffsetQuery {
    /// The first offset still stored (`log_start_offset`).
    Earliest,
    /// The offset the next record will get (`high_watermark`).
    Latest,
    /// The first offset whose record timestamp is at or after this time (ms since the
    /// epoch), or the high watermark when no record is that late. A time before the
    /// epoch asks for the epoch: no record is stamped earlier.
    Time(i64),
}

impl OffsetQuery {
    /// The protocol's encoding: -2 and -1 for the ends, else the time. A negative time
    /// would read as one of the ends (or be refused), so it goes out as 0, which no
    /// record precedes.
    pub(super) fn wire_timestamp_ms(self) -> i64 {
        match self {
            OffsetQuery::Earliest => TIMESTAMP_EARLIEST,
            OffsetQuery::Latest => TIMESTAMP_LATEST,
            OffsetQuery::Time(timestamp_ms) => timestamp_ms.max(0),
        }
    }
}

impl Client {
    /// The partition's `(log_start_offset, high_watermark)`.
    ///
    /// # Errors
    /// As [`Client::list_offsets`].
    pub async fn partition_offsets(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<(u64, u64), ClientError> {
        let offsets = self
            .partition_offset(topic, partition, OffsetQuery::Latest)
            .await?;
        Ok((offsets.log_start_offset, offsets.high_watermark))
    }

    /// One partition's answer to `query`.
    async fn partition_offset(
        &self,
        topic: &str,
        partition: u32,
        query: OffsetQuery,
    ) -> Result<crate::protocol::PartitionOffsets, ClientError> {
        let answered = self.list_offsets(topic, &[(partition, query)]).await?;
        answered
            .into_iter()
            .find(|(answered, _)| *answered == partition)
            .map(|(_, offsets)| offsets)
            .ok_or_else(|| ClientError::UnexpectedResponse {
                correlation_id: 0,
                reason: format!("list offsets has no answer for {topic:?} partition {partition}"),
            })
    }
}

/// Consumer settings.
///
/// Made with [`ConsumerConfig::builder`] (which checks the values) or
/// [`ConsumerConfig::default`]. Fields are public to read; the struct is
/// `#[non_exhaustive]`, so settings added later are not a breaking change, and code
/// outside this crate sets fields through the builder.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConsumerConfig {
    /// How long a poll waits on the broker when no partition has new records. Default
    /// 500 ms.
    pub wait_ms_max: u32,
    /// Most bytes in one poll's response, over all partitions (each partition still
    /// returns at least one whole batch if it has one). Default 4 MiB; at least 1.
    pub bytes_max: u32,
    /// Most bytes asked of any one partition per poll. Default 1 MiB; at least 1.
    pub partition_bytes_max: u32,
    /// The stream group this consumer reads for: partitions start at its committed
    /// offsets, and `commit` records progress. `None` (the default): no group, positions
    /// live in memory only. Not empty.
    pub group: Option<String>,
    /// With a group: `poll` commits the positions that moved, at most this often.
    /// `None` (the default): only an explicit `commit` does. Needs `group`.
    pub auto_commit_interval: Option<Duration>,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            wait_ms_max: 500,
            bytes_max: 4 << 20,
            partition_bytes_max: 1 << 20,
            group: None,
            auto_commit_interval: None,
        }
    }
}

impl ConsumerConfig {
    /// A builder starting from [`ConsumerConfig::default`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use shardq::client::ConsumerConfig;
    ///
    /// let config = ConsumerConfig::builder()
    ///     .group("reports")
    ///     .auto_commit_interval(Duration::from_secs(5))
    ///     .wait_ms_max(100)
    ///     .build()?;
    /// assert_eq!(config.group.as_deref(), Some("reports"));
    /// # Ok::<(), shardq::client::ClientError>(())
    /// ```
    pub fn builder() -> ConsumerConfigBuilder {
        ConsumerConfigBuilder {
            config: ConsumerConfig::default(),
        }
    }

    /// These settings, reading for stream group `group` and committing every `interval`
    /// (`None`: only on `commit`). A shorthand kept beside the builder's `group` and
    /// `auto_commit_interval` setters; unlike [`ConsumerConfigBuilder::build`] it checks
    /// nothing.
    pub fn with_group(mut self, group: &str, auto_commit_interval: Option<Duration>) -> Self {
        self.group = Some(group.to_owned());
        self.auto_commit_interval = auto_commit_interval;
        self
    }

    fn validate(&self) -> Result<(), ClientError> {
        let invalid =
            |field: &'static str, value: u64| Err(ClientError::InvalidConfig { field, value });
        if self.bytes_max == 0 {
            return invalid("bytes_max", 0);
        }
        if self.partition_bytes_max == 0 {
            return invalid("partition_bytes_max", 0);
        }
        if self.group.as_deref() == Some("") {
            // The value is the name's length: an empty name names no group.
            return invalid("group", 0);
        }
        if let (None, Some(interval)) = (&self.group, self.auto_commit_interval) {
            // Committing needs a group; an interval without one would silently do nothing.
            return invalid(
                "auto_commit_interval",
                u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            );
        }
        Ok(())
    }
}

/// Builds a [`ConsumerConfig`]: [`ConsumerConfig::builder`], one setter per field (named
/// like the field, taking its type, with `Option` fields set to `Some` by their setter),
/// then [`ConsumerConfigBuilder::build`]. A setter not called leaves the field at its
/// default.
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until build() is called"]
pub struct ConsumerConfigBuilder {
    config: ConsumerConfig,
}

impl ConsumerConfigBuilder {
    config_setters! {
        /// How long a poll waits when nothing is new, in ms (default 500).
        wait_ms_max: u32;
        /// Most bytes of one poll's response (default 4 MiB; at least 1).
        bytes_max: u32;
        /// Most bytes asked of one partition per poll (default 1 MiB; at least 1).
        partition_bytes_max: u32;
    }

    /// Reads for this stream group (default: none). Not empty.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.config.group = Some(group.into());
        self
    }

    /// With a group, `poll` commits at most this often (default: only an explicit
    /// `commit` does).
    pub fn auto_commit_interval(mut self, interval: Duration) -> Self {
        self.config.auto_commit_interval = Some(interval);
        self
    }

    /// Checks the settings and returns them.
    ///
    /// # Errors
    /// [`ClientError::InvalidConfig`] naming the first field that cannot work, with its
    /// value: `bytes_max` or `partition_bytes_max` 0, an empty `group` (value 0, its
    /// length), or an `auto_commit_interval` (value in ms) without a `group`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use shardq::client::{ClientError, ConsumerConfig};
    ///
    /// // Committing needs a group to commit for.
    /// let error = ConsumerConfig::builder()
    ///     .auto_commit_interval(Duration::from_secs(5))
    ///     .build()
    ///     .unwrap_err();
    /// assert!(matches!(
    ///     error,
    ///     ClientError::InvalidConfig { field: "auto_commit_interval", value: 5_000 }
    /// ));
    /// ```
    pub fn build(self) -> Result<ConsumerConfig, ClientError> {
        self.config.validate()?;
        Ok(self.config)
    }
}

/// A record with the topic and partition it was read from: what a [`Consumer`] hands
/// out. Its accessors borrow; [`ConsumedRecord::into_record`] takes the record out.
///
/// ```
/// use shardq::client::{ConsumedRecord, Record};
///
/// let record = Record {
///     offset: 41,
///     timestamp_ms: 1_764_460_800_000,
///     key: Some("customer-7".into()),
///     value: "order paid".into(),
///     headers: Vec::new(),
/// };
/// let consumed = ConsumedRecord::new("orders", 3, record);
/// assert_eq!((consumed.topic(), consumed.partition(), consumed.offset()), ("orders", 3, 41));
/// assert_eq!(consumed.value().as_ref(), b"order paid");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedRecord {
    topic: Arc<str>,
    partition: u32,
    record: Record,
}

impl ConsumedRecord {
    /// A record as if read from `partition` of `topic`: for testing code that handles
    /// records.
    pub fn new(topic: &str, partition: u32, record: Record) -> ConsumedRecord {
        ConsumedRecord {
            topic: Arc::from(topic),
            partition,
            record,
        }
    }

    /// The topic the record was read from.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The partition the record was read from.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// The record's offset in its partition.
    pub fn offset(&self) -> u64 {
        self.record.offset
    }

    /// The producer's timestamp, in ms since the epoch.
    pub fn timestamp_ms(&self) -> i64 {
        self.record.timestamp_ms
    }

    /// The record's key, if it was produced with one.
    pub fn key(&self) -> Option<&Bytes> {
        self.record.key.as_ref()
    }

    /// The record's value.
    pub fn value(&self) -> &Bytes {
        &self.record.value
    }

    /// The record's headers, in the order they were produced.
    pub fn headers(&self) -> &[(String, Bytes)] {
        &self.record.headers
    }

    /// The record without its topic and partition.
    pub fn record(&self) -> &Record {
        &self.record
    }

    /// The record, taken out (its key, value and headers are not copied).
    pub fn into_record(self) -> Record {
        self.record
    }
}

/// One partition a [`Consumer`] reads: where it is, and how far behind the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    topic: Arc<str>,
    partition: u32,
    offset: u64,
    high_watermark: Option<u64>,
    log_start_offset: Option<u64>,
    /// What the group has on record for this partition, as far as this consumer knows.
    committed: Option<u64>,
}

impl Assignment {
    /// The topic of the assigned partition.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The assigned partition.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// The next offset the consumer hands out: one past the last record it handed out,
    /// or where the partition was assigned.
    pub fn position(&self) -> u64 {
        self.offset
    }

    /// One past the last offset the broker had when the consumer last heard from it
    /// (assigning with [`Consumer::assign_from`] or [`Consumer::assign_topic`], a fetch,
    /// or [`Consumer::refresh_watermarks`]). `None` after a plain [`Consumer::assign`]
    /// until the first of those.
    pub fn high_watermark(&self) -> Option<u64> {
        self.high_watermark
    }

    /// The first offset still stored, when last heard (as for `high_watermark`).
    pub fn log_start_offset(&self) -> Option<u64> {
        self.log_start_offset
    }

    /// The group's committed offset for this partition, as far as this consumer knows
    /// (read at assignment, then what it committed); `None` without a group or before the
    /// group's first commit.
    pub fn committed(&self) -> Option<u64> {
        self.committed
    }

    /// Records stored but not yet handed out: `high_watermark - position` (0 at the end of
    /// the partition); `None` while the high watermark is unknown.
    pub fn lag(&self) -> Option<u64> {
        self.high_watermark
            .map(|high_watermark| high_watermark.saturating_sub(self.offset))
    }

    /// Whether every record stored when last heard has been handed out; `None` while the
    /// high watermark is unknown.
    pub fn at_end(&self) -> Option<bool> {
        self.lag().map(|lag| lag == 0)
    }

    fn is(&self, topic: &str, partition: u32) -> bool {
        &*self.topic == topic && self.partition == partition
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + Sync>>;

/// The one request a consumer has out, kept across cancelled polls so that the next poll
/// picks up its answer instead of asking again.
enum InFlight {
    /// An automatic commit of `offsets`; the future says how many of its topics were
    /// committed and the error that stopped it, if any.
    Commit {
        offsets: Vec<TopicOffsets>,
        future: BoxFuture<(usize, Option<ClientError>)>,
    },
    Fetch(BoxFuture<Result<FetchResponse, ClientError>>),
}

/// Positions of one topic to commit: `(partition, offset)`.
type TopicOffsets = (Arc<str>, Vec<(u32, u64)>);

/// Reads several partitions, keeping the next offset of each: by [`Consumer::poll`], or
/// as a [`Stream`] of records (the `Consumer` itself) or of batches
/// ([`Consumer::batches`]).
///
/// Guarantees:
/// - records of a partition come in offset order, each batch's CRC32C checked, none
///   skipped and none twice (unless the caller assigns an earlier offset);
/// - a position moves only past records handed to the caller, so an error loses nothing:
///   the next poll reads the same offsets again;
/// - positions live in memory; only a stream group's commits (`ConsumerConfig::group`)
///   keep them across restarts of the program;
/// - over a broker restart the consumer reads on from its positions, as its [`Client`]
///   reconnects (`ClientConfig::reconnect`).
///
/// As a stream, with [`futures_util::StreamExt`](https://docs.rs/futures-util) (or any
/// `Stream` combinators), committing every 100 records:
///
/// ```no_run
/// # async fn example() -> Result<(), shardq::client::ClientError> {
/// use futures_util::StreamExt;
/// use shardq::client::{Client, Consumer, ConsumerConfig, StartPosition};
///
/// let client = Client::connect("127.0.0.1:9740").await?;
/// let config = ConsumerConfig::builder().group("reports").build()?;
/// let mut consumer = Consumer::new(client, config)?;
/// consumer.assign_topic("orders", StartPosition::Beginning).await?;
/// let mut handled = 0u64;
/// while let Some(record) = consumer.next().await {
///     let record = record?;
///     println!("{}/{}: {:?}", record.partition(), record.offset(), record.value());
///     handled += 1;
///     if handled % 100 == 0 {
///         consumer.commit().await?;
///         println!("lag {:?}", consumer.total_lag());
///     }
/// }
/// # Ok(())
/// # }
/// ```
///
/// In a `select!` loop beside other work: a `next()` that loses the race loses nothing.
///
/// ```no_run
/// # async fn example(mut consumer: shardq::client::Consumer) -> Result<(), shardq::client::ClientError> {
/// use std::time::Duration;
/// use futures_util::StreamExt;
///
/// let mut commit_timer = tokio::time::interval(Duration::from_secs(5));
/// loop {
///     tokio::select! {
///         record = consumer.next() => match record {
///             Some(record) => println!("{}", record?.offset()),
///             None => break, // nothing assigned, or the client closed or broken for good
///         },
///         _ = commit_timer.tick() => consumer.commit().await?,
///         _ = tokio::signal::ctrl_c() => break,
///     }
/// }
/// consumer.commit().await?;
/// # Ok(())
/// # }
/// ```
///
/// Dropping a consumer forgets its positions (there is nothing to close, and nothing is
/// committed on drop): a group consumer that should resume where it stopped calls
/// [`Consumer::commit`] first. The [`Client`] stays open for its other users.
///
/// # Cancel safety
/// [`Consumer::poll`], [`Consumer::poll_with_wait`] and the streams are cancel safe: a
/// fetch (or automatic commit) still in flight when the poll is dropped is kept, and the
/// next poll takes its answer rather than sending another. Records fetched but not yet
/// handed out stay buffered, their positions not moved. Assigning or unassigning a
/// partition drops the fetch in flight and the buffer (positions are unchanged, so they
/// are read again).
pub struct Consumer {
    client: Client,
    config: ConsumerConfig,
    assignments: Vec<Assignment>,
    last_commit: Instant,
    /// Fetched and not yet handed out, with the index of their assignment; no position
    /// has moved past them. Emptied whenever `assignments` changes, so the indexes hold.
    buffered: VecDeque<(usize, ConsumedRecord)>,
    in_flight: Option<InFlight>,
    /// Errors the streams yielded in a row; each is followed by a pause
    /// (`stream_pause`) before the next fetch, growing like the client's reconnect
    /// backoff, so a refusal that repeats is not asked again at once.
    stream_errors: u32,
    stream_pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("config", &self.config)
            .field("assignments", &self.assignments)
            .field("buffered", &self.buffered.len())
            .field(
                "in_flight",
                &match self.in_flight {
                    None => "none",
                    Some(InFlight::Commit { .. }) => "commit",
                    Some(InFlight::Fetch(_)) => "fetch",
                },
            )
            .finish_non_exhaustive()
    }
}

impl Consumer {
    /// A consumer with nothing assigned; assign partitions with [`Consumer::assign`],
    /// [`Consumer::assign_from`] or [`Consumer::assign_topic`]. Nothing is sent yet.
    ///
    /// # Errors
    /// [`ClientError::InvalidConfig`] for settings that cannot work, as
    /// [`ConsumerConfigBuilder::build`] checks them (a config changed field by field, or
    /// made by [`ConsumerConfig::with_group`], is checked here).
    pub fn new(client: Client, config: ConsumerConfig) -> Result<Consumer, ClientError> {
        config.validate()?;
        Ok(Consumer {
            client,
            config,
            assignments: Vec::new(),
            last_commit: Instant::now(),
            buffered: VecDeque::new(),
            in_flight: None,
            stream_errors: 0,
            stream_pause: None,
        })
    }

    /// The stream group, if the consumer reads for one.
    pub fn group(&self) -> Option<&str> {
        self.config.group.as_deref()
    }

    /// The client the consumer reads through.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The consumer's settings.
    pub fn config(&self) -> &ConsumerConfig {
        &self.config
    }

    /// Reads `partition` of `topic` from `offset` on (replacing an earlier position). The
    /// group's committed offset is not consulted: `offset` is where reading starts. The
    /// high watermark stays unknown until the first fetch.
    pub fn assign(&mut self, topic: &str, partition: u32, offset: u64) {
        self.assign_known(topic, partition, offset, None);
    }

    /// Stops reading `partition` of `topic`; false when it was not assigned.
    pub fn unassign(&mut self, topic: &str, partition: u32) -> bool {
        let before = self.assignments.len();
        self.assignments
            .retain(|assignment| !assignment.is(topic, partition));
        let removed = self.assignments.len() != before;
        if removed {
            self.assignments_changed();
        }
        removed
    }

    /// The partitions this consumer reads, in the order they were assigned.
    pub fn assignments(&self) -> impl ExactSizeIterator<Item = &Assignment> + '_ {
        self.assignments.iter()
    }

    /// One partition's assignment, if assigned.
    pub fn assignment(&self, topic: &str, partition: u32) -> Option<&Assignment> {
        self.find(topic, partition)
    }

    fn assign_known(&mut self, topic: &str, partition: u32, offset: u64, committed: Option<u64>) {
        match self
            .assignments
            .iter_mut()
            .find(|assignment| assignment.is(topic, partition))
        {
            Some(assignment) => {
                assignment.offset = offset;
                if committed.is_some() {
                    assignment.committed = committed;
                }
            }
            None => self.assignments.push(Assignment {
                topic: Arc::from(topic),
                partition,
                offset,
                high_watermark: None,
                log_start_offset: None,
                committed,
            }),
        }
        self.assignments_changed();
    }

    /// What was fetched for the old assignments is dropped; positions did not move past
    /// it, so it is read again.
    fn assignments_changed(&mut self) {
        self.buffered.clear();
        self.in_flight = None;
        self.stream_errors = 0;
        self.stream_pause = None;
    }

    fn learn_offsets(&mut self, topic: &str, partition: u32, offsets: (u64, u64)) {
        if let Some(assignment) = self
            .assignments
            .iter_mut()
            .find(|assignment| assignment.is(topic, partition))
        {
            assignment.log_start_offset = Some(offsets.0);
            assignment.high_watermark = Some(offsets.1);
        }
    }

    /// Resolves where to read `partition` from, assigns it and returns the offset: the
    /// group's committed offset when the consumer has a group that committed this
    /// partition, else `start` resolved against the broker. Learns the partition's high
    /// watermark, so [`Assignment::lag`] is known at once.
    ///
    /// # Errors
    /// [`ClientError::UnknownTopic`] / [`ClientError::UnknownPartition`] when the broker
    /// has no such partition; any error of the requests it makes.
    ///
    /// # Cancel safety
    /// Cancel safe: the partition is assigned only in the step that returns, so a
    /// dropped call assigns nothing.
    pub async fn assign_from(
        &mut self,
        topic: &str,
        partition: u32,
        start: StartPosition,
    ) -> Result<u64, ClientError> {
        let committed = match &self.config.group {
            Some(group) => {
                self.client
                    .committed_offsets(group, topic, &[partition])
                    .await?
            }
            None => Vec::new(),
        };
        let offsets = self.client.partition_offsets(topic, partition).await?;
        let offset = self
            .resolve(topic, partition, start, &committed, offsets)
            .await?;
        self.learn_offsets(topic, partition, offsets);
        Ok(offset)
    }

    /// Assigns `partition` at the group's committed offset if it has one, else at
    /// `start` (resolved with the partition's `(log_start_offset, high_watermark)`,
    /// `offsets`, where that is enough); returns the offset.
    async fn resolve(
        &mut self,
        topic: &str,
        partition: u32,
        start: StartPosition,
        committed: &[CommittedPosition],
        offsets: (u64, u64),
    ) -> Result<u64, ClientError> {
        let resume = committed
            .iter()
            .find(|position| position.partition == partition)
            .and_then(|position| position.resume_offset().map(|offset| (position, offset)));
        if let Some((position, offset)) = resume {
            let recorded = position.offset;
            self.assign_known(topic, partition, offset, recorded);
            return Ok(offset);
        }
        let offset = match start {
            StartPosition::Offset(offset) => offset,
            StartPosition::Beginning => offsets.0,
            StartPosition::End => offsets.1,
            StartPosition::Time(timestamp_ms) => {
                self.client
                    .partition_offset(topic, partition, OffsetQuery::Time(timestamp_ms))
                    .await?
                    .offset
            }
        };
        self.assign(topic, partition, offset);
        Ok(offset)
    }

    /// Assigns every partition of `topic`, each at the group's committed offset where it
    /// has one, else from `start`; returns the partition count. Learns every partition's
    /// high watermark.
    ///
    /// # Errors
    /// [`ClientError::UnknownTopic`] when the broker has no such topic; any error of the
    /// requests it makes (a metadata request, one list-offsets request for all
    /// partitions, with a group one committed-offsets request, and with
    /// [`StartPosition::Time`] one list-offsets request per partition the group has not
    /// committed).
    ///
    /// # Cancel safety
    /// With [`StartPosition::Time`] (one more request per partition), a dropped call may
    /// leave some partitions assigned and others not; calling it again assigns them all.
    /// With the other start positions every partition is assigned in the step that
    /// returns, so a dropped call assigns none.
    pub async fn assign_topic(
        &mut self,
        topic: &str,
        start: StartPosition,
    ) -> Result<u32, ClientError> {
        let metadata = self.client.metadata(&[topic]).await?;
        let entry = metadata
            .topics
            .into_iter()
            .find(|entry| entry.name == topic)
            .ok_or_else(|| ClientError::UnknownTopic {
                topic: topic.to_owned(),
            })?;
        if let Some(error) = entry.error {
            return Err(ClientError::refusal(topic, None, error));
        }
        let partitions: Vec<u32> = entry
            .partitions
            .iter()
            .map(|partition| partition.partition)
            .collect();
        // One request for every partition's committed offset, and one for every
        // partition's range, rather than one each.
        let committed = match &self.config.group {
            Some(group) => self.client.committed_offsets(group, topic, &[]).await?,
            None => Vec::new(),
        };
        let ranges = self.list_ranges(topic, &partitions).await?;
        for (partition, offsets) in ranges {
            self.resolve(topic, partition, start, &committed, offsets)
                .await?;
            self.learn_offsets(topic, partition, offsets);
        }
        Ok(partitions.len() as u32)
    }

    /// `(partition, (log_start_offset, high_watermark))` of each partition, in one request.
    async fn list_ranges(
        &self,
        topic: &str,
        partitions: &[u32],
    ) -> Result<Vec<(u32, (u64, u64))>, ClientError> {
        let query: Vec<(u32, OffsetQuery)> = partitions
            .iter()
            .map(|partition| (*partition, OffsetQuery::Latest))
            .collect();
        let answered = self.client.list_offsets(topic, &query).await?;
        partitions
            .iter()
            .map(|partition| {
                answered
                    .iter()
                    .find(|(answered, _)| answered == partition)
                    .map(|(_, offsets)| {
                        (
                            *partition,
                            (offsets.log_start_offset, offsets.high_watermark),
                        )
                    })
                    .ok_or_else(|| ClientError::UnexpectedResponse {
                        correlation_id: 0,
                        reason: format!(
                            "list offsets has no answer for {topic:?} partition {partition}"
                        ),
                    })
            })
            .collect()
    }

    /// Asks the broker for the high watermark and first stored offset of every assigned
    /// partition (one request per topic), so [`Assignment::lag`] is current without
    /// reading.
    ///
    /// # Errors
    /// Any error of the list-offsets requests; assignments not yet refreshed keep what
    /// they knew.
    ///
    /// # Cancel safety
    /// Cancel safe: a dropped call leaves some watermarks refreshed and others as they
    /// were; positions are not touched.
    pub async fn refresh_watermarks(&mut self) -> Result<(), ClientError> {
        for (topic, partitions) in self.assigned_by_topic(|_| true) {
            let partitions: Vec<u32> = partitions.iter().map(|(partition, _)| *partition).collect();
            for (partition, offsets) in self.list_ranges(&topic, &partitions).await? {
                self.learn_offsets(&topic, partition, offsets);
            }
        }
        Ok(())
    }

    /// The assignments `pick` selects, grouped by topic: `(partition, position)`.
    fn assigned_by_topic(&self, pick: impl Fn(&Assignment) -> bool) -> Vec<TopicOffsets> {
        let mut topics: Vec<TopicOffsets> = Vec::new();
        for assignment in self
            .assignments
            .iter()
            .filter(|assignment| pick(assignment))
        {
            let entry = (assignment.partition, assignment.offset);
            match topics
                .iter_mut()
                .find(|(topic, _)| *topic == assignment.topic)
            {
                Some((_, partitions)) => partitions.push(entry),
                None => topics.push((assignment.topic.clone(), vec![entry])),
            }
        }
        topics
    }

    /// Positions that moved since the group last heard of them.
    fn moved_positions(&self) -> Vec<TopicOffsets> {
        self.assigned_by_topic(|assignment| assignment.committed != Some(assignment.offset))
    }

    /// Records that the group has `offsets` on record.
    fn mark_committed(&mut self, offsets: &[TopicOffsets]) {
        for (topic, partitions) in offsets {
            for (partition, offset) in partitions {
                if let Some(assignment) = self.assignments.iter_mut().find(|assignment| {
                    assignment.topic == *topic && assignment.partition == *partition
                }) {
                    assignment.committed = Some(*offset);
                }
            }
        }
    }

    /// Records every position that moved since the group last heard of it as the
    /// group's committed offset (one request per topic), durably.
    ///
    /// # Errors
    /// [`ClientError::NotInGroup`] when the consumer has no group;
    /// [`ClientError::CommitRefused`] or any request error otherwise. Topics committed
    /// before the error stay committed.
    ///
    /// # Cancel safety
    /// Cancelling it may leave some topics committed and others not; the next commit
    /// sends every position the group may not have.
    pub async fn commit(&mut self) -> Result<(), ClientError> {
        let Some(group) = self.config.group.clone() else {
            return Err(ClientError::NotInGroup);
        };
        let offsets = self.moved_positions();
        let (committed, error) = commit_all(self.client.clone(), group, offsets.clone()).await;
        self.mark_committed(&offsets[..committed]);
        match error {
            Some(error) => Err(error),
            None => {
                self.last_commit = Instant::now();
                Ok(())
            }
        }
    }

    /// The offset the group has on record for a partition, as far as this consumer knows
    /// (read at assignment, then what it committed).
    pub fn committed(&self, topic: &str, partition: u32) -> Option<u64> {
        self.find(topic, partition)
            .and_then(|assignment| assignment.committed)
    }

    /// The next offset to hand out, if assigned.
    pub fn position(&self, topic: &str, partition: u32) -> Option<u64> {
        self.find(topic, partition)
            .map(|assignment| assignment.offset)
    }

    /// The partition's high watermark when last heard (see
    /// [`Assignment::high_watermark`]).
    pub fn high_watermark(&self, topic: &str, partition: u32) -> Option<u64> {
        self.find(topic, partition)
            .and_then(|assignment| assignment.high_watermark)
    }

    /// Records of the partition not yet handed out (see [`Assignment::lag`]).
    pub fn lag(&self, topic: &str, partition: u32) -> Option<u64> {
        self.find(topic, partition).and_then(Assignment::lag)
    }

    /// The lag summed over every assignment; `None` while any is unknown.
    pub fn total_lag(&self) -> Option<u64> {
        self.assignments.iter().map(Assignment::lag).sum()
    }

    fn find(&self, topic: &str, partition: u32) -> Option<&Assignment> {
        self.assignments
            .iter()
            .find(|assignment| assignment.is(topic, partition))
    }

    /// The records fetched and not yet handed out, or one Fetch naming every assigned
    /// partition, waiting up to `wait_ms_max` when none has new records (then the result
    /// is empty). Records are grouped by partition, in offset order within each. With
    /// `auto_commit_interval` set, commits first when it is due. With nothing assigned,
    /// returns an empty list at once.
    ///
    /// ```no_run
    /// # async fn example(mut consumer: shardq::client::Consumer) -> Result<(), shardq::client::ClientError> {
    /// loop {
    ///     let records = consumer.poll().await?; // empty when the long-poll expired
    ///     for record in &records {
    ///         println!("{} {}", record.partition(), record.offset());
    ///     }
    ///     consumer.commit().await?; // (a group consumer) what this poll handed out is done
    /// }
    /// # }
    /// ```
    ///
    /// # Errors
    /// Any error of the fetch or the automatic commit (nothing is lost: positions do not
    /// move); [`ClientError::OffsetOutOfRange`] when a position fell out of the stored
    /// range (see [`is_offset_out_of_range`]); [`ClientError::Batch`] when a batch fails
    /// its CRC.
    ///
    /// # Cancel safety
    /// Cancel safe: see [`Consumer`].
    pub async fn poll(&mut self) -> Result<Vec<ConsumedRecord>, ClientError> {
        self.poll_with_wait(self.config.wait_ms_max).await
    }

    /// As [`Consumer::poll`], with this call's own long-poll limit (a fetch already in
    /// flight from a cancelled poll keeps the limit it was sent with).
    ///
    /// # Errors
    /// As [`Consumer::poll`].
    ///
    /// # Cancel safety
    /// Cancel safe: see [`Consumer`].
    pub async fn poll_with_wait(
        &mut self,
        wait_ms_max: u32,
    ) -> Result<Vec<ConsumedRecord>, ClientError> {
        if self.buffered.is_empty() {
            if self.assignments.is_empty() {
                return Ok(Vec::new());
            }
            poll_fn(|cx| self.poll_fetch(cx, wait_ms_max)).await?;
        }
        let mut records = Vec::with_capacity(self.buffered.len());
        while let Some(record) = self.hand_out() {
            records.push(record);
        }
        Ok(records)
    }

    /// A stream of the records, one poll's worth at a time (never an empty one); see
    /// [`Batches`].
    pub fn batches(&mut self) -> Batches<'_> {
        Batches { consumer: self }
    }

    /// The next buffered record, its position moved past it.
    fn hand_out(&mut self) -> Option<ConsumedRecord> {
        let (index, record) = self.buffered.pop_front()?;
        self.assignments[index].offset = record.offset() + 1;
        Some(record)
    }

    /// Drives the request in flight (starting one when there is none) until one fetch has
    /// been answered and its records buffered (possibly none: the long-poll expired).
    /// Needs an assignment and an empty buffer.
    fn poll_fetch(
        &mut self,
        cx: &mut Context<'_>,
        wait_ms_max: u32,
    ) -> Poll<Result<(), ClientError>> {
        debug_assert!(self.buffered.is_empty() && !self.assignments.is_empty());
        loop {
            match &mut self.in_flight {
                None => self.in_flight = Some(self.start_request(wait_ms_max)),
                Some(InFlight::Commit { future, .. }) => {
                    let (committed, error) = ready!(future.as_mut().poll(cx));
                    let Some(InFlight::Commit { offsets, .. }) = self.in_flight.take() else {
                        unreachable!("the commit just polled is in flight");
                    };
                    self.mark_committed(&offsets[..committed]);
                    // Failed or not, the next commit is due an interval from now, so a
                    // commit that keeps failing does not keep every poll from fetching.
                    self.last_commit = Instant::now();
                    if let Some(error) = error {
                        return Poll::Ready(Err(error));
                    }
                    // The fetch goes out next time round.
                    self.in_flight = Some(self.fetch(wait_ms_max));
                }
                Some(InFlight::Fetch(future)) => {
                    let answer = ready!(future.as_mut().poll(cx));
                    self.in_flight = None;
                    return Poll::Ready(answer.and_then(|response| self.take_in(&response)));
                }
            }
        }
    }

    /// An automatic commit when one is due, else the fetch.
    fn start_request(&self, wait_ms_max: u32) -> InFlight {
        if let (Some(group), Some(interval)) =
            (&self.config.group, self.config.auto_commit_interval)
        {
            if self.last_commit.elapsed() >= interval {
                let offsets = self.moved_positions();
                let future = Box::pin(commit_all(
                    self.client.clone(),
                    group.clone(),
                    offsets.clone(),
                ));
                return InFlight::Commit { offsets, future };
            }
        }
        self.fetch(wait_ms_max)
    }

    fn fetch(&self, wait_ms_max: u32) -> InFlight {
        let client = self.client.clone();
        let request = self.fetch_request(wait_ms_max);
        InFlight::Fetch(Box::pin(async move { client.fetch(request).await }))
    }

    /// Decodes every partition of `response` into the buffer, learning watermarks; all or
    /// nothing, so an error loses no record.
    fn take_in(&mut self, response: &FetchResponse) -> Result<(), ClientError> {
        let mut decoded = Vec::with_capacity(self.assignments.len());
        for assignment in &self.assignments {
            decoded.push(fetch_records_from_response(
                response,
                &assignment.topic,
                assignment.partition,
                assignment.offset,
            )?);
        }
        for (index, (assignment, fetched)) in self.assignments.iter_mut().zip(decoded).enumerate() {
            assignment.high_watermark = Some(fetched.high_watermark);
            assignment.log_start_offset = Some(fetched.log_start_offset);
            self.buffered
                .extend(fetched.records.into_iter().map(|record| {
                    (
                        index,
                        ConsumedRecord {
                            topic: assignment.topic.clone(),
                            partition: assignment.partition,
                            record,
                        },
                    )
                }));
        }
        Ok(())
    }

    fn fetch_request(&self, wait_ms_max: u32) -> FetchRequest {
        let topics = self
            .assigned_by_topic(|_| true)
            .into_iter()
            .map(|(topic, partitions)| FetchTopic {
                name: topic.to_string(),
                partitions: partitions
                    .into_iter()
                    .map(|(partition, offset)| FetchPartition {
                        partition,
                        offset,
                        bytes_max: self.config.partition_bytes_max,
                    })
                    .collect(),
            })
            .collect();
        FetchRequest {
            wait_ms_max,
            bytes_max: self.config.bytes_max,
            topics,
        }
    }

    /// One record at a time, for the [`Stream`] implementations.
    fn poll_next_record(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<ConsumedRecord, ClientError>>> {
        loop {
            if let Some(record) = self.hand_out() {
                return Poll::Ready(Some(Ok(record)));
            }
            if let Err(end) = ready!(self.poll_stream_fetch(cx)) {
                return Poll::Ready(end.map(Err));
            }
        }
    }

    /// For the streams, with the buffer empty: one fetch answered (`Ok`), or what the
    /// stream yields instead: `Err(None)` to end (nothing assigned, the client closed or
    /// its connection broken for good), `Err(Some(error))` for an error item.
    fn poll_stream_fetch(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Option<ClientError>>> {
        // A request in flight is driven to its error first, so the error that broke the
        // connection is yielded before the stream ends.
        let broken_for_good = self.in_flight.is_none()
            && (self.client.is_closed()
                || (!self.client.config().reconnect && self.client.is_broken()));
        if self.assignments.is_empty() || broken_for_good {
            return Poll::Ready(Err(None));
        }
        if let Some(pause) = &mut self.stream_pause {
            ready!(pause.as_mut().poll(cx));
            self.stream_pause = None;
        }
        match ready!(self.poll_fetch(cx, self.config.wait_ms_max)) {
            Ok(()) => {
                self.stream_errors = 0;
                Poll::Ready(Ok(()))
            }
            Err(ClientError::Closed) => Poll::Ready(Err(None)),
            Err(error) => {
                self.stream_errors = self.stream_errors.saturating_add(1);
                let config = self.client.config();
                let pause = super::backoff_delay(
                    self.stream_errors,
                    config.reconnect_backoff_ms_min.max(1),
                    config.reconnect_backoff_ms_max.max(1),
                );
                self.stream_pause = Some(Box::pin(tokio::time::sleep(pause)));
                Poll::Ready(Err(Some(error)))
            }
        }
    }
}

/// The consumer as a stream of records, in the order [`Consumer::poll`] would hand them
/// out, each moving its partition's position past it as it is yielded.
///
/// An error is yielded as an item and the stream goes on: polling again retries what
/// failed, having lost nothing (an [`ClientError::OffsetOutOfRange`] stays until the
/// partition is assigned elsewhere), after a pause that grows with each error in a row
/// like the client's reconnect backoff (`reconnect_backoff_ms_min` to `_max`). The
/// stream ends when nothing is assigned, the client is closed, or its connection broke
/// with `reconnect` off (after yielding the error that broke it); it yields again once
/// something is assigned.
///
/// # Cancel safety
/// Cancel safe (a `next()` dropped in a `select!` loses nothing and wastes no fetch): see
/// [`Consumer`].
impl Stream for Consumer {
    type Item = Result<ConsumedRecord, ClientError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_next_record(cx)
    }
}

/// A [`Consumer`]'s records as a stream of batches: each item is what one
/// [`Consumer::poll`] returns, never empty (a long-poll that expires with nothing new
/// yields nothing). Ends, yields errors and is cancel safe as the record stream is.
#[derive(Debug)]
pub struct Batches<'a> {
    consumer: &'a mut Consumer,
}

impl Batches<'_> {
    /// The consumer, for its assignments, lag and commits between items.
    pub fn consumer(&mut self) -> &mut Consumer {
        self.consumer
    }
}

impl Stream for Batches<'_> {
    type Item = Result<Vec<ConsumedRecord>, ClientError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let consumer = &mut *self.get_mut().consumer;
        loop {
            if !consumer.buffered.is_empty() {
                let mut records = Vec::with_capacity(consumer.buffered.len());
                while let Some(record) = consumer.hand_out() {
                    records.push(record);
                }
                return Poll::Ready(Some(Ok(records)));
            }
            if let Err(end) = ready!(consumer.poll_stream_fetch(cx)) {
                return Poll::Ready(end.map(Err));
            }
        }
    }
}

/// Commits `offsets` for `group`, one request per topic, in order; returns how many topics
/// were committed and the error that stopped it.
async fn commit_all(
    client: Client,
    group: String,
    offsets: Vec<TopicOffsets>,
) -> (usize, Option<ClientError>) {
    for (done, (topic, partitions)) in offsets.iter().enumerate() {
        if let Err(error) = client.commit_offsets(&group, topic, partitions).await {
            return (done, Some(error));
        }
    }
    (offsets.len(), None)
}

/// Whether an error means the position is outside the stored log (too old or past the
/// end), which a caller may answer by re-assigning from `StartPosition`.
pub fn is_offset_out_of_range(error: &ClientError) -> bool {
    error.wire_code() == Some(ErrorCode::OffsetOutOfRange)
}
