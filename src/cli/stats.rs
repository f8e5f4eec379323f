//! `shardq stats`: per shard and per partition rates, offsets, bytes and durable lag, and
//! every group's lag, from the Stats and DescribeGroups operations (not the HTTP
//! endpoint, so it works wherever the broker's port does).
//!
//! Rates need two answers: `stats` asks twice, `--interval-ms` apart, and prints the
//! second with the rates between them; `--watch` goes on asking and prints each interval.
//! `--json` prints one JSON document per interval, documented in docs/operations.md
//! ("shardq stats") and kept stable: fields are only ever added.

use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};

use shardq::client::{Client, ClientError};
use shardq::protocol::queue::GroupDescription;
use shardq::protocol::{ErrorCode, StatsResponse};

use super::{client_context, connect, queue, write_stdout, CliError, ServerArgs};

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Only these topics' partitions and groups (repeatable; default: every topic).
    #[arg(long = "topic", value_name = "T")]
    pub topics: Vec<String>,
    /// Time between the two answers rates are computed from.
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub interval_ms: u64,
    /// Print every interval until interrupted (or `--count` times).
    #[arg(long)]
    pub watch: bool,
    /// With `--watch`: stop after this many reports.
    #[arg(long, value_name = "N", requires = "watch", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// One JSON document per report instead of tables.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// One answer and when it came.
struct Sample {
    at: Instant,
    stats: StatsResponse,
}

pub async fn run(args: StatsArgs) -> Result<(), CliError> {
    let client = connect(&args.server).await?;
    let interval = Duration::from_millis(args.interval_ms);
    let mut previous = sample(&client, &args.topics).await?;
    let mut reports = 0u64;
    loop {
        tokio::time::sleep(interval).await;
        let current = sample(&client, &args.topics).await?;
        let groups = groups(&client, &current.stats).await?;
        let seconds = current.at.duration_since(previous.at).as_secs_f64();
        let report = report_json(&previous.stats, &current.stats, &groups, seconds);
        let text = if args.json {
            format!("{report}\n")
        } else {
            report_text(&report)
        };
        write_stdout(&text)?;
        reports += 1;
        if !args.watch || args.count.is_some_and(|count| reports >= count) {
            return Ok(());
        }
        previous = current;
    }
}

async fn sample(client: &Client, topics: &[String]) -> Result<Sample, CliError> {
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    let stats = client
        .stats(&topics)
        .await
        .map_err(client_context("reading the broker's stats"))?;
    Ok(Sample {
        at: Instant::now(),
        stats,
    })
}

/// The groups of every topic in the answer, by topic.
async fn groups(
    client: &Client,
    stats: &StatsResponse,
) -> Result<Vec<(String, Vec<GroupDescription>)>, CliError> {
    let mut topics: Vec<&str> = stats
        .partitions
        .iter()
        .map(|partition| partition.topic.as_str())
        .collect();
    topics.dedup();
    let mut out = Vec::with_capacity(topics.len());
    for topic in topics {
        match client.describe_groups(topic, None).await {
            Ok(described) => out.push((topic.to_owned(), described)),
            // Deleted since the stats were read: no groups to show.
            Err(ClientError::UnknownTopic { .. }) => {}
            Err(ClientError::Broker(error)) if error.code == ErrorCode::UnknownTopic => {}
            Err(error) => {
                let context = format!("describing the groups of {topic:?}");
                return Err(client_context(context)(error));
            }
        }
    }
    Ok(out)
}

/// Per second, from two counter readings (0 when the counter went back: a restart).
fn rate(before: u64, after: u64, seconds: f64) -> f64 {
    if seconds <= 0.0 || after < before {
        return 0.0;
    }
    ((after - before) as f64 / seconds * 10.0).round() / 10.0
}

/// The report as JSON: the documented form of `stats --json`.
fn report_json(
    before: &StatsResponse,
    after: &StatsResponse,
    groups: &[(String, Vec<GroupDescription>)],
    seconds: f64,
) -> Value {
    let shards: Vec<Value> = after
        .shards
        .iter()
        .map(|shard| {
            let earlier = before
                .shards
                .iter()
                .find(|other| other.shard == shard.shard);
            let (requests, errors, busy) = earlier.map_or((0, 0, 0), |earlier| {
                (
                    earlier.requests_total,
                    earlier.errors_total,
                    earlier.busy_ms,
                )
            });
            json!({
                "shard": shard.shard,
                "connections_open": shard.connections_open,
                "requests_in_flight": shard.requests_in_flight,
                "bytes_in_flight": shard.bytes_in_flight,
                "requests_total": shard.requests_total,
                "errors_total": shard.errors_total,
                "busy_ms_total": shard.busy_ms,
                "requests_per_second": rate(requests, shard.requests_total, seconds),
                "errors_per_second": rate(errors, shard.errors_total, seconds),
                "busy_percent": rate(busy, shard.busy_ms, seconds) / 10.0,
            })
        })
        .collect();
    let partitions: Vec<Value> = after
        .partitions
        .iter()
        .map(|partition| {
            let earlier = before
                .partitions
                .iter()
                .find(|other| other.topic == partition.topic && other.partition == partition.partition);
            // A partition new since the first answer has no rate yet (its totals are not
            // one interval's worth): `rate` gives 0 for a counter "gone back".
            let previous = |field: fn(&shardq::protocol::PartitionStats) -> u64| {
                earlier.map_or(u64::MAX, field)
            };
            json!({
                "topic": partition.topic,
                "partition": partition.partition,
                "shard": partition.shard,
                "log_start_offset": partition.log_start_offset,
                "log_end_offset": partition.log_end_offset,
                "high_watermark": partition.high_watermark,
                "durable_lag": partition.log_end_offset - partition.high_watermark.min(partition.log_end_offset),
                "bytes": partition.bytes,
                "segments": partition.segments,
                "records_in_total": partition.records_in,
                "bytes_in_total": partition.bytes_in,
                "records_out_total": partition.records_out,
                "bytes_out_total": partition.bytes_out,
                "records_in_per_second": rate(previous(|p| p.records_in), partition.records_in, seconds),
                "bytes_in_per_second": rate(previous(|p| p.bytes_in), partition.bytes_in, seconds),
                "records_out_per_second": rate(previous(|p| p.records_out), partition.records_out, seconds),
                "bytes_out_per_second": rate(previous(|p| p.bytes_out), partition.bytes_out, seconds),
            })
        })
        .collect();
    let groups: Vec<Value> = groups
        .iter()
        .flat_map(|(topic, described)| {
            described.iter().map(move |group| {
                let mut value = queue::group_json(group);
                value["topic"] = json!(topic);
                value
            })
        })
        .collect();
    json!({
        "interval_ms": (seconds * 1000.0).round() as u64,
        "shards": shards,
        "partitions": partitions,
        "groups": groups,
    })
}

