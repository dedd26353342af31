//! The `fake-kube` binary, driven the way the end-to-end harness will drive it.

use std::process::Stdio;

use axum::http::{header, Request};
use fake_kube::RecordedRequest;
use kube::{
    api::{Api, Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::{api_code, session_json, Session, TIMEOUT};

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
