//! Where things live in Redis: every key name is built here, and nowhere else.
//!
//! Scripts receive every key they touch in `KEYS` (see `lua/common.lua` for
//! the order shard scripts expect), so a Redis Cluster routes each call by its
//! real keys and redirects it correctly while a slot is being migrated.
//!
//! Cluster safety: the keys of one shard are `<prefix>:{<shard>}:<name>`, so
//! they carry the hash tag `{<shard>}` and land in one slot. A session's keys
//! live in its shard; a global index (live, due, wake, outbox, stats) exists
//! once per shard, so the work over it is split into `shards` independent
//! pieces spread over the cluster's nodes. Users (`{u<n>}`) and connection ids
//! (`{i<n>}`) have shards of their own, since they span sessions. The shard
//! count is part of the data layout: every process must use the same one, and
//! changing it needs an empty store.
use crate::domain::{ConnectionId, SessionId, UserId};
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

    /// The base every key of a shard starts with.
    fn shard_base(&self, shard: ShardId) -> String {
        format!("{}:{{{}}}", self.prefix, shard.0)
    }

    /// One shard-wide key.
    pub fn shard_key(&self, shard: ShardId, key: ShardKey) -> String {
        format!("{}:{}", self.shard_base(shard), key.name())
    }

    /// The shard-wide keys every shard script declares first, in the order
    /// `lua/common.lua` reads them.
    pub fn shard_keys(&self, shard: ShardId) -> Vec<String> {
        ShardKey::DECLARED
            .iter()
            .map(|&k| self.shard_key(shard, k))
            .collect()
    }

    /// A session's keys, in the order `lua/common.lua` reads them: its
    /// connection set, its user counts and its metadata hash.
    pub fn session_keys(&self, session: &SessionId) -> [String; 3] {
        let base = self.shard_base(self.shard_of(session));
        [
            format!("{base}:s:{session}:c"),
            format!("{base}:s:{session}:u"),
            format!("{base}:s:{session}:m"),
        ]
    }

    /// A session's connection set alone (what heartbeats touch).
    pub fn session_conns_key(&self, session: &SessionId) -> String {
        let [c, _, _] = self.session_keys(session);
        c
    }

    /// The shard of a connection id's index entry.
    pub fn id_shard_of(&self, id: ConnectionId) -> ShardId {
        ShardId(bucket(id.as_uuid().as_bytes(), self.shards))
    }

    /// The index entry of a connection id of its own: which session and user
    /// took it, while the id is claimed but not yet registered, and for the
    /// retention after its connection ended (with an expiry, which a field
    /// of a hash cannot have on Redis 7.0). Entries written before the
    /// buckets existed are found here too.
    pub fn id_key(&self, id: ConnectionId) -> String {
        format!("{}:{{i{}}}:id:{id}", self.prefix, self.id_shard_of(id).0)
    }

    /// The bucket holding the index entries of registered connections, a
    /// field each: one small hash per [`ID_BUCKETS`]th of an id shard costs
    /// a fraction of a key per connection.
    pub fn id_bucket_key(&self, id: ConnectionId) -> String {
        let h = fnv1a(id.as_uuid().as_bytes());
        // The shard takes h modulo the shard count; the bucket, the bits above.
        let sub = (h / u64::from(self.shards)) % ID_BUCKETS;
        format!("{}:{{i{}}}:ids:{sub}", self.prefix, self.id_shard_of(id).0)
    }

    /// The set of the ids whose connections ended in period `index` of
    /// `span_secs` seconds (see `EndedIds` in the store): an ended id costs a
    /// member of a set that expires whole, not a key with an expiry of its own.
    pub fn ended_ids_key(&self, id: ConnectionId, span_secs: u64, index: i64) -> String {
        format!(
            "{}:{{i{}}}:ended:{span_secs}s:{index}",
            self.prefix,
            self.id_shard_of(id).0
        )
    }

    /// The shard of a user's connection slots.
    pub fn user_shard_of(&self, user: &UserId) -> ShardId {
        ShardId(bucket(user.as_str().as_bytes(), self.shards))
    }

    /// A user's connection slots (per-user limit): users are spread over
    /// their own shards, since a user's connections span many sessions.
    pub fn user_key(&self, user: &UserId) -> String {
        format!(
            "{}:{{u{}}}:user:{user}",
            self.prefix,
            self.user_shard_of(user).0
        )
    }

    /// The sequence leader terms are drawn from.
    pub fn term_seq_key(&self) -> String {
        format!("{}:{{term}}:seq", self.prefix)
    }

    /// The leader lock of `TRACKER_ELECTION=redis`.
    pub fn lock_key(&self, name: &str) -> String {
        format!("{}:{{lock}}:{name}", self.prefix)
    }

    /// A one-time WebSocket ticket. No hash tag: a ticket is read and written
    /// alone, so hashing the whole name spreads tickets over every node.
    pub fn ticket_key(&self, ticket: &str) -> String {
        format!("{}:ticket:{ticket}", self.prefix)
    }
}

