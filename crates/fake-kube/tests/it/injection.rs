//! Faults injected into requests: errors after the write landed, slow answers, hangs, and
//! seeded probabilities, seen through the real `kube` client.

use std::time::{Duration, Instant};

use fake_kube::{
    ApplyAt, Fault, FaultRule, Injection, Operation, ResourceKind, Target, Trigger, Verb,
};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;

use crate::{api_code, next, session_json, start, Session, NS, TIMEOUT};

fn hibernate() -> Patch<serde_json::Value> {
    Patch::Merge(json!({"spec": {"state": "hibernated"}}))
}

/// A client that shows every answer: kube retries 503 and 504 by default.
fn no_retry(fake: &fake_kube::FakeKube) -> kube::Client {
    let mut config = fake.kube_config();
    config.default_retry = false;
    kube::Client::try_from(config).unwrap()
}

fn state(fake: &fake_kube::FakeKube, name: &str) -> String {
    fake.session(NS, name).unwrap()["spec"]["state"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The faults that hit requests, as (operation, name, fault).
fn request_faults(fake: &fake_kube::FakeKube) -> Vec<(Operation, Option<String>, Fault)> {
    fake.injected_faults()
        .into_iter()
        .filter_map(|f| match f.injection {
            Injection::Request { fault, request, .. } => {
                Some((request.operation, request.name, fault))
            }
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn applied_but_error_lands_the_patch_and_answers_the_error() {
    let (fake, _) = start().await;
    let created = fake
        .apply_session(NS, session_json("a", "running"))
        .unwrap();
    let api: Api<Session> = Api::namespaced(no_retry(&fake), NS);
    let rv = created["metadata"]["resourceVersion"].as_str().unwrap();
    let mut watch = api
        .watch(&WatchParams::default(), rv)
        .await
        .unwrap()
        .boxed();
    let rule = FaultRule::next(
        1,
        Target::sessions(&[Operation::Patch]).named("a"),
        Fault::AppliedButError { status: 504 },
    );
    let id = fake.add_fault(rule).unwrap();

    let answer = api.patch("a", &PatchParams::default(), &hibernate()).await;
    assert_eq!(api_code(answer), (504, "Timeout".into()));
    assert_eq!(state(&fake, "a"), "hibernated", "applied all the same");
    match next(&mut watch).await {
        Some(Ok(WatchEvent::Modified(s))) => assert_eq!(s.spec.state, "hibernated"),
        other => panic!("expected the patch's MODIFIED event, got {other:?}"),
    }
    assert_eq!(fake.session_patches("a")[0].status, 504);
    let logged = fake.injected_faults();
    assert!(
        matches!(&logged[..], [f] if matches!(&f.injection,
            Injection::Request { rule, fault: Fault::AppliedButError { status: 504 }, request }
                if *rule == id && request.resource == ResourceKind::Sessions
                    && request.name.as_deref() == Some("a"))),
        "{logged:?}"
    );

    // One shot: the next patch is answered normally.
    let patched = api
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"state": "running"}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.spec.state, "running");
}

#[tokio::test]
async fn an_applied_but_failed_lease_create_exists_and_a_retry_conflicts() {
    let (fake, _) = start().await;
    let api: Api<Lease> = Api::namespaced(no_retry(&fake), NS);
    fake.add_fault(FaultRule::next(
        1,
        Target::leases(&[Operation::Create, Operation::Replace]),
        Fault::AppliedButError { status: 500 },
    ))
    .unwrap();
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "leader"},
        "spec": {"holderIdentity": "pod-a", "leaseDurationSeconds": 15},
    }))
    .unwrap();

    let first = api.create(&PostParams::default(), &lease).await;
    assert_eq!(api_code(first), (500, "InternalError".into()));
    assert_eq!(
        fake.lease(NS, "leader").unwrap()["spec"]["holderIdentity"],
        "pod-a"
    );
    let retry = api.create(&PostParams::default(), &lease).await;
    assert_eq!(api_code(retry), (409, "AlreadyExists".into()));
    assert_eq!(
        request_faults(&fake),
        [(
            Operation::Create,
            Some("leader".into()),
            Fault::AppliedButError { status: 500 }
        )]
    );
}

