//! Partition -> shard placement.
//!
//! `shard_for(topic, partition, shard_count) = (fnv1a64(topic) + partition) mod shard_count`.
//!
//! Consecutive partitions of a topic land on consecutive shards, so a topic with at least
//! as many partitions as shards uses every core, and the hash offsets topics from each
//! other so that many small topics do not all start on shard 0. The function is pure and
//! depends only on its arguments: placement changes only when the shard count does.

/// FNV-1a, 64-bit. Chosen for being tiny, stable across versions and platforms, and
/// documented: clients in other languages can reproduce it in a few lines.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The shard that owns `partition` of `topic` when the broker runs `shard_count` shards.
pub fn shard_for(topic: &str, partition: u32, shard_count: u16) -> u16 {
    shard_for_hashed(fnv1a64(topic.as_bytes()), partition, shard_count)
}

/// `shard_for` with the topic's hash computed once: a request listing thousands of
/// partitions of one topic hashes its name once, not once per partition.
pub fn shard_for_hashed(topic_hash: u64, partition: u32, shard_count: u16) -> u16 {
    assert!(shard_count > 0, "a broker has at least one shard");
    let slot = topic_hash.wrapping_add(u64::from(partition));
    (slot % u64::from(shard_count)) as u16
}

/// The partition a keyed message goes to: the same key always maps to the same partition
/// while the partition count is unchanged.
pub fn partition_for_key(key: &[u8], partition_count: u32) -> u32 {
    assert!(partition_count > 0, "a topic has at least one partition");
    (fnv1a64(key) % u64::from(partition_count)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    /// docs/protocol.md §9: every reference value `fnv1a64("…") = 0x…` it prints, and
    /// the shards it says partitions 0–3 of `orders` live on, read from the document at
    /// test time so the two cannot drift apart.
    #[test]
    fn protocol_md_placement_examples_match_the_code() {
        let doc = include_str!("../docs/protocol.md");
        let section = doc
            .split("## 9. Placement")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("protocol.md has §9");
        let mut references = 0;
        for piece in section.split("`fnv1a64(\"").skip(1) {
            let (input, rest) = piece.split_once("\")").expect("a quoted input");
            let hex = rest
                .trim_start()
                .strip_prefix("= 0x")
                .and_then(|rest| rest.split('`').next())
                .expect("= 0x… after each reference input");
            let documented = u64::from_str_radix(hex, 16).expect("hex");
            assert_eq!(
                fnv1a64(input.as_bytes()),
                documented,
                "protocol.md §9: fnv1a64({input:?})"
            );
            references += 1;
        }
        assert_eq!(references, 4, "the four reference values of §9");
        let shards_listed = |after: &str, until: char| -> Vec<u16> {
            let start = section
                .find(after)
                .unwrap_or_else(|| panic!("§9 says {after:?}"))
                + after.len();
            section[start..]
                .split(until)
                .next()
                .unwrap()
                .split(',')
                .map(|shard| shard.trim().parse().expect("a shard number"))
                .collect()
        };
        let on_4 = shards_listed("partitions 0–3 of `orders` live on shards ", ';');
        let on_8 = shards_listed("with 8 shards on ", '.');
        for (shard_count, documented) in [(4, on_4), (8, on_8)] {
            let computed: Vec<u16> = (0..4)
                .map(|partition| shard_for("orders", partition, shard_count))
                .collect();
            assert_eq!(
                computed, documented,
                "protocol.md §9: partitions 0–3 of orders with {shard_count} shards"
            );
        }
    }

    #[test]
    fn consecutive_partitions_spread_over_every_shard() {
        for shards in 1..=8u16 {
            let mut seen = vec![false; shards as usize];
            for partition in 0..u32::from(shards) {
                seen[shard_for("orders", partition, shards) as usize] = true;
            }
            assert!(seen.iter().all(|s| *s), "{shards} shards");
        }
    }
}
