//! The client's examples (`examples/producer.rs`, `consumer.rs`, `queue_worker.rs`,
//! `pipeline.rs`), built by cargo and run as a user runs them against a real broker,
//! with small counts: their exit status and output, and what they left in the broker.
//! The pipeline runs across a `kill -9` and restart of the broker. Also: the README's
//! client program is the examples' code, word for word.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::client::records_until;
use common::process::{built_examples, fixed_port_range, Serve};
use common::TestBroker;
use shardq::client::{Client, OffsetQuery, Producer, ProducerConfig, ProducerRecord};

/// The longest an example may run before the test fails (it would otherwise hang).
const EXAMPLE_TIMEOUT: Duration = Duration::from_secs(120);

fn examples() -> PathBuf {
    built_examples(&["producer", "consumer", "queue_worker", "pipeline"])
}

/// Starts example `name` with `arguments`, its output captured.
fn spawn_example(directory: &Path, name: &str, arguments: &[&str]) -> std::process::Child {
    Command::new(directory.join(name))
        .args(arguments)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("start example {name}: {error}"))
}

/// Waits for a started example to exit (killing it and failing after
/// [`EXAMPLE_TIMEOUT`]) and returns its status and output.
fn wait_example(name: &str, child: std::process::Child) -> Output {
    let pid = child.id();
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(child.wait_with_output());
    });
    match receiver.recv_timeout(EXAMPLE_TIMEOUT) {
        Ok(output) => output.expect("wait for the example"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("example {name} did not finish within {EXAMPLE_TIMEOUT:?}");
        }
    }
}

/// Waits for a started example to exit; asserts it succeeded and returns its stdout.
fn finish_example(name: &str, child: std::process::Child) -> String {
    let output = wait_example(name, child);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "example {name} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn run_example(directory: &Path, name: &str, arguments: &[&str]) -> String {
    finish_example(name, spawn_example(directory, name, arguments))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().expect("a tokio runtime")
}

/// `(partition, offset)` of the consumer example's record lines (`topic/p o: value`).
fn consumed_positions(stdout: &str, topic: &str) -> Vec<(u32, u64)> {
    stdout
        .lines()
        .filter_map(|line| line.strip_prefix(&format!("{topic}/")))
        .map(|rest| {
            let (position, _value) = rest.split_once(": ").expect("a record line");
            let (partition, offset) = position.split_once(' ').expect("partition offset");
            (partition.parse().unwrap(), offset.parse().unwrap())
        })
        .collect()
}

#[test]
fn producer_then_consumer_examples_hand_over_every_record_and_resume_from_the_commit() {
    let examples = examples();
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let address = broker.addr().to_string();

    let stdout = run_example(&examples, "producer", &[&address, "200", "orders"]);
    assert!(
        stdout.contains("produced 200 records to orders"),
        "producer said:\n{stdout}"
    );
    let runtime = runtime();
    let client = runtime.block_on(Client::connect(broker.addr())).unwrap();
    let stored: u64 = runtime.block_on(async {
        let queries: Vec<_> = (0..4).map(|p| (p, OffsetQuery::Latest)).collect();
        let offsets = client.list_offsets("orders", &queries).await.unwrap();
        offsets.iter().map(|(_, o)| o.high_watermark).sum()
    });
    assert_eq!(stored, 200, "the producer example stored each record once");

    let stdout = run_example(&examples, "consumer", &[&address, "200", "orders"]);
    let first = consumed_positions(&stdout, "orders");
    assert_eq!(first.len(), 200, "consumer said:\n{stdout}");
    assert_eq!(
        first.iter().collect::<BTreeSet<_>>().len(),
        200,
        "no record twice"
    );
    assert!(
        stdout.contains("consumed 200 records of orders; lag 0"),
        "consumer said:\n{stdout}"
    );
    let committed: u64 = runtime.block_on(async {
        let positions = client
            .committed_offsets("example-group", "orders", &[])
            .await
            .unwrap();
        positions.iter().filter_map(|p| p.offset).sum()
    });
    assert_eq!(
        committed, 200,
        "the consumer example committed what it read"
    );

    // A second run of both: the consumer resumes at the group's commit and reads only
    // the new records.
    run_example(&examples, "producer", &[&address, "40", "orders"]);
    let stdout = run_example(&examples, "consumer", &[&address, "40", "orders"]);
    let second = consumed_positions(&stdout, "orders");
    assert_eq!(second.len(), 40, "consumer said:\n{stdout}");
    let first: BTreeSet<_> = first.into_iter().collect();
    assert!(
        second.iter().all(|position| !first.contains(position)),
        "the second run read records the first had committed:\n{stdout}"
    );
}

