#![allow(clippy::unwrap_used)]
//! SecretLease reconciles against a scripted API and a real PostgreSQL.

mod common;

use std::sync::Arc;

use base64::Engine as _;
use common::{Step, apply_status, echo, not_found, scripted};
use http::Method;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use leasehold_api::SecretLease;
use leasehold_operator::lease_controller::{Context, reconcile_lease};
use leasehold_operator::metrics::Metrics;
use leasehold_testkit::PostgresServer;
use secrecy::ExposeSecret;
use serde_json::{Value, json};

const LEASES: &str = "/apis/leasehold.dev/v1alpha1/namespaces/shop/secretleases";
const POLICIES: &str = "/apis/leasehold.dev/v1alpha1/namespaces/shop/rotationpolicies";
const SECRETS: &str = "/api/v1/namespaces/shop/secrets";

fn uid() -> String {
    let h = format!("{:032x}", rand::random::<u128>());
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn lease(name: &str, uid: &str, pg: Option<&PostgresServer>, finalizer: bool) -> Value {
    let (host, port, db) = match pg {
        Some(pg) => (pg.host().to_string(), pg.port(), pg.database().to_string()),
        None => ("127.0.0.1".into(), 5432, "postgres".into()),
    };
    let mut metadata = json!({"name": name, "namespace": "shop", "uid": uid, "generation": 1, "resourceVersion": "1"});
    if finalizer {
        metadata["finalizers"] = json!(["leasehold.dev/revoke"]);
    }
    json!({
        "apiVersion": "leasehold.dev/v1alpha1",
        "kind": "SecretLease",
        "metadata": metadata,
        "spec": {
            "policyRef": {"name": "short"},
            "postgres": {"host": host, "port": port, "database": db, "adminSecretRef": {"name": "pg-admin"}, "tls": {"mode": "Disable"}},
            "delivery": {"secret": {"name": format!("{name}-creds")}}
        }
    })
}

fn policy(ttl: &str) -> Value {
    json!({
        "apiVersion": "leasehold.dev/v1alpha1",
        "kind": "RotationPolicy",
        "metadata": {"name": "short", "namespace": "shop", "generation": 1},
        "spec": {"ttl": ttl, "revoke": {"gracePeriod": "0s", "maxWait": "10m"}}
    })
}

fn admin_secret(pg: &PostgresServer) -> Value {
    let b = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "pg-admin", "namespace": "shop"},
        "data": {"username": b(pg.admin_user()), "password": b(pg.admin_password().expose_secret())}
    })
}

fn context(client: kube::Client) -> Arc<Context> {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "leasehold-test".into(),
            instance: None,
        },
    );
    Arc::new(Context::new(
        client,
        Arc::new(Metrics::new()),
        Some(recorder),
        2,
    ))
}

fn reply(v: Value) -> impl FnMut(&Value, &mut Value) -> (u16, Value) + Send + 'static {
    move |_, _| (200, v.clone())
}

fn decode(secret: &Value, key: &str) -> String {
    let b = secret["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("no key {key} in {secret}"));
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b).unwrap()).unwrap()
}

