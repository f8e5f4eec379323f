//! The `shardq` binary as a user runs it: client subcommands against an in-process broker
//! (2 shards), and `serve` as a child process stopped by SIGTERM.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::TestBroker;
use shardq::placement::{partition_for_key, shard_for};

/// Longest any one command may run before the test kills it and fails.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Output {
    fn assert_success(&self, what: &str) {
        assert!(
            self.status.success(),
            "{what}: {:?}\nstdout: {}\nstderr: {}",
            self.status,
            self.stdout,
            self.stderr
        );
    }
}

/// Kills `child` (by its own pid) unless it exits first.
fn kill(child_id: u32) {
    // SAFETY: kill(2) takes any pid and signal; the pid is our own child's.
    unsafe {
        libc::kill(child_id as libc::pid_t, libc::SIGKILL);
    }
}

/// Runs the binary with `arguments` and `stdin`, bounded by [`COMMAND_TIMEOUT`].
fn shardq(arguments: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardq"))
        .args(arguments)
        .env_remove("SHARDQ_SERVER")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the shardq binary starts");
    let mut input = child.stdin.take().expect("piped stdin");
    input
        .write_all(stdin.as_bytes())
        .expect("write the command's input");
    drop(input);
    let id = child.id();
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(child.wait_with_output());
    });
    let output = match receiver.recv_timeout(COMMAND_TIMEOUT) {
        Ok(output) => output.expect("wait for the command"),
        Err(_) => {
            kill(id);
            panic!("shardq {arguments:?} ran past {COMMAND_TIMEOUT:?}");
        }
    };
    Output {
        status: output.status,
        stdout: String::from_utf8(output.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(output.stderr).expect("utf-8 stderr"),
    }
}

fn with_server<'a>(address: &'a str, arguments: &[&'a str]) -> Vec<&'a str> {
    let mut all = arguments.to_vec();
    all.extend(["--server", address]);
    all
}

#[test]
fn topic_produce_consume_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let address = broker.addr().to_string();
    let run = |arguments: &[&str], stdin: &str| shardq(&with_server(&address, arguments), stdin);

    let created = run(&["topic", "create", "orders", "--partitions", "4"], "");
    created.assert_success("topic create");
    assert_eq!(created.stdout, "");

    let produced = run(&["produce", "orders", "--key", "customer-7"], "a\nb\nc\n");
    produced.assert_success("produce");
    assert_eq!(produced.stdout, "", "produce prints nothing");
    assert!(
        !produced.stderr.contains("--acks none"),
        "{}",
        produced.stderr
    );

    let consumed = run(
        &["consume", "orders", "--from-beginning", "--count", "3"],
        "",
    );
    consumed.assert_success("consume");
    assert_eq!(consumed.stdout, "a\nb\nc\n");

    let consumed = run(
        &[
            "consume",
            "orders",
            "--from-beginning",
            "--count",
            "3",
            "--json",
        ],
        "",
    );
    consumed.assert_success("consume --json");

    // --acks none: the CLI says failures cannot be reported (its own topic, so the
    // consumes around it are unaffected).
    run(&["topic", "create", "unanswered", "--partitions", "1"], "")
        .assert_success("topic create unanswered");
    let unacknowledged = run(
        &["produce", "unanswered", "--acks", "none"],
        "unacknowledged\n",
    );
    unacknowledged.assert_success("produce --acks none");
    assert!(
        unacknowledged.stderr.contains("warning: --acks none"),
        "the CLI warns that failures cannot be reported: {}",
        unacknowledged.stderr
    );

    // CRLF input: the "\r" is part of the line ending, not of the message; and
    // `--timeout-ms 0` still reads what is there.
    run(&["produce", "orders", "--partition", "0"], "crlf\r\n").assert_success("produce crlf");
    let crlf = run(
        &[
            "consume",
            "orders",
            "--partition",
            "0",
            "--from-beginning",
            "--timeout-ms",
            "0",
        ],
        "",
    );
    crlf.assert_success("consume --timeout-ms 0");
    assert!(
        crlf.stdout.lines().any(|line| line == "crlf"),
        "{:?}",
        crlf.stdout
    );
    let partition = partition_for_key(b"customer-7", 4);
    let lines: Vec<serde_json::Value> = consumed
        .stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("each line is one JSON object"))
        .collect();
    assert_eq!(lines.len(), 3, "{}", consumed.stdout);
    for (offset, (line, value)) in lines.iter().zip(["a", "b", "c"]).enumerate() {
        assert_eq!(line["partition"], partition, "{line}");
        assert_eq!(line["offset"], offset as u64, "{line}");
        assert_eq!(line["key"], "customer-7", "{line}");
        assert_eq!(line["value"], value, "{line}");
        assert!(line["timestamp_ms"].as_i64().is_some(), "{line}");
        assert_eq!(line["headers"], serde_json::json!({}), "{line}");
    }
}

