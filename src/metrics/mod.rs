//! The broker's metrics: per-shard registries behind the `metrics` crate, and their
//! Prometheus text rendering.
//!
//! Each shard thread installs its own [`Registry`] as its thread-local `metrics` recorder
//! (`metrics::set_default_local_recorder`), so `metrics::counter!` and friends on a shard
//! reach that shard's registry and nothing shared with other cores. Handles are atomics
//! written by their one shard; hot paths take a handle once (per partition, per shard)
//! and then only add to it. Nothing here takes a lock on the data path: the registry's
//! map is locked when a handle is registered (a partition opens) and when it is rendered.
//!
//! Gauges that describe state (log offsets, queue groups, connections) are not kept up to
//! date by the data path at all: at scrape time each shard is asked for a snapshot
//! ([`Registry::publish`]), which replaces the previous one whole, so a deleted
//! partition's gauges go with it.
//!
//! Every family the broker exports is listed in [`FAMILIES`] with its type and help text;
//! registering a name that is not listed is a bug (asserted), so the list, the docs
//! (docs/operations.md, "What to watch") and the dashboard can be checked against it.
//!
//! Runs on: registries are written by their shard's thread and read by the metrics HTTP
//! thread ([`http`]) and by the Stats operation.

pub mod http;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use ::metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};

/// The kind of a metric family, as Prometheus names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One exported family: its name, kind, labels (besides `shard`, which every sample
/// carries) and help text.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

const fn family(
    name: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    help: &'static str,
) -> Family {
    Family {
        name,
        kind,
        labels,
        help,
    }
}

const PARTITION: &[&str] = &["topic", "partition"];
const GROUP: &[&str] = &["topic", "partition", "group"];

