//! The load generator behind `shardq bench`: producers and consumers over the tokio
//! [`crate::client`], latency in HdrHistograms, every consumed message verified.
//!
//! What it is: a client-side tool (feature `bench`, which pulls `client` and never the
//! server). What it is not: a broker test; it measures, and fails loudly (an `Err`, so a
//! non-zero exit) only when the broker loses, reorders, duplicates or corrupts messages.
//!
//! Where things run:
//! - each producer is its own OS thread (optionally pinned with `--client-cpus`) with its
//!   own current-thread tokio runtime, on which its connections, its client's sender and
//!   connection tasks and its ack collector run too: a message goes from the send loop to
//!   the socket, and its answer from the socket to the collector, without waking another
//!   thread. In fixed-rate mode it waits for each send time on a timerfd (nanosecond
//!   resolution; tokio's own timer has millisecond resolution), so the answers that arrive
//!   meanwhile are read at once. A multi-thread runtime with the send loop on a thread of
//!   its own cost about 100 us more per round trip on 2 vCPUs (docs/benchmarks.md,
//!   issue 10): each message woke three threads;
//! - consumers and the progress sampler run on a multi-thread tokio runtime whose workers
//!   are pinned the same way.
//!
//! Measurement:
//! - produce latency: from the send time (in fixed-rate mode the *intended* send time, so
//!   a stall delays every message due during it, see [`rate`]) to when its ack resolves;
//! - end-to-end latency: from the send time written in the payload to when a consumer
//!   decodes it; the clock is the host's realtime clock, read by both sides;
//! - messages sent before the warm-up ends are verified but not measured;
//! - per-second throughput samples feed the progress line and the plot.
//!
//! Verification: every payload carries (run, producer, partition, sequence) and a
//! CRC32C ([`payload`]). Per (producer, partition) the sequence must arrive dense from 0
//! in the partition it was sent to; at the end the last sequence seen must equal what the
//! producer sent there. Anything else is an error naming the partition and offset.
//!
//! [`rate`]: crate::bench::rate
//! [`payload`]: crate::bench::payload

pub mod payload;
pub mod plot;
mod queue;
pub mod rate;
pub mod report;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use hdrhistogram::Histogram;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use crate::client::{
    Acks, Client, ClientError, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord,
    SendHandle, SentHandle, StartPosition,
};
use crate::placement;
use crate::protocol::batch::{BATCH_HEADER_SIZE, RECORD_OVERHEAD};
use payload::{PayloadHeader, PAYLOAD_HEADER_SIZE};
use report::{latency_histogram, Percentiles, Report, SideTotals, Timeline};

/// The broker's default largest batch: `chunk_size_bytes` (1 MiB) minus 4 KiB.
pub const BROKER_BATCH_BYTES_MAX_DEFAULT: usize = (1 << 20) - 4096;
/// How long consumers wait for the last messages once every producer is done before
/// declaring them lost.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);
/// Send handles queued between a producer and its ack collector.
const ACK_QUEUE_MAX: usize = 1 << 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Producers only.
    Produce,
    /// Consumers only, reading what the topic holds from the beginning.
    Consume,
    /// Producers and consumers at once.
    EndToEnd,
    /// Idle connections held open while the server's CPU use is measured.
    Idle,
    /// Producers fill a topic, then queue workers receive and ack (`queue`).
    Queue,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Produce => "produce",
            Workload::Consume => "consume",
            Workload::EndToEnd => "e2e",
            Workload::Idle => "idle",
            Workload::Queue => "queue",
        }
    }
}

/// When producers stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// This many measured messages in all (after warm-up), split over producers.
    Messages(u64),
    /// This long after warm-up.
    Duration(Duration),
}

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub workload: Workload,
    pub server: String,
    pub topic: String,
    /// Partitions of the topic if the bench creates it.
    pub partitions: u32,
    pub producers: u32,
    pub consumers: u32,
    pub message_size: usize,
    /// Records per batch (the producer's `batch_records_max`).
    pub batch_size: u32,
    /// The producer's linger: how long a batch waits to fill.
    pub linger_ms: u64,
    /// Largest batch in bytes; the broker refuses more than its chunk size minus 4 KiB.
    pub batch_bytes_max: usize,
    pub acks: Acks,
    /// Bytes of messages a producer holds sent but not yet acked; `send` waits beyond
    /// it. Ack latency in an as-fast-as-possible run is mostly this queue drained at
    /// the broker's rate, so keep it a few batches deep when measuring latency.
    pub buffer_bytes_max: usize,
    /// Produce requests in flight per connection.
    pub requests_in_flight_max: usize,
    /// Batches of one partition in flight per producer
    /// (`ProducerConfig::batches_in_flight_per_partition_max`).
    pub batches_in_flight_per_partition_max: usize,
    pub stop: Stop,
    /// Fixed rate over all producers; `None` for as fast as possible.
    pub rate_per_s: Option<u64>,
    pub warmup: Duration,
    pub shard_aware: bool,
    /// CPUs for client threads, round-robin; empty: not pinned.
    pub client_cpus: Vec<usize>,
    /// The broker's pid, to report its CPU placement and use.
    pub server_pid: Option<u32>,
    /// Idle workload: connections to hold open.
    pub idle_connections: u32,
    /// Print a progress line on stderr every second.
    pub progress: bool,
    /// The queue workload's own settings.
    pub queue: QueueBenchConfig,
}

/// Settings of the queue workload.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueBenchConfig {
    /// Queue consumers, each on its own connection.
    pub workers: u32,
    /// Most messages one receive asks for.
    pub receive_batch: u32,
    /// A worker acks once it holds this many handles (or has nothing more to receive).
    pub ack_batch: u32,
    /// Fraction of messages nacked on every delivery, so that they are dead-lettered.
    pub fail_rate: f64,
}

impl Default for QueueBenchConfig {
    fn default() -> Self {
        QueueBenchConfig {
            workers: 4,
            receive_batch: 100,
            ack_batch: 100,
            fail_rate: 0.0,
        }
    }
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            workload: Workload::EndToEnd,
            server: "127.0.0.1:9740".into(),
            topic: "bench".into(),
            partitions: 2,
            producers: 1,
            consumers: 1,
            message_size: 1024,
            batch_size: 1000,
            linger_ms: 2,
            batch_bytes_max: BROKER_BATCH_BYTES_MAX_DEFAULT,
            acks: Acks::Durable,
            buffer_bytes_max: 8 << 20,
            requests_in_flight_max: 8,
            batches_in_flight_per_partition_max:
                crate::client::BATCHES_IN_FLIGHT_PER_PARTITION_DEFAULT,
            stop: Stop::Duration(Duration::from_secs(10)),
            rate_per_s: None,
            warmup: Duration::ZERO,
            shard_aware: true,
            client_cpus: Vec::new(),
            server_pid: None,
            idle_connections: 100,
            progress: true,
            queue: QueueBenchConfig::default(),
        }
    }
}

