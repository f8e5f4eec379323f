//! What a shard reports about itself: the metric handles of its requests, partitions and
//! queue groups, and the snapshot of its state that a scrape (`metrics::http`) and the
//! Stats operation read.
//!
//! Runs on the shard's own thread. Handles are registered once (a partition opens, an
//! operation is first seen) and cached here, so the data path only adds to atomics; the
//! snapshot walks the shard's partitions and groups and is taken only when asked.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Histogram, Key, Label, Level, Metadata, Recorder};

use super::queues::DescribedPartition;
use super::Shard;
use crate::metrics::{Registry, Sample};
use crate::protocol::batch::BatchHeader;
use crate::protocol::queue::{GroupKind, GroupPartition};
use crate::protocol::{Acks, ErrorCode, Opcode, PartitionStats, ShardStats};
use crate::storage::{LogMetrics, PartitionLog};

static METADATA: Metadata<'static> = Metadata::new("shardq", Level::INFO, None);

/// A shard's metric handles, on top of its registry.
pub struct ShardMetrics {
    pub registry: Arc<Registry>,
    /// Requests by opcode (wire value), registered on first use.
    requests: RefCell<HashMap<u8, Counter>>,
    /// Produce latency by acks level (none, memory, durable).
    produce_latency: [Histogram; 3],
    fetch_latency: Histogram,
    /// Fetched records and bytes by topic and partition, on the shard that answered.
    fetched: RefCell<HashMap<Arc<str>, FetchedCounters>>,
    /// Queue groups' delivered, redelivered and nacked counters by (topic, partition),
    /// then group.
    queue: RefCell<HashMap<(Arc<str>, u32), GroupCounters>>,
    /// Errors by (opcode, error code), and acks=none failures by error code.
    errors: RefCell<HashMap<(u8, u16), Counter>>,
    acks_none_failures: RefCell<HashMap<u16, Counter>>,
    /// Requests sent to other shards, by kind.
    mesh: RefCell<HashMap<&'static str, Counter>>,
    pub tail_cache_hits: Counter,
    pub tail_cache_misses: Counter,
    pub connections_accepted: Counter,
    pub connections_refused: Counter,
    pub connections_open: metrics::Gauge,
    /// The executor's running totals: glommio hands out its statistics as the change
    /// since the last time anyone asked.
    executor_totals: std::cell::Cell<(f64, u64, u64)>,
}

/// The delivery counters of one partition's queue groups, by group.
type GroupCounters = HashMap<String, QueueCounters>;

/// Records and bytes fetched, by partition of one topic.
type FetchedCounters = HashMap<u32, (Counter, Counter)>;

#[derive(Clone)]
pub struct QueueCounters {
    pub delivered: Counter,
    pub redelivered: Counter,
    pub nacked: Counter,
}

