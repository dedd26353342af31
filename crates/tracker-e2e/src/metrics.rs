//! Reading values out of a Prometheus text exposition.

/// The value of the series `series` (a metric name, optionally with its `{labels}` exactly as
/// rendered), or `None` if absent. A name without labels also matches a series of that name
/// rendered with labels only if no unlabelled series exists (first match wins).
pub fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let rest = l.strip_prefix(series)?;
        let rest = if rest.starts_with('{') && !series.contains('{') {
            &rest[rest.find('}')? + 1..]
        } else {
            rest
        };
        let rest = rest.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The sum over every series of metric `name` (any labels).
pub fn sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let rest = if rest.starts_with('{') {
                &rest[rest.find('}')? + 1..]
            } else {
                rest
            };
            rest.strip_prefix(' ')?
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
        .sum()
}

/// The reaper's leadership gauge, `tracker_reaper_is_leader`.
pub const IS_LEADER: &str = "tracker_reaper_is_leader";

/// The reaper's gauge of session events waiting in Redis for NATS.
pub const NATS_OUTBOX: &str = "tracker_reaper_nats_outbox_events";

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP tracker_reaper_is_leader x\n\
        # TYPE tracker_reaper_is_leader gauge\n\
        tracker_reaper_is_leader 1\n\
        tracker_reaper_is_leader_changes_total 3\n\
        tracker_reaper_wakes_total{result=\"woken\"} 2\n\
        tracker_reaper_wakes_total{result=\"acked\"} 5\n";

    #[test]
    fn finds_plain_and_labelled_series() {
        assert_eq!(value(TEXT, IS_LEADER), Some(1.0));
        assert_eq!(
            value(TEXT, "tracker_reaper_wakes_total{result=\"acked\"}"),
            Some(5.0)
        );
        assert_eq!(value(TEXT, "tracker_reaper_missing"), None);
        assert_eq!(sum(TEXT, "tracker_reaper_wakes_total"), 7.0);
    }
}
