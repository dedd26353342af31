//! `clients/js` (`TrackerSocket`) in headless Chromium against the real API:
//! a test page, served here on loopback, registers with a ticket its own
//! backend (this test's server) fetches; stays registered across heartbeat
//! windows; is removed at once when the browser navigates away; comes back
//! after the API restarts on the same port; and shows the refusal of a bad
//! ticket.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fantoccini::Client;
use serde_json::Value;
use tokio::sync::RwLock;
use tracker_browser::Browser;
use tracker_core::testing::{self, Backend};
use tracker_core::{IdleTimeout, ResourceState, SessionId, SessionMeta, Written};

use crate::helpers::{eventually, token, Api};

/// Short, so three windows pass quickly; the page answers pings well inside it.
const WINDOW: Duration = Duration::from_secs(1);
const DEADLINE: Duration = Duration::from_secs(20);

/// The module under test, served as the page's backend would serve it.
const MODULE: &str = include_str!("../../../../clients/js/tracker-socket.js");

/// The test page: `?api=<base>&session=<id>&bad=1` (a ticket that does not
/// exist). It records every event in `window.events` and shows refusals.
const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>tracker socket</title></head>
<body>
<p id="status">starting</p>
<p id="refusal"></p>
<script type="module">
import { TrackerSocket, CLOSE_REASONS } from "/tracker-socket.js";
const q = new URLSearchParams(location.search);
window.events = [];
const socket = new TrackerSocket({
  url: q.get("api"),
  sessionId: q.get("session"),
  initialDelayMs: 100,
  maxDelayMs: 800,
  getTicket: async (id) => {
    if (q.get("bad") === "1") return "0".repeat(32);
    const res = await fetch(`/ticket?session=${encodeURIComponent(id)}`, { method: "POST" });
    if (!res.ok) throw new Error(`ticket: HTTP ${res.status}`);
    return (await res.json()).ticket;
  },
});
for (const type of ["registered", "session", "hibernation_warning", "refused", "closed"]) {
  socket.addEventListener(type, (e) => {
    window.events.push({ type, detail: e.detail });
    document.getElementById("status").textContent = type;
  });
}
socket.addEventListener("refused", (e) => {
  const known = CLOSE_REASONS[e.detail.code];
  document.getElementById("refusal").textContent =
    `${e.detail.code} ${known ? known.name : "?"}: ${e.detail.reason}`;
});
socket.start();
</script>
</body></html>
"#;

/// What the page's backend needs: where the API is, and a user's token.
struct PageBackend {
    api: RwLock<String>,
    http: reqwest::Client,
    token: String,
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn other() -> Html<&'static str> {
    Html("<!doctype html><title>elsewhere</title><p>elsewhere</p>")
}

async fn module() -> Response {
    ([(CONTENT_TYPE, "text/javascript")], MODULE).into_response()
}

/// The page's backend asks the tracker for a ticket with the user's token.
async fn ticket(
    State(b): State<Arc<PageBackend>>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let session = q.get("session").cloned().unwrap_or_default();
    let url = format!("{}/v1/sessions/{session}/ws-ticket", b.api.read().await);
    match b.http.post(url).bearer_auth(&b.token).send().await {
        Ok(res) if res.status().as_u16() == 201 => match res.json::<Value>().await {
            Ok(v) => Json(v).into_response(),
            Err(_) => axum::http::StatusCode::BAD_GATEWAY.into_response(),
        },
        _ => axum::http::StatusCode::BAD_GATEWAY.into_response(),
    }
}

