//! Prometheus metrics of one API instance, on the workspace's one metrics
//! stack ([`tracker_runtime::metrics`]).
//!
//! Each [`Metrics`] owns its registry (no global recorder), so several
//! instances in one test process count separately. Every label value comes
//! from a fixed set: route patterns, enums; never ids or error text.
//!
//! This module reads what [`crate::error`] leaves on a response (which
//! backend failed, which limit refused); `error` knows nothing of metrics.
//!
//! Every request is counted and timed, so that path takes no lock to
//! write: each route's series are resolved once (see [`RouteSeries`]) and
//! then written with atomics, latencies included ([`AtomicHistogram`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use tracing::Instrument;
use tracker_core::Protocol;

use tracker_runtime::http::ConnObserver;
pub use tracker_runtime::http::Timeout;
use tracker_runtime::label_enum;
use tracker_runtime::metrics::SharedRegistry;

use crate::error::{Backend, LimitKind};
use crate::error::{BackendFailure, LimitRejection};

label_enum!(
    HeartbeatResult { Accepted => "accepted", Unknown => "unknown" }
);

label_enum!(
    RegistrationResult {
        Created => "created",
        Replayed => "replayed",
        Terminated => "terminated",
        Conflict => "conflict",
        SessionLimit => "session_limit",
        UserLimit => "user_limit",
    }
);

label_enum!(
    ProtocolLabel { Websocket => "websocket", Vnc => "vnc", Http => "http" }
);

impl From<Protocol> for ProtocolLabel {
    fn from(p: Protocol) -> Self {
        match p {
            Protocol::Websocket => ProtocolLabel::Websocket,
            Protocol::Vnc => ProtocolLabel::Vnc,
            Protocol::Http => ProtocolLabel::Http,
        }
    }
}

label_enum!(
    MethodLabel { Get => "GET", Post => "POST", Delete => "DELETE", Other => "other" }
);

