//! `shardq serve` stopped by a signal under produce load, as systemd or an operator stops
//! it: the first SIGTERM drains (every acknowledged record is stored, every refused one
//! is not, exit status 0 within `shutdown_timeout_ms`), also when the signal comes twice
//! at once as timeout(1) sends it; a second signal during the drain exits at once with
//! 128 + its number and keeps every durable acknowledgement.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::process::{Serve, STEP_TIMEOUT};
use common::{batch_of, values, RawClient};
use shardq::protocol::{
    decode_response, Acks, ErrorCode, ProducePartition, ProduceRequest, ProduceTopic, Request,
    ResponseBody,
};

const TOPIC: &str = "orders";
const PARTITIONS: u32 = 2;
/// Producer threads; even ones ask for durable acknowledgements, odd ones for memory.
const PRODUCERS: u32 = 4;

/// What one produce came to, as its producer saw it.
#[derive(Debug)]
enum Outcome {
    Stored {
        offset: u64,
    },
    Refused(ErrorCode),
    /// The connection ended before the answer: either way is allowed.
    Unanswered,
}

struct Sent {
    partition: u32,
    value: String,
    acks: Acks,
    outcome: Outcome,
}

/// One durable or memory produce on a raw connection; `Unanswered` when the connection
/// fails either way.
fn produce(client: &mut RawClient, partition: u32, value: &str, acks: Acks) -> Outcome {
    let mut out = BytesMut::new();
    Request::Produce(ProduceRequest {
        acks,
        timeout_ms: 10_000,
        topics: vec![ProduceTopic {
            name: TOPIC.into(),
            partitions: vec![ProducePartition {
                partition,
                batch: batch_of(&[value.as_bytes()]),
            }],
        }],
    })
    .encode(1, &mut out);
    if client.stream.write_all(&out).is_err() {
        return Outcome::Unanswered;
    }
    let Some((_, opcode, body)) = client.read_frame() else {
        return Outcome::Unanswered;
    };
    match decode_response(common::opcode_of(opcode), body).expect("answers decode") {
        Ok(ResponseBody::Produce(response)) => {
            match response.topics[0].partitions[0].result.clone() {
                Ok(offset) => Outcome::Stored { offset },
                Err(error) => Outcome::Refused(error.code),
            }
        }
        Ok(other) => panic!("produce answered with {other:?}"),
        Err(error) => Outcome::Refused(error.code),
    }
}

