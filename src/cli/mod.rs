//! The `shardq` command line: `serve` runs the broker (`config print` shows what it would
//! run with: `config`); `topic`, `produce`, `consume`,
//! `receive`, `ack`, `nack`, `group` and `dlq` talk to one through [`shardq::client`]
//! (the queue-group commands are in `queue`).
//!
//! Exit status: 0 on success, 1 when the broker or I/O failed (with one line on stderr
//! saying what; `ack` and `nack` print one line per refused handle), 2 for usage errors
//! (clap's own). `serve` never starts tokio: the broker
//! runs its own per-core executors. Client subcommands run on a current-thread runtime,
//! which is plenty for one connection.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;

use shardq::bench::Pending;
use shardq::client::{
    Acks, Client, ClientError, ConsumedRecord, Consumer, ConsumerConfig, ExpiryPolicy, Handle,
    Producer, ProducerConfig, ProducerRecord, QueueOrdering, QueueSettings, Refusal, Retention,
    StartPosition,
};
use shardq::server::ServerError;

mod config;
mod doctor;
mod logs;
mod queue;
mod stats;

const SERVER_DEFAULT: &str = "127.0.0.1:9740";
/// Longest single long-poll of `consume`, so that `--timeout-ms` and `--count` are
/// checked at least this often.
const CONSUME_WAIT_MS_MAX: u64 = 1_000;
/// Send handles `produce` keeps before waiting on the oldest: bounds its memory on huge
/// inputs while still letting many batches be in flight.
const PRODUCE_HANDLES_MAX: usize = 100_000;

#[derive(Debug, Parser)]
#[command(name = "shardq", version, about = "A thread-per-core message broker")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// The broker's configuration: `config print` shows the effective one.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Create, list, describe and delete topics.
    Topic {
        #[command(flatten)]
        server: ServerArgs,
        #[command(subcommand)]
        command: TopicCommand,
    },
    /// Send one message per line of standard input (the newline is not part of it).
    Produce(ProduceArgs),
    /// Print messages of a topic, one per line.
    Consume(ConsumeArgs),
    /// Lease messages of a queue group and print them, one JSON object per line.
    Receive(ReceiveArgs),
    /// Settle received messages as done, by handle (partition:offset:attempt).
    Ack(AckArgs),
    /// Give received messages back (retried later, or dead-lettered after the last try).
    Nack(NackArgs),
    /// List and describe a topic's consumer groups (stream and queue).
    Group {
        #[command(flatten)]
        server: ServerArgs,
        #[command(subcommand)]
        command: GroupCommand,
    },
    /// Inspect, redrive and purge a topic's dead-letter topic.
    Dlq {
        #[command(flatten)]
        server: ServerArgs,
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Measure throughput and latency; every consumed message is verified.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Rates, offsets, bytes and durable lag per shard and partition, and every group's
    /// lag (from the broker's Stats operation).
    Stats(stats::StatsArgs),
    /// Preflight: check this host for the broker `serve` would run with the same flags
    /// (a table, or --json); exit status 1 when any check failed.
    Doctor(doctor::DoctorArgs),
}

#[derive(Debug, Args)]
pub struct ReceiveArgs {
    pub topic: String,
    /// Queue group (created on its first receive).
    #[arg(long, value_name = "G")]
    pub group: String,
    /// Most messages to lease.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub max: u32,
    /// Lease length (default: the topic's visibility timeout).
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u32).range(1..))]
    pub visibility_ms: Option<u32>,
    /// How long to wait when nothing is available.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub wait_ms: u32,
    /// Ack every message once printed.
    #[arg(long)]
    pub ack: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

fn parse_handle(text: &str) -> Result<Handle, String> {
    text.parse()
}

#[derive(Debug, Args)]
pub struct AckArgs {
    pub topic: String,
    #[arg(long, value_name = "G")]
    pub group: String,
    /// Delivery handles as `receive` prints them: partition:offset:attempt.
    #[arg(value_name = "HANDLE", required = true, num_args = 1.., value_parser = parse_handle)]
    pub handles: Vec<Handle>,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct NackArgs {
    pub topic: String,
    #[arg(long, value_name = "G")]
    pub group: String,
    /// Deliver again after this long (0: at once); default: the topic's backoff.
    #[arg(long, value_name = "MS")]
    pub delay_ms: Option<u64>,
    /// Why it failed: kept for the dead-letter record's shardq-reason header.
    #[arg(long, value_name = "R", default_value = "")]
    pub reason: String,
    /// Delivery handles as `receive` prints them: partition:offset:attempt.
    #[arg(value_name = "HANDLE", required = true, num_args = 1.., value_parser = parse_handle)]
    pub handles: Vec<Handle>,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// One line per group of the topic: kind, partitions, lag, in flight.
    List {
        topic: String,
        #[arg(long)]
        json: bool,
    },
    /// Per partition: kind, committed offset or ack floor, in flight, waiting,
    /// dead-lettering, lag and counters.
    Describe {
        topic: String,
        /// Only this group (default: every group of the topic).
        #[arg(long, value_name = "G")]
        group: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Set a queue group's own retry delays, which win over the topic's (the group is
    /// created if it does not exist yet). A delay not given stays as it is.
    #[command(group(
        clap::ArgGroup::new("delays")
            .args(["retry_delay_ms_min", "retry_delay_ms_max"])
            .required(true)
            .multiple(true)
    ))]
    Alter {
        topic: String,
        #[arg(long, value_name = "G")]
        group: String,
        /// First retry's delay for this group.
        #[arg(long, value_name = "MS")]
        retry_delay_ms_min: Option<u64>,
        /// Cap on this group's retry delays.
        #[arg(long, value_name = "MS")]
        retry_delay_ms_max: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Per partition of the dead-letter topic: first offset, end offset, record count.
    List {
        topic: String,
        #[arg(long)]
        json: bool,
    },
    /// Print dead-lettered records as JSON lines, the shardq-* headers decoded.
    Peek {
        topic: String,
        #[arg(long, value_name = "N", default_value_t = 10)]
        max: u64,
    },
    /// Publish every dead-lettered record to its source topic again, as a new message;
    /// an interrupted redrive resumes where it stopped. Prints the count.
    Redrive { topic: String },
    /// Delete every record of the dead-letter topic. Prints the count.
    Purge { topic: String },
}

/// `shardq bench` workloads.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Producers only: throughput and ack latency.
    Produce(BenchArgs),
    /// Consumers only: read and verify what the topic holds, from the beginning.
    Consume(BenchArgs),
    /// Producers and consumers at once: adds end-to-end latency.
    E2e(BenchArgs),
    /// Hold idle connections open and measure the server's CPU use (needs --server-pid).
    Idle(BenchArgs),
    /// Fill a topic, then queue workers receive and ack (a share nacked until it is
    /// dead-lettered): acked/s and receive-to-ack latency.
    Queue(QueueBenchArgs),
}

#[derive(Debug, Args)]
pub struct QueueBenchArgs {
    #[command(flatten)]
    pub common: BenchArgs,
    /// Queue consumers, each on its own connection.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub workers: u32,
    /// Most messages one receive asks for.
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub receive_batch: u32,
    /// Handles one ack carries (a worker acks once it holds this many, or has nothing
    /// more to receive).
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub ack_batch: u32,
    /// Fraction of messages nacked on every delivery, so that they are dead-lettered.
    #[arg(long, value_name = "F", default_value_t = 0.0, value_parser = parse_fraction, allow_negative_numbers = true)]
    pub fail_rate: f64,
}

