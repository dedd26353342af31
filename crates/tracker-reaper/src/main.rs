//! `tracker-reaper`: settings, telemetry, build (which checks the settings),
//! run until SIGTERM or SIGINT.

use std::process::ExitCode;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracker_reaper::{Application, Config, Error};

#[tokio::main]
async fn main() -> ExitCode {
    let cfg: Config = match tracker_runtime::parse_settings("tracker-reaper") {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    tracker_runtime::init_telemetry(cfg.log_format);
    let app = match Application::build(cfg).await {
        Ok(app) => app,
        // Settings that do not fit together: one line, as for a bad value.
        Err(Error::Config(e)) => {
            eprintln!("tracker-reaper: {e}");
            return ExitCode::from(2);
        }
        Err(e) => return failed(anyhow::Error::new(e).context("start the reaper")),
    };
    match run(app).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => failed(e),
    }
}

/// Logged once, with the whole cause chain on one line.
fn failed(e: anyhow::Error) -> ExitCode {
    tracing::error!(error = format!("{e:#}"), "reaper failed");
    ExitCode::FAILURE
}

async fn run(app: Application) -> anyhow::Result<()> {
    tracing::info!(metrics_port = app.metrics_port(), "metrics listener bound");
    let shutdown = CancellationToken::new();
    tokio::spawn(tracker_runtime::cancel_on_signal(shutdown.clone()));
    app.run_until(shutdown).await.context("run the reaper")
}
