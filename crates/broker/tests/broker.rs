//! The broker through its real tonic server over TLS on 127.0.0.1, with
//! tokens minted here and the in-memory cluster.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use common::*;
use jiff::Timestamp;
use leasehold_api::{RotationPolicy, SecretLease};
use leasehold_backends::CredentialMaterial;
use leasehold_broker::per_pod::PerPodRequest;
use leasehold_broker::{BrokerError, ObjectRef, PerPodIssuer, PodCredential};
use leasehold_proto::broker::v1 as pb;
use secrecy::SecretString;
use tonic::Code;

/// The `web` pod's Issue of lease `db`, as its node's driver sends it.
async fn issue_for_web(
    b: &mut Broker,
) -> Result<tonic::Response<pb::IssueResponse>, tonic::Status> {
    let pod = web();
    b.client
        .issue(with_token(
            issue_request(&pod, "db", &pod_token(&pod)),
            Some(&node_token()),
        ))
        .await
}

#[tokio::test]
async fn issue_returns_rendered_files_and_version() {
    let mut b = start().await;
    let pod = web();
    let response = issue_for_web(&mut b).await.unwrap().into_inner();
    assert_eq!(response.version, 3);
    let file = |k: &str| String::from_utf8(response.files[k].clone()).unwrap();
    assert_eq!(file("username"), "lh_abc_v3");
    assert_eq!(file("password"), V3_PASSWORD);
    assert_eq!(
        file("dsn"),
        format!("postgres://lh_abc_v3:{V3_PASSWORD}@db.shop.svc:5432/orders")
    );
    assert_eq!(response.files.len(), 3);
    let now = Timestamp::now().as_second();
    let expires = response.expires_at.unwrap().seconds;
    let renew = response.renew_at.unwrap().seconds;
    assert!(
        renew > now + 30 * 60 && renew < expires && expires <= now + 3600,
        "{renew} {expires}"
    );

    // Idempotent: again, holding version 3.
    let mut again = issue_request(&pod, "db", &pod_token(&pod));
    again.held_version = 3;
    let second = b
        .client
        .issue(with_token(again, Some(&node_token())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((second.version, second.files), (3, response.files));
}

#[tokio::test]
async fn node_token_without_node_claim_uses_the_bound_pod() {
    let mut b = start().await;
    let driver_pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": DRIVER_NS, "name": "leasehold-csi-abcde", "uid": "pod-uid-driver"},
        "spec": {"serviceAccountName": DRIVER_SA, "nodeName": NODE, "containers": []},
    }))
    .unwrap();
    b.cluster.put_pod(driver_pod);
    let pod = web();
    let token = node_token_for(DRIVER_NS, DRIVER_SA, None);
    let ok = b
        .client
        .issue(with_token(
            issue_request(&pod, "db", &pod_token(&pod)),
            Some(&token),
        ))
        .await;
    assert!(ok.is_ok(), "{ok:?}");
    // The driver pod moved (or the token is for a pod elsewhere): refused.
    b.cluster.remove_pod(DRIVER_NS, "leasehold-csi-abcde");
    let err = b
        .client
        .issue(with_token(
            issue_request(&pod, "db", &pod_token(&pod)),
            Some(&token),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn acknowledge_records_the_consumer_and_release_removes_it() {
    let mut b = start().await;
    let pod = web();
    let latest = b
        .client
        .acknowledge(with_token(ack_request(&pod, "db", 3), Some(&node_token())))
        .await
        .unwrap()
        .into_inner()
        .latest_version;
    assert_eq!(latest, 3);
    wait_consumers(&b.consumers, "db", |c| {
        c.len() == 1
            && c[0].kind == "Pod"
            && c[0].namespace == "shop"
            && c[0].name == "web-0"
            && c[0].version == Some(3)
            && c[0].acknowledged_at.is_some()
    })
    .await;

    // An older version is recorded as such (the controller waits for it).
    let api = pod_id("shop", "api-0", "api");
    let latest = b
        .client
        .acknowledge(with_token(ack_request(&api, "db", 2), Some(&node_token())))
        .await
        .unwrap()
        .into_inner()
        .latest_version;
    assert_eq!(latest, 3);
    wait_consumers(&b.consumers, "db", |c| {
        c.iter().any(|c| c.name == "api-0" && c.version == Some(2))
    })
    .await;

    // A version the lease never had is refused.
    let err = b
        .client
        .acknowledge(with_token(ack_request(&pod, "db", 9), Some(&node_token())))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Acknowledging for a pod on another node is refused.
    let far = pod_id("shop", "far-0", "web");
    let err = b
        .client
        .acknowledge(with_token(ack_request(&far, "db", 3), Some(&node_token())))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    for _ in 0..2 {
        b.client
            .release(with_token(release_request(&pod, "db"), Some(&node_token())))
            .await
            .unwrap();
    }
    wait_consumers(&b.consumers, "db", |c| c.len() == 1 && c[0].name == "api-0").await;

    // The pod is gone: releasing still works (idempotent), and so does an unknown lease.
    b.cluster.remove_pod("shop", "api-0");
    b.client
        .release(with_token(release_request(&api, "db"), Some(&node_token())))
        .await
        .unwrap();
    wait_consumers(&b.consumers, "db", <[_]>::is_empty).await;
    b.client
        .release(with_token(
            release_request(&api, "nope"),
            Some(&node_token()),
        ))
        .await
        .unwrap();

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &b.registry.lock().unwrap()).unwrap();
    assert!(
        text.contains(r#"leasehold_broker_requests_total{method="Acknowledge",code="Ok"} 2"#),
        "{text}"
    );
    assert!(
        text.contains(r#"leasehold_broker_request_duration_seconds_count{method="Release"} 4"#)
    );
}

/// Issue refusals, each with its gRPC code.
#[tokio::test]
async fn refusals_carry_the_right_codes() {
    let mut b = start().await;
    let web = web();
    let api = pod_id("shop", "api-0", "api");
    let far = pod_id("shop", "far-0", "web");
    let job = pod_id("billing", "job-0", "worker");
    let report = pod_id("analytics", "report-0", "report");
    let node = node_token();

    let mut other_uid = web.clone();
    other_uid.uid = uid_of("someone-else");
    let mut other_sa = web.clone();
    other_sa.service_account = "admin".into();

    let cases: Vec<(&str, pb::IssueRequest, Option<String>, Code)> = vec![
        (
            "pod not on this node",
            issue_request(&far, "db", &pod_token(&far)),
            Some(node.clone()),
            Code::PermissionDenied,
        ),
        (
            "node driver token bound to another node",
            issue_request(&web, "db", &pod_token(&web)),
            Some(node_token_for(DRIVER_NS, DRIVER_SA, Some("node-b"))),
            Code::PermissionDenied,
        ),
        (
            "caller is not the node driver",
            issue_request(&web, "db", &pod_token(&web)),
            Some(node_token_for("shop", "web", Some(NODE))),
            Code::PermissionDenied,
        ),
        (
            "pod token of another pod (uid)",
            issue_request(&web, "db", &pod_token(&other_uid)),
            Some(node.clone()),
            Code::PermissionDenied,
        ),
        (
            "pod token of another pod (name)",
            issue_request(&web, "db", &pod_token(&api)),
            Some(node.clone()),
            Code::PermissionDenied,
        ),
        (
            "pod token of another namespace",
            issue_request(&web, "db", &pod_token(&job)),
            Some(node.clone()),
            Code::PermissionDenied,
        ),
        (
            "pod token of another service account",
            issue_request(&web, "db", &pod_token(&other_sa)),
            Some(node.clone()),
            Code::PermissionDenied,
        ),
        (
            "request claims another service account than the pod runs as",
            issue_request(&other_sa, "db", &pod_token(&other_sa)),
            Some(node.clone()),
            Code::PermissionDenied,
        ),
        (
            "expired pod token",
            issue_request(&web, "db", &pod_token_exp(&web, -600)),
            Some(node.clone()),
            Code::Unauthenticated,
        ),
        (
            "garbage pod token",
            issue_request(&web, "db", "not-a-jwt"),
            Some(node.clone()),
            Code::Unauthenticated,
        ),
        (
            "no node driver token",
            issue_request(&web, "db", &pod_token(&web)),
            None,
            Code::Unauthenticated,
        ),
        (
            "garbage node driver token",
            issue_request(&web, "db", &pod_token(&web)),
            Some("eyJhbGciOiJub25lIn0.e30.".into()),
            Code::Unauthenticated,
        ),
        (
            "service account outside access",
            issue_request(&web, "restricted", &pod_token(&web)),
            Some(node.clone()),
            Code::PermissionDenied,
        ),
        (
            "namespace not listed",
            issue_request(&job, "db", &pod_token(&job)),
            Some(node.clone()),
            Code::PermissionDenied,
        ),
        (
            "namespace not matching the selector",
            issue_request(&job, "selected", &pod_token(&job)),
            Some(node.clone()),
            Code::PermissionDenied,
        ),
        (
            "lease with CSI disabled",
            issue_request(&web, "nocsi", &pod_token(&web)),
            Some(node.clone()),
            Code::PermissionDenied,
        ),
        (
            "lease not found",
            issue_request(&web, "nope", &pod_token(&web)),
            Some(node.clone()),
            Code::NotFound,
        ),
        (
            "lease without a current version",
            issue_request(&web, "fresh", &pod_token(&web)),
            Some(node.clone()),
            Code::Unavailable,
        ),
        (
            "per-pod lease on a broker without per-pod support",
            issue_request(&web, "perpod", &pod_token(&web)),
            Some(node.clone()),
            Code::FailedPrecondition,
        ),
    ];
    for (name, request, token, code) in cases {
        let err = b
            .client
            .issue(with_token(request, token.as_deref()))
            .await
            .expect_err(name);
        assert_eq!(err.code(), code, "{name}: {err:?}");
    }

    // Allowed: listed namespace with an `ns/name` SA, a selector match, a listed `name` SA.
    for (name, pod, lease) in [
        ("listed namespace, ns/name SA", &job, "shared"),
        ("selector match", &report, "selected"),
        ("same namespace, listed SA name", &api, "restricted"),
        ("same namespace, SA name in a mixed list", &web, "shared"),
    ] {
        let r = b
            .client
            .issue(with_token(
                issue_request(pod, lease, &pod_token(pod)),
                Some(&node),
            ))
            .await;
        assert!(r.is_ok(), "{name}: {r:?}");
    }
}

#[tokio::test]
async fn malformed_requests_are_invalid_arguments() {
    let mut b = start().await;
    let web = web();
    let token = pod_token(&web);
    let base = issue_request(&web, "db", &token);
    let mut cases: Vec<(&str, pb::IssueRequest)> = Vec::new();
    cases.push((
        "no pod",
        pb::IssueRequest {
            pod: None,
            ..base.clone()
        },
    ));
    let mut r = base.clone();
    r.pod.as_mut().unwrap().uid.clear();
    cases.push(("no pod uid", r));
    let mut r = base.clone();
    r.pod.as_mut().unwrap().service_account.clear();
    cases.push(("no service account", r));
    cases.push((
        "no lease",
        pb::IssueRequest {
            lease: None,
            ..base.clone()
        },
    ));
    let mut r = base.clone();
    r.lease.as_mut().unwrap().name.clear();
    cases.push(("no lease name", r));
    cases.push((
        "no node",
        pb::IssueRequest {
            node_name: String::new(),
            ..base.clone()
        },
    ));
    cases.push((
        "no volume",
        pb::IssueRequest {
            volume_id: String::new(),
            ..base.clone()
        },
    ));
    cases.push((
        "no pod token",
        pb::IssueRequest {
            pod_token: String::new(),
            ..base.clone()
        },
    ));
    for (field, value) in [
        ("pod uid not a UUID", "uid-shop-web-0"),
        ("pod namespace not a label", "Shop"),
        ("pod name with a slash", "web/0"),
        ("service account with an underscore", "web_sa"),
        ("lease name with a space", "db x"),
        ("lease namespace with a dot", "shop.x"),
        ("node name upper case", "Node-A"),
    ] {
        let mut r = base.clone();
        let pod = r.pod.as_mut().unwrap();
        let lease = r.lease.as_mut().unwrap();
        match field {
            f if f.starts_with("pod uid") => pod.uid = value.into(),
            f if f.starts_with("pod namespace") => pod.namespace = value.into(),
            f if f.starts_with("pod name") => pod.name = value.into(),
            f if f.starts_with("service account") => pod.service_account = value.into(),
            f if f.starts_with("lease namespace") => lease.namespace = value.into(),
            f if f.starts_with("lease name") => lease.name = value.into(),
            _ => r.node_name = value.into(),
        }
        cases.push((field, r));
    }
    cases.push((
        "long node name",
        pb::IssueRequest {
            node_name: "n".repeat(300),
            ..base.clone()
        },
    ));
    for (name, request) in cases {
        let err = b
            .client
            .issue(with_token(request, Some(&node_token())))
            .await
            .expect_err(name);
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
    }
    let err = b
        .client
        .acknowledge(with_token(
            pb::AcknowledgeRequest {
                pod: None,
                ..ack_request(&web, "db", 3)
            },
            Some(&node_token()),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = b
        .client
        .release(with_token(
            pb::ReleaseRequest {
                node_name: String::new(),
                ..release_request(&web, "db")
            },
            Some(&node_token()),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// A per-pod issuer that hands out a fixed credential and counts calls.
#[derive(Default)]
struct FakePerPod {
    issued: AtomicUsize,
    released: AtomicUsize,
}

#[async_trait]
impl PerPodIssuer for FakePerPod {
    async fn issue(&self, request: &PerPodRequest<'_>) -> Result<PodCredential, BrokerError> {
        self.issued.fetch_add(1, Ordering::SeqCst);
        let mut files = CredentialMaterial::default();
        files.0.insert(
            "username".into(),
            SecretString::from(format!("pod-{}", request.pod.name)),
        );
        let now = Timestamp::now();
        Ok(PodCredential {
            files,
            version: 1,
            expires_at: now,
            renew_at: now,
        })
    }

    async fn latest_version(&self, _: &SecretLease, _: &str) -> Result<Option<u64>, BrokerError> {
        Ok(Some(1))
    }

    async fn release(
        &self,
        _: &SecretLease,
        policy: Option<&RotationPolicy>,
        _: &str,
        _: &str,
    ) -> Result<(), BrokerError> {
        assert!(policy.is_some());
        self.released.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test]
async fn per_pod_leases_go_through_the_issuer() {
    let fake = Arc::new(FakePerPod::default());
    let mut b = start_with(Some(fake.clone())).await;
    let web = web();
    let r = b
        .client
        .issue(with_token(
            issue_request(&web, "perpod", &pod_token(&web)),
            Some(&node_token()),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.files["username"], b"pod-web-0");
    let latest = b
        .client
        .acknowledge(with_token(
            ack_request(&web, "perpod", 1),
            Some(&node_token()),
        ))
        .await
        .unwrap()
        .into_inner()
        .latest_version;
    assert_eq!(latest, 1);
    b.client
        .release(with_token(
            release_request(&web, "perpod"),
            Some(&node_token()),
        ))
        .await
        .unwrap();
    assert_eq!(fake.issued.load(Ordering::SeqCst), 1);
    assert_eq!(fake.released.load(Ordering::SeqCst), 1);
    // Per-pod credentials are not lease versions: no consumer entries.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(b.consumers.writes(), 0);
}

/// Acknowledge applies Issue's access rules: a pod that lost access is
/// refused and stops being a consumer; a per-pod lease's user is revoked.
#[tokio::test]
async fn acknowledge_applies_the_access_rules() {
    let fake = Arc::new(FakePerPod::default());
    let mut b = start_with(Some(fake.clone())).await;
    let web = web();
    b.client
        .acknowledge(with_token(ack_request(&web, "db", 3), Some(&node_token())))
        .await
        .unwrap();
    wait_consumers(&b.consumers, "db", |c| c.len() == 1).await;

    // The policy now admits only service account `api`.
    b.cluster.put_policy(policy_object(
        "shop",
        "open",
        serde_json::json!({"serviceAccounts": ["api"]}),
    ));
    let err = b
        .client
        .acknowledge(with_token(ack_request(&web, "db", 3), Some(&node_token())))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("may not use"), "{err:?}");
    wait_consumers(&b.consumers, "db", <[_]>::is_empty).await;

    let err = b
        .client
        .acknowledge(with_token(
            ack_request(&web, "perpod", 1),
            Some(&node_token()),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(
        fake.released.load(Ordering::SeqCst),
        1,
        "per-pod user revoked"
    );

    // A lease without CSI delivery.
    let api = pod_id("shop", "api-0", "api");
    let err = b
        .client
        .acknowledge(with_token(
            ack_request(&api, "nocsi", 3),
            Some(&node_token()),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

/// A driver may acknowledge only for volumes its pods really have: a pod
/// without a volume of the lease is refused and never recorded.
#[tokio::test]
async fn acknowledge_needs_a_volume_of_the_lease() {
    let mut b = start().await;
    let bare = pod_id("shop", "bare-0", "web");
    let err = b
        .client
        .acknowledge(with_token(ack_request(&bare, "db", 3), Some(&node_token())))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("no leasehold volume"), "{err:?}");
    // A pod of another namespace with a volume of the lease, on this node.
    let job = pod_id("billing", "job-0", "worker");
    b.client
        .acknowledge(with_token(
            ack_request(&job, "shared", 3),
            Some(&node_token()),
        ))
        .await
        .unwrap();
    wait_consumers(&b.consumers, "shared", |c| {
        c.len() == 1 && c[0].name == "job-0"
    })
    .await;
    assert_eq!(
        b.consumers.consumers(&ObjectRef::new("shop", "db")),
        Some(Vec::new())
    );
}

/// A node driver's token outlives its pod: once the driver pod is being
/// deleted, gone, or replaced by a pod of the same name, the token is refused.
#[tokio::test]
async fn driver_token_of_a_deleted_pod_is_refused() {
    let mut b = start().await;
    let pod = web();
    issue_for_web(&mut b).await.unwrap();

    b.cluster.put_pod(driver_pod(Some("2030-01-01T00:00:00Z")));
    let err = issue_for_web(&mut b).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("is terminating"), "{err:?}");

    b.cluster.remove_pod(DRIVER_NS, "leasehold-csi-abcde");
    let err = issue_for_web(&mut b).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("no longer exists"), "{err:?}");
    // Acknowledge and Release too.
    let err = b
        .client
        .acknowledge(with_token(ack_request(&pod, "db", 3), Some(&node_token())))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = b
        .client
        .release(with_token(release_request(&pod, "db"), Some(&node_token())))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // A new driver pod with the old one's name is not the pod the token names.
    let mut replaced = driver_pod(None);
    replaced.metadata.uid = Some("pod-uid-driver-2".into());
    b.cluster.put_pod(replaced);
    let err = issue_for_web(&mut b).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    b.cluster.put_pod(driver_pod(None));
    issue_for_web(&mut b).await.unwrap();
}

/// Waits (bounded) until a new connection to the broker is admitted.
async fn wait_admitted(b: &Broker) {
    for _ in 0..200 {
        if connect(b.addr, &b.ca_pem).await.is_ok() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("no connection slot was freed");
}

/// A peer that goes silent after the TLS handshake gives its connection slot
/// back: before sending the HTTP/2 preface, at the handshake deadline; after
/// it, once it leaves an HTTP/2 PING unanswered. The harness client, which
/// answers PINGs, keeps working throughout.
#[tokio::test]
async fn silent_peers_lose_their_connection_slot() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let settings = leasehold_broker::ConnectionSettings {
        max_connections: 2,
        handshake_timeout: std::time::Duration::from_millis(500),
        keepalive_interval: std::time::Duration::from_millis(300),
        keepalive_timeout: std::time::Duration::from_millis(500),
    };
    let mut b = start_configured(|_| None, settings).await;
    // The HTTP/2 client preface and an empty SETTINGS frame.
    let preface: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
    for sends_preface in [false, true] {
        // Retried while the connection `wait_admitted` dropped still holds its slot.
        let mut silent = None;
        for _ in 0..200 {
            let tcp = tokio::net::TcpStream::connect(b.addr).await.unwrap();
            match tls_connector(&b.ca_pem)
                .connect("localhost".try_into().unwrap(), tcp)
                .await
            {
                Ok(stream) => {
                    silent = Some(stream);
                    break;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
        let mut silent = silent.expect("a slot for the silent peer");
        if sends_preface {
            silent.write_all(preface).await.unwrap();
            silent.flush().await.unwrap();
        }
        // Reading answers nothing (a PING needs an ACK written back).
        let closed = tokio::time::timeout(std::time::Duration::from_secs(20), async {
            let mut buf = [0u8; 1024];
            while let Ok(n) = silent.read(&mut buf).await
                && n > 0
            {}
        })
        .await;
        assert!(
            closed.is_ok(),
            "the server closes a silent peer (preface sent: {sends_preface})"
        );
        wait_admitted(&b).await;
    }
    issue_for_web(&mut b).await.unwrap();
}

/// Connections beyond the limit (handshakes included) are closed at once;
/// a freed slot admits a new one.
#[tokio::test]
async fn connections_beyond_the_limit_are_closed() {
    let mut b = start_opts(None, 2).await;
    let pod = web();
    // The harness client holds one connection; a bare TCP connection that
    // never handshakes holds the second.
    issue_for_web(&mut b).await.unwrap();
    let idle = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    assert!(
        connect(b.addr, &b.ca_pem).await.is_err(),
        "a third connection is refused"
    );
    // The existing connection keeps working.
    b.client
        .acknowledge(with_token(ack_request(&pod, "db", 3), Some(&node_token())))
        .await
        .unwrap();
    drop(idle);
    let mut admitted = false;
    for _ in 0..100 {
        if connect(b.addr, &b.ca_pem).await.is_ok() {
            admitted = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(admitted, "a freed slot admits a new connection");
}

/// A broker whose replica stopped leading answers UNAVAILABLE before doing anything, and
/// serves again once it leads.
#[tokio::test]
async fn a_broker_that_no_longer_leads_refuses_before_any_side_effect() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let leading = Arc::new(AtomicBool::new(true));
    let gate = leading.clone();
    let mut b = common::start_service(
        |_| None,
        leasehold_broker::ConnectionSettings::current(),
        move |s| {
            s.only_while(Arc::new(move || {
                if gate.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err("NotLeader: stopped leading".into())
                }
            }))
        },
    )
    .await;
    let pod = web();
    assert_eq!(issue_for_web(&mut b).await.unwrap().into_inner().version, 3);

    leading.store(false, Ordering::SeqCst);
    let refused = issue_for_web(&mut b).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("no longer serves"),
        "{refused:?}"
    );
    let refused = b
        .client
        .acknowledge(with_token(ack_request(&pod, "db", 3), Some(&node_token())))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);

    leading.store(true, Ordering::SeqCst);
    assert_eq!(issue_for_web(&mut b).await.unwrap().into_inner().version, 3);
}
