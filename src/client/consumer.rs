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

use std::sync::Arc;
use std::time::{Duration, Instant};

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
    pub fn build(self) -> Result<ConsumerConfig, ClientError> {
        self.config.validate()?;
        Ok(self.config)
    }
}

/// A record with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedRecord {
    pub topic: Arc<str>,
    pub partition: u32,
    pub record: Record,
}

#[derive(Debug, Clone)]
struct Position {
    topic: Arc<str>,
    partition: u32,
    offset: u64,
    high_watermark: Option<u64>,
    /// What the group has on record for this partition, as far as this consumer knows.
    committed: Option<u64>,
}

/// Reads several partitions, keeping the next offset of each.
#[derive(Debug)]
pub struct Consumer {
    client: Client,
    config: ConsumerConfig,
    positions: Vec<Position>,
    last_commit: Instant,
}

impl Consumer {
    pub fn new(client: Client, config: ConsumerConfig) -> Consumer {
        Consumer {
            client,
            config,
            positions: Vec::new(),
            last_commit: Instant::now(),
        }
    }

    /// The stream group, if the consumer reads for one.
    pub fn group(&self) -> Option<&str> {
        self.config.group.as_deref()
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Reads `partition` of `topic` from `offset` on (replacing an earlier position). The
    /// group's committed offset is not consulted: `offset` is where reading starts.
    pub fn assign(&mut self, topic: &str, partition: u32, offset: u64) {
        self.assign_known(topic, partition, offset, None);
    }

    fn assign_known(&mut self, topic: &str, partition: u32, offset: u64, committed: Option<u64>) {
        match self
            .positions
            .iter_mut()
            .find(|position| &*position.topic == topic && position.partition == partition)
        {
            Some(position) => {
                position.offset = offset;
                if committed.is_some() {
                    position.committed = committed;
                }
            }
            None => self.positions.push(Position {
                topic: Arc::from(topic),
                partition,
                offset,
                high_watermark: None,
                committed,
            }),
        }
    }

    /// Resolves where to read `partition` from, assigns it and returns the offset: the
    /// group's committed offset when the consumer has a group that committed this
    /// partition, else `start` resolved against the broker.
    pub async fn assign_from(
        &mut self,
        topic: &str,
        partition: u32,
        start: StartPosition,
    ) -> Result<u64, ClientError> {
        if let Some(group) = &self.config.group {
            let committed = self
                .client
                .committed_offsets(group, topic, &[partition])
                .await?;
            let resume = committed
                .iter()
                .find(|position| position.partition == partition)
                .and_then(|position| position.resume_offset().map(|offset| (position, offset)));
            if let Some((position, offset)) = resume {
                let recorded = position.offset;
                self.assign_known(topic, partition, offset, recorded);
                return Ok(offset);
            }
        }
        let offset = self.resolve_start(topic, partition, start).await?;
        self.assign(topic, partition, offset);
        Ok(offset)
    }

    async fn resolve_start(
        &self,
        topic: &str,
        partition: u32,
        start: StartPosition,
    ) -> Result<u64, ClientError> {
        let query = match start {
            StartPosition::Offset(offset) => return Ok(offset),
            StartPosition::Beginning => OffsetQuery::Earliest,
            StartPosition::End => OffsetQuery::Latest,
            StartPosition::Time(timestamp_ms) => OffsetQuery::Time(timestamp_ms),
        };
        let offset = self
            .client
            .partition_offset(topic, partition, query)
            .await?
            .offset;
        Ok(offset)
    }

    /// Assigns every partition of `topic`, all from `start`; returns the partition count.
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
        // One request for every partition's committed offset, rather than one each.
        let committed = match &self.config.group {
            Some(group) => self.client.committed_offsets(group, topic, &[]).await?,
            None => Vec::new(),
        };
        for partition in &entry.partitions {
            let partition = partition.partition;
            let resume = committed
                .iter()
                .find(|position| position.partition == partition)
                .and_then(|position| position.resume_offset().map(|offset| (position, offset)));
            match resume {
                Some((position, offset)) => {
                    let recorded = position.offset;
                    self.assign_known(topic, partition, offset, recorded);
                }
                None => {
                    let offset = self.resolve_start(topic, partition, start).await?;
                    self.assign(topic, partition, offset);
                }
            }
        }
        Ok(entry.partitions.len() as u32)
    }

