//! Bodies of the consumer-group operations: stream groups (commit and read committed
//! offsets) and queue groups (receive, ack, nack, extend), group description, topic purge
//! and the per-topic queue settings. docs/protocol.md §11 has the byte layouts; the model
//! is docs/queues.md.

use bytes::Bytes;

use super::WireError;

/// A consumer group's name: 1 to `GROUP_NAME_BYTES_MAX` bytes of `[A-Za-z0-9._-]`, the
/// same alphabet as topic names (a group is a directory name on disk).
pub const GROUP_NAME_BYTES_MAX: usize = 200;

/// `FetchCommitted` answer for a partition the group never committed.
pub const COMMITTED_NONE: u64 = u64::MAX;

/// One partition's commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitPartition {
    pub partition: u32,
    /// The next offset the group will read: everything before it is done.
    pub offset: u64,
}

/// Stream group: durably records `offset` as the group's position in each partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitOffsetsRequest {
    pub group: String,
    pub topic: String,
    pub partitions: Vec<CommitPartition>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitPartitionResult {
    pub partition: u32,
    pub result: Result<(), WireError>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitOffsetsResponse {
    pub partitions: Vec<CommitPartitionResult>,
}

/// Stream group: the committed offset of each partition listed (every partition when the
/// list is empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchCommittedRequest {
    pub group: String,
    pub topic: String,
    pub partitions: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommittedOffset {
    /// `COMMITTED_NONE` when the group never committed this partition.
    pub committed: u64,
    pub log_start_offset: u64,
    pub high_watermark: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchCommittedPartitionResult {
    pub partition: u32,
    pub result: Result<CommittedOffset, WireError>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchCommittedResponse {
    pub partitions: Vec<FetchCommittedPartitionResult>,
}

/// Queue group: lease up to `messages_max` available messages of `topic` to the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiveRequest {
    pub topic: String,
    pub group: String,
    pub messages_max: u32,
    /// 0: the topic's default.
    pub visibility_timeout_ms: u32,
    /// How long to wait when nothing is available (0: answer at once).
    pub wait_ms: u32,
}

/// Names one delivery: the message (partition, offset) and which delivery of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Handle {
    pub partition: u32,
    pub offset: u64,
    /// 1 for the first delivery.
    pub attempt: u32,
}

impl std::fmt::Display for Handle {
    /// `partition:offset:attempt`, the form the CLI prints and parses.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.partition, self.offset, self.attempt)
    }
}

impl std::str::FromStr for Handle {
    type Err = String;

    fn from_str(text: &str) -> Result<Handle, String> {
        let mut parts = text.split(':');
        let mut next = |what: &str| {
            parts.next().ok_or_else(|| {
                format!("handle {text:?} has no {what}: expected partition:offset:attempt")
            })
        };
        let partition = next("partition")?;
        let offset = next("offset")?;
        let attempt = next("attempt")?;
        if parts.next().is_some() {
            return Err(format!(
                "handle {text:?} has more than three parts: expected partition:offset:attempt"
            ));
        }
        let number = |what: &str, value: &str| {
            value
                .parse::<u64>()
                .map_err(|_| format!("handle {text:?}: {what} {value:?} is not a number"))
        };
        let partition = u32::try_from(number("partition", partition)?)
            .map_err(|_| format!("handle {text:?}: partition is past u32"))?;
        let offset = number("offset", offset)?;
        let attempt = u32::try_from(number("attempt", attempt)?)
            .map_err(|_| format!("handle {text:?}: attempt is past u32"))?;
        if attempt == 0 {
            return Err(format!("handle {text:?}: attempts count from 1"));
        }
        Ok(Handle {
            partition,
            offset,
            attempt,
        })
    }
}

/// One received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    pub handle: Handle,
    /// The record's timestamp.
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Vec<(String, Bytes)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiveResponse {
    /// Ordered by partition, then offset.
    pub messages: Vec<ReceivedMessage>,
}

