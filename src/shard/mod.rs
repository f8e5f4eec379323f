//! The per-core shard: owns partitions outright, executes work for them, and routes work
//! for partitions it does not own to their owner.
//!
//! Runs on exactly one glommio executor pinned to one CPU. Every field is `Rc`/`RefCell`
//! and never leaves the thread: only the owning shard mutates a partition (invariant 4).
//! Work for another shard travels as a `MeshMessage` over glommio's channel mesh and the
//! answer comes back the same way, matched by request id; the shard that received the
//! client's request writes the response.
//!
//! Topics. Every shard keeps its own copy of the topic catalog (name -> partition count),
//! so routing needs no lock and no hop. Shard 0 coordinates changes: it persists the
//! topic's metadata, then tells every shard (itself included) to install or remove it, and
//! answers only when all have. Placement is `crate::placement::shard_for`.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_channel::oneshot;
use glommio::channels::channel_mesh::Senders;

pub mod append_order;
mod offsets;
pub mod queues;
pub mod stats;

use crate::config::ServerConfig;
use crate::placement::shard_for;
use crate::protocol::queue::{
    CommittedOffset, Handle, PurgedPartition, QueueSettings, ReceivedMessage, RefusedHandle,
    SettleAction, COMMITTED_NONE,
};
use crate::protocol::{
    quote_untrusted, validate_topic_name, Acks, ErrorCode, FetchPartitionData, PartitionOffsets,
    Retention, WireError, TIMESTAMP_EARLIEST, TIMESTAMP_LATEST,
};
use crate::server::data_dir::topics_directory;
use crate::storage::{
    ChunkBudget, DmaStorage, LogConfig, Notify, PartitionLog, StorageError, TailCache,
    ZeroFillBudget, ZeroFillConfig,
};
use append_order::{AppendOrder, AppendTicket};
use offsets::{CommitError, OffsetStore};

/// File in a topic's directory that records its partition count.
pub const TOPIC_METADATA_FILE: &str = "topic.meta";

pub type ShardId = u16;

/// One partition's share of a produce request.
#[derive(Debug, Clone)]
pub struct ProduceItem {
    /// Shared by every item of the topic: one request's entries never copy its name.
    pub topic: Arc<str>,
    pub partition: u32,
    pub batch: Bytes,
}

#[derive(Debug, Clone)]
pub struct ListOffsetsItem {
    pub topic: Arc<str>,
    pub partition: u32,
    pub timestamp_ms: i64,
}

/// What the catalog knows of a topic.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TopicConfig {
    pub partitions: u32,
    pub retention: Retention,
    /// The queue settings the topic set; `None` fields: the broker's `queue_*` keys.
    pub queue: QueueSettings,
    /// The name whose hash places the partitions (`placement::shard_for`); `None`: the
    /// topic's own. A DLQ the broker creates takes its source's, so that partition p of
    /// both lives on one shard and dead-lettering never crosses cores.
    pub placement: Option<String>,
    /// Set on a DLQ the broker created: its source topic. A DLQ has no DLQ of its own.
    pub dead_letter_source: Option<String>,
}

impl TopicConfig {
    /// The shard that owns `partition` of topic `name` with this config.
    pub fn owner(&self, name: &str, partition: u32, shard_count: u16) -> ShardId {
        shard_for(
            self.placement.as_deref().unwrap_or(name),
            partition,
            shard_count,
        )
    }
}

#[derive(Debug, Clone)]
pub struct FetchItem {
    pub topic: Arc<str>,
    pub partition: u32,
    pub offset: u64,
    pub bytes_max: u32,
}

/// Work a shard does on partitions (or topics) it owns.
#[derive(Debug)]
pub enum ShardRequest {
    Produce {
        acks: Acks,
        timeout: Duration,
        items: Vec<ProduceItem>,
    },
    Fetch {
        wait: Duration,
        bytes_max: u32,
        items: Vec<FetchItem>,
    },
    /// To shard 0: create a topic everywhere.
    CreateTopic { name: String, topic: TopicConfig },
    /// To shard 0: change a topic's retention (`None`: unchanged) and queue settings
    /// (`None` fields: unchanged) everywhere.
    AlterTopic {
        name: String,
        retention: Option<Retention>,
        queue: QueueSettings,
    },
    /// From shard 0 to every shard: take the topic's new config.
    UpdateTopic { name: String, topic: TopicConfig },
    /// Offsets by time (or earliest/latest) of owned partitions.
    ListOffsets { items: Vec<ListOffsetsItem> },
    /// To shard 0: delete a topic everywhere.
    DeleteTopic { name: String },
    /// From shard 0 to every shard: add to the catalog, open owned partitions.
    InstallTopic { name: String, topic: TopicConfig },
    /// From shard 0 to every shard: drop from the catalog, close and remove owned
    /// partitions.
    RemoveTopic { name: String },
    /// Queue group: lease up to `messages_max` messages from the owned partitions of
    /// `topic` (the group is created on first use).
    QueueReceive {
        topic: String,
        group: String,
        messages_max: u32,
        /// What is left of the receive's `queue_receive_bytes_max`.
        bytes_max: u64,
        /// Nothing was handed out yet: the first message goes even if larger.
        oversized_first: bool,
        visibility_timeout_ms: Option<u64>,
        holder: u64,
    },
    /// Queue group long-poll: answer once the group has something to hand out here, or
    /// after `wait`.
    QueueWait {
        topic: String,
        group: String,
        wait: Duration,
    },
    /// Queue group: ack, nack or extend handles of owned partitions.
    QueueSettle {
        topic: String,
        group: String,
        action: SettleAction,
        handles: Vec<Handle>,
    },
    /// The groups of `topic` (one, or every one when `group` is empty) on owned
    /// partitions.
    DescribeGroups { topic: String, group: String },
    /// Queue group: set the group's own settings (the retry delays; `None`: unchanged) on
    /// owned partitions, creating the group there if missing.
    AlterGroup {
        topic: String,
        group: String,
        settings: QueueSettings,
    },
    /// DLQ reconcile: which of `offsets` of (`source_topic`, `source_partition`) have a
    /// copy in partition `partition` of `dlq` appended from `from_ms` on.
    FindDeadLetters {
        dlq: String,
        partition: u32,
        source_topic: String,
        source_partition: u32,
        offsets: Vec<u64>,
        from_ms: u64,
    },
    /// A DLQ append answered "maybe appended" (Timeout): the partition's next offset, and
    /// once `durable_through` is given, whether every offset below it became durable
    /// within `wait`. What a retry waits for before it searches for the copy.
    DeadLetterEnd {
        dlq: String,
        partition: u32,
        durable_through: Option<u64>,
        wait: Duration,
    },
    /// Stream group commits on owned partitions: (partition, offset).
    CommitOffsets {
        topic: Arc<str>,
        group: Arc<str>,
        entries: Vec<(u32, u64)>,
    },
    /// Stream group positions of owned partitions.
    FetchCommitted {
        topic: Arc<str>,
        group: Arc<str>,
        partitions: Vec<u32>,
    },
    /// Deletes every stored record of the owned partitions of a topic.
    PurgeTopic {
        topic: Arc<str>,
        partitions: Vec<u32>,
    },
    /// This shard's stats, its owned partitions' of `topics` (all when empty), and what
    /// its connections fetched.
    Stats { topics: Vec<String> },
}

impl ShardRequest {
    /// Snake-case name of the variant, as metrics label mesh requests.
    pub fn kind(&self) -> &'static str {
        match self {
            ShardRequest::Produce { .. } => "produce",
            ShardRequest::Fetch { .. } => "fetch",
            ShardRequest::CreateTopic { .. } => "create_topic",
            ShardRequest::AlterTopic { .. } => "alter_topic",
            ShardRequest::UpdateTopic { .. } => "update_topic",
            ShardRequest::ListOffsets { .. } => "list_offsets",
            ShardRequest::DeleteTopic { .. } => "delete_topic",
            ShardRequest::InstallTopic { .. } => "install_topic",
            ShardRequest::RemoveTopic { .. } => "remove_topic",
            ShardRequest::QueueReceive { .. } => "queue_receive",
            ShardRequest::QueueWait { .. } => "queue_wait",
            ShardRequest::QueueSettle { .. } => "queue_settle",
            ShardRequest::DescribeGroups { .. } => "describe_groups",
            ShardRequest::AlterGroup { .. } => "alter_group",
            ShardRequest::FindDeadLetters { .. } => "find_dead_letters",
            ShardRequest::DeadLetterEnd { .. } => "dead_letter_end",
            ShardRequest::CommitOffsets { .. } => "commit_offsets",
            ShardRequest::FetchCommitted { .. } => "fetch_committed",
            ShardRequest::PurgeTopic { .. } => "purge_topic",
            ShardRequest::Stats { .. } => "stats",
        }
    }

    /// Reads that change nothing and may run long (a long-poll, a lookup by time): the
    /// asker may give up on them, and then the owner stops them.
    pub fn is_abandonable(&self) -> bool {
        matches!(
            self,
            ShardRequest::Fetch { .. }
                | ShardRequest::ListOffsets { .. }
                | ShardRequest::QueueWait { .. }
        )
    }
}

