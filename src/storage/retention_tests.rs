//! Retention by age on a stepped clock (`PartitionLog::apply_retention_at`): a segment
//! whose last append is no more than `retention_ms_max` old is kept, one older is
//! deleted, the active segment never goes, and 0 means no limit; with
//! `recycle_segments` off a deleted segment is removed, never kept as `spare.log`.
//! (The spare kept with `recycle_segments` on is tests.rs's
//! `retention_keeps_a_spare_segment_that_the_next_roll_recycles`.)
//!
//! Real files on the default temp dir (ext4 here), each test on its own glommio executor.

use std::path::{Path, PathBuf};
use std::rc::Rc;

use bytes::{Bytes, BytesMut};

use super::tests::run;
use super::*;
use crate::protocol::batch::{check_framing, BatchBuilder};

const SEGMENT_SIZE_BYTES: u64 = 256 * 1024;

fn config(recycle_segments: bool) -> LogConfig {
    LogConfig {
        segment_size_bytes: SEGMENT_SIZE_BYTES,
        preallocate_step_bytes: 64 * 1024,
        chunk_size_bytes: 64 * 1024,
        index_interval_bytes: 4096,
        storage_full_retry: std::time::Duration::from_millis(5),
        failure_policy: FailurePolicy::StopPartition,
        recycle_segments,
        producers_per_partition_max: 1_000,
        producer_snapshot_interval_bytes: 16 << 20,
        zero_fill: ZeroFillConfig::OFF,
        dsync_write_bytes_max: 64 * 1024,
    }
}

async fn open(directory: &Path, recycle_segments: bool) -> Rc<PartitionLog> {
    let config = config(recycle_segments);
    PartitionLog::open(
        Rc::new(DmaStorage),
        directory.to_path_buf(),
        config,
        ChunkBudget::new(1 << 20, config.chunk_size_bytes),
        TailCache::new(0),
        Rc::new(Notify::new()),
        ZeroFillBudget::off(),
    )
    .await
    .unwrap()
}

fn partition_dir() -> (tempfile::TempDir, PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let partition = root.path().join("p");
    std::fs::create_dir(&partition).unwrap();
    (root, partition)
}

/// Ten records of 1000 bytes.
fn batch() -> Bytes {
    let mut builder = BatchBuilder::new(BytesMut::new());
    for _ in 0..10 {
        builder.push(1_000, None, &[b'r'; 1000], &[]);
    }
    builder.finish()
}

/// Appends until the log holds `segments` segments, every append durable; returns the
/// next offset.
async fn fill_to(log: &PartitionLog, segments: usize) -> u64 {
    while log.segment_count() < segments {
        log.append(&batch()).await.unwrap();
    }
    let next = log.next_offset();
    log.wait_durable(next).await.unwrap();
    next
}

/// The segment holding `offset`: its base offset, the offset after its last batch and
/// the broker append time of its last batch (a read stops at the end of its segment).
async fn segment_at(log: &PartitionLog, offset: u64) -> (u64, u64, i64) {
    let bytes = log.read(offset, 1 << 20).await.unwrap();
    let mut rest = &bytes[..];
    let mut base = None;
    let mut last = None;
    while !rest.is_empty() {
        let header = check_framing(rest).expect("stored batches pass framing and CRC");
        base.get_or_insert(header.base_offset);
        rest = &rest[header.batch_length as usize..];
        last = Some(header);
    }
    let last = last.expect("a segment with batches");
    (base.unwrap(), last.next_offset(), last.append_time_ms)
}

/// Waits (bounded) until the broker's clock has passed `time_ms`, so that the next
/// append is stamped later than `time_ms`.
async fn clock_past(time_ms: i64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while now_ms() <= time_ms {
        assert!(
            std::time::Instant::now() < deadline,
            "the clock stood still"
        );
        glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
    }
}

#[test]
fn age_retention_keeps_young_segments_deletes_old_ones_and_never_the_active_one() {
    const MS_MAX: u64 = 60_000;
    let (root, directory) = partition_dir();
    run(root.path(), move || async move {
        let log = open(&directory, true).await;
        // Segment A sealed, then B sealed with every batch appended after A's last, then
        // C active.
        fill_to(&log, 2).await;
        let (a_base, a_end, a_last_ms) = segment_at(&log, 0).await;
        assert_eq!(a_base, 0);
        clock_past(a_last_ms).await;
        fill_to(&log, 3).await;
        let (b_base, b_end, b_last_ms) = segment_at(&log, a_end).await;
        assert_eq!(b_base, a_end);
        assert!(b_last_ms > a_last_ms, "B's last append is later than A's");
        let limit = MS_MAX as i64;

        // 0 = no limit, however late it is.
        assert_eq!(log.apply_retention_at(0, 0, i64::MAX).await.unwrap(), 0);
        // A is exactly as old as the limit: not more than it, so kept.
        assert_eq!(
            log.apply_retention_at(0, MS_MAX, a_last_ms + limit)
                .await
                .unwrap(),
            0
        );
        assert_eq!((log.segment_count(), log.log_start_offset()), (3, 0));
        // One millisecond more: A goes, B (younger than the limit) stays.
        assert_eq!(
            log.apply_retention_at(0, MS_MAX, a_last_ms + limit + 1)
                .await
                .unwrap(),
            1
        );
        assert_eq!((log.segment_count(), log.log_start_offset()), (2, b_base));
        assert!(!directory.join(segment_file_name(a_base)).exists());
        assert!(directory.join(segment_file_name(b_base)).exists());
        assert_eq!(
            log.apply_retention_at(0, MS_MAX, b_last_ms + limit)
                .await
                .unwrap(),
            0
        );
        // Far in the future every sealed segment is old; the active one still stays.
        assert_eq!(
            log.apply_retention_at(0, MS_MAX, b_last_ms + 100 * limit)
                .await
                .unwrap(),
            1
        );
        assert_eq!((log.segment_count(), log.log_start_offset()), (1, b_end));
        assert_eq!(
            log.apply_retention_at(0, 1, i64::MAX).await.unwrap(),
            0,
            "the active segment is never deleted"
        );
        let (c_base, _, _) = segment_at(&log, b_end).await;
        assert_eq!(c_base, b_end, "the active segment still reads");
        log.close().await;
    });
}

#[test]
fn without_recycling_deleted_segments_are_removed_not_kept_as_the_spare() {
    let (root, directory) = partition_dir();
    run(root.path(), move || async move {
        let log = open(&directory, false).await;
        fill_to(&log, 3).await;
        let removed = log.apply_retention_at(0, 1, i64::MAX).await.unwrap();
        assert_eq!(removed, 2);
        assert_eq!(log.segment_count(), 1);
        assert!(
            !directory.join("spare.log").exists(),
            "recycle_segments = false keeps no spare"
        );
        let segment_files: Vec<String> = std::fs::read_dir(&directory)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.ends_with(".log"))
            .collect();
        assert_eq!(
            segment_files,
            vec![segment_file_name(log.log_start_offset())],
            "only the active segment's file is left"
        );
        // The next roll makes a fresh file, and the log reads on.
        let before = log.next_offset();
        fill_to(&log, 2).await;
        assert!(log.next_offset() > before);
        assert!(!directory.join("spare.log").exists());
        log.close().await;
    });
}
