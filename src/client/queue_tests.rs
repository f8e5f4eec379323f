//! The queue consumer, stream group commits and the other consumer-group calls against
//! the scripted peer: what goes on the wire (ranges, chunks, delays, reasons, leases),
//! how refusals come back, and `run`'s ack / nack / extend / shutdown behaviour. The same
//! calls against the real broker are in `tests/client_queues.rs`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{oneshot, Notify};

use super::test_peer::{listen, ScriptedConnection};
use super::*;
use crate::protocol::queue::{
    handle_ranges, CommitOffsetsResponse, CommitPartitionResult, CommittedOffset,
    FetchCommittedPartitionResult, FetchCommittedResponse, ReceiveResponse, RefusedHandle,
    SettleRequest, SettleResponse, COMMITTED_NONE,
};
use crate::protocol::{
    FetchPartitionData, FetchPartitionResult, FetchResponse, FetchTopicResult,
    ListOffsetsPartitionResult, ListOffsetsResponse, ListOffsetsTopicResult, PartitionMetadata,
    PartitionOffsets, TopicMetadata,
};

fn handle(partition: u32, offset: u64, attempt: u32) -> Handle {
    Handle {
        partition,
        offset,
        attempt,
    }
}

fn message(partition: u32, offset: u64, attempt: u32, value: &'static str) -> ReceivedMessage {
    ReceivedMessage {
        handle: handle(partition, offset, attempt),
        timestamp_ms: 1_700_000_000_000 + offset as i64,
        key: (offset % 2 == 0).then(|| Bytes::from(format!("key-{offset}"))),
        value: Bytes::from_static(value.as_bytes()),
        headers: vec![("h".into(), Bytes::from_static(b"v"))],
    }
}

fn receive_body(messages: Vec<ReceivedMessage>) -> ResponseBody {
    ResponseBody::Receive(ReceiveResponse { messages })
}

fn settled(refused: Vec<(Handle, ErrorCode)>) -> ResponseBody {
    ResponseBody::Settle(SettleResponse {
        refused: refused
            .into_iter()
            .map(|(handle, code)| RefusedHandle {
                handle,
                error: WireError::new(code, format!("{handle} refused")),
            })
            .collect(),
    })
}

fn settle_of(request: Request) -> SettleRequest {
    match request {
        Request::Settle(settle) => settle,
        other => panic!("expected an ack, nack or extend, got {other:?}"),
    }
}

fn handles_in(settle: &SettleRequest) -> Vec<Handle> {
    settle
        .ranges
        .iter()
        .flat_map(|range| range.handles())
        .collect()
}

fn metadata_with_visibility(topic: &str, visibility_timeout_ms: u64) -> ResponseBody {
    ResponseBody::Metadata(MetadataResponse {
        shard_ports: vec![],
        topics: vec![TopicMetadata {
            name: topic.to_owned(),
            error: None,
            partitions: vec![PartitionMetadata {
                partition: 0,
                shard: 0,
            }],
            retention: Default::default(),
            queue: QueueSettings {
                visibility_timeout_ms: Some(visibility_timeout_ms),
                ..QueueSettings::default()
            },
        }],
    })
}

#[tokio::test]
async fn receive_asks_for_the_lease_and_wait_and_returns_messages_with_their_handles() {
    let (listener, address) = listen().await;
    let peer = tokio::spawn(async move {
        let mut connection = ScriptedConnection::accept_and_handshake(&listener).await;
        let (header, request) = connection.read_request().await.unwrap();
        assert_eq!(
            request,
            Request::Receive(ReceiveRequest {
                topic: "orders".into(),
                group: "billing".into(),
                messages_max: 5,
                visibility_timeout_ms: 30_000,
                wait_ms: 250,
            })
        );
        let messages = vec![message(0, 4, 1, "a"), message(1, 9, 3, "b")];
        connection
            .respond(&header, Ok(&receive_body(messages)))
            .await;
        // With no lease given anywhere, 0 asks for the topic's.
        let (header, request) = connection.read_request().await.unwrap();
        let Request::Receive(receive) = request else {
            panic!("expected a receive, got {request:?}")
        };
        assert_eq!(receive.visibility_timeout_ms, 0);
        connection.respond(&header, Ok(&receive_body(vec![]))).await;
        connection
    });
    let client = Client::connect(address).await.unwrap();
    let consumer = client.queue_consumer("orders", "billing");
    let before = tokio::time::Instant::now();
    let messages = consumer
        .receive(5, Some(Duration::from_secs(30)), Duration::from_millis(250))
        .await
        .unwrap();
    assert_eq!(messages.len(), 2);
    let first = &messages[0];
    assert_eq!(first.handle(), handle(0, 4, 1));
    assert_eq!(
        (first.partition(), first.offset(), first.attempt()),
        (0, 4, 1)
    );
    assert_eq!(first.key(), Some(&Bytes::from("key-4")));
    assert_eq!(first.value(), &Bytes::from("a"));
    assert_eq!(first.timestamp(), 1_700_000_000_004);
    assert_eq!(first.header("h"), Some(&Bytes::from("v")));
    assert_eq!(first.headers().len(), 1);
    let deadline = first.lease_deadline().expect("the lease length is known");
    assert!(deadline >= before + Duration::from_secs(30));
    assert!(deadline <= tokio::time::Instant::now() + Duration::from_secs(30));
    assert_eq!(messages[1].attempt(), 3);
    assert_eq!(messages[1].key(), None);
    let none = consumer.receive(1, None, Duration::ZERO).await.unwrap();
    assert!(none.is_empty());
    drop(peer.await.unwrap());
}

