//! Every error code of docs/protocol.md §6 reached through a real socket, one test per
//! code or small group, named after it (issue 14). Requests go out as raw frames
//! (`common::RawClient`, hand-built bytes where the encoder would refuse to make them), so
//! no client library can hide what the broker sent: each test checks the code, and that
//! the connection stays open (the next request on it is answered) or is closed (the
//! broker ends the stream; a silent open connection does not count) exactly as §6 and §7
//! say.
//!
//! Cases covered elsewhere and not repeated here: unsupported_version, unknown_opcode,
//! corrupt_batch, frame_too_large far past its limit, a lying record count and a
//! truncated body (bad_input.rs); frame_too_large one byte past `frame_body_bytes_max`,
//! and the other limits' edges (limits.rs; the batch limits' refusal messages are here); invalid_topic_name for
//! 65,535-byte names and the ListOffsets scan limit of one lookup (hostile_clients.rs);
//! invalid_timestamp (bad_input.rs); out_of_order_sequence (idempotent_produce.rs);
//! storage_full (disk_faults.rs); the queue codes 22 to 26 (queue_groups.rs,
//! stream_groups.rs); shutting_down (graceful_stop.rs, shutdown_drain.rs).
//! `internal` has no way in from a socket (it is a broker bug): it is the unit test
//! `shard::tests::log_answers_internal_for_a_partition_another_shard_owns`.
mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
#[cfg(debug_assertions)]
use common::process::Serve;
use common::*;
use shardq::config::ServerConfig;
use shardq::protocol::*;

/// `PARTITION_DIRECTORY_GATE` is one per process: while the test that closes it runs, no
/// other test of this file may create a topic, or it would wait at the gate too. That
/// test takes this lock for writing, every other one for reading.
static GATE: RwLock<()> = RwLock::new(());

fn shared_gate() -> RwLockReadGuard<'static, ()> {
    GATE.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn exclusive_gate() -> RwLockWriteGuard<'static, ()> {
    GATE.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One frame built by hand: the header's fields as given, then `body`.
fn frame(opcode: u8, flags: u16, correlation_id: u64, body: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    out.put_u32_le(u32::try_from(body.len()).expect("a test body fits u32"));
    out.put_u8(PROTOCOL_VERSION);
    out.put_u8(opcode);
    out.put_u16_le(flags);
    out.put_u64_le(correlation_id);
    out.put_slice(body);
    out.to_vec()
}

/// The body of `request` as the crate's encoder writes it.
fn body_of(request: &Request) -> Vec<u8> {
    let mut out = BytesMut::new();
    request.encode(0, &mut out);
    out[FRAME_HEADER_SIZE..].to_vec()
}

/// Reads the next frame: it must answer `correlation_id`, carrying `opcode`, with an
/// error status (the whole request refused).
fn error_answer(client: &mut RawClient, correlation_id: u64, opcode: Opcode) -> WireError {
    let (id, raw_opcode, body) = client
        .read_frame()
        .expect("an error response, before any close");
    assert_eq!(id, correlation_id, "the error answers the request sent");
    assert_eq!(
        raw_opcode, opcode as u8,
        "the error carries the request's opcode"
    );
    decode_response(opcode, body)
        .expect("the error response decodes")
        .expect_err("an error status")
}

/// Sends a hand-built frame and returns the whole-request error it is answered with.
fn refused(client: &mut RawClient, opcode: Opcode, flags: u16, body: &[u8]) -> WireError {
    const ID: u64 = 0x5eed;
    client.send_bytes(&frame(opcode as u8, flags, ID, body));
    error_answer(client, ID, opcode)
}

/// §7 "Closed": after the error the broker ends the stream (it sends nothing more).
fn assert_closed(client: &mut RawClient, what: &str) {
    assert!(
        client.is_closed_by_peer(),
        "{what}: the broker must close the connection after the error"
    );
}

/// §7 "Stays open": the same connection, still in sync, answers the next request.
fn assert_open(client: &mut RawClient, what: &str) {
    let id = client.send(&Request::Metadata(MetadataRequest { topics: Vec::new() }));
    let Some((answered, _, body)) = client.read_frame() else {
        panic!("{what}: the connection must stay open, but the broker closed it");
    };
    assert_eq!(
        answered, id,
        "{what}: the next answer is the next request's"
    );
    let answer = decode_response(Opcode::Metadata, body).expect("decodes");
    assert!(
        matches!(answer, Ok(ResponseBody::Metadata(_))),
        "{what}: a Metadata request after the error is answered, not {answer:?}"
    );
}

