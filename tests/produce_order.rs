//! Pipelined produce requests for one partition on one connection append in the order
//! their frames arrived (docs/protocol.md §5.5, "Order of pipelined produce requests"),
//! for a partition of the shard the connection is on and for one another shard owns,
//! and with refused requests in the middle.
//!
//! The bursts are built to make appends wait where a reordering could slip in: every
//! other frame carries a large batch for a second partition *before* the ordered
//! partition's batch, and the shard's chunk memory is the smallest allowed, so that
//! large append keeps waiting for a chunk (and the segments roll) while the frame behind
//! it, which names only the ordered partition, has all it needs.

mod common;

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use common::*;
use shardq::placement::shard_for;
use shardq::protocol::batch::BatchBuilder;
use shardq::protocol::{
    decode_response, Acks, ErrorCode, Opcode, ProducePartition, ProduceRequest, ProduceTopic,
    Request, ResponseBody, WireError,
};

const TOPIC: &str = "ordered";
const PARTITIONS: u32 = 8;
/// Frames in one burst: half carry a large batch for the other partition.
const FRAMES: usize = 80;
/// Well over half a chunk (test_config: 256 KiB chunks), so nearly every large append
/// needs a chunk of its own.
const LARGE_BATCH_BYTES: usize = 150 << 10;

fn broker(dir: &std::path::Path) -> TestBroker {
    let config = shardq::config::ServerConfig {
        // The least the broker allows (four chunks): large appends wait for chunks.
        chunk_memory_bytes_per_shard_max: 4 * (256 << 10),
        ..test_config(dir, 2)
    };
    TestBroker::start_with(config)
}

/// Two partitions of `TOPIC` owned by `shard`: the ordered one and the one that gets
/// the large batches.
fn partitions_of(shard: u16) -> (u32, u32) {
    let owned: Vec<u32> = (0..PARTITIONS)
        .filter(|partition| shard_for(TOPIC, *partition, 2) == shard)
        .collect();
    assert!(
        owned.len() >= 2,
        "placement gives shard {shard} two of {PARTITIONS} partitions: {owned:?}"
    );
    (owned[0], owned[1])
}

fn batch(value: &[u8], producer: Option<(u64, u64)>) -> Bytes {
    let mut builder = BatchBuilder::new(BytesMut::new());
    if let Some((producer_id, sequence)) = producer {
        builder.set_producer(producer_id, sequence);
    }
    builder.push(1_700_000_000_000, None, value, &[]);
    builder.finish()
}

/// What one frame of a burst is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Frame {
    /// Stored: its value is the frame's number.
    Stored,
    /// Refused by the shard that reads it: a batch whose CRC does not match.
    Corrupt,
    /// Refused by the owner at append: an idempotent producer's sequence with a gap.
    SequenceGap,
}

/// Writes `FRAMES` produce frames in one write on one connection to shard 0's own port,
/// for partition `ordered` (and, every other frame, a large batch for `large` listed
/// first), reads every answer, and returns the values stored in `ordered`, in offset
/// order, with the answers by frame.
fn burst(
    broker: &TestBroker,
    ordered: u32,
    large: u32,
    kinds: &[Frame],
) -> (Vec<String>, Vec<Result<u64, WireError>>) {
    let mut client = RawClient::connect(broker.shard_addr(0));
    let mut bytes = BytesMut::new();
    let mut frames = HashMap::new();
    // Frame 0 introduces the idempotent producer whose later gap is refused.
    let producer = 0x5eed;
    for (number, kind) in kinds.iter().enumerate() {
        let value = format!("{number:03}");
        let ordered_batch = match kind {
            Frame::Stored if number == 0 => batch(value.as_bytes(), Some((producer, 0))),
            Frame::Stored => batch(value.as_bytes(), None),
            Frame::Corrupt => {
                let mut corrupt = BytesMut::from(&batch(value.as_bytes(), None)[..]);
                let last = corrupt.len() - 1;
                corrupt[last] ^= 0xff;
                corrupt.freeze()
            }
            Frame::SequenceGap => batch(value.as_bytes(), Some((producer, 7))),
        };
        let mut partitions = Vec::new();
        if number % 2 == 0 {
            let mut large_value = vec![b'x'; LARGE_BATCH_BYTES];
            large_value[..3].copy_from_slice(value.as_bytes());
            partitions.push(ProducePartition {
                partition: large,
                batch: batch(&large_value, None),
            });
        }
        partitions.push(ProducePartition {
            partition: ordered,
            batch: ordered_batch,
        });
        let request = Request::Produce(ProduceRequest {
            acks: Acks::Durable,
            timeout_ms: 30_000,
            topics: vec![ProduceTopic {
                name: TOPIC.into(),
                partitions,
            }],
        });
        let correlation_id = 1_000 + number as u64;
        request.encode(correlation_id, &mut bytes);
        frames.insert(correlation_id, number);
    }
    // One burst: the broker reads the frames back to back.
    client.send_bytes(&bytes);
    let mut answers: Vec<Option<Result<u64, WireError>>> = vec![None; kinds.len()];
    for _ in 0..kinds.len() {
        let (correlation_id, opcode, body) = client.read_frame().expect("every frame answered");
        assert_eq!(opcode_of(opcode), Opcode::Produce);
        let number = frames[&correlation_id];
        let Ok(Ok(ResponseBody::Produce(response))) = decode_response(Opcode::Produce, body) else {
            panic!("frame {number}: not a produce response")
        };
        let results = &response.topics[0].partitions;
        if number % 2 == 0 {
            assert!(
                results[0].result.is_ok(),
                "frame {number}: the large batch is stored: {:?}",
                results[0].result
            );
        }
        let result = results.last().expect("the ordered partition's result");
        assert_eq!(result.partition, ordered);
        answers[number] = Some(result.result.clone());
    }
    let answers = answers
        .into_iter()
        .map(|answer| answer.expect("answered"))
        .collect();
    (values(&client.fetch_all(TOPIC, ordered, 0)), answers)
}

