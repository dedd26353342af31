//! The one error type of the reaper library.

use std::net::SocketAddr;
use std::time::Duration;

/// What can go wrong; variants are what callers act on (retry, roll back, stop).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting makes no sense; raised at start only.
    #[error("{0}")]
    Config(String),
    /// Redis failed or timed out (the core store's error).
    #[error(transparent)]
    Store(#[from] tracker_core::Error),
    /// The Kubernetes API answered with an error or the connection failed.
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    /// The Kubernetes API did not answer within the timeout.
    #[error("kubernetes did not answer within {0:?}")]
    KubeTimeout(Duration),
    /// The Kubernetes client could not be configured (no kubeconfig, no in-cluster env).
    #[error("kubernetes client configuration: {0}")]
    KubeConfig(String),
    /// PostgreSQL failed.
    #[error("postgres: {0}")]
    Database(#[from] sqlx::Error),
    /// A migration failed.
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The metrics listener could not be bound.
    #[error("bind metrics listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The HTTP status of a Kubernetes API error, if that is what this is.
    pub fn kube_status(&self) -> Option<u16> {
        match self {
            Error::Kube(kube::Error::Api(status)) => Some(status.code),
            _ => None,
        }
    }

    /// 409: someone else changed the object since we read it (resourceVersion).
    pub fn is_conflict(&self) -> bool {
        self.kube_status() == Some(409)
    }

    /// True when a write surely did not happen: the API server refused it
    /// (4xx, a conflict included). A timeout, a 5xx or a broken connection
    /// may come after the write was applied: those are ambiguous, and only
    /// reading the resource again tells.
    pub fn surely_not_applied(&self) -> bool {
        matches!(self.kube_status(), Some(400..=499) if self.kube_status() != Some(408))
    }

    /// PostgreSQL refused a statement for the data in it, not for the state of
    /// the connection or the server: retrying the same rows fails the same way.
    /// Classes 22 (data exception: a NUL byte in text, a value out of range),
    /// 23 (integrity: NOT NULL, CHECK; the primary key never, the inserts say
    /// ON CONFLICT DO NOTHING) and 54 (a row too large for an index).
    /// Everything else (I/O, pool timeouts, 08 connection, 40 rollback,
    /// 53 resources, 57 shutdown or cancel) is transient and retried.
    pub fn refused_data(&self) -> Option<Refusal> {
        let Error::Database(sqlx::Error::Database(db)) = self else {
            return None;
        };
        let code = db.code()?;
        matches!(code.get(..2), Some("22" | "23" | "54")).then(|| Refusal {
            sqlstate: code.into_owned(),
            message: db.message().to_owned(),
        })
    }
}

/// Why PostgreSQL refused some data; see [`Error::refused_data`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub sqlstate: String,
    pub message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.sqlstate)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Bounds a Kubernetes call: kube's own read timeout is minutes long, for watches.
pub(crate) async fn kube_timeout<T>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T> {
    match tokio::time::timeout(limit, call).await {
        Ok(r) => r.map_err(Error::from),
        Err(_) => Err(Error::KubeTimeout(limit)),
    }
}