/// The report as tables, from its JSON form (so the two never disagree).
fn report_text(report: &Value) -> String {
    let number = |value: &Value, key: &str| value[key].to_string();
    let mut text = format!(
        "over {} ms\nshard\tconnections\tin_flight\tbytes_in_flight\trequests/s\terrors/s\tbusy%\n",
        report["interval_ms"]
    );
    for shard in report["shards"].as_array().into_iter().flatten() {
        text.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
            number(shard, "shard"),
            number(shard, "connections_open"),
            number(shard, "requests_in_flight"),
            number(shard, "bytes_in_flight"),
            number(shard, "requests_per_second"),
            number(shard, "errors_per_second"),
            number(shard, "busy_percent"),
        ));
    }
    text.push_str("\ntopic\tpartition\tshard\tstart\tend\tdurable\tdurable_lag\tbytes\tsegments\tin/s\tout/s\tin_bytes/s\tout_bytes/s\n");
    for partition in report["partitions"].as_array().into_iter().flatten() {
        text.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
            partition["topic"].as_str().unwrap_or_default(),
            number(partition, "partition"),
            number(partition, "shard"),
            number(partition, "log_start_offset"),
            number(partition, "log_end_offset"),
            number(partition, "high_watermark"),
            number(partition, "durable_lag"),
            number(partition, "bytes"),
            number(partition, "segments"),
            number(partition, "records_in_per_second"),
            number(partition, "records_out_per_second"),
            number(partition, "bytes_in_per_second"),
            number(partition, "bytes_out_per_second"),
        ));
    }
    let groups = report["groups"].as_array().cloned().unwrap_or_default();
    if !groups.is_empty() {
        text.push_str("\ntopic\tgroup\tkind\tpartitions\tlag\tin_flight\n");
        for group in &groups {
            let partitions = group["partitions"].as_array().cloned().unwrap_or_default();
            let in_flight: u64 = partitions
                .iter()
                .filter_map(|partition| partition["in_flight"].as_u64())
                .sum();
            text.push_str(&format!(
                "{}\t{}\t{}\t{}\t{}\t{in_flight}\n",
                group["topic"].as_str().unwrap_or_default(),
                group["name"].as_str().unwrap_or_default(),
                group["kind"].as_str().unwrap_or_default(),
                partitions.len(),
                number(group, "lag"),
            ));
        }
    }
    text
}

/// `topic describe`'s per-partition log figures: (start, end, durable, bytes, segments).
pub fn partition_figures(stats: &StatsResponse, topic: &str, partition: u32) -> Option<Value> {
    stats
        .partitions
        .iter()
        .find(|stats| stats.topic == topic && stats.partition == partition)
        .map(|stats| {
            json!({
                "log_start_offset": stats.log_start_offset,
                "log_end_offset": stats.log_end_offset,
                "high_watermark": stats.high_watermark,
                "bytes": stats.bytes,
                "segments": stats.segments,
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardq::protocol::{PartitionStats, ShardStats};

    fn stats(records_in: u64, requests: u64) -> StatsResponse {
        StatsResponse {
            shards: vec![ShardStats {
                shard: 0,
                requests_total: requests,
                busy_ms: requests,
                ..ShardStats::default()
            }],
            partitions: vec![PartitionStats {
                topic: "orders".into(),
                partition: 0,
                log_end_offset: records_in,
                high_watermark: records_in.saturating_sub(2),
                records_in,
                ..PartitionStats::default()
            }],
        }
    }

    #[test]
    fn rates_come_from_two_answers_and_survive_a_restart() {
        let report = report_json(&stats(100, 10), &stats(300, 30), &[], 2.0);
        assert_eq!(report["interval_ms"], 2000);
        assert_eq!(report["partitions"][0]["records_in_per_second"], 100.0);
        assert_eq!(report["partitions"][0]["durable_lag"], 2);
        assert_eq!(report["shards"][0]["requests_per_second"], 10.0);
        // 20 ms busy over 2 s: 1%.
        assert_eq!(report["shards"][0]["busy_percent"], 1.0);
        // Counters went back (the broker restarted between the answers): no negative rate.
        let report = report_json(&stats(300, 30), &stats(5, 1), &[], 1.0);
        assert_eq!(report["partitions"][0]["records_in_per_second"], 0.0);
        let text = report_text(&report);
        assert!(text.contains("orders\t0\t0\t0\t5\t3\t2\t"), "{text}");
    }
}
