//! Scenario tests of the queue group state machine, with a manual clock: every "wait" is a
//! number passed as `now`.

use super::*;

const PARTITION: u32 = 3;

fn config() -> QueueGroupConfig {
    QueueGroupConfig {
        partition: PARTITION,
        window_messages_max: 64,
        in_flight_messages_max: 16,
        receive_messages_max: 100,
        handles_per_request_max: 100,
        visibility_timeout_ms_default: 1000,
        visibility_timeout_ms_max: 100_000,
        deliveries_max: 3,
        retry: RetryPolicy {
            delay_ms_min: 100,
            delay_ms_max: 1000,
            multiplier_percent: 200,
            jitter_percent: 0,
        },
        nack_delay_ms_max: 10_000,
        delivery_delay_ms_max: 60_000,
        message_ttl_ms: 0,
        expiry_policy: ExpiryPolicy::Drop,
        ordering: Ordering::Unordered,
        nack_reason_bytes_max: 16,
        journal_records_per_snapshot_max: 1000,
        random_seed: 7,
    }
}

/// A group with its journal as bytes, the DLQ as a list, and the last actions.
struct Harness {
    group: QueueGroup,
    out: Actions,
    journal: Vec<u8>,
    dlq: Vec<DeadLetterRequest>,
}

impl Harness {
    fn new(config: QueueGroupConfig, messages: u64) -> Harness {
        let mut out = Actions::default();
        let group = QueueGroup::create(config, 0, &mut out);
        let mut harness = Harness {
            group,
            out,
            journal: Vec::new(),
            dlq: Vec::new(),
        };
        harness.persist();
        harness.append(0, messages, 0);
        harness
    }

    fn append(&mut self, first: u64, count: u64, now: u64) {
        let metas: Vec<_> = (0..count).map(|_| MessageMeta::plain(now)).collect();
        self.group.appended(first, &metas, now, &mut self.out);
        self.persist();
    }

    /// Writes the actions' journal records: the "durable" part of every step.
    fn persist(&mut self) {
        for entry in &self.out.journal {
            encode_record(entry.seq, &entry.record, &mut self.journal);
        }
        self.group.check_invariants();
    }

    fn receive(&mut self, holder: u64, max: u32, now: u64) -> Vec<DeliveryHandle> {
        let request = ReceiveRequest {
            holder: HolderId(holder),
            messages_max: max,
            visibility_timeout_ms: None,
            bytes_max: u64::MAX,
            oversized_first: true,
        };
        self.group.receive(request, now, &mut self.out);
        self.persist();
        self.out.deliveries.clone()
    }

    fn ack(&mut self, handles: &[DeliveryHandle], now: u64) -> Vec<Result<(), HandleError>> {
        self.group.ack(handles, now, &mut self.out);
        self.persist();
        self.out.results.clone()
    }

    fn nack(&mut self, handles: &[DeliveryHandle], now: u64) -> Vec<Result<(), HandleError>> {
        self.group.nack(
            handles,
            NackDelay::Backoff,
            b"handler failed",
            now,
            &mut self.out,
        );
        self.persist();
        self.out.results.clone()
    }

    fn tick(&mut self, now: u64) {
        self.group.tick(now, &mut self.out);
        self.persist();
    }

    /// Performs the DLQ appends the last step asked for (as if durable), then reports them.
    fn do_dead_letters(&mut self, now: u64) {
        let requests = std::mem::take(&mut self.out.dead_letters);
        for request in requests {
            self.dlq.push(request.clone());
            self.group.dead_lettered(request.offset, now, &mut self.out);
            self.persist();
        }
    }

    fn recover(
        &self,
        snapshot: Option<&[u8]>,
        log_end: u64,
        now: u64,
    ) -> (Harness, RecoveryReport) {
        let mut out = Actions::default();
        let (group, report) = QueueGroup::recover(
            *self.group.config(),
            snapshot,
            &self.journal,
            LogBounds {
                start: 0,
                end: log_end,
            },
            now,
            &mut out,
        )
        .expect("recovery");
        let mut harness = Harness {
            group,
            out,
            journal: self.journal[..report.journal_valid_bytes].to_vec(),
            dlq: self.dlq.clone(),
        };
        harness.persist();
        (harness, report)
    }

    /// Answers a `read_metadata` request from a log of plain messages appended at 0.
    fn answer_metadata(&mut self, now: u64) {
        while let Some(range) = self.out.read_metadata.clone() {
            let metas: Vec<_> = range.clone().map(|_| MessageMeta::plain(0)).collect();
            self.group.appended(range.start, &metas, now, &mut self.out);
            self.persist();
        }
    }
}

fn offsets(handles: &[DeliveryHandle]) -> Vec<u64> {
    handles.iter().map(|h| h.offset).collect()
}

#[test]
fn ack_removes_message() {
    let mut h = Harness::new(config(), 3);
    let got = h.receive(1, 1, 0);
    assert_eq!(
        got,
        vec![DeliveryHandle {
            partition: PARTITION,
            offset: 0,
            attempt: 1
        }]
    );
    assert_eq!(
        h.out.answer_after_seq,
        Some(2),
        "the lease is journaled before the answer"
    );
    assert_eq!(h.ack(&got, 10), vec![Ok(())]);
    assert_eq!(h.group.ack_floor(), 1);
    assert_eq!(h.group.state_of(0), MessageState::Settled);
    // Long past the visibility timeout, offset 0 never comes back.
    let later = h.receive(1, 10, 1_000_000);
    assert_eq!(offsets(&later), vec![1, 2]);
    assert_eq!(
        h.ack(&got, 1_000_001),
        vec![Err(HandleError::Settled { offset: 0 })]
    );
    assert_eq!(h.group.counters().acked, 1);
}

