//! Broker settings. Every limit the broker enforces lives here, with its default.
//! `validate` refuses values that cannot work before any shard starts, naming the key,
//! the value and the allowed range. Embedders and tests build `ServerConfig` in code;
//! `shardq serve` reads it from a TOML file, `SHARDQ_*` variables and flags (`file`).

use std::net::SocketAddr;
use std::path::PathBuf;

pub use crate::delivery::{ExpiryPolicy as QueueExpiryPolicy, Ordering as QueueOrdering};
use crate::delivery::{QueueGroupConfig, RetryPolicy};
pub use crate::storage::FailurePolicy;

#[cfg(feature = "config-file")]
pub mod file;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Root of the partition logs: `<data_dir>/<topic>/<partition>/`.
    pub data_dir: PathBuf,
    /// The shared listener (SO_REUSEPORT on every shard). Each shard also listens on
    /// `port + 1 + shard_id`; with port 0 every listener gets an ephemeral port.
    pub listen: SocketAddr,
    /// Connections the kernel queues on each listening socket before the shard accepts
    /// them (`listen(2)`'s backlog; the kernel cuts it to `net.core.somaxconn`). A burst
    /// of connects beyond it waits for SYN retransmits (1 s, then more).
    pub listen_backlog: u32,
    /// Number of shards, one pinned per CPU. `None`: one per CPU of `cpus`, or every
    /// online CPU.
    pub cores: Option<usize>,
    /// The CPUs the shards run on, shard k on the k-th. `None`: the lowest-numbered
    /// online CPUs, as many as `cores`. With both set, `cores` must count the list.
    pub cpus: Option<CpuList>,
    /// Largest frame body accepted from a client.
    pub frame_body_bytes_max: u32,
    /// Most records in one batch.
    pub batch_records_max: u32,
    /// Most topics and partitions a request may name.
    pub topics_per_request_max: u32,
    pub partitions_per_request_max: u32,
    /// Most partitions a topic may have.
    pub partitions_per_topic_max: u32,
    /// Most topics the broker holds.
    pub topics_max: u32,
    /// Most stream groups that commit offsets on one partition; a commit by one more
    /// group is refused (`limit_exceeded`).
    pub stream_groups_per_partition_max: u32,
    /// Most open client connections per shard; more are accepted and closed at once.
    pub connections_per_shard_max: u32,
    /// Most open client connections over all shards; more are accepted and closed at once.
    pub connections_max: u32,
    /// Most requests one connection may have in flight; reading pauses at the limit.
    pub connection_requests_in_flight_max: u32,
    /// Most bytes one connection may hold in request frames being read or processed and
    /// responses waiting to be written; reading pauses at the limit. At least one
    /// largest frame (`frame_body_bytes_max` + header).
    pub connection_bytes_in_flight_max: u64,
    /// The same, over every connection of a shard. Connections wait their turn, first
    /// come first served, when it is spent.
    pub shard_bytes_in_flight_max: u64,
    /// A connection with nothing buffered, nothing running and nothing to write for
    /// this long is closed.
    pub connection_idle_timeout_ms: u32,
    /// Once a frame has begun to arrive, the rest of it must arrive within this long
    /// (time the broker itself spends not reading, at a budget limit, does not count).
    pub frame_read_timeout_ms: u32,
    /// A write to a client that makes no progress for this long (the client does not
    /// read its responses) closes the connection.
    pub response_write_timeout_ms: u32,
    /// Lingering close: after its last response, a closing connection shuts down its
    /// write side and reads (and discards) what the client still sends for up to this
    /// long, so that a reset does not destroy answers already sent. 0: close at once.
    pub connection_linger_ms: u32,
    /// Most bytes of batches one ListOffsets request may make an owning shard decode
    /// while looking up offsets by time; entries past it get `limit_exceeded`.
    pub list_offsets_scan_bytes_max: u64,
    /// Read buffers (64 KiB each) a shard keeps for reuse; an idle connection holds none.
    pub read_buffers_pooled_per_shard_max: u32,
    /// A segment is sealed and a new one started once it reaches this size.
    pub segment_size_bytes: u64,
    /// Disk space for a segment is reserved this much at a time, ahead of the write
    /// position, instead of a whole segment when it is created: a new partition costs
    /// one step of disk.
    pub segment_preallocate_step_bytes: u64,
    /// Each partition keeps its active segment written (zeros) this far past its appended
    /// end, so that durable rounds write into written blocks rather than fallocated ones
    /// (whose first write makes fdatasync commit the file system journal). Never past
    /// the segment size; only while the partition has no write waiting.
    pub segment_zero_fill_lookahead_bytes: u64,
    /// Bytes per zero-fill write: a durable round arriving meanwhile waits for at most one
    /// such write (or one fdatasync of them).
    pub segment_zero_fill_chunk_bytes: u64,
    /// Disk bandwidth a shard's partitions may spend zero-filling, together. 0: off.
    pub segment_zero_fill_bytes_per_second_per_shard: u64,
    /// A durable round that is one write of at most this many bytes (and grows no file)
    /// is written through an O_DSYNC handle of its segment, durable when the write
    /// returns, instead of a write then an fdatasync. 0: every round fdatasyncs.
    pub segment_dsync_write_bytes_max: u64,
    /// Size of one aligned append chunk; a batch must fit in one chunk.
    pub chunk_size_bytes: usize,
    /// Per-shard budget for append chunks, written or waiting to be; appends wait
    /// (backpressure) when it is spent.
    pub chunk_memory_bytes_per_shard_max: usize,
    /// Longest long-poll a fetch may ask for; longer waits are cut to this.
    pub fetch_wait_ms_max: u32,
    /// Largest fetch response body.
    pub fetch_bytes_max: u32,
    /// One in-memory index entry per this many bytes of log.
    pub index_interval_bytes: u32,
    /// Depth of each shard-to-shard channel.
    pub mesh_channel_capacity: usize,
    /// After the disk reports it is full, a partition refuses appends and writes again
    /// this often until the write succeeds.
    pub storage_full_retry_ms: u32,
    /// What a write or sync error other than "disk full" does once the partition has
    /// stopped: exit the process (default) or leave the other partitions serving.
    pub storage_failure_policy: FailurePolicy,
    /// How often each shard applies its partitions' retention.
    pub retention_check_interval_ms: u32,
    /// Longest a stopping shard waits for the responses it owes (acknowledgements the
    /// final flush released) to be written before it closes its connections.
    pub shutdown_drain_ms: u32,
    /// Longest `shardq serve` takes, from SIGINT or SIGTERM, to stop: flush and fdatasync
    /// every partition and queue group, answer what was read, close. Past it the process
    /// exits with status 1 and says so (acknowledged durable data is on disk either way;
    /// memory-acknowledged data not yet flushed is not). At least
    /// `shutdown_drain_ms + connection_linger_ms`, which a clean stop may spend waiting on
    /// slow clients.
    pub shutdown_timeout_ms: u32,
    /// Keep one segment that retention deletes per partition and reuse it for the next
    /// new segment: overwriting written blocks is much faster than writing fresh ones.
    pub recycle_segments: bool,
    /// How far past the broker's clock a produced batch's timestamps may lie. A batch
    /// stamped further ahead is refused (`invalid_timestamp`): one far-future timestamp
    /// would otherwise become every later segment's time-index maximum, and lookups by
    /// time would be wrong until it aged out.
    pub timestamp_future_ms_max: u64,
    /// How long a shard with nothing to do keeps polling (its io_uring rings and task
    /// queues) before it parks its thread, in microseconds. 0 (the default): park at once,
    /// so an idle broker uses no CPU. Spinning saves the wake-up of a parked thread on each
    /// request that arrives within the budget, at the price of burning the shard's CPU for
    /// that long after every burst; and it holds up the kernel worker that runs the
    /// shard's fdatasync on the same CPU, which lengthens the tail of durable
    /// acknowledgements (docs/benchmarks.md, issue 10: 200 us took 17% off the durable
    /// p50 and made its p99 1.4x worse). At most `SPIN_BEFORE_PARK_US_MAX`.
    pub spin_before_park_us: u32,
    /// How long start-up keeps trying to bind a listening address that is in use (a
    /// broker killed a moment ago leaves its sockets bound for a few hundred ms).
    /// 0: fail at once.
    pub bind_retry_ms: u32,
    /// Per-shard memory for recently written batches, shared by all its partitions, so
    /// consumers at the tail are served without disk reads. 0 turns the cache off.
    pub tail_cache_bytes_per_shard: usize,
    /// Idempotent producers remembered per partition for deduplication; a new producer
    /// beyond it evicts the one whose last append is oldest.
    pub producers_per_partition_max: usize,
    /// Each partition snapshots its producer table after a group commit once this many
    /// bytes were appended since its last snapshot (and at segment roll and close), which
    /// bounds the log a restart scans to rebuild the table.
    pub producer_snapshot_interval_bytes: u64,
    // Queue groups (docs/queues.md §11). The topic-level ones are defaults that a topic's
    // own settings (`topic create|alter`) override.
    /// Offsets from the ack floor a queue group keeps state for, per partition.
    pub queue_window_messages_max: u32,
    /// Leases a queue group holds at once per partition (at most the window).
    pub queue_in_flight_messages_max: u32,
    /// Most messages one receive hands out.
    pub queue_receive_messages_max: u32,
    /// Most bytes of messages (keys, values and headers) one receive hands out; the
    /// first message is handed out whatever its size.
    pub queue_receive_bytes_max: u64,
    /// Most handles one ack, nack or extend request carries.
    pub queue_handles_per_request_max: u32,
    /// Lease when a receive names none and the topic sets none.
    pub queue_visibility_timeout_ms_default: u64,
    /// Longest lease a receive or extend may ask for.
    pub queue_visibility_timeout_ms_max: u64,
    /// Deliveries before a failure dead-letters the message.
    pub queue_deliveries_max: u32,
    /// First retry delay after a failed delivery.
    pub queue_retry_delay_ms_min: u64,
    /// Cap on retry delays.
    pub queue_retry_delay_ms_max: u64,
    /// Growth of the retry delay per failed delivery, in percent (at least 100).
    pub queue_retry_delay_multiplier_percent: u32,
    /// Up to this share of a retry delay is randomly taken off (at most 100).
    pub queue_retry_jitter_percent: u32,
    /// Cap on an explicit nack delay.
    pub queue_nack_delay_ms_max: u64,
    /// Cap on a `deliver_after` header past the append time.
    pub queue_delivery_delay_ms_max: u64,
    /// Topic TTL from append time; 0: none.
    pub queue_message_ttl_ms: u64,
    /// What happens to an expired message: dropped or dead-lettered.
    pub queue_expiry_policy: QueueExpiryPolicy,
    /// `PerKey`: one message in flight per key.
    pub queue_ordering: QueueOrdering,
    /// Nack reasons are cut to this many bytes.
    pub queue_nack_reason_bytes_max: u16,
    /// Journal records between snapshots of a queue group: bounds its recovery.
    pub queue_journal_records_per_snapshot_max: u64,
    /// Queue groups times partitions one shard holds state for.
    pub queue_groups_per_shard_max: u32,
    /// Where `/metrics` (Prometheus text format), `/health/live` and `/health/ready` are
    /// served over HTTP. `None`: nowhere (the library's default; `shardq serve` listens
    /// on 127.0.0.1:9749 unless told `--metrics-listen off`).
    pub metrics_listen: Option<SocketAddr>,
    /// How long a scrape or health check waits for each shard to answer; a shard slower
    /// than this is reported not live (`shardq_shard_up` 0).
    pub metrics_shard_answer_timeout_ms: u32,
    /// Log lines one shard writes per `log_window_ms` for each kind of event a client can
    /// cause at will (refused connections, protocol errors, timeouts, failed acks=none
    /// produces); the rest are counted and the count goes out with the next line. 0: none
    /// of them is written (the metrics still count them).
    pub log_lines_per_window_max: u32,
    /// The window of `log_lines_per_window_max`.
    pub log_window_ms: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            data_dir: PathBuf::from("./shardq-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 9740)),
            listen_backlog: 1024,
            cores: None,
            cpus: None,
            frame_body_bytes_max: 16 << 20,
            batch_records_max: 100_000,
            topics_per_request_max: 1024,
            partitions_per_request_max: 16_384,
            partitions_per_topic_max: 4096,
            topics_max: 10_000,
            stream_groups_per_partition_max: 1000,
            connections_per_shard_max: 10_000,
            connections_max: 20_000,
            connection_requests_in_flight_max: 256,
            connection_bytes_in_flight_max: 32 << 20,
            shard_bytes_in_flight_max: 128 << 20,
            connection_idle_timeout_ms: 600_000,
            frame_read_timeout_ms: 30_000,
            response_write_timeout_ms: 30_000,
            connection_linger_ms: 2_000,
            read_buffers_pooled_per_shard_max: 256,
            list_offsets_scan_bytes_max: 64 << 20,
            segment_size_bytes: 1 << 30,
            segment_preallocate_step_bytes: 4 << 20,
            segment_zero_fill_lookahead_bytes: 4 << 20,
            segment_zero_fill_chunk_bytes: 64 << 10,
            segment_zero_fill_bytes_per_second_per_shard: 32 << 20,
            segment_dsync_write_bytes_max: 1 << 20,
            chunk_size_bytes: 1 << 20,
            chunk_memory_bytes_per_shard_max: 64 << 20,
            fetch_wait_ms_max: 30_000,
            fetch_bytes_max: 16 << 20,
            index_interval_bytes: 4096,
            mesh_channel_capacity: 1024,
            storage_full_retry_ms: 1000,
            storage_failure_policy: FailurePolicy::ExitProcess,
            retention_check_interval_ms: 10_000,
            recycle_segments: true,
            shutdown_drain_ms: 2_000,
            shutdown_timeout_ms: 30_000,
            tail_cache_bytes_per_shard: 64 << 20,
            metrics_listen: None,
            metrics_shard_answer_timeout_ms: 1_000,
            log_lines_per_window_max: 5,
            log_window_ms: 10_000,
            bind_retry_ms: 10_000,
            spin_before_park_us: 0,
            timestamp_future_ms_max: 3_600_000,
            producers_per_partition_max: 10_000,
            producer_snapshot_interval_bytes: 16 << 20,
            queue_window_messages_max: 8192,
            queue_in_flight_messages_max: 4096,
            queue_receive_messages_max: 1000,
            queue_receive_bytes_max: 16 << 20,
            queue_handles_per_request_max: 1000,
            queue_visibility_timeout_ms_default: 30_000,
            queue_visibility_timeout_ms_max: 43_200_000,
            queue_deliveries_max: 10,
            queue_retry_delay_ms_min: 1000,
            queue_retry_delay_ms_max: 300_000,
            queue_retry_delay_multiplier_percent: 200,
            queue_retry_jitter_percent: 20,
            queue_nack_delay_ms_max: 43_200_000,
            queue_delivery_delay_ms_max: 900_000,
            queue_message_ttl_ms: 0,
            queue_expiry_policy: QueueExpiryPolicy::Drop,
            queue_ordering: QueueOrdering::Unordered,
            queue_nack_reason_bytes_max: 128,
            queue_journal_records_per_snapshot_max: 100_000,
            queue_groups_per_shard_max: 256,
        }
    }
}