impl From<&Method> for MethodLabel {
    fn from(m: &Method) -> Self {
        match *m {
            Method::GET => MethodLabel::Get,
            Method::POST => MethodLabel::Post,
            Method::DELETE => MethodLabel::Delete,
            _ => MethodLabel::Other,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: MethodLabel,
    status: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HeartbeatLabels {
    result: HeartbeatResult,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RegistrationLabels {
    protocol: ProtocolLabel,
    result: RegistrationResult,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TimeoutLabels {
    timeout: Timeout,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LimitLabels {
    limit: LimitKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BackendLabels {
    backend: Backend,
}

type HistogramFamily<L> = Family<L, AtomicHistogram, fn() -> AtomicHistogram>;

/// A histogram written with atomics only: each observation is three relaxed
/// additions (its bucket, the count, the sum). A scrape may see them a few
/// observations apart, which Prometheus tolerates like any scrape race.
#[derive(Debug, Clone)]
pub struct AtomicHistogram(Arc<HistogramCells>);

#[derive(Debug)]
struct HistogramCells {
    /// Upper bounds, ascending; the implicit last bucket is +Inf.
    bounds: Vec<f64>,
    /// One more than `bounds`.
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// The sum as f64 bits, added to with a compare-and-swap loop.
    sum: AtomicU64,
}

impl AtomicHistogram {
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> Self {
        let bounds: Vec<f64> = bounds.into_iter().filter(|b| b.is_finite()).collect();
        let buckets = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Self(Arc::new(HistogramCells {
            bounds,
            buckets,
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0f64.to_bits()),
        }))
    }

    pub fn observe(&self, v: f64) {
        let c = &self.0;
        let i = c.bounds.partition_point(|b| *b < v);
        c.buckets[i].fetch_add(1, Ordering::Relaxed);
        c.count.fetch_add(1, Ordering::Relaxed);
        let mut old = c.sum.load(Ordering::Relaxed);
        loop {
            let new = (f64::from_bits(old) + v).to_bits();
            match c
                .sum
                .compare_exchange_weak(old, new, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(seen) => old = seen,
            }
        }
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let c = &self.0;
        let buckets: Vec<(f64, u64)> = c
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(c.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        // The count as the buckets' total, so the two always agree.
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = f64::from_bits(c.sum.load(Ordering::Relaxed));
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Method labels × status classes: the request counters of one route.
const METHODS: usize = 4;
const CLASSES: usize = 5;

/// One route's series, resolved from the families once and then written
/// without a lookup. The counters are resolved on first use, so a route
/// shows only the method and status series it has served.
#[derive(Debug)]
struct RouteSeries {
    route: Box<str>,
    duration: AtomicHistogram,
    requests: [OnceLock<Counter>; METHODS * CLASSES],
}

/// The API's metrics; cheap to clone.
#[derive(Debug, Clone)]
pub struct Metrics(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    registry: SharedRegistry,
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily<RouteLabels>,
    websockets_open: Gauge,
    session_watches: Gauge,
    session_watch_reads: Counter,
    connections_open: Gauge,
    timeouts: Family<TimeoutLabels, Counter>,
    /// The two series of `tracker_api_heartbeats`, resolved once: every
    /// heartbeat counts.
    heartbeats_accepted: Counter,
    heartbeats_unknown: Counter,
    registrations: Family<RegistrationLabels, Counter>,
    limit_rejections: Family<LimitLabels, Counter>,
    backend_errors: Family<BackendLabels, Counter>,
    /// By route pattern (a bounded set: the router's, and "unmatched").
    routes: RwLock<HashMap<Box<str>, Arc<RouteSeries>>>,
}

fn latency_histogram() -> AtomicHistogram {
    // 0.5 ms to ~16 s: heartbeats sit at the bottom, history queries higher.
    AtomicHistogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        // Counters get their `_total` suffix from the encoder.
        registry.register(
            "tracker_api_requests",
            "HTTP requests by route pattern, method and status class",
            requests.clone(),
        );
        let duration: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(latency_histogram as fn() -> AtomicHistogram);
        registry.register(
            "tracker_api_request_duration_seconds",
            "HTTP request latency by route pattern",
            duration.clone(),
        );
        let websockets_open = Gauge::default();
        registry.register(
            "tracker_api_websockets_open",
            "WebSockets currently open on this replica",
            websockets_open.clone(),
        );
        let session_watches = Gauge::default();
        registry.register(
            "tracker_api_session_watches",
            "Sessions whose state this replica reads for its WebSockets, one reader each",
            session_watches.clone(),
        );
        let session_watch_reads = Counter::default();
        registry.register(
            "tracker_api_session_watch_reads",
            "Session state reads on behalf of WebSockets (one per watched session per heartbeat interval)",
            session_watch_reads.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "tracker_api_connections_open",
            "TCP connections open on this replica, WebSockets included",
            connections_open.clone(),
        );
        let timeouts = Family::<TimeoutLabels, Counter>::default();
        registry.register(
            "tracker_api_timeouts",
            "Connections closed by the header or keep-alive timeout, and requests ended by the request timeout",
            timeouts.clone(),
        );
        let heartbeats = Family::<HeartbeatLabels, Counter>::default();
        registry.register(
            "tracker_api_heartbeats",
            "Heartbeats received, accepted or for an unknown (closed, expired) connection",
            heartbeats.clone(),
        );
        let registrations = Family::<RegistrationLabels, Counter>::default();
        registry.register(
            "tracker_api_registrations",
            "Connection registrations by protocol and outcome",
            registrations.clone(),
        );
        let limit_rejections = Family::<LimitLabels, Counter>::default();
        registry.register(
            "tracker_api_limit_rejections",
            "Registrations refused by a connection limit",
            limit_rejections.clone(),
        );
        let backend_errors = Family::<BackendLabels, Counter>::default();
        registry.register(
            "tracker_api_backend_errors",
            "Requests failed by a backend error or timeout",
            backend_errors.clone(),
        );
        let heartbeat_series = |result| {
            heartbeats
                .get_or_create(&HeartbeatLabels { result })
                .clone()
        };
        let heartbeats_accepted = heartbeat_series(HeartbeatResult::Accepted);
        let heartbeats_unknown = heartbeat_series(HeartbeatResult::Unknown);
        Self(Arc::new(Inner {
            registry: Arc::new(registry),
            requests,
            duration,
            websockets_open,
            session_watches,
            session_watch_reads,
            connections_open,
            timeouts,
            heartbeats_accepted,
            heartbeats_unknown,
            registrations,
            limit_rejections,
            backend_errors,
            routes: RwLock::default(),
        }))
    }

    /// The series of `route`, resolved on its first request.
    fn route_series(&self, route: &str) -> Arc<RouteSeries> {
        let known = self
            .0
            .routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(route)
            .cloned();
        if let Some(series) = known {
            return series;
        }
        let mut routes = self
            .0
            .routes
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        routes
            .entry(route.into())
            .or_insert_with(|| {
                let duration = self
                    .0
                    .duration
                    .get_or_create(&RouteLabels {
                        route: route.to_owned(),
                    })
                    .clone();
                Arc::new(RouteSeries {
                    route: route.into(),
                    duration,
                    requests: Default::default(),
                })
            })
            .clone()
    }

    /// Counts and times one request of `route`.
    fn request_done(&self, series: &RouteSeries, method: MethodLabel, status: u16, secs: f64) {
        let (class, class_index) = status_class_index(status);
        let slot = method_index(method) * CLASSES + class_index;
        series.requests[slot]
            .get_or_init(|| {
                self.0
                    .requests
                    .get_or_create(&RequestLabels {
                        route: series.route.to_string(),
                        method,
                        status: class,
                    })
                    .clone()
            })
            .inc();
        series.duration.observe(secs);
    }

    /// The registry, for the ops routes.
    pub fn registry(&self) -> SharedRegistry {
        self.0.registry.clone()
    }

    /// The registry in the text exposition format.
    pub fn render(&self) -> String {
        tracker_runtime::metrics::render(&self.0.registry)
    }

    pub fn heartbeats(&self, result: HeartbeatResult, n: u64) {
        if n > 0 {
            match result {
                HeartbeatResult::Accepted => self.0.heartbeats_accepted.inc_by(n),
                HeartbeatResult::Unknown => self.0.heartbeats_unknown.inc_by(n),
            };
        }
    }

    pub fn registration(&self, protocol: Protocol, result: RegistrationResult) {
        self.0
            .registrations
            .get_or_create(&RegistrationLabels {
                protocol: protocol.into(),
                result,
            })
            .inc();
    }

    pub fn limit_rejection(&self, limit: LimitKind) {
        self.0
            .limit_rejections
            .get_or_create(&LimitLabels { limit })
            .inc();
    }

    pub fn backend_error(&self, backend: Backend) {
        self.0
            .backend_errors
            .get_or_create(&BackendLabels { backend })
            .inc();
    }

    pub fn connection_opened(&self) {
        self.0.connections_open.inc();
    }

    pub fn connection_closed(&self) {
        self.0.connections_open.dec();
    }

    pub fn connection_timeout(&self, timeout: Timeout) {
        self.0
            .timeouts
            .get_or_create(&TimeoutLabels { timeout })
            .inc();
    }

    pub fn session_watch_started(&self) {
        self.0.session_watches.inc();
    }

    pub fn session_watch_stopped(&self) {
        self.0.session_watches.dec();
    }

    pub fn session_watch_read(&self) {
        self.0.session_watch_reads.inc();
    }

    /// Counts an open WebSocket until the guard drops.
    pub fn websocket_open(&self) -> OpenSocket {
        self.0.websockets_open.inc();
        OpenSocket(self.clone())
    }
}

/// The server loop's reports go to the API's connection metrics.
impl ConnObserver for Metrics {
    fn connection_opened(&self) {
        Metrics::connection_opened(self);
    }

    fn connection_closed(&self) {
        Metrics::connection_closed(self);
    }

    fn connection_timeout(&self, which: Timeout) {
        Metrics::connection_timeout(self, which);
    }
}

/// Decrements the open-WebSocket gauge on drop, however the socket ends.
#[derive(Debug)]
pub struct OpenSocket(Metrics);

impl Drop for OpenSocket {
    fn drop(&mut self) {
        self.0 .0.websockets_open.dec();
    }
}

fn status_class_index(status: u16) -> (&'static str, usize) {
    match status {
        100..=199 => ("1xx", 0),
        200..=299 => ("2xx", 1),
        300..=399 => ("3xx", 2),
        400..=499 => ("4xx", 3),
        _ => ("5xx", 4),
    }
}

fn method_index(method: MethodLabel) -> usize {
    match method {
        MethodLabel::Get => 0,
        MethodLabel::Post => 1,
        MethodLabel::Delete => 2,
        MethodLabel::Other => 3,
    }
}

/// Routes whose request span is at DEBUG rather than INFO: the heartbeats,
/// by far the most frequent requests, which log nothing at INFO themselves.
fn quiet_route(route: &str) -> bool {
    route.ends_with("/heartbeat") || route == "/v1/heartbeats"
}

/// Middleware: a span per request (at INFO, or DEBUG for the heartbeat
/// routes), then counts and times it by route pattern. Backend errors and
/// limit rejections are read from markers that [`crate::error::ApiError`]
/// leaves on the response.
pub async fn track(State(metrics): State<Metrics>, req: Request, next: Next) -> Response {
    let series = metrics.route_series(
        req.extensions()
            .get::<MatchedPath>()
            .map_or("unmatched", MatchedPath::as_str),
    );
    let method = MethodLabel::from(req.method());
    let span = if quiet_route(&series.route) {
        tracing::debug_span!("request", method = %req.method(), route = %series.route)
    } else {
        tracing::info_span!("request", method = %req.method(), route = %series.route)
    };
    let start = Instant::now();
    let response = next.run(req).instrument(span).await;
    metrics.request_done(
        &series,
        method,
        response.status().as_u16(),
        start.elapsed().as_secs_f64(),
    );
    if let Some(BackendFailure(backend)) = response.extensions().get() {
        metrics.backend_error(*backend);
    }
    if let Some(LimitRejection(limit)) = response.extensions().get() {
        metrics.limit_rejection(*limit);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels_render_as_documented() {
        let m = Metrics::new();
        m.heartbeats(HeartbeatResult::Accepted, 3);
        m.registration(Protocol::Vnc, RegistrationResult::Created);
        m.limit_rejection(LimitKind::User);
        m.backend_error(Backend::Redis);
        let guard = m.websocket_open();
        m.connection_opened();
        m.connection_timeout(Timeout::Header);
        let text = m.render();
        assert!(text.contains("tracker_api_connections_open 1"), "{text}");
        assert!(text.contains("tracker_api_timeouts_total{timeout=\"header\"} 1"));
        assert!(
            text.contains("tracker_api_heartbeats_total{result=\"accepted\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("tracker_api_registrations_total{protocol=\"vnc\",result=\"created\"} 1")
        );
        assert!(text.contains("tracker_api_limit_rejections_total{limit=\"user\"} 1"));
        assert!(text.contains("tracker_api_backend_errors_total{backend=\"redis\"} 1"));
        assert!(text.contains("tracker_api_websockets_open 1"));
        drop(guard);
        assert!(m.render().contains("tracker_api_websockets_open 0"));
    }

    #[test]
    fn requests_are_counted_and_timed_by_route() {
        let m = Metrics::new();
        let hb = m.route_series("/v1/sessions/{session_id}/connections/{connection_id}/heartbeat");
        m.request_done(&hb, MethodLabel::Post, 200, 0.0007);
        m.request_done(&hb, MethodLabel::Post, 204, 0.003);
        m.request_done(&hb, MethodLabel::Post, 404, 20.0);
        let again =
            m.route_series("/v1/sessions/{session_id}/connections/{connection_id}/heartbeat");
        assert!(Arc::ptr_eq(&hb, &again), "resolved once");
        let text = m.render();
        let route = "route=\"/v1/sessions/{session_id}/connections/{connection_id}/heartbeat\"";
        assert!(
            text.contains(&format!(
                "tracker_api_requests_total{{{route},method=\"POST\",status=\"2xx\"}} 2"
            )),
            "{text}"
        );
        assert!(text.contains(&format!(
            "tracker_api_requests_total{{{route},method=\"POST\",status=\"4xx\"}} 1"
        )));
        assert!(!text.contains("status=\"5xx\""), "no series before use");
        assert!(text.contains(&format!(
            "tracker_api_request_duration_seconds_count{{{route}}} 3"
        )));
        assert!(
            text.contains(&format!(
                "tracker_api_request_duration_seconds_bucket{{le=\"0.001\",{route}}} 1"
            )),
            "{text}"
        );
        assert!(text.contains(&format!(
            "tracker_api_request_duration_seconds_bucket{{le=\"+Inf\",{route}}} 3"
        )));
        assert!(text.contains(&format!(
            "tracker_api_request_duration_seconds_sum{{{route}}} 20.0037"
        )));
    }

    #[test]
    fn status_classes() {
        assert_eq!(status_class_index(101).0, "1xx");
        assert_eq!(status_class_index(204).0, "2xx");
        assert_eq!(status_class_index(429).0, "4xx");
        assert_eq!(status_class_index(503).0, "5xx");
    }
}
