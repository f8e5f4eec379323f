//! Bodies of the consumer-group operations: stream groups (commit and read committed
//! offsets) and queue groups (receive, ack, nack, extend), group description, topic purge
//! and the per-topic queue settings. docs/protocol.md §11 has the byte layouts; the model
//! is docs/queues.md.

use bytes::Bytes;

use super::codec::{Reader, Writer};
use super::{
    decode_status, encode_status, is_valid_topic_name, quote_untrusted, read_topic_name,
    DecodeLimits, Opcode, ProtocolError, Request, ResponseBody, WireError,
};

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

/// Change one queue group's own settings, which win over the topic's. Only the retry
/// delays (`retry_delay_ms_min`, `retry_delay_ms_max`) may be set per group; a value
/// present sets the group's override, an absent one leaves it as it is. The group is
/// created on the topic's partitions if it does not exist yet (docs/queues.md §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlterGroupRequest {
    pub topic: String,
    pub group: String,
    pub settings: QueueSettings,
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
    /// u64 LE: the source value's length, on a DLQ copy whose value was cut to fit a
    /// batch (docs/queues.md §3).
    pub const TRUNCATED: &str = "shardq-truncated";
    /// Headers whose name starts with this are the broker's: a DLQ copy drops the
    /// source's own (a producer cannot forge where a copy came from).
    pub const BROKER_PREFIX: &str = "shardq-";
}

// ---- Codec. Layouts: docs/protocol.md §11. Every function reads or writes one body (or
// one part of one) with the shared `Reader` / `Writer`; list counts are bounded by the
// caller's limits and by the bytes present.

/// Bytes one `HandleRange` takes on the wire.
pub const HANDLE_RANGE_SIZE: usize = 4 + 8 + 4 + 4;

const SETTING_DELIVERIES_MAX: u16 = 1;
const SETTING_VISIBILITY_TIMEOUT_MS: u16 = 2;
const SETTING_RETRY_DELAY_MS_MIN: u16 = 3;
const SETTING_RETRY_DELAY_MS_MAX: u16 = 4;
const SETTING_MESSAGE_TTL_MS: u16 = 5;
const SETTING_EXPIRY_POLICY: u16 = 6;
const SETTING_ORDERING: u16 = 7;
/// Settings a topic has; a settings list longer than this is malformed.
const SETTINGS_MAX: u32 = 7;

/// `Nack` delay meaning "the topic's retry policy".
pub const NACK_DELAY_BACKOFF: i64 = -1;

impl ExpiryPolicy {
    pub fn from_wire(value: u8) -> Option<ExpiryPolicy> {
        match value {
            1 => Some(ExpiryPolicy::Drop),
            2 => Some(ExpiryPolicy::DeadLetter),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ExpiryPolicy::Drop => "drop",
            ExpiryPolicy::DeadLetter => "dead_letter",
        }
    }
}

impl QueueOrdering {
    pub fn from_wire(value: u8) -> Option<QueueOrdering> {
        match value {
            1 => Some(QueueOrdering::Unordered),
            2 => Some(QueueOrdering::PerKey),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QueueOrdering::Unordered => "unordered",
            QueueOrdering::PerKey => "per_key",
        }
    }
}

impl GroupKind {
    pub fn from_wire(value: u8) -> Option<GroupKind> {
        match value {
            1 => Some(GroupKind::Stream),
            2 => Some(GroupKind::Queue),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GroupKind::Stream => "stream",
            GroupKind::Queue => "queue",
        }
    }
}

/// Settings list: `count u32`, then `(key u16, value u64)` per setting present, then the
/// DLQ topic as a string (empty: not set).
pub(super) fn write_settings(writer: &mut Writer<'_>, settings: &QueueSettings) {
    let mut entries: Vec<(u16, u64)> = Vec::with_capacity(SETTINGS_MAX as usize);
    let mut push = |key, value: Option<u64>| {
        if let Some(value) = value {
            entries.push((key, value));
        }
    };
    push(
        SETTING_DELIVERIES_MAX,
        settings.deliveries_max.map(u64::from),
    );
    push(
        SETTING_VISIBILITY_TIMEOUT_MS,
        settings.visibility_timeout_ms,
    );
    push(SETTING_RETRY_DELAY_MS_MIN, settings.retry_delay_ms_min);
    push(SETTING_RETRY_DELAY_MS_MAX, settings.retry_delay_ms_max);
    push(SETTING_MESSAGE_TTL_MS, settings.message_ttl_ms);
    push(
        SETTING_EXPIRY_POLICY,
        settings.expiry_policy.map(|policy| policy as u64),
    );
    push(
        SETTING_ORDERING,
        settings.ordering.map(|ordering| ordering as u64),
    );
    writer.count(entries.len());
    for (key, value) in entries {
        writer.u16(key);
        writer.u64(value);
    }
    writer.string(settings.dlq_topic.as_deref().unwrap_or(""));
}

