//! The batching producer against the real broker (2 shards, in-process): how records are
//! batched (by count, by bytes, by linger, on flush), where they are routed, the offsets
//! they get, how refusals and metadata refreshes behave, and every acks level.
//!
//! Batching is observed in the log itself: records of one batch share the batch's base
//! offset, so the stored batch headers fetched back show how the producer cut them.

mod common;

use common::client::{record_values, records_until, stored_batches, STEP_TIMEOUT};
use common::TestBroker;
use shardq::client::{
    Acks, Client, ClientError, Producer, ProducerConfig, ProducerRecord, SendHandle,
};
use shardq::placement::partition_for_key;
use shardq::protocol::batch::{BatchBuilder, BATCH_HEADER_SIZE};
use shardq::protocol::ErrorCode;

/// A linger no test waits out: batches leave only when full or flushed.
const LINGER_NEVER_MS: u64 = 600_000;

async fn start() -> (tempfile::TempDir, TestBroker, Client) {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let client = Client::connect(broker.addr()).await.unwrap();
    (dir, broker, client)
}

async fn offset_of(handle: SendHandle) -> u64 {
    tokio::time::timeout(STEP_TIMEOUT, handle)
        .await
        .expect("the send is answered")
        .expect("the send succeeds")
        .offset
}

fn record_counts(headers: &[shardq::protocol::batch::BatchHeader]) -> Vec<u32> {
    headers.iter().map(|header| header.record_count).collect()
}

#[tokio::test]
async fn batches_are_cut_at_the_record_count_and_the_rest_goes_on_flush() {
    let (_dir, _broker, client) = start().await;
    client.create_topic("t", 2).await.unwrap();
    let config = ProducerConfig::builder()
        .linger_ms(LINGER_NEVER_MS)
        .batch_records_max(3)
        .build()
        .expect("a valid config");
    let producer = Producer::new(client.clone(), config).unwrap();
    let mut handles = Vec::new();
    for index in 0..8u32 {
        let record = ProducerRecord::new(format!("value-{index}")).with_partition(index % 2);
        handles.push(producer.send("t", record).await.unwrap());
    }
    producer.flush().await.unwrap();
    let mut next_offset = [0u64; 2];
    for (index, handle) in handles.into_iter().enumerate() {
        let partition = index % 2;
        assert_eq!(handle.partition(), partition as u32);
        assert_eq!(
            offset_of(handle).await,
            next_offset[partition],
            "record {index}"
        );
        next_offset[partition] += 1;
    }
    for partition in 0..2 {
        let batches = stored_batches(&client, "t", partition).await;
        assert_eq!(
            record_counts(&batches),
            vec![3, 1],
            "partition {partition}: a full batch of 3, then the rest on flush"
        );
        let bases: Vec<u64> = batches.iter().map(|header| header.base_offset).collect();
        assert_eq!(bases, vec![0, 3]);
    }
    let records = records_until(&client, "t", 1, 4).await;
    assert_eq!(
        record_values(&records),
        vec!["value-1", "value-3", "value-5", "value-7"]
    );
}

#[tokio::test]
async fn batches_are_cut_before_they_pass_the_byte_limit() {
    let (_dir, _broker, client) = start().await;
    client.create_topic("t", 1).await.unwrap();
    let value = vec![b'x'; 100];
    let record_size = BatchBuilder::record_size(None, &value, &[]);
    // Room for exactly three records, and one byte short of a fourth.
    let batch_bytes_max = BATCH_HEADER_SIZE + 4 * record_size - 1;
    let config = ProducerConfig::builder()
        .linger_ms(LINGER_NEVER_MS)
        .batch_bytes_max(batch_bytes_max)
        .build()
        .expect("a valid config");
    let producer = Producer::new(client.clone(), config).unwrap();
    let mut handles = Vec::new();
    for _ in 0..7 {
        let record = ProducerRecord::new(value.clone());
        handles.push(producer.send("t", record).await.unwrap());
    }
    producer.flush().await.unwrap();
    let mut offsets = Vec::new();
    for handle in handles {
        offsets.push(offset_of(handle).await);
    }
    assert_eq!(offsets, (0..7).collect::<Vec<u64>>());
    let batches = stored_batches(&client, "t", 0).await;
    assert_eq!(record_counts(&batches), vec![3, 3, 1]);
    for header in &batches {
        assert!(
            header.batch_length as usize <= batch_bytes_max,
            "{header:?}"
        );
    }
}

