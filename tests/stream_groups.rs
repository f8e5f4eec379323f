//! Stream groups over a real socket: commits are durable before they are answered and
//! survive a restart; every refusal is typed; the per-partition group limit holds at its
//! edge. Also PurgeTopic, which empties a topic (dead-letter queues use it).
mod common;

use common::{batch_of, test_config, RawClient, TestBroker};
use shardq::protocol::queue::{
    CommitOffsetsRequest, CommitPartition, FetchCommittedRequest, PurgeTopicRequest, COMMITTED_NONE,
};
use shardq::protocol::{ErrorCode, Request, ResponseBody, WireError};

fn commit(
    client: &mut RawClient,
    group: &str,
    topic: &str,
    entries: &[(u32, u64)],
) -> Result<Vec<Result<(), WireError>>, WireError> {
    let response = client.call(&Request::CommitOffsets(CommitOffsetsRequest {
        group: group.into(),
        topic: topic.into(),
        partitions: entries
            .iter()
            .map(|&(partition, offset)| CommitPartition { partition, offset })
            .collect(),
    }))?;
    let ResponseBody::CommitOffsets(response) = response else {
        panic!("unexpected {response:?}");
    };
    assert_eq!(
        response
            .partitions
            .iter()
            .map(|entry| entry.partition)
            .collect::<Vec<_>>(),
        entries.iter().map(|entry| entry.0).collect::<Vec<_>>(),
        "answered in request order"
    );
    Ok(response
        .partitions
        .into_iter()
        .map(|entry| entry.result)
        .collect())
}

/// (committed, log start, high watermark) of a partition, or its error.
type Position = Result<(u64, u64, u64), WireError>;

fn committed(
    client: &mut RawClient,
    group: &str,
    topic: &str,
    partitions: &[u32],
) -> Vec<(u32, Position)> {
    let response = client
        .call(&Request::FetchCommitted(FetchCommittedRequest {
            group: group.into(),
            topic: topic.into(),
            partitions: partitions.to_vec(),
        }))
        .expect("fetch committed");
    let ResponseBody::FetchCommitted(response) = response else {
        panic!("unexpected {response:?}");
    };
    response
        .partitions
        .into_iter()
        .map(|entry| {
            (
                entry.partition,
                entry.result.map(|offsets| {
                    (
                        offsets.committed,
                        offsets.log_start_offset,
                        offsets.high_watermark,
                    )
                }),
            )
        })
        .collect()
}

#[test]
fn commits_are_answered_durable_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = TestBroker::start(dir.path(), 2);
    let mut client = RawClient::connect(broker.addr());
    client.create_topic("orders", 4);
    for partition in 0..4 {
        for _ in 0..=partition {
            client
                .produce("orders", partition, batch_of(&[b"a", b"b"]))
                .unwrap();
        }
    }
    // Never committed: u64::MAX, with the partition's range.
    assert_eq!(
        committed(&mut client, "billing", "orders", &[]),
        (0..4)
            .map(|partition| (
                partition,
                Ok((COMMITTED_NONE, 0, 2 * (u64::from(partition) + 1)))
            ))
            .collect::<Vec<_>>()
    );
    let results = commit(&mut client, "billing", "orders", &[(3, 8), (0, 1), (2, 6)]).unwrap();
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    // A second group is independent; a later commit replaces an earlier one, also
    // backwards (a consumer may rewind).
    commit(&mut client, "audit", "orders", &[(0, 2)]).unwrap();
    commit(&mut client, "billing", "orders", &[(3, 4)]).unwrap();
    broker.stop();
    drop(client);

    let broker = TestBroker::start(dir.path(), 2);
    let mut client = RawClient::connect(broker.addr());
    assert_eq!(
        committed(&mut client, "billing", "orders", &[3, 0, 2, 1]),
        vec![
            (3, Ok((4, 0, 8))),
            (0, Ok((1, 0, 2))),
            (2, Ok((6, 0, 6))),
            (1, Ok((COMMITTED_NONE, 0, 4))),
        ]
    );
    assert_eq!(
        committed(&mut client, "audit", "orders", &[0]),
        vec![(0, Ok((2, 0, 2)))]
    );
}

