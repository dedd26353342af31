//! The `fake-kube` binary, driven the way the end-to-end harness will drive it.

use std::process::Stdio;

use axum::http::{header, Request};
use fake_kube::{InjectedFault, RecordedRequest};
use kube::{
    api::{Api, Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::{api_code, session_json, start, Session, NS, TIMEOUT};

fn post(uri: &str, body: &Value) -> Request<Vec<u8>> {
    Request::post(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(body).unwrap())
        .unwrap()
}

#[tokio::test]
async fn binary_serves_a_kubeconfig_and_the_control_api() {
    let dir = std::env::temp_dir().join(format!("fake-kube-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fake-kube"))
        .args(["--listen", "127.0.0.1:0", "--kubeconfig"])
        .arg(&kubeconfig)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let first = tokio::time::timeout(TIMEOUT, BufReader::new(stdout).lines().next_line())
        .await
        .expect("first line in time")
        .unwrap()
        .expect("a first line");
    let url = first
        .strip_prefix("listening on http://")
        .expect("address line");

    let mut config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::read_from(&kubeconfig).unwrap(),
        &KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        config.cluster_url.authority().map(|a| a.as_str()),
        Some(url)
    );
    config.default_retry = false;
    let client = kube::Client::try_from(config).unwrap();
    let api: Api<Session> = Api::default_namespaced(client.clone());

    let created: Value = client
        .request(post(
            "/_fake/sessions/default",
            &session_json("a", "running"),
        ))
        .await
        .unwrap();
    assert_eq!(created["metadata"]["namespace"], "default");
    assert_eq!(api.get("a").await.unwrap().spec.state, "running");

    let fail = json!({"count": 1, "status": 500});
    client
        .request_text(post("/_fake/fail-session-patches", &fail))
        .await
        .unwrap();
    let patch = Patch::Merge(json!({"spec": {"state": "hibernated"}}));
    let pp = PatchParams::default();
    assert_eq!(api_code(api.patch("a", &pp, &patch).await).0, 500);
    api.patch("a", &pp, &patch).await.unwrap();

    let recorded: Vec<RecordedRequest> = client
        .request(Request::get("/_fake/requests").body(Vec::new()).unwrap())
        .await
        .unwrap();
    let statuses: Vec<_> = recorded.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [500, 200]);

    let down = json!({"unavailable": true});
    client
        .request_text(post("/_fake/unavailable", &down))
        .await
        .unwrap();
    assert_eq!(api_code(api.get("a").await).0, 503);

    let pid = child.id().expect("still running").to_string();
    let term = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(term.success());
    let exit = tokio::time::timeout(TIMEOUT, child.wait())
        .await
        .expect("exit in time")
        .unwrap();
    assert!(exit.success(), "graceful exit on SIGTERM, got {exit}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn faults_are_injected_and_read_back_over_the_control_api() {
    let (fake, client) = start().await;
    let api: Api<Session> = Api::namespaced(client.clone(), NS);
    let created: Value = client
        .request(post(
            &format!("/_fake/sessions/{NS}"),
            &session_json("a", "running"),
        ))
        .await
        .unwrap();

    let rule = json!({
        "target": {"resource": "sessions", "operations": ["patch"], "name": "a"},
        "fault": {"type": "applied_but_error", "status": 500},
        "trigger": {"next": 1},
    });
    let added: Value = client.request(post("/_fake/faults", &rule)).await.unwrap();
    let patch = Patch::Merge(json!({"spec": {"state": "hibernated"}}));
    let answer = api.patch("a", &PatchParams::default(), &patch).await;
    assert_eq!(api_code(answer).0, 500);
    assert_eq!(api.get("a").await.unwrap().spec.state, "hibernated");

    let bad = json!({"fault": {"type": "error", "status": 200}, "trigger": "always"});
    let refused = client.request_text(post("/_fake/faults", &bad)).await;
    assert_eq!(api_code(refused).0, 422);
    let remove = || {
        Request::delete(format!("/_fake/faults/{}", added["id"]))
            .body(Vec::new())
            .unwrap()
    };
    client.request_text(remove()).await.unwrap();
    assert_eq!(api_code(client.request_text(remove()).await).0, 404);

    let recreated: Value = client
        .request(post(
            &format!("/_fake/sessions/{NS}/a/recreate"),
            &json!({"spec": {"state": "running"}}),
        ))
        .await
        .unwrap();
    assert_eq!(recreated["metadata"]["generation"], 1);
    assert_ne!(recreated["metadata"]["uid"], created["metadata"]["uid"]);
    for (path, body) in [
        ("/_fake/watch-gap", json!({"dropping": true})),
        ("/_fake/watch-gap", json!({"dropping": false})),
        ("/_fake/end-watches", json!({})),
        ("/_fake/expire-watches", json!({})),
        ("/_fake/release-hung", json!({})),
    ] {
        client.request_text(post(path, &body)).await.unwrap();
    }

    let injected: Vec<InjectedFault> = client
        .request(Request::get("/_fake/injected").body(Vec::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(injected, fake.injected_faults());
    let kinds: Vec<_> = injected
        .iter()
        .map(|f| serde_json::to_value(f).unwrap()["kind"].clone())
        .collect();
    assert_eq!(
        kinds,
        [
            "request",
            "recreated",
            "watch_gap",
            "watch_gap",
            "watches_ended",
            "history_compacted",
            "watches_ended",
            "hung_released"
        ]
    );
    let clear = Request::delete("/_fake/faults").body(Vec::new()).unwrap();
    client.request_text(clear).await.unwrap();
}