fn parse_fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if (0.0..=1.0).contains(&value) => Ok(value),
        _ => Err(format!("{text:?} is not a fraction between 0 and 1")),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Topic to use; created if missing (default: bench; bench-queue for `bench queue`).
    #[arg(long)]
    pub topic: Option<String>,
    /// Partitions of the topic when the bench creates it.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub partitions: u32,
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub producers: u32,
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub consumers: u32,
    /// Bytes per message (at least 36: the bench header).
    #[arg(long, value_name = "BYTES", default_value_t = 1024)]
    pub message_size: usize,
    /// Messages per batch (the producer's batch_records_max).
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub batch_size: u32,
    /// How long a batch may wait to fill (ignored for --batch-size 1).
    #[arg(long, value_name = "MS", default_value_t = 2)]
    pub linger_ms: u64,
    /// Largest batch in bytes; the broker accepts at most its chunk size minus 4 KiB.
    #[arg(long, value_name = "BYTES", default_value_t = shardq::bench::BROKER_BATCH_BYTES_MAX_DEFAULT)]
    pub batch_bytes_max: usize,
    #[arg(long, default_value = "durable", value_name = "none|memory|durable")]
    pub acks: Acks,
    /// Bytes each producer holds sent and not yet acked before `send` waits.
    #[arg(long, value_name = "BYTES", default_value_t = 8 << 20)]
    pub buffer_bytes_max: usize,
    /// Produce requests in flight per connection.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub requests_in_flight: usize,
    /// Batches of one partition in flight per producer (1 to 5: the broker appends them
    /// in the order they were sent).
    #[arg(long, value_name = "N", default_value_t = shardq::client::BATCHES_IN_FLIGHT_PER_PARTITION_DEFAULT)]
    pub in_flight_per_partition: usize,
    /// Stop after this many measured messages (in all).
    #[arg(long, value_name = "N", conflicts_with = "duration_s")]
    pub messages: Option<u64>,
    /// Stop after this many seconds of measurement (default 10).
    #[arg(long, value_name = "S")]
    pub duration_s: Option<f64>,
    /// Fixed rate over all producers; latency counts from each message's intended send time.
    #[arg(long, value_name = "MSGS_PER_S")]
    pub rate: Option<u64>,
    /// Seconds sent and verified but not measured, before the measurement.
    #[arg(long, value_name = "S", default_value_t = 0.0)]
    pub warmup_s: f64,
    /// Connect to each partition's owning shard on its own port.
    #[arg(long, value_enum, default_value = "on")]
    pub shard_aware: Switch,
    /// Pin client threads to these CPUs, round-robin (e.g. 1 or 0,2-3).
    #[arg(long, value_name = "LIST")]
    pub client_cpus: Option<String>,
    /// The broker's pid: report its CPU placement and use.
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,
    /// Idle workload: connections to hold open.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub connections: u32,
    /// Write the results as one JSON object.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write a latency percentile plot and throughput timeline as SVG.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
}

/// Each flag sets the config key of its name and wins over `--set`, SHARDQ_<KEY> and
/// the file; a flag not given falls through to them (hence no clap defaults here).
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub source: config::ConfigSourceArgs,
    /// Directory of the partition logs [default: ./shardq-data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Shared listening address; shard k also listens on port + 1 + k
    /// [default: 127.0.0.1:9740].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Number of shards (one per core) [default: one per CPU of --cpus, else every
    /// online CPU].
    #[arg(long, value_name = "N")]
    pub cores: Option<usize>,
    /// The CPUs the shards run on, shard k on the k-th: "2-7" or "0,2,4-6"
    /// [default: the lowest-numbered online CPUs].
    #[arg(long, value_name = "LIST", value_parser = config::parse_cpus)]
    pub cpus: Option<shardq::config::CpuList>,
    /// How long start-up retries binding an address still in use (a broker killed a
    /// moment ago leaves its sockets bound briefly); 0 fails at once [default: 10000].
    #[arg(long, value_name = "MS")]
    pub bind_retry_ms: Option<u32>,
    /// Most open client connections over all shards; more are closed at once
    /// [default: 20000].
    #[arg(long, value_name = "N")]
    pub connections_max: Option<u32>,
    /// Bytes of request frames and unwritten responses one shard's connections may
    /// hold; reading pauses at the limit [default: 134217728].
    #[arg(long, value_name = "BYTES")]
    pub shard_bytes_in_flight_max: Option<u64>,
    /// A connection with nothing sent, running or unwritten this long is closed
    /// [default: 600000].
    #[arg(long, value_name = "MS")]
    pub connection_idle_timeout_ms: Option<u32>,
    /// A client that reads none of its responses this long is disconnected
    /// [default: 30000].
    #[arg(long, value_name = "MS")]
    pub response_write_timeout_ms: Option<u32>,
    /// Where to serve /metrics (Prometheus), /health/live and /health/ready over HTTP;
    /// `off` serves nothing [default: 127.0.0.1:9749].
    #[arg(long, value_name = "ADDRESS|off", value_parser = parse_metrics_listen)]
    pub metrics_listen: Option<MetricsListen>,
    /// Log lines on stderr as `text` (timestamped; with syslog priorities and no
    /// timestamp under journald) or `json` (one object per line).
    #[arg(
        long,
        value_name = "FORMAT",
        value_enum,
        env = "SHARDQ_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: logs::LogFormat,
    /// Least level logged: error, warn, info, debug or trace (or a filter such as
    /// `info,shardq::storage=debug`); default: $SHARDQ_LOG, else info.
    #[arg(long, value_name = "LEVEL", value_parser = parse_log_level)]
    pub log_level: Option<String>,
}

fn parse_log_level(value: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::builder()
        .parse(value)
        .map(|_| value.to_owned())
        .map_err(|error| {
            format!("{value:?} is not a level (error, warn, info, debug, trace) or filter: {error}")
        })
}

/// Where `serve` listens for scrapes, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsListen(pub Option<SocketAddr>);

const METRICS_DEFAULT: &str = "127.0.0.1:9749";

fn parse_metrics_listen(value: &str) -> Result<MetricsListen, String> {
    if value == "off" {
        return Ok(MetricsListen(None));
    }
    value
        .parse()
        .map(|address| MetricsListen(Some(address)))
        .map_err(|_| format!("{value:?} is neither an address (like {METRICS_DEFAULT}) nor off"))
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Broker address.
    #[arg(
        long,
        global = true,
        env = "SHARDQ_SERVER",
        default_value = SERVER_DEFAULT,
        value_name = "HOST:PORT"
    )]
    pub server: String,
}

