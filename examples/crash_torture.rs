//! Crash torture (issue 7): a real broker under a durable produce load is killed with
//! SIGKILL at random moments and restarted at once, CYCLES times; after every restart a
//! verifier reads every partition back and checks the durability contract.
//!
//! What it is: a test driver for the `shardq` binary as an operator runs it
//! (`shardq serve --data-dir D --listen 127.0.0.1:PORT --cores 2`), driven through the
//! tokio client. What it is not: a fault injector inside the broker (the storage tests do
//! that with `FaultyStorage`); here the faults are whole-process kills, the page cache
//! survives them, so it exercises recovery, group commit's ack ordering, restart and
//! start-up, not torn writes of a power cut.
//!
//! One cycle:
//! 1. several producers (own connections: the shared port and each shard's own port),
//!    acks=durable, small batches, explicit partitions spread over a topic whose
//!    partitions live on both shards, each payload unique (producer serial + sequence)
//!    and carrying a CRC32C of itself;
//! 2. after a random delay (seeded), SIGKILL, reap, and start the broker again at once
//!    (no sleep, no wait for ports: start-up after `kill -9` is the broker's job);
//! 3. wait, bounded, until the new broker answers a handshake on every port;
//! 4. read every partition from its log start to its high watermark and check:
//!    offsets dense from the log start; every acknowledged message present exactly once
//!    at the offset it was acknowledged with; no payload twice; every payload was sent,
//!    to that partition, and passes its checksum; every record seen by an earlier
//!    verification is still there unchanged (a consumer never sees what a crash takes
//!    back; offsets are never reused); a message found absent after a restart never
//!    comes back. Sent but unacknowledged messages may be present (at most once) or not.
//!
//! Memory is bounded: the topic is deleted and a new one created every `--rotate-every`
//! cycles or once it holds `--topic-records-max` records, so the full re-read and the
//! tables stay bounded. Every wait has a deadline. The broker child is killed on every
//! exit path: a guard kills it on return and on panic, SIGINT/SIGTERM/SIGHUP are caught,
//! and the child gets PR_SET_PDEATHSIG so it dies with this process even on SIGKILL.
//!
//! Replay: `--seed S` reproduces the kill delays and the load parameters of every cycle;
//! the interleaving of producers and the broker is up to the scheduler.
//!
//! Run it with `scripts/crash-torture.sh CYCLES [--seed S] [--json FILE]`.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::Parser;
use shardq::client::{
    Acks, Client, ClientConfig, ClientError, Producer, ProducerConfig, ProducerRecord, SendHandle,
};

/// How long a (re)started broker has to answer a handshake on every port.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long producers have, after the kill, to see every pending send fail.
const PRODUCERS_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The whole read-back of one verification.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(60);
/// Topic create and delete.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(20);
/// Bytes asked for per fetch while reading back.
const FETCH_BYTES_MAX: u32 = 1 << 20;
/// Sends a producer may have unanswered at once.
const PRODUCER_WINDOW_MAX: usize = 128;
/// Violations printed in full (all are counted).
const VIOLATIONS_PRINTED_MAX: usize = 20;

#[derive(Parser, Debug, Clone)]
#[command(about = "Kill -9 a real shardq broker under durable load, restart it, verify")]
struct Options {
    /// Kill/restart cycles to run.
    cycles: u64,
    /// Seed of the random choices (kill delays, load parameters); printed, for replay.
    #[arg(long)]
    seed: Option<u64>,
    /// Also write the summary as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The broker binary.
    #[arg(long, default_value = "target/release/shardq")]
    broker: PathBuf,
    /// Directory for the broker's data and log (default: a new one under $TMPDIR or
    /// /var/tmp, removed after a passing run and kept after a failing one).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Shared port (shard k listens on port + 1 + k); default: a free range.
    #[arg(long)]
    port: Option<u16>,
    /// Shards (`serve --cores`).
    #[arg(long, default_value_t = 2)]
    cores: u16,
    /// Concurrent producers, each on its own connection.
    #[arg(long, default_value_t = 4)]
    producers: u32,
    /// Partitions of each topic.
    #[arg(long, default_value_t = 8)]
    partitions: u32,
    /// Shortest time from the start of the load to the kill.
    #[arg(long, default_value_t = 30)]
    kill_ms_min: u64,
    /// Longest time from the start of the load to the kill.
    #[arg(long, default_value_t = 600)]
    kill_ms_max: u64,
    /// Start a new topic (deleting the old one) every this many cycles.
    #[arg(long, default_value_t = 50)]
    rotate_every: u64,
    /// Start a new topic once the current one holds this many records.
    #[arg(long, default_value_t = 250_000)]
    topic_records_max: u64,
}

