//! Turning script replies into values. Every reply has a fixed shape stated in
//! its script's header; anything else is a bug (or a foreign script under our
//! keys) and becomes [`Error::Reply`], never a panic.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use crate::domain::{
    millis_to_utc, ConnectionView, HistoryRecord, SessionId, SessionView, UserAgent,
};
use crate::error::{Error, Result};
use crate::explain::Facts;
use crate::scripts::Op;

/// Fields of one connection: id, session, user, protocol, ip, ua, connected, heartbeat.
pub(crate) const CONN_FIELDS: usize = 8;
/// Fields of one session view (see `session_view` in common.lua).
pub(crate) const VIEW_FIELDS: usize = 11;

pub(crate) fn bad_reply(op: &Op, reply: &[impl std::fmt::Debug]) -> Error {
    Error::Reply {
        script: op.name,
        detail: format!("{reply:?}"),
    }
}

/// Scripts answer yes/no questions with 1 or 0: here, and nowhere else, is
/// what that means.
pub(crate) fn flag(n: i64) -> bool {
    n == 1
}

/// A yes/no answer inside a reply of strings.
pub(crate) fn flag_text(s: &str) -> bool {
    s.parse().is_ok_and(flag)
}

pub(crate) fn connection(op: &Op, f: &[String], window_ms: i64) -> Result<ConnectionView> {
    let bad = || bad_reply(op, f);
    let [cid, sid, uid, proto, ip, ua, connected, hb] = f else {
        return Err(bad());
    };
    let hb = parse_ms(hb).ok_or_else(bad)?;
    Ok(ConnectionView {
        connection_id: cid.parse().map_err(|_| bad())?,
        session_id: sid.parse().map_err(|_| bad())?,
        user_id: uid.parse().map_err(|_| bad())?,
        protocol: proto.parse().map_err(|_| bad())?,
        client_ip: non_empty(ip)
            .map(str::parse)
            .transpose()
            .map_err(|_| bad())?,
        user_agent: non_empty(ua).map(UserAgent::truncated),
        connected_at: millis_to_utc(parse_ms(connected).ok_or_else(bad)?),
        last_heartbeat: millis_to_utc(hb),
        expires_at: millis_to_utc(hb + window_ms),
    })
}

/// A session view and the uid of its resource; `None` if the tracker knows
/// nothing of the session.
pub(crate) fn view(
    op: &Op,
    session: &SessionId,
    f: &[String],
) -> Result<Option<(SessionView, Option<String>)>> {
    let bad = || bad_reply(op, f);
    let [exists, state, owner, live, users, lc, ld, idle, ito, due, uid] = f else {
        return Err(bad());
    };
    if !flag_text(exists) {
        return Ok(None);
    }
    let time = |s: &String| {
        non_empty(s)
            .map(|s| parse_ms(s).map(millis_to_utc).ok_or_else(bad))
            .transpose()
    };
    let view = SessionView {
        session_id: session.clone(),
        state: state.parse().map_err(|_| bad())?,
        owner: non_empty(owner).map(str::to_owned),
        active_connections: live.parse().map_err(|_| bad())?,
        distinct_users: users.parse().map_err(|_| bad())?,
        last_connection_at: time(lc)?,
        last_disconnect_at: time(ld)?,
        idle_since: time(idle)?,
        idle_timeout_seconds: non_empty(ito)
            .map(|s| parse_ms(s).map(|ms| (ms / 1000) as u64).ok_or_else(bad))
            .transpose()?,
        hibernates_at: time(due)?,
    };
    Ok(Some((view, non_empty(uid).map(str::to_owned))))
}

/// Facts explain.lua adds after the session view.
pub(crate) const EXPLAIN_FIELDS: usize = 15;

