//! A model-based test of the store. proptest generates sequences of what
//! happens around a few sessions — connections registering (new ids, replays,
//! reused ids), heartbeating, closing and dying; the clock moving; the sweep;
//! leaders claiming, patching (on time, refused, applied but answered with an
//! error, timed out, or landing much later), waking and mirroring, current
//! or replaced; the resources changing, deleted and created again, their
//! events arriving late or out of order; Redis losing its data — and runs
//! each step against the real scripts and against a small reference model:
//! the resources as the API server has them, the connections, and what the
//! store was told. After every step the store's views, counters and indexes
//! must equal the model's and the invariants hold (see [`Case::check`]). A
//! failing sequence is shrunk by proptest to a minimal one, which the
//! failure message prints with the trace of every step.
//!
//! Time. The model cannot read the server's clock, so it keeps its own. Every
//! duration it uses (clock moves, the window, idle timeouts, claim lifetimes,
//! retry delays) is a multiple of [`GRAIN_MS`], and a script sees the real
//! time R plus the clock offset L. While a whole case takes less than a grain
//! of real time, comparing two instants by L first and by the order of the
//! calls next gives what the server's clock gives, ties included, so the
//! model predicts every outcome exactly. A case that runs longer than that
//! (a stalled machine) cannot be judged: it is discarded, never failed.
//!
//! Creation times. A resource is created at the model's clock, and its
//! creationTimestamp is given as B + L, where B is the server's time when the
//! case began (before any script ran). Every script runs at R + L with R in
//! [B, B + a grain), so a connection made at a model instant counts as made
//! since a creation exactly when its clock offset is at least the creation's:
//! one made at the same offset counts, even one called before the creation,
//! as the mirror's `>=` on a whole-second creationTimestamp counts a
//! connection up to a second early. A lost patch's landing window is given a
//! millisecond short of [`LATE_LANDING_MS`], so that a mirror at exactly
//! that offset after the release is past it, whatever the real milliseconds.
//!
//! Budget: `TRACKER_MODEL_CASES` sequences (32 by default) of up to
//! `TRACKER_MODEL_STEPS` steps (40) per backend, from a fixed seed unless
//! `TRACKER_MODEL_SEED` names one (a failure prints it) or says `random`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use tracker_core::testing::Backend;
use tracker_core::{
    Claim, ClaimOutcome, ClaimRefusal, ClockOffset, ConnectionId, EndReason, FinishOutcome,
    IdleTimeout, Limits, NewConnection, NotOwner, Protocol, RegisterOutcome, ResourceState,
    SessionId, SessionMeta, SessionState, ShardKey, Store, Term, Written,
};

use crate::support;

/// Every duration of the model is a multiple of this (see the module doc).
const GRAIN_MS: i64 = 5_000;
/// The heartbeat window of the store `support::store` makes.
const WINDOW_MS: i64 = 60_000;
const IDLE_TIMEOUTS_MS: [i64; 3] = [30_000, 60_000, 120_000];
const SHORT_CLAIM_MS: i64 = 10_000;
const LONG_CLAIM_MS: i64 = 300_000;
const RETRY_MS: i64 = 15_000;
/// How long a patch whose answer was lost may still land (the reaper's
/// `LATE_LANDING`, the API server's request timeout).
const LATE_LANDING_MS: i64 = 60_000;
const SESSIONS: [&str; 4] = ["desk-a", "desk-b", "desk-c", "desk-d"];
const USERS: [&str; 3] = ["alice", "bob", "carol"];
const PROTOCOLS: [Protocol; 3] = [Protocol::Websocket, Protocol::Vnc, Protocol::Http];
const OWNER: &str = "alice";

#[test]
fn model_standalone() {
    run(Backend::Standalone);
}

#[test]
fn model_cluster() {
    run(Backend::Cluster);
}

// ---------------------------------------------------------------------------
// What is generated

/// Which leader acts: the current one, or one that was replaced and does not
/// know it yet (the k-th older term, modulo how many there are).
#[derive(Debug, Clone, Copy)]
enum Leader {
    Current,
    Stalled(u8),
}

/// Which connection id a registration uses. Picks index the ids used so far.
#[derive(Debug, Clone, Copy)]
enum IdUse {
    Fresh,
    /// The same session and user as the id's first use: a replay, a reuse
    /// of an ended id, or a retry after a refused registration.
    Again(u8),
    /// The id of another session's connection.
    OtherSession(u8, u8),
    /// Another user presenting the id.
    OtherUser(u8, u8),
}

/// What happens to the hibernation patch after a successful claim.
#[derive(Debug, Clone, Copy)]
enum Patch {
    /// Applied; the leader records it.
    Lands,
    /// Refused by the API server; the leader rolls the claim back.
    Refused,
    /// Applied, but the answer was an error; the leader reads the resource
    /// again, sees it hibernated and records it.
    AppliedButError,
    /// No answer, and the leader's read does not show it: the leader
    /// releases the claim as unsure. The patch may still land, within
    /// [`LATE_LANDING_MS`] (a later `LandPatch`), or never.
    TimedOut,
    /// No answer, and the leader cannot read the resource either: the claim
    /// is left to lapse. Nothing applied.
    Unreadable,
    /// Still in flight: a later `LandPatch` step applies it.
    Slow,
}

/// A change someone else makes to a session's resource.
#[derive(Debug, Clone, Copy)]
enum Edit {
    State(ResourceState),
    IdleTimeout(u8),
    /// The exemption annotation: metadata, so the generation stays.
    Exempt(bool),
    Delete,
    /// Created again under the same name (a new uid), or created at all.
    Recreate(ResourceState, u8),
}

#[derive(Debug, Clone, Copy)]
enum Op {
    /// `session` 0..4 names one; 4..8 pick a sleeping one if any.
    /// `as_user`: a plain user's registration, which must own the session.
    Register {
        session: u8,
        user: u8,
        id: IdUse,
        as_user: bool,
    },
    Heartbeat {
        pick: u8,
    },
    Close {
        pick: u8,
        wrong_session: bool,
    },
    Advance {
        grains: u8,
    },
    Sweep,
    Hibernate {
        session: u8,
        leader: Leader,
        long: bool,
        patch: Patch,
    },
    /// A slow action lands. A hibernation patch applies if the resource is
    /// unchanged (or, `forced`, if it is still the same one), else it is
    /// refused; the leader then finishes or rolls back in its term. A patch
    /// whose answer was lost applies likewise if its landing window is not
    /// over, and only the watch tells the store (`seen`: at once). A wake
    /// acts on what the waker read (a patch to running applies likewise).
    LandPatch {
        pick: u8,
        forced: bool,
        seen: bool,
    },
    /// The waker handles one pending wake; `late`: it reads the resource
    /// now and acts at a later `LandPatch`.
    Wake {
        pick: u8,
        leader: Leader,
        late: bool,
    },
    /// A change; `delivered`: its watch event reaches the mirror at once.
    Edit {
        session: u8,
        edit: Edit,
        delivered: bool,
    },
    /// A watch event reaches the mirror late: the `back`-th newest.
    Deliver {
        session: u8,
        back: u8,
        leader: Leader,
    },
    NewLeader,
    /// Redis loses every key; `relist`: the reaper notices and lists again.
    DataLoss {
        relist: bool,
    },
    /// The mirror lists every resource again.
    Relist,
    /// A patch whose answer was lost, walked through in one step (the path
    /// the steps above reach only rarely, as it takes several of them in
    /// order): the clock moves until the session (`session` picks one that
    /// may be claimed, if any) is due, the current leader claims it and its patch times out — `woke_first`: a connection
    /// arrives while the patch is out, its wake ends the claim, and only then
    /// is the claim released as unsure. A connection registers since the
    /// release (and `close`s), before or `after_landing` of the patch; the
    /// mirror sees the landing `delay` grains later (12 or more: past the
    /// patch's window). A store write at every turn, checked after each.
    LostPatch {
        session: u8,
        user: u8,
        woke_first: bool,
        close: bool,
        after_landing: bool,
        delay: u8,
    },
}

fn leader() -> impl Strategy<Value = Leader> {
    prop_oneof![3 => Just(Leader::Current), 1 => any::<u8>().prop_map(Leader::Stalled)]
}

fn resource_state() -> impl Strategy<Value = ResourceState> {
    prop_oneof![
        2 => Just(ResourceState::Running),
        2 => Just(ResourceState::Hibernated),
        1 => Just(ResourceState::Terminated),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let id = prop_oneof![
        5 => Just(IdUse::Fresh),
        3 => any::<u8>().prop_map(IdUse::Again),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(p, k)| IdUse::OtherSession(p, k)),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(p, k)| IdUse::OtherUser(p, k)),
    ];
    let patch = prop_oneof![
        3 => Just(Patch::Lands),
        1 => Just(Patch::Refused),
        1 => Just(Patch::AppliedButError),
        2 => Just(Patch::TimedOut),
        1 => Just(Patch::Unreadable),
        2 => Just(Patch::Slow),
    ];
    let edit = prop_oneof![
        3 => resource_state().prop_map(Edit::State),
        1 => any::<u8>().prop_map(Edit::IdleTimeout),
        1 => any::<bool>().prop_map(Edit::Exempt),
        1 => Just(Edit::Delete),
        1 => (resource_state(), any::<u8>()).prop_map(|(s, i)| Edit::Recreate(s, i)),
    ];
    prop_oneof![
        6 => (0u8..8, 0u8..3, id, prop::bool::weighted(0.3)).prop_map(|(session, user, id, as_user)| {
            Op::Register { session, user, id, as_user }
        }),
        2 => any::<u8>().prop_map(|pick| Op::Heartbeat { pick }),
        2 => (any::<u8>(), prop::bool::weighted(0.15))
            .prop_map(|(pick, wrong_session)| Op::Close { pick, wrong_session }),
        5 => (1u8..=24).prop_map(|grains| Op::Advance { grains }),
        2 => Just(Op::Sweep),
        6 => (0u8..4, leader(), any::<bool>(), patch).prop_map(|(session, leader, long, patch)| {
            Op::Hibernate { session, leader, long, patch }
        }),
        3 => (any::<u8>(), any::<bool>(), any::<bool>())
            .prop_map(|(pick, forced, seen)| Op::LandPatch { pick, forced, seen }),
        5 => (any::<u8>(), leader(), prop::bool::weighted(0.3))
            .prop_map(|(pick, leader, late)| Op::Wake { pick, leader, late }),
        4 => (0u8..4, edit, prop::bool::weighted(0.6))
            .prop_map(|(session, edit, delivered)| Op::Edit { session, edit, delivered }),
        3 => (0u8..4, 0u8..6, leader())
            .prop_map(|(session, back, leader)| Op::Deliver { session, back, leader }),
        1 => Just(Op::NewLeader),
        1 => any::<bool>().prop_map(|relist| Op::DataLoss { relist }),
        1 => Just(Op::Relist),
        2 => (
            0u8..4,
            0u8..3,
            prop::bool::weighted(0.35),
            any::<bool>(),
            any::<bool>(),
            prop_oneof![2 => Just(0u8), 2 => 1u8..12, 3 => 12u8..16],
        )
            .prop_map(|(session, user, woke_first, close, after_landing, delay)| {
                Op::LostPatch { session, user, woke_first, close, after_landing, delay }
            }),
    ]
}

