//! Recovery of one segment over arbitrary bytes: the entry point of the `recovery_scan`
//! fuzz target (fuzz/) and of its property test on stable (tests/recovery_properties.rs).
//! Hidden from the docs; not part of the broker's API, and free to change with recovery.
//!
//! A segment file and its `.index` live in memory (`storage::memory`) and go through the
//! three steps `recovery::recover` takes every segment through: `scan_segment_files`
//! (load and verify the index, scan from its last entry), `judge_scan_end` (refuse, or
//! say why a tail is torn) and `settle_segment` (cut the last segment's tail, rewrite the
//! index). Nothing needs an executor: the in-memory futures complete when first polled and
//! `futures_lite::future::block_on` drives them, thousands of inputs a second.
//!
//! [`recover_segment_image`] then checks the outcome against the input bytes, with a walk
//! of its own that knows nothing of the scan's windows (docs/storage.md, "Recovery"):
//! - the recovered range starts at byte 0 at the base offset, or at the last entry of the
//!   index file's valid prefix that checks out (and no later entry of that prefix does);
//! - from there to the recovered end lie whole batches back to back (no padding between
//!   them), each within the file and the scan's largest batch, with a CRC32C that
//!   verifies, at least one record, and the next dense offset; the offsets stay within
//!   the 2^32 - 1 a segment's index can address;
//! - what lies at the end explains why the scan stopped there: fewer than 64 bytes, a zero
//!   header or a whole batch below the segment's base (clean); a whole batch in the
//!   segment's range below the next offset, or the next batch in line when its records
//!   would not fit the segment (corrupt); a whole batch of format 1 (refused by the scan
//!   itself); anything else (torn);
//! - recovery refuses exactly what docs/storage.md says it refuses, cuts exactly the last
//!   segment's tail (everything past the end reads as zeros, the file keeps its size),
//!   and leaves a sealed segment's bytes alone;
//! - the index in memory is the loaded prefix plus one entry per `index_interval_bytes`
//!   of scanned batches, and the `.index` file left behind decodes to exactly it;
//! - recovering the result again changes nothing: no cut, the same end, offsets, index and
//!   bytes.
//!
//! A violated invariant is a panic: what libFuzzer and proptest report.
//!
//! [`recover_segment_image`]: crate::storage::fuzzing::recover_segment_image

use std::path::{Path, PathBuf};

use futures_lite::future::block_on;

use super::index::{self, IndexEntry, INDEX_ENTRY_SIZE};
use super::log::LogConfig;
use super::memory::MemoryStorage;
use super::recovery::{
    judge_scan_end, scan_segment_files, settle_segment, ScanEnd, ScanLimits, ScannedSegment,
    SEGMENT_OFFSETS_MAX,
};
use super::{align_up, segment_file_name, FailurePolicy, StorageError};
use crate::protocol::batch::{check_framing, compute_crc, BatchHeader, BATCH_HEADER_SIZE};

/// One segment as recovery finds it on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentImage {
    /// The `.log` file's bytes.
    pub segment: Vec<u8>,
    /// The `.index` file's bytes; `None`: there is no `.index` file.
    pub index: Option<Vec<u8>>,
    /// The segment's base offset (its file name).
    pub base_offset: u64,
    /// The base offset of the segment after this one; `None` recovers this one as the
    /// last segment, whose tail is cut.
    pub next_base_offset: Option<u64>,
    /// At least 1 (`ServerConfig::validate` refuses 0).
    pub index_interval_bytes: u32,
    /// Bytes the scan reads at a time: at least a batch header, at most `batch_bytes_max`.
    pub scan_window_bytes: usize,
    /// The largest batch the scan takes.
    pub batch_bytes_max: usize,
}

impl SegmentImage {
    /// The last segment of a partition, with the broker's index interval and scan limits.
    pub fn last_segment(segment: Vec<u8>, index: Option<Vec<u8>>, base_offset: u64) -> Self {
        SegmentImage {
            segment,
            index,
            base_offset,
            next_base_offset: None,
            index_interval_bytes: 4096,
            scan_window_bytes: ScanLimits::PRODUCTION.window_bytes,
            batch_bytes_max: ScanLimits::PRODUCTION.batch_bytes_max,
        }
    }

