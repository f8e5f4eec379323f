//! Property tests of recovery's segment scan on stable: the `recovery_scan` fuzz target's
//! entry point (`shardq::storage::fuzzing`), run under `cargo test` so CI checks its
//! invariants without a nightly compiler or libFuzzer.
//!
//! Every case recovers one segment (and its `.index`) held in memory with the production
//! code, and the entry point checks the outcome against the bytes and recovers the result
//! again (the invariants are listed in src/storage/fuzzing.rs). On top of that, segments
//! built here from real batches are compared with a model of what must be recovered: the
//! whole batches written before a torn, garbage, zero or stale tail; a refusal for a
//! batch that repeats recovered offsets or is of format 1.
//!
//! Case counts are modest so the whole file runs in seconds; proptest prints the seed and
//! the minimal failing input of any failure (and saves it under proptest-regressions/).
//! `dump_fuzz_seeds` (ignored) writes segment images built here as the fuzz target's
//! seeds; the regression tests at the end hold the exact bytes of what the fuzzer found.

use bytes::BytesMut;
use proptest::prelude::*;
use shardq::protocol::batch::{compute_crc, stamp_batch, BatchBuilder, BATCH_HEADER_SIZE};
use shardq::storage::fuzzing::{
    recover_segment_image, scan_segment_bytes, FuzzInput, Outcome, ScanStop, SegmentImage,
};
use shardq::storage::ALIGNMENT_BYTES;

const CASES: u32 = 512;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// Segments built from real batches, and what recovery must make of them.

/// One batch as a producer sends it: timestamps, and each record's value.
type BatchSpec = (i64, Vec<Vec<u8>>);

fn batch_spec() -> impl Strategy<Value = BatchSpec> {
    (
        0i64..1 << 45,
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..48), 1..5),
    )
}

/// The batch's bytes, stamped as the broker stores it.
fn stored_batch(spec: &BatchSpec, base_offset: u64, append_time_ms: i64) -> Vec<u8> {
    let (timestamp_ms, values) = spec;
    let mut builder = BatchBuilder::new(BytesMut::new());
    for (index, value) in values.iter().enumerate() {
        builder.push(timestamp_ms + index as i64, None, value, &[]);
    }
    let mut bytes = builder.finish().to_vec();
    stamp_batch(&mut bytes, base_offset, append_time_ms);
    bytes
}

/// What follows the last whole batch.
#[derive(Debug, Clone)]
enum Tail {
    /// The end of the file.
    Nothing,
    /// Zero padding up to the end of the last block, and this many blocks more.
    Zeros(usize),
    /// The first `cut_per_mille` thousandths of one more batch, the rest lost in a crash.
    Torn {
        spec: BatchSpec,
        cut_per_mille: usize,
    },
    /// Bytes of no batch.
    Garbage(Vec<u8>),
    /// A whole batch from an earlier life of a recycled file: its offsets lie below the
    /// segment's base.
    Stale { spec: BatchSpec, below: u64 },
    /// A whole batch that repeats the offsets of recovered batch `of` (a flipped base
    /// offset, or a second writer): corrupt.
    Repeat { of: prop::sample::Index },
    /// A whole batch of format 1 (magic 1, its CRC right): an old log, refused.
    FormatOne { spec: BatchSpec },
}

fn tail() -> impl Strategy<Value = Tail> {
    prop_oneof![
        Just(Tail::Nothing),
        (0usize..2).prop_map(Tail::Zeros),
        (batch_spec(), 0usize..1000).prop_map(|(spec, cut_per_mille)| Tail::Torn {
            spec,
            cut_per_mille
        }),
        proptest::collection::vec(any::<u8>(), 1..200).prop_map(Tail::Garbage),
        (batch_spec(), 1u64..1000).prop_map(|(spec, below)| Tail::Stale { spec, below }),
        any::<prop::sample::Index>().prop_map(|of| Tail::Repeat { of }),
        batch_spec().prop_map(|spec| Tail::FormatOne { spec }),
    ]
}

/// How the index file looks.
#[derive(Debug, Clone)]
enum IndexFile {
    Missing,
    /// Entries for the first `kept` batches, then these bytes (a torn block, stale
    /// entries pointing past the data).
    Prefix {
        kept: usize,
        garbage: Vec<u8>,
    },
    Garbage(Vec<u8>),
}

fn index_file() -> impl Strategy<Value = IndexFile> {
    prop_oneof![
        Just(IndexFile::Missing),
        (0usize..8, proptest::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(kept, garbage)| IndexFile::Prefix { kept, garbage }),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(IndexFile::Garbage),
    ]
}

