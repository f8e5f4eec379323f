//! Every configured limit at its edge and one past it (issue 14): through a real broker
//! where the limit is the broker's (docs/protocol.md §2, §5, §6 and §7 say how it
//! reacts), and `ServerConfig::validate` for every config key, table-driven, with a check
//! that the table has a row for each key so that a new key without one fails here.
//!
//! Limits are configured small so that each test stays short; waits are bounded reads
//! (the raw client's 30 s read timeout) or bounded polls, never sleeps.
mod common;

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::*;
use shardq::config::file::{Layered, LoadError, KEYS};
use shardq::config::ServerConfig;
use shardq::protocol::batch::{decode_records, BatchBuilder};
use shardq::protocol::queue::{CommitPartition, GROUP_NAME_BYTES_MAX};
use shardq::protocol::*;

fn create(name: &str, partitions: u32) -> Request {
    Request::CreateTopic(CreateTopicRequest {
        name: name.into(),
        partitions,
        retention: Default::default(),
        queue: Default::default(),
    })
}

fn produce(topic: &str, partition: u32, batch: Bytes) -> Request {
    Request::Produce(ProduceRequest {
        acks: Acks::Durable,
        timeout_ms: 10_000,
        topics: vec![ProduceTopic {
            name: topic.into(),
            partitions: vec![ProducePartition { partition, batch }],
        }],
    })
}

/// Values of the records of one fetch entry's batches.
fn fetched_values(result: &FetchPartitionResult) -> Vec<String> {
    let batches = result.data.batches.clone().expect("partition readable");
    let mut records = Vec::new();
    decode_records(&batches, 0, &mut records).expect("whole batches");
    values(&records)
}

/// A batch of one record whose encoded length is exactly `length` bytes.
fn batch_of_length(length: usize, fill: u8) -> Bytes {
    let build = |value_length: usize| {
        let mut builder = BatchBuilder::new(BytesMut::new());
        builder.push(1_700_000_000_000, None, &vec![fill; value_length], &[]);
        builder.finish()
    };
    let mut value_length = length - build(0).len();
    // The record's lengths are varints: a longer value can lengthen them too.
    for _ in 0..4 {
        let built = build(value_length).len();
        if built == length {
            return build(value_length);
        }
        if built > length {
            value_length -= built - length;
        } else {
            value_length += length - built;
        }
    }
    panic!("no one-record batch is exactly {length} bytes")
}

/// The shard that owns each partition of `topic`, from Metadata.
fn owners(client: &mut RawClient, topic: &str) -> Vec<u16> {
    let response = client
        .call(&Request::Metadata(MetadataRequest {
            topics: vec![topic.into()],
        }))
        .expect("metadata");
    let ResponseBody::Metadata(response) = response else {
        panic!("metadata answered with {response:?}")
    };
    response.topics[0]
        .partitions
        .iter()
        .map(|partition| partition.shard)
        .collect()
}

/// A frame of exactly `frame_body_bytes_max` bytes of body is read and served; one byte
/// more is refused from its header alone (FrameTooLarge, echoing the correlation id and
/// naming both numbers) and the connection is closed (§7), with nothing of it stored.
#[test]
fn a_frame_of_exactly_the_maximum_is_served_and_one_byte_more_closes() {
    let dir = tempfile::tempdir().unwrap();
    let body_max = 8_192u32;
    let broker = TestBroker::start_with(ServerConfig {
        frame_body_bytes_max: body_max,
        ..test_config(dir.path(), 1)
    });
    let mut client = RawClient::connect(broker.addr());
    client.create_topic("edge", 1);
    // A produce whose body is `body` bytes: the batch takes what the rest leaves.
    let frame_of_body = |body: usize, fill: u8| {
        let mut probe = BytesMut::new();
        produce("edge", 0, batch_of_length(1_024, fill)).encode(1, &mut probe);
        let rest = probe.len() - FRAME_HEADER_SIZE - 1_024;
        produce("edge", 0, batch_of_length(body - rest, fill))
    };
    let at_edge = frame_of_body(body_max as usize, b'a');
    let mut frame = BytesMut::new();
    at_edge.encode(5, &mut frame);
    assert_eq!(frame.len() - FRAME_HEADER_SIZE, body_max as usize);
    client.send_bytes(&frame);
    let (id, opcode, body) = client.read_frame().expect("an answer");
    assert_eq!(id, 5);
    let ResponseBody::Produce(response) = decode_response(opcode_of(opcode), body)
        .unwrap()
        .expect("served")
    else {
        panic!("not a produce answer")
    };
    assert_eq!(response.topics[0].partitions[0].result, Ok(0));

    let mut frame = BytesMut::new();
    frame_of_body(body_max as usize + 1, b'b').encode(6, &mut frame);
    assert_eq!(frame.len() - FRAME_HEADER_SIZE, body_max as usize + 1);
    client.send_bytes(&frame);
    let (id, opcode, body) = client.read_frame().expect("an error answer");
    let error = decode_response(opcode_of(opcode), body)
        .unwrap()
        .expect_err("refused");
    assert_eq!((id, error.code), (6, ErrorCode::FrameTooLarge), "{error}");
    assert!(
        error.message.contains("8193") && error.message.contains("8192"),
        "{error}"
    );
    assert!(client.is_closed_by_peer(), "FrameTooLarge closes");

    let stored = RawClient::connect(broker.addr()).fetch_all("edge", 0, 0);
    assert_eq!(stored.len(), 1, "only the frame at the edge was stored");
    assert!(stored[0].value.iter().all(|byte| *byte == b'a'));
}

