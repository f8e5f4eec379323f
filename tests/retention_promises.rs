//! Retention promises of docs/protocol.md §5.3 and docs/storage.md (Retention, Segment
//! recycling) checked on a running broker: a limit of 0 deletes nothing however large
//! the partition grows, an age limit keeps segments younger than it, the log start that
//! retention left survives a restart, and `recycle_segments` keeps one deleted segment
//! as `spare.log` only when on. (Age limits against a stepped clock: the storage unit
//! tests in src/storage/retention_tests.rs.)
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::process::STEP_TIMEOUT;
use common::*;
use shardq::protocol::*;

fn small_segments(dir: &Path) -> shardq::config::ServerConfig {
    shardq::config::ServerConfig {
        segment_size_bytes: 256 << 10,
        chunk_size_bytes: 64 << 10,
        chunk_memory_bytes_per_shard_max: 4 << 20,
        retention_check_interval_ms: 20,
        ..test_config(dir, 1)
    }
}

/// Segment files of partition 0 (not counting the spare), by base offset.
fn segment_files(dir: &Path, topic: &str) -> Vec<u64> {
    let mut bases: Vec<u64> = std::fs::read_dir(dir.join("topics").join(topic).join("0"))
        .unwrap()
        .filter_map(|entry| {
            let name = entry.unwrap().file_name();
            shardq::storage::parse_segment_file_name(name.to_str().unwrap())
        })
        .collect();
    bases.sort_unstable();
    bases
}

fn has_spare(dir: &Path, topic: &str) -> bool {
    dir.join("topics")
        .join(topic)
        .join("0")
        .join("spare.log")
        .exists()
}

/// Twenty 1000-byte records a batch, `batches` batches: about 20 KiB each.
fn fill(client: &mut RawClient, topic: &str, batches: usize) {
    let value = [b'x'; 1000];
    let values: Vec<&[u8]> = (0..20).map(|_| &value[..]).collect();
    for _ in 0..batches {
        client.produce(topic, 0, batch_of(&values)).unwrap();
    }
}

fn create_with(client: &mut RawClient, topic: &str, bytes_max: u64, ms_max: u64) {
    client
        .call(&Request::CreateTopic(CreateTopicRequest {
            name: topic.into(),
            partitions: 1,
            retention: Retention { bytes_max, ms_max },
            queue: Default::default(),
        }))
        .expect("topic created");
}

fn alter_retention(client: &mut RawClient, topic: &str, bytes_max: u64, ms_max: u64) {
    client
        .call(&Request::AlterTopic(AlterTopicRequest {
            name: topic.into(),
            retention: Some(Retention { bytes_max, ms_max }),
            queue: Default::default(),
        }))
        .expect("retention altered");
}

/// (log start offset, high watermark) by ListOffsets earliest.
fn earliest(client: &mut RawClient, topic: &str) -> (u64, u64) {
    let response = client.call(&Request::ListOffsets(ListOffsetsRequest {
        topics: vec![ListOffsetsTopic {
            name: topic.into(),
            partitions: vec![ListOffsetsPartition {
                partition: 0,
                timestamp_ms: TIMESTAMP_EARLIEST,
            }],
        }],
    }));
    let Ok(ResponseBody::ListOffsets(response)) = response else {
        panic!("{response:?}")
    };
    let offsets = response.topics[0].partitions[0].result.clone().unwrap();
    assert_eq!(offsets.offset, offsets.log_start_offset);
    (offsets.offset, offsets.high_watermark)
}

/// Waits (bounded) until `topic`'s log start is past `start`; returns the new one.
fn wait_for_start_past(client: &mut RawClient, topic: &str, start: u64) -> u64 {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let (now, _) = earliest(client, topic);
        if now > start {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "retention never moved {topic}'s start past {start}"
        );
        // The check runs every 20 ms.
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn no_limit_and_young_segments_are_kept_and_the_log_start_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = TestBroker::start_with(small_segments(dir.path()));
    let mut client = RawClient::connect(broker.addr());
    // 0 and 0: no limit at all. An hour: every segment here is younger than that.
    create_with(&mut client, "unlimited", 0, 0);
    create_with(&mut client, "young", 0, 3_600_000);
    // Limited once written (below): its deletions show the checks run.
    create_with(&mut client, "sized", 0, 0);
    for topic in ["unlimited", "young"] {
        fill(&mut client, topic, 60);
    }
    let kept: Vec<Vec<u64>> = ["unlimited", "young"]
        .iter()
        .map(|topic| segment_files(dir.path(), topic))
        .collect();
    assert!(
        kept.iter().all(|segments| segments.len() >= 4),
        "several sealed segments: {kept:?}"
    );
    // "sized" is written in full, then limited: the check that deletes its head runs
    // after the other two topics were written, and looks at every partition of the
    // shard. It deletes every segment the limit lets go at once (nothing is appended
    // meanwhile), so the log start it leaves is final.
    fill(&mut client, "sized", 90);
    alter_retention(&mut client, "sized", 256 << 10, 0);
    let start = wait_for_start_past(&mut client, "sized", 0);
    for (topic, segments) in ["unlimited", "young"].iter().zip(&kept) {
        assert_eq!(
            &segment_files(dir.path(), topic),
            segments,
            "{topic}: nothing deleted"
        );
        assert_eq!(earliest(&mut client, topic), (0, 60 * 20), "{topic}");
        assert_eq!(client.fetch_all(topic, 0, 0).len(), 60 * 20, "{topic}");
    }

    // The log start retention left is where the restart starts too (with no check
    // running after the restart to move it).
    assert_eq!(earliest(&mut client, "sized").0, start);
    drop(client);
    broker.stop();
    let broker = TestBroker::start_with(shardq::config::ServerConfig {
        retention_check_interval_ms: 3_600_000,
        ..small_segments(dir.path())
    });
    let mut client = RawClient::connect(broker.addr());
    assert_eq!(earliest(&mut client, "sized"), (start, 90 * 20));
    assert_eq!(segment_files(dir.path(), "sized")[0], start);
    let records = client.fetch_all("sized", 0, start);
    assert_eq!(records[0].offset, start);
    assert_eq!(records.len() as u64, 90 * 20 - start);
    assert_eq!(earliest(&mut client, "unlimited"), (0, 60 * 20));
}

#[test]
fn recycle_segments_keeps_one_deleted_segment_as_the_spare_only_when_on() {
    for recycle_segments in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let broker = TestBroker::start_with(shardq::config::ServerConfig {
            recycle_segments,
            ..small_segments(dir.path())
        });
        let mut client = RawClient::connect(broker.addr());
        // Written with no limit, then limited: the deletions come after the last roll,
        // so no roll takes the spare back.
        create_with(&mut client, "spares", 0, 0);
        fill(&mut client, "spares", 60);
        let before = segment_files(dir.path(), "spares");
        assert!(before.len() >= 4, "{before:?}");
        alter_retention(&mut client, "spares", 256 << 10, 0);
        let start = wait_for_start_past(&mut client, "spares", 0);
        // The files go after the log start moved: wait for them.
        let deadline = Instant::now() + STEP_TIMEOUT;
        while segment_files(dir.path(), "spares")[0] != start {
            assert!(Instant::now() < deadline, "deleted segments' files stay");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            has_spare(dir.path(), "spares"),
            recycle_segments,
            "recycle_segments = {recycle_segments}"
        );
        let after = segment_files(dir.path(), "spares");
        assert!(after.len() < before.len(), "{before:?} -> {after:?}");
    }
}
