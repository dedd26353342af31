//! The metrics listener: `/metrics`, `/healthz`, `/readyz`.

use std::time::Duration;

use sqlx::PgPool;
use tracker_core::testing::Backend;

use crate::helpers::{eventually, metric, Env, Reaper};

#[sqlx::test(migrations = "../../migrations")]
async fn health_readiness_and_the_leader_gauge(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(5), &pool).await;
    let mut reaper = Reaper::start(env.config(), env.overrides()).await;
    assert_eq!(reaper.get("/healthz").await.0, 200);
    assert_eq!(reaper.get("/readyz").await.0, 200);
    reaper.wait_leader(Duration::from_secs(5)).await;
    let (status, text) = reaper.get("/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(metric(&text, "tracker_reaper_is_leader"), 1.0, "{text}");
    reaper.stop().await;
}

#[sqlx::test(migrations = "../../migrations")]
async fn not_ready_without_redis_but_alive(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(5), &pool).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut cfg = env.config();
    cfg.redis.redis_url = format!("redis://127.0.0.1:{port}");
    cfg.redis.redis_timeout = Duration::from_millis(300);
    let reaper = Reaper::start(cfg, env.overrides()).await;
    assert_eq!(reaper.get("/healthz").await.0, 200);
    assert_eq!(reaper.get("/readyz").await.0, 503);
    // A standby that cannot reach Redis never claims leadership.
    let text = eventually(
        Duration::from_secs(5),
        "an election attempt failed",
        || async {
            let (_, t) = reaper.get("/metrics").await;
            (metric(&t, "tracker_reaper_store_errors_total{task=\"election\"}") >= 1.0).then_some(t)
        },
    )
    .await;
    assert_eq!(metric(&text, "tracker_reaper_is_leader"), 0.0);
    assert!(!reaper.is_leader());
    reaper.stop().await;
}
