//! Randomized races: many session episodes over every API replica (HTTP and WebSocket,
//! heartbeats, closes, silent expiry, wakes, registrations aimed at the moment of
//! hibernation), then the checks of [`super::checks`]:
//! - no `hibernated` patch while a connection of the session was proven live;
//! - every registration answered `waking` (or made on a hibernated session) followed by
//!   exactly one `running` patch within a few seconds;
//! - history rows equal the connections ended: 0 lost, 0 doubled, the right `end_reason`.
//!
//! With `faults` above 0 the fake Kubernetes API server also misbehaves, seeded: that share
//! of the reaper's Session patches fail plainly, land but answer 500/504, or answer only
//! after longer than the reaper's Kubernetes timeout and the lease (landing before or after
//! the delay); now and then a Session is deleted and re-created under its name while
//! episodes run on it, and watches miss events for a moment, then end or expire. What landed
//! is then read from the fake's change log, not from the answers the reaper got.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use fake_kube::{ApplyAt, Fault, FaultRule, Injection, Operation};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::checks::{
    check_events, check_history, check_landings, landings_from_changes, some, EventFigures,
    HistoryFigures, Landing, SessionFigures,
};
use super::load::{self, Kind, LoadParams, Recorder, Registration, Target};
use super::{conclude, drain, live_connections, sessions, write_result};
use crate::harness::{Harness, HarnessOptions};
use crate::Result;

/// Size of a races run.
#[derive(Debug, Clone, Copy, PartialEq, clap::Args)]
pub struct RacesParams {
    #[arg(long, default_value_t = 10_000)]
    pub episodes: usize,
    #[arg(long, default_value_t = 200)]
    pub sessions: usize,
    #[arg(long, default_value_t = 96)]
    pub concurrency: usize,
    #[arg(skip)]
    pub seed: u64,
    /// Share of the reaper's Session patches the fake Kubernetes API server faults, and
    /// whether it re-creates Sessions and opens watch gaps (0: a well-behaved server).
    #[arg(long, default_value_t = 0.1)]
    pub faults: f64,
    /// Give the reapers a private NATS (JetStream) and check that every
    /// hibernation and wake that landed was published once.
    #[arg(long)]
    pub nats: bool,
}

impl RacesParams {
    /// The CI size: a few hundred episodes, well under two minutes on two cores.
    pub fn short(seed: u64) -> Self {
        Self {
            episodes: 300,
            sessions: 24,
            concurrency: 16,
            seed,
            faults: 0.1,
            nats: false,
        }
    }

    /// The full size: the figures of docs/reliability.md.
    pub fn full(seed: u64) -> Self {
        Self {
            episodes: 10_000,
            sessions: 200,
            concurrency: 96,
            seed,
            faults: 0.1,
            nats: false,
        }
    }
}

/// How long after its answer a registration that needs a wake may wait for the patch.
pub const WAKE_DEADLINE: Duration = Duration::from_secs(5);

/// The reapers' Kubernetes timeout under faults: shorter than the default so that a slow
/// answer outlasts it without stretching the run.
pub const FAULT_KUBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a slow Session patch waits: beyond [`FAULT_KUBE_TIMEOUT`] and the lease (3 s),
/// so the reaper gives up on it and may have lost its term before it lands.
pub const SLOW_PATCH: Duration = Duration::from_millis(3500);

/// The wake deadline under faults. A wake patch may be slow (its answer never comes; it
/// lands [`SLOW_PATCH`] after it was sent), and the reaper only learns that by timing out and
/// reading the Session again, which may itself be before the landing, so it patches again:
/// the deadline stretches by the delay and two timeouts.
pub fn fault_wake_deadline() -> Duration {
    WAKE_DEADLINE + SLOW_PATCH + 2 * FAULT_KUBE_TIMEOUT
}

/// The faults the fake injected, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultFigures {
    pub errors: usize,
    pub applied_500: usize,
    pub applied_504: usize,
    pub slow_applied_before: usize,
    pub slow_applied_after: usize,
    pub hangs: usize,
    pub recreated: usize,
    pub watch_gaps: usize,
    pub watch_events_dropped: usize,
    pub watches_ended: usize,
    pub watches_expired: usize,
}

