//! The record batch: the unit a producer sends, the broker stores and a consumer reads.
//!
//! The bytes on disk are the bytes the producer sent, with two fields the broker fills in
//! place (`base_offset`, `append_time_ms`). Those two sit *before* the CRC field and are
//! not covered by it, so the broker never recomputes the CRC and a consumer can verify the
//! producer's CRC end to end. Offsets inside a batch are deltas from `base_offset`, dense
//! from 0. The layout is in docs/protocol.md; every size here is pinned below.
//!
//! ```text
//! batch header (64 bytes, little-endian; format version 2)
//!  0 base_offset        u64  broker-assigned; producers send 0
//!  8 append_time_ms     i64  broker-assigned; producers send 0
//! 16 batch_length       u32  whole batch, header included
//! 20 crc32c             u32  CRC32C (Castagnoli) of bytes [24, batch_length)
//! 24 magic              u8   2
//! 25 attributes         u8   0 (no compression yet)
//! 26 reserved           u16  0
//! 28 record_count       u32  >= 1
//! 32 first_timestamp_ms i64  producer's create time of the first record
//! 40 max_timestamp_ms   i64  largest create time in the batch
//! 48 producer_id        u64  idempotent producer's id; 0 = not idempotent
//! 56 sequence           u64  the batch's number for this producer on this partition
//! record (repeated record_count times)
//!  0 record_length      u32  bytes after this field
//!  4 offset_delta       u32  index of the record in the batch
//!  8 timestamp_delta_ms u32  create time minus first_timestamp_ms
//! 12 key_length         u32  u32::MAX for no key
//!    key                key_length bytes
//!    value_length       u32
//!    value              value_length bytes
//!    header_count       u16
//!    headers            header_count x (name_length u16, name, value_length u32, value)
//! ```

use bytes::{BufMut, Bytes, BytesMut};

pub const BATCH_HEADER_SIZE: usize = 64;
/// Format version 2: version 1 had a 48-byte header without producer id and sequence. A
/// version 1 batch is refused (`BadMagic`), never reinterpreted: its records would be
/// read as header fields.
pub const BATCH_MAGIC: u8 = 2;
/// `producer_id` of a batch sent without idempotence: the broker does not deduplicate it.
pub const PRODUCER_ID_NONE: u64 = 0;
/// Offset of the first byte the CRC covers.
pub const BATCH_CRC_START: usize = 24;
/// The fixed part of a record: length, offset delta, timestamp delta, key length, value
/// length, header count.
pub const RECORD_OVERHEAD: usize = 4 + 4 + 4 + 4 + 4 + 2;
pub const NO_KEY: u32 = u32::MAX;

const OFFSET_BASE_OFFSET: usize = 0;
const OFFSET_APPEND_TIME: usize = 8;
const OFFSET_BATCH_LENGTH: usize = 16;
const OFFSET_CRC: usize = 20;
const OFFSET_MAGIC: usize = 24;
const OFFSET_RECORD_COUNT: usize = 28;
const OFFSET_FIRST_TIMESTAMP: usize = 32;
const OFFSET_MAX_TIMESTAMP: usize = 40;
const OFFSET_PRODUCER_ID: usize = 48;
const OFFSET_SEQUENCE: usize = 56;

const _: () = assert!(
    OFFSET_MAX_TIMESTAMP + 8 == OFFSET_PRODUCER_ID && OFFSET_PRODUCER_ID + 8 == OFFSET_SEQUENCE,
    "batch header fields must follow each other without gaps or stored batches misparse"
);
const _: () = assert!(
    OFFSET_SEQUENCE + 8 == BATCH_HEADER_SIZE,
    "batch header fields must fill the header exactly or stored batches misparse"
);
const _: () = assert!(
    OFFSET_CRC + 4 == BATCH_CRC_START,
    "the CRC must cover everything after itself and nothing the broker rewrites"
);
const _: () = assert!(
    OFFSET_APPEND_TIME + 8 <= OFFSET_CRC && OFFSET_BASE_OFFSET + 8 <= OFFSET_CRC,
    "broker-filled fields must lie outside the CRC"
);
const _: () = assert!(
    OFFSET_PRODUCER_ID >= BATCH_CRC_START && OFFSET_SEQUENCE >= BATCH_CRC_START,
    "producer id and sequence are the producer's: the CRC must cover them, or a damaged \
     sequence could make the broker drop a batch as a duplicate"
);

