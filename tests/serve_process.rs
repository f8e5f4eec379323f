//! `shardq serve` as an operator and a supervisor meet it: a second broker on the same
//! data directory, a restart right after `kill -9`, a shard that panics.

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Instant;

use common::process::{metadata_round_trip, Serve, STEP_TIMEOUT};
use common::{batch_of, RawClient};
use shardq::protocol::Request;

/// A port P with P, P+1 and P+2 free right now (the shared port and two shard ports).
fn free_port_triple() -> u16 {
    for _ in 0..100 {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        if port > 65_000 {
            continue;
        }
        let others: Vec<_> = (1..=2)
            .map(|step| TcpListener::bind(("127.0.0.1", port + step)))
            .collect();
        if others.iter().all(Result::is_ok) {
            return port;
        }
    }
    panic!("no three consecutive free ports found")
}

/// A reuse-port listener on a port of the kernel's choosing whose two next ports are
/// free (a broker there listens on them too): taken at once rather than probed and bound
/// later, so no broker another test starts meanwhile on port 0 can be handed it.
fn taken_port_triple() -> (socket2::Socket, u16) {
    for _ in 0..100 {
        let holder = reuse_port_listener(0);
        let port = holder
            .local_addr()
            .unwrap()
            .as_socket()
            .expect("an IP socket")
            .port();
        if port > 65_000 {
            continue;
        }
        let others: Vec<_> = (1..=2)
            .map(|step| TcpListener::bind(("127.0.0.1", port + step)))
            .collect();
        if others.iter().all(Result::is_ok) {
            return (holder, port);
        }
    }
    panic!("no three consecutive free ports found")
}

/// A listening socket with SO_REUSEPORT on 127.0.0.1:`port`, as a lingering socket of a
/// killed broker (or another broker) would hold it.
fn reuse_port_listener(port: u16) -> socket2::Socket {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_reuse_port(true).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], port)).into())
        .unwrap();
    socket.listen(16).unwrap();
    socket
}

#[test]
fn second_broker_on_one_data_dir_exits_naming_the_dir_and_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut first = Serve::start(&data_dir, "127.0.0.1:0", &["--cores", "1"]);
    first.wait_serving();
    let mut second = Serve::start(&data_dir, "127.0.0.1:0", &["--cores", "1"]);
    let (status, stderr) = second.wait_exit();
    assert_eq!(status.code(), Some(1), "{status:?}: {stderr}");
    let canonical = std::fs::canonicalize(&data_dir).unwrap();
    assert!(
        stderr.contains(&canonical.display().to_string())
            && stderr.contains(&format!("pid {}", first.child.id())),
        "the refusal names the directory and the holder: {stderr}"
    );
    // The first broker is untouched and still answers.
    let address = first.address.expect("seen serving");
    metadata_round_trip(address).expect("the first broker still serves");
}

#[test]
fn restart_right_after_kill_9_serves_every_connection_and_keeps_acked_data() {
    // The ports are probed free, then bound by the broker: another process (a test
    // binding port 0 meanwhile) can take one in between, or while the killed broker's
    // sockets linger. That is not the broker's fault, and the test starts over on other
    // ports. A broker that cannot take back its own ports fails every attempt.
    const ATTEMPTS: usize = 4;
    let mut taken = Vec::new();
    for _ in 0..ATTEMPTS {
        match restart_after_kill_9_on_the_same_ports() {
            Ok(()) => return,
            Err(refusal) => taken.push(refusal),
        }
    }
    panic!(
        "no attempt in {ATTEMPTS} got its ports:\n{}",
        taken.join("\n---\n")
    );
}

