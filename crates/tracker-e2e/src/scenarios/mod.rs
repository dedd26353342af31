//! The scenarios. Each starts its own [`crate::Harness`], runs, checks its invariants and
//! answers its figures; a broken invariant is an [`crate::Error::Violated`] carrying them.
//! Sizes are parameters: CI runs the short versions (`tests/e2e.rs`), the full ones run
//! behind `cargo run -p tracker-e2e --release -- <scenario>`.

/// Implements [`Figures`] for a figures type with an inherent `problems` and the fields
/// `exits` and `unclean_exits` (on itself, or on its field `$inner`).
macro_rules! impl_figures {
    ($figures:ty $(=> $inner:ident)?) => {
        impl $crate::scenarios::Figures for $figures {
            fn problems(&self) -> Vec<String> {
                Self::problems(self)
            }

            fn set_exits(&mut self, line: String, unclean: usize) {
                let holder = &mut (*self)$(.$inner)?;
                holder.exits = line;
                holder.unclean_exits = unclean;
            }
        }
    };
}

pub mod api_kill;
pub mod checks;
pub mod leader_kill;
pub mod load;
pub mod pg_outage;
pub mod races;
pub mod redis_restart;
pub mod sockets;
pub mod ws_drop;

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::harness::Harness;
use crate::{Error, Result};

/// Creates `count` Sessions named `e2e-<i>` with idle timeouts of 1 s or 2 s, and waits until
/// the API reports them all mirrored.
pub(crate) async fn sessions(h: &Harness, count: usize) -> Result<Arc<Vec<String>>> {
    let names: Vec<String> = (0..count).map(|i| format!("e2e-{i:05}")).collect();
    for (i, name) in names.iter().enumerate() {
        let idle = if i % 2 == 0 { "1s" } else { "2s" };
        h.create_session(name, Some(idle))?;
    }
    h.wait_mirrored(&names, Duration::from_secs(30)).await?;
    Ok(Arc::new(names))
}

/// Waits (bounded) until history holds `expected` rows; answers the count and how long that
/// took.
pub(crate) async fn drain(
    h: &Harness,
    expected: usize,
    timeout: Duration,
) -> Result<(usize, Duration)> {
    let started = Instant::now();
    let n = h.wait_history(expected, timeout).await?;
    Ok((n, started.elapsed()))
}

/// `total_connections` of `/v1/stats`: 0 once every connection has ended.
pub(crate) async fn live_connections(h: &Harness) -> Result<u64> {
    live_connections_on(h, 0).await
}

/// [`live_connections`] asked of API replica `replica`.
pub(crate) async fn live_connections_on(h: &Harness, replica: usize) -> Result<u64> {
    let a = h.client().stats(replica).await?;
    a.body
        .get("total_connections")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| Error::Protocol(format!("/v1/stats answered {} {}", a.status, a.body)))
}

/// What every scenario's figures answer to [`conclude`].
pub(crate) trait Figures: std::fmt::Display {
    /// Every broken promise, in words; empty when the run passed.
    fn problems(&self) -> Vec<String>;
    /// Records how the processes ended at the harness's shutdown.
    fn set_exits(&mut self, line: String, unclean: usize);
}

/// The common end of a scenario: keeps the run directory if the figures already show a
/// problem, shuts the harness down, records the exits, and answers `Ok(figures)` if there is
/// no problem, else [`Error::Violated`] carrying them.
pub(crate) async fn conclude<F: Figures>(
    mut h: Harness,
    scenario: &'static str,
    mut figures: F,
) -> Result<F> {
    let run_dir = h.run_dir().to_owned();
    if !figures.problems().is_empty() {
        h.keep_run_dir();
    }
    let exits = h.shutdown().await?;
    figures.set_exits(
        exits_line(&exits),
        exits.iter().filter(|e| !e.clean).count(),
    );
    if figures.problems().is_empty() {
        Ok(figures)
    } else {
        Err(Error::Violated {
            scenario,
            details: figures.to_string(),
            run_dir,
        })
    }
}

/// The last line of a scenario's figures: PASS, or FAIL with every problem.
pub(crate) fn write_result(
    f: &mut std::fmt::Formatter<'_>,
    problems: &[String],
) -> std::fmt::Result {
    if problems.is_empty() {
        writeln!(f, "  result: PASS")
    } else {
        writeln!(f, "  result: FAIL: {}", problems.join("; "))
    }
}

/// The process exits of a shutdown, one line.
fn exits_line(exits: &[crate::harness::Exit]) -> String {
    let mut s = String::new();
    for e in exits {
        let _ = write!(
            s,
            "{}={}{} ",
            e.process,
            e.status,
            if e.clean { "" } else { " (NOT CLEAN)" }
        );
    }
    s.trim_end().to_owned()
}
