//! Start-up, listeners and shutdown.
//!
//! `Server::start` validates the configuration, binds every listener on the calling thread
//! (so a bad address fails before any shard starts, and an ephemeral port is known up
//! front), then starts one glommio executor per shard, pinned to its CPU. Each shard joins
//! the channel mesh, recovers the partitions it owns, reports ready, and then accepts on
//! the shared port (SO_REUSEPORT: the kernel spreads connections over shards) and on its
//! own port (`listen port + 1 + shard id`, for shard-aware clients).
//!
//! `run_until_signal` wraps that for `shardq serve`: under systemd it reports recovery
//! progress, readiness, watchdog pings and the stop over `$NOTIFY_SOCKET` (`notify`).

mod budget;
mod connection;
pub mod data_dir;
mod dispatch;
mod log;
pub mod notify;
pub mod preflight;
mod summary;

use data_dir::{DataDirectory, DataDirectoryError};
use notify::RecoveryProgress;

/// How often a starting shard, waiting in the mesh join, checks whether start-up was
/// abandoned (a running shard waits for the stop on its stop socket instead).
const STOP_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long start-up waits before binding again while an address is in use.
const BIND_RETRY_INTERVAL: Duration = Duration::from_millis(25);

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::mpsc;

use glommio::channels::channel_mesh::{MeshBuilder, Receivers};
use glommio::net::TcpListener;
use glommio::task::JoinHandle;
use glommio::{CpuSet, LocalExecutorBuilder, Placement};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{ConfigError, ServerConfig};
use crate::metrics::http::{Endpoint, MetricsServer, LINK_COLLECT};
use crate::metrics::Registry;
use crate::shard::{MeshMessage, RecoveredTotals, Shard};

#[derive(Debug)]
pub enum ServerError {
    Config(ConfigError),
    /// More shards were asked for than there are CPUs to pin them to.
    Placement {
        requested: usize,
        available: usize,
    },
    /// A CPU of `cpus` that is not online.
    CpuOffline {
        cpu: usize,
        online: Vec<usize>,
    },
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    /// RLIMIT_MEMLOCK is below what the shards' io_uring registrations need
    /// (`preflight::check_locked_memory`); checked before any shard starts.
    LockedMemory(preflight::LockedMemoryShortfall),
    /// The data directory could not be opened, is locked by another broker, or has a
    /// layout this broker does not read.
    DataDirectory(DataDirectoryError),
    /// A shard failed to start (its executor, the mesh, or recovering its partitions).
    Shard {
        shard: u16,
        message: String,
    },
    Signal(std::io::Error),
    /// The stop after SIGINT or SIGTERM took longer than `shutdown_timeout_ms`.
    StopTimedOut {
        timeout_ms: u32,
    },
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerError::Config(error) => write!(f, "{error}"),
            ServerError::Placement { requested, available } => write!(
                f,
                "cannot run {requested} shards: only {available} CPUs are online (use --cores N with N <= {available})"
            ),
            ServerError::CpuOffline { cpu, online } => write!(
                f,
                "invalid configuration: cpus names CPU {cpu}, which is not online (online: {})",
                crate::config::cpu_list_text(online)
            ),
            ServerError::Bind { address, source } => write!(f, "cannot listen on {address}: {source}"),
            ServerError::LockedMemory(shortfall) => write!(f, "{shortfall}; {}", shortfall.fix()),
            ServerError::DataDirectory(error) => write!(f, "{error}"),
            ServerError::Shard { shard, message } => write!(f, "shard {shard} failed to start: {message}"),
            ServerError::Signal(source) => write!(f, "waiting for a signal: {source}"),
            ServerError::StopTimedOut { timeout_ms } => write!(
                f,
                "the stop did not finish within shutdown_timeout_ms = {timeout_ms}: exiting anyway (durably acknowledged data is on disk; memory-acknowledged data not yet flushed may be lost)"
            ),
        }
    }
}

impl std::error::Error for ServerError {}

impl From<ConfigError> for ServerError {
    fn from(error: ConfigError) -> Self {
        ServerError::Config(error)
    }
}

/// A running broker.
pub struct ServerHandle {
    /// The shared listener's address (with the real port when port 0 was asked for).
    pub local_addr: SocketAddr,
    /// Where `/metrics` and the health checks are served (`metrics_listen`), if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    metrics: Option<(MetricsServer, Arc<Endpoint>)>,
    /// Pings every shard's loop (with or without `metrics_listen`): the systemd watchdog.
    endpoint: Arc<Endpoint>,
    /// Each shard's own port, by shard id.
    pub shard_ports: Vec<u16>,
    /// The CPU each shard runs on, by shard id.
    pub shard_cpus: Vec<usize>,
    /// The data directory, as opened (absolute).
    pub data_dir: std::path::PathBuf,
    /// What every shard recovered at start-up.
    pub recovered: RecoveredTotals,
    stopping: Arc<AtomicBool>,
    /// This side of each shard's stop socket pair: closing it wakes the shard to stop.
    stop_signals: Vec<std::os::unix::net::UnixStream>,
    executors: Vec<glommio::ExecutorJoinHandle<()>>,
    /// Holds the data directory's lock until every shard has stopped.
    data_directory: Option<DataDirectory>,
}

impl ServerHandle {
    pub fn shard_count(&self) -> usize {
        self.executors.len()
    }

    /// Stops accepting, flushes and closes every partition, and waits for every shard.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some((_, endpoint)) = &self.metrics {
            endpoint.set_ready(false);
        }
        self.stopping.store(true, Ordering::Release);
        // The shards see end of stream on their side and stop.
        self.stop_signals.clear();
        for executor in self.executors.drain(..) {
            let _ = executor.join();
        }
        if let Some((mut server, _)) = self.metrics.take() {
            server.stop();
        }
        // Only now may another broker take the directory.
        drop(self.data_directory.take());
    }
}