fn main() -> ExitCode {
    let mut options = Options::parse();
    let seed = options.seed.unwrap_or_else(seed_from_clock);
    options.seed = Some(seed);
    if options.cycles == 0
        || options.producers == 0
        || options.partitions < u32::from(options.cores)
        || options.kill_ms_min > options.kill_ms_max
        || options.rotate_every == 0
    {
        eprintln!("crash-torture: need cycles >= 1, producers >= 1, partitions >= cores, kill-ms-min <= kill-ms-max, rotate-every >= 1");
        return ExitCode::from(2);
    }
    println!(
        "crash-torture: seed {seed} (replay with --seed {seed}), {} cycles",
        options.cycles
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread tokio runtime");
    // Everything, the broker spawns included, runs on this (the main) thread: that is
    // what makes PR_SET_PDEATHSIG mean "when this process dies" rather than "when some
    // worker thread exits".
    let local = tokio::task::LocalSet::new();
    let mut totals = Totals::default();
    let started = Instant::now();
    let outcome = local.block_on(&runtime, async {
        tokio::select! {
            outcome = run(&options, seed, &mut totals) => outcome,
            signal = shutdown_signal() => Err(Failure::Interrupted(signal)),
        }
    });
    // The broker guard lived inside `run`'s future: dropped, so the broker is dead.
    let passed = outcome.is_ok();
    if let Err(failure) = &outcome {
        eprintln!("crash-torture: FAILED: {failure}");
    }
    let summary = totals.summary_line(seed, options.cycles, passed);
    println!("{summary}");
    if let Some(path) = &options.json {
        let json = totals.json(
            seed,
            &options,
            passed,
            outcome.as_ref().err(),
            started.elapsed(),
        );
        if let Err(error) = std::fs::write(path, format!("{json:#}\n")) {
            eprintln!("crash-torture: writing {}: {error}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn seed_from_clock() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64);
    SplitMix64::new(nanos ^ u64::from(std::process::id())).next_u64() >> 1
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut interrupt), Ok(mut terminate), Ok(mut hangup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        // Without handlers the default actions stay, and PR_SET_PDEATHSIG still takes
        // the broker down with us.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
        _ = hangup.recv() => "SIGHUP",
    }
}

/// Why a run stopped before its last cycle passed.
#[derive(Debug)]
enum Failure {
    /// The verifier found violations of the durability contract (printed above).
    Violations {
        cycle: u64,
        count: u64,
    },
    /// The broker did not come back, exited, or refused something it should not.
    Broker {
        cycle: u64,
        message: String,
    },
    /// This program could not do its own work (files, ports).
    Harness(String),
    Interrupted(&'static str),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Violations { cycle, count } => {
                write!(
                    f,
                    "cycle {cycle}: {count} violations of the durability contract"
                )
            }
            Failure::Broker { cycle, message } => {
                write!(f, "cycle {cycle}: broker failure: {message}")
            }
            Failure::Harness(message) => write!(f, "harness: {message}"),
            Failure::Interrupted(signal) => write!(f, "interrupted by {signal}"),
        }
    }
}

/// Counters over the whole run.
#[derive(Debug, Default, Clone)]
struct Totals {
    cycles_passed: u64,
    topics: u64,
    sent: u64,
    /// Acknowledged and then looked for by a verification.
    acknowledged: u64,
    /// Acknowledged in the cycle that failed before its verification could run.
    acknowledged_unverified: u64,
    /// Sent, not acknowledged, found after the restart.
    unacknowledged_kept: u64,
    /// Sent, not acknowledged, not found after the restart.
    unacknowledged_dropped: u64,
    /// Records read back, over every verification.
    records_verified: u64,
    violations: Violations,
    restart_ready_ms_max: u64,
    /// Where the failing run kept its data, if it did.
    kept_work_dir: Option<PathBuf>,
}

/// Violations by kind, as the verifier counts them.
#[derive(Debug, Default, Clone, Copy)]
struct Violations {
    /// Acknowledged, and not anywhere in its partition.
    lost: u64,
    /// A payload found more than once (each extra copy counts).
    duplicated: u64,
    /// A payload never sent, sent to another partition, failing its checksum, or found
    /// absent after an earlier restart and back now.
    out_of_nowhere: u64,
    /// Acknowledged with one offset, found at another.
    misplaced: u64,
    /// An offset an earlier verification read now holds something else, or is gone.
    rewritten: u64,
    /// Offsets not dense: a record at an unexpected offset, or a log start above 0.
    offset_gaps: u64,
}

impl Violations {
    fn total(&self) -> u64 {
        self.lost
            + self.duplicated
            + self.out_of_nowhere
            + self.misplaced
            + self.rewritten
            + self.offset_gaps
    }

    fn add(&mut self, other: &Violations) {
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.out_of_nowhere += other.out_of_nowhere;
        self.misplaced += other.misplaced;
        self.rewritten += other.rewritten;
        self.offset_gaps += other.offset_gaps;
    }
}

impl Totals {
    fn summary_line(&self, seed: u64, cycles: u64, passed: bool) -> String {
        let v = &self.violations;
        format!(
            "crash-torture: {} cycles={}/{} acknowledged={} acknowledged_unverified={} lost={} duplicated={} out_of_nowhere={} misplaced={} rewritten={} offset_gaps={} sent={} unacknowledged_kept={} unacknowledged_dropped={} records_verified={} topics={} restart_ready_ms_max={} seed={}",
            if passed { "PASS" } else { "FAIL" },
            self.cycles_passed,
            cycles,
            self.acknowledged,
            self.acknowledged_unverified,
            v.lost,
            v.duplicated,
            v.out_of_nowhere,
            v.misplaced,
            v.rewritten,
            v.offset_gaps,
            self.sent,
            self.unacknowledged_kept,
            self.unacknowledged_dropped,
            self.records_verified,
            self.topics,
            self.restart_ready_ms_max,
            seed
        )
    }

    fn json(
        &self,
        seed: u64,
        options: &Options,
        passed: bool,
        failure: Option<&Failure>,
        elapsed: Duration,
    ) -> serde_json::Value {
        let v = &self.violations;
        serde_json::json!({
            "result": if passed { "pass" } else { "fail" },
            "failure": failure.map(|failure| failure.to_string()),
            "seed": seed,
            "cycles_requested": options.cycles,
            "cycles_passed": self.cycles_passed,
            "acknowledged": self.acknowledged,
            "acknowledged_unverified": self.acknowledged_unverified,
            "lost": v.lost,
            "duplicated": v.duplicated,
            "out_of_nowhere": v.out_of_nowhere,
            "misplaced": v.misplaced,
            "rewritten": v.rewritten,
            "offset_gaps": v.offset_gaps,
            "sent": self.sent,
            "unacknowledged_kept": self.unacknowledged_kept,
            "unacknowledged_dropped": self.unacknowledged_dropped,
            "records_verified": self.records_verified,
            "topics": self.topics,
            "restart_ready_ms_max": self.restart_ready_ms_max,
            "elapsed_s": elapsed.as_secs_f64(),
            "producers": options.producers,
            "partitions": options.partitions,
            "cores": options.cores,
            "kill_ms_min": options.kill_ms_min,
            "kill_ms_max": options.kill_ms_max,
            "kept_work_dir": self.kept_work_dir.as_ref().map(|path| path.display().to_string()),
        })
    }
}

/// SplitMix64: tiny, seedable, good enough to pick delays and sizes.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `low..=high`.
    fn range(&mut self, low: u64, high: u64) -> u64 {
        assert!(low <= high, "range {low}..={high}");
        low + self.next_u64() % (high - low + 1)
    }
}

// ---------------------------------------------------------------------------------------
// Payloads: "SQT1" | id u64 LE | padding length u16 LE | padding | CRC32C u32 LE of all
// the bytes before it. The id is (producer serial << 32) | sequence, unique in the run.

const PAYLOAD_MAGIC: &[u8; 4] = b"SQT1";
const PAYLOAD_FIXED_BYTES: usize = 4 + 8 + 2 + 4;

