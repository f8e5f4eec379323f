//! `shardq bench queue`: producers fill a topic, then `workers` queue consumers receive
//! and ack everything in it, for a group of this run's own (`bench-<run id>`).
//!
//! Why fill first: the workers then always find a backlog, so acked/s is the queue
//! path's own throughput (not the producers' rate) and receive-to-ack latency is a
//! receive and an ack, not a long-poll waiting for the producer. `--receive-batch 1
//! --ack-batch 1 --workers 1` measures the single-message round trip.
//!
//! Each worker loops: receive up to `receive_batch` messages (the topic's lease); verify
//! each payload (header CRC and body, as the stream workloads do); a message chosen by
//! `fail_rate` (a hash of its run, producer, partition and sequence, so every delivery of
//! it fails) is nacked with the topic's backoff, until its last allowed delivery
//! dead-letters it; every other message is acked, in acks of `ack_batch` handles (fewer
//! when a receive came back short, so the tail is not held back). Latency of a message:
//! from sending the receive that delivered it to its ack's answer.
//!
//! Verification: per (producer, partition), the sequences acked and the sequences
//! dead-lettered must be disjoint and together exactly what the producer sent; the
//! broker's own counters (`describe_groups`) must agree. Messages of other runs (a
//! reused topic) are acked and not counted. A topic the bench creates gets retry delays
//! of 10..100 ms and 3 deliveries, so failures reach the DLQ in well under a second.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::payload::{self, PayloadHeader};
use super::report::{latency_histogram, Percentiles, QueueTotals, Report, SideTotals};
use super::{
    acks_name, client_error, cpu_percent, cpu_seconds, join_producers, now_ns, process_cpu_ticks,
    run_sampler, start_producers, BenchConfig, BenchError, Layout, Outcome, Placement, Shared,
    DRAIN_TIMEOUT,
};
use crate::client::{Client, Handle, NackDelay, QueueConsumer, QueueSettings};

/// How long one worker receive waits when nothing is available: short, so a worker
/// notices promptly that everything is settled.
const RECEIVE_WAIT: Duration = Duration::from_millis(100);
/// Handles per settle request (the broker's default limit).
const SETTLE_HANDLES_MAX: u32 = 1000;

/// Queue settings of a topic the bench creates: failures move fast.
pub(super) fn topic_settings() -> QueueSettings {
    QueueSettings {
        deliveries_max: Some(3),
        retry_delay_ms_min: Some(10),
        retry_delay_ms_max: Some(100),
        ..QueueSettings::default()
    }
}

/// Whether every delivery of this message fails: a SplitMix64 hash of its identity,
/// below `fail_rate` of the hash range.
pub(super) fn fails(header: &PayloadHeader, fail_rate: f64) -> bool {
    if fail_rate <= 0.0 {
        return false;
    }
    let mut z = u64::from(header.run_id)
        ^ (u64::from(header.producer) << 32)
        ^ u64::from(header.partition).rotate_left(48)
        ^ header.sequence.rotate_left(17);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    ((z >> 11) as f64 / (1u64 << 53) as f64) < fail_rate
}

/// Sequences seen per (producer, partition), one bit each.
#[derive(Debug, Default)]
pub(super) struct SequenceSet {
    bits: HashMap<(u32, u32), Vec<u64>>,
}

impl SequenceSet {
    /// Adds one; false when it was already there.
    pub(super) fn insert(&mut self, producer: u32, partition: u32, sequence: u64) -> bool {
        let words = self.bits.entry((producer, partition)).or_default();
        let word = (sequence / 64) as usize;
        if words.len() <= word {
            words.resize(word + 1, 0);
        }
        let bit = 1u64 << (sequence % 64);
        let fresh = words[word] & bit == 0;
        words[word] |= bit;
        fresh
    }

    pub(super) fn count(&self, producer: u32, partition: u32) -> u64 {
        self.bits.get(&(producer, partition)).map_or(0, |words| {
            words.iter().map(|word| u64::from(word.count_ones())).sum()
        })
    }

    /// Adds `other`; returns how many of its entries were already here.
    pub(super) fn merge(&mut self, other: &SequenceSet) -> u64 {
        let mut overlap = 0;
        for (key, theirs) in &other.bits {
            let ours = self.bits.entry(*key).or_default();
            if ours.len() < theirs.len() {
                ours.resize(theirs.len(), 0);
            }
            for (mine, their) in ours.iter_mut().zip(theirs) {
                overlap += u64::from((*mine & their).count_ones());
                *mine |= their;
            }
        }
        overlap
    }

