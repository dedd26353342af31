//! The one error type of the core crate.

use std::time::Duration;

/// What can go wrong talking to the store. Business outcomes (a limit reached,
/// a terminated session) are not errors; they are variants of the operation's
/// own outcome type.
/// Clone: one failed call may answer many callers (coalesced heartbeats).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A setting makes no sense; raised at start, never at run time.
    #[error("invalid store configuration: {0}")]
    Config(String),
    /// Redis answered with an error or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis did not answer within the command timeout.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// A script answered something it never returns: a bug, or a foreign
    /// script under our keys.
    #[error("unexpected reply from {script}: {detail}")]
    Reply {
        script: &'static str,
        detail: String,
    },
}

impl Error {
    /// True when the backend is unreachable or slow, as opposed to a bug:
    /// callers map these to 503 and retry.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Timeout(_) => true,
            Error::Redis(e) => {
                e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout()
                    || e.is_cluster_error()
                    || matches!(
                        e.kind(),
                        redis::ErrorKind::Server(
                            redis::ServerErrorKind::BusyLoading
                                | redis::ServerErrorKind::TryAgain
                                | redis::ServerErrorKind::ClusterDown
                                | redis::ServerErrorKind::MasterDown
                        )
                    )
            }
            Error::Config(_) | Error::Reply { .. } => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
