//! A segment cut mid-batch while the broker is stopped: the torn batch is dropped on
//! restart, everything before it is intact, and offsets continue from the last whole batch.
mod common;

use common::*;

#[test]
fn truncated_last_batch_is_dropped_on_restart_and_earlier_data_survives() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = TestBroker::start(dir.path(), 1);
    let mut client = RawClient::connect(broker.addr());
    client.create_topic("orders", 1);
    assert_eq!(
        client.produce("orders", 0, batch_of(&[b"a0", b"a1"])),
        Ok(0)
    );
    assert_eq!(
        client.produce("orders", 0, batch_of(&[b"b2", b"b3", b"b4"])),
        Ok(2)
    );
    let last = batch_of(&[b"c5", b"c6"]);
    let last_length = last.len() as u64;
    assert_eq!(client.produce("orders", 0, last), Ok(5));
    drop(client);
    broker.stop();

    let segment = dir.path().join("topics/orders/0/00000000000000000000.log");
    let records = std::fs::read(&segment).unwrap();
    let end =
        records.len() as u64 - records.iter().rev().take_while(|byte| **byte == 0).count() as u64;
    assert!(end >= last_length);
    let cut = end - last_length / 2;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap();
    file.set_len(cut).unwrap();
    drop(file);

    let broker = TestBroker::start_with(broker.config.clone());
    let mut client = RawClient::connect(broker.addr());
    let records = client.fetch_all("orders", 0, 0);
    assert_eq!(values(&records), vec!["a0", "a1", "b2", "b3", "b4"]);
    assert_eq!(
        client.produce("orders", 0, batch_of(&[b"d5"])),
        Ok(5),
        "the dropped batch's offsets are given again: they were never acknowledged as stored"
    );
    let records = client.fetch_all("orders", 0, 0);
    assert_eq!(values(&records), vec!["a0", "a1", "b2", "b3", "b4", "d5"]);
}
