//! kill -9 in the middle of queue-group work, again and again, with a restart at once:
//! what the broker answered must hold across every crash (docs/queues.md §5-§7).
//!
//! A seeded worker receives, acks, nacks (delay 0 or the backoff), lets leases run out,
//! and has an ack or nack in flight when the broker is killed. Checked throughout:
//! - a message whose ack was answered is never delivered again;
//! - a message's delivery attempts only grow, across crashes too (an answered lease is
//!   durable, so a restart never hands out the same attempt twice).
//!
//! And at the end, after draining: every message was acked exactly once or is in the
//! DLQ exactly once (never both), every poison message (always nacked) is in the DLQ
//! with `deliveries_max` attempts, and the group has nothing left in flight.
//!
//! `SHARDQ_TEST_SEED=N` replays one seed's choices (the crash points in the broker's
//! timeline still vary with scheduling).
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::process::Serve;
use common::{batch_of, RawClient};
use shardq::protocol::batch::decode_records;
use shardq::protocol::queue::{
    handle_ranges, headers, DescribeGroupsRequest, Handle, NackDelay, QueueSettings,
    ReceiveRequest, ReceivedMessage, SettleAction, SettleRequest,
};
use shardq::protocol::{
    CreateTopicRequest, ErrorCode, FetchPartition, FetchRequest, FetchTopic, Request, ResponseBody,
};

const TOPIC: &str = "jobs";
const GROUP: &str = "workers";
const PARTITIONS: u32 = 3;
const DELIVERIES_MAX: u32 = 3;
const CYCLES: u32 = 12;
const MESSAGES_PER_CYCLE: u64 = 150;
/// Message ids divisible by this are poison: nacked on every delivery.
const POISON_EVERY: u64 = 10;
const VISIBILITY_MS: u32 = 300;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // SplitMix64.
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

/// What the test has seen, to check each new delivery against.
#[derive(Default)]
struct Seen {
    /// Per message id: the highest attempt delivered so far.
    attempts: BTreeMap<u64, u32>,
    /// Messages whose ack the broker answered as done.
    acked: BTreeSet<u64>,
    /// Messages whose ack was in flight at a crash: done or not, nobody heard.
    maybe_acked: BTreeSet<u64>,
}

impl Seen {
    fn delivered(&mut self, id: u64, attempt: u32) {
        assert!(
            !self.acked.contains(&id),
            "message {id} delivered again (attempt {attempt}) after its ack was answered"
        );
        if let Some(&last) = self.attempts.get(&id) {
            assert!(
                attempt > last,
                "message {id} delivered with attempt {attempt} after attempt {last}"
            );
        }
        self.attempts.insert(id, attempt);
    }
}

fn id_of(message: &ReceivedMessage) -> u64 {
    u64::from_le_bytes(message.value[..].try_into().expect("8-byte ids"))
}

fn receive(client: &mut RawClient, messages_max: u32, wait_ms: u32) -> Vec<ReceivedMessage> {
    match client.call(&Request::Receive(ReceiveRequest {
        topic: TOPIC.into(),
        group: GROUP.into(),
        messages_max,
        visibility_timeout_ms: VISIBILITY_MS,
        wait_ms,
    })) {
        Ok(ResponseBody::Receive(response)) => response.messages,
        other => panic!("receive: {other:?}"),
    }
}

fn settle_request(action: SettleAction, handles: &[Handle]) -> Request {
    Request::Settle(SettleRequest {
        topic: TOPIC.into(),
        group: GROUP.into(),
        action,
        ranges: handle_ranges(handles.iter().copied()),
    })
}

/// Sends a settle and returns the handles it was refused for.
fn settle(client: &mut RawClient, action: SettleAction, handles: &[Handle]) -> Vec<Handle> {
    match client.call(&settle_request(action, handles)) {
        Ok(ResponseBody::Settle(response)) => {
            for refused in &response.refused {
                // A lease that ran out (or a delivery since) is the only refusal a
                // well-behaved worker can meet here.
                assert!(
                    matches!(
                        refused.error.code,
                        ErrorCode::LeaseExpired | ErrorCode::HandleStale
                    ),
                    "{:?} refused: {}",
                    refused.handle,
                    refused.error
                );
            }
            response
                .refused
                .iter()
                .map(|refused| refused.handle)
                .collect()
        }
        other => panic!("settle: {other:?}"),
    }
}

