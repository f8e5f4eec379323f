//! The bench message: a fixed 32-byte header followed by filler, so every consumed
//! message can be checked for loss, reordering and corruption without keeping a copy.
//!
//! Layout (all little-endian):
//! - `[0..4)` magic, `[4..8)` run id, `[8..12)` producer, `[12..16)` partition,
//! - `[16..24)` sequence, `[24..32)` send time in ns since the Unix epoch (the intended
//!   send time in fixed-rate mode), `[32..36)` CRC32C of bytes `[4..32)`,
//! - `[36..size)` the producer's filler: [`filler`]`(size, producer + 1)` from byte 36 on.
//!
//! Why filler and not a CRC of the whole message: the consumer regenerates the filler
//! once per producer and compares it (a memcmp, about twice as fast as CRC32C and nothing
//! at all on the producer), so the content check costs the load generator little; a
//! per-message CRC of 1 KiB on both sides was a tenth of the client's CPU in profiles.
//! The record batch's own CRC32C still covers every byte on the wire and on disk.
//!
//! Encoding writes into a caller's buffer (pre-built filler, no allocation); verifying
//! reads a `&[u8]` and returns the header or why it is bad.

use std::fmt;

/// Smallest message the bench can send: the header and its CRC alone.
pub const PAYLOAD_HEADER_SIZE: usize = 36;
const MAGIC: [u8; 4] = *b"SQB1";

/// What a bench message says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadHeader {
    pub run_id: u32,
    pub producer: u32,
    pub partition: u32,
    pub sequence: u64,
    pub sent_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayloadError {
    TooShort {
        size: usize,
    },
    BadMagic {
        found: [u8; 4],
    },
    Checksum {
        stored: u32,
        computed: u32,
    },
    /// The body differs from the producer's filler from this byte on.
    Content {
        at: usize,
    },
}

impl fmt::Display for PayloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PayloadError::TooShort { size } => write!(
                f,
                "message of {size} bytes is shorter than the {PAYLOAD_HEADER_SIZE}-byte bench header"
            ),
            PayloadError::BadMagic { found } => {
                write!(f, "message does not start with the bench magic: {found:02x?}")
            }
            PayloadError::Checksum { stored, computed } => write!(
                f,
                "header checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
            ),
            PayloadError::Content { at } => {
                write!(f, "content differs from what the producer sent from byte {at} on")
            }
        }
    }
}

impl std::error::Error for PayloadError {}

/// Filler for the body: bytes that are not all zero (so a zeroed page cannot pass for
/// a message) and not compressible to nothing. Built once per producer, with
/// `seed = producer + 1`, so a consumer can build the same.
pub fn filler(size: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..size)
        .map(|_| {
            // xorshift64: cheap, deterministic, good enough for filler.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Writes `header` into `message` (whose filler is already in place) and seals it.
/// `message.len()` is the message size; it must be at least [`PAYLOAD_HEADER_SIZE`].
pub fn encode(message: &mut [u8], header: &PayloadHeader) {
    assert!(
        message.len() >= PAYLOAD_HEADER_SIZE,
        "bench messages are at least the header"
    );
    message[0..4].copy_from_slice(&MAGIC);
    message[4..8].copy_from_slice(&header.run_id.to_le_bytes());
    message[8..12].copy_from_slice(&header.producer.to_le_bytes());
    message[12..16].copy_from_slice(&header.partition.to_le_bytes());
    message[16..24].copy_from_slice(&header.sequence.to_le_bytes());
    message[24..32].copy_from_slice(&header.sent_ns.to_le_bytes());
    let crc = crc32c::crc32c(&message[4..32]);
    message[32..36].copy_from_slice(&crc.to_le_bytes());
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Checks magic and the header's checksum and returns the header; the body is checked
/// by [`verify_body`] once the producer (and so the filler) is known.
pub fn verify(message: &[u8]) -> Result<PayloadHeader, PayloadError> {
    if message.len() < PAYLOAD_HEADER_SIZE {
        return Err(PayloadError::TooShort {
            size: message.len(),
        });
    }
    if message[0..4] != MAGIC {
        return Err(PayloadError::BadMagic {
            found: message[0..4].try_into().expect("4 bytes"),
        });
    }
    let stored = u32_at(message, 32);
    let computed = crc32c::crc32c(&message[4..32]);
    if stored != computed {
        return Err(PayloadError::Checksum { stored, computed });
    }
    Ok(PayloadHeader {
        run_id: u32_at(message, 4),
        producer: u32_at(message, 8),
        partition: u32_at(message, 12),
        sequence: u64_at(message, 16),
        sent_ns: u64_at(message, 24),
    })
}

/// Checks that the body is the producer's filler; `filler` is at least as long as the
/// message.
pub fn verify_body(message: &[u8], filler: &[u8]) -> Result<(), PayloadError> {
    assert!(filler.len() >= message.len(), "filler covers the message");
    let body = &message[PAYLOAD_HEADER_SIZE..];
    let expected = &filler[PAYLOAD_HEADER_SIZE..message.len()];
    if body == expected {
        return Ok(());
    }
    let at = body
        .iter()
        .zip(expected)
        .position(|(found, want)| found != want)
        .unwrap_or(0);
    Err(PayloadError::Content {
        at: PAYLOAD_HEADER_SIZE + at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PayloadHeader {
        PayloadHeader {
            run_id: 0xdead_beef,
            producer: 3,
            partition: 7,
            sequence: 123_456_789,
            sent_ns: 1_700_000_000_123_456_789,
        }
    }

    #[test]
    fn payload_round_trips_at_every_size_class() {
        for size in [36, 37, 100, 1024, 65_536] {
            let fill = filler(size, 42);
            let mut message = fill.clone();
            encode(&mut message, &header());
            assert_eq!(verify(&message), Ok(header()), "size {size}");
            assert_eq!(verify_body(&message, &fill), Ok(()), "size {size}");
        }
    }

    #[test]
    fn payload_flipped_bit_anywhere_is_caught() {
        let fill = filler(1024, 9);
        let mut message = fill.clone();
        encode(&mut message, &header());
        for at in [4, 16, 31, 32, 35] {
            let mut damaged = message.clone();
            damaged[at] ^= 0x10;
            assert!(
                matches!(verify(&damaged), Err(PayloadError::Checksum { .. })),
                "byte {at}"
            );
        }
        for at in [36, 500, 1023] {
            let mut damaged = message.clone();
            damaged[at] ^= 0x10;
            assert_eq!(verify(&damaged), Ok(header()));
            assert_eq!(
                verify_body(&damaged, &fill),
                Err(PayloadError::Content { at }),
                "byte {at}"
            );
        }
        // Another producer's filler does not pass.
        assert!(verify_body(&message, &filler(1024, 10)).is_err());
    }

    #[test]
    fn payload_rejects_short_and_foreign_messages() {
        assert_eq!(verify(&[0u8; 35]), Err(PayloadError::TooShort { size: 35 }));
        assert!(matches!(
            verify(b"hello, this is not a bench message at all"),
            Err(PayloadError::BadMagic { .. })
        ));
    }

    #[test]
    fn filler_is_deterministic_and_not_constant() {
        assert_eq!(filler(64, 5), filler(64, 5));
        let bytes = filler(4096, 5);
        assert!(bytes.iter().any(|byte| *byte != bytes[0]));
    }
}