fn create(client: &mut RawClient, name: &str, partitions: u32) -> Result<(), WireError> {
    client
        .call(&Request::CreateTopic(CreateTopicRequest {
            name: name.into(),
            partitions,
            retention: Default::default(),
            queue: Default::default(),
        }))
        .map(|_| ())
}

fn delete(client: &mut RawClient, name: &str) -> Result<(), WireError> {
    client
        .call(&Request::DeleteTopic(DeleteTopicRequest {
            name: name.into(),
        }))
        .map(|_| ())
}

/// The per-partition results of a ListOffsets of `topic`, one entry per
/// (partition, timestamp) in `entries`.
fn list_offsets(
    client: &mut RawClient,
    topic: &str,
    entries: &[(u32, i64)],
) -> Vec<Result<PartitionOffsets, WireError>> {
    let response = client
        .call(&Request::ListOffsets(ListOffsetsRequest {
            topics: vec![ListOffsetsTopic {
                name: topic.into(),
                partitions: entries
                    .iter()
                    .map(|&(partition, timestamp_ms)| ListOffsetsPartition {
                        partition,
                        timestamp_ms,
                    })
                    .collect(),
            }],
        }))
        .expect("ListOffsets answers per partition");
    let ResponseBody::ListOffsets(response) = response else {
        panic!("ListOffsets answered with {response:?}")
    };
    response.topics[0]
        .partitions
        .iter()
        .map(|entry| entry.result.clone())
        .collect()
}

/// One partition's answer to a fetch without waiting.
fn fetch_one(
    client: &mut RawClient,
    topic: &str,
    partition: u32,
    offset: u64,
) -> FetchPartitionData {
    let response = client
        .call(&fetch_request(
            0,
            1 << 20,
            1 << 20,
            topic,
            &[(partition, offset)],
        ))
        .expect("Fetch answers per partition");
    let ResponseBody::Fetch(response) = response else {
        panic!("Fetch answered with {response:?}")
    };
    response.topics[0].partitions[0].data.clone()
}

/// Code 9, invalid_partition_count: CreateTopic with 0 partitions or more than
/// `partitions_per_topic_max` is refused and creates nothing; exactly the maximum is a
/// topic. The connection stays open.
#[test]
fn invalid_partition_count_for_zero_and_past_the_maximum() {
    let _gate = shared_gate();
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start_with(ServerConfig {
        partitions_per_topic_max: 6,
        ..test_config(dir.path(), 2)
    });
    let mut client = RawClient::connect(broker.addr());
    for (name, partitions) in [("zero", 0), ("seven", 7), ("huge", u32::MAX)] {
        let error = create(&mut client, name, partitions).expect_err("refused");
        assert_eq!(
            error.code,
            ErrorCode::InvalidPartitionCount,
            "{partitions} partitions: {error}"
        );
        assert!(
            error.message.contains("partitions_per_topic_max") && error.message.contains('6'),
            "the message names the limit: {error}"
        );
        assert_open(&mut client, &format!("{partitions} partitions"));
        assert!(
            !broker.data_dir.join("topics").join(name).exists(),
            "a refused topic leaves no directory"
        );
    }
    create(&mut client, "six", 6).expect("the maximum itself is a topic");
    let response = client
        .call(&Request::Metadata(MetadataRequest {
            topics: vec!["six".into(), "zero".into()],
        }))
        .expect("metadata");
    let ResponseBody::Metadata(response) = response else {
        panic!("{response:?}")
    };
    assert_eq!(response.topics[0].partitions.len(), 6);
    assert_eq!(
        response.topics[1].error.as_ref().map(|error| error.code),
        Some(ErrorCode::UnknownTopic),
        "nothing of the refused topic exists"
    );
}

/// Code 16, limit_exceeded, for `topics_max`: the broker holds at most that many topics;
/// one more is refused (the connection stays open), and deleting one frees its slot.
#[test]
fn limit_exceeded_when_topics_max_topics_exist() {
    let _gate = shared_gate();
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start_with(ServerConfig {
        topics_max: 3,
        ..test_config(dir.path(), 2)
    });
    let mut client = RawClient::connect(broker.addr());
    for name in ["one", "two", "three"] {
        create(&mut client, name, 2).expect("within topics_max");
    }
    let error = create(&mut client, "four", 1).expect_err("past topics_max");
    assert_eq!(error.code, ErrorCode::LimitExceeded, "{error}");
    assert!(error.message.contains("topics_max"), "{error}");
    assert_open(&mut client, "topics_max");
    delete(&mut client, "two").expect("deleted");
    create(&mut client, "four", 1).expect("a deleted topic's slot is free again");
    let error = create(&mut client, "five", 1).expect_err("full again");
    assert_eq!(error.code, ErrorCode::LimitExceeded, "{error}");
}

