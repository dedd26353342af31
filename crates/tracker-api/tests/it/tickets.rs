//! One-time WebSocket tickets, close codes of refused sockets, and the
//! origin allow-list.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use tracker_core::testing::Backend;
use tracker_core::ResourceState;

use crate::helpers::*;

/// Extra request headers of a socket attempt.
type Headers = Vec<(&'static str, String)>;

fn with_args(args: &[&str]) -> Options {
    Options {
        extra_args: args.iter().map(|s| (*s).to_owned()).collect(),
        ..Options::fast()
    }
}

/// Asks for a ticket on `session` with `token`; the status and the body.
async fn ask(app: &TestApp, session: &str, token: Option<&str>) -> (StatusCode, Value) {
    let mut req = app
        .client
        .post(app.url(&format!("/v1/sessions/{session}/ws-ticket")));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.unwrap();
    let status = res.status();
    if status == StatusCode::CREATED {
        assert_eq!(res.headers()["cache-control"], "no-store");
    }
    (status, res.json().await.unwrap())
}

async fn ticket(app: &TestApp, session: &str, token: &str) -> String {
    let (status, body) = ask(app, session, Some(token)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["ticket"].as_str().unwrap().to_owned()
}

async fn with_ticket(app: &TestApp, session: &str, ticket: &str) -> WsOutcome {
    ws_attempt(
        app,
        &format!("/v1/sessions/{session}/ws?ticket={ticket}"),
        &[],
    )
    .await
}

async fn a_ticket_works_once_as_its_subject(backend: Backend) {
    let app = TestApp::spawn_with(backend, Options::fast()).await;
    app.mirror("tk-once", Some("alice"), ResourceState::Running)
        .await;
    let alice = token("alice", &["user"]);
    let (status, body) = ask(&app, "tk-once", Some(&alice)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let t = body["ticket"].as_str().unwrap().to_owned();
    assert_eq!(t.len(), 32, "128 bits in hex: {t}");
    let expires: chrono::DateTime<chrono::Utc> =
        body["expires_at"].as_str().unwrap().parse().unwrap();
    let life = expires - chrono::Utc::now();
    assert!(
        life <= chrono::Duration::seconds(30) && life > chrono::Duration::zero(),
        "{body}"
    );

    match with_ticket(&app, "tk-once", &t).await {
        WsOutcome::Registered(frame) => {
            assert_eq!(frame["type"], "registered");
            assert_eq!(frame["connection"]["user_id"], "alice", "{frame}");
            assert_eq!(frame["connection"]["protocol"], "websocket");
        }
        other => panic!("the first use was refused: {other:?}"),
    }
    let reused = with_ticket(&app, "tk-once", &t).await;
    assert_eq!(close_code(&reused), 4401, "{reused:?}");
}

#[tokio::test]
async fn a_ticket_works_once_as_its_subject_standalone() {
    a_ticket_works_once_as_its_subject(Backend::Standalone).await;
}

#[tokio::test]
async fn a_ticket_works_once_as_its_subject_cluster() {
    a_ticket_works_once_as_its_subject(Backend::Cluster).await;
}

#[tokio::test]
async fn a_ticket_is_for_its_session_only_and_burns_elsewhere() {
    let app = TestApp::spawn(Backend::Standalone).await;
    for s in ["tk-a", "tk-b"] {
        app.mirror(s, Some("alice"), ResourceState::Running).await;
    }
    let t = ticket(&app, "tk-a", &token("alice", &["user"])).await;
    match with_ticket(&app, "tk-b", &t).await {
        WsOutcome::Closed(4401, reason) => assert!(reason.contains("another session"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // Shown on the wrong session, it may have leaked: it is gone.
    assert_eq!(close_code(&with_ticket(&app, "tk-a", &t).await), 4401);
    // Nonsense never reaches Redis, and is refused the same way.
    for junk in ["x", "%7B%7D", &"0".repeat(32)] {
        assert_eq!(close_code(&with_ticket(&app, "tk-a", junk).await), 4401);
    }
}

#[tokio::test]
async fn a_ticket_carries_its_issuers_role() {
    let app = TestApp::spawn(Backend::Standalone).await;
    // No Session resource: a service may register on it, a user may not.
    let t = ticket(&app, "tk-unknown", &service_token()).await;
    match with_ticket(&app, "tk-unknown", &t).await {
        WsOutcome::Registered(frame) => assert_eq!(frame["connection"]["user_id"], "proxy"),
        other => panic!("{other:?}"),
    }
    let (status, body) = ask(&app, "tk-unknown", Some(&token("alice", &["user"]))).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
}

#[tokio::test]
async fn tickets_are_given_under_the_rules_of_registration() {
    let app = TestApp::spawn(Backend::Standalone).await;
    app.mirror("tk-mine", Some("alice"), ResourceState::Running)
        .await;
    let cases = [
        (None, StatusCode::UNAUTHORIZED, "unauthenticated"),
        (
            Some(token("bob", &["user"])),
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        (
            Some(token("eve", &["guest"])),
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
    ];
    for (tok, status, code) in cases {
        let (got, body) = ask(&app, "tk-mine", tok.as_deref()).await;
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}"
        );
    }
    let (got, _) = ask(&app, "NOPE", Some(&service_token())).await;
    assert_eq!(got, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn an_expired_ticket_is_refused() {
    let opts = with_args(&["--ws-ticket-ttl", "200ms"]);
    let app = TestApp::spawn_with(Backend::Standalone, opts).await;
    app.mirror("tk-exp", Some("alice"), ResourceState::Running)
        .await;
    let t = ticket(&app, "tk-exp", &token("alice", &["user"])).await;
    // Redis expires the key: a write of the same name succeeds only once the
    // ticket is gone (a probe that expires at once, so nothing is left).
    eventually("the ticket to expire", Duration::from_secs(5), || async {
        app.store
            .issue_ticket(&t, "{}", Duration::from_millis(1))
            .await
            .unwrap()
    })
    .await;
    let outcome = with_ticket(&app, "tk-exp", &t).await;
    assert_eq!(close_code(&outcome), 4401, "{outcome:?}");
}

#[tokio::test]
async fn the_store_keeps_a_ticket_for_its_life_and_gives_it_once() {
    for backend in [Backend::Standalone, Backend::Cluster] {
        let app = TestApp::spawn(backend).await;
        let name = format!("{:032x}", rand_u128());
        assert!(app
            .store
            .issue_ticket(&name, "grant", Duration::from_secs(1))
            .await
            .unwrap());
        assert!(
            !app.store
                .issue_ticket(&name, "other", Duration::from_secs(1))
                .await
                .unwrap(),
            "a live ticket is never overwritten"
        );
        assert_eq!(
            app.store.redeem_ticket(&name).await.unwrap().as_deref(),
            Some("grant")
        );
        assert_eq!(app.store.redeem_ticket(&name).await.unwrap(), None);
        assert!(app
            .store
            .issue_ticket(&name, "short", Duration::from_secs(1))
            .await
            .unwrap());
        eventually("a 1 s ticket to expire", Duration::from_secs(5), || async {
            app.store
                .issue_ticket(&name, "probe", Duration::from_millis(1))
                .await
                .unwrap()
        })
        .await;
    }
}

fn rand_u128() -> u128 {
    uuid::Uuid::new_v4().as_u128()
}

#[tokio::test]
async fn refused_sockets_close_with_a_code_a_page_can_read() {
    let opts = Options {
        extra_args: vec!["--max-websockets-per-user".into(), "1".into()],
        ..Options::fast()
    };
    let app = TestApp::spawn_with(Backend::Standalone, opts).await;
    app.mirror("cc-mine", Some("alice"), ResourceState::Running)
        .await;
    app.mirror("cc-term", Some("alice"), ResourceState::Terminated)
        .await;
    let bearer = |t: String| vec![("authorization", format!("Bearer {t}"))];
    let alice = token("alice", &["user"]);
    let cases: [(&str, Headers, u16); 5] = [
        ("/v1/sessions/cc-mine/ws", vec![], 4401),
        (
            "/v1/sessions/cc-mine/ws",
            bearer(token("bob", &["user"])),
            4403,
        ),
        ("/v1/sessions/cc-none/ws", bearer(alice.clone()), 4404),
        ("/v1/sessions/cc-term/ws", bearer(service_token()), 4409),
        ("/v1/sessions/cc-mine/ws?access_token=nope", vec![], 4401),
    ];
    for (path, headers, code) in cases {
        match ws_attempt(&app, path, &headers).await {
            WsOutcome::Closed(got, reason) => {
                assert_eq!(got, code, "{path}: {reason}");
                assert!(!reason.is_empty() && reason.len() <= 123, "{reason}");
            }
            other => panic!("{path}: {other:?}"),
        }
    }
    // The user's one socket on this replica, then the limit.
    let first = app.ws_url(&format!("/v1/sessions/cc-mine/ws?access_token={alice}"));
    let (_held, _) = tokio_tungstenite::connect_async(first).await.unwrap();
    let over = ws_attempt(&app, "/v1/sessions/cc-mine/ws", &bearer(alice.clone())).await;
    assert_eq!(close_code(&over), 4429, "{over:?}");
    // A malformed request still gets its HTTP error.
    let bad = ws_attempt(&app, "/v1/sessions/NOPE/ws", &bearer(service_token())).await;
    assert_eq!(bad, WsOutcome::Http(400));
}

#[tokio::test]
async fn only_allowed_origins_may_upgrade() {
    let opts = with_args(&[
        "--ws-allowed-origins",
        "https://app.example.com, http://127.0.0.1:8080",
    ]);
    let app = TestApp::spawn_with(Backend::Standalone, opts).await;
    let path = format!("/v1/sessions/or-1/ws?access_token={}", service_token());
    let origin = |o: &str| vec![("origin", o.to_owned())];
    for allowed in ["https://app.example.com", "http://127.0.0.1:8080"] {
        let got = ws_attempt(&app, &path, &origin(allowed)).await;
        assert!(
            matches!(got, WsOutcome::Registered(_)),
            "{allowed}: {got:?}"
        );
    }
    for refused in [
        "https://evil.example",
        "https://app.example.com:444",
        "null",
    ] {
        let got = ws_attempt(&app, &path, &origin(refused)).await;
        assert_eq!(got, WsOutcome::Http(403), "{refused}");
    }
    // No Origin: not a browser page, so not the list's business.
    let got = ws_attempt(&app, &path, &[]).await;
    assert!(matches!(got, WsOutcome::Registered(_)), "{got:?}");
    // Any origin without a list.
    let open = TestApp::spawn(Backend::Standalone).await;
    let got = ws_attempt(&open, &path, &origin("https://evil.example")).await;
    assert!(matches!(got, WsOutcome::Registered(_)), "{got:?}");
}