/// A batch of exactly `chunk_size_bytes - 4096` bytes (what Handshake reports as
/// `batch_bytes_max`) is stored, even behind a partial block; one byte more is
/// InvalidBatch. A batch of exactly `batch_records_max` records is stored; one record
/// more is InvalidBatch. Refused batches take no offsets and store nothing, and the
/// entry beside a refused one in the same request is stored (§5.5).
#[test]
fn batches_at_the_byte_and_record_limits_are_stored_and_one_past_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        batch_records_max: 5,
        ..test_config(dir.path(), 1)
    };
    let bytes_max = config.batch_bytes_max();
    assert_eq!(bytes_max, (256 << 10) - 4096);
    let broker = TestBroker::start_with(config);
    let mut client = RawClient::connect(broker.addr());
    let handshake = client
        .call(&Request::Handshake(HandshakeRequest {
            client_name: "limits".into(),
        }))
        .unwrap();
    let ResponseBody::Handshake(handshake) = handshake else {
        panic!("{handshake:?}")
    };
    assert_eq!(handshake.batch_bytes_max as usize, bytes_max);
    client.create_topic("edge", 1);
    // A small batch first, so the next starts inside a partly written block.
    assert_eq!(client.produce("edge", 0, batch_of(&[b"small"])), Ok(0));
    assert_eq!(
        client.produce("edge", 0, batch_of_length(bytes_max, b'x')),
        Ok(1)
    );
    let error = client
        .produce("edge", 0, batch_of_length(bytes_max + 1, b'y'))
        .expect_err("one byte too large");
    assert_eq!(error.code, ErrorCode::InvalidBatch, "{error}");
    assert!(
        error.message.contains(&(bytes_max + 1).to_string())
            && error.message.contains(&bytes_max.to_string()),
        "{error}"
    );
    let five: Vec<&[u8]> = vec![b"r0", b"r1", b"r2", b"r3", b"r4"];
    assert_eq!(client.produce("edge", 0, batch_of(&five)), Ok(2));
    let six: Vec<&[u8]> = vec![b"s0", b"s1", b"s2", b"s3", b"s4", b"s5"];
    let error = client
        .produce("edge", 0, batch_of(&six))
        .expect_err("one record too many");
    assert_eq!(error.code, ErrorCode::InvalidBatch, "{error}");
    assert!(
        error.message.contains('6') && error.message.contains('5'),
        "{error}"
    );
    // Both refusals and an edge batch in one request: each entry on its own.
    let response = client
        .call(&Request::Produce(ProduceRequest {
            acks: Acks::Durable,
            timeout_ms: 10_000,
            topics: vec![ProduceTopic {
                name: "edge".into(),
                partitions: vec![
                    ProducePartition {
                        partition: 0,
                        batch: batch_of(&six),
                    },
                    ProducePartition {
                        partition: 0,
                        batch: batch_of_length(bytes_max, b'z'),
                    },
                    ProducePartition {
                        partition: 0,
                        batch: batch_of_length(bytes_max + 1, b'y'),
                    },
                ],
            }],
        }))
        .unwrap();
    let ResponseBody::Produce(response) = response else {
        panic!("{response:?}")
    };
    let results: Vec<_> = response.topics[0]
        .partitions
        .iter()
        .map(|entry| entry.result.as_ref().map_err(|error| error.code))
        .collect();
    assert_eq!(
        results,
        vec![
            Err(ErrorCode::InvalidBatch),
            Ok(&7),
            Err(ErrorCode::InvalidBatch)
        ]
    );
    let stored = client.fetch_all("edge", 0, 0);
    let lengths: Vec<usize> = stored.iter().map(|record| record.value.len()).collect();
    assert_eq!(stored.len(), 8, "{lengths:?}");
    assert_eq!(values(&stored[2..7]), ["r0", "r1", "r2", "r3", "r4"]);
    assert!(stored[1].value.iter().all(|byte| *byte == b'x'));
    assert!(stored[7].value.iter().all(|byte| *byte == b'z'));
}

/// The smallest segment (`segment_size_bytes` = `chunk_size_bytes`, its lower edge) with
/// the largest batches (`chunk_size_bytes - 4096` bytes): a batch that ends exactly at the
/// segment's size goes in, one byte more rolls a new segment, and after a restart every
/// record reads back at its offset.
#[test]
fn the_smallest_segment_takes_the_largest_batches_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        segment_size_bytes: 256 << 10,
        ..test_config(dir.path(), 1)
    };
    assert_eq!(config.segment_size_bytes, config.chunk_size_bytes as u64);
    let bytes_max = config.batch_bytes_max();
    let mut broker = TestBroker::start_with(config.clone());
    let mut client = RawClient::connect(broker.addr());
    client.create_topic("edge", 1);
    let small = batch_of(&[&[0u8; 10]]).len();
    // What a small batch and a largest one leave of a segment.
    let rest = (256 << 10) - bytes_max - small;
    let plan: Vec<(usize, u8)> = vec![
        (small, b'a'),
        (bytes_max, b'b'),
        (rest, b'c'),  // ends exactly at the segment's size
        (small, b'd'), // rolls
        (bytes_max, b'e'),
        (rest + 1, b'f'), // one byte past: rolls
        (bytes_max, b'g'),
        (small, b'h'), // one byte past again: rolls
    ];
    for (offset, (length, fill)) in plan.iter().enumerate() {
        let batch = if *length == small {
            batch_of(&[&[*fill; 10]])
        } else {
            batch_of_length(*length, *fill)
        };
        assert_eq!(batch.len(), *length);
        assert_eq!(client.produce("edge", 0, batch), Ok(offset as u64));
    }
    let read = |client: &mut RawClient| -> Vec<(u8, usize)> {
        client
            .fetch_all("edge", 0, 0)
            .iter()
            .map(|record| {
                assert!(record.value.iter().all(|byte| *byte == record.value[0]));
                (record.value[0], record.value.len())
            })
            .collect()
    };
    let before = read(&mut client);
    assert_eq!(
        before.iter().map(|(fill, _)| *fill).collect::<Vec<_>>(),
        b"abcdefgh"
    );
    drop(client);
    broker.stop();
    let segments = std::fs::read_dir(dir.path().join("topics/edge/0"))
        .unwrap()
        .filter(|entry| {
            let name = entry.as_ref().unwrap().file_name();
            name.to_string_lossy().ends_with(".log")
        })
        .count();
    assert_eq!(segments, 4, "a roll at each edge and only there");
    let broker = TestBroker::start_with(config);
    let after = read(&mut RawClient::connect(broker.addr()));
    assert_eq!(after, before, "every record reads back after the restart");
}

