//! Stream groups (committed offsets), group description, topic purge and broker stats:
//! the calls of [`Client`] beyond produce, fetch and queue receive/settle (those are in
//! `queue`). docs/queues.md §1 has the group model.
//!
//! Contract: `commit_offsets` returns once the broker has made every listed commit
//! durable, or with the first partition it refused ([`ClientError::CommitRefused`]; the
//! others of that request may have been committed). `committed_offsets` reads them back
//! with each partition's range, so a caller can tell a position that retention overtook.

use super::{unexpected_body, Client, ClientError};
use crate::protocol::queue::{
    AlterGroupRequest, CommitOffsetsRequest, CommitPartition, DescribeGroupsRequest,
    FetchCommittedRequest, GroupDescription, PurgeTopicRequest, PurgedPartition, QueueSettings,
    COMMITTED_NONE,
};
use crate::protocol::{ErrorCode, Request, ResponseBody, StatsRequest, StatsResponse};

/// A stream group's position in one partition, with the partition's range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommittedPosition {
    /// The partition.
    pub partition: u32,
    /// The next offset the group will read; `None` when it never committed here.
    pub offset: Option<u64>,
    /// The first offset still stored.
    pub log_start_offset: u64,
    /// One past the last readable offset.
    pub high_watermark: u64,
}

impl CommittedPosition {
    /// Where a reader of the group resumes: the committed offset moved into the stored
    /// range (retention may have deleted past it; nothing before the log start can be
    /// read), or `None` when the group never committed this partition.
    pub fn resume_offset(&self) -> Option<u64> {
        self.offset.map(|offset| {
            offset
                .max(self.log_start_offset)
                .min(self.high_watermark.max(self.log_start_offset))
        })
    }
}

impl Client {
    /// Durably records, for stream group `group`, the next offset to read of each listed
    /// `(partition, offset)` of `topic`: everything before it is done.
    ///
    /// # Errors
    /// [`ClientError::UnknownTopic`] / [`ClientError::UnknownPartition`] for a topic or
    /// partition the broker does not have, [`ClientError::CommitRefused`] for another
    /// refusal of one partition (the others may be committed), [`ClientError::Broker`]
    /// for a refusal of the whole request; the transport's errors. A commit is sent once
    /// more on a new connection when the one it was on broke (it sets positions, so a
    /// second copy does no harm).
    pub async fn commit_offsets(
        &self,
        group: &str,
        topic: &str,
        offsets: &[(u32, u64)],
    ) -> Result<(), ClientError> {
        let request = Request::CommitOffsets(CommitOffsetsRequest {
            group: group.to_owned(),
            topic: topic.to_owned(),
            partitions: offsets
                .iter()
                .map(|(partition, offset)| CommitPartition {
                    partition: *partition,
                    offset: *offset,
                })
                .collect(),
        });
        let response = match self.call(request, self.timeout(), "commit offsets").await? {
            ResponseBody::CommitOffsets(response) => response,
            other => return Err(unexpected_body("commit offsets", &other)),
        };
        for result in response.partitions {
            match result.result {
                Ok(_) => {}
                // The one variant for these, as from every other call.
                Err(error)
                    if matches!(
                        error.code,
                        ErrorCode::UnknownTopic | ErrorCode::UnknownPartition
                    ) =>
                {
                    return Err(ClientError::refusal(topic, Some(result.partition), error))
                }
                Err(error) => {
                    return Err(ClientError::CommitRefused {
                        group: group.to_owned(),
                        topic: topic.to_owned(),
                        partition: result.partition,
                        error,
                    })
                }
            }
        }
        Ok(())
    }