/// Why a batch was refused. Each variant names where in the batch it went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchError {
    TooShort {
        have: usize,
    },
    LengthMismatch {
        declared: u32,
        actual: usize,
    },
    BadMagic {
        found: u8,
        expected: u8,
    },
    CrcMismatch {
        stored: u32,
        computed: u32,
    },
    NoRecords,
    TooManyRecords {
        count: u32,
        count_max: u32,
    },
    RecordTruncated {
        index: u32,
        position: usize,
    },
    OffsetDeltaMismatch {
        index: u32,
        found: u32,
    },
    CountMismatch {
        declared: u32,
        found: u32,
    },
    TrailingBytes {
        position: usize,
    },
    /// A record's offset (`base_offset + offset_delta`) does not fit in a u64. The base
    /// offset lies outside the CRC, so a damaged header or a hostile broker can carry any
    /// value; found by the `batch_validation` fuzz target and the property tests.
    OffsetOverflow {
        base_offset: u64,
        offset_delta: u32,
    },
}

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchError::TooShort { have } => write!(
                f,
                "batch of {have} bytes is shorter than its {BATCH_HEADER_SIZE}-byte header"
            ),
            BatchError::LengthMismatch { declared, actual } => write!(
                f,
                "batch declares {declared} bytes but {actual} bytes were given"
            ),
            BatchError::BadMagic { found, expected } => write!(
                f,
                "batch magic (format version) is {found}, expected {expected}: this broker \
                 takes only {BATCH_HEADER_SIZE}-byte headers of format {expected}"
            ),
            BatchError::CrcMismatch { stored, computed } => write!(
                f,
                "batch CRC32C mismatch: stored {stored:#010x}, computed {computed:#010x}"
            ),
            BatchError::NoRecords => write!(f, "batch holds no records"),
            BatchError::TooManyRecords { count, count_max } => {
                write!(
                    f,
                    "batch holds {count} records, at most {count_max} allowed"
                )
            }
            BatchError::RecordTruncated { index, position } => {
                write!(
                    f,
                    "record {index} at byte {position} runs past the batch end"
                )
            }
            BatchError::OffsetDeltaMismatch { index, found } => {
                write!(
                    f,
                    "record {index} has offset delta {found}, expected {index}"
                )
            }
            BatchError::CountMismatch { declared, found } => {
                write!(f, "batch declares {declared} records but holds {found}")
            }
            BatchError::TrailingBytes { position } => {
                write!(f, "bytes after the last record, from byte {position}")
            }
            BatchError::OffsetOverflow {
                base_offset,
                offset_delta,
            } => write!(
                f,
                "record offset {base_offset} + {offset_delta} does not fit in 64 bits"
            ),
        }
    }
}

impl std::error::Error for BatchError {}

fn read_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("four bytes"))
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("eight bytes"))
}

/// The header fields of a batch, read without validation. Callers validate first (or read
/// from storage, which validated before writing and re-checks the CRC on recovery).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: u64,
    pub append_time_ms: i64,
    pub batch_length: u32,
    pub crc: u32,
    pub magic: u8,
    pub record_count: u32,
    pub first_timestamp_ms: i64,
    pub max_timestamp_ms: i64,
    /// [`PRODUCER_ID_NONE`] when the producer is not idempotent.
    pub producer_id: u64,
    pub sequence: u64,
}

impl BatchHeader {
    /// Reads the header from the first `BATCH_HEADER_SIZE` bytes; `None` when fewer exist.
    pub fn read(bytes: &[u8]) -> Option<BatchHeader> {
        if bytes.len() < BATCH_HEADER_SIZE {
            return None;
        }
        Some(BatchHeader {
            base_offset: read_u64(bytes, OFFSET_BASE_OFFSET),
            append_time_ms: read_u64(bytes, OFFSET_APPEND_TIME) as i64,
            batch_length: read_u32(bytes, OFFSET_BATCH_LENGTH),
            crc: read_u32(bytes, OFFSET_CRC),
            magic: bytes[OFFSET_MAGIC],
            record_count: read_u32(bytes, OFFSET_RECORD_COUNT),
            first_timestamp_ms: read_u64(bytes, OFFSET_FIRST_TIMESTAMP) as i64,
            max_timestamp_ms: read_u64(bytes, OFFSET_MAX_TIMESTAMP) as i64,
            producer_id: read_u64(bytes, OFFSET_PRODUCER_ID),
            sequence: read_u64(bytes, OFFSET_SEQUENCE),
        })
    }

