//! The operator page in headless Chromium, against the real API and a reaper
//! hibernating through the fake Kubernetes API server.
//!
//! `TRACKER_UI_SCREENSHOT=docs/ui.png` (relative to the workspace root, or
//! absolute) writes a screenshot of the page at the end.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use fake_kube::FakeKube;
use fantoccini::{Client, Locator};
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracker_browser::Browser;
use tracker_core::testing::Backend;

use crate::helpers::{admin_token, eventually, session_json, token, Api, Reaper, NS};

/// Short, so the guard after the reaper's election passes quickly; the live
/// connections are kept alive by heartbeats well inside it.
const WINDOW: Duration = Duration::from_secs(2);
const DEADLINE: Duration = Duration::from_secs(30);

/// One connection of the usage history the test seeds.
#[derive(Debug, Clone)]
struct Seeded {
    session: &'static str,
    user: &'static str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
}

/// Connected time over the last days: one to three users a day, up to 7 h.
fn usage_rows(now: DateTime<Utc>) -> Vec<Seeded> {
    let midnight = now
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .map(|t| t.and_utc())
        .unwrap_or(now);
    let mut rows = Vec::new();
    for days_ago in 1..=10i64 {
        let day = midnight - chrono::Duration::days(days_ago);
        for (i, (session, user)) in [
            ("desk-bob", "bob"),
            ("lab-shared", "carol"),
            ("lab-shared", "dave"),
        ]
        .into_iter()
        .enumerate()
        {
            // A pattern that differs day to day: weekends quieter.
            let hours = (days_ago * 3 + i as i64 * 2) % 5 + i64::from(days_ago % 7 < 5) * 2;
            if hours == 0 || (i == 2 && days_ago % 3 == 0) {
                continue;
            }
            let start = day + chrono::Duration::hours(8 + i as i64);
            rows.push(Seeded {
                session,
                user,
                start,
                end: start + chrono::Duration::hours(hours),
            });
        }
    }
    rows
}

async fn seed_history(pool: &PgPool, rows: &[Seeded]) {
    for r in rows {
        sqlx::query(
            "INSERT INTO connection_history (connection_id, session_id, user_id, protocol, \
               connected_at, disconnected_at, last_heartbeat_at, end_reason) \
             VALUES ($1, $2, $3, 'websocket', $4, $5, $5, 'closed')",
        )
        .bind(uuid::Uuid::new_v4())
        .bind(r.session)
        .bind(r.user)
        .bind(r.start)
        .bind(r.end)
        .execute(pool)
        .await
        .expect("seed a history row");
    }
}

/// Connected hours of the seeded rows within one UTC day.
fn hours_on(rows: &[Seeded], day: DateTime<Utc>) -> f64 {
    let end = day + chrono::Duration::days(1);
    rows.iter()
        .map(|r| {
            let (a, b) = (r.start.max(day), r.end.min(end));
            (b - a).num_milliseconds().max(0) as f64 / 3_600_000.0
        })
        .sum()
}

/// Stands in for `GET /v1/usage` while the API has none (the page must
/// draw its chart from the documented answer either way): same origin, the
/// rest of the API proxied through unchanged.
struct UsageFront {
    api: String,
    http: reqwest::Client,
    rows: Vec<Seeded>,
}

async fn stub_usage(State(front): State<Arc<UsageFront>>, req: Request) -> Response {
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.replace("%3A", ":")))
        .collect();
    let parse = |k: &str| {
        query
            .get(k)
            .and_then(|v| DateTime::parse_from_rfc3339(v).ok())
            .map(|t| t.with_timezone(&Utc))
    };
    let (Some(from), Some(to)) = (parse("from"), parse("to")) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let mut by_user: BTreeMap<&str, (f64, u64)> = BTreeMap::new();
    for r in &front.rows {
        let (a, b) = (r.start.max(from), r.end.min(to));
        if b > a {
            let e = by_user.entry(r.user).or_default();
            e.0 += (b - a).num_milliseconds() as f64 / 1000.0;
            e.1 += 1;
        }
    }
    let rows: Vec<Value> = by_user
        .into_iter()
        .map(|(key, (secs, n))| {
            json!({"key": key, "connected_seconds": secs, "connections": n, "peak_concurrent": 1})
        })
        .collect();
    Json(json!({"from": from, "to": to, "group_by": "user", "rows": rows})).into_response()
}