/// The shard ports the "serving on" line names: "[P1, P2]".
fn shard_ports(broker: &Serve) -> String {
    let line = broker.seen.last().expect("the serving line");
    line.split("shard ports ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_else(|| panic!("no shard ports in {line:?}"))
        .to_owned()
}

/// Five cycles of durable produces, kill -9 and an immediate restart on the same
/// ports. `Err` with the broker's output when a start found a port taken.
fn restart_after_kill_9_on_the_same_ports() -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let port = free_port_triple();
    let listen = format!("127.0.0.1:{port}");
    let arguments = ["--cores", "2"];
    let start = |what: &str| {
        let mut broker = Serve::start(&data_dir, &listen, &arguments);
        match broker.wait_serving_or_exit() {
            Ok(address) => Ok((broker, address)),
            Err((status, stderr)) if stderr.contains("cannot listen on") => {
                Err(format!("{what} on port {port}: {status}\n{stderr}"))
            }
            Err((status, stderr)) => panic!("{what}: serve exited ({status}):\n{stderr}"),
        }
    };
    let (mut broker, address) = start("first start")?;
    let ports = shard_ports(&broker);
    assert_eq!(ports, format!("[{}, {}]", port + 1, port + 2));
    let mut client = RawClient::connect(address);
    client.create_topic("orders", 2);
    let mut acked = 0u64;
    for cycle in 0..5u64 {
        // Acknowledged durable, then the broker is killed and started again at once,
        // the way a supervisor with a short restart delay does.
        for record in 0..10u64 {
            let value = format!("cycle {cycle} record {record}");
            let offset = client
                .produce("orders", 0, batch_of(&[value.as_bytes()]))
                .expect("durable produce");
            assert_eq!(offset, acked, "offsets stay dense across restarts");
            acked += 1;
        }
        drop(client);
        broker.kill9();
        let restarted;
        (broker, restarted) = start(&format!("restart {cycle}"))?;
        assert_eq!(restarted, address, "back on the same shared port");
        assert_eq!(shard_ports(&broker), ports, "back on the same shard ports");
        // No stale socket of the dead broker may be handed connections: every new
        // connection on the shared port is answered.
        for attempt in 0..32 {
            metadata_round_trip(address)
                .unwrap_or_else(|error| panic!("cycle {cycle}, connection {attempt}: {error}"));
        }
        client = RawClient::connect(address);
        let values = client.fetch_all("orders", 0, 0);
        assert_eq!(
            values.len() as u64,
            acked,
            "cycle {cycle}: every acked record kept"
        );
    }
    Ok(())
}

#[test]
fn a_port_that_stays_taken_fails_start_up_after_the_retry_bound() {
    let dir = tempfile::tempdir().unwrap();
    // Another process's reuse-port listener on the shared port (say, a second broker
    // on another data directory): joining its group would split connections with it.
    // Held, not used: the port stays taken for the whole test.
    let (_holder, port) = taken_port_triple();
    let mut broker = Serve::start(
        &dir.path().join("data"),
        &format!("127.0.0.1:{port}"),
        &["--cores", "1", "--bind-retry-ms", "300"],
    );
    let (status, stderr) = broker.wait_exit();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is in use")
            && stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "a log line while retrying, then the refusal: {stderr}"
    );
}

#[test]
fn start_up_waits_for_a_lingering_listener_to_go() {
    let dir = tempfile::tempdir().unwrap();
    let (holder, port) = taken_port_triple();
    let mut broker = Serve::start(
        &dir.path().join("data"),
        &format!("127.0.0.1:{port}"),
        &["--cores", "1", "--bind-retry-ms", "20000"],
    );
    // Let go of the port only once the broker has said it is waiting for it.
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = broker.lines.recv_timeout(left).expect("a retry line");
        if line.contains("is in use") {
            break;
        }
    }
    drop(holder);
    let address = broker.wait_serving();
    for attempt in 0..32 {
        metadata_round_trip(address)
            .unwrap_or_else(|error| panic!("connection {attempt}: {error}"));
    }
}

