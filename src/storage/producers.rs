//! Idempotent producers: the per-partition table that lets the owning shard store each
//! (producer id, sequence) at most once, and its snapshot file format.
//!
//! What it is: a sans-IO state machine and codec. No files, no clock, no executor: the
//! partition log (`log.rs`) owns one table inside its `State` and consults it under the
//! same borrow that assigns offsets, so two appends of the same batch can never both pass
//! the check; `producer_snapshot.rs` does the file I/O. It runs on the partition's owning
//! shard only.
//!
//! Rules (docs/protocol.md §8.1), for a batch with producer id ≠ 0:
//! - unknown producer: append, whatever the sequence, and record it;
//! - sequence == last + 1: append;
//! - sequence of one of the producer's last `PRODUCER_BATCHES_KEPT` batches, same CRC: a
//!   duplicate, answered with the original offsets and not appended;
//! - anything else: `OutOfOrderSequence`, nothing appended.
//!
//! Why the CRC takes part: a retry carries the same bytes, so the same CRC. A batch with
//! a kept sequence but other bytes is a client bug or a producer id collision; dropping
//! it as a duplicate would lose data silently, refusing it does not.
//!
//! The table is bounded by `producers_max`: a new producer beyond it evicts the producer
//! whose last append is oldest (smallest last base offset: offsets only grow, so they
//! order appends without a clock).

use std::collections::{BTreeMap, HashMap, VecDeque};

/// Batches remembered per producer: how far back a retry is still recognised.
pub const PRODUCER_BATCHES_KEPT: usize = 5;

/// One remembered batch of a producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeptBatch {
    pub sequence: u64,
    pub base_offset: u64,
    pub next_offset: u64,
    pub crc: u32,
}

/// What the table says about a batch before it is appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceCheck {
    /// Append it (then `record` it).
    Append,
    /// Already stored: answer with these offsets, do not append.
    Duplicate(KeptBatch),
}

/// Why a batch was refused: neither next in line nor a recent duplicate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceError {
    pub producer_id: u64,
    pub expected: u64,
    pub got: u64,
    /// Set when the sequence is a kept one but the bytes differ.
    pub crc_mismatch: bool,
}

impl std::fmt::Display for SequenceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let SequenceError {
            producer_id,
            expected,
            got,
            crc_mismatch,
        } = self;
        if *crc_mismatch {
            write!(
                f,
                "producer {producer_id:#018x} reused sequence {got} for a different batch (CRC differs); expected sequence {expected}"
            )
        } else {
            write!(
                f,
                "producer {producer_id:#018x}: expected sequence {expected}, got {got}"
            )
        }
    }
}

impl std::error::Error for SequenceError {}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ProducerEntry {
    /// Oldest first; never empty, at most `PRODUCER_BATCHES_KEPT`.
    batches: VecDeque<KeptBatch>,
}

impl ProducerEntry {
    fn last(&self) -> &KeptBatch {
        self.batches
            .back()
            .expect("an entry keeps at least one batch")
    }
}

/// The table of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerTable {
    producers_max: usize,
    entries: HashMap<u64, ProducerEntry>,
    /// Last base offset -> producer id: the eviction order. Base offsets are unique per
    /// batch, so no two producers share a key.
    by_age: BTreeMap<u64, u64>,
}

