//! The least a glommio server does for one durable single-message round trip: the
//! baseline that shardq's own cost per request is measured against (issue 10,
//! scripts/bench-latency.sh, docs/benchmarks.md).
//!
//! What it is: one executor pinned to one CPU, speaking just enough of shardq's wire
//! protocol (docs/protocol.md: Handshake, Metadata, CreateTopic, Produce) that the same
//! load generator as `shardq bench produce` drives it, so the client's own cost is in
//! both figures. Every produced batch is validated (framing, CRC, records), given dense
//! offsets in its partition, stamped, and written with the broker's durability
//! mechanism before the answer goes out: one file per partition, preallocated, opened
//! read + write with O_DIRECT through glommio's `DmaFile` (as `storage::DmaStorage::open`
//! does), 4 KiB-aligned block writes through io_uring, then `fdatasync` through io_uring
//! (or, with `--dsync`, the file opened O_DSYNC and no fdatasync). Batches are packed back
//! to back as in a segment and the partial tail block is rewritten by the next write, as
//! the log does, so a 1 KiB message starts a fresh block about once in four writes, like
//! the broker's.
//!
//! What it is not: a broker. No index, recovery, fetch, retention, idempotent-producer
//! table (the bench's producer resends nothing when nothing fails) or limits beyond the
//! frame size and the responses queued per connection. Like the broker, each request
//! runs as its own task and answers go out in completion order; one partition's writes
//! are serialised (one write + sync at a time, which also keeps the file in offset
//! order), different partitions' run at once, those of one request included (the bench
//! puts both partitions' batches in one request when both are ready). Unlike the broker's group commit, a batch
//! that arrives while its partition's round is running waits and has a round of its own.
//! At 1,000 msg/s a round ends long before the next batch of its partition arrives, so
//! there is rarely anything to merge, even though the bench's producer may now keep up
//! to 5 batches of a partition in flight (`--in-flight-per-partition`).
//!
//! ```text
//! durable_echo serve [--listen ADDR] [--cpu N] [--dir DIR] [--file-bytes N]
//!                    [--blocks written|fallocated] [--dsync] [--memory]
//! durable_echo client ADDR [--messages N] [--warmup N] [--message-size B]
//!                    [--acks durable|memory] [--topic NAME] [--rate N]
//! ```
//! `serve` prints `durable_echo serving on ADDR` once it accepts connections (port 0
//! picks a free one). CreateTopic makes `DIR/<topic>-<partition>.log` of `--file-bytes`
//! (default 64 MiB) for each partition, on the executor's blocking thread: `--blocks
//! written` (default) writes each file once with zeros, so every write overwrites written
//! blocks (a recycled segment); `--blocks fallocated` only reserves them (a fresh
//! segment: a write into a block not written before makes the next fdatasync commit an
//! unwritten-extent conversion). `--memory` answers without writing anything, and a
//! request with `acks = memory` is answered the same way. A partition whose file is full
//! writes from its start again (said on stderr: its blocks are written ones from then on).
//!
//! `client` is a blocking std client, one one-record Produce at a time: it creates the
//! topic (one partition) if missing, connects to the owning shard's port, and prints
//! round-trip percentiles in microseconds as one JSON object, like
//! `examples/tcp_pingpong.rs`. It drives durable_echo and shardq alike. By default it
//! sends the next request as soon as the last is answered, so neither side's CPU ever
//! goes idle; `--rate N` sends one request every 1/N s instead (sleeping in between, as
//! `shardq bench --rate` does), so each round trip starts from idle CPUs on both sides.
//! Each round trip is timed from its actual send, so the rate's timer is not in it.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::channels::local_channel;
use glommio::io::{DmaFile, OpenOptions};
use glommio::net::TcpListener;
use glommio::sync::Semaphore;
use glommio::{LocalExecutorBuilder, Placement};

use shardq::protocol::batch::{stamp_batch, validate_batch, BatchBuilder};
use shardq::protocol::{
    decode_frame_header, decode_response, encode_error_response, encode_response, Acks,
    CreateTopicRequest, DecodeLimits, Decoded, ErrorCode, HandshakeRequest, HandshakeResponse,
    MetadataRequest, MetadataResponse, Opcode, PartitionMetadata, ProducePartition,
    ProducePartitionResult, ProduceRequest, ProduceResponse, ProduceTopic, ProduceTopicResult,
    QueueSettings, Request, ResponseBody, Retention, TopicMetadata, WireError, FRAME_HEADER_SIZE,
    PROTOCOL_VERSION,
};