fn payload(id: u64, padding_bytes: u16) -> Bytes {
    let mut bytes = Vec::with_capacity(PAYLOAD_FIXED_BYTES + usize::from(padding_bytes));
    bytes.extend_from_slice(PAYLOAD_MAGIC);
    bytes.extend_from_slice(&id.to_le_bytes());
    bytes.extend_from_slice(&padding_bytes.to_le_bytes());
    bytes.extend(
        (0..padding_bytes).map(|index| b'a' + ((id as u16).wrapping_add(index) % 26) as u8),
    );
    let checksum = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&checksum.to_le_bytes());
    Bytes::from(bytes)
}

/// The payload's id, or why it is not one of ours.
fn parse_payload(bytes: &[u8]) -> Result<u64, String> {
    if bytes.len() < PAYLOAD_FIXED_BYTES || &bytes[..4] != PAYLOAD_MAGIC {
        return Err(format!("not a torture payload ({} bytes)", bytes.len()));
    }
    let padding_bytes = u16::from_le_bytes([bytes[12], bytes[13]]) as usize;
    if bytes.len() != PAYLOAD_FIXED_BYTES + padding_bytes {
        return Err(format!(
            "length {} does not match padding {padding_bytes}",
            bytes.len()
        ));
    }
    let (body, stored) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes([stored[0], stored[1], stored[2], stored[3]]);
    let computed = crc32c::crc32c(body);
    if stored != computed {
        return Err(format!("checksum {stored:08x} != computed {computed:08x}"));
    }
    Ok(u64::from_le_bytes(body[4..12].try_into().expect("8 bytes")))
}

fn describe_id(id: u64) -> String {
    format!("producer {} seq {}", id >> 32, id & 0xffff_ffff)
}

// ---------------------------------------------------------------------------------------
// The broker child and its guard.

struct Broker {
    binary: PathBuf,
    data_dir: PathBuf,
    log_path: PathBuf,
    listen: SocketAddr,
    cores: u16,
    child: Option<Child>,
}

impl Broker {
    fn spawn(&mut self, cycle: u64) -> Result<(), Failure> {
        assert!(self.child.is_none(), "one broker at a time");
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|error| harness(format!("{}: {error}", self.log_path.display())))?;
        // Marks where each life's output starts, for the tail printed on failure.
        writeln!(log, "=== crash-torture: start for cycle {cycle} ===")
            .map_err(|error| harness(format!("{}: {error}", self.log_path.display())))?;
        let stderr = log
            .try_clone()
            .map_err(|error| harness(format!("{}: {error}", self.log_path.display())))?;
        let mut command = Command::new(&self.binary);
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg(self.listen.to_string())
            .arg("--cores")
            .arg(self.cores.to_string())
            .args(["--metrics-listen", "off"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr);
        // SAFETY: the closure runs in the forked child before exec and only calls
        // prctl(2), which is async-signal-safe; it allocates nothing and takes no lock.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(|error| Failure::Broker {
            cycle,
            message: format!("cannot start {}: {error}", self.binary.display()),
        })?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL and reap; the exit status says whether our SIGKILL is what ended it.
    fn kill(&mut self) -> Result<ExitStatus, std::io::Error> {
        let mut child = self.child.take().expect("a broker to kill");
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        // `Child::kill` sends SIGKILL on Unix.
        child.kill()?;
        child.wait()
    }

    /// `Some(status)` if the broker has exited.
    fn exited(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        child.try_wait().ok().flatten()
    }

    fn log_tail(&self, lines: usize) -> String {
        let mut text = String::new();
        let Ok(mut file) = File::open(&self.log_path) else {
            return String::from("(no broker log)");
        };
        let length = file.metadata().map_or(0, |metadata| metadata.len());
        let from = length.saturating_sub(64 << 10);
        if file.seek(SeekFrom::Start(from)).is_err() || file.read_to_string(&mut text).is_err() {
            return String::from("(broker log unreadable)");
        }
        // This life's output only: from the last marker `spawn` wrote.
        let all: Vec<&str> = text.lines().collect();
        let life_start = all
            .iter()
            .rposition(|line| line.starts_with("=== crash-torture:"))
            .unwrap_or(0);
        let from = life_start.max(all.len().saturating_sub(lines));
        all[from..].join("\n")
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn harness(message: String) -> Failure {
    Failure::Harness(message)
}

/// A shared port with `cores` free ports after it, all on 127.0.0.1 (checked by binding
/// them), outside the kernel's ephemeral range: the producers' own connections take
/// ports from that range, and one could hold a broker port while the broker restarts.
/// A race with another program is still possible; the broker's `bind_retry_ms` rides
/// out a short one, and a long one shows as a start failure naming the port.
fn free_port_range(cores: u16, rng: &mut SplitMix64) -> Result<u16, Failure> {
    let (ephemeral_low, ephemeral_high) = ephemeral_port_range();
    let span = u64::from(cores) + 1;
    // Candidate bases: [10000, low - span] and [high + 1, 65535 - span + 1].
    let below = (10_000u64, u64::from(ephemeral_low).saturating_sub(span));
    let above = (
        u64::from(ephemeral_high) + 1,
        65_536u64.saturating_sub(span),
    );
    let windows: Vec<(u64, u64)> = [below, above]
        .into_iter()
        .filter(|(first, last)| first < last)
        .collect();
    if windows.is_empty() {
        return Err(harness(format!(
            "no port range outside the ephemeral range {ephemeral_low}-{ephemeral_high} fits {span} ports; pass --port"
        )));
    }
    for attempt in 0..200 {
        let (first, last) = windows[attempt % windows.len()];
        let base = rng.range(first, last) as u16;
        let free = (0..=cores).all(|index| TcpListener::bind(("127.0.0.1", base + index)).is_ok());
        if free {
            return Ok(base);
        }
    }
    Err(harness(String::from(
        "no free port range found in 200 tries",
    )))
}

/// The kernel's ephemeral port range (`net.ipv4.ip_local_port_range`), or Linux's
/// default where it cannot be read.
fn ephemeral_port_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut fields = text.split_whitespace().map(str::parse::<u16>);
            Some((fields.next()?.ok()?, fields.next()?.ok()?))
        })
        .unwrap_or((32_768, 60_999))
}

// ---------------------------------------------------------------------------------------
// What was sent and acknowledged, per topic.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Presence {
    /// Sent in the current cycle, not verified yet.
    Pending,
    /// Found by a verification, at this offset.
    Present(u64),
    /// Not acknowledged and not found after a restart: must never appear.
    Gone,
}