/// A setting that cannot work: the key, the value it was given and what it may be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The key as the config file names it (`ServerConfig`'s field).
    pub key: &'static str,
    /// The value it was given, as the config file would write it.
    pub value: String,
    /// The values it may take, with the numbers (and the other keys they depend on).
    pub allowed: String,
}

impl ConfigError {
    fn new(key: &'static str, value: impl std::fmt::Display, allowed: impl Into<String>) -> Self {
        ConfigError {
            key,
            value: value.to_string(),
            allowed: allowed.into(),
        }
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "invalid configuration: {} = {} is not allowed: must be {}",
            self.key, self.value, self.allowed
        )
    }
}

impl std::error::Error for ConfigError {}

pub const ALIGNMENT_BYTES: usize = 4096;

/// Most shards a broker runs: shard ids are 16-bit on the wire and in placement.
pub const SHARDS_MAX: usize = u16::MAX as usize;

/// The largest segment: index entries hold 32-bit positions, and a segment is whole
/// blocks (the last multiple of 4096 below 4 GiB).
pub const SEGMENT_SIZE_BYTES_MAX: u64 =
    (u32::MAX as u64 / ALIGNMENT_BYTES as u64) * ALIGNMENT_BYTES as u64;

/// The largest append chunk: far above any batch a frame can carry (16 MiB by default),
/// and small enough that 4 of them stay a sane per-shard budget.
pub const CHUNK_SIZE_BYTES_MAX: usize = 1 << 30;

