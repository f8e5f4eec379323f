//! `shardq serve` stopped and started again, as docs/operations.md and protocol.md §5.4
//! promise: a deleted topic stays gone after a clean restart and after a kill -9 right
//! after the delete was answered; SIGINT stops as cleanly as SIGTERM; a stop with
//! `shutdown_drain_ms` and `connection_linger_ms` at 0 does not wait for a client that
//! never reads.
mod common;

use std::io::Write;
use std::time::Instant;

use bytes::BytesMut;
use common::process::{Serve, STEP_TIMEOUT};
use common::{batch_of, values, RawClient};
use shardq::protocol::*;

fn signal(broker: &Serve, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(broker.child.id()).expect("a pid fits pid_t");
    // SAFETY: kill(2) takes any pid and signal number; the pid is our own child, not yet
    // reaped (the Serve owns it), so it names no other process.
    let sent = unsafe { libc::kill(pid, signal) };
    assert_eq!(sent, 0, "kill: {}", std::io::Error::last_os_error());
}

fn delete_topic(client: &mut RawClient, topic: &str) {
    assert_eq!(
        client.call(&Request::DeleteTopic(DeleteTopicRequest {
            name: topic.into()
        })),
        Ok(ResponseBody::DeleteTopic)
    );
}

/// Checks that `topic` is unknown to the broker (Metadata, Fetch and Produce) and has
/// no directory left.
fn assert_gone(client: &mut RawClient, data_dir: &std::path::Path, topic: &str) {
    let response = client.call(&Request::Metadata(MetadataRequest {
        topics: vec![topic.into()],
    }));
    let Ok(ResponseBody::Metadata(metadata)) = response else {
        panic!("{response:?}")
    };
    let error = metadata.topics[0].error.as_ref().expect("an unknown topic");
    assert_eq!(error.code, ErrorCode::UnknownTopic, "{topic}: {error:?}");
    assert_eq!(
        client
            .produce(topic, 0, batch_of(&[b"late"]))
            .map_err(|error| error.code),
        Err(ErrorCode::UnknownTopic),
        "{topic}"
    );
    assert!(
        !data_dir.join("topics").join(topic).exists(),
        "{topic}'s directory is gone"
    );
}

#[test]
fn a_deleted_topic_stays_gone_after_a_restart_and_after_a_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let arguments = ["--cores", "2"];
    let mut broker = Serve::start(&data_dir, "127.0.0.1:0", &arguments);
    let mut client = RawClient::connect(broker.wait_serving());
    for topic in ["gone", "kept"] {
        client.create_topic(topic, 2);
        for partition in 0..2 {
            client
                .produce(topic, partition, batch_of(&[topic.as_bytes()]))
                .unwrap();
        }
    }
    delete_topic(&mut client, "gone");
    drop(client);
    signal(&broker, libc::SIGTERM);
    let (status, stderr) = broker.wait_exit();
    assert_eq!(status.code(), Some(0), "{stderr}");

    let mut broker = Serve::start(&data_dir, "127.0.0.1:0", &arguments);
    let mut client = RawClient::connect(broker.wait_serving());
    assert_gone(&mut client, &data_dir, "gone");
    for partition in 0..2 {
        assert_eq!(
            values(&client.fetch_all("kept", partition, 0)),
            vec!["kept"]
        );
    }
    // Deleted, answered, and killed at once: the answer means it is gone on disk.
    client.create_topic("again", 2);
    for partition in 0..2 {
        client
            .produce("again", partition, batch_of(&[b"first life"]))
            .unwrap();
    }
    delete_topic(&mut client, "again");
    broker.kill9();
    drop(client);

    let mut broker = Serve::start(&data_dir, "127.0.0.1:0", &arguments);
    let mut client = RawClient::connect(broker.wait_serving());
    assert_gone(&mut client, &data_dir, "again");
    // A topic of the same name starts from nothing.
    client.create_topic("again", 1);
    assert_eq!(
        client.produce("again", 0, batch_of(&[b"second life"])),
        Ok(0)
    );
    assert_eq!(
        values(&client.fetch_all("again", 0, 0)),
        vec!["second life"]
    );
    for partition in 0..2 {
        assert_eq!(
            values(&client.fetch_all("kept", partition, 0)),
            vec!["kept"]
        );
    }
}

