//! The consumer against the real broker (2 shards, in-process): one poll across
//! partitions, positions, start positions, offsets past the watermark, and a long-poll
//! that returns when data arrives.

mod common;

use common::client::{records_until, STEP_TIMEOUT};
use common::TestBroker;
use shardq::client::{
    is_offset_out_of_range, Client, ConsumedRecord, Consumer, ConsumerConfig, Producer,
    ProducerConfig, ProducerRecord, StartPosition,
};

async fn start() -> (tempfile::TempDir, TestBroker, Client) {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let client = Client::connect(broker.addr()).await.unwrap();
    (dir, broker, client)
}

/// Six records over two partitions: partition p gets values p, p+2, p+4 at offsets 0..3,
/// each record in its own batch. Returns once all are readable.
async fn produce_six(client: &Client) {
    client.create_topic("t", 2).await.unwrap();
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    for index in 0..6u32 {
        let record = ProducerRecord::new(format!("{index}")).with_partition(index % 2);
        producer.send("t", record).await.unwrap();
        producer.flush().await.unwrap();
    }
    producer.close().await.unwrap();
    for partition in 0..2 {
        records_until(client, "t", partition, 3).await;
    }
}

fn seen(records: &[ConsumedRecord]) -> Vec<(u32, u64, String)> {
    records
        .iter()
        .map(|consumed| {
            (
                consumed.partition(),
                consumed.offset(),
                String::from_utf8_lossy(consumed.value()).into_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn one_poll_reads_every_partition_and_advances_positions() {
    let (_dir, _broker, client) = start().await;
    produce_six(&client).await;
    let mut consumer = Consumer::new(client, ConsumerConfig::default()).unwrap();
    assert_eq!(
        consumer
            .assign_topic("t", StartPosition::Beginning)
            .await
            .unwrap(),
        2
    );
    assert_eq!(consumer.position("t", 0), Some(0));
    assert_eq!(
        consumer.high_watermark("t", 0),
        Some(3),
        "learnt at assignment"
    );
    // Re-assigning replaces the position rather than adding a second one.
    consumer.assign("t", 1, 1);
    let records = consumer.poll_with_wait(0).await.unwrap();
    assert_eq!(
        seen(&records),
        vec![
            (0, 0, "0".into()),
            (0, 1, "2".into()),
            (0, 2, "4".into()),
            (1, 1, "3".into()),
            (1, 2, "5".into()),
        ]
    );
    assert!(records.iter().all(|consumed| consumed.topic() == "t"));
    for partition in 0..2 {
        assert_eq!(consumer.position("t", partition), Some(3));
        assert_eq!(consumer.high_watermark("t", partition), Some(3));
    }
    assert_eq!(consumer.position("t", 2), None, "never assigned");
    assert!(consumer.poll_with_wait(0).await.unwrap().is_empty());
    assert_eq!(
        consumer.position("t", 0),
        Some(3),
        "an empty poll moves nothing"
    );
}

#[tokio::test]
async fn start_positions_resolve_against_the_broker() {
    let (_dir, _broker, client) = start().await;
    produce_six(&client).await;
    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default()).unwrap();
    assert_eq!(
        consumer
            .assign_from("t", 0, StartPosition::Beginning)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        consumer
            .assign_from("t", 1, StartPosition::End)
            .await
            .unwrap(),
        3
    );
    let records = consumer.poll_with_wait(0).await.unwrap();
    assert_eq!(
        seen(&records),
        vec![(0, 0, "0".into()), (0, 1, "2".into()), (0, 2, "4".into())],
        "the partition assigned at its end has nothing yet"
    );
    let mut from_offset = Consumer::new(client, ConsumerConfig::default()).unwrap();
    assert_eq!(
        from_offset
            .assign_from("t", 1, StartPosition::Offset(2))
            .await
            .unwrap(),
        2
    );
    let records = from_offset.poll_with_wait(0).await.unwrap();
    assert_eq!(seen(&records), vec![(1, 2, "5".into())]);
    assert_eq!(from_offset.position("t", 1), Some(3));
}

#[tokio::test]
async fn an_offset_past_the_watermark_is_out_of_range_and_loses_nothing() {
    let (_dir, _broker, client) = start().await;
    produce_six(&client).await;
    let mut consumer = Consumer::new(client, ConsumerConfig::default()).unwrap();
    consumer.assign("t", 0, 0);
    consumer.assign("t", 1, 4);
    let error = consumer.poll_with_wait(0).await.unwrap_err();
    assert!(is_offset_out_of_range(&error), "{error}");
    // The good partition's records were not consumed by the failed poll.
    assert_eq!(consumer.position("t", 0), Some(0));
    assert_eq!(consumer.position("t", 1), Some(4));
    // Exactly at the watermark is not an error.
    consumer.assign("t", 1, 3);
    let records = consumer.poll_with_wait(0).await.unwrap();
    assert_eq!(
        seen(&records),
        vec![(0, 0, "0".into()), (0, 1, "2".into()), (0, 2, "4".into())]
    );
}

#[tokio::test]
async fn assigning_an_unknown_topic_fails() {
    let (_dir, _broker, client) = start().await;
    let mut consumer = Consumer::new(client, ConsumerConfig::default()).unwrap();
    let error = consumer
        .assign_topic("missing", StartPosition::Beginning)
        .await
        .unwrap_err();
    assert_eq!(
        error.wire_code(),
        Some(shardq::protocol::ErrorCode::UnknownTopic),
        "{error}"
    );
    assert!(consumer.poll_with_wait(0).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_long_poll_returns_when_a_record_arrives() {
    let (_dir, _broker, client) = start().await;
    client.create_topic("t", 2).await.unwrap();
    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default()).unwrap();
    consumer
        .assign_topic("t", StartPosition::End)
        .await
        .unwrap();
    // The broker caps a wait at its fetch_wait_ms_max (30 s); the step timeout is
    // shorter, so a poll that only returns at its deadline fails the test.
    let poll = tokio::spawn(async move {
        let records = consumer.poll_with_wait(30_000).await;
        (consumer, records)
    });
    // Let the poll write its fetch, then make a round trip on the same connection: once
    // it is answered the broker has read the fetch that was queued before it.
    tokio::task::yield_now().await;
    client.metadata(&[]).await.unwrap();
    let producer = tokio::spawn(async move {
        let producer = Producer::new(client, ProducerConfig::default()).unwrap();
        let handle = producer
            .send("t", ProducerRecord::new("wake up").with_partition(1))
            .await
            .unwrap();
        producer.flush().await.unwrap();
        handle.await.unwrap()
    });
    let (consumer, records) = tokio::time::timeout(STEP_TIMEOUT, poll)
        .await
        .expect("the poll returned when the record arrived, well before its wait")
        .unwrap();
    let records = records.unwrap();
    assert_eq!(seen(&records), vec![(1, 0, "wake up".into())]);
    assert_eq!(consumer.position("t", 1), Some(1));
    assert_eq!(consumer.position("t", 0), Some(0));
    let sent = producer.await.unwrap();
    assert_eq!((sent.partition, sent.offset), (1, 0));
}

/// A long-poll over two partitions owned by different shards, on a connection to
/// `connection_shard`, woken by a record for the partition owned by `data_shard`.
async fn long_poll_across_shards(connection_shard: u16, data_shard: u16) {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let client = Client::connect(broker.shard_addr(usize::from(connection_shard)))
        .await
        .unwrap();
    assert_eq!(client.shard_id(), connection_shard);
    client.create_topic("t", 8).await.unwrap();
    let owned_by = |shard: u16| {
        (0..8u32)
            .find(|partition| shardq::placement::shard_for("t", *partition, 2) == shard)
            .expect("8 partitions cover both shards")
    };
    let partitions = [owned_by(0), owned_by(1)];
    let data_partition = partitions[usize::from(data_shard)];
    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default()).unwrap();
    for partition in partitions {
        consumer.assign("t", partition, 0);
    }
    let poll = tokio::spawn(async move {
        let records = consumer.poll_with_wait(30_000).await;
        (consumer, records)
    });
    tokio::task::yield_now().await;
    client.metadata(&[]).await.unwrap();
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    let handle = producer
        .send(
            "t",
            ProducerRecord::new("wake up").with_partition(data_partition),
        )
        .await
        .unwrap();
    producer.flush().await.unwrap();
    handle.await.unwrap();
    let (_consumer, records) = tokio::time::timeout(STEP_TIMEOUT, poll)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "connection on shard {connection_shard}, data on shard {data_shard}: \
                 the poll did not return when the record arrived"
            )
        })
        .unwrap();
    assert_eq!(
        seen(&records.unwrap()),
        vec![(data_partition, 0, "wake up".into())]
    );
}