/// `connections_per_shard_max`: the Nth connection on a shard is served, the N+1th is
/// accepted and closed at once without an answer (§7), and once a client leaves, a new
/// connection is served (and the one after it refused again).
#[test]
fn the_connection_limit_per_shard_serves_the_nth_and_closes_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start_with(ServerConfig {
        connections_per_shard_max: 3,
        ..test_config(dir.path(), 2)
    });
    let handshake = Request::Handshake(HandshakeRequest {
        client_name: "limit".into(),
    });
    let shard = broker.shard_addr(1);
    let mut open: Vec<RawClient> = (0..3)
        .map(|_| {
            let mut client = RawClient::connect(shard);
            client.call(&handshake).expect("within the limit");
            client
        })
        .collect();
    let mut refused = RawClient::connect(shard);
    refused.send(&handshake);
    assert!(
        refused.read_frame().is_none(),
        "the 4th is closed unanswered"
    );
    // Shard 0 has its own count: it serves while shard 1 is full.
    RawClient::connect(broker.shard_addr(0))
        .call(&handshake)
        .expect("another shard is not full");
    drop(open.pop());
    // The broker notices the departure on its own time: retry, bounded.
    let deadline = Instant::now() + Duration::from_secs(30);
    let replacement = loop {
        let mut client = RawClient::connect(shard);
        client.send(&handshake);
        if client.read_frame().is_some() {
            break client;
        }
        assert!(Instant::now() < deadline, "the freed slot is never reused");
    };
    open.push(replacement);
    let mut refused = RawClient::connect(shard);
    refused.send(&handshake);
    assert!(refused.read_frame().is_none(), "full again at 3");
    for client in &mut open {
        client
            .call(&handshake)
            .expect("the open ones are still served");
    }
}

/// `connection_requests_in_flight_max` (§2): with N-1 requests running the next one runs
/// at once; with N running the next waits (the broker stops reading) until one ends,
/// and then everything is answered, nothing lost. Long-polls hold the slots; a produce
/// on another connection releases them.
#[test]
fn requests_past_the_in_flight_limit_wait_for_a_slot_and_are_all_answered() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start_with(ServerConfig {
        connection_requests_in_flight_max: 4,
        ..test_config(dir.path(), 1)
    });
    let mut admin = RawClient::connect(broker.addr());
    admin.create_topic("quiet", 1);
    let long_poll = fetch_request(30_000, 64 << 10, u32::MAX, "quiet", &[(0, 0)]);
    let handshake = Request::Handshake(HandshakeRequest {
        client_name: "in-flight".into(),
    });
    let mut client = RawClient::connect(broker.addr());
    let mut polls: Vec<u64> = (0..3).map(|_| client.send(&long_poll)).collect();
    // Three of four slots taken: a fourth request runs at once (the polls wait 30 s).
    let first = client.send(&handshake);
    let (id, _, _) = client.read_frame().expect("answered");
    assert_eq!(id, first, "below the limit a request is not held back");
    polls.push(client.send(&long_poll));
    let held = client.send(&handshake);
    assert_eq!(admin.produce("quiet", 0, batch_of(&[b"wake"])), Ok(0));
    let mut answered = Vec::new();
    for _ in 0..5 {
        let (id, opcode, body) = client.read_frame().expect("every request is answered");
        let response = decode_response(opcode_of(opcode), body).unwrap();
        if id != held {
            let results = fetched(response);
            assert_eq!(fetched_values(&results[0]), ["wake"]);
        }
        answered.push(id);
    }
    // Answers go out in completion order; the handshake read at the limit could only
    // start once a long-poll had answered and freed its slot.
    assert_ne!(
        answered[0], held,
        "the 5th request ran beside 4: {answered:?}"
    );
    answered.sort_unstable();
    let mut expected = polls.clone();
    expected.push(held);
    expected.sort_unstable();
    assert_eq!(answered, expected, "each request answered once");
    client.call(&handshake).expect("the connection goes on");
}

/// `topics_max` (LimitExceeded at the edge, §5.3) and `partitions_per_topic_max`
/// (InvalidPartitionCount past it and at 0); a deleted topic frees its place.
#[test]
fn topic_and_partition_counts_hold_at_their_edges() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start_with(ServerConfig {
        topics_max: 3,
        partitions_per_topic_max: 4,
        ..test_config(dir.path(), 2)
    });
    let mut client = RawClient::connect(broker.addr());
    let code = |result: Result<ResponseBody, WireError>| result.map_err(|error| error.code);
    for partitions in [5, 0] {
        let error = client.call(&create("wide", partitions)).unwrap_err();
        assert_eq!(error.code, ErrorCode::InvalidPartitionCount, "{error}");
        assert!(
            error.message.contains("1 to 4") && error.message.contains(&partitions.to_string()),
            "{error}"
        );
    }
    assert_eq!(
        code(client.call(&create("wide", 4))),
        Ok(ResponseBody::CreateTopic)
    );
    assert_eq!(client.produce("wide", 3, batch_of(&[b"last"])), Ok(0));
    assert_eq!(
        client
            .produce("wide", 4, batch_of(&[b"past"]))
            .map_err(|error| error.code),
        Err(ErrorCode::UnknownPartition)
    );
    client.create_topic("second", 1);
    client.create_topic("third", 1);
    let error = client.call(&create("fourth", 1)).unwrap_err();
    assert_eq!(error.code, ErrorCode::LimitExceeded, "{error}");
    assert!(error.message.contains("3 topics"), "{error}");
    assert!(!dir.path().join("topics").join("fourth").exists());
    assert_eq!(
        client.call(&Request::DeleteTopic(DeleteTopicRequest {
            name: "second".into()
        })),
        Ok(ResponseBody::DeleteTopic)
    );
    assert_eq!(
        code(client.call(&create("fourth", 1))),
        Ok(ResponseBody::CreateTopic)
    );
    assert_eq!(client.produce("fourth", 0, batch_of(&[b"in"])), Ok(0));
}