/// Producers that send until their connection ends, counting acknowledgements.
fn start_producers(address: SocketAddr, acked: &Arc<AtomicU64>) -> Vec<JoinHandle<Vec<Sent>>> {
    (0..PRODUCERS)
        .map(|producer| {
            let acked = Arc::clone(acked);
            std::thread::spawn(move || {
                let mut client = RawClient::connect(address);
                let partition = producer % PARTITIONS;
                let acks = if producer % 2 == 0 {
                    Acks::Durable
                } else {
                    Acks::Memory
                };
                let mut sent = Vec::new();
                for sequence in 0.. {
                    let value = format!("producer {producer} record {sequence}");
                    let outcome = produce(&mut client, partition, &value, acks);
                    let done = !matches!(outcome, Outcome::Stored { .. });
                    if !done {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    sent.push(Sent {
                        partition,
                        value,
                        acks,
                        outcome,
                    });
                    if done {
                        break;
                    }
                }
                sent
            })
        })
        .collect()
}

/// What every producer sent, once each has seen its connection end.
fn join_producers(producers: Vec<JoinHandle<Vec<Sent>>>) -> Vec<Sent> {
    producers
        .into_iter()
        .flat_map(|producer| producer.join().expect("producer thread"))
        .collect()
}

fn wait_for_acks(acked: &AtomicU64, count: u64) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while acked.load(Ordering::Relaxed) < count {
        assert!(
            Instant::now() < deadline,
            "only {} acknowledgements within {STEP_TIMEOUT:?}",
            acked.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn signal(broker: &Serve, signal: libc::c_int) {
    // SAFETY: kill(2) with our own child's pid.
    let sent = unsafe { libc::kill(broker.child.id() as libc::pid_t, signal) };
    assert_eq!(sent, 0, "signal {signal} delivered");
}

/// Waits for a stderr line containing `text`; panics with what was seen otherwise.
fn wait_for_line(broker: &mut Serve, text: &str) -> String {
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match broker.lines.recv_timeout(left) {
            Ok(line) if line.contains(text) => return line,
            Ok(line) => seen.push(line),
            Err(_) => panic!("no line with {text:?}; stderr:\n{}", seen.join("\n")),
        }
    }
}

/// Every partition's values after a restart, by partition, with their offsets.
fn stored(address: SocketAddr) -> Vec<HashMap<u64, String>> {
    let mut client = RawClient::connect(address);
    (0..PARTITIONS)
        .map(|partition| {
            let records = client.fetch_all(TOPIC, partition, 0);
            let offsets = records.iter().map(|record| record.offset);
            offsets.zip(values(&records)).collect()
        })
        .collect()
}

#[test]
fn sigterm_under_produce_load_stores_every_acknowledged_record_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let arguments = ["--cores", "2"];
    let mut broker = Serve::start(&data_dir, "127.0.0.1:0", &arguments);
    let address = broker.wait_serving();
    RawClient::connect(address).create_topic(TOPIC, PARTITIONS);

    let acked = Arc::new(AtomicU64::new(0));
    let producers = start_producers(address, &acked);
    wait_for_acks(&acked, 400);
    signal(&broker, libc::SIGTERM);
    let (status, stderr) = broker.wait_exit();
    // The broker exits 1 once `shutdown_timeout_ms` has passed: 0 is the bound kept.
    assert_eq!(status.code(), Some(0), "{status:?}; stderr:\n{stderr}");
    assert!(stderr.contains("stopped cleanly"), "{stderr}");
    let sent = join_producers(producers);

    let mut broker = Serve::start(&data_dir, "127.0.0.1:0", &arguments);
    let log = stored(broker.wait_serving());
    let mut refused = 0;
    for record in &sent {
        let partition = &log[record.partition as usize];
        match record.outcome {
            // A clean stop flushes memory-acknowledged records too.
            Outcome::Stored { offset } => assert_eq!(
                partition.get(&offset),
                Some(&record.value),
                "acknowledged ({:?}) at {offset} but not stored there",
                record.acks
            ),
            Outcome::Refused(code) => {
                refused += 1;
                assert!(
                    !partition.values().any(|value| *value == record.value),
                    "{:?} refused ({code:?}) but stored",
                    record.value
                );
            }
            Outcome::Unanswered => {}
        }
    }
    let stored_count: usize = log.iter().map(HashMap::len).sum();
    let acked = acked.load(Ordering::Relaxed) as usize;
    assert!(
        stored_count >= acked,
        "{stored_count} stored, {acked} acknowledged"
    );
    println!("{acked} acknowledged, {refused} refused, {stored_count} stored");
}

#[test]
fn a_second_signal_during_the_stop_exits_at_once_keeping_durable_acknowledgements() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let arguments = ["--cores", "2"];
    // A stop that would take a minute (a slow disk): the second signal must not wait
    // for it. `wait_exit` gives up after STEP_TIMEOUT, half of that.
    let mut broker = Serve::start_with_env(
        &data_dir,
        "127.0.0.1:0",
        &arguments,
        &[("SHARDQ_TEST_STOP_DELAY_MS", "60000")],
    );
    let address = broker.wait_serving();
    RawClient::connect(address).create_topic(TOPIC, PARTITIONS);

    let acked = Arc::new(AtomicU64::new(0));
    let producers = start_producers(address, &acked);
    wait_for_acks(&acked, 400);
    signal(&broker, libc::SIGTERM);
    wait_for_line(&mut broker, "a second signal exits at once");
    // Signals within 1 s of the first count as that one delivered twice: send until one
    // counts (the stop itself would take a minute).
    let deadline = Instant::now() + STEP_TIMEOUT;
    while broker.child.try_wait().expect("try_wait").is_none() {
        assert!(Instant::now() < deadline, "SIGINT never ended the stop");
        signal(&broker, libc::SIGINT);
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, stderr) = broker.wait_exit();
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGINT),
        "{status:?}; stderr:\n{stderr}"
    );
    assert!(stderr.contains("exiting at once"), "{stderr}");
    let sent = join_producers(producers);

    let mut broker = Serve::start(&data_dir, "127.0.0.1:0", &arguments);
    let log = stored(broker.wait_serving());
    let mut durable = 0;
    for record in &sent {
        if let (Acks::Durable, Outcome::Stored { offset }) = (record.acks, &record.outcome) {
            durable += 1;
            assert_eq!(
                log[record.partition as usize].get(offset),
                Some(&record.value),
                "durably acknowledged at {offset} but lost"
            );
        }
    }
    assert!(durable > 0, "the load had durable acknowledgements");
}