impl ShardMetrics {
    pub fn new(registry: Arc<Registry>) -> ShardMetrics {
        let histogram = |name: &'static str, labels: Vec<Label>| {
            registry.register_histogram(&Key::from_parts(name, labels), &METADATA)
        };
        let acks = |level: Acks| {
            histogram(
                "shardq_produce_latency_seconds",
                vec![Label::new("acks", level.name())],
            )
        };
        let counter =
            |name: &'static str| registry.register_counter(&Key::from_static_name(name), &METADATA);
        ShardMetrics {
            produce_latency: [acks(Acks::None), acks(Acks::Memory), acks(Acks::Durable)],
            fetch_latency: histogram("shardq_fetch_latency_seconds", Vec::new()),
            tail_cache_hits: counter("shardq_tail_cache_hits_total"),
            tail_cache_misses: counter("shardq_tail_cache_misses_total"),
            connections_accepted: counter("shardq_connections_accepted_total"),
            connections_refused: counter("shardq_connections_refused_total"),
            connections_open: registry
                .register_gauge(&Key::from_static_name("shardq_connections_open"), &METADATA),
            requests: RefCell::new(HashMap::new()),
            fetched: RefCell::new(HashMap::new()),
            queue: RefCell::new(HashMap::new()),
            errors: RefCell::new(HashMap::new()),
            acks_none_failures: RefCell::new(HashMap::new()),
            mesh: RefCell::new(HashMap::new()),
            executor_totals: std::cell::Cell::new((0.0, 0, 0)),
            registry,
        }
    }

    fn counter(&self, name: &'static str, labels: Vec<Label>) -> Counter {
        self.registry
            .register_counter(&Key::from_parts(name, labels), &METADATA)
    }

    fn histogram(&self, name: &'static str) -> Histogram {
        self.registry
            .register_histogram(&Key::from_static_name(name), &METADATA)
    }

    /// The handles of a partition this shard owns.
    pub fn partition(&self, topic: &str, partition: u32) -> LogMetrics {
        let labels = || {
            vec![
                Label::new("topic", topic.to_owned()),
                Label::new("partition", partition.to_string()),
            ]
        };
        LogMetrics {
            produce_records: self.counter("shardq_produce_records_total", labels()),
            produce_bytes: self.counter("shardq_produce_bytes_total", labels()),
            durable_rounds: self.counter("shardq_durable_rounds_total", labels()),
            retention_deleted_segments: self
                .counter("shardq_retention_deleted_segments_total", labels()),
            retention_deleted_bytes: self.counter("shardq_retention_deleted_bytes_total", labels()),
            round_records: self.histogram("shardq_durable_round_records"),
            round_bytes: self.histogram("shardq_durable_round_bytes"),
            write_seconds: self.histogram("shardq_write_seconds"),
            fdatasync_seconds: self.histogram("shardq_fdatasync_seconds"),
            dsync_write_seconds: self.histogram("shardq_dsync_write_seconds"),
            tail_cache_hits: self.tail_cache_hits.clone(),
            tail_cache_misses: self.tail_cache_misses.clone(),
            zero_fill_bytes: self.counter("shardq_zero_fill_bytes_total", labels()),
            zero_fill_lookahead_bytes: self.registry.register_gauge(
                &Key::from_parts("shardq_zero_fill_lookahead_bytes", labels()),
                &METADATA,
            ),
        }
    }

    /// A request answered by this shard: counted by operation, its errors by code, and
    /// produce and fetch latencies.
    pub fn request(
        &self,
        opcode: Opcode,
        acks: Option<Acks>,
        elapsed: Duration,
        errors: &[ErrorCode],
    ) {
        let counter = self
            .requests
            .borrow_mut()
            .entry(opcode as u8)
            .or_insert_with(|| {
                self.counter(
                    "shardq_requests_total",
                    vec![Label::new("operation", opcode.name())],
                )
            })
            .clone();
        counter.increment(1);
        match (opcode, acks) {
            (Opcode::Produce, Some(acks)) => {
                self.produce_latency[acks as usize].record(elapsed.as_secs_f64())
            }
            (Opcode::Fetch, _) => self.fetch_latency.record(elapsed.as_secs_f64()),
            _ => {}
        }
        for code in errors {
            // Cached too: a client can make errors as fast as it can send.
            self.errors
                .borrow_mut()
                .entry((opcode as u8, *code as u16))
                .or_insert_with(|| {
                    self.counter(
                        "shardq_errors_total",
                        vec![
                            Label::new("operation", opcode.name()),
                            Label::new("code", code.name()),
                        ],
                    )
                })
                .increment(1);
            if acks == Some(Acks::None) {
                self.acks_none_failures
                    .borrow_mut()
                    .entry(*code as u16)
                    .or_insert_with(|| {
                        self.counter(
                            "shardq_acks_none_failures_total",
                            vec![Label::new("code", code.name())],
                        )
                    })
                    .increment(1);
            }
        }
    }

    /// Whole batches a fetch answered with, for `topic`'s `partition`. `exists` is asked
    /// before a topic's counters are first registered: a fetch finishing after its topic
    /// was deleted must not bring the deleted topic's series back.
    pub fn fetched(
        &self,
        topic: &str,
        partition: u32,
        batches: &[u8],
        exists: impl FnOnce() -> bool,
    ) {
        if batches.is_empty() {
            return;
        }
        let records = count_records(batches);
        let mut fetched = self.fetched.borrow_mut();
        if !fetched.contains_key(topic) {
            if !exists() {
                return;
            }
            fetched.insert(Arc::from(topic), HashMap::new());
        }
        let partitions = fetched.get_mut(topic).expect("inserted above");
        let (records_counter, bytes_counter) = partitions.entry(partition).or_insert_with(|| {
            let labels = || {
                vec![
                    Label::new("topic", topic.to_owned()),
                    Label::new("partition", partition.to_string()),
                ]
            };
            (
                self.counter("shardq_fetch_records_total", labels()),
                self.counter("shardq_fetch_bytes_total", labels()),
            )
        });
        records_counter.increment(records);
        bytes_counter.increment(batches.len() as u64);
    }

    /// A request sent to another shard over the channel mesh.
    pub fn mesh_request(&self, kind: &'static str) {
        self.mesh
            .borrow_mut()
            .entry(kind)
            .or_insert_with(|| {
                self.counter("shardq_mesh_requests_total", vec![Label::new("kind", kind)])
            })
            .increment(1);
    }

    /// The delivery counters of a queue group's partition.
    pub fn queue(&self, topic: &Arc<str>, partition: u32, group: &str) -> QueueCounters {
        let mut queue = self.queue.borrow_mut();
        let groups = queue.entry((Arc::clone(topic), partition)).or_default();
        if let Some(counters) = groups.get(group) {
            return counters.clone();
        }
        groups
            .entry(group.to_owned())
            .or_insert_with(|| {
                let labels = || {
                    vec![
                        Label::new("topic", topic.to_string()),
                        Label::new("partition", partition.to_string()),
                        Label::new("group", group.to_owned()),
                    ]
                };
                QueueCounters {
                    delivered: self.counter("shardq_queue_delivered_total", labels()),
                    redelivered: self.counter("shardq_queue_redelivered_total", labels()),
                    nacked: self.counter("shardq_queue_nacked_total", labels()),
                }
            })
            .clone()
    }

    /// A topic was deleted: its handles go, here and in the registry.
    pub fn forget_topic(&self, topic: &str) {
        self.fetched.borrow_mut().remove(topic);
        self.queue
            .borrow_mut()
            .retain(|(name, _), _| &**name != topic);
        self.registry.forget_topic(topic);
    }
}

