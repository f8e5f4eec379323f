//! Queue groups over a real socket: receive, ack, nack, extend, leases, retries,
//! dead-lettering, delays and TTLs, limits, and what a crash keeps (docs/queues.md).
//! Raw frames (`Request::encode` / `decode_response`), no client library.
//!
//! Waits are long-polls (a receive's `wait_ms`) or `eventually` (a condition polled
//! until a deadline), never a sleep standing in for an event.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::{batch_of, test_config, RawClient, TestBroker};
use shardq::config::ServerConfig;
use shardq::protocol::batch::{BatchBuilder, Record};
use shardq::protocol::queue::{
    handle_ranges, headers, AlterGroupRequest, CommitOffsetsRequest, CommitPartition,
    DescribeGroupsRequest, GroupDescription, GroupKind, Handle, NackDelay, QueueSettings,
    ReceiveRequest, ReceivedMessage, RefusedHandle, SettleAction, SettleRequest,
};
use shardq::protocol::{
    AlterTopicRequest, CreateTopicRequest, ErrorCode, MetadataRequest, Request, ResponseBody,
    WireError,
};

const GROUP: &str = "billing";

fn create_topic(client: &mut RawClient, name: &str, partitions: u32, queue: QueueSettings) {
    client
        .call(&Request::CreateTopic(CreateTopicRequest {
            name: name.into(),
            partitions,
            retention: Default::default(),
            queue,
        }))
        .expect("topic created");
}

/// Short delays so retries come within a test's patience.
fn quick(deliveries_max: u32) -> QueueSettings {
    QueueSettings {
        deliveries_max: Some(deliveries_max),
        retry_delay_ms_min: Some(20),
        retry_delay_ms_max: Some(40),
        ..QueueSettings::default()
    }
}

fn receive_with(
    client: &mut RawClient,
    topic: &str,
    group: &str,
    messages_max: u32,
    visibility_timeout_ms: u32,
    wait_ms: u32,
) -> Result<Vec<ReceivedMessage>, WireError> {
    let response = client.call(&Request::Receive(ReceiveRequest {
        topic: topic.into(),
        group: group.into(),
        messages_max,
        visibility_timeout_ms,
        wait_ms,
    }))?;
    let ResponseBody::Receive(response) = response else {
        panic!("receive answered with {response:?}")
    };
    Ok(response.messages)
}

fn receive(
    client: &mut RawClient,
    topic: &str,
    messages_max: u32,
    wait_ms: u32,
) -> Vec<ReceivedMessage> {
    receive_with(client, topic, GROUP, messages_max, 0, wait_ms).expect("receive")
}

fn settle_with(
    client: &mut RawClient,
    topic: &str,
    group: &str,
    action: SettleAction,
    handles: &[Handle],
) -> Result<Vec<RefusedHandle>, WireError> {
    let response = client.call(&Request::Settle(SettleRequest {
        topic: topic.into(),
        group: group.into(),
        action,
        ranges: handle_ranges(handles.iter().copied()),
    }))?;
    let ResponseBody::Settle(response) = response else {
        panic!("settle answered with {response:?}")
    };
    Ok(response.refused)
}

fn settle(
    client: &mut RawClient,
    topic: &str,
    action: SettleAction,
    handles: &[Handle],
) -> Vec<RefusedHandle> {
    settle_with(client, topic, GROUP, action, handles).expect("settle")
}

fn nack_ms(delay_ms: u64, reason: &str) -> SettleAction {
    SettleAction::Nack {
        delay: NackDelay::Ms(delay_ms),
        reason: reason.into(),
    }
}

fn describe(client: &mut RawClient, topic: &str, group: &str) -> Vec<GroupDescription> {
    let response = client
        .call(&Request::DescribeGroups(DescribeGroupsRequest {
            topic: topic.into(),
            group: group.into(),
        }))
        .expect("describe");
    let ResponseBody::DescribeGroups(response) = response else {
        panic!("describe answered with {response:?}")
    };
    response.groups
}

fn handles(messages: &[ReceivedMessage]) -> Vec<Handle> {
    messages.iter().map(|message| message.handle).collect()
}

fn values(messages: &[ReceivedMessage]) -> Vec<String> {
    messages
        .iter()
        .map(|message| String::from_utf8_lossy(&message.value).into_owned())
        .collect()
}

/// Polls `condition` until it holds or 10 s pass.
fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "not within 10 s: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A batch of one record with headers, stamped now.
fn record_with(value: &[u8], key: Option<&[u8]>, record_headers: &[(&str, &[u8])]) -> Bytes {
    let mut builder = BatchBuilder::new(BytesMut::new());
    builder.push(now_ms() as i64, key, value, record_headers);
    builder.finish()
}

fn header<'a>(record: &'a Record, name: &str) -> &'a [u8] {
    record
        .headers
        .iter()
        .find(|(header, _)| header == name)
        .map(|(_, value)| value.as_ref())
        .unwrap_or_else(|| panic!("no header {name} in {record:?}"))
}

fn broker(dir: &Path, shards: usize, change: impl FnOnce(&mut ServerConfig)) -> TestBroker {
    let mut config = test_config(dir, shards);
    change(&mut config);
    TestBroker::start_with(config)
}

#[test]
fn receive_then_ack_removes_the_messages() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path(), 1, |_| {});
    let mut client = RawClient::connect(broker.addr());
    create_topic(&mut client, "orders", 1, QueueSettings::default());
    client
        .produce("orders", 0, batch_of(&[b"a", b"b", b"c"]))
        .unwrap();
    let received = receive(&mut client, "orders", 10, 5_000);
    assert_eq!(values(&received), vec!["a", "b", "c"]);
    assert!(received.iter().all(|message| message.handle.attempt == 1));
    assert_eq!(
        received
            .iter()
            .map(|message| message.handle.offset)
            .collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert!(settle(
        &mut client,
        "orders",
        SettleAction::Ack,
        &handles(&received)
    )
    .is_empty());
    assert!(receive(&mut client, "orders", 10, 0).is_empty());
    let groups = describe(&mut client, "orders", "");
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].name, GROUP);
    assert_eq!(groups[0].kind, GroupKind::Queue);
    let partition = groups[0].partitions[0];
    assert_eq!(
        (partition.position, partition.acked, partition.in_flight),
        (3, 3, 0)
    );
    assert_eq!(partition.high_watermark, 3);
    // A retried ack is answered AlreadySettled, which a client may take as success.
    let again = settle(
        &mut client,
        "orders",
        SettleAction::Ack,
        &handles(&received)[..1],
    );
    assert_eq!(again[0].error.code, ErrorCode::AlreadySettled);
}