#[derive(Debug)]
pub enum ShardReply {
    Produce(Vec<Result<u64, WireError>>),
    Fetch(Vec<FetchPartitionData>),
    ListOffsets(Vec<Result<PartitionOffsets, WireError>>),
    QueueReceive(Result<Vec<ReceivedMessage>, WireError>),
    QueueSettle(Vec<RefusedHandle>),
    DescribeGroups(Result<Vec<queues::DescribedPartition>, WireError>),
    FoundDeadLetters(Result<Vec<u64>, WireError>),
    /// (next offset, durable through the offset asked for).
    DeadLetterEnd(Result<(u64, bool), WireError>),
    Done(Result<(), WireError>),
    /// One result per entry, in order.
    Commit(Vec<Result<(), WireError>>),
    Committed(Vec<Result<CommittedOffset, WireError>>),
    Purged(Vec<Result<PurgedPartition, WireError>>),
    Stats(
        crate::protocol::ShardStats,
        Vec<crate::protocol::PartitionStats>,
        Vec<stats::Fetched>,
    ),
}

/// What travels between shards. `Send` by construction: owned bytes and strings only.
///
/// Replies travel back as messages too, never through a channel shared between threads:
/// completing a futures oneshot from another thread wakes the waiting glommio task
/// through glommio 0.9's foreign-waker path, which races with the task's destruction
/// (seen as a segfault or a double free under cross-shard produce load). The mesh
/// notifies its receivers without touching another thread's task, so every waker here
/// is woken on its own thread.
pub enum MeshMessage {
    Request {
        id: u64,
        request: ShardRequest,
    },
    Reply {
        id: u64,
        reply: ShardReply,
    },
    /// The asking shard gave up on request `id` (a long-poll whose client left).
    Cancel {
        id: u64,
    },
}

/// The answer for a batch that was appended but whose durable wait failed. A full disk
/// leaves the batch queued, and it may still become durable: that is what Timeout says.
/// StorageFull is kept for refusals before append, so that a client can tell "not
/// written" from "maybe written" (protocol.md §6).
fn durable_wait_error(error: &StorageError, shutting_down: bool) -> WireError {
    match error {
        StorageError::NoSpace { detail, .. } => WireError::new(
            ErrorCode::Timeout,
            format!(
                "not durable: the disk is full ({detail}); the batch was appended and may still become durable"
            ),
        ),
        other => storage_to_wire(other, shutting_down),
    }
}

fn storage_to_wire(error: &StorageError, shutting_down: bool) -> WireError {
    let code = match error {
        StorageError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
        StorageError::BatchTooLarge { .. } => ErrorCode::InvalidBatch,
        // A partition closes for one of two reasons: the broker is stopping, or its topic
        // was deleted while the request was in flight.
        StorageError::Closed if shutting_down => ErrorCode::ShuttingDown,
        StorageError::Closed => ErrorCode::UnknownTopic,
        StorageError::NoSpace { .. } => ErrorCode::StorageFull,
        StorageError::OutOfOrderSequence(_) => ErrorCode::OutOfOrderSequence,
        StorageError::Io { .. } | StorageError::Corrupt { .. } | StorageError::Stopped { .. } => {
            ErrorCode::StorageError
        }
    };
    WireError::new(code, error.to_string())
}

pub struct Shard {
    pub id: ShardId,
    pub count: u16,
    pub config: ServerConfig,
    /// Port of every shard's own listener, by shard id.
    pub shard_ports: Vec<u16>,
    catalog: RefCell<BTreeMap<String, TopicConfig>>,
    logs: RefCell<HashMap<String, Vec<Option<Rc<PartitionLog>>>>>,
    /// The append line of every owned partition, beside `logs` (`append_order`).
    append_orders: RefCell<HashMap<String, Vec<Option<Rc<AppendOrder>>>>>,
    /// Stream groups' committed offsets of every owned partition, by (topic, partition).
    offset_stores: RefCell<HashMap<(String, u32), Rc<OffsetStore>>>,
    /// Shard 0 only: topics being created or deleted right now.
    topics_changing: RefCell<HashSet<String>>,
    budget: Rc<ChunkBudget>,
    /// The disk bandwidth this shard's partitions may spend zero-filling ahead of their
    /// writes (storage::zero_fill), shared by all of them.
    zero_fill_budget: Rc<ZeroFillBudget>,
    tail_cache: Rc<TailCache>,
    data_arrived: Rc<Notify>,
    mesh: Senders<MeshMessage>,
    /// Requests sent to other shards, by id: the owner and where its reply goes.
    awaiting: RefCell<HashMap<u64, (ShardId, oneshot::Sender<ShardReply>)>>,
    next_request_id: Cell<u64>,
    /// Abandonable requests from other shards running here, by (asker, id): how to stop
    /// each when its asker gives up.
    cancellable: RefCell<HashMap<(ShardId, u64), oneshot::Sender<()>>>,
    shutting_down: Cell<bool>,
    /// Requests accepted on this shard's connections whose response is not written yet
    /// (or, for acks=none, that have not finished): what a shutdown waits for.
    responses_owed: Cell<usize>,
    /// Counts fetches received here: where each starts spending its byte budget.
    fetch_rotation: Cell<u64>,
    /// The queue groups of owned partitions (`queues`).
    queues: queues::Queues,
    /// This shard's metric handles and registry (`stats`).
    pub metrics: stats::ShardMetrics,
    /// Bytes the shard's connections hold (set by the server once it has connections).
    connection_bytes: RefCell<Option<Box<dyn Fn() -> u64>>>,
}

impl Shard {
    pub fn new(
        id: ShardId,
        count: u16,
        config: ServerConfig,
        shard_ports: Vec<u16>,
        mesh: Senders<MeshMessage>,
        registry: Arc<crate::metrics::Registry>,
    ) -> Rc<Shard> {
        let budget = ChunkBudget::new(
            config.chunk_memory_bytes_per_shard_max,
            config.chunk_size_bytes,
        );
        let tail_cache = TailCache::new(config.tail_cache_bytes_per_shard);
        let zero_fill_budget =
            ZeroFillBudget::new(config.segment_zero_fill_bytes_per_second_per_shard);
        Rc::new(Shard {
            id,
            count,
            config,
            shard_ports,
            catalog: RefCell::new(BTreeMap::new()),
            logs: RefCell::new(HashMap::new()),
            append_orders: RefCell::new(HashMap::new()),
            offset_stores: RefCell::new(HashMap::new()),
            topics_changing: RefCell::new(HashSet::new()),
            budget,
            zero_fill_budget,
            tail_cache,
            data_arrived: Rc::new(Notify::new()),
            mesh,
            awaiting: RefCell::new(HashMap::new()),
            next_request_id: Cell::new(0),
            cancellable: RefCell::new(HashMap::new()),
            shutting_down: Cell::new(false),
            responses_owed: Cell::new(0),
            fetch_rotation: Cell::new(0),
            queues: queues::Queues::default(),
            metrics: stats::ShardMetrics::new(registry),
            connection_bytes: RefCell::new(None),
        })
    }

    /// Tells the shard how to read what its connections hold, for stats and metrics.
    pub fn set_connection_bytes(&self, read: Box<dyn Fn() -> u64>) {
        *self.connection_bytes.borrow_mut() = Some(read);
    }

    /// Bytes the shard's connections hold now (0 before they exist).
    pub fn connection_bytes_in_flight(&self) -> u64 {
        self.connection_bytes
            .borrow()
            .as_ref()
            .map_or(0, |read| read())
    }

    fn log_config(&self) -> LogConfig {
        LogConfig {
            segment_size_bytes: self.config.segment_size_bytes,
            preallocate_step_bytes: self.config.segment_preallocate_step_bytes,
            chunk_size_bytes: self.config.chunk_size_bytes,
            index_interval_bytes: self.config.index_interval_bytes,
            storage_full_retry: Duration::from_millis(u64::from(self.config.storage_full_retry_ms)),
            failure_policy: self.config.storage_failure_policy,
            recycle_segments: self.config.recycle_segments,
            producers_per_partition_max: self.config.producers_per_partition_max,
            producer_snapshot_interval_bytes: self.config.producer_snapshot_interval_bytes,
            zero_fill: ZeroFillConfig {
                lookahead_bytes: self.config.segment_zero_fill_lookahead_bytes,
                chunk_bytes: self.config.segment_zero_fill_chunk_bytes,
            },
            // At most CHUNK_SIZE_BYTES_MAX (1 GiB): validated, so it fits.
            dsync_write_bytes_max: self.config.segment_dsync_write_bytes_max as usize,
        }
    }

