//! Retention by size and by age deletes whole segments from the head; the log start moves
//! and a fetch below it gets a typed OffsetOutOfRange with the valid range; retention can
//! be changed later; offsets can be looked up by time.
mod common;

use std::path::Path;
use std::time::Duration;

use bytes::BytesMut;
use common::client::STEP_TIMEOUT;
use common::{test_config, TestBroker};
use shardq::client::{
    Client, ClientError, Consumer, ConsumerConfig, OffsetQuery, Producer, ProducerConfig,
    ProducerRecord, Retention, StartPosition,
};
use shardq::protocol::batch::{check_framing, BatchBuilder};
use shardq::protocol::{
    Acks, FetchPartition, FetchRequest, FetchTopic, ProducePartition, ProduceRequest, ProduceTopic,
};

fn small_segments(dir: &Path) -> shardq::config::ServerConfig {
    shardq::config::ServerConfig {
        segment_size_bytes: 256 << 10,
        chunk_size_bytes: 64 << 10,
        chunk_memory_bytes_per_shard_max: 4 << 20,
        retention_check_interval_ms: 20,
        ..test_config(dir, 1)
    }
}

/// Segments of partition 0 (not counting the spare kept for recycling).
fn segment_count(dir: &Path, topic: &str) -> usize {
    std::fs::read_dir(dir.join("topics").join(topic).join("0"))
        .unwrap()
        .filter(|entry| {
            let name = entry.as_ref().unwrap().file_name();
            shardq::storage::parse_segment_file_name(name.to_str().unwrap()).is_some()
        })
        .count()
}

/// Bytes of the batches stored from `start` to the high watermark of partition 0;
/// `None` when `start` is no longer stored (retention moved past it meanwhile).
async fn stored_bytes_from(client: &Client, topic: &str, start: u64) -> Option<u64> {
    let mut next = start;
    let mut bytes_total = 0u64;
    loop {
        let response = client
            .fetch(FetchRequest {
                wait_ms_max: 0,
                bytes_max: 1 << 20,
                topics: vec![FetchTopic {
                    name: topic.into(),
                    partitions: vec![FetchPartition {
                        partition: 0,
                        offset: next,
                        bytes_max: 1 << 20,
                    }],
                }],
            })
            .await
            .expect("fetch");
        let data = response.topics[0].partitions[0].data.clone();
        let batches = data.batches.ok()?;
        if batches.is_empty() {
            return Some(bytes_total);
        }
        let mut rest = &batches[..];
        while !rest.is_empty() {
            let header = check_framing(rest).expect("stored batches pass framing and CRC");
            // Whole batches come back: count each once, from the one holding `next`.
            if header.next_offset() > next {
                bytes_total += u64::from(header.batch_length);
                next = header.next_offset();
            }
            rest = &rest[header.batch_length as usize..];
        }
    }
}

