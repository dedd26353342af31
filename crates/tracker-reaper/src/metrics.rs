//! The reaper's metrics, owned per [`crate::Application`] rather than in a
//! global recorder, so several reapers in one test process keep their own
//! `tracker_reaper_is_leader`.
//!
//! Built on the workspace's one metrics stack ([`tracker_runtime::metrics`]):
//! a `prometheus-client` registry per instance, rendered by the shared ops
//! routes ([`crate::http`]). The handles keep the small API the subsystems
//! call (`increment`, `set`, `record`), so the stack underneath can change
//! without touching them.
//!
//! Names follow `tracker_reaper_<thing>_<unit>`; every label value comes from
//! a fixed enum, never from ids or error text. Counters are registered
//! without their `_total` suffix: the encoder adds it.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter as RawCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tracker_runtime::label_enum;
use tracker_runtime::metrics::SharedRegistry;

pub const IS_LEADER: &str = "tracker_reaper_is_leader";
pub const LEADER_CHANGES: &str = "tracker_reaper_leadership_changes";
pub const SWEEP_DURATION: &str = "tracker_reaper_sweep_duration_seconds";
pub const EXPIRED: &str = "tracker_reaper_expired_connections";
pub const ARCHIVED: &str = "tracker_reaper_archived_rows";
pub const ARCHIVE_BACKLOG: &str = "tracker_reaper_archive_backlog_rows";
pub const ARCHIVE_ERRORS: &str = "tracker_reaper_archive_errors";
pub const HISTORY_REJECTED: &str = "tracker_reaper_history_rejected";
pub const HIBERNATIONS: &str = "tracker_reaper_hibernations";
pub const WAKES: &str = "tracker_reaper_wakes";
pub const WAKE_LATENCY: &str = "tracker_reaper_wake_latency_seconds";
pub const KUBE_ERRORS: &str = "tracker_reaper_kube_errors";
pub const STORE_ERRORS: &str = "tracker_reaper_store_errors";
pub const EVENTS_WRITTEN: &str = "tracker_reaper_session_events_written";
pub const EVENTS_DROPPED: &str = "tracker_reaper_session_events_dropped";
pub const HISTORY_PARTITIONS: &str = "tracker_reaper_history_partitions";
pub const HISTORY_PARTITIONS_CREATED: &str = "tracker_reaper_history_partitions_created";
pub const HISTORY_PARTITIONS_DROPPED: &str = "tracker_reaper_history_partitions_dropped";
pub const HISTORY_PARTITION_ERRORS: &str = "tracker_reaper_history_partition_errors";
pub const NATS_OUTBOX: &str = "tracker_reaper_nats_outbox_events";
pub const NATS_PUBLISHED: &str = "tracker_reaper_nats_published_events";
pub const NATS_FAILURES: &str = "tracker_reaper_nats_publish_failures";

/// Buckets of the `_seconds` histograms: 1 ms to 10 s.
const LATENCY_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

label_enum!(
    /// Outcome of one hibernation decision.
    HibernationResult {
        /// Patched (or, with `TRACKER_PLATFORM=none`, recorded as hibernated).
        Hibernated => "hibernated",
        /// `TRACKER_DRY_RUN`: decided and recorded, nothing changed.
        DryRun => "dry_run",
        /// The clients of a session were warned of its max duration.
        Warned => "warned",
        /// The claim was refused or the resource was not `running`.
        Skipped => "skipped",
        /// Someone changed the Session between our read and our patch.
        Conflict => "conflict",
        /// The patch failed; the claim was rolled back for a later retry.
        Failed => "failed",
    }
);

label_enum!(
    /// Outcome of one pending wake.
    WakeResult {
        /// Patched to `running` (or recorded, with `TRACKER_PLATFORM=none`).
        Woken => "woken",
        /// The resource was running already; the wake was acknowledged.
        AlreadyRunning => "already_running",
        /// The Session is gone or terminated; the wake was dropped.
        Dropped => "dropped",
        /// `TRACKER_DRY_RUN`: recorded, nothing changed.
        DryRun => "dry_run",
        Conflict => "conflict",
        Failed => "failed",
    }
);

label_enum!(
    /// Why the archiver set an outbox entry aside in `connection_history_rejects`.
    RejectReason {
        /// PostgreSQL refused the row for its data (SQLSTATE class 22, 23 or 54).
        Refused => "refused",
        /// The connection id already has a row of another connection.
        ReusedId => "reused_id",
        /// The entry is not a history record (a field missing or unparseable).
        Malformed => "malformed",
    }
);

label_enum!(
    /// The kind of a session event published to NATS.
    EventKindLabel {
        Hibernate => "hibernate",
        Wake => "wake",
        Warning => "warning",
    }
);

