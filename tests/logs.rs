//! `shardq serve`'s log lines as an operator (or journald, or a JSON log shipper) reads
//! them from the real binary's stderr: formats, levels, the journald convention, and the
//! notable events (recovery, topic changes, rate-limited protocol errors).
mod common;

use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use common::process::{Serve, STEP_TIMEOUT};
use common::*;
use shardq::protocol::{DeleteTopicRequest, Request, PROTOCOL_VERSION};

/// `2026-01-02T03:04:05.678901Z`: RFC 3339, UTC, microseconds.
fn is_timestamp(text: &str) -> bool {
    let bytes = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| bytes[range].iter().all(u8::is_ascii_digit);
    bytes.len() == 27
        && digits(0..4)
        && bytes[4] == b'-'
        && digits(5..7)
        && bytes[7] == b'-'
        && digits(8..10)
        && bytes[10] == b'T'
        && digits(11..13)
        && bytes[13] == b':'
        && digits(14..16)
        && bytes[16] == b':'
        && digits(17..19)
        && bytes[19] == b'.'
        && digits(20..26)
        && bytes[26] == b'Z'
}

/// The level of a text line `TIMESTAMP  LEVEL target: message`, if it is one.
fn text_level(line: &str) -> Option<&str> {
    let (timestamp, rest) = line.split_once(' ')?;
    if !is_timestamp(timestamp) {
        return None;
    }
    let level = rest.trim_start().split(' ').next()?;
    ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"]
        .contains(&level)
        .then_some(level)
}

/// The priority and level of a journald line `<N> LEVEL target: message` (no timestamp).
fn journald_level(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix('<')?;
    let (priority, rest) = rest.split_once('>')?;
    let level = rest.trim_start().split(' ').next()?;
    Some((priority, level))
}

/// Lines up to and including the "serving on" one; sets the broker's addresses.
fn lines_until_serving(serve: &mut Serve) -> Vec<String> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = serve.lines.recv_timeout(left) else {
            panic!(
                "no 'serving on' within {STEP_TIMEOUT:?} (exit: {:?}); stderr:\n{}",
                serve.child.try_wait(),
                seen.join("\n")
            );
        };
        let serving = line.split_once("serving on ").map(|(_, rest)| {
            rest.split(' ')
                .next()
                .expect("an address")
                .trim_end_matches(['"', ','])
                .parse()
                .expect("a socket address")
        });
        seen.push(line);
        if let Some(address) = serving {
            serve.address = Some(address);
            return seen;
        }
    }
}

/// Lines until one satisfies `wanted` (returned last); panics after `STEP_TIMEOUT`.
fn lines_until(serve: &mut Serve, wanted: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = serve.lines.recv_timeout(left) else {
            panic!(
                "no such line within {STEP_TIMEOUT:?}; seen:\n{}",
                seen.join("\n")
            );
        };
        let done = wanted(&line);
        seen.push(line);
        if done {
            return seen;
        }
    }
}

fn terminate(serve: &mut Serve) -> String {
    // SAFETY: kill(2) on our own child's pid with SIGTERM, which the broker handles.
    unsafe { libc::kill(serve.child.id() as i32, libc::SIGTERM) };
    let (status, output) = serve.wait_exit();
    assert!(status.success(), "{status:?}: {output}");
    output
}

/// `shardq serve` with stderr on `stderr` (one end of a socket pair, as journald gives a
/// service), read through the other end.
fn serve_on_socket(
    data_dir: &Path,
    env: &[(&str, &str)],
    ours: UnixStream,
    theirs: UnixStream,
) -> Serve {
    let mut command = Command::new(env!("CARGO_BIN_EXE_shardq"));
    command
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args(["--cores", "1", "--data-dir"])
        .arg(data_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(OwnedFd::from(theirs)))
        .env_remove("JOURNAL_STREAM");
    for (key, value) in env {
        command.env(key, value);
    }
    let child = command.spawn().expect("shardq serve starts");
    // The child holds its copy; ours goes with `command`, so the reader sees end of
    // stream when the broker exits.
    drop(command);
    Serve::reading(child, ours)
}

