//! `tracker-reaper`: telemetry, settings, build, run until SIGTERM or SIGINT.

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracker_reaper::{config, telemetry, Application, Config};

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        // Logged once, with the whole cause chain on one line.
        tracing::error!(error = format!("{e:#}"), "reaper failed");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let cfg = match Config::try_parse() {
        Ok(cfg) => cfg,
        Err(e) if e.use_stderr() => {
            // One clear line: the value at fault, not a usage screen.
            eprintln!("tracker-reaper: {}", config::first_line(&e));
            std::process::exit(2);
        }
        Err(e) => e.exit(), // --help, --version
    };
    if let Err(e) = cfg.validate() {
        eprintln!("tracker-reaper: {e}");
        std::process::exit(2);
    }
    telemetry::init(cfg.log_format);

    let app = Application::build(cfg).await.context("start the reaper")?;
    tracing::info!(metrics_port = app.metrics_port(), "metrics listener bound");
    let shutdown = CancellationToken::new();
    tokio::spawn(signal_on(shutdown.clone()));
    app.run_until(shutdown).await.context("run the reaper")
}

/// Cancels `token` on SIGTERM or SIGINT.
async fn signal_on(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT: shutting down"),
        () = term => tracing::info!("SIGTERM: shutting down"),
    }
    token.cancel();
}
