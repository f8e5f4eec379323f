//! Request dispatch on the shard that received the request: validate, split by owning
//! shard, route, and reassemble one response in the order the request listed things.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use super::connection::Event;
use crate::placement::{fnv1a64, shard_for_hashed};

use crate::protocol::batch::{validate_batch, BatchError, BatchHeader};
use crate::protocol::queue::{
    AlterGroupRequest, CommitOffsetsRequest, CommitOffsetsResponse, CommitPartitionResult,
    DescribeGroupsRequest, DescribeGroupsResponse, FetchCommittedPartitionResult,
    FetchCommittedRequest, FetchCommittedResponse, GroupDescription, Handle, PurgeTopicRequest,
    PurgeTopicResponse, PurgedPartition, ReceiveRequest, ReceiveResponse, RefusedHandle,
    SettleAction, SettleRequest, SettleResponse,
};
use crate::protocol::{
    quote_untrusted, ErrorCode, FetchPartitionData, FetchPartitionResult, FetchRequest,
    FetchResponse, FetchTopicResult, HandshakeResponse, ListOffsetsPartitionResult,
    ListOffsetsRequest, ListOffsetsResponse, ListOffsetsTopicResult, MetadataRequest,
    MetadataResponse, PartitionMetadata, ProducePartitionResult, ProduceRequest, ProduceResponse,
    ProduceTopicResult, Request, ResponseBody, StatsRequest, StatsResponse, TopicMetadata,
    WireError, PROTOCOL_VERSION, TIMESTAMP_EARLIEST, TIMESTAMP_LATEST,
};
use crate::shard::queues::settings::{self as queue_settings, validate_group_name};
use crate::shard::{
    FetchItem, ListOffsetsItem, ProduceItem, Shard, ShardId, ShardReply, ShardRequest, TopicConfig,
};
use crate::storage::read_window_bytes_max;

/// Produce requests that name no timeout get this one.
const PRODUCE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

/// Who sent a request: what the queue operations need of its connection.
pub struct Caller<'a> {
    /// Holder of the leases this connection's receives take (unique on the shard).
    pub holder: u64,
    /// Set when the client is gone or has closed its sending side: a receive leases
    /// nothing more and its long-poll stops waiting then.
    pub gone: Option<&'a Event>,
}

pub async fn handle(
    shard: &Rc<Shard>,
    request: Request,
    caller: &Caller<'_>,
) -> Result<ResponseBody, WireError> {
    if shard.is_shutting_down() {
        return Err(WireError::new(
            ErrorCode::ShuttingDown,
            "the broker is shutting down",
        ));
    }
    match request {
        Request::Handshake(_) => Ok(ResponseBody::Handshake(HandshakeResponse {
            protocol_version: PROTOCOL_VERSION,
            shard_count: shard.count,
            shard_id: shard.id,
            server_version: env!("CARGO_PKG_VERSION").to_owned(),
            batch_bytes_max: u32::try_from(shard.config.batch_bytes_max()).unwrap_or(u32::MAX),
        })),
        Request::Metadata(request) => Ok(ResponseBody::Metadata(metadata(shard, request))),
        Request::CreateTopic(request) => {
            into_done(
                shard
                    .route(
                        0,
                        ShardRequest::CreateTopic {
                            name: request.name,
                            topic: TopicConfig {
                                partitions: request.partitions,
                                retention: request.retention,
                                queue: request.queue,
                                ..TopicConfig::default()
                            },
                        },
                    )
                    .await,
            )?;
            Ok(ResponseBody::CreateTopic)
        }
        Request::DeleteTopic(request) => {
            into_done(
                shard
                    .route(0, ShardRequest::DeleteTopic { name: request.name })
                    .await,
            )?;
            Ok(ResponseBody::DeleteTopic)
        }
        Request::AlterTopic(request) => {
            into_done(
                shard
                    .route(
                        0,
                        ShardRequest::AlterTopic {
                            name: request.name,
                            retention: request.retention,
                            queue: request.queue,
                        },
                    )
                    .await,
            )?;
            Ok(ResponseBody::AlterTopic)
        }
        Request::Produce(request) => Ok(ResponseBody::Produce(
            start_produce(shard, request).await.finish().await,
        )),
        Request::Fetch(request) => Ok(ResponseBody::Fetch(fetch(shard, request).await)),
        Request::ListOffsets(request) => Ok(ResponseBody::ListOffsets(
            list_offsets(shard, request).await,
        )),
        Request::Receive(request) => Ok(ResponseBody::Receive(
            receive(shard, request, caller).await?,
        )),
        Request::Settle(request) => Ok(ResponseBody::Settle(settle(shard, request).await?)),
        Request::DescribeGroups(request) => Ok(ResponseBody::DescribeGroups(
            describe_groups(shard, request).await?,
        )),
        Request::CommitOffsets(request) => Ok(ResponseBody::CommitOffsets(
            commit_offsets(shard, request).await?,
        )),
        Request::FetchCommitted(request) => Ok(ResponseBody::FetchCommitted(
            fetch_committed(shard, request).await?,
        )),
        Request::PurgeTopic(request) => {
            Ok(ResponseBody::PurgeTopic(purge_topic(shard, request).await?))
        }
        Request::AlterGroup(request) => {
            alter_group(shard, request).await?;
            Ok(ResponseBody::AlterGroup)
        }
        Request::Stats(request) => Ok(ResponseBody::Stats(stats(shard, request).await?)),
    }
}