#[tokio::test]
async fn receive_and_builder_refuse_settings_that_cannot_work() {
    let (listener, address) = listen().await;
    let peer = tokio::spawn(async move {
        let mut connection = ScriptedConnection::accept_and_handshake(&listener).await;
        // Nothing invalid reaches the wire.
        assert!(connection.read_request().await.is_none());
    });
    let client = Client::connect(address).await.unwrap();
    let field_of = |error: ClientError| match error {
        ClientError::InvalidConfig { field, .. } => field,
        other => panic!("expected InvalidConfig, got {other}"),
    };
    let consumer = client.queue_consumer("t", "g");
    let wait = Duration::ZERO;
    assert_eq!(
        field_of(consumer.receive(0, None, wait).await.unwrap_err()),
        "messages_max"
    );
    assert_eq!(
        field_of(
            consumer
                .receive(1, Some(Duration::from_micros(10)), wait)
                .await
                .unwrap_err()
        ),
        "visibility"
    );
    assert_eq!(
        field_of(
            consumer
                .receive(1, Some(Duration::from_secs(5_000_000)), wait)
                .await
                .unwrap_err()
        ),
        "visibility"
    );
    let builder = || QueueConsumer::builder(client.clone(), "t", "g");
    assert_eq!(
        field_of(builder().handler_concurrency_max(0).build().unwrap_err()),
        "handler_concurrency_max"
    );
    assert_eq!(
        field_of(builder().receive_messages_max(0).build().unwrap_err()),
        "receive_messages_max"
    );
    assert_eq!(
        field_of(
            builder()
                .settle_handles_per_request_max(0)
                .build()
                .unwrap_err()
        ),
        "settle_handles_per_request_max"
    );
    assert_eq!(
        field_of(
            builder()
                .visibility_timeout(Duration::ZERO)
                .build()
                .unwrap_err()
        ),
        "visibility_timeout"
    );
    assert_eq!(
        field_of(
            builder()
                .receive_wait(Duration::from_secs(u64::from(u32::MAX)))
                .build()
                .unwrap_err()
        ),
        "receive_wait"
    );
    drop(consumer);
    drop(client);
    peer.await.unwrap();
}

#[test]
fn queue_config_builder_sets_each_field_and_refuses_like_the_consumer_builder() {
    let config = QueueConsumerConfig::builder()
        .visibility_timeout(Duration::from_millis(1))
        .receive_messages_max(2)
        .receive_wait(Duration::from_millis(3))
        .handler_concurrency_max(4)
        .extend_margin(Duration::from_millis(5))
        .settle_handles_per_request_max(6)
        .build()
        .unwrap();
    assert_eq!(
        (
            config.visibility_timeout,
            config.receive_messages_max,
            config.receive_wait,
            config.handler_concurrency_max,
            config.extend_margin,
            config.settle_handles_per_request_max,
        ),
        (
            Some(Duration::from_millis(1)),
            2,
            Duration::from_millis(3),
            4,
            Duration::from_millis(5),
            6
        )
    );
    assert_eq!(
        QueueConsumerConfig::builder().build().unwrap(),
        QueueConsumerConfig::default()
    );
    let builder = QueueConsumerConfig::builder;
    crate::client::assert_each_refused([
        (
            builder().receive_messages_max(0).build(),
            "receive_messages_max",
            0,
        ),
        (
            builder().handler_concurrency_max(0).build(),
            "handler_concurrency_max",
            0,
        ),
        (
            builder().settle_handles_per_request_max(0).build(),
            "settle_handles_per_request_max",
            0,
        ),
        (
            builder().visibility_timeout(Duration::ZERO).build(),
            "visibility_timeout",
            0,
        ),
        (
            builder()
                .receive_wait(Duration::from_millis(u64::from(u32::MAX) + 1))
                .build(),
            "receive_wait",
            u64::from(u32::MAX) + 1,
        ),
    ]);
}

