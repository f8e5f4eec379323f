//! Queue groups end to end against the real broker (in-process, 2 shards): the tokio
//! `QueueConsumer` (receive, ack, nack, extend, `run`), `describe_groups`, the `receive`,
//! `ack`, `nack` and `group` commands, and `shardq bench queue`.
//!
//! These need the broker's queue-group wiring (issue 8, branch queue-server); they are
//! kept apart from the stream-group tests so that they can land before it.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::client::{records_until, STEP_TIMEOUT};
use common::TestBroker;
use shardq::client::{
    Client, GroupKind, NackDelay, Producer, ProducerConfig, ProducerRecord, QueueConsumer,
    QueueSettings, Retention, SettleError,
};
use shardq::protocol::queue::headers;

async fn start() -> (tempfile::TempDir, TestBroker, Client) {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let client = Client::connect(broker.addr()).await.unwrap();
    (dir, broker, client)
}

/// A topic whose failures dead-letter after `deliveries_max` deliveries, retried fast.
async fn create_queue_topic(client: &Client, topic: &str, partitions: u32, deliveries_max: u32) {
    let settings = QueueSettings {
        deliveries_max: Some(deliveries_max),
        retry_delay_ms_min: Some(10),
        retry_delay_ms_max: Some(20),
        visibility_timeout_ms: Some(30_000),
        ..QueueSettings::default()
    };
    client
        .create_topic_with_queue(topic, partitions, Retention::default(), settings)
        .await
        .unwrap();
}

/// Produces `values` to `partition`, durably, in order.
async fn produce(client: &Client, topic: &str, partition: u32, values: &[&str]) {
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    for value in values {
        let record = ProducerRecord::new(value.to_string())
            .with_key(format!("key-{value}"))
            .with_partition(partition);
        producer.send(topic, record).await.unwrap();
    }
    producer.close().await.unwrap();
}

/// Receives until `count` messages came back, long-polling; panics after STEP_TIMEOUT.
async fn receive_count(
    consumer: &QueueConsumer,
    count: usize,
) -> Vec<shardq::client::QueueMessage> {
    let receive = async {
        let mut messages = Vec::new();
        while messages.len() < count {
            let more = consumer
                .receive(
                    (count - messages.len()) as u32,
                    None,
                    Duration::from_secs(5),
                )
                .await
                .unwrap();
            messages.extend(more);
        }
        messages
    };
    tokio::time::timeout(STEP_TIMEOUT, receive)
        .await
        .unwrap_or_else(|_| panic!("fewer than {count} messages were received"))
}

/// The first `count` records of a dead-letter topic's partition. The broker creates the
/// DLQ topic at the first dead letter, after the nack that caused it was answered, so
/// this first asks for its metadata until it exists (each ask a round trip, bounded by
/// STEP_TIMEOUT), then long-polls its records.
async fn dead_letters_until(
    client: &Client,
    dlq: &str,
    partition: u32,
    count: usize,
) -> Vec<shardq::client::Record> {
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    loop {
        let metadata = client.metadata(&[dlq]).await.unwrap();
        if metadata
            .topics
            .iter()
            .any(|topic| topic.name == dlq && topic.error.is_none())
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{dlq} was not created within {STEP_TIMEOUT:?}"
        );
    }
    // The broker creates the DLQ topic itself, shard by shard: the shard that answered
    // the metadata may know it before the partition's owner does.
    while let Err(shardq::client::ClientError::UnknownTopic { .. }) =
        client.fetch_records(dlq, partition, 0, 0, 1).await
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{dlq} partition {partition} was not installed within {STEP_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    records_until(client, dlq, partition, count).await
}