#[test]
fn nack_redelivers_after_backoff_and_attempts_grow() {
    let mut h = Harness::new(config(), 1);
    let first = h.receive(1, 1, 0);
    assert_eq!(h.nack(&first, 0), vec![Ok(())]);
    assert_eq!(h.out.timer_ms, Some(100), "retry due after delay_ms_min");
    assert!(h.receive(1, 1, 99).is_empty(), "not before the backoff");
    let second = h.receive(2, 1, 100);
    assert_eq!(second[0].attempt, 2);
    h.nack(&second, 200);
    assert!(
        h.receive(1, 1, 399).is_empty(),
        "second backoff doubles to 200 ms"
    );
    let third = h.receive(1, 1, 400);
    assert_eq!(third[0].attempt, 3);
    // An explicit delay overrides the policy.
    let mut h = Harness::new(config(), 1);
    let got = h.receive(1, 1, 0);
    h.group
        .nack(&got, NackDelay::Ms(5000), b"later", 0, &mut h.out);
    assert!(h.receive(1, 1, 4999).is_empty());
    assert_eq!(h.receive(1, 1, 5000)[0].attempt, 2);
}

#[test]
fn backoff_is_exponential_capped_and_jittered_by_seed() {
    let mut config = config();
    config.deliveries_max = 10;
    config.retry.jitter_percent = 20;
    let delays = |seed: u64| {
        let mut config = config;
        config.random_seed = seed;
        let mut h = Harness::new(config, 1);
        let mut now = 0;
        let mut delays = Vec::new();
        for _ in 0..6 {
            let got = h.receive(1, 1, now);
            assert_eq!(got.len(), 1);
            h.nack(&got, now);
            let MessageState::Waiting { due_ms, .. } = h.group.state_of(0) else {
                panic!("nacked message waits");
            };
            delays.push(due_ms - now);
            now = due_ms;
        }
        delays
    };
    let seeded = delays(42);
    let nominal = [100, 200, 400, 800, 1000, 1000];
    for (delay, nominal) in seeded.iter().zip(nominal) {
        assert!(
            *delay <= nominal && *delay >= nominal * 8 / 10,
            "delay {delay} outside [80%, 100%] of {nominal}: {seeded:?}"
        );
    }
    assert_eq!(seeded, delays(42), "same seed, same jitter");
    assert_ne!(seeded, delays(43), "another seed, other jitter");
}

#[test]
fn dlq_after_max_deliveries_exactly_once() {
    let mut h = Harness::new(config(), 1);
    let mut now = 0;
    let mut deliveries = 0;
    loop {
        let got: Vec<_> = h
            .receive(1, 10, now)
            .into_iter()
            .filter(|d| d.offset == 0)
            .collect();
        if got.is_empty() {
            now += 50;
            assert!(now < 10_000, "message 0 stopped coming back");
            if h.group.state_of(0) == MessageState::Settled {
                break;
            }
            continue;
        }
        deliveries += 1;
        assert_eq!(got[0].attempt, deliveries);
        h.nack(&got, now);
        if deliveries < 3 {
            assert!(
                h.out.dead_letters.is_empty(),
                "no DLQ before the third failure"
            );
        } else {
            assert_eq!(h.out.dead_letters.len(), 1);
            let request = &h.out.dead_letters[0];
            assert_eq!((request.offset, request.attempts), (0, 3));
            assert_eq!(request.cause, DeadLetterCause::Nacked);
            assert_eq!(request.reason, b"handler failed");
            let pending_seq = h.out.journal.last().expect("pending record").seq;
            assert_eq!(
                request.after_seq,
                Some(pending_seq),
                "DLQ append waits for its record"
            );
            assert_eq!(
                h.group.state_of(0),
                MessageState::DeadLettering { attempts: 3 }
            );
            h.do_dead_letters(now);
        }
    }
    assert_eq!(deliveries, 3, "exactly deliveries_max deliveries");
    assert_eq!(h.dlq.len(), 1, "exactly one DLQ append");
    assert_eq!(h.group.counters().dead_lettered, 1);
    // Nothing more comes of it, however long we wait.
    h.tick(1_000_000);
    assert!(h.out.dead_letters.is_empty());
    assert!(h.receive(1, 10, 1_000_000).iter().all(|d| d.offset != 0));
}

#[test]
fn dlq_after_final_lease_expiry() {
    let mut h = Harness::new(config(), 1);
    let mut now = 0;
    for attempt in 1..=3 {
        let got = h.receive(1, 1, now);
        assert_eq!(got[0].attempt, attempt);
        now += 1000; // The lease runs out: a failed delivery.
        h.tick(now);
        if attempt < 3 {
            now = h.out.timer_ms.expect("retry timer");
        }
    }
    assert_eq!(h.out.dead_letters.len(), 1);
    assert_eq!(h.out.dead_letters[0].cause, DeadLetterCause::LeaseExpired);
    h.do_dead_letters(now);
    assert_eq!(h.group.ack_floor(), 1);
}

#[test]
fn lease_expiry_redelivers_and_extend_prevents_it() {
    let mut h = Harness::new(config(), 2);
    let got = h.receive(1, 2, 0);
    assert_eq!(got.len(), 2);
    h.group.extend(&got[1..], 5000, 900, &mut h.out);
    h.persist();
    assert_eq!(h.out.results, vec![Ok(())]);
    h.tick(1000);
    assert_eq!(
        h.group.state_of(1),
        MessageState::Leased {
            attempt: 1,
            deadline_ms: 5900,
            holder: HolderId(1)
        }
    );
    // Offset 0 expired at 1000 and waits out its backoff; then it is delivered again.
    let again = h.receive(2, 10, 1100);
    assert_eq!(
        again,
        vec![DeliveryHandle {
            partition: PARTITION,
            offset: 0,
            attempt: 2
        }]
    );
    assert_eq!(
        h.ack(&got[1..], 5899),
        vec![Ok(())],
        "the extended lease still holds"
    );
}

