//! WebSocket tracking at `GET /v1/sessions/{session_id}/ws`.
//!
//! Before the upgrade, only a malformed request (400) or an `Origin` outside
//! `TRACKER_WS_ALLOWED_ORIGINS` (403) is answered with an HTTP error. Who
//! the caller is (a bearer token, or a one-time [`ticket`]) and what it may
//! do is checked after the upgrade, because a browser page cannot read the
//! status of a failed upgrade but can read a close code: a refused socket
//! gets a Close frame with 4401, 4403, 4404, 4409 or 4429 ([`refusal`]).
//! An admitted socket is registered as a connection, then one task per
//! socket: a server ping every heartbeat interval; a pong or any client
//! frame is a heartbeat; no frame within the window, or a heartbeat the
//! store no longer accepts, ends the socket. State changes of the session
//! are pushed as `{"type": "session"}` frames; the sockets of one session on
//! this replica share one reader of its state ([`watch`]). When the reaper
//! recorded that the session will be hibernated for its max session
//! duration, each socket sends one `{"type": "hibernation_warning"}` frame
//! for that running period; at the deadline the reaper ends the connection,
//! and the socket, learning it on the session's change, closes with a
//! reason saying so. However the socket ends, its connection is closed in
//! the store.
//!
//! axum does not wait for upgraded sockets on shutdown, so every socket task
//! is tracked in [`Inner::sockets`](crate::state::Inner::sockets) and watches
//! [`Inner::draining`](crate::state::Inner::draining):
//! when it fires, the socket sends Close 1001 and removes its connection.
//!
//! A plain user holds a limited number of sockets per replica
//! ([`user_sockets`]).

pub mod ticket;
pub mod user_sockets;
pub mod watch;

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::header::{ORIGIN, USER_AGENT};
use axum::http::{HeaderMap, Uri};
use axum::response::Response;
use axum::Extension;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::Instrument;
use tracker_core::{
    ConnectionId, ConnectionView, HeartbeatOutcome, NewConnection, NotOwner, Protocol, Registered,
    SessionId, SessionState, SessionView, UserAgent, UserId,
};
use utoipa::ToSchema;

use self::user_sockets::UserSocket;
use self::watch::Subscription;
use crate::access::{authorize, OTHER_OWNER};
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
    /// The session will be hibernated at `at`, live connections or not: it
    /// reaches its max session duration. Sent once per socket and running
    /// period, `TRACKER_WARN_BEFORE` ahead.
    #[serde(rename = "hibernation_warning")]
    HibernationWarning {
        #[serde(with = "tracker_core::domain::rfc3339_ms")]
        #[schema(value_type = String, format = DateTime)]
        at: DateTime<Utc>,
        reason: WarningReason,
    },
}

/// Why a hibernation is forced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WarningReason {
    /// The session has been running for its max session duration.
    MaxDuration,
}