#[derive(Debug)]
pub enum BenchError {
    Config(String),
    Client {
        context: String,
        source: ClientError,
    },
    Io {
        context: String,
        source: std::io::Error,
    },
    /// The broker lost, reordered, duplicated or corrupted messages.
    Verification(String),
}

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BenchError::Config(text) => write!(f, "invalid bench settings: {text}"),
            BenchError::Client { context, source } => write!(f, "{context}: {}", source.report()),
            BenchError::Io { context, source } => write!(f, "{context}: {source}"),
            BenchError::Verification(text) => write!(f, "VERIFICATION FAILED: {text}"),
        }
    }
}

impl std::error::Error for BenchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BenchError::Client { source, .. } => Some(source),
            BenchError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn client_error(context: impl Into<String>) -> impl FnOnce(ClientError) -> BenchError {
    let context = context.into();
    move |source| BenchError::Client { context, source }
}

/// A finished run: the report and the histograms behind it (for the plot).
pub struct Outcome {
    pub report: Report,
    pub produce_latency: Histogram<u64>,
    pub e2e_latency: Histogram<u64>,
}

/// Nanoseconds since the Unix epoch (realtime clock, shared by every process on the host).
pub fn now_ns() -> u64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(elapsed) => elapsed.as_nanos() as u64,
        Err(_before_epoch) => 0,
    }
}

impl BenchConfig {
    pub fn validate(&self) -> Result<(), BenchError> {
        let fail = |text: String| Err(BenchError::Config(text));
        if self.message_size < PAYLOAD_HEADER_SIZE {
            return fail(format!(
                "--message-size {} is below the {PAYLOAD_HEADER_SIZE}-byte bench header",
                self.message_size
            ));
        }
        if self.batch_size == 0 || self.partitions == 0 {
            return fail("--batch-size and --partitions must be at least 1".into());
        }
        let needs_producers = matches!(
            self.workload,
            Workload::Produce | Workload::EndToEnd | Workload::Queue
        );
        let needs_consumers = matches!(self.workload, Workload::Consume | Workload::EndToEnd);
        if needs_producers && self.producers == 0 {
            return fail("this workload needs --producers of at least 1".into());
        }
        if needs_consumers && self.consumers == 0 {
            return fail("this workload needs --consumers of at least 1".into());
        }
        if BATCH_HEADER_SIZE + RECORD_OVERHEAD + self.message_size > self.batch_bytes_max {
            return fail(format!(
                "a {} B message does not fit a batch of at most {} B",
                self.message_size, self.batch_bytes_max
            ));
        }
        if self.rate_per_s == Some(0) {
            return fail("--rate must be at least 1".into());
        }
        if self.workload == Workload::Queue {
            let queue = &self.queue;
            if queue.workers == 0 || queue.receive_batch == 0 || queue.ack_batch == 0 {
                return fail(
                    "--workers, --receive-batch and --ack-batch must be at least 1".into(),
                );
            }
            if !(0.0..=1.0).contains(&queue.fail_rate) {
                return fail(format!(
                    "--fail-rate {} is not a fraction between 0 and 1",
                    queue.fail_rate
                ));
            }
        }
        if self.workload == Workload::Idle && self.server_pid.is_none() {
            return fail("the idle workload measures the server: give --server-pid".into());
        }
        Ok(())
    }

    /// Records per batch after the byte limit: `batch_size` unless the batch would be
    /// larger than `batch_bytes_max`.
    pub fn effective_batch_records(&self) -> u32 {
        let record = RECORD_OVERHEAD + self.message_size;
        let fit = (self.batch_bytes_max - BATCH_HEADER_SIZE) / record;
        self.batch_size.min(fit.min(u32::MAX as usize) as u32)
    }

    /// The producer settings of this run; the client's defaults elsewhere: idempotent, so
    /// a retried batch is not counted twice by the consumers' verification.
    ///
    /// # Errors
    /// [`ClientError::InvalidConfig`] for a bench setting the producer cannot work with
    /// (a zero buffer or in-flight limit).
    fn producer_config(&self) -> Result<ProducerConfig, ClientError> {
        let batch_bytes =
            BATCH_HEADER_SIZE + (RECORD_OVERHEAD + self.message_size) * self.batch_size as usize;
        // A batch of one never waits; bigger ones wait this long to fill.
        let linger_ms = if self.batch_size > 1 {
            self.linger_ms
        } else {
            0
        };
        ProducerConfig::builder()
            .acks(self.acks)
            .linger_ms(linger_ms)
            .batch_bytes_max(batch_bytes.min(self.batch_bytes_max))
            .batch_records_max(self.batch_size)
            // Several batches per request (the default request_bytes_max) and several
            // requests in flight keep a partition's pipeline full while one batch waits
            // for its fdatasync.
            .requests_in_flight_max(self.requests_in_flight_max)
            // Several batches of a partition in flight: with batches of one record, one
            // at a time would cap a partition at one message per round trip.
            .batches_in_flight_per_partition_max(self.batches_in_flight_per_partition_max)
            .buffer_bytes_max(self.buffer_bytes_max)
            .build()
    }
}

/// Counters shared by every task of a run.
struct Shared {
    run_id: u32,
    start_ns: u64,
    measure_start_ns: u64,
    /// Messages sent (measured or not), for the progress line and the timeline.
    sent: AtomicU64,
    /// Messages consumed (measured or not).
    consumed: AtomicU64,
    producers_done: AtomicBool,
    /// `expected[producer][partition]`: messages each producer sent to each partition,
    /// filled in as producers finish.
    expected: Mutex<Vec<Vec<u64>>>,
    failed: AtomicBool,
}

/// What the topic looks like and how to reach each partition's owner.
struct Layout {
    partitions: u32,
    /// Address to use for each partition: its owner's port when shard-aware, else the
    /// bootstrap address.
    partition_address: Vec<SocketAddr>,
    bootstrap: SocketAddr,
}