#[tokio::test]
async fn probability_faults_hit_the_same_requests_for_the_same_seed() {
    async fn run(seed: u64) -> Vec<u16> {
        let (fake, _) = start().await;
        fake.apply_session(NS, session_json("a", "running"))
            .unwrap();
        let api: Api<Session> = Api::namespaced(no_retry(&fake), NS);
        let rule = FaultRule {
            target: Target::sessions(&[Operation::Get]),
            fault: Fault::Error { status: 500 },
            trigger: Trigger::Probability { p: 0.5, seed },
        };
        fake.add_fault(rule).unwrap();
        let mut statuses = Vec::new();
        for _ in 0..24 {
            statuses.push(match api.get("a").await {
                Ok(_) => 200,
                Err(e) => api_code::<()>(Err(e)).0,
            });
        }
        assert_eq!(
            fake.injected_faults().len(),
            statuses.iter().filter(|s| **s == 500).count(),
            "every failure logged"
        );
        statuses
    }
    let first = run(42).await;
    assert_eq!(run(42).await, first);
    assert_ne!(run(43).await, first);
    let failed = first.iter().filter(|s| **s == 500).count();
    assert!(0 < failed && failed < first.len(), "{first:?}");
}

#[tokio::test]
async fn slow_applied_before_the_delay_is_visible_before_the_answer() {
    let (fake, client) = start().await;
    fake.apply_session(NS, session_json("a", "running"))
        .unwrap();
    let api: Api<Session> = Api::namespaced(client, NS);
    // Longer than the test may take: the answer cannot come while the test looks.
    let delay = Duration::from_secs(600);
    fake.add_fault(FaultRule::always(
        Target::sessions(&[Operation::Patch]),
        Fault::Slow {
            delay,
            apply: ApplyAt::BeforeDelay,
        },
    ))
    .unwrap();
    let patch = tokio::spawn({
        let api = api.clone();
        async move { api.patch("a", &PatchParams::default(), &hibernate()).await }
    });

    fake.wait_for_session(
        NS,
        "a",
        |s| s.is_some_and(|s| s["spec"]["state"] == "hibernated"),
        TIMEOUT,
    )
    .await
    .unwrap();
    assert!(!patch.is_finished(), "applied, not yet answered");
    patch.abort();
    // Reads are not slowed by a rule on patches.
    assert_eq!(api.get("a").await.unwrap().spec.state, "hibernated");
}

#[tokio::test]
async fn slow_answers_come_after_the_delay() {
    let (fake, client) = start().await;
    fake.apply_session(NS, session_json("a", "running"))
        .unwrap();
    let api: Api<Session> = Api::namespaced(client, NS);
    let delay = Duration::from_millis(300);
    fake.add_fault(FaultRule::next(
        1,
        Target::sessions(&[Operation::Get]),
        Fault::Slow {
            delay,
            apply: ApplyAt::AfterDelay,
        },
    ))
    .unwrap();

    let asked = Instant::now();
    assert_eq!(api.get("a").await.unwrap().spec.state, "running");
    assert!(asked.elapsed() >= delay, "{:?}", asked.elapsed());
    assert_eq!(
        request_faults(&fake),
        [(
            Operation::Get,
            Some("a".into()),
            Fault::Slow {
                delay,
                apply: ApplyAt::AfterDelay
            }
        )]
    );
}

#[tokio::test]
async fn slow_applied_after_the_delay_lands_after_the_client_gave_up() {
    let (fake, client) = start().await;
    fake.apply_session(NS, session_json("a", "running"))
        .unwrap();
    let api: Api<Session> = Api::namespaced(client, NS);
    let delay = Duration::from_secs(2);
    fake.add_fault(FaultRule::next(
        1,
        Target::sessions(&[Operation::Patch]),
        Fault::Slow {
            delay,
            apply: ApplyAt::AfterDelay,
        },
    ))
    .unwrap();

    // The client's timeout is far shorter than the delay, as a reaper's would be.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(100),
        api.patch("a", &PatchParams::default(), &hibernate()),
    )
    .await;
    assert!(gave_up.is_err(), "no answer within the client's timeout");
    let asked = fake.injected_faults()[0].at;
    assert_eq!(state(&fake, "a"), "running", "not applied yet");

    fake.wait_for_session(
        NS,
        "a",
        |s| s.is_some_and(|s| s["spec"]["state"] == "hibernated"),
        TIMEOUT,
    )
    .await
    .unwrap();
    let landed = chrono::Utc::now();
    assert!(landed - asked >= chrono::Duration::from_std(delay).unwrap());
    // Recorded when the server dropped the request of the departed client: no answer (0).
    let recorded = fake
        .wait_for_requests(|r| r.len() == 1, TIMEOUT)
        .await
        .unwrap();
    assert_eq!((recorded[0].verb, recorded[0].status), (Verb::Patch, 0));
}