// ---------------------------------------------------------------------------
// The runner

#[derive(Debug, Default)]
struct Counters {
    sequences: AtomicU64,
    steps: AtomicU64,
    discarded: AtomicU64,
    outcomes: std::sync::Mutex<BTreeMap<String, u64>>,
}

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number")),
        Err(_) => default,
    }
}

fn run(backend: Backend) {
    let _heavy = crate::support::HEAVY.blocking_lock();
    let cases = env_number("TRACKER_MODEL_CASES", 32) as u32;
    let max_steps = env_number("TRACKER_MODEL_STEPS", 40) as usize;
    // A fixed seed by default, so that CI runs the same sequences every time
    // and a failure there replays; `TRACKER_MODEL_SEED=random` explores.
    let seed = match std::env::var("TRACKER_MODEL_SEED").as_deref() {
        Ok("random") => rand::random::<u64>() >> 1,
        _ => env_number("TRACKER_MODEL_SEED", 20_261_201),
    };
    let config = Config {
        cases,
        // Minimal sequences become plain tests; no files appear next to the source.
        failure_persistence: None,
        max_global_rejects: cases.max(64),
        max_shrink_iters: 4096,
        rng_seed: RngSeed::Fixed(seed),
        ..Config::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let counters = Counters::default();
    let started = Instant::now();
    let strategy = prop::collection::vec(op(), 1..=max_steps);
    let result = TestRunner::new(config).run(&strategy, |ops| {
        rt.block_on(run_case(backend, &ops, &counters))
    });
    eprintln!(
        "model ({backend:?}, seed {seed}): {} sequences, {} steps, {} discarded \
         (ran longer than a grain of real time), {:.1} s",
        counters.sequences.load(Ordering::Relaxed),
        counters.steps.load(Ordering::Relaxed),
        counters.discarded.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
    );
    // What the run covered, one line per operation.
    let outcomes = counters.outcomes.lock().unwrap();
    let mut by_op: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (outcome, n) in outcomes.iter() {
        let (op, what) = outcome.split_once(": ").unwrap_or((outcome, ""));
        by_op.entry(op).or_default().push(format!("{what} {n}"));
    }
    for (op, seen) in by_op {
        eprintln!("  {op}: {}", seen.join(", "));
    }
    drop(outcomes);
    if let Err(e) = result {
        panic!("{e}\n(replay with TRACKER_MODEL_SEED={seed})");
    }
}

async fn run_case(backend: Backend, ops: &[Op], counters: &Counters) -> Result<(), TestCaseError> {
    counters.sequences.fetch_add(1, Ordering::Relaxed);
    let mut case = Case::new(backend).await;
    let mut result = case.setup().await;
    for (i, op) in ops.iter().enumerate() {
        if result.is_err() {
            break;
        }
        counters.steps.fetch_add(1, Ordering::Relaxed);
        case.step = i + 1;
        case.trace.push(format!("{:>3}. {op:?}", i + 1));
        result = case.apply(*op).await;
        if result.is_ok() {
            result = case.check().await;
        }
    }
    if result.is_ok() {
        // However it ended, a relist shows the store the world as it is.
        case.step = ops.len() + 1;
        case.trace.push(format!(
            "{:>3}. Relist (end of the sequence)",
            ops.len() + 1
        ));
        result = case.relist().await;
        if result.is_ok() {
            result = case.check().await;
        }
    }
    let elapsed = case.started.elapsed();
    case.flush().await;
    let mut outcomes = counters.outcomes.lock().unwrap();
    for (outcome, n) in std::mem::take(&mut case.seen) {
        *outcomes.entry(outcome).or_default() += n;
    }
    drop(outcomes);
    if result.is_err() && elapsed >= Duration::from_millis(GRAIN_MS as u64) {
        // The model's clock assumption did not hold; nothing can be judged.
        counters.discarded.fetch_add(1, Ordering::Relaxed);
        return Err(TestCaseError::reject(
            "ran longer than a grain of real time",
        ));
    }
    result
}

// ---------------------------------------------------------------------------
// The reference model

/// An instant as the model knows it: the clock offset, then the order of the
/// store calls (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct At {
    ms: i64,
    call: u64,
}

impl At {
    fn plus(self, ms: i64) -> At {
        At {
            ms: self.ms + ms,
            call: self.call,
        }
    }
}

/// Live: the last heartbeat is younger than the window.
fn alive(heartbeat: At, now: At) -> bool {
    heartbeat > now.plus(-WINDOW_MS)
}

/// A Session resource as the API server has it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Resource {
    uid: String,
    generation: i64,
    state: ResourceState,
    idle_ms: i64,
    exempt: bool,
    /// The model's clock when it was created (see the module doc).
    created_ms: i64,
}

impl Resource {
    fn idle(&self) -> Option<i64> {
        (!self.exempt).then_some(self.idle_ms)
    }

    /// `base_ms`: the server's time when the case began.
    fn meta(&self, session: &SessionId, base_ms: i64) -> SessionMeta {
        SessionMeta {
            session_id: session.clone(),
            uid: Some(self.uid.clone()),
            owner: Some(OWNER.into()),
            idle_source: Default::default(),
            state: self.state,
            idle_timeout: idle_timeout(self.idle()),
            generation: Some(self.generation),
            max_session_duration: None,
            created_at: DateTime::from_timestamp_millis(base_ms + self.created_ms),
        }
    }
}

fn idle_timeout(ms: Option<i64>) -> IdleTimeout {
    match ms {
        Some(ms) => IdleTimeout::After(Duration::from_millis(ms as u64)),
        None => IdleTimeout::Off,
    }
}

/// A watch event.
#[derive(Debug, Clone)]
enum Event {
    Upsert(Resource),
    Deleted(String),
}

/// One session's resource and every event it produced, oldest first.
#[derive(Debug, Default)]
struct World {
    resource: Option<Resource>,
    events: Vec<Event>,
    created: u32,
}

/// What a mirror call did, as the model predicts it.
struct Mirror {
    written: Written,
    /// A new resource took the name.
    replaced: bool,
    /// Which of the mirror's wakes for a connection that has ended may apply
    /// (for the run's coverage).
    woke: Option<&'static str>,
}

/// What the store mirrors of a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mirrored {
    uid: String,
    generation: i64,
    state: ResourceState,
    idle: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Phase {
    #[default]
    Quiet,
    Hibernating {
        term: u64,
        lapses: At,
    },
    Waking,
}

/// What the store was told of one session, by the rules the scripts document.
#[derive(Debug, Clone, Default)]
struct Told {
    res: Option<Mirrored>,
    /// Every resource the store was told is gone (since its data loss): a
    /// late event of one must not bring it back.
    deleted: BTreeSet<String>,
    phase: Phase,
    /// In the wake index (with `Phase::Waking`; a new resource under the
    /// name drops both: a wake for the old one does not apply).
    wake: bool,
    not_before: Option<At>,
    idle_since: Option<At>,
    last_end: Option<At>,
    /// The store's `lc`: the newest start among connections ended or
    /// registered while another one was there. Kept when the resource is
    /// forgotten or replaced; gone with a data loss.
    last_conn: Option<At>,
    /// A claim whose patch's answer was lost was released: connections since
    /// (`lp`: the release, or a later claim, a new decision) ask for a wake
    /// if a hibernation lands before the ms that follows (`lx`: the release
    /// plus [`LATE_LANDING_MS`]).
    lost_release: Option<(At, i64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Open,
    Ended(EndReason),
    /// Gone with a data loss (and so is its history record, if it had ended).
    Lost,
}

#[derive(Debug, Clone)]
struct Conn {
    id: ConnectionId,
    session: usize,
    user: usize,
    started: At,
    heartbeat: At,
    status: Status,
}

/// The connection-id index as the store should have it.
#[derive(Debug, Clone, Copy)]
struct IdOwner {
    session: usize,
    user: usize,
    registered: bool,
}

/// A leader's action still on its way: it read the resource, and what it
/// does with what it read lands later.
#[derive(Debug, Clone)]
enum InFlight {
    /// A hibernation patch to the API server.
    Hibernation {
        session: usize,
        term: Term,
        uid: String,
        read_generation: i64,
    },
    /// A hibernation patch whose answer was lost and whose claim was
    /// released at `released`: it may still land, unknown to the leader.
    Lost {
        session: usize,
        uid: String,
        read_generation: i64,
        released: At,
    },
    /// A wake: the waker read the resource (`None`: gone).
    Wake {
        session: usize,
        term: Term,
        read: Option<Resource>,
    },
}

#[derive(Debug, Default)]
struct Model {
    clock_ms: i64,
    calls: u64,
    world: Vec<World>,
    told: Vec<Told>,
    conns: Vec<Conn>,
    /// Every id used, with its first session and user, for picks.
    used_ids: Vec<(ConnectionId, usize, usize)>,
    ids: HashMap<ConnectionId, IdOwner>,
    /// Every term begun, oldest first; the last is the current leader's.
    terms: Vec<Term>,
    /// The newest term each shard has seen (what fences there).
    shard_term: Vec<u64>,
    in_flight: Vec<InFlight>,
    /// The last idle-since each session showed (invariant 4).
    idle_seen: Vec<Option<DateTime<Utc>>>,
}

impl Model {
    fn open(&self, session: usize) -> impl Iterator<Item = &Conn> {
        self.conns
            .iter()
            .filter(move |c| c.session == session && c.status == Status::Open)
    }

    fn n_open(&self, session: usize) -> usize {
        self.open(session).count()
    }

