//! `shardq bench e2e` end to end: the real binary against an in-process broker, checking
//! the `--json` contract (every key, numbers where numbers are due) and that every
//! produced message was consumed and verified.

mod common;

use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::TestBroker;

/// The list, written out again on purpose rather than taken from
/// `bench::report::REQUIRED_KEYS`: a key dropped from the code's list must fail this test.
const REQUIRED_KEYS: [&str; 15] = [
    "workload",
    "messages",
    "message_size",
    "batch_size",
    "acks",
    "producers",
    "consumers",
    "partitions",
    "duration_s",
    "produce_msgs_per_s",
    "produce_mb_per_s",
    "consume_msgs_per_s",
    "consume_mb_per_s",
    "produce_latency_us",
    "e2e_latency_us",
];
const PERCENTILE_KEYS: [&str; 6] = ["p50", "p90", "p99", "p999", "p9999", "max"];
/// Longest one bench run may take (they are sized to take a few seconds).
const BENCH_TIMEOUT: Duration = Duration::from_secs(120);

fn run_bench(broker: &TestBroker, arguments: &[&str]) -> (std::process::Output, serde_json::Value) {
    let out_dir = tempfile::tempdir().expect("temp dir");
    let json_path = out_dir.path().join("result.json");
    let plot_path = out_dir.path().join("result.svg");
    let child = Command::new(env!("CARGO_BIN_EXE_shardq"))
        .arg("bench")
        .args(arguments)
        .args(["--server", &broker.addr().to_string(), "--quiet"])
        .arg("--json")
        .arg(&json_path)
        .arg("--plot")
        .arg(&plot_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("shardq runs");
    // Bounded: a bench that hangs (a consumer waiting for messages that never come)
    // fails the test instead of stalling the suite.
    let pid = child.id();
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(child.wait_with_output());
    });
    let output = match receiver.recv_timeout(BENCH_TIMEOUT) {
        Ok(output) => output.expect("wait for shardq bench"),
        Err(_) => {
            // SAFETY: kill(2) on our own child's pid, not yet reaped (its waiter has
            // not returned).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            panic!("shardq bench {arguments:?} ran past {BENCH_TIMEOUT:?}");
        }
    };
    assert!(
        output.status.success(),
        "bench failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = std::fs::read_to_string(&json_path).expect("--json file written");
    let svg = std::fs::read_to_string(&plot_path).expect("--plot file written");
    assert!(svg.starts_with("<svg") && svg.contains("</svg>"));
    (output, serde_json::from_str(&text).expect("valid JSON"))
}

fn assert_contract(value: &serde_json::Value) {
    for key in REQUIRED_KEYS {
        assert!(value.get(key).is_some(), "missing key {key} in {value:#}");
    }
    for key in ["produce_latency_us", "e2e_latency_us"] {
        for percentile in PERCENTILE_KEYS {
            assert!(
                value[key][percentile].is_number(),
                "{key}.{percentile} is not a number"
            );
        }
    }
}

#[test]
fn bench_e2e_json_has_every_key_and_counts_match() {
    let data = tempfile::tempdir().expect("temp dir");
    let broker = TestBroker::start(data.path(), 2);
    // The test broker's chunks are 256 KiB, so its largest batch is 252 KiB.
    let (output, value) = run_bench(
        &broker,
        &[
            "e2e",
            "--messages",
            "2000",
            "--message-size",
            "256",
            "--batch-size",
            "100",
            "--batch-bytes-max",
            "258048",
            "--topic",
            "bench-e2e",
            "--partitions",
            "2",
        ],
    );
    assert_contract(&value);
    assert_eq!(value["workload"], "e2e");
    assert_eq!(value["messages"].as_u64(), Some(2000));
    assert_eq!(value["produced_messages"].as_u64(), Some(2000));
    assert_eq!(value["consumed_messages"].as_u64(), Some(2000));
    assert_eq!(value["verified_messages"].as_u64(), Some(2000));
    assert_eq!(value["message_size"].as_u64(), Some(256));
    assert_eq!(value["partitions"].as_u64(), Some(2));
    assert_eq!(value["acks"], "durable");
    assert_eq!(value["produce_latency_us"]["count"].as_u64(), Some(2000));
    assert_eq!(value["e2e_latency_us"]["count"].as_u64(), Some(2000));
    assert!(value["produce_msgs_per_s"].as_f64().unwrap() > 0.0);
    assert!(value["consume_msgs_per_s"].as_f64().unwrap() > 0.0);
    let summary = String::from_utf8_lossy(&output.stdout);
    assert!(
        summary.contains("verified 2000 consumed messages"),
        "{summary}"
    );
}

