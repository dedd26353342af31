//! An API replica killed with SIGKILL while it holds WebSockets. Nobody is left to close its
//! connections, so the reaper must expire them: every one archived as `expired` within
//! window + sweep interval + 1 s of the kill, none live forever. The sockets
//! held by the other replica must not notice.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::checks::some;
use super::sockets::{self, HoldEnd, OnStop};
use super::{conclude, live_connections_on, write_result};
use crate::harness::{Harness, HarnessOptions};
use crate::Result;

/// Size of an API-kill run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct ApiKillParams {
    /// WebSockets on the replica that is killed.
    #[arg(long, default_value_t = 1000)]
    pub websockets: usize,
    /// WebSockets on the surviving replica.
    #[arg(long, default_value_t = 200)]
    pub survivors: usize,
    /// One per 20 killed WebSockets from the command line.
    #[arg(skip)]
    pub sessions: usize,
}

impl ApiKillParams {
    pub fn short() -> Self {
        Self {
            websockets: 40,
            survivors: 10,
            sessions: 8,
        }
    }

    pub fn full() -> Self {
        Self {
            websockets: 1000,
            survivors: 200,
            sessions: 50,
        }
    }
}

/// How late after the documented bound the archive may still be (its own poll period and
/// batch), before it counts as a violation.
pub const ARCHIVE_SLACK: Duration = Duration::from_secs(2);

/// Figures of an API-kill run.
#[derive(Debug, Clone)]
pub struct ApiKillFigures {
    pub params: ApiKillParams,
    pub bound: Duration,
    /// From the SIGKILL until every orphaned connection was in history.
    pub archived_after: Option<Duration>,
    pub orphans_archived: usize,
    pub orphans_expired: usize,
    pub orphans_wrong_reason: Vec<String>,
    pub orphans_lost: Vec<Uuid>,
    /// Survivors whose socket ended before we closed it.
    pub survivors_disturbed: usize,
    pub survivors_archived_closed: usize,
    pub restarted_replica_ok: bool,
    /// Sockets on the replica stopped with SIGTERM afterwards.
    pub term_sockets: usize,
    /// Of those, the ones that did not get Close 1001.
    pub term_not_1001: Vec<String>,
    /// Of those, the ones archived as `closed`.
    pub term_closed: usize,
    pub term_exit: String,
    pub term_exit_clean: bool,
    pub live_after: u64,
    pub exits: String,
    pub unclean_exits: usize,
}

impl ApiKillFigures {
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        match self.archived_after {
            None => p.push("not every orphaned connection was archived".into()),
            Some(d) if d > self.bound + ARCHIVE_SLACK => {
                p.push(format!(
                    "orphans archived after {d:.2?}, bound {:?}",
                    self.bound
                ));
            }
            Some(_) => {}
        }
        if !self.orphans_lost.is_empty() || !self.orphans_wrong_reason.is_empty() {
            p.push(format!(
                "{} orphans lost, {} with the wrong end_reason",
                self.orphans_lost.len(),
                self.orphans_wrong_reason.len()
            ));
        }
        if self.survivors_disturbed > 0 {
            p.push(format!("{} survivors disturbed", self.survivors_disturbed));
        }
        if self.survivors_archived_closed != self.params.survivors {
            p.push(format!(
                "{} of {} survivors archived as closed",
                self.survivors_archived_closed, self.params.survivors
            ));
        }
        if !self.restarted_replica_ok {
            p.push("the restarted replica did not serve a registration".into());
        }
        if !self.term_not_1001.is_empty() {
            p.push(format!(
                "{} sockets did not get Close 1001 on SIGTERM",
                self.term_not_1001.len()
            ));
        }
        if self.term_closed != self.term_sockets {
            p.push(format!(
                "{} of {} sockets of the stopped replica archived as closed",
                self.term_closed, self.term_sockets
            ));
        }
        if !self.term_exit_clean {
            p.push(format!("SIGTERM exit: {}", self.term_exit));
        }
        if self.live_after > 0 {
            p.push(format!(
                "{} connections still live at the end",
                self.live_after
            ));
        }
        if self.unclean_exits > 0 {
            p.push(format!("{} unclean exits", self.unclean_exits));
        }
        p
    }
}

impl_figures!(ApiKillFigures);

impl fmt::Display for ApiKillFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "api-kill: SIGKILL of an API replica holding {} WebSockets ({} more on the other)",
            self.params.websockets, self.params.survivors
        )?;
        writeln!(
            f,
            "  orphans archived: {} ({} expired) after {}; documented bound {:?}",
            self.orphans_archived,
            self.orphans_expired,
            self.archived_after
                .map_or_else(|| "never".to_owned(), |d| format!("{d:.2?}")),
            self.bound
        )?;
        writeln!(
            f,
            "  orphans lost: {}{}; wrong end_reason: {}{}",
            self.orphans_lost.len(),
            some(&self.orphans_lost, 5),
            self.orphans_wrong_reason.len(),
            some(&self.orphans_wrong_reason, 5)
        )?;
        writeln!(
            f,
            "  survivors disturbed: {}, archived as closed: {}; restarted replica serves: {}; \
             live at the end: {}",
            self.survivors_disturbed,
            self.survivors_archived_closed,
            self.restarted_replica_ok,
            self.live_after
        )?;
        writeln!(
            f,
            "  then SIGTERM with {} sockets: {} without Close 1001{}, {} archived as closed; \
             exit {}",
            self.term_sockets,
            self.term_not_1001.len(),
            some(&self.term_not_1001, 5),
            self.term_closed,
            self.term_exit
        )?;
        writeln!(f, "  exits: {}", self.exits)?;
        write_result(f, &self.problems())
    }
}

