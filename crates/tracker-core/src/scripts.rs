//! The Lua scripts, loaded once. Each operation is its own file under `lua/`
//! whose header states KEYS, ARGV, the return value and what it makes atomic.
//! Shard scripts are prefixed with `lua/meta.lua` (helpers on one session's
//! metadata) and `lua/common.lua`, which says where each shard key sits in
//! `KEYS`; session scripts with `lua/meta.lua` alone; plain scripts stand
//! alone. Every script gets the clock offset as `ARGV[1]`.

use redis::Script;

const META: &str = include_str!("lua/meta.lua");
const COMMON: &str = include_str!("lua/common.lua");

/// A script and the name used in errors, logs and metrics.
#[derive(Debug)]
pub(crate) struct Op {
    pub name: &'static str,
    pub script: Script,
}

macro_rules! scripts {
    (
        shard: [$($shard:ident),* $(,)?],
        session: [$($session:ident),* $(,)?],
        plain: [$($plain:ident),* $(,)?]
    ) => {
        /// Every script of the store.
        #[derive(Debug)]
        pub(crate) struct Scripts {
            $(pub $shard: Op,)*
            $(pub $session: Op,)*
            $(pub $plain: Op,)*
        }

        impl Scripts {
            pub fn load() -> Self {
                Self {
                    $($shard: Op {
                        name: stringify!($shard),
                        script: Script::new(&format!(
                            "{META}\n{COMMON}\n{}",
                            include_str!(concat!("lua/", stringify!($shard), ".lua"))
                        )),
                    },)*
                    $($session: Op {
                        name: stringify!($session),
                        script: Script::new(&format!(
                            "{META}\n{}",
                            include_str!(concat!("lua/", stringify!($session), ".lua"))
                        )),
                    },)*
                    $($plain: Op {
                        name: stringify!($plain),
                        script: Script::new(include_str!(concat!("lua/", stringify!($plain), ".lua"))),
                    },)*
                }
            }
        }
    };
}

scripts! {
    shard: [
        register, close, sweep, get_connection, list_connections, session_view,
        claim_hibernation, finish_hibernation, rollback_hibernation, ack_wake,
        mirror_session, forget_session, explain, leader_facts, declare_session,
        announce_wake, event_ack, arm_wake,
    ],
    session: [session_state],
    plain: [
        heartbeat_batch, sweep_candidates, due_sessions, pending_wakes,
        stats, known_sessions, outbox_read, outbox_ack, outbox_len, epoch, epoch_due,
        term_next, term_begin, claim_id, mark_id, retire_ids, id_entry, reserve_user,
        release_user, lock_acquire, lock_release,
    ]
}