    /// The owner of a partition: placed by the topic's placement name (its own name
    /// unless it is a DLQ placed like its source).
    pub fn owner_of(&self, topic: &str, partition: u32) -> ShardId {
        match self.catalog.borrow().get(topic) {
            Some(config) => config.owner(topic, partition, self.count),
            None => shard_for(topic, partition, self.count),
        }
    }

    /// The name whose hash places `topic`'s partitions (dispatch hashes it once per
    /// request).
    pub fn placement_of(&self, topic: &str) -> Option<String> {
        self.catalog
            .borrow()
            .get(topic)
            .map(|config| config.placement.clone().unwrap_or_else(|| topic.to_owned()))
    }

    /// Partition count of a topic in this shard's copy of the catalog.
    pub fn partition_count(&self, topic: &str) -> Option<u32> {
        self.catalog
            .borrow()
            .get(topic)
            .map(|topic| topic.partitions)
    }

    pub fn topic(&self, name: &str) -> Option<TopicConfig> {
        self.catalog.borrow().get(name).cloned()
    }

    pub fn topics(&self) -> Vec<(String, TopicConfig)> {
        self.catalog
            .borrow()
            .iter()
            .map(|(name, topic)| (name.clone(), topic.clone()))
            .collect()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.get()
    }

    pub fn owe_response(&self) {
        self.responses_owed.set(self.responses_owed.get() + 1);
    }

    pub fn settle_responses(&self, count: usize) {
        let owed = self.responses_owed.get();
        assert!(count <= owed, "settling {count} responses, {owed} owed");
        self.responses_owed.set(owed - count);
    }

    /// A different number for each fetch this shard receives, so that successive fetches
    /// start spending their byte budget at successive partitions.
    pub fn next_fetch_rotation(&self) -> u64 {
        let rotation = self.fetch_rotation.get();
        self.fetch_rotation.set(rotation.wrapping_add(1));
        rotation
    }

    pub fn responses_owed(&self) -> usize {
        self.responses_owed.get()
    }

    fn wire_error(&self, error: &StorageError) -> WireError {
        storage_to_wire(error, self.is_shutting_down())
    }

    /// `<data_dir>/topics`, where every topic has its directory.
    fn topics_directory(&self) -> PathBuf {
        topics_directory(&self.config.data_dir)
    }

    fn partition_directory(&self, topic: &str, partition: u32) -> PathBuf {
        self.topics_directory()
            .join(topic)
            .join(partition.to_string())
    }

    /// Start-up: install every topic found on disk and open the partitions this shard
    /// owns (recovering them).
    ///
    /// Runs before the shard accepts connections or serves its mesh peers, so reading the
    /// catalog with blocking calls on the reactor stalls nobody; the partitions open
    /// through the same code as a topic created at run time (their directory calls on
    /// the blocking thread, their file I/O through io_uring).
    /// Recovers every topic in the catalog. `recovered` counts each partition this shard
    /// has opened (recovered), summed over shards for the start-up progress systemd shows.
    pub async fn load_topics(
        self: &Rc<Self>,
        recovered: &std::sync::atomic::AtomicU32,
    ) -> Result<RecoveredTotals, StorageError> {
        let mut totals = RecoveredTotals::default();
        // Every shard reads the catalog; shard 0 alone says what it skipped.
        let skipped = if self.id == 0 {
            SkippedDirectories::Log
        } else {
            SkippedDirectories::Ignore
        };
        for (name, mut topic) in read_topic_catalog(&self.topics_directory(), skipped)? {
            // Settings stored under larger limits than the broker's now are cut to them
            // (the topic keeps working); shard 0 says so, once per topic and key.
            let (fitted, cuts) = queues::settings::fit_to_limits(&topic.queue, &self.config);
            if self.id == 0 {
                for cut in cuts {
                    tracing::warn!(topic = %name, "topic {}: {cut}", quote_untrusted(&name));
                }
            }
            topic.queue = fitted;
            self.install_topic(&name, topic, Some((recovered, &mut totals)))
                .await?;
        }
        Ok(totals)
    }

    async fn install_topic(
        self: &Rc<Self>,
        name: &str,
        topic: TopicConfig,
        mut recovered: Option<(&std::sync::atomic::AtomicU32, &mut RecoveredTotals)>,
    ) -> Result<(), StorageError> {
        if self.topic(name).is_some() {
            // Already installed: a shard still loading topics at start-up may have read
            // this topic's metadata file before shard 0's install message reached it.
            return Ok(());
        }
        // A fault point for tests of what a shard panic does to the process (debug
        // builds only): the last shard panics when it installs the named topic.
        #[cfg(debug_assertions)]
        if self.id + 1 == self.count
            && std::env::var_os("SHARDQ_TEST_PANIC_ON_TOPIC").is_some_and(|topic| topic == name)
        {
            panic!(
                "test fault: shard {} panics installing topic {name:?}",
                self.id
            );
        }
        let partitions = topic.partitions;
        let mut owned = vec![None; partitions as usize];
        for partition in 0..partitions {
            if topic.owner(name, partition, self.count) == self.id {
                let opening = std::time::Instant::now();
                let opened = PartitionLog::open(
                    Rc::new(DmaStorage),
                    self.partition_directory(name, partition),
                    self.log_config(),
                    Rc::clone(&self.budget),
                    Rc::clone(&self.tail_cache),
                    Rc::clone(&self.data_arrived),
                    Rc::clone(&self.zero_fill_budget),
                )
                .await;
                match opened {
                    Ok(log) => {
                        log.set_metrics(self.metrics.partition(name, partition));
                        if let Some((recovered, totals)) = recovered.as_mut() {
                            recovered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            totals.add(self.id, name, partition, &log, opening.elapsed());
                        }
                        owned[partition as usize] = Some(log);
                    }
                    Err(error) => {
                        // Close what this install opened: each log's flusher holds its
                        // files open, so a create rolled back after this failure (a full
                        // disk, say) would otherwise keep their space until a restart.
                        for log in owned.into_iter().flatten() {
                            log.close().await;
                        }
                        return Err(error);
                    }
                }
            }
        }
        let mut stores = Vec::new();
        for log in owned.iter().flatten() {
            let directory = log.directory().to_path_buf();
            let groups_max = self.config.stream_groups_per_partition_max;
            match off_reactor(move || OffsetStore::open_blocking(&directory, groups_max)).await {
                Ok(store) => stores.push(Rc::new(store)),
                Err(error) => {
                    for log in owned.into_iter().flatten() {
                        log.close().await;
                    }
                    return Err(error);
                }
            }
        }
        // The queue groups of the owned partitions come back with them.
        for (partition, log) in owned.iter().enumerate() {
            if let Some(log) = log {
                if let Err(error) = self
                    .recover_queue_groups(name, partition as u32, log, &topic)
                    .await
                {
                    self.remove_queue_groups(name).await;
                    for log in owned.into_iter().flatten() {
                        log.close().await;
                    }
                    return Err(error);
                }
            }
        }
        {
            let mut offset_stores = self.offset_stores.borrow_mut();
            let partitions =
                (0..partitions).filter(|partition| owned[*partition as usize].is_some());
            for (partition, store) in partitions.zip(stores) {
                offset_stores.insert((name.to_owned(), partition), store);
            }
        }
        let topic_name: Arc<str> = Arc::from(name);
        let orders = (0..partitions)
            .map(|partition| {
                owned[partition as usize]
                    .is_some()
                    .then(|| AppendOrder::new(Arc::clone(&topic_name), partition))
            })
            .collect();
        self.append_orders
            .borrow_mut()
            .insert(name.to_owned(), orders);
        self.logs.borrow_mut().insert(name.to_owned(), owned);
        self.catalog.borrow_mut().insert(name.to_owned(), topic);
        Ok(())
    }

    async fn remove_topic(&self, name: &str) -> Result<(), WireError> {
        self.catalog.borrow_mut().remove(name);
        self.metrics.forget_topic(name);
        self.offset_stores
            .borrow_mut()
            .retain(|(topic, _), _| topic != name);
        // Their journals close before the directories go.
        self.remove_queue_groups(name).await;
        self.append_orders.borrow_mut().remove(name);
        let owned = self.logs.borrow_mut().remove(name).unwrap_or_default();
        for log in owned.into_iter().flatten() {
            log.close().await;
            let directory = log.directory().to_path_buf();
            drop(log);
            let removing = directory.clone();
            off_reactor(move || std::fs::remove_dir_all(removing))
                .await
                .map_err(|source| {
                    WireError::new(
                        ErrorCode::StorageError,
                        format!("removing {}: {source}", directory.display()),
                    )
                })?;
        }
        Ok(())
    }

