//! `shardq serve` under systemd: the notification protocol over a real `$NOTIFY_SOCKET`
//! (the test binds the datagram socket systemd would), and the unit file in
//! `tuning/systemd/` checked by `systemd-analyze`.

mod common;

use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::process::{metadata_round_trip, Serve, STEP_TIMEOUT};
use common::RawClient;

/// The service manager's end of `$NOTIFY_SOCKET`.
struct Manager {
    socket: UnixDatagram,
    path: String,
    /// Every datagram received so far, with when it came, for failure messages.
    seen: Vec<(Instant, String)>,
}

impl Manager {
    fn bind(directory: &Path) -> Manager {
        let path = directory.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        Manager {
            socket,
            path: path.to_str().expect("a UTF-8 temp path").to_owned(),
            seen: Vec::new(),
        }
    }

    /// Receives datagrams until one has a line for which `wanted` holds; returns that
    /// line and when its datagram came. Panics with everything seen after `STEP_TIMEOUT`.
    fn wait_for(&mut self, what: &str, wanted: impl Fn(&str) -> bool) -> (String, Instant) {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {what} within {STEP_TIMEOUT:?}; received: {:#?}",
                self.seen
            );
            self.socket.set_read_timeout(Some(left)).unwrap();
            let mut buffer = [0u8; 4096];
            let length = match self.socket.recv(&mut buffer) {
                Ok(length) => length,
                Err(error)
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(error) => panic!("receiving on the notify socket: {error}"),
            };
            let now = Instant::now();
            let text = String::from_utf8(buffer[..length].to_vec()).expect("UTF-8 datagram");
            self.seen.push((now, text.clone()));
            if let Some(line) = text.lines().find(|line| wanted(line)) {
                return (line.to_owned(), now);
            }
        }
    }

    fn lines_seen(&self) -> impl Iterator<Item = &str> {
        self.seen.iter().flat_map(|(_, text)| text.lines())
    }
}

fn sigterm(serve: &Serve) {
    let pid = i32::try_from(serve.child.id()).expect("a pid fits i32");
    // SAFETY: kill only sends a signal to our own child, which has not been reaped.
    let result = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(result, 0, "SIGTERM sent");
}

/// Six partitions on disk, two shards, a slow recovery (debug-build fault point): the
/// broker shows progress, says READY=1 only once its port answers, pings the watchdog at
/// half WATCHDOG_USEC, and says STOPPING=1 on SIGTERM before it exits cleanly.
#[test]
fn readiness_after_recovery_watchdog_while_serving_stopping_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    {
        let mut broker = Serve::start(&data_dir, "127.0.0.1:0", &["--cores", "2"]);
        let address = broker.wait_serving();
        let mut client = RawClient::connect(address);
        client.create_topic("orders", 4);
        client.create_topic("events", 2);
        drop(client);
        sigterm(&broker);
        let (status, stderr) = broker.wait_exit();
        assert!(status.success(), "{status:?}: {stderr}");
    }

    let mut manager = Manager::bind(dir.path());
    let notify_socket = manager.path.clone();
    let mut broker = Serve::start_with_env(
        &data_dir,
        "127.0.0.1:0",
        &["--cores", "2"],
        &[
            ("NOTIFY_SOCKET", notify_socket.as_str()),
            // 400 ms: pings every 200 ms.
            ("WATCHDOG_USEC", "400000"),
            ("SHARDQ_TEST_RECOVERY_DELAY_MS", "1500"),
        ],
    );
    // The total comes from the catalog once the data directory is open; the shards are
    // held 1.5 s before they recover, so the progress is shown at least once meanwhile.
    manager.wait_for("a recovery STATUS with the total", |line| {
        line.starts_with("STATUS=recovering partitions: ") && line.ends_with(" of 6")
    });
    let (serving, _) = manager.wait_for("READY=1", |line| line == "READY=1");
    assert_eq!(serving, "READY=1");
    let before_ready: Vec<&str> = manager.lines_seen().collect();
    assert!(
        !before_ready.contains(&"WATCHDOG=1"),
        "no watchdog ping before READY=1: {before_ready:?}"
    );
    // READY=1 comes with the serving status, which names the address.
    let status = manager
        .seen
        .last()
        .expect("the READY datagram")
        .1
        .lines()
        .find_map(|line| line.strip_prefix("STATUS=serving on "))
        .expect("a serving STATUS with READY=1")
        .to_owned();
    assert!(
        status.contains("with 2 shards; 6 partitions recovered"),
        "{status}"
    );
    let address: SocketAddr = status
        .split(' ')
        .next()
        .expect("an address")
        .parse()
        .expect("a socket address");
    // Ready means answering, not just bound.
    metadata_round_trip(address).expect("the broker answers once it said READY=1");

    let (_, first) = manager.wait_for("a WATCHDOG=1", |line| line == "WATCHDOG=1");
    let (_, second) = manager.wait_for("a second WATCHDOG=1", |line| line == "WATCHDOG=1");
    assert!(
        second.duration_since(first) < Duration::from_millis(400),
        "pings come at half the watchdog interval, not slower: {:?}",
        second.duration_since(first)
    );

    sigterm(&broker);
    manager.wait_for("STOPPING=1", |line| line == "STOPPING=1");
    let (status, stderr) = broker.wait_exit();
    assert!(status.success(), "{status:?}: {stderr}");
}

