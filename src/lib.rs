//! shardq: a thread-per-core message broker for bare-metal Linux.
//!
//! Map of the crate and the data path. Always built:
//! - [`protocol`]: the sans-IO wire codec (frames, requests, record batches). Shared by the
//!   broker and the client; no runtime.
//! - [`delivery`]: queue semantics per (partition, group) as a sans-IO state machine:
//!   leases, acks, nacks, retries with backoff, delay, TTL, dead-lettering, and its
//!   journal codec. No runtime; the shard drives it (docs/queues.md).
//! - [`placement`]: which shard owns a partition, and which partition a key goes to.
//!
//! With feature `client` (on by default; alone: `default-features = false, features =
//! ["client"]`, which pulls no server code):
//! - `client`: the tokio client, built on `protocol` only: a connection that reconnects
//!   by itself, an idempotent batching producer that retries with backoff, a consumer
//!   that is a cancel-safe `Stream` of records (for stream groups too), and a queue
//!   consumer that receives, acks, nacks and extends for queue groups. Start at its
//!   module docs; `examples/` has whole programs.
//!
//! With feature `server` (on by default), the broker:
//! - `storage`: one partition's log: O_DIRECT segment files written through io_uring
//!   (glommio `DmaFile`), aligned append chunks, group commit, zero-fill ahead of the
//!   write position while idle, recovery, and the idempotent producers' table that
//!   stores a resent batch once.
//! - `shard`: the per-core event loop: owns partitions, places partitions on shards,
//!   forwards requests between shards over glommio's channel mesh.
//! - `server`: listeners, connections, request dispatch, start-up and shutdown, systemd
//!   notification (readiness, recovery progress, watchdog: `server::notify`).
//! - `config`: broker settings and their limits.
//! - `logs`: what the broker's `tracing` events share (the fatal exit's last line);
//!   the binary installs the subscriber that writes them.
//! - `metrics`: per-shard metric registries (the `metrics` crate's recorder, one per
//!   shard thread), their Prometheus rendering and the HTTP endpoint with health checks.
//!
//! With feature `bench`: `bench`, the load generator behind `shardq bench` (client side
//! only). The data path:
//!
//! ```text
//! client ──TCP──> shard k: decode frame, validate batches, split by partition
//!                  ├─ own partition ──> log append (aligned chunk) ──> group commit
//!                  └─ other shard's ──> channel mesh ──> owner, same path, reply back
//! owner: io_uring write ──> fdatasync ──> durable watermark ──> acks, woken fetches
//! ```
//! See docs/architecture.md for the invariants and which core does what.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod delivery;
pub mod protocol;

#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod logs;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod shard;
#[cfg(feature = "server")]
pub mod storage;

#[cfg(feature = "client")]
pub mod client;

/// The load generator behind `shardq bench` (feature `bench`; client side only).
#[cfg(feature = "bench")]
pub mod bench;

/// Partition placement, shared by the broker (which routes) and smart clients (which skip
/// the hop). Pure: the same inputs give the same shard on every host and every run.
pub mod placement;

/// Fault points the integration tests drive, in debug builds only (release builds have
/// none, and no test that needs them runs there).
#[cfg(all(feature = "server", debug_assertions))]
#[doc(hidden)]
pub mod test_hooks;