    fn log(&self, topic: &str, partition: u32) -> Result<Rc<PartitionLog>, WireError> {
        let logs = self.logs.borrow();
        let Some(partitions) = logs.get(topic) else {
            return Err(WireError::new(
                ErrorCode::UnknownTopic,
                format!("topic {} does not exist", quote_untrusted(topic)),
            ));
        };
        match partitions.get(partition as usize) {
            Some(Some(log)) => Ok(Rc::clone(log)),
            Some(None) => Err(WireError::new(
                ErrorCode::Internal,
                format!(
                    "partition {partition} of {} is owned by shard {}, not shard {}",
                    quote_untrusted(topic),
                    self.owner_of(topic, partition),
                    self.id
                ),
            )),
            None => Err(WireError::new(
                ErrorCode::UnknownPartition,
                format!(
                    "topic {} has {} partitions, not {}",
                    quote_untrusted(topic),
                    partitions.len(),
                    partition + 1
                ),
            )),
        }
    }

    /// Closes every owned partition, flushing what is pending.
    pub async fn close_all(&self) {
        self.shutting_down.set(true);
        // Queue groups first: their journals are written out while the logs still
        // serve the reads they may be waiting on.
        self.close_queue_groups().await;
        let logs: Vec<Rc<PartitionLog>> = self
            .logs
            .borrow()
            .values()
            .flat_map(|partitions| partitions.iter().flatten().cloned())
            .collect();
        for log in logs {
            log.close().await;
        }
        self.data_arrived.notify_all();
    }

    /// Runs `request` on shard `owner`: directly when that is this shard, else over the
    /// mesh. The reply comes back to this shard either way.
    pub async fn route(self: &Rc<Self>, owner: ShardId, request: ShardRequest) -> ShardReply {
        if owner == self.id {
            // Boxed (`begin`): a topic change executes on shard 0, which routes to every
            // shard, itself included.
            return self.begin(request).await;
        }
        self.send(owner, request).await.reply().await
    }

    /// Starts `request` on this shard: a produce is admitted to its partitions' append
    /// lines now, in this synchronous step (`append_order`); the rest runs when the
    /// returned future is polled.
    pub fn begin(
        self: &Rc<Self>,
        request: ShardRequest,
    ) -> Pin<Box<dyn Future<Output = ShardReply>>> {
        match request {
            ShardRequest::Produce {
                acks,
                timeout,
                items,
            } => {
                let admitted = self.admit_produce(items);
                let shard = Rc::clone(self);
                Box::pin(async move {
                    ShardReply::Produce(shard.produce_owned(acks, timeout, admitted).await)
                })
            }
            request => Box::pin(Rc::clone(self).execute(request)),
        }
    }

    /// Hands `request` to shard `owner` over the mesh, waiting only for room in the
    /// channel; the reply is waited for with [`SentRequest::reply`]. Requests one task
    /// sends to one owner reach it, and are admitted there, in the order they were sent
    /// (the mesh channel between two shards is first in, first out).
    pub async fn send(self: &Rc<Self>, owner: ShardId, request: ShardRequest) -> SentRequest {
        assert_ne!(owner, self.id, "a shard runs its own work without the mesh");
        self.metrics.mesh_request(request.kind());
        let id = self.next_request_id.get();
        self.next_request_id.set(id + 1);
        let (sender, receiver) = oneshot::channel();
        self.awaiting.borrow_mut().insert(id, (owner, sender));
        // Dropped with the reply's future if the caller gives up before the reply:
        // forgets the request here and, for a long-poll, tells the owner to stop it.
        let forget = ForgetOnDrop {
            shard: Rc::clone(self),
            owner,
            id,
            cancel: request.is_abandonable(),
            armed: true,
        };
        if self
            .mesh
            .send_to(owner as usize, MeshMessage::Request { id, request })
            .await
            .is_err()
        {
            return SentRequest::Failed(failed_reply(WireError::new(
                ErrorCode::ShuttingDown,
                format!("shard {owner} is not accepting work"),
            )));
        }
        SentRequest::Sent {
            owner,
            receiver,
            forget,
        }
    }

    /// Admits a produce's items to their partitions' append lines, in item order: one
    /// ticket per item of a partition this shard owns (`None` for one it cannot append
    /// to, which fails at append with the reason).
    pub fn admit_produce(
        &self,
        items: Vec<ProduceItem>,
    ) -> Vec<(ProduceItem, Option<AppendTicket>)> {
        let orders = self.append_orders.borrow();
        items
            .into_iter()
            .map(|item| {
                let ticket = orders
                    .get(&*item.topic)
                    .and_then(|partitions| partitions.get(item.partition as usize))
                    .and_then(Option::as_ref)
                    .map(AppendOrder::take);
                (item, ticket)
            })
            .collect()
    }

    /// Serves what shard `peer` sends over the mesh until it stops sending: runs its
    /// requests (each in its own task) and answers them, hands replies to the requests
    /// waiting here, and stops long-polls it gave up on.
    pub async fn serve_peer(
        self: Rc<Self>,
        peer: ShardId,
        stream: glommio::channels::shared_channel::ConnectedReceiver<MeshMessage>,
    ) {
        while let Some(message) = stream.recv().await {
            match message {
                MeshMessage::Request { id, request } => {
                    // Registered before the task starts, so a Cancel right behind the
                    // request finds it.
                    let cancelled = request.is_abandonable().then(|| {
                        let (stop, stopped) = oneshot::channel();
                        self.cancellable.borrow_mut().insert((peer, id), stop);
                        stopped
                    });
                    let shard = Rc::clone(&self);
                    // Admitted now, in the order the mesh delivers: a produce's place in
                    // its partitions' append lines is the order its asker sent it in.
                    let work = self.begin(request);
                    glommio::spawn_local(async move {
                        let reply = match cancelled {
                            // A long-poll the asking shard gave up on stops here too,
                            // instead of holding memory until its deadline.
                            Some(stopped) => {
                                let reply =
                                    futures_lite::future::or(async { Some(work.await) }, async {
                                        let _ = stopped.await;
                                        None
                                    })
                                    .await;
                                shard.cancellable.borrow_mut().remove(&(peer, id));
                                reply
                            }
                            None => Some(work.await),
                        };
                        if let Some(reply) = reply {
                            // An asker that stopped no longer reads: nothing to tell.
                            let _ = shard
                                .mesh
                                .send_to(usize::from(peer), MeshMessage::Reply { id, reply })
                                .await;
                        }
                    })
                    .detach();
                }
                MeshMessage::Reply { id, reply } => {
                    // Absent when the request was given up on: the reply just goes.
                    let waiting = self.awaiting.borrow_mut().remove(&id);
                    if let Some((_, sender)) = waiting {
                        let _ = sender.send(reply);
                    }
                }
                MeshMessage::Cancel { id } => {
                    let running = self.cancellable.borrow_mut().remove(&(peer, id));
                    if let Some(stop) = running {
                        let _ = stop.send(());
                    }
                }
            }
        }
        // The peer has stopped: nothing it was asked will be answered.
        self.awaiting
            .borrow_mut()
            .retain(|_, (owner, _)| *owner != peer);
    }