/// The value of label `name` (empty when absent).
fn label(labels: &[(String, String)], name: &str) -> String {
    labels
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.clone())
        .unwrap_or_default()
}

/// Records in a run of whole batches (a fetch answer).
fn count_records(mut batches: &[u8]) -> u64 {
    let mut records = 0;
    while let Some(header) = BatchHeader::read(batches) {
        records += u64::from(header.record_count);
        let length = header.batch_length as usize;
        if length == 0 || length > batches.len() {
            break;
        }
        batches = &batches[length..];
    }
    records
}

/// What one shard's connections fetched from one partition since the broker started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub topic: String,
    pub partition: u32,
    pub records: u64,
    pub bytes: u64,
}

/// One owned partition's state, as the Stats operation and the gauges report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionState {
    pub topic: String,
    pub partition: u32,
    pub log_start_offset: u64,
    pub log_end_offset: u64,
    pub high_watermark: u64,
    pub stored_bytes: u64,
    pub segments: u32,
    /// Records and bytes appended since the broker started.
    pub records_in: u64,
    pub bytes_in: u64,
}

impl Shard {
    /// Every partition this shard owns (of `topics`, or all when empty), by topic and
    /// partition.
    pub fn owned_partitions(&self, topics: &[String]) -> Vec<(String, u32, Rc<PartitionLog>)> {
        let logs = self.logs.borrow();
        let mut owned: Vec<_> = logs
            .iter()
            .filter(|(name, _)| topics.is_empty() || topics.contains(name))
            .flat_map(|(name, partitions)| {
                partitions
                    .iter()
                    .enumerate()
                    .filter_map(move |(partition, log)| {
                        log.as_ref()
                            .map(|log| (name.clone(), partition as u32, Rc::clone(log)))
                    })
            })
            .collect();
        owned.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        owned
    }

    pub fn partition_states(&self, topics: &[String]) -> Vec<PartitionState> {
        // One pass over the registry per counter, not one per partition.
        let by_partition = |name| -> HashMap<(String, String), u64> {
            self.metrics
                .registry
                .counters_named(name)
                .into_iter()
                .map(|(labels, value)| {
                    (
                        (label(&labels, "topic"), label(&labels, "partition")),
                        value,
                    )
                })
                .collect()
        };
        let records_in = by_partition("shardq_produce_records_total");
        let bytes_in = by_partition("shardq_produce_bytes_total");
        self.owned_partitions(topics)
            .into_iter()
            .map(|(topic, partition, log)| {
                let key = (topic.clone(), partition.to_string());
                PartitionState {
                    log_start_offset: log.log_start_offset(),
                    log_end_offset: log.next_offset(),
                    high_watermark: log.high_watermark(),
                    stored_bytes: log.stored_bytes(),
                    segments: u32::try_from(log.segment_count()).unwrap_or(u32::MAX),
                    records_in: records_in.get(&key).copied().unwrap_or(0),
                    bytes_in: bytes_in.get(&key).copied().unwrap_or(0),
                    topic,
                    partition,
                }
            })
            .collect()
    }