#[test]
fn a_receive_long_polls_until_a_message_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path(), 2, |_| {});
    let mut client = RawClient::connect(broker.addr());
    create_topic(&mut client, "orders", 4, QueueSettings::default());
    // Creates the group before the message exists: the long-poll must be woken by it.
    assert!(receive(&mut client, "orders", 10, 0).is_empty());
    let address = broker.addr();
    let producer = std::thread::spawn(move || {
        let mut client = RawClient::connect(address);
        std::thread::sleep(Duration::from_millis(100));
        client.produce("orders", 3, batch_of(&[b"late"])).unwrap();
    });
    let received = receive(&mut client, "orders", 10, 20_000);
    producer.join().unwrap();
    assert_eq!(values(&received), vec!["late"]);
    assert_eq!(received[0].handle.partition, 3);
}

#[test]
fn nack_redelivers_after_its_delay_with_the_next_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path(), 1, |_| {});
    let mut client = RawClient::connect(broker.addr());
    create_topic(&mut client, "orders", 1, quick(5));
    client.produce("orders", 0, batch_of(&[b"a"])).unwrap();
    let first = receive(&mut client, "orders", 10, 5_000);
    assert_eq!(first[0].handle.attempt, 1);
    let nacked_at = Instant::now();
    assert!(settle(
        &mut client,
        "orders",
        nack_ms(300, "db timeout"),
        &handles(&first)
    )
    .is_empty());
    assert!(
        receive(&mut client, "orders", 10, 0).is_empty(),
        "not delivered again before its delay"
    );
    let second = receive(&mut client, "orders", 10, 10_000);
    assert!(nacked_at.elapsed() >= Duration::from_millis(300));
    assert_eq!(values(&second), vec!["a"]);
    assert_eq!(second[0].handle.attempt, 2);
    // The first delivery's handle is stale now.
    let refused = settle(&mut client, "orders", SettleAction::Ack, &handles(&first));
    assert_eq!(refused[0].error.code, ErrorCode::HandleStale);
    assert!(
        refused[0].error.message.contains("now attempt 2"),
        "{}",
        refused[0].error
    );
    assert!(settle(&mut client, "orders", SettleAction::Ack, &handles(&second)).is_empty());
}

#[test]
fn lease_expiry_redelivers_and_extend_prevents_it() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path(), 1, |_| {});
    let mut client = RawClient::connect(broker.addr());
    create_topic(&mut client, "orders", 1, quick(5));
    client
        .produce("orders", 0, batch_of(&[b"kept", b"dropped"]))
        .unwrap();
    let first = receive_with(&mut client, "orders", GROUP, 10, 300, 5_000).unwrap();
    assert_eq!(values(&first), vec!["kept", "dropped"]);
    let extend = SettleAction::Extend {
        visibility_timeout_ms: 60_000,
    };
    assert!(settle(&mut client, "orders", extend, &handles(&first)[..1]).is_empty());
    let again = receive(&mut client, "orders", 10, 10_000);
    assert_eq!(
        values(&again),
        vec!["dropped"],
        "only the lease that ran out"
    );
    assert_eq!(again[0].handle.attempt, 2);
    // The extended lease still holds: its ack is accepted.
    assert!(settle(
        &mut client,
        "orders",
        SettleAction::Ack,
        &handles(&first)[..1]
    )
    .is_empty());
    let refused = settle(
        &mut client,
        "orders",
        SettleAction::Ack,
        &handles(&first)[1..],
    );
    assert_eq!(refused[0].error.code, ErrorCode::HandleStale);
}

#[test]
fn dead_lettered_after_exactly_deliveries_max_on_the_same_shard() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path(), 2, |_| {});
    let mut client = RawClient::connect(broker.addr());
    create_topic(&mut client, "orders", 2, quick(3));
    client
        .produce(
            "orders",
            1,
            record_with(b"poison", Some(b"k1"), &[("trace", b"t-1")]),
        )
        .unwrap();
    let mut attempts = Vec::new();
    for delivery in 1..=3 {
        let received = receive(&mut client, "orders", 10, 10_000);
        assert_eq!(values(&received), vec!["poison"], "delivery {delivery}");
        attempts.push(received[0].handle.attempt);
        assert!(settle(
            &mut client,
            "orders",
            nack_ms(0, &format!("failure {delivery}")),
            &handles(&received)
        )
        .is_empty());
    }
    assert_eq!(attempts, vec![1, 2, 3]);
    assert!(
        receive(&mut client, "orders", 10, 300).is_empty(),
        "never delivered a fourth time"
    );
    eventually("the DLQ copy is durable", || {
        describe(&mut client, "orders", GROUP)[0].partitions[1].dead_lettered == 1
    });
    let copies = client.fetch_all("orders.dlq", 1, 0);
    assert_eq!(copies.len(), 1);
    let copy = &copies[0];
    assert_eq!(copy.value.as_ref(), b"poison");
    assert_eq!(copy.key.as_deref(), Some(&b"k1"[..]));
    assert_eq!(header(copy, "trace"), b"t-1");
    assert_eq!(header(copy, headers::SOURCE_TOPIC), b"orders");
    assert_eq!(header(copy, headers::SOURCE_PARTITION), 1u32.to_le_bytes());
    assert_eq!(header(copy, headers::SOURCE_OFFSET), 0u64.to_le_bytes());
    assert_eq!(header(copy, headers::ATTEMPTS), 3u32.to_le_bytes());
    assert_eq!(header(copy, headers::DEAD_LETTER_CAUSE), b"nacked");
    assert_eq!(header(copy, headers::REASON), b"failure 3");
    assert_eq!(header(copy, headers::DEAD_LETTERED_AT_MS).len(), 8);
    assert!(client.fetch_all("orders.dlq", 0, 0).is_empty());
    // Placed like its source: partition p of both on one shard, as Metadata says.
    let response = client
        .call(&Request::Metadata(MetadataRequest {
            topics: vec!["orders".into(), "orders.dlq".into()],
        }))
        .unwrap();
    let ResponseBody::Metadata(metadata) = response else {
        panic!("{response:?}")
    };
    let shards = |index: usize| -> Vec<u16> {
        metadata.topics[index]
            .partitions
            .iter()
            .map(|partition| partition.shard)
            .collect()
    };
    assert_eq!(shards(0), shards(1));
    assert_eq!(metadata.topics[1].queue.dlq_topic, None, "a DLQ has no DLQ");
    assert_eq!(
        metadata.topics[0].queue.dlq_topic.as_deref(),
        Some("orders.dlq")
    );
    assert_eq!(metadata.topics[0].queue.deliveries_max, Some(3));
}