/// Runs a bench to completion on its own runtime.
pub fn run(config: BenchConfig) -> Result<Outcome, BenchError> {
    config.validate()?;
    let workers = config.client_cpus.len().clamp(1, 4).max(2);
    let next_cpu = Arc::new(AtomicUsize::new(0));
    let cpus = config.client_cpus.clone();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(workers).enable_all();
    {
        let next_cpu = next_cpu.clone();
        let cpus = cpus.clone();
        builder.on_thread_start(move || pin_to_next(&cpus, &next_cpu));
    }
    let runtime = builder.build().map_err(|source| BenchError::Io {
        context: "starting the tokio runtime".into(),
        source,
    })?;
    let result = runtime.block_on(run_async(config, next_cpu));
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

fn pin_to_next(cpus: &[usize], next: &AtomicUsize) {
    if cpus.is_empty() {
        return;
    }
    let cpu = cpus[next.fetch_add(1, Ordering::Relaxed) % cpus.len()];
    // Best effort: an unknown CPU id leaves the thread unpinned, which the summary shows
    // by listing the CPUs asked for next to the process's allowed set.
    core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
}

async fn run_async(config: BenchConfig, next_cpu: Arc<AtomicUsize>) -> Result<Outcome, BenchError> {
    let bootstrap = Client::connect(config.server.as_str())
        .await
        .map_err(client_error(format!("connecting to {}", config.server)))?;
    let client_cpus = describe_client_cpus(&config.client_cpus);
    let server_cpus = match config.server_pid {
        Some(pid) => describe_process_cpus(pid),
        None => "unknown (pass --server-pid)".to_owned(),
    };
    if config.workload == Workload::Idle {
        return run_idle(&config, bootstrap, client_cpus, server_cpus).await;
    }
    let layout = prepare_topic(&config, &bootstrap).await?;
    let effective_batch = config.effective_batch_records();
    if effective_batch < config.batch_size {
        eprintln!(
            "note: {} x {} B messages exceed the largest batch ({} B); batches hold {} messages",
            config.batch_size, config.message_size, config.batch_bytes_max, effective_batch
        );
    }
    let start_ns = now_ns();
    let shared = Arc::new(Shared {
        run_id: (start_ns as u32) ^ std::process::id().rotate_left(16),
        start_ns,
        measure_start_ns: start_ns + config.warmup.as_nanos() as u64,
        sent: AtomicU64::new(0),
        consumed: AtomicU64::new(0),
        producers_done: AtomicBool::new(false),
        expected: Mutex::new(vec![
            vec![0; layout.partitions as usize];
            config.producers as usize
        ]),
        failed: AtomicBool::new(false),
    });
    if config.workload == Workload::Queue {
        let placement = Placement {
            client_cpus,
            server_cpus,
        };
        return queue::run(&config, &bootstrap, layout, shared, next_cpu, placement).await;
    }
    let runs_producers = matches!(config.workload, Workload::Produce | Workload::EndToEnd);
    let runs_consumers = matches!(config.workload, Workload::Consume | Workload::EndToEnd);

    // Consumers first, positioned before any producer sends.
    let mut consumer_tasks = Vec::new();
    if runs_consumers {
        for unit in consumer_units(&config, &layout) {
            let consumer = start_consumer(&config, &unit).await?;
            let shared = shared.clone();
            let strict = config.workload == Workload::EndToEnd;
            let limit = match (config.workload, config.stop) {
                (Workload::Consume, Stop::Messages(count)) => Some(count),
                _ => None,
            };
            let topic = config.topic.clone();
            consumer_tasks.push(tokio::spawn(async move {
                let result =
                    run_consumer(consumer, topic, unit, shared.clone(), strict, limit).await;
                if result.is_err() {
                    // Stop the producers now: a failed verification ends the run at once.
                    shared.failed.store(true, Ordering::Relaxed);
                }
                result
            }));
        }
    }
    let server_cpu_before = config.server_pid.and_then(process_cpu_ticks);
    let (stop_sampler, sampler_stopped) = tokio::sync::oneshot::channel();
    let sampler = tokio::spawn(run_sampler(
        shared.clone(),
        config.progress,
        sampler_stopped,
    ));

    let producer_threads = if runs_producers {
        start_producers(&config, &layout, &shared, &next_cpu)?
    } else {
        Vec::new()
    };
    let (produced, mut first_error) = join_producers(producer_threads, &shared).await;
    shared.producers_done.store(true, Ordering::Release);

    let mut consumed = ConsumerResult::empty();
    for task in consumer_tasks {
        match task.await.expect("consumer task does not panic") {
            Ok(result) => consumed.merge(result),
            Err(error) => {
                shared.failed.store(true, Ordering::Relaxed);
                first_error.get_or_insert(error);
            }
        }
    }
    let end_ns = now_ns();
    let server_cpu_after = config.server_pid.and_then(process_cpu_ticks);
    // The sampler may already be gone only if it panicked; the timeline is then empty.
    let _ = stop_sampler.send(());
    let timeline = sampler.await.unwrap_or_default();
    if config.progress {
        eprintln!();
    }
    if let Some(error) = first_error {
        return Err(error);
    }
    if runs_producers && runs_consumers && consumed.measured_messages != produced.measured_messages
    {
        return Err(BenchError::Verification(format!(
            "produced {} measured messages but consumed {}",
            produced.measured_messages, consumed.measured_messages
        )));
    }
    let window_s = |last_ns: u64| {
        if last_ns > shared.measure_start_ns {
            (last_ns - shared.measure_start_ns) as f64 / 1e9
        } else {
            0.0
        }
    };
    let server_cpu_percent = cpu_percent(
        server_cpu_before,
        server_cpu_after,
        (end_ns.saturating_sub(shared.measure_start_ns.max(shared.start_ns))) as f64 / 1e9,
    );
    let server_cpu_s = cpu_seconds(server_cpu_before, server_cpu_after);
    let produced_side = SideTotals {
        messages: produced.measured_messages,
        bytes: produced.measured_messages * config.message_size as u64,
        duration_s: window_s(produced.last_ack_ns),
    };
    let consumed_side = SideTotals {
        messages: consumed.measured_messages,
        bytes: consumed.measured_messages * config.message_size as u64,
        duration_s: window_s(consumed.last_ns),
    };
    let report = Report {
        workload: config.workload.name().into(),
        message_size: config.message_size,
        batch_size: config.batch_size,
        acks: acks_name(config.acks).into(),
        producers: if runs_producers { config.producers } else { 0 },
        consumers: if runs_consumers { config.consumers } else { 0 },
        partitions: layout.partitions,
        shard_aware: config.shard_aware,
        rate_per_s: config.rate_per_s.unwrap_or(0),
        warmup_s: config.warmup.as_secs_f64(),
        duration_s: produced_side.duration_s.max(consumed_side.duration_s),
        produced: produced_side,
        consumed: consumed_side,
        produce_latency: Percentiles::of(&produced.latency),
        e2e_latency: Percentiles::of(&consumed.latency),
        verified: consumed.verified,
        unsent_due: produced.unsent_due,
        client_cpus,
        server_cpus,
        server_cpu_percent,
        server_cpu_s,
        idle_connections: 0,
        timeline,
        queue: Default::default(),
    };
    Ok(Outcome {
        report,
        produce_latency: produced.latency,
        e2e_latency: consumed.latency,
    })
}

type ProducerThread = std::thread::JoinHandle<Result<ProducerResult, BenchError>>;

/// Starts one OS thread per producer (see the module comment for why threads).
fn start_producers(
    config: &BenchConfig,
    layout: &Layout,
    shared: &Arc<Shared>,
    next_cpu: &Arc<AtomicUsize>,
) -> Result<Vec<ProducerThread>, BenchError> {
    let rates = config
        .rate_per_s
        .map(|rate| rate::split_rate(rate, config.producers));
    let quotas = match config.stop {
        Stop::Messages(total) => rate::split_rate(total, config.producers),
        Stop::Duration(_) => vec![u64::MAX; config.producers as usize],
    };
    let mut threads = Vec::with_capacity(config.producers as usize);
    for index in 0..config.producers {
        let context = ProducerContext {
            index,
            config: config.clone(),
            addresses: layout.partition_address.clone(),
            rate_per_s: rates.as_ref().map(|rates| rates[index as usize]),
            quota: quotas[index as usize],
            shared: shared.clone(),
        };
        let cpus = config.client_cpus.clone();
        let next_cpu = next_cpu.clone();
        let thread = std::thread::Builder::new()
            .name(format!("bench-producer-{index}"))
            .spawn(move || {
                pin_to_next(&cpus, &next_cpu);
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|source| BenchError::Io {
                        context: "starting a producer's tokio runtime".into(),
                        source,
                    })?;
                let result = runtime.block_on(run_producer(context));
                runtime.shutdown_timeout(Duration::from_secs(1));
                result
            })
            .map_err(|source| BenchError::Io {
                context: "starting a producer thread".into(),
                source,
            })?;
        threads.push(thread);
    }
    Ok(threads)
}