async fn role_exists(pg: &PostgresServer, user: &str) -> bool {
    let admin = pg.admin_client().await;
    !admin
        .query("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&user])
        .await
        .unwrap()
        .is_empty()
}

/// What a reconcile of a lease reads first, its policy (`short`, ttl 3h) and `admin` as
/// its admin Secret, followed by `then`.
fn after_policy_and_admin(admin: Value, then: impl IntoIterator<Item = Step>) -> Vec<Step> {
    let mut steps = vec![
        Step::new(
            Method::GET,
            &format!("{POLICIES}/short"),
            reply(policy("3h")),
        ),
        Step::new(Method::GET, &format!("{SECRETS}/pg-admin"), reply(admin)),
    ];
    steps.extend(then);
    steps
}

/// The patch of the lease at `lease_path` that removes its finalizer.
fn removes_the_finalizer(lease_path: &str) -> Step {
    Step::new(Method::PATCH, lease_path, |body, state| {
        assert!(body.to_string().contains("remove"), "{body}");
        state["metadata"]["finalizers"] = json!([]);
        (200, state.clone())
    })
}

#[tokio::test]
async fn create_adds_the_finalizer_first() {
    let name = "fresh";
    let obj = lease(name, &uid(), None, false);
    let steps = vec![Step::new(
        Method::PATCH,
        &format!("{LEASES}/{name}"),
        |body, state| {
            let ops = body.as_array().expect("a JSON patch");
            assert!(
                ops.iter().any(|op| op["op"] == "add"
                    && op["value"].to_string().contains("leasehold.dev/revoke")),
                "{body}"
            );
            state["metadata"]["finalizers"] = json!(["leasehold.dev/revoke"]);
            (200, state.clone())
        },
    )];
    let (client, api) = scripted(steps, obj.clone());
    let lease: SecretLease = serde_json::from_value(obj).unwrap();
    let action = reconcile_lease(Arc::new(lease), context(client))
        .await
        .unwrap();
    assert_eq!(action, Action::await_change());
    let (seen, _) = api.await.unwrap();
    assert_eq!(seen.requests.len(), 1);
}

#[tokio::test]
async fn invalid_policy_and_missing_policy_set_ready_false_without_requeue() {
    let name = "bad";
    let obj = lease(name, &uid(), None, true);
    let status_path = format!("{LEASES}/{name}/status");
    let steps = vec![
        Step::new(
            Method::GET,
            &format!("{POLICIES}/short"),
            reply(policy("30s")),
        ),
        Step::new(
            Method::GET,
            &format!("{SECRETS}/pg-admin"),
            reply(json!({
                "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pg-admin", "namespace": "shop"},
                "stringData": {"username": "admin", "password": "x"}
            })),
        ),
        Step::new(Method::PATCH, &status_path, apply_status),
        Step::new(Method::GET, &format!("{POLICIES}/short"), |_, _| {
            not_found()
        }),
        Step::new(Method::PATCH, &status_path, apply_status),
    ];
    let (client, api) = scripted(steps, obj.clone());
    let ctx = context(client);
    let lease: SecretLease = serde_json::from_value(obj).unwrap();
    let action = reconcile_lease(Arc::new(lease.clone()), ctx.clone())
        .await
        .unwrap();
    assert_eq!(action, Action::await_change());
    let action = reconcile_lease(Arc::new(lease), ctx).await.unwrap();
    assert_eq!(action, Action::await_change());
    let (seen, _) = api.await.unwrap();
    let statuses = seen.bodies(&Method::PATCH, &status_path);
    let ready = |s: &Value| {
        s["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap()
            .clone()
    };
    let first = ready(&statuses[0]);
    assert_eq!(first["status"], "False");
    assert_eq!(first["reason"], "InvalidPolicy");
    assert!(
        first["message"].as_str().unwrap().contains("spec.ttl"),
        "{first}"
    );
    assert_eq!(first["observedGeneration"], 1);
    assert_eq!(statuses[0]["status"]["phase"], "Invalid");
    assert_eq!(ready(&statuses[1])["reason"], "PolicyNotFound");
}

/// Apply issues and delivers a real user; a resync writes nothing; delete revokes the
/// user and releases the finalizer.
#[tokio::test]
async fn apply_resync_and_delete_against_real_postgres() {
    let pg = PostgresServer::shared().await;
    let name = "orders-db";
    let obj = lease(name, &uid(), Some(pg), true);
    let status_path = format!("{LEASES}/{name}/status");
    let versions_path = format!("{SECRETS}/{name}-leasehold-versions");
    let creds_path = format!("{SECRETS}/{name}-creds");

    // 1. Apply: v1 is issued, verified, promoted and delivered.
    let steps = after_policy_and_admin(
        admin_secret(pg),
        [
            // The delivered Secret's name is free (checked before anything is issued).
            Step::new(Method::GET, &creds_path, |_, _| not_found()),
            Step::new(Method::GET, &versions_path, |_, _| not_found()),
            Step::new(Method::PATCH, &versions_path, echo),
            Step::new(Method::PATCH, &status_path, apply_status).repeated(),
            // ... and again right before it is written.
            Step::new(Method::GET, &creds_path, |_, _| not_found()),
            Step::new(Method::PATCH, &creds_path, echo),
            Step::new(Method::PATCH, &status_path, apply_status).repeated(),
        ],
    );
    let (client, api) = scripted(steps, obj.clone());
    let lease: SecretLease = serde_json::from_value(obj).unwrap();
    let action = reconcile_lease(Arc::new(lease), context(client))
        .await
        .unwrap();
    let (seen, state) = api.await.unwrap();
    assert_ne!(
        action,
        Action::await_change(),
        "a running lease is requeued for renewal"
    );
    let status = &state["status"];
    assert_eq!(status["phase"], "Active", "{status}");
    assert_eq!(status["currentVersion"], 1);
    let user = status["currentUsername"].as_str().unwrap().to_string();
    assert!(role_exists(pg, &user).await, "user {user} should exist");
    let ready = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap();
    assert_eq!(ready["status"], "True");
    let versions = seen.bodies(&Method::PATCH, &versions_path).pop().unwrap();
    assert_eq!(
        versions["metadata"]["ownerReferences"][0]["kind"],
        "SecretLease"
    );
    assert_eq!(
        versions["metadata"]["ownerReferences"][0]["controller"],
        true
    );
    let delivered = seen.bodies(&Method::PATCH, &creds_path).pop().unwrap();
    assert_eq!(decode(&delivered, "username"), user);
    let password = decode(&delivered, "password");
    pg.connect_as(&user, &password)
        .await
        .expect("the delivered credential logs in");
    let reasons = seen.event_reasons();
    for r in ["Issued", "Verified", "Promoted"] {
        assert!(
            reasons.iter().any(|x| x == r),
            "event {r} missing: {reasons:?}"
        );
    }
    let everything = format!("{:?}{:?}", seen.events, state["status"]);
    assert!(
        !everything.contains(&password),
        "a password leaked into events or status"
    );

    // 2. Resync with nothing changed: reads only, no write.
    let steps = after_policy_and_admin(admin_secret(pg), []);
    let (client, api) = scripted(steps, state.clone());
    let lease: SecretLease = serde_json::from_value(state.clone()).unwrap();
    reconcile_lease(Arc::new(lease), context(client))
        .await
        .unwrap();
    let (seen, _) = api.await.unwrap();
    assert!(
        seen.requests.iter().all(|(m, _, _)| m == Method::GET),
        "{:?}",
        seen.requests
    );

    // 3. Delete after the policy is gone (a GitOps teardown removes both): v1 is
    //    revoked with the recorded strategy (the user dropped), then the finalizer goes.
    let mut deleting = state.clone();
    deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    assert_eq!(state["status"]["progress"]["strategy"], "Dynamic");
    let stored_versions = versions.clone();
    let steps = vec![
        Step::new(Method::GET, &format!("{POLICIES}/short"), |_, _| {
            not_found()
        }),
        Step::new(
            Method::GET,
            &format!("{SECRETS}/pg-admin"),
            reply(admin_secret(pg)),
        ),
        Step::new(Method::PATCH, &status_path, apply_status),
        Step::new(Method::GET, &versions_path, reply(stored_versions)),
        Step::new(Method::PATCH, &versions_path, echo),
        Step::new(Method::PATCH, &status_path, apply_status),
        removes_the_finalizer(&format!("{LEASES}/{name}")),
    ];
    let (client, api) = scripted(steps, deleting.clone());
    let lease: SecretLease = serde_json::from_value(deleting).unwrap();
    let action = reconcile_lease(Arc::new(lease), context(client))
        .await
        .unwrap();
    assert_eq!(action, Action::await_change());
    let (seen, _) = api.await.unwrap();
    assert!(
        !role_exists(pg, &user).await,
        "user {user} should be dropped"
    );
    let emptied = seen.bodies(&Method::PATCH, &versions_path).pop().unwrap();
    assert!(
        emptied["data"].as_object().is_none_or(|d| d.is_empty()),
        "{emptied}"
    );
    assert!(
        seen.event_reasons().iter().any(|r| r == "Revoked"),
        "{:?}",
        seen.event_reasons()
    );
}

#[tokio::test]
async fn the_controller_reads_the_whole_object_and_ignores_deleted_ones() {
    use leasehold_operator::lease_controller::{reconcile_cached, slim_for_cache};
    let name = "gone";
    let obj = lease(name, &uid(), None, true);
    let steps = vec![Step::new(
        Method::GET,
        &format!("{LEASES}/{name}"),
        |_, _| not_found(),
    )];
    let (client, api) = scripted(steps, obj.clone());
    let mut cached: SecretLease = serde_json::from_value(obj).unwrap();
    slim_for_cache(&mut cached);
    let action = reconcile_cached(Arc::new(cached), context(client))
        .await
        .unwrap();
    assert_eq!(action, Action::await_change());
    let (seen, _) = api.await.unwrap();
    assert_eq!(seen.requests.len(), 1);
}

/// A deleted perPod lease whose versions are all revoked still has per-pod users: the
/// finalizer stays until they are dropped, even when the drop fails at first.
#[tokio::test]
async fn deleting_a_per_pod_lease_keeps_the_finalizer_until_its_per_pod_users_are_dropped() {
    let pg = PostgresServer::shared().await;
    let name = "per-pod-teardown";
    let lease_uid = uid();
    let user = leasehold_broker::per_pod::per_pod_username(&lease_uid, &uid());
    let admin = pg.admin_client().await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE \"{user}\" LOGIN PASSWORD 'per-pod-secret'"
        ))
        .await
        .unwrap();
    let mut obj = lease(name, &lease_uid, Some(pg), true);
    obj["spec"]["perPod"] = json!(true);
    obj["spec"]["delivery"] = json!({"csi": {"enabled": true}});
    obj["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    // Every lease version is already revoked.
    obj["status"] =
        json!({"phase": "Revoking", "progress": {"strategy": "Dynamic", "versions": []}});
    let status_path = format!("{LEASES}/{name}/status");
    let lease_path = format!("{LEASES}/{name}");
    let mut refused = admin_secret(pg);
    refused["data"]["password"] = json!(base64::engine::general_purpose::STANDARD.encode("wrong"));

    // 1. The admin is refused: the per-pod user stays, and so does the finalizer.
    let steps = after_policy_and_admin(
        refused,
        [Step::new(Method::PATCH, &status_path, apply_status).repeated()],
    );
    let (client, api) = scripted(steps, obj.clone());
    let parsed: SecretLease = serde_json::from_value(obj.clone()).unwrap();
    let result = reconcile_lease(Arc::new(parsed), context(client)).await;
    let (seen, _) = api.await.unwrap();
    assert!(result.is_err(), "the deletion must wait: {result:?}");
    assert!(
        !seen
            .requests
            .iter()
            .any(|(m, p, _)| *m == Method::PATCH && p == &lease_path),
        "the finalizer was removed with a per-pod user alive: {:?}",
        seen.requests
    );
    assert!(role_exists(pg, &user).await, "nothing dropped yet");

    // 2. With the admin accepted, the per-pod user is dropped, then the finalizer goes.
    let steps = after_policy_and_admin(admin_secret(pg), [removes_the_finalizer(&lease_path)]);
    let (client, api) = scripted(steps, obj.clone());
    let parsed: SecretLease = serde_json::from_value(obj).unwrap();
    let action = reconcile_lease(Arc::new(parsed), context(client))
        .await
        .unwrap();
    api.await.unwrap();
    assert_eq!(action, Action::await_change());
    assert!(!role_exists(pg, &user).await, "per-pod user {user} dropped");
}

