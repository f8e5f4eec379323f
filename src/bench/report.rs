//! Results of one bench run: latency percentiles from HdrHistogram, throughput, where
//! things ran; rendered as the human summary table and as the `--json` object.
//!
//! The JSON shape is a contract (scripts/bench-all.sh reads it): every key below is
//! present for every subcommand, numbers are numbers, and a side that did not run has
//! zeros rather than a missing key.

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// Latencies are recorded in nanoseconds, from 1 ns to an hour, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("static bounds are valid")
}

/// The percentiles every report carries, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub p9999: f64,
    pub max: f64,
    pub count: u64,
}

fn ns_to_us(ns: u64) -> f64 {
    ns as f64 / 1_000.0
}

impl Percentiles {
    /// Zeros for an empty histogram (a side that did not run).
    pub fn of(histogram: &Histogram<u64>) -> Percentiles {
        if histogram.is_empty() {
            return Percentiles::default();
        }
        let at = |quantile: f64| ns_to_us(histogram.value_at_quantile(quantile));
        Percentiles {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            p999: at(0.999),
            p9999: at(0.9999),
            max: ns_to_us(histogram.max()),
            count: histogram.len(),
        }
    }

    pub fn to_json(self) -> Value {
        json!({
            "p50": self.p50,
            "p90": self.p90,
            "p99": self.p99,
            "p999": self.p999,
            "p9999": self.p9999,
            "max": self.max,
            "count": self.count,
        })
    }
}

/// One side's totals over the measured window (after warm-up).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SideTotals {
    pub messages: u64,
    pub bytes: u64,
    pub duration_s: f64,
}

impl SideTotals {
    pub fn msgs_per_s(&self) -> f64 {
        if self.duration_s > 0.0 {
            self.messages as f64 / self.duration_s
        } else {
            0.0
        }
    }

    pub fn mb_per_s(&self) -> f64 {
        if self.duration_s > 0.0 {
            self.bytes as f64 / self.duration_s / 1_000_000.0
        } else {
            0.0
        }
    }
}

/// Messages per second of each side, one sample per second of the run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timeline {
    pub produce_per_s: Vec<u64>,
    pub consume_per_s: Vec<u64>,
}

/// The queue workload's settle side (zeros for the other workloads).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueTotals {
    pub workers: u32,
    pub receive_batch: u32,
    pub ack_batch: u32,
    pub fail_rate: f64,
    /// Messages acked (each once; the broker refuses a second ack).
    pub acked: u64,
    /// Messages dead-lettered after their last nack, as the broker counts them.
    pub dead_lettered: u64,
    /// Nacks sent (one per failed delivery).
    pub nacked: u64,
    /// Deliveries of a message that was delivered before (a lease ran out or a nack).
    pub redelivered: u64,
    /// Acks and nacks the broker refused (a lease that ran out, say).
    pub refused: u64,
    /// From sending the receive that delivered a message to its ack's answer.
    pub receive_ack_latency: Percentiles,
}

/// Everything a run reports.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub workload: String,
    pub message_size: usize,
    pub batch_size: u32,
    pub acks: String,
    pub producers: u32,
    pub consumers: u32,
    pub partitions: u32,
    pub shard_aware: bool,
    /// Fixed rate asked for, 0 for as fast as possible.
    pub rate_per_s: u64,
    pub warmup_s: f64,
    /// The whole measured window, both sides.
    pub duration_s: f64,
    pub produced: SideTotals,
    pub consumed: SideTotals,
    pub produce_latency: Percentiles,
    pub e2e_latency: Percentiles,
    /// Messages verified on consume (warm-up included): count, order, checksum.
    pub verified: u64,
    /// Fixed-rate mode: messages due before the end that were never sent because the
    /// producer fell behind (the broker answered too slowly for the rate).
    pub unsent_due: u64,
    pub client_cpus: String,
    pub server_cpus: String,
    /// Server CPU use over the measured window, percent of one core; negative when the
    /// server's pid was not given.
    pub server_cpu_percent: f64,
    /// Server CPU seconds (user + system, from /proc/PID/stat) over the same window;
    /// negative when the server's pid was not given.
    pub server_cpu_s: f64,
    /// Idle workload: connections held open.
    pub idle_connections: u32,
    pub timeline: Timeline,
    /// Queue workload: the settle side; `consumed` counts its acked messages.
    pub queue: QueueTotals,
}

fn round3(value: f64) -> f64 {
    (value * 1_000.0).round() / 1_000.0
}

