//! The episode engine: concurrent clients playing randomized session episodes against every
//! API replica, recording what each one observed, with times, for the checks in
//! [`super::checks`].
//!
//! An episode is one client's story on one session:
//! - `http_close`: register over HTTP, heartbeat a few times (on any replica), close;
//! - `http_silent`: register, heartbeat a few times, then go silent until it expires;
//! - `ws`: open a tracked WebSocket, hold it (answering pings), close it;
//! - `wake`: wait until the session is hibernated, then register (HTTP or WebSocket): the
//!   registration must wake it;
//! - `race_wake`: register at about the moment the session becomes due for hibernation, so
//!   that registrations land before, during and after the hibernation in flight.
//!
//! Each registration records a *definitely-live interval*: from when its answer arrived to
//! the latest moment the client can prove it was still live (the close request, or the last
//! proven heartbeat plus the window). A hibernation patch inside such an interval is a bug.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::client::ApiClient;
use crate::settings::Timing;

/// What an episode does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    HttpClose,
    HttpSilent,
    Ws,
    Wake,
    RaceWake,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::HttpClose,
        Kind::HttpSilent,
        Kind::Ws,
        Kind::Wake,
        Kind::RaceWake,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::HttpClose => "http_close",
            Kind::HttpSilent => "http_silent",
            Kind::Ws => "ws",
            Kind::Wake => "wake",
            Kind::RaceWake => "race_wake",
        }
    }

    /// Relative weights of the kinds in the mix.
    fn weight(self) -> u32 {
        match self {
            Kind::HttpClose => 30,
            Kind::HttpSilent => 15,
            Kind::Ws => 25,
            Kind::Wake => 15,
            Kind::RaceWake => 15,
        }
    }
}

/// How a connection ended, as far as the client knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    /// The client closed it and the API confirmed (204, or the WebSocket close).
    Closed,
    /// The client went silent: it must expire.
    Expired,
    /// Something unexpected (a 404 on close, a socket the server ended): either reason.
    Either,
}

impl Ending {
    /// Whether `end_reason` in history fits.
    pub fn accepts(self, end_reason: &str) -> bool {
        match self {
            Ending::Closed => end_reason == "closed",
            Ending::Expired => end_reason == "expired",
            Ending::Either => end_reason == "closed" || end_reason == "expired",
        }
    }
}

/// One registration, as the client saw it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Registration {
    pub kind: Kind,
    pub session: String,
    pub replica: usize,
    pub websocket: bool,
    pub sent_at: DateTime<Utc>,
    pub answered_at: DateTime<Utc>,
    /// `None` if the outcome is unknown (no answer): it may or may not exist.
    pub connection_id: Option<Uuid>,
    /// `session.state` in the answer.
    pub state: String,
    /// For `wake` episodes: when the client saw the Session `hibernated` in Kubernetes.
    pub seen_hibernated_at: Option<DateTime<Utc>>,
    /// The end of the definitely-live interval (starting at `answered_at`).
    pub live_until: DateTime<Utc>,
    pub ending: Ending,
}

impl Registration {
    /// Whether this registration must be followed by a wake patch.
    pub fn needs_wake(&self) -> bool {
        matches!(self.state.as_str(), "waking" | "hibernating" | "hibernated")
    }
}

/// Counters of what the clients did and saw.
#[derive(Debug, Default)]
pub struct Counters {
    pub episodes: [AtomicU64; 5],
    pub registrations_refused: AtomicU64,
    pub registrations_unanswered: AtomicU64,
    pub heartbeats_ok: AtomicU64,
    pub heartbeats_refused: AtomicU64,
    pub heartbeats_failed: AtomicU64,
    pub closes_ok: AtomicU64,
    pub closes_not_found: AtomicU64,
    pub closes_failed: AtomicU64,
    pub ws_ended_by_server: AtomicU64,
    pub ws_pings: AtomicU64,
    pub ws_session_pushes: AtomicU64,
    pub wake_waits_timed_out: AtomicU64,
}

/// Everything the clients recorded.
#[derive(Debug, Default)]
pub struct Recorder {
    registrations: Mutex<Vec<Registration>>,
    pub counters: Counters,
    errors: Mutex<Vec<String>>,
}

/// At most this many error texts are kept (the count is in the counters).
const MAX_ERRORS: usize = 20;

