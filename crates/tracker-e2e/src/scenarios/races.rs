//! Randomized races: many session episodes over every API replica (HTTP and WebSocket,
//! heartbeats, closes, silent expiry, wakes, registrations aimed at the moment of
//! hibernation), then the checks of [`super::checks`]:
//! - no `hibernated` patch while a connection of the session was proven live;
//! - every registration answered `waking` (or made on a hibernated session) followed by
//!   exactly one `running` patch within a few seconds;
//! - history rows equal the connections ended: 0 lost, 0 doubled, the right `end_reason`.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::checks::{check_history, check_sessions, some, HistoryFigures, SessionFigures};
use super::load::{self, Kind, LoadParams, Recorder, Registration, Target};
use super::{drain, exits_line, live_connections, sessions, verdict, write_result};
use crate::harness::{Harness, HarnessOptions};
use crate::Result;

/// Size of a races run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RacesParams {
    pub episodes: usize,
    pub sessions: usize,
    pub concurrency: usize,
    pub seed: u64,
}

impl RacesParams {
    /// The CI size: a few hundred episodes, well under two minutes on two cores.
    pub fn short(seed: u64) -> Self {
        Self {
            episodes: 300,
            sessions: 24,
            concurrency: 16,
            seed,
        }
    }

    /// The full size: the figures of docs/reliability.md.
    pub fn full(seed: u64) -> Self {
        Self {
            episodes: 10_000,
            sessions: 200,
            concurrency: 96,
            seed,
        }
    }
}

/// How long after its answer a registration that needs a wake may wait for the patch.
pub const WAKE_DEADLINE: Duration = Duration::from_secs(5);

/// What the clients did and saw, from the [`Recorder`]'s counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadFigures {
    pub episodes_by_kind: Vec<(&'static str, u64)>,
    pub registrations_http: usize,
    pub registrations_ws: usize,
    pub registrations_refused: u64,
    pub registrations_unanswered: u64,
    pub heartbeats_ok: u64,
    pub heartbeats_refused: u64,
    pub heartbeats_failed: u64,
    pub closes_ok: u64,
    pub closes_not_found: u64,
    pub closes_failed: u64,
    pub ws_ended_by_server: u64,
    pub ws_pings: u64,
    pub ws_session_pushes: u64,
    pub wake_waits_timed_out: u64,
    pub first_errors: Vec<String>,
}

impl LoadFigures {
    pub fn from_recorder(rec: &Recorder, regs: &[Registration]) -> Self {
        let c = &rec.counters;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Self {
            episodes_by_kind: Kind::ALL
                .iter()
                .map(|k| (k.as_str(), rec.episodes(*k)))
                .collect(),
            registrations_http: regs
                .iter()
                .filter(|r| !r.websocket && r.connection_id.is_some())
                .count(),
            registrations_ws: regs
                .iter()
                .filter(|r| r.websocket && r.connection_id.is_some())
                .count(),
            registrations_refused: get(&c.registrations_refused),
            registrations_unanswered: get(&c.registrations_unanswered),
            heartbeats_ok: get(&c.heartbeats_ok),
            heartbeats_refused: get(&c.heartbeats_refused),
            heartbeats_failed: get(&c.heartbeats_failed),
            closes_ok: get(&c.closes_ok),
            closes_not_found: get(&c.closes_not_found),
            closes_failed: get(&c.closes_failed),
            ws_ended_by_server: get(&c.ws_ended_by_server),
            ws_pings: get(&c.ws_pings),
            ws_session_pushes: get(&c.ws_session_pushes),
            wake_waits_timed_out: get(&c.wake_waits_timed_out),
            first_errors: rec.errors(),
        }
    }

    /// Client-visible failures; none is expected when no fault is injected.
    pub fn failures(&self) -> u64 {
        self.registrations_refused
            + self.registrations_unanswered
            + self.heartbeats_refused
            + self.heartbeats_failed
            + self.closes_not_found
            + self.closes_failed
            + self.ws_ended_by_server
    }

    pub fn episodes(&self) -> u64 {
        self.episodes_by_kind.iter().map(|(_, n)| n).sum()
    }
}

impl fmt::Display for LoadFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kinds: Vec<String> = self
            .episodes_by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        writeln!(f, "  episodes: {} ({})", self.episodes(), kinds.join(", "))?;
        writeln!(
            f,
            "  registrations: {} HTTP + {} WebSocket; refused {}, unanswered {}",
            self.registrations_http,
            self.registrations_ws,
            self.registrations_refused,
            self.registrations_unanswered
        )?;
        writeln!(
            f,
            "  heartbeats: {} ok, {} refused (404 while live), {} failed; closes: {} ok, \
             {} not found, {} failed",
            self.heartbeats_ok,
            self.heartbeats_refused,
            self.heartbeats_failed,
            self.closes_ok,
            self.closes_not_found,
            self.closes_failed
        )?;
        writeln!(
            f,
            "  websockets: {} pings answered, {} session pushes, {} ended by the server; \
             wake waits timed out: {}",
            self.ws_pings,
            self.ws_session_pushes,
            self.ws_ended_by_server,
            self.wake_waits_timed_out
        )?;
        if !self.first_errors.is_empty() {
            writeln!(f, "  first client errors:{}", some(&self.first_errors, 10))?;
        }
        Ok(())
    }
}

