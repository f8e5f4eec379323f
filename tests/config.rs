//! The broker's configuration as an operator meets it, through the real binary: a bad
//! config names the key, the value and what is allowed, exits non-zero and starts
//! nothing; flag > environment > file > default; `config print` shows sources and reads
//! back; a broker started with `--config` uses it; `--cpus` pins the shard; and
//! tuning/shardq.toml lists every key at its default.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::process::Serve;
use common::RawClient;
use shardq::config::file::{serve_defaults, Layered, Source, KEYS};
use shardq::protocol::{HandshakeRequest, Request};

fn shardq() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_shardq"));
    // Only the variables a test sets: SHARDQ_* keys in the test's own environment must
    // not leak into what it checks.
    command.env_clear().stdin(Stdio::null());
    command
}

/// `shardq serve` with `arguments` and `environment`, as a `Serve` (stderr lines read
/// by a thread; killed on drop).
fn spawn_serve(arguments: &[&str], environment: &[(&str, &str)]) -> Serve {
    let mut command = shardq();
    command
        .arg("serve")
        .args(arguments)
        .envs(environment.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    Serve::from_child(command.spawn().expect("shardq serve starts"))
}

/// A temporary directory with a config file holding `text`; the broker's data directory
/// would be `data` inside it (not created).
struct Setup {
    directory: tempfile::TempDir,
}

impl Setup {
    fn new(text: &str) -> Setup {
        let directory = tempfile::tempdir().unwrap();
        std::fs::write(directory.path().join("shardq.toml"), text).unwrap();
        Setup { directory }
    }

    fn file(&self) -> PathBuf {
        self.directory.path().join("shardq.toml")
    }

    fn data(&self) -> PathBuf {
        self.directory.path().join("data")
    }

    /// `serve --config FILE --data-dir DATA` on ephemeral ports plus `extra`; expects it
    /// to refuse: non-zero exit, no data directory, no listener. Returns stderr.
    fn refused(&self, extra: &[&str], environment: &[(&str, &str)]) -> String {
        let file = self.file();
        let data = self.data();
        let mut arguments = vec![
            "--config",
            file.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ];
        arguments.extend_from_slice(extra);
        let mut serve = spawn_serve(&arguments, environment);
        let (status, stderr) = serve.wait_exit();
        assert!(!status.success(), "accepted: {stderr}");
        assert!(
            !data.exists(),
            "the data directory was created although the config is refused: {stderr}"
        );
        // Each listener announces itself when bound (metrics at once, the broker's once
        // serving): neither may have been.
        assert!(
            !stderr.contains("serving on") && !stderr.contains("metrics and health checks on"),
            "something was bound: {stderr}"
        );
        stderr
    }
}

fn assert_contains_all(text: &str, parts: &[&str]) {
    for part in parts {
        assert!(text.contains(part), "{part:?} missing from:\n{text}");
    }
}

#[test]
fn unknown_key_in_the_file_names_key_file_and_line() {
    let setup = Setup::new("cores = 1\n\n# a comment\nsegment_size = 4194304\n");
    let stderr = setup.refused(&[], &[]);
    assert_contains_all(
        &stderr,
        &[
            "unknown config key `segment_size`",
            setup.file().to_str().unwrap(),
            "line 4",
        ],
    );
}

#[test]
fn wrong_type_or_integer_range_names_key_value_and_what_was_expected() {
    let setup = Setup::new("cores = \"four\"\n");
    let stderr = setup.refused(&[], &[]);
    assert_contains_all(
        &stderr,
        &[
            "cores = \"four\"",
            "shardq.toml:1)",
            "\"auto\" or a number of shards",
        ],
    );
    // Past u32 from the environment, and from --set.
    let setup = Setup::new("");
    let stderr = setup.refused(&[], &[("SHARDQ_CONNECTIONS_MAX", "4294967296")]);
    assert_contains_all(
        &stderr,
        &[
            "connections_max = \"4294967296\"",
            "env SHARDQ_CONNECTIONS_MAX",
            "an integer from 0 to 4294967295",
        ],
    );
    let stderr = setup.refused(&["--set", "recycle_segments=yes"], &[]);
    assert_contains_all(
        &stderr,
        &["recycle_segments = \"yes\"", "flag --set", "true or false"],
    );
}

#[test]
fn out_of_range_values_name_key_value_and_allowed_range() {
    for (file, extra, expected) in [
        // One past the largest segment (the next multiple of 4096 after 4294963200).
        (
            "segment_size_bytes = 4294967296\n",
            &[][..],
            &[
                "segment_size_bytes = 4294967296",
                "a multiple of 4096 from 1048576 (chunk_size_bytes) to 4294963200",
                "shardq.toml:1)",
            ][..],
        ),
        // One past the jitter's edge, in the table's neighbour (a top-level key).
        (
            "queue_retry_jitter_percent = 101\n",
            &[],
            &["queue_retry_jitter_percent = 101", "from 0 to 100"],
        ),
        (
            "chunk_size_bytes = 4096\n",
            &[],
            &[
                "chunk_size_bytes = 4096",
                "a multiple of 4096 from 8192 to 1073741824",
            ],
        ),
        (
            "",
            &["--set", "topic_defaults.queue_deliveries_max=0"],
            &["queue_deliveries_max = 0", "at least 1", "flag --set"],
        ),
        (
            "[topic_defaults]\nqueue_retry_delay_ms_min = 300001\n",
            &[],
            &[
                "queue_retry_delay_ms_min = 300001",
                "at most 300000 (queue_retry_delay_ms_max)",
                "shardq.toml:2)",
            ],
        ),
    ] {
        let stderr = Setup::new(file).refused(extra, &[]);
        assert_contains_all(&stderr, expected);
    }
}

#[test]
fn bad_cpu_lists_name_what_is_wrong() {
    // From the file: a missing number between commas.
    let setup = Setup::new("cpus = \"0,,1\"\n");
    let stderr = setup.refused(&[], &[]);
    assert_contains_all(&stderr, &["cpus = \"0,,1\"", "\"\" is not a CPU number"]);
    // From the flag: clap's usage error (status 2) with the list's own reason.
    let setup = Setup::new("");
    let stderr = setup.refused(&["--cpus", "3-1"], &[]);
    assert_contains_all(&stderr, &["--cpus", "range 3-1 runs backwards"]);
    // A CPU this machine does not have online.
    let stderr = setup.refused(&["--cpus", "0,8191"], &[]);
    assert_contains_all(&stderr, &["CPU 8191, which is not online", "online: 0"]);
    // cores and cpus disagree.
    let stderr = setup.refused(&["--cores", "2", "--cpus", "0"], &[]);
    assert_contains_all(
        &stderr,
        &[
            "cores = 2",
            "must be 1 (the number of CPUs in cpus = \"0\")",
            "flag --cores",
        ],
    );
}

/// `config print --json` in `directory`'s environment: each key's value and source.
fn print_json(arguments: &[&str], environment: &[(&str, &str)]) -> serde_json::Value {
    let output = shardq()
        .args(["config", "print", "--json"])
        .args(arguments)
        .envs(environment.iter().copied())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn flag_beats_environment_beats_file_beats_default() {
    let setup = Setup::new("connections_max = 100\n");
    let file = setup.file();
    let file = file.to_str().unwrap();
    let environment = [("SHARDQ_CONNECTIONS_MAX", "200")];
    // (arguments, environment, the winning value, its source)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], i64, String);
    let cases: [Case; 4] = [
        (&[], &[], 20_000, "default".into()),
        (&["--config", file], &[], 100, format!("file {file}:1")),
        (
            &["--config", file],
            &environment,
            200,
            "env SHARDQ_CONNECTIONS_MAX".into(),
        ),
        (
            &["--config", file, "--set", "connections_max=300"],
            &environment,
            300,
            "flag --set".into(),
        ),
    ];
    for (arguments, environment, value, source) in cases {
        let printed = print_json(arguments, environment);
        assert_eq!(
            printed["connections_max"]["value"], value,
            "{arguments:?} {environment:?}"
        );
        assert_eq!(printed["connections_max"]["source"], source.as_str());
    }
}

#[test]
fn unknown_shardq_variables_warn_and_known_non_config_ones_are_quiet() {
    let output = shardq()
        .args(["config", "print"])
        .envs([
            ("SHARDQ_SEGMENT_SIZE", "1"),
            ("SHARDQ_SERVER", "127.0.0.1:1"),
            ("SHARDQ_TEST_SEED", "1"),
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_contains_all(
        &stderr,
        &["warning: environment variable SHARDQ_SEGMENT_SIZE is not a config key"],
    );
    assert!(
        !stderr.contains("SHARDQ_SERVER") && !stderr.contains("SHARDQ_TEST_SEED"),
        "{stderr}"
    );
}

fn without_comments(text: &str) -> Vec<String> {
    text.lines()
        .map(|line| line.split(" # ").next().unwrap().trim().to_string())
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect()
}

#[test]
fn config_print_shows_sources_and_reads_back_through_config() {
    let setup = Setup::new("cores = 1\n[topic_defaults]\nqueue_ordering = \"per_key\"\n");
    let file = setup.file();
    let print = |arguments: &[&str], environment: &[(&str, &str)]| -> Output {
        let output = shardq()
            .args(["config", "print"])
            .args(arguments)
            .envs(environment.iter().copied())
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        output
    };
    let first = print(
        &[
            "--config",
            file.to_str().unwrap(),
            "--set",
            "cpus=0",
            "--set",
            "metrics_listen=off",
        ],
        &[("SHARDQ_SEGMENT_SIZE_BYTES", "8388608")],
    );
    let first = String::from_utf8(first.stdout).unwrap();
    let file_source = format!("# file {}", file.display());
    assert_contains_all(
        &first,
        &[
            &format!("cores = 1 {file_source}:1"),
            &format!("queue_ordering = \"per_key\" {file_source}:3"),
            "cpus = \"0\" # flag --set",
            "metrics_listen = \"off\" # flag --set",
            "segment_size_bytes = 8388608 # env SHARDQ_SEGMENT_SIZE_BYTES",
            "listen = \"127.0.0.1:9740\" # default",
            "\n[topic_defaults]\n",
        ],
    );
    // Every key is there.
    for key in KEYS {
        assert!(
            first.contains(&format!("\n{} = ", key.name)),
            "{} missing",
            key.name
        );
    }
    let printed = setup.directory.path().join("printed.toml");
    std::fs::write(&printed, &first).unwrap();
    let second = print(&["--config", printed.to_str().unwrap()], &[]);
    let second = String::from_utf8(second.stdout).unwrap();
    assert_eq!(without_comments(&first), without_comments(&second));
    assert!(
        without_comments(&second).len() == KEYS.len() + 1,
        "every key and the table header:\n{second}"
    );
    assert!(
        !second.contains("# default"),
        "all from the file:\n{second}"
    );
}

/// A broker started with only `--config` takes its address, data directory, metrics
/// setting and connection limit from the file, and an environment variable overrides
/// the file's limit.
#[test]
fn serve_uses_the_file_and_the_environment_over_it() {
    let directory = tempfile::tempdir().unwrap();
    let data = directory.path().join("from-file");
    let file = directory.path().join("shardq.toml");
    std::fs::write(
        &file,
        format!(
            "data_dir = {:?}\nlisten = \"127.0.0.1:0\"\ncores = 1\nmetrics_listen = \"off\"\nconnections_max = 1\n",
            data.to_str().unwrap()
        ),
    )
    .unwrap();
    let mut serve = spawn_serve(
        &["--config", file.to_str().unwrap()],
        &[("SHARDQ_CONNECTIONS_MAX", "2")],
    );
    let address = serve.wait_serving();
    assert_eq!(serve.metrics_address, None, "metrics_listen = \"off\"");
    assert!(data.is_dir(), "the file's data_dir is used");
    let handshake = Request::Handshake(HandshakeRequest {
        client_name: "config".into(),
    });
    let _open: Vec<RawClient> = (0..2)
        .map(|_| {
            let mut client = RawClient::connect(address);
            client.call(&handshake).expect("within connections_max = 2");
            client
        })
        .collect();
    let mut refused = RawClient::connect(address);
    refused.send(&handshake);
    assert!(
        refused.read_frame().is_none(),
        "a third connection is closed at once (SHARDQ_CONNECTIONS_MAX = 2)"
    );
}

/// The highest online CPU (1 on a two-CPU machine): pinning there differs from the
/// default placement of a one-shard broker (CPU 0).
fn highest_online_cpu() -> usize {
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    shardq::config::CpuList::parse(online.trim())
        .unwrap()
        .cpus()
        .iter()
        .copied()
        .max()
        .unwrap()
}

/// The CPUs each thread of shard `shard` may run on, from /proc (their
/// `sched_getaffinity`). glommio names a shard's threads `shardq-shard-<k>-<n>` (the
/// kernel keeps 15 bytes of it).
fn shard_thread_cpus(pid: u32, shard: usize) -> Vec<String> {
    let prefix = format!("shardq-shard-{shard}-");
    let mut allowed = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let Ok(name) = std::fs::read_to_string(task.join("comm")) else {
            continue; // the thread ended meanwhile
        };
        if !name.starts_with(&prefix) {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(task.join("status")) else {
            continue;
        };
        allowed.extend(
            status
                .lines()
                .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
                .map(|list| list.trim().to_string()),
        );
    }
    allowed
}

#[test]
fn cpus_flag_pins_the_shard_to_that_cpu() {
    let cpu = highest_online_cpu();
    let directory = tempfile::tempdir().unwrap();
    let data = directory.path().join("data");
    let cpu_text = cpu.to_string();
    let mut serve = spawn_serve(
        &[
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "off",
            "--cpus",
            &cpu_text,
        ],
        &[],
    );
    serve.wait_serving();
    let summary = serve.seen.last().expect("the serving line");
    assert!(summary.contains(&format!("cpus=[{cpu}]")), "{summary}");
    let allowed = shard_thread_cpus(serve.child.id(), 0);
    assert!(
        !allowed.is_empty() && allowed.iter().all(|cpus| *cpus == cpu_text),
        "shard 0's threads may run on {allowed:?}, not only on CPU {cpu}"
    );
    assert!(
        shard_thread_cpus(serve.child.id(), 1).is_empty(),
        "one CPU listed, one shard"
    );
}

/// tuning/shardq.toml is the operators' starting point: it must hold every key the code
/// knows (and no other: the file is read with unknown keys refused), each at its default.
#[test]
fn tuning_example_lists_every_key_at_its_default() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning/shardq.toml");
    let mut example = Layered::new(serve_defaults());
    example
        .apply_file(&path)
        .unwrap_or_else(|error| panic!("{error}"));
    let defaults = Layered::new(serve_defaults());
    for ((key, value, source), (_, default, _)) in example.entries().zip(defaults.entries()) {
        assert!(
            matches!(source, Source::File { .. }),
            "tuning/shardq.toml lacks {}",
            key.dotted()
        );
        assert_eq!(
            value,
            default,
            "tuning/shardq.toml: {} differs from the default",
            key.dotted()
        );
    }
}
