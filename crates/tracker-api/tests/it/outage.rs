//! Redis unreachable: 503 within the timeout, then recovery by itself.

use std::time::{Duration, Instant};

use serde_json::json;
use tracker_core::testing::{config, Backend};
use tracker_core::Store;
use tracker_e2e::proxy::Proxy;

use crate::helpers::*;

fn fast_timeout() -> Options {
    Options {
        extra_args: vec!["--redis-timeout".into(), "500ms".into()],
        ..Options::default()
    }
}

#[tokio::test]
async fn unreachable_redis_is_a_quick_503() {
    let mut cfg = config(Backend::Standalone, Duration::from_secs(60));
    cfg.urls = vec!["redis://127.0.0.1:1".into()];
    cfg.command_timeout = Duration::from_millis(500);
    cfg.connect_timeout = Duration::from_millis(500);
    let store = Store::connect(&cfg)
        .await
        .expect("standalone connects lazily");
    let app = TestApp::spawn_with_store(&cfg, store, fast_timeout()).await;
    let svc = service_token();

    let started = Instant::now();
    let (status, code, _) = error_code(
        app.post(
            "/v1/sessions/s-1/connections",
            &svc,
            json!({"protocol": "vnc"}),
        )
        .await,
    )
    .await;
    assert_eq!((status, code.as_str()), (503, "unavailable"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );

    assert_eq!(
        app.client
            .get(app.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
    assert_eq!(
        app.client
            .get(app.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("tracker_api_backend_errors_total{backend=\"redis\"}"),
        "{metrics}"
    );
}

/// The test Redis's address (`TRACKER_TEST_REDIS_URL`), for the proxy.
fn redis_addr() -> std::net::SocketAddr {
    use std::net::ToSocketAddrs;
    let (urls, _) = Backend::Standalone.urls();
    let rest = urls[0]
        .split_once("://")
        .map_or(urls[0].as_str(), |(_, r)| r);
    let host_port = rest.rsplit('@').next().unwrap_or(rest);
    let host_port = host_port.split('/').next().unwrap_or(host_port);
    host_port
        .to_socket_addrs()
        .expect("TRACKER_TEST_REDIS_URL names a reachable host:port")
        .next()
        .expect("TRACKER_TEST_REDIS_URL resolves")
}

#[tokio::test]
async fn the_api_recovers_when_redis_returns() {
    let proxy = Proxy::start(redis_addr()).await.unwrap();
    let mut cfg = config(Backend::Standalone, Duration::from_secs(60));
    cfg.urls = vec![format!("redis://127.0.0.1:{}", proxy.addr().port())];
    cfg.command_timeout = Duration::from_millis(500);
    cfg.connect_timeout = Duration::from_millis(500);
    let store = Store::connect(&cfg).await.unwrap();
    let app = TestApp::spawn_with_store(&cfg, store, fast_timeout()).await;
    let svc = service_token();
    let register = || {
        app.post(
            "/v1/sessions/flaky-1/connections",
            &svc,
            json!({"protocol": "vnc"}),
        )
    };

    assert_eq!(register().await.status(), 201);
    proxy.set_enabled(false);
    let started = Instant::now();
    let status = register().await.status();
    assert_eq!(status, 503);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );

    proxy.set_enabled(true);
    eventually(
        "registrations succeed again",
        Duration::from_secs(10),
        || async { register().await.status() == 201 },
    )
    .await;
    assert_eq!(
        app.client
            .get(app.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}
