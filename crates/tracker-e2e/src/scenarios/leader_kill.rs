//! Leader kill: while the episode load runs (connections registered, closed, expiring,
//! sessions hibernating and waking), SIGKILL the leading reaper at a random moment, K times.
//! Each time the standby must report `tracker_reaper_is_leader 1` within the lease duration
//! plus a margin; the killed one is restarted as the new standby (a new pod name). At the end
//! every check of the races scenario holds, above all: history rows equal connections ended.

use std::fmt;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use super::load::BackgroundLoad;
use super::races::{finish, RacesFigures, RacesParams, WAKE_DEADLINE};
use super::{conclude, sessions};
use crate::harness::{Harness, HarnessOptions};
use crate::{poll, Error, Result};

/// Size of a leader-kill run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct LeaderKillParams {
    #[arg(long, default_value_t = 20)]
    pub kills: usize,
    #[arg(long, default_value_t = 100)]
    pub sessions: usize,
    #[arg(long, default_value_t = 48)]
    pub concurrency: usize,
    #[arg(skip)]
    pub seed: u64,
    /// Give the reapers a private NATS and check that every hibernation and
    /// wake that landed was published once, across the kills.
    #[arg(long)]
    pub nats: bool,
}

impl LeaderKillParams {
    pub fn short(seed: u64) -> Self {
        Self {
            kills: 1,
            sessions: 16,
            concurrency: 10,
            seed,
            nats: false,
        }
    }

    pub fn full(seed: u64) -> Self {
        Self {
            kills: 20,
            sessions: 100,
            concurrency: 48,
            seed,
            nats: false,
        }
    }
}

/// How much later than the lease duration a takeover may come: the standby tries every third
/// of a lease, and the killed leader's last renewal may be that old.
pub const TAKEOVER_MARGIN: Duration = Duration::from_secs(2);

/// Figures of a leader-kill run.
#[derive(Debug, Clone)]
pub struct LeaderKillFigures {
    pub params: LeaderKillParams,
    pub lease: Duration,
    /// From the SIGKILL to the standby's gauge at 1, per kill.
    pub takeovers: Vec<Duration>,
    /// Kills after which the standby took longer than lease + margin.
    pub late_takeovers: Vec<String>,
    /// Takeovers after which the Lease did not name the new leader.
    pub wrong_lease_holders: Vec<String>,
    /// The load and every races check over the whole run.
    pub run: RacesFigures,
}

impl LeaderKillFigures {
    pub fn problems(&self) -> Vec<String> {
        let mut p = self.run.problems();
        // A killed leader's unarchived work and in-flight calls are the point here; client
        // errors are not (the API never talks to the reaper).
        if !self.late_takeovers.is_empty() {
            p.push(format!("{} late takeovers", self.late_takeovers.len()));
        }
        if !self.wrong_lease_holders.is_empty() {
            p.push(format!(
                "{} wrong Lease holders",
                self.wrong_lease_holders.len()
            ));
        }
        if self.takeovers.len() < self.params.kills {
            p.push(format!(
                "only {} of {} kills done",
                self.takeovers.len(),
                self.params.kills
            ));
        }
        p
    }
}

impl_figures!(LeaderKillFigures => run);

impl fmt::Display for LeaderKillFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let max = self.takeovers.iter().max().copied().unwrap_or_default();
        let mean = if self.takeovers.is_empty() {
            Duration::ZERO
        } else {
            self.takeovers.iter().sum::<Duration>() / self.takeovers.len() as u32
        };
        writeln!(
            f,
            "leader-kill: {} SIGKILLs of the leading reaper (lease {:?}, bound {:?}); takeover \
             mean {:.2?}, max {:.2?}; late: {}",
            self.takeovers.len(),
            self.lease,
            self.lease + TAKEOVER_MARGIN,
            mean,
            max,
            self.late_takeovers.len()
        )?;
        for l in self.late_takeovers.iter().chain(&self.wrong_lease_holders) {
            writeln!(f, "    {l}")?;
        }
        write!(f, "{}", self.run)
    }
}

/// Runs the leader-kill scenario on a fresh harness.
pub async fn run(mut opts: HarnessOptions, params: LeaderKillParams) -> Result<LeaderKillFigures> {
    opts.nats |= params.nats;
    let mut h = Harness::start(opts).await?;
    let names = sessions(&h, params.sessions).await?;
    let timing = h.timing();
    let lease = timing.lease_duration;
    let load = BackgroundLoad::start(&h, names, params.concurrency, params.seed);
    let recorder = load.recorder.clone();

    let mut rng = StdRng::seed_from_u64(params.seed ^ 0x5EED);
    let mut takeovers = Vec::new();
    let mut late = Vec::new();
    let mut wrong_holders = Vec::new();
    // Let the load get going: some connections must have ended before the first kill.
    poll::until(
        Duration::from_secs(30),
        Duration::from_millis(50),
        "the load to get going",
        || {
            let n = recorder.registered();
            async move { Ok((n >= params.concurrency).then_some(())) }
        },
    )
    .await?;
    for k in 0..params.kills {
        let leader = h.wait_leader(lease * 2 + Duration::from_secs(10)).await?;
        // A random moment of its sweep / archive / hibernate cycle.
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..=2500))).await;
        let killed_at = Instant::now();
        h.kill_reaper(leader).await?;
        let bound = lease + TAKEOVER_MARGIN;
        let give_up = lease * 3 + Duration::from_secs(10);
        let others: Vec<usize> = (0..h.reaper_count()).filter(|i| *i != leader).collect();
        let new_leader = loop {
            let mut found = None;
            for &i in &others {
                if h.is_leader(i).await == Some(true) {
                    found = Some(i);
                }
            }
            if let Some(i) = found {
                break i;
            }
            if killed_at.elapsed() > give_up {
                return Err(Error::Timeout {
                    what: format!("a standby to take over after kill {}", k + 1),
                    waited: give_up,
                });
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        let took = killed_at.elapsed();
        takeovers.push(took);
        // The Lease names the new leader.
        let expected = h.reaper_pod_name(new_leader);
        let holder = poll::until(
            Duration::from_secs(2),
            Duration::from_millis(25),
            "the Lease to name the new leader",
            || {
                let holder = h.lease_holder();
                let ok = holder.is_some() && holder == expected;
                async move { Ok(ok.then_some(())) }
            },
        )
        .await;
        if holder.is_err() {
            wrong_holders.push(format!(
                "kill {}: Lease holder {:?}, leader's POD_NAME {:?}",
                k + 1,
                h.lease_holder(),
                expected
            ));
        }
        if took > bound {
            late.push(format!(
                "kill {}: reaper-{new_leader} took over {took:.2?} after reaper-{leader} was killed",
                k + 1
            ));
        }
        h.restart_reaper(leader).await?;
    }
    let load_time = load.stop().await?;
    h.check_running()?;
    let races_params = RacesParams {
        episodes: recorder.registered(),
        sessions: params.sessions,
        concurrency: params.concurrency,
        seed: params.seed,
        faults: 0.0,
        nats: params.nats,
    };
    // A wake recorded just before a kill waits for the takeover.
    let wake_deadline = WAKE_DEADLINE + lease + TAKEOVER_MARGIN;
    let run = finish(&h, &recorder, wake_deadline, races_params, load_time).await?;
    let figures = LeaderKillFigures {
        params,
        lease,
        takeovers,
        late_takeovers: late,
        wrong_lease_holders: wrong_holders,
        run,
    };
    conclude(h, "leader-kill", figures).await
}
