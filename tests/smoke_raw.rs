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