#[test]
fn stale_handle_ack_is_refused() {
    let mut h = Harness::new(config(), 1);
    let first = h.receive(1, 1, 0);
    assert_eq!(
        h.ack(&first, 1000),
        vec![Err(HandleError::LeaseExpired {
            offset: 0,
            attempt: 1
        })],
        "a lease is valid while now < deadline"
    );
    let second = h.receive(2, 1, 1100);
    assert_eq!(second[0].attempt, 2);
    assert_eq!(
        h.ack(&first, 1200),
        vec![Err(HandleError::Stale {
            offset: 0,
            attempt: 1,
            current_attempt: 2
        })]
    );
    assert_eq!(
        h.group.state_of(0),
        MessageState::Leased {
            attempt: 2,
            deadline_ms: 2100,
            holder: HolderId(2)
        }
    );
    let wrong = DeliveryHandle {
        partition: 9,
        ..second[0]
    };
    let unknown = DeliveryHandle {
        offset: 50,
        ..second[0]
    };
    assert_eq!(
        h.ack(&[wrong, unknown, second[0]], 1300),
        vec![
            Err(HandleError::WrongPartition {
                partition: 9,
                expected: PARTITION
            }),
            Err(HandleError::NotDelivered { offset: 50 }),
            Ok(())
        ]
    );
}

#[test]
fn delayed_message_waits_for_deliver_after() {
    let mut h = Harness::new(config(), 0);
    let metas = [
        MessageMeta {
            append_time_ms: 0,
            deliver_after_ms: 500,
            expires_at_ms: u64::MAX,
            key_hash: None,
            size_bytes: 0,
        },
        MessageMeta::plain(0),
        // Asks for an hour; the group caps delays at delivery_delay_ms_max (60 s).
        MessageMeta {
            append_time_ms: 0,
            deliver_after_ms: 3_600_000,
            expires_at_ms: u64::MAX,
            key_hash: None,
            size_bytes: 0,
        },
    ];
    h.group.appended(0, &metas, 0, &mut h.out);
    h.persist();
    let first = h.receive(1, 10, 0);
    assert_eq!(offsets(&first), vec![1]);
    h.ack(&first, 0);
    assert!(h.receive(1, 10, 499).is_empty());
    let second = h.receive(1, 10, 500);
    assert_eq!(offsets(&second), vec![0]);
    h.ack(&second, 500);
    assert!(h.receive(1, 10, 59_999).is_empty());
    assert_eq!(offsets(&h.receive(1, 10, 60_000)), vec![2]);
}

#[test]
fn expired_messages_are_dropped_or_dead_lettered() {
    // Topic TTL 1000 ms, and one message with its own shorter expiry.
    let mut config = config();
    config.message_ttl_ms = 1000;
    let metas = [
        MessageMeta::plain(0),
        MessageMeta {
            append_time_ms: 0,
            deliver_after_ms: 0,
            expires_at_ms: 300,
            key_hash: None,
            size_bytes: 0,
        },
        MessageMeta::plain(0),
    ];
    let mut h = Harness::new(config, 0);
    h.group.appended(0, &metas, 0, &mut h.out);
    h.persist();
    assert_eq!(offsets(&h.receive(1, 1, 0)), vec![0]);
    assert_eq!(
        offsets(&h.receive(1, 10, 300)),
        vec![2],
        "offset 1 expired at 300"
    );
    assert_eq!(h.group.counters().expired_dropped, 1);
    h.tick(5000); // Both leases ran out after the TTL: expired, not redelivered.
    assert!(h.receive(1, 10, 5000).is_empty());
    assert_eq!(h.group.counters().expired_dropped, 3);
    assert_eq!(h.group.ack_floor(), 3);

    config.expiry_policy = ExpiryPolicy::DeadLetter;
    let mut h = Harness::new(config, 0);
    h.group.appended(0, &metas, 0, &mut h.out);
    h.persist();
    h.tick(300);
    assert_eq!(h.out.dead_letters.len(), 1);
    assert_eq!(h.out.dead_letters[0].cause, DeadLetterCause::Expired);
    assert_eq!(
        h.out.dead_letters[0].attempts, 0,
        "expired before any delivery"
    );
    h.do_dead_letters(300);
    assert_eq!(h.group.counters().dead_lettered, 1);
}

#[test]
fn two_groups_are_independent() {
    let mut a = Harness::new(config(), 4);
    let mut b = Harness::new(config(), 4);
    let got_a = a.receive(1, 10, 0);
    a.ack(&got_a, 1);
    assert_eq!(a.group.ack_floor(), 4);
    let got_b = b.receive(1, 10, 2);
    assert_eq!(
        offsets(&got_b),
        vec![0, 1, 2, 3],
        "group b still sees every message"
    );
    b.nack(&got_b[..1], 3);
    assert_eq!(a.group.state_of(0), MessageState::Settled);
}

#[test]
fn two_holders_never_hold_the_same_message() {
    let mut h = Harness::new(config(), 10);
    let one = h.receive(1, 5, 0);
    let two = h.receive(2, 10, 0);
    assert_eq!(offsets(&one), vec![0, 1, 2, 3, 4]);
    assert_eq!(offsets(&two), vec![5, 6, 7, 8, 9]);
    assert!(h.receive(3, 10, 999).is_empty(), "everything is held");
}

#[test]
fn in_flight_maximum_past_its_edge() {
    let mut h = Harness::new(config(), 40);
    let got = h.receive(1, 100, 0);
    assert_eq!(got.len(), 16, "in_flight_messages_max");
    assert!(h.receive(2, 100, 1).is_empty(), "backpressure at the edge");
    h.ack(&got[..3], 2);
    assert_eq!(h.receive(2, 100, 3).len(), 3);
    assert_eq!(h.group.in_flight(), 16);
}

