//! `shardq doctor` as an operator runs it: the real binary against data directories on
//! ext4, tmpfs and a path nobody can create, a port the test holds and a data directory a
//! running broker holds; and `shardq serve` under locked-memory limits too low for its
//! shards: below glommio's floor it refuses to start with the numbers and the fix, above
//! it it warns the same way and serves without registered buffers.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::process::{Serve, STEP_TIMEOUT};
use serde_json::Value;
use shardq::server::preflight::CHECK_NAMES;

/// Runs `shardq doctor` on `data_dir` with port 0 for every listener (parallel tests
/// must not fight over ports) unless `extra` names them, one shard unless it says.
fn doctor(data_dir: &Path, extra: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_shardq"));
    command.arg("doctor").arg("--data-dir").arg(data_dir);
    for (flag, default) in [
        ("--listen", "127.0.0.1:0"),
        ("--metrics-listen", "127.0.0.1:0"),
        ("--cores", "1"),
    ] {
        if !extra.contains(&flag) {
            command.args([flag, default]);
        }
    }
    command
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("shardq doctor runs")
}

/// One check as `--json` reports it.
#[derive(Debug)]
struct Reported {
    status: String,
    found: String,
    action: Value,
}

/// Runs `doctor --json`; the exit code and the checks by name, in reported order.
fn doctor_json(data_dir: &Path, extra: &[&str]) -> (i32, Vec<(String, Reported)>) {
    let mut arguments = vec!["--json"];
    arguments.extend_from_slice(extra);
    let output = doctor(data_dir, &arguments);
    let stdout = String::from_utf8(output.stdout).expect("UTF-8 output");
    let document: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|error| panic!("--json prints JSON ({error}):\n{stdout}"));
    let checks = document["checks"]
        .as_array()
        .expect("a checks array")
        .iter()
        .map(|check| {
            (
                check["name"].as_str().expect("a name").to_owned(),
                Reported {
                    status: check["status"].as_str().expect("a status").to_owned(),
                    found: check["found"].as_str().expect("found").to_owned(),
                    action: check["action"].clone(),
                },
            )
        })
        .collect();
    (output.status.code().expect("an exit code"), checks)
}

fn by_name(checks: &[(String, Reported)]) -> BTreeMap<&str, &Reported> {
    checks
        .iter()
        .map(|(name, check)| (name.as_str(), check))
        .collect()
}

#[test]
fn doctor_on_ext4_passes_filesystem_and_direct_io_and_exits_as_the_table_says() {
    let root = tempfile::tempdir().unwrap();
    let data_dir = root.path().join("data");
    let output = doctor(&data_dir, &[]);
    let table = String::from_utf8(output.stdout).unwrap();
    let rows: BTreeMap<&str, &str> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            Some((fields.next()?, fields.next()?))
        })
        .filter(|(_, status)| ["pass", "warn", "fail"].contains(status))
        .collect();
    for name in CHECK_NAMES {
        assert!(rows.contains_key(name), "no row for {name}:\n{table}");
    }
    // The default temp dir on these machines is ext4 (docs/storage.md).
    assert_eq!(rows["filesystem"], "pass", "{table}");
    assert_eq!(rows["direct_io"], "pass", "{table}");
    assert_eq!(rows["data_dir"], "pass", "{table}");
    let failed = rows.values().filter(|status| **status == "fail").count();
    assert_eq!(
        output.status.code(),
        Some(if failed > 0 { 1 } else { 0 }),
        "exit status against {failed} failed rows:\n{table}"
    );
    assert!(
        table.contains(&format!("{failed} failed")),
        "the summary line counts the failures:\n{table}"
    );
    assert!(
        !data_dir.exists(),
        "the data directory doctor created to check it is removed again"
    );
}

/// Whether `/proc/mounts` lists `path` as a tmpfs mount point.
fn is_tmpfs_mount(path: &str) -> bool {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|line| {
            let mut fields = line.split_whitespace();
            let (_, mount_point, kind) = (fields.next(), fields.next(), fields.next());
            mount_point == Some(path) && kind == Some("tmpfs")
        })
}

/// A tmpfs mount, unmounted when dropped when the test mounted it.
struct Tmpfs {
    path: PathBuf,
    mounted_here: Option<tempfile::TempDir>,
}

