//! One partition's log on disk.
//!
//! What it is: segment files (`<base offset, 20 digits>.log`, preallocated, opened O_DIRECT
//! through glommio's `DmaFile`, so every write and read is an io_uring operation), the
//! aligned append chunks that batch bytes are copied into, group commit, an in-memory
//! sparse index, and recovery. What it is not: it knows nothing of sockets, requests or
//! shards; the partition's owning shard is the only caller, on that shard's thread.
//!
//! Contract of `PartitionLog`:
//! - `append` resolves once the batch is in memory and has its offsets (acks=memory);
//! - `wait_durable(next_offset)` resolves once an fdatasync covering every byte below
//!   that offset has completed (acks=durable). One fdatasync covers every append that
//!   arrived while the previous one ran (group commit);
//! - `read` and `wait_for_data` never expose bytes past the durable watermark
//!   (invariant 2);
//! - offsets are dense, strictly increasing and never reused, across restarts too
//!   (invariant 3): recovery restores the next offset from the last whole batch.
//!
//! The on-disk format is docs/storage.md.

mod cache;
#[cfg(test)]
pub(crate) mod faults;
mod file;
/// Recovery of one segment in memory, with its invariants checked: the entry point of
/// the `recovery_scan` fuzz target. Not the broker's API.
#[doc(hidden)]
pub mod fuzzing;
mod index;
mod log;
mod memory;
mod producer_snapshot;
pub mod producers;
mod recovery;
mod sync;
mod zero_fill;

pub use cache::TailCache;
pub use file::{run_blocking, DmaStorage, LogFile, LogStorage};
pub use log::{
    now_ms, read_window_bytes_max, AppendOutcome, FailurePolicy, LogConfig, LogMetrics,
    PartitionLog, TimeLookup,
};
pub use sync::{ChunkBudget, Notify};
pub use zero_fill::{ZeroFillBudget, ZeroFillConfig};

use std::path::PathBuf;
use std::sync::Arc;

pub use crate::config::ALIGNMENT_BYTES;

/// Exit status of a process stopped because its log can no longer be trusted.
pub const EXIT_STORAGE_FAILED: i32 = 74;

#[derive(Debug, Clone)]
pub enum StorageError {
    Io {
        operation: &'static str,
        path: PathBuf,
        source: Arc<std::io::Error>,
    },
    /// Stored data is damaged somewhere recovery may not simply cut it off.
    Corrupt {
        path: PathBuf,
        position: u64,
        reason: String,
    },
    BatchTooLarge {
        length: usize,
        length_max: usize,
    },
    OffsetOutOfRange {
        requested: u64,
        log_start_offset: u64,
        high_watermark: u64,
    },
    /// The partition was closed (topic deleted, broker shutting down).
    Closed,
    /// The file system is out of space. Retried; nothing is lost or corrupted.
    NoSpace {
        operation: &'static str,
        path: PathBuf,
        detail: String,
    },
    /// A write or sync failed for a reason other than space: the partition stopped
    /// taking appends and serves only what an earlier fdatasync covered.
    Stopped {
        reason: String,
    },
    /// An idempotent producer's batch out of sequence (docs/protocol.md §8.1): nothing
    /// was appended.
    OutOfOrderSequence(producers::SequenceError),
}

impl StorageError {
    pub(crate) fn io(
        operation: &'static str,
        path: &std::path::Path,
        source: impl Into<std::io::Error>,
    ) -> StorageError {
        let source = source.into();
        if source.raw_os_error() == Some(libc::ENOSPC)
            || source.kind() == std::io::ErrorKind::StorageFull
        {
            return StorageError::NoSpace {
                operation,
                path: path.to_path_buf(),
                detail: source.to_string(),
            };
        }
        StorageError::Io {
            operation,
            path: path.to_path_buf(),
            source: Arc::new(source),
        }
    }
}

impl std::fmt::Display for StorageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StorageError::Io {
                operation,
                path,
                source,
            } => write!(f, "{operation} {}: {source}", path.display()),
            StorageError::Corrupt {
                path,
                position,
                reason,
            } => write!(f, "{} is corrupt at byte {position}: {reason}", path.display()),
            StorageError::BatchTooLarge { length, length_max } => write!(
                f,
                "batch of {length} bytes exceeds the largest batch the log takes, {length_max} bytes"
            ),
            StorageError::OffsetOutOfRange {
                requested,
                log_start_offset,
                high_watermark,
            } => write!(
                f,
                "offset {requested} is outside the readable range [{log_start_offset}, {high_watermark}]"
            ),
            StorageError::Closed => write!(f, "partition is closed"),
            StorageError::NoSpace {
                operation,
                path,
                detail,
            } => write!(f, "no space left {operation} {}: {detail}", path.display()),
            StorageError::Stopped { reason } => {
                write!(f, "partition stopped after a storage failure: {reason}")
            }
            StorageError::OutOfOrderSequence(error) => write!(f, "{error}"),
        }
    }
}

impl std::error::Error for StorageError {}

/// Segment file name for a base offset: 20 digits, so names sort as offsets do.
pub fn segment_file_name(base_offset: u64) -> String {
    format!("{base_offset:020}.log")
}

/// Parses a segment file name back to its base offset.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub(crate) fn align_down(value: u64) -> u64 {
    value & !(ALIGNMENT_BYTES as u64 - 1)
}

pub(crate) fn align_up(value: u64) -> u64 {
    align_down(value + ALIGNMENT_BYTES as u64 - 1)
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn segment_names_roundtrip_and_sort() {
        assert_eq!(segment_file_name(42), "00000000000000000042.log");
        assert_eq!(
            parse_segment_file_name("00000000000000000042.log"),
            Some(42)
        );
        assert_eq!(parse_segment_file_name("42.log"), None);
        assert_eq!(parse_segment_file_name("0000000000000000004x.log"), None);
        assert!(segment_file_name(9) < segment_file_name(10));
    }

    #[test]
    fn alignment_worked_example() {
        // A log of 10,000 bytes: the last whole block ends at 8192, the partial block
        // 8192..12288 holds 1,808 valid bytes and is rewritten by the next flush.
        assert_eq!(align_down(10_000), 8192);
        assert_eq!(align_up(10_000), 12_288);
        assert_eq!(align_up(8192), 8192);
        assert_eq!(align_down(4095), 0);
    }
}

#[cfg(test)]
mod retention_tests;
#[cfg(test)]
mod tests;