#[test]
fn delayed_messages_wait_and_expired_ones_are_not_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path(), 1, |_| {});
    let mut client = RawClient::connect(broker.addr());
    create_topic(&mut client, "orders", 1, QueueSettings::default());
    let after = (now_ms() + 400).to_le_bytes();
    let ttl = 1u64.to_le_bytes();
    client
        .produce(
            "orders",
            0,
            record_with(b"delayed", None, &[(headers::DELIVER_AFTER, &after)]),
        )
        .unwrap();
    client
        .produce(
            "orders",
            0,
            record_with(b"expired", None, &[(headers::TTL_MS, &ttl)]),
        )
        .unwrap();
    client.produce("orders", 0, batch_of(&[b"plain"])).unwrap();
    std::thread::sleep(Duration::from_millis(5)); // lets the 1 ms TTL pass for certain
    let first = receive(&mut client, "orders", 10, 5_000);
    assert_eq!(values(&first), vec!["plain"]);
    let delayed = receive(&mut client, "orders", 10, 10_000);
    assert_eq!(values(&delayed), vec!["delayed"]);
    assert!(now_ms() >= u64::from_le_bytes(after));
    let partition = describe(&mut client, "orders", GROUP)[0].partitions[0];
    assert_eq!(partition.expired_dropped, 1);
    assert!(receive(&mut client, "orders", 10, 0).is_empty());
}

#[test]
fn two_groups_each_get_every_message() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path(), 2, |_| {});
    let mut client = RawClient::connect(broker.addr());
    create_topic(&mut client, "orders", 3, QueueSettings::default());
    for partition in 0..3 {
        client
            .produce(
                "orders",
                partition,
                batch_of(&[format!("m{partition}").as_bytes()]),
            )
            .unwrap();
    }
    for group in ["billing", "shipping"] {
        let mut seen = BTreeSet::new();
        while seen.len() < 3 {
            let received = receive_with(&mut client, "orders", group, 10, 0, 5_000).unwrap();
            assert!(!received.is_empty());
            for message in &received {
                assert!(seen.insert(values(std::slice::from_ref(message))[0].clone()));
            }
            assert!(settle_with(
                &mut client,
                "orders",
                group,
                SettleAction::Ack,
                &handles(&received)
            )
            .unwrap()
            .is_empty());
        }
        assert_eq!(seen.len(), 3, "{group}");
    }
    // A stream group on the same topic is described with them.
    client
        .call(&Request::CommitOffsets(CommitOffsetsRequest {
            group: "audit".into(),
            topic: "orders".into(),
            partitions: vec![CommitPartition {
                partition: 2,
                offset: 1,
            }],
        }))
        .unwrap();
    let groups = describe(&mut client, "orders", "");
    let names: Vec<(String, GroupKind)> = groups
        .iter()
        .map(|group| (group.name.clone(), group.kind))
        .collect();
    assert_eq!(
        names,
        vec![
            ("audit".into(), GroupKind::Stream),
            ("billing".into(), GroupKind::Queue),
            ("shipping".into(), GroupKind::Queue)
        ]
    );
    assert_eq!(groups[0].partitions.len(), 1);
    assert_eq!(groups[0].partitions[0].position, 1);
    for group in &groups[1..] {
        let partitions: Vec<u32> = group.partitions.iter().map(|p| p.partition).collect();
        assert_eq!(partitions, vec![0, 1, 2], "{}", group.name);
        assert!(group
            .partitions
            .iter()
            .all(|p| p.acked == 1 && p.position == 1));
    }
}

#[test]
fn two_connections_never_hold_the_same_message() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path(), 2, |_| {});
    let mut setup = RawClient::connect(broker.addr());
    create_topic(&mut setup, "orders", 4, QueueSettings::default());
    let values_all: Vec<String> = (0..200).map(|index| format!("m{index}")).collect();
    for (index, value) in values_all.iter().enumerate() {
        setup
            .produce("orders", index as u32 % 4, batch_of(&[value.as_bytes()]))
            .unwrap();
    }
    let address = broker.addr();
    let workers: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                let mut client = RawClient::connect(address);
                let mut held = Vec::new();
                loop {
                    let received = receive(&mut client, "orders", 7, 200);
                    if received.is_empty() {
                        break;
                    }
                    held.extend(received);
                }
                held
            })
        })
        .collect();
    let held: Vec<Vec<ReceivedMessage>> = workers
        .into_iter()
        .map(|worker| worker.join().unwrap())
        .collect();
    // Leases (30 s) never ran out: every message was handed to exactly one of them.
    let mut all: Vec<String> = held.iter().flat_map(|messages| values(messages)).collect();
    all.sort();
    let mut expected = values_all.clone();
    expected.sort();
    assert_eq!(all, expected);
    assert!(held
        .iter()
        .flatten()
        .all(|message| message.handle.attempt == 1));
}