impl Report {
    /// The `--json` object.
    pub fn to_json(&self) -> Value {
        let mut value = json!({
            "workload": self.workload,
            "messages": self.produced.messages.max(self.consumed.messages),
            "bytes": self.produced.bytes.max(self.consumed.bytes),
            "message_size": self.message_size,
            "batch_size": self.batch_size,
            "acks": self.acks,
            "producers": self.producers,
            "consumers": self.consumers,
            "partitions": self.partitions,
            "shard_aware": self.shard_aware,
            "rate_msgs_per_s": self.rate_per_s,
            "warmup_s": self.warmup_s,
            "duration_s": round3(self.duration_s),
            "produced_messages": self.produced.messages,
            "consumed_messages": self.consumed.messages,
            "verified_messages": self.verified,
            "unsent_due_messages": self.unsent_due,
            "produce_msgs_per_s": round3(self.produced.msgs_per_s()),
            "produce_mb_per_s": round3(self.produced.mb_per_s()),
            "consume_msgs_per_s": round3(self.consumed.msgs_per_s()),
            "consume_mb_per_s": round3(self.consumed.mb_per_s()),
            "produce_latency_us": self.produce_latency.to_json(),
            "e2e_latency_us": self.e2e_latency.to_json(),
            "client_cpus": self.client_cpus,
            "server_cpus": self.server_cpus,
            "server_cpu_percent": round3(self.server_cpu_percent),
            "idle_connections": self.idle_connections,
            "workers": self.queue.workers,
            "receive_batch": self.queue.receive_batch,
            "ack_batch": self.queue.ack_batch,
            "fail_rate": self.queue.fail_rate,
            "acked_messages": self.queue.acked,
            "acked_msgs_per_s": round3(if self.workload == "queue" { self.consumed.msgs_per_s() } else { 0.0 }),
            "dead_lettered_messages": self.queue.dead_lettered,
            "nacked_deliveries": self.queue.nacked,
            "redelivered_messages": self.queue.redelivered,
            "refused_settles": self.queue.refused,
            "receive_ack_latency_us": self.queue.receive_ack_latency.to_json(),
            "timeline": {
                "produce_msgs_per_s": self.timeline.produce_per_s,
                "consume_msgs_per_s": self.timeline.consume_per_s,
            },
        });
        // Beside server_cpu_percent (one json! call cannot take more keys).
        value["server_cpu_s"] = json!(round3(self.server_cpu_s));
        value["server_cpu_s_per_million_messages"] = json!(round3(self.server_cpu_s_per_million()));
        value
    }

    /// Server CPU seconds per million messages (the larger of the two sides' measured
    /// counts); negative when unknown or when nothing was measured.
    pub fn server_cpu_s_per_million(&self) -> f64 {
        let messages = self.produced.messages.max(self.consumed.messages);
        if self.server_cpu_s < 0.0 || messages == 0 {
            return -1.0;
        }
        self.server_cpu_s / messages as f64 * 1e6
    }