#[tokio::test]
async fn records_queued_before_a_flush_travel_in_one_batch() {
    let (_dir, _broker, client) = start().await;
    client.create_topic("t", 1).await.unwrap();
    let config = ProducerConfig::builder()
        .linger_ms(LINGER_NEVER_MS)
        .build()
        .expect("a valid config");
    let producer = Producer::new(client.clone(), config).unwrap();
    let mut handles = Vec::new();
    for index in 0..5 {
        handles.push(
            producer
                .send("t", ProducerRecord::new(format!("{index}")))
                .await
                .unwrap(),
        );
    }
    // Nothing is sent before the linger or a flush: a long-poll from offset 0 sees no
    // record for half a second (a producer that sent at once would be stored by then).
    let early = client.fetch_records("t", 0, 0, 500, 1 << 20).await.unwrap();
    assert!(
        early.records.is_empty() && handles.iter().all(|handle| handle.try_result().is_none()),
        "sent before the flush: {:?}",
        early.records
    );
    producer.flush().await.unwrap();
    let batches = stored_batches(&client, "t", 0).await;
    assert_eq!(record_counts(&batches), vec![5]);
    assert_eq!(batches[0].base_offset, 0);
}

#[tokio::test]
async fn linger_sends_without_a_flush() {
    let (_dir, _broker, client) = start().await;
    client.create_topic("t", 1).await.unwrap();
    let config = ProducerConfig::builder()
        .linger_ms(20)
        .build()
        .expect("a valid config");
    let producer = Producer::new(client.clone(), config).unwrap();
    let first = producer
        .send("t", ProducerRecord::new("soon"))
        .await
        .unwrap();
    // No flush: only the linger can send it.
    assert_eq!(offset_of(first).await, 0);
    let second = producer
        .send("t", ProducerRecord::new("later"))
        .await
        .unwrap();
    assert_eq!(offset_of(second).await, 1);
    let batches = stored_batches(&client, "t", 0).await;
    assert_eq!(
        record_counts(&batches),
        vec![1, 1],
        "each linger sent its own batch"
    );
}

#[tokio::test]
async fn records_route_by_explicit_partition_then_key_then_round_robin() {
    let (_dir, _broker, client) = start().await;
    client.create_topic("t", 3).await.unwrap();
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    let explicit = producer
        .send(
            "t",
            ProducerRecord::new("explicit")
                .with_partition(2)
                .with_key("user-42"),
        )
        .await
        .unwrap();
    assert_eq!(
        explicit.partition(),
        2,
        "an explicit partition beats the key"
    );
    let keyed_partition = partition_for_key(b"user-42", 3);
    for _ in 0..3 {
        let keyed = producer
            .send("t", ProducerRecord::new("keyed").with_key("user-42"))
            .await
            .unwrap();
        assert_eq!(keyed.partition(), keyed_partition);
    }
    let mut round_robin = Vec::new();
    for _ in 0..6 {
        let handle = producer
            .send("t", ProducerRecord::new("unkeyed"))
            .await
            .unwrap();
        round_robin.push(handle.partition());
    }
    assert_eq!(round_robin, vec![0, 1, 2, 0, 1, 2]);
    producer.flush().await.unwrap();
    // What the log holds agrees with what the handles said.
    for partition in 0..3u32 {
        let mut expected = Vec::new();
        if partition == 2 {
            expected.push("explicit");
        }
        if partition == keyed_partition {
            expected.extend(["keyed"; 3]);
        }
        expected.extend(["unkeyed"; 2]);
        let records = records_until(&client, "t", partition, expected.len()).await;
        let mut values = record_values(&records);
        values.sort();
        expected.sort();
        assert_eq!(values, expected, "partition {partition}");
        let keys: Vec<Option<&[u8]>> = records
            .iter()
            .filter(|record| &record.value[..] == b"keyed")
            .map(|record| record.key.as_deref())
            .collect();
        assert!(keys.iter().all(|key| *key == Some(&b"user-42"[..])));
    }
}

