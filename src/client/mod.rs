//! The tokio client: one TCP connection to a broker, pipelined requests, a batching
//! [`Producer`] and a polling [`Consumer`].
//!
//! What it is: an async layer over the sans-IO [`crate::protocol`] codec. What it is not:
//! shard-aware (every request goes to the shard this connection landed on, which forwards
//! to the owner), and it does not reconnect: a broken connection fails every request on
//! it for good. The [`Producer`] retries retriable produce errors on its connection; as an
//! idempotent producer (the default) it marks every batch with its producer id and a
//! per-partition sequence, so the broker stores a resent batch once.
//! It runs on whatever tokio runtime calls it; it never touches glommio or server code.
//!
//! Contract of [`Client`]:
//! - many requests may be in flight on the one connection; a background task reads
//!   response frames and hands each to the caller waiting on its correlation id, in
//!   whatever order the broker answers;
//! - at most `ClientConfig::requests_pending_max` requests are written and unanswered at
//!   once; a caller past the limit waits for a slot (backpressure, never a growing queue);
//! - when the connection breaks, every pending request and every later one fails with
//!   [`ClientError::Disconnected`], which names the first cause;
//! - a response whose top-level status is an error becomes [`ClientError::Broker`]; an
//!   error for one partition inside a good response becomes
//!   [`ClientError::PartitionRefused`].

mod accumulator;
mod connection;
mod consumer;
mod producer;
#[cfg(test)]
mod test_peer;
#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpStream, ToSocketAddrs};

use crate::protocol::batch::BatchError;
use crate::protocol::{
    AlterTopicRequest, CreateTopicRequest, DeleteTopicRequest, ErrorCode, FetchRequest,
    FetchResponse, HandshakeRequest, HandshakeResponse, ListOffsetsPartition, ListOffsetsRequest,
    ListOffsetsTopic, MetadataRequest, MetadataResponse, ProduceRequest, ProduceResponse,
    ProtocolError, Request, ResponseBody, WireError, PROTOCOL_VERSION,
};

use connection::Connection;

pub use crate::protocol::batch::Record;
pub use crate::protocol::{
    Acks, PartitionOffsets, Retention, TIMESTAMP_EARLIEST, TIMESTAMP_LATEST,
};
pub use consumer::{
    fetch_records_from_response, is_offset_out_of_range, ConsumedRecord, Consumer, ConsumerConfig,
    FetchedRecords, StartPosition,
};
pub use producer::{Producer, ProducerConfig, ProducerRecord, RecordMetadata, SendHandle};