/// Asks every shard for its part and puts the answer together: shards in order, each
/// partition from its owner with what every shard fetched from it added up.
async fn stats(shard: &Rc<Shard>, request: StatsRequest) -> Result<StatsResponse, WireError> {
    let mut request = request;
    request.topics.sort_unstable();
    request.topics.dedup();
    for topic in &request.topics {
        if shard.topic(topic).is_none() {
            return Err(WireError::new(
                ErrorCode::UnknownTopic,
                format!("topic {} does not exist", quote_untrusted(topic)),
            ));
        }
    }
    let asks: Vec<_> = (0..shard.count)
        .map(|owner| {
            let shard = Rc::clone(shard);
            let request = ShardRequest::Stats {
                topics: request.topics.clone(),
            };
            glommio::spawn_local(async move { shard.route(owner, request).await })
        })
        .collect();
    let mut response = StatsResponse::default();
    let mut fetched = Vec::new();
    for ask in asks {
        match ask.await {
            ShardReply::Stats(shard_stats, partitions, shard_fetched) => {
                response.shards.push(shard_stats);
                response.partitions.extend(partitions);
                fetched.extend(shard_fetched);
            }
            ShardReply::Done(Err(error)) => return Err(error),
            other => {
                return Err(WireError::new(
                    ErrorCode::Internal,
                    format!("unexpected reply to stats: {other:?}"),
                ))
            }
        }
    }
    response
        .partitions
        .sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    for entry in fetched {
        let found = response.partitions.binary_search_by(|partition| {
            (partition.topic.as_str(), partition.partition)
                .cmp(&(entry.topic.as_str(), entry.partition))
        });
        if let Ok(index) = found {
            response.partitions[index].records_out += entry.records;
            response.partitions[index].bytes_out += entry.bytes;
        }
    }
    Ok(response)
}

async fn list_offsets(shard: &Rc<Shard>, request: ListOffsetsRequest) -> ListOffsetsResponse {
    let mut response = ListOffsetsResponse {
        topics: Vec::with_capacity(request.topics.len()),
    };
    let mut split = Split::new();
    for (topic_index, topic) in request.topics.into_iter().enumerate() {
        let route = TopicRoute::new(shard, &topic.name);
        let mut partitions = Vec::with_capacity(topic.partitions.len());
        for (partition_index, entry) in topic.partitions.into_iter().enumerate() {
            let result = check_list_timestamp(entry.timestamp_ms)
                .and_then(|()| route.check(entry.partition))
                .map(|owner| {
                    split.push(
                        owner,
                        (topic_index, partition_index),
                        ListOffsetsItem {
                            topic: Arc::clone(&route.name),
                            partition: entry.partition,
                            timestamp_ms: entry.timestamp_ms,
                        },
                    );
                });
            partitions.push(ListOffsetsPartitionResult {
                partition: entry.partition,
                // Filled in below from the owner's reply when the partition exists.
                result: result.and(Err(WireError::new(
                    ErrorCode::Internal,
                    "no reply from the owning shard",
                ))),
            });
        }
        response.topics.push(ListOffsetsTopicResult {
            name: topic.name,
            partitions,
        });
    }
    let replies = run_groups(shard, split, |items| ShardRequest::ListOffsets { items }).await;
    place_replies(
        replies,
        |reply| match reply {
            ShardReply::ListOffsets(results) => Ok(results),
            other => Err(other),
        },
        Err,
        |(topic_index, partition_index), result| {
            response.topics[topic_index].partitions[partition_index].result = result;
        },
    );
    response
}

/// Stream group commits: each partition's commit goes to its owner; answered in request
/// order once every owner has made its commits durable.
async fn commit_offsets(
    shard: &Rc<Shard>,
    request: CommitOffsetsRequest,
) -> Result<CommitOffsetsResponse, WireError> {
    let route = TopicRoute::new(shard, &request.topic);
    if let Some(unknown) = &route.unknown {
        return Err(unknown.clone());
    }
    let group: Arc<str> = Arc::from(request.group);
    let mut split = Split::new();
    let mut partitions = Vec::with_capacity(request.partitions.len());
    for (index, entry) in request.partitions.into_iter().enumerate() {
        let result = route.check(entry.partition).map(|owner| {
            split.push(owner, (index, 0), (entry.partition, entry.offset));
        });
        partitions.push(CommitPartitionResult {
            partition: entry.partition,
            result: result.and(Err(WireError::new(
                ErrorCode::Internal,
                "no reply from the owning shard",
            ))),
        });
    }
    let replies = run_groups(shard, split, |entries| ShardRequest::CommitOffsets {
        topic: Arc::clone(&route.name),
        group: Arc::clone(&group),
        entries,
    })
    .await;
    place_replies(
        replies,
        |reply| match reply {
            ShardReply::Commit(results) => Ok(results),
            other => Err(other),
        },
        Err,
        |(index, _), result| partitions[index].result = result,
    );
    Ok(CommitOffsetsResponse { partitions })
}

/// Stream group positions of the listed partitions (every partition when none is).
async fn fetch_committed(
    shard: &Rc<Shard>,
    request: FetchCommittedRequest,
) -> Result<FetchCommittedResponse, WireError> {
    let route = TopicRoute::new(shard, &request.topic);
    let (Some(count), None) = (route.partitions, &route.unknown) else {
        return Err(route.unknown.clone().expect("set for an unknown topic"));
    };
    let listed = if request.partitions.is_empty() {
        (0..count).collect()
    } else {
        request.partitions
    };
    let group: Arc<str> = Arc::from(request.group);
    let mut split = Split::new();
    let mut partitions = Vec::with_capacity(listed.len());
    for (index, partition) in listed.into_iter().enumerate() {
        let result = route.check(partition).map(|owner| {
            split.push(owner, (index, 0), partition);
        });
        partitions.push(FetchCommittedPartitionResult {
            partition,
            result: result.and(Err(WireError::new(
                ErrorCode::Internal,
                "no reply from the owning shard",
            ))),
        });
    }
    let replies = run_groups(shard, split, |partitions| ShardRequest::FetchCommitted {
        topic: Arc::clone(&route.name),
        group: Arc::clone(&group),
        partitions,
    })
    .await;
    place_replies(
        replies,
        |reply| match reply {
            ShardReply::Committed(results) => Ok(results),
            other => Err(other),
        },
        Err,
        |(index, _), result| partitions[index].result = result,
    );
    Ok(FetchCommittedResponse { partitions })
}

