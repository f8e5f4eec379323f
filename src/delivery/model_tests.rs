//! Model-based test: random receive / ack / nack / extend / tick / sync / snapshot /
//! crash-and-recover sequences against a reference model built on `BTreeMap`s.
//!
//! The harness plays the shard: journal records are "written" at once but only durable at
//! a sync (group commit), answers count only once synced, DLQ appends wait for their
//! pending record to be durable, and a crash keeps the durable bytes plus a random prefix
//! of the rest (possibly a torn record). The model is what consumers were told; a crash
//! rolls it back to the last sync.
//!
//! Checked at every step: no message held by two holders at once, acked and dead-lettered
//! messages never delivered again, attempts only grow (also across recovery), nothing
//! delivered before its `deliver_after`, a current handle is never refused, a refused one
//! never accepted, each DLQ append happens once and only after `deliveries_max`
//! deliveries. At the end, after draining: every message acked or dead-lettered exactly
//! once.
//!
//! Each seed also picks, independently: ordered mode or not (then: no message delivered
//! before every earlier one of its key is done), retention or not (then: nothing removed
//! is delivered), TTLs with either expiry policy or not (then: nothing delivered at or
//! past its expiry; an expired DLQ copy only after it).
//!
//! Seeds: 32 by default, printed; `SHARDQ_TEST_SEED=N` replays one.

use std::collections::{BTreeMap, BTreeSet};

use super::*;

/// SplitMix64, local to the test so the test's randomness is independent of the group's.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    attempt: u32,
    deadline_ms: u64,
    holder: u64,
}

/// What consumers were told.
#[derive(Debug, Clone, Default)]
struct Model {
    acked: BTreeSet<u64>,
    leases: BTreeMap<u64, Lease>,
    /// Highest attempt ever handed out per offset.
    attempts: BTreeMap<u64, u32>,
    /// Handles consumers got, current or not (stale ones are tried too).
    handles: Vec<DeliveryHandle>,
    /// Offsets whose state the model cannot know after a crash: an unanswered ack, nack
    /// or extend of them may have survived. Cleared by their next delivery.
    uncertain: BTreeSet<u64>,
}

struct World {
    seed: u64,
    random: Random,
    config: QueueGroupConfig,
    messages: u64,
    metas: Vec<MessageMeta>,
    group: QueueGroup,
    out: Actions,
    now: u64,
    journal_durable: Vec<u8>,
    /// Written, not yet synced; each entry's bytes with the offsets it touches.
    journal_pending: Vec<(Vec<u8>, Vec<u64>, bool)>,
    snapshot: Option<Vec<u8>>,
    /// DLQ appends waiting for their pending record to be durable.
    dead_letters_waiting: Vec<DeadLetterRequest>,
    /// The DLQ: durable, never rolled back.
    dlq: Vec<DeadLetterRequest>,
    model: Model,
    model_synced: Model,
    /// Offsets whose ack may have survived a crash unanswered.
    maybe_acked: BTreeSet<u64>,
    /// Whether this run applies retention, and the log's start: retention is a log
    /// action, durable on its own, never rolled back.
    retention: bool,
    log_start: u64,
    steps: u64,
    /// What the run exercised, printed so a run that tested nothing shows it.
    stats: Stats,
}

#[derive(Debug, Default)]
struct Stats {
    deliveries: u64,
    ordered_deliveries: u64,
    redeliveries: u64,
    accepted_handles: u64,
    refused_handles: u64,
    crashes: u64,
    torn_tails: u64,
    reconciled_found: u64,
    reconciled_missing: u64,
    snapshots: u64,
    retained_from: u64,
}

fn offsets_of(record: &JournalRecord) -> Vec<u64> {
    match *record {
        JournalRecord::Lease { first, count, .. }
        | JournalRecord::Settle { first, count, .. }
        | JournalRecord::Release { first, count, .. }
        | JournalRecord::Extend { first, count, .. } => (first..first + u64::from(count)).collect(),
        JournalRecord::DeadLetterPending { offset, .. }
        | JournalRecord::DeadLettered { offset } => {
            vec![offset]
        }
        JournalRecord::LogStart { .. } | JournalRecord::Created { .. } => Vec::new(),
    }
}

