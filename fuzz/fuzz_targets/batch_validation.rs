//! Batch validation over arbitrary bytes: `check_framing`, `validate_batch` and
//! `decode_records`. The first byte is a control byte: bit 0 makes the CRC right before
//! checking (a fuzzer cannot forge CRC32C, and everything behind the CRC check would
//! otherwise go unexercised), bits 1..4 pick `records_max`. No panic; what passes is
//! backed by the bytes; a batch `validate_batch` accepts decodes into exactly its
//! `record_count` records with dense offsets, unless those offsets pass u64::MAX, which
//! `decode_records` refuses.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use shardq::protocol::batch::{
    check_framing, compute_crc, decode_records, validate_batch, BatchError, BATCH_CRC_START,
    BATCH_HEADER_SIZE,
};

fuzz_target!(|data: &[u8]| {
    let Some((&control, bytes)) = data.split_first() else {
        return;
    };
    let mut bytes = bytes.to_vec();
    if control & 1 == 1 && bytes.len() >= BATCH_HEADER_SIZE {
        let declared = u32::from_le_bytes(bytes[16..20].try_into().unwrap()) as usize;
        let length = declared.clamp(BATCH_CRC_START, bytes.len());
        let crc = compute_crc(&bytes[..length]);
        bytes[20..24].copy_from_slice(&crc.to_le_bytes());
    }
    let records_max = u32::from(control >> 1 & 0xf);

    if let Ok(header) = check_framing(&bytes) {
        assert!(header.batch_length as usize >= BATCH_HEADER_SIZE);
        assert!(header.batch_length as usize <= bytes.len());
        assert!(header.record_count >= 1);
    }
    let validated = validate_batch(&bytes, records_max);
    if let Ok(header) = &validated {
        assert_eq!(header.batch_length as usize, bytes.len());
        assert!(header.record_count <= records_max);
    }
    let mut records = Vec::new();
    let decoded = decode_records(&Bytes::from(bytes), 0, &mut records);
    if let Ok(header) = validated {
        let last_delta = u64::from(header.record_count - 1);
        if header.base_offset.checked_add(last_delta).is_none() {
            assert!(matches!(decoded, Err(BatchError::OffsetOverflow { .. })));
            return;
        }
        decoded.expect("a valid batch decodes");
        assert_eq!(records.len(), header.record_count as usize);
        for (index, record) in records.iter().enumerate() {
            assert_eq!(record.offset, header.base_offset + index as u64);
        }
    }
});
