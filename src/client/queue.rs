//! Queue groups from the client side: a [`QueueConsumer`] leases messages of one topic for
//! one group (`receive`), settles them (`ack`, `nack`, `extend`), and [`QueueConsumer::run`]
//! is a worker loop on top of those four calls. The model is docs/queues.md; the bytes are
//! docs/protocol.md §11.
//!
//! What it is: an async layer over [`Client`], on whatever tokio runtime calls it. What it
//! is not: the queue itself. Leases, retries, backoff and dead-lettering live on the
//! broker, in the shard that owns each partition; this side only asks and reports. It is
//! not shard-aware either: every request goes to the client's one connection and the
//! broker routes it (a receive may gather messages from several partitions).
//!
//! Contract:
//! - `receive` answers with up to `messages_max` messages, each leased to this caller
//!   until the broker's clock passes its lease; an empty answer after `wait` is normal;
//! - `ack`, `nack` and `extend` name deliveries by [`Handle`] (partition, offset,
//!   attempt). They travel as [`HandleRange`]s (consecutive offsets of one partition and
//!   attempt cost one entry) in requests of at most `settle_handles_per_request_max`
//!   handles. The answer is a [`SettleOutcome`]: every handle not listed as refused was
//!   settled; every refusal says why as a [`SettleError`]. A transport failure is a
//!   [`ClientError`] instead, and then nothing is known about the handles of the failed
//!   request (settling them again is safe: an ack that already took effect answers
//!   [`SettleError::AlreadySettled`], which [`SettleOutcome::failures`] does not count);
//! - lease deadlines are estimated on this side from when the receive (or extend) was
//!   sent, which is never later than when the broker started the lease: the estimate
//!   errs early, so `run` extends a little before it must, never after.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{unexpected_body, Client, ClientError};
use crate::protocol::queue::{
    handle_ranges, Handle, NackDelay, ReceiveRequest, ReceivedMessage, SettleAction, SettleRequest,
};
use crate::protocol::{ErrorCode, Request, ResponseBody, WireError};

/// Nack reasons are cut to this many bytes before they are sent. The broker keeps fewer
/// (`queue_nack_reason_bytes_max`, 128 by default); this only keeps an error text of
/// megabytes from becoming a megabyte frame.
pub const NACK_REASON_BYTES_MAX: usize = 1024;

/// The reason `run` gives when a handler panicked.
pub const HANDLER_PANICKED_REASON: &str = "the handler panicked";

/// Settings of a [`QueueConsumer`]. Every queue has a limit.
///
/// Made with [`QueueConsumerConfig::builder`] (which checks the values) or
/// [`QueueConsumerConfig::default`], or set piece by piece on a [`QueueConsumerBuilder`],
/// which has the same setters. Fields are public to read; the struct is
/// `#[non_exhaustive]`, so settings added later are not a breaking change, and code
/// outside this crate sets fields through a builder.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueConsumerConfig {
    /// Lease asked for each received message. `None` (the default): the topic's own
    /// (`visibility_timeout_ms` in its queue settings, which `run` reads from metadata).
    /// At least 1 ms, at most `u32::MAX` ms.
    pub visibility_timeout: Option<Duration>,
    /// Most messages one `run` receive asks for (the broker may cap it further).
    /// Default 10; at least 1.
    pub receive_messages_max: u32,
    /// How long one `run` receive waits on the broker when nothing is available.
    /// Default 1 s; at most `u32::MAX` ms.
    pub receive_wait: Duration,
    /// Handlers `run` keeps running at once; it receives only what it has room for.
    /// Default 8; at least 1.
    pub handler_concurrency_max: u32,
    /// `run` extends a running handler's lease once less than this is left of it (at most
    /// half the lease, so that a short lease is still extended in time). Default 5 s.
    pub extend_margin: Duration,
    /// Most handles one ack, nack or extend request carries; bigger settles are split.
    /// The broker refuses more than its `queue_handles_per_request_max` (1000 by default).
    /// Default 1000; at least 1.
    pub settle_handles_per_request_max: u32,
}

impl Default for QueueConsumerConfig {
    fn default() -> Self {
        QueueConsumerConfig {
            visibility_timeout: None,
            receive_messages_max: 10,
            receive_wait: Duration::from_secs(1),
            handler_concurrency_max: 8,
            extend_margin: Duration::from_secs(5),
            settle_handles_per_request_max: 1000,
        }
    }
}

/// The setters shared by [`QueueConsumerConfigBuilder`] and [`QueueConsumerBuilder`]: one
/// per field of [`QueueConsumerConfig`], named like it, taking its type (`Duration` for
/// times, like the fields; `visibility_timeout` sets `Some`).
macro_rules! queue_consumer_setters {
    () => {
        /// Lease asked for each received message (default: the topic's; at least 1 ms).
        pub fn visibility_timeout(mut self, visibility_timeout: Duration) -> Self {
            self.config.visibility_timeout = Some(visibility_timeout);
            self
        }

        config_setters! {
            /// Most messages one `run` receive asks for (default 10; at least 1).
            receive_messages_max: u32;
            /// How long one `run` receive waits when nothing is available (default 1 s).
            receive_wait: Duration;
            /// Handlers `run` keeps running at once (default 8; at least 1).
            handler_concurrency_max: u32;
            /// Extend a running handler's lease once less than this is left (default 5 s).
            extend_margin: Duration;
            /// Most handles per ack, nack or extend request (default 1000; at least 1).
            settle_handles_per_request_max: u32;
        }
    };
}