/// Every family the broker exports. docs/operations.md ("What to watch") explains them.
pub const FAMILIES: &[Family] = &[
    // Requests and connections, counted on the shard that received them.
    family("shardq_requests_total", Kind::Counter, &["operation"], "Requests received, by operation."),
    family("shardq_errors_total", Kind::Counter, &["operation", "code"], "Errors answered, by operation and error code: a whole request's, or one partition's of a produce, fetch or list-offsets."),
    family("shardq_acks_none_failures_total", Kind::Counter, &["code"], "Produce requests with acks=none that failed (no client hears of them), by error code."),
    family("shardq_produce_latency_seconds", Kind::Histogram, &["acks"], "Produce requests from when the connection starts them (its in-flight and byte limits admitting them) to the answer, by acks level."),
    family("shardq_fetch_latency_seconds", Kind::Histogram, &[], "Fetch requests from when the connection starts them to the answer, long-poll waits included."),
    family("shardq_connections_accepted_total", Kind::Counter, &[], "Client connections accepted."),
    family("shardq_connections_refused_total", Kind::Counter, &[], "Client connections refused at connections_per_shard_max or connections_max."),
    family("shardq_connections_open", Kind::Gauge, &[], "Client connections open."),
    family("shardq_requests_in_flight", Kind::Gauge, &[], "Requests read whose answer is not written yet."),
    family("shardq_connection_bytes_in_flight", Kind::Gauge, &[], "Bytes of request frames and unwritten responses held by the shard's connections (shard_bytes_in_flight_max bounds it)."),
    family("shardq_connection_bytes_in_flight_max", Kind::Gauge, &[], "shard_bytes_in_flight_max."),
    family("shardq_mesh_requests_total", Kind::Counter, &["kind"], "Requests this shard sent to other shards over the channel mesh, by kind."),
    // Partitions (labelled on their owning shard).
    family("shardq_produce_records_total", Kind::Counter, PARTITION, "Records appended (exactly, whatever the acks level; a deduplicated resend counts nothing)."),
    family("shardq_produce_bytes_total", Kind::Counter, PARTITION, "Batch bytes appended."),
    family("shardq_fetch_records_total", Kind::Counter, PARTITION, "Records returned by fetches."),
    family("shardq_fetch_bytes_total", Kind::Counter, PARTITION, "Batch bytes returned by fetches."),
    family("shardq_log_start_offset", Kind::Gauge, PARTITION, "First offset still stored."),
    family("shardq_log_end_offset", Kind::Gauge, PARTITION, "One past the last appended offset (durable or not)."),
    family("shardq_log_durable_offset", Kind::Gauge, PARTITION, "One past the last durable offset: the high watermark consumers read up to."),
    family("shardq_log_durable_lag_records", Kind::Gauge, PARTITION, "Records appended but not yet durable (end minus durable offset)."),
    family("shardq_log_bytes", Kind::Gauge, PARTITION, "Bytes of batches stored in the partition's segments."),
    family("shardq_log_segments", Kind::Gauge, PARTITION, "Segment files of the partition."),
    family("shardq_durable_rounds_total", Kind::Counter, PARTITION, "Group-commit rounds completed (writes then fdatasync, or one O_DSYNC write)."),
    family("shardq_retention_deleted_segments_total", Kind::Counter, PARTITION, "Segments deleted by retention or purge."),
    family("shardq_retention_deleted_bytes_total", Kind::Counter, PARTITION, "Bytes deleted by retention or purge."),
    family("shardq_zero_fill_bytes_total", Kind::Counter, PARTITION, "Zero bytes written ahead of the write position so that durable rounds find written blocks (segment_zero_fill_*)."),
    family("shardq_zero_fill_lookahead_bytes", Kind::Gauge, PARTITION, "How far past its appended end the active segment is known written (as of the last zero-fill write)."),
    // Storage, per shard.
    family("shardq_durable_round_records", Kind::Histogram, &[], "Records made durable per group-commit round."),
    family("shardq_durable_round_bytes", Kind::Histogram, &[], "Bytes written per group-commit round (whole blocks, the rewritten partial block included)."),
    family("shardq_write_seconds", Kind::Histogram, &[], "One round's segment and index writes, from the first submitted to the last completed."),
    family("shardq_fdatasync_seconds", Kind::Histogram, &[], "One fdatasync of a segment file."),
    family("shardq_dsync_write_seconds", Kind::Histogram, &[], "One round written through an O_DSYNC handle (segment_dsync_write_bytes_max), from its first write to its last: durable when it completes, with no fdatasync after it."),
    family("shardq_tail_cache_hits_total", Kind::Counter, &[], "Fetch reads served from the tail cache."),
    family("shardq_tail_cache_misses_total", Kind::Counter, &[], "Fetch reads that went to disk."),
    family("shardq_tail_cache_bytes", Kind::Gauge, &[], "Bytes held by the tail cache."),
    family("shardq_chunk_budget_bytes_in_use", Kind::Gauge, &[], "Aligned chunk memory in use by appends not yet written."),
    family("shardq_chunk_budget_bytes_max", Kind::Gauge, &[], "chunk_memory_bytes_per_shard_max."),
    // The shard's loop.
    family("shardq_shard_ping_seconds", Kind::Histogram, &[], "How long the shard took to answer a scrape or health check: how long its loop takes to come round."),
    family("shardq_shard_stalls_total", Kind::Counter, &[], "Scrapes and health checks the shard answered late (over 100 ms) or not at all."),
    family("shardq_shard_busy_seconds_total", Kind::Counter, &[], "Time the shard's executor spent running tasks."),
    family("shardq_shard_loop_runs_total", Kind::Counter, &[], "Times the shard's scheduler picked a task queue to run."),
    family("shardq_shard_tasks_total", Kind::Counter, &[], "Tasks the shard's executor ran."),
    family("shardq_shard_up", Kind::Gauge, &[], "1 when the shard answered this scrape in time, 0 when the numbers shown are its last ones."),
    // Groups.
    family("shardq_queue_delivered_total", Kind::Counter, GROUP, "Messages handed out by receives (redeliveries included)."),
    family("shardq_queue_redelivered_total", Kind::Counter, GROUP, "Messages handed out again after a nack, an expired lease or a restart."),
    family("shardq_queue_nacked_total", Kind::Counter, GROUP, "Messages nacked."),
    family("shardq_queue_acked_total", Kind::Counter, GROUP, "Messages acked since the group was created (kept across restarts)."),
    family("shardq_queue_dead_lettered_total", Kind::Counter, GROUP, "Messages appended to the dead-letter queue since the group was created."),
    family("shardq_queue_in_flight", Kind::Gauge, GROUP, "Messages leased right now."),
    family("shardq_queue_waiting", Kind::Gauge, GROUP, "Messages waiting for a retry backoff or a delivery delay."),
    family("shardq_queue_dead_lettering", Kind::Gauge, GROUP, "Messages on their way to the dead-letter queue."),
    family("shardq_queue_oldest_unacked_age_seconds", Kind::Gauge, GROUP, "Age of the oldest lease still unsettled (0 when none)."),
    family("shardq_group_lag_records", Kind::Gauge, &["topic", "partition", "group", "kind"], "Durable records a group has not settled (queue) or committed past (stream)."),
    family("shardq_group_position", Kind::Gauge, &["topic", "partition", "group", "kind"], "A queue group's ack floor, or a stream group's committed offset."),
];

