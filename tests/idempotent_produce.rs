//! Idempotent produce against the real broker (docs/protocol.md §8.1): a resent batch is
//! answered with its original offset and stored once, across a restart too; out-of-order
//! sequences are refused; the table's bound evicts; and the tokio producer retries a
//! lost answer without storing the record twice.

mod common;

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use common::*;
use shardq::protocol::batch::{self, BatchBuilder};
use shardq::protocol::ErrorCode;

/// Batch number `sequence` of idempotent producer `producer`.
fn producer_batch(producer: u64, sequence: u64, values: &[&str]) -> Bytes {
    let mut builder = BatchBuilder::new(BytesMut::new());
    builder.set_producer(producer, sequence);
    for value in values {
        builder.push(1_700_000_000_000, None, value.as_bytes(), &[]);
    }
    builder.finish()
}

fn produce_via(address: SocketAddr, batch: &Bytes) -> Result<u64, shardq::protocol::WireError> {
    RawClient::connect(address).produce("t", 1, batch.clone())
}

#[test]
fn resent_batch_gets_its_original_offset_and_is_stored_once_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = TestBroker::start(dir.path(), 2);
    let mut client = RawClient::connect(broker.addr());
    client.create_topic("t", 2);
    let first = producer_batch(0xfeed, 0, &["a", "b"]);
    let second = producer_batch(0xfeed, 1, &["c"]);
    assert_eq!(client.produce("t", 1, first.clone()), Ok(0));
    // The same bytes again, through each shard's own port (one of them forwards to the
    // owner): the original offset, nothing stored.
    for shard in 0..2 {
        assert_eq!(produce_via(broker.shard_addr(shard), &first), Ok(0));
    }
    assert_eq!(client.produce("t", 1, second.clone()), Ok(2));
    assert_eq!(client.produce("t", 1, second.clone()), Ok(2));
    assert_eq!(values(&client.fetch_all("t", 1, 0)), vec!["a", "b", "c"]);

    // A clean restart on the same data directory: the table comes back from its
    // snapshot.
    let config = broker.config.clone();
    broker.stop();
    let broker = TestBroker::start_with(config);
    let mut client = RawClient::connect(broker.addr());
    assert_eq!(client.produce("t", 1, first.clone()), Ok(0));
    assert_eq!(client.produce("t", 1, second.clone()), Ok(2));
    assert_eq!(values(&client.fetch_all("t", 1, 0)), vec!["a", "b", "c"]);

    // Out of order: a gap, and the same sequence with other records.
    for (sequence, values) in [(3, &["gap"][..]), (1, &["other"][..])] {
        let refused = client
            .produce("t", 1, producer_batch(0xfeed, sequence, values))
            .unwrap_err();
        assert_eq!(refused.code, ErrorCode::OutOfOrderSequence, "{refused}");
        assert!(refused.message.contains("expected sequence 2"), "{refused}");
    }
    // The next one in line is taken; batches without a producer id are never deduplicated.
    assert_eq!(
        client.produce("t", 1, producer_batch(0xfeed, 2, &["d"])),
        Ok(3)
    );
    let plain = batch_of(&[b"e"]);
    assert_eq!(client.produce("t", 1, plain.clone()), Ok(4));
    assert_eq!(client.produce("t", 1, plain), Ok(5));
    assert_eq!(
        values(&client.fetch_all("t", 1, 0)),
        vec!["a", "b", "c", "d", "e", "e"]
    );
}

#[test]
fn format_1_batch_is_refused_with_the_expected_magic_named() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 1);
    let mut client = RawClient::connect(broker.addr());
    client.create_topic("t", 1);
    let mut old = batch_of(&[b"old"]).to_vec();
    old[24] = 1;
    let crc = batch::compute_crc(&old);
    old[20..24].copy_from_slice(&crc.to_le_bytes());
    let refused = client.produce("t", 0, old.into()).unwrap_err();
    assert_eq!(refused.code, ErrorCode::InvalidBatch);
    assert!(
        refused.message.contains("is 1, expected 2"),
        "{}",
        refused.message
    );
}

#[test]
fn producers_per_partition_max_evicts_the_producer_with_the_oldest_append() {
    let dir = tempfile::tempdir().unwrap();
    let config = shardq::config::ServerConfig {
        producers_per_partition_max: 2,
        ..test_config(dir.path(), 1)
    };
    let broker = TestBroker::start_with(config);
    let mut client = RawClient::connect(broker.addr());
    client.create_topic("t", 1);
    let batches: Vec<Bytes> = (1..=3u64)
        .map(|producer| producer_batch(producer, 0, &[&format!("p{producer}")]))
        .collect();
    for (offset, batch) in batches.iter().enumerate() {
        assert_eq!(client.produce("t", 0, batch.clone()), Ok(offset as u64));
    }
    // Producers 2 and 3 are remembered; producer 1, the oldest, was evicted, so its
    // resend is stored again.
    assert_eq!(client.produce("t", 0, batches[2].clone()), Ok(2));
    assert_eq!(client.produce("t", 0, batches[1].clone()), Ok(1));
    assert_eq!(client.produce("t", 0, batches[0].clone()), Ok(3));
    assert_eq!(
        values(&client.fetch_all("t", 0, 0)),
        vec!["p1", "p2", "p3", "p1"]
    );
}

