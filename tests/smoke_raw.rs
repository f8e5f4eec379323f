mod common;

use common::*;
use shardq::protocol::*;

#[test]
fn produce_and_fetch_one_batch_raw() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let mut client = RawClient::connect(broker.addr());
    client
        .call(&Request::CreateTopic(CreateTopicRequest {
            name: "t".into(),
            partitions: 2,
            retention: Default::default(),
            queue: Default::default(),
        }))
        .unwrap();
    let response = client
        .call(&Request::Produce(ProduceRequest {
            acks: Acks::Durable,
            timeout_ms: 5000,
            topics: vec![ProduceTopic {
                name: "t".into(),
                partitions: vec![
                    ProducePartition {
                        partition: 0,
                        batch: batch_of(&[b"a", b"b"]),
                    },
                    ProducePartition {
                        partition: 1,
                        batch: batch_of(&[b"c"]),
                    },
                ],
            }],
        }))
        .unwrap();
    let ResponseBody::Produce(response) = response else {
        panic!()
    };
    assert_eq!(response.topics[0].partitions[0].result, Ok(0));
    assert_eq!(response.topics[0].partitions[1].result, Ok(0));
    let response = client
        .call(&Request::Fetch(FetchRequest {
            wait_ms_max: 0,
            bytes_max: 1 << 20,
            topics: vec![FetchTopic {
                name: "t".into(),
                partitions: vec![FetchPartition {
                    partition: 0,
                    offset: 0,
                    bytes_max: 1 << 20,
                }],
            }],
        }))
        .unwrap();
    let ResponseBody::Fetch(response) = response else {
        panic!()
    };
    let data = response.topics[0].partitions[0].data.clone();
    assert_eq!(data.high_watermark, 2);
    let mut records = Vec::new();
    batch::decode_records(&data.batches.unwrap(), 0, &mut records).unwrap();
    let values: Vec<&[u8]> = records.iter().map(|r| &r.value[..]).collect();
    assert_eq!(values, vec![&b"a"[..], &b"b"[..]]);
}

#[test]
fn a_fetch_past_its_byte_budget_returns_watermarks_without_data() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 1);
    let mut client = RawClient::connect(broker.addr());
    client.create_topic("t", 1);
    client.produce("t", 0, batch_of(&[b"a", b"b"])).unwrap();
    // The same partition named many times with a 1-byte budget: one batch for the first
    // entry (a consumer must always progress), nothing read for the others.
    let response = client
        .call(&Request::Fetch(FetchRequest {
            wait_ms_max: 0,
            bytes_max: 1,
            topics: vec![FetchTopic {
                name: "t".into(),
                partitions: (0..100)
                    .map(|_| FetchPartition {
                        partition: 0,
                        offset: 0,
                        bytes_max: 1 << 20,
                    })
                    .collect(),
            }],
        }))
        .unwrap();
    let ResponseBody::Fetch(response) = response else {
        panic!()
    };
    let partitions = &response.topics[0].partitions;
    assert_eq!(partitions.len(), 100);
    assert!(!partitions[0].data.batches.as_ref().unwrap().is_empty());
    for partition in &partitions[1..] {
        assert!(partition.data.batches.as_ref().unwrap().is_empty());
        assert_eq!(partition.data.high_watermark, 2);
    }
}

/// The hex pairs of `text` up to the first token that is not one.
fn hex_bytes(text: &str) -> Vec<u8> {
    text.split_whitespace()
        .map_while(|token| {
            (token.len() == 2)
                .then(|| u8::from_str_radix(token, 16).ok())
                .flatten()
        })
        .collect()
}

/// docs/protocol.md §10 over a real socket: the documented CreateTopic frame, sent as
/// printed, is answered with exactly the documented response bytes, and creates the
/// topic it describes. (The codec's side is the unit test
/// `protocol_md_create_topic_example_matches_the_codec`.)
#[test]
fn protocol_md_create_topic_frame_is_answered_as_documented() {
    let doc = include_str!("../docs/protocol.md");
    let section = doc
        .split("## 10. Worked example: CreateTopic")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("protocol.md has §10");
    let request = section
        .split("All 44 bytes: `")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .map(hex_bytes)
        .expect("the one-line dump");
    let response = section
        .split("```")
        .nth(3)
        .map(hex_bytes)
        .expect("the response dump");
    assert_eq!((request.len(), response.len()), (44, 20));

    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let mut client = RawClient::connect(broker.addr());
    client.send_bytes(&request);
    // The bytes as they come off the socket, header included.
    let mut answered = vec![0u8; response.len()];
    std::io::Read::read_exact(&mut client.stream, &mut answered).expect("an answer");
    assert_eq!(answered, response, "protocol.md §10's response");
    let described = client
        .call(&Request::Metadata(MetadataRequest {
            topics: vec!["orders".into()],
        }))
        .expect("metadata");
    let ResponseBody::Metadata(described) = described else {
        panic!("{described:?}")
    };
    let orders = &described.topics[0];
    assert_eq!(orders.error, None);
    assert_eq!(orders.partitions.len(), 4);
    assert_eq!(
        (orders.retention.bytes_max, orders.retention.ms_max),
        (0, 86_400_000)
    );
}
