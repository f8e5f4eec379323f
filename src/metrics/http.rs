//! The metrics and health HTTP endpoint (`metrics_listen`): `GET /metrics` (Prometheus
//! text format), `GET /health/live` and `GET /health/ready`.
//!
//! It runs on threads of its own, never on a shard: a stalled shard must not take its
//! own health check down with it, and a scraper must not cost a shard more than
//! answering one byte. Each shard has a link to this side (a Unix socket pair): one byte
//! asks it to publish a snapshot of its state gauges, or just to answer (a ping); the
//! shard echoes the byte once done. A shard that does not answer within
//! `metrics_shard_answer_timeout_ms` is reported: not live, `shardq_shard_up 0`, and its
//! last numbers are shown.
//!
//! Bounded like the broker's own port: at most `CONNECTIONS_MAX` connections at once
//! (more are answered 503 and closed), requests of at most `REQUEST_HEAD_BYTES_MAX`
//! bytes, read and write timeouts; every answer closes its connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{render, GaugeCell, HistogramCell, Registry};

const CONNECTIONS_MAX: usize = 32;
const REQUEST_HEAD_BYTES_MAX: usize = 8192;
/// For a whole request head to arrive, and for each write of the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// An answer slower than this counts as a stall of the shard's loop.
const STALL: Duration = Duration::from_millis(100);

/// What a link byte asks of a shard (the low 7 bits are a sequence number, so a late
/// answer to an earlier question is told apart).
pub const LINK_COLLECT: u8 = 0x80;
/// A question every shard answered this recently is the answer for the next caller too:
/// however many scrapers and probes there are, a healthy shard is asked at most a few
/// times a second.
const ANSWER_REUSE: Duration = Duration::from_millis(250);

/// This side of one shard's link (non-blocking).
struct Link {
    stream: UnixStream,
    sequence: u8,
    /// The question sent and not answered yet. A shard is never sent a second question
    /// while one is unanswered, so a stalled shard's socket cannot fill up (and block the
    /// asker) and sequence numbers cannot wrap onto a live question.
    unanswered: Option<u8>,
    /// The shard's side closed (the shard stopped): never asked again, always silent.
    gone: bool,
}

/// Every link, and the last question's outcome.
struct Links {
    links: Vec<Link>,
    /// When the last question was answered (or timed out), whether it collected
    /// snapshots, and which shards were silent.
    last: Option<(Instant, bool, Vec<u16>)>,
}

/// What the endpoint shares with the broker.
pub struct Endpoint {
    registries: Vec<Arc<Registry>>,
    /// Locked for a whole question to every shard, so two callers never read each
    /// other's answers.
    links: Mutex<Links>,
    answer_timeout: Duration,
    /// Recovery done and every shard listening; false again once shutdown starts.
    ready: AtomicBool,
    up: Vec<Arc<GaugeCell>>,
    stalls: Vec<Arc<super::CounterCell>>,
    pings: Vec<Arc<HistogramCell>>,
}