/// A batch whose header claims a time later than its record's (protocol.md §5.8: lookups
/// by time trust `max_timestamp_ms`), so a lookup for `now` must decode it.
fn batch_overstating_its_time(now_ms: i64, value: &[u8]) -> bytes::Bytes {
    let mut builder = batch::BatchBuilder::new(BytesMut::new());
    builder.push(now_ms - 3_600_000, None, value, &[]);
    let mut bytes = builder.finish().to_vec();
    bytes[40..48].copy_from_slice(&(now_ms + 1_000).to_le_bytes());
    let crc = batch::compute_crc(&bytes);
    bytes[20..24].copy_from_slice(&crc.to_le_bytes());
    bytes.into()
}

/// Code 16, limit_exceeded, for the ListOffsets scan limit: the bytes are shared by the
/// lookups by time of one request on a shard. A lookup that fits alone (about 40 KiB of a
/// 64 KiB limit) succeeds; listed twice in one request, the second gets LimitExceeded
/// once the first has spent the bytes, while lookups by -1/-2 beside it still answer.
/// (One lookup past the limit by itself: `hostile_clients::a_lookup_by_time_does_bounded_work`.)
#[test]
fn limit_exceeded_when_a_request_has_spent_its_list_offsets_scan_bytes() {
    let _gate = shared_gate();
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start_with(ServerConfig {
        list_offsets_scan_bytes_max: 64 << 10,
        ..test_config(dir.path(), 1)
    });
    let mut client = RawClient::connect(broker.addr());
    client.create_topic("times", 1);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let value = vec![7u8; 4 << 10];
    for expected in 0..10u64 {
        assert_eq!(
            client.produce("times", 0, batch_overstating_its_time(now, &value)),
            Ok(expected)
        );
    }
    // Alone, the lookup decodes all ten batches (no record is that late): the watermark.
    let alone = list_offsets(&mut client, "times", &[(0, now)]);
    assert_eq!(alone[0].as_ref().map(|found| found.offset), Ok(10));
    let twice = list_offsets(
        &mut client,
        "times",
        &[
            (0, now),
            (0, TIMESTAMP_EARLIEST),
            (0, now),
            (0, TIMESTAMP_LATEST),
        ],
    );
    assert_eq!(twice[0].as_ref().map(|found| found.offset), Ok(10));
    assert_eq!(twice[1].as_ref().map(|found| found.offset), Ok(0));
    let error = twice[2]
        .as_ref()
        .expect_err("the request's bytes are spent");
    assert_eq!(error.code, ErrorCode::LimitExceeded, "{error}");
    assert!(
        error.message.contains("list_offsets_scan_bytes_max"),
        "{error}"
    );
    assert_eq!(twice[3].as_ref().map(|found| found.offset), Ok(10));
    assert_open(&mut client, "list_offsets_scan_bytes_max");
}

/// Code 17, invalid_request, for a frame with the response flag set: a client sends
/// requests, not responses. Refused with the request's id and opcode, and closed.
#[test]
fn invalid_request_for_a_frame_with_the_response_flag_closes_the_connection() {
    let _gate = shared_gate();
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 1);
    let mut client = RawClient::connect(broker.addr());
    let body = body_of(&Request::Metadata(MetadataRequest { topics: Vec::new() }));
    let error = refused(&mut client, Opcode::Metadata, FLAG_RESPONSE, &body);
    assert_eq!(error.code, ErrorCode::InvalidRequest, "{error}");
    assert_closed(&mut client, "response flag");
    // Only that client: the broker serves a new connection.
    assert_open(&mut RawClient::connect(broker.addr()), "a new connection");
}

/// Code 17, invalid_request, for a ListOffsets timestamp below 0 other than -1 and -2:
/// refused per partition, the entries beside it answered, the connection open.
#[test]
fn invalid_request_for_a_list_offsets_timestamp_below_minus_two() {
    let _gate = shared_gate();
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 1);
    let mut client = RawClient::connect(broker.addr());
    client.create_topic("times", 1);
    assert_eq!(client.produce("times", 0, batch_of(&[b"x"])), Ok(0));
    let results = list_offsets(
        &mut client,
        "times",
        &[
            (0, TIMESTAMP_EARLIEST),
            (0, -3),
            (0, TIMESTAMP_LATEST),
            (0, i64::MIN),
            (0, 0),
        ],
    );
    assert_eq!(results[0].as_ref().map(|found| found.offset), Ok(0));
    for index in [1, 3] {
        let error = results[index].as_ref().expect_err("not a time");
        assert_eq!(
            error.code,
            ErrorCode::InvalidRequest,
            "entry {index}: {error}"
        );
    }
    assert_eq!(results[2].as_ref().map(|found| found.offset), Ok(1));
    assert_eq!(results[4].as_ref().map(|found| found.offset), Ok(0));
    assert_open(&mut client, "timestamp -3");
}

