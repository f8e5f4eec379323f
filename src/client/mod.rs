//! The tokio client: one TCP connection to a broker, pipelined requests, a batching
//! [`Producer`], a [`Consumer`] that is a cancel-safe [`Stream`](futures_core::Stream)
//! of records (which may read for a stream group: resume at its committed offsets,
//! [`Consumer::commit`]), and a [`QueueConsumer`] for queue groups (receive, ack, nack,
//! extend, and the [`QueueConsumer::run`] worker loop).
//!
//! Where to start: [`Client::connect`], [`Producer`], [`Consumer`], [`QueueConsumer`],
//! and [`ClientError`] for what can fail. Settings are built with
//! [`ClientConfig::builder`], [`ProducerConfig::builder`], [`ConsumerConfig::builder`]
//! and [`QueueConsumer::builder`], which refuse a value that cannot work with
//! [`ClientError::InvalidConfig`]. Whole programs are in `examples/` (`producer.rs`,
//! `consumer.rs`, `queue_worker.rs`, `pipeline.rs`).
//!
//! ```no_run
//! # async fn example() -> Result<(), shardq::client::ClientError> {
//! use std::time::Duration;
//! use shardq::client::{Client, Consumer, ConsumerConfig, StartPosition};
//!
//! let client = Client::connect("127.0.0.1:9740").await?;
//! // A stream group: start where "reports" left off, commit every 5 s as polls go.
//! let config = ConsumerConfig::default().with_group("reports", Some(Duration::from_secs(5)));
//! let mut consumer = Consumer::new(client.clone(), config)?;
//! consumer.assign_topic("orders", StartPosition::Beginning).await?;
//! for record in consumer.poll().await? {
//!     println!("{} {}", record.partition(), record.offset());
//! }
//! consumer.commit().await?;
//! // A queue group: lease, then settle.
//! let queue = client.queue_consumer("orders", "billing");
//! let messages = queue.receive(10, None, Duration::from_secs(1)).await?;
//! let handles = shardq::client::handles_of(&messages);
//! queue.ack(&handles).await?.into_result("orders", "billing")?;
//! # Ok(())
//! # }
//! ```
//!
//! What it is: an async layer over the sans-IO [`crate::protocol`] codec that reconnects
//! when its connection breaks ([`Client`], `ClientConfig::reconnect`). What it is not:
//! shard-aware (every request goes to the shard this connection landed on, which forwards
//! to the owner). The [`Producer`] retries retriable produce errors, a broken connection
//! among them; as an idempotent producer (the default) it marks every batch with its
//! producer id and a per-partition sequence, so the broker stores a resent batch once.
//! It runs on whatever tokio runtime calls it; it never touches glommio or server code.
//!
//! Contract of [`Client`]:
//! - many requests may be in flight on the one connection; a background task reads
//!   response frames and hands each to the caller waiting on its correlation id, in
//!   whatever order the broker answers;
//! - at most `ClientConfig::requests_pending_max` requests are written and unanswered at
//!   once; a caller past the limit waits for a slot (backpressure, never a growing queue);
//! - when the connection breaks, every request pending on it fails with
//!   [`ClientError::Disconnected`], which names the first cause, except those safe to
//!   send twice, which go out again on a new connection; later requests reconnect first
//!   (with `reconnect` off they fail with the same `Disconnected`);
//! - a response whose top-level status is an error becomes [`ClientError::Broker`]; an
//!   error for one partition inside a good response becomes
//!   [`ClientError::PartitionRefused`] ([`ClientError::CommitRefused`] for a commit); a
//!   handle refused by an ack, nack or extend is not an error of the call but an entry of
//!   its [`SettleOutcome`].