    fn live(&self, session: usize, now: At) -> Vec<&Conn> {
        self.open(session)
            .filter(|c| alive(c.heartbeat, now))
            .collect()
    }

    fn open_conn(&mut self, id: ConnectionId, session: usize) -> Option<&mut Conn> {
        self.conns
            .iter_mut()
            .find(|c| c.id == id && c.session == session && c.status == Status::Open)
    }

    fn request_wake(&mut self, s: usize) {
        let t = &mut self.told[s];
        if t.phase != Phase::Waking {
            t.phase = Phase::Waking;
            t.wake = true;
        }
    }

    /// "A session in use is never hibernated without a wake."
    fn wake_if_in_use(&mut self, s: usize, now: At) {
        let hibernated = self.told[s]
            .res
            .as_ref()
            .is_some_and(|r| r.state == ResourceState::Hibernated);
        if hibernated && !self.live(s, now).is_empty() {
            self.request_wake(s);
        }
    }

    /// The newest start among the connections of `s`, gone (`lc`) or still
    /// stored, dead or alive.
    fn last_connection(&self, s: usize) -> Option<At> {
        let stored = self.open(s).map(|c| c.started).max();
        self.told[s].last_conn.max(stored)
    }

    /// A connection of `s` started at `started` ended at `ended`: idle since
    /// the latest end once none is left.
    fn note_ended(&mut self, s: usize, started: At, ended: At) {
        let n = self.n_open(s);
        let t = &mut self.told[s];
        t.last_conn = Some(t.last_conn.map_or(started, |l| l.max(started)));
        let last = t.last_end.map_or(ended, |l| l.max(ended));
        t.last_end = Some(last);
        if n == 0 {
            t.idle_since = Some(t.idle_since.map_or(last, |i| i.max(last)));
        }
    }

    /// When the session is due in the hibernation index, if it is in it.
    fn due(&self, s: usize) -> Option<At> {
        let t = &self.told[s];
        if let Phase::Hibernating { lapses, .. } = t.phase {
            return Some(lapses);
        }
        let r = t.res.as_ref()?;
        if r.state != ResourceState::Running || t.phase != Phase::Quiet || self.n_open(s) > 0 {
            return None;
        }
        let at = t.idle_since?.plus(r.idle?);
        Some(t.not_before.map_or(at, |nb| nb.max(at)))
    }

    /// The state a session reports with `n` connections (counters: stored
    /// ones; views: live ones); `None` if it is counted nowhere.
    fn state(&self, s: usize, n: usize) -> Option<SessionState> {
        let t = &self.told[s];
        let Some(r) = &t.res else {
            return (n > 0).then_some(SessionState::Unknown);
        };
        Some(match (r.state, t.phase) {
            (ResourceState::Terminated, _) => SessionState::Terminated,
            (_, Phase::Hibernating { .. }) => SessionState::Hibernating,
            (_, Phase::Waking) => SessionState::Waking,
            (ResourceState::Hibernated, _) => SessionState::Hibernated,
            _ if n > 0 => SessionState::Running,
            _ => SessionState::Idle,
        })
    }

    /// Whether the store has a view of the session at all.
    fn known(&self, s: usize) -> bool {
        let t = &self.told[s];
        self.n_open(s) > 0
            || t.res.is_some()
            || t.idle_since.is_some()
            || t.last_end.is_some()
            || t.not_before.is_some()
            || t.phase != Phase::Quiet
    }

    fn claim(&self, s: usize, now: At) -> Result<(), ClaimRefusal> {
        let t = &self.told[s];
        let Some(r) = &t.res else {
            return Err(ClaimRefusal::NotMirrored);
        };
        if r.state != ResourceState::Running {
            return Err(ClaimRefusal::NotRunning);
        }
        match t.phase {
            Phase::Waking => return Err(ClaimRefusal::Busy),
            Phase::Hibernating { lapses, .. } if lapses > now => return Err(ClaimRefusal::Busy),
            _ => {}
        }
        if self.n_open(s) > 0 {
            return Err(ClaimRefusal::Connected);
        }
        if r.idle.is_none() {
            return Err(ClaimRefusal::Exempt);
        }
        match self.due(s) {
            Some(due) if due <= now => Ok(()),
            _ => Err(ClaimRefusal::NotDue),
        }
    }

    fn finish(&mut self, s: usize, term: Term, uid: &str, gen: i64, now: At) -> FinishOutcome {
        let t = &mut self.told[s];
        let Some(r) = t.res.as_mut() else {
            return FinishOutcome::Stale;
        };
        if r.state == ResourceState::Terminated || r.uid != uid {
            return FinishOutcome::Stale;
        }
        let ours = matches!(t.phase, Phase::Hibernating { term: h, .. } if h == term.0);
        if ours {
            t.phase = Phase::Quiet;
        }
        if gen < r.generation {
            return FinishOutcome::Stale;
        }
        r.state = ResourceState::Hibernated;
        r.generation = gen;
        // Decided after any earlier lost patch: that one is moot.
        t.lost_release = None;
        self.wake_if_in_use(s, now);
        if ours {
            FinishOutcome::Finished
        } else {
            FinishOutcome::NotClaimed
        }
    }

    /// `unsure`: the patch's answer was lost, so it may still land.
    fn rollback(&mut self, s: usize, term: Term, now: At, unsure: bool) -> Written {
        let t = &mut self.told[s];
        if unsure && t.res.is_some() {
            // Whoever holds the claim now, the lost patch may still land.
            t.lost_release = Some((now, now.ms + LATE_LANDING_MS));
        }
        match t.phase {
            Phase::Hibernating { term: h, .. } if h == term.0 => {
                t.phase = Phase::Quiet;
                t.not_before = Some(now.plus(RETRY_MS));
                Written::Done
            }
            _ => Written::Noop,
        }
    }

    fn ack(&mut self, s: usize, uid: &str, gen: i64, now: At) -> Written {
        let n = self.n_open(s);
        let t = &mut self.told[s];
        if t.res.as_ref().is_some_and(|r| r.uid != uid) {
            return Written::Noop;
        }
        let acked = std::mem::take(&mut t.wake);
        if t.phase == Phase::Waking {
            t.phase = Phase::Quiet;
        }
        if let Some(r) = t.res.as_mut() {
            if r.state != ResourceState::Terminated && gen >= r.generation {
                if r.state != ResourceState::Running && n == 0 {
                    t.idle_since = Some(now);
                }
                r.state = ResourceState::Running;
                r.generation = gen;
            }
        }
        self.wake_if_in_use(s, now);
        if acked {
            Written::Done
        } else {
            Written::Noop
        }
    }

    fn mirror(&mut self, s: usize, res: &Resource, now: At) -> Mirror {
        let n = self.n_open(s);
        let t = &mut self.told[s];
        let mut out = Mirror {
            written: Written::Noop,
            replaced: false,
            woke: None,
        };
        if t.deleted.contains(&res.uid) {
            return out;
        }
        out.replaced = t.res.as_ref().is_some_and(|r| r.uid != res.uid);
        if out.replaced {
            // Another resource under the name: nothing of the old one applies.
            t.res = None;
            t.phase = Phase::Quiet;
            t.wake = false;
            t.not_before = None;
            t.lost_release = None;
        } else if t
            .res
            .as_ref()
            .is_some_and(|r| res.generation < r.generation)
        {
            return out;
        }
        let was = t.res.as_ref().map(|r| r.state);
        t.res = Some(Mirrored {
            uid: res.uid.clone(),
            generation: res.generation,
            state: res.state,
            idle: res.idle(),
        });
        if res.state == ResourceState::Running
            && n == 0
            && (was != Some(ResourceState::Running) || t.idle_since.is_none())
        {
            t.idle_since = Some(t.idle_since.map_or(now, |i| i.max(now)));
        }
        match res.state {
            ResourceState::Hibernated => {
                if matches!(t.phase, Phase::Hibernating { .. }) {
                    t.phase = Phase::Quiet;
                }
            }
            ResourceState::Terminated => {
                t.phase = Phase::Quiet;
                t.wake = false;
            }
            ResourceState::Running => {}
        }
        self.wake_if_in_use(s, now);
        let last_conn = self.last_connection(s);
        let t = &mut self.told[s];
        if res.state != ResourceState::Running {
            if let Some((since, until)) = t.lost_release.take() {
                // A lost patch may be what landed, decided before a connection
                // made since its release: that connection asks for a wake.
                let in_window = now.ms < until;
                if res.state == ResourceState::Hibernated
                    && was == Some(ResourceState::Running)
                    && last_conn.is_some_and(|l| l >= since)
                {
                    if in_window {
                        out.woke = Some("a connection since a lost patch's release");
                        self.request_wake(s);
                    } else {
                        out.woke = Some("none: the lost patch's window is over");
                    }
                }
            }
        }
        // A resource new to the store, connected to since its creation.
        if was.is_none()
            && res.state == ResourceState::Hibernated
            && last_conn.is_some_and(|l| l.ms >= res.created_ms)
        {
            out.woke = Some("a connection since the creation");
            self.request_wake(s);
        }
        out.written = Written::Done;
        out
    }

    fn forget(&mut self, s: usize, uid: Option<&str>) -> Written {
        let n = self.n_open(s);
        let t = &mut self.told[s];
        if let (Some(uid), Some(r)) = (uid, &t.res) {
            if r.uid != uid {
                t.deleted.insert(uid.to_owned());
                return Written::Noop;
            }
        }
        // Without a uid, whatever is mirrored is gone.
        if let Some(gone) = uid.or(t.res.as_ref().map(|r| r.uid.as_str())) {
            t.deleted.insert(gone.to_owned());
        }
        let was = t.res.take().is_some();
        t.wake = false;
        t.phase = Phase::Quiet;
        t.not_before = None;
        t.lost_release = None;
        if n == 0 {
            // Nothing left to show: the session's metadata goes.
            t.idle_since = None;
            t.last_end = None;
        }
        if was {
            Written::Done
        } else {
            Written::Noop
        }
    }
}

// ---------------------------------------------------------------------------
// Raw access to the test's keys

/// Connections that look under the store: to lose its data, and to prove
/// that a fenced write changed nothing.
enum Raw {
    Standalone(MultiplexedConnection),
    Cluster {
        routed: ClusterConnection,
        masters: Vec<MultiplexedConnection>,
    },
}

impl Raw {
    async fn connect(backend: Backend) -> Raw {
        let (urls, _) = backend.urls();
        match backend {
            Backend::Standalone => Raw::Standalone(
                redis::Client::open(urls[0].as_str())
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                    .unwrap(),
            ),
            Backend::Cluster => {
                let routed = redis::cluster::ClusterClient::new(urls)
                    .unwrap()
                    .get_async_connection()
                    .await
                    .unwrap();
                let mut masters = Vec::new();
                for node in crate::migration::masters().await {
                    masters.push(
                        redis::Client::open(node.url())
                            .unwrap()
                            .get_multiplexed_async_connection()
                            .await
                            .unwrap(),
                    );
                }
                Raw::Cluster { routed, masters }
            }
        }
    }