#[test]
fn handle_errors_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path(), 1, |_| {});
    let mut client = RawClient::connect(broker.addr());
    create_topic(
        &mut client,
        "orders",
        1,
        QueueSettings {
            retry_delay_ms_min: Some(60_000),
            ..QueueSettings::default()
        },
    );
    client
        .produce("orders", 0, batch_of(&[b"a", b"b"]))
        .unwrap();
    let received = receive_with(&mut client, "orders", GROUP, 1, 100, 5_000).unwrap();
    let handle = received[0].handle;
    // Its lease runs out; the retry is a minute away: LeaseExpired meanwhile.
    eventually("the lease ran out", || {
        describe(&mut client, "orders", GROUP)[0].partitions[0].waiting == 1
    });
    let refused = settle(&mut client, "orders", SettleAction::Ack, &[handle]);
    assert_eq!(refused[0].error.code, ErrorCode::LeaseExpired);
    let never = Handle {
        partition: 0,
        offset: 1,
        attempt: 1,
    };
    let refused = settle(&mut client, "orders", SettleAction::Ack, &[never]);
    assert_eq!(refused[0].error.code, ErrorCode::NotDelivered);
    let refused =
        settle_with(&mut client, "orders", "nobody", SettleAction::Ack, &[never]).unwrap();
    assert_eq!(refused[0].error.code, ErrorCode::NotDelivered);
    let elsewhere = Handle {
        partition: 7,
        offset: 0,
        attempt: 1,
    };
    let refused = settle(&mut client, "orders", SettleAction::Ack, &[elsewhere]);
    assert_eq!(refused[0].error.code, ErrorCode::UnknownPartition);
    let refused = settle(&mut client, "nothing", SettleAction::Ack, &[never]);
    assert_eq!(refused[0].error.code, ErrorCode::UnknownTopic);
    let error = receive_with(&mut client, "nothing", GROUP, 1, 0, 0).unwrap_err();
    assert_eq!(error.code, ErrorCode::UnknownTopic);
}

#[test]
fn limits_are_refused_past_their_edge() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path(), 1, |config| {
        config.queue_handles_per_request_max = 4;
        config.queue_receive_messages_max = 3;
        config.queue_groups_per_shard_max = 2;
    });
    let mut client = RawClient::connect(broker.addr());
    create_topic(&mut client, "orders", 1, QueueSettings::default());
    client
        .produce("orders", 0, batch_of(&[b"1", b"2", b"3", b"4", b"5"]))
        .unwrap();
    // Receive: at most queue_receive_messages_max.
    let first = receive(&mut client, "orders", 100, 5_000);
    assert_eq!(first.len(), 3);
    let second = receive(&mut client, "orders", 100, 5_000);
    assert_eq!(second.len(), 2);
    // Handles: 4 pass, 5 are refused whole.
    let all: Vec<Handle> = handles(&first)
        .into_iter()
        .chain(handles(&second))
        .collect();
    let error = settle_with(&mut client, "orders", GROUP, SettleAction::Ack, &all).unwrap_err();
    assert_eq!(error.code, ErrorCode::LimitExceeded);
    assert!(
        error.message.contains("queue_handles_per_request_max"),
        "{error}"
    );
    assert!(settle(&mut client, "orders", SettleAction::Ack, &all[..4]).is_empty());
    assert!(settle(&mut client, "orders", SettleAction::Ack, &all[4..]).is_empty());
    // Groups: the second fits, the third does not.
    receive_with(&mut client, "orders", "second", 1, 0, 0).unwrap();
    let error = receive_with(&mut client, "orders", "third", 1, 0, 0).unwrap_err();
    assert_eq!(error.code, ErrorCode::LimitExceeded);
    assert!(
        error.message.contains("queue_groups_per_shard_max"),
        "{error}"
    );
}

#[test]
fn topic_queue_settings_are_validated_kept_and_altered() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = broker(dir.path(), 1, |_| {});
    let mut client = RawClient::connect(broker.addr());
    let error = client
        .call(&Request::CreateTopic(CreateTopicRequest {
            name: "orders".into(),
            partitions: 1,
            retention: Default::default(),
            queue: QueueSettings {
                deliveries_max: Some(0),
                ..QueueSettings::default()
            },
        }))
        .unwrap_err();
    assert_eq!(error.code, ErrorCode::InvalidRequest);
    assert!(error.message.contains("deliveries_max = 0"), "{error}");
    create_topic(&mut client, "orders", 1, quick(4));
    client
        .call(&Request::AlterTopic(AlterTopicRequest {
            name: "orders".into(),
            retention: None,
            queue: QueueSettings {
                visibility_timeout_ms: Some(1234),
                ..QueueSettings::default()
            },
        }))
        .unwrap();
    broker.stop();
    let broker = TestBroker::start_with(broker.config.clone());
    let mut client = RawClient::connect(broker.addr());
    let response = client
        .call(&Request::Metadata(MetadataRequest {
            topics: vec!["orders".into()],
        }))
        .unwrap();
    let ResponseBody::Metadata(metadata) = response else {
        panic!("{response:?}")
    };
    let queue = &metadata.topics[0].queue;
    assert_eq!(queue.deliveries_max, Some(4));
    assert_eq!(queue.visibility_timeout_ms, Some(1234));
    assert_eq!(queue.retry_delay_ms_min, Some(20));
    // Broker defaults fill in what the topic did not set.
    assert_eq!(
        queue.message_ttl_ms,
        Some(ServerConfig::default().queue_message_ttl_ms)
    );
}

