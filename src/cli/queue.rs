//! The queue-group commands of `shardq`: `receive`, `ack`, `nack`, `group list|describe`
//! and `dlq list|peek|redrive|purge`, plus how `topic describe` shows queue settings.
//!
//! Output conventions are those of `consume --json`: one JSON object per line, bytes
//! decoded as UTF-8 with invalid bytes replaced. A delivery handle is printed and parsed
//! as `partition:offset:attempt`.
//!
//! `dlq redrive` is resumable: it reads the dead-letter topic as the stream group
//! [`REDRIVE_GROUP`], and commits each partition's position once the records before it
//! are durably re-published. Interrupted, it starts again from the last commit, so at
//! most the records of one unfinished fetch are published twice.

use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Map, Value};

use super::{
    client_context, write_stdout, AckArgs, CliError, DlqCommand, GroupCommand, NackArgs,
    ReceiveArgs,
};
use shardq::client::{
    Client, ClientError, GroupDescription, GroupKind, GroupPartition, Handle, NackDelay, Producer,
    ProducerConfig, ProducerRecord, QueueConsumer, QueueMessage, QueueSettings, ReceivedMessage,
    Record, SettleOutcome,
};
use shardq::protocol::queue::{headers, ExpiryPolicy, QueueOrdering, COMMITTED_NONE};
use shardq::protocol::ErrorCode;

/// The stream group `dlq redrive` keeps its progress in, on the dead-letter topic.
pub const REDRIVE_GROUP: &str = "shardq-redrive";
/// Bytes one `dlq` fetch asks of a partition.
const DLQ_FETCH_BYTES_MAX: u32 = 1 << 20;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn headers_json(headers: &[(String, Bytes)]) -> Map<String, Value> {
    headers
        .iter()
        .map(|(name, value)| (name.clone(), Value::String(text(value))))
        .collect()
}

/// One line of `receive`.
pub fn received_json(message: &QueueMessage) -> Value {
    received_json_of(message.as_received())
}

pub fn received_json_of(message: &ReceivedMessage) -> Value {
    json!({
        "handle": message.handle.to_string(),
        "partition": message.handle.partition,
        "offset": message.handle.offset,
        "attempt": message.handle.attempt,
        "timestamp_ms": message.timestamp_ms,
        "key": message.key.as_deref().map(text),
        "value": text(&message.value),
        "headers": headers_json(&message.headers),
    })
}

/// A dead-letter header's value as JSON: the little-endian numbers as numbers, the rest
/// as text. A number header of the wrong length is shown as text, not guessed at.
fn dlq_header_json(name: &str, value: &[u8]) -> Value {
    match name {
        headers::SOURCE_PARTITION | headers::ATTEMPTS => match <[u8; 4]>::try_from(value) {
            Ok(bytes) => json!(u32::from_le_bytes(bytes)),
            Err(_) => Value::String(text(value)),
        },
        headers::SOURCE_OFFSET | headers::DEAD_LETTERED_AT_MS => match <[u8; 8]>::try_from(value) {
            Ok(bytes) => json!(u64::from_le_bytes(bytes)),
            Err(_) => Value::String(text(value)),
        },
        _ => Value::String(text(value)),
    }
}

/// One line of `dlq peek`.
pub fn dlq_record_json(partition: u32, record: &Record) -> Value {
    let headers: Map<String, Value> = record
        .headers
        .iter()
        .map(|(name, value)| (name.clone(), dlq_header_json(name, value)))
        .collect();
    json!({
        "partition": partition,
        "offset": record.offset,
        "timestamp_ms": record.timestamp_ms,
        "key": record.key.as_deref().map(text),
        "value": text(&record.value),
        "headers": headers,
    })
}

/// Prints the lines, stopping quietly if the reader went away (`| head`).
fn print_lines(lines: &str) -> Result<(), CliError> {
    match write_stdout(lines) {
        Err(CliError::Io { source, .. }) if source.kind() == std::io::ErrorKind::BrokenPipe => {
            Ok(())
        }
        other => other,
    }
}