impl QueueConsumerConfig {
    /// A builder starting from [`QueueConsumerConfig::default`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use shardq::client::QueueConsumerConfig;
    ///
    /// let config = QueueConsumerConfig::builder()
    ///     .visibility_timeout(Duration::from_secs(30))
    ///     .handler_concurrency_max(4)
    ///     .build()?;
    /// assert_eq!(config.handler_concurrency_max, 4);
    /// # Ok::<(), shardq::client::ClientError>(())
    /// ```
    pub fn builder() -> QueueConsumerConfigBuilder {
        QueueConsumerConfigBuilder {
            config: QueueConsumerConfig::default(),
        }
    }
}

/// Builds a [`QueueConsumerConfig`]: [`QueueConsumerConfig::builder`], the setters, then
/// [`QueueConsumerConfigBuilder::build`]. A setter not called leaves the field at its
/// default. To build the consumer itself in one go, see [`QueueConsumer::builder`].
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until build() is called"]
pub struct QueueConsumerConfigBuilder {
    config: QueueConsumerConfig,
}

impl QueueConsumerConfigBuilder {
    queue_consumer_setters!();

    /// Checks the settings and returns them.
    ///
    /// # Errors
    /// [`ClientError::InvalidConfig`] naming the first field that cannot work, with its
    /// value: a zero limit, a zero `visibility_timeout`, or a duration past the wire's
    /// u32 milliseconds (value in ms).
    pub fn build(self) -> Result<QueueConsumerConfig, ClientError> {
        self.config.validate()?;
        Ok(self.config)
    }
}

/// A duration as the wire's u32 milliseconds, or why it does not fit.
fn wire_ms(field: &'static str, duration: Duration) -> Result<u32, ClientError> {
    let ms = duration.as_millis();
    match u32::try_from(ms) {
        Ok(ms) => Ok(ms),
        // The error says only "out of range"; the value, kept here, says by how much.
        Err(_out_of_range) => Err(ClientError::InvalidConfig {
            field,
            value: u64::try_from(ms).unwrap_or(u64::MAX),
        }),
    }
}

impl QueueConsumerConfig {
    fn validate(&self) -> Result<(), ClientError> {
        let zero = |field: &'static str| Err(ClientError::InvalidConfig { field, value: 0 });
        if self.receive_messages_max == 0 {
            return zero("receive_messages_max");
        }
        if self.handler_concurrency_max == 0 {
            return zero("handler_concurrency_max");
        }
        if self.settle_handles_per_request_max == 0 {
            return zero("settle_handles_per_request_max");
        }
        if let Some(visibility) = self.visibility_timeout {
            // 0 on the wire means "the topic's default": a lease of 0 ms cannot be asked.
            if wire_ms("visibility_timeout", visibility)? == 0 {
                return zero("visibility_timeout");
            }
        }
        wire_ms("receive_wait", self.receive_wait)?;
        Ok(())
    }
}

/// Builds a [`QueueConsumer`]: `QueueConsumer::builder(client, topic, group)`, then the
/// setters of [`QueueConsumerConfigBuilder`] (the same names and types) or a whole
/// [`QueueConsumerConfig`] with [`QueueConsumerBuilder::config`], then
/// [`QueueConsumerBuilder::build`].
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until build() is called"]
pub struct QueueConsumerBuilder {
    client: Client,
    topic: String,
    group: String,
    config: QueueConsumerConfig,
}

impl QueueConsumerBuilder {
    queue_consumer_setters!();

    /// Replaces every setting at once.
    pub fn config(mut self, config: QueueConsumerConfig) -> Self {
        self.config = config;
        self
    }

    /// Checks the settings and makes the consumer.
    ///
    /// # Errors
    /// [`ClientError::InvalidConfig`] as [`QueueConsumerConfigBuilder::build`] gives it.
    pub fn build(self) -> Result<QueueConsumer, ClientError> {
        self.config.validate()?;
        Ok(QueueConsumer {
            inner: Arc::new(Inner {
                client: self.client,
                topic: self.topic,
                group: self.group,
                config: self.config,
            }),
        })
    }
}

/// One received message and its delivery handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueMessage {
    message: ReceivedMessage,
    lease_deadline: Option<Instant>,
}

impl QueueMessage {
    /// Names this delivery in `ack`, `nack` and `extend`.
    pub fn handle(&self) -> Handle {
        self.message.handle
    }

    /// 1 for the first delivery; each redelivery adds one.
    pub fn attempt(&self) -> u32 {
        self.message.handle.attempt
    }

    /// The partition the message is stored in.
    pub fn partition(&self) -> u32 {
        self.message.handle.partition
    }

    /// The message's offset in its partition.
    pub fn offset(&self) -> u64 {
        self.message.handle.offset
    }

    /// The message's key, if it was produced with one.
    pub fn key(&self) -> Option<&Bytes> {
        self.message.key.as_ref()
    }

    /// The message's value.
    pub fn value(&self) -> &Bytes {
        &self.message.value
    }