/// `topics_per_request_max` and `partitions_per_request_max` (§1, §6): a request listing
/// exactly as many is served; one more is MalformedFrame, naming both counts, and the
/// connection is closed (§7). The partition limit counts over all the request's topics.
#[test]
fn requests_listing_the_most_topics_and_partitions_are_served_and_one_more_closes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start_with(ServerConfig {
        topics_per_request_max: 2,
        partitions_per_request_max: 3,
        ..test_config(dir.path(), 2)
    });
    let mut admin = RawClient::connect(broker.addr());
    for name in ["a", "b", "c"] {
        admin.create_topic(name, 2);
    }
    let metadata = |names: &[&str]| {
        Request::Metadata(MetadataRequest {
            topics: names.iter().map(|name| name.to_string()).collect(),
        })
    };
    // (topic, partitions) entries of one produce.
    let produce_to = |entries: &[(&str, &[u32])]| {
        Request::Produce(ProduceRequest {
            acks: Acks::Durable,
            timeout_ms: 10_000,
            topics: entries
                .iter()
                .map(|(name, partitions)| ProduceTopic {
                    name: name.to_string(),
                    partitions: partitions
                        .iter()
                        .map(|&partition| ProducePartition {
                            partition,
                            batch: batch_of(&[format!("{name}{partition}").as_bytes()]),
                        })
                        .collect(),
                })
                .collect(),
        })
    };
    let list_offsets = |entries: &[(&str, &[u32])]| {
        Request::ListOffsets(ListOffsetsRequest {
            topics: entries
                .iter()
                .map(|(name, partitions)| ListOffsetsTopic {
                    name: name.to_string(),
                    partitions: partitions
                        .iter()
                        .map(|&partition| ListOffsetsPartition {
                            partition,
                            timestamp_ms: TIMESTAMP_LATEST,
                        })
                        .collect(),
                })
                .collect(),
        })
    };
    let served = [
        metadata(&["a", "b"]),
        produce_to(&[("a", &[0, 1]), ("b", &[0])]),
        fetch_request(0, 1 << 20, u32::MAX, "a", &[(0, 0), (1, 0), (0, 0)]),
        list_offsets(&[("a", &[0, 1]), ("b", &[0])]),
    ];
    let mut client = RawClient::connect(broker.addr());
    for request in &served {
        client.call(request).expect("at the limits");
    }
    let refused = [
        (
            metadata(&["a", "b", "c"]),
            "topics lists 3 entries, at most 2",
        ),
        (
            produce_to(&[("a", &[0, 1]), ("c", &[0, 1])]),
            "lists 4 entries, at most 3",
        ),
        (
            Request::Fetch(FetchRequest {
                wait_ms_max: 0,
                bytes_max: 1 << 20,
                topics: ["a", "b"]
                    .map(|name| FetchTopic {
                        name: name.into(),
                        partitions: (0..2)
                            .map(|partition| FetchPartition {
                                partition,
                                offset: 0,
                                bytes_max: 1 << 20,
                            })
                            .collect(),
                    })
                    .to_vec(),
            }),
            "partitions lists 4 entries, at most 3",
        ),
        (
            list_offsets(&[("a", &[0, 1]), ("b", &[0, 1])]),
            "partitions lists 4 entries, at most 3",
        ),
    ];
    for (request, message) in &refused {
        let mut client = RawClient::connect(broker.addr());
        let error = client.call(request).expect_err("one past a limit");
        assert_eq!(error.code, ErrorCode::MalformedFrame, "{error}");
        assert!(error.message.contains(message), "{error}");
        assert!(client.is_closed_by_peer(), "MalformedFrame closes");
    }
    // Only the produce at the limit stored anything.
    for (name, partition, stored) in [("a", 0, 1), ("a", 1, 1), ("b", 0, 1), ("c", 0, 0)] {
        let records = admin.fetch_all(name, partition, 0);
        assert_eq!(records.len(), stored, "{name}/{partition}");
    }
}

/// Topic and group names: 200 bytes are accepted everywhere, 201 are refused by every
/// request that names one (InvalidTopicName, InvalidGroupName), the message quoting
/// exactly the first 64 bytes and `...` (§1), and the connection stays open (§7).
#[test]
fn names_of_200_bytes_work_and_201_are_refused_quoting_64() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let mut client = RawClient::connect(broker.addr());
    let name = "n".repeat(TOPIC_NAME_BYTES_MAX);
    assert_eq!(name.len(), 200);
    // The default dead-letter topic, `<name>.dlq`, would be 204 bytes: name one.
    client
        .call(&Request::CreateTopic(CreateTopicRequest {
            name: name.clone(),
            partitions: 1,
            retention: Default::default(),
            queue: QueueSettings {
                dlq_topic: Some("long.dlq".into()),
                ..Default::default()
            },
        }))
        .expect("a 200-byte topic");
    assert_eq!(client.produce(&name, 0, batch_of(&[b"kept"])), Ok(0));
    assert_eq!(values(&client.fetch_all(&name, 0, 0)), ["kept"]);
    let group = "g".repeat(GROUP_NAME_BYTES_MAX);
    assert_eq!(group.len(), 200);
    let commit = |group: &str| {
        Request::CommitOffsets(CommitOffsetsRequest {
            group: group.into(),
            topic: name.clone(),
            partitions: vec![CommitPartition {
                partition: 0,
                offset: 1,
            }],
        })
    };
    let receive = |group: &str| {
        Request::Receive(ReceiveRequest {
            topic: name.clone(),
            group: group.into(),
            messages_max: 1,
            visibility_timeout_ms: 0,
            wait_ms: 0,
        })
    };
    let committed = client.call(&commit(&group)).expect("a 200-byte group");
    let ResponseBody::CommitOffsets(committed) = committed else {
        panic!("{committed:?}")
    };
    assert_eq!(committed.partitions[0].result, Ok(()));
    let received = client.call(&receive("q")).expect("a queue group");
    let ResponseBody::Receive(received) = received else {
        panic!("{received:?}")
    };
    assert_eq!(received.messages.len(), 1);
    client
        .call(&receive(&"q".repeat(GROUP_NAME_BYTES_MAX)))
        .expect("a 200-byte queue group");

    let quoted = |character: &str| format!("\"{}\"...", character.repeat(64));
    let long = "n".repeat(TOPIC_NAME_BYTES_MAX + 1);
    let requests = [
        create(&long, 1),
        Request::DeleteTopic(DeleteTopicRequest { name: long.clone() }),
        Request::AlterTopic(AlterTopicRequest {
            name: long.clone(),
            retention: None,
            queue: Default::default(),
        }),
        Request::Metadata(MetadataRequest {
            topics: vec![long.clone()],
        }),
        produce(&long, 0, batch_of(&[b"never"])),
        fetch_request(0, 1 << 20, u32::MAX, &long, &[(0, 0)]),
        Request::ListOffsets(ListOffsetsRequest {
            topics: vec![ListOffsetsTopic {
                name: long.clone(),
                partitions: vec![ListOffsetsPartition {
                    partition: 0,
                    timestamp_ms: TIMESTAMP_LATEST,
                }],
            }],
        }),
    ];
    for request in &requests {
        let error = client.call(request).expect_err("201 bytes");
        assert_eq!(
            error.code,
            ErrorCode::InvalidTopicName,
            "{request:?}: {error}"
        );
        assert!(
            error.message.contains(&quoted("n")) && error.message.contains("201 bytes"),
            "{error}"
        );
    }
    let long_group = "g".repeat(GROUP_NAME_BYTES_MAX + 1);
    for request in [commit(&long_group), receive(&long_group)] {
        let error = client.call(&request).expect_err("201 bytes");
        assert_eq!(error.code, ErrorCode::InvalidGroupName, "{error}");
        assert!(
            error.message.contains(&quoted("g")) && error.message.contains("201 bytes"),
            "{error}"
        );
    }
    // Still in sync and usable; nothing was stored by the refused produce.
    assert_eq!(client.produce(&name, 0, batch_of(&[b"after"])), Ok(1));
    assert!(!dir.path().join("topics").join(&long).exists());
}