#[tokio::test]
async fn receive_ack_nack_extend_and_stale_handles() {
    let (_dir, _broker, client) = start().await;
    create_queue_topic(&client, "orders", 1, 2).await;
    produce(&client, "orders", 0, &["a", "b", "c"]).await;
    let consumer = QueueConsumer::builder(client.clone(), "orders", "billing")
        .visibility_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let messages = receive_count(&consumer, 3).await;
    let offsets: Vec<(u64, u32, &[u8])> = messages
        .iter()
        .map(|m| (m.offset(), m.attempt(), m.value().as_ref()))
        .collect();
    assert_eq!(
        offsets,
        vec![(0, 1, &b"a"[..]), (1, 1, &b"b"[..]), (2, 1, &b"c"[..])]
    );
    assert_eq!(messages[0].key().map(|k| k.as_ref()), Some(&b"key-a"[..]));

    // Ack a; a retried ack is reported as already settled, which is not a failure.
    let acked = consumer.ack(&[messages[0].handle()]).await.unwrap();
    assert!(acked.is_success() && acked.refused.is_empty());
    let again = consumer.ack(&[messages[0].handle()]).await.unwrap();
    assert_eq!(
        again.already_settled().collect::<Vec<_>>(),
        vec![messages[0].handle()]
    );
    assert!(again.is_success());

    // Extend c; nack b at once: it comes back as attempt 2, and its old handle is stale.
    let extended = consumer
        .extend(&[messages[2].handle()], Duration::from_secs(60))
        .await
        .unwrap();
    assert!(extended.is_success(), "{:?}", extended.refused);
    let nacked = consumer
        .nack(&[messages[1].handle()], NackDelay::Ms(0), "try again")
        .await
        .unwrap();
    assert!(nacked.is_success(), "{:?}", nacked.refused);
    let redelivered = receive_count(&consumer, 1).await;
    assert_eq!((redelivered[0].offset(), redelivered[0].attempt()), (1, 2));
    let stale = consumer.ack(&[messages[1].handle()]).await.unwrap();
    assert_eq!(stale.refused.len(), 1);
    assert_eq!(stale.refused[0].error, SettleError::Stale);
    assert!(!stale.is_success());
    let never = consumer
        .ack(&[shardq::client::Handle {
            partition: 0,
            offset: 99,
            attempt: 1,
        }])
        .await
        .unwrap();
    assert_eq!(never.refused[0].error, SettleError::NotDelivered);

    // b's second failure is its last (deliveries_max 2): it goes to the DLQ.
    let last = consumer
        .nack(
            &[redelivered[0].handle()],
            NackDelay::Backoff,
            "bad payload",
        )
        .await
        .unwrap();
    assert!(last.is_success(), "{:?}", last.refused);
    let dead = dead_letters_until(&client, "orders.dlq", 0, 1).await;
    assert_eq!(dead[0].value.as_ref(), b"b");
    let header = |name: &str| {
        dead[0]
            .headers
            .iter()
            .find(|(header, _)| header == name)
            .map(|(_, value)| value.clone())
            .unwrap_or_else(|| panic!("no {name} header"))
    };
    assert_eq!(header(headers::SOURCE_TOPIC).as_ref(), b"orders");
    assert_eq!(header(headers::SOURCE_OFFSET).as_ref(), 1u64.to_le_bytes());
    assert_eq!(header(headers::ATTEMPTS).as_ref(), 2u32.to_le_bytes());
    assert_eq!(header(headers::DEAD_LETTER_CAUSE).as_ref(), b"nacked");
    assert_eq!(header(headers::REASON).as_ref(), b"bad payload");

    let groups = client
        .describe_groups("orders", Some("billing"))
        .await
        .unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].kind, GroupKind::Queue);
    let partition = groups[0].partitions[0];
    assert_eq!(partition.acked, 1);
    assert_eq!(partition.in_flight, 1, "c is still leased");
    // a is acked, b dead-lettered (its DLQ record is durable; the state that settles it
    // may trail by a moment), c leased: the floor is past a and at most at c.
    assert!((1..=2).contains(&partition.position), "{partition:?}");
}

#[tokio::test]
async fn run_acks_successes_and_dead_letters_failures_across_partitions() {
    let (_dir, _broker, client) = start().await;
    create_queue_topic(&client, "jobs", 2, 2).await;
    let good: Vec<String> = (0..20).map(|i| format!("good-{i}")).collect();
    let bad: Vec<String> = (0..4).map(|i| format!("bad-{i}")).collect();
    for (index, value) in good.iter().chain(&bad).enumerate() {
        produce(&client, "jobs", index as u32 % 2, &[value.as_str()]).await;
    }
    let consumer = QueueConsumer::builder(client.clone(), "jobs", "workers")
        .handler_concurrency_max(4)
        .receive_messages_max(5)
        .build()
        .unwrap();
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let all_done = Arc::new(tokio::sync::Notify::new());
    let expected_failures = bad.len() as u64 * 2;
    let handler = {
        let (ok, failed, all_done) = (ok.clone(), failed.clone(), all_done.clone());
        move |message: shardq::client::QueueMessage| {
            let (ok, failed, all_done) = (ok.clone(), failed.clone(), all_done.clone());
            async move {
                let result = if message.value().starts_with(b"bad") {
                    failed.fetch_add(1, Ordering::SeqCst);
                    Err(format!(
                        "cannot handle {}",
                        String::from_utf8_lossy(message.value())
                    ))
                } else {
                    ok.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                };
                if ok.load(Ordering::SeqCst) == 20
                    && failed.load(Ordering::SeqCst) == expected_failures
                {
                    all_done.notify_one();
                }
                result
            }
        }
    };
    let summary = tokio::time::timeout(
        STEP_TIMEOUT,
        consumer.run(handler, async move { all_done.notified().await }),
    )
    .await
    .expect("run finishes once every message is handled")
    .unwrap();
    assert_eq!(summary.acked, 20);
    assert_eq!(summary.nacked, expected_failures);
    assert_eq!(summary.refused, 0);
    assert_eq!(summary.received, 20 + expected_failures);
    let mut dead = BTreeSet::new();
    for partition in 0..2 {
        for record in dead_letters_until(&client, "jobs.dlq", partition, 2).await {
            dead.insert(String::from_utf8(record.value.to_vec()).unwrap());
        }
    }
    assert_eq!(dead, bad.iter().cloned().collect::<BTreeSet<_>>());
}