    /// How many entries both sets hold.
    pub(super) fn overlap(&self, other: &SequenceSet) -> u64 {
        let mut overlap = 0;
        for (key, theirs) in &other.bits {
            if let Some(ours) = self.bits.get(key) {
                for (mine, their) in ours.iter().zip(theirs) {
                    overlap += u64::from((mine & their).count_ones());
                }
            }
        }
        overlap
    }

    /// The first sequence below `below` that is missing, if any.
    pub(super) fn first_missing(&self, producer: u32, partition: u32, below: u64) -> Option<u64> {
        let words = self.bits.get(&(producer, partition));
        (0..below).find(|sequence| {
            words
                .and_then(|words| words.get((sequence / 64) as usize))
                .is_none_or(|word| word & (1 << (sequence % 64)) == 0)
        })
    }
}

struct WorkerResult {
    latency: Histogram<u64>,
    acked: SequenceSet,
    dead_lettered: SequenceSet,
    nacked: u64,
    redelivered: u64,
    refused: u64,
    foreign: u64,
    last_ns: u64,
}

/// What the workers share: how many of this run's messages are settled.
struct Progress {
    settled: AtomicU64,
    total: u64,
}

struct Worker {
    consumer: QueueConsumer,
    config: BenchConfig,
    shared: Arc<Shared>,
    progress: Arc<Progress>,
    deliveries_max: u32,
}

/// An ack waiting to be sent: the handle, when its receive was sent, and the message.
struct PendingAck {
    handle: Handle,
    received_from_ns: u64,
    header: Option<PayloadHeader>,
}

