//! The client across broker crashes: `kill -9` under a producer and a consumer, the
//! broker started again at once on the same address, twice. Both carry on by themselves:
//! every send is acknowledged, and the consumer reads every record once, in send order,
//! at the offset its send was told.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::process::{fixed_port_range, Serve, STEP_TIMEOUT};
use shardq::client::{
    Client, ClientConfig, ClientError, Consumer, ConsumerConfig, Producer, ProducerConfig,
    ProducerRecord, StartPosition,
};

const PARTITIONS: u32 = 2;
const KILLS: usize = 2;
/// Records the consumer must see between two kills (and after the last), so each kill
/// lands while both are busy.
const RECORDS_BETWEEN_KILLS: u64 = 300;
/// Sends the producer makes before waiting for their answers.
const SENDS_PER_ROUND: u64 = 20;

/// Starts `shardq serve` and waits (off the async threads) until it serves.
async fn start_broker(data_dir: std::path::PathBuf, listen: String) -> Serve {
    tokio::task::spawn_blocking(move || {
        let mut broker = Serve::start(
            &data_dir,
            &listen,
            &["--cores", "2", "--bind-retry-ms", "20000"],
        );
        broker.wait_serving();
        broker
    })
    .await
    .expect("the broker starts")
}

/// A broker in a new data directory on ports below the ephemeral range (it must come
/// back on the same address for the clients to find it): the temporary directory, the
/// data directory, the listen address and the broker.
async fn start_on_fixed_ports() -> (tempfile::TempDir, std::path::PathBuf, String, Serve) {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    // The shared port and the two shard ports.
    let port = fixed_port_range(1 + PARTITIONS as u16);
    let listen = format!("127.0.0.1:{port}");
    let broker = start_broker(data_dir.clone(), listen.clone()).await;
    (dir, data_dir, listen, broker)
}

/// Reconnecting (the default), waiting as long as a test step for the broker.
fn reconnecting() -> ClientConfig {
    ClientConfig::builder()
        .reconnect_timeout_ms(STEP_TIMEOUT.as_millis() as u64)
        .build()
        .expect("a valid config")
}

/// Waits until `counter` reaches `target`, failing the test after `STEP_TIMEOUT`.
async fn wait_for(counter: &AtomicU64, target: u64, what: &str) {
    tokio::time::timeout(STEP_TIMEOUT, async {
        while counter.load(Ordering::Acquire) < target {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{what}: {} of {target} within {STEP_TIMEOUT:?}",
            counter.load(Ordering::Acquire)
        )
    });
}

