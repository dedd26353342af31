//! `tracker-api`: parse the settings, start telemetry, build, serve until
//! SIGTERM or SIGINT. Everything else lives in the library.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracker_api::config::Config;
use tracker_api::{telemetry, Application};

#[tokio::main]
async fn main() -> ExitCode {
    let cfg = match Config::try_parse() {
        Ok(cfg) => cfg,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            let text = e.render().to_string();
            eprintln!(
                "tracker-api: {}",
                text.lines().next().unwrap_or("invalid settings")
            );
            return ExitCode::from(2);
        }
    };
    if let Err(e) = cfg.validate() {
        eprintln!("tracker-api: {e}");
        return ExitCode::from(2);
    }
    telemetry::init(cfg.log_format);
    match run(cfg).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    let app = Application::build(cfg).await.context("start the API")?;
    tracing::info!(addr = %app.local_addr(), "listening");
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    app.run_until(shutdown).await.context("serve HTTP")
}

async fn watch_signals(shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM; only SIGINT stops the process");
            let _ = tokio::signal::ctrl_c().await;
            shutdown.cancel();
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}