#[tokio::test]
async fn ack_travels_as_ranges_and_tells_already_settled_from_failures() {
    let (listener, address) = listen().await;
    let handles = vec![
        handle(0, 5, 1),
        handle(0, 6, 1),
        handle(0, 7, 2),
        handle(1, 3, 1),
    ];
    let expected = handles.clone();
    let peer = tokio::spawn(async move {
        let mut connection = ScriptedConnection::accept_and_handshake(&listener).await;
        let (header, request) = connection.read_request().await.unwrap();
        assert_eq!(header.opcode, crate::protocol::Opcode::Ack as u8);
        let settle = settle_of(request);
        assert_eq!((settle.topic.as_str(), settle.group.as_str()), ("t", "g"));
        assert_eq!(settle.action, SettleAction::Ack);
        assert_eq!(settle.ranges, handle_ranges(expected.iter().copied()));
        assert_eq!(settle.ranges.len(), 3, "0:5-6 share a range");
        let refused = vec![
            (handle(0, 7, 2), ErrorCode::AlreadySettled),
            (handle(1, 3, 1), ErrorCode::LeaseExpired),
        ];
        connection.respond(&header, Ok(&settled(refused))).await;
        connection
    });
    let client = Client::connect(address).await.unwrap();
    let consumer = client.queue_consumer("t", "g");
    let outcome = consumer.ack(&handles).await.unwrap();
    assert_eq!(outcome.kind, SettleKind::Ack);
    assert_eq!(outcome.handles, 4);
    assert_eq!(outcome.accepted(), 2);
    assert_eq!(outcome.refused.len(), 2);
    assert_eq!(
        outcome.already_settled().collect::<Vec<_>>(),
        vec![handle(0, 7, 2)]
    );
    let failures: Vec<&Refusal> = outcome.failures().collect();
    assert_eq!(failures.len(), 1, "an ack answered already-settled is done");
    assert_eq!(failures[0].handle, handle(1, 3, 1));
    assert_eq!(failures[0].error, SettleError::LeaseExpired);
    assert_eq!(failures[0].detail, "1:3:1 refused");
    assert!(!outcome.is_success());
    let error = outcome.into_result("t", "g").unwrap_err();
    let text = error.to_string();
    assert!(
        matches!(&error, ClientError::HandlesRefused { refused, operation: "ack", .. } if refused.len() == 1),
        "{text}"
    );
    assert!(text.contains("1:3:1: lease expired"), "{text}");
    assert!(!text.contains("0:7:2"), "{text}");
    drop(peer.await.unwrap());
}

#[tokio::test]
async fn nack_sends_delay_and_a_reason_cut_at_a_character_boundary() {
    let (listener, address) = listen().await;
    let peer = tokio::spawn(async move {
        let mut connection = ScriptedConnection::accept_and_handshake(&listener).await;
        let (header, request) = connection.read_request().await.unwrap();
        assert_eq!(header.opcode, crate::protocol::Opcode::Nack as u8);
        let settle = settle_of(request);
        let SettleAction::Nack { delay, reason } = &settle.action else {
            panic!("expected a nack, got {:?}", settle.action)
        };
        assert_eq!(delay, &NackDelay::Backoff);
        assert!(reason.len() <= NACK_REASON_BYTES_MAX, "{}", reason.len());
        assert!(reason.len() > NACK_REASON_BYTES_MAX - 3);
        assert!(reason.chars().all(|c| c == 'é'));
        let refused = vec![(handle(2, 1, 1), ErrorCode::AlreadySettled)];
        connection.respond(&header, Ok(&settled(refused))).await;
        let (header, request) = connection.read_request().await.unwrap();
        assert_eq!(
            settle_of(request).action,
            SettleAction::Nack {
                delay: NackDelay::Ms(0),
                reason: "again".into()
            }
        );
        connection.respond(&header, Ok(&settled(vec![]))).await;
        connection
    });
    let client = Client::connect(address).await.unwrap();
    let consumer = client.queue_consumer("t", "g");
    // 'é' is two bytes: 1024 / 2 fits exactly, one more does not.
    let reason = "é".repeat(NACK_REASON_BYTES_MAX);
    let outcome = consumer
        .nack(&[handle(2, 1, 1)], NackDelay::Backoff, &reason)
        .await
        .unwrap();
    // A nack of a message that is already done did not take effect.
    assert_eq!(outcome.failures().count(), 1);
    assert!(!outcome.is_success());
    let outcome = consumer
        .nack(&[handle(2, 2, 1)], NackDelay::Ms(0), "again")
        .await
        .unwrap();
    assert!(outcome.is_success());
    assert_eq!(outcome.accepted(), 1);
    drop(peer.await.unwrap());
}

#[tokio::test]
async fn settles_past_the_handle_limit_split_into_requests_and_gather_refusals() {
    let (listener, address) = listen().await;
    let peer = tokio::spawn(async move {
        let mut connection = ScriptedConnection::accept_and_handshake(&listener).await;
        let mut sizes = Vec::new();
        for _ in 0..3 {
            let (header, request) = connection.read_request().await.unwrap();
            let settle = settle_of(request);
            assert_eq!(
                settle.action,
                SettleAction::Extend {
                    visibility_timeout_ms: 60_000
                }
            );
            let handles = handles_in(&settle);
            sizes.push(handles.len());
            // Refuse the first handle of every request.
            let refused = vec![(handles[0], ErrorCode::HandleStale)];
            connection.respond(&header, Ok(&settled(refused))).await;
        }
        assert_eq!(sizes, vec![2, 2, 1]);
        connection
    });
    let client = Client::connect(address).await.unwrap();
    let consumer = QueueConsumer::builder(client, "t", "g")
        .settle_handles_per_request_max(2)
        .build()
        .unwrap();
    let handles: Vec<Handle> = (0..5).map(|offset| handle(0, offset, 1)).collect();
    let outcome = consumer
        .extend(&handles, Duration::from_secs(60))
        .await
        .unwrap();
    let refused: Vec<Handle> = outcome.refused.iter().map(|r| r.handle).collect();
    assert_eq!(
        refused,
        vec![handle(0, 0, 1), handle(0, 2, 1), handle(0, 4, 1)]
    );
    assert!(outcome
        .refused
        .iter()
        .all(|refusal| refusal.error == SettleError::Stale));
    assert_eq!(outcome.accepted(), 2);
    drop(peer.await.unwrap());
}

