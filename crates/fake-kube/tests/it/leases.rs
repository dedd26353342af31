use k8s_openapi::{api::coordination::v1::Lease, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::{api_code, start, NS};

fn lease(name: &str, holder: &str) -> Lease {
    let mut lease = Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        spec: Some(Default::default()),
    };
    if let Some(spec) = lease.spec.as_mut() {
        spec.holder_identity = Some(holder.into());
        spec.lease_duration_seconds = Some(15);
    }
    lease
}

fn holder(lease: &Lease) -> Option<&str> {
    lease.spec.as_ref()?.holder_identity.as_deref()
}

#[tokio::test]
async fn creating_a_lease_twice_is_already_exists() {
    let (fake, client) = start().await;
    let api: Api<Lease> = Api::namespaced(client, NS);
    api.create(&PostParams::default(), &lease("leader", "pod-a"))
        .await
        .unwrap();
    let second = api
        .create(&PostParams::default(), &lease("leader", "pod-b"))
        .await;
    assert_eq!(api_code(second), (409, "AlreadyExists".into()));
    assert_eq!(
        fake.lease(NS, "leader").unwrap()["spec"]["holderIdentity"],
        "pod-a"
    );
    assert!(
        fake.requests().is_empty(),
        "only Session writes are recorded"
    );
}

#[tokio::test]
async fn replacing_a_lease_needs_the_current_resource_version() {
    let (fake, client) = start().await;
    let api: Api<Lease> = Api::namespaced(client, NS);
    let first = api
        .create(&PostParams::default(), &lease("leader", "pod-a"))
        .await
        .unwrap();

    let mut renewed = first.clone();
    if let Some(spec) = renewed.spec.as_mut() {
        spec.lease_transitions = Some(1);
    }
    let renewed = api
        .replace("leader", &PostParams::default(), &renewed)
        .await
        .unwrap();
    assert_ne!(
        renewed.metadata.resource_version,
        first.metadata.resource_version
    );

    // Another candidate still holding the first version must lose the race.
    let mut takeover = first;
    if let Some(spec) = takeover.spec.as_mut() {
        spec.holder_identity = Some("pod-b".into());
    }
    let lost = api
        .replace("leader", &PostParams::default(), &takeover)
        .await;
    assert_eq!(api_code(lost), (409, "Conflict".into()));
    assert_eq!(holder(&api.get("leader").await.unwrap()), Some("pod-a"));
    assert_eq!(
        fake.lease(NS, "leader").unwrap()["spec"]["leaseTransitions"],
        1
    );
}

#[tokio::test]
async fn leases_can_be_applied_and_merge_patched() {
    let (_fake, client) = start().await;
    let api: Api<Lease> = Api::namespaced(client, NS);
    let params = PatchParams::apply("tracker-reaper").force();
    let body = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "spec": {"holderIdentity": "pod-a", "leaseDurationSeconds": 15},
    });
    let applied = api
        .patch("leader", &params, &Patch::Apply(&body))
        .await
        .unwrap();
    assert_eq!(holder(&applied), Some("pod-a"));

    let renew = json!({"spec": {"renewTime": "2030-01-01T00:00:00.000000Z"}});
    let renewed = api
        .patch("leader", &PatchParams::default(), &Patch::Merge(&renew))
        .await
        .unwrap();
    assert!(renewed
        .spec
        .as_ref()
        .and_then(|s| s.renew_time.as_ref())
        .is_some());

    let stale = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"resourceVersion": applied.metadata.resource_version},
        "spec": {"holderIdentity": "pod-b"},
    });
    let lost = api.patch("leader", &params, &Patch::Apply(&stale)).await;
    assert_eq!(api_code(lost).0, 409);

    api.delete("leader", &Default::default()).await.unwrap();
    assert_eq!(api_code(api.get("leader").await).0, 404);
}