#[derive(Debug, Subcommand)]
pub enum TopicCommand {
    /// Create a topic.
    Create {
        name: String,
        #[arg(long, value_name = "N", default_value_t = 1)]
        partitions: u32,
        #[command(flatten)]
        retention: RetentionArgs,
        #[command(flatten)]
        queue: QueueSettingsArgs,
    },
    /// Change a topic's retention and queue settings. Retention: when either flag is
    /// given both limits are set (an omitted one means no limit); with neither it stays.
    /// Queue settings not given stay as they are.
    Alter {
        name: String,
        #[command(flatten)]
        retention: RetentionArgs,
        #[command(flatten)]
        queue: QueueSettingsArgs,
    },
    /// List topics and their partition counts.
    List {
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show a topic's partitions, the shard owning each and that shard's port.
    Describe {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a topic and its data.
    Delete { name: String },
}

#[derive(Debug, Args)]
pub struct RetentionArgs {
    /// Delete whole old segments while each partition would still hold this many bytes
    /// without them (default: no limit).
    #[arg(long, value_name = "BYTES")]
    pub retention_bytes: Option<u64>,
    /// Delete whole old segments whose last append is older than this (default: no
    /// limit).
    #[arg(long, value_name = "MS")]
    pub retention_ms: Option<u64>,
}

impl RetentionArgs {
    fn retention(&self) -> Retention {
        Retention {
            bytes_max: self.retention_bytes.unwrap_or(0),
            ms_max: self.retention_ms.unwrap_or(0),
        }
    }

    /// `None` when neither flag was given (alter leaves retention as it is).
    fn given(&self) -> Option<Retention> {
        (self.retention_bytes.is_some() || self.retention_ms.is_some()).then(|| self.retention())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExpiryPolicyArg {
    /// Settle an expired message and count it.
    Drop,
    /// Send an expired message to the dead-letter topic.
    DeadLetter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OrderingArg {
    Unordered,
    /// One message in flight per key, delivered in offset order.
    PerKey,
}

/// A topic's queue settings; each one not given takes the broker's default (create) or
/// stays as it is (alter).
#[derive(Debug, Args)]
pub struct QueueSettingsArgs {
    /// Deliveries before a failing message is dead-lettered.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_deliveries: Option<u32>,
    /// The lease a receive gets when it names none.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub visibility_ms: Option<u64>,
    /// First retry's delay.
    #[arg(long, value_name = "MS")]
    pub retry_delay_ms_min: Option<u64>,
    /// Cap on retry delays.
    #[arg(long, value_name = "MS")]
    pub retry_delay_ms_max: Option<u64>,
    /// Time to live from the append time (0: none).
    #[arg(long, value_name = "MS")]
    pub message_ttl_ms: Option<u64>,
    /// What happens to an expired message.
    #[arg(long, value_enum, value_name = "drop|dead-letter")]
    pub expiry_policy: Option<ExpiryPolicyArg>,
    /// per-key: one message in flight per key.
    #[arg(long, value_enum, value_name = "unordered|per-key")]
    pub ordering: Option<OrderingArg>,
    /// Dead-letter topic (default: <topic>.dlq).
    #[arg(long, value_name = "TOPIC")]
    pub dlq: Option<String>,
}

impl QueueSettingsArgs {
    fn settings(&self) -> QueueSettings {
        QueueSettings {
            deliveries_max: self.max_deliveries,
            visibility_timeout_ms: self.visibility_ms,
            retry_delay_ms_min: self.retry_delay_ms_min,
            retry_delay_ms_max: self.retry_delay_ms_max,
            message_ttl_ms: self.message_ttl_ms,
            expiry_policy: self.expiry_policy.map(|policy| match policy {
                ExpiryPolicyArg::Drop => ExpiryPolicy::Drop,
                ExpiryPolicyArg::DeadLetter => ExpiryPolicy::DeadLetter,
            }),
            ordering: self.ordering.map(|ordering| match ordering {
                OrderingArg::Unordered => QueueOrdering::Unordered,
                OrderingArg::PerKey => QueueOrdering::PerKey,
            }),
            dlq_topic: self.dlq.clone(),
        }
    }
}

#[derive(Debug, Args)]
pub struct ProduceArgs {
    pub topic: String,
    /// Key of every message (messages with one key go to one partition).
    #[arg(long, value_name = "K")]
    pub key: Option<String>,
    /// Send every message to this partition.
    #[arg(long, value_name = "P")]
    pub partition: Option<u32>,
    /// none: no answer from the broker, so failures cannot be reported (a warning says
    /// so); memory: acked in memory; durable: acked on disk.
    #[arg(long, default_value = "durable", value_name = "none|memory|durable")]
    pub acks: Acks,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct ConsumeArgs {
    pub topic: String,
    /// Start at the first stored message (default: only messages produced from now on).
    #[arg(long, conflicts_with_all = ["offset", "from_time"])]
    pub from_beginning: bool,
    /// Start at this offset (in every partition read).
    #[arg(long, value_name = "N", conflicts_with = "from_time")]
    pub offset: Option<u64>,
    /// Start at the first message with a timestamp at or after this time: RFC 3339
    /// (`2026-11-28T12:00:00Z`, `2026-11-28T13:00:00.5+01:00`) or milliseconds since the
    /// epoch.
    #[arg(long, value_name = "TIME", value_parser = parse_time_ms)]
    pub from_time: Option<i64>,
    /// Read only this partition (default: all).
    #[arg(long, value_name = "P")]
    pub partition: Option<u32>,
    /// Stop after this many messages.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Stop (with status 0) when no message arrives for this long.
    #[arg(long, value_name = "T")]
    pub timeout_ms: Option<u64>,
    /// One JSON object per message: partition, offset, key, timestamp_ms, value, headers
    /// (an object; strings are decoded as UTF-8, invalid bytes replaced).
    #[arg(long)]
    pub json: bool,
    /// Read for this stream group: resume from its committed offsets (the start flags
    /// apply only to partitions it never committed) and commit as messages are printed.
    #[arg(long, value_name = "G")]
    pub group: Option<String>,
    /// With --group: read from its committed offsets but commit nothing.
    #[arg(long, requires = "group")]
    pub no_commit: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// Why a command failed; printed as one line on stderr.
#[derive(Debug)]
pub enum CliError {
    /// A config that does not load or validate: nothing was started.
    Config(config::ConfigCliError),
    Client {
        context: String,
        source: ClientError,
    },
    Io {
        context: &'static str,
        source: io::Error,
    },
    UnknownTopic {
        topic: String,
    },
    Bench(shardq::bench::BenchError),
    /// Handles the broker refused to settle: one line each.
    HandlesRefused {
        operation: &'static str,
        refused: Vec<Refusal>,
    },
    /// A named group the topic does not have.
    UnknownGroup {
        topic: String,
        group: String,
    },
    /// `doctor` found failures (the table on stdout says which).
    ChecksFailed {
        failed: usize,
    },
    /// `serve` could not set up its log output.
    Logs(logs::LogSetupError),
    /// `serve` failed and said why in its log (an error event); nothing more to print.
    Logged(ServerError),
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Config(error) => write!(f, "{error}"),
            CliError::Client { context, source } => write!(f, "{context}: {}", source.report()),
            CliError::Io { context, source } => write!(f, "{context}: {source}"),
            CliError::UnknownTopic { topic } => write!(f, "topic {topic:?} does not exist"),
            CliError::Bench(error) => write!(f, "bench: {error}"),
            CliError::HandlesRefused { operation, refused } => {
                // One line per handle; `main` prefixes each line.
                for (index, refusal) in refused.iter().enumerate() {
                    if index > 0 {
                        writeln!(f)?;
                    }
                    write!(f, "{operation} refused {refusal}")?;
                }
                Ok(())
            }
            CliError::UnknownGroup { topic, group } => {
                write!(f, "topic {topic:?} has no group {group:?}")
            }
            CliError::ChecksFailed { failed } => write!(f, "doctor: {failed} checks failed"),
            CliError::Logs(error) => write!(f, "{error}"),
            CliError::Logged(error) => write!(f, "server: {error}"),
        }
    }
}

impl std::error::Error for CliError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CliError::Config(error) => Some(error),
            CliError::Client { source, .. } => Some(source),
            CliError::Io { source, .. } => Some(source),
            CliError::UnknownTopic { .. }
            | CliError::HandlesRefused { .. }
            | CliError::UnknownGroup { .. }
            | CliError::ChecksFailed { .. } => None,
            CliError::Bench(error) => Some(error),
            CliError::Logs(error) => Some(error),
            CliError::Logged(error) => Some(error),
        }
    }
}

/// Wraps a client error with what we were doing.
fn client_context(context: impl Into<String>) -> impl FnOnce(ClientError) -> CliError {
    let context = context.into();
    move |source| CliError::Client { context, source }
}

pub fn main() -> ExitCode {
    // Clap exits with 2 on usage errors and 0 for --help/--version.
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Logged(_)) => ExitCode::FAILURE,
        Err(error) => {
            // `serve` set up its log output before reading its config: its errors are
            // log events there (JSON, journald); every other command prints them.
            if tracing::dispatcher::has_been_set() {
                tracing::error!("{error}");
            } else {
                for line in error.to_string().lines() {
                    eprintln!("shardq: {line}");
                }
            }
            ExitCode::FAILURE
        }
    }
}

pub fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Serve(args) => {
            logs::init(args.log_format, args.log_level.as_deref()).map_err(CliError::Logs)?;
            let config = config::serve_config(args)?;
            // A failure to start (or to wait for signals) is an error event like any
            // other, so journald and JSON readers see it with its level.
            shardq::server::run_until_signal(config).map_err(|error| {
                tracing::error!(error = %error, "serve failed: {error}");
                CliError::Logged(error)
            })
        }
        Command::Config(command) => config::config(command),
        // The bench runs its own multi-thread runtime and producer threads.
        Command::Bench(command) => bench(command),
        // Synchronous: it checks the host, it talks to no broker.
        Command::Doctor(args) => doctor::run(args),
        command => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| CliError::Io {
                    context: "starting the tokio runtime",
                    source,
                })?;
            runtime.block_on(run_client_command(command))
        }
    }
}