#[tokio::test]
async fn offsets_are_dense_per_partition_across_many_requests() {
    let (_dir, _broker, client) = start().await;
    client.create_topic("t", 4).await.unwrap();
    // Small batches and several requests in flight, so the partitions' batches interleave.
    let config = ProducerConfig::builder()
        .linger_ms(0)
        .batch_records_max(7)
        .requests_in_flight_max(4)
        .build()
        .expect("a valid config");
    let producer = Producer::new(client.clone(), config).unwrap();
    let mut handles = Vec::new();
    for index in 0..400u32 {
        let key = format!("key-{}", index % 13);
        let record = ProducerRecord::new(format!("{index}")).with_key(key.clone());
        handles.push((key, index, producer.send("t", record).await.unwrap()));
    }
    producer.flush().await.unwrap();
    let mut sent: Vec<Vec<(u64, u32)>> = vec![Vec::new(); 4];
    for (key, index, handle) in handles {
        let partition = handle.partition();
        assert_eq!(partition, partition_for_key(key.as_bytes(), 4));
        sent[partition as usize].push((offset_of(handle).await, index));
    }
    for (partition, sent) in sent.iter().enumerate() {
        let offsets: Vec<u64> = sent.iter().map(|(offset, _)| *offset).collect();
        assert_eq!(
            offsets,
            (0..sent.len() as u64).collect::<Vec<u64>>(),
            "partition {partition}: dense, in send order"
        );
        let records = records_until(&client, "t", partition as u32, sent.len()).await;
        let values: Vec<String> = sent.iter().map(|(_, index)| index.to_string()).collect();
        assert_eq!(record_values(&records), values, "partition {partition}");
    }
}

#[tokio::test]
async fn a_refused_partition_fails_only_its_own_records() {
    let (_dir, _broker, client) = start().await;
    client.create_topic("t", 4).await.unwrap();
    let config = ProducerConfig::builder()
        .linger_ms(LINGER_NEVER_MS)
        .build()
        .expect("a valid config");
    let producer = Producer::new(client.clone(), config).unwrap();
    // Cache the topic's four partitions, then shrink it behind the producer's back: a
    // record for partition 3 passes the producer's check and the broker refuses it.
    producer
        .send("t", ProducerRecord::new("warm-up").with_partition(0))
        .await
        .unwrap();
    producer.flush().await.unwrap();
    client.delete_topic("t").await.unwrap();
    client.create_topic("t", 2).await.unwrap();
    let good = producer
        .send("t", ProducerRecord::new("good").with_partition(0))
        .await
        .unwrap();
    let bad: Vec<SendHandle> = vec![
        producer
            .send("t", ProducerRecord::new("bad-1").with_partition(3))
            .await
            .unwrap(),
        producer
            .send("t", ProducerRecord::new("bad-2").with_partition(3))
            .await
            .unwrap(),
    ];
    let flushed = producer.flush().await.unwrap_err();
    assert_eq!(
        flushed.wire_code(),
        Some(ErrorCode::UnknownPartition),
        "{flushed}"
    );
    assert_eq!(offset_of(good).await, 0, "the new topic starts at offset 0");
    for handle in bad {
        let error = handle.await.unwrap_err();
        assert!(
            matches!(error.cause(), ClientError::UnknownPartition { topic, partition: 3, .. } if topic == "t"),
            "{error}"
        );
        assert_eq!(error.wire_code(), Some(ErrorCode::UnknownPartition));
    }
    // The refusal dropped the cached partition count: the next send refreshes and the
    // producer itself now knows partition 3 is gone.
    let error = producer
        .send("t", ProducerRecord::new("again").with_partition(3))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            ClientError::UnknownPartition {
                partition: 3,
                partition_count: Some(2),
                ..
            }
        ),
        "{error}"
    );
    let records = records_until(&client, "t", 0, 1).await;
    assert_eq!(record_values(&records), vec!["good"]);
}