#[utoipa::path(
    get,
    path = "/v1/sessions/{session_id}/ws",
    tag = "connections",
    params(
        ("session_id" = SessionId, Path, description = "Session resource name"),
        ("ticket" = Option<String>, Query, description = "A one-time ticket from `POST /v1/sessions/{session_id}/ws-ticket`: what a browser page should use"),
        ("access_token" = Option<String>, Query, description = "The bearer token, for clients that can set neither a header nor fetch a ticket (weaker: the token may be logged by proxies)"),
    ),
    responses(
        (status = 101, description = "Upgraded; the first frame is `registered`, or a Close frame with 4401, 4403, 4404, 4409 or 4429 and a reason when the socket is refused", body = ServerFrame),
        (status = 400, description = "Invalid id or not a WebSocket handshake", body = ErrorBody),
        (status = 403, description = "An `Origin` not in TRACKER_WS_ALLOWED_ORIGINS", body = ErrorBody),
        (status = 503, description = "Shutting down", body = ErrorBody),
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
    // Before the upgrade: only what is wrong with the request itself, and
    // an origin the deployment does not serve. Everything about who the
    // caller is and what it may do is answered after it, with a close code,
    // since a page cannot read the status of a failed upgrade.
    let origin = headers.get(ORIGIN).map(|v| v.to_str().unwrap_or("\u{0}"));
    if !state.ws_allowed_origins.allows(origin) {
        return Err(ApiError::Forbidden(
            "the page's origin may not open WebSockets here",
        ));
    }
    let ws = ws.map_err(|r| {
        ApiError::invalid(
            "Upgrade",
            format!("not a WebSocket handshake: {}", r.body_text()),
        )
    })?;
    if state.is_draining() {
        return Err(ApiError::ShuttingDown);
    }
    let credential = Credential::of(&headers, &uri);
    let client = ClientInfo {
        ip: client_ip(
            peer.map(|Extension(ConnectInfo(addr))| addr),
            &headers,
            &state.trusted_proxies,
        ),
        user_agent: headers
            .get(USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(UserAgent::from_header),
    };
    // Tracked from here, not from the upgrade: shutdown must also wait for a
    // socket whose upgrade is still in flight.
    let token = state.sockets.token();
    let span = tracing::info_span!(
        "websocket",
        session_id = %session_id,
        connection_id = tracing::field::Empty
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
    Ok(ws
        .on_failed_upgrade(|e| tracing::debug!(error = %e, "upgrade failed"))
        .on_upgrade(move |socket| {
            async move {
                let _token = token;
                match admit(&state, credential, session_id, client).await {
                    Ok(Admitted {
                        registered,
                        slot,
                        owner,
                    }) => {
                        let _slot = slot;
                        tracing::Span::current().record(
                            "connection_id",
                            tracing::field::display(registered.connection.connection_id),
                        );
                        run(socket, state, registered, owner).await;
                    }
                    Err(e) => refuse(socket, &state, &e).await,
                }
            }
            .instrument(span)
        }))
}

/// How a socket proves who it is, read from the request before the upgrade
/// and checked after it.
enum Credential {
    /// `?ticket=`: used alone when given.
    Ticket(String),
    /// The `Authorization` header, else `?access_token=`; an unreadable
    /// header is kept as its refusal.
    Token(Result<Option<String>, ApiError>),
}

impl Credential {
    fn of(headers: &HeaderMap, uri: &Uri) -> Self {
        if let Some(ticket) = query_param(uri, "ticket") {
            return Credential::Ticket(ticket);
        }
        Credential::Token(match bearer_token(headers) {
            Ok(Some(t)) => Ok(Some(t.to_owned())),
            Ok(None) => Ok(query_param(uri, "access_token")),
            Err(e) => Err(e),
        })
    }
}

/// Where the socket comes from, as the request said.
struct ClientInfo {
    ip: Option<std::net::IpAddr>,
    user_agent: Option<UserAgent>,
}

/// A socket let in.
struct Admitted {
    registered: Registered,
    /// Its place under the per-user cap, given back when it ends.
    slot: Option<UserSocket>,
    /// The user who must own the session for the socket to stay (a plain
    /// user's), checked with each of its heartbeats as for HTTP ones.
    owner: Option<UserId>,
}

/// Everything that may refuse a socket, in the order of the HTTP routes:
/// authenticate, authorize, the per-user socket cap, register.
async fn admit(
    state: &AppState,
    credential: Credential,
    session_id: SessionId,
    client: ClientInfo,
) -> Result<Admitted, ApiError> {
    let principal = match credential {
        Credential::Ticket(ticket) => ticket::redeem(state, &ticket, &session_id).await?,
        Credential::Token(token) => state.auth.authenticate(token?.as_deref())?,
    };
    if state.is_draining() {
        return Err(ApiError::ShuttingDown);
    }
    authorize(state, &principal, &session_id).await?;
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
        client_ip: client.ip,
        user_agent: client.user_agent,
    };
    let (registered, _) = register_connection(state, &principal, &new).await?;
    Ok(Admitted {
        registered,
        slot,
        owner: principal.owner_required()?.cloned(),
    })
}

/// Closes a refused socket with its code and reason, counted and logged as
/// the HTTP error would have been.
async fn refuse(mut socket: WebSocket, state: &AppState, e: &ApiError) {
    match e {
        ApiError::Unavailable { backend, detail } => {
            state.metrics.backend_error(*backend);
            tracing::warn!(backend = %backend, error = %detail, "backend unavailable");
        }
        ApiError::Internal { backend, detail } => {
            state.metrics.backend_error(*backend);
            tracing::error!(backend = %backend, error = %detail, "websocket admission failed");
        }
        ApiError::ConnectionLimit(kind) => state.metrics.limit_rejection(*kind),
        _ => tracing::debug!(reason = %e, "websocket refused"),
    }
    let (code, reason) = refusal(e);
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, socket.send(Message::Close(Some(frame)))).await;
    wait_for_close(&mut socket).await;
}

/// The close code and reason of a refused socket (docs/api.md lists them).
pub fn refusal(e: &ApiError) -> (u16, String) {
    let code = match e {
        ApiError::Unauthenticated(_) => close::UNAUTHENTICATED,
        ApiError::Forbidden(_) => close::FORBIDDEN,
        ApiError::SessionNotFound => close::SESSION_NOT_FOUND,
        ApiError::Conflict(_) => close::CONFLICT,
        ApiError::ConnectionLimit(_) => close::LIMIT,
        ApiError::ShuttingDown => close_code::AWAY,
        ApiError::Unavailable { .. } => close_code::AGAIN,
        ApiError::Internal { .. } => close_code::ERROR,
        _ => close_code::POLICY,
    };
    (code, truncate(e.body().message, MAX_REASON))
}