/// Setters of a config builder, one per field, each named like its field and taking the
/// field's own type: `$builder.$field(value)` sets `self.config.$field`. Used by every
/// builder of this module so that they read alike.
macro_rules! config_setters {
    ($($(#[$doc:meta])* $field:ident: $type:ty;)*) => {
        $(
            $(#[$doc])*
            pub fn $field(mut self, $field: $type) -> Self {
                self.config.$field = $field;
                self
            }
        )*
    };
}

mod accumulator;
mod connection;
mod consumer;
mod groups;
mod producer;
mod queue;
#[cfg(test)]
mod queue_tests;
#[cfg(test)]
mod test_peer;
#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::protocol::batch::BatchError;
use crate::protocol::{
    AlterTopicRequest, CreateTopicRequest, DeleteTopicRequest, FetchRequest, FetchResponse,
    HandshakeRequest, HandshakeResponse, ListOffsetsPartition, ListOffsetsRequest,
    ListOffsetsTopic, MetadataRequest, MetadataResponse, Opcode, ProduceRequest, ProduceResponse,
    ProtocolError, Request, ResponseBody, PROTOCOL_VERSION,
};

use connection::Connection;

pub use crate::protocol::batch::Record;
pub use crate::protocol::queue::{
    ExpiryPolicy, GroupDescription, GroupKind, GroupPartition, Handle, NackDelay, QueueOrdering,
    QueueSettings, ReceiveRequest, ReceivedMessage, SettleAction,
};
pub use crate::protocol::{Acks, ErrorCode, PartitionOffsets, Retention, WireError};
pub use consumer::{
    fetch_records_from_response, is_offset_out_of_range, Assignment, Batches, ConsumedRecord,
    Consumer, ConsumerConfig, ConsumerConfigBuilder, FetchedRecords, OffsetQuery, StartPosition,
};
pub use groups::CommittedPosition;
pub use producer::{
    Producer, ProducerConfig, ProducerConfigBuilder, ProducerRecord, RecordMetadata, SendHandle,
    Sent, SentHandle, BATCHES_IN_FLIGHT_PER_PARTITION_DEFAULT, PRODUCER_BATCHES_KEPT,
};
pub use queue::{
    handles_of, QueueConsumer, QueueConsumerBuilder, QueueConsumerConfig,
    QueueConsumerConfigBuilder, QueueMessage, Refusal, RunSummary, SettleError, SettleKind,
    SettleOutcome, HANDLER_PANICKED_REASON, NACK_REASON_BYTES_MAX,
};

/// Everything that can go wrong talking to a broker. `Clone`, because one broken
/// connection must fail every request that was waiting on it with the same cause.
///
/// One condition, one variant, from every call: a topic the broker does not know is
/// [`ClientError::UnknownTopic`] and a partition past its topic's count is
/// [`ClientError::UnknownPartition`], whichever request found out. `Display` says what
/// failed; the underlying cause is [`std::error::Error::source`], and
/// [`ClientError::report`] prints the whole chain on one line.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ClientError {
    /// Resolving or connecting to the broker failed.
    Connect {
        /// The address as given to [`Client::connect`].
        address: String,
        /// Why: the resolver's or the socket's error, or that a reconnect ran out of time.
        source: Arc<io::Error>,
    },
    /// The socket failed while doing `context`.
    Io {
        /// What the client was doing ("reading responses", say).
        context: &'static str,
        /// The broker's address.
        peer: SocketAddr,
        /// The socket's error.
        source: Arc<io::Error>,
    },
    /// The broker sent bytes that do not parse.
    Protocol(ProtocolError),
    /// The broker refused the whole request.
    Broker(WireError),
    /// The broker refused one partition of a produce or fetch; the rest may have succeeded.
    PartitionRefused {
        /// The topic of the refused partition.
        topic: String,
        /// The refused partition.
        partition: u32,
        /// The broker's error code and message.
        error: WireError,
    },
    /// A fetch asked for an offset outside what the partition stores.
    OffsetOutOfRange {
        /// The topic read.
        topic: String,
        /// The partition read.
        partition: u32,
        /// The offset asked for.
        requested: u64,
        /// The first offset still stored.
        log_start_offset: u64,
        /// One past the last offset readable.
        high_watermark: u64,
    },
    /// A fetched record batch failed its CRC or framing check.
    Batch {
        /// The topic read.
        topic: String,
        /// The partition read.
        partition: u32,
        /// What was wrong with the batch.
        source: BatchError,
    },
    /// The broker answered something we did not ask for.
    UnexpectedResponse {
        /// The request's correlation id (0 where the mix-up was found later).
        correlation_id: u64,
        /// What was unexpected.
        reason: String,
    },
    /// The connection broke; `cause` is the first failure, shared by every request that
    /// was pending on it (and, with `ClientConfig::reconnect` off, every later one).
    Disconnected {
        /// The broker's address.
        peer: SocketAddr,
        /// The first failure of the connection.
        cause: Arc<ClientError>,
    },
    /// The client or producer was closed by its owner.
    Closed,
    /// No answer within the limit.
    Timeout {
        /// The request that got no answer ("fetch", say).
        operation: &'static str,
        /// How long it waited, in ms.
        timeout_ms: u64,
    },
    /// A topic named in a request does not exist (or was deleted while the request was
    /// in flight).
    UnknownTopic {
        /// The topic asked for.
        topic: String,
    },
    /// A partition outside the topic's partition count; the count where the client knew
    /// it from metadata.
    UnknownPartition {
        /// The topic.
        topic: String,
        /// The partition asked for.
        partition: u32,
        /// The topic's partition count, where the client knew it.
        partition_count: Option<u32>,
    },
    /// A configuration value that cannot work.
    InvalidConfig {
        /// The setting or argument, named as in the code.
        field: &'static str,
        /// Its value (a time in ms, a length for a string).
        value: u64,
    },
    /// A produced batch bigger than the broker takes (`batch_bytes_max` from the
    /// handshake of the connection it was about to go out on), so it was not sent: it was
    /// built for a broker with a larger limit before a reconnect to one with a smaller
    /// limit (a restart with other settings), or it is one record bigger than the limit
    /// on its own. It is failed, not split: a batch sent before must go out again byte
    /// for byte (its producer id and sequence are in it), and the producer does not yet
    /// split one never sent either (its records' handles belong to the batch). Records
    /// sent after the reconnect are batched to the new limit.
    BatchTooLarge {
        /// The batch's topic.
        topic: String,
        /// The batch's partition.
        partition: u32,
        /// The batch's size.
        size_bytes: u64,
        /// The broker's limit.
        limit_bytes: u64,
    },
    /// A produced batch failed for good after `attempts` sends; `cause` is the last
    /// failure. `maybe_written` says whether the broker may have stored it anyway (an
    /// attempt timed out, the connection broke after it was sent, or the broker said the
    /// batch was appended but not durable): false only when every attempt was refused
    /// before anything was appended.
    ProduceFailed {
        /// The last attempt's failure.
        cause: Arc<ClientError>,
        /// Whether the broker may have stored the batch anyway.
        maybe_written: bool,
        /// How many times the batch was sent.
        attempts: u32,
    },
    /// An ack, nack or extend that the broker refused for some handles (each with why);
    /// made by [`SettleOutcome::into_result`] for callers that want all-or-error.
    HandlesRefused {
        /// "ack", "nack" or "extend".
        operation: &'static str,
        /// The topic of the handles.
        topic: String,
        /// The queue group.
        group: String,
        /// Each refused handle, with why.
        refused: Vec<Refusal>,
    },
    /// The broker refused a stream group's commit for one partition (the other
    /// partitions of the request may have been committed).
    CommitRefused {
        /// The stream group.
        group: String,
        /// The topic committed.
        topic: String,
        /// The refused partition.
        partition: u32,
        /// The broker's error code and message.
        error: WireError,
    },
    /// `commit` on a consumer that has no stream group (`ConsumerConfig::group`).
    NotInGroup,
}

impl ClientError {
    /// The broker's error code, where the broker said no (top-level or per partition).
    pub fn wire_code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Broker(error) | ClientError::PartitionRefused { error, .. } => {
                Some(error.code)
            }
            ClientError::OffsetOutOfRange { .. } => Some(ErrorCode::OffsetOutOfRange),
            ClientError::UnknownTopic { .. } => Some(ErrorCode::UnknownTopic),
            ClientError::UnknownPartition { .. } => Some(ErrorCode::UnknownPartition),
            ClientError::ProduceFailed { cause, .. } => cause.wire_code(),
            ClientError::CommitRefused { error, .. } => Some(error.code),
            _ => None,
        }
    }

    /// Whether the same call, made again, may succeed without anything else changing:
    /// the broker was unreachable, stopping, out of disk or slow to answer. A
    /// [`ClientError::ProduceFailed`] is retriable when its last cause was (the producer
    /// has already retried it until `delivery_timeout_ms`; see `maybe_written` before
    /// sending the record again).
    ///
    /// ```no_run
    /// # async fn example(client: shardq::client::Client) {
    /// use std::time::Duration;
    ///
    /// let metadata = loop {
    ///     match client.metadata(&["orders"]).await {
    ///         Ok(metadata) => break metadata,
    ///         Err(error) if error.is_retriable() => {
    ///             eprintln!("retrying: {}", error.report());
    ///             tokio::time::sleep(Duration::from_secs(1)).await;
    ///         }
    ///         Err(error) => panic!("{}", error.report()), // a bug or a bad name: give up
    ///     }
    /// };
    /// # let _ = metadata;
    /// # }
    /// ```
    pub fn is_retriable(&self) -> bool {
        match self {
            ClientError::Connect { .. } | ClientError::Io { .. } | ClientError::Timeout { .. } => {
                true
            }
            ClientError::Disconnected { .. } => self.is_connection_lost(),
            ClientError::Broker(error)
            | ClientError::PartitionRefused { error, .. }
            | ClientError::CommitRefused { error, .. } => matches!(
                error.code,
                ErrorCode::ShuttingDown | ErrorCode::Timeout | ErrorCode::StorageFull
            ),
            ClientError::ProduceFailed { cause, .. } => cause.is_retriable(),
            _ => false,
        }
    }

    /// A connection that broke under the request (the socket failed, or the broker
    /// stopped answering): with reconnecting on, the same request can go out on a new
    /// one. Not a connection the client gave up because the broker's bytes made no sense
    /// (that would break the next one the same way), nor a closed client.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            ClientError::Disconnected { cause, .. } => {
                matches!(
                    **cause,
                    ClientError::Io { .. } | ClientError::Timeout { .. }
                )
            }
            _ => false,
        }
    }

    /// The one variant for a broker's refusal about `topic` (`partition`, where the
    /// refusal was for one partition): UnknownTopic and UnknownPartition become their
    /// own variants whichever request found them.
    pub(crate) fn refusal(topic: &str, partition: Option<u32>, error: WireError) -> ClientError {
        match (error.code, partition) {
            (ErrorCode::UnknownTopic, _) => ClientError::UnknownTopic {
                topic: topic.to_owned(),
            },
            (ErrorCode::UnknownPartition, Some(partition)) => ClientError::UnknownPartition {
                topic: topic.to_owned(),
                partition,
                partition_count: None,
            },
            (_, Some(partition)) => ClientError::PartitionRefused {
                topic: topic.to_owned(),
                partition,
                error,
            },
            (_, None) => ClientError::Broker(error),
        }
    }

    /// The error and every cause under it, on one line, separated by `: `: what to
    /// print or log (`Display` alone says only what failed, not why).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use shardq::client::ClientError;
    ///
    /// let error = ClientError::Disconnected {
    ///     peer: "127.0.0.1:9740".parse().unwrap(),
    ///     cause: Arc::new(ClientError::Timeout { operation: "fetch", timeout_ms: 30_000 }),
    /// };
    /// assert_eq!(
    ///     error.report().to_string(),
    ///     "connection to broker 127.0.0.1:9740 is broken: fetch got no answer within 30000 ms"
    /// );
    /// assert!(error.is_retriable()); // a lost connection: the next call reconnects
    /// assert!(!ClientError::Closed.is_retriable());
    /// ```
    pub fn report(&self) -> ErrorReport<'_> {
        ErrorReport(self)
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
            ClientError::Connect { address, .. } => write!(f, "cannot connect to {address}"),
            ClientError::Io { context, peer, .. } => write!(f, "{context} (broker {peer})"),
            ClientError::Protocol(_) => write!(f, "malformed response from broker"),
            ClientError::Broker(_) => write!(f, "broker refused the request"),
            ClientError::PartitionRefused {
                topic, partition, ..
            } => write!(f, "broker refused topic {topic:?} partition {partition}"),
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
                topic, partition, ..
            } => write!(f, "bad record batch from topic {topic:?} partition {partition}"),
            ClientError::UnexpectedResponse {
                correlation_id,
                reason,
            } => write!(f, "unexpected response (correlation id {correlation_id}): {reason}"),
            ClientError::Disconnected { peer, .. } => {
                write!(f, "connection to broker {peer} is broken")
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
                partition_count: Some(count),
            } => write!(
                f,
                "topic {topic:?} has {count} partitions, there is no partition {partition}"
            ),
            ClientError::UnknownPartition {
                topic,
                partition,
                partition_count: None,
            } => write!(f, "topic {topic:?} has no partition {partition}"),
            ClientError::InvalidConfig { field, value } => {
                write!(f, "invalid client configuration: {field} = {value}")
            }
            ClientError::BatchTooLarge {
                topic,
                partition,
                size_bytes,
                limit_bytes,
            } => write!(
                f,
                "batch of {size_bytes} bytes for topic {topic:?} partition {partition} is over the broker's limit of {limit_bytes} bytes"
            ),
            ClientError::ProduceFailed {
                maybe_written,
                attempts,
                ..
            } => write!(
                f,
                "produce failed after {attempts} attempt(s), {}",
                if *maybe_written {
                    "the batch may have been written"
                } else {
                    "the batch was not written"
                }
            ),
            ClientError::HandlesRefused {
                operation,
                topic,
                group,
                refused,
            } => {
                // A few are enough to act on; the caller has the whole list.
                const LISTED_MAX: usize = 3;
                write!(
                    f,
                    "{operation} of {} handle(s) of topic {topic:?} group {group:?} refused:",
                    refused.len()
                )?;
                for refusal in refused.iter().take(LISTED_MAX) {
                    write!(f, " [{refusal}]")?;
                }
                if refused.len() > LISTED_MAX {
                    write!(f, " and {} more", refused.len() - LISTED_MAX)?;
                }
                Ok(())
            }
            ClientError::CommitRefused {
                group,
                topic,
                partition,
                ..
            } => write!(
                f,
                "broker refused group {group:?}'s commit of topic {topic:?} partition {partition}"
            ),
            ClientError::NotInGroup => write!(
                f,
                "the consumer is in no stream group, so it has nothing to commit to (set ConsumerConfig::group)"
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
            ClientError::Broker(error)
            | ClientError::PartitionRefused { error, .. }
            | ClientError::CommitRefused { error, .. } => Some(error),
            ClientError::Batch { source, .. } => Some(source),
            ClientError::Disconnected { cause, .. } | ClientError::ProduceFailed { cause, .. } => {
                Some(cause.as_ref())
            }
            _ => None,
        }
    }
}