/// `fetch_wait_ms_max` and `fetch_bytes_max` (§5.6): a fetch asking for more is cut to
/// them, not refused. A long-poll asking for u32::MAX ms is answered (empty) after the
/// broker's maximum, on one shard and across shards; a fetch asking for u32::MAX bytes
/// gets what fits in `fetch_bytes_max`, exactly two batches here; the total over owning
/// shards is cut to it too; and one batch larger than the maximum still comes whole.
#[test]
fn fetches_asking_past_the_maxima_are_cut_to_them() {
    let dir = tempfile::tempdir().unwrap();
    let batch_length = batch_of(&[&[0u8; 1_000]]).len();
    let broker = TestBroker::start_with(ServerConfig {
        fetch_wait_ms_max: 200,
        fetch_bytes_max: 2 * batch_length as u32,
        ..test_config(dir.path(), 2)
    });
    let mut client = RawClient::connect(broker.shard_addr(0));
    client.create_topic("data", 8);
    let owners = owners(&mut client, "data");
    let on = |shard: u16| owners.iter().position(|owner| *owner == shard).unwrap() as u32;
    let (local, remote) = (on(0), on(1));
    for partition in [local, remote] {
        for index in 0..5 {
            let value = format!("{index}").repeat(1_000);
            assert_eq!(
                client.produce("data", partition, batch_of(&[value.as_bytes()])),
                Ok(index)
            );
        }
    }
    for partitions in [
        vec![(local, 5)],
        vec![(remote, 5)],
        vec![(local, 5), (remote, 5)],
    ] {
        let results = fetched(client.call(&fetch_request(
            u32::MAX,
            u32::MAX,
            u32::MAX,
            "data",
            &partitions,
        )));
        for result in results {
            assert_eq!(result.data.batches, Ok(Bytes::new()), "{partitions:?}");
            assert_eq!(result.data.high_watermark, 5);
        }
    }
    for partition in [local, remote] {
        let results = fetched(client.call(&fetch_request(
            0,
            u32::MAX,
            u32::MAX,
            "data",
            &[(partition, 0)],
        )));
        assert_eq!(
            fetched_values(&results[0]),
            ["0".repeat(1_000), "1".repeat(1_000)],
            "two batches fit in fetch_bytes_max, a third does not"
        );
    }
    // Both partitions: the two batches of the first with data fit, the other's do not.
    let results = fetched(client.call(&fetch_request(
        0,
        u32::MAX,
        u32::MAX,
        "data",
        &[(local, 0), (remote, 0)],
    )));
    let total: usize = results
        .iter()
        .map(|result| result.data.batches.as_ref().unwrap().len())
        .sum();
    assert_eq!(
        total,
        2 * batch_length,
        "cut to fetch_bytes_max over shards"
    );
    // A batch of three times the maximum comes whole.
    let big = (0..8)
        .find(|partition| ![local, remote].contains(partition))
        .unwrap();
    let value = vec![b'b'; 3 * batch_length];
    assert_eq!(client.produce("data", big, batch_of(&[&value])), Ok(0));
    let results = fetched(client.call(&fetch_request(0, u32::MAX, u32::MAX, "data", &[(big, 0)])));
    assert_eq!(fetched_values(&results[0]).len(), 1, "one whole batch");
}

/// `mesh_channel_capacity` at its minimum, 1: two connections, each on one shard,
/// pipeline durable produces to partitions the other shard owns, so hundreds of
/// requests queue for one-slot channels both ways. The full channels hold their
/// senders back; every request is answered and every batch stored, once.
#[test]
fn a_one_slot_mesh_holds_senders_back_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start_with(ServerConfig {
        mesh_channel_capacity: 1,
        ..test_config(dir.path(), 2)
    });
    let mut admin = RawClient::connect(broker.addr());
    admin.create_topic("mesh", 4);
    let owners = owners(&mut admin, "mesh");
    let owned_by = |shard: u16| -> Vec<u32> {
        (0..4u32)
            .filter(|partition| owners[*partition as usize] == shard)
            .collect()
    };
    assert!(
        !owned_by(0).is_empty() && !owned_by(1).is_empty(),
        "{owners:?}"
    );
    let count = 300u64;
    let mut clients: Vec<(RawClient, Vec<u32>)> = (0..2u16)
        .map(|shard| {
            let client = RawClient::connect(broker.shard_addr(usize::from(shard)));
            (client, owned_by(1 - shard))
        })
        .collect();
    for (index, (client, partitions)) in clients.iter_mut().enumerate() {
        let mut frames = BytesMut::new();
        for sequence in 0..count {
            let partition = partitions[sequence as usize % partitions.len()];
            let value = format!("c{index}-{sequence}");
            produce("mesh", partition, batch_of(&[value.as_bytes()])).encode(sequence, &mut frames);
        }
        client.send_bytes(&frames);
    }
    for (client, _) in &mut clients {
        let mut answered = vec![false; count as usize];
        for _ in 0..count {
            let (id, opcode, body) = client.read_frame().expect("every produce is answered");
            let ResponseBody::Produce(response) =
                decode_response(opcode_of(opcode), body).unwrap().unwrap()
            else {
                panic!("not a produce answer")
            };
            response.topics[0].partitions[0]
                .result
                .as_ref()
                .expect("stored");
            assert!(!std::mem::replace(&mut answered[id as usize], true));
        }
    }
    let mut stored: Vec<String> = (0..4)
        .flat_map(|partition| values(&admin.fetch_all("mesh", partition, 0)))
        .collect();
    stored.sort_unstable();
    let mut expected: Vec<String> = (0..2)
        .flat_map(|index| (0..count).map(move |sequence| format!("c{index}-{sequence}")))
        .collect();
    expected.sort_unstable();
    assert_eq!(stored, expected, "each batch stored exactly once");
}

