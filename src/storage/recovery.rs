//! Opening a partition directory: find the segments, scan them, cut a torn tail.
//!
//! Rules (docs/storage.md has them in full):
//! - every batch must pass its framing and CRC check and carry the next dense offset;
//! - the scan of the last segment stops at the first batch that does not: that batch and
//!   everything after it is a torn tail from a crash and is cut off (the file is truncated
//!   there and preallocated again, so the bytes read back as zeros);
//! - a sealed segment (any but the last) must end exactly at the next segment's base
//!   offset; anything else is corruption that recovery refuses to paper over;
//! - the recovered tail is fdatasync'ed before the log serves it, so a consumer never
//!   reads bytes a second crash could take back.

use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::file::{LogFile, LogStorage};
use super::log::{IndexEntry, LogConfig, Segment};
use super::{align_down, parse_segment_file_name, segment_file_name, StorageError};
use crate::protocol::batch::{check_framing, BatchHeader, BATCH_HEADER_SIZE};

pub(crate) struct RecoveredSegment<F> {
    pub segments: Vec<Segment<F>>,
    pub tail_bytes: Vec<u8>,
}

/// Bytes read per scan step.
const SCAN_WINDOW_BYTES: usize = 1 << 20;

/// How a segment scan ended.
enum ScanEnd {
    /// Zeros after the last batch (or the end of the file).
    Clean,
    /// Something that is not a whole, valid, next-in-line batch.
    Torn { reason: String },
}

struct Scan {
    index: Vec<IndexEntry>,
    end_position: u64,
    next_offset: u64,
    end: ScanEnd,
}

async fn sync_directory<S: LogStorage>(storage: &S, directory: &Path) -> Result<(), StorageError> {
    storage
        .sync_directory(directory)
        .await
        .map_err(|source| StorageError::io("syncing directory", directory, source))
}

async fn open_segment_file<S: LogStorage>(
    storage: &S,
    path: &Path,
    create: bool,
) -> Result<S::File, StorageError> {
    storage
        .open(path, create)
        .await
        .map_err(|source| StorageError::io("opening segment", path, source))
}

/// Creates, preallocates and makes durable a new empty segment.
pub(crate) async fn create_segment<S: LogStorage>(
    storage: &S,
    directory: &Path,
    base_offset: u64,
    config: &LogConfig,
) -> Result<Segment<S::File>, StorageError> {
    let path = directory.join(segment_file_name(base_offset));
    let file = open_segment_file(storage, &path, true).await?;
    let prepared = prepare_segment(storage, directory, &path, &file, config).await;
    if let Err(error) = prepared {
        // Leave no half-made segment behind: recovery would take it for the next one.
        let _ = std::fs::remove_file(&path);
        return Err(error);
    }
    Ok(Segment {
        base_offset,
        path,
        file: Rc::new(file),
        index: Vec::new(),
        end_position: 0,
        durable_position: 0,
        next_offset: base_offset,
    })
}

async fn prepare_segment<S: LogStorage>(
    storage: &S,
    directory: &Path,
    path: &Path,
    file: &S::File,
    config: &LogConfig,
) -> Result<(), StorageError> {
    // Preallocating the whole segment (size included) means later writes never change
    // the file size, so an fdatasync commits data without an inode size update.
    file.pre_allocate(config.segment_size_bytes)
        .await
        .map_err(|source| StorageError::io("preallocating segment", path, source))?;
    file.fdatasync()
        .await
        .map_err(|source| StorageError::io("syncing new segment", path, source))?;
    sync_directory(storage, directory).await
}

async fn scan_segment<F: LogFile>(
    file: &F,
    path: &Path,
    base_offset: u64,
    config: &LogConfig,
) -> Result<Scan, StorageError> {
    let file_size = file
        .size()
        .await
        .map_err(|source| StorageError::io("sizing segment", path, source))?;
    let mut index: Vec<IndexEntry> = Vec::new();
    let mut position = 0u64;
    let mut next_offset = base_offset;
    let mut need = 0usize;
    let end = loop {
        if position + BATCH_HEADER_SIZE as u64 > file_size {
            break ScanEnd::Clean;
        }
        let length = (file_size - position).min(SCAN_WINDOW_BYTES.max(need) as u64) as usize;
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
                if batch_position + batch_length as u64 > file_size {
                    stop = Some(ScanEnd::Torn {
                        reason: format!("batch at byte {batch_position} runs past the file end"),
                    });
                } else {
                    need = batch_length;
                }
                break;
            }
            if let Err(error) = check_framing(&rest[..batch_length]) {
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
            let due = index.last().is_none_or(|last| {
                batch_position - last.position >= u64::from(config.index_interval_bytes)
            });
            if due {
                index.push(IndexEntry {
                    offset: next_offset,
                    position: batch_position,
                });
            }
            next_offset = header.next_offset();
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
        end,
    })
}

/// Opens every segment in `directory` (creating the directory and a first segment when
/// there are none), verifies them, and cuts a torn tail off the last one.
pub(crate) async fn recover<S: LogStorage>(
    storage: &S,
    directory: &Path,
    config: &LogConfig,
) -> Result<RecoveredSegment<S::File>, StorageError> {
    if !directory.exists() {
        std::fs::create_dir_all(directory).map_err(|source| {
            StorageError::io("creating partition directory", directory, source)
        })?;
        // The new directory's entry must survive a crash too.
        if let Some(parent) = directory.parent() {
            sync_directory(storage, parent).await?;
        }
    }
    let mut base_offsets = Vec::new();
    let entries = std::fs::read_dir(directory)
        .map_err(|source| StorageError::io("listing partition directory", directory, source))?;
    for entry in entries {
        let entry = entry
            .map_err(|source| StorageError::io("listing partition directory", directory, source))?;
        if let Some(base_offset) = entry.file_name().to_str().and_then(parse_segment_file_name) {
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
    let mut segments = Vec::with_capacity(base_offsets.len());
    let last = base_offsets.len() - 1;
    for (number, base_offset) in base_offsets.iter().copied().enumerate() {
        let path: PathBuf = directory.join(segment_file_name(base_offset));
        if let Some(previous) = segments.last() {
            let previous: &Segment<S::File> = previous;
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
        let file = open_segment_file(storage, &path, false).await?;
        let scan = scan_segment(&file, &path, base_offset, config).await?;
        if let ScanEnd::Torn { reason } = &scan.end {
            if number != last {
                return Err(StorageError::Corrupt {
                    path,
                    position: scan.end_position,
                    reason: reason.clone(),
                });
            }
            eprintln!(
                "shardq: recovery: cutting the torn tail of {} at byte {}: {reason}",
                path.display(),
                scan.end_position
            );
        }
        if number == last && matches!(scan.end, ScanEnd::Torn { .. }) {
            // Cut the torn batch and preallocate again so the cut range reads as zeros.
            // A clean end (zeros after the last batch) is left alone: its blocks may be
            // already-written extents, which are much faster to overwrite than fresh ones.
            file.truncate(scan.end_position)
                .await
                .map_err(|source| StorageError::io("truncating segment", &path, source))?;
            file.pre_allocate(config.segment_size_bytes)
                .await
                .map_err(|source| StorageError::io("preallocating segment", &path, source))?;
            file.fdatasync()
                .await
                .map_err(|source| StorageError::io("syncing segment", &path, source))?;
        }
        segments.push(Segment {
            base_offset,
            path,
            file: Rc::new(file),
            index: scan.index,
            end_position: scan.end_position,
            durable_position: scan.end_position,
            next_offset: scan.next_offset,
        });
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