/// The group's journal segments, in order.
fn journals(data_dir: &Path, topic: &str, partition: u32, group: &str) -> Vec<std::path::PathBuf> {
    let directory = data_dir
        .join("topics")
        .join(topic)
        .join(partition.to_string())
        .join("groups")
        .join(group);
    let mut found: Vec<_> = std::fs::read_dir(&directory)
        .unwrap_or_else(|error| panic!("{}: {error}", directory.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            path.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("journal-")
        })
        .collect();
    found.sort();
    found
}

#[test]
fn restart_with_a_torn_journal_tail_keeps_what_was_answered() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = broker(dir.path(), 1, |_| {});
    let mut client = RawClient::connect(broker.addr());
    create_topic(&mut client, "orders", 1, QueueSettings::default());
    client
        .produce("orders", 0, batch_of(&[b"a", b"b", b"c"]))
        .unwrap();
    let received = receive(&mut client, "orders", 10, 5_000);
    assert!(settle(
        &mut client,
        "orders",
        SettleAction::Ack,
        &handles(&received)[..1]
    )
    .is_empty());
    drop(client);
    broker.stop();
    // A torn record at the tail: a length promising more than is there.
    let journal = journals(dir.path(), "orders", 0, GROUP).pop().unwrap();
    let length_before = std::fs::metadata(&journal).unwrap().len();
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&journal)
            .unwrap();
        file.write_all(&[200, 0, 0, 0, 1, 2, 3]).unwrap();
    }
    let mut broker = TestBroker::start_with(broker.config.clone());
    assert_eq!(
        std::fs::metadata(&journal).unwrap().len(),
        length_before,
        "the torn tail is cut before anything is appended"
    );
    let mut client = RawClient::connect(broker.addr());
    // "a" stays acked; b and c are still leased by the first delivery (30 s leases
    // survive a restart): their handles still work.
    let refused = settle(
        &mut client,
        "orders",
        SettleAction::Ack,
        &handles(&received),
    );
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].handle.offset, 0);
    assert_eq!(refused[0].error.code, ErrorCode::AlreadySettled);
    drop(client);
    broker.stop();
    let broker = TestBroker::start_with(broker.config.clone());
    let mut client = RawClient::connect(broker.addr());
    let partition = describe(&mut client, "orders", GROUP)[0].partitions[0];
    assert_eq!((partition.position, partition.acked), (3, 3));
}

#[test]
fn snapshots_rotate_the_journal_and_recovery_uses_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = broker(dir.path(), 1, |config| {
        config.queue_journal_records_per_snapshot_max = 5;
    });
    let mut client = RawClient::connect(broker.addr());
    create_topic(&mut client, "orders", 1, QueueSettings::default());
    for round in 0..10 {
        client
            .produce("orders", 0, batch_of(&[format!("m{round}").as_bytes()]))
            .unwrap();
        let received = receive(&mut client, "orders", 10, 5_000);
        assert_eq!(received.len(), 1);
        if round % 3 != 2 {
            assert!(settle(
                &mut client,
                "orders",
                SettleAction::Ack,
                &handles(&received)
            )
            .is_empty());
        }
    }
    let group_directory = dir.path().join("topics/orders/0/groups").join(GROUP);
    eventually("a snapshot is written and the old journal dropped", || {
        group_directory.join("snapshot").exists()
            && !journals(dir.path(), "orders", 0, GROUP)
                .iter()
                .any(|path| path.ends_with("journal-00000000000000000001"))
    });
    drop(client);
    broker.stop();
    let broker = TestBroker::start_with(broker.config.clone());
    let mut client = RawClient::connect(broker.addr());
    let partition = describe(&mut client, "orders", GROUP)[0].partitions[0];
    assert_eq!(partition.acked, 7);
    assert_eq!(partition.in_flight, 3, "leases survive the restart");
    assert_eq!(partition.position, 2);
}

#[test]
fn kill_9_keeps_acks_attempts_and_one_dlq_copy() {
    use common::process::Serve;
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Serve::start(dir.path(), "127.0.0.1:0", &["--cores", "1"]);
    let address = serve.wait_serving();
    let mut client = RawClient::connect(address);
    create_topic(&mut client, "orders", 1, quick(2));
    client
        .produce("orders", 0, batch_of(&[b"acked", b"unacked", b"poison"]))
        .unwrap();
    let first = receive_with(&mut client, "orders", GROUP, 10, 500, 5_000).unwrap();
    assert_eq!(values(&first), vec!["acked", "unacked", "poison"]);
    assert!(settle(
        &mut client,
        "orders",
        SettleAction::Ack,
        &handles(&first)[..1]
    )
    .is_empty());
    assert!(settle(
        &mut client,
        "orders",
        nack_ms(0, "bad"),
        &handles(&first)[2..]
    )
    .is_empty());
    let poison = receive(&mut client, "orders", 1, 5_000);
    assert_eq!(values(&poison), vec!["poison"]);
    assert_eq!(poison[0].handle.attempt, 2);
    // The last failure: the DLQ append races the kill.
    assert!(settle(
        &mut client,
        "orders",
        nack_ms(0, "still bad"),
        &handles(&poison)
    )
    .is_empty());
    serve.kill9();
    drop(client);

    let mut serve = Serve::start(dir.path(), "127.0.0.1:0", &["--cores", "1"]);
    let address = serve.wait_serving();
    let mut client = RawClient::connect(address);
    // The unacked one comes back once its lease (500 ms, kept across the crash) runs
    // out, with its attempt count kept; the acked one never does.
    let again = receive(&mut client, "orders", 10, 10_000);
    assert_eq!(values(&again), vec!["unacked"]);
    assert_eq!(again[0].handle.attempt, 2);
    eventually("the dead letter is settled", || {
        describe(&mut client, "orders", GROUP)[0].partitions[0].dead_lettering == 0
    });
    let copies = client.fetch_all("orders.dlq", 0, 0);
    assert_eq!(copies.len(), 1, "exactly one DLQ copy");
    assert_eq!(copies[0].value.as_ref(), b"poison");
    assert!(settle(&mut client, "orders", SettleAction::Ack, &handles(&again)).is_empty());
    assert!(receive(&mut client, "orders", 10, 200).is_empty());
    serve.kill9();
}