    /// The message's headers, in the order they were produced.
    pub fn headers(&self) -> &[(String, Bytes)] {
        &self.message.headers
    }

    /// The first header named `name`.
    pub fn header(&self, name: &str) -> Option<&Bytes> {
        self.message
            .headers
            .iter()
            .find(|(header, _)| header == name)
            .map(|(_, value)| value)
    }

    /// The record's timestamp, milliseconds since the epoch.
    pub fn timestamp(&self) -> i64 {
        self.message.timestamp_ms
    }

    /// When the lease ends at the latest, estimated from when the receive was sent;
    /// `None` when it was received with the topic's default lease, whose length this
    /// side did not know.
    pub fn lease_deadline(&self) -> Option<Instant> {
        self.lease_deadline
    }

    /// The message as the protocol carries it.
    pub fn as_received(&self) -> &ReceivedMessage {
        &self.message
    }

    /// The message as the protocol carries it.
    pub fn into_received(self) -> ReceivedMessage {
        self.message
    }
}

/// Which settle operation a [`SettleOutcome`] answers.
///
/// `#[non_exhaustive]`: the broker's settle request is one frame with an action byte, and
/// more actions than these three (a release that does not count as a delivery, say) may
/// come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SettleKind {
    /// [`QueueConsumer::ack`].
    Ack,
    /// [`QueueConsumer::nack`].
    Nack,
    /// [`QueueConsumer::extend`].
    Extend,
}

impl SettleKind {
    /// "ack", "nack" or "extend".
    pub fn name(self) -> &'static str {
        match self {
            SettleKind::Ack => "ack",
            SettleKind::Nack => "nack",
            SettleKind::Extend => "extend",
        }
    }
}

/// Why the broker refused one handle (docs/queues.md §3, "Handles").
///
/// `#[non_exhaustive]`: a refusal the broker adds later may get its own variant rather
/// than stay in [`SettleError::Other`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SettleError {
    /// The message was delivered again since: this handle's attempt is superseded (the
    /// broker's message names the current attempt).
    Stale,
    /// The lease ran out; the message will be (or was) delivered again.
    LeaseExpired,
    /// The message is already settled: acked, dead-lettered, expired or removed by
    /// retention. For an ack retried after a lost answer this is success.
    AlreadySettled,
    /// The group never delivered this message.
    NotDelivered,
    /// Any other refusal of this handle (an unknown partition, say), as the broker said.
    Other(ErrorCode),
}

impl SettleError {
    /// The refusal a wire code stands for ([`SettleError::Other`] for codes without
    /// their own variant).
    pub fn from_code(code: ErrorCode) -> SettleError {
        match code {
            ErrorCode::HandleStale => SettleError::Stale,
            ErrorCode::LeaseExpired => SettleError::LeaseExpired,
            ErrorCode::AlreadySettled => SettleError::AlreadySettled,
            ErrorCode::NotDelivered => SettleError::NotDelivered,
            other => SettleError::Other(other),
        }
    }

    /// The wire code this stands for.
    pub fn code(&self) -> ErrorCode {
        match self {
            SettleError::Stale => ErrorCode::HandleStale,
            SettleError::LeaseExpired => ErrorCode::LeaseExpired,
            SettleError::AlreadySettled => ErrorCode::AlreadySettled,
            SettleError::NotDelivered => ErrorCode::NotDelivered,
            SettleError::Other(code) => *code,
        }
    }
}

impl fmt::Display for SettleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SettleError::Stale => "stale: delivered again since",
            SettleError::LeaseExpired => "lease expired",
            SettleError::AlreadySettled => "already settled",
            SettleError::NotDelivered => "never delivered",
            SettleError::Other(code) => code.name(),
        })
    }
}

/// One refused handle: which, why, and the broker's own words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The refused handle.
    pub handle: Handle,
    /// Why it was refused.
    pub error: SettleError,
    /// The broker's message (may be empty).
    pub detail: String,
}

impl Refusal {
    fn from_wire(handle: Handle, error: WireError) -> Refusal {
        Refusal {
            handle,
            error: SettleError::from_code(error.code),
            detail: error.message,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.handle, self.error)?;
        if !self.detail.is_empty() {
            write!(f, " ({})", self.detail)?;
        }
        Ok(())
    }
}

/// The answer to an ack, nack or extend: which handles the broker refused, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettleOutcome {
    /// The operation answered.
    pub kind: SettleKind,
    /// Handles sent.
    pub handles: usize,
    /// In the order the broker listed them; every other handle was settled.
    pub refused: Vec<Refusal>,
}

