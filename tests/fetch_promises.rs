//! What docs/protocol.md §5.6 and §7 promise a fetching client, each checked where it
//! could break: the byte budget of a fetch across owning shards, a long-poll that expires
//! (empty, after its wait), one woken by the broker's stop, one abandoned by a client
//! that went away (stopped on its owner), data acknowledged in memory hidden until it is
//! durable, reads refused at and past damaged data, and a half-closed connection with
//! pipelined requests and a frame cut short.
//!
//! Every test here takes `serial()`: the test hooks some use (held durable rounds, the
//! count of parked long-polls; debug builds only) are shared by every broker in the
//! process.
mod common;

use std::io::{Read, Write};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
#[cfg(debug_assertions)]
use common::process::STEP_TIMEOUT;
use common::*;
use shardq::placement::shard_for;
use shardq::protocol::batch::{check_framing, decode_records};
use shardq::protocol::*;
#[cfg(debug_assertions)]
use shardq::test_hooks::{DURABLE_ROUNDS, FETCH_LONG_POLLS_PARKED};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Waits (bounded) until `FETCH_LONG_POLLS_PARKED` is `count`.
#[cfg(debug_assertions)]
fn wait_for_parked(count: usize, what: &str) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while FETCH_LONG_POLLS_PARKED.get() != count {
        assert!(
            Instant::now() < deadline,
            "{what}: {} long-polls parked, not {count}",
            FETCH_LONG_POLLS_PARKED.get()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One topic's partitions spread over both shards of a two-shard broker: (partition on
/// shard 0, partition on shard 1).
fn one_per_shard(topic: &str, partitions: u32) -> (u32, u32) {
    let on = |shard| {
        (0..partitions)
            .find(|partition| shard_for(topic, *partition, 2) == shard)
            .unwrap_or_else(|| panic!("{topic} has a partition on shard {shard}"))
    };
    (on(0), on(1))
}

/// §5.6 Budget: across owning shards the receiving shard enforces the request's
/// `bytes_max` in total (each owner applies it only to its own partitions).
#[test]
fn a_fetch_across_shards_returns_at_most_its_byte_budget_in_total() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let mut client = RawClient::connect(broker.addr());
    client.create_topic("spread", 4);
    one_per_shard("spread", 4);
    const BATCHES: u64 = 10;
    let value = [b'v'; 1000];
    for partition in 0..4u32 {
        for _ in 0..BATCHES {
            client
                .produce("spread", partition, batch_of(&[&value]))
                .unwrap();
        }
    }
    let batch_bytes = batch_of(&[&value]).len() as u32;
    // Three batches and a half: each owner alone could send three, six in all.
    let bytes_max = 3 * batch_bytes + batch_bytes / 2;
    let mut offsets = [0u64; 4];
    let mut fetches = 0;
    while offsets.iter().any(|offset| *offset < BATCHES) {
        fetches += 1;
        assert!(fetches < 100, "every partition is read out: {offsets:?}");
        let entries: Vec<(u32, u64)> = (0..4u32).map(|p| (p, offsets[p as usize])).collect();
        let partitions =
            fetched(client.call(&fetch_request(0, bytes_max, 1 << 20, "spread", &entries)));
        let mut total = 0usize;
        for result in &partitions {
            let batches = result.data.batches.clone().expect("readable");
            total += batches.len();
            let mut records = Vec::new();
            let offset = &mut offsets[result.partition as usize];
            decode_records(&batches, *offset, &mut records).unwrap();
            *offset += records.len() as u64;
        }
        assert!(
            total <= bytes_max as usize,
            "fetch {fetches} returned {total} bytes for a budget of {bytes_max}"
        );
        assert!(total > 0, "fetch {fetches} made progress");
    }
    // A budget below one batch: the first partition with data keeps one whole batch (a
    // consumer must progress), every other partition, on either shard, comes back empty.
    let entries: Vec<(u32, u64)> = (0..4u32).map(|partition| (partition, 0)).collect();
    for _ in 0..4 {
        let partitions = fetched(client.call(&fetch_request(0, 1, 1 << 20, "spread", &entries)));
        let sizes: Vec<usize> = partitions
            .iter()
            .map(|result| result.data.batches.as_ref().expect("readable").len())
            .collect();
        let mut with_data = sizes.iter().filter(|size| **size > 0);
        assert_eq!(with_data.next(), Some(&(batch_bytes as usize)), "{sizes:?}");
        assert_eq!(with_data.next(), None, "{sizes:?}");
    }
}

/// §5.6 Long-poll, partitions on several shards: a wait that expires answers with empty
/// batches and no error, once the wait is over.
#[test]
fn an_expired_long_poll_across_shards_answers_empty_after_its_wait() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let mut client = RawClient::connect(broker.addr());
    client.create_topic("quiet", 4);
    client.produce("quiet", 0, batch_of(&[b"old"])).unwrap();
    let (local, remote) = one_per_shard("quiet", 4);
    let at_end = |partition: u32| (partition, u64::from(partition == 0));
    let wait = Duration::from_millis(400);
    let started = Instant::now();
    let partitions = fetched(client.call(&fetch_request(
        wait.as_millis() as u32,
        1 << 20,
        1 << 20,
        "quiet",
        &[at_end(local), at_end(remote)],
    )));
    let waited = started.elapsed();
    for result in &partitions {
        assert_eq!(
            result.data.batches,
            Ok(bytes::Bytes::new()),
            "partition {} expired empty, without an error",
            result.partition
        );
        assert_eq!(result.data.high_watermark, at_end(result.partition).1);
    }
    assert!(waited >= wait, "answered after {waited:?}, before its wait");
}

