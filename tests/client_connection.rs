//! The tokio client's requests against the real broker (2 shards, in-process): the
//! handshake, top-level refusals, close, raw produce with every acks level, and
//! one-partition fetches.

mod common;

use bytes::{Bytes, BytesMut};
use common::client::{record_offsets, record_values, records_until, STEP_TIMEOUT};
use common::TestBroker;
use shardq::client::{is_offset_out_of_range, Acks, Client, ClientError};
use shardq::protocol::batch::BatchBuilder;
use shardq::protocol::{
    ErrorCode, MetadataRequest, Opcode, ProducePartition, ProduceRequest, ProduceTopic, Request,
};

fn batch_of(values: &[&[u8]]) -> Bytes {
    let mut builder = BatchBuilder::new(BytesMut::new());
    for value in values {
        builder.push(5, None, value, &[]);
    }
    builder.finish()
}

fn produce_request(topic: &str, partition: u32, acks: Acks, batch: Bytes) -> ProduceRequest {
    ProduceRequest {
        acks,
        timeout_ms: 10_000,
        topics: vec![ProduceTopic {
            name: topic.into(),
            partitions: vec![ProducePartition { partition, batch }],
        }],
    }
}

#[tokio::test]
async fn handshake_reports_the_brokers_shards() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let client = Client::connect(broker.addr()).await.unwrap();
    assert_eq!(client.shard_count(), 2);
    assert!(client.shard_id() < 2, "shard id {}", client.shard_id());
    assert!(!client.handshake().server_version.is_empty());
    assert_eq!(client.peer_address(), broker.addr());
    // Each shard's own port lands on that shard.
    for shard in 0..2u16 {
        let direct = Client::connect(broker.shard_addr(usize::from(shard)))
            .await
            .unwrap();
        assert_eq!(direct.shard_id(), shard);
    }
}

#[tokio::test]
async fn duplicate_topic_is_a_broker_error_and_others_still_work() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let client = Client::connect(broker.addr()).await.unwrap();
    client.create_topic("orders", 2).await.unwrap();
    let error = client.create_topic("orders", 3).await.unwrap_err();
    assert_eq!(
        error.wire_code(),
        Some(ErrorCode::TopicAlreadyExists),
        "{error}"
    );
    assert!(matches!(error, ClientError::Broker(_)), "{error}");
    let error = client.delete_topic("never-made").await.unwrap_err();
    assert!(
        matches!(&error, ClientError::UnknownTopic { topic } if topic == "never-made"),
        "{error}"
    );
    assert_eq!(error.wire_code(), Some(ErrorCode::UnknownTopic), "{error}");
    client.create_topic("payments", 3).await.unwrap();
    client.delete_topic("payments").await.unwrap();
    let metadata = client.metadata(&[]).await.unwrap();
    let names: Vec<&str> = metadata
        .topics
        .iter()
        .map(|topic| topic.name.as_str())
        .collect();
    assert_eq!(names, vec!["orders"]);
    assert_eq!(metadata.topics[0].partitions.len(), 2);
}

#[tokio::test]
async fn metadata_of_an_unknown_topic_is_an_entry_error_not_a_call_error() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let client = Client::connect(broker.addr()).await.unwrap();
    let metadata = client.metadata(&["missing"]).await.unwrap();
    assert_eq!(metadata.topics.len(), 1);
    assert_eq!(metadata.topics[0].name, "missing");
    let error = metadata.topics[0].error.as_ref().expect("an entry error");
    assert_eq!(error.code, ErrorCode::UnknownTopic);
    assert_eq!(metadata.shard_ports.len(), 2);
}

#[tokio::test]
async fn close_fails_later_requests_on_every_clone() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let client = Client::connect(broker.addr()).await.unwrap();
    let clone = client.clone();
    client.metadata(&[]).await.unwrap();
    client.close();
    assert!(matches!(
        client.metadata(&[]).await,
        Err(ClientError::Closed)
    ));
    assert!(matches!(
        clone.create_topic("t", 1).await,
        Err(ClientError::Closed)
    ));
}

