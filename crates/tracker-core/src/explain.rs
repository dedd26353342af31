//! Why a session is awake or asleep, and when that changes: the facts one
//! script reads from the store ([`Facts`]) turned into reasons a human reads
//! ([`explain`]). Deciding is the store's and the reaper's; this module only
//! describes, and it is pure, so every reason is unit-tested.
//!
//! The same reasons go with the reaper's hibernation and wake events
//! ([`hibernation_reasons`], [`wake_reasons`]), so "why did it sleep?" can be
//! answered from the history too. Times in messages are UTC.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::domain::{rfc3339_ms, ResourceState, SessionView};
use crate::store::{HibernationReason, IdleSource, IdleTimeout};

/// What a reason is about; a fixed set, so clients can act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ReasonCode {
    /// Live connections keep it awake.
    LiveConnections,
    /// No live connection: it hibernates once its idle timeout is reached.
    Idle,
    /// Exempt by annotation (`stream.space/auto-hibernate: "false"`).
    Exempt,
    /// `spec.idleTimeout` is empty (or does not parse): no idle hibernation.
    NoIdleTimeout,
    /// No Session resource: never hibernated.
    UnknownSession,
    /// `spec.state: terminated`: never hibernated or woken.
    Terminated,
    /// The leader's startup guard holds hibernations back.
    Guard,
    /// The leader runs in dry run: it changes no Session.
    DryRun,
    Hibernated,
    /// The leader claimed it and is setting it hibernated.
    Hibernating,
    /// A connection arrived while it slept; a wake is pending.
    Waking,
    /// It hibernates at the end of its maximum session duration.
    MaxDuration,
    /// No leader reaper has reported recently: nothing is decided.
    NoLeader,
}

impl ReasonCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::LiveConnections => "live_connections",
            ReasonCode::Idle => "idle",
            ReasonCode::Exempt => "exempt",
            ReasonCode::NoIdleTimeout => "no_idle_timeout",
            ReasonCode::UnknownSession => "unknown_session",
            ReasonCode::Terminated => "terminated",
            ReasonCode::Guard => "guard",
            ReasonCode::DryRun => "dry_run",
            ReasonCode::Hibernated => "hibernated",
            ReasonCode::Hibernating => "hibernating",
            ReasonCode::Waking => "waking",
            ReasonCode::MaxDuration => "max_duration",
            ReasonCode::NoLeader => "no_leader",
        }
    }
}

/// One reason, for humans (`message`) and programs (`code`, `until`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Reason {
    pub code: ReasonCode,
    pub message: String,
    /// When the reason stops applying, where known.
    #[serde(with = "rfc3339_ms::option", skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
}

/// The answer of `GET /v1/sessions/{id}/explain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Explanation {
    pub session: SessionView,
    /// When the leader will hibernate it as things stand; null if it will not
    /// (connected, exempt, asleep, dry run, ...). May lie in the past while
    /// the leader has yet to act.
    #[serde(with = "rfc3339_ms::option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub will_hibernate_at: Option<DateTime<Utc>>,
    pub reasons: Vec<Reason>,
}

/// A live connection, as far as an explanation names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveConnection {
    pub user_id: String,
    pub protocol: String,
    pub last_heartbeat: DateTime<Utc>,
}

/// What the leader says holds back its decisions on the session's shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeaderFacts {
    /// No hibernation before this (the guard after a leader change or a data loss).
    pub guard_until: Option<DateTime<Utc>>,
    pub dry_run: bool,
}

/// Mirror phase of a session the leader is acting on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Hibernating,
    Waking,
}

/// Everything an explanation says, read in one consistent snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// What `GET /v1/sessions/{id}` answers.
    pub view: SessionView,
    /// `spec.state` as mirrored; `None` without a Session resource.
    pub resource_state: Option<ResourceState>,
    pub phase: Option<Phase>,
    /// `None` without a Session resource.
    pub idle_timeout: Option<IdleTimeout>,
    pub idle_source: IdleSource,
    /// No hibernation before (a retry after an attempt that did not land).
    pub not_before: Option<DateTime<Utc>>,
    /// A hibernation claim lapses then if its holder does not finish it.
    pub claim_lapses_at: Option<DateTime<Utc>>,
    pub max_duration: Option<Duration>,
    pub running_since: Option<DateTime<Utc>>,
    pub wake_requested_at: Option<DateTime<Utc>>,
    /// `None` if no leader has reported on the shard recently.
    pub leader: Option<LeaderFacts>,
    /// The newest live connections, newest first (a few at most).
    pub live: Vec<LiveConnection>,
    /// How long a connection stays live after its last heartbeat.
    pub window: Duration,
}

