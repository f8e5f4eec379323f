//! Every request decoder over arbitrary bytes: the first byte picks the opcode, the rest
//! is the body. No panic; a decoded request keeps its counts within the `DecodeLimits`
//! and re-encodes to exactly the bytes it came from, so every declared length was backed
//! by them. Bodies are decoded twice: with the default limits and with tiny ones.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use shardq::protocol::{DecodeLimits, Opcode, Request, FRAME_HEADER_SIZE};

fn check(opcode: Opcode, body: &[u8], limits: &DecodeLimits) {
    let Ok(request) = Request::decode(opcode, Bytes::copy_from_slice(body), limits) else {
        return;
    };
    assert_eq!(request.opcode(), opcode);
    let (topics, partitions): (usize, usize) = match &request {
        Request::Metadata(request) => (request.topics.len(), 0),
        Request::Stats(request) => (request.topics.len(), 0),
        Request::ListOffsets(request) => (
            request.topics.len(),
            request.topics.iter().map(|t| t.partitions.len()).sum(),
        ),
        Request::Produce(request) => (
            request.topics.len(),
            request.topics.iter().map(|t| t.partitions.len()).sum(),
        ),
        Request::Fetch(request) => (
            request.topics.len(),
            request.topics.iter().map(|t| t.partitions.len()).sum(),
        ),
        _ => (0, 0),
    };
    assert!(topics <= limits.topics_per_request_max as usize);
    assert!(partitions <= limits.partitions_per_request_max as usize);
    let mut out = BytesMut::new();
    request.encode(1, &mut out);
    assert_eq!(
        &out[FRAME_HEADER_SIZE..],
        body,
        "decode then encode changed the bytes"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&opcode, body)) = data.split_first() else {
        return;
    };
    // Map every byte to an opcode so no input is wasted; 0 and 19.. are unknown on the
    // wire and never reach a decoder (the connection answers UnknownOpcode).
    let Some(opcode) = Opcode::from_wire(opcode % 18 + 1) else {
        unreachable!("1..=18 are all opcodes");
    };
    check(opcode, body, &DecodeLimits::default());
    check(
        opcode,
        body,
        &DecodeLimits {
            topics_per_request_max: 2,
            partitions_per_request_max: 3,
        },
    );
});
