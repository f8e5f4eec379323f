//! One client connection, on the shard that accepted it.
//!
//! A reader task decodes frames from one reused buffer and starts a task per request
//! (pipelining: up to `connection_requests_in_flight_max` at once; reading pauses at the
//! limit, which is the backpressure a fast producer feels). Responses go, in completion
//! order, through a bounded local channel to a writer task that coalesces whatever is
//! ready into one write.
//!
//! Bad input (invariant 7): an unknown opcode gets an `UnknownOpcode` response and the
//! connection goes on (the frame's length was trustworthy); a bad version, an oversized
//! length or a body that does not parse gets an error response and the connection is
//! closed, since the stream can no longer be trusted to be in sync. Nothing is stored
//! for a request that failed validation, and no other connection notices.

use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::channels::local_channel::{self, LocalSender};
use glommio::net::TcpStream;
use glommio::sync::Semaphore;

use crate::protocol::{
    decode_frame_header, encode_error_response, encode_response, peek_correlation_id, Acks,
    DecodeLimits, Decoded, ErrorCode, Opcode, ProtocolError, Request, WireError, FRAME_HEADER_SIZE,
};
use crate::shard::Shard;

use super::dispatch;

/// Bytes asked of the socket per read when the buffer has no room.
const READ_CHUNK_BYTES: usize = 64 * 1024;

pub async fn serve(shard: Rc<Shard>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = futures_lite::io::split(stream);
    let in_flight_max = shard.config.connection_requests_in_flight_max as usize;
    let (responses, outgoing) = local_channel::new_bounded::<Bytes>(in_flight_max + 1);
    let writer_shard = Rc::clone(&shard);
    let writer_task = glommio::spawn_local(async move {
        let mut coalesced = BytesMut::new();
        while let Some(frame) = outgoing.recv().await {
            coalesced.extend_from_slice(&frame);
            let mut frames = 1;
            // Coalesce every response already waiting into the same write.
            while let Some(Some(more)) = futures_lite::future::poll_once(outgoing.recv()).await {
                coalesced.extend_from_slice(&more);
                frames += 1;
            }
            let written = writer.write_all(&coalesced).await;
            writer_shard.settle_responses(frames);
            if written.is_err() {
                // The client is gone: what is queued for it is owed to nobody.
                while let Some(Some(_)) = futures_lite::future::poll_once(outgoing.recv()).await {
                    writer_shard.settle_responses(1);
                }
                return;
            }
            coalesced.clear();
        }
        let _ = writer.flush().await;
        let _ = writer.close().await;
    });
    // Not detached: if this connection's task is cancelled (shutdown), dropping the
    // writer with it closes the socket.
    let responses = Rc::new(responses);
    let in_flight = Rc::new(Semaphore::new(in_flight_max as u64));
    let limits = DecodeLimits {
        topics_per_request_max: shard.config.topics_per_request_max,
        partitions_per_request_max: shard.config.partitions_per_request_max,
    };
    let body_length_max = shard.config.frame_body_bytes_max;
    let mut buffer = BytesMut::with_capacity(READ_CHUNK_BYTES);
    loop {
        let header = match decode_frame_header(&buffer, body_length_max) {
            Ok(Decoded::Complete(header)) => header,
            Ok(Decoded::Incomplete { need }) => {
                if !read_more(&mut reader, &mut buffer, need).await {
                    break;
                }
                continue;
            }
            Err(error) => {
                // The header itself is bad: answer what we can, then hang up.
                let correlation_id = peek_correlation_id(&buffer).unwrap_or(0);
                refuse(&shard, &responses, buffer[5], correlation_id, &error).await;
                break;
            }
        };
        let frame_length = header.frame_length();
        if buffer.len() < frame_length {
            if !read_more(&mut reader, &mut buffer, frame_length).await {
                break;
            }
            continue;
        }
        let frame = buffer.split_to(frame_length).freeze();
        let body = frame.slice(FRAME_HEADER_SIZE..);
        if header.is_response() {
            let error = WireError::new(
                ErrorCode::InvalidRequest,
                "clients send requests, not responses",
            );
            send_error(
                &shard,
                &responses,
                header.opcode,
                header.correlation_id,
                &error,
            )
            .await;
            break;
        }
        let Some(opcode) = Opcode::from_wire(header.opcode) else {
            // The length was sane, so the stream stays in sync: refuse just this frame.
            let error = ProtocolError::UnknownOpcode {
                opcode: header.opcode,
            };
            refuse(
                &shard,
                &responses,
                header.opcode,
                header.correlation_id,
                &error,
            )
            .await;
            continue;
        };
        let request = match Request::decode(opcode, body, &limits) {
            Ok(request) => request,
            Err(error) => {
                refuse(
                    &shard,
                    &responses,
                    header.opcode,
                    header.correlation_id,
                    &error,
                )
                .await;
                if error.closes_connection() {
                    break;
                }
                // An invalid topic name: the frame was well delimited, so the stream
                // is still in sync and only this request is refused.
                continue;
            }
        };
        let silent = matches!(&request, Request::Produce(produce) if produce.acks == Acks::None);
        let permit = in_flight
            .acquire_static_permit(1)
            .await
            .expect("the in-flight semaphore is never closed");
        let shard = Rc::clone(&shard);
        let responses = Rc::clone(&responses);
        let correlation_id = header.correlation_id;
        shard.owe_response();
        glommio::spawn_local(async move {
            let outcome = dispatch::handle(&shard, request).await;
            if silent {
                if let Err(error) = &outcome {
                    eprintln!("shardq: produce with acks=none failed: {error}");
                }
                shard.settle_responses(1);
                drop(permit);
                return;
            }
            let mut out = BytesMut::new();
            encode_response(&mut out, opcode, correlation_id, outcome.as_ref());
            if responses.send(out.freeze()).await.is_err() {
                // The writer stopped (the client went away): nobody will write it.
                shard.settle_responses(1);
            }
            drop(permit);
        })
        .detach();
    }
    // Let requests already running finish and answer, then close the socket.
    let _ = in_flight.acquire(in_flight_max as u64).await;
    drop(responses);
    writer_task.await;
}

