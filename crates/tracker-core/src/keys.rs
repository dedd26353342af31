//! Where things live in Redis: shards and the few keys built outside scripts.
//!
//! The key names inside a shard are written once, in `lua/common.lua`; this
//! module decides which shard a session or user belongs to and builds the
//! shard *bases* that scripts receive as `KEYS[1]`.
//!
//! Cluster safety: a base is `<prefix>:{<shard>}`, so every key derived from it
//! carries the hash tag `{<shard>}` and lands in one slot. A session's keys all
//! derive from its shard's base; a global index (live, due, wake, outbox,
//! stats) exists once per shard, so the work over it is split into `shards`
//! independent pieces spread over the cluster's nodes. The shard count is part
//! of the data layout: every process must use the same one, and changing it
//! needs an empty store.

use crate::domain::{SessionId, UserId};
use crate::error::{Error, Result};

/// A shard number, `0..shards`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub u16);

/// The key space of one tracker deployment: its prefix and shard count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpace {
    prefix: String,
    shards: u16,
}

impl KeySpace {
    /// Most shard counts are far below this; it keeps a shard per slot at most.
    pub const MAX_SHARDS: u16 = 16384;

    pub fn new(prefix: &str, shards: u16) -> Result<Self> {
        if prefix.is_empty() || prefix.len() > 64 {
            return Err(Error::Config(
                "key prefix must be 1 to 64 characters".into(),
            ));
        }
        // A brace in the prefix would move the hash tag and break slot co-location.
        if prefix
            .chars()
            .any(|c| c == '{' || c == '}' || c.is_whitespace() || c.is_control())
        {
            return Err(Error::Config(
                "key prefix may not contain braces, spaces or control characters".into(),
            ));
        }
        if shards == 0 || shards > Self::MAX_SHARDS {
            return Err(Error::Config(format!(
                "shard count must be 1 to {}",
                Self::MAX_SHARDS
            )));
        }
        Ok(Self {
            prefix: prefix.to_owned(),
            shards,
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn shard_count(&self) -> u16 {
        self.shards
    }

    pub fn shards(&self) -> impl Iterator<Item = ShardId> + use<> {
        (0..self.shards).map(ShardId)
    }

    pub fn shard_of(&self, session: &SessionId) -> ShardId {
        ShardId(bucket(session.as_str().as_bytes(), self.shards))
    }

    /// `KEYS[1]` of every shard script.
    pub fn shard_base(&self, shard: ShardId) -> String {
        format!("{}:{{{}}}", self.prefix, shard.0)
    }

    /// `KEYS[1]` of the user-limit scripts: users are spread over their own
    /// shards, since a user's connections span many sessions.
    pub fn user_base(&self, user: &UserId) -> String {
        format!(
            "{}:{{u{}}}",
            self.prefix,
            bucket(user.as_str().as_bytes(), self.shards)
        )
    }

    /// The leader lock of `TRACKER_ELECTION=redis`.
    pub fn lock_key(&self, name: &str) -> String {
        format!("{}:{{lock}}:{name}", self.prefix)
    }
}

/// FNV-1a: tiny, stable across versions and platforms, and spreads short ids
/// well. Stability matters more than speed: the shard of a session is data.
fn bucket(bytes: &[u8], buckets: u16) -> u16 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % u64::from(buckets)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sid(s: &str) -> SessionId {
        s.parse().expect("valid session id")
    }

    #[test]
    fn prefixes_that_would_move_the_hash_tag_are_refused() {
        assert!(KeySpace::new("trk", 16).is_ok());
        assert!(KeySpace::new("tenant-a:trk", 16).is_ok());
        for bad in ["", "a{b", "a}b", "a b"] {
            assert!(KeySpace::new(bad, 16).is_err(), "{bad:?}");
        }
        assert!(KeySpace::new("trk", 0).is_err());
    }

    #[test]
    fn a_session_always_maps_to_the_same_shard() {
        let ks = KeySpace::new("trk", 32).expect("keyspace");
        // Pinned values: the shard of a session is part of the stored layout.
        assert_eq!(
            ks.shard_of(&sid("session-1")),
            ks.shard_of(&sid("session-1"))
        );
        assert_eq!(bucket(b"session-1", 32), bucket(b"session-1", 32));
        assert_eq!(bucket(b"", 32), (0xcbf2_9ce4_8422_2325u64 % 32) as u16);
        assert_eq!(ks.shard_base(ShardId(7)), "trk:{7}");
        assert_eq!(ks.lock_key("reaper"), "trk:{lock}:reaper");
    }

    #[test]
    fn sessions_spread_over_all_shards() {
        let ks = KeySpace::new("trk", 16).expect("keyspace");
        let mut counts = [0u32; 16];
        for i in 0..16_000 {
            counts[ks.shard_of(&sid(&format!("session-{i}"))).0 as usize] += 1;
        }
        // Within ±25% of the mean: good enough to spread work over nodes.
        assert!(
            counts.iter().all(|&c| (750..=1250).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn user_bases_carry_their_own_tag_even_for_odd_user_ids() {
        let ks = KeySpace::new("trk", 8).expect("keyspace");
        let u: UserId = "weird{user}".parse().expect("user id");
        let base = ks.user_base(&u);
        assert!(base.starts_with("trk:{u") && base.ends_with('}'), "{base}");
    }
}