#[test]
fn text_lines_start_with_a_utc_timestamp_and_a_level() {
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Serve::start(dir.path(), "127.0.0.1:0", &["--cores", "1"]);
    let mut lines = lines_until_serving(&mut serve);
    lines.extend(terminate(&mut serve).lines().map(str::to_owned));
    assert!(lines.len() >= 4, "{lines:#?}");
    for line in &lines {
        assert_eq!(text_level(line), Some("INFO"), "{line}");
    }
    let summary = lines
        .iter()
        .find(|line| line.contains("serving on "))
        .unwrap();
    for field in [
        "version=",
        "data_dir=",
        "shards=1",
        "cpus=[",
        "shard_ports=[",
        "metrics_address=",
    ] {
        assert!(summary.contains(field), "{field} in {summary}");
    }
    assert!(
        lines.iter().any(|line| line.contains("signal 15 received")),
        "{lines:#?}"
    );
}

#[test]
fn json_lines_all_parse_and_carry_timestamp_level_target_message_and_fields() {
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Serve::start(
        dir.path(),
        "127.0.0.1:0",
        &["--cores", "1", "--log-format", "json"],
    );
    let mut lines = lines_until_serving(&mut serve);
    let address = serve.address.unwrap();
    let mut client = RawClient::connect(address);
    client.create_topic("orders", 2);
    lines.extend(lines_until(&mut serve, |line| {
        line.contains("topic created")
    }));
    lines.extend(terminate(&mut serve).lines().map(str::to_owned));
    let events: Vec<serde_json::Value> = lines
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|error| panic!("{error}: {line}")))
        .collect();
    for event in &events {
        let text = |key: &str| {
            event[key]
                .as_str()
                .unwrap_or_else(|| panic!("{key} in {event}"))
        };
        assert!(is_timestamp(text("timestamp")), "{event}");
        assert_eq!(text("level"), "INFO", "{event}");
        assert!(text("target").starts_with("shardq"), "{event}");
        assert!(!text("message").is_empty(), "{event}");
    }
    let summary = events
        .iter()
        .find(|event| {
            event["message"]
                .as_str()
                .unwrap()
                .starts_with("serving on ")
        })
        .expect("the start-up summary");
    assert_eq!(
        summary["listen"].as_str(),
        Some(address.to_string().as_str())
    );
    assert_eq!(summary["shards"].as_u64(), Some(1));
    assert_eq!(summary["version"].as_str(), Some(env!("CARGO_PKG_VERSION")));
    assert!(summary["cpus"].is_string(), "{summary}");
    let created = events
        .iter()
        .find(|event| event["message"] == "topic created")
        .expect("the topic's line");
    assert_eq!(created["topic"].as_str(), Some("orders"), "{created}");
    assert_eq!(created["partitions"].as_u64(), Some(2), "{created}");
}

#[test]
fn under_journald_lines_carry_syslog_priorities_and_no_timestamp() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let metadata = std::fs::File::from(OwnedFd::from(theirs.try_clone().unwrap()))
        .metadata()
        .unwrap();
    let stream = format!("{}:{}", metadata.dev(), metadata.ino());
    let mut serve = serve_on_socket(
        &dir.path().join("journald"),
        &[("JOURNAL_STREAM", &stream)],
        ours,
        theirs,
    );
    let mut lines = lines_until_serving(&mut serve);
    lines.extend(terminate(&mut serve).lines().map(str::to_owned));
    for line in &lines {
        assert_eq!(journald_level(line), Some(("6", "INFO")), "{line}");
    }
    // A warning: a topic directory without its metadata is skipped at start-up.
    std::fs::create_dir_all(dir.path().join("journald/topics/orphan")).unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let metadata = std::fs::File::from(OwnedFd::from(theirs.try_clone().unwrap()))
        .metadata()
        .unwrap();
    let stream = format!("{}:{}", metadata.dev(), metadata.ino());
    let mut serve = serve_on_socket(
        &dir.path().join("journald"),
        &[("JOURNAL_STREAM", &stream)],
        ours,
        theirs,
    );
    let lines = lines_until_serving(&mut serve);
    assert!(
        lines
            .iter()
            .any(|line| journald_level(line) == Some(("4", "WARN")) && line.contains("orphan")),
        "{lines:#?}"
    );
    terminate(&mut serve);

    // A stream that is not stderr (a unit whose stderr was redirected): timestamps stay.
    let (ours, theirs) = UnixStream::pair().unwrap();
    let metadata = std::fs::File::from(OwnedFd::from(ours.try_clone().unwrap()))
        .metadata()
        .unwrap();
    let stream = format!("{}:{}", metadata.dev(), metadata.ino());
    let mut serve = serve_on_socket(
        &dir.path().join("redirected"),
        &[("JOURNAL_STREAM", &stream)],
        ours,
        theirs,
    );
    let lines = lines_until_serving(&mut serve);
    for line in &lines {
        assert_eq!(text_level(line), Some("INFO"), "{line}");
    }
    terminate(&mut serve);
}

