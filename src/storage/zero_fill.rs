//! Zero-filling a segment ahead of its write position, so that durable rounds write into
//! blocks that are already written.
//!
//! Why: segments are reserved with fallocate, which leaves *unwritten* extents. On ext4 an
//! O_DIRECT write into an unwritten extent makes the next fdatasync commit the journal
//! (the extent becomes written): measured here, 4 KiB write + fdatasync costs about 244 us
//! p50 into fallocated blocks against about 102 us into blocks written before
//! (docs/benchmarks.md, issue 10). Writing zeros there first, while the partition is idle,
//! and syncing them, moves that cost off the producer's round trip.
//!
//! What it is: the decision half (sans-IO): what the partition's flusher does next when it
//! has no round to run (`plan`), and the shard's disk-bandwidth budget for it
//! (`ZeroFillBudget`, a pacer fed the current time). The I/O half is in `log.rs`
//! (`PartitionLog::zero_fill_step`), run by the partition's flusher task. What it is not:
//! it never runs while a round is waiting or in flight, and it never decides anything
//! about data.
//!
//! Contract (the invariant the flusher asserts): a zero-fill write covers only blocks at or
//! past `align_up(end_position)` of the segment at the moment it is issued, where
//! `end_position` is what has been *appended* (in memory, maybe not yet written). Every
//! byte a round has written or will write lies below that: rounds write chunks that end
//! at the appended end padded to its block, and the partial tail block (which holds the
//! end) is below `align_up(end_position)`. Bytes appended while a zero-fill write is in
//! flight may land in the range it covers, but their round is issued by the same flusher
//! task after the zero-fill write completes, so the data always overwrites the zeros,
//! never the other way round. One shard, one flusher per partition: no other writer of
//! the segment's data blocks exists.
//!
//! Runs on the shard that owns the partition; the budget is shared by the shard's
//! partitions (`Rc`, never `Send`).

use std::cell::Cell;
use std::time::{Duration, Instant};

use super::{align_up, ALIGNMENT_BYTES};

/// The shard's disk-bandwidth budget for zero-filling, shared by every partition the shard
/// owns. Per shard rather than per partition: the disk's bandwidth is what it protects, and
/// a per-partition rate would multiply with the partition count (a shard with 1,000 idle
/// partitions would be allowed 1,000 times the rate). A pacer: each grant of `bytes`
/// moves the next free time `bytes / rate` further on, from now or from the last grant's
/// end, whichever is later, so the long-run rate never exceeds `bytes_per_second` and a
/// burst is one chunk. Time comes in as an argument, so tests step it by hand.
pub struct ZeroFillBudget {
    bytes_per_second: u64,
    /// When the bandwidth granted so far is used up (`None`: never granted).
    next_free: Cell<Option<Instant>>,
}

impl ZeroFillBudget {
    /// `bytes_per_second` 0 turns zero-filling off.
    pub fn new(bytes_per_second: u64) -> std::rc::Rc<ZeroFillBudget> {
        std::rc::Rc::new(ZeroFillBudget {
            bytes_per_second,
            next_free: Cell::new(None),
        })
    }

    /// Off: no partition of the shard zero-fills.
    pub fn off() -> std::rc::Rc<ZeroFillBudget> {
        ZeroFillBudget::new(0)
    }

    pub fn enabled(&self) -> bool {
        self.bytes_per_second > 0
    }

    /// Takes `bytes` of bandwidth at `now`, or says how long to wait before asking again.
    pub fn take(&self, now: Instant, bytes: u64) -> Result<(), Duration> {
        assert!(self.enabled(), "a disabled zero-fill budget grants nothing");
        let from = match self.next_free.get() {
            Some(next_free) if next_free > now => return Err(next_free - now),
            Some(next_free) => next_free.max(now),
            None => now,
        };
        // u128: bytes up to u64::MAX times 1e9 does not fit in 64 bits.
        let nanos = u128::from(bytes) * 1_000_000_000 / u128::from(self.bytes_per_second);
        let spent = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        self.next_free.set(Some(from + spent));
        Ok(())
    }
}

/// A partition's zero-fill settings (from the server config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroFillConfig {
    /// How far past the appended end (rounded up to a block) the segment is kept written.
    /// 0: off for this partition.
    pub lookahead_bytes: u64,
    /// Bytes per zero-fill write: a real round waits for at most one of these (or one
    /// fdatasync of them).
    pub chunk_bytes: u64,
}