/// A fence that is open until the test closes it (as a renew deadline passing would).
fn leading_fence() -> leasehold_operator::LeadershipFence {
    let fence = leasehold_operator::LeadershipFence::new(
        "leasehold-system/leasehold-controller",
        std::time::Duration::from_secs(3600),
    );
    fence.acquired(leasehold_operator::leader::Clocks::now());
    fence
}

/// One reconcile of `obj` against `steps` by a replica holding `fence`: its result and
/// what the API saw.
async fn reconcile_fenced(
    obj: Value,
    steps: Vec<Step>,
    fence: &leasehold_operator::LeadershipFence,
) -> (
    Result<Action, leasehold_operator::OperatorError>,
    common::Seen,
) {
    let (client, api) = scripted(steps, obj.clone());
    let mut ctx = Context::new(client, Arc::new(Metrics::new()), None, 2);
    ctx.fence = fence.clone();
    let lease: SecretLease = serde_json::from_value(obj).unwrap();
    let result = reconcile_lease(Arc::new(lease), Arc::new(ctx)).await;
    let (seen, _) = api.await.unwrap();
    (result, seen)
}

/// The leader's renew deadline passes while it stores a new version's password: the
/// save that records the version's intent, right before the database call, is refused,
/// so no user is created and nothing else is written.
#[tokio::test]
async fn a_replica_that_stopped_leading_mid_reconcile_creates_no_user() {
    let pg = PostgresServer::shared().await;
    let name = "fenced-issue";
    let lease_uid = uid();
    let template = "fence_{{uid}}_v{{version}}";
    let mut obj = lease(name, &lease_uid, Some(pg), true);
    obj["spec"]["postgres"]["usernameTemplate"] = json!(template);
    let user = leasehold_core::naming::dynamic_username(
        template,
        &leasehold_core::naming::LeaseIdentity {
            namespace: "shop".into(),
            name: name.into(),
            uid: lease_uid.clone(),
        },
        1,
        63,
    )
    .unwrap();
    let versions_path = format!("{SECRETS}/{name}-leasehold-versions");
    let fence = leading_fence();
    let deposed = fence.clone();
    let steps = after_policy_and_admin(
        admin_secret(pg),
        [
            Step::new(Method::GET, &format!("{SECRETS}/{name}-creds"), |_, _| {
                not_found()
            }),
            Step::new(Method::GET, &versions_path, |_, _| not_found()),
            // The password is stored; then the replica's leadership runs out.
            Step::new(Method::PATCH, &versions_path, move |body, state| {
                deposed.step_down();
                echo(body, state)
            }),
        ],
    );
    let (result, seen) = reconcile_fenced(obj, steps, &fence).await;
    assert!(
        matches!(result, Err(leasehold_operator::OperatorError::NotLeader(_))),
        "{result:?}"
    );
    assert_eq!(
        seen.requests.last().map(|(m, p, _)| (m.clone(), p.clone())),
        Some((Method::PATCH, versions_path)),
        "nothing after the refusal: no status, no delivery"
    );
    assert!(
        seen.events.is_empty(),
        "a refusal is not an event of the lease"
    );
    assert!(!role_exists(pg, &user).await, "{user} must not be created");
}