    /// One command on the node owning its key.
    async fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> T {
        match self {
            Raw::Standalone(c) => cmd.query_async(c).await.unwrap(),
            Raw::Cluster { routed, .. } => cmd.query_async(routed).await.unwrap(),
        }
    }

    /// The server's time in ms, as the scripts read it (without offset).
    async fn time_ms(&mut self) -> i64 {
        let node = match self {
            Raw::Standalone(c) => c,
            Raw::Cluster { masters, .. } => &mut masters[0],
        };
        let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(node).await.unwrap();
        secs * 1000 + micros / 1000
    }

    /// Every key under `prefix`, on every master.
    async fn scan(&mut self, prefix: &str) -> BTreeSet<String> {
        let nodes: Vec<&mut MultiplexedConnection> = match self {
            Raw::Standalone(c) => vec![c],
            Raw::Cluster { masters, .. } => masters.iter_mut().collect(),
        };
        let mut keys = BTreeSet::new();
        for node in nodes {
            let mut cursor = 0u64;
            // Bounded: a test's prefix holds a few dozen keys.
            for _ in 0..10_000 {
                let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(format!("{prefix}:*"))
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(node)
                    .await
                    .unwrap();
                keys.extend(batch);
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        keys
    }
}

// ---------------------------------------------------------------------------
// One case: the store, the model and the trace

struct Case {
    store: Store,
    clock: ClockOffset,
    raw: Raw,
    sessions: Vec<SessionId>,
    /// The server's time (ms) before the case's first script: creation
    /// times are given from it (see the module doc).
    base_ms: i64,
    m: Model,
    trace: Vec<String>,
    step: usize,
    started: Instant,
    /// How often each outcome was seen, to show what a run covered.
    seen: BTreeMap<String, u64>,
    /// What the last mirror call woke for, as the model predicted it.
    woke: Option<&'static str>,
}

macro_rules! ensure {
    ($case:expr, $cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($case.fail(format!($($fmt)+)));
        }
    };
}

type Step = Result<(), TestCaseError>;

impl Case {
    async fn new(backend: Backend) -> Case {
        // Before the base time is read: a case judged within a grain of this
        // ran every script within a grain of the base.
        let started = Instant::now();
        let mut raw = Raw::connect(backend).await;
        let base_ms = raw.time_ms().await;
        let (store, clock) = support::store(backend).await;
        assert_eq!(store.heartbeat_window().as_millis() as i64, WINDOW_MS);
        let sessions: Vec<SessionId> = SESSIONS.iter().map(|s| support::sid(s)).collect();
        let m = Model {
            world: SESSIONS.iter().map(|_| World::default()).collect(),
            told: vec![Told::default(); SESSIONS.len()],
            shard_term: vec![0; usize::from(store.keys().shard_count())],
            idle_seen: vec![None; SESSIONS.len()],
            ..Model::default()
        };
        Case {
            raw,
            store,
            clock,
            sessions,
            base_ms,
            m,
            trace: Vec::new(),
            step: 0,
            started,
            seen: BTreeMap::new(),
            woke: None,
        }
    }

    fn fail(&self, what: String) -> TestCaseError {
        TestCaseError::fail(format!(
            "step {}: {what}\ntrace:\n{}",
            self.step,
            self.trace.join("\n")
        ))
    }

    fn count(&mut self, outcome: String) {
        *self.seen.entry(outcome).or_default() += 1;
    }

    fn note(&mut self, what: impl AsRef<str>) {
        self.trace.push(format!("       {}", what.as_ref()));
    }

    /// The instant of the next store call.
    fn tick(&mut self) -> At {
        self.m.calls += 1;
        At {
            ms: self.m.clock_ms,
            call: self.m.calls,
        }
    }

    fn shard(&self, s: usize) -> usize {
        usize::from(self.store.keys().shard_of(&self.sessions[s]).0)
    }

    fn term(&self, leader: Leader) -> Term {
        let terms = &self.m.terms;
        match leader {
            Leader::Stalled(k) if terms.len() > 1 => terms[usize::from(k) % (terms.len() - 1)],
            _ => *terms.last().expect("a leader began in setup"),
        }
    }

    fn conn_name(&self, id: ConnectionId) -> String {
        match self.m.used_ids.iter().position(|(i, _, _)| *i == id) {
            Some(n) => format!("c{n}"),
            None => id.to_string(),
        }
    }

    /// Whether a write of `term` on session `s`'s shard must be fenced; if
    /// not, the shard now knows `term`.
    fn fenced(&mut self, s: usize, term: Term) -> bool {
        let shard = self.shard(s);
        let stored = &mut self.m.shard_term[shard];
        if term.0 < *stored {
            return true;
        }
        *stored = term.0;
        false
    }

    /// Every key the test may have written: what a scan finds, and every
    /// name the model can derive (a scan racing a slot migration of another
    /// test could miss one).
    async fn keys(&mut self) -> BTreeSet<String> {
        let ks = self.store.keys().clone();
        let mut keys = self.raw.scan(ks.prefix()).await;
        for shard in ks.shards() {
            keys.extend(ks.shard_keys(shard));
            keys.insert(ks.shard_key(shard, ShardKey::Epoch));
        }
        for s in &self.sessions {
            keys.extend(ks.session_keys(s));
        }
        keys.insert(ks.term_seq_key());
        for (id, _, _) in &self.m.used_ids {
            keys.insert(ks.id_key(*id));
            keys.insert(ks.id_bucket_key(*id));
        }
        for u in USERS {
            keys.insert(ks.user_key(&support::uid(u)));
        }
        keys
    }

    async fn snapshot(&mut self) -> BTreeMap<String, Option<Vec<u8>>> {
        let mut all = BTreeMap::new();
        for key in self.keys().await {
            let dump: Option<Vec<u8>> = self.raw.query(redis::cmd("DUMP").arg(&key)).await;
            all.insert(key, dump);
        }
        all
    }

    /// Invariant 5: a write of a replaced leader changed nothing.
    async fn unchanged(&mut self, before: BTreeMap<String, Option<Vec<u8>>>, what: &str) -> Step {
        let after = self.snapshot().await;
        let changed: Vec<&String> = after
            .iter()
            .filter(|(k, v)| before.get(*k).cloned().flatten() != **v)
            .map(|(k, _)| k)
            .collect();
        ensure!(
            self,
            changed.is_empty(),
            "a fenced {what} changed {changed:?}"
        );
        Ok(())
    }

    /// Deletes every key of the test: a Redis data loss, and the cleanup.
    async fn flush(&mut self) {
        for key in self.keys().await {
            let _: i64 = self.raw.query(redis::cmd("DEL").arg(&key)).await;
        }
    }

    // -- setup

    /// A leader begins; three sessions exist (running), the fourth has no
    /// resource yet; the mirror lists them.
    async fn setup(&mut self) -> Step {
        self.trace
            .push("  0. setup: a leader begins; desk-a..c running, mirrored".into());
        self.new_leader().await?;
        for s in 0..3 {
            self.edit_world(s, Edit::Recreate(ResourceState::Running, s as u8));
        }
        self.relist().await?;
        self.check().await
    }

    // -- steps

    async fn apply(&mut self, op: Op) -> Step {
        match op {
            Op::Register {
                session,
                user,
                id,
                as_user,
            } => {
                let s = self.register_target(session);
                self.register(s, usize::from(user), id, as_user).await
            }
            Op::Heartbeat { pick } => self.heartbeat(pick).await,
            Op::Close {
                pick,
                wrong_session,
            } => self.close(pick, wrong_session).await,
            Op::Advance { grains } => {
                self.advance(i64::from(grains));
                Ok(())
            }
            Op::Sweep => self.sweep().await,
            Op::Hibernate {
                session,
                leader,
                long,
                patch,
            } => {
                self.hibernate(usize::from(session), leader, long, patch)
                    .await
            }
            Op::LandPatch { pick, forced, seen } => self.land_patch(pick, forced, seen).await,
            Op::Wake { pick, leader, late } => self.wake(pick, leader, late).await,
            Op::Edit {
                session,
                edit,
                delivered,
            } => {
                let s = usize::from(session);
                self.edit_world(s, edit);
                if delivered {
                    let term = self.term(Leader::Current);
                    self.deliver(s, 0, term).await?;
                }
                Ok(())
            }
            Op::Deliver {
                session,
                back,
                leader,
            } => {
                let term = self.term(leader);
                self.deliver(usize::from(session), usize::from(back), term)
                    .await
            }
            Op::NewLeader => self.new_leader().await,
            Op::DataLoss { relist } => {
                self.data_loss().await;
                if relist {
                    self.relist().await?;
                }
                Ok(())
            }
            Op::Relist => self.relist().await,
            Op::LostPatch {
                session,
                user,
                woke_first,
                close,
                after_landing,
                delay,
            } => {
                let s = self.claim_target(session);
                self.lost_patch(
                    s,
                    usize::from(user),
                    woke_first,
                    close,
                    after_landing,
                    delay,
                )
                .await
            }
        }
    }