/// Dropping the handle stops the broker too: the data directory's lock must never be
/// released while shards still write to it.
impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn listener_socket(
    address: SocketAddr,
    reuse_port: bool,
    backlog: u32,
) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&address.into())?;
    // The kernel cuts it to net.core.somaxconn.
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(socket)
}

/// Every listener of the broker: the shared port (one SO_REUSEPORT socket per shard) and
/// each shard's own port.
struct Listeners {
    local_addr: SocketAddr,
    shared: Vec<socket2::Socket>,
    own: Vec<socket2::Socket>,
    shard_ports: Vec<u16>,
}

/// Binds every listener once, or says which address could not be bound.
fn bind_listeners(
    listen: SocketAddr,
    shard_count: usize,
    backlog: u32,
) -> Result<Listeners, (SocketAddr, std::io::Error)> {
    if listen.port() != 0 {
        // Any socket still listening on the shared port, above all the lingering
        // SO_REUSEPORT sockets of a broker killed a moment ago, would join our
        // reuse-port group and be handed a share of new connections that nobody ever
        // accepts. A plain bind (no SO_REUSEPORT) fails while any of them exists.
        let probe = socket2::Socket::new(
            socket2::Domain::for_address(listen),
            socket2::Type::STREAM,
            None,
        )
        .map_err(|error| (listen, error))?;
        probe
            .set_reuse_address(true)
            .map_err(|error| (listen, error))?;
        probe
            .bind(&listen.into())
            .map_err(|error| (listen, error))?;
    }
    // The shared one first, so port 0 resolves once for every shard.
    let first = listener_socket(listen, true, backlog).map_err(|error| (listen, error))?;
    let local_addr = first
        .local_addr()
        .ok()
        .and_then(|address| address.as_socket())
        .expect("a bound TCP socket has an address");
    let mut shared = vec![first];
    for _ in 1..shard_count {
        shared
            .push(listener_socket(local_addr, true, backlog).map_err(|error| (local_addr, error))?);
    }
    let mut own = Vec::with_capacity(shard_count);
    let mut shard_ports = Vec::with_capacity(shard_count);
    for shard in 0..shard_count {
        let port = if listen.port() == 0 {
            0
        } else {
            let port = u32::from(local_addr.port()) + 1 + shard as u32;
            u16::try_from(port).map_err(|_| {
                (
                    local_addr,
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("shard {shard}'s port {port} is above 65535"),
                    ),
                )
            })?
        };
        let address = SocketAddr::new(local_addr.ip(), port);
        let socket = listener_socket(address, false, backlog).map_err(|error| (address, error))?;
        let bound = socket
            .local_addr()
            .ok()
            .and_then(|address| address.as_socket())
            .expect("a bound TCP socket has an address");
        shard_ports.push(bound.port());
        own.push(socket);
    }
    Ok(Listeners {
        local_addr,
        shared,
        own,
        shard_ports,
    })
}

/// Binds every listener, retrying for up to `bind_retry_ms` while an address is in use.
/// A broker killed with SIGKILL has its io_uring torn down asynchronously, and its
/// listening sockets stay bound for a few hundred milliseconds after the process is
/// reaped: a supervisor restarting it at once must not fail for that.
fn bind_listeners_retrying(
    config: &ServerConfig,
    shard_count: usize,
) -> Result<Listeners, ServerError> {
    let (listen, bind_retry_ms) = (config.listen, config.bind_retry_ms);
    let deadline = std::time::Instant::now() + Duration::from_millis(u64::from(bind_retry_ms));
    let mut logged = false;
    loop {
        match bind_listeners(listen, shard_count, config.listen_backlog) {
            Ok(listeners) => return Ok(listeners),
            Err((address, source))
                if source.kind() == std::io::ErrorKind::AddrInUse
                    && std::time::Instant::now() < deadline =>
            {
                if !logged {
                    tracing::warn!(
                        %address,
                        bind_retry_ms,
                        "{address} is in use (a stopped broker's sockets may still be closing); retrying for up to {bind_retry_ms} ms (bind_retry_ms)"
                    );
                    logged = true;
                }
                std::thread::sleep(BIND_RETRY_INTERVAL);
            }
            Err((address, source)) => return Err(ServerError::Bind { address, source }),
        }
    }
}

/// Reports a shard's start-up outcome exactly once: if the shard's thread ends before
/// it reported (its executor failed to start, or it panicked), dropping the guard says
/// so, and start-up fails instead of waiting for it forever.
struct ReadyGuard {
    shard: u16,
    sender: Option<mpsc::Sender<Result<RecoveredTotals, ServerError>>>,
}

impl ReadyGuard {
    fn report(&mut self, outcome: Result<RecoveredTotals, ServerError>) {
        if let Some(sender) = self.sender.take() {
            let _ = sender.send(outcome);
        }
    }
}

impl Drop for ReadyGuard {
    fn drop(&mut self) {
        let shard = self.shard;
        self.report(Err(ServerError::Shard {
            shard,
            message: "its thread ended before it was ready (see the error above; a low locked-memory limit is a common cause: LimitMEMLOCK=infinity)".into(),
        }));
    }
}

/// Exit status of a broker one of whose shards panicked (EX_SOFTWARE).
pub const EXIT_SHARD_PANIC: i32 = 70;
const SHARD_THREAD_PREFIX: &str = "shardq-shard-";