impl SettleOutcome {
    /// Refusals that mean the operation did not take effect: every refusal, except an
    /// [`SettleError::AlreadySettled`] answering an ack (the message is done, which is
    /// what the ack asked for).
    pub fn failures(&self) -> impl Iterator<Item = &Refusal> + '_ {
        let kind = self.kind;
        self.refused.iter().filter(move |refusal| {
            !(kind == SettleKind::Ack && refusal.error == SettleError::AlreadySettled)
        })
    }

    /// Whether every handle took effect (see [`SettleOutcome::failures`]).
    pub fn is_success(&self) -> bool {
        self.failures().next().is_none()
    }

    /// Handles answered [`SettleError::AlreadySettled`].
    pub fn already_settled(&self) -> impl Iterator<Item = Handle> + '_ {
        self.refused
            .iter()
            .filter(|refusal| refusal.error == SettleError::AlreadySettled)
            .map(|refusal| refusal.handle)
    }

    /// Handles that were not refused at all.
    pub fn accepted(&self) -> usize {
        self.handles - self.refused.len()
    }

    /// `Ok` when [`SettleOutcome::is_success`], for callers that want all or an error.
    ///
    /// # Errors
    /// [`ClientError::HandlesRefused`] with the failures (naming `topic` and `group`).
    pub fn into_result(self, topic: &str, group: &str) -> Result<(), ClientError> {
        if self.is_success() {
            return Ok(());
        }
        let refused = self.failures().cloned().collect();
        Err(ClientError::HandlesRefused {
            operation: self.kind.name(),
            topic: topic.to_owned(),
            group: group.to_owned(),
            refused,
        })
    }
}

impl Client {
    /// A [`QueueConsumer`] of `topic` for `group` with the default settings; see
    /// [`QueueConsumer::builder`] for others.
    pub fn queue_consumer(&self, topic: &str, group: &str) -> QueueConsumer {
        QueueConsumer::builder(self.clone(), topic, group)
            .build()
            .expect("the default queue consumer settings are valid")
    }

    /// Receive from a queue group once: the request as the protocol has it, answered with
    /// the broker's messages. The wait is bounded by `wait_ms` plus `request_timeout_ms`.
    /// [`QueueConsumer::receive`] is the same with checked arguments.
    ///
    /// # Errors
    /// As [`QueueConsumer::receive`].
    pub async fn receive(
        &self,
        request: ReceiveRequest,
    ) -> Result<Vec<ReceivedMessage>, ClientError> {
        let timeout =
            Duration::from_millis(u64::from(request.wait_ms) + self.config().request_timeout_ms);
        match self
            .call(Request::Receive(request), timeout, "receive")
            .await?
        {
            ResponseBody::Receive(response) => Ok(response.messages),
            other => Err(unexpected_body("receive", &other)),
        }
    }

    /// Ack, nack or extend `handles` of `topic`'s `group`, in requests of at most
    /// `handles_per_request_max` handles. Refusals are collected, not errors; the first
    /// transport error ends the call (earlier requests stay settled).
    /// [`QueueConsumer::ack`], `nack` and `extend` are the same for one consumer.
    ///
    /// # Errors
    /// As [`QueueConsumer::ack`].
    ///
    /// # Panics
    /// When `handles_per_request_max` is 0.
    pub async fn settle(
        &self,
        topic: &str,
        group: &str,
        action: SettleAction,
        handles: &[Handle],
        handles_per_request_max: u32,
    ) -> Result<SettleOutcome, ClientError> {
        assert!(handles_per_request_max > 0, "validated by the caller");
        let kind = match action {
            SettleAction::Ack => SettleKind::Ack,
            SettleAction::Nack { .. } => SettleKind::Nack,
            SettleAction::Extend { .. } => SettleKind::Extend,
        };
        let mut outcome = SettleOutcome {
            kind,
            handles: handles.len(),
            refused: Vec::new(),
        };
        for chunk in handles.chunks(handles_per_request_max as usize) {
            let request = SettleRequest {
                topic: topic.to_owned(),
                group: group.to_owned(),
                action: action.clone(),
                ranges: handle_ranges(chunk.iter().copied()),
            };
            let response = match self
                .call(Request::Settle(request), self.timeout(), kind.name())
                .await?
            {
                ResponseBody::Settle(response) => response,
                other => return Err(unexpected_body(kind.name(), &other)),
            };
            outcome.refused.extend(
                response
                    .refused
                    .into_iter()
                    .map(|refused| Refusal::from_wire(refused.handle, refused.error)),
            );
        }
        Ok(outcome)
    }
}

struct Inner {
    client: Client,
    topic: String,
    group: String,
    config: QueueConsumerConfig,
}

/// Receives and settles messages of one topic for one queue group. Cheap to clone:
/// clones share the client and the settings. Many consumers (in one process or many)
/// may serve one group: each message is leased to one of them at a time.
///
/// Guarantees (the queue itself lives on the broker, docs/queues.md):
/// - a received message is leased to this caller until its lease ends
///   ([`QueueMessage::lease_deadline`] estimates it, erring early); unsettled by then, it
///   is delivered again with its attempt plus one (at-least-once);
/// - an ack, nack or extend answers per handle in a [`SettleOutcome`]: every handle not
///   listed as refused took effect, and each refusal says why ([`SettleError`]);
/// - a transport error instead leaves the handles of the failed request unknown, and
///   settling them again is safe;
/// - dropping the consumer releases nothing: messages it leased come back when their
///   leases end.
///
/// ```no_run
/// # async fn example() -> Result<(), shardq::client::ClientError> {
/// use std::time::Duration;
/// use shardq::client::{Client, NackDelay, QueueConsumer};
///
/// let client = Client::connect("127.0.0.1:9740").await?;
/// let consumer = QueueConsumer::builder(client, "orders", "billing")
///     .visibility_timeout(Duration::from_secs(30))
///     .build()?;
/// let messages = consumer.receive(10, None, Duration::from_secs(20)).await?;
/// let (good, bad): (Vec<_>, Vec<_>) = messages.iter().partition(|m| !m.value().is_empty());
/// let good: Vec<_> = good.iter().map(|m| m.handle()).collect();
/// let bad: Vec<_> = bad.iter().map(|m| m.handle()).collect();
/// let acked = consumer.ack(&good).await?;
/// for refusal in acked.failures() {
///     eprintln!("not acked: {refusal}");
/// }
/// consumer.nack(&bad, NackDelay::Backoff, "empty body").await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct QueueConsumer {
    inner: Arc<Inner>,
}

