//! `tracker-reaper`: everything lives in the library; the steps of `main`
//! (settings, telemetry, build, run until SIGTERM or SIGINT) are
//! `tracker_runtime::service::main`'s, shared with the API.

use std::process::ExitCode;

use tracker_reaper::Application;

#[tokio::main]
async fn main() -> ExitCode {
    tracker_runtime::service::main::<Application>().await
}