#[derive(Debug, Clone, Copy)]
struct SentRecord {
    partition: u32,
    acked_offset: Option<u64>,
    presence: Presence,
}

/// One topic's history. Rebuilt from scratch when the topic is rotated.
struct TopicState {
    name: String,
    partitions: u32,
    sent: HashMap<u64, SentRecord>,
    /// Per partition, the id at each offset as the last verification read it.
    verified: Vec<Vec<u64>>,
    /// Cycles this topic has been through.
    cycles: u64,
}

impl TopicState {
    fn new(name: String, partitions: u32) -> Self {
        TopicState {
            name,
            partitions,
            sent: HashMap::new(),
            verified: vec![Vec::new(); partitions as usize],
            cycles: 0,
        }
    }

    fn records(&self) -> u64 {
        self.verified
            .iter()
            .map(|offsets| offsets.len() as u64)
            .sum()
    }
}

/// What one producer did in one cycle.
#[derive(Debug, Default)]
struct ProducerReport {
    sent: u64,
    acknowledged: u64,
    /// An error seen before the kill: the broker refused what it should have taken.
    error_before_kill: Option<String>,
}

struct CycleLoad {
    topic: Rc<RefCell<TopicState>>,
    killed: Rc<std::cell::Cell<bool>>,
}

/// Sends until the kill, keeping up to `PRODUCER_WINDOW_MAX` sends unanswered, then waits
/// (bounded) for every send to be answered or fail.
async fn produce(
    producer: Producer,
    serial: u32,
    mut rng: SplitMix64,
    load: Rc<CycleLoad>,
) -> ProducerReport {
    let mut report = ProducerReport::default();
    let topic_name = load.topic.borrow().name.clone();
    let partitions = load.topic.borrow().partitions;
    let padding_max = rng.range(0, 600) as u16;
    let mut window: std::collections::VecDeque<(u64, SendHandle)> = Default::default();
    let mut sequence: u32 = 0;
    let mut drain_deadline: Option<Instant> = None;
    loop {
        // After the kill, or after an error before it (the run will fail), send nothing
        // more and drain what is in flight.
        let stopping = load.killed.get() || report.error_before_kill.is_some();
        if stopping && drain_deadline.is_none() {
            drain_deadline = Some(Instant::now() + PRODUCERS_DRAIN_TIMEOUT);
        }
        let must_wait = stopping || window.len() >= PRODUCER_WINDOW_MAX;
        let front_done = window
            .front()
            .is_some_and(|(_, handle)| handle.try_result().is_some());
        if must_wait || front_done {
            let Some((id, handle)) = window.pop_front() else {
                break;
            };
            let outcome = match drain_deadline {
                Some(deadline) => {
                    match tokio::time::timeout_at(deadline.into(), handle.wait()).await {
                        Ok(outcome) => outcome,
                        Err(_elapsed) => {
                            report.error_before_kill.get_or_insert(format!(
                                "a send was still unanswered {} s after the producer stopped (client bug?)",
                                PRODUCERS_DRAIN_TIMEOUT.as_secs()
                            ));
                            return report;
                        }
                    }
                }
                None => handle.wait().await,
            };
            record_outcome(&load, id, outcome, &mut report);
            continue;
        }
        // Send one more.
        let id = (u64::from(serial) << 32) | u64::from(sequence);
        sequence = sequence
            .checked_add(1)
            .expect("fewer than 2^32 sends per producer and cycle");
        let partition = rng.range(0, u64::from(partitions) - 1) as u32;
        let padding = rng.range(0, u64::from(padding_max)) as u16;
        load.topic.borrow_mut().sent.insert(
            id,
            SentRecord {
                partition,
                acked_offset: None,
                presence: Presence::Pending,
            },
        );
        report.sent += 1;
        let record = ProducerRecord::new(payload(id, padding)).with_partition(partition);
        match producer.send(&topic_name, record).await {
            Ok(handle) => window.push_back((id, handle)),
            Err(error) => {
                // Refused by the client before it was queued: never sent, so the
                // verifier must count it as out of nowhere if it ever shows up.
                load.topic.borrow_mut().sent.remove(&id);
                report.sent -= 1;
                if !load.killed.get() {
                    report.error_before_kill = Some(format!("send refused: {}", error.report()));
                    return report;
                }
                // After the kill: the loop now drains what is in flight.
            }
        }
    }
    report
}

fn record_outcome(
    load: &CycleLoad,
    id: u64,
    outcome: Result<shardq::client::RecordMetadata, ClientError>,
    report: &mut ProducerReport,
) {
    match outcome {
        Ok(metadata) => {
            let mut topic = load.topic.borrow_mut();
            let sent = topic.sent.get_mut(&id).expect("every sent id is recorded");
            assert_eq!(
                sent.partition, metadata.partition,
                "the producer routes explicit partitions"
            );
            let offset = metadata.offset;
            sent.acked_offset = Some(offset);
            report.acknowledged += 1;
        }
        Err(error) => {
            if !load.killed.get() && report.error_before_kill.is_none() {
                report.error_before_kill =
                    Some(format!("{} refused: {}", describe_id(id), error.report()));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The run.

async fn run(options: &Options, seed: u64, totals: &mut Totals) -> Result<(), Failure> {
    let mut rng = SplitMix64::new(seed);
    let port = match options.port {
        Some(port) => port,
        None => free_port_range(options.cores, &mut rng)?,
    };
    let (work_dir, made_work_dir) = match &options.work_dir {
        Some(path) => (path.clone(), false),
        None => {
            let parent = std::env::var_os("TMPDIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/tmp"));
            let path = parent.join(format!(
                "shardq-crash-torture.{}.{seed}",
                std::process::id()
            ));
            (path, true)
        }
    };
    let data_dir = work_dir.join("data");
    std::fs::create_dir_all(&data_dir)
        .map_err(|error| harness(format!("{}: {error}", data_dir.display())))?;
    let listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], port));
    println!(
        "crash-torture: broker {} on {listen} (shard ports {}..={}), {} shards, work dir {}",
        options.broker.display(),
        port + 1,
        port + options.cores,
        options.cores,
        work_dir.display()
    );
    let mut broker = Broker {
        binary: options.broker.clone(),
        data_dir,
        log_path: work_dir.join("broker.log"),
        listen,
        cores: options.cores,
        child: None,
    };
    let result = run_cycles(options, &mut rng, &mut broker, totals).await;
    drop(broker);
    match &result {
        Ok(()) if made_work_dir => {
            if let Err(error) = std::fs::remove_dir_all(&work_dir) {
                eprintln!("crash-torture: removing {}: {error}", work_dir.display());
            }
        }
        Ok(()) => {}
        Err(_) => {
            eprintln!(
                "crash-torture: data and broker log kept in {}",
                work_dir.display()
            );
            totals.kept_work_dir = Some(work_dir);
        }
    }
    result
}