    async fn register(&mut self, s: usize, u: usize, id_use: IdUse, as_user: bool) -> Step {
        let used = &self.m.used_ids;
        let pick = |p: u8| used[usize::from(p) % used.len()];
        let (id, s, u) = match id_use {
            _ if used.is_empty() => (ConnectionId::new_random(), s, u),
            IdUse::Fresh => (ConnectionId::new_random(), s, u),
            IdUse::Again(p) => pick(p),
            IdUse::OtherSession(p, k) => {
                let (id, s0, u0) = pick(p);
                (id, (s0 + 1 + usize::from(k) % 3) % SESSIONS.len(), u0)
            }
            IdUse::OtherUser(p, k) => {
                let (id, s0, u0) = pick(p);
                (id, s0, (u0 + 1 + usize::from(k) % 2) % USERS.len())
            }
        };
        if !self.m.used_ids.iter().any(|(i, _, _)| *i == id) {
            self.m.used_ids.push((id, s, u));
        }
        let now = self.tick();
        let expected = match self.m.ids.get(&id).copied() {
            Some(o) if o.session != s || o.user != u => "conflict",
            Some(o) if o.registered => match self.m.open_conn(id, s) {
                Some(c) if alive(c.heartbeat, now) => "replayed",
                _ => "conflict",
            },
            _ if self.m.told[s]
                .res
                .as_ref()
                .is_some_and(|r| r.state == ResourceState::Terminated) =>
            {
                "terminated"
            }
            _ => "created",
        };
        // A user must own the session, checked by the session's script before
        // anything it checks itself; every mirrored resource here is OWNER's.
        // An id the store has seen may be refused before that, by the id
        // index (another session, a claim of another user, an archived
        // connection), or after it: either refusal records nothing.
        let owner_refusal = match &self.m.told[s].res {
            _ if !as_user => None,
            None => Some("no owner"),
            Some(_) if USERS[u] != OWNER => Some("other owner"),
            Some(_) => None,
        };
        let seen = self.m.ids.contains_key(&id);
        let (expected, or_else) = match owner_refusal {
            Some(refusal) if seen && expected == "conflict" => ("conflict", Some(refusal)),
            Some(refusal) => (refusal, None),
            None => (expected, None),
        };
        let new = NewConnection {
            session_id: self.sessions[s].clone(),
            connection_id: id,
            user_id: support::uid(USERS[u]),
            protocol: PROTOCOLS[u],
            client_ip: Some("10.1.2.3".parse().unwrap()),
            user_agent: None,
        };
        let caller = as_user.then(|| support::uid(USERS[u]));
        let outcome = self
            .store
            .register_as(&new, Limits::default(), caller.as_ref())
            .await
            .unwrap();
        let (got, registered) = match &outcome {
            RegisterOutcome::Created(r) => ("created", Some(r)),
            RegisterOutcome::Replayed(r) => ("replayed", Some(r)),
            RegisterOutcome::Terminated => ("terminated", None),
            RegisterOutcome::Conflict => ("conflict", None),
            RegisterOutcome::NotOwner(NotOwner::NoOwner) => ("no owner", None),
            RegisterOutcome::NotOwner(NotOwner::OtherOwner) => ("other owner", None),
            other => panic!("no limits are set, yet {other:?}"),
        };
        let name = self.conn_name(id);
        self.count(format!("register: {got}"));
        let by = if as_user { "as user" } else { "by" };
        self.note(format!(
            "{name} on {} {by} {}: {got}",
            SESSIONS[s], USERS[u]
        ));
        ensure!(
            self,
            got == expected || Some(got) == or_else,
            "registering {name} on {} by {}: expected {expected}, got {got}",
            SESSIONS[s],
            USERS[u]
        );
        match got {
            "created" => {
                if self.m.n_open(s) > 0 {
                    // Registered while another one is there: the store's lc.
                    let t = &mut self.m.told[s];
                    t.last_conn = Some(t.last_conn.map_or(now, |l| l.max(now)));
                }
                self.m.ids.insert(
                    id,
                    IdOwner {
                        session: s,
                        user: u,
                        registered: true,
                    },
                );
                self.m.conns.push(Conn {
                    id,
                    session: s,
                    user: u,
                    started: now,
                    heartbeat: now,
                    status: Status::Open,
                });
                let t = &mut self.m.told[s];
                t.idle_since = None;
                t.not_before = None;
                let asleep = t.res.as_ref().is_some_and(|r| {
                    matches!(t.phase, Phase::Hibernating { .. })
                        || r.state == ResourceState::Hibernated
                });
                if asleep {
                    self.m.request_wake(s);
                }
                // A connection arriving resets the idle clock.
                self.m.idle_seen[s] = None;
            }
            "replayed" => {
                self.m
                    .open_conn(id, s)
                    .expect("replayed a live one")
                    .heartbeat = now;
            }
            // The id was claimed before the session's script refused.
            "terminated" | "no owner" | "other owner" => {
                self.m.ids.entry(id).or_insert(IdOwner {
                    session: s,
                    user: u,
                    registered: false,
                });
            }
            _ => {}
        }
        if let Some(r) = registered {
            let live = self.m.live(s, now).len();
            let state = self.m.state(s, live).unwrap_or(SessionState::Unknown);
            ensure!(
                self,
                r.session.state == state && r.session.active_connections == live as u64,
                "the registration's view of {} says {:?} with {} live, the model {state:?} with {live}",
                SESSIONS[s],
                r.session.state,
                r.session.active_connections
            );
        }
        Ok(())
    }

    /// Sessions 0..4 by name; 4..8 a sleeping one if any (hibernated or
    /// being hibernated, as the resource or the store has it, or with a lost
    /// patch that may still land), where a connection arriving is most
    /// interesting.
    fn register_target(&self, session: u8) -> usize {
        let s = usize::from(session);
        if s < SESSIONS.len() {
            return s;
        }
        let sleeping: Vec<usize> = (0..SESSIONS.len())
            .filter(|&i| {
                let world = self.m.world[i].resource.as_ref();
                world.is_some_and(|c| c.state == ResourceState::Hibernated)
                    || matches!(self.m.told[i].phase, Phase::Hibernating { .. })
                    || self
                        .m
                        .in_flight
                        .iter()
                        .any(|f| matches!(f, InFlight::Lost { session, .. } if *session == i))
            })
            .collect();
        match sleeping.len() {
            0 => s % SESSIONS.len(),
            n => sleeping[s % n],
        }
    }

    fn pick_conn(&self, pick: u8) -> Option<Conn> {
        let n = self.m.conns.len();
        (n > 0).then(|| self.m.conns[usize::from(pick) % n].clone())
    }

    async fn heartbeat(&mut self, pick: u8) -> Step {
        let Some(c) = self.pick_conn(pick) else {
            self.note("no connection yet");
            return Ok(());
        };
        let now = self.tick();
        let expected = self
            .m
            .open_conn(c.id, c.session)
            .is_some_and(|o| alive(o.heartbeat, now));
        let got = self
            .store
            .heartbeat(&self.sessions[c.session], c.id)
            .await
            .unwrap()
            .is_some();
        let name = self.conn_name(c.id);
        self.count(format!(
            "heartbeat: {}",
            if got { "acknowledged" } else { "unknown" }
        ));
        self.note(format!("{name}: {}", if got { "alive" } else { "unknown" }));
        ensure!(
            self,
            got == expected,
            "heartbeat of {name}: expected acknowledged={expected}, got {got}"
        );
        if got {
            self.m.open_conn(c.id, c.session).unwrap().heartbeat = now;
        }
        Ok(())
    }

    async fn close(&mut self, pick: u8, wrong_session: bool) -> Step {
        let Some(c) = self.pick_conn(pick) else {
            self.note("no connection yet");
            return Ok(());
        };
        self.close_conn(c, wrong_session).await
    }

    async fn close_conn(&mut self, c: Conn, wrong_session: bool) -> Step {
        let s = if wrong_session {
            (c.session + 1) % SESSIONS.len()
        } else {
            c.session
        };
        let now = self.tick();
        let expected = self.m.open_conn(c.id, s).map(|o| {
            if alive(o.heartbeat, now) {
                (EndReason::Closed, now)
            } else {
                (EndReason::Expired, o.heartbeat.plus(WINDOW_MS))
            }
        });
        let got = self.store.close(&self.sessions[s], c.id).await.unwrap();
        let name = self.conn_name(c.id);
        self.count(format!("close: {got:?}"));
        self.note(format!("{name} on {}: {got:?}", SESSIONS[s]));
        ensure!(
            self,
            got == expected.map(|(r, _)| r),
            "closing {name} on {}: expected {:?}, got {got:?}",
            SESSIONS[s],
            expected.map(|(r, _)| r)
        );
        if let Some((reason, ended)) = expected {
            let o = self.m.open_conn(c.id, s).unwrap();
            o.status = Status::Ended(reason);
            let started = o.started;
            self.m.note_ended(s, started, ended);
        }
        Ok(())
    }

    async fn sweep(&mut self) -> Step {
        let now = self.tick();
        let mut expected: BTreeSet<(String, String, String)> = BTreeSet::new();
        // Per session: the latest end and the newest start of those expired.
        let mut ended: BTreeMap<usize, (At, At)> = BTreeMap::new();
        for c in self.m.conns.iter_mut() {
            if c.status == Status::Open && !alive(c.heartbeat, now) {
                c.status = Status::Ended(EndReason::Expired);
                expected.insert((
                    SESSIONS[c.session].to_owned(),
                    c.id.to_string(),
                    USERS[c.user].to_owned(),
                ));
                let end = c.heartbeat.plus(WINDOW_MS);
                let e = ended.entry(c.session).or_insert((end, c.started));
                *e = (e.0.max(end), e.1.max(c.started));
            }
        }
        for (s, (end, started)) in ended {
            self.m.note_ended(s, started, end);
        }
        let mut got = BTreeSet::new();
        for shard in self.store.keys().shards() {
            // Bounded: a case holds at most a few dozen connections.
            for _ in 0..100 {
                let sweep = self.store.sweep_shard(shard, 3).await.unwrap();
                for e in sweep.expired {
                    let fresh = got.insert((
                        e.session_id.to_string(),
                        e.connection_id.to_string(),
                        e.user_id.to_string(),
                    ));
                    ensure!(self, fresh, "the sweep expired {} twice", e.connection_id);
                }
                if !sweep.more {
                    break;
                }
            }
        }
        let names: Vec<String> = got
            .iter()
            .map(|(_, id, _)| self.conn_name(id.parse().unwrap()))
            .collect();
        self.count(format!(
            "sweep: {} expired",
            if got.is_empty() { "none" } else { "some" }
        ));
        self.note(format!("expired {names:?}"));
        ensure!(
            self,
            got == expected,
            "the sweep expired {got:?}, the model {expected:?}"
        );
        Ok(())
    }

