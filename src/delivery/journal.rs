//! The delivery journal and snapshot: what a queue group writes so that its state survives
//! a crash. Sans-IO: records are decoded from `&[u8]` and encoded into a buffer the caller
//! owns; the shard decides where the bytes live (docs/queues.md, "Persistence").
//!
//! ```text
//! journal record (little-endian)
//!  0 length      u32  whole record, header included
//!  4 crc32c      u32  CRC32C of bytes [8, length)
//!  8 seq         u64  dense per (partition, group), from 1
//! 16 kind        u8
//! 17 body        per kind:
//!    1 Lease             first u64, count u32, attempt u32, deadline_ms u64, holder u64
//!    2 Settle            first u64, count u32, cause u8 (1 acked, 2 expired, dropped)
//!    3 Release           first u64, count u32, due_ms u64
//!    4 Extend            first u64, count u32, deadline_ms u64
//!    5 DeadLetterPending offset u64, attempts u32, cause u8, decided_at_ms u64,
//!                        reason_length u16, reason
//!    6 DeadLettered      offset u64
//!    7 LogStart          offset u64
//!    8 Created           offset u64 (the group's first offset; the journal's first record)
//! ```
//!
//! Records are state, not deltas: `Lease` carries the attempt number itself rather than
//! "one more", so replaying a record twice cannot raise an attempt count, and a snapshot
//! taken at seq S plus the records after S gives exactly the state of the whole journal.

use crate::protocol::Decoded;

pub const RECORD_HEADER_SIZE: usize = 17;
/// Longest record: a dead-letter record with the longest reason a u16 length can name.
pub const RECORD_SIZE_MAX: usize = RECORD_HEADER_SIZE + 8 + 4 + 1 + 8 + 2 + u16::MAX as usize;

const KIND_LEASE: u8 = 1;
const KIND_SETTLE: u8 = 2;
const KIND_RELEASE: u8 = 3;
const KIND_EXTEND: u8 = 4;
const KIND_DEAD_LETTER_PENDING: u8 = 5;
const KIND_DEAD_LETTERED: u8 = 6;
const KIND_LOG_START: u8 = 7;
const KIND_CREATED: u8 = 8;

const LEASE_BODY: usize = 8 + 4 + 4 + 8 + 8;
const SETTLE_BODY: usize = 8 + 4 + 1;
const RANGE_TIME_BODY: usize = 8 + 4 + 8;
const DEAD_LETTER_FIXED_BODY: usize = 8 + 4 + 1 + 8 + 2;
const OFFSET_BODY: usize = 8;

const _: () = assert!(
    RECORD_HEADER_SIZE == 4 + 4 + 8 + 1,
    "journal header fields must fill the header exactly or recovery misparses"
);

/// Why a message left the queue without a dead-letter copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleCause {
    Acked = 1,
    /// Its TTL passed and the group's expiry policy is `Drop`.
    ExpiredDropped = 2,
}

/// What ended a message's last chance and sent it to the DLQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterCause {
    /// The `deliveries_max`-th delivery was nacked.
    Nacked = 1,
    /// The `deliveries_max`-th delivery's lease ran out.
    LeaseExpired = 2,
    /// Its TTL passed and the group's expiry policy is `DeadLetter`.
    Expired = 3,
}

impl DeadLetterCause {
    /// The text of the DLQ record's reason header when no nack gave one.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterCause::Nacked => "nacked",
            DeadLetterCause::LeaseExpired => "visibility_timeout",
            DeadLetterCause::Expired => "expired",
        }
    }
}

/// One change of a group's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalRecord {
    /// Offsets `first..first + count` were handed to `holder` as delivery `attempt`.
    Lease {
        first: u64,
        count: u32,
        attempt: u32,
        deadline_ms: u64,
        holder: u64,
    },
    Settle {
        first: u64,
        count: u32,
        cause: SettleCause,
    },
    /// Leases ended without an ack (nack or expiry): available again at `due_ms`.
    Release { first: u64, count: u32, due_ms: u64 },
    Extend {
        first: u64,
        count: u32,
        deadline_ms: u64,
    },
    /// The message will be appended to the DLQ. Durable before the DLQ append starts.
    DeadLetterPending {
        offset: u64,
        attempts: u32,
        cause: DeadLetterCause,
        decided_at_ms: u64,
        reason: Vec<u8>,
    },
    /// Its DLQ copy is durable: the message is settled in the source.
    DeadLettered { offset: u64 },
    /// Retention removed everything below `offset` from the log.
    LogStart { offset: u64 },
    /// The group was created with its floor at `offset`: the journal's first record, so
    /// recovery knows where the group began (and counts what retention took since).
    Created { offset: u64 },
}