    /// The summary table for people.
    pub fn summary(&self) -> String {
        let mut text = String::new();
        let rate = if self.rate_per_s > 0 {
            format!(", fixed rate {} msg/s", self.rate_per_s)
        } else {
            String::new()
        };
        text.push_str(&format!(
            "workload {}: {} producer(s), {} consumer(s), {} partition(s), {} B messages, batch {}, acks {}, shard-aware {}{rate}\n",
            self.workload,
            self.producers,
            self.consumers,
            self.partitions,
            self.message_size,
            self.batch_size,
            self.acks,
            if self.shard_aware { "on" } else { "off" },
        ));
        text.push_str(&format!(
            "client cpus: {}; server cpus: {}\n",
            self.client_cpus, self.server_cpus
        ));
        if self.server_cpu_percent >= 0.0 {
            text.push_str(&format!(
                "server cpu: {:.2}% of one core over the measured window, {:.3} s per million messages\n",
                self.server_cpu_percent,
                self.server_cpu_s_per_million()
            ));
        }
        text.push_str(&format!(
            "\n{:<9} {:>12} {:>14} {:>10} {:>14} {:>10}\n",
            "side", "messages", "bytes", "seconds", "msg/s", "MB/s"
        ));
        for (name, side) in [("produce", &self.produced), ("consume", &self.consumed)] {
            text.push_str(&format!(
                "{:<9} {:>12} {:>14} {:>10.3} {:>14.0} {:>10.1}\n",
                name,
                side.messages,
                side.bytes,
                side.duration_s,
                side.msgs_per_s(),
                side.mb_per_s()
            ));
        }
        text.push_str(&format!(
            "\n{:<12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
            "latency us", "p50", "p90", "p99", "p99.9", "p99.99", "max", "count"
        ));
        for (name, p) in [
            ("produce ack", &self.produce_latency),
            ("end-to-end", &self.e2e_latency),
        ] {
            text.push_str(&format!(
                "{:<12} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10}\n",
                name, p.p50, p.p90, p.p99, p.p999, p.p9999, p.max, p.count
            ));
        }
        if self.workload == "queue" {
            let queue = &self.queue;
            text.push_str(&format!(
                "{:<12} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10}\n",
                "receive-ack",
                queue.receive_ack_latency.p50,
                queue.receive_ack_latency.p90,
                queue.receive_ack_latency.p99,
                queue.receive_ack_latency.p999,
                queue.receive_ack_latency.p9999,
                queue.receive_ack_latency.max,
                queue.receive_ack_latency.count
            ));
            text.push_str(&format!(
                "\nqueue: {} worker(s), receive batch {}, ack batch {}, fail rate {}: acked {} ({:.0} msg/s), dead-lettered {}, nacks {}, redelivered {}, refused settles {}\n",
                queue.workers,
                queue.receive_batch,
                queue.ack_batch,
                queue.fail_rate,
                queue.acked,
                self.consumed.msgs_per_s(),
                queue.dead_lettered,
                queue.nacked,
                queue.redelivered,
                queue.refused
            ));
        }
        if self.unsent_due > 0 {
            text.push_str(&format!(
                "\nRATE NOT MET: {} messages were due before the end but never sent (the producer fell behind)\n",
                self.unsent_due
            ));
        }
        text.push_str(&format!(
            "\nverified {} consumed messages (count, per-partition order, checksum)\n",
            self.verified
        ));
        text
    }
}

/// Keys every `--json` object has; the integration test and bench-all.sh rely on them.
pub const REQUIRED_KEYS: [&str; 15] = [
    "workload",
    "messages",
    "message_size",
    "batch_size",
    "acks",
    "producers",
    "consumers",
    "partitions",
    "duration_s",
    "produce_msgs_per_s",
    "produce_mb_per_s",
    "consume_msgs_per_s",
    "consume_mb_per_s",
    "produce_latency_us",
    "e2e_latency_us",
];

/// Keys of each latency object.
pub const PERCENTILE_KEYS: [&str; 6] = ["p50", "p90", "p99", "p999", "p9999", "max"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_known_distribution() {
        let mut histogram = latency_histogram();
        // 1..=10_000 us, one each.
        for us in 1..=10_000u64 {
            histogram.record(us * 1_000).unwrap();
        }
        let p = Percentiles::of(&histogram);
        let close = |value: f64, expected: f64| (value - expected).abs() / expected < 0.002;
        assert!(close(p.p50, 5_000.0), "{p:?}");
        assert!(close(p.p90, 9_000.0), "{p:?}");
        assert!(close(p.p99, 9_900.0), "{p:?}");
        assert!(close(p.p999, 9_990.0), "{p:?}");
        assert!(close(p.max, 10_000.0), "{p:?}");
        assert_eq!(p.count, 10_000);
    }

    #[test]
    fn empty_side_reports_zeros() {
        assert_eq!(
            Percentiles::of(&latency_histogram()),
            Percentiles::default()
        );
        assert_eq!(SideTotals::default().msgs_per_s(), 0.0);
    }

    #[test]
    fn json_has_every_required_key_as_numbers() {
        let report = Report {
            workload: "produce".into(),
            acks: "durable".into(),
            produced: SideTotals {
                messages: 1_000,
                bytes: 1_024_000,
                duration_s: 0.5,
            },
            ..Report::default()
        };
        let value = report.to_json();
        for key in REQUIRED_KEYS {
            assert!(value.get(key).is_some(), "missing {key}");
        }
        for key in ["produce_latency_us", "e2e_latency_us"] {
            for percentile in PERCENTILE_KEYS {
                assert!(
                    value[key][percentile].is_number(),
                    "{key}.{percentile} is not a number"
                );
            }
        }
        assert_eq!(value["produce_msgs_per_s"].as_f64(), Some(2_000.0));
        assert_eq!(value["produce_mb_per_s"].as_f64(), Some(2.048));
        assert_eq!(value["consume_msgs_per_s"].as_f64(), Some(0.0));
        assert_eq!(value["messages"].as_u64(), Some(1_000));
        assert!(value["acks"].is_string() && value["workload"].is_string());
    }
}