impl Tmpfs {
    fn find_or_mount() -> Tmpfs {
        if is_tmpfs_mount("/dev/shm") {
            return Tmpfs {
                path: PathBuf::from("/dev/shm"),
                mounted_here: None,
            };
        }
        // No /dev/shm here: the tests run as root, so mount a small tmpfs of our own
        // rather than skip the check.
        let mount_point = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
            .arg(mount_point.path())
            .status()
            .expect("mount runs");
        assert!(status.success(), "mounting a tmpfs (needs root): {status}");
        Tmpfs {
            path: mount_point.path().to_path_buf(),
            mounted_here: Some(mount_point),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if self.mounted_here.is_some() {
            let _ = Command::new("umount").arg(&self.path).status();
        }
    }
}

#[test]
fn doctor_on_tmpfs_warns_that_the_filesystem_is_memory() {
    let tmpfs = Tmpfs::find_or_mount();
    let root = tempfile::tempdir_in(&tmpfs.path).unwrap();
    let (_, checks) = doctor_json(&root.path().join("data"), &[]);
    let checks = by_name(&checks);
    let filesystem = checks["filesystem"];
    assert_eq!(filesystem.status, "warn", "{filesystem:?}");
    assert!(filesystem.found.starts_with("tmpfs"), "{filesystem:?}");
    assert!(
        filesystem
            .action
            .as_str()
            .is_some_and(|action| action.contains("ext4")),
        "{filesystem:?}"
    );
    assert_eq!(checks["data_dir"].status, "pass", "{checks:?}");
}

#[test]
fn doctor_on_a_dir_nobody_can_create_fails_data_dir_and_exits_1() {
    // Not even root can create directories in /proc.
    let data_dir = Path::new("/proc/shardq-doctor-test/data");
    let (code, checks) = doctor_json(data_dir, &[]);
    assert_eq!(code, 1);
    let checks = by_name(&checks);
    let data = checks["data_dir"];
    assert_eq!(data.status, "fail", "{data:?}");
    assert!(
        data.found.contains("/proc/shardq-doctor-test/data")
            && data.found.contains("cannot be created"),
        "{data:?}"
    );
    assert!(
        data.action.is_string(),
        "a failure says what to do: {data:?}"
    );
    // What depends on the directory says it was not checked rather than passing.
    for name in ["filesystem", "direct_io", "disk_space"] {
        assert!(
            checks[name].status != "pass" && checks[name].found.contains("not checked"),
            "{name}: {:?}",
            checks[name]
        );
    }
}

#[test]
fn doctor_json_lists_every_check_by_its_stable_name() {
    let root = tempfile::tempdir().unwrap();
    let (code, checks) = doctor_json(&root.path().join("data"), &[]);
    let names: Vec<&str> = checks.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, CHECK_NAMES);
    let failed = checks
        .iter()
        .filter(|(_, check)| check.status == "fail")
        .count();
    assert_eq!(code, if failed > 0 { 1 } else { 0 }, "{checks:?}");
    for (name, check) in &checks {
        assert!(
            ["pass", "warn", "fail"].contains(&check.status.as_str()),
            "{name}: {check:?}"
        );
        assert_eq!(
            check.action.is_null(),
            check.status == "pass",
            "an action exactly for warnings and failures: {name}: {check:?}"
        );
    }
}

#[test]
fn doctor_listen_fails_on_ports_the_test_holds() {
    let shared = TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics = TcpListener::bind("127.0.0.1:0").unwrap();
    let shared_address = shared.local_addr().unwrap().to_string();
    let metrics_address = metrics.local_addr().unwrap().to_string();
    let root = tempfile::tempdir().unwrap();
    let (code, checks) = doctor_json(
        &root.path().join("data"),
        &[
            "--listen",
            &shared_address,
            "--metrics-listen",
            &metrics_address,
        ],
    );
    assert_eq!(code, 1);
    let checks = by_name(&checks);
    for (name, address) in [
        ("listen", &shared_address),
        ("metrics_listen", &metrics_address),
    ] {
        let check = checks[name];
        assert_eq!(check.status, "fail", "{name}: {check:?}");
        assert!(
            check.found.contains(address.as_str()) && check.found.contains("in use"),
            "{name}: {check:?}"
        );
    }
    drop((shared, metrics));
}

#[test]
fn doctor_fails_the_lock_check_on_a_data_dir_a_running_broker_holds() {
    let root = tempfile::tempdir().unwrap();
    let data_dir = root.path().join("data");
    let mut broker = Serve::start(&data_dir, "127.0.0.1:0", &["--cores", "1"]);
    broker.wait_serving();
    let (code, checks) = doctor_json(&data_dir, &[]);
    assert_eq!(code, 1);
    let lock = by_name(&checks)["data_dir_lock"];
    assert_eq!(lock.status, "fail", "{lock:?}");
    assert!(
        lock.found.contains(&format!("pid {}", broker.child.id())),
        "{lock:?}"
    );
}