/// `Ok` unless the broker refused a handle; an ack answered "already settled" (a retried
/// ack, say) is reported on stderr but is not a failure.
fn settle_result(outcome: SettleOutcome) -> Result<(), CliError> {
    for handle in outcome.already_settled() {
        if outcome.kind == shardq::client::SettleKind::Ack {
            eprintln!("shardq: {handle} was already settled (acked before, or no longer stored)");
        }
    }
    let refused: Vec<_> = outcome.failures().cloned().collect();
    if refused.is_empty() {
        return Ok(());
    }
    Err(CliError::HandlesRefused {
        operation: outcome.kind.name(),
        refused,
    })
}

pub async fn receive(client: Client, args: ReceiveArgs) -> Result<(), CliError> {
    let failed = || {
        client_context(format!(
            "receiving from topic {:?} group {:?}",
            args.topic, args.group
        ))
    };
    let consumer = QueueConsumer::builder(client, &args.topic, &args.group)
        .build()
        .map_err(failed())?;
    let visibility = args
        .visibility_ms
        .map(|ms| Duration::from_millis(u64::from(ms)));
    let messages = consumer
        .receive(
            args.max,
            visibility,
            Duration::from_millis(u64::from(args.wait_ms)),
        )
        .await
        .map_err(failed())?;
    let mut lines = String::new();
    for message in &messages {
        lines.push_str(&received_json(message).to_string());
        lines.push('\n');
    }
    print_lines(&lines)?;
    if args.ack && !messages.is_empty() {
        let handles: Vec<Handle> = messages.iter().map(QueueMessage::handle).collect();
        let outcome = consumer.ack(&handles).await.map_err(failed())?;
        settle_result(outcome)?;
    }
    Ok(())
}

pub async fn ack(client: Client, args: AckArgs) -> Result<(), CliError> {
    let consumer = client.queue_consumer(&args.topic, &args.group);
    let outcome = consumer
        .ack(&args.handles)
        .await
        .map_err(client_context(format!(
            "acking on topic {:?} group {:?}",
            args.topic, args.group
        )))?;
    settle_result(outcome)
}

pub async fn nack(client: Client, args: NackArgs) -> Result<(), CliError> {
    let consumer = client.queue_consumer(&args.topic, &args.group);
    let delay = match args.delay_ms {
        Some(ms) => NackDelay::Ms(ms),
        None => NackDelay::Backoff,
    };
    let outcome = consumer
        .nack(&args.handles, delay, &args.reason)
        .await
        .map_err(client_context(format!(
            "nacking on topic {:?} group {:?}",
            args.topic, args.group
        )))?;
    settle_result(outcome)
}

fn kind_name(kind: GroupKind) -> &'static str {
    match kind {
        GroupKind::Stream => "stream",
        GroupKind::Queue => "queue",
    }
}

fn partition_json(kind: GroupKind, partition: &GroupPartition) -> Value {
    let mut value = json!({
        "partition": partition.partition,
        "log_start_offset": partition.log_start_offset,
        "high_watermark": partition.high_watermark,
        "lag": partition.lag(),
    });
    let object = value.as_object_mut().expect("an object");
    match kind {
        GroupKind::Stream => {
            let committed = (partition.position != COMMITTED_NONE).then_some(partition.position);
            object.insert("committed".into(), json!(committed));
        }
        GroupKind::Queue => {
            for (key, number) in [
                ("ack_floor", partition.position),
                ("in_flight", u64::from(partition.in_flight)),
                ("waiting", u64::from(partition.waiting)),
                ("dead_lettering", u64::from(partition.dead_lettering)),
                ("acked", partition.acked),
                ("dead_lettered", partition.dead_lettered),
                ("expired_dropped", partition.expired_dropped),
                ("lost_to_retention", partition.lost_to_retention),
                ("oldest_unacked_age_ms", partition.oldest_unacked_age_ms),
            ] {
                object.insert(key.into(), json!(number));
            }
        }
    }
    value
}