pub(super) fn read_settings(reader: &mut Reader) -> Result<QueueSettings, ProtocolError> {
    let count = reader.count("queue_settings", SETTINGS_MAX, 10)?;
    let mut settings = QueueSettings::default();
    let mut previous_key = 0;
    for _ in 0..count {
        let key = reader.u16("setting_key")?;
        let value = reader.u64("setting_value")?;
        let invalid = |field| ProtocolError::InvalidValue { field, value };
        let duplicate = ProtocolError::InvalidValue {
            field: "setting_key (repeated)",
            value: u64::from(key),
        };
        // One encoding per settings list: keys ascending, so decoding and encoding
        // again gives the same bytes.
        if key <= previous_key {
            return Err(ProtocolError::InvalidValue {
                field: "setting_key (not in ascending order)",
                value: u64::from(key),
            });
        }
        previous_key = key;
        match key {
            SETTING_DELIVERIES_MAX => {
                let value = u32::try_from(value).map_err(|_| invalid("deliveries_max"))?;
                if settings.deliveries_max.replace(value).is_some() {
                    return Err(duplicate);
                }
            }
            SETTING_VISIBILITY_TIMEOUT_MS => {
                if settings.visibility_timeout_ms.replace(value).is_some() {
                    return Err(duplicate);
                }
            }
            SETTING_RETRY_DELAY_MS_MIN => {
                if settings.retry_delay_ms_min.replace(value).is_some() {
                    return Err(duplicate);
                }
            }
            SETTING_RETRY_DELAY_MS_MAX => {
                if settings.retry_delay_ms_max.replace(value).is_some() {
                    return Err(duplicate);
                }
            }
            SETTING_MESSAGE_TTL_MS => {
                if settings.message_ttl_ms.replace(value).is_some() {
                    return Err(duplicate);
                }
            }
            SETTING_EXPIRY_POLICY => {
                let policy = u8::try_from(value)
                    .ok()
                    .and_then(ExpiryPolicy::from_wire)
                    .ok_or_else(|| invalid("expiry_policy"))?;
                if settings.expiry_policy.replace(policy).is_some() {
                    return Err(duplicate);
                }
            }
            SETTING_ORDERING => {
                let ordering = u8::try_from(value)
                    .ok()
                    .and_then(QueueOrdering::from_wire)
                    .ok_or_else(|| invalid("ordering"))?;
                if settings.ordering.replace(ordering).is_some() {
                    return Err(duplicate);
                }
            }
            _ => {
                return Err(ProtocolError::InvalidValue {
                    field: "setting_key",
                    value: u64::from(key),
                })
            }
        }
    }
    let dlq = reader.string("dlq_topic")?;
    if !dlq.is_empty() {
        if !is_valid_topic_name(dlq.as_bytes()) {
            return Err(ProtocolError::InvalidTopicName {
                offset: reader.position(),
                length: dlq.len(),
                quoted: quote_untrusted(&dlq),
            });
        }
        settings.dlq_topic = Some(dlq);
    }
    Ok(settings)
}

/// A group name: a string with a topic name's rules. Like a bad topic name, a bad group
/// name is refused without closing the connection (the frame was well delimited).
pub(super) fn read_group_name(reader: &mut Reader) -> Result<String, ProtocolError> {
    let offset = reader.position();
    let length = reader.u16("group")? as usize;
    let bytes = reader.take_bytes(length, "group")?;
    if !is_valid_topic_name(&bytes) {
        return Err(ProtocolError::InvalidGroupName {
            offset,
            length,
            quoted: quote_untrusted(&String::from_utf8_lossy(&bytes)),
        });
    }
    Ok(String::from_utf8(bytes.to_vec()).expect("a valid group name is ASCII"))
}

/// A group name, or the empty string (meaning every group).
fn read_group_name_or_empty(reader: &mut Reader) -> Result<String, ProtocolError> {
    let offset = reader.position();
    let length = reader.u16("group")? as usize;
    let bytes = reader.take_bytes(length, "group")?;
    if !bytes.is_empty() && !is_valid_topic_name(&bytes) {
        return Err(ProtocolError::InvalidGroupName {
            offset,
            length,
            quoted: quote_untrusted(&String::from_utf8_lossy(&bytes)),
        });
    }
    Ok(String::from_utf8(bytes.to_vec()).expect("a valid group name is ASCII"))
}

fn write_ranges(writer: &mut Writer<'_>, ranges: &[HandleRange]) {
    writer.count(ranges.len());
    for range in ranges {
        writer.u32(range.partition);
        writer.u64(range.first_offset);
        writer.u32(range.count);
        writer.u32(range.attempt);
    }
}

