//! Hot-path codec costs: CRC32C and batch validation against a memcpy of the same bytes
//! (the raw-memory baseline, measured in the same run), and produce frame encode/decode.
//! Run: cargo bench --bench protocol

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use shardq::protocol::batch::{validate_batch, BatchBuilder};
use shardq::protocol::{
    decode_frame_header, Acks, DecodeLimits, Decoded, Opcode, ProducePartition, ProduceRequest,
    ProduceTopic, Request, FRAME_HEADER_SIZE,
};

/// A batch of `count` records of `size` bytes each: the shape of the W1 workload.
fn batch(count: usize, size: usize) -> Bytes {
    let mut builder = BatchBuilder::new(BytesMut::with_capacity(count * (size + 32) + 64));
    let value = vec![0x5a; size];
    for _ in 0..count {
        builder.push(1_700_000_000_000, None, &value, &[]);
    }
    builder.finish()
}

fn checksum_and_validation(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("batch_1000x1KiB");
    let batch = batch(1000, 1024);
    group.throughput(Throughput::Bytes(batch.len() as u64));
    let mut target = vec![0u8; batch.len()];
    group.bench_function("memcpy_baseline", |bencher| {
        bencher.iter(|| target.copy_from_slice(black_box(&batch)))
    });
    group.bench_function("crc32c", |bencher| {
        bencher.iter(|| crc32c::crc32c(black_box(&batch)))
    });
    group.bench_function("validate_batch", |bencher| {
        bencher.iter(|| validate_batch(black_box(&batch), 100_000).expect("valid"))
    });
    group.bench_function("build_batch", |bencher| {
        let value = vec![0x5a; 1024];
        let mut buffer = BytesMut::with_capacity(batch.len());
        bencher.iter(|| {
            let mut builder = BatchBuilder::new(std::mem::take(&mut buffer));
            for _ in 0..1000 {
                builder.push(1_700_000_000_000, None, &value, &[]);
            }
            let sealed = builder.finish();
            buffer = BytesMut::from(&sealed[..0]);
            buffer.reserve(sealed.len());
            sealed
        })
    });
    group.finish();
}

fn produce_frames(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("produce_frame");
    for partitions in [1u32, 16] {
        let request = Request::Produce(ProduceRequest {
            acks: Acks::Durable,
            timeout_ms: 0,
            topics: vec![ProduceTopic {
                name: "orders".into(),
                partitions: (0..partitions)
                    .map(|partition| ProducePartition {
                        partition,
                        batch: batch(100, 1024),
                    })
                    .collect(),
            }],
        });
        let mut encoded = BytesMut::new();
        request.encode(1, &mut encoded);
        let encoded = encoded.freeze();
        group.throughput(Throughput::Bytes(encoded.len() as u64));
        group.bench_with_input(
            BenchmarkId::new("encode", partitions),
            &request,
            |bencher, request| {
                let mut out = BytesMut::with_capacity(encoded.len());
                bencher.iter(|| {
                    out.clear();
                    request.encode(1, &mut out);
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("decode", partitions),
            &encoded,
            |bencher, encoded| {
                let limits = DecodeLimits::default();
                bencher.iter(|| {
                    let Ok(Decoded::Complete(header)) = decode_frame_header(encoded, u32::MAX)
                    else {
                        panic!("a whole frame")
                    };
                    let body = encoded.slice(FRAME_HEADER_SIZE..header.frame_length());
                    Request::decode(Opcode::Produce, body, &limits).expect("decodes")
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, checksum_and_validation, produce_frames);
criterion_main!(benches);