#[test]
fn refusals_are_typed_per_partition_and_per_request() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 1);
    let mut client = RawClient::connect(broker.addr());
    client.create_topic("orders", 2);
    client.produce("orders", 0, batch_of(&[b"a"])).unwrap();

    let error = commit(&mut client, "billing", "missing", &[(0, 0)]).unwrap_err();
    assert_eq!(error.code, ErrorCode::UnknownTopic, "{error}");

    let results = commit(&mut client, "billing", "orders", &[(0, 1), (0, 2), (7, 0)]).unwrap();
    assert_eq!(
        results[0],
        Ok(()),
        "the high watermark itself may be committed"
    );
    let past = results[1].clone().unwrap_err();
    assert_eq!(past.code, ErrorCode::OffsetOutOfRange, "{past}");
    assert!(past.message.contains("high watermark 1"), "{past}");
    assert_eq!(
        results[2].clone().unwrap_err().code,
        ErrorCode::UnknownPartition
    );
    let fetched = committed(&mut client, "billing", "orders", &[9]);
    assert_eq!(
        fetched[0].1.clone().unwrap_err().code,
        ErrorCode::UnknownPartition
    );

    // A bad group name is refused while decoding; the connection stays usable.
    let error = commit(&mut client, "a/b", "orders", &[(0, 0)]).unwrap_err();
    assert_eq!(error.code, ErrorCode::InvalidGroupName, "{error}");
    assert_eq!(
        committed(&mut client, "billing", "orders", &[0]),
        vec![(0, Ok((1, 0, 1)))]
    );
}

#[test]
fn stream_groups_per_partition_are_bounded_at_the_configured_edge() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start_with(shardq::config::ServerConfig {
        stream_groups_per_partition_max: 3,
        ..test_config(dir.path(), 1)
    });
    let mut client = RawClient::connect(broker.addr());
    client.create_topic("orders", 2);
    for group in ["g1", "g2", "g3"] {
        assert_eq!(
            commit(&mut client, group, "orders", &[(0, 0)]).unwrap(),
            vec![Ok(())]
        );
    }
    let refused = commit(&mut client, "g4", "orders", &[(0, 0), (1, 0)]).unwrap();
    let error = refused[0].clone().unwrap_err();
    assert_eq!(error.code, ErrorCode::LimitExceeded, "{error}");
    assert!(
        error.message.contains("stream_groups_per_partition_max"),
        "{error}"
    );
    // The limit is per partition: partition 1 still has room, and known groups commit.
    assert_eq!(refused[1], Ok(()));
    assert_eq!(
        commit(&mut client, "g2", "orders", &[(0, 0)]).unwrap(),
        vec![Ok(())]
    );
}

#[test]
fn purge_empties_every_partition_and_later_produces_stay() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let mut client = RawClient::connect(broker.addr());
    client.create_topic("orders.dlq", 3);
    for partition in 0..3 {
        for _ in 0..=partition {
            client
                .produce("orders.dlq", partition, batch_of(&[b"x", b"y", b"z"]))
                .unwrap();
        }
    }
    let purge = |client: &mut RawClient, topic: &str| {
        client.call(&Request::PurgeTopic(PurgeTopicRequest {
            topic: topic.into(),
        }))
    };
    let ResponseBody::PurgeTopic(purged) = purge(&mut client, "orders.dlq").unwrap() else {
        panic!("unexpected response");
    };
    let summary: Vec<_> = purged
        .partitions
        .iter()
        .map(|entry| (entry.partition, entry.records, entry.log_start_offset))
        .collect();
    assert_eq!(summary, vec![(0, 3, 3), (1, 6, 6), (2, 9, 9)]);
    assert!(client.fetch_all("orders.dlq", 2, 9).is_empty());
    // Produced after the purge: kept, and a second purge counts only it.
    client
        .produce("orders.dlq", 1, batch_of(&[b"late"]))
        .unwrap();
    assert_eq!(
        common::values(&client.fetch_all("orders.dlq", 1, 6)),
        ["late"]
    );
    let ResponseBody::PurgeTopic(purged) = purge(&mut client, "orders.dlq").unwrap() else {
        panic!("unexpected response");
    };
    assert_eq!(
        purged
            .partitions
            .iter()
            .map(|entry| entry.records)
            .collect::<Vec<_>>(),
        vec![0, 1, 0]
    );
    let error = purge(&mut client, "missing").unwrap_err();
    assert_eq!(error.code, ErrorCode::UnknownTopic, "{error}");
}