#[test]
fn invalid_producer_table_bound_is_refused_by_the_config() {
    let dir = tempfile::tempdir().unwrap();
    for (table, interval) in [(0, 16 << 20), (10, 0)] {
        let config = shardq::config::ServerConfig {
            producers_per_partition_max: table,
            producer_snapshot_interval_bytes: interval,
            ..test_config(dir.path(), 1)
        };
        let error = config.validate().unwrap_err();
        let name = if table == 0 {
            "producers_per_partition_max"
        } else {
            "producer_snapshot_interval_bytes"
        };
        assert_eq!(error.key, name, "{error}");
    }
}

mod client_retries {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use bytes::BytesMut;
    use shardq::client::{Client, ClientConfig, Producer, ProducerConfig, ProducerRecord};
    use shardq::protocol::{decode_frame_header, Decoded, Opcode};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::common::client::records_until;
    use super::common::TestBroker;

    /// A proxy in front of the broker that forwards every byte, except that it drops the
    /// answers to the first `drop_produce_answers` produce requests (over all its
    /// connections): the broker stores the batch and the client never hears so, as when
    /// an ack is lost. It serves every connection the client opens (a client gives up a
    /// connection whose answer did not come, and reconnects).
    async fn lossy_proxy(
        broker: std::net::SocketAddr,
        drop_produce_answers: usize,
    ) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let dropped = Arc::new(AtomicUsize::new(0));
        let counter = dropped.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(forward_dropping(
                    client,
                    broker,
                    counter.clone(),
                    drop_produce_answers,
                ));
            }
        });
        (address, dropped)
    }

    /// One proxied connection of `lossy_proxy`.
    async fn forward_dropping(
        client: TcpStream,
        broker: std::net::SocketAddr,
        counter: Arc<AtomicUsize>,
        drop_produce_answers: usize,
    ) {
        let upstream = TcpStream::connect(broker).await.unwrap();
        let (mut client_read, mut client_write) = client.into_split();
        let (mut upstream_read, mut upstream_write) = upstream.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut client_read, &mut upstream_write).await;
        });
        let mut buffer = BytesMut::new();
        loop {
            while let Ok(Decoded::Complete(header)) = decode_frame_header(&buffer, u32::MAX) {
                if buffer.len() < header.frame_length() {
                    break;
                }
                let frame = buffer.split_to(header.frame_length());
                if header.opcode == Opcode::Produce as u8
                    && counter.load(Ordering::SeqCst) < drop_produce_answers
                {
                    counter.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                if client_write.write_all(&frame).await.is_err() {
                    return;
                }
            }
            match upstream_read.read_buf(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn producer_retries_a_lost_answer_and_the_record_is_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let broker = TestBroker::start(dir.path(), 1);
        let direct = Client::connect(broker.addr()).await.unwrap();
        direct.create_topic("t", 1).await.unwrap();
        let (proxy, dropped) = lossy_proxy(broker.addr(), 1).await;
        let client = Client::connect_with(
            proxy,
            ClientConfig::builder()
                // The client gives up on the lost answer after the broker's own wait
                // (below) plus this; not asserted on as a time.
                .request_timeout_ms(200)
                .build()
                .expect("a valid config"),
        )
        .await
        .unwrap();
        let producer = Producer::new(
            client,
            ProducerConfig::builder()
                .request_timeout_ms(200)
                .linger_ms(0)
                .retry_backoff_ms_min(1)
                .retry_backoff_ms_max(10)
                .build()
                .expect("a valid config"),
        )
        .unwrap();
        let handle = producer
            .send("t", ProducerRecord::new("once").with_partition(0))
            .await
            .unwrap();
        let metadata = handle.await.expect("the retry succeeds");
        assert_eq!(metadata.offset, 0, "the original's offset");
        assert_eq!(dropped.load(Ordering::SeqCst), 1, "an answer was lost");
        // A second record lands right after: the first is stored exactly once.
        let next = producer
            .send("t", ProducerRecord::new("next").with_partition(0))
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(next.offset, 1);
        let records = records_until(&direct, "t", 0, 2).await;
        let values: Vec<&[u8]> = records.iter().map(|record| &record.value[..]).collect();
        assert_eq!(values, vec![&b"once"[..], b"next"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_idempotence_a_lost_answer_is_not_retried_and_may_have_been_written() {
        let dir = tempfile::tempdir().unwrap();
        let broker = TestBroker::start(dir.path(), 1);
        let direct = Client::connect(broker.addr()).await.unwrap();
        direct.create_topic("t", 1).await.unwrap();
        let (proxy, _dropped) = lossy_proxy(broker.addr(), 1).await;
        let client = Client::connect_with(
            proxy,
            ClientConfig::builder()
                .request_timeout_ms(200)
                .build()
                .expect("a valid config"),
        )
        .await
        .unwrap();
        let producer = Producer::new(
            client,
            ProducerConfig::builder()
                .request_timeout_ms(200)
                .linger_ms(0)
                .idempotent(false)
                .batches_in_flight_per_partition_max(1)
                .build()
                .expect("a valid config"),
        )
        .unwrap();
        assert_eq!(producer.producer_id(), 0);
        let error = producer
            .send("t", ProducerRecord::new("once").with_partition(0))
            .await
            .unwrap()
            .await
            .unwrap_err();
        assert_eq!(error.maybe_written(), Some(true), "{error}");
        assert!(
            matches!(error.cause(), shardq::client::ClientError::Timeout { .. }),
            "{error}"
        );
        // It was in fact written, once.
        let records = records_until(&direct, "t", 0, 1).await;
        assert_eq!(records.len(), 1);
    }
}