#[tokio::test]
async fn a_topic_created_after_the_producer_is_found_by_a_refresh() {
    let (_dir, _broker, client) = start().await;
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    let error = producer
        .send("late", ProducerRecord::new("too early"))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ClientError::UnknownTopic { topic } if topic == "late"),
        "{error}"
    );
    // Nothing negative is cached: once the topic exists, the next send finds it.
    client.create_topic("late", 2).await.unwrap();
    let handle = producer
        .send("late", ProducerRecord::new("on time").with_partition(1))
        .await
        .unwrap();
    producer.flush().await.unwrap();
    assert_eq!(offset_of(handle).await, 0);
    // A partition past the topic's count fails the send itself, after one refresh.
    let error = producer
        .send("late", ProducerRecord::new("x").with_partition(5))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            ClientError::UnknownPartition {
                partition: 5,
                partition_count: Some(2),
                ..
            }
        ),
        "{error}"
    );
}

#[tokio::test]
async fn a_topic_recreated_with_more_partitions_is_refreshed_for_an_explicit_partition() {
    let (_dir, _broker, client) = start().await;
    client.create_topic("t", 1).await.unwrap();
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    let first = producer
        .send("t", ProducerRecord::new("one"))
        .await
        .unwrap();
    producer.flush().await.unwrap();
    assert_eq!(offset_of(first).await, 0);
    client.delete_topic("t").await.unwrap();
    client.create_topic("t", 4).await.unwrap();
    // The cached count is 1; partition 3 makes the producer refresh instead of failing.
    let handle = producer
        .send("t", ProducerRecord::new("three").with_partition(3))
        .await
        .unwrap();
    producer.flush().await.unwrap();
    assert_eq!(offset_of(handle).await, 0);
    let records = records_until(&client, "t", 3, 1).await;
    assert_eq!(record_values(&records), vec!["three"]);
}

#[tokio::test]
async fn every_acks_level_delivers_and_only_acked_levels_report_offsets() {
    let (_dir, _broker, client) = start().await;
    client.create_topic("t", 3).await.unwrap();
    for (partition, acks) in [(0u32, Acks::None), (1, Acks::Memory), (2, Acks::Durable)] {
        let config = ProducerConfig::builder()
            .acks(acks)
            .build()
            .expect("a valid config");
        let producer = Producer::new(client.clone(), config).unwrap();
        let record =
            |index| ProducerRecord::new(format!("{acks:?}-{index}")).with_partition(partition);
        if acks == Acks::None {
            // No answer, so no offset: send refuses, send_unacknowledged resolves to the
            // partition only.
            match producer.send("t", record(9)).await {
                Err(ClientError::InvalidConfig {
                    field: "acks",
                    value: 0,
                }) => {}
                other => panic!("send with acks none: {other:?}"),
            }
            let mut handles = Vec::new();
            for index in 0..3 {
                handles.push(
                    producer
                        .send_unacknowledged("t", record(index))
                        .await
                        .unwrap(),
                );
            }
            producer.close().await.unwrap();
            for handle in handles {
                assert_eq!(handle.await.unwrap().partition, partition);
            }
        } else {
            match producer.send_unacknowledged("t", record(9)).await {
                Err(ClientError::InvalidConfig {
                    field: "acks",
                    value,
                }) => {
                    assert_eq!(value, acks as u64)
                }
                other => panic!("send_unacknowledged with acks {acks:?}: {other:?}"),
            }
            let mut handles = Vec::new();
            for index in 0..3 {
                handles.push(producer.send("t", record(index)).await.unwrap());
            }
            producer.close().await.unwrap();
            let mut offsets = Vec::new();
            for handle in handles {
                offsets.push(handle.await.unwrap().offset);
            }
            assert_eq!(offsets, vec![0, 1, 2], "{acks:?}");
        }
        let records = records_until(&client, "t", partition, 3).await;
        assert_eq!(
            record_values(&records),
            (0..3)
                .map(|index| format!("{acks:?}-{index}"))
                .collect::<Vec<_>>()
        );
        let late = if acks == Acks::None {
            producer
                .send_unacknowledged("t", ProducerRecord::new("late"))
                .await
                .map(drop)
        } else {
            producer
                .send("t", ProducerRecord::new("late"))
                .await
                .map(drop)
        };
        assert!(matches!(late, Err(ClientError::Closed)), "{late:?}");
    }
}

