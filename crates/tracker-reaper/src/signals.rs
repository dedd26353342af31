//! Listening for the store's signals (see `tracker_core::SignalListener`):
//! one task per listener group, each blocked on its dedicated connection and
//! handing every signalled shard to a callback. A failed connection is made
//! again with backoff; whoever listens keeps a backstop read for the gap.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracker_core::{ShardId, Signal, Store};

use crate::backoff::Backoff;

/// How long one blocking wait for a signal lasts: an idle listener makes one
/// call per this period.
pub const SIGNAL_WAIT: Duration = Duration::from_secs(5);

/// Starts the listeners of `signal` over every shard (one per group of
/// [`Store::signal_groups`]); they end with `stop`.
pub fn spawn_listeners<F>(
    store: &Store,
    signal: Signal,
    on_signal: F,
    stop: &CancellationToken,
) -> Vec<JoinHandle<()>>
where
    F: Fn(ShardId) + Clone + Send + Sync + 'static,
{
    store
        .signal_groups()
        .into_iter()
        .map(|shards| {
            tokio::spawn(listen(
                store.clone(),
                signal,
                shards,
                on_signal.clone(),
                stop.clone(),
            ))
        })
        .collect()
}

/// Waits for signals on one connection until it fails; answers the failure.
async fn wait_signals(
    store: &Store,
    signal: Signal,
    shards: &[ShardId],
    on_signal: &(impl Fn(ShardId) + Sync),
    backoff: &mut Backoff,
) -> tracker_core::Error {
    let mut listener = match store.signal_listener(signal, shards).await {
        Ok(l) => l,
        Err(e) => return e,
    };
    loop {
        match listener.wait_shard(SIGNAL_WAIT).await {
            Ok(signalled) => {
                backoff.reset();
                if let Some(shard) = signalled {
                    on_signal(shard);
                }
            }
            Err(e) => return e,
        }
    }
}

/// Blocks on the `signal`s of `shards` until `stop`, calling `on_signal` for
/// each one; reconnects with backoff after a failure (the listener's owner
/// reads every shard now and then, which covers the gap).
async fn listen(
    store: Store,
    signal: Signal,
    shards: Vec<ShardId>,
    on_signal: impl Fn(ShardId) + Sync,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let failed = tokio::select! {
            () = stop.cancelled() => return,
            e = wait_signals(&store, signal, &shards, &on_signal, &mut backoff) => e,
        };
        let retry = backoff.next_delay();
        if backoff.attempts() == 1 {
            tracing::warn!(error = %failed, ?signal, retry_in = ?retry, first_shard = shards.first().map(|s| s.0),
                "waiting for signals failed; reconnecting (the backstop read covers the gap)");
        } else {
            tracing::debug!(error = %failed, ?signal, retry_in = ?retry, "waiting for signals failed again");
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(retry) => {}
        }
    }
}
