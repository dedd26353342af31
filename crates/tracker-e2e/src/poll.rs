//! Bounded polling: no test sleeps and hopes.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::{Error, Result};

/// Calls `check` every `every` until it answers `Some`, or fails with [`Error::Timeout`]
/// after `timeout`. `check` may fail: its error ends the wait at once.
pub async fn until<T, F, Fut>(
    timeout: Duration,
    every: Duration,
    what: &str,
    mut check: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.to_owned(),
                waited: timeout,
            });
        }
        tokio::time::sleep(every.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_the_first_some_or_times_out() {
        let mut n = 0;
        let v = until(
            Duration::from_secs(1),
            Duration::from_millis(1),
            "n",
            || {
                n += 1;
                let v = (n >= 3).then_some(n);
                async move { Ok(v) }
            },
        )
        .await
        .unwrap();
        assert_eq!(v, 3);
        let e = until(
            Duration::from_millis(20),
            Duration::from_millis(5),
            "never",
            || async { Ok(None::<()>) },
        )
        .await
        .unwrap_err();
        assert!(matches!(e, Error::Timeout { .. }), "{e}");
    }
}