#[tokio::test]
async fn run_acks_ok_nacks_err_with_its_text_and_returns_after_shutdown() {
    let (listener, address) = listen().await;
    let (stop, stopped) = oneshot::channel::<()>();
    let peer = tokio::spawn(async move {
        let mut connection = ScriptedConnection::accept_and_handshake(&listener).await;
        // No lease configured: run asks the topic's.
        let (header, request) = connection.read_request().await.unwrap();
        assert!(matches!(request, Request::Metadata(_)), "{request:?}");
        connection
            .respond(&header, Ok(&metadata_with_visibility("t", 45_000)))
            .await;
        let (header, request) = connection.read_request().await.unwrap();
        let Request::Receive(receive) = request else {
            panic!("expected a receive, got {request:?}")
        };
        assert_eq!(receive.visibility_timeout_ms, 45_000);
        assert_eq!(receive.messages_max, 2, "no more than handlers may run");
        let messages = vec![message(0, 0, 1, "good"), message(0, 1, 1, "bad")];
        connection
            .respond(&header, Ok(&receive_body(messages)))
            .await;
        let mut acked = Vec::new();
        let mut nacked = Vec::new();
        let mut pending_receive = None;
        let mut stop = Some(stop);
        while acked.is_empty() || nacked.is_empty() || pending_receive.is_none() {
            let (header, request) = connection.read_request().await.unwrap();
            match request {
                Request::Receive(receive) => {
                    assert!(receive.messages_max <= 2);
                    pending_receive = Some(header);
                    continue;
                }
                Request::Settle(settle) => {
                    match &settle.action {
                        SettleAction::Ack => acked.extend(handles_in(&settle)),
                        SettleAction::Nack { delay, reason } => {
                            assert_eq!(*delay, NackDelay::Backoff);
                            assert_eq!(reason, "bad payload at 1");
                            nacked.extend(handles_in(&settle));
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                    connection.respond(&header, Ok(&settled(vec![]))).await;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(acked, vec![handle(0, 0, 1)]);
        assert_eq!(nacked, vec![handle(0, 1, 1)]);
        // Stop while a receive is out: its answer is still taken (empty here).
        stop.take().unwrap().send(()).unwrap();
        connection
            .respond(&pending_receive.unwrap(), Ok(&receive_body(vec![])))
            .await;
        assert!(
            connection.read_request().await.is_none(),
            "nothing after shutdown"
        );
    });
    let client = Client::connect(address).await.unwrap();
    let consumer = QueueConsumer::builder(client, "t", "g")
        .handler_concurrency_max(2)
        .receive_messages_max(10)
        .build()
        .unwrap();
    let summary = consumer
        .run(
            |message| async move {
                if message.value().as_ref() == b"good" {
                    Ok(())
                } else {
                    Err(format!("bad payload at {}", message.offset()))
                }
            },
            stopped,
        )
        .await
        .unwrap();
    assert_eq!(
        summary,
        RunSummary {
            received: 2,
            acked: 1,
            nacked: 1,
            ..RunSummary::default()
        }
    );
    drop(consumer);
    peer.await.unwrap();
}

/// Receives one message whose handler waits for `release`, with a 400 ms lease.
async fn slow_handler_run(
    respond_to_extend: impl Fn(Handle) -> Vec<(Handle, ErrorCode)> + Send + 'static,
    ack_refusal: Option<ErrorCode>,
) -> (RunSummary, usize) {
    let (listener, address) = listen().await;
    let (stop, stopped) = oneshot::channel::<()>();
    let release = Arc::new(Notify::new());
    let released = release.clone();
    let peer = tokio::spawn(async move {
        let mut connection = ScriptedConnection::accept_and_handshake(&listener).await;
        let (header, request) = connection.read_request().await.unwrap();
        assert!(matches!(request, Request::Receive(_)), "{request:?}");
        connection
            .respond(&header, Ok(&receive_body(vec![message(3, 8, 1, "slow")])))
            .await;
        let mut extends = 0;
        // The ack travels in the background: the next receive may come before it.
        let mut next_receive = None;
        loop {
            let (header, request) = connection.read_request().await.unwrap();
            if matches!(request, Request::Receive(_)) {
                assert!(next_receive.is_none(), "one receive at a time");
                next_receive = Some(header);
                continue;
            }
            let settle = settle_of(request);
            assert_eq!(handles_in(&settle), vec![handle(3, 8, 1)]);
            match settle.action {
                SettleAction::Extend {
                    visibility_timeout_ms,
                } => {
                    assert_eq!(visibility_timeout_ms, 400);
                    extends += 1;
                    let refused = respond_to_extend(handle(3, 8, 1));
                    connection.respond(&header, Ok(&settled(refused))).await;
                    // The handler may finish once its lease was extended (or refused).
                    release.notify_one();
                }
                SettleAction::Ack => {
                    let refused = ack_refusal
                        .map(|code| vec![(handle(3, 8, 1), code)])
                        .unwrap_or_default();
                    connection.respond(&header, Ok(&settled(refused))).await;
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        // The loop receives again once the handler is done; stop it there.
        let header = match next_receive {
            Some(header) => header,
            None => {
                let (header, request) = connection.read_request().await.unwrap();
                assert!(matches!(request, Request::Receive(_)), "{request:?}");
                header
            }
        };
        stop.send(()).unwrap();
        connection.respond(&header, Ok(&receive_body(vec![]))).await;
        extends
    });
    let client = Client::connect(address).await.unwrap();
    let consumer = QueueConsumer::builder(client, "t", "g")
        .visibility_timeout(Duration::from_millis(400))
        .extend_margin(Duration::from_secs(10))
        .handler_concurrency_max(1)
        .build()
        .unwrap();
    let summary = consumer
        .run(
            move |_message| {
                let released = released.clone();
                async move {
                    released.notified().await;
                    Ok::<(), String>(())
                }
            },
            stopped,
        )
        .await
        .unwrap();
    drop(consumer);
    (summary, peer.await.unwrap())
}

#[tokio::test]
async fn run_extends_the_lease_of_a_handler_still_running_near_its_end() {
    let (summary, extends) = slow_handler_run(|_| Vec::new(), None).await;
    assert!(extends >= 1);
    assert_eq!(summary.received, 1);
    assert_eq!(summary.acked, 1);
    assert_eq!(summary.extended, extends as u64);
    assert_eq!(summary.refused, 0);
}

#[tokio::test]
async fn run_stops_extending_a_lease_the_broker_refused_and_counts_the_refused_ack() {
    let (summary, extends) = slow_handler_run(
        |handle| vec![(handle, ErrorCode::LeaseExpired)],
        Some(ErrorCode::HandleStale),
    )
    .await;
    assert_eq!(extends, 1, "a refused lease is not extended again");
    assert_eq!(summary.extended, 0);
    assert_eq!(summary.acked, 0);
    assert_eq!(summary.refused, 2);
}

#[tokio::test]
async fn run_nacks_a_panicking_handler() {
    let (listener, address) = listen().await;
    let (stop, stopped) = oneshot::channel::<()>();
    let peer = tokio::spawn(async move {
        let mut connection = ScriptedConnection::accept_and_handshake(&listener).await;
        let (header, _) = connection.read_request().await.unwrap();
        connection
            .respond(&header, Ok(&receive_body(vec![message(0, 0, 1, "boom")])))
            .await;
        // The nack travels in the background: the next receive may come before it.
        let mut next_receive = None;
        let mut nacked = false;
        while !nacked || next_receive.is_none() {
            let (header, request) = connection.read_request().await.unwrap();
            if matches!(request, Request::Receive(_)) {
                assert!(next_receive.is_none(), "one receive at a time");
                next_receive = Some(header);
                continue;
            }
            let settle = settle_of(request);
            assert_eq!(
                settle.action,
                SettleAction::Nack {
                    delay: NackDelay::Backoff,
                    reason: HANDLER_PANICKED_REASON.into()
                }
            );
            connection.respond(&header, Ok(&settled(vec![]))).await;
            nacked = true;
        }
        stop.send(()).unwrap();
        connection
            .respond(&next_receive.unwrap(), Ok(&receive_body(vec![])))
            .await;
    });
    let client = Client::connect(address).await.unwrap();
    let consumer = QueueConsumer::builder(client, "t", "g")
        .visibility_timeout(Duration::from_secs(60))
        .handler_concurrency_max(1)
        .build()
        .unwrap();
    let summary = consumer
        .run(
            |_message| async move {
                if std::hint::black_box(true) {
                    panic!("handler bug (this panic is the test)");
                }
                Ok::<(), String>(())
            },
            stopped,
        )
        .await
        .unwrap();
    assert_eq!(summary.handler_panics, 1);
    assert_eq!(summary.nacked, 1);
    drop(consumer);
    peer.await.unwrap();
}

#[tokio::test]
async fn run_returns_the_transport_error_when_the_connection_breaks_without_reconnect() {
    let (listener, address) = listen().await;
    let peer = tokio::spawn(async move {
        let mut connection = ScriptedConnection::accept_and_handshake(&listener).await;
        connection.read_request().await.unwrap();
        // Dropped with the receive unanswered.
    });
    let config = ClientConfig::builder()
        .reconnect(false)
        .build()
        .expect("a valid config");
    let client = Client::connect_with(address, config).await.unwrap();
    let consumer = QueueConsumer::builder(client, "t", "g")
        .visibility_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let handled = Arc::new(AtomicBool::new(false));
    let seen = handled.clone();
    let error = consumer
        .run(
            move |_message| {
                seen.store(true, Ordering::Relaxed);
                async { Ok::<(), String>(()) }
            },
            std::future::pending::<()>(),
        )
        .await
        .unwrap_err();
    assert!(matches!(error, ClientError::Disconnected { .. }), "{error}");
    assert!(!handled.load(Ordering::Relaxed));
    peer.await.unwrap();
}

/// With reconnecting on, a lost connection does not end the loop, but a broker that
/// stays unreachable past `reconnect_timeout_ms` does: the caller hears of it.
#[tokio::test]
async fn run_returns_when_the_broker_stays_unreachable_past_the_reconnect_limit() {
    let (listener, address) = listen().await;
    let peer = tokio::spawn(async move {
        let mut connection = ScriptedConnection::accept_and_handshake(&listener).await;
        connection.read_request().await.unwrap();
        // Dropped with the receive unanswered, and nothing listens any more.
    });
    let config = ClientConfig::builder()
        .reconnect_backoff_ms_min(1)
        .reconnect_backoff_ms_max(10)
        .reconnect_timeout_ms(200)
        .build()
        .expect("a valid config");
    let client = Client::connect_with(address, config).await.unwrap();
    let consumer = QueueConsumer::builder(client, "t", "g")
        .visibility_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let error = tokio::time::timeout(
        Duration::from_secs(30),
        consumer.run(
            |_message| async { Ok::<(), String>(()) },
            std::future::pending::<()>(),
        ),
    )
    .await
    .expect("run ends once the broker stays away")
    .unwrap_err();
    assert!(matches!(error, ClientError::Connect { .. }), "{error}");
    peer.await.unwrap();
}

#[tokio::test]
async fn commit_offsets_reports_the_partition_the_broker_refused() {
    let (listener, address) = listen().await;
    let peer = tokio::spawn(async move {
        let mut connection = ScriptedConnection::accept_and_handshake(&listener).await;
        let (header, request) = connection.read_request().await.unwrap();
        let Request::CommitOffsets(commit) = request else {
            panic!("expected a commit, got {request:?}")
        };
        assert_eq!((commit.group.as_str(), commit.topic.as_str()), ("g", "t"));
        assert_eq!(commit.partitions.len(), 2);
        assert_eq!(
            (commit.partitions[1].partition, commit.partitions[1].offset),
            (1, 9)
        );
        let response = ResponseBody::CommitOffsets(CommitOffsetsResponse {
            partitions: vec![
                CommitPartitionResult {
                    partition: 0,
                    result: Ok(()),
                },
                CommitPartitionResult {
                    partition: 1,
                    result: Err(WireError::new(
                        ErrorCode::OffsetOutOfRange,
                        "offset 9 is past the high watermark 4",
                    )),
                },
            ],
        });
        connection.respond(&header, Ok(&response)).await;
        connection
    });
    let client = Client::connect(address).await.unwrap();
    let error = client
        .commit_offsets("g", "t", &[(0, 3), (1, 9)])
        .await
        .unwrap_err();
    assert!(
        matches!(error, ClientError::CommitRefused { partition: 1, .. }),
        "{error}"
    );
    assert_eq!(error.wire_code(), Some(ErrorCode::OffsetOutOfRange));
    // The message names what failed; the broker's words are its source, not repeated.
    let text = error.to_string();
    assert!(
        text.contains("partition 1") && !text.contains("high watermark 4"),
        "{text}"
    );
    let source = std::error::Error::source(&error).expect("the broker's refusal");
    assert!(source.to_string().contains("high watermark 4"), "{source}");
    assert!(
        error
            .report()
            .to_string()
            .ends_with("offset 9 is past the high watermark 4"),
        "{}",
        error.report()
    );
    drop(peer.await.unwrap());
}

fn committed_body(entries: &[(u32, u64, u64, u64)]) -> ResponseBody {
    ResponseBody::FetchCommitted(FetchCommittedResponse {
        partitions: entries
            .iter()
            .map(
                |&(partition, committed, log_start_offset, high_watermark)| {
                    FetchCommittedPartitionResult {
                        partition,
                        result: Ok(CommittedOffset {
                            committed,
                            log_start_offset,
                            high_watermark,
                        }),
                    }
                },
            )
            .collect(),
    })
}

fn topic_body(topic: &str, partitions: u32) -> ResponseBody {
    ResponseBody::Metadata(MetadataResponse {
        shard_ports: vec![],
        topics: vec![TopicMetadata {
            name: topic.to_owned(),
            error: None,
            partitions: (0..partitions)
                .map(|partition| PartitionMetadata {
                    partition,
                    shard: 0,
                })
                .collect(),
            retention: Default::default(),
            queue: QueueSettings::default(),
        }],
    })
}

#[tokio::test]
async fn consumer_in_a_group_resumes_at_committed_offsets_and_commits_what_moved() {
    let (listener, address) = listen().await;
    let peer = tokio::spawn(async move {
        let mut connection = ScriptedConnection::accept_and_handshake(&listener).await;
        let (header, request) = connection.read_request().await.unwrap();
        assert!(matches!(request, Request::Metadata(_)));
        connection.respond(&header, Ok(&topic_body("t", 3))).await;
        let (header, request) = connection.read_request().await.unwrap();
        let Request::FetchCommitted(fetch) = request else {
            panic!("expected the committed offsets, got {request:?}")
        };
        assert_eq!(fetch.group, "g");
        assert!(
            fetch.partitions.is_empty(),
            "one request for every partition"
        );
        // p0 committed 5; p1 never; p2 committed 1, but retention moved its start to 3.
        let body = committed_body(&[(0, 5, 0, 10), (1, COMMITTED_NONE, 2, 10), (2, 1, 3, 10)]);
        connection.respond(&header, Ok(&body)).await;
        // One request for every partition's range; p1 starts at the configured
        // position, the beginning, which is its log start.
        let (header, request) = connection.read_request().await.unwrap();
        let Request::ListOffsets(list) = request else {
            panic!("expected list offsets, got {request:?}")
        };
        let asked: Vec<(u32, i64)> = list.topics[0]
            .partitions
            .iter()
            .map(|partition| (partition.partition, partition.timestamp_ms))
            .collect();
        let latest = crate::protocol::TIMESTAMP_LATEST;
        assert_eq!(asked, vec![(0, latest), (1, latest), (2, latest)]);
        let body = ResponseBody::ListOffsets(ListOffsetsResponse {
            topics: vec![ListOffsetsTopicResult {
                name: "t".into(),
                partitions: [(0, 0), (1, 2), (2, 3)]
                    .into_iter()
                    .map(|(partition, log_start_offset)| ListOffsetsPartitionResult {
                        partition,
                        result: Ok(PartitionOffsets {
                            offset: 10,
                            log_start_offset,
                            high_watermark: 10,
                        }),
                    })
                    .collect(),
            }],
        });
        connection.respond(&header, Ok(&body)).await;
        // Only what differs from the group's record is committed.
        let (header, request) = connection.read_request().await.unwrap();
        let Request::CommitOffsets(commit) = request else {
            panic!("expected a commit, got {request:?}")
        };
        let offsets: Vec<(u32, u64)> = commit
            .partitions
            .iter()
            .map(|p| (p.partition, p.offset))
            .collect();
        assert_eq!(offsets, vec![(1, 2), (2, 3)]);
        let ok = |partitions: &[u32]| {
            ResponseBody::CommitOffsets(CommitOffsetsResponse {
                partitions: partitions
                    .iter()
                    .map(|&partition| CommitPartitionResult {
                        partition,
                        result: Ok(()),
                    })
                    .collect(),
            })
        };
        connection.respond(&header, Ok(&ok(&[1, 2]))).await;
        // After assign(0, 7): auto-commit before the poll's fetch, then the fetch.
        let (header, request) = connection.read_request().await.unwrap();
        let Request::CommitOffsets(commit) = request else {
            panic!("expected the auto-commit, got {request:?}")
        };
        assert_eq!(commit.partitions.len(), 1);
        assert_eq!(
            (commit.partitions[0].partition, commit.partitions[0].offset),
            (0, 7)
        );
        connection.respond(&header, Ok(&ok(&[0]))).await;
        let (header, request) = connection.read_request().await.unwrap();
        let Request::Fetch(fetch) = request else {
            panic!("expected the fetch, got {request:?}")
        };
        let body = ResponseBody::Fetch(FetchResponse {
            topics: vec![FetchTopicResult {
                name: "t".into(),
                partitions: fetch.topics[0]
                    .partitions
                    .iter()
                    .map(|partition| FetchPartitionResult {
                        partition: partition.partition,
                        data: FetchPartitionData {
                            log_start_offset: 0,
                            high_watermark: 10,
                            batches: Ok(Bytes::new()),
                        },
                    })
                    .collect(),
            }],
        });
        connection.respond(&header, Ok(&body)).await;
        // Nothing moved since: the next commit sends nothing.
        assert!(connection.read_request().await.is_none());
    });
    let client = Client::connect(address).await.unwrap();
    let config = ConsumerConfig::default().with_group("g", Some(Duration::ZERO));
    let mut consumer = Consumer::new(client, config).unwrap();
    assert_eq!(consumer.group(), Some("g"));
    consumer
        .assign_topic("t", StartPosition::Beginning)
        .await
        .unwrap();
    assert_eq!(consumer.position("t", 0), Some(5));
    assert_eq!(consumer.position("t", 1), Some(2));
    assert_eq!(consumer.position("t", 2), Some(3), "moved past retention");
    assert_eq!(consumer.committed("t", 0), Some(5));
    assert_eq!(consumer.committed("t", 1), None);
    assert_eq!(consumer.lag("t", 0), Some(5), "learnt at assignment");
    assert_eq!(consumer.total_lag(), Some(5 + 8 + 7));
    consumer.commit().await.unwrap();
    assert_eq!(consumer.committed("t", 1), Some(2));
    consumer.assign("t", 0, 7);
    assert!(consumer.poll_with_wait(0).await.unwrap().is_empty());
    assert_eq!(consumer.committed("t", 0), Some(7));
    consumer.commit().await.unwrap();
    drop(consumer);
    peer.await.unwrap();
}

#[tokio::test]
async fn commit_without_a_group_is_refused_before_the_wire() {
    let (listener, address) = listen().await;
    let peer = tokio::spawn(async move {
        let mut connection = ScriptedConnection::accept_and_handshake(&listener).await;
        assert!(connection.read_request().await.is_none());
    });
    let client = Client::connect(address).await.unwrap();
    let mut consumer = Consumer::new(client, ConsumerConfig::default()).unwrap();
    consumer.assign("t", 0, 4);
    let error = consumer.commit().await.unwrap_err();
    assert!(matches!(error, ClientError::NotInGroup), "{error}");
    drop(consumer);
    peer.await.unwrap();
}

#[tokio::test]
async fn topic_settings_describe_and_purge_carry_their_arguments() {
    let (listener, address) = listen().await;
    let queue = QueueSettings {
        deliveries_max: Some(3),
        visibility_timeout_ms: Some(10_000),
        ordering: Some(QueueOrdering::PerKey),
        dlq_topic: Some("dead".into()),
        ..QueueSettings::default()
    };
    let sent = queue.clone();
    let peer = tokio::spawn(async move {
        let mut connection = ScriptedConnection::accept_and_handshake(&listener).await;
        let (header, request) = connection.read_request().await.unwrap();
        let Request::CreateTopic(create) = request else {
            panic!("{request:?}")
        };
        assert_eq!((create.name.as_str(), create.partitions), ("q", 4));
        assert_eq!(create.queue, sent);
        connection
            .respond(&header, Ok(&ResponseBody::CreateTopic))
            .await;
        let (header, request) = connection.read_request().await.unwrap();
        let Request::AlterTopic(alter) = request else {
            panic!("{request:?}")
        };
        assert_eq!(alter.retention, None, "retention left as it is");
        assert_eq!(alter.queue.deliveries_max, Some(7));
        connection
            .respond(&header, Ok(&ResponseBody::AlterTopic))
            .await;
        let (header, request) = connection.read_request().await.unwrap();
        let Request::AlterTopic(alter) = request else {
            panic!("{request:?}")
        };
        assert_eq!(
            alter.retention,
            Some(Retention {
                bytes_max: 1,
                ms_max: 2
            })
        );
        assert_eq!(alter.queue, QueueSettings::default(), "queue left as it is");
        connection
            .respond(&header, Ok(&ResponseBody::AlterTopic))
            .await;
        let (header, request) = connection.read_request().await.unwrap();
        let Request::DescribeGroups(describe) = request else {
            panic!("{request:?}")
        };
        assert_eq!(
            (describe.topic.as_str(), describe.group.as_str()),
            ("q", "")
        );
        let body = ResponseBody::DescribeGroups(crate::protocol::queue::DescribeGroupsResponse {
            groups: vec![GroupDescription {
                name: "billing".into(),
                kind: GroupKind::Queue,
                partitions: vec![GroupPartition {
                    partition: 0,
                    position: 4,
                    high_watermark: 10,
                    in_flight: 2,
                    ..GroupPartition::default()
                }],
            }],
        });
        connection.respond(&header, Ok(&body)).await;
        let (header, request) = connection.read_request().await.unwrap();
        let Request::DescribeGroups(describe) = request else {
            panic!("{request:?}")
        };
        assert_eq!(describe.group, "billing");
        let body = ResponseBody::DescribeGroups(crate::protocol::queue::DescribeGroupsResponse {
            groups: vec![],
        });
        connection.respond(&header, Ok(&body)).await;
        let (header, request) = connection.read_request().await.unwrap();
        let Request::PurgeTopic(purge) = request else {
            panic!("{request:?}")
        };
        assert_eq!(purge.topic, "q.dlq");
        let body = ResponseBody::PurgeTopic(crate::protocol::queue::PurgeTopicResponse {
            partitions: vec![crate::protocol::queue::PurgedPartition {
                partition: 0,
                records: 6,
                log_start_offset: 6,
            }],
        });
        connection.respond(&header, Ok(&body)).await;
        let (header, request) = connection.read_request().await.unwrap();
        let Request::AlterGroup(alter) = request else {
            panic!("{request:?}")
        };
        assert_eq!((alter.topic.as_str(), alter.group.as_str()), ("q", "fast"));
        assert_eq!(alter.settings.retry_delay_ms_max, Some(20));
        assert_eq!(alter.settings.retry_delay_ms_min, None);
        connection
            .respond(&header, Ok(&ResponseBody::AlterGroup))
            .await;
        connection
    });
    let client = Client::connect(address).await.unwrap();
    client
        .create_topic_with_queue("q", 4, Retention::default(), queue)
        .await
        .unwrap();
    let alter = QueueSettings {
        deliveries_max: Some(7),
        ..QueueSettings::default()
    };
    client.alter_topic_with("q", None, alter).await.unwrap();
    client
        .alter_topic(
            "q",
            Retention {
                bytes_max: 1,
                ms_max: 2,
            },
        )
        .await
        .unwrap();
    let groups = client.describe_groups("q", None).await.unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].partitions[0].lag(), 6);
    assert!(client
        .describe_groups("q", Some("billing"))
        .await
        .unwrap()
        .is_empty());
    let purged = client.purge_topic("q.dlq").await.unwrap();
    assert_eq!(purged[0].records, 6);
    let fast = QueueSettings {
        retry_delay_ms_max: Some(20),
        ..QueueSettings::default()
    };
    client.alter_group("q", "fast", fast).await.unwrap();
    drop(peer.await.unwrap());
}
