//! `tracker-api`: parse the settings, start telemetry, build, serve until
//! SIGTERM or SIGINT. Everything else lives in the library.

use std::process::ExitCode;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracker_api::config::Config;
use tracker_api::Application;

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
    if let Err(e) = cfg.validate() {
        eprintln!("tracker-api: {e}");
        return ExitCode::from(2);
    }
    tracker_runtime::init_telemetry(cfg.log_format);
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
    tokio::spawn(tracker_runtime::cancel_on_signal(shutdown.clone()));
    app.run_until(shutdown).await.context("serve HTTP")
}
