//! WebSocket tracking at `GET /v1/sessions/{session_id}/ws`.
//!
//! The upgrade registers the connection (refusals answer with the HTTP error
//! instead of upgrading). Then one task per socket: a server ping every
//! heartbeat interval; a pong or any client frame is a heartbeat; no frame
//! within the window, or a heartbeat the store no longer accepts, ends the
//! socket. State changes of the session are pushed as `{"type": "session"}`
//! frames; the sockets of one session on this replica share one reader of
//! its state ([`watch`]). However the socket ends, its connection is closed
//! in the store.
//!
//! axum does not wait for upgraded sockets on shutdown, so every socket task
//! is tracked in [`Inner::sockets`](crate::state::Inner::sockets) and watches
//! [`Inner::draining`](crate::state::Inner::draining):
//! when it fires, the socket sends Close 1001 and removes its connection.
//!
//! A plain user holds a limited number of sockets per replica
//! ([`user_sockets`]).

pub mod user_sockets;
pub mod watch;

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::header::USER_AGENT;
use axum::http::{HeaderMap, Uri};
use axum::response::Response;
use axum::Extension;
use serde::Serialize;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::Instrument;
use tracker_core::{
    ConnectionId, ConnectionView, NewConnection, Protocol, Registered, SessionId, SessionState,
    SessionView, UserAgent,
};
use utoipa::ToSchema;

use self::watch::Subscription;
use crate::access::authorize;
use crate::auth::bearer_token;
use crate::client_ip::client_ip;
use crate::error::{ApiError, ErrorBody};
use crate::error::{Backend, LimitKind};
use crate::extract::{query_param, SessionPath};
use crate::metrics::HeartbeatResult;
use crate::routes::connections::register_connection;
use crate::state::AppState;

/// A text frame from the server.
#[derive(Debug, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerFrame {
    /// The first frame: the connection as registered.
    Registered {
        connection: ConnectionView,
        session: SessionView,
    },
    /// The session's state changed.
    Session { session: SessionView },
}