#[test]
fn a_stop_past_shutdown_timeout_exits_1_saying_so_and_keeps_durable_acknowledgements() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    // The smallest bound allowed: shutdown_drain_ms + connection_linger_ms (2 s each).
    let arguments = ["--cores", "2", "--set", "shutdown_timeout_ms=4000"];
    let mut broker = Serve::start_with_env(
        &data_dir,
        "127.0.0.1:0",
        &arguments,
        &[("SHARDQ_TEST_STOP_DELAY_MS", "60000")],
    );
    let address = broker.wait_serving();
    let mut client = RawClient::connect(address);
    client.create_topic(TOPIC, PARTITIONS);
    let values = ["a", "b", "c"];
    for value in values {
        client
            .produce(TOPIC, 0, batch_of(&[value.as_bytes()]))
            .expect("durable produce");
    }
    drop(client);
    signal(&broker, libc::SIGTERM);
    let (status, stderr) = broker.wait_exit();
    assert_eq!(status.code(), Some(1), "{status:?}; stderr:\n{stderr}");
    assert!(
        stderr.contains("did not finish within shutdown_timeout_ms = 4000"),
        "{stderr}"
    );

    let mut broker = Serve::start(&data_dir, "127.0.0.1:0", &["--cores", "2"]);
    let mut client = RawClient::connect(broker.wait_serving());
    assert_eq!(common::values(&client.fetch_all(TOPIC, 0, 0)), values);
}

#[test]
fn sigterm_delivered_twice_at_once_as_timeout_sends_it_still_drains_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    // A stop slower than the repeat window (1 s), so the repeat lands inside the stop.
    let mut broker = Serve::start_with_env(
        &data_dir,
        "127.0.0.1:0",
        &["--cores", "1"],
        &[("SHARDQ_TEST_STOP_DELAY_MS", "3000")],
    );
    let address = broker.wait_serving();
    let mut client = RawClient::connect(address);
    client.create_topic(TOPIC, 1);
    client
        .produce(TOPIC, 0, batch_of(&[b"kept"]))
        .expect("durable produce");
    drop(client);
    // Two at once would merge into one pending signal: the repeat goes once the first
    // was taken, as timeout(1)'s second kill(2) can.
    signal(&broker, libc::SIGTERM);
    wait_for_line(&mut broker, "shutting down");
    signal(&broker, libc::SIGTERM);
    let (status, stderr) = broker.wait_exit();
    assert_eq!(status.code(), Some(0), "{status:?}; stderr:\n{stderr}");
    assert!(stderr.contains("taken as the same request"), "{stderr}");
    assert!(stderr.contains("stopped cleanly"), "{stderr}");
}

#[test]
fn a_signal_during_start_up_exits_at_once_without_serving() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    // A recovery that would take a minute (a large data directory).
    let mut broker = Serve::start_with_env(
        &data_dir,
        "127.0.0.1:0",
        &["--cores", "1"],
        &[("SHARDQ_TEST_RECOVERY_DELAY_MS", "60000")],
    );
    // Start-up is under way once the metrics endpoint listens (it answers during
    // recovery).
    wait_for_line(&mut broker, "metrics and health checks on");
    signal(&broker, libc::SIGTERM);
    let (status, stderr) = broker.wait_exit();
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGTERM),
        "{status:?}; stderr:\n{stderr}"
    );
    assert!(stderr.contains("during start-up"), "{stderr}");
    assert!(!stderr.contains("serving on"), "{stderr}");
}
