//! Start-up, listeners and shutdown.
//!
//! `Server::start` validates the configuration, binds every listener on the calling thread
//! (so a bad address fails before any shard starts, and an ephemeral port is known up
//! front), then starts one glommio executor per shard, pinned to its CPU. Each shard joins
//! the channel mesh, recovers the partitions it owns, reports ready, and then accepts on
//! the shared port (SO_REUSEPORT: the kernel spreads connections over shards) and on its
//! own port (`listen port + 1 + shard id`, for shard-aware clients).

mod connection;
mod dispatch;

/// How often a shard checks whether it has been asked to stop.
const STOP_POLL_INTERVAL: Duration = Duration::from_millis(100);

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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{ConfigError, ServerConfig};
use crate::shard::{MeshMessage, Shard, ShardRequest};

#[derive(Debug)]
pub enum ServerError {
    Config(ConfigError),
    /// More shards were asked for than there are CPUs to pin them to.
    Placement {
        requested: usize,
        available: usize,
    },
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    DataDirectory {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// A shard failed to start (its executor, the mesh, or recovering its partitions).
    Shard {
        shard: u16,
        message: String,
    },
    Signal(std::io::Error),
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerError::Config(error) => write!(f, "{error}"),
            ServerError::Placement { requested, available } => write!(
                f,
                "cannot run {requested} shards: only {available} CPUs are online (use --cores N with N <= {available})"
            ),
            ServerError::Bind { address, source } => write!(f, "cannot listen on {address}: {source}"),
            ServerError::DataDirectory { path, source } => {
                write!(f, "data directory {}: {source}", path.display())
            }
            ServerError::Shard { shard, message } => write!(f, "shard {shard} failed to start: {message}"),
            ServerError::Signal(source) => write!(f, "waiting for a signal: {source}"),
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
    /// Each shard's own port, by shard id.
    pub shard_ports: Vec<u16>,
    stopping: Arc<AtomicBool>,
    executors: Vec<glommio::ExecutorJoinHandle<()>>,
}

impl ServerHandle {
    pub fn shard_count(&self) -> usize {
        self.executors.len()
    }