#[test]
fn doctor_checks_the_broker_a_config_file_describes_and_fails_a_setting_serve_would_refuse() {
    let root = tempfile::tempdir().unwrap();
    let data_dir = root.path().join("from-file");
    let config = root.path().join("shardq.toml");
    let write_config = |extra: &str| {
        std::fs::write(
            &config,
            format!(
                "data_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\ncores = 1\n{extra}",
                data_dir.display()
            ),
        )
        .unwrap();
    };
    let run = || {
        let output = Command::new(env!("CARGO_BIN_EXE_shardq"))
            .args(["doctor", "--json", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .output()
            .expect("shardq doctor runs");
        let stdout = String::from_utf8(output.stdout).expect("UTF-8 output");
        let document: Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|error| panic!("--json prints JSON ({error}):\n{stdout}"));
        let check = |name: &str| {
            document["checks"]
                .as_array()
                .expect("a checks array")
                .iter()
                .find(|check| check["name"] == name)
                .unwrap_or_else(|| panic!("no {name} check: {stdout}"))
                .clone()
        };
        (output.status.code(), check("config"), check("data_dir"))
    };

    write_config("");
    let (_, config_check, data_dir_check) = run();
    assert_eq!(config_check["status"], "pass", "{config_check}");
    // The data directory is the file's, not serve's default.
    let found = data_dir_check["found"].as_str().unwrap();
    assert!(
        found.contains(&data_dir.display().to_string()),
        "{data_dir_check}"
    );

    // One past the edge: the stop's bound below drain + linger (2000 + 2000).
    write_config("shutdown_timeout_ms = 3999\n");
    let (code, config_check, _) = run();
    assert_eq!(code, Some(1));
    assert_eq!(config_check["status"], "fail", "{config_check}");
    let found = config_check["found"].as_str().unwrap();
    assert!(
        found.contains("shutdown_timeout_ms") && found.contains("3999") && found.contains("4000"),
        "{config_check}"
    );
}

/// CAP_IPC_LOCK's number in linux/capability.h.
const CAP_IPC_LOCK: libc::c_ulong = 14;

/// `shardq serve` (1 shard, port 0) without CAP_IPC_LOCK and under a memlock limit of
/// `limit_bytes`, its stderr piped.
fn serve_under_memlock(data_dir: &Path, limit_bytes: u64) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_shardq"));
    command
        .args(["serve", "--cores", "1", "--listen", "127.0.0.1:0"])
        .args(["--metrics-listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls (prctl, setrlimit) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            // As root, CAP_IPC_LOCK exempts the broker from the limit: drop it from the
            // bounding set so that the shardq exec'd next runs without it. A user
            // without CAP_SETPCAP may not (EPERM) and has no CAP_IPC_LOCK to drop.
            if libc::prctl(libc::PR_CAPBSET_DROP, CAP_IPC_LOCK, 0, 0, 0) != 0 {
                let error = std::io::Error::last_os_error();
                if error.raw_os_error() != Some(libc::EPERM) {
                    return Err(error);
                }
            }
            let limit = libc::rlimit {
                rlim_cur: limit_bytes,
                rlim_max: limit_bytes,
            };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

/// 1 shard of the defaults: 3 rings x (64 MiB of chunks + 16 MiB) = 240 MiB.
const ONE_SHARD_NEEDS_BYTES: u64 = 3 * (80 << 20);

#[test]
fn serve_under_a_memlock_limit_glommio_cannot_start_under_exits_with_the_numbers_and_starts_nothing(
) {
    let root = tempfile::tempdir().unwrap();
    let data_dir = root.path().join("data");
    // Below glommio's floor (512 KiB) no executor starts.
    let limit_bytes: u64 = 256 << 10;
    let mut child = serve_under_memlock(&data_dir, limit_bytes)
        .spawn()
        .expect("serve spawns");
    // Without the check a shard thread ends and start-up fails opaquely, or worse the
    // broker serves: either must fail the test, not hang it.
    let deadline = Instant::now() + STEP_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "serve kept running for {STEP_TIMEOUT:?} under a {limit_bytes}-byte memlock limit"
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("piped stderr")
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    for part in [
        "RLIMIT_MEMLOCK".to_owned(),
        format!("is {limit_bytes} bytes"),
        format!("1 shards need {ONE_SHARD_NEEDS_BYTES} bytes"),
        "LimitMEMLOCK=infinity".to_owned(),
        "ulimit -l".to_owned(),
    ] {
        assert!(stderr.contains(&part), "{part:?} missing from: {stderr}");
    }
    assert!(
        !stderr.contains("serving on") && !stderr.contains("metrics and health checks on"),
        "nothing listened: {stderr}"
    );
    assert!(
        !data_dir.exists(),
        "the data directory is not even created: {stderr}"
    );
}

#[test]
fn serve_under_a_memlock_limit_below_the_need_warns_with_the_numbers_and_still_stores_durably() {
    let root = tempfile::tempdir().unwrap();
    let data_dir = root.path().join("data");
    // Above glommio's floor, far below what registered buffers need: a developer's shell.
    let limit_bytes: u64 = 1 << 20;
    let child = serve_under_memlock(&data_dir, limit_bytes)
        .spawn()
        .expect("serve spawns");
    let mut broker = Serve::from_child(child);
    let address = broker.wait_serving();
    let warning = broker
        .seen
        .iter()
        .find(|line| line.contains("WARN") && line.contains("RLIMIT_MEMLOCK"))
        .unwrap_or_else(|| panic!("no memlock warning before serving: {:?}", broker.seen));
    for part in [
        format!("is {limit_bytes} bytes"),
        format!("1 shards need {ONE_SHARD_NEEDS_BYTES} bytes"),
        "without registered I/O buffers".to_owned(),
        "LimitMEMLOCK=infinity".to_owned(),
    ] {
        assert!(warning.contains(&part), "{part:?} missing from: {warning}");
    }
    // The unregistered path writes and syncs as well as the registered one.
    let mut client = common::RawClient::connect(address);
    client.create_topic("orders", 1);
    for (expected, value) in ["a", "b", "c"].iter().enumerate() {
        let offset = client
            .produce("orders", 0, common::batch_of(&[value.as_bytes()]))
            .expect("durable produce");
        assert_eq!(offset, expected as u64);
    }
    assert_eq!(
        common::values(&client.fetch_all("orders", 0, 0)),
        ["a", "b", "c"]
    );
}

/// A command whose open-files limits are `soft` and `hard` once it runs.
fn with_open_files_limits(command: &mut Command, soft: u64, hard: u64) {
    // SAFETY: only setrlimit, async-signal-safe, between fork and exec.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn serve_raises_its_open_files_soft_limit_to_the_hard_one() {
    let root = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_shardq"));
    command
        .args(["serve", "--cores", "1", "--listen", "127.0.0.1:0"])
        .args(["--metrics-listen", "127.0.0.1:0", "--data-dir"])
        .arg(root.path().join("data"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    with_open_files_limits(&mut command, 256, 4096);
    let mut broker = Serve::from_child(command.spawn().expect("serve spawns"));
    broker.wait_serving();
    assert!(
        broker
            .seen
            .iter()
            .any(|line| line.contains("open-files soft limit from 256 to 4096")),
        "{:?}",
        broker.seen
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", broker.child.id())).unwrap();
    let open_files = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .expect("an open files line");
    let numbers: Vec<&str> = open_files.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers, ["4096", "4096"], "{open_files}");
}

#[test]
fn doctor_warns_when_the_hard_open_files_limit_is_below_connections_max() {
    let root = tempfile::tempdir().unwrap();
    let check = |connections_max: &str| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_shardq"));
        command
            .args([
                "doctor",
                "--json",
                "--cores",
                "1",
                "--listen",
                "127.0.0.1:0",
            ])
            .args(["--metrics-listen", "127.0.0.1:0", "--connections-max"])
            .arg(connections_max)
            .arg("--data-dir")
            .arg(root.path().join("data"))
            .stdin(Stdio::null());
        // A soft limit far below: what counts is the hard one, which serve raises it to.
        with_open_files_limits(&mut command, 64, 2048);
        let output = command.output().expect("doctor runs");
        let document: Value = serde_json::from_slice(&output.stdout).expect("JSON");
        document["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|check| check["name"] == "open_files")
            .expect("an open_files check")
            .clone()
    };
    // 1 shard: 18 descriptors of its own, no partitions yet.
    let fits = check("2000");
    assert_eq!(fits["status"], "pass", "{fits}");
    let past = check("2048");
    assert_eq!(past["status"], "warn", "{past}");
    assert!(
        past["found"]
            .as_str()
            .unwrap()
            .contains("accepts fail past about 2030 connections"),
        "{past}"
    );
}

#[test]
fn doctor_checks_the_cpus_list_serve_would_pin_to() {
    let root = tempfile::tempdir().unwrap();
    let data_dir = root.path().join("data");
    let online = std::thread::available_parallelism().map_or(1, |count| count.get());
    let highest = (online - 1).to_string();
    let (_, checks) = doctor_json(&data_dir, &["--cpus", &highest]);
    let cpus = by_name(&checks)["cpus"];
    assert_eq!(cpus.status, "pass", "{cpus:?}");
    assert!(cpus.found.contains(&format!("[{highest}]")), "{cpus:?}");

    // A CPU past the online ones: serve refuses it, so doctor fails it.
    let offline = online.to_string();
    let (code, checks) = doctor_json(&data_dir, &["--cpus", &offline]);
    assert_eq!(code, 1);
    let cpus = by_name(&checks)["cpus"];
    assert_eq!(cpus.status, "fail", "{cpus:?}");
    assert!(
        cpus.found
            .contains(&format!("cpus names CPU {offline}, which is not online")),
        "{cpus:?}"
    );
}