/// §5.6: a long-poll waits until "the shard is shutting down" at the latest. A stop
/// answers the long-polls already read at once, not after their wait, then ends the
/// connection; a request sent after that is not read.
#[cfg(debug_assertions)]
#[test]
fn long_polls_are_answered_when_the_broker_stops_not_after_their_wait() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut broker = TestBroker::start(dir.path(), 2);
    let mut client = RawClient::connect(broker.shard_addr(0));
    client.create_topic("idle", 4);
    let (local, remote) = one_per_shard("idle", 4);
    // The default fetch_wait_ms_max: longer than the stop may take (the drain gives up
    // after shutdown_drain_ms, 2 s), so an answer at all shows the wait was cut short.
    let one_shard = client.send(&fetch_request(
        30_000,
        1 << 20,
        1 << 20,
        "idle",
        &[(local, 0)],
    ));
    let two_shards = client.send(&fetch_request(
        30_000,
        1 << 20,
        1 << 20,
        "idle",
        &[(local, 0), (remote, 0)],
    ));
    // One parked on shard 0 for the first; the second's owners each park one.
    wait_for_parked(3, "before the stop");
    let stopper = std::thread::spawn(move || broker.stop());
    let mut answered = Vec::new();
    for _ in 0..2 {
        let (id, opcode, body) = client
            .read_frame()
            .expect("every long-poll is answered at the stop");
        let partitions = fetched(decode_response(opcode_of(opcode), body).unwrap());
        for result in &partitions {
            // Empty, as an expired wait answers; ShuttingDown where the owner no
            // longer answered.
            match &result.data.batches {
                Ok(batches) => assert!(batches.is_empty(), "request {id}: nothing was produced"),
                Err(error) => assert_eq!(
                    error.code,
                    ErrorCode::ShuttingDown,
                    "request {id}, partition {}: {error:?}",
                    result.partition
                ),
            }
        }
        answered.push(id);
    }
    answered.sort_unstable();
    assert_eq!(answered, vec![one_shard, two_shards]);
    // The stop has stopped reading: a request now is not answered, the stream ends
    // (a reset if the lingering close has already given up on this client).
    client.send(&Request::Metadata(MetadataRequest { topics: vec![] }));
    let mut byte = [0u8; 1];
    match client.stream.read(&mut byte) {
        Ok(0) => {}
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("a request sent after the stop got {other:?}"),
    }
    stopper.join().unwrap();
    assert_eq!(FETCH_LONG_POLLS_PARKED.get(), 0);
}

