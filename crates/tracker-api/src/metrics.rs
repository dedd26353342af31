//! Prometheus metrics of one API instance, on the workspace's one metrics
//! stack ([`tracker_runtime::metrics`]).
//!
//! Each [`Metrics`] owns its registry (no global recorder), so several
//! instances in one test process count separately. Every label value comes
//! from a fixed set: route patterns, enums; never ids or error text.
//!
//! This module reads what [`crate::error`] leaves on a response (which
//! backend failed, which limit refused); `error` knows nothing of metrics.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tracing::Instrument;
use tracker_core::Protocol;

use tracker_runtime::label_enum;
use tracker_runtime::metrics::SharedRegistry;

use crate::error::{Backend, LimitKind};
use crate::error::{BackendFailure, LimitRejection};

label_enum!(
    /// Which timeout closed a connection or ended a request.
    Timeout { Header => "header", Keepalive => "keepalive", Request => "request" }
);

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

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

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
    heartbeats: Family<HeartbeatLabels, Counter>,
    registrations: Family<RegistrationLabels, Counter>,
    limit_rejections: Family<LimitLabels, Counter>,
    backend_errors: Family<BackendLabels, Counter>,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms to ~16 s: heartbeats sit at the bottom, history queries higher.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
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
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
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
        Self(Arc::new(Inner {
            registry: Arc::new(registry),
            requests,
            duration,
            websockets_open,
            session_watches,
            session_watch_reads,
            connections_open,
            timeouts,
            heartbeats,
            registrations,
            limit_rejections,
            backend_errors,
        }))
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
            self.0
                .heartbeats
                .get_or_create(&HeartbeatLabels { result })
                .inc_by(n);
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

/// Decrements the open-WebSocket gauge on drop, however the socket ends.
#[derive(Debug)]
pub struct OpenSocket(Metrics);

impl Drop for OpenSocket {
    fn drop(&mut self) {
        self.0 .0.websockets_open.dec();
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Middleware: a span per request, then counts and times it by route pattern.
/// Backend errors and limit rejections are read from markers that
/// [`crate::error::ApiError`] leaves on the response.
pub async fn track(State(metrics): State<Metrics>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let method = req.method().clone();
    let span = tracing::info_span!("request", method = %method, route = %route);
    let start = Instant::now();
    let response = next.run(req).instrument(span).await;
    let elapsed = start.elapsed().as_secs_f64();
    let m = &metrics.0;
    m.requests
        .get_or_create(&RequestLabels {
            route: route.clone(),
            method: (&method).into(),
            status: status_class(response.status().as_u16()),
        })
        .inc();
    m.duration
        .get_or_create(&RouteLabels { route })
        .observe(elapsed);
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
    fn status_classes() {
        assert_eq!(status_class(101), "1xx");
        assert_eq!(status_class(204), "2xx");
        assert_eq!(status_class(429), "4xx");
        assert_eq!(status_class(503), "5xx");
    }
}
