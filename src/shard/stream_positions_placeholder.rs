//! PLACEHOLDER, to be replaced at merge by the stream-group work (CommitOffsets /
//! FetchCommitted, with its per-partition offsets file): until then no stream group
//! exists, so DescribeGroups lists queue groups only. Delete this file (and its `mod`
//! line in `shard/mod.rs`) when `Shard::stream_group_positions` lands.

use super::Shard;

impl Shard {
    /// The committed offsets of every stream group of an owned partition, as
    /// (group, offset). Placeholder: no stream groups yet.
    pub fn stream_group_positions(&self, _topic: &str, _partition: u32) -> Vec<(String, u64)> {
        Vec::new()
    }
}