impl ZeroFillConfig {
    pub const OFF: ZeroFillConfig = ZeroFillConfig {
        lookahead_bytes: 0,
        chunk_bytes: ALIGNMENT_BYTES as u64,
    };
}

/// What the active segment looks like to the planner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentView {
    /// Bytes appended (in memory, maybe not yet written).
    pub end_position: u64,
    /// Every byte of the file below this is known to have been written once (data, zeros,
    /// or an earlier life of a recycled file); what lies past it may be unwritten extents.
    pub written_bytes: u64,
    /// Zeros written since the file's last fdatasync.
    pub zero_fill_unsynced: bool,
    /// The segment's size limit: zero-filling never goes past it.
    pub segment_size_bytes: u64,
}

/// The flusher's next zero-fill step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Nothing to do: wait for the next append.
    Idle,
    /// Zeros were written and not synced: fdatasync the file, which commits their extent
    /// conversion before data lands there.
    Sync,
    /// The bandwidth budget is spent: wait this long (or for the next append).
    Wait(Duration),
    /// Write `length` zero bytes at `position` (both multiples of the alignment).
    Write { position: u64, length: u64 },
}

/// Decides the next step for the active segment at `now`; takes the bandwidth of a
/// `Write` from `budget`.
pub fn plan(
    config: &ZeroFillConfig,
    budget: &ZeroFillBudget,
    segment: &SegmentView,
    now: Instant,
) -> Plan {
    if !budget.enabled() || config.lookahead_bytes == 0 {
        return Plan::Idle;
    }
    if segment.zero_fill_unsynced {
        return Plan::Sync;
    }
    let data_end = align_up(segment.end_position);
    let target = data_end
        .saturating_add(config.lookahead_bytes)
        .min(segment.segment_size_bytes);
    let position = segment.written_bytes.max(data_end);
    if position >= target {
        return Plan::Idle;
    }
    let length = config.chunk_bytes.min(target - position);
    match budget.take(now, length) {
        Ok(()) => {
            let plan = Plan::Write { position, length };
            check_write(&plan, segment.end_position);
            plan
        }
        Err(wait) => Plan::Wait(wait),
    }
}

