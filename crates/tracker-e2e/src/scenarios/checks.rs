//! The invariants, checked from what the fake Kubernetes API server recorded (every patch
//! with its receive time), what the clients observed ([`Registration`]s) and what PostgreSQL
//! holds. Pure functions over those records, so they are unit-tested here without processes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use super::load::Registration;
use crate::db::HistoryRow;
use crate::harness::{PublishedEvent, StatePatch};
use fake_kube::SessionChange;

/// How long before a hibernation patch a connection must have been proven live for the patch
/// to count as "hibernated while in use": a registration landing while a hibernation is
/// already in flight is allowed (it must lead to a wake instead).
pub const IN_USE_MARGIN: Duration = Duration::seconds(1);

/// What the hibernation and wake checks found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionFigures {
    /// Landed (2xx) `hibernated` patches.
    pub hibernations: usize,
    /// Landed (2xx) `running` patches.
    pub wakes: usize,
    /// Patches not answered 2xx (409 conflicts of the resourceVersion precondition, injected
    /// failures, answers the reaper gave up on).
    pub refused_patches: usize,
    /// Of those, answered 5xx or not at all: they may have landed; the landings say.
    pub ambiguous_patches: usize,
    /// Sessions re-created during the run (deleted and created again under their name).
    pub births: usize,
    /// Hibernations no decision on a Session in use made (born hibernated, or a patch sent
    /// before the connection landing late) that a wake undid in time.
    pub undone_late_hibernations: usize,
    /// Patches without field manager `tracker-reaper` or not a JSON merge patch.
    pub malformed_patches: usize,
    /// Registrations whose answer said `waking`.
    pub registrations_needing_wake: usize,
    /// Of those, how many landed while the hibernation was in flight (the `hibernated`
    /// patch they had to undo arrived after the registration was sent).
    pub registrations_during_hibernation: usize,
    /// Registrations made after the client saw the Session `hibernated`.
    pub registrations_on_hibernated: usize,
    // Violations.
    /// `hibernated` patches while a connection of the session was proven live for the whole
    /// [`IN_USE_MARGIN`] before.
    pub hibernated_in_use: Vec<String>,
    /// Registrations needing a wake with no landed `running` patch in time.
    pub missing_wakes: Vec<String>,
    /// Two landed `running` patches with no `hibernated` between them.
    pub double_wakes: Vec<String>,
    /// Two landed `hibernated` patches with no `running` between them.
    pub double_hibernations: Vec<String>,
    /// `running` patches no registration asked for.
    pub unexplained_wakes: Vec<String>,
}

impl SessionFigures {
    pub fn violations(&self) -> usize {
        self.hibernated_in_use.len()
            + self.missing_wakes.len()
            + self.double_wakes.len()
            + self.double_hibernations.len()
            + self.unexplained_wakes.len()
            + self.malformed_patches
    }
}

/// A `spec.state` the Session took, as the fake applied it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Landing {
    pub session: String,
    pub state: String,
    pub at: DateTime<Utc>,
    /// The Session was (re-)created with this state rather than patched to it.
    pub birth: bool,
}

/// The state changes of each Session from the fake's change log: what really landed, whatever
/// the writer was told (an applied-but-500 patch landed; a slow one landed when the fake
/// applied it, maybe after the reaper gave up). A patch that changes nothing is no change.
pub fn landings_from_changes(changes: &[SessionChange]) -> Vec<Landing> {
    let mut last: HashMap<(&str, &str), Option<&str>> = HashMap::new();
    let mut out = Vec::new();
    for c in changes {
        let key = (c.name.as_str(), c.uid.as_str());
        let state = c.state.as_deref();
        let birth = match c.event_type.as_str() {
            "ADDED" => true,
            "MODIFIED" if last.get(&key).copied().flatten() != state => false,
            _ => {
                last.insert(key, state);
                continue;
            }
        };
        last.insert(key, state);
        if let Some(state) = state {
            out.push(Landing {
                session: c.name.clone(),
                state: state.to_owned(),
                at: c.at,
                birth,
            });
        }
    }
    out
}

/// Landings read from the patches' answers alone (2xx landed), for records without a change
/// log; exact only when no fault hides what landed.
pub fn landings_from_patches(patches: &[StatePatch]) -> Vec<Landing> {
    patches
        .iter()
        .filter(|p| p.landed())
        .map(|p| Landing {
            session: p.session.clone(),
            state: p.state.clone(),
            at: p.at,
            birth: false,
        })
        .collect()
}

