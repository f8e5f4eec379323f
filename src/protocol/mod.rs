//! Wire protocol v1: a sans-IO codec shared by the broker and the client.
//!
//! What it is: the frame header, the request and response bodies, the record batch format
//! and the error codes. What it is not: anything that reads a socket. `decode_frame_header`
//! looks at a byte slice and says `Incomplete` when it needs more bytes; bodies decode from
//! a `Bytes` so that record batches stay zero-copy slices of the received frame; encoders
//! append to a caller-owned `BytesMut`. It runs on whatever core calls it.
//!
//! The byte-level spec, with diagrams, is docs/protocol.md.
//!
//! ```text
//! frame header (16 bytes, little-endian)
//!  0 body_length    u32  bytes after the header
//!  4 version        u8   PROTOCOL_VERSION
//!  5 opcode         u8   Opcode
//!  6 flags          u16  bit 0: response
//!  8 correlation_id u64  chosen by the client, echoed in the response
//! ```

pub mod batch;
pub mod codec;
pub mod queue;
pub mod stats;

pub use queue::{
    AlterGroupRequest, CommitOffsetsRequest, CommitOffsetsResponse, DescribeGroupsRequest,
    DescribeGroupsResponse, FetchCommittedRequest, FetchCommittedResponse, PurgeTopicRequest,
    PurgeTopicResponse, QueueSettings, ReceiveRequest, ReceiveResponse, SettleAction,
    SettleRequest, SettleResponse,
};

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

pub use codec::{Reader, Writer};
pub use stats::{PartitionStats, ShardStats, StatsRequest, StatsResponse};

pub const PROTOCOL_VERSION: u8 = 1;
pub const FRAME_HEADER_SIZE: usize = 16;
pub const FLAG_RESPONSE: u16 = 1;
/// Topic names: what fits in a directory name on every filesystem we target.
pub const TOPIC_NAME_BYTES_MAX: usize = 200;

const _: () = assert!(
    4 + 1 + 1 + 2 + 8 == FRAME_HEADER_SIZE,
    "frame header fields must fill the header or every frame after the first misparses"
);

/// Operations of protocol v1. The numbers are the wire values and never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    Handshake = 1,
    Metadata = 2,
    CreateTopic = 3,
    DeleteTopic = 4,
    Produce = 5,
    Fetch = 6,
    AlterTopic = 7,
    ListOffsets = 8,
    CommitOffsets = 9,
    FetchCommitted = 10,
    Receive = 11,
    Ack = 12,
    Nack = 13,
    Extend = 14,
    DescribeGroups = 15,
    PurgeTopic = 16,
    AlterGroup = 17,
    Stats = 18,
}

impl Opcode {
    pub fn from_wire(value: u8) -> Option<Opcode> {
        Some(match value {
            1 => Opcode::Handshake,
            2 => Opcode::Metadata,
            3 => Opcode::CreateTopic,
            4 => Opcode::DeleteTopic,
            5 => Opcode::Produce,
            6 => Opcode::Fetch,
            7 => Opcode::AlterTopic,
            8 => Opcode::ListOffsets,
            9 => Opcode::CommitOffsets,
            10 => Opcode::FetchCommitted,
            11 => Opcode::Receive,
            12 => Opcode::Ack,
            13 => Opcode::Nack,
            14 => Opcode::Extend,
            15 => Opcode::DescribeGroups,
            16 => Opcode::PurgeTopic,
            17 => Opcode::AlterGroup,
            18 => Opcode::Stats,
            _ => return None,
        })
    }

    /// Snake-case name, as metrics label operations.
    pub fn name(self) -> &'static str {
        match self {
            Opcode::Handshake => "handshake",
            Opcode::Metadata => "metadata",
            Opcode::CreateTopic => "create_topic",
            Opcode::DeleteTopic => "delete_topic",
            Opcode::Produce => "produce",
            Opcode::Fetch => "fetch",
            Opcode::AlterTopic => "alter_topic",
            Opcode::ListOffsets => "list_offsets",
            Opcode::CommitOffsets => "commit_offsets",
            Opcode::FetchCommitted => "fetch_committed",
            Opcode::Receive => "receive",
            Opcode::Ack => "ack",
            Opcode::Nack => "nack",
            Opcode::Extend => "extend",
            Opcode::DescribeGroups => "describe_groups",
            Opcode::PurgeTopic => "purge_topic",
            Opcode::AlterGroup => "alter_group",
            Opcode::Stats => "stats",
        }
    }
}

/// Error codes carried in responses. Zero is success. The numbers are the wire values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    None = 0,
    /// The frame or body did not parse; the connection is closed after this response.
    MalformedFrame = 1,
    UnsupportedVersion = 2,
    UnknownOpcode = 3,
    FrameTooLarge = 4,
    UnknownTopic = 5,
    UnknownPartition = 6,
    TopicAlreadyExists = 7,
    InvalidTopicName = 8,
    InvalidPartitionCount = 9,
    /// A record batch failed its CRC check.
    CorruptBatch = 10,
    /// A record batch was framed wrongly (lengths, counts, offset deltas) or too large.
    InvalidBatch = 11,
    OffsetOutOfRange = 12,
    /// The log could not be written or read; the message says what the disk said.
    StorageError = 13,
    /// The request waited longer than its timeout (produce) for durability.
    Timeout = 14,
    ShuttingDown = 15,
    /// A configured limit was reached (connections, in-flight requests, memory).
    LimitExceeded = 16,
    InvalidRequest = 17,
    Internal = 18,
    /// The broker's disk is full: nothing was appended; try again later.
    StorageFull = 19,
    /// An idempotent producer's batch is neither the next in its sequence nor one of its
    /// recent batches (a gap, or a batch too old to tell from a duplicate): nothing was
    /// appended.
    OutOfOrderSequence = 20,
    /// A produced batch's timestamps are impossible (negative, max below first) or
    /// further in the future than the broker allows.
    InvalidTimestamp = 21,
    /// A queue-group handle names a delivery that was superseded: the message was
    /// delivered again since (the message names the current attempt).
    HandleStale = 22,
    /// The lease of the handle's delivery ran out; it will be (or was) delivered again.
    LeaseExpired = 23,
    /// The message is already settled (acked, dead-lettered, expired or removed by
    /// retention): a retried ack can treat this as success.
    AlreadySettled = 24,
    /// The handle names a message the group never delivered.
    NotDelivered = 25,
    /// A consumer group name is empty, too long or has characters outside `[A-Za-z0-9._-]`.
    InvalidGroupName = 26,
}

