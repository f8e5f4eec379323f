//! Client tests against the scripted peers in `test_peer`: response routing, failure
//! propagation, limits, producer batching and routing over a socket, consumer positions.

use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::test_peer::{listen, start_broker, ScriptedConnection};
use super::*;
use crate::protocol::batch::BatchBuilder;
use crate::protocol::{ProducePartition, ProduceTopic, TopicMetadata};

fn metadata_body(topic: &str) -> ResponseBody {
    ResponseBody::Metadata(MetadataResponse {
        shard_ports: vec![],
        topics: vec![TopicMetadata {
            name: topic.to_owned(),
            error: None,
            partitions: vec![],
        }],
    })
}

fn topic_of(request: &Request) -> String {
    match request {
        Request::Metadata(request) => request.topics[0].clone(),
        other => panic!("expected a metadata request, got {other:?}"),
    }
}

#[tokio::test]
async fn handshake_info_is_kept() {
    let (address, _model) = start_broker(&[]).await;
    let client = Client::connect(address).await.unwrap();
    assert_eq!(client.shard_count(), 2);
    assert_eq!(client.shard_id(), 1);
    assert_eq!(client.handshake().server_version, "test-peer");
}

#[tokio::test]
async fn responses_in_any_order_reach_their_callers() {
    let (listener, address) = listen().await;
    let peer = tokio::spawn(async move {
        let mut connection = ScriptedConnection::accept_and_handshake(&listener).await;
        let mut requests = Vec::new();
        for _ in 0..3 {
            requests.push(connection.read_request().await.unwrap());
        }
        // Answer last first, each with the topic its request named.
        for (header, request) in requests.iter().rev() {
            connection
                .respond(header, Ok(&metadata_body(&topic_of(request))))
                .await;
        }
        connection
    });
    let client = Client::connect(address).await.unwrap();
    let names = ["a", "b", "c"];
    let calls = names.map(|name| {
        let client = client.clone();
        tokio::spawn(async move { client.metadata(&[name.to_owned()]).await })
    });
    for (name, call) in names.iter().zip(calls) {
        let metadata = call.await.unwrap().unwrap();
        assert_eq!(metadata.topics[0].name, *name);
    }
    drop(peer.await.unwrap());
}

#[tokio::test]
async fn broken_connection_fails_every_pending_request_and_later_ones() {
    let (listener, address) = listen().await;
    let peer = tokio::spawn(async move {
        let mut connection = ScriptedConnection::accept_and_handshake(&listener).await;
        connection.read_request().await.unwrap();
        connection.read_request().await.unwrap();
        // Drop the connection with both requests unanswered.
    });
    let client = Client::connect(address).await.unwrap();
    let first = tokio::spawn({
        let client = client.clone();
        async move { client.metadata(&["a".to_owned()]).await }
    });
    let second = tokio::spawn({
        let client = client.clone();
        async move { client.delete_topic("b").await }
    });
    peer.await.unwrap();
    let first = first.await.unwrap().unwrap_err();
    let second = second.await.unwrap().unwrap_err();
    for error in [&first, &second] {
        assert!(matches!(error, ClientError::Disconnected { .. }), "{error}");
        assert!(
            error.to_string().contains("closed the connection"),
            "{error}"
        );
    }
    let later = client.create_topic("c", 1).await.unwrap_err();
    assert!(matches!(later, ClientError::Disconnected { .. }), "{later}");
}

#[tokio::test]
async fn top_level_refusal_becomes_broker_error() {
    let (address, _model) = start_broker(&[("orders", 2)]).await;
    let client = Client::connect(address).await.unwrap();
    let error = client.create_topic("orders", 3).await.unwrap_err();
    assert_eq!(error.wire_code(), Some(ErrorCode::TopicAlreadyExists));
    assert!(matches!(error, ClientError::Broker(_)));
    client.create_topic("payments", 3).await.unwrap();
    client.delete_topic("payments").await.unwrap();
}