    /// The offset one past the last record of this batch.
    pub fn next_offset(&self) -> u64 {
        self.base_offset + u64::from(self.record_count)
    }
}

/// Writes the two broker-owned fields in place. The CRC does not cover them.
pub fn stamp_batch(batch: &mut [u8], base_offset: u64, append_time_ms: i64) {
    assert!(
        batch.len() >= BATCH_HEADER_SIZE,
        "stamping a batch shorter than its header"
    );
    batch[OFFSET_BASE_OFFSET..OFFSET_BASE_OFFSET + 8].copy_from_slice(&base_offset.to_le_bytes());
    batch[OFFSET_APPEND_TIME..OFFSET_APPEND_TIME + 8]
        .copy_from_slice(&append_time_ms.to_le_bytes());
}

pub fn compute_crc(batch: &[u8]) -> u32 {
    crc32c::crc32c(&batch[BATCH_CRC_START..])
}

/// Checks only the framing and the CRC: what recovery needs to tell a whole batch from a
/// torn one. `bytes` may extend past the batch; the batch's own length is returned.
pub fn check_framing(bytes: &[u8]) -> Result<BatchHeader, BatchError> {
    let header = BatchHeader::read(bytes).ok_or(BatchError::TooShort { have: bytes.len() })?;
    let length = header.batch_length as usize;
    if length < BATCH_HEADER_SIZE || length > bytes.len() {
        return Err(BatchError::LengthMismatch {
            declared: header.batch_length,
            actual: bytes.len(),
        });
    }
    if header.magic != BATCH_MAGIC {
        return Err(BatchError::BadMagic {
            found: header.magic,
            expected: BATCH_MAGIC,
        });
    }
    let computed = compute_crc(&bytes[..length]);
    if computed != header.crc {
        return Err(BatchError::CrcMismatch {
            stored: header.crc,
            computed,
        });
    }
    if header.record_count == 0 {
        return Err(BatchError::NoRecords);
    }
    Ok(header)
}

/// Full validation of a batch a producer sent: framing, CRC, and every record's bounds
/// and offset delta. `batch` must be exactly one batch.
pub fn validate_batch(batch: &[u8], records_max: u32) -> Result<BatchHeader, BatchError> {
    let header = check_framing(batch)?;
    if header.batch_length as usize != batch.len() {
        return Err(BatchError::LengthMismatch {
            declared: header.batch_length,
            actual: batch.len(),
        });
    }
    if header.record_count > records_max {
        return Err(BatchError::TooManyRecords {
            count: header.record_count,
            count_max: records_max,
        });
    }
    let mut found = 0u32;
    let mut position = BATCH_HEADER_SIZE;
    while position < batch.len() {
        let record = parse_record(batch, position, found)?;
        if record.offset_delta != found {
            return Err(BatchError::OffsetDeltaMismatch {
                index: found,
                found: record.offset_delta,
            });
        }
        found += 1;
        position = record.end;
        if found > header.record_count {
            break;
        }
    }
    if found != header.record_count {
        return Err(BatchError::CountMismatch {
            declared: header.record_count,
            found,
        });
    }
    if position != batch.len() {
        return Err(BatchError::TrailingBytes { position });
    }
    Ok(header)
}

/// One record as stored, borrowed from its batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordView<'a> {
    pub offset_delta: u32,
    pub timestamp_delta_ms: u32,
    pub key: Option<&'a [u8]>,
    pub value: &'a [u8],
    pub headers: Vec<(&'a [u8], &'a [u8])>,
    end: usize,
}

