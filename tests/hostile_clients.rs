//! Hostile and careless clients on real sockets (issue 9). Each test runs an attack
//! against an in-process broker while a well-behaved client keeps producing beside it,
//! and checks three things: the broker's memory stays under a stated bound, the
//! bystander's requests keep succeeding, and everything acknowledged is stored.
//!
//! Memory is the test process's resident set: the broker runs in this process. The tests
//! of this file take one lock so that no two attacks overlap, and each resets the peak
//! (`VmHWM`, through `/proc/self/clear_refs`) once its broker has started, so the peak it
//! reads is what the attack added. Loops are bounded; waits are bounded polls of a
//! condition, never sleeps standing in for one.
mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::*;
use shardq::protocol::*;

/// One attack at a time in this process, or one test's memory would be another's.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A field of /proc/self/status, in bytes.
fn status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|line| line.starts_with(field))
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"));
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|value| value.parse().ok())
        .expect("a number of kB");
    kib * 1024
}

/// The process's memory from now on: the peak is reset to the current resident set.
struct MemoryWatch {
    baseline: u64,
}

impl MemoryWatch {
    fn start() -> MemoryWatch {
        // "5" resets the peak resident set size (VmHWM) to the current one.
        std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM");
        MemoryWatch {
            baseline: status_bytes("VmRSS:"),
        }
    }

    /// How far the peak rose above the resident set at `start`.
    fn peak_growth(&self) -> u64 {
        status_bytes("VmHWM:").saturating_sub(self.baseline)
    }

    fn assert_peak_below(&self, bound: u64, what: &str) {
        let growth = self.peak_growth();
        eprintln!(
            "{what}: peak RSS grew by {} KiB (bound {} KiB)",
            growth >> 10,
            bound >> 10
        );
        assert!(
            growth < bound,
            "{what}: the broker's peak RSS grew by {growth} bytes, above the bound of {bound}"
        );
    }
}

/// A well-behaved producer on its own connection: produces one durable batch at a time
/// until stopped (and at least `minimum` times), checking that offsets stay dense.
struct Bystander {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    thread: Option<JoinHandle<u64>>,
}

