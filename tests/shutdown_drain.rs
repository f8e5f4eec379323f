//! A clean shutdown answers what it stored: every record found after a restart was
//! acknowledged to its producer before the connection closed, however the stop fell
//! among pipelined durable produces.
mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use common::*;
use shardq::protocol::*;

#[test]
fn records_stored_at_shutdown_were_all_acknowledged() {
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