#[tokio::test]
async fn run_extends_the_lease_of_a_handler_that_outlives_it() {
    let (_dir, _broker, client) = start().await;
    create_queue_topic(&client, "slow", 1, 5).await;
    produce(&client, "slow", 0, &["x"]).await;
    let consumer = QueueConsumer::builder(client.clone(), "slow", "g")
        .visibility_timeout(Duration::from_millis(2_000))
        .handler_concurrency_max(1)
        .build()
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let stop = std::sync::Mutex::new(Some(stop));
    let summary = tokio::time::timeout(
        STEP_TIMEOUT,
        consumer.run(
            move |message| {
                let stop = stop.lock().unwrap().take();
                async move {
                    assert_eq!(message.attempt(), 1, "never redelivered while it runs");
                    // The work itself: over twice the lease. (The lease is long enough
                    // that an extension, sent with half of it left, is answered in time
                    // on a loaded machine; its journal record is fsync'ed first.)
                    tokio::time::sleep(Duration::from_millis(4_500)).await;
                    if let Some(stop) = stop {
                        let _ = stop.send(());
                    }
                    Ok::<(), String>(())
                }
            },
            stopped,
        ),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(summary.received, 1);
    assert_eq!(summary.acked, 1);
    assert!(summary.extended >= 2, "{summary:?}");
    assert_eq!(summary.refused, 0);
}

#[tokio::test]
async fn two_consumers_share_a_group_and_groups_see_every_message() {
    let (_dir, _broker, client) = start().await;
    create_queue_topic(&client, "shared", 2, 3).await;
    produce(&client, "shared", 0, &["1", "2", "3"]).await;
    produce(&client, "shared", 1, &["4", "5", "6"]).await;
    let other_connection = Client::connect(client.peer_address()).await.unwrap();
    let first = QueueConsumer::builder(client.clone(), "shared", "g")
        .build()
        .unwrap();
    let second = QueueConsumer::builder(other_connection, "shared", "g")
        .build()
        .unwrap();
    let mut seen = BTreeSet::new();
    for message in receive_count(&first, 4).await {
        seen.insert(message.handle());
    }
    for message in receive_count(&second, 2).await {
        assert!(seen.insert(message.handle()), "leased twice: {message:?}");
    }
    assert!(first
        .receive(10, None, Duration::ZERO)
        .await
        .unwrap()
        .is_empty());
    let other_group = client.queue_consumer("shared", "audit");
    assert_eq!(receive_count(&other_group, 6).await.len(), 6);
    let groups = client.describe_groups("shared", None).await.unwrap();
    let names: Vec<&str> = groups.iter().map(|group| group.name.as_str()).collect();
    assert_eq!(names, vec!["audit", "g"]);
}

fn shardq(broker: &TestBroker, arguments: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_shardq"))
        .args(arguments)
        .args(["--server", &broker.addr().to_string()])
        .env_remove("SHARDQ_SERVER")
        .output()
        .expect("shardq runs")
}

#[test]
fn cli_receive_ack_nack_and_group_describe() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let run = |arguments: &[&str]| shardq(&broker, arguments);
    let ok = |output: &std::process::Output, what: &str| {
        assert!(
            output.status.success(),
            "{what}: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    };
    ok(
        &run(&[
            "topic",
            "create",
            "q",
            "--partitions",
            "1",
            "--max-deliveries",
            "4",
            "--visibility-ms",
            "60000",
        ]),
        "create",
    );
    let described = run(&["topic", "describe", "q", "--json"]);
    ok(&described, "describe");
    let json: serde_json::Value = serde_json::from_slice(&described.stdout).unwrap();
    assert_eq!(json["queue"]["max_deliveries"], 4);
    assert_eq!(json["queue"]["visibility_ms"], 60_000);
    assert_eq!(json["queue"]["dlq"], "q.dlq");
    let mut produce = Command::new(env!("CARGO_BIN_EXE_shardq"))
        .args(["produce", "q", "--server", &broker.addr().to_string()])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    produce
        .stdin
        .take()
        .unwrap()
        .write_all(b"one\ntwo\n")
        .unwrap();
    assert!(produce.wait().unwrap().success());

    let received = run(&[
        "receive",
        "q",
        "--group",
        "g",
        "--max",
        "2",
        "--wait-ms",
        "5000",
    ]);
    ok(&received, "receive");
    let lines: Vec<serde_json::Value> = String::from_utf8(received.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["handle"], "0:0:1");
    assert_eq!(lines[0]["value"], "one");
    assert_eq!(lines[1]["attempt"], 1);
    ok(&run(&["ack", "q", "--group", "g", "0:0:1"]), "ack");
    let retried = run(&["ack", "q", "--group", "g", "0:0:1"]);
    ok(&retried, "a retried ack");
    assert!(String::from_utf8_lossy(&retried.stderr).contains("0:0:1 was already settled"));
    let refused = run(&["ack", "q", "--group", "g", "0:0:1", "0:7:1"]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8(refused.stderr).unwrap();
    assert_eq!(
        stderr
            .lines()
            .filter(|line| line.starts_with("shardq: ack refused"))
            .count(),
        1,
        "{stderr}"
    );
    assert!(
        stderr.contains("ack refused 0:7:1: never delivered"),
        "{stderr}"
    );
    ok(
        &run(&[
            "nack",
            "q",
            "--group",
            "g",
            "--delay-ms",
            "0",
            "--reason",
            "later",
            "0:1:1",
        ]),
        "nack",
    );
    let again = run(&["receive", "q", "--group", "g", "--wait-ms", "5000", "--ack"]);
    ok(&again, "receive --ack");
    let line: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(
        (line["handle"].as_str(), line["value"].as_str()),
        (Some("0:1:2"), Some("two"))
    );

    let described = run(&["group", "describe", "q", "--group", "g", "--json"]);
    ok(&described, "group describe");
    let json: serde_json::Value = serde_json::from_slice(&described.stdout).unwrap();
    let partition = &json["groups"][0]["partitions"][0];
    assert_eq!(json["groups"][0]["kind"], "queue");
    assert_eq!(partition["acked"], 2);
    assert_eq!(partition["ack_floor"], 2);
    assert_eq!(partition["lag"], 0);
    let listed = run(&["group", "list", "q"]);
    ok(&listed, "group list");
    assert!(
        String::from_utf8_lossy(&listed.stdout).starts_with("g\tkind=queue\tpartitions=1\tlag=0")
    );
    let unknown = run(&["group", "describe", "q", "--group", "nobody"]);
    assert_eq!(unknown.status.code(), Some(1));
}

#[test]
fn bench_queue_acks_everything_and_dead_letters_the_failing_share() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let out = tempfile::tempdir().unwrap();
    let json_path = out.path().join("queue.json");
    let output = Command::new(env!("CARGO_BIN_EXE_shardq"))
        .args([
            "bench",
            "queue",
            "--messages",
            "2000",
            "--message-size",
            "100",
            "--workers",
            "2",
            "--receive-batch",
            "50",
            "--ack-batch",
            "25",
            "--fail-rate",
            "0.05",
            "--quiet",
            "--server",
            &broker.addr().to_string(),
            "--json",
        ])
        .arg(&json_path)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(json["workload"], "queue");
    let acked = json["acked_messages"].as_u64().unwrap();
    let dead = json["dead_lettered_messages"].as_u64().unwrap();
    assert_eq!(acked + dead, 2000);
    assert!(dead > 0, "a 5% fail rate dead-letters some of 2000");
    assert_eq!(json["verified_messages"], 2000);
    assert!(json["receive_ack_latency_us"]["p50"].as_f64().unwrap() > 0.0);
    assert!(json["acked_msgs_per_s"].as_f64().unwrap() > 0.0);
    let summary = String::from_utf8_lossy(&output.stdout);
    assert!(summary.contains("receive-ack"), "{summary}");
}
