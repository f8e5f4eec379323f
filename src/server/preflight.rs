//! Preflight: whether this host can run a broker with a given `ServerConfig`, checked
//! before anything starts. `shardq doctor` prints every check (`run_checks`); `serve`
//! runs the one that otherwise fails opaquely inside a shard thread, the locked-memory
//! limit (`check_locked_memory`), before it spawns any executor.
//!
//! What it is not: a benchmark or a fixer. It reads the host (procfs, sysfs, rlimits,
//! statfs), binds and closes sockets, and in the data directory creates and removes one
//! probe file; a data directory that did not exist is created for the checks and removed
//! again. It never takes the broker's lock for longer than one `flock` call, never
//! writes a layout file and never touches a topic. Runs on the calling thread, with no
//! executor: it is what decides whether executors can start.
//!
//! Each check has a stable name (`Check::name`, what `--json` consumers key on), a
//! status, what was found, and for a warning or a failure what to do about it. A
//! failure means `serve` would not start, or would start and break a promise its
//! configuration makes (retention that the disk cannot hold, `connections_max` above the
//! open-files limit); a warning is a setting that costs latency or hides bugs.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::io;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::config::ServerConfig;
use crate::server::data_dir;

/// Added to `chunk_memory_bytes_per_shard_max` for each shard's glommio I/O memory: the
/// reads (fetches from disk, recovery) take their aligned buffers from the same arena.
pub const IO_MEMORY_READ_BYTES: usize = 16 << 20;

/// The io_uring rings glommio 0.9 creates per executor (main, latency, poll), and
/// registers the whole I/O memory with each (`glommio::sys::uring::Reactor::new`).
const GLOMMIO_RINGS_PER_EXECUTOR: u64 = 3;
/// glommio refuses to create an executor below this RLIMIT_MEMLOCK, whatever it needs.
const GLOMMIO_MEMLOCK_FLOOR_BYTES: u64 = 512 << 10;
/// glommio rounds the I/O memory up to whole pages and to at least this.
const GLOMMIO_IO_MEMORY_MIN_BYTES: u64 = 64 << 10;
/// Before Linux 5.12 the rings themselves (submission and completion queues, the
/// submission entries) were charged to RLIMIT_MEMLOCK too; since, to the memory cgroup.
/// At glommio's depth of 128: about 5 pages a ring; 64 KiB is that with room to spare
/// (an estimate: no kernel that old was at hand to measure).
const RING_LOCKED_BYTES_BEFORE_5_12: u64 = 64 << 10;
/// Linux capability number of CAP_IPC_LOCK: a process that has it is not charged.
const CAP_IPC_LOCK: u32 = 14;

/// The I/O memory each shard's executor asks glommio for.
pub fn io_memory_bytes(config: &ServerConfig) -> usize {
    config
        .chunk_memory_bytes_per_shard_max
        .saturating_add(IO_MEMORY_READ_BYTES)
}

/// Locked memory one shard needs: glommio registers its whole I/O memory with each of its
/// 3 rings, and io_uring charges every registration in full (pages are not shared
/// between rings in the accounting):
///
/// `3 * max(round_up(io_memory, 4 KiB), 64 KiB)`, plus `3 * 64 KiB` of rings before 5.12.
///
/// Measured on Linux 6.18 with the default config (io_memory = 64 MiB + 16 MiB =
/// 80 MiB): `VmPin` of a running broker is 245,760 kB with 1 shard and 491,520 kB with 2,
/// exactly 3 x 80 MiB per shard. Without CAP_IPC_LOCK (`setpriv --bounding-set
/// -ipc_lock`) and `prlimit --memlock` below that need, the registration fails and glommio
/// logs it and carries on with unregistered buffers (every I/O then pins its pages
/// itself); below 512 KiB it refuses to start the executor ("its thread ended before it
/// was ready"). The charge is per user, summed over every process of that user, so
/// another broker (or any io_uring user) under the same account needs its own headroom.
pub fn locked_memory_bytes_per_shard(config: &ServerConfig, kernel: Option<KernelVersion>) -> u64 {
    let io_memory = (io_memory_bytes(config) as u64)
        .next_multiple_of(4096)
        .max(GLOMMIO_IO_MEMORY_MIN_BYTES);
    let rings = match kernel {
        Some(version) if version < KernelVersion::new(5, 12) => {
            GLOMMIO_RINGS_PER_EXECUTOR * RING_LOCKED_BYTES_BEFORE_5_12
        }
        _ => 0,
    };
    // Saturating: `doctor` reports on configurations `validate` refuses too.
    GLOMMIO_RINGS_PER_EXECUTOR
        .saturating_mul(io_memory)
        .saturating_add(rings)
}

/// What RLIMIT_MEMLOCK means for this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockedMemoryLimit {
    Unlimited,
    /// The process has CAP_IPC_LOCK (root usually does): io_uring charges nothing.
    Exempt,
    /// The soft limit, in bytes.
    Bytes(u64),
}

impl LockedMemoryLimit {
    /// This process's.
    pub fn current() -> io::Result<LockedMemoryLimit> {
        if has_effective_capability(CAP_IPC_LOCK)? {
            return Ok(LockedMemoryLimit::Exempt);
        }
        let limit = soft_limit(libc::RLIMIT_MEMLOCK)?;
        Ok(match limit {
            None => LockedMemoryLimit::Unlimited,
            Some(bytes) => LockedMemoryLimit::Bytes(bytes),
        })
    }
}

/// The shards' locked memory does not fit under the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockedMemoryShortfall {
    pub limit_bytes: u64,
    pub needed_bytes: u64,
    pub shards: usize,
    pub io_memory_bytes: u64,
}

impl std::fmt::Display for LockedMemoryShortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let LockedMemoryShortfall {
            limit_bytes,
            needed_bytes,
            shards,
            io_memory_bytes,
        } = *self;
        write!(
            f,
            "the locked-memory limit (RLIMIT_MEMLOCK) is {limit_bytes} bytes ({} KiB) but {shards} shards need {needed_bytes} bytes ({} KiB): each registers its {io_memory_bytes} bytes of I/O memory (chunk_memory_bytes_per_shard_max + 16 MiB) with glommio's 3 io_uring rings",
            limit_bytes / 1024,
            needed_bytes.div_ceil(1024),
        )
    }
}

impl LockedMemoryShortfall {
    /// Whether glommio cannot start an executor at all under this limit. Above its floor
    /// it starts without registered buffers: every I/O then pins and unpins its pages
    /// itself, which costs CPU and latency on each write and read, but loses nothing.
    pub fn stops_the_shards(&self) -> bool {
        self.limit_bytes < GLOMMIO_MEMLOCK_FLOOR_BYTES
    }

    /// What to do about it.
    pub fn fix(&self) -> String {
        format!(
            "raise it: LimitMEMLOCK=infinity in the systemd unit, or `ulimit -l unlimited` (at least {} KiB) in the shell that starts shardq; or grant CAP_IPC_LOCK; or run fewer shards (--cores)",
            self.needed_bytes.div_ceil(1024)
        )
    }
}

