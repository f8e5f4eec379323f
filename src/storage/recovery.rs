//! Opening a partition directory: find the segments, load their indexes, verify, and cut
//! a torn tail.
//!
//! Rules (docs/storage.md has them in full):
//! - a segment's `.index` is trusted up to its last entry that checks out against the
//!   segment (the batch there has the right base offset and CRC); from that entry the
//!   segment is scanned to its end. With a whole index that is a scan of at most one
//!   index interval plus what was written since the index was last written: restart
//!   time does not grow with the amount of data. A missing or torn index just means a
//!   longer scan, and the index is written again;
//! - every scanned batch must pass its framing and CRC check and carry the next dense
//!   offset, and its records must fit the segment (`SEGMENT_OFFSETS_MAX`);
//! - the scan of the last segment stops at the first batch that does not: a whole batch
//!   whose base offset lies below the segment's base is stale data of a recycled file and
//!   simply marks the end; a whole batch inside the segment's range that repeats an
//!   offset already recovered is corruption, and the partition refuses to open; anything
//!   else is a torn tail from a crash;
//! - everything past the last segment's recovered end is cut off (truncated and
//!   preallocated again, so it reads as zeros), torn or not: a crash can leave a later
//!   chunk of a round on disk beyond a lost earlier one;
//! - a sealed segment (any but the last) must end exactly at the next segment's base
//!   offset; anything else is corruption that recovery refuses to paper over. Damage in
//!   the middle of a sealed segment, before its last index entry, is found when a read
//!   reaches it (reads check every batch's CRC), and the partition refuses to serve past
//!   it;
//! - the recovered tail is fdatasync'ed before the log serves it, so a consumer never
//!   reads bytes a second crash could take back.

use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::file::{LogFile, LogStorage};
use super::index::{self, IndexEntry};
use super::log::{LogConfig, Segment};
use super::{align_down, parse_segment_file_name, segment_file_name, StorageError};
use crate::protocol::batch::{check_framing, BatchHeader, BATCH_HEADER_SIZE};

pub(crate) struct RecoveredSegment<F> {
    pub segments: Vec<Segment<F>>,
    pub tail_bytes: Vec<u8>,
}

/// Most offsets one segment holds: index entries store an offset relative to the
/// segment's base in 32 bits (`storage::index`).
pub(crate) const SEGMENT_OFFSETS_MAX: u64 = u32::MAX as u64;

/// How much a segment scan reads at a time, and the largest batch it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ScanLimits {
    /// Bytes read per scan step: at least one batch header, at most `batch_bytes_max`.
    pub window_bytes: usize,
    /// The largest batch a scan will read to check: far above any chunk size in use, but
    /// a bound on what a garbage length (stale or torn bytes) can make recovery allocate.
    pub batch_bytes_max: usize,
}

impl ScanLimits {
    /// What the broker uses. The fuzz target (`storage::fuzzing`) picks far smaller ones,
    /// so that inputs of a few KiB reach the window and size branches too.
    pub(crate) const PRODUCTION: ScanLimits = ScanLimits {
        window_bytes: 1 << 20,
        batch_bytes_max: 256 << 20,
    };

    fn check(&self) {
        // A window shorter than a header would end every scan at once, as if at zeros;
        // one longer than the largest batch would take batches past that bound unchecked.
        assert!(
            BATCH_HEADER_SIZE <= self.window_bytes && self.window_bytes <= self.batch_bytes_max,
            "scan limits {self:?}: the window must hold a batch header and not exceed the largest batch"
        );
    }
}

/// How a segment scan ended.
pub(crate) enum ScanEnd {
    /// Zeros, stale data of a recycled file, or the end of the file.
    Clean,
    /// Something that is not a whole, valid, next-in-line batch.
    Torn { reason: String },
    /// A whole, valid batch of this segment's own offset range that repeats offsets
    /// already recovered: not something a crash produces (a bit flip in its base offset,
    /// which the CRC does not cover, or a second writer). Taking it for the end would let
    /// new appends reuse offsets over acknowledged data, so recovery refuses. Also the
    /// next batch in line when its records would take the segment past
    /// `SEGMENT_OFFSETS_MAX` offsets or past u64::MAX.
    Corrupt { reason: String },
}

pub(crate) struct Scan {
    pub index: Vec<IndexEntry>,
    pub end_position: u64,
    pub next_offset: u64,
    pub max_timestamp_ms: i64,
    pub last_append_ms: i64,
    pub end: ScanEnd,
}