/// [`ClientError::report`]: the error, then each `source()` under it, joined by `: `.
pub struct ErrorReport<'a>(&'a ClientError);

impl fmt::Display for ErrorReport<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = std::error::Error::source(self.0);
        while let Some(error) = cause {
            write!(f, ": {error}")?;
            cause = error.source();
        }
        Ok(())
    }
}

impl fmt::Debug for ErrorReport<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Connection settings. Every queue has a limit.
///
/// Made with [`ClientConfig::builder`] (which checks the values) or
/// [`ClientConfig::default`]; [`Client::connect_with`] checks them again. Fields are public
/// to read; the struct is `#[non_exhaustive]`, so settings added later are not a breaking
/// change, and code outside this crate sets fields through the builder.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Sent in the handshake; the broker may log it. Default `shardq-client/<version>`.
    pub client_name: String,
    /// Most requests written and not yet answered; callers past it wait. Default 256;
    /// must be at least 1.
    pub requests_pending_max: usize,
    /// Largest response body accepted; a bigger frame breaks the connection rather than
    /// making us buffer it. Matches the broker's default `fetch_bytes_max` plus headroom.
    /// Default 17 MiB.
    pub response_body_bytes_max: u32,
    /// How long a request (other than a fetch's own long-poll) may wait for its answer.
    /// Default 30 000 ms; must be at least 1.
    pub request_timeout_ms: u64,
    /// Reconnect when the connection breaks (on by default): the next request opens a
    /// new connection to the same address, resolved again, retrying with exponential
    /// backoff. Off: a broken connection fails every request for good.
    pub reconnect: bool,
    /// The first wait between two connection attempts; each failure doubles it, up to
    /// `reconnect_backoff_ms_max`, with full jitter. Default 20 ms; with `reconnect` on,
    /// must be at least 1.
    pub reconnect_backoff_ms_min: u64,
    /// The longest wait between two connection attempts. Default 2 000 ms; with
    /// `reconnect` on, must be at least `reconnect_backoff_ms_min`.
    pub reconnect_backoff_ms_max: u64,
    /// How long one reconnect keeps trying before the requests waiting on it fail with
    /// [`ClientError::Connect`] (a request that joins a reconnect already under way waits
    /// only for what is left of it). The next request starts a new one. Default 30 000 ms;
    /// with `reconnect` on, must be at least 1.
    pub reconnect_timeout_ms: u64,
    /// TCP keepalive on every connection: after this long with nothing received the
    /// kernel sends a probe, then another every this long, and gives the connection up
    /// after [`TCP_KEEPALIVE_PROBES`] unanswered ones (about four times this in all). A
    /// broker gone silent (a host powered off, a dropped NAT entry) then breaks the
    /// connection, and with it a consumer's long-poll, even when nothing is being sent;
    /// without it only a request's own timeout notices. Default 15 s. `None` turns
    /// keepalive off. The kernel counts whole seconds, up to 32,767: a value under 1 s
    /// or over that is refused with [`ClientError::InvalidConfig`] (`value` in
    /// milliseconds).
    pub tcp_keepalive: Option<Duration>,
}