#[test]
fn window_bounds_memory_and_backlog_is_read_back() {
    let config = config();
    let mut h = Harness::new(config, 1000);
    assert_eq!(
        h.group.window_len(),
        64,
        "admission stops at window_messages_max"
    );
    assert_eq!(h.group.lag(), 1000);
    assert!(h.group.memory_bytes() <= config.memory_bytes_max());
    let mut now = 0;
    let mut received = Vec::new();
    loop {
        let got = h.receive(1, 16, now);
        if got.is_empty() {
            break;
        }
        // The one stuck message at the front keeps the window from sliding.
        let (stuck, rest): (Vec<_>, Vec<_>) = got.iter().partition(|d| d.offset == 0);
        if !stuck.is_empty() {
            h.group.extend(&stuck, 100_000, now, &mut h.out);
            h.persist();
        }
        received.extend(offsets(&rest));
        h.ack(&rest, now);
        h.answer_metadata(now);
        assert!(h.group.window_len() <= 64);
        assert!(h.group.memory_bytes() <= config.memory_bytes_max());
        now += 1;
    }
    assert_eq!(
        received,
        (1..64).collect::<Vec<_>>(),
        "head-of-line: the window waits for offset 0"
    );
    h.ack(
        &[DeliveryHandle {
            partition: PARTITION,
            offset: 0,
            attempt: 1,
        }],
        now,
    );
    h.answer_metadata(now);
    let mut total = 64;
    while let got @ [_, ..] = &h.receive(1, 16, now)[..] {
        total += got.len();
        let got = got.to_vec();
        h.ack(&got, now);
        h.answer_metadata(now);
    }
    assert_eq!(total, 1000);
    assert_eq!(h.group.ack_floor(), 1000);
    assert_eq!(h.group.lag(), 0);
}

#[test]
fn retention_removes_unsettled_messages_and_counts_them() {
    let mut h = Harness::new(config(), 10);
    let got = h.receive(1, 4, 0);
    h.ack(&got[..1], 0);
    h.group.retention(6, 1, &mut h.out);
    h.persist();
    assert_eq!(h.group.ack_floor(), 6);
    assert_eq!(h.group.in_flight(), 0);
    assert_eq!(h.group.counters().lost_to_retention, 5);
    assert_eq!(
        h.ack(&got[1..2], 2),
        vec![Err(HandleError::Settled { offset: 1 })]
    );
    assert_eq!(offsets(&h.receive(1, 10, 3)), vec![6, 7, 8, 9]);
}

#[test]
fn recovery_from_journal_restores_acks_attempts_and_leases() {
    let mut h = Harness::new(config(), 6);
    let got = h.receive(1, 4, 0); // 0..4 leased until 1000
    h.ack(&got[1..2], 10); // 1 acked
    h.nack(&got[2..3], 20); // 2 waits until 120, attempt 1 counted
    let before: Vec<_> = (0..6).map(|o| h.group.state_of(o)).collect();
    let (mut r, report) = h.recover(None, 6, 30);
    assert_eq!(report.journal_stopped, None);
    assert_eq!(report.journal_valid_bytes, h.journal.len());
    assert_eq!(
        r.out.read_metadata,
        Some(0..6),
        "metadata of the window is read back"
    );
    r.answer_metadata(30);
    let after: Vec<_> = (0..6).map(|o| r.group.state_of(o)).collect();
    assert_eq!(before, after);
    assert_eq!(r.group.next_seq(), h.group.next_seq());
    // The lease survives the restart: its holder can still ack.
    assert_eq!(r.ack(&got[0..1], 40), vec![Ok(())]);
    // Offset 3's lease runs out at 1000; its next delivery is attempt 2, like offset 2's.
    let again = r.receive(2, 10, 1100);
    assert_eq!(
        again
            .iter()
            .map(|d| (d.offset, d.attempt))
            .collect::<Vec<_>>(),
        vec![(2, 2), (3, 2), (4, 1), (5, 1)]
    );
    assert!(again.iter().all(|d| d.offset != 1), "acked stays acked");
}

#[test]
fn recovery_from_snapshot_and_journal_tail_equals_full_replay() {
    let mut h = Harness::new(config(), 20);
    let got = h.receive(1, 8, 0);
    h.ack(&got[..3], 1);
    h.nack(&got[5..6], 2);
    let snapshot = h.group.snapshot();
    let mut snapshot_bytes = Vec::new();
    encode_snapshot(&snapshot, &mut snapshot_bytes);
    assert_eq!(decode_snapshot(&snapshot_bytes).as_ref(), Ok(&snapshot));
    let journal_at_snapshot = h.journal.len();
    h.ack(&got[3..4], 3);
    h.receive(2, 4, 4);
    h.tick(1050); // leases of 4, 6, 7 run out at 1000: due at 1100
    let (mut full, _) = h.recover(None, 20, 1050);
    let (mut from_snapshot, report) = h.recover(Some(&snapshot_bytes), 20, 1050);
    full.answer_metadata(1050);
    from_snapshot.answer_metadata(1050);
    assert_eq!(report.snapshot_seq, snapshot.seq);
    assert!(report.records_applied > 0);
    // The journal may also be cut at the snapshot: the tail alone is enough.
    let mut tail_only = Actions::default();
    let (group, _) = QueueGroup::recover(
        *h.group.config(),
        Some(&snapshot_bytes),
        &h.journal[journal_at_snapshot..],
        LogBounds { start: 0, end: 20 },
        1050,
        &mut tail_only,
    )
    .expect("recovery from the snapshot and the cut journal");
    let mut cut = Harness {
        group,
        out: tail_only,
        journal: Vec::new(),
        dlq: Vec::new(),
    };
    cut.answer_metadata(1050);
    for offset in 0..20 {
        assert_eq!(
            full.group.state_of(offset),
            h.group.state_of(offset),
            "offset {offset}"
        );
        assert_eq!(
            from_snapshot.group.state_of(offset),
            h.group.state_of(offset),
            "offset {offset}"
        );
        assert_eq!(
            cut.group.state_of(offset),
            h.group.state_of(offset),
            "offset {offset}"
        );
    }
    assert_eq!(cut.group.counters(), h.group.counters());
    assert_eq!(cut.group.next_seq(), h.group.next_seq());
}