/// The invariant of the module contract: a zero-fill write starts at or past the block
/// that holds the appended end, and is whole blocks. Stays on in release builds: it
/// protects data on disk.
pub fn check_write(plan: &Plan, end_position: u64) {
    if let Plan::Write { position, length } = *plan {
        assert!(
            position >= align_up(end_position),
            "a zero-fill write at {position} would overwrite data appended up to {end_position}"
        );
        assert!(
            length > 0
                && position % ALIGNMENT_BYTES as u64 == 0
                && length % ALIGNMENT_BYTES as u64 == 0,
            "zero-fill writes are whole blocks: {length} bytes at {position}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn view(end_position: u64, written_bytes: u64) -> SegmentView {
        SegmentView {
            end_position,
            written_bytes,
            zero_fill_unsynced: false,
            segment_size_bytes: 16 * MIB,
        }
    }

    fn config() -> ZeroFillConfig {
        ZeroFillConfig {
            lookahead_bytes: 4 * MIB,
            chunk_bytes: 64 * 1024,
        }
    }

    #[test]
    fn zero_fill_starts_past_the_partial_tail_block_and_stops_at_the_lookahead() {
        let budget = ZeroFillBudget::new(u64::MAX);
        let now = Instant::now();
        // 10,000 bytes appended: the block 8192..12288 holds data; zeros start at 12288.
        assert_eq!(
            plan(&config(), &budget, &view(10_000, 0), now),
            Plan::Write {
                position: 12_288,
                length: 64 * 1024
            }
        );
        // Written further than the end: continue from the written mark.
        assert_eq!(
            plan(&config(), &budget, &view(10_000, MIB), now),
            Plan::Write {
                position: MIB,
                length: 64 * 1024
            }
        );
        // The last piece is cut at the lookahead.
        let target = 12_288 + 4 * MIB;
        assert_eq!(
            plan(&config(), &budget, &view(10_000, target - 4096), now),
            Plan::Write {
                position: target - 4096,
                length: 4096
            }
        );
        assert_eq!(
            plan(&config(), &budget, &view(10_000, target), now),
            Plan::Idle
        );
    }

    #[test]
    fn zero_fill_never_passes_the_segment_size() {
        let budget = ZeroFillBudget::new(u64::MAX);
        let now = Instant::now();
        let near_end = view(15 * MIB + 1, 0);
        assert_eq!(
            plan(&config(), &budget, &near_end, now),
            Plan::Write {
                position: 15 * MIB + 4096,
                length: 64 * 1024
            }
        );
        let last_piece = view(15 * MIB + 1, 16 * MIB - 8192);
        assert_eq!(
            plan(&config(), &budget, &last_piece, now),
            Plan::Write {
                position: 16 * MIB - 8192,
                length: 8192
            }
        );
        assert_eq!(
            plan(&config(), &budget, &view(15 * MIB + 1, 16 * MIB), now),
            Plan::Idle
        );
        // A recycled file already written past the segment size needs nothing.
        assert_eq!(
            plan(&config(), &budget, &view(0, 17 * MIB), now),
            Plan::Idle
        );
    }

    #[test]
    fn unsynced_zeros_are_synced_before_more_are_written() {
        let budget = ZeroFillBudget::new(u64::MAX);
        let mut segment = view(0, 64 * 1024);
        segment.zero_fill_unsynced = true;
        assert_eq!(
            plan(&config(), &budget, &segment, Instant::now()),
            Plan::Sync
        );
    }

    #[test]
    fn zero_fill_is_off_at_rate_zero_or_lookahead_zero() {
        let now = Instant::now();
        assert_eq!(
            plan(&config(), &ZeroFillBudget::off(), &view(0, 0), now),
            Plan::Idle
        );
        let budget = ZeroFillBudget::new(MIB);
        assert_eq!(
            plan(&ZeroFillConfig::OFF, &budget, &view(0, 0), now),
            Plan::Idle
        );
    }

    /// The pacer's long-run rate is the budget's, whoever takes it: two partitions sharing
    /// one shard budget get half each. A manual clock, never a sleep.
    #[test]
    fn the_shard_budget_paces_every_partition_together() {
        let budget = ZeroFillBudget::new(MIB); // 1 MiB/s
        let start = Instant::now();
        let chunk = 64 * 1024; // 1/16 s of budget
        let mut granted = 0u64;
        let mut now = start;
        let mut segments = [view(0, 0), view(0, 0)];
        let mut turn = 0;
        // Ten simulated seconds, stepping the clock by what the pacer says to wait; the
        // partition that was told to wait asks first when the wait is over.
        while now < start + Duration::from_secs(10) {
            let segment = &mut segments[turn % 2];
            let ahead = ZeroFillConfig {
                lookahead_bytes: 16 * MIB,
                ..config()
            };
            match plan(&ahead, &budget, segment, now) {
                Plan::Write { position, length } => {
                    assert_eq!(length, chunk);
                    segment.written_bytes = position + length;
                    granted += length;
                    turn += 1;
                }
                Plan::Wait(wait) => {
                    assert!(wait > Duration::ZERO && wait <= Duration::from_millis(63));
                    now += wait;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        // At most one chunk of burst over 10 s at 1 MiB/s.
        assert!(granted <= 10 * MIB + chunk, "granted {granted}");
        assert!(granted >= 10 * MIB - chunk, "granted {granted}");
        let (first, second) = (segments[0].written_bytes, segments[1].written_bytes);
        assert!(first.abs_diff(second) <= chunk, "{first} vs {second}");
    }

    #[test]
    fn an_idle_budget_does_not_bank_bandwidth() {
        let budget = ZeroFillBudget::new(MIB);
        let start = Instant::now();
        assert_eq!(budget.take(start, MIB), Ok(()));
        // An hour idle, then: one grant, and the next waits its full share.
        let later = start + Duration::from_secs(3600);
        assert_eq!(budget.take(later, 64 * 1024), Ok(()));
        assert_eq!(
            budget.take(later, 64 * 1024),
            Err(Duration::from_millis(62) + Duration::from_micros(500))
        );
    }

    #[test]
    #[should_panic(expected = "would overwrite data")]
    fn a_zero_fill_write_below_the_appended_end_is_refused() {
        check_write(
            &Plan::Write {
                position: 8192,
                length: 4096,
            },
            10_000,
        );
    }
}