/// Waits for every producer thread; returns their merged result and the first error.
async fn join_producers(
    threads: Vec<ProducerThread>,
    shared: &Shared,
) -> (ProducerResult, Option<BenchError>) {
    let mut produced = ProducerResult::empty();
    let mut first_error: Option<BenchError> = None;
    for thread in threads {
        let joined = tokio::task::spawn_blocking(move || thread.join())
            .await
            .expect("join task does not panic");
        match joined {
            Ok(Ok(result)) => produced.merge(result),
            Ok(Err(error)) => {
                shared.failed.store(true, Ordering::Relaxed);
                first_error.get_or_insert(error);
            }
            Err(_panic) => {
                shared.failed.store(true, Ordering::Relaxed);
                first_error.get_or_insert(BenchError::Config("a producer thread panicked".into()));
            }
        }
    }
    (produced, first_error)
}

pub fn acks_name(acks: Acks) -> &'static str {
    match acks {
        Acks::None => "none",
        Acks::Memory => "memory",
        Acks::Durable => "durable",
    }
}

/// Where the client and the server ran, for the report.
struct Placement {
    client_cpus: String,
    server_cpus: String,
}

/// Creates the topic if missing and works out where each partition lives.
async fn prepare_topic(config: &BenchConfig, bootstrap: &Client) -> Result<Layout, BenchError> {
    let topics = [config.topic.as_str()];
    let mut metadata = bootstrap
        .metadata(&topics)
        .await
        .map_err(client_error("reading metadata"))?;
    let exists = metadata
        .topics
        .iter()
        .any(|topic| topic.name == config.topic && topic.error.is_none());
    if !exists {
        if config.workload == Workload::Consume {
            return Err(BenchError::Config(format!(
                "topic {:?} does not exist: there is nothing to consume",
                config.topic
            )));
        }
        let queue_settings = if config.workload == Workload::Queue {
            queue::topic_settings()
        } else {
            crate::client::QueueSettings::default()
        };
        bootstrap
            .create_topic_with_queue(
                &config.topic,
                config.partitions,
                crate::client::Retention::default(),
                queue_settings,
            )
            .await
            .map_err(client_error(format!("creating topic {:?}", config.topic)))?;
        metadata = bootstrap
            .metadata(&topics)
            .await
            .map_err(client_error("reading metadata"))?;
    }
    let topic = metadata
        .topics
        .iter()
        .find(|topic| topic.name == config.topic && topic.error.is_none())
        .ok_or_else(|| BenchError::Config(format!("topic {:?} has no metadata", config.topic)))?;
    let partitions = topic.partitions.len() as u32;
    if partitions != config.partitions {
        eprintln!(
            "note: topic {:?} already exists with {partitions} partitions; using them",
            config.topic
        );
    }
    let bootstrap_address = bootstrap.peer_address();
    let shard_count = metadata.shard_ports.len() as u16;
    let mut partition_address = vec![bootstrap_address; partitions as usize];
    if config.shard_aware {
        for entry in &topic.partitions {
            // The client computes placement itself, as a smart client in another
            // language would, and checks it against what the broker says.
            let computed = placement::shard_for(&config.topic, entry.partition, shard_count);
            if computed != entry.shard {
                return Err(BenchError::Verification(format!(
                    "placement::shard_for says partition {} lives on shard {computed}, metadata says {}",
                    entry.partition, entry.shard
                )));
            }
            let port = metadata
                .shard_ports
                .get(usize::from(entry.shard))
                .copied()
                .ok_or_else(|| {
                    BenchError::Config(format!("metadata has no port for shard {}", entry.shard))
                })?;
            partition_address[entry.partition as usize] =
                SocketAddr::new(bootstrap_address.ip(), port);
        }
    }
    Ok(Layout {
        partitions,
        partition_address,
        bootstrap: bootstrap_address,
    })
}

struct ProducerContext {
    index: u32,
    config: BenchConfig,
    addresses: Vec<SocketAddr>,
    rate_per_s: Option<u64>,
    quota: u64,
    shared: Arc<Shared>,
}

struct ProducerResult {
    latency: Histogram<u64>,
    measured_messages: u64,
    last_ack_ns: u64,
    /// Fixed-rate mode: messages due before the end that the producer never got to send.
    unsent_due: u64,
}

impl ProducerResult {
    fn empty() -> ProducerResult {
        ProducerResult {
            latency: latency_histogram(),
            measured_messages: 0,
            last_ack_ns: 0,
            unsent_due: 0,
        }
    }

    fn merge(&mut self, other: ProducerResult) {
        self.latency
            .add(&other.latency)
            .expect("histograms share bounds");
        self.measured_messages += other.measured_messages;
        self.last_ack_ns = self.last_ack_ns.max(other.last_ack_ns);
        self.unsent_due += other.unsent_due;
    }
}

/// How long before each fixed-rate send time the producer stops sleeping and spins.
const SEND_SPIN_NS: u64 = 50_000;

/// Waits for absolute realtime-clock instants (the clock of [`now_ns`]) on a timerfd,
/// inside the producer's runtime: the thread sleeps in the runtime's epoll, so answers
/// that arrive before the deadline are handled at once.
struct SendClock {
    timer: AsyncFd<OwnedFd>,
}