async fn run_client_command(command: Command) -> Result<(), CliError> {
    match command {
        Command::Serve(_) | Command::Config(_) | Command::Bench(_) | Command::Doctor(_) => {
            unreachable!("serve, config, bench and doctor do not run on this runtime")
        }
        Command::Topic { server, command } => {
            let client = connect(&server).await?;
            topic(&client, command).await
        }
        Command::Produce(args) => {
            let client = connect(&args.server).await?;
            produce(client, args).await
        }
        Command::Consume(args) => {
            let client = connect(&args.server).await?;
            consume(client, args).await
        }
        Command::Receive(args) => {
            let client = connect(&args.server).await?;
            queue::receive(client, args).await
        }
        Command::Ack(args) => {
            let client = connect(&args.server).await?;
            queue::ack(client, args).await
        }
        Command::Nack(args) => {
            let client = connect(&args.server).await?;
            queue::nack(client, args).await
        }
        Command::Group { server, command } => {
            let client = connect(&server).await?;
            queue::group(&client, command).await
        }
        Command::Dlq { server, command } => {
            let client = connect(&server).await?;
            queue::dlq(client, command).await
        }
        Command::Stats(args) => stats::run(args).await,
    }
}

async fn connect(server: &ServerArgs) -> Result<Client, CliError> {
    Client::connect(server.server.as_str())
        .await
        .map_err(client_context("connecting to the broker"))
}

fn write_stdout(text: &str) -> Result<(), CliError> {
    let mut stdout = io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|source| CliError::Io {
            context: "writing to standard output",
            source,
        })
}

async fn topic(client: &Client, command: TopicCommand) -> Result<(), CliError> {
    match command {
        TopicCommand::Create {
            name,
            partitions,
            retention,
            queue,
        } => client
            .create_topic_with_queue(&name, partitions, retention.retention(), queue.settings())
            .await
            .map_err(client_context(format!("creating topic {name:?}"))),
        TopicCommand::Alter {
            name,
            retention,
            queue,
        } => client
            .alter_topic_with(&name, retention.given(), queue.settings())
            .await
            .map_err(client_context(format!("altering topic {name:?}"))),
        TopicCommand::Delete { name } => client
            .delete_topic(&name)
            .await
            .map_err(client_context(format!("deleting topic {name:?}"))),
        TopicCommand::List { json } => {
            let metadata = client
                .metadata(&[])
                .await
                .map_err(client_context("listing topics"))?;
            let mut topics: Vec<(String, usize)> = metadata
                .topics
                .into_iter()
                .filter(|topic| topic.error.is_none())
                .map(|topic| (topic.name, topic.partitions.len()))
                .collect();
            topics.sort();
            let text = if json {
                let list: Vec<_> = topics
                    .iter()
                    .map(|(name, partitions)| json!({ "name": name, "partitions": partitions }))
                    .collect();
                format!("{}\n", json!({ "topics": list }))
            } else {
                topics
                    .iter()
                    .map(|(name, partitions)| format!("{name}\tpartitions={partitions}\n"))
                    .collect()
            };
            write_stdout(&text)
        }
        TopicCommand::Describe { name, json } => {
            let metadata = client
                .metadata(&[name.as_str()])
                .await
                .map_err(client_context(format!("describing topic {name:?}")))?;
            let topic = metadata
                .topics
                .iter()
                .find(|topic| topic.name == name)
                .ok_or_else(|| CliError::UnknownTopic {
                    topic: name.clone(),
                })?;
            if let Some(error) = &topic.error {
                return Err(CliError::Client {
                    context: format!("describing topic {name:?}"),
                    source: ClientError::Broker(error.clone()),
                });
            }
            let port_of = |shard: u16| metadata.shard_ports.get(usize::from(shard)).copied();
            // A broker older than the Stats operation answers unknown_opcode: describe
            // what it can without the figures.
            let figures = match client.stats(&[name.as_str()]).await {
                Ok(figures) => figures,
                Err(ClientError::Broker(error))
                    if error.code == shardq::protocol::ErrorCode::UnknownOpcode =>
                {
                    shardq::protocol::StatsResponse::default()
                }
                Err(error) => {
                    let context = format!("reading the stats of topic {name:?}");
                    return Err(client_context(context)(error));
                }
            };
            let figures_of = |partition: u32| stats::partition_figures(&figures, &name, partition);
            let text = if json {
                let partitions: Vec<_> = topic
                    .partitions
                    .iter()
                    .map(|partition| {
                        let mut value = json!({
                            "partition": partition.partition,
                            "shard": partition.shard,
                            "port": port_of(partition.shard),
                        });
                        if let Some(Value::Object(figures)) = figures_of(partition.partition) {
                            value
                                .as_object_mut()
                                .expect("built as an object")
                                .extend(figures);
                        }
                        value
                    })
                    .collect();
                format!(
                    "{}\n",
                    json!({
                        "name": name,
                        "partitions": partitions,
                        "shard_ports": metadata.shard_ports,
                        "retention_bytes": topic.retention.bytes_max,
                        "retention_ms": topic.retention.ms_max,
                        "queue": queue::settings_json(&name, &topic.queue),
                    })
                )
            } else {
                let limit = |value: u64| {
                    if value == 0 {
                        "none".to_owned()
                    } else {
                        value.to_string()
                    }
                };
                let mut text = format!(
                    "topic {name}: {} partitions, retention bytes {} ms {}\n",
                    topic.partitions.len(),
                    limit(topic.retention.bytes_max),
                    limit(topic.retention.ms_max)
                );
                text.push_str(&queue::settings_text(&name, &topic.queue));
                text.push('\n');
                for partition in &topic.partitions {
                    let port = port_of(partition.shard)
                        .map_or_else(|| "unknown".to_owned(), |port| port.to_string());
                    text.push_str(&format!(
                        "partition {}\tshard {}\tport {port}",
                        partition.partition, partition.shard
                    ));
                    if let Some(figures) = figures_of(partition.partition) {
                        text.push_str(&format!(
                            "\tstart {}\tend {}\tdurable {}\tbytes {}\tsegments {}",
                            figures["log_start_offset"],
                            figures["log_end_offset"],
                            figures["high_watermark"],
                            figures["bytes"],
                            figures["segments"]
                        ));
                    }
                    text.push('\n');
                }
                text
            };
            write_stdout(&text)
        }
    }
}

/// Parses RFC 3339 (`YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`) or plain epoch
/// milliseconds into milliseconds since the epoch.
pub fn parse_time_ms(text: &str) -> Result<i64, String> {
    if let Ok(milliseconds) = text.parse::<i64>() {
        return Ok(milliseconds);
    }
    let invalid =
        || format!("{text:?} is neither RFC 3339 (2026-11-28T12:00:00Z) nor epoch milliseconds");
    let bytes = text.as_bytes();
    if bytes.len() < 20
        || bytes[4] != b'-'
        || bytes[7] != b'-'
        || !matches!(bytes[10], b'T' | b't' | b' ')
        || bytes[13] != b':'
        || bytes[16] != b':'
    {
        return Err(invalid());
    }
    let number = |range: std::ops::Range<usize>| -> Result<i64, String> {
        text.get(range)
            .filter(|digits| digits.bytes().all(|byte| byte.is_ascii_digit()))
            .and_then(|digits| digits.parse().ok())
            .ok_or_else(invalid)
    };
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return Err(invalid());
    }
    let mut rest = &text[19..];
    let mut milliseconds = 0i64;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(invalid());
        }
        let padded = format!("{:0<3}", &fraction[..digits.min(3)]);
        milliseconds = padded.parse().map_err(|_| invalid())?;
        rest = &fraction[digits..];
    }
    let offset_minutes = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6
            && matches!(rest.as_bytes()[0], b'+' | b'-')
            && rest.as_bytes()[3] == b':' =>
        {
            let hours: i64 = rest[1..3].parse().map_err(|_| invalid())?;
            let minutes: i64 = rest[4..6].parse().map_err(|_| invalid())?;
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            sign * (hours * 60 + minutes)
        }
        _ => return Err(invalid()),
    };
    // Days from the civil date (Howard Hinnant's algorithm), proleptic Gregorian.
    let shifted_year = if month <= 2 { year - 1 } else { year };
    let era = shifted_year.div_euclid(400);
    let year_of_era = shifted_year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    let seconds = days * 86_400 + hour * 3_600 + minute * 60 + second - offset_minutes * 60;
    Ok(seconds * 1_000 + milliseconds)
}