/// The block size of every write: the alignment O_DIRECT needs on this disk and the
/// broker's chunk alignment.
const BLOCK_BYTES: u64 = 4096;
/// The broker's defaults, so the client sizes batches and frames the same way.
const BATCH_BYTES_MAX: u32 = (1 << 20) - 4096;
const FRAME_BODY_BYTES_MAX: u32 = 16 << 20;
const BATCH_RECORDS_MAX: u32 = 100_000;
/// Partitions of one topic; every one has its own file.
const PARTITIONS_MAX: u32 = 64;
/// One socket read at most; requests of a single message are ~1.2 KB.
const READ_BYTES: usize = 64 << 10;
/// Responses queued for one connection's writer; a produce task waits beyond it.
const RESPONSES_QUEUED_MAX: usize = 1024;

fn main() {
    let mut arguments = std::env::args().skip(1);
    match arguments.next().as_deref() {
        Some("serve") => serve(ServeOptions::parse(arguments)),
        Some("client") => client(ClientOptions::parse(arguments)),
        _ => usage("the first argument is serve or client"),
    }
}

fn usage(problem: &str) -> ! {
    eprintln!("durable_echo: {problem}");
    eprintln!(
        "usage: durable_echo serve [--listen ADDR] [--cpu N] [--dir DIR] [--file-bytes N] \
         [--blocks written|fallocated] [--dsync] [--memory]\n       \
         durable_echo client ADDR [--messages N] [--warmup N] [--message-size B] \
         [--acks durable|memory] [--topic NAME] [--rate N]"
    );
    std::process::exit(2);
}

fn value<T: std::str::FromStr>(name: &str, text: Option<String>) -> T {
    let Some(text) = text else {
        usage(&format!("{name} needs a value"))
    };
    text.parse()
        .unwrap_or_else(|_| usage(&format!("{name}: {text:?} is not a valid value")))
}

// --- server ------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Blocks {
    /// Written once when the topic is created: writes overwrite written blocks.
    Written,
    /// Reserved with fallocate only: unwritten extents.
    Fallocated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sync {
    /// O_DIRECT write, then fdatasync (the broker's round).
    WriteThenFdatasync,
    /// File opened O_DSYNC: the write returns once durable.
    OpenDsync,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// Every `acks = durable` batch is written and synced before its answer.
    Durable(Sync),
    /// Nothing is written (`--memory`).
    Memory,
}

struct ServeOptions {
    listen: String,
    cpu: usize,
    directory: PathBuf,
    file_bytes: u64,
    blocks: Blocks,
    durability: Durability,
}

impl ServeOptions {
    fn parse(mut arguments: impl Iterator<Item = String>) -> ServeOptions {
        let mut options = ServeOptions {
            listen: "127.0.0.1:0".into(),
            cpu: 0,
            directory: PathBuf::from("durable_echo-data"),
            file_bytes: 64 << 20,
            blocks: Blocks::Written,
            durability: Durability::Durable(Sync::WriteThenFdatasync),
        };
        let mut dsync = false;
        let mut memory = false;
        while let Some(argument) = arguments.next() {
            match argument.as_str() {
                "--listen" => options.listen = value("--listen", arguments.next()),
                "--cpu" => options.cpu = value("--cpu", arguments.next()),
                "--dir" => options.directory = value("--dir", arguments.next()),
                "--file-bytes" => options.file_bytes = value("--file-bytes", arguments.next()),
                "--blocks" => {
                    options.blocks = match value::<String>("--blocks", arguments.next()).as_str() {
                        "written" => Blocks::Written,
                        "fallocated" => Blocks::Fallocated,
                        other => usage(&format!("--blocks {other:?}: written or fallocated")),
                    }
                }
                "--dsync" => dsync = true,
                "--memory" => memory = true,
                other => usage(&format!("unknown option {other:?}")),
            }
        }
        if options.file_bytes < 2 * u64::from(BATCH_BYTES_MAX)
            || options.file_bytes % BLOCK_BYTES != 0
        {
            usage("--file-bytes must be a multiple of 4096 and hold two of the largest batches");
        }
        options.durability = match (memory, dsync) {
            (true, _) => Durability::Memory,
            (false, true) => Durability::Durable(Sync::OpenDsync),
            (false, false) => Durability::Durable(Sync::WriteThenFdatasync),
        };
        options
    }
}