pub fn group_json(group: &GroupDescription) -> Value {
    let partitions: Vec<Value> = group
        .partitions
        .iter()
        .map(|partition| partition_json(group.kind, partition))
        .collect();
    json!({
        "name": group.name,
        "kind": kind_name(group.kind),
        "lag": group.partitions.iter().map(GroupPartition::lag).sum::<u64>(),
        "partitions": partitions,
    })
}

/// `group describe`'s text: a line per group, then a table of its partitions.
pub fn group_text(group: &GroupDescription) -> String {
    let lag: u64 = group.partitions.iter().map(GroupPartition::lag).sum();
    let mut text = format!(
        "group {} ({}): {} partition(s), lag {lag}\n",
        group.name,
        kind_name(group.kind),
        group.partitions.len()
    );
    match group.kind {
        GroupKind::Stream => {
            text.push_str("partition\tcommitted\tlog_start\thigh_watermark\tlag\n");
            for partition in &group.partitions {
                let committed = if partition.position == COMMITTED_NONE {
                    "none".to_owned()
                } else {
                    partition.position.to_string()
                };
                text.push_str(&format!(
                    "{}\t{committed}\t{}\t{}\t{}\n",
                    partition.partition,
                    partition.log_start_offset,
                    partition.high_watermark,
                    partition.lag()
                ));
            }
        }
        GroupKind::Queue => {
            text.push_str(
                "partition\tack_floor\tlog_start\thigh_watermark\tlag\tin_flight\twaiting\tdead_lettering\tacked\tdead_lettered\texpired_dropped\tlost_to_retention\toldest_unacked_age_ms\n",
            );
            for p in &group.partitions {
                text.push_str(&format!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
                    p.partition,
                    p.position,
                    p.log_start_offset,
                    p.high_watermark,
                    p.lag(),
                    p.in_flight,
                    p.waiting,
                    p.dead_lettering,
                    p.acked,
                    p.dead_lettered,
                    p.expired_dropped,
                    p.lost_to_retention,
                    p.oldest_unacked_age_ms
                ));
            }
        }
    }
    text
}

pub async fn group(client: &Client, command: GroupCommand) -> Result<(), CliError> {
    match command {
        GroupCommand::List { topic, json } => {
            let groups = client
                .describe_groups(&topic, None)
                .await
                .map_err(client_context(format!("listing groups of topic {topic:?}")))?;
            let text = if json {
                let list: Vec<Value> = groups
                    .iter()
                    .map(|group| {
                        json!({
                            "name": group.name,
                            "kind": kind_name(group.kind),
                            "partitions": group.partitions.len(),
                            "lag": group.partitions.iter().map(GroupPartition::lag).sum::<u64>(),
                            "in_flight": group.partitions.iter().map(|p| u64::from(p.in_flight)).sum::<u64>(),
                        })
                    })
                    .collect();
                format!("{}\n", json!({ "topic": topic, "groups": list }))
            } else {
                groups
                    .iter()
                    .map(|group| {
                        format!(
                            "{}\tkind={}\tpartitions={}\tlag={}\tin_flight={}\n",
                            group.name,
                            kind_name(group.kind),
                            group.partitions.len(),
                            group
                                .partitions
                                .iter()
                                .map(GroupPartition::lag)
                                .sum::<u64>(),
                            group
                                .partitions
                                .iter()
                                .map(|p| u64::from(p.in_flight))
                                .sum::<u64>()
                        )
                    })
                    .collect()
            };
            print_lines(&text)
        }
        GroupCommand::Describe { topic, group, json } => {
            let groups = client
                .describe_groups(&topic, group.as_deref())
                .await
                .map_err(client_context(format!(
                    "describing groups of topic {topic:?}"
                )))?;
            if let Some(group) = group {
                if groups.is_empty() {
                    return Err(CliError::UnknownGroup { topic, group });
                }
            }
            let text = if json {
                let list: Vec<Value> = groups.iter().map(group_json).collect();
                format!("{}\n", json!({ "topic": topic, "groups": list }))
            } else {
                groups.iter().map(group_text).collect::<Vec<_>>().join("\n")
            };
            print_lines(&text)
        }
        GroupCommand::Alter {
            topic,
            group,
            retry_delay_ms_min,
            retry_delay_ms_max,
        } => {
            let settings = QueueSettings {
                retry_delay_ms_min,
                retry_delay_ms_max,
                ..QueueSettings::default()
            };
            client
                .alter_group(&topic, &group, settings)
                .await
                .map_err(client_context(format!(
                    "altering group {group:?} of topic {topic:?}"
                )))?;
            print_lines(&format!("altered group {group} of topic {topic}\n"))
        }
    }
}

