//! Tokens already verified, so that a client sending the same bearer token
//! on every heartbeat pays for its signature and claims once, not per request.
//!
//! An entry is only ever made from a token that passed every check of
//! [`crate::auth::Authenticator`], and it is used strictly before the token's
//! `exp` (the leeway that verification allows is not extended to the cache)
//! and at most [`MAX_AGE`] after it was verified. The key and rules it was
//! verified with are fixed for the process, so a change of configuration
//! (a new secret or key) takes a restart, which empties the cache.
//!
//! It is bounded: at most [`CAPACITY`] entries of tokens no longer than
//! [`MAX_TOKEN_LEN`] bytes; longer tokens are verified every time. Lookups
//! compare the whole token, not a digest of it, so two tokens can never
//! share an entry.

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};

use crate::access::Principal;

/// Most tokens kept.
pub const CAPACITY: usize = 4096;
/// Longer tokens are not kept (with [`CAPACITY`], bounds the memory to ~8 MiB).
pub const MAX_TOKEN_LEN: usize = 2048;
/// An entry is verified again after this long (seconds), whatever its `exp`.
pub const MAX_AGE: u64 = 60;

#[derive(Debug, Clone)]
struct Entry {
    principal: Principal,
    /// Unix seconds from which the entry is not used.
    until: u64,
}

/// Verified tokens and who they name; see the module doc.
#[derive(Debug, Default)]
pub struct TokenCache {
    entries: RwLock<HashMap<Box<str>, Entry>>,
}

impl TokenCache {
    /// Who `token` names, if it was verified and `now` (unix seconds) is
    /// before both its `exp` and the end of the entry's age.
    pub fn get(&self, token: &str, now: u64) -> Option<Principal> {
        let entries = self.entries.read().unwrap_or_else(PoisonError::into_inner);
        let entry = entries.get(token)?;
        (now < entry.until).then(|| entry.principal.clone())
    }

    /// Keeps a token that has just passed verification at `now`, with its
    /// `exp` (unix seconds). A token without a usable `exp` is not kept.
    pub fn insert(&self, token: &str, principal: &Principal, exp: Option<f64>, now: u64) {
        let Some(exp) = exp.filter(|e| e.is_finite() && *e > 0.0) else {
            return;
        };
        // Whole seconds down: never past the token's own exp.
        let until = (exp.floor() as u64).min(now.saturating_add(MAX_AGE));
        if token.len() > MAX_TOKEN_LEN || until <= now {
            return;
        }
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= CAPACITY && !entries.contains_key(token) {
            entries.retain(|_, e| now < e.until);
            if entries.len() >= CAPACITY {
                // All live: drop any one. HashMap order is randomized per
                // process, so no client can aim at another's entry.
                if let Some(victim) = entries.keys().next().cloned() {
                    entries.remove(&victim);
                }
            }
        }
        entries.insert(
            token.into(),
            Entry {
                principal: principal.clone(),
                until,
            },
        );
    }

    /// How many tokens are kept.
    pub fn len(&self) -> usize {
        self.entries
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::Role;

    fn alice() -> Principal {
        Principal {
            subject: "alice".parse().unwrap(),
            role: Role::Service,
        }
    }

    #[test]
    fn an_entry_is_never_used_at_or_past_the_tokens_exp() {
        let cache = TokenCache::default();
        let now = 1_000_000;
        cache.insert("t", &alice(), Some((now + 30) as f64), now);
        assert_eq!(cache.get("t", now), Some(alice()));
        assert_eq!(cache.get("t", now + 29), Some(alice()));
        assert_eq!(cache.get("t", now + 30), None, "at exp");
        assert_eq!(cache.get("t", now + 3600), None, "past exp");
        // A fractional exp is cut down, not rounded up.
        cache.insert("f", &alice(), Some(now as f64 + 10.9), now);
        assert_eq!(cache.get("f", now + 10), None);
        assert_eq!(cache.get("other", now), None);
    }

    #[test]
    fn an_entry_is_verified_again_after_its_max_age() {
        let cache = TokenCache::default();
        let now = 1_000_000;
        cache.insert("t", &alice(), Some((now + 86_400) as f64), now);
        assert_eq!(cache.get("t", now + MAX_AGE - 1), Some(alice()));
        assert_eq!(cache.get("t", now + MAX_AGE), None);
    }

    #[test]
    fn expired_unbounded_or_huge_tokens_are_not_kept() {
        let cache = TokenCache::default();
        let now = 1_000_000;
        cache.insert("late", &alice(), Some(now as f64), now);
        cache.insert("gone", &alice(), Some((now - 5) as f64), now);
        cache.insert("none", &alice(), None, now);
        cache.insert("nan", &alice(), Some(f64::NAN), now);
        let huge = "x".repeat(MAX_TOKEN_LEN + 1);
        cache.insert(&huge, &alice(), Some((now + 30) as f64), now);
        assert!(cache.is_empty());
    }

    #[test]
    fn the_cache_stays_within_its_capacity() {
        let cache = TokenCache::default();
        let now = 1_000_000;
        for i in 0..CAPACITY + 100 {
            cache.insert(&format!("t{i}"), &alice(), Some((now + 30) as f64), now);
        }
        assert_eq!(cache.len(), CAPACITY);
        assert_eq!(
            cache.get(&format!("t{}", CAPACITY + 99), now),
            Some(alice()),
            "the newest is kept"
        );
        // Expired entries make room first.
        let later = now + 31;
        cache.insert("fresh", &alice(), Some((later + 30) as f64), later);
        assert_eq!(cache.len(), 1);
    }
}