impl ProducerTable {
    pub fn new(producers_max: usize) -> ProducerTable {
        assert!(producers_max >= 1, "validated by the config");
        ProducerTable {
            producers_max,
            entries: HashMap::new(),
            by_age: BTreeMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn producers_max(&self) -> usize {
        self.producers_max
    }

    /// The last sequence stored for a producer, if the table knows it.
    pub fn last_sequence(&self, producer_id: u64) -> Option<u64> {
        self.entries
            .get(&producer_id)
            .map(|entry| entry.last().sequence)
    }

    /// Decides what to do with a batch; changes nothing.
    pub fn check(
        &self,
        producer_id: u64,
        sequence: u64,
        crc: u32,
    ) -> Result<SequenceCheck, SequenceError> {
        assert_ne!(producer_id, 0, "batches without a producer are not checked");
        let Some(entry) = self.entries.get(&producer_id) else {
            return Ok(SequenceCheck::Append);
        };
        let last = entry.last().sequence;
        let expected = last.wrapping_add(1);
        if sequence == expected && last != u64::MAX {
            return Ok(SequenceCheck::Append);
        }
        match entry.batches.iter().find(|kept| kept.sequence == sequence) {
            Some(kept) if kept.crc == crc => Ok(SequenceCheck::Duplicate(*kept)),
            found => Err(SequenceError {
                producer_id,
                expected,
                got: sequence,
                crc_mismatch: found.is_some(),
            }),
        }
    }

    /// Records a batch that was appended (or, in recovery, found in the log), evicting
    /// the producer with the oldest last append when a new producer would exceed the
    /// bound.
    pub fn record(&mut self, producer_id: u64, batch: KeptBatch) {
        assert_ne!(
            producer_id, 0,
            "batches without a producer are not recorded"
        );
        match self.entries.get_mut(&producer_id) {
            Some(entry) => {
                let previous = entry.last().base_offset;
                assert!(
                    batch.base_offset > previous,
                    "a producer's batches are recorded in offset order"
                );
                self.by_age.remove(&previous);
                if entry.batches.len() == PRODUCER_BATCHES_KEPT {
                    entry.batches.pop_front();
                }
                entry.batches.push_back(batch);
            }
            None => {
                if self.entries.len() >= self.producers_max {
                    let (_, oldest) = self
                        .by_age
                        .pop_first()
                        .expect("a full table has an oldest producer");
                    self.entries.remove(&oldest);
                }
                self.entries.insert(
                    producer_id,
                    ProducerEntry {
                        batches: VecDeque::from([batch]),
                    },
                );
            }
        }
        let previous = self.by_age.insert(batch.base_offset, producer_id);
        assert!(previous.is_none(), "base offsets are unique");
        debug_assert_eq!(self.by_age.len(), self.entries.len());
    }

    /// Every producer, oldest last append first, with its kept batches oldest first.
    fn iter_by_age(&self) -> impl Iterator<Item = (u64, &VecDeque<KeptBatch>)> {
        self.by_age.values().map(|producer_id| {
            let entry = &self.entries[producer_id];
            (*producer_id, &entry.batches)
        })
    }
}

/// File in the partition directory holding the table as of one offset.
pub const PRODUCER_SNAPSHOT_FILE: &str = "producers.snapshot";
/// Written first, made durable, then renamed over `PRODUCER_SNAPSHOT_FILE`.
pub const PRODUCER_SNAPSHOT_TEMP_FILE: &str = "producers.snapshot.tmp";

const SNAPSHOT_MAGIC: [u8; 4] = *b"SQPS";
const SNAPSHOT_VERSION: u16 = 1;
/// magic, version, reserved, valid offset, segment base, position, entry count.
const SNAPSHOT_HEADER_SIZE: usize = 4 + 2 + 2 + 8 + 8 + 8 + 4;
/// producer id, batch count (u8).
const SNAPSHOT_ENTRY_HEADER_SIZE: usize = 8 + 1;
/// sequence, base offset, next offset, crc.
const SNAPSHOT_BATCH_SIZE: usize = 8 + 8 + 8 + 4;
const SNAPSHOT_CRC_SIZE: usize = 4;

const _: () = assert!(
    SNAPSHOT_HEADER_SIZE == 36,
    "docs/storage.md gives the snapshot header as 36 bytes; readers of old files would misparse"
);
const _: () = assert!(
    PRODUCER_BATCHES_KEPT <= u8::MAX as usize,
    "the batch count of an entry is a u8"
);

/// Where a snapshot says it is valid: the table covers exactly the batches below
/// `offset`, and the batch at `offset` (if any) starts at `position` of the segment whose
/// base offset is `segment_base`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotPoint {
    pub offset: u64,
    pub segment_base: u64,
    pub position: u64,
}

/// Encodes the table as valid at `point` (docs/storage.md, "Producer snapshot").
pub fn encode_snapshot(table: &ProducerTable, point: SnapshotPoint, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&SNAPSHOT_MAGIC);
    out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&point.offset.to_le_bytes());
    out.extend_from_slice(&point.segment_base.to_le_bytes());
    out.extend_from_slice(&point.position.to_le_bytes());
    let count = u32::try_from(table.len()).expect("the table bound fits a u32");
    out.extend_from_slice(&count.to_le_bytes());
    for (producer_id, batches) in table.iter_by_age() {
        out.extend_from_slice(&producer_id.to_le_bytes());
        out.push(batches.len() as u8);
        for kept in batches {
            out.extend_from_slice(&kept.sequence.to_le_bytes());
            out.extend_from_slice(&kept.base_offset.to_le_bytes());
            out.extend_from_slice(&kept.next_offset.to_le_bytes());
            out.extend_from_slice(&kept.crc.to_le_bytes());
        }
    }
    let crc = crc32c::crc32c(out);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Why a snapshot file was not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotError {
    Truncated {
        need: usize,
        have: usize,
    },
    BadMagic {
        found: [u8; 4],
    },
    UnsupportedVersion {
        found: u16,
    },
    CrcMismatch {
        stored: u32,
        computed: u32,
    },
    /// The content checks out but breaks a rule of the table.
    Invalid {
        reason: String,
    },
}