/// The queue settings as `topic describe --json` shows them.
pub fn settings_json(topic: &str, settings: &QueueSettings) -> Value {
    json!({
        "max_deliveries": settings.deliveries_max,
        "visibility_ms": settings.visibility_timeout_ms,
        "retry_delay_ms_min": settings.retry_delay_ms_min,
        "retry_delay_ms_max": settings.retry_delay_ms_max,
        "message_ttl_ms": settings.message_ttl_ms,
        "expiry_policy": settings.expiry_policy.map(expiry_name),
        "ordering": settings.ordering.map(ordering_name),
        "dlq": dlq_topic_name(topic, settings),
    })
}

fn expiry_name(policy: ExpiryPolicy) -> &'static str {
    match policy {
        ExpiryPolicy::Drop => "drop",
        ExpiryPolicy::DeadLetter => "dead-letter",
    }
}

fn ordering_name(ordering: QueueOrdering) -> &'static str {
    match ordering {
        QueueOrdering::Unordered => "unordered",
        QueueOrdering::PerKey => "per-key",
    }
}

/// The queue settings as `topic describe` shows them, one line.
pub fn settings_text(topic: &str, settings: &QueueSettings) -> String {
    let number = |value: Option<u64>| value.map_or_else(|| "default".to_owned(), |v| v.to_string());
    let ttl = match settings.message_ttl_ms {
        Some(0) => "none".to_owned(),
        None => "default".to_owned(),
        Some(ms) => format!("{ms} ms"),
    };
    format!(
        "queue: max deliveries {}, visibility {} ms, retry delay {}..{} ms, message ttl {ttl}, expiry {}, ordering {}, dlq {}",
        number(settings.deliveries_max.map(u64::from)),
        number(settings.visibility_timeout_ms),
        number(settings.retry_delay_ms_min),
        number(settings.retry_delay_ms_max),
        settings.expiry_policy.map_or("default", expiry_name),
        settings.ordering.map_or("default", ordering_name),
        dlq_topic_name(topic, settings)
    )
}

/// The topic's dead-letter topic: its setting, else `<topic>.dlq`.
pub fn dlq_topic_name(topic: &str, settings: &QueueSettings) -> String {
    match &settings.dlq_topic {
        Some(dlq) if !dlq.is_empty() => dlq.clone(),
        _ => format!("{topic}.dlq"),
    }
}

/// A dead-letter topic's name and its partitions' `(partition, start, end)`; no
/// partitions when it does not exist yet (nothing was dead-lettered).
async fn dlq_layout(
    client: &Client,
    topic: &str,
) -> Result<(String, Vec<(u32, u64, u64)>), CliError> {
    let failed = || client_context(format!("reading the metadata of topic {topic:?}"));
    let metadata = client.metadata(&[topic]).await.map_err(failed())?;
    let source = metadata
        .topics
        .iter()
        .find(|entry| entry.name == topic)
        .ok_or_else(|| CliError::UnknownTopic {
            topic: topic.to_owned(),
        })?;
    if let Some(error) = &source.error {
        if error.code == ErrorCode::UnknownTopic {
            return Err(CliError::UnknownTopic {
                topic: topic.to_owned(),
            });
        }
        return Err(failed()(ClientError::Broker(error.clone())));
    }
    let dlq = dlq_topic_name(topic, &source.queue);
    let failed = || client_context(format!("reading dead-letter topic {dlq:?}"));
    let metadata = client.metadata(&[dlq.as_str()]).await.map_err(failed())?;
    let Some(entry) = metadata
        .topics
        .into_iter()
        .find(|entry| entry.name == dlq && entry.error.is_none())
    else {
        return Ok((dlq, Vec::new()));
    };
    let mut partitions = Vec::with_capacity(entry.partitions.len());
    for partition in entry.partitions {
        let (start, end) = client
            .partition_offsets(&dlq, partition.partition)
            .await
            .map_err(failed())?;
        partitions.push((partition.partition, start, end));
    }
    partitions.sort_unstable();
    Ok((dlq, partitions))
}

