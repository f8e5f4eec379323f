//! One client connection, on the shard that accepted it.
//!
//! A reader decodes frames and starts a task per request (pipelining: up to
//! `connection_requests_in_flight_max` at once). Responses go, in completion order,
//! through a bounded local channel to a writer task.
//!
//! Order (protocol.md §5.5): produce requests for one partition append in the order
//! their frames arrived on the connection. Every await between decode and append could
//! reorder them if nothing held them in line: the reader's own waits (byte budgets, the
//! in-flight semaphore) cannot, since it handles one frame at a time; but a request's
//! task may start late, an earlier batch of the same request may wait for a chunk or a
//! segment roll on its owner while a later request's batch finds room, and two tasks
//! sending to one owner over a full mesh channel are woken in no promised order. So the
//! reader itself, before it spawns the task, admits the produce to the append line of
//! each partition (`dispatch::start`, `shard::append_order`): tickets taken at once for
//! this shard's partitions, the sub-request handed to the mesh at once for another
//! owner's (which takes its tickets as it receives it, in channel order). Each append
//! then waits for its predecessor's append, not for its durability.
//!
//! Limits (invariant 6), each of which pauses reading rather than failing anything:
//! - bytes: before it reads a frame's body, the reader takes a `Lease` of the frame's
//!   length on the connection's byte budget and then on the shard's
//!   (`connection_bytes_in_flight_max`, `shard_bytes_in_flight_max`); a fetch's lease
//!   grows to the response it may produce, every lease is set to its response's length
//!   once encoded, and it is given back when that response has been written. So request
//!   frames being read or processed and responses waiting to be written are all counted,
//!   and a client that does not read its answers stops being read.
//! - requests: a per-connection semaphore of `connection_requests_in_flight_max`.
//! - time: `connection_idle_timeout_ms` (nothing buffered, running or unwritten),
//!   `frame_read_timeout_ms` (from the moment the broker is ready for the rest of a
//!   frame to when it has all of it: a header claiming 16 MiB followed by a trickle),
//!   `response_write_timeout_ms` (a write that makes no progress: glommio's socket
//!   write timeout). Each closes the connection.
//! - memory at rest: an idle connection holds no read buffer. It waits for data with a
//!   1 KiB array on its task's stack and takes a 64 KiB buffer from the shard's pool
//!   when data arrives, returning it when everything buffered has been consumed.
//!
//! Writes: a response is a list of buffers (`encode_response_parts`): a fetch's record
//! batches of 16 KiB or more are the very buffers the log read, never copied into the
//! frame. The writer sends every response ready at the same moment with vectored
//! `sendmsg` calls over those buffers (no coalescing copy); glommio 0.9's `TcpStream`
//! has no vectored write of its own (its `AsyncWrite` implements only `poll_write`), so
//! the writer makes the call on the descriptor itself, as glommio's own write does
//! (`Socket::send_now`), and falls back to glommio's write, with its readiness poll and
//! write timeout, only when the socket's send queue is full.
//!
//! Bad input (invariant 7): an unknown opcode or an invalid topic name gets an error
//! response and the connection goes on (the frame's length was trustworthy); a bad
//! version, an oversized length or a body that does not parse gets an error response
//! and the connection is closed, since the stream can no longer be trusted to be in
//! sync. Nothing is stored for a request that failed validation, and no other
//! connection notices.
//!
//! Closing is a lingering close (protocol.md §7): the reader stops, requests already
//! running answer, the writer writes everything owed, the write side is shut down (FIN),
//! and what the client still sends is read and discarded for up to
//! `connection_linger_ms` before the socket closes: closing a socket with unread input
//! makes TCP send a reset, which can destroy answers the client has not read yet.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::net::TcpStream;
use glommio::sync::Semaphore;

use crate::config::ServerConfig;
use crate::protocol::{
    decode_frame_header, encode_error_response, encode_response_parts, peek_correlation_id, Acks,
    DecodeLimits, Decoded, ErrorCode, Opcode, ProtocolError, Request, WireError, FRAME_HEADER_SIZE,
};
use crate::shard::Shard;
use crate::storage::Notify;

use super::budget::{ByteBudget, Lease};
use super::dispatch;
use super::log::RateLimitedLog;

/// Size of a pooled read buffer, and the most a read asks of the socket beyond a frame.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// The most one read asks of the socket.
const READ_BYTES_MAX: usize = 4 * READ_CHUNK_BYTES;
/// What a connection without a buffer reads into first (most requests fit).
const FIRST_READ_BYTES: usize = 1024;
/// The zero-filled window a read waiting for data gives glommio (most requests fit);
/// the rest of a frame already begun goes into the buffer's spare capacity unfilled
/// (`Socket::recv_now`).
const WAIT_READ_BYTES: usize = 4 * 1024;
/// The most responses the writer takes at once.
const WRITE_BATCH_FRAMES_MAX: usize = 64;
/// The most buffers one `sendmsg` takes: Linux's IOV_MAX (more fails with EMSGSIZE).
const WRITE_PARTS_MAX: usize = 1024;
/// Bytes read and discarded per read during a lingering close.
const LINGER_READ_BYTES: usize = 4096;