async fn produce(client: Client, args: ProduceArgs) -> Result<(), CliError> {
    let topic = args.topic;
    let failed = || client_context(format!("producing to topic {topic:?}"));
    if args.acks == Acks::None {
        eprintln!(
            "shardq: warning: --acks none: the broker sends no answer, so a message it refuses or fails to store is lost without an error here (the broker only logs it)"
        );
    }
    let config = ProducerConfig::builder()
        .acks(args.acks)
        .build()
        .map_err(failed())?;
    let producer = Producer::new(client, config).map_err(failed())?;
    let key = args.key.map(Bytes::from);
    let mut input = tokio::io::BufReader::new(tokio::io::stdin());
    let mut line = Vec::new();
    let mut handles: VecDeque<Pending> = VecDeque::new();
    loop {
        line.clear();
        let read = input
            .read_until(b'\n', &mut line)
            .await
            .map_err(|source| CliError::Io {
                context: "reading standard input",
                source,
            })?;
        if read == 0 {
            break;
        }
        // A line ends at "\n" or "\r\n"; neither is part of the message.
        if line.last() == Some(&b'\n') {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
        }
        let record = ProducerRecord {
            key: key.clone(),
            value: Bytes::copy_from_slice(&line),
            headers: Vec::new(),
            partition: args.partition,
        };
        handles.push_back(if args.acks == Acks::None {
            let sent = producer.send_unacknowledged(&topic, record).await;
            Pending::Unacknowledged(sent.map_err(failed())?)
        } else {
            Pending::Acknowledged(producer.send(&topic, record).await.map_err(failed())?)
        });
        // Stop at the first refusal rather than reading on, and keep memory bounded.
        while let Some(front) = handles.front() {
            match front.try_result() {
                Some(Ok(_)) => {
                    handles.pop_front();
                }
                Some(Err(error)) => return Err(failed()(error)),
                None if handles.len() > PRODUCE_HANDLES_MAX => {
                    let oldest = handles.pop_front().expect("front exists");
                    oldest.wait().await.map_err(failed())?;
                }
                None => break,
            }
        }
    }
    producer.close().await.map_err(failed())?;
    for handle in handles {
        handle.wait().await.map_err(failed())?;
    }
    Ok(())
}

fn bench(command: BenchCommand) -> Result<(), CliError> {
    use shardq::bench::QueueBenchConfig;
    use shardq::bench::{BenchConfig, BenchError, Stop, Workload};
    let (workload, args, queue) = match command {
        BenchCommand::Produce(args) => (Workload::Produce, args, None),
        BenchCommand::Consume(args) => (Workload::Consume, args, None),
        BenchCommand::E2e(args) => (Workload::EndToEnd, args, None),
        BenchCommand::Idle(args) => (Workload::Idle, args, None),
        BenchCommand::Queue(args) => {
            let queue = QueueBenchConfig {
                workers: args.workers,
                receive_batch: args.receive_batch,
                ack_batch: args.ack_batch,
                fail_rate: args.fail_rate,
            };
            (Workload::Queue, args.common, Some(queue))
        }
    };
    let topic = args.topic.clone().unwrap_or_else(|| {
        if workload == Workload::Queue {
            "bench-queue".into()
        } else {
            "bench".into()
        }
    });
    let invalid = |text: String| CliError::Bench(BenchError::Config(text));
    let client_cpus = match &args.client_cpus {
        Some(list) => shardq::bench::parse_cpu_list(list).map_err(invalid)?,
        None => Vec::new(),
    };
    let seconds = |value: f64, flag: &str| {
        if value.is_finite() && value >= 0.0 {
            Ok(Duration::from_secs_f64(value))
        } else {
            Err(invalid(format!(
                "{flag} must be a non-negative number of seconds"
            )))
        }
    };
    let stop = match (args.messages, args.duration_s) {
        (Some(messages), _) => Stop::Messages(messages),
        (None, Some(duration)) => Stop::Duration(seconds(duration, "--duration-s")?),
        (None, None) => Stop::Duration(Duration::from_secs(10)),
    };
    let config = BenchConfig {
        workload,
        server: args.server.server,
        topic,
        partitions: args.partitions,
        producers: args.producers,
        consumers: args.consumers,
        message_size: args.message_size,
        batch_size: args.batch_size,
        linger_ms: args.linger_ms,
        batch_bytes_max: args.batch_bytes_max,
        acks: args.acks,
        buffer_bytes_max: args.buffer_bytes_max,
        requests_in_flight_max: args.requests_in_flight,
        batches_in_flight_per_partition_max: args.in_flight_per_partition,
        stop,
        rate_per_s: args.rate,
        warmup: seconds(args.warmup_s, "--warmup-s")?,
        shard_aware: args.shard_aware == Switch::On,
        client_cpus,
        server_pid: args.server_pid,
        idle_connections: args.connections,
        progress: !args.quiet,
        queue: queue.unwrap_or_default(),
    };
    let outcome = shardq::bench::run(config).map_err(CliError::Bench)?;
    let report = &outcome.report;
    write_stdout(&report.summary())?;
    let write_file = |path: &PathBuf, text: String| {
        std::fs::write(path, text).map_err(|source| {
            CliError::Bench(BenchError::Io {
                context: format!("writing {}", path.display()),
                source,
            })
        })
    };
    if let Some(path) = &args.json {
        write_file(path, format!("{:#}\n", report.to_json()))?;
    }
    if let Some(path) = &args.plot {
        write_file(
            path,
            shardq::bench::plot::render(report, &outcome.produce_latency, &outcome.e2e_latency),
        )?;
    }
    Ok(())
}

/// One line of `consume --json`.
pub fn record_json(consumed: &ConsumedRecord) -> serde_json::Value {
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    let record = consumed.record();
    let headers: serde_json::Map<String, serde_json::Value> = record
        .headers
        .iter()
        .map(|(name, value)| (name.clone(), serde_json::Value::String(text(value))))
        .collect();
    json!({
        "partition": consumed.partition(),
        "offset": record.offset,
        "key": record.key.as_deref().map(text),
        "timestamp_ms": record.timestamp_ms,
        "value": text(&record.value),
        "headers": headers,
    })
}