pub async fn dlq(client: Client, command: DlqCommand) -> Result<(), CliError> {
    match command {
        DlqCommand::List { topic, json } => {
            let (dlq, partitions) = dlq_layout(&client, &topic).await?;
            let total: u64 = partitions.iter().map(|(_, start, end)| end - start).sum();
            let text = if json {
                let list: Vec<Value> = partitions
                    .iter()
                    .map(|(partition, start, end)| {
                        json!({ "partition": partition, "start": start, "end": end, "count": end - start })
                    })
                    .collect();
                format!(
                    "{}\n",
                    json!({ "topic": topic, "dlq": dlq, "count": total, "partitions": list })
                )
            } else {
                let mut text = format!("dead-letter topic {dlq}: {total} record(s)\n");
                for (partition, start, end) in &partitions {
                    text.push_str(&format!(
                        "partition {partition}\tstart {start}\tend {end}\tcount {}\n",
                        end - start
                    ));
                }
                text
            };
            print_lines(&text)
        }
        DlqCommand::Peek { topic, max } => {
            let (dlq, partitions) = dlq_layout(&client, &topic).await?;
            let failed = || client_context(format!("reading dead-letter topic {dlq:?}"));
            let mut remaining = max;
            let mut lines = String::new();
            for (partition, start, end) in partitions {
                let mut next = start;
                while next < end && remaining > 0 {
                    let fetched = client
                        .fetch_records(&dlq, partition, next, 0, DLQ_FETCH_BYTES_MAX)
                        .await
                        .map_err(failed())?;
                    let Some(last) = fetched.records.last() else {
                        break;
                    };
                    next = last.offset + 1;
                    for record in fetched.records.iter().filter(|record| record.offset < end) {
                        if remaining == 0 {
                            break;
                        }
                        lines.push_str(&dlq_record_json(partition, record).to_string());
                        lines.push('\n');
                        remaining -= 1;
                    }
                }
            }
            print_lines(&lines)
        }
        DlqCommand::Redrive { topic } => {
            let count = redrive(&client, &topic).await?;
            write_stdout(&format!("{count}\n"))
        }
        DlqCommand::Purge { topic } => {
            let (dlq, partitions) = dlq_layout(&client, &topic).await?;
            if partitions.is_empty() {
                return write_stdout("0\n");
            }
            let purged = client
                .purge_topic(&dlq)
                .await
                .map_err(client_context(format!("purging dead-letter topic {dlq:?}")))?;
            let count: u64 = purged.iter().map(|partition| partition.records).sum();
            write_stdout(&format!("{count}\n"))
        }
    }
}

/// Where a dead-lettered record goes back to: its source topic and partition (from its
/// headers; `fallback_topic` when it names none) and the record without the shardq-*
/// headers.
pub fn redrive_record(fallback_topic: &str, record: &Record) -> (String, ProducerRecord) {
    let header = |name: &str| {
        record
            .headers
            .iter()
            .find(|(header, _)| header == name)
            .map(|(_, value)| value)
    };
    let topic = header(headers::SOURCE_TOPIC)
        .map(|value| text(value))
        .filter(|topic| !topic.is_empty())
        .unwrap_or_else(|| fallback_topic.to_owned());
    let partition = header(headers::SOURCE_PARTITION)
        .and_then(|value| <[u8; 4]>::try_from(value.as_ref()).ok())
        .map(u32::from_le_bytes);
    let kept: Vec<(String, Bytes)> = record
        .headers
        .iter()
        .filter(|(name, _)| !name.starts_with("shardq-"))
        .cloned()
        .collect();
    let produced = ProducerRecord {
        key: record.key.clone(),
        value: record.value.clone(),
        headers: kept,
        partition,
    };
    (topic, produced)
}