#[test]
fn altered_settings_reach_live_groups() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path(), 1, |_| {});
    let mut client = RawClient::connect(broker.addr());
    create_topic(&mut client, "orders", 1, quick(5));
    client.produce("orders", 0, batch_of(&[b"a"])).unwrap();
    let first = receive(&mut client, "orders", 1, 5_000);
    assert!(settle(&mut client, "orders", nack_ms(0, "one"), &handles(&first)).is_empty());
    client
        .call(&Request::AlterTopic(AlterTopicRequest {
            name: "orders".into(),
            retention: None,
            queue: QueueSettings {
                deliveries_max: Some(2),
                ..QueueSettings::default()
            },
        }))
        .unwrap();
    let second = receive(&mut client, "orders", 1, 5_000);
    assert_eq!(second[0].handle.attempt, 2);
    assert!(settle(&mut client, "orders", nack_ms(0, "two"), &handles(&second)).is_empty());
    assert!(
        receive(&mut client, "orders", 1, 200).is_empty(),
        "the second failure now dead-letters"
    );
    eventually("dead-lettered under the new maximum", || {
        describe(&mut client, "orders", GROUP)[0].partitions[0].dead_lettered == 1
    });
}

/// A message that already had `deliveries_max` deliveries under a lowered maximum (an
/// AlterTopic while it waits, available, in the window) goes to the DLQ instead of being
/// handed out: the broker must not stop on it.
#[test]
fn lowering_deliveries_max_below_an_available_messages_attempts_dead_letters_it() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path(), 1, |_| {});
    let mut client = RawClient::connect(broker.addr());
    create_topic(&mut client, "orders", 1, quick(5));
    client.produce("orders", 0, batch_of(&[b"a"])).unwrap();
    for attempt in 1..=2 {
        let received = receive(&mut client, "orders", 1, 5_000);
        assert_eq!(received[0].handle.attempt, attempt);
        assert!(settle(
            &mut client,
            "orders",
            nack_ms(0, "again"),
            &handles(&received)
        )
        .is_empty());
    }
    eventually("the nacked message is available again", || {
        describe(&mut client, "orders", GROUP)[0].partitions[0].waiting == 0
    });
    client
        .call(&Request::AlterTopic(AlterTopicRequest {
            name: "orders".into(),
            retention: None,
            queue: QueueSettings {
                deliveries_max: Some(2),
                ..QueueSettings::default()
            },
        }))
        .unwrap();
    assert!(
        receive(&mut client, "orders", 1, 200).is_empty(),
        "not delivered a third time"
    );
    eventually("dead-lettered under the lowered maximum", || {
        describe(&mut client, "orders", GROUP)[0].partitions[0].dead_lettered == 1
    });
    let copies = client.fetch_all("orders.dlq", 0, 0);
    assert_eq!(copies.len(), 1);
    assert_eq!(header(&copies[0], headers::ATTEMPTS), 2u32.to_le_bytes());
}

/// The operator lowers `queue_visibility_timeout_ms_max` below what a topic stored: the
/// broker starts, the topic keeps working, and its effective value is the new limit.
#[test]
fn a_topic_setting_past_a_lowered_broker_limit_is_cut_to_it_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = broker(dir.path(), 1, |_| {});
    let mut client = RawClient::connect(broker.addr());
    create_topic(
        &mut client,
        "orders",
        1,
        QueueSettings {
            visibility_timeout_ms: Some(600_000),
            retry_delay_ms_max: Some(2_000),
            ..QueueSettings::default()
        },
    );
    client.produce("orders", 0, batch_of(&[b"a"])).unwrap();
    receive(&mut client, "orders", 1, 5_000);
    drop(client);
    broker.stop();
    let mut config = broker.config.clone();
    config.queue_visibility_timeout_ms_max = 60_000;
    config.queue_retry_delay_ms_min = 5_000;
    config.queue_retry_delay_ms_max = 10_000;
    let broker = TestBroker::start_with(config);
    let mut client = RawClient::connect(broker.addr());
    let response = client
        .call(&Request::Metadata(MetadataRequest {
            topics: vec!["orders".into()],
        }))
        .unwrap();
    let ResponseBody::Metadata(metadata) = response else {
        panic!("{response:?}")
    };
    let queue = &metadata.topics[0].queue;
    assert_eq!(queue.visibility_timeout_ms, Some(60_000));
    assert_eq!(
        queue.retry_delay_ms_min,
        Some(2_000),
        "cut to the topic's maximum"
    );
    client.produce("orders", 0, batch_of(&[b"b"])).unwrap();
    let received = receive(&mut client, "orders", 10, 5_000);
    assert_eq!(values(&received), vec!["b"]);
}

/// A receive that cannot create its group on a later partition (LimitExceeded) leases
/// nothing on the earlier ones: the client hears the error and no message is held.
#[test]
fn a_receive_that_fails_on_a_later_partition_leases_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path(), 1, |config| {
        config.queue_groups_per_shard_max = 1;
    });
    let mut client = RawClient::connect(broker.addr());
    create_topic(&mut client, "orders", 2, QueueSettings::default());
    client.produce("orders", 0, batch_of(&[b"a"])).unwrap();
    client.produce("orders", 1, batch_of(&[b"b"])).unwrap();
    for _ in 0..2 {
        let error = receive_with(&mut client, "orders", GROUP, 10, 0, 0).unwrap_err();
        assert_eq!(error.code, ErrorCode::LimitExceeded, "{error}");
    }
    let in_flight: u32 = describe(&mut client, "orders", GROUP)
        .iter()
        .flat_map(|group| group.partitions.iter())
        .map(|partition| partition.in_flight)
        .sum();
    assert_eq!(in_flight, 0, "nothing leased for a receive that failed");
}

