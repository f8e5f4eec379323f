//! The connection engine behind [`super::Client`]: a writer task, a reader task and the
//! table of pending requests between them.
//!
//! Why a writer task rather than a lock around the socket: a caller whose future is
//! dropped half-way through `write_all` would leave half a frame on the wire and corrupt
//! every later request. The writer task owns the write half, so a frame is either written
//! whole or the connection is declared broken. It also coalesces requests queued behind
//! each other into one vectored write: small frames are copied into one reused `BytesMut`,
//! large produce batches are written from the producer's own buffers
//! (`Request::encode_parts`).
//!
//! Ordering that makes routing race-free: a caller registers its correlation id in the
//! pending table *before* handing the request to the writer, so the reader can never see
//! a response for an id that is not registered yet.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::{ClientConfig, ClientError};
use crate::protocol::{
    decode_frame_header, decode_response, Decoded, Opcode, Request, ResponseBody,
};

/// Writes are cut into chunks of about this size so that one huge burst of queued
/// requests does not delay the first of them.
const WRITE_COALESCE_BYTES_MAX: usize = 256 << 10;
/// Initial read buffer; it grows to the largest frame seen.
const READ_BUFFER_BYTES: usize = 64 << 10;

/// A caller waiting for its response: which opcode it expects, where to deliver, and the
/// slot it holds in the pending limit (released when the entry leaves the table, so that a
/// caller that gave up still counts until the broker answers).
struct Waiter {
    opcode: Opcode,
    responder: oneshot::Sender<Result<Bytes, ClientError>>,
    _slot: OwnedSemaphorePermit,
}

struct PendingTable {
    waiters: HashMap<u64, Waiter>,
    /// Set once, when the connection breaks or is closed; every later call fails with it.
    failure: Option<ClientError>,
}

/// State shared by callers, the reader and the writer.
struct Shared {
    peer: SocketAddr,
    pending: Mutex<PendingTable>,
    slots: Arc<Semaphore>,
    next_correlation_id: std::sync::atomic::AtomicU64,
    response_body_bytes_max: u32,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, PendingTable> {
        // A panic while holding this lock leaves the table consistent (inserts and removes
        // are single operations), so a poisoned lock is still usable.
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Breaks the connection: records the first cause and fails every waiter with it.
    fn fail(&self, cause: ClientError) {
        let waiters = {
            let mut table = self.pending();
            if table.failure.is_none() {
                table.failure = Some(match cause {
                    ClientError::Closed => ClientError::Closed,
                    cause => ClientError::Disconnected {
                        peer: self.peer,
                        cause: Arc::new(cause),
                    },
                });
            }
            std::mem::take(&mut table.waiters)
        };
        // Wake callers queued for a slot: they will find the failure.
        self.slots.close();
        let failure = self.failure();
        for (_, waiter) in waiters {
            // The caller may have given up; nothing to do then.
            let _ = waiter.responder.send(Err(failure.clone()));
        }
    }

    fn failure(&self) -> ClientError {
        self.pending()
            .failure
            .clone()
            .unwrap_or(ClientError::Closed)
    }
}

/// One request on its way to the writer. Every outbound holds a slot until it is written
/// (and, for requests with a response, a second reference lives in the pending table), so
/// the unbounded channel is bounded by `requests_pending_max`.
struct Outbound {
    correlation_id: u64,
    /// Shared with the caller, which keeps it to send again on a new connection if this
    /// one breaks (`Client::call`); encoded by the writer with `correlation_id`.
    request: Arc<Request>,
    /// Only for requests without a response: told when the bytes are written.
    written: Option<(
        oneshot::Sender<Result<(), ClientError>>,
        OwnedSemaphorePermit,
    )>,
}

pub(super) struct Connection {
    shared: Arc<Shared>,
    outbound: mpsc::UnboundedSender<Outbound>,
    reader: JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        // The writer stops by itself when `outbound` drops; the reader would wait for the
        // broker to close, so stop it here.
        self.reader.abort();
    }
}