label_enum!(
    /// Why publishing to NATS failed.
    NatsFailure {
        /// No acknowledgement in time (NATS down or slow).
        Timeout => "timeout",
        /// NATS answered with an error, or the connection failed.
        Error => "error",
        /// The stream could not be found or created.
        Stream => "stream",
    }
);

label_enum!(
    /// A Kubernetes call, for the error counter.
    KubeOp {
        GetSession => "get_session",
        PatchSession => "patch_session",
        WatchSessions => "watch_sessions",
        Lease => "lease",
    }
);

label_enum!(
    /// A subsystem, for the store error counter.
    Task {
        Election => "election",
        Sweep => "sweep",
        Archive => "archive",
        Hibernate => "hibernate",
        Wake => "wake",
        Mirror => "mirror",
        Publish => "publish",
    }
);

/// A monotonic count.
#[derive(Debug, Clone, Default)]
pub struct Counter(prometheus_client::metrics::counter::Counter);

impl Counter {
    pub fn increment(&self, n: u64) {
        self.0.inc_by(n);
    }
}

/// A value that goes up and down.
#[derive(Debug, Clone, Default)]
pub struct Gauge(prometheus_client::metrics::gauge::Gauge<f64, AtomicU64>);

impl Gauge {
    pub fn set(&self, value: f64) {
        self.0.set(value);
    }
}

/// A distribution of durations, in seconds.
#[derive(Debug, Clone)]
pub struct Histogram(prometheus_client::metrics::histogram::Histogram);

impl Default for Histogram {
    fn default() -> Self {
        Self(prometheus_client::metrics::histogram::Histogram::new(
            LATENCY_BUCKETS,
        ))
    }
}