    fn limits(&self) -> ScanLimits {
        ScanLimits {
            window_bytes: self.scan_window_bytes,
            batch_bytes_max: self.batch_bytes_max,
        }
    }

    fn is_last(&self) -> bool {
        self.next_base_offset.is_none()
    }
}

/// An index entry (`storage::index`), as the report shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub offset: u64,
    pub position: u64,
    pub timestamp_ms: i64,
}

impl From<IndexEntry> for Entry {
    fn from(entry: IndexEntry) -> Entry {
        Entry {
            offset: entry.offset,
            position: entry.position,
            timestamp_ms: entry.timestamp_ms,
        }
    }
}

/// Why the scan stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanStop {
    /// Zeros, fewer than a header's bytes, or a batch older than the segment.
    Clean,
    Torn {
        reason: String,
    },
    /// A whole batch of the segment's own range that repeats recovered offsets.
    Corrupt {
        reason: String,
    },
}

/// What the scan found, before recovery decided anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanReport {
    /// Index entries loaded from the `.index` file and verified.
    pub loaded_entries: usize,
    /// Where the scan began.
    pub start: Entry,
    pub end_position: u64,
    pub next_offset: u64,
    pub max_timestamp_ms: i64,
    pub last_append_ms: i64,
    /// The loaded entries and those the scan added.
    pub index: Vec<Entry>,
    pub stop: ScanStop,
}

impl ScanReport {
    fn of<F>(scanned: &ScannedSegment<F>) -> ScanReport {
        let scan = &scanned.scan;
        ScanReport {
            loaded_entries: scanned.loaded_count,
            start: scanned.start.into(),
            end_position: scan.end_position,
            next_offset: scan.next_offset,
            max_timestamp_ms: scan.max_timestamp_ms,
            last_append_ms: scan.last_append_ms,
            index: scan.index.iter().copied().map(Entry::from).collect(),
            stop: match &scan.end {
                ScanEnd::Clean => ScanStop::Clean,
                ScanEnd::Torn { reason } => ScanStop::Torn {
                    reason: reason.clone(),
                },
                ScanEnd::Corrupt { reason } => ScanStop::Corrupt {
                    reason: reason.clone(),
                },
            },
        }
    }
}

/// What recovery did with the segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It serves `[base_offset, next_offset)`; `cut` says why a torn tail was cut off.
    Kept { cut: Option<String> },
    /// The partition would not open (`StorageError::Corrupt`).
    Refused { position: u64, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// `None` when the scan itself refused (a whole batch of format 1).
    pub scan: Option<ScanReport>,
    pub outcome: Outcome,
    /// The files as recovery left them.
    pub segment_after: Vec<u8>,
    pub index_after: Vec<u8>,
}

/// The fuzz target's entry point: parses `data` as a [`FuzzInput`] (nothing happens when
/// it is too short to be one), builds the segment image and recovers it with every check.
pub fn scan_segment_bytes(data: &[u8]) -> Option<RecoveryReport> {
    let input = FuzzInput::parse(data)?;
    Some(recover_segment_image(&input.image()))
}

/// Recovers `image` with the production code, checks the outcome against the bytes, and
/// recovers the result once more, which must change nothing. Panics on any violation.
pub fn recover_segment_image(image: &SegmentImage) -> RecoveryReport {
    assert!(
        image.index_interval_bytes >= 1,
        "the config refuses an index interval of 0"
    );
    let first = recover_once(image, &image.segment, image.index.as_deref());
    check_against_bytes(image, &first);
    if let Outcome::Kept { .. } = first.outcome {
        let second = recover_once(image, &first.segment_after, Some(&first.index_after));
        check_fixpoint(image, &first, &second);
    }
    first
}

/// Where the files live: only ever a key of the in-memory storage.
const DIRECTORY: &str = "/in-memory/partition";

