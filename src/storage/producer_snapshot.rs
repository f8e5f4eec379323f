//! The producer table on disk: writing `producers.snapshot` and rebuilding the table when
//! a partition opens (docs/storage.md, "Producer snapshot").
//!
//! What it is: the file I/O around the sans-IO table and codec of `producers.rs`, on the
//! partition's owning shard, through the same `LogStorage` seam as the log (so tests
//! crash it with the fault-injecting storage). What it is not: part of the append path.
//! The flusher writes snapshots after a round is durable; recovery reads one.
//!
//! Recovery of the table: the log's own recovery scans only from each segment's last
//! index entry, so the table cannot be rebuilt from that scan. Instead the snapshot says
//! which offset S it is valid for (every batch below S applied, none at or above) and
//! where the batch at S starts; recovery loads it and applies the header of every batch
//! from S to the recovered end. A snapshot that is damaged, from the future (S above the
//! recovered end: the log lost a torn tail the snapshot never covered, which cannot
//! happen since snapshots cover only durable data, but a copied directory can), from
//! before the log start, or whose position does not hold the batch at S is ignored with a
//! warning, and the table is rebuilt from the last segment alone: producers that last
//! wrote before it are forgotten, and are unknown (any sequence accepted) until they
//! write again.

use std::path::Path;
use std::rc::Rc;

use super::file::{LogFile, LogStorage};
use super::log::Segment;
use super::producers::{
    decode_snapshot, KeptBatch, ProducerTable, SnapshotPoint, PRODUCER_SNAPSHOT_FILE,
    PRODUCER_SNAPSHOT_TEMP_FILE,
};
use super::{align_up, StorageError};
use crate::protocol::batch::{BatchHeader, BATCH_HEADER_SIZE, PRODUCER_ID_NONE};

/// Bytes read per step of the header scan; batch bodies in between are skipped.
const SCAN_WINDOW_BYTES: usize = 256 << 10;

/// Writes `bytes` (an encoded snapshot) as the partition's snapshot, atomically: to a
/// temporary file, fdatasync, rename over the snapshot, sync the directory. A crash at
/// any point leaves either the old snapshot or the new one, never a mix.
pub(crate) async fn write_snapshot<S: LogStorage>(
    storage: &S,
    directory: &Path,
    bytes: &[u8],
) -> Result<(), StorageError> {
    let temp = directory.join(PRODUCER_SNAPSHOT_TEMP_FILE);
    let file = storage
        .open(&temp, true)
        .await
        .map_err(|source| StorageError::io("opening producer snapshot", &temp, source))?;
    file.truncate(0)
        .await
        .map_err(|source| StorageError::io("truncating producer snapshot", &temp, source))?;
    // O_DIRECT writes whole blocks: the padding is zeros, and the decoder finds the end
    // from the entry count.
    let length = align_up(bytes.len() as u64) as usize;
    let mut buffer = glommio::allocate_dma_buffer(length);
    buffer.as_bytes_mut()[..bytes.len()].copy_from_slice(bytes);
    buffer.as_bytes_mut()[bytes.len()..].fill(0);
    let written = file
        .write_at(Rc::new(buffer), 0)
        .await
        .map_err(|source| StorageError::io("writing producer snapshot", &temp, source))?;
    if written != length {
        return Err(StorageError::NoSpace {
            operation: "writing producer snapshot",
            path: temp,
            detail: format!("short write of {written} of {length} bytes"),
        });
    }
    file.fdatasync()
        .await
        .map_err(|source| StorageError::io("syncing producer snapshot", &temp, source))?;
    drop(file);
    let target = directory.join(PRODUCER_SNAPSHOT_FILE);
    storage
        .rename(&temp, &target)
        .await
        .map_err(|source| StorageError::io("renaming producer snapshot", &temp, source))?;
    storage
        .sync_directory(directory)
        .await
        .map_err(|source| StorageError::io("syncing directory", directory, source))
}

/// Reads and decodes the snapshot; `Ok(None)` when there is none, `Err(reason)` when it
/// cannot be used.
async fn load_snapshot<S: LogStorage>(
    storage: &S,
    directory: &Path,
    producers_max: usize,
) -> Result<Option<(SnapshotPoint, ProducerTable)>, String> {
    let path = directory.join(PRODUCER_SNAPSHOT_FILE);
    match storage.exists(&path).await {
        Ok(true) => {}
        Ok(false) => return Ok(None),
        Err(error) => return Err(format!("looking for {}: {error}", path.display())),
    }
    let file = storage
        .open(&path, false)
        .await
        .map_err(|error| format!("opening {}: {error}", path.display()))?;
    let size = file
        .size()
        .await
        .map_err(|error| format!("sizing {}: {error}", path.display()))?;
    let bytes = file
        .read_at(0, size as usize)
        .await
        .map_err(|error| format!("reading {}: {error}", path.display()))?;
    decode_snapshot(&bytes, producers_max)
        .map(Some)
        .map_err(|error| format!("{}: {error}", path.display()))
}