#[test]
fn retention_by_size_then_by_age_moves_the_log_start_and_refuses_older_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start_with(small_segments(dir.path()));
    let addr = broker.addr();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = Client::connect(addr).await.unwrap();
        let retention = Retention {
            bytes_max: 512 << 10,
            ms_max: 0,
        };
        client
            .create_topic_with("logs", 1, retention)
            .await
            .unwrap();
        let metadata = client.metadata(&["logs"]).await.unwrap();
        assert_eq!(metadata.topics[0].retention, retention);
        let producer = Producer::new(
            client.clone(),
            ProducerConfig::builder()
                .acks(Acks::Durable)
                .build()
                .expect("a valid config"),
        )
        .unwrap();
        // About 2 MiB: eight or so 256 KiB segments.
        let mut handles = Vec::new();
        for index in 0..2_000u32 {
            let value = format!("{index:01000}");
            handles.push(
                producer
                    .send("logs", ProducerRecord::new(value))
                    .await
                    .unwrap(),
            );
        }
        producer.flush().await.unwrap();
        for handle in handles {
            handle.await.unwrap();
        }
        // Size retention keeps at least 512 KiB and less than that plus one 256 KiB
        // segment (a segment more would take it past the bound); the wait fails if the
        // partition never gets below it.
        let kept_bytes_max: u64 = (512 << 10) + (256 << 10);
        let wait = async {
            loop {
                let (start, end) = client.partition_offsets("logs", 0).await.unwrap();
                // Retention may move the start between the two calls: look again then.
                if let Some(kept) = stored_bytes_from(&client, "logs", start).await {
                    if kept < kept_bytes_max {
                        return (start, end, kept);
                    }
                }
                // The retention check runs every 20 ms; look again after one period.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let (start, end, kept) = tokio::time::timeout(STEP_TIMEOUT, wait)
            .await
            .expect("size retention got below its bound plus one segment");
        assert_eq!(end, 2_000);
        assert!(
            kept >= 512 << 10,
            "kept {kept} bytes, {} records",
            end - start
        );

        // Below the log start: typed, with the valid range.
        match client.fetch_records("logs", 0, 0, 0, 1 << 20).await {
            Err(ClientError::OffsetOutOfRange {
                requested: 0,
                log_start_offset,
                high_watermark,
                ..
            }) => assert_eq!((log_start_offset, high_watermark), (start, end)),
            other => panic!("expected OffsetOutOfRange, got {other:?}"),
        }
        // A consumer from the beginning starts at the new log start, dense from there.
        let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default()).unwrap();
        let first = consumer
            .assign_from("logs", 0, StartPosition::Beginning)
            .await
            .unwrap();
        assert_eq!(first, start);
        let records = consumer.poll().await.unwrap();
        assert_eq!(records[0].offset(), start);
        assert_eq!(records[0].value(), format!("{start:01000}").as_bytes());

        // Changed later: an age limit of 1 ms deletes every sealed segment; the active
        // one always stays.
        client
            .alter_topic(
                "logs",
                Retention {
                    bytes_max: 0,
                    ms_max: 1,
                },
            )
            .await
            .unwrap();
        let metadata = client.metadata(&["logs"]).await.unwrap();
        assert_eq!(metadata.topics[0].retention.ms_max, 1);
        let dir = dir.path().to_path_buf();
        let wait = async {
            while segment_count(&dir, "logs") > 1 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(STEP_TIMEOUT, wait)
            .await
            .expect("sealed segments aged out");
        let (start_after, end_after) = client.partition_offsets("logs", 0).await.unwrap();
        assert!(
            start_after > start && start_after < end_after,
            "{start_after}..{end_after}"
        );
        let records = client
            .fetch_records("logs", 0, start_after, 0, 1 << 20)
            .await
            .unwrap();
        assert_eq!(records.records[0].offset, start_after);
    });
    drop(broker);
    // The retention setting survives a restart.
    let broker = TestBroker::start_with(small_segments(dir.path()));
    runtime.block_on(async {
        let client = Client::connect(broker.addr()).await.unwrap();
        let metadata = client.metadata(&["logs"]).await.unwrap();
        assert_eq!(
            metadata.topics[0].retention,
            Retention {
                bytes_max: 0,
                ms_max: 1
            }
        );
    });
}

#[test]
fn offsets_are_listed_by_time_and_at_both_ends() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let addr = broker.addr();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = Client::connect(addr).await.unwrap();
        client.create_topic("times", 1).await.unwrap();
        for timestamps in [[1_000, 1_500], [2_000, 2_500], [3_000, 3_500]] {
            let mut builder = BatchBuilder::new(BytesMut::new());
            for timestamp in timestamps {
                builder.push(timestamp, None, format!("at-{timestamp}").as_bytes(), &[]);
            }
            client
                .produce(ProduceRequest {
                    acks: Acks::Durable,
                    timeout_ms: 0,
                    topics: vec![ProduceTopic {
                        name: "times".into(),
                        partitions: vec![ProducePartition {
                            partition: 0,
                            batch: builder.finish(),
                        }],
                    }],
                })
                .await
                .unwrap();
        }
        let asked = [
            (0, OffsetQuery::Earliest),
            (0, OffsetQuery::Latest),
            (0, OffsetQuery::Time(0)),
            (0, OffsetQuery::Time(1_500)),
            (0, OffsetQuery::Time(1_501)),
            (0, OffsetQuery::Time(3_500)),
            (0, OffsetQuery::Time(3_501)),
            // Before the epoch: every record is at or after it (not the protocol's -1,
            // which would ask for the end).
            (0, OffsetQuery::Time(-1)),
        ];
        let answered = client.list_offsets("times", &asked).await.unwrap();
        let offsets: Vec<u64> = answered.iter().map(|(_, offsets)| offsets.offset).collect();
        assert_eq!(offsets, vec![0, 6, 0, 1, 2, 5, 6, 0]);
        assert!(answered
            .iter()
            .all(|(_, offsets)| offsets.high_watermark == 6));
        let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default()).unwrap();
        let start = consumer
            .assign_from("times", 0, StartPosition::Time(2_100))
            .await
            .unwrap();
        assert_eq!(start, 3);
        let records = consumer.poll().await.unwrap();
        assert_eq!(records[0].value(), "at-2500".as_bytes());
        match client
            .list_offsets("times", &[(1, OffsetQuery::Time(0))])
            .await
        {
            Err(ClientError::UnknownPartition {
                topic, partition, ..
            }) => assert_eq!((topic.as_str(), partition), ("times", 1)),
            other => panic!("expected UnknownPartition, got {other:?}"),
        }
    });
}