#[test]
fn recovery_stops_at_a_torn_tail_and_refuses_a_gap() {
    let mut h = Harness::new(config(), 4);
    let got = h.receive(1, 2, 0);
    let valid = h.journal.len();
    h.ack(&got, 1);
    // Tear the last record: the ack was never answered, so losing it is allowed.
    let torn = h.journal.len() - 3;
    h.journal.truncate(torn);
    let (r, report) = h.recover(None, 4, 2);
    assert_eq!(report.journal_valid_bytes, valid);
    assert!(report.journal_stopped.is_some());
    assert!(matches!(
        r.group.state_of(0),
        MessageState::Leased { attempt: 1, .. }
    ));
    // A damaged byte in the last record reads as a CRC mismatch, not as data.
    let mut damaged = h.journal[..valid].to_vec();
    let last = damaged.len() - 1;
    damaged[last] ^= 0x40;
    let mut out = Actions::default();
    let (_, report) = QueueGroup::recover(
        config(),
        None,
        &damaged,
        LogBounds { start: 0, end: 4 },
        2,
        &mut out,
    )
    .expect("a damaged tail is cut, not fatal");
    assert!(matches!(
        report.journal_stopped,
        Some(JournalError::CrcMismatch { .. })
    ));
    // A missing record in the middle is refused.
    let mut gap = Vec::new();
    encode_record(1, &JournalRecord::LogStart { offset: 0 }, &mut gap);
    encode_record(3, &JournalRecord::LogStart { offset: 0 }, &mut gap);
    let error = QueueGroup::recover(
        config(),
        None,
        &gap,
        LogBounds { start: 0, end: 4 },
        2,
        &mut out,
    )
    .expect_err("gap");
    assert!(matches!(
        error,
        RecoveryError::SequenceGap {
            expected: 2,
            found: 3,
            ..
        }
    ));
}

#[test]
fn crash_between_dlq_append_and_its_record_appends_once() {
    let mut config = config();
    config.deliveries_max = 1;
    let mut h = Harness::new(config, 2);
    let got = h.receive(1, 2, 0);
    h.nack(&got, 0);
    assert_eq!(h.out.dead_letters.len(), 2);
    // Both pending records are durable (persisted). Offset 0's DLQ append becomes durable;
    // then the broker dies before `dead_lettered(0)` is journaled. Offset 1's DLQ append
    // never happened.
    h.dlq.push(h.out.dead_letters[0].clone());
    let (mut r, _) = h.recover(None, 2, 10);
    assert!(
        r.out.dead_letters.is_empty(),
        "recovery appends nothing to the DLQ by itself"
    );
    let reconcile: Vec<_> = r.out.reconcile.iter().map(|q| q.offset).collect();
    assert_eq!(reconcile, vec![0, 1]);
    assert_eq!(r.out.reconcile[0].decided_at_ms, 0);
    // The shard searches the DLQ for (topic, partition, offset) headers.
    for offset in reconcile {
        let lookup = if r.dlq.iter().any(|d| d.offset == offset) {
            DeadLetterLookup::Found
        } else {
            DeadLetterLookup::NotFound
        };
        r.group
            .dead_letter_reconciled(offset, lookup, 10, &mut r.out);
        r.persist();
        let requests = std::mem::take(&mut r.out.dead_letters);
        for request in requests {
            assert_eq!(request.offset, 1, "only the missing one is appended again");
            assert_eq!(
                request.after_seq, None,
                "its pending record is already durable"
            );
            r.dlq.push(request);
            r.group.dead_lettered(1, 10, &mut r.out);
            r.persist();
        }
    }
    let mut appended: Vec<_> = r.dlq.iter().map(|d| d.offset).collect();
    appended.sort();
    assert_eq!(appended, vec![0, 1], "each exactly once");
    assert_eq!(r.group.ack_floor(), 2);
    assert_eq!(r.group.counters().dead_lettered, 2);
}

#[test]
fn journal_codec_round_trips_every_kind() {
    let records = [
        JournalRecord::Lease {
            first: 5,
            count: 3,
            attempt: 2,
            deadline_ms: 99,
            holder: 7,
        },
        JournalRecord::Settle {
            first: 1,
            count: 1,
            cause: SettleCause::Acked,
        },
        JournalRecord::Settle {
            first: 2,
            count: 9,
            cause: SettleCause::ExpiredDropped,
        },
        JournalRecord::Release {
            first: 8,
            count: 2,
            due_ms: 1234,
        },
        JournalRecord::Extend {
            first: 8,
            count: 1,
            deadline_ms: 4321,
        },
        JournalRecord::DeadLetterPending {
            offset: 11,
            attempts: 5,
            cause: DeadLetterCause::LeaseExpired,
            decided_at_ms: 77,
            reason: b"boom".to_vec(),
        },
        JournalRecord::DeadLettered { offset: 11 },
        JournalRecord::LogStart { offset: 40 },
        JournalRecord::Created { offset: 3 },
    ];
    let mut bytes = Vec::new();
    for (index, record) in records.iter().enumerate() {
        encode_record(index as u64 + 1, record, &mut bytes);
    }
    let mut at = 0;
    for (index, record) in records.iter().enumerate() {
        let Ok(Decoded::Complete(decoded)) = decode_record(&bytes[at..]) else {
            panic!("record {index} decodes");
        };
        assert_eq!(decoded.seq, index as u64 + 1);
        assert_eq!(&decoded.record, record);
        // Every proper prefix is incomplete, never garbage.
        for cut in 0..decoded.length {
            assert!(matches!(
                decode_record(&bytes[at..at + cut]),
                Ok(Decoded::Incomplete { .. })
            ));
        }
        at += decoded.length;
    }
    assert_eq!(at, bytes.len());
    let zeros = vec![0; 64];
    assert_eq!(
        decode_record(&zeros),
        Err(JournalError::BadLength { length: 0 })
    );
    let mut unknown = Vec::new();
    encode_record(1, &JournalRecord::LogStart { offset: 1 }, &mut unknown);
    unknown[16] = 99;
    let crc = crc32c::crc32c(&unknown[8..]);
    unknown[4..8].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(
        decode_record(&unknown),
        Err(JournalError::UnknownKind { kind: 99 })
    );
    assert!(matches!(
        decode_snapshot(b"nope"),
        Err(JournalError::SnapshotTruncated { .. })
    ));
}