/// Re-publishes every dead-lettered record of `topic` that the redrive group has not
/// passed yet, up to each partition's end when it started; returns how many.
async fn redrive(client: &Client, topic: &str) -> Result<u64, CliError> {
    let (dlq, partitions) = dlq_layout(client, topic).await?;
    if partitions.is_empty() {
        return Ok(0);
    }
    let failed = || client_context(format!("redriving dead-letter topic {dlq:?}"));
    let committed = client
        .committed_offsets(REDRIVE_GROUP, &dlq, &[])
        .await
        .map_err(failed())?;
    let producer = Producer::new(client.clone(), ProducerConfig::default()).map_err(failed())?;
    let mut count = 0u64;
    for (partition, start, end) in partitions {
        let mut next = committed
            .iter()
            .find(|position| position.partition == partition)
            .and_then(|position| position.resume_offset())
            .unwrap_or(start)
            .max(start);
        while next < end {
            let fetched = client
                .fetch_records(&dlq, partition, next, 0, DLQ_FETCH_BYTES_MAX)
                .await
                .map_err(failed())?;
            let records: Vec<&Record> = fetched
                .records
                .iter()
                .filter(|record| record.offset < end)
                .collect();
            let Some(last) = records.last() else {
                break;
            };
            let resume_at = last.offset + 1;
            let mut sends = Vec::with_capacity(records.len());
            for record in &records {
                let (target, produced) = redrive_record(topic, record);
                sends.push(producer.send(&target, produced).await.map_err(failed())?);
            }
            producer.flush().await.map_err(failed())?;
            for send in sends {
                send.await.map_err(failed())?;
            }
            // Only now, with every record of this fetch durable in its source topic.
            client
                .commit_offsets(REDRIVE_GROUP, &dlq, &[(partition, resume_at)])
                .await
                .map_err(failed())?;
            count += records.len() as u64;
            next = resume_at;
        }
    }
    producer.close().await.map_err(failed())?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dlq_headers_show_numbers_as_numbers_and_the_rest_as_text() {
        let record = Record {
            offset: 4,
            timestamp_ms: 9,
            key: Some(Bytes::from_static(b"k")),
            value: Bytes::from_static(b"v"),
            headers: vec![
                (headers::SOURCE_TOPIC.into(), Bytes::from_static(b"orders")),
                (
                    headers::SOURCE_PARTITION.into(),
                    Bytes::copy_from_slice(&3u32.to_le_bytes()),
                ),
                (
                    headers::SOURCE_OFFSET.into(),
                    Bytes::copy_from_slice(&17u64.to_le_bytes()),
                ),
                (
                    headers::ATTEMPTS.into(),
                    Bytes::copy_from_slice(&5u32.to_le_bytes()),
                ),
                (
                    headers::DEAD_LETTER_CAUSE.into(),
                    Bytes::from_static(b"nacked"),
                ),
                (headers::REASON.into(), Bytes::from_static(b"bad \xff")),
                (
                    headers::DEAD_LETTERED_AT_MS.into(),
                    Bytes::copy_from_slice(&1_700_000_000_000u64.to_le_bytes()),
                ),
                // A number header of the wrong length stays text.
                (headers::ATTEMPTS.into(), Bytes::from_static(b"xy")),
                ("app".into(), Bytes::from_static(b"1")),
            ],
        };
        let value = dlq_record_json(2, &record);
        assert_eq!(value["partition"], 2);
        assert_eq!(value["offset"], 4);
        assert_eq!(value["key"], "k");
        let headers = &value["headers"];
        assert_eq!(headers["shardq-source-topic"], "orders");
        assert_eq!(headers["shardq-source-partition"], 3);
        assert_eq!(headers["shardq-source-offset"], 17);
        assert_eq!(headers["shardq-dead-lettered-at-ms"], 1_700_000_000_000u64);
        assert_eq!(headers["shardq-dead-letter-cause"], "nacked");
        assert_eq!(headers["shardq-reason"], "bad \u{fffd}");
        assert_eq!(headers["app"], "1");
        // The later, malformed attempts header wins the JSON key and is text.
        assert_eq!(headers["shardq-attempts"], "xy");
        assert_eq!(dlq_header_json(headers::ATTEMPTS, &5u32.to_le_bytes()), 5);
    }

    #[test]
    fn redriven_records_go_to_their_source_without_shardq_headers() {
        let record = Record {
            offset: 0,
            timestamp_ms: 0,
            key: Some(Bytes::from_static(b"customer-7")),
            value: Bytes::from_static(b"payload"),
            headers: vec![
                (headers::SOURCE_TOPIC.into(), Bytes::from_static(b"orders")),
                (
                    headers::SOURCE_PARTITION.into(),
                    Bytes::copy_from_slice(&6u32.to_le_bytes()),
                ),
                (headers::REASON.into(), Bytes::from_static(b"x")),
                ("trace".into(), Bytes::from_static(b"abc")),
            ],
        };
        let (topic, produced) = redrive_record("fallback", &record);
        assert_eq!(topic, "orders");
        assert_eq!(produced.partition, Some(6));
        assert_eq!(produced.key, record.key);
        assert_eq!(produced.value, record.value);
        assert_eq!(
            produced.headers,
            vec![("trace".to_owned(), Bytes::from_static(b"abc"))]
        );
        let bare = Record {
            headers: Vec::new(),
            ..record
        };
        let (topic, produced) = redrive_record("fallback", &bare);
        assert_eq!(topic, "fallback");
        assert_eq!(produced.partition, None);
    }

    #[test]
    fn dlq_topic_defaults_to_the_topic_name_with_dlq() {
        let mut settings = QueueSettings::default();
        assert_eq!(dlq_topic_name("orders", &settings), "orders.dlq");
        settings.dlq_topic = Some(String::new());
        assert_eq!(dlq_topic_name("orders", &settings), "orders.dlq");
        settings.dlq_topic = Some("dead".into());
        assert_eq!(dlq_topic_name("orders", &settings), "dead");
    }

    #[test]
    fn group_describe_shows_committed_or_ack_floor_by_kind() {
        let stream = GroupDescription {
            name: "readers".into(),
            kind: GroupKind::Stream,
            partitions: vec![
                GroupPartition {
                    partition: 0,
                    position: COMMITTED_NONE,
                    high_watermark: 4,
                    ..GroupPartition::default()
                },
                GroupPartition {
                    partition: 1,
                    position: 3,
                    high_watermark: 4,
                    ..GroupPartition::default()
                },
            ],
        };
        let text = group_text(&stream);
        assert!(
            text.starts_with("group readers (stream): 2 partition(s), lag 5\n"),
            "{text}"
        );
        assert!(text.contains("\n0\tnone\t0\t4\t4\n"), "{text}");
        let value = group_json(&stream);
        assert_eq!(value["partitions"][0]["committed"], Value::Null);
        assert_eq!(value["partitions"][1]["committed"], 3);
        assert!(value["partitions"][1].get("in_flight").is_none());
        let queue = GroupDescription {
            name: "billing".into(),
            kind: GroupKind::Queue,
            partitions: vec![GroupPartition {
                partition: 0,
                position: 2,
                high_watermark: 10,
                in_flight: 3,
                waiting: 1,
                dead_lettering: 1,
                acked: 2,
                dead_lettered: 4,
                oldest_unacked_age_ms: 250,
                ..GroupPartition::default()
            }],
        };
        let text = group_text(&queue);
        assert!(
            text.contains("\n0\t2\t0\t10\t8\t3\t1\t1\t2\t4\t0\t0\t250\n"),
            "{text}"
        );
        let value = group_json(&queue);
        assert_eq!(value["kind"], "queue");
        assert_eq!(value["partitions"][0]["ack_floor"], 2);
        assert_eq!(value["partitions"][0]["lag"], 8);
        assert_eq!(value["partitions"][0]["oldest_unacked_age_ms"], 250);
    }
}