/// Checks the session invariants from the patches' answers alone; see [`check_landings`].
pub fn check_sessions(
    registrations: &[Registration],
    patches: &[StatePatch],
    wake_deadline: Duration,
) -> SessionFigures {
    check_landings(
        registrations,
        patches,
        &landings_from_patches(patches),
        wake_deadline,
    )
}

/// Checks the session invariants. `patches`: what the reaper sent and was answered;
/// `landings`: what the Sessions really became (see [`landings_from_changes`]);
/// `wake_deadline`: how long after its answer a registration that needs a wake may wait for
/// the `running` patch.
pub fn check_landings(
    registrations: &[Registration],
    patches: &[StatePatch],
    landings: &[Landing],
    wake_deadline: Duration,
) -> SessionFigures {
    let mut f = SessionFigures::default();
    let mut sent: BTreeMap<&str, Vec<&StatePatch>> = BTreeMap::new();
    for p in patches {
        if !p.landed() {
            f.refused_patches += 1;
            if p.status == 0 || p.status >= 500 {
                f.ambiguous_patches += 1;
            }
        }
        if p.field_manager.as_deref() != Some("tracker-reaper")
            || !p
                .content_type
                .as_deref()
                .is_some_and(|c| c.starts_with("application/merge-patch+json"))
        {
            f.malformed_patches += 1;
        }
        sent.entry(&p.session).or_default().push(p);
    }
    for list in sent.values_mut() {
        list.sort_by_key(|p| p.at);
    }
    let mut by_session: BTreeMap<&str, Vec<&Landing>> = BTreeMap::new();
    for l in landings {
        match (l.birth, l.state.as_str()) {
            (true, _) => f.births += 1,
            (false, "hibernated") => f.hibernations += 1,
            (false, "running") => f.wakes += 1,
            _ => {}
        }
        by_session.entry(&l.session).or_default().push(l);
    }
    for list in by_session.values_mut() {
        list.sort_by_key(|l| l.at);
    }
    // Births before the first registration are the scenario creating its Sessions.
    f.births = f.births.saturating_sub(
        by_session
            .values()
            .filter(|l| l.first().is_some_and(|l| l.birth))
            .count(),
    );
    let mut regs_by_session: HashMap<&str, Vec<&Registration>> = HashMap::new();
    for r in registrations.iter().filter(|r| r.connection_id.is_some()) {
        regs_by_session.entry(&r.session).or_default().push(r);
    }
    let none = Vec::new();
    let woken_after = |list: &[&Landing], from: DateTime<Utc>, until: DateTime<Utc>| {
        list.iter()
            .any(|l| l.state == "running" && l.at > from && l.at <= until)
    };

    // 1. No hibernation while in use. Two hibernations are no decision made on a Session in
    // use, so they must only be undone in time: a re-created Session born hibernated, and a
    // patch the reaper sent before the connection existed that the fault delayed until after
    // (the fake applies a slow write when it likes; the store must then learn it and wake).
    for (session, list) in &by_session {
        let regs = regs_by_session.get(session).unwrap_or(&none);
        let sent = sent.get(session).map_or(&[][..], |v| &v[..]);
        for l in list.iter().filter(|l| l.state == "hibernated") {
            let carried_by = sent
                .iter()
                .rev()
                .find(|p| p.state == "hibernated" && p.at <= l.at)
                .map(|p| p.at);
            for r in regs {
                if r.answered_at <= l.at - IN_USE_MARGIN && r.live_until >= l.at {
                    let not_decided_on_it =
                        l.birth || carried_by.is_some_and(|t| t < r.answered_at);
                    if not_decided_on_it && woken_after(list, l.at, l.at + wake_deadline) {
                        f.undone_late_hibernations += 1;
                        continue;
                    }
                    f.hibernated_in_use.push(format!(
                        "{session}: {} at {} while connection {} ({}) was live from {} \
                         to at least {}",
                        if l.birth {
                            "re-created hibernated"
                        } else {
                            "hibernated"
                        },
                        l.at,
                        r.connection_id.unwrap_or_default(),
                        r.kind.as_str(),
                        r.answered_at,
                        r.live_until
                    ));
                }
            }
        }
    }

    // 2. Alternation: exactly one wake per hibernation, among the patches the reaper was
    // told landed. A patch answered 5xx or not at all may have landed or not, and the reaper
    // rightly re-reads and may patch again (the landed state is what checks 1, 3 and 4
    // judge), so the sequence starts afresh after one, and after a re-creation.
    for (session, list) in &sent {
        let births: Vec<DateTime<Utc>> = by_session
            .get(session)
            .map(|l| l.iter().filter(|l| l.birth).map(|l| l.at).collect())
            .unwrap_or_default();
        let mut prev: Option<&str> = Some("running");
        let mut prev_at: Option<DateTime<Utc>> = None;
        for p in list {
            if p.status == 0 || p.status >= 500 {
                prev = None;
                continue;
            }
            if !p.landed() {
                continue;
            }
            if prev_at.is_some_and(|t| births.iter().any(|b| *b > t && *b <= p.at)) {
                prev = None;
            }
            if prev == Some(p.state.as_str()) {
                let what = format!("{session}: {} patch at {} follows another", p.state, p.at);
                match p.state.as_str() {
                    "running" => f.double_wakes.push(what),
                    _ => f.double_hibernations.push(what),
                }
            }
            prev = Some(&p.state);
            prev_at = Some(p.at);
        }
    }

    // 3. Every registration that needs a wake is followed by one. What matters is the
    // Session in Kubernetes: the registration must not leave it hibernated. It needs a
    // `running` patch if the Session was hibernated when it got its answer, or if a
    // hibernation in flight landed just after (within IN_USE_MARGIN: a claim made before the
    // registration, patched after it). If the Session was running throughout, there is
    // nothing to wake: the claim it overlapped was rolled back (or its leader died before
    // patching), or the wake had already landed and was not yet acknowledged. A Session
    // re-created running meanwhile is no longer hibernated: that counts as woken.
    for r in registrations.iter().filter(|r| r.connection_id.is_some()) {
        let list = by_session
            .get(r.session.as_str())
            .map_or(&[][..], |v| &v[..]);
        if r.seen_hibernated_at.is_some() {
            f.registrations_on_hibernated += 1;
        }
        if r.needs_wake() {
            f.registrations_needing_wake += 1;
        } else if r.seen_hibernated_at.is_none() {
            continue;
        }
        let until = r.answered_at + wake_deadline;
        // The hibernation this registration must undo, if any.
        let last = list.iter().rev().find(|l| l.at <= r.answered_at);
        let to_undo = match last {
            Some(l) if l.state == "hibernated" => Some(l.at),
            _ => list
                .iter()
                .find(|l| {
                    l.state == "hibernated"
                        && l.at > r.answered_at
                        && l.at <= r.answered_at + IN_USE_MARGIN
                })
                .map(|l| l.at),
        };
        let Some(hibernated_at) = to_undo else {
            continue;
        };
        if r.needs_wake() && hibernated_at >= r.sent_at {
            f.registrations_during_hibernation += 1;
        }
        if !woken_after(list, hibernated_at, until) {
            f.missing_wakes.push(format!(
                "{}: registration {} ({}, answered `{}` at {}, Session hibernated at {}) not \
                 followed by a wake by {}",
                r.session,
                r.connection_id.unwrap_or_default(),
                r.kind.as_str(),
                r.state,
                r.answered_at,
                hibernated_at,
                until
            ));
        }
    }

    // 4. Every wake was asked for: by a registration, or by a connection live when the
    // Session became hibernated without the reaper deciding it (see check 1).
    for (session, list) in &by_session {
        let regs = regs_by_session.get(session).unwrap_or(&none);
        let mut prev_wake: Option<DateTime<Utc>> = None;
        let mut prev: Option<&Landing> = None;
        for l in list.iter() {
            if l.state != "running" || l.birth {
                prev = Some(l);
                continue;
            }
            let from = prev_wake.map(|t| t - IN_USE_MARGIN);
            let asked = regs.iter().any(|r| {
                (r.needs_wake() || r.seen_hibernated_at.is_some())
                    && r.sent_at <= l.at
                    && from.is_none_or(|f| r.sent_at >= f)
            });
            let live_at_hibernation = prev.is_some_and(|h| {
                h.state == "hibernated"
                    && regs
                        .iter()
                        .any(|r| r.answered_at <= l.at && r.live_until >= h.at - IN_USE_MARGIN)
            });
            if !asked && !live_at_hibernation {
                f.unexplained_wakes.push(format!(
                    "{session}: running patch at {} with no registration asking for it",
                    l.at
                ));
            }
            prev_wake = Some(l.at);
            prev = Some(l);
        }
    }
    f
}