impl Endpoint {
    /// `links`: this side of each shard's link, by shard id.
    pub fn new(
        registries: Vec<Arc<Registry>>,
        links: Vec<UnixStream>,
        answer_timeout: Duration,
    ) -> std::io::Result<Arc<Endpoint>> {
        assert_eq!(registries.len(), links.len(), "one link per shard");
        let key = |name: &'static str| metrics::Key::from_static_name(name);
        let mut up = Vec::new();
        let mut stalls = Vec::new();
        let mut pings = Vec::new();
        for registry in &registries {
            match registry.cell(&key("shardq_shard_up"), super::Kind::Gauge) {
                super::Cell::Gauge(cell) => up.push(cell),
                _ => unreachable!("cell() returns the kind asked for"),
            }
            match registry.cell(&key("shardq_shard_stalls_total"), super::Kind::Counter) {
                super::Cell::Counter(cell) => stalls.push(cell),
                _ => unreachable!("cell() returns the kind asked for"),
            }
            match registry.cell(&key("shardq_shard_ping_seconds"), super::Kind::Histogram) {
                super::Cell::Histogram(cell) => pings.push(cell),
                _ => unreachable!("cell() returns the kind asked for"),
            }
        }
        let mut all = Vec::with_capacity(links.len());
        for stream in links {
            stream.set_nonblocking(true)?;
            all.push(Link {
                stream,
                sequence: 0,
                unanswered: None,
                gone: false,
            });
        }
        Ok(Arc::new(Endpoint {
            registries,
            links: Mutex::new(Links {
                links: all,
                last: None,
            }),
            answer_timeout,
            ready: AtomicBool::new(false),
            up,
            stalls,
            pings,
        }))
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Asks every shard (to publish a snapshot, or just to answer) and says which did not
    /// answer within the timeout. Every shard is asked at once and every answer is taken
    /// as it arrives, so one slow shard costs the others nothing. A shard still silent on
    /// an earlier question is not asked again: its answer to that one, when it comes,
    /// counts.
    pub fn ask_shards(&self, collect: bool) -> Vec<u16> {
        let mut state = self.links.lock().unwrap_or_else(PoisonError::into_inner);
        // Only a healthy answer is shared: after a silence, every caller looks again.
        if let Some((at, collected, silent)) = &state.last {
            if silent.is_empty() && at.elapsed() < ANSWER_REUSE && (*collected || !collect) {
                return Vec::new();
            }
        }
        let started = Instant::now();
        let mut answered_at: Vec<Option<Duration>> = vec![None; state.links.len()];
        for link in state.links.iter_mut() {
            if link.unanswered.is_some() || link.gone {
                continue;
            }
            link.sequence = (link.sequence + 1) & 0x7f;
            let byte = link.sequence | if collect { LINK_COLLECT } else { 0 };
            // One byte into an empty socket buffer: it cannot block; an error means the
            // shard is gone.
            if link.stream.write_all(&[byte]).is_ok() {
                link.unanswered = Some(byte);
            }
        }
        loop {
            for (shard, link) in state.links.iter_mut().enumerate() {
                if answered_at[shard].is_none() && take_answers(link) {
                    answered_at[shard] = Some(started.elapsed());
                }
            }
            let waiting: Vec<libc::pollfd> = state
                .links
                .iter()
                .filter(|link| link.unanswered.is_some())
                .map(|link| libc::pollfd {
                    fd: link.stream.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            let left = self.answer_timeout.saturating_sub(started.elapsed());
            if waiting.is_empty() || left.is_zero() {
                break;
            }
            let mut waiting = waiting;
            let timeout_ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
            // SAFETY: `waiting` is a live, exclusively borrowed array of `waiting.len()`
            // pollfd structs; the descriptors belong to links held under the lock.
            unsafe {
                libc::poll(
                    waiting.as_mut_ptr(),
                    waiting.len() as libc::nfds_t,
                    timeout_ms,
                )
            };
        }
        let mut silent = Vec::new();
        for (shard, took) in answered_at.into_iter().enumerate() {
            match took {
                Some(took) => {
                    super::HistogramFn::record(&*self.pings[shard], took.as_secs_f64());
                    if took > STALL {
                        super::CounterFn::increment(&*self.stalls[shard], 1);
                    }
                    metrics::GaugeFn::set(&*self.up[shard], 1.0);
                }
                None => {
                    super::CounterFn::increment(&*self.stalls[shard], 1);
                    metrics::GaugeFn::set(&*self.up[shard], 0.0);
                    silent.push(shard as u16);
                }
            }
        }
        state.last = Some((Instant::now(), collect, silent.clone()));
        silent
    }
}

/// Reads whatever answers the shard has sent (without waiting); true once the answer to
/// its unanswered question is among them. Earlier, late answers are skipped. A closed
/// link is marked gone, so it is not polled (it would be readable at once, forever).
fn take_answers(link: &mut Link) -> bool {
    let Some(expected) = link.unanswered else {
        return false;
    };
    let mut answers = [0u8; 64];
    loop {
        match link.stream.read(&mut answers) {
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(0) | Err(_) => {
                link.gone = true;
                link.unanswered = None;
                return false;
            }
            Ok(read) => {
                if answers[..read].contains(&expected) {
                    link.unanswered = None;
                    return true;
                }
            }
        }
    }
}

/// The running endpoint: its accept thread.
pub struct MetricsServer {
    pub local_addr: SocketAddr,
    /// A second descriptor of the listening socket, shut down to wake the accept thread.
    wake: TcpListener,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Serves `listener` until `stop`.
    pub fn start(listener: TcpListener, endpoint: Arc<Endpoint>) -> std::io::Result<MetricsServer> {
        let local_addr = listener.local_addr()?;
        let wake = listener.try_clone()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let thread = {
            let stopping = Arc::clone(&stopping);
            std::thread::Builder::new()
                .name("shardq-metrics".into())
                .spawn(move || accept_loop(listener, endpoint, stopping))?
        };
        Ok(MetricsServer {
            local_addr,
            wake,
            stopping,
            thread: Some(thread),
        })
    }

    pub fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stopping.store(true, Ordering::Release);
        // SAFETY: `wake` is a descriptor this struct owns (a dup of the listening socket),
        // open until it is dropped; shutting the socket down makes the accept blocked on
        // it return EINVAL on Linux.
        unsafe { libc::shutdown(self.wake.as_raw_fd(), libc::SHUT_RDWR) };
        let _ = thread.join();
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(listener: TcpListener, endpoint: Arc<Endpoint>, stopping: Arc<AtomicBool>) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = listener.accept();
        if stopping.load(Ordering::Acquire) {
            return;
        }
        let Ok((stream, _)) = accepted else {
            // Out of descriptors, say: try again shortly rather than spin.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
        let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
        if active.fetch_add(1, Ordering::AcqRel) >= CONNECTIONS_MAX {
            active.fetch_sub(1, Ordering::AcqRel);
            let mut stream = stream;
            let _ = respond(
                &mut stream,
                503,
                PLAIN,
                "busy: too many metrics connections\n",
                false,
            );
            continue;
        }
        let endpoint = Arc::clone(&endpoint);
        let counted = Arc::clone(&active);
        let spawned = std::thread::Builder::new()
            .name("shardq-metrics-connection".into())
            .spawn(move || {
                serve(stream, &endpoint);
                counted.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Reads one request head and answers it. The whole head must arrive within
/// `CLIENT_TIMEOUT`, not each piece of it: a client trickling a byte at a time would
/// otherwise hold one of the few connection slots, and the health checks with it.
fn serve(mut stream: TcpStream, endpoint: &Endpoint) {
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let mut head = Vec::with_capacity(1024);
    let mut buffer = [0u8; 1024];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        if head.len() > REQUEST_HEAD_BYTES_MAX {
            let _ = respond(&mut stream, 431, PLAIN, "request head too large\n", false);
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(read) => head.extend_from_slice(&buffer[..read]),
        }
    }
    let line = head.split(|byte| *byte == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        let _ = respond(&mut stream, 405, PLAIN, "only GET and HEAD\n", false);
        return;
    }
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = answer(path, endpoint);
    let _ = respond(&mut stream, status, content_type, &body, head_only);
}

const PLAIN: &str = "text/plain; charset=utf-8";
/// The Prometheus text exposition format.
const EXPOSITION: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The status, content type and body for `path`.
pub fn answer(path: &str, endpoint: &Endpoint) -> (u16, &'static str, String) {
    match path {
        "/metrics" => {
            endpoint.ask_shards(true);
            (200, EXPOSITION, render(&endpoint.registries))
        }
        "/health/live" => match endpoint.ask_shards(false).as_slice() {
            [] => (200, PLAIN, "live\n".into()),
            silent => (
                503,
                PLAIN,
                format!(
                    "not live: shard(s) {silent:?} did not answer within {} ms\n",
                    endpoint.answer_timeout.as_millis()
                ),
            ),
        },
        "/health/ready" if endpoint.is_ready() => (200, PLAIN, "ready\n".into()),
        "/health/ready" => (
            503,
            PLAIN,
            "not ready: starting (recovering, binding) or shutting down\n".into(),
        ),
        _ => (
            404,
            PLAIN,
            "not found: try /metrics, /health/live or /health/ready\n".into(),
        ),
    }
}

fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    if !head_only {
        stream.write_all(body.as_bytes())?;
    }
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An endpoint over two shards: shard 1 echoes every byte back on a thread of its
    /// own (a shard whose loop turns), shard 0 never answers (a stalled shard).
    fn endpoint() -> (Arc<Endpoint>, UnixStream, std::thread::JoinHandle<()>) {
        let (ours_0, theirs_0) = UnixStream::pair().unwrap();
        let (ours_1, stalled) = UnixStream::pair().unwrap();
        let echo = std::thread::spawn(move || {
            let mut theirs = theirs_0;
            let mut byte = [0u8; 1];
            while let Ok(1) = theirs.read(&mut byte) {
                if theirs.write_all(&byte).is_err() {
                    return;
                }
            }
        });
        let endpoint = Endpoint::new(
            vec![Registry::new(0), Registry::new(1)],
            // Shard 0 is the stalled one: asked first, it must not cost shard 1 its answer.
            vec![ours_1, ours_0],
            Duration::from_millis(200),
        )
        .unwrap();
        (endpoint, stalled, echo)
    }

    #[test]
    fn live_names_the_shard_that_did_not_answer_and_ready_follows_its_flag() {
        let (endpoint, stalled, _echo) = endpoint();
        let (status, _, body) = answer("/health/ready", &endpoint);
        assert_eq!(status, 503, "not ready before start-up says so: {body}");
        endpoint.set_ready(true);
        assert_eq!(answer("/health/ready", &endpoint).0, 200);
        let (status, _, body) = answer("/health/live", &endpoint);
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("[0]") && body.contains("200 ms"), "{body}");
        let (status, content_type, text) = answer("/metrics", &endpoint);
        assert_eq!((status, content_type), (200, EXPOSITION));
        assert!(text.contains("shardq_shard_up{shard=\"1\"} 1\n"), "{text}");
        assert!(text.contains("shardq_shard_up{shard=\"0\"} 0\n"), "{text}");
        // The live check and the scrape: two questions shard 0 left unanswered.
        assert!(
            text.contains("shardq_shard_stalls_total{shard=\"0\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("shardq_shard_stalls_total{shard=\"1\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("shardq_shard_ping_seconds_bucket{shard=\"1\",le=\"0.1\"} 2\n"),
            "{text}"
        );
        // The stalled shard comes back: its late answers to earlier questions are
        // skipped, and it is live again.
        let mut shard_0 = stalled;
        let echo_0 = std::thread::spawn(move || {
            let mut byte = [0u8; 1];
            while let Ok(1) = shard_0.read(&mut byte) {
                if shard_0.write_all(&byte).is_err() {
                    return;
                }
            }
        });
        assert_eq!(answer("/health/live", &endpoint).0, 200);
        endpoint.set_ready(false);
        assert_eq!(answer("/health/ready", &endpoint).0, 503);
        assert_eq!(answer("/nowhere", &endpoint).0, 404);
        drop(endpoint);
        echo_0.join().unwrap();
    }

    #[test]
    fn a_shard_whose_link_closed_is_silent_without_waiting_out_the_timeout() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let endpoint =
            Endpoint::new(vec![Registry::new(0)], vec![ours], Duration::from_secs(30)).unwrap();
        // The shard takes the question, then goes away without answering.
        let shard = std::thread::spawn(move || {
            let mut theirs = theirs;
            let mut byte = [0u8; 1];
            theirs.read_exact(&mut byte).unwrap();
        });
        let started = Instant::now();
        assert_eq!(endpoint.ask_shards(false), vec![0]);
        shard.join().unwrap();
        // Far below the 30 s answer timeout: the end of stream settles it.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        // And it is not asked (nor waited for) again.
        let started = Instant::now();
        assert_eq!(endpoint.ask_shards(false), vec![0]);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }

    fn exchange(address: SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(address).unwrap();
        stream.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
        stream.write_all(request).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    }

    #[test]
    fn the_server_answers_get_and_head_and_refuses_other_methods_and_huge_heads() {
        let (endpoint, _stalled, _echo) = endpoint();
        endpoint.set_ready(true);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut server = MetricsServer::start(listener, endpoint).unwrap();
        let address = server.local_addr;
        let got = exchange(address, b"GET /health/ready HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(
            got.starts_with("HTTP/1.1 200 OK\r\n") && got.ends_with("\r\n\r\nready\n"),
            "{got}"
        );
        let got = exchange(address, b"HEAD /health/ready HTTP/1.1\r\n\r\n");
        assert!(
            got.contains("Content-Length: 6\r\n") && got.ends_with("\r\n\r\n"),
            "{got}"
        );
        let got = exchange(address, b"POST /metrics HTTP/1.1\r\n\r\n");
        assert!(got.starts_with("HTTP/1.1 405 "), "{got}");
        let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', REQUEST_HEAD_BYTES_MAX + 10));
        let got = exchange(address, &huge);
        assert!(got.starts_with("HTTP/1.1 431 "), "{got}");
        // A head that never completes is dropped at the deadline, not kept alive by a
        // trickle.
        let mut slow = TcpStream::connect(address).unwrap();
        slow.set_read_timeout(Some(CLIENT_TIMEOUT * 3)).unwrap();
        let started = Instant::now();
        let mut closed = false;
        while started.elapsed() < CLIENT_TIMEOUT * 2 {
            if slow.write_all(b"G").is_err() {
                closed = true;
                break;
            }
            let mut byte = [0u8; 1];
            // Waits up to 200 ms for the end of stream; a timeout means still open.
            slow.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            if let Ok(0) = slow.read(&mut byte) {
                closed = true;
                break;
            }
        }
        assert!(
            closed,
            "a trickling client was still connected after {:?}",
            started.elapsed()
        );
        server.stop();
        assert!(TcpStream::connect(address).is_err(), "stopped means closed");
    }
}