    async fn hibernate(&mut self, s: usize, leader: Leader, long: bool, patch: Patch) -> Step {
        let term = self.term(leader);
        let life = if long { LONG_CLAIM_MS } else { SHORT_CLAIM_MS };
        let id = self.sessions[s].clone();
        let now = self.tick();
        let fenced = self.fenced(s, term);
        let before = if fenced {
            Some(self.snapshot().await)
        } else {
            None
        };
        let got = self
            .store
            .claim_hibernation(&id, Duration::from_millis(life as u64), term)
            .await
            .unwrap();
        self.count(match &got {
            ClaimOutcome::Claimed(_) => "claim: claimed".to_owned(),
            ClaimOutcome::Refused(r) => format!("claim: {}", r.as_str()),
            ClaimOutcome::Warned(_) => "claim: warned".to_owned(),
        });
        self.note(format!("claim of {} in term {term}: {got:?}", SESSIONS[s]));
        if let Some(before) = before {
            ensure!(
                self,
                got == ClaimOutcome::Refused(ClaimRefusal::Fenced),
                "a claim in replaced term {term} was not fenced: {got:?}"
            );
            return self.unchanged(before, "claim").await;
        }
        let expected = self.m.claim(s, now);
        let claim = match (&got, expected) {
            (ClaimOutcome::Claimed(claim), Ok(())) => claim.clone(),
            (ClaimOutcome::Refused(r), Err(e)) if *r == e => return Ok(()),
            _ => {
                return Err(self.fail(format!(
                    "claim of {}: expected {expected:?}, got {got:?}",
                    SESSIONS[s]
                )))
            }
        };
        let r = self.m.told[s].res.clone().expect("claimed a mirrored one");
        let seen = Claim {
            generation: Some(r.generation),
            uid: Some(r.uid.clone()),
            idle_timeout: idle_timeout(r.idle),
            reason: tracker_core::HibernationReason::Idle,
            max_session_duration: None,
            ended: vec![],
        };
        ensure!(
            self,
            claim == seen,
            "the claim saw {claim:?}, the store was told {seen:?}"
        );
        let told = &mut self.m.told[s];
        told.phase = Phase::Hibernating {
            term: term.0,
            lapses: now.plus(life),
        };
        // A new decision: a lost patch landing from now on is held to it.
        if let Some((_, until)) = told.lost_release {
            told.lost_release = (now.ms < until).then_some((now, until));
        }
        // The leader reads the resource and decides (as the hibernator does).
        let current = self.m.world[s].resource.clone();
        let decision = match &current {
            None => None,
            Some(c) if c.uid != r.uid => None,
            Some(c) if c.state == ResourceState::Hibernated => Some(false),
            Some(c) if c.state == ResourceState::Terminated => None,
            Some(c) => match (r.idle, c.idle()) {
                (_, None) => None,
                (Some(claimed), Some(current)) if current > claimed => None,
                _ => Some(true),
            },
        };
        match (decision, patch) {
            (None, _) => {
                self.note("the resource changed since: released");
                self.rollback(s, term, false).await.map(drop)
            }
            (Some(false), _) => {
                let c = current.unwrap();
                self.note("already hibernated");
                self.finish(s, term, &c.uid, c.generation).await
            }
            (Some(true), Patch::Lands) => {
                let c = self.patch_world(s, ResourceState::Hibernated);
                self.finish(s, term, &c.uid, c.generation).await
            }
            (Some(true), Patch::Refused) => self.rollback(s, term, false).await.map(drop),
            (Some(true), Patch::AppliedButError) => {
                // The leader's read shows the patch: recorded as landed.
                let c = self.patch_world(s, ResourceState::Hibernated);
                self.note("the answer was lost; the read shows it hibernated");
                self.finish(s, term, &c.uid, c.generation).await
            }
            (Some(true), Patch::TimedOut) => {
                // The leader's read does not show it (the resource is as it
                // read it): released as unsure; it may still land.
                let c = current.unwrap();
                self.note("the answer was lost; the read shows it running");
                let released = self.rollback(s, term, true).await?;
                self.m.in_flight.push(InFlight::Lost {
                    session: s,
                    uid: c.uid,
                    read_generation: c.generation,
                    released,
                });
                Ok(())
            }
            (Some(true), Patch::Unreadable) => Ok(()),
            (Some(true), Patch::Slow) => {
                let c = current.unwrap();
                self.m.in_flight.push(InFlight::Hibernation {
                    session: s,
                    term,
                    uid: c.uid,
                    read_generation: c.generation,
                });
                Ok(())
            }
        }
    }

    async fn land_patch(&mut self, pick: u8, forced: bool, seen: bool) -> Step {
        if self.m.in_flight.is_empty() {
            self.note("nothing in flight");
            return Ok(());
        }
        let i = usize::from(pick) % self.m.in_flight.len();
        self.land_at(i, forced, seen).await
    }

    /// The `i`-th action in flight lands (see [`Op::LandPatch`]).
    async fn land_at(&mut self, i: usize, forced: bool, seen: bool) -> Step {
        match self.m.in_flight.remove(i) {
            InFlight::Hibernation {
                session,
                term,
                uid,
                read_generation,
            } => {
                let applies = self.patch_applies(session, &uid, read_generation, forced);
                self.note(format!(
                    "the hibernation patch of term {term} on {} {}",
                    SESSIONS[session],
                    if applies { "applies" } else { "is refused" }
                ));
                if applies {
                    let c = self.patch_world(session, ResourceState::Hibernated);
                    self.finish(session, term, &c.uid, c.generation).await
                } else {
                    self.rollback(session, term, false).await.map(drop)
                }
            }
            InFlight::Lost {
                session,
                uid,
                read_generation,
                released,
            } => {
                // The API server applies a write within its request timeout
                // or never, so one that has not landed by then never does.
                let in_time = self.m.clock_ms - released.ms < LATE_LANDING_MS;
                let applies = in_time && self.patch_applies(session, &uid, read_generation, forced);
                let what = match (in_time, applies) {
                    (false, _) => "is dropped (its window is over)",
                    (true, true) => "applies",
                    (true, false) => "is refused",
                };
                self.count(format!("lost patch: {what}"));
                self.note(format!(
                    "the lost hibernation patch on {} {what}; only the watch tells",
                    SESSIONS[session]
                ));
                if !applies {
                    return Ok(());
                }
                self.patch_world(session, ResourceState::Hibernated);
                if seen {
                    let term = self.term(Leader::Current);
                    self.deliver(session, 0, term).await?;
                }
                Ok(())
            }
            InFlight::Wake {
                session,
                term,
                read,
            } => {
                self.note(format!(
                    "the wake of term {term} on {} acts on what it read",
                    SESSIONS[session]
                ));
                self.act_on_wake(session, term, read, Some(forced)).await
            }
        }
    }

    /// A session that may be claimed (mirrored running, quiet, exempt from
    /// nothing and without connections), the `session`-th of them; any if
    /// none is.
    fn claim_target(&self, session: u8) -> usize {
        let idle: Vec<usize> = (0..SESSIONS.len())
            .filter(|&i| {
                let t = &self.m.told[i];
                t.res
                    .as_ref()
                    .is_some_and(|r| r.state == ResourceState::Running && r.idle.is_some())
                    && t.phase == Phase::Quiet
                    && self.m.n_open(i) == 0
            })
            .collect();
        let s = usize::from(session);
        match idle.len() {
            0 => s % SESSIONS.len(),
            n => idle[s % n],
        }
    }

    /// See [`Op::LostPatch`]. Each turn is an ordinary step's code, so the
    /// model judges it as it judges those.
    async fn lost_patch(
        &mut self,
        s: usize,
        u: usize,
        woke_first: bool,
        close: bool,
        after_landing: bool,
        delay: u8,
    ) -> Step {
        if let Some(due) = self.m.due(s) {
            let wait = due.ms - self.m.clock_ms;
            if wait > 0 {
                let grains = (wait + GRAIN_MS - 1) / GRAIN_MS;
                self.note(format!("- the clock moves {grains} grains: due"));
                self.advance(grains);
            }
        }
        let flights = self.m.in_flight.len();
        let patch = if woke_first {
            Patch::Slow
        } else {
            Patch::TimedOut
        };
        self.hibernate(s, Leader::Current, true, patch).await?;
        if self.m.in_flight.len() == flights {
            self.count("lost patch path: no patch sent".to_owned());
            return Ok(());
        }
        self.check().await?;
        let ended_by_wake = if woke_first {
            let Some(InFlight::Hibernation {
                session,
                term,
                uid,
                read_generation,
            }) = self.m.in_flight.pop()
            else {
                unreachable!("a slow patch was just sent");
            };
            self.note("- a connection arrives while the patch is out");
            self.register(session, u, IdUse::Fresh, false).await?;
            self.check().await?;
            let woken = self.m.told[s].wake;
            if woken {
                let read = self.m.world[s].resource.clone();
                let current = self.term(Leader::Current);
                self.note("- the waker handles its wake");
                self.act_on_wake(s, current, read, None).await?;
                self.check().await?;
            }
            self.note("- the patch's answer is lost: released as unsure");
            let released = self.rollback(s, term, true).await?;
            self.m.in_flight.push(InFlight::Lost {
                session,
                uid,
                read_generation,
                released,
            });
            self.check().await?;
            woken
        } else {
            false
        };
        let lost = self.m.in_flight.len() - 1;
        if !after_landing {
            self.connect_since(s, u, close).await?;
        }
        self.note("- the lost patch lands");
        self.land_at(lost, false, false).await?;
        self.check().await?;
        if after_landing {
            self.connect_since(s, u, close).await?;
        }
        if delay > 0 {
            self.note(format!("- the clock moves {delay} grains"));
            self.advance(i64::from(delay));
        }
        self.note("- the mirror sees the newest event");
        self.woke = None;
        let term = self.term(Leader::Current);
        self.deliver(s, 0, term).await?;
        let past = i64::from(delay) * GRAIN_MS >= LATE_LANDING_MS;
        self.count(format!(
            "lost patch path: {} then mirrored {} the window -> {}",
            if ended_by_wake {
                "a wake ended the claim"
            } else {
                "released"
            },
            if past { "past" } else { "within" },
            self.woke.unwrap_or("no wake for a gone connection")
        ));
        Ok(())
    }

    /// A connection registers on `s` (and `close`s at once).
    async fn connect_since(&mut self, s: usize, u: usize, close: bool) -> Step {
        self.note("- a connection registers");
        let n = self.m.conns.len();
        self.register(s, u, IdUse::Fresh, false).await?;
        self.check().await?;
        if close && self.m.conns.len() > n {
            let c = self.m.conns[n].clone();
            self.note("- it closes");
            self.close_conn(c, false).await?;
            self.check().await?;
        }
        Ok(())
    }