async fn run_cycles(
    options: &Options,
    rng: &mut SplitMix64,
    broker: &mut Broker,
    totals: &mut Totals,
) -> Result<(), Failure> {
    broker.spawn(0)?;
    let ready = wait_ready(broker, options.cores, 0).await?;
    let mut admin = ready.client;
    let mut topic: Option<Rc<RefCell<TopicState>>> = None;
    let mut producer_serial: u32 = 0;
    for cycle in 1..=options.cycles {
        let cycle_started = Instant::now();
        // A new topic when there is none or the current one is due for rotation.
        let rotate = topic.as_ref().is_none_or(|state| {
            let state = state.borrow();
            state.cycles >= options.rotate_every || state.records() >= options.topic_records_max
        });
        if rotate {
            if let Some(old) = topic.take() {
                let name = old.borrow().name.clone();
                admin_call(cycle, "delete topic", admin.delete_topic(&name)).await?;
            }
            totals.topics += 1;
            let name = format!("torture-{}", totals.topics);
            admin_call(
                cycle,
                "create topic",
                admin.create_topic(&name, options.partitions),
            )
            .await?;
            check_new_topic(&admin, &name, options, cycle).await?;
            topic = Some(Rc::new(RefCell::new(TopicState::new(
                name,
                options.partitions,
            ))));
        }
        let topic_state = topic.clone().expect("a topic");
        topic_state.borrow_mut().cycles += 1;
        let topic_name = topic_state.borrow().name.clone();

        // Load: connect every producer first, so that none connects after the kill (to
        // the next broker) and produces while the verifier reads.
        let kill_after = Duration::from_millis(rng.range(options.kill_ms_min, options.kill_ms_max));
        let load = Rc::new(CycleLoad {
            topic: topic_state.clone(),
            killed: Rc::new(std::cell::Cell::new(false)),
        });
        let mut tasks = Vec::new();
        for index in 0..options.producers {
            producer_serial = producer_serial
                .checked_add(1)
                .expect("fewer than 2^32 producers");
            // Producer 0 uses the shared port (SO_REUSEPORT picks the shard; the broker
            // forwards to owners); the others use shard ports in turn (the owner of half
            // the partitions, forwarding for the rest).
            let address = if index == 0 {
                broker.listen
            } else {
                let shard = (index - 1) % u32::from(options.cores);
                SocketAddr::from(([127, 0, 0, 1], broker.listen.port() + 1 + shard as u16))
            };
            let client = connect(address)
                .await
                .map_err(|message| Failure::Broker { cycle, message })?;
            let producer = ProducerConfig::builder()
                .acks(Acks::Durable)
                .linger_ms(rng.range(0, 2))
                .batch_records_max(rng.range(1, 32) as u32)
                .requests_in_flight_max(rng.range(1, 4) as usize)
                .request_timeout_ms(10_000)
                .buffer_bytes_max(4 << 20)
                .build()
                .and_then(|config| Producer::new(client, config));
            let producer = producer.map_err(|error| Failure::Broker {
                cycle,
                message: format!("producer: {error}"),
            })?;
            let producer_rng = SplitMix64::new(rng.next_u64());
            tasks.push(tokio::task::spawn_local(produce(
                producer,
                producer_serial,
                producer_rng,
                load.clone(),
            )));
        }
        tokio::time::sleep(kill_after).await;
        // Flag first: every error a producer sees from here on may be the kill's.
        load.killed.set(true);
        let status = broker
            .kill()
            .map_err(|error| harness(format!("kill -9 the broker: {error}")))?;
        if status.signal() != Some(libc::SIGKILL) {
            // It was already dead: it exited or crashed under load, before the kill.
            let mut errors = Vec::new();
            for task in tasks {
                if let Ok(Ok(report)) =
                    tokio::time::timeout(PRODUCERS_DRAIN_TIMEOUT * 2, task).await
                {
                    totals.sent += report.sent;
                    totals.acknowledged_unverified += report.acknowledged;
                    errors.extend(report.error_before_kill);
                }
            }
            return Err(Failure::Broker {
                cycle,
                message: format!(
                    "the broker died by itself under load, before the kill due {} ms into the cycle ({status}); producers saw:\n  {}\nits log ends:\n{}",
                    kill_after.as_millis(),
                    errors.join("\n  "),
                    broker.log_tail(20)
                ),
            });
        }
        // At once: no sleep, no waiting for ports.
        broker.spawn(cycle)?;
        let restarted = Instant::now();

        // Every producer task ends: its sends fail with the broken connection.
        let mut sent = 0;
        let mut acknowledged = 0;
        let mut producer_errors = Vec::new();
        for task in tasks {
            match tokio::time::timeout(PRODUCERS_DRAIN_TIMEOUT * 2, task).await {
                Ok(Ok(report)) => {
                    sent += report.sent;
                    acknowledged += report.acknowledged;
                    if let Some(error) = report.error_before_kill {
                        producer_errors.push(error);
                    }
                }
                Ok(Err(join_error)) => producer_errors.push(format!("producer task: {join_error}")),
                Err(_elapsed) => producer_errors.push(String::from("producer task did not end")),
            }
        }
        totals.sent += sent;
        // Counted as acknowledged once a verification has looked for them.
        totals.acknowledged_unverified = acknowledged;
        // Old connections are dead; drop the admin client of the old broker.
        admin.close();
        let ready = wait_ready(broker, options.cores, cycle).await?;
        let ready_ms = restarted.elapsed().as_millis() as u64;
        totals.restart_ready_ms_max = totals.restart_ready_ms_max.max(ready_ms);
        admin = ready.client;
        if !producer_errors.is_empty() {
            return Err(Failure::Broker {
                cycle,
                message: format!(
                    "errors before the kill:\n  {}",
                    producer_errors.join("\n  ")
                ),
            });
        }

        let read = read_topic(&admin, &topic_name, options.partitions, cycle).await?;
        let verdict = check(&mut topic_state.borrow_mut(), &read);
        drop(read);
        for report in &verdict.reports {
            eprintln!("crash-torture: cycle {cycle} topic {topic_name}: {report}");
        }
        totals.acknowledged += acknowledged;
        totals.acknowledged_unverified = 0;
        totals.records_verified += verdict.records;
        totals.unacknowledged_kept += verdict.unacknowledged_kept;
        totals.unacknowledged_dropped += verdict.unacknowledged_dropped;
        totals.violations.add(&verdict.violations);
        let status = if verdict.violations.total() == 0 {
            "ok".to_owned()
        } else {
            format!("{} VIOLATIONS", verdict.violations.total())
        };
        println!(
            "cycle {cycle}/{}: {topic_name} kill at {} ms, sent {sent} acked {acknowledged} (unacked kept {} dropped {}), ready in {ready_ms} ms, verified {} records, {} ms: {status}",
            options.cycles,
            kill_after.as_millis(),
            verdict.unacknowledged_kept,
            verdict.unacknowledged_dropped,
            verdict.records,
            cycle_started.elapsed().as_millis()
        );
        if verdict.violations.total() > 0 {
            return Err(Failure::Violations {
                cycle,
                count: verdict.violations.total(),
            });
        }
        totals.cycles_passed = cycle;
    }
    admin.close();
    Ok(())
}