fn read_ranges(reader: &mut Reader) -> Result<Vec<HandleRange>, ProtocolError> {
    // Bounded by the frame; the broker caps the handles a request may settle
    // (`queue_handles_per_request_max`) with a typed error rather than a closed connection.
    let count = reader.count("handle_ranges", u32::MAX, HANDLE_RANGE_SIZE)?;
    let mut ranges = Vec::with_capacity(count);
    for _ in 0..count {
        let range = HandleRange {
            partition: reader.u32("partition")?,
            first_offset: reader.u64("first_offset")?,
            count: reader.u32("count")?,
            attempt: reader.u32("attempt")?,
        };
        if range.count == 0 {
            return Err(ProtocolError::InvalidValue {
                field: "handle range count",
                value: 0,
            });
        }
        if range.attempt == 0 {
            return Err(ProtocolError::InvalidValue {
                field: "handle attempt",
                value: 0,
            });
        }
        if range
            .first_offset
            .checked_add(u64::from(range.count))
            .is_none()
        {
            return Err(ProtocolError::InvalidValue {
                field: "handle range first_offset",
                value: range.first_offset,
            });
        }
        ranges.push(range);
    }
    Ok(ranges)
}

pub(super) fn encode_request(request: &Request, writer: &mut Writer<'_>) {
    match request {
        Request::CommitOffsets(request) => {
            writer.string(&request.group);
            writer.string(&request.topic);
            writer.count(request.partitions.len());
            for partition in &request.partitions {
                writer.u32(partition.partition);
                writer.u64(partition.offset);
            }
        }
        Request::FetchCommitted(request) => {
            writer.string(&request.group);
            writer.string(&request.topic);
            writer.count(request.partitions.len());
            for partition in &request.partitions {
                writer.u32(*partition);
            }
        }
        Request::Receive(request) => {
            writer.string(&request.topic);
            writer.string(&request.group);
            writer.u32(request.messages_max);
            writer.u32(request.visibility_timeout_ms);
            writer.u32(request.wait_ms);
        }
        Request::Settle(request) => {
            writer.string(&request.topic);
            writer.string(&request.group);
            match &request.action {
                SettleAction::Ack => {}
                SettleAction::Nack { delay, reason } => {
                    writer.i64(match delay {
                        NackDelay::Backoff => NACK_DELAY_BACKOFF,
                        NackDelay::Ms(ms) => i64::try_from(*ms).unwrap_or(i64::MAX),
                    });
                    writer.string(reason);
                }
                SettleAction::Extend {
                    visibility_timeout_ms,
                } => writer.u32(*visibility_timeout_ms),
            }
            write_ranges(writer, &request.ranges);
        }
        Request::DescribeGroups(request) => {
            writer.string(&request.topic);
            writer.string(&request.group);
        }
        Request::PurgeTopic(request) => writer.string(&request.topic),
        Request::AlterGroup(request) => {
            writer.string(&request.topic);
            writer.string(&request.group);
            write_settings(writer, &request.settings);
        }
        _ => unreachable!("not a consumer-group request: {:?}", request.opcode()),
    }
}

pub(super) fn decode_request(
    opcode: Opcode,
    reader: &mut Reader,
    limits: &DecodeLimits,
) -> Result<Request, ProtocolError> {
    Ok(match opcode {
        Opcode::CommitOffsets => {
            let group = read_group_name(reader)?;
            let topic = read_topic_name(reader)?;
            let count = reader.count("partitions", limits.partitions_per_request_max, 12)?;
            let mut partitions = Vec::with_capacity(count);
            for _ in 0..count {
                partitions.push(CommitPartition {
                    partition: reader.u32("partition")?,
                    offset: reader.u64("offset")?,
                });
            }
            Request::CommitOffsets(CommitOffsetsRequest {
                group,
                topic,
                partitions,
            })
        }
        Opcode::FetchCommitted => {
            let group = read_group_name(reader)?;
            let topic = read_topic_name(reader)?;
            let count = reader.count("partitions", limits.partitions_per_request_max, 4)?;
            let mut partitions = Vec::with_capacity(count);
            for _ in 0..count {
                partitions.push(reader.u32("partition")?);
            }
            Request::FetchCommitted(FetchCommittedRequest {
                group,
                topic,
                partitions,
            })
        }
        Opcode::Receive => Request::Receive(ReceiveRequest {
            topic: read_topic_name(reader)?,
            group: read_group_name(reader)?,
            messages_max: reader.u32("messages_max")?,
            visibility_timeout_ms: reader.u32("visibility_timeout_ms")?,
            wait_ms: reader.u32("wait_ms")?,
        }),
        Opcode::Ack | Opcode::Nack | Opcode::Extend => {
            let topic = read_topic_name(reader)?;
            let group = read_group_name(reader)?;
            let action = match opcode {
                Opcode::Ack => SettleAction::Ack,
                Opcode::Nack => {
                    let delay_ms = reader.i64("delay_ms")?;
                    let delay = match delay_ms {
                        NACK_DELAY_BACKOFF => NackDelay::Backoff,
                        ms if ms >= 0 => NackDelay::Ms(ms as u64),
                        ms => {
                            return Err(ProtocolError::InvalidValue {
                                field: "delay_ms",
                                value: ms as u64,
                            })
                        }
                    };
                    SettleAction::Nack {
                        delay,
                        reason: reader.string("reason")?,
                    }
                }
                _ => SettleAction::Extend {
                    visibility_timeout_ms: reader.u32("visibility_timeout_ms")?,
                },
            };
            Request::Settle(SettleRequest {
                topic,
                group,
                action,
                ranges: read_ranges(reader)?,
            })
        }
        Opcode::DescribeGroups => {
            let topic = read_topic_name(reader)?;
            // Empty: every group of the topic.
            let group = read_group_name_or_empty(reader)?;
            Request::DescribeGroups(DescribeGroupsRequest { topic, group })
        }
        Opcode::PurgeTopic => Request::PurgeTopic(PurgeTopicRequest {
            topic: read_topic_name(reader)?,
        }),
        Opcode::AlterGroup => Request::AlterGroup(AlterGroupRequest {
            topic: read_topic_name(reader)?,
            group: read_group_name(reader)?,
            settings: read_settings(reader)?,
        }),
        other => unreachable!("not a consumer-group opcode: {other:?}"),
    })
}

