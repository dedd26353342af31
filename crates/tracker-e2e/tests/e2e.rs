//! The short end-to-end runs for CI: real `tracker-api` and `tracker-reaper` processes (built
//! by `cargo test --workspace`; alone: `cargo build -p tracker-api -p tracker-reaper`)
//! against the Redis Cluster, PostgreSQL and the in-process fake Kubernetes API server.
//! Run them with `scripts/test.sh -p tracker-e2e`, which starts the services.
//!
//! The scenarios run one at a time (each starts four processes; two cores are the budget).
//! The fault scenarios beyond the leader kill and the Redis restart are `#[ignore]`d
//! here (run them with `-- --ignored`); their full sizes run from the binary
//! (docs/reliability.md).

use tokio::sync::Mutex;
use tracker_e2e::scenarios::{api_kill, leader_kill, pg_outage, races, redis_restart, ws_drop};
use tracker_e2e::HarnessOptions;

/// One scenario at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// A different seed each run, printed (shown on failure) so a failure can be replayed.
fn seed() -> u64 {
    let seed = std::env::var("TRACKER_E2E_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        });
    eprintln!("seed {seed} (replay with TRACKER_E2E_SEED={seed})");
    seed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn races_short() {
    let _one = SERIAL.lock().await;
    // With NATS: every landing's event is checked too.
    let params = races::RacesParams {
        nats: true,
        ..races::RacesParams::short(seed())
    };
    let figures = races::run(HarnessOptions::default(), params)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{figures}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_once() {
    let _one = SERIAL.lock().await;
    let params = leader_kill::LeaderKillParams {
        nats: true,
        ..leader_kill::LeaderKillParams::short(seed())
    };
    let figures = leader_kill::run(HarnessOptions::default(), params)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{figures}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fault scenario outside the CI budget; run with --ignored"]
async fn pg_outage_short() {
    let _one = SERIAL.lock().await;
    let figures = pg_outage::run(
        HarnessOptions::default(),
        pg_outage::PgOutageParams::short(seed()),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{figures}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fault scenario outside the CI budget; run with --ignored"]
async fn api_kill_short() {
    let _one = SERIAL.lock().await;
    let figures = api_kill::run(HarnessOptions::default(), api_kill::ApiKillParams::short())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{figures}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fault scenario outside the CI budget; run with --ignored"]
async fn ws_drop_short() {
    let _one = SERIAL.lock().await;
    let figures = ws_drop::run(HarnessOptions::default(), ws_drop::WsDropParams::short())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{figures}");
}

/// In CI: about 10 s, and it guards a bug it found (the mirror not rebuilt
/// after Redis lost its data).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_short() {
    let _one = SERIAL.lock().await;
    let figures = redis_restart::run(
        HarnessOptions::default(),
        redis_restart::RedisRestartParams::short(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{figures}");
}