/// The shard-wide keys (see `lua/common.lua` for what each holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardKey {
    Conn,
    Live,
    Due,
    Wake,
    Outbox,
    Stats,
    Known,
    UserAgents,
    UserAgentUses,
    Term,
    WakeSignal,
    Events,
    ArchiveSignal,
    Epoch,
    /// What the leader says holds back its decisions on the shard (startup
    /// guard, dry run); declared after the session keys by the scripts that
    /// use it.
    LeaderFacts,
}

impl ShardKey {
    /// What shard scripts declare as `KEYS[1..=13]`, in this order.
    pub const DECLARED: [ShardKey; 13] = [
        ShardKey::Conn,
        ShardKey::Live,
        ShardKey::Due,
        ShardKey::Wake,
        ShardKey::Outbox,
        ShardKey::Stats,
        ShardKey::Known,
        ShardKey::UserAgents,
        ShardKey::UserAgentUses,
        ShardKey::Term,
        ShardKey::WakeSignal,
        ShardKey::Events,
        ShardKey::ArchiveSignal,
    ];

    fn name(self) -> &'static str {
        match self {
            ShardKey::Conn => "conn",
            ShardKey::Live => "live",
            ShardKey::Due => "due",
            ShardKey::Wake => "wake",
            ShardKey::Outbox => "outbox",
            ShardKey::Stats => "stats",
            ShardKey::Known => "known",
            ShardKey::UserAgents => "ua",
            ShardKey::UserAgentUses => "uan",
            ShardKey::Term => "term",
            ShardKey::WakeSignal => "wakesig",
            ShardKey::Events => "events",
            ShardKey::ArchiveSignal => "archsig",
            ShardKey::Epoch => "epoch",
            ShardKey::LeaderFacts => "leader",
        }
    }
}

/// Buckets of registered connection ids per id shard. Redis keeps a hash
/// of up to `hash-max-listpack-entries` (128 by default) fields as one
/// compact list, so with the default 32 shards the buckets stay compact up
/// to about 500,000 live connections; past that, raise that setting (see
/// docs/operations.md) or a bucket becomes a hash table, still smaller than
/// a key per id. Part of the data layout, like the shard count.
pub const ID_BUCKETS: u64 = 128;

/// FNV-1a: tiny, stable across versions and platforms, and spreads short ids
/// well. Stability matters more than speed: the shard of a session is data.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn bucket(bytes: &[u8], buckets: u16) -> u16 {
    (fnv1a(bytes) % u64::from(buckets)) as u16
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
        assert_eq!(ks.shard_key(ShardId(7), ShardKey::Due), "trk:{7}:due");
        assert_eq!(
            ks.shard_key(ShardId(7), ShardKey::LeaderFacts),
            "trk:{7}:leader"
        );
        let [c, u, m] = ks.session_keys(&sid("session-1"));
        let shard = ks.shard_of(&sid("session-1")).0;
        assert_eq!(c, format!("trk:{{{shard}}}:s:session-1:c"));
        assert_eq!(u, format!("trk:{{{shard}}}:s:session-1:u"));
        assert_eq!(m, format!("trk:{{{shard}}}:s:session-1:m"));
        assert_eq!(ks.lock_key("reaper"), "trk:{lock}:reaper");
        assert_eq!(ks.ticket_key("abc"), "trk:ticket:abc");
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
    fn an_ids_bucket_shares_its_entrys_slot_and_ids_spread_over_buckets() {
        let ks = KeySpace::new("trk", 32).expect("keyspace");
        let mut per_bucket = std::collections::HashMap::new();
        for i in 0..200_000u128 {
            // Fixed ids (a multiplicative spread of i): the same every run.
            let id = ConnectionId::from(uuid::Uuid::from_u128(
                i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835),
            ));
            let (entry, bucket) = (ks.id_key(id), ks.id_bucket_key(id));
            let tag = |k: &str| k[k.find('{').expect("tag")..=k.find('}').expect("tag")].to_owned();
            assert_eq!(tag(&entry), tag(&bucket), "one slot: {entry} {bucket}");
            *per_bucket.entry(bucket).or_insert(0u32) += 1;
        }
        // 32 shards x 128 buckets, about 49 ids each: every bucket is used,
        // none holds twice its share.
        assert_eq!(per_bucket.len(), 32 * ID_BUCKETS as usize);
        assert!(per_bucket.values().all(|&n| n <= 98), "{per_bucket:?}");
    }

    #[test]
    fn user_keys_carry_their_own_tag_even_for_odd_user_ids() {
        let ks = KeySpace::new("trk", 8).expect("keyspace");
        let u: UserId = "weird{user}".parse().expect("user id");
        let key = ks.user_key(&u);
        // Redis hashes the first {...}: it must be the shard's tag, not the user's braces.
        let tag = &key[key.find('{').expect("tag")..=key.find('}').expect("tag")];
        assert_eq!(tag, format!("{{u{}}}", ks.user_shard_of(&u).0));
    }
}
