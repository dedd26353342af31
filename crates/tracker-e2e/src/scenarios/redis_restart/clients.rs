//! The clients of a run: HTTP clients that heartbeat and register again after a 404, and
//! WebSocket clients that open a new socket whenever the server ends theirs; each shares its
//! current connection and counters with the scenario.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::calls::{lock, record, Call, Calls};
use super::{RedisRestartParams, MAX_RUN};
use crate::client::ApiClient;
use crate::harness::Harness;
use crate::{Error, Result};

/// What a client task shares with the scenario.
#[derive(Debug, Default)]
pub(super) struct ClientState {
    /// The connection it holds now.
    pub(super) cid: Option<Uuid>,
    pub(super) registered_at: Option<Instant>,
    pub(super) registrations: usize,
    pub(super) heartbeats_404: usize,
    pub(super) server_ends: usize,
}

#[derive(Debug)]
pub(super) struct Client {
    pub(super) name: String,
    pub(super) session: String,
    pub(super) state: Arc<Mutex<ClientState>>,
    pub(super) stop: CancellationToken,
    pub(super) task: JoinHandle<()>,
}

/// Starts, for each session, `params.http_per_session` HTTP clients and one WebSocket client,
/// spread over the API replicas.
pub(super) fn spawn_clients(
    h: &Harness,
    names: &[String],
    params: RedisRestartParams,
    calls: &Calls,
) -> Vec<Client> {
    let interval = h.timing().heartbeat_interval;
    let apis = h.api_count().max(1);
    let mut clients = Vec::new();
    for (si, session) in names.iter().enumerate() {
        for k in 0..=params.http_per_session {
            let websocket = k == params.http_per_session;
            let replica = (si + k) % apis;
            let state = Arc::new(Mutex::new(ClientState::default()));
            let stop = CancellationToken::new();
            let (c, s, st, ca, sp) = (
                h.client(),
                session.clone(),
                state.clone(),
                calls.clone(),
                stop.clone(),
            );
            let task = if websocket {
                tokio::spawn(ws_client(c, s, replica, interval, st, ca, sp))
            } else {
                tokio::spawn(http_client(c, s, replica, interval, st, ca, sp))
            };
            clients.push(Client {
                name: format!(
                    "{session}/{}{k}@api-{replica}",
                    if websocket { "ws" } else { "http" }
                ),
                session: session.clone(),
                state,
                stop,
                task,
            });
        }
    }
    clients
}

/// Waits until `stop` or `d` passed; true if stopped.
async fn pause(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(d) => false,
    }
}

/// Registers, heartbeats every `interval`, registers again after a 404; closes at `stop`.
async fn http_client(
    c: ApiClient,
    session: String,
    replica: usize,
    interval: Duration,
    state: Arc<Mutex<ClientState>>,
    calls: Calls,
    stop: CancellationToken,
) {
    let deadline = Instant::now() + MAX_RUN;
    let mut cid: Option<Uuid> = None;
    while !stop.is_cancelled() && Instant::now() < deadline {
        let sent = Instant::now();
        let (what, r) = match cid {
            None => (
                "register",
                c.register(replica, &session, "http", "alice").await,
            ),
            Some(id) => ("heartbeat", c.heartbeat(replica, &session, id).await),
        };
        record(&calls, sent, what, replica, &r);
        let mut at_once = false;
        if let Ok(a) = &r {
            match (cid, a.status) {
                (None, 200 | 201) => {
                    cid = a.connection_id();
                    let mut s = lock(&state);
                    s.cid = cid;
                    s.registered_at = Some(Instant::now());
                    s.registrations += 1;
                }
                (Some(_), 404) => {
                    // Documented client behaviour: the connection is gone, register again.
                    cid = None;
                    let mut s = lock(&state);
                    s.cid = None;
                    s.heartbeats_404 += 1;
                    at_once = true;
                }
                _ => {}
            }
        }
        if !at_once && pause(&stop, interval).await {
            break;
        }
    }
    if let Some(id) = cid {
        let _ = c.close(replica, &session, id).await;
    }
    lock(&state).cid = None;
}

