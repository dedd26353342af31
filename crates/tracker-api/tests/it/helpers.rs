//! The spawned app, tokens, and bounded waiting.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracker_api::config::Config;
use tracker_api::history::History;
use tracker_api::Application;
use tracker_core::testing::{config, connect, Backend};
use tracker_core::{IdleTimeout, ResourceState, SessionMeta, Store, StoreConfig};

/// At least 32 bytes, as the API demands of an HS256 secret.
pub const SECRET: &str = "test-secret-of-the-api-0123456789";

/// What a test may change about the spawned app.
#[derive(Debug, Clone)]
pub struct Options {
    pub interval: Duration,
    pub window: Duration,
    pub extra_args: Vec<String>,
    pub history: Option<History>,
    pub shutdown_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(20),
            window: Duration::from_secs(60),
            extra_args: Vec::new(),
            history: None,
            shutdown_timeout: Duration::from_secs(5),
        }
    }
}

impl Options {
    /// Short heartbeat timing for WebSocket tests.
    pub fn fast() -> Self {
        Self {
            interval: Duration::from_millis(100),
            window: Duration::from_millis(400),
            ..Self::default()
        }
    }
}

/// One running API instance on port 0, with a store of its own prefix.
pub struct TestApp {
    pub addr: SocketAddr,
    /// The ops listener, with `--metrics-listen`.
    pub ops_addr: Option<SocketAddr>,
    pub base: String,
    /// The test's own view of the same keys (to mirror sessions, inspect).
    pub store: Store,
    pub store_cfg: StoreConfig,
    pub client: reqwest::Client,
    pub shutdown: CancellationToken,
    pub handle: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> Self {
        Self::spawn_with(backend, Options::default()).await
    }

    pub async fn spawn_with(backend: Backend, opts: Options) -> Self {
        let store_cfg = config(backend, opts.window);
        Self::spawn_on(&store_cfg, opts).await
    }

    /// Another instance on the same keys as `store_cfg` (a second replica).
    pub async fn spawn_on(store_cfg: &StoreConfig, opts: Options) -> Self {
        let app_store = connect(store_cfg).await;
        Self::spawn_with_store(store_cfg, app_store, opts).await
    }