#[tokio::test]
async fn headers_and_keys_survive_the_round_trip() {
    let (_dir, _broker, client) = start().await;
    client.create_topic("t", 1).await.unwrap();
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    let handle = producer
        .send(
            "t",
            ProducerRecord::new("body")
                .with_key("k")
                .with_header("trace", "abc")
                .with_header("empty", ""),
        )
        .await
        .unwrap();
    producer.flush().await.unwrap();
    assert_eq!(offset_of(handle).await, 0);
    let records = records_until(&client, "t", 0, 1).await;
    assert_eq!(records[0].key.as_deref(), Some(&b"k"[..]));
    assert_eq!(&records[0].value[..], b"body");
    let headers: Vec<(&str, &[u8])> = records[0]
        .headers
        .iter()
        .map(|(name, value)| (name.as_str(), &value[..]))
        .collect();
    assert_eq!(headers, vec![("trace", &b"abc"[..]), ("empty", &b""[..])]);
}

#[test]
fn flush_reports_a_refusal_answered_before_it_began() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let addr = broker.addr();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = Client::connect(addr).await.unwrap();
        client.create_topic("shrinking", 4).await.unwrap();
        let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
        let first = producer
            .send("shrinking", ProducerRecord::new("kept").with_partition(3))
            .await
            .unwrap();
        first.await.expect("partition 3 exists at first");
        producer.flush().await.expect("nothing refused yet");
        // The producer's cached metadata still says 4 partitions: the broker refuses.
        client.delete_topic("shrinking").await.unwrap();
        client.create_topic("shrinking", 1).await.unwrap();
        let refused = producer
            .send(
                "shrinking",
                ProducerRecord::new("refused").with_partition(3),
            )
            .await
            .unwrap();
        let outcome = tokio::time::timeout(std::time::Duration::from_secs(20), refused)
            .await
            .expect("answered");
        let refusal = outcome.expect_err("the broker refused partition 3");
        assert_eq!(
            refusal.wire_code(),
            Some(ErrorCode::UnknownPartition),
            "{refusal:?}"
        );
        let flushed = producer.flush().await;
        assert_eq!(
            flushed.as_ref().err().and_then(ClientError::wire_code),
            Some(ErrorCode::UnknownPartition),
            "flush reports the refusal it did not wait on: {flushed:?}"
        );
        producer.flush().await.expect("a refusal is reported once");
    });
}