    /// Records every position that moved since the group last heard of it as the
    /// group's committed offset (one request per topic), durably. Fails with
    /// [`ClientError::NotInGroup`] when the consumer has no group.
    pub async fn commit(&mut self) -> Result<(), ClientError> {
        let Some(group) = self.config.group.clone() else {
            return Err(ClientError::NotInGroup);
        };
        let mut topics: Vec<Arc<str>> = Vec::new();
        for position in &self.positions {
            if position.committed != Some(position.offset) && !topics.contains(&position.topic) {
                topics.push(position.topic.clone());
            }
        }
        for topic in topics {
            let offsets: Vec<(u32, u64)> = self
                .positions
                .iter()
                .filter(|position| position.topic == topic)
                .filter(|position| position.committed != Some(position.offset))
                .map(|position| (position.partition, position.offset))
                .collect();
            self.client.commit_offsets(&group, &topic, &offsets).await?;
            for position in &mut self.positions {
                if position.topic == topic {
                    if let Some((_, offset)) = offsets
                        .iter()
                        .find(|(partition, _)| *partition == position.partition)
                    {
                        position.committed = Some(*offset);
                    }
                }
            }
        }
        self.last_commit = Instant::now();
        Ok(())
    }

    /// The offset the group has on record for a partition, as far as this consumer knows
    /// (read at assignment, then what it committed).
    pub fn committed(&self, topic: &str, partition: u32) -> Option<u64> {
        self.find(topic, partition)
            .and_then(|position| position.committed)
    }

    /// The next offset to read, if assigned.
    pub fn position(&self, topic: &str, partition: u32) -> Option<u64> {
        self.find(topic, partition).map(|position| position.offset)
    }

    /// The high watermark the last poll saw, if any.
    pub fn high_watermark(&self, topic: &str, partition: u32) -> Option<u64> {
        self.find(topic, partition)
            .and_then(|position| position.high_watermark)
    }

    fn find(&self, topic: &str, partition: u32) -> Option<&Position> {
        self.positions
            .iter()
            .find(|position| &*position.topic == topic && position.partition == partition)
    }

    /// One Fetch naming every assigned partition, waiting up to `wait_ms_max` when none
    /// has new records. Records are grouped by partition, in offset order within each.
    pub async fn poll(&mut self) -> Result<Vec<ConsumedRecord>, ClientError> {
        self.poll_with_wait(self.config.wait_ms_max).await
    }

    /// As [`Consumer::poll`], with this call's own long-poll limit.
    pub async fn poll_with_wait(
        &mut self,
        wait_ms_max: u32,
    ) -> Result<Vec<ConsumedRecord>, ClientError> {
        if self.positions.is_empty() {
            return Ok(Vec::new());
        }
        if let (Some(_), Some(interval)) = (&self.config.group, self.config.auto_commit_interval) {
            if self.last_commit.elapsed() >= interval {
                self.commit().await?;
            }
        }
        let request = self.fetch_request(wait_ms_max);
        let response = self.client.fetch(request).await?;
        // Decode everything before moving any position, so an error loses nothing.
        let mut decoded = Vec::with_capacity(self.positions.len());
        for position in &self.positions {
            let fetched = fetch_records_from_response(
                &response,
                &position.topic,
                position.partition,
                position.offset,
            )?;
            decoded.push(fetched);
        }
        let mut consumed = Vec::new();
        for (position, fetched) in self.positions.iter_mut().zip(decoded) {
            position.high_watermark = Some(fetched.high_watermark);
            if let Some(last) = fetched.records.last() {
                position.offset = last.offset + 1;
            }
            consumed.extend(fetched.records.into_iter().map(|record| ConsumedRecord {
                topic: position.topic.clone(),
                partition: position.partition,
                record,
            }));
        }
        Ok(consumed)
    }

    fn fetch_request(&self, wait_ms_max: u32) -> FetchRequest {
        let mut topics: Vec<FetchTopic> = Vec::new();
        for position in &self.positions {
            let partition = FetchPartition {
                partition: position.partition,
                offset: position.offset,
                bytes_max: self.config.partition_bytes_max,
            };
            match topics
                .iter_mut()
                .find(|topic| *topic.name == *position.topic)
            {
                Some(topic) => topic.partitions.push(partition),
                None => topics.push(FetchTopic {
                    name: position.topic.to_string(),
                    partitions: vec![partition],
                }),
            }
        }
        FetchRequest {
            wait_ms_max,
            bytes_max: self.config.bytes_max,
            topics,
        }
    }
}

/// Whether an error means the position is outside the stored log (too old or past the
/// end), which a caller may answer by re-assigning from `StartPosition`.
pub fn is_offset_out_of_range(error: &ClientError) -> bool {
    error.wire_code() == Some(ErrorCode::OffsetOutOfRange)
}