    /// Executes work on the partitions this shard owns.
    pub async fn execute(self: Rc<Self>, request: ShardRequest) -> ShardReply {
        match request {
            // Admitted to the append lines in one place, `begin`.
            request @ ShardRequest::Produce { .. } => self.begin(request).await,
            ShardRequest::Fetch {
                wait,
                bytes_max,
                items,
            } => ShardReply::Fetch(self.fetch_owned(wait, bytes_max, items).await),
            ShardRequest::CreateTopic { name, topic } => {
                ShardReply::Done(self.coordinate_create(name, topic).await)
            }
            ShardRequest::AlterTopic {
                name,
                retention,
                queue,
            } => ShardReply::Done(self.coordinate_alter(name, retention, queue).await),
            ShardRequest::UpdateTopic { name, topic } => {
                self.update_queue_policies(&name, &topic);
                let mut catalog = self.catalog.borrow_mut();
                ShardReply::Done(match catalog.get_mut(&name) {
                    Some(installed) => {
                        *installed = topic;
                        Ok(())
                    }
                    None => Err(WireError::new(
                        ErrorCode::UnknownTopic,
                        format!("topic {name:?} does not exist"),
                    )),
                })
            }
            ShardRequest::ListOffsets { items } => {
                ShardReply::ListOffsets(self.list_offsets_owned(items).await)
            }
            ShardRequest::DeleteTopic { name } => {
                ShardReply::Done(self.coordinate_delete(name).await)
            }
            ShardRequest::InstallTopic { name, topic } => ShardReply::Done(
                self.install_topic(&name, topic, None)
                    .await
                    .map_err(|error| self.wire_error(&error)),
            ),
            ShardRequest::RemoveTopic { name } => ShardReply::Done(self.remove_topic(&name).await),
            ShardRequest::QueueReceive {
                topic,
                group,
                messages_max,
                bytes_max,
                oversized_first,
                visibility_timeout_ms,
                holder,
            } => ShardReply::QueueReceive(
                self.queue_receive_owned(
                    topic,
                    group,
                    (messages_max, bytes_max, oversized_first),
                    visibility_timeout_ms,
                    holder,
                )
                .await,
            ),
            ShardRequest::DeadLetterEnd {
                dlq,
                partition,
                durable_through,
                wait,
            } => ShardReply::DeadLetterEnd(
                self.dead_letter_end_owned(&dlq, partition, durable_through, wait)
                    .await,
            ),
            ShardRequest::QueueWait { topic, group, wait } => {
                self.queue_wait_owned(topic, group, wait).await;
                ShardReply::Done(Ok(()))
            }
            ShardRequest::QueueSettle {
                topic,
                group,
                action,
                handles,
            } => ShardReply::QueueSettle(
                self.queue_settle_owned(topic, group, action, handles).await,
            ),
            ShardRequest::DescribeGroups { topic, group } => {
                ShardReply::DescribeGroups(self.describe_groups_owned(&topic, &group))
            }
            ShardRequest::AlterGroup {
                topic,
                group,
                settings,
            } => ShardReply::Done(self.alter_group_owned(topic, group, settings).await),
            ShardRequest::FindDeadLetters {
                dlq,
                partition,
                source_topic,
                source_partition,
                offsets,
                from_ms,
            } => ShardReply::FoundDeadLetters(
                self.find_dead_letters_owned(
                    dlq,
                    partition,
                    source_topic,
                    source_partition,
                    offsets,
                    from_ms,
                )
                .await,
            ),
            ShardRequest::CommitOffsets {
                topic,
                group,
                entries,
            } => ShardReply::Commit(self.commit_owned(&topic, &group, entries).await),
            ShardRequest::FetchCommitted {
                topic,
                group,
                partitions,
            } => ShardReply::Committed(
                partitions
                    .into_iter()
                    .map(|partition| self.committed_owned(&topic, &group, partition))
                    .collect(),
            ),
            ShardRequest::PurgeTopic { topic, partitions } => {
                let mut results = Vec::with_capacity(partitions.len());
                for partition in partitions {
                    results.push(self.purge_owned(&topic, partition).await);
                }
                ShardReply::Purged(results)
            }
            ShardRequest::Stats { topics } => {
                let (shard, partitions, fetched) = self.stats(&topics);
                ShardReply::Stats(shard, partitions, fetched)
            }
        }
    }

    fn offset_store(&self, topic: &str, partition: u32) -> Result<Rc<OffsetStore>, WireError> {
        // The log lookup gives the right error for an unknown topic or partition.
        self.log(topic, partition)?;
        self.offset_stores
            .borrow()
            .get(&(topic.to_owned(), partition))
            .cloned()
            .ok_or_else(|| {
                WireError::new(
                    ErrorCode::Internal,
                    format!(
                        "partition {partition} of {} has no offset store on shard {}",
                        quote_untrusted(topic),
                        self.id
                    ),
                )
            })
    }

    async fn commit_owned(
        &self,
        topic: &str,
        group: &str,
        entries: Vec<(u32, u64)>,
    ) -> Vec<Result<(), WireError>> {
        let mut results = Vec::with_capacity(entries.len());
        for (partition, offset) in entries {
            results.push(self.commit_one(topic, group, partition, offset).await);
        }
        results
    }