/// Makes one partition's file with blocking calls: created afresh, reserved with
/// fallocate (as the broker preallocates segments), written once with zeros for
/// `Blocks::Written`, and synced, so the first measured round pays no layout. The
/// executor then opens an existing file of at least 512 bytes, which also keeps clear
/// of glommio's polled-I/O probe pitfall (DESIGN.md, runtime notes).
fn prepare_file(path: &Path, size: u64, blocks: Blocks) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    // SAFETY: fallocate on a descriptor this function owns, mode 0 (allocate and extend
    // the size), with a non-negative range; it touches no memory of ours.
    let allocated = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size as libc::off_t) };
    if allocated != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if blocks == Blocks::Written {
        let zeros = vec![0u8; 1 << 20];
        let mut written = 0;
        let mut writer = &file;
        while written < size {
            let length = (size - written).min(zeros.len() as u64) as usize;
            writer.write_all(&zeros[..length])?;
            written += length as u64;
        }
    }
    file.sync_all()
}

/// Where a partition's next batch goes: the byte position after its last batch and a
/// copy of the partial tail block, which the next write rewrites with the new bytes.
struct Tail {
    position: u64,
    block: Vec<u8>,
}

/// One partition: its file (none with `--memory`), its next offset and its tail.
struct Partition {
    file: Option<DmaFile>,
    file_bytes: u64,
    sync: Sync,
    next_offset: Cell<u64>,
    tail: RefCell<Tail>,
    /// One write + sync at a time: two in flight would both rewrite the shared tail
    /// block, and the older one could land last.
    round: Semaphore,
    wrapped: Cell<bool>,
}

struct Server {
    directory: PathBuf,
    file_bytes: u64,
    blocks: Blocks,
    durability: Durability,
    port: u16,
    topics: RefCell<HashMap<String, Vec<Rc<Partition>>>>,
}

fn serve(options: ServeOptions) {
    if let Err(error) = std::fs::create_dir_all(&options.directory) {
        eprintln!(
            "durable_echo: creating {}: {error}",
            options.directory.display()
        );
        std::process::exit(1);
    }
    let listener = std::net::TcpListener::bind(&options.listen).unwrap_or_else(|error| {
        eprintln!("durable_echo: binding {}: {error}", options.listen);
        std::process::exit(1);
    });
    let address = listener
        .local_addr()
        .expect("a bound listener has an address");
    let cpu = options.cpu;
    let executor = LocalExecutorBuilder::new(Placement::Fixed(cpu))
        .name("durable-echo")
        .spawn(move || async move {
            let server = Rc::new(Server {
                directory: options.directory,
                file_bytes: options.file_bytes,
                blocks: options.blocks,
                durability: options.durability,
                port: address.port(),
                topics: RefCell::new(HashMap::new()),
            });
            use std::os::fd::{FromRawFd, IntoRawFd};
            // SAFETY: the descriptor comes from a listener this closure owns, handed over
            // with `into_raw_fd`; the glommio listener becomes its only owner.
            let listener = unsafe { TcpListener::from_raw_fd(listener.into_raw_fd()) };
            println!("durable_echo serving on {address}");
            let _ = std::io::stdout().flush();
            loop {
                match listener.accept().await {
                    Ok(stream) => {
                        let server = Rc::clone(&server);
                        glommio::spawn_local(async move {
                            if let Err(error) = serve_connection(server, stream).await {
                                eprintln!("durable_echo: connection: {error}");
                            }
                        })
                        .detach();
                    }
                    Err(error) => eprintln!("durable_echo: accept: {error}"),
                }
            }
        })
        .unwrap_or_else(|error| {
            eprintln!("durable_echo: starting the executor on CPU {cpu}: {error}");
            std::process::exit(1);
        });
    executor.join().expect("the executor thread does not panic");
}