/// The largest per-shard chunk budget. glommio allocates it (plus 16 MiB for reads) as
/// each executor's I/O memory when the shard starts; past a few hundred GiB no host has
/// it, and near `isize::MAX` the allocation's layout itself fails.
pub const CHUNK_MEMORY_BYTES_PER_SHARD_MAX: usize = 256 << 30;

/// The deepest shard-to-shard channel: every shard holds one to every other, so the
/// memory is the square of the shards times this.
pub const MESH_CHANNEL_CAPACITY_MAX: usize = 1 << 20;
/// The longest `spin_before_park_us` (100 ms): longer is a busy loop, not a spin.
pub const SPIN_BEFORE_PARK_US_MAX: u32 = 100_000;

/// The largest zero-fill write: each is one buffer of zeros from the shard's I/O memory,
/// and a durable round may wait for one.
pub const SEGMENT_ZERO_FILL_CHUNK_BYTES_MAX: u64 = 16 << 20;

/// The highest zero-fill bandwidth per shard: past any single disk.
pub const SEGMENT_ZERO_FILL_BYTES_PER_SECOND_PER_SHARD_MAX: u64 = 64 << 30;

/// The largest `segment_dsync_write_bytes_max`: a round is one chunk at most, and a chunk
/// at most `CHUNK_SIZE_BYTES_MAX`.
pub const SEGMENT_DSYNC_WRITE_BYTES_MAX: u64 = CHUNK_SIZE_BYTES_MAX as u64;

/// The largest tail cache per shard.
pub const TAIL_CACHE_BYTES_PER_SHARD_MAX: usize = 1 << 40;