/// What the history check found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryFigures {
    /// Connections the clients know were registered (and have all ended by now).
    pub connections_ended: usize,
    /// Registrations without an answer: they may or may not exist.
    pub unknown_registrations: usize,
    pub history_rows: usize,
    pub closed_rows: usize,
    pub expired_rows: usize,
    /// Registered connections with no history row.
    pub lost: Vec<Uuid>,
    /// History rows of no known registration (beyond the unknown ones).
    pub unexpected: Vec<Uuid>,
    /// Rows whose `end_reason` contradicts how the client ended the connection.
    pub wrong_reason: Vec<String>,
    /// Rows whose session differs from the registration's.
    pub wrong_session: Vec<Uuid>,
    /// The same connection id registered twice (a server-generated id repeated).
    pub duplicate_ids: Vec<Uuid>,
}

impl HistoryFigures {
    pub fn violations(&self) -> usize {
        self.lost.len()
            + self
                .unexpected
                .len()
                .saturating_sub(self.unknown_registrations)
            + self.wrong_reason.len()
            + self.wrong_session.len()
            + self.duplicate_ids.len()
    }
}

/// Compares history rows with the registrations the clients made.
pub fn check_history(registrations: &[Registration], rows: &[HistoryRow]) -> HistoryFigures {
    let mut f = HistoryFigures {
        unknown_registrations: registrations
            .iter()
            .filter(|r| r.connection_id.is_none())
            .count(),
        history_rows: rows.len(),
        closed_rows: rows.iter().filter(|r| r.end_reason == "closed").count(),
        expired_rows: rows.iter().filter(|r| r.end_reason == "expired").count(),
        ..HistoryFigures::default()
    };
    let mut known: HashMap<Uuid, &Registration> = HashMap::new();
    for r in registrations {
        if let Some(id) = r.connection_id {
            if known.insert(id, r).is_some() {
                f.duplicate_ids.push(id);
            }
        }
    }
    f.connections_ended = known.len();
    let rows_by_id: HashMap<Uuid, &HistoryRow> =
        rows.iter().map(|r| (r.connection_id, r)).collect();
    for (id, reg) in &known {
        match rows_by_id.get(id) {
            None => f.lost.push(*id),
            Some(row) => {
                if !reg.ending.accepts(&row.end_reason) {
                    f.wrong_reason.push(format!(
                        "{id} ({}): history says {}, the client expected {:?}",
                        reg.kind.as_str(),
                        row.end_reason,
                        reg.ending
                    ));
                }
                if row.session_id != reg.session {
                    f.wrong_session.push(*id);
                }
            }
        }
    }
    let known_ids: HashSet<&Uuid> = known.keys().collect();
    f.unexpected = rows
        .iter()
        .map(|r| r.connection_id)
        .filter(|id| !known_ids.contains(id))
        .collect();
    f
}