impl fmt::Debug for QueueConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueConsumer")
            .field("topic", &self.inner.topic)
            .field("group", &self.inner.group)
            .field("config", &self.inner.config)
            .finish()
    }
}

/// What a [`QueueConsumer::run`] did, counted per message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// Messages received (a redelivered message counts again).
    pub received: u64,
    /// Handlers that returned `Ok` and whose ack the broker took.
    pub acked: u64,
    /// Handlers that returned `Err` (or panicked) and whose nack the broker took.
    pub nacked: u64,
    /// Lease extensions the broker took (one per handle per extension).
    pub extended: u64,
    /// Acks, nacks and extensions the broker refused (a lease that ran out, say).
    pub refused: u64,
    /// Handlers that panicked (also counted in `nacked` or `refused`).
    pub handler_panics: u64,
}

/// A handler `run` started: its delivery and, when known, where its lease ends.
struct Running {
    handle: Handle,
    lease_deadline: Option<Instant>,
    /// False once an extension was refused: the lease is gone, asking again is useless.
    extendable: bool,
}

type ReceiveFuture = Pin<Box<dyn Future<Output = Result<Vec<QueueMessage>, ClientError>> + Send>>;

/// Acks and nacks `run` has sent and not yet had answered. Settling does not hold up
/// receiving or handling: the loop waits for an answer only at this many.
const RUN_SETTLES_IN_FLIGHT_MAX: usize = 8;

/// What one settle request of `run` did: (acks taken, nacks taken, refused).
type SettleCounts = (u64, u64, u64);

impl QueueConsumer {
    /// A builder of a consumer of `topic` for queue group `group`, starting from
    /// [`QueueConsumerConfig::default`]. The group needs no creating: the broker makes
    /// it at its first receive.
    pub fn builder(client: Client, topic: &str, group: &str) -> QueueConsumerBuilder {
        QueueConsumerBuilder {
            client,
            topic: topic.to_owned(),
            group: group.to_owned(),
            config: QueueConsumerConfig::default(),
        }
    }

    /// The topic it receives from.
    pub fn topic(&self) -> &str {
        &self.inner.topic
    }

    /// The queue group it serves.
    pub fn group(&self) -> &str {
        &self.inner.group
    }

    /// Its settings.
    pub fn config(&self) -> &QueueConsumerConfig {
        &self.inner.config
    }

    /// The client it talks through.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// Leases up to `messages_max` available messages, each for `visibility` (`None`:
    /// the consumer's setting, else the topic's). With none available the broker waits
    /// up to `wait` for one; an empty answer is normal.
    ///
    /// # Errors
    /// [`ClientError::InvalidConfig`] for `messages_max` 0, a visibility of 0 or either
    /// time past the wire's `u32` milliseconds; [`ClientError::UnknownTopic`] for a topic
    /// the broker does not have; [`ClientError::Broker`] for another refusal; the
    /// transport's errors (a receive is not sent again after a broken connection: it
    /// may have leased messages, which come back when their leases end).
    ///
    /// # Cancel safety
    /// Not cancel safe: a receive dropped after it was sent may have leased messages
    /// that nobody gets. They are not lost: the broker delivers them again once their
    /// leases end (the visibility timeout).
    pub async fn receive(
        &self,
        messages_max: u32,
        visibility: Option<Duration>,
        wait: Duration,
    ) -> Result<Vec<QueueMessage>, ClientError> {
        if messages_max == 0 {
            return Err(ClientError::InvalidConfig {
                field: "messages_max",
                value: 0,
            });
        }
        let visibility = visibility.or(self.inner.config.visibility_timeout);
        let visibility_timeout_ms = match visibility {
            Some(visibility) => match wire_ms("visibility", visibility)? {
                0 => {
                    return Err(ClientError::InvalidConfig {
                        field: "visibility",
                        value: 0,
                    })
                }
                ms => ms,
            },
            None => 0,
        };
        let request = ReceiveRequest {
            topic: self.inner.topic.clone(),
            group: self.inner.group.clone(),
            messages_max,
            visibility_timeout_ms,
            wait_ms: wire_ms("wait", wait)?,
        };
        // Before sending: the broker cannot start a lease earlier than this.
        let sent_at = Instant::now();
        let messages = self.inner.client.receive(request).await?;
        let lease_deadline = visibility.map(|visibility| sent_at + visibility);
        Ok(messages
            .into_iter()
            .map(|message| QueueMessage {
                message,
                lease_deadline,
            })
            .collect())
    }

