//! Test peers for the client's unit tests: a scripted connection that reads requests and
//! writes responses exactly when a test says so, and a small in-memory broker that
//! speaks the real codec (dense offsets from 0 per partition, whole-batch fetches, every
//! batch validated). Neither is the real broker: integration tests use that.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::protocol::batch::{stamp_batch, validate_batch, BatchHeader};
use crate::protocol::{
    decode_frame_header, encode_response, Acks, DecodeLimits, Decoded, ErrorCode,
    FetchPartitionData, FetchPartitionResult, FetchResponse, FetchTopicResult, FrameHeader,
    HandshakeResponse, MetadataResponse, Opcode, PartitionMetadata, ProducePartitionResult,
    ProduceResponse, ProduceTopicResult, Request, ResponseBody, TopicMetadata, WireError,
    FRAME_HEADER_SIZE,
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
        let mut connection = ScriptedConnection::accept(listener).await;
        let (header, request) = connection.read_request().await.expect("a handshake");
        assert!(
            matches!(request, Request::Handshake(_)),
            "first request is the handshake"
        );
        connection.respond(&header, Ok(&handshake_body())).await;
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
    })
}

/// The in-memory broker's state, shared with the test for assertions.
#[derive(Default)]
pub(super) struct BrokerModel {
    /// Stored batches per (topic, partition), stamped with their base offsets.
    pub(super) logs: HashMap<(String, u32), Vec<bytes::Bytes>>,
    pub(super) partition_counts: HashMap<String, u32>,
    /// Every request received, in order.
    pub(super) requests: Vec<Request>,
    /// Produce to these partitions is refused with this code.
    pub(super) refused: HashMap<(String, u32), ErrorCode>,
    /// Topics whose metadata answers UnknownTopic even if created (tests of refresh).
    pub(super) hidden: HashSet<String>,
}

impl BrokerModel {
    fn high_watermark(&self, topic: &str, partition: u32) -> u64 {
        self.logs
            .get(&(topic.to_owned(), partition))
            .and_then(|batches| batches.last())
            .map_or(0, |batch| {
                BatchHeader::read(batch)
                    .expect("stored batch")
                    .next_offset()
            })
    }

