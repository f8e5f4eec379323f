//! A clean shutdown answers what it stored: every record found after a restart was
//! acknowledged to its producer before the connection closed, however the stop fell
//! among pipelined durable produces; and a request that reaches a shard already
//! stopping is answered ShuttingDown and not stored (docs/operations.md).
//!
//! Both tests take `serial()`: the second holds shard 0's stop with a test hook that
//! every broker in the process passes.
mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use common::*;
use shardq::placement::shard_for;
use shardq::protocol::*;

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[test]
fn records_stored_at_shutdown_were_all_acknowledged() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut broker = TestBroker::start(dir.path(), 1);
    let mut admin = RawClient::connect(broker.addr());
    admin.create_topic("drain", 1);
    drop(admin);

    let client = RawClient::connect(broker.addr());
    let mut writer = client.stream.try_clone().unwrap();
    let answered = Arc::new(AtomicUsize::new(0));
    let reader = {
        let answered = Arc::clone(&answered);
        let mut stream = client.stream;
        std::thread::spawn(move || {
            // (outcome by correlation id, whether the connection ended with a reset)
            let mut outcomes: HashMap<u64, bool> = HashMap::new();
            loop {
                let mut header = [0u8; FRAME_HEADER_SIZE];
                match stream.read_exact(&mut header) {
                    Ok(()) => {}
                    Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
                        return (outcomes, false)
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {
                        return (outcomes, true)
                    }
                    Err(error) => panic!("reading responses: {error}"),
                }
                let Ok(Decoded::Complete(header)) = decode_frame_header(&header, u32::MAX) else {
                    panic!("the broker sent a bad header")
                };
                let mut body = vec![0u8; header.body_length as usize];
                if stream.read_exact(&mut body).is_err() {
                    return (outcomes, true);
                }
                let ok = match decode_response(Opcode::Produce, body.into()).expect("decodes") {
                    Ok(ResponseBody::Produce(response)) => {
                        response.topics[0].partitions[0].result.is_ok()
                    }
                    _ => false,
                };
                outcomes.insert(header.correlation_id, ok);
                answered.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let sender = std::thread::spawn(move || {
        // Correlation id i carries value "v{i}"; sending stops when the broker is gone.
        for id in 1..=20_000u64 {
            let mut out = BytesMut::new();
            Request::Produce(ProduceRequest {
                acks: Acks::Durable,
                timeout_ms: 10_000,
                topics: vec![ProduceTopic {
                    name: "drain".into(),
                    partitions: vec![ProducePartition {
                        partition: 0,
                        batch: batch_of(&[format!("v{id}").as_bytes()]),
                    }],
                }],
            })
            .encode(id, &mut out);
            if writer.write_all(&out).is_err() {
                break;
            }
        }
    });
    // Stop while produces are flowing (bounded wait for the first answers).
    let mut spins = 0u64;
    while answered.load(Ordering::Relaxed) < 100 {
        spins += 1;
        assert!(spins < 2_000_000_000, "no answers");
        std::hint::spin_loop();
    }
    broker.stop();
    let (outcomes, reset) = reader.join().unwrap();
    sender.join().unwrap();
    assert!(outcomes.values().filter(|ok| **ok).count() >= 100);

    let broker = TestBroker::start_with(broker.config.clone());
    let mut client = RawClient::connect(broker.addr());
    let stored = client.fetch_all("drain", 0, 0);
    assert!(!stored.is_empty());
    // The stop closes each connection with a lingering close (FIN after the last
    // answer, the client's further input read and discarded): no reset may destroy
    // answers already sent.
    assert!(!reset, "the connection was reset at the stop");
    for record in &stored {
        let id: u64 = String::from_utf8_lossy(&record.value)[1..].parse().unwrap();
        assert_eq!(
            outcomes.get(&id),
            Some(&true),
            "record v{id} is stored but its producer was not told so"
        );
    }
}

/// Opens `SHARD_ZERO_STOP` when dropped, so a failing test cannot leave a stop held.
#[cfg(debug_assertions)]
struct ShardZeroStopHeld;

#[cfg(debug_assertions)]
impl Drop for ShardZeroStopHeld {
    fn drop(&mut self) {
        shardq::test_hooks::SHARD_ZERO_STOP.open();
    }
}

/// A connection opened before the stop, on a shard that has not stopped yet (held by a
/// test hook), sends produces for a partition whose shard is stopping: once that shard
/// stops taking work they are answered ShuttingDown, and what was answered so is not
/// stored, while every produce acknowledged before is.
#[cfg(debug_assertions)]
#[test]
fn produces_reaching_a_stopping_shard_are_answered_shutting_down_and_not_stored() {
    use shardq::test_hooks::SHARD_ZERO_STOP;
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut broker = TestBroker::start(dir.path(), 2);
    let config = broker.config.clone();
    let mut client = RawClient::connect(broker.shard_addr(0));
    client.create_topic("late", 4);
    let remote = (0..4)
        .find(|partition| shard_for("late", *partition, 2) == 1)
        .expect("a partition on shard 1");
    client
        .produce("late", remote, batch_of(&[b"before"]))
        .unwrap();
    SHARD_ZERO_STOP.close();
    let held = ShardZeroStopHeld;
    let stopper = std::thread::spawn(move || broker.stop());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while SHARD_ZERO_STOP.waiting() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "shard 0 never stopped"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // Shard 1 stops meanwhile; its partitions take produces until it does.
    let mut acknowledged = vec!["before".to_owned()];
    let refused = loop {
        let value = format!("try {}", acknowledged.len());
        match client.produce("late", remote, batch_of(&[value.as_bytes()])) {
            Ok(_) => acknowledged.push(value),
            Err(error) => {
                assert_eq!(error.code, ErrorCode::ShuttingDown, "{error:?}");
                break value;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "shard 1 never stopped taking produces"
        );
    };
    drop(held);
    stopper.join().unwrap();

    let broker = TestBroker::start_with(config);
    let mut client = RawClient::connect(broker.addr());
    let stored = values(&client.fetch_all("late", remote, 0));
    assert_eq!(
        stored, acknowledged,
        "{refused:?} was answered ShuttingDown"
    );
}