    async fn commit_one(
        &self,
        topic: &str,
        group: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), WireError> {
        let store = self.offset_store(topic, partition)?;
        let high_watermark = self.log(topic, partition)?.high_watermark();
        if offset > high_watermark {
            return Err(WireError::new(
                ErrorCode::OffsetOutOfRange,
                format!(
                    "offset {offset} is past the high watermark {high_watermark} of partition {partition}"
                ),
            ));
        }
        store.commit(group, offset).await.map_err(|error| match error {
            CommitError::TooManyGroups { groups_max } => WireError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "partition {partition} of {} has {groups_max} stream groups, the most stream_groups_per_partition_max allows",
                    quote_untrusted(topic)
                ),
            ),
            CommitError::Storage(reason) => WireError::new(ErrorCode::StorageError, reason),
        })
    }

    fn committed_owned(
        &self,
        topic: &str,
        group: &str,
        partition: u32,
    ) -> Result<CommittedOffset, WireError> {
        let store = self.offset_store(topic, partition)?;
        let log = self.log(topic, partition)?;
        Ok(CommittedOffset {
            committed: store.committed(group).unwrap_or(COMMITTED_NONE),
            log_start_offset: log.log_start_offset(),
            high_watermark: log.high_watermark(),
        })
    }

    /// Every stream group's committed offset on an owned partition, by name; empty for a
    /// partition this shard does not own.
    pub fn stream_group_positions(&self, topic: &str, partition: u32) -> Vec<(String, u64)> {
        self.offset_stores
            .borrow()
            .get(&(topic.to_owned(), partition))
            .map(|store| store.groups())
            .unwrap_or_default()
    }

    async fn purge_owned(&self, topic: &str, partition: u32) -> Result<PurgedPartition, WireError> {
        let purged = self.purge_owned_unlogged(topic, partition).await;
        if let Ok(purged) = &purged {
            tracing::info!(
                shard = self.id,
                topic = %topic,
                partition,
                log_start_offset = purged.log_start_offset,
                "purged partition: every stored record deleted"
            );
        }
        purged
    }

    async fn purge_owned_unlogged(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<PurgedPartition, WireError> {
        let log = self.log(topic, partition)?;
        let before = log.log_start_offset();
        let log_start_offset = log.purge().await.map_err(|error| self.wire_error(&error))?;
        self.log_start_moved(topic, partition, log_start_offset);
        Ok(PurgedPartition {
            partition,
            records: log_start_offset - before,
            log_start_offset,
        })
    }

    /// The log start of an owned partition moved (retention or purge): what queue groups
    /// on it had not settled below it is gone.
    fn log_start_moved(&self, _topic: &str, _partition: u32, _log_start: u64) {
        // The pump tells each group of the partition (`QueueGroup::retention`) on its
        // next round, which this wakes.
        self.queue_log_start_moved();
    }

    async fn list_offsets_owned(
        &self,
        items: Vec<ListOffsetsItem>,
    ) -> Vec<Result<PartitionOffsets, WireError>> {
        let mut results = Vec::with_capacity(items.len());
        // Shared by the request's lookups by time on this shard: one request cannot make
        // it decode more than this, however many entries it lists.
        let mut scan_left = self.config.list_offsets_scan_bytes_max;
        for item in items {
            let log = match self.log(&item.topic, item.partition) {
                Ok(log) => log,
                Err(error) => {
                    results.push(Err(error));
                    continue;
                }
            };
            let offset = match item.timestamp_ms {
                TIMESTAMP_EARLIEST => Ok(log.log_start_offset()),
                TIMESTAMP_LATEST => Ok(log.high_watermark()),
                timestamp_ms if timestamp_ms < 0 => Err(WireError::new(
                    ErrorCode::InvalidRequest,
                    format!("timestamp {timestamp_ms} is neither a time nor -1 (latest) or -2 (earliest)"),
                )),
                timestamp_ms => match log
                    .offset_for_timestamp_bounded(timestamp_ms, scan_left)
                    .await
                {
                    Ok(lookup) => {
                        scan_left = scan_left.saturating_sub(lookup.scanned_bytes);
                        lookup.offset.ok_or_else(|| {
                            WireError::new(
                                ErrorCode::LimitExceeded,
                                format!(
                                    "the lookup by time would decode more than list_offsets_scan_bytes_max ({} bytes) for this request",
                                    self.config.list_offsets_scan_bytes_max
                                ),
                            )
                        })
                    }
                    Err(error) => Err(self.wire_error(&error)),
                },
            };
            results.push(offset.map(|offset| PartitionOffsets {
                offset,
                log_start_offset: log.log_start_offset(),
                high_watermark: log.high_watermark(),
            }));
        }
        results
    }

    /// Applies every owned partition's retention. Runs every
    /// `retention_check_interval_ms` on each shard.
    pub async fn apply_retention(&self) {
        let work: Vec<(Rc<PartitionLog>, Retention)> = {
            let catalog = self.catalog.borrow();
            let logs = self.logs.borrow();
            logs.iter()
                .filter_map(|(name, partitions)| {
                    let retention = catalog.get(name)?.retention;
                    (retention != Retention::default()).then_some((partitions, retention))
                })
                .flat_map(|(partitions, retention)| {
                    partitions
                        .iter()
                        .flatten()
                        .map(move |log| (Rc::clone(log), retention))
                })
                .collect()
        };
        for (log, retention) in work {
            match log
                .apply_retention(retention.bytes_max, retention.ms_max)
                .await
            {
                // The partition's queue groups hear of the new log start.
                Ok(removed) if removed > 0 => self.queue_log_start_moved(),
                Ok(_) => {}
                Err(error) => tracing::error!(
                    shard = self.id,
                    partition_directory = %log.directory().display(),
                    error = %error,
                    "applying retention: {error}"
                ),
            }
        }
    }

    /// Appends each admitted item in its partition's turn (`append_order`), then waits
    /// for the durability asked for. Only the appends are ordered: the durable waits of
    /// pipelined requests overlap, so one round can make many of them durable.
    pub async fn produce_owned(
        &self,
        acks: Acks,
        timeout: Duration,
        items: Vec<(ProduceItem, Option<AppendTicket>)>,
    ) -> Vec<Result<u64, WireError>> {
        // The timeout covers the whole request, backpressure and segment rolls included.
        let deadline = Instant::now() + timeout;
        let mut results = Vec::with_capacity(items.len());
        let mut durable_waits = Vec::new();
        for (index, (item, ticket)) in items.into_iter().enumerate() {
            let log = match self.log(&item.topic, item.partition) {
                Ok(log) => log,
                Err(error) => {
                    // Dropping the ticket gives its turn up.
                    results.push(Err(error));
                    continue;
                }
            };
            if let Some(ticket) = &ticket {
                ticket.turn().await;
            }
            let appended = log.append(&item.batch).await;
            if let Some(ticket) = ticket {
                ticket.appended();
            }
            match appended {
                Ok(outcome) => {
                    results.push(Ok(outcome.base_offset));
                    durable_waits.push((index, log, outcome.next_offset));
                }
                Err(error) => results.push(Err(self.wire_error(&error))),
            }
        }
        if acks == Acks::Durable {
            for (index, log, next_offset) in durable_waits {
                let remaining = deadline.saturating_duration_since(Instant::now());
                let outcome = glommio::timer::timeout(remaining, async {
                    Ok(log.wait_durable(next_offset).await)
                })
                .await;
                match outcome {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        results[index] = Err(durable_wait_error(&error, self.is_shutting_down()))
                    }
                    Err(_) => {
                        results[index] = Err(WireError::new(
                            ErrorCode::Timeout,
                            format!(
                                "not durable within {} ms; the batch was appended and may still become durable",
                                timeout.as_millis()
                            ),
                        ))
                    }
                }
            }
        }
        results
    }

    async fn fetch_owned(
        &self,
        wait: Duration,
        bytes_max: u32,
        items: Vec<FetchItem>,
    ) -> Vec<FetchPartitionData> {
        let wait = wait.min(Duration::from_millis(u64::from(
            self.config.fetch_wait_ms_max,
        )));
        let deadline = Instant::now() + wait;
        // Long-poll: wait until one of the partitions has something to read (or an error
        // to report), then read them all.
        loop {
            let listener = self.data_arrived.listen();
            let ready = items
                .iter()
                .any(|item| match self.log(&item.topic, item.partition) {
                    Ok(log) => log.high_watermark() != item.offset || self.is_shutting_down(),
                    Err(_) => true,
                });
            let now = Instant::now();
            if ready || now >= deadline {
                break;
            }
            // Counted while parked, for tests of abandoned long-polls (debug builds
            // only): a cancelled fetch drops the count with this future.
            #[cfg(debug_assertions)]
            let _parked = crate::test_hooks::FETCH_LONG_POLLS_PARKED.enter();
            let _ = glommio::timer::timeout(deadline - now, async {
                let _ = listener.await;
                Ok(())
            })
            .await;
        }
        let bytes_max = bytes_max.min(self.config.fetch_bytes_max) as usize;
        let mut used = 0usize;
        let mut results = Vec::with_capacity(items.len());
        for item in &items {
            let log = match self.log(&item.topic, item.partition) {
                Ok(log) => log,
                Err(error) => {
                    results.push(FetchPartitionData::refused(error));
                    continue;
                }
            };
            // Each partition gets at most its own limit and what the request has left;
            // a partition still returns one whole batch when it has one, so a batch
            // larger than the limits cannot stall a consumer.
            let left = bytes_max.saturating_sub(used);
            let batches = if left == 0 && used > 0 {
                // The request's budget is spent: report the partition's watermarks
                // without reading (a request naming one partition thousands of times
                // must not read a batch for each).
                Ok(Bytes::new())
            } else {
                let budget = (item.bytes_max as usize).min(left).max(1);
                log.read(item.offset, budget)
                    .await
                    .map_err(|error| self.wire_error(&error))
            };
            used += batches.as_ref().map_or(0, Bytes::len);
            // Sent with errors too: an OffsetOutOfRange carries the valid range.
            results.push(FetchPartitionData {
                log_start_offset: log.log_start_offset(),
                high_watermark: log.high_watermark(),
                batches,
            });
        }
        results
    }

    fn validate_new_topic(&self, name: &str, topic: &TopicConfig) -> Result<(), WireError> {
        let partitions = topic.partitions;
        validate_topic_name(name)?;
        queues::settings::validate(name, &topic.queue, &self.config)?;
        self.validate_dead_letter_target(name, topic)?;
        if partitions == 0 || partitions > self.config.partitions_per_topic_max {
            return Err(WireError::new(
                ErrorCode::InvalidPartitionCount,
                format!(
                    "a topic has 1 to {} partitions (partitions_per_topic_max), not {partitions}",
                    self.config.partitions_per_topic_max
                ),
            ));
        }
        if self.catalog.borrow().contains_key(name) || self.topics_changing.borrow().contains(name)
        {
            return Err(WireError::new(
                ErrorCode::TopicAlreadyExists,
                format!("topic {name:?} already exists"),
            ));
        }
        // A topic being altered is in both sets; count it once.
        let topics = {
            let catalog = self.catalog.borrow();
            let changing = self.topics_changing.borrow();
            catalog.len()
                + changing
                    .iter()
                    .filter(|name| !catalog.contains_key(*name))
                    .count()
        };
        if topics as u64 >= u64::from(self.config.topics_max) {
            return Err(WireError::new(
                ErrorCode::LimitExceeded,
                format!("the broker holds {topics} topics, the most topics_max allows"),
            ));
        }
        Ok(())
    }

    /// Runs `request` built by `make` on every shard; the first error wins.
    async fn broadcast(self: &Rc<Self>, make: impl Fn() -> ShardRequest) -> Result<(), WireError> {
        let mut first_error = None;
        for shard in 0..self.count {
            if let ShardReply::Done(Err(error)) = self.route(shard, make()).await {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn coordinate_alter(
        self: &Rc<Self>,
        name: String,
        retention: Option<Retention>,
        queue: QueueSettings,
    ) -> Result<(), WireError> {
        assert_eq!(self.id, 0, "shard 0 coordinates topic changes");
        if self.topics_changing.borrow().contains(&name) {
            return Err(WireError::new(
                ErrorCode::InvalidRequest,
                format!("topic {name:?} is being created or deleted"),
            ));
        }
        let Some(mut topic) = self.topic(&name) else {
            return Err(WireError::new(
                ErrorCode::UnknownTopic,
                format!("topic {name:?} does not exist"),
            ));
        };
        let before = topic.clone();
        if let Some(retention) = retention {
            topic.retention = retention;
        }
        topic.queue = queues::settings::merge(&topic.queue, &queue);
        queues::settings::validate(&name, &topic.queue, &self.config)?;
        self.validate_dead_letter_target(&name, &topic)?;
        self.topics_changing.borrow_mut().insert(name.clone());
        let outcome = async {
            if let Err(error) = write_metadata(self.topics_directory(), &name, topic.clone()).await
            {
                // The new file may be in place without its directory synced: put the old
                // one back, so what a restart reads is what every shard serves.
                if let Err(undo) = write_metadata(self.topics_directory(), &name, before).await {
                    tracing::error!(topic = %name, error = %undo, "undoing the change to topic {name:?}: {undo}");
                }
                return Err(WireError::new(
                    ErrorCode::StorageError,
                    format!("writing topic metadata: {error}"),
                ));
            }
            self.broadcast(|| ShardRequest::UpdateTopic {
                name: name.clone(),
                topic: topic.clone(),
            })
            .await
        }
        .await;
        self.topics_changing.borrow_mut().remove(&name);
        log_topic_change("altered", &name, Some(&topic), &outcome);
        outcome
    }

    async fn coordinate_create(
        self: &Rc<Self>,
        name: String,
        topic: TopicConfig,
    ) -> Result<(), WireError> {
        assert_eq!(self.id, 0, "shard 0 coordinates topic changes");
        self.validate_new_topic(&name, &topic)?;
        self.topics_changing.borrow_mut().insert(name.clone());
        let outcome = async {
            // A directory left by an interrupted delete must not lend its old segments
            // (and offsets) to the new topic.
            let leftover = self.topics_directory().join(&name);
            let removing = leftover.clone();
            off_reactor(move || match std::fs::remove_dir_all(removing) {
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            })
            .await
            .map_err(|error| {
                WireError::new(
                    ErrorCode::StorageError,
                    format!("removing leftover {}: {error}", leftover.display()),
                )
            })?;
            write_metadata(self.topics_directory(), &name, topic.clone())
                .await
                .map_err(|error| {
                    WireError::new(
                        ErrorCode::StorageError,
                        format!("writing topic metadata: {error}"),
                    )
                })?;
            let installed = self
                .broadcast(|| ShardRequest::InstallTopic {
                    name: name.clone(),
                    topic: topic.clone(),
                })
                .await;
            if let Err(error) = installed {
                // Undo on every shard, so no shard serves a topic the others lack, and
                // durably, so a restart does not bring back a topic whose creation
                // failed: the metadata file goes first, then the rest.
                let _ = self
                    .broadcast(|| ShardRequest::RemoveTopic { name: name.clone() })
                    .await;
                if let Err(undo) = remove_directory(self.topics_directory(), &name).await {
                    tracing::error!(topic = %name, error = %undo, "undoing the creation of topic {name:?}: {undo}");
                }
                return Err(error);
            }
            Ok(())
        }
        .await;
        self.topics_changing.borrow_mut().remove(&name);
        log_topic_change("created", &name, Some(&topic), &outcome);
        outcome
    }

    async fn coordinate_delete(self: &Rc<Self>, name: String) -> Result<(), WireError> {
        assert_eq!(self.id, 0, "shard 0 coordinates topic changes");
        if self.topics_changing.borrow().contains(&name) {
            return Err(WireError::new(
                ErrorCode::InvalidRequest,
                format!("topic {name:?} is being created or deleted"),
            ));
        }
        if !self.catalog.borrow().contains_key(&name) {
            return Err(WireError::new(
                ErrorCode::UnknownTopic,
                format!("topic {name:?} does not exist"),
            ));
        }
        self.topics_changing.borrow_mut().insert(name.clone());
        let outcome = async {
            // The metadata file goes first: once it is gone the topic does not come back
            // after a crash, whatever is left of its partitions.
            remove_metadata(self.topics_directory(), &name)
                .await
                .map_err(|error| {
                    WireError::new(
                        ErrorCode::StorageError,
                        format!("removing topic metadata: {error}"),
                    )
                })?;
            self.broadcast(|| ShardRequest::RemoveTopic { name: name.clone() })
                .await?;
            remove_directory(self.topics_directory(), &name)
                .await
                .map_err(|error| {
                    WireError::new(
                        ErrorCode::StorageError,
                        format!("removing topic {name:?}: {error}"),
                    )
                })
        }
        .await;
        self.topics_changing.borrow_mut().remove(&name);
        log_topic_change("deleted", &name, None, &outcome);
        outcome
    }
}

/// One line per topic change, from shard 0 (which coordinates them): what changed and the
/// settings it now has. A refused change (a bad name, a taken one) is the client's answer,
/// not a log line; one that failed on the broker's side (storage) is logged as an error.
fn log_topic_change(
    change: &'static str,
    name: &str,
    topic: Option<&TopicConfig>,
    outcome: &Result<(), WireError>,
) {
    match outcome {
        Ok(()) => match topic {
            Some(topic) => tracing::info!(
                shard = 0,
                topic = %name,
                partitions = topic.partitions,
                retention_bytes_max = topic.retention.bytes_max,
                retention_ms_max = topic.retention.ms_max,
                dead_letter_source = topic.dead_letter_source.as_deref(),
                queue_settings = ?topic.queue,
                "topic {change}"
            ),
            None => tracing::info!(shard = 0, topic = %name, "topic {change}"),
        },
        Err(error)
            if error.code == ErrorCode::StorageError || error.code == ErrorCode::Internal =>
        {
            tracing::error!(
                shard = 0,
                topic = %name,
                error = %error,
                "topic could not be {change}: {error}"
            )
        }
        Err(_) => {}
    }
}

/// Whether `read_topic_catalog` logs the topic directories it skips: each start-up reads
/// the catalog once per shard and once more to count partitions, and one line is enough.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkippedDirectories {
    Log,
    Ignore,
}

/// What one shard recovered at start-up, summed over its partitions (the broker's total
/// line adds up every shard's).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RecoveredTotals {
    pub partitions: u32,
    /// Offsets from each log start to its next offset (records still stored).
    pub records: u64,
    pub segments: u64,
    pub bytes: u64,
}