async fn forward(State(front): State<Arc<UsageFront>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 1 << 20).await else {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = front
        .http
        .request(parts.method, format!("{}{path}", front.api))
        .body(body);
    for name in ["authorization", "accept", "content-type"] {
        if let Some(v) = parts.headers.get(name) {
            out = out.header(name, v);
        }
    }
    let Ok(res) = out.send().await else {
        return StatusCode::BAD_GATEWAY.into_response();
    };
    let mut answer = Response::builder().status(res.status());
    for (name, value) in res.headers() {
        if ![
            HeaderName::from_static("transfer-encoding"),
            HeaderName::from_static("connection"),
            HeaderName::from_static("content-length"),
        ]
        .contains(name)
        {
            answer = answer.header(name, value);
        }
    }
    let bytes = res.bytes().await.unwrap_or_default();
    answer
        .body(Body::from(bytes))
        .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
}

/// The origin the browser opens: the API itself once it serves usage,
/// else the API behind the stand-in.
async fn origin(api: &Api, rows: &[Seeded]) -> String {
    let (status, body) = api
        .get(
            "/v1/usage?group_by=user&from=2024-01-01T00:00:00Z&to=2024-01-02T00:00:00Z",
            &admin_token(),
        )
        .await;
    if status != 404 || body["error"]["code"] != "not_found" {
        return api.base.clone();
    }
    let front = Arc::new(UsageFront {
        api: api.base.clone(),
        http: api.http.clone(),
        rows: rows.to_vec(),
    });
    let router = Router::new()
        .route("/v1/usage", get(stub_usage))
        .fallback(forward)
        .with_state(front);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the front");
    let addr = listener.local_addr().expect("the front's address");
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

/// Keeps a connection alive until `stop`, as a proxy would.
fn keep_alive(api: &Api, session: &str, connection: String, stop: CancellationToken) {
    let (http, url) = (
        api.http.clone(),
        api.url(&format!(
            "/v1/sessions/{session}/connections/{connection}/heartbeat"
        )),
    );
    let service = token("proxy", &["service"]);
    tokio::spawn(async move {
        // Bounded: far more beats than the test's deadlines allow.
        for _ in 0..2_000 {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(WINDOW / 5) => {}
            }
            let _ = http.post(&url).bearer_auth(&service).send().await;
        }
    });
}

async fn register(api: &Api, session: &str, user: &str, ip: &str, stop: &CancellationToken) {
    let (status, body) = api
        .post(
            &format!("/v1/sessions/{session}/connections"),
            &token("proxy", &["service"]),
            json!({"protocol": "websocket", "user_id": user, "client_ip": ip, "user_agent": "Mozilla/5.0"}),
        )
        .await;
    assert_eq!(status, 201, "register on {session}: {body}");
    let id = body["connection"]["connection_id"]
        .as_str()
        .expect("a connection id")
        .to_owned();
    keep_alive(api, session, id, stop.clone());
}

/// Runs `script` (which returns a value) in the page.
async fn js(client: &Client, script: &str) -> Result<Value, String> {
    client
        .execute(script, vec![])
        .await
        .map_err(|e| format!("script failed: {e}"))
}

/// The text of the first element matching `css`.
async fn text_of(client: &Client, css: &str) -> Result<String, String> {
    let el = client
        .find(Locator::Css(css))
        .await
        .map_err(|e| format!("{css}: {e}"))?;
    el.text().await.map_err(|e| format!("{css}: {e}"))
}