fn nack(delay: NackDelay) -> SettleAction {
    SettleAction::Nack {
        delay,
        reason: "crash test".into(),
    }
}

fn start(dir: &std::path::Path) -> (Serve, RawClient) {
    let mut serve = Serve::start(dir, "127.0.0.1:0", &["--cores", "2"]);
    let address = serve.wait_serving();
    (serve, RawClient::connect(address))
}

/// One round of work on what a receive returned: ack, nack or leave each message.
fn work(client: &mut RawClient, rng: &mut Rng, seen: &mut Seen, messages: &[ReceivedMessage]) {
    let mut acks = Vec::new();
    let mut nacks_now = Vec::new();
    let mut nacks_backoff = Vec::new();
    for message in messages {
        let id = id_of(message);
        seen.delivered(id, message.handle.attempt);
        if id % POISON_EVERY == 0 {
            nacks_now.push(message.handle);
            continue;
        }
        match rng.below(10) {
            0 => nacks_now.push(message.handle),
            1 => nacks_backoff.push(message.handle),
            2 => {} // the worker "crashed": the lease runs out
            _ => acks.push(message.handle),
        }
    }
    if !acks.is_empty() {
        let refused = settle(client, SettleAction::Ack, &acks);
        for message in messages {
            if acks.contains(&message.handle) && !refused.contains(&message.handle) {
                seen.acked.insert(id_of(message));
            }
        }
    }
    if !nacks_now.is_empty() {
        settle(client, nack(NackDelay::Ms(0)), &nacks_now);
    }
    if !nacks_backoff.is_empty() {
        settle(client, nack(NackDelay::Backoff), &nacks_backoff);
    }
}

/// Every record of the DLQ, as (source id, attempts).
fn dead_letters(client: &mut RawClient) -> Vec<(u64, u32)> {
    let mut dead = Vec::new();
    for partition in 0..PARTITIONS {
        let mut offset = 0;
        loop {
            let response = client.call(&Request::Fetch(FetchRequest {
                wait_ms_max: 0,
                bytes_max: 1 << 20,
                topics: vec![FetchTopic {
                    name: format!("{TOPIC}.dlq"),
                    partitions: vec![FetchPartition {
                        partition,
                        offset,
                        bytes_max: 1 << 20,
                    }],
                }],
            }));
            let Ok(ResponseBody::Fetch(fetch)) = response else {
                panic!("fetch of the DLQ: {response:?}");
            };
            let data = &fetch.topics[0].partitions[0].data;
            let batches = data.batches.clone().expect("the DLQ is readable");
            let mut records = Vec::new();
            decode_records(&batches, offset, &mut records).expect("DLQ batches decode");
            let before = dead.len();
            for record in records {
                let attempts = record
                    .headers
                    .iter()
                    .rev()
                    .find(|(name, _)| name == headers::ATTEMPTS)
                    .map(|(_, value)| u32::from_le_bytes(value[..].try_into().unwrap()))
                    .expect("a DLQ record names its attempts");
                dead.push((
                    u64::from_le_bytes(record.value[..].try_into().unwrap()),
                    attempts,
                ));
                offset = record.offset + 1;
            }
            if dead.len() == before || offset >= data.high_watermark {
                break;
            }
        }
    }
    dead
}