/// Whether `shards` shards fit under `limit`.
pub fn check_locked_memory(
    config: &ServerConfig,
    shards: usize,
    limit: LockedMemoryLimit,
    kernel: Option<KernelVersion>,
) -> Result<(), LockedMemoryShortfall> {
    let LockedMemoryLimit::Bytes(limit_bytes) = limit else {
        return Ok(());
    };
    let needed_bytes = locked_memory_bytes_per_shard(config, kernel)
        .saturating_mul(shards as u64)
        .max(GLOMMIO_MEMLOCK_FLOOR_BYTES);
    if limit_bytes >= needed_bytes {
        return Ok(());
    }
    Err(LockedMemoryShortfall {
        limit_bytes,
        needed_bytes,
        shards,
        io_memory_bytes: io_memory_bytes(config) as u64,
    })
}

fn has_effective_capability(capability: u32) -> io::Result<bool> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let mask = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|value| u64::from_str_radix(value.trim(), 16).ok())
        .ok_or_else(|| io::Error::other("/proc/self/status has no readable CapEff line"))?;
    Ok(mask & (1 << capability) != 0)
}

/// The soft limit of `resource`; `None` when unlimited.
fn soft_limit(resource: libc::__rlimit_resource_t) -> io::Result<Option<u64>> {
    Ok(limits(resource)?.0)
}

/// A resource's soft and hard limits; `None` is unlimited.
fn limits(resource: libc::__rlimit_resource_t) -> io::Result<(Option<u64>, Option<u64>)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, exclusively borrowed rlimit for the call to fill.
    if unsafe { libc::getrlimit(resource, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let finite = |value: libc::rlim_t| (value != libc::RLIM_INFINITY).then_some(value);
    Ok((finite(limit.rlim_cur), finite(limit.rlim_max)))
}

/// A kernel release's first two numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelVersion {
    pub major: u32,
    pub minor: u32,
}

impl KernelVersion {
    pub const fn new(major: u32, minor: u32) -> KernelVersion {
        KernelVersion { major, minor }
    }

    /// From a release string like `6.8.0-45-generic`.
    pub fn parse(release: &str) -> Option<KernelVersion> {
        let mut numbers = release.split(['.', '-', '+']);
        let major = numbers.next()?.parse().ok()?;
        let minor = numbers.next()?.parse().ok()?;
        Some(KernelVersion { major, minor })
    }

    /// The running kernel's, from uname.
    pub fn running() -> Option<KernelVersion> {
        KernelVersion::parse(&kernel_release().ok()?)
    }
}

impl std::fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

fn kernel_release() -> io::Result<String> {
    // SAFETY: utsname is plain data; uname fills it.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is a valid, exclusively borrowed utsname.
    if unsafe { libc::uname(&mut name) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: uname NUL-terminates `release` inside its fixed-size array.
    let release = unsafe { std::ffi::CStr::from_ptr(name.release.as_ptr()) };
    Ok(release.to_string_lossy().into_owned())
}

/// The oldest kernel glommio 0.9 runs on (the io_uring operations it submits).
const KERNEL_MIN: KernelVersion = KernelVersion::new(5, 8);
/// vm.swappiness above this warns: a shard's pages swapped out stall every connection on
/// that shard while they come back.
const SWAPPINESS_MAX: u32 = 10;
/// Descriptors a broker holds besides connections and segment files. Measured on Linux
/// 6.18 (`ls /proc/PID/fd` of an idle broker with no topics and metrics on): 18 with 1
/// shard, 29 with 2: 11 per shard (3 io_uring rings, an eventfd, the shared and own
/// listeners, stop and metrics links, mesh sockets) and 7 for the process (stdio, the
/// lock file, the metrics listener).
const DESCRIPTORS_PER_SHARD: u64 = 11;
const DESCRIPTORS_PER_PROCESS: u64 = 7;
/// Each segment holds its `.log` and `.index` open while its partition is open.
const DESCRIPTORS_PER_SEGMENT: u64 = 2;
/// With O_DSYNC rounds (`segment_dsync_write_bytes_max` above 0) each partition holds a
/// second descriptor of the segment it writes.
const DESCRIPTORS_PER_PARTITION_DSYNC: u64 = 1;

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Stable: `--json` consumers and docs/operations.md key on it.
    pub name: &'static str,
    pub status: Status,
    /// What was found, with the numbers.
    pub found: String,
    /// What to do; `None` when it passed.
    pub action: Option<String>,
}

impl Check {
    fn pass(name: &'static str, found: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Pass,
            found: found.into(),
            action: None,
        }
    }

    fn warn(name: &'static str, found: impl Into<String>, action: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Warn,
            found: found.into(),
            action: Some(action.into()),
        }
    }

    fn fail(name: &'static str, found: impl Into<String>, action: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Fail,
            found: found.into(),
            action: Some(action.into()),
        }
    }
}

/// Every check's name, in the order `run_checks` reports them.
pub const CHECK_NAMES: [&str; 18] = [
    "config",
    "kernel",
    "io_uring",
    "memlock",
    "cpus",
    "data_dir",
    "data_dir_lock",
    "filesystem",
    "direct_io",
    "disk_space",
    "open_files",
    "transparent_hugepages",
    "swappiness",
    "cpu_governor",
    "clocksource",
    "somaxconn",
    "listen",
    "metrics_listen",
];

/// Runs every check against `config` on this host, in the order of `CHECK_NAMES`.
pub fn run_checks(config: &ServerConfig) -> Vec<Check> {
    let mut checks = Vec::with_capacity(CHECK_NAMES.len() + 1);
    checks.push(match config.validate() {
        Ok(()) => Check::pass("config", "valid"),
        Err(error) => Check::fail("config", error.to_string(), "fix the setting named"),
    });
    let kernel = KernelVersion::running();
    checks.push(check_kernel(kernel));
    checks.push(check_io_uring());
    let online = online_cpus();
    let placement = online
        .as_ref()
        .map_err(|error| io::Error::new(error.kind(), error.to_string()))
        .map(|online| shard_cpus(config, online));
    // What the other checks size for: the shards serve would run, or as many as asked.
    let shard_cpu_list: Vec<usize> = match &placement {
        Ok(Ok(cpus)) => cpus.clone(),
        _ => match &config.cpus {
            Some(list) => list.cpus().to_vec(),
            None => (0..config.cores.unwrap_or(1)).collect(),
        },
    };
    let shards = shard_cpu_list.len();
    checks.push(match LockedMemoryLimit::current() {
        Ok(limit) => memlock_check(config, shards, limit, kernel),
        Err(error) => Check::fail(
            "memlock",
            format!("cannot read RLIMIT_MEMLOCK or capabilities: {error}"),
            "check /proc is mounted",
        ),
    });
    checks.push(check_cpus(config, placement));
    let directory = prepare_data_dir(&config.data_dir);
    checks.push(directory.check.clone());
    let usable = directory.usable.then_some(directory.path.as_path());
    checks.push(check_lock(usable));
    checks.push(check_filesystem(usable));
    checks.push(check_direct_io(usable));
    let state = usable.map(DataDirState::read);
    checks.push(check_disk_space(config, usable, state.as_ref()));
    checks.push(check_open_files(config, shards, state.as_ref()));
    directory.remove_created();
    checks.push(check_transparent_hugepages(&read_text(
        "/sys/kernel/mm/transparent_hugepage/enabled",
    )));
    checks.push(check_swappiness(&read_text("/proc/sys/vm/swappiness")));
    checks.push(check_cpu_governor(&shard_cpu_list));
    checks.push(check_clocksource(&read_text(
        "/sys/devices/system/clocksource/clocksource0/current_clocksource",
    )));
    checks.push(check_somaxconn(
        &read_text("/proc/sys/net/core/somaxconn"),
        config.listen_backlog,
    ));
    checks.push(check_listen(config.listen, shards));
    checks.push(check_metrics_listen(config.metrics_listen));
    checks
}