/// The close codes of refusals: 4000 plus the HTTP status they stand for;
/// and of the end of a session's running period.
pub mod close {
    pub const UNAUTHENTICATED: u16 = 4401;
    pub const FORBIDDEN: u16 = 4403;
    pub const SESSION_NOT_FOUND: u16 = 4404;
    pub const CONFLICT: u16 = 4409;
    pub const LIMIT: u16 = 4429;
    /// Not a refusal: the session reached its max session duration and is
    /// hibernated (408, a time limit). Connecting again wakes it, so a
    /// client should not do so on its own.
    pub const MAX_DURATION: u16 = 4408;
}

/// A Close frame's payload is at most 125 bytes, 2 of them the code.
const MAX_REASON: usize = 123;

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
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
    /// The session reached its max session duration: the reaper ended the
    /// connection and hibernates the session.
    MaxDuration,
    /// The session belongs to another user now (its owner changed, or the
    /// Session was created again for someone else): a user's socket ends.
    OtherOwner,
}

async fn run(
    mut socket: WebSocket,
    state: AppState,
    registered: Registered,
    owner: Option<UserId>,
) {
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
            owner.as_ref(),
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
        End::MaxDuration => Some((close::MAX_DURATION, MAX_DURATION_REASON)),
        End::OtherOwner => Some((close::FORBIDDEN, OTHER_OWNER)),
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
        wait_for_close(&mut socket).await;
    }
}

/// Lets the client answer a Close before the TCP connection goes: dropping
/// it at once could reset the connection and lose the frame.
async fn wait_for_close(socket: &mut WebSocket) {
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(Ok(msg)) = socket.recv().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// The Close reason of a socket whose session reached its max duration.
pub const MAX_DURATION_REASON: &str = "session hibernated: maximum session duration reached";

/// How long a closing socket waits for the client's side of the handshake.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

async fn serve(
    socket: &mut WebSocket,
    state: &AppState,
    session_id: &SessionId,
    connection_id: ConnectionId,
    owner: Option<&UserId>,
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
    // The deadline this socket was warned of: once per running period.
    let mut warned_for: Option<DateTime<Utc>> = None;
    // Since when the session has had no owner, for a user's socket.
    let mut unowned_since: Option<Instant> = None;
    loop {
        tokio::select! {
            biased;
            () = state.draining.cancelled() => return End::Shutdown,
            msg = socket.recv() => match msg {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return End::Client,
                Some(Ok(_)) => {
                    last_seen = Instant::now();
                    if last_written.elapsed() >= write_every {
                        match state.store.heartbeat_as(session_id, connection_id, owner).await {
                            Ok(HeartbeatOutcome::Alive(_)) => {
                                last_written = Instant::now();
                                unowned_since = None;
                                state.metrics.heartbeats(HeartbeatResult::Accepted, 1);
                            }
                            Ok(HeartbeatOutcome::Unknown) => {
                                state.metrics.heartbeats(HeartbeatResult::Unknown, 1);
                                return why_gone(state, session_id).await;
                            }
                            Ok(HeartbeatOutcome::NotOwner(NotOwner::OtherOwner)) => {
                                return End::OtherOwner
                            }
                            // The Session was deleted (perhaps to be created
                            // again): not recorded, as for an HTTP heartbeat.
                            // An owner back within the window keeps the
                            // socket; otherwise its connection has expired.
                            Ok(HeartbeatOutcome::NotOwner(NotOwner::NoOwner)) => {
                                let since = *unowned_since.get_or_insert_with(Instant::now);
                                if since.elapsed() >= window {
                                    return End::Gone;
                                }
                                last_written = Instant::now();
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
                if let Some(at) = snapshot.warning.filter(|at| warned_for != Some(*at)) {
                    warned_for = Some(at);
                    let frame = ServerFrame::HibernationWarning { at, reason: WarningReason::MaxDuration };
                    if !send_json(socket, &frame).await {
                        return End::Client;
                    }
                }
                if snapshot.view.state != *last_state {
                    *last_state = snapshot.view.state;
                    let frame = ServerFrame::Session { session: snapshot.view.clone() };
                    if !send_json(socket, &frame).await {
                        return End::Client;
                    }
                    // A session with a live connection is hibernated only
                    // for its max duration, which ends the connection too:
                    // close now rather than at the next heartbeat.
                    if matches!(*last_state, SessionState::Hibernating | SessionState::Hibernated)
                        && matches!(state.store.get_connection(connection_id).await, Ok(None))
                    {
                        return End::MaxDuration;
                    }
                }
            }
        }
    }
}

/// Why the store no longer knows a live socket's connection: a session with
/// a live connection is hibernated only for its max duration, which ends
/// the connection; otherwise it was closed or swept elsewhere.
async fn why_gone(state: &AppState, session_id: &SessionId) -> End {
    match state.store.session(session_id).await {
        Ok(Some(view))
            if matches!(
                view.state,
                SessionState::Hibernating | SessionState::Hibernated
            ) =>
        {
            End::MaxDuration
        }
        _ => End::Gone,
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