impl Connection {
    pub(super) fn start(stream: TcpStream, config: &ClientConfig) -> io::Result<Connection> {
        let peer = stream.peer_addr()?;
        let (read_half, write_half) = stream.into_split();
        let shared = Arc::new(Shared {
            peer,
            pending: Mutex::new(PendingTable {
                waiters: HashMap::new(),
                failure: None,
            }),
            slots: Arc::new(Semaphore::new(config.requests_pending_max)),
            next_correlation_id: std::sync::atomic::AtomicU64::new(1),
            response_body_bytes_max: config.response_body_bytes_max,
        });
        let (outbound, outbound_receiver) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(shared.clone(), write_half, outbound_receiver));
        let reader = tokio::spawn(read_loop(shared.clone(), read_half));
        Ok(Connection {
            shared,
            outbound,
            reader,
        })
    }

    pub(super) fn peer(&self) -> SocketAddr {
        self.shared.peer
    }

    pub(super) fn is_broken(&self) -> bool {
        self.shared.pending().failure.is_some()
    }

    /// Gives up the connection: every pending and later request fails with
    /// `Disconnected`, naming `cause`.
    pub(super) fn abandon(&self, cause: ClientError) {
        self.shared.fail(cause);
        self.reader.abort();
    }

    pub(super) fn close(&self) {
        self.shared.fail(ClientError::Closed);
        self.reader.abort();
    }

    async fn slot(&self) -> Result<OwnedSemaphorePermit, ClientError> {
        match self.shared.slots.clone().acquire_owned().await {
            Ok(slot) => Ok(slot),
            // Closed only by `fail`, which has recorded why.
            Err(_closed) => Err(self.shared.failure()),
        }
    }

    fn next_correlation_id(&self) -> u64 {
        self.shared
            .next_correlation_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Sends a request and waits for its response, decoded.
    pub(super) async fn call(
        &self,
        request: Arc<Request>,
        timeout: Duration,
        operation: &'static str,
    ) -> Result<ResponseBody, ClientError> {
        let opcode = request.opcode();
        let exchange = async {
            let response = self.enqueue(request).await?;
            self.response(opcode, response).await
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_elapsed) => Err(ClientError::Timeout {
                operation,
                timeout_ms: timeout.as_millis() as u64,
            }),
        }
    }

    /// Registers a request and hands it to the writer, waiting only for a slot; its
    /// response comes through the returned receiver ([`Connection::response`]).
    /// Requests enqueued one after another by one caller are written in that order.
    pub(super) async fn enqueue(&self, request: Arc<Request>) -> Result<Response, ClientError> {
        let opcode = request.opcode();
        let slot = self.slot().await?;
        let correlation_id = self.next_correlation_id();
        let (responder, response) = oneshot::channel();
        {
            let mut table = self.shared.pending();
            if let Some(failure) = &table.failure {
                return Err(failure.clone());
            }
            table.waiters.insert(
                correlation_id,
                Waiter {
                    opcode,
                    responder,
                    _slot: slot,
                },
            );
        }
        let outbound = Outbound {
            correlation_id,
            request,
            written: None,
        };
        if self.outbound.send(outbound).is_err() {
            // The writer has stopped, so the connection has failed and our waiter
            // has been (or is being) failed with the cause.
            return Err(self.shared.failure());
        }
        Ok(response)
    }

    /// Waits for the response of an enqueued request and decodes it.
    pub(super) async fn response(
        &self,
        opcode: Opcode,
        response: Response,
    ) -> Result<ResponseBody, ClientError> {
        let body = match response.await {
            Ok(result) => result?,
            Err(_dropped) => return Err(self.shared.failure()),
        };
        match decode_response(opcode, body) {
            Ok(Ok(body)) => Ok(body),
            Ok(Err(refusal)) => Err(ClientError::Broker(refusal)),
            Err(error) => Err(ClientError::Protocol(error)),
        }
    }

    /// Hands a request the broker does not answer to the writer, waiting only for a
    /// slot; the returned receiver says when it is written ([`Connection::written`]).
    pub(super) async fn enqueue_without_response(
        &self,
        request: Arc<Request>,
    ) -> Result<Written, ClientError> {
        let slot = self.slot().await?;
        if let Some(failure) = &self.shared.pending().failure {
            return Err(failure.clone());
        }
        let (written, written_receiver) = oneshot::channel();
        let outbound = Outbound {
            correlation_id: self.next_correlation_id(),
            request,
            written: Some((written, slot)),
        };
        if self.outbound.send(outbound).is_err() {
            return Err(self.shared.failure());
        }
        Ok(written_receiver)
    }

    /// Waits until a request enqueued without response is written.
    pub(super) async fn written(&self, written: Written) -> Result<(), ClientError> {
        match written.await {
            Ok(result) => result,
            Err(_dropped) => Err(self.shared.failure()),
        }
    }
}