fn read_text(path: &str) -> io::Result<String> {
    std::fs::read_to_string(path).map(|text| text.trim().to_owned())
}

fn memlock_check(
    config: &ServerConfig,
    shards: usize,
    limit: LockedMemoryLimit,
    kernel: Option<KernelVersion>,
) -> Check {
    let needed = locked_memory_bytes_per_shard(config, kernel).saturating_mul(shards as u64);
    match check_locked_memory(config, shards, limit, kernel) {
        Err(shortfall) if shortfall.stops_the_shards() => {
            Check::fail("memlock", shortfall.to_string(), shortfall.fix())
        }
        Err(shortfall) => Check::warn(
            "memlock",
            format!(
                "{shortfall}; the broker starts, but without registered I/O buffers (every write and read pins its pages itself: slower)"
            ),
            shortfall.fix(),
        ),
        Ok(()) => Check::pass(
            "memlock",
            match limit {
                LockedMemoryLimit::Unlimited => {
                    format!("unlimited; {shards} shards need {} KiB", needed / 1024)
                }
                LockedMemoryLimit::Exempt => format!(
                    "CAP_IPC_LOCK held: the limit does not apply ({shards} shards lock {} KiB)",
                    needed / 1024
                ),
                LockedMemoryLimit::Bytes(bytes) => format!(
                    "{} KiB; {shards} shards need {} KiB",
                    bytes / 1024,
                    needed / 1024
                ),
            },
        ),
    }
}

fn check_kernel(kernel: Option<KernelVersion>) -> Check {
    let release = kernel_release().unwrap_or_else(|error| format!("unknown ({error})"));
    match kernel {
        Some(version) if version >= KERNEL_MIN => Check::pass("kernel", format!("Linux {release}")),
        Some(_) => Check::fail(
            "kernel",
            format!("Linux {release}, older than {KERNEL_MIN}, the oldest glommio runs on"),
            format!("upgrade the kernel to {KERNEL_MIN} or later"),
        ),
        None => Check::warn(
            "kernel",
            format!("cannot read the kernel version from {release:?}"),
            format!("make sure the kernel is {KERNEL_MIN} or later"),
        ),
    }
}

/// Creates an io_uring and closes it: the only sure way to know the broker can.
fn probe_io_uring() -> io::Result<()> {
    // struct io_uring_params is 120 bytes; zeroed asks for defaults.
    let mut params = [0u32; 30];
    // SAFETY: io_uring_setup reads and writes `params`, a valid 120-byte buffer it owns
    // for the call.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned to us and is closed once.
    unsafe { libc::close(fd as i32) };
    Ok(())
}

fn check_io_uring() -> Check {
    let disabled = read_text("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .and_then(|text| text.parse::<u32>().ok());
    let setting = match disabled {
        Some(value) => format!("kernel.io_uring_disabled = {value}"),
        None => "no kernel.io_uring_disabled (older kernel)".to_owned(),
    };
    match (probe_io_uring(), disabled) {
        (Ok(()), Some(1)) => Check::pass(
            "io_uring",
            format!("io_uring_setup works; {setting} (this user is in kernel.io_uring_group)"),
        ),
        (Ok(()), _) => Check::pass("io_uring", format!("io_uring_setup works; {setting}")),
        (Err(error), Some(2)) => Check::fail(
            "io_uring",
            format!("io_uring_setup: {error}; {setting}: io_uring is off for everyone"),
            "sysctl kernel.io_uring_disabled=0 (and in /etc/sysctl.d)",
        ),
        (Err(error), Some(1)) => Check::fail(
            "io_uring",
            format!("io_uring_setup: {error}; {setting}: only members of kernel.io_uring_group may use it"),
            "sysctl kernel.io_uring_disabled=0, or add the broker's user to the group kernel.io_uring_group names",
        ),
        (Err(error), _) if error.raw_os_error() == Some(libc::ENOSYS) => Check::fail(
            "io_uring",
            format!("io_uring_setup: {error}: the kernel has no io_uring"),
            "use a kernel built with CONFIG_IO_URING",
        ),
        (Err(error), _) => Check::fail(
            "io_uring",
            format!("io_uring_setup: {error}; {setting}"),
            "a seccomp filter or container runtime may block io_uring: allow io_uring_setup, io_uring_enter and io_uring_register",
        ),
    }
}

/// Online CPUs in the order shards use them (ascending: shard k on the k-th).
/// Why the shards cannot be placed as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlacementError {
    /// `cpus` names a CPU that is not online.
    Offline { cpu: usize, online: Vec<usize> },
    /// `cores` asks for more shards than there are online CPUs (or than a shard id holds).
    TooMany { requested: usize, available: usize },
}

/// The CPU each shard runs on, shard k on the k-th: the operator's list (`cpus`), else
/// the lowest `cores` online CPUs (every online CPU without `cores`). `online` is sorted.
/// `serve` places its executors with it and `doctor` checks the same CPUs.
pub fn shard_cpus(config: &ServerConfig, online: &[usize]) -> Result<Vec<usize>, PlacementError> {
    match &config.cpus {
        Some(list) => {
            if let Some(&cpu) = list.cpus().iter().find(|cpu| !online.contains(cpu)) {
                return Err(PlacementError::Offline {
                    cpu,
                    online: online.to_vec(),
                });
            }
            Ok(list.cpus().to_vec())
        }
        None => {
            let count = config.cores.unwrap_or(online.len());
            if count > online.len() || count > usize::from(u16::MAX) {
                return Err(PlacementError::TooMany {
                    requested: count,
                    available: online.len(),
                });
            }
            Ok(online[..count].to_vec())
        }
    }
}

/// Online CPUs, sorted.
pub fn online_cpus() -> io::Result<Vec<usize>> {
    let mut online: Vec<usize> = glommio::CpuSet::online()
        .map_err(|error| io::Error::other(error.to_string()))?
        .into_iter()
        .map(|location| location.cpu)
        .collect();
    online.sort_unstable();
    online.dedup();
    Ok(online)
}

fn allowed_cpus() -> io::Result<BTreeSet<usize>> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let result =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE and `set` is initialised.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