    fn advance(&mut self, grains: i64) {
        let ms = grains * GRAIN_MS;
        self.clock.advance(Duration::from_millis(ms as u64));
        self.m.clock_ms += ms;
    }

    /// Whether a patch built on a read of `uid` at `read_generation` applies:
    /// the resource is unchanged since, or (`forced`, as without a version
    /// precondition) still the same resource and not terminated.
    fn patch_applies(&self, s: usize, uid: &str, read_generation: i64, forced: bool) -> bool {
        self.m.world[s].resource.as_ref().is_some_and(|c| {
            c.uid == uid
                && (c.generation == read_generation
                    || (forced && c.state != ResourceState::Terminated))
        })
    }

    async fn wake(&mut self, pick: u8, leader: Leader, late: bool) -> Step {
        let mut pending = Vec::new();
        for shard in self.store.keys().shards() {
            pending.extend(self.store.pending_wakes(shard, 100).await.unwrap());
        }
        self.count(format!(
            "wake: {} pending",
            if pending.is_empty() { "none" } else { "one" }
        ));
        if pending.is_empty() {
            self.note("no pending wake");
            return Ok(());
        }
        let id = pending[usize::from(pick) % pending.len()]
            .session_id
            .clone();
        let s = self.sessions.iter().position(|x| *x == id).unwrap();
        let term = self.term(leader);
        let read = self.m.world[s].resource.clone();
        if late {
            self.note(format!(
                "the waker of term {term} read {}: {read:?}",
                SESSIONS[s]
            ));
            self.m.in_flight.push(InFlight::Wake {
                session: s,
                term,
                read,
            });
            return Ok(());
        }
        self.act_on_wake(s, term, read, None).await
    }

    /// What the waker does with what it read; `landing`: it read a while ago
    /// (whether its patch applies without a version precondition).
    async fn act_on_wake(
        &mut self,
        s: usize,
        term: Term,
        read: Option<Resource>,
        landing: Option<bool>,
    ) -> Step {
        match read {
            None => {
                self.note(format!("{} is gone: forget", SESSIONS[s]));
                self.forget(s, term, None).await
            }
            Some(c) if c.state == ResourceState::Hibernated => {
                let applies = landing
                    .is_none_or(|forced| self.patch_applies(s, &c.uid, c.generation, forced));
                if !applies {
                    // A conflict: the wake stays pending for the next poll.
                    self.note(format!("the wake patch of {} is refused", SESSIONS[s]));
                    return Ok(());
                }
                let c = self.patch_world(s, ResourceState::Running);
                self.note(format!("{} patched running", SESSIONS[s]));
                self.ack(s, term, &c.uid, c.generation).await
            }
            Some(c) if c.state == ResourceState::Running => {
                self.note(format!("{} already running", SESSIONS[s]));
                self.ack(s, term, &c.uid, c.generation).await
            }
            Some(c) => {
                self.note(format!("{} terminated: mirror", SESSIONS[s]));
                self.mirror(s, term, &c).await
            }
        }
    }

    /// The hibernator's or waker's patch lands: a new generation.
    fn patch_world(&mut self, s: usize, state: ResourceState) -> Resource {
        let w = &mut self.m.world[s];
        let c = w.resource.as_mut().expect("patching an existing resource");
        c.state = state;
        c.generation += 1;
        let c = c.clone();
        w.events.push(Event::Upsert(c.clone()));
        c
    }

    fn edit_world(&mut self, s: usize, edit: Edit) {
        let w = &mut self.m.world[s];
        let event = match (edit, w.resource.as_mut()) {
            (Edit::Recreate(state, idle), _) => {
                if let Some(old) = w.resource.take() {
                    w.events.push(Event::Deleted(old.uid));
                }
                w.created += 1;
                let c = Resource {
                    uid: format!("{}-{}", SESSIONS[s], w.created),
                    generation: 1,
                    state,
                    idle_ms: IDLE_TIMEOUTS_MS[usize::from(idle) % IDLE_TIMEOUTS_MS.len()],
                    exempt: false,
                    created_ms: self.m.clock_ms,
                };
                w.resource = Some(c.clone());
                Event::Upsert(c)
            }
            (_, None) => return,
            (Edit::Delete, Some(_)) => Event::Deleted(w.resource.take().unwrap().uid),
            (Edit::State(state), Some(c)) => {
                c.state = state;
                c.generation += 1;
                Event::Upsert(c.clone())
            }
            (Edit::IdleTimeout(i), Some(c)) => {
                c.idle_ms = IDLE_TIMEOUTS_MS[usize::from(i) % IDLE_TIMEOUTS_MS.len()];
                c.generation += 1;
                Event::Upsert(c.clone())
            }
            (Edit::Exempt(exempt), Some(c)) => {
                c.exempt = exempt;
                Event::Upsert(c.clone())
            }
        };
        w.events.push(event);
    }

    async fn deliver(&mut self, s: usize, back: usize, term: Term) -> Step {
        let events = &self.m.world[s].events;
        if events.is_empty() {
            self.note("no event yet");
            return Ok(());
        }
        let event = events[events.len() - 1 - back % events.len()].clone();
        match event {
            Event::Upsert(c) => self.mirror(s, term, &c).await,
            Event::Deleted(uid) => self.forget(s, term, Some(&uid)).await,
        }
    }

    async fn finish(&mut self, s: usize, term: Term, uid: &str, gen: i64) -> Step {
        let now = self.tick();
        let fenced = self.fenced(s, term);
        let before = if fenced {
            Some(self.snapshot().await)
        } else {
            None
        };
        let got = self
            .store
            .finish_hibernation(&self.sessions[s], term, Some(uid), Some(gen))
            .await
            .unwrap();
        self.count(format!("finish: {got:?}"));
        self.note(format!(
            "finish {uid} generation {gen} in term {term}: {got:?}"
        ));
        if let Some(before) = before {
            ensure!(
                self,
                got == FinishOutcome::Fenced,
                "a finish in replaced term {term}: {got:?}"
            );
            return self.unchanged(before, "finish").await;
        }
        let expected = self.m.finish(s, term, uid, gen, now);
        ensure!(
            self,
            got == expected,
            "finish: expected {expected:?}, got {got:?}"
        );
        Ok(())
    }

    /// `unsure`: as the reaper releases a patch whose answer was lost (see
    /// the module doc for the window given). Returns the release's instant.
    async fn rollback(&mut self, s: usize, term: Term, unsure: bool) -> Result<At, TestCaseError> {
        let now = self.tick();
        let fenced = self.fenced(s, term);
        let before = if fenced {
            Some(self.snapshot().await)
        } else {
            None
        };
        let retry = Duration::from_millis(RETRY_MS as u64);
        let id = &self.sessions[s];
        let got = if unsure {
            let may_land = Duration::from_millis(LATE_LANDING_MS as u64 - 1);
            self.store
                .rollback_unsure_hibernation(id, term, retry, may_land)
                .await
        } else {
            self.store.rollback_hibernation(id, term, retry).await
        }
        .unwrap();
        let kind = if unsure {
            "unsure rollback"
        } else {
            "rollback"
        };
        self.count(format!("{kind}: {got:?}"));
        self.note(format!("{kind} in term {term}: {got:?}"));
        if let Some(before) = before {
            ensure!(
                self,
                got == Written::Fenced,
                "a rollback in replaced term {term}: {got:?}"
            );
            self.unchanged(before, "rollback").await?;
            return Ok(now);
        }
        let expected = self.m.rollback(s, term, now, unsure);
        ensure!(
            self,
            got == expected,
            "{kind}: expected {expected:?}, got {got:?}"
        );
        Ok(now)
    }

    async fn ack(&mut self, s: usize, term: Term, uid: &str, gen: i64) -> Step {
        let now = self.tick();
        let fenced = self.fenced(s, term);
        let before = if fenced {
            Some(self.snapshot().await)
        } else {
            None
        };
        let got = self
            .store
            .ack_wake(&self.sessions[s], term, Some(uid), Some(gen))
            .await
            .unwrap();
        self.count(format!("ack: {got:?}"));
        self.note(format!(
            "ack {uid} generation {gen} in term {term}: {got:?}"
        ));
        if let Some(before) = before {
            ensure!(
                self,
                got == Written::Fenced,
                "an ack in replaced term {term}: {got:?}"
            );
            return self.unchanged(before, "ack").await;
        }
        let expected = self.m.ack(s, uid, gen, now);
        ensure!(
            self,
            got == expected,
            "ack: expected {expected:?}, got {got:?}"
        );
        Ok(())
    }

    async fn mirror(&mut self, s: usize, term: Term, c: &Resource) -> Step {
        let now = self.tick();
        let fenced = self.fenced(s, term);
        let before = if fenced {
            Some(self.snapshot().await)
        } else {
            None
        };
        let got = self
            .store
            .mirror_session(&c.meta(&self.sessions[s], self.base_ms), term)
            .await
            .unwrap();
        self.count(format!("mirror: {got:?}"));
        self.note(format!(
            "mirror {} generation {} {:?} idle {:?} created at {} in term {term}: {got:?}",
            c.uid,
            c.generation,
            c.state,
            c.idle(),
            c.created_ms
        ));
        if let Some(before) = before {
            ensure!(
                self,
                got == Written::Fenced,
                "a mirror in replaced term {term}: {got:?}"
            );
            return self.unchanged(before, "mirror").await;
        }
        let Mirror {
            written: expected,
            replaced,
            woke,
        } = self.m.mirror(s, c, now);
        self.woke = woke;
        if let Some(why) = woke {
            self.count(format!(
                "mirror wake for a connection that may have ended: {why}"
            ));
            self.note(format!("the model: wake for {why}"));
        }
        ensure!(
            self,
            got == expected,
            "mirror: expected {expected:?}, got {got:?}"
        );
        if replaced {
            // A new resource under the name is a new session.
            self.m.idle_seen[s] = None;
        }
        Ok(())
    }

    async fn forget(&mut self, s: usize, term: Term, uid: Option<&str>) -> Step {
        self.tick();
        let fenced = self.fenced(s, term);
        let before = if fenced {
            Some(self.snapshot().await)
        } else {
            None
        };
        let got = self
            .store
            .forget_session(&self.sessions[s], term, uid)
            .await
            .unwrap();
        self.count(format!("forget: {got:?}"));
        self.note(format!("forget {uid:?} in term {term}: {got:?}"));
        if let Some(before) = before {
            ensure!(
                self,
                got == Written::Fenced,
                "a forget in replaced term {term}: {got:?}"
            );
            return self.unchanged(before, "forget").await;
        }
        let expected = self.m.forget(s, uid);
        ensure!(
            self,
            got == expected,
            "forget: expected {expected:?}, got {got:?}"
        );
        Ok(())
    }

