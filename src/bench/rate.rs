//! Fixed-rate scheduling: the intended send time of every message is fixed in advance
//! (`start + index / rate`), and latency is measured from that time, not from when the
//! producer actually got round to sending. A stall in the broker therefore shows up in
//! the latency of every message that should have been sent during it, instead of being
//! hidden by a producer that politely waited (coordinated omission).
//!
//! Pure arithmetic on nanoseconds so it can be tested without a clock.

/// The schedule of one producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSchedule {
    start_ns: u64,
    /// Messages per second of this producer; more than 0.
    rate_per_s: u64,
}

impl RateSchedule {
    pub fn new(start_ns: u64, rate_per_s: u64) -> RateSchedule {
        assert!(
            rate_per_s > 0,
            "a fixed rate is at least one message a second"
        );
        RateSchedule {
            start_ns,
            rate_per_s,
        }
    }

    /// When message `index` (from 0) is meant to be sent. Computed from the index, not
    /// by adding intervals, so rounding never accumulates: at 3 msg/s message 3 is due
    /// at exactly 1 s.
    pub fn intended_ns(&self, index: u64) -> u64 {
        let offset = u128::from(index) * 1_000_000_000 / u128::from(self.rate_per_s);
        self.start_ns + offset as u64
    }

    /// How many messages are due by `now_ns` (messages `0..due`), which is how far
    /// behind a producer is when it compares this with what it has sent.
    pub fn due_by(&self, now_ns: u64) -> u64 {
        if now_ns < self.start_ns {
            return 0;
        }
        let elapsed = u128::from(now_ns - self.start_ns);
        // Message i is due when i * 1e9 / rate <= elapsed, i.e. i <= elapsed * rate / 1e9.
        (elapsed * u128::from(self.rate_per_s) / 1_000_000_000) as u64 + 1
    }
}

/// Splits a total rate over `producers`, giving the remainder to the first ones, so the
/// sum is exactly the total. A producer may get 0 (then it sends nothing).
pub fn split_rate(total_per_s: u64, producers: u32) -> Vec<u64> {
    assert!(producers > 0, "at least one producer");
    let producers = u64::from(producers);
    (0..producers)
        .map(|index| total_per_s / producers + u64::from(index < total_per_s % producers))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_intended_times_do_not_drift() {
        let schedule = RateSchedule::new(1_000, 3);
        assert_eq!(schedule.intended_ns(0), 1_000);
        assert_eq!(schedule.intended_ns(1), 1_000 + 333_333_333);
        assert_eq!(schedule.intended_ns(3), 1_000 + 1_000_000_000);
        // A million intervals at 10 kHz end exactly at 100 s.
        let schedule = RateSchedule::new(0, 10_000);
        assert_eq!(schedule.intended_ns(1_000_000), 100_000_000_000);
        assert_eq!(schedule.intended_ns(1) - schedule.intended_ns(0), 100_000);
    }

    #[test]
    fn rate_due_count_matches_intended_times() {
        let schedule = RateSchedule::new(5_000, 10_000);
        assert_eq!(schedule.due_by(0), 0);
        assert_eq!(schedule.due_by(4_999), 0);
        assert_eq!(schedule.due_by(5_000), 1);
        for index in [0u64, 1, 2, 99, 12_345] {
            let at = schedule.intended_ns(index);
            assert_eq!(schedule.due_by(at), index + 1, "at message {index}'s time");
            assert_eq!(
                schedule.due_by(at - 1),
                index,
                "just before message {index}"
            );
        }
    }

    #[test]
    fn rate_split_sums_to_total() {
        assert_eq!(split_rate(10_000, 1), vec![10_000]);
        assert_eq!(split_rate(10, 3), vec![4, 3, 3]);
        assert_eq!(split_rate(2, 4), vec![1, 1, 0, 0]);
        assert_eq!(split_rate(1_000_003, 7).iter().sum::<u64>(), 1_000_003);
    }
}