async fn admin_call(
    cycle: u64,
    what: &str,
    call: impl std::future::Future<Output = Result<(), ClientError>>,
) -> Result<(), Failure> {
    match tokio::time::timeout(ADMIN_TIMEOUT, call).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(Failure::Broker {
            cycle,
            message: format!("{what}: {}", error.report()),
        }),
        Err(_elapsed) => Err(Failure::Broker {
            cycle,
            message: format!("{what}: no answer in {} s", ADMIN_TIMEOUT.as_secs()),
        }),
    }
}

/// A fresh topic: every partition empty, and both (all) shards own some.
async fn check_new_topic(
    admin: &Client,
    name: &str,
    options: &Options,
    cycle: u64,
) -> Result<(), Failure> {
    let broker_failure = |message: String| Failure::Broker { cycle, message };
    let metadata = admin
        .metadata(&[name])
        .await
        .map_err(|error| broker_failure(format!("metadata: {}", error.report())))?;
    let entry = metadata
        .topics
        .iter()
        .find(|entry| entry.name == name)
        .ok_or_else(|| broker_failure(format!("metadata lacks topic {name}")))?;
    if entry.partitions.len() != options.partitions as usize {
        return Err(broker_failure(format!(
            "topic {name} has {} partitions, created with {}",
            entry.partitions.len(),
            options.partitions
        )));
    }
    let owners: HashSet<u16> = entry
        .partitions
        .iter()
        .map(|partition| partition.shard)
        .collect();
    if owners.len() != usize::from(options.cores) {
        return Err(harness(format!(
            "topic {name}: partitions are owned by shards {owners:?}, not by all {} shards; use more partitions",
            options.cores
        )));
    }
    for partition in 0..options.partitions {
        let (start, end) = admin
            .partition_offsets(name, partition)
            .await
            .map_err(|error| broker_failure(format!("list offsets: {}", error.report())))?;
        if (start, end) != (0, 0) {
            return Err(broker_failure(format!(
                "new topic {name} partition {partition} is not empty: offsets {start}..{end}"
            )));
        }
    }
    Ok(())
}

async fn connect(address: SocketAddr) -> Result<Client, String> {
    let config = ClientConfig::builder()
        .client_name("crash-torture")
        .request_timeout_ms(10_000)
        // Each cycle's producers end with the kill: every send pending then must fail
        // (and be verified as kept or dropped), not wait for the next broker.
        .reconnect(false)
        .build()
        .map_err(|error| format!("client settings: {}", error.report()))?;
    Client::connect_with(address, config)
        .await
        .map_err(|error| format!("connect to {address}: {}", error.report()))
}

struct Ready {
    client: Client,
}

/// Waits until the broker answers a handshake on its shared port and on every shard's
/// port, for at most `READY_TIMEOUT`. Fails at once if the broker exits.
async fn wait_ready(broker: &mut Broker, cores: u16, cycle: u64) -> Result<Ready, Failure> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut addresses = vec![broker.listen];
    for shard in 0..cores {
        addresses.push(SocketAddr::from((
            [127, 0, 0, 1],
            broker.listen.port() + 1 + shard,
        )));
    }
    let mut clients = Vec::new();
    let mut last_error = String::from("none yet");
    while clients.len() < addresses.len() {
        if let Some(status) = broker.exited() {
            return Err(Failure::Broker {
                cycle,
                message: format!(
                    "the restarted broker exited ({status}) before it was ready; its log ends:\n{}",
                    broker.log_tail(20)
                ),
            });
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Failure::Broker {
                cycle,
                message: format!(
                    "the broker did not answer on {} within {} s (last error: {last_error}); its log ends:\n{}",
                    addresses[clients.len()],
                    READY_TIMEOUT.as_secs(),
                    broker.log_tail(20)
                ),
            });
        }
        let address = addresses[clients.len()];
        // A connection the kernel queued for a listener that never accepts (a lingering
        // socket of the killed process) must not eat the whole deadline at once.
        let attempt = (deadline - now).min(Duration::from_secs(2));
        match tokio::time::timeout(attempt, connect(address)).await {
            Ok(Ok(client)) => clients.push(client),
            Ok(Err(error)) => {
                last_error = error;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(_elapsed) => {
                last_error = format!("connect to {address}: no handshake in {attempt:?}")
            }
        }
    }
    let client = clients.swap_remove(0);
    for other in clients {
        other.close();
    }
    Ok(Ready { client })
}

// ---------------------------------------------------------------------------------------
// The verifier: `read_topic` reads (I/O), `check` judges (pure, unit-tested below).

/// One partition as read back.
#[derive(Debug, Default)]
struct PartitionRead {
    log_start: u64,
    high_watermark: u64,
    /// `(offset, payload id or why the payload is not one of ours)`, in the order read.
    records: Vec<(u64, Result<u64, String>)>,
}

#[derive(Debug, Default)]
struct Verdict {
    records: u64,
    unacknowledged_kept: u64,
    unacknowledged_dropped: u64,
    violations: Violations,
    /// The first `VIOLATIONS_PRINTED_MAX` violations, described.
    reports: Vec<String>,
}

impl Verdict {
    fn report(&mut self, kind: &str, text: String) {
        if self.reports.len() < VIOLATIONS_PRINTED_MAX {
            self.reports.push(format!("{kind}: {text}"));
        }
    }
}

