//! Where the ids of ended connections are kept for the id retention.
//!
//! An ended connection's id must be refused for `TRACKER_CONNECTION_ID_RETENTION`
//! (7 days by default), and at any real churn the ids kept outnumber the live
//! connections a hundredfold. Redis 7.0 cannot expire a member of a set or a
//! field of a hash, and a key of its own per id costs about 260 bytes. So time
//! is cut into periods of an eighth of the retention: the ids that ended in
//! one period are members of one set per id shard (their 16 bytes, about 60
//! bytes each), and the set expires whole once the last of them has been
//! kept for the retention. An id is therefore refused for at least the
//! retention and at most one period more. A registration checks every set
//! that may still hold its id: about ten, one call.

use std::ops::RangeInclusive;
use std::time::Duration;

use super::types::millis;

/// Periods per retention: more sets to check per registration against a
/// shorter overstay past the retention.
const PERIODS: i64 = 8;

/// The shortest period. A registration also checks one period past each end
/// of the retention, so processes whose clocks differ by up to this much
/// still agree on where an id went (a retention of a few minutes is kept a
/// minute longer).
const MIN_SPAN_MS: i64 = 60_000;

/// The periods of one id retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EndedIds {
    retention_ms: i64,
    span_ms: i64,
}

impl EndedIds {
    pub fn new(retention: Duration) -> Self {
        let retention_ms = millis(retention).max(1);
        // Whole seconds: the span is part of the sets' names.
        let span_ms = ((retention_ms / PERIODS).max(MIN_SPAN_MS) + 999) / 1000 * 1000;
        Self {
            retention_ms,
            span_ms,
        }
    }

    /// The span of a period in seconds, as the sets' names carry it.
    pub fn span_secs(&self) -> u64 {
        u64::try_from(self.span_ms / 1000).unwrap_or(1)
    }

    /// The period that `at_ms` (unix ms) falls in.
    pub fn period(&self, at_ms: i64) -> i64 {
        at_ms.div_euclid(self.span_ms)
    }

    /// When the set of `period` may go (unix ms): the retention after the
    /// period's end.
    pub fn expires_at(&self, period: i64) -> i64 {
        (period + 1) * self.span_ms + self.retention_ms
    }

    /// The periods whose sets may hold an id ended before `now_ms`: back to
    /// one whose set expires only after now, and one period on each side for
    /// clocks that differ between processes (by a period at least a minute).
    pub fn periods_to_check(&self, now_ms: i64) -> RangeInclusive<i64> {
        self.period(now_ms - self.retention_ms - self.span_ms)..=self.period(now_ms + self.span_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    #[test]
    fn the_default_retention_is_cut_into_eighths_of_whole_seconds() {
        let e = EndedIds::new(7 * DAY);
        assert_eq!(e.span_secs(), 7 * 24 * 3600 / 8);
        // A short retention gets a minute: the clocks of processes may differ.
        assert_eq!(EndedIds::new(Duration::from_millis(1)).span_secs(), 60);
        assert_eq!(EndedIds::new(Duration::from_secs(600)).span_secs(), 75);
        assert_eq!(
            EndedIds::new(Duration::from_millis(800_500)).span_secs(),
            101
        );
    }

    #[test]
    fn an_id_is_refused_for_the_retention_and_at_most_one_period_more() {
        let skew = MIN_SPAN_MS;
        for retention in [Duration::from_millis(1), Duration::from_secs(600), 7 * DAY] {
            let e = EndedIds::new(retention);
            let span = e.span_ms;
            for ended_at in [0, 1, span - 1, span, 5 * span + 17, 1_796_000_000_000] {
                let period = e.period(ended_at);
                let gone = e.expires_at(period);
                assert!(gone >= ended_at + e.retention_ms, "kept the retention");
                assert!(
                    gone <= ended_at + e.retention_ms + span,
                    "overstays one period at most"
                );
                // Every registration while the set lives checks it, on a
                // clock up to a minute off the one that retired the id.
                for now in [ended_at, ended_at + 1, gone - 1] {
                    for clock in [now - skew, now, now + skew] {
                        assert!(
                            e.periods_to_check(clock).contains(&period),
                            "{retention:?} {ended_at} {clock}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_registration_checks_about_ten_sets() {
        let e = EndedIds::new(7 * DAY);
        let checked = e.periods_to_check(1_796_000_000_000);
        assert!((10..=12).contains(&checked.clone().count()), "{checked:?}");
    }
}
