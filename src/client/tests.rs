//! Client unit tests against the scripted peer in `test_peer`, for what the real broker
//! cannot be made to do on demand: answer out of order, drop a connection mid-request,
//! leave requests unanswered. Producer, consumer and request/response behaviour against
//! the real broker is in `tests/client_*.rs`.

use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::test_peer::{handshake_body, listen, ScriptedConnection};
use super::*;
use crate::protocol::batch::BatchBuilder;
use crate::protocol::{
    ProducePartition, ProduceTopic, TopicMetadata, WireError, TIMESTAMP_EARLIEST, TIMESTAMP_LATEST,
};

fn metadata_body(topic: &str) -> ResponseBody {
    ResponseBody::Metadata(MetadataResponse {
        shard_ports: vec![],
        topics: vec![TopicMetadata {
            name: topic.to_owned(),
            error: None,
            partitions: vec![],
            retention: Default::default(),
            queue: Default::default(),
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
        tokio::spawn(async move { client.metadata(&[name]).await })
    });
    for (name, call) in names.iter().zip(calls) {
        let metadata = call.await.unwrap().unwrap();
        assert_eq!(metadata.topics[0].name, *name);
    }
    drop(peer.await.unwrap());
}

/// The client as it is with `reconnect` off: a broken connection is final.
fn no_reconnect() -> ClientConfig {
    ClientConfig::builder()
        .reconnect(false)
        .build()
        .expect("a valid config")
}

/// Reconnecting quickly, and giving up soon when nothing answers.
fn quick_reconnect() -> ClientConfigBuilder {
    ClientConfig::builder()
        .reconnect_backoff_ms_min(1)
        .reconnect_backoff_ms_max(10)
        .reconnect_timeout_ms(2_000)
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
    let client = Client::connect_with(address, no_reconnect()).await.unwrap();
    let first = tokio::spawn({
        let client = client.clone();
        async move { client.metadata(&["a"]).await }
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
            error.report().to_string().contains("closed the connection"),
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
    let config = ClientConfig::builder()
        .requests_pending_max(2)
        .build()
        .expect("a valid config");
    let client = Client::connect_with(address, config).await.unwrap();
    let calls: Vec<_> = ["a", "b", "c"]
        .into_iter()
        .map(|name| {
            let client = client.clone();
            tokio::spawn(async move { client.metadata(&[name]).await })
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
    let config = ClientConfig::builder()
        .request_timeout_ms(50)
        .build()
        .expect("a valid config");
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
    let config = ClientConfig::builder()
        .requests_pending_max(1)
        .build()
        .expect("a valid config");
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
    let metadata = tokio::time::timeout(Duration::from_secs(20), client.metadata(&["after"]))
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

/// Metadata of one topic `t` with one partition.
fn one_partition_metadata() -> ResponseBody {
    ResponseBody::Metadata(MetadataResponse {
        shard_ports: vec![],
        topics: vec![TopicMetadata {
            name: "t".into(),
            error: None,
            partitions: vec![crate::protocol::PartitionMetadata {
                partition: 0,
                shard: 0,
            }],
            retention: Default::default(),
            queue: Default::default(),
        }],
    })
}

/// A produce answer for partition 0 of `t`.
fn produce_answer(result: Result<u64, WireError>) -> ResponseBody {
    ResponseBody::Produce(crate::protocol::ProduceResponse {
        topics: vec![crate::protocol::ProduceTopicResult {
            name: "t".into(),
            partitions: vec![crate::protocol::ProducePartitionResult {
                partition: 0,
                result,
            }],
        }],
    })
}

/// A peer that serves one topic `t` of one partition to a producer: answers the metadata
/// request, then hands each produce request to `answer` (with its batch) and writes what
/// it returns (`None`: leave it unanswered). Returns every batch it received.
async fn producer_peer(
    listener: tokio::net::TcpListener,
    mut answer: impl FnMut(usize, &Bytes) -> Option<Result<u64, WireError>> + Send + 'static,
) -> Vec<Bytes> {
    let mut connection = ScriptedConnection::accept_and_handshake(&listener).await;
    let mut batches = Vec::new();
    while let Some((header, request)) = connection.read_request().await {
        match request {
            Request::Metadata(_) => {
                connection
                    .respond(&header, Ok(&one_partition_metadata()))
                    .await;
            }
            Request::Produce(produce) => {
                let batch = produce.topics[0].partitions[0].batch.clone();
                let index = batches.len();
                batches.push(batch.clone());
                let Some(result) = answer(index, &batch) else {
                    continue;
                };
                connection
                    .respond(&header, Ok(&produce_answer(result)))
                    .await;
            }
            other => panic!("unexpected request {other:?}"),
        }
    }
    batches
}

fn quick_retries() -> ProducerConfigBuilder {
    ProducerConfig::builder()
        .linger_ms(0)
        .retry_backoff_ms_min(1)
        .retry_backoff_ms_max(4)
}

fn header_of(batch: &Bytes) -> crate::protocol::batch::BatchHeader {
    crate::protocol::batch::validate_batch(batch, 100).unwrap()
}

#[tokio::test]
async fn retriable_refusals_resend_the_same_bytes_and_sequences_follow_send_order() {
    let (listener, address) = listen().await;
    // Timeout, then ShuttingDown, then success; the next batch succeeds at once.
    let peer = tokio::spawn(producer_peer(listener, |index, _| {
        Some(match index {
            0 => Err(WireError::new(ErrorCode::Timeout, "slow disk")),
            1 => Err(WireError::new(ErrorCode::ShuttingDown, "closing")),
            2 => Ok(10),
            _ => Ok(11),
        })
    }));
    let client = Client::connect(address).await.unwrap();
    let producer = Producer::new(client.clone(), quick_retries().build().unwrap()).unwrap();
    let producer_id = producer.producer_id();
    assert_ne!(producer_id, 0, "idempotent by default");
    let first = producer
        .send("t", ProducerRecord::new("a").with_partition(0))
        .await
        .unwrap();
    assert_eq!(first.await.unwrap().offset, 10);
    let second = producer
        .send("t", ProducerRecord::new("b").with_partition(0))
        .await
        .unwrap();
    assert_eq!(second.await.unwrap().offset, 11);
    producer.close().await.unwrap();
    drop(producer);
    client.close();
    drop(client);
    let batches = peer.await.unwrap();
    assert_eq!(batches.len(), 4);
    assert_eq!(batches[0], batches[1], "a retry resends the same bytes");
    assert_eq!(batches[0], batches[2]);
    let (first, second) = (header_of(&batches[0]), header_of(&batches[3]));
    assert_eq!((first.producer_id, first.sequence), (producer_id, 0));
    assert_eq!((second.producer_id, second.sequence), (producer_id, 1));
}

#[tokio::test]
async fn storage_full_until_the_delivery_timeout_fails_as_not_written_and_renews_the_id() {
    let (listener, address) = listen().await;
    let mut first_id = None;
    let peer = tokio::spawn(producer_peer(listener, move |_, batch| {
        let header = header_of(batch);
        assert_ne!(header.producer_id, 0);
        let first_id = *first_id.get_or_insert(header.producer_id);
        Some(if header.producer_id == first_id {
            // Refused before append, again and again, until the batch fails for good.
            Err(WireError::new(ErrorCode::StorageFull, "disk full"))
        } else {
            // The next batch comes under a new producer id.
            Ok(0)
        })
    }));
    let client = Client::connect(address).await.unwrap();
    // Over almost at once: the refusal becomes final after a retry or two at most.
    let config = quick_retries().delivery_timeout_ms(1).build().unwrap();
    let producer = Producer::new(client.clone(), config).unwrap();
    let old_id = producer.producer_id();
    let error = producer
        .send("t", ProducerRecord::new("a").with_partition(0))
        .await
        .unwrap()
        .await
        .unwrap_err();
    assert_eq!(error.maybe_written(), Some(false), "{error}");
    assert_eq!(error.wire_code(), Some(ErrorCode::StorageFull), "{error}");
    assert!(matches!(error, ClientError::ProduceFailed { attempts, .. } if attempts >= 1));
    let new_id = producer.producer_id();
    assert_ne!(
        new_id, old_id,
        "a batch failed for good renews the producer id"
    );
    let outcome = producer
        .send("t", ProducerRecord::new("b").with_partition(0))
        .await
        .unwrap()
        .await;
    assert_eq!(outcome.unwrap().offset, 0);
    // Close reports the refusals of the first sends; they were checked above.
    assert!(producer.close().await.is_err());
    drop(producer);
    client.close();
    drop(client);
    let batches = peer.await.unwrap();
    assert_eq!(header_of(&batches[0]).producer_id, old_id);
    assert_ne!(header_of(batches.last().unwrap()).producer_id, old_id);
}

#[tokio::test]
async fn out_of_order_sequence_is_final_and_not_written() {
    let (listener, address) = listen().await;
    let peer = tokio::spawn(producer_peer(listener, |_, _| {
        Some(Err(WireError::new(
            ErrorCode::OutOfOrderSequence,
            "expected sequence 4, got 0",
        )))
    }));
    let client = Client::connect(address).await.unwrap();
    let producer = Producer::new(client.clone(), quick_retries().build().unwrap()).unwrap();
    let error = producer
        .send("t", ProducerRecord::new("a").with_partition(0))
        .await
        .unwrap()
        .await
        .unwrap_err();
    assert_eq!(error.maybe_written(), Some(false), "{error}");
    assert!(
        matches!(error, ClientError::ProduceFailed { attempts: 1, .. }),
        "{error}"
    );
    drop(producer);
    client.close();
    drop(client);
    assert_eq!(peer.await.unwrap().len(), 1, "not retried");
}

#[tokio::test]
async fn connection_lost_after_sending_is_final_and_maybe_written_without_reconnect() {
    let (listener, address) = listen().await;
    let peer = tokio::spawn(async move {
        let mut connection = ScriptedConnection::accept_and_handshake(&listener).await;
        // Metadata, then the produce arrives and the connection drops unanswered.
        let (header, _) = connection.read_request().await.unwrap();
        connection
            .respond(&header, Ok(&one_partition_metadata()))
            .await;
        let (_, produce) = connection.read_request().await.unwrap();
        assert!(matches!(produce, Request::Produce(_)));
    });
    let client = Client::connect_with(address, no_reconnect()).await.unwrap();
    let producer = Producer::new(client.clone(), quick_retries().build().unwrap()).unwrap();
    let error = producer
        .send("t", ProducerRecord::new("a").with_partition(0))
        .await
        .unwrap()
        .await
        .unwrap_err();
    assert_eq!(error.maybe_written(), Some(true), "{error}");
    assert!(
        matches!(error.cause(), ClientError::Disconnected { .. }),
        "{error}"
    );
    peer.await.unwrap();
    // On the dead connection a new batch is refused before it leaves: not written.
    let error = producer
        .send("t", ProducerRecord::new("b").with_partition(0))
        .await
        .unwrap()
        .await
        .unwrap_err();
    assert_eq!(error.maybe_written(), Some(false), "{error}");
}

#[tokio::test]
async fn a_read_lost_with_its_connection_is_sent_again_on_a_new_one() {
    let (listener, address) = listen().await;
    let peer = tokio::spawn(async move {
        let mut first = ScriptedConnection::accept_and_handshake(&listener).await;
        let (_, request) = first.read_request().await.unwrap();
        assert_eq!(topic_of(&request), "a");
        drop(first);
        // The same request again, on the client's second connection.
        let mut second = ScriptedConnection::accept_and_handshake(&listener).await;
        let (header, request) = second.read_request().await.unwrap();
        assert_eq!(topic_of(&request), "a");
        second
            .respond(&header, Ok(&metadata_body(&topic_of(&request))))
            .await;
        second
    });
    let client = Client::connect_with(address, quick_reconnect().build().unwrap())
        .await
        .unwrap();
    let metadata = client.metadata(&["a"]).await.unwrap();
    assert_eq!(metadata.topics[0].name, "a");
    assert_eq!(client.reconnects(), 1);
    assert!(!client.is_broken());
    drop(peer.await.unwrap());
}

#[tokio::test]
async fn a_change_lost_with_its_connection_fails_and_the_next_request_reconnects() {
    let (listener, address) = listen().await;
    let peer = tokio::spawn(async move {
        let mut first = ScriptedConnection::accept_and_handshake(&listener).await;
        let (_, request) = first.read_request().await.unwrap();
        assert!(matches!(request, Request::DeleteTopic(_)), "{request:?}");
        drop(first);
        let mut second = ScriptedConnection::accept_and_handshake(&listener).await;
        let (header, request) = second.read_request().await.unwrap();
        // Not the delete again: it may have been done, so it is the caller's to resend.
        assert_eq!(topic_of(&request), "b");
        second
            .respond(&header, Ok(&metadata_body(&topic_of(&request))))
            .await;
        second
    });
    let client = Client::connect_with(address, quick_reconnect().build().unwrap())
        .await
        .unwrap();
    let error = client.delete_topic("a").await.unwrap_err();
    assert!(matches!(error, ClientError::Disconnected { .. }), "{error}");
    client.metadata(&["b"]).await.unwrap();
    assert_eq!(client.reconnects(), 1);
    drop(peer.await.unwrap());
}

#[tokio::test]
async fn reconnecting_gives_up_after_its_timeout_naming_the_address() {
    let (listener, address) = listen().await;
    let peer = tokio::spawn(async move {
        let mut connection = ScriptedConnection::accept_and_handshake(&listener).await;
        connection.read_request().await.unwrap();
        // Nothing listens any more once the listener goes with this task.
    });
    let config = quick_reconnect().reconnect_timeout_ms(200).build().unwrap();
    let client = Client::connect_with(address, config).await.unwrap();
    let pending = tokio::spawn({
        let client = client.clone();
        async move { client.delete_topic("a").await }
    });
    peer.await.unwrap();
    assert!(matches!(
        pending.await.unwrap(),
        Err(ClientError::Disconnected { .. })
    ));
    let error = client.metadata(&[]).await.unwrap_err();
    match &error {
        ClientError::Connect { address: named, .. } => {
            assert_eq!(named, &address.to_string(), "{error}")
        }
        other => panic!("expected a connect error, got {other}"),
    }
    assert_eq!(client.reconnects(), 0);
}

#[tokio::test]
async fn a_closed_client_never_reconnects() {
    let (listener, address) = listen().await;
    let (client, _first) = tokio::join!(
        Client::connect_with(address, quick_reconnect().build().unwrap()),
        ScriptedConnection::accept_and_handshake(&listener)
    );
    let client = client.unwrap();
    client.close();
    assert!(client.is_closed());
    assert!(matches!(
        client.metadata(&[]).await,
        Err(ClientError::Closed)
    ));
    // No second connection was attempted.
    let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
    assert!(accepted.is_err(), "a closed client connected again");
    assert_eq!(client.reconnects(), 0);
}

#[tokio::test]
async fn a_batch_lost_with_its_connection_is_sent_again_byte_for_byte_on_the_next() {
    let (listener, address) = listen().await;
    let peer = tokio::spawn(async move {
        let mut first = ScriptedConnection::accept_and_handshake(&listener).await;
        let (header, _) = first.read_request().await.unwrap();
        first.respond(&header, Ok(&one_partition_metadata())).await;
        let (_, lost) = first.read_request().await.unwrap();
        drop(first);
        let mut second = ScriptedConnection::accept_and_handshake(&listener).await;
        let (header, again) = second.read_request().await.unwrap();
        let (Request::Produce(lost), Request::Produce(again)) = (lost, again) else {
            panic!("expected the produce twice");
        };
        assert_eq!(
            lost.topics[0].partitions[0].batch, again.topics[0].partitions[0].batch,
            "the same batch: producer id, sequence and records"
        );
        second.respond(&header, Ok(&produce_answer(Ok(7)))).await;
        second
    });
    let client = Client::connect_with(address, quick_reconnect().build().unwrap())
        .await
        .unwrap();
    let producer = Producer::new(client.clone(), quick_retries().build().unwrap()).unwrap();
    let metadata = producer
        .send("t", ProducerRecord::new("a").with_partition(0))
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(metadata.offset, 7);
    assert_eq!(client.reconnects(), 1);
    drop(peer.await.unwrap());
}

#[test]
fn display_names_what_failed_and_never_repeats_its_source() {
    let io = || Arc::new(io::Error::other("the io cause"));
    let refusal = || WireError::new(ErrorCode::StorageFull, "the broker's words");
    let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let errors = [
        ClientError::Connect {
            address: "broker.example:9740".into(),
            source: io(),
        },
        ClientError::Io {
            context: "reading responses",
            peer,
            source: io(),
        },
        ClientError::Broker(refusal()),
        ClientError::PartitionRefused {
            topic: "t".into(),
            partition: 1,
            error: refusal(),
        },
        ClientError::CommitRefused {
            group: "g".into(),
            topic: "t".into(),
            partition: 1,
            error: refusal(),
        },
        ClientError::Disconnected {
            peer,
            cause: Arc::new(ClientError::Broker(refusal())),
        },
        ClientError::ProduceFailed {
            cause: Arc::new(ClientError::Broker(refusal())),
            maybe_written: false,
            attempts: 2,
        },
    ];
    for error in errors {
        let source = std::error::Error::source(&error).expect("each has a source");
        let (text, report) = (error.to_string(), error.report().to_string());
        assert!(
            !text.contains(&source.to_string()),
            "{text} repeats {source}"
        );
        assert_eq!(report, format!("{text}: {}", source_chain(source)));
        assert!(
            report.ends_with("the io cause") || report.ends_with("the broker's words"),
            "{report}"
        );
    }
    // Addresses are kept as given, unquoted.
    let connect = ClientError::Connect {
        address: "broker.example:9740".into(),
        source: io(),
    };
    assert_eq!(connect.to_string(), "cannot connect to broker.example:9740");
}

fn source_chain(error: &dyn std::error::Error) -> String {
    match error.source() {
        Some(under) => format!("{error}: {}", source_chain(under)),
        None => error.to_string(),
    }
}

#[test]
fn one_variant_per_condition_and_which_ones_are_retriable() {
    let unknown_topic = WireError::new(ErrorCode::UnknownTopic, "x");
    let unknown_partition = WireError::new(ErrorCode::UnknownPartition, "x");
    for partition in [None, Some(3)] {
        assert!(matches!(
            ClientError::refusal("t", partition, unknown_topic.clone()),
            ClientError::UnknownTopic { topic } if topic == "t"
        ));
    }
    assert!(matches!(
        ClientError::refusal("t", Some(3), unknown_partition),
        ClientError::UnknownPartition {
            partition: 3,
            partition_count: None,
            ..
        }
    ));
    let retriable = [
        ErrorCode::ShuttingDown,
        ErrorCode::Timeout,
        ErrorCode::StorageFull,
    ];
    for code in [
        ErrorCode::ShuttingDown,
        ErrorCode::Timeout,
        ErrorCode::StorageFull,
        ErrorCode::InvalidBatch,
        ErrorCode::StorageError,
        ErrorCode::OutOfOrderSequence,
    ] {
        let error = ClientError::refusal("t", Some(0), WireError::new(code, "x"));
        assert_eq!(error.is_retriable(), retriable.contains(&code), "{code:?}");
    }
    let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let lost = ClientError::Disconnected {
        peer,
        cause: Arc::new(ClientError::Io {
            context: "reading responses",
            peer,
            source: Arc::new(io::Error::from(io::ErrorKind::UnexpectedEof)),
        }),
    };
    assert!(lost.is_retriable() && lost.is_connection_lost());
    let garbled = ClientError::Disconnected {
        peer,
        cause: Arc::new(ClientError::Protocol(ProtocolError::UnsupportedVersion {
            version: 9,
        })),
    };
    assert!(!garbled.is_retriable() && !garbled.is_connection_lost());
    assert!(!ClientError::Closed.is_retriable());
    assert!(!ClientError::UnknownTopic { topic: "t".into() }.is_retriable());
}

#[tokio::test]
async fn a_close_ends_a_reconnect_in_progress() {
    let (listener, address) = listen().await;
    let (client, first) = tokio::join!(
        Client::connect_with(
            address,
            quick_reconnect()
                .reconnect_timeout_ms(600_000)
                .build()
                .unwrap()
        ),
        ScriptedConnection::accept_and_handshake(&listener)
    );
    let client = client.unwrap();
    // Nothing listens any more: the client reconnects, and keeps failing, until its
    // ten-minute limit.
    drop(first);
    drop(listener);
    let waiting = tokio::spawn({
        let client = client.clone();
        async move { client.metadata(&["a"]).await }
    });
    while client.reconnects() == 0 && !client.is_broken() {
        tokio::task::yield_now().await;
    }
    client.close();
    let result = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the close ended the reconnect, not its ten-minute limit")
        .unwrap();
    assert!(matches!(result, Err(ClientError::Closed)), "{result:?}");
    assert_eq!(client.reconnects(), 0);
}

#[tokio::test]
async fn a_send_waiting_for_memory_is_refused_when_the_producer_closes() {
    let (listener, address) = listen().await;
    // Answers the metadata, then never answers the produce: the first record's memory
    // is never given back.
    let peer = tokio::spawn(producer_peer(listener, |_, _| None));
    let client = Client::connect(address).await.unwrap();
    let config = quick_retries().buffer_bytes_max(600).build().unwrap();
    let producer = Producer::new(client.clone(), config).unwrap();
    let _held = producer
        .send("t", ProducerRecord::new("x".repeat(512)).with_partition(0))
        .await
        .unwrap();
    let mut waiting = Box::pin(producer.send("t", ProducerRecord::new("y".repeat(512))));
    let first_poll = std::future::poll_fn(|context| {
        std::task::Poll::Ready(std::future::Future::poll(waiting.as_mut(), context).is_pending())
    })
    .await;
    assert!(first_poll, "the second send waits for memory");
    // The close cannot finish (its flush waits for an answer that never comes), but
    // the waiting send is refused at once.
    let closing = tokio::spawn({
        let producer = producer.clone();
        async move { producer.close().await }
    });
    let refused = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting send is refused while the close is still flushing");
    assert!(matches!(refused, Err(ClientError::Closed)), "{refused:?}");
    assert!(!closing.is_finished());
    closing.abort();
    client.close();
    drop(client);
    drop(producer);
    peer.abort();
}

#[tokio::test]
async fn without_idempotence_a_batch_lost_with_its_connection_is_not_sent_again() {
    let (listener, address) = listen().await;
    let peer = tokio::spawn(async move {
        let mut first = ScriptedConnection::accept_and_handshake(&listener).await;
        let (header, _) = first.read_request().await.unwrap();
        first.respond(&header, Ok(&one_partition_metadata())).await;
        let (_, produce) = first.read_request().await.unwrap();
        assert!(matches!(produce, Request::Produce(_)));
        drop(first);
        // The client reconnects for its next request, but the batch, which the broker
        // may have stored, never comes again: the metadata request is all there is.
        let mut second = ScriptedConnection::accept_and_handshake(&listener).await;
        let (header, request) = second.read_request().await.unwrap();
        assert!(matches!(request, Request::Metadata(_)), "{request:?}");
        second.respond(&header, Ok(&one_partition_metadata())).await;
        let again = tokio::time::timeout(Duration::from_millis(300), second.read_request()).await;
        assert!(again.is_err(), "the batch was sent again: {again:?}");
    });
    let client = Client::connect_with(address, quick_reconnect().build().unwrap())
        .await
        .unwrap();
    let config = quick_retries()
        .idempotent(false)
        .batches_in_flight_per_partition_max(1)
        .build()
        .unwrap();
    let producer = Producer::new(client.clone(), config).unwrap();
    let sent = producer
        .send("t", ProducerRecord::new("a").with_partition(0))
        .await
        .unwrap();
    let error = sent.await.unwrap_err();
    assert_eq!(error.maybe_written(), Some(true), "{error}");
    assert!(error.cause().is_connection_lost(), "{error}");
    // The next request reconnects; the peer checks nothing else follows it.
    client.metadata(&["t"]).await.unwrap();
    assert_eq!(client.reconnects(), 1);
    peer.await.unwrap();
}

#[test]
fn reconnect_settings_are_validated_at_their_edges() {
    let with = |change: fn(ClientConfigBuilder) -> ClientConfigBuilder| {
        change(ClientConfig::builder()).build().map(drop)
    };
    let refused = |result: Result<(), ClientError>, field: &str| match result {
        Err(ClientError::InvalidConfig { field: named, .. }) => assert_eq!(named, field),
        other => panic!("{field}: expected a refusal, got {other:?}"),
    };
    refused(
        with(|c| c.reconnect_backoff_ms_min(0)),
        "reconnect_backoff_ms_min",
    );
    refused(with(|c| c.reconnect_timeout_ms(0)), "reconnect_timeout_ms");
    refused(
        with(|c| c.reconnect_backoff_ms_min(10).reconnect_backoff_ms_max(9)),
        "reconnect_backoff_ms_max",
    );
    refused(with(|c| c.requests_pending_max(0)), "requests_pending_max");
    refused(with(|c| c.request_timeout_ms(0)), "request_timeout_ms");
    // At the edges: 1 ms, and a maximum equal to the minimum.
    with(|c| {
        c.reconnect_backoff_ms_min(1)
            .reconnect_backoff_ms_max(1)
            .reconnect_timeout_ms(1)
    })
    .unwrap();
    // With reconnecting off, the reconnect settings are not used and not checked.
    with(|c| c.reconnect(false).reconnect_timeout_ms(0)).unwrap();
    // Every setter lands in its own field.
    let config = ClientConfig::builder()
        .client_name("named")
        .requests_pending_max(3)
        .response_body_bytes_max(4)
        .request_timeout_ms(5)
        .reconnect(false)
        .reconnect_backoff_ms_min(6)
        .reconnect_backoff_ms_max(7)
        .reconnect_timeout_ms(8)
        .build()
        .unwrap();
    assert_eq!(
        (
            config.client_name.as_str(),
            config.requests_pending_max,
            config.response_body_bytes_max,
            config.request_timeout_ms,
            config.reconnect,
            config.reconnect_backoff_ms_min,
            config.reconnect_backoff_ms_max,
            config.reconnect_timeout_ms,
        ),
        ("named", 3, 4, 5, false, 6, 7, 8)
    );
    // The backoff never exceeds its cap, even for huge attempt counts.
    for attempt in [1, 2, 10, 64, u32::MAX] {
        assert!(super::backoff_delay(attempt, 20, 2_000) <= Duration::from_millis(2_000));
    }
    // Near the top of the range the doubling saturates instead of overflowing.
    let cap = u64::MAX / 2;
    assert!(super::backoff_delay(40, u64::MAX / 4, cap) <= Duration::from_millis(cap));
}

/// A fetch answer for partition 0 of `t`: `values` stored from `base_offset` on, in one
/// batch, with the high watermark just past them.
fn fetch_answer(base_offset: u64, values: &[&'static [u8]]) -> ResponseBody {
    let mut builder = BatchBuilder::new(BytesMut::new());
    for value in values {
        builder.push(5, None, value, &[]);
    }
    let mut batch = BytesMut::from(&builder.finish()[..]);
    crate::protocol::batch::stamp_batch(&mut batch, base_offset, 5);
    ResponseBody::Fetch(FetchResponse {
        topics: vec![crate::protocol::FetchTopicResult {
            name: "t".into(),
            partitions: vec![crate::protocol::FetchPartitionResult {
                partition: 0,
                data: crate::protocol::FetchPartitionData {
                    log_start_offset: 0,
                    high_watermark: base_offset + values.len() as u64,
                    batches: Ok(batch.freeze()),
                },
            }],
        }],
    })
}

/// The offset a fetch asks of partition 0 of `t`.
fn fetch_offset(request: &Request) -> u64 {
    match request {
        Request::Fetch(fetch) => fetch.topics[0].partitions[0].offset,
        other => panic!("expected a fetch, got {other:?}"),
    }
}

#[tokio::test]
async fn a_cancelled_poll_leaves_its_fetch_for_the_next_poll_to_take() {
    let (listener, address) = listen().await;
    let (answer_now, answer) = tokio::sync::oneshot::channel::<()>();
    let peer = tokio::spawn(async move {
        let mut connection = ScriptedConnection::accept_and_handshake(&listener).await;
        let (header, first) = connection.read_request().await.unwrap();
        assert_eq!(fetch_offset(&first), 0);
        // Answered only after the poll that sent it was cancelled.
        answer.await.unwrap();
        connection
            .respond(&header, Ok(&fetch_answer(0, &[b"a", b"b", b"c"])))
            .await;
        // Had the cancelled fetch been dropped, the next poll would ask for offset 0
        // again; it must take the answer above and ask from 3.
        let (header, second) = connection.read_request().await.unwrap();
        assert_eq!(fetch_offset(&second), 3, "the fetch was sent twice");
        connection
            .respond(&header, Ok(&fetch_answer(3, &[b"d"])))
            .await;
        connection
    });
    let client = Client::connect_with(address, no_reconnect()).await.unwrap();
    let mut consumer = Consumer::new(client, ConsumerConfig::default()).unwrap();
    consumer.assign("t", 0, 0);
    // The request is out once the client has written it: poll until then and drop it.
    let cancelled = tokio::time::timeout(Duration::from_millis(200), consumer.poll()).await;
    assert!(
        cancelled.is_err(),
        "the fetch was never answered: {cancelled:?}"
    );
    assert_eq!(consumer.position("t", 0), Some(0));
    answer_now.send(()).unwrap();
    let values = |records: Vec<ConsumedRecord>| -> Vec<(u64, Bytes)> {
        records
            .into_iter()
            .map(|record| (record.offset(), record.value().clone()))
            .collect()
    };
    let first = tokio::time::timeout(Duration::from_secs(20), consumer.poll())
        .await
        .expect("the kept fetch's answer")
        .unwrap();
    assert_eq!(
        values(first),
        vec![
            (0, Bytes::from_static(b"a")),
            (1, Bytes::from_static(b"b")),
            (2, Bytes::from_static(b"c"))
        ]
    );
    assert_eq!(consumer.lag("t", 0), Some(0));
    let second = tokio::time::timeout(Duration::from_secs(20), consumer.poll())
        .await
        .expect("the second fetch's answer")
        .unwrap();
    assert_eq!(values(second), vec![(3, Bytes::from_static(b"d"))]);
    drop(peer.await.unwrap());
}

#[tokio::test]
async fn assigning_drops_the_fetch_in_flight_and_reads_from_the_new_position() {
    let (listener, address) = listen().await;
    let (answer_now, answer) = tokio::sync::oneshot::channel::<()>();
    let peer = tokio::spawn(async move {
        let mut connection = ScriptedConnection::accept_and_handshake(&listener).await;
        let (stale_header, stale) = connection.read_request().await.unwrap();
        assert_eq!(fetch_offset(&stale), 0);
        answer.await.unwrap();
        // The stale fetch's answer arrives after the reassignment and must be ignored.
        connection
            .respond(&stale_header, Ok(&fetch_answer(0, &[b"old"])))
            .await;
        let (header, fresh) = connection.read_request().await.unwrap();
        assert_eq!(fetch_offset(&fresh), 10);
        connection
            .respond(&header, Ok(&fetch_answer(10, &[b"new"])))
            .await;
        connection
    });
    let client = Client::connect_with(address, no_reconnect()).await.unwrap();
    let mut consumer = Consumer::new(client, ConsumerConfig::default()).unwrap();
    consumer.assign("t", 0, 0);
    let cancelled = tokio::time::timeout(Duration::from_millis(200), consumer.poll()).await;
    assert!(
        cancelled.is_err(),
        "the fetch was never answered: {cancelled:?}"
    );
    consumer.assign("t", 0, 10);
    answer_now.send(()).unwrap();
    let records = tokio::time::timeout(Duration::from_secs(20), consumer.poll())
        .await
        .expect("the new fetch's answer")
        .unwrap();
    let offsets: Vec<u64> = records.iter().map(ConsumedRecord::offset).collect();
    assert_eq!(offsets, vec![10]);
    assert_eq!(consumer.position("t", 0), Some(11));
    drop(peer.await.unwrap());
}

/// A request cancelled while the reconnect it started is still trying (a `timeout` or a
/// `select!` around it) leaves the reconnect running: the attempt in progress goes on,
/// neither dropped nor started again from attempt 1, and the next request is sent on the
/// connection that attempt made.
#[tokio::test]
async fn a_caller_cancelled_mid_reconnect_leaves_the_attempt_running_for_the_next() {
    let (listener, address) = listen().await;
    let (attempt_seen, seen) = tokio::sync::oneshot::channel();
    let (caller_gone, gone) = tokio::sync::oneshot::channel::<()>();
    let peer = tokio::spawn(async move {
        drop(ScriptedConnection::accept_and_handshake(&listener).await);
        // Attempt 1 fails: closed before its handshake is answered.
        drop(ScriptedConnection::accept(&listener).await);
        // Attempt 2: its handshake waits until the caller that started the reconnect is
        // gone.
        let mut second = ScriptedConnection::accept(&listener).await;
        let (header, request) = second.read_request().await.expect("attempt 2's handshake");
        assert!(matches!(request, Request::Handshake(_)), "{request:?}");
        attempt_seen.send(()).unwrap();
        gone.await.unwrap();
        second.respond(&header, Ok(&handshake_body())).await;
        let (header, request) = second
            .read_request()
            .await
            .expect("the next request, on the connection attempt 2 made");
        second
            .respond(&header, Ok(&metadata_body(&topic_of(&request))))
            .await;
        (listener, second)
    });
    let config = quick_reconnect()
        .reconnect_timeout_ms(20_000)
        .build()
        .unwrap();
    let client = Client::connect_with(address, config).await.unwrap();
    let caller = tokio::spawn({
        let client = client.clone();
        async move { client.metadata(&["a"]).await }
    });
    tokio::time::timeout(Duration::from_secs(10), seen)
        .await
        .expect("the reconnect reaches attempt 2")
        .unwrap();
    caller.abort();
    assert!(caller.await.unwrap_err().is_cancelled());
    caller_gone.send(()).unwrap();
    let metadata = client.metadata(&["b"]).await.unwrap();
    assert_eq!(metadata.topics[0].name, "b");
    assert_eq!(client.reconnects(), 1);
    drop(peer.await.unwrap());
}

/// Dropping the last clone of a client ends its reconnect: nothing is left to use the
/// connection, so the attempt in progress is given up at once (its socket closes)
/// instead of running on to its limits.
#[tokio::test]
async fn dropping_the_last_clone_ends_a_reconnect_in_progress() {
    let (listener, address) = listen().await;
    let config = quick_reconnect()
        .reconnect_timeout_ms(600_000)
        .build()
        .unwrap();
    let (client, first) = tokio::join!(
        Client::connect_with(address, config),
        ScriptedConnection::accept_and_handshake(&listener)
    );
    let client = client.unwrap();
    drop(first);
    let caller = tokio::spawn({
        let client = client.clone();
        async move { client.metadata(&["a"]).await }
    });
    let mut attempt = tokio::time::timeout(
        Duration::from_secs(10),
        ScriptedConnection::accept(&listener),
    )
    .await
    .expect("the client reconnects");
    let handshake = attempt.read_request().await.map(|(_, request)| request);
    assert!(
        matches!(handshake, Some(Request::Handshake(_))),
        "{handshake:?}"
    );
    caller.abort();
    assert!(caller.await.unwrap_err().is_cancelled());
    // Left alone, the attempt would wait request_timeout_ms (30 s) for its handshake.
    drop(client);
    let after = tokio::time::timeout(Duration::from_secs(10), attempt.read_request())
        .await
        .expect("the attempt's connection closes once every clone is gone")
        .map(|(_, request)| request);
    assert!(after.is_none(), "{after:?}");
}

/// After a reconnect to a broker that takes smaller batches (restarted with other
/// settings), batches built for the old limit fail with BatchTooLarge instead of being
/// sent: the one in flight when the connection broke (which may have been written) and
/// one sealed behind it (which was not). Records sent afterwards are batched to the new
/// limit and stored.
#[tokio::test]
async fn after_a_reconnect_the_producer_batches_to_the_new_brokers_limit() {
    let (listener, address) = listen().await;
    let value = [b'v'; 400];
    let record_size = BatchBuilder::record_size(None, &value, &[]);
    // The new broker takes two of these records a batch, not three.
    let limit = crate::protocol::batch::BATCH_HEADER_SIZE + 2 * record_size + 10;
    let limited = ResponseBody::Handshake(HandshakeResponse {
        batch_bytes_max: limit as u32,
        ..match handshake_body() {
            ResponseBody::Handshake(handshake) => handshake,
            other => unreachable!("{other:?}"),
        }
    });
    let (built, batches_built) = tokio::sync::oneshot::channel::<()>();
    let received: Arc<std::sync::Mutex<Vec<Bytes>>> = Arc::default();
    let peer = tokio::spawn({
        let received = received.clone();
        async move {
            let mut first = ScriptedConnection::accept_and_handshake(&listener).await;
            let (header, _) = first.read_request().await.unwrap();
            first.respond(&header, Ok(&one_partition_metadata())).await;
            let (_, produce) = first.read_request().await.unwrap();
            assert!(matches!(produce, Request::Produce(_)), "{produce:?}");
            // Broken, with the first batch unanswered, once the second is built.
            batches_built.await.unwrap();
            drop(first);
            let mut second = ScriptedConnection::accept_and_answer(&listener, &limited).await;
            let mut next_offset = 0;
            while let Some((header, request)) = second.read_request().await {
                let answer = match request {
                    Request::Metadata(_) => one_partition_metadata(),
                    Request::Produce(produce) => {
                        let batch = produce.topics[0].partitions[0].batch.clone();
                        let offset = next_offset;
                        next_offset += u64::from(header_of(&batch).record_count);
                        received.lock().unwrap().push(batch);
                        produce_answer(Ok(offset))
                    }
                    other => panic!("unexpected request {other:?}"),
                };
                second.respond(&header, Ok(&answer)).await;
            }
        }
    });
    let client = Client::connect_with(address, quick_reconnect().build().unwrap())
        .await
        .unwrap();
    // One batch in flight: the second waits, sealed, and is never sent to the first
    // broker.
    let config = quick_retries()
        .linger_ms(600_000)
        .batch_records_max(3)
        .batches_in_flight_per_partition_max(1)
        .build()
        .unwrap();
    let producer = Producer::new(client.clone(), config).unwrap();
    assert_eq!(producer.batch_bytes_max(), 256 << 10, "the first broker's");
    let send_three = |fill: u8| {
        let producer = producer.clone();
        async move {
            let mut handles = Vec::new();
            for _ in 0..3 {
                let record = ProducerRecord::new(Bytes::from(vec![fill; value.len()]));
                handles.push(producer.send("t", record.with_partition(0)).await.unwrap());
            }
            handles
        }
    };
    // Three records: a full batch, sent at once. Three more: sealed behind it.
    let in_flight = send_three(b'a').await;
    let sealed = send_three(b'b').await;
    built.send(()).unwrap();
    let too_large = |error: &ClientError| {
        matches!(
            error.cause(),
            ClientError::BatchTooLarge { partition: 0, size_bytes, limit_bytes, .. }
                if *size_bytes > *limit_bytes && *limit_bytes == limit as u64
        )
    };
    for (handles, maybe_written) in [(in_flight, true), (sealed, false)] {
        let error = tokio::time::timeout(Duration::from_secs(10), handles[0].clone().wait())
            .await
            .expect("the batch is answered")
            .unwrap_err();
        assert!(too_large(&error), "{}", error.report());
        assert_eq!(error.maybe_written(), Some(maybe_written), "{error}");
    }
    let reported = producer.flush().await.unwrap_err();
    assert!(too_large(&reported), "{}", reported.report());
    assert_eq!(producer.batch_bytes_max(), limit);
    let after = send_three(b'c').await;
    tokio::time::timeout(Duration::from_secs(10), producer.flush())
        .await
        .expect("the records after the reconnect are answered")
        .unwrap();
    let offsets: Vec<u64> = after
        .into_iter()
        .map(|handle| handle.try_result().unwrap().unwrap().offset)
        .collect();
    assert_eq!(offsets, vec![0, 1, 2]);
    let received = received.lock().unwrap().clone();
    assert_eq!(received.len(), 2, "two records a batch, then one");
    for batch in &received {
        assert!(batch.len() <= limit, "{} > {limit}", batch.len());
    }
    assert_eq!(client.reconnects(), 1);
    peer.abort();
}

#[tokio::test]
async fn connections_get_nodelay_and_the_configured_keepalive() {
    let (listener, address) = listen().await;
    for keepalive in [Some(Duration::from_secs(7)), None] {
        let (stream, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        let (stream, _accepted) = (stream.unwrap(), accepted.unwrap());
        let config = ClientConfig::builder()
            .tcp_keepalive(keepalive)
            .build()
            .unwrap();
        configure_socket(&stream, &config).unwrap();
        let socket = socket2::SockRef::from(&stream);
        assert!(stream.nodelay().unwrap());
        assert_eq!(socket.keepalive().unwrap(), keepalive.is_some());
        if let Some(idle) = keepalive {
            assert_eq!(socket.keepalive_time().unwrap(), idle);
            assert_eq!(socket.keepalive_interval().unwrap(), idle);
            assert_eq!(socket.keepalive_retries().unwrap(), TCP_KEEPALIVE_PROBES);
        }
    }
}

#[test]
fn tcp_keepalive_is_validated_at_its_edges() {
    let validate = |tcp_keepalive| ClientConfig::builder().tcp_keepalive(tcp_keepalive).build();
    for (keepalive, value_ms) in [
        (Duration::ZERO, 0),
        (Duration::from_millis(999), 999),
        (Duration::from_secs(32_768), 32_768_000),
    ] {
        match validate(Some(keepalive)) {
            Err(ClientError::InvalidConfig {
                field: "tcp_keepalive",
                value,
            }) => assert_eq!(value, value_ms),
            other => panic!("{keepalive:?}: expected a refusal, got {other:?}"),
        }
    }
    for accepted in [
        None,
        Some(Duration::from_secs(1)),
        Some(Duration::from_secs(32_767)),
    ] {
        validate(accepted).unwrap();
    }
    assert_eq!(
        ClientConfig::default().tcp_keepalive,
        Some(Duration::from_secs(15))
    );
}

#[test]
fn consumer_builder_sets_each_field_and_refuses_settings_that_cannot_work() {
    let config = ConsumerConfig::builder()
        .wait_ms_max(7)
        .bytes_max(8)
        .partition_bytes_max(9)
        .group("reports")
        .auto_commit_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    assert_eq!(
        (
            config.wait_ms_max,
            config.bytes_max,
            config.partition_bytes_max,
            config.group.as_deref(),
            config.auto_commit_interval,
        ),
        (7, 8, 9, Some("reports"), Some(Duration::from_millis(10)))
    );
    // The shorthand sets the same two fields.
    let shorthand =
        ConsumerConfig::default().with_group("reports", Some(Duration::from_millis(10)));
    assert_eq!(
        (shorthand.group, shorthand.auto_commit_interval),
        (config.group, config.auto_commit_interval)
    );
    let defaults = ConsumerConfig::builder().build().unwrap();
    assert_eq!(
        (defaults.group, defaults.auto_commit_interval),
        (None, None),
        "no group unless asked"
    );
    let builder = ConsumerConfig::builder;
    crate::client::assert_each_refused([
        (builder().bytes_max(0).build(), "bytes_max", 0),
        (
            builder().partition_bytes_max(0).build(),
            "partition_bytes_max",
            0,
        ),
        (builder().group("").build(), "group", 0),
        (
            builder()
                .auto_commit_interval(Duration::from_secs(5))
                .build(),
            "auto_commit_interval",
            5_000,
        ),
    ]);
}

#[tokio::test]
async fn offset_queries_go_out_as_the_protocol_encodes_them_and_assigning_learns_the_range() {
    use crate::protocol::{
        ListOffsetsPartitionResult, ListOffsetsResponse, ListOffsetsTopicResult,
    };
    let (listener, address) = listen().await;
    let peer = tokio::spawn(async move {
        let mut connection = ScriptedConnection::accept_and_handshake(&listener).await;
        let mut asked = Vec::new();
        // list_offsets, then the consumer's Beginning and End; Offset(3) sends nothing,
        // so the connection closes after these three.
        while let Some((header, request)) = connection.read_request().await {
            let Request::ListOffsets(request) = request else {
                panic!("expected list offsets, got {request:?}")
            };
            let topic = &request.topics[0];
            let timestamps: Vec<i64> = topic
                .partitions
                .iter()
                .map(|partition| partition.timestamp_ms)
                .collect();
            let answer = ResponseBody::ListOffsets(ListOffsetsResponse {
                topics: vec![ListOffsetsTopicResult {
                    name: topic.name.clone(),
                    partitions: topic
                        .partitions
                        .iter()
                        .map(|partition| ListOffsetsPartitionResult {
                            partition: partition.partition,
                            result: Ok(PartitionOffsets {
                                // Tells the answers apart: the ends are 10 and 20.
                                offset: match partition.timestamp_ms {
                                    TIMESTAMP_EARLIEST => 10,
                                    TIMESTAMP_LATEST => 20,
                                    time => (100 + time) as u64,
                                },
                                log_start_offset: 10,
                                high_watermark: 20,
                            }),
                        })
                        .collect(),
                }],
            });
            connection.respond(&header, Ok(&answer)).await;
            asked.push(timestamps);
        }
        asked
    });
    let client = Client::connect(address).await.unwrap();
    let answered = client
        .list_offsets(
            "t",
            &[
                (0, OffsetQuery::Earliest),
                (1, OffsetQuery::Latest),
                (2, OffsetQuery::Time(5)),
                (3, OffsetQuery::Time(-1)),
            ],
        )
        .await
        .unwrap();
    let offsets: Vec<(u32, u64)> = answered
        .iter()
        .map(|(partition, offsets)| (*partition, offsets.offset))
        .collect();
    assert_eq!(offsets, vec![(0, 10), (1, 20), (2, 105), (3, 100)]);
    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default()).unwrap();
    for (start, offset) in [
        (StartPosition::Beginning, 10),
        (StartPosition::End, 20),
        (StartPosition::Offset(3), 3),
    ] {
        assert_eq!(
            consumer.assign_from("t", 0, start).await.unwrap(),
            offset,
            "{start:?}"
        );
        // Every start learns the partition's range, so its lag is known before a poll.
        assert_eq!(consumer.lag("t", 0), Some(20 - offset), "{start:?}");
    }
    drop(consumer);
    drop(client);
    assert_eq!(
        peer.await.unwrap(),
        vec![
            // A time before the epoch goes out as 0, never as an end's -1 or -2.
            vec![TIMESTAMP_EARLIEST, TIMESTAMP_LATEST, 5, 0],
            // One request per assignment, whatever the start: the range answers both ends.
            vec![TIMESTAMP_LATEST],
            vec![TIMESTAMP_LATEST],
            vec![TIMESTAMP_LATEST],
        ]
    );
}

#[tokio::test]
async fn an_acks_none_producer_resolves_sent_handles_without_an_answer_and_refuses_send() {
    let (listener, address) = listen().await;
    // The peer never answers a produce (acks none has no answer to give).
    let peer = tokio::spawn(producer_peer(listener, |_, _| None));
    let client = Client::connect(address).await.unwrap();
    let config = quick_retries().acks(Acks::None).build().unwrap();
    let producer = Producer::new(client.clone(), config).unwrap();
    match producer.send("t", ProducerRecord::new("a")).await {
        Err(ClientError::InvalidConfig {
            field: "acks",
            value: 0,
        }) => {}
        other => panic!("send on an acks-none producer: {other:?}"),
    }
    let sent = producer
        .send_unacknowledged("t", ProducerRecord::new("b").with_partition(0))
        .await
        .unwrap();
    let sent = tokio::time::timeout(Duration::from_secs(20), sent)
        .await
        .expect("resolves once written, with no answer")
        .unwrap();
    assert_eq!((&*sent.topic, sent.partition), ("t", 0));
    producer.close().await.unwrap();
    drop(producer);
    drop(client);
    let batches = peer.await.unwrap();
    assert_eq!(batches.len(), 1, "only the unacknowledged send went out");
    // And the other way round: an acked producer has no unacknowledged sends.
    let (listener, address) = listen().await;
    let peer = tokio::spawn(producer_peer(listener, |_, _| None));
    let client = Client::connect(address).await.unwrap();
    let producer = Producer::new(client.clone(), quick_retries().build().unwrap()).unwrap();
    match producer
        .send_unacknowledged("t", ProducerRecord::new("c"))
        .await
    {
        Err(ClientError::InvalidConfig {
            field: "acks",
            value,
        }) => assert_eq!(value, Acks::Durable as u64),
        other => panic!("send_unacknowledged on an acks-durable producer: {other:?}"),
    }
    drop(producer);
    drop(client);
    assert!(peer.await.unwrap().is_empty(), "nothing was sent");
}

/// A producer whose broker answered the metadata and one produce and then went away for
/// good (its listener closed, so every reconnect is refused); returned once the client has
/// seen the connection break, with the route to `t` partition 0 known.
async fn producer_whose_broker_is_gone(config: ProducerConfigBuilder) -> (Client, Producer) {
    let (listener, address) = listen().await;
    let peer = tokio::spawn(producer_peer(listener, |index, _| {
        (index == 0).then_some(Ok(0))
    }));
    let client_config = quick_reconnect()
        .reconnect_timeout_ms(600_000)
        .build()
        .unwrap();
    let client = Client::connect_with(address, client_config).await.unwrap();
    let producer = Producer::new(client.clone(), config.build().unwrap()).unwrap();
    let warm = producer
        .send("t", ProducerRecord::new("warm").with_partition(0))
        .await
        .unwrap();
    assert_eq!(warm.await.unwrap().offset, 0);
    peer.abort();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !client.is_broken() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the break is never seen"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    (client, producer)
}

/// The delivery timeout counts the wait for a reconnect: a batch whose broker never comes
/// back fails when its delivery timeout ends, not when a (much longer) reconnect gives
/// up, and as not written, since it never left.
#[tokio::test]
async fn a_batch_waiting_for_a_reconnect_fails_at_its_delivery_timeout_as_not_written() {
    let (client, producer) =
        producer_whose_broker_is_gone(quick_retries().delivery_timeout_ms(200)).await;
    let handle = producer
        .send("t", ProducerRecord::new("a").with_partition(0))
        .await
        .unwrap();
    let error = tokio::time::timeout(Duration::from_secs(20), handle)
        .await
        .expect("failed at the delivery timeout, not the reconnect's")
        .unwrap_err();
    assert_eq!(error.maybe_written(), Some(false), "{}", error.report());
    assert!(
        matches!(error.cause(), ClientError::Connect { .. }),
        "{}",
        error.report()
    );
    client.close();
}

/// A close while a batch waits for a reconnect fails it as not written: it never left.
#[tokio::test]
async fn a_batch_waiting_for_a_reconnect_when_the_client_closes_was_not_written() {
    let (client, producer) =
        producer_whose_broker_is_gone(quick_retries().delivery_timeout_ms(600_000)).await;
    let handle = producer
        .send("t", ProducerRecord::new("a").with_partition(0))
        .await
        .unwrap();
    // Wait until the batch's send has started a reconnect (nothing else would), then
    // close while it waits on it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while client.inner.reconnect.lock().unwrap().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reconnect started"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    client.close();
    let error = tokio::time::timeout(Duration::from_secs(20), handle)
        .await
        .expect("the close ends the wait")
        .unwrap_err();
    assert_eq!(error.maybe_written(), Some(false), "{}", error.report());
}

/// With reconnecting off, a stream yields the error that broke its connection and then
/// ends, rather than yielding the same error at once, forever.
#[tokio::test]
async fn a_stream_ends_after_its_connection_breaks_for_good() {
    use futures_util::StreamExt;

    let (listener, address) = listen().await;
    let peer = tokio::spawn(async move {
        let mut connection = ScriptedConnection::accept_and_handshake(&listener).await;
        let (_, fetch) = connection.read_request().await.unwrap();
        assert_eq!(fetch_offset(&fetch), 0);
        // Dropped unanswered.
    });
    let client = Client::connect_with(address, no_reconnect()).await.unwrap();
    let mut consumer = Consumer::new(client, ConsumerConfig::default()).unwrap();
    consumer.assign("t", 0, 0);
    let first = tokio::time::timeout(Duration::from_secs(20), consumer.next())
        .await
        .expect("an item");
    match first {
        Some(Err(error)) => assert!(
            matches!(error, ClientError::Disconnected { .. }),
            "{}",
            error.report()
        ),
        other => panic!("expected the error that broke the connection, got {other:?}"),
    }
    assert!(consumer.next().await.is_none(), "ends after the error");
    assert!(consumer.batches().next().await.is_none());
    assert_eq!(consumer.position("t", 0), Some(0));
    peer.await.unwrap();
}

#[tokio::test]
async fn a_consumer_config_that_cannot_work_is_refused_by_new() {
    let (listener, address) = listen().await;
    let peer =
        tokio::spawn(async move { ScriptedConnection::accept_and_handshake(&listener).await });
    let client = Client::connect_with(address, no_reconnect()).await.unwrap();
    // `with_group` checks nothing; `new` does.
    let error = Consumer::new(
        client.clone(),
        ConsumerConfig::default().with_group("", None),
    )
    .unwrap_err();
    assert!(
        matches!(error, ClientError::InvalidConfig { field: "group", .. }),
        "{error}"
    );
    // What code outside the crate gets by setting a field of a default config.
    let config = ConsumerConfig {
        bytes_max: 0,
        ..ConsumerConfig::default()
    };
    let error = Consumer::new(client, config).unwrap_err();
    assert!(
        matches!(
            error,
            ClientError::InvalidConfig {
                field: "bytes_max",
                value: 0
            }
        ),
        "{error}"
    );
    drop(peer.await.unwrap());
}

#[tokio::test]
async fn pipelined_batches_refused_behind_a_retriable_failure_are_resent_after_it_in_order() {
    let (listener, address) = listen().await;
    let peer = tokio::spawn(async move {
        let mut connection = ScriptedConnection::accept_and_handshake(&listener).await;
        let mut produces = Vec::new();
        let mut batches: Vec<Bytes> = Vec::new();
        // The first batch goes alone (the broker does not know the producer yet) and is
        // stored; then three batches of partition 0 in flight before any answer.
        while produces.len() < 3 {
            let (header, request) = connection.read_request().await.expect("a request");
            match request {
                Request::Metadata(_) => {
                    connection
                        .respond(&header, Ok(&one_partition_metadata()))
                        .await;
                }
                Request::Produce(produce) if batches.is_empty() => {
                    batches.push(produce.topics[0].partitions[0].batch.clone());
                    connection
                        .respond(&header, Ok(&produce_answer(Ok(0))))
                        .await;
                }
                Request::Produce(produce) => {
                    batches.push(produce.topics[0].partitions[0].batch.clone());
                    produces.push(header);
                }
                other => panic!("unexpected request {other:?}"),
            }
        }
        // Answered last to first: the broker refuses the first for a full disk, so the
        // next two have a gap in their sequence.
        let out_of_order = || {
            Err(WireError::new(
                ErrorCode::OutOfOrderSequence,
                "expected sequence 1, got 2",
            ))
        };
        let answers = [
            Err(WireError::new(ErrorCode::StorageFull, "disk full")),
            out_of_order(),
            out_of_order(),
        ];
        for (header, answer) in produces.iter().zip(answers).rev() {
            connection
                .respond(header, Ok(&produce_answer(answer)))
                .await;
        }
        // Then all three again, in order, stored at 1, 2, 3.
        for offset in 1..4u64 {
            let (header, request) = connection.read_request().await.expect("a resend");
            let Request::Produce(produce) = request else {
                panic!("unexpected request {request:?}")
            };
            batches.push(produce.topics[0].partitions[0].batch.clone());
            connection
                .respond(&header, Ok(&produce_answer(Ok(offset))))
                .await;
        }
        while connection.read_request().await.is_some() {}
        batches
    });
    let client = Client::connect(address).await.unwrap();
    let config = quick_retries()
        .batch_records_max(1)
        .batches_in_flight_per_partition_max(3)
        .build()
        .unwrap();
    let producer = Producer::new(client.clone(), config).unwrap();
    let first = producer
        .send("t", ProducerRecord::new("w").with_partition(0))
        .await
        .unwrap();
    assert_eq!(first.await.unwrap().offset, 0);
    let mut handles = Vec::new();
    for value in ["a", "b", "c"] {
        handles.push(
            producer
                .send("t", ProducerRecord::new(value).with_partition(0))
                .await
                .unwrap(),
        );
    }
    let mut offsets = Vec::new();
    for handle in handles {
        offsets.push(
            handle
                .await
                .expect("stored, not failed for being out of order")
                .offset,
        );
    }
    assert_eq!(offsets, vec![1, 2, 3]);
    producer.close().await.unwrap();
    drop(producer);
    client.close();
    drop(client);
    let batches = peer.await.unwrap();
    let sequences: Vec<u64> = batches
        .iter()
        .map(|batch| header_of(batch).sequence)
        .collect();
    assert_eq!(
        sequences,
        vec![0, 1, 2, 3, 1, 2, 3],
        "sent in order, and resent in order after the refused one"
    );
    assert_eq!(&batches[1..4], &batches[4..], "resends are the same bytes");
}
