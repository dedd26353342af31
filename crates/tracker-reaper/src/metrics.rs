//! The reaper's metrics, owned per [`crate::Application`] rather than in a
//! global recorder, so several reapers in one test process keep their own
//! `tracker_reaper_is_leader`.
//!
//! Names follow `tracker_reaper_<thing>_<unit>`; every label value comes from
//! a fixed enum, never from ids or error text.

use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const IS_LEADER: &str = "tracker_reaper_is_leader";
pub const LEADER_CHANGES: &str = "tracker_reaper_leadership_changes_total";
pub const SWEEP_DURATION: &str = "tracker_reaper_sweep_duration_seconds";
pub const EXPIRED: &str = "tracker_reaper_expired_connections_total";
pub const ARCHIVED: &str = "tracker_reaper_archived_rows_total";
pub const ARCHIVE_BACKLOG: &str = "tracker_reaper_archive_backlog_rows";
pub const ARCHIVE_ERRORS: &str = "tracker_reaper_archive_errors_total";
pub const HISTORY_REJECTED: &str = "tracker_reaper_history_rejected_total";
pub const HIBERNATIONS: &str = "tracker_reaper_hibernations_total";
pub const WAKES: &str = "tracker_reaper_wakes_total";
pub const WAKE_LATENCY: &str = "tracker_reaper_wake_latency_seconds";
pub const KUBE_ERRORS: &str = "tracker_reaper_kube_errors_total";
pub const STORE_ERRORS: &str = "tracker_reaper_store_errors_total";
pub const EVENTS_WRITTEN: &str = "tracker_reaper_session_events_written_total";
pub const EVENTS_DROPPED: &str = "tracker_reaper_session_events_dropped_total";
pub const HISTORY_PARTITIONS: &str = "tracker_reaper_history_partitions";
pub const HISTORY_PARTITIONS_CREATED: &str = "tracker_reaper_history_partitions_created_total";
pub const HISTORY_PARTITIONS_DROPPED: &str = "tracker_reaper_history_partitions_dropped_total";
pub const HISTORY_PARTITION_ERRORS: &str = "tracker_reaper_history_partition_errors_total";

/// Outcome of one hibernation decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HibernationResult {
    /// Patched (or, with `TRACKER_PLATFORM=none`, recorded as hibernated).
    Hibernated,
    /// `TRACKER_DRY_RUN`: decided and recorded, nothing changed.
    DryRun,
    /// The claim was refused or the resource was not `running`.
    Skipped,
    /// Someone changed the Session between our read and our patch.
    Conflict,
    /// The patch failed; the claim was rolled back for a later retry.
    Failed,
}

impl HibernationResult {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hibernated => "hibernated",
            Self::DryRun => "dry_run",
            Self::Skipped => "skipped",
            Self::Conflict => "conflict",
            Self::Failed => "failed",
        }
    }
}

/// Outcome of one pending wake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeResult {
    /// Patched to `running` (or recorded, with `TRACKER_PLATFORM=none`).
    Woken,
    /// The resource was running already; the wake was acknowledged.
    AlreadyRunning,
    /// The Session is gone or terminated; the wake was dropped.
    Dropped,
    /// `TRACKER_DRY_RUN`: recorded, nothing changed.
    DryRun,
    Conflict,
    Failed,
}

impl WakeResult {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Woken => "woken",
            Self::AlreadyRunning => "already_running",
            Self::Dropped => "dropped",
            Self::DryRun => "dry_run",
            Self::Conflict => "conflict",
            Self::Failed => "failed",
        }
    }
}

/// Why the archiver set an outbox entry aside in `connection_history_rejects`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// PostgreSQL refused the row for its data (SQLSTATE class 22, 23 or 54).
    Refused,
    /// The connection id already has a row of another connection.
    ReusedId,
    /// The entry is not a history record (a field missing or unparseable).
    Malformed,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::ReusedId => "reused_id",
            Self::Malformed => "malformed",
        }
    }
}

/// A Kubernetes call, for the error counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KubeOp {
    GetSession,
    PatchSession,
    WatchSessions,
    Lease,
}

impl KubeOp {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GetSession => "get_session",
            Self::PatchSession => "patch_session",
            Self::WatchSessions => "watch_sessions",
            Self::Lease => "lease",
        }
    }
}

/// A subsystem, for the store error counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    Election,
    Sweep,
    Archive,
    Hibernate,
    Wake,
    Mirror,
}

impl Task {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Election => "election",
            Self::Sweep => "sweep",
            Self::Archive => "archive",
            Self::Hibernate => "hibernate",
            Self::Wake => "wake",
            Self::Mirror => "mirror",
        }
    }
}

static METADATA: Metadata<'static> =
    metrics::Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// The reaper's metric handles and their Prometheus rendering.