impl RecoveredTotals {
    /// Counts one recovered partition, and logs its line.
    fn add(
        &mut self,
        shard: ShardId,
        topic: &str,
        partition: u32,
        log: &PartitionLog,
        elapsed: Duration,
    ) {
        let records = log.next_offset() - log.log_start_offset();
        let segments = log.segment_count() as u64;
        let bytes = log.stored_bytes();
        tracing::info!(
            shard,
            topic = %topic,
            partition,
            records,
            segments,
            bytes,
            log_start_offset = log.log_start_offset(),
            next_offset = log.next_offset(),
            elapsed_ms = elapsed.as_millis() as u64,
            "recovered partition {partition} of {topic}: {records} records in {segments} segments in {} ms",
            elapsed.as_millis()
        );
        self.partitions += 1;
        self.records += records;
        self.segments += segments;
        self.bytes += bytes;
    }

    pub fn merge(&mut self, other: RecoveredTotals) {
        self.partitions += other.partitions;
        self.records += other.records;
        self.segments += other.segments;
        self.bytes += other.bytes;
    }
}

/// Forgets a request sent to another shard whose asker gave up before the reply came
/// (a client that disconnected during a long-poll), and asks the owner to stop it.
pub struct ForgetOnDrop {
    shard: Rc<Shard>,
    owner: ShardId,
    id: u64,
    cancel: bool,
    armed: bool,
}

impl Drop for ForgetOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.shard.awaiting.borrow_mut().remove(&self.id);
        if self.cancel {
            // Best effort, since a drop cannot wait: with the channel full, the owner's
            // long-poll simply runs to its deadline (fetch_wait_ms_max at most).
            let _ = self
                .shard
                .mesh
                .try_send_to(usize::from(self.owner), MeshMessage::Cancel { id: self.id });
        }
    }
}

/// A request handed to another shard ([`Shard::send`]).
pub enum SentRequest {
    Sent {
        owner: ShardId,
        receiver: oneshot::Receiver<ShardReply>,
        forget: ForgetOnDrop,
    },
    /// The owner was not accepting work: this is the reply.
    Failed(ShardReply),
}

impl SentRequest {
    /// Waits for the owner's reply. Dropping this before it resolves forgets the request
    /// (and stops it on the owner if it is a long-poll).
    pub async fn reply(self) -> ShardReply {
        match self {
            SentRequest::Failed(reply) => reply,
            SentRequest::Sent {
                owner,
                receiver,
                mut forget,
            } => {
                let reply = receiver.await;
                forget.armed = false;
                reply.unwrap_or_else(|_| {
                    failed_reply(WireError::new(
                        ErrorCode::ShuttingDown,
                        format!("shard {owner} stopped before answering"),
                    ))
                })
            }
        }
    }
}

fn failed_reply(error: WireError) -> ShardReply {
    // The caller matches on the reply kind it asked for; a Done error is understood by
    // every caller as "the whole sub-request failed".
    ShardReply::Done(Err(error))
}

// Topic metadata is tiny and changes rarely; it is written with plain blocking file calls,
// which keeps the format a readable text file. Those calls (and removing a topic's
// directories) run on the shard's blocking thread, never on its reactor: a directory
// fsync or a remove_dir_all can take milliseconds to seconds, and a create/delete loop
// would otherwise stall every connection of the shard meanwhile.

/// Runs blocking file-system work on the executor's blocking thread (glommio's
/// `spawn_blocking`), so the shard keeps serving while it runs. The same thread takes the
/// partition logs' directory calls (`storage::run_blocking`).
async fn off_reactor<R: Send + 'static>(work: impl FnOnce() -> R + Send + 'static) -> R {
    crate::storage::run_blocking(work).await
}

async fn write_metadata(
    topics_dir: PathBuf,
    name: &str,
    topic: TopicConfig,
) -> std::io::Result<()> {
    let name = name.to_owned();
    off_reactor(move || write_topic_metadata(&topics_dir, &name, &topic)).await
}

async fn remove_directory(topics_dir: PathBuf, name: &str) -> std::io::Result<()> {
    let name = name.to_owned();
    off_reactor(move || remove_topic_directory(&topics_dir, &name)).await
}

async fn remove_metadata(topics_dir: PathBuf, name: &str) -> std::io::Result<()> {
    let name = name.to_owned();
    off_reactor(move || remove_topic_metadata(&topics_dir, &name)).await
}