    fn handle(&mut self, request: Request) -> Option<Result<ResponseBody, WireError>> {
        self.requests.push(request.clone());
        Some(match request {
            Request::Handshake(_) => Ok(handshake_body()),
            Request::Metadata(request) => {
                let names: Vec<String> = if request.topics.is_empty() {
                    let mut names: Vec<String> = self.partition_counts.keys().cloned().collect();
                    names.sort();
                    names
                } else {
                    request.topics
                };
                let topics = names
                    .into_iter()
                    .map(|name| match self.partition_counts.get(&name) {
                        Some(count) if !self.hidden.contains(&name) => TopicMetadata {
                            partitions: (0..*count)
                                .map(|partition| PartitionMetadata {
                                    partition,
                                    shard: crate::placement::shard_for(&name, partition, 2),
                                })
                                .collect(),
                            name,
                            error: None,
                        },
                        _ => TopicMetadata {
                            error: Some(WireError::new(
                                ErrorCode::UnknownTopic,
                                format!("no topic {name}"),
                            )),
                            name,
                            partitions: Vec::new(),
                        },
                    })
                    .collect();
                Ok(ResponseBody::Metadata(MetadataResponse {
                    shard_ports: vec![9741, 9742],
                    topics,
                }))
            }
            Request::CreateTopic(request) => match self.partition_counts.entry(request.name) {
                std::collections::hash_map::Entry::Occupied(entry) => Err(WireError::new(
                    ErrorCode::TopicAlreadyExists,
                    entry.key().clone(),
                )),
                std::collections::hash_map::Entry::Vacant(entry) => {
                    entry.insert(request.partitions);
                    Ok(ResponseBody::CreateTopic)
                }
            },
            Request::DeleteTopic(request) => match self.partition_counts.remove(&request.name) {
                Some(_) => Ok(ResponseBody::DeleteTopic),
                None => Err(WireError::new(ErrorCode::UnknownTopic, request.name)),
            },
            Request::Produce(request) => {
                let mut topics = Vec::new();
                for topic in request.topics {
                    let mut partitions = Vec::new();
                    for partition in topic.partitions {
                        let key = (topic.name.clone(), partition.partition);
                        let result = if let Some(code) = self.refused.get(&key) {
                            Err(WireError::new(*code, "refused by the test"))
                        } else if self
                            .partition_counts
                            .get(&topic.name)
                            .is_none_or(|count| partition.partition >= *count)
                        {
                            Err(WireError::new(
                                ErrorCode::UnknownPartition,
                                "no such partition",
                            ))
                        } else {
                            match validate_batch(&partition.batch, 100_000) {
                                Err(error) => {
                                    Err(WireError::new(ErrorCode::InvalidBatch, error.to_string()))
                                }
                                Ok(_) => {
                                    let base_offset =
                                        self.high_watermark(&topic.name, partition.partition);
                                    let mut stored = partition.batch.to_vec();
                                    stamp_batch(&mut stored, base_offset, 1);
                                    self.logs.entry(key).or_default().push(stored.into());
                                    Ok(base_offset)
                                }
                            }
                        };
                        partitions.push(ProducePartitionResult {
                            partition: partition.partition,
                            result,
                        });
                    }
                    topics.push(ProduceTopicResult {
                        name: topic.name,
                        partitions,
                    });
                }
                if request.acks == Acks::None {
                    return None;
                }
                Ok(ResponseBody::Produce(ProduceResponse { topics }))
            }
            Request::Fetch(request) => {
                let mut topics = Vec::new();
                for topic in request.topics {
                    let mut partitions = Vec::new();
                    for partition in topic.partitions {
                        let high_watermark = self.high_watermark(&topic.name, partition.partition);
                        let result = if partition.offset > high_watermark {
                            Err(WireError::new(ErrorCode::OffsetOutOfRange, "past the end"))
                        } else {
                            let mut batches = BytesMut::new();
                            for batch in self
                                .logs
                                .get(&(topic.name.clone(), partition.partition))
                                .into_iter()
                                .flatten()
                            {
                                let header = BatchHeader::read(batch).expect("stored batch");
                                if header.next_offset() > partition.offset
                                    && (batches.is_empty()
                                        || batches.len() + batch.len()
                                            <= partition.bytes_max as usize)
                                {
                                    batches.extend_from_slice(batch);
                                }
                            }
                            Ok(FetchPartitionData {
                                log_start_offset: 0,
                                high_watermark,
                                batches: batches.freeze(),
                            })
                        };
                        partitions.push(FetchPartitionResult {
                            partition: partition.partition,
                            result,
                        });
                    }
                    topics.push(FetchTopicResult {
                        name: topic.name,
                        partitions,
                    });
                }
                Ok(ResponseBody::Fetch(FetchResponse { topics }))
            }
        })
    }
}

/// Serves every connection from `listener` with the model, answering in request order.
pub(super) fn spawn_broker(listener: TcpListener, model: Arc<Mutex<BrokerModel>>) {
    tokio::spawn(async move {
        loop {
            let mut connection = ScriptedConnection::accept(&listener).await;
            let model = model.clone();
            tokio::spawn(async move {
                while let Some((header, request)) = connection.read_request().await {
                    let response = model.lock().expect("model lock").handle(request);
                    if let Some(response) = response {
                        connection.respond(&header, response.as_ref()).await;
                    }
                }
            });
        }
    });
}

pub(super) async fn start_broker(topics: &[(&str, u32)]) -> (SocketAddr, Arc<Mutex<BrokerModel>>) {
    let (listener, address) = listen().await;
    let mut model = BrokerModel::default();
    for (name, partitions) in topics {
        model
            .partition_counts
            .insert((*name).to_owned(), *partitions);
    }
    let model = Arc::new(Mutex::new(model));
    spawn_broker(listener, model.clone());
    (address, model)
}