/// Where an enqueued request's response arrives.
pub(super) type Response = oneshot::Receiver<Result<Bytes, ClientError>>;
/// Where a request without response learns it was written.
pub(super) type Written = oneshot::Receiver<Result<(), ClientError>>;

async fn write_loop(
    shared: Arc<Shared>,
    mut stream: OwnedWriteHalf,
    mut outbound: mpsc::UnboundedReceiver<Outbound>,
) {
    let mut buffer = BytesMut::with_capacity(WRITE_COALESCE_BYTES_MAX);
    let mut parts: Vec<Bytes> = Vec::new();
    let mut written = Vec::new();
    while let Some(first) = outbound.recv().await {
        let mut next = Some(first);
        // Bytes in `parts` (what is split off `buffer` moves there).
        let mut parts_bytes = 0;
        while let Some(item) = next.take() {
            // Small frames are coalesced into `buffer`; large produce batches are written
            // from the producer's own buffers, not copied.
            let parts_before = parts.len();
            item.request
                .encode_parts(item.correlation_id, &mut buffer, &mut parts);
            parts_bytes += parts[parts_before..].iter().map(Bytes::len).sum::<usize>();
            if let Some(notify) = item.written {
                written.push(notify);
            }
            if buffer.len() + parts_bytes < WRITE_COALESCE_BYTES_MAX {
                next = outbound.try_recv().ok();
            }
        }
        if !buffer.is_empty() {
            parts.push(buffer.split().freeze());
        }
        let result = write_parts(&mut stream, &mut parts).await;
        parts.clear();
        // The written parts are gone, so the buffer can take its memory back.
        buffer.reserve(WRITE_COALESCE_BYTES_MAX);
        match result {
            Ok(()) => {
                for (notify, _slot) in written.drain(..) {
                    let _ = notify.send(Ok(()));
                }
            }
            Err(source) => {
                shared.fail(ClientError::Io {
                    context: "writing requests",
                    peer: shared.peer,
                    source: Arc::new(source),
                });
                let failure = shared.failure();
                for (notify, _slot) in written.drain(..) {
                    let _ = notify.send(Err(failure.clone()));
                }
                return;
            }
        }
    }
    // Every handle is gone: tell the broker we are done.
    let _ = stream.shutdown().await;
}

/// The most buffers one vectored write takes (Linux's IOV_MAX is 1024).
const WRITE_PARTS_MAX: usize = 64;

/// Writes every part, in order, with vectored writes.
async fn write_parts(stream: &mut OwnedWriteHalf, parts: &mut [Bytes]) -> io::Result<()> {
    let mut first = 0;
    while first < parts.len() {
        let last = parts.len().min(first + WRITE_PARTS_MAX);
        let slices: Vec<io::IoSlice<'_>> = parts[first..last]
            .iter()
            .map(|part| io::IoSlice::new(part))
            .collect();
        let mut sent = stream.write_vectored(&slices).await?;
        if sent == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "the socket took no bytes",
            ));
        }
        while sent > 0 {
            let part = &mut parts[first];
            let taken = sent.min(part.len());
            part.advance(taken);
            sent -= taken;
            if part.is_empty() {
                first += 1;
            }
        }
        while first < parts.len() && parts[first].is_empty() {
            first += 1;
        }
    }
    Ok(())
}