/// Everything that can go wrong talking to a broker. `Clone`, because one broken
/// connection must fail every request that was waiting on it with the same cause.
#[derive(Debug, Clone)]
pub enum ClientError {
    /// Resolving or connecting to the broker failed.
    Connect {
        address: String,
        source: Arc<io::Error>,
    },
    /// The socket failed while doing `context`.
    Io {
        context: &'static str,
        peer: SocketAddr,
        source: Arc<io::Error>,
    },
    /// The broker sent bytes that do not parse.
    Protocol(ProtocolError),
    /// The broker refused the whole request.
    Broker(WireError),
    /// The broker refused one partition of a produce or fetch; the rest may have succeeded.
    PartitionRefused {
        topic: String,
        partition: u32,
        error: WireError,
    },
    /// A fetch asked for an offset outside what the partition stores.
    OffsetOutOfRange {
        topic: String,
        partition: u32,
        requested: u64,
        log_start_offset: u64,
        high_watermark: u64,
    },
    /// A fetched record batch failed its CRC or framing check.
    Batch {
        topic: String,
        partition: u32,
        source: BatchError,
    },
    /// The broker answered something we did not ask for.
    UnexpectedResponse { correlation_id: u64, reason: String },
    /// The connection broke; `cause` is the first failure, shared by every request that
    /// was pending then or is made later.
    Disconnected {
        peer: SocketAddr,
        cause: Arc<ClientError>,
    },
    /// The client or producer was closed by its owner.
    Closed,
    /// No answer within the limit.
    Timeout {
        operation: &'static str,
        timeout_ms: u64,
    },
    /// A topic named in a request is not in the broker's metadata.
    UnknownTopic { topic: String },
    /// A partition outside the topic's partition count.
    UnknownPartition {
        topic: String,
        partition: u32,
        partition_count: u32,
    },
    /// A configuration value that cannot work.
    InvalidConfig { field: &'static str, value: u64 },
    /// A produced batch failed for good after `attempts` sends; `cause` is the last
    /// failure. `maybe_written` says whether the broker may have stored it anyway (an
    /// attempt timed out, the connection broke after it was sent, or the broker said the
    /// batch was appended but not durable): false only when every attempt was refused
    /// before anything was appended.
    ProduceFailed {
        cause: Arc<ClientError>,
        maybe_written: bool,
        attempts: u32,
    },
}

impl ClientError {
    /// The broker's error code, where the broker said no (top-level or per partition).
    pub fn wire_code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Broker(error) | ClientError::PartitionRefused { error, .. } => {
                Some(error.code)
            }
            ClientError::OffsetOutOfRange { .. } => Some(ErrorCode::OffsetOutOfRange),
            ClientError::ProduceFailed { cause, .. } => cause.wire_code(),
            _ => None,
        }
    }

    /// For a produced batch that failed for good: whether it may have been stored
    /// anyway. `None` for errors that are not about one produced batch.
    pub fn maybe_written(&self) -> Option<bool> {
        match self {
            ClientError::ProduceFailed { maybe_written, .. } => Some(*maybe_written),
            _ => None,
        }
    }

    /// The error under a [`ClientError::ProduceFailed`] (itself otherwise).
    pub fn cause(&self) -> &ClientError {
        match self {
            ClientError::ProduceFailed { cause, .. } => cause.cause(),
            other => other,
        }
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect { address, source } => {
                write!(f, "cannot connect to {address}: {source}")
            }
            ClientError::Io { context, peer, source } => {
                write!(f, "{context} (broker {peer}): {source}")
            }
            ClientError::Protocol(error) => write!(f, "malformed response from broker: {error}"),
            ClientError::Broker(error) => write!(f, "broker refused the request: {error}"),
            ClientError::PartitionRefused {
                topic,
                partition,
                error,
            } => write!(f, "broker refused topic {topic:?} partition {partition}: {error}"),
            ClientError::OffsetOutOfRange {
                topic,
                partition,
                requested,
                log_start_offset,
                high_watermark,
            } => write!(
                f,
                "offset {requested} of topic {topic:?} partition {partition} is outside the stored range [{log_start_offset}, {high_watermark}]"
            ),
            ClientError::Batch {
                topic,
                partition,
                source,
            } => write!(f, "bad record batch from topic {topic:?} partition {partition}: {source}"),
            ClientError::UnexpectedResponse {
                correlation_id,
                reason,
            } => write!(f, "unexpected response (correlation id {correlation_id}): {reason}"),
            ClientError::Disconnected { peer, cause } => {
                write!(f, "connection to broker {peer} is broken: {cause}")
            }
            ClientError::Closed => write!(f, "the client was closed"),
            ClientError::Timeout {
                operation,
                timeout_ms,
            } => write!(f, "{operation} got no answer within {timeout_ms} ms"),
            ClientError::UnknownTopic { topic } => write!(f, "topic {topic:?} does not exist"),
            ClientError::UnknownPartition {
                topic,
                partition,
                partition_count,
            } => write!(
                f,
                "topic {topic:?} has {partition_count} partitions, there is no partition {partition}"
            ),
            ClientError::InvalidConfig { field, value } => {
                write!(f, "invalid client configuration: {field} = {value}")
            }
            ClientError::ProduceFailed {
                cause,
                maybe_written,
                attempts,
            } => write!(
                f,
                "produce failed after {attempts} attempt(s), {}: {cause}",
                if *maybe_written {
                    "the batch may have been written"
                } else {
                    "the batch was not written"
                }
            ),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Connect { source, .. } | ClientError::Io { source, .. } => {
                Some(source.as_ref())
            }
            ClientError::Protocol(error) => Some(error),
            ClientError::Broker(error) | ClientError::PartitionRefused { error, .. } => Some(error),
            ClientError::Batch { source, .. } => Some(source),
            ClientError::Disconnected { cause, .. } | ClientError::ProduceFailed { cause, .. } => {
                Some(cause.as_ref())
            }
            _ => None,
        }
    }
}

/// Connection settings. Every queue has a limit.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Sent in the handshake; the broker may log it.
    pub client_name: String,
    /// Most requests written and not yet answered; callers past it wait.
    pub requests_pending_max: usize,
    /// Largest response body accepted; a bigger frame breaks the connection rather than
    /// making us buffer it. Matches the broker's default `fetch_bytes_max` plus headroom.
    pub response_body_bytes_max: u32,
    /// How long a request (other than a fetch's own long-poll) may wait for its answer.
    pub request_timeout_ms: u64,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            client_name: format!("shardq-client/{}", env!("CARGO_PKG_VERSION")),
            requests_pending_max: 256,
            response_body_bytes_max: (16 << 20) + (1 << 20),
            request_timeout_ms: 30_000,
        }
    }
}

impl ClientConfig {
    fn validate(&self) -> Result<(), ClientError> {
        if self.requests_pending_max == 0 {
            return Err(ClientError::InvalidConfig {
                field: "requests_pending_max",
                value: 0,
            });
        }
        if self.request_timeout_ms == 0 {
            return Err(ClientError::InvalidConfig {
                field: "request_timeout_ms",
                value: 0,
            });
        }
        Ok(())
    }
}