/// A client that goes away (a reset) during a long-poll: the shard that read it drops
/// its own wait and tells the other owners to stop theirs, at once rather than at the
/// end of `wait_ms_max`; the broker serves on.
#[cfg(debug_assertions)]
#[test]
fn an_abandoned_long_poll_stops_on_every_owner() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let mut admin = RawClient::connect(broker.addr());
    admin.create_topic("left", 4);
    let (local, remote) = one_per_shard("left", 4);
    let mut client = RawClient::connect(broker.shard_addr(0));
    client.send(&fetch_request(
        30_000,
        1 << 20,
        1 << 20,
        "left",
        &[(local, 0)],
    ));
    client.send(&fetch_request(
        30_000,
        1 << 20,
        1 << 20,
        "left",
        &[(remote, 0)],
    ));
    wait_for_parked(2, "both long-polls parked");
    // A close with SO_LINGER 0 is a reset: the client is gone, not just done sending
    // (a half-close would be answered at the end of the wait, §7).
    socket2::SockRef::from(&client.stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(client);
    // Well within the 30 s wait: a long-poll left running fails this.
    let deadline = Instant::now() + Duration::from_secs(15);
    while FETCH_LONG_POLLS_PARKED.get() != 0 {
        assert!(
            Instant::now() < deadline,
            "{} long-polls still parked after their client left",
            FETCH_LONG_POLLS_PARKED.get()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // And the broker serves on, on both shards.
    for partition in [local, remote] {
        admin
            .produce("left", partition, batch_of(&[b"after"]))
            .unwrap();
        assert_eq!(
            values(&admin.fetch_all("left", partition, 0)),
            vec!["after"]
        );
    }
}

/// Opens the durable-round gate when dropped, so a failing test does not leave the
/// broker unable to stop.
#[cfg(debug_assertions)]
struct RoundsHeld;

#[cfg(debug_assertions)]
impl RoundsHeld {
    fn hold() -> RoundsHeld {
        DURABLE_ROUNDS.close();
        RoundsHeld
    }
}

#[cfg(debug_assertions)]
impl Drop for RoundsHeld {
    fn drop(&mut self) {
        DURABLE_ROUNDS.open();
    }
}

/// §5.5/§5.6: a record acknowledged with acks=memory is not readable, nor counted in the
/// high watermark, nor does it wake a long-poll, until it is durable; then it is.
#[cfg(debug_assertions)]
#[test]
fn records_acknowledged_in_memory_are_hidden_until_durable() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 1);
    let mut client = RawClient::connect(broker.addr());
    client.create_topic("soft", 1);
    client.produce("soft", 0, batch_of(&[b"durable"])).unwrap();
    let held = RoundsHeld::hold();
    let response = client.call(&Request::Produce(ProduceRequest {
        acks: Acks::Memory,
        timeout_ms: 0,
        topics: vec![ProduceTopic {
            name: "soft".into(),
            partitions: vec![ProducePartition {
                partition: 0,
                batch: batch_of(&[b"in memory"]),
            }],
        }],
    }));
    let Ok(ResponseBody::Produce(response)) = response else {
        panic!("{response:?}")
    };
    assert_eq!(response.topics[0].partitions[0].result, Ok(1));
    // The round that would make it durable waits at the gate.
    let deadline = Instant::now() + STEP_TIMEOUT;
    while DURABLE_ROUNDS.waiting() == 0 {
        assert!(Instant::now() < deadline, "no round reached the gate");
        std::thread::sleep(Duration::from_millis(5));
    }
    let partitions = fetched(client.call(&fetch_request(0, 1 << 20, 1 << 20, "soft", &[(0, 0)])));
    let data = &partitions[0].data;
    assert_eq!(data.high_watermark, 1, "the watermark is the durable one");
    let mut records = Vec::new();
    decode_records(data.batches.as_ref().unwrap(), 0, &mut records).unwrap();
    assert_eq!(values(&records), vec!["durable"]);
    // At the watermark: a long-poll is not woken by the memory-acked record.
    let partitions = fetched(client.call(&fetch_request(300, 1 << 20, 1 << 20, "soft", &[(0, 1)])));
    assert_eq!(partitions[0].data.batches, Ok(bytes::Bytes::new()));
    assert_eq!(partitions[0].data.high_watermark, 1);
    let response = client.call(&Request::ListOffsets(ListOffsetsRequest {
        topics: vec![ListOffsetsTopic {
            name: "soft".into(),
            partitions: vec![ListOffsetsPartition {
                partition: 0,
                timestamp_ms: TIMESTAMP_LATEST,
            }],
        }],
    }));
    let Ok(ResponseBody::ListOffsets(response)) = response else {
        panic!("{response:?}")
    };
    assert_eq!(
        response.topics[0].partitions[0]
            .result
            .as_ref()
            .unwrap()
            .offset,
        1,
        "latest is the durable watermark"
    );
    // Durable now: a long-poll sees it.
    drop(held);
    let partitions =
        fetched(client.call(&fetch_request(20_000, 1 << 20, 1 << 20, "soft", &[(0, 1)])));
    let mut records = Vec::new();
    decode_records(
        partitions[0].data.batches.as_ref().unwrap(),
        1,
        &mut records,
    )
    .unwrap();
    assert_eq!(values(&records), vec!["in memory"]);
    assert_eq!(partitions[0].data.high_watermark, 2);
}