fn recover_once(image: &SegmentImage, segment: &[u8], index: Option<&[u8]>) -> RecoveryReport {
    let directory = Path::new(DIRECTORY);
    let segment_path = directory.join(segment_file_name(image.base_offset));
    let index_path: PathBuf = directory.join(index::index_file_name(image.base_offset));
    let storage = MemoryStorage::default();
    storage.insert(&segment_path, segment.to_vec());
    if let Some(index) = index {
        storage.insert(&index_path, index.to_vec());
    }
    let config = LogConfig {
        segment_size_bytes: 1 << 30,
        preallocate_step_bytes: 4 << 20,
        chunk_size_bytes: 1 << 20,
        index_interval_bytes: image.index_interval_bytes,
        storage_full_retry: std::time::Duration::from_secs(1),
        recycle_segments: true,
        failure_policy: FailurePolicy::StopPartition,
        producers_per_partition_max: 10_000,
        producer_snapshot_interval_bytes: 16 << 20,
        zero_fill: super::ZeroFillConfig::OFF,
        dsync_write_bytes_max: 64 * 1024,
    };
    let (scan, outcome) = block_on(async {
        let scanned = match scan_segment_files(
            &storage,
            directory,
            image.base_offset,
            &config,
            image.limits(),
        )
        .await
        {
            Ok(scanned) => scanned,
            Err(error) => return (None, refused(error)),
        };
        let scan = ScanReport::of(&scanned);
        let cut = match judge_scan_end(&scanned, image.next_base_offset) {
            Ok(cut) => cut,
            Err(error) => return (Some(scan), refused(error)),
        };
        let segment = settle_segment(scanned, image.is_last())
            .await
            .unwrap_or_else(|error| panic!("in-memory files do not fail: {error}"));
        assert_eq!(segment.end_position, scan.end_position);
        assert_eq!(segment.next_offset, scan.next_offset);
        assert_eq!(segment.index.len(), scan.index.len());
        (Some(scan), Outcome::Kept { cut })
    });
    RecoveryReport {
        scan,
        outcome,
        segment_after: storage.contents(&segment_path).expect("the segment stays"),
        index_after: storage.contents(&index_path).unwrap_or_default(),
    }
}

fn refused(error: StorageError) -> Outcome {
    match error {
        StorageError::Corrupt {
            position, reason, ..
        } => Outcome::Refused { position, reason },
        other => panic!("in-memory files do not fail, only refuse as corrupt: {other}"),
    }
}

/// The batch at `position` if one lies there whole: within the file and the largest
/// batch the scan takes, framing and CRC32C right, at least one record.
fn whole_batch_at(image: &SegmentImage, position: u64) -> Option<BatchHeader> {
    let rest = image.segment.get(usize::try_from(position).ok()?..)?;
    let header = check_framing(rest).ok()?;
    (header.batch_length as usize <= image.batch_bytes_max).then_some(header)
}

/// Whether a whole batch of format 1 (magic 1, its CRC right) lies at `position`: what
/// recovery refuses rather than cut.
fn format_1_batch_at(image: &SegmentImage, position: u64) -> bool {
    let Some(rest) = usize::try_from(position)
        .ok()
        .and_then(|position| image.segment.get(position..))
    else {
        return false;
    };
    let Some(header) = BatchHeader::read(rest) else {
        return false;
    };
    let length = header.batch_length as usize;
    header.magic == 1
        && (BATCH_HEADER_SIZE..=rest.len().min(image.batch_bytes_max)).contains(&length)
        && compute_crc(&rest[..length]) == header.crc
}

