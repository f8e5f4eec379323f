//! Queue group costs (src/delivery/): recovery from a full journal tail and from a snapshot
//! of a full window with 10 million messages pending, and the receive + ack hot path.
//! Run: cargo bench --bench delivery
//! docs/queues.md ("Recovery") quotes these numbers.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use shardq::delivery::{
    encode_record, encode_snapshot, Actions, DeliveryHandle, HolderId, LogBounds, MessageMeta,
    NackDelay, QueueGroup, QueueGroupConfig, ReceiveRequest,
};

const PENDING: u64 = 10_000_000;

fn config() -> QueueGroupConfig {
    QueueGroupConfig {
        visibility_timeout_ms_default: 1_000_000,
        ..QueueGroupConfig::default()
    }
}

/// Runs the follow-up work an event asked for, as a shard would: journal records (encoded
/// into `journal`), DLQ appends (reported done at once), metadata reads (plain messages).
fn drive(group: &mut QueueGroup, out: &mut Actions, journal: &mut Vec<u8>, now: u64) {
    loop {
        for entry in &out.journal {
            encode_record(entry.seq, &entry.record, journal);
        }
        let dead_letters = std::mem::take(&mut out.dead_letters);
        let read = out.read_metadata.clone();
        for request in dead_letters {
            group.dead_lettered(request.offset, now, out);
            drive(group, out, journal, now);
        }
        let Some(range) = read else { return };
        let metas: Vec<_> = range.clone().map(|_| MessageMeta::plain(0)).collect();
        group.appended(range.start, &metas, now, out);
    }
}

fn receive(holder: u64, messages_max: u32) -> ReceiveRequest {
    ReceiveRequest {
        holder: HolderId(holder),
        messages_max,
        visibility_timeout_ms: None,
        bytes_max: u64::MAX,
        oversized_first: true,
    }
}

/// A journal of `records_min`+ records, written the expensive way: one record per ack
/// (nothing coalesced), one nack in three deliveries, messages dead-lettered.
fn journal_of(records_min: usize) -> (Vec<u8>, u64) {
    let mut out = Actions::default();
    let mut group = QueueGroup::create(config(), 0, &mut out);
    let mut journal = Vec::new();
    // Enough log for the run; recovery is then told the log holds PENDING messages.
    let metas: Vec<_> = (0..200_000).map(|_| MessageMeta::plain(0)).collect();
    group.appended(0, &metas, 0, &mut out);
    drive(&mut group, &mut out, &mut journal, 0);
    let mut now = 1;
    while (group.next_seq() as usize) <= records_min {
        now += 1;
        group.receive(receive(now % 7, 3), now, &mut out);
        let got = out.deliveries.clone();
        drive(&mut group, &mut out, &mut journal, now);
        if got.is_empty() {
            continue;
        }
        group.nack(&got[..1], NackDelay::Ms(0), b"bench", now, &mut out);
        drive(&mut group, &mut out, &mut journal, now);
        for handle in &got[1..] {
            group.ack(&[*handle], now, &mut out);
            drive(&mut group, &mut out, &mut journal, now);
        }
    }
    (journal, now)
}

/// A snapshot of a full window: every slot delivered, half leased and half waiting.
fn full_window_snapshot() -> (Vec<u8>, u64) {
    let config = QueueGroupConfig {
        in_flight_messages_max: config().window_messages_max,
        ..config()
    };
    let mut out = Actions::default();
    let mut group = QueueGroup::create(config, 0, &mut out);
    let mut journal = Vec::new();
    let metas: Vec<_> = (0..u64::from(config.window_messages_max))
        .map(|_| MessageMeta::plain(0))
        .collect();
    group.appended(0, &metas, 0, &mut out);
    let window = u64::from(config.window_messages_max);
    let mut leased = Vec::new();
    while (leased.len() as u64) < window {
        group.receive(receive(1, 1000), 1, &mut out);
        let got = out.deliveries.clone();
        drive(&mut group, &mut out, &mut journal, 1);
        if leased.len() as u64 >= window / 2 {
            group.nack(&got, NackDelay::Ms(500_000), b"", 1, &mut out);
            drive(&mut group, &mut out, &mut journal, 1);
        }
        leased.extend(got);
    }
    let mut bytes = Vec::new();
    encode_snapshot(&group.snapshot(), &mut bytes);
    (bytes, 2)
}

fn recovery(criterion: &mut Criterion) {
    let log = LogBounds {
        start: 0,
        end: PENDING,
    };
    let mut group = criterion.benchmark_group("delivery_recovery");
    group.sample_size(20);

    let (journal, now) = journal_of(100_000);
    group.throughput(criterion::Throughput::Bytes(journal.len() as u64));
    group.bench_function("journal_100k_records", |bencher| {
        let mut out = Actions::default();
        bencher.iter(|| {
            QueueGroup::recover(config(), None, black_box(&journal), log, now, &mut out)
                .expect("recovers")
        })
    });

    let (snapshot, now) = full_window_snapshot();
    group.throughput(criterion::Throughput::Bytes(snapshot.len() as u64));
    group.bench_function("snapshot_full_window_and_its_metadata", |bencher| {
        let mut out = Actions::default();
        let metas: Vec<_> = (0..u64::from(config().window_messages_max))
            .map(|_| MessageMeta::plain(0))
            .collect();
        bencher.iter(|| {
            let (mut recovered, _) = QueueGroup::recover(
                config(),
                Some(black_box(&snapshot)),
                &[],
                log,
                now,
                &mut out,
            )
            .expect("recovers");
            let range = out
                .read_metadata
                .clone()
                .expect("window metadata asked for");
            recovered.appended(
                range.start,
                &metas[..(range.end - range.start) as usize],
                now,
                &mut out,
            );
            recovered
        })
    });
    group.finish();
}

fn receive_and_ack(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("delivery_hot_path");
    const BATCH: u32 = 100;
    group.throughput(Throughput::Elements(u64::from(BATCH)));
    // Steady state of a group keeping up: 100 messages appended, received, acked.
    group.bench_function("append_receive_ack_100", |bencher| {
        let mut out = Actions::default();
        let mut queue = QueueGroup::create(config(), 0, &mut out);
        let mut handles: Vec<DeliveryHandle> = Vec::with_capacity(BATCH as usize);
        let metas = vec![MessageMeta::plain(0); BATCH as usize];
        let mut end = 0;
        let mut now = 0;
        bencher.iter(|| {
            now += 1;
            queue.appended(end, &metas, now, &mut out);
            end += u64::from(BATCH);
            queue.receive(receive(1, BATCH), now, &mut out);
            assert_eq!(out.deliveries.len(), BATCH as usize);
            handles.clear();
            handles.extend_from_slice(&out.deliveries);
            queue.ack(&handles, now, &mut out);
            black_box(out.journal.len())
        })
    });
    group.finish();
}

criterion_group!(benches, recovery, receive_and_ack);
criterion_main!(benches);