pub(super) fn encode_response_body(body: &ResponseBody, writer: &mut Writer<'_>) {
    match body {
        ResponseBody::CommitOffsets(response) => {
            writer.count(response.partitions.len());
            for partition in &response.partitions {
                writer.u32(partition.partition);
                encode_status(writer, partition.result.as_ref().err());
            }
        }
        ResponseBody::FetchCommitted(response) => {
            writer.count(response.partitions.len());
            for partition in &response.partitions {
                writer.u32(partition.partition);
                encode_status(writer, partition.result.as_ref().err());
                let offsets = partition.result.as_ref().ok();
                writer.u64(offsets.map_or(COMMITTED_NONE, |offsets| offsets.committed));
                writer.u64(offsets.map_or(0, |offsets| offsets.log_start_offset));
                writer.u64(offsets.map_or(0, |offsets| offsets.high_watermark));
            }
        }
        ResponseBody::Receive(response) => {
            writer.count(response.messages.len());
            for message in &response.messages {
                writer.u32(message.handle.partition);
                writer.u64(message.handle.offset);
                writer.u32(message.handle.attempt);
                writer.i64(message.timestamp_ms);
                match &message.key {
                    Some(key) => {
                        writer.u8(1);
                        writer.bytes(key);
                    }
                    None => writer.u8(0),
                }
                writer.bytes(&message.value);
                writer.count(message.headers.len());
                for (name, value) in &message.headers {
                    writer.string(name);
                    writer.bytes(value);
                }
            }
        }
        ResponseBody::Settle(response) => {
            writer.count(response.refused.len());
            for refused in &response.refused {
                writer.u32(refused.handle.partition);
                writer.u64(refused.handle.offset);
                writer.u32(refused.handle.attempt);
                encode_status(writer, Some(&refused.error));
            }
        }
        ResponseBody::DescribeGroups(response) => {
            writer.count(response.groups.len());
            for group in &response.groups {
                writer.string(&group.name);
                writer.u8(group.kind as u8);
                writer.count(group.partitions.len());
                for partition in &group.partitions {
                    writer.u32(partition.partition);
                    writer.u64(partition.position);
                    writer.u64(partition.log_start_offset);
                    writer.u64(partition.high_watermark);
                    writer.u32(partition.in_flight);
                    writer.u32(partition.waiting);
                    writer.u32(partition.dead_lettering);
                    writer.u64(partition.acked);
                    writer.u64(partition.dead_lettered);
                    writer.u64(partition.expired_dropped);
                    writer.u64(partition.lost_to_retention);
                    writer.u64(partition.oldest_unacked_age_ms);
                }
            }
        }
        ResponseBody::PurgeTopic(response) => {
            writer.count(response.partitions.len());
            for partition in &response.partitions {
                writer.u32(partition.partition);
                writer.u64(partition.records);
                writer.u64(partition.log_start_offset);
            }
        }
        _ => unreachable!("not a consumer-group response"),
    }
}

/// Bytes one `GroupPartition` takes on the wire.
const GROUP_PARTITION_SIZE: usize = 4 + 8 * 3 + 4 * 3 + 8 * 5;