#[test]
fn bench_produce_then_consume_reads_back_and_zeros_the_other_side() {
    let data = tempfile::tempdir().expect("temp dir");
    let broker = TestBroker::start(data.path(), 1);
    let common = [
        "--message-size",
        "64",
        "--batch-size",
        "50",
        "--topic",
        "bench-pc",
        "--partitions",
        "3",
        "--shard-aware",
        "off",
    ];
    let mut produce = vec!["produce", "--messages", "900"];
    produce.extend(common);
    let (_, produced) = run_bench(&broker, &produce);
    assert_contract(&produced);
    assert_eq!(produced["produced_messages"].as_u64(), Some(900));
    assert_eq!(produced["consume_msgs_per_s"].as_f64(), Some(0.0));
    assert_eq!(produced["e2e_latency_us"]["p99"].as_f64(), Some(0.0));

    let mut consume = vec!["consume"];
    consume.extend(common);
    let (_, consumed) = run_bench(&broker, &consume);
    assert_contract(&consumed);
    assert_eq!(consumed["consumed_messages"].as_u64(), Some(900));
    assert_eq!(consumed["verified_messages"].as_u64(), Some(900));
    assert_eq!(consumed["produce_msgs_per_s"].as_f64(), Some(0.0));
}

/// Fixed-rate mode: each producer thread paces its sends on a timerfd in its own
/// runtime. Two producers at 200 msg/s in all send 200 messages, every one acked,
/// consumed and verified, and the sends are spread over the second the rate asks for
/// (the last is due 995 ms after the first): a pacing timer that fired at once would end
/// the run early.
#[test]
fn bench_e2e_at_a_fixed_rate_paces_every_producer_and_verifies_everything() {
    let data = tempfile::tempdir().expect("temp dir");
    let broker = TestBroker::start(data.path(), 2);
    // The broker runs in this process.
    let server_pid = std::process::id().to_string();
    let (_, value) = run_bench(
        &broker,
        &[
            "e2e",
            "--server-pid",
            &server_pid,
            "--messages",
            "200",
            "--rate",
            "200",
            "--producers",
            "2",
            "--message-size",
            "128",
            "--batch-size",
            "1",
            "--topic",
            "bench-rate",
            "--partitions",
            "2",
        ],
    );
    assert_contract(&value);
    assert_eq!(value["produced_messages"].as_u64(), Some(200));
    assert_eq!(value["verified_messages"].as_u64(), Some(200));
    assert_eq!(value["produce_latency_us"]["count"].as_u64(), Some(200));
    // The broker's CPU from /proc/PID/stat, and per million messages from it.
    let cpu_s = value["server_cpu_s"].as_f64().expect("server_cpu_s");
    assert!(cpu_s >= 0.0, "server_cpu_s {cpu_s} with --server-pid given");
    let per_million = value["server_cpu_s_per_million_messages"]
        .as_f64()
        .expect("server_cpu_s_per_million_messages");
    assert!(
        (per_million - cpu_s / 200.0 * 1e6).abs() <= 0.01 * per_million.max(1.0),
        "{per_million} s per million from {cpu_s} s over 200 messages"
    );
    let duration_s = value["duration_s"].as_f64().expect("duration_s");
    assert!(
        duration_s >= 0.9,
        "200 messages at 200 msg/s took {duration_s} s: the sends were not paced"
    );
}