fn check_cpus(
    config: &ServerConfig,
    placement: io::Result<Result<Vec<usize>, PlacementError>>,
) -> Check {
    let used = match placement {
        Ok(Ok(used)) => used,
        Ok(Err(PlacementError::Offline { cpu, online })) => {
            return Check::fail(
                "cpus",
                format!(
                    "cpus names CPU {cpu}, which is not online (online: {})",
                    crate::config::cpu_list_text(&online)
                ),
                "name online CPUs in cpus (--cpus)",
            )
        }
        Ok(Err(PlacementError::TooMany {
            requested,
            available,
        })) => {
            return Check::fail(
                "cpus",
                format!(
                    "{requested} shards asked for (--cores) but only {available} CPUs are online"
                ),
                format!("use --cores N with N <= {available}"),
            )
        }
        Err(error) => {
            return Check::fail(
                "cpus",
                format!("cannot list online CPUs: {error}"),
                "check /sys/devices/system/cpu is readable",
            )
        }
    };
    let shards = used.len();
    let online_count = online_cpus().map_or(0, |online| online.len());

    match allowed_cpus() {
        Ok(allowed) => {
            let outside: Vec<usize> = used
                .iter()
                .copied()
                .filter(|cpu| !allowed.contains(cpu))
                .collect();
            if !outside.is_empty() {
                return Check::fail(
                    "cpus",
                    format!(
                        "shards would pin to CPUs {outside:?}, outside this process's CPU affinity {:?} (taskset, cgroup cpuset)",
                        allowed.iter().collect::<Vec<_>>()
                    ),
                    "allow those CPUs (taskset, CPUAffinity=, the cgroup's cpuset) or run fewer shards (--cores)",
                );
            }
        }
        Err(error) => {
            return Check::warn(
                "cpus",
                format!("cannot read this process's CPU affinity: {error}"),
                "make sure the shards' CPUs are allowed",
            )
        }
    }
    let chosen = match (&config.cpus, config.cores) {
        (Some(_), _) => "cpus",
        (None, Some(_)) => "--cores",
        (None, None) => "one per online CPU",
    };
    Check::pass(
        "cpus",
        format!("{shards} shards ({chosen}) on online CPUs {used:?} of {online_count}"),
    )
}

/// The data directory as the checks found (or made) it.
struct PreparedDirectory {
    path: PathBuf,
    check: Check,
    /// It exists, is a directory and takes new files.
    usable: bool,
    /// Directories the checks created, deepest first: removed again at the end.
    created: Vec<PathBuf>,
}

impl PreparedDirectory {
    fn remove_created(&self) {
        for directory in &self.created {
            let _ = std::fs::remove_dir(directory);
        }
    }
}

fn prepare_data_dir(path: &Path) -> PreparedDirectory {
    let mut prepared = PreparedDirectory {
        path: path.to_path_buf(),
        check: Check::pass("data_dir", ""),
        usable: false,
        created: Vec::new(),
    };
    let fail = |found: String, action: &str| Check::fail("data_dir", found, action);
    let existed = match std::fs::metadata(path) {
        Ok(metadata) if metadata.is_dir() => true,
        Ok(_) => {
            prepared.check = fail(
                format!("{} exists and is not a directory", path.display()),
                "point --data-dir at a directory, or move the file away",
            );
            return prepared;
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => false,
        Err(error) => {
            prepared.check = fail(
                format!("{}: {error}", path.display()),
                "check the permissions of the path's directories",
            );
            return prepared;
        }
    };
    if !existed {
        // Created the way `serve` creates it (0700, parents too), to check the rest in
        // it; removed again at the end. Missing ancestors are remembered deepest first.
        let mut missing = Vec::new();
        let mut ancestor = Some(path);
        while let Some(directory) = ancestor {
            if directory.as_os_str().is_empty() || directory.exists() {
                break;
            }
            missing.push(directory.to_path_buf());
            ancestor = directory.parent();
        }
        if let Err(error) = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
        {
            prepared.check = fail(
                format!(
                    "{} does not exist and cannot be created: {error}",
                    path.display()
                ),
                "create it (owned by the broker's user) or choose another --data-dir",
            );
            return prepared;
        }
        prepared.created = missing;
    }
    if let Ok(canonical) = std::fs::canonicalize(path) {
        prepared.path = canonical;
    }
    let probe = prepared
        .path
        .join(format!(".doctor-write-probe-{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&probe);
    match written {
        Ok(file) => {
            drop(file);
            let _ = std::fs::remove_file(&probe);
        }
        Err(error) => {
            prepared.check = fail(
                format!("{} is not writable: {error}", prepared.path.display()),
                "give the broker's user write access to it, or choose another --data-dir",
            );
            prepared.remove_created();
            prepared.created.clear();
            return prepared;
        }
    }
    prepared.usable = true;
    prepared.check = Check::pass(
        "data_dir",
        if existed {
            format!("{} exists and is writable", prepared.path.display())
        } else {
            format!(
                "{} does not exist yet; it can be created and written (serve creates it)",
                prepared.path.display()
            )
        },
    );
    prepared
}

fn not_checked(name: &'static str) -> Check {
    Check::warn(
        name,
        "not checked: the data directory is not usable",
        "fix data_dir first",
    )
}

/// A running broker holds `flock` on `<data-dir>/lock`. Busy is a failure: `serve` with
/// this configuration would refuse to start, which is what doctor answers. Run against a
/// running broker's own configuration it fails here (and on its ports), as it should.
fn check_lock(directory: Option<&Path>) -> Check {
    let Some(directory) = directory else {
        return not_checked("data_dir_lock");
    };
    let path = directory.join(data_dir::LOCK_FILE);
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Check::pass("data_dir_lock", "no lock file: no broker has used it yet")
        }
        Err(error) => {
            return Check::fail(
                "data_dir_lock",
                format!("opening {}: {error}", path.display()),
                "give the broker's user access to the lock file",
            )
        }
    };
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this function owns; closing it releases the lock.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if locked == 0 {
        return Check::pass("data_dir_lock", "not in use by another broker");
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() != Some(libc::EWOULDBLOCK) {
        return Check::fail(
            "data_dir_lock",
            format!("locking {}: {error}", path.display()),
            "the filesystem must support flock",
        );
    }
    let holder = std::fs::read_to_string(&path)
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok())
        .map_or_else(|| "pid unknown".to_owned(), |pid| format!("pid {pid}"));
    Check::fail(
        "data_dir_lock",
        format!("in use by another shardq ({holder}): serve would refuse to start"),
        "stop that broker first, or choose another --data-dir (expected when checking a running broker's own configuration)",
    )
}

/// statfs magic numbers (linux/magic.h) of the filesystems worth naming.
const FILESYSTEMS: [(i64, &str); 12] = [
    (0xEF53, "ext4"),
    (0x5846_5342, "xfs"),
    (0x0102_1994, "tmpfs"),
    (0x794C_7630, "overlayfs"),
    (0x9123_683E, "btrfs"),
    (0x2FC1_2FC1, "zfs"),
    (0x6969, "nfs"),
    (0xFF53_4D42, "cifs"),
    (0x6573_5546, "fuse"),
    (0x0100_3001, "9p"),
    (0x6264_6D66, "bcachefs"),
    (0xF2F5_2010, "f2fs"),
];

fn filesystem_name(magic: i64) -> Option<&'static str> {
    FILESYSTEMS
        .iter()
        .find(|(known, _)| *known == magic)
        .map(|(_, name)| *name)
}

