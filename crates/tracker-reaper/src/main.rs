//! `tracker-reaper`: telemetry, settings, build, run until SIGTERM or SIGINT.

use std::process::ExitCode;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracker_reaper::{Application, Config};

#[tokio::main]
async fn main() -> ExitCode {
    let cfg: Config = match tracker_runtime::parse_settings("tracker-reaper") {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    if let Err(e) = cfg.validate() {
        eprintln!("tracker-reaper: {e}");
        return ExitCode::from(2);
    }
    tracker_runtime::init_telemetry(cfg.log_format);
    match run(cfg).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Logged once, with the whole cause chain on one line.
            tracing::error!(error = format!("{e:#}"), "reaper failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    let app = Application::build(cfg).await.context("start the reaper")?;
    tracing::info!(metrics_port = app.metrics_port(), "metrics listener bound");
    let shutdown = CancellationToken::new();
    tokio::spawn(tracker_runtime::cancel_on_signal(shutdown.clone()));
    app.run_until(shutdown).await.context("run the reaper")
}