    /// Done with these deliveries: they are never delivered again. A handle answered
    /// [`SettleError::AlreadySettled`] (say, a retried ack) is in the outcome's
    /// `refused` list but not among its `failures`.
    ///
    /// ```no_run
    /// # async fn example(consumer: shardq::client::QueueConsumer) -> Result<(), shardq::client::ClientError> {
    /// use std::time::Duration;
    /// use shardq::client::handles_of;
    ///
    /// let messages = consumer.receive(10, None, Duration::from_secs(1)).await?;
    /// // ... handle them ...
    /// let outcome = consumer.ack(&handles_of(&messages)).await?;
    /// for refusal in outcome.failures() {
    ///     eprintln!("not acked: {refusal}"); // the lease ran out, say: it comes back
    /// }
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// A refusal of single handles is not an error but an entry of the
    /// [`SettleOutcome`] ([`SettleOutcome::into_result`] makes it one). Errors are the
    /// transport's ([`ClientError::Timeout`], [`ClientError::Disconnected`], ...) and a
    /// refusal of the whole request ([`ClientError::UnknownTopic`],
    /// [`ClientError::Broker`]); then nothing is known of the handles of the request
    /// that failed (requests of `settle_handles_per_request_max` handles sent before it
    /// took effect).
    ///
    /// # Cancel safety
    /// A dropped ack may or may not have taken effect (in part, when it took several
    /// requests). Acking the same handles again is safe: an ack that already took effect
    /// is answered [`SettleError::AlreadySettled`], which is not a failure.
    pub async fn ack(&self, handles: &[Handle]) -> Result<SettleOutcome, ClientError> {
        self.settle(SettleAction::Ack, handles).await
    }

    /// These deliveries failed: each message is delivered again after `delay` (or goes
    /// to the dead-letter topic if this was its last allowed delivery, with `reason`).
    /// `reason` is cut to [`NACK_REASON_BYTES_MAX`] bytes.
    ///
    /// # Errors
    /// As [`QueueConsumer::ack`].
    ///
    /// # Cancel safety
    /// A dropped nack may or may not have taken effect; a nack repeated after one that
    /// did is refused for that handle (its delivery is over) and changes nothing.
    pub async fn nack(
        &self,
        handles: &[Handle],
        delay: NackDelay,
        reason: &str,
    ) -> Result<SettleOutcome, ClientError> {
        let action = SettleAction::Nack {
            delay,
            reason: cut_reason(reason).to_owned(),
        };
        self.settle(action, handles).await
    }

    /// Still working: each lease now ends `visibility` from now (this may shorten it).
    ///
    /// # Errors
    /// [`ClientError::InvalidConfig`] for a `visibility` past the wire's `u32`
    /// milliseconds; otherwise as [`QueueConsumer::ack`].
    ///
    /// # Cancel safety
    /// A dropped extend may or may not have taken effect; repeating it sets the leases
    /// again, from the time of the repeat.
    pub async fn extend(
        &self,
        handles: &[Handle],
        visibility: Duration,
    ) -> Result<SettleOutcome, ClientError> {
        let action = SettleAction::Extend {
            visibility_timeout_ms: wire_ms("visibility", visibility)?,
        };
        self.settle(action, handles).await
    }

    async fn settle(
        &self,
        action: SettleAction,
        handles: &[Handle],
    ) -> Result<SettleOutcome, ClientError> {
        self.inner
            .client
            .settle(
                &self.inner.topic,
                &self.inner.group,
                action,
                handles,
                self.inner.config.settle_handles_per_request_max,
            )
            .await
    }