/// How a scan that ended at `end` with `next_offset` to come must have stopped.
fn expected_stop(image: &SegmentImage, end: u64, next_offset: u64) -> ScanStop {
    let torn = ScanStop::Torn {
        reason: String::new(),
    };
    let rest = &image.segment[usize::try_from(end).expect("the end lies in the file")..];
    if rest.len() < BATCH_HEADER_SIZE || rest[..BATCH_HEADER_SIZE].iter().all(|byte| *byte == 0) {
        return ScanStop::Clean;
    }
    let Some(header) = whole_batch_at(image, end) else {
        assert!(
            !format_1_batch_at(image, end),
            "the scan ended at byte {end} on a whole format-1 batch without refusing"
        );
        return torn;
    };
    if header.base_offset < next_offset {
        return if header.base_offset < image.base_offset {
            ScanStop::Clean
        } else {
            ScanStop::Corrupt {
                reason: String::new(),
            }
        };
    }
    if header.base_offset != next_offset {
        return torn;
    }
    let fits = header
        .base_offset
        .checked_add(u64::from(header.record_count))
        .is_some_and(|batch_next| batch_next - image.base_offset <= SEGMENT_OFFSETS_MAX);
    assert!(
        !fits,
        "the scan ended at byte {end} before a whole batch with the next offset"
    );
    ScanStop::Corrupt {
        reason: String::new(),
    }
}

fn same_kind(stop: &ScanStop, expected: &ScanStop) -> bool {
    std::mem::discriminant(stop) == std::mem::discriminant(expected)
}