    /// Stops accepting, flushes and closes every partition, and waits for every shard.
    pub fn shutdown(self) {
        self.stopping.store(true, Ordering::Release);
        for executor in self.executors {
            let _ = executor.join();
        }
    }
}

fn listener_socket(address: SocketAddr, reuse_port: bool) -> Result<socket2::Socket, ServerError> {
    use socket2::{Domain, Socket, Type};
    let bind_error = |source| ServerError::Bind { address, source };
    let socket =
        Socket::new(Domain::for_address(address), Type::STREAM, None).map_err(bind_error)?;
    socket.set_reuse_address(true).map_err(bind_error)?;
    if reuse_port {
        socket.set_reuse_port(true).map_err(bind_error)?;
    }
    socket.bind(&address.into()).map_err(bind_error)?;
    socket.listen(1024).map_err(bind_error)?;
    Ok(socket)
}

/// Creates the probe file glommio needs: opening an existing file of at least 512 bytes
/// with O_DIRECT before any new one keeps its polled-I/O probe from misfiring (glommio
/// issues 605 and 670; see DESIGN.md).
fn prepare_probe_file(config: &ServerConfig) -> Result<std::path::PathBuf, ServerError> {
    let path = config.data_dir.join(".direct-io-probe");
    std::fs::write(&path, vec![0u8; 4096]).map_err(|source| ServerError::DataDirectory {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

impl ServerHandle {
    pub fn start(config: ServerConfig) -> Result<ServerHandle, ServerError> {
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
        let shard_count = config.cores.unwrap_or(online.len());
        if shard_count > online.len() || shard_count > usize::from(u16::MAX) {
            return Err(ServerError::Placement {
                requested: shard_count,
                available: online.len(),
            });
        }
        let mut config = config;
        std::fs::create_dir_all(&config.data_dir).map_err(|source| ServerError::DataDirectory {
            path: config.data_dir.clone(),
            source,
        })?;
        // Absolute from here on: glommio resolves some relative paths against a
        // descriptor rather than the working directory, and logs read better anyway.
        config.data_dir = std::fs::canonicalize(&config.data_dir).map_err(|source| {
            ServerError::DataDirectory {
                path: config.data_dir.clone(),
                source,
            }
        })?;
        let probe_path = prepare_probe_file(&config)?;

        // Listeners: the shared one first, so port 0 resolves once for every shard.
        let first = listener_socket(config.listen, true)?;
        let local_addr = first
            .local_addr()
            .ok()
            .and_then(|address| address.as_socket())
            .expect("a bound TCP socket has an address");
        let mut shared = vec![first];
        for _ in 1..shard_count {
            shared.push(listener_socket(local_addr, true)?);
        }
        let mut own = Vec::with_capacity(shard_count);
        let mut shard_ports = Vec::with_capacity(shard_count);
        for shard in 0..shard_count {
            let port = if config.listen.port() == 0 {
                0
            } else {
                let port = u32::from(local_addr.port()) + 1 + shard as u32;
                u16::try_from(port).map_err(|_| ServerError::Bind {
                    address: local_addr,
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("shard {shard}'s port {port} is above 65535"),
                    ),
                })?
            };
            let socket = listener_socket(SocketAddr::new(local_addr.ip(), port), false)?;
            let bound = socket
                .local_addr()
                .ok()
                .and_then(|address| address.as_socket())
                .expect("a bound TCP socket has an address");
            shard_ports.push(bound.port());
            own.push(socket);
        }

        let mesh = MeshBuilder::<MeshMessage, _>::full(shard_count, config.mesh_channel_capacity);
        let (ready_sender, ready_receiver) = mpsc::channel::<Result<u16, ServerError>>();
        let stopping = Arc::new(AtomicBool::new(false));
        let mut executors = Vec::with_capacity(shard_count);
        let io_memory = config.chunk_memory_bytes_per_shard_max + (16 << 20);
        for (shard, (shared_socket, own_socket)) in shared.into_iter().zip(own).enumerate() {
            let stopping_flag = Arc::clone(&stopping);
            let config = config.clone();
            let mesh = mesh.clone();
            let ports = shard_ports.clone();
            let ready = ready_sender.clone();
            let probe_path = probe_path.clone();
            let shared_fd = shared_socket.into_raw_fd();
            let own_fd = own_socket.into_raw_fd();
            let builder = LocalExecutorBuilder::new(Placement::Fixed(online[shard]))
                .name(&format!("shardq-shard-{shard}"))
                .io_memory(io_memory);
            let spawned = builder.spawn(move || async move {
                // SAFETY: both descriptors were just created by `listener_socket` and
                // handed over with `into_raw_fd`; this is their only owner.
                let (shared_listener, own_listener) = unsafe {
                    (
                        TcpListener::from_raw_fd(shared_fd),
                        TcpListener::from_raw_fd(own_fd),
                    )
                };
                let shard_id = shard as u16;
                let started = start_shard(
                    shard_id,
                    shard_count as u16,
                    config,
                    ports,
                    mesh,
                    &probe_path,
                )
                .await;
                let (shard, receivers) = match started {
                    Ok(started) => {
                        let _ = ready.send(Ok(shard_id));
                        started
                    }
                    Err(error) => {
                        let _ = ready.send(Err(error));
                        return;
                    }
                };
                run_shard(
                    shard,
                    receivers,
                    shared_listener,
                    own_listener,
                    stopping_flag,
                )
                .await;
            });
            match spawned {
                Ok(handle) => executors.push(handle),
                Err(error) => {
                    let handle = ServerHandle {
                        local_addr,
                        shard_ports,
                        stopping,
                        executors,
                    };
                    handle.shutdown();
                    return Err(ServerError::Shard {
                        shard: shard as u16,
                        message: format!("starting its executor: {error}"),
                    });
                }
            }
        }
        drop(ready_sender);
        let handle = ServerHandle {
            local_addr,
            shard_ports,
            stopping,
            executors,
        };
        for _ in 0..shard_count {
            match ready_receiver.recv() {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    handle.shutdown();
                    return Err(error);
                }
                Err(_) => {
                    handle.shutdown();
                    return Err(ServerError::Shard {
                        shard: 0,
                        message: "a shard stopped before reporting".into(),
                    });
                }
            }
        }
        Ok(handle)
    }
}

async fn start_shard(
    shard_id: u16,
    shard_count: u16,
    config: ServerConfig,
    shard_ports: Vec<u16>,
    mesh: MeshBuilder<MeshMessage, glommio::channels::channel_mesh::Full>,
    probe_path: &std::path::Path,
) -> Result<(Rc<Shard>, Receivers<MeshMessage>), ServerError> {
    let fail = |message: String| ServerError::Shard {
        shard: shard_id,
        message,
    };
    // Joining first: a shard that failed before joining would leave its siblings
    // waiting for it forever.
    let (senders, receivers) = mesh
        .join()
        .await
        .map_err(|error| fail(format!("joining the channel mesh: {error}")))?;
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
    let shard = Shard::new(shard_id, shard_count, config, shard_ports, senders);
    shard
        .load_topics()
        .await
        .map_err(|error| fail(format!("recovering partitions: {error}")))?;
    Ok((shard, receivers))
}

async fn run_shard(
    shard: Rc<Shard>,
    mut receivers: Receivers<MeshMessage>,
    shared_listener: TcpListener,
    own_listener: TcpListener,
    stopping: Arc<AtomicBool>,
) {
    let mut background = Vec::new();
    for (_, stream) in receivers.streams() {
        let shard = Rc::clone(&shard);
        background.push(
            glommio::spawn_local(async move {
                while let Some(message) = stream.recv().await {
                    let shard = Rc::clone(&shard);
                    glommio::spawn_local(async move {
                        let MeshMessage { request, mut reply } = message;
                        let abandonable = matches!(request, ShardRequest::Fetch { .. });
                        let outcome = if abandonable {
                            // A long-poll the asking shard gave up on stops here too,
                            // instead of holding memory until its deadline.
                            futures_lite::future::or(
                                async { Some(shard.execute(request).await) },
                                async {
                                    reply.cancellation().await;
                                    None
                                },
                            )
                            .await
                        } else {
                            Some(shard.execute(request).await)
                        };
                        if let Some(outcome) = outcome {
                            let _ = reply.send(outcome);
                        }
                    })
                    .detach();
                }
            })
            .detach(),
        );
    }
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
    // Open connections by id, so that a shutdown can close the ones still open.
    let connections: Rc<RefCell<HashMap<u64, JoinHandle<()>>>> =
        Rc::new(RefCell::new(HashMap::new()));
    let next_connection = Rc::new(std::cell::Cell::new(0u64));
    for listener in [shared_listener, own_listener] {
        let shard = Rc::clone(&shard);
        let connections = Rc::clone(&connections);
        let next_connection = Rc::clone(&next_connection);
        background.push(
            glommio::spawn_local(async move {
                loop {
                    let stream = match listener.accept().await {
                        Ok(stream) => stream,
                        Err(error) => {
                            eprintln!("shardq: shard {}: accept failed: {error}", shard.id);
                            glommio::timer::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    };
                    let open = connections.borrow().len() as u64;
                    if open >= u64::from(shard.config.connections_per_shard_max) {
                        // Over the limit: closing at once is the clearest refusal a
                        // client that has not spoken yet can get.
                        drop(stream);
                        continue;
                    }
                    let id = next_connection.get();
                    next_connection.set(id + 1);
                    let shard = Rc::clone(&shard);
                    let registry = Rc::clone(&connections);
                    let handle = glommio::spawn_local(async move {
                        connection::serve(shard, stream).await;
                        registry.borrow_mut().remove(&id);
                    })
                    .detach();
                    connections.borrow_mut().insert(id, handle);
                }
            })
            .detach(),
        );
    }
    // The stop request comes from a thread outside every executor. Checking a flag a few
    // times a second costs nothing measurable and needs no cross-runtime channel.
    while !stopping.load(Ordering::Acquire) {
        glommio::timer::sleep(STOP_POLL_INTERVAL).await;
    }
    for task in background {
        task.cancel();
    }
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
}

/// Runs the broker until SIGINT or SIGTERM, then shuts it down cleanly.
pub fn run_until_signal(config: ServerConfig) -> Result<(), ServerError> {
    let signals = block_shutdown_signals().map_err(ServerError::Signal)?;
    let handle = ServerHandle::start(config)?;
    eprintln!(
        "shardq: serving on {} with {} shards (shard ports {:?})",
        handle.local_addr,
        handle.shard_count(),
        handle.shard_ports
    );
    let signal = wait_for_signal(&signals).map_err(ServerError::Signal)?;
    eprintln!("shardq: signal {signal} received, shutting down");
    handle.shutdown();
    Ok(())
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
