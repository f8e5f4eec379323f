//! Requests for a partition another shard owns are forwarded over the channel mesh and
//! answered by the shard that received them; each shard's own port serves its partitions.
mod common;

use common::*;
use shardq::placement::shard_for;
use shardq::protocol::{MetadataRequest, Request, ResponseBody};

#[test]
fn cross_shard_requests_work_and_shard_ports_serve_their_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let mut shard_zero = RawClient::connect(broker.shard_addr(0));
    shard_zero.create_topic("spread", 4);

    let ResponseBody::Metadata(metadata) = shard_zero
        .call(&Request::Metadata(MetadataRequest { topics: vec![] }))
        .unwrap()
    else {
        panic!("metadata expected")
    };
    assert_eq!(
        metadata.shard_ports,
        broker.handle.as_ref().unwrap().shard_ports
    );
    let partitions = &metadata.topics[0].partitions;
    assert_eq!(partitions.len(), 4);
    for partition in partitions {
        assert_eq!(partition.shard, shard_for("spread", partition.partition, 2));
    }
    let remote = partitions
        .iter()
        .find(|p| p.shard == 1)
        .expect("some partition on shard 1")
        .partition;
    let local = partitions
        .iter()
        .find(|p| p.shard == 0)
        .expect("some partition on shard 0")
        .partition;

    // Through shard 0 to a partition shard 1 owns: forwarded, answered by shard 0.
    assert_eq!(
        shard_zero.produce("spread", remote, batch_of(&[b"via-0"])),
        Ok(0)
    );
    assert_eq!(
        values(&shard_zero.fetch_all("spread", remote, 0)),
        vec!["via-0"]
    );

    // Shard 1's own port serves its own partition directly, and sees the same data.
    let mut shard_one = RawClient::connect(broker.shard_addr(1));
    assert_eq!(
        shard_one.produce("spread", remote, batch_of(&[b"direct-1"])),
        Ok(1)
    );
    assert_eq!(
        values(&shard_one.fetch_all("spread", remote, 0)),
        vec!["via-0", "direct-1"]
    );
    // And it forwards the other way too.
    assert_eq!(
        shard_one.produce("spread", local, batch_of(&[b"via-1"])),
        Ok(0)
    );
    assert_eq!(
        values(&shard_zero.fetch_all("spread", local, 0)),
        vec!["via-1"]
    );

    // The shared port reaches every partition whichever shard accepted the connection.
    let mut shared = RawClient::connect(broker.addr());
    assert_eq!(
        values(&shared.fetch_all("spread", remote, 0)),
        vec!["via-0", "direct-1"]
    );
}