/// Unanswered keepalive probes after which the kernel gives a connection up
/// (`ClientConfig::tcp_keepalive`).
pub const TCP_KEEPALIVE_PROBES: u32 = 3;

/// The largest `ClientConfig::tcp_keepalive`: Linux's limit for TCP_KEEPIDLE and
/// TCP_KEEPINTVL.
const TCP_KEEPALIVE_MAX: Duration = Duration::from_secs(32_767);

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            client_name: format!("shardq-client/{}", env!("CARGO_PKG_VERSION")),
            requests_pending_max: 256,
            response_body_bytes_max: (16 << 20) + (1 << 20),
            request_timeout_ms: 30_000,
            reconnect: true,
            reconnect_backoff_ms_min: 20,
            reconnect_backoff_ms_max: 2_000,
            reconnect_timeout_ms: 30_000,
            tcp_keepalive: Some(Duration::from_secs(15)),
        }
    }
}

impl ClientConfig {
    /// A builder starting from [`ClientConfig::default`].
    ///
    /// ```
    /// use shardq::client::ClientConfig;
    ///
    /// let config = ClientConfig::builder()
    ///     .request_timeout_ms(5_000)
    ///     .reconnect(false)
    ///     .build()?;
    /// assert_eq!(config.request_timeout_ms, 5_000);
    /// # Ok::<(), shardq::client::ClientError>(())
    /// ```
    pub fn builder() -> ClientConfigBuilder {
        ClientConfigBuilder {
            config: ClientConfig::default(),
        }
    }

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
        if self.reconnect {
            for (field, value) in [
                ("reconnect_backoff_ms_min", self.reconnect_backoff_ms_min),
                ("reconnect_timeout_ms", self.reconnect_timeout_ms),
            ] {
                if value == 0 {
                    return Err(ClientError::InvalidConfig { field, value });
                }
            }
            if self.reconnect_backoff_ms_max < self.reconnect_backoff_ms_min {
                return Err(ClientError::InvalidConfig {
                    field: "reconnect_backoff_ms_max",
                    value: self.reconnect_backoff_ms_max,
                });
            }
        }
        if let Some(keepalive) = self.tcp_keepalive {
            if keepalive < Duration::from_secs(1) || keepalive > TCP_KEEPALIVE_MAX {
                return Err(ClientError::InvalidConfig {
                    field: "tcp_keepalive",
                    value: u64::try_from(keepalive.as_millis()).unwrap_or(u64::MAX),
                });
            }
        }
        Ok(())
    }
}

/// Builds a [`ClientConfig`]: [`ClientConfig::builder`], one setter per field (named like
/// the field, taking its type: times in milliseconds as `u64`, like the fields), then
/// [`ClientConfigBuilder::build`]. A setter not called leaves the field at its default.
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until build() is called"]
pub struct ClientConfigBuilder {
    config: ClientConfig,
}

impl ClientConfigBuilder {
    /// Sent in the handshake (default `shardq-client/<version>`).
    pub fn client_name(mut self, client_name: impl Into<String>) -> Self {
        self.config.client_name = client_name.into();
        self
    }

    config_setters! {
        /// Most requests written and not yet answered (default 256; at least 1).
        requests_pending_max: usize;
        /// Largest response body accepted (default 17 MiB).
        response_body_bytes_max: u32;
        /// How long a request may wait for its answer, in ms (default 30 000; at least 1).
        request_timeout_ms: u64;
        /// Reconnect when the connection breaks (default true).
        reconnect: bool;
        /// First wait between connection attempts, in ms (default 20; at least 1 with
        /// `reconnect`).
        reconnect_backoff_ms_min: u64;
        /// Longest wait between connection attempts, in ms (default 2 000; at least
        /// `reconnect_backoff_ms_min` with `reconnect`).
        reconnect_backoff_ms_max: u64;
        /// How long one reconnect keeps trying, in ms (default 30 000; at least 1 with
        /// `reconnect`).
        reconnect_timeout_ms: u64;
        /// TCP keepalive idle time and probe interval (default 15 s; `None` turns it off;
        /// from 1 s to 32,767 s).
        tcp_keepalive: Option<Duration>;
    }

    /// Checks the settings and returns them.
    ///
    /// # Errors
    /// [`ClientError::InvalidConfig`] naming the first field that cannot work (a zero
    /// limit or timeout, a backoff maximum below its minimum), with its value.
    pub fn build(self) -> Result<ClientConfig, ClientError> {
        self.config.validate()?;
        Ok(self.config)
    }
}

/// A connection to a broker, reopened when it breaks (`ClientConfig::reconnect`). Cheap
/// to clone: clones share the connection. When the last clone is dropped the connection is
/// shut down.
///
/// Reconnecting: a request that finds the connection broken starts a reconnect, a task
/// the client owns, which opens a new connection to the same address (resolved again),
/// retrying with exponential backoff for up to `reconnect_timeout_ms`; that request and
/// every other that finds the connection broken meanwhile wait for it (so one that comes
/// late waits less). If it gives up, every request waiting fails with
/// [`ClientError::Connect`], and the next request starts another. A request
/// cancelled while it waits (a `timeout` or `select!` around it) leaves the reconnect
/// running, its attempts and backoff where they are, and the next request uses the
/// connection it makes. [`Client::close`] ends it at once, and so does dropping the last
/// clone. A request that
/// was on the wire when the connection broke fails with [`ClientError::Disconnected`],
/// except reads and other requests that are safe to send twice (metadata, fetch, list
/// offsets, committed offsets, commits, describe groups, stats), which are sent once more
/// on the new connection. A [`Producer`] retries its batches itself (idempotently, so a
/// batch is stored once); a [`Consumer`] keeps its positions and reads on from them.
///
/// # Cancel safety
/// Dropping the future of any call leaves the connection whole: a separate task writes
/// each request, whole or not at all. A request already written still reaches the
/// broker and takes effect (a dropped `create_topic` may have created the topic), and
/// keeps its place under `requests_pending_max` until the broker answers; the answer is
/// then discarded. A reconnect that the call started goes on in its own task.
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    /// The address as the caller gave it, resolved again on every reconnect.
    address: String,
    config: ClientConfig,
    session: std::sync::Mutex<Arc<Session>>,
    /// The reconnect running, or the last one; `Client::join_reconnect`.
    reconnect: std::sync::Mutex<Option<Reconnect>>,
    closed: AtomicBool,
    /// Woken by `close`, for requests waiting on a reconnect.
    closing: tokio::sync::Notify,
    /// Bumped as each new connection is installed, under the session lock (so whoever
    /// takes the new connection also sees the new count).
    reconnects: AtomicU64,
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        // The task holds the client weakly, so this runs once the last clone is gone:
        // nobody is left to use what the reconnect would make.
        let reconnect = self
            .reconnect
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(reconnect) = reconnect.take() {
            reconnect.task.abort();
        }
    }
}

