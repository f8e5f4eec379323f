//! The headline scenario: 100,000 durable messages over 4 partitions on 2 shards through
//! the client, consumed back exactly once in per-partition order with dense offsets; the
//! same after a restart on the same data directory; and offsets that continue, never
//! reused, when producing resumes.
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use shardq::client::{
    Client, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord, StartPosition,
};
use shardq::placement::partition_for_key;
use shardq::protocol::Acks;

const MESSAGES: u64 = 100_000;
const PARTITIONS: u32 = 4;

/// (partition, offset) -> value, for every record in the topic.
type Contents = BTreeMap<(u32, u64), String>;

async fn produce(addr: std::net::SocketAddr, from: u64, count: u64) -> BTreeMap<u64, (u32, u64)> {
    let client = Client::connect(addr).await.expect("connect");
    let producer = Producer::new(
        client,
        ProducerConfig::builder()
            .acks(Acks::Durable)
            .build()
            .expect("a valid config"),
    )
    .expect("producer");
    let mut handles = Vec::with_capacity(count as usize);
    for index in from..from + count {
        let key = format!("customer-{}", index % 97);
        let record = ProducerRecord::new(format!("m{index}")).with_key(key);
        handles.push((
            index,
            producer.send("orders", record).await.expect("queued"),
        ));
    }
    producer.flush().await.expect("flushed");
    let mut placed = BTreeMap::new();
    for (index, handle) in handles {
        let metadata = handle.await.expect("acknowledged durable");
        let key = format!("customer-{}", index % 97);
        assert_eq!(
            metadata.partition,
            partition_for_key(key.as_bytes(), PARTITIONS)
        );
        placed.insert(index, (metadata.partition, metadata.offset));
    }
    placed
}

async fn consume_all(addr: std::net::SocketAddr, expected: usize) -> Contents {
    let client = Client::connect(addr).await.expect("connect");
    let mut consumer = Consumer::new(client, ConsumerConfig::default()).unwrap();
    consumer
        .assign_topic("orders", StartPosition::Beginning)
        .await
        .expect("assigned");
    let mut contents = Contents::new();
    let mut polls = 0;
    while contents.len() < expected {
        polls += 1;
        assert!(
            polls < 100_000,
            "bounded: {} of {expected} consumed",
            contents.len()
        );
        let records = tokio::time::timeout(Duration::from_secs(30), consumer.poll())
            .await
            .expect("a poll answers within its long-poll bound")
            .expect("poll");
        for consumed in records {
            let value = String::from_utf8(consumed.value().to_vec()).unwrap();
            let previous = contents.insert((consumed.partition(), consumed.offset()), value);
            assert!(
                previous.is_none(),
                "offset {} of partition {} delivered twice",
                consumed.offset(),
                consumed.partition()
            );
        }
    }
    assert_eq!(contents.len(), expected, "nothing beyond what was produced");
    contents
}

fn check(contents: &Contents, placed: &BTreeMap<u64, (u32, u64)>) {
    // Every message once, where its ack said it was.
    assert_eq!(contents.len(), placed.len());
    for (index, (partition, offset)) in placed {
        assert_eq!(
            contents.get(&(*partition, *offset)),
            Some(&format!("m{index}")),
            "message {index}"
        );
    }
    // Offsets dense from 0 per partition, and per-partition order = send order.
    for partition in 0..PARTITIONS {
        let mut last_index = None;
        for (expected_offset, ((_, offset), value)) in contents
            .range((partition, 0)..(partition + 1, 0))
            .enumerate()
        {
            assert_eq!(
                *offset, expected_offset as u64,
                "partition {partition} is dense"
            );
            let index: u64 = value[1..].parse().unwrap();
            assert!(
                last_index < Some(index),
                "partition {partition} keeps send order"
            );
            last_index = Some(index);
        }
    }
}

#[test]
fn durable_produce_consume_survives_restart_and_offsets_continue() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = TestBroker::start(dir.path(), 2);
    let addr = broker.addr();
    let runtime = tokio::runtime::Runtime::new().unwrap();

    let (placed, first) = runtime.block_on(async {
        let admin = Client::connect(addr).await.unwrap();
        admin.create_topic("orders", PARTITIONS).await.unwrap();
        let metadata = admin.metadata(&["orders"]).await.unwrap();
        let shards: std::collections::BTreeSet<u16> = metadata.topics[0]
            .partitions
            .iter()
            .map(|partition| partition.shard)
            .collect();
        assert_eq!(shards.len(), 2, "the topic spans both shards");
        let placed = produce(addr, 0, MESSAGES).await;
        let contents = consume_all(addr, MESSAGES as usize).await;
        (placed, contents)
    });
    check(&first, &placed);

    broker.stop();
    let broker = TestBroker::start_with(broker.config.clone());
    let addr = broker.addr();
    let (after_restart, more) = runtime.block_on(async {
        let contents = consume_all(addr, MESSAGES as usize).await;
        let more = produce(addr, MESSAGES, 1_000).await;
        (contents, more)
    });
    assert_eq!(
        after_restart, first,
        "a restart changes nothing that was acknowledged"
    );

    // Offsets continue where each partition left off: never reused.
    let mut ends = BTreeMap::new();
    for (partition, offset) in placed.values() {
        let end = ends.entry(*partition).or_insert(0u64);
        *end = (*end).max(offset + 1);
    }
    for (partition, offset) in more.values() {
        assert!(
            *offset >= ends[partition],
            "partition {partition} reused offset {offset}"
        );
    }
    let mut all = placed.clone();
    all.extend(more);
    let everything = runtime.block_on(consume_all(addr, all.len()));
    check(&everything, &all);
}