/// Reads requests and runs each Produce as its own task; a writer task sends every
/// answer, in completion order, as the broker's connections do.
async fn serve_connection(
    server: Rc<Server>,
    stream: glommio::net::TcpStream,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (mut reader, mut writer) = futures_lite::io::split(stream);
    let (sender, receiver) = local_channel::new_bounded::<BytesMut>(RESPONSES_QUEUED_MAX);
    let sender = Rc::new(sender);
    let writing = glommio::spawn_local(async move {
        while let Some(frame) = receiver.recv().await {
            writer.write_all(&frame).await?;
        }
        Ok::<(), std::io::Error>(())
    });
    let limits = DecodeLimits::default();
    let mut scratch = vec![0u8; READ_BYTES];
    let mut received = BytesMut::with_capacity(READ_BYTES);
    loop {
        let read = reader.read(&mut scratch).await?;
        if read == 0 {
            break;
        }
        received.extend_from_slice(&scratch[..read]);
        loop {
            let header = match decode_frame_header(&received, FRAME_BODY_BYTES_MAX) {
                Ok(Decoded::Complete(header)) => header,
                Ok(Decoded::Incomplete { .. }) => break,
                Err(error) => {
                    return Err(std::io::Error::other(format!("bad frame header: {error}")))
                }
            };
            if received.len() < header.frame_length() {
                break;
            }
            let mut frame = received.split_to(header.frame_length());
            let body = frame.split_off(FRAME_HEADER_SIZE).freeze();
            let id = header.correlation_id;
            let mut out = BytesMut::new();
            match Opcode::from_wire(header.opcode)
                .ok_or_else(|| WireError::new(ErrorCode::UnknownOpcode, "unknown opcode"))
                .and_then(|opcode| {
                    Request::decode(opcode, body, &limits)
                        .map_err(|error| WireError::new(error.code(), error.to_string()))
                }) {
                Err(error) => encode_error_response(&mut out, header.opcode, id, &error),
                Ok(Request::Produce(request)) => {
                    let server = Rc::clone(&server);
                    let sender = Rc::clone(&sender);
                    glommio::spawn_local(async move {
                        let acks = request.acks;
                        let body = ResponseBody::Produce(server.produce(request).await);
                        if acks != Acks::None {
                            let mut out = BytesMut::new();
                            encode_response(&mut out, Opcode::Produce, id, Ok(&body));
                            // An error: the writer stopped with the connection.
                            let _ = sender.send(out).await;
                        }
                    })
                    .detach();
                }
                Ok(Request::CreateTopic(request)) => {
                    let response = server.create_topic(request).await;
                    encode_response(&mut out, Opcode::CreateTopic, id, response.as_ref());
                }
                Ok(other) => server.answer(other, id, &mut out),
            }
            if !out.is_empty() && sender.send(out).await.is_err() {
                break;
            }
        }
    }
    drop(sender);
    writing.await
}

impl Server {
    /// Handshake and Metadata: what `shardq bench produce` asks before it produces
    /// (with CreateTopic). Anything else is refused with InvalidRequest.
    fn answer(&self, request: Request, correlation_id: u64, out: &mut BytesMut) {
        let opcode = request.opcode();
        let response = match request {
            Request::Handshake(_) => Ok(ResponseBody::Handshake(HandshakeResponse {
                protocol_version: PROTOCOL_VERSION,
                shard_count: 1,
                shard_id: 0,
                server_version: format!("durable_echo {}", env!("CARGO_PKG_VERSION")),
                batch_bytes_max: BATCH_BYTES_MAX,
            })),
            Request::Metadata(MetadataRequest { topics: names }) => {
                let known = self.topics.borrow();
                let names = if names.is_empty() {
                    let mut all: Vec<String> = known.keys().cloned().collect();
                    all.sort();
                    all
                } else {
                    names
                };
                let topics = names
                    .into_iter()
                    .map(|name| {
                        let (error, partitions) = match known.get(&name) {
                            Some(partitions) => (
                                None,
                                (0..partitions.len() as u32)
                                    .map(|partition| PartitionMetadata {
                                        partition,
                                        shard: 0,
                                    })
                                    .collect(),
                            ),
                            None => (
                                Some(WireError::new(ErrorCode::UnknownTopic, "unknown topic")),
                                Vec::new(),
                            ),
                        };
                        TopicMetadata {
                            name,
                            error,
                            partitions,
                            retention: Retention::default(),
                            queue: QueueSettings::default(),
                        }
                    })
                    .collect();
                Ok(ResponseBody::Metadata(MetadataResponse {
                    shard_ports: vec![self.port],
                    topics,
                }))
            }
            _ => Err(WireError::new(
                ErrorCode::InvalidRequest,
                "durable_echo answers Handshake, Metadata, CreateTopic and Produce only",
            )),
        };
        encode_response(out, opcode, correlation_id, response.as_ref());
    }