/// An explanation's facts and the Redis clock's now; `None` if the tracker
/// knows nothing of the session.
pub(crate) fn explain_facts(
    op: &Op,
    session: &SessionId,
    f: &[String],
    window: std::time::Duration,
) -> Result<Option<(Facts, DateTime<Utc>)>> {
    use crate::explain::{LeaderFacts, LiveConnection, Phase};
    use crate::store::{IdleSource, IdleTimeout};
    use std::time::Duration;

    let bad = || bad_reply(op, f);
    if f.len() < VIEW_FIELDS + EXPLAIN_FIELDS || (f.len() - VIEW_FIELDS - EXPLAIN_FIELDS) % 3 != 0 {
        return Err(bad());
    }
    let Some((view, _)) = view(op, session, &f[..VIEW_FIELDS])? else {
        return Ok(None);
    };
    let [now, ks, ph, ito, ios, nb, hx, md, rs, wake, leader, gu, dr, _newest, res] =
        &f[VIEW_FIELDS..VIEW_FIELDS + EXPLAIN_FIELDS]
    else {
        return Err(bad());
    };
    let time = |s: &String| {
        non_empty(s)
            .map(|s| parse_ms(s).map(millis_to_utc).ok_or_else(bad))
            .transpose()
    };
    let millis = |s: &String| {
        non_empty(s)
            .map(|s| {
                parse_ms(s)
                    .and_then(|ms| u64::try_from(ms).ok())
                    .map(Duration::from_millis)
                    .ok_or_else(bad)
            })
            .transpose()
    };
    let mirrored = res == "1";
    let idle_timeout = match (mirrored, ito.as_str()) {
        (false, _) => None,
        (true, "off" | "") => Some(IdleTimeout::Off),
        (true, _) => millis(ito)?.map(IdleTimeout::After),
    };
    let mut live = Vec::new();
    for t in f[VIEW_FIELDS + EXPLAIN_FIELDS..].chunks(3) {
        live.push(LiveConnection {
            user_id: t[0].clone(),
            protocol: t[1].clone(),
            last_heartbeat: millis_to_utc(parse_ms(&t[2]).ok_or_else(bad)?),
        });
    }
    let facts = Facts {
        view,
        resource_state: if mirrored { ks.parse().ok() } else { None },
        phase: match ph.as_str() {
            "h" => Some(Phase::Hibernating),
            "w" => Some(Phase::Waking),
            _ => None,
        },
        idle_timeout,
        idle_source: IdleSource::from_code(ios),
        not_before: time(nb)?,
        claim_lapses_at: time(hx)?,
        max_duration: millis(md)?,
        running_since: time(rs)?,
        wake_requested_at: time(wake)?,
        leader: (leader == "1")
            .then(|| {
                Ok::<_, Error>(LeaderFacts {
                    guard_until: time(gu)?,
                    dry_run: dr == "1",
                })
            })
            .transpose()?,
        live,
        window,
    };
    let now = millis_to_utc(parse_ms(now).ok_or_else(bad)?);
    Ok(Some((facts, now)))
}

/// The fields of an outbox entry, as `finish_conn` in common.lua writes them.
const HISTORY_FIELDS: [&str; 11] = ["c", "s", "u", "p", "ip", "ua", "ca", "da", "hb", "r", "su"];

/// A field name as a `'static` string, for [`crate::store::MalformedEntry::field`].
pub(crate) fn history_field(name: &str) -> &'static str {
    HISTORY_FIELDS
        .iter()
        .find(|f| **f == name)
        .copied()
        .unwrap_or("(unknown field)")
}

/// A history record from an outbox entry's fields, or the first field that
/// is missing or does not parse.
pub(crate) fn history(fields: &[(String, String)]) -> Result<HistoryRecord, &'static str> {
    let map: HashMap<&str, &str> = fields
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    fn field<T: std::str::FromStr>(
        map: &HashMap<&str, &str>,
        name: &'static str,
    ) -> Result<T, &'static str> {
        map.get(name).and_then(|s| s.parse().ok()).ok_or(name)
    }
    let time = |name: &'static str| {
        map.get(name)
            .and_then(|s| parse_ms(s))
            .map(millis_to_utc)
            .ok_or(name)
    };
    Ok(HistoryRecord {
        connection_id: field(&map, "c")?,
        session_id: field(&map, "s")?,
        user_id: field(&map, "u")?,
        protocol: field(&map, "p")?,
        client_ip: map
            .get("ip")
            .copied()
            .and_then(non_empty)
            .map(str::parse)
            .transpose()
            .map_err(|_| "ip")?,
        user_agent: map
            .get("ua")
            .copied()
            .and_then(non_empty)
            .map(UserAgent::truncated),
        connected_at: time("ca")?,
        disconnected_at: time("da")?,
        last_heartbeat_at: time("hb")?,
        end_reason: field(&map, "r")?,
        // Absent in entries written before it existed.
        session_uid: map
            .get("su")
            .copied()
            .and_then(non_empty)
            .map(str::to_owned),
    })
}

/// Milliseconds as Redis prints them: integers, or doubles for sorted-set scores.
pub(crate) fn parse_ms(s: &str) -> Option<i64> {
    s.parse::<i64>().ok().or_else(|| {
        s.parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map(|f| f as i64)
    })
}

/// The hibernation warning field of a session read (`clients_warning` in
/// meta.lua): the deadline clients are to be warned of, `None` for ''.
pub(crate) fn warning(op: &Op, reply: &[String], field: &str) -> Result<Option<DateTime<Utc>>> {
    non_empty(field)
        .map(|ms| {
            parse_ms(ms)
                .map(millis_to_utc)
                .ok_or_else(|| bad_reply(op, reply))
        })
        .transpose()
}