    /// Every group of `topics` (all when empty) on the partitions this shard owns.
    pub fn group_states(&self, topics: &[String]) -> Vec<(String, DescribedPartition)> {
        let names: Vec<String> = self
            .catalog
            .borrow()
            .keys()
            .filter(|name| topics.is_empty() || topics.contains(name))
            .cloned()
            .collect();
        let mut out = Vec::new();
        for topic in names {
            if let Ok(groups) = self.describe_groups_owned(&topic, "") {
                out.extend(groups.into_iter().map(|group| (topic.clone(), group)));
            }
        }
        out
    }

    /// The executor's busy seconds, scheduler runs and tasks run since it started.
    fn executor_totals(&self) -> (f64, u64, u64) {
        let change = glommio::executor().executor_stats();
        let (busy, runs, tasks) = self.metrics.executor_totals.get();
        let totals = (
            busy + change.executor_runtime().as_secs_f64(),
            runs + change.scheduler_runs(),
            tasks + change.tasks_executed(),
        );
        self.metrics.executor_totals.set(totals);
        totals
    }

    /// This shard's part of a Stats answer: itself, the partitions it owns (of `topics`,
    /// all when empty), and what its connections fetched from any partition, by (topic,
    /// partition): (records, bytes).
    pub fn stats(&self, topics: &[String]) -> (ShardStats, Vec<PartitionStats>, Vec<Fetched>) {
        let registry = &self.metrics.registry;
        let total = |name| -> u64 {
            registry
                .counters_named(name)
                .iter()
                .map(|(_, value)| value)
                .sum()
        };
        let shard = ShardStats {
            shard: self.id,
            connections_open: registry.gauge_value("shardq_connections_open").max(0.0) as u32,
            requests_in_flight: u32::try_from(self.responses_owed()).unwrap_or(u32::MAX),
            bytes_in_flight: self.connection_bytes_in_flight(),
            requests_total: total("shardq_requests_total"),
            errors_total: total("shardq_errors_total"),
            busy_ms: (self.executor_totals().0 * 1000.0) as u64,
        };
        let partitions = self
            .partition_states(topics)
            .into_iter()
            .map(|state| PartitionStats {
                topic: state.topic,
                partition: state.partition,
                shard: self.id,
                log_start_offset: state.log_start_offset,
                log_end_offset: state.log_end_offset,
                high_watermark: state.high_watermark,
                bytes: state.stored_bytes,
                segments: state.segments,
                records_in: state.records_in,
                bytes_in: state.bytes_in,
                records_out: 0,
                bytes_out: 0,
            })
            .collect();
        let bytes: HashMap<(String, String), u64> = registry
            .counters_named("shardq_fetch_bytes_total")
            .into_iter()
            .map(|(labels, value)| {
                (
                    (label(&labels, "topic"), label(&labels, "partition")),
                    value,
                )
            })
            .collect();
        let fetched = registry
            .counters_named("shardq_fetch_records_total")
            .into_iter()
            .filter_map(|(labels, records)| {
                let topic = label(&labels, "topic");
                let partition_label = label(&labels, "partition");
                let partition = partition_label.parse().ok()?;
                if !topics.is_empty() && !topics.contains(&topic) {
                    return None;
                }
                let bytes = bytes
                    .get(&(topic.clone(), partition_label))
                    .copied()
                    .unwrap_or(0);
                Some(Fetched {
                    topic,
                    partition,
                    records,
                    bytes,
                })
            })
            .collect();
        (shard, partitions, fetched)
    }