impl World {
    fn new(seed: u64) -> World {
        let mut random = Random(seed);
        let window = 4 + random.below(28) as u32;
        let ttl = random.chance(50);
        let config = QueueGroupConfig {
            partition: 1,
            window_messages_max: window,
            in_flight_messages_max: 1 + random.below(u64::from(window)) as u32,
            receive_messages_max: 1 + random.below(10) as u32,
            handles_per_request_max: 1000,
            visibility_timeout_ms_default: 500,
            visibility_timeout_ms_max: 5000,
            deliveries_max: 1 + random.below(4) as u32,
            retry: RetryPolicy {
                delay_ms_min: 10 + random.below(100),
                delay_ms_max: 2000,
                multiplier_percent: 100 + random.below(200) as u32,
                jitter_percent: random.below(50) as u32,
            },
            nack_delay_ms_max: 3000,
            delivery_delay_ms_max: 10_000,
            // Half the runs have a topic TTL, with either expiry policy.
            message_ttl_ms: if ttl { 3000 + random.below(6000) } else { 0 },
            expiry_policy: if random.chance(50) {
                ExpiryPolicy::Drop
            } else {
                ExpiryPolicy::DeadLetter
            },
            ordering: if random.chance(50) {
                Ordering::PerKey
            } else {
                Ordering::Unordered
            },
            nack_reason_bytes_max: 8,
            journal_records_per_snapshot_max: 1 + random.below(50),
            random_seed: seed,
        };
        let messages = 10 + random.below(60);
        let retention = random.chance(50);
        let metas = (0..messages)
            .map(|offset| MessageMeta {
                append_time_ms: 0,
                deliver_after_ms: if offset % 7 == 3 { 1500 } else { 0 },
                // Some messages carry their own, shorter TTL.
                expires_at_ms: if ttl && offset % 11 == 5 {
                    1000
                } else {
                    u64::MAX
                },
                // Three keys, and every fourth message without one.
                key_hash: (offset % 4 != 0).then_some(offset % 3),
                size_bytes: model_size(offset),
            })
            .collect();
        let mut out = Actions::default();
        World {
            seed,
            random,
            config,
            messages,
            metas,
            group: QueueGroup::create(config, 0, &mut out),
            out,
            now: 0,
            journal_durable: Vec::new(),
            journal_pending: Vec::new(),
            snapshot: None,
            dead_letters_waiting: Vec::new(),
            dlq: Vec::new(),
            model: Model::default(),
            model_synced: Model::default(),
            maybe_acked: BTreeSet::new(),
            retention,
            log_start: 0,
            steps: 0,
            stats: Stats::default(),
        }
    }

    fn fail(&self, what: String) -> ! {
        panic!(
            "seed {} step {} now {}: {what}\nreplay: SHARDQ_TEST_SEED={} cargo test --lib delivery::model_tests",
            self.seed, self.steps, self.now, self.seed
        );
    }

    /// Takes what the last event asked for: journal records, DLQ appends, metadata reads.
    fn absorb(&mut self) {
        for entry in &self.out.journal {
            let mut bytes = Vec::new();
            encode_record(entry.seq, &entry.record, &mut bytes);
            let is_ack = matches!(
                entry.record,
                JournalRecord::Settle {
                    cause: SettleCause::Acked,
                    ..
                }
            );
            self.journal_pending
                .push((bytes, offsets_of(&entry.record), is_ack));
        }
        self.dead_letters_waiting.append(&mut self.out.dead_letters);
        self.group.check_invariants();
        if let Some(range) = self.out.read_metadata.take() {
            let metas = self.metas[range.start as usize..range.end as usize].to_vec();
            self.group
                .appended(range.start, &metas, self.now, &mut self.out);
            self.absorb();
        }
    }

    /// Group commit: pending records become durable, answers are given, and the DLQ
    /// appends whose records are now durable are made.
    fn sync(&mut self) {
        for (bytes, _, _) in self.journal_pending.drain(..) {
            self.journal_durable.extend_from_slice(&bytes);
        }
        if self.out.snapshot_due || self.random.chance(10) {
            let snapshot = self.group.snapshot();
            let mut bytes = Vec::new();
            encode_snapshot(&snapshot, &mut bytes);
            self.snapshot = Some(bytes);
            self.stats.snapshots += 1;
            if self.random.chance(50) {
                self.journal_durable.clear(); // The journal is cut at the snapshot.
            }
        }
        self.model_synced = self.model.clone();
        let waiting = std::mem::take(&mut self.dead_letters_waiting);
        for request in waiting {
            if self.append_to_dlq(request) {
                break; // The broker died; the rest were never appended.
            }
        }
    }

