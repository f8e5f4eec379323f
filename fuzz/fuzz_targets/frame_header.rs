//! The frame header decoder over arbitrary bytes: no panic; `Incomplete` only below the
//! header size; a decoded header has the supported version, a length within the limit,
//! and fields that are the bytes' own. The first 4 bytes pick the length limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardq::protocol::{
    decode_frame_header, peek_correlation_id, Decoded, ProtocolError, FRAME_HEADER_SIZE,
    PROTOCOL_VERSION,
};

fuzz_target!(|data: &[u8]| {
    let (limit, bytes) = match data.split_first_chunk::<4>() {
        Some((limit, bytes)) => (u32::from_le_bytes(*limit), bytes),
        None => (u32::MAX, data),
    };
    match decode_frame_header(bytes, limit) {
        Ok(Decoded::Incomplete { need }) => {
            assert!(bytes.len() < FRAME_HEADER_SIZE);
            assert_eq!(need, FRAME_HEADER_SIZE);
        }
        Ok(Decoded::Complete(header)) => {
            assert_eq!(header.version, PROTOCOL_VERSION);
            assert!(header.body_length <= limit);
            assert_eq!(header.body_length.to_le_bytes(), bytes[0..4]);
            assert_eq!(header.opcode, bytes[5]);
            assert_eq!(Some(header.correlation_id), peek_correlation_id(bytes));
            assert_eq!(
                header.frame_length(),
                FRAME_HEADER_SIZE + header.body_length as usize
            );
        }
        Err(ProtocolError::UnsupportedVersion { version }) => assert_eq!(version, bytes[4]),
        Err(ProtocolError::FrameTooLarge { body_length, .. }) => assert!(body_length > limit),
        Err(other) => panic!("unexpected error {other:?}"),
    }
});