    /// The gauges of this shard's state right now, for a scrape.
    pub fn metrics_samples(&self) -> Vec<Sample> {
        let connection_bytes_in_flight = self.connection_bytes_in_flight();
        let mut samples = Vec::new();
        let shard_wide = |name, value: f64| Sample::new(name, Vec::new(), value);
        samples.push(shard_wide(
            "shardq_requests_in_flight",
            self.responses_owed() as f64,
        ));
        samples.push(shard_wide(
            "shardq_connection_bytes_in_flight",
            connection_bytes_in_flight as f64,
        ));
        samples.push(shard_wide(
            "shardq_connection_bytes_in_flight_max",
            self.config.shard_bytes_in_flight_max as f64,
        ));
        let chunk = self.config.chunk_size_bytes as u64;
        let chunks_total = self.config.chunk_memory_bytes_per_shard_max as u64 / chunk;
        let in_use = chunks_total.saturating_sub(self.budget.chunks_available()) * chunk;
        samples.push(shard_wide(
            "shardq_chunk_budget_bytes_in_use",
            in_use as f64,
        ));
        samples.push(shard_wide(
            "shardq_chunk_budget_bytes_max",
            (chunks_total * chunk) as f64,
        ));
        samples.push(shard_wide(
            "shardq_tail_cache_bytes",
            self.tail_cache.bytes_used() as f64,
        ));
        let totals = self.executor_totals();
        samples.push(shard_wide("shardq_shard_busy_seconds_total", totals.0));
        samples.push(shard_wide("shardq_shard_loop_runs_total", totals.1 as f64));
        samples.push(shard_wide("shardq_shard_tasks_total", totals.2 as f64));
        for state in self.partition_states(&[]) {
            let labels = || {
                vec![
                    ("topic", state.topic.clone()),
                    ("partition", state.partition.to_string()),
                ]
            };
            for (name, value) in [
                ("shardq_log_start_offset", state.log_start_offset),
                ("shardq_log_end_offset", state.log_end_offset),
                ("shardq_log_durable_offset", state.high_watermark),
                (
                    "shardq_log_durable_lag_records",
                    state.log_end_offset.saturating_sub(state.high_watermark),
                ),
                ("shardq_log_bytes", state.stored_bytes),
                ("shardq_log_segments", u64::from(state.segments)),
            ] {
                samples.push(Sample::new(name, labels(), value as f64));
            }
        }
        for (topic, (group, kind, partition)) in self.group_states(&[]) {
            group_samples(&mut samples, &topic, &group, kind, &partition);
        }
        samples
    }
}

fn group_samples(
    samples: &mut Vec<Sample>,
    topic: &str,
    group: &str,
    kind: GroupKind,
    state: &GroupPartition,
) {
    let labels = || {
        vec![
            ("topic", topic.to_owned()),
            ("partition", state.partition.to_string()),
            ("group", group.to_owned()),
        ]
    };
    let with_kind = || {
        let mut labels = labels();
        labels.push((
            "kind",
            match kind {
                GroupKind::Queue => "queue",
                GroupKind::Stream => "stream",
            }
            .to_owned(),
        ));
        labels
    };
    samples.push(Sample::new(
        "shardq_group_lag_records",
        with_kind(),
        state.lag() as f64,
    ));
    samples.push(Sample::new(
        "shardq_group_position",
        with_kind(),
        state.position as f64,
    ));
    if kind != GroupKind::Queue {
        return;
    }
    for (name, value) in [
        ("shardq_queue_acked_total", state.acked as f64),
        (
            "shardq_queue_dead_lettered_total",
            state.dead_lettered as f64,
        ),
        ("shardq_queue_in_flight", f64::from(state.in_flight)),
        ("shardq_queue_waiting", f64::from(state.waiting)),
        (
            "shardq_queue_dead_lettering",
            f64::from(state.dead_lettering),
        ),
        (
            "shardq_queue_oldest_unacked_age_seconds",
            state.oldest_unacked_age_ms as f64 / 1000.0,
        ),
    ] {
        samples.push(Sample::new(name, labels(), value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::batch::BatchBuilder;

    #[test]
    fn count_records_walks_whole_batches() {
        let mut joined = Vec::new();
        for records in [1usize, 3, 7] {
            let mut builder = BatchBuilder::new(bytes::BytesMut::new());
            for index in 0..records {
                builder.push(1_000, None, format!("value {index}").as_bytes(), &[]);
            }
            joined.extend_from_slice(&builder.finish());
        }
        assert_eq!(count_records(&joined), 11);
        assert_eq!(count_records(&[]), 0);
    }
}