#[test]
fn topic_list_describe_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let address = broker.addr().to_string();
    let run = |arguments: &[&str]| shardq(&with_server(&address, arguments), "");

    run(&["topic", "create", "orders", "--partitions", "4"]).assert_success("create orders");
    run(&["topic", "create", "audit"]).assert_success("create audit");

    let listed = run(&["topic", "list"]);
    listed.assert_success("topic list");
    assert_eq!(listed.stdout, "audit\tpartitions=1\norders\tpartitions=4\n");

    let listed = run(&["topic", "list", "--json"]);
    listed.assert_success("topic list --json");
    let listed: serde_json::Value = serde_json::from_str(&listed.stdout).unwrap();
    assert_eq!(
        listed,
        serde_json::json!({ "topics": [
            { "name": "audit", "partitions": 1 },
            { "name": "orders", "partitions": 4 },
        ] })
    );

    let described = run(&["topic", "describe", "orders", "--json"]);
    described.assert_success("topic describe --json");
    let described: serde_json::Value = serde_json::from_str(&described.stdout).unwrap();
    let shard_ports = &broker.handle.as_ref().unwrap().shard_ports;
    assert_eq!(described["name"], "orders");
    assert_eq!(described["shard_ports"], serde_json::json!(shard_ports));
    let partitions = described["partitions"]
        .as_array()
        .expect("a partition list");
    assert_eq!(partitions.len(), 4);
    for (index, partition) in partitions.iter().enumerate() {
        let shard = shard_for("orders", index as u32, 2);
        assert_eq!(
            *partition,
            serde_json::json!({
                "partition": index,
                "shard": shard,
                "port": shard_ports[usize::from(shard)],
            })
        );
    }

    let described = run(&["topic", "describe", "orders"]);
    described.assert_success("topic describe");
    assert!(
        described
            .stdout
            .starts_with("topic orders: 4 partitions, retention bytes none ms none\n"),
        "{}",
        described.stdout
    );
    assert_eq!(described.stdout.lines().count(), 5, "{}", described.stdout);

    let deleted = run(&["topic", "delete", "orders"]);
    deleted.assert_success("topic delete");
    assert_eq!(deleted.stdout, "");
    let listed = run(&["topic", "list"]);
    listed.assert_success("topic list after delete");
    assert_eq!(listed.stdout, "audit\tpartitions=1\n");
}

/// Exit status 1 and exactly one line on stderr naming the topic.
fn assert_failed_about(output: &Output, topic: &str) {
    assert_eq!(
        output.status.code(),
        Some(1),
        "stdout: {}\nstderr: {}",
        output.stdout,
        output.stderr
    );
    assert_eq!(output.stdout, "");
    assert_eq!(
        output.stderr.lines().count(),
        1,
        "one line on stderr: {:?}",
        output.stderr
    );
    assert!(output.stderr.ends_with('\n'));
    assert!(output.stderr.starts_with("shardq: "), "{}", output.stderr);
    assert!(output.stderr.contains(topic), "{}", output.stderr);
}

#[test]
fn unknown_topic_fails_with_status_1_and_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let address = broker.addr().to_string();
    let run = |arguments: &[&str], stdin: &str| shardq(&with_server(&address, arguments), stdin);

    assert_failed_about(&run(&["produce", "missing"], "x\n"), "missing");
    assert_failed_about(
        &run(
            &["consume", "missing", "--from-beginning", "--count", "1"],
            "",
        ),
        "missing",
    );
    assert_failed_about(&run(&["topic", "describe", "missing"], ""), "missing");
    assert_failed_about(&run(&["topic", "delete", "missing"], ""), "missing");
    run(&["topic", "create", "dup"], "").assert_success("create dup");
    assert_failed_about(&run(&["topic", "create", "dup"], ""), "dup");
}

#[test]
fn usage_errors_exit_with_status_2() {
    // Clap rejects these before any connection, so no broker is needed.
    for arguments in [
        &["produce", "t", "--acks", "bogus"][..],
        &["consume", "t", "--from-beginning", "--offset", "3"][..],
        &["topic", "create"][..],
    ] {
        let output = shardq(arguments, "");
        assert_eq!(
            output.status.code(),
            Some(2),
            "{arguments:?}: stderr {}",
            output.stderr
        );
        assert_eq!(output.stdout, "");
        assert!(!output.stderr.is_empty(), "{arguments:?} says why");
    }
}