/// The family of `name`, if the broker exports it.
pub fn family_of(name: &str) -> Option<&'static Family> {
    FAMILIES.iter().find(|family| family.name == name)
}

/// Histogram bucket upper bounds, by what the family measures.
fn buckets_for(name: &str) -> &'static [f64] {
    const SECONDS: &[f64] = &[
        0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
        0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ];
    const RECORDS: &[f64] = &[
        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0, 16_384.0, 65_536.0,
    ];
    const BYTES: &[f64] = &[
        4096.0,
        16_384.0,
        65_536.0,
        262_144.0,
        1_048_576.0,
        4_194_304.0,
        16_777_216.0,
    ];
    if name.ends_with("_seconds") {
        SECONDS
    } else if name.ends_with("_records") {
        RECORDS
    } else {
        BYTES
    }
}

/// A counter: one shard adds to it, scrapes read it.
#[derive(Debug, Default)]
pub struct CounterCell(AtomicU64);

impl CounterFn for CounterCell {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }

    fn absolute(&self, value: u64) {
        self.0.fetch_max(value, Ordering::Relaxed);
    }
}

/// A gauge, as f64 bits.
#[derive(Debug, Default)]
pub struct GaugeCell(AtomicU64);

impl GaugeCell {
    fn update(&self, change: impl Fn(f64) -> f64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some(change(f64::from_bits(bits)).to_bits())
            });
    }

    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

impl GaugeFn for GaugeCell {
    fn increment(&self, value: f64) {
        self.update(|current| current + value);
    }

    fn decrement(&self, value: f64) {
        self.update(|current| current - value);
    }

    fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::Relaxed);
    }
}

/// A histogram with fixed buckets: a count per bucket (the last is +Inf) and the sum of
/// every value.
#[derive(Debug)]
pub struct HistogramCell {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    sum: GaugeCell,
}

impl HistogramCell {
    fn new(bounds: &'static [f64]) -> HistogramCell {
        HistogramCell {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: GaugeCell::default(),
        }
    }

    /// (upper bound, cumulative count) per bucket, +Inf last; the count; the sum.
    fn read(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(self.buckets.len());
        for (index, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let bound = self.bounds.get(index).copied().unwrap_or(f64::INFINITY);
            buckets.push((bound, cumulative));
        }
        // The count is the +Inf bucket's, so the two always agree even while the shard
        // records (the sum may be a record ahead or behind).
        (buckets, cumulative, self.sum.get())
    }
}

impl HistogramFn for HistogramCell {
    fn record(&self, value: f64) {
        let index = self.bounds.partition_point(|bound| *bound < value);
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.sum.increment(value);
    }
}

#[derive(Debug, Clone)]
enum Cell {
    Counter(Arc<CounterCell>),
    Gauge(Arc<GaugeCell>),
    Histogram(Arc<HistogramCell>),
}

/// A gauge value from a shard's snapshot: family name, labels (without `shard`), value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: &'static str,
    pub labels: Vec<(&'static str, String)>,
    pub value: f64,
}

impl Sample {
    pub fn new(name: &'static str, labels: Vec<(&'static str, String)>, value: f64) -> Sample {
        debug_assert!(
            family_of(name).is_some(),
            "metric {name} is missing from metrics::FAMILIES"
        );
        Sample {
            name,
            labels,
            value,
        }
    }
}