fn write_topic_metadata(topics_dir: &Path, name: &str, topic: &TopicConfig) -> std::io::Result<()> {
    use std::io::Write;
    let directory = topics_dir.join(name);
    std::fs::create_dir_all(&directory)?;
    let temporary = directory.join(format!("{TOPIC_METADATA_FILE}.tmp"));
    let mut file = std::fs::File::create(&temporary)?;
    writeln!(file, "partitions={}", topic.partitions)?;
    writeln!(file, "retention_bytes_max={}", topic.retention.bytes_max)?;
    writeln!(file, "retention_ms_max={}", topic.retention.ms_max)?;
    for line in queues::settings::meta_lines(&topic.queue) {
        writeln!(file, "{line}")?;
    }
    if let Some(placement) = &topic.placement {
        writeln!(file, "{}={placement}", queues::settings::KEY_PLACEMENT)?;
    }
    if let Some(source) = &topic.dead_letter_source {
        writeln!(
            file,
            "{}={source}",
            queues::settings::KEY_DEAD_LETTER_SOURCE
        )?;
    }
    file.sync_all()?;
    std::fs::rename(&temporary, directory.join(TOPIC_METADATA_FILE))?;
    std::fs::File::open(&directory)?.sync_all()?;
    std::fs::File::open(topics_dir)?.sync_all()?;
    Ok(())
}

/// Removes a topic's directory, metadata file first (once it is gone the topic does not
/// come back after a crash, whatever is left of its partitions), and syncs the topics
/// directory so the removal is durable.
fn remove_topic_directory(topics_dir: &Path, name: &str) -> std::io::Result<()> {
    match remove_topic_metadata(topics_dir, name) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    match std::fs::remove_dir_all(topics_dir.join(name)) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    std::fs::File::open(topics_dir)?.sync_all()
}

fn remove_topic_metadata(topics_dir: &Path, name: &str) -> std::io::Result<()> {
    let directory = topics_dir.join(name);
    std::fs::remove_file(directory.join(TOPIC_METADATA_FILE))?;
    std::fs::File::open(&directory)?.sync_all()
}

/// Reads every `<data_dir>/topics/<topic>/topic.meta`. Directories without one (a topic whose
/// deletion was interrupted) are skipped, with a warning when `skipped` says so.
pub fn read_topic_catalog(
    topics_dir: &Path,
    skipped: SkippedDirectories,
) -> Result<Vec<(String, TopicConfig)>, StorageError> {
    let mut topics = Vec::new();
    let entries = std::fs::read_dir(topics_dir)
        .map_err(|source| StorageError::io("listing topics directory", topics_dir, source))?;
    for entry in entries {
        let entry = entry
            .map_err(|source| StorageError::io("listing topics directory", topics_dir, source))?;
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if validate_topic_name(&name).is_err() {
            continue;
        }
        let metadata_path = path.join(TOPIC_METADATA_FILE);
        let text = match std::fs::read_to_string(&metadata_path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                if skipped == SkippedDirectories::Log {
                    tracing::warn!(
                        path = %path.display(),
                        "skipping {}: no {TOPIC_METADATA_FILE} (an interrupted delete?)",
                        path.display()
                    );
                }
                continue;
            }
            Err(source) => {
                return Err(StorageError::io(
                    "reading topic metadata",
                    &metadata_path,
                    source,
                ))
            }
        };
        let field = |key: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
                .map(str::trim)
        };
        let partitions = field("partitions")
            .and_then(|value| value.parse::<u32>().ok())
            .filter(|partitions| *partitions > 0)
            .ok_or_else(|| StorageError::Corrupt {
                path: metadata_path.clone(),
                position: 0,
                reason: format!("expected a line partitions=N, found {text:?}"),
            })?;
        // Absent in files written before retention existed: no limit.
        let limit = |key: &str| {
            field(key)
                .and_then(|value| value.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // Absent in files written before queue groups: broker defaults, own placement.
        let queue = queues::settings::from_meta(field).map_err(|reason| StorageError::Corrupt {
            path: metadata_path.clone(),
            position: 0,
            reason,
        })?;
        let name_field = |key: &str| -> Result<Option<String>, StorageError> {
            match field(key) {
                None => Ok(None),
                Some(value) => validate_topic_name(value)
                    .map(|()| Some(value.to_owned()))
                    .map_err(|error| StorageError::Corrupt {
                        path: metadata_path.clone(),
                        position: 0,
                        reason: format!("{key}: {error}"),
                    }),
            }
        };
        let placement = name_field(queues::settings::KEY_PLACEMENT)?;
        let dead_letter_source = name_field(queues::settings::KEY_DEAD_LETTER_SOURCE)?;
        topics.push((
            name,
            TopicConfig {
                partitions,
                retention: Retention {
                    bytes_max: limit("retention_bytes_max"),
                    ms_max: limit("retention_ms_max"),
                },
                queue,
                placement,
                dead_letter_source,
            },
        ));
    }
    topics.sort_by(|left, right| left.0.cmp(&right.0));
    Ok(topics)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Invariant 4 (docs/architecture.md, "Invariants"): only the owning shard touches a
    /// partition. Asked for the log of a partition another shard owns (a routing bug), a
    /// shard answers Internal naming the owner, instead of serving or opening it; its own
    /// partitions are served, a partition past the count is UnknownPartition and an
    /// unknown topic UnknownTopic.
    #[test]
    fn log_answers_internal_for_a_partition_another_shard_owns() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().to_path_buf();
        // glommio's O_DIRECT probe wants an existing file opened first, as the broker writes
        // its probe file before starting the executors (docs/architecture.md).
        let probe = data_dir.join("probe");
        std::fs::write(&probe, vec![0u8; 4096]).unwrap();
        glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let file = glommio::io::DmaFile::open(&probe).await.unwrap();
                file.close().await.unwrap();
                let mesh =
                    glommio::channels::channel_mesh::MeshBuilder::<MeshMessage, _>::full(1, 16);
                let (senders, _receivers) = mesh.join().await.unwrap();
                let config = ServerConfig {
                    data_dir: data_dir.clone(),
                    segment_size_bytes: 4 << 20,
                    chunk_size_bytes: 256 << 10,
                    chunk_memory_bytes_per_shard_max: 8 << 20,
                    ..ServerConfig::default()
                };
                // Shard 1 of 2: installing a topic opens only the partitions it owns.
                let shard = Shard::new(
                    1,
                    2,
                    config,
                    vec![0, 0],
                    senders,
                    crate::metrics::Registry::new(1),
                );
                let topic = TopicConfig {
                    partitions: 4,
                    ..TopicConfig::default()
                };
                shard
                    .install_topic("orders", topic.clone(), None)
                    .await
                    .unwrap();
                let mut refused = 0;
                for partition in 0..4 {
                    let owner = topic.owner("orders", partition, 2);
                    match shard.log("orders", partition) {
                        Ok(_) => {
                            assert_eq!(owner, 1, "partition {partition} is served by its owner")
                        }
                        Err(error) => {
                            assert_ne!(owner, 1, "partition {partition}: {error}");
                            assert_eq!(error.code, ErrorCode::Internal, "{error}");
                            assert!(
                                error.message.contains("owned by shard 0, not shard 1"),
                                "{error}"
                            );
                            refused += 1;
                        }
                    }
                }
                assert_eq!(refused, 2, "two of the four partitions are shard 0's");
                assert_eq!(
                    shard.log("orders", 4).err().map(|error| error.code),
                    Some(ErrorCode::UnknownPartition)
                );
                assert_eq!(
                    shard.log("missing", 0).err().map(|error| error.code),
                    Some(ErrorCode::UnknownTopic)
                );
                shard.close_all().await;
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn storage_full_means_not_appended_and_a_full_disk_after_append_means_maybe() {
        let full = StorageError::NoSpace {
            operation: "writing segment",
            path: PathBuf::from("p"),
            detail: "ENOSPC".into(),
        };
        // Refused before append: StorageFull.
        assert_eq!(storage_to_wire(&full, false).code, ErrorCode::StorageFull);
        // Appended, then the disk was full: it may still become durable.
        let after = durable_wait_error(&full, false);
        assert_eq!(after.code, ErrorCode::Timeout);
        assert!(after.message.contains("appended"), "{after}");
        let sequence = StorageError::OutOfOrderSequence(crate::storage::producers::SequenceError {
            producer_id: 1,
            expected: 2,
            got: 4,
            crc_mismatch: false,
        });
        let refused = storage_to_wire(&sequence, false);
        assert_eq!(refused.code, ErrorCode::OutOfOrderSequence);
        assert!(
            refused.message.contains("expected sequence 2, got 4"),
            "{refused}"
        );
        assert_eq!(
            durable_wait_error(&StorageError::Closed, true).code,
            ErrorCode::ShuttingDown
        );
    }
}
