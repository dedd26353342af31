//! The hardening of docs/security.md, each point from the outside: slow and
//! idle connections, the connection cap, the request timeout, the auth
//! matrix (every refused token), client addresses, and where ops routes
//! answer. No case may produce a 5xx.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracker_core::testing::Backend;
use tracker_core::ResourceState;

use crate::helpers::*;

/// Generous: only a server that never closes fails it.
const CLOSE_BOUND: Duration = Duration::from_secs(10);

fn with_args(args: &[&str]) -> Options {
    Options {
        extra_args: args.iter().map(|s| (*s).to_owned()).collect(),
        ..Options::default()
    }
}

/// Reads until the server closes the connection; the bytes it sent.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(CLOSE_BOUND, read_all)
        .await
        .expect("the server closes the connection");
    out
}

#[tokio::test]
async fn half_requests_and_idle_keepalives_are_dropped() {
    let app = TestApp::spawn_with(
        Backend::Standalone,
        with_args(&["--header-timeout", "300ms", "--keepalive-timeout", "300ms"]),
    )
    .await;

    // Half a request line, then silence.
    let mut half = TcpStream::connect(app.addr).await.unwrap();
    half.write_all(b"GET /healt").await.unwrap();
    // A complete head, minus its final blank line.
    let mut no_end = TcpStream::connect(app.addr).await.unwrap();
    no_end
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Says nothing at all.
    let mut silent = TcpStream::connect(app.addr).await.unwrap();
    // One request answered, then idle on keep-alive.
    let mut idle = TcpStream::connect(app.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();

    let (half, no_end, silent, idle) = tokio::join!(
        read_until_closed(&mut half),
        read_until_closed(&mut no_end),
        read_until_closed(&mut silent),
        read_until_closed(&mut idle),
    );
    // The incomplete heads get nothing useful; the idle one got its answer.
    for (what, bytes) in [("half", &half), ("no end", &no_end), ("silent", &silent)] {
        assert!(
            !String::from_utf8_lossy(bytes).contains("200 OK"),
            "{what}: {}",
            String::from_utf8_lossy(bytes)
        );
    }
    assert!(String::from_utf8_lossy(&idle).starts_with("HTTP/1.1 200 OK"));

    let m = app.metrics().await;
    assert!(
        m.contains("tracker_api_timeouts_total{timeout=\"header\"}"),
        "{m}"
    );
    assert!(
        m.contains("tracker_api_timeouts_total{timeout=\"keepalive\"}"),
        "{m}"
    );
}

#[tokio::test]
async fn a_slow_body_ends_with_408_not_a_held_connection() {
    let app = TestApp::spawn_with(
        Backend::Standalone,
        with_args(&["--request-timeout", "300ms"]),
    )
    .await;
    let mut s = TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /v1/sessions/slow/connections HTTP/1.1\r\nHost: x\r\n\
         Authorization: Bearer {}\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\n\r\n{{\"protocol\"",
        service_token()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let answer = read_until_closed(&mut s).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
    assert!(app
        .metrics()
        .await
        .contains("tracker_api_timeouts_total{timeout=\"request\"} 1"));
}

#[tokio::test]
async fn websockets_outlive_the_request_and_idle_timeouts() {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let opts = Options {
        extra_args: [
            "--request-timeout",
            "100ms",
            "--header-timeout",
            "100ms",
            "--keepalive-timeout",
            "100ms",
        ]
        .map(String::from)
        .to_vec(),
        ..Options::fast()
    };
    let app = TestApp::spawn_with(Backend::Standalone, opts).await;
    let url = app.ws_url(&format!(
        "/v1/sessions/ws-timeouts/ws?access_token={}",
        service_token()
    ));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    // The server pings every 100 ms from the upgrade on: five pings mean
    // the socket lived well past every 100 ms timeout above.
    let mut pings = 0;
    while pings < 5 {
        match tokio::time::timeout(CLOSE_BOUND, ws.next()).await {
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(Some(Ok(Message::Close(f)))) => panic!("closed: {f:?}"),
            Ok(Some(Ok(_))) => {}
            other => panic!("socket ended: {other:?}"),
        }
    }
}

#[tokio::test]
async fn open_connections_are_capped_and_ops_stay_reachable() {
    let opts = with_args(&[
        "--max-open-connections",
        "2",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let app = TestApp::spawn_with(Backend::Standalone, opts).await;
    let ops = app.ops_url("/metrics");
    let gauge = |text: String| {
        text.lines()
            .find_map(|l| l.strip_prefix("tracker_api_connections_open "))
            .map(str::to_owned)
    };
    // Two keep-alive connections take both places on the API port.
    let mut a = TcpStream::connect(app.addr).await.unwrap();
    let b = TcpStream::connect(app.addr).await.unwrap();
    a.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    assert!(a.read(&mut buf).await.unwrap() > 0);
    eventually("two open connections", CLOSE_BOUND, || async {
        let text = app
            .client
            .get(&ops)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        gauge(text).as_deref() == Some("3")
    })
    .await;
    // (The third open connection is the scrape's own, on the ops port.)
    let mut third = tokio::spawn({
        let client = reqwest::Client::new();
        let url = app.url("/healthz");
        async move { client.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    // A negative check can only wait a while; a broken cap fails it at once.
    let early = tokio::time::timeout(Duration::from_millis(300), &mut third).await;
    assert!(early.is_err(), "a third connection was served at the cap");
    drop(b);
    let status = tokio::time::timeout(CLOSE_BOUND, third)
        .await
        .expect("served once a place is free")
        .unwrap()
        .unwrap();
    assert_eq!(status, 200);
    drop(a);
}

#[tokio::test]
async fn ops_routes_leave_the_public_port_with_their_own_listener() {
    let opts = with_args(&["--metrics-listen", "127.0.0.1:0"]);
    let app = TestApp::spawn_with(Backend::Standalone, opts).await;
    for (path, public, ops) in [
        ("/metrics", 404, 200),
        ("/readyz", 404, 200),
        ("/openapi.json", 404, 200),
        ("/healthz", 200, 200),
    ] {
        let p = app.client.get(app.url(path)).send().await.unwrap();
        let o = app.client.get(app.ops_url(path)).send().await.unwrap();
        assert_eq!(
            (p.status().as_u16(), o.status().as_u16()),
            (public, ops),
            "{path}"
        );
    }
}

fn key_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/keys")
        .join(name)
}

fn key(name: &str) -> Vec<u8> {
    std::fs::read(key_path(name)).unwrap()
}

fn signed(alg: Algorithm, private: &str, claims: &Value) -> String {
    let pem = key(private);
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        other => panic!("no test key for {other:?}"),
    }
    .unwrap();
    encode(&Header::new(alg), claims, &key).unwrap()
}

fn hs(alg: Algorithm, secret: &[u8], claims: &Value) -> String {
    encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret)).unwrap()
}

/// An unsigned token (`alg: none`), which no library should accept.
fn unsigned(claims: &Value) -> String {
    format!(
        "{}.{}.",
        base64_url(br#"{"alg":"none","typ":"JWT"}"#),
        base64_url(claims.to_string().as_bytes())
    )
}

fn base64_url(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn claims(extra: Value) -> Value {
    let mut c = json!({"sub": "proxy", "roles": ["service"], "exp": now() + 600});
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            c.insert(k.clone(), v.clone());
        }
    }
    c
}

/// `GET /v1/stats` with `token`: its status.
async fn stats_status(app: &TestApp, token: Option<&str>) -> u16 {
    let mut req = app.client.get(app.url("/v1/stats"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap().status().as_u16()
}

/// Every token the HS256 deployment must refuse (and the ones next to them
/// it must accept, so the refusals are about the one thing changed).
#[tokio::test]
async fn auth_matrix_hs256_with_issuer_and_audience() {
    let app = TestApp::spawn_with(
        Backend::Standalone,
        with_args(&[
            "--jwt-issuer",
            "https://idp.test",
            "--jwt-audience",
            "tracker",
        ]),
    )
    .await;
    let good = |extra: Value| {
        let mut c = claims(json!({"iss": "https://idp.test", "aud": "tracker"}));
        if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                if v.is_null() {
                    c.remove(k);
                } else {
                    c.insert(k.clone(), v.clone());
                }
            }
        }
        c
    };
    let s = SECRET.as_bytes();
    let cases: Vec<(&str, Option<String>, u16)> = vec![
        (
            "valid",
            Some(hs(Algorithm::HS256, s, &good(json!({})))),
            200,
        ),
        ("no token", None, 401),
        ("not a jwt", Some("a.b.c".into()), 401),
        (
            "wrong secret",
            Some(hs(
                Algorithm::HS256,
                b"another-secret-another-secret-!!",
                &good(json!({})),
            )),
            401,
        ),
        ("alg none", Some(unsigned(&good(json!({})))), 401),
        (
            "HS384 with the right secret",
            Some(hs(Algorithm::HS384, s, &good(json!({})))),
            401,
        ),
        (
            "RS256 in HS256 mode",
            Some(signed(
                Algorithm::RS256,
                "rsa-private.pem",
                &good(json!({})),
            )),
            401,
        ),
        (
            "expired beyond the leeway",
            Some(hs(Algorithm::HS256, s, &good(json!({"exp": now() - 30})))),
            401,
        ),
        (
            "expired within the leeway",
            Some(hs(Algorithm::HS256, s, &good(json!({"exp": now() - 1})))),
            200,
        ),
        (
            "no exp",
            Some(hs(Algorithm::HS256, s, &good(json!({"exp": null})))),
            401,
        ),
        (
            "nbf ahead",
            Some(hs(Algorithm::HS256, s, &good(json!({"nbf": now() + 60})))),
            401,
        ),
        (
            "nbf within the leeway",
            Some(hs(Algorithm::HS256, s, &good(json!({"nbf": now() + 1})))),
            200,
        ),
        (
            "nbf not a number",
            Some(hs(Algorithm::HS256, s, &good(json!({"nbf": "soon"})))),
            401,
        ),
        (
            "wrong iss",
            Some(hs(
                Algorithm::HS256,
                s,
                &good(json!({"iss": "https://evil.test"})),
            )),
            401,
        ),
        (
            "no iss",
            Some(hs(Algorithm::HS256, s, &good(json!({"iss": null})))),
            401,
        ),
        (
            "wrong aud",
            Some(hs(Algorithm::HS256, s, &good(json!({"aud": "billing"})))),
            401,
        ),
        (
            "no aud",
            Some(hs(Algorithm::HS256, s, &good(json!({"aud": null})))),
            401,
        ),
        (
            "aud list with ours",
            Some(hs(
                Algorithm::HS256,
                s,
                &good(json!({"aud": ["billing", "tracker"]})),
            )),
            200,
        ),
        (
            "empty sub",
            Some(hs(Algorithm::HS256, s, &good(json!({"sub": ""})))),
            401,
        ),
        (
            "roles not a list",
            Some(hs(Algorithm::HS256, s, &good(json!({"roles": "admin"})))),
            401,
        ),
        (
            "no known role",
            Some(hs(Algorithm::HS256, s, &good(json!({"roles": ["root"]})))),
            403,
        ),
        (
            "user on a service route",
            Some(hs(Algorithm::HS256, s, &good(json!({"roles": ["user"]})))),
            403,
        ),
    ];
    for (what, token, want) in cases {
        let got = stats_status(&app, token.as_deref()).await;
        assert_eq!(got, want, "{what}");
    }
}

#[tokio::test]
async fn tokens_without_aud_are_refused_when_no_audience_is_set() {
    let app = TestApp::spawn(Backend::Standalone).await;
    let s = SECRET.as_bytes();
    assert_eq!(
        stats_status(&app, Some(&hs(Algorithm::HS256, s, &claims(json!({}))))).await,
        200
    );
    // A token made for another service must not open this one.
    let other = hs(Algorithm::HS256, s, &claims(json!({"aud": "billing"})));
    assert_eq!(stats_status(&app, Some(&other)).await, 401);
}

/// Each public-key kind: its tokens pass, and no HS256 token does, least
/// of all one whose HMAC key is the public key's own PEM text.
#[tokio::test]
async fn public_keys_accept_their_algorithm_only() {
    for (alg, private, public) in [
        (Algorithm::RS256, "rsa-private.pem", "rsa-public.pem"),
        (Algorithm::ES256, "ec-private.pem", "ec-public.pem"),
        (
            Algorithm::EdDSA,
            "ed25519-private.pem",
            "ed25519-public.pem",
        ),
    ] {
        let path = key_path(public);
        let app = TestApp::spawn_with(
            Backend::Standalone,
            with_args(&["--jwt-public-key-file", path.to_str().unwrap()]),
        )
        .await;
        let c = claims(json!({}));
        let cases: Vec<(&str, String, u16)> = vec![
            ("own algorithm", signed(alg, private, &c), 200),
            (
                "the HS256 secret",
                hs(Algorithm::HS256, SECRET.as_bytes(), &c),
                401,
            ),
            (
                "HS256 keyed with the public PEM",
                hs(Algorithm::HS256, &key(public), &c),
                401,
            ),
            (
                "expired",
                signed(alg, private, &claims(json!({"exp": now() - 30}))),
                401,
            ),
            ("unsigned", unsigned(&c), 401),
        ];
        for (what, token, want) in cases {
            assert_eq!(
                stats_status(&app, Some(&token)).await,
                want,
                "{alg:?}: {what}"
            );
        }
        // Another kind's key does not verify.
        let foreign = if alg == Algorithm::RS256 {
            signed(Algorithm::ES256, "ec-private.pem", &c)
        } else {
            signed(Algorithm::RS256, "rsa-private.pem", &c)
        };
        assert_eq!(
            stats_status(&app, Some(&foreign)).await,
            401,
            "{alg:?}: foreign"
        );
    }
}

/// A plain user cannot choose the address stored for its connection; a
/// service can. `X-Forwarded-For` counts only from a trusted proxy.
#[tokio::test]
async fn client_ip_comes_from_the_connection_for_users() {
    async fn stored_ip(app: &TestApp, token: &str, xff: Option<&str>, body: Value) -> Value {
        let mut req = app
            .client
            .post(app.url("/v1/sessions/ip-1/connections"))
            .bearer_auth(token)
            .json(&body);
        if let Some(xff) = xff {
            req = req.header("x-forwarded-for", xff);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 201);
        let body: Value = res.json().await.unwrap();
        body["connection"]["client_ip"].clone()
    }
    let spoof = json!({"protocol": "vnc", "client_ip": "203.0.113.99"});
    let alice = token("alice", &["user"]);

    let untrusted = TestApp::spawn(Backend::Standalone).await;
    untrusted
        .mirror("ip-1", Some("alice"), ResourceState::Running)
        .await;
    let cases: Vec<(&str, &str, Option<&str>, Value, &str)> = vec![
        (
            "user's body client_ip is ignored",
            alice.as_str(),
            None,
            spoof.clone(),
            "127.0.0.1",
        ),
        (
            "user's XFF from an untrusted peer is ignored",
            alice.as_str(),
            Some("198.51.100.1"),
            spoof.clone(),
            "127.0.0.1",
        ),
    ];
    for (what, tok, xff, body, want) in cases {
        assert_eq!(stored_ip(&untrusted, tok, xff, body).await, want, "{what}");
    }
    let svc = service_token();
    assert_eq!(
        stored_ip(&untrusted, &svc, None, spoof.clone()).await,
        "203.0.113.99",
        "a service states the client's address"
    );

    let behind_lb = TestApp::spawn_on(
        &untrusted.store_cfg,
        with_args(&["--trusted-proxies", "127.0.0.0/8"]),
    )
    .await;
    let cases: Vec<(&str, Option<&str>, &str)> = vec![
        (
            "trusted peer: rightmost untrusted hop",
            Some("6.6.6.6, 198.51.100.1"),
            "198.51.100.1",
        ),
        (
            "trusted hops skipped",
            Some("198.51.100.1, 127.0.0.5"),
            "198.51.100.1",
        ),
        ("no header: the peer", None, "127.0.0.1"),
    ];
    for (what, xff, want) in cases {
        assert_eq!(
            stored_ip(&behind_lb, &alice, xff, spoof.clone()).await,
            want,
            "{what}"
        );
    }
}

/// One replica holds at most `--max-websockets-per-user` sockets of a plain
/// user, and gives the place back when one closes; a WebSocket's address is
/// its peer's, whatever `X-Forwarded-For` says from an untrusted peer.
#[tokio::test]
async fn websockets_per_user_are_capped_and_keep_their_own_address() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    let app = TestApp::spawn_with(
        Backend::Standalone,
        with_args(&["--max-websockets-per-user", "1"]),
    )
    .await;
    app.mirror("ws-cap", Some("alice"), ResourceState::Running)
        .await;
    let alice = token("alice", &["user"]);
    let connect = || async {
        let mut req = app
            .ws_url("/v1/sessions/ws-cap/ws")
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {alice}").parse().unwrap());
        req.headers_mut()
            .insert("x-forwarded-for", "203.0.113.5".parse().unwrap());
        tokio_tungstenite::connect_async(req).await
    };
    let (mut first, _) = connect().await.expect("the first socket");
    let frame = match tokio::time::timeout(CLOSE_BOUND, first.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<Value>(t.as_str()).unwrap(),
        other => panic!("no registered frame: {other:?}"),
    };
    assert_eq!(frame["connection"]["client_ip"], "127.0.0.1");
    let over = ws_attempt(
        &app,
        "/v1/sessions/ws-cap/ws",
        &[("authorization", format!("Bearer {alice}"))],
    )
    .await;
    assert_eq!(
        close_code(&over),
        4429,
        "a second socket over the cap: {over:?}"
    );
    // A service is not counted.
    let svc = app.ws_url(&format!(
        "/v1/sessions/ws-cap/ws?access_token={}",
        service_token()
    ));
    let (_svc_socket, _) = tokio_tungstenite::connect_async(svc)
        .await
        .expect("a service socket");

    first.send(Message::Close(None)).await.unwrap();
    while let Ok(Some(Ok(_))) = tokio::time::timeout(CLOSE_BOUND, first.next()).await {}
    let deadline = tokio::time::Instant::now() + CLOSE_BOUND;
    loop {
        let again = ws_attempt(
            &app,
            "/v1/sessions/ws-cap/ws",
            &[("authorization", format!("Bearer {alice}"))],
        )
        .await;
        match again {
            WsOutcome::Registered(_) => break,
            WsOutcome::Closed(4429, _) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the place never came back"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("{other:?}"),
        }
    }
}

/// Nothing above may make the server fail: every refused request is a 4xx.
#[tokio::test]
async fn refusals_are_never_5xx() {
    let app = TestApp::spawn(Backend::Standalone).await;
    app.mirror("mine", Some("alice"), ResourceState::Running)
        .await;
    let alice = token("alice", &["user"]);
    let bob = token("bob", &["user"]);
    let expired = token_with(
        SECRET,
        json!({"sub": "alice", "roles": ["user"], "exp": now() - 60}),
    );
    let cases: Vec<(&str, reqwest::RequestBuilder, u16)> = vec![
        (
            "another user's session",
            app.client
                .post(app.url("/v1/sessions/mine/connections"))
                .bearer_auth(&bob)
                .json(&json!({"protocol": "vnc"})),
            403,
        ),
        (
            "acting as another user",
            app.client
                .post(app.url("/v1/sessions/mine/connections"))
                .bearer_auth(&alice)
                .json(&json!({"protocol": "vnc", "user_id": "bob"})),
            403,
        ),
        (
            "expired token",
            app.client
                .get(app.url("/v1/sessions/mine"))
                .bearer_auth(&expired),
            401,
        ),
        (
            "garbage bearer",
            app.client
                .get(app.url("/v1/sessions/mine"))
                .header("authorization", "Bearer \u{e9}"),
            401,
        ),
        (
            "basic auth",
            app.client
                .get(app.url("/v1/sessions/mine"))
                .header("authorization", "Basic eDp5"),
            401,
        ),
        (
            "user on stats",
            app.client.get(app.url("/v1/stats")).bearer_auth(&alice),
            403,
        ),
        (
            "websocket route without a handshake",
            app.client
                .get(app.url("/v1/sessions/mine/ws?access_token=x")),
            400,
        ),
    ];
    for (what, req, want) in cases {
        let res = req.send().await.unwrap();
        assert_eq!(res.status().as_u16(), want, "{what}");
    }
}

/// What a started process prints, at debug level, and what `--help` says,
/// hold none of the secrets it was given.
#[tokio::test]
async fn secrets_stay_out_of_logs_and_help() {
    let bin = env!("CARGO_BIN_EXE_tracker-api");
    let redis =
        std::env::var("TRACKER_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    // Redis's default user takes any password, so the app does start.
    let redis_with_password = redis.replacen("redis://", "redis://default:redis-pw-0451@", 1);
    let jwt = "jwt-secret-0451-jwt-secret-0451-jwt";
    let db = "postgres://postgres:pg-pw-0451@127.0.0.1:5432/test";
    let secrets = ["redis-pw-0451", "jwt-secret-0451", "pg-pw-0451"];
    let env = [
        ("TRACKER_REDIS_URL", redis_with_password.as_str()),
        ("TRACKER_JWT_SECRET", jwt),
        ("TRACKER_DATABASE_URL", db),
    ];

    let help = std::process::Command::new(bin)
        .arg("--help")
        .envs(env)
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("TRACKER_REDIS_URL"), "{help}");
    for s in secrets {
        assert!(!help.contains(s), "{s} in --help:\n{help}");
    }

    let dir = std::env::temp_dir().join(format!("tracker-api-secrets-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let log_path = dir.join("out.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = std::process::Command::new(bin)
        .envs(env)
        .env("TRACKER_LISTEN", "127.0.0.1:0")
        .env(
            "TRACKER_KEY_PREFIX",
            format!("secrets-{}", uuid::Uuid::new_v4().simple()),
        )
        .env("RUST_LOG", "debug")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let read = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let addr = tokio::time::timeout(CLOSE_BOUND, async {
        loop {
            if let Some(addr) = read()
                .lines()
                .find(|l| l.contains("listening"))
                .and_then(|l| l.split("addr=").nth(1))
                .and_then(|a| a.split_whitespace().next())
                .and_then(|a| a.parse::<SocketAddr>().ok())
            {
                return addr;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let Ok(addr) = addr else {
        let _ = child.kill();
        panic!("the API did not start:\n{}", read());
    };
    // Requests that touch Redis and PostgreSQL, and a refused token.
    let client = reqwest::Client::new();
    let tok = token_with(
        jwt,
        json!({"sub": "proxy", "roles": ["service"], "exp": now() + 60}),
    );
    for path in ["/v1/stats", "/v1/sessions/s-1/history", "/readyz"] {
        let res = client
            .get(format!("http://{addr}{path}"))
            .bearer_auth(&tok)
            .send()
            .await
            .unwrap();
        assert!(
            res.status().as_u16() < 500 || path.ends_with("history"),
            "{path}"
        );
    }
    let _ = client
        .get(format!("http://{addr}/v1/stats"))
        .bearer_auth("x.y.z")
        .send()
        .await;
    // A WebSocket ticket, used and then refused: the ticket is a credential too.
    let res = client
        .post(format!("http://{addr}/v1/sessions/s-1/ws-ticket"))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 201);
    let ticket = res.json::<Value>().await.unwrap()["ticket"]
        .as_str()
        .unwrap()
        .to_owned();
    for _ in 0..2 {
        use futures::StreamExt;
        let url = format!("ws://{addr}/v1/sessions/s-1/ws?ticket={ticket}");
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let _ = tokio::time::timeout(CLOSE_BOUND, async {
            while let Some(Ok(msg)) = ws.next().await {
                if msg.is_text() {
                    let _ = ws.close(None).await;
                }
                if msg.is_close() {
                    break;
                }
            }
        })
        .await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let out = read();
    assert!(out.contains("DEBUG"), "a debug log:\n{out}");
    assert!(
        out.contains("websocket refused"),
        "the reuse was refused:\n{out}"
    );
    for s in secrets.iter().copied().chain([ticket.as_str()]) {
        assert!(!out.contains(s), "{s} in the log:\n{out}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Settings the process refuses to start with, each with one line naming
/// the setting, and a nonzero exit.
#[test]
fn unsafe_settings_refuse_to_start() {
    let bin = env!("CARGO_BIN_EXE_tracker-api");
    let private = key_path("rsa-private.pem");
    // What, the settings, and a word the refusal must contain.
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "short secret",
            vec![("TRACKER_JWT_SECRET", "short")],
            "TRACKER_JWT_SECRET",
        ),
        ("no secret", vec![], "TRACKER_JWT_SECRET"),
        (
            "auth disabled on all interfaces",
            vec![
                ("TRACKER_AUTH", "disabled"),
                ("TRACKER_LISTEN", "0.0.0.0:0"),
            ],
            "TRACKER_AUTH=disabled",
        ),
        (
            "a private key as the public key",
            vec![("TRACKER_JWT_PUBLIC_KEY_FILE", private.to_str().unwrap())],
            "TRACKER_JWT_PUBLIC_KEY_FILE",
        ),
        (
            "a missing key file",
            vec![("TRACKER_JWT_PUBLIC_KEY_FILE", "/nonexistent/key.pem")],
            "TRACKER_JWT_PUBLIC_KEY_FILE",
        ),
        (
            "bad proxy list",
            vec![
                ("TRACKER_JWT_SECRET", SECRET),
                ("TRACKER_TRUSTED_PROXIES", "10.0.0.0/99"),
            ],
            "10.0.0.0/99",
        ),
    ];
    for (what, env, needle) in cases {
        let out = std::process::Command::new(bin)
            .env_clear()
            .env("TRACKER_LISTEN", "127.0.0.1:0")
            // Nothing answers there: a case that got past its check would
            // fail later, on Redis, and say so.
            .env("TRACKER_REDIS_URL", "redis://127.0.0.1:1")
            .env("TRACKER_REDIS_TIMEOUT", "200ms")
            .envs(env)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{what}: started");
        let text = format!("{stderr}{stdout}");
        let line = text
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{what}: no line naming {needle}:\n{text}"));
        assert!(
            !line.contains("redis"),
            "{what}: got as far as Redis: {line}"
        );
    }
}