#[test]
fn journal_records_coalesce_contiguous_ranges() {
    let mut h = Harness::new(config(), 10);
    let got = h.receive(1, 10, 0);
    assert_eq!(
        h.out.journal,
        vec![JournalEntry {
            seq: 2,
            record: JournalRecord::Lease {
                first: 0,
                count: 10,
                attempt: 1,
                deadline_ms: 1000,
                holder: 1
            }
        }]
    );
    h.ack(&got, 1);
    assert_eq!(h.out.journal.len(), 1, "ten acks, one range record");
    assert_eq!(h.group.ack_floor(), 10);
}

#[test]
fn config_validation_names_the_key() {
    let mut bad = config();
    bad.in_flight_messages_max = bad.window_messages_max + 1;
    assert_eq!(
        bad.validate().map_err(|e| e.key),
        Err("queue_in_flight_messages_max")
    );
    let mut bad = config();
    bad.deliveries_max = 0;
    assert_eq!(
        bad.validate().map_err(|e| e.key),
        Err("queue_deliveries_max")
    );
    assert_eq!(config().validate(), Ok(()));
    assert_eq!(QueueGroupConfig::default().validate(), Ok(()));
}

#[test]
fn memory_bound_formula_matches_docs() {
    // docs/queues.md, "Memory bound", states these numbers; change both together.
    assert_eq!(std::mem::size_of::<Slot>(), 64);
    let mut config = QueueGroupConfig::default();
    assert_eq!(
        config.memory_bytes_max(),
        8192 * (2 * 64 + 32 + 48) + 8192 * (128 + 128) + 1024
    );
    assert_eq!(config.memory_bytes_max(), 3_802_112);
    config.ordering = Ordering::PerKey;
    assert_eq!(config.memory_bytes_max(), 3_802_112 + 8192 * 192);
}

#[test]
fn backlog_request_stays_outstanding_until_answered() {
    let mut h = Harness::new(config(), 100);
    assert_eq!(h.group.window_len(), 64);
    let got = h.receive(1, 16, 0);
    h.ack(&got, 1);
    assert_eq!(
        h.out.read_metadata,
        Some(64..80),
        "room for 16 more: ask the log"
    );
    // The shard loses the request (a failed read). Nothing is asked twice...
    let more = h.receive(1, 16, 2);
    h.ack(&more, 3);
    assert_eq!(h.out.read_metadata, None);
    assert_eq!(
        h.group.window_len(),
        32,
        "no admission while the request is out"
    );
    // ...but the group still knows what it wants, and an answer admits it.
    assert_eq!(h.group.metadata_request(), Some(64..80));
    h.out.read_metadata = h.group.metadata_request();
    h.answer_metadata(4);
    assert_eq!(h.group.metadata_request(), None);
    assert_eq!(h.group.window_len(), 64);
    // A live append past the gap does not count as the answer.
    let got = h.receive(1, 16, 5);
    h.ack(&got, 6);
    let asked = h.out.read_metadata.clone().expect("asked");
    h.append(100, 5, 7);
    assert_eq!(h.group.metadata_request(), Some(asked));
    assert_eq!(h.group.lag(), 105 - h.group.ack_floor());
}

#[test]
fn an_answer_waits_for_the_records_it_depends_on() {
    let mut h = Harness::new(config(), 2);
    let got = h.receive(1, 1, 0);
    h.ack(&got, 1);
    let ack_seq = h.out.journal.last().expect("ack record").seq;
    assert_eq!(h.out.answer_after_seq, Some(ack_seq));
    // A retried ack journals nothing, but its answer (Settled) rests on the first ack's
    // record: it must not be given before that record is durable.
    assert_eq!(
        h.ack(&got, 2),
        vec![Err(HandleError::Settled { offset: 0 })]
    );
    assert!(h.out.journal.is_empty());
    assert_eq!(h.out.answer_after_seq, Some(ack_seq));
}