/// A flag that can be awaited: set once, seen by every waiter.
#[derive(Default)]
pub(super) struct Event {
    set: Cell<bool>,
    notify: Notify,
}

impl Event {
    fn set(&self) {
        self.set.set(true);
        self.notify.notify_all();
    }

    pub(super) fn is_set(&self) -> bool {
        self.set.get()
    }

    pub(super) async fn wait(&self) {
        if self.set.get() {
            return;
        }
        let listener = self.notify.listen();
        if self.set.get() {
            return;
        }
        let _ = listener.await;
    }
}

/// What every connection of one shard shares: the shard's byte budget, the pool of read
/// buffers, and the signal to close (shutdown).
pub struct ShardConnections {
    budget: Rc<ByteBudget>,
    buffers: RefCell<Vec<BytesMut>>,
    buffers_max: usize,
    closing: Event,
    /// Connections closed for a timeout, acks=none requests that failed, and frames
    /// refused as malformed: each kind rate-limited on its own.
    timeouts: RateLimitedLog,
    silent_failures: RateLimitedLog,
    protocol_errors: RateLimitedLog,
}

impl ShardConnections {
    pub fn new(config: &ServerConfig) -> Rc<ShardConnections> {
        Rc::new(ShardConnections {
            budget: ByteBudget::new(config.shard_bytes_in_flight_max),
            buffers: RefCell::new(Vec::new()),
            buffers_max: config.read_buffers_pooled_per_shard_max as usize,
            closing: Event::default(),
            timeouts: RateLimitedLog::new(config),
            silent_failures: RateLimitedLog::new(config),
            protocol_errors: RateLimitedLog::new(config),
        })
    }

    /// Bytes the shard's connections hold now (frames and unwritten responses).
    pub fn bytes_in_flight(&self) -> u64 {
        self.budget.used()
    }

    /// Every connection stops reading and makes a lingering close (shutdown).
    pub fn close_all(&self) {
        self.closing.set();
    }

    fn take_buffer(&self) -> BytesMut {
        self.buffers
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| BytesMut::with_capacity(READ_CHUNK_BYTES))
    }

    /// Keeps an emptied buffer for the next connection that needs one, if it is of the
    /// usual size and the pool has room; otherwise it is freed.
    fn return_buffer(&self, buffer: BytesMut) {
        let usual = (READ_CHUNK_BYTES / 2..=4 * READ_CHUNK_BYTES).contains(&buffer.capacity());
        let mut buffers = self.buffers.borrow_mut();
        if buffer.is_empty() && usual && buffers.len() < self.buffers_max {
            buffers.push(buffer);
        }
    }
}

/// The connection's socket, shared by its reader and its writer (both on this thread;
/// a borrow lasts one poll), with access to the socket options and `shutdown`.
#[derive(Clone)]
struct Socket(Rc<RefCell<TcpStream>>);