#[derive(Debug, Clone)]
struct BuiltSegment {
    image: SegmentImage,
    /// Bytes and offsets of the whole batches written before the tail.
    whole_bytes: u64,
    next_offset: u64,
    /// A tail recovery must cut (last segment), refuse, or neither.
    expect_cut: bool,
    expect_refusal: bool,
}

fn index_entry(offset: u64, base_offset: u64, position: u64, timestamp_ms: i64) -> [u8; 16] {
    let mut entry = [0u8; 16];
    entry[0..4].copy_from_slice(&((offset - base_offset) as u32).to_le_bytes());
    entry[4..8].copy_from_slice(&(position as u32).to_le_bytes());
    entry[8..16].copy_from_slice(&timestamp_ms.to_le_bytes());
    entry
}

#[allow(clippy::too_many_arguments)]
fn build_segment(
    specs: &[BatchSpec],
    base_offset: u64,
    tail: &Tail,
    index: &IndexFile,
    sealed: bool,
    window: usize,
    small_batch_max: bool,
    index_interval_bytes: u32,
) -> BuiltSegment {
    let mut segment = Vec::new();
    let mut next_offset = base_offset;
    let mut entries = Vec::new();
    let mut max_timestamp_ms = i64::MIN;
    let mut starts = Vec::new();
    for (number, spec) in specs.iter().enumerate() {
        let batch = stored_batch(spec, next_offset, 1_000 + number as i64);
        starts.push((segment.len(), batch.len()));
        max_timestamp_ms = max_timestamp_ms.max(spec.0 + spec.1.len() as i64 - 1);
        entries.push(index_entry(
            next_offset,
            base_offset,
            segment.len() as u64,
            max_timestamp_ms,
        ));
        next_offset += spec.1.len() as u64;
        segment.extend_from_slice(&batch);
    }
    let whole_bytes = segment.len() as u64;
    let mut largest_batch = starts.iter().map(|(_, length)| *length).max().unwrap_or(0);
    let (mut expect_cut, mut expect_refusal) = (false, false);
    match tail {
        Tail::Nothing => {}
        Tail::Zeros(blocks) => {
            let padded = segment.len().div_ceil(ALIGNMENT_BYTES) * ALIGNMENT_BYTES;
            segment.resize(padded + blocks * ALIGNMENT_BYTES, 0);
        }
        Tail::Torn {
            spec,
            cut_per_mille,
        } => {
            let batch = stored_batch(spec, next_offset, 9_999);
            let cut = batch.len() * cut_per_mille / 1000;
            segment.extend_from_slice(&batch[..cut]);
            expect_cut = cut >= BATCH_HEADER_SIZE;
        }
        Tail::Garbage(bytes) => {
            segment.extend_from_slice(bytes);
            let header = bytes.get(..BATCH_HEADER_SIZE);
            expect_cut = header.is_some_and(|header| header.iter().any(|byte| *byte != 0));
        }
        Tail::Stale { spec, below } => {
            if let Some(stale_base) = base_offset.checked_sub(*below) {
                let batch = stored_batch(spec, stale_base, 5);
                largest_batch = largest_batch.max(batch.len());
                segment.extend_from_slice(&batch);
            }
        }
        Tail::Repeat { of } => {
            let (start, length) = starts[of.index(starts.len())];
            let copy = segment[start..start + length].to_vec();
            segment.extend_from_slice(&copy);
            expect_refusal = true;
        }
        Tail::FormatOne { spec } => {
            let mut batch = stored_batch(spec, next_offset, 7);
            batch[24] = 1;
            let crc = compute_crc(&batch);
            batch[20..24].copy_from_slice(&crc.to_le_bytes());
            largest_batch = largest_batch.max(batch.len());
            segment.extend_from_slice(&batch);
            expect_refusal = true;
        }
    }
    let index = match index {
        IndexFile::Missing => None,
        IndexFile::Prefix { kept, garbage } => {
            let mut bytes: Vec<u8> = entries.iter().take(*kept).flatten().copied().collect();
            bytes.extend_from_slice(garbage);
            Some(bytes)
        }
        IndexFile::Garbage(bytes) => Some(bytes.clone()),
    };
    // Every whole batch here fits the scan's bounds; the fuzz target tries smaller ones.
    let batch_bytes_max = if small_batch_max {
        window.max(largest_batch)
    } else {
        256 << 20
    };
    // A sealed segment whose successor starts where its batches end is whole, whatever
    // follows them; but the scan stops at a batch of format 1 before it knows that (an
    // old log: recovery never guesses about one).
    if sealed {
        expect_cut = false;
        expect_refusal = matches!(tail, Tail::FormatOne { .. });
    }
    BuiltSegment {
        image: SegmentImage {
            segment,
            index,
            base_offset,
            next_base_offset: sealed.then_some(next_offset),
            index_interval_bytes,
            scan_window_bytes: window.min(batch_bytes_max),
            batch_bytes_max,
        },
        whole_bytes,
        next_offset,
        expect_cut,
        expect_refusal,
    }
}

