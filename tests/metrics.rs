//! The metrics endpoint and the Stats operation against a known workload: every count is
//! checked exactly, not just for presence (tests/dashboard.rs checks presence of every
//! family); and the health checks flip at the right moments of a real `shardq serve`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::client::{records_until, STEP_TIMEOUT};
use common::process::Serve;
use common::{batch_of, test_config, TestBroker};
use shardq::client::{Acks, Client, ClientError, NackDelay, QueueConsumer};
use shardq::protocol::{ErrorCode, ProducePartition, ProduceRequest, ProduceTopic};

/// A blocking HTTP GET: (status, body). The endpoint closes every connection after its
/// answer.
fn http_get(address: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {answer:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    Ok((status, body.to_owned()))
}

/// The sum of every sample of `name` whose labels include all of `labels`.
fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((series_name, rest)) => (series_name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if series_name != name {
                return None;
            }
            let all = labels.iter().all(|(label, wanted)| {
                series_labels
                    .split(',')
                    .any(|pair| pair == format!("{label}=\"{wanted}\""))
            });
            all.then(|| value.parse::<f64>().expect("a sample value"))
        })
        .sum()
}

async fn scrape(address: SocketAddr) -> String {
    tokio::task::spawn_blocking(move || {
        let (status, body) = http_get(address, "/metrics").expect("a scrape");
        assert_eq!(status, 200, "{body}");
        body
    })
    .await
    .unwrap()
}

fn produce_request(topic: &str, partition: u32, acks: Acks, records: usize) -> ProduceRequest {
    let values: Vec<Vec<u8>> = (0..records)
        .map(|index| format!("record {index} of {partition}").into_bytes())
        .collect();
    let values: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
    ProduceRequest {
        acks,
        timeout_ms: 10_000,
        topics: vec![ProduceTopic {
            name: topic.into(),
            partitions: vec![ProducePartition {
                partition,
                batch: batch_of(&values),
            }],
        }],
    }
}

/// Sends one produce; returns the batch's size in bytes.
async fn produce(client: &Client, topic: &str, partition: u32, acks: Acks, records: usize) -> u64 {
    let request = produce_request(topic, partition, acks, records);
    let bytes = request.topics[0].partitions[0].batch.len() as u64;
    let answer = client.produce(request).await.unwrap();
    if let Some(response) = answer {
        let result = &response.topics[0].partitions[0].result;
        assert!(result.is_ok(), "produce to {topic}/{partition}: {result:?}");
    }
    bytes
}

