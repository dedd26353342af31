//! Bad input of every kind gets its documented 4xx (docs/api.md), never a 5xx.

use reqwest::Method;
use serde_json::json;
use tracker_core::testing::Backend;

use crate::helpers::*;

struct Case {
    name: &'static str,
    method: Method,
    path: String,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
    field: Option<&'static str>,
}

fn case(
    name: &'static str,
    method: Method,
    path: impl Into<String>,
    body: impl Into<Vec<u8>>,
    status: u16,
    code: &'static str,
    field: Option<&'static str>,
) -> Case {
    Case {
        name,
        method,
        path: path.into(),
        content_type: Some("application/json"),
        body: body.into(),
        status,
        code,
        field,
    }
}

#[tokio::test]
async fn malformed_requests_get_their_4xx() {
    let app = TestApp::spawn(Backend::Standalone).await;
    let svc = service_token();
    let cid = app.register("valid-1", "vnc").await;
    let reg = "/v1/sessions/valid-1/connections";
    let post = Method::POST;

    let big_pairs: Vec<_> = (0..10_001)
        .map(|_| json!({"session_id": "s", "connection_id": cid}))
        .collect();
    let mut cases = vec![
        case(
            "malformed JSON",
            post.clone(),
            reg,
            "{\"protocol\":",
            400,
            "invalid_request",
            Some("body"),
        ),
        case(
            "not JSON at all",
            post.clone(),
            reg,
            "protocol=vnc",
            400,
            "invalid_request",
            Some("body"),
        ),
        case(
            "empty body",
            post.clone(),
            reg,
            "",
            400,
            "invalid_request",
            Some("body"),
        ),
        case(
            "array body",
            post.clone(),
            reg,
            "[\"vnc\"]",
            400,
            "invalid_request",
            Some("body"),
        ),
        case(
            "trailing garbage",
            post.clone(),
            reg,
            "{\"protocol\":\"vnc\"} x",
            400,
            "invalid_request",
            Some("body"),
        ),
        case(
            "invalid UTF-8",
            post.clone(),
            reg,
            b"{\"protocol\":\"\xff\"}".to_vec(),
            400,
            "invalid_request",
            None,
        ),
        case(
            "missing protocol",
            post.clone(),
            reg,
            "{}",
            400,
            "invalid_request",
            Some("protocol"),
        ),
        case(
            "null protocol",
            post.clone(),
            reg,
            "{\"protocol\":null}",
            400,
            "invalid_request",
            Some("protocol"),
        ),
        case(
            "wrong type",
            post.clone(),
            reg,
            "{\"protocol\":5}",
            400,
            "invalid_request",
            Some("protocol"),
        ),
        case(
            "unknown protocol",
            post.clone(),
            reg,
            "{\"protocol\":\"ssh\"}",
            400,
            "invalid_request",
            Some("protocol"),
        ),
        case(
            "unknown field",
            post.clone(),
            reg,
            "{\"protocol\":\"vnc\",\"colour\":1}",
            400,
            "invalid_request",
            Some("colour"),
        ),
        case(
            "bad client_ip",
            post.clone(),
            reg,
            "{\"protocol\":\"vnc\",\"client_ip\":\"10.0.0.256\"}",
            400,
            "invalid_request",
            Some("client_ip"),
        ),
        case(
            "client_ip with port",
            post.clone(),
            reg,
            "{\"protocol\":\"vnc\",\"client_ip\":\"10.0.0.1:80\"}",
            400,
            "invalid_request",
            Some("client_ip"),
        ),
        case(
            "bad connection_id",
            post.clone(),
            reg,
            "{\"protocol\":\"vnc\",\"connection_id\":\"nope\"}",
            400,
            "invalid_request",
            Some("connection_id"),
        ),
        case(
            "empty user_id",
            post.clone(),
            reg,
            "{\"protocol\":\"vnc\",\"user_id\":\"\"}",
            400,
            "invalid_request",
            Some("user_id"),
        ),
        case(
            "control char user_id",
            post.clone(),
            reg,
            "{\"protocol\":\"vnc\",\"user_id\":\"a\\u0007b\"}",
            400,
            "invalid_request",
            Some("user_id"),
        ),
        case(
            "long user_id",
            post.clone(),
            reg,
            format!(
                "{{\"protocol\":\"vnc\",\"user_id\":\"{}\"}}",
                "u".repeat(256)
            ),
            400,
            "invalid_request",
            Some("user_id"),
        ),
        case(
            "NUL byte in user_agent",
            post.clone(),
            reg,
            "{\"protocol\":\"vnc\",\"user_agent\":\"a\\u0000b\"}",
            400,
            "invalid_request",
            Some("user_agent"),
        ),
        case(
            "DEL in user_agent",
            post.clone(),
            reg,
            "{\"protocol\":\"vnc\",\"user_agent\":\"a\\u007fb\"}",
            400,
            "invalid_request",
            Some("user_agent"),
        ),
        case(
            "NUL byte in user_id",
            post.clone(),
            reg,
            "{\"protocol\":\"vnc\",\"user_id\":\"a\\u0000b\"}",
            400,
            "invalid_request",
            Some("user_id"),
        ),
        case(
            "user_agent not a string",
            post.clone(),
            reg,
            "{\"protocol\":\"vnc\",\"user_agent\":[1]}",
            400,
            "invalid_request",
            Some("user_agent"),
        ),
        case(
            "uppercase session id",
            post.clone(),
            "/v1/sessions/Valid/connections",
            "{\"protocol\":\"vnc\"}",
            400,
            "invalid_request",
            Some("session_id"),
        ),
        case(
            "session id with underscore",
            post.clone(),
            "/v1/sessions/a_b/connections",
            "{\"protocol\":\"vnc\"}",
            400,
            "invalid_request",
            Some("session_id"),
        ),
        case(
            "session id too long",
            post.clone(),
            format!("/v1/sessions/{}/connections", "a".repeat(254)),
            "{\"protocol\":\"vnc\"}",
            400,
            "invalid_request",
            Some("session_id"),
        ),
        case(
            "session id percent-encoded junk",
            Method::GET,
            "/v1/sessions/%E2%82%AC",
            "",
            400,
            "invalid_request",
            Some("session_id"),
        ),
        case(
            "bad connection id in path",
            post.clone(),
            "/v1/sessions/valid-1/connections/nope/heartbeat",
            "",
            400,
            "invalid_request",
            Some("connection_id"),
        ),
        case(
            "bad connection id to close",
            Method::DELETE,
            "/v1/sessions/valid-1/connections/123",
            "",
            400,
            "invalid_request",
            Some("connection_id"),
        ),
        case(
            "bad connection id to get",
            Method::GET,
            "/v1/connections/xyz",
            "",
            400,
            "invalid_request",
            Some("connection_id"),
        ),
        case(
            "oversize body",
            post.clone(),
            reg,
            vec![b' '; 1024 * 1024 + 1],
            413,
            "payload_too_large",
            None,
        ),
        case(
            "oversize heartbeat body",
            post.clone(),
            format!("/v1/sessions/valid-1/connections/{cid}/heartbeat"),
            vec![b' '; 1024 * 1024 + 1],
            413,
            "payload_too_large",
            None,
        ),
        case(
            "empty batch",
            post.clone(),
            "/v1/heartbeats",
            "{\"heartbeats\":[]}",
            400,
            "invalid_request",
            Some("heartbeats"),
        ),
        case(
            "batch missing list",
            post.clone(),
            "/v1/heartbeats",
            "{}",
            400,
            "invalid_request",
            Some("heartbeats"),
        ),
        case(
            "batch over 10,000",
            post.clone(),
            "/v1/heartbeats",
            serde_json::to_vec(&json!({"heartbeats": big_pairs})).unwrap(),
            400,
            "invalid_request",
            Some("heartbeats"),
        ),
        case(
            "batch bad session id",
            post.clone(),
            "/v1/heartbeats",
            format!("{{\"heartbeats\":[{{\"session_id\":\"X\",\"connection_id\":\"{cid}\"}}]}}"),
            400,
            "invalid_request",
            Some("heartbeats[0].session_id"),
        ),
        case(
            "batch bad connection id",
            post.clone(),
            "/v1/heartbeats",
            "{\"heartbeats\":[{\"session_id\":\"s\",\"connection_id\":1}]}",
            400,
            "invalid_request",
            Some("heartbeats[0].connection_id"),
        ),
        case(
            "batch unknown pair field",
            post.clone(),
            "/v1/heartbeats",
            format!(
                "{{\"heartbeats\":[{{\"session_id\":\"s\",\"connection_id\":\"{cid}\",\"x\":1}}]}}"
            ),
            400,
            "invalid_request",
            Some("heartbeats[0].x"),
        ),
        case(
            "batch over 4 MiB",
            post.clone(),
            "/v1/heartbeats",
            vec![b' '; 4 * 1024 * 1024 + 1],
            413,
            "payload_too_large",
            None,
        ),
        case(
            "history bad limit",
            Method::GET,
            "/v1/sessions/valid-1/history?limit=lots",
            "",
            400,
            "invalid_request",
            Some("limit"),
        ),
        case(
            "history bad before",
            Method::GET,
            "/v1/sessions/valid-1/history?before=yesterday",
            "",
            400,
            "invalid_request",
            Some("before"),
        ),
        case(
            "unknown route",
            Method::GET,
            "/v2/everything",
            "",
            404,
            "not_found",
            None,
        ),
        case(
            "wrong method",
            Method::PUT,
            reg,
            "{}",
            405,
            "method_not_allowed",
            None,
        ),
        case(
            "ws without upgrade",
            Method::GET,
            "/v1/sessions/valid-1/ws",
            "",
            400,
            "invalid_request",
            Some("Upgrade"),
        ),
    ];
    let mut no_type = case(
        "no content type",
        post.clone(),
        reg,
        "{\"protocol\":\"vnc\"}",
        400,
        "invalid_request",
        Some("Content-Type"),
    );
    no_type.content_type = None;
    cases.push(no_type);
    let mut text = case(
        "text content type",
        post.clone(),
        reg,
        "{\"protocol\":\"vnc\"}",
        400,
        "invalid_request",
        Some("Content-Type"),
    );
    text.content_type = Some("text/plain");
    cases.push(text);

    let mut failures = Vec::new();
    for c in cases {
        let mut req = app
            .client
            .request(c.method.clone(), app.url(&c.path))
            .bearer_auth(&svc)
            .body(c.body.clone());
        if let Some(ct) = c.content_type {
            req = req.header("content-type", ct);
        }
        let res = req.send().await.unwrap();
        let (status, code, field) = error_code(res).await;
        let field_ok = c.field.is_none_or(|f| field.as_deref() == Some(f));
        if status != c.status || code != c.code || !field_ok {
            failures.push(format!(
                "{}: expected {} {} {:?}, got {status} {code} {field:?}",
                c.name, c.status, c.code, c.field
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // None of it hurt: the valid connection is still there and nothing 5xx'd.
    let metrics = app.metrics().await;
    assert!(!metrics.contains("status=\"5xx\""), "{metrics}");
    let res = app
        .post(
            &format!("/v1/sessions/valid-1/connections/{cid}/heartbeat"),
            &svc,
            json!({}),
        )
        .await;
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn user_agents_are_cut_not_refused() {
    let app = TestApp::spawn(Backend::Standalone).await;
    let ua = "é".repeat(400);
    let res = app
        .post(
            "/v1/sessions/ua-1/connections",
            &service_token(),
            json!({"protocol": "http", "user_agent": ua}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(
        body["connection"]["user_agent"].as_str().unwrap().len(),
        512
    );
}