/// A panic on a shard thread ends the process: its partitions would otherwise answer
/// `shutting_down` forever while the other shards keep serving, and no supervisor would
/// notice. Installed once per process; other threads keep the previous behaviour.
fn exit_on_shard_panic() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            let on_shard = std::thread::current()
                .name()
                .is_some_and(|name| name.starts_with(SHARD_THREAD_PREFIX));
            if on_shard {
                crate::logs::fatal(format_args!(
                    "a shard panicked; exiting with status {EXIT_SHARD_PANIC} so that the supervisor restarts the broker"
                ));
                std::process::exit(EXIT_SHARD_PANIC);
            }
        }));
    });
}

impl ServerHandle {
    pub fn start(config: ServerConfig) -> Result<ServerHandle, ServerError> {
        Self::start_reporting(config, &Arc::new(RecoveryProgress::default()))
    }

    /// `start`, counting recovered partitions in `progress` as the shards go (read by
    /// another thread: `run_until_signal` shows it to systemd).
    pub fn start_reporting(
        config: ServerConfig,
        progress: &Arc<RecoveryProgress>,
    ) -> Result<ServerHandle, ServerError> {
        config.validate()?;
        let mut online: Vec<usize> = CpuSet::online()
            .map_err(|error| ServerError::Shard {
                shard: 0,
                message: format!("listing online CPUs: {error}"),
            })?
            .into_iter()
            .map(|location| location.cpu)
            .collect();
        // glommio hands the set back in hash order; sorted, shard k always runs on the
        // k-th CPU, so `--cores N` leaves the highest CPUs free for other work (a
        // co-located client, say) and runs are reproducible.
        online.sort_unstable();
        // Shard k runs on shard_cpus[k]: the operator's list (`cpus`), else the lowest
        // online CPUs.
        let shard_cpus = preflight::shard_cpus(&config, &online).map_err(|error| match error {
            preflight::PlacementError::Offline { cpu, online } => {
                ServerError::CpuOffline { cpu, online }
            }
            preflight::PlacementError::TooMany {
                requested,
                available,
            } => ServerError::Placement {
                requested,
                available,
            },
        })?;
        let shard_count = shard_cpus.len();
        // Below what the shards need glommio either refuses to start an executor, which
        // only shows as a shard thread that ends before it reports, or silently runs
        // without its registered buffers: say so now, with the numbers. The first stops
        // start-up before anything exists; the second is a warning, since the broker
        // still works (a developer's shell has a memlock limit of a few MiB).
        let locked_memory_limit = preflight::LockedMemoryLimit::current()
            .inspect_err(|error| {
                tracing::warn!(error = %error, "cannot read RLIMIT_MEMLOCK or capabilities, so the locked-memory check is skipped: {error}")
            })
            .ok();
        if let Some(Err(shortfall)) = locked_memory_limit.map(|limit| {
            preflight::check_locked_memory(
                &config,
                shard_count,
                limit,
                preflight::KernelVersion::running(),
            )
        }) {
            if shortfall.stops_the_shards() {
                return Err(ServerError::LockedMemory(shortfall));
            }
            tracing::warn!(
                limit_bytes = shortfall.limit_bytes,
                needed_bytes = shortfall.needed_bytes,
                "{shortfall}; starting without registered I/O buffers, so every write and read pins its pages itself (slower); to fix, {}",
                shortfall.fix()
            );
        }
        exit_on_shard_panic();
        // Everything the broker creates is its own: directories 0700, files 0600.
        // SAFETY: umask only swaps the process's file-creation mask; it cannot fail.
        unsafe { libc::umask(0o077) };
        let mut config = config;
        let data_directory =
            DataDirectory::open(&config.data_dir).map_err(ServerError::DataDirectory)?;
        config.data_dir = data_directory.path.clone();
        let probe_path = data_directory
            .probe_file()
            .map_err(ServerError::DataDirectory)?;
        // The progress total. Unreadable metadata leaves it unknown; the shards then
        // fail start-up with the error in full.
        if let Ok(catalog) = crate::shard::read_topic_catalog(
            &data_dir::topics_directory(&config.data_dir),
            crate::shard::SkippedDirectories::Ignore,
        ) {
            let total = catalog
                .iter()
                .map(|(_, topic)| topic.partitions)
                .fold(0u32, u32::saturating_add);
            let _ = progress.total.set(total);
        }

        let Listeners {
            local_addr,
            shared,
            own,
            shard_ports,
        } = bind_listeners_retrying(&config, shard_count)?;
        // Bound before any shard starts, like the broker's own listeners: a taken metrics
        // port fails start-up rather than leaving the broker unwatched.
        let metrics_listener = match config.metrics_listen {
            Some(address) => Some(
                std::net::TcpListener::bind(address)
                    .map_err(|source| ServerError::Bind { address, source })?,
            ),
            None => None,
        };
        let registries: Vec<Arc<Registry>> = (0..shard_count)
            .map(|shard| Registry::new(shard as u16))
            .collect();
        let mut metrics_links = Vec::with_capacity(shard_count);
        let mut shard_metrics_links = Vec::with_capacity(shard_count);
        for shard in 0..shard_count {
            let (ours, theirs) =
                std::os::unix::net::UnixStream::pair().map_err(|error| ServerError::Shard {
                    shard: shard as u16,
                    message: format!("creating its metrics link: {error}"),
                })?;
            metrics_links.push(ours);
            shard_metrics_links.push(Some(theirs));
        }
        let endpoint = Endpoint::new(
            registries.clone(),
            metrics_links,
            Duration::from_millis(u64::from(config.metrics_shard_answer_timeout_ms)),
        )
        .map_err(|error| ServerError::Shard {
            shard: 0,
            message: format!("setting up the metrics links: {error}"),
        })?;
        let metrics = match metrics_listener {
            Some(listener) => {
                let address = listener.local_addr().ok();
                let server =
                    MetricsServer::start(listener, Arc::clone(&endpoint)).map_err(|error| {
                        ServerError::Shard {
                            shard: 0,
                            message: format!("starting the metrics endpoint: {error}"),
                        }
                    })?;
                // Said now, not with "serving on": a supervisor polls readiness while
                // the shards recover.
                if let Some(address) = address {
                    tracing::info!(
                        metrics_address = %address,
                        "metrics and health checks on http://{address} (ready once every shard has recovered)"
                    );
                }
                Some((server, address))
            }
            None => None,
        };
        let mesh = MeshBuilder::<MeshMessage, _>::full(shard_count, config.mesh_channel_capacity);
        let (ready_sender, ready_receiver) =
            mpsc::channel::<Result<RecoveredTotals, ServerError>>();
        let stopping = Arc::new(AtomicBool::new(false));
        // Client connections open over every shard, against connections_max.
        let connections_open = Arc::new(AtomicU32::new(0));
        let (metrics, metrics_addr) = match metrics {
            Some((server, address)) => (Some((server, Arc::clone(&endpoint))), address),
            None => (None, None),
        };
        let mut handle = ServerHandle {
            local_addr,
            metrics_addr,
            metrics,
            endpoint: Arc::clone(&endpoint),
            shard_ports: shard_ports.clone(),
            shard_cpus: shard_cpus.clone(),
            data_dir: config.data_dir.clone(),
            recovered: RecoveredTotals::default(),
            stopping: Arc::clone(&stopping),
            stop_signals: Vec::with_capacity(shard_count),
            executors: Vec::with_capacity(shard_count),
            data_directory: Some(data_directory),
        };
        let io_memory = preflight::io_memory_bytes(&config);
        let recovery_started = std::time::Instant::now();
        for (shard, (shared_socket, own_socket)) in shared.into_iter().zip(own).enumerate() {
            let stopping_flag = Arc::clone(&stopping);
            let connections_open = Arc::clone(&connections_open);
            let config = config.clone();
            let mesh = mesh.clone();
            let ports = shard_ports.clone();
            let mut ready = ReadyGuard {
                shard: shard as u16,
                sender: Some(ready_sender.clone()),
            };
            let probe_path = probe_path.clone();
            let progress = Arc::clone(progress);
            let registry = Arc::clone(&registries[shard]);
            let metrics_link = shard_metrics_links[shard]
                .take()
                .expect("one metrics link per shard");
            let (stop_signal, shard_stop_signal) =
                std::os::unix::net::UnixStream::pair().map_err(|error| ServerError::Shard {
                    shard: shard as u16,
                    message: format!("creating its stop signal: {error}"),
                })?;
            handle.stop_signals.push(stop_signal);
            let mut builder = LocalExecutorBuilder::new(Placement::Fixed(shard_cpus[shard]))
                .name(&format!("{SHARD_THREAD_PREFIX}{shard}"))
                .io_memory(io_memory);
            if config.spin_before_park_us > 0 {
                builder = builder
                    .spin_before_park(Duration::from_micros(config.spin_before_park_us.into()));
            }
            // The sockets move into the closure whole: if the executor never runs it,
            // dropping the closure closes them.
            let spawned = builder.spawn(move || async move {
                // SAFETY: each descriptor comes from a socket this closure owns, handed
                // over with `into_raw_fd`; the listener becomes its only owner.
                let (shared_listener, own_listener, stop_signal, metrics_link) = unsafe {
                    (
                        TcpListener::from_raw_fd(shared_socket.into_raw_fd()),
                        TcpListener::from_raw_fd(own_socket.into_raw_fd()),
                        glommio::net::UnixStream::from_raw_fd(shard_stop_signal.into_raw_fd()),
                        glommio::net::UnixStream::from_raw_fd(metrics_link.into_raw_fd()),
                    )
                };
                // Every `metrics::` call on this thread lands in this shard's registry.
                let _recorder = ::metrics::set_default_local_recorder(&*registry);
                // Answers scrapes and health checks from now on, recovery included:
                // with state gauges once the shard exists.
                let observed = Rc::new(Observed::default());
                let link_task = glommio::spawn_local(serve_metrics_link(
                    metrics_link,
                    Rc::clone(&observed),
                    Arc::clone(&registry),
                ))
                .detach();
                let shard_id = shard as u16;
                // A fault point for tests of start-up with a shard that never joins
                // (debug builds only): the named shard's thread ends at once, as when
                // its executor cannot start.
                #[cfg(debug_assertions)]
                if std::env::var("SHARDQ_TEST_SHARD_DIES_AT_START")
                    .is_ok_and(|value| value == shard_id.to_string())
                {
                    return;
                }
                let started = start_shard(
                    ShardStart {
                        id: shard_id,
                        count: shard_count as u16,
                        config,
                        ports,
                        registry: Arc::clone(&registry),
                    },
                    mesh,
                    &probe_path,
                    &stopping_flag,
                    &progress.recovered,
                )
                .await;
                let (shard, receivers) = match started {
                    Ok((shard, receivers, recovered)) => {
                        ready.report(Ok(recovered));
                        (shard, receivers)
                    }
                    Err(error) => {
                        ready.report(Err(error));
                        return;
                    }
                };
                *observed.shard.borrow_mut() = Some(Rc::clone(&shard));
                run_shard(
                    shard,
                    receivers,
                    shared_listener,
                    own_listener,
                    stop_signal,
                    connections_open,
                )
                .await;
                link_task.cancel();
            });
            match spawned {
                Ok(executor) => handle.executors.push(executor),
                Err(error) => {
                    handle.shutdown();
                    return Err(ServerError::Shard {
                        shard: shard as u16,
                        message: format!("starting its executor: {error}"),
                    });
                }
            }
        }
        drop(ready_sender);
        for _ in 0..shard_count {
            // Every shard reports once, or its guard reports for it when its thread
            // ends: this cannot wait forever.
            let outcome = ready_receiver.recv().unwrap_or_else(|_| {
                Err(ServerError::Shard {
                    shard: 0,
                    message: "a shard stopped before reporting".into(),
                })
            });
            match outcome {
                Ok(recovered) => handle.recovered.merge(recovered),
                Err(error) => {
                    handle.shutdown();
                    return Err(error);
                }
            }
        }
        summary::log_recovery_total(&handle.recovered, recovery_started.elapsed());
        // Every shard recovered its partitions and listens.
        endpoint.set_ready(true);
        Ok(handle)
    }
}