impl std::fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapshotError::Truncated { need, have } => {
                write!(f, "snapshot needs {need} bytes, the file has {have}")
            }
            SnapshotError::BadMagic { found } => {
                write!(
                    f,
                    "snapshot magic is {found:02x?}, expected {SNAPSHOT_MAGIC:02x?}"
                )
            }
            SnapshotError::UnsupportedVersion { found } => {
                write!(f, "snapshot version {found}, expected {SNAPSHOT_VERSION}")
            }
            SnapshotError::CrcMismatch { stored, computed } => write!(
                f,
                "snapshot CRC32C mismatch: stored {stored:#010x}, computed {computed:#010x}"
            ),
            SnapshotError::Invalid { reason } => write!(f, "snapshot is invalid: {reason}"),
        }
    }
}

impl std::error::Error for SnapshotError {}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(bytes[at..at + 2].try_into().expect("two bytes"))
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("four bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("eight bytes"))
}

/// Decodes a snapshot. `bytes` may run past its end (O_DIRECT files are padded to a
/// block with zeros). The table gets `producers_max` as its bound: when the bound was
/// lowered since the snapshot was written, the producers with the oldest appends go.
pub fn decode_snapshot(
    bytes: &[u8],
    producers_max: usize,
) -> Result<(SnapshotPoint, ProducerTable), SnapshotError> {
    let truncated = |need: usize| SnapshotError::Truncated {
        need,
        have: bytes.len(),
    };
    if bytes.len() < SNAPSHOT_HEADER_SIZE + SNAPSHOT_CRC_SIZE {
        return Err(truncated(SNAPSHOT_HEADER_SIZE + SNAPSHOT_CRC_SIZE));
    }
    let magic: [u8; 4] = bytes[..4].try_into().expect("four bytes");
    if magic != SNAPSHOT_MAGIC {
        return Err(SnapshotError::BadMagic { found: magic });
    }
    let version = u16_at(bytes, 4);
    if version != SNAPSHOT_VERSION {
        return Err(SnapshotError::UnsupportedVersion { found: version });
    }
    let point = SnapshotPoint {
        offset: u64_at(bytes, 8),
        segment_base: u64_at(bytes, 16),
        position: u64_at(bytes, 24),
    };
    let count = u32_at(bytes, 32) as usize;
    // Walk the entries to find the end before trusting anything: the CRC follows them.
    let mut at = SNAPSHOT_HEADER_SIZE;
    for _ in 0..count {
        if at + SNAPSHOT_ENTRY_HEADER_SIZE > bytes.len() {
            return Err(truncated(at + SNAPSHOT_ENTRY_HEADER_SIZE));
        }
        let batches = bytes[at + 8] as usize;
        at += SNAPSHOT_ENTRY_HEADER_SIZE + batches * SNAPSHOT_BATCH_SIZE;
    }
    if at + SNAPSHOT_CRC_SIZE > bytes.len() {
        return Err(truncated(at + SNAPSHOT_CRC_SIZE));
    }
    let stored = u32_at(bytes, at);
    let computed = crc32c::crc32c(&bytes[..at]);
    if stored != computed {
        return Err(SnapshotError::CrcMismatch { stored, computed });
    }
    let invalid = |reason: String| SnapshotError::Invalid { reason };
    let mut table = ProducerTable::new(producers_max);
    // Rebuilt in global offset order so that `record` sees each producer's batches in
    // order and the eviction order comes out as it was.
    let mut batches: Vec<(u64, KeptBatch)> = Vec::new();
    let mut at = SNAPSHOT_HEADER_SIZE;
    for _ in 0..count {
        let producer_id = u64_at(bytes, at);
        let batch_count = bytes[at + 8] as usize;
        at += SNAPSHOT_ENTRY_HEADER_SIZE;
        if producer_id == 0 || batch_count == 0 || batch_count > PRODUCER_BATCHES_KEPT {
            return Err(invalid(format!(
                "entry for producer {producer_id} with {batch_count} batches"
            )));
        }
        for _ in 0..batch_count {
            let kept = KeptBatch {
                sequence: u64_at(bytes, at),
                base_offset: u64_at(bytes, at + 8),
                next_offset: u64_at(bytes, at + 16),
                crc: u32_at(bytes, at + 24),
            };
            at += SNAPSHOT_BATCH_SIZE;
            if kept.next_offset <= kept.base_offset || kept.next_offset > point.offset {
                return Err(invalid(format!(
                    "batch [{}, {}) of producer {producer_id} does not lie below the snapshot offset {}",
                    kept.base_offset, kept.next_offset, point.offset
                )));
            }
            batches.push((producer_id, kept));
        }
    }
    batches.sort_unstable_by_key(|(_, kept)| kept.base_offset);
    for window in batches.windows(2) {
        if window[0].1.base_offset == window[1].1.base_offset {
            return Err(invalid(format!(
                "two batches at offset {}",
                window[0].1.base_offset
            )));
        }
    }
    for (producer_id, kept) in batches {
        table.record(producer_id, kept);
    }
    Ok((point, table))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(sequence: u64, base_offset: u64) -> KeptBatch {
        KeptBatch {
            sequence,
            base_offset,
            next_offset: base_offset + 2,
            crc: sequence as u32 ^ 0xabcd,
        }
    }

    fn crc(sequence: u64) -> u32 {
        sequence as u32 ^ 0xabcd
    }

    #[test]
    fn unknown_producer_any_sequence_then_next_only() {
        let mut table = ProducerTable::new(10);
        assert_eq!(table.check(7, 42, crc(42)), Ok(SequenceCheck::Append));
        table.record(7, kept(42, 0));
        assert_eq!(table.check(7, 43, crc(43)), Ok(SequenceCheck::Append));
        assert_eq!(
            table.check(7, 45, crc(45)),
            Err(SequenceError {
                producer_id: 7,
                expected: 43,
                got: 45,
                crc_mismatch: false
            }),
            "a gap"
        );
        let error = table.check(7, 45, crc(45)).unwrap_err();
        assert!(error.to_string().contains("expected sequence 43, got 45"));
        assert_eq!(
            table.check(7, 42, crc(42)),
            Ok(SequenceCheck::Duplicate(kept(42, 0)))
        );
    }

    #[test]
    fn duplicates_within_the_kept_window_only() {
        let mut table = ProducerTable::new(10);
        for sequence in 0..8u64 {
            assert_eq!(
                table.check(1, sequence, crc(sequence)),
                Ok(SequenceCheck::Append)
            );
            table.record(1, kept(sequence, sequence * 2));
        }
        // Kept: 3..=7. 0..=2 are too old to tell from a duplicate.
        for sequence in 3..8u64 {
            assert_eq!(
                table.check(1, sequence, crc(sequence)),
                Ok(SequenceCheck::Duplicate(kept(sequence, sequence * 2)))
            );
        }
        for sequence in 0..3u64 {
            assert!(matches!(
                table.check(1, sequence, crc(sequence)),
                Err(SequenceError { expected: 8, .. })
            ));
        }
        // Same sequence, other bytes: refused, not dropped.
        assert_eq!(
            table.check(1, 6, crc(6) ^ 1),
            Err(SequenceError {
                producer_id: 1,
                expected: 8,
                got: 6,
                crc_mismatch: true
            })
        );
    }

    #[test]
    fn full_table_evicts_the_oldest_last_append() {
        let mut table = ProducerTable::new(3);
        table.record(1, kept(0, 0));
        table.record(2, kept(0, 10));
        table.record(3, kept(0, 20));
        // Producer 1 appends again: producer 2 is now the oldest.
        table.record(1, kept(1, 30));
        assert_eq!(table.len(), 3);
        table.record(4, kept(0, 40));
        assert_eq!(table.len(), 3, "the bound holds");
        assert_eq!(table.last_sequence(2), None, "oldest last append evicted");
        assert_eq!(table.last_sequence(1), Some(1));
        assert_eq!(table.last_sequence(3), Some(0));
        assert_eq!(table.last_sequence(4), Some(0));
        // The evicted producer is unknown again: any sequence is taken.
        assert_eq!(table.check(2, 9, crc(9)), Ok(SequenceCheck::Append));
        // Past the edge many times over: still bounded, the newest kept.
        for producer in 100..200u64 {
            table.record(producer, kept(0, 100 + producer));
            assert_eq!(table.len(), 3);
        }
        assert_eq!(table.last_sequence(199), Some(0));
        assert_eq!(table.last_sequence(197), Some(0));
        assert_eq!(table.last_sequence(196), None);
    }

    #[test]
    fn snapshot_round_trips_and_rejects_damage() {
        let mut table = ProducerTable::new(100);
        let mut offset = 0;
        for round in 0..9u64 {
            for producer in 1..=4u64 {
                table.record(producer * 1000, kept(round, offset));
                offset += 3;
            }
        }
        let point = SnapshotPoint {
            offset: offset + 1,
            segment_base: 0,
            position: 4096,
        };
        let mut bytes = Vec::new();
        encode_snapshot(&table, point, &mut bytes);
        assert_eq!(bytes.len(), 36 + 4 * (9 + 5 * 28) + 4);
        let mut padded = bytes.clone();
        padded.resize(8192, 0);
        let (decoded_point, decoded) = decode_snapshot(&padded, 100).unwrap();
        assert_eq!(decoded_point, point);
        assert_eq!(decoded, table);
        for position in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[position] ^= 0x10;
            assert!(
                decode_snapshot(&damaged, 100).is_err(),
                "flip at byte {position} went unnoticed"
            );
        }
        for cut in 0..bytes.len() {
            assert!(decode_snapshot(&bytes[..cut], 100).is_err(), "cut at {cut}");
        }
        // A lower bound on reload keeps the newest producers.
        let (_, smaller) = decode_snapshot(&bytes, 2).unwrap();
        assert_eq!(smaller.len(), 2);
        assert_eq!(smaller.last_sequence(4000), Some(8));
        assert_eq!(smaller.last_sequence(3000), Some(8));
        assert_eq!(smaller.last_sequence(1000), None);
    }

    #[test]
    fn snapshot_of_batches_past_its_offset_is_invalid() {
        let mut table = ProducerTable::new(10);
        table.record(5, kept(0, 10));
        let mut bytes = Vec::new();
        let point = SnapshotPoint {
            offset: 11,
            segment_base: 0,
            position: 0,
        };
        encode_snapshot(&table, point, &mut bytes);
        assert!(matches!(
            decode_snapshot(&bytes, 10),
            Err(SnapshotError::Invalid { .. })
        ));
    }
}