pub(super) fn decode_response_body(
    opcode: Opcode,
    reader: &mut Reader,
) -> Result<ResponseBody, ProtocolError> {
    // Lists in responses come from the broker we asked; bound them by the bytes present.
    let unbounded = u32::MAX;
    Ok(match opcode {
        Opcode::CommitOffsets => {
            let count = reader.count("partitions", unbounded, 8)?;
            let mut partitions = Vec::with_capacity(count);
            for _ in 0..count {
                let partition = reader.u32("partition")?;
                let result = match decode_status(reader)? {
                    None => Ok(()),
                    Some(error) => Err(error),
                };
                partitions.push(CommitPartitionResult { partition, result });
            }
            ResponseBody::CommitOffsets(CommitOffsetsResponse { partitions })
        }
        Opcode::FetchCommitted => {
            let count = reader.count("partitions", unbounded, 32)?;
            let mut partitions = Vec::with_capacity(count);
            for _ in 0..count {
                let partition = reader.u32("partition")?;
                let error = decode_status(reader)?;
                let offsets = CommittedOffset {
                    committed: reader.u64("committed")?,
                    log_start_offset: reader.u64("log_start_offset")?,
                    high_watermark: reader.u64("high_watermark")?,
                };
                partitions.push(FetchCommittedPartitionResult {
                    partition,
                    result: match error {
                        None => Ok(offsets),
                        Some(error) => Err(error),
                    },
                });
            }
            ResponseBody::FetchCommitted(FetchCommittedResponse { partitions })
        }
        Opcode::Receive => {
            let count = reader.count("messages", unbounded, 33)?;
            let mut messages = Vec::with_capacity(count);
            for _ in 0..count {
                let handle = Handle {
                    partition: reader.u32("partition")?,
                    offset: reader.u64("offset")?,
                    attempt: reader.u32("attempt")?,
                };
                let timestamp_ms = reader.i64("timestamp_ms")?;
                let key = match reader.u8("has_key")? {
                    0 => None,
                    1 => Some(reader.bytes("key")?),
                    other => {
                        return Err(ProtocolError::InvalidValue {
                            field: "has_key",
                            value: u64::from(other),
                        })
                    }
                };
                let value = reader.bytes("value")?;
                let header_count = reader.count("headers", unbounded, 6)?;
                let mut headers = Vec::with_capacity(header_count);
                for _ in 0..header_count {
                    headers.push((reader.string("header_name")?, reader.bytes("header_value")?));
                }
                messages.push(ReceivedMessage {
                    handle,
                    timestamp_ms,
                    key,
                    value,
                    headers,
                });
            }
            ResponseBody::Receive(ReceiveResponse { messages })
        }
        Opcode::Ack | Opcode::Nack | Opcode::Extend => {
            let count = reader.count("refused", unbounded, 20)?;
            let mut refused = Vec::with_capacity(count);
            for _ in 0..count {
                let handle = Handle {
                    partition: reader.u32("partition")?,
                    offset: reader.u64("offset")?,
                    attempt: reader.u32("attempt")?,
                };
                let error = decode_status(reader)?.ok_or(ProtocolError::InvalidValue {
                    field: "refused handle error_code",
                    value: 0,
                })?;
                refused.push(RefusedHandle { handle, error });
            }
            ResponseBody::Settle(SettleResponse { refused })
        }
        Opcode::DescribeGroups => {
            let count = reader.count("groups", unbounded, 7)?;
            let mut groups = Vec::with_capacity(count);
            for _ in 0..count {
                let name = reader.string("group")?;
                let kind_value = reader.u8("kind")?;
                let kind = GroupKind::from_wire(kind_value).ok_or(ProtocolError::InvalidValue {
                    field: "kind",
                    value: u64::from(kind_value),
                })?;
                let partition_count =
                    reader.count("partitions", unbounded, GROUP_PARTITION_SIZE)?;
                let mut partitions = Vec::with_capacity(partition_count);
                for _ in 0..partition_count {
                    partitions.push(GroupPartition {
                        partition: reader.u32("partition")?,
                        position: reader.u64("position")?,
                        log_start_offset: reader.u64("log_start_offset")?,
                        high_watermark: reader.u64("high_watermark")?,
                        in_flight: reader.u32("in_flight")?,
                        waiting: reader.u32("waiting")?,
                        dead_lettering: reader.u32("dead_lettering")?,
                        acked: reader.u64("acked")?,
                        dead_lettered: reader.u64("dead_lettered")?,
                        expired_dropped: reader.u64("expired_dropped")?,
                        lost_to_retention: reader.u64("lost_to_retention")?,
                        oldest_unacked_age_ms: reader.u64("oldest_unacked_age_ms")?,
                    });
                }
                groups.push(GroupDescription {
                    name,
                    kind,
                    partitions,
                });
            }
            ResponseBody::DescribeGroups(DescribeGroupsResponse { groups })
        }
        Opcode::PurgeTopic => {
            let count = reader.count("partitions", unbounded, 20)?;
            let mut partitions = Vec::with_capacity(count);
            for _ in 0..count {
                partitions.push(PurgedPartition {
                    partition: reader.u32("partition")?,
                    records: reader.u64("records")?,
                    log_start_offset: reader.u64("log_start_offset")?,
                });
            }
            ResponseBody::PurgeTopic(PurgeTopicResponse { partitions })
        }
        other => unreachable!("not a consumer-group opcode: {other:?}"),
    })
}