/// Why the session is as it is, and when the leader will hibernate it.
pub fn explain(facts: &Facts, now: DateTime<Utc>) -> Explanation {
    let mut reasons = Vec::new();
    let view = &facts.view;
    let live = view.active_connections;
    if live > 0 {
        reasons.push(live_reason(facts, now));
    }
    let Some(ks) = facts.resource_state else {
        reasons.push(reason(
            ReasonCode::UnknownSession,
            "unknown: no Session resource, never hibernated".into(),
            None,
        ));
        return Explanation {
            session: view.clone(),
            will_hibernate_at: None,
            reasons,
        };
    };
    match (ks, facts.phase) {
        (ResourceState::Terminated, _) => reasons.push(reason(
            ReasonCode::Terminated,
            "terminated: never hibernated or woken".into(),
            None,
        )),
        (_, Some(Phase::Waking)) => {
            let at = facts
                .wake_requested_at
                .map(|t| format!(" at {}", clock(t, now)))
                .unwrap_or_default();
            reasons.push(reason(
                ReasonCode::Waking,
                format!(
                    "waking: a connection arrived{at} while it slept; the leader sets it running"
                ),
                None,
            ));
        }
        (_, Some(Phase::Hibernating)) => reasons.push(reason(
            ReasonCode::Hibernating,
            "hibernating: the leader is setting it hibernated; a new connection wakes it".into(),
            facts.claim_lapses_at,
        )),
        (ResourceState::Hibernated, None) => reasons.push(reason(
            ReasonCode::Hibernated,
            "hibernated: a new connection wakes it".into(),
            None,
        )),
        (ResourceState::Running, None) => {}
    }
    let running = ks == ResourceState::Running && facts.phase.is_none();
    let mut planned = None;
    if running {
        let idle_at = idle_reason(facts, now, &mut reasons);
        let max_at = max_duration_at(facts);
        if let (Some(at), Some(max)) = (max_at, facts.max_duration) {
            let what = if at <= now { "reached" } else { "ends" };
            reasons.push(reason(
                ReasonCode::MaxDuration,
                format!(
                    "hibernates at {}: maximum session duration {} {what}, connected or not",
                    clock(at, now),
                    duration(max)
                ),
                Some(at),
            ));
        }
        planned = [idle_at, max_at].into_iter().flatten().min();
    }
    let leader = facts.leader;
    if let (true, Some(at), Some(gu)) = (running, planned, leader.and_then(|l| l.guard_until)) {
        if gu > now {
            reasons.push(reason(
                ReasonCode::Guard,
                format!(
                    "no hibernation until {}: guard after a leader change or a Redis data loss",
                    clock(gu, now)
                ),
                Some(gu),
            ));
            planned = Some(at.max(gu));
        }
    }
    match leader {
        Some(l) if l.dry_run => {
            let message = match planned {
                Some(at) => format!("dry run: would hibernate at {}", clock(at, now)),
                None => {
                    "dry run: the leader records what it would do and changes no Session".into()
                }
            };
            reasons.push(reason(ReasonCode::DryRun, message, None));
            planned = None;
        }
        Some(_) => {}
        None => {
            let acting = planned.is_some() || facts.phase.is_some();
            if acting && ks != ResourceState::Terminated {
                reasons.push(reason(
                    ReasonCode::NoLeader,
                    "no leader reaper has reported recently: nothing is hibernated or woken until one runs".into(),
                    None,
                ));
            }
        }
    }
    Explanation {
        session: view.clone(),
        will_hibernate_at: planned,
        reasons,
    }
}

/// The reasons recorded with a hibernation (or a dry run's "would
/// hibernate"), from the facts read right after the claim, which says why.
pub fn hibernation_reasons(
    facts: &Facts,
    now: DateTime<Utc>,
    why: HibernationReason,
    dry_run: bool,
) -> Vec<Reason> {
    let mut reasons = Vec::new();
    if why == HibernationReason::MaxDuration {
        let message = match (facts.running_since, facts.max_duration) {
            (Some(since), Some(max)) => format!(
                "running since {}: maximum session duration {} reached, connected or not",
                clock(since, now),
                duration(max)
            ),
            _ => "maximum session duration reached, connected or not".into(),
        };
        reasons.push(reason(ReasonCode::MaxDuration, message, None));
    } else {
        reasons.push(idle_hibernation_reason(facts, now));
    }
    if dry_run {
        reasons.push(reason(
            ReasonCode::DryRun,
            "dry run: recorded, the Session was not changed".into(),
            None,
        ));
    }
    reasons
}