#[tokio::test]
async fn a_hung_request_is_not_applied_and_answers_only_when_released() {
    let (fake, _) = start().await;
    fake.apply_session(NS, session_json("a", "running"))
        .unwrap();
    let api: Api<Session> = Api::namespaced(no_retry(&fake), NS);
    fake.add_fault(FaultRule::next(
        2,
        Target::sessions(&[Operation::Patch]),
        Fault::Hang,
    ))
    .unwrap();
    let hanging = |n: usize| {
        move |f: &[fake_kube::InjectedFault]| {
            f.iter()
                .filter(|f| {
                    matches!(
                        f.injection,
                        Injection::Request {
                            fault: Fault::Hang,
                            ..
                        }
                    )
                })
                .count()
                == n
        }
    };

    // A client that gives up: nothing is applied.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(200),
        api.patch("a", &PatchParams::default(), &hibernate()),
    )
    .await;
    assert!(gave_up.is_err());
    fake.wait_for_injected(hanging(1), TIMEOUT).await.unwrap();
    // The server notices the client is gone and drops the request: recorded without answer.
    let recorded = fake
        .wait_for_requests(|r| r.len() == 1, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(recorded[0].status, 0);
    assert_eq!(fake.hung_requests(), 0);

    // A client that waits: answered 504 when the test releases it, still not applied.
    let patch = tokio::spawn({
        let api = api.clone();
        async move { api.patch("a", &PatchParams::default(), &hibernate()).await }
    });
    fake.wait_for_injected(hanging(2), TIMEOUT).await.unwrap();
    assert_eq!(fake.hung_requests(), 1);
    assert!(!patch.is_finished());
    assert_eq!(fake.release_hung_requests(), 1);
    let answer = tokio::time::timeout(TIMEOUT, patch).await.unwrap().unwrap();
    assert_eq!(api_code(answer), (504, "Timeout".into()));
    assert_eq!(state(&fake, "a"), "running");
    assert!(fake
        .injected_faults()
        .iter()
        .any(|f| f.injection == Injection::HungReleased { count: 1 }));

    // Rules spent: the next patch lands.
    api.patch("a", &PatchParams::default(), &hibernate())
        .await
        .unwrap();
    assert_eq!(state(&fake, "a"), "hibernated");
}

#[tokio::test]
async fn removed_and_cleared_rules_stop_firing_and_bad_rules_are_refused() {
    let (fake, _) = start().await;
    fake.apply_session(NS, session_json("a", "running"))
        .unwrap();
    let api: Api<Session> = Api::namespaced(no_retry(&fake), NS);
    let error = |status| Fault::Error { status };
    let gets = Target::sessions(&[Operation::Get]);
    let first = fake
        .add_fault(FaultRule::always(gets.clone(), error(500)))
        .unwrap();
    fake.add_fault(FaultRule::always(gets.clone(), error(429)))
        .unwrap();
    assert_eq!(api_code(api.get("a").await).0, 500, "the first rule wins");
    assert!(fake.remove_fault(first));
    assert_eq!(api_code(api.get("a").await).0, 429);
    fake.clear_faults();
    api.get("a").await.unwrap();

    let refused = fake.add_fault(FaultRule::always(gets.clone(), error(200)));
    assert!(matches!(
        refused,
        Err(fake_kube::Error::Rejected { code: 422, .. })
    ));
    let refused = fake.add_fault(FaultRule::probability(1.5, 1, gets, error(500)));
    assert!(matches!(
        refused,
        Err(fake_kube::Error::Rejected { code: 422, .. })
    ));
}
