//! A million messages through one queue group with four competing workers, 1% of them
//! failing every time: every good message is handled successfully exactly once (and
//! acked), every failing one reaches the dead-letter queue exactly once, after exactly
//! `deliveries_max` deliveries, and the broker's counters agree.
//!
//! Real sockets, the real broker (2 shards, 4 partitions), the tokio client's
//! `QueueConsumer::run`. Bounded: the whole run must finish within `RUN_TIMEOUT`.

mod common;

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::TestBroker;
use shardq::client::{
    Client, ConsumerConfig, Producer, ProducerConfig, ProducerRecord, QueueConsumer, QueueSettings,
    Retention,
};
use shardq::protocol::queue::headers;

const MESSAGES: u64 = 1_000_000;
const PARTITIONS: u32 = 4;
const WORKERS: usize = 4;
/// Message i fails every time when i % FAIL_EVERY == 0: 1%.
const FAIL_EVERY: u64 = 100;
const DELIVERIES_MAX: u32 = 3;
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

fn fails(index: u64) -> bool {
    index % FAIL_EVERY == 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_messages_four_workers_one_percent_dead_lettered_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let client = Client::connect(broker.addr()).await.unwrap();
    client
        .create_topic_with_queue(
            "work",
            PARTITIONS,
            Retention::default(),
            QueueSettings {
                deliveries_max: Some(DELIVERIES_MAX),
                retry_delay_ms_min: Some(1),
                retry_delay_ms_max: Some(5),
                // Long enough that no good message is redelivered on a loaded machine:
                // then "handled once" is exact, not at-least-once.
                visibility_timeout_ms: Some(300_000),
                ..QueueSettings::default()
            },
        )
        .await
        .unwrap();

    // The values are the message's index, spread over the partitions.
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    for index in 0..MESSAGES {
        let record = ProducerRecord::new(index.to_le_bytes().to_vec())
            .with_partition((index % u64::from(PARTITIONS)) as u32);
        producer.send("work", record).await.unwrap();
    }
    producer.close().await.unwrap();

    let good_total = (0..MESSAGES).filter(|index| !fails(*index)).count() as u64;
    let bad_total = MESSAGES - good_total;
    // Per message: how many times a handler succeeded with it / failed with it.
    let succeeded: Arc<Vec<AtomicU8>> = Arc::new((0..MESSAGES).map(|_| AtomicU8::new(0)).collect());
    let failed: Arc<Vec<AtomicU8>> = Arc::new((0..MESSAGES).map(|_| AtomicU8::new(0)).collect());
    let good_done = Arc::new(AtomicU64::new(0));
    let failures_done = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(tokio::sync::Notify::new());

    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        // Each worker has its own connection, as separate processes would.
        let worker_client = Client::connect(broker.addr()).await.unwrap();
        let consumer = QueueConsumer::builder(worker_client, "work", "billing")
            .receive_messages_max(500)
            .handler_concurrency_max(64)
            .build()
            .unwrap();
        let (succeeded, failed) = (Arc::clone(&succeeded), Arc::clone(&failed));
        let (good_done, failures_done) = (Arc::clone(&good_done), Arc::clone(&failures_done));
        let finished = Arc::clone(&finished);
        let stop = Arc::clone(&finished);
        workers.push(tokio::spawn(async move {
            consumer
                .run(
                    move |message| {
                        let index =
                            u64::from_le_bytes(message.value()[..].try_into().expect("8 bytes"));
                        let result = if fails(index) {
                            failed[index as usize].fetch_add(1, Ordering::SeqCst);
                            failures_done.fetch_add(1, Ordering::SeqCst);
                            Err(format!("message {index} always fails"))
                        } else {
                            succeeded[index as usize].fetch_add(1, Ordering::SeqCst);
                            good_done.fetch_add(1, Ordering::SeqCst);
                            Ok(())
                        };
                        if good_done.load(Ordering::SeqCst) == good_total
                            && failures_done.load(Ordering::SeqCst)
                                == bad_total * u64::from(DELIVERIES_MAX)
                        {
                            finished.notify_waiters();
                        }
                        std::future::ready(result)
                    },
                    async move { stop.notified().await },
                )
                .await
        }));
    }
    let summaries = tokio::time::timeout(RUN_TIMEOUT, async {
        let mut summaries = Vec::new();
        for worker in workers {
            summaries.push(worker.await.unwrap().unwrap());
        }
        summaries
    })
    .await
    .expect("every message handled within the bound");

    let acked: u64 = summaries.iter().map(|summary| summary.acked).sum();
    let nacked: u64 = summaries.iter().map(|summary| summary.nacked).sum();
    let refused: u64 = summaries.iter().map(|summary| summary.refused).sum();
    assert_eq!(refused, 0, "no ack or nack was refused");
    assert_eq!(acked, good_total);
    assert_eq!(nacked, bad_total * u64::from(DELIVERIES_MAX));
    assert!(
        summaries.iter().all(|summary| summary.received > 0),
        "every worker took part: {summaries:?}"
    );
    for index in 0..MESSAGES {
        let (ok, bad) = (
            succeeded[index as usize].load(Ordering::SeqCst),
            failed[index as usize].load(Ordering::SeqCst),
        );
        if fails(index) {
            assert_eq!((ok, bad), (0, DELIVERIES_MAX as u8), "message {index}");
        } else {
            assert_eq!((ok, bad), (1, 0), "message {index} handled once");
        }
    }

    // Each failing message is in the DLQ exactly once, with its source named.
    let mut consumer =
        shardq::client::Consumer::new(client.clone(), ConsumerConfig::default()).unwrap();
    let dlq_partitions: Vec<u32> = (0..PARTITIONS).collect();
    let dead = dead_letters(&client, &mut consumer, &dlq_partitions, bad_total).await;
    let mut seen = vec![0u8; MESSAGES as usize];
    for (index, source_offset, attempts) in dead {
        assert!(
            fails(index),
            "message {index} was dead-lettered but never failed"
        );
        assert_eq!(attempts, DELIVERIES_MAX);
        // Messages were produced round-robin, in order, one partition at a time.
        assert_eq!(source_offset, index / u64::from(PARTITIONS));
        seen[index as usize] += 1;
    }
    for index in (0..MESSAGES).filter(|index| fails(*index)) {
        assert_eq!(seen[index as usize], 1, "message {index} in the DLQ once");
    }

    // The broker's own counters agree, and nothing is left in flight.
    let groups = client
        .describe_groups("work", Some("billing"))
        .await
        .unwrap();
    let partitions = &groups[0].partitions;
    assert_eq!(partitions.iter().map(|p| p.acked).sum::<u64>(), good_total);
    assert_eq!(
        partitions.iter().map(|p| p.dead_lettered).sum::<u64>(),
        bad_total
    );
    for partition in partitions {
        assert_eq!(partition.in_flight, 0);
        assert_eq!(partition.dead_lettering, 0);
        assert_eq!(partition.lag(), 0, "{partition:?}");
    }
}