#[test]
fn full_batches_fit_the_brokers_limit_from_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    // test_config: 256 KiB chunks, so this broker takes batches up to 252 KiB, below the
    // producer's default batch_bytes_max of 256 KiB.
    let broker = TestBroker::start(dir.path(), 1);
    let addr = broker.addr();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = Client::connect(addr).await.unwrap();
        client.create_topic("big", 1).await.unwrap();
        let config = ProducerConfig::builder()
            .linger_ms(600_000)
            .build()
            .expect("a valid config");
        let producer = Producer::new(client, config).unwrap();
        assert!(producer.config().batch_bytes_max <= 256 * 1024 - 4096);
        let mut handles = Vec::new();
        for index in 0..3_000u32 {
            let value = format!("{index:0100}");
            handles.push(
                producer
                    .send("big", ProducerRecord::new(value))
                    .await
                    .unwrap(),
            );
        }
        producer
            .flush()
            .await
            .expect("no batch is refused for its size");
        for (index, handle) in handles.into_iter().enumerate() {
            assert_eq!(handle.await.unwrap().offset, index as u64);
        }
    });
}

/// A close sends the records still waiting for their linger and refuses later sends on
/// every clone. (A send already waiting for memory when the close comes is refused at
/// once: the unit test `a_send_waiting_for_memory_is_refused_when_the_producer_closes`.)
#[tokio::test]
async fn close_sends_what_lingers_and_every_clone_refuses_later_sends() {
    let (_dir, _broker, client) = start().await;
    client.create_topic("t", 1).await.unwrap();
    let config = ProducerConfig::builder()
        .linger_ms(LINGER_NEVER_MS)
        .build()
        .expect("a valid config");
    let producer = Producer::new(client.clone(), config).unwrap();
    let sent = producer
        .send("t", ProducerRecord::new("lingering").with_partition(0))
        .await
        .unwrap();
    let clone = producer.clone();
    producer.close().await.unwrap();
    assert_eq!(
        offset_of(sent).await,
        0,
        "closing sent the lingering record"
    );
    for producer in [&producer, &clone] {
        let refused = producer
            .send("t", ProducerRecord::new("late").with_partition(0))
            .await;
        assert!(matches!(refused, Err(ClientError::Closed)), "{refused:?}");
    }
    let records = records_until(&client, "t", 0, 1).await;
    assert_eq!(record_values(&records), vec!["lingering"]);
}

/// Several batches of a partition in flight (one record each, so every record is its own
/// request) through a connection to one shard, for a partition of that shard and one of
/// the other: stored in the order sent, each at the offset its handle says. Order needs
/// both halves: the producer writes requests in the order it took the batches, and the
/// broker appends one connection's requests for a partition in arrival order
/// (docs/protocol.md §5.5). A multi-threaded runtime, so that nothing but the producer's
/// own ordering keeps its requests in line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_batches_in_flight_per_partition_are_stored_in_the_order_sent() {
    let (_dir, _broker, client) = start().await;
    client.create_topic("t", 2).await.unwrap();
    let config = ProducerConfig::builder()
        .linger_ms(0)
        .batch_records_max(1)
        .batches_in_flight_per_partition_max(shardq::client::PRODUCER_BATCHES_KEPT)
        .requests_in_flight_max(16)
        .build()
        .expect("a valid config");
    let producer = Producer::new(client.clone(), config).unwrap();
    const PER_PARTITION: usize = 2_000;
    let mut handles = Vec::new();
    for index in 0..PER_PARTITION {
        for partition in 0..2u32 {
            let record = ProducerRecord::new(format!("{index:05}")).with_partition(partition);
            handles.push((partition, index, producer.send("t", record).await.unwrap()));
        }
    }
    producer.flush().await.unwrap();
    for (partition, index, handle) in handles {
        assert_eq!(
            offset_of(handle).await,
            index as u64,
            "partition {partition}, record {index}"
        );
    }
    for partition in 0..2u32 {
        let records = records_until(&client, "t", partition, PER_PARTITION).await;
        let expected: Vec<String> = (0..PER_PARTITION)
            .map(|index| format!("{index:05}"))
            .collect();
        assert_eq!(record_values(&records), expected, "partition {partition}");
        assert!(
            record_counts(&stored_batches(&client, "t", partition).await)
                .iter()
                .all(|count| *count == 1),
            "one record per batch, so one batch per request"
        );
    }
    producer.close().await.unwrap();
}