    /// Appends to the DLQ and reports it; `true` when the broker crashed in between.
    fn append_to_dlq(&mut self, request: DeadLetterRequest) -> bool {
        if self.dlq.iter().any(|d| d.offset == request.offset) {
            self.fail(format!(
                "offset {} appended to the DLQ twice",
                request.offset
            ));
        }
        let expired = request.cause == DeadLetterCause::Expired;
        if expired && request.decided_at_ms < self.expiry(request.offset) {
            self.fail(format!(
                "offset {} dead-lettered as expired before its expiry",
                request.offset
            ));
        }
        if !expired && request.attempts != self.config.deliveries_max {
            self.fail(format!(
                "offset {} dead-lettered after {} deliveries, deliveries_max {}",
                request.offset, request.attempts, self.config.deliveries_max
            ));
        }
        let seen = self
            .model
            .attempts
            .get(&request.offset)
            .copied()
            .unwrap_or(0);
        if seen > request.attempts {
            self.fail(format!(
                "offset {}: DLQ says {} attempts, consumers saw {seen}",
                request.offset, request.attempts
            ));
        }
        self.dlq.push(request.clone());
        // Sometimes the broker dies right here: the DLQ append is durable, the source
        // does not know yet.
        if self.random.chance(15) {
            self.crash();
            return true;
        }
        self.group
            .dead_lettered(request.offset, self.now, &mut self.out);
        self.absorb();
        false
    }

    fn crash(&mut self) {
        let pending: Vec<u8> = self
            .journal_pending
            .iter()
            .flat_map(|(b, _, _)| b.clone())
            .collect();
        let kept = self.random.below(pending.len() as u64 + 1) as usize;
        for (_, offsets, is_ack) in &self.journal_pending {
            self.model_synced.uncertain.extend(offsets.iter().copied());
            if *is_ack {
                self.maybe_acked.extend(offsets.iter().copied());
            }
        }
        let mut journal = self.journal_durable.clone();
        journal.extend_from_slice(&pending[..kept]);
        self.journal_pending.clear();
        self.dead_letters_waiting.clear();
        self.stats.crashes += 1;
        self.model = self.model_synced.clone();
        self.now += self.random.below(300);
        let result = QueueGroup::recover(
            self.config,
            self.snapshot.as_deref(),
            &journal,
            LogBounds {
                start: self.log_start,
                end: self.messages,
            },
            self.now,
            &mut self.out,
        );
        let (group, report) = match result {
            Ok(recovered) => recovered,
            Err(error) => self.fail(format!("recovery failed: {error}")),
        };
        if report.journal_valid_bytes < self.journal_durable.len() {
            self.fail(format!(
                "recovery cut durable journal bytes: valid {} < durable {}",
                report.journal_valid_bytes,
                self.journal_durable.len()
            ));
        }
        if report.journal_stopped.is_some() {
            self.stats.torn_tails += 1;
        }
        // The shard truncates the torn tail; whole records that survived stay.
        journal.truncate(report.journal_valid_bytes);
        self.journal_durable = journal;
        self.group = group;
        let reconcile = std::mem::take(&mut self.out.reconcile);
        self.absorb();
        // Recovered records (expired leases) are durable before anything is answered.
        self.sync_journal_only();
        for request in reconcile {
            let lookup = if self.dlq.iter().any(|d| d.offset == request.offset) {
                self.stats.reconciled_found += 1;
                DeadLetterLookup::Found
            } else {
                self.stats.reconciled_missing += 1;
                DeadLetterLookup::NotFound
            };
            self.group
                .dead_letter_reconciled(request.offset, lookup, self.now, &mut self.out);
            let requests = std::mem::take(&mut self.out.dead_letters);
            self.absorb();
            for request in requests {
                if request.after_seq.is_some() {
                    self.fail("a re-issued DLQ request waits for a record".into());
                }
                if self.append_to_dlq(request) {
                    return; // That crash recovered and reconciled afresh.
                }
            }
        }
    }