/// Why bytes are not a journal record or a snapshot. Each names what it found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalError {
    BadLength { length: u32 },
    CrcMismatch { stored: u32, computed: u32 },
    UnknownKind { kind: u8 },
    BodyLength { kind: u8, length: usize },
    UnknownCause { kind: u8, cause: u8 },
    BadSnapshotMagic { found: u32 },
    SnapshotTruncated { need: usize, have: usize },
    SnapshotEntry { index: u32, kind: u8 },
}

impl std::fmt::Display for JournalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JournalError::BadLength { length } => {
                write!(f, "journal record length {length} is out of range")
            }
            JournalError::CrcMismatch { stored, computed } => write!(
                f,
                "CRC32C mismatch: stored {stored:#010x}, computed {computed:#010x}"
            ),
            JournalError::UnknownKind { kind } => write!(f, "unknown journal record kind {kind}"),
            JournalError::BodyLength { kind, length } => {
                write!(f, "journal record kind {kind} has a body of {length} bytes")
            }
            JournalError::UnknownCause { kind, cause } => {
                write!(f, "journal record kind {kind} has unknown cause {cause}")
            }
            JournalError::BadSnapshotMagic { found } => {
                write!(
                    f,
                    "snapshot magic is {found:#010x}, expected {SNAPSHOT_MAGIC:#010x}"
                )
            }
            JournalError::SnapshotTruncated { need, have } => {
                write!(f, "snapshot needs {need} bytes, has {have}")
            }
            JournalError::SnapshotEntry { index, kind } => {
                write!(f, "snapshot entry {index} has unknown kind {kind}")
            }
        }
    }
}

