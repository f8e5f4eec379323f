//! Malformed input over a raw socket gets a typed error response or a closed connection
//! for that client only, while another client keeps producing and nothing stored is lost
//! (invariant 7).
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use common::*;
use shardq::protocol::*;

fn error_of(client: &mut RawClient) -> (u64, WireError) {
    let (id, raw_opcode, body) = client
        .read_frame()
        .expect("an error response before closing");
    let opcode = Opcode::from_wire(raw_opcode).unwrap_or(Opcode::Handshake);
    let error = decode_response(opcode, body)
        .expect("decodes")
        .expect_err("an error status");
    (id, error)
}

fn header(body_length: u32, version: u8, opcode: u8, correlation_id: u64) -> BytesMut {
    let mut out = BytesMut::new();
    out.put_u32_le(body_length);
    out.put_u8(version);
    out.put_u8(opcode);
    out.put_u16_le(0);
    out.put_u64_le(correlation_id);
    out
}

#[test]
fn malformed_frames_are_refused_while_another_client_keeps_producing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let mut admin = RawClient::connect(broker.addr());
    admin.create_topic("steady", 2);
    admin.create_topic("target", 1);

    // The bystander: produces continuously until told to stop, counting its acks.
    let stop = Arc::new(AtomicBool::new(false));
    let bystander = {
        let stop = Arc::clone(&stop);
        let addr = broker.addr();
        std::thread::spawn(move || {
            let mut client = RawClient::connect(addr);
            let mut acked = 0u64;
            while !stop.load(Ordering::Relaxed) || acked < 20 {
                let value = format!("m{acked}");
                let offset = client
                    .produce("steady", (acked % 2) as u32, batch_of(&[value.as_bytes()]))
                    .expect("the bystander's produce succeeds");
                assert_eq!(offset, acked / 2, "offsets stay dense per partition");
                acked += 1;
                assert!(acked < 1_000_000, "bounded loop");
            }
            acked
        })
    };

    // Garbage: the "version" byte is wrong, so the stream cannot be trusted: error, close.
    let mut garbage = RawClient::connect(broker.addr());
    garbage.send_bytes(&[0xab; 64]);
    let (_, error) = error_of(&mut garbage);
    assert_eq!(error.code, ErrorCode::UnsupportedVersion);
    assert!(garbage.is_closed_by_peer());

    // An oversized length: refused before any body is read, then closed.
    let mut oversized = RawClient::connect(broker.addr());
    oversized.send_bytes(&header(
        u32::MAX,
        PROTOCOL_VERSION,
        Opcode::Produce as u8,
        7,
    ));
    let (id, error) = error_of(&mut oversized);
    assert_eq!((id, error.code), (7, ErrorCode::FrameTooLarge));
    assert!(error
        .message
        .contains(&broker.config.frame_body_bytes_max.to_string()));
    assert!(oversized.is_closed_by_peer());

    // An unknown opcode with a sane length: refused, and the connection carries on.
    let mut unknown = RawClient::connect(broker.addr());
    let mut frame = header(4, PROTOCOL_VERSION, 200, 9);
    frame.put_u32_le(0xdead_beef);
    unknown.send_bytes(&frame);
    let (id, error) = error_of(&mut unknown);
    assert_eq!((id, error.code), (9, ErrorCode::UnknownOpcode));
    assert_eq!(
        unknown.produce("target", 0, batch_of(&[b"after-unknown"])),
        Ok(0)
    );

    // A body that does not decode (a produce cut short): refused, then closed.
    let mut truncated = RawClient::connect(broker.addr());
    let mut frame = header(3, PROTOCOL_VERSION, Opcode::Produce as u8, 11);
    frame.put_slice(&[2, 0, 0]);
    truncated.send_bytes(&frame);
    let (id, error) = error_of(&mut truncated);
    assert_eq!((id, error.code), (11, ErrorCode::MalformedFrame));
    assert!(truncated.is_closed_by_peer());

    // A batch whose CRC does not match: a typed per-partition error, nothing stored,
    // and the connection stays usable.
    let mut corrupt = RawClient::connect(broker.addr());
    let mut batch = batch_of(&[b"tampered"]).to_vec();
    let last = batch.len() - 3;
    batch[last] ^= 0x01;
    let result = corrupt.produce("target", 0, batch.into());
    assert_eq!(
        result.as_ref().map_err(|error| error.code),
        Err(ErrorCode::CorruptBatch)
    );
    assert!(result.unwrap_err().message.contains("CRC32C"));
    // A batch that lies about its record count: InvalidBatch.
    let mut lying = batch_of(&[b"x", b"y"]).to_vec();
    lying[28] = 3;
    let crc = batch::compute_crc(&lying);
    lying[20..24].copy_from_slice(&crc.to_le_bytes());
    let result = corrupt.produce("target", 0, lying.into());
    assert_eq!(
        result.map_err(|error| error.code),
        Err(ErrorCode::InvalidBatch)
    );
    assert_eq!(
        values(&corrupt.fetch_all("target", 0, 0)),
        vec!["after-unknown"]
    );

    stop.store(true, Ordering::Relaxed);
    let acked = bystander.join().expect("the bystander never saw an error");
    let mut reader = RawClient::connect(broker.addr());
    let mut stored = 0;
    for partition in 0..2u32 {
        let records = reader.fetch_all("steady", partition, 0);
        for (index, record) in records.iter().enumerate() {
            assert_eq!(record.offset, index as u64);
            assert_eq!(
                record.value,
                format!("m{}", index as u64 * 2 + u64::from(partition)).as_bytes()
            );
        }
        stored += records.len() as u64;
    }
    assert_eq!(
        stored, acked,
        "every acknowledged message of the bystander is stored"
    );
}

/// A batch whose timestamps are built by hand: `first` and `max` as given (the builder
/// derives max itself, so it is patched and the CRC recomputed).
fn batch_with_timestamps(first: i64, max: i64) -> bytes::Bytes {
    use shardq::protocol::batch::BatchBuilder;
    let mut builder = BatchBuilder::new(BytesMut::new());
    builder.push(first, None, b"stamped", &[]);
    let mut bytes = builder.finish().to_vec();
    bytes[40..48].copy_from_slice(&max.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[24..]);
    bytes[20..24].copy_from_slice(&crc.to_le_bytes());
    bytes.into()
}

#[test]
fn impossible_or_far_future_timestamps_are_refused_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start_with(shardq::config::ServerConfig {
        timestamp_future_ms_max: 60_000,
        ..test_config(dir.path(), 1)
    });
    let mut client = RawClient::connect(broker.addr());
    client.create_topic("times", 1);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    for (first, max, why) in [
        (now, i64::MAX, "i64::MAX would poison the time index"),
        (now, now + 3_600_000, "an hour ahead, past the 60 s limit"),
        (-5, 10, "before 1970"),
        (now, now - 1, "max below first"),
    ] {
        let error = client
            .produce("times", 0, batch_with_timestamps(first, max))
            .expect_err(why);
        assert_eq!(error.code, ErrorCode::InvalidTimestamp, "{why}: {error}");
    }
    // Within the limit (a producer clock a little ahead) is fine.
    assert_eq!(
        client.produce("times", 0, batch_with_timestamps(now, now + 5_000)),
        Ok(0),
        "nothing refused took an offset"
    );
    assert_eq!(client.fetch_all("times", 0, 0).len(), 1);
}