fn built_segment() -> impl Strategy<Value = BuiltSegment> {
    (
        proptest::collection::vec(batch_spec(), 1..6),
        prop_oneof![Just(0u64), 1u64..1 << 20, 1u64 << 40..1 << 62],
        tail(),
        index_file(),
        any::<bool>(),
        prop::sample::select(FuzzInput::WINDOWS.to_vec()),
        any::<bool>(),
        prop_oneof![1u32..300, Just(4096u32)],
    )
        .prop_map(
            |(specs, base_offset, tail, index, sealed, window, small_batch_max, interval)| {
                build_segment(
                    &specs,
                    base_offset,
                    &tail,
                    &index,
                    sealed,
                    window,
                    small_batch_max,
                    interval,
                )
            },
        )
}

// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// Segments of real batches: recovery keeps exactly the whole batches before the
    /// tail, cuts a torn one, refuses a repeat of recovered offsets or an old format.
    #[test]
    fn recovery_keeps_the_whole_batches_before_any_tail(built in built_segment()) {
        let report = recover_segment_image(&built.image);
        if built.expect_refusal {
            let refused = matches!(
                &report.outcome,
                Outcome::Refused { position, .. } if *position == built.whole_bytes
            );
            prop_assert!(refused, "{:?}", report.outcome);
            return Ok(());
        }
        let scan = report.scan.as_ref().unwrap_or_else(|| panic!("no scan: {:?}", report.outcome));
        prop_assert_eq!(scan.end_position, built.whole_bytes);
        prop_assert_eq!(scan.next_offset, built.next_offset);
        prop_assert!(!scan.index.is_empty(), "the first batch is indexed");
        match &report.outcome {
            Outcome::Kept { cut } => prop_assert_eq!(cut.is_some(), built.expect_cut),
            refused => prop_assert!(false, "refused: {:?}", refused),
        }
        if !built.expect_cut && built.image.next_base_offset.is_none() {
            prop_assert_eq!(&scan.stop, &ScanStop::Clean);
        }
    }

    /// The same segments with a few bytes overwritten anywhere (header fields outside
    /// the CRC too): no panic, and every invariant of the entry point holds.
    #[test]
    fn recovery_of_damaged_segments_keeps_its_invariants(
        built in built_segment(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        fix_crc in any::<bool>(),
    ) {
        let mut image = built.image;
        for (at, byte) in &flips {
            let at = at.index(image.segment.len());
            image.segment[at] = *byte;
        }
        if fix_crc {
            // Make the walked batches' CRCs right again, so the damage reaches behind
            // the CRC check (a flipped base offset, length or record count).
            let input = FuzzInput {
                control: FuzzInput::CONTROL_FIX_CRC,
                base_offset: image.base_offset,
                index_interval_bytes: 1,
                index_entries_kept: 0,
                successor_delta: 0,
                index: None,
                segment: &image.segment,
            };
            image.segment = input.image().segment;
        }
        recover_segment_image(&image);
    }

    /// Arbitrary bytes in the fuzz target's layout, every control bit included.
    #[test]
    fn recovery_of_arbitrary_bytes_keeps_its_invariants(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        scan_segment_bytes(&bytes);
    }

    /// The fuzz target's layout over segments of real batches, with random control
    /// bytes, base offsets (near u64::MAX too), index intervals and successors.
    #[test]
    fn recovery_of_fuzz_inputs_keeps_its_invariants(
        built in built_segment(),
        control in any::<u8>(),
        base_offset in prop_oneof![any::<u64>(), u64::MAX - 64..=u64::MAX, Just(0u64)],
        index_interval_bytes in any::<u16>(),
        index_entries_kept in any::<u8>(),
        successor_delta in any::<i8>(),
    ) {
        let input = FuzzInput {
            control,
            base_offset,
            index_interval_bytes,
            index_entries_kept,
            successor_delta,
            index: built.image.index.as_deref().filter(|index| index.len() < 0xffff),
            segment: &built.image.segment,
        };
        let encoded = input.encode();
        prop_assert_eq!(FuzzInput::parse(&encoded), Some(input));
        scan_segment_bytes(&encoded);
    }
}