/// Deletes every stored record of every partition of a topic. The first partition that
/// fails fails the request (the others are purged all the same).
async fn purge_topic(
    shard: &Rc<Shard>,
    request: PurgeTopicRequest,
) -> Result<PurgeTopicResponse, WireError> {
    let route = TopicRoute::new(shard, &request.topic);
    let (Some(count), None) = (route.partitions, &route.unknown) else {
        return Err(route.unknown.clone().expect("set for an unknown topic"));
    };
    let mut split = Split::new();
    for partition in 0..count {
        let owner = route.check(partition)?;
        split.push(owner, (partition as usize, 0), partition);
    }
    let replies = run_groups(shard, split, |partitions| ShardRequest::PurgeTopic {
        topic: Arc::clone(&route.name),
        partitions,
    })
    .await;
    let mut partitions: Vec<Option<Result<PurgedPartition, WireError>>> =
        vec![None; count as usize];
    place_replies(
        replies,
        |reply| match reply {
            ShardReply::Purged(results) => Ok(results),
            other => Err(other),
        },
        Err,
        |(index, _), result| partitions[index] = Some(result),
    );
    let partitions = partitions
        .into_iter()
        .map(|result| result.expect("every partition was routed"))
        .collect::<Result<Vec<_>, WireError>>()?;
    Ok(PurgeTopicResponse { partitions })
}

/// A ListOffsets time is a time (>= 0) or one of the two special values; anything else
/// is refused here, before any owner does work for it.
fn check_list_timestamp(timestamp_ms: i64) -> Result<(), WireError> {
    if timestamp_ms >= 0 || timestamp_ms == TIMESTAMP_EARLIEST || timestamp_ms == TIMESTAMP_LATEST {
        return Ok(());
    }
    Err(WireError::new(
        ErrorCode::InvalidRequest,
        format!("timestamp {timestamp_ms} is neither a time nor -1 (latest) or -2 (earliest)"),
    ))
}

fn into_done(reply: ShardReply) -> Result<(), WireError> {
    match reply {
        ShardReply::Done(result) => result,
        other => Err(WireError::new(
            ErrorCode::Internal,
            format!("unexpected reply {other:?} to a topic change"),
        )),
    }
}

fn metadata(shard: &Shard, request: MetadataRequest) -> MetadataResponse {
    let topics: Vec<(String, Option<TopicConfig>)> = if request.topics.is_empty() {
        shard
            .topics()
            .into_iter()
            .map(|(name, topic)| (name, Some(topic)))
            .collect()
    } else {
        request
            .topics
            .into_iter()
            .map(|name| {
                let topic = shard.topic(&name);
                (name, topic)
            })
            .collect()
    };
    MetadataResponse {
        shard_ports: shard.shard_ports.clone(),
        topics: topics
            .into_iter()
            .map(|(name, topic)| TopicMetadata {
                retention: topic
                    .as_ref()
                    .map(|topic| topic.retention)
                    .unwrap_or_default(),
                // Every setting filled in, the broker's defaults where the topic set none.
                queue: topic.as_ref().map_or_else(Default::default, |topic| {
                    queue_settings::filled(
                        &shard.config,
                        &topic.queue,
                        &name,
                        topic.dead_letter_source.is_some(),
                    )
                }),
                error: topic.is_none().then(|| {
                    WireError::new(
                        ErrorCode::UnknownTopic,
                        format!("topic {} does not exist", quote_untrusted(&name)),
                    )
                }),
                partitions: (0..topic.as_ref().map_or(0, |topic| topic.partitions))
                    .map(|partition| PartitionMetadata {
                        partition,
                        shard: shard.owner_of(&name, partition),
                    })
                    .collect(),
                name,
            })
            .collect(),
    }
}

/// One topic of a request, looked up in this shard's catalog once: every entry of the
/// topic is then checked against it without another lookup, hash or name copy, and an
/// unknown topic's error is built once and shared by its entries (a request may list
/// 16,384 entries of one topic).
struct TopicRoute {
    name: Arc<str>,
    partitions: Option<u32>,
    hash: u64,
    shard_count: u16,
    unknown: Option<WireError>,
}

impl TopicRoute {
    fn new(shard: &Shard, name: &str) -> TopicRoute {
        let partitions = shard.partition_count(name);
        // Partitions are placed by the topic's placement name (a DLQ's is its source's).
        let placement = shard.placement_of(name);
        TopicRoute {
            name: Arc::from(name),
            partitions,
            hash: fnv1a64(placement.as_deref().unwrap_or(name).as_bytes()),
            shard_count: shard.count,
            unknown: partitions.is_none().then(|| {
                WireError::new(
                    ErrorCode::UnknownTopic,
                    format!("topic {} does not exist", quote_untrusted(name)),
                )
            }),
        }
    }

    /// The shards owning the topic's `partitions` partitions, each once, ascending.
    fn owners(&self, partitions: u32) -> Result<Vec<ShardId>, WireError> {
        let mut owners = Vec::new();
        for partition in 0..partitions {
            owners.push(self.check(partition)?);
        }
        owners.sort_unstable();
        owners.dedup();
        Ok(owners)
    }

    /// The owner of `partition`, or why the entry is refused.
    fn check(&self, partition: u32) -> Result<ShardId, WireError> {
        match self.partitions {
            None => Err(self.unknown.clone().expect("set for an unknown topic")),
            Some(count) if partition >= count => Err(WireError::new(
                ErrorCode::UnknownPartition,
                format!(
                    "topic {} has {count} partitions; {partition} does not exist",
                    quote_untrusted(&self.name)
                ),
            )),
            Some(_) => Ok(shard_for_hashed(self.hash, partition, self.shard_count)),
        }
    }
}

fn batch_error(error: BatchError) -> WireError {
    let code = match error {
        BatchError::CrcMismatch { .. } => ErrorCode::CorruptBatch,
        _ => ErrorCode::InvalidBatch,
    };
    WireError::new(code, error.to_string())
}

/// A batch's timestamps must be possible (not before 1970, max not below first) and not
/// further ahead of the broker's clock than `future_ms_max`.
fn check_timestamps(
    header: &BatchHeader,
    now_ms: i64,
    future_ms_max: u64,
) -> Result<(), WireError> {
    let first = header.first_timestamp_ms;
    let max = header.max_timestamp_ms;
    if first < 0 || max < first {
        return Err(WireError::new(
            ErrorCode::InvalidTimestamp,
            format!("batch timestamps first {first} ms, max {max} ms: both must be >= 0 and max >= first"),
        ));
    }
    let limit = now_ms.saturating_add(i64::try_from(future_ms_max).unwrap_or(i64::MAX));
    if max > limit {
        return Err(WireError::new(
            ErrorCode::InvalidTimestamp,
            format!(
                "batch max timestamp {max} ms is {} ms ahead of the broker's clock, more than timestamp_future_ms_max ({future_ms_max} ms)",
                max - now_ms
            ),
        ));
    }
    Ok(())
}