/// Reads the DLQ until `count` records came back: (message index, source offset,
/// attempts) of each.
async fn dead_letters(
    client: &Client,
    consumer: &mut shardq::client::Consumer,
    partitions: &[u32],
    count: u64,
) -> Vec<(u64, u64, u32)> {
    let read = async {
        // The DLQ topic is created by the broker at the first dead letter, which may
        // still be on its way when the last nack is answered.
        loop {
            let metadata = client.metadata(&["work.dlq"]).await.unwrap();
            if metadata.topics[0].error.is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for &partition in partitions {
            consumer.assign("work.dlq", partition, 0);
        }
        let mut dead = Vec::new();
        while (dead.len() as u64) < count {
            let polled = match consumer.poll().await {
                Ok(polled) => polled,
                // Created by the broker shard by shard: a partition's owner may learn of
                // the DLQ topic after the shard that answered the metadata.
                Err(shardq::client::ClientError::UnknownTopic { .. }) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                Err(error) => panic!("reading the DLQ: {error}"),
            };
            for consumed in polled {
                let record = consumed.into_record();
                let header = |name: &str| {
                    record
                        .headers
                        .iter()
                        .rev()
                        .find(|(key, _)| key == name)
                        .map(|(_, value)| value.clone())
                        .unwrap_or_else(|| panic!("DLQ record without {name}"))
                };
                let index = u64::from_le_bytes(record.value[..].try_into().unwrap());
                let offset =
                    u64::from_le_bytes(header(headers::SOURCE_OFFSET)[..].try_into().unwrap());
                let attempts =
                    u32::from_le_bytes(header(headers::ATTEMPTS)[..].try_into().unwrap());
                dead.push((index, offset, attempts));
            }
        }
        dead
    };
    tokio::time::timeout(RUN_TIMEOUT, read)
        .await
        .expect("the DLQ holds every failing message")
}