/// One shard's metrics: its `metrics` recorder, plus the gauges of its last snapshot.
#[derive(Debug)]
pub struct Registry {
    shard: u16,
    cells: Mutex<HashMap<Key, Cell>>,
    snapshot: Mutex<Vec<Sample>>,
}

impl Registry {
    pub fn new(shard: u16) -> Arc<Registry> {
        Arc::new(Registry {
            shard,
            cells: Mutex::new(HashMap::new()),
            snapshot: Mutex::new(Vec::new()),
        })
    }

    pub fn shard(&self) -> u16 {
        self.shard
    }

    fn cell(&self, key: &Key, kind: Kind) -> Cell {
        let family = family_of(key.name());
        assert!(
            family.is_some_and(|family| family.kind == kind),
            "metric {} ({}) is not in metrics::FAMILIES with that kind",
            key.name(),
            kind.as_str()
        );
        let mut cells = self.cells.lock().unwrap_or_else(PoisonError::into_inner);
        cells
            .entry(key.clone())
            .or_insert_with(|| match kind {
                Kind::Counter => Cell::Counter(Arc::default()),
                Kind::Gauge => Cell::Gauge(Arc::default()),
                Kind::Histogram => {
                    Cell::Histogram(Arc::new(HistogramCell::new(buckets_for(key.name()))))
                }
            })
            .clone()
    }

    /// The value of a counter registered with exactly these labels (0 if never).
    pub fn counter_value(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let cells = self.cells.lock().unwrap_or_else(PoisonError::into_inner);
        cells
            .iter()
            .find(|(key, _)| key.name() == name && labels_match(key, labels))
            .and_then(|(_, cell)| match cell {
                Cell::Counter(counter) => Some(counter.0.load(Ordering::Relaxed)),
                _ => None,
            })
            .unwrap_or(0)
    }

    /// Every counter named `name`: its labels and value.
    pub fn counters_named(&self, name: &str) -> Vec<(Vec<(String, String)>, u64)> {
        let cells = self.cells.lock().unwrap_or_else(PoisonError::into_inner);
        cells
            .iter()
            .filter(|(key, _)| key.name() == name)
            .filter_map(|(key, cell)| match cell {
                Cell::Counter(counter) => Some((
                    key.labels()
                        .map(|label| (label.key().to_owned(), label.value().to_owned()))
                        .collect(),
                    counter.0.load(Ordering::Relaxed),
                )),
                _ => None,
            })
            .collect()
    }

    /// The value of the gauge registered under `name` without labels (0 if never).
    pub fn gauge_value(&self, name: &str) -> f64 {
        let cells = self.cells.lock().unwrap_or_else(PoisonError::into_inner);
        cells
            .iter()
            .find(|(key, _)| key.name() == name && key.labels().count() == 0)
            .and_then(|(_, cell)| match cell {
                Cell::Gauge(gauge) => Some(gauge.get()),
                _ => None,
            })
            .unwrap_or(0.0)
    }

    /// Replaces the shard's snapshot gauges.
    pub fn publish(&self, samples: Vec<Sample>) {
        *self.snapshot.lock().unwrap_or_else(PoisonError::into_inner) = samples;
    }

    /// Drops every handle labelled `topic` (a deleted topic): its counters stop being
    /// exported. Handles still held elsewhere keep working, unexported.
    pub fn forget_topic(&self, topic: &str) {
        let mut cells = self.cells.lock().unwrap_or_else(PoisonError::into_inner);
        cells.retain(|key, _| {
            !key.labels()
                .any(|label| label.key() == "topic" && label.value() == topic)
        });
    }
}

fn labels_match(key: &Key, labels: &[(&str, &str)]) -> bool {
    key.labels().count() == labels.len()
        && labels.iter().all(|(name, value)| {
            key.labels()
                .any(|label| label.key() == *name && label.value() == *value)
        })
}