async fn serve_pages(backend: Arc<PageBackend>) -> String {
    let router = Router::new()
        .route("/page.html", get(page))
        .route("/other.html", get(other))
        .route("/tracker-socket.js", get(module))
        .route("/ticket", post(ticket))
        .with_state(backend);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the page server");
    let addr = listener.local_addr().expect("the page server's address");
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

/// The page's recorded events of `type`.
async fn events(c: &Client, kind: &str) -> Result<Vec<Value>, String> {
    let v = c
        .execute(
            "return (window.events || []).filter(e => e.type === arguments[0]);",
            vec![Value::from(kind)],
        )
        .await
        .map_err(|e| format!("script failed: {e}"))?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// The live connection ids of `session`.
async fn live(api: &Api, session: &SessionId) -> Result<Vec<String>, String> {
    api.store
        .list_connections(session)
        .await
        .map(|cs| {
            cs.into_iter()
                .map(|c| c.connection_id.to_string())
                .collect()
        })
        .map_err(|e| e.to_string())
}

async fn mirror(api: &Api, session: &SessionId, owner: &str) {
    let meta = SessionMeta {
        session_id: session.clone(),
        uid: Some(format!("uid-{session}")),
        owner: Some(owner.to_owned()),
        idle_source: Default::default(),
        state: ResourceState::Running,
        idle_timeout: IdleTimeout::After(Duration::from_secs(1800)),
        generation: None,
        max_session_duration: None,
        created_at: None,
    };
    let term = api.store.newest_term().await.expect("a term");
    let written = api
        .store
        .mirror_session(&meta, term)
        .await
        .expect("mirror the session");
    assert_eq!(written, Written::Done);
}

#[tokio::test]
async fn a_page_is_tracked_leaves_at_once_and_comes_back() {
    let store_cfg = testing::config(Backend::Standalone, WINDOW);
    let api = Api::spawn_on(store_cfg.clone(), 0, None).await;
    let port: u16 = api
        .base
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the API's port");
    let session: SessionId = "js-page".parse().unwrap();
    mirror(&api, &session, "alice").await;
    let backend = Arc::new(PageBackend {
        api: RwLock::new(api.base.clone()),
        http: api.http.clone(),
        token: token("alice", &["user"]),
    });
    let pages = serve_pages(backend).await;
    let browser = Browser::start(800, 600).await.expect("a browser");
    let c = browser.client();
    let page = format!("{pages}/page.html?api={}&session={session}", api.base);
    c.goto(&page).await.expect("open the page");

    // Registers, as alice, with a ticket.
    let first = eventually(DEADLINE, "the page to register", || async {
        let got = events(c, "registered").await?;
        got.first()
            .map(|e| e["detail"]["connection"].clone())
            .ok_or_else(|| "no registered event".to_owned())
    })
    .await;
    assert_eq!(first["user_id"], "alice", "{first}");
    let id = first["connection_id"].as_str().expect("an id").to_owned();
    assert_eq!(live(&api, &session).await.unwrap(), vec![id.clone()]);

    // Survives three heartbeat windows on the same connection.
    let until = tokio::time::Instant::now() + WINDOW * 3;
    while tokio::time::Instant::now() < until {
        assert_eq!(live(&api, &session).await.unwrap(), vec![id.clone()]);
        tokio::time::sleep(WINDOW / 10).await;
    }
    assert_eq!(
        events(c, "registered").await.unwrap().len(),
        1,
        "no reconnect"
    );

    // Navigating away closes the socket: removed within a second, far
    // sooner than the window would.
    c.goto(&format!("{pages}/other.html"))
        .await
        .expect("navigate away");
    eventually(
        Duration::from_secs(1),
        "the connection to be removed",
        || async {
            let ids = live(&api, &session).await?;
            if ids.is_empty() {
                Ok(())
            } else {
                Err(format!("{ids:?}"))
            }
        },
    )
    .await;

    // Back: the page (restored or reloaded) registers again.
    c.back().await.expect("go back");
    let again = eventually(DEADLINE, "the page to register again", || async {
        let ids = live(&api, &session).await?;
        match ids.as_slice() {
            [one] if *one != id => Ok(one.clone()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // The API restarts on the same port: the page reconnects by itself.
    api.stop().await;
    let api = Api::spawn_on(store_cfg, port, None).await;
    eventually(
        DEADLINE,
        "the page to reconnect after a restart",
        || async {
            let ids = live(&api, &session).await?;
            match ids.as_slice() {
                [one] if *one != again => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;

    // A bad ticket: the page shows the refusal's code and reason.
    c.goto(&format!("{page}&bad=1"))
        .await
        .expect("open the page");
    let shown = eventually(DEADLINE, "the refusal to be shown", || async {
        let text = c
            .execute(
                "return document.getElementById('refusal').textContent;",
                vec![],
            )
            .await
            .map_err(|e| e.to_string())?;
        match text.as_str() {
            Some(t) if !t.is_empty() => Ok(t.to_owned()),
            _ => Err("nothing shown".into()),
        }
    })
    .await;
    assert!(
        shown.starts_with("4401 unauthenticated: ") && shown.contains("ticket"),
        "{shown}"
    );
    let refused = events(c, "refused").await.unwrap();
    assert_eq!(refused[0]["detail"]["retry"], false, "{refused:?}");
    browser.close().await;
    api.stop().await;
}