/// Lists up to `max` items, then how many more.
pub(crate) fn some<T: fmt::Display>(items: &[T], max: usize) -> String {
    let mut s = String::new();
    for i in items.iter().take(max) {
        s.push_str("\n    ");
        s.push_str(&i.to_string());
    }
    if items.len() > max {
        s.push_str(&format!("\n    ... and {} more", items.len() - max));
    }
    s
}

impl fmt::Display for SessionFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "  hibernate patches landed: {}, wake patches landed: {}, refused patches: {} \
             ({} answered 5xx or not at all)",
            self.hibernations, self.wakes, self.refused_patches, self.ambiguous_patches
        )?;
        writeln!(
            f,
            "  sessions re-created: {}; late hibernations undone in time: {}",
            self.births, self.undone_late_hibernations
        )?;
        writeln!(
            f,
            "  registrations answered `waking`: {} ({} during a hibernation in flight); \
             made after seeing `hibernated`: {}",
            self.registrations_needing_wake,
            self.registrations_during_hibernation,
            self.registrations_on_hibernated
        )?;
        writeln!(
            f,
            "  hibernated while in use: {}{}",
            self.hibernated_in_use.len(),
            some(&self.hibernated_in_use, 5)
        )?;
        writeln!(
            f,
            "  missing wakes: {}{}",
            self.missing_wakes.len(),
            some(&self.missing_wakes, 5)
        )?;
        writeln!(
            f,
            "  double wakes: {}{}; double hibernations: {}{}",
            self.double_wakes.len(),
            some(&self.double_wakes, 5),
            self.double_hibernations.len(),
            some(&self.double_hibernations, 5)
        )?;
        writeln!(
            f,
            "  unexplained wakes: {}{}; malformed patches: {}",
            self.unexplained_wakes.len(),
            some(&self.unexplained_wakes, 5),
            self.malformed_patches
        )
    }
}