fn parse_record(batch: &[u8], position: usize, index: u32) -> Result<RecordView<'_>, BatchError> {
    let truncated = BatchError::RecordTruncated { index, position };
    if position + 4 > batch.len() {
        return Err(truncated);
    }
    let record_length = read_u32(batch, position) as usize;
    let end = position
        .checked_add(4 + record_length)
        .filter(|end| *end <= batch.len())
        .ok_or(truncated.clone())?;
    if record_length < RECORD_OVERHEAD - 4 {
        return Err(truncated);
    }
    let mut at = position + 4;
    let offset_delta = read_u32(batch, at);
    let timestamp_delta_ms = read_u32(batch, at + 4);
    let key_length = read_u32(batch, at + 8);
    at += 12;
    let key = if key_length == NO_KEY {
        None
    } else {
        let key_end = at + key_length as usize;
        if key_end + 4 > end {
            return Err(truncated);
        }
        let key = &batch[at..key_end];
        at = key_end;
        Some(key)
    };
    if at + 4 > end {
        return Err(truncated);
    }
    let value_length = read_u32(batch, at) as usize;
    at += 4;
    if at + value_length + 2 > end {
        return Err(truncated);
    }
    let value = &batch[at..at + value_length];
    at += value_length;
    let header_count = read_u16(batch, at);
    at += 2;
    let mut headers = Vec::new();
    for _ in 0..header_count {
        if at + 2 > end {
            return Err(truncated);
        }
        let name_length = read_u16(batch, at) as usize;
        at += 2;
        if at + name_length + 4 > end {
            return Err(truncated);
        }
        let name = &batch[at..at + name_length];
        at += name_length;
        let header_value_length = read_u32(batch, at) as usize;
        at += 4;
        if at + header_value_length > end {
            return Err(truncated);
        }
        headers.push((name, &batch[at..at + header_value_length]));
        at += header_value_length;
    }
    if at != end {
        return Err(truncated);
    }
    Ok(RecordView {
        offset_delta,
        timestamp_delta_ms,
        key,
        value,
        headers,
        end,
    })
}

/// An owned record, as a consumer receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The record's offset in its partition.
    pub offset: u64,
    /// The producer's timestamp, in ms since the epoch.
    pub timestamp_ms: i64,
    /// The key, if it was produced with one.
    pub key: Option<Bytes>,
    /// The payload.
    pub value: Bytes,
    /// Name/value pairs, in the order they were produced.
    pub headers: Vec<(String, Bytes)>,
}

/// Splits a fetched byte run into batches, checks each one's CRC (the client side of the
/// end-to-end check) and returns the records at or after `from_offset`.
pub fn decode_records(
    batches: &Bytes,
    from_offset: u64,
    out: &mut Vec<Record>,
) -> Result<(), BatchError> {
    let mut position = 0;
    while position < batches.len() {
        let rest = &batches[position..];
        let header = check_framing(rest)?;
        let batch = &rest[..header.batch_length as usize];
        let mut at = BATCH_HEADER_SIZE;
        let mut index = 0;
        while at < batch.len() {
            let record = parse_record(batch, at, index)?;
            let offset = header
                .base_offset
                .checked_add(u64::from(record.offset_delta))
                .ok_or(BatchError::OffsetOverflow {
                    base_offset: header.base_offset,
                    offset_delta: record.offset_delta,
                })?;
            if offset >= from_offset {
                let slice = |part: &[u8]| {
                    let start = part.as_ptr() as usize - batches.as_ptr() as usize;
                    batches.slice(start..start + part.len())
                };
                out.push(Record {
                    offset,
                    // Saturating: the producer chose both fields, and the broker refuses
                    // impossible timestamps at produce; a reader must not panic on them.
                    timestamp_ms: header
                        .first_timestamp_ms
                        .saturating_add(i64::from(record.timestamp_delta_ms)),
                    key: record.key.map(slice),
                    value: slice(record.value),
                    headers: record
                        .headers
                        .iter()
                        .map(|(name, value)| {
                            (String::from_utf8_lossy(name).into_owned(), slice(value))
                        })
                        .collect(),
                });
            }
            at = record.end;
            index += 1;
        }
        position += batch.len();
    }
    Ok(())
}

/// Builds one batch into a caller-owned buffer. Producers reuse the buffer across batches.
pub struct BatchBuilder {
    buffer: BytesMut,
    record_count: u32,
    first_timestamp_ms: i64,
    max_timestamp_ms: i64,
    producer_id: u64,
    sequence: u64,
}