/// The longest absolute path a process may hand the kernel is 4095 bytes; the broker's
/// own files (`direct-io-probe`, 16 bytes with the slash) must still fit beside it.
const DATA_DIR_BYTES: usize = 4_079;

/// A data directory path of exactly `DATA_DIR_BYTES` bytes under `root`, ending with
/// `tail`, made of directory names of at most 200 bytes.
fn long_data_dir(root: &std::path::Path, tail: &str) -> std::path::PathBuf {
    let mut path = root
        .to_str()
        .expect("a UTF-8 temporary directory")
        .to_string();
    loop {
        let room = DATA_DIR_BYTES - path.len();
        if room <= 201 {
            let filler = "d".repeat(room - 1 - tail.len());
            path.push_str(&format!("/{filler}{tail}"));
            break;
        }
        // Never leave less room than "/" and the tail take.
        let take = if room < 206 { 100 } else { 200 };
        path.push_str(&format!("/{}", "d".repeat(take)));
    }
    assert_eq!(path.len(), DATA_DIR_BYTES);
    std::fs::create_dir_all(&path).expect("a long data directory");
    path.into()
}

/// What the broker answers when it cannot remove a leftover directory whose path is too
/// long for the kernel: (the message received, the message it wrote before the cut).
fn storage_error_message(data_dir: std::path::PathBuf) -> (String, String) {
    let broker = TestBroker::start_with(test_config(&data_dir, 1));
    let data_dir = broker.handle.as_ref().unwrap().data_dir.clone();
    assert_eq!(data_dir.as_os_str().len(), DATA_DIR_BYTES);
    let name = "t".repeat(100);
    let error = RawClient::connect(broker.addr())
        .call(&create(&name, 1))
        .expect_err("the topic's path is too long");
    assert_eq!(error.code, ErrorCode::StorageError, "{error}");
    let leftover = data_dir.join("topics").join(&name);
    let written = format!(
        "removing leftover {}: {}",
        leftover.display(),
        std::io::Error::from_raw_os_error(libc::ENAMETOOLONG)
    );
    (error.message, written)
}

/// An error message is cut to 4096 bytes (§3), at a UTF-8 character boundary: a
/// StorageError naming a path of 4187 bytes arrives as exactly its first 4096 bytes, and
/// when byte 4096 falls inside a two-byte character, as its first 4095.
#[test]
fn error_messages_are_cut_at_4096_bytes_on_a_character_boundary() {
    let root = tempfile::tempdir().unwrap();
    let (received, written) = storage_error_message(long_data_dir(&root.path().join("a"), "x"));
    assert!(written.len() > 4_096, "{}", written.len());
    assert_eq!(received.len(), 4_096);
    assert_eq!(received, written[..4_096]);
    // "removing leftover " is 18 bytes: message byte 4096 is the data directory's last.
    let (received, written) = storage_error_message(long_data_dir(&root.path().join("b"), "é"));
    assert!(!written.is_char_boundary(4_096));
    assert_eq!(received.len(), 4_095);
    assert_eq!(received, written[..4_095]);
}

// ---------------------------------------------------------------------------------------
// ServerConfig::validate, every key.

/// Who refuses a value: `validate`, naming a key (the value's own, or the key whose bound
/// it breaks), or the config loader (the value is not of the key's type at all).
#[derive(Debug, Clone, Copy, PartialEq)]
enum By {
    Validate(&'static str),
    Loader,
}

/// One key's edges: values accepted (its minimum and maximum, given `given`) and values
/// refused (one below the minimum, one above the maximum, and the next aligned value
/// where values come in steps).
#[derive(Debug)]
struct Row {
    key: &'static str,
    /// Keys set first: the edges depend on them.
    given: Vec<(&'static str, String)>,
    accepted: Vec<String>,
    /// (value, who refuses it, what `allowed` must mention when validate names this key)
    refused: Vec<(String, By, String)>,
}

/// The largest value the loader reads for `key` ("an integer from 0 to N"); `None` for
/// a key that is not a plain integer.
fn type_max(key: &str) -> Option<u128> {
    let expected = KEYS
        .iter()
        .find(|candidate| candidate.name == key)
        .unwrap_or_else(|| panic!("{key} is not a config key"))
        .expected;
    expected
        .strip_prefix("an integer from 0 to ")
        .and_then(|max| max.parse().ok())
}

impl Row {
    /// From `min` to `max`: below refused by validate naming `key` (or by the loader at
    /// 0), above by validate naming `key` (or by the loader at the type's maximum).
    fn range(key: &'static str, min: u128, max: u128) -> Row {
        let below = if min == 0 {
            ("-1".to_string(), By::Loader, String::new())
        } else {
            ((min - 1).to_string(), By::Validate(key), min.to_string())
        };
        let above = if Some(max) == type_max(key) {
            ((max + 1).to_string(), By::Loader, String::new())
        } else {
            ((max + 1).to_string(), By::Validate(key), max.to_string())
        };
        Row {
            key,
            given: Vec::new(),
            accepted: vec![min.to_string(), max.to_string()],
            refused: vec![below, above],
        }
    }

