//! Clients of the API replicas: HTTP calls that keep their status, body and timing, and a
//! tracked WebSocket that answers pings (tungstenite does that while the socket is read) and
//! remembers when it last heard one.

use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

use crate::{Error, Result};

/// The API replicas' addresses, shared with the harness so a restarted replica on a new port
/// is found by every client.
#[derive(Debug, Clone, Default)]
pub struct Endpoints(Arc<RwLock<Vec<SocketAddr>>>);

impl Endpoints {
    pub fn new(addrs: Vec<SocketAddr>) -> Self {
        Self(Arc::new(RwLock::new(addrs)))
    }

    pub fn get(&self, replica: usize) -> Option<SocketAddr> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(replica)
            .copied()
    }

    pub fn set(&self, replica: usize, addr: SocketAddr) {
        let mut addrs = self.0.write().unwrap_or_else(PoisonError::into_inner);
        if replica < addrs.len() {
            addrs[replica] = addr;
        } else {
            addrs.push(addr);
        }
    }

    pub fn len(&self) -> usize {
        self.0.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An HTTP answer with the client-side times around it.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    /// JSON body, or `Value::Null` if empty or not JSON.
    pub body: Value,
    /// Just before the request was sent.
    pub sent_at: DateTime<Utc>,
    /// Just after the whole answer was read.
    pub answered_at: DateTime<Utc>,
}

impl Answer {
    /// `session.state` of a registration answer.
    pub fn session_state(&self) -> Option<&str> {
        self.body.pointer("/session/state").and_then(Value::as_str)
    }

    /// `connection.connection_id` of a registration answer.
    pub fn connection_id(&self) -> Option<Uuid> {
        self.body
            .pointer("/connection/connection_id")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
    }

    /// `error.code` of an error answer.
    pub fn error_code(&self) -> Option<&str> {
        self.body.pointer("/error/code").and_then(Value::as_str)
    }
}

/// Claims of the harness's tokens.
#[derive(Debug, Serialize)]
struct Claims<'a> {
    sub: &'a str,
    roles: &'a [&'a str],
    exp: i64,
}

/// An HS256 token for `sub` with `roles`, valid for a day.
pub fn token(secret: &str, sub: &str, roles: &[&str]) -> Result<String> {
    let claims = Claims {
        sub,
        roles,
        exp: (Utc::now() + chrono::Duration::days(1)).timestamp(),
    };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| Error::Setup(format!("sign a test token: {e}")))
}

/// A client of every API replica, with the harness's token (a `service`), if auth is on.
#[derive(Debug, Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    endpoints: Endpoints,
    token: Option<String>,
}

/// Upper bound of every HTTP call: the API promises an answer (503 at worst) well before.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

