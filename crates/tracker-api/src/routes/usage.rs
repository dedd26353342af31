//! `GET /v1/usage`: connected time, connections and peak concurrency per
//! user or per session over a time range, from the archived history.
//!
//! The SQL is `usage.sql` beside this file (scripts/bench-usage.sh runs the
//! same file): whole UTC days come from the daily rollup the reaper keeps,
//! the rest from `connection_history` (see migrations/0005_usage.sql).

use axum::extract::{RawQuery, State};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tracker_core::domain::rfc3339_ms;
use tracker_core::UserId;
use utoipa::{IntoParams, ToSchema};

use crate::access::{Principal, Role};
use crate::error::{ApiError, ErrorBody};
use crate::extract::form_pairs;
use crate::openapi::HistoryBacked;
use crate::state::AppState;

/// The query, run as one prepared statement.
pub const USAGE_SQL: &str = include_str!("usage.sql");

/// Set for the query's transaction. A plan for the actual range (not the
/// generic plan of a cached statement, which sorts a month's 300,000 rollup
/// rows instead of hashing them: twice the time); no JIT (the planner cannot
/// tell how many days the range holds, prices the per-day calls high and
/// would compile for seconds a query that runs in a fraction of one); and
/// the memory to aggregate a month of rollup rows without spilling.
pub const USAGE_SETTINGS: [&str; 3] = [
    "SET LOCAL plan_cache_mode = force_custom_plan",
    "SET LOCAL jit = off",
    "SET LOCAL work_mem = '64MB'",
];

/// The longest range one request may ask for.
pub const MAX_RANGE_DAYS: i64 = 366;

/// What a request may group by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum GroupBy {
    User,
    Session,
}

impl GroupBy {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::User => "user",
            GroupBy::Session => "session",
        }
    }
}

/// Query of the usage route (parsed by hand so each error names its field).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// Start of the range (RFC 3339), included.
    #[param(value_type = String, format = DateTime)]
    pub from: String,
    /// End of the range (RFC 3339), excluded; at most 366 days after `from`.
    #[param(value_type = String, format = DateTime)]
    pub to: String,
    /// `user` (default) or `session`.
    #[param(value_type = Option<GroupBy>, inline)]
    pub group_by: Option<String>,
    /// Only this user's connections. A plain user may only name itself (the default for it).
    #[param(value_type = Option<String>)]
    pub user_id: Option<String>,
}

/// A parsed, valid usage request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRequest {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub group_by: GroupBy,
    pub user_id: Option<UserId>,
}

fn time(field: &str, value: &str) -> Result<DateTime<Utc>, ApiError> {
    // An unencoded '+' of an offset arrives as a space.
    DateTime::parse_from_rfc3339(&value.replace(' ', "+"))
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| ApiError::invalid(field, "must be an RFC 3339 time"))
}

/// Parses and checks the query string.
pub fn parse_query(raw: Option<&str>) -> Result<UsageRequest, ApiError> {
    let (mut from, mut to, mut group_by, mut user_id) = (None, None, GroupBy::User, None);
    for (k, v) in form_pairs(raw.unwrap_or_default()) {
        match k.as_str() {
            "from" => from = Some(time("from", &v)?),
            "to" => to = Some(time("to", &v)?),
            "group_by" => {
                group_by = match v.as_str() {
                    "user" => GroupBy::User,
                    "session" => GroupBy::Session,
                    _ => return Err(ApiError::invalid("group_by", "must be user or session")),
                }
            }
            "user_id" => {
                let id = v.parse::<UserId>().map_err(|e| {
                    ApiError::invalid("user_id", format!("is not a valid user id: {e}"))
                })?;
                user_id = Some(id);
            }
            _ => {}
        }
    }
    let from = from.ok_or_else(|| ApiError::invalid("from", "is required"))?;
    let to = to.ok_or_else(|| ApiError::invalid("to", "is required"))?;
    if to < from {
        return Err(ApiError::invalid("to", "must not be before from"));
    }
    if to - from > chrono::Duration::days(MAX_RANGE_DAYS) {
        return Err(ApiError::invalid(
            "to",
            format!("must be at most {MAX_RANGE_DAYS} days after from"),
        ));
    }
    Ok(UsageRequest {
        from,
        to,
        group_by,
        user_id,
    })
}

/// Whose usage the caller may read: services and admins anyone's (or
/// everyone's), a plain user only its own, whatever it asked.
pub fn allowed_user(
    principal: &Principal,
    asked: Option<UserId>,
) -> Result<Option<UserId>, ApiError> {
    match principal.role {
        Role::Admin | Role::Service => return Ok(asked),
        Role::Unrecognized => return Err(ApiError::Forbidden("the token carries no known role")),
        Role::User => {}
    }
    match asked {
        Some(user) if user != principal.subject => {
            Err(ApiError::Forbidden("a user may only read its own usage"))
        }
        _ => Ok(Some(principal.subject.clone())),
    }
}

/// One key's usage within the range.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow, ToSchema)]
pub struct UsageRow {
    /// The user id or the session id.
    pub key: String,
    /// Connected time within the range, summed over the key's connections.
    pub connected_seconds: f64,
    /// Connections that were open at some point within the range.
    pub connections: i64,
    /// The most connections of the key open at once within the range.
    pub peak_concurrent: i32,
}