/// A shard whose loop is blocked for 3 s (debug-build fault point) stops the watchdog
/// pings for as long as it is stuck, the broker says which shard, and the pings resume
/// once it turns again.
#[test]
fn a_stalled_shard_withholds_the_watchdog_pings() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut manager = Manager::bind(dir.path());
    let notify_socket = manager.path.clone();
    let broker = Serve::start_with_env(
        &data_dir,
        "127.0.0.1:0",
        &["--cores", "2"],
        &[
            ("NOTIFY_SOCKET", notify_socket.as_str()),
            ("WATCHDOG_USEC", "400000"),
            // Shard 1 blocks its thread 1 s after it starts serving, for 3 s.
            ("SHARDQ_TEST_STALL_SHARD", "1:1000:3000"),
        ],
    );
    manager.wait_for("READY=1", |line| line == "READY=1");
    manager.wait_for("a WATCHDOG=1", |line| line == "WATCHDOG=1");
    let (stalled, _) = manager.wait_for("the stall STATUS", |line| {
        line.starts_with("STATUS=shards ") && line.contains("not answering")
    });
    assert_eq!(
        stalled,
        "STATUS=shards [1] not answering; watchdog pings withheld"
    );
    let (_, resumed) =
        manager.wait_for("a WATCHDOG=1 after the stall", |line| line == "WATCHDOG=1");
    // The last ping before the stall report, and the gap it leaves.
    let stall_index = manager
        .seen
        .iter()
        .position(|(_, text)| text.contains("not answering"))
        .expect("seen");
    let last_before = manager.seen[..stall_index]
        .iter()
        .rev()
        .find(|(_, text)| text.lines().any(|line| line == "WATCHDOG=1"))
        .expect("a ping before the stall")
        .0;
    let gap = resumed.duration_since(last_before);
    assert!(
        gap >= Duration::from_millis(2000),
        "no ping while shard 1 was stuck for 3 s (pings are 200 ms apart otherwise), but the gap was {gap:?}: {:#?}",
        manager.seen
    );
    // The ping that resumes brings the serving status back.
    let resumed_text = &manager.seen.last().expect("the resuming datagram").1;
    assert!(
        resumed_text.contains("STATUS=serving on "),
        "{resumed_text}"
    );
    drop(broker);
}

/// `tuning/systemd/shardq.service`, with this build's binary in ExecStart, passes
/// `systemd-analyze verify` and keeps its measured exposure (docs/operations.md).
#[test]
fn the_unit_passes_systemd_analyze_verify_and_security() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("skipped: systemd-analyze is not on PATH");
        return;
    }
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning/systemd/shardq.service"),
    )
    .expect("the unit file");
    assert!(unit.contains("ExecStart=/usr/local/bin/shardq serve "));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shardq.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/shardq", env!("CARGO_BIN_EXE_shardq")),
    )
    .unwrap();

    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze runs");
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success(), "verify failed: {stderr}");
    // verify reports unknown keys and bad values as warnings and still succeeds.
    assert!(
        stderr.trim().is_empty(),
        "verify printed warnings: {stderr}"
    );

    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(&path)
        .output()
        .expect("systemd-analyze runs");
    let stdout = String::from_utf8_lossy(&security.stdout);
    let exposure: f64 = stdout
        .lines()
        .find_map(|line| {
            line.split("Overall exposure level for shardq.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split(' ').next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {stdout}"));
    // 1.5 measured with systemd 252 (docs/operations.md, "systemd").
    assert!(
        exposure <= 1.5,
        "the unit's exposure rose to {exposure} (was 1.5): {stdout}"
    );
}