    /// The lease `run` asks for: the consumer's setting, else the topic's from metadata.
    async fn lease_length(&self) -> Result<Duration, ClientError> {
        if let Some(visibility) = self.inner.config.visibility_timeout {
            return Ok(visibility);
        }
        let topic = &self.inner.topic;
        let metadata = self.inner.client.metadata(&[topic.as_str()]).await?;
        let entry = metadata
            .topics
            .into_iter()
            .find(|entry| entry.name == *topic)
            .ok_or_else(|| ClientError::UnknownTopic {
                topic: topic.clone(),
            })?;
        if let Some(error) = entry.error {
            return Err(ClientError::refusal(topic, None, error));
        }
        match entry.queue.visibility_timeout_ms {
            Some(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
            // Metadata fills every value in; a broker that did not is answered plainly.
            other => Err(ClientError::UnexpectedResponse {
                correlation_id: 0,
                reason: format!(
                    "metadata of topic {topic:?} has visibility timeout {other:?}, expected a number of milliseconds"
                ),
            }),
        }
    }

    /// The worker loop: receives messages and runs `handler` on each, up to
    /// `handler_concurrency_max` at once (each in its own tokio task). A handler's `Ok`
    /// acks its message; an `Err` nacks it with the error's text as the reason and the
    /// topic's backoff (a panic nacks it too). While a handler runs past its lease's end
    /// minus `extend_margin`, its lease is extended by the lease length again.
    ///
    /// When `shutdown` resolves, `run` stops receiving, lets every running handler finish
    /// (still extending their leases), settles them, and returns what it did. A receive
    /// already sent is waited for and its messages handled too, so none is left leased
    /// and unprocessed.
    ///
    /// A broker restart does not end the loop when the client reconnects
    /// (`ClientConfig::reconnect`, the default): a receive that fails retriably (the
    /// connection lost, the broker stopping or unreachable) is tried again after a
    /// backoff, and an ack, nack or extension whose connection was lost is sent once
    /// more on the next connection (an ack the lost attempt already made then counts as
    /// done). Handlers keep running meanwhile. A broker that stays unreachable for
    /// `reconnect_timeout_ms` ends the loop with [`ClientError::Connect`]. Any other
    /// error (or the broker refusing a whole request) returns at once as a
    /// [`ClientError`]; handlers still running are
    /// then aborted and their messages come back when their leases run out. A refused
    /// ack, nack or extension of one handle is counted in [`RunSummary::refused`] and the
    /// loop goes on.
    ///
    /// # Errors
    /// The lease length's metadata request failing (when `visibility_timeout` is not
    /// set), [`ClientError::Connect`] after `reconnect_timeout_ms` without a broker, or
    /// any error that is not retriable (above); the summary of what was done is then
    /// lost, the acks and nacks it counted stay done.
    ///
    /// # Cancel safety
    /// Dropping the `run` future is an abrupt stop: running handlers are aborted and
    /// acks and nacks not yet answered may be lost, so their messages are delivered
    /// again when their leases end (nothing is lost, some is done twice). To stop
    /// cleanly, resolve `shutdown` and await `run`.
    ///
    /// ```no_run
    /// # async fn charge(_: &[u8]) -> Result<(), std::io::Error> { Ok(()) }
    /// # async fn example() -> Result<(), shardq::client::ClientError> {
    /// use shardq::client::Client;
    ///
    /// let client = Client::connect("127.0.0.1:9740").await?;
    /// let consumer = client.queue_consumer("orders", "billing");
    /// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    /// # drop(stop);
    /// let summary = consumer
    ///     .run(
    ///         |message| async move {
    ///             charge(message.value()).await?; // Err -> nack with its text
    ///             Ok::<(), std::io::Error>(())    // Ok -> ack
    ///         },
    ///         stopped,
    ///     )
    ///     .await?;
    /// println!("acked {} nacked {}", summary.acked, summary.nacked);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn run<H, F, E, S>(&self, handler: H, shutdown: S) -> Result<RunSummary, ClientError>
    where
        H: Fn(QueueMessage) -> F,
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: fmt::Display + 'static,
        S: Future,
    {
        let config = &self.inner.config;
        let lease = self.lease_length().await?;
        let margin = config.extend_margin.min(lease / 2);
        let concurrency = config.handler_concurrency_max as usize;
        let mut summary = RunSummary::default();
        let mut handlers: JoinSet<Result<(), String>> = JoinSet::new();
        let mut running: HashMap<tokio::task::Id, Running> = HashMap::new();
        let mut receiving: Option<ReceiveFuture> = None;
        let mut settling: JoinSet<Result<SettleCounts, ClientError>> = JoinSet::new();
        let mut stopping = false;
        let mut shutdown = std::pin::pin!(shutdown);
        // Receives in a row that failed retriably: the next waits a backoff first.
        let mut receive_failures = 0u32;
        let reconnects = self.client().config().reconnect;
        loop {
            if !stopping && receiving.is_none() && running.len() < concurrency {
                let room = (concurrency - running.len()) as u32;
                let messages_max = config.receive_messages_max.min(room);
                let consumer = self.clone();
                let wait = config.receive_wait;
                let backoff = (receive_failures > 0).then(|| {
                    let client = self.client().config();
                    super::backoff_delay(
                        receive_failures,
                        client.reconnect_backoff_ms_min,
                        client.reconnect_backoff_ms_max,
                    )
                });
                receiving = Some(Box::pin(async move {
                    if let Some(backoff) = backoff {
                        tokio::time::sleep(backoff).await;
                    }
                    consumer.receive(messages_max, Some(lease), wait).await
                }));
            }
            if stopping && receiving.is_none() && running.is_empty() && settling.is_empty() {
                return Ok(summary);
            }
            let next_extension = running
                .values()
                .filter(|running| running.extendable)
                .filter_map(|running| running.lease_deadline)
                .min()
                .map(|deadline| deadline.checked_sub(margin).unwrap_or(deadline));
            tokio::select! {
                _ = &mut shutdown, if !stopping => {
                    stopping = true;
                }
                received = async {
                    match receiving.as_mut() {
                        Some(receive) => receive.await,
                        None => std::future::pending().await,
                    }
                }, if receiving.is_some() => {
                    receiving = None;
                    let received = match received {
                        Ok(received) => {
                            receive_failures = 0;
                            received
                        }
                        // The next receive reconnects. What a receive lost with its
                        // connection may have leased comes back when the lease runs out.
                        Err(error)
                            if reconnects
                                && error.is_retriable()
                                && !matches!(error, ClientError::Connect { .. }) =>
                        {
                            receive_failures = receive_failures.saturating_add(1);
                            continue;
                        }
                        Err(error) => return Err(error),
                    };
                    for message in received {
                        summary.received += 1;
                        let entry = Running {
                            handle: message.handle(),
                            lease_deadline: message.lease_deadline(),
                            extendable: true,
                        };
                        let work = handler(message);
                        let task = handlers.spawn(async move {
                            work.await.map_err(|error| error.to_string())
                        });
                        running.insert(task.id(), entry);
                    }
                }
                Some(first) = handlers.join_next_with_id() => {
                    let mut acks = Vec::new();
                    let mut nacks: Vec<(String, Vec<Handle>)> = Vec::new();
                    let mut next = Some(first);
                    while let Some(joined) = next.take() {
                        let (id, result) = match joined {
                            Ok((id, result)) => (id, result),
                            Err(error) => {
                                if error.is_panic() {
                                    summary.handler_panics += 1;
                                }
                                (error.id(), Err(HANDLER_PANICKED_REASON.to_owned()))
                            }
                        };
                        let finished = running.remove(&id).expect("every handler task is tracked");
                        match result {
                            Ok(()) => acks.push(finished.handle),
                            Err(reason) => match nacks.iter_mut().find(|(known, _)| *known == reason) {
                                Some((_, handles)) => handles.push(finished.handle),
                                None => nacks.push((reason, vec![finished.handle])),
                            },
                        }
                        next = handlers.try_join_next_with_id();
                    }
                    // Sent in the background; at the in-flight limit, wait for an answer
                    // first (backpressure on a broker slow to settle).
                    if !acks.is_empty() {
                        while settling.len() >= RUN_SETTLES_IN_FLIGHT_MAX {
                            count_settled(&mut summary, settling.join_next().await)?;
                        }
                        let consumer = self.clone();
                        settling.spawn(async move {
                            let outcome = consumer
                                .settle_surviving_reconnect(|| consumer.ack(&acks))
                                .await?;
                            Ok((outcome.accepted() as u64, 0, outcome.refused.len() as u64))
                        });
                    }
                    for (reason, handles) in nacks {
                        while settling.len() >= RUN_SETTLES_IN_FLIGHT_MAX {
                            count_settled(&mut summary, settling.join_next().await)?;
                        }
                        let consumer = self.clone();
                        settling.spawn(async move {
                            let outcome = consumer
                                .settle_surviving_reconnect(|| {
                                    consumer.nack(&handles, NackDelay::Backoff, &reason)
                                })
                                .await?;
                            Ok((0, outcome.accepted() as u64, outcome.refused.len() as u64))
                        });
                    }
                }
                settled = settling.join_next(), if !settling.is_empty() => {
                    count_settled(&mut summary, settled)?;
                }
                _ = sleep_until_some(next_extension), if next_extension.is_some() => {
                    let now = Instant::now();
                    let due: Vec<Handle> = running
                        .values()
                        .filter(|running| running.extendable)
                        .filter(|running| {
                            running
                                .lease_deadline
                                .is_some_and(|deadline| deadline.checked_sub(margin).unwrap_or(deadline) <= now)
                        })
                        .map(|running| running.handle)
                        .collect();
                    let sent_at = Instant::now();
                    let outcome = self
                        .settle_surviving_reconnect(|| self.extend(&due, lease))
                        .await?;
                    summary.extended += outcome.accepted() as u64;
                    summary.refused += outcome.refused.len() as u64;
                    for running in running.values_mut() {
                        if !due.contains(&running.handle) {
                            continue;
                        }
                        if outcome.refused.iter().any(|refusal| refusal.handle == running.handle) {
                            running.extendable = false;
                        } else {
                            running.lease_deadline = Some(sent_at + lease);
                        }
                    }
                }
            }
        }
    }
}

impl QueueConsumer {
    /// For `run`: an ack, nack or extension whose connection was lost is sent once more
    /// on the next connection (with reconnecting on). The lost attempt may have been
    /// applied: an ack it made is then refused as AlreadySettled, which counts as done.
    async fn settle_surviving_reconnect<F, Settling>(
        &self,
        attempt: F,
    ) -> Result<SettleOutcome, ClientError>
    where
        F: Fn() -> Settling,
        Settling: Future<Output = Result<SettleOutcome, ClientError>>,
    {
        match attempt().await {
            Err(error) if error.is_connection_lost() && self.client().config().reconnect => {
                let mut outcome = attempt().await?;
                if outcome.kind == SettleKind::Ack {
                    outcome
                        .refused
                        .retain(|refusal| refusal.error != SettleError::AlreadySettled);
                }
                Ok(outcome)
            }
            result => result,
        }
    }
}

/// Adds a finished settle request of `run` to its summary, or returns its error.
fn count_settled(
    summary: &mut RunSummary,
    settled: Option<Result<Result<SettleCounts, ClientError>, tokio::task::JoinError>>,
) -> Result<(), ClientError> {
    let Some(settled) = settled else {
        return Ok(());
    };
    let (acked, nacked, refused) = match settled {
        Ok(counts) => counts?,
        // The set is never aborted, so a task fails only by panicking: pass it on.
        Err(error) => std::panic::resume_unwind(error.into_panic()),
    };
    summary.acked += acked;
    summary.nacked += nacked;
    summary.refused += refused;
    Ok(())
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// `reason` cut to at most [`NACK_REASON_BYTES_MAX`] bytes, at a character boundary.
fn cut_reason(reason: &str) -> &str {
    if reason.len() <= NACK_REASON_BYTES_MAX {
        return reason;
    }
    let mut end = NACK_REASON_BYTES_MAX;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// Handles of `messages`, for settling them all at once.
pub fn handles_of(messages: &[QueueMessage]) -> Vec<Handle> {
    messages.iter().map(QueueMessage::handle).collect()
}