impl fmt::Display for HistoryFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "  connections ended: {} (+{} unanswered registrations); history rows: {} \
             ({} closed, {} expired)",
            self.connections_ended,
            self.unknown_registrations,
            self.history_rows,
            self.closed_rows,
            self.expired_rows
        )?;
        writeln!(
            f,
            "  lost: {}{}; unexpected rows: {}; duplicate ids: {}",
            self.lost.len(),
            some(&self.lost, 5),
            self.unexpected.len(),
            self.duplicate_ids.len()
        )?;
        writeln!(
            f,
            "  wrong end_reason: {}{}; wrong session: {}",
            self.wrong_reason.len(),
            some(&self.wrong_reason, 5),
            self.wrong_session.len()
        )
    }
}

/// What the NATS stream holds against what landed (races with `--nats`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFigures {
    pub hibernate_events: usize,
    pub wake_events: usize,
    /// `hibernated` and `running` landings of patches (not births: nobody
    /// announces that a Session was created).
    pub hibernate_landings: usize,
    pub wake_landings: usize,
    // Violations.
    /// Sessions with more events of a kind than landings of it: announced
    /// twice, or a change announced that never landed.
    pub doubled: Vec<String>,
    /// Event ids published more than once.
    pub duplicate_ids: Vec<String>,
    /// Sessions whose events came in another order than their landings
    /// (a wake announced before the hibernation it undid, say).
    pub out_of_order: Vec<String>,
    /// Sessions with fewer events of a kind than landings: a change that
    /// landed and was never announced.
    pub missing: Vec<String>,
    /// The same on Sessions re-created during the run: not a violation. A
    /// landing on the old resource that nobody recorded before the new one
    /// took the name is dropped with the old resource's state (the events
    /// name sessions, not resources, so the check cannot tell them apart).
    pub missing_recreated: Vec<String>,
}

impl EventFigures {
    pub fn violations(&self) -> usize {
        self.doubled.len() + self.duplicate_ids.len() + self.missing.len() + self.out_of_order.len()
    }
}

/// Compares, session by session, the hibernate and wake events published
/// with the patches that landed: each landing is announced once.
pub fn check_events(landings: &[Landing], events: &[PublishedEvent]) -> EventFigures {
    let mut f = EventFigures::default();
    // Per session, the kinds in order: of the landings, of the events.
    let mut landed: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut announced: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut births: HashMap<&str, usize> = HashMap::new();
    for l in landings {
        if l.birth {
            *births.entry(l.session.as_str()).or_default() += 1;
            continue;
        }
        let kind = match l.state.as_str() {
            "hibernated" => "hibernate",
            "running" => "wake",
            _ => continue,
        };
        landed.entry(l.session.as_str()).or_default().push(kind);
    }
    let mut ids = HashSet::new();
    for e in events {
        if !ids.insert(e.event_id.as_str()) {
            f.duplicate_ids.push(e.event_id.clone());
        }
        let kind = if e.subject.contains(".hibernate.") {
            "hibernate"
        } else if e.subject.contains(".wake.") {
            "wake"
        } else {
            continue;
        };
        announced
            .entry(e.session_id.as_str())
            .or_default()
            .push(kind);
    }
    let count = |kinds: &[&str], kind: &str| kinds.iter().filter(|k| **k == kind).count();
    let sessions: BTreeSet<&str> = landed.keys().chain(announced.keys()).copied().collect();
    for session in sessions {
        let l = landed.get(session).map(Vec::as_slice).unwrap_or_default();
        let a = announced
            .get(session)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let recreated = births.get(session).copied().unwrap_or(0) > 1;
        f.hibernate_landings += count(l, "hibernate");
        f.wake_landings += count(l, "wake");
        f.hibernate_events += count(a, "hibernate");
        f.wake_events += count(a, "wake");
        let mut doubled = false;
        for kind in ["hibernate", "wake"] {
            let (landed, announced) = (count(l, kind), count(a, kind));
            let line = format!("{session}: {landed} {kind} landings, {announced} events");
            if announced > landed {
                doubled = true;
                f.doubled.push(line);
            } else if announced < landed && recreated {
                f.missing_recreated.push(line);
            } else if announced < landed {
                f.missing.push(line);
            }
        }
        // Events follow their landings: in the same order, the latest
        // landings perhaps not announced yet.
        if !doubled && !recreated && !l.starts_with(a) {
            f.out_of_order
                .push(format!("{session}: landed {l:?}, announced {a:?}"));
        }
    }
    f
}

