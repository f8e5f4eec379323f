//! A real, small filesystem that fills up or fails: a loop-mounted ext4 image per test.
//! Needs root and loop devices (CI has both); elsewhere each test says why it skips.
//!
//! - a topic create that runs out of space part-way leaves nothing behind and frees its
//!   space at once;
//! - a disk that fills during produce answers `storage_full`, keeps every acknowledged
//!   record, and takes produces again by itself once space is freed;
//! - an I/O error (the filesystem shut down under the broker, as a failing device does)
//!   ends the broker with status 74, and everything acknowledged is there after the
//!   filesystem is mounted again.

mod common;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::process::Serve;
use common::*;
use shardq::protocol::ErrorCode;

/// An ext4 image of `size_mib` MiB, loop-mounted on a temporary directory.
struct LoopFilesystem {
    _root: tempfile::TempDir,
    image: PathBuf,
    mount_point: PathBuf,
    mounted: bool,
}

fn run(program: &str, arguments: &[&str]) -> Result<(), String> {
    let output = Command::new(program)
        .args(arguments)
        .output()
        .map_err(|error| format!("{program}: {error}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {arguments:?}: {:?}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

impl LoopFilesystem {
    /// `None` (after saying why) where loop mounts are not possible.
    fn mount(size_mib: u64) -> Option<LoopFilesystem> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: loop-mounting a test filesystem needs root");
            return None;
        }
        let root = tempfile::tempdir().unwrap();
        let image = root.path().join("disk.img");
        let mount_point = root.path().join("mnt");
        std::fs::create_dir(&mount_point).unwrap();
        std::fs::File::create(&image)
            .unwrap()
            .set_len(size_mib << 20)
            .unwrap();
        let image_text = image.to_str().unwrap();
        let mount_text = mount_point.to_str().unwrap();
        let made = run("mkfs.ext4", &["-q", "-F", image_text])
            .and_then(|()| run("mount", &["-o", "loop", image_text, mount_text]));
        if let Err(error) = made {
            eprintln!("SKIPPED: cannot loop-mount a test filesystem: {error}");
            return None;
        }
        Some(LoopFilesystem {
            _root: root,
            image,
            mount_point,
            mounted: true,
        })
    }

    fn path(&self) -> &Path {
        &self.mount_point
    }

    fn free_bytes(&self) -> u64 {
        let path = std::ffi::CString::new(self.mount_point.to_str().unwrap()).unwrap();
        // SAFETY: statvfs is plain data; the call fills it from a valid C path.
        let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `path` is NUL-terminated and `stats` is a valid out pointer.
        let result = unsafe { libc::statvfs(path.as_ptr(), &mut stats) };
        assert_eq!(result, 0, "statvfs {}", self.mount_point.display());
        stats.f_bavail * stats.f_frsize
    }

    /// Makes every later operation on the filesystem fail with EIO, as a failing device
    /// would, without flushing the journal (EXT4_IOC_SHUTDOWN, NOLOGFLUSH).
    fn shut_down(&self) {
        const EXT4_IOC_SHUTDOWN: libc::c_ulong = 0x8004_587d;
        const EXT4_GOING_FLAGS_NOLOGFLUSH: u32 = 2;
        let directory = std::fs::File::open(&self.mount_point).unwrap();
        let flags = EXT4_GOING_FLAGS_NOLOGFLUSH;
        // SAFETY: the ioctl reads one u32 through the pointer, which outlives the call.
        let result = unsafe {
            libc::ioctl(
                directory.as_raw_fd(),
                EXT4_IOC_SHUTDOWN,
                &flags as *const u32,
            )
        };
        assert_eq!(
            result,
            0,
            "shutting the filesystem down: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Unmounts and mounts the image again (the journal is replayed).
    fn remount(&mut self) {
        let mount_text = self.mount_point.to_str().unwrap();
        run("umount", &[mount_text]).expect("umount");
        self.mounted = false;
        run(
            "mount",
            &["-o", "loop", self.image.to_str().unwrap(), mount_text],
        )
        .expect("mount again");
        self.mounted = true;
    }
}

impl Drop for LoopFilesystem {
    fn drop(&mut self) {
        if self.mounted {
            let mount_text = self.mount_point.to_str().unwrap();
            if run("umount", &[mount_text]).is_err() {
                let _ = run("umount", &["-l", mount_text]);
            }
        }
    }
}

/// Polls `condition` every few milliseconds until it holds, failing after `limit`.
fn wait_until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_create_that_runs_out_of_space_leaves_nothing_behind_and_frees_it_at_once() {
    let Some(filesystem) = LoopFilesystem::mount(64) else {
        return;
    };
    let data_dir = filesystem.path().join("data");
    let broker = TestBroker::start(&data_dir, 2);
    let mut client = RawClient::connect(broker.addr());
    client.create_topic("small", 2);
    let free_before = filesystem.free_bytes();
    // 4 MiB a partition: 32 partitions cannot fit in what is left of 64 MiB.
    let error = client
        .call(&shardq::protocol::Request::CreateTopic(
            shardq::protocol::CreateTopicRequest {
                name: "huge".into(),
                partitions: 32,
                retention: Default::default(),
                queue: Default::default(),
            },
        ))
        .expect_err("there is no room for 32 partitions");
    assert_eq!(error.code, ErrorCode::StorageFull, "{error}");
    assert!(
        !data_dir.join("topics/huge").exists(),
        "nothing of the failed topic is left"
    );
    // Space comes back now, not at the next restart: no partition of the failed topic
    // is still open on a deleted file. (Allow a few blocks of directory metadata.)
    let free_after = filesystem.free_bytes();
    assert!(
        free_after + (256 << 10) >= free_before,
        "free before {free_before}, after {free_after}"
    );
    // The broker goes on: the topic can be created at a size that fits, and is used.
    client.create_topic("huge", 2);
    assert_eq!(client.produce("huge", 1, batch_of(&[b"fits"])), Ok(0));
    assert_eq!(client.produce("small", 0, batch_of(&[b"still"])), Ok(0));
}

#[test]
fn a_full_disk_refuses_produce_keeps_what_was_acked_and_resumes_when_space_is_freed() {
    let Some(filesystem) = LoopFilesystem::mount(64) else {
        return;
    };
    let data_dir = filesystem.path().join("data");
    let config = test_config(&data_dir, 1);
    let mut broker = TestBroker::start_with(config.clone());
    let mut client = RawClient::connect(broker.addr());
    client.create_topic("fill", 1);
    // Leave about 3 MiB free beside the partition's first 4 MiB step.
    let ballast = filesystem.path().join("ballast");
    let ballast_bytes = filesystem.free_bytes() - (3 << 20);
    let file = std::fs::File::create(&ballast).unwrap();
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    let reserved = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, ballast_bytes as i64) };
    assert_eq!(reserved, 0, "{}", std::io::Error::last_os_error());
    drop(file);

    let value = vec![b'x'; 60 << 10];
    let mut acked: Vec<String> = Vec::new();
    let mut sent = 0u64;
    let refused = loop {
        let text = format!("record {sent} ");
        let mut record = text.clone().into_bytes();
        record.extend_from_slice(&value);
        sent += 1;
        match client.produce("fill", 0, batch_of(&[&record])) {
            Ok(offset) => {
                assert_eq!(offset, acked.len() as u64, "offsets stay dense");
                acked.push(text);
            }
            Err(error) => break error,
        }
        assert!(sent < 10_000, "the disk never filled");
    };
    assert_eq!(refused.code, ErrorCode::StorageFull, "{refused}");
    assert!(
        acked.len() > 10,
        "some records went in before the disk filled"
    );
    // Still full: still refused, nothing lost.
    // (A small batch could still go into the current segment: this one needs the new
    // segment that could not be created.)
    let mut while_full = b"while full ".to_vec();
    while_full.extend_from_slice(&value);
    let again = client
        .produce("fill", 0, batch_of(&[&while_full]))
        .expect_err("refused while the disk is full");
    assert_eq!(again.code, ErrorCode::StorageFull);

    std::fs::remove_file(&ballast).unwrap();
    // The partition retries its write every storage_full_retry_ms and takes produces
    // again by itself.
    let mut resumed = None;
    wait_until(
        "produce accepted again",
        Duration::from_secs(30),
        || match client.produce("fill", 0, batch_of(&[b"after"])) {
            Ok(offset) => {
                resumed = Some(offset);
                true
            }
            Err(error) => {
                assert_eq!(error.code, ErrorCode::StorageFull, "{error}");
                false
            }
        },
    );
    let resumed = resumed.unwrap();
    assert!(resumed >= acked.len() as u64);

    drop(client);
    broker.stop();
    let broker = TestBroker::start_with(config);
    let mut client = RawClient::connect(broker.addr());
    let stored = client.fetch_all("fill", 0, 0);
    for (offset, text) in acked.iter().enumerate() {
        assert!(
            stored[offset].value.starts_with(text.as_bytes()),
            "acknowledged offset {offset} holds its record"
        );
    }
    // A batch refused while full never appears; one queued when the disk filled may
    // have been stored by the retry (its producer was told storage_full: at most once).
    let mut seen = std::collections::HashSet::new();
    for record in &stored {
        assert!(
            seen.insert(record.value.clone()),
            "no record is stored twice"
        );
        assert!(!record.value.starts_with(b"while full"));
    }
    assert_eq!(&stored.last().unwrap().value[..], b"after");
}

#[test]
fn an_io_error_on_the_filesystem_ends_the_broker_with_74_and_acked_data_survives() {
    let Some(mut filesystem) = LoopFilesystem::mount(64) else {
        return;
    };
    let data_dir = filesystem.path().join("data");
    let mut broker = Serve::start(&data_dir, "127.0.0.1:0", &["--cores", "1"]);
    let address = broker.wait_serving();
    let mut client = RawClient::connect(address);
    client.create_topic("io", 1);
    for index in 0..20u64 {
        let value = format!("acked {index}");
        assert_eq!(
            client.produce("io", 0, batch_of(&[value.as_bytes()])),
            Ok(index)
        );
    }
    filesystem.shut_down();
    // The next write or fdatasync fails with EIO: no answer but an error, then the
    // process ends (storage_failure_policy = exit).
    client.send(&shardq::protocol::Request::Produce(
        shardq::protocol::ProduceRequest {
            acks: shardq::protocol::Acks::Durable,
            timeout_ms: 10_000,
            topics: vec![shardq::protocol::ProduceTopic {
                name: "io".into(),
                partitions: vec![shardq::protocol::ProducePartition {
                    partition: 0,
                    batch: batch_of(&[b"into a dead disk"]),
                }],
            }],
        },
    ));
    if let Some((_, opcode, body)) = client.read_frame() {
        let opcode = shardq::protocol::Opcode::from_wire(opcode).expect("a produce answer");
        match shardq::protocol::decode_response(opcode, body).expect("decodes") {
            Ok(shardq::protocol::ResponseBody::Produce(response)) => assert!(
                response.topics[0].partitions[0].result.is_err(),
                "nothing is acknowledged on a failed disk"
            ),
            other => assert!(other.is_err(), "{other:?}"),
        }
    }
    let (status, stderr) = broker.wait_exit();
    assert_eq!(status.code(), Some(74), "{status:?}: {stderr}");
    assert!(stderr.contains("can no longer be trusted"), "{stderr}");

    drop(client);
    filesystem.remount();
    let mut broker = Serve::start(&data_dir, "127.0.0.1:0", &["--cores", "1"]);
    let address = broker.wait_serving();
    let mut client = RawClient::connect(address);
    let stored = client.fetch_all("io", 0, 0);
    assert!(stored.len() >= 20, "every acknowledged record survives");
    for (index, record) in stored.iter().take(20).enumerate() {
        assert_eq!(record.value, format!("acked {index}").into_bytes());
    }
}