/// Where an item's result goes in the response: (topic index, partition index).
type Slot = (usize, usize);

/// One owner's share of a request: its items and the slots their results fill.
type Group<T> = (ShardId, Vec<Slot>, Vec<T>);

/// A request's items grouped by owner so each owner gets one sub-request.
struct Split<T> {
    groups: Vec<Group<T>>,
}

impl<T> Split<T> {
    fn new() -> Split<T> {
        Split { groups: Vec::new() }
    }

    fn push(&mut self, owner: ShardId, slot: Slot, item: T) {
        match self.groups.iter_mut().find(|(shard, _, _)| *shard == owner) {
            Some((_, slots, items)) => {
                slots.push(slot);
                items.push(item);
            }
            None => self.groups.push((owner, vec![slot], vec![item])),
        }
    }
}

/// A request the connection's reader has started ([`start`]); [`finish`] runs the rest.
pub enum Started {
    /// Nothing of it has run yet.
    Request(Request),
    /// A produce admitted to its partitions' append lines.
    Produce(StartedProduce),
}

/// Starts `request` in the connection's reader, in frame order, before its task runs.
/// A produce is validated, split by owner and admitted to the append line of every
/// partition it names (docs/protocol.md §5.5, "Order of pipelined produce requests"):
/// this shard's partitions take their tickets now, and the sub-request for each other
/// owner is handed to the mesh now, so the owner admits it in the order the frames
/// arrived. Only that hand-off waits (for room in a full mesh channel: backpressure,
/// which pauses this connection's reading). Any other request is left for [`finish`].
pub async fn start(shard: &Rc<Shard>, request: Request) -> Started {
    match request {
        // A broker shutting down refuses it whole, in `handle`.
        Request::Produce(request) if !shard.is_shutting_down() => {
            Started::Produce(start_produce(shard, request).await)
        }
        request => Started::Request(request),
    }
}

/// Runs what [`start`] left, in the request's own task.
pub async fn finish(
    shard: &Rc<Shard>,
    started: Started,
    caller: &Caller<'_>,
) -> Result<ResponseBody, WireError> {
    match started {
        Started::Request(request) => handle(shard, request, caller).await,
        Started::Produce(produce) => Ok(ResponseBody::Produce(produce.finish().await)),
    }
}

/// One owner's reply to its share of a produce, on its way.
type OwnerReply = Pin<Box<dyn Future<Output = ShardReply>>>;

/// A produce admitted on every owner: the response with refused entries filled in, and
/// the owners' replies to wait for.
pub struct StartedProduce {
    response: ProduceResponse,
    replies: Vec<(Vec<Slot>, OwnerReply)>,
}

impl StartedProduce {
    /// Waits for every owner and puts the response together in request order.
    pub async fn finish(self) -> ProduceResponse {
        let StartedProduce {
            mut response,
            replies,
        } = self;
        // Owners work concurrently whatever order they are waited in: a remote owner
        // runs without being polled. This shard's own share is first in `replies` and
        // must be: it runs only when polled, and it holds tickets of this shard's
        // partitions that other requests, remote ones included, wait behind. Polled
        // after a remote reply, two requests naming partitions of two shards in
        // opposite orders (one from each shard) would each wait for the other's
        // remote share forever.
        let mut answered = Vec::with_capacity(replies.len());
        for (slots, reply) in replies {
            answered.push((slots, reply.await));
        }
        place_replies(
            answered,
            |reply| match reply {
                ShardReply::Produce(results) => Ok(results),
                other => Err(other),
            },
            Err,
            |(topic_index, partition_index), result| {
                response.topics[topic_index].partitions[partition_index].result = result;
            },
        );
        response
    }
}

async fn start_produce(shard: &Rc<Shard>, request: ProduceRequest) -> StartedProduce {
    let timeout = match request.timeout_ms {
        0 => PRODUCE_TIMEOUT_DEFAULT,
        milliseconds => Duration::from_millis(u64::from(milliseconds)),
    };
    let batch_bytes_max = shard.config.batch_bytes_max();
    let now_ms = crate::storage::now_ms();
    let mut response = ProduceResponse {
        topics: Vec::with_capacity(request.topics.len()),
    };
    let mut split = Split::new();
    for (topic_index, topic) in request.topics.into_iter().enumerate() {
        let route = TopicRoute::new(shard, &topic.name);
        let mut partitions = Vec::with_capacity(topic.partitions.len());
        for (partition_index, entry) in topic.partitions.into_iter().enumerate() {
            // Validation happens here, on the receiving shard, so a bad batch never
            // costs its owner anything and CRC work spreads over every core.
            let checked = route.check(entry.partition).and_then(|owner| {
                if entry.batch.len() > batch_bytes_max {
                    return Err(WireError::new(
                        ErrorCode::InvalidBatch,
                        format!(
                            "batch of {} bytes exceeds the largest batch, {batch_bytes_max} bytes (chunk_size_bytes minus 4096)",
                            entry.batch.len()
                        ),
                    ));
                }
                let header = validate_batch(&entry.batch, shard.config.batch_records_max)
                    .map_err(batch_error)?;
                check_timestamps(&header, now_ms, shard.config.timestamp_future_ms_max)?;
                Ok(owner)
            });
            let result = match checked {
                Ok(owner) => {
                    split.push(
                        owner,
                        (topic_index, partition_index),
                        ProduceItem {
                            topic: Arc::clone(&route.name),
                            partition: entry.partition,
                            batch: entry.batch,
                        },
                    );
                    // Filled in below from the owner's reply.
                    Ok(0)
                }
                Err(error) => Err(error),
            };
            partitions.push(ProducePartitionResult {
                partition: entry.partition,
                result,
            });
        }
        response.topics.push(ProduceTopicResult {
            name: topic.name,
            partitions,
        });
    }
    let mut replies: Vec<(Vec<Slot>, OwnerReply)> = Vec::with_capacity(split.groups.len());
    for (owner, slots, items) in split.groups {
        let request = ShardRequest::Produce {
            acks: request.acks,
            timeout,
            items,
        };
        if owner == shard.id {
            // Admitted here and now; appends when the request's task polls it, which it
            // does first (see `StartedProduce::finish`).
            replies.insert(0, (slots, shard.begin(request)));
        } else {
            // Admitted by the owner when it takes the request off the mesh.
            let reply: OwnerReply = Box::pin(shard.send(owner, request).await.reply());
            replies.push((slots, reply));
        }
    }
    StartedProduce { response, replies }
}