    fn sync_journal_only(&mut self) {
        for (bytes, _, _) in self.journal_pending.drain(..) {
            self.journal_durable.extend_from_slice(&bytes);
        }
    }

    fn check_delivery(&mut self, handle: DeliveryHandle, holder: u64, deadline_ms: u64) {
        let offset = handle.offset;
        if offset < self.log_start {
            self.fail(format!(
                "offset {offset} delivered after retention removed it"
            ));
        }
        if self.model.acked.contains(&offset) {
            self.fail(format!("acked offset {offset} delivered again"));
        }
        if self.dlq.iter().any(|d| d.offset == offset) {
            self.fail(format!("dead-lettered offset {offset} delivered again"));
        }
        if let Some(lease) = self.model.leases.get(&offset) {
            if lease.deadline_ms > self.now && !self.model.uncertain.contains(&offset) {
                self.fail(format!(
                    "offset {offset} delivered to {holder} while {} holds it until {}",
                    lease.holder, lease.deadline_ms
                ));
            }
        }
        let seen = self.model.attempts.get(&offset).copied().unwrap_or(0);
        if handle.attempt <= seen {
            self.fail(format!(
                "offset {offset} delivered as attempt {} after attempt {seen}",
                handle.attempt
            ));
        }
        if handle.attempt > self.config.deliveries_max {
            self.fail(format!(
                "offset {offset} delivered {} times",
                handle.attempt
            ));
        }
        if let (Ordering::PerKey, Some(key_hash)) =
            (self.config.ordering, self.metas[offset as usize].key_hash)
        {
            // One in flight per key: every earlier message with the key is done.
            for earlier in
                (0..offset).filter(|&o| self.metas[o as usize].key_hash == Some(key_hash))
            {
                let done = earlier < self.log_start
                    || self.dropped_as_expired(earlier)
                    || self.model.acked.contains(&earlier)
                    || self.maybe_acked.contains(&earlier)
                    || self.dlq.iter().any(|d| d.offset == earlier)
                    || self
                        .dead_letters_waiting
                        .iter()
                        .any(|d| d.offset == earlier);
                if !done {
                    self.fail(format!(
                        "ordered mode: offset {offset} delivered while {earlier} (same key) is not done"
                    ));
                }
            }
            self.stats.ordered_deliveries += 1;
        }
        if self.now >= self.expiry(offset) {
            self.fail(format!(
                "offset {offset} delivered at {} after its expiry {}",
                self.now,
                self.expiry(offset)
            ));
        }
        if self.now < self.metas[offset as usize].deliver_after_ms {
            self.fail(format!(
                "offset {offset} delivered before its deliver_after"
            ));
        }
        self.stats.deliveries += 1;
        if handle.attempt > 1 {
            self.stats.redeliveries += 1;
        }
        self.model.attempts.insert(offset, handle.attempt);
        self.model.leases.insert(
            offset,
            Lease {
                attempt: handle.attempt,
                deadline_ms,
                holder,
            },
        );
        self.model.uncertain.remove(&offset);
        self.model.handles.push(handle);
    }

    /// When the message expires: its own TTL or the topic's, whichever is first.
    fn expiry(&self, offset: u64) -> u64 {
        let meta = &self.metas[offset as usize];
        match self.config.message_ttl_ms {
            0 => meta.expires_at_ms,
            ttl => meta.expires_at_ms.min(meta.append_time_ms + ttl),
        }
    }

    /// Whether the group may have dropped it as expired by now.
    fn dropped_as_expired(&self, offset: u64) -> bool {
        self.config.expiry_policy == ExpiryPolicy::Drop && self.now >= self.expiry(offset)
    }

    /// Whether the model says this handle is current now.
    fn current(&self, handle: &DeliveryHandle) -> bool {
        handle.offset >= self.log_start
            && !self.model.acked.contains(&handle.offset)
            && self
                .model
                .leases
                .get(&handle.offset)
                .is_some_and(|l| l.attempt == handle.attempt && l.deadline_ms > self.now)
    }