/// One connection to a broker. Cheap to clone: clones share the connection. When the last
/// clone is dropped the connection is shut down.
#[derive(Clone)]
pub struct Client {
    connection: Arc<Connection>,
    handshake: Arc<HandshakeResponse>,
    config: Arc<ClientConfig>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("peer", &self.connection.peer())
            .field("handshake", &self.handshake)
            .finish()
    }
}

impl Client {
    /// Connects with the default [`ClientConfig`] and does the handshake.
    pub async fn connect(address: impl ToSocketAddrs + fmt::Debug) -> Result<Client, ClientError> {
        Client::connect_with(address, ClientConfig::default()).await
    }

    /// Connects, sets TCP_NODELAY (requests are small and latency matters more than
    /// packet count; the writer already coalesces queued requests into one write) and
    /// does the handshake.
    pub async fn connect_with(
        address: impl ToSocketAddrs + fmt::Debug,
        config: ClientConfig,
    ) -> Result<Client, ClientError> {
        config.validate()?;
        let address_text = format!("{address:?}");
        let connect_error = |source: io::Error| ClientError::Connect {
            address: address_text.clone(),
            source: Arc::new(source),
        };
        let stream = TcpStream::connect(address).await.map_err(connect_error)?;
        stream.set_nodelay(true).map_err(connect_error)?;
        let connection = Connection::start(stream, &config).map_err(connect_error)?;
        let timeout = Duration::from_millis(config.request_timeout_ms);
        let request = Request::Handshake(HandshakeRequest {
            client_name: config.client_name.clone(),
        });
        let handshake = match connection.call(request, timeout, "handshake").await? {
            ResponseBody::Handshake(handshake) => handshake,
            other => return Err(unexpected_body("handshake", &other)),
        };
        if handshake.protocol_version != PROTOCOL_VERSION {
            return Err(ClientError::Protocol(ProtocolError::UnsupportedVersion {
                version: handshake.protocol_version,
            }));
        }
        Ok(Client {
            connection: Arc::new(connection),
            handshake: Arc::new(handshake),
            config: Arc::new(config),
        })
    }

    /// What the broker said in the handshake.
    pub fn handshake(&self) -> &HandshakeResponse {
        &self.handshake
    }

    /// Shards the broker runs.
    pub fn shard_count(&self) -> u16 {
        self.handshake.shard_count
    }

    /// The shard that accepted this connection.
    pub fn shard_id(&self) -> u16 {
        self.handshake.shard_id
    }

    pub fn peer_address(&self) -> SocketAddr {
        self.connection.peer()
    }