/// A resumed issue records nothing new before the database call, so its save writes
/// nothing: it is refused all the same once the replica stopped leading.
#[tokio::test]
async fn a_resumed_issue_is_refused_at_the_save_that_writes_nothing() {
    let pg = PostgresServer::shared().await;
    let name = "fenced-resume";
    let lease_uid = uid();
    let user = format!("fence_resume_{}", &lease_uid[..8]);
    let mut obj = lease(name, &lease_uid, Some(pg), true);
    // Version 1 was recorded as Issuing (its password stored) when the last reconcile
    // stopped: this one resumes it.
    obj["status"] = json!({"progress": {
        "strategy": "Dynamic", "lastVersion": 1,
        "versions": [{"version": 1, "credentialId": user, "state": "Issuing",
                      "issuedAt": "2026-01-01T00:00:00Z"}]
    }});
    let versions_path = format!("{SECRETS}/{name}-leasehold-versions");
    let b = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let stored = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": format!("{name}-leasehold-versions"), "namespace": "shop", "resourceVersion": "3",
                     "ownerReferences": [{"apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease",
                                          "name": name, "uid": lease_uid, "controller": true}]},
        "data": {"v1": b("resumed-password-1")}
    });
    let fence = leading_fence();
    let deposed = fence.clone();
    let steps = after_policy_and_admin(
        admin_secret(pg),
        [
            Step::new(Method::GET, &format!("{SECRETS}/{name}-creds"), |_, _| {
                not_found()
            }),
            // The stored password is read; then the replica's leadership runs out.
            Step::new(Method::GET, &versions_path, move |_, _| {
                deposed.step_down();
                (200, stored.clone())
            }),
        ],
    );
    let (result, seen) = reconcile_fenced(obj, steps, &fence).await;
    assert!(
        matches!(result, Err(leasehold_operator::OperatorError::NotLeader(_))),
        "{result:?}"
    );
    assert!(
        seen.requests.iter().all(|(m, _, _)| m == Method::GET),
        "{:?}",
        seen.requests
    );
    assert!(!role_exists(pg, &user).await, "{user} must not be created");
}
