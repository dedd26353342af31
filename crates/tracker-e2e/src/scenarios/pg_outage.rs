//! PostgreSQL unreachable under load: the reapers reach PostgreSQL through a [`crate::proxy`]
//! that is cut for the outage (open connections dropped, new ones refused). Clients must not
//! notice; nothing may be lost; the backlog must drain once PostgreSQL is back.

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use super::load::BackgroundLoad;
use super::races::{finish, RacesFigures, RacesParams, WAKE_DEADLINE};
use super::{conclude, sessions};
use crate::harness::{Harness, HarnessOptions};
use crate::{metrics, poll, Error, Result};

/// Size of an outage run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct PgOutageParams {
    /// Outage length (humantime, e.g. 60s).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub outage: Duration,
    #[arg(long, default_value_t = 100)]
    pub sessions: usize,
    #[arg(long, default_value_t = 48)]
    pub concurrency: usize,
    #[arg(skip)]
    pub seed: u64,
}

impl PgOutageParams {
    pub fn short(seed: u64) -> Self {
        Self {
            outage: Duration::from_secs(5),
            sessions: 16,
            concurrency: 10,
            seed,
        }
    }

    pub fn full(seed: u64) -> Self {
        Self {
            outage: Duration::from_secs(60),
            sessions: 100,
            concurrency: 48,
            seed,
        }
    }
}

/// The reaper's backlog gauge (its name is not fixed by docs/api.md: read if present).
pub const BACKLOG: &str = "tracker_reaper_archive_backlog_rows";

/// Figures of an outage run.
#[derive(Debug, Clone)]
pub struct PgOutageFigures {
    pub params: PgOutageParams,
    pub rows_before_cut: usize,
    /// Rows that still appeared during the cut (a commit in flight at the cut; 0 expected).
    pub rows_during_cut: usize,
    /// Highest backlog the leader reported during the cut (`None`: no such gauge).
    pub peak_backlog: Option<f64>,
    pub run: RacesFigures,
}

impl PgOutageFigures {
    pub fn problems(&self) -> Vec<String> {
        self.run.problems()
    }
}

impl_figures!(PgOutageFigures => run);

impl fmt::Display for PgOutageFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "pg-outage: PostgreSQL cut off from the reapers for {:?}; {} rows before, {} during \
             the cut; peak backlog {}; drain after restore {:.1?}",
            self.params.outage,
            self.rows_before_cut,
            self.rows_during_cut,
            self.peak_backlog
                .map_or_else(|| "n/a".to_owned(), |b| format!("{b}")),
            self.run.drain_time
        )?;
        write!(f, "{}", self.run)
    }
}

/// Runs the outage scenario on a fresh harness (its reapers reach PostgreSQL via a proxy).
pub async fn run(mut opts: HarnessOptions, params: PgOutageParams) -> Result<PgOutageFigures> {
    opts.reaper_database_via_proxy = true;
    let mut h = Harness::start(opts).await?;
    let names = sessions(&h, params.sessions).await?;
    let load = BackgroundLoad::start(&h, names, params.concurrency, params.seed);
    let recorder = load.recorder.clone();
    // Archiving must work through the proxy before it is cut.
    let db = h.db()?;
    let rows_before_cut = poll::until(
        Duration::from_secs(30),
        Duration::from_millis(100),
        "history rows before the cut",
        || async {
            let n = db.history_count().await.unwrap_or(0);
            Ok((n >= 20).then_some(n))
        },
    )
    .await?;
    let proxy = h
        .proxy()
        .ok_or_else(|| Error::Setup("the harness has no PostgreSQL proxy".into()))?;
    proxy.set_enabled(false);
    let cut_at = Instant::now();
    let mut peak: Option<f64> = None;
    while cut_at.elapsed() < params.outage {
        for i in 0..h.reaper_count() {
            if let Some(text) = h.reaper_metrics(i).await {
                if let Some(b) = metrics::value(&text, BACKLOG) {
                    peak = Some(peak.map_or(b, |p: f64| p.max(b)));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let rows_end_of_cut = db.history_count().await?;
    proxy.set_enabled(true);
    let load_time = load.stop().await?;
    h.check_running()?;
    let races_params = RacesParams {
        episodes: recorder.registered(),
        sessions: params.sessions,
        concurrency: params.concurrency,
        seed: params.seed,
        faults: 0.0,
        nats: false,
    };
    let run = finish(&h, &recorder, WAKE_DEADLINE, races_params, load_time).await?;
    let figures = PgOutageFigures {
        params,
        rows_before_cut: usize::try_from(rows_before_cut).unwrap_or(0),
        rows_during_cut: usize::try_from(rows_end_of_cut - rows_before_cut).unwrap_or(0),
        peak_backlog: peak,
        run,
    };
    conclude(h, "pg-outage", figures).await
}