impl ApiClient {
    pub fn new(endpoints: Endpoints, token: Option<String>) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .pool_max_idle_per_host(256)
            .build()
            .map_err(|e| Error::http("build the client", e))?;
        Ok(Self {
            http,
            endpoints,
            token,
        })
    }

    pub fn replicas(&self) -> usize {
        self.endpoints.len()
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    fn addr(&self, replica: usize) -> Result<SocketAddr> {
        self.endpoints
            .get(replica)
            .ok_or_else(|| Error::Setup(format!("no API replica {replica}")))
    }

    /// `http://ADDR` of a replica.
    pub fn base(&self, replica: usize) -> Result<String> {
        Ok(format!("http://{}", self.addr(replica)?))
    }

    async fn call(
        &self,
        method: reqwest::Method,
        replica: usize,
        path: &str,
        body: Option<Value>,
    ) -> Result<Answer> {
        let url = format!("{}{path}", self.base(replica)?);
        let mut req = self.http.request(method.clone(), &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let sent_at = Utc::now();
        let what = || format!("{method} {url}");
        let resp = req.send().await.map_err(|e| Error::http(what(), e))?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| Error::http(what(), e))?;
        let answered_at = Utc::now();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Answer {
            status,
            body,
            sent_at,
            answered_at,
        })
    }

    /// `POST /v1/sessions/{session}/connections`.
    pub async fn register(
        &self,
        replica: usize,
        session: &str,
        protocol: &str,
        user: &str,
    ) -> Result<Answer> {
        let body = json!({
            "protocol": protocol,
            "user_id": user,
            "client_ip": "10.20.30.40",
            "user_agent": "tracker-e2e/1",
        });
        self.call(
            reqwest::Method::POST,
            replica,
            &format!("/v1/sessions/{session}/connections"),
            Some(body),
        )
        .await
    }

    /// `POST .../heartbeat`.
    pub async fn heartbeat(&self, replica: usize, session: &str, cid: Uuid) -> Result<Answer> {
        self.call(
            reqwest::Method::POST,
            replica,
            &format!("/v1/sessions/{session}/connections/{cid}/heartbeat"),
            None,
        )
        .await
    }

    /// `DELETE /v1/sessions/{session}/connections/{cid}`.
    pub async fn close(&self, replica: usize, session: &str, cid: Uuid) -> Result<Answer> {
        self.call(
            reqwest::Method::DELETE,
            replica,
            &format!("/v1/sessions/{session}/connections/{cid}"),
            None,
        )
        .await
    }

    /// `GET /v1/sessions/{session}`.
    pub async fn session(&self, replica: usize, session: &str) -> Result<Answer> {
        self.call(
            reqwest::Method::GET,
            replica,
            &format!("/v1/sessions/{session}"),
            None,
        )
        .await
    }

    /// `GET /v1/sessions/{session}/connections`.
    pub async fn connections(&self, replica: usize, session: &str) -> Result<Answer> {
        self.call(
            reqwest::Method::GET,
            replica,
            &format!("/v1/sessions/{session}/connections"),
            None,
        )
        .await
    }

    /// `GET /v1/stats`.
    pub async fn stats(&self, replica: usize) -> Result<Answer> {
        self.call(reqwest::Method::GET, replica, "/v1/stats", None)
            .await
    }

    /// Opens a tracked WebSocket on `session`; the token goes in the header or, with
    /// `token_in_query`, as `?access_token=`. Waits (bounded) for the `registered` frame.
    pub async fn websocket(
        &self,
        replica: usize,
        session: &str,
        token_in_query: bool,
    ) -> Result<WsClient> {
        let addr = self.addr(replica)?;
        let mut url = format!("ws://{addr}/v1/sessions/{session}/ws");
        if let (true, Some(t)) = (token_in_query, &self.token) {
            url.push_str("?access_token=");
            url.push_str(t);
        }
        let what = || format!("GET ws://{addr}/v1/sessions/{session}/ws");
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| Error::WebSocket {
                what: what(),
                cause: Box::new(e),
            })?;
        if let (false, Some(t)) = (token_in_query, &self.token) {
            let value = format!("Bearer {t}")
                .parse()
                .map_err(|_| Error::Setup("the token is not a valid header value".into()))?;
            request.headers_mut().insert("authorization", value);
        }
        let sent_at = Utc::now();
        let connect = tokio_tungstenite::connect_async_with_config(request, None, true);
        let (stream, _) = match tokio::time::timeout(CALL_TIMEOUT, connect).await {
            Err(_) => {
                return Err(Error::Timeout {
                    what: what(),
                    waited: CALL_TIMEOUT,
                })
            }
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
                let body = resp
                    .body()
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default()
                    .into_owned();
                return Err(Error::Protocol(format!(
                    "{} answered {} instead of upgrading: {body}",
                    what(),
                    resp.status().as_u16()
                )));
            }
            Ok(Err(e)) => {
                return Err(Error::WebSocket {
                    what: what(),
                    cause: Box::new(e),
                })
            }
            Ok(Ok(ok)) => ok,
        };
        let mut ws = WsClient {
            stream,
            connection_id: Uuid::nil(),
            session_state: String::new(),
            sent_at,
            registered_at: sent_at,
            last_ping_at: sent_at,
            pings: 0,
            session_pushes: 0,
            server_close: None,
        };
        let first = tokio::time::timeout(CALL_TIMEOUT, ws.next_text()).await;
        let text = match first {
            Ok(Ok(Some(t))) => t,
            Ok(Ok(None)) => {
                // A refused socket is closed with a code (docs/api.md, Refusals).
                return Err(Error::Protocol(match &ws.server_close {
                    Some((code, reason)) => format!(
                        "{}: refused with close {code} before the registered frame: {reason}",
                        what()
                    ),
                    None => format!("{}: closed before the registered frame", what()),
                }));
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(Error::Timeout {
                    what: format!("{}: the registered frame", what()),
                    waited: CALL_TIMEOUT,
                })
            }
        };
        ws.registered_at = Utc::now();
        let frame: Value = serde_json::from_str(&text)
            .map_err(|e| Error::Protocol(format!("{}: first frame is not JSON: {e}", what())))?;
        if frame.get("type").and_then(Value::as_str) != Some("registered") {
            return Err(Error::Protocol(format!(
                "{}: first frame is not `registered`: {text}",
                what()
            )));
        }
        ws.connection_id = frame
            .pointer("/connection/connection_id")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::Protocol(format!("{}: no connection id in {text}", what())))?;
        ws.session_state = frame
            .pointer("/session/state")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        Ok(ws)
    }
}