/// Whether a fetch reply has something to tell the consumer: data or an error.
fn has_news(reply: &ShardReply) -> bool {
    match reply {
        ShardReply::Fetch(results) => results.iter().any(|data| {
            data.batches
                .as_ref()
                .map_or(true, |batches| !batches.is_empty())
        }),
        _ => true,
    }
}

/// Puts each owner's results into their slots of the response. A group whose owner
/// failed (or answered the wrong kind of reply) fails in every one of its slots.
fn place_replies<T: Clone>(
    replies: Vec<(Vec<Slot>, ShardReply)>,
    unpack: impl Fn(ShardReply) -> Result<Vec<T>, ShardReply>,
    refused: impl Fn(WireError) -> T,
    mut place: impl FnMut(Slot, T),
) {
    for (slots, reply) in replies {
        let results = match unpack(reply) {
            Ok(results) => results,
            Err(ShardReply::Done(Err(error))) => vec![refused(error); slots.len()],
            Err(other) => vec![refused(unexpected(&other)); slots.len()],
        };
        assert_eq!(
            results.len(),
            slots.len(),
            "an owner answers every item it was given"
        );
        for (slot, result) in slots.into_iter().zip(results) {
            place(slot, result);
        }
    }
}

fn unexpected(reply: &ShardReply) -> WireError {
    WireError::new(
        ErrorCode::Internal,
        format!("unexpected shard reply {reply:?}"),
    )
}

/// Sends each owner its group concurrently and collects `(slots, reply)` pairs.
async fn run_groups<T: 'static>(
    shard: &Rc<Shard>,
    split: Split<T>,
    make: impl Fn(Vec<T>) -> ShardRequest,
) -> Vec<(Vec<Slot>, ShardReply)> {
    let mut tasks = Vec::with_capacity(split.groups.len());
    for (owner, slots, items) in split.groups {
        let request = make(items);
        let shard = Rc::clone(shard);
        tasks.push((
            slots,
            glommio::spawn_local(async move { shard.route(owner, request).await }),
        ));
    }
    let mut replies = Vec::with_capacity(tasks.len());
    for (slots, task) in tasks {
        replies.push((slots, task.await));
    }
    replies
}

async fn fetch(shard: &Rc<Shard>, request: FetchRequest) -> FetchResponse {
    let wait = Duration::from_millis(u64::from(request.wait_ms_max));
    let mut response = FetchResponse {
        topics: Vec::with_capacity(request.topics.len()),
    };
    let mut split = Split::new();
    for (topic_index, topic) in request.topics.into_iter().enumerate() {
        let route = TopicRoute::new(shard, &topic.name);
        let mut partitions = Vec::with_capacity(topic.partitions.len());
        for (partition_index, entry) in topic.partitions.into_iter().enumerate() {
            let result = route.check(entry.partition).map(|owner| {
                split.push(
                    owner,
                    (topic_index, partition_index),
                    FetchItem {
                        topic: Arc::clone(&route.name),
                        partition: entry.partition,
                        offset: entry.offset,
                        bytes_max: entry.bytes_max,
                    },
                );
            });
            partitions.push(FetchPartitionResult {
                partition: entry.partition,
                // Filled in below from the owner's reply when the partition exists.
                data: match result {
                    Ok(()) => FetchPartitionData::refused(WireError::new(
                        ErrorCode::Internal,
                        "no reply from the owning shard",
                    )),
                    Err(error) => FetchPartitionData::refused(error),
                },
            });
        }
        response.topics.push(FetchTopicResult {
            name: topic.name,
            partitions,
        });
    }
    // Fairness: the byte budget is spent starting at a different entry each fetch (the
    // entries are taken in request order from there, wrapping around), so a partition
    // late in the list makes progress even when the ones before it always have more
    // than the budget. Each owner reads its items in the order it gets them: rotate
    // every group to begin at its first entry at or after the starting one.
    let entries: Vec<usize> = response
        .topics
        .iter()
        .map(|topic| topic.partitions.len())
        .collect();
    let entries_total: usize = entries.iter().sum();
    let start = match entries_total {
        0 => 0,
        total => (shard.next_fetch_rotation() % total as u64) as usize,
    };
    let topic_starts: Vec<usize> = entries
        .iter()
        .scan(0, |next, count| {
            let first = *next;
            *next += count;
            Some(first)
        })
        .collect();
    for (_, slots, items) in &mut split.groups {
        let first = slots
            .iter()
            .position(|(topic, partition)| topic_starts[*topic] + partition >= start)
            .unwrap_or(0);
        slots.rotate_left(first);
        items.rotate_left(first);
    }
    // One owner: it long-polls itself. Several: a first pass that does not wait, and only
    // if nothing at all is readable a second pass that waits, so one idle shard cannot
    // hold back data another shard already has.
    let several = split.groups.len() > 1;
    let bytes_max = request.bytes_max;
    let groups: Vec<_> = split
        .groups
        .iter()
        .map(|(owner, slots, items)| (*owner, slots.clone(), items.clone()))
        .collect();
    let first_wait = if several { Duration::ZERO } else { wait };
    let mut replies = run_groups(shard, split, |items| ShardRequest::Fetch {
        wait: first_wait,
        bytes_max,
        items,
    })
    .await;
    let anything = replies.iter().any(|(_, reply)| has_news(reply));
    if several && !anything && !wait.is_zero() {
        replies = wait_for_first(shard, groups, wait, bytes_max).await;
    }
    place_replies(
        replies,
        |reply| match reply {
            ShardReply::Fetch(results) => Ok(results),
            other => Err(other),
        },
        FetchPartitionData::refused,
        |(topic_index, partition_index), data| {
            response.topics[topic_index].partitions[partition_index].data = data;
        },
    );
    trim_to_budget(
        &mut response,
        bytes_max.min(shard.config.fetch_bytes_max) as usize,
        start,
    );
    for topic in &response.topics {
        for partition in &topic.partitions {
            if let Ok(batches) = &partition.data.batches {
                shard
                    .metrics
                    .fetched(&topic.name, partition.partition, batches, || {
                        shard.partition_count(&topic.name).is_some()
                    });
            }
        }
    }
    response
}