impl BatchBuilder {
    pub fn new(mut buffer: BytesMut) -> BatchBuilder {
        buffer.clear();
        buffer.put_bytes(0, BATCH_HEADER_SIZE);
        BatchBuilder {
            buffer,
            record_count: 0,
            first_timestamp_ms: 0,
            max_timestamp_ms: 0,
            producer_id: PRODUCER_ID_NONE,
            sequence: 0,
        }
    }

    /// Marks the batch as batch number `sequence` of idempotent producer `producer_id`
    /// on its partition (docs/protocol.md §8). Without this the batch is not idempotent.
    pub fn set_producer(&mut self, producer_id: u64, sequence: u64) {
        self.producer_id = producer_id;
        self.sequence = sequence;
    }

    pub fn record_count(&self) -> u32 {
        self.record_count
    }

    pub fn size_bytes(&self) -> usize {
        self.buffer.len()
    }

    /// Bytes `push` would add for this record.
    pub fn record_size(key: Option<&[u8]>, value: &[u8], headers: &[(&str, &[u8])]) -> usize {
        RECORD_OVERHEAD
            + key.map_or(0, <[u8]>::len)
            + value.len()
            + headers
                .iter()
                .map(|(name, value)| 2 + name.len() + 4 + value.len())
                .sum::<usize>()
    }