fn check_against_bytes(image: &SegmentImage, report: &RecoveryReport) {
    let length = image.segment.len() as u64;
    let original_index = image.index.clone().unwrap_or_default();
    let Some(scan) = &report.scan else {
        let Outcome::Refused { position, reason } = &report.outcome else {
            panic!("a scan that did not finish must have refused: {report:?}");
        };
        assert!(
            format_1_batch_at(image, *position),
            "the scan refused at byte {position} ({reason}), where no whole format-1 batch lies"
        );
        assert_eq!(
            report.segment_after, image.segment,
            "a refusal changes nothing"
        );
        assert_eq!(
            report.index_after, original_index,
            "a refusal changes nothing"
        );
        return;
    };

    // Where the scan began: the last entry of the index file's valid prefix that checks
    // out; later entries of that prefix do not.
    let decoded: Vec<Entry> = image
        .index
        .as_deref()
        .map(|bytes| index::decode_entries(bytes, image.base_offset))
        .unwrap_or_default()
        .into_iter()
        .map(Entry::from)
        .collect();
    let loaded = scan.loaded_entries;
    assert!(loaded <= decoded.len() && loaded <= scan.index.len());
    assert_eq!(scan.index[..loaded], decoded[..loaded], "loaded entries");
    let checks_out = |entry: &Entry| {
        whole_batch_at(image, entry.position).is_some_and(|batch| batch.base_offset == entry.offset)
    };
    for dropped in &decoded[loaded..] {
        assert!(
            !checks_out(dropped),
            "entry {dropped:?} checks out but was dropped"
        );
    }
    if loaded == 0 {
        let origin = Entry {
            offset: image.base_offset,
            position: 0,
            timestamp_ms: i64::MIN,
        };
        assert_eq!(scan.start, origin);
    } else {
        assert_eq!(scan.start, scan.index[loaded - 1]);
        assert!(
            checks_out(&scan.start),
            "the scan began at {:?}",
            scan.start
        );
    }

    // Whole batches back to back from the start to the end, with dense offsets; the
    // index gains one entry per interval of them.
    let mut position = scan.start.position;
    let mut next_offset = scan.start.offset;
    let mut max_timestamp_ms = scan.start.timestamp_ms;
    let mut last_append_ms = i64::MIN;
    let mut index = scan.index[..loaded].to_vec();
    while position < scan.end_position {
        let batch = whole_batch_at(image, position).unwrap_or_else(|| {
            panic!(
                "byte {position}, inside the recovered range ending at {}, is not a whole batch",
                scan.end_position
            )
        });
        let batch_end = position + u64::from(batch.batch_length);
        assert!(
            batch_end <= scan.end_position,
            "batch at {position} crosses the end"
        );
        assert_eq!(
            batch.base_offset, next_offset,
            "offsets are dense at byte {position}"
        );
        max_timestamp_ms = max_timestamp_ms.max(batch.max_timestamp_ms);
        last_append_ms = last_append_ms.max(batch.append_time_ms);
        let due = index
            .last()
            .is_none_or(|last| position - last.position >= u64::from(image.index_interval_bytes));
        if due {
            index.push(Entry {
                offset: next_offset,
                position,
                timestamp_ms: max_timestamp_ms,
            });
        }
        next_offset = batch
            .base_offset
            .checked_add(u64::from(batch.record_count))
            .expect("a recovered batch's offsets fit in 64 bits");
        position = batch_end;
    }
    assert_eq!(position, scan.end_position);
    assert!(scan.end_position <= length, "the end lies in the file");
    assert!(
        scan.next_offset - image.base_offset <= SEGMENT_OFFSETS_MAX,
        "a segment's offsets fit its index"
    );
    assert_eq!(scan.next_offset, next_offset);
    assert_eq!(scan.max_timestamp_ms, max_timestamp_ms);
    assert_eq!(scan.last_append_ms, last_append_ms);
    assert_eq!(scan.index, index, "index entries");
    let mut previous: Option<&Entry> = None;
    for entry in &scan.index {
        match previous {
            None => assert_eq!(
                (entry.offset, entry.position),
                (image.base_offset, 0),
                "the first entry is the segment's first batch"
            ),
            Some(previous) => assert!(
                entry.offset > previous.offset
                    && entry.position > previous.position
                    && entry.timestamp_ms >= previous.timestamp_ms,
                "index entries {previous:?} then {entry:?}"
            ),
        }
        previous = Some(entry);
    }

    // Why the scan stopped there, and what recovery made of it.
    let expected = expected_stop(image, scan.end_position, scan.next_offset);
    assert!(
        same_kind(&scan.stop, &expected),
        "the scan stopped at byte {} as {:?}; the bytes there say {expected:?}",
        scan.end_position,
        scan.stop
    );
    let complete = image.next_base_offset == Some(scan.next_offset);
    let refused = !complete
        && match scan.stop {
            ScanStop::Clean => false,
            ScanStop::Corrupt { .. } => true,
            ScanStop::Torn { .. } => !image.is_last(),
        };
    let cut = !complete && image.is_last() && matches!(scan.stop, ScanStop::Torn { .. });
    match &report.outcome {
        Outcome::Refused { position, .. } => {
            assert!(refused, "refused {:?}", scan.stop);
            assert_eq!(*position, scan.end_position);
            assert_eq!(
                report.segment_after, image.segment,
                "a refusal changes nothing"
            );
            // The index file was opened, so a missing one now exists, empty.
            assert_eq!(
                report.index_after, original_index,
                "a refusal changes nothing"
            );
            return;
        }
        Outcome::Kept { cut: reason } => {
            assert!(!refused, "kept despite {:?}", scan.stop);
            assert_eq!(
                reason.is_some(),
                cut,
                "cut {reason:?} after {:?}",
                scan.stop
            );
        }
    }

    // The files left behind.
    let end = scan.end_position as usize;
    if image.is_last() {
        assert_eq!(
            report.segment_after.len(),
            image.segment.len(),
            "the file keeps its size"
        );
        assert_eq!(
            report.segment_after[..end],
            image.segment[..end],
            "recovered bytes stay"
        );
        assert!(
            report.segment_after[end..].iter().all(|byte| *byte == 0),
            "everything past the recovered end reads as zeros"
        );
    } else {
        assert_eq!(
            report.segment_after, image.segment,
            "a sealed segment is left alone"
        );
    }
    let rewritten = image.is_last() || scan.index.len() != loaded;
    if rewritten {
        let written = align_up((scan.index.len() * INDEX_ENTRY_SIZE) as u64);
        assert_eq!(report.index_after.len() as u64, written);
        let decoded: Vec<Entry> = index::decode_entries(&report.index_after, image.base_offset)
            .into_iter()
            .map(Entry::from)
            .collect();
        assert_eq!(decoded, scan.index, "the index file holds the index");
    } else {
        assert_eq!(
            report.index_after, original_index,
            "a whole sealed index stays"
        );
    }
}