/// Holds a WebSocket and opens a new one whenever the server ends it; closes at `stop`.
async fn ws_client(
    c: ApiClient,
    session: String,
    replica: usize,
    interval: Duration,
    state: Arc<Mutex<ClientState>>,
    calls: Calls,
    stop: CancellationToken,
) {
    let deadline = Instant::now() + MAX_RUN;
    while !stop.is_cancelled() && Instant::now() < deadline {
        let sent = Instant::now();
        let opened = tokio::select! {
            () = stop.cancelled() => break,
            r = c.websocket(replica, &session, false) => r,
        };
        let (status, ws) = match opened {
            Ok(ws) => (101, Some(ws)),
            Err(Error::Protocol(msg)) => (upgrade_status(&msg), None),
            Err(_) => (0, None),
        };
        lock(&calls).push(Call {
            sent,
            latency: sent.elapsed(),
            what: "websocket",
            replica,
            status,
            code: None,
        });
        let Some(mut ws) = ws else {
            if pause(&stop, interval).await {
                break;
            }
            continue;
        };
        {
            let mut s = lock(&state);
            s.cid = Some(ws.connection_id);
            s.registered_at = Some(Instant::now());
            s.registrations += 1;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let server_ended = tokio::select! {
            () = stop.cancelled() => false,
            r = ws.hold(left) => matches!(r, Ok(false) | Err(_)),
        };
        {
            let mut s = lock(&state);
            s.cid = None;
            if server_ended {
                s.server_ends += 1;
            }
        }
        if !server_ended {
            ws.close().await;
            break;
        }
    }
    lock(&state).cid = None;
}

/// The status in "... answered 503 instead of upgrading ...", or the close
/// code in "... refused with close 1013 ..." (0 if neither).
fn upgrade_status(msg: &str) -> u16 {
    ["answered ", "refused with close "]
        .iter()
        .find_map(|marker| {
            msg.split(marker)
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// Clients whose current connection their session's list does not show, after polling up to
/// `timeout` (a client may be between a 404 and its new registration).
pub(super) async fn not_live(
    h: &Harness,
    clients: &[&Client],
    timeout: Duration,
) -> Result<Vec<String>> {
    let c = h.client();
    let deadline = Instant::now() + timeout;
    loop {
        let mut missing = Vec::new();
        let sessions: HashSet<&str> = clients.iter().map(|cl| cl.session.as_str()).collect();
        let mut listed: HashSet<Uuid> = HashSet::new();
        for s in sessions {
            let a = c.connections(0, s).await?;
            for conn in a
                .body
                .get("connections")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(id) = conn
                    .get("connection_id")
                    .and_then(Value::as_str)
                    .and_then(|s| s.parse().ok())
                {
                    listed.insert(id);
                }
            }
        }
        for cl in clients {
            let cid = lock(&cl.state).cid;
            if !cid.is_some_and(|id| listed.contains(&id)) {
                missing.push(format!("{} ({:?})", cl.name, cid));
            }
        }
        if missing.is_empty() || Instant::now() >= deadline {
            return Ok(missing);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stops clients and waits (bounded) for their tasks (they close their connections).
pub(super) async fn stop_clients(clients: &mut [Client]) {
    for c in clients.iter() {
        c.stop.cancel();
    }
    for c in clients.iter_mut() {
        let task = &mut c.task;
        if tokio::time::timeout(Duration::from_secs(15), &mut *task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upgrade_status_is_read_from_the_error() {
        assert_eq!(
            upgrade_status("GET ws://x/ws answered 503 instead of upgrading: {}"),
            503
        );
        assert_eq!(
            upgrade_status("GET ws://x/ws: refused with close 1013 before the registered frame: x"),
            1013
        );
        assert_eq!(upgrade_status("closed before the registered frame"), 0);
    }
}