#[cfg(debug_assertions)]
#[test]
fn a_shard_panic_ends_the_process_with_status_70() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Serve::start_with_env(
        &dir.path().join("data"),
        "127.0.0.1:0",
        &["--cores", "2"],
        &[("SHARDQ_TEST_PANIC_ON_TOPIC", "boom")],
    );
    let address = broker.wait_serving();
    let mut client = RawClient::connect(address);
    client.create_topic("fine", 2);
    // No answer is expected: the process goes away with the request in flight.
    client.send(&Request::CreateTopic(
        shardq::protocol::CreateTopicRequest {
            name: "boom".into(),
            partitions: 2,
            retention: Default::default(),
            queue: Default::default(),
        },
    ));
    let (status, stderr) = broker.wait_exit();
    assert_eq!(
        status.code(),
        Some(shardq::server::EXIT_SHARD_PANIC),
        "{status:?}: {stderr}"
    );
    assert!(stderr.contains("test fault"), "{stderr}");
}

#[cfg(debug_assertions)]
#[test]
fn start_up_fails_instead_of_hanging_when_a_shard_never_joins() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Serve::start_with_env(
        &dir.path().join("data"),
        "127.0.0.1:0",
        &["--cores", "2"],
        &[("SHARDQ_TEST_SHARD_DIES_AT_START", "1")],
    );
    // Shard 0 waits in the mesh for a sibling that never comes; start-up must give up
    // and say why rather than wait forever (wait_exit fails the test after its bound).
    let (status, stderr) = broker.wait_exit();
    assert_eq!(status.code(), Some(1), "{status:?}: {stderr}");
    assert!(
        stderr.contains("shard 1 failed to start") && stderr.contains("ended before it was ready"),
        "{stderr}"
    );
}

#[test]
fn everything_the_broker_creates_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut broker = Serve::start(&data_dir, "127.0.0.1:0", &["--cores", "2"]);
    let address = broker.wait_serving();
    let mut client = RawClient::connect(address);
    client.create_topic("private", 2);
    client
        .produce("private", 1, batch_of(&[b"secret"]))
        .expect("produced");
    let mut checked = 0;
    let mut stack = vec![data_dir.clone()];
    while let Some(path) = stack.pop() {
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        if path.is_dir() {
            assert_eq!(mode, 0o700, "{}", path.display());
            stack.extend(
                std::fs::read_dir(&path)
                    .unwrap()
                    .map(|entry| entry.unwrap().path()),
            );
        } else {
            assert_eq!(mode, 0o600, "{}", path.display());
        }
        checked += 1;
    }
    assert!(
        checked > 10,
        "segments, indexes, metadata and broker files were checked"
    );
}

/// The connection limits `serve` sets reach the broker: `--connections-max 1` refuses a
/// second connection until the first has gone, and a budget the broker cannot work with
/// (`--shard-bytes-in-flight-max` below a connection's) is refused before it starts.
#[test]
fn serve_sets_the_connection_limits_and_refuses_impossible_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut refused = Serve::start(
        &dir.path().join("refused"),
        "127.0.0.1:0",
        &["--cores", "1", "--shard-bytes-in-flight-max", "1024"],
    );
    let (status, stderr) = refused.wait_exit();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "shard_bytes_in_flight_max = 1024 is not allowed: must be at least 33554432 (connection_bytes_in_flight_max)"
        ),
        "{stderr}"
    );

    let mut broker = Serve::start(
        &dir.path().join("data"),
        "127.0.0.1:0",
        &["--cores", "1", "--connections-max", "1"],
    );
    let address = broker.wait_serving();
    let first = TcpStream::connect(address).unwrap();
    metadata_round_trip(address).expect_err("a second connection is over --connections-max 1");
    drop(first);
    // The slot comes back once the broker has seen the first one go: bounded retry.
    let deadline = Instant::now() + STEP_TIMEOUT;
    while metadata_round_trip(address).is_err() {
        assert!(Instant::now() < deadline, "the slot never came back");
    }
    broker.child.kill().unwrap();
    let _ = broker.child.wait();
}