#[test]
fn a_restart_logs_one_recovery_line_per_partition_with_counts_and_a_total() {
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Serve::start(dir.path(), "127.0.0.1:0", &["--cores", "2"]);
    let address = serve.wait_serving();
    let mut client = RawClient::connect(address);
    client.create_topic("events", 3);
    // Partition p holds p + 1 records.
    for partition in 0..3u32 {
        for record in 0..=partition {
            let value = format!("p{partition}r{record}");
            client
                .produce("events", partition, batch_of(&[value.as_bytes()]))
                .unwrap();
        }
    }
    drop(client);
    terminate(&mut serve);

    let mut serve = Serve::start(dir.path(), "127.0.0.1:0", &["--cores", "2"]);
    let lines = lines_until_serving(&mut serve);
    for partition in 0..3u32 {
        let recovered: Vec<&String> = lines
            .iter()
            .filter(|line| line.contains(&format!("recovered partition {partition} of events")))
            .collect();
        assert_eq!(recovered.len(), 1, "partition {partition}: {lines:#?}");
        let line = recovered[0];
        for field in [
            format!("records={}", partition + 1),
            "segments=1".to_owned(),
            "elapsed_ms=".to_owned(),
            "topic=events".to_owned(),
            format!("partition={partition}"),
        ] {
            assert!(line.contains(&field), "{field} in {line}");
        }
    }
    let total = lines
        .iter()
        .find(|line| line.contains("recovered 3 partitions"))
        .unwrap_or_else(|| panic!("a total line: {lines:#?}"));
    assert!(
        total.contains("records=6") && total.contains("segments=3"),
        "{total}"
    );
    terminate(&mut serve);
}

#[test]
fn a_topic_create_and_a_delete_each_log_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Serve::start(dir.path(), "127.0.0.1:0", &["--cores", "2"]);
    let address = serve.wait_serving();
    let mut client = RawClient::connect(address);
    client.create_topic("audit", 4);
    client
        .call(&Request::DeleteTopic(DeleteTopicRequest {
            name: "audit".into(),
        }))
        .expect("deleted");
    let lines = lines_until(&mut serve, |line| line.contains("topic deleted"));
    drop(client);
    let mut lines = lines;
    lines.extend(terminate(&mut serve).lines().map(str::to_owned));
    let about_audit: Vec<&String> = lines
        .iter()
        .filter(|line| line.contains("topic=audit"))
        .collect();
    assert_eq!(about_audit.len(), 2, "{about_audit:#?}");
    assert!(about_audit[0].contains("topic created") && about_audit[0].contains("partitions=4"));
    assert!(about_audit[1].contains("topic deleted"));
}

/// A frame with an opcode no broker knows: refused with an error, the connection stays.
fn unknown_opcode_frame(correlation_id: u64) -> BytesMut {
    let mut out = BytesMut::new();
    out.put_u32_le(4);
    out.put_u8(PROTOCOL_VERSION);
    out.put_u8(200);
    out.put_u16_le(0);
    out.put_u64_le(correlation_id);
    out.put_u32_le(0xdead_beef);
    out
}