/// §5.6: a damaged batch (stored bytes changed after they were written) is never sent:
/// the batches before it come back, a fetch at or past it gets StorageError and no bytes.
#[test]
fn a_fetch_at_or_past_damaged_data_is_refused_and_never_returns_what_follows() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let config = shardq::config::ServerConfig {
        segment_size_bytes: 256 << 10,
        chunk_size_bytes: 64 << 10,
        chunk_memory_bytes_per_shard_max: 4 << 20,
        ..test_config(dir.path(), 1)
    };
    let mut broker = TestBroker::start_with(config.clone());
    let mut client = RawClient::connect(broker.addr());
    client.create_topic("damaged", 1);
    // About 600 KiB: the first 256 KiB segment is sealed, with index entries after the
    // damage (so the restart's recovery does not scan it).
    let count = 600u64;
    for index in 0..count {
        let value = format!("{index:01000}");
        client
            .produce("damaged", 0, batch_of(&[value.as_bytes()]))
            .unwrap();
    }
    drop(client);
    broker.stop();
    let partition_dir = dir.path().join("topics").join("damaged").join("0");
    let first_segment = partition_dir.join(shardq::storage::segment_file_name(0));
    let mut bytes = std::fs::read(&first_segment).unwrap();
    bytes[60_000] ^= 0xff;
    std::fs::write(&first_segment, &bytes).unwrap();

    // Restarted, so nothing comes from the tail cache: reads go to the disk.
    let broker = TestBroker::start_with(config);
    let mut client = RawClient::connect(broker.addr());
    let mut next = 0u64;
    let refused = loop {
        let partitions = fetched(client.call(&fetch_request(
            0,
            16 << 10,
            1 << 20,
            "damaged",
            &[(0, next)],
        )));
        let data = &partitions[0].data;
        assert_eq!(data.high_watermark, count);
        match &data.batches {
            Ok(batches) => {
                let mut records = Vec::new();
                decode_records(batches, next, &mut records).expect("only whole, sound batches");
                for record in &records {
                    assert_eq!(
                        record.value,
                        format!("{:01000}", record.offset).as_bytes(),
                        "only undamaged records"
                    );
                }
                next = records.last().expect("progress before the damage").offset + 1;
                assert!(next < count, "the damage was read past");
            }
            Err(error) => break error.clone(),
        }
    };
    assert_eq!(refused.code, ErrorCode::StorageError, "{refused:?}");
    // The damaged batch holds byte 60,000 of the file: the last good batch ends before.
    let batch_bytes = batch_of(&[format!("{:01000}", 0).as_bytes()]).len() as u64;
    assert_eq!(
        next,
        60_000 / batch_bytes,
        "every batch before the damaged one was served"
    );
    // At the damaged batch, past it in its segment, and in later segments: refused,
    // with no bytes.
    for offset in [next, next + 1, count / 2, count - 1] {
        let partitions = fetched(client.call(&fetch_request(
            0,
            16 << 10,
            1 << 20,
            "damaged",
            &[(0, offset)],
        )));
        match &partitions[0].data.batches {
            Err(error) => assert_eq!(error.code, ErrorCode::StorageError, "offset {offset}"),
            Ok(batches) => panic!(
                "offset {offset}, at or past the damage at {next}: {} bytes served",
                batches.len()
            ),
        }
    }
    // Before it, still served.
    let partitions =
        fetched(client.call(&fetch_request(0, 16 << 10, 1 << 20, "damaged", &[(0, 0)])));
    let batches = partitions[0].data.batches.clone().unwrap();
    assert_eq!(check_framing(&batches).unwrap().base_offset, 0);
}