impl Bystander {
    fn start(addr: SocketAddr, topic: &'static str) -> Bystander {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let thread = {
            let stop = Arc::clone(&stop);
            let acked = Arc::clone(&acked);
            std::thread::spawn(move || {
                let mut client = RawClient::connect(addr);
                let mut count = 0u64;
                while !stop.load(Ordering::Relaxed) || count < 10 {
                    let value = format!("m{count}");
                    let offset = client
                        .produce(topic, 0, batch_of(&[value.as_bytes()]))
                        .expect("the bystander's produce succeeds");
                    assert_eq!(offset, count, "offsets stay dense");
                    count += 1;
                    acked.store(count, Ordering::Relaxed);
                    assert!(count < 1_000_000, "bounded loop");
                }
                count
            })
        };
        Bystander {
            stop,
            acked,
            thread: Some(thread),
        }
    }

    /// Waits (bounded) until the bystander has `count` more acknowledgements than now:
    /// proof that it is being served while the attack goes on.
    fn wait_for_progress(&self, count: u64, what: &str) {
        let target = self.acked.load(Ordering::Relaxed) + count;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.acked.load(Ordering::Relaxed) < target {
            assert!(
                Instant::now() < deadline,
                "{what}: the bystander got no answers"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops it and returns how many batches were acknowledged.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("the bystander never saw an error")
    }
}

/// Everything the bystander was told is stored is there, in order.
fn assert_all_stored(addr: SocketAddr, topic: &str, acked: u64) {
    let mut reader = RawClient::connect(addr);
    let stored = values(&reader.fetch_all(topic, 0, 0));
    assert_eq!(
        stored.len() as u64,
        acked,
        "every acknowledged batch is stored"
    );
    for (index, value) in stored.iter().enumerate() {
        assert_eq!(value, &format!("m{index}"));
    }
}

fn read_error(client: &mut RawClient, opcode: Opcode) -> (usize, WireError) {
    let (_, _, body) = client.read_frame().expect("a response");
    let length = body.len();
    let error = decode_response(opcode, body)
        .expect("decodes")
        .expect_err("an error status");
    (length, error)
}

/// The first attack: one ~200 KB Produce naming a 65,535-byte topic 16,384
/// times once made the shard format the name into an error per entry (~6.4 GB) and
/// answer 67 MB. Now the name is refused at decode, with a short message, and the
/// connection stays usable; the same goes for Fetch, ListOffsets and Metadata. A valid
/// but unknown name listed 16,384 times costs one lookup and a bounded answer.
#[test]
fn huge_topic_names_are_refused_at_decode_cheaply() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let mut admin = RawClient::connect(broker.addr());
    admin.create_topic("steady", 1);
    let bystander = Bystander::start(broker.addr(), "steady");
    let memory = MemoryWatch::start();

    let long = "x".repeat(usize::from(u16::MAX));
    let entries = 16_384;
    let produce = Request::Produce(ProduceRequest {
        acks: Acks::Durable,
        timeout_ms: 0,
        topics: vec![ProduceTopic {
            name: long.clone(),
            partitions: vec![
                ProducePartition {
                    partition: 0,
                    batch: bytes::Bytes::new(),
                };
                entries
            ],
        }],
    });
    let fetch = Request::Fetch(FetchRequest {
        wait_ms_max: 0,
        bytes_max: 1 << 20,
        topics: vec![FetchTopic {
            name: long.clone(),
            partitions: vec![
                FetchPartition {
                    partition: 0,
                    offset: 0,
                    bytes_max: 1 << 20,
                };
                entries
            ],
        }],
    });
    let list_offsets = Request::ListOffsets(ListOffsetsRequest {
        topics: vec![ListOffsetsTopic {
            name: long.clone(),
            partitions: vec![
                ListOffsetsPartition {
                    partition: 0,
                    timestamp_ms: TIMESTAMP_LATEST,
                };
                entries
            ],
        }],
    });
    let metadata = Request::Metadata(MetadataRequest {
        topics: vec![long.clone(); 200],
    });
    let mut attacker = RawClient::connect(broker.addr());
    for round in 0..4 {
        for request in [&produce, &fetch, &list_offsets, &metadata] {
            let mut frame = BytesMut::new();
            request.encode(round, &mut frame);
            assert!(frame.len() <= 16 << 20, "the attack fits in one frame");
            attacker.send_bytes(&frame);
            let (length, error) = read_error(&mut attacker, request.opcode());
            assert_eq!(error.code, ErrorCode::InvalidTopicName, "{error}");
            assert!(length < 512, "a short answer, not {length} bytes");
            assert!(error.message.contains("..."), "{}", error.message);
        }
    }
    // The connection is still in sync and usable.
    let described = attacker
        .call(&Request::Metadata(MetadataRequest {
            topics: vec!["steady".into()],
        }))
        .expect("metadata after the attack");
    let ResponseBody::Metadata(described) = described else {
        panic!("metadata answered with {described:?}")
    };
    assert_eq!(described.topics[0].error, None);

    // A valid name that does not exist, 16,384 times: one catalog lookup, one message
    // shared by every entry, each entry's answer bounded.
    let unknown = "u".repeat(TOPIC_NAME_BYTES_MAX);
    let response = attacker
        .call(&Request::Produce(ProduceRequest {
            acks: Acks::Durable,
            timeout_ms: 0,
            topics: vec![ProduceTopic {
                name: unknown,
                partitions: vec![
                    ProducePartition {
                        partition: 0,
                        batch: batch_of(&[b"never stored"]),
                    };
                    entries
                ],
            }],
        }))
        .expect("a per-partition answer");
    let ResponseBody::Produce(response) = response else {
        panic!("produce answered with {response:?}")
    };
    let results = &response.topics[0].partitions;
    assert_eq!(results.len(), entries);
    for result in results {
        let error = result.result.as_ref().expect_err("unknown topic");
        assert_eq!(error.code, ErrorCode::UnknownTopic);
        assert!(error.message.len() < 128, "{}", error.message);
    }

    bystander.wait_for_progress(5, "after the attack");
    memory.assert_peak_below(96 << 20, "huge topic names");
    let acked = bystander.finish();
    assert_all_stored(broker.addr(), "steady", acked);
}