/// Consecutive offsets of one partition delivered with the same attempt: how handles
/// travel, so that settling a run of messages costs one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandleRange {
    pub partition: u32,
    pub first_offset: u64,
    /// At least 1.
    pub count: u32,
    pub attempt: u32,
}

impl HandleRange {
    pub fn handles(&self) -> impl Iterator<Item = Handle> + '_ {
        (0..u64::from(self.count)).map(move |index| Handle {
            partition: self.partition,
            offset: self.first_offset + index,
            attempt: self.attempt,
        })
    }
}

/// Packs handles into ranges, in the order given, merging neighbours that continue each
/// other (same partition and attempt, next offset).
pub fn handle_ranges(handles: impl IntoIterator<Item = Handle>) -> Vec<HandleRange> {
    let mut ranges: Vec<HandleRange> = Vec::new();
    for handle in handles {
        if let Some(last) = ranges.last_mut() {
            if last.partition == handle.partition
                && last.attempt == handle.attempt
                && last.count < u32::MAX
                && last.first_offset.checked_add(u64::from(last.count)) == Some(handle.offset)
            {
                last.count += 1;
                continue;
            }
        }
        ranges.push(HandleRange {
            partition: handle.partition,
            first_offset: handle.offset,
            count: 1,
            attempt: handle.attempt,
        });
    }
    ranges
}

/// When a nacked message is delivered again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NackDelay {
    /// The topic's retry policy: exponential backoff with jitter.
    Backoff,
    /// This many milliseconds from now (0: at once).
    Ms(u64),
}

/// What to do with the deliveries an `Settle` request names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettleAction {
    /// Done: never delivered again.
    Ack,
    /// Failed: delivered again after the delay, or dead-lettered after the last attempt.
    Nack { delay: NackDelay, reason: String },
    /// Still working: the lease ends `visibility_timeout_ms` from now instead.
    Extend { visibility_timeout_ms: u32 },
}

/// Ack, nack or extend deliveries of one topic's queue group (one opcode each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettleRequest {
    pub topic: String,
    pub group: String,
    pub action: SettleAction,
    pub ranges: Vec<HandleRange>,
}

/// A handle the broker refused, with why. Handles not listed succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedHandle {
    pub handle: Handle,
    pub error: WireError,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettleResponse {
    pub refused: Vec<RefusedHandle>,
}

/// Describe a topic's groups: one (empty name: every group of the topic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescribeGroupsRequest {
    pub topic: String,
    pub group: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum GroupKind {
    Stream = 1,
    Queue = 2,
}

/// One partition of one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GroupPartition {
    pub partition: u32,
    /// Stream group: the committed offset (`COMMITTED_NONE` if none). Queue group: the
    /// ack floor, below which every message is settled.
    pub position: u64,
    pub log_start_offset: u64,
    pub high_watermark: u64,
    /// Leased right now (queue groups).
    pub in_flight: u32,
    /// Waiting for a retry's backoff or a delivery delay (queue groups).
    pub waiting: u32,
    /// On their way to the DLQ (queue groups).
    pub dead_lettering: u32,
    pub acked: u64,
    pub dead_lettered: u64,
    pub expired_dropped: u64,
    pub lost_to_retention: u64,
    /// Time since the oldest in-flight lease began, 0 when none (queue groups).
    pub oldest_unacked_age_ms: u64,
}

