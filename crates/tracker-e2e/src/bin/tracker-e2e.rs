//! `tracker-e2e`: the full end-to-end runs, one subcommand per scenario, printing
//! its figures. Build the binaries under test first (same profile):
//!
//! ```sh
//! cargo build --release -p tracker-api -p tracker-reaper
//! cargo run -p tracker-e2e --release -- races --episodes 10000
//! cargo run -p tracker-e2e --release -- leader-kill --kills 20
//! cargo run -p tracker-e2e --release -- redis-restart --outage 15s
//! ```
//!
//! Exit code 0: every invariant held; 1: a violation (figures printed); 2: the run could not
//! be set up or did not finish.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracker_e2e::scenarios::{api_kill, leader_kill, pg_outage, races, redis_restart, ws_drop};
use tracker_e2e::{Auth, Error, HarnessOptions};

#[derive(Debug, Parser)]
#[command(
    name = "tracker-e2e",
    about = "Multi-process end-to-end runs of the connection tracker"
)]
struct Cli {
    /// Random seed of the clients (default: from the clock; printed).
    #[arg(long, global = true)]
    seed: Option<u64>,
    /// Run the API replicas with TRACKER_AUTH=disabled instead of JWTs.
    #[arg(long, global = true)]
    no_auth: bool,
    /// Number of API replicas.
    #[arg(long, global = true, default_value_t = 2)]
    apis: usize,
    /// RUST_LOG of the processes under test.
    #[arg(long, global = true, default_value = "info")]
    log: String,
    /// Keep the run directory (process logs) even when everything passed.
    #[arg(long, global = true)]
    keep: bool,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Randomized races of registrations, heartbeats, closes, expiry, hibernation and wakes.
    Races(races::RacesParams),
    /// SIGKILL the leading reaper K times under load.
    LeaderKill(leader_kill::LeaderKillParams),
    /// PostgreSQL unreachable from the reapers under load.
    PgOutage(pg_outage::PgOutageParams),
    /// SIGKILL an API replica holding WebSockets.
    ApiKill(api_kill::ApiKillParams),
    /// Many WebSockets dropped at once.
    WsDrop(ws_drop::WsDropParams),
    /// A private redis-server SIGKILLed and restarted empty (API and reapers in standalone mode).
    RedisRestart(redis_restart::RedisRestartParams),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let seed = cli.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    });
    let opts = HarnessOptions {
        apis: cli.apis.max(1),
        auth: if cli.no_auth {
            Auth::Disabled
        } else {
            Auth::Jwt
        },
        rust_log: cli.log.clone(),
        keep_run_dir: cli.keep,
        ..HarnessOptions::default()
    };
    eprintln!("tracker-e2e: seed {seed}");
    let result = match cli.scenario {
        Scenario::Races(p) => races::run(opts, races::RacesParams { seed, ..p })
            .await
            .map(|f| f.to_string()),
        Scenario::LeaderKill(p) => {
            leader_kill::run(opts, leader_kill::LeaderKillParams { seed, ..p })
                .await
                .map(|f| f.to_string())
        }
        Scenario::PgOutage(p) => pg_outage::run(opts, pg_outage::PgOutageParams { seed, ..p })
            .await
            .map(|f| f.to_string()),
        Scenario::ApiKill(p) => {
            let sessions = (p.websockets / 20).max(1);
            api_kill::run(opts, api_kill::ApiKillParams { sessions, ..p })
                .await
                .map(|f| f.to_string())
        }
        Scenario::WsDrop(p) => ws_drop::run(opts, p).await.map(|f| f.to_string()),
        Scenario::RedisRestart(p) => redis_restart::run(opts, p).await.map(|f| f.to_string()),
    };
    match result {
        Ok(figures) => {
            println!("{figures}");
            ExitCode::SUCCESS
        }
        Err(Error::Violated {
            scenario,
            details,
            run_dir,
        }) => {
            println!("{details}");
            eprintln!(
                "tracker-e2e: {scenario}: invariants violated; logs in {}",
                run_dir.display()
            );
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("tracker-e2e: {e}");
            ExitCode::from(2)
        }
    }
}
