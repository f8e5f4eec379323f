//! Partition log hot paths on the real disk (O_DIRECT through io_uring). Run with
//! `scripts/bench-storage.sh`, which measures the raw-disk baselines (fio) in the same
//! run and prints the ratios; or alone: cargo bench --bench storage
//!
//! - durable_append: 1 KiB messages in 1000-message batches, appended back to back and
//!   made durable (group commit), for one partition and for one shard with 8 partitions;
//! - durable_4k_append: one 4 KiB batch appended and made durable per iteration (the
//!   fsync-per-batch latency), on a fresh preallocated segment vs a recycled one whose
//!   blocks were written before: what segment recycling buys;
//! - tail_read / cold_read: 1 MiB read at the tail from the tail cache vs from disk.

use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use glommio::LocalExecutorBuilder;
use shardq::protocol::batch::BatchBuilder;
use shardq::storage::{
    ChunkBudget, DmaStorage, FailurePolicy, LogConfig, Notify, PartitionLog, TailCache,
    ZeroFillBudget, ZeroFillConfig,
};

const SEGMENT_BYTES: u64 = 64 << 20;
const CHUNK_BYTES: usize = 4 << 20;
const PREALLOCATE_STEP_BYTES: u64 = 4 << 20;

fn config() -> LogConfig {
    config_with_step(PREALLOCATE_STEP_BYTES)
}

fn config_with_step(preallocate_step_bytes: u64) -> LogConfig {
    LogConfig {
        segment_size_bytes: SEGMENT_BYTES,
        preallocate_step_bytes,
        chunk_size_bytes: CHUNK_BYTES,
        index_interval_bytes: 4096,
        storage_full_retry: Duration::from_secs(1),
        failure_policy: FailurePolicy::StopPartition,
        recycle_segments: true,
        producers_per_partition_max: 10_000,
        producer_snapshot_interval_bytes: 16 << 20,
        zero_fill: ZeroFillConfig::OFF,
        dsync_write_bytes_max: 64 * 1024,
    }
}

fn batch(count: usize, size: usize) -> Bytes {
    let mut builder = BatchBuilder::new(BytesMut::with_capacity(count * (size + 32) + 64));
    let value = vec![0x5a; size];
    for _ in 0..count {
        builder.push(1_700_000_000_000, None, &value, &[]);
    }
    builder.finish()
}

/// Runs `body` on a fresh glommio executor (after the O_DIRECT probe DESIGN.md asks
/// for) and returns the time it reports.
fn on_executor<F, Fut>(directory: &Path, body: F) -> Duration
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Duration> + 'static,
{
    let probe = directory.join("probe");
    std::fs::write(&probe, vec![0u8; 4096]).unwrap();
    LocalExecutorBuilder::default()
        .io_memory(64 << 20)
        .spawn(move || async move {
            glommio::io::DmaFile::open(&probe)
                .await
                .unwrap()
                .close()
                .await
                .unwrap();
            body().await
        })
        .unwrap()
        .join()
        .unwrap()
}

async fn open(directory: &Path, cache: &Rc<TailCache>) -> Rc<PartitionLog> {
    open_with(directory, cache, config()).await
}

async fn open_with(directory: &Path, cache: &Rc<TailCache>, config: LogConfig) -> Rc<PartitionLog> {
    PartitionLog::open(
        Rc::new(DmaStorage),
        directory.to_path_buf(),
        config,
        ChunkBudget::new(64 << 20, CHUNK_BYTES),
        Rc::clone(cache),
        Rc::new(Notify::new()),
        ZeroFillBudget::off(),
    )
    .await
    .unwrap()
}

fn durable_append(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("durable_append_1000x1KiB");
    let one = batch(1000, 1024);
    for partitions in [1usize, 8] {
        let batches_per_iteration = 16 / partitions.min(16);
        let bytes = (one.len() * batches_per_iteration * partitions) as u64;
        group.throughput(Throughput::Bytes(bytes));
        group.sample_size(10);
        group.bench_function(format!("{partitions}_partitions"), |bencher| {
            bencher.iter_custom(|iterations| {
                let root = tempfile::tempdir_in(".").unwrap();
                let directory = root.path().to_path_buf();
                let one = one.clone();
                on_executor(root.path(), move || async move {
                    let cache = TailCache::new(0);
                    let mut logs = Vec::new();
                    for partition in 0..partitions {
                        logs.push(open(&directory.join(partition.to_string()), &cache).await);
                    }
                    let start = Instant::now();
                    for _ in 0..iterations {
                        let mut last = Vec::with_capacity(partitions);
                        for _ in 0..batches_per_iteration {
                            for log in &logs {
                                last.push((
                                    Rc::clone(log),
                                    log.append(&one).await.unwrap().next_offset,
                                ));
                            }
                        }
                        for (log, next) in last {
                            log.wait_durable(next).await.unwrap();
                        }
                    }
                    let elapsed = start.elapsed();
                    for log in logs {
                        log.close().await;
                    }
                    elapsed
                })
            })
        });
    }
    group.finish();
}