/// What a fetch is reserved on its connection's and shard's byte budgets before it runs
/// (invariant 6): the memory it may hold until its answer is encoded, on every shard it
/// reaches. Each owning shard reads its own items one at a time, and stops once it has
/// `bytes_max` (capped by `fetch_bytes_max`) or, before that, after a read that brought
/// one batch past what was left; each read returns at most its budget or one whole
/// batch. So an owner holds at most
///   min(bytes_max + batch, sum over its items of max(item bytes_max, batch))
/// of batches, plus the window of the one disk read it has running
/// (`storage::read_window_bytes_max`). The owners work at once, and the answer is cut to
/// `bytes_max` (`trim_to_budget`) only once all have replied, so each owner is counted.
/// Add the entries' framing. Entries of unknown topics or partitions cost their framing
/// only. Once the answer is encoded the lease shrinks to its length.
pub fn fetch_bytes_reserved(shard: &Shard, request: &FetchRequest) -> u64 {
    let config = &shard.config;
    let bytes_max = u64::from(request.bytes_max.min(config.fetch_bytes_max));
    let batch_bytes_max = config.batch_bytes_max() as u64;
    // Per owning shard: batches it may return, and its largest read budget.
    let mut owners: Vec<Option<(u64, u64)>> = vec![None; usize::from(shard.count)];
    let mut entries = 0u64;
    for topic in &request.topics {
        let route = TopicRoute::new(shard, &topic.name);
        for entry in &topic.partitions {
            entries += 1;
            let Ok(owner) = route.check(entry.partition) else {
                continue;
            };
            let read_budget = u64::from(entry.bytes_max).min(bytes_max).max(1);
            let (batches, largest) = owners[usize::from(owner)].get_or_insert((0, 0));
            *batches = batches.saturating_add(read_budget.max(batch_bytes_max));
            *largest = (*largest).max(read_budget);
        }
    }
    let held: u64 = owners
        .into_iter()
        .flatten()
        .map(|(batches, largest)| {
            owner_bytes_reserved(
                batches,
                largest,
                bytes_max,
                batch_bytes_max,
                config.index_interval_bytes,
            )
        })
        .sum();
    held + entries * 64 + 4096
}

/// One owning shard's part of a fetch's reservation: the batches it may return (at most
/// `batches`, the sum over its items of max(item budget, batch), and at most `bytes_max`
/// plus one batch) and the window of a disk read of `largest_read` bytes.
fn owner_bytes_reserved(
    batches: u64,
    largest_read: u64,
    bytes_max: u64,
    batch_bytes_max: u64,
    index_interval_bytes: u32,
) -> u64 {
    batches.min(bytes_max + batch_bytes_max)
        + read_window_bytes_max(largest_read, index_interval_bytes, batch_bytes_max)
}

/// Each owner applies `bytes_max` to its own partitions; across owners the total can be
/// larger. Walking the response in request order from entry `start` (wrapping around),
/// data past the budget is dropped (the partition reads as empty at its watermark and
/// the consumer fetches it next time), but the first partition with data always keeps
/// it, so a large batch cannot stall anyone.
fn trim_to_budget(response: &mut FetchResponse, bytes_max: usize, start: usize) {
    let mut entries: Vec<&mut FetchPartitionData> = response
        .topics
        .iter_mut()
        .flat_map(|topic| {
            topic
                .partitions
                .iter_mut()
                .map(|partition| &mut partition.data)
        })
        .collect();
    let count = entries.len();
    entries.rotate_left(start.min(count));
    let mut used = 0usize;
    for data in entries {
        if let Ok(batches) = &mut data.batches {
            if used > 0 && used + batches.len() > bytes_max {
                *batches = bytes::Bytes::new();
            }
            used += batches.len();
        }
    }
}

/// Long-polls every owner at once and answers as soon as one of them has data. Owners
/// still waiting then are asked again without waiting, so every partition gets a real
/// answer; their abandoned long-polls end by themselves at the deadline.
async fn wait_for_first(
    shard: &Rc<Shard>,
    groups: Vec<Group<FetchItem>>,
    wait: Duration,
    bytes_max: u32,
) -> Vec<(Vec<Slot>, ShardReply)> {
    use futures_lite::StreamExt;
    let (sender, mut receiver) = futures_channel::mpsc::unbounded();
    // Kept, not detached: dropping these at the end cancels the long-polls still
    // running, here and (through the dropped reply channel) on their owners.
    let mut polls = Vec::with_capacity(groups.len());
    for (index, (owner, _, items)) in groups.iter().enumerate() {
        let shard = Rc::clone(shard);
        let sender = sender.clone();
        let request = ShardRequest::Fetch {
            wait,
            bytes_max,
            items: items.clone(),
        };
        let owner = *owner;
        polls.push(glommio::spawn_local(async move {
            let reply = shard.route(owner, request).await;
            let _ = sender.unbounded_send((index, reply));
        }));
    }
    drop(sender);
    let mut replies: Vec<Option<ShardReply>> = groups.iter().map(|_| None).collect();
    while let Some((index, reply)) = receiver.next().await {
        let has_data = has_news(&reply);
        replies[index] = Some(reply);
        if has_data {
            break;
        }
    }
    drop(polls);
    let mut answered = Vec::with_capacity(groups.len());
    for ((owner, slots, items), reply) in groups.into_iter().zip(replies) {
        let reply = match reply {
            Some(reply) => reply,
            None => {
                shard
                    .route(
                        owner,
                        ShardRequest::Fetch {
                            wait: Duration::ZERO,
                            bytes_max,
                            items,
                        },
                    )
                    .await
            }
        };
        answered.push((slots, reply));
    }
    answered
}