#[test]
fn ordered_mode_one_in_flight_per_key() {
    let mut config = config();
    config.ordering = Ordering::PerKey;
    let keyed = |key: Option<u64>| MessageMeta {
        key_hash: key,
        ..MessageMeta::plain(0)
    };
    const A: Option<u64> = Some(0xA);
    const B: Option<u64> = Some(0xB);
    let metas = [
        keyed(A),
        keyed(B),
        keyed(A),
        keyed(None),
        keyed(A),
        keyed(B),
    ];
    let mut h = Harness::new(config, 0);
    h.group.appended(0, &metas, 0, &mut h.out);
    h.persist();
    let first = h.receive(1, 10, 0);
    assert_eq!(
        h.out.delivery_ranges().collect::<Vec<_>>(),
        vec![0..2, 3..4]
    );
    assert_eq!(
        offsets(&first),
        vec![0, 1, 3],
        "the head of each key, and the keyless one"
    );
    // A failed head keeps its key's later messages back through its retry.
    h.nack(&first[..1], 10);
    assert!(h.receive(2, 10, 50).is_empty());
    let again = h.receive(2, 10, 110);
    assert_eq!(
        again
            .iter()
            .map(|d| (d.offset, d.attempt))
            .collect::<Vec<_>>(),
        vec![(0, 2)]
    );
    h.ack(&again, 120);
    assert_eq!(offsets(&h.receive(2, 10, 130)), vec![2]);
    h.ack(&first[1..2], 140);
    assert_eq!(offsets(&h.receive(2, 10, 150)), vec![5]);
    // Going to the DLQ releases the key at once: offset 2 need not wait for the append.
    config.deliveries_max = 1;
    let mut h = Harness::new(config, 0);
    h.group.appended(0, &metas, 0, &mut h.out);
    h.persist();
    let first = h.receive(1, 10, 0);
    h.nack(&first[..1], 1);
    assert_eq!(h.out.dead_letters.len(), 1);
    assert_eq!(offsets(&h.receive(1, 10, 2)), vec![2]);
    // After a restart, the order holds again once the window's metadata is back.
    let (mut r, _) = h.recover(None, 6, 3);
    assert!(
        r.receive(3, 10, 3).is_empty(),
        "nothing ready before the metadata"
    );
    assert_eq!(r.group.metadata_request(), Some(0..6));
    r.group.appended(0, &metas, 3, &mut r.out);
    r.persist();
    assert_eq!(r.group.metadata_request(), None);
    assert!(
        r.receive(3, 10, 4).is_empty(),
        "1 and 2 are still leased, 4 and 5 wait behind them"
    );
    let two = DeliveryHandle {
        partition: PARTITION,
        offset: 2,
        attempt: 1,
    };
    assert_eq!(r.ack(&[two], 5), vec![Ok(())]);
    assert_eq!(offsets(&r.receive(3, 10, 6)), vec![4]);
}

