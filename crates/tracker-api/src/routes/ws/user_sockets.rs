//! The per-replica cap of WebSockets per plain user.
//!
//! A plain user holds at most `TRACKER_MAX_WEBSOCKETS_PER_USER` sockets on
//! one replica: each costs memory and a task here, which the store's
//! per-user limit (across replicas, and off when 0) does not see.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tracker_core::UserId;

/// Counts the open WebSockets of each plain user on this replica.
#[derive(Debug)]
pub struct UserSockets {
    /// 0: no limit (then nothing is counted).
    limit: u32,
    open: Mutex<HashMap<UserId, u32>>,
}

/// One open socket of a user; gives its place back on drop.
#[derive(Debug)]
pub struct UserSocket {
    sockets: Arc<UserSockets>,
    user: UserId,
}

impl UserSockets {
    pub fn new(limit: u32) -> Arc<Self> {
        Arc::new(Self {
            limit,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A place for one more socket of `user`, or `None` at the limit.
    pub fn try_open(self: &Arc<Self>, user: &UserId) -> Option<Option<UserSocket>> {
        if self.limit == 0 {
            return Some(None);
        }
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(user.clone()).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(Some(UserSocket {
            sockets: self.clone(),
            user: user.clone(),
        }))
    }

    /// Sockets `user` holds here (for tests and metrics).
    pub fn open(&self, user: &UserId) -> u32 {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(user).copied().unwrap_or(0)
    }
}

impl Drop for UserSocket {
    fn drop(&mut self) {
        let mut open = self.sockets.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.user) {
            *n -= 1;
            // Users come and go: keep the map to the ones with sockets.
            if *n == 0 {
                open.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_sockets_are_capped_and_given_back() {
        let alice: UserId = "alice".parse().unwrap();
        let bob: UserId = "bob".parse().unwrap();
        let sockets = UserSockets::new(2);
        let a1 = sockets.try_open(&alice).unwrap();
        let a2 = sockets.try_open(&alice).unwrap();
        assert!(sockets.try_open(&alice).is_none());
        assert!(sockets.try_open(&bob).is_some());
        drop(a1);
        assert_eq!(sockets.open(&alice), 1);
        let a3 = sockets.try_open(&alice).unwrap();
        drop((a2, a3));
        assert_eq!(sockets.open(&alice), 0);
        assert!(sockets.open.lock().unwrap().is_empty());
        let unlimited = UserSockets::new(0);
        for _ in 0..3 {
            assert!(matches!(unlimited.try_open(&alice), Some(None)));
        }
    }
}