impl FaultFigures {
    pub fn from_log(log: &[fake_kube::InjectedFault]) -> Self {
        let mut f = Self::default();
        for i in log {
            match &i.injection {
                Injection::Request { fault, .. } => match fault {
                    Fault::Error { .. } => f.errors += 1,
                    Fault::AppliedButError { status: 504 } => f.applied_504 += 1,
                    Fault::AppliedButError { .. } => f.applied_500 += 1,
                    Fault::Slow {
                        apply: ApplyAt::BeforeDelay,
                        ..
                    } => f.slow_applied_before += 1,
                    Fault::Slow {
                        apply: ApplyAt::AfterDelay,
                        ..
                    } => f.slow_applied_after += 1,
                    Fault::Hang => f.hangs += 1,
                },
                Injection::Recreated { .. } => f.recreated += 1,
                Injection::WatchGap { dropping: true, .. } => f.watch_gaps += 1,
                Injection::WatchEventDropped { .. } => f.watch_events_dropped += 1,
                Injection::WatchesEnded { expired: false, .. } => f.watches_ended += 1,
                Injection::WatchesEnded { expired: true, .. } => f.watches_expired += 1,
                _ => {}
            }
        }
        f
    }

    pub fn patch_faults(&self) -> usize {
        self.errors
            + self.applied_500
            + self.applied_504
            + self.slow_applied_before
            + self.slow_applied_after
            + self.hangs
    }
}

impl fmt::Display for FaultFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "  faults: {} Session patches (error {}, applied+500 {}, applied+504 {}, slow \
             applied before {}, slow applied after {}, hang {}); re-created {}; watch gaps {} \
             ({} events dropped), watches ended {}, expired {}",
            self.patch_faults(),
            self.errors,
            self.applied_500,
            self.applied_504,
            self.slow_applied_before,
            self.slow_applied_after,
            self.hangs,
            self.recreated,
            self.watch_gaps,
            self.watch_events_dropped,
            self.watches_ended,
            self.watches_expired
        )
    }
}

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
    pub faults: FaultFigures,
    pub live_after_drain: u64,
    pub events: Vec<(String, i64)>,
    /// With NATS: the published events against the landings.
    pub published: Option<EventFigures>,
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
        if let Some(e) = self.published.as_ref().filter(|e| e.violations() > 0) {
            p.push(format!("{} NATS event violations", e.violations()));
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

impl_figures!(RacesFigures);

impl fmt::Display for RacesFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.params;
        writeln!(
            f,
            "races: {} episodes on {} sessions, {} clients, seed {}; load {:.1?}, drain {:.1?}",
            p.episodes, p.sessions, p.concurrency, p.seed, self.load_time, self.drain_time
        )?;
        write!(f, "{}", self.load)?;
        write!(f, "{}", self.faults)?;
        write!(f, "{}", self.sessions)?;
        write!(f, "{}", self.history)?;
        writeln!(
            f,
            "  live connections after drain: {}",
            self.live_after_drain
        )?;
        writeln!(f, "  session_events: {:?}", self.events)?;
        if let Some(published) = &self.published {
            write!(f, "{published}")?;
        }
        writeln!(f, "  exits: {}", self.exits)?;
        write_result(f, &self.problems())
    }
}

/// Runs the races scenario on a fresh harness.
pub async fn run(mut opts: HarnessOptions, params: RacesParams) -> Result<RacesFigures> {
    let faulty = params.faults > 0.0;
    opts.nats |= params.nats;
    if faulty && opts.kube_timeout.is_none() {
        opts.kube_timeout = Some(FAULT_KUBE_TIMEOUT);
    }
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
    let chaos = CancellationToken::new();
    let chaos_task = faulty.then(|| {
        add_patch_faults(&h, params)?;
        Ok::<_, crate::Error>(tokio::spawn(disturb(
            h.fake().handle(),
            h.namespace().to_owned(),
            target.sessions.clone(),
            params.seed,
            chaos.clone(),
        )))
    });
    let chaos_task = chaos_task.transpose()?;
    let started = Instant::now();
    let recorder = load::run(target, load_params, CancellationToken::new()).await;
    let load_time = started.elapsed();
    chaos.cancel();
    if let Some(task) = chaos_task {
        let _ = task.await;
    }
    // The tail (drain, last wakes) runs on a well-behaved server: what happened during the
    // load must settle, not be disturbed forever.
    h.fake().clear_faults();
    h.fake().set_dropping_watch_events(false);
    h.check_running()?;
    let wake_deadline = if faulty {
        fault_wake_deadline()
    } else {
        WAKE_DEADLINE
    };
    let figures = finish(&h, &recorder, wake_deadline, params, load_time).await?;
    conclude(h, "races", figures).await
}

