//! WebSocket tracking with a real client.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};
use tracker_core::testing::Backend;
use tracker_core::{ResourceState, SessionId};

use crate::helpers::*;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn open(app: &TestApp, session: &str, token: &str) -> (Ws, Value) {
    let mut req = app
        .ws_url(&format!("/v1/sessions/{session}/ws"))
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req.headers_mut()
        .insert("user-agent", "it-test/1".parse().unwrap());
    req.headers_mut()
        .insert("x-forwarded-for", "198.51.100.7, 10.0.0.1".parse().unwrap());
    let (mut ws, _) = connect_async(req).await.expect("upgrade");
    let first = next_text(&mut ws).await;
    assert_eq!(first["type"], "registered", "{first}");
    (ws, first)
}

/// The connection id of a `registered` frame.
fn connection_id(registered: &Value) -> String {
    registered["connection"]["connection_id"]
        .as_str()
        .expect("a registered frame names its connection")
        .to_owned()
}

/// The next text frame, answering pings on the way (tungstenite does that
/// while reading).
async fn next_text(ws: &mut Ws) -> Value {
    let deadline = Duration::from_secs(5);
    loop {
        let msg = tokio::time::timeout(deadline, ws.next())
            .await
            .expect("a frame within 5s")
            .expect("stream open")
            .expect("valid frame");
        if let Message::Text(t) = msg {
            return serde_json::from_str(t.as_str()).unwrap();
        }
    }
}

async fn live_ids(app: &TestApp, session: &str) -> Vec<String> {
    let sid: SessionId = session.parse().unwrap();
    app.store
        .list_connections(&sid)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.connection_id.to_string())
        .collect()
}