pub(super) async fn run(
    config: &BenchConfig,
    bootstrap: &Client,
    layout: Layout,
    shared: Arc<Shared>,
    next_cpu: Arc<AtomicUsize>,
    placement: Placement,
) -> Result<Outcome, BenchError> {
    let metadata = bootstrap
        .metadata(&[config.topic.as_str()])
        .await
        .map_err(client_error("reading the topic's queue settings"))?;
    let deliveries_max = metadata
        .topics
        .iter()
        .find(|topic| topic.name == config.topic)
        .and_then(|topic| topic.queue.deliveries_max)
        .ok_or_else(|| {
            BenchError::Config(format!(
                "metadata of topic {:?} has no deliveries_max",
                config.topic
            ))
        })?;
    let server_cpu_before = config.server_pid.and_then(process_cpu_ticks);
    let (stop_sampler, sampler_stopped) = tokio::sync::oneshot::channel();
    let sampler = tokio::spawn(run_sampler(
        shared.clone(),
        config.progress,
        sampler_stopped,
    ));

    // Fill.
    let threads = start_producers(config, &layout, &shared, &next_cpu)?;
    let (produced, first_error) = join_producers(threads, &shared).await;
    shared
        .producers_done
        .store(true, std::sync::atomic::Ordering::Release);
    if let Some(error) = first_error {
        let _ = stop_sampler.send(());
        return Err(error);
    }
    let expected: Vec<Vec<u64>> = shared
        .expected
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    let total: u64 = expected.iter().flatten().sum();

    // Drain.
    let group = format!("bench-{:08x}", shared.run_id);
    let progress = Arc::new(Progress {
        settled: AtomicU64::new(0),
        total,
    });
    let drain_start_ns = now_ns();
    let mut tasks = Vec::new();
    for _ in 0..config.queue.workers {
        let client = Client::connect(layout.bootstrap)
            .await
            .map_err(client_error("queue worker connecting"))?;
        let consumer = QueueConsumer::builder(client, &config.topic, &group)
            .settle_handles_per_request_max(SETTLE_HANDLES_MAX)
            .build()
            .map_err(client_error("queue worker settings"))?;
        let worker = Worker {
            consumer,
            config: config.clone(),
            shared: shared.clone(),
            progress: progress.clone(),
            deliveries_max,
        };
        tasks.push(tokio::spawn(async move {
            let result = run_worker(&worker).await;
            if result.is_err() {
                worker.shared.failed.store(true, Ordering::Relaxed);
            }
            result
        }));
    }
    let mut acked = SequenceSet::default();
    let mut dead_lettered = SequenceSet::default();
    let mut latency = latency_histogram();
    let mut totals = QueueTotals::default();
    let mut last_ns = drain_start_ns;
    let mut first_error = None;
    let mut duplicates = 0;
    for task in tasks {
        match task.await.expect("queue worker does not panic") {
            Ok(result) => {
                latency
                    .add(&result.latency)
                    .expect("histograms share bounds");
                duplicates += acked.merge(&result.acked);
                duplicates += dead_lettered.merge(&result.dead_lettered);
                totals.nacked += result.nacked;
                totals.redelivered += result.redelivered;
                totals.refused += result.refused;
                last_ns = last_ns.max(result.last_ns);
                if result.foreign > 0 {
                    eprintln!(
                        "note: {} message(s) of other runs in topic {:?} were acked and not counted",
                        result.foreign, config.topic
                    );
                }
            }
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    let end_ns = now_ns();
    let server_cpu_after = config.server_pid.and_then(process_cpu_ticks);
    let _ = stop_sampler.send(());
    let timeline = sampler.await.unwrap_or_default();
    if config.progress {
        eprintln!();
    }
    if let Some(error) = first_error {
        return Err(error);
    }
    verify(
        &expected,
        &acked,
        &dead_lettered,
        duplicates,
        bootstrap,
        config,
        &group,
        &mut totals,
    )
    .await?;

    let acked_count: u64 = totals.acked;
    let drain_s = (last_ns.saturating_sub(drain_start_ns)) as f64 / 1e9;
    let produce_window_s = if produced.last_ack_ns > shared.measure_start_ns {
        (produced.last_ack_ns - shared.measure_start_ns) as f64 / 1e9
    } else {
        0.0
    };
    totals.workers = config.queue.workers;
    totals.receive_batch = config.queue.receive_batch;
    totals.ack_batch = config.queue.ack_batch;
    totals.fail_rate = config.queue.fail_rate;
    totals.receive_ack_latency = Percentiles::of(&latency);
    let report = Report {
        workload: config.workload.name().into(),
        message_size: config.message_size,
        batch_size: config.batch_size,
        acks: acks_name(config.acks).into(),
        producers: config.producers,
        consumers: config.queue.workers,
        partitions: layout.partitions,
        shard_aware: config.shard_aware,
        rate_per_s: config.rate_per_s.unwrap_or(0),
        warmup_s: config.warmup.as_secs_f64(),
        duration_s: produce_window_s + drain_s,
        produced: SideTotals {
            messages: produced.measured_messages,
            bytes: produced.measured_messages * config.message_size as u64,
            duration_s: produce_window_s,
        },
        consumed: SideTotals {
            messages: acked_count,
            bytes: acked_count * config.message_size as u64,
            duration_s: drain_s,
        },
        produce_latency: Percentiles::of(&produced.latency),
        e2e_latency: Percentiles::default(),
        verified: acked_count + totals.dead_lettered,
        unsent_due: produced.unsent_due,
        client_cpus: placement.client_cpus,
        server_cpus: placement.server_cpus,
        server_cpu_percent: cpu_percent(
            server_cpu_before,
            server_cpu_after,
            (end_ns.saturating_sub(shared.start_ns)) as f64 / 1e9,
        ),
        server_cpu_s: cpu_seconds(server_cpu_before, server_cpu_after),
        idle_connections: 0,
        timeline,
        queue: totals,
    };
    Ok(Outcome {
        report,
        produce_latency: produced.latency,
        e2e_latency: latency,
    })
}

/// Every message sent is acked or dead-lettered, never both, and the broker's counters
/// of the group say the same; fills in `totals.acked` and `totals.dead_lettered`.
#[allow(clippy::too_many_arguments)]
async fn verify(
    expected: &[Vec<u64>],
    acked: &SequenceSet,
    dead_lettered: &SequenceSet,
    duplicates: u64,
    bootstrap: &Client,
    config: &BenchConfig,
    group: &str,
    totals: &mut QueueTotals,
) -> Result<(), BenchError> {
    if duplicates > 0 {
        return Err(BenchError::Verification(format!(
            "{duplicates} message(s) were settled twice (acked or dead-lettered by two workers)"
        )));
    }
    let both = acked.overlap(dead_lettered);
    if both > 0 {
        return Err(BenchError::Verification(format!(
            "{both} message(s) were both acked and dead-lettered"
        )));
    }
    let mut acked_total = 0;
    let mut dead_total = 0;
    for (producer, per_partition) in expected.iter().enumerate() {
        for (partition, sent) in per_partition.iter().enumerate() {
            let (producer, partition) = (producer as u32, partition as u32);
            let done = acked.count(producer, partition) + dead_lettered.count(producer, partition);
            if done != *sent {
                let mut settled = SequenceSet::default();
                settled.merge(acked);
                settled.merge(dead_lettered);
                let missing = settled.first_missing(producer, partition, *sent);
                return Err(BenchError::Verification(format!(
                    "partition {partition}: producer {producer} sent {sent} messages, {done} were settled (first missing sequence {missing:?})"
                )));
            }
            acked_total += acked.count(producer, partition);
            dead_total += dead_lettered.count(producer, partition);
        }
    }
    totals.acked = acked_total;
    totals.dead_lettered = dead_total;
    // The broker's counters. Dead-lettering finishes after the last nack is answered
    // (the DLQ append follows it), so its count may trail for a moment.
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        let groups = bootstrap
            .describe_groups(&config.topic, Some(group))
            .await
            .map_err(client_error("describing the bench's queue group"))?;
        let partitions = groups.iter().flat_map(|group| group.partitions.iter());
        let (broker_acked, broker_dead) = partitions.fold((0, 0), |(acked, dead), partition| {
            (acked + partition.acked, dead + partition.dead_lettered)
        });
        // Acks of other runs' messages are counted by the broker too.
        if broker_acked >= acked_total && broker_dead == dead_total {
            return Ok(());
        }
        if broker_dead > dead_total || Instant::now() >= deadline {
            return Err(BenchError::Verification(format!(
                "the broker counts {broker_acked} acked and {broker_dead} dead-lettered in group {group}; the workers saw {acked_total} and {dead_total}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn run_worker(worker: &Worker) -> Result<WorkerResult, BenchError> {
    let config = &worker.config;
    let queue = &config.queue;
    let shared = &worker.shared;
    let progress = &worker.progress;
    let mut result = WorkerResult {
        latency: latency_histogram(),
        acked: SequenceSet::default(),
        dead_lettered: SequenceSet::default(),
        nacked: 0,
        redelivered: 0,
        refused: 0,
        foreign: 0,
        last_ns: 0,
    };
    let mut fillers: HashMap<u32, Vec<u8>> = HashMap::new();
    let mut pending: Vec<PendingAck> = Vec::with_capacity(queue.ack_batch as usize);
    let mut last_settled = progress.settled.load(Ordering::Relaxed);
    let mut last_progress = Instant::now();
    loop {
        if shared.failed.load(Ordering::Relaxed) {
            break;
        }
        let settled = progress.settled.load(Ordering::Relaxed);
        if settled >= progress.total {
            break;
        }
        if settled != last_settled {
            last_settled = settled;
            last_progress = Instant::now();
        } else if last_progress.elapsed() > DRAIN_TIMEOUT {
            return Err(BenchError::Verification(format!(
                "{settled} of {} messages settled, none for {} s: messages lost",
                progress.total,
                DRAIN_TIMEOUT.as_secs()
            )));
        }
        let receive_sent_ns = now_ns();
        let messages = worker
            .consumer
            .receive(queue.receive_batch, None, RECEIVE_WAIT)
            .await
            .map_err(client_error("receiving"))?;
        let short = (messages.len() as u32) < queue.receive_batch;
        let mut failed: Vec<(Handle, Option<PayloadHeader>)> = Vec::new();
        for message in &messages {
            if message.attempt() > 1 {
                result.redelivered += 1;
            }
            let value = message.value();
            let header = match payload::verify(value) {
                Ok(header) if header.run_id == shared.run_id => header,
                _ => {
                    // Not a message of this run: settle it, count it apart.
                    result.foreign += 1;
                    pending.push(PendingAck {
                        handle: message.handle(),
                        received_from_ns: receive_sent_ns,
                        header: None,
                    });
                    continue;
                }
            };
            if header.partition != message.partition() {
                return Err(BenchError::Verification(format!(
                    "partition {} offset {}: message was sent to partition {}",
                    message.partition(),
                    message.offset(),
                    header.partition
                )));
            }
            let filler = fillers
                .entry(header.producer)
                .or_insert_with(|| payload::filler(value.len(), u64::from(header.producer) + 1));
            if filler.len() < value.len() {
                *filler = payload::filler(value.len(), u64::from(header.producer) + 1);
            }
            payload::verify_body(value, filler).map_err(|error| {
                BenchError::Verification(format!(
                    "partition {} offset {}: {error}",
                    message.partition(),
                    message.offset()
                ))
            })?;
            if fails(&header, queue.fail_rate) {
                failed.push((message.handle(), Some(header)));
            } else {
                pending.push(PendingAck {
                    handle: message.handle(),
                    received_from_ns: receive_sent_ns,
                    header: Some(header),
                });
            }
        }
        if !failed.is_empty() {
            let handles: Vec<Handle> = failed.iter().map(|(handle, _)| *handle).collect();
            let outcome = worker
                .consumer
                .nack(&handles, NackDelay::Backoff, "bench: --fail-rate")
                .await
                .map_err(client_error("nacking"))?;
            result.nacked += outcome.accepted() as u64;
            result.refused += outcome.refused.len() as u64;
            let mut dead = 0;
            for (handle, header) in &failed {
                let refused = outcome.refused.iter().any(|r| r.handle == *handle);
                if refused || handle.attempt < worker.deliveries_max {
                    continue;
                }
                let header = header.expect("only this run's messages fail");
                if !result
                    .dead_lettered
                    .insert(header.producer, header.partition, header.sequence)
                {
                    return Err(BenchError::Verification(format!(
                        "producer {} partition {} sequence {} was dead-lettered twice",
                        header.producer, header.partition, header.sequence
                    )));
                }
                dead += 1;
            }
            if dead > 0 {
                progress.settled.fetch_add(dead, Ordering::Relaxed);
            }
        }
        while pending.len() >= queue.ack_batch as usize
            || (!pending.is_empty() && (short || messages.is_empty()))
        {
            let take = pending.len().min(queue.ack_batch as usize);
            let batch: Vec<PendingAck> = pending.drain(..take).collect();
            ack_batch(worker, &batch, &mut result).await?;
        }
    }
    Ok(result)
}

async fn ack_batch(
    worker: &Worker,
    batch: &[PendingAck],
    result: &mut WorkerResult,
) -> Result<(), BenchError> {
    let handles: Vec<Handle> = batch.iter().map(|pending| pending.handle).collect();
    let outcome = worker
        .consumer
        .ack(&handles)
        .await
        .map_err(client_error("acking"))?;
    let answered_ns = now_ns();
    result.refused += outcome.refused.len() as u64;
    let mut settled = 0;
    for pending in batch {
        let Some(header) = pending.header else {
            continue;
        };
        if outcome
            .refused
            .iter()
            .any(|refusal| refusal.handle == pending.handle)
        {
            // Refused (its lease ran out, say): it comes back and is acked then.
            continue;
        }
        if !result
            .acked
            .insert(header.producer, header.partition, header.sequence)
        {
            return Err(BenchError::Verification(format!(
                "producer {} partition {} sequence {} was acked twice",
                header.producer, header.partition, header.sequence
            )));
        }
        settled += 1;
        if header.sent_ns >= worker.shared.measure_start_ns {
            result
                .latency
                .saturating_record(answered_ns.saturating_sub(pending.received_from_ns).max(1));
        }
    }
    worker.shared.consumed.fetch_add(settled, Ordering::Relaxed);
    worker
        .progress
        .settled
        .fetch_add(settled, Ordering::Relaxed);
    result.last_ns = answered_ns;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(sequence: u64) -> PayloadHeader {
        PayloadHeader {
            run_id: 7,
            producer: 1,
            partition: 2,
            sequence,
            sent_ns: 0,
        }
    }

    #[test]
    fn failures_are_a_stable_share_of_messages() {
        let count = |rate: f64| (0..10_000).filter(|s| fails(&header(*s), rate)).count();
        assert_eq!(count(0.0), 0);
        assert_eq!(count(1.0), 10_000);
        let tenth = count(0.1);
        assert!((800..1200).contains(&tenth), "{tenth}");
        // The same message fails every time it is asked.
        assert_eq!(count(0.1), tenth);
    }

    #[test]
    fn sequence_sets_count_merge_and_find_gaps() {
        let mut first = SequenceSet::default();
        assert!(first.insert(0, 1, 0));
        assert!(first.insert(0, 1, 65));
        assert!(!first.insert(0, 1, 65));
        assert_eq!(first.count(0, 1), 2);
        assert_eq!(first.first_missing(0, 1, 66), Some(1));
        let mut second = SequenceSet::default();
        for sequence in 1..65 {
            second.insert(0, 1, sequence);
        }
        second.insert(0, 1, 0);
        assert_eq!(first.overlap(&second), 1);
        assert_eq!(first.merge(&second), 1);
        assert_eq!(first.count(0, 1), 66);
        assert_eq!(first.first_missing(0, 1, 66), None);
        assert_eq!(first.first_missing(0, 1, 67), Some(66));
        assert_eq!(first.first_missing(3, 3, 1), Some(0));
    }
}