impl SendClock {
    fn new() -> Result<SendClock, BenchError> {
        let io_error = |source| BenchError::Io {
            context: "creating the producer's send timer (timerfd)".into(),
            source,
        };
        // SAFETY: timerfd_create takes two integer arguments and returns a new descriptor
        // or -1; nothing else is touched.
        let fd = unsafe {
            libc::timerfd_create(libc::CLOCK_REALTIME, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC)
        };
        if fd < 0 {
            return Err(io_error(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by timerfd_create and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the OwnedFd is moved into the AsyncFd, which keeps it open, with the same
        // descriptor, until the AsyncFd is dropped.
        let timer = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|failed| io_error(failed.into()))?;
        Ok(SendClock { timer })
    }

    /// Returns once the realtime clock has reached `deadline_ns`.
    async fn wait_until(&self, deadline_ns: u64) -> Result<(), BenchError> {
        self.sleep_until(deadline_ns.saturating_sub(SEND_SPIN_NS))
            .await?;
        // The last stretch spins: a thread woken from an idle CPU starts tens of
        // microseconds late on a VM, which the latency (counted from the intended send
        // time) would charge to the broker.
        while now_ns() < deadline_ns {
            std::hint::spin_loop();
        }
        Ok(())
    }

    async fn sleep_until(&self, deadline_ns: u64) -> Result<(), BenchError> {
        let io_error = |source| BenchError::Io {
            context: "waiting on the producer's send timer (timerfd)".into(),
            source,
        };
        if now_ns() >= deadline_ns {
            return Ok(());
        }
        let setting = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (deadline_ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (deadline_ns % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: the descriptor is a live timerfd owned by `self`; `setting` is a valid
        // itimerspec and the old value is not asked for (null).
        let armed = unsafe {
            libc::timerfd_settime(
                self.timer.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &setting,
                std::ptr::null_mut(),
            )
        };
        if armed < 0 {
            return Err(io_error(std::io::Error::last_os_error()));
        }
        loop {
            let mut ready = self.timer.readable().await.map_err(io_error)?;
            let mut expirations = 0u64;
            // SAFETY: reads 8 bytes (the expiration count) from the timerfd into a u64
            // that lives across the call.
            let read = unsafe {
                libc::read(
                    self.timer.as_raw_fd(),
                    (&mut expirations as *mut u64).cast(),
                    std::mem::size_of::<u64>(),
                )
            };
            if read == std::mem::size_of::<u64>() as isize {
                return Ok(());
            }
            let error = std::io::Error::last_os_error();
            if error.kind() != std::io::ErrorKind::WouldBlock {
                return Err(io_error(error));
            }
            ready.clear_ready();
        }
    }
}

async fn run_producer(context: ProducerContext) -> Result<ProducerResult, BenchError> {
    let config = &context.config;
    let shared = &context.shared;
    let partitions = context.addresses.len();
    // One connection and producer per distinct address (one per owning shard when
    // shard-aware, else one in all).
    let mut addresses: Vec<SocketAddr> = Vec::new();
    let mut route = Vec::with_capacity(partitions);
    for address in &context.addresses {
        let slot = match addresses.iter().position(|known| known == address) {
            Some(slot) => slot,
            None => {
                addresses.push(*address);
                addresses.len() - 1
            }
        };
        route.push(slot);
    }
    let mut producers = Vec::with_capacity(addresses.len());
    for address in &addresses {
        let client = Client::connect(*address)
            .await
            .map_err(client_error(format!("producer connecting to {address}")))?;
        producers.push(
            config
                .producer_config()
                .and_then(|producer_config| Producer::new(client, producer_config))
                .map_err(client_error("starting a producer"))?,
        );
    }
    let (ack_sender, ack_receiver) = mpsc::channel::<(Pending, u64)>(ACK_QUEUE_MAX);
    let collector = tokio::spawn(collect_acks(ack_receiver, shared.measure_start_ns));
    let filler = payload::filler(config.message_size, u64::from(context.index) + 1);
    let mut arena = BytesMut::with_capacity(config.message_size * 1024);
    let mut sequences = vec![0u64; partitions];
    let schedule = context
        .rate_per_s
        .filter(|rate| *rate > 0)
        .map(|rate| rate::RateSchedule::new(shared.start_ns, rate));
    let schedule = match schedule {
        Some(schedule) => Some((schedule, SendClock::new()?)),
        None => None,
    };
    let end_ns = match config.stop {
        Stop::Duration(duration) => shared.measure_start_ns + duration.as_nanos() as u64,
        Stop::Messages(_) => u64::MAX,
    };
    let sends_anything = context.quota > 0 && context.rate_per_s != Some(0);
    let mut index: u64 = 0;
    let mut measured: u64 = 0;
    let topic = config.topic.as_str();
    let mut error = None;
    let mut unsent_due: u64 = 0;
    while sends_anything && measured < context.quota && !shared.failed.load(Ordering::Relaxed) {
        let sent_ns = match &schedule {
            Some((schedule, send_clock)) => {
                let intended = schedule.intended_ns(index);
                if intended >= end_ns {
                    break;
                }
                // A producer that fell behind stops at the end time too, so the run stays
                // bounded; what was due and never sent is reported, not hidden.
                let now = now_ns();
                if now >= end_ns {
                    unsent_due = schedule.due_by(end_ns - 1).saturating_sub(index);
                    break;
                }
                if let Err(failed) = send_clock.wait_until(intended).await {
                    error = Some(failed);
                    break;
                }
                intended
            }
            None => {
                let now = now_ns();
                if now >= end_ns {
                    break;
                }
                now
            }
        };
        let partition = (index % partitions as u64) as usize;
        let header = PayloadHeader {
            run_id: shared.run_id,
            producer: context.index,
            partition: partition as u32,
            sequence: sequences[partition],
            sent_ns,
        };
        // The arena is reused once every earlier message has been copied into a batch,
        // so steady state allocates nothing here.
        arena.reserve(config.message_size);
        arena.extend_from_slice(&filler);
        payload::encode(&mut arena[..], &header);
        let value = arena.split().freeze();
        let record = ProducerRecord {
            key: None,
            value,
            headers: Vec::new(),
            partition: Some(partition as u32),
        };
        let producer = &producers[route[partition]];
        let sent = if config.acks == Acks::None {
            producer
                .send_unacknowledged(topic, record)
                .await
                .map(Pending::Unacknowledged)
        } else {
            producer
                .send(topic, record)
                .await
                .map(Pending::Acknowledged)
        };
        let handle = match sent {
            Ok(handle) => handle,
            Err(source) => {
                error = Some(BenchError::Client {
                    context: format!("sending to partition {partition}"),
                    source,
                });
                break;
            }
        };
        sequences[partition] += 1;
        index += 1;
        if sent_ns >= shared.measure_start_ns {
            measured += 1;
        }
        shared.sent.fetch_add(1, Ordering::Relaxed);
        if ack_sender.send((handle, sent_ns)).await.is_err() {
            // The collector stopped early: it saw a refused batch.
            break;
        }
    }
    for producer in &producers {
        if let Err(source) = producer.close().await {
            error.get_or_insert(BenchError::Client {
                context: "flushing the producer".into(),
                source,
            });
        }
    }
    drop(ack_sender);
    let collected = collector.await.expect("ack collector does not panic");
    {
        let mut expected = shared
            .expected
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        expected[context.index as usize].copy_from_slice(&sequences);
    }
    if let Some(error) = error {
        return Err(error);
    }
    let mut result = collected?;
    result.unsent_due = unsent_due;
    if result.measured_messages != measured {
        return Err(BenchError::Verification(format!(
            "producer {} sent {measured} measured messages but {} were acked",
            context.index, result.measured_messages
        )));
    }
    Ok(result)
}

/// A record sent: with acks, answered with its offset; with acks none, written (the
/// latency measured is then the time to the socket). The bench only needs to know when
/// and whether.
/// A sent record's handle, whichever the producer's acks ([`Producer::send`] or
/// [`Producer::send_unacknowledged`]), for the bench and the CLI's produce, which choose
/// the acks at run time.
#[derive(Debug)]
pub enum Pending {
    Acknowledged(SendHandle),
    Unacknowledged(SentHandle),
}

impl Pending {
    /// The outcome, if the batch is done.
    pub fn try_result(&self) -> Option<Result<(), ClientError>> {
        match self {
            Pending::Acknowledged(handle) => handle.try_result().map(|result| result.map(drop)),
            Pending::Unacknowledged(handle) => handle.try_result().map(|result| result.map(drop)),
        }
    }

    /// Waits for the outcome.
    pub async fn wait(self) -> Result<(), ClientError> {
        match self {
            Pending::Acknowledged(handle) => handle.await.map(drop),
            Pending::Unacknowledged(handle) => handle.await.map(drop),
        }
    }
}

/// Resolves send handles in order and records each message's ack latency.
async fn collect_acks(
    mut receiver: mpsc::Receiver<(Pending, u64)>,
    measure_start_ns: u64,
) -> Result<ProducerResult, BenchError> {
    let mut result = ProducerResult::empty();
    let mut pending = Vec::with_capacity(1024);
    while receiver.recv_many(&mut pending, 1024).await > 0 {
        // Handles already answered when this chunk arrived share one clock reading: a
        // clock read per message was 5% of the client's CPU.
        let mut now = now_ns();
        for (handle, sent_ns) in pending.drain(..) {
            let outcome = match handle.try_result() {
                Some(outcome) => outcome,
                None => {
                    let outcome = handle.wait().await;
                    now = now_ns();
                    outcome
                }
            };
            if let Err(source) = outcome {
                return Err(BenchError::Client {
                    context: "the broker refused a batch".into(),
                    source,
                });
            }
            if sent_ns >= measure_start_ns {
                result
                    .latency
                    .saturating_record(now.saturating_sub(sent_ns).max(1));
                result.measured_messages += 1;
                result.last_ack_ns = now;
            }
        }
    }
    Ok(result)
}

/// Partitions one consumer connection reads, and where.
struct ConsumerUnit {
    address: SocketAddr,
    partitions: Vec<u32>,
}

/// Consumer `c` reads partitions `p` with `p % consumers == c`; shard-aware, each
/// consumer's partitions are further split by owning shard, one connection each.
fn consumer_units(config: &BenchConfig, layout: &Layout) -> Vec<ConsumerUnit> {
    let mut units: Vec<ConsumerUnit> = Vec::new();
    for consumer in 0..config.consumers {
        let mut mine: Vec<ConsumerUnit> = Vec::new();
        for partition in (0..layout.partitions).filter(|p| p % config.consumers == consumer) {
            let address = if config.shard_aware {
                layout.partition_address[partition as usize]
            } else {
                layout.bootstrap
            };
            match mine.iter_mut().find(|unit| unit.address == address) {
                Some(unit) => unit.partitions.push(partition),
                None => mine.push(ConsumerUnit {
                    address,
                    partitions: vec![partition],
                }),
            }
        }
        units.extend(mine);
    }
    units
}

async fn start_consumer(config: &BenchConfig, unit: &ConsumerUnit) -> Result<Consumer, BenchError> {
    let client = Client::connect(unit.address)
        .await
        .map_err(client_error(format!(
            "consumer connecting to {}",
            unit.address
        )))?;
    let mut consumer = Consumer::new(
        client,
        ConsumerConfig::builder()
            .wait_ms_max(100)
            .bytes_max(8 << 20)
            .partition_bytes_max(2 << 20)
            .build()
            .map_err(client_error("consumer settings"))?,
    )
    .map_err(client_error("consumer settings"))?;
    let start = match config.workload {
        Workload::Consume => StartPosition::Beginning,
        _ => StartPosition::End,
    };
    for partition in &unit.partitions {
        consumer
            .assign_from(&config.topic, *partition, start)
            .await
            .map_err(client_error(format!(
                "positioning on partition {partition}"
            )))?;
    }
    Ok(consumer)
}

struct ConsumerResult {
    latency: Histogram<u64>,
    measured_messages: u64,
    verified: u64,
    last_ns: u64,
}

impl ConsumerResult {
    fn empty() -> ConsumerResult {
        ConsumerResult {
            latency: latency_histogram(),
            measured_messages: 0,
            verified: 0,
            last_ns: 0,
        }
    }

    fn merge(&mut self, other: ConsumerResult) {
        self.latency
            .add(&other.latency)
            .expect("histograms share bounds");
        self.measured_messages += other.measured_messages;
        self.verified += other.verified;
        self.last_ns = self.last_ns.max(other.last_ns);
    }
}

/// Checks that each (run, producer, partition) stream arrives dense and in order.
#[derive(Debug, Default)]
pub struct Verifier {
    /// Next sequence expected per (run, producer, partition).
    next: HashMap<(u32, u32, u32), u64>,
    /// Only messages of this run are accepted, each stream starting at 0.
    strict_run: Option<u32>,
    /// The last stream touched, to skip the hash lookup within a batch.
    last: Option<((u32, u32, u32), u64)>,
    /// Each producer's filler, built on first sight, as long as the longest message.
    fillers: HashMap<u32, Vec<u8>>,
}

impl Verifier {
    pub fn new(strict_run: Option<u32>) -> Verifier {
        Verifier {
            strict_run,
            ..Verifier::default()
        }
    }

    /// Checks one message read at `offset` of `partition`.
    pub fn check(
        &mut self,
        partition: u32,
        offset: u64,
        value: &[u8],
    ) -> Result<PayloadHeader, String> {
        let header = payload::verify(value)
            .map_err(|error| format!("partition {partition} offset {offset}: {error}"))?;
        if header.partition != partition {
            return Err(format!(
                "partition {partition} offset {offset}: message was sent to partition {}",
                header.partition
            ));
        }
        let filler = self
            .fillers
            .entry(header.producer)
            .or_insert_with(|| payload::filler(value.len(), u64::from(header.producer) + 1));
        if filler.len() < value.len() {
            *filler = payload::filler(value.len(), u64::from(header.producer) + 1);
        }
        payload::verify_body(value, filler)
            .map_err(|error| format!("partition {partition} offset {offset}: {error}"))?;
        if let Some(run) = self.strict_run {
            if header.run_id != run {
                return Err(format!(
                    "partition {partition} offset {offset}: message of another run ({:#x}, ours {run:#x})",
                    header.run_id
                ));
            }
        }
        let key = (header.run_id, header.producer, header.partition);
        let expected = match self.last {
            Some((last_key, next)) if last_key == key => Some(next),
            _ => {
                if let Some((last_key, next)) = self.last {
                    self.next.insert(last_key, next);
                }
                self.next.get(&key).copied()
            }
        };
        let expected = match expected {
            Some(next) => next,
            // A stream seen for the first time starts at 0 in strict mode; a plain
            // consume may start reading mid-stream.
            None if self.strict_run.is_some() => 0,
            None => header.sequence,
        };
        if header.sequence != expected {
            let what = if header.sequence < expected {
                "duplicate or reordered"
            } else {
                "gap: messages lost"
            };
            return Err(format!(
                "partition {partition} offset {offset}: producer {} sequence {} where {expected} was expected ({what})",
                header.producer, header.sequence
            ));
        }
        self.last = Some((key, expected + 1));
        Ok(header)
    }

    /// The next sequence expected of a stream: how many of its messages were seen.
    pub fn seen(&self, run: u32, producer: u32, partition: u32) -> u64 {
        let key = (run, producer, partition);
        match self.last {
            Some((last_key, next)) if last_key == key => next,
            _ => self.next.get(&key).copied().unwrap_or(0),
        }
    }
}

async fn run_consumer(
    mut consumer: Consumer,
    topic: String,
    unit: ConsumerUnit,
    shared: Arc<Shared>,
    strict: bool,
    limit: Option<u64>,
) -> Result<ConsumerResult, BenchError> {
    let mut result = ConsumerResult::empty();
    let mut verifier = Verifier::new(strict.then_some(shared.run_id));
    // A plain consume reads up to the high watermark seen at the start.
    let mut targets: Vec<(u32, u64)> = Vec::new();
    if !strict {
        for partition in &unit.partitions {
            let (_, high) = consumer
                .client()
                .partition_offsets(&topic, *partition)
                .await
                .map_err(client_error("reading offsets"))?;
            targets.push((*partition, high));
        }
    }
    let mut last_progress = Instant::now();
    let mut consumed_here: u64 = 0;
    loop {
        if shared.failed.load(Ordering::Relaxed) {
            break;
        }
        if strict {
            if shared.producers_done.load(Ordering::Acquire) {
                let expected: u64 = {
                    let expected = shared
                        .expected
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                    expected
                        .iter()
                        .map(|per_partition| {
                            unit.partitions
                                .iter()
                                .map(|p| per_partition[*p as usize])
                                .sum::<u64>()
                        })
                        .sum()
                };
                if consumed_here >= expected {
                    check_final(&verifier, &shared, &unit)?;
                    break;
                }
                if last_progress.elapsed() > DRAIN_TIMEOUT {
                    return Err(BenchError::Verification(format!(
                        "partitions {:?}: consumed {consumed_here} of {expected} messages, none for {} s after producers finished: messages lost",
                        unit.partitions,
                        DRAIN_TIMEOUT.as_secs()
                    )));
                }
            }
        } else {
            let done = targets.iter().all(|(partition, high)| {
                consumer
                    .position(&topic, *partition)
                    .is_some_and(|position| position >= *high)
            });
            if done || limit.is_some_and(|limit| consumed_here >= limit) {
                break;
            }
        }
        let records = consumer.poll().await.map_err(client_error(format!(
            "consuming partitions {:?}",
            unit.partitions
        )))?;
        if records.is_empty() {
            continue;
        }
        let now = now_ns();
        last_progress = Instant::now();
        for record in &records {
            if limit.is_some_and(|limit| consumed_here >= limit) {
                break;
            }
            let header = verifier
                .check(record.partition(), record.offset(), record.value())
                .map_err(BenchError::Verification)?;
            consumed_here += 1;
            result.verified += 1;
            // End-to-end latency needs the producer's clock reading of this run; a plain
            // consume of older messages measures throughput only.
            if strict && header.sent_ns >= shared.measure_start_ns {
                result
                    .latency
                    .saturating_record(now.saturating_sub(header.sent_ns).max(1));
            }
            if strict && header.sent_ns >= shared.measure_start_ns
                || !strict && now >= shared.measure_start_ns
            {
                result.measured_messages += 1;
                result.last_ns = now;
            }
        }
        shared
            .consumed
            .fetch_add(records.len() as u64, Ordering::Relaxed);
    }
    Ok(result)
}

/// Every stream's last sequence matches what its producer sent.
fn check_final(
    verifier: &Verifier,
    shared: &Shared,
    unit: &ConsumerUnit,
) -> Result<(), BenchError> {
    let expected = shared
        .expected
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    for (producer, per_partition) in expected.iter().enumerate() {
        for partition in &unit.partitions {
            let sent = per_partition[*partition as usize];
            let seen = verifier.seen(shared.run_id, producer as u32, *partition);
            if seen != sent {
                return Err(BenchError::Verification(format!(
                    "partition {partition}: producer {producer} sent {sent} messages, {seen} consumed"
                )));
            }
        }
    }
    Ok(())
}

/// Samples the counters every second; prints the progress line.
async fn run_sampler(
    shared: Arc<Shared>,
    progress: bool,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Timeline {
    let mut timeline = Timeline::default();
    let mut last_sent = 0;
    let mut last_consumed = 0;
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    interval.tick().await;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = &mut stop => return timeline,
        }
        let sent = shared.sent.load(Ordering::Relaxed);
        let consumed = shared.consumed.load(Ordering::Relaxed);
        timeline.produce_per_s.push(sent - last_sent);
        timeline.consume_per_s.push(consumed - last_consumed);
        if progress {
            let elapsed = (now_ns().saturating_sub(shared.start_ns)) as f64 / 1e9;
            let phase = if now_ns() < shared.measure_start_ns {
                "warm-up"
            } else {
                "measuring"
            };
            eprint!(
                "\r[{elapsed:6.1} s {phase}] produce {:>10} msg/s  consume {:>10} msg/s  total sent {sent} consumed {consumed}   ",
                sent - last_sent,
                consumed - last_consumed
            );
        }
        last_sent = sent;
        last_consumed = consumed;
    }
}

/// Holds `idle_connections` connections for the run's duration while measuring the
/// server's CPU use from /proc/PID/stat.
async fn run_idle(
    config: &BenchConfig,
    bootstrap: Client,
    client_cpus: String,
    server_cpus: String,
) -> Result<Outcome, BenchError> {
    let pid = config.server_pid.expect("validated");
    let mut clients = Vec::with_capacity(config.idle_connections as usize);
    for _ in 0..config.idle_connections {
        clients.push(
            Client::connect(config.server.as_str())
                .await
                .map_err(client_error("opening an idle connection"))?,
        );
    }
    // Let connection set-up settle before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let duration = match config.stop {
        Stop::Duration(duration) => duration,
        Stop::Messages(_) => Duration::from_secs(30),
    };
    let before = process_cpu_ticks(pid);
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    let after = process_cpu_ticks(pid);
    let seconds = started.elapsed().as_secs_f64();
    // Every connection must still work: idleness must not have cost us them.
    for client in &clients {
        client
            .metadata(&[])
            .await
            .map_err(client_error("an idle connection after the measurement"))?;
    }
    drop(bootstrap);
    let report = Report {
        workload: "idle".into(),
        message_size: 0,
        batch_size: 0,
        acks: acks_name(config.acks).into(),
        duration_s: seconds,
        client_cpus,
        server_cpus,
        server_cpu_percent: cpu_percent(before, after, seconds),
        server_cpu_s: cpu_seconds(before, after),
        idle_connections: config.idle_connections,
        ..Report::default()
    };
    Ok(Outcome {
        report,
        produce_latency: latency_histogram(),
        e2e_latency: latency_histogram(),
    })
}

/// utime + stime of a process, in clock ticks.
pub fn process_cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&stat)
}