/// Recovering what recovery left must find it as it was, cut nothing and write nothing.
fn check_fixpoint(image: &SegmentImage, first: &RecoveryReport, second: &RecoveryReport) {
    let first_scan = first.scan.as_ref().expect("kept after a scan");
    assert_eq!(
        second.outcome,
        Outcome::Kept { cut: None },
        "recovering a recovered segment: {second:?}"
    );
    let second_scan = second.scan.as_ref().expect("kept after a scan");
    assert_eq!(
        second_scan.loaded_entries,
        first_scan.index.len(),
        "the index is whole"
    );
    assert_eq!(second_scan.end_position, first_scan.end_position);
    assert_eq!(second_scan.next_offset, first_scan.next_offset);
    assert_eq!(second_scan.max_timestamp_ms, first_scan.max_timestamp_ms);
    // The second scan starts at the last entry and sees only the batches after it.
    assert!(second_scan.last_append_ms <= first_scan.last_append_ms);
    assert_eq!(second_scan.index, first_scan.index);
    if image.is_last() {
        assert_eq!(
            second_scan.stop,
            ScanStop::Clean,
            "a cut tail reads as zeros"
        );
    }
    assert_eq!(second.segment_after, first.segment_after);
    assert_eq!(second.index_after, first.index_after);
}

/// The fuzz target's input: a few parameters, then the files. A fuzzer cannot forge
/// CRC32C, nor easily line up 64-bit offsets, so the control byte can have the image
/// builder make them right along a walk of the segment: from byte 0, batch by batch on
/// the declared lengths, as long as one lies whole in the file. Layout (little-endian):
///
/// ```text
///  0 control               u8   bit 0: make each walked batch's CRC32C right
///                               bit 1: give the walked batches dense base offsets
///                               bit 2: the index file starts with entries for the first
///                                      `index_entries_kept` walked batches
///                               bit 3: recover as a sealed segment, the next one based
///                                      at the walk's end offset + `successor_delta`
///                               bits 4-7: scan limits (`LIMITS`)
///  1 base_offset           u64  the segment's base offset (its file name)
///  9 index_interval_bytes  u16  0 is taken as 1 (the config refuses 0)
/// 11 index_entries_kept    u8
/// 12 successor_delta       i8
/// 13 index_length          u16  bytes of index file that follow (fewer if the input
///                               ends); 0xffff and bit 2 clear: no index file
/// 15 index bytes, then the segment file's bytes
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FuzzInput<'a> {
    pub control: u8,
    pub base_offset: u64,
    pub index_interval_bytes: u16,
    pub index_entries_kept: u8,
    pub successor_delta: i8,
    /// `None`: no index bytes (and, without the derived entries, no index file).
    pub index: Option<&'a [u8]>,
    pub segment: &'a [u8],
}

impl<'a> FuzzInput<'a> {
    pub const CONTROL_FIX_CRC: u8 = 1;
    pub const CONTROL_DENSE_OFFSETS: u8 = 1 << 1;
    pub const CONTROL_DERIVED_INDEX: u8 = 1 << 2;
    pub const CONTROL_SEALED: u8 = 1 << 3;
    /// Bits 4-6 of the control byte pick the scan window; bit 7 makes the largest batch
    /// the scan takes equal to the window (else production's 256 MiB). Selector 0 is
    /// production's limits.
    pub const WINDOWS: [usize; 8] = [1 << 20, 64, 65, 100, 128, 256, 1000, 4096];
    pub const CONTROL_SMALL_BATCH_MAX: u8 = 1 << 7;
    pub const HEADER_BYTES: usize = 15;
    const NO_INDEX: u16 = u16::MAX;

