//! A scripted peer for the client's unit tests: it reads requests and writes responses
//! exactly when a test says so, for the few situations the real broker cannot produce
//! on demand (answers in reverse order, a connection dropped mid-request, requests left
//! unanswered). Everything else about the client is tested against the real broker in
//! `tests/client_*.rs`.

use std::net::SocketAddr;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::protocol::{
    decode_frame_header, encode_response, DecodeLimits, Decoded, FrameHeader, HandshakeResponse,
    Opcode, Request, ResponseBody, WireError, FRAME_HEADER_SIZE,
};

pub(super) async fn listen() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let address = listener.local_addr().expect("bound address");
    (listener, address)
}

/// One accepted connection, driven by the test.
pub(super) struct ScriptedConnection {
    stream: TcpStream,
    buffer: BytesMut,
}

impl ScriptedConnection {
    pub(super) async fn accept(listener: &TcpListener) -> ScriptedConnection {
        let (stream, _) = listener.accept().await.expect("accept the client");
        ScriptedConnection {
            stream,
            buffer: BytesMut::new(),
        }
    }

    /// Accepts and answers the handshake.
    pub(super) async fn accept_and_handshake(listener: &TcpListener) -> ScriptedConnection {
        ScriptedConnection::accept_and_answer(listener, &handshake_body()).await
    }

    /// Accepts and answers the handshake with `handshake` (a broker with other limits).
    pub(super) async fn accept_and_answer(
        listener: &TcpListener,
        handshake: &ResponseBody,
    ) -> ScriptedConnection {
        let mut connection = ScriptedConnection::accept(listener).await;
        let (header, request) = connection.read_request().await.expect("a handshake");
        assert!(
            matches!(request, Request::Handshake(_)),
            "first request is the handshake"
        );
        connection.respond(&header, Ok(handshake)).await;
        connection
    }

    /// The next request, or `None` when the client closed the connection.
    pub(super) async fn read_request(&mut self) -> Option<(FrameHeader, Request)> {
        loop {
            if let Decoded::Complete(header) =
                decode_frame_header(&self.buffer, 64 << 20).expect("valid header")
            {
                if self.buffer.len() >= header.frame_length() {
                    let mut frame = self.buffer.split_to(header.frame_length()).freeze();
                    frame.advance(FRAME_HEADER_SIZE);
                    let opcode = Opcode::from_wire(header.opcode).expect("known opcode");
                    let request = Request::decode(opcode, frame, &DecodeLimits::default())
                        .expect("valid request");
                    return Some((header, request));
                }
            }
            let read = self
                .stream
                .read_buf(&mut self.buffer)
                .await
                .expect("read from the client");
            if read == 0 {
                return None;
            }
        }
    }

    pub(super) async fn respond(
        &mut self,
        header: &FrameHeader,
        response: Result<&ResponseBody, &WireError>,
    ) {
        let mut out = BytesMut::new();
        let opcode = Opcode::from_wire(header.opcode).expect("known opcode");
        encode_response(&mut out, opcode, header.correlation_id, response);
        self.stream
            .write_all(&out)
            .await
            .expect("write to the client");
    }
}

pub(super) fn handshake_body() -> ResponseBody {
    ResponseBody::Handshake(HandshakeResponse {
        protocol_version: crate::protocol::PROTOCOL_VERSION,
        shard_count: 2,
        shard_id: 1,
        server_version: "test-peer".into(),
        batch_bytes_max: 1 << 20,
    })
}