#[test]
fn queue_worker_example_acks_every_job_and_redelivers_the_ones_it_nacks() {
    let examples = examples();
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let address = broker.addr().to_string();
    run_example(&examples, "producer", &[&address, "30", "jobs"]);

    let stdout = run_example(&examples, "queue_worker", &[&address, "30", "jobs"]);
    // `p:o attempt a: value` for every message handled successfully.
    let handled: Vec<(String, u32)> = stdout
        .lines()
        .filter(|line| line.contains(" attempt "))
        .map(|line| {
            let (position, rest) = line.split_once(" attempt ").unwrap();
            let attempt = rest.split_once(':').unwrap().0.parse().unwrap();
            (position.to_owned(), attempt)
        })
        .collect();
    assert_eq!(handled.len(), 30, "every job once:\n{stdout}");
    let distinct: BTreeSet<_> = handled.iter().map(|(position, _)| position).collect();
    assert_eq!(distinct.len(), 30, "no job handled twice:\n{stdout}");
    let failed_first: usize = handled
        .iter()
        .filter(|(position, _)| {
            position.split_once(':').unwrap().1.parse::<u64>().unwrap() % 10 == 0
        })
        .map(|(_, attempt)| {
            assert_eq!(
                *attempt, 2,
                "a nacked job comes back as attempt 2:\n{stdout}"
            );
            1
        })
        .sum();
    assert!(failed_first > 0, "some job was nacked first:\n{stdout}");
    assert!(
        stdout.contains(&format!(
            "received {} acked 30 nacked {failed_first} ",
            30 + failed_first
        )),
        "the summary counts every ack and nack:\n{stdout}"
    );
}

#[test]
fn every_example_exits_non_zero_with_the_whole_error_when_no_broker_listens() {
    let examples = examples();
    // A port nothing listens on: bound, then given back.
    let address = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    for name in ["producer", "consumer", "queue_worker", "pipeline"] {
        let output = wait_example(name, spawn_example(&examples, name, &[&address, "1"]));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{name}: {stderr}");
        // The error and its cause on one line (`ClientError::report`).
        let expected = format!("{name}: cannot connect to {address}: ");
        assert!(
            stderr.starts_with(&expected) && stderr.to_lowercase().contains("refused"),
            "{name} said {stderr:?}, expected {expected:?} and the refusal"
        );
    }
}

/// `shardq serve` with 2 shards on `port`, waited for off the async threads.
fn serve(data_dir: &Path, port: u16) -> Serve {
    let mut broker = Serve::start(
        data_dir,
        &format!("127.0.0.1:{port}"),
        &["--cores", "2", "--bind-retry-ms", "20000"],
    );
    broker.wait_serving();
    broker
}

/// Sends `per_partition` records to each of the 4 partitions of `pipeline-in`, values
/// `p<partition>-<index>` from index `first`, and waits for their acks.
async fn produce_input(client: &Client, first: u32, per_partition: u32) {
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    for index in first..first + per_partition {
        for partition in 0..4 {
            let record =
                ProducerRecord::new(format!("p{partition}-{index}")).with_partition(partition);
            producer.send("pipeline-in", record).await.unwrap();
        }
    }
    producer.close().await.unwrap();
}

#[test]
fn pipeline_example_passes_every_record_on_once_in_order_across_a_broker_restart() {
    let examples = examples();
    let dir = tempfile::tempdir().unwrap();
    let port = fixed_port_range(3);
    let mut broker = serve(dir.path(), port);
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let runtime = runtime();
    let client = runtime.block_on(Client::connect(address)).unwrap();
    runtime.block_on(async {
        // Both topics made here, so that the test can read the output from the start
        // (the pipeline finds them and goes on).
        client.create_topic("pipeline-in", 4).await.unwrap();
        client.create_topic("pipeline-out", 4).await.unwrap();
        produce_input(&client, 0, 25).await;
    });

    let pipeline = spawn_example(&examples, "pipeline", &[&address.to_string(), "200"]);
    // The first half has gone through: the pipeline is waiting for more.
    runtime.block_on(async {
        for partition in 0..4 {
            records_until(&client, "pipeline-out", partition, 25).await;
        }
    });
    broker.kill9();
    let _broker = serve(dir.path(), port);
    runtime.block_on(produce_input(&client, 25, 25));
    let stdout = finish_example("pipeline", pipeline);
    assert!(
        stdout.contains("passed on 200 records from pipeline-in to pipeline-out"),
        "pipeline said:\n{stdout}"
    );

    runtime.block_on(async {
        for partition in 0..4 {
            let output = records_until(&client, "pipeline-out", partition, 50).await;
            let values: Vec<String> = output
                .iter()
                .map(|record| String::from_utf8_lossy(&record.value).into_owned())
                .collect();
            let expected: Vec<String> = (0..50)
                .map(|index| format!("P{partition}-{index}"))
                .collect();
            assert_eq!(
                values, expected,
                "partition {partition}: each record once, in order"
            );
            let (_, offsets) = client
                .list_offsets("pipeline-out", &[(partition, OffsetQuery::Latest)])
                .await
                .unwrap()
                .remove(0);
            assert_eq!(
                offsets.high_watermark, 50,
                "partition {partition}: nothing stored twice"
            );
        }
    });
}

/// The README's client program is made of the examples' own code: every Rust block of
/// its "The Rust client" section appears, word for word, in `examples/producer.rs` or
/// `examples/consumer.rs`, so it compiles and runs with them.
#[test]
fn readme_client_program_is_the_examples_code() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |path: &str| std::fs::read_to_string(root.join(path)).unwrap();
    let readme = read("README.md");
    let section = readme
        .split("\n## ")
        .find(|section| section.starts_with("The Rust client"))
        .expect("README has a section \"The Rust client\"");
    let examples = [read("examples/producer.rs"), read("examples/consumer.rs")];
    let blocks: Vec<&str> = section
        .split("```rust\n")
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap())
        .collect();
    assert!(!blocks.is_empty(), "the section shows the program");
    for block in blocks {
        assert!(
            examples.iter().any(|example| example.contains(block)),
            "README block is not in examples/producer.rs or consumer.rs:\n{block}"
        );
    }
}