impl Histogram {
    pub fn record(&self, value: f64) {
        self.0.observe(value);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HibernationLabel {
    result: HibernationResult,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct WakeLabel {
    result: WakeResult,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: RejectReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OperationLabel {
    operation: KubeOp,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabel {
    kind: EventKindLabel,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FailureLabel {
    reason: NatsFailure,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TaskLabel {
    task: Task,
}

/// The reaper's metric handles and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: SharedRegistry,
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
    /// Session events waiting in Redis for NATS's acknowledgement.
    pub nats_outbox: Gauge,
    nats_published: Family<KindLabel, RawCounter>,
    nats_failures: Family<FailureLabel, RawCounter>,
    hibernations: Family<HibernationLabel, RawCounter>,
    wakes: Family<WakeLabel, RawCounter>,
    history_rejected: Family<ReasonLabel, RawCounter>,
    kube_errors: Family<OperationLabel, RawCounter>,
    store_errors: Family<TaskLabel, RawCounter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        let is_leader = Gauge::default();
        r.register(
            IS_LEADER,
            "1 while this replica holds the lease, else 0",
            is_leader.0.clone(),
        );
        let leader_changes = Counter::default();
        r.register(
            LEADER_CHANGES,
            "times this replica gained or lost leadership",
            leader_changes.0.clone(),
        );
        let sweep_duration = Histogram::default();
        r.register(
            SWEEP_DURATION,
            "duration of one sweep over all shards",
            sweep_duration.0.clone(),
        );
        let expired = Counter::default();
        r.register(
            EXPIRED,
            "connections expired by the sweep",
            expired.0.clone(),
        );
        let archived = Counter::default();
        r.register(
            ARCHIVED,
            "history rows written to PostgreSQL",
            archived.0.clone(),
        );
        let archive_backlog = Gauge::default();
        r.register(
            ARCHIVE_BACKLOG,
            "finished connections not yet archived",
            archive_backlog.0.clone(),
        );
        let archive_errors = Counter::default();
        r.register(
            ARCHIVE_ERRORS,
            "failed archive batches (PostgreSQL or Redis)",
            archive_errors.0.clone(),
        );
        let history_rejected = Family::default();
        r.register(
            HISTORY_REJECTED,
            "outbox entries set aside in connection_history_rejects, by reason",
            history_rejected.clone(),
        );
        let hibernations = Family::default();
        r.register(
            HIBERNATIONS,
            "hibernation decisions by result",
            hibernations.clone(),
        );
        let wakes = Family::default();
        r.register(WAKES, "pending wakes handled, by result", wakes.clone());
        let wake_latency = Histogram::default();
        r.register(
            WAKE_LATENCY,
            "from wake request to patched Session",
            wake_latency.0.clone(),
        );
        let kube_errors = Family::default();
        r.register(
            KUBE_ERRORS,
            "failed Kubernetes API calls by operation",
            kube_errors.clone(),
        );
        let store_errors = Family::default();
        r.register(
            STORE_ERRORS,
            "failed Redis calls by subsystem",
            store_errors.clone(),
        );
        let events_written = Counter::default();
        r.register(
            EVENTS_WRITTEN,
            "session_events rows written",
            events_written.0.clone(),
        );
        let events_dropped = Counter::default();
        r.register(
            EVENTS_DROPPED,
            "session events dropped because the queue was full",
            events_dropped.0.clone(),
        );
        let history_partitions = Gauge::default();
        r.register(
            HISTORY_PARTITIONS,
            "monthly partitions of connection_history",
            history_partitions.0.clone(),
        );
        let history_partitions_created = Counter::default();
        r.register(
            HISTORY_PARTITIONS_CREATED,
            "monthly history partitions created",
            history_partitions_created.0.clone(),
        );
        let history_partitions_dropped = Counter::default();
        r.register(
            HISTORY_PARTITIONS_DROPPED,
            "monthly history partitions dropped past retention",
            history_partitions_dropped.0.clone(),
        );
        let history_partition_errors = Counter::default();
        r.register(
            HISTORY_PARTITION_ERRORS,
            "failed history partition upkeeps",
            history_partition_errors.0.clone(),
        );
        let nats_outbox = Gauge::default();
        r.register(
            NATS_OUTBOX,
            "session events waiting in Redis for NATS to acknowledge them",
            nats_outbox.0.clone(),
        );
        let nats_published = Family::default();
        r.register(
            NATS_PUBLISHED,
            "session events acknowledged by NATS JetStream, by kind",
            nats_published.clone(),
        );
        let nats_failures = Family::default();
        r.register(
            NATS_FAILURES,
            "failed publications to NATS JetStream, by reason",
            nats_failures.clone(),
        );
        Self {
            registry: Arc::new(r),
            nats_outbox,
            nats_published,
            nats_failures,
            is_leader,
            leader_changes,
            sweep_duration,
            expired,
            archived,
            archive_backlog,
            archive_errors,
            wake_latency,
            events_written,
            events_dropped,
            history_partitions,
            history_partitions_created,
            history_partitions_dropped,
            history_partition_errors,
            hibernations,
            wakes,
            history_rejected,
            kube_errors,
            store_errors,
        }
    }

    pub fn hibernation(&self, result: HibernationResult) {
        self.hibernations
            .get_or_create(&HibernationLabel { result })
            .inc();
    }

    pub fn wake(&self, result: WakeResult) {
        self.wakes.get_or_create(&WakeLabel { result }).inc();
    }

    pub fn history_rejected(&self, reason: RejectReason) {
        self.history_rejected
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn kube_error(&self, op: KubeOp) {
        self.kube_errors
            .get_or_create(&OperationLabel { operation: op })
            .inc();
    }

    pub fn nats_published(&self, kind: tracker_core::EventKind) {
        let kind = match kind {
            tracker_core::EventKind::Hibernate => EventKindLabel::Hibernate,
            tracker_core::EventKind::Wake => EventKindLabel::Wake,
            tracker_core::EventKind::Warning => EventKindLabel::Warning,
        };
        self.nats_published.get_or_create(&KindLabel { kind }).inc();
    }

    pub fn nats_failure(&self, reason: NatsFailure) {
        self.nats_failures
            .get_or_create(&FailureLabel { reason })
            .inc();
    }

    pub fn store_error(&self, task: Task) {
        self.store_errors.get_or_create(&TaskLabel { task }).inc();
    }

    pub fn observe_sweep(&self, took: Duration) {
        self.sweep_duration.record(took.as_secs_f64());
    }

    /// The registry, for the ops routes.
    pub fn registry(&self) -> SharedRegistry {
        self.registry.clone()
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn render(&self) -> String {
        tracker_runtime::metrics::render(&self.registry)
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
        m.store_error(Task::Election);
        m.history_rejected(RejectReason::ReusedId);
        m.leader_changes.increment(2);
        m.archive_backlog.set(7.0);
        m.observe_sweep(Duration::from_millis(3));
        let text = m.render();
        for series in [
            "tracker_reaper_is_leader 1",
            "tracker_reaper_hibernations_total{result=\"dry_run\"} 1",
            "tracker_reaper_wakes_total{result=\"woken\"} 1",
            "tracker_reaper_kube_errors_total{operation=\"patch_session\"} 1",
            "tracker_reaper_store_errors_total{task=\"election\"} 1",
            "tracker_reaper_history_rejected_total{reason=\"reused_id\"} 1",
            "tracker_reaper_leadership_changes_total 2",
            "tracker_reaper_archive_backlog_rows 7",
            "tracker_reaper_expired_connections_total 0",
            "tracker_reaper_sweep_duration_seconds_bucket{le=\"0.005\"} 1",
            "tracker_reaper_wake_latency_seconds_count 0",
        ] {
            assert!(text.contains(series), "{series} missing from\n{text}");
        }
    }

    #[test]
    fn two_instances_do_not_share_values() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.is_leader.set(1.0);
        assert!(b.render().contains("tracker_reaper_is_leader 0"));
    }
}