    /// Stream group `group`'s committed offsets of `partitions` of `topic` (every
    /// partition when the list is empty), each with the partition's stored range.
    ///
    /// # Errors
    /// [`ClientError::UnknownTopic`] / [`ClientError::UnknownPartition`] for a topic or
    /// partition the broker does not have, [`ClientError::PartitionRefused`] for another
    /// refusal of one partition, [`ClientError::Broker`] for a refusal of the whole
    /// request; the transport's errors.
    pub async fn committed_offsets(
        &self,
        group: &str,
        topic: &str,
        partitions: &[u32],
    ) -> Result<Vec<CommittedPosition>, ClientError> {
        let request = Request::FetchCommitted(FetchCommittedRequest {
            group: group.to_owned(),
            topic: topic.to_owned(),
            partitions: partitions.to_vec(),
        });
        let response = match self
            .call(request, self.timeout(), "fetch committed offsets")
            .await?
        {
            ResponseBody::FetchCommitted(response) => response,
            other => return Err(unexpected_body("fetch committed offsets", &other)),
        };
        let mut positions = Vec::with_capacity(response.partitions.len());
        for result in response.partitions {
            match result.result {
                Ok(committed) => positions.push(CommittedPosition {
                    partition: result.partition,
                    offset: (committed.committed != COMMITTED_NONE).then_some(committed.committed),
                    log_start_offset: committed.log_start_offset,
                    high_watermark: committed.high_watermark,
                }),
                Err(error) => {
                    return Err(ClientError::refusal(topic, Some(result.partition), error))
                }
            }
        }
        Ok(positions)
    }

    /// The groups of `topic` (stream and queue), or only `group`, each partition with its
    /// position, backlog and (queue groups) in-flight and counters.
    ///
    /// # Errors
    /// [`ClientError::UnknownTopic`] for a topic the broker does not have,
    /// [`ClientError::Broker`] for another refusal of the request; the transport's
    /// errors.
    pub async fn describe_groups(
        &self,
        topic: &str,
        group: Option<&str>,
    ) -> Result<Vec<GroupDescription>, ClientError> {
        let request = Request::DescribeGroups(DescribeGroupsRequest {
            topic: topic.to_owned(),
            group: group.unwrap_or_default().to_owned(),
        });
        match self
            .call(request, self.timeout(), "describe groups")
            .await?
        {
            ResponseBody::DescribeGroups(response) => Ok(response.groups),
            other => Err(unexpected_body("describe groups", &other)),
        }
    }

    /// What every shard and each partition of `topics` (every topic when empty) is
    /// doing: offsets, bytes and segments per partition, records and bytes in and out
    /// since the broker started, connections and requests per shard. Counters restart
    /// at zero with the broker; rates are differences between two answers.
    ///
    /// # Errors
    /// [`ClientError::UnknownTopic`] when one topic is named and the broker does not have
    /// it, [`ClientError::Broker`] for another refusal; the transport's errors.
    pub async fn stats(&self, topics: &[&str]) -> Result<StatsResponse, ClientError> {
        let request = Request::Stats(StatsRequest {
            topics: topics.iter().map(|topic| (*topic).to_owned()).collect(),
        });
        match self.call(request, self.timeout(), "stats").await? {
            ResponseBody::Stats(response) => Ok(response),
            other => Err(unexpected_body("stats", &other)),
        }
    }

    /// Sets queue group `group`'s own settings on `topic`: only the retry delays
    /// (`retry_delay_ms_min`, `retry_delay_ms_max`) may be given, and they win over the
    /// topic's; one not given stays as it is. The group is created if it does not exist.
    /// Returns once every partition's change is durable (docs/queues.md §3).
    ///
    /// # Errors
    /// [`ClientError::UnknownTopic`] for a topic the broker does not have,
    /// [`ClientError::Broker`] for a setting it refuses (one other than the retry
    /// delays, a value out of range); the transport's errors.
    pub async fn alter_group(
        &self,
        topic: &str,
        group: &str,
        settings: QueueSettings,
    ) -> Result<(), ClientError> {
        let request = Request::AlterGroup(AlterGroupRequest {
            topic: topic.to_owned(),
            group: group.to_owned(),
            settings,
        });
        match self.call(request, self.timeout(), "alter group").await? {
            ResponseBody::AlterGroup => Ok(()),
            other => Err(unexpected_body("alter group", &other)),
        }
    }

    /// Deletes every record `topic` stores now: each partition's log start moves to its
    /// high watermark. Returns what each partition lost.
    ///
    /// # Errors
    /// [`ClientError::UnknownTopic`] for a topic the broker does not have,
    /// [`ClientError::Broker`] for another refusal of the request; the transport's
    /// errors.
    pub async fn purge_topic(&self, topic: &str) -> Result<Vec<PurgedPartition>, ClientError> {
        let request = Request::PurgeTopic(PurgeTopicRequest {
            topic: topic.to_owned(),
        });
        match self.call(request, self.timeout(), "purge topic").await? {
            ResponseBody::PurgeTopic(response) => Ok(response.partitions),
            other => Err(unexpected_body("purge topic", &other)),
        }
    }
}
