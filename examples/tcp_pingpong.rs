//! 64-byte TCP ping-pong over loopback: the floor under any request/response latency on
//! this host (two syscalls and a wake-up each way). Used by scripts/bench-baseline.sh.
//!
//! `cargo run --release --example tcp_pingpong -- [ITERATIONS] [MESSAGE_BYTES] [ECHO_CPU
//! CLIENT_CPU [RATE]]` prints one JSON object: round-trip percentiles in microseconds.
//! Bounded: ITERATIONS round trips (default 50,000) after 5,000 warm-up ones, then both
//! threads exit. Round trips go back to back, so neither CPU goes idle; with RATE (per
//! second) the client sends one every 1/RATE s and sleeps in between, as a paced
//! producer does (`shardq bench --rate`), and warms up with 500. Each round trip is
//! timed from its actual send. With the two CPUs the echo thread and the client thread are pinned to them
//! (scripts/bench-latency.sh puts them where its servers and clients run): unpinned, the
//! scheduler may run both on one CPU, where a round trip is two direct switches (a few
//! microseconds) instead of two cross-CPU wake-ups (tens on a VM).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn main() {
    let mut arguments = std::env::args().skip(1);
    let iterations: usize = arguments
        .next()
        .map_or(50_000, |text| text.parse().expect("ITERATIONS is a number"));
    let size: usize = arguments
        .next()
        .map_or(64, |text| text.parse().expect("MESSAGE_BYTES is a number"));
    let pinned: Option<(usize, usize)> = arguments.next().map(|echo_cpu| {
        let client_cpu = arguments.next().expect("CLIENT_CPU follows ECHO_CPU");
        (
            echo_cpu.parse().expect("ECHO_CPU is a number"),
            client_cpu.parse().expect("CLIENT_CPU is a number"),
        )
    });
    let interval: Option<Duration> = arguments.next().map(|rate| {
        let rate: u64 = rate.parse().expect("RATE is a number");
        assert!(rate > 0, "RATE is at least 1 round trip per second");
        Duration::from_nanos(1_000_000_000 / rate)
    });
    let pin = |cpu: usize| {
        assert!(
            core_affinity::set_for_current(core_affinity::CoreId { id: cpu }),
            "pinning a thread to CPU {cpu}"
        );
    };
    let warmup = if interval.is_some() { 500 } else { 5_000 };
    let total = warmup + iterations;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let address = listener.local_addr().expect("local address");
    let echo = std::thread::spawn(move || {
        if let Some((echo_cpu, _)) = pinned {
            pin(echo_cpu);
        }
        let (mut stream, _) = listener.accept().expect("accept");
        stream.set_nodelay(true).expect("nodelay");
        let mut buffer = vec![0u8; size];
        for _ in 0..total {
            stream.read_exact(&mut buffer).expect("read ping");
            stream.write_all(&buffer).expect("write pong");
        }
    });
    if let Some((_, client_cpu)) = pinned {
        pin(client_cpu);
    }
    let mut stream = TcpStream::connect(address).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let ping = vec![0x5au8; size];
    let mut pong = vec![0u8; size];
    let mut samples_ns: Vec<u64> = Vec::with_capacity(iterations);
    let first_send = Instant::now();
    for round in 0..total {
        if let Some(interval) = interval {
            let intended = first_send + interval * round as u32;
            let now = Instant::now();
            if intended > now {
                std::thread::sleep(intended - now);
            }
        }
        let started = Instant::now();
        stream.write_all(&ping).expect("write ping");
        stream.read_exact(&mut pong).expect("read pong");
        if round >= warmup {
            samples_ns.push(started.elapsed().as_nanos() as u64);
        }
    }
    echo.join().expect("echo thread");
    samples_ns.sort_unstable();
    let at = |quantile: f64| {
        let index =
            ((samples_ns.len() as f64 * quantile).ceil() as usize).clamp(1, samples_ns.len());
        samples_ns[index - 1] as f64 / 1_000.0
    };
    let rate = match interval {
        Some(interval) => format!("{}", 1_000_000_000 / interval.as_nanos()),
        None => "\"back to back\"".to_owned(),
    };
    let cpus = match pinned {
        Some((echo_cpu, client_cpu)) => format!("\"echo {echo_cpu}, client {client_cpu}\""),
        None => "\"not pinned\"".to_owned(),
    };
    println!(
        "{{\"message_bytes\": {size}, \"iterations\": {iterations}, \"cpus\": {cpus}, \"rate_per_s\": {rate}, \"p50_us\": {:.2}, \"p90_us\": {:.2}, \"p99_us\": {:.2}, \"p999_us\": {:.2}, \"max_us\": {:.2}}}",
        at(0.50),
        at(0.90),
        at(0.99),
        at(0.999),
        samples_ns[samples_ns.len() - 1] as f64 / 1_000.0
    );
}