impl Recorder for Registry {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        match self.cell(key, Kind::Counter) {
            Cell::Counter(cell) => Counter::from_arc(cell),
            _ => unreachable!("cell() returns the kind asked for"),
        }
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        match self.cell(key, Kind::Gauge) {
            Cell::Gauge(cell) => Gauge::from_arc(cell),
            _ => unreachable!("cell() returns the kind asked for"),
        }
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        match self.cell(key, Kind::Histogram) {
            Cell::Histogram(cell) => Histogram::from_arc(cell),
            _ => unreachable!("cell() returns the kind asked for"),
        }
    }
}

/// A sample before rendering: labels (shard first) and what to print.
type LabelledValue = (Vec<(String, String)>, Value);

/// What one sample prints.
enum Value {
    Number(f64),
    Histogram(Vec<(f64, u64)>, u64, f64),
}

/// Renders every registry in the Prometheus text exposition format (version 0.0.4): one
/// `# HELP` and `# TYPE` per family, then its samples with a `shard` label first.
pub fn render(registries: &[Arc<Registry>]) -> String {
    let mut families: HashMap<&'static str, Vec<LabelledValue>> = HashMap::new();
    for registry in registries {
        let shard = registry.shard.to_string();
        {
            // Copied out first: the shard registers handles under this lock, so it is
            // held only for the copy, never while formatting.
            let cells: Vec<(Key, Cell)> = registry
                .cells
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .map(|(key, cell)| (key.clone(), cell.clone()))
                .collect();
            for (key, cell) in cells.iter() {
                let Some(family) = family_of(key.name()) else {
                    continue;
                };
                let mut labels = vec![("shard".to_owned(), shard.clone())];
                labels.extend(
                    key.labels()
                        .map(|label| (label.key().to_owned(), label.value().to_owned())),
                );
                let value = match cell {
                    Cell::Counter(counter) => {
                        Value::Number(counter.0.load(Ordering::Relaxed) as f64)
                    }
                    Cell::Gauge(gauge) => Value::Number(gauge.get()),
                    Cell::Histogram(histogram) => {
                        let (buckets, count, sum) = histogram.read();
                        Value::Histogram(buckets, count, sum)
                    }
                };
                families
                    .entry(family.name)
                    .or_default()
                    .push((labels, value));
            }
        }
        let snapshot = registry
            .snapshot
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for sample in snapshot.iter() {
            let mut labels = vec![("shard".to_owned(), shard.clone())];
            labels.extend(
                sample
                    .labels
                    .iter()
                    .map(|(name, value)| ((*name).to_owned(), value.clone())),
            );
            families
                .entry(sample.name)
                .or_default()
                .push((labels, Value::Number(sample.value)));
        }
    }
    let mut out = String::new();
    for family in FAMILIES {
        let Some(mut samples) = families.remove(family.name) else {
            continue;
        };
        samples.sort_by(|a, b| compare_labels(&a.0, &b.0));
        let _ = writeln!(out, "# HELP {} {}", family.name, family.help);
        let _ = writeln!(out, "# TYPE {} {}", family.name, family.kind.as_str());
        for (labels, value) in samples {
            match value {
                Value::Number(number) => {
                    let _ = writeln!(
                        out,
                        "{}{} {}",
                        family.name,
                        format_labels(&labels, None),
                        format_number(number)
                    );
                }
                Value::Histogram(buckets, count, sum) => {
                    for (bound, cumulative) in buckets {
                        let le = if bound.is_infinite() {
                            "+Inf".to_owned()
                        } else {
                            format_number(bound)
                        };
                        let _ = writeln!(
                            out,
                            "{}_bucket{} {cumulative}",
                            family.name,
                            format_labels(&labels, Some(&le))
                        );
                    }
                    let _ = writeln!(
                        out,
                        "{}_sum{} {}",
                        family.name,
                        format_labels(&labels, None),
                        format_number(sum)
                    );
                    let _ = writeln!(
                        out,
                        "{}_count{} {count}",
                        family.name,
                        format_labels(&labels, None)
                    );
                }
            }
        }
    }
    out
}

