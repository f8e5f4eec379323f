//! `shardq serve` as a child process, for tests of what an operator or a supervisor
//! sees: its stderr lines, its exit status, a kill -9.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use shardq::protocol::{MetadataRequest, Request};

/// Longest any one step may take before the test fails.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Serve {
    pub child: Child,
    /// The shared address, once the broker said it serves.
    pub address: Option<SocketAddr>,
    /// The metrics endpoint's address, once the broker said it serves (none when `extra`
    /// turned it off).
    pub metrics_address: Option<SocketAddr>,
    /// stderr lines, read by a thread so the child never blocks on a full pipe.
    pub lines: mpsc::Receiver<String>,
    /// The lines `wait_serving` read, the "serving on" line last.
    pub seen: Vec<String>,
}

impl Serve {
    pub fn start(data_dir: &Path, listen: &str, extra: &[&str]) -> Serve {
        Self::start_with_env(data_dir, listen, extra, &[])
    }

    pub fn start_with_env(
        data_dir: &Path,
        listen: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Serve {
        let mut command = Command::new(env!("CARGO_BIN_EXE_shardq"));
        command
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .stdin(Stdio::null());
        // Port 0 unless the test says otherwise: parallel brokers must not fight over
        // the default metrics port.
        if !extra.contains(&"--metrics-listen") {
            command.args(["--metrics-listen", "127.0.0.1:0"]);
        }
        command.stdout(Stdio::null()).stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        Self::from_child(command.spawn().expect("shardq serve starts"))
    }

    /// Watches a `shardq serve` the test spawned itself (with its stderr piped).
    pub fn from_child(mut child: Child) -> Serve {
        let stderr = child.stderr.take().expect("piped stderr");
        Self::reading(child, stderr)
    }

    /// Watches a `shardq serve` whose stderr the test reads from `stderr` (the other end
    /// of a socket pair, say).
    pub fn reading(child: Child, stderr: impl std::io::Read + Send + 'static) -> Serve {
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Serve {
            child,
            address: None,
            metrics_address: None,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for the "serving on" line; panics with everything printed if the broker
    /// exits or does not get there in time.
    pub fn wait_serving(&mut self) -> SocketAddr {
        self.wait_serving_or_exit()
            .unwrap_or_else(|(status, stderr)| {
                panic!("serve exited ({status}) before serving; stderr:\n{stderr}")
            })
    }

    /// Waits for the "serving on" line, or for the broker to exit first: then its status
    /// and everything it printed. Panics if neither happens in time.
    pub fn wait_serving_or_exit(&mut self) -> Result<SocketAddr, (ExitStatus, String)> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    // Anywhere in the line: text log lines start with a timestamp and
                    // a level (or a syslog priority under journald).
                    if let Some((_, rest)) = line.split_once("serving on ") {
                        let address: SocketAddr = rest
                            .split(' ')
                            .next()
                            .expect("an address")
                            .parse()
                            .expect("a socket address");
                        self.address = Some(address);
                        self.metrics_address = rest
                            .split("metrics on http://")
                            .nth(1)
                            .and_then(|tail| tail.split('/').next())
                            .map(|address| address.parse().expect("a metrics address"));
                        self.seen.push(line);
                        return Ok(address);
                    }
                    self.seen.push(line);
                }
                // The reader thread ends when the process closes its stderr.
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let (status, _) = self.wait_exit();
                    return Err((status, self.seen.join("\n")));
                }
                Err(_) => panic!(
                    "no 'serving on' within {STEP_TIMEOUT:?} (exit: {:?}); stderr:\n{}",
                    self.child.try_wait(),
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits for the process to exit; returns its status and what it printed.
    pub fn wait_exit(&mut self) -> (ExitStatus, String) {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                let mut lines = Vec::new();
                // The reader thread ends at EOF once the process has gone.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
                    lines.push(line);
                }
                return (status, lines.join("\n"));
            }
            assert!(
                Instant::now() < deadline,
                "serve did not exit within {STEP_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request/response round trip on a fresh connection: a Metadata request, answered
/// within the read timeout. Fails if the connection was accepted by nobody.
pub fn metadata_round_trip(address: SocketAddr) -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))
        .map_err(|error| format!("connect: {error}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut out = BytesMut::new();
    Request::Metadata(MetadataRequest { topics: Vec::new() }).encode(7, &mut out);
    stream
        .write_all(&out)
        .map_err(|error| format!("write: {error}"))?;
    let mut header = [0u8; shardq::protocol::FRAME_HEADER_SIZE];
    stream
        .read_exact(&mut header)
        .map_err(|error| format!("no answer: {error}"))
}

/// A port P with P .. P + `count` - 1 free right now, below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`), so that no socket bound to port 0 (every other
/// broker and client of the test run) can be handed one of them later. For a broker that
/// must come back on the same address after a restart.
pub fn fixed_port_range(count: u16) -> u16 {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let first = 10_000u16;
    let last = ephemeral_low
        .checked_sub(count)
        .filter(|last| *last > first)
        .expect("room for the ports below the ephemeral range");
    // Spread the tests of one run over the range: start from a place that differs per
    // process and per call.
    let salt = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.subsec_nanos())
        ^ std::process::id();
    let mut candidate = first + (salt % u32::from(last - first)) as u16;
    for _ in 0..1_000 {
        let free = (0..count)
            .all(|step| std::net::TcpListener::bind(("127.0.0.1", candidate + step)).is_ok());
        if free {
            return candidate;
        }
        candidate = if candidate + count >= last {
            first
        } else {
            candidate + count
        };
    }
    panic!("no {count} consecutive free ports below {ephemeral_low}")
}

/// Builds the examples `names` with the cargo and the profile that built this test (a
/// no-op when `cargo test` built them already), and returns their directory
/// (`target/<profile>/examples`).
pub fn built_examples(names: &[&str]) -> std::path::PathBuf {
    let profile_directory = Path::new(env!("CARGO_BIN_EXE_shardq"))
        .parent()
        .expect("the binary lies in the profile's directory");
    let target_directory = profile_directory
        .parent()
        .expect("the profile's directory lies in the target directory");
    let mut command = Command::new(env!("CARGO"));
    command
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--quiet", "--locked", "--target-dir"])
        .arg(target_directory);
    if profile_directory
        .file_name()
        .is_some_and(|name| name == "release")
    {
        command.arg("--release");
    }
    for name in names {
        command.args(["--example", name]);
    }
    let status = command.status().expect("run cargo build");
    assert!(status.success(), "cargo build of {names:?}: {status}");
    profile_directory.join("examples")
}