#[tokio::test]
async fn pending_requests_are_bounded() {
    let (listener, address) = listen().await;
    let peer = tokio::spawn(async move {
        let mut connection = ScriptedConnection::accept_and_handshake(&listener).await;
        let first = connection.read_request().await.unwrap();
        let second = connection.read_request().await.unwrap();
        // A third request must not be written while two are unanswered.
        let third =
            tokio::time::timeout(Duration::from_millis(200), connection.read_request()).await;
        assert!(
            third.is_err(),
            "a third request was written past requests_pending_max"
        );
        for (header, request) in [first, second] {
            connection
                .respond(&header, Ok(&metadata_body(&topic_of(&request))))
                .await;
        }
        let (header, request) = connection.read_request().await.unwrap();
        connection
            .respond(&header, Ok(&metadata_body(&topic_of(&request))))
            .await;
        connection
    });
    let config = ClientConfig {
        requests_pending_max: 2,
        ..ClientConfig::default()
    };
    let client = Client::connect_with(address, config).await.unwrap();
    let calls: Vec<_> = ["a", "b", "c"]
        .into_iter()
        .map(|name| {
            let client = client.clone();
            tokio::spawn(async move { client.metadata(&[name.to_owned()]).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    drop(peer.await.unwrap());
}

#[tokio::test]
async fn request_times_out_without_an_answer() {
    let (listener, address) = listen().await;
    let peer = tokio::spawn(async move {
        let mut connection = ScriptedConnection::accept_and_handshake(&listener).await;
        connection.read_request().await.unwrap();
        connection
    });
    let config = ClientConfig {
        request_timeout_ms: 50,
        ..ClientConfig::default()
    };
    let client = Client::connect_with(address, config).await.unwrap();
    let error = client.metadata(&[]).await.unwrap_err();
    assert!(
        matches!(error, ClientError::Timeout { timeout_ms: 50, .. }),
        "{error}"
    );
    drop(peer.await.unwrap());
}

#[tokio::test]
async fn close_fails_later_requests_with_closed() {
    let (address, _model) = start_broker(&[]).await;
    let client = Client::connect(address).await.unwrap();
    client.close();
    assert!(matches!(
        client.metadata(&[]).await,
        Err(ClientError::Closed)
    ));
}

fn one_record_batch(value: &'static [u8]) -> Bytes {
    let mut builder = BatchBuilder::new(BytesMut::new());
    builder.push(5, None, value, &[]);
    builder.finish()
}

#[tokio::test]
async fn produce_with_acks_none_returns_after_writing() {
    let (address, model) = start_broker(&[("t", 1)]).await;
    let client = Client::connect(address).await.unwrap();
    let request = ProduceRequest {
        acks: Acks::None,
        timeout_ms: 1_000,
        topics: vec![ProduceTopic {
            name: "t".into(),
            partitions: vec![ProducePartition {
                partition: 0,
                batch: one_record_batch(b"fire and forget"),
            }],
        }],
    };
    assert_eq!(client.produce(request).await.unwrap(), None);
    // The connection still works, and the broker got the batch before this request.
    let fetched = client.fetch_records("t", 0, 0, 0, 1 << 20).await.unwrap();
    assert_eq!(fetched.records.len(), 1);
    assert_eq!(&fetched.records[0].value[..], b"fire and forget");
    assert_eq!(model.lock().unwrap().requests.len(), 3);
}

#[tokio::test]
async fn fetch_records_skips_earlier_records_and_reports_partition_errors() {
    let (address, _model) = start_broker(&[("t", 1)]).await;
    let client = Client::connect(address).await.unwrap();
    let mut builder = BatchBuilder::new(BytesMut::new());
    for value in [&b"zero"[..], b"one", b"two"] {
        builder.push(5, None, value, &[]);
    }
    let request = ProduceRequest {
        acks: Acks::Durable,
        timeout_ms: 1_000,
        topics: vec![ProduceTopic {
            name: "t".into(),
            partitions: vec![ProducePartition {
                partition: 0,
                batch: builder.finish(),
            }],
        }],
    };
    let response = client.produce(request).await.unwrap().unwrap();
    assert_eq!(response.topics[0].partitions[0].result, Ok(0));
    let fetched = client.fetch_records("t", 0, 1, 0, 1 << 20).await.unwrap();
    let offsets: Vec<u64> = fetched.records.iter().map(|record| record.offset).collect();
    assert_eq!(offsets, vec![1, 2]);
    assert_eq!(fetched.high_watermark, 3);
    let error = client
        .fetch_records("t", 0, 4, 0, 1 << 20)
        .await
        .unwrap_err();
    assert!(is_offset_out_of_range(&error), "{error}");
    assert!(matches!(
        error,
        ClientError::PartitionRefused { partition: 0, .. }
    ));
}

#[tokio::test]
async fn producer_batches_by_partition_and_resolves_dense_offsets() {
    let (address, model) = start_broker(&[("t", 2)]).await;
    let client = Client::connect(address).await.unwrap();
    let config = ProducerConfig {
        linger_ms: 60_000,
        batch_records_max: 3,
        ..ProducerConfig::default()
    };
    let producer = Producer::new(client.clone(), config).unwrap();
    let mut handles = Vec::new();
    for index in 0..8u32 {
        let record = ProducerRecord::new(format!("value-{index}")).with_partition(index % 2);
        handles.push(producer.send("t", record).await.unwrap());
    }
    producer.flush().await.unwrap();
    let mut next_offset = [0u64; 2];
    for (index, handle) in handles.into_iter().enumerate() {
        let metadata = handle.await.unwrap();
        let partition = index as u32 % 2;
        assert_eq!(metadata.partition, partition);
        assert_eq!(
            metadata.offset,
            Some(next_offset[partition as usize]),
            "record {index}"
        );
        next_offset[partition as usize] += 1;
    }
    let model = model.lock().unwrap();
    let batch_sizes: Vec<Vec<u32>> = (0..2)
        .map(|partition| {
            model.logs[&("t".to_owned(), partition)]
                .iter()
                .map(|batch| {
                    crate::protocol::batch::BatchHeader::read(batch)
                        .unwrap()
                        .record_count
                })
                .collect()
        })
        .collect();
    assert_eq!(
        batch_sizes,
        vec![vec![3, 1], vec![3, 1]],
        "full batches at 3, the rest on flush"
    );
    let multi_partition_request = model.requests.iter().any(|request| match request {
        Request::Produce(request) => {
            request
                .topics
                .iter()
                .map(|topic| topic.partitions.len())
                .sum::<usize>()
                > 1
        }
        _ => false,
    });
    assert!(
        multi_partition_request,
        "one request should carry batches of both partitions"
    );
}

#[tokio::test]
async fn producer_routes_by_key_and_round_robin() {
    let (address, model) = start_broker(&[("t", 3)]).await;
    let client = Client::connect(address).await.unwrap();
    let producer = Producer::new(client, ProducerConfig::default()).unwrap();
    let keyed = producer
        .send("t", ProducerRecord::new("v").with_key("user-42"))
        .await
        .unwrap();
    assert_eq!(
        keyed.partition(),
        crate::placement::partition_for_key(b"user-42", 3)
    );
    let mut round_robin = Vec::new();
    for _ in 0..3 {
        round_robin.push(
            producer
                .send("t", ProducerRecord::new("v"))
                .await
                .unwrap()
                .partition(),
        );
    }
    round_robin.sort_unstable();
    assert_eq!(round_robin, vec![0, 1, 2]);
    producer.flush().await.unwrap();
    let metadata_requests = model
        .lock()
        .unwrap()
        .requests
        .iter()
        .filter(|request| matches!(request, Request::Metadata(_)))
        .count();
    assert_eq!(metadata_requests, 1, "partition counts are cached");
}

#[tokio::test]
async fn partition_error_fails_exactly_that_batch() {
    let (address, model) = start_broker(&[("t", 2)]).await;
    model
        .lock()
        .unwrap()
        .refused
        .insert(("t".to_owned(), 1), ErrorCode::StorageError);
    let client = Client::connect(address).await.unwrap();
    let producer = Producer::new(client, ProducerConfig::default()).unwrap();
    let good = producer
        .send("t", ProducerRecord::new("a").with_partition(0))
        .await
        .unwrap();
    let bad = producer
        .send("t", ProducerRecord::new("b").with_partition(1))
        .await
        .unwrap();
    let flushed = producer.flush().await.unwrap_err();
    assert_eq!(flushed.wire_code(), Some(ErrorCode::StorageError));
    assert_eq!(good.await.unwrap().offset, Some(0));
    let error = bad.await.unwrap_err();
    assert!(
        matches!(&error, ClientError::PartitionRefused { topic, partition: 1, .. } if topic == "t"),
        "{error}"
    );
}

#[tokio::test]
async fn unknown_topic_and_partition_fail_the_send_after_one_refresh() {
    let (address, model) = start_broker(&[("t", 2)]).await;
    let client = Client::connect(address).await.unwrap();
    let producer = Producer::new(client, ProducerConfig::default()).unwrap();
    let error = producer
        .send("missing", ProducerRecord::new("x"))
        .await
        .unwrap_err();
    assert_eq!(error.wire_code(), Some(ErrorCode::UnknownTopic), "{error}");
    producer.send("t", ProducerRecord::new("x")).await.unwrap();
    let error = producer
        .send("t", ProducerRecord::new("x").with_partition(5))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            ClientError::UnknownPartition {
                partition: 5,
                partition_count: 2,
                ..
            }
        ),
        "{error}"
    );
    let metadata_requests = model
        .lock()
        .unwrap()
        .requests
        .iter()
        .filter(|request| matches!(request, Request::Metadata(_)))
        .count();
    assert_eq!(
        metadata_requests, 3,
        "missing once, t once, t refreshed once for partition 5"
    );
}

#[tokio::test]
async fn producer_with_acks_none_resolves_without_offsets() {
    let (address, model) = start_broker(&[("t", 1)]).await;
    let client = Client::connect(address).await.unwrap();
    let config = ProducerConfig {
        acks: Acks::None,
        ..ProducerConfig::default()
    };
    let producer = Producer::new(client.clone(), config).unwrap();
    let handle = producer
        .send("t", ProducerRecord::new("quiet"))
        .await
        .unwrap();
    producer.close().await.unwrap();
    assert_eq!(handle.await.unwrap().offset, None);
    // A request with a response after it proves the broker has read the produce.
    client.metadata(&[]).await.unwrap();
    assert_eq!(model.lock().unwrap().logs[&("t".to_owned(), 0)].len(), 1);
    assert!(matches!(
        producer.send("t", ProducerRecord::new("late")).await,
        Err(ClientError::Closed)
    ));
}

#[tokio::test]
async fn linger_sends_without_flush() {
    let (address, _model) = start_broker(&[("t", 1)]).await;
    let client = Client::connect(address).await.unwrap();
    let config = ProducerConfig {
        linger_ms: 10,
        ..ProducerConfig::default()
    };
    let producer = Producer::new(client, config).unwrap();
    let handle = producer
        .send("t", ProducerRecord::new("soon"))
        .await
        .unwrap();
    let metadata = tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(metadata.offset, Some(0));
}

#[tokio::test]
async fn consumer_polls_every_partition_in_one_fetch_and_advances() {
    let (address, model) = start_broker(&[("t", 2)]).await;
    let client = Client::connect(address).await.unwrap();
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    for index in 0..6u32 {
        producer
            .send(
                "t",
                ProducerRecord::new(format!("{index}")).with_partition(index % 2),
            )
            .await
            .unwrap();
    }
    producer.flush().await.unwrap();
    let mut consumer = Consumer::new(client, ConsumerConfig::default());
    assert_eq!(
        consumer
            .assign_topic("t", StartPosition::Beginning)
            .await
            .unwrap(),
        2
    );
    consumer.assign("t", 1, 1);
    let fetches_before = model.lock().unwrap().requests.len();
    let records = consumer.poll_with_wait(0).await.unwrap();
    assert_eq!(
        model.lock().unwrap().requests.len(),
        fetches_before + 1,
        "one fetch for both"
    );
    let seen: Vec<(u32, u64, String)> = records
        .iter()
        .map(|consumed| {
            (
                consumed.partition,
                consumed.record.offset,
                String::from_utf8_lossy(&consumed.record.value).into_owned(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            (0, 0, "0".into()),
            (0, 1, "2".into()),
            (0, 2, "4".into()),
            (1, 1, "3".into()),
            (1, 2, "5".into()),
        ]
    );
    assert_eq!(consumer.position("t", 0), Some(3));
    assert_eq!(consumer.position("t", 1), Some(3));
    assert_eq!(consumer.high_watermark("t", 1), Some(3));
    assert!(consumer.poll_with_wait(0).await.unwrap().is_empty());
    let mut at_end = Consumer::new(consumer.client().clone(), ConsumerConfig::default());
    assert_eq!(
        at_end
            .assign_from("t", 0, StartPosition::End)
            .await
            .unwrap(),
        3
    );
}

#[test]
fn fetch_response_without_the_partition_is_an_unexpected_response() {
    let response = FetchResponse { topics: vec![] };
    let error = fetch_records_from_response(&response, "t", 0, 0).unwrap_err();
    assert!(
        matches!(error, ClientError::UnexpectedResponse { .. }),
        "{error}"
    );
}