/// Code 17, invalid_request, for DeleteTopic and AlterTopic of a topic being created
/// (and code 7, topic_already_exists, for a second CreateTopic of it): the creation is
/// held inside its partition directories' creation (a debug-build gate), the three
/// requests are refused on an open connection, and the creation completes once the gate
/// opens.
#[cfg(debug_assertions)]
#[test]
fn invalid_request_for_delete_or_alter_of_a_topic_being_created() {
    let _gate = exclusive_gate();
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 1);
    let gate = &shardq::test_hooks::PARTITION_DIRECTORY_GATE;
    /// Opens the gate however the test ends: a shard held at it would hold the broker's
    /// shutdown too.
    struct OpenOnDrop;
    impl Drop for OpenOnDrop {
        fn drop(&mut self) {
            shardq::test_hooks::PARTITION_DIRECTORY_GATE.open();
        }
    }
    let _open_on_drop = OpenOnDrop;
    gate.close();
    let creator = {
        let addr = broker.addr();
        std::thread::spawn(move || create(&mut RawClient::connect(addr), "held", 2))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while gate.waiting() == 0 {
        assert!(
            Instant::now() < deadline,
            "the creation never reached the gate"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut client = RawClient::connect(broker.addr());
    let error = delete(&mut client, "held").expect_err("being created");
    assert_eq!(error.code, ErrorCode::InvalidRequest, "{error}");
    assert_open(&mut client, "delete of a topic being created");
    let error = client
        .call(&Request::AlterTopic(AlterTopicRequest {
            name: "held".into(),
            retention: Some(Retention {
                bytes_max: 1 << 20,
                ms_max: 0,
            }),
            queue: Default::default(),
        }))
        .expect_err("being created");
    assert_eq!(error.code, ErrorCode::InvalidRequest, "{error}");
    let error = create(&mut client, "held", 2).expect_err("being created");
    assert_eq!(error.code, ErrorCode::TopicAlreadyExists, "{error}");
    assert_open(&mut client, "requests on a topic being created");
    assert!(!creator.is_finished(), "the creation was held throughout");
    gate.open();
    creator
        .join()
        .expect("the creator thread")
        .expect("the creation completes once the gate opens");
    assert_eq!(client.produce("held", 1, batch_of(&[b"x"])), Ok(0));
    delete(&mut client, "held").expect("a topic no longer being created can be deleted");
}

/// Reads the answer to long-poll `id` on `client`: one entry per partition asked.
fn long_poll_answer(client: &mut RawClient, id: u64) -> Vec<FetchPartitionResult> {
    // Well within RawClient's 30 s read timeout, while the long-poll asked for 600 s:
    // only a wake-up answers it in time.
    let (answered, _, body) = client
        .read_frame()
        .expect("the long-poll is answered once its topic is deleted");
    assert_eq!(answered, id);
    let response = decode_response(Opcode::Fetch, body)
        .expect("decodes")
        .expect("answered per partition");
    let ResponseBody::Fetch(response) = response else {
        panic!("{response:?}")
    };
    response.topics[0].partitions.clone()
}

/// Code 5, unknown_topic, for a topic deleted while a fetch long-poll on it is in flight:
/// the long-polls (far longer than the test's read timeout) are woken by the delete. One
/// on a partition of one shard answers unknown_topic. One on partitions of both shards
/// is answered as soon as the first owner reports the topic gone (protocol.md §5.6):
/// that partition says unknown_topic, and the other owner, asked again at once, may not
/// have removed the topic yet (it answers empty then, never with data or another error).
/// Once the delete is answered, every partition says unknown_topic.
#[test]
fn unknown_topic_for_a_long_poll_whose_topic_is_deleted() {
    let _gate = shared_gate();
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start_with(ServerConfig {
        fetch_wait_ms_max: 600_000,
        ..test_config(dir.path(), 2)
    });
    let mut admin = RawClient::connect(broker.addr());
    admin.create_topic("doomed", 2);
    assert_ne!(
        shardq::placement::shard_for("doomed", 0, 2),
        shardq::placement::shard_for("doomed", 1, 2),
        "the partitions live on both shards"
    );
    let mut alone = RawClient::connect(broker.shard_addr(0));
    let alone_id = alone.send(&fetch_request(
        600_000,
        1 << 20,
        1 << 20,
        "doomed",
        &[(0, 0)],
    ));
    let mut both = RawClient::connect(broker.shard_addr(1));
    let both_id = both.send(&fetch_request(
        600_000,
        1 << 20,
        1 << 20,
        "doomed",
        &[(0, 0), (1, 0)],
    ));
    // Both fetches are read and waiting once the broker counts them in flight, beside
    // the Stats request asking.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stats = admin
            .call(&Request::Stats(StatsRequest { topics: Vec::new() }))
            .expect("stats");
        let ResponseBody::Stats(stats) = stats else {
            panic!("{stats:?}")
        };
        let in_flight: u32 = stats
            .shards
            .iter()
            .map(|shard| shard.requests_in_flight)
            .sum();
        if in_flight >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "the fetches never arrived");
        std::thread::sleep(Duration::from_millis(10));
    }
    delete(&mut admin, "doomed").expect("deleted");

    let answer = long_poll_answer(&mut alone, alone_id);
    let error = answer[0]
        .data
        .batches
        .as_ref()
        .expect_err("the topic is gone");
    assert_eq!(error.code, ErrorCode::UnknownTopic, "{error}");

    let answer = long_poll_answer(&mut both, both_id);
    assert_eq!(answer.len(), 2);
    let mut gone = 0;
    for entry in &answer {
        match &entry.data.batches {
            Err(error) => {
                assert_eq!(
                    error.code,
                    ErrorCode::UnknownTopic,
                    "partition {}: {error}",
                    entry.partition
                );
                gone += 1;
            }
            Ok(batches) => assert!(
                batches.is_empty(),
                "partition {}: nothing was produced",
                entry.partition
            ),
        }
    }
    assert!(
        gone >= 1,
        "the owner that reported first said unknown_topic: {answer:?}"
    );

    for client in [&mut alone, &mut both] {
        assert_open(client, "a long-poll of a deleted topic");
        let response = client
            .call(&fetch_request(
                600_000,
                1 << 20,
                1 << 20,
                "doomed",
                &[(0, 0), (1, 0)],
            ))
            .expect("answered per partition");
        let ResponseBody::Fetch(response) = response else {
            panic!("{response:?}")
        };
        for entry in &response.topics[0].partitions {
            let error = entry.data.batches.as_ref().expect_err("deleted");
            assert_eq!(error.code, ErrorCode::UnknownTopic, "{error}");
        }
    }
}