    /// An instance whose store is given (e.g. pointed at a dead port).
    pub async fn spawn_with_store(
        store_cfg: &StoreConfig,
        app_store: Store,
        opts: Options,
    ) -> Self {
        let mut args: Vec<String> = vec![
            "tracker-api".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--jwt-secret".into(),
            SECRET.into(),
            "--heartbeat-interval".into(),
            format!("{}ms", opts.interval.as_millis()),
            "--heartbeat-window".into(),
            format!("{}ms", opts.window.as_millis()),
            "--shutdown-timeout".into(),
            format!("{}ms", opts.shutdown_timeout.as_millis()),
            "--key-prefix".into(),
            store_cfg.key_prefix.clone(),
        ];
        args.extend(opts.extra_args.iter().cloned());
        let cfg = <Config as clap::Parser>::try_parse_from(args).expect("valid test settings");
        let app = Application::build_with(cfg, app_store, opts.history.clone())
            .await
            .expect("build the app");
        let addr = SocketAddr::from(([127, 0, 0, 1], app.port()));
        let ops_addr = app
            .ops_port()
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)));
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(app.run_until(shutdown.clone()));
        let store = Store::connect(store_cfg)
            .await
            .expect("the test's own store");
        Self {
            addr,
            ops_addr,
            base: format!("http://{addr}"),
            store,
            store_cfg: store_cfg.clone(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            shutdown,
            handle: Some(handle),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn ops_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.ops_addr.expect("an ops listener"))
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// Stops the app and waits for `run_until` to return.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            h.await.unwrap().unwrap();
        }
    }

    /// Records a Session resource, as the reaper's mirror would.
    pub async fn mirror(&self, session: &str, owner: Option<&str>, state: ResourceState) {
        self.mirror_gen(session, owner, state, None).await;
    }

    pub async fn mirror_gen(
        &self,
        session: &str,
        owner: Option<&str>,
        state: ResourceState,
        generation: Option<i64>,
    ) {
        let term = self.store.newest_term().await.unwrap();
        let applied = self
            .store
            .mirror_session(
                &SessionMeta {
                    session_id: session.parse().unwrap(),
                    uid: Some(format!("uid-{session}")),
                    owner: owner.map(str::to_owned),
                    idle_source: Default::default(),
                    state,
                    idle_timeout: IdleTimeout::After(Duration::from_secs(1800)),
                    generation,
                    max_session_duration: None,
                    created_at: None,
                },
                term,
            )
            .await
            .unwrap();
        assert_eq!(applied, tracker_core::Written::Done);
    }

    /// POST a JSON body with a token.
    pub async fn post(&self, path: &str, token: &str, body: Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    pub async fn delete(&self, path: &str, token: &str) -> reqwest::Response {
        self.client
            .delete(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    /// Registers a connection as `service` and returns its id.
    pub async fn register(&self, session: &str, protocol: &str) -> String {
        let res = self
            .post(
                &format!("/v1/sessions/{session}/connections"),
                &service_token(),
                json!({"protocol": protocol}),
            )
            .await;
        assert_eq!(res.status(), 201);
        let body: Value = res.json().await.unwrap();
        body["connection"]["connection_id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

pub fn token_with(secret: &str, claims: Value) -> String {
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

pub fn token(sub: &str, roles: &[&str]) -> String {
    token_with(
        SECRET,
        json!({"sub": sub, "roles": roles, "exp": now() + 600}),
    )
}

pub fn service_token() -> String {
    token("proxy", &["service"])
}

pub fn admin_token() -> String {
    token("root", &["admin"])
}

/// The error code of an error body.
pub async fn error_code(res: reqwest::Response) -> (u16, String, Option<String>) {
    let status = res.status().as_u16();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    (
        status,
        body["error"]["code"]
            .as_str()
            .unwrap_or("<none>")
            .to_owned(),
        body["error"]["field"].as_str().map(str::to_owned),
    )
}

/// Polls `check` until it holds, at most `limit`; the failure names `what`.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How a WebSocket attempt ended.
#[derive(Debug, PartialEq)]
pub enum WsOutcome {
    /// Admitted: the `registered` frame.
    Registered(Value),
    /// Upgraded, then closed with this code and reason.
    Closed(u16, String),
    /// Refused before the upgrade with this status.
    Http(u16),
}

/// Opens a socket at `path` with these headers and reports how it went: the
/// first text frame, or the Close frame (bounded waits).
pub async fn ws_attempt(app: &TestApp, path: &str, headers: &[(&str, String)]) -> WsOutcome {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::{Error as WsError, Message};

    let mut req = app.ws_url(path).into_client_request().unwrap();
    for (name, value) in headers {
        let name = tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())
            .expect("a header name");
        req.headers_mut()
            .insert(name, value.parse().expect("a header value"));
    }
    let mut ws = match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => ws,
        Err(WsError::Http(res)) => return WsOutcome::Http(res.status().as_u16()),
        Err(e) => panic!("connect {path}: {e}"),
    };
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a frame within 5s")
            .expect("a frame before the stream ends")
            .expect("a valid frame");
        match msg {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                return WsOutcome::Registered(v);
            }
            Message::Close(Some(f)) => {
                return WsOutcome::Closed(f.code.into(), f.reason.to_string())
            }
            Message::Close(None) => return WsOutcome::Closed(1005, String::new()),
            _ => {}
        }
    }
}

/// The close code of an outcome (0 when it is not a close).
pub fn close_code(outcome: &WsOutcome) -> u16 {
    match outcome {
        WsOutcome::Closed(code, _) => *code,
        _ => 0,
    }
}
