//! Load generator for tracker-api replicas: single heartbeats, batch
//! heartbeats and many open WebSockets, reporting throughput and p50/p99.
//!
//! A bench target (not a binary of the service) so it may use the
//! dev-dependencies' HTTP and WebSocket clients. Run it in release:
//!
//! ```text
//! cargo bench -p tracker-api --bench loadgen -- single --url http://127.0.0.1:8080 --secret S
//! cargo bench -p tracker-api --bench loadgen -- batch  --url http://127.0.0.1:8080 --secret S
//! cargo bench -p tracker-api --bench loadgen -- ws     --url http://127.0.0.1:8080 --secret S --sockets 10000 --server-pid PID
//! cargo bench -p tracker-api --bench loadgen -- noop   --listen 127.0.0.1:18099
//! ```
//!
//! `noop` serves the same routes with handlers that do nothing: driven by
//! `single`, it measures the HTTP ceiling of the machine.
//!
//! Every run is bounded in time and stays on the given (loopback) address.

#![allow(clippy::unwrap_used)] // a load generator fails loudly; nothing to recover

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::post;
use axum::{Json, Router};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[derive(Debug, Parser)]
#[command(about = "Load generator for tracker-api")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, clap::Args)]
struct Target {
    /// Base URL of the replica.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// HS256 secret to mint a service token with (any value when auth is disabled).
    #[arg(
        long,
        env = "TRACKER_JWT_SECRET",
        default_value = "loadgen-secret-loadgen-secret-loadgen"
    )]
    secret: String,
    /// Connections registered before the run (spread over sessions of 10).
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Concurrent requests in flight.
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// How long to drive load.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// `POST .../heartbeat`, one connection per request.
    Single(Target),
    /// `POST /v1/heartbeats` with `--batch` pairs per request.
    Batch {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 1000)]
        batch: usize,
    },
    /// Opens `--sockets` WebSockets, holds them, and measures single
    /// heartbeats meanwhile; reports the server's resident memory.
    Ws {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 10_000)]
        sockets: usize,
        /// PID of the replica, to read its VmRSS.
        #[arg(long)]
        server_pid: Option<u32>,
    },
    /// Serves do-nothing handlers on the heartbeat and registration routes.
    Noop {
        #[arg(long, default_value = "127.0.0.1:18099")]
        listen: SocketAddr,
        /// Serve for this long, then exit.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
}