/// Code 1, malformed_frame: invalid UTF-8 in a string, an `acks` value other than 0, 1 or
/// 2, a list count above its limit, a list count the bytes left cannot hold, and a
/// partition total over the topics of a request above its limit. Each closes its own
/// connection after the error; at each limit itself the request is served. Invalid UTF-8
/// in a topic name is an invalid topic name instead (code 8, §1): the frame was well
/// delimited, so that connection stays open.
#[test]
fn malformed_frame_closes_the_connection() {
    let _gate = shared_gate();
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start_with(ServerConfig {
        topics_per_request_max: 4,
        partitions_per_request_max: 4,
        ..test_config(dir.path(), 2)
    });
    let mut admin = RawClient::connect(broker.addr());
    for name in ["a", "b", "c", "d", "e"] {
        admin.create_topic(name, 1);
    }
    let malformed = |opcode: Opcode, body: &[u8], what: &str| -> WireError {
        let mut client = RawClient::connect(broker.addr());
        let error = refused(&mut client, opcode, 0, body);
        assert_eq!(error.code, ErrorCode::MalformedFrame, "{what}: {error}");
        assert_closed(&mut client, what);
        error
    };

    // A string that is not UTF-8 (a Handshake's client name).
    let error = malformed(Opcode::Handshake, &[2, 0, 0xff, 0xfe], "invalid UTF-8");
    assert!(error.message.contains("UTF-8"), "{error}");

    // acks 3 and 255 (0, 1 and 2 are the values).
    let produce = |acks: Acks| {
        Request::Produce(ProduceRequest {
            acks,
            timeout_ms: 0,
            topics: vec![ProduceTopic {
                name: "a".into(),
                partitions: vec![ProducePartition {
                    partition: 0,
                    batch: batch_of(&[b"acks"]),
                }],
            }],
        })
    };
    let mut body = body_of(&produce(Acks::Durable));
    for acks in [3u8, 255] {
        body[0] = acks;
        let error = malformed(Opcode::Produce, &body, &format!("acks {acks}"));
        assert!(error.message.contains("acks"), "{error}");
    }
    assert_eq!(
        admin.produce("a", 0, batch_of(&[b"stored"])),
        Ok(0),
        "no refused produce stored anything"
    );

    // Metadata naming 5 topics, one past topics_per_request_max; 4 are answered.
    let names = |count: usize| -> Vec<String> {
        ["a", "b", "c", "d", "e"][..count]
            .iter()
            .map(|name| name.to_string())
            .collect()
    };
    let over = body_of(&Request::Metadata(MetadataRequest { topics: names(5) }));
    let error = malformed(Opcode::Metadata, &over, "5 topics");
    assert!(error.message.contains("at most 4"), "{error}");
    let at = admin
        .call(&Request::Metadata(MetadataRequest { topics: names(4) }))
        .expect("4 topics is the limit, not past it");
    let ResponseBody::Metadata(at) = at else {
        panic!("{at:?}")
    };
    assert_eq!(at.topics.len(), 4);

    // A count within the limit that the bytes do not back: 3 names announced, 1 sent.
    let mut short = BytesMut::new();
    short.put_u32_le(3);
    short.put_u16_le(1);
    short.put_u8(b'a');
    let error = malformed(Opcode::Metadata, &short, "3 names in the bytes of 1");
    assert!(error.message.contains("topics"), "{error}");

    // Partitions over two topics of one Fetch, 3 + 2, past partitions_per_request_max 4
    // (each list within it); 3 + 1 are served.
    let fetch = |second: usize| {
        Request::Fetch(FetchRequest {
            wait_ms_max: 0,
            bytes_max: 1 << 20,
            topics: vec![
                FetchTopic {
                    name: "a".into(),
                    partitions: vec![
                        FetchPartition {
                            partition: 0,
                            offset: 0,
                            bytes_max: 1024,
                        };
                        3
                    ],
                },
                FetchTopic {
                    name: "b".into(),
                    partitions: vec![
                        FetchPartition {
                            partition: 0,
                            offset: 0,
                            bytes_max: 1024,
                        };
                        second
                    ],
                },
            ],
        })
    };
    malformed(Opcode::Fetch, &body_of(&fetch(2)), "5 partitions in all");
    assert!(
        matches!(admin.call(&fetch(1)), Ok(ResponseBody::Fetch(_))),
        "4 partitions in all is the limit, not past it"
    );

    // Invalid UTF-8 in a topic name: InvalidTopicName, and the connection stays open.
    let mut name = BytesMut::new();
    name.put_u32_le(1);
    name.put_u16_le(2);
    name.put_slice(&[0xc3, 0x28]);
    let mut client = RawClient::connect(broker.addr());
    let error = refused(&mut client, Opcode::Metadata, 0, &name);
    assert_eq!(error.code, ErrorCode::InvalidTopicName, "{error}");
    assert_open(&mut client, "a topic name that is not UTF-8");
}