async fn click(client: &Client, css: &str) {
    let el = client
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("find {css}: {e}"));
    el.click()
        .await
        .unwrap_or_else(|e| panic!("click {css}: {e}"));
}

async fn wait_text(client: &Client, css: &str, want: &str) {
    eventually(DEADLINE, &format!("{css} to read {want:?}"), || async {
        let got = text_of(client, css).await?;
        if got.trim() == want {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    })
    .await;
}

fn screenshot_path() -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os("TRACKER_UI_SCREENSHOT")?);
    Some(if path.is_absolute() {
        path
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(path)
    })
}

#[sqlx::test(migrations = "../../migrations")]
async fn the_operator_page_follows_sessions_into_hibernation(pool: PgPool) {
    let browser = match Browser::start(1280, 1100).await {
        Ok(b) => b,
        Err(e) => match std::error::Error::source(&e) {
            Some(cause) => panic!("no browser for the UI test: {e}: {cause}"),
            None => panic!("no browser for the UI test: {e}"),
        },
    };
    let fake = FakeKube::start()
        .await
        .expect("start the fake Kubernetes API");
    for (name, user, idle) in [
        ("desk-alice", "alice", "1s"),
        ("desk-bob", "bob", "30m"),
        ("lab-shared", "carol", "30m"),
    ] {
        fake.apply_session(NS, session_json(name, user, idle))
            .expect("create a Session");
    }
    let api = Api::spawn(Backend::Standalone, WINDOW, Some(&pool)).await;
    let reaper = Reaper::start(&api, &pool, &fake).await;
    let admin = admin_token();
    eventually(DEADLINE, "the Sessions mirrored", || async {
        let (_, page) = api.get("/v1/sessions", &admin).await;
        let n = page["sessions"].as_array().map_or(0, Vec::len);
        if n == 3 {
            Ok(())
        } else {
            Err(page.to_string())
        }
    })
    .await;
    let beating = CancellationToken::new();
    register(&api, "desk-bob", "bob", "192.0.2.10", &beating).await;
    register(&api, "lab-shared", "carol", "192.0.2.21", &beating).await;
    register(&api, "lab-shared", "dave", "198.51.100.7", &beating).await;
    let now = Utc::now();
    let rows = usage_rows(now);
    seed_history(&pool, &rows).await;
    let base = origin(&api, &rows).await;

    let c = browser.client();
    c.goto(&format!("{base}/ui")).await.expect("open the page");
    assert_eq!(c.title().await.expect("a title"), "Connection tracker");
    let input = c
        .wait()
        .at_most(DEADLINE)
        .for_element(Locator::Id("token"))
        .await
        .expect("the token field");
    input.send_keys(&admin).await.expect("type the token");
    click(c, "#token-use").await;

    // The table: owners and connection counts from the API.
    wait_text(c, r#"tr[data-session="desk-bob"] td.connections"#, "1").await;
    wait_text(c, r#"tr[data-session="desk-bob"] td.owner"#, "bob").await;
    wait_text(c, r#"tr[data-session="lab-shared"] td.connections"#, "2").await;
    wait_text(c, r#"tr[data-session="desk-bob"] td.state"#, "running").await;

    // desk-alice: nobody connects, its idle timeout is 1 s. The page shows it
    // hibernated once the fake API server has received the reaper's patch.
    eventually(DEADLINE, "the reaper's patch of desk-alice", || async {
        let states: Vec<Value> = fake
            .session_patches("desk-alice")
            .iter()
            .filter_map(|r| r.body.pointer("/spec/state").cloned())
            .collect();
        if states == [json!("hibernated")] {
            Ok(())
        } else {
            Err(format!("{states:?}"))
        }
    })
    .await;
    wait_text(c, r#"tr[data-session="desk-alice"] td.state"#, "hibernated").await;
    wait_text(
        c,
        r#"#events tbody tr[data-event="hibernated"] td:nth-child(2)"#,
        "desk-alice",
    )
    .await;
    assert!(
        fake.session_patches("desk-bob").is_empty()
            && fake.session_patches("lab-shared").is_empty(),
        "a connected session was patched"
    );

    // A session's live connections, on selection.
    click(c, r#"tr[data-session="lab-shared"]"#).await;
    eventually(DEADLINE, "lab-shared's connections listed", || async {
        let users = js(
            c,
            "return [...document.querySelectorAll('#connections tbody tr td:first-child')].map(td => td.textContent).sort();",
        )
        .await?;
        if users == json!(["carol", "dave"]) {
            Ok(())
        } else {
            Err(users.to_string())
        }
    })
    .await;
    // And why it is awake: its explanation names both users.
    eventually(DEADLINE, "lab-shared's reasons shown", || async {
        let why = js(
            c,
            "return [...document.querySelectorAll('#reasons li.reason-live_connections')].map(li => li.textContent);",
        )
        .await?;
        let text = why.to_string();
        if text.contains("2 live connections") && text.contains("carol") && text.contains("dave") {
            Ok(())
        } else {
            Err(text)
        }
    })
    .await;

    // The chart: one bar per day, each as tall as the seeded hours say.
    let midnight = now
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .map(|t| t.and_utc())
        .expect("midnight");
    let bars = eventually(DEADLINE, "the usage chart", || async {
        let bars = js(
            c,
            "return [...document.querySelectorAll('#usage svg rect.bar')].map(b => [b.dataset.day, Number(b.dataset.hours), Number(b.getAttribute('height'))]);",
        )
        .await?;
        match bars.as_array() {
            Some(a) if a.len() == 14 => Ok(a.clone()),
            _ => Err(format!("{bars}; note: {:?}", text_of(c, "#usage-note").await)),
        }
    })
    .await;
    let today = midnight.format("%Y-%m-%d").to_string();
    let mut drawn = 0;
    for bar in &bars {
        let day = bar[0].as_str().expect("a day");
        let start = DateTime::parse_from_rfc3339(&format!("{day}T00:00:00Z"))
            .expect("a date")
            .with_timezone(&Utc);
        let want = hours_on(&rows, start);
        let hours = bar[1].as_f64().expect("hours");
        if day == today {
            // Nothing seeded today; a usage that counts live connections
            // adds the test's own few seconds.
            assert!(hours < 0.1, "{day}: drawn {hours} h");
            continue;
        }
        assert!(
            (hours - want).abs() < 0.01,
            "{day}: drawn {hours} h, seeded {want} h"
        );
        if want > 0.0 {
            assert!(
                bar[2].as_f64().is_some_and(|h| h > 0.0),
                "{day}: no visible bar"
            );
            drawn += 1;
        }
    }
    assert!(drawn >= 5, "only {drawn} days with usage drawn");
    assert_eq!(
        bars.last().and_then(|b| b[0].as_str()),
        Some(today.as_str()),
        "the last bar is today"
    );

    // The token stays in the tab: no cookie, nothing in local storage.
    let kept = js(
        c,
        "return [document.cookie, sessionStorage.getItem('tracker.ui.token') !== null, localStorage.length];",
    )
    .await
    .expect("read the storage");
    assert_eq!(kept, json!(["", true, 0]));

    if let Some(path) = screenshot_path() {
        // The detail of the selected session is in view: the whole page.
        let png = c.screenshot().await.expect("a screenshot");
        std::fs::write(&path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    // Forgetting the token hides the data and clears the tab's copy.
    click(c, "#token-forget").await;
    let after = js(
        c,
        "return [sessionStorage.getItem('tracker.ui.token'), document.getElementById('main').hidden];",
    )
    .await
    .expect("read the page");
    assert_eq!(after, json!([null, true]));

    browser.close().await;
    beating.cancel();
    reaper.stop().await;
    api.stop().await;
}