/// What a shard's metrics link reports on, filled in once the shard has recovered.
#[derive(Default)]
struct Observed {
    shard: RefCell<Option<Rc<Shard>>>,
}

/// The shard's side of its metrics link (`metrics::http`): each byte asks for an answer,
/// with the state gauges published first when it says so. Ends when the other side goes.
async fn serve_metrics_link(
    mut link: glommio::net::UnixStream,
    observed: Rc<Observed>,
    registry: Arc<Registry>,
) {
    use futures_lite::{AsyncReadExt, AsyncWriteExt};
    let mut byte = [0u8; 1];
    loop {
        match link.read(&mut byte).await {
            Ok(1) => {}
            _ => return,
        }
        if byte[0] & LINK_COLLECT != 0 {
            let shard = observed.shard.borrow().clone();
            if let Some(shard) = shard {
                registry.publish(shard.metrics_samples());
            }
        }
        if link.write_all(&byte).await.is_err() {
            return;
        }
    }
}

/// Who a starting shard is.
struct ShardStart {
    id: u16,
    count: u16,
    config: ServerConfig,
    ports: Vec<u16>,
    registry: Arc<Registry>,
}

async fn start_shard(
    start: ShardStart,
    mesh: MeshBuilder<MeshMessage, glommio::channels::channel_mesh::Full>,
    probe_path: &std::path::Path,
    stopping: &AtomicBool,
    recovered: &AtomicU32,
) -> Result<(Rc<Shard>, Receivers<MeshMessage>, RecoveredTotals), ServerError> {
    let shard_id = start.id;
    let fail = |message: String| ServerError::Shard {
        shard: shard_id,
        message,
    };
    // Joining waits for every sibling; a sibling that never comes (its executor failed)
    // makes start-up stop, and then this shard must stop waiting too.
    let joined = futures_lite::future::or(async { Some(mesh.join().await) }, async {
        while !stopping.load(Ordering::Acquire) {
            glommio::timer::sleep(STOP_POLL_INTERVAL).await;
        }
        None
    })
    .await;
    let Some(joined) = joined else {
        return Err(fail(
            "start-up was abandoned while joining the channel mesh".into(),
        ));
    };
    let (senders, receivers) =
        joined.map_err(|error| fail(format!("joining the channel mesh: {error}")))?;
    // Mesh peers are ordered by executor id, and executors are created in shard order.
    assert_eq!(
        senders.peer_id(),
        usize::from(shard_id),
        "mesh peer ids follow shard ids"
    );
    let probe = glommio::io::DmaFile::open(probe_path)
        .await
        .map_err(|error| {
            fail(format!(
                "opening {} with O_DIRECT: {error}",
                probe_path.display()
            ))
        })?;
    let _ = probe.close().await;
    let shard = Shard::new(
        start.id,
        start.count,
        start.config,
        start.ports,
        senders,
        start.registry,
    );
    // A fault point for tests of readiness during a long recovery (debug builds only).
    #[cfg(debug_assertions)]
    if let Some(delay) = std::env::var("SHARDQ_TEST_RECOVERY_DELAY_MS")
        .ok()
        .and_then(|value| value.parse().ok())
    {
        glommio::timer::sleep(Duration::from_millis(delay)).await;
    }
    let recovered = shard
        .load_topics(recovered)
        .await
        .map_err(|error| fail(format!("recovering partitions: {error}")))?;
    Ok((shard, receivers, recovered))
}

