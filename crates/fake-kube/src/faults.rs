//! Fault injection: rules that pick requests and what happens to them, and the log of every
//! fault injected, so tests can assert on what they provoked.
//!
//! A [`FaultRule`] names the requests it applies to ([`Target`]), what to do to them
//! ([`Fault`]) and how often ([`Trigger`]). Rules are tried in the order they were added; the
//! first one that matches and fires decides. Every fault that hits, and every other injection
//! (outages, compaction, watch gaps, re-created Sessions), is appended to the log as an
//! [`InjectedFault`] with the time it happened.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::store::{StatusError, LEASES, SESSIONS};

/// The id of an added [`FaultRule`], to remove it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FaultId(pub u64);

/// A resource type the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResourceKind {
    Sessions,
    Leases,
}

impl ResourceKind {
    pub(crate) fn of_plural(plural: &str) -> Option<Self> {
        match plural {
            p if p == SESSIONS.plural => Some(Self::Sessions),
            p if p == LEASES.plural => Some(Self::Leases),
            _ => None,
        }
    }
}

/// What a request does, as the API server sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// `GET` of one object.
    Get,
    /// `GET` of a collection.
    List,
    /// `GET` of a collection with `watch=true`.
    Watch,
    /// `POST` on a collection.
    Create,
    /// `PUT` on an object.
    Replace,
    /// `PATCH` on an object (merge or apply).
    Patch,
    /// `DELETE` on an object.
    Delete,
}

/// Which requests a rule applies to; every `None` or empty field matches anything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<ResourceKind>,
    /// The operations it applies to; empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub operations: Vec<Operation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The object's name (from the URL, or for a create from the body).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Target {
    /// These operations on Sessions.
    pub fn sessions(operations: &[Operation]) -> Self {
        Self {
            resource: Some(ResourceKind::Sessions),
            operations: operations.to_vec(),
            ..Self::default()
        }
    }

    /// These operations on Leases.
    pub fn leases(operations: &[Operation]) -> Self {
        Self {
            resource: Some(ResourceKind::Leases),
            operations: operations.to_vec(),
            ..Self::default()
        }
    }

    /// Only the object named `name`.
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Only in `namespace`.
    pub fn in_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    fn matches(&self, r: &FaultedRequest) -> bool {
        self.resource.is_none_or(|k| k == r.resource)
            && (self.operations.is_empty() || self.operations.contains(&r.operation))
            && self
                .namespace
                .as_ref()
                .is_none_or(|ns| Some(ns) == r.namespace.as_ref())
            && self
                .name
                .as_ref()
                .is_none_or(|n| Some(n) == r.name.as_ref())
    }
}

/// When the write of a slow request is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApplyAt {
    /// Applied at once (watchers see it), answered after the delay.
    BeforeDelay,
    /// Applied after the delay, answered then, even if the client gave up meanwhile.
    AfterDelay,
}

/// What happens to a request a rule picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Fault {
    /// Not applied; answered with `status` (a Kubernetes `Status` with the matching reason).
    Error { status: u16 },
    /// Applied to the stored object (watchers see it), but answered with `status`,
    /// typically 500 or 504: the client cannot tell it landed.
    AppliedButError { status: u16 },
    /// Answered after `delay` (JSON: `delay_ms`), applied before or after it.
    Slow {
        #[serde(rename = "delay_ms", with = "millis")]
        delay: Duration,
        apply: ApplyAt,
    },
    /// Not applied, not answered: the request hangs until the client gives up, the test calls
    /// [`crate::Handle::release_hung_requests`] (then it is answered 504, still not applied),
    /// or the fake shuts down.
    Hang,
}

impl Fault {
    fn validate(&self) -> Result<(), StatusError> {
        match self {
            Fault::Error { status } | Fault::AppliedButError { status }
                if !(400..=599).contains(status) =>
            {
                Err(StatusError::new(
                    422,
                    format!("an injected status must be 400-599, not {status}"),
                ))
            }
            _ => Ok(()),
        }
    }
}