/// Code 13, storage_error, for topic files that cannot be written: a regular file sits
/// where the topic's directory goes (what an interrupted delete leaves is a directory,
/// which the broker clears; a file it cannot). The create is refused on an open
/// connection, the broker keeps serving (this is not a log write: no exit), and once the
/// file is gone the same create succeeds.
#[test]
fn storage_error_when_a_topic_directory_cannot_be_made() {
    let _gate = shared_gate();
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let mut client = RawClient::connect(broker.addr());
    client.create_topic("neighbour", 2);
    let squatter = broker.data_dir.join("topics").join("blocked");
    std::fs::write(&squatter, b"not a directory").unwrap();
    let error = create(&mut client, "blocked", 2).expect_err("cannot be made");
    assert_eq!(error.code, ErrorCode::StorageError, "{error}");
    assert_open(&mut client, "storage_error on create");
    assert_eq!(
        client.produce("neighbour", 1, batch_of(&[b"still served"])),
        Ok(0)
    );
    std::fs::remove_file(&squatter).unwrap();
    create(&mut client, "blocked", 2).expect("created once the file is gone");
    assert_eq!(client.produce("blocked", 0, batch_of(&[b"x"])), Ok(0));
}

/// Code 13, storage_error, for a fetch that meets damaged data on disk after a restart
/// (protocol.md §5.6): a byte of the second batch's value is changed while the broker is
/// down, where recovery does not look (before the segment's last index entry). A fetch
/// from offset 0 gets the first batch without an error; fetches at or past the damaged
/// batch get StorageError, again on a second try; the connection stays open and the
/// broker keeps serving the partition's other reads and other partitions.
#[test]
fn storage_error_for_a_fetch_that_meets_damaged_data_after_a_restart() {
    let _gate = shared_gate();
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        index_interval_bytes: 4096,
        ..test_config(dir.path(), 1)
    };
    let mut broker = TestBroker::start_with(config.clone());
    let mut client = RawClient::connect(broker.addr());
    client.create_topic("damaged", 2);
    let batches = 8u64;
    for offset in 0..batches {
        let value = vec![b'a' + offset as u8; 8 << 10];
        assert_eq!(
            client.produce("damaged", 0, batch_of(&[&value])),
            Ok(offset)
        );
    }
    assert_eq!(client.produce("damaged", 1, batch_of(&[b"other"])), Ok(0));
    drop(client);
    broker.stop();

    let segment = broker
        .data_dir
        .join("topics/damaged/0/00000000000000000000.log");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&segment)
        .unwrap();
    let mut length = [0u8; 4];
    file.seek(SeekFrom::Start(16)).unwrap();
    file.read_exact(&mut length).unwrap();
    let first_batch_bytes = u64::from(u32::from_le_bytes(length));
    // In the second batch's value: past its 64-byte header and the record's 20 bytes of
    // fields before the value (lengths, deltas, no key).
    let position = first_batch_bytes + 64 + 20 + 100;
    let mut byte = [0u8; 1];
    file.seek(SeekFrom::Start(position)).unwrap();
    file.read_exact(&mut byte).unwrap();
    assert_eq!(
        byte[0], b'b',
        "the second batch's value is where the test looks"
    );
    file.seek(SeekFrom::Start(position)).unwrap();
    file.write_all(b"B").unwrap();
    file.sync_all().unwrap();
    drop(file);

    let broker = TestBroker::start_with(config);
    let mut client = RawClient::connect(broker.addr());
    let head = fetch_one(&mut client, "damaged", 0, 0);
    assert_eq!(
        head.high_watermark, batches,
        "recovery kept every batch: the damage is for reads to find"
    );
    let mut records = Vec::new();
    let batches_read = head.batches.expect("the batch before the damage is served");
    batch::decode_records(&batches_read, 0, &mut records).expect("it passes its CRC");
    assert_eq!(records.len(), 1, "the read stops before the damaged batch");
    assert_eq!(records[0].value[0], b'a');
    for offset in [1, 1, batches - 1] {
        let data = fetch_one(&mut client, "damaged", 0, offset);
        let error = data.batches.expect_err("damaged data is never sent");
        assert_eq!(
            error.code,
            ErrorCode::StorageError,
            "offset {offset}: {error}"
        );
        assert_eq!(
            (data.log_start_offset, data.high_watermark),
            (0, batches),
            "the offsets come with the error"
        );
    }
    assert_open(&mut client, "storage_error on fetch");
    assert_eq!(values(&client.fetch_all("damaged", 1, 0)), vec!["other"]);
    assert_eq!(
        fetch_one(&mut client, "damaged", 0, 0)
            .batches
            .map(|bytes| bytes.len() as u64),
        Ok(first_batch_bytes),
        "reads before the damage are still served"
    );
}