/// A queued session event from its stream entry; `None` if a field is
/// missing or unparseable.
pub(crate) fn queued_event(
    entry_id: &str,
    fields: &[(String, String)],
) -> Option<crate::store::QueuedEvent> {
    let get = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    Some(crate::store::QueuedEvent {
        entry_id: entry_id.to_owned(),
        event_id: get("e").filter(|e| !e.is_empty())?.to_owned(),
        kind: crate::store::EventKind::parse(get("k")?)?,
        session_id: get("s")?.parse().ok()?,
        user_id: get("u")?.to_owned(),
        platform: get("p")?.to_owned(),
        reason: get("r")?.to_owned(),
        timestamp: crate::domain::millis_to_utc(parse_ms(get("t")?)?),
        completes: get("x")? == "1",
    })
}

pub(crate) fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scripts::Scripts;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn one_means_yes_and_anything_else_no() {
        assert!(flag(1));
        assert!(!flag(0) && !flag(-1) && !flag(2));
        assert!(flag_text("1"));
        assert!(!flag_text("0") && !flag_text("") && !flag_text("yes") && !flag_text("01x"));
    }

    #[test]
    fn milliseconds_come_as_integers_or_scores() {
        assert_eq!(parse_ms("1700000000123"), Some(1_700_000_000_123));
        assert_eq!(parse_ms("1700000000123.0"), Some(1_700_000_000_123));
        assert_eq!(parse_ms("1.7e12"), Some(1_700_000_000_000));
        assert_eq!(parse_ms("inf"), None);
        assert_eq!(parse_ms("nan"), None);
        assert_eq!(parse_ms(""), None);
    }

    #[test]
    fn a_connection_reply_is_parsed_or_refused_whole() {
        let op = &Scripts::load().list_connections;
        let good = strings(&[
            "6f1c1d38-9f5e-4a43-8d5e-1f0c2f7a9b10",
            "s-1",
            "alice",
            "vnc",
            "10.0.0.1",
            "ua",
            "1000",
            "2000",
        ]);
        let c = connection(op, &good, 60_000).expect("parses");
        assert_eq!(c.expires_at, millis_to_utc(62_000));
        assert_eq!(c.user_agent.as_ref().map(UserAgent::as_str), Some("ua"));
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] = "\u{0}?".into();
            if i == 5 {
                // A user agent is informational: kept as stored.
                let c = connection(op, &bad, 0).expect("parses");
                assert_eq!(c.user_agent.as_ref().map(UserAgent::as_str), Some("\u{0}?"));
                continue;
            }
            assert!(
                matches!(connection(op, &bad, 0), Err(Error::Reply { .. })),
                "field {i}"
            );
        }
        assert!(connection(op, &good[..7], 0).is_err());
    }

    #[test]
    fn a_view_reply_says_whether_the_session_is_known() {
        let op = &Scripts::load().session_view;
        let sid: SessionId = "s-1".parse().expect("sid");
        let unknown = strings(&["0", "unknown", "", "0", "0", "", "", "", "", "", ""]);
        assert_eq!(view(op, &sid, &unknown).expect("parses"), None);
        let known = strings(&[
            "1", "idle", "alice", "0", "0", "1000", "2000", "2000", "60000", "62000", "uid-1",
        ]);
        let (v, uid) = view(op, &sid, &known).expect("parses").expect("known");
        assert_eq!(v.idle_timeout_seconds, Some(60));
        assert_eq!(v.hibernates_at, Some(millis_to_utc(62_000)));
        assert_eq!(uid.as_deref(), Some("uid-1"));
        let mut bad = known.clone();
        bad[1] = "asleep".into();
        assert!(view(op, &sid, &bad).is_err());
        assert!(view(op, &sid, &known[..10]).is_err());
    }

    #[test]
    fn an_outbox_entry_missing_a_field_names_it() {
        let flat = strings(&[
            "c",
            "6f1c1d38-9f5e-4a43-8d5e-1f0c2f7a9b10",
            "s",
            "s-1",
            "u",
            "alice",
            "p",
            "http",
            "ip",
            "",
            "ua",
            "",
            "ca",
            "1",
            "da",
            "3",
            "hb",
            "2",
            "r",
            "closed",
        ]);
        let fields: Vec<(String, String)> = flat
            .chunks(2)
            .map(|p| (p[0].clone(), p[1].clone()))
            .collect();
        let rec = history(&fields).expect("parses");
        assert_eq!(rec.client_ip, None);
        for k in ["c", "s", "u", "p", "ca", "da", "hb", "r"] {
            let without: Vec<_> = fields.iter().filter(|(f, _)| f != k).cloned().collect();
            assert_eq!(history(&without), Err(history_field(k)), "{k}");
        }
        let mut bad_ip = fields.clone();
        bad_ip[4].1 = "not-an-ip".into();
        assert_eq!(history(&bad_ip), Err("ip"));
    }
}