/// How often a rule fires on the requests it matches.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// The next `n` matching requests, then never again.
    Next(usize),
    /// Every matching request until the rule is removed.
    Always,
    /// Each matching request with probability `p`, drawn from a generator seeded with
    /// `seed`: the same requests in the same order get the same faults on every run.
    Probability { p: f64, seed: u64 },
}

/// A fault, which requests it hits and how often.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultRule {
    #[serde(default)]
    pub target: Target,
    pub fault: Fault,
    pub trigger: Trigger,
}

impl FaultRule {
    /// `fault` on the next `n` requests matching `target`.
    pub fn next(n: usize, target: Target, fault: Fault) -> Self {
        Self {
            target,
            fault,
            trigger: Trigger::Next(n),
        }
    }

    /// `fault` on every request matching `target`.
    pub fn always(target: Target, fault: Fault) -> Self {
        Self {
            target,
            fault,
            trigger: Trigger::Always,
        }
    }

    /// `fault` on each request matching `target` with probability `p` (seeded, reproducible).
    pub fn probability(p: f64, seed: u64, target: Target, fault: Fault) -> Self {
        Self {
            target,
            fault,
            trigger: Trigger::Probability { p, seed },
        }
    }

    pub(crate) fn validate(&self) -> Result<(), StatusError> {
        self.fault.validate()?;
        match self.trigger {
            Trigger::Probability { p, .. } if !(0.0..=1.0).contains(&p) => Err(StatusError::new(
                422,
                format!("a probability must be within 0..=1, not {p}"),
            )),
            _ => Ok(()),
        }
    }
}

/// The request a fault hit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultedRequest {
    pub resource: ResourceKind,
    pub operation: Operation,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

/// What was injected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Injection {
    /// A rule's fault hit a request (logged when the request arrived).
    Request {
        rule: FaultId,
        fault: Fault,
        request: FaultedRequest,
    },
    /// [`crate::Handle::set_unavailable`] switched the outage on or off.
    Outage { unavailable: bool },
    /// The watch history was dropped up to this version ([`crate::Handle::compact_history`]).
    HistoryCompacted { resource_version: u64 },
    /// A Session was deleted and created again under its name
    /// ([`crate::Handle::recreate_session`]).
    Recreated {
        namespace: String,
        name: String,
        old_uid: String,
        new_uid: String,
    },
    /// Watch events stopped (`dropping: true`) or started again being delivered, after
    /// this version ([`crate::Handle::set_dropping_watch_events`]).
    WatchGap {
        dropping: bool,
        resource_version: u64,
    },
    /// One event withheld from one open watch during a gap.
    WatchEventDropped {
        resource: ResourceKind,
        namespace: String,
        name: String,
        event_type: String,
        resource_version: u64,
    },
    /// Open watches were ended, cleanly (`expired: false`) or with a `410 Expired`
    /// ERROR event (`expired: true`).
    WatchesEnded { count: usize, expired: bool },
    /// Hung requests were answered 504 ([`crate::Handle::release_hung_requests`]).
    HungReleased { count: usize },
}

/// One entry of the fault log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InjectedFault {
    pub at: DateTime<Utc>,
    #[serde(flatten)]
    pub injection: Injection,
}

/// A rule as kept: its trigger's state and random generator.
#[derive(Debug)]
pub(crate) struct ActiveRule {
    id: FaultId,
    rule: FaultRule,
    fired: usize,
    rng: SplitMix64,
}

/// The rules in force, in the order they were added.
#[derive(Debug, Default)]
pub(crate) struct Rules {
    next_id: u64,
    active: Vec<ActiveRule>,
}

impl Rules {
    pub fn add(&mut self, rule: FaultRule) -> FaultId {
        self.next_id += 1;
        let id = FaultId(self.next_id);
        let seed = match rule.trigger {
            Trigger::Probability { seed, .. } => seed,
            _ => 0,
        };
        self.active.push(ActiveRule {
            id,
            rule,
            fired: 0,
            rng: SplitMix64(seed),
        });
        id
    }

    pub fn remove(&mut self, id: FaultId) -> bool {
        let before = self.active.len();
        self.active.retain(|r| r.id != id);
        self.active.len() != before
    }

