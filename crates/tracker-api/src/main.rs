//! `tracker-api`: parse the settings, start telemetry, build (which checks
//! the settings), serve until SIGTERM or SIGINT. Everything else lives in
//! the library.

use std::process::ExitCode;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracker_api::config::Config;
use tracker_api::{Application, BuildError};

// Every request allocates a little (headers, JSON, Redis arguments); under
// load glibc's malloc showed up as a tenth of the profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cfg: Config = match tracker_runtime::parse_settings("tracker-api") {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    tracker_runtime::init_telemetry(cfg.log_format);
    let app = match Application::build(cfg).await {
        Ok(app) => app,
        // Settings that do not fit together: one line, as for a bad value.
        Err(BuildError::Config(e)) => {
            eprintln!("tracker-api: {e}");
            return ExitCode::from(2);
        }
        Err(e) => return failed(anyhow::Error::new(e).context("start the API")),
    };
    match run(app).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => failed(e),
    }
}

fn failed(e: anyhow::Error) -> ExitCode {
    tracing::error!("{e:#}");
    ExitCode::FAILURE
}

async fn run(app: Application) -> anyhow::Result<()> {
    tracing::info!(addr = %app.local_addr(), "listening");
    let shutdown = CancellationToken::new();
    tokio::spawn(tracker_runtime::cancel_on_signal(shutdown.clone()));
    app.run_until(shutdown).await.context("serve HTTP")
}