#[cfg(test)]
pub(super) mod tests {
    use bytes::BytesMut;

    use super::super::{decode_frame_header, decode_response, encode_response, Decoded};
    use super::*;

    pub(crate) fn every_setting() -> QueueSettings {
        QueueSettings {
            deliveries_max: Some(5),
            visibility_timeout_ms: Some(30_000),
            retry_delay_ms_min: Some(100),
            retry_delay_ms_max: Some(60_000),
            message_ttl_ms: Some(86_400_000),
            expiry_policy: Some(ExpiryPolicy::DeadLetter),
            ordering: Some(QueueOrdering::PerKey),
            dlq_topic: Some("orders.failed".into()),
        }
    }

    fn frame(request: &Request) -> (Opcode, Bytes) {
        let mut out = BytesMut::new();
        request.encode(7, &mut out);
        let Decoded::Complete(header) = decode_frame_header(&out, 1 << 20).unwrap() else {
            panic!("whole frame was given");
        };
        let opcode = Opcode::from_wire(header.opcode).unwrap();
        (
            opcode,
            out.freeze().slice(super::super::FRAME_HEADER_SIZE..),
        )
    }

    fn roundtrip(request: Request) {
        let (opcode, body) = frame(&request);
        assert_eq!(opcode, request.opcode());
        let decoded = Request::decode(opcode, body, &DecodeLimits::default()).unwrap();
        assert_eq!(decoded, request);
    }

    fn roundtrip_response(opcode: Opcode, body: ResponseBody) {
        let mut out = BytesMut::new();
        encode_response(&mut out, opcode, 9, Ok(&body));
        let decoded = decode_response(
            opcode,
            out.freeze().slice(super::super::FRAME_HEADER_SIZE..),
        )
        .unwrap()
        .unwrap();
        assert_eq!(decoded, body);
    }

    fn ranges() -> Vec<HandleRange> {
        vec![
            HandleRange {
                partition: 0,
                first_offset: 10,
                count: 3,
                attempt: 1,
            },
            HandleRange {
                partition: 2,
                first_offset: 0,
                count: 1,
                attempt: 4,
            },
        ]
    }

    /// The worked examples of docs/protocol.md §11.4, §11.5 and §11.8, byte for byte, read
    /// from the document.
    #[test]
    fn documented_examples_encode_as_shown() {
        use super::super::protocol_md_example_bytes as documented;
        let mut out = BytesMut::new();
        Request::Receive(ReceiveRequest {
            topic: "orders".into(),
            group: "billing".into(),
            messages_max: 10,
            visibility_timeout_ms: 0,
            wait_ms: 1000,
        })
        .encode(1, &mut out);
        let receive = documented("Worked example: receive up to 10 messages");
        assert_eq!(receive.len(), 45, "protocol.md §11.4 says 45 bytes");
        assert_eq!(out.to_vec(), receive, "protocol.md §11.4");
        let mut out = BytesMut::new();
        Request::Settle(SettleRequest {
            topic: "orders".into(),
            group: "billing".into(),
            action: SettleAction::Ack,
            ranges: handle_ranges((17..20).map(|offset| Handle {
                partition: 0,
                offset,
                attempt: 1,
            })),
        })
        .encode(2, &mut out);
        let ack = documented("Worked example: ack offsets 17, 18 and 19");
        assert_eq!(ack.len(), 57, "protocol.md §11.5 says 57 bytes");
        assert_eq!(out.to_vec(), ack, "protocol.md §11.5");
        // §11.8: the body after the 16-byte header.
        let mut out = BytesMut::new();
        Request::AlterGroup(AlterGroupRequest {
            topic: "orders".into(),
            group: "fast".into(),
            settings: QueueSettings {
                retry_delay_ms_min: Some(20),
                retry_delay_ms_max: Some(20),
                ..QueueSettings::default()
            },
        })
        .encode(3, &mut out);
        let body = out.split_off(super::super::FRAME_HEADER_SIZE);
        assert_eq!(
            body.to_vec(),
            documented("Example body (after the 16-byte header), topic `orders`, group `fast`"),
            "protocol.md §11.8"
        );
    }

