//! The broker's start-up lines: the recovery total (once every shard has recovered) and
//! the start-up summary (`shardq serve`, once every shard listens). Each is one event
//! built in one place, so that what an operator reads first after a start is decided
//! here.
//!
//! The summary's message keeps the form scripts and tests parse: `serving on ADDR with N
//! shards (shard ports [...]); metrics on http://ADDR/metrics` (or `metrics off`), the
//! address followed by a space.

use std::time::Duration;

use super::ServerHandle;
use crate::shard::RecoveredTotals;

/// One line for the whole start-up recovery (each partition has logged its own).
pub(super) fn log_recovery_total(recovered: &RecoveredTotals, elapsed: Duration) {
    tracing::info!(
        partitions = recovered.partitions,
        records = recovered.records,
        segments = recovered.segments,
        bytes = recovered.bytes,
        elapsed_ms = elapsed.as_millis() as u64,
        "recovered {} partitions: {} records in {} segments in {} ms",
        recovered.partitions,
        recovered.records,
        recovered.segments,
        elapsed.as_millis()
    );
}

/// The start-up summary: version, data directory, shards and their CPUs, listeners.
/// The settings that differ from their defaults are logged by `shardq serve` before the
/// broker starts (`cli::config`): the library does not know where a value came from.
pub(super) fn log_startup_summary(handle: &ServerHandle) {
    let metrics = match handle.metrics_addr {
        Some(address) => format!("on http://{address}/metrics"),
        None => "off".to_owned(),
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        data_dir = %handle.data_dir.display(),
        shards = handle.shard_count(),
        cpus = ?handle.shard_cpus,
        listen = %handle.local_addr,
        shard_ports = ?handle.shard_ports,
        metrics_address = handle.metrics_addr.map(|address| address.to_string()),
        partitions = handle.recovered.partitions,
        "serving on {} with {} shards (shard ports {:?}); metrics {metrics}",
        handle.local_addr,
        handle.shard_count(),
        handle.shard_ports,
    );
}