impl Recorder {
    fn push(&self, r: Registration) {
        self.registrations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(r);
    }

    fn error(&self, e: String) {
        let mut errors = self.errors.lock().unwrap_or_else(PoisonError::into_inner);
        if errors.len() < MAX_ERRORS {
            errors.push(e);
        }
    }

    pub fn registrations(&self) -> Vec<Registration> {
        self.registrations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn errors(&self) -> Vec<String> {
        self.errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Registrations recorded so far.
    pub fn registered(&self) -> usize {
        self.registrations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn episodes(&self, kind: Kind) -> u64 {
        self.counters.episodes[kind as usize].load(Ordering::Relaxed)
    }
}

fn add(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// What the load runs against.
#[derive(Debug, Clone)]
pub struct Target {
    pub client: ApiClient,
    pub fake: fake_kube::Handle,
    pub namespace: String,
    pub sessions: Arc<Vec<String>>,
    pub timing: Timing,
}

/// How much load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadParams {
    /// Episodes started at most (the load also stops when its token is cancelled).
    pub episodes: usize,
    /// Concurrent clients.
    pub concurrency: usize,
    pub seed: u64,
    /// Longest wait of a `wake` episode for its session to be hibernated.
    pub wake_wait: Duration,
}

/// Runs episodes until `params.episodes` have started or `stop` is cancelled, then waits for
/// the running ones to finish (each is bounded).
pub async fn run(target: Target, params: LoadParams, stop: CancellationToken) -> Arc<Recorder> {
    let recorder = Arc::new(Recorder::default());
    run_into(target, params, stop, recorder.clone()).await;
    recorder
}

/// [`run`] into a recorder the caller holds, so it can watch the load while it runs.
pub async fn run_into(
    target: Target,
    params: LoadParams,
    stop: CancellationToken,
    recorder: Arc<Recorder>,
) {
    let started = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..params.concurrency.max(1) {
        let (target, recorder, started, stop) = (
            target.clone(),
            recorder.clone(),
            started.clone(),
            stop.clone(),
        );
        let seed = params
            .seed
            .wrapping_add((w as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        workers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed);
            while !stop.is_cancelled() && started.fetch_add(1, Ordering::SeqCst) < params.episodes {
                let kind = pick_kind(&mut rng);
                add(&recorder.counters.episodes[kind as usize]);
                episode(&target, &recorder, &mut rng, kind, params, &stop).await;
            }
        }));
    }
    for w in workers {
        if let Err(e) = w.await {
            recorder.error(format!("a load worker panicked: {e}"));
        }
    }
}

fn pick_kind(rng: &mut StdRng) -> Kind {
    let total: u32 = Kind::ALL.iter().map(|k| k.weight()).sum();
    let mut n = rng.random_range(0..total);
    for k in Kind::ALL {
        if n < k.weight() {
            return k;
        }
        n -= k.weight();
    }
    Kind::HttpClose
}

fn ms(rng: &mut StdRng, lo: u64, hi: u64) -> Duration {
    Duration::from_millis(rng.random_range(lo..=hi))
}

fn chrono_of(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

async fn episode(
    t: &Target,
    rec: &Recorder,
    rng: &mut StdRng,
    kind: Kind,
    params: LoadParams,
    stop: &CancellationToken,
) {
    let session = t.sessions[rng.random_range(0..t.sessions.len())].clone();
    match kind {
        Kind::HttpClose => {
            let beats = rng.random_range(0..=3);
            http_connection(t, rec, rng, kind, &session, beats, true, None).await;
        }
        Kind::HttpSilent => {
            let beats = rng.random_range(0..=2);
            http_connection(t, rec, rng, kind, &session, beats, false, None).await;
        }
        Kind::Ws => {
            let hold = ms(rng, 200, 3000);
            ws_connection(t, rec, rng, kind, &session, hold, None).await;
        }
        Kind::Wake => {
            // Prefer a session that is hibernated right now; else wait for this one.
            let hibernated: Vec<String> = t
                .fake
                .sessions(&t.namespace)
                .iter()
                .filter(|s| s.pointer("/spec/state").and_then(Value::as_str) == Some("hibernated"))
                .filter_map(|s| s.pointer("/metadata/name").and_then(Value::as_str))
                .filter(|n| t.sessions.iter().any(|s| s == n))
                .map(str::to_owned)
                .collect();
            let session = if hibernated.is_empty() {
                session
            } else {
                hibernated[rng.random_range(0..hibernated.len())].clone()
            };
            let seen = wait_hibernated(t, &session, params.wake_wait, stop).await;
            if seen.is_none() {
                add(&rec.counters.wake_waits_timed_out);
            }
            if rng.random_bool(0.5) {
                let beats = rng.random_range(0..=1);
                http_connection(t, rec, rng, kind, &session, beats, true, seen).await;
            } else {
                let hold = ms(rng, 100, 1000);
                ws_connection(t, rec, rng, kind, &session, hold, seen).await;
            }
        }
        Kind::RaceWake => {
            // Aim at the session's due time, give or take the hibernation check period.
            let replica = rng.random_range(0..t.client.replicas());
            let due = match t.client.session(replica, &session).await {
                Ok(a) if a.status == 200 => a
                    .body
                    .get("hibernates_at")
                    .and_then(Value::as_str)
                    .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                    .map(|d| d.with_timezone(&Utc)),
                _ => None,
            };
            if let Some(due) = due {
                let at = match last_hibernation(t) {
                    // Half the time, aim at the hibernator's tick itself: its claim, read and
                    // patch take milliseconds, and a registration landing in between is the
                    // race that matters most.
                    Some(last) if rng.random_bool(0.5) => {
                        next_tick(last, due)
                            + chrono::Duration::milliseconds(rng.random_range(-20..=30))
                    }
                    _ => due + chrono::Duration::milliseconds(rng.random_range(-300..=1300)),
                };
                if let Ok(wait) = (at - Utc::now()).to_std() {
                    let wait = wait.min(Duration::from_secs(6));
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = stop.cancelled() => {}
                    }
                }
            }
            if rng.random_bool(0.5) {
                let beats = rng.random_range(0..=1);
                let close = rng.random_bool(0.7);
                http_connection(t, rec, rng, kind, &session, beats, close, None).await;
            } else {
                let hold = ms(rng, 100, 1000);
                ws_connection(t, rec, rng, kind, &session, hold, None).await;
            }
        }
    }
}

/// The reaper's hibernation check period (its default `TRACKER_HIBERNATE_INTERVAL`, a fixed
/// ticker). Only used to aim registrations; a wrong value makes the aim worse, not the checks.
const HIBERNATE_TICK: chrono::Duration = chrono::Duration::seconds(1);

/// When the latest landed `hibernated` patch of this run arrived: a phase of the ticker.
fn last_hibernation(t: &Target) -> Option<DateTime<Utc>> {
    t.fake
        .requests()
        .iter()
        .rev()
        .filter(|r| r.verb == fake_kube::Verb::Patch && r.namespace == t.namespace)
        .filter(|r| (200..300).contains(&r.status))
        .find(|r| r.body.pointer("/spec/state").and_then(Value::as_str) == Some("hibernated"))
        .map(|r| r.received_at)
}

/// The first tick at or after `due`, for a ticker that ticked at `phase`.
fn next_tick(phase: DateTime<Utc>, due: DateTime<Utc>) -> DateTime<Utc> {
    let tick = HIBERNATE_TICK.num_milliseconds().max(1);
    let behind = (due - phase).num_milliseconds();
    let k = if behind <= 0 {
        0
    } else {
        (behind + tick - 1) / tick
    };
    phase + chrono::Duration::milliseconds(k * tick)
}

/// Polls the Session in the fake until it is `hibernated`; answers when it was seen so.
async fn wait_hibernated(
    t: &Target,
    session: &str,
    timeout: Duration,
    stop: &CancellationToken,
) -> Option<DateTime<Utc>> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let state = t.fake.session(&t.namespace, session).and_then(|s| {
            s.pointer("/spec/state")
                .and_then(Value::as_str)
                .map(str::to_owned)
        });
        if state.as_deref() == Some("hibernated") {
            return Some(Utc::now());
        }
        if tokio::time::Instant::now() >= deadline || stop.is_cancelled() {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn http_connection(
    t: &Target,
    rec: &Recorder,
    rng: &mut StdRng,
    kind: Kind,
    session: &str,
    heartbeats: u32,
    close: bool,
    seen_hibernated_at: Option<DateTime<Utc>>,
) {
    let replicas = t.client.replicas();
    let replica = rng.random_range(0..replicas);
    let user = format!("user-{}", rng.random_range(0..8));
    let sent_at = Utc::now();
    let answer = match t.client.register(replica, session, "http", &user).await {
        Ok(a) => a,
        Err(e) => {
            add(&rec.counters.registrations_unanswered);
            rec.error(format!("register on {session}: {e}"));
            rec.push(Registration {
                kind,
                session: session.to_owned(),
                replica,
                websocket: false,
                sent_at,
                answered_at: Utc::now(),
                connection_id: None,
                state: String::new(),
                seen_hibernated_at,
                live_until: sent_at,
                ending: Ending::Either,
            });
            return;
        }
    };
    let Some(cid) = answer.connection_id().filter(|_| answer.status == 201) else {
        add(&rec.counters.registrations_refused);
        rec.error(format!(
            "register on {session}: {} {}",
            answer.status, answer.body
        ));
        return;
    };
    let window = chrono_of(t.timing.heartbeat_window);
    // The score is Redis time when the script ran, which is after the request was sent.
    let mut proven = answer.sent_at;
    let mut ending = if close {
        Ending::Closed
    } else {
        Ending::Expired
    };
    let mut alive = true;
    for _ in 0..heartbeats {
        tokio::time::sleep(t.timing.heartbeat_interval).await;
        let r = rng.random_range(0..replicas);
        match t.client.heartbeat(r, session, cid).await {
            Ok(a) if a.status == 200 => {
                add(&rec.counters.heartbeats_ok);
                proven = a.sent_at;
            }
            Ok(a) if a.status == 404 => {
                // It expired although every heartbeat came within the window.
                add(&rec.counters.heartbeats_refused);
                rec.error(format!("heartbeat on {session}/{cid}: 404 {}", a.body));
                ending = Ending::Either;
                alive = false;
                break;
            }
            Ok(a) => {
                add(&rec.counters.heartbeats_failed);
                rec.error(format!(
                    "heartbeat on {session}/{cid}: {} {}",
                    a.status, a.body
                ));
            }
            Err(e) => {
                add(&rec.counters.heartbeats_failed);
                rec.error(format!("heartbeat on {session}/{cid}: {e}"));
            }
        }
    }
    let mut live_until = proven + window;
    if close && alive {
        tokio::time::sleep(ms(rng, 0, t.timing.heartbeat_interval.as_millis() as u64)).await;
        let r = rng.random_range(0..replicas);
        match t.client.close(r, session, cid).await {
            Ok(a) if a.status == 204 => {
                add(&rec.counters.closes_ok);
                live_until = live_until.min(a.sent_at);
            }
            Ok(a) if a.status == 404 => {
                add(&rec.counters.closes_not_found);
                rec.error(format!("close {session}/{cid}: 404 {}", a.body));
                ending = Ending::Either;
            }
            Ok(a) => {
                add(&rec.counters.closes_failed);
                rec.error(format!("close {session}/{cid}: {} {}", a.status, a.body));
                ending = Ending::Either;
                live_until = live_until.min(a.sent_at);
            }
            Err(e) => {
                add(&rec.counters.closes_failed);
                rec.error(format!("close {session}/{cid}: {e}"));
                ending = Ending::Either;
            }
        }
    }
    rec.push(Registration {
        kind,
        session: session.to_owned(),
        replica,
        websocket: false,
        sent_at: answer.sent_at,
        answered_at: answer.answered_at,
        connection_id: Some(cid),
        state: answer.session_state().unwrap_or_default().to_owned(),
        seen_hibernated_at,
        live_until,
        ending,
    });
}

async fn ws_connection(
    t: &Target,
    rec: &Recorder,
    rng: &mut StdRng,
    kind: Kind,
    session: &str,
    hold: Duration,
    seen_hibernated_at: Option<DateTime<Utc>>,
) {
    let replica = rng.random_range(0..t.client.replicas());
    let in_query = rng.random_bool(0.5);
    let sent_at = Utc::now();
    let mut ws = match t.client.websocket(replica, session, in_query).await {
        Ok(ws) => ws,
        Err(e) => {
            // A refusal before the upgrade registers nothing; a failure after it may have.
            let refused = matches!(e, crate::Error::Protocol(_));
            if refused {
                add(&rec.counters.registrations_refused);
            } else {
                add(&rec.counters.registrations_unanswered);
                rec.push(Registration {
                    kind,
                    session: session.to_owned(),
                    replica,
                    websocket: true,
                    sent_at,
                    answered_at: Utc::now(),
                    connection_id: None,
                    state: String::new(),
                    seen_hibernated_at,
                    live_until: sent_at,
                    ending: Ending::Either,
                });
            }
            rec.error(format!("websocket on {session}: {e}"));
            return;
        }
    };
    let window = chrono_of(t.timing.heartbeat_window);
    let mut prev_ping = ws.sent_at;
    let mut last_ping = ws.sent_at;
    let mut pings = 0;
    let mut open = true;
    // Hold in slices to keep the ping before the last one: its pong surely went out.
    let deadline = tokio::time::Instant::now() + hold;
    while open && tokio::time::Instant::now() < deadline {
        let slice = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .min(Duration::from_millis(100));
        match ws.hold(slice).await {
            Ok(still) => open = still,
            Err(e) => {
                rec.error(format!("websocket on {session}: {e}"));
                open = false;
            }
        }
        if ws.pings != pings {
            pings = ws.pings;
            prev_ping = last_ping;
            last_ping = ws.last_ping_at;
        }
    }
    add_n(&rec.counters.ws_pings, ws.pings);
    add_n(&rec.counters.ws_session_pushes, ws.session_pushes);
    let proven = prev_ping.max(ws.sent_at);
    let (answered_at, connection_id, state) =
        (ws.registered_at, ws.connection_id, ws.session_state.clone());
    let (live_until, ending) = if open {
        let closed_at = ws.close().await;
        ((proven + window).min(closed_at), Ending::Closed)
    } else {
        add(&rec.counters.ws_ended_by_server);
        rec.error(format!(
            "websocket {session}/{}: ended by the server ({:?})",
            ws.connection_id, ws.server_close
        ));
        (proven + window, Ending::Either)
    };
    rec.push(Registration {
        kind,
        session: session.to_owned(),
        replica,
        websocket: true,
        sent_at,
        answered_at,
        connection_id: Some(connection_id),
        state,
        seen_hibernated_at,
        live_until,
        ending,
    });
}

fn add_n(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// An open-ended load over a harness's sessions, running in the background
/// until [`BackgroundLoad::stop`]: the fault scenarios break things under it.
/// Dropping it stops the load too, however the scenario ends.
pub struct BackgroundLoad {
    pub recorder: Arc<Recorder>,
    started: std::time::Instant,
    stop: CancellationToken,
    _stop_on_drop: tokio_util::sync::DropGuard,
    task: tokio::task::JoinHandle<()>,
}

impl BackgroundLoad {
    pub fn start(
        h: &crate::harness::Harness,
        sessions: Arc<Vec<String>>,
        concurrency: usize,
        seed: u64,
    ) -> Self {
        let timing = h.timing();
        let target = Target {
            client: h.client(),
            fake: h.fake().handle(),
            namespace: h.namespace().to_owned(),
            sessions,
            timing,
        };
        let params = LoadParams {
            // Bounded by the caller's stop; the count is a backstop.
            episodes: 1_000_000,
            concurrency,
            seed,
            wake_wait: Duration::from_secs(2) + timing.heartbeat_window + Duration::from_secs(4),
        };
        let stop = CancellationToken::new();
        let recorder = Arc::new(Recorder::default());
        let task = tokio::spawn(run_into(target, params, stop.clone(), recorder.clone()));
        Self {
            recorder,
            started: std::time::Instant::now(),
            _stop_on_drop: stop.clone().drop_guard(),
            stop,
            task,
        }
    }

    /// Stops the load and waits for it; answers how long it ran.
    pub async fn stop(self) -> crate::Result<Duration> {
        self.stop.cancel();
        self.task
            .await
            .map_err(|e| crate::Error::Setup(format!("the load task failed: {e}")))?;
        Ok(self.started.elapsed())
    }
}

impl std::fmt::Debug for BackgroundLoad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackgroundLoad").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_tick_is_the_first_at_or_after_due() {
        let t = |ms: i64| DateTime::<Utc>::from_timestamp_millis(1_700_000_000_000 + ms).unwrap();
        assert_eq!(next_tick(t(0), t(2500)), t(3000));
        assert_eq!(next_tick(t(0), t(3000)), t(3000));
        assert_eq!(next_tick(t(5000), t(2500)), t(5000));
    }
}