    fn check_result(&mut self, handle: &DeliveryHandle, result: &Result<(), HandleError>) {
        if result.is_err() {
            self.stats.refused_handles += 1;
        } else {
            self.stats.accepted_handles += 1;
        }
        let certain = !self.model.uncertain.contains(&handle.offset);
        let current = self.current(handle);
        if certain && current && result.is_err() {
            self.fail(format!("current handle {handle:?} refused: {result:?}"));
        }
        let attempt_matches = self
            .model
            .leases
            .get(&handle.offset)
            .is_some_and(|l| l.attempt == handle.attempt);
        if result.is_ok() && (!attempt_matches || self.model.acked.contains(&handle.offset)) {
            self.fail(format!(
                "handle {handle:?} accepted but the model has no such lease"
            ));
        }
    }

    /// Mostly handles the model says are current, sometimes any handle ever given out
    /// (stale, settled or expired ones).
    fn pick_handles(&mut self) -> Vec<DeliveryHandle> {
        let current: Vec<_> = self
            .model
            .handles
            .iter()
            .copied()
            .filter(|h| self.current(h))
            .collect();
        let mut picked = Vec::new();
        let count = 1 + self.random.below(4);
        for _ in 0..count {
            let pool = if !current.is_empty() && self.random.chance(80) {
                &current
            } else {
                &self.model.handles
            };
            if pool.is_empty() {
                break;
            }
            let index = self.random.below(pool.len() as u64) as usize;
            picked.push(pool[index]);
        }
        picked.sort();
        picked.dedup();
        picked
    }

    fn receive(&mut self, holder: u64, messages_max: u32) {
        let visibility = 1 + self.random.below(2000);
        // Half the receives have a byte budget, some smaller than one message.
        let bytes_max = if self.random.chance(50) {
            u64::MAX
        } else {
            self.random.below(300)
        };
        let request = ReceiveRequest {
            holder: HolderId(holder),
            messages_max,
            visibility_timeout_ms: Some(visibility),
            bytes_max,
            oversized_first: self.random.chance(50),
        };
        self.group.receive(request, self.now, &mut self.out);
        let deliveries = self.out.deliveries.clone();
        let weight: u64 = deliveries
            .iter()
            .map(|handle| u64::from(model_size(handle.offset)))
            .sum();
        assert_eq!(self.out.delivered_bytes, weight, "seed {}", self.seed);
        assert!(
            weight <= bytes_max || (request.oversized_first && deliveries.len() == 1),
            "seed {}: {} messages of {weight} bytes handed out with a budget of {bytes_max}",
            self.seed,
            deliveries.len()
        );
        self.absorb();
        for handle in deliveries {
            self.check_delivery(handle, holder, self.now + visibility);
        }
    }

    fn ack(&mut self, handles: &[DeliveryHandle]) {
        self.group.ack(handles, self.now, &mut self.out);
        let results = self.out.results.clone();
        self.absorb();
        for (handle, result) in handles.iter().zip(&results) {
            self.check_result(handle, result);
            if result.is_ok() {
                self.model.acked.insert(handle.offset);
                self.model.leases.remove(&handle.offset);
            }
        }
    }

    fn nack(&mut self, handles: &[DeliveryHandle]) {
        let delay = if self.random.chance(50) {
            NackDelay::Backoff
        } else {
            NackDelay::Ms(self.random.below(500))
        };
        self.group
            .nack(handles, delay, b"model says no", self.now, &mut self.out);
        let results = self.out.results.clone();
        self.absorb();
        for (handle, result) in handles.iter().zip(&results) {
            self.check_result(handle, result);
            if result.is_ok() {
                self.model.leases.remove(&handle.offset);
            }
        }
    }

    fn extend(&mut self, handles: &[DeliveryHandle]) {
        let visibility = 1 + self.random.below(3000);
        self.group
            .extend(handles, visibility, self.now, &mut self.out);
        let results = self.out.results.clone();
        self.absorb();
        for (handle, result) in handles.iter().zip(&results) {
            self.check_result(handle, result);
            if result.is_ok() {
                let lease = self.model.leases.get_mut(&handle.offset).expect("checked");
                lease.deadline_ms = self.now + visibility;
            }
        }
    }