async fn ws_lifecycle(backend: Backend) {
    // The test client is the proxy here: its X-Forwarded-For counts.
    let opts = Options {
        extra_args: vec!["--trusted-proxies".into(), "127.0.0.0/8,10.0.0.0/8".into()],
        ..Options::fast()
    };
    let app = TestApp::spawn_with(backend, opts).await;
    let (mut ws, first) = open(&app, "ws-life", &service_token()).await;
    let cid = connection_id(&first);
    assert_eq!(first["connection"]["protocol"], "websocket");
    assert_eq!(first["connection"]["client_ip"], "198.51.100.7");
    assert_eq!(first["connection"]["user_agent"], "it-test/1");
    assert_eq!(first["connection"]["user_id"], "proxy");
    assert_eq!(first["session"]["active_connections"], 1);

    // Answer pings for three windows: pongs alone must keep it alive.
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_millis(1200) {
        if let Ok(Some(Ok(Message::Ping(_)))) =
            tokio::time::timeout(Duration::from_millis(200), ws.next()).await
        {
            pings += 1;
        }
    }
    assert!(pings >= 5, "only {pings} pings in 1.2s at a 100ms interval");
    assert_eq!(live_ids(&app, "ws-life").await, vec![cid.clone()]);
    assert!(app
        .metrics()
        .await
        .contains("tracker_api_websockets_open 1"));

    // Closing the socket removes the connection.
    ws.close(None).await.unwrap();
    eventually(
        "the closed socket's connection is removed",
        Duration::from_secs(3),
        || async { live_ids(&app, "ws-life").await.is_empty() },
    )
    .await;
    eventually("the gauge drops", Duration::from_secs(3), || async {
        app.metrics()
            .await
            .contains("tracker_api_websockets_open 0")
    })
    .await;
    let m = app.metrics().await;
    assert!(
        m.contains("tracker_api_registrations_total{protocol=\"websocket\",result=\"created\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("tracker_api_heartbeats_total{result=\"accepted\"}"),
        "{m}"
    );
}

#[tokio::test]
async fn ws_lifecycle_standalone() {
    ws_lifecycle(Backend::Standalone).await;
}

#[tokio::test]
async fn ws_lifecycle_cluster() {
    ws_lifecycle(Backend::Cluster).await;
}

#[tokio::test]
async fn a_silent_client_is_removed_after_the_window() {
    let app = TestApp::spawn_with(Backend::Standalone, Options::fast()).await;
    let (mut ws, first) = open(&app, "ws-silent", &service_token()).await;
    assert_eq!(first["type"], "registered");
    // Not reading means not answering pings.
    eventually(
        "the silent socket's connection is removed",
        Duration::from_secs(3),
        || async { live_ids(&app, "ws-silent").await.is_empty() },
    )
    .await;
    // What the server sent meanwhile: pings, then a normal close.
    let mut close = None;
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(2), ws.next()).await {
        match msg {
            Ok(Message::Close(frame)) => {
                close = frame;
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    assert_eq!(close.map(|f| f.code), Some(CloseCode::Normal));
}

#[tokio::test]
async fn a_client_frame_is_a_heartbeat() {
    let app = TestApp::spawn_with(Backend::Standalone, Options::fast()).await;
    let (ws, first) = open(&app, "ws-chatty", &service_token()).await;
    let cid = connection_id(&first);
    // Send text frames but never read: no pongs go out, only these frames.
    let (mut tx, _rx) = ws.split();
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1200) {
        tx.send(Message::Text("hi".into())).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(live_ids(&app, "ws-chatty").await, vec![cid]);
}

#[tokio::test]
async fn session_state_changes_are_pushed() {
    let app = TestApp::spawn_with(Backend::Standalone, Options::fast()).await;
    app.mirror("ws-push", Some("alice"), ResourceState::Running)
        .await;
    let (mut ws, first) = open(&app, "ws-push", &token("alice", &["user"])).await;
    assert_eq!(first["session"]["state"], "running");
    assert_eq!(first["connection"]["user_id"], "alice");
    app.mirror("ws-push", Some("alice"), ResourceState::Terminated)
        .await;
    let frame = next_text(&mut ws).await;
    assert_eq!(frame["type"], "session", "{frame}");
    assert_eq!(frame["session"]["state"], "terminated");
}

/// A user's socket is let in for a session it owns, and stays only while it
/// does: once the Session belongs to someone else (its owner edited, or the
/// Session created again for another user), the socket's next heartbeat is
/// refused and the socket closed with 4403, its connection ended. A
/// service's socket on the same session stays.
#[tokio::test]
async fn a_users_socket_ends_once_the_session_belongs_to_someone_else() {
    let app = TestApp::spawn_with(Backend::Standalone, Options::fast()).await;
    app.mirror("ws-owner", Some("alice"), ResourceState::Running)
        .await;
    let (mut alices, first) = open(&app, "ws-owner", &token("alice", &["user"])).await;
    let alice_id = connection_id(&first);
    let (proxys, first) = open(&app, "ws-owner", &service_token()).await;
    let proxy_id = connection_id(&first);
    // The service's socket keeps answering pings (its heartbeats) meanwhile.
    let proxy = tokio::spawn(async move {
        let mut proxys = proxys;
        while let Some(Ok(msg)) = proxys.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    });
    app.mirror("ws-owner", Some("bob"), ResourceState::Running)
        .await;
    let (_, close) = until_close(&mut alices).await;
    let (code, reason) = close.expect("a close frame");
    assert_eq!(code, 4403, "{reason}");
    let ended = Instant::now();
    while live_ids(&app, "ws-owner").await.contains(&alice_id) {
        assert!(
            ended.elapsed() < Duration::from_secs(5),
            "alice's connection ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Two windows later the service's socket is still open and tracked.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!proxy.is_finished(), "the service's socket stays");
    assert_eq!(live_ids(&app, "ws-owner").await, vec![proxy_id]);
    proxy.abort();
}

/// A user's socket on a Session deleted (and not created again within the
/// window) ends like an HTTP client's connection: its heartbeats are not
/// recorded, and after a window it closes as no longer tracked.
#[tokio::test]
async fn a_users_socket_ends_a_window_after_its_session_was_deleted() {
    let app = TestApp::spawn_with(Backend::Standalone, Options::fast()).await;
    app.mirror("ws-gone", Some("alice"), ResourceState::Running)
        .await;
    let (mut ws, first) = open(&app, "ws-gone", &token("alice", &["user"])).await;
    let id = connection_id(&first);
    let term = app.store.newest_term().await.unwrap();
    let sid: SessionId = "ws-gone".parse().unwrap();
    app.store.forget_session(&sid, term, None).await.unwrap();
    let (_, close) = until_close(&mut ws).await;
    let (code, reason) = close.expect("a close frame");
    assert_eq!(code, 1000, "{reason}");
    assert!(!live_ids(&app, "ws-gone").await.contains(&id));
}

#[tokio::test]
async fn refusals_close_the_socket_and_only_malformed_requests_get_http_errors() {
    let app = TestApp::spawn_with(Backend::Standalone, Options::fast()).await;
    app.mirror("ws-term", Some("alice"), ResourceState::Terminated)
        .await;
    let bearer = |t: String| vec![("authorization", format!("Bearer {t}"))];
    let outcome = ws_attempt(&app, "/v1/sessions/ws-x/ws", &[]).await;
    assert_eq!(close_code(&outcome), 4401, "{outcome:?}");
    let outcome = ws_attempt(
        &app,
        "/v1/sessions/ws-x/ws",
        &bearer(token("alice", &["user"])),
    )
    .await;
    assert_eq!(close_code(&outcome), 4404, "{outcome:?}");
    let outcome = ws_attempt(&app, "/v1/sessions/ws-term/ws", &bearer(service_token())).await;
    assert_eq!(close_code(&outcome), 4409, "{outcome:?}");
    assert_eq!(
        ws_attempt(&app, "/v1/sessions/NOPE/ws", &bearer(service_token())).await,
        WsOutcome::Http(400)
    );
    // The token may come in the query on this path.
    let path = format!("/v1/sessions/ws-x/ws?access_token={}", service_token());
    let outcome = ws_attempt(&app, &path, &[]).await;
    assert!(matches!(outcome, WsOutcome::Registered(_)), "{outcome:?}");
}

#[tokio::test]
async fn shutdown_closes_sockets_with_1001_and_removes_them_first() {
    let mut app = TestApp::spawn_with(Backend::Standalone, Options::fast()).await;
    let mut sockets = Vec::new();
    for _ in 0..3 {
        sockets.push(open(&app, "ws-shutdown", &service_token()).await.0);
    }
    assert_eq!(live_ids(&app, "ws-shutdown").await.len(), 3);
    app.stop().await;
    // run_until has returned: every connection must already be gone.
    assert!(live_ids(&app, "ws-shutdown").await.is_empty());
    for mut ws in sockets {
        let mut code = None;
        while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(2), ws.next()).await
        {
            if let Message::Close(frame) = msg {
                code = frame.map(|f| f.code);
                break;
            }
        }
        assert_eq!(code, Some(CloseCode::Away));
    }
}

#[tokio::test]
async fn sockets_of_one_session_share_one_reader_and_all_hear_changes() {
    let app = TestApp::spawn_with(Backend::Standalone, Options::fast()).await;
    app.mirror("ws-fan", Some("alice"), ResourceState::Running)
        .await;
    let mut sockets = Vec::new();
    for _ in 0..12 {
        sockets.push(open(&app, "ws-fan", &service_token()).await.0);
    }
    let (mut other, _) = open(&app, "ws-fan-other", &service_token()).await;
    // One reader per session on this replica, not one per socket.
    let m = app.metrics().await;
    assert!(m.contains("tracker_api_session_watches 2\n"), "{m}");
    assert!(m.contains("tracker_api_websockets_open 13\n"), "{m}");

    app.mirror("ws-fan", Some("alice"), ResourceState::Terminated)
        .await;
    for ws in &mut sockets {
        let frame = next_text(ws).await;
        assert_eq!(frame["type"], "session", "{frame}");
        assert_eq!(frame["session"]["state"], "terminated");
    }

    // The last socket of a session stops its reader.
    for ws in &mut sockets {
        ws.close(None).await.unwrap();
    }
    eventually("one reader is left", Duration::from_secs(3), || async {
        app.metrics()
            .await
            .contains("tracker_api_session_watches 1\n")
    })
    .await;
    other.close(None).await.unwrap();
    eventually("no reader is left", Duration::from_secs(3), || async {
        app.metrics()
            .await
            .contains("tracker_api_session_watches 0\n")
    })
    .await;
}

/// The reaper's part played by the test: its store claims as the newest
/// leader, on a clock of its own.
async fn claim_as_reaper(
    app: &TestApp,
    clock: &tracker_core::ClockOffset,
    session: &str,
) -> tracker_core::ClaimOutcome {
    let store = app.store.clone().with_clock(clock.clone());
    let term = store.newest_term().await.unwrap();
    store
        .claim_hibernation(&session.parse().unwrap(), Duration::from_secs(30), term)
        .await
        .unwrap()
}

/// Frames until the Close: the texts, then the close code and reason. Pings
/// keep coming while the socket is open, so the wait is bounded as a whole.
async fn until_close(ws: &mut Ws) -> (Vec<Value>, Option<(u16, String)>) {
    let mut texts = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("the socket closed within 10 s");
        match msg {
            Some(Ok(Message::Text(t))) => texts.push(serde_json::from_str(t.as_str()).unwrap()),
            Some(Ok(Message::Close(frame))) => {
                return (
                    texts,
                    frame.map(|f| (u16::from(f.code), f.reason.to_string())),
                )
            }
            Some(Ok(_)) => {}
            None | Some(Err(_)) => return (texts, None),
        }
    }
}

async fn watch_reads(app: &TestApp) -> u64 {
    metric_value(
        &app.metrics().await,
        "tracker_api_session_watch_reads_total",
    )
}

fn metric_value(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

async fn max_duration_warning_then_close(backend: Backend) {
    // A long window: the reaper's clock moves ahead of the sockets' heartbeats.
    let opts = Options {
        interval: Duration::from_millis(100),
        window: Duration::from_secs(60),
        ..Options::default()
    };
    let app = TestApp::spawn_with(backend, opts).await;
    let session = "ws-max";
    let sid: SessionId = session.parse().unwrap();
    let term = app.store.newest_term().await.unwrap();
    let meta = tracker_core::SessionMeta {
        session_id: sid.clone(),
        uid: Some("uid-ws-max".into()),
        owner: Some("alice".into()),
        idle_source: tracker_core::IdleSource::Spec,
        state: ResourceState::Running,
        idle_timeout: tracker_core::IdleTimeout::After(Duration::from_secs(3600)),
        generation: Some(1),
        // Shorter than the default warning time: warned at once.
        max_session_duration: Some(Duration::from_secs(30)),
        created_at: None,
    };
    app.store.mirror_session(&meta, term).await.unwrap();
    let (mut a, _) = open(&app, session, &token("alice", &["user"])).await;
    let (mut b, _) = open(&app, session, &service_token()).await;

    let clock = tracker_core::ClockOffset::default();
    let at = match claim_as_reaper(&app, &clock, session).await {
        tracker_core::ClaimOutcome::Warned(w) => w.at,
        other => panic!("expected a warning, got {other:?}"),
    };
    let expected = serde_json::json!({
        "type": "hibernation_warning",
        "at": tracker_core::domain::rfc3339_ms::format(&at),
        "reason": "max_duration",
    });
    for ws in [&mut a, &mut b] {
        assert_eq!(next_text(ws).await, expected);
    }
    // A socket opened after the warning hears it too, once.
    let (mut c, _) = open(&app, session, &service_token()).await;
    assert_eq!(next_text(&mut c).await, expected);
    // Many reads of the session later, the warning stays recorded...
    let reads = watch_reads(&app).await;
    eventually("more session reads", Duration::from_secs(5), || async {
        watch_reads(&app).await >= reads + 10
    })
    .await;

    // ...and the deadline ends every connection and socket.
    clock.advance(Duration::from_secs(30));
    match claim_as_reaper(&app, &clock, session).await {
        tracker_core::ClaimOutcome::Claimed(claim) => assert_eq!(claim.ended.len(), 3),
        other => panic!("expected a claim, got {other:?}"),
    }
    for ws in [&mut a, &mut b, &mut c] {
        let (texts, close) = until_close(ws).await;
        let warnings = texts
            .iter()
            .filter(|t| t["type"] == "hibernation_warning")
            .count();
        assert_eq!(warnings, 0, "a warning sent again: {texts:?}");
        // A `session` frame may come first, or not: the socket learns of
        // the end from its next heartbeat or from the session's change.
        assert_eq!(
            close,
            Some((
                4408,
                tracker_api::routes::ws::MAX_DURATION_REASON.to_owned()
            ))
        );
    }
    assert!(live_ids(&app, session).await.is_empty());
}

#[tokio::test]
async fn max_duration_warning_then_close_standalone() {
    max_duration_warning_then_close(Backend::Standalone).await;
}

#[tokio::test]
async fn max_duration_warning_then_close_cluster() {
    max_duration_warning_then_close(Backend::Cluster).await;
}
