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
use std::time::Duration;

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
    Races {
        #[arg(long, default_value_t = 10_000)]
        episodes: usize,
        #[arg(long, default_value_t = 200)]
        sessions: usize,
        #[arg(long, default_value_t = 96)]
        concurrency: usize,
        /// Share of the reaper's Session patches the fake Kubernetes API server faults
        /// (0: none, and no re-created Sessions or watch gaps either).
        #[arg(long, default_value_t = 0.1)]
        faults: f64,
    },
    /// SIGKILL the leading reaper K times under load.
    LeaderKill {
        #[arg(long, default_value_t = 20)]
        kills: usize,
        #[arg(long, default_value_t = 100)]
        sessions: usize,
        #[arg(long, default_value_t = 48)]
        concurrency: usize,
    },
    /// PostgreSQL unreachable from the reapers under load.
    PgOutage {
        /// Outage length (humantime, e.g. 60s).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        outage: Duration,
        #[arg(long, default_value_t = 100)]
        sessions: usize,
        #[arg(long, default_value_t = 48)]
        concurrency: usize,
    },
    /// SIGKILL an API replica holding WebSockets.
    ApiKill {
        #[arg(long, default_value_t = 1000)]
        websockets: usize,
        #[arg(long, default_value_t = 200)]
        survivors: usize,
    },
    /// Many WebSockets dropped at once.
    WsDrop {
        #[arg(long, default_value_t = 10_000)]
        websockets: usize,
        #[arg(long, default_value_t = 500)]
        sessions: usize,
    },
    /// A private redis-server SIGKILLed and restarted empty (API and reapers in standalone mode).
    RedisRestart {
        /// How long Redis stays down (humantime).
        #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
        outage: Duration,
        #[arg(long, default_value_t = 40)]
        sessions: usize,
        /// HTTP clients per session (each session also holds one WebSocket).
        #[arg(long, default_value_t = 3)]
        http_per_session: usize,
        /// Bound of every API answer while Redis is down (humantime).
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        max_latency: Duration,
    },
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
        Scenario::Races {
            episodes,
            sessions,
            concurrency,
            faults,
        } => races::run(
            opts,
            races::RacesParams {
                episodes,
                sessions,
                concurrency,
                seed,
                faults,
            },
        )
        .await
        .map(|f| f.to_string()),
        Scenario::LeaderKill {
            kills,
            sessions,
            concurrency,
        } => leader_kill::run(
            opts,
            leader_kill::LeaderKillParams {
                kills,
                sessions,
                concurrency,
                seed,
            },
        )
        .await
        .map(|f| f.to_string()),
        Scenario::PgOutage {
            outage,
            sessions,
            concurrency,
        } => pg_outage::run(
            opts,
            pg_outage::PgOutageParams {
                outage,
                sessions,
                concurrency,
                seed,
            },
        )
        .await
        .map(|f| f.to_string()),
        Scenario::ApiKill {
            websockets,
            survivors,
        } => api_kill::run(
            opts,
            api_kill::ApiKillParams {
                websockets,
                survivors,
                sessions: (websockets / 20).max(1),
            },
        )
        .await
        .map(|f| f.to_string()),
        Scenario::WsDrop {
            websockets,
            sessions,
        } => ws_drop::run(
            opts,
            ws_drop::WsDropParams {
                websockets,
                sessions,
                concurrency: 200,
            },
        )
        .await
        .map(|f| f.to_string()),
        Scenario::RedisRestart {
            outage,
            sessions,
            http_per_session,
            max_latency,
        } => redis_restart::run(
            opts,
            redis_restart::RedisRestartParams {
                sessions,
                http_per_session,
                outage,
                max_latency,
            },
        )
        .await
        .map(|f| f.to_string()),
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