    fn step(&mut self) {
        self.steps += 1;
        match self.random.below(100) {
            0..=24 => {
                let holder = 1 + self.random.below(3);
                let max = 1 + self.random.below(6) as u32;
                self.receive(holder, max);
            }
            25..=44 => {
                let handles = self.pick_handles();
                self.ack(&handles);
            }
            45..=54 => {
                let handles = self.pick_handles();
                self.nack(&handles);
            }
            55..=61 => {
                let handles = self.pick_handles();
                self.extend(&handles);
            }
            77..=79 if self.retention => {
                // Retention deletes a few messages from the head, settled or not.
                let log_start = (self.log_start + self.random.below(4)).min(self.messages);
                self.group.retention(log_start, self.now, &mut self.out);
                self.absorb();
                self.log_start = log_start;
                self.stats.retained_from = log_start;
            }
            62..=79 => {
                self.now += self.random.below(800);
                self.group.tick(self.now, &mut self.out);
                self.absorb();
            }
            80..=95 => self.sync(),
            _ => self.crash(),
        }
    }

    /// Stops the chaos and works everything off: offsets divisible by 5 always fail.
    fn drain(&mut self) {
        for round in 0..100_000 {
            self.sync();
            if self.group.ack_floor() == self.messages {
                return;
            }
            let held: Vec<_> = self
                .model
                .handles
                .iter()
                .copied()
                .filter(|h| self.current(h))
                .collect();
            let (bad, good): (Vec<_>, Vec<_>) = held.into_iter().partition(|h| h.offset % 5 == 0);
            self.ack(&good);
            self.nack(&bad);
            self.model.handles.clear();
            self.receive(1, u32::MAX);
            self.now += 500;
            self.group.tick(self.now, &mut self.out);
            self.absorb();
            assert!(round < 99_999, "seed {}: drain did not finish", self.seed);
        }
    }

    fn check_end(&mut self) {
        let counters = self.group.counters().clone();
        assert_eq!(self.group.ack_floor(), self.messages, "seed {}", self.seed);
        assert_eq!(
            counters.acked
                + counters.dead_lettered
                + counters.lost_to_retention
                + counters.expired_dropped,
            self.messages,
            "seed {}: every message settled once: {counters:?}",
            self.seed
        );
        // A DLQ append that lands after retention removed its message is not counted as
        // dead-lettered (the message is counted lost), but it is still one copy.
        let removed_then_appended = self
            .dlq
            .iter()
            .filter(|d| d.offset < self.log_start)
            .count();
        assert!(
            counters.dead_lettered <= self.dlq.len() as u64
                && counters.dead_lettered + removed_then_appended as u64 >= self.dlq.len() as u64,
            "seed {}: {counters:?}, {} DLQ copies",
            self.seed,
            self.dlq.len()
        );
        for offset in 0..self.messages {
            let in_dlq = self.dlq.iter().filter(|d| d.offset == offset).count();
            let acked = self.model.acked.contains(&offset);
            let lost = offset < self.log_start;
            match (in_dlq, acked) {
                (1, false) | (0, true) => {}
                (0, false)
                    if self.maybe_acked.contains(&offset)
                        || lost
                        || self.dropped_as_expired(offset) => {}
                _ => self.fail(format!(
                    "offset {offset}: {in_dlq} DLQ copies, acked {acked}: must be exactly one of them"
                )),
            }
        }
    }
}

fn run(seed: u64) {
    println!("delivery model test seed {seed}");
    let mut world = World::new(seed);
    // The group's creation is durable before anything else happens to it.
    world.absorb();
    world.sync();
    world
        .group
        .appended(0, &world.metas.clone(), 0, &mut world.out);
    world.absorb();
    let steps = 300 + world.random.below(700);
    for _ in 0..steps {
        world.step();
    }
    world.drain();
    world.check_end();
    println!(
        "  {} messages, deliveries_max {}, {} DLQ: {:?} {:?}",
        world.messages,
        world.config.deliveries_max,
        world.dlq.len(),
        world.stats,
        world.group.counters()
    );
}

#[test]
fn model_based_receive_ack_nack_extend_crash() {
    if let Ok(seed) = std::env::var("SHARDQ_TEST_SEED") {
        run(seed.parse().expect("SHARDQ_TEST_SEED is a number"));
        return;
    }
    for seed in 0..32 {
        run(0x5EED_0000 + seed);
    }
}

/// Message sizes the model gives its messages: 1 to 100 bytes, varied.
fn model_size(offset: u64) -> u32 {
    1 + (offset * 37 % 100) as u32
}