/// §7: a client that pipelines requests and then closes its sending side gets every
/// answer, then end of stream (no reset); a frame cut short by the end of stream is
/// dropped unanswered; and the broker serves every other connection on.
#[test]
fn a_half_close_after_pipelined_requests_and_a_cut_frame_answers_them_all() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 1);
    let mut bystander = RawClient::connect(broker.addr());
    bystander.create_topic("piped", 1);
    bystander.create_topic("silent", 1);
    const REQUESTS: u64 = 50;
    for cut in [3usize, FRAME_HEADER_SIZE + 10] {
        let mut client = RawClient::connect(broker.addr());
        // A long-poll still waiting when the end of stream comes: answered too, empty,
        // at the end of its wait.
        let mut ids = vec![client.send(&fetch_request(500, 1 << 20, 1 << 20, "silent", &[(0, 0)]))];
        for index in 0..REQUESTS {
            ids.push(client.send(&Request::Produce(ProduceRequest {
                acks: Acks::Durable,
                timeout_ms: 10_000,
                topics: vec![ProduceTopic {
                    name: "piped".into(),
                    partitions: vec![ProducePartition {
                        partition: 0,
                        batch: batch_of(&[format!("cut {cut} #{index}").as_bytes()]),
                    }],
                }],
            })));
        }
        // A produce frame cut short after `cut` bytes: part of its header, or its
        // header and part of its body.
        let mut frame = BytesMut::new();
        Request::Produce(ProduceRequest {
            acks: Acks::Durable,
            timeout_ms: 10_000,
            topics: vec![ProduceTopic {
                name: "piped".into(),
                partitions: vec![ProducePartition {
                    partition: 0,
                    batch: batch_of(&[b"never stored"]),
                }],
            }],
        })
        .encode(999, &mut frame);
        let mut cut_frame = BytesMut::new();
        cut_frame.put_slice(&frame[..cut]);
        client.stream.write_all(&cut_frame).unwrap();
        client.stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answered = Vec::new();
        while let Some((id, opcode, body)) = client.read_frame() {
            match decode_response(opcode_of(opcode), body).unwrap() {
                Ok(ResponseBody::Produce(response)) => {
                    assert!(response.topics[0].partitions[0].result.is_ok(), "{id}")
                }
                Ok(ResponseBody::Fetch(response)) => {
                    let data = &response.topics[0].partitions[0].data;
                    assert_eq!(data.batches, Ok(bytes::Bytes::new()), "{id}");
                }
                other => panic!("request {id}: {other:?}"),
            }
            answered.push(id);
        }
        answered.sort_unstable();
        assert_eq!(answered, ids, "cut at {cut}: every whole request answered");
        let mut byte = [0u8; 1];
        assert_eq!(
            client
                .stream
                .read(&mut byte)
                .expect("end of stream, no reset"),
            0
        );
        // The other connection was served throughout and still is.
        bystander
            .produce("piped", 0, batch_of(&[b"bystander"]))
            .expect("the broker serves on");
    }
    let stored = values(&bystander.fetch_all("piped", 0, 0));
    assert_eq!(stored.len() as u64, 2 * REQUESTS + 2);
    assert!(!stored.iter().any(|value| value == "never stored"));
}