/// How a reconnect ended: `Ok` once its connection is installed.
type ReconnectOutcome = Option<Result<(), ClientError>>;

/// One reconnect: the task ([`reconnect_task`]) and the channel on which it says how it
/// ended (`None` while it runs).
struct Reconnect {
    task: JoinHandle<()>,
    outcome: watch::Receiver<ReconnectOutcome>,
}

/// One connection and what the broker said on it.
struct Session {
    connection: Connection,
    handshake: HandshakeResponse,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let session = self.session_now();
        f.debug_struct("Client")
            .field("address", &self.inner.address)
            .field("peer", &session.connection.peer())
            .field("broken", &session.connection.is_broken())
            .field("reconnects", &self.reconnects())
            .field("handshake", &session.handshake)
            .finish()
    }
}

impl Client {
    /// Connects with the default [`ClientConfig`] and does the handshake. `address` is
    /// `host:port` (a name is resolved again on every reconnect), or a `SocketAddr`.
    ///
    /// ```no_run
    /// # async fn example() -> Result<(), shardq::client::ClientError> {
    /// use shardq::client::Client;
    ///
    /// let client = Client::connect("127.0.0.1:9740").await?;
    /// println!("{} shards", client.shard_count());
    /// client.create_topic("orders", 4).await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`ClientError::Connect`] when the address does not resolve or the connection is
    /// refused (the first connection is tried once: reconnecting is for connections
    /// that were made); the handshake's errors, such as [`ClientError::Timeout`] or a
    /// [`ClientError::Protocol`] for a broker of another protocol version.
    ///
    /// # Cancel safety
    /// Dropping it closes the connection it was opening; nothing else is left behind.
    pub async fn connect(address: impl fmt::Display) -> Result<Client, ClientError> {
        Client::connect_with(address, ClientConfig::default()).await
    }

    /// Connects with `config` and does the handshake.
    ///
    /// ```no_run
    /// # async fn example() -> Result<(), shardq::client::ClientError> {
    /// use shardq::client::{Client, ClientConfig};
    ///
    /// let config = ClientConfig::builder()
    ///     .client_name("billing")
    ///     .reconnect_timeout_ms(60_000) // ride out a minute of broker restart
    ///     .build()?;
    /// let client = Client::connect_with("broker.internal:9740", config).await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`ClientError::InvalidConfig`] for a setting that cannot work (the checks of
    /// [`ClientConfigBuilder::build`]); otherwise as [`Client::connect`].
    ///
    /// # Cancel safety
    /// As [`Client::connect`].
    pub async fn connect_with(
        address: impl fmt::Display,
        config: ClientConfig,
    ) -> Result<Client, ClientError> {
        config.validate()?;
        let address = address.to_string();
        let session = open_session(&address, &config).await?;
        Ok(Client {
            inner: Arc::new(ClientInner {
                address,
                config,
                session: std::sync::Mutex::new(Arc::new(session)),
                reconnect: std::sync::Mutex::new(None),
                closed: AtomicBool::new(false),
                closing: tokio::sync::Notify::new(),
                reconnects: AtomicU64::new(0),
            }),
        })
    }

    /// What the broker said in the handshake of the current connection.
    pub fn handshake(&self) -> HandshakeResponse {
        self.session_now().handshake.clone()
    }

    /// Shards the broker runs.
    pub fn shard_count(&self) -> u16 {
        self.session_now().handshake.shard_count
    }

    /// The shard that accepted the current connection.
    pub fn shard_id(&self) -> u16 {
        self.session_now().handshake.shard_id
    }

    /// The address the client connects to, as given.
    pub fn address(&self) -> &str {
        &self.inner.address
    }

    /// The broker address of the current connection.
    pub fn peer_address(&self) -> SocketAddr {
        self.session_now().connection.peer()
    }

    /// Whether the current connection is known to be broken or closed. With reconnect
    /// on, the next request opens a new one (unless the client was closed).
    pub fn is_broken(&self) -> bool {
        self.session_now().connection.is_broken()
    }

    /// Whether [`Client::close`] was called (on any clone).
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// How many times the client has reconnected.
    pub fn reconnects(&self) -> u64 {
        self.inner.reconnects.load(Ordering::Acquire)
    }