    /// Whether the connection is known to be broken or closed: every request fails.
    pub fn is_broken(&self) -> bool {
        self.connection.is_broken()
    }

    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Fails every pending request and every later one with [`ClientError::Closed`], on
    /// every clone, and stops reading. The socket itself closes when the last clone is
    /// dropped (the writer task then shuts it down).
    pub fn close(&self) {
        self.connection.close();
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.request_timeout_ms)
    }

    /// Topic metadata; an empty list asks for every topic. A topic the broker does not
    /// know comes back with its `error` set, not as an error of the whole call.
    pub async fn metadata(&self, topics: &[String]) -> Result<MetadataResponse, ClientError> {
        let request = Request::Metadata(MetadataRequest {
            topics: topics.to_vec(),
        });
        match self
            .connection
            .call(request, self.timeout(), "metadata")
            .await?
        {
            ResponseBody::Metadata(metadata) => Ok(metadata),
            other => Err(unexpected_body("metadata", &other)),
        }
    }

    /// Creates a topic that keeps everything (no retention limit).
    pub async fn create_topic(&self, name: &str, partitions: u32) -> Result<(), ClientError> {
        self.create_topic_with(name, partitions, Retention::default())
            .await
    }

    pub async fn create_topic_with(
        &self,
        name: &str,
        partitions: u32,
        retention: Retention,
    ) -> Result<(), ClientError> {
        let request = Request::CreateTopic(CreateTopicRequest {
            name: name.to_owned(),
            partitions,
            retention,
            queue: Default::default(),
        });
        match self
            .connection
            .call(request, self.timeout(), "create topic")
            .await?
        {
            ResponseBody::CreateTopic => Ok(()),
            other => Err(unexpected_body("create topic", &other)),
        }
    }

    /// Changes a topic's retention.
    pub async fn alter_topic(&self, name: &str, retention: Retention) -> Result<(), ClientError> {
        let request = Request::AlterTopic(AlterTopicRequest {
            name: name.to_owned(),
            retention: Some(retention),
            queue: Default::default(),
        });
        match self
            .connection
            .call(request, self.timeout(), "alter topic")
            .await?
        {
            ResponseBody::AlterTopic => Ok(()),
            other => Err(unexpected_body("alter topic", &other)),
        }
    }

    /// For each `(partition, timestamp_ms)`: the first offset whose record timestamp is
    /// at or after the time (the high watermark when none is), with the partition's
    /// range. `TIMESTAMP_EARLIEST` / `TIMESTAMP_LATEST` ask for the range's ends.
    pub async fn list_offsets(
        &self,
        topic: &str,
        partitions: &[(u32, i64)],
    ) -> Result<Vec<(u32, PartitionOffsets)>, ClientError> {
        let request = Request::ListOffsets(ListOffsetsRequest {
            topics: vec![ListOffsetsTopic {
                name: topic.to_owned(),
                partitions: partitions
                    .iter()
                    .map(|(partition, timestamp_ms)| ListOffsetsPartition {
                        partition: *partition,
                        timestamp_ms: *timestamp_ms,
                    })
                    .collect(),
            }],
        });
        let response = match self
            .connection
            .call(request, self.timeout(), "list offsets")
            .await?
        {
            ResponseBody::ListOffsets(response) => response,
            other => return Err(unexpected_body("list offsets", &other)),
        };
        let mut answered = Vec::with_capacity(partitions.len());
        for result in response
            .topics
            .into_iter()
            .flat_map(|topic| topic.partitions)
        {
            match result.result {
                Ok(offsets) => answered.push((result.partition, offsets)),
                Err(error) => {
                    return Err(ClientError::PartitionRefused {
                        topic: topic.to_owned(),
                        partition: result.partition,
                        error,
                    })
                }
            }
        }
        Ok(answered)
    }

    pub async fn delete_topic(&self, name: &str) -> Result<(), ClientError> {
        let request = Request::DeleteTopic(DeleteTopicRequest {
            name: name.to_owned(),
        });
        match self
            .connection
            .call(request, self.timeout(), "delete topic")
            .await?
        {
            ResponseBody::DeleteTopic => Ok(()),
            other => Err(unexpected_body("delete topic", &other)),
        }
    }

    /// Sends a produce request. With `acks: none` the broker sends no response: this
    /// returns `Ok(None)` once the request is written to the socket. Otherwise the
    /// response is returned as is, per-partition errors included, for the caller to read.
    /// The wait is bounded by the request's own `timeout_ms` plus `request_timeout_ms`,
    /// so that the broker's own Timeout answer normally arrives first.
    pub async fn produce(
        &self,
        request: ProduceRequest,
    ) -> Result<Option<ProduceResponse>, ClientError> {
        let timeout =
            Duration::from_millis(u64::from(request.timeout_ms) + self.config.request_timeout_ms);
        if request.acks == Acks::None {
            self.connection
                .send_without_response(Request::Produce(request), timeout)
                .await?;
            return Ok(None);
        }
        match self
            .connection
            .call(Request::Produce(request), timeout, "produce")
            .await?
        {
            ResponseBody::Produce(response) => Ok(Some(response)),
            other => Err(unexpected_body("produce", &other)),
        }
    }

    /// Sends a fetch request. The wait is bounded by its long-poll `wait_ms_max` plus
    /// `request_timeout_ms`.
    pub async fn fetch(&self, request: FetchRequest) -> Result<FetchResponse, ClientError> {
        let timeout =
            Duration::from_millis(u64::from(request.wait_ms_max) + self.config.request_timeout_ms);
        match self
            .connection
            .call(Request::Fetch(request), timeout, "fetch")
            .await?
        {
            ResponseBody::Fetch(response) => Ok(response),
            other => Err(unexpected_body("fetch", &other)),
        }
    }

    /// Fetches one partition from `offset` and decodes its records (checking every
    /// batch's CRC32C). Records before `offset` in the first batch are dropped. At
    /// `offset == high_watermark` the broker waits up to `wait_ms_max` for new data.
    pub async fn fetch_records(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        wait_ms_max: u32,
        bytes_max: u32,
    ) -> Result<FetchedRecords, ClientError> {
        let request = FetchRequest {
            wait_ms_max,
            bytes_max,
            topics: vec![crate::protocol::FetchTopic {
                name: topic.to_owned(),
                partitions: vec![crate::protocol::FetchPartition {
                    partition,
                    offset,
                    bytes_max,
                }],
            }],
        };
        let response = self.fetch(request).await?;
        fetch_records_from_response(&response, topic, partition, offset)
    }
}

fn unexpected_body(operation: &'static str, body: &ResponseBody) -> ClientError {
    // Only reachable if the connection routed a response to the wrong caller, which the
    // opcode check in the reader rules out; still an error rather than a panic because
    // the bytes came from the network.
    ClientError::UnexpectedResponse {
        correlation_id: 0,
        reason: format!("{operation} got a response body of another kind: {body:?}"),
    }
}