#[tokio::test]
async fn produce_with_acks_none_lands_without_an_answer() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let client = Client::connect(broker.addr()).await.unwrap();
    client.create_topic("t", 1).await.unwrap();
    let request = produce_request("t", 0, Acks::None, batch_of(&[b"fire and forget"]));
    assert_eq!(client.produce(request).await.unwrap(), None);
    // The connection still works, and the record arrives: a long-poll at offset 0
    // returns as soon as it is there.
    let fetched = tokio::time::timeout(
        STEP_TIMEOUT,
        client.fetch_records("t", 0, 0, 15_000, 1 << 20),
    )
    .await
    .expect("the acks-none record arrives")
    .unwrap();
    assert_eq!(fetched.records.len(), 1);
    assert_eq!(&fetched.records[0].value[..], b"fire and forget");
    assert_eq!(fetched.high_watermark, 1);

    // The client drops anything answering an acks=none produce, so it cannot show that
    // the broker sends nothing: a raw connection can. After an acks=none produce, the
    // next frame on the wire must answer the request sent after it.
    let mut raw = common::RawClient::connect(broker.addr());
    let silent = raw.send(&Request::Produce(produce_request(
        "t",
        0,
        Acks::None,
        batch_of(&[b"raw and forget"]),
    )));
    let answered = raw.send(&Request::Metadata(MetadataRequest {
        topics: vec!["t".into()],
    }));
    let (correlation_id, opcode, _) = raw.read_frame().expect("the metadata answer");
    assert_eq!(
        (correlation_id, common::opcode_of(opcode)),
        (answered, Opcode::Metadata),
        "a frame answered the acks=none produce {silent}"
    );
    // It lands all the same (a long-poll at offset 1 returns once it is durable).
    let fetched = tokio::time::timeout(
        STEP_TIMEOUT,
        client.fetch_records("t", 0, 1, 15_000, 1 << 20),
    )
    .await
    .expect("the raw acks-none record arrives")
    .unwrap();
    assert_eq!(&fetched.records[0].value[..], b"raw and forget");
}

#[tokio::test]
async fn produce_with_acks_memory_and_durable_answer_dense_base_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let client = Client::connect(broker.addr()).await.unwrap();
    client.create_topic("t", 2).await.unwrap();
    let mut expected_base = 0;
    for (acks, values) in [
        (Acks::Memory, &[&b"m0"[..], b"m1"][..]),
        (Acks::Durable, &[&b"d0"[..], b"d1", b"d2"][..]),
        (Acks::Memory, &[&b"m2"[..]][..]),
    ] {
        let request = produce_request("t", 1, acks, batch_of(values));
        let response = client.produce(request).await.unwrap().expect("an answer");
        assert_eq!(
            response.topics[0].partitions[0].result,
            Ok(expected_base),
            "{acks:?}"
        );
        expected_base += values.len() as u64;
    }
    // Reads stop at the durable watermark: the last, memory-acked record may need a
    // moment before it is readable.
    let records = records_until(&client, "t", 1, 6).await;
    assert_eq!(
        record_values(&records),
        vec!["m0", "m1", "d0", "d1", "d2", "m2"]
    );
    assert_eq!(record_offsets(&records), (0..6).collect::<Vec<u64>>());
    // The other partition is untouched.
    assert_eq!(client.partition_offsets("t", 0).await.unwrap(), (0, 0));
}

#[tokio::test]
async fn fetch_records_skips_earlier_records_and_reports_partition_errors() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let client = Client::connect(broker.addr()).await.unwrap();
    client.create_topic("t", 1).await.unwrap();
    let request = produce_request("t", 0, Acks::Durable, batch_of(&[b"zero", b"one", b"two"]));
    let response = client.produce(request).await.unwrap().unwrap();
    assert_eq!(response.topics[0].partitions[0].result, Ok(0));
    let fetched = client.fetch_records("t", 0, 1, 0, 1 << 20).await.unwrap();
    let offsets: Vec<u64> = fetched.records.iter().map(|record| record.offset).collect();
    assert_eq!(offsets, vec![1, 2]);
    assert_eq!(fetched.high_watermark, 3);
    assert_eq!(fetched.log_start_offset, 0);
    // At the watermark: nothing, and no error.
    let at_end = client.fetch_records("t", 0, 3, 0, 1 << 20).await.unwrap();
    assert!(at_end.records.is_empty());
    let error = client
        .fetch_records("t", 0, 4, 0, 1 << 20)
        .await
        .unwrap_err();
    assert!(is_offset_out_of_range(&error), "{error}");
    assert!(
        matches!(
            &error,
            ClientError::OffsetOutOfRange {
                topic,
                partition: 0,
                requested: 4,
                log_start_offset: 0,
                high_watermark: 3,
            } if topic == "t"
        ),
        "{error}"
    );
    let error = client
        .fetch_records("t", 7, 0, 0, 1 << 20)
        .await
        .unwrap_err();
    assert!(
        matches!(
            &error,
            ClientError::UnknownPartition { topic, partition: 7, partition_count: None }
                if topic == "t"
        ),
        "{error}"
    );
    assert_eq!(
        error.wire_code(),
        Some(ErrorCode::UnknownPartition),
        "{error}"
    );
    let error = client
        .fetch_records("missing", 0, 0, 0, 1 << 20)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ClientError::UnknownTopic { topic } if topic == "missing"),
        "{error}"
    );
    assert_eq!(error.wire_code(), Some(ErrorCode::UnknownTopic), "{error}");
}