async fn run_shard(
    shard: Rc<Shard>,
    mut receivers: Receivers<MeshMessage>,
    shared_listener: TcpListener,
    own_listener: TcpListener,
    mut stop_signal: glommio::net::UnixStream,
    connections_open: Arc<AtomicU32>,
) {
    // Mesh traffic keeps flowing until the very end: during the drain below, replies
    // from other shards complete the requests whose answers this shard still owes.
    let mut mesh_tasks = Vec::new();
    for (peer, stream) in receivers.streams() {
        let peer = u16::try_from(peer).expect("shard ids fit u16");
        mesh_tasks.push(glommio::spawn_local(Rc::clone(&shard).serve_peer(peer, stream)).detach());
    }
    let mut background = Vec::new();
    // Feeds the shard's queue groups (durable offsets, metadata, timers); stops at
    // shutdown.
    background.push(glommio::spawn_local(Rc::clone(&shard).run_queue_pump()).detach());
    {
        let shard = Rc::clone(&shard);
        let interval = Duration::from_millis(u64::from(shard.config.retention_check_interval_ms));
        background.push(
            glommio::spawn_local(async move {
                loop {
                    glommio::timer::sleep(interval).await;
                    shard.apply_retention().await;
                }
            })
            .detach(),
        );
    }
    // A fault point for tests of the systemd watchdog (debug builds only):
    // `SHARDQ_TEST_STALL_SHARD=<shard>:<after ms>:<for ms>` blocks that shard's thread,
    // its loop with it, for a while once it serves.
    #[cfg(debug_assertions)]
    if let Some((after, lasting)) =
        std::env::var("SHARDQ_TEST_STALL_SHARD")
            .ok()
            .and_then(|value| {
                let mut fields = value.split(':').map(|field| field.parse::<u64>().ok());
                let (Some(Some(stalled)), Some(Some(after)), Some(Some(lasting))) =
                    (fields.next(), fields.next(), fields.next())
                else {
                    return None;
                };
                (stalled == u64::from(shard.id)).then_some((after, lasting))
            })
    {
        background.push(
            glommio::spawn_local(async move {
                glommio::timer::sleep(Duration::from_millis(after)).await;
                std::thread::sleep(Duration::from_millis(lasting));
            })
            .detach(),
        );
    }
    // Open connections by id, so that a shutdown can close the ones still open.
    let connections: Rc<RefCell<HashMap<u64, JoinHandle<()>>>> =
        Rc::new(RefCell::new(HashMap::new()));
    let next_connection = Rc::new(std::cell::Cell::new(0u64));
    let shared = connection::ShardConnections::new(&shard.config);
    {
        let shared = Rc::clone(&shared);
        shard.set_connection_bytes(Box::new(move || shared.bytes_in_flight()));
    }
    let refused = Rc::new(log::RateLimitedLog::new(&shard.config));
    // Accept errors (EMFILE once the descriptors run out) recur as fast as clients
    // connect: limited like the refusals.
    let accept_failed = Rc::new(log::RateLimitedLog::new(&shard.config));
    for listener in [shared_listener, own_listener] {
        let shard = Rc::clone(&shard);
        let shared = Rc::clone(&shared);
        let refused = Rc::clone(&refused);
        let accept_failed = Rc::clone(&accept_failed);
        let connections_open = Arc::clone(&connections_open);
        let connections = Rc::clone(&connections);
        let next_connection = Rc::clone(&next_connection);
        background.push(
            glommio::spawn_local(async move {
                loop {
                    let stream = match listener.accept().await {
                        Ok(stream) => stream,
                        Err(error) => {
                            accept_failed.log(|held_back| {
                                tracing::warn!(
                                    shard = shard.id,
                                    error = %error,
                                    held_back,
                                    "accept failed: {error}"
                                )
                            });
                            glommio::timer::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    };
                    let open = connections.borrow().len() as u64;
                    let on_shard_max = shard.config.connections_per_shard_max;
                    let max = shard.config.connections_max;
                    let counted = (open < u64::from(on_shard_max))
                        .then(|| OpenConnection::count(&connections_open, max))
                        .flatten();
                    let Some(counted) = counted else {
                        // Over a limit: closing at once is the clearest refusal a
                        // client that has not spoken yet can get.
                        let peer = stream
                            .peer_addr()
                            .map_or_else(|_| "unknown".to_owned(), |address| address.to_string());
                        drop(stream);
                        shard.metrics.connections_refused.increment(1);
                        refused.log(|held_back| {
                            let open_on_all_shards = connections_open.load(Ordering::Relaxed);
                            tracing::warn!(
                                shard = shard.id,
                                peer = %peer,
                                open_on_shard = open,
                                connections_per_shard_max = on_shard_max,
                                open_on_all_shards,
                                connections_max = max,
                                refused_total = refused.total(),
                                held_back,
                                "refused a connection: {open} open on this shard (connections_per_shard_max {on_shard_max}), {open_on_all_shards} on all shards (connections_max {max})"
                            );
                        });
                        continue;
                    };
                    let id = next_connection.get();
                    next_connection.set(id + 1);
                    shard.metrics.connections_accepted.increment(1);
                    let shard = Rc::clone(&shard);
                    let shared = Rc::clone(&shared);
                    let registry = Rc::clone(&connections);
                    let handle = glommio::spawn_local(async move {
                        // Uncounted when the task ends, cancelled or not.
                        let _counted = counted;
                        let _open = OpenGauge::new(&shard.metrics.connections_open);
                        connection::serve(shard, shared, stream, id).await;
                        registry.borrow_mut().remove(&id);
                    })
                    .detach();
                    connections.borrow_mut().insert(id, handle);
                }
            })
            .detach(),
        );
    }
    // The stop request comes from a thread outside every executor: it closes its end of
    // this socket pair, and the read ends (data, end of stream or an error all mean stop).
    // Waiting on a socket rather than checking a flag on a timer lets an idle shard
    // sleep: each wake-up of a shard holding thousands of connections makes io_uring
    // scan their pending polls (0.7% of a core with 10,000 idle connections).
    {
        use futures_lite::AsyncReadExt;
        let mut byte = [0u8; 1];
        let _ = stop_signal.read(&mut byte).await;
    }
    for task in background {
        task.cancel();
    }
    // A fault point for tests of the stop's bound and of a second signal (debug builds
    // only): a stop that takes this much longer, as a slow disk would make it.
    #[cfg(debug_assertions)]
    if let Some(delay) = std::env::var("SHARDQ_TEST_STOP_DELAY_MS")
        .ok()
        .and_then(|value| value.parse().ok())
    {
        glommio::timer::sleep(Duration::from_millis(delay)).await;
    }
    #[cfg(debug_assertions)]
    if shard.id == 0 {
        crate::test_hooks::SHARD_ZERO_STOP.pass_async().await;
    }
    // Connections stop reading now; what they already read is answered below.
    shared.close_all();
    shard.close_all().await;
    // Closing flushed every partition, which completes the durable produces still
    // waiting: let their connections write those acknowledgements before the executor
    // (and every connection task with it) goes away, so no producer is told "connection
    // closed" about a record that is stored. Bounded, for clients that stopped reading.
    let deadline = std::time::Instant::now()
        + Duration::from_millis(u64::from(shard.config.shutdown_drain_ms));
    while shard.responses_owed() > 0 && std::time::Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    // Lingering closes: each connection has shut down its write side after its last
    // answer and reads what its client still sends for up to connection_linger_ms, so
    // a reset does not destroy answers the client has not read yet.
    let deadline = std::time::Instant::now()
        + Duration::from_millis(u64::from(shard.config.connection_linger_ms));
    while !connections.borrow().is_empty() && std::time::Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    // Close what is still open: an embedding process that goes on after the broker
    // stops must not keep its clients' sockets (and their memory) alive.
    let open: Vec<JoinHandle<()>> = connections
        .borrow_mut()
        .drain()
        .map(|(_, handle)| handle)
        .collect();
    for handle in open {
        handle.cancel();
    }
    for task in mesh_tasks {
        task.cancel();
    }
}

/// One open connection in `shardq_connections_open`, for as long as it lives (its task
/// may end by cancellation at shutdown).
struct OpenGauge(::metrics::Gauge);

impl OpenGauge {
    fn new(gauge: &::metrics::Gauge) -> OpenGauge {
        gauge.increment(1.0);
        OpenGauge(gauge.clone())
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// One open client connection, counted against `connections_max` over every shard for
/// as long as it lives.
struct OpenConnection(Arc<AtomicU32>);

impl OpenConnection {
    /// Counts one more connection, unless `max` are open already.
    fn count(open: &Arc<AtomicU32>, max: u32) -> Option<OpenConnection> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |count| {
            (count < max).then_some(count + 1)
        })
        .ok()
        .map(|_| OpenConnection(Arc::clone(open)))
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Runs the broker until SIGINT or SIGTERM, then shuts it down cleanly. Under systemd
/// (`$NOTIFY_SOCKET`), reports start-up progress, readiness, watchdog pings and the
/// stop (`notify`).
pub fn run_until_signal(config: ServerConfig) -> Result<(), ServerError> {
    use sd_notify::NotifyState;
    let signals = block_shutdown_signals().map_err(ServerError::Signal)?;
    let shutdown_timeout_ms = config.shutdown_timeout_ms;
    raise_open_files_limit();
    // A signal during start-up (a long recovery, the bind retry) ends the process at
    // once: nothing has been acknowledged yet, and recovery is safe to cut short (it is
    // what a kill -9 leaves behind). Without this, the signal would wait until start-up
    // ended and the broker would report ready only to stop.
    let (start_up_over, start_up_watched) =
        std::os::unix::net::UnixStream::pair().map_err(ServerError::Signal)?;
    let start_up_watcher = std::thread::Builder::new()
        .name("shardq-start-signals".into())
        .spawn(move || {
            match wait_for_stop(&signals, &start_up_watched, None, None) {
                Ok(StopOutcome::Signal(signal)) => {
                    tracing::warn!(
                        signal,
                        "signal {signal} received during start-up: exiting before serving (nothing was acknowledged yet; the next start recovers as after a crash)"
                    );
                    std::process::exit(EXIT_SECOND_SIGNAL_BASE + signal)
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(error = %error, "watching for signals during start-up: {error}"),
            }
        })
        .map_err(ServerError::Signal)?;
    let progress = Arc::new(RecoveryProgress::default());
    let reporter = notify::report_progress(Arc::clone(&progress));
    let started = ServerHandle::start_reporting(config, &progress);
    if let Some(reporter) = reporter {
        reporter.stop();
    }
    // Signals now wait for `sigwait` below (one that raced the hand-over ended the
    // process already, or is still pending).
    drop(start_up_over);
    let _ = start_up_watcher.join();
    let handle = match started {
        Ok(handle) => handle,
        Err(error) => {
            notify::send(&[NotifyState::Status(&format!("start-up failed: {error}"))]);
            return Err(error);
        }
    };
    summary::log_startup_summary(&handle);
    let serving = format!(
        "serving on {} with {} shards; {} partitions recovered",
        handle.local_addr,
        handle.shard_count(),
        progress.recovered.load(Ordering::Relaxed)
    );
    // Every shard has recovered and listens: only now is the broker ready.
    notify::send(&[NotifyState::Ready, NotifyState::Status(&serving)]);
    let watchdog = notify::watchdog_interval()
        .map(|interval| notify::watchdog(Arc::clone(&handle.endpoint), interval, serving));
    let signal = wait_for_signal(&signals).map_err(ServerError::Signal)?;
    let first_signal_at = std::time::Instant::now();
    tracing::info!(
        signal,
        shutdown_timeout_ms,
        "signal {signal} received, shutting down: flushing and closing every partition (at most {shutdown_timeout_ms} ms; a second signal exits at once)"
    );
    // systemd stops watching once told the broker is stopping; the shards stop answering
    // pings while they flush, so the pings stop first.
    if let Some(watchdog) = watchdog {
        watchdog.stop();
    }
    notify::send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: flushing and closing every partition"),
    ]);
    // The stop runs on its own thread so that this one can watch for a second signal and
    // for the bound; the socket pair's far end closing says the stop is over.
    let (stopped, stop_over) =
        std::os::unix::net::UnixStream::pair().map_err(ServerError::Signal)?;
    let stopper = std::thread::Builder::new()
        .name("shardq-stop".into())
        .spawn(move || {
            handle.shutdown();
            drop(stopped);
        })
        .map_err(ServerError::Signal)?;
    let bound = Duration::from_millis(u64::from(shutdown_timeout_ms));
    match wait_for_stop(&signals, &stop_over, Some(first_signal_at), Some(bound))
        .map_err(ServerError::Signal)?
    {
        StopOutcome::Stopped => {
            // The thread has nothing left to do but return.
            let _ = stopper.join();
            tracing::info!("stopped cleanly");
            Ok(())
        }
        StopOutcome::Signal(second) => {
            // Every durable acknowledgement was given after its fdatasync, and queue
            // state changes are answered only once journaled: ending the process here
            // loses nothing acknowledged as durable. Memory-acknowledged records the
            // stop had not flushed yet are lost, as that acknowledgement level allows.
            tracing::warn!(
                signal = second,
                "signal {second} received again: exiting at once, without finishing the stop (durably acknowledged data is on disk; memory-acknowledged data not yet flushed is not)"
            );
            std::process::exit(EXIT_SECOND_SIGNAL_BASE + second)
        }
        StopOutcome::TimedOut => Err(ServerError::StopTimedOut {
            timeout_ms: shutdown_timeout_ms,
        }),
    }
}

/// A descriptor per connection and per segment file: the soft limit's usual 1024 would
/// refuse connections long before connections_max. Done by `shardq serve` only: a
/// library embedder's process may use select(2), which breaks past 1024 descriptors.
fn raise_open_files_limit() {
    match preflight::raise_open_files_limit() {
        Ok((before, after)) if before != after => tracing::info!(
            "raised the open-files soft limit from {} to {} (the hard limit)",
            before.map_or_else(|| "unlimited".to_owned(), |limit| limit.to_string()),
            after.map_or_else(|| "unlimited".to_owned(), |limit| limit.to_string()),
        ),
        Ok(_) => {}
        Err(error) => tracing::warn!(error = %error, "raising the open-files soft limit: {error}"),
    }
}

/// A second signal during the stop exits with 128 + its number, the status a shell
/// reports for a process the signal ended (143 for SIGTERM, 130 for SIGINT).
const EXIT_SECOND_SIGNAL_BASE: i32 = 128;

/// Signals this soon after the first are the same request delivered twice, not a
/// second one: timeout(1), for one, signals both the process and its process group, so
/// the broker gets SIGTERM twice within a few milliseconds. An operator who means a
/// second signal sends it after reading the "shutting down" line, more than a second on.
const REPEATED_SIGNAL_WINDOW: Duration = Duration::from_millis(1000);

enum StopOutcome {
    Stopped,
    Signal(i32),
    TimedOut,
}

/// Waits until `stop_over` reads end of stream (the stop finished), a blocked signal
/// arrives (past `REPEATED_SIGNAL_WINDOW` after `first_signal_at`, if given), or
/// `bound` passes (if given), whichever is first.
fn wait_for_stop(
    signals: &libc::sigset_t,
    stop_over: &std::os::unix::net::UnixStream,
    first_signal_at: Option<std::time::Instant>,
    bound: Option<Duration>,
) -> std::io::Result<StopOutcome> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: `signals` is an initialised set; -1 asks for a new descriptor.
    let signal_fd = unsafe { libc::signalfd(-1, signals, libc::SFD_CLOEXEC) };
    if signal_fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: signalfd returned a new descriptor that nothing else owns.
    let signal_fd = unsafe { OwnedFd::from_raw_fd(signal_fd) };
    let deadline = bound.map(|bound| std::time::Instant::now() + bound);
    loop {
        let left =
            deadline.map(|deadline| deadline.saturating_duration_since(std::time::Instant::now()));
        if left.is_some_and(|left| left.is_zero()) {
            return Ok(StopOutcome::TimedOut);
        }
        let mut polled = [
            libc::pollfd {
                fd: signal_fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop_over.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // Rounded up, so the loop never spins on a sub-millisecond remainder; -1 waits
        // without a bound.
        let timeout_ms = left.map_or(-1, |left| {
            i32::try_from(left.as_millis() + 1).unwrap_or(i32::MAX)
        });
        // SAFETY: `polled` is a valid array of two pollfd for the duration of the call.
        let ready = unsafe { libc::poll(polled.as_mut_ptr(), 2, timeout_ms) };
        if ready < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if polled[0].revents != 0 {
            // SAFETY: signalfd_siginfo is plain data; the read fills it or fails.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            // SAFETY: `info` is a writable buffer of exactly `size` bytes.
            let read = unsafe {
                libc::read(
                    signal_fd.as_raw_fd(),
                    (&mut info as *mut libc::signalfd_siginfo).cast(),
                    size,
                )
            };
            if read == size as isize {
                let signal = info.ssi_signo as i32;
                if first_signal_at.is_none_or(|first| first.elapsed() >= REPEATED_SIGNAL_WINDOW) {
                    return Ok(StopOutcome::Signal(signal));
                }
                tracing::info!(
                    signal,
                    "signal {signal} received again within {} ms of the first: taken as the same request, the stop goes on",
                    REPEATED_SIGNAL_WINDOW.as_millis()
                );
            }
        }
        if polled[1].revents != 0 {
            return Ok(StopOutcome::Stopped);
        }
    }
}

/// Blocks SIGINT and SIGTERM on this thread before any shard thread exists, so every
/// thread inherits the mask and the signals wait for `sigwait` here.
fn block_shutdown_signals() -> std::io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t for each call.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
    }
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let result = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if result != 0 {
        return Err(std::io::Error::from_raw_os_error(result));
    }
    Ok(set)
}

fn wait_for_signal(set: &libc::sigset_t) -> std::io::Result<i32> {
    let mut signal = 0;
    // SAFETY: `set` was initialised by `block_shutdown_signals`; `signal` is a valid out
    // pointer.
    let result = unsafe { libc::sigwait(set, &mut signal) };
    if result != 0 {
        return Err(std::io::Error::from_raw_os_error(result));
    }
    Ok(signal)
}