async fn sync_directory<S: LogStorage>(storage: &S, directory: &Path) -> Result<(), StorageError> {
    storage
        .sync_directory(directory)
        .await
        .map_err(|source| StorageError::io("syncing directory", directory, source))
}

async fn open_file<S: LogStorage>(
    storage: &S,
    path: &Path,
    create: bool,
) -> Result<S::File, StorageError> {
    storage
        .open(path, create)
        .await
        .map_err(|source| StorageError::io("opening segment", path, source))
}

/// A segment deleted by retention, kept to become the next segment (at most one per
/// partition).
pub(crate) const SPARE_SEGMENT_FILE: &str = "spare.log";

/// Creates, preallocates and makes durable a new empty segment and its index, recycling
/// the partition's spare segment file when there is one.
pub(crate) async fn create_segment<S: LogStorage>(
    storage: &S,
    directory: &Path,
    base_offset: u64,
    config: &LogConfig,
) -> Result<Segment<S::File>, StorageError> {
    let path = directory.join(segment_file_name(base_offset));
    let index_path = directory.join(index::index_file_name(base_offset));
    let spare = directory.join(SPARE_SEGMENT_FILE);
    let created = async {
        let recycled = storage
            .exists(&spare)
            .await
            .map_err(|source| StorageError::io("looking for a spare segment", &spare, source))?;
        if recycled {
            // A segment retention deleted, kept for this: its blocks are written
            // extents, much faster to overwrite than fresh ones. Its old bytes are never
            // read (reads stop at the durable end) and recovery tells them apart by their
            // offsets, which lie below this segment's base.
            storage
                .rename(&spare, &path)
                .await
                .map_err(|source| StorageError::io("recycling segment", &spare, source))?;
        }
        let file = open_file(storage, &path, true).await?;
        let size = file
            .size()
            .await
            .map_err(|source| StorageError::io("sizing segment", &path, source))?;
        // One step of space up front (a recycled file keeps what it has); rounds reserve
        // more ahead of the write position as the segment fills.
        let allocated = size.max(config.preallocate_step_bytes.min(config.segment_size_bytes));
        preallocate(&file, &path, allocated).await?;
        // A recycled file was written up to its old size (its data, and the zeros
        // written ahead of it: storage::zero_fill), so it needs no zero-filling; a new
        // one is all unwritten extents. (Not exact for a recycled file: a segment rolled
        // before zero-filling reached its end leaves its last blocks unwritten, and
        // rounds writing there pay the extent conversion as they would without it.)
        let written = if recycled { size } else { 0 };
        // The index is not preallocated: it is small, written without fdatasync while
        // the segment fills, and rebuilt from the segment if a crash loses any of it.
        let index_file = open_file(storage, &index_path, true).await?;
        sync_directory(storage, directory).await?;
        Ok::<_, StorageError>((file, index_file, allocated, written))
    }
    .await;
    let (file, index_file, allocated_bytes, written_bytes) = match created {
        Ok(files) => files,
        Err(error) => {
            // Leave no half-made segment behind: recovery would take it for the next one.
            // The removal must be durable before the caller goes on: after a refused roll
            // appends go on into the old segment, past this one's base offset, and a crash
            // that brought the file back would leave a segment based below the end of the
            // one before it, which recovery refuses (found by the crash model, seed
            // 994646720171). If the cleanup fails, that error stops the partition.
            let cleaned = async {
                for file in [&path, &index_path] {
                    storage.remove_file(file).await.map_err(|source| {
                        StorageError::io("removing a half-made segment", file, source)
                    })?;
                }
                sync_directory(storage, directory).await
            }
            .await;
            return Err(cleaned.err().unwrap_or(error));
        }
    };
    Ok(Segment {
        base_offset,
        path,
        file: Rc::new(file),
        index_path,
        index_file: Rc::new(index_file),
        index: Vec::new(),
        index_written: 0,
        end_position: 0,
        durable_position: 0,
        allocated_bytes,
        written_bytes,
        zero_fill_unsynced: false,
        next_offset: base_offset,
        max_timestamp_ms: i64::MIN,
        last_append_ms: i64::MIN,
    })
}

async fn preallocate<F: LogFile>(file: &F, path: &Path, size: u64) -> Result<(), StorageError> {
    file.pre_allocate(size)
        .await
        .map_err(|source| StorageError::io("preallocating", path, source))?;
    file.fdatasync()
        .await
        .map_err(|source| StorageError::io("syncing new file", path, source))
}

