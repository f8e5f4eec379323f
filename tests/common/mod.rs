//! Shared helpers for integration tests: a real broker on 127.0.0.1 in a temporary data
//! directory, and a raw blocking protocol client for byte-level tests.
#![allow(dead_code)]

pub mod process;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use shardq::config::ServerConfig;
use shardq::protocol::batch::BatchBuilder;
use shardq::protocol::{
    decode_frame_header, decode_response, Decoded, Opcode, Request, ResponseBody, WireError,
    FRAME_HEADER_SIZE,
};
use shardq::server::ServerHandle;

/// Small sizes so tests roll segments and fill chunks quickly.
pub fn test_config(data_dir: &Path, shards: usize) -> ServerConfig {
    ServerConfig {
        data_dir: data_dir.to_path_buf(),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        cores: Some(shards),
        segment_size_bytes: 4 << 20,
        chunk_size_bytes: 256 << 10,
        chunk_memory_bytes_per_shard_max: 8 << 20,
        ..ServerConfig::default()
    }
}

pub struct TestBroker {
    pub data_dir: PathBuf,
    pub config: ServerConfig,
    pub handle: Option<ServerHandle>,
}

impl TestBroker {
    pub fn start(data_dir: &Path, shards: usize) -> TestBroker {
        Self::start_with(test_config(data_dir, shards))
    }

    pub fn start_with(config: ServerConfig) -> TestBroker {
        let handle = ServerHandle::start(config.clone()).expect("broker starts");
        TestBroker {
            data_dir: config.data_dir.clone(),
            config,
            handle: Some(handle),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.handle.as_ref().expect("running").local_addr
    }

    pub fn shard_addr(&self, shard: usize) -> SocketAddr {
        let handle = self.handle.as_ref().expect("running");
        SocketAddr::new(handle.local_addr.ip(), handle.shard_ports[shard])
    }

    pub fn stop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown();
        }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A blocking client that speaks raw frames: for tests that need control of every byte.
pub struct RawClient {
    pub stream: TcpStream,
    next_id: u64,
}

impl RawClient {
    pub fn connect(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        RawClient { stream, next_id: 1 }
    }

    /// Wraps a stream the test set up itself (socket options, say).
    pub fn from_stream(stream: TcpStream) -> RawClient {
        RawClient { stream, next_id: 1 }
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// Sends a request and returns its correlation id.
    pub fn send(&mut self, request: &Request) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let mut out = BytesMut::new();
        request.encode(id, &mut out);
        self.send_bytes(&out);
        id
    }

    /// Reads one response frame: `None` when the broker closed the connection.
    pub fn read_frame(&mut self) -> Option<(u64, u8, Bytes)> {
        let mut header = [0u8; FRAME_HEADER_SIZE];
        if self.stream.read_exact(&mut header).is_err() {
            return None;
        }
        let decoded = decode_frame_header(&header, u32::MAX).expect("broker frames are valid");
        let Decoded::Complete(decoded) = decoded else {
            panic!("a whole header was given")
        };
        let mut body = vec![0u8; decoded.body_length as usize];
        self.stream.read_exact(&mut body).expect("body");
        Some((decoded.correlation_id, decoded.opcode, Bytes::from(body)))
    }

    pub fn call(&mut self, request: &Request) -> Result<ResponseBody, WireError> {
        let opcode = request.opcode();
        let id = self.send(request);
        let (response_id, _, body) = self.read_frame().expect("a response");
        assert_eq!(response_id, id, "responses to a lone request match its id");
        decode_response(opcode, body).expect("response decodes")
    }

    /// True when the broker has closed this connection: the read ends the stream (or the
    /// close came as a reset). False when the connection is still open: a byte arrives,
    /// or nothing does within the read timeout (a silent open connection is not closed).
    pub fn is_closed_by_peer(&mut self) -> bool {
        let mut byte = [0u8; 1];
        match self.stream.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(error) => match error.kind() {
                std::io::ErrorKind::ConnectionReset => true,
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => false,
                _ => panic!("reading to see whether the broker closed: {error}"),
            },
        }
    }
}

