//! The sparse offset/time index of a segment, in memory and in its `.index` file.
//!
//! One entry for the first batch of the segment, then one for the first batch that starts
//! at least `index_interval_bytes` after the previous entry. Each entry also carries the
//! largest producer timestamp of every batch up to and including its own (a running
//! maximum), which makes "first offset at or after time T" a binary search even though
//! producers' clocks are not monotonic.
//!
//! ```text
//! index entry (16 bytes, little-endian)
//!  0 relative_offset u32  entry offset minus the segment's base offset
//!  4 position        u32  byte position of the batch in the segment file
//!  8 timestamp_ms    i64  running maximum of batch max_timestamp_ms
//! ```
//!
//! The file grows as it is written (it is not preallocated), in 4 KiB blocks: during group-commit rounds only
//! whole blocks of entries, without fdatasync (the index can always be rebuilt from the
//! segment); when the segment is sealed or the partition closes, everything, then an
//! fdatasync. On open, the entries are read back, the valid prefix is kept (offsets and
//! positions strictly increasing, the first entry at offset and position 0), and the last
//! kept entry is checked against the segment itself before it is trusted.

use super::ALIGNMENT_BYTES;

pub(crate) const INDEX_ENTRY_SIZE: usize = 16;
pub(crate) const ENTRIES_PER_BLOCK: usize = ALIGNMENT_BYTES / INDEX_ENTRY_SIZE;

const _: () = assert!(
    ALIGNMENT_BYTES % INDEX_ENTRY_SIZE == 0,
    "index entries must tile a block or a block write would split one"
);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub offset: u64,
    pub position: u64,
    /// Largest batch timestamp up to and including this entry's batch.
    pub timestamp_ms: i64,
}

pub(crate) fn index_file_name(base_offset: u64) -> String {
    format!("{base_offset:020}.index")
}

/// Writes `entries` (which start at entry number `first`) into `out`, zero-filling the
/// rest of `out`.
pub(crate) fn encode_entries(entries: &[IndexEntry], base_offset: u64, out: &mut [u8]) {
    out.fill(0);
    for (slot, entry) in out.chunks_exact_mut(INDEX_ENTRY_SIZE).zip(entries) {
        let relative =
            u32::try_from(entry.offset - base_offset).expect("segments hold below 2^32 offsets");
        let position = u32::try_from(entry.position).expect("segments are below 4 GiB");
        slot[0..4].copy_from_slice(&relative.to_le_bytes());
        slot[4..8].copy_from_slice(&position.to_le_bytes());
        slot[8..16].copy_from_slice(&entry.timestamp_ms.to_le_bytes());
    }
}

/// The valid prefix of an index file's bytes.
pub(crate) fn decode_entries(bytes: &[u8], base_offset: u64) -> Vec<IndexEntry> {
    let mut entries: Vec<IndexEntry> = Vec::new();
    for slot in bytes.chunks_exact(INDEX_ENTRY_SIZE) {
        let relative = u32::from_le_bytes(slot[0..4].try_into().expect("four bytes"));
        let position = u32::from_le_bytes(slot[4..8].try_into().expect("four bytes"));
        let timestamp_ms = i64::from_le_bytes(slot[8..16].try_into().expect("eight bytes"));
        // A segment's base offset is its file name: one near u64::MAX leaves no room for
        // what an entry claims (found by the recovery_scan property test).
        let Some(offset) = base_offset.checked_add(u64::from(relative)) else {
            break;
        };
        let entry = IndexEntry {
            offset,
            position: u64::from(position),
            timestamp_ms,
        };
        let valid = match entries.last() {
            None => relative == 0 && position == 0,
            Some(last) => {
                entry.offset > last.offset
                    && entry.position > last.position
                    && entry.timestamp_ms >= last.timestamp_ms
            }
        };
        if !valid {
            break;
        }
        entries.push(entry);
    }
    entries
}

/// The index entry to start a scan from for `offset`: the last entry at or below it.
pub(crate) fn floor_entry(entries: &[IndexEntry], offset: u64) -> Option<&IndexEntry> {
    let after = entries.partition_point(|entry| entry.offset <= offset);
    after.checked_sub(1).map(|index| &entries[index])
}

/// The entry to start a scan from for the first record at or after `timestamp_ms`: the
/// last entry whose running maximum is still below it (every batch up to that entry is
/// earlier), or the first entry.
pub(crate) fn time_floor_entry(entries: &[IndexEntry], timestamp_ms: i64) -> Option<&IndexEntry> {
    let below = entries.partition_point(|entry| entry.timestamp_ms < timestamp_ms);
    entries.get(below.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries() -> Vec<IndexEntry> {
        vec![
            IndexEntry {
                offset: 100,
                position: 0,
                timestamp_ms: 5,
            },
            IndexEntry {
                offset: 140,
                position: 4200,
                timestamp_ms: 9,
            },
            IndexEntry {
                offset: 170,
                position: 8500,
                timestamp_ms: 9,
            },
        ]
    }

    #[test]
    fn entries_roundtrip_and_zeros_end_them() {
        let mut bytes = vec![0xffu8; ALIGNMENT_BYTES];
        encode_entries(&entries(), 100, &mut bytes);
        assert_eq!(decode_entries(&bytes, 100), entries());
    }

    #[test]
    fn a_torn_or_stale_entry_ends_the_valid_prefix() {
        let mut bytes = vec![0u8; ALIGNMENT_BYTES];
        encode_entries(&entries(), 100, &mut bytes);
        // Entry 2 goes backwards in position: garbage from a torn block.
        bytes[2 * INDEX_ENTRY_SIZE + 4..2 * INDEX_ENTRY_SIZE + 8]
            .copy_from_slice(&10u32.to_le_bytes());
        assert_eq!(decode_entries(&bytes, 100), entries()[..2].to_vec());
        // A first entry that is not (0, 0) means nothing is trustworthy.
        bytes[0] = 1;
        assert!(decode_entries(&bytes, 100).is_empty());
    }

    #[test]
    fn an_entry_past_u64_max_ends_the_valid_prefix() {
        // The entry of the recovery_scan regression: relative offset 65 in a segment
        // based at u64::MAX - 64.
        let mut bytes = vec![0u8; INDEX_ENTRY_SIZE];
        bytes[0..4].copy_from_slice(&65u32.to_le_bytes());
        assert!(decode_entries(&bytes, u64::MAX - 64).is_empty());
        // The same entry as a second one: the first stays.
        let mut two = vec![0u8; 2 * INDEX_ENTRY_SIZE];
        two[INDEX_ENTRY_SIZE..].copy_from_slice(&bytes);
        two[INDEX_ENTRY_SIZE + 4] = 1;
        assert_eq!(decode_entries(&two, u64::MAX - 64).len(), 1);
    }

    #[test]
    fn lookups_by_offset_and_by_time() {
        let entries = entries();
        assert_eq!(floor_entry(&entries, 99), None);
        assert_eq!(floor_entry(&entries, 100).unwrap().offset, 100);
        assert_eq!(floor_entry(&entries, 169).unwrap().offset, 140);
        assert_eq!(floor_entry(&entries, 1_000).unwrap().offset, 170);
        assert_eq!(time_floor_entry(&entries, 0).unwrap().offset, 100);
        assert_eq!(time_floor_entry(&entries, 6).unwrap().offset, 100);
        // Running max reaches 9 at entry 140: batches before it may still hold 9.
        assert_eq!(time_floor_entry(&entries, 9).unwrap().offset, 100);
        assert_eq!(time_floor_entry(&entries, 10).unwrap().offset, 170);
    }
}