#[tokio::test]
async fn metrics_and_stats_count_exactly_what_was_produced_fetched_and_settled() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), 2);
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let broker = TestBroker::start_with(config);
    let metrics = broker
        .handle
        .as_ref()
        .unwrap()
        .metrics_addr
        .expect("metrics on");
    let client = Client::connect(broker.addr()).await.unwrap();
    client.create_topic("m", 3).await.unwrap();

    // Per partition: records and bytes produced, by acks level and batch.
    let mut records = [0u64; 3];
    let mut bytes = [0u64; 3];
    let mut produce_requests = 0;
    for partition in 0..3u32 {
        for batch in [(partition as usize + 1) * 3, 5] {
            bytes[partition as usize] +=
                produce(&client, "m", partition, Acks::Durable, batch).await;
            records[partition as usize] += batch as u64;
            produce_requests += 1;
        }
    }
    bytes[0] += produce(&client, "m", 0, Acks::Memory, 4).await;
    records[0] += 4;
    bytes[1] += produce(&client, "m", 1, Acks::None, 2).await;
    records[1] += 2;
    produce_requests += 2;
    // Reads stop at the durable watermark: once every record was fetched, every one is
    // durable, the memory- and none-acked ones included.
    for partition in 0..3u32 {
        let fetched = records_until(
            &client,
            "m",
            partition,
            records[partition as usize] as usize,
        )
        .await;
        assert_eq!(fetched.len() as u64, records[partition as usize]);
    }
    // Two failures: one answered, one nobody hears of but the counters.
    let answer = client
        .produce(produce_request("no-such-topic", 0, Acks::Durable, 1))
        .await
        .unwrap()
        .expect("acks durable is answered");
    let error = answer.topics[0].partitions[0].result.clone().unwrap_err();
    assert_eq!(error.code, ErrorCode::UnknownTopic);
    assert!(client
        .produce(produce_request("no-such-topic", 0, Acks::None, 1))
        .await
        .unwrap()
        .is_none());
    produce_requests += 2;

    // A queue group over a topic of two messages: both delivered, one acked, the other
    // nacked and delivered again (so 3 deliveries, 1 in flight); a stream group
    // committed 2 records into partition 0 of the first topic.
    client.create_topic("q", 1).await.unwrap();
    produce(&client, "q", 0, Acks::Durable, 2).await;
    let consumer = QueueConsumer::builder(client.clone(), "q", "workers")
        .visibility_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let mut received = Vec::new();
    let deadline = Instant::now() + STEP_TIMEOUT;
    while received.len() < 2 {
        assert!(Instant::now() < deadline, "fewer than 2 messages received");
        let wanted = 2 - received.len() as u32;
        received.extend(
            consumer
                .receive(wanted, None, Duration::from_secs(5))
                .await
                .unwrap(),
        );
    }
    assert!(consumer
        .ack(&[received[0].handle()])
        .await
        .unwrap()
        .is_success());
    assert!(consumer
        .nack(&[received[1].handle()], NackDelay::Ms(0), "again")
        .await
        .unwrap()
        .is_success());
    let again = loop {
        assert!(
            Instant::now() < deadline,
            "the nacked message did not come back"
        );
        let more = consumer
            .receive(1, None, Duration::from_secs(5))
            .await
            .unwrap();
        if let Some(message) = more.into_iter().next() {
            break message;
        }
    };
    assert_eq!(again.attempt(), 2);
    client
        .commit_offsets("readers", "m", &[(0, 2)])
        .await
        .unwrap();

    // acks=none is never answered: scrape until its failure is counted.
    let deadline = Instant::now() + STEP_TIMEOUT;
    let text = loop {
        let text = scrape(metrics).await;
        if sum(&text, "shardq_acks_none_failures_total", &[]) >= 1.0 {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "the acks=none failure was never counted:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for partition in 0..3usize {
        let labels = [("topic", "m"), ("partition", &*partition.to_string())];
        let expect = |name: &str, value: u64| {
            assert_eq!(
                sum(&text, name, &labels),
                value as f64,
                "{name} of partition {partition}:\n{text}"
            );
        };
        expect("shardq_produce_records_total", records[partition]);
        expect("shardq_produce_bytes_total", bytes[partition]);
        expect("shardq_fetch_records_total", records[partition]);
        expect("shardq_fetch_bytes_total", bytes[partition]);
        expect("shardq_log_end_offset", records[partition]);
        expect("shardq_log_durable_offset", records[partition]);
        expect("shardq_log_durable_lag_records", 0);
        expect("shardq_log_start_offset", 0);
        expect("shardq_log_segments", 1);
        expect("shardq_log_bytes", bytes[partition]);
    }
    assert_eq!(
        sum(&text, "shardq_requests_total", &[("operation", "produce")]),
        (produce_requests + 1) as f64,
        "and the one to q"
    );
    assert_eq!(
        sum(
            &text,
            "shardq_errors_total",
            &[("operation", "produce"), ("code", "unknown_topic")]
        ),
        2.0
    );
    assert_eq!(
        sum(
            &text,
            "shardq_acks_none_failures_total",
            &[("code", "unknown_topic")]
        ),
        1.0
    );
    assert_eq!(
        sum(
            &text,
            "shardq_produce_latency_seconds_count",
            &[("acks", "durable")]
        ),
        8.0,
        "six durable produces to m, the refused one and the one to q"
    );
    let group = [("topic", "q"), ("group", "workers")];
    assert_eq!(sum(&text, "shardq_queue_delivered_total", &group), 3.0);
    assert_eq!(sum(&text, "shardq_queue_redelivered_total", &group), 1.0);
    assert_eq!(sum(&text, "shardq_queue_nacked_total", &group), 1.0);
    assert_eq!(sum(&text, "shardq_queue_acked_total", &group), 1.0);
    assert_eq!(sum(&text, "shardq_queue_in_flight", &group), 1.0);
    assert_eq!(
        sum(
            &text,
            "shardq_group_lag_records",
            &[("group", "workers"), ("kind", "queue")]
        ),
        1.0,
        "the redelivered message is unsettled"
    );
    assert_eq!(
        sum(
            &text,
            "shardq_group_lag_records",
            &[("group", "readers"), ("kind", "stream"), ("partition", "0")]
        ),
        (records[0] - 2) as f64
    );
    assert_eq!(
        sum(&text, "shardq_connections_open", &[]),
        1.0,
        "the test's client"
    );
    assert_eq!(sum(&text, "shardq_shard_up", &[]), 2.0);

    // The Stats operation reads the same counters.
    let stats = client.stats(&["m"]).await.unwrap();
    assert_eq!(stats.shards.len(), 2);
    assert_eq!(stats.partitions.len(), 3);
    for (partition, figures) in stats.partitions.iter().enumerate() {
        assert_eq!(figures.topic, "m");
        assert_eq!(figures.partition, partition as u32);
        assert_eq!(figures.records_in, records[partition]);
        assert_eq!(figures.bytes_in, bytes[partition]);
        assert_eq!(figures.records_out, records[partition]);
        assert_eq!(figures.bytes_out, bytes[partition]);
        assert_eq!(figures.log_end_offset, records[partition]);
        assert_eq!(figures.high_watermark, records[partition]);
        assert_eq!(figures.bytes, bytes[partition]);
    }
    let errors: u64 = stats.shards.iter().map(|shard| shard.errors_total).sum();
    assert_eq!(errors, 2);
    let error = client.stats(&["no-such-topic"]).await.unwrap_err();
    assert!(
        matches!(&error, ClientError::UnknownTopic { topic } if topic == "no-such-topic"),
        "{}",
        error.report()
    );

    // A deleted topic's series go with it (a scrape within 250 ms of the last one may
    // show the shards' previous snapshot).
    client.delete_topic("m").await.unwrap();
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let text = scrape(metrics).await;
        if !text.contains("topic=\"m\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "topic m's series stayed:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn health_is_live_but_not_ready_during_recovery_then_ready_until_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Serve::start_with_env(
        dir.path(),
        "127.0.0.1:0",
        &["--cores", "1"],
        &[("SHARDQ_TEST_RECOVERY_DELAY_MS", "3000")],
    );
    let deadline = Instant::now() + STEP_TIMEOUT;
    let metrics: SocketAddr = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = serve
            .lines
            .recv_timeout(left)
            .expect("a line saying where the health checks are");
        // Anywhere in the line: log lines start with a timestamp and a level.
        if let Some((_, rest)) = line.split_once("metrics and health checks on http://") {
            break rest.split(' ').next().unwrap().parse().unwrap();
        }
    };
    // Recovery is held for 3 s: the shard's loop turns, but it is not ready.
    let (status, body) = http_get(metrics, "/health/ready").unwrap();
    assert_eq!(status, 503, "{body}");
    let (status, body) = http_get(metrics, "/health/live").unwrap();
    assert_eq!(status, 200, "{body}");
    serve.wait_serving();
    let (status, body) = http_get(metrics, "/health/ready").unwrap();
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    assert_eq!(serve.metrics_address, Some(metrics));
    // SAFETY: kill(2) on the child's pid with SIGTERM, which the broker handles.
    unsafe { libc::kill(serve.child.id() as i32, libc::SIGTERM) };
    let (status, output) = serve.wait_exit();
    assert!(status.success(), "{output}");
    assert!(
        http_get(metrics, "/health/ready").is_err(),
        "nothing answers once the broker has stopped"
    );
}