    #[test]
    fn a_group_partition_takes_its_documented_size() {
        let mut out = BytesMut::new();
        encode_response(
            &mut out,
            Opcode::DescribeGroups,
            1,
            Ok(&ResponseBody::DescribeGroups(DescribeGroupsResponse {
                groups: vec![GroupDescription {
                    name: String::new(),
                    kind: GroupKind::Stream,
                    partitions: vec![GroupPartition::default()],
                }],
            })),
        );
        // header, status (2 + 2), group count, name (2), kind, partition count, entry.
        assert_eq!(out.len(), 16 + 4 + 4 + 2 + 1 + 4 + GROUP_PARTITION_SIZE);
        assert_eq!(GROUP_PARTITION_SIZE, 80);
    }

    #[test]
    fn every_group_request_roundtrips() {
        roundtrip(Request::CommitOffsets(CommitOffsetsRequest {
            group: "billing".into(),
            topic: "orders".into(),
            partitions: vec![CommitPartition {
                partition: 1,
                offset: 99,
            }],
        }));
        roundtrip(Request::FetchCommitted(FetchCommittedRequest {
            group: "billing".into(),
            topic: "orders".into(),
            partitions: vec![0, 3],
        }));
        roundtrip(Request::Receive(ReceiveRequest {
            topic: "orders".into(),
            group: "billing".into(),
            messages_max: 10,
            visibility_timeout_ms: 0,
            wait_ms: 20_000,
        }));
        for action in [
            SettleAction::Ack,
            SettleAction::Nack {
                delay: NackDelay::Backoff,
                reason: "db timeout".into(),
            },
            SettleAction::Nack {
                delay: NackDelay::Ms(0),
                reason: String::new(),
            },
            SettleAction::Extend {
                visibility_timeout_ms: 120_000,
            },
        ] {
            roundtrip(Request::Settle(SettleRequest {
                topic: "orders".into(),
                group: "billing".into(),
                action,
                ranges: ranges(),
            }));
        }
        for group in ["", "billing"] {
            roundtrip(Request::DescribeGroups(DescribeGroupsRequest {
                topic: "orders".into(),
                group: group.into(),
            }));
        }
        roundtrip(Request::PurgeTopic(PurgeTopicRequest {
            topic: "orders.dlq".into(),
        }));
    }

    #[test]
    fn alter_group_roundtrips_with_any_settings_list() {
        let retry_only = QueueSettings {
            retry_delay_ms_min: Some(20),
            retry_delay_ms_max: Some(40),
            ..QueueSettings::default()
        };
        // The codec carries every setting; the broker refuses the ones a group cannot set.
        for settings in [QueueSettings::default(), retry_only, every_setting()] {
            roundtrip(Request::AlterGroup(AlterGroupRequest {
                topic: "orders".into(),
                group: "billing".into(),
                settings,
            }));
        }
        roundtrip_response(Opcode::AlterGroup, ResponseBody::AlterGroup);
        assert_eq!(Opcode::from_wire(17), Some(Opcode::AlterGroup));
        assert_eq!(Opcode::from_wire(18), Some(Opcode::Stats));
        assert_eq!(Opcode::from_wire(19), None);
    }

    #[test]
    fn every_group_response_roundtrips() {
        let refused = WireError::new(super::super::ErrorCode::HandleStale, "now attempt 3");
        roundtrip_response(
            Opcode::CommitOffsets,
            ResponseBody::CommitOffsets(CommitOffsetsResponse {
                partitions: vec![
                    CommitPartitionResult {
                        partition: 0,
                        result: Ok(()),
                    },
                    CommitPartitionResult {
                        partition: 9,
                        result: Err(refused.clone()),
                    },
                ],
            }),
        );
        roundtrip_response(
            Opcode::FetchCommitted,
            ResponseBody::FetchCommitted(FetchCommittedResponse {
                partitions: vec![FetchCommittedPartitionResult {
                    partition: 0,
                    result: Ok(CommittedOffset {
                        committed: COMMITTED_NONE,
                        log_start_offset: 4,
                        high_watermark: 10,
                    }),
                }],
            }),
        );
        roundtrip_response(
            Opcode::Receive,
            ResponseBody::Receive(ReceiveResponse {
                messages: vec![
                    ReceivedMessage {
                        handle: Handle {
                            partition: 1,
                            offset: 17,
                            attempt: 2,
                        },
                        timestamp_ms: 1_700_000_000_000,
                        key: Some(Bytes::from_static(b"k")),
                        value: Bytes::from_static(b"value"),
                        headers: vec![("deliver_after".into(), Bytes::from_static(&[1; 8]))],
                    },
                    ReceivedMessage {
                        handle: Handle {
                            partition: 1,
                            offset: 18,
                            attempt: 1,
                        },
                        timestamp_ms: 0,
                        key: None,
                        value: Bytes::new(),
                        headers: Vec::new(),
                    },
                ],
            }),
        );
        for opcode in [Opcode::Ack, Opcode::Nack, Opcode::Extend] {
            roundtrip_response(
                opcode,
                ResponseBody::Settle(SettleResponse {
                    refused: vec![RefusedHandle {
                        handle: Handle {
                            partition: 0,
                            offset: 3,
                            attempt: 1,
                        },
                        error: refused.clone(),
                    }],
                }),
            );
        }
        roundtrip_response(
            Opcode::DescribeGroups,
            ResponseBody::DescribeGroups(DescribeGroupsResponse {
                groups: vec![GroupDescription {
                    name: "billing".into(),
                    kind: GroupKind::Queue,
                    partitions: vec![GroupPartition {
                        partition: 0,
                        position: 5,
                        log_start_offset: 1,
                        high_watermark: 20,
                        in_flight: 3,
                        waiting: 2,
                        dead_lettering: 1,
                        acked: 4,
                        dead_lettered: 6,
                        expired_dropped: 7,
                        lost_to_retention: 8,
                        oldest_unacked_age_ms: 9,
                    }],
                }],
            }),
        );
        roundtrip_response(
            Opcode::PurgeTopic,
            ResponseBody::PurgeTopic(PurgeTopicResponse {
                partitions: vec![PurgedPartition {
                    partition: 0,
                    records: 12,
                    log_start_offset: 12,
                }],
            }),
        );
    }