async fn consume(client: Client, args: ConsumeArgs) -> Result<(), CliError> {
    let topic = args.topic;
    let failed = || client_context(format!("consuming topic {topic:?}"));
    let start = match (args.from_beginning, args.offset, args.from_time) {
        (true, _, _) => StartPosition::Beginning,
        (false, Some(offset), _) => StartPosition::Offset(offset),
        (false, None, Some(timestamp_ms)) => StartPosition::Time(timestamp_ms),
        (false, None, None) => StartPosition::End,
    };
    let mut config = ConsumerConfig::default();
    if let Some(group) = &args.group {
        // Commits are made explicitly, after the output is written.
        config = config.with_group(group, None);
    }
    let commits = args.group.is_some() && !args.no_commit;
    let mut consumer = Consumer::new(client, config).map_err(failed())?;
    match args.partition {
        Some(partition) => {
            consumer
                .assign_from(&topic, partition, start)
                .await
                .map_err(failed())?;
        }
        None => {
            consumer
                .assign_topic(&topic, start)
                .await
                .map_err(failed())?;
        }
    }
    let timeout = args.timeout_ms.map(Duration::from_millis);
    let mut remaining = args.count;
    let mut last_message_at = Instant::now();
    let mut output = Vec::new();
    // Stop only after a poll that found nothing: `--timeout-ms 0` means "everything that
    // is there now", however many polls that takes.
    let mut last_poll_empty = false;
    while remaining != Some(0) {
        let wait = match timeout {
            Some(timeout) => {
                let quiet = last_message_at.elapsed();
                if quiet >= timeout && last_poll_empty {
                    break;
                }
                timeout
                    .saturating_sub(quiet)
                    .min(Duration::from_millis(CONSUME_WAIT_MS_MAX))
            }
            None => Duration::from_millis(CONSUME_WAIT_MS_MAX),
        };
        let records = consumer
            .poll_with_wait(wait.as_millis() as u32)
            .await
            .map_err(failed())?;
        last_poll_empty = records.is_empty();
        if records.is_empty() {
            continue;
        }
        last_message_at = Instant::now();
        output.clear();
        for (index, consumed) in records.iter().enumerate() {
            if remaining == Some(0) {
                // `--count` reached: what was not printed is not committed either.
                if commits {
                    rewind_to_unprinted(&mut consumer, &records[index..]);
                }
                break;
            }
            if args.json {
                output.extend_from_slice(record_json(consumed).to_string().as_bytes());
            } else {
                output.extend_from_slice(consumed.value());
            }
            output.push(b'\n');
            remaining = remaining.map(|count| count - 1);
        }
        let mut stdout = io::stdout().lock();
        match stdout.write_all(&output).and_then(|()| stdout.flush()) {
            Ok(()) => {}
            // The reader went away (`consume | head`): that is the end, not a failure.
            Err(error) if error.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
            Err(source) => {
                return Err(CliError::Io {
                    context: "writing to standard output",
                    source,
                })
            }
        }
        if commits {
            consumer.commit().await.map_err(failed())?;
        }
    }
    Ok(())
}