#[test]
fn sigint_stops_cleanly_like_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut broker = Serve::start(&data_dir, "127.0.0.1:0", &["--cores", "2"]);
    let address = broker.wait_serving();
    let mut client = RawClient::connect(address);
    client.create_topic("orders", 2);
    for value in ["a", "b", "c"] {
        client
            .produce("orders", 1, batch_of(&[value.as_bytes()]))
            .unwrap();
    }
    // A long-poll open at the stop is answered before the connection ends.
    let long_poll = client.send(&Request::Fetch(FetchRequest {
        wait_ms_max: 30_000,
        bytes_max: 1 << 20,
        topics: vec![FetchTopic {
            name: "orders".into(),
            partitions: vec![FetchPartition {
                partition: 0,
                offset: 0,
                bytes_max: 1 << 20,
            }],
        }],
    }));
    // A round trip behind it shows the broker has read it.
    client
        .call(&Request::Metadata(MetadataRequest { topics: vec![] }))
        .unwrap();
    signal(&broker, libc::SIGINT);
    let (id, _, _) = client
        .read_frame()
        .expect("the long-poll is answered at the stop");
    assert_eq!(id, long_poll);
    let (status, stderr) = broker.wait_exit();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("stopped cleanly"), "{stderr}");

    let mut broker = Serve::start(&data_dir, "127.0.0.1:0", &["--cores", "2"]);
    let mut client = RawClient::connect(broker.wait_serving());
    assert_eq!(
        values(&client.fetch_all("orders", 1, 0)),
        vec!["a", "b", "c"]
    );
}

#[test]
fn a_stop_with_zero_drain_and_linger_does_not_wait_for_a_client_that_never_reads() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    // Waiting on the client (until response_write_timeout_ms, 30 s) would pass this
    // shutdown_timeout_ms and exit 1.
    let arguments = [
        "--cores",
        "1",
        "--set",
        "shutdown_drain_ms=0",
        "--set",
        "connection_linger_ms=0",
        "--set",
        "shutdown_timeout_ms=20000",
    ];
    let mut broker = Serve::start(&data_dir, "127.0.0.1:0", &arguments);
    let address = broker.wait_serving();
    let mut admin = RawClient::connect(address);
    admin.create_topic("big", 1);
    let value = vec![b'b'; 50_000];
    for _ in 0..40 {
        admin.produce("big", 0, batch_of(&[&value])).unwrap();
    }
    // 2 MB a fetch, 64 of them, never read: far more than the socket buffers hold.
    let mut stuck = RawClient::connect(address);
    let mut requests = BytesMut::new();
    for id in 1..=64u64 {
        Request::Fetch(FetchRequest {
            wait_ms_max: 0,
            bytes_max: 4 << 20,
            topics: vec![FetchTopic {
                name: "big".into(),
                partitions: vec![FetchPartition {
                    partition: 0,
                    offset: 0,
                    bytes_max: 4 << 20,
                }],
            }],
        })
        .encode(id, &mut requests);
    }
    stuck.stream.write_all(&requests).unwrap();
    // Wait until the broker holds answers it cannot write (bounded).
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let response = admin.call(&Request::Stats(StatsRequest { topics: vec![] }));
        let Ok(ResponseBody::Stats(stats)) = response else {
            panic!("{response:?}")
        };
        // Its own Stats request counts one.
        if stats.shards[0].requests_in_flight > 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the fetches were never read");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    drop(admin);
    signal(&broker, libc::SIGTERM);
    let (status, stderr) = broker.wait_exit();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("stopped cleanly"), "{stderr}");
    drop(stuck);

    let mut broker = Serve::start(&data_dir, "127.0.0.1:0", &["--cores", "1"]);
    let mut client = RawClient::connect(broker.wait_serving());
    assert_eq!(client.fetch_all("big", 0, 0).len(), 40);
}