    async fn new_leader(&mut self) -> Step {
        let term = self.store.begin_term().await.unwrap();
        self.note(format!("term {term}"));
        // Invariant 5 starts here: a term is above every earlier one.
        if let Some(newest) = self.m.terms.iter().max() {
            ensure!(
                self,
                term > *newest,
                "begin_term gave {term}, not above the earlier term {newest}"
            );
        }
        self.m.terms.push(term);
        for t in self.m.shard_term.iter_mut() {
            *t = (*t).max(term.0);
        }
        Ok(())
    }

    async fn data_loss(&mut self) {
        self.count("redis: data loss".into());
        self.flush().await;
        for c in self.m.conns.iter_mut() {
            c.status = Status::Lost;
        }
        self.m.ids.clear();
        for t in self.m.told.iter_mut() {
            *t = Told::default();
        }
        for t in self.m.shard_term.iter_mut() {
            *t = 0;
        }
        for seen in self.m.idle_seen.iter_mut() {
            *seen = None;
        }
    }

    /// The mirror lists every resource: each is mirrored as it is now, and a
    /// mirrored session without resource is forgotten.
    async fn relist(&mut self) -> Step {
        let term = self.term(Leader::Current);
        for s in 0..SESSIONS.len() {
            match self.m.world[s].resource.clone() {
                Some(c) => self.mirror(s, term, &c).await?,
                None if self.m.told[s].res.is_some() => self.forget(s, term, None).await?,
                None => {}
            }
        }
        // Invariant 1, on the resources: once the store has the newest news,
        // a hibernated session in use has a pending wake, and the store says
        // what the resource says.
        let wakes = self.pending_wakes().await;
        for (s, name) in SESSIONS.into_iter().enumerate() {
            let Some(c) = self.m.world[s].resource.clone() else {
                continue;
            };
            let now = self.tick();
            let live = self.m.live(s, now).len();
            let view = self.store.session(&self.sessions[s]).await.unwrap();
            let state = view.map(|v| v.state);
            let fits = match c.state {
                ResourceState::Terminated => state == Some(SessionState::Terminated),
                ResourceState::Hibernated if live > 0 => state == Some(SessionState::Waking),
                ResourceState::Hibernated => {
                    matches!(state, Some(SessionState::Hibernated | SessionState::Waking))
                }
                ResourceState::Running => matches!(
                    state,
                    Some(
                        SessionState::Running
                            | SessionState::Idle
                            | SessionState::Hibernating
                            | SessionState::Waking
                    )
                ),
            };
            ensure!(
                self,
                fits,
                "after a relist {} ({:?}, {live} live) shows {state:?}",
                name,
                c.state
            );
            if c.state == ResourceState::Hibernated && live > 0 {
                ensure!(
                    self,
                    wakes.contains(&self.sessions[s]),
                    "{} is hibernated and in use, and no wake is pending",
                    name
                );
            }
        }
        Ok(())
    }

    async fn pending_wakes(&self) -> BTreeSet<SessionId> {
        support::pending_wake_ids(&self.store)
            .await
            .into_iter()
            .collect()
    }

    // -- invariants

    /// After every step, against the store:
    /// 1. a session the store says is hibernated or hibernating has no live
    ///    connection without a pending wake, and a waking one has its wake
    ///    (the resource-level form is checked after each relist);
    /// 2. every ended connection is in the outbox exactly once, with its end
    ///    reason, and no live one is;
    /// 3. counters and indexes equal the model: connections, sessions by
    ///    state, live connections, pending wakes, due and known sessions;
    /// 4. a session's idle-since never goes back, but when a connection
    ///    arrives, a new resource takes the name, or the data is lost;
    /// 5. (at each write) a replaced leader's write changes nothing, and
    ///    terms only grow.
    async fn check(&mut self) -> Step {
        let wakes = self.pending_wakes().await;
        let model_wakes: BTreeSet<SessionId> = (0..SESSIONS.len())
            .filter(|&s| self.m.told[s].wake)
            .map(|s| self.sessions[s].clone())
            .collect();
        ensure!(
            self,
            wakes == model_wakes,
            "pending wakes {wakes:?}, the model {model_wakes:?}"
        );

        for (s, name) in SESSIONS.into_iter().enumerate() {
            let id = self.sessions[s].clone();
            let now = self.tick();
            let listed: BTreeSet<ConnectionId> = self
                .store
                .list_connections(&id)
                .await
                .unwrap()
                .into_iter()
                .map(|c| c.connection_id)
                .collect();
            let live = self.m.live(s, now);
            let model_live: BTreeSet<ConnectionId> = live.iter().map(|c| c.id).collect();
            let users: BTreeSet<usize> = live.iter().map(|c| c.user).collect();
            let (n_live, n_users) = (model_live.len(), users.len());
            ensure!(
                self,
                listed == model_live,
                "{} lists {listed:?}, the model {model_live:?}",
                name
            );

            let view = self.store.session(&id).await.unwrap();
            let known = self.m.known(s);
            ensure!(
                self,
                view.is_some() == known,
                "{} view {view:?}, the model knows it: {known}",
                name
            );
            let Some(view) = view else { continue };
            let state = self.m.state(s, n_live).unwrap_or(SessionState::Unknown);
            ensure!(
                self,
                view.state == state
                    && view.active_connections == n_live as u64
                    && view.distinct_users == n_users as u64,
                "{} shows {:?} with {} live of {} users, the model {state:?} with {n_live} of {n_users}",
                name,
                view.state,
                view.active_connections,
                view.distinct_users
            );
            let mirrored = self.m.told[s].res.is_some();
            ensure!(
                self,
                view.owner.is_some() == mirrored,
                "{} owner {:?}, mirrored: {mirrored}",
                name,
                view.owner
            );
            let due = self.m.due(s).is_some() && self.m.told[s].phase == Phase::Quiet;
            ensure!(
                self,
                view.hibernates_at.is_some() == due,
                "{} hibernates at {:?}, the model due: {due}",
                name,
                view.hibernates_at
            );
            // Invariant 1, on what the store knows.
            if matches!(
                view.state,
                SessionState::Hibernated | SessionState::Hibernating
            ) {
                ensure!(
                    self,
                    view.active_connections == 0 || wakes.contains(&id),
                    "{} is {:?} with {} live connections and no pending wake",
                    name,
                    view.state,
                    view.active_connections
                );
            }
            if view.state == SessionState::Waking {
                ensure!(
                    self,
                    wakes.contains(&id),
                    "{} is waking with no pending wake",
                    name
                );
            }
            // Invariant 4.
            if let Some(since) = view.idle_since {
                if let Some(before) = self.m.idle_seen[s] {
                    ensure!(
                        self,
                        since >= before,
                        "{} idle since {since}, earlier seen idle since {before}",
                        name
                    );
                }
                self.m.idle_seen[s] = Some(since);
            }
        }

        // Invariant 3: counters.
        let stats = self.store.stats().await.unwrap();
        let open: Vec<&Conn> = self
            .m
            .conns
            .iter()
            .filter(|c| c.status == Status::Open)
            .collect();
        let mut by_state: BTreeMap<SessionState, u64> =
            SessionState::ALL.into_iter().map(|s| (s, 0)).collect();
        let (mut with_conns, mut shared) = (0u64, 0u64);
        for s in 0..SESSIONS.len() {
            let n = self.m.n_open(s);
            if let Some(state) = self.m.state(s, n) {
                *by_state.get_mut(&state).unwrap() += 1;
            }
            let users: BTreeSet<usize> = self.m.open(s).map(|c| c.user).collect();
            with_conns += u64::from(n > 0);
            shared += u64::from(users.len() > 1);
        }
        let by_protocol: BTreeMap<Protocol, u64> = PROTOCOLS
            .iter()
            .map(|&p| {
                let n = open.iter().filter(|c| PROTOCOLS[c.user] == p).count();
                (p, n as u64)
            })
            .collect();
        ensure!(
            self,
            stats.total_connections == open.len() as u64
                && stats.sessions_with_connections == with_conns
                && stats.shared_sessions == shared
                && stats.sessions_by_state == by_state
                && stats.connections_by_protocol == by_protocol,
            "stats {stats:?}; the model: {} connections, {with_conns} sessions with some, \
             {shared} shared, {by_state:?}, {by_protocol:?}",
            open.len()
        );

        // Invariant 3: indexes.
        let now = self.tick();
        let mut due = BTreeSet::new();
        let mut known = BTreeSet::new();
        for shard in self.store.keys().shards() {
            due.extend(self.store.due_sessions(shard, 100).await.unwrap());
            known.extend(self.store.known_sessions(shard).await.unwrap());
        }
        let model_due: BTreeSet<SessionId> = (0..SESSIONS.len())
            .filter(|&s| self.m.due(s).is_some_and(|d| d <= now))
            .map(|s| self.sessions[s].clone())
            .collect();
        let model_known: BTreeSet<SessionId> = (0..SESSIONS.len())
            .filter(|&s| self.m.told[s].res.is_some())
            .map(|s| self.sessions[s].clone())
            .collect();
        ensure!(
            self,
            due == model_due,
            "due sessions {due:?}, the model {model_due:?}"
        );
        ensure!(
            self,
            known == model_known,
            "known sessions {known:?}, the model {model_known:?}"
        );

        // Invariant 2: the outbox.
        let entries = support::outbox(&self.store).await;
        let mut seen: HashMap<ConnectionId, EndReason> = HashMap::new();
        for e in &entries {
            let again = seen
                .insert(e.record.connection_id, e.record.end_reason)
                .is_some();
            ensure!(
                self,
                !again,
                "{} is in the outbox twice",
                self.conn_name(e.record.connection_id)
            );
        }
        let ended: HashMap<ConnectionId, EndReason> = self
            .m
            .conns
            .iter()
            .filter_map(|c| match c.status {
                Status::Ended(r) => Some((c.id, r)),
                _ => None,
            })
            .collect();
        ensure!(
            self,
            seen == ended,
            "the outbox holds {seen:?}, the model ended {ended:?}"
        );
        Ok(())
    }
}