/// Sends `index % PARTITIONS`-partitioned records numbered from 0 until told to stop,
/// waiting for each round's answers; returns each record's acknowledged offset.
async fn produce_until_stopped(
    producer: Producer,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> Result<Vec<u64>, ClientError> {
    let mut offsets = Vec::new();
    let mut next = 0u64;
    while !stop.load(Ordering::Acquire) {
        let mut handles = Vec::new();
        for index in next..next + SENDS_PER_ROUND {
            let record = ProducerRecord::new(index.to_string())
                .with_partition((index % u64::from(PARTITIONS)) as u32);
            handles.push(producer.send("orders", record).await?);
        }
        next += SENDS_PER_ROUND;
        for handle in handles {
            let metadata = handle.await?;
            offsets.push(metadata.offset);
        }
        sent.store(next, Ordering::Release);
    }
    producer.close().await?;
    Ok(offsets)
}

/// Reads every partition from the beginning until `expected` says how many records
/// there are and all of them are in; returns, per partition, (offset, value) in the
/// order read. Any error of a poll fails the test: the consumer must ride out the
/// crashes by itself.
async fn consume_all(
    mut consumer: Consumer,
    read: Arc<AtomicU64>,
    expected: Arc<AtomicU64>,
) -> Vec<Vec<(u64, u64)>> {
    let mut seen = vec![Vec::new(); PARTITIONS as usize];
    consumer
        .assign_topic("orders", StartPosition::Beginning)
        .await
        .expect("assign");
    loop {
        let total = read.load(Ordering::Acquire);
        if total > 0 && total == expected.load(Ordering::Acquire) {
            return seen;
        }
        let records = consumer
            .poll_with_wait(100)
            .await
            .unwrap_or_else(|error| panic!("poll failed after {total} records: {error}"));
        for record in records {
            let value: u64 = std::str::from_utf8(record.value())
                .unwrap()
                .parse()
                .unwrap();
            seen[record.partition() as usize].push((record.offset(), value));
        }
        read.store(
            seen.iter().map(|records| records.len() as u64).sum(),
            Ordering::Release,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_and_consumer_carry_on_across_kill_9_and_restart() {
    let (_dir, data_dir, listen, mut broker) = start_on_fixed_ports().await;
    let config = reconnecting();
    let admin = Client::connect_with(&listen, config.clone()).await.unwrap();
    admin.create_topic("orders", PARTITIONS).await.unwrap();
    let producer_client = Client::connect_with(&listen, config.clone()).await.unwrap();
    let consumer_client = Client::connect_with(&listen, config).await.unwrap();
    let producer = Producer::new(
        producer_client.clone(),
        ProducerConfig::builder()
            .linger_ms(1)
            .delivery_timeout_ms(2 * STEP_TIMEOUT.as_millis() as u64)
            .build()
            .expect("a valid config"),
    )
    .unwrap();
    let consumer = Consumer::new(consumer_client.clone(), ConsumerConfig::default()).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let read = Arc::new(AtomicU64::new(0));
    let expected = Arc::new(AtomicU64::new(0));
    let producing = tokio::spawn(produce_until_stopped(producer, stop.clone(), sent.clone()));
    let consuming = tokio::spawn(consume_all(consumer, read.clone(), expected.clone()));

    for kill in 1..=KILLS as u64 {
        wait_for(
            &read,
            kill * RECORDS_BETWEEN_KILLS,
            "records read before a kill",
        )
        .await;
        tokio::task::spawn_blocking(move || {
            broker.kill9();
            drop(broker);
        })
        .await
        .unwrap();
        broker = start_broker(data_dir.clone(), listen.clone()).await;
    }
    wait_for(
        &read,
        (KILLS as u64 + 1) * RECORDS_BETWEEN_KILLS,
        "records read after the last restart",
    )
    .await;
    stop.store(true, Ordering::Release);
    let offsets = tokio::time::timeout(STEP_TIMEOUT, producing)
        .await
        .expect("the producer stops")
        .unwrap()
        .unwrap_or_else(|error| panic!("a send failed across the restarts: {error}"));
    expected.store(offsets.len() as u64, Ordering::Release);
    let seen = tokio::time::timeout(STEP_TIMEOUT, consuming)
        .await
        .expect("the consumer reads everything that was acknowledged")
        .unwrap();

    // Both clients really went through new connections.
    assert!(
        producer_client.reconnects() >= KILLS as u64,
        "{producer_client:?}"
    );
    assert!(
        consumer_client.reconnects() >= KILLS as u64,
        "{consumer_client:?}"
    );
    // Every record once, in send order, at the offset its send was told, offsets dense.
    for (partition, records) in seen.iter().enumerate() {
        let expected_values: Vec<u64> = (0..offsets.len() as u64)
            .filter(|index| index % u64::from(PARTITIONS) == partition as u64)
            .collect();
        let values: Vec<u64> = records.iter().map(|(_, value)| *value).collect();
        assert_eq!(
            values, expected_values,
            "partition {partition}: every record once, in send order"
        );
        for (position, (offset, value)) in records.iter().enumerate() {
            assert_eq!(
                *offset, position as u64,
                "partition {partition}: dense offsets"
            );
            assert_eq!(
                offsets[*value as usize], *offset,
                "record {value}: read at the offset its send was acknowledged with"
            );
        }
    }
    drop(broker);
}

/// A queue worker (`QueueConsumer::run`) across `kill -9` and a restart: the loop does not
/// end, and every message is handled and acknowledged; the group ends with nothing in
/// flight and nothing left to deliver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_worker_carries_on_across_kill_9_and_restart() {
    use shardq::client::{QueueSettings, Retention};
    use std::collections::HashSet;
    use std::sync::Mutex;

    const MESSAGES: u64 = 400;
    let (_dir, data_dir, listen, mut broker) = start_on_fixed_ports().await;
    let client = Client::connect_with(&listen, reconnecting()).await.unwrap();
    // Short leases, so a delivery whose ack died with the broker comes back soon.
    let queue = QueueSettings {
        visibility_timeout_ms: Some(1_000),
        ..QueueSettings::default()
    };
    client
        .create_topic_with_queue("jobs", PARTITIONS, Retention::default(), queue)
        .await
        .unwrap();
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    for index in 0..MESSAGES {
        producer
            .send("jobs", ProducerRecord::new(index.to_string()))
            .await
            .unwrap();
    }
    producer.close().await.unwrap();

    let handled: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let handled_count = Arc::new(AtomicU64::new(0));
    // Past the first quarter, handlers wait for the restart: the kill lands with
    // handlers running and the loop receiving.
    let (restarted, restart) = tokio::sync::watch::channel(false);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn({
        // More handlers than messages: once every message is leased, a receive is
        // always waiting at the broker, so the kill breaks one under the loop.
        let consumer = shardq::client::QueueConsumer::builder(client.clone(), "jobs", "workers")
            .handler_concurrency_max(2 * MESSAGES as u32)
            .receive_messages_max(100)
            .receive_wait(std::time::Duration::from_secs(3))
            .build()
            .unwrap();
        let handled = handled.clone();
        let handled_count = handled_count.clone();
        async move {
            consumer
                .run(
                    move |message| {
                        let handled = handled.clone();
                        let handled_count = handled_count.clone();
                        let mut restart = restart.clone();
                        async move {
                            let value: u64 = std::str::from_utf8(message.value())
                                .unwrap()
                                .parse()
                                .unwrap();
                            let count = {
                                let mut handled = handled.lock().unwrap();
                                handled.insert(value);
                                handled.len() as u64
                            };
                            handled_count.fetch_max(count, Ordering::AcqRel);
                            if count > MESSAGES / 4 {
                                restart.wait_for(|done| *done).await.unwrap();
                            }
                            Ok::<(), std::io::Error>(())
                        }
                    },
                    async move {
                        let _ = stopped.await;
                    },
                )
                .await
        }
    });
    wait_for(
        &handled_count,
        MESSAGES / 4,
        "messages handled before the kill",
    )
    .await;
    tokio::task::spawn_blocking(move || {
        broker.kill9();
        drop(broker);
    })
    .await
    .unwrap();
    let broker = start_broker(data_dir.clone(), listen.clone()).await;
    if restarted.send(true).is_err() {
        panic!("the worker loop ended at the kill: {:?}", worker.await);
    }
    wait_for(&handled_count, MESSAGES, "every message handled").await;
    // Every delivery settled: nothing in flight, nothing left. (A message whose ack
    // was lost with the broker is delivered again once its lease runs out.)
    tokio::time::timeout(STEP_TIMEOUT, async {
        loop {
            let groups = client
                .describe_groups("jobs", Some("workers"))
                .await
                .unwrap();
            let settled = groups[0]
                .partitions
                .iter()
                .all(|partition| partition.in_flight == 0 && partition.lag() == 0);
            if settled {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("every message acknowledged");
    stop.send(()).unwrap();
    let summary = tokio::time::timeout(STEP_TIMEOUT, worker)
        .await
        .expect("the worker stops when told")
        .unwrap()
        .unwrap_or_else(|error| panic!("the worker loop ended on an error: {error}"));
    assert!(summary.acked >= MESSAGES, "{summary:?}");
    assert!(client.reconnects() >= 1, "{client:?}");
    drop(broker);
}