/// SplitMix64 for the damage tests below.
fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Does everything the last actions asked for, as a shard would: DLQ appends (at once,
/// as if durable; `NotFound` for every reconcile) and metadata reads (plain messages).
fn drive(h: &mut Harness, now: u64) {
    let dead_letters = std::mem::take(&mut h.out.dead_letters);
    let reconcile = std::mem::take(&mut h.out.reconcile);
    let read = h.out.read_metadata.take();
    for request in dead_letters {
        h.dlq.push(request.clone());
        h.group.dead_lettered(request.offset, now, &mut h.out);
        h.persist();
        drive(h, now);
    }
    for request in reconcile {
        let lookup = DeadLetterLookup::NotFound;
        h.group
            .dead_letter_reconciled(request.offset, lookup, now, &mut h.out);
        h.persist();
        drive(h, now);
    }
    if let Some(range) = read.or_else(|| h.group.metadata_request()) {
        let metas: Vec<_> = range.clone().map(|_| MessageMeta::plain(0)).collect();
        h.group.appended(range.start, &metas, now, &mut h.out);
        h.persist();
        drive(h, now);
    }
}

/// Works a recovered group to the end: nothing may panic, and everything settles.
fn drain_recovered(mut h: Harness, log_end: u64) {
    let mut now = 1_000_000;
    drive(&mut h, now);
    for _ in 0..200 {
        let got = h.receive(1, 100, now);
        drive(&mut h, now);
        h.ack(&got, now);
        drive(&mut h, now);
        now += 100_000;
        h.tick(now);
        drive(&mut h, now);
        if h.group.ack_floor() == log_end {
            return;
        }
    }
    let floor = h.group.ack_floor();
    panic!(
        "recovered group did not drain: floor {floor} {:?} window {} request {:?} in flight {}",
        h.group.state_of(floor),
        h.group.window_len(),
        h.group.metadata_request(),
        h.group.in_flight()
    );
}

#[test]
fn recovery_from_damaged_bytes_errs_or_recovers_never_panics() {
    // A real journal and snapshot, then thousands of damaged copies.
    let mut h = Harness::new(config(), 30);
    let got = h.receive(1, 10, 0);
    h.ack(&got[..4], 1);
    h.nack(&got[4..8], 2);
    h.group.extend(&got[8..], 5000, 3, &mut h.out);
    h.persist();
    let mut snapshot = Vec::new();
    encode_snapshot(&h.group.snapshot(), &mut snapshot);
    h.receive(2, 10, 200);
    h.tick(3000);
    h.do_dead_letters(3000);
    let mut seed = 0x00DA_3A6E;
    println!("damage seed {seed:#x}");
    for round in 0..3000 {
        let mut journal = h.journal.clone();
        let mut damaged_snapshot = snapshot.clone();
        let target = if round % 3 == 0 {
            &mut damaged_snapshot
        } else {
            &mut journal
        };
        match next_random(&mut seed) % 3 {
            0 => {
                for _ in 0..1 + next_random(&mut seed) % 3 {
                    let at = (next_random(&mut seed) % target.len() as u64) as usize;
                    target[at] ^= 1 << (next_random(&mut seed) % 8);
                }
            }
            1 => {
                let keep = (next_random(&mut seed) % target.len() as u64) as usize;
                target.truncate(keep);
            }
            _ => {
                for _ in 0..next_random(&mut seed) % 64 {
                    target.push(next_random(&mut seed) as u8);
                }
            }
        }
        let mut out = Actions::default();
        let snapshot_given = (round % 2 == 0).then_some(&damaged_snapshot[..]);
        let log = LogBounds { start: 0, end: 30 };
        if let Ok((group, _)) =
            QueueGroup::recover(config(), snapshot_given, &journal, log, 4000, &mut out)
        {
            group.check_invariants();
        }
    }
}

#[test]
fn recovery_of_arbitrary_valid_records_keeps_invariants() {
    // CRC-valid records in any order and combination (a bug elsewhere, or deliveries_max
    // lowered across a restart: attempts up to 6 with deliveries_max 3). Recovery must
    // not panic or break its own invariants, and the group must still drain.
    for run in 0..300u64 {
        let mut seed = 0x0BAD_0000 + run;
        let mut journal = Vec::new();
        let count = 1 + next_random(&mut seed) % 40;
        for seq in 1..=count {
            let offset = next_random(&mut seed) % 40;
            let small = 1 + (next_random(&mut seed) % 4) as u32;
            let time_ms = next_random(&mut seed) % 10_000;
            let record = match next_random(&mut seed) % 7 {
                0 => JournalRecord::Lease {
                    first: offset,
                    count: small,
                    attempt: 1 + (next_random(&mut seed) % 6) as u32,
                    deadline_ms: time_ms,
                    holder: 1,
                },
                1 => JournalRecord::Settle {
                    first: offset,
                    count: small,
                    cause: SettleCause::Acked,
                },
                2 => JournalRecord::Release {
                    first: offset,
                    count: small,
                    due_ms: time_ms,
                },
                3 => JournalRecord::Extend {
                    first: offset,
                    count: small,
                    deadline_ms: time_ms,
                },
                4 => JournalRecord::DeadLetterPending {
                    offset,
                    attempts: small,
                    cause: DeadLetterCause::Nacked,
                    decided_at_ms: time_ms,
                    reason: b"r".to_vec(),
                },
                5 => JournalRecord::DeadLettered { offset },
                _ => JournalRecord::LogStart { offset: offset / 4 },
            };
            encode_record(seq, &record, &mut journal);
        }
        let mut out = Actions::default();
        let log = LogBounds { start: 0, end: 48 };
        let recovered = QueueGroup::recover(config(), None, &journal, log, 5000, &mut out);
        let (group, _) = match recovered {
            Ok(recovered) => recovered,
            Err(error) => panic!("run {run}: valid records refused: {error}"),
        };
        group.check_invariants();
        let h = Harness {
            group,
            out,
            journal,
            dlq: Vec::new(),
        };
        drain_recovered(h, 48);
    }
}

/// Lowering `deliveries_max` on a live group (AlterTopic): an available message that has
/// had its deliveries under the new maximum goes to the DLQ at once, journaled, instead
/// of reaching `receive` (which would deliver it past the maximum).
#[test]
fn lowered_deliveries_max_dead_letters_available_messages_at_once() {
    let mut h = Harness::new(config(), 3);
    let mut now = 10;
    // Offset 0 is delivered twice, offsets 1 and 2 once; all come back available.
    let first = h.receive(1, 10, now);
    assert_eq!(offsets(&first), vec![0, 1, 2]);
    h.group
        .nack(&first, NackDelay::Ms(0), b"again", now, &mut h.out);
    h.persist();
    now += 1;
    let second = h.receive(1, 1, now);
    assert_eq!((second[0].offset, second[0].attempt), (0, 2));
    h.group
        .nack(&second, NackDelay::Ms(0), b"again", now, &mut h.out);
    h.persist();
    now += 1;
    h.tick(now);
    assert_eq!(h.group.state_of(0), MessageState::Available { attempts: 2 });

    let mut lowered = config();
    lowered.deliveries_max = 2;
    h.group.set_policy(lowered, now, &mut h.out);
    h.persist();
    assert_eq!(
        h.group.state_of(0),
        MessageState::DeadLettering { attempts: 2 }
    );
    assert_eq!(h.out.dead_letters.len(), 1);
    let request = h.out.dead_letters[0].clone();
    assert_eq!((request.offset, request.attempts), (0, 2));
    let pending = h.out.journal.last().expect("a pending record").clone();
    assert!(matches!(
        pending.record,
        JournalRecord::DeadLetterPending { offset: 0, .. }
    ));
    assert_eq!(request.after_seq, Some(pending.seq));
    assert_eq!(h.out.answer_after_seq, Some(pending.seq));
    // The others had one delivery: each gets its last one, then no more.
    let last = h.receive(2, 10, now);
    assert_eq!(offsets(&last), vec![1, 2]);
    assert!(last.iter().all(|delivery| delivery.attempt == 2));
    // A restart replays the same decision.
    let (recovered, _) = h.recover(None, 3, now);
    assert_eq!(
        recovered.group.state_of(0),
        MessageState::DeadLettering { attempts: 2 }
    );
    assert_eq!(recovered.out.reconcile.len(), 1);
    h.group.dead_lettered(request.offset, now, &mut h.out);
    h.persist();
    assert_eq!(h.group.counters().dead_lettered, 1);
    assert_eq!(h.group.state_of(0), MessageState::Settled);
}

#[test]
fn receive_stops_at_its_byte_budget_but_hands_out_one_oversized_message() {
    let mut h = Harness::new(config(), 0);
    let sized = |size_bytes| MessageMeta {
        size_bytes,
        ..MessageMeta::plain(0)
    };
    h.group.appended(
        0,
        &[sized(400), sized(300), sized(300), sized(5000)],
        0,
        &mut h.out,
    );
    h.persist();
    let request = |bytes_max, oversized_first| ReceiveRequest {
        holder: HolderId(1),
        messages_max: 10,
        visibility_timeout_ms: None,
        bytes_max,
        oversized_first,
    };
    // 400 + 300 fit in 999; the next 300 would not.
    h.group.receive(request(999, true), 0, &mut h.out);
    assert_eq!(offsets(&h.out.deliveries), vec![0, 1]);
    assert_eq!(h.out.delivered_bytes, 700);
    h.persist();
    // A budget smaller than the next message: nothing, unless it may go alone.
    h.group.receive(request(100, false), 0, &mut h.out);
    assert!(h.out.deliveries.is_empty());
    h.persist();
    h.group.receive(request(100, true), 0, &mut h.out);
    assert_eq!(offsets(&h.out.deliveries), vec![2]);
    h.persist();
    // A message larger than any budget is still delivered, alone.
    h.group.receive(request(1000, true), 0, &mut h.out);
    assert_eq!(offsets(&h.out.deliveries), vec![3]);
    assert_eq!(h.out.delivered_bytes, 5000);
    h.persist();
}