impl Socket {
    /// Makes the coming close a reset (SO_LINGER with a zero timeout): for a client that
    /// does not read, whose unsent answers would otherwise sit in an orphaned socket's
    /// send queue (kernel memory) behind a FIN it never sees.
    fn reset_on_close(&self) {
        let descriptor = self.0.borrow().as_raw_fd();
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: the descriptor belongs to the stream this value keeps alive, and
        // `linger` is a valid SO_LINGER value of the size passed. A failure leaves the
        // ordinary close, which is still correct.
        unsafe {
            libc::setsockopt(
                descriptor,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
    }

    /// Sends what the socket takes of `parts` now, in order, in one `sendmsg`, without
    /// waiting: `WouldBlock` when its send queue is full. `vectors` is scratch space.
    ///
    /// Calling the kernel on glommio's descriptor directly is what glommio 0.9 itself does
    /// for a stream write: `poll_write` first tries a plain `send` with MSG_DONTWAIT on
    /// the descriptor (`net::yolo_send`) and only when that would block registers an
    /// io_uring poll for writability (a PollAdd, not a send). So no write of glommio's is
    /// ever queued in io_uring behind or ahead of this one, and the descriptor is in the
    /// state glommio expects. MSG_NOSIGNAL: a peer that has gone is an EPIPE, not a
    /// signal.
    fn send_now(&self, parts: &[&[u8]], vectors: &mut Vec<libc::iovec>) -> io::Result<usize> {
        vectors.clear();
        vectors.extend(parts.iter().map(|part| libc::iovec {
            iov_base: part.as_ptr() as *mut libc::c_void,
            iov_len: part.len(),
        }));
        // SAFETY: msghdr is a plain C struct for which all zeros is a valid value (no
        // address, no control data, no flags).
        let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
        message.msg_iov = vectors.as_mut_ptr();
        message.msg_iovlen = vectors.len() as _;
        let descriptor = self.0.borrow().as_raw_fd();
        // SAFETY: the descriptor belongs to the stream this value keeps alive; every
        // iovec points into a part borrowed for this call, valid for its length, and
        // the kernel only reads them (a send never writes into its buffers); `message`
        // and `vectors` outlive the call.
        let sent = unsafe {
            libc::sendmsg(
                descriptor,
                &message,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        vectors.clear();
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sent as usize)
    }

    /// Receives what the socket has now into `spare` (memory not yet initialised),
    /// without waiting: `WouldBlock` when nothing is there. This is the call glommio 0.9's
    /// own read makes first (`net::yolo_recv`, a `recv` with MSG_DONTWAIT; it only polls
    /// for readiness through io_uring when that would block, and a poll consumes no
    /// data), made here so the kernel writes into the buffer's spare capacity instead of
    /// into memory that had to be zero-filled first.
    fn recv_now(&self, spare: &mut [std::mem::MaybeUninit<u8>]) -> io::Result<usize> {
        let descriptor = self.0.borrow().as_raw_fd();
        // SAFETY: the descriptor belongs to the stream this value keeps alive; `spare` is
        // valid for writes of its length for the whole call, and the kernel writes at
        // most that many bytes into it (never reads it), so uninitialised memory is fine.
        let received = unsafe {
            libc::recv(
                descriptor,
                spare.as_mut_ptr().cast(),
                spare.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if received < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(received as usize)
    }

    fn shutdown(&self, how: std::net::Shutdown) {
        let how = match how {
            std::net::Shutdown::Read => libc::SHUT_RD,
            std::net::Shutdown::Write => libc::SHUT_WR,
            std::net::Shutdown::Both => libc::SHUT_RDWR,
        };
        let descriptor = self.0.borrow().as_raw_fd();
        // SAFETY: the descriptor belongs to the stream this value keeps alive; shutdown
        // neither closes nor frees it. Its only failure (ENOTCONN) means there is
        // nothing left to shut down.
        unsafe { libc::shutdown(descriptor, how) };
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_read(context, buffer)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_write(context, buffer)
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_flush(context)
    }

    fn poll_close(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_close(context)
    }
}

/// A response on its way to the socket, as the buffers that make up its frame (a
/// fetch's large batches are their own parts: `encode_response_parts`), with the bytes
/// it holds on the budgets.
struct Outgoing {
    parts: Vec<Bytes>,
    _lease: Lease,
}

/// Why the reader stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client closed its sending side (half-close, or a close): every request read
    /// is answered and written, then the socket closes.
    ClientDone,
    /// The socket failed, or the writer gave up on the client: nothing more to say.
    Broken,
    /// A protocol error closed it, a timeout expired, or the shard is stopping.
    Closing,
}

/// Per-connection state the reader, the writer and the request tasks share.
struct Connection {
    shard: Rc<Shard>,
    connections: Rc<ShardConnections>,
    socket: Socket,
    budget: Rc<ByteBudget>,
    /// Taken (dropped) once the reader and every request task are done, which ends the
    /// writer after it has written everything queued.
    responses: RefCell<Option<Rc<LocalSender<Outgoing>>>>,
    in_flight: Rc<Semaphore>,
    in_flight_max: u64,
    /// When a request last finished or a response was last written.
    last_activity: Cell<Instant>,
    /// Set when the client is taken to have gone: the writer gave up on it, or its
    /// socket failed. Reads still running for it are dropped unanswered.
    client_gone: Event,
    /// Set when the client has gone or closed its sending side: queue receives lease
    /// nothing more for it (a receive still running answers with what it holds).
    leases_end: Event,
    /// Holder of the leases this connection's receives take: unique on the shard
    /// (shard id << 48 | connection number).
    holder: u64,
}

impl Connection {
    /// The client's address, for log events (asked of the socket only when one is
    /// emitted: nothing on the request path pays for it).
    fn peer(&self) -> String {
        self.socket
            .0
            .try_borrow()
            .ok()
            .and_then(|stream| stream.peer_addr().ok())
            .map_or_else(|| "unknown".to_owned(), |address| address.to_string())
    }

    /// Logs a frame refused as malformed (rate-limited per shard): the client is
    /// answered with the error either way.
    fn log_protocol_error(&self, opcode: u8, error: &dyn std::fmt::Display, closes: bool) {
        let shard = self.shard.id;
        self.connections.protocol_errors.log(|held_back| {
            tracing::warn!(
                shard,
                peer = %self.peer(),
                opcode,
                error = %error,
                closes_connection = closes,
                held_back,
                "refused a malformed frame"
            );
        });
    }

    /// The client is gone: reads running for it stop, receives lease nothing more.
    fn client_left(&self) {
        self.client_gone.set();
        self.leases_end.set();
    }

    fn lease(&self) -> Lease {
        Lease::empty(&self.budget, &self.connections.budget)
    }

    fn busy(&self) -> bool {
        self.in_flight.available() < self.in_flight_max
    }

    /// Resolves when the reader must stop whatever it waits for. The reader makes one
    /// for its whole life (`Stop`) rather than one per wait: each costs a listener on
    /// the shard's and the connection's events.
    async fn stopped(&self) {
        futures_lite::future::or(self.connections.closing.wait(), self.client_gone.wait()).await;
    }

    fn is_stopped(&self) -> bool {
        self.connections.closing.is_set() || self.client_gone.is_set()
    }

    /// Queues a response the caller has counted as owed (`Shard::owe_response`): the
    /// writer settles every frame it writes, or this does if nobody will write it.
    async fn send(&self, parts: Vec<Bytes>, mut lease: Lease) {
        lease.resize(parts.iter().map(|part| part.len() as u64).sum());
        let outgoing = Outgoing {
            parts,
            _lease: lease,
        };
        let sender = self.responses.borrow().clone();
        let sent = match sender {
            Some(sender) => sender.send(outgoing).await.is_ok(),
            None => false,
        };
        if !sent {
            // The writer stopped (the client went away): nobody will write it.
            self.shard.settle_responses(1);
        }
    }

    /// Answers with an error status; the opcode is echoed as received, known or not.
    async fn send_error(&self, opcode: u8, correlation_id: u64, error: &WireError) {
        let mut out = BytesMut::new();
        encode_error_response(&mut out, opcode, correlation_id, error);
        self.shard.owe_response();
        self.send(vec![out.freeze()], self.lease()).await;
    }

    async fn refuse(&self, opcode: u8, correlation_id: u64, error: &ProtocolError) {
        let error = WireError::new(error.code(), error.to_string());
        self.send_error(opcode, correlation_id, &error).await;
    }
}

/// The reader's `Connection::stopped`, made once and polled by every wait of the reader;
/// never polled again once it has resolved (`Connection::is_stopped` is checked first).
type Stop<'a> = Pin<Box<dyn Future<Output = ()> + 'a>>;

/// Waits for `stop`, unless the connection has stopped already (then `stop` has resolved
/// and must not be polled again).
async fn until_stopped(connection: &Connection, stop: &mut Stop<'_>) {
    if !connection.is_stopped() {
        stop.await;
    }
}

/// How a read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    Data,
    EndOfStream,
    Failed,
    TimedOut,
    Stopped,
}

pub async fn serve(
    shard: Rc<Shard>,
    connections: Rc<ShardConnections>,
    stream: TcpStream,
    connection_number: u64,
) {
    let config = &shard.config;
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(milliseconds(config.response_write_timeout_ms)));
    let socket = Socket(Rc::new(RefCell::new(stream)));
    let in_flight_max = u64::from(config.connection_requests_in_flight_max);
    // Unbounded in type only: every response is sent by a request task holding an
    // in-flight permit, or by the reader itself (one at a time), so it never holds more
    // than in_flight_max + 1. A bounded channel would allocate that many slots up front,
    // ~16 KiB for every connection, idle ones included.
    let (responses, outgoing) = local_channel::new_unbounded::<Outgoing>();
    let connection = Rc::new(Connection {
        budget: ByteBudget::new(config.connection_bytes_in_flight_max),
        shard: Rc::clone(&shard),
        connections,
        socket: socket.clone(),
        responses: RefCell::new(Some(Rc::new(responses))),
        in_flight: Rc::new(Semaphore::new(in_flight_max)),
        in_flight_max,
        last_activity: Cell::new(Instant::now()),
        client_gone: Event::default(),
        leases_end: Event::default(),
        holder: (u64::from(shard.id) << 48) | (connection_number & ((1 << 48) - 1)),
    });
    // Not detached: if this connection's task is cancelled (shutdown), dropping the
    // writer with it closes the socket.
    let writer = glommio::spawn_local(write_responses(Rc::clone(&connection), outgoing));
    let end = read_requests(&connection).await;
    match end {
        // A socket that failed (a reset) has nobody to answer: reads still running stop
        // unanswered, and writes run to their end.
        End::Broken => connection.client_left(),
        // Half-close: the client has said all it will say but may still be reading.
        // Every request it sent is answered, long-polls included (each ends by its own
        // deadline, at the latest fetch_wait_ms_max); only queue receives stop leasing
        // and answer with what they hold (usually nothing), since a client that closed
        // rather than half-closed would never read those messages and each delivery
        // counts toward the dead-letter queue.
        End::ClientDone => connection.leases_end.set(),
        // The broker closes (a protocol error, a timeout, a shutdown): the socket still
        // carries the answers owed, and the shard's own stop ends long-polls.
        End::Closing => {}
    }
    // Let requests already running finish and answer, then let the writer write it all
    // (each write bounded by response_write_timeout_ms).
    let _ = connection.in_flight.acquire(in_flight_max).await;
    // Every request task has ended (all permits are back), so this is the last sender:
    // the writer ends once it has written what is queued.
    connection.responses.borrow_mut().take();
    let responses_written = writer.await;
    if responses_written && end == End::Closing {
        linger(&socket, &shard.config).await;
    }
    // Dropping the last handle on the socket closes it.
}

fn milliseconds(value: u32) -> Duration {
    Duration::from_millis(u64::from(value))
}

/// Lingering close: FIN after the last response, then read and discard what the client
/// still sends, until it closes too or `connection_linger_ms` has passed.
async fn linger(socket: &Socket, config: &ServerConfig) {
    socket.shutdown(std::net::Shutdown::Write);
    if config.connection_linger_ms == 0 {
        return;
    }
    let deadline = Instant::now() + milliseconds(config.connection_linger_ms);
    // On the heap, and only while lingering: an array here would make every
    // connection's task that much larger for its whole life.
    let mut discard = vec![0u8; LINGER_READ_BYTES];
    let mut reader = socket.clone();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let read = glommio::timer::timeout(left, async {
            reader
                .read(&mut discard)
                .await
                .map_err(glommio::GlommioError::from)
        })
        .await;
        match read {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Reads and starts requests until the client leaves, a protocol error or a timeout
/// closes the connection, or the shard stops.
async fn read_requests(connection: &Rc<Connection>) -> End {
    let shard = &connection.shard;
    let config = &shard.config;
    let limits = DecodeLimits {
        topics_per_request_max: config.topics_per_request_max,
        partitions_per_request_max: config.partitions_per_request_max,
    };
    let idle_timeout = milliseconds(config.connection_idle_timeout_ms);
    let frame_timeout = milliseconds(config.frame_read_timeout_ms);
    let mut buffer = BytesMut::new();
    let mut stop: Stop<'_> = Box::pin(connection.stopped());
    let end = loop {
        // The header, waiting as long as the connection may stay idle.
        let mut frame_started: Option<Instant> = None;
        let header = loop {
            match decode_frame_header(&buffer, config.frame_body_bytes_max) {
                Ok(Decoded::Complete(header)) => break Some(Ok(header)),
                Ok(Decoded::Incomplete { .. }) => {}
                Err(error) => break Some(Err(error)),
            }
            let deadline = if buffer.is_empty() {
                if buffer.capacity() > 0 {
                    connection
                        .connections
                        .return_buffer(std::mem::take(&mut buffer));
                }
                connection.last_activity.get() + idle_timeout
            } else {
                *frame_started.get_or_insert_with(Instant::now) + frame_timeout
            };
            match read_some(connection, &mut buffer, deadline, &mut stop).await {
                Read::Data => {}
                Read::TimedOut if buffer.is_empty() => {
                    if connection.busy() {
                        // Requests are running: not idle; the clock restarts after them.
                        connection.last_activity.set(Instant::now());
                    } else if connection.last_activity.get() + idle_timeout <= Instant::now() {
                        // Idle for connection_idle_timeout_ms: nothing to log, it is
                        // how a forgotten connection ends.
                        break None;
                    }
                }
                Read::TimedOut => {
                    connection.connections.timeouts.log(|held_back| {
                        tracing::warn!(
                            shard = shard.id,
                            peer = %connection.peer(),
                            bytes_received = buffer.len(),
                            frame_read_timeout_ms = config.frame_read_timeout_ms,
                            held_back,
                            "closing a connection that sent {} bytes of a frame header in {} ms (frame_read_timeout_ms)",
                            buffer.len(),
                            config.frame_read_timeout_ms
                        );
                    });
                    return End::Closing;
                }
                outcome => return read_end(outcome),
            }
        };
        let header = match header {
            Some(Ok(header)) => header,
            None => break End::Closing,
            Some(Err(error)) => {
                // The header itself is bad: answer what we can, then hang up.
                let correlation_id = peek_correlation_id(&buffer).unwrap_or(0);
                connection.log_protocol_error(buffer[5], &error, true);
                connection.refuse(buffer[5], correlation_id, &error).await;
                break End::Closing;
            }
        };
        // The frame's bytes are counted before they are read, a read at a time (a header
        // alone claims nothing a slow sender has not sent): at the connection's or the
        // shard's limit, reading pauses here. From the complete header on, the rest of
        // the frame must come within frame_read_timeout_ms, not counting the pauses.
        let frame_length = header.frame_length();
        let mut lease = connection.lease();
        let mut deadline = Instant::now() + frame_timeout;
        loop {
            let want = frame_length.min(buffer.len() + READ_BYTES_MAX) as u64;
            if lease.bytes() < want {
                let paused = Instant::now();
                if !grow_lease(connection, &mut lease, want, &mut stop).await {
                    return End::Closing;
                }
                deadline += paused.elapsed();
            }
            if buffer.len() >= frame_length {
                break;
            }
            match read_some(connection, &mut buffer, deadline, &mut stop).await {
                Read::Data => {}
                Read::TimedOut => {
                    connection.connections.timeouts.log(|held_back| {
                        tracing::warn!(
                            shard = shard.id,
                            peer = %connection.peer(),
                            bytes_received = buffer.len(),
                            frame_length,
                            frame_read_timeout_ms = config.frame_read_timeout_ms,
                            held_back,
                            "closing a connection that sent {} of a {frame_length}-byte frame in {} ms (frame_read_timeout_ms)",
                            buffer.len(),
                            config.frame_read_timeout_ms
                        );
                    });
                    return End::Closing;
                }
                outcome => return read_end(outcome),
            }
        }
        let frame = buffer.split_to(frame_length).freeze();
        let body = frame.slice(FRAME_HEADER_SIZE..);
        if header.is_response() {
            let error = WireError::new(
                ErrorCode::InvalidRequest,
                "clients send requests, not responses",
            );
            connection.log_protocol_error(header.opcode, &error, true);
            connection
                .send_error(header.opcode, header.correlation_id, &error)
                .await;
            break End::Closing;
        }
        let Some(opcode) = Opcode::from_wire(header.opcode) else {
            // The length was sane, so the stream stays in sync: refuse just this frame.
            let error = ProtocolError::UnknownOpcode {
                opcode: header.opcode,
            };
            connection.log_protocol_error(header.opcode, &error, false);
            connection
                .refuse(header.opcode, header.correlation_id, &error)
                .await;
            continue;
        };
        let request = match Request::decode(opcode, body, &limits) {
            Ok(request) => request,
            Err(error) => {
                connection.log_protocol_error(header.opcode, &error, error.closes_connection());
                connection
                    .refuse(header.opcode, header.correlation_id, &error)
                    .await;
                if error.closes_connection() {
                    break End::Closing;
                }
                // An invalid topic name: the frame was well delimited, so the stream
                // is still in sync and only this request is refused.
                continue;
            }
        };
        drop(frame);
        // A fetch's answer, and what its owners read to make it, can be far larger than
        // its request: count it up front.
        let expected = response_bytes_expected(&request, shard);
        if expected > lease.bytes()
            && !grow_lease(connection, &mut lease, expected, &mut stop).await
        {
            break End::Closing;
        }
        let started = futures_lite::future::or(
            async {
                Some(
                    connection
                        .in_flight
                        .acquire_static_permit(1)
                        .await
                        .expect("the in-flight semaphore is never closed"),
                )
            },
            async {
                until_stopped(connection, &mut stop).await;
                None
            },
        )
        .await;
        let Some(permit) = started else {
            break End::Closing;
        };
        let silent = matches!(&request, Request::Produce(produce) if produce.acks == Acks::None);
        let operation = request.opcode();
        let acks = match &request {
            Request::Produce(produce) => Some(produce.acks),
            _ => None,
        };
        let received = Instant::now();
        // Reads (a long-poll, a lookup by time) stop when the client is gone; a request
        // that changes something always runs to its end (an append is not cancellable).
        let abandonable = matches!(&request, Request::Fetch(_) | Request::ListOffsets(_));
        let task_connection = Rc::clone(connection);
        let correlation_id = header.correlation_id;
        // Owed from now: a shutdown waits for the answers of requests already read.
        shard.owe_response();
        // Here, in frame order, a produce takes its place in the append line of every
        // partition it names (protocol.md §5.5): whatever its task meets later, it
        // appends after the produces read before it on this connection.
        let request = dispatch::start(shard, request).await;
        glommio::spawn_local(async move {
            let connection = task_connection;
            let shard = &connection.shard;
            let caller = dispatch::Caller {
                holder: connection.holder,
                gone: Some(&connection.leases_end),
            };
            let outcome = if abandonable {
                let handled = futures_lite::future::or(
                    async { Some(dispatch::finish(shard, request, &caller).await) },
                    async {
                        connection.client_gone.wait().await;
                        None
                    },
                )
                .await;
                let Some(outcome) = handled else {
                    // Nobody to answer: the writer is gone.
                    shard.settle_responses(1);
                    return;
                };
                outcome
            } else {
                dispatch::finish(shard, request, &caller).await
            };
            connection.last_activity.set(Instant::now());
            shard.metrics.request(
                operation,
                acks,
                received.elapsed(),
                &error_codes(outcome.as_ref()),
            );
            if silent {
                // Nobody hears of it otherwise: the client asked for no answer.
                if let Err(error) = &outcome {
                    connection.connections.silent_failures.log(|held_back| {
                        tracing::warn!(
                            shard = shard.id,
                            peer = %connection.peer(),
                            error = %error,
                            held_back,
                            "produce with acks=none failed: {error}"
                        );
                    });
                }
                shard.settle_responses(1);
                drop(lease);
                drop(permit);
                return;
            }
            // Fetched batches are not copied: the parts share their buffers.
            let parts = encode_response_parts(opcode, correlation_id, outcome.as_ref());
            drop(outcome);
            connection.send(parts, lease).await;
            drop(permit);
        })
        .detach();
    };
    end
}

/// The error codes an answer carries: the request's, or each failed partition's of a
/// produce, fetch or list-offsets.
fn error_codes(outcome: Result<&crate::protocol::ResponseBody, &WireError>) -> Vec<ErrorCode> {
    match outcome {
        Err(error) => vec![error.code],
        Ok(crate::protocol::ResponseBody::Produce(response)) => response
            .topics
            .iter()
            .flat_map(|topic| &topic.partitions)
            .filter_map(|partition| partition.result.as_ref().err().map(|error| error.code))
            .collect(),
        Ok(crate::protocol::ResponseBody::Fetch(response)) => response
            .topics
            .iter()
            .flat_map(|topic| &topic.partitions)
            .filter_map(|partition| {
                partition
                    .data
                    .batches
                    .as_ref()
                    .err()
                    .map(|error| error.code)
            })
            .collect(),
        Ok(crate::protocol::ResponseBody::ListOffsets(response)) => response
            .topics
            .iter()
            .flat_map(|topic| &topic.partitions)
            .filter_map(|partition| partition.result.as_ref().err().map(|error| error.code))
            .collect(),
        Ok(_) => Vec::new(),
    }
}

/// Grows `lease` to `bytes`, waiting for the budgets; false if the connection must stop
/// meanwhile.
async fn grow_lease(
    connection: &Connection,
    lease: &mut Lease,
    bytes: u64,
    stop: &mut Stop<'_>,
) -> bool {
    if connection.is_stopped() {
        return false;
    }
    let more = bytes.saturating_sub(lease.bytes());
    futures_lite::future::or(
        async {
            lease.grow(more).await;
            true
        },
        async {
            until_stopped(connection, stop).await;
            false
        },
    )
    .await
}

fn read_end(outcome: Read) -> End {
    match outcome {
        Read::EndOfStream => End::ClientDone,
        Read::Failed => End::Broken,
        Read::Stopped | Read::TimedOut | Read::Data => End::Closing,
    }
}

/// Bytes a request may hold until its response is encoded, counted before it runs: a
/// fetch, what its owners may read (`dispatch::fetch_bytes_reserved`). Other responses
/// are small, and counted once encoded.
fn response_bytes_expected(request: &Request, shard: &Shard) -> u64 {
    match request {
        Request::Fetch(fetch) => dispatch::fetch_bytes_reserved(shard, fetch),
        _ => 0,
    }
}

/// Reads what the socket has into `buffer`, until `deadline` or until the connection
/// must stop. A connection with no buffer reads into a small array first and takes a
/// pooled buffer only once data has arrived.
async fn read_some(
    connection: &Connection,
    buffer: &mut BytesMut,
    deadline: Instant,
    stop: &mut Stop<'_>,
) -> Read {
    if connection.is_stopped() {
        return Read::Stopped;
    }
    let start = buffer.len();
    let mut socket = connection.socket.clone();
    let outcome = {
        let read = async {
            if buffer.capacity() == 0 {
                let mut first = [0u8; FIRST_READ_BYTES];
                return match socket.read(&mut first).await {
                    Ok(0) => Read::EndOfStream,
                    Err(_) => Read::Failed,
                    Ok(read) => {
                        *buffer = connection.connections.take_buffer();
                        buffer.extend_from_slice(&first[..read]);
                        Read::Data
                    }
                };
            }
            if buffer.capacity() - start < READ_CHUNK_BYTES / 4 {
                buffer.reserve(READ_CHUNK_BYTES);
            }
            // With part of a frame buffered, the rest is most likely there already: it
            // goes straight into the spare capacity, at most a few chunks per read.
            // Zero-filling that room first cost a memset of up to READ_BYTES_MAX per
            // read, more than the data of a small request. With nothing buffered the
            // next request has most likely not arrived, so the call would only add a
            // syscall that finds nothing.
            let room = (buffer.capacity() - start).min(READ_BYTES_MAX);
            if start > 0 {
                match socket.recv_now(&mut buffer.spare_capacity_mut()[..room]) {
                    Ok(0) => return Read::EndOfStream,
                    Ok(read) => {
                        // SAFETY: the kernel initialised `read` bytes of the spare
                        // capacity, right after the buffer's `start` initialised bytes.
                        unsafe { buffer.set_len(start + read) };
                        return Read::Data;
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Read::Failed,
                }
            }
            // Wait through glommio (readiness through io_uring, with the socket's read
            // timeout) into a small zero-filled window; the rest of a larger frame is
            // read without zero-filling on the next call.
            let end = start + room.min(WAIT_READ_BYTES);
            buffer.resize(end, 0);
            match socket.read(&mut buffer[start..]).await {
                Ok(0) => Read::EndOfStream,
                Err(_) => Read::Failed,
                Ok(read) => {
                    buffer.truncate(start + read);
                    Read::Data
                }
            }
        };
        let timer = async {
            let left = deadline.saturating_duration_since(Instant::now());
            glommio::timer::sleep(left).await;
            Read::TimedOut
        };
        let stopped = async {
            until_stopped(connection, stop).await;
            Read::Stopped
        };
        futures_lite::future::or(read, futures_lite::future::or(stopped, timer)).await
    };
    if outcome != Read::Data && buffer.len() > start {
        // Only the zero fill of a read that did not complete.
        buffer.truncate(start);
    }
    outcome
}

/// Writes responses as they come; gives up on a client that does not read them within
/// `response_write_timeout_ms` (the socket's write timeout). True when everything was
/// written.
async fn write_responses(connection: Rc<Connection>, outgoing: LocalReceiver<Outgoing>) -> bool {
    let mut socket = connection.socket.clone();
    let shard = Rc::clone(&connection.shard);
    let mut ready: Vec<Outgoing> = Vec::new();
    let mut vectors: Vec<libc::iovec> = Vec::new();
    while let Some(first) = outgoing.recv().await {
        ready.push(first);
        while ready.len() < WRITE_BATCH_FRAMES_MAX {
            match futures_lite::future::poll_once(outgoing.recv()).await {
                Some(Some(more)) => ready.push(more),
                _ => break,
            }
        }
        let written = write_frames(&mut socket, &ready, &mut vectors).await;
        shard.settle_responses(ready.len());
        // Dropping them gives their bytes back to the budgets.
        ready.clear();
        connection.last_activity.set(Instant::now());
        if let Err(error) = written {
            if error.kind() == io::ErrorKind::TimedOut {
                connection.connections.timeouts.log(|held_back| {
                    tracing::warn!(
                        shard = shard.id,
                        peer = %connection.peer(),
                        response_write_timeout_ms = shard.config.response_write_timeout_ms,
                        held_back,
                        "closing a connection that read none of its responses for {} ms (response_write_timeout_ms)",
                        shard.config.response_write_timeout_ms
                    );
                });
            }
            // The client is gone or does not read: what is queued for it is owed to
            // nobody, the reader must stop too (shutting down the read side wakes it),
            // and the close will be a reset that frees the unsent answers at once.
            connection.client_left();
            socket.reset_on_close();
            socket.shutdown(std::net::Shutdown::Read);
            while let Some(Some(_)) = futures_lite::future::poll_once(outgoing.recv()).await {
                shard.settle_responses(1);
            }
            return false;
        }
    }
    let _ = socket.flush().await;
    true
}

/// Writes `frames` in order with vectored sends of their own buffers: nothing is copied.
/// Each `sendmsg` takes every part still unwritten (up to `WRITE_PARTS_MAX`), partly
/// written ones from where they stopped. When the socket takes nothing, glommio's own
/// write of the next part waits for it to drain, under the socket's write timeout, and
/// the vectored sends resume from there. `vectors` is the caller's scratch list, reused
/// from call to call and left empty.
async fn write_frames(
    socket: &mut Socket,
    frames: &[Outgoing],
    vectors: &mut Vec<libc::iovec>,
) -> io::Result<()> {
    let mut parts: Vec<&[u8]> = frames
        .iter()
        .flat_map(|outgoing| outgoing.parts.iter().map(|part| &part[..]))
        .filter(|part| !part.is_empty())
        .collect();
    let mut first = 0;
    while first < parts.len() {
        let last = parts.len().min(first + WRITE_PARTS_MAX);
        let sent = match socket.send_now(&parts[first..last], vectors) {
            Ok(sent) => sent,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                // The send queue is full: wait the way glommio waits (a poll for
                // writability, bounded by response_write_timeout_ms), with a plain
                // write of the next part.
                match socket.write(parts[first]).await? {
                    0 => return Err(io::ErrorKind::WriteZero.into()),
                    sent => sent,
                }
            }
            Err(error) => return Err(error),
        };
        first = advance(&mut parts, first, sent);
    }
    Ok(())
}

/// Moves past `sent` bytes of `parts[first..]`: past the wholly written parts, then into
/// the partly written one. Returns the index of the first part not wholly written.
fn advance(parts: &mut [&[u8]], mut first: usize, sent: usize) -> usize {
    let mut left = sent;
    while left > 0 {
        let part = &mut parts[first];
        if left < part.len() {
            *part = &part[left..];
            break;
        }
        left -= part.len();
        first += 1;
    }
    first
}

#[cfg(test)]
mod tests {
    use super::advance;

    #[test]
    fn a_partial_send_resumes_inside_the_part_it_stopped_in() {
        let (a, b, c) = (&b"header"[..], &b"batch-one"[..], &b"batch-two"[..]);
        let mut parts = vec![a, b, c];
        // All of the first part and three bytes of the second.
        let first = advance(&mut parts, 0, 9);
        assert_eq!(first, 1);
        assert_eq!(parts[first], b"ch-one");
        // Exactly the rest of the second part.
        let first = advance(&mut parts, first, 6);
        assert_eq!((first, parts[first]), (2, &b"batch-two"[..]));
        // Everything left.
        assert_eq!(advance(&mut parts, first, 9), 3);
    }
}