/// Scans `file` from `start` (a batch boundary holding offset `start_offset`), extending
/// `index`, until the valid batches end.
async fn scan_segment<F: LogFile>(
    file: &F,
    path: &Path,
    segment_base: u64,
    start: &IndexEntry,
    mut index: Vec<IndexEntry>,
    config: &LogConfig,
    limits: ScanLimits,
) -> Result<Scan, StorageError> {
    limits.check();
    let file_size = file
        .size()
        .await
        .map_err(|source| StorageError::io("sizing segment", path, source))?;
    let mut position = start.position;
    let mut next_offset = start.offset;
    let mut max_timestamp_ms = start.timestamp_ms;
    let mut last_append_ms = i64::MIN;
    let mut need = 0usize;
    let end = loop {
        if position + BATCH_HEADER_SIZE as u64 > file_size {
            break ScanEnd::Clean;
        }
        let length = (file_size - position).min(limits.window_bytes.max(need) as u64) as usize;
        let data = file
            .read_at(position, length)
            .await
            .map_err(|source| StorageError::io("reading segment", path, source))?;
        need = 0;
        let mut at = 0usize;
        let mut stop = None;
        while at + BATCH_HEADER_SIZE <= data.len() {
            let rest = &data[at..];
            if rest[..BATCH_HEADER_SIZE].iter().all(|byte| *byte == 0) {
                stop = Some(ScanEnd::Clean);
                break;
            }
            let header = BatchHeader::read(rest).expect("length checked");
            let batch_length = header.batch_length as usize;
            let batch_position = position + at as u64;
            if header.base_offset < next_offset && check_framing(rest).is_ok() {
                // Offsets only grow, and a recycled file's earlier life held a segment
                // deleted by retention: its batches all lie below this segment's base.
                stop = Some(if header.base_offset < segment_base {
                    ScanEnd::Clean
                } else {
                    ScanEnd::Corrupt {
                        reason: format!(
                            "batch at byte {batch_position} has base offset {}, at or above the segment's base {segment_base} but below the next offset {next_offset}",
                            header.base_offset
                        ),
                    }
                });
                break;
            }
            // Bounded by the file, not by today's chunk size: a batch written under a
            // larger chunk_size_bytes is still a whole, acknowledged batch.
            if batch_length < BATCH_HEADER_SIZE {
                stop = Some(ScanEnd::Torn {
                    reason: format!(
                        "batch length {batch_length} at byte {batch_position} is impossible"
                    ),
                });
                break;
            }
            if batch_length > rest.len() {
                if batch_position + batch_length as u64 > file_size
                    || batch_length > limits.batch_bytes_max
                {
                    stop = Some(ScanEnd::Torn {
                        reason: format!("batch at byte {batch_position} runs past the file end"),
                    });
                } else {
                    need = batch_length;
                }
                break;
            }
            if let Err(error) = check_framing(&rest[..batch_length]) {
                refuse_old_format(&rest[..batch_length], path, batch_position)?;
                stop = Some(ScanEnd::Torn {
                    reason: format!("batch at byte {batch_position}: {error}"),
                });
                break;
            }
            if header.base_offset != next_offset {
                stop = Some(ScanEnd::Torn {
                    reason: format!(
                        "batch at byte {batch_position} has base offset {}, expected {next_offset}",
                        header.base_offset
                    ),
                });
                break;
            }
            // The base offset is right, but the records must also fit the segment: its
            // offsets stay within SEGMENT_OFFSETS_MAX of its base (the index stores them
            // in 32 bits, and the next batch's entry holds the offset after this one)
            // and below u64::MAX. No broker writes more: a segment's bytes run out long
            // before. A whole batch in line that claims more passed its CRC all the same
            // (the scan checks framing, not each record) or sits in a segment named near
            // u64::MAX; taking it would panic the index rewrite, cutting it would guess.
            // Found by the recovery_scan fuzz target and property test.
            let batch_next_offset = header
                .base_offset
                .checked_add(u64::from(header.record_count))
                .filter(|batch_next| batch_next - segment_base <= SEGMENT_OFFSETS_MAX);
            let Some(batch_next_offset) = batch_next_offset else {
                stop = Some(ScanEnd::Corrupt {
                    reason: format!(
                        "batch at byte {batch_position} holds {} records from offset {}: more than a segment based at {segment_base} can hold ({SEGMENT_OFFSETS_MAX} offsets, none past u64::MAX)",
                        header.record_count, header.base_offset
                    ),
                });
                break;
            };
            max_timestamp_ms = max_timestamp_ms.max(header.max_timestamp_ms);
            last_append_ms = last_append_ms.max(header.append_time_ms);
            let due = index.last().is_none_or(|last| {
                batch_position - last.position >= u64::from(config.index_interval_bytes)
            });
            if due {
                index.push(IndexEntry {
                    offset: next_offset,
                    position: batch_position,
                    timestamp_ms: max_timestamp_ms,
                });
            }
            next_offset = batch_next_offset;
            at += batch_length;
        }
        position += at as u64;
        if let Some(stop) = stop {
            break stop;
        }
        if need == 0 && at == 0 {
            break ScanEnd::Clean;
        }
    };
    Ok(Scan {
        index,
        end_position: position,
        next_offset,
        max_timestamp_ms,
        last_append_ms,
        end,
    })
}