impl GroupPartition {
    /// Messages the group has not yet settled (queue) or read (stream).
    pub fn lag(&self) -> u64 {
        if self.position == COMMITTED_NONE {
            return self.high_watermark.saturating_sub(self.log_start_offset);
        }
        self.high_watermark
            .saturating_sub(self.position.max(self.log_start_offset))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDescription {
    pub name: String,
    pub kind: GroupKind,
    pub partitions: Vec<GroupPartition>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescribeGroupsResponse {
    pub groups: Vec<GroupDescription>,
}

/// Delete every record of a topic stored so far (each partition's log start moves to its
/// high watermark). For dead-letter queues: `shardq dlq purge`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgeTopicRequest {
    pub topic: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PurgedPartition {
    pub partition: u32,
    /// Records removed.
    pub records: u64,
    /// The partition's log start (and high watermark) afterwards.
    pub log_start_offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgeTopicResponse {
    pub partitions: Vec<PurgedPartition>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExpiryPolicy {
    /// An expired message is settled and counted.
    Drop = 1,
    /// An expired message goes to the DLQ with cause `expired`.
    DeadLetter = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum QueueOrdering {
    Unordered = 1,
    /// One message in flight per key (docs/queues.md §8).
    PerKey = 2,
}

/// A topic's queue settings. `None`: the broker's default (`queue_*` config keys). Sent
/// with `CreateTopic` and `AlterTopic` (where `None` leaves a setting as it is) and
/// answered in `Metadata` with every value filled in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueSettings {
    pub deliveries_max: Option<u32>,
    pub visibility_timeout_ms: Option<u64>,
    pub retry_delay_ms_min: Option<u64>,
    pub retry_delay_ms_max: Option<u64>,
    pub message_ttl_ms: Option<u64>,
    pub expiry_policy: Option<ExpiryPolicy>,
    pub ordering: Option<QueueOrdering>,
    /// The dead-letter topic; default `<topic>.dlq`.
    pub dlq_topic: Option<String>,
}

/// Record headers a producer sets to shape delivery to queue groups.
pub mod headers {
    /// u64 LE, Unix ms: not delivered to queue groups before this time.
    pub const DELIVER_AFTER: &str = "deliver_after";
    /// u64 LE, ms from the append time: not delivered after.
    pub const TTL_MS: &str = "ttl_ms";
    /// Added to dead-lettered records (docs/queues.md §3).
    pub const SOURCE_TOPIC: &str = "shardq-source-topic";
    pub const SOURCE_PARTITION: &str = "shardq-source-partition";
    pub const SOURCE_OFFSET: &str = "shardq-source-offset";
    pub const ATTEMPTS: &str = "shardq-attempts";
    pub const DEAD_LETTER_CAUSE: &str = "shardq-dead-letter-cause";
    pub const REASON: &str = "shardq-reason";
    pub const DEAD_LETTERED_AT_MS: &str = "shardq-dead-lettered-at-ms";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_print_and_parse_as_partition_offset_attempt() {
        let handle = Handle {
            partition: 3,
            offset: 17,
            attempt: 2,
        };
        assert_eq!(handle.to_string(), "3:17:2");
        assert_eq!("3:17:2".parse::<Handle>(), Ok(handle));
        for bad in [
            "",
            "3",
            "3:17",
            "3:17:0",
            "3:17:2:1",
            "a:1:1",
            "3:-1:1",
            "4294967296:1:1",
        ] {
            assert!(bad.parse::<Handle>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn ranges_merge_only_continuing_handles() {
        let handle = |partition, offset, attempt| Handle {
            partition,
            offset,
            attempt,
        };
        let ranges = handle_ranges([
            handle(0, 5, 1),
            handle(0, 6, 1),
            handle(0, 7, 2),
            handle(1, 8, 2),
            handle(1, 9, 2),
            handle(1, 11, 2),
        ]);
        assert_eq!(
            ranges,
            vec![
                HandleRange {
                    partition: 0,
                    first_offset: 5,
                    count: 2,
                    attempt: 1
                },
                HandleRange {
                    partition: 0,
                    first_offset: 7,
                    count: 1,
                    attempt: 2
                },
                HandleRange {
                    partition: 1,
                    first_offset: 8,
                    count: 2,
                    attempt: 2
                },
                HandleRange {
                    partition: 1,
                    first_offset: 11,
                    count: 1,
                    attempt: 2
                },
            ]
        );
        let back: Vec<Handle> = ranges.iter().flat_map(HandleRange::handles).collect();
        assert_eq!(back.len(), 6);
        assert_eq!(back[2], handle(0, 7, 2));
    }
}