pub fn opcode_of(raw: u8) -> Opcode {
    Opcode::from_wire(raw).expect("known opcode")
}

/// A batch of `values` with no keys.
pub fn batch_of(values: &[&[u8]]) -> Bytes {
    let mut builder = BatchBuilder::new(BytesMut::new());
    for value in values {
        builder.push(1_700_000_000_000, None, value, &[]);
    }
    builder.finish()
}

use shardq::protocol::batch::{decode_records, Record};
use shardq::protocol::{
    Acks, CreateTopicRequest, FetchPartition, FetchPartitionResult, FetchRequest, FetchTopic,
    ProducePartition, ProduceRequest, ProduceTopic,
};

/// A Fetch of `topic` at each `(partition, offset)`, with the request's and each
/// partition's byte budgets.
pub fn fetch_request(
    wait_ms_max: u32,
    bytes_max: u32,
    partition_bytes_max: u32,
    topic: &str,
    partitions: &[(u32, u64)],
) -> Request {
    Request::Fetch(FetchRequest {
        wait_ms_max,
        bytes_max,
        topics: vec![FetchTopic {
            name: topic.into(),
            partitions: partitions
                .iter()
                .map(|&(partition, offset)| FetchPartition {
                    partition,
                    offset,
                    bytes_max: partition_bytes_max,
                })
                .collect(),
        }],
    })
}

/// The partitions of a fetch answer's first topic; anything else fails the test.
pub fn fetched(response: Result<ResponseBody, WireError>) -> Vec<FetchPartitionResult> {
    match response {
        Ok(ResponseBody::Fetch(mut response)) => response.topics.remove(0).partitions,
        other => panic!("a fetch answered with {other:?}"),
    }
}

impl RawClient {
    pub fn create_topic(&mut self, name: &str, partitions: u32) {
        self.call(&Request::CreateTopic(CreateTopicRequest {
            name: name.into(),
            partitions,
            retention: Default::default(),
            queue: Default::default(),
        }))
        .expect("topic created");
    }

    /// Produces one batch to one partition with durable acks; the base offset or error.
    pub fn produce(&mut self, topic: &str, partition: u32, batch: Bytes) -> Result<u64, WireError> {
        let response = self.call(&Request::Produce(ProduceRequest {
            acks: Acks::Durable,
            timeout_ms: 10_000,
            topics: vec![ProduceTopic {
                name: topic.into(),
                partitions: vec![ProducePartition { partition, batch }],
            }],
        }))?;
        let ResponseBody::Produce(response) = response else {
            panic!("produce answered with {response:?}")
        };
        response.topics[0].partitions[0].result.clone()
    }

    /// Every record of a partition from `offset` to the high watermark.
    pub fn fetch_all(&mut self, topic: &str, partition: u32, offset: u64) -> Vec<Record> {
        let mut records: Vec<Record> = Vec::new();
        let mut next = offset;
        loop {
            let response = self
                .call(&Request::Fetch(FetchRequest {
                    wait_ms_max: 0,
                    bytes_max: 1 << 20,
                    topics: vec![FetchTopic {
                        name: topic.into(),
                        partitions: vec![FetchPartition {
                            partition,
                            offset: next,
                            bytes_max: 1 << 20,
                        }],
                    }],
                }))
                .expect("fetch");
            let ResponseBody::Fetch(response) = response else {
                panic!("fetch answered with {response:?}")
            };
            let data = response.topics[0].partitions[0].data.clone();
            let batches = data.batches.clone().expect("partition readable");
            let before = records.len();
            decode_records(&batches, next, &mut records).expect("batches pass their CRC");
            if records.len() == before {
                assert_eq!(
                    next, data.high_watermark,
                    "an empty fetch happens only at the watermark"
                );
                return records;
            }
            next = records.last().expect("non-empty").offset + 1;
        }
    }
}

/// Values of records, as strings.
pub fn values(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .map(|record| String::from_utf8_lossy(&record.value).into_owned())
        .collect()
}

#[cfg(feature = "client")]
pub mod client;
