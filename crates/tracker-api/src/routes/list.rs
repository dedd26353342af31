//! Listings for operators: the sessions the tracker knows, page by page, and
//! the newest session events across sessions. Both are for `service` and
//! `admin` only, both are bounded, and neither scans the keyspace.
//!
//! Sessions come from the per-shard set of sessions mirrored from a Session
//! resource (or declared), the index the reaper's mirror maintains. A page
//! walks the shards in order; the cursor names the shard to go on with and
//! the last id returned from it, so a page is stable while sessions come and
//! go (one added behind the cursor shows on the next full walk). Sessions
//! that have connections but no resource are not in that index and are not
//! listed: `/v1/stats` counts them.

use std::cmp::Ordering;

use axum::extract::{RawQuery, State};
use axum::Json;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use tracker_core::keys::ShardId;
use tracker_core::{SessionId, SessionView};
use utoipa::{IntoParams, ToSchema};

use crate::access::Principal;
use crate::error::Backend;
use crate::error::{ApiError, ErrorBody};
use crate::extract::form_pairs;
use crate::history::{pg_error, EventRow, History};
use crate::openapi::{HistoryBacked, NeedsPrivilege, RedisBacked};
use crate::routes::sessions::{history_query, HistoryQuery};
use crate::state::AppState;

/// Sessions per page unless `limit` says otherwise.
const DEFAULT_PAGE: usize = 100;
/// Most sessions one page may hold.
const MAX_PAGE: usize = 500;
/// Most shards one page reads: an almost empty deployment with many shards
/// answers a short page with a cursor instead of one long request.
const MAX_SHARDS_PER_PAGE: u16 = 64;
/// Session views read from Redis at once while building a page.
const VIEW_CONCURRENCY: usize = 16;

/// Query of `GET /v1/sessions`.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SessionsQuery {
    /// Sessions per page, 1 to 500 (default 100).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page; absent or empty for the first.
    /// A position past the last shard is an empty last page.
    #[param(
        pattern = r"^([0-9]{1,4}:([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?)?)?$",
        max_length = 258
    )]
    pub cursor: Option<String>,
}

/// A page of sessions.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionPage {
    /// Ordered by shard, then by id within a shard.
    pub sessions: Vec<SessionView>,
    /// Pass it as `cursor` for the next page; `null` once every shard was read.
    pub next_cursor: Option<String>,
}

/// Where a page starts: a shard, and the last id already returned from it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cursor {
    shard: u16,
    after: Option<SessionId>,
}

impl Cursor {
    /// A shard at or past the shard count is a position after the end: valid, and
    /// its page is empty (the walk stops there).
    fn parse(raw: &str) -> Result<Self, ApiError> {
        let bad = || ApiError::invalid("cursor", "must be a next_cursor of an earlier page");
        // Session ids never hold ':' (they are Kubernetes object names).
        let (shard, after) = raw.split_once(':').ok_or_else(bad)?;
        let shard = shard.parse::<u16>().map_err(|_| bad())?;
        let after = match after {
            "" => None,
            id => Some(id.parse::<SessionId>().map_err(|_| bad())?),
        };
        Ok(Self { shard, after })
    }

    fn render(&self) -> String {
        match &self.after {
            Some(id) => format!("{}:{id}", self.shard),
            None => format!("{}:", self.shard),
        }
    }
}

/// Takes up to `room` ids of one shard's members that come after `after`,
/// in id order; says whether some were left for a later page.
fn take_from_shard(
    mut members: Vec<SessionId>,
    after: Option<&SessionId>,
    room: usize,
) -> (Vec<SessionId>, bool) {
    members.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
    members.dedup();
    let mut fresh: Vec<SessionId> = members
        .into_iter()
        .filter(|id| after.is_none_or(|a| id.as_str().cmp(a.as_str()) == Ordering::Greater))
        .collect();
    let more = fresh.len() > room;
    fresh.truncate(room);
    (fresh, more)
}

fn sessions_query(raw: Option<&str>) -> Result<(usize, Cursor), ApiError> {
    let mut limit = DEFAULT_PAGE;
    let mut cursor = Cursor {
        shard: 0,
        after: None,
    };
    for (k, v) in form_pairs(raw.unwrap_or_default()) {
        match k.as_str() {
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "limit",
                            format!("must be an integer from 1 to {MAX_PAGE}"),
                        )
                    })?;
            }
            // An empty cursor is the first page, as an absent one.
            "cursor" if v.is_empty() => {}
            "cursor" => cursor = Cursor::parse(&v)?,
            _ => {}
        }
    }
    Ok((limit, cursor))
}

