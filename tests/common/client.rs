//! Helpers for tests of the tokio client against the real broker.

use std::time::Duration;

use shardq::client::{Client, Record};
use shardq::protocol::batch::{check_framing, BatchHeader};
use shardq::protocol::{FetchPartition, FetchRequest, FetchTopic};

/// Bounds one step that would hang if a response were lost; generous, since the test
/// machine may be slow, and never asserted on as a timing.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(20);

/// A long-poll inside a step: the broker answers as soon as data arrives.
const WAIT_MS_MAX: u32 = 15_000;

/// Reads `partition` from offset 0 until it holds at least `count` records, long-polling
/// for ones not readable yet (reads stop at the durable watermark, so records acked in
/// memory or sent with acks none may show up a little later). Panics after
/// [`STEP_TIMEOUT`].
pub async fn records_until(
    client: &Client,
    topic: &str,
    partition: u32,
    count: usize,
) -> Vec<Record> {
    let read = async {
        let mut records: Vec<Record> = Vec::new();
        while records.len() < count {
            let next = records.last().map_or(0, |record| record.offset + 1);
            let fetched = client
                .fetch_records(topic, partition, next, WAIT_MS_MAX, 1 << 20)
                .await
                .expect("fetch");
            records.extend(fetched.records);
        }
        records
    };
    tokio::time::timeout(STEP_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| panic!("{topic}/{partition} did not reach {count} records"))
}

/// The headers of the stored batches of `partition` from offset 0 to the high
/// watermark, each checked for framing and CRC: how the producer batched.
pub async fn stored_batches(client: &Client, topic: &str, partition: u32) -> Vec<BatchHeader> {
    let mut headers: Vec<BatchHeader> = Vec::new();
    loop {
        let next = headers.last().map_or(0, BatchHeader::next_offset);
        let response = client
            .fetch(FetchRequest {
                wait_ms_max: 0,
                bytes_max: 1 << 20,
                topics: vec![FetchTopic {
                    name: topic.into(),
                    partitions: vec![FetchPartition {
                        partition,
                        offset: next,
                        bytes_max: 1 << 20,
                    }],
                }],
            })
            .await
            .expect("fetch");
        let data = response.topics[0].partitions[0].data.clone();
        let batches = data.batches.clone().expect("partition readable");
        let mut bytes = &batches[..];
        let before = headers.len();
        while !bytes.is_empty() {
            let header = check_framing(bytes).expect("stored batches pass framing and CRC");
            // The broker returns whole batches, so the first may start before `next`.
            if header.next_offset() > next {
                headers.push(header);
            }
            bytes = &bytes[header.batch_length as usize..];
        }
        if headers.len() == before {
            assert_eq!(
                next, data.high_watermark,
                "an empty fetch happens only at the watermark"
            );
            return headers;
        }
    }
}

/// Values of records, as strings.
pub fn record_values(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .map(|record| String::from_utf8_lossy(&record.value).into_owned())
        .collect()
}

/// Offsets of records.
pub fn record_offsets(records: &[Record]) -> Vec<u64> {
    records.iter().map(|record| record.offset).collect()
}