/// A whole batch of format 1 (the 48-byte header before producer ids) is an old log,
/// not a torn tail: refuse to open it rather than cut it off.
fn refuse_old_format(batch: &[u8], path: &Path, position: u64) -> Result<(), StorageError> {
    let old_magic = batch.get(24) == Some(&1);
    if old_magic
        && crate::protocol::batch::compute_crc(batch)
            == BatchHeader::read(batch).map_or(0, |header| header.crc)
    {
        return Err(StorageError::Corrupt {
            path: path.to_path_buf(),
            position,
            reason: "written in batch format 1; this broker reads format 2 only (protocol.md §8)"
                .into(),
        });
    }
    Ok(())
}

/// Whether the batch an index entry points at is really there: the right base offset
/// and a valid CRC.
async fn entry_checks_out<F: LogFile>(file: &F, entry: &IndexEntry, limits: ScanLimits) -> bool {
    let Ok(header) = file.read_at(entry.position, BATCH_HEADER_SIZE).await else {
        return false;
    };
    let Some(parsed) = BatchHeader::read(&header) else {
        return false;
    };
    if parsed.base_offset != entry.offset || parsed.batch_length as usize > limits.batch_bytes_max {
        return false;
    }
    match file
        .read_at(entry.position, parsed.batch_length as usize)
        .await
    {
        Ok(batch) => check_framing(&batch).is_ok(),
        Err(_) => false,
    }
}

/// Loads the valid, verified prefix of an index file (empty when there is none).
async fn load_index<S: LogStorage>(
    storage: &S,
    index_path: &Path,
    segment: &S::File,
    base_offset: u64,
    limits: ScanLimits,
) -> Result<(S::File, Vec<IndexEntry>), StorageError> {
    let index_file = open_file(storage, index_path, true).await?;
    let size = index_file
        .size()
        .await
        .map_err(|source| StorageError::io("sizing index", index_path, source))?;
    let mut entries = if size == 0 {
        Vec::new()
    } else {
        let bytes = index_file
            .read_at(0, size as usize)
            .await
            .map_err(|source| StorageError::io("reading index", index_path, source))?;
        index::decode_entries(&bytes, base_offset)
    };
    // Trust the last entry only once the segment confirms it; entries written ahead of
    // a crash may point past the data that survived.
    while let Some(last) = entries.last() {
        if entry_checks_out(segment, last, limits).await {
            break;
        }
        entries.pop();
    }
    Ok((index_file, entries))
}

/// Writes a segment's whole index again (after recovery changed or rebuilt it) and makes
/// it durable.
pub(crate) async fn rewrite_index<F: LogFile>(
    file: &F,
    path: &Path,
    entries: &[IndexEntry],
    base_offset: u64,
) -> Result<(), StorageError> {
    file.truncate(0)
        .await
        .map_err(|source| StorageError::io("truncating index", path, source))?;
    if !entries.is_empty() {
        let length = super::align_up((entries.len() * index::INDEX_ENTRY_SIZE) as u64) as usize;
        let mut buffer = file.allocate_buffer(length);
        index::encode_entries(entries, base_offset, buffer.as_bytes_mut());
        let written = file
            .write_at(Rc::new(buffer), 0)
            .await
            .map_err(|source| StorageError::io("writing index", path, source))?;
        if written != length {
            return Err(StorageError::NoSpace {
                operation: "writing index",
                path: path.to_path_buf(),
                detail: format!("short write of {written} of {length} bytes"),
            });
        }
    }
    file.fdatasync()
        .await
        .map_err(|source| StorageError::io("syncing index", path, source))
}