    /// The settings the client was made with.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// Fails every pending request and every later one with [`ClientError::Closed`], on
    /// every clone, stops reading, ends a reconnect in progress and never reconnects
    /// again. The socket itself closes when the last clone is dropped (the writer task
    /// then shuts it down).
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.closing.notify_waiters();
        let reconnect = self
            .inner
            .reconnect
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(reconnect) = reconnect {
            reconnect.task.abort();
        }
        self.session_now().connection.close();
    }

    fn session_now(&self) -> Arc<Session> {
        self.inner
            .session
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The connection to send on: the current one, or a new one if it is broken and
    /// reconnecting is on (module docs of [`Client`]). Cancel safe: the reconnect runs in
    /// its own task, which a caller giving up does not stop.
    async fn session(&self) -> Result<Arc<Session>, ClientError> {
        if self.is_closed() {
            return Err(ClientError::Closed);
        }
        let current = self.session_now();
        if !current.connection.is_broken() || !self.inner.config.reconnect {
            return Ok(current);
        }
        // A close ends the wait, whatever the reconnect is doing.
        let closed = self.inner.closing.notified();
        tokio::pin!(closed);
        closed.as_mut().enable();
        if self.is_closed() {
            return Err(ClientError::Closed);
        }
        let Some(mut outcome) = self.join_reconnect() else {
            if self.is_closed() {
                return Err(ClientError::Closed);
            }
            return Ok(self.session_now());
        };
        let outcome = tokio::select! {
            biased;
            () = &mut closed => return Err(ClientError::Closed),
            outcome = outcome.wait_for(Option::is_some) => outcome.map(|outcome| outcome.clone()),
        };
        match outcome {
            Ok(Some(Ok(()))) => Ok(self.session_now()),
            Ok(Some(Err(error))) => Err(error),
            Ok(None) => unreachable!("waited for an outcome"),
            // The task ended without saying how: aborted by a close (or a panic in it).
            Err(_ended) if self.is_closed() => Err(ClientError::Closed),
            Err(_ended) => Err(ClientError::Connect {
                address: self.inner.address.clone(),
                source: Arc::new(io::Error::other(
                    "the reconnect task ended without an outcome",
                )),
            }),
        }
    }

    /// The outcome channel of the reconnect running, starting one if none runs; `None`
    /// when the connection is whole again (a reconnect finished since the caller looked)
    /// or the client is closed.
    fn join_reconnect(&self) -> Option<watch::Receiver<ReconnectOutcome>> {
        let mut reconnect = self
            .inner
            .reconnect
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(running) = reconnect
            .as_ref()
            .filter(|running| running.outcome.borrow().is_none() && !running.task.is_finished())
        {
            return Some(running.outcome.clone());
        }
        // Checked under the lock, so two callers never start two reconnects, one that
        // just succeeded is not redone, and none starts after `close` (which sets
        // `closed` before it takes the lock to abort the one running).
        if self.is_closed() || !self.session_now().connection.is_broken() {
            return None;
        }
        let (sender, outcome) = watch::channel(None);
        let task = tokio::spawn(reconnect_task(
            Arc::downgrade(&self.inner),
            self.inner.address.clone(),
            self.inner.config.clone(),
            sender,
        ));
        *reconnect = Some(Reconnect {
            task,
            outcome: outcome.clone(),
        });
        Some(outcome)
    }

    /// Waits until the client has a connection to send on, reconnecting first if the
    /// current one is broken, as a request would. The producer calls it before each
    /// attempt to check its batches against the handshake of the connection they will
    /// go out on.
    pub(super) async fn connected(&self) -> Result<(), ClientError> {
        self.session().await.map(drop)
    }

    /// Sends `request` on the current connection (reconnecting first if needed) and
    /// waits for its answer; a request that is safe to send twice is sent once more on a
    /// new connection when the one it was on broke.
    pub(super) async fn call(
        &self,
        request: Request,
        timeout: Duration,
        operation: &'static str,
    ) -> Result<ResponseBody, ClientError> {
        // Shared with the writer rather than cloned: a request is kept for a second send
        // only in case its connection breaks, which is rare, so the common path pays one
        // small allocation instead of a deep copy (a fetch's topic names and partitions).
        let request = Arc::new(request);
        let session = self.session().await?;
        let result = match self
            .exchange(&session, request.clone(), timeout, operation)
            .await
        {
            Err(error)
                if self.inner.config.reconnect
                    && safe_to_resend(&request)
                    && error.is_connection_lost() =>
            {
                let session = self.session().await?;
                self.exchange(&session, request.clone(), timeout, operation)
                    .await
            }
            result => result,
        };
        // A refusal of the whole request about its one topic: the same variant as a
        // refusal of one partition of it.
        match (result, whole_request_topic(&request)) {
            (Err(ClientError::Broker(error)), Some(topic)) => {
                Err(ClientError::refusal(topic, None, error))
            }
            (result, _) => result,
        }
    }

    /// One request on `session`. No answer within `timeout` also gives up the
    /// connection: a broker that stopped answering (a host gone without a reset, a
    /// dropped NAT entry) would otherwise hold every later request until its own timeout.
    async fn exchange(
        &self,
        session: &Session,
        request: Arc<Request>,
        timeout: Duration,
        operation: &'static str,
    ) -> Result<ResponseBody, ClientError> {
        let result = session.connection.call(request, timeout, operation).await;
        if let Err(timed_out @ ClientError::Timeout { .. }) = &result {
            session.connection.abandon(timed_out.clone());
        }
        result
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.inner.config.request_timeout_ms)
    }

    /// Topic metadata; an empty list asks for every topic. A topic the broker does not
    /// know comes back with its `error` set, not as an error of the whole call.
    ///
    /// # Errors
    /// The transport's errors ([`ClientError::Timeout`], [`ClientError::Disconnected`]
    /// after reconnecting failed, [`ClientError::Closed`], ...) and
    /// [`ClientError::Broker`] for a refusal of the whole request.
    ///
    /// # Cancel safety
    /// Cancel safe, like every call of [`Client`] that only reads: a dropped call leaves
    /// its answer to be discarded when it arrives, and a reconnect it started running.
    pub async fn metadata(&self, topics: &[&str]) -> Result<MetadataResponse, ClientError> {
        let request = Request::Metadata(MetadataRequest {
            topics: topics.iter().map(|topic| (*topic).to_owned()).collect(),
        });
        match self.call(request, self.timeout(), "metadata").await? {
            ResponseBody::Metadata(metadata) => Ok(metadata),
            other => Err(unexpected_body("metadata", &other)),
        }
    }

    /// Creates a topic that keeps everything (no retention limit), with the broker's
    /// default queue settings.
    ///
    /// # Errors
    /// [`ClientError::Broker`] with [`ErrorCode::TopicAlreadyExists`] (see
    /// [`ClientError::wire_code`]) when the name is taken, or another code for a name
    /// or partition count the broker refuses; the transport's errors.
    ///
    /// # Cancel safety
    /// Not cancel safe: a dropped call may or may not have created the topic, and it is
    /// not sent again after a broken connection.
    pub async fn create_topic(&self, name: &str, partitions: u32) -> Result<(), ClientError> {
        self.create_topic_with(name, partitions, Retention::default())
            .await
    }

    /// Creates a topic with this retention (and the broker's default queue settings).
    ///
    /// # Errors
    /// As [`Client::create_topic`].
    pub async fn create_topic_with(
        &self,
        name: &str,
        partitions: u32,
        retention: Retention,
    ) -> Result<(), ClientError> {
        self.create_topic_with_queue(name, partitions, retention, QueueSettings::default())
            .await
    }

    /// Creates a topic with its retention and queue settings (`None` fields take the
    /// broker's `queue_*` defaults).
    ///
    /// # Errors
    /// As [`Client::create_topic`].
    pub async fn create_topic_with_queue(
        &self,
        name: &str,
        partitions: u32,
        retention: Retention,
        queue: QueueSettings,
    ) -> Result<(), ClientError> {
        let request = Request::CreateTopic(CreateTopicRequest {
            name: name.to_owned(),
            partitions,
            retention,
            queue,
        });
        match self.call(request, self.timeout(), "create topic").await? {
            ResponseBody::CreateTopic => Ok(()),
            other => Err(unexpected_body("create topic", &other)),
        }
    }

    /// Changes a topic's retention; its queue settings stay as they are.
    ///
    /// # Errors
    /// [`ClientError::UnknownTopic`] for a topic the broker does not have,
    /// [`ClientError::Broker`] for a value it refuses; the transport's errors.
    pub async fn alter_topic(&self, name: &str, retention: Retention) -> Result<(), ClientError> {
        self.alter_topic_with(name, Some(retention), QueueSettings::default())
            .await
    }

    /// Changes a topic's retention (`None`: unchanged) and the queue settings given
    /// (`None` fields stay as they are).
    ///
    /// # Errors
    /// As [`Client::alter_topic`].
    pub async fn alter_topic_with(
        &self,
        name: &str,
        retention: Option<Retention>,
        queue: QueueSettings,
    ) -> Result<(), ClientError> {
        let request = Request::AlterTopic(AlterTopicRequest {
            name: name.to_owned(),
            retention,
            queue,
        });
        match self.call(request, self.timeout(), "alter topic").await? {
            ResponseBody::AlterTopic => Ok(()),
            other => Err(unexpected_body("alter topic", &other)),
        }
    }

    /// For each `(partition, query)`: the offset the [`OffsetQuery`] asks for, with the
    /// partition's range (`log_start_offset`, `high_watermark`), in one request. The
    /// answers come in the order the broker gives them, each naming its partition.
    ///
    /// # Errors
    /// [`ClientError::UnknownTopic`] / [`ClientError::UnknownPartition`] for a topic or
    /// partition the broker does not have, [`ClientError::PartitionRefused`] for another
    /// refusal of one partition, and the transport's errors.
    pub async fn list_offsets(
        &self,
        topic: &str,
        partitions: &[(u32, OffsetQuery)],
    ) -> Result<Vec<(u32, PartitionOffsets)>, ClientError> {
        let request = Request::ListOffsets(ListOffsetsRequest {
            topics: vec![ListOffsetsTopic {
                name: topic.to_owned(),
                partitions: partitions
                    .iter()
                    .map(|(partition, query)| ListOffsetsPartition {
                        partition: *partition,
                        timestamp_ms: query.wire_timestamp_ms(),
                    })
                    .collect(),
            }],
        });
        let response = match self.call(request, self.timeout(), "list offsets").await? {
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
                    return Err(ClientError::refusal(topic, Some(result.partition), error))
                }
            }
        }
        Ok(answered)
    }

    /// Deletes a topic and everything stored in it.
    ///
    /// # Errors
    /// [`ClientError::UnknownTopic`] for a topic the broker does not have; the
    /// transport's errors.
    pub async fn delete_topic(&self, name: &str) -> Result<(), ClientError> {
        let request = Request::DeleteTopic(DeleteTopicRequest {
            name: name.to_owned(),
        });
        match self.call(request, self.timeout(), "delete topic").await? {
            ResponseBody::DeleteTopic => Ok(()),
            other => Err(unexpected_body("delete topic", &other)),
        }
    }

    /// Sends a produce request. With `acks: none` the broker sends no response: this
    /// returns `Ok(None)` once the request is written to the socket. Otherwise the
    /// response is returned as is, per-partition errors included, for the caller to read.
    /// The wait is bounded by the request's own `timeout_ms` plus `request_timeout_ms`,
    /// so that the broker's own Timeout answer normally arrives first. This is the raw
    /// request: no batching, retries or idempotence (see [`Producer`]).
    ///
    /// # Errors
    /// The transport's errors and a refusal of the whole request; refusals of single
    /// partitions are in the response.
    pub async fn produce(
        &self,
        request: ProduceRequest,
    ) -> Result<Option<ProduceResponse>, ClientError> {
        self.start_produce(request).await?.wait().await
    }

    /// The first half of [`Client::produce`]: waits for a connection and a slot on it,
    /// and hands the request to the connection's writer. Requests one caller starts one
    /// after another are written in that order, which is what lets the producer keep
    /// several batches of a partition in flight (docs/protocol.md §5.5, "Order of
    /// pipelined produce requests"). The timeout of the whole exchange counts from here.
    pub(super) async fn start_produce(
        &self,
        request: ProduceRequest,
    ) -> Result<StartedProduce, ClientError> {
        let timeout = Duration::from_millis(
            u64::from(request.timeout_ms) + self.inner.config.request_timeout_ms,
        );
        let deadline = tokio::time::Instant::now() + timeout;
        let acks = request.acks;
        let request = Arc::new(Request::Produce(request));
        let session = self.session().await?;
        let enqueue = async {
            if acks == Acks::None {
                session
                    .connection
                    .enqueue_without_response(request)
                    .await
                    .map(Waiting::Written)
            } else {
                session
                    .connection
                    .enqueue(request)
                    .await
                    .map(Waiting::Response)
            }
        };
        let waiting = match tokio::time::timeout_at(deadline, enqueue).await {
            Ok(waiting) => waiting?,
            Err(_elapsed) => {
                return Err(ClientError::Timeout {
                    operation: "produce",
                    timeout_ms: timeout.as_millis() as u64,
                })
            }
        };
        Ok(StartedProduce {
            session,
            waiting,
            deadline,
            timeout,
        })
    }

    /// Sends a fetch request. The wait is bounded by its long-poll `wait_ms_max` plus
    /// `request_timeout_ms`.
    ///
    /// # Errors
    /// The transport's errors and a refusal of the whole request; refusals of single
    /// partitions are in the response.
    pub async fn fetch(&self, request: FetchRequest) -> Result<FetchResponse, ClientError> {
        let timeout = Duration::from_millis(
            u64::from(request.wait_ms_max) + self.inner.config.request_timeout_ms,
        );
        match self.call(Request::Fetch(request), timeout, "fetch").await? {
            ResponseBody::Fetch(response) => Ok(response),
            other => Err(unexpected_body("fetch", &other)),
        }
    }

    /// Fetches one partition from `offset` and decodes its records (checking every
    /// batch's CRC32C). Records before `offset` in the first batch are dropped. At
    /// `offset == high_watermark` the broker waits up to `wait_ms_max` for new data.
    ///
    /// # Errors
    /// As [`fetch_records_from_response`]: [`ClientError::OffsetOutOfRange`],
    /// [`ClientError::UnknownTopic`] / [`ClientError::UnknownPartition`],
    /// [`ClientError::Batch`] for a batch that fails its check; the transport's errors.
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

