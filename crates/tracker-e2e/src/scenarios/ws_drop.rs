//! Many WebSockets dropped at once (TCP gone, no Close frame), as when a proxy or a network
//! link dies: every connection must be archived within window + sweep interval + a few
//! seconds, exactly once.

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::sockets::{self, OnStop};
use super::{conclude, live_connections, write_result};
use crate::harness::{Harness, HarnessOptions};
use crate::settings::Timing;
use crate::Result;

/// Size of a drop run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct WsDropParams {
    #[arg(long, default_value_t = 10_000)]
    pub websockets: usize,
    #[arg(long, default_value_t = 500)]
    pub sessions: usize,
    /// Concurrent handshakes while opening.
    #[arg(skip = 200_usize)]
    pub concurrency: usize,
}

impl WsDropParams {
    pub fn short() -> Self {
        Self {
            websockets: 200,
            sessions: 20,
            concurrency: 50,
        }
    }

    pub fn full() -> Self {
        Self {
            websockets: 10_000,
            sessions: 500,
            concurrency: 200,
        }
    }
}

/// "A few seconds" on top of window + sweep interval.
pub const FEW_SECONDS: Duration = Duration::from_secs(5);

/// Slower pings for many sockets: 10,000 sockets pinged every 500 ms would be 20,000 Redis
/// heartbeats a second on a laptop, which is not what this scenario measures.
pub fn timing() -> Timing {
    Timing {
        heartbeat_interval: Duration::from_secs(5),
        heartbeat_window: Duration::from_secs(15),
        ..Timing::default()
    }
}

/// Figures of a drop run.
#[derive(Debug, Clone)]
pub struct WsDropFigures {
    pub params: WsDropParams,
    pub open_time: Duration,
    pub bound: Duration,
    /// From the drop until every connection was in history.
    pub archived_after: Option<Duration>,
    pub archived: usize,
    pub closed: usize,
    pub expired: usize,
    pub lost: usize,
    pub unexpected_rows: usize,
    pub live_after: u64,
    pub exits: String,
    pub unclean_exits: usize,
}

impl WsDropFigures {
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        match self.archived_after {
            None => p.push(format!(
                "{} of {} never archived",
                self.lost, self.params.websockets
            )),
            Some(d) if d > self.bound => {
                p.push(format!("archived after {d:.2?} > {:?}", self.bound))
            }
            Some(_) => {}
        }
        if self.unexpected_rows > 0 {
            p.push(format!("{} unexpected rows", self.unexpected_rows));
        }
        if self.live_after > 0 {
            p.push(format!("{} connections still live", self.live_after));
        }
        if self.unclean_exits > 0 {
            p.push(format!("{} unclean exits", self.unclean_exits));
        }
        p
    }
}

impl_figures!(WsDropFigures);

impl fmt::Display for WsDropFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "ws-drop: {} WebSockets over {} sessions opened in {:.1?}, dropped at once",
            self.params.websockets, self.params.sessions, self.open_time
        )?;
        writeln!(
            f,
            "  archived {} ({} closed by the API, {} expired) after {}; bound {:?}; lost {}, \
             unexpected {}; live after: {}",
            self.archived,
            self.closed,
            self.expired,
            self.archived_after
                .map_or_else(|| "never".to_owned(), |d| format!("{d:.2?}")),
            self.bound,
            self.lost,
            self.unexpected_rows,
            self.live_after
        )?;
        writeln!(f, "  exits: {}", self.exits)?;
        write_result(f, &self.problems())
    }
}

/// Runs the drop scenario on a fresh harness. Sets [`timing`] unless the caller changed the
/// default.
pub async fn run(mut opts: HarnessOptions, params: WsDropParams) -> Result<WsDropFigures> {
    if opts.timing == Timing::default() {
        opts.timing = timing();
    }
    let mut h = Harness::start(opts).await?;
    let names: Vec<String> = (0..params.sessions.max(1))
        .map(|i| format!("drop-{i:05}"))
        .collect();
    for n in &names {
        h.create_session(n, None)?;
    }
    h.wait_mirrored(&names, Duration::from_secs(60)).await?;
    let client = h.client();
    let replicas = h.api_count();
    let stop = CancellationToken::new();
    let _stop_all = stop.clone().drop_guard();
    let opened_at = Instant::now();
    let held = sockets::open(
        &client,
        params.websockets,
        params.concurrency,
        &names,
        |i| i % replicas,
        &stop,
        OnStop::Drop,
    )
    .await?;
    let open_time = opened_at.elapsed();
    let ids: HashSet<Uuid> = held.iter().map(|s| s.connection_id).collect();

    let timing = h.timing();
    let bound = timing.heartbeat_window + timing.sweep_interval + FEW_SECONDS;
    let dropped_at = Instant::now();
    stop.cancel();
    for s in held {
        let _ = s.task.await;
    }
    let db = h.db()?;
    let give_up = bound + Duration::from_secs(30);
    let mut archived_after = None;
    let mut rows = Vec::new();
    while dropped_at.elapsed() < give_up {
        let n = usize::try_from(db.history_count().await.unwrap_or(0)).unwrap_or(0);
        if n >= ids.len() {
            archived_after = Some(dropped_at.elapsed());
            rows = db.history().await?;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if rows.is_empty() {
        rows = db.history().await?;
    }
    let found: HashSet<Uuid> = rows.iter().map(|r| r.connection_id).collect();
    let lost = ids.difference(&found).count();
    let unexpected_rows = found.difference(&ids).count();
    let live_after = live_connections(&h).await?;
    h.check_running()?;
    let figures = WsDropFigures {
        params,
        open_time,
        bound,
        archived_after: archived_after.filter(|_| lost == 0),
        archived: ids.len() - lost,
        closed: rows.iter().filter(|r| r.end_reason == "closed").count(),
        expired: rows.iter().filter(|r| r.end_reason == "expired").count(),
        lost,
        unexpected_rows,
        live_after,
        exits: String::new(),
        unclean_exits: 0,
    };
    conclude(h, "ws-drop", figures).await
}