#[test]
fn unreachable_broker_fails_with_status_1() {
    // A port that was just free: bind, read it, close.
    let address = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    };
    let output = shardq(&["topic", "list", "--server", &address], "");
    assert_eq!(output.status.code(), Some(1), "stderr {}", output.stderr);
    assert_eq!(output.stderr.lines().count(), 1, "{:?}", output.stderr);
    assert!(output.stderr.contains(&address), "{}", output.stderr);
}

/// Reads `serve`'s stderr until its "serving on ADDR with" line; the rest of stderr is
/// drained in the background so the child never blocks on a full pipe.
fn wait_for_serving(child: &mut Child) -> SocketAddr {
    let stderr = child.stderr.take().expect("piped stderr");
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = sender.send(line);
        }
    });
    let mut seen = Vec::new();
    loop {
        let line = match receiver.recv_timeout(COMMAND_TIMEOUT) {
            Ok(line) => line,
            Err(error) => {
                kill(child.id());
                panic!("serve did not say where it listens ({error}); stderr so far: {seen:?}");
            }
        };
        if let Some(rest) = line.strip_prefix("shardq: serving on ") {
            let address = rest
                .split(' ')
                .next()
                .expect("an address after 'serving on'");
            return address
                .parse()
                .unwrap_or_else(|error| panic!("{address:?} in {line:?}: {error}"));
        }
        seen.push(line);
    }
}

#[test]
fn serve_runs_until_sigterm_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardq"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--cores",
            "1",
            "--data-dir",
        ])
        .arg(&data_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("shardq serve starts");
    let address = wait_for_serving(&mut child);
    assert_ne!(address.port(), 0, "the bound port, not the asked-for 0");
    let address = address.to_string();
    let run = |arguments: &[&str], stdin: &str| shardq(&with_server(&address, arguments), stdin);

    run(&["topic", "create", "events"], "").assert_success("topic create");
    run(&["produce", "events"], "hello\nworld\n").assert_success("produce");
    let consumed = run(
        &["consume", "events", "--from-beginning", "--count", "2"],
        "",
    );
    consumed.assert_success("consume");
    assert_eq!(consumed.stdout, "hello\nworld\n");

    // SAFETY: kill(2) with our own child's pid.
    let sent = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(sent, 0, "SIGTERM delivered");
    let id = child.id();
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(child.wait());
    });
    let status = match receiver.recv_timeout(COMMAND_TIMEOUT) {
        Ok(status) => status.expect("wait for serve"),
        Err(_) => {
            kill(id);
            panic!("serve did not stop within {COMMAND_TIMEOUT:?} of SIGTERM");
        }
    };
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn retention_flags_alter_and_consume_from_time() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 1);
    let address = broker.addr().to_string();
    let run = |arguments: &[&str], stdin: &str| shardq(&with_server(&address, arguments), stdin);

    run(
        &[
            "topic",
            "create",
            "kept",
            "--partitions",
            "1",
            "--retention-bytes",
            "1048576",
        ],
        "",
    )
    .assert_success("topic create with retention");
    let described = run(&["topic", "describe", "kept", "--json"], "");
    described.assert_success("describe");
    let json: serde_json::Value = serde_json::from_str(described.stdout.trim()).unwrap();
    assert_eq!(json["retention_bytes"], 1_048_576);
    assert_eq!(json["retention_ms"], 0);
    run(&["topic", "alter", "kept", "--retention-ms", "60000"], "").assert_success("alter");
    let described = run(&["topic", "describe", "kept"], "");
    assert!(
        described.stdout.contains("retention bytes none ms 60000"),
        "{}",
        described.stdout
    );

    // The CLI stamps records with the time of sending: everything produced after `middle`
    // is found from it, nothing before.
    run(&["produce", "kept"], "early\n").assert_success("produce early");
    let middle = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        + 1;
    // Wait out the millisecond so "late" is stamped strictly after `middle - 1`.
    while (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64)
        < middle
    {
        std::hint::spin_loop();
    }
    run(&["produce", "kept"], "late\n").assert_success("produce late");
    let from = middle.to_string();
    let consumed = run(
        &["consume", "kept", "--from-time", &from, "--timeout-ms", "0"],
        "",
    );
    consumed.assert_success("consume --from-time");
    assert_eq!(consumed.stdout, "late\n");
    let all = run(
        &[
            "consume",
            "kept",
            "--from-time",
            "1970-01-01T00:00:00Z",
            "--timeout-ms",
            "0",
        ],
        "",
    );
    assert_eq!(all.stdout, "early\nlate\n");
    let bad = run(&["consume", "kept", "--from-time", "yesterday"], "");
    assert_eq!(bad.status.code(), Some(2), "a bad time is a usage error");
}