/// Moves each partition's position back to its first record in `unprinted`, so that a
/// commit covers exactly what was printed.
fn rewind_to_unprinted(consumer: &mut Consumer, unprinted: &[ConsumedRecord]) {
    let mut rewound: Vec<(&str, u32)> = Vec::new();
    for consumed in unprinted {
        let key = (consumed.topic(), consumed.partition());
        if !rewound.contains(&key) {
            consumer.assign(key.0, key.1, consumed.offset());
            rewound.push(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardq::config::ServerConfig;

    #[test]
    fn times_parse_as_rfc3339_or_epoch_milliseconds() {
        // Reference values computed with Python's datetime.
        assert_eq!(parse_time_ms("2026-11-28T12:00:00Z"), Ok(1_795_867_200_000));
        assert_eq!(
            parse_time_ms("2026-11-28T13:00:00.5+01:00"),
            Ok(1_795_867_200_500)
        );
        assert_eq!(parse_time_ms("1969-12-31T23:59:59Z"), Ok(-1_000));
        assert_eq!(
            parse_time_ms("2024-02-29T00:00:00-05:30"),
            Ok(1_709_184_600_000)
        );
        assert_eq!(parse_time_ms("1795867200000"), Ok(1_795_867_200_000));
        for bad in [
            "2026-13-01T00:00:00Z",
            "2026-11-28 12:00",
            "yesterday",
            "2026-11-28T12:00:00",
            "2026-11-28T12:00:00.Z",
        ] {
            assert!(parse_time_ms(bad).is_err(), "{bad}");
        }
    }
    use clap::error::ErrorKind;

    fn parse(arguments: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("shardq").chain(arguments.iter().copied()))
    }

    #[test]
    fn serve_defaults_and_flags() {
        let serve = |arguments: &[&str]| {
            let Command::Serve(args) = parse(arguments).unwrap().command else {
                panic!("expected serve")
            };
            args
        };
        // A flag not given is None, so that the file and SHARDQ_<KEY> can set the key;
        // the defaults then come from serve_defaults (unless the test environment sets
        // SHARDQ_* keys).
        let args = serve(&["serve"]);
        assert_eq!(args.data_dir, None);
        assert_eq!(args.connections_max, None);
        assert_eq!(args.metrics_listen, None);
        if !std::env::vars().any(|(name, _)| name.starts_with("SHARDQ_")) {
            let resolved = config::serve_config(args).unwrap();
            assert_eq!(resolved.data_dir, PathBuf::from("./shardq-data"));
            assert_eq!(resolved.listen, "127.0.0.1:9740".parse().unwrap());
            assert_eq!(resolved.cores, None);
            assert_eq!(
                resolved.metrics_listen,
                Some("127.0.0.1:9749".parse().unwrap())
            );
            assert_eq!(
                resolved.connections_max,
                ServerConfig::default().connections_max
            );
        }
        let args = serve(&["serve", "--metrics-listen", "off"]);
        assert_eq!(args.metrics_listen, Some(MetricsListen(None)));
        let error = parse(&["serve", "--metrics-listen", "of"]).unwrap_err();
        assert!(error.to_string().contains("neither an address"), "{error}");
        let args = serve(&[
            "serve",
            "--data-dir",
            "/d",
            "--listen",
            "0.0.0.0:1",
            "--cores",
            "3",
            "--cpus",
            "0,2-3",
        ]);
        assert_eq!(args.data_dir, Some(PathBuf::from("/d")));
        assert_eq!(args.listen.unwrap().port(), 1);
        assert_eq!(args.cores, Some(3));
        assert_eq!(args.cpus.unwrap().cpus(), &[0, 2, 3]);
        assert_eq!(
            parse(&["serve", "--listen", "nowhere"]).unwrap_err().kind(),
            ErrorKind::ValueValidation
        );
        let error = parse(&["serve", "--cpus", "3-1"]).unwrap_err();
        assert!(error.to_string().contains("runs backwards"), "{error}");
    }

    #[test]
    fn topic_subcommands_take_server_before_or_after() {
        let Command::Topic { server, command } =
            parse(&["topic", "create", "orders", "--partitions", "4"])
                .unwrap()
                .command
        else {
            panic!("expected topic")
        };
        assert_eq!(command_name(&command), "create");
        assert!(
            matches!(command, TopicCommand::Create { ref name, partitions: 4, .. } if name == "orders")
        );
        // Unless SHARDQ_SERVER is set in the test environment, the default applies.
        if std::env::var_os("SHARDQ_SERVER").is_none() {
            assert_eq!(server.server, SERVER_DEFAULT);
        }
        for arguments in [
            &["topic", "--server", "h:1", "describe", "t", "--json"][..],
            &["topic", "describe", "t", "--json", "--server", "h:1"][..],
        ] {
            let Command::Topic { server, command } = parse(arguments).unwrap().command else {
                panic!("expected topic")
            };
            assert_eq!(server.server, "h:1");
            assert!(matches!(command, TopicCommand::Describe { json: true, .. }));
        }
        assert!(matches!(
            parse(&["topic", "list"]).unwrap().command,
            Command::Topic {
                command: TopicCommand::List { json: false },
                ..
            }
        ));
        assert!(matches!(
            parse(&["topic", "delete", "t"]).unwrap().command,
            Command::Topic {
                command: TopicCommand::Delete { .. },
                ..
            }
        ));
    }

    fn command_name(command: &TopicCommand) -> &'static str {
        match command {
            TopicCommand::Create { .. } => "create",
            TopicCommand::Alter { .. } => "alter",
            TopicCommand::List { .. } => "list",
            TopicCommand::Describe { .. } => "describe",
            TopicCommand::Delete { .. } => "delete",
        }
    }

    #[test]
    fn produce_acks_parse_and_default_to_durable() {
        let Command::Produce(args) = parse(&["produce", "t"]).unwrap().command else {
            panic!("expected produce")
        };
        assert_eq!(args.acks, Acks::Durable);
        assert_eq!(args.key, None);
        let Command::Produce(args) = parse(&[
            "produce",
            "t",
            "--acks",
            "none",
            "--key",
            "k",
            "--partition",
            "2",
        ])
        .unwrap()
        .command
        else {
            panic!("expected produce")
        };
        assert_eq!(args.acks, Acks::None);
        assert_eq!(args.key.as_deref(), Some("k"));
        assert_eq!(args.partition, Some(2));
        let error = parse(&["produce", "t", "--acks", "sometimes"]).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::ValueValidation);
        assert_eq!(error.exit_code(), 2);
    }

    #[test]
    fn consume_flags_and_conflicts() {
        let Command::Consume(args) = parse(&[
            "consume",
            "t",
            "--from-beginning",
            "--partition",
            "1",
            "--count",
            "5",
            "--timeout-ms",
            "250",
            "--json",
            "--server",
            "h:2",
        ])
        .unwrap()
        .command
        else {
            panic!("expected consume")
        };
        assert!(args.from_beginning && args.json);
        assert_eq!(
            (args.partition, args.count, args.timeout_ms),
            (Some(1), Some(5), Some(250))
        );
        assert_eq!(args.server.server, "h:2");
        let error = parse(&["consume", "t", "--from-beginning", "--offset", "3"]).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::ArgumentConflict);
        assert_eq!(
            parse(&["consume"]).unwrap_err().kind(),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            parse(&["consume", "t", "--count", "-1"])
                .unwrap_err()
                .exit_code(),
            2
        );
    }

    #[test]
    fn serve_has_no_server_flag() {
        assert_eq!(
            parse(&["serve", "--server", "h:1"]).unwrap_err().kind(),
            ErrorKind::UnknownArgument
        );
    }

    #[test]
    fn json_line_has_every_field_and_is_lossy() {
        let consumed = ConsumedRecord::new(
            "t",
            2,
            shardq::client::Record {
                offset: 7,
                timestamp_ms: 1_000,
                key: Some(Bytes::from_static(b"k\xff")),
                value: Bytes::from_static(b"hello"),
                headers: vec![("h".into(), Bytes::from_static(b"v"))],
            },
        );
        assert_eq!(
            record_json(&consumed),
            json!({
                "partition": 2,
                "offset": 7,
                "key": "k\u{fffd}",
                "timestamp_ms": 1_000,
                "value": "hello",
                "headers": { "h": "v" },
            })
        );
    }

    #[test]
    fn receive_flags_defaults_and_bad_values() {
        let Command::Receive(args) = parse(&["receive", "orders", "--group", "billing"])
            .unwrap()
            .command
        else {
            panic!("expected receive")
        };
        assert_eq!(
            (args.topic.as_str(), args.group.as_str()),
            ("orders", "billing")
        );
        assert_eq!(
            (args.max, args.visibility_ms, args.wait_ms, args.ack),
            (1, None, 1000, false)
        );
        let Command::Receive(args) = parse(&[
            "receive",
            "orders",
            "--group",
            "billing",
            "--max",
            "10",
            "--visibility-ms",
            "5000",
            "--wait-ms",
            "0",
            "--ack",
        ])
        .unwrap()
        .command
        else {
            panic!("expected receive")
        };
        assert_eq!(
            (args.max, args.visibility_ms, args.wait_ms, args.ack),
            (10, Some(5000), 0, true)
        );
        assert_eq!(
            parse(&["receive", "orders"]).unwrap_err().kind(),
            ErrorKind::MissingRequiredArgument
        );
        for bad in [
            &["receive", "t", "--group", "g", "--max", "0"][..],
            &["receive", "t", "--group", "g", "--visibility-ms", "0"][..],
            &["receive", "t", "--group", "g", "--wait-ms", "-1"][..],
        ] {
            let error = parse(bad).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn ack_and_nack_parse_handles_and_name_a_bad_one() {
        let Command::Ack(args) = parse(&["ack", "orders", "--group", "g", "0:17:1", "3:4:2"])
            .unwrap()
            .command
        else {
            panic!("expected ack")
        };
        assert_eq!(
            args.handles,
            vec![
                Handle {
                    partition: 0,
                    offset: 17,
                    attempt: 1
                },
                Handle {
                    partition: 3,
                    offset: 4,
                    attempt: 2
                }
            ]
        );
        let error = parse(&["ack", "orders", "--group", "g", "0:17:1", "0:x:1"]).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::ValueValidation);
        let text = error.to_string();
        assert!(text.contains("0:x:1") && text.contains("offset"), "{text}");
        assert!(parse(&["ack", "orders", "--group", "g", "0:1:0"])
            .unwrap_err()
            .to_string()
            .contains("attempts count from 1"));
        assert_eq!(
            parse(&["ack", "orders", "--group", "g"])
                .unwrap_err()
                .kind(),
            ErrorKind::MissingRequiredArgument
        );
        let Command::Nack(args) = parse(&["nack", "orders", "--group", "g", "1:2:3"])
            .unwrap()
            .command
        else {
            panic!("expected nack")
        };
        assert_eq!((args.delay_ms, args.reason.as_str()), (None, ""));
        let Command::Nack(args) = parse(&[
            "nack",
            "orders",
            "--group",
            "g",
            "--delay-ms",
            "0",
            "--reason",
            "db down",
            "1:2:3",
        ])
        .unwrap()
        .command
        else {
            panic!("expected nack")
        };
        assert_eq!((args.delay_ms, args.reason.as_str()), (Some(0), "db down"));
        assert_eq!(
            parse(&[
                "nack",
                "orders",
                "--group",
                "g",
                "--delay-ms",
                "soon",
                "1:2:3"
            ])
            .unwrap_err()
            .kind(),
            ErrorKind::ValueValidation
        );
    }

    #[test]
    fn group_and_dlq_subcommands() {
        let Command::Group { command, server } = parse(&[
            "group", "describe", "orders", "--group", "billing", "--json", "--server", "h:3",
        ])
        .unwrap()
        .command
        else {
            panic!("expected group")
        };
        assert_eq!(server.server, "h:3");
        assert!(matches!(
            command,
            GroupCommand::Describe { ref topic, group: Some(ref group), json: true }
                if topic == "orders" && group == "billing"
        ));
        let Command::Group { command, .. } = parse(&[
            "group",
            "alter",
            "orders",
            "--group",
            "billing",
            "--retry-delay-ms-max",
            "20",
        ])
        .unwrap()
        .command
        else {
            panic!("expected group")
        };
        assert!(matches!(
            command,
            GroupCommand::Alter {
                ref topic,
                ref group,
                retry_delay_ms_min: None,
                retry_delay_ms_max: Some(20),
            } if topic == "orders" && group == "billing"
        ));
        // Nothing to set, or no group: clap says what is missing.
        let error = parse(&["group", "alter", "orders", "--group", "billing"]).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::MissingRequiredArgument);
        assert!(
            error.to_string().contains("--retry-delay-ms-min"),
            "{error}"
        );
        let error = parse(&["group", "alter", "orders", "--retry-delay-ms-min", "5"]).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::MissingRequiredArgument);
        assert!(error.to_string().contains("--group"), "{error}");
        assert!(matches!(
            parse(&["group", "list", "orders"]).unwrap().command,
            Command::Group {
                command: GroupCommand::List { json: false, .. },
                ..
            }
        ));
        assert!(matches!(
            parse(&["dlq", "peek", "orders"]).unwrap().command,
            Command::Dlq {
                command: DlqCommand::Peek { max: 10, .. },
                ..
            }
        ));
        assert!(matches!(
            parse(&["dlq", "peek", "orders", "--max", "3"])
                .unwrap()
                .command,
            Command::Dlq {
                command: DlqCommand::Peek { max: 3, .. },
                ..
            }
        ));
        for command in ["list", "redrive", "purge"] {
            assert!(parse(&["dlq", command, "orders"]).is_ok(), "{command}");
            assert_eq!(
                parse(&["dlq", command]).unwrap_err().kind(),
                ErrorKind::MissingRequiredArgument,
                "{command}"
            );
        }
        assert_eq!(
            parse(&["dlq", "replay", "orders"]).unwrap_err().kind(),
            ErrorKind::InvalidSubcommand
        );
        assert_eq!(
            parse(&["group", "describe", "orders", "--group"])
                .unwrap_err()
                .kind(),
            ErrorKind::InvalidValue
        );
    }

    #[test]
    fn topic_queue_flags_fill_queue_settings() {
        let Command::Topic { command, .. } = parse(&[
            "topic",
            "create",
            "orders",
            "--max-deliveries",
            "5",
            "--visibility-ms",
            "30000",
            "--retry-delay-ms-min",
            "100",
            "--retry-delay-ms-max",
            "9000",
            "--message-ttl-ms",
            "60000",
            "--expiry-policy",
            "dead-letter",
            "--ordering",
            "per-key",
            "--dlq",
            "dead",
        ])
        .unwrap()
        .command
        else {
            panic!("expected topic")
        };
        let TopicCommand::Create {
            queue, retention, ..
        } = command
        else {
            panic!("expected create")
        };
        assert_eq!(
            queue.settings(),
            QueueSettings {
                deliveries_max: Some(5),
                visibility_timeout_ms: Some(30_000),
                retry_delay_ms_min: Some(100),
                retry_delay_ms_max: Some(9_000),
                message_ttl_ms: Some(60_000),
                expiry_policy: Some(ExpiryPolicy::DeadLetter),
                ordering: Some(QueueOrdering::PerKey),
                dlq_topic: Some("dead".into()),
            }
        );
        assert_eq!(retention.given(), None);
        let Command::Topic { command, .. } = parse(&[
            "topic",
            "alter",
            "orders",
            "--ordering",
            "unordered",
            "--expiry-policy",
            "drop",
        ])
        .unwrap()
        .command
        else {
            panic!("expected topic")
        };
        let TopicCommand::Alter {
            queue, retention, ..
        } = command
        else {
            panic!("expected alter")
        };
        assert_eq!(
            retention.given(),
            None,
            "alter without retention flags keeps it"
        );
        let settings = queue.settings();
        assert_eq!(settings.ordering, Some(QueueOrdering::Unordered));
        assert_eq!(settings.expiry_policy, Some(ExpiryPolicy::Drop));
        assert_eq!(settings.deliveries_max, None);
        let Command::Topic { command, .. } =
            parse(&["topic", "alter", "orders", "--retention-ms", "5"])
                .unwrap()
                .command
        else {
            panic!("expected topic")
        };
        let TopicCommand::Alter { retention, .. } = command else {
            panic!("expected alter")
        };
        assert_eq!(
            retention.given(),
            Some(Retention {
                bytes_max: 0,
                ms_max: 5
            })
        );
        for (bad, flag) in [
            (
                &["topic", "create", "t", "--max-deliveries", "0"][..],
                "--max-deliveries",
            ),
            (
                &["topic", "create", "t", "--visibility-ms", "0"][..],
                "--visibility-ms",
            ),
            (
                &["topic", "create", "t", "--expiry-policy", "keep"][..],
                "--expiry-policy",
            ),
            (
                &["topic", "create", "t", "--ordering", "per_key"][..],
                "--ordering",
            ),
            (
                &["topic", "alter", "t", "--retry-delay-ms-min", "x"][..],
                "--retry-delay-ms-min",
            ),
        ] {
            let error = parse(bad).unwrap_err();
            assert!(
                matches!(
                    error.kind(),
                    ErrorKind::ValueValidation | ErrorKind::InvalidValue
                ),
                "{bad:?}: {:?}",
                error.kind()
            );
            assert_eq!(error.exit_code(), 2);
            assert!(error.to_string().contains(flag), "{bad:?}: {error}");
        }
    }

    #[test]
    fn consume_group_and_no_commit() {
        let Command::Consume(args) = parse(&["consume", "t", "--group", "readers"])
            .unwrap()
            .command
        else {
            panic!("expected consume")
        };
        assert_eq!(
            (args.group.as_deref(), args.no_commit),
            (Some("readers"), false)
        );
        let Command::Consume(args) = parse(&[
            "consume",
            "t",
            "--group",
            "readers",
            "--no-commit",
            "--from-beginning",
        ])
        .unwrap()
        .command
        else {
            panic!("expected consume")
        };
        assert!(args.no_commit && args.from_beginning);
        assert_eq!(
            parse(&["consume", "t", "--no-commit"]).unwrap_err().kind(),
            ErrorKind::MissingRequiredArgument
        );
    }

    #[test]
    fn bench_queue_flags_and_limits() {
        let Command::Bench(BenchCommand::Queue(args)) = parse(&["bench", "queue"]).unwrap().command
        else {
            panic!("expected bench queue")
        };
        assert_eq!(
            (
                args.workers,
                args.receive_batch,
                args.ack_batch,
                args.fail_rate
            ),
            (4, 100, 100, 0.0)
        );
        assert_eq!(args.common.topic, None);
        let Command::Bench(BenchCommand::Queue(args)) = parse(&[
            "bench",
            "queue",
            "--workers",
            "1",
            "--receive-batch",
            "1",
            "--ack-batch",
            "1",
            "--fail-rate",
            "0.25",
            "--messages",
            "1000",
            "--topic",
            "q",
        ])
        .unwrap()
        .command
        else {
            panic!("expected bench queue")
        };
        assert_eq!(
            (
                args.workers,
                args.receive_batch,
                args.ack_batch,
                args.fail_rate
            ),
            (1, 1, 1, 0.25)
        );
        assert_eq!(
            (args.common.messages, args.common.topic.as_deref()),
            (Some(1000), Some("q"))
        );
        for bad in [
            &["bench", "queue", "--fail-rate", "1.5"][..],
            &["bench", "queue", "--fail-rate", "-0.1"][..],
            &["bench", "queue", "--workers", "0"][..],
            &["bench", "queue", "--ack-batch", "0"][..],
        ] {
            assert_eq!(
                parse(bad).unwrap_err().kind(),
                ErrorKind::ValueValidation,
                "{bad:?}"
            );
        }
        assert_eq!(
            parse(&["bench", "produce", "--workers", "2"])
                .unwrap_err()
                .kind(),
            ErrorKind::UnknownArgument,
            "queue flags belong to bench queue only"
        );
    }

    #[test]
    fn refused_handles_print_one_line_each() {
        use shardq::client::SettleError;
        let error = CliError::HandlesRefused {
            operation: "ack",
            refused: vec![
                Refusal {
                    handle: Handle {
                        partition: 0,
                        offset: 1,
                        attempt: 1,
                    },
                    error: SettleError::LeaseExpired,
                    detail: String::new(),
                },
                Refusal {
                    handle: Handle {
                        partition: 0,
                        offset: 2,
                        attempt: 1,
                    },
                    error: SettleError::Stale,
                    detail: "current attempt 2".into(),
                },
            ],
        };
        assert_eq!(
            error.to_string(),
            "ack refused 0:1:1: lease expired\nack refused 0:2:1: stale: delivered again since (current attempt 2)"
        );
    }

    #[test]
    fn received_json_line_has_every_field() {
        // Built through the protocol type, as the client hands it over.
        let message = shardq::client::ReceivedMessage {
            handle: Handle {
                partition: 1,
                offset: 17,
                attempt: 2,
            },
            timestamp_ms: 5,
            key: None,
            value: Bytes::from_static(b"v\xff"),
            headers: vec![("h".into(), Bytes::from_static(b"x"))],
        };
        let value = queue::received_json_of(&message);
        assert_eq!(
            value,
            json!({
                "handle": "1:17:2",
                "partition": 1,
                "offset": 17,
                "attempt": 2,
                "timestamp_ms": 5,
                "key": null,
                "value": "v\u{fffd}",
                "headers": { "h": "x" },
            })
        );
    }
}