#[utoipa::path(
    get,
    path = "/v1/sessions/{session_id}/ws",
    tag = "connections",
    params(
        ("session_id" = String, Path, description = "Session resource name"),
        ("access_token" = Option<String>, Query, description = "The bearer token, for clients that cannot set headers"),
    ),
    responses(
        (status = 101, description = "Upgraded; the first frame is `registered`", body = ServerFrame),
        (status = 400, description = "Invalid id or not a WebSocket handshake", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not the caller's session", body = ErrorBody),
        (status = 404, description = "A plain user on a session the tracker does not know", body = ErrorBody),
        (status = 409, description = "Session terminated", body = ErrorBody),
        (status = 429, description = "Connection limit reached, or the user's WebSocket limit on this replica", body = ErrorBody),
        (status = 503, description = "Redis unavailable, or shutting down", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn upgrade(
    State(state): State<AppState>,
    SessionPath(session_id): SessionPath,
    uri: Uri,
    headers: HeaderMap,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let token = match bearer_token(&headers)? {
        Some(t) => Some(t.to_owned()),
        None => query_param(&uri, "access_token"),
    };
    let principal = state.auth.authenticate(token.as_deref())?;
    let ws = ws.map_err(|r| {
        ApiError::invalid(
            "Upgrade",
            format!("not a WebSocket handshake: {}", r.body_text()),
        )
    })?;
    if state.is_draining() {
        return Err(ApiError::ShuttingDown);
    }
    authorize(&state, &principal, &session_id).await?;
    let slot = if principal.counts_websockets() {
        state
            .user_sockets
            .try_open(&principal.subject)
            .ok_or(ApiError::ConnectionLimit(LimitKind::UserWebsockets))?
    } else {
        None
    };
    let new = NewConnection {
        session_id,
        connection_id: ConnectionId::new_random(),
        user_id: principal.subject.clone(),
        protocol: Protocol::Websocket,
        client_ip: client_ip(
            peer.map(|Extension(ConnectInfo(addr))| addr),
            &headers,
            &state.trusted_proxies,
        ),
        user_agent: headers
            .get(USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(UserAgent::from_header),
    };
    let (registered, _) = register_connection(&state, &new).await?;

    // Tracked from here, not from the upgrade: shutdown must also wait for a
    // socket whose upgrade is still in flight.
    let token = state.sockets.token();
    let failed = {
        let state = state.clone();
        let (sid, cid) = (new.session_id.clone(), new.connection_id);
        move |e: axum::Error| {
            tracing::debug!(error = %e, session_id = %sid, connection_id = %cid, "upgrade failed");
            let tracker = state.sockets.clone();
            tracker.spawn(async move { remove(&state, &sid, cid).await });
        }
    };
    let span = tracing::info_span!(
        "websocket",
        session_id = %new.session_id,
        connection_id = %new.connection_id
    );
    // tungstenite's defaults (128 KiB read and write buffers, 64 MiB
    // messages) cost ~1.3 GiB for 10,000 sockets; clients only send
    // heartbeats, so small buffers and a small message limit suffice.
    let ws = ws
        .read_buffer_size(SOCKET_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_MESSAGE)
        .max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE);
    Ok(ws.on_failed_upgrade(failed).on_upgrade(move |socket| {
        async move {
            let _token = token;
            let _slot = slot;
            run(socket, state, registered).await;
        }
        .instrument(span)
    }))
}

/// Initial read buffer of a socket.
const SOCKET_BUFFER: usize = 4 * 1024;
/// Largest client message (and pending write backlog) a socket accepts.
const MAX_MESSAGE: usize = 64 * 1024;

/// Why a socket ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client closed or vanished.
    Client,
    /// No frame within the heartbeat window.
    Silent,
    /// The store no longer knows the connection (swept or closed elsewhere).
    Gone,
    /// The process is shutting down.
    Shutdown,
}

async fn run(mut socket: WebSocket, state: AppState, registered: Registered) {
    let _open = state.metrics.websocket_open();
    let session_id = registered.connection.session_id.clone();
    let connection_id = registered.connection.connection_id;
    let mut last_state = registered.session.state;
    // After the registration: only reads newer than it may be pushed.
    let mut watch = state.session_watches.subscribe(&session_id);
    let first = ServerFrame::Registered {
        connection: registered.connection,
        session: registered.session,
    };
    let end = if send_json(&mut socket, &first).await {
        serve(
            &mut socket,
            &state,
            &session_id,
            connection_id,
            &mut watch,
            &mut last_state,
        )
        .await
    } else {
        End::Client
    };
    drop(watch);
    tracing::debug!(?end, "websocket ended");
    let close = match end {
        End::Client => None,
        End::Silent => Some((close_code::NORMAL, "no heartbeat within the window")),
        End::Gone => Some((close_code::NORMAL, "the connection is no longer tracked")),
        End::Shutdown => Some((close_code::AWAY, "server shutting down")),
    };
    if let Some((code, reason)) = close {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        // Bounded: a client that stopped reading must not hold up shutdown.
        let _ = tokio::time::timeout(CLOSE_GRACE, socket.send(Message::Close(Some(frame)))).await;
    }
    remove(&state, &session_id, connection_id).await;
    if close.is_some() {
        // Let the client answer the Close before the TCP connection goes:
        // dropping it at once could reset the connection and lose the frame.
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            while let Some(Ok(msg)) = socket.recv().await {
                if matches!(msg, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}

/// How long a closing socket waits for the client's side of the handshake.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

async fn serve(
    socket: &mut WebSocket,
    state: &AppState,
    session_id: &SessionId,
    connection_id: ConnectionId,
    watch: &mut Subscription,
    last_state: &mut SessionState,
) -> End {
    let interval = state.heartbeat_interval;
    let window = state.heartbeat_window;
    // Client frames may come far faster than pings; writing each to Redis
    // would buy nothing, since liveness only needs one write per interval.
    let write_every = interval / 2;
    let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_seen = Instant::now();
    let mut last_written = Instant::now();
    loop {
        tokio::select! {
            biased;
            () = state.draining.cancelled() => return End::Shutdown,
            msg = socket.recv() => match msg {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return End::Client,
                Some(Ok(_)) => {
                    last_seen = Instant::now();
                    if last_written.elapsed() >= write_every {
                        match state.store.heartbeat(session_id, connection_id).await {
                            Ok(Some(_)) => {
                                last_written = Instant::now();
                                state.metrics.heartbeats(HeartbeatResult::Accepted, 1);
                            }
                            Ok(None) => {
                                state.metrics.heartbeats(HeartbeatResult::Unknown, 1);
                                return End::Gone;
                            }
                            // Redis trouble is not the client's fault: keep
                            // the socket, the next frame retries.
                            Err(e) => {
                                state.metrics.backend_error(Backend::Redis);
                                tracing::warn!(error = %e, "could not record a websocket heartbeat");
                            }
                        }
                    }
                }
            },
            _ = ticker.tick() => {
                if last_seen.elapsed() >= window {
                    return End::Silent;
                }
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    return End::Client;
                }
            }
            snapshot = watch.next() => {
                if snapshot.view.state != *last_state {
                    *last_state = snapshot.view.state;
                    let frame = ServerFrame::Session { session: snapshot.view.clone() };
                    if !send_json(socket, &frame).await {
                        return End::Client;
                    }
                }
            }
        }
    }
}

async fn send_json(socket: &mut WebSocket, frame: &ServerFrame) -> bool {
    match serde_json::to_string(frame) {
        Ok(text) => socket.send(Message::Text(text.into())).await.is_ok(),
        Err(e) => {
            tracing::error!(error = %e, "could not encode a websocket frame");
            false
        }
    }
}

/// Closes the connection in the store. A failure is logged, not retried: the
/// sweep expires the connection within the window anyway.
async fn remove(state: &AppState, session_id: &SessionId, connection_id: ConnectionId) {
    match state.store.close(session_id, connection_id).await {
        Ok(Some(reason)) => tracing::debug!(
            session_id = %session_id,
            connection_id = %connection_id,
            end_reason = reason.as_str(),
            "websocket connection removed"
        ),
        Ok(None) => {}
        Err(e) => {
            state.metrics.backend_error(Backend::Redis);
            tracing::warn!(
                session_id = %session_id,
                connection_id = %connection_id,
                error = %e,
                "could not remove a websocket connection; the sweep will expire it"
            );
        }
    }
}