impl ErrorCode {
    pub fn from_wire(value: u16) -> ErrorCode {
        match value {
            0 => ErrorCode::None,
            1 => ErrorCode::MalformedFrame,
            2 => ErrorCode::UnsupportedVersion,
            3 => ErrorCode::UnknownOpcode,
            4 => ErrorCode::FrameTooLarge,
            5 => ErrorCode::UnknownTopic,
            6 => ErrorCode::UnknownPartition,
            7 => ErrorCode::TopicAlreadyExists,
            8 => ErrorCode::InvalidTopicName,
            9 => ErrorCode::InvalidPartitionCount,
            10 => ErrorCode::CorruptBatch,
            11 => ErrorCode::InvalidBatch,
            12 => ErrorCode::OffsetOutOfRange,
            13 => ErrorCode::StorageError,
            14 => ErrorCode::Timeout,
            15 => ErrorCode::ShuttingDown,
            16 => ErrorCode::LimitExceeded,
            17 => ErrorCode::InvalidRequest,
            19 => ErrorCode::StorageFull,
            20 => ErrorCode::OutOfOrderSequence,
            21 => ErrorCode::InvalidTimestamp,
            22 => ErrorCode::HandleStale,
            23 => ErrorCode::LeaseExpired,
            24 => ErrorCode::AlreadySettled,
            25 => ErrorCode::NotDelivered,
            26 => ErrorCode::InvalidGroupName,
            // Codes from a newer broker read as Internal rather than failing the decode.
            _ => ErrorCode::Internal,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::None => "none",
            ErrorCode::MalformedFrame => "malformed_frame",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::UnknownOpcode => "unknown_opcode",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::UnknownTopic => "unknown_topic",
            ErrorCode::UnknownPartition => "unknown_partition",
            ErrorCode::TopicAlreadyExists => "topic_already_exists",
            ErrorCode::InvalidTopicName => "invalid_topic_name",
            ErrorCode::InvalidPartitionCount => "invalid_partition_count",
            ErrorCode::CorruptBatch => "corrupt_batch",
            ErrorCode::InvalidBatch => "invalid_batch",
            ErrorCode::OffsetOutOfRange => "offset_out_of_range",
            ErrorCode::StorageError => "storage_error",
            ErrorCode::Timeout => "timeout",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::Internal => "internal",
            ErrorCode::StorageFull => "storage_full",
            ErrorCode::OutOfOrderSequence => "out_of_order_sequence",
            ErrorCode::InvalidTimestamp => "invalid_timestamp",
            ErrorCode::HandleStale => "handle_stale",
            ErrorCode::LeaseExpired => "lease_expired",
            ErrorCode::AlreadySettled => "already_settled",
            ErrorCode::NotDelivered => "not_delivered",
            ErrorCode::InvalidGroupName => "invalid_group_name",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An error with its code and a message for people. Carried in responses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> WireError {
        WireError {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for WireError {}

/// Why bytes could not be decoded. Each variant says where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    Truncated {
        field: &'static str,
        offset: usize,
        need: usize,
        have: usize,
    },
    InvalidUtf8 {
        field: &'static str,
        offset: usize,
        source: std::str::Utf8Error,
    },
    TooMany {
        field: &'static str,
        count: u32,
        count_max: u32,
    },
    TrailingBytes {
        offset: usize,
        count: usize,
    },
    UnsupportedVersion {
        version: u8,
    },
    UnknownOpcode {
        opcode: u8,
    },
    FrameTooLarge {
        body_length: u32,
        body_length_max: u32,
    },
    InvalidValue {
        field: &'static str,
        value: u64,
    },
    /// A topic name in a request breaks the naming rules (`validate_topic_name`). The
    /// frame itself was well delimited, so the connection stays in sync; only a bounded
    /// prefix of the name is kept, never the whole untrusted string.
    InvalidTopicName {
        offset: usize,
        length: usize,
        quoted: String,
    },
    /// The same for a consumer group's name (same rules as a topic name).
    InvalidGroupName {
        offset: usize,
        length: usize,
        quoted: String,
    },
}

impl ProtocolError {
    /// Whether the connection must close after this error: the stream can no longer be
    /// trusted to be in sync (bad version, oversized length, a body that does not parse).
    /// An unknown opcode or an invalid topic name leaves it in sync.
    pub fn closes_connection(&self) -> bool {
        !matches!(
            self,
            ProtocolError::UnknownOpcode { .. }
                | ProtocolError::InvalidTopicName { .. }
                | ProtocolError::InvalidGroupName { .. }
        )
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            ProtocolError::UnknownOpcode { .. } => ErrorCode::UnknownOpcode,
            ProtocolError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            ProtocolError::InvalidTopicName { .. } => ErrorCode::InvalidTopicName,
            ProtocolError::InvalidGroupName { .. } => ErrorCode::InvalidGroupName,
            _ => ErrorCode::MalformedFrame,
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::Truncated {
                field,
                offset,
                need,
                have,
            } => write!(
                f,
                "{field} at byte {offset} needs {need} bytes, only {have} left"
            ),
            ProtocolError::InvalidUtf8 {
                field,
                offset,
                source,
            } => write!(f, "{field} at byte {offset} is not UTF-8: {source}"),
            ProtocolError::TooMany {
                field,
                count,
                count_max,
            } => write!(f, "{field} lists {count} entries, at most {count_max} allowed"),
            ProtocolError::TrailingBytes { offset, count } => {
                write!(f, "{count} unexpected bytes after the body, from byte {offset}")
            }
            ProtocolError::UnsupportedVersion { version } => write!(
                f,
                "protocol version {version} is not supported (this broker speaks {PROTOCOL_VERSION})"
            ),
            ProtocolError::UnknownOpcode { opcode } => write!(f, "unknown opcode {opcode}"),
            ProtocolError::FrameTooLarge {
                body_length,
                body_length_max,
            } => write!(
                f,
                "frame body of {body_length} bytes exceeds the maximum of {body_length_max}"
            ),
            ProtocolError::InvalidValue { field, value } => {
                write!(f, "{field} has invalid value {value}")
            }
            ProtocolError::InvalidTopicName {
                offset,
                length,
                quoted,
            } => write!(
                f,
                "topic name {quoted} ({length} bytes, at byte {offset}) must be 1 to {TOPIC_NAME_BYTES_MAX} bytes of letters, digits, '.', '_' or '-'"
            ),
            ProtocolError::InvalidGroupName {
                offset,
                length,
                quoted,
            } => write!(
                f,
                "group name {quoted} ({length} bytes, at byte {offset}) must be 1 to {} bytes of letters, digits, '.', '_' or '-'",
                queue::GROUP_NAME_BYTES_MAX
            ),
        }
    }
}

impl std::error::Error for ProtocolError {}

/// The outcome of decoding from a buffer that may not hold a whole item yet.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<T> {
    /// More bytes are needed: at least this many in total.
    Incomplete {
        need: usize,
    },
    Complete(T),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub body_length: u32,
    pub version: u8,
    /// Raw opcode: an unknown value is reported after the body is skipped, so that the
    /// connection can answer it and keep going.
    pub opcode: u8,
    pub flags: u16,
    pub correlation_id: u64,
}

impl FrameHeader {
    pub fn is_response(&self) -> bool {
        self.flags & FLAG_RESPONSE != 0
    }