/// Reads every partition of the topic from its log start to its high watermark.
async fn read_topic(
    client: &Client,
    name: &str,
    partitions: u32,
    cycle: u64,
) -> Result<Vec<PartitionRead>, Failure> {
    let deadline = Instant::now() + VERIFY_TIMEOUT;
    let broker_failure = |message: String| Failure::Broker { cycle, message };
    let mut read = Vec::with_capacity(partitions as usize);
    for partition in 0..partitions {
        let (log_start, high_watermark) =
            timed(deadline, client.partition_offsets(name, partition))
                .await
                .map_err(|error| {
                    broker_failure(format!("list offsets of partition {partition}: {error}"))
                })?;
        let mut records = Vec::with_capacity(high_watermark.saturating_sub(log_start) as usize);
        let mut next = log_start;
        while next < high_watermark {
            let fetched = timed(
                deadline,
                client.fetch_records(name, partition, next, 0, FETCH_BYTES_MAX),
            )
            .await
            .map_err(|error| {
                broker_failure(format!(
                    "fetch partition {partition} at {next} (high watermark {high_watermark}): {error}"
                ))
            })?;
            let below: Vec<_> = fetched
                .records
                .iter()
                .filter(|record| record.offset < high_watermark)
                .collect();
            let Some(last) = below.last() else {
                return Err(broker_failure(format!(
                    "fetch partition {partition} at {next} returned nothing below high watermark {high_watermark}"
                )));
            };
            // Progress is by the offsets the broker returned; `check` judges them.
            let resume = last.offset + 1;
            if resume <= next {
                return Err(broker_failure(format!(
                    "fetch partition {partition} at {next} returned only offsets up to {}",
                    last.offset
                )));
            }
            for record in below {
                records.push((record.offset, parse_payload(&record.value)));
            }
            next = resume;
        }
        read.push(PartitionRead {
            log_start,
            high_watermark,
            records,
        });
    }
    Ok(read)
}

/// Checks what was read against what was sent, acknowledged and verified before; then
/// keeps what was read as the verified state and settles this cycle's sends.
fn check(state: &mut TopicState, read: &[PartitionRead]) -> Verdict {
    assert_eq!(
        read.len(),
        state.partitions as usize,
        "one read per partition"
    );
    let mut verdict = Verdict::default();
    // Per partition, the id at each offset from 0 (u64::MAX: unreadable or missing).
    let mut by_offset: Vec<Vec<u64>> = Vec::with_capacity(read.len());
    // Where each id was found first: (partition, offset).
    let mut found: HashMap<u64, (u32, u64)> = HashMap::new();
    for (partition, partition_read) in read.iter().enumerate() {
        let partition = partition as u32;
        if partition_read.log_start != 0 {
            verdict.violations.offset_gaps += 1;
            verdict.report(
                "offsets",
                format!(
                    "partition {partition} log start is {}, not 0 (the topic has no retention)",
                    partition_read.log_start
                ),
            );
        }
        let mut ids: Vec<u64> = Vec::with_capacity(partition_read.high_watermark as usize);
        let mut next = partition_read.log_start;
        for (offset, parsed) in &partition_read.records {
            let offset = *offset;
            if offset != next {
                verdict.violations.offset_gaps += 1;
                verdict.report(
                    "offsets",
                    format!("partition {partition}: expected offset {next}, read {offset}"),
                );
                if offset < next {
                    continue;
                }
            }
            ids.resize(offset as usize, u64::MAX);
            next = offset + 1;
            let id = match parsed {
                Ok(id) => *id,
                Err(why) => {
                    verdict.violations.out_of_nowhere += 1;
                    verdict.report(
                        "out of nowhere",
                        format!("partition {partition} offset {offset}: {why}"),
                    );
                    ids.push(u64::MAX);
                    continue;
                }
            };
            ids.push(id);
            if let Some(&(first_partition, first_offset)) = found.get(&id) {
                verdict.violations.duplicated += 1;
                verdict.report(
                    "duplicated",
                    format!(
                        "{} at partition {partition} offset {offset}, already at partition {first_partition} offset {first_offset}",
                        describe_id(id)
                    ),
                );
                continue;
            }
            found.insert(id, (partition, offset));
            match state.sent.get(&id) {
                None => {
                    verdict.violations.out_of_nowhere += 1;
                    verdict.report(
                        "out of nowhere",
                        format!(
                            "partition {partition} offset {offset}: {} was never sent",
                            describe_id(id)
                        ),
                    );
                }
                Some(sent) if sent.partition != partition => {
                    verdict.violations.out_of_nowhere += 1;
                    verdict.report(
                        "out of nowhere",
                        format!(
                            "partition {partition} offset {offset}: {} was sent to partition {}",
                            describe_id(id),
                            sent.partition
                        ),
                    );
                }
                Some(sent) if sent.presence == Presence::Gone => {
                    verdict.violations.out_of_nowhere += 1;
                    verdict.report(
                        "out of nowhere",
                        format!(
                            "partition {partition} offset {offset}: {} was absent after an earlier restart and is back",
                            describe_id(id)
                        ),
                    );
                }
                Some(_) => {}
            }
        }
        if next != partition_read.high_watermark {
            verdict.violations.offset_gaps += 1;
            verdict.report(
                "offsets",
                format!(
                    "partition {partition}: records end at {next}, high watermark is {}",
                    partition_read.high_watermark
                ),
            );
        }
        by_offset.push(ids);
    }

    // Offsets read before hold what they held: nothing read is taken back, nothing reused.
    for (partition, before) in state.verified.iter().enumerate() {
        let now = &by_offset[partition];
        for (offset, id) in before.iter().enumerate() {
            if now.get(offset) == Some(id) {
                continue;
            }
            verdict.violations.rewritten += 1;
            let now_text = match now.get(offset) {
                Some(&u64::MAX) => String::from("nothing readable"),
                Some(other) => describe_id(*other),
                None => format!("nothing (the partition now ends at {})", now.len()),
            };
            verdict.report(
                "rewritten",
                format!(
                    "partition {partition} offset {offset} held {} and now holds {now_text}",
                    describe_id(*id)
                ),
            );
        }
    }

    // Every acknowledged record is where it was acknowledged; this cycle's sends settle.
    for (id, sent) in state.sent.iter_mut() {
        let here = found.get(id).copied();
        if let Some(acked_offset) = sent.acked_offset {
            match here {
                None => {
                    verdict.violations.lost += 1;
                    let partition_ids = &by_offset[sent.partition as usize];
                    let holder = match partition_ids.get(acked_offset as usize) {
                        Some(&u64::MAX) => String::from("nothing readable"),
                        Some(other) => describe_id(*other),
                        None => String::from("nothing"),
                    };
                    verdict.report(
                        "lost",
                        format!(
                            "{} acknowledged at partition {} offset {acked_offset} is not in the topic (the partition ends at {}; offset {acked_offset} holds {holder})",
                            describe_id(*id),
                            sent.partition,
                            partition_ids.len()
                        ),
                    );
                }
                Some((partition, offset))
                    if (partition, offset) != (sent.partition, acked_offset) =>
                {
                    verdict.violations.misplaced += 1;
                    verdict.report(
                        "misplaced",
                        format!(
                            "{} acknowledged at partition {} offset {acked_offset}, found at partition {partition} offset {offset}",
                            describe_id(*id),
                            sent.partition
                        ),
                    );
                }
                Some(_) => {}
            }
        }
        match (sent.presence, here) {
            (Presence::Pending, Some((_, offset))) => {
                if sent.acked_offset.is_none() {
                    verdict.unacknowledged_kept += 1;
                }
                sent.presence = Presence::Present(offset);
            }
            (Presence::Pending, None) => {
                if sent.acked_offset.is_none() {
                    verdict.unacknowledged_dropped += 1;
                }
                sent.presence = Presence::Gone;
            }
            // A present record gone now was counted as rewritten above.
            (Presence::Present(_), _) | (Presence::Gone, _) => {}
        }
    }
    verdict.records = by_offset.iter().map(|ids| ids.len() as u64).sum();
    state.verified = by_offset;
    verdict
}