/// Dead-lettering a record at the batch size limit: the copy would not fit with the
/// broker's headers, so its value is cut and `shardq-truncated` says by how much. The
/// copy also drops headers a producer forged under the broker's `shardq-` prefix and the
/// source's delivery headers (`ttl_ms`, `deliver_after`).
#[test]
fn dead_letter_copies_fit_a_batch_and_carry_only_the_brokers_headers() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path(), 1, |_| {});
    let mut client = RawClient::connect(broker.addr());
    create_topic(&mut client, "orders", 1, quick(1));
    let forged_offset = 7u64.to_le_bytes();
    let ttl = 3_600_000u64.to_le_bytes();
    let after = 1u64.to_le_bytes();
    let record_headers: [(&str, &[u8]); 5] = [
        (headers::SOURCE_TOPIC, b"orders"),
        (headers::SOURCE_OFFSET, &forged_offset),
        (headers::TTL_MS, &ttl),
        (headers::DELIVER_AFTER, &after),
        ("trace", b"t-1"),
    ];
    let limit = broker.config.batch_bytes_max();
    let value_length = limit
        - shardq::protocol::batch::BATCH_HEADER_SIZE
        - BatchBuilder::record_size(None, b"", &record_headers);
    let value = vec![b'v'; value_length];
    let batch = record_with(&value, None, &record_headers);
    assert_eq!(batch.len(), limit, "the source batch is at the limit");
    client.produce("orders", 0, batch).unwrap();
    let received = receive(&mut client, "orders", 1, 5_000);
    assert!(settle(&mut client, "orders", nack_ms(0, "no"), &handles(&received)).is_empty());
    eventually("the oversized copy is appended", || {
        describe(&mut client, "orders", GROUP)[0].partitions[0].dead_lettered == 1
    });
    let copies = client.fetch_all("orders.dlq", 0, 0);
    assert_eq!(copies.len(), 1);
    let copy = &copies[0];
    assert_eq!(
        header(copy, headers::TRUNCATED),
        (value_length as u64).to_le_bytes()
    );
    assert!(copy.value.len() < value_length);
    assert!(copy.value.iter().all(|byte| *byte == b'v'));
    let named = |name: &str| {
        copy.headers
            .iter()
            .filter(|(header, _)| header == name)
            .count()
    };
    assert_eq!(named(headers::SOURCE_OFFSET), 1, "{:?}", copy.headers);
    assert_eq!(header(copy, headers::SOURCE_OFFSET), 0u64.to_le_bytes());
    assert_eq!(named(headers::TTL_MS), 0);
    assert_eq!(named(headers::DELIVER_AFTER), 0);
    assert_eq!(header(copy, "trace"), b"t-1");
}

/// A topic whose default DLQ name (`<topic>.dlq`) could not be a topic is refused at
/// create, saying why; naming a DLQ makes it valid. A DLQ that exists placed unlike its
/// source is refused as a dead-letter topic.
#[test]
fn a_topic_whose_dead_letter_topic_could_not_work_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path(), 2, |_| {});
    let mut client = RawClient::connect(broker.addr());
    let long = "t".repeat(shardq::protocol::TOPIC_NAME_BYTES_MAX - 2);
    let create = |name: &str, partitions: u32, queue: QueueSettings| {
        Request::CreateTopic(CreateTopicRequest {
            name: name.into(),
            partitions,
            retention: Default::default(),
            queue,
        })
    };
    let error = client
        .call(&create(&long, 1, QueueSettings::default()))
        .unwrap_err();
    assert_eq!(error.code, ErrorCode::InvalidTopicName, "{error}");
    assert!(error.message.contains("dlq_topic"), "{error}");
    client
        .call(&create(
            &long,
            1,
            QueueSettings {
                dlq_topic: Some("long.dlq".into()),
                ..QueueSettings::default()
            },
        ))
        .unwrap();
    // A user-made `jobs.dlq` with another partition count and its own placement.
    create_topic(&mut client, "jobs.dlq", 1, QueueSettings::default());
    let error = client
        .call(&create("jobs", 4, QueueSettings::default()))
        .unwrap_err();
    assert_eq!(error.code, ErrorCode::InvalidRequest, "{error}");
    assert!(error.message.contains("placement"), "{error}");
    let error = client
        .call(&create(
            "other",
            4,
            QueueSettings {
                dlq_topic: Some("jobs.dlq".into()),
                ..QueueSettings::default()
            },
        ))
        .unwrap_err();
    assert_eq!(error.code, ErrorCode::InvalidRequest, "{error}");
}

#[test]
fn a_receive_of_zero_messages_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path(), 1, |_| {});
    let mut client = RawClient::connect(broker.addr());
    create_topic(&mut client, "orders", 1, QueueSettings::default());
    let error = receive_with(&mut client, "orders", GROUP, 0, 0, 0).unwrap_err();
    assert_eq!(error.code, ErrorCode::InvalidRequest, "{error}");
}

/// A client long-polls a receive, then its connection is reset: the poll must end
/// with it, not lease the next message for nobody (30 s invisible, an attempt burnt).
#[test]
fn a_reset_connection_leases_nothing_for_its_abandoned_long_poll() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path(), 1, |_| {});
    let mut client = RawClient::connect(broker.addr());
    create_topic(&mut client, "orders", 1, QueueSettings::default());
    // Group created, so the poll below waits on it.
    assert!(receive(&mut client, "orders", 1, 0).is_empty());
    let mut leaving = RawClient::connect(broker.addr());
    leaving.send(&Request::Receive(ReceiveRequest {
        topic: "orders".into(),
        group: GROUP.into(),
        messages_max: 1,
        visibility_timeout_ms: 30_000,
        wait_ms: 20_000,
    }));
    // A round trip on the same shard after the poll was sent: it is running.
    describe(&mut client, "orders", GROUP);
    socket2::SockRef::from(&leaving.stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(leaving); // RST
    describe(&mut client, "orders", GROUP);
    client.produce("orders", 0, batch_of(&[b"a"])).unwrap();
    let received = receive(&mut client, "orders", 1, 5_000);
    assert_eq!(
        values(&received),
        vec!["a"],
        "not leased to the reset client"
    );
    assert_eq!(received[0].handle.attempt, 1);
}

