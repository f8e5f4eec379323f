//! Recovery of one segment over arbitrary bytes. `storage::fuzzing::scan_segment_bytes`
//! runs the production code `recovery::recover` runs per segment (load and verify the
//! index, scan in windows, judge the end, cut the last segment's tail, rewrite the index)
//! on a segment file and its `.index` held in memory, with no executor; it checks the
//! outcome against the bytes and recovers the result again, which must change nothing.
//!
//! The input is a `FuzzInput`: a control byte first (bit 0 makes the walked batches'
//! CRC32C right, since a fuzzer cannot forge it and everything behind the CRC check would
//! go unexercised; bit 1 gives them dense base offsets; bit 2 starts the index with their
//! entries; bit 3 recovers a sealed segment; bits 4-7 pick small scan windows and batch
//! bounds), the base offset, index interval and successor, then the index bytes and the
//! segment. The invariants are asserts in the entry point, shared with the property test
//! on stable (tests/recovery_properties.rs); here, what it reports must also agree with
//! itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardq::storage::fuzzing::{scan_segment_bytes, Outcome};

fuzz_target!(|data: &[u8]| {
    let Some(report) = scan_segment_bytes(data) else {
        return;
    };
    match (&report.scan, &report.outcome) {
        (Some(scan), Outcome::Kept { .. }) => {
            assert!(scan.end_position <= report.segment_after.len() as u64);
            assert!(scan.next_offset >= scan.start.offset);
            assert!(scan.index.len() >= scan.loaded_entries);
        }
        (Some(scan), Outcome::Refused { position, .. }) => {
            assert_eq!(*position, scan.end_position);
        }
        (None, outcome) => assert!(matches!(outcome, Outcome::Refused { .. })),
    }
});