/// Seeded probability rules on this run's Session patches, one per kind of fault.
fn add_patch_faults(h: &Harness, params: RacesParams) -> Result<()> {
    let slow = |apply| Fault::Slow {
        delay: SLOW_PATCH,
        apply,
    };
    let faults = [
        Fault::Error { status: 500 },
        Fault::AppliedButError { status: 500 },
        Fault::AppliedButError { status: 504 },
        slow(ApplyAt::BeforeDelay),
        slow(ApplyAt::AfterDelay),
    ];
    // Rules are tried in order; each takes an equal share of the rate.
    let n = faults.len();
    for (i, fault) in faults.into_iter().enumerate() {
        let share = params.faults / n as f64;
        let p = share / (1.0 - share * i as f64);
        let target = fake_kube::Target::sessions(&[Operation::Patch]).in_namespace(h.namespace());
        let seed = params.seed.wrapping_add(0x5EED_0000 + i as u64);
        h.fake()
            .add_fault(FaultRule::probability(
                p.clamp(0.0, 1.0),
                seed,
                target,
                fault,
            ))
            .map_err(|e| crate::Error::Setup(format!("add a fault rule: {e}")))?;
    }
    Ok(())
}

/// Every couple of seconds (seeded) either re-creates a random Session under its name (with
/// its current spec: a hibernated one is born hibernated) while the episodes go on, or opens
/// a watch gap of a few hundred milliseconds and then ends the watches, cleanly or expired
/// (the reaper must re-list to see what it missed).
async fn disturb(
    fake: fake_kube::Handle,
    namespace: String,
    sessions: Arc<Vec<String>>,
    seed: u64,
    stop: CancellationToken,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xD157_0AB5);
    loop {
        let pause = Duration::from_millis(rng.random_range(1000..3000));
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = stop.cancelled() => return,
        }
        if rng.random_bool(0.5) && !sessions.is_empty() {
            let name = &sessions[rng.random_range(0..sessions.len())];
            if let Err(e) = fake.recreate_session(&namespace, name, None) {
                tracing::warn!("re-create {name}: {e}");
            }
        } else {
            fake.set_dropping_watch_events(true);
            let gap = Duration::from_millis(rng.random_range(200..1000));
            tokio::time::sleep(gap).await;
            fake.set_dropping_watch_events(false);
            if rng.random_bool(0.5) {
                fake.end_watches();
            } else {
                fake.expire_watches();
            }
        }
    }
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
    // What landed is read from the Sessions' own changes: an answer of 500/504 or none at
    // all says nothing about it, and a re-created Session starts a history of its own.
    let changes = h.session_changes();
    let landings = landings_from_changes(&changes);
    let wake_deadline = chrono::Duration::from_std(wake_deadline).unwrap_or_default();
    let sessions = check_landings(&regs, &patches, &landings, wake_deadline);
    let faults = FaultFigures::from_log(&h.fake().injected_faults());
    let published = if params.nats {
        Some(check_published(h, &landings).await?)
    } else {
        None
    };
    let rows = h.db()?.history().await?;
    let history = check_history(&regs, &rows);
    let events = h.db()?.event_counts().await.unwrap_or_default();
    if sessions.violations() > 0 || history.violations() > 0 {
        // What the checks saw, for a post-mortem next to the process logs.
        h.save_json("registrations.json", &regs)?;
        h.save_json("patches.json", &patches)?;
        h.save_json("session_changes.json", &changes)?;
        h.save_json("injected_faults.json", &h.fake().injected_faults())?;
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
        faults,
        live_after_drain,
        events,
        published,
        exits: String::new(),
        unclean_exits: 0,
    })
}

/// How long a landing may take to be announced. The watch shows one at once;
/// one found by a read again after a lost answer may take up to 47 s.
const ANNOUNCE_DEADLINE: Duration = Duration::from_secs(60);

/// Checks the NATS stream against the landings: none of `landed` (read
/// before) unannounced once the deadline passed, and no more events than
/// landings, counted after the events were read (sessions go on idling and
/// hibernating meanwhile: an event only ever follows its landing).
async fn check_published(h: &Harness, landed: &[Landing]) -> Result<EventFigures> {
    let deadline = Instant::now() + ANNOUNCE_DEADLINE;
    let events = loop {
        h.wait_events_published(ANNOUNCE_DEADLINE).await?;
        let events = h.published_events().await?;
        if check_events(landed, &events).missing.is_empty() || Instant::now() >= deadline {
            break events;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let landed_since = landings_from_changes(&h.session_changes());
    let mut figures = check_events(landed, &events);
    let after = check_events(&landed_since, &events);
    figures.doubled = after.doubled;
    figures.out_of_order = after.out_of_order;
    Ok(figures)
}