/// Fresh segments reserved a step (4 MiB) at a time ahead of the writes, against the
/// whole segment reserved when it is created: what reserving in steps costs a durable
/// firehose (1000 x 1 KiB batches, 48 MiB a sample, so a step is taken every ~4 batches)
/// and a producer of single durable 4 KiB batches.
fn preallocation(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("preallocation");
    group.sample_size(10);
    let firehose = batch(1000, 1024);
    let small = batch(1, 4000);
    for (name, step) in [
        ("steps", PREALLOCATE_STEP_BYTES),
        ("whole_segment", SEGMENT_BYTES),
    ] {
        for (workload, one, per_iteration) in [
            ("firehose", firehose.clone(), 48usize),
            ("durable_4KiB", small.clone(), 1usize),
        ] {
            if workload == "firehose" {
                group.throughput(Throughput::Bytes((one.len() * per_iteration) as u64));
            } else {
                group.throughput(Throughput::Elements(1));
            }
            group.bench_function(format!("{workload}/{name}"), |bencher| {
                bencher.iter_custom(|iterations| {
                    let root = tempfile::tempdir_in(".").unwrap();
                    let directory = root.path().join("p");
                    let one = one.clone();
                    on_executor(root.path(), move || async move {
                        let cache = TailCache::new(0);
                        let log = open_with(&directory, &cache, config_with_step(step)).await;
                        let start = Instant::now();
                        for _ in 0..iterations {
                            let mut next = 0;
                            for _ in 0..per_iteration {
                                next = log.append(&one).await.unwrap().next_offset;
                            }
                            log.wait_durable(next).await.unwrap();
                        }
                        let elapsed = start.elapsed();
                        log.close().await;
                        elapsed
                    })
                })
            });
        }
    }
    group.finish();
}

/// A spare segment as retention leaves it: every block written, and (as after O_DIRECT
/// writes) nothing of it in the page cache, which would make each direct write
/// invalidate cached pages first.
fn write_spare(path: &Path) {
    use std::os::fd::AsRawFd;
    std::fs::write(path, vec![0xa5u8; SEGMENT_BYTES as usize]).unwrap();
    let file = std::fs::File::open(path).unwrap();
    file.sync_all().unwrap();
    // SAFETY: the descriptor is open for the duration of the call; the advice only
    // drops clean cached pages of this file.
    let result = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(result, 0, "posix_fadvise failed");
}

fn durable_4k_append(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("durable_4KiB_batch");
    group.sample_size(20);
    let one = batch(1, 4000);
    for recycled in [false, true] {
        let name = if recycled {
            "recycled_segment"
        } else {
            "fresh_segment"
        };
        group.bench_function(name, |bencher| {
            bencher.iter_custom(|iterations| {
                let root = tempfile::tempdir_in(".").unwrap();
                let directory = root.path().join("p");
                std::fs::create_dir_all(&directory).unwrap();
                if recycled {
                    // What retention leaves behind: a spare whose blocks were written.
                    write_spare(&directory.join("spare.log"));
                }
                let one = one.clone();
                on_executor(root.path(), move || async move {
                    let cache = TailCache::new(0);
                    let log = open(&directory, &cache).await;
                    let start = Instant::now();
                    for _ in 0..iterations {
                        let next = log.append(&one).await.unwrap().next_offset;
                        log.wait_durable(next).await.unwrap();
                    }
                    let elapsed = start.elapsed();
                    log.close().await;
                    elapsed
                })
            })
        });
    }
    group.finish();
}

fn reads(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("read_1MiB");
    group.throughput(Throughput::Bytes(1 << 20));
    let one = batch(1000, 1024);
    for cached in [true, false] {
        let name = if cached { "tail_cache" } else { "cold_disk" };
        group.bench_function(name, |bencher| {
            bencher.iter_custom(|iterations| {
                let root = tempfile::tempdir_in(".").unwrap();
                let directory = root.path().join("p");
                let one = one.clone();
                on_executor(root.path(), move || async move {
                    let cache = TailCache::new(if cached { 256 << 20 } else { 0 });
                    let log = open(&directory, &cache).await;
                    let mut next = 0;
                    for _ in 0..64 {
                        next = log.append(&one).await.unwrap().next_offset;
                    }
                    log.wait_durable(next).await.unwrap();
                    let start = Instant::now();
                    let mut offset = 0;
                    for _ in 0..iterations {
                        let bytes = log.read(offset, 1 << 20).await.unwrap();
                        assert!(!bytes.is_empty());
                        offset = (offset + 1000) % next;
                    }
                    let elapsed = start.elapsed();
                    log.close().await;
                    elapsed
                })
            })
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    durable_append,
    durable_4k_append,
    preallocation,
    reads
);
criterion_main!(benches);