async fn read_loop(shared: Arc<Shared>, mut stream: OwnedReadHalf) {
    let cause = read_frames(&shared, &mut stream).await;
    shared.fail(cause);
}

/// Reads and routes frames until the connection fails; returns why it failed.
async fn read_frames(shared: &Shared, stream: &mut OwnedReadHalf) -> ClientError {
    let mut buffer = BytesMut::with_capacity(READ_BUFFER_BYTES);
    loop {
        // Route every whole frame already buffered.
        loop {
            let header = match decode_frame_header(&buffer, shared.response_body_bytes_max) {
                Ok(Decoded::Complete(header)) => header,
                Ok(Decoded::Incomplete { need }) => {
                    buffer.reserve(need.saturating_sub(buffer.len()));
                    break;
                }
                Err(error) => return ClientError::Protocol(error),
            };
            if buffer.len() < header.frame_length() {
                buffer.reserve(header.frame_length() - buffer.len());
                break;
            }
            let mut frame = buffer.split_to(header.frame_length()).freeze();
            frame.advance(crate::protocol::FRAME_HEADER_SIZE);
            if !header.is_response() {
                return ClientError::UnexpectedResponse {
                    correlation_id: header.correlation_id,
                    reason: format!(
                        "frame with opcode {} is not flagged as a response",
                        header.opcode
                    ),
                };
            }
            let waiter = shared.pending().waiters.remove(&header.correlation_id);
            let Some(waiter) = waiter else {
                // No one asked: most likely the broker refusing a produce sent with acks
                // none (which we never register). It decides whether to close; the frame
                // boundaries are intact, so we keep reading.
                continue;
            };
            if waiter.opcode as u8 != header.opcode {
                let reason = format!(
                    "response opcode {} answers a {:?} request",
                    header.opcode, waiter.opcode
                );
                let _ = waiter.responder.send(Err(ClientError::UnexpectedResponse {
                    correlation_id: header.correlation_id,
                    reason: reason.clone(),
                }));
                return ClientError::UnexpectedResponse {
                    correlation_id: header.correlation_id,
                    reason,
                };
            }
            let _ = waiter.responder.send(Ok(frame));
        }
        match stream.read_buf(&mut buffer).await {
            Ok(0) => {
                return ClientError::Io {
                    context: "reading responses",
                    peer: shared.peer,
                    source: Arc::new(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the broker closed the connection",
                    )),
                }
            }
            Ok(_) => {}
            Err(source) => {
                return ClientError::Io {
                    context: "reading responses",
                    peer: shared.peer,
                    source: Arc::new(source),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parts far larger than the socket's buffers are written whole and in order, however
    /// the kernel cuts the vectored writes (mid-part, across parts), including more parts
    /// than one write takes.
    #[tokio::test]
    async fn write_parts_writes_every_byte_in_order_across_partial_writes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        let (_read_half, mut write_half) = client.unwrap().into_split();
        let (mut peer, _) = accepted.unwrap();
        let mut parts: Vec<Bytes> = (0..WRITE_PARTS_MAX + 7)
            .map(|index| {
                let length = if index % 3 == 0 { 300_000 } else { 1 + index };
                Bytes::from(
                    (0..length)
                        .map(|byte| (byte + index) as u8)
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        let expected = parts.concat();
        let reader = tokio::spawn(async move {
            let mut received = Vec::new();
            peer.read_to_end(&mut received).await.unwrap();
            received
        });
        write_parts(&mut write_half, &mut parts).await.unwrap();
        write_half.shutdown().await.unwrap();
        let received = reader.await.unwrap();
        assert_eq!(received.len(), expected.len());
        assert!(
            received == expected,
            "the bytes arrived changed or reordered"
        );
    }
}