fn service_token(secret: &str) -> String {
    let exp = chrono::Utc::now().timestamp() + 24 * 3600;
    encode(
        &Header::default(),
        &json!({"sub": "loadgen", "roles": ["service"], "exp": exp}),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn client(concurrency: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Registers `n` connections; returns (session, connection) pairs.
async fn register(
    t: &Target,
    http: &reqwest::Client,
    token: &str,
    n: usize,
) -> Vec<(String, String)> {
    let ids = futures::stream::iter(0..n)
        .map(|i| {
            let url = format!("{}/v1/sessions/load-{}/connections", t.url, i / 10);
            let req = http
                .post(url)
                .bearer_auth(token)
                .json(&json!({"protocol": "http"}));
            async move {
                let res = req.send().await.unwrap();
                assert!(
                    res.status().is_success(),
                    "registration failed: {}",
                    res.status()
                );
                let body: Value = res.json().await.unwrap();
                (
                    format!("load-{}", i / 10),
                    body["connection"]["connection_id"]
                        .as_str()
                        .unwrap()
                        .to_owned(),
                )
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    ids
}

#[derive(Debug, Default)]
struct Sample {
    latencies: Vec<Duration>,
    errors: u64,
}

/// Runs `concurrency` workers for `duration`, each calling `op(i)` in a loop.
async fn drive<F, Fut>(concurrency: usize, duration: Duration, op: F) -> (Sample, Duration)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|w| {
            let (op, stop) = (op.clone(), stop.clone());
            tokio::spawn(async move {
                let mut s = Sample::default();
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    if op(i).await {
                        s.latencies.push(t.elapsed());
                    } else {
                        s.errors += 1;
                    }
                    i += concurrency;
                }
                s
            })
        })
        .collect();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Sample::default();
    for w in workers {
        let s = w.await.unwrap();
        all.latencies.extend(s.latencies);
        all.errors += s.errors;
    }
    (all, started.elapsed())
}

fn report(what: &str, sample: &mut Sample, elapsed: Duration, per_request: usize) {
    sample.latencies.sort_unstable();
    let n = sample.latencies.len();
    let pct = |p: f64| {
        if n == 0 {
            Duration::ZERO
        } else {
            sample.latencies[((n as f64 * p) as usize).min(n - 1)]
        }
    };
    let secs = elapsed.as_secs_f64();
    println!(
        "{what}: {n} requests in {secs:.1}s = {:.0} req/s ({:.0} heartbeats/s), p50 {:.2} ms, p99 {:.2} ms, errors {}",
        n as f64 / secs,
        (n * per_request) as f64 / secs,
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        sample.errors
    );
}

async fn single(t: &Target) {
    let http = client(t.concurrency);
    let token = service_token(&t.secret);
    let ids = Arc::new(register(t, &http, &token, t.connections).await);
    let base = t.url.clone();
    let (mut s, elapsed) = drive(t.concurrency, t.duration, move |i| {
        let (sid, cid) = &ids[i % ids.len()];
        let req = http
            .post(format!(
                "{base}/v1/sessions/{sid}/connections/{cid}/heartbeat"
            ))
            .bearer_auth(&token);
        async move { matches!(req.send().await, Ok(r) if r.status().is_success()) }
    })
    .await;
    report("single heartbeats", &mut s, elapsed, 1);
}

async fn batch(t: &Target, size: usize) {
    let http = client(t.concurrency);
    let token = service_token(&t.secret);
    let ids = register(t, &http, &token, t.connections.max(size)).await;
    let pairs: Vec<Value> = ids
        .iter()
        .map(|(s, c)| json!({"session_id": s, "connection_id": c}))
        .collect();
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(
        pairs
            .chunks(size)
            .filter(|c| c.len() == size)
            .map(|c| serde_json::to_vec(&json!({"heartbeats": c})).unwrap())
            .collect(),
    );
    let url = format!("{}/v1/heartbeats", t.url);
    let (mut s, elapsed) = drive(t.concurrency, t.duration, move |i| {
        let req = http
            .post(&url)
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(bodies[i % bodies.len()].clone());
        async move { matches!(req.send().await, Ok(r) if r.status().is_success()) }
    })
    .await;
    report(
        &format!("batch heartbeats ({size} pairs)"),
        &mut s,
        elapsed,
        size,
    );
}

fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

async fn websockets(t: &Target, sockets: usize, pid: Option<u32>) {
    let token = service_token(&t.secret);
    let ws_base = t.url.replacen("http", "ws", 1);
    if let Some(pid) = pid {
        println!(
            "server RSS before: {:.1} MiB",
            rss_mib(pid).unwrap_or(f64::NAN)
        );
    }
    let started = Instant::now();
    let opened: Vec<_> = futures::stream::iter(0..sockets)
        .map(|i| {
            let mut req = format!("{ws_base}/v1/sessions/ws-load-{}/ws", i / 10)
                .into_client_request()
                .unwrap();
            req.headers_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            async move {
                tokio_tungstenite::connect_async(req)
                    .await
                    .map(|(ws, _)| ws)
            }
        })
        .buffer_unordered(128)
        .collect()
        .await;
    let (ok, failed): (Vec<_>, Vec<_>) = opened.into_iter().partition(Result::is_ok);
    println!(
        "opened {} websockets in {:.1}s ({} failed)",
        ok.len(),
        started.elapsed().as_secs_f64(),
        failed.len()
    );
    // Keep reading so pings are answered (tungstenite pongs while reading).
    let readers: Vec<_> = ok
        .into_iter()
        .flatten()
        .map(|mut ws| tokio::spawn(async move { while let Some(Ok(_)) = ws.next().await {} }))
        .collect();
    single(t).await;
    if let Some(pid) = pid {
        println!(
            "server RSS with {} sockets open: {:.1} MiB",
            readers.len(),
            rss_mib(pid).unwrap_or(f64::NAN)
        );
    }
    for r in readers {
        r.abort();
    }
}

async fn noop(listen: SocketAddr, duration: Duration) {
    let app = Router::new()
        .route(
            "/v1/sessions/{session_id}/connections",
            post(|| async {
                (
                    axum::http::StatusCode::CREATED,
                    Json(json!({"connection": {"connection_id": uuid::Uuid::new_v4()}})),
                )
            }),
        )
        .route(
            "/v1/sessions/{session_id}/connections/{connection_id}/heartbeat",
            post(|| async { Json(json!({})) }),
        );
    let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
    println!("noop server on {listen} for {duration:?}");
    let _ = tokio::time::timeout(duration, axum::serve(listener, app).into_future()).await;
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; it means nothing here.
    let args = Args::parse_from(std::env::args().filter(|a| a != "--bench"));
    match args.cmd {
        Cmd::Single(t) => single(&t).await,
        Cmd::Batch {
            target,
            batch: size,
        } => batch(&target, size).await,
        Cmd::Ws {
            target,
            sockets,
            server_pid,
        } => websockets(&target, sockets, server_pid).await,
        Cmd::Noop { listen, duration } => noop(listen, duration).await,
    }
}