/// Highest CPU number a `cpus` list may name: Linux's own ceiling (`NR_CPUS` at most
/// 8192), which also bounds the memory a range like `0-99999999` would take.
pub const CPU_NUMBER_MAX: usize = 8191;

/// The CPUs the shards run on, in shard order: shard k runs on the k-th CPU of the list.
/// Written as the kernel writes CPU lists (`/sys/devices/system/cpu/online`):
/// `"2-7"`, `"0,2,4-6"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(Vec<usize>);

/// Why a CPU list does not parse, with the piece at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuListError {
    pub list: String,
    pub reason: String,
}

impl std::fmt::Display for CpuListError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CPU list {:?}: {}", self.list, self.reason)
    }
}

impl std::error::Error for CpuListError {}

impl CpuList {
    /// A list of distinct CPUs; panics on an empty list or a repeated CPU (a bug: parse
    /// refuses both).
    pub fn new(cpus: Vec<usize>) -> CpuList {
        assert!(!cpus.is_empty(), "a CPU list names at least one CPU");
        let mut sorted = cpus.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), cpus.len(), "a CPU list names each CPU once");
        CpuList(cpus)
    }

    pub fn parse(text: &str) -> Result<CpuList, CpuListError> {
        let fail = |reason: String| CpuListError {
            list: text.to_string(),
            reason,
        };
        let number = |piece: &str| -> Result<usize, CpuListError> {
            let cpu: usize = piece.trim().parse().map_err(|_| {
                fail(format!(
                    "{:?} is not a CPU number (lists look like \"2-7\" or \"0,2,4-6\")",
                    piece.trim()
                ))
            })?;
            if cpu > CPU_NUMBER_MAX {
                return Err(fail(format!(
                    "CPU {cpu} is past the highest CPU number, {CPU_NUMBER_MAX}"
                )));
            }
            Ok(cpu)
        };
        if text.trim().is_empty() {
            return Err(fail("names no CPU".into()));
        }
        let mut cpus = Vec::new();
        for piece in text.split(',') {
            match piece.split_once('-') {
                Some((first, last)) => {
                    let (first, last) = (number(first)?, number(last)?);
                    if first > last {
                        return Err(fail(format!(
                            "range {first}-{last} runs backwards (write {last}-{first})"
                        )));
                    }
                    cpus.extend(first..=last);
                }
                None => cpus.push(number(piece)?),
            }
        }
        let mut seen = vec![false; CPU_NUMBER_MAX + 1];
        for &cpu in &cpus {
            if std::mem::replace(&mut seen[cpu], true) {
                return Err(fail(format!(
                    "CPU {cpu} is named twice (one shard per CPU)"
                )));
            }
        }
        Ok(CpuList(cpus))
    }

    pub fn cpus(&self) -> &[usize] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Display for CpuList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&cpu_list_text(&self.0))
    }
}

/// CPUs as `CpuList::parse` reads them, runs of consecutive CPUs as ranges: `0,2,4-6`.
pub fn cpu_list_text(cpus: &[usize]) -> String {
    let mut pieces = Vec::new();
    let mut index = 0;
    while index < cpus.len() {
        let first = cpus[index];
        while index + 1 < cpus.len() && cpus[index + 1] == cpus[index] + 1 {
            index += 1;
        }
        let last = cpus[index];
        pieces.push(if first == last {
            first.to_string()
        } else {
            format!("{first}-{last}")
        });
        index += 1;
    }
    pieces.join(",")
}