/// Where the scan starts for a snapshot valid at `point`: the index of the segment, the
/// position of the batch at `point.offset` and that offset, or why the snapshot does not
/// fit the log.
async fn scan_start<F: LogFile>(
    segments: &[Segment<F>],
    point: &SnapshotPoint,
) -> Result<(usize, u64, u64), String> {
    let log_start = segments[0].base_offset;
    let log_end = segments
        .last()
        .expect("recovery leaves a segment")
        .next_offset;
    if point.offset < log_start || point.offset > log_end {
        return Err(format!(
            "it is valid at offset {}, outside the log's range [{log_start}, {log_end}]",
            point.offset
        ));
    }
    // The segment that holds offset S, or whose end it is when S is the log end.
    let number = segments.partition_point(|segment| segment.base_offset <= point.offset) - 1;
    let segment = &segments[number];
    if point.offset == segment.base_offset {
        return Ok((number, 0, point.offset));
    }
    if point.segment_base != segment.base_offset {
        return Err(format!(
            "it places offset {} in the segment at {}, the log in the segment at {}",
            point.offset, point.segment_base, segment.base_offset
        ));
    }
    if point.offset == segment.next_offset {
        return if point.position == segment.end_position {
            Ok((number, point.position, point.offset))
        } else {
            Err(format!(
                "it places the log end {} at byte {}, the log at byte {}",
                point.offset, point.position, segment.end_position
            ))
        };
    }
    let header = segment
        .file
        .read_at(point.position, BATCH_HEADER_SIZE)
        .await
        .map_err(|error| format!("reading the batch at byte {}: {error}", point.position))?;
    match BatchHeader::read(&header) {
        Some(header) if header.base_offset == point.offset => {
            Ok((number, point.position, point.offset))
        }
        Some(header) => Err(format!(
            "the batch at byte {} of segment {} has base offset {}, not {}",
            point.position, segment.base_offset, header.base_offset, point.offset
        )),
        None => Err(format!(
            "no batch header at byte {} of segment {}",
            point.position, segment.base_offset
        )),
    }
}

/// Applies the producer fields of every batch of `segment` from `position` (the start of
/// the batch holding offset `expected`) to its end. Reads only headers: batch bodies in
/// between are skipped.
async fn apply_segment<F: LogFile>(
    segment: &Segment<F>,
    mut position: u64,
    mut expected: u64,
    table: &mut ProducerTable,
) -> Result<(), StorageError> {
    let corrupt = |position: u64, reason: String| StorageError::Corrupt {
        path: segment.path.clone(),
        position,
        reason,
    };
    while position < segment.end_position {
        let length = (segment.end_position - position).min(SCAN_WINDOW_BYTES as u64) as usize;
        let data = segment
            .file
            .read_at(position, length)
            .await
            .map_err(|source| StorageError::io("reading segment", &segment.path, source))?;
        let mut at = 0usize;
        while at + BATCH_HEADER_SIZE <= data.len() {
            let header = BatchHeader::read(&data[at..]).expect("length checked");
            let batch_position = position + at as u64;
            if header.batch_length < BATCH_HEADER_SIZE as u32 || header.base_offset != expected {
                return Err(corrupt(
                    batch_position,
                    format!(
                        "producer scan: batch of {} bytes with base offset {} where offset {expected} was expected",
                        header.batch_length, header.base_offset
                    ),
                ));
            }
            if header.producer_id != PRODUCER_ID_NONE {
                let kept = KeptBatch {
                    sequence: header.sequence,
                    base_offset: header.base_offset,
                    next_offset: header.next_offset(),
                    crc: header.crc,
                };
                table.record(header.producer_id, kept);
            }
            expected = header.next_offset();
            at += header.batch_length as usize;
        }
        if at == 0 && data.len() < BATCH_HEADER_SIZE {
            return Err(corrupt(
                position,
                format!(
                    "producer scan: {} bytes left before the segment end",
                    data.len()
                ),
            ));
        }
        position += at as u64;
    }
    Ok(())
}

/// The producer table of a partition whose log `recovery` has just opened: the snapshot
/// plus a scan from its offset, or (without a usable snapshot) a scan of the last segment.
pub(crate) async fn recover_table<S: LogStorage>(
    storage: &S,
    directory: &Path,
    segments: &[Segment<S::File>],
    producers_max: usize,
) -> Result<ProducerTable, StorageError> {
    let loaded = load_snapshot(storage, directory, producers_max).await;
    let from_snapshot = match loaded {
        Ok(Some((point, table))) => match scan_start(segments, &point).await {
            Ok(start) => Some((start, table)),
            Err(reason) => {
                tracing::warn!(
                    partition_directory = %directory.display(),
                    reason = %reason,
                    "recovery: ignoring the producer snapshot: {reason}; rebuilding from the last segment"
                );
                None
            }
        },
        Ok(None) => {
            let empty = segments.len() == 1 && segments[0].end_position == 0;
            if !empty {
                // Expected after a crash (snapshots are written at close and every
                // producer_snapshot_interval_bytes): not a warning.
                tracing::info!(
                    partition_directory = %directory.display(),
                    "recovery: no producer snapshot; rebuilding the producer table from the last segment"
                );
            }
            None
        }
        Err(reason) => {
            tracing::warn!(
                partition_directory = %directory.display(),
                reason = %reason,
                "recovery: ignoring the producer snapshot: {reason}; rebuilding from the last segment"
            );
            None
        }
    };
    let ((first, position, offset), mut table) = from_snapshot.unwrap_or_else(|| {
        let last = segments.len() - 1;
        let start = (last, 0, segments[last].base_offset);
        (start, ProducerTable::new(producers_max))
    });
    apply_segment(&segments[first], position, offset, &mut table).await?;
    for segment in &segments[first + 1..] {
        apply_segment(segment, 0, segment.base_offset, &mut table).await?;
    }
    Ok(table)
}
