//! What partitions cost on disk: a new partition reserves one preallocation step, not a
//! whole segment, and a partition's segment grows a step at a time ahead of its writes.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::*;
use shardq::config::ServerConfig;

/// Bytes the filesystem has allocated for everything under `path`.
fn allocated_bytes(path: &Path) -> u64 {
    let metadata = std::fs::metadata(path).unwrap();
    if metadata.is_dir() {
        std::fs::read_dir(path)
            .unwrap()
            .map(|entry| allocated_bytes(&entry.unwrap().path()))
            .sum()
    } else {
        metadata.blocks() * 512
    }
}

#[test]
fn a_new_partition_reserves_one_step_and_grows_a_step_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let step = 4u64 << 20;
    let config = ServerConfig {
        segment_size_bytes: 1 << 30,
        segment_preallocate_step_bytes: step,
        ..test_config(dir.path(), 2)
    };
    let mut broker = TestBroker::start_with(config.clone());
    let mut client = RawClient::connect(broker.addr());
    client.create_topic("wide", 16);
    let topic = dir.path().join("topics/wide");
    let reserved = allocated_bytes(&topic);
    assert!(
        reserved <= 16 * (step + (64 << 10)),
        "16 new partitions reserve {reserved} bytes: about one step each, not a 1 GiB segment"
    );
    assert!(reserved >= 16 * step, "each partition has its first step");

    // 12 MiB into one partition: its segment grows past the first step, staying within
    // about a step and a half of what was written.
    let value = vec![b'v'; 200 << 10];
    let mut written = 0u64;
    let mut offset = 0u64;
    while written < 12 << 20 {
        let mut record = offset.to_string().into_bytes();
        record.extend_from_slice(&value);
        assert_eq!(client.produce("wide", 3, batch_of(&[&record])), Ok(offset));
        offset += 1;
        written += record.len() as u64;
    }
    let segment = topic.join("3/00000000000000000000.log");
    let size = std::fs::metadata(&segment).unwrap().len();
    assert!(
        size >= written && size <= written + 2 * step,
        "after {written} bytes the segment is {size} bytes"
    );
    drop(client);
    broker.stop();
    let broker = TestBroker::start_with(config);
    let mut client = RawClient::connect(broker.addr());
    let stored = client.fetch_all("wide", 3, 0);
    assert_eq!(stored.len() as u64, offset);
    for (index, record) in stored.iter().enumerate() {
        assert!(record.value.starts_with(index.to_string().as_bytes()));
    }
}
