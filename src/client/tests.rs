//! Client unit tests against the scripted peer in `test_peer`, for what the real broker
//! cannot be made to do on demand: answer out of order, drop a connection mid-request,
//! leave requests unanswered. Producer, consumer and request/response behaviour against
//! the real broker is in `tests/client_*.rs`.

use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::test_peer::{listen, ScriptedConnection};
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
            retention: Default::default(),
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

fn one_record_batch(value: &'static [u8]) -> Bytes {
    let mut builder = BatchBuilder::new(BytesMut::new());
    builder.push(5, None, value, &[]);
    builder.finish()
}

#[tokio::test]
async fn produce_with_acks_none_expects_no_answer_and_keeps_routing() {
    let (listener, address) = listen().await;
    let peer = tokio::spawn(async move {
        let mut connection = ScriptedConnection::accept_and_handshake(&listener).await;
        let (_, produce) = connection.read_request().await.unwrap();
        let Request::Produce(produce) = produce else {
            panic!("expected the produce first, got {produce:?}")
        };
        assert_eq!(produce.acks, Acks::None);
        assert_eq!(
            produce.topics[0].partitions[0].batch,
            one_record_batch(b"quiet")
        );
        // The produce is never answered; the next request is, and must reach its caller.
        let (header, request) = connection.read_request().await.unwrap();
        connection
            .respond(&header, Ok(&metadata_body(&topic_of(&request))))
            .await;
        connection
    });
    let config = ClientConfig {
        requests_pending_max: 1,
        ..ClientConfig::default()
    };
    let client = Client::connect_with(address, config).await.unwrap();
    let request = ProduceRequest {
        acks: Acks::None,
        timeout_ms: 1_000,
        topics: vec![ProduceTopic {
            name: "t".into(),
            partitions: vec![ProducePartition {
                partition: 0,
                batch: one_record_batch(b"quiet"),
            }],
        }],
    };
    assert_eq!(client.produce(request).await.unwrap(), None);
    // With one pending slot, this would wait forever if the produce still held it.
    let metadata = tokio::time::timeout(
        Duration::from_secs(20),
        client.metadata(&["after".to_owned()]),
    )
    .await
    .expect("the unanswered produce must not hold a pending slot")
    .unwrap();
    assert_eq!(metadata.topics[0].name, "after");
    drop(peer.await.unwrap());
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