/// Reads until `buffer` holds at least `need` bytes. False on end of stream or error.
async fn read_more<R: futures_lite::AsyncRead + Unpin>(
    reader: &mut R,
    buffer: &mut BytesMut,
    need: usize,
) -> bool {
    while buffer.len() < need {
        let start = buffer.len();
        // Grow with what arrives, never with what a frame header claims: a header alone
        // must not make the shard allocate (and zero) a whole frame's worth of memory.
        buffer.resize(start + READ_CHUNK_BYTES, 0);
        match reader.read(&mut buffer[start..]).await {
            Ok(0) | Err(_) => {
                buffer.truncate(start);
                return false;
            }
            Ok(read) => buffer.truncate(start + read),
        }
    }
    true
}

async fn refuse(
    shard: &Shard,
    responses: &LocalSender<Bytes>,
    opcode: u8,
    correlation_id: u64,
    error: &ProtocolError,
) {
    send_error(
        shard,
        responses,
        opcode,
        correlation_id,
        &WireError::new(error.code(), error.to_string()),
    )
    .await;
}

/// Answers with an error status; the opcode is echoed as received, known or not.
async fn send_error(
    shard: &Shard,
    responses: &LocalSender<Bytes>,
    opcode: u8,
    correlation_id: u64,
    error: &WireError,
) {
    let mut out = BytesMut::new();
    encode_error_response(&mut out, opcode, correlation_id, error);
    // Owed like any response: the writer settles every frame it writes.
    shard.owe_response();
    if responses.send(out.freeze()).await.is_err() {
        shard.settle_responses(1);
    }
}
