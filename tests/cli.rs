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
    // Split on '\n' alone: `lines()` would strip a '\r' the CLI wrongly kept.
    assert!(
        crlf.stdout.split('\n').any(|line| line == "crlf"),
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
                "log_start_offset": 0,
                "log_end_offset": 0,
                "high_watermark": 0,
                "bytes": 0,
                "segments": 1,
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
    // The header, the queue settings, one line per partition.
    assert_eq!(described.stdout.lines().count(), 6, "{}", described.stdout);
    assert!(
        described
            .stdout
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("queue: max deliveries "),
        "{}",
        described.stdout
    );
    assert!(
        described.stdout.contains(", dlq orders.dlq\n"),
        "{}",
        described.stdout
    );

    let deleted = run(&["topic", "delete", "orders"]);
    deleted.assert_success("topic delete");
    assert_eq!(deleted.stdout, "");
    let listed = run(&["topic", "list"]);
    listed.assert_success("topic list after delete");
    assert_eq!(listed.stdout, "audit\tpartitions=1\n");
}

#[test]
fn stats_reports_rates_offsets_and_groups_and_topic_describe_shows_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let address = broker.addr().to_string();
    let run = |arguments: &[&str], stdin: &str| shardq(&with_server(&address, arguments), stdin);

    run(&["topic", "create", "orders", "--partitions", "2"], "").assert_success("create");
    run(&["produce", "orders"], "a\nb\nc\n").assert_success("produce");
    let consumed = run(
        &[
            "consume",
            "orders",
            "--group",
            "readers",
            "--from-beginning",
            "--count",
            "3",
            "--timeout-ms",
            "5000",
        ],
        "",
    );
    consumed.assert_success("consume");
    assert_eq!(consumed.stdout.lines().count(), 3, "{}", consumed.stdout);

    let stats = run(
        &[
            "stats",
            "--json",
            "--interval-ms",
            "50",
            "--topic",
            "orders",
        ],
        "",
    );
    stats.assert_success("stats --json");
    assert_eq!(stats.stdout.lines().count(), 1, "{}", stats.stdout);
    let report: serde_json::Value = serde_json::from_str(&stats.stdout).unwrap();
    assert_eq!(report["shards"].as_array().unwrap().len(), 2, "{report}");
    let partitions = report["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 2, "{report}");
    let total = |key: &str| -> u64 { partitions.iter().map(|p| p[key].as_u64().unwrap()).sum() };
    assert_eq!(total("records_in_total"), 3);
    assert_eq!(total("records_out_total"), 3);
    assert_eq!(total("log_end_offset"), 3);
    assert_eq!(total("high_watermark"), 3);
    assert_eq!(total("durable_lag"), 0);
    assert!(report["interval_ms"].as_u64().unwrap() >= 50, "{report}");
    let groups = report["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "{report}");
    assert_eq!(groups[0]["name"], "readers");
    assert_eq!(groups[0]["kind"], "stream");
    assert_eq!(groups[0]["lag"], 0);

    let watched = run(
        &[
            "stats",
            "--watch",
            "--count",
            "2",
            "--json",
            "--interval-ms",
            "20",
        ],
        "",
    );
    watched.assert_success("stats --watch --count 2");
    assert_eq!(watched.stdout.lines().count(), 2, "{}", watched.stdout);

    let text = run(&["stats", "--interval-ms", "20"], "");
    text.assert_success("stats");
    assert!(text.stdout.contains("\norders\t0\t"), "{}", text.stdout);
    assert!(
        text.stdout.contains("\norders\treaders\tstream\t2\t0\t0\n"),
        "{}",
        text.stdout
    );

    let described = run(&["topic", "describe", "orders"], "");
    described.assert_success("topic describe");
    let ends: u64 = described
        .stdout
        .lines()
        .filter_map(|line| line.split("\tend ").nth(1))
        .map(|rest| rest.split('\t').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(ends, 3, "{}", described.stdout);

    assert_failed_about(&run(&["stats", "--topic", "nosuch"], ""), "nosuch");
    let usage = run(&["stats", "--count", "2"], "");
    assert_eq!(
        usage.status.code(),
        Some(2),
        "--count needs --watch: {}",
        usage.stderr
    );
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
        // Anywhere in the line: log lines start with a timestamp and a level.
        if let Some((_, rest)) = line.split_once("serving on ") {
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
            "--metrics-listen",
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

#[test]
fn consume_with_a_group_resumes_and_commits_what_it_printed() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let address = broker.addr().to_string();
    let run = |arguments: &[&str], stdin: &str| shardq(&with_server(&address, arguments), stdin);
    run(&["topic", "create", "log", "--partitions", "1"], "").assert_success("create");
    run(&["produce", "log"], "a\nb\nc\n").assert_success("produce");
    let first = run(
        &[
            "consume",
            "log",
            "--group",
            "g",
            "--from-beginning",
            "--count",
            "2",
        ],
        "",
    );
    first.assert_success("consume --group");
    assert_eq!(first.stdout, "a\nb\n");
    // Resumes after what was printed (c was fetched but not printed, so not committed).
    let second = run(&["consume", "log", "--group", "g", "--timeout-ms", "0"], "");
    second.assert_success("consume --group again");
    assert_eq!(second.stdout, "c\n");
    let third = run(&["consume", "log", "--group", "g", "--timeout-ms", "0"], "");
    assert_eq!(third.stdout, "", "everything is committed");
    // --no-commit reads from the group's position and leaves it where it was.
    for _ in 0..2 {
        let peek = run(
            &[
                "consume",
                "log",
                "--group",
                "h",
                "--no-commit",
                "--from-beginning",
                "--timeout-ms",
                "0",
            ],
            "",
        );
        peek.assert_success("consume --no-commit");
        assert_eq!(peek.stdout, "a\nb\nc\n");
    }
}

/// Dead-letter records as the broker writes them (docs/queues.md §3).
fn dead_letter_headers(
    source_partition: u32,
    source_offset: u64,
    reason: &str,
) -> Vec<(String, bytes::Bytes)> {
    use bytes::Bytes;
    use shardq::protocol::queue::headers;
    vec![
        (headers::SOURCE_TOPIC.into(), Bytes::from_static(b"orders")),
        (
            headers::SOURCE_PARTITION.into(),
            Bytes::copy_from_slice(&source_partition.to_le_bytes()),
        ),
        (
            headers::SOURCE_OFFSET.into(),
            Bytes::copy_from_slice(&source_offset.to_le_bytes()),
        ),
        (
            headers::ATTEMPTS.into(),
            Bytes::copy_from_slice(&3u32.to_le_bytes()),
        ),
        (
            headers::DEAD_LETTER_CAUSE.into(),
            Bytes::from_static(b"nacked"),
        ),
        (
            headers::REASON.into(),
            Bytes::copy_from_slice(reason.as_bytes()),
        ),
        (
            headers::DEAD_LETTERED_AT_MS.into(),
            Bytes::copy_from_slice(&1_700_000_000_000u64.to_le_bytes()),
        ),
        ("trace".into(), Bytes::from_static(b"t-1")),
    ]
}

#[test]
fn dlq_list_peek_redrive_resumes_and_purge() {
    use shardq::client::{Client, Producer, ProducerConfig, ProducerRecord};
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), 2);
    let address = broker.addr().to_string();
    let run = |arguments: &[&str], stdin: &str| shardq(&with_server(&address, arguments), stdin);
    run(&["topic", "create", "orders", "--partitions", "2"], "").assert_success("create");
    // Nothing dead-lettered yet: no DLQ topic, nothing to list.
    let empty = run(&["dlq", "list", "orders", "--json"], "");
    empty.assert_success("dlq list without a DLQ");
    let json: serde_json::Value = serde_json::from_str(empty.stdout.trim()).unwrap();
    assert_eq!(
        (json["dlq"].as_str(), json["count"].as_u64()),
        (Some("orders.dlq"), Some(0))
    );
    run(&["topic", "create", "orders.dlq", "--partitions", "2"], "").assert_success("create dlq");
    // Three dead-letter records: two from source partition 0, one from partition 1, each
    // in the DLQ partition of its source (as the broker places them).
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = Client::connect(broker.addr()).await.unwrap();
        let producer = Producer::new(client, ProducerConfig::default()).unwrap();
        for (partition, offset, value) in [(0u32, 4u64, "first"), (0, 9, "second"), (1, 2, "third")]
        {
            let mut record = ProducerRecord::new(value)
                .with_key(format!("key-{value}"))
                .with_partition(partition);
            record.headers = dead_letter_headers(partition, offset, "db down");
            producer.send("orders.dlq", record).await.unwrap();
        }
        producer.close().await.unwrap();
    });

    let listed = run(&["dlq", "list", "orders"], "");
    listed.assert_success("dlq list");
    assert_eq!(
        listed.stdout,
        "dead-letter topic orders.dlq: 3 record(s)\npartition 0\tstart 0\tend 2\tcount 2\npartition 1\tstart 0\tend 1\tcount 1\n"
    );
    let peeked = run(&["dlq", "peek", "orders", "--max", "2"], "");
    peeked.assert_success("dlq peek");
    let lines: Vec<serde_json::Value> = peeked
        .stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["value"], "first");
    assert_eq!(lines[1]["offset"], 1);
    let headers = &lines[1]["headers"];
    assert_eq!(headers["shardq-source-partition"], 0);
    assert_eq!(headers["shardq-source-offset"], 9);
    assert_eq!(headers["shardq-attempts"], 3);
    assert_eq!(headers["shardq-dead-lettered-at-ms"], 1_700_000_000_000u64);
    assert_eq!(headers["shardq-reason"], "db down");
    assert_eq!(headers["shardq-source-topic"], "orders");

    // An earlier redrive that stopped after DLQ partition 0's first record: this one
    // resumes after it.
    runtime.block_on(async {
        let client = Client::connect(broker.addr()).await.unwrap();
        client
            .commit_offsets("shardq-redrive", "orders.dlq", &[(0, 1)])
            .await
            .unwrap();
    });
    let redriven = run(&["dlq", "redrive", "orders"], "");
    redriven.assert_success("dlq redrive");
    assert_eq!(redriven.stdout, "2\n");
    let again = run(&["dlq", "redrive", "orders"], "");
    again.assert_success("dlq redrive again");
    assert_eq!(
        again.stdout, "0\n",
        "a finished redrive sends nothing twice"
    );
    let consumed = run(
        &[
            "consume",
            "orders",
            "--from-beginning",
            "--json",
            "--timeout-ms",
            "0",
        ],
        "",
    );
    consumed.assert_success("consume the redriven records");
    let records: Vec<serde_json::Value> = consumed
        .stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let summary: Vec<(u64, String, String)> = records
        .iter()
        .map(|record| {
            (
                record["partition"].as_u64().unwrap(),
                record["key"].as_str().unwrap().to_owned(),
                record["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (0, "key-second".into(), "second".into()),
            (1, "key-third".into(), "third".into())
        ]
    );
    for record in &records {
        let headers = record["headers"].as_object().unwrap();
        assert_eq!(
            headers.len(),
            1,
            "only the application's header is kept: {headers:?}"
        );
        assert_eq!(headers["trace"], "t-1");
    }

    let purged = run(&["dlq", "purge", "orders"], "");
    purged.assert_success("dlq purge");
    assert_eq!(purged.stdout, "3\n");
    let listed = run(&["dlq", "list", "orders", "--json"], "");
    let json: serde_json::Value = serde_json::from_str(listed.stdout.trim()).unwrap();
    assert_eq!(json["count"], 0);
    let missing = run(&["dlq", "list", "nowhere"], "");
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        missing.stderr.contains("\"nowhere\" does not exist"),
        "{}",
        missing.stderr
    );
}