    pub fn clear(&mut self) {
        self.active.clear();
    }

    /// The fault for `request`, if a rule fires; consumes one of a `Next(n)` rule's shots and
    /// one draw of every probability rule it asks.
    pub fn pick(&mut self, request: &FaultedRequest) -> Option<(FaultId, Fault)> {
        for r in &mut self.active {
            if !r.rule.target.matches(request) {
                continue;
            }
            let fires = match r.rule.trigger {
                Trigger::Next(n) => r.fired < n,
                Trigger::Always => true,
                Trigger::Probability { p, .. } => r.rng.next_f64() < p,
            };
            if fires {
                r.fired += 1;
                return Some((r.id, r.rule.fault));
            }
        }
        None
    }
}

/// SplitMix64: tiny and fully specified, so a seed picks the same requests with any version
/// of any crate (the `rand` generators promise no such stability).
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1): the top 53 bits as a double's mantissa.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `Duration` as integral milliseconds in JSON.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patch_of(name: &str) -> FaultedRequest {
        FaultedRequest {
            resource: ResourceKind::Sessions,
            operation: Operation::Patch,
            namespace: Some("ns".into()),
            name: Some(name.into()),
        }
    }

    #[test]
    fn next_n_fires_n_times_on_matching_requests_only() {
        let mut rules = Rules::default();
        let target = Target::sessions(&[Operation::Patch]).named("a");
        let id = rules.add(FaultRule::next(2, target, Fault::Error { status: 500 }));
        assert_eq!(rules.pick(&patch_of("b")), None);
        let get = FaultedRequest {
            operation: Operation::Get,
            ..patch_of("a")
        };
        assert_eq!(rules.pick(&get), None);
        let hit = Some((id, Fault::Error { status: 500 }));
        assert_eq!(rules.pick(&patch_of("a")), hit);
        assert_eq!(rules.pick(&patch_of("a")), hit);
        assert_eq!(rules.pick(&patch_of("a")), None);
    }

    #[test]
    fn probability_is_reproducible_from_the_seed() {
        let draws = |seed| {
            let mut rules = Rules::default();
            rules.add(FaultRule::probability(
                0.3,
                seed,
                Target::default(),
                Fault::Hang,
            ));
            (0..200)
                .map(|_| rules.pick(&patch_of("a")).is_some())
                .collect::<Vec<_>>()
        };
        assert_eq!(draws(7), draws(7));
        assert_ne!(draws(7), draws(8));
        let hits = draws(7).iter().filter(|h| **h).count();
        assert!((30..=90).contains(&hits), "{hits} of 200 at p = 0.3");
    }

    #[test]
    fn the_first_rule_that_fires_wins_and_removed_rules_do_not() {
        let mut rules = Rules::default();
        let first = rules.add(FaultRule::next(1, Target::default(), Fault::Hang));
        let second = rules.add(FaultRule::always(
            Target::sessions(&[]),
            Fault::Error { status: 504 },
        ));
        assert_eq!(rules.pick(&patch_of("a")), Some((first, Fault::Hang)));
        assert_eq!(
            rules.pick(&patch_of("a")),
            Some((second, Fault::Error { status: 504 }))
        );
        assert!(rules.remove(second));
        assert!(!rules.remove(second));
        assert_eq!(rules.pick(&patch_of("a")), None);
    }

    #[test]
    fn rules_read_from_json() {
        let rule: FaultRule = serde_json::from_value(serde_json::json!({
            "target": {"resource": "sessions", "operations": ["patch"]},
            "fault": {"type": "slow", "delay_ms": 1500, "apply": "before_delay"},
            "trigger": {"probability": {"p": 0.5, "seed": 3}},
        }))
        .expect("rule");
        assert_eq!(
            rule.fault,
            Fault::Slow {
                delay: Duration::from_millis(1500),
                apply: ApplyAt::BeforeDelay
            }
        );
        let bad = FaultRule::always(Target::default(), Fault::Error { status: 200 });
        assert_eq!(bad.validate().map_err(|e| e.code), Err(422));
    }
}