/// Connects, sets the socket up ([`configure_socket`]) and does the handshake.
async fn open_session(address: &str, config: &ClientConfig) -> Result<Session, ClientError> {
    let connect_error = |source: io::Error| ClientError::Connect {
        address: address.to_owned(),
        source: Arc::new(source),
    };
    let stream = TcpStream::connect(address).await.map_err(connect_error)?;
    configure_socket(&stream, config).map_err(connect_error)?;
    let connection = Connection::start(stream, config).map_err(connect_error)?;
    let timeout = Duration::from_millis(config.request_timeout_ms);
    let request = Arc::new(Request::Handshake(HandshakeRequest {
        client_name: config.client_name.clone(),
    }));
    let handshake = match connection.call(request, timeout, "handshake").await? {
        ResponseBody::Handshake(handshake) => handshake,
        other => return Err(unexpected_body("handshake", &other)),
    };
    if handshake.protocol_version != PROTOCOL_VERSION {
        return Err(ClientError::Protocol(ProtocolError::UnsupportedVersion {
            version: handshake.protocol_version,
        }));
    }
    Ok(Session {
        connection,
        handshake,
    })
}

/// TCP_NODELAY (requests are small and latency matters more than packet count; the
/// writer already coalesces queued requests into one write) and, unless
/// `tcp_keepalive` is `None`, keepalive probes (`ClientConfig::tcp_keepalive`), so that
/// a broker gone silent breaks the connection even while nothing is being sent.
fn configure_socket(stream: &TcpStream, config: &ClientConfig) -> io::Result<()> {
    stream.set_nodelay(true)?;
    if let Some(idle) = config.tcp_keepalive {
        // The interval and probe count are Linux socket options (TCP_KEEPINTVL,
        // TCP_KEEPCNT); the client, like the broker, targets Linux.
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(idle)
            .with_retries(TCP_KEEPALIVE_PROBES);
        socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive)?;
    }
    Ok(())
}