    /// Makes and opens one file per partition (none with `--memory`).
    async fn create_topic(&self, request: CreateTopicRequest) -> Result<ResponseBody, WireError> {
        let CreateTopicRequest {
            name, partitions, ..
        } = request;
        if partitions == 0 || partitions > PARTITIONS_MAX {
            return Err(WireError::new(
                ErrorCode::InvalidPartitionCount,
                format!("{partitions} partitions: 1 to {PARTITIONS_MAX}"),
            ));
        }
        if self.topics.borrow().contains_key(&name) {
            return Err(WireError::new(
                ErrorCode::TopicAlreadyExists,
                "topic exists",
            ));
        }
        let mut made = Vec::with_capacity(partitions as usize);
        for partition in 0..partitions {
            let (file, sync) = match self.durability {
                Durability::Memory => (None, Sync::WriteThenFdatasync),
                Durability::Durable(sync) => {
                    // The topic name passed the protocol's name rules: no `/`, not `.`
                    // or `..`, so this stays inside the directory.
                    let path = self.directory.join(format!("{name}-{partition}.log"));
                    (Some(self.open_file(path, sync).await?), sync)
                }
            };
            made.push(Rc::new(Partition {
                file,
                file_bytes: self.file_bytes,
                sync,
                next_offset: Cell::new(0),
                tail: RefCell::new(Tail {
                    position: 0,
                    block: vec![0; BLOCK_BYTES as usize],
                }),
                round: Semaphore::new(1),
                wrapped: Cell::new(false),
            }));
        }
        match self.topics.borrow_mut().entry(name) {
            std::collections::hash_map::Entry::Occupied(_) => Err(WireError::new(
                ErrorCode::TopicAlreadyExists,
                "topic exists",
            )),
            std::collections::hash_map::Entry::Vacant(entry) => {
                entry.insert(made);
                Ok(ResponseBody::CreateTopic)
            }
        }
    }

    async fn open_file(&self, path: PathBuf, sync: Sync) -> Result<DmaFile, WireError> {
        let storage_error = |what: &str, error: &dyn std::fmt::Display| {
            WireError::new(
                ErrorCode::StorageError,
                format!("{what} {}: {error}", path.display()),
            )
        };
        let (size, blocks, prepared_path) = (self.file_bytes, self.blocks, path.clone());
        // Blocking file-system calls go to the executor's blocking thread, as the
        // broker's metadata calls do, so the reactor keeps serving meanwhile.
        glommio::executor()
            .spawn_blocking(move || prepare_file(&prepared_path, size, blocks))
            .await
            .map_err(|error| storage_error("preparing", &error))?;
        let mut open = OpenOptions::new();
        open.read(true).write(true);
        if sync == Sync::OpenDsync {
            open.custom_flags(libc::O_DSYNC);
        }
        open.dma_open(&path)
            .await
            .map_err(|error| storage_error("opening", &error))
    }