/// A receive: asks each shard owning partitions of the topic in turn (from a different
/// one each time, for fairness) for what is left of `messages_max`; with nothing
/// available, long-polls every owner until one has something or `wait_ms` passes, then
/// asks again. Never more than `messages_max` (capped by `queue_receive_messages_max`)
/// in all.
/// What a received message weighs against `queue_receive_bytes_max`: the same measure
/// the owner leases by (key, value and headers).
fn received_size(message: &crate::protocol::queue::ReceivedMessage) -> u64 {
    let key = message.key.as_ref().map_or(0, |key| key.len());
    let headers: usize = message
        .headers
        .iter()
        .map(|(name, value)| name.len() + value.len())
        .sum();
    (key + message.value.len() + headers) as u64
}

async fn receive(
    shard: &Rc<Shard>,
    request: ReceiveRequest,
    caller: &Caller<'_>,
) -> Result<ReceiveResponse, WireError> {
    validate_group_name(&request.group)?;
    if request.messages_max == 0 {
        return Err(WireError::new(
            ErrorCode::InvalidRequest,
            "receive with messages_max 0: ask for at least one message",
        ));
    }
    let route = TopicRoute::new(shard, &request.topic);
    let Some(partitions) = route.partitions else {
        return Err(route.unknown.clone().expect("set for an unknown topic"));
    };
    let messages_max = request
        .messages_max
        .min(shard.config.queue_receive_messages_max);
    let mut owners = route.owners(partitions)?;
    if !owners.is_empty() {
        let start = (shard.next_fetch_rotation() % owners.len() as u64) as usize;
        owners.rotate_left(start);
    }
    let visibility_timeout_ms =
        (request.visibility_timeout_ms > 0).then_some(u64::from(request.visibility_timeout_ms));
    let wait = Duration::from_millis(u64::from(
        request.wait_ms.min(shard.config.fetch_wait_ms_max),
    ));
    let deadline = std::time::Instant::now() + wait;
    let bytes_max = shard.config.queue_receive_bytes_max;
    loop {
        let mut messages = Vec::new();
        let mut bytes: u64 = 0;
        let mut first_error = None;
        if caller.gone.is_some_and(Event::is_set) {
            // The client left while its long-poll waited: nothing may be leased for it.
            return Ok(ReceiveResponse { messages });
        }
        for &owner in &owners {
            let remaining = messages_max - messages.len() as u32;
            if remaining == 0 || bytes >= bytes_max {
                break;
            }
            let reply = shard
                .route(
                    owner,
                    ShardRequest::QueueReceive {
                        topic: request.topic.clone(),
                        group: request.group.clone(),
                        messages_max: remaining,
                        bytes_max: bytes_max - bytes,
                        oversized_first: messages.is_empty(),
                        visibility_timeout_ms,
                        holder: caller.holder,
                    },
                )
                .await;
            match reply {
                ShardReply::QueueReceive(Ok(received)) => {
                    assert!(
                        received.len() as u32 <= remaining,
                        "an owner hands out at most what it was asked for"
                    );
                    bytes = received
                        .iter()
                        .map(received_size)
                        .fold(bytes, u64::saturating_add);
                    messages.extend(received);
                }
                ShardReply::QueueReceive(Err(error)) | ShardReply::Done(Err(error)) => {
                    first_error.get_or_insert(error);
                }
                other => {
                    first_error.get_or_insert(unexpected(&other));
                }
            }
        }
        if !messages.is_empty() {
            // Leased already: handed out even if another owner failed.
            messages.sort_by_key(|message| (message.handle.partition, message.handle.offset));
            return Ok(ReceiveResponse { messages });
        }
        if let Some(error) = first_error {
            return Err(error);
        }
        let now = std::time::Instant::now();
        if now >= deadline || caller.gone.is_some_and(Event::is_set) || shard.is_shutting_down() {
            return Ok(ReceiveResponse { messages });
        }
        let waited = wait_until_receivable(shard, &owners, &request, deadline - now, caller).await;
        if !waited {
            // The client left: nothing to answer to, and nothing leased for it.
            return Ok(ReceiveResponse {
                messages: Vec::new(),
            });
        }
    }
}

/// Long-polls every owner at once until one says the group has something for it (or
/// the wait ends). False when the client left meanwhile; the owners' polls are then
/// cancelled (dropping them sends the mesh Cancel).
async fn wait_until_receivable(
    shard: &Rc<Shard>,
    owners: &[ShardId],
    request: &ReceiveRequest,
    wait: Duration,
    caller: &Caller<'_>,
) -> bool {
    use futures_lite::StreamExt;
    let (sender, mut receiver) = futures_channel::mpsc::unbounded();
    // Kept, not detached: dropping them at the end cancels the polls still running.
    let mut polls = Vec::with_capacity(owners.len());
    for &owner in owners {
        let shard = Rc::clone(shard);
        let sender = sender.clone();
        let poll = ShardRequest::QueueWait {
            topic: request.topic.clone(),
            group: request.group.clone(),
            wait,
        };
        polls.push(glommio::spawn_local(async move {
            let _ = shard.route(owner, poll).await;
            let _ = sender.unbounded_send(());
        }));
    }
    drop(sender);
    let answered = futures_lite::future::or(
        async {
            let _ = receiver.next().await;
            true
        },
        async {
            match caller.gone {
                Some(gone) => {
                    gone.wait().await;
                    false
                }
                None => std::future::pending().await,
            }
        },
    )
    .await;
    drop(polls);
    answered
}