#[test]
fn kill_9_in_the_middle_of_queue_work_keeps_every_answer() {
    let seed = std::env::var("SHARDQ_TEST_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("SHARDQ_TEST_SEED={seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let (mut serve, mut client) = start(dir.path());
    client
        .call(&Request::CreateTopic(CreateTopicRequest {
            name: TOPIC.into(),
            partitions: PARTITIONS,
            retention: Default::default(),
            queue: QueueSettings {
                deliveries_max: Some(DELIVERIES_MAX),
                retry_delay_ms_min: Some(1),
                retry_delay_ms_max: Some(20),
                ..QueueSettings::default()
            },
        }))
        .expect("topic created");
    let mut seen = Seen::default();
    let mut next_id = 0u64;
    for cycle in 0..CYCLES {
        // New messages every cycle, durable before the work starts.
        for _ in 0..MESSAGES_PER_CYCLE / 10 {
            let ids: Vec<[u8; 8]> = (next_id..next_id + 10).map(u64::to_le_bytes).collect();
            let values: Vec<&[u8]> = ids.iter().map(|id| &id[..]).collect();
            let partition = (next_id / 10 % u64::from(PARTITIONS)) as u32;
            client.produce(TOPIC, partition, batch_of(&values)).unwrap();
            next_id += 10;
        }
        for _ in 0..rng.below(12) + 2 {
            let messages = receive(&mut client, rng.below(40) as u32 + 1, 50);
            work(&mut client, &mut rng, &mut seen, &messages);
        }
        // The crash lands on work in flight: an ack or a nack sent and not answered,
        // a receive whose leases may or may not be durable.
        let messages = receive(&mut client, 20, 50);
        for message in &messages {
            seen.delivered(id_of(message), message.handle.attempt);
        }
        let handles: Vec<Handle> = messages.iter().map(|message| message.handle).collect();
        if !handles.is_empty() {
            let action = match rng.below(3) {
                0 => {
                    seen.maybe_acked.extend(messages.iter().map(id_of));
                    SettleAction::Ack
                }
                1 => nack(NackDelay::Ms(0)),
                _ => nack(NackDelay::Backoff),
            };
            client.send(&settle_request(action, &handles));
        }
        if rng.below(2) == 0 {
            client.send(&Request::Receive(ReceiveRequest {
                topic: TOPIC.into(),
                group: GROUP.into(),
                messages_max: 10,
                visibility_timeout_ms: VISIBILITY_MS,
                wait_ms: 0,
            }));
        }
        serve.kill9();
        drop(client);
        println!(
            "cycle {cycle}: killed with {} message(s) in flight",
            handles.len()
        );
        (serve, client) = start(dir.path());
    }

    // Drain: ack everything but poison, until every message is settled.
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        let messages = receive(&mut client, 100, 200);
        let mut acks = Vec::new();
        let mut nacks = Vec::new();
        for message in &messages {
            let id = id_of(message);
            seen.delivered(id, message.handle.attempt);
            if id % POISON_EVERY == 0 {
                nacks.push(message.handle);
            } else {
                acks.push(message.handle);
            }
        }
        if !acks.is_empty() {
            let refused = settle(&mut client, SettleAction::Ack, &acks);
            for message in &messages {
                if acks.contains(&message.handle) && !refused.contains(&message.handle) {
                    seen.acked.insert(id_of(message));
                }
            }
        }
        if !nacks.is_empty() {
            settle(&mut client, nack(NackDelay::Ms(0)), &nacks);
        }
        let described = match client.call(&Request::DescribeGroups(DescribeGroupsRequest {
            topic: TOPIC.into(),
            group: GROUP.into(),
        })) {
            Ok(ResponseBody::DescribeGroups(response)) => response.groups,
            other => panic!("describe: {other:?}"),
        };
        let settled = described[0].partitions.iter().all(|partition| {
            partition.position == partition.high_watermark
                && partition.in_flight == 0
                && partition.dead_lettering == 0
        });
        if settled && messages.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every message was settled within {DRAIN_TIMEOUT:?}: {described:?}"
        );
    }

    let dead = dead_letters(&mut client);
    let mut copies: BTreeMap<u64, u32> = BTreeMap::new();
    for (id, attempts) in &dead {
        *copies.entry(*id).or_default() += 1;
        assert!(
            !seen.acked.contains(id),
            "message {id} was acked and dead-lettered"
        );
        assert_eq!(*attempts, DELIVERIES_MAX, "message {id}'s DLQ copy");
    }
    for (id, count) in &copies {
        assert_eq!(*count, 1, "message {id} has {count} DLQ copies");
    }
    for id in 0..next_id {
        let dead_lettered = copies.contains_key(&id);
        if id % POISON_EVERY == 0 {
            // Only the ack a crash cut off may have settled a poison message.
            assert!(
                dead_lettered || seen.maybe_acked.contains(&id),
                "poison message {id} is not in the DLQ"
            );
        } else {
            // Acked with the answer heard, or acked by the request a crash cut off,
            // or dead-lettered after enough nacks and lease expiries.
            assert!(
                seen.acked.contains(&id) || dead_lettered || seen.maybe_acked.contains(&id),
                "message {id} is neither acked nor in the DLQ"
            );
        }
    }
    println!(
        "{} messages, {} acked, {} dead-lettered over {CYCLES} crashes",
        next_id,
        seen.acked.len(),
        dead.len()
    );
    serve.kill9();
}