/// Figures of a races run.
#[derive(Debug, Clone)]
pub struct RacesFigures {
    pub params: RacesParams,
    pub load_time: Duration,
    pub drain_time: Duration,
    pub load: LoadFigures,
    pub sessions: SessionFigures,
    pub history: HistoryFigures,
    pub live_after_drain: u64,
    pub events: Vec<(String, i64)>,
    pub exits: String,
    pub unclean_exits: usize,
}

impl RacesFigures {
    /// Every broken promise, in words.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.sessions.violations() > 0 {
            p.push(format!(
                "{} session invariant violations",
                self.sessions.violations()
            ));
        }
        if self.history.violations() > 0 {
            p.push(format!("{} history violations", self.history.violations()));
        }
        if self.load.failures() > 0 {
            p.push(format!("{} client-visible failures", self.load.failures()));
        }
        if self.live_after_drain > 0 {
            p.push(format!(
                "{} connections still live after every client ended",
                self.live_after_drain
            ));
        }
        if self.unclean_exits > 0 {
            p.push(format!(
                "{} processes did not stop cleanly on SIGTERM",
                self.unclean_exits
            ));
        }
        if self.params.episodes >= 100
            && (self.sessions.hibernations == 0 || self.sessions.wakes == 0)
        {
            p.push("no hibernation or no wake happened: the run proved nothing".into());
        }
        p
    }
}

impl fmt::Display for RacesFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.params;
        writeln!(
            f,
            "races: {} episodes on {} sessions, {} clients, seed {}; load {:.1?}, drain {:.1?}",
            p.episodes, p.sessions, p.concurrency, p.seed, self.load_time, self.drain_time
        )?;
        write!(f, "{}", self.load)?;
        write!(f, "{}", self.sessions)?;
        write!(f, "{}", self.history)?;
        writeln!(
            f,
            "  live connections after drain: {}",
            self.live_after_drain
        )?;
        writeln!(f, "  session_events: {:?}", self.events)?;
        writeln!(f, "  exits: {}", self.exits)?;
        write_result(f, &self.problems())
    }
}

/// Runs the races scenario on a fresh harness.
pub async fn run(opts: HarnessOptions, params: RacesParams) -> Result<RacesFigures> {
    let mut h = Harness::start(opts).await?;
    let names = sessions(&h, params.sessions).await?;
    let timing = h.timing();
    let target = Target {
        client: h.client(),
        fake: h.fake().handle(),
        namespace: h.namespace().to_owned(),
        sessions: names,
        timing,
    };
    let load_params = LoadParams {
        episodes: params.episodes,
        concurrency: params.concurrency,
        seed: params.seed,
        wake_wait: Duration::from_secs(2) + timing.heartbeat_window + Duration::from_secs(4),
    };
    let started = Instant::now();
    let recorder = load::run(target, load_params, CancellationToken::new()).await;
    let load_time = started.elapsed();
    h.check_running()?;
    let mut figures = finish(&h, &recorder, WAKE_DEADLINE, params, load_time).await?;
    let run_dir = h.run_dir().to_owned();
    if !figures.problems().is_empty() {
        h.keep_run_dir();
    }
    let exits = h.shutdown().await?;
    figures.exits = exits_line(&exits);
    figures.unclean_exits = exits.iter().filter(|e| !e.clean).count();
    let problems = figures.problems();
    verdict("races", figures, &problems, run_dir)
}

/// After the load: wait for the wake deadline of the last registrations and for the archive
/// to drain, then check everything. Shared with the fault scenarios.
pub(crate) async fn finish(
    h: &Harness,
    recorder: &Arc<Recorder>,
    wake_deadline: Duration,
    params: RacesParams,
    load_time: Duration,
) -> Result<RacesFigures> {
    let regs = recorder.registrations();
    let expected = regs.iter().filter(|r| r.connection_id.is_some()).count();
    let timing = h.timing();
    let (_, drain_time) =
        drain(h, expected, timing.expiry_bound() + Duration::from_secs(30)).await?;
    // The wakes of the last registrations may land up to the deadline after their answer.
    if let Some(last) = regs.iter().map(|r| r.answered_at).max() {
        let until = last + chrono::Duration::from_std(wake_deadline).unwrap_or_default();
        if let Ok(wait) = (until - chrono::Utc::now()).to_std() {
            tokio::time::sleep(wait).await;
        }
    }
    let live_after_drain = live_connections(h).await?;
    let patches = h.state_patches();
    let wake_deadline = chrono::Duration::from_std(wake_deadline).unwrap_or_default();
    let sessions = check_sessions(&regs, &patches, wake_deadline);
    let rows = h.db()?.history().await?;
    let history = check_history(&regs, &rows);
    let events = h.db()?.event_counts().await.unwrap_or_default();
    if sessions.violations() > 0 || history.violations() > 0 {
        // What the checks saw, for a post-mortem next to the process logs.
        h.save_json("registrations.json", &regs)?;
        h.save_json("patches.json", &patches)?;
        let rows: Vec<(String, String, String)> = rows
            .iter()
            .map(|r| {
                (
                    r.connection_id.to_string(),
                    r.session_id.clone(),
                    r.end_reason.clone(),
                )
            })
            .collect();
        h.save_json("history.json", &rows)?;
    }
    Ok(RacesFigures {
        params,
        load_time,
        drain_time,
        load: LoadFigures::from_recorder(recorder, &regs),
        sessions,
        history,
        live_after_drain,
        events,
        exits: String::new(),
        unclean_exits: 0,
    })
}
