//! The ops routes of both binaries: `/metrics` (OpenMetrics text of the
//! instance's registry), `/healthz` (200 while the process runs) and
//! `/readyz` (200 while a [`Probe`] says the process can work, else 503).
//!
//! Bodies are JSON: `{"status": "ok"}`, `{"status": "ready"}`, and for a
//! 503 the API's error shape, `{"error": {"code": "unavailable", "message"}}`,
//! so a probe reads the same from either binary.
//!
//! [`routes`] is a plain [`Router`] fragment: the reaper serves it alone on
//! its metrics listener ([`serve`]); the API merges it into its router, on
//! its own port or on a separate ops listener.

use std::future::Future;

use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracker_core::Store;

use crate::http::ConnLimits;
use crate::metrics::{self, SharedRegistry};

/// Why the process cannot serve right now; the text goes into the 503 body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotReady(pub &'static str);

/// What `/readyz` asks.
pub trait Probe: Clone + Send + Sync + 'static {
    /// `Ok` when the process can do its work now. Must be bounded in time
    /// (the store's calls are).
    fn ready(&self) -> impl Future<Output = Result<(), NotReady>> + Send;
}

/// Ready while Redis answers a PING.
impl Probe for Store {
    async fn ready(&self) -> Result<(), NotReady> {
        self.ping().await.map_err(|e| {
            tracing::debug!(error = %e, "not ready: Redis does not answer");
            NotReady("redis is unavailable, retry later")
        })
    }
}

/// `/metrics`, `/healthz` and `/readyz`, for any router state.
pub fn routes<S, P>(registry: SharedRegistry, probe: P) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    P: Probe,
{
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move { metrics_text(&registry) }
            }),
        )
        .route("/healthz", get(healthz))
        .route(
            "/readyz",
            get(move || {
                let probe = probe.clone();
                async move { readyz(&probe).await }
            }),
        )
}

/// `/healthz`: the process runs.
pub async fn healthz() -> Response {
    json(StatusCode::OK, r#"{"status":"ok"}"#.to_owned())
}

/// `/readyz`: the probe's verdict.
pub async fn readyz<P: Probe>(probe: &P) -> Response {
    match probe.ready().await {
        Ok(()) => json(StatusCode::OK, r#"{"status":"ready"}"#.to_owned()),
        Err(NotReady(message)) => {
            let body = serde_json::json!({
                "error": {"code": "unavailable", "message": message}
            });
            json(StatusCode::SERVICE_UNAVAILABLE, body.to_string())
        }
    }
}

/// `/metrics`: the registry as OpenMetrics text.
pub fn metrics_text(registry: &prometheus_client::registry::Registry) -> Response {
    (
        StatusCode::OK,
        [(CONTENT_TYPE, metrics::CONTENT_TYPE)],
        metrics::render(registry),
    )
        .into_response()
}

fn json(status: StatusCode, body: String) -> Response {
    (status, [(CONTENT_TYPE, "application/json")], body).into_response()
}

/// Serves `router` on a listener of the ops routes only until `stop`, then
/// finishes open requests: the same hardened loop as the API's listeners
/// ([`crate::http::serve`]), with [`ConnLimits::OPS`].
pub async fn serve(listener: TcpListener, router: Router, stop: CancellationToken) {
    crate::http::serve(listener, router, ConnLimits::OPS, (), stop).await;
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::Request;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::registry::Registry;
    use tower::ServiceExt;

    use super::*;

    #[derive(Debug, Clone)]
    struct Fixed(Result<(), NotReady>);

    impl Probe for Fixed {
        async fn ready(&self) -> Result<(), NotReady> {
            self.0
        }
    }

    async fn get_path(router: Router, path: &str) -> (StatusCode, String) {
        let res = router
            .oneshot(Request::get(path).body(Body::empty()).expect("a request"))
            .await
            .expect("infallible");
        let status = res.status();
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .expect("a body");
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn the_three_routes_answer() {
        let mut registry = Registry::default();
        let gauge: Gauge = Gauge::default();
        registry.register("test_gauge", "a gauge", gauge.clone());
        gauge.set(3);
        let registry = Arc::new(registry);
        let ready = routes::<(), _>(registry.clone(), Fixed(Ok(())));
        let (status, text) = get_path(ready.clone(), "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(text.contains("test_gauge 3"), "{text}");
        assert_eq!(
            get_path(ready.clone(), "/healthz").await,
            (StatusCode::OK, r#"{"status":"ok"}"#.to_owned())
        );
        assert_eq!(get_path(ready, "/readyz").await.0, StatusCode::OK);

        let down = routes::<(), _>(registry, Fixed(Err(NotReady("down"))));
        let (status, body) = get_path(down.clone(), "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let body: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(body["error"]["code"], "unavailable");
        assert_eq!(body["error"]["message"], "down");
        assert_eq!(get_path(down, "/healthz").await.0, StatusCode::OK);
    }
}