#[test]
fn a_burst_of_malformed_frames_logs_the_rate_limit_then_a_count_of_the_rest() {
    // Not the defaults (5 lines per 10 s): both keys reach the limiter.
    const LINES_PER_WINDOW: usize = 3;
    const BURST: u64 = 50;
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Serve::start(
        dir.path(),
        "127.0.0.1:0",
        &[
            "--cores",
            "1",
            "--set",
            "log_lines_per_window_max=3",
            "--set",
            "log_window_ms=1000",
        ],
    );
    let address = serve.wait_serving();
    let mut client = RawClient::connect(address);
    for id in 1..=BURST {
        client.send_bytes(&unknown_opcode_frame(id));
        let (answered, _, _) = client.read_frame().expect("an error response");
        assert_eq!(answered, id);
    }
    // Every refusal was logged (or not) before its answer went out; a topic created now
    // logs after all of them, so the lines before it are the burst's.
    let mut admin = RawClient::connect(address);
    admin.create_topic("marker", 1);
    let lines = lines_until(&mut serve, |line| line.contains("topic=marker"));
    let refused: Vec<&String> = lines
        .iter()
        .filter(|line| line.contains("refused a malformed frame"))
        .collect();
    assert_eq!(refused.len(), LINES_PER_WINDOW, "{lines:#?}");
    for line in &refused {
        assert!(
            line.contains("held_back=0")
                && line.contains("opcode=200")
                && line.contains("peer=127.0.0.1:"),
            "{line}"
        );
    }
    // The count goes out with the first line of the next window: one more refusal a
    // little later each time until the window has turned (a wait on the broker's clock,
    // which this test cannot step).
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut sent = BURST;
    let held_back = loop {
        assert!(Instant::now() < deadline, "no count of held-back lines");
        sent += 1;
        client.send_bytes(&unknown_opcode_frame(sent));
        client.read_frame().expect("an error response");
        let counted =
            std::iter::from_fn(|| serve.lines.recv_timeout(Duration::from_millis(500)).ok())
                .find(|line| line.contains("refused a malformed frame"));
        if let Some(line) = counted {
            let held_back: u64 = line
                .split("held_back=")
                .nth(1)
                .and_then(|rest| rest.split(' ').next())
                .and_then(|number| number.parse().ok())
                .unwrap_or_else(|| panic!("a held_back count in {line}"));
            break held_back;
        }
    };
    // Everything after the window's lines was held back and counted: the rest of the burst
    // at least, and at most every frame sent before the one that was logged.
    assert!(
        (BURST - LINES_PER_WINDOW as u64..sent - LINES_PER_WINDOW as u64).contains(&held_back),
        "held_back {held_back}, burst {BURST}, sent {sent}"
    );
    drop(client);
    drop(admin);
    terminate(&mut serve);
}

#[test]
fn log_level_warn_hides_info_lines() {
    let dir = tempfile::tempdir().unwrap();
    // A first start makes the data directory; a topic directory without its metadata
    // then makes the second start warn.
    let mut serve = Serve::start(dir.path(), "127.0.0.1:0", &["--cores", "1"]);
    serve.wait_serving();
    terminate(&mut serve);
    std::fs::create_dir_all(dir.path().join("topics/orphan")).unwrap();
    let mut serve = Serve::start(
        dir.path(),
        "127.0.0.1:0",
        &["--cores", "2", "--log-level", "warn"],
    );
    let mut lines = lines_until(&mut serve, |line| line.contains("orphan"));
    // The signal may land while the broker still starts (it then exits with 128 + 15,
    // saying so at warn) or once it serves (it stops cleanly, at info): no serving line
    // at this level tells the two apart.
    // SAFETY: kill(2) on our own child's pid with SIGTERM, which the broker handles.
    unsafe { libc::kill(serve.child.id() as i32, libc::SIGTERM) };
    let (status, output) = serve.wait_exit();
    assert!(
        status.success() || status.code() == Some(128 + libc::SIGTERM),
        "{status:?}: {output}"
    );
    lines.extend(output.lines().map(str::to_owned));
    for line in &lines {
        assert_eq!(text_level(line), Some("WARN"), "{line}");
    }
    // Read once per shard and once to count partitions, the catalog is reported once.
    let skipped = lines.iter().filter(|line| line.contains("orphan")).count();
    assert_eq!(skipped, 1, "{lines:#?}");
}
