//! Single heartbeats that arrive together go to Redis in one script call.
//!
//! Inside Redis a heartbeat is two cheap commands, but a script call of its
//! own costs more than both (dispatch, the interpreter's set-up, the reply),
//! and one round trip per heartbeat costs the caller a system call or two.
//! So the single heartbeats of one group (the whole store on a standalone
//! Redis; one shard on a cluster, where a script's keys must share a slot)
//! queue up, and at most [`MAX_IN_FLIGHT`] calls per group carry whatever is
//! queued. There is no timer: a heartbeat waits only while its group already
//! has calls in flight (well under a millisecond on a healthy Redis), so
//! alone it goes out at once, and under load the batches grow by themselves.

use std::sync::Mutex;

use tokio::sync::oneshot;

use crate::error::Result;
use crate::store::NotOwner;

/// Calls in flight per group. Two keep Redis busy while a reply travels back.
pub(crate) const MAX_IN_FLIGHT: usize = 2;

/// Heartbeats per call at most; the rest waits for the next call.
pub(crate) const MAX_BATCH: usize = 1000;

/// One heartbeat of a script call: its connection set key, its connection
/// id and, when the caller must own the session (a user's HTTP heartbeat),
/// the session's metadata key and that user.
#[derive(Debug, Clone)]
pub(crate) struct Heartbeat {
    pub key: String,
    pub id: String,
    pub owner: Option<(String, String)>,
}

/// One queued heartbeat and where its answer goes.
#[derive(Debug)]
pub(crate) struct Pending {
    pub beat: Heartbeat,
    pub reply: oneshot::Sender<Result<Beat>>,
}

/// What the script answered for one heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Beat {
    /// Recorded at this time (ms).
    Alive(i64),
    Refused(Refusal),
}

/// Why the script refused a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    Unknown,
    NotOwner(NotOwner),
}

#[derive(Debug, Default)]
struct Group {
    queue: Vec<Pending>,
    in_flight: usize,
}

/// The queues of every group.
#[derive(Debug)]
pub(crate) struct Coalescer {
    groups: Vec<Mutex<Group>>,
}

impl Coalescer {
    pub fn new(groups: usize) -> Self {
        Self {
            groups: (0..groups.max(1))
                .map(|_| Mutex::new(Group::default()))
                .collect(),
        }
    }

    fn group(&self, group: usize) -> std::sync::MutexGuard<'_, Group> {
        self.groups[group % self.groups.len()]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues a heartbeat. Answers a batch when the caller must start a call
    /// for it (the group had a free call slot, now taken); `None` when a call
    /// in flight will pick it up.
    pub fn push(&self, group: usize, pending: Pending) -> Option<Vec<Pending>> {
        let mut g = self.group(group);
        g.queue.push(pending);
        if g.in_flight >= MAX_IN_FLIGHT {
            return None;
        }
        g.in_flight += 1;
        Some(take(&mut g.queue))
    }

    /// A call of the group ended: the next batch for the same call slot, or
    /// `None` (the slot is free) when nothing is queued.
    pub fn next(&self, group: usize) -> Option<Vec<Pending>> {
        let mut g = self.group(group);
        if g.queue.is_empty() {
            g.in_flight -= 1;
            return None;
        }
        Some(take(&mut g.queue))
    }
}

/// The oldest queued heartbeats, at most [`MAX_BATCH`].
fn take(queue: &mut Vec<Pending>) -> Vec<Pending> {
    if queue.len() <= MAX_BATCH {
        return std::mem::take(queue);
    }
    let rest = queue.split_off(MAX_BATCH);
    std::mem::replace(queue, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(id: usize) -> (Pending, oneshot::Receiver<Result<Beat>>) {
        let (reply, rx) = oneshot::channel();
        let p = Pending {
            beat: Heartbeat {
                key: "k".into(),
                id: id.to_string(),
                owner: None,
            },
            reply,
        };
        (p, rx)
    }

    fn ids(batch: &[Pending]) -> Vec<String> {
        batch.iter().map(|p| p.beat.id.clone()).collect()
    }

    #[test]
    fn heartbeats_queue_only_while_the_group_is_busy() {
        let c = Coalescer::new(2);
        let first = c.push(0, pending(1).0).expect("a free slot sends at once");
        assert_eq!(ids(&first), ["1"]);
        let second = c.push(0, pending(2).0).expect("a second slot");
        assert_eq!(ids(&second), ["2"]);
        assert!(c.push(0, pending(3).0).is_none(), "both slots busy");
        assert!(c.push(0, pending(4).0).is_none());
        // Another group is not held up.
        assert!(c.push(1, pending(5).0).is_some());
        // The first call ends: its slot carries everything queued meanwhile.
        assert_eq!(ids(&c.next(0).expect("queued")), ["3", "4"]);
        assert!(c.next(0).is_none(), "nothing queued: the slot is freed");
        assert!(c.next(0).is_none(), "the second slot is freed too");
        assert!(c.push(0, pending(6).0).is_some(), "free again");
    }

    #[test]
    fn a_long_queue_goes_out_in_bounded_batches_oldest_first() {
        let c = Coalescer::new(1);
        let _a = c.push(0, pending(0).0);
        let _b = c.push(0, pending(1).0);
        for i in 0..MAX_BATCH + 5 {
            assert!(c.push(0, pending(i + 2).0).is_none());
        }
        let batch = c.next(0).expect("queued");
        assert_eq!(batch.len(), MAX_BATCH);
        assert_eq!(batch[0].beat.id, "2");
        let rest = c.next(0).expect("the rest");
        assert_eq!(
            ids(&rest),
            (MAX_BATCH + 2..MAX_BATCH + 7)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
        );
    }
}