fn check_order(broker: &TestBroker, ordered: u32, large: u32, kinds: &[Frame]) {
    let (stored, answers) = burst(broker, ordered, large, kinds);
    let expected: Vec<String> = kinds
        .iter()
        .enumerate()
        .filter(|(_, kind)| **kind == Frame::Stored)
        .map(|(number, _)| format!("{number:03}"))
        .collect();
    assert_eq!(
        stored, expected,
        "partition {ordered} holds the stored frames in frame order"
    );
    // Offsets follow the frames too, and the refused frames got their refusals.
    let mut next_offset = 0;
    for (number, (kind, answer)) in kinds.iter().zip(&answers).enumerate() {
        match kind {
            Frame::Stored => {
                assert_eq!(answer, &Ok(next_offset), "frame {number}");
                next_offset += 1;
            }
            Frame::Corrupt => assert_eq!(
                answer.as_ref().map_err(|error| error.code),
                Err(ErrorCode::CorruptBatch),
                "frame {number}"
            ),
            Frame::SequenceGap => assert_eq!(
                answer.as_ref().map_err(|error| error.code),
                Err(ErrorCode::OutOfOrderSequence),
                "frame {number}"
            ),
        }
    }
}

fn all_stored() -> Vec<Frame> {
    vec![Frame::Stored; FRAMES]
}

#[test]
fn pipelined_produces_append_in_frame_order_on_the_connections_own_shard() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path());
    RawClient::connect(broker.addr()).create_topic(TOPIC, PARTITIONS);
    let (ordered, large) = partitions_of(0);
    check_order(&broker, ordered, large, &all_stored());
}

#[test]
fn pipelined_produces_append_in_frame_order_on_a_partition_another_shard_owns() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path());
    RawClient::connect(broker.addr()).create_topic(TOPIC, PARTITIONS);
    let (ordered, large) = partitions_of(1);
    check_order(&broker, ordered, large, &all_stored());
}

#[test]
fn produces_after_a_refused_one_still_append_in_frame_order() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path());
    RawClient::connect(broker.addr()).create_topic(TOPIC, PARTITIONS);
    // Refused by the reading shard (no place in line) and by the owner at append (its
    // place passes on), in the middle of each burst.
    let mut kinds = all_stored();
    kinds[11] = Frame::Corrupt;
    kinds[12] = Frame::SequenceGap;
    kinds[40] = Frame::SequenceGap;
    kinds[41] = Frame::Corrupt;
    for shard in [0, 1] {
        let (ordered, large) = partitions_of(shard);
        check_order(&broker, ordered, large, &kinds);
    }
}

/// Sends `frames` produce frames in one write on a connection to `shard`'s own port,
/// each naming `first` (a large batch) and then `second` (a small one), and returns
/// the number answered with both stored.
fn cross_burst(broker: &TestBroker, shard: u16, first: u32, second: u32, frames: usize) -> usize {
    let mut client = RawClient::connect(broker.shard_addr(usize::from(shard)));
    let mut bytes = BytesMut::new();
    for number in 0..frames {
        let request = Request::Produce(ProduceRequest {
            acks: Acks::Durable,
            timeout_ms: 30_000,
            topics: vec![ProduceTopic {
                name: TOPIC.into(),
                partitions: vec![
                    ProducePartition {
                        partition: first,
                        batch: batch(&vec![b'x'; LARGE_BATCH_BYTES], None),
                    },
                    ProducePartition {
                        partition: second,
                        batch: batch(format!("{shard}-{number:03}").as_bytes(), None),
                    },
                ],
            }],
        });
        request.encode(1 + number as u64, &mut bytes);
    }
    client.send_bytes(&bytes);
    let mut stored = 0;
    for _ in 0..frames {
        // A broker that stopped answering fails here, after the read timeout.
        let (_, _, body) = client
            .read_frame()
            .expect("every frame answered (the broker did not stall)");
        let Ok(Ok(ResponseBody::Produce(response))) = decode_response(Opcode::Produce, body) else {
            panic!("not a produce response")
        };
        if response.topics[0]
            .partitions
            .iter()
            .all(|p| p.result.is_ok())
        {
            stored += 1;
        }
    }
    stored
}

/// Two connections, one on each shard, pipelining produces that name a partition of
/// each shard in opposite orders, each listing the other shard's partition first. Each
/// request holds its place in line on its own shard while its other part waits on the
/// other shard: the shard's own part must run without waiting for the remote one, or
/// the two lines wait for each other forever.
#[test]
fn requests_naming_partitions_of_two_shards_in_opposite_orders_all_complete() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path());
    RawClient::connect(broker.addr()).create_topic(TOPIC, PARTITIONS);
    let (on_zero, _) = partitions_of(0);
    let (on_one, _) = partitions_of(1);
    const CROSS_FRAMES: usize = 40;
    let stored = std::thread::scope(|scope| {
        let zero = scope.spawn(|| cross_burst(&broker, 0, on_one, on_zero, CROSS_FRAMES));
        let one = scope.spawn(|| cross_burst(&broker, 1, on_zero, on_one, CROSS_FRAMES));
        (zero.join().unwrap(), one.join().unwrap())
    });
    assert_eq!(stored, (CROSS_FRAMES, CROSS_FRAMES));
}