/// One segment opened, its index loaded and verified, and its data scanned: what recovery
/// knows of it before deciding anything. `recover` takes each segment through
/// `scan_segment_files`, `judge_scan_end` and `settle_segment`, in that order; the fuzz
/// target (`storage::fuzzing`) runs the same three on one segment in memory.
pub(crate) struct ScannedSegment<F> {
    pub base_offset: u64,
    pub path: PathBuf,
    pub file: F,
    pub file_size: u64,
    pub index_path: PathBuf,
    pub index_file: F,
    /// Entries of the `.index` file that were loaded and verified; the scan extends them.
    pub loaded_count: usize,
    /// Where the scan began: the last loaded entry, or byte 0 at the base offset.
    pub start: IndexEntry,
    pub scan: Scan,
}

/// Opens the segment of `base_offset` in `directory` and its index (creating a missing
/// `.index` empty), loads the index's verified prefix, and scans the segment from its
/// last entry. Changes nothing on disk.
pub(crate) async fn scan_segment_files<S: LogStorage>(
    storage: &S,
    directory: &Path,
    base_offset: u64,
    config: &LogConfig,
    limits: ScanLimits,
) -> Result<ScannedSegment<S::File>, StorageError> {
    let path: PathBuf = directory.join(segment_file_name(base_offset));
    let index_path = directory.join(index::index_file_name(base_offset));
    let file = open_file(storage, &path, false).await?;
    let file_size = file
        .size()
        .await
        .map_err(|source| StorageError::io("sizing segment", &path, source))?;
    let (index_file, loaded) = load_index(storage, &index_path, &file, base_offset, limits).await?;
    let loaded_count = loaded.len();
    let start = loaded.last().copied().unwrap_or(IndexEntry {
        offset: base_offset,
        position: 0,
        timestamp_ms: i64::MIN,
    });
    let scan = scan_segment(&file, &path, base_offset, &start, loaded, config, limits).await?;
    Ok(ScannedSegment {
        base_offset,
        path,
        file,
        file_size,
        index_path,
        index_file,
        loaded_count,
        start,
        scan,
    })
}

/// Decides what a scan's end means. `next_base_offset` is the base offset of the segment
/// after this one, `None` for the last segment. Refuses (`Corrupt`) what recovery may not
/// cut; returns why the last segment's tail is torn when it is (the caller says so, and
/// `settle_segment` cuts it).
pub(crate) fn judge_scan_end<F>(
    scanned: &ScannedSegment<F>,
    next_base_offset: Option<u64>,
) -> Result<Option<String>, StorageError> {
    let scan = &scanned.scan;
    // A sealed segment that ends exactly where the next one begins is whole, even if
    // what follows its data does not look like zeros (old bytes of a recycled file).
    let complete = next_base_offset.is_some_and(|next_base| scan.next_offset == next_base);
    if let ScanEnd::Corrupt { reason } = &scan.end {
        if !complete {
            return Err(StorageError::Corrupt {
                path: scanned.path.clone(),
                position: scan.end_position,
                reason: reason.clone(),
            });
        }
    }
    if let (ScanEnd::Torn { reason }, false) = (&scan.end, complete) {
        if next_base_offset.is_some() {
            return Err(StorageError::Corrupt {
                path: scanned.path.clone(),
                position: scan.end_position,
                reason: reason.clone(),
            });
        }
        return Ok(Some(reason.clone()));
    }
    Ok(None)
}