#[tokio::test]
async fn a_long_poll_wakes_for_data_on_the_connections_own_shard() {
    long_poll_across_shards(0, 0).await;
    long_poll_across_shards(1, 1).await;
}

#[tokio::test]
async fn a_long_poll_wakes_for_data_on_another_shard() {
    long_poll_across_shards(0, 1).await;
    long_poll_across_shards(1, 0).await;
}

#[tokio::test]
async fn group_consumer_resumes_where_the_group_committed() {
    let (_dir, _broker, client) = start().await;
    produce_six(&client).await;
    let config = || ConsumerConfig::default().with_group("readers", None);
    let mut first = Consumer::new(client.clone(), config()).unwrap();
    first
        .assign_topic("t", StartPosition::Beginning)
        .await
        .unwrap();
    let records = first.poll_with_wait(0).await.unwrap();
    assert_eq!(records.len(), 6);
    // Partition 1 is rewound to what a caller says it processed: offset 1 only.
    first.assign("t", 1, 1);
    first.commit().await.unwrap();
    let committed = client.committed_offsets("readers", "t", &[]).await.unwrap();
    let offsets: Vec<(u32, Option<u64>)> = committed
        .iter()
        .map(|position| (position.partition, position.offset))
        .collect();
    assert_eq!(offsets, vec![(0, Some(3)), (1, Some(1))]);
    // A new reader of the group starts at the commits, not at its start position.
    let mut second = Consumer::new(client.clone(), config()).unwrap();
    second.assign_topic("t", StartPosition::End).await.unwrap();
    assert_eq!(second.position("t", 0), Some(3));
    assert_eq!(second.position("t", 1), Some(1));
    let records = second.poll_with_wait(0).await.unwrap();
    assert_eq!(seen(&records), vec![(1, 1, "3".into()), (1, 2, "5".into())]);
    // Another group is untouched: it starts at its start position.
    let mut other =
        Consumer::new(client, ConsumerConfig::default().with_group("others", None)).unwrap();
    assert_eq!(
        other
            .assign_from("t", 0, StartPosition::Beginning)
            .await
            .unwrap(),
        0
    );
    assert_eq!(other.committed("t", 0), None);
}