/// Runs the API-kill scenario on a fresh harness (at least two API replicas).
pub async fn run(mut opts: HarnessOptions, params: ApiKillParams) -> Result<ApiKillFigures> {
    opts.apis = opts.apis.max(2);
    let mut h = Harness::start(opts).await?;
    let names: Vec<String> = (0..params.sessions.max(1))
        .map(|i| format!("ws-{i:04}"))
        .collect();
    for n in &names {
        // The default idle timeout (30 min): hibernation plays no part here.
        h.create_session(n, None)?;
    }
    h.wait_mirrored(&names, Duration::from_secs(30)).await?;
    let client = h.client();
    let stop = CancellationToken::new();
    let _stop_all = stop.clone().drop_guard();
    let orphans = sockets::open(
        &client,
        params.websockets,
        64,
        &names,
        |_| 0,
        &stop,
        OnStop::Close,
    )
    .await?;
    let survivors = sockets::open(
        &client,
        params.survivors,
        64,
        &names,
        |_| 1,
        &stop,
        OnStop::Close,
    )
    .await?;

    let timing = h.timing();
    let bound = timing.expiry_bound();
    let killed_at = Instant::now();
    h.kill_api(0).await?;
    let orphan_ids: HashMap<Uuid, ()> = orphans.iter().map(|o| (o.connection_id, ())).collect();
    let db = h.db()?;
    let give_up = bound + Duration::from_secs(30);
    let mut archived_after = None;
    let mut rows = Vec::new();
    while killed_at.elapsed() < give_up {
        rows = db.history().await.unwrap_or_default();
        let n = rows
            .iter()
            .filter(|r| orphan_ids.contains_key(&r.connection_id))
            .count();
        if n == orphan_ids.len() {
            archived_after = Some(killed_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let by_id: HashMap<Uuid, &str> = rows
        .iter()
        .map(|r| (r.connection_id, r.end_reason.as_str()))
        .collect();
    let mut orphans_wrong_reason = Vec::new();
    let mut orphans_lost = Vec::new();
    let mut orphans_expired = 0;
    for id in orphan_ids.keys() {
        match by_id.get(id) {
            None => orphans_lost.push(*id),
            Some(&"expired") => orphans_expired += 1,
            Some(r) => orphans_wrong_reason.push(format!("{id}: {r}")),
        }
    }
    let orphans_archived = orphan_ids.len() - orphans_lost.len();
    // The orphans' client sides saw the connection break.
    for o in orphans {
        let _ = o.task.await;
    }

    // The survivors are untouched: their sockets are open and their connections live.
    let mut survivors_disturbed = 0;
    for s in &survivors {
        if s.task.is_finished() {
            survivors_disturbed += 1;
        }
    }
    h.restart_api(0).await?;
    let probe = client
        .register(0, &names[0], "http", "after-restart")
        .await?;
    let restarted_replica_ok = probe.status == 201;
    let probe_id = probe.connection_id();
    if let Some(id) = probe_id {
        client.close(0, &names[0], id).await?;
    }
    stop.cancel();
    let survivor_ids: Vec<Uuid> = survivors.iter().map(|s| s.connection_id).collect();
    for s in survivors {
        match s.task.await {
            Ok(HoldEnd::Stopped) => {}
            Ok(HoldEnd::ServerEnded(_)) | Err(_) => survivors_disturbed += 1,
        }
    }
    // Then a graceful stop of the same replica: Close 1001 to every socket, connections
    // removed (`closed`) before it exits.
    let term_stop = CancellationToken::new();
    let _stop_term = term_stop.clone().drop_guard();
    let draining = sockets::open(
        &client,
        params.survivors.clamp(1, 50),
        64,
        &names,
        |_| 0,
        &term_stop,
        OnStop::Close,
    )
    .await?;
    let term_exit = h.terminate_api(0, Duration::from_secs(15)).await?;
    let term_ids: Vec<Uuid> = draining.iter().map(|d| d.connection_id).collect();
    let mut term_not_1001 = Vec::new();
    for d in draining {
        match d.task.await {
            Ok(HoldEnd::ServerEnded(Some((1001, _)))) => {}
            other => term_not_1001.push(format!("{}: {other:?}", d.connection_id)),
        }
    }
    // Removed before exit: the rows follow within the archive's own delay, not a window.
    let expected =
        orphan_ids.len() + survivor_ids.len() + usize::from(probe_id.is_some()) + term_ids.len();
    h.wait_history(expected, bound + Duration::from_secs(20))
        .await?;
    let rows = h.db()?.history().await?;
    let by_id: HashMap<Uuid, &str> = rows
        .iter()
        .map(|r| (r.connection_id, r.end_reason.as_str()))
        .collect();
    let survivors_archived_closed = survivor_ids
        .iter()
        .filter(|id| by_id.get(id) == Some(&"closed"))
        .count();
    let term_closed = term_ids
        .iter()
        .filter(|id| by_id.get(id) == Some(&"closed"))
        .count();
    let live_after = live_connections_on(&h, 1).await?;
    h.check_running()?;
    let figures = ApiKillFigures {
        params,
        bound,
        archived_after,
        orphans_archived,
        orphans_expired,
        orphans_wrong_reason,
        orphans_lost,
        survivors_disturbed,
        survivors_archived_closed,
        restarted_replica_ok,
        term_sockets: term_ids.len(),
        term_not_1001,
        term_closed,
        term_exit: format!(
            "{} ({})",
            term_exit.status,
            if term_exit.clean {
                "clean"
            } else {
                "NOT CLEAN"
            }
        ),
        term_exit_clean: term_exit.clean,
        live_after,
        exits: String::new(),
        unclean_exits: 0,
    };
    conclude(h, "api-kill", figures).await
}