pub struct Metrics {
    recorder: metrics_exporter_prometheus::PrometheusRecorder,
    handle: PrometheusHandle,
    pub is_leader: Gauge,
    pub leader_changes: Counter,
    pub sweep_duration: Histogram,
    pub expired: Counter,
    pub archived: Counter,
    pub archive_backlog: Gauge,
    pub archive_errors: Counter,
    pub wake_latency: Histogram,
    pub events_written: Counter,
    pub events_dropped: Counter,
    pub history_partitions: Gauge,
    pub history_partitions_created: Counter,
    pub history_partitions_dropped: Counter,
    pub history_partition_errors: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let latency_buckets = [
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency_buckets);
        // Non-empty buckets cannot fail; fall back to summaries rather than panic.
        let recorder = match builder {
            Ok(b) => b.build_recorder(),
            Err(_) => PrometheusBuilder::new().build_recorder(),
        };
        let handle = recorder.handle();
        let describe = |name: &'static str, unit: Option<Unit>, help: &'static str| {
            recorder.describe_counter(name.into(), unit, SharedString::from(help));
        };
        describe(
            IS_LEADER,
            None,
            "1 while this replica holds the lease, else 0",
        );
        describe(
            LEADER_CHANGES,
            None,
            "times this replica gained or lost leadership",
        );
        describe(
            SWEEP_DURATION,
            Some(Unit::Seconds),
            "duration of one sweep over all shards",
        );
        describe(EXPIRED, None, "connections expired by the sweep");
        describe(ARCHIVED, None, "history rows written to PostgreSQL");
        describe(
            ARCHIVE_BACKLOG,
            None,
            "finished connections not yet archived",
        );
        describe(
            ARCHIVE_ERRORS,
            None,
            "failed archive batches (PostgreSQL or Redis)",
        );
        describe(
            HISTORY_REJECTED,
            None,
            "outbox entries set aside in connection_history_rejects, by reason",
        );
        describe(HIBERNATIONS, None, "hibernation decisions by result");
        describe(WAKES, None, "pending wakes handled, by result");
        describe(
            WAKE_LATENCY,
            Some(Unit::Seconds),
            "from wake request to patched Session",
        );
        describe(
            KUBE_ERRORS,
            None,
            "failed Kubernetes API calls by operation",
        );
        describe(STORE_ERRORS, None, "failed Redis calls by subsystem");
        describe(EVENTS_WRITTEN, None, "session_events rows written");
        describe(
            EVENTS_DROPPED,
            None,
            "session events dropped because the queue was full",
        );
        describe(
            HISTORY_PARTITIONS,
            None,
            "monthly partitions of connection_history",
        );
        describe(
            HISTORY_PARTITIONS_CREATED,
            None,
            "monthly history partitions created",
        );
        describe(
            HISTORY_PARTITIONS_DROPPED,
            None,
            "monthly history partitions dropped past retention",
        );
        describe(
            HISTORY_PARTITION_ERRORS,
            None,
            "failed history partition upkeeps",
        );
        let counter =
            |name: &'static str| recorder.register_counter(&Key::from_static_name(name), &METADATA);
        let gauge =
            |name: &'static str| recorder.register_gauge(&Key::from_static_name(name), &METADATA);
        let histogram = |name: &'static str| {
            recorder.register_histogram(&Key::from_static_name(name), &METADATA)
        };
        let m = Self {
            is_leader: gauge(IS_LEADER),
            leader_changes: counter(LEADER_CHANGES),
            sweep_duration: histogram(SWEEP_DURATION),
            expired: counter(EXPIRED),
            archived: counter(ARCHIVED),
            archive_backlog: gauge(ARCHIVE_BACKLOG),
            archive_errors: counter(ARCHIVE_ERRORS),
            wake_latency: histogram(WAKE_LATENCY),
            events_written: counter(EVENTS_WRITTEN),
            events_dropped: counter(EVENTS_DROPPED),
            history_partitions: gauge(HISTORY_PARTITIONS),
            history_partitions_created: counter(HISTORY_PARTITIONS_CREATED),
            history_partitions_dropped: counter(HISTORY_PARTITIONS_DROPPED),
            history_partition_errors: counter(HISTORY_PARTITION_ERRORS),
            handle,
            recorder,
        };
        m.is_leader.set(0.0);
        m
    }

    fn labelled(&self, name: &'static str, label: &'static str, value: &'static str) -> Counter {
        let key = Key::from_parts(name, vec![Label::from_static_parts(label, value)]);
        self.recorder.register_counter(&key, &METADATA)
    }

    pub fn hibernation(&self, result: HibernationResult) {
        self.labelled(HIBERNATIONS, "result", result.as_str())
            .increment(1);
    }

    pub fn wake(&self, result: WakeResult) {
        self.labelled(WAKES, "result", result.as_str()).increment(1);
    }

    pub fn history_rejected(&self, reason: RejectReason) {
        self.labelled(HISTORY_REJECTED, "reason", reason.as_str())
            .increment(1);
    }

    pub fn kube_error(&self, op: KubeOp) {
        self.labelled(KUBE_ERRORS, "operation", op.as_str())
            .increment(1);
    }

    pub fn store_error(&self, task: Task) {
        self.labelled(STORE_ERRORS, "task", task.as_str())
            .increment(1);
    }

    pub fn observe_sweep(&self, took: Duration) {
        self.sweep_duration.record(took.as_secs_f64());
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.handle.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_names_and_bounded_labels() {
        let m = Metrics::new();
        m.is_leader.set(1.0);
        m.hibernation(HibernationResult::DryRun);
        m.wake(WakeResult::Woken);
        m.kube_error(KubeOp::PatchSession);
        m.observe_sweep(Duration::from_millis(3));
        let text = m.render();
        assert!(text.contains("tracker_reaper_is_leader 1"), "{text}");
        assert!(
            text.contains("tracker_reaper_hibernations_total{result=\"dry_run\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tracker_reaper_wakes_total{result=\"woken\"} 1"),
            "{text}"
        );
        assert!(text.contains("tracker_reaper_kube_errors_total{operation=\"patch_session\"} 1"));
        assert!(
            text.contains("tracker_reaper_sweep_duration_seconds_bucket"),
            "{text}"
        );
    }

    #[test]
    fn two_instances_do_not_share_values() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.is_leader.set(1.0);
        assert!(b.render().contains("tracker_reaper_is_leader 0"));
    }
}