    pub fn frame_length(&self) -> usize {
        FRAME_HEADER_SIZE + self.body_length as usize
    }
}

/// Decodes a frame header and checks it against `body_length_max` and the version.
/// The header is returned inside the error's context by the caller (it has the bytes), so
/// it can answer with the right correlation id before closing.
pub fn decode_frame_header(
    bytes: &[u8],
    body_length_max: u32,
) -> Result<Decoded<FrameHeader>, ProtocolError> {
    if bytes.len() < FRAME_HEADER_SIZE {
        return Ok(Decoded::Incomplete {
            need: FRAME_HEADER_SIZE,
        });
    }
    let header = FrameHeader {
        body_length: u32::from_le_bytes(bytes[0..4].try_into().expect("four bytes")),
        version: bytes[4],
        opcode: bytes[5],
        flags: u16::from_le_bytes([bytes[6], bytes[7]]),
        correlation_id: u64::from_le_bytes(bytes[8..16].try_into().expect("eight bytes")),
    };
    if header.version != PROTOCOL_VERSION {
        return Err(ProtocolError::UnsupportedVersion {
            version: header.version,
        });
    }
    if header.body_length > body_length_max {
        return Err(ProtocolError::FrameTooLarge {
            body_length: header.body_length,
            body_length_max,
        });
    }
    Ok(Decoded::Complete(header))
}

/// Reads the correlation id of a header-sized prefix without validating anything, so that
/// a refusal can still be addressed to the request it refuses.
pub fn peek_correlation_id(bytes: &[u8]) -> Option<u64> {
    bytes
        .get(8..16)
        .map(|id| u64::from_le_bytes(id.try_into().expect("eight bytes")))
}

/// Writes a frame: reserves the header, lets `body` append, then fills in the length.
pub fn encode_frame(
    out: &mut BytesMut,
    opcode: u8,
    flags: u16,
    correlation_id: u64,
    body: impl FnOnce(&mut Writer<'_>),
) {
    let start = out.len();
    out.put_bytes(0, FRAME_HEADER_SIZE);
    body(&mut Writer::new(out));
    let body_length =
        u32::try_from(out.len() - start - FRAME_HEADER_SIZE).expect("frame below 4 GiB");
    let header = &mut out[start..start + FRAME_HEADER_SIZE];
    header[0..4].copy_from_slice(&body_length.to_le_bytes());
    header[4] = PROTOCOL_VERSION;
    header[5] = opcode;
    header[6..8].copy_from_slice(&flags.to_le_bytes());
    header[8..16].copy_from_slice(&correlation_id.to_le_bytes());
}

/// Writes the status that opens every response body.
fn encode_status(writer: &mut Writer<'_>, error: Option<&WireError>) {
    match error {
        None => {
            writer.u16(ErrorCode::None as u16);
            writer.string("");
        }
        Some(error) => {
            writer.u16(error.code as u16);
            writer.string(truncate_message(&error.message));
        }
    }
}

fn truncate_message(message: &str) -> &str {
    const MESSAGE_BYTES_MAX: usize = 4096;
    if message.len() <= MESSAGE_BYTES_MAX {
        return message;
    }
    let mut end = MESSAGE_BYTES_MAX;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

fn decode_status(reader: &mut Reader) -> Result<Option<WireError>, ProtocolError> {
    let code = ErrorCode::from_wire(reader.u16("error_code")?);
    let message = reader.string("error_message")?;
    Ok(match code {
        ErrorCode::None => None,
        code => Some(WireError { code, message }),
    })
}

/// Durability a producer asks for, per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Acks {
    /// No response at all; errors are only logged by the broker.
    None = 0,
    /// Answered once the batch is in the partition's memory.
    Memory = 1,
    /// Answered once an fdatasync covering the batch has completed.
    Durable = 2,
}

impl Acks {
    pub fn from_wire(value: u8) -> Option<Acks> {
        match value {
            0 => Some(Acks::None),
            1 => Some(Acks::Memory),
            2 => Some(Acks::Durable),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Acks::None => "none",
            Acks::Memory => "memory",
            Acks::Durable => "durable",
        }
    }
}

impl std::str::FromStr for Acks {
    type Err = String;
    fn from_str(text: &str) -> Result<Acks, String> {
        match text {
            "none" => Ok(Acks::None),
            "memory" => Ok(Acks::Memory),
            "durable" => Ok(Acks::Durable),
            other => Err(format!(
                "acks must be none, memory or durable, not {other:?}"
            )),
        }
    }
}

/// Limits the decoder enforces on list lengths. Frame size bounds the total; these bound
/// the work per request.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    pub topics_per_request_max: u32,
    pub partitions_per_request_max: u32,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            topics_per_request_max: 1024,
            partitions_per_request_max: 16384,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeRequest {
    pub client_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeResponse {
    pub protocol_version: u8,
    pub shard_count: u16,
    /// The shard that accepted this connection.
    pub shard_id: u16,
    pub server_version: String,
    /// The largest record batch this broker takes, so producers size batches to fit.
    pub batch_bytes_max: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataRequest {
    /// Empty means every topic.
    pub topics: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionMetadata {
    pub partition: u32,
    pub shard: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicMetadata {
    pub name: String,
    pub error: Option<WireError>,
    pub partitions: Vec<PartitionMetadata>,
    pub retention: Retention,
    /// Every setting filled in (the topic's own or the broker's default).
    pub queue: QueueSettings,
}

/// How long a topic keeps data. Whole segments are deleted from the head once the
/// partition is larger than `bytes_max`, or once their newest batch was appended more than
/// `ms_max` ago; 0 means no limit. The active segment is never deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    pub bytes_max: u64,
    pub ms_max: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataResponse {
    /// Port of each shard's own listener, indexed by shard id. The host is the one the
    /// client connected to.
    pub shard_ports: Vec<u16>,
    pub topics: Vec<TopicMetadata>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateTopicRequest {
    pub name: String,
    pub partitions: u32,
    pub retention: Retention,
    /// `None` settings take the broker's defaults.
    pub queue: QueueSettings,
}

/// Changes a topic's retention (applies from the next retention check) and queue
/// settings. `None` leaves a value as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlterTopicRequest {
    pub name: String,
    pub retention: Option<Retention>,
    pub queue: QueueSettings,
}

/// `ListOffsets` timestamp meaning "the first offset still stored".
pub const TIMESTAMP_EARLIEST: i64 = -2;
/// `ListOffsets` timestamp meaning "the high watermark".
pub const TIMESTAMP_LATEST: i64 = -1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListOffsetsPartition {
    pub partition: u32,
    /// Milliseconds since the epoch, or `TIMESTAMP_EARLIEST` / `TIMESTAMP_LATEST`.
    pub timestamp_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListOffsetsTopic {
    pub name: String,
    pub partitions: Vec<ListOffsetsPartition>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListOffsetsRequest {
    pub topics: Vec<ListOffsetsTopic>,
}

/// The first offset whose record timestamp is at or after the asked time (the high
/// watermark when none is that late), with the partition's range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionOffsets {
    pub offset: u64,
    pub log_start_offset: u64,
    pub high_watermark: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListOffsetsPartitionResult {
    pub partition: u32,
    pub result: Result<PartitionOffsets, WireError>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListOffsetsTopicResult {
    pub name: String,
    pub partitions: Vec<ListOffsetsPartitionResult>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListOffsetsResponse {
    pub topics: Vec<ListOffsetsTopicResult>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteTopicRequest {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducePartition {
    pub partition: u32,
    /// Exactly one record batch.
    pub batch: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProduceTopic {
    pub name: String,
    pub partitions: Vec<ProducePartition>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProduceRequest {
    pub acks: Acks,
    pub timeout_ms: u32,
    pub topics: Vec<ProduceTopic>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducePartitionResult {
    pub partition: u32,
    /// The offset given to the batch's first record, or the error.
    pub result: Result<u64, WireError>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProduceTopicResult {
    pub name: String,
    pub partitions: Vec<ProducePartitionResult>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProduceResponse {
    pub topics: Vec<ProduceTopicResult>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchPartition {
    pub partition: u32,
    pub offset: u64,
    pub bytes_max: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchTopic {
    pub name: String,
    pub partitions: Vec<FetchPartition>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchRequest {
    /// How long to wait for data when none is readable yet.
    pub wait_ms_max: u32,
    /// Total across partitions; each partition still returns at least one whole batch.
    pub bytes_max: u32,
    pub topics: Vec<FetchTopic>,
}

/// One partition's answer to a fetch. The offsets are sent with errors too, so an
/// `OffsetOutOfRange` carries the valid range `[log_start_offset, high_watermark]`;
/// they are 0 when the partition is unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchPartitionData {
    /// The first offset still stored.
    pub log_start_offset: u64,
    /// One past the last offset a consumer may read (the durable watermark).
    pub high_watermark: u64,
    /// Whole record batches, concatenated (may begin before the requested offset), or
    /// why there are none.
    pub batches: Result<Bytes, WireError>,
}

impl FetchPartitionData {
    pub fn refused(error: WireError) -> FetchPartitionData {
        FetchPartitionData {
            log_start_offset: 0,
            high_watermark: 0,
            batches: Err(error),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchPartitionResult {
    pub partition: u32,
    pub data: FetchPartitionData,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchTopicResult {
    pub name: String,
    pub partitions: Vec<FetchPartitionResult>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchResponse {
    pub topics: Vec<FetchTopicResult>,
}

/// A decoded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Handshake(HandshakeRequest),
    Metadata(MetadataRequest),
    CreateTopic(CreateTopicRequest),
    DeleteTopic(DeleteTopicRequest),
    Produce(ProduceRequest),
    Fetch(FetchRequest),
    AlterTopic(AlterTopicRequest),
    ListOffsets(ListOffsetsRequest),
    CommitOffsets(CommitOffsetsRequest),
    FetchCommitted(FetchCommittedRequest),
    Receive(ReceiveRequest),
    /// Ack, Nack or Extend, by its action.
    Settle(SettleRequest),
    DescribeGroups(DescribeGroupsRequest),
    PurgeTopic(PurgeTopicRequest),
    AlterGroup(AlterGroupRequest),
    Stats(StatsRequest),
}

impl Request {
    pub fn opcode(&self) -> Opcode {
        match self {
            Request::Handshake(_) => Opcode::Handshake,
            Request::Metadata(_) => Opcode::Metadata,
            Request::CreateTopic(_) => Opcode::CreateTopic,
            Request::DeleteTopic(_) => Opcode::DeleteTopic,
            Request::Produce(_) => Opcode::Produce,
            Request::Fetch(_) => Opcode::Fetch,
            Request::AlterTopic(_) => Opcode::AlterTopic,
            Request::ListOffsets(_) => Opcode::ListOffsets,
            Request::CommitOffsets(_) => Opcode::CommitOffsets,
            Request::FetchCommitted(_) => Opcode::FetchCommitted,
            Request::Receive(_) => Opcode::Receive,
            Request::Settle(request) => match request.action {
                SettleAction::Ack => Opcode::Ack,
                SettleAction::Nack { .. } => Opcode::Nack,
                SettleAction::Extend { .. } => Opcode::Extend,
            },
            Request::DescribeGroups(_) => Opcode::DescribeGroups,
            Request::PurgeTopic(_) => Opcode::PurgeTopic,
            Request::AlterGroup(_) => Opcode::AlterGroup,
            Request::Stats(_) => Opcode::Stats,
        }
    }

    /// Decodes a request body for a known opcode.
    pub fn decode(
        opcode: Opcode,
        body: Bytes,
        limits: &DecodeLimits,
    ) -> Result<Request, ProtocolError> {
        let mut reader = Reader::new(body);
        let request = match opcode {
            Opcode::Handshake => Request::Handshake(HandshakeRequest {
                client_name: reader.string("client_name")?,
            }),
            Opcode::Metadata => {
                let count = reader.count("topics", limits.topics_per_request_max, 2)?;
                let mut topics = Vec::with_capacity(count);
                for _ in 0..count {
                    topics.push(read_topic_name(&mut reader)?);
                }
                Request::Metadata(MetadataRequest { topics })
            }
            Opcode::CreateTopic => Request::CreateTopic(CreateTopicRequest {
                name: read_topic_name(&mut reader)?,
                partitions: reader.u32("partitions")?,
                retention: Retention {
                    bytes_max: reader.u64("retention_bytes_max")?,
                    ms_max: reader.u64("retention_ms_max")?,
                },
                // Optional (§5.3): a body that ends after retention_ms_max, as clients
                // written before queue settings send it, takes every default.
                queue: if reader.remaining() == 0 {
                    QueueSettings::default()
                } else {
                    queue::read_settings(&mut reader)?
                },
            }),
            Opcode::AlterTopic => Request::AlterTopic(AlterTopicRequest {
                name: read_topic_name(&mut reader)?,
                retention: match reader.u8("has_retention")? {
                    0 => None,
                    1 => Some(Retention {
                        bytes_max: reader.u64("retention_bytes_max")?,
                        ms_max: reader.u64("retention_ms_max")?,
                    }),
                    other => {
                        return Err(ProtocolError::InvalidValue {
                            field: "has_retention",
                            value: u64::from(other),
                        })
                    }
                },
                queue: queue::read_settings(&mut reader)?,
            }),
            Opcode::CommitOffsets
            | Opcode::FetchCommitted
            | Opcode::Receive
            | Opcode::Ack
            | Opcode::Nack
            | Opcode::Extend
            | Opcode::DescribeGroups
            | Opcode::PurgeTopic
            | Opcode::AlterGroup => queue::decode_request(opcode, &mut reader, limits)?,
            Opcode::Stats => Request::Stats(stats::decode_request(&mut reader, limits)?),
            Opcode::ListOffsets => {
                let topic_count = reader.count("topics", limits.topics_per_request_max, 6)?;
                let mut topics = Vec::with_capacity(topic_count);
                let mut partitions_total = 0u64;
                for _ in 0..topic_count {
                    let name = read_topic_name(&mut reader)?;
                    let count =
                        reader.count("partitions", limits.partitions_per_request_max, 12)?;
                    partitions_total += count as u64;
                    if partitions_total > u64::from(limits.partitions_per_request_max) {
                        return Err(ProtocolError::TooMany {
                            field: "partitions",
                            count: u32::try_from(partitions_total).unwrap_or(u32::MAX),
                            count_max: limits.partitions_per_request_max,
                        });
                    }
                    let mut partitions = Vec::with_capacity(count);
                    for _ in 0..count {
                        partitions.push(ListOffsetsPartition {
                            partition: reader.u32("partition")?,
                            timestamp_ms: reader.i64("timestamp_ms")?,
                        });
                    }
                    topics.push(ListOffsetsTopic { name, partitions });
                }
                Request::ListOffsets(ListOffsetsRequest { topics })
            }
            Opcode::DeleteTopic => Request::DeleteTopic(DeleteTopicRequest {
                name: read_topic_name(&mut reader)?,
            }),
            Opcode::Produce => {
                let acks_value = reader.u8("acks")?;
                let acks = Acks::from_wire(acks_value).ok_or(ProtocolError::InvalidValue {
                    field: "acks",
                    value: u64::from(acks_value),
                })?;
                let timeout_ms = reader.u32("timeout_ms")?;
                let topic_count = reader.count("topics", limits.topics_per_request_max, 6)?;
                let mut topics = Vec::with_capacity(topic_count);
                let mut partitions_total = 0u64;
                for _ in 0..topic_count {
                    let name = read_topic_name(&mut reader)?;
                    let count = reader.count("partitions", limits.partitions_per_request_max, 8)?;
                    partitions_total += count as u64;
                    if partitions_total > u64::from(limits.partitions_per_request_max) {
                        return Err(ProtocolError::TooMany {
                            field: "partitions",
                            count: u32::try_from(partitions_total).unwrap_or(u32::MAX),
                            count_max: limits.partitions_per_request_max,
                        });
                    }
                    let mut partitions = Vec::with_capacity(count);
                    for _ in 0..count {
                        partitions.push(ProducePartition {
                            partition: reader.u32("partition")?,
                            batch: reader.bytes("batch")?,
                        });
                    }
                    topics.push(ProduceTopic { name, partitions });
                }
                Request::Produce(ProduceRequest {
                    acks,
                    timeout_ms,
                    topics,
                })
            }
            Opcode::Fetch => {
                let wait_ms_max = reader.u32("wait_ms_max")?;
                let bytes_max = reader.u32("bytes_max")?;
                let topic_count = reader.count("topics", limits.topics_per_request_max, 6)?;
                let mut topics = Vec::with_capacity(topic_count);
                let mut partitions_total = 0u64;
                for _ in 0..topic_count {
                    let name = read_topic_name(&mut reader)?;
                    let count =
                        reader.count("partitions", limits.partitions_per_request_max, 16)?;
                    partitions_total += count as u64;
                    if partitions_total > u64::from(limits.partitions_per_request_max) {
                        return Err(ProtocolError::TooMany {
                            field: "partitions",
                            count: u32::try_from(partitions_total).unwrap_or(u32::MAX),
                            count_max: limits.partitions_per_request_max,
                        });
                    }
                    let mut partitions = Vec::with_capacity(count);
                    for _ in 0..count {
                        partitions.push(FetchPartition {
                            partition: reader.u32("partition")?,
                            offset: reader.u64("offset")?,
                            bytes_max: reader.u32("bytes_max")?,
                        });
                    }
                    topics.push(FetchTopic { name, partitions });
                }
                Request::Fetch(FetchRequest {
                    wait_ms_max,
                    bytes_max,
                    topics,
                })
            }
        };
        reader.finish()?;
        Ok(request)
    }

    /// Encodes the whole request frame.
    pub fn encode(&self, correlation_id: u64, out: &mut BytesMut) {
        self.encode_cutting(correlation_id, out, usize::MAX, &mut Vec::new());
    }

    /// Encodes the request frame as buffers, for a vectored write: it is appended to
    /// `out`, except that each record batch of a Produce request of at least
    /// `REQUEST_PART_BYTES_MIN` bytes is not copied. For each such batch, what `out` holds
    /// up to it (earlier frames included) is split off into `parts`, followed by the
    /// batch itself (a reference to the caller's bytes). Writing `parts` in order and
    /// then what is left in `out` gives exactly the bytes `encode` appends.
    pub fn encode_parts(&self, correlation_id: u64, out: &mut BytesMut, parts: &mut Vec<Bytes>) {
        let start = out.len();
        let mut cuts = Vec::new();
        self.encode_cutting(correlation_id, out, REQUEST_PART_BYTES_MIN, &mut cuts);
        if cuts.is_empty() {
            return;
        }
        // The frame's length counts the batches left out of `out`.
        let left_out: usize = cuts.iter().map(|(_, batch)| batch.len()).sum();
        let length_field = &mut out[start..start + 4];
        let body_length = u32::from_le_bytes(length_field.try_into().expect("4 bytes"));
        let body_length =
            u32::try_from(body_length as usize + left_out).expect("frame below 4 GiB");
        length_field.copy_from_slice(&body_length.to_le_bytes());
        let mut taken = 0;
        for (position, batch) in cuts {
            parts.push(out.split_to(position - taken).freeze());
            parts.push(batch);
            taken = position;
        }
    }

    /// Encodes the frame into `out`; a Produce batch of at least `cut_min` bytes gets
    /// only its length written, and its position in `out` (where its bytes belong) is
    /// recorded in `cuts`. The header's length counts only what is in `out`.
    fn encode_cutting(
        &self,
        correlation_id: u64,
        out: &mut BytesMut,
        cut_min: usize,
        cuts: &mut Vec<(usize, Bytes)>,
    ) {
        encode_frame(
            out,
            self.opcode() as u8,
            0,
            correlation_id,
            |writer| match self {
                Request::Handshake(request) => writer.string(&request.client_name),
                Request::Metadata(request) => {
                    writer.count(request.topics.len());
                    for topic in &request.topics {
                        writer.string(topic);
                    }
                }
                Request::CreateTopic(request) => {
                    writer.string(&request.name);
                    writer.u32(request.partitions);
                    writer.u64(request.retention.bytes_max);
                    writer.u64(request.retention.ms_max);
                    queue::write_settings(writer, &request.queue);
                }
                Request::AlterTopic(request) => {
                    writer.string(&request.name);
                    match request.retention {
                        Some(retention) => {
                            writer.u8(1);
                            writer.u64(retention.bytes_max);
                            writer.u64(retention.ms_max);
                        }
                        None => writer.u8(0),
                    }
                    queue::write_settings(writer, &request.queue);
                }
                Request::CommitOffsets(_)
                | Request::FetchCommitted(_)
                | Request::Receive(_)
                | Request::Settle(_)
                | Request::DescribeGroups(_)
                | Request::PurgeTopic(_)
                | Request::AlterGroup(_) => queue::encode_request(self, writer),
                Request::Stats(request) => stats::encode_request(request, writer),
                Request::ListOffsets(request) => {
                    writer.count(request.topics.len());
                    for topic in &request.topics {
                        writer.string(&topic.name);
                        writer.count(topic.partitions.len());
                        for partition in &topic.partitions {
                            writer.u32(partition.partition);
                            writer.i64(partition.timestamp_ms);
                        }
                    }
                }
                Request::DeleteTopic(request) => writer.string(&request.name),
                Request::Produce(request) => {
                    writer.u8(request.acks as u8);
                    writer.u32(request.timeout_ms);
                    writer.count(request.topics.len());
                    for topic in &request.topics {
                        writer.string(&topic.name);
                        writer.count(topic.partitions.len());
                        for partition in &topic.partitions {
                            writer.u32(partition.partition);
                            if partition.batch.len() < cut_min {
                                writer.bytes(&partition.batch);
                                continue;
                            }
                            writer.u32(
                                u32::try_from(partition.batch.len())
                                    .expect("wire byte strings are below 4 GiB"),
                            );
                            cuts.push((writer.buffer.len(), partition.batch.clone()));
                        }
                    }
                }
                Request::Fetch(request) => {
                    writer.u32(request.wait_ms_max);
                    writer.u32(request.bytes_max);
                    writer.count(request.topics.len());
                    for topic in &request.topics {
                        writer.string(&topic.name);
                        writer.count(topic.partitions.len());
                        for partition in &topic.partitions {
                            writer.u32(partition.partition);
                            writer.u64(partition.offset);
                            writer.u32(partition.bytes_max);
                        }
                    }
                }
            },
        );
    }
}

/// A decoded response body (after the status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseBody {
    Handshake(HandshakeResponse),
    Metadata(MetadataResponse),
    CreateTopic,
    DeleteTopic,
    Produce(ProduceResponse),
    Fetch(FetchResponse),
    AlterTopic,
    ListOffsets(ListOffsetsResponse),
    CommitOffsets(CommitOffsetsResponse),
    FetchCommitted(FetchCommittedResponse),
    Receive(ReceiveResponse),
    /// The answer to Ack, Nack and Extend.
    Settle(SettleResponse),
    DescribeGroups(DescribeGroupsResponse),
    PurgeTopic(PurgeTopicResponse),
    AlterGroup,
    Stats(StatsResponse),
}

/// Encodes a response frame: status, then the body when the status is success.
pub fn encode_response(
    out: &mut BytesMut,
    opcode: Opcode,
    correlation_id: u64,
    response: Result<&ResponseBody, &WireError>,
) {
    encode_frame(out, opcode as u8, FLAG_RESPONSE, correlation_id, |writer| {
        let body = match response {
            Ok(body) => {
                encode_status(writer, None);
                body
            }
            Err(error) => {
                encode_status(writer, Some(error));
                return;
            }
        };
        match body {
            ResponseBody::Handshake(response) => {
                writer.u8(response.protocol_version);
                writer.u16(response.shard_count);
                writer.u16(response.shard_id);
                writer.string(&response.server_version);
                writer.u32(response.batch_bytes_max);
            }
            ResponseBody::Metadata(response) => {
                writer.count(response.shard_ports.len());
                for port in &response.shard_ports {
                    writer.u16(*port);
                }
                writer.count(response.topics.len());
                for topic in &response.topics {
                    writer.string(&topic.name);
                    encode_status(writer, topic.error.as_ref());
                    writer.count(topic.partitions.len());
                    for partition in &topic.partitions {
                        writer.u32(partition.partition);
                        writer.u16(partition.shard);
                    }
                    writer.u64(topic.retention.bytes_max);
                    writer.u64(topic.retention.ms_max);
                    queue::write_settings(writer, &topic.queue);
                }
            }
            ResponseBody::CreateTopic
            | ResponseBody::DeleteTopic
            | ResponseBody::AlterTopic
            | ResponseBody::AlterGroup => {}
            ResponseBody::CommitOffsets(_)
            | ResponseBody::FetchCommitted(_)
            | ResponseBody::Receive(_)
            | ResponseBody::Settle(_)
            | ResponseBody::DescribeGroups(_)
            | ResponseBody::PurgeTopic(_) => queue::encode_response_body(body, writer),
            ResponseBody::Stats(response) => stats::encode_response(response, writer),
            ResponseBody::ListOffsets(response) => {
                writer.count(response.topics.len());
                for topic in &response.topics {
                    writer.string(&topic.name);
                    writer.count(topic.partitions.len());
                    for partition in &topic.partitions {
                        writer.u32(partition.partition);
                        encode_status(writer, partition.result.as_ref().err());
                        let offsets = partition.result.as_ref().ok();
                        writer.u64(offsets.map_or(0, |offsets| offsets.offset));
                        writer.u64(offsets.map_or(0, |offsets| offsets.log_start_offset));
                        writer.u64(offsets.map_or(0, |offsets| offsets.high_watermark));
                    }
                }
            }
            ResponseBody::Produce(response) => {
                writer.count(response.topics.len());
                for topic in &response.topics {
                    writer.string(&topic.name);
                    writer.count(topic.partitions.len());
                    for partition in &topic.partitions {
                        writer.u32(partition.partition);
                        match &partition.result {
                            Ok(base_offset) => {
                                encode_status(writer, None);
                                writer.u64(*base_offset);
                            }
                            Err(error) => {
                                encode_status(writer, Some(error));
                                writer.u64(0);
                            }
                        }
                    }
                }
            }
            ResponseBody::Fetch(response) => {
                writer.count(response.topics.len());
                for topic in &response.topics {
                    writer.string(&topic.name);
                    writer.count(topic.partitions.len());
                    for partition in &topic.partitions {
                        writer.u32(partition.partition);
                        let data = &partition.data;
                        encode_status(writer, data.batches.as_ref().err());
                        writer.u64(data.log_start_offset);
                        writer.u64(data.high_watermark);
                        writer.bytes(data.batches.as_deref().unwrap_or_default());
                    }
                }
            }
        }
    });
}

/// Record batches at least this large stay in their own buffers in
/// `encode_response_parts` instead of being copied into the frame.
pub const RESPONSE_PART_BYTES_MIN: usize = 16 * 1024;
/// Produce batches at least this long are written by the client from the caller's
/// buffers (`Request::encode_parts`) instead of being copied into the frame.
pub const REQUEST_PART_BYTES_MIN: usize = RESPONSE_PART_BYTES_MIN;

/// Encodes a response frame as buffers that, written one after another, are exactly the
/// bytes `encode_response` produces. A Fetch response's record batches of at least
/// `RESPONSE_PART_BYTES_MIN` bytes are not copied: they are parts of their own (zero-copy
/// slices of what the log read), between parts holding the fields around them. Every
/// other response is one part.
pub fn encode_response_parts(
    opcode: Opcode,
    correlation_id: u64,
    response: Result<&ResponseBody, &WireError>,
) -> Vec<Bytes> {
    let Ok(ResponseBody::Fetch(fetch)) = response else {
        let mut out = BytesMut::new();
        encode_response(&mut out, opcode, correlation_id, response);
        return vec![out.freeze()];
    };
    let mut parts = Vec::new();
    let mut fields = BytesMut::new();
    {
        let mut writer = Writer::new(&mut fields);
        encode_status(&mut writer, None);
        writer.count(fetch.topics.len());
    }
    for topic in &fetch.topics {
        let mut writer = Writer::new(&mut fields);
        writer.string(&topic.name);
        writer.count(topic.partitions.len());
        for partition in &topic.partitions {
            let mut writer = Writer::new(&mut fields);
            writer.u32(partition.partition);
            let data = &partition.data;
            encode_status(&mut writer, data.batches.as_ref().err());
            writer.u64(data.log_start_offset);
            writer.u64(data.high_watermark);
            let batches = data.batches.clone().unwrap_or_default();
            if batches.len() < RESPONSE_PART_BYTES_MIN {
                writer.bytes(&batches);
                continue;
            }
            writer.u32(u32::try_from(batches.len()).expect("wire byte strings are below 4 GiB"));
            parts.push(fields.split().freeze());
            parts.push(batches);
        }
    }
    parts.push(fields.freeze());
    let body_length: usize = parts.iter().map(Bytes::len).sum();
    let mut header = BytesMut::with_capacity(FRAME_HEADER_SIZE);
    header.put_u32_le(u32::try_from(body_length).expect("frame below 4 GiB"));
    header.put_u8(PROTOCOL_VERSION);
    header.put_u8(opcode as u8);
    header.put_u16_le(FLAG_RESPONSE);
    header.put_u64_le(correlation_id);
    parts.insert(0, header.freeze());
    parts.retain(|part| !part.is_empty());
    parts
}

/// Encodes an error response for a raw opcode, which may be one this broker does not
/// know (the refusal of an unknown opcode echoes it).
pub fn encode_error_response(
    out: &mut BytesMut,
    opcode: u8,
    correlation_id: u64,
    error: &WireError,
) {
    encode_frame(out, opcode, FLAG_RESPONSE, correlation_id, |writer| {
        encode_status(writer, Some(error));
    });
}

/// Decodes a response body: `Err(WireError)` inside `Ok` is the broker's refusal.
pub fn decode_response(
    opcode: Opcode,
    body: Bytes,
) -> Result<Result<ResponseBody, WireError>, ProtocolError> {
    let mut reader = Reader::new(body);
    if let Some(error) = decode_status(&mut reader)? {
        // A refusal may come with a body from a newer broker; ignore what follows.
        return Ok(Err(error));
    }
    // Lists in responses come from the broker we asked; bound them by the bytes present.
    let unbounded = u32::MAX;
    let body = match opcode {
        Opcode::Handshake => ResponseBody::Handshake(HandshakeResponse {
            protocol_version: reader.u8("protocol_version")?,
            shard_count: reader.u16("shard_count")?,
            shard_id: reader.u16("shard_id")?,
            server_version: reader.string("server_version")?,
            batch_bytes_max: reader.u32("batch_bytes_max")?,
        }),
        Opcode::Metadata => {
            let port_count = reader.count("shard_ports", unbounded, 2)?;
            let mut shard_ports = Vec::with_capacity(port_count);
            for _ in 0..port_count {
                shard_ports.push(reader.u16("shard_port")?);
            }
            let topic_count = reader.count("topics", unbounded, 8)?;
            let mut topics = Vec::with_capacity(topic_count);
            for _ in 0..topic_count {
                let name = reader.string("topic")?;
                let error = decode_status(&mut reader)?;
                let partition_count = reader.count("partitions", unbounded, 6)?;
                let mut partitions = Vec::with_capacity(partition_count);
                for _ in 0..partition_count {
                    partitions.push(PartitionMetadata {
                        partition: reader.u32("partition")?,
                        shard: reader.u16("shard")?,
                    });
                }
                let retention = Retention {
                    bytes_max: reader.u64("retention_bytes_max")?,
                    ms_max: reader.u64("retention_ms_max")?,
                };
                let queue = queue::read_settings(&mut reader)?;
                topics.push(TopicMetadata {
                    name,
                    error,
                    partitions,
                    retention,
                    queue,
                });
            }
            ResponseBody::Metadata(MetadataResponse {
                shard_ports,
                topics,
            })
        }
        Opcode::CreateTopic => ResponseBody::CreateTopic,
        Opcode::DeleteTopic => ResponseBody::DeleteTopic,
        Opcode::AlterTopic => ResponseBody::AlterTopic,
        Opcode::AlterGroup => ResponseBody::AlterGroup,
        Opcode::Stats => ResponseBody::Stats(stats::decode_response(&mut reader)?),
        Opcode::CommitOffsets
        | Opcode::FetchCommitted
        | Opcode::Receive
        | Opcode::Ack
        | Opcode::Nack
        | Opcode::Extend
        | Opcode::DescribeGroups
        | Opcode::PurgeTopic => queue::decode_response_body(opcode, &mut reader)?,
        Opcode::ListOffsets => {
            let topic_count = reader.count("topics", unbounded, 6)?;
            let mut topics = Vec::with_capacity(topic_count);
            for _ in 0..topic_count {
                let name = reader.string("topic")?;
                let partition_count = reader.count("partitions", unbounded, 32)?;
                let mut partitions = Vec::with_capacity(partition_count);
                for _ in 0..partition_count {
                    let partition = reader.u32("partition")?;
                    let error = decode_status(&mut reader)?;
                    let offsets = PartitionOffsets {
                        offset: reader.u64("offset")?,
                        log_start_offset: reader.u64("log_start_offset")?,
                        high_watermark: reader.u64("high_watermark")?,
                    };
                    partitions.push(ListOffsetsPartitionResult {
                        partition,
                        result: match error {
                            None => Ok(offsets),
                            Some(error) => Err(error),
                        },
                    });
                }
                topics.push(ListOffsetsTopicResult { name, partitions });
            }
            ResponseBody::ListOffsets(ListOffsetsResponse { topics })
        }
        Opcode::Produce => {
            let topic_count = reader.count("topics", unbounded, 6)?;
            let mut topics = Vec::with_capacity(topic_count);
            for _ in 0..topic_count {
                let name = reader.string("topic")?;
                let partition_count = reader.count("partitions", unbounded, 16)?;
                let mut partitions = Vec::with_capacity(partition_count);
                for _ in 0..partition_count {
                    let partition = reader.u32("partition")?;
                    let error = decode_status(&mut reader)?;
                    let base_offset = reader.u64("base_offset")?;
                    partitions.push(ProducePartitionResult {
                        partition,
                        result: match error {
                            None => Ok(base_offset),
                            Some(error) => Err(error),
                        },
                    });
                }
                topics.push(ProduceTopicResult { name, partitions });
            }
            ResponseBody::Produce(ProduceResponse { topics })
        }
        Opcode::Fetch => {
            let topic_count = reader.count("topics", unbounded, 6)?;
            let mut topics = Vec::with_capacity(topic_count);
            for _ in 0..topic_count {
                let name = reader.string("topic")?;
                let partition_count = reader.count("partitions", unbounded, 28)?;
                let mut partitions = Vec::with_capacity(partition_count);
                for _ in 0..partition_count {
                    let partition = reader.u32("partition")?;
                    let error = decode_status(&mut reader)?;
                    let log_start_offset = reader.u64("log_start_offset")?;
                    let high_watermark = reader.u64("high_watermark")?;
                    let batches = reader.bytes("batches")?;
                    partitions.push(FetchPartitionResult {
                        partition,
                        data: FetchPartitionData {
                            log_start_offset,
                            high_watermark,
                            batches: match error {
                                None => Ok(batches),
                                Some(error) => Err(error),
                            },
                        },
                    });
                }
                topics.push(FetchTopicResult { name, partitions });
            }
            ResponseBody::Fetch(FetchResponse { topics })
        }
    };
    reader.finish()?;
    Ok(Ok(body))
}

/// Checks a topic name: 1 to 200 bytes of ASCII letters, digits, '.', '_' and '-', and
/// not "." or "..", since it becomes a directory name.
pub fn validate_topic_name(name: &str) -> Result<(), WireError> {
    if is_valid_topic_name(name.as_bytes()) {
        return Ok(());
    }
    Err(WireError::new(
        ErrorCode::InvalidTopicName,
        format!(
            "topic name {} ({} bytes) must be 1 to {TOPIC_NAME_BYTES_MAX} bytes of letters, digits, '.', '_' or '-'",
            quote_untrusted(name),
            name.len()
        ),
    ))
}

fn is_valid_topic_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= TOPIC_NAME_BYTES_MAX
        && name
            .iter()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
        && name != b"."
        && name != b".."
}

/// Reads a topic name of a request and checks it before anything else sees it, so no
/// later stage formats, hashes, copies or looks up a name the broker could never hold:
/// the length is checked before the bytes are copied, and an invalid name is quoted
/// only by a bounded prefix.
fn read_topic_name(reader: &mut Reader) -> Result<String, ProtocolError> {
    let offset = reader.position();
    let length = reader.u16("topic")? as usize;
    let bytes = reader.take_bytes(length, "topic")?;
    if !is_valid_topic_name(&bytes) {
        return Err(ProtocolError::InvalidTopicName {
            offset,
            length,
            quoted: quote_untrusted(&String::from_utf8_lossy(&bytes)),
        });
    }
    // Valid names are ASCII, hence UTF-8.
    Ok(String::from_utf8(bytes.to_vec()).expect("a valid topic name is ASCII"))
}

/// Most bytes of untrusted input (a name, a client's text) an error message quotes.
pub const QUOTED_INPUT_BYTES_MAX: usize = 64;

/// Quotes untrusted text for an error message or a log line: at most
/// `QUOTED_INPUT_BYTES_MAX` bytes of it (cut at a character boundary), escaped as Rust's
/// `{:?}` does, followed by `...` when it was cut. An error about a request must never
/// cost more than the request: a 65,535-byte name repeated per entry once cost gigabytes.
pub fn quote_untrusted(text: &str) -> String {
    if text.len() <= QUOTED_INPUT_BYTES_MAX {
        return format!("{text:?}");
    }
    let mut end = QUOTED_INPUT_BYTES_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}...", &text[..end])
}

/// The bytes of the first code block after `after` in docs/protocol.md: on each line the
/// leading two-digit hex pairs, up to the comment. For tests that compare the document's
/// worked examples with the codec, reading the document itself so the two cannot drift.
#[cfg(test)]
pub(crate) fn protocol_md_example_bytes(after: &str) -> Vec<u8> {
    let doc = include_str!("../../docs/protocol.md");
    let (_, rest) = doc
        .split_once(after)
        .unwrap_or_else(|| panic!("protocol.md says {after:?}"));
    let block = rest
        .split("```")
        .nth(1)
        .unwrap_or_else(|| panic!("a code block after {after:?}"));
    block
        .lines()
        .flat_map(|line| {
            line.split_whitespace()
                .map_while(|token| {
                    (token.len() == 2)
                        .then(|| u8::from_str_radix(token, 16).ok())
                        .flatten()
                })
                .collect::<Vec<u8>>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip_request(request: Request) {
        let mut out = BytesMut::new();
        request.encode(42, &mut out);
        let header = match decode_frame_header(&out, 1 << 20).unwrap() {
            Decoded::Complete(header) => header,
            Decoded::Incomplete { .. } => panic!("whole frame was given"),
        };
        assert_eq!(header.correlation_id, 42);
        assert_eq!(header.frame_length(), out.len());
        let opcode = Opcode::from_wire(header.opcode).unwrap();
        let body = out.freeze().slice(FRAME_HEADER_SIZE..);
        let decoded = Request::decode(opcode, body, &DecodeLimits::default()).unwrap();
        assert_eq!(decoded, request);
    }

    #[test]
    fn every_request_roundtrips() {
        roundtrip_request(Request::Handshake(HandshakeRequest {
            client_name: "test".into(),
        }));
        roundtrip_request(Request::Metadata(MetadataRequest {
            topics: vec!["a".into(), "b".into()],
        }));
        roundtrip_request(Request::CreateTopic(CreateTopicRequest {
            name: "orders".into(),
            partitions: 4,
            retention: Default::default(),
            queue: Default::default(),
        }));
        roundtrip_request(Request::CreateTopic(CreateTopicRequest {
            name: "orders".into(),
            partitions: 4,
            retention: Default::default(),
            queue: queue::tests::every_setting(),
        }));
        roundtrip_request(Request::DeleteTopic(DeleteTopicRequest {
            name: "orders".into(),
        }));
        roundtrip_request(Request::AlterTopic(AlterTopicRequest {
            name: "orders".into(),
            retention: Some(Retention {
                bytes_max: 1 << 30,
                ms_max: 86_400_000,
            }),
            queue: Default::default(),
        }));
        roundtrip_request(Request::AlterTopic(AlterTopicRequest {
            name: "orders".into(),
            retention: None,
            queue: QueueSettings {
                deliveries_max: Some(3),
                ..Default::default()
            },
        }));
        roundtrip_request(Request::ListOffsets(ListOffsetsRequest {
            topics: vec![ListOffsetsTopic {
                name: "orders".into(),
                partitions: vec![
                    ListOffsetsPartition {
                        partition: 0,
                        timestamp_ms: TIMESTAMP_EARLIEST,
                    },
                    ListOffsetsPartition {
                        partition: 1,
                        timestamp_ms: 1_795_867_200_000,
                    },
                ],
            }],
        }));
        roundtrip_request(Request::Produce(ProduceRequest {
            acks: Acks::Durable,
            timeout_ms: 5000,
            topics: vec![ProduceTopic {
                name: "orders".into(),
                partitions: vec![ProducePartition {
                    partition: 3,
                    batch: Bytes::from_static(b"not validated here"),
                }],
            }],
        }));
        roundtrip_request(Request::Fetch(FetchRequest {
            wait_ms_max: 100,
            bytes_max: 1 << 20,
            topics: vec![FetchTopic {
                name: "orders".into(),
                partitions: vec![FetchPartition {
                    partition: 1,
                    offset: 77,
                    bytes_max: 4096,
                }],
            }],
        }));
    }

    /// Hex bytes written as two-digit pairs separated by spaces, up to the first token
    /// that is not one (the start of a comment).
    fn leading_hex_bytes(text: &str) -> Vec<u8> {
        text.split_whitespace()
            .map_while(|token| {
                (token.len() == 2)
                    .then(|| u8::from_str_radix(token, 16).ok())
                    .flatten()
            })
            .collect()
    }

    /// docs/protocol.md §10, the worked CreateTopic example, read from the document at
    /// test time: the offset table and the one-line dump agree with each other, decode to
    /// the request the text describes, and are what the crate's encoder writes (which
    /// also sends the optional queue settings, empty: the same frame with 6 more body
    /// bytes, as the section says); the success response is what the broker encodes.
    #[test]
    fn protocol_md_create_topic_example_matches_the_codec() {
        let doc = include_str!("../../docs/protocol.md");
        let section = doc
            .split("## 10. Worked example: CreateTopic")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("protocol.md has §10");
        let blocks: Vec<&str> = section.split("```").skip(1).step_by(2).collect();
        assert_eq!(
            blocks.len(),
            2,
            "§10 has the request table and the response dump"
        );
        // The table: `offset  bytes  field`, each row's offset where the last one ended.
        let mut table = Vec::new();
        let rows = blocks[0].lines().filter(|line| {
            line.trim_start()
                .starts_with(|first: char| first.is_ascii_digit())
        });
        for line in rows {
            let (offset, rest) = line.trim_start().split_once(' ').expect("offset, bytes");
            let offset: usize = offset.parse().expect("a row opens with its offset");
            assert_eq!(offset, table.len(), "protocol.md §10 row offsets: {line:?}");
            let bytes = leading_hex_bytes(rest);
            assert!(!bytes.is_empty(), "a row with bytes: {line:?}");
            table.extend(bytes);
        }
        let all = section
            .split("All 44 bytes: `")
            .nth(1)
            .and_then(|rest| rest.split('`').next())
            .expect("the one-line dump");
        let dump = leading_hex_bytes(all);
        assert_eq!(
            table, dump,
            "protocol.md §10: the table and the one-line dump"
        );
        assert_eq!(dump.len(), 44);

        let expected = Request::CreateTopic(CreateTopicRequest {
            name: "orders".into(),
            partitions: 4,
            retention: Retention {
                bytes_max: 0,
                ms_max: 86_400_000,
            },
            queue: QueueSettings::default(),
        });
        let Decoded::Complete(header) = decode_frame_header(&dump, 1 << 20).unwrap() else {
            panic!("a whole header")
        };
        assert_eq!(
            (header.opcode, header.flags, header.correlation_id),
            (Opcode::CreateTopic as u8, 0, 1)
        );
        assert_eq!(header.frame_length(), dump.len());
        let body = Bytes::copy_from_slice(&dump[FRAME_HEADER_SIZE..]);
        assert_eq!(
            Request::decode(Opcode::CreateTopic, body, &DecodeLimits::default()),
            Ok(expected.clone()),
            "protocol.md §10's frame decodes to the request it describes"
        );
        let mut encoded = BytesMut::new();
        expected.encode(1, &mut encoded);
        let mut with_settings = dump.clone();
        with_settings[0] += 6;
        with_settings.extend([0, 0, 0, 0, 0, 0]);
        assert_eq!(encoded.to_vec(), with_settings, "the crate's encoding");

        let mut response = BytesMut::new();
        encode_response(
            &mut response,
            Opcode::CreateTopic,
            1,
            Ok(&ResponseBody::CreateTopic),
        );
        let documented = leading_hex_bytes(blocks[1]);
        assert_eq!(documented.len(), 20);
        assert_eq!(
            response.to_vec(),
            documented,
            "protocol.md §10 success response"
        );
    }

    #[test]
    fn responses_roundtrip() {
        let bodies = vec![
            ResponseBody::Handshake(HandshakeResponse {
                protocol_version: 1,
                shard_count: 2,
                shard_id: 1,
                server_version: "0.1.0".into(),
                batch_bytes_max: 1 << 20,
            }),
            ResponseBody::Metadata(MetadataResponse {
                shard_ports: vec![9741, 9742],
                topics: vec![TopicMetadata {
                    name: "t".into(),
                    error: Some(WireError::new(ErrorCode::UnknownTopic, "no such topic")),
                    partitions: vec![PartitionMetadata {
                        partition: 0,
                        shard: 1,
                    }],
                    retention: Retention {
                        bytes_max: 7,
                        ms_max: 9,
                    },
                    queue: Default::default(),
                }],
            }),
            ResponseBody::Produce(ProduceResponse {
                topics: vec![ProduceTopicResult {
                    name: "t".into(),
                    partitions: vec![
                        ProducePartitionResult {
                            partition: 0,
                            result: Ok(10),
                        },
                        ProducePartitionResult {
                            partition: 1,
                            result: Err(WireError::new(ErrorCode::CorruptBatch, "crc")),
                        },
                    ],
                }],
            }),
            ResponseBody::ListOffsets(ListOffsetsResponse {
                topics: vec![ListOffsetsTopicResult {
                    name: "t".into(),
                    partitions: vec![
                        ListOffsetsPartitionResult {
                            partition: 0,
                            result: Ok(PartitionOffsets {
                                offset: 4,
                                log_start_offset: 2,
                                high_watermark: 9,
                            }),
                        },
                        ListOffsetsPartitionResult {
                            partition: 5,
                            result: Err(WireError::new(ErrorCode::UnknownPartition, "no")),
                        },
                    ],
                }],
            }),
            ResponseBody::Fetch(FetchResponse {
                topics: vec![FetchTopicResult {
                    name: "t".into(),
                    partitions: vec![
                        FetchPartitionResult {
                            partition: 0,
                            data: FetchPartitionData {
                                log_start_offset: 0,
                                high_watermark: 5,
                                batches: Ok(Bytes::from_static(b"xyz")),
                            },
                        },
                        FetchPartitionResult {
                            partition: 1,
                            data: FetchPartitionData {
                                log_start_offset: 7,
                                high_watermark: 9,
                                batches: Err(WireError::new(
                                    ErrorCode::OffsetOutOfRange,
                                    "offset 3 is outside [7, 9]",
                                )),
                            },
                        },
                    ],
                }],
            }),
        ];
        for body in bodies {
            let opcode = match &body {
                ResponseBody::Handshake(_) => Opcode::Handshake,
                ResponseBody::Metadata(_) => Opcode::Metadata,
                ResponseBody::Produce(_) => Opcode::Produce,
                ResponseBody::Fetch(_) => Opcode::Fetch,
                ResponseBody::ListOffsets(_) => Opcode::ListOffsets,
                _ => unreachable!(),
            };
            let mut out = BytesMut::new();
            encode_response(&mut out, opcode, 9, Ok(&body));
            let decoded = decode_response(opcode, out.freeze().slice(FRAME_HEADER_SIZE..)).unwrap();
            assert_eq!(decoded, Ok(body));
        }
        let mut out = BytesMut::new();
        let error = WireError::new(ErrorCode::UnknownTopic, "nope");
        encode_response(&mut out, Opcode::Fetch, 9, Err(&error));
        let decoded =
            decode_response(Opcode::Fetch, out.freeze().slice(FRAME_HEADER_SIZE..)).unwrap();
        assert_eq!(decoded, Err(error));
    }

    /// The parts of a request, written in order and followed by what is left in the
    /// buffer, are the bytes of the one-buffer encoding, after whatever the buffer held
    /// before; large produce batches are the caller's buffers, not copies.
    #[test]
    fn request_parts_concatenate_to_the_encoded_request() {
        let large = Bytes::from(vec![7u8; REQUEST_PART_BYTES_MIN]);
        let partition = |partition, batch: &Bytes| ProducePartition {
            partition,
            batch: batch.clone(),
        };
        let small = Bytes::from_static(b"small batch");
        let produce = |partitions: Vec<ProducePartition>| {
            Request::Produce(ProduceRequest {
                acks: Acks::Durable,
                timeout_ms: 5_000,
                topics: vec![
                    ProduceTopic {
                        name: "t".into(),
                        partitions,
                    },
                    ProduceTopic {
                        name: "u".into(),
                        partitions: vec![partition(9, &small)],
                    },
                ],
            })
        };
        let requests = [
            produce(vec![
                partition(0, &large),
                partition(1, &small),
                partition(2, &large),
            ]),
            produce(vec![partition(1, &small)]),
            Request::Metadata(MetadataRequest {
                topics: vec!["t".into()],
            }),
        ];
        for (index, request) in requests.iter().enumerate() {
            let earlier = b"frames queued before";
            let mut whole = BytesMut::from(&earlier[..]);
            request.encode(41, &mut whole);
            let mut out = BytesMut::from(&earlier[..]);
            let mut parts = Vec::new();
            request.encode_parts(41, &mut out, &mut parts);
            let mut written = parts.concat();
            written.extend_from_slice(&out);
            assert_eq!(written, whole.to_vec(), "request {index}");
            let shared = parts
                .iter()
                .filter(|part| part.as_ptr() == large.as_ptr())
                .count();
            assert_eq!(shared, if index == 0 { 2 } else { 0 }, "request {index}");
        }
    }

    /// The parts of a response, written in order, are the bytes of the one-buffer
    /// encoding; large batches are the fetched buffers themselves, not copies.
    #[test]
    fn response_parts_concatenate_to_the_encoded_response() {
        let large = Bytes::from(vec![5u8; RESPONSE_PART_BYTES_MIN + 1]);
        let partition = |partition, batches: Result<Bytes, WireError>| FetchPartitionResult {
            partition,
            data: FetchPartitionData {
                log_start_offset: 1,
                high_watermark: 9,
                batches,
            },
        };
        let body = ResponseBody::Fetch(FetchResponse {
            topics: vec![
                FetchTopicResult {
                    name: "t".into(),
                    partitions: vec![
                        partition(0, Ok(large.clone())),
                        partition(1, Ok(Bytes::from_static(b"small"))),
                        partition(2, Err(WireError::new(ErrorCode::UnknownPartition, "no"))),
                        partition(3, Ok(large.clone())),
                    ],
                },
                FetchTopicResult {
                    name: "u".into(),
                    partitions: vec![],
                },
            ],
        });
        for response in [
            Ok(&body),
            Err(&WireError::new(ErrorCode::ShuttingDown, "stopping")),
        ] {
            let mut whole = BytesMut::new();
            encode_response(&mut whole, Opcode::Fetch, 77, response);
            let parts = encode_response_parts(Opcode::Fetch, 77, response);
            assert_eq!(parts.concat(), whole.to_vec());
            if response.is_ok() {
                let shared = parts
                    .iter()
                    .filter(|part| part.as_ptr() == large.as_ptr())
                    .count();
                assert_eq!(shared, 2, "large batches are not copied");
            }
        }
    }

    #[test]
    fn header_refuses_bad_version_and_oversize() {
        let mut out = BytesMut::new();
        Request::DeleteTopic(DeleteTopicRequest { name: "x".into() }).encode(1, &mut out);
        assert_eq!(
            decode_frame_header(&out[..FRAME_HEADER_SIZE - 1], 1 << 20),
            Ok(Decoded::Incomplete {
                need: FRAME_HEADER_SIZE
            })
        );
        assert!(matches!(
            decode_frame_header(&out, 2),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
        out[4] = 9;
        assert_eq!(
            decode_frame_header(&out, 1 << 20),
            Err(ProtocolError::UnsupportedVersion { version: 9 })
        );
    }

    #[test]
    fn hostile_counts_and_truncation_are_refused() {
        let mut out = BytesMut::new();
        Request::Metadata(MetadataRequest {
            topics: vec!["abc".into()],
        })
        .encode(1, &mut out);
        let body = out.freeze().slice(FRAME_HEADER_SIZE..);
        for cut in 0..body.len() {
            assert!(Request::decode(
                Opcode::Metadata,
                body.slice(..cut),
                &DecodeLimits::default()
            )
            .is_err());
        }
        let mut hostile = BytesMut::new();
        hostile.put_u32_le(u32::MAX);
        assert!(matches!(
            Request::decode(Opcode::Metadata, hostile.freeze(), &DecodeLimits::default()),
            Err(ProtocolError::TooMany { .. })
        ));
        let mut trailing = body.to_vec();
        trailing.push(0);
        assert!(matches!(
            Request::decode(
                Opcode::Metadata,
                Bytes::from(trailing),
                &DecodeLimits::default()
            ),
            Err(ProtocolError::TrailingBytes { .. })
        ));
    }

    #[test]
    fn topic_names() {
        assert!(validate_topic_name("orders-v2.eu_1").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(201)] {
            assert!(validate_topic_name(bad).is_err(), "{bad:?}");
        }
        let long = validate_topic_name(&"y".repeat(65_535)).unwrap_err();
        assert!(long.message.len() < 300, "{}", long.message);
        assert!(long.message.contains("...") && long.message.contains("65535 bytes"));
    }

    #[test]
    fn quoting_untrusted_input_is_bounded() {
        assert_eq!(quote_untrusted("abc"), "\"abc\"");
        let quoted = quote_untrusted(&"é".repeat(100));
        assert!(quoted.ends_with("...") && quoted.len() <= QUOTED_INPUT_BYTES_MAX + 5);
    }

    /// Every request that names a topic refuses an invalid name at decode, with a
    /// message that quotes only a bounded prefix of it, and before reading any entry.
    #[test]
    fn every_request_validates_topic_names_at_decode() {
        let long = "z".repeat(65_535);
        let requests = [
            Request::Metadata(MetadataRequest {
                topics: vec!["ok".into(), long.clone()],
            }),
            Request::CreateTopic(CreateTopicRequest {
                name: long.clone(),
                partitions: 1,
                retention: Default::default(),
                queue: Default::default(),
            }),
            Request::DeleteTopic(DeleteTopicRequest { name: "a/b".into() }),
            Request::AlterTopic(AlterTopicRequest {
                name: "..".into(),
                retention: None,
                queue: Default::default(),
            }),
            Request::Produce(ProduceRequest {
                acks: Acks::Durable,
                timeout_ms: 0,
                topics: vec![ProduceTopic {
                    name: long.clone(),
                    partitions: vec![
                        ProducePartition {
                            partition: 0,
                            batch: Bytes::new(),
                        };
                        16_384
                    ],
                }],
            }),
            Request::Fetch(FetchRequest {
                wait_ms_max: 0,
                bytes_max: 1,
                topics: vec![FetchTopic {
                    name: String::new(),
                    partitions: vec![],
                }],
            }),
            Request::ListOffsets(ListOffsetsRequest {
                topics: vec![ListOffsetsTopic {
                    name: long.clone(),
                    partitions: vec![],
                }],
            }),
        ];
        for request in requests {
            let mut out = BytesMut::new();
            request.encode(1, &mut out);
            let body = out.freeze().slice(FRAME_HEADER_SIZE..);
            let error = Request::decode(request.opcode(), body, &DecodeLimits::default())
                .expect_err("an invalid name is refused");
            assert!(
                matches!(error, ProtocolError::InvalidTopicName { .. }),
                "{:?}: {error}",
                request.opcode()
            );
            assert_eq!(error.code(), ErrorCode::InvalidTopicName);
            assert!(!error.closes_connection());
            assert!(error.to_string().len() < 300, "{error}");
        }
    }
}