    #[test]
    fn bad_group_names_are_refused_in_sync_and_bad_ranges_close() {
        let bad_group = Request::Receive(ReceiveRequest {
            topic: "orders".into(),
            group: "a/b".into(),
            messages_max: 1,
            visibility_timeout_ms: 0,
            wait_ms: 0,
        });
        let (opcode, body) = frame(&bad_group);
        let error = Request::decode(opcode, body, &DecodeLimits::default()).unwrap_err();
        assert!(
            matches!(error, ProtocolError::InvalidGroupName { .. }),
            "{error}"
        );
        assert_eq!(error.code(), super::super::ErrorCode::InvalidGroupName);
        assert!(!error.closes_connection());

        for (range, field) in [
            ((0, 1, 0, 1), "handle range count"),
            ((0, 1, 1, 0), "handle attempt"),
            ((0, u64::MAX, 1, 1), "handle range first_offset"),
        ] {
            let request = Request::Settle(SettleRequest {
                topic: "orders".into(),
                group: "billing".into(),
                action: SettleAction::Ack,
                ranges: vec![HandleRange {
                    partition: range.0,
                    first_offset: range.1,
                    count: range.2,
                    attempt: range.3,
                }],
            });
            let (opcode, body) = frame(&request);
            let error = Request::decode(opcode, body, &DecodeLimits::default()).unwrap_err();
            assert!(
                matches!(error, ProtocolError::InvalidValue { field: f, .. } if f == field),
                "{error}"
            );
            assert!(error.closes_connection());
        }
    }

    #[test]
    fn settings_refuse_unknown_keys_repeats_and_bad_enums() {
        use super::super::codec::Writer;
        let decode = |entries: &[(u16, u64)]| {
            let mut buffer = BytesMut::new();
            let mut writer = Writer::new(&mut buffer);
            writer.count(entries.len());
            for (key, value) in entries {
                writer.u16(*key);
                writer.u64(*value);
            }
            writer.string("");
            read_settings(&mut Reader::new(buffer.freeze()))
        };
        assert_eq!(
            decode(&[(1, 3), (6, 1)]).unwrap(),
            QueueSettings {
                deliveries_max: Some(3),
                expiry_policy: Some(ExpiryPolicy::Drop),
                ..Default::default()
            }
        );
        for entries in [
            &[(99u16, 1u64)][..],
            &[(1, 3), (1, 4)],
            // Found by the request_decoders fuzz target: out of order, so an encode of
            // the decoded settings would not give the same bytes.
            &[(2, 1000), (1, 164)],
            &[(0, 1)],
            &[(6, 3)],
            &[(7, 0)],
            &[(1, u64::from(u32::MAX) + 1)],
        ] {
            assert!(decode(entries).is_err(), "{entries:?} decoded");
        }
    }

    #[test]
    fn a_nack_delay_below_minus_one_is_malformed() {
        let request = Request::Settle(SettleRequest {
            topic: "orders".into(),
            group: "billing".into(),
            action: SettleAction::Nack {
                delay: NackDelay::Backoff,
                reason: String::new(),
            },
            ranges: ranges(),
        });
        let (opcode, body) = frame(&request);
        let mut bytes = body.to_vec();
        // topic (2 + 6) and group (2 + 7) come first, then the delay.
        bytes[17..25].copy_from_slice(&(-2i64).to_le_bytes());
        let error =
            Request::decode(opcode, Bytes::from(bytes), &DecodeLimits::default()).unwrap_err();
        assert!(
            matches!(
                error,
                ProtocolError::InvalidValue {
                    field: "delay_ms",
                    ..
                }
            ),
            "{error}"
        );
    }

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