impl fmt::Display for EventFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "  NATS: {} hibernate events for {} landings, {} wake events for {} landings",
            self.hibernate_events, self.hibernate_landings, self.wake_events, self.wake_landings
        )?;
        writeln!(
            f,
            "  events missing: {}{}; doubled: {}{}; out of order: {}{}; duplicate ids: {}; \
             missing on re-created Sessions (not a violation): {}{}",
            self.missing.len(),
            some(&self.missing, 10),
            self.doubled.len(),
            some(&self.doubled, 10),
            self.out_of_order.len(),
            some(&self.out_of_order, 10),
            self.duplicate_ids.len(),
            self.missing_recreated.len(),
            some(&self.missing_recreated, 5)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::load::{Ending, Kind};
    use super::*;

    fn t(ms: i64) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp_millis(1_700_000_000_000 + ms).unwrap()
    }

    fn patch(session: &str, state: &str, at: i64) -> StatePatch {
        StatePatch {
            session: session.into(),
            state: state.into(),
            at: t(at),
            status: 200,
            field_manager: Some("tracker-reaper".into()),
            content_type: Some("application/merge-patch+json".into()),
        }
    }

    fn reg(session: &str, state: &str, sent: i64, answered: i64, live_until: i64) -> Registration {
        Registration {
            kind: Kind::HttpClose,
            session: session.into(),
            replica: 0,
            websocket: false,
            sent_at: t(sent),
            answered_at: t(answered),
            connection_id: Some(Uuid::new_v4()),
            state: state.into(),
            seen_hibernated_at: None,
            live_until: t(live_until),
            ending: Ending::Closed,
        }
    }

    const DEADLINE: Duration = Duration::seconds(5);

    #[test]
    fn a_clean_cycle_passes() {
        let regs = [
            reg("s", "running", 0, 10, 1000),
            reg("s", "waking", 5000, 5010, 6000),
        ];
        let patches = [patch("s", "hibernated", 3000), patch("s", "running", 5020)];
        let f = check_sessions(&regs, &patches, DEADLINE);
        assert_eq!(f.violations(), 0, "{f}");
        assert_eq!(
            (f.hibernations, f.wakes, f.registrations_needing_wake),
            (1, 1, 1)
        );
    }

    #[test]
    fn hibernating_a_session_in_use_is_caught_but_not_a_registration_in_flight() {
        let in_use = [reg("s", "running", 0, 10, 5000)];
        let f = check_sessions(&in_use, &[patch("s", "hibernated", 3000)], DEADLINE);
        assert_eq!(f.hibernated_in_use.len(), 1, "{f}");
        // Answered 200 ms before the patch: the claim may have been in flight.
        let in_flight = [reg("s", "waking", 2790, 2800, 5000)];
        let patches = [patch("s", "hibernated", 3000), patch("s", "running", 3050)];
        let f = check_sessions(&in_flight, &patches, DEADLINE);
        assert_eq!(f.violations(), 0, "{f}");
        assert_eq!(f.registrations_during_hibernation, 1);
    }

    #[test]
    fn missing_double_and_unexplained_wakes_are_caught() {
        let regs = [reg("s", "waking", 5000, 5010, 6000)];
        let f = check_sessions(&regs, &[patch("s", "hibernated", 3000)], DEADLINE);
        assert_eq!(f.missing_wakes.len(), 1, "{f}");
        let patches = [
            patch("s", "hibernated", 3000),
            patch("s", "running", 5020),
            patch("s", "running", 5040),
        ];
        let f = check_sessions(&regs, &patches, DEADLINE);
        assert_eq!(f.double_wakes.len(), 1, "{f}");
        let f = check_sessions(
            &[],
            &[patch("s", "hibernated", 3000), patch("s", "running", 4000)],
            DEADLINE,
        );
        assert_eq!(f.unexplained_wakes.len(), 1, "{f}");
        let f = check_sessions(
            &[],
            &[
                patch("s", "hibernated", 3000),
                patch("s", "hibernated", 4000),
            ],
            DEADLINE,
        );
        assert_eq!(f.double_hibernations.len(), 1, "{f}");
    }

    #[test]
    fn a_waking_answer_on_a_session_that_stayed_running_needs_no_patch() {
        // The claim it overlapped was never patched (rolled back, or its leader was killed).
        let regs = [reg("s", "waking", 5000, 5010, 6000)];
        let f = check_sessions(&regs, &[], DEADLINE);
        assert_eq!(f.violations(), 0, "{f}");
        // The wake (asked for by another registration) had landed but was not yet
        // acknowledged when it registered.
        let regs = [
            reg("s", "waking", 4900, 4910, 5500),
            reg("s", "waking", 5000, 5010, 6000),
        ];
        let patches = [patch("s", "hibernated", 3000), patch("s", "running", 4990)];
        let f = check_sessions(&regs, &patches, DEADLINE);
        assert_eq!(f.violations(), 0, "{f}");
        // A later cycle's hibernation (after the connection ended) is not this one's.
        let patches = [
            patch("s", "hibernated", 3000),
            patch("s", "running", 4990),
            patch("s", "hibernated", 7500),
        ];
        let f = check_sessions(&regs, &patches, DEADLINE);
        assert_eq!(f.violations(), 0, "{f}");
    }

    #[test]
    fn a_registration_seen_hibernated_and_answered_running_needs_the_session_woken() {
        let mut r = reg("s", "running", 5000, 5010, 6000);
        r.seen_hibernated_at = Some(t(4900));
        let f = check_sessions(
            std::slice::from_ref(&r),
            &[patch("s", "hibernated", 3000)],
            DEADLINE,
        );
        assert_eq!(f.missing_wakes.len(), 1, "{f}");
        // Someone else's wake landed just before the client's registration: fine.
        let patches = [patch("s", "hibernated", 3000), patch("s", "running", 4950)];
        let other = reg("s", "waking", 4900, 4910, 5500);
        let f = check_sessions(&[other, r], &patches, DEADLINE);
        assert_eq!(f.violations(), 0, "{f}");
    }

    #[test]
    fn a_late_wake_is_missing_and_refused_patches_do_not_count() {
        let regs = [reg("s", "waking", 5000, 5010, 6000)];
        let mut refused = patch("s", "running", 5020);
        refused.status = 409;
        let patches = [
            patch("s", "hibernated", 3000),
            refused,
            patch("s", "running", 11_000),
        ];
        let f = check_sessions(&regs, &patches, DEADLINE);
        assert_eq!(f.missing_wakes.len(), 1, "{f}");
        assert_eq!(f.refused_patches, 1);
    }

    fn change(name: &str, uid: &str, kind: &str, state: &str, at: i64) -> SessionChange {
        SessionChange {
            at: t(at),
            resource_version: 0,
            event_type: kind.into(),
            namespace: "ns".into(),
            name: name.into(),
            uid: uid.into(),
            state: Some(state.into()),
        }
    }

    #[test]
    fn landings_follow_the_stored_state_not_the_answers() {
        // Applied but answered 500, then a no-op re-patch after reading it back, then a
        // re-creation born hibernated.
        let changes = [
            change("s", "u1", "ADDED", "running", 0),
            change("s", "u1", "MODIFIED", "hibernated", 3000),
            change("s", "u1", "MODIFIED", "hibernated", 3100),
            change("s", "u1", "DELETED", "hibernated", 4000),
            change("s", "u2", "ADDED", "hibernated", 4000),
        ];
        let l = landings_from_changes(&changes);
        let seen: Vec<(&str, bool)> = l.iter().map(|l| (l.state.as_str(), l.birth)).collect();
        assert_eq!(
            seen,
            [
                ("running", true),
                ("hibernated", false),
                ("hibernated", true)
            ]
        );
        let mut failed = patch("s", "hibernated", 2990);
        failed.status = 500;
        let patches = [failed, patch("s", "hibernated", 3090)];
        let f = check_landings(&[], &patches, &l, DEADLINE);
        assert_eq!(f.violations(), 0, "{f}");
        assert_eq!((f.hibernations, f.births, f.ambiguous_patches), (1, 1, 1));
    }

    #[test]
    fn a_late_or_reborn_hibernation_in_use_must_be_undone_in_time() {
        // Sent at 1000 (slow), the connection registered at 2000, landed at 4500.
        let regs = [reg("s", "running", 1990, 2000, 9000)];
        let patches = [patch("s", "hibernated", 1000), patch("s", "running", 4700)];
        let landings = |wake_at: i64| {
            vec![
                Landing {
                    session: "s".into(),
                    state: "hibernated".into(),
                    at: t(4500),
                    birth: false,
                },
                Landing {
                    session: "s".into(),
                    state: "running".into(),
                    at: t(wake_at),
                    birth: false,
                },
            ]
        };
        let f = check_landings(&regs, &patches, &landings(4700), DEADLINE);
        assert_eq!(f.violations(), 0, "{f}");
        assert_eq!(f.undone_late_hibernations, 1);
        let f = check_landings(&regs, &patches, &landings(12_000), DEADLINE);
        assert_eq!(f.hibernated_in_use.len(), 1, "{f}");
        // Sent while the connection was already live: a violation even if undone.
        let patches = [patch("s", "hibernated", 4400), patch("s", "running", 4700)];
        let f = check_landings(&regs, &patches, &landings(4700), DEADLINE);
        assert_eq!(f.hibernated_in_use.len(), 1, "{f}");
    }

    #[test]
    fn history_finds_lost_unexpected_and_wrong_reasons() {
        let a = reg("s", "running", 0, 1, 2);
        let mut b = reg("s", "running", 0, 1, 2);
        b.ending = Ending::Expired;
        let row = |r: &Registration, reason: &str| HistoryRow {
            connection_id: r.connection_id.unwrap(),
            session_id: r.session.clone(),
            end_reason: reason.into(),
        };
        let stranger = HistoryRow {
            connection_id: Uuid::new_v4(),
            session_id: "s".into(),
            end_reason: "closed".into(),
        };
        let f = check_history(
            &[a.clone(), b.clone()],
            &[row(&a, "closed"), row(&b, "expired")],
        );
        assert_eq!(f.violations(), 0, "{f}");
        let f = check_history(&[a.clone(), b.clone()], &[row(&a, "expired"), stranger]);
        assert_eq!(f.lost, vec![b.connection_id.unwrap()]);
        assert_eq!(f.unexpected.len(), 1);
        assert_eq!(f.wrong_reason.len(), 1);
        assert_eq!(f.violations(), 3);
    }

    #[test]
    fn events_are_counted_against_landings_session_by_session() {
        let landing = |session: &str, state: &str, birth| Landing {
            session: session.into(),
            state: state.into(),
            at: t(0),
            birth,
        };
        let event = |session: &str, kind: &str, id: &str| PublishedEvent {
            subject: format!("streamspace.session.{kind}.kubernetes"),
            event_id: id.into(),
            session_id: session.into(),
        };
        let landings = [
            landing("a", "hibernated", false),
            landing("a", "running", false),
            landing("b", "hibernated", true),
            landing("b", "running", false),
        ];
        let exact = [
            event("a", "hibernate", "1"),
            event("a", "wake", "2"),
            event("b", "wake", "3"),
        ];
        let f = check_events(&landings, &exact);
        assert_eq!(f.violations(), 0, "{f}");
        assert_eq!((f.hibernate_landings, f.wake_landings), (1, 2));
        // a's wake missing; b's birth announced as a hibernation; id 3 twice.
        let wrong = [
            event("a", "hibernate", "1"),
            event("b", "hibernate", "3"),
            event("b", "wake", "3"),
        ];
        let f = check_events(&landings, &wrong);
        assert_eq!(f.missing.len(), 1, "{f}");
        assert_eq!(f.doubled.len(), 1, "{f}");
        assert_eq!(f.duplicate_ids, ["3"]);
        // Once a was re-created, its missing wake is not held against it.
        let mut recreated = landings.to_vec();
        recreated.extend([landing("a", "running", true), landing("a", "running", true)]);
        let f = check_events(&recreated, &wrong);
        assert!(f.missing.is_empty(), "{f}");
        assert_eq!(f.missing_recreated.len(), 1, "{f}");
        // a's wake announced before its hibernation.
        let swapped = [
            event("a", "wake", "2"),
            event("a", "hibernate", "1"),
            event("b", "wake", "3"),
        ];
        let f = check_events(&landings, &swapped);
        assert_eq!(f.out_of_order.len(), 1, "{f}");
        assert_eq!(f.violations(), 1, "{f}");
    }
}