/// Fields 14 and 15 (utime, stime) of /proc/PID/stat; the command name (field 2) may
/// contain spaces and parentheses, so fields are counted after its last ')'.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // after_name starts at field 3 (state): utime is field 14, index 11 here.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// CPU use in percent of one core; -1 when unknown.
/// CPU seconds used between two readings of the same process; -1 when unknown.
fn cpu_seconds(before: Option<u64>, after: Option<u64>) -> f64 {
    match (before, after) {
        (Some(before), Some(after)) => after.saturating_sub(before) as f64 / clock_ticks_per_s(),
        _ => -1.0,
    }
}

fn cpu_percent(before: Option<u64>, after: Option<u64>, seconds: f64) -> f64 {
    match (before, after) {
        (Some(before), Some(after)) if seconds > 0.0 => {
            (after.saturating_sub(before)) as f64 / clock_ticks_per_s() / seconds * 100.0
        }
        _ => -1.0,
    }
}

fn allowed_cpus(path: &str) -> Option<String> {
    let status = std::fs::read_to_string(path).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .map(|list| list.trim().to_owned())
}

fn describe_client_cpus(pinned: &[usize]) -> String {
    let allowed = allowed_cpus("/proc/self/status").unwrap_or_else(|| "?".into());
    if pinned.is_empty() {
        format!("unpinned (process may use {allowed})")
    } else {
        let list: Vec<String> = pinned.iter().map(usize::to_string).collect();
        format!("pinned to {} (process may use {allowed})", list.join(","))
    }
}