    /// From `min` to the type's maximum.
    fn at_least(key: &'static str, min: u128) -> Row {
        let max = type_max(key).unwrap_or_else(|| panic!("{key} is not an integer key"));
        Row::range(key, min, max)
    }

    fn given(mut self, given: &[(&'static str, u128)]) -> Row {
        self.given = given
            .iter()
            .map(|(key, value)| (*key, value.to_string()))
            .collect();
        self
    }

    /// The value below the minimum breaks another key's bound, and names that key.
    fn below_names(mut self, key: &'static str) -> Row {
        self.refused[0].1 = By::Validate(key);
        self
    }

    /// The value above the maximum breaks another key's bound, and names that key.
    fn above_names(mut self, key: &'static str) -> Row {
        self.refused[1].1 = By::Validate(key);
        self
    }

    /// What `allowed` says about the maximum when it does not name it.
    fn above_mentions(mut self, mentions: &str) -> Row {
        self.refused[1].2 = mentions.into();
        self
    }

    fn also_refused(mut self, value: u128, by: By, mentions: &str) -> Row {
        self.refused.push((value.to_string(), by, mentions.into()));
        self
    }

    /// A key that is not a number: values accepted and refused (by the loader).
    fn values(key: &'static str, accepted: &[&str], refused: &[&str]) -> Row {
        Row {
            key,
            given: Vec::new(),
            accepted: accepted.iter().map(|value| value.to_string()).collect(),
            refused: refused
                .iter()
                .map(|value| (value.to_string(), By::Loader, String::new()))
                .collect(),
        }
    }
}

/// The edges of every key, with the library's defaults for the keys a row does not set.
fn rows() -> Vec<Row> {
    use Row as R;
    const U32_MAX: u128 = u32::MAX as u128;
    const I64_MAX: u128 = i64::MAX as u128;
    const GIB: u128 = 1 << 30;
    let positive = [
        "listen_backlog",
        "batch_records_max",
        "topics_per_request_max",
        "partitions_per_request_max",
        "partitions_per_topic_max",
        "topics_max",
        "stream_groups_per_partition_max",
        "connections_per_shard_max",
        "connections_max",
        "connection_requests_in_flight_max",
        "connection_idle_timeout_ms",
        "frame_read_timeout_ms",
        "response_write_timeout_ms",
        "list_offsets_scan_bytes_max",
        "fetch_bytes_max",
        "index_interval_bytes",
        "storage_full_retry_ms",
        "retention_check_interval_ms",
        "producers_per_partition_max",
        "producer_snapshot_interval_bytes",
        "queue_receive_messages_max",
        "queue_receive_bytes_max",
        "queue_handles_per_request_max",
        "queue_deliveries_max",
        "queue_journal_records_per_snapshot_max",
        "queue_groups_per_shard_max",
        "metrics_shard_answer_timeout_ms",
        "log_window_ms",
    ];
    // 0 has a meaning: off, none, at once.
    let from_zero = [
        "read_buffers_pooled_per_shard_max",
        "fetch_wait_ms_max",
        "timestamp_future_ms_max",
        "bind_retry_ms",
        "queue_nack_delay_ms_max",
        "queue_delivery_delay_ms_max",
        "queue_message_ttl_ms",
        "queue_nack_reason_bytes_max",
        "log_lines_per_window_max",
    ];
    let mut rows: Vec<Row> = positive.iter().map(|key| R::at_least(key, 1)).collect();
    rows.extend(from_zero.iter().map(|key| R::at_least(key, 0)));
    let aligned = By::Validate;
    rows.extend([
        R::values("data_dir", &["/var/lib/shardq", "relative"], &[""]),
        R::values(
            "listen",
            &["127.0.0.1:0", "[::1]:65535"],
            &["127.0.0.1:65536", "localhost:1"],
        ),
        R::values(
            "cpus",
            &["auto", "0", "8191", "0-3,8191"],
            &["8192", "3-1", ""],
        ),
        R::values(
            "storage_failure_policy",
            &["exit_process", "stop_partition"],
            &["stop"],
        ),
        R::values("recycle_segments", &["true", "false"], &["1", "yes"]),
        R::values("metrics_listen", &["off", "127.0.0.1:0"], &["on"]),
        R::values(
            "queue_expiry_policy",
            &["drop", "dead_letter"],
            &["dead-letter"],
        ),
        R::values("queue_ordering", &["unordered", "per_key"], &["perkey"]),
        // "auto" or 1 to 65535 shards (ids are 16-bit).
        R::range("cores", 1, 65_535),
        R::values("cores", &["auto"], &["many", "-1"]),
        // One largest frame must fit the connection's byte budget (32 MiB by default).
        R::range("frame_body_bytes_max", 1, (32 << 20) - 16)
            .above_names("connection_bytes_in_flight_max"),
        R::at_least("frame_body_bytes_max", 1).given(&[
            ("connection_bytes_in_flight_max", U32_MAX + 16),
            ("shard_bytes_in_flight_max", U32_MAX + 16),
        ]),
        // At least one largest frame (16 MiB + 16), at most the shard's budget (128 MiB).
        R::range("connection_bytes_in_flight_max", (16 << 20) + 16, 128 << 20)
            .above_names("shard_bytes_in_flight_max"),
        R::at_least("connection_bytes_in_flight_max", (16 << 20) + 16)
            .given(&[("shard_bytes_in_flight_max", I64_MAX)]),
        R::at_least("shard_bytes_in_flight_max", 32 << 20),
        // The stop's timeout (30 s) covers the drain and the linger (2 s each).
        R::range("connection_linger_ms", 0, 28_000).above_names("shutdown_timeout_ms"),
        R::at_least("connection_linger_ms", 0)
            .given(&[("shutdown_timeout_ms", U32_MAX), ("shutdown_drain_ms", 0)]),
        R::range("shutdown_drain_ms", 0, 28_000).above_names("shutdown_timeout_ms"),
        R::at_least("shutdown_drain_ms", 0).given(&[
            ("shutdown_timeout_ms", U32_MAX),
            ("connection_linger_ms", 0),
        ]),
        R::at_least("shutdown_timeout_ms", 4_000),
        // Whole blocks, from one chunk (1 MiB) to the last block below 4 GiB.
        R::range("segment_size_bytes", 1 << 20, 4_294_963_200)
            .also_refused((1 << 20) - 4096, aligned("segment_size_bytes"), "1048576")
            .also_refused(4 * GIB, aligned("segment_size_bytes"), "4294963200"),
        // Whole blocks, at least one: the largest is the last block below i64::MAX.
        R::range(
            "segment_preallocate_step_bytes",
            4096,
            I64_MAX / 4096 * 4096,
        )
        .above_mentions("a multiple of 4096")
        .also_refused(0, aligned("segment_preallocate_step_bytes"), "4096")
        .also_refused(I64_MAX / 4096 * 4096 + 4096, By::Loader, ""),
        // Zero-fill ahead of the write position: whole blocks, a chunk of one block to
        // 16 MiB (given a lookahead that holds the largest), a lookahead of 0 (off) or
        // from one chunk (64 KiB) to the largest segment, any rate to 64 GiB/s.
        R::range("segment_zero_fill_chunk_bytes", 4096, 16 << 20)
            .given(&[("segment_zero_fill_lookahead_bytes", 16 << 20)])
            .also_refused(6144, aligned("segment_zero_fill_chunk_bytes"), "4096"),
        R::range("segment_zero_fill_lookahead_bytes", 0, 4_294_963_200)
            .also_refused(4096, aligned("segment_zero_fill_lookahead_bytes"), "65536")
            .also_refused(
                (64 << 10) + 2048,
                aligned("segment_zero_fill_lookahead_bytes"),
                "4096",
            ),
        R::range("segment_zero_fill_bytes_per_second_per_shard", 0, 64 * GIB),
        // O_DSYNC rounds: 0 (off) or whole blocks up to the largest chunk (1 GiB).
        R::range("segment_dsync_write_bytes_max", 0, GIB)
            .also_refused(6144, aligned("segment_dsync_write_bytes_max"), "4096")
            .also_refused(
                GIB + 4096,
                aligned("segment_dsync_write_bytes_max"),
                "1073741824",
            ),
        // Whole blocks, from 2 blocks to 1 GiB (with a budget of 4 of the largest).
        R::range("chunk_size_bytes", 8192, GIB)
            .given(&[("chunk_memory_bytes_per_shard_max", 4 * GIB)])
            .also_refused(4096, aligned("chunk_size_bytes"), "8192")
            .also_refused(GIB + 4096, aligned("chunk_size_bytes"), "1073741824"),
        // From 4 chunks (of 1 MiB) to 256 GiB.
        R::range("chunk_memory_bytes_per_shard_max", 4 << 20, 256 * GIB),
        R::range("mesh_channel_capacity", 1, 1 << 20),
        R::range("spin_before_park_us", 0, 100_000),
        R::range("tail_cache_bytes_per_shard", 0, 1 << 40),
        // The window holds at least the in-flight leases (4096); the lease default
        // (30 s) is at most the longest lease; retry delays do not run backwards.
        R::at_least("queue_window_messages_max", 4096).below_names("queue_in_flight_messages_max"),
        R::range("queue_in_flight_messages_max", 1, 8192),
        R::at_least("queue_visibility_timeout_ms_max", 30_000)
            .below_names("queue_visibility_timeout_ms_default"),
        R::range("queue_visibility_timeout_ms_default", 1, 43_200_000),
        R::at_least("queue_retry_delay_ms_max", 1_000).below_names("queue_retry_delay_ms_min"),
        R::range("queue_retry_delay_ms_min", 0, 300_000),
        R::at_least("queue_retry_delay_multiplier_percent", 100),
        R::range("queue_retry_jitter_percent", 0, 100),
    ]);
    rows
}

/// The config as `shardq serve` would read it from `--set key=value` flags.
fn set(layered: &mut Layered, key: &str, value: &str) -> Result<(), LoadError> {
    let key = KEYS
        .iter()
        .find(|candidate| candidate.name == key)
        .unwrap_or_else(|| panic!("{key} is not a config key"));
    layered.apply_set(&format!("{}={value}", key.dotted()))
}

#[test]
fn every_config_key_is_accepted_at_its_edges_and_refused_one_past_them() {
    let rows = rows();
    // A key without a row fails here, and so does a row for a key that is gone.
    for key in KEYS {
        assert!(
            rows.iter().any(|row| row.key == key.name),
            "config key {} has no row in rows(): add its edges",
            key.name
        );
    }
    for row in &rows {
        assert!(
            KEYS.iter().any(|key| key.name == row.key),
            "{} is not a config key",
            row.key
        );
        assert!(
            !row.accepted.is_empty() && !row.refused.is_empty(),
            "{row:?}"
        );
    }
    assert!(ServerConfig::default().validate().is_ok());
    for row in &rows {
        let base = || {
            let mut layered = Layered::new(ServerConfig::default());
            for (key, value) in &row.given {
                set(&mut layered, key, value).unwrap();
            }
            layered
        };
        for value in &row.accepted {
            let mut layered = base();
            set(&mut layered, row.key, value)
                .unwrap_or_else(|error| panic!("{} = {value}: {error}", row.key));
            if let Err(error) = layered.config.validate() {
                panic!(
                    "{} = {value} (given {:?}) is refused: {error}",
                    row.key, row.given
                );
            }
        }
        for (value, by, mentions) in &row.refused {
            let mut layered = base();
            let loaded = set(&mut layered, row.key, value);
            match by {
                By::Loader => match loaded {
                    Err(LoadError::Value { key, .. }) => {
                        assert!(key.ends_with(row.key), "{} = {value}: names {key}", row.key)
                    }
                    other => panic!("{} = {value:?} is read: {other:?}", row.key),
                },
                By::Validate(named) => {
                    loaded.unwrap_or_else(|error| panic!("{} = {value}: {error}", row.key));
                    let error = layered.config.validate().expect_err(&format!(
                        "{} = {value} (given {:?}) is accepted",
                        row.key, row.given
                    ));
                    assert_eq!(error.key, *named, "{} = {value}: {error}", row.key);
                    if *named == row.key {
                        assert_eq!(&error.value, value, "{error}");
                        assert!(error.allowed.contains(mentions.as_str()), "{error}");
                    }
                }
            }
        }
    }
}