fn idle_hibernation_reason(facts: &Facts, now: DateTime<Utc>) -> Reason {
    let view = &facts.view;
    let last = view
        .last_connection_at
        .map(|t| format!("last connection {}", clock(t, now)))
        .unwrap_or_else(|| "no connection since it was seen running".into());
    let message = match (view.idle_since, facts.idle_timeout) {
        (Some(since), Some(IdleTimeout::After(ito))) => format!(
            "idle since {} ({last}); idleTimeout {} {} reached at {}",
            clock(since, now),
            duration(ito),
            source(facts.idle_source),
            clock(idle_due(facts, since, ito), now),
        ),
        _ => format!("idle ({last}); idle timeout reached"),
    };
    reason(ReasonCode::Idle, message, None)
}

/// The reasons recorded with a wake.
pub fn wake_reasons(requested_at: DateTime<Utc>, now: DateTime<Utc>) -> Vec<Reason> {
    vec![reason(
        ReasonCode::Waking,
        format!(
            "a connection arrived at {} while it slept",
            clock(requested_at, now)
        ),
        None,
    )]
}

fn reason(code: ReasonCode, message: String, until: Option<DateTime<Utc>>) -> Reason {
    Reason {
        code,
        message,
        until,
    }
}

/// "2 live connections: alice over vnc, bob over websocket (2), last heartbeat 3 s ago".
fn live_reason(facts: &Facts, now: DateTime<Utc>) -> Reason {
    let n = facts.view.active_connections;
    let mut groups: Vec<(&str, &str, usize)> = Vec::new();
    for c in &facts.live {
        match groups
            .iter_mut()
            .find(|(u, p, _)| *u == c.user_id && *p == c.protocol)
        {
            Some(g) => g.2 += 1,
            None => groups.push((&c.user_id, &c.protocol, 1)),
        }
    }
    let mut who: Vec<String> = groups
        .iter()
        .map(|(u, p, k)| match k {
            1 => format!("{u} over {p}"),
            k => format!("{u} over {p} ({k})"),
        })
        .collect();
    if (facts.live.len() as u64) < n {
        who.push("and others".into());
    }
    let plural = if n == 1 { "" } else { "s" };
    let mut message = format!("{n} live connection{plural}");
    if !who.is_empty() {
        message.push_str(": ");
        message.push_str(&who.join(", "));
    }
    let newest = facts.live.iter().map(|c| c.last_heartbeat).max();
    if let Some(hb) = newest {
        let ago = (now - hb).num_seconds().max(0);
        message.push_str(&format!(", last heartbeat {ago} s ago"));
    }
    // Without another heartbeat, the last connection stops counting then.
    let until = newest.map(|hb| hb + chrono_duration(facts.window));
    reason(ReasonCode::LiveConnections, message, until)
}

/// Adds the idle or exemption reason of a running session; answers when it
/// hibernates for idleness, if it will.
fn idle_reason(
    facts: &Facts,
    now: DateTime<Utc>,
    reasons: &mut Vec<Reason>,
) -> Option<DateTime<Utc>> {
    let ito = match facts.idle_timeout? {
        IdleTimeout::Off => {
            let (code, message) = match facts.idle_source {
                IdleSource::Annotation => (
                    ReasonCode::Exempt,
                    "exempt by annotation stream.space/auto-hibernate: \"false\"; never hibernated for idleness",
                ),
                IdleSource::Empty => (
                    ReasonCode::NoIdleTimeout,
                    "no idle timeout: spec.idleTimeout is empty; never hibernated for idleness",
                ),
                IdleSource::Invalid => (
                    ReasonCode::NoIdleTimeout,
                    "spec.idleTimeout does not parse; never hibernated for idleness on a guess",
                ),
                _ => (
                    ReasonCode::Exempt,
                    "exempt by annotation or an empty spec.idleTimeout; never hibernated for idleness",
                ),
            };
            reasons.push(reason(code, message.into(), None));
            return None;
        }
        IdleTimeout::After(d) => d,
    };
    if facts.view.active_connections > 0 {
        return None;
    }
    let Some(since) = facts.view.idle_since else {
        reasons.push(reason(
            ReasonCode::Idle,
            format!(
                "idle; hibernates {} after it was last seen in use (idleTimeout {} {})",
                duration(ito),
                duration(ito),
                source(facts.idle_source)
            ),
            None,
        ));
        return None;
    };
    let at = facts
        .view
        .hibernates_at
        .unwrap_or_else(|| idle_due(facts, since, ito));
    let when = if at <= now {
        format!(
            "due since {}; the leader hibernates it at its next pass",
            clock(at, now)
        )
    } else {
        format!("hibernates at {}", clock(at, now))
    };
    let mut message = format!(
        "idle since {}, {when} (idleTimeout {} {})",
        clock(since, now),
        duration(ito),
        source(facts.idle_source)
    );
    if facts.not_before.is_some_and(|nb| nb >= at) {
        message.push_str("; held back after an earlier attempt did not land");
    }
    reasons.push(reason(ReasonCode::Idle, message, Some(at)));
    Some(at)
}

