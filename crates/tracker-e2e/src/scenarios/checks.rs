//! The invariants, checked from what the fake Kubernetes API server recorded (every patch
//! with its receive time), what the clients observed ([`Registration`]s) and what PostgreSQL
//! holds. Pure functions over those records, so they are unit-tested here without processes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use super::load::Registration;
use crate::db::HistoryRow;
use crate::harness::StatePatch;

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
    /// Patches the fake refused (409 conflicts of the resourceVersion precondition, ...).
    pub refused_patches: usize,
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

/// Checks the session invariants. `wake_deadline`: how long after its answer a registration
/// that needs a wake may wait for the `running` patch.
pub fn check_sessions(
    registrations: &[Registration],
    patches: &[StatePatch],
    wake_deadline: Duration,
) -> SessionFigures {
    let mut f = SessionFigures::default();
    let mut by_session: BTreeMap<&str, Vec<&StatePatch>> = BTreeMap::new();
    for p in patches {
        if !p.landed() {
            f.refused_patches += 1;
            continue;
        }
        if p.field_manager.as_deref() != Some("tracker-reaper")
            || !p
                .content_type
                .as_deref()
                .is_some_and(|c| c.starts_with("application/merge-patch+json"))
        {
            f.malformed_patches += 1;
        }
        match p.state.as_str() {
            "hibernated" => f.hibernations += 1,
            "running" => f.wakes += 1,
            _ => {}
        }
        by_session.entry(&p.session).or_default().push(p);
    }
    for list in by_session.values_mut() {
        list.sort_by_key(|p| p.at);
    }
    let mut regs_by_session: HashMap<&str, Vec<&Registration>> = HashMap::new();
    for r in registrations.iter().filter(|r| r.connection_id.is_some()) {
        regs_by_session.entry(&r.session).or_default().push(r);
    }
    let none = Vec::new();

    // 1. No hibernation while in use.
    for (session, list) in &by_session {
        let regs = regs_by_session.get(session).unwrap_or(&none);
        for p in list.iter().filter(|p| p.state == "hibernated") {
            for r in regs {
                if r.answered_at <= p.at - IN_USE_MARGIN && r.live_until >= p.at {
                    f.hibernated_in_use.push(format!(
                        "{session}: hibernated at {} while connection {} ({}) was live from {} \
                         to at least {}",
                        p.at,
                        r.connection_id.unwrap_or_default(),
                        r.kind.as_str(),
                        r.answered_at,
                        r.live_until
                    ));
                }
            }
        }
    }

    // 2. Alternation: exactly one wake per hibernation.
    for (session, list) in &by_session {
        let mut prev = "running";
        for p in list {
            if p.state == prev {
                let what = format!("{session}: {} patch at {} follows another", p.state, p.at);
                match prev {
                    "running" => f.double_wakes.push(what),
                    _ => f.double_hibernations.push(what),
                }
            }
            prev = &p.state;
        }
    }

    // 3. Every registration that needs a wake is followed by one. What matters is the
    // Session in Kubernetes: the registration must not leave it hibernated. It needs a
    // `running` patch if the Session was hibernated when it got its answer, or if a
    // hibernation in flight landed just after (within IN_USE_MARGIN: a claim made before the
    // registration, patched after it). If the Session was running throughout, there is
    // nothing to wake: the claim it overlapped was rolled back (or its leader died before
    // patching), or the wake had already landed and was not yet acknowledged.
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
        let last = list.iter().rev().find(|p| p.at <= r.answered_at);
        let to_undo = match last {
            Some(p) if p.state == "hibernated" => Some(p.at),
            _ => list
                .iter()
                .find(|p| {
                    p.state == "hibernated"
                        && p.at > r.answered_at
                        && p.at <= r.answered_at + IN_USE_MARGIN
                })
                .map(|p| p.at),
        };
        let Some(hibernated_at) = to_undo else {
            continue;
        };
        if r.needs_wake() && hibernated_at >= r.sent_at {
            f.registrations_during_hibernation += 1;
        }
        let woken = list
            .iter()
            .any(|p| p.state == "running" && p.at > hibernated_at && p.at <= until);
        if !woken {
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

    // 4. Every wake was asked for.
    for (session, list) in &by_session {
        let regs = regs_by_session.get(session).unwrap_or(&none);
        let mut prev_wake: Option<DateTime<Utc>> = None;
        for p in list.iter().filter(|p| p.state == "running") {
            let from = prev_wake.map(|t| t - IN_USE_MARGIN);
            let asked = regs.iter().any(|r| {
                (r.needs_wake() || r.seen_hibernated_at.is_some())
                    && r.sent_at <= p.at
                    && from.is_none_or(|f| r.sent_at >= f)
            });
            if !asked {
                f.unexplained_wakes.push(format!(
                    "{session}: running patch at {} with no registration asking for it",
                    p.at
                ));
            }
            prev_wake = Some(p.at);
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
            "  hibernate patches landed: {}, wake patches landed: {}, refused patches: {}",
            self.hibernations, self.wakes, self.refused_patches
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
}
