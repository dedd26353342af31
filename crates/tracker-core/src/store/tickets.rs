//! One-time WebSocket tickets: a short-lived key per ticket, written once
//! and read-and-deleted once.
//!
//! Each is a plain command on one key (`SET NX PX`, then `GETDEL`), so a
//! ticket costs O(1), needs no script, and a Redis Cluster routes it by its
//! own key. `GETDEL` makes redemption atomic: of two concurrent uses, one
//! gets the grant and the other nothing. What a ticket grants is opaque
//! here: the caller encodes it.

use std::time::Duration;

use crate::error::Result;

use super::types::millis;
use super::Store;

impl Store {
    /// Records `ticket` with what it grants, for `ttl`. False if the name is
    /// already taken (never, with enough random bits; the caller draws again).
    pub async fn issue_ticket(&self, ticket: &str, grant: &str, ttl: Duration) -> Result<bool> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.keys.ticket_key(ticket))
            .arg(grant)
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl).max(1));
        self.query::<Option<String>>(&cmd)
            .await
            .map(|reply| reply.is_some())
    }

    /// What `ticket` grants, if it exists and has not expired; it is gone
    /// afterwards, whoever asked.
    pub async fn redeem_ticket(&self, ticket: &str) -> Result<Option<String>> {
        let mut cmd = redis::cmd("GETDEL");
        cmd.arg(self.keys.ticket_key(ticket));
        self.query(&cmd).await
    }
}