/// Ack, nack or extend: the handles are split by owning shard; each owner answers with
/// the handles it refused. Handles of an unknown topic or partition are refused here.
async fn settle(shard: &Rc<Shard>, request: SettleRequest) -> Result<SettleResponse, WireError> {
    validate_group_name(&request.group)?;
    let handles_total: u64 = request
        .ranges
        .iter()
        .map(|range| u64::from(range.count))
        .sum();
    let handles_max = shard.config.queue_handles_per_request_max;
    if handles_total > u64::from(handles_max) {
        return Err(WireError::new(
            ErrorCode::LimitExceeded,
            format!(
                "the request names {handles_total} handles, more than queue_handles_per_request_max ({handles_max})"
            ),
        ));
    }
    let action = match request.action {
        SettleAction::Nack { delay, reason } => {
            // Cut here, so the owner's copy is bounded too (at a character boundary).
            let mut end = reason
                .len()
                .min(usize::from(shard.config.queue_nack_reason_bytes_max));
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            SettleAction::Nack {
                delay,
                reason: reason[..end].to_owned(),
            }
        }
        other => other,
    };
    let route = TopicRoute::new(shard, &request.topic);
    let mut refused = Vec::new();
    let mut by_owner: Vec<(ShardId, Vec<Handle>)> = Vec::new();
    for range in &request.ranges {
        match route.check(range.partition) {
            Err(error) => refused.extend(range.handles().map(|handle| RefusedHandle {
                handle,
                error: error.clone(),
            })),
            Ok(owner) => {
                let at = match by_owner.iter().position(|(shard, _)| *shard == owner) {
                    Some(at) => at,
                    None => {
                        by_owner.push((owner, Vec::new()));
                        by_owner.len() - 1
                    }
                };
                by_owner[at].1.extend(range.handles());
            }
        }
    }
    let mut tasks = Vec::with_capacity(by_owner.len());
    for (owner, handles) in by_owner {
        let shard = Rc::clone(shard);
        let settle = ShardRequest::QueueSettle {
            topic: request.topic.clone(),
            group: request.group.clone(),
            action: action.clone(),
            handles: handles.clone(),
        };
        tasks.push((
            handles,
            glommio::spawn_local(async move { shard.route(owner, settle).await }),
        ));
    }
    for (handles, task) in tasks {
        match task.await {
            ShardReply::QueueSettle(owner_refused) => refused.extend(owner_refused),
            ShardReply::Done(Err(error)) => {
                refused.extend(handles.into_iter().map(|handle| RefusedHandle {
                    handle,
                    error: error.clone(),
                }))
            }
            other => {
                let error = unexpected(&other);
                refused.extend(handles.into_iter().map(|handle| RefusedHandle {
                    handle,
                    error: error.clone(),
                }));
            }
        }
    }
    refused.sort_by_key(|refusal| (refusal.handle.partition, refusal.handle.offset));
    Ok(SettleResponse { refused })
}

/// The topic's groups (queue and stream), merged across the owning shards: groups by
/// name (then kind), partitions ascending.
async fn describe_groups(
    shard: &Rc<Shard>,
    request: DescribeGroupsRequest,
) -> Result<DescribeGroupsResponse, WireError> {
    if !request.group.is_empty() {
        validate_group_name(&request.group)?;
    }
    let route = TopicRoute::new(shard, &request.topic);
    let Some(partitions) = route.partitions else {
        return Err(route.unknown.clone().expect("set for an unknown topic"));
    };
    let owners = route.owners(partitions)?;
    let mut tasks = Vec::with_capacity(owners.len());
    for owner in owners {
        let shard = Rc::clone(shard);
        let describe = ShardRequest::DescribeGroups {
            topic: request.topic.clone(),
            group: request.group.clone(),
        };
        tasks.push(glommio::spawn_local(async move {
            shard.route(owner, describe).await
        }));
    }
    let mut groups: std::collections::BTreeMap<(String, u8), GroupDescription> =
        std::collections::BTreeMap::new();
    for task in tasks {
        let described = match task.await {
            ShardReply::DescribeGroups(described) => described?,
            ShardReply::Done(Err(error)) => return Err(error),
            other => return Err(unexpected(&other)),
        };
        for (name, kind, partition) in described {
            groups
                .entry((name.clone(), kind as u8))
                .or_insert_with(|| GroupDescription {
                    name,
                    kind,
                    partitions: Vec::new(),
                })
                .partitions
                .push(partition);
        }
    }
    let groups = groups
        .into_values()
        .map(|mut group| {
            group
                .partitions
                .sort_by_key(|partition| partition.partition);
            group
        })
        .collect();
    Ok(DescribeGroupsResponse { groups })
}

/// Sets a queue group's own settings on every shard owning a partition of the topic (each
/// creates the group on its partitions if missing); the first refusal is the answer.
async fn alter_group(shard: &Rc<Shard>, request: AlterGroupRequest) -> Result<(), WireError> {
    validate_group_name(&request.group)?;
    // Refused here too, before any owner creates the group.
    queue_settings::check_group_settings(&request.settings)?;
    let route = TopicRoute::new(shard, &request.topic);
    let Some(partitions) = route.partitions else {
        return Err(route.unknown.clone().expect("set for an unknown topic"));
    };
    let owners = route.owners(partitions)?;
    let mut tasks = Vec::with_capacity(owners.len());
    for owner in owners {
        let shard = Rc::clone(shard);
        let alter = ShardRequest::AlterGroup {
            topic: request.topic.clone(),
            group: request.group.clone(),
            settings: request.settings.clone(),
        };
        tasks.push(glommio::spawn_local(async move {
            shard.route(owner, alter).await
        }));
    }
    let mut first_error = None;
    for task in tasks {
        // Every owner's answer is awaited: none is left running unseen.
        if let Err(error) = into_done(task.await) {
            first_error.get_or_insert(error);
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Worked examples of a fetch's reservation on one owner (1 MiB chunks: batches up to
    /// 1 MiB - 4 KiB; index entries every 4 KiB).
    #[test]
    fn an_owner_is_reserved_its_batches_and_one_read_window() {
        let batch = MIB - 4096;
        let window_extra = 4096 + crate::protocol::batch::BATCH_HEADER_SIZE as u64 + 2 * 4096;
        // One partition asking 16 MiB of a 16 MiB fetch: 16 MiB of batches and a 4 MiB
        // window.
        assert_eq!(
            owner_bytes_reserved(16 * MIB, 16 * MIB, 16 * MIB, batch, 4096),
            16 * MIB + 4 * MIB + window_extra
        );
        // Thirty-two partitions of 1 MiB each in a 4 MiB fetch: the fetch's limit plus
        // the batch the last read may bring past it; a 1 MiB window.
        assert_eq!(
            owner_bytes_reserved(32 * MIB, MIB, 4 * MIB, batch, 4096),
            4 * MIB + batch + MIB + window_extra
        );
        // One partition asking 1 KiB: a whole batch still comes back, and a read is at
        // least 64 KiB, or one batch when a batch runs past it.
        assert_eq!(
            owner_bytes_reserved(batch, 1024, 16 * MIB, batch, 4096),
            batch + batch + 2 * 4096
        );
    }
}