/// When the idle timeout is reached, never before a retry's delay.
fn idle_due(facts: &Facts, since: DateTime<Utc>, ito: Duration) -> DateTime<Utc> {
    let at = since + chrono_duration(ito);
    facts.not_before.map_or(at, |nb| nb.max(at))
}

fn max_duration_at(facts: &Facts) -> Option<DateTime<Utc>> {
    Some(facts.running_since? + chrono_duration(facts.max_duration?))
}

fn source(s: IdleSource) -> &'static str {
    match s {
        IdleSource::Spec => "from spec",
        IdleSource::Default => "by default",
        _ => "as mirrored",
    }
}

fn chrono_duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// A time of day, with the date when it is not today's (UTC).
fn clock(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let day = if t.date_naive() == now.date_naive() {
        String::new()
    } else {
        t.format("%Y-%m-%d ").to_string()
    };
    let time = if t.timestamp() % 60 == 0 {
        t.format("%H:%M")
    } else {
        t.format("%H:%M:%S")
    };
    format!("{day}{time} UTC")
}

/// "30m", "8h", "1h30m", "45s", as `spec.idleTimeout` writes them.
fn duration(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, sec) = (s / 3600, s % 3600 / 60, s % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if sec > 0 || out.is_empty() {
        out.push_str(&format!("{sec}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::SessionState;
    use chrono::TimeZone;

    fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, h, m, s).unwrap()
    }

    fn view(state: SessionState, live: u64) -> SessionView {
        SessionView {
            session_id: "s-1".parse().unwrap(),
            state,
            owner: Some("alice".into()),
            active_connections: live,
            distinct_users: live.min(1),
            last_connection_at: None,
            last_disconnect_at: None,
            idle_since: None,
            idle_timeout_seconds: None,
            hibernates_at: None,
        }
    }

    /// A running, idle session with a 30m idle timeout from its spec, idle
    /// since 10:02, and a leader that holds nothing back.
    fn idle() -> Facts {
        let mut v = view(SessionState::Idle, 0);
        v.idle_since = Some(at(10, 2, 0));
        v.idle_timeout_seconds = Some(1800);
        v.hibernates_at = Some(at(10, 32, 0));
        Facts {
            view: v,
            resource_state: Some(ResourceState::Running),
            phase: None,
            idle_timeout: Some(IdleTimeout::After(Duration::from_secs(1800))),
            idle_source: IdleSource::Spec,
            not_before: None,
            claim_lapses_at: None,
            max_duration: None,
            running_since: None,
            wake_requested_at: None,
            leader: Some(LeaderFacts::default()),
            live: Vec::new(),
            window: Duration::from_secs(60),
        }
    }

    fn connected(conns: &[(&str, &str, DateTime<Utc>)], live: u64) -> Facts {
        let mut f = idle();
        f.view = view(SessionState::Running, live);
        f.live = conns
            .iter()
            .map(|(u, p, hb)| LiveConnection {
                user_id: (*u).into(),
                protocol: (*p).into(),
                last_heartbeat: *hb,
            })
            .collect();
        f
    }

    fn codes(e: &Explanation) -> Vec<&'static str> {
        codes_of(&e.reasons)
    }

    fn codes_of(reasons: &[Reason]) -> Vec<&'static str> {
        reasons.iter().map(|r| r.code.as_str()).collect()
    }

    const NOW: (u32, u32, u32) = (10, 10, 0);

    fn now() -> DateTime<Utc> {
        at(NOW.0, NOW.1, NOW.2)
    }

    #[test]
    fn an_idle_session_hibernates_at_its_idle_timeout() {
        let e = explain(&idle(), now());
        assert_eq!(codes(&e), ["idle"]);
        assert_eq!(
            e.reasons[0].message,
            "idle since 10:02 UTC, hibernates at 10:32 UTC (idleTimeout 30m from spec)"
        );
        assert_eq!(e.reasons[0].until, Some(at(10, 32, 0)));
        assert_eq!(e.will_hibernate_at, Some(at(10, 32, 0)));

        let mut by_default = idle();
        by_default.idle_source = IdleSource::Default;
        by_default.view.hibernates_at = None;
        by_default.not_before = Some(at(10, 40, 30));
        let e = explain(&by_default, at(10, 50, 0));
        assert_eq!(
            e.reasons[0].message,
            "idle since 10:02 UTC, due since 10:40:30 UTC; the leader hibernates it at its next pass \
             (idleTimeout 30m by default); held back after an earlier attempt did not land"
        );
        assert_eq!(e.will_hibernate_at, Some(at(10, 40, 30)));
    }

    #[test]
    fn live_connections_are_named_grouped_and_bounded() {
        let f = connected(
            &[
                ("alice", "vnc", at(10, 9, 57)),
                ("bob", "websocket", at(10, 9, 50)),
                ("bob", "websocket", at(10, 9, 40)),
            ],
            7,
        );
        let e = explain(&f, now());
        assert_eq!(codes(&e), ["live_connections"]);
        assert_eq!(
            e.reasons[0].message,
            "7 live connections: alice over vnc, bob over websocket (2), and others, last heartbeat 3 s ago"
        );
        // Without another heartbeat the newest one stops counting a window later.
        assert_eq!(e.reasons[0].until, Some(at(10, 10, 57)));
        assert_eq!(e.will_hibernate_at, None);

        let one = connected(&[("alice", "vnc", at(10, 9, 57))], 1);
        assert_eq!(
            explain(&one, now()).reasons[0].message,
            "1 live connection: alice over vnc, last heartbeat 3 s ago"
        );
    }

    #[test]
    fn exemption_by_annotation_is_told_from_an_empty_idle_timeout() {
        let cases = [
            (IdleSource::Annotation, "exempt", "exempt by annotation"),
            (
                IdleSource::Empty,
                "no_idle_timeout",
                "no idle timeout: spec.idleTimeout is empty",
            ),
            (
                IdleSource::Invalid,
                "no_idle_timeout",
                "spec.idleTimeout does not parse",
            ),
            (
                IdleSource::Unknown,
                "exempt",
                "exempt by annotation or an empty",
            ),
        ];
        for (source, code, start) in cases {
            let mut f = idle();
            f.idle_timeout = Some(IdleTimeout::Off);
            f.idle_source = source;
            f.view.hibernates_at = None;
            let e = explain(&f, now());
            assert_eq!(codes(&e), [code], "{source:?}");
            assert!(
                e.reasons[0].message.starts_with(start),
                "{}",
                e.reasons[0].message
            );
            assert_eq!(e.will_hibernate_at, None);
        }
        // Connected and exempt: both are said.
        let mut f = connected(&[("alice", "vnc", at(10, 9, 57))], 1);
        f.idle_timeout = Some(IdleTimeout::Off);
        f.idle_source = IdleSource::Annotation;
        assert_eq!(codes(&explain(&f, now())), ["live_connections", "exempt"]);
    }

    #[test]
    fn the_guard_postpones_and_dry_run_cancels_the_hibernation() {
        let mut f = idle();
        f.leader = Some(LeaderFacts {
            guard_until: Some(at(10, 40, 0)),
            dry_run: false,
        });
        let e = explain(&f, now());
        assert_eq!(codes(&e), ["idle", "guard"]);
        assert_eq!(
            e.reasons[1].message,
            "no hibernation until 10:40 UTC: guard after a leader change or a Redis data loss"
        );
        assert_eq!(e.reasons[1].until, Some(at(10, 40, 0)));
        assert_eq!(e.will_hibernate_at, Some(at(10, 40, 0)));
        // A guard that is over says nothing.
        assert_eq!(codes(&explain(&f, at(10, 41, 0))), ["idle"]);

        f.leader = Some(LeaderFacts {
            guard_until: None,
            dry_run: true,
        });
        let e = explain(&f, now());
        assert_eq!(codes(&e), ["idle", "dry_run"]);
        assert_eq!(
            e.reasons[1].message,
            "dry run: would hibernate at 10:32 UTC"
        );
        assert_eq!(e.will_hibernate_at, None);

        f.leader = None;
        let e = explain(&f, now());
        assert_eq!(codes(&e), ["idle", "no_leader"]);
        assert_eq!(e.will_hibernate_at, Some(at(10, 32, 0)));
    }

    #[test]
    fn the_maximum_duration_hibernates_even_a_connected_session() {
        let mut f = connected(&[("alice", "vnc", at(10, 9, 57))], 1);
        f.max_duration = Some(Duration::from_secs(8 * 3600));
        f.running_since = Some(at(10, 0, 0));
        let e = explain(&f, now());
        assert_eq!(codes(&e), ["live_connections", "max_duration"]);
        assert_eq!(
            e.reasons[1].message,
            "hibernates at 18:00 UTC: maximum session duration 8h ends, connected or not"
        );
        assert_eq!(e.will_hibernate_at, Some(at(18, 0, 0)));
        // Idle: whichever comes first.
        let mut f = idle();
        f.max_duration = Some(Duration::from_secs(600));
        f.running_since = Some(at(10, 0, 0));
        assert_eq!(explain(&f, now()).will_hibernate_at, Some(at(10, 10, 0)));
    }

    #[test]
    fn sessions_the_leader_does_not_hibernate_say_why() {
        let mut f = idle();
        f.resource_state = None;
        f.idle_timeout = None;
        f.view = view(SessionState::Unknown, 0);
        let e = explain(&f, now());
        assert_eq!(codes(&e), ["unknown_session"]);
        assert_eq!(
            e.reasons[0].message,
            "unknown: no Session resource, never hibernated"
        );

        let mut f = idle();
        f.resource_state = Some(ResourceState::Terminated);
        assert_eq!(codes(&explain(&f, now())), ["terminated"]);
        assert_eq!(explain(&f, now()).will_hibernate_at, None);

        let mut f = idle();
        f.resource_state = Some(ResourceState::Hibernated);
        assert_eq!(codes(&explain(&f, now())), ["hibernated"]);

        let mut f = idle();
        f.phase = Some(Phase::Waking);
        f.wake_requested_at = Some(at(10, 9, 0));
        let e = explain(&f, now());
        assert_eq!(codes(&e), ["waking"]);
        assert!(
            e.reasons[0].message.contains("at 10:09 UTC"),
            "{}",
            e.reasons[0].message
        );

        let mut f = idle();
        f.phase = Some(Phase::Hibernating);
        f.claim_lapses_at = Some(at(10, 11, 0));
        let e = explain(&f, now());
        assert_eq!(codes(&e), ["hibernating"]);
        assert_eq!(e.reasons[0].until, Some(at(10, 11, 0)));
    }

    #[test]
    fn events_carry_the_reasons_of_a_hibernation() {
        let mut f = idle();
        f.view.last_connection_at = Some(at(9, 40, 0));
        let r = hibernation_reasons(&f, at(10, 32, 1), HibernationReason::Idle, false);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].code, ReasonCode::Idle);
        assert_eq!(
            r[0].message,
            "idle since 10:02 UTC (last connection 09:40 UTC); idleTimeout 30m from spec reached at 10:32 UTC"
        );
        let r = hibernation_reasons(&f, at(10, 32, 1), HibernationReason::Idle, true);
        assert_eq!(r[1].code, ReasonCode::DryRun);
        f.running_since = Some(at(2, 0, 0));
        f.max_duration = Some(Duration::from_secs(8 * 3600));
        let r = hibernation_reasons(&f, at(10, 0, 0), HibernationReason::MaxDuration, false);
        assert_eq!(codes_of(&r), ["max_duration"]);
        assert_eq!(
            r[0].message,
            "running since 02:00 UTC: maximum session duration 8h reached, connected or not"
        );
        let w = wake_reasons(at(10, 40, 5), at(10, 40, 6));
        assert_eq!(
            w[0].message,
            "a connection arrived at 10:40:05 UTC while it slept"
        );
    }

    #[test]
    fn times_and_durations_read_like_the_spec() {
        assert_eq!(duration(Duration::from_secs(1800)), "30m");
        assert_eq!(duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(duration(Duration::from_secs(45)), "45s");
        assert_eq!(duration(Duration::ZERO), "0s");
        assert_eq!(clock(at(9, 5, 3), at(10, 0, 0)), "09:05:03 UTC");
        let tomorrow = Utc.with_ymd_and_hms(2026, 12, 2, 1, 0, 0).unwrap();
        assert_eq!(clock(tomorrow, at(10, 0, 0)), "2026-12-02 01:00 UTC");
    }
}