impl std::error::Error for JournalError {}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("four bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("eight bytes"))
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

/// Appends one record to `buffer`.
pub fn encode_record(seq: u64, record: &JournalRecord, buffer: &mut Vec<u8>) {
    let start = buffer.len();
    buffer.extend_from_slice(&[0; 8]);
    buffer.extend_from_slice(&seq.to_le_bytes());
    match record {
        JournalRecord::Lease {
            first,
            count,
            attempt,
            deadline_ms,
            holder,
        } => {
            buffer.push(KIND_LEASE);
            buffer.extend_from_slice(&first.to_le_bytes());
            buffer.extend_from_slice(&count.to_le_bytes());
            buffer.extend_from_slice(&attempt.to_le_bytes());
            buffer.extend_from_slice(&deadline_ms.to_le_bytes());
            buffer.extend_from_slice(&holder.to_le_bytes());
        }
        JournalRecord::Settle {
            first,
            count,
            cause,
        } => {
            buffer.push(KIND_SETTLE);
            buffer.extend_from_slice(&first.to_le_bytes());
            buffer.extend_from_slice(&count.to_le_bytes());
            buffer.push(*cause as u8);
        }
        JournalRecord::Release {
            first,
            count,
            due_ms,
        } => {
            buffer.push(KIND_RELEASE);
            buffer.extend_from_slice(&first.to_le_bytes());
            buffer.extend_from_slice(&count.to_le_bytes());
            buffer.extend_from_slice(&due_ms.to_le_bytes());
        }
        JournalRecord::Extend {
            first,
            count,
            deadline_ms,
        } => {
            buffer.push(KIND_EXTEND);
            buffer.extend_from_slice(&first.to_le_bytes());
            buffer.extend_from_slice(&count.to_le_bytes());
            buffer.extend_from_slice(&deadline_ms.to_le_bytes());
        }
        JournalRecord::DeadLetterPending {
            offset,
            attempts,
            cause,
            decided_at_ms,
            reason,
        } => {
            let reason_length = u16::try_from(reason.len()).expect("reason cut to u16 by config");
            buffer.push(KIND_DEAD_LETTER_PENDING);
            buffer.extend_from_slice(&offset.to_le_bytes());
            buffer.extend_from_slice(&attempts.to_le_bytes());
            buffer.push(*cause as u8);
            buffer.extend_from_slice(&decided_at_ms.to_le_bytes());
            buffer.extend_from_slice(&reason_length.to_le_bytes());
            buffer.extend_from_slice(reason);
        }
        JournalRecord::DeadLettered { offset } => {
            buffer.push(KIND_DEAD_LETTERED);
            buffer.extend_from_slice(&offset.to_le_bytes());
        }
        JournalRecord::LogStart { offset } => {
            buffer.push(KIND_LOG_START);
            buffer.extend_from_slice(&offset.to_le_bytes());
        }
        JournalRecord::Created { offset } => {
            buffer.push(KIND_CREATED);
            buffer.extend_from_slice(&offset.to_le_bytes());
        }
    }
    let length = u32::try_from(buffer.len() - start).expect("record below 4 GiB");
    buffer[start..start + 4].copy_from_slice(&length.to_le_bytes());
    let crc = crc32c::crc32c(&buffer[start + 8..]);
    buffer[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn settle_cause(kind: u8, cause: u8) -> Result<SettleCause, JournalError> {
    match cause {
        1 => Ok(SettleCause::Acked),
        2 => Ok(SettleCause::ExpiredDropped),
        _ => Err(JournalError::UnknownCause { kind, cause }),
    }
}

fn dead_letter_cause(kind: u8, cause: u8) -> Result<DeadLetterCause, JournalError> {
    match cause {
        1 => Ok(DeadLetterCause::Nacked),
        2 => Ok(DeadLetterCause::LeaseExpired),
        3 => Ok(DeadLetterCause::Expired),
        _ => Err(JournalError::UnknownCause { kind, cause }),
    }
}

/// A decoded record with its sequence number and size in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedRecord {
    pub seq: u64,
    pub record: JournalRecord,
    pub length: usize,
}

/// Decodes the record at the start of `bytes`. Too few bytes is `Incomplete`, not an
/// error: at the end of a journal it is the torn last write of a crash.
pub fn decode_record(bytes: &[u8]) -> Result<Decoded<DecodedRecord>, JournalError> {
    if bytes.len() < RECORD_HEADER_SIZE {
        return Ok(Decoded::Incomplete {
            need: RECORD_HEADER_SIZE,
        });
    }
    let length = u32_at(bytes, 0);
    if (length as usize) < RECORD_HEADER_SIZE || length as usize > RECORD_SIZE_MAX {
        return Err(JournalError::BadLength { length });
    }
    let length = length as usize;
    if bytes.len() < length {
        return Ok(Decoded::Incomplete { need: length });
    }
    let stored = u32_at(bytes, 4);
    let computed = crc32c::crc32c(&bytes[8..length]);
    if stored != computed {
        return Err(JournalError::CrcMismatch { stored, computed });
    }
    let seq = u64_at(bytes, 8);
    let kind = bytes[16];
    let body = &bytes[RECORD_HEADER_SIZE..length];
    let body_length = |expected: usize| {
        if body.len() == expected {
            Ok(())
        } else {
            Err(JournalError::BodyLength {
                kind,
                length: body.len(),
            })
        }
    };
    let record = match kind {
        KIND_LEASE => {
            body_length(LEASE_BODY)?;
            JournalRecord::Lease {
                first: u64_at(body, 0),
                count: u32_at(body, 8),
                attempt: u32_at(body, 12),
                deadline_ms: u64_at(body, 16),
                holder: u64_at(body, 24),
            }
        }
        KIND_SETTLE => {
            body_length(SETTLE_BODY)?;
            JournalRecord::Settle {
                first: u64_at(body, 0),
                count: u32_at(body, 8),
                cause: settle_cause(kind, body[12])?,
            }
        }
        KIND_RELEASE => {
            body_length(RANGE_TIME_BODY)?;
            JournalRecord::Release {
                first: u64_at(body, 0),
                count: u32_at(body, 8),
                due_ms: u64_at(body, 12),
            }
        }
        KIND_EXTEND => {
            body_length(RANGE_TIME_BODY)?;
            JournalRecord::Extend {
                first: u64_at(body, 0),
                count: u32_at(body, 8),
                deadline_ms: u64_at(body, 12),
            }
        }
        KIND_DEAD_LETTER_PENDING => {
            if body.len() < DEAD_LETTER_FIXED_BODY {
                return Err(JournalError::BodyLength {
                    kind,
                    length: body.len(),
                });
            }
            let reason_length = u16_at(body, 21) as usize;
            body_length(DEAD_LETTER_FIXED_BODY + reason_length)?;
            JournalRecord::DeadLetterPending {
                offset: u64_at(body, 0),
                attempts: u32_at(body, 8),
                cause: dead_letter_cause(kind, body[12])?,
                decided_at_ms: u64_at(body, 13),
                reason: body[DEAD_LETTER_FIXED_BODY..].to_vec(),
            }
        }
        KIND_DEAD_LETTERED => {
            body_length(OFFSET_BODY)?;
            JournalRecord::DeadLettered {
                offset: u64_at(body, 0),
            }
        }
        KIND_LOG_START => {
            body_length(OFFSET_BODY)?;
            JournalRecord::LogStart {
                offset: u64_at(body, 0),
            }
        }
        KIND_CREATED => {
            body_length(OFFSET_BODY)?;
            JournalRecord::Created {
                offset: u64_at(body, 0),
            }
        }
        _ => return Err(JournalError::UnknownKind { kind }),
    };
    Ok(Decoded::Complete(DecodedRecord {
        seq,
        record,
        length,
    }))
}

// ---------------------------------------------------------------------------------------
// Snapshot
// ---------------------------------------------------------------------------------------

/// "SQD1", little-endian.
pub const SNAPSHOT_MAGIC: u32 = u32::from_le_bytes(*b"SQD1");
/// magic u32, crc32c u32 (of [12, length)), length u32, seq u64, floor u64, then four
/// counters u64 (acked, dead-lettered, expired and dropped, lost to retention), then the
/// entry count u32.
pub const SNAPSHOT_HEADER_SIZE: usize = 4 + 4 + 4 + 8 + 8 + 4 * 8 + 4;
/// kind u8, offset u64, count u32, attempts u32, time_ms u64, holder u64; a dead-lettering
/// entry is followed by cause u8, decided_at_ms u64, reason_length u16, reason.
pub const SNAPSHOT_ENTRY_SIZE: usize = 1 + 8 + 4 + 4 + 8 + 8;
const SNAPSHOT_DEAD_LETTER_EXTRA: usize = 1 + 8 + 2;

const _: () = assert!(
    SNAPSHOT_HEADER_SIZE == 64 && SNAPSHOT_ENTRY_SIZE == 33,
    "snapshot layout changed: old snapshots would misparse; bump the magic"
);

/// The state of one offset in a snapshot. Offsets in the window that are absent were
/// never delivered (available, attempts 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotEntry {
    /// `count` settled offsets from `offset`.
    Settled { offset: u64, count: u32 },
    Leased {
        offset: u64,
        attempts: u32,
        deadline_ms: u64,
        holder: u64,
    },
    Waiting {
        offset: u64,
        attempts: u32,
        due_ms: u64,
    },
    DeadLettering {
        offset: u64,
        attempts: u32,
        cause: DeadLetterCause,
        decided_at_ms: u64,
        reason: Vec<u8>,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    pub acked: u64,
    pub dead_lettered: u64,
    pub expired_dropped: u64,
    pub lost_to_retention: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The last journal record the snapshot includes.
    pub seq: u64,
    pub floor: u64,
    pub counters: Counters,
    pub entries: Vec<SnapshotEntry>,
}

const ENTRY_SETTLED: u8 = 1;
const ENTRY_LEASED: u8 = 2;
const ENTRY_WAITING: u8 = 3;
const ENTRY_DEAD_LETTERING: u8 = 4;

/// Appends the snapshot to `buffer`.
pub fn encode_snapshot(snapshot: &Snapshot, buffer: &mut Vec<u8>) {
    let start = buffer.len();
    buffer.extend_from_slice(&SNAPSHOT_MAGIC.to_le_bytes());
    buffer.extend_from_slice(&[0; 8]);
    buffer.extend_from_slice(&snapshot.seq.to_le_bytes());
    buffer.extend_from_slice(&snapshot.floor.to_le_bytes());
    for counter in [
        snapshot.counters.acked,
        snapshot.counters.dead_lettered,
        snapshot.counters.expired_dropped,
        snapshot.counters.lost_to_retention,
    ] {
        buffer.extend_from_slice(&counter.to_le_bytes());
    }
    let count = u32::try_from(snapshot.entries.len()).expect("entries bounded by the window");
    buffer.extend_from_slice(&count.to_le_bytes());
    for entry in &snapshot.entries {
        let (kind, offset, count, attempts, time_ms, holder) = match entry {
            SnapshotEntry::Settled { offset, count } => (ENTRY_SETTLED, *offset, *count, 0, 0, 0),
            SnapshotEntry::Leased {
                offset,
                attempts,
                deadline_ms,
                holder,
            } => (ENTRY_LEASED, *offset, 1, *attempts, *deadline_ms, *holder),
            SnapshotEntry::Waiting {
                offset,
                attempts,
                due_ms,
            } => (ENTRY_WAITING, *offset, 1, *attempts, *due_ms, 0),
            SnapshotEntry::DeadLettering {
                offset, attempts, ..
            } => (ENTRY_DEAD_LETTERING, *offset, 1, *attempts, 0, 0),
        };
        buffer.push(kind);
        buffer.extend_from_slice(&offset.to_le_bytes());
        buffer.extend_from_slice(&count.to_le_bytes());
        buffer.extend_from_slice(&attempts.to_le_bytes());
        buffer.extend_from_slice(&time_ms.to_le_bytes());
        buffer.extend_from_slice(&holder.to_le_bytes());
        if let SnapshotEntry::DeadLettering {
            cause,
            decided_at_ms,
            reason,
            ..
        } = entry
        {
            buffer.push(*cause as u8);
            buffer.extend_from_slice(&decided_at_ms.to_le_bytes());
            let length = u16::try_from(reason.len()).expect("reason cut to u16 by config");
            buffer.extend_from_slice(&length.to_le_bytes());
            buffer.extend_from_slice(reason);
        }
    }
    let length = u32::try_from(buffer.len() - start).expect("snapshot below 4 GiB");
    buffer[start + 8..start + 12].copy_from_slice(&length.to_le_bytes());
    let crc = crc32c::crc32c(&buffer[start + 12..]);
    buffer[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Decodes a whole snapshot. A snapshot is written whole (temp file + rename), so unlike a
/// journal tail, any damage is an error.
pub fn decode_snapshot(bytes: &[u8]) -> Result<Snapshot, JournalError> {
    let need = |need: usize| JournalError::SnapshotTruncated {
        need,
        have: bytes.len(),
    };
    if bytes.len() < SNAPSHOT_HEADER_SIZE {
        return Err(need(SNAPSHOT_HEADER_SIZE));
    }
    let magic = u32_at(bytes, 0);
    if magic != SNAPSHOT_MAGIC {
        return Err(JournalError::BadSnapshotMagic { found: magic });
    }
    let length = u32_at(bytes, 8) as usize;
    if length < SNAPSHOT_HEADER_SIZE || length > bytes.len() {
        return Err(need(length.max(SNAPSHOT_HEADER_SIZE)));
    }
    let bytes = &bytes[..length];
    let stored = u32_at(bytes, 4);
    let computed = crc32c::crc32c(&bytes[12..]);
    if stored != computed {
        return Err(JournalError::CrcMismatch { stored, computed });
    }
    let seq = u64_at(bytes, 12);
    let floor = u64_at(bytes, 20);
    let counters = Counters {
        acked: u64_at(bytes, 28),
        dead_lettered: u64_at(bytes, 36),
        expired_dropped: u64_at(bytes, 44),
        lost_to_retention: u64_at(bytes, 52),
    };
    let count = u32_at(bytes, 60);
    let mut entries = Vec::with_capacity((count as usize).min(bytes.len() / SNAPSHOT_ENTRY_SIZE));
    let mut at = SNAPSHOT_HEADER_SIZE;
    for index in 0..count {
        if at + SNAPSHOT_ENTRY_SIZE > bytes.len() {
            return Err(need(at + SNAPSHOT_ENTRY_SIZE));
        }
        let kind = bytes[at];
        let offset = u64_at(bytes, at + 1);
        let entry_count = u32_at(bytes, at + 9);
        let attempts = u32_at(bytes, at + 13);
        let time_ms = u64_at(bytes, at + 17);
        let holder = u64_at(bytes, at + 25);
        at += SNAPSHOT_ENTRY_SIZE;
        let entry = match kind {
            ENTRY_SETTLED => SnapshotEntry::Settled {
                offset,
                count: entry_count,
            },
            ENTRY_LEASED => SnapshotEntry::Leased {
                offset,
                attempts,
                deadline_ms: time_ms,
                holder,
            },
            ENTRY_WAITING => SnapshotEntry::Waiting {
                offset,
                attempts,
                due_ms: time_ms,
            },
            ENTRY_DEAD_LETTERING => {
                if at + SNAPSHOT_DEAD_LETTER_EXTRA > bytes.len() {
                    return Err(need(at + SNAPSHOT_DEAD_LETTER_EXTRA));
                }
                let cause = dead_letter_cause(kind, bytes[at])?;
                let decided_at_ms = u64_at(bytes, at + 1);
                let reason_length = u16_at(bytes, at + 9) as usize;
                at += SNAPSHOT_DEAD_LETTER_EXTRA;
                if at + reason_length > bytes.len() {
                    return Err(need(at + reason_length));
                }
                let reason = bytes[at..at + reason_length].to_vec();
                at += reason_length;
                SnapshotEntry::DeadLettering {
                    offset,
                    attempts,
                    cause,
                    decided_at_ms,
                    reason,
                }
            }
            _ => return Err(JournalError::SnapshotEntry { index, kind }),
        };
        entries.push(entry);
    }
    Ok(Snapshot {
        seq,
        floor,
        counters,
        entries,
    })
}
