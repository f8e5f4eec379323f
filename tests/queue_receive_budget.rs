//! A receive's answer is bounded in bytes (`queue_receive_bytes_max`), across partitions
//! and shards, at its edge and past it; a message larger than the whole budget is still
//! delivered, alone. Real sockets, raw frames.
mod common;

use common::{batch_of, test_config, RawClient, TestBroker};
use shardq::protocol::queue::{QueueSettings, ReceiveRequest, ReceivedMessage};
use shardq::protocol::{CreateTopicRequest, Request, ResponseBody};

/// Bytes a message weighs against the budget: key, value and headers (none here).
const MESSAGE: usize = 400;

fn receive(client: &mut RawClient, topic: &str, messages_max: u32) -> Vec<ReceivedMessage> {
    match client.call(&Request::Receive(ReceiveRequest {
        topic: topic.into(),
        group: "workers".into(),
        messages_max,
        visibility_timeout_ms: 60_000,
        wait_ms: 5_000,
    })) {
        Ok(ResponseBody::Receive(response)) => response.messages,
        other => panic!("receive: {other:?}"),
    }
}

fn weight(messages: &[ReceivedMessage]) -> usize {
    messages.iter().map(|message| message.value.len()).sum()
}

fn broker(dir: &std::path::Path, shards: usize, bytes_max: u64) -> TestBroker {
    TestBroker::start_with(shardq::config::ServerConfig {
        queue_receive_bytes_max: bytes_max,
        ..test_config(dir, shards)
    })
}

fn create(client: &mut RawClient, topic: &str, partitions: u32) {
    client
        .call(&Request::CreateTopic(CreateTopicRequest {
            name: topic.into(),
            partitions,
            retention: Default::default(),
            queue: QueueSettings::default(),
        }))
        .expect("topic created");
}

#[test]
fn a_receive_stops_at_its_byte_budget_exactly_at_and_past_the_edge() {
    let dir = tempfile::tempdir().unwrap();
    // Exactly two messages' worth.
    let broker = broker(dir.path(), 1, 2 * MESSAGE as u64);
    let mut client = RawClient::connect(broker.addr());
    create(&mut client, "jobs", 1);
    let value = vec![b'x'; MESSAGE];
    let values: Vec<&[u8]> = (0..5).map(|_| &value[..]).collect();
    client.produce("jobs", 0, batch_of(&values)).unwrap();
    // Two fit exactly; a third would pass the budget by one message.
    let first = receive(&mut client, "jobs", 100);
    assert_eq!(first.len(), 2);
    assert_eq!(weight(&first), 2 * MESSAGE);
    assert_eq!(receive(&mut client, "jobs", 100).len(), 2);
    assert_eq!(receive(&mut client, "jobs", 100).len(), 1);
}

#[test]
fn a_message_larger_than_the_budget_is_delivered_alone() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path(), 1, 1000);
    let mut client = RawClient::connect(broker.addr());
    create(&mut client, "jobs", 1);
    let big = vec![b'b'; 5000];
    let small = [b's'; 10];
    client
        .produce("jobs", 0, batch_of(&[&big[..], &small[..]]))
        .unwrap();
    let first = receive(&mut client, "jobs", 100);
    assert_eq!(first.len(), 1, "the oversized message goes alone");
    assert_eq!(first[0].value.len(), 5000);
    let second = receive(&mut client, "jobs", 100);
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].value.len(), 10);
}

#[test]
fn the_budget_holds_across_partitions_and_shards() {
    let dir = tempfile::tempdir().unwrap();
    // Five messages' worth, over 8 partitions on 2 shards holding 3 messages each.
    let broker = broker(dir.path(), 2, 5 * MESSAGE as u64);
    let mut client = RawClient::connect(broker.addr());
    create(&mut client, "jobs", 8);
    let value = vec![b'x'; MESSAGE];
    for partition in 0..8 {
        client
            .produce(
                "jobs",
                partition,
                batch_of(&[&value[..], &value[..], &value[..]]),
            )
            .unwrap();
    }
    let mut total = 0;
    while total < 24 {
        let received = receive(&mut client, "jobs", 1000);
        assert!(!received.is_empty(), "{total} of 24 received, then nothing");
        assert!(
            weight(&received) <= 5 * MESSAGE,
            "{} messages of {} bytes in one receive",
            received.len(),
            weight(&received)
        );
        total += received.len();
    }
    assert_eq!(total, 24);
}
