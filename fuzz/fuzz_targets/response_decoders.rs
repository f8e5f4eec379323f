//! Every response decoder over arbitrary bytes (what a client reads from a broker it
//! does not trust): the first byte picks the opcode, the rest is the body. No panic; a
//! decoded response re-encodes to bytes that decode to the same value (not the same
//! bytes: a success status's message is dropped and unknown error codes read Internal),
//! and its vectored encoding is the same bytes.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use shardq::protocol::{
    decode_response, encode_response, encode_response_parts, Opcode, FRAME_HEADER_SIZE,
};

fuzz_target!(|data: &[u8]| {
    let Some((&opcode, body)) = data.split_first() else {
        return;
    };
    let Some(opcode) = Opcode::from_wire(opcode % 18 + 1) else {
        unreachable!("1..=18 are all opcodes");
    };
    let Ok(decoded) = decode_response(opcode, Bytes::copy_from_slice(body)) else {
        return;
    };
    let mut out = BytesMut::new();
    encode_response(&mut out, opcode, 1, decoded.as_ref());
    let again = decode_response(opcode, Bytes::copy_from_slice(&out[FRAME_HEADER_SIZE..]))
        .expect("a re-encoded response decodes");
    assert_eq!(again, decoded);
    let parts = encode_response_parts(opcode, 1, decoded.as_ref());
    assert_eq!(parts.concat(), out.to_vec());
});