/// A tracked WebSocket, as a browser tab would hold it.
#[derive(Debug)]
pub struct WsClient {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub connection_id: Uuid,
    /// `session.state` of the `registered` frame.
    pub session_state: String,
    /// Just before the upgrade request.
    pub sent_at: DateTime<Utc>,
    /// When the `registered` frame arrived.
    pub registered_at: DateTime<Utc>,
    /// When the last server ping arrived (its pong follows on the next read).
    pub last_ping_at: DateTime<Utc>,
    pub pings: u64,
    /// `{"type": "session"}` frames received.
    pub session_pushes: u64,
    /// The server's Close frame, if it closed: (code, reason).
    pub server_close: Option<(u16, String)>,
}

impl WsClient {
    /// The next text frame; pings, pongs and binary frames are noted and skipped.
    /// `None` once the socket is closed.
    async fn next_text(&mut self) -> Result<Option<String>> {
        loop {
            match self.stream.next().await {
                None => return Ok(None),
                Some(Err(e)) => {
                    use tokio_tungstenite::tungstenite::Error as E;
                    return match e {
                        E::ConnectionClosed | E::AlreadyClosed | E::Io(_) | E::Protocol(_) => {
                            Ok(None)
                        }
                        e => Err(Error::WebSocket {
                            what: "read".into(),
                            cause: Box::new(e),
                        }),
                    };
                }
                Some(Ok(Message::Text(t))) => return Ok(Some(t.as_str().to_owned())),
                Some(Ok(Message::Ping(_))) => {
                    self.pings += 1;
                    self.last_ping_at = Utc::now();
                }
                Some(Ok(Message::Close(frame))) => {
                    self.server_close = Some(
                        frame
                            .map(|f| (u16::from(f.code), f.reason.as_str().to_owned()))
                            .unwrap_or((1005, String::new())),
                    );
                    return Ok(None);
                }
                Some(Ok(_)) => {}
            }
        }
    }

    /// Reads (answering pings) for `duration`; false if the socket ended meanwhile.
    pub async fn hold(&mut self, duration: Duration) -> Result<bool> {
        let deadline = tokio::time::Instant::now() + duration;
        loop {
            match tokio::time::timeout_at(deadline, self.next_text()).await {
                Err(_) => return Ok(true),
                Ok(Ok(None)) => return Ok(false),
                Ok(Ok(Some(text))) => {
                    if text.contains("\"type\":\"session\"") {
                        self.session_pushes += 1;
                    }
                }
                Ok(Err(e)) => return Err(e),
            }
        }
    }

    /// Reads until the server closes the socket or `timeout` passes; answers the server's
    /// Close frame, if one came.
    pub async fn wait_server_close(&mut self, timeout: Duration) -> Option<(u16, String)> {
        let _ = tokio::time::timeout(timeout, async {
            while let Ok(Some(_)) = self.next_text().await {}
        })
        .await;
        self.server_close.clone()
    }

    /// Sends Close (1000) and waits (bounded) for the server's answer. Answers when the close
    /// was sent: the connection was live at least until then.
    pub async fn close(mut self) -> DateTime<Utc> {
        let at = Utc::now();
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        };
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.stream.send(Message::Close(Some(frame))),
        )
        .await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.stream.next().await {}
        })
        .await;
        at
    }

    /// Drops the TCP connection without a Close frame, as a crashed browser would.
    pub fn drop_abruptly(self) -> DateTime<Utc> {
        let at = Utc::now();
        drop(self.stream);
        at
    }
}