    pub fn parse(data: &'a [u8]) -> Option<FuzzInput<'a>> {
        let (header, rest) = data.split_at_checked(Self::HEADER_BYTES)?;
        let index_length = u16::from_le_bytes([header[13], header[14]]);
        let (index, segment) = if index_length == Self::NO_INDEX {
            (None, rest)
        } else {
            let (index, segment) = rest.split_at(usize::from(index_length).min(rest.len()));
            (Some(index), segment)
        };
        Some(FuzzInput {
            control: header[0],
            base_offset: u64::from_le_bytes(header[1..9].try_into().expect("eight bytes")),
            index_interval_bytes: u16::from_le_bytes([header[9], header[10]]),
            index_entries_kept: header[11],
            successor_delta: header[12] as i8,
            index,
            segment,
        })
    }

    /// The bytes `parse` reads back as this input.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![self.control];
        out.extend_from_slice(&self.base_offset.to_le_bytes());
        out.extend_from_slice(&self.index_interval_bytes.to_le_bytes());
        out.push(self.index_entries_kept);
        out.push(self.successor_delta as u8);
        let index = self.index.unwrap_or_default();
        let index_length = match self.index {
            None => Self::NO_INDEX,
            Some(index) => u16::try_from(index.len())
                .ok()
                .filter(|length| *length != Self::NO_INDEX)
                .expect("an index of at most 65,534 bytes"),
        };
        out.extend_from_slice(&index_length.to_le_bytes());
        out.extend_from_slice(index);
        out.extend_from_slice(self.segment);
        out
    }

    /// The segment image this input stands for, with the walk's fixes applied.
    pub fn image(&self) -> SegmentImage {
        let control = self.control;
        let mut segment = self.segment.to_vec();
        let mut walked: Vec<Entry> = Vec::new();
        let mut position = 0usize;
        let mut next_offset = self.base_offset;
        let mut max_timestamp_ms = i64::MIN;
        while segment.len() - position >= BATCH_HEADER_SIZE {
            let length_field = &segment[position + 16..position + 20];
            let length = u32::from_le_bytes(length_field.try_into().expect("four bytes")) as usize;
            if length < BATCH_HEADER_SIZE || length > segment.len() - position {
                break;
            }
            let batch = &mut segment[position..position + length];
            if control & Self::CONTROL_DENSE_OFFSETS != 0 {
                batch[0..8].copy_from_slice(&next_offset.to_le_bytes());
            }
            if control & Self::CONTROL_FIX_CRC != 0 {
                let crc = compute_crc(batch);
                batch[20..24].copy_from_slice(&crc.to_le_bytes());
            }
            let header = BatchHeader::read(batch).expect("a whole header");
            max_timestamp_ms = max_timestamp_ms.max(header.max_timestamp_ms);
            walked.push(Entry {
                offset: header.base_offset,
                position: position as u64,
                timestamp_ms: max_timestamp_ms,
            });
            next_offset = header
                .base_offset
                .wrapping_add(u64::from(header.record_count));
            position += length;
        }
        let derived = control & Self::CONTROL_DERIVED_INDEX != 0;
        let index = (derived || self.index.is_some()).then(|| {
            let mut bytes = Vec::new();
            if derived {
                let kept = usize::from(self.index_entries_kept);
                for entry in walked.iter().take(kept) {
                    // Whatever the walk found, valid or not: the loader judges it.
                    let relative = entry.offset.wrapping_sub(self.base_offset) as u32;
                    bytes.extend_from_slice(&relative.to_le_bytes());
                    bytes.extend_from_slice(&(entry.position as u32).to_le_bytes());
                    bytes.extend_from_slice(&entry.timestamp_ms.to_le_bytes());
                }
            }
            bytes.extend_from_slice(self.index.unwrap_or_default());
            bytes
        });
        let next_base_offset = (control & Self::CONTROL_SEALED != 0)
            .then(|| next_offset.wrapping_add(i64::from(self.successor_delta) as u64));
        let window_bytes = Self::WINDOWS[usize::from(control >> 4 & 7)];
        let batch_bytes_max = if control & Self::CONTROL_SMALL_BATCH_MAX != 0 {
            window_bytes
        } else {
            ScanLimits::PRODUCTION.batch_bytes_max
        };
        SegmentImage {
            segment,
            index,
            base_offset: self.base_offset,
            next_base_offset,
            index_interval_bytes: u32::from(self.index_interval_bytes.max(1)),
            scan_window_bytes: window_bytes,
            batch_bytes_max,
        }
    }
}