#[tokio::test]
async fn auto_commit_records_what_earlier_polls_returned() {
    let (_dir, _broker, client) = start().await;
    produce_six(&client).await;
    let config = ConsumerConfig::default().with_group("auto", Some(std::time::Duration::ZERO));
    let mut consumer = Consumer::new(client.clone(), config).unwrap();
    consumer
        .assign_topic("t", StartPosition::Beginning)
        .await
        .unwrap();
    assert_eq!(consumer.poll_with_wait(0).await.unwrap().len(), 6);
    // The records of that poll are taken as processed once the next poll starts.
    assert!(consumer.poll_with_wait(0).await.unwrap().is_empty());
    let committed = client
        .committed_offsets("auto", "t", &[0, 1])
        .await
        .unwrap();
    assert!(
        committed.iter().all(|position| position.offset == Some(3)),
        "{committed:?}"
    );
}

#[tokio::test]
async fn commits_past_the_watermark_are_refused_and_purged_logs_resume_at_their_start() {
    let (_dir, _broker, client) = start().await;
    produce_six(&client).await;
    let error = client
        .commit_offsets("g", "t", &[(0, 99)])
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            shardq::client::ClientError::CommitRefused { partition: 0, .. }
        ),
        "{error}"
    );
    client.commit_offsets("g", "t", &[(0, 1)]).await.unwrap();
    let purged = client.purge_topic("t").await.unwrap();
    assert_eq!(purged.iter().map(|p| p.records).sum::<u64>(), 6);
    let mut consumer =
        Consumer::new(client, ConsumerConfig::default().with_group("g", None)).unwrap();
    assert_eq!(
        consumer
            .assign_from("t", 0, StartPosition::Beginning)
            .await
            .unwrap(),
        3,
        "the commit at 1 is behind the purged log's start"
    );
}

/// Values `"{partition}:{index}"`, `per_partition` to each of `partitions`, sent through
/// one producer.
async fn produce_numbered(
    client: &Client,
    topic: &str,
    partitions: u32,
    range: std::ops::Range<u32>,
) {
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    for index in range {
        for partition in 0..partitions {
            let record =
                ProducerRecord::new(format!("{partition}:{index}")).with_partition(partition);
            producer.send(topic, record).await.unwrap();
        }
    }
    producer.close().await.unwrap();
}