    /// Appends a record. Timestamps earlier than the first record's are clamped to it,
    /// since deltas are unsigned.
    pub fn push(
        &mut self,
        timestamp_ms: i64,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(&str, &[u8])],
    ) {
        if self.record_count == 0 {
            self.first_timestamp_ms = timestamp_ms;
            self.max_timestamp_ms = timestamp_ms;
        }
        let timestamp_ms = timestamp_ms.max(self.first_timestamp_ms);
        self.max_timestamp_ms = self.max_timestamp_ms.max(timestamp_ms);
        let delta = u32::try_from(timestamp_ms - self.first_timestamp_ms).unwrap_or(u32::MAX);
        let record_length = Self::record_size(key, value, headers) - 4;
        let buffer = &mut self.buffer;
        buffer.put_u32_le(u32::try_from(record_length).expect("record below 4 GiB"));
        buffer.put_u32_le(self.record_count);
        buffer.put_u32_le(delta);
        match key {
            Some(key) => {
                buffer.put_u32_le(u32::try_from(key.len()).expect("key below 4 GiB"));
                buffer.put_slice(key);
            }
            None => buffer.put_u32_le(NO_KEY),
        }
        buffer.put_u32_le(u32::try_from(value.len()).expect("value below 4 GiB"));
        buffer.put_slice(value);
        buffer.put_u16_le(u16::try_from(headers.len()).expect("at most 65535 headers"));
        for (name, header_value) in headers {
            buffer.put_u16_le(u16::try_from(name.len()).expect("header name below 64 KiB"));
            buffer.put_slice(name.as_bytes());
            buffer.put_u32_le(u32::try_from(header_value.len()).expect("header below 4 GiB"));
            buffer.put_slice(header_value);
        }
        self.record_count += 1;
    }

    /// Seals the batch: fills the header and the CRC. Panics on an empty batch, which no
    /// caller should seal.
    pub fn finish(mut self) -> Bytes {
        assert!(self.record_count > 0, "sealing an empty batch");
        let length = u32::try_from(self.buffer.len()).expect("batch below 4 GiB");
        let header = &mut self.buffer[..BATCH_HEADER_SIZE];
        header[OFFSET_BATCH_LENGTH..OFFSET_BATCH_LENGTH + 4].copy_from_slice(&length.to_le_bytes());
        header[OFFSET_MAGIC] = BATCH_MAGIC;
        header[OFFSET_RECORD_COUNT..OFFSET_RECORD_COUNT + 4]
            .copy_from_slice(&self.record_count.to_le_bytes());
        header[OFFSET_FIRST_TIMESTAMP..OFFSET_FIRST_TIMESTAMP + 8]
            .copy_from_slice(&self.first_timestamp_ms.to_le_bytes());
        header[OFFSET_MAX_TIMESTAMP..OFFSET_MAX_TIMESTAMP + 8]
            .copy_from_slice(&self.max_timestamp_ms.to_le_bytes());
        header[OFFSET_PRODUCER_ID..OFFSET_PRODUCER_ID + 8]
            .copy_from_slice(&self.producer_id.to_le_bytes());
        header[OFFSET_SEQUENCE..OFFSET_SEQUENCE + 8].copy_from_slice(&self.sequence.to_le_bytes());
        let crc = compute_crc(&self.buffer);
        self.buffer[OFFSET_CRC..OFFSET_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        self.buffer.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_batch() -> Bytes {
        let mut builder = BatchBuilder::new(BytesMut::new());
        builder.push(1_000, Some(b"k1"), b"v1", &[]);
        builder.push(1_005, None, b"v2", &[("h", b"x")]);
        builder.push(999, Some(b""), b"", &[]);
        builder.finish()
    }

    #[test]
    fn built_batch_validates_and_decodes() {
        let batch = sample_batch();
        let header = validate_batch(&batch, 10).unwrap();
        assert_eq!(header.record_count, 3);
        assert_eq!(header.first_timestamp_ms, 1_000);
        assert_eq!(header.max_timestamp_ms, 1_005);
        let mut stamped = batch.to_vec();
        stamp_batch(&mut stamped, 40, 7);
        let stamped = Bytes::from(stamped);
        let mut records = Vec::new();
        decode_records(&stamped, 41, &mut records).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].offset, 41);
        assert_eq!(records[0].key, None);
        assert_eq!(&records[0].value[..], b"v2");
        assert_eq!(
            records[0].headers,
            vec![("h".to_owned(), Bytes::from_static(b"x"))]
        );
        assert_eq!(
            records[1].timestamp_ms, 1_000,
            "earlier timestamps clamp to the first"
        );
        assert_eq!(records[1].key.as_deref(), Some(&b""[..]));
    }

    #[test]
    fn corrupt_byte_anywhere_in_crc_range_is_caught() {
        let batch = sample_batch();
        for position in BATCH_CRC_START..batch.len() {
            let mut corrupt = batch.to_vec();
            corrupt[position] ^= 0x40;
            assert!(
                validate_batch(&corrupt, 10).is_err(),
                "flip at byte {position} went unnoticed"
            );
        }
    }

    #[test]
    fn record_limit_and_truncation_are_refused() {
        let batch = sample_batch();
        assert_eq!(
            validate_batch(&batch, 2),
            Err(BatchError::TooManyRecords {
                count: 3,
                count_max: 2
            })
        );
        for cut in 0..batch.len() {
            assert!(validate_batch(&batch[..cut], 10).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn producer_id_and_sequence_round_trip_inside_the_crc() {
        let mut builder = BatchBuilder::new(BytesMut::new());
        builder.set_producer(0xfeed_beef_0000_0001, 41);
        builder.push(5, None, b"v", &[]);
        let batch = builder.finish();
        let header = validate_batch(&batch, 10).unwrap();
        assert_eq!(header.producer_id, 0xfeed_beef_0000_0001);
        assert_eq!(header.sequence, 41);
        // A retry that changed its sequence in flight must not pass as the same batch.
        let mut damaged = batch.to_vec();
        damaged[OFFSET_SEQUENCE] ^= 1;
        assert!(matches!(
            validate_batch(&damaged, 10),
            Err(BatchError::CrcMismatch { .. })
        ));
        let plain = sample_batch();
        assert_eq!(
            validate_batch(&plain, 10).unwrap().producer_id,
            PRODUCER_ID_NONE
        );
    }

    #[test]
    fn format_1_batch_is_refused_naming_the_expected_magic() {
        // A version 1 batch: 48-byte header, magic 1, one record "hi" (the old worked
        // example of docs/protocol.md), padded to pass the length check.
        let mut old = sample_batch().to_vec();
        old[OFFSET_MAGIC] = 1;
        let crc = compute_crc(&old);
        old[OFFSET_CRC..OFFSET_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        let error = validate_batch(&old, 10).unwrap_err();
        assert_eq!(
            error,
            BatchError::BadMagic {
                found: 1,
                expected: 2
            }
        );
        assert!(error.to_string().contains("expected 2"), "{error}");
    }

    /// The example batch of docs/protocol.md §8, built by the code and compared with the
    /// document byte for byte, CRC included.
    #[test]
    fn protocol_md_example_batch_matches_the_builder() {
        let mut builder = BatchBuilder::new(BytesMut::new());
        builder.set_producer(0x1122_3344_5566_7788, 3);
        builder.push(1_700_000_000_000, None, b"hi", &[]);
        let batch = builder.finish();
        let doc = include_str!("../../docs/protocol.md");
        let section = doc
            .split("### Example batch")
            .nth(1)
            .expect("protocol.md has an example batch");
        let crc = format!("{:#010x}", compute_crc(&batch));
        assert!(
            section.contains(&format!("= `{crc}`")),
            "protocol.md states the CRC {crc}"
        );
        let dump = section
            .split("```")
            .nth(1)
            .expect("the example batch is in a code block");
        let mut documented = Vec::new();
        for line in dump.lines().filter(|line| line.contains(':')) {
            let (position, rest) = line.split_once(':').unwrap();
            let position: usize = position.trim().parse().unwrap();
            assert_eq!(position, documented.len(), "line offsets in the dump");
            let hex = rest.split("   ").next().unwrap();
            for byte in hex.split_whitespace() {
                documented.push(u8::from_str_radix(byte, 16).unwrap());
            }
        }
        assert_eq!(documented, batch.to_vec(), "protocol.md example batch");
        assert_eq!(batch.len(), 88);
        // And the documented bytes read back as what the text says they hold: a batch the
        // broker takes, CRC32C (checked with the crc32c crate, not the code under test)
        // over bytes 24..88, one record "hi" without key or headers.
        assert_eq!(
            format!("{:#010x}", crc32c::crc32c(&documented[24..])),
            crc,
            "the stated CRC is CRC32C of bytes 24..88"
        );
        let header = validate_batch(&documented, 1).expect("the broker takes the example");
        assert_eq!(
            (header.producer_id, header.sequence, header.record_count),
            (0x1122_3344_5566_7788, 3, 1)
        );
        let mut records = Vec::new();
        decode_records(&Bytes::from(documented), 0, &mut records).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(
            (
                records[0].timestamp_ms,
                records[0].key.clone(),
                &records[0].value[..]
            ),
            (1_700_000_000_000, None, &b"hi"[..])
        );
        assert!(records[0].headers.is_empty());
    }

    /// Found by tests/protocol_properties.rs (`batch_checks_on_mutated_batches`): two
    /// records with no key and empty values, base offset u64::MAX. The second record's
    /// offset overflowed: a panic in debug builds, offset 0 in release.
    const BASE_OFFSET_MAX_BATCH: [u8; 108] = [
        255, 255, 255, 255, 255, 255, 255, 255, 0, 0, 0, 0, 0, 0, 0, 0, 108, 0, 0, 0, 155, 152,
        242, 15, 2, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255, 255,
        255, 0, 0, 0, 0, 0, 0, 18, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255, 0, 0, 0, 0,
        0, 0,
    ];

    #[test]
    fn decode_records_refuses_offsets_past_u64_max() {
        let bytes = Bytes::from_static(&BASE_OFFSET_MAX_BATCH);
        // Framing and CRC are fine: the base offset is outside the CRC.
        assert_eq!(check_framing(&bytes).unwrap().base_offset, u64::MAX);
        let mut records = Vec::new();
        assert_eq!(
            decode_records(&bytes, 0, &mut records),
            Err(BatchError::OffsetOverflow {
                base_offset: u64::MAX,
                offset_delta: 1
            })
        );
    }

    #[test]
    fn decode_records_saturates_timestamps_past_i64_max() {
        let mut bytes = BASE_OFFSET_MAX_BATCH.to_vec();
        stamp_batch(&mut bytes, 0, 0);
        bytes[OFFSET_FIRST_TIMESTAMP..OFFSET_FIRST_TIMESTAMP + 8]
            .copy_from_slice(&i64::MAX.to_le_bytes());
        // Second record's timestamp delta (record at 86: length, offset delta, then it).
        bytes[86 + 8..86 + 12].copy_from_slice(&5u32.to_le_bytes());
        let crc = compute_crc(&bytes);
        bytes[OFFSET_CRC..OFFSET_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        let mut records = Vec::new();
        decode_records(&Bytes::from(bytes), 0, &mut records).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[1].timestamp_ms, i64::MAX);
    }
}