/// Code 14, timeout: an `acks = durable` produce whose batch is not durable within its
/// `timeout_ms` (every fdatasync held back by a debug-build fault point,
/// `SHARDQ_TEST_FDATASYNC_DELAY_MS`). The entry gets Timeout saying it may still become
/// durable, the connection stays open, and the batch is appended: once the delayed
/// fdatasync completes a consumer reads it.
#[cfg(debug_assertions)]
#[test]
fn timeout_when_a_durable_produce_is_not_durable_in_time() {
    let _gate = shared_gate();
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Serve::start_with_env(
        &dir.path().join("data"),
        "127.0.0.1:0",
        &["--cores", "1"],
        &[("SHARDQ_TEST_FDATASYNC_DELAY_MS", "4000")],
    );
    let address = serve.wait_serving();
    let mut client = RawClient::connect(address);
    client.create_topic("slow", 1);
    let response = client
        .call(&Request::Produce(ProduceRequest {
            acks: Acks::Durable,
            timeout_ms: 100,
            topics: vec![ProduceTopic {
                name: "slow".into(),
                partitions: vec![ProducePartition {
                    partition: 0,
                    batch: batch_of(&[b"late"]),
                }],
            }],
        }))
        .expect("answered per partition");
    let ResponseBody::Produce(response) = response else {
        panic!("{response:?}")
    };
    let error = response.topics[0].partitions[0]
        .result
        .as_ref()
        .expect_err("not durable within 100 ms");
    assert_eq!(error.code, ErrorCode::Timeout, "{error}");
    assert!(
        error.message.contains("may still become durable"),
        "{error}"
    );
    assert_open(&mut client, "timeout");
    // Appended: a long-poll sees it once the held fdatasync completes.
    let id = client.send(&fetch_request(20_000, 1 << 20, 1 << 20, "slow", &[(0, 0)]));
    let (answered, _, body) = client.read_frame().expect("the fetch is answered");
    assert_eq!(answered, id);
    let Ok(ResponseBody::Fetch(fetched)) = decode_response(Opcode::Fetch, body).expect("decodes")
    else {
        panic!("the fetch succeeds")
    };
    let batches = fetched.topics[0].partitions[0]
        .data
        .batches
        .clone()
        .expect("readable");
    let mut records = Vec::new();
    batch::decode_records(&batches, 0, &mut records).expect("valid");
    assert_eq!(
        values(&records),
        vec!["late"],
        "the timed-out batch became durable"
    );
    serve.kill9();
}