/// The test: a record stream raced in a `select!` against a branch that is ready
/// on its second poll, so every poll that finds the fetch in flight is cancelled. Thousands
/// of cancellations must lose, repeat or reorder nothing and stall nothing, both while
/// catching up and while long-polling at the end for records produced meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cancelled_thousands_of_times_in_a_select_loop_reads_everything_once() {
    use futures_util::StreamExt;

    const CAUGHT_UP: u32 = 1_500;
    const TAIL: u32 = 200;
    const CANCELLED_MIN: u64 = 2_000;
    let (_dir, _broker, client) = start().await;
    client.create_topic("s", 2).await.unwrap();
    produce_numbered(&client, "s", 2, 0..CAUGHT_UP).await;
    // Small fetches: many rounds, each one in flight while the loop cancels.
    let config = ConsumerConfig::builder()
        .partition_bytes_max(2_048)
        .wait_ms_max(100)
        .build()
        .unwrap();
    let mut consumer = Consumer::new(client.clone(), config).unwrap();
    consumer
        .assign_topic("s", StartPosition::Beginning)
        .await
        .unwrap();
    assert_eq!(
        consumer.total_lag(),
        Some(2 * u64::from(CAUGHT_UP)),
        "the range is learnt at assignment"
    );
    let mut next_index = [0u32; 2];
    let mut cancelled = 0u64;
    let mut tail = None;
    let total = 2 * (CAUGHT_UP + TAIL);
    let mut read = 0;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    while read < total {
        assert!(
            tokio::time::Instant::now() < deadline,
            "stalled after {read} of {total} records ({cancelled} cancellations)"
        );
        tokio::select! {
            item = consumer.next() => {
                let record = item.expect("the stream ends only when closed").unwrap();
                let partition = record.partition();
                let expected = format!("{partition}:{}", next_index[partition as usize]);
                assert_eq!(record.value(), expected.as_bytes(), "offset {}", record.offset());
                assert_eq!(record.offset(), u64::from(next_index[partition as usize]));
                next_index[partition as usize] += 1;
                read += 1;
            }
            _ = tokio::task::yield_now() => cancelled += 1,
        }
        if read == 2 * CAUGHT_UP && tail.is_none() {
            // Caught up: the stream now long-polls, cancelled all the while, for records
            // produced one by one from here.
            assert_eq!(consumer.total_lag(), Some(0));
            assert_eq!(consumer.assignment("s", 0).unwrap().at_end(), Some(true));
            let client = client.clone();
            tail = Some(tokio::spawn(async move {
                for index in CAUGHT_UP..CAUGHT_UP + TAIL {
                    produce_numbered(&client, "s", 2, index..index + 1).await;
                }
            }));
        }
    }
    tail.expect("the tail was produced").await.unwrap();
    eprintln!("{read} records read through {cancelled} cancelled polls");
    assert!(
        cancelled >= CANCELLED_MIN,
        "only {cancelled} cancellations: the test did not exercise cancelling"
    );
    assert_eq!(next_index, [CAUGHT_UP + TAIL; 2]);
    for partition in 0..2 {
        assert_eq!(
            consumer.position("s", partition),
            Some(u64::from(CAUGHT_UP + TAIL))
        );
    }
}

#[tokio::test]
async fn the_batch_stream_yields_each_poll_and_ends_when_the_client_closes() {
    use futures_util::StreamExt;

    let (_dir, _broker, client) = start().await;
    produce_six(&client).await;
    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default()).unwrap();
    // Nothing assigned: both streams end at once rather than spin.
    assert!(consumer.next().await.is_none());
    assert!(consumer.batches().next().await.is_none());
    consumer.assign("t", 0, 0);
    consumer.assign("t", 1, 4);
    // An error is an item, and the stream goes on after it with nothing lost.
    let error = consumer.batches().next().await.unwrap().unwrap_err();
    assert!(is_offset_out_of_range(&error), "{error}");
    assert_eq!(consumer.position("t", 0), Some(0));
    consumer.assign("t", 1, 0);
    let mut records = Vec::new();
    let mut batches = consumer.batches();
    while records.len() < 6 {
        let batch = tokio::time::timeout(STEP_TIMEOUT, batches.next())
            .await
            .expect("a batch in time")
            .expect("the stream goes on")
            .unwrap();
        assert!(!batch.is_empty(), "an empty poll is not an item");
        records.extend(batch);
    }
    assert_eq!(batches.consumer().total_lag(), Some(0));
    let mut sorted = seen(&records);
    sorted.sort();
    assert_eq!(
        sorted,
        vec![
            (0, 0, "0".into()),
            (0, 1, "2".into()),
            (0, 2, "4".into()),
            (1, 0, "1".into()),
            (1, 1, "3".into()),
            (1, 2, "5".into())
        ]
    );
    // Closed while long-polling: the stream ends.
    let closer = {
        let client = client.clone();
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            client.close();
        })
    };
    let end = tokio::time::timeout(STEP_TIMEOUT, batches.next())
        .await
        .expect("the stream ends when the client closes");
    assert!(end.is_none(), "{end:?}");
    closer.await.unwrap();
    assert!(consumer.next().await.is_none());
}