fn alter_group(
    client: &mut RawClient,
    topic: &str,
    group: &str,
    settings: QueueSettings,
) -> Result<(), WireError> {
    let response = client.call(&Request::AlterGroup(AlterGroupRequest {
        topic: topic.into(),
        group: group.into(),
        settings,
    }))?;
    assert_eq!(response, ResponseBody::AlterGroup);
    Ok(())
}

fn retry_delays(min: u64, max: u64) -> QueueSettings {
    QueueSettings {
        retry_delay_ms_min: Some(min),
        retry_delay_ms_max: Some(max),
        ..QueueSettings::default()
    }
}

const BACKOFF: SettleAction = SettleAction::Nack {
    delay: NackDelay::Backoff,
    reason: String::new(),
};

/// Issue 8: the retry policy is the topic's, overridable per group. A group's own retry
/// delays win over the topic's, leave other groups alone, survive a restart and a later
/// change of the topic's delays; only the delays may be set, and min <= max.
#[test]
fn a_group_s_own_retry_delays_win_over_the_topic_s() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = broker(dir.path(), 2, |_| {});
    let mut client = RawClient::connect(broker.addr());
    create_topic(&mut client, "orders", 2, retry_delays(60_000, 60_000));
    // The group does not exist yet: AlterGroup creates it (it sees every message).
    alter_group(&mut client, "orders", "fast", retry_delays(20, 20)).unwrap();
    client.produce("orders", 0, batch_of(&[b"a"])).unwrap();

    let fast = receive_with(&mut client, "orders", "fast", 1, 0, 5_000).unwrap();
    let slow = receive_with(&mut client, "orders", "slow", 1, 0, 5_000).unwrap();
    assert_eq!(
        (values(&fast), values(&slow)),
        (vec!["a".into()], vec!["a".into()])
    );
    let refused = settle_with(&mut client, "orders", "fast", BACKOFF, &handles(&fast)).unwrap();
    assert!(refused.is_empty(), "{refused:?}");
    let refused = settle_with(&mut client, "orders", "slow", BACKOFF, &handles(&slow)).unwrap();
    assert!(refused.is_empty(), "{refused:?}");
    let again = receive_with(&mut client, "orders", "fast", 1, 0, 10_000).unwrap();
    assert_eq!(
        values(&again),
        ["a"],
        "the group's 20 ms backoff, not the topic's minute"
    );
    assert_eq!(again[0].handle.attempt, 2);
    assert!(
        receive_with(&mut client, "orders", "slow", 1, 0, 300)
            .unwrap()
            .is_empty(),
        "another group keeps the topic's minute"
    );
    assert_eq!(
        describe(&mut client, "orders", "slow")[0].partitions[0].waiting,
        1
    );
    let refused = settle_with(
        &mut client,
        "orders",
        "fast",
        SettleAction::Ack,
        &handles(&again),
    );
    assert!(refused.unwrap().is_empty());

    // The override is durable, and a later change of the topic's delays leaves it.
    broker.stop();
    let broker = TestBroker::start_with(broker.config.clone());
    let mut client = RawClient::connect(broker.addr());
    client.produce("orders", 1, batch_of(&[b"b"])).unwrap();
    let first = receive_with(&mut client, "orders", "fast", 1, 0, 5_000).unwrap();
    assert_eq!(values(&first), ["b"]);
    let refused = settle_with(&mut client, "orders", "fast", BACKOFF, &handles(&first)).unwrap();
    assert!(refused.is_empty(), "{refused:?}");
    let second = receive_with(&mut client, "orders", "fast", 1, 0, 10_000).unwrap();
    assert_eq!(values(&second), ["b"], "the override outlives a restart");
    assert_eq!(second[0].handle.attempt, 2);
    client
        .call(&Request::AlterTopic(AlterTopicRequest {
            name: "orders".into(),
            retention: None,
            queue: retry_delays(50_000, 50_000),
        }))
        .unwrap();
    let refused = settle_with(&mut client, "orders", "fast", BACKOFF, &handles(&second)).unwrap();
    assert!(refused.is_empty(), "{refused:?}");
    let third = receive_with(&mut client, "orders", "fast", 1, 0, 10_000).unwrap();
    assert_eq!(values(&third), ["b"], "the override outlives AlterTopic");
    assert_eq!(third[0].handle.attempt, 3);

    // Only the retry delays are a group's; min <= max, counting what the group has set.
    let error = alter_group(
        &mut client,
        "orders",
        "fast",
        QueueSettings {
            deliveries_max: Some(3),
            ..retry_delays(20, 20)
        },
    )
    .unwrap_err();
    assert_eq!(error.code, ErrorCode::InvalidRequest);
    assert!(error.message.contains("deliveries_max = 3"), "{error}");
    let error = alter_group(&mut client, "orders", "fast", retry_delays(100, 50)).unwrap_err();
    assert_eq!(error.code, ErrorCode::InvalidRequest);
    assert!(
        error.message.contains("retry_delay_ms_min = 100"),
        "{error}"
    );
    let error = alter_group(
        &mut client,
        "orders",
        "fast",
        QueueSettings {
            retry_delay_ms_min: Some(100),
            ..QueueSettings::default()
        },
    )
    .unwrap_err();
    assert_eq!(error.code, ErrorCode::InvalidRequest);
    assert!(
        error.message.contains("retry_delay_ms_min = 100"),
        "{error}"
    );
    // A refused change creates nothing: no group "never" appears.
    let error = alter_group(&mut client, "orders", "never", retry_delays(100, 50)).unwrap_err();
    assert_eq!(error.code, ErrorCode::InvalidRequest);
    assert!(describe(&mut client, "orders", "never").is_empty());
}