/// Code 11, invalid_batch, at the broker's two batch limits: `batch_records_max` records
/// and `chunk_size_bytes − 4096` bytes are stored; one record or one byte more is
/// refused for that entry only, stores nothing, and the connection stays open.
#[test]
fn invalid_batch_one_past_batch_records_max_and_the_batch_size_limit() {
    let _gate = shared_gate();
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        batch_records_max: 3,
        ..test_config(dir.path(), 1)
    };
    let batch_bytes_max = config.chunk_size_bytes - 4096;
    let broker = TestBroker::start_with(config);
    let mut client = RawClient::connect(broker.addr());
    client.create_topic("limits", 1);
    let error = client
        .produce("limits", 0, batch_of(&[b"1", b"2", b"3", b"4"]))
        .expect_err("4 records, past batch_records_max");
    assert_eq!(error.code, ErrorCode::InvalidBatch, "{error}");
    assert_eq!(
        client.produce("limits", 0, batch_of(&[b"1", b"2", b"3"])),
        Ok(0),
        "3 records is the limit, and the refused batch took no offsets"
    );
    // One record without key or headers: 64 bytes of batch header, 22 of record fields.
    let sized = |bytes: usize| batch_of(&[&vec![b's'; bytes - 64 - 22]]);
    assert_eq!(sized(batch_bytes_max).len(), batch_bytes_max);
    let error = client
        .produce("limits", 0, sized(batch_bytes_max + 1))
        .expect_err("one byte past the batch size limit");
    assert_eq!(error.code, ErrorCode::InvalidBatch, "{error}");
    // Refused by the receiving shard (§5.5), naming the limit and the key behind it.
    assert!(
        error.message.contains(&batch_bytes_max.to_string())
            && error.message.contains("chunk_size_bytes"),
        "{error}"
    );
    assert_open(&mut client, "invalid_batch");
    assert_eq!(
        client.produce("limits", 0, sized(batch_bytes_max)),
        Ok(3),
        "a batch of exactly the limit is stored"
    );
    assert_eq!(client.fetch_all("limits", 0, 0).len(), 4);
}

/// Code 8, invalid_topic_name, at the rules' edges (protocol.md §1): a name of 200 bytes
/// is a name (Metadata answers it is unknown); 201 bytes, an empty name, `.` and `..` are
/// refused whole while decoding, and the connection stays open.
/// (65,535-byte names: `hostile_clients::huge_topic_names_are_refused_at_decode_cheaply`.)
#[test]
fn invalid_topic_name_past_200_bytes_and_for_dot_names() {
    let _gate = shared_gate();
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 1);
    let mut client = RawClient::connect(broker.addr());
    let metadata = |names: Vec<String>| Request::Metadata(MetadataRequest { topics: names });
    let answer = client
        .call(&metadata(vec!["n".repeat(200)]))
        .expect("200 bytes is a valid name");
    let ResponseBody::Metadata(answer) = answer else {
        panic!("{answer:?}")
    };
    assert_eq!(
        answer.topics[0].error.as_ref().map(|error| error.code),
        Some(ErrorCode::UnknownTopic)
    );
    for bad in ["n".repeat(201), String::new(), ".".into(), "..".into()] {
        // Behind a valid name: the request is refused whole, not per topic.
        let error = client
            .call(&metadata(vec!["fine".into(), bad.clone()]))
            .expect_err("an invalid name");
        assert_eq!(error.code, ErrorCode::InvalidTopicName, "{bad:?}: {error}");
        assert_open(&mut client, &format!("topic name {bad:?}"));
    }
}