#[utoipa::path(
    get,
    path = "/v1/sessions",
    tag = "sessions",
    params(SessionsQuery),
    responses(
        (status = 200, description = "A page of the sessions mirrored from Session resources, with their state and counters", body = SessionPage),
        (status = 400, description = "Invalid limit or cursor", body = ErrorBody),
        NeedsPrivilege, RedisBacked,
    ),
    security(("bearer" = []))
)]
pub async fn sessions(
    State(state): State<AppState>,
    principal: Principal,
    RawQuery(query): RawQuery,
) -> Result<Json<SessionPage>, ApiError> {
    principal.require_privileged()?;
    let shards = state.store.keys().shard_count();
    let (limit, mut cursor) = sessions_query(query.as_deref())?;
    let mut ids = Vec::with_capacity(limit);
    let mut read = 0;
    let next_cursor = loop {
        if cursor.shard >= shards {
            break None;
        }
        if ids.len() == limit || read == MAX_SHARDS_PER_PAGE {
            break Some(cursor.render());
        }
        let members = state.store.known_sessions(ShardId(cursor.shard)).await?;
        read += 1;
        let (taken, more) = take_from_shard(members, cursor.after.as_ref(), limit - ids.len());
        if more {
            let last = taken.last().cloned();
            ids.extend(taken);
            cursor.after = last;
            break Some(cursor.render());
        }
        ids.extend(taken);
        cursor = Cursor {
            shard: cursor.shard + 1,
            after: None,
        };
    };
    let store = &state.store;
    let views: Vec<Option<SessionView>> = futures::stream::iter(ids)
        .map(|id| async move { store.session(&id).await })
        .buffered(VIEW_CONCURRENCY)
        .try_collect()
        .await?;
    Ok(Json(SessionPage {
        // A session forgotten since its shard was read is left out.
        sessions: views.into_iter().flatten().collect(),
        next_cursor,
    }))
}

/// The newest session events.
#[derive(Debug, Serialize, ToSchema)]
pub struct RecentEvents {
    /// Newest first.
    pub events: Vec<EventRow>,
}

#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "sessions",
    params(HistoryQuery),
    responses(
        (status = 200, description = "Hibernations, wakes and other session events of every session, newest first", body = RecentEvents),
        (status = 400, description = "Invalid query", body = ErrorBody),
        NeedsPrivilege, HistoryBacked,
    ),
    security(("bearer" = []))
)]
pub async fn events(
    State(state): State<AppState>,
    principal: Principal,
    RawQuery(query): RawQuery,
) -> Result<Json<RecentEvents>, ApiError> {
    principal.require_privileged()?;
    let (limit, before) = history_query(query.as_deref())?;
    let history = state.require_history()?;
    recent_events(history, limit, before).await.map(Json)
}

/// Reads the newest events through the `session_events_time` index.
async fn recent_events(
    history: &History,
    limit: i64,
    before: Option<DateTime<Utc>>,
) -> Result<RecentEvents, ApiError> {
    let query = sqlx::query_as::<_, EventRow>(
        "SELECT event_id, session_id, namespace, event_type, reason, occurred_at, details \
         FROM session_events \
         WHERE ($1::timestamptz IS NULL OR occurred_at < $1) \
         ORDER BY occurred_at DESC, event_id DESC \
         LIMIT $2",
    )
    .bind(before)
    .bind(limit)
    .fetch_all(&history.pool);
    match tokio::time::timeout(history.timeout, query).await {
        Ok(Ok(events)) => Ok(RecentEvents { events }),
        Ok(Err(e)) => Err(pg_error(e)),
        Err(_) => Err(ApiError::Unavailable {
            backend: Backend::Postgres,
            detail: format!("no answer within {:?}", history.timeout),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> Vec<SessionId> {
        names.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn a_shard_is_taken_in_id_order_after_the_cursor() {
        let members = ids(&["c", "a", "d", "b"]);
        assert_eq!(
            take_from_shard(members.clone(), None, 10),
            (ids(&["a", "b", "c", "d"]), false)
        );
        assert_eq!(
            take_from_shard(members.clone(), None, 2),
            (ids(&["a", "b"]), true)
        );
        let after = "b".parse().unwrap();
        assert_eq!(
            take_from_shard(members.clone(), Some(&after), 2),
            (ids(&["c", "d"]), false)
        );
        let last = "d".parse().unwrap();
        assert_eq!(take_from_shard(members, Some(&last), 2), (vec![], false));
    }

    #[test]
    fn cursors_round_trip_and_bad_ones_name_the_field() {
        for c in [
            Cursor {
                shard: 3,
                after: None,
            },
            Cursor {
                shard: 0,
                after: Some("s-1.a".parse().unwrap()),
            },
        ] {
            assert_eq!(Cursor::parse(&c.render()).unwrap(), c);
        }
        for bad in ["", "3", "x:", "-1:", "70000:", "1:Not_A_Name", "1:a:b"] {
            match Cursor::parse(bad) {
                Err(ApiError::InvalidRequest { field, .. }) => assert_eq!(field, "cursor", "{bad}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn page_size_defaults_and_limits() {
        assert_eq!(sessions_query(None).unwrap().0, DEFAULT_PAGE);
        assert_eq!(sessions_query(Some("limit=7")).unwrap().0, 7);
        for q in ["limit=0", "limit=501", "limit=x"] {
            assert!(sessions_query(Some(q)).is_err(), "{q}");
        }
    }

    #[test]
    fn an_empty_cursor_is_the_first_page_and_one_past_the_end_is_valid() {
        let first = Cursor {
            shard: 0,
            after: None,
        };
        assert_eq!(sessions_query(Some("cursor=")).unwrap().1, first);
        assert_eq!(Cursor::parse("9999:").unwrap().shard, 9999);
    }
}