/// A fixed example of the model, so a failure names the scenario: three batches, the
/// fourth torn by a crash, no index.
#[test]
fn recovery_cuts_a_torn_fourth_batch() {
    let spec: BatchSpec = (1_000, vec![b"alpha".to_vec(), b"beta".to_vec()]);
    let built = build_segment(
        &[spec.clone(), spec.clone(), spec.clone()],
        42,
        &Tail::Torn {
            spec,
            cut_per_mille: 900,
        },
        &IndexFile::Missing,
        false,
        1 << 20,
        false,
        4096,
    );
    let report = recover_segment_image(&built.image);
    let scan = report.scan.expect("scanned");
    assert_eq!(scan.next_offset, 48);
    assert_eq!(scan.end_position, built.whole_bytes);
    assert!(
        matches!(report.outcome, Outcome::Kept { cut: Some(_) }),
        "{:?}",
        report.outcome
    );
}

// ---------------------------------------------------------------------------------------
// What the property tests and the fuzzer found, as the exact inputs (the fuzz target's
// layout, in hex) that first failed.

fn hex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text
        .bytes()
        .filter(|byte| !byte.is_ascii_whitespace())
        .collect();
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
        .collect()
}

/// Found by `recovery_of_fuzz_inputs_keeps_its_invariants`: a segment based at
/// u64::MAX - 64 whose index holds an entry 65 offsets on. `decode_entries` added them
/// unchecked, an overflow panic in debug builds (and a wrapped offset in release). The
/// entry now ends the index's valid prefix, and the scan starts at byte 0.
#[test]
fn recovery_regression_index_entry_past_u64_max() {
    let input = hex("
    5cbfffffffffffffff00000100ffff0000000000000000e8030000000000005600000000eee34c02
    00000001000000000000000000000000000000000000000000000000000000000000000000000012
    0000000000000000000000ffffffff000000000000
        ");
    let report = scan_segment_bytes(&input).expect("a whole input");
    let scan = report.scan.expect("scanned");
    assert_eq!(scan.loaded_entries, 0);
    assert_eq!(scan.start.offset, u64::MAX - 64);
    // The batch at byte 0 (base offset 0) lies below the segment's base: stale, clean.
    assert_eq!(scan.stop, ScanStop::Clean);
    assert_eq!(scan.next_offset, u64::MAX - 64);
}

/// Found by `recovery_of_fuzz_inputs_keeps_its_invariants`: a segment based at
/// u64::MAX - 6 whose third batch, at the next offset, holds 3 records: its next offset
/// (`BatchHeader::next_offset`) overflowed, a panic in debug builds and a next offset of 0
/// in release, from which new appends would have reused offsets. Recovery now refuses.
#[test]
fn recovery_regression_batch_offsets_past_u64_max() {
    let input = hex("
    daf9ffffffffffffff00000000ffff0000000000000000e8030000000000006c000000e6e9ec4702
    00000002000000000000000000000001000000000000000000000000000000000000000000000012
    0000000000000000000000ffffffff000000000000120000000100000001000000ffffffff000000
    0000000200000000000000e9030000000000006c000000e6e9ec4702000000020000000000000000
    000000010000000000000000000000000000000000000000000000120000000000000000000000ff
    ffffff000000000000120000000100000001000000ffffffff0000000000000400000000000000ea
    0300000000000082000000e8a4597302000000030000000000000000000000020000000000000000
    000000000000000000000000000000120000000000000000000000ffffffff000000000000120000
    000100000001000000ffffffff000000000000120000000200000002000000ffffffff0000000000
    00
        ");
    let report = scan_segment_bytes(&input).expect("a whole input");
    let scan = report.scan.expect("scanned");
    assert_eq!((scan.end_position, scan.next_offset), (216, u64::MAX - 2));
    assert!(matches!(scan.stop, ScanStop::Corrupt { .. }));
    assert!(matches!(
        report.outcome,
        Outcome::Refused { position: 216, .. }
    ));
}

/// Found by the `recovery_scan` fuzz target within its first 15,000 executions: a
/// 166-byte batch at the next offset, its CRC right, claiming 4,294,967,294 records (the
/// scan checks framing and CRC, not each record). Recovery took it, the index gained an
/// entry for the batch after it, 2^32 + 1 offsets past the segment's base, and rewriting
/// the index panicked (`encode_entries`: "segments hold below 2^32 offsets"), so the
/// partition could never open. Recovery now refuses such a batch as corrupt.
#[test]
fn recovery_regression_batch_offsets_past_what_a_segment_indexes() {
    let input = hex("
    631ce8e073c6fca0242d000200ffff1ce8e073c6fca024e803000000000000d1000000c942c34402
    0000000300000051ff3f3ea60f000053ff3f3ea60f0000000000000000000000000000000000001a
    0000000000000000000000ffffffff080000007e80b4ebf521a47e00003500000001000000010000
    00ffffffff230000000af59c64d2f047bcfcb75e844765739acf992337d554f8b53b8126db373518
    8bf6df930000360000000200000002000000ffffffff24000000dbfe3804f043bb9333cf036c6087
    656552a0a98960401fa579891d99fc142cb57c4ee91a00001fe8e073c6fca024e903000000000000
    a60000006dacc4f402000000feffffff80918709c0170000806e7109c01700000000000000000000
    0000000000000000200000000000000000000000ffffffff0e0000008652ff444710d301edea873a
    fb4d00003e0000000100000001000000ffffffff2c000000bf237646a51e605c79887229d0d3e5ad
    32bd10bb6a3a2deffb194633e44280669d609ff0227a88bbc6fb76b0000021e8e073c6fca024ea03
    0000000000006c0000005d4488d60200000001000000c7940fcbb91d0000c7940fcbb91d00000000
    0000000000000000000000000000280000000000000000000000ffffffff16000000d2abcabeb04d
    15e10c893d59264f5dc2e08584bb368e000022e8e073c6fca024eb03000000000000820000001898
    d7670200000001000000b5470b405d1c0000b5470b405d1c00000000000000000000000000000000
    00003e0000000000000000000000ffffffff2c00000073b9f4dca45b0ef3837d4d19aeb60fc0981d
    7f966b465d4f3447e72a1d027622d0c8cba0736079351fa365310000
        ");
    let report = scan_segment_bytes(&input).expect("a whole input");
    let scan = report.scan.expect("scanned");
    assert_eq!(scan.end_position, 209);
    assert_eq!(scan.next_offset - scan.start.offset, 3);
    assert!(matches!(scan.stop, ScanStop::Corrupt { .. }));
    assert!(matches!(
        report.outcome,
        Outcome::Refused { position: 209, .. }
    ));
}

/// Writes segment images built as above as the `recovery_scan` fuzz target's seeds:
/// `cargo test --test recovery_properties -- --ignored dump_fuzz_seeds`
/// (scripts/fuzz.sh runs it when the corpus is missing).
#[test]
#[ignore = "writes fuzz/corpus/; run by scripts/fuzz.sh"]
fn dump_fuzz_seeds() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRng, TestRunner};
    let directory =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/recovery_scan");
    std::fs::create_dir_all(&directory).expect("create corpus directory");
    let seed = [9u8; 32];
    println!("seed corpus from proptest with fixed seed {seed:?}");
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(proptest::test_runner::RngAlgorithm::ChaCha, &seed),
    );
    for number in 0..48u8 {
        let built = built_segment().new_tree(&mut runner).unwrap().current();
        let image = &built.image;
        // The walk's fixes keep a valid image as it is, and keep the fuzzer's mutations
        // of it valid; the scan window is the image's (production's or a small one).
        let window = FuzzInput::WINDOWS
            .iter()
            .position(|window| *window == image.scan_window_bytes)
            .unwrap_or(0) as u8;
        let sealed = if image.next_base_offset.is_some() {
            FuzzInput::CONTROL_SEALED
        } else {
            0
        };
        let derived_index = if number % 2 == 1 {
            FuzzInput::CONTROL_DERIVED_INDEX
        } else {
            0
        };
        let control = FuzzInput::CONTROL_FIX_CRC
            | FuzzInput::CONTROL_DENSE_OFFSETS
            | sealed
            | derived_index
            | (window << 4);
        let input = FuzzInput {
            control,
            base_offset: image.base_offset,
            index_interval_bytes: image.index_interval_bytes.min(u32::from(u16::MAX)) as u16,
            index_entries_kept: number % 4,
            successor_delta: 0,
            index: image.index.as_deref().filter(|index| index.len() < 0xffff),
            segment: &image.segment,
        };
        let bytes = input.encode();
        scan_segment_bytes(&bytes).expect("a whole input");
        std::fs::write(directory.join(format!("segment-{number}")), &bytes).expect("write seed");
    }
}