impl ServerConfig {
    /// Refuses values that cannot work; each error names the key, its value and the
    /// allowed range (computed from the other keys it depends on).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |key, value: &dyn std::fmt::Display, allowed: String| {
            Err(ConfigError::new(key, value, allowed))
        };
        if let Some(cores) = self.cores {
            if cores == 0 || cores > SHARDS_MAX {
                return fail(
                    "cores",
                    &cores,
                    format!("\"auto\" or from 1 to {SHARDS_MAX} (and at most the online CPUs)"),
                );
            }
            if let Some(cpus) = &self.cpus {
                if cpus.len() != cores {
                    return fail(
                        "cores",
                        &cores,
                        format!(
                            "{} (the number of CPUs in cpus = \"{cpus}\"), or \"auto\"",
                            cpus.len()
                        ),
                    );
                }
            }
        }
        if let Some(cpus) = &self.cpus {
            if cpus.len() > SHARDS_MAX {
                return fail(
                    "cpus",
                    &format!("\"{cpus}\""),
                    format!("a list of at most {SHARDS_MAX} CPUs"),
                );
            }
        }
        let alignment = ALIGNMENT_BYTES;
        if self.chunk_size_bytes < 2 * alignment
            || self.chunk_size_bytes % alignment != 0
            || self.chunk_size_bytes > CHUNK_SIZE_BYTES_MAX
        {
            return fail(
                "chunk_size_bytes",
                &self.chunk_size_bytes,
                format!(
                    "a multiple of {alignment} from {} to {CHUNK_SIZE_BYTES_MAX}",
                    2 * alignment
                ),
            );
        }
        // No overflow: chunk_size_bytes is at most 1 GiB here.
        let four_chunks = 4 * self.chunk_size_bytes;
        if self.chunk_memory_bytes_per_shard_max < four_chunks
            || self.chunk_memory_bytes_per_shard_max > CHUNK_MEMORY_BYTES_PER_SHARD_MAX
        {
            return fail(
                "chunk_memory_bytes_per_shard_max",
                &self.chunk_memory_bytes_per_shard_max,
                format!(
                    "from {four_chunks} (4 chunks of chunk_size_bytes = {}) to {CHUNK_MEMORY_BYTES_PER_SHARD_MAX}",
                    self.chunk_size_bytes
                ),
            );
        }
        if self.spin_before_park_us > SPIN_BEFORE_PARK_US_MAX {
            return fail(
                "spin_before_park_us",
                &self.spin_before_park_us,
                format!("from 0 (off) to {SPIN_BEFORE_PARK_US_MAX}"),
            );
        }
        if self.mesh_channel_capacity > MESH_CHANNEL_CAPACITY_MAX {
            return fail(
                "mesh_channel_capacity",
                &self.mesh_channel_capacity,
                format!("from 1 to {MESH_CHANNEL_CAPACITY_MAX}"),
            );
        }
        if self.tail_cache_bytes_per_shard > TAIL_CACHE_BYTES_PER_SHARD_MAX {
            return fail(
                "tail_cache_bytes_per_shard",
                &self.tail_cache_bytes_per_shard,
                format!("from 0 (off) to {TAIL_CACHE_BYTES_PER_SHARD_MAX}"),
            );
        }
        // Padded block writes must stay inside the preallocated file; index entries
        // hold 32-bit positions.
        if self.segment_size_bytes % alignment as u64 != 0
            || self.segment_size_bytes < self.chunk_size_bytes as u64
            || self.segment_size_bytes > SEGMENT_SIZE_BYTES_MAX
        {
            return fail(
                "segment_size_bytes",
                &self.segment_size_bytes,
                format!(
                    "a multiple of {alignment} from {} (chunk_size_bytes) to {SEGMENT_SIZE_BYTES_MAX}",
                    self.chunk_size_bytes
                ),
            );
        }
        if self.segment_preallocate_step_bytes < alignment as u64
            || self.segment_preallocate_step_bytes % alignment as u64 != 0
        {
            return fail(
                "segment_preallocate_step_bytes",
                &self.segment_preallocate_step_bytes,
                format!("a multiple of {alignment}, at least {alignment}"),
            );
        }
        if self.segment_zero_fill_chunk_bytes < alignment as u64
            || self.segment_zero_fill_chunk_bytes % alignment as u64 != 0
            || self.segment_zero_fill_chunk_bytes > SEGMENT_ZERO_FILL_CHUNK_BYTES_MAX
        {
            return fail(
                "segment_zero_fill_chunk_bytes",
                &self.segment_zero_fill_chunk_bytes,
                format!("a multiple of {alignment} from {alignment} to {SEGMENT_ZERO_FILL_CHUNK_BYTES_MAX}"),
            );
        }
        if self.segment_dsync_write_bytes_max % alignment as u64 != 0
            || self.segment_dsync_write_bytes_max > SEGMENT_DSYNC_WRITE_BYTES_MAX
        {
            return fail(
                "segment_dsync_write_bytes_max",
                &self.segment_dsync_write_bytes_max,
                format!(
                    "0 (off) or a multiple of {alignment} up to {SEGMENT_DSYNC_WRITE_BYTES_MAX}"
                ),
            );
        }
        if self.segment_zero_fill_lookahead_bytes % alignment as u64 != 0
            || (self.segment_zero_fill_lookahead_bytes != 0
                && self.segment_zero_fill_lookahead_bytes < self.segment_zero_fill_chunk_bytes)
            || self.segment_zero_fill_lookahead_bytes > SEGMENT_SIZE_BYTES_MAX
        {
            // Past the segment size is allowed: the fill stops at the segment's end, and a
            // small segment should not force the lookahead down with it.
            return fail(
                "segment_zero_fill_lookahead_bytes",
                &self.segment_zero_fill_lookahead_bytes,
                format!(
                    "0 (off) or a multiple of {alignment} from {} (segment_zero_fill_chunk_bytes) to {SEGMENT_SIZE_BYTES_MAX}",
                    self.segment_zero_fill_chunk_bytes
                ),
            );
        }
        if self.segment_zero_fill_bytes_per_second_per_shard
            > SEGMENT_ZERO_FILL_BYTES_PER_SECOND_PER_SHARD_MAX
        {
            return fail(
                "segment_zero_fill_bytes_per_second_per_shard",
                &self.segment_zero_fill_bytes_per_second_per_shard,
                format!("from 0 (off) to {SEGMENT_ZERO_FILL_BYTES_PER_SECOND_PER_SHARD_MAX}"),
            );
        }
        let frame_bytes_max = u64::from(self.frame_body_bytes_max) + 16;
        if self.connection_bytes_in_flight_max < frame_bytes_max {
            return fail(
                "connection_bytes_in_flight_max",
                &self.connection_bytes_in_flight_max,
                format!(
                    "at least {frame_bytes_max} (one largest frame: frame_body_bytes_max = {} + 16)",
                    self.frame_body_bytes_max
                ),
            );
        }
        if self.shard_bytes_in_flight_max < self.connection_bytes_in_flight_max {
            return fail(
                "shard_bytes_in_flight_max",
                &self.shard_bytes_in_flight_max,
                format!(
                    "at least {} (connection_bytes_in_flight_max)",
                    self.connection_bytes_in_flight_max
                ),
            );
        }
        for (key, value) in [
            ("index_interval_bytes", u64::from(self.index_interval_bytes)),
            ("frame_body_bytes_max", u64::from(self.frame_body_bytes_max)),
            ("batch_records_max", u64::from(self.batch_records_max)),
            (
                "topics_per_request_max",
                u64::from(self.topics_per_request_max),
            ),
            (
                "partitions_per_request_max",
                u64::from(self.partitions_per_request_max),
            ),
            (
                "partitions_per_topic_max",
                u64::from(self.partitions_per_topic_max),
            ),
            ("topics_max", u64::from(self.topics_max)),
            (
                "stream_groups_per_partition_max",
                u64::from(self.stream_groups_per_partition_max),
            ),
            (
                "connections_per_shard_max",
                u64::from(self.connections_per_shard_max),
            ),
            ("connections_max", u64::from(self.connections_max)),
            ("listen_backlog", u64::from(self.listen_backlog)),
            ("log_window_ms", u64::from(self.log_window_ms)),
            (
                "list_offsets_scan_bytes_max",
                self.list_offsets_scan_bytes_max,
            ),
            (
                "connection_requests_in_flight_max",
                u64::from(self.connection_requests_in_flight_max),
            ),
            ("fetch_bytes_max", u64::from(self.fetch_bytes_max)),
            (
                "connection_idle_timeout_ms",
                u64::from(self.connection_idle_timeout_ms),
            ),
            (
                "frame_read_timeout_ms",
                u64::from(self.frame_read_timeout_ms),
            ),
            (
                "response_write_timeout_ms",
                u64::from(self.response_write_timeout_ms),
            ),
            ("mesh_channel_capacity", self.mesh_channel_capacity as u64),
            (
                "storage_full_retry_ms",
                u64::from(self.storage_full_retry_ms),
            ),
            (
                "retention_check_interval_ms",
                u64::from(self.retention_check_interval_ms),
            ),
            (
                "producers_per_partition_max",
                self.producers_per_partition_max as u64,
            ),
            (
                "producer_snapshot_interval_bytes",
                self.producer_snapshot_interval_bytes,
            ),
            (
                "metrics_shard_answer_timeout_ms",
                u64::from(self.metrics_shard_answer_timeout_ms),
            ),
            (
                "queue_groups_per_shard_max",
                u64::from(self.queue_groups_per_shard_max),
            ),
            ("queue_receive_bytes_max", self.queue_receive_bytes_max),
        ] {
            if value == 0 {
                return fail(key, &value, "at least 1".into());
            }
        }
        let waits_ms = u64::from(self.shutdown_drain_ms) + u64::from(self.connection_linger_ms);
        if u64::from(self.shutdown_timeout_ms) < waits_ms {
            return fail(
                "shutdown_timeout_ms",
                &self.shutdown_timeout_ms,
                format!(
                    "at least {waits_ms} (shutdown_drain_ms + connection_linger_ms: a clean stop may wait that long on slow clients)"
                ),
            );
        }
        // The same checks every queue group's config passes, on the broker's defaults,
        // with the bounds that depend on other keys spelled out.
        if let Err(error) = self.queue_group_defaults(0).validate() {
            let allowed = match error.key {
                "queue_in_flight_messages_max" => format!(
                    "from 1 to {} (queue_window_messages_max)",
                    self.queue_window_messages_max
                ),
                "queue_retry_delay_ms_min" => format!(
                    "at most {} (queue_retry_delay_ms_max)",
                    self.queue_retry_delay_ms_max
                ),
                "queue_retry_delay_multiplier_percent" => {
                    "at least 100 (delays never shrink)".into()
                }
                "queue_retry_jitter_percent" => "from 0 to 100".into(),
                "queue_visibility_timeout_ms_default" => format!(
                    "from 1 to {} (queue_visibility_timeout_ms_max)",
                    self.queue_visibility_timeout_ms_max
                ),
                _ => error.reason.trim_start_matches("must be ").to_string(),
            };
            return fail(error.key, &error.value, allowed);
        }
        Ok(())
    }

    /// A queue group's limits and policy from the broker's `queue_*` keys alone; a
    /// topic's own settings override the topic-level ones (`shard::queues`).
    pub fn queue_group_defaults(&self, partition: u32) -> QueueGroupConfig {
        QueueGroupConfig {
            partition,
            window_messages_max: self.queue_window_messages_max,
            in_flight_messages_max: self.queue_in_flight_messages_max,
            receive_messages_max: self.queue_receive_messages_max,
            handles_per_request_max: self.queue_handles_per_request_max,
            visibility_timeout_ms_default: self.queue_visibility_timeout_ms_default,
            visibility_timeout_ms_max: self.queue_visibility_timeout_ms_max,
            deliveries_max: self.queue_deliveries_max,
            retry: RetryPolicy {
                delay_ms_min: self.queue_retry_delay_ms_min,
                delay_ms_max: self.queue_retry_delay_ms_max,
                multiplier_percent: self.queue_retry_delay_multiplier_percent,
                jitter_percent: self.queue_retry_jitter_percent,
            },
            nack_delay_ms_max: self.queue_nack_delay_ms_max,
            delivery_delay_ms_max: self.queue_delivery_delay_ms_max,
            message_ttl_ms: self.queue_message_ttl_ms,
            expiry_policy: self.queue_expiry_policy,
            ordering: self.queue_ordering,
            nack_reason_bytes_max: self.queue_nack_reason_bytes_max,
            journal_records_per_snapshot_max: self.queue_journal_records_per_snapshot_max,
            random_seed: 0,
        }
    }

    /// The largest batch one chunk can take: a chunk may begin with up to one partial
    /// block carried over from the previous chunk.
    pub fn batch_bytes_max(&self) -> usize {
        self.chunk_size_bytes - ALIGNMENT_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_as_the_kernel_writes_them_and_print_back() {
        for (text, cpus, printed) in [
            ("2-7", vec![2, 3, 4, 5, 6, 7], "2-7"),
            ("0,2,4-6", vec![0, 2, 4, 5, 6], "0,2,4-6"),
            (" 1 ", vec![1], "1"),
            ("3,1", vec![3, 1], "3,1"),
            ("0-1,3", vec![0, 1, 3], "0-1,3"),
        ] {
            let list = CpuList::parse(text).unwrap();
            assert_eq!(list.cpus(), &cpus[..], "{text}");
            assert_eq!(list.to_string(), printed, "{text}");
            assert_eq!(CpuList::parse(printed).unwrap(), list);
        }
    }

    #[test]
    fn malformed_cpu_lists_name_the_piece_at_fault() {
        for (text, reason) in [
            ("", "names no CPU"),
            ("0,,1", "\"\" is not a CPU number"),
            ("a-3", "\"a\" is not a CPU number"),
            ("3-1", "range 3-1 runs backwards"),
            ("0-2,1", "CPU 1 is named twice"),
            ("8192", "CPU 8192 is past the highest CPU number, 8191"),
            ("0-99999999", "CPU 99999999 is past"),
        ] {
            let error = CpuList::parse(text).unwrap_err();
            assert!(error.reason.contains(reason), "{text:?}: {error}");
        }
    }

    #[test]
    fn errors_carry_key_value_and_allowed_range() {
        let refused = |config: ServerConfig| config.validate().unwrap_err();
        let error = refused(ServerConfig {
            segment_size_bytes: SEGMENT_SIZE_BYTES_MAX + ALIGNMENT_BYTES as u64,
            ..ServerConfig::default()
        });
        assert_eq!(error.key, "segment_size_bytes");
        assert_eq!(error.value, "4294967296");
        assert_eq!(
            error.allowed,
            "a multiple of 4096 from 1048576 (chunk_size_bytes) to 4294963200"
        );
        assert!(ServerConfig {
            segment_size_bytes: SEGMENT_SIZE_BYTES_MAX,
            ..ServerConfig::default()
        }
        .validate()
        .is_ok());
        let error = refused(ServerConfig {
            cores: Some(3),
            cpus: Some(CpuList::parse("0-1").unwrap()),
            ..ServerConfig::default()
        });
        assert_eq!(
            (error.key, error.value.as_str(), error.allowed.as_str()),
            (
                "cores",
                "3",
                "2 (the number of CPUs in cpus = \"0-1\"), or \"auto\""
            )
        );
        assert!(ServerConfig {
            cores: Some(2),
            cpus: Some(CpuList::parse("0-1").unwrap()),
            ..ServerConfig::default()
        }
        .validate()
        .is_ok());
        let error = refused(ServerConfig {
            cores: Some(0),
            ..ServerConfig::default()
        });
        assert_eq!((error.key, error.value.as_str()), ("cores", "0"));
        let error = refused(ServerConfig {
            queue_retry_jitter_percent: 101,
            ..ServerConfig::default()
        });
        assert_eq!(
            (error.key, error.value.as_str(), error.allowed.as_str()),
            ("queue_retry_jitter_percent", "101", "from 0 to 100")
        );
        let error = refused(ServerConfig {
            shard_bytes_in_flight_max: (32 << 20) - 1,
            ..ServerConfig::default()
        });
        assert_eq!(
            error.to_string(),
            "invalid configuration: shard_bytes_in_flight_max = 33554431 is not allowed: must be at least 33554432 (connection_bytes_in_flight_max)"
        );
    }

    #[test]
    fn preallocation_step_must_be_whole_blocks() {
        let config = |step| ServerConfig {
            segment_preallocate_step_bytes: step,
            ..ServerConfig::default()
        };
        assert!(config(ALIGNMENT_BYTES as u64).validate().is_ok());
        assert!(config(4 << 20).validate().is_ok());
        for step in [0, ALIGNMENT_BYTES as u64 - 1, ALIGNMENT_BYTES as u64 + 1] {
            let error = config(step).validate().unwrap_err();
            assert!(
                error.to_string().contains("segment_preallocate_step_bytes")
                    && error.to_string().contains(&step.to_string()),
                "{error}"
            );
        }
    }

    #[test]
    fn zero_fill_settings_are_refused_past_their_edges() {
        let at = |lookahead: u64, chunk: u64, rate: u64| ServerConfig {
            segment_size_bytes: 64 << 20,
            segment_zero_fill_lookahead_bytes: lookahead,
            segment_zero_fill_chunk_bytes: chunk,
            segment_zero_fill_bytes_per_second_per_shard: rate,
            ..ServerConfig::default()
        };
        let block = ALIGNMENT_BYTES as u64;
        let chunk_max = SEGMENT_ZERO_FILL_CHUNK_BYTES_MAX;
        let rate_max = SEGMENT_ZERO_FILL_BYTES_PER_SECOND_PER_SHARD_MAX;
        for accepted in [
            at(4 << 20, 64 << 10, 32 << 20),
            // Off either way: no bandwidth, or no lookahead.
            at(4 << 20, 64 << 10, 0),
            at(0, 64 << 10, 32 << 20),
            // At the edges: one block; the largest chunk and rate; a lookahead past the
            // segment size (the fill stops at the segment's end).
            at(block, block, 1),
            at(64 << 20, chunk_max, rate_max),
            at(SEGMENT_SIZE_BYTES_MAX, block, 1),
        ] {
            assert!(accepted.validate().is_ok(), "{accepted:?}");
        }
        let refused = |config: ServerConfig, key: &str, value: u64| {
            let error = config.validate().unwrap_err();
            assert_eq!(
                (error.key, error.value.clone()),
                (key, value.to_string()),
                "{error}"
            );
        };
        let chunk_key = "segment_zero_fill_chunk_bytes";
        refused(at(4 << 20, 0, 1), chunk_key, 0);
        refused(at(4 << 20, block + 1, 1), chunk_key, block + 1);
        refused(
            at(64 << 20, chunk_max + block, 1),
            chunk_key,
            chunk_max + block,
        );
        let lookahead_key = "segment_zero_fill_lookahead_bytes";
        refused(at(block + 1, block, 1), lookahead_key, block + 1);
        // Shorter than one chunk, past the largest segment.
        refused(at(32 << 10, 64 << 10, 1), lookahead_key, 32 << 10);
        let past = SEGMENT_SIZE_BYTES_MAX + block;
        refused(at(past, block, 1), lookahead_key, past);
        let rate_key = "segment_zero_fill_bytes_per_second_per_shard";
        refused(at(4 << 20, 64 << 10, rate_max + 1), rate_key, rate_max + 1);
        let error = at(4 << 20, 64 << 10, rate_max + 1).validate().unwrap_err();
        assert!(error.to_string().contains("from 0 (off)"), "{error}");
    }

    #[test]
    fn memory_sizes_are_refused_past_their_ceilings_without_overflowing() {
        let refused = |config: ServerConfig, key: &str| {
            let error = config.validate().unwrap_err();
            assert_eq!(error.key, key, "{error}");
        };
        let at = |chunk: usize, budget: usize, mesh: usize, cache: usize| ServerConfig {
            chunk_size_bytes: chunk,
            chunk_memory_bytes_per_shard_max: budget,
            mesh_channel_capacity: mesh,
            tail_cache_bytes_per_shard: cache,
            ..ServerConfig::default()
        };
        let chunk = CHUNK_SIZE_BYTES_MAX;
        let budget = CHUNK_MEMORY_BYTES_PER_SHARD_MAX;
        let mesh = MESH_CHANNEL_CAPACITY_MAX;
        let cache = TAIL_CACHE_BYTES_PER_SHARD_MAX;
        // Each at its ceiling (segments must hold a chunk).
        let mut config = at(chunk, budget, mesh, cache);
        config.segment_size_bytes = chunk as u64;
        config.validate().unwrap();
        refused(at(chunk + 4096, budget, mesh, cache), "chunk_size_bytes");
        refused(
            at(1 << 20, budget + 1, mesh, cache),
            "chunk_memory_bytes_per_shard_max",
        );
        refused(
            at(1 << 20, 64 << 20, mesh + 1, cache),
            "mesh_channel_capacity",
        );
        refused(
            at(1 << 20, 64 << 20, 1024, cache + 1),
            "tail_cache_bytes_per_shard",
        );
        // Values whose products used to overflow are refused by name.
        refused(at(usize::MAX - 4095, 64 << 20, 1024, 0), "chunk_size_bytes");
        refused(
            at(1 << 20, usize::MAX, 1024, 0),
            "chunk_memory_bytes_per_shard_max",
        );
    }

    #[test]
    fn shutdown_timeout_must_cover_the_drain_and_the_linger() {
        let config = |timeout| ServerConfig {
            shutdown_drain_ms: 1_500,
            connection_linger_ms: 500,
            shutdown_timeout_ms: timeout,
            ..ServerConfig::default()
        };
        assert!(config(2_000).validate().is_ok());
        let error = config(1_999).validate().unwrap_err();
        assert_eq!(
            (error.key, error.value.as_str()),
            ("shutdown_timeout_ms", "1999")
        );
        assert!(error.allowed.starts_with("at least 2000 "), "{error}");
    }

    #[test]
    fn metrics_answer_timeout_must_be_at_least_one_millisecond() {
        let config = |timeout| ServerConfig {
            metrics_shard_answer_timeout_ms: timeout,
            ..ServerConfig::default()
        };
        assert!(config(1).validate().is_ok());
        let error = config(0).validate().unwrap_err();
        assert!(
            error
                .to_string()
                .contains("metrics_shard_answer_timeout_ms"),
            "{error}"
        );
    }

    #[test]
    fn stream_groups_per_partition_must_be_at_least_one() {
        let config = |groups| ServerConfig {
            stream_groups_per_partition_max: groups,
            ..ServerConfig::default()
        };
        assert!(config(1).validate().is_ok());
        let error = config(0).validate().unwrap_err();
        assert!(
            error
                .to_string()
                .contains("stream_groups_per_partition_max"),
            "{error}"
        );
    }

    #[test]
    fn bind_retry_and_timestamp_limits_accept_zero() {
        // 0 means "fail at once" and "no timestamps ahead of the broker's clock".
        let config = ServerConfig {
            bind_retry_ms: 0,
            timestamp_future_ms_max: 0,
            ..ServerConfig::default()
        };
        assert!(config.validate().is_ok());
    }

    #[test]
    fn queue_keys_are_checked_past_each_edge() {
        assert!(ServerConfig::default().validate().is_ok());
        let refused = |config: ServerConfig, key: &str, value: &str| {
            let error = config.validate().expect_err(key);
            assert!(
                error.to_string().contains(key) && error.to_string().contains(value),
                "{key} = {value}: {error}"
            );
        };
        let base = ServerConfig::default;
        // Maxima of 0.
        refused(
            ServerConfig {
                queue_window_messages_max: 0,
                ..base()
            },
            "queue_window_messages_max",
            "0",
        );
        refused(
            ServerConfig {
                queue_in_flight_messages_max: 0,
                ..base()
            },
            "queue_in_flight_messages_max",
            "0",
        );
        refused(
            ServerConfig {
                queue_receive_messages_max: 0,
                ..base()
            },
            "queue_receive_messages_max",
            "0",
        );
        refused(
            ServerConfig {
                queue_handles_per_request_max: 0,
                ..base()
            },
            "queue_handles_per_request_max",
            "0",
        );
        refused(
            ServerConfig {
                queue_receive_bytes_max: 0,
                ..base()
            },
            "queue_receive_bytes_max",
            "0",
        );
        refused(
            ServerConfig {
                queue_visibility_timeout_ms_max: 0,
                ..base()
            },
            "queue_visibility_timeout_ms_max",
            "0",
        );
        refused(
            ServerConfig {
                queue_deliveries_max: 0,
                ..base()
            },
            "queue_deliveries_max",
            "0",
        );
        refused(
            ServerConfig {
                queue_journal_records_per_snapshot_max: 0,
                ..base()
            },
            "queue_journal_records_per_snapshot_max",
            "0",
        );
        refused(
            ServerConfig {
                queue_groups_per_shard_max: 0,
                ..base()
            },
            "queue_groups_per_shard_max",
            "at least 1",
        );
        // In-flight above the window: one past the edge refused, the edge accepted.
        refused(
            ServerConfig {
                queue_window_messages_max: 100,
                queue_in_flight_messages_max: 101,
                ..base()
            },
            "queue_in_flight_messages_max",
            "101",
        );
        assert!(ServerConfig {
            queue_window_messages_max: 100,
            queue_in_flight_messages_max: 100,
            ..base()
        }
        .validate()
        .is_ok());
        // Retry delays: min above max refused, equal accepted.
        refused(
            ServerConfig {
                queue_retry_delay_ms_min: 501,
                queue_retry_delay_ms_max: 500,
                ..base()
            },
            "queue_retry_delay_ms_min",
            "501",
        );
        assert!(ServerConfig {
            queue_retry_delay_ms_min: 500,
            queue_retry_delay_ms_max: 500,
            ..base()
        }
        .validate()
        .is_ok());
        // Multiplier below 100 %, jitter above 100 %.
        refused(
            ServerConfig {
                queue_retry_delay_multiplier_percent: 99,
                ..base()
            },
            "queue_retry_delay_multiplier_percent",
            "99",
        );
        assert!(ServerConfig {
            queue_retry_delay_multiplier_percent: 100,
            ..base()
        }
        .validate()
        .is_ok());
        refused(
            ServerConfig {
                queue_retry_jitter_percent: 101,
                ..base()
            },
            "queue_retry_jitter_percent",
            "101",
        );
        assert!(ServerConfig {
            queue_retry_jitter_percent: 100,
            queue_retry_delay_ms_min: 0,
            ..base()
        }
        .validate()
        .is_ok());
        // The default lease: 0 and past the maximum refused, the maximum accepted.
        refused(
            ServerConfig {
                queue_visibility_timeout_ms_default: 0,
                ..base()
            },
            "queue_visibility_timeout_ms_default",
            "0",
        );
        refused(
            ServerConfig {
                queue_visibility_timeout_ms_default: 1001,
                queue_visibility_timeout_ms_max: 1000,
                ..base()
            },
            "queue_visibility_timeout_ms_default",
            "1001",
        );
        assert!(ServerConfig {
            queue_visibility_timeout_ms_default: 1000,
            queue_visibility_timeout_ms_max: 1000,
            ..base()
        }
        .validate()
        .is_ok());
    }
}