/// Orders samples by their labels, numbers as numbers (shard 2 before shard 10).
fn compare_labels(a: &[(String, String)], b: &[(String, String)]) -> std::cmp::Ordering {
    for ((name_a, value_a), (name_b, value_b)) in a.iter().zip(b) {
        let order = name_a.cmp(name_b).then_with(|| {
            match (value_a.parse::<u64>(), value_b.parse::<u64>()) {
                (Ok(x), Ok(y)) => x.cmp(&y),
                _ => value_a.cmp(value_b),
            }
        });
        if order.is_ne() {
            return order;
        }
    }
    a.len().cmp(&b.len())
}

fn format_labels(labels: &[(String, String)], le: Option<&str>) -> String {
    let mut out = String::from("{");
    for (index, (name, value)) in labels.iter().enumerate() {
        if index > 0 {
            out.push(',');
        }
        let _ = write!(out, "{name}=\"{}\"", escape_label(value));
    }
    if let Some(le) = le {
        let _ = write!(out, ",le=\"{le}\"");
    }
    out.push('}');
    out
}

/// Label values escape backslash, double quote and line feed (the text format's rules).
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for character in value.chars() {
        match character {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            other => out.push(other),
        }
    }
    out
}

fn format_number(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else if value.fract() == 0.0 && value.abs() < 9.007_199_254_740_992e15 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_gauges_and_histograms_render_in_the_text_format() {
        let registry = Registry::new(3);
        metrics::with_local_recorder(&*registry, || {
            metrics::counter!("shardq_produce_records_total", "topic" => "a\"b", "partition" => "0")
                .increment(5);
            metrics::counter!("shardq_produce_records_total", "topic" => "a\"b", "partition" => "0")
                .increment(2);
            let histogram = metrics::histogram!("shardq_fdatasync_seconds");
            histogram.record(0.000_04);
            histogram.record(0.2);
        });
        registry.publish(vec![Sample::new(
            "shardq_log_end_offset",
            vec![("topic", "t".into()), ("partition", "1".into())],
            42.0,
        )]);
        let text = render(&[Arc::clone(&registry)]);
        assert!(
            text.contains("# TYPE shardq_produce_records_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "shardq_produce_records_total{shard=\"3\",partition=\"0\",topic=\"a\\\"b\"} 7\n"
            ) || text.contains(
                "shardq_produce_records_total{shard=\"3\",topic=\"a\\\"b\",partition=\"0\"} 7\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("shardq_fdatasync_seconds_bucket{shard=\"3\",le=\"0.000025\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("shardq_fdatasync_seconds_bucket{shard=\"3\",le=\"0.00005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("shardq_fdatasync_seconds_bucket{shard=\"3\",le=\"0.1\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("shardq_fdatasync_seconds_bucket{shard=\"3\",le=\"0.25\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("shardq_fdatasync_seconds_bucket{shard=\"3\",le=\"+Inf\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("shardq_fdatasync_seconds_count{shard=\"3\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("shardq_log_end_offset{shard=\"3\",topic=\"t\",partition=\"1\"} 42\n"),
            "{text}"
        );
        assert_eq!(
            registry.counter_value(
                "shardq_produce_records_total",
                &[("topic", "a\"b"), ("partition", "0")]
            ),
            7
        );
        registry.forget_topic("a\"b");
        assert!(!render(&[registry]).contains("shardq_produce_records_total"));
    }

    #[test]
    #[should_panic(expected = "not in metrics::FAMILIES")]
    fn a_metric_missing_from_the_family_list_is_a_bug() {
        let registry = Registry::new(0);
        metrics::with_local_recorder(&*registry, || {
            metrics::counter!("shardq_no_such_metric_total").increment(1);
        });
    }

    #[test]
    fn family_names_follow_prometheus_conventions() {
        for family in FAMILIES {
            assert!(family.name.starts_with("shardq_"), "{}", family.name);
            assert_eq!(
                family.kind == Kind::Counter,
                family.name.ends_with("_total"),
                "{}",
                family.name
            );
            assert!(family
                .name
                .bytes()
                .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_'));
            assert!(
                !family.labels.contains(&"shard"),
                "shard is added to every sample"
            );
        }
        let mut names: Vec<_> = FAMILIES.iter().map(|family| family.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FAMILIES.len(), "family names are unique");
    }
}