/// The answer of `GET /v1/usage`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Usage {
    #[serde(with = "rfc3339_ms")]
    #[schema(value_type = String, format = DateTime)]
    pub from: DateTime<Utc>,
    #[serde(with = "rfc3339_ms")]
    #[schema(value_type = String, format = DateTime)]
    pub to: DateTime<Utc>,
    /// `user` or `session`.
    pub group_by: &'static str,
    /// One row per key with connected time in the range, by key.
    pub rows: Vec<UsageRow>,
}

#[utoipa::path(
    get,
    path = "/v1/usage",
    tag = "sessions",
    params(UsageQuery),
    responses(
        (status = 200, description = "Usage per user or session within [from, to)", body = Usage),
        (status = 400, description = "Invalid query: the field is named", body = ErrorBody),
        (status = 403, description = "A plain user asking for another user's usage", body = ErrorBody),
        HistoryBacked,
    ),
    security(("bearer" = []))
)]
pub async fn usage(
    State(state): State<AppState>,
    principal: Principal,
    RawQuery(query): RawQuery,
) -> Result<Json<Usage>, ApiError> {
    let req = parse_query(query.as_deref())?;
    let user = allowed_user(&principal, req.user_id.clone())?;
    let history = state.require_history()?;
    // The rollup has no user within a session's row.
    let rollup = !(req.group_by == GroupBy::Session && user.is_some());
    let (from, to, group) = (req.from, req.to, req.group_by.as_str());
    let user = user.map(|u| u.as_str().to_owned());
    let rows = history
        .run(|pool| async move {
            let mut tx = pool.begin().await?;
            for setting in USAGE_SETTINGS {
                sqlx::query(setting).execute(&mut *tx).await?;
            }
            let rows = sqlx::query_as::<_, UsageRow>(USAGE_SQL)
                .bind(from)
                .bind(to)
                .bind(group)
                .bind(user)
                .bind(rollup)
                .fetch_all(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(rows)
        })
        .await?;
    Ok(Json(Usage {
        from: req.from,
        to: req.to,
        group_by: req.group_by.as_str(),
        rows,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(q: &str) -> String {
        match parse_query(Some(q)) {
            Err(ApiError::InvalidRequest { field, .. }) => field,
            other => panic!("{q}: {other:?}"),
        }
    }

    #[test]
    fn the_query_is_checked_field_by_field() {
        let ok = parse_query(Some(
            "from=2026-11-01T00:00:00Z&to=2026-12-01T00:00:00%2B01:00&group_by=session&user_id=al%20ice",
        ))
        .unwrap();
        assert_eq!(ok.from.to_rfc3339(), "2026-11-01T00:00:00+00:00");
        assert_eq!(ok.to.to_rfc3339(), "2026-11-30T23:00:00+00:00");
        assert_eq!(ok.group_by, GroupBy::Session);
        assert_eq!(ok.user_id.unwrap().as_str(), "al ice");
        let default =
            parse_query(Some("from=2026-11-01T00:00:00Z&to=2026-11-01T00:00:00Z")).unwrap();
        assert_eq!((default.group_by, default.user_id), (GroupBy::User, None));
        let t = "from=2026-01-01T00:00:00Z";
        for (q, expected) in [
            ("to=2026-01-01T00:00:00Z".to_owned(), "from"),
            (t.to_owned(), "to"),
            (format!("{t}&to=tomorrow"), "to"),
            (
                "from=2026-13-01T00:00:00Z&to=2026-01-01T00:00:00Z".to_owned(),
                "from",
            ),
            (format!("{t}&to=2025-12-31T23:59:59Z"), "to"),
            (format!("{t}&to=2027-01-02T00:00:00.001Z"), "to"),
            (
                format!("{t}&to=2026-02-01T00:00:00Z&group_by=protocol"),
                "group_by",
            ),
            (format!("{t}&to=2026-02-01T00:00:00Z&user_id="), "user_id"),
            (
                format!("{t}&to=2026-02-01T00:00:00Z&user_id=a%07b"),
                "user_id",
            ),
        ] {
            assert_eq!(field(&q), expected, "{q}");
        }
        // 366 days is the most.
        parse_query(Some(&format!("{t}&to=2027-01-02T00:00:00Z"))).unwrap();
    }

    fn principal(sub: &str, role: Role) -> Principal {
        Principal {
            subject: sub.parse().unwrap(),
            role,
        }
    }

    #[test]
    fn a_user_reads_only_its_own_usage() {
        let alice: UserId = "alice".parse().unwrap();
        let bob: UserId = "bob".parse().unwrap();
        let user = principal("alice", Role::User);
        assert_eq!(allowed_user(&user, None).unwrap(), Some(alice.clone()));
        assert_eq!(
            allowed_user(&user, Some(alice.clone())).unwrap(),
            Some(alice.clone())
        );
        assert!(matches!(
            allowed_user(&user, Some(bob.clone())),
            Err(ApiError::Forbidden(_))
        ));
        let service = principal("proxy", Role::Service);
        assert_eq!(allowed_user(&service, None).unwrap(), None);
        assert_eq!(
            allowed_user(&service, Some(bob.clone())).unwrap(),
            Some(bob)
        );
        let nobody = principal("x", Role::Unrecognized);
        assert!(matches!(
            allowed_user(&nobody, None),
            Err(ApiError::Forbidden(_))
        ));
    }
}
