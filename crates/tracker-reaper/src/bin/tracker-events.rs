//! `tracker-events`: prints the session events a controller receives, as
//! they are published (`streamspace.session.>` on NATS), one line each.
//!
//! With `--controller <API base URL>` it also plays a minimal docker
//! controller: it "carries out" each hibernate and wake at once and reports
//! the new state with `PUT /v1/sessions/{id}`, keeping the session's idle
//! timeout (read with `GET` first). `scripts/dev.sh` runs it that way.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use tracker_reaper::nats::{Payload, SUBJECTS};

/// Tail the session events on NATS.
#[derive(Debug, Parser)]
#[command(name = "tracker-events", version, about)]
struct Args {
    /// NATS server.
    #[arg(
        long,
        env = "TRACKER_NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        hide_env_values = true
    )]
    nats_url: String,

    /// Act as a toy controller: report each hibernate / wake as done to this
    /// API (e.g. `http://127.0.0.1:8080`).
    #[arg(long)]
    controller: Option<String>,

    /// Bearer token for the controller's reports (service role); none when
    /// the API runs with `TRACKER_AUTH=disabled`.
    #[arg(long, env = "TRACKER_EVENTS_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tracker-events: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let client = tokio::time::timeout(Duration::from_secs(10), async_nats::connect(&args.nats_url))
        .await
        .context("connect to NATS: timed out")?
        .context("connect to NATS")?;
    let mut events = client
        .subscribe(SUBJECTS)
        .await
        .context("subscribe to the session events")?;
    eprintln!(
        "tracker-events: listening on {SUBJECTS} at {}",
        args.nats_url
    );
    let http = reqwest_client()?;
    while let Some(message) = events.next().await {
        let subject = message.subject.to_string();
        let text = String::from_utf8_lossy(&message.payload);
        println!("{subject} {text}");
        let Some(base) = args.controller.as_deref() else {
            continue;
        };
        let Ok(payload) = serde_json::from_slice::<Payload>(&message.payload) else {
            continue;
        };
        let state = if subject.starts_with("streamspace.session.hibernate.") {
            "hibernated"
        } else if subject.starts_with("streamspace.session.wake.") {
            "running"
        } else {
            continue;
        };
        match report(&http, base, args.token.as_deref(), &payload, state).await {
            Ok(status) => println!(
                "  controller: {} is {state} (PUT answered {status})",
                payload.session_id
            ),
            Err(e) => eprintln!(
                "  controller: reporting {} failed: {e:#}",
                payload.session_id
            ),
        }
    }
    Ok(())
}

fn reqwest_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .context("build the HTTP client")
}

/// Reports `state` for the event's session, keeping what it was declared with.
async fn report(
    http: &reqwest::Client,
    base: &str,
    token: Option<&str>,
    event: &Payload,
    state: &str,
) -> anyhow::Result<u16> {
    let url = format!(
        "{}/v1/sessions/{}",
        base.trim_end_matches('/'),
        event.session_id
    );
    let with_token = |r: reqwest::RequestBuilder| match token {
        Some(t) => r.bearer_auth(t),
        None => r,
    };
    let view: serde_json::Value = with_token(http.get(&url))
        .send()
        .await
        .context("read the session")?
        .json()
        .await
        .context("read the session")?;
    let idle = match view["idle_timeout_seconds"].as_u64() {
        Some(s) => format!("{s}s"),
        None => String::new(),
    };
    let body = serde_json::json!({"user": event.user_id, "state": state, "idle_timeout": idle});
    let res = with_token(http.put(&url))
        .json(&body)
        .send()
        .await
        .context("report the state")?;
    Ok(res.status().as_u16())
}