fn statfs_type(path: &Path) -> io::Result<i64> {
    let path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: statfs is plain data; statfs() fills it.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stat` a valid out pointer.
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between architectures.
    Ok(stat.f_type as i64)
}

/// ext4 and xfs are what the storage code is tested on; tmpfs and overlay take O_DIRECT
/// on new kernels but it means nothing there (tmpfs is memory; overlay's upper layer
/// decides) and hides alignment bugs; anything else is untested.
fn classify_filesystem(magic: i64) -> (Status, String, Option<&'static str>) {
    let name = filesystem_name(magic);
    let label = name.map_or_else(|| format!("filesystem type {magic:#x}"), str::to_owned);
    match name {
        Some("ext4") | Some("xfs") => (Status::Pass, label, None),
        Some("tmpfs") => (
            Status::Warn,
            format!("{label}: memory, not disk; O_DIRECT and fdatasync promise nothing there and nothing survives a reboot"),
            Some("put the data directory on ext4 or xfs on a local disk"),
        ),
        Some("overlayfs") => (
            Status::Warn,
            format!("{label} (a container's root?): O_DIRECT goes to whatever the upper layer is, or is refused"),
            Some("mount a volume (ext4 or xfs) for the data directory"),
        ),
        _ => (
            Status::Warn,
            format!("{label}: not a filesystem shardq is tested on"),
            Some("prefer ext4 or xfs on a local disk"),
        ),
    }
}

fn check_filesystem(directory: Option<&Path>) -> Check {
    let Some(directory) = directory else {
        return not_checked("filesystem");
    };
    match statfs_type(directory) {
        Err(error) => Check::fail(
            "filesystem",
            format!("statfs {}: {error}", directory.display()),
            "check the data directory",
        ),
        Ok(magic) => match classify_filesystem(magic) {
            (Status::Pass, found, _) => Check::pass("filesystem", found),
            (status, found, action) => Check {
                name: "filesystem",
                status,
                found,
                action: action.map(str::to_owned),
            },
        },
    }
}

/// A 4 KiB block at a 4 KiB-aligned address, as O_DIRECT needs it.
struct AlignedBlock(*mut u8);

const PROBE_BLOCK_BYTES: usize = 4096;

impl AlignedBlock {
    fn layout() -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(PROBE_BLOCK_BYTES, PROBE_BLOCK_BYTES)
            .expect("4 KiB at 4 KiB alignment is a valid layout")
    }

    fn new() -> AlignedBlock {
        // SAFETY: the layout has a non-zero size.
        let pointer = unsafe { std::alloc::alloc_zeroed(Self::layout()) };
        assert!(!pointer.is_null(), "allocating 4 KiB failed");
        AlignedBlock(pointer)
    }
}

impl Drop for AlignedBlock {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with the same layout, freed once.
        unsafe { std::alloc::dealloc(self.0, Self::layout()) };
    }
}

/// Writes one aligned 4 KiB block with O_DIRECT and fdatasyncs it, as every segment
/// write does; the probe file is removed whatever happens.
fn probe_direct_io(directory: &Path) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let path = directory.join(format!(".doctor-direct-io-probe-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .map_err(|error| format!("opening {} with O_DIRECT: {error}", path.display()))?;
    let outcome = (|| {
        let block = AlignedBlock::new();
        // SAFETY: `block` is a live 4 KiB allocation for the duration of the call.
        let written = unsafe {
            libc::pwrite(
                file.as_raw_fd(),
                block.0.cast::<libc::c_void>(),
                PROBE_BLOCK_BYTES,
                0,
            )
        };
        if written < 0 {
            return Err(format!(
                "O_DIRECT write of 4 KiB at offset 0: {}",
                io::Error::last_os_error()
            ));
        }
        if written as usize != PROBE_BLOCK_BYTES {
            return Err(format!("O_DIRECT write of 4 KiB wrote {written} bytes"));
        }
        file.sync_data()
            .map_err(|error| format!("fdatasync after an O_DIRECT write: {error}"))
    })();
    drop(file);
    let _ = std::fs::remove_file(&path);
    outcome
}

fn check_direct_io(directory: Option<&Path>) -> Check {
    let Some(directory) = directory else {
        return not_checked("direct_io");
    };
    match probe_direct_io(directory) {
        Ok(()) => Check::pass(
            "direct_io",
            "an aligned 4 KiB O_DIRECT write and fdatasync work",
        ),
        Err(found) => Check::fail(
            "direct_io",
            found,
            "put the data directory on a filesystem that supports O_DIRECT (ext4, xfs)",
        ),
    }
}

/// One topic already in the data directory.
struct TopicOnDisk {
    name: String,
    partitions: u32,
    retention_bytes_max: u64,
    /// Disk the topic's files take now (allocated blocks).
    used_bytes: u64,
    /// `.log` and `.index` files: each is held open while its partition is.
    segment_files: u64,
}

/// What the data directory already holds, read with the broker's own catalog reader.
struct DataDirState {
    topics: Result<Vec<TopicOnDisk>, String>,
    free_bytes: Result<u64, String>,
}

impl DataDirState {
    fn read(directory: &Path) -> DataDirState {
        // Layout 1 keeps topics under topics/; a directory from before it holds them at
        // the top (serve moves them; reading them where they are is enough here).
        let topics_dir = data_dir::topics_directory(directory);
        let topics_dir = if topics_dir.is_dir() {
            topics_dir
        } else {
            directory.to_path_buf()
        };
        let topics =
            crate::shard::read_topic_catalog(&topics_dir, crate::shard::SkippedDirectories::Ignore)
                .map_err(|error| format!("reading topic metadata: {error}"))
                .map(|catalog| {
                    catalog
                        .into_iter()
                        .map(|(name, topic)| {
                            let (used_bytes, segment_files) = disk_usage(&topics_dir.join(&name));
                            TopicOnDisk {
                                name,
                                partitions: topic.partitions,
                                retention_bytes_max: topic.retention.bytes_max,
                                used_bytes,
                                segment_files,
                            }
                        })
                        .collect()
                });
        DataDirState {
            topics,
            free_bytes: free_bytes(directory),
        }
    }
}

/// Allocated bytes under `directory` and its segment files (`.log`, `.index`).
fn disk_usage(directory: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut bytes = 0u64;
    let mut segment_files = 0u64;
    let mut pending = vec![directory.to_path_buf()];
    while let Some(directory) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&directory) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(metadata) = entry.metadata() else {
                continue;
            };
            if metadata.is_dir() {
                pending.push(entry.path());
                continue;
            }
            bytes = bytes.saturating_add(metadata.blocks().saturating_mul(512));
            let path = entry.path();
            let extension = path.extension().and_then(|extension| extension.to_str());
            let is_spare = path.file_stem().is_some_and(|stem| stem == "spare");
            if matches!(extension, Some("log") | Some("index")) && !is_spare {
                segment_files += 1;
            }
        }
    }
    (bytes, segment_files)
}

fn free_bytes(directory: &Path) -> Result<u64, String> {
    let path = CString::new(directory.as_os_str().as_bytes()).map_err(|error| error.to_string())?;
    // SAFETY: statvfs is plain data; statvfs() fills it.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stat` a valid out pointer.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(format!(
            "statvfs {}: {}",
            directory.display(),
            io::Error::last_os_error()
        ));
    }
    #[allow(clippy::unnecessary_cast)] // the field widths differ between architectures.
    Ok((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

fn mebibytes(bytes: u64) -> String {
    format!("{} MiB", bytes / (1 << 20))
}

fn check_disk_space(
    config: &ServerConfig,
    directory: Option<&Path>,
    state: Option<&DataDirState>,
) -> Check {
    let (Some(_), Some(state)) = (directory, state) else {
        return not_checked("disk_space");
    };
    let free = match &state.free_bytes {
        Ok(free) => *free,
        Err(error) => return Check::fail("disk_space", error.clone(), "check the data directory"),
    };
    let topics = match &state.topics {
        Ok(topics) => topics,
        Err(error) => {
            return Check::fail(
                "disk_space",
                error.clone(),
                "fix or remove the unreadable topic metadata (serve would refuse it too)",
            )
        }
    };
    if topics.is_empty() {
        return Check::pass(
            "disk_space",
            format!(
                "{} free; no topics yet (each partition will take up to its retention bytes plus one {} segment)",
                mebibytes(free),
                mebibytes(config.segment_size_bytes)
            ),
        );
    }
    // A partition keeps at most its retention bytes of older segments plus the segment
    // being written (retention never deletes that one).
    let mut bounded_bytes = 0u64;
    let mut growth_bytes = 0u64;
    let mut unlimited = Vec::new();
    for topic in topics {
        if topic.retention_bytes_max == 0 {
            unlimited.push(topic.name.as_str());
            continue;
        }
        let bound = u64::from(topic.partitions).saturating_mul(
            topic
                .retention_bytes_max
                .saturating_add(config.segment_size_bytes),
        );
        bounded_bytes = bounded_bytes.saturating_add(bound);
        growth_bytes = growth_bytes.saturating_add(bound.saturating_sub(topic.used_bytes));
    }
    let summary = format!(
        "{} topics; those with a retention bytes limit may take {} (partitions x (retention + one {} segment)), {} more than now; {} free",
        topics.len(),
        mebibytes(bounded_bytes),
        mebibytes(config.segment_size_bytes),
        mebibytes(growth_bytes),
        mebibytes(free)
    );
    if growth_bytes > free {
        return Check::fail(
            "disk_space",
            summary,
            "free disk space, lower retention (shardq topic alter NAME --retention-bytes B) or move the data directory to a larger disk",
        );
    }
    if !unlimited.is_empty() {
        return Check::warn(
            "disk_space",
            format!(
                "{summary}; no retention bytes limit on {}: only the disk bounds them",
                unlimited.join(", ")
            ),
            "set one (shardq topic alter NAME --retention-bytes B) or watch the free space (appends are refused with storage_full when the disk is full)",
        );
    }
    Check::pass("disk_space", summary)
}

fn check_open_files(config: &ServerConfig, shards: usize, state: Option<&DataDirState>) -> Check {
    // `serve` raises its soft limit to the hard one at start (`raise_open_files_limit`),
    // so the hard limit is what the broker gets.
    let limit = match limits(libc::RLIMIT_NOFILE) {
        Ok((_, hard)) => hard,
        Err(error) => {
            return Check::fail(
                "open_files",
                format!("getrlimit(RLIMIT_NOFILE): {error}"),
                "check the process limits",
            )
        }
    };
    let connections = u64::from(config.connections_max)
        .min(u64::from(config.connections_per_shard_max).saturating_mul(shards as u64));
    // Each partition holds its segments' files open: as many as are on disk now, and at
    // least the one segment it writes.
    let (partitions, segment_descriptors) = match state.map(|state| &state.topics) {
        Some(Ok(topics)) => topics
            .iter()
            .fold((0u64, 0u64), |(partitions, files), topic| {
                let at_least = u64::from(topic.partitions) * DESCRIPTORS_PER_SEGMENT;
                (
                    partitions + u64::from(topic.partitions),
                    files + topic.segment_files.max(at_least),
                )
            }),
        _ => (0, 0),
    };
    // Not needed to recover or serve (a segment whose O_DSYNC open fails fdatasyncs its
    // rounds): they count toward the warning below, not toward the failure.
    let dsync_descriptors = if config.segment_dsync_write_bytes_max > 0 {
        partitions * DESCRIPTORS_PER_PARTITION_DSYNC
    } else {
        0
    };
    let fixed = DESCRIPTORS_PER_PROCESS + DESCRIPTORS_PER_SHARD * shards as u64;
    let needed = connections + segment_descriptors + dsync_descriptors + fixed;
    let found = format!(
        "{} (serve raises its soft limit to it); needed {needed}: {connections} connections (connections_max, connections_per_shard_max x {shards} shards) + {segment_descriptors} segment files of {partitions} partitions + {dsync_descriptors} O_DSYNC segment handles (one a partition, segment_dsync_write_bytes_max) + {fixed} for the shards and the process",
        limit.map_or_else(|| "hard limit unlimited".to_owned(), |limit| format!("hard limit {limit}"))
    );
    let fix = format!(
        "raise it to at least {needed}: LimitNOFILE= in the systemd unit (the shipped unit has 1048576), or `ulimit -Hn {needed}` as root before starting; or lower connections_max"
    );
    match limit {
        // The partitions alone cannot open their files: recovery fails.
        Some(limit) if limit < segment_descriptors + fixed => Check::fail("open_files", found, fix),
        // It serves, but accepts fail (EMFILE) before connections_max is reached.
        Some(limit) if limit < needed => Check::warn(
            "open_files",
            format!(
                "{found}: accepts fail past about {} connections",
                limit - segment_descriptors - fixed
            ),
            fix,
        ),
        _ => Check::pass("open_files", found),
    }
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit, as servers that hold a
/// descriptor per connection do (Go's runtime does it for every program): the soft
/// limit's usual 1024 is a guard for programs that use select(2), which shardq does not.
/// Returns the soft limit before and after; `None` is unlimited.
pub fn raise_open_files_limit() -> io::Result<(Option<u64>, Option<u64>)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, exclusively borrowed rlimit for the call to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let finite = |value: libc::rlim_t| (value != libc::RLIM_INFINITY).then_some(value);
    let before = finite(limit.rlim_cur);
    if limit.rlim_cur == limit.rlim_max {
        return Ok((before, before));
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: `limit` is a valid rlimit; raising the soft limit up to the hard one needs
    // no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((before, finite(limit.rlim_max)))
}

/// The chosen value of a sysfs setting like `always [madvise] never`.
fn bracketed(text: &str) -> Option<&str> {
    let start = text.find('[')?;
    let end = text[start..].find(']')? + start;
    Some(&text[start + 1..end])
}

fn check_transparent_hugepages(setting: &io::Result<String>) -> Check {
    let name = "transparent_hugepages";
    match setting.as_ref().map(|text| bracketed(text)) {
        Err(_) => Check::pass(name, "not available (kernel without transparent hugepages)"),
        Ok(Some("always")) => Check::warn(
            name,
            "always: khugepaged compaction and huge-page faults stall shard threads at random",
            "echo madvise > /sys/kernel/mm/transparent_hugepage/enabled (and on the kernel command line: transparent_hugepage=madvise)",
        ),
        Ok(Some(mode)) => Check::pass(name, mode.to_owned()),
        Ok(None) => Check::warn(
            name,
            format!("unreadable setting {:?}", setting.as_deref().unwrap_or("")),
            "check /sys/kernel/mm/transparent_hugepage/enabled",
        ),
    }
}

fn check_swappiness(setting: &io::Result<String>) -> Check {
    match setting.as_ref().map(|text| text.parse::<u32>()) {
        Ok(Ok(value)) if value <= SWAPPINESS_MAX => {
            Check::pass("swappiness", format!("vm.swappiness = {value}"))
        }
        Ok(Ok(value)) => Check::warn(
            "swappiness",
            format!("vm.swappiness = {value} (above {SWAPPINESS_MAX}): the kernel swaps shard memory out under page-cache pressure, and the next request on that shard waits for it"),
            "sysctl vm.swappiness=1 (and in /etc/sysctl.d)",
        ),
        _ => Check::pass("swappiness", "not available (no /proc/sys/vm/swappiness)"),
    }
}

fn check_cpu_governor(shard_cpus: &[usize]) -> Check {
    let mut governors: Vec<(usize, String)> = Vec::new();
    for cpu in shard_cpus {
        let path = format!("/sys/devices/system/cpu/cpu{cpu}/cpufreq/scaling_governor");
        if let Ok(governor) = read_text(&path) {
            governors.push((*cpu, governor));
        }
    }
    if governors.is_empty() {
        return Check::pass(
            "cpu_governor",
            "no cpufreq governor (usual on virtual machines, or the firmware manages frequency): nothing to set",
        );
    }
    let slow: Vec<String> = governors
        .iter()
        .filter(|(_, governor)| governor != "performance")
        .map(|(cpu, governor)| format!("cpu{cpu}: {governor}"))
        .collect();
    if slow.is_empty() {
        Check::pass(
            "cpu_governor",
            format!("performance on the shards' {} CPUs", governors.len()),
        )
    } else {
        Check::warn(
            "cpu_governor",
            format!(
                "{}: an idle shard's CPU clocks down and the next request pays for the ramp",
                slow.join(", ")
            ),
            "cpupower frequency-set -g performance (or the tuned profile latency-performance)",
        )
    }
}

fn check_clocksource(setting: &io::Result<String>) -> Check {
    match setting {
        Ok(source) if source == "tsc" => Check::pass("clocksource", "tsc"),
        Ok(source) => Check::warn(
            "clocksource",
            format!("{source}: reading the clock costs a system call or more (every timestamp, timer and latency sample)"),
            "use tsc if the CPU's is stable (dmesg says why the kernel rejected it; clocksource=tsc tsc=reliable on the kernel command line)",
        ),
        Err(error) => Check::warn(
            "clocksource",
            format!("cannot read the current clocksource: {error}"),
            "check /sys/devices/system/clocksource/clocksource0/current_clocksource",
        ),
    }
}

/// net.core.somaxconn below the broker's `listen_backlog` warns: the kernel cuts the
/// backlog down to it, and connection bursts get dropped.
fn check_somaxconn(setting: &io::Result<String>, listen_backlog: u32) -> Check {
    match setting.as_ref().map(|text| text.parse::<u32>()) {
        Ok(Ok(value)) if value >= listen_backlog => Check::pass(
            "somaxconn",
            format!("net.core.somaxconn = {value}, at least listen_backlog = {listen_backlog}"),
        ),
        Ok(Ok(value)) => Check::warn(
            "somaxconn",
            format!("net.core.somaxconn = {value}: the kernel cuts the broker's listen backlog (listen_backlog = {listen_backlog}) to it, and connection bursts are dropped"),
            format!("sysctl net.core.somaxconn={} (tuning/sysctl.d/60-shardq.conf sets 4096), or lower listen_backlog", listen_backlog.max(4096)),
        ),
        _ => Check::warn(
            "somaxconn",
            "cannot read net.core.somaxconn",
            "check /proc/sys/net/core/somaxconn",
        ),
    }
}

/// Binds `address` the way start-up's probe does (SO_REUSEADDR, no SO_REUSEPORT: any
/// other socket on it makes this fail) and closes it at once.
fn probe_bind(address: SocketAddr) -> io::Result<()> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&address.into())
}

fn bind_failure(address: SocketAddr, error: &io::Error) -> String {
    if error.kind() == io::ErrorKind::AddrInUse {
        format!("{address} is in use (another process listens there; `ss -ltnp` names it)")
    } else {
        format!("{address} cannot be bound: {error}")
    }
}

fn check_listen(listen: SocketAddr, shards: usize) -> Check {
    if listen.port() == 0 {
        return Check::pass(
            "listen",
            format!(
                "{listen}: port 0, the kernel picks free ports for the shared and shard listeners"
            ),
        );
    }
    let mut addresses = vec![listen];
    for shard in 0..shards {
        let port = u32::from(listen.port()) + 1 + shard as u32;
        let Ok(port) = u16::try_from(port) else {
            return Check::fail(
                "listen",
                format!("shard {shard}'s port {port} (port + 1 + shard) is above 65535"),
                "choose a lower --listen port",
            );
        };
        addresses.push(SocketAddr::new(listen.ip(), port));
    }
    let failures: Vec<String> = addresses
        .iter()
        .filter_map(|&address| {
            probe_bind(address)
                .err()
                .map(|error| bind_failure(address, &error))
        })
        .collect();
    if failures.is_empty() {
        Check::pass(
            "listen",
            format!(
                "{listen} and the shard ports {}..={} can be bound",
                listen.port() + 1,
                listen.port() as usize + shards
            ),
        )
    } else {
        Check::fail(
            "listen",
            failures.join("; "),
            "stop what holds the port, or choose another --listen (shard k listens on port + 1 + k)",
        )
    }
}

fn check_metrics_listen(metrics: Option<SocketAddr>) -> Check {
    match metrics {
        None => Check::pass("metrics_listen", "off"),
        Some(address) if address.port() == 0 => Check::pass(
            "metrics_listen",
            format!("{address}: port 0, the kernel picks a free port"),
        ),
        Some(address) => match probe_bind(address) {
            Ok(()) => Check::pass("metrics_listen", format!("{address} can be bound")),
            Err(error) => Check::fail(
                "metrics_listen",
                bind_failure(address, &error),
                "stop what holds the port, or choose another --metrics-listen (or off)",
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_locks_three_times_its_io_memory_per_shard() {
        // The measurement in `locked_memory_bytes_per_shard`: 245,760 kB per shard.
        let config = ServerConfig::default();
        let kernel = Some(KernelVersion::new(6, 18));
        assert_eq!(
            locked_memory_bytes_per_shard(&config, kernel),
            245_760 << 10
        );
        let old = Some(KernelVersion::new(5, 10));
        assert_eq!(
            locked_memory_bytes_per_shard(&config, old),
            (245_760 << 10) + 3 * (64 << 10)
        );
    }

    #[test]
    fn memlock_below_what_the_shards_need_is_refused_with_the_numbers_and_the_fix() {
        let config = ServerConfig::default();
        let kernel = Some(KernelVersion::new(6, 18));
        let needed = 2 * (245_760u64 << 10);
        assert_eq!(
            check_locked_memory(&config, 2, LockedMemoryLimit::Bytes(needed), kernel),
            Ok(())
        );
        let shortfall =
            check_locked_memory(&config, 2, LockedMemoryLimit::Bytes(needed - 1), kernel)
                .unwrap_err();
        assert_eq!(shortfall.needed_bytes, needed);
        assert_eq!(shortfall.limit_bytes, needed - 1);
        let message = shortfall.to_string();
        assert!(
            message.contains("RLIMIT_MEMLOCK")
                && message.contains(&(needed - 1).to_string())
                && message.contains("2 shards need")
                && message.contains(&needed.to_string()),
            "{message}"
        );
        let fix = shortfall.fix();
        assert!(
            fix.contains("LimitMEMLOCK=infinity") && fix.contains("ulimit -l"),
            "{fix}"
        );
        for limit in [LockedMemoryLimit::Unlimited, LockedMemoryLimit::Exempt] {
            assert_eq!(check_locked_memory(&config, 64, limit, kernel), Ok(()));
        }
    }

    #[test]
    fn memlock_under_glommios_floor_is_refused_even_when_the_shards_need_less() {
        // Zero shards never happens, but the floor must hold on its own.
        let config = ServerConfig::default();
        let shortfall =
            check_locked_memory(&config, 0, LockedMemoryLimit::Bytes(256 << 10), None).unwrap_err();
        assert_eq!(shortfall.needed_bytes, GLOMMIO_MEMLOCK_FLOOR_BYTES);
    }

    #[test]
    fn kernel_versions_parse_from_release_strings() {
        assert_eq!(
            KernelVersion::parse("6.18.44-fc-v669"),
            Some(KernelVersion::new(6, 18))
        );
        assert_eq!(
            KernelVersion::parse("5.4.0-150-generic"),
            Some(KernelVersion::new(5, 4))
        );
        assert_eq!(KernelVersion::parse("garbage"), None);
        assert!(KernelVersion::new(5, 11) < KernelVersion::new(5, 12));
        assert_eq!(
            check_kernel(Some(KernelVersion::new(5, 4))).status,
            Status::Fail
        );
        assert_eq!(
            check_kernel(Some(KernelVersion::new(6, 1))).status,
            Status::Pass
        );
    }

    #[test]
    fn filesystems_ext4_and_xfs_pass_tmpfs_overlay_and_unknown_warn() {
        assert_eq!(classify_filesystem(0xEF53).0, Status::Pass);
        assert_eq!(classify_filesystem(0x5846_5342).0, Status::Pass);
        let (status, found, _) = classify_filesystem(0x0102_1994);
        assert_eq!(status, Status::Warn);
        assert!(found.starts_with("tmpfs"), "{found}");
        assert_eq!(classify_filesystem(0x794C_7630).0, Status::Warn);
        let (status, found, _) = classify_filesystem(0x1234);
        assert_eq!(status, Status::Warn);
        assert!(found.contains("0x1234"), "{found}");
    }

    #[test]
    fn host_settings_pass_or_warn_by_their_thresholds() {
        let text = |value: &str| Ok::<_, io::Error>(value.to_owned());
        let absent = || Err::<String, _>(io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(
            check_transparent_hugepages(&text("always [madvise] never")).status,
            Status::Pass
        );
        assert_eq!(
            check_transparent_hugepages(&text("[always] madvise never")).status,
            Status::Warn
        );
        assert_eq!(check_transparent_hugepages(&absent()).status, Status::Pass);
        assert_eq!(check_swappiness(&text("10")).status, Status::Pass);
        assert_eq!(check_swappiness(&text("11")).status, Status::Warn);
        assert_eq!(check_clocksource(&text("tsc")).status, Status::Pass);
        assert_eq!(check_clocksource(&text("kvm-clock")).status, Status::Warn);
        assert_eq!(check_somaxconn(&text("1024"), 1024).status, Status::Pass);
        assert_eq!(check_somaxconn(&text("1023"), 1024).status, Status::Warn);
        assert_eq!(check_somaxconn(&text("4096"), 4097).status, Status::Warn);
    }

    #[test]
    fn disk_space_fails_when_retention_outgrows_the_free_space_and_warns_without_a_limit() {
        let config = ServerConfig {
            segment_size_bytes: 1 << 20,
            ..ServerConfig::default()
        };
        let directory = Path::new("/");
        let topic = |name: &str, partitions, retention_bytes_max| TopicOnDisk {
            name: name.to_owned(),
            partitions,
            retention_bytes_max,
            used_bytes: 0,
            segment_files: 0,
        };
        let state = |topics, free| DataDirState {
            topics: Ok(topics),
            free_bytes: Ok(free),
        };
        // 4 partitions x (1 MiB + 1 MiB segment) = 8 MiB.
        let fits = state(vec![topic("orders", 4, 1 << 20)], 8 << 20);
        assert_eq!(
            check_disk_space(&config, Some(directory), Some(&fits)).status,
            Status::Pass
        );
        let short = state(vec![topic("orders", 4, 1 << 20)], (8 << 20) - 1);
        let check = check_disk_space(&config, Some(directory), Some(&short));
        assert_eq!(check.status, Status::Fail, "{check:?}");
        assert!(check.found.contains("8 MiB"), "{check:?}");
        let unlimited = state(vec![topic("events", 1, 0)], 8 << 20);
        let check = check_disk_space(&config, Some(directory), Some(&unlimited));
        assert_eq!(check.status, Status::Warn, "{check:?}");
        assert!(check.found.contains("events"), "{check:?}");
    }

    #[test]
    fn every_check_runs_under_its_stable_name() {
        let directory = tempfile::tempdir().unwrap();
        let config = ServerConfig {
            data_dir: directory.path().join("data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            cores: Some(1),
            ..ServerConfig::default()
        };
        let checks = run_checks(&config);
        let names: Vec<&str> = checks.iter().map(|check| check.name).collect();
        assert_eq!(names, CHECK_NAMES);
        assert!(
            !directory.path().join("data").exists(),
            "the data directory the checks created is removed again"
        );
        for check in &checks {
            assert_eq!(
                check.action.is_none(),
                check.status == Status::Pass,
                "{check:?}"
            );
        }
    }
}
