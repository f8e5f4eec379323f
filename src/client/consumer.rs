//! Reading: one-partition fetch helpers and a simple [`Consumer`] that tracks the next
//! offset of several partitions and polls them all with one Fetch request.
//!
//! Contract: records come back in offset order per partition, each batch's CRC32C
//! checked; a position advances only past records returned to the caller, so an error
//! from `poll` loses nothing (the next poll fetches the same offsets again). Positions
//! live in memory only; committing them to the broker is not in protocol v1.

use std::sync::Arc;

use super::{Client, ClientError, TIMESTAMP_LATEST};
use crate::protocol::batch::{decode_records, Record};
use crate::protocol::{ErrorCode, FetchPartition, FetchRequest, FetchResponse, FetchTopic};

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
        Err(error) => {
            return Err(ClientError::PartitionRefused {
                topic: topic.to_owned(),
                partition,
                error: error.clone(),
            })
        }
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartPosition {
    /// The first offset still stored.
    Beginning,
    /// The high watermark: only records produced from now on.
    End,
    Offset(u64),
    /// The first record with a timestamp at or after this time (ms since the epoch).
    Time(i64),
}

impl Client {
    /// The partition's `(log_start_offset, high_watermark)`.
    pub async fn partition_offsets(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<(u64, u64), ClientError> {
        let answered = self
            .list_offsets(topic, &[(partition, TIMESTAMP_LATEST)])
            .await?;
        let (_, offsets) =
            answered
                .into_iter()
                .next()
                .ok_or_else(|| ClientError::UnexpectedResponse {
                    correlation_id: 0,
                    reason: format!(
                        "list offsets has no answer for {topic:?} partition {partition}"
                    ),
                })?;
        Ok((offsets.log_start_offset, offsets.high_watermark))
    }
}

/// Consumer settings.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// How long a poll waits on the broker when no partition has new records.
    pub wait_ms_max: u32,
    /// Most bytes in one poll's response, over all partitions (each partition still
    /// returns at least one whole batch if it has one).
    pub bytes_max: u32,
    /// Most bytes asked of any one partition per poll.
    pub partition_bytes_max: u32,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            wait_ms_max: 500,
            bytes_max: 4 << 20,
            partition_bytes_max: 1 << 20,
        }
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
}

/// Reads several partitions, keeping the next offset of each.
#[derive(Debug)]
pub struct Consumer {
    client: Client,
    config: ConsumerConfig,
    positions: Vec<Position>,
}

impl Consumer {
    pub fn new(client: Client, config: ConsumerConfig) -> Consumer {
        Consumer {
            client,
            config,
            positions: Vec::new(),
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Reads `partition` of `topic` from `offset` on (replacing an earlier position).
    pub fn assign(&mut self, topic: &str, partition: u32, offset: u64) {
        match self
            .positions
            .iter_mut()
            .find(|position| &*position.topic == topic && position.partition == partition)
        {
            Some(position) => position.offset = offset,
            None => self.positions.push(Position {
                topic: Arc::from(topic),
                partition,
                offset,
                high_watermark: None,
            }),
        }
    }

    /// Resolves `start` against the broker, assigns it and returns the offset.
    pub async fn assign_from(
        &mut self,
        topic: &str,
        partition: u32,
        start: StartPosition,
    ) -> Result<u64, ClientError> {
        let offset = match start {
            StartPosition::Offset(offset) => offset,
            StartPosition::Beginning => self.client.partition_offsets(topic, partition).await?.0,
            StartPosition::End => self.client.partition_offsets(topic, partition).await?.1,
            StartPosition::Time(timestamp_ms) => {
                let answered = self
                    .client
                    .list_offsets(topic, &[(partition, timestamp_ms)])
                    .await?;
                answered
                    .into_iter()
                    .next()
                    .map(|(_, offsets)| offsets.offset)
                    .ok_or_else(|| ClientError::UnexpectedResponse {
                        correlation_id: 0,
                        reason: format!(
                            "list offsets has no answer for {topic:?} partition {partition}"
                        ),
                    })?
            }
        };
        self.assign(topic, partition, offset);
        Ok(offset)
    }

    /// Assigns every partition of `topic`, all from `start`; returns the partition count.
    pub async fn assign_topic(
        &mut self,
        topic: &str,
        start: StartPosition,
    ) -> Result<u32, ClientError> {
        let metadata = self.client.metadata(&[topic.to_owned()]).await?;
        let entry = metadata
            .topics
            .into_iter()
            .find(|entry| entry.name == topic)
            .ok_or_else(|| ClientError::UnknownTopic {
                topic: topic.to_owned(),
            })?;
        if let Some(error) = entry.error {
            return Err(ClientError::Broker(error));
        }
        for partition in &entry.partitions {
            self.assign_from(topic, partition.partition, start).await?;
        }
        Ok(entry.partitions.len() as u32)
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