/// The distinct CPU sets of a process's threads, e.g. "pid 42 threads on [0] [1] [0-1]".
fn describe_process_cpus(pid: u32) -> String {
    let mut sets: Vec<String> = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let path = task.path().join("status");
            if let Some(list) = allowed_cpus(&path.to_string_lossy()) {
                if !sets.contains(&list) {
                    sets.push(list);
                }
            }
        }
    }
    if sets.is_empty() {
        return format!("pid {pid}: not readable");
    }
    sets.sort();
    let sets: Vec<String> = sets.iter().map(|set| format!("[{set}]")).collect();
    format!("pid {pid} threads on {}", sets.join(" "))
}

/// Parses a CPU list such as `0,2-3`.
pub fn parse_cpu_list(text: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    for part in text
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
    {
        match part.split_once('-') {
            Some((low, high)) => {
                let low: usize = low.parse().map_err(|_| format!("bad CPU {low:?}"))?;
                let high: usize = high.parse().map_err(|_| format!("bad CPU {high:?}"))?;
                if low > high {
                    return Err(format!("bad CPU range {part:?}"));
                }
                cpus.extend(low..=high);
            }
            None => cpus.push(part.parse().map_err(|_| format!("bad CPU {part:?}"))?),
        }
    }
    if cpus.is_empty() {
        return Err("empty CPU list".into());
    }
    Ok(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(run: u32, producer: u32, partition: u32, sequence: u64) -> Vec<u8> {
        let mut bytes = payload::filler(64, u64::from(producer) + 1);
        payload::encode(
            &mut bytes,
            &PayloadHeader {
                run_id: run,
                producer,
                partition,
                sequence,
                sent_ns: 5,
            },
        );
        bytes
    }

    #[test]
    fn verifier_accepts_dense_interleaved_streams() {
        let mut verifier = Verifier::new(Some(7));
        for sequence in 0..3 {
            for producer in 0..2 {
                verifier
                    .check(
                        1,
                        sequence * 2 + u64::from(producer),
                        &message(7, producer, 1, sequence),
                    )
                    .unwrap();
            }
        }
        assert_eq!(verifier.seen(7, 0, 1), 3);
        assert_eq!(verifier.seen(7, 1, 1), 3);
        assert_eq!(verifier.seen(7, 2, 1), 0);
    }

    #[test]
    fn verifier_rejects_gap_duplicate_wrong_partition_and_foreign_run() {
        let mut verifier = Verifier::new(Some(7));
        verifier.check(0, 0, &message(7, 0, 0, 0)).unwrap();
        assert!(verifier
            .check(0, 1, &message(7, 0, 0, 2))
            .unwrap_err()
            .contains("lost"));
        let mut verifier = Verifier::new(Some(7));
        verifier.check(0, 0, &message(7, 0, 0, 0)).unwrap();
        assert!(verifier
            .check(0, 1, &message(7, 0, 0, 0))
            .unwrap_err()
            .contains("duplicate"));
        assert!(verifier
            .check(1, 0, &message(7, 0, 0, 1))
            .unwrap_err()
            .contains("sent to partition"));
        assert!(verifier
            .check(0, 1, &message(8, 0, 0, 1))
            .unwrap_err()
            .contains("another run"));
        // Strict streams start at 0.
        assert!(Verifier::new(Some(7))
            .check(0, 0, &message(7, 0, 0, 5))
            .is_err());
        // A plain consume may start mid-stream, then must stay dense.
        let mut plain = Verifier::new(None);
        plain.check(0, 9, &message(3, 0, 0, 5)).unwrap();
        plain.check(0, 10, &message(3, 0, 0, 6)).unwrap();
        assert!(plain.check(0, 11, &message(3, 0, 0, 8)).is_err());
    }

    #[test]
    fn proc_stat_cpu_ticks_parse_past_odd_names() {
        let stat =
            "42 (shard (x) 1) S 1 42 42 0 -1 4194560 100 0 0 0 1234 567 0 0 20 0 3 0 100 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(1234 + 567));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn cpu_list_parses_ranges() {
        assert_eq!(parse_cpu_list("1").unwrap(), vec![1]);
        assert_eq!(parse_cpu_list("0,2-4").unwrap(), vec![0, 2, 3, 4]);
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("x").is_err());
    }

    #[test]
    fn batches_are_capped_by_the_broker_limit() {
        let config = BenchConfig::default();
        // 1000 x 1 KiB records are 1,046,064 bytes: two more than a 1 MiB - 4 KiB batch holds.
        assert_eq!(config.effective_batch_records(), 998);
        assert!(
            config.producer_config().unwrap().batch_bytes_max <= BROKER_BATCH_BYTES_MAX_DEFAULT
        );
        let small = BenchConfig {
            message_size: 100,
            batch_size: 10,
            ..BenchConfig::default()
        };
        assert_eq!(small.effective_batch_records(), 10);
    }
}