async fn timed<T>(
    deadline: Instant,
    call: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, String> {
    match tokio::time::timeout_at(deadline.into(), call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(error.report().to_string()),
        Err(_elapsed) => Err(format!(
            "verification took longer than {} s",
            VERIFY_TIMEOUT.as_secs()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P0: u64 = 1 << 32; // producer 1, sequence 0

    fn sent(state: &mut TopicState, id: u64, partition: u32, acked_offset: Option<u64>) {
        state.sent.insert(
            id,
            SentRecord {
                partition,
                acked_offset,
                presence: Presence::Pending,
            },
        );
    }

    fn partition(records: &[(u64, u64)]) -> PartitionRead {
        PartitionRead {
            log_start: 0,
            high_watermark: records.last().map_or(0, |(offset, _)| offset + 1),
            records: records
                .iter()
                .map(|(offset, id)| (*offset, Ok(*id)))
                .collect(),
        }
    }

    fn empty() -> PartitionRead {
        PartitionRead::default()
    }

    #[test]
    fn payload_round_trip_and_checksum() {
        let bytes = payload(0x0000_0007_0000_0042, 33);
        assert_eq!(parse_payload(&bytes), Ok(0x0000_0007_0000_0042));
        let mut damaged = bytes.to_vec();
        damaged[20] ^= 1;
        assert!(parse_payload(&damaged).is_err());
        assert!(parse_payload(b"short").is_err());
    }

    #[test]
    fn check_passes_acked_present_and_unacked_either_way() {
        let mut state = TopicState::new("t".into(), 2);
        sent(&mut state, P0, 0, Some(0));
        sent(&mut state, P0 + 1, 0, None);
        sent(&mut state, P0 + 2, 1, None);
        let verdict = check(&mut state, &[partition(&[(0, P0), (1, P0 + 1)]), empty()]);
        assert_eq!(verdict.violations.total(), 0, "{:?}", verdict.reports);
        assert_eq!(
            (verdict.unacknowledged_kept, verdict.unacknowledged_dropped),
            (1, 1)
        );
        assert_eq!(state.sent[&(P0 + 2)].presence, Presence::Gone);
    }

    #[test]
    fn check_finds_lost_and_misplaced() {
        let mut state = TopicState::new("t".into(), 1);
        sent(&mut state, P0, 0, Some(0));
        sent(&mut state, P0 + 1, 0, Some(1));
        sent(&mut state, P0 + 2, 0, Some(2));
        let verdict = check(&mut state, &[partition(&[(0, P0), (1, P0 + 2)])]);
        assert_eq!(verdict.violations.lost, 1, "{:?}", verdict.reports);
        assert_eq!(verdict.violations.misplaced, 1, "{:?}", verdict.reports);
    }

    #[test]
    fn check_finds_duplicates_and_strangers() {
        let mut state = TopicState::new("t".into(), 2);
        sent(&mut state, P0, 0, None);
        sent(&mut state, P0 + 1, 1, None);
        let read = [
            partition(&[(0, P0), (1, P0), (2, 99 << 32), (3, P0 + 1)]),
            PartitionRead {
                log_start: 0,
                high_watermark: 1,
                records: vec![(0, Err("checksum".into()))],
            },
        ];
        let verdict = check(&mut state, &read);
        assert_eq!(verdict.violations.duplicated, 1, "{:?}", verdict.reports);
        // Never sent, sent elsewhere, unreadable.
        assert_eq!(
            verdict.violations.out_of_nowhere, 3,
            "{:?}",
            verdict.reports
        );
    }

    #[test]
    fn check_finds_gaps_and_rewrites_and_resurrections() {
        let mut state = TopicState::new("t".into(), 1);
        sent(&mut state, P0, 0, None);
        sent(&mut state, P0 + 1, 0, None);
        sent(&mut state, P0 + 2, 0, None);
        let first = check(&mut state, &[partition(&[(0, P0), (1, P0 + 1)])]);
        assert_eq!(first.violations.total(), 0, "{:?}", first.reports);
        // Offset 1 changed, then a gap, and P0 + 2 was found gone before.
        let second = check(
            &mut state,
            &[partition(&[(0, P0), (1, P0 + 2), (3, P0 + 1)])],
        );
        assert_eq!(second.violations.rewritten, 1, "{:?}", second.reports);
        assert_eq!(second.violations.offset_gaps, 1, "{:?}", second.reports);
        assert_eq!(second.violations.out_of_nowhere, 1, "{:?}", second.reports);
        // And a partition shorter than before.
        let third = check(&mut state, &[partition(&[(0, P0)])]);
        assert_eq!(third.violations.rewritten, 3, "{:?}", third.reports);
    }
}