    /// Validates each batch, then appends them: different partitions' at once (one task
    /// each, as the broker's partitions flush independently), one partition's in the
    /// order the request lists them. Answers once every batch is durable (`acks =
    /// durable`) or has its offsets (otherwise).
    async fn produce(&self, request: ProduceRequest) -> ProduceResponse {
        let durable = request.acks == Acks::Durable && self.durability != Durability::Memory;
        // Per topic: its name and each entry's partition and outcome (none until known).
        type Entries = Vec<(u32, Option<Result<u64, WireError>>)>;
        let mut results: Vec<(String, Entries)> = Vec::with_capacity(request.topics.len());
        // Per partition: its batches as (topic index, entry index, batch, record count).
        type Appends = Vec<(usize, usize, Bytes, u32)>;
        let mut groups: Vec<(Rc<Partition>, Appends)> = Vec::new();
        for (topic_index, ProduceTopic { name, partitions }) in
            request.topics.into_iter().enumerate()
        {
            let mut entries = Vec::with_capacity(partitions.len());
            for (entry_index, ProducePartition { partition, batch }) in
                partitions.into_iter().enumerate()
            {
                let found = self
                    .topics
                    .borrow()
                    .get(&name)
                    .and_then(|partitions| partitions.get(partition as usize))
                    .cloned();
                let refused = match (found, validate_batch(&batch, BATCH_RECORDS_MAX)) {
                    (None, _) => Some(WireError::new(
                        ErrorCode::UnknownPartition,
                        format!("no partition {partition} of {name:?}"),
                    )),
                    (Some(_), Err(error)) => {
                        Some(WireError::new(ErrorCode::InvalidBatch, error.to_string()))
                    }
                    (Some(owner), Ok(header)) => {
                        let append = (topic_index, entry_index, batch, header.record_count);
                        match groups
                            .iter_mut()
                            .find(|(known, _)| Rc::ptr_eq(known, &owner))
                        {
                            Some((_, appends)) => appends.push(append),
                            None => groups.push((owner, vec![append])),
                        }
                        None
                    }
                };
                entries.push((partition, refused.map(Err)));
            }
            results.push((name, entries));
        }
        let tasks: Vec<_> = groups
            .into_iter()
            .map(|(partition, appends)| {
                glommio::spawn_local(async move {
                    let mut offsets = Vec::with_capacity(appends.len());
                    for (topic_index, entry_index, batch, record_count) in appends {
                        let offset = partition.append(&batch, record_count, durable).await;
                        offsets.push((topic_index, entry_index, offset));
                    }
                    offsets
                })
            })
            .collect();
        for task in tasks {
            for (topic_index, entry_index, offset) in task.await {
                results[topic_index].1[entry_index].1 = Some(Ok(offset));
            }
        }
        ProduceResponse {
            topics: results
                .into_iter()
                .map(|(name, entries)| ProduceTopicResult {
                    name,
                    partitions: entries
                        .into_iter()
                        .map(|(partition, result)| ProducePartitionResult {
                            partition,
                            result: result.expect("every entry was refused or appended"),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

impl Partition {
    /// Gives the batch its offsets and, when `durable`, writes it after the partition's
    /// tail and makes it durable. Returns its base offset.
    async fn append(&self, batch: &[u8], record_count: u32, durable: bool) -> u64 {
        let append_time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as i64);
        if !durable {
            let base_offset = self.next_offset.get();
            self.next_offset.set(base_offset + u64::from(record_count));
            return base_offset;
        }
        let file = self.file.as_ref().expect("a durable partition has a file");
        // Offsets are given under the permit, so the file holds batches in offset order.
        let _permit = self
            .round
            .acquire_permit(1)
            .await
            .expect("the round semaphore is never closed");
        let base_offset = self.next_offset.get();
        self.next_offset.set(base_offset + u64::from(record_count));
        let (buffer, position) = self.fill_write(file, batch, base_offset, append_time_ms);
        let length = buffer.len();
        match file.write_rc_at(Rc::new(buffer), position).await {
            Ok(written) if written == length => {}
            Ok(written) => fatal(&format!(
                "short write at {position}: {written} of {length} bytes"
            )),
            Err(error) => fatal(&format!("write at {position}: {error}")),
        }
        if self.sync == Sync::WriteThenFdatasync {
            if let Err(error) = file.fdatasync().await {
                fatal(&format!("fdatasync: {error}"));
            }
        }
        base_offset
    }

    /// The aligned buffer of one write and its file position: whole 4 KiB blocks from
    /// the tail block's start (worked example: tail at byte 5,000 and a 1,100-byte batch:
    /// the write covers bytes 4,096..8,192: the 904 tail bytes kept from the last write,
    /// the batch, and zeros to the block's end; the tail becomes bytes 4,096..6,100).
    fn fill_write(
        &self,
        file: &DmaFile,
        batch: &[u8],
        base_offset: u64,
        append_time_ms: i64,
    ) -> (glommio::io::DmaBuffer, u64) {
        let mut tail = self.tail.borrow_mut();
        let mut start = tail.position - tail.position % BLOCK_BYTES;
        let mut kept = (tail.position - start) as usize;
        let new_bytes = batch.len() as u64;
        if start + (kept as u64 + new_bytes).next_multiple_of(BLOCK_BYTES) > self.file_bytes {
            if !self.wrapped.replace(true) {
                eprintln!(
                    "durable_echo: a partition's file is full; writing from its start again \
                     (its blocks are written ones from now on)"
                );
            }
            start = 0;
            kept = 0;
        }
        let length = (kept as u64 + new_bytes).next_multiple_of(BLOCK_BYTES) as usize;
        let mut buffer = file.alloc_dma_buffer(length);
        let bytes = buffer.as_bytes_mut();
        bytes[..kept].copy_from_slice(&tail.block[..kept]);
        let end = kept + batch.len();
        bytes[kept..end].copy_from_slice(batch);
        stamp_batch(&mut bytes[kept..end], base_offset, append_time_ms);
        bytes[end..].fill(0);
        let tail_start = end - end % BLOCK_BYTES as usize;
        tail.block[..end - tail_start].copy_from_slice(&bytes[tail_start..end]);
        tail.position = start + end as u64;
        (buffer, start)
    }
}

/// A failed write or sync ends the process, as the broker's does: the file can no longer
/// be trusted.
fn fatal(message: &str) -> ! {
    eprintln!("durable_echo: {message}; stopping");
    std::process::exit(1);
}

// --- blocking client -----------------------------------------------------------------------

struct ClientOptions {
    address: String,
    messages: usize,
    warmup: usize,
    message_size: usize,
    acks: Acks,
    topic: String,
    /// Requests per second, paced; none: back to back.
    rate_per_s: Option<u32>,
}

impl ClientOptions {
    fn parse(mut arguments: impl Iterator<Item = String>) -> ClientOptions {
        let Some(address) = arguments.next() else {
            usage("client needs an address")
        };
        let mut options = ClientOptions {
            address,
            messages: 20_000,
            warmup: 2_000,
            message_size: 1024,
            acks: Acks::Durable,
            topic: "durable-echo".into(),
            rate_per_s: None,
        };
        while let Some(argument) = arguments.next() {
            match argument.as_str() {
                "--messages" => options.messages = value("--messages", arguments.next()),
                "--warmup" => options.warmup = value("--warmup", arguments.next()),
                "--message-size" => {
                    options.message_size = value("--message-size", arguments.next())
                }
                "--acks" => options.acks = value("--acks", arguments.next()),
                "--topic" => options.topic = value("--topic", arguments.next()),
                "--rate" => options.rate_per_s = Some(value("--rate", arguments.next())),
                other => usage(&format!("unknown option {other:?}")),
            }
        }
        if options.messages == 0 || options.acks == Acks::None {
            usage("client needs --messages of at least 1 and acks memory or durable");
        }
        if options.rate_per_s == Some(0) {
            usage("client needs a --rate of at least 1 request per second");
        }
        options
    }
}

/// One blocking connection: requests out, one response frame back per request.
struct Blocking {
    stream: TcpStream,
    out: BytesMut,
    next_id: u64,
}

impl Blocking {
    fn connect(address: SocketAddr) -> Blocking {
        let stream = TcpStream::connect(address)
            .unwrap_or_else(|error| fail(&format!("connecting to {address}: {error}")));
        stream.set_nodelay(true).expect("set TCP_NODELAY");
        let mut connection = Blocking {
            stream,
            out: BytesMut::with_capacity(READ_BYTES),
            next_id: 1,
        };
        let request = Request::Handshake(HandshakeRequest {
            client_name: "durable_echo client".into(),
        });
        match connection.call(&request) {
            Ok(ResponseBody::Handshake(_)) => connection,
            other => fail(&format!("handshake: {other:?}")),
        }
    }

    fn call(&mut self, request: &Request) -> Result<ResponseBody, WireError> {
        let id = self.next_id;
        self.next_id += 1;
        self.out.clear();
        request.encode(id, &mut self.out);
        self.stream
            .write_all(&self.out)
            .unwrap_or_else(|error| fail(&format!("sending: {error}")));
        let mut header = [0u8; FRAME_HEADER_SIZE];
        self.stream
            .read_exact(&mut header)
            .unwrap_or_else(|error| fail(&format!("reading a response: {error}")));
        let header = match decode_frame_header(&header, u32::MAX) {
            Ok(Decoded::Complete(header)) => header,
            other => fail(&format!("bad response header: {other:?}")),
        };
        assert_eq!(header.correlation_id, id, "one request in flight at a time");
        let mut body = vec![0u8; header.body_length as usize];
        self.stream
            .read_exact(&mut body)
            .unwrap_or_else(|error| fail(&format!("reading a response: {error}")));
        decode_response(request.opcode(), Bytes::from(body))
            .unwrap_or_else(|error| fail(&format!("decoding a response: {error}")))
    }
}

fn fail(message: &str) -> ! {
    eprintln!("durable_echo client: {message}");
    std::process::exit(1);
}

fn client(options: ClientOptions) {
    let address = options
        .address
        .to_socket_addrs()
        .ok()
        .and_then(|mut addresses| addresses.next())
        .unwrap_or_else(|| fail(&format!("{:?} is not an address", options.address)));
    let mut connection = Blocking::connect(address);
    let create = Request::CreateTopic(CreateTopicRequest {
        name: options.topic.clone(),
        partitions: 1,
        retention: Retention::default(),
        queue: QueueSettings::default(),
    });
    match connection.call(&create) {
        Ok(_) => {}
        Err(error) if error.code == ErrorCode::TopicAlreadyExists => {}
        Err(error) => fail(&format!("creating topic {:?}: {error}", options.topic)),
    }
    let metadata = Request::Metadata(MetadataRequest {
        topics: vec![options.topic.clone()],
    });
    let owner_port = match connection.call(&metadata) {
        Ok(ResponseBody::Metadata(metadata)) => metadata
            .topics
            .first()
            .and_then(|topic| topic.partitions.first())
            .and_then(|partition| metadata.shard_ports.get(usize::from(partition.shard)))
            .copied()
            .unwrap_or_else(|| fail("metadata names no owner for partition 0")),
        other => fail(&format!("metadata: {other:?}")),
    };
    // Straight to the owning shard, as the bench's shard-aware producer does.
    if owner_port != address.port() {
        connection = Blocking::connect(SocketAddr::new(address.ip(), owner_port));
    }
    let value = vec![0x5au8; options.message_size];
    let total = options.warmup + options.messages;
    let mut samples_ns: Vec<u64> = Vec::with_capacity(options.messages);
    let interval = options
        .rate_per_s
        .map(|rate| Duration::from_nanos(1_000_000_000 / u64::from(rate)));
    let first_send = Instant::now();
    for round in 0..total {
        if let Some(interval) = interval {
            let intended = first_send + interval * round as u32;
            let now = Instant::now();
            if intended > now {
                std::thread::sleep(intended - now);
            }
        }
        let started = Instant::now();
        let mut builder = BatchBuilder::new(BytesMut::with_capacity(options.message_size + 128));
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as i64);
        builder.push(now_ms, None, &value, &[]);
        let request = Request::Produce(ProduceRequest {
            acks: options.acks,
            timeout_ms: 0,
            topics: vec![ProduceTopic {
                name: options.topic.clone(),
                partitions: vec![ProducePartition {
                    partition: 0,
                    batch: builder.finish(),
                }],
            }],
        });
        let offset = match connection.call(&request) {
            Ok(ResponseBody::Produce(response)) => response
                .topics
                .first()
                .and_then(|topic| topic.partitions.first())
                .map(|partition| partition.result.clone()),
            other => fail(&format!("produce: {other:?}")),
        };
        match offset {
            Some(Ok(_)) => {}
            other => fail(&format!("produce refused: {other:?}")),
        }
        if round >= options.warmup {
            samples_ns.push(started.elapsed().as_nanos() as u64);
        }
    }
    samples_ns.sort_unstable();
    let at = |quantile: f64| {
        let index =
            ((samples_ns.len() as f64 * quantile).ceil() as usize).clamp(1, samples_ns.len());
        samples_ns[index - 1] as f64 / 1_000.0
    };
    println!(
        "{{\"message_bytes\": {}, \"acks\": \"{}\", \"messages\": {}, \"p50_us\": {:.2}, \"p90_us\": {:.2}, \"p99_us\": {:.2}, \"p999_us\": {:.2}, \"max_us\": {:.2}}}",
        options.message_size,
        options.acks.name(),
        options.messages,
        at(0.50),
        at(0.90),
        at(0.99),
        at(0.999),
        samples_ns[samples_ns.len() - 1] as f64 / 1_000.0
    );
}