/// Makes a judged segment ready to serve: the last segment (`last`) loses everything past
/// its recovered end and is fdatasync'ed; an index the scan changed is written again.
pub(crate) async fn settle_segment<F: LogFile>(
    scanned: ScannedSegment<F>,
    last: bool,
) -> Result<Segment<F>, StorageError> {
    let ScannedSegment {
        base_offset,
        path,
        file,
        file_size,
        index_path,
        index_file,
        loaded_count,
        start: _,
        scan,
    } = scanned;
    // What is known written: a sealed segment is never written again, so its size will
    // do. The last one is cut at its end below, and what lies past the end's block reads
    // as unwritten extents again; zero-filling starts over from there.
    let mut written_bytes = file_size;
    if last {
        // Whatever lies past the recovered end goes, torn or not: the chunks of one
        // round are written concurrently, so a crash can keep a later chunk and lose
        // an earlier one. The scan stops at the hole, but the later chunk's batches
        // (never acknowledged) would still be on disk, and once new appends had
        // reused their offsets a later recovery could adopt them as records. Cut at
        // the end and allocate again, so the rest reads as zeros. The price: a
        // recycled file's written blocks past the end become fresh ones again.
        if scan.end_position < file_size {
            file.truncate(scan.end_position)
                .await
                .map_err(|source| StorageError::io("truncating segment", &path, source))?;
            file.pre_allocate(file_size)
                .await
                .map_err(|source| StorageError::io("preallocating segment", &path, source))?;
            written_bytes = super::align_up(scan.end_position);
        }
        file.fdatasync()
            .await
            .map_err(|source| StorageError::io("syncing segment", &path, source))?;
    }
    let index_complete = scan.index.len() == loaded_count && !last;
    if !index_complete {
        rewrite_index(&index_file, &index_path, &scan.index, base_offset).await?;
    }
    let index_written = scan.index.len();
    Ok(Segment {
        base_offset,
        path,
        file: Rc::new(file),
        index_path,
        index_file: Rc::new(index_file),
        index: scan.index,
        index_written,
        end_position: scan.end_position,
        durable_position: scan.end_position,
        allocated_bytes: file_size,
        written_bytes,
        zero_fill_unsynced: false,
        next_offset: scan.next_offset,
        max_timestamp_ms: scan.max_timestamp_ms,
        last_append_ms: scan.last_append_ms,
    })
}

/// Opens every segment in `directory` (creating the directory and a first segment when
/// there are none), verifies them, and cuts a torn tail off the last one.
pub(crate) async fn recover<S: LogStorage>(
    storage: &S,
    directory: &Path,
    config: &LogConfig,
) -> Result<RecoveredSegment<S::File>, StorageError> {
    // The directory calls run on the blocking thread (`LogStorage`), at start-up as for a
    // topic created at run time: the shard may be serving other partitions meanwhile.
    let created = storage
        .create_directory(directory)
        .await
        .map_err(|source| StorageError::io("creating partition directory", directory, source))?;
    if created {
        // The new directory's entry must survive a crash too.
        if let Some(parent) = directory.parent() {
            sync_directory(storage, parent).await?;
        }
    }
    let mut base_offsets = Vec::new();
    let entries = storage
        .list_directory(directory)
        .await
        .map_err(|source| StorageError::io("listing partition directory", directory, source))?;
    for name in entries {
        if let Some(base_offset) = name.to_str().and_then(parse_segment_file_name) {
            base_offsets.push(base_offset);
        }
    }
    base_offsets.sort_unstable();
    if base_offsets.is_empty() {
        let segment = create_segment(storage, directory, 0, config).await?;
        return Ok(RecoveredSegment {
            segments: vec![segment],
            tail_bytes: Vec::new(),
        });
    }
    let mut segments: Vec<Segment<S::File>> = Vec::with_capacity(base_offsets.len());
    for (number, base_offset) in base_offsets.iter().copied().enumerate() {
        if let Some(previous) = segments.last() {
            if previous.next_offset != base_offset {
                return Err(StorageError::Corrupt {
                    path: previous.path.clone(),
                    position: previous.end_position,
                    reason: format!(
                        "segment ends at offset {} but the next segment starts at {base_offset}",
                        previous.next_offset
                    ),
                });
            }
        }
        let next_base_offset = base_offsets.get(number + 1).copied();
        let scanned = scan_segment_files(
            storage,
            directory,
            base_offset,
            config,
            ScanLimits::PRODUCTION,
        )
        .await?;
        if let Some(reason) = judge_scan_end(&scanned, next_base_offset)? {
            tracing::warn!(
                path = %scanned.path.display(),
                position = scanned.scan.end_position,
                reason = %reason,
                "recovery: cutting the torn tail of {} at byte {}: {reason}",
                scanned.path.display(),
                scanned.scan.end_position
            );
        }
        segments.push(settle_segment(scanned, next_base_offset.is_none()).await?);
    }
    let tail = segments.last().expect("at least one segment");
    let tail_start = align_down(tail.end_position);
    let tail_length = (tail.end_position - tail_start) as usize;
    let tail_bytes = if tail_length == 0 {
        Vec::new()
    } else {
        let data = tail
            .file
            .read_at(tail_start, tail_length)
            .await
            .map_err(|source| StorageError::io("reading segment tail", &tail.path, source))?;
        data[..tail_length].to_vec()
    };
    Ok(RecoveredSegment {
        segments,
        tail_bytes,
    })
}
