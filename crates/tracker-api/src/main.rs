//! `tracker-api`: everything lives in the library; the steps of `main`
//! (settings, telemetry, build, serve until SIGTERM or SIGINT) are
//! `tracker_runtime::service::main`'s, shared with the reaper.

use std::process::ExitCode;

use tracker_api::Application;

// Every request allocates a little (headers, JSON, Redis arguments); under
// load glibc's malloc showed up as a tenth of the profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    tracker_runtime::service::main::<Application>().await
}