/// One reconnect, as a task the client owns (`ClientInner::reconnect`): tries with
/// backoff until a connection opens or `reconnect_timeout_ms` has passed, installs the
/// connection, and tells every waiting request how it ended. It holds the client
/// weakly, so that it never keeps a client nobody holds alive; the client's drop and
/// [`Client::close`] abort it.
async fn reconnect_task(
    client: Weak<ClientInner>,
    address: String,
    config: ClientConfig,
    outcome: watch::Sender<ReconnectOutcome>,
) {
    let result = connect_with_backoff(&address, &config).await;
    let Some(inner) = client.upgrade() else {
        return;
    };
    let result = result.and_then(|session| {
        let session = Arc::new(session);
        {
            let mut current = inner
                .session
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            *current = session.clone();
            // Counted before anyone can take the new session, so whoever sees it also
            // sees the count (the producer reads its limits again when the count moves).
            inner.reconnects.fetch_add(1, Ordering::AcqRel);
        }
        // A close that raced with the attempt wins: it may have closed the connection
        // this one replaced.
        if inner.closed.load(Ordering::Acquire) {
            session.connection.close();
            return Err(ClientError::Closed);
        }
        Ok(())
    });
    outcome.send_replace(Some(result));
}

/// Opens a connection, retrying with backoff until `reconnect_timeout_ms` has passed.
async fn connect_with_backoff(
    address: &str,
    config: &ClientConfig,
) -> Result<Session, ClientError> {
    let limit = Duration::from_millis(config.reconnect_timeout_ms);
    let deadline = tokio::time::Instant::now() + limit;
    // Always a Connect error, naming the address, with the last attempt's failure (or
    // the time limit) as its cause: nothing was sent on a connection that did not open.
    let gave_up = |last: Option<ClientError>| match last {
        Some(connect @ ClientError::Connect { .. }) => connect,
        Some(other) => ClientError::Connect {
            address: address.to_owned(),
            source: Arc::new(io::Error::other(other)),
        },
        None => ClientError::Connect {
            address: address.to_owned(),
            source: Arc::new(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the broker did not come back within {} ms (reconnect_timeout_ms)",
                    limit.as_millis()
                ),
            )),
        },
    };
    let mut last = None;
    for attempt in 1u32.. {
        match tokio::time::timeout_at(deadline, open_session(address, config)).await {
            Ok(Ok(session)) => return Ok(session),
            Ok(Err(error)) => last = Some(error),
            Err(_elapsed) => break,
        }
        let delay = backoff_delay(
            attempt,
            config.reconnect_backoff_ms_min,
            config.reconnect_backoff_ms_max,
        );
        if tokio::time::Instant::now() + delay >= deadline {
            break;
        }
        tokio::time::sleep(delay).await;
    }
    Err(gave_up(last))
}

/// The one topic a request is about, where a refusal of the whole request is about it.
fn whole_request_topic(request: &Request) -> Option<&str> {
    match request {
        Request::Stats(request) if request.topics.len() == 1 => Some(&request.topics[0]),
        Request::DeleteTopic(request) => Some(&request.name),
        Request::AlterTopic(request) => Some(&request.name),
        Request::CommitOffsets(request) => Some(&request.topic),
        Request::FetchCommitted(request) => Some(&request.topic),
        Request::Receive(request) => Some(&request.topic),
        Request::Settle(request) => Some(&request.topic),
        Request::DescribeGroups(request) => Some(&request.topic),
        Request::PurgeTopic(request) => Some(&request.topic),
        Request::AlterGroup(request) => Some(&request.topic),
        _ => None,
    }
}

/// Requests whose second copy does no harm: reads, and commits (which set a position
/// rather than move it).
/// A produce handed to the connection ([`Client::start_produce`]); [`StartedProduce::wait`]
/// waits for its outcome.
pub(super) struct StartedProduce {
    session: Arc<Session>,
    waiting: Waiting,
    deadline: tokio::time::Instant,
    timeout: Duration,
}

enum Waiting {
    Response(connection::Response),
    Written(connection::Written),
}

impl StartedProduce {
    /// The broker's answer (`None` for acks none, once the request is written). No
    /// answer by the deadline also gives up the connection, as any call does.
    pub(super) async fn wait(self) -> Result<Option<ProduceResponse>, ClientError> {
        let StartedProduce {
            session,
            waiting,
            deadline,
            timeout,
        } = self;
        let connection = &session.connection;
        // A request with an answer that never came: the broker stopped answering.
        let answered = matches!(waiting, Waiting::Response(_));
        let outcome = match waiting {
            Waiting::Written(written) => {
                tokio::time::timeout_at(deadline, async {
                    connection.written(written).await.map(|()| None)
                })
                .await
            }
            Waiting::Response(response) => {
                tokio::time::timeout_at(deadline, async {
                    match connection.response(Opcode::Produce, response).await? {
                        ResponseBody::Produce(response) => Ok(Some(response)),
                        other => Err(unexpected_body("produce", &other)),
                    }
                })
                .await
            }
        };
        match outcome {
            Ok(result) => result,
            Err(_elapsed) => {
                let timed_out = ClientError::Timeout {
                    operation: "produce",
                    timeout_ms: timeout.as_millis() as u64,
                };
                if answered {
                    connection.abandon(timed_out.clone());
                }
                Err(timed_out)
            }
        }
    }
}

fn safe_to_resend(request: &Request) -> bool {
    matches!(
        request,
        Request::Handshake(_)
            | Request::Metadata(_)
            | Request::Fetch(_)
            | Request::ListOffsets(_)
            | Request::CommitOffsets(_)
            | Request::FetchCommitted(_)
            | Request::DescribeGroups(_)
            | Request::Stats(_)
    )
}

/// The wait before reconnect attempt `attempt + 1`: full jitter over
/// `[0, min(max, min * 2^(attempt-1))]`.
pub(super) fn backoff_delay(attempt: u32, min_ms: u64, max_ms: u64) -> Duration {
    let cap = min_ms
        .saturating_mul(1u64 << attempt.saturating_sub(1).min(32))
        .min(max_ms);
    let mut seed = [0u8; 8];
    // Jitter only spreads reconnecting clients apart; a clock-derived value will do
    // where the random source fails.
    if getrandom::getrandom(&mut seed).is_err() {
        seed = (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.subsec_nanos()) as u64)
            .to_le_bytes();
    }
    Duration::from_millis(u64::from_le_bytes(seed) % cap.saturating_add(1))
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

/// For tests of the config builders: each `(built, field, value)` must be an
/// [`ClientError::InvalidConfig`] naming `field` with `value`.
#[cfg(test)]
pub(crate) fn assert_each_refused<T: fmt::Debug>(
    cases: impl IntoIterator<Item = (Result<T, ClientError>, &'static str, u64)>,
) {
    for (built, field, value) in cases {
        match built {
            Err(ClientError::InvalidConfig {
                field: refused,
                value: refused_value,
            }) => assert_eq!((refused, refused_value), (field, value)),
            other => panic!("{field} = {value} was not refused: {other:?}"),
        }
    }
}
