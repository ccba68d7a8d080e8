//! The CSI node driver through its real gRPC server on a Unix socket.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use leasehold_csi::CredentialBroker;
use leasehold_proto::csi::v1 as csi;
use tonic::Code;

fn version_of_username(s: &str) -> u64 {
    s.strip_prefix("user-v").unwrap().parse().unwrap()
}

/// Checks a password file is one complete version; returns it.
fn version_of_password(s: &str) -> u64 {
    let v: u64 = s[CRED_MARKER.len() + 2..CRED_MARKER.len() + 6]
        .parse()
        .unwrap();
    assert_eq!(
        s,
        format!("{CRED_MARKER}-v{v:04};").repeat(2000),
        "torn or mixed password file"
    );
    v
}

type PublishResult = Result<tonic::Response<csi::NodePublishVolumeResponse>, tonic::Status>;

/// `request` published through `node` on a task of its own (it may hang, or wait its
/// turn).
fn publish_in_background(
    node: &csi::node_client::NodeClient<tonic::transport::Channel>,
    request: csi::NodePublishVolumeRequest,
) -> tokio::task::JoinHandle<PublishResult> {
    let mut node = node.clone();
    tokio::spawn(async move { node.node_publish_volume(request).await })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_probe_and_socket_mode() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = FakeBroker::start().await;
    let mut d = start_driver(dir.path(), &broker).await;

    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");

    let info = d
        .identity
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.leasehold.dev");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let caps = d
        .identity
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(caps.capabilities.is_empty());
    let probe = d
        .identity
        .probe(csi::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));

    let node_info = d
        .node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node_info.node_id, "node-a");
    let node_caps = d
        .node
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node_caps.capabilities.len(), 1, "VOLUME_MOUNT_GROUP only");
    let err = d
        .node
        .node_stage_volume(csi::NodeStageVolumeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);

    // A controller outage must not fail the driver's liveness (the livenessprobe
    // sidecar turns Probe into the container's liveness check): once the driver's
    // own broker client has seen the broker unreachable, Probe still says ready.
    broker.stop().await;
    let client = d.broker.clone();
    wait_until(
        "the driver sees the broker down",
        Duration::from_secs(10),
        || {
            let client = client.clone();
            async move { !client.ready().await }
        },
    )
    .await;
    let probe = d
        .identity
        .probe(csi::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true), "broker down, driver still live");

    let socket = d.socket.clone();
    d.stop().await;
    assert!(!socket.exists(), "socket removed on shutdown");
}

/// The broker's reachability is the driver's readiness (`/readyz`) and the
/// `leasehold_csi_broker_reachable` gauge: 0 while the broker is down, 1 again once
/// it is back; the CSI Probe (liveness) stays ready throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_makes_the_driver_unready_and_the_gauge_zero_but_not_dead() {
    const GAUGE: &str = "leasehold_csi_broker_reachable";
    let dir = tempfile::tempdir().unwrap();
    let mut broker = FakeBroker::start().await;
    let mut d = start_driver_with(dir.path(), &broker, |c| {
        c.broker_check_interval = Duration::from_millis(20);
    })
    .await;
    let within = Duration::from_secs(10);

    wait_until("ready", within, || async { d.reachability.is_reachable() }).await;
    assert_eq!(d.metric(GAUGE), Some(1.0));

    broker.stop().await;
    wait_until("not ready", within, || async {
        !d.reachability.is_reachable()
    })
    .await;
    assert_eq!(d.metric(GAUGE), Some(0.0), "gauge follows /readyz");
    let probe = d
        .identity
        .probe(csi::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true), "not ready, but live");

    broker.restart().await;
    wait_until("ready again", within, || async {
        d.reachability.is_reachable()
    })
    .await;
    assert_eq!(d.metric(GAUGE), Some(1.0));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_socket_is_replaced_and_non_socket_refused() {
    let dir = tempfile::tempdir().unwrap();
    let broker = FakeBroker::start().await;
    // A stale socket from a previous run.
    let stale = std::os::unix::net::UnixListener::bind(dir.path().join("csi.sock")).unwrap();
    drop(stale);
    let d = start_driver(dir.path(), &broker).await;
    assert_eq!(
        std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777,
        0o600
    );
    d.stop().await;

    std::fs::write(dir.path().join("not-a-socket"), b"x").unwrap();
    let err = leasehold_csi::bind_socket(&dir.path().join("not-a-socket")).unwrap_err();
    assert!(err.to_string().contains("non-socket"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_the_right_codes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = FakeBroker::start().await;
    let mut d = start_driver(dir.path(), &broker).await;
    let target = target_under(dir.path(), "pod-bad");
    let outside = dir
        .path()
        .join("elsewhere/pods/pod-bad/volumes/kubernetes.io~csi/creds/mount");
    let other_pod = target_under(dir.path(), "pod-other");
    let not_mount = target.parent().unwrap().join("data");

    let cases: Vec<(&str, csi::NodePublishVolumeRequest, Code)> = vec![
        (
            "missing target path",
            {
                let mut r = Pub::new("csi-bad1", &target).build();
                r.target_path.clear();
                r
            },
            Code::InvalidArgument,
        ),
        (
            "missing volume id",
            {
                let mut r = Pub::new("csi-bad1", &target).build();
                r.volume_id.clear();
                r
            },
            Code::InvalidArgument,
        ),
        (
            "missing capability",
            {
                let mut r = Pub::new("csi-bad1", &target).build();
                r.volume_capability = None;
                r
            },
            Code::InvalidArgument,
        ),
        (
            "block access",
            {
                let mut r = Pub::new("csi-bad1", &target).build();
                r.volume_capability.as_mut().unwrap().access_type =
                    Some(csi::volume_capability::AccessType::Block(Default::default()));
                r
            },
            Code::InvalidArgument,
        ),
        (
            "multi-node writer",
            {
                let mut r = Pub::new("csi-bad1", &target).build();
                r.volume_capability
                    .as_mut()
                    .unwrap()
                    .access_mode
                    .as_mut()
                    .unwrap()
                    .mode = csi::volume_capability::access_mode::Mode::MultiNodeMultiWriter as i32;
                r
            },
            Code::InvalidArgument,
        ),
        (
            "non-ephemeral",
            Pub {
                ephemeral: "false",
                ..Pub::new("csi-bad1", &target)
            }
            .build(),
            Code::InvalidArgument,
        ),
        (
            "readonly=false",
            Pub {
                readonly: false,
                ..Pub::new("csi-bad1", &target)
            }
            .build(),
            Code::InvalidArgument,
        ),
        (
            "missing lease",
            Pub {
                lease: None,
                ..Pub::new("csi-bad1", &target)
            }
            .build(),
            Code::InvalidArgument,
        ),
        (
            "missing token",
            Pub {
                token: None,
                ..Pub::new("csi-bad1", &target)
            }
            .build(),
            Code::Unauthenticated,
        ),
        (
            "bad token",
            Pub {
                token: Some("forged-token"),
                ..Pub::new("csi-bad1", &target)
            }
            .build(),
            Code::Unauthenticated,
        ),
        (
            "token of another pod",
            Pub {
                pod_name: "impostor",
                ..Pub::new("csi-bad1", &target)
            }
            .build(),
            Code::PermissionDenied,
        ),
        (
            "target outside the kubelet's pod directories",
            Pub {
                pod_uid: Some("pod-bad"),
                ..Pub::new("csi-bad1", &outside)
            }
            .build(),
            Code::InvalidArgument,
        ),
        (
            "target of another pod",
            Pub {
                pod_uid: Some("pod-bad"),
                ..Pub::new("csi-bad1", &other_pod)
            }
            .build(),
            Code::InvalidArgument,
        ),
        (
            "target not a csi volume's mount directory",
            Pub {
                pod_uid: Some("pod-bad"),
                ..Pub::new("csi-bad1", &not_mount)
            }
            .build(),
            Code::InvalidArgument,
        ),
    ];
    for (what, req, code) in cases {
        let err = d.node.node_publish_volume(req).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {}", err.message());
        assert!(!err.message().contains(POD_TOKEN));
    }
    for t in [&target, &outside, &other_pod, &not_mount] {
        assert!(!t.exists(), "nothing created for rejected requests");
    }
    assert_eq!(broker.issues(), 0);

    let err = d
        .node
        .node_unpublish_volume(unpublish_req("", &target))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    for bad in [Path::new(""), outside.as_path(), not_mount.as_path()] {
        let err = d
            .node
            .node_unpublish_volume(unpublish_req("csi-x", bad))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}");
    }
    // Unpublishing something that never existed succeeds.
    d.node
        .node_unpublish_volume(unpublish_req("csi-never", &target))
        .await
        .unwrap();
    d.stop().await;
    assert_no_secrets_in_logs();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_republish_unpublish_lifecycle() {
    if skip_unless_root("publish_republish_unpublish_lifecycle") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut broker = FakeBroker::start().await;
    let mut d = start_driver(dir.path(), &broker).await;
    let target = target_under(dir.path(), "pod-life");
    let gid = 4242;
    let req = Pub {
        gid: Some(gid),
        ..Pub::new("csi-life", &target)
    };

    // Publish.
    d.node.node_publish_volume(req.build()).await.unwrap();
    let mounts = mounts_at(&target);
    assert_eq!(mounts.len(), 1, "one mount: {mounts:?}");
    let m = &mounts[0];
    assert_eq!(m.fs_type, "tmpfs");
    for opt in ["nodev", "noexec", "nosuid"] {
        assert!(m.has_option(opt), "{opt} missing: {}", m.mount_options);
    }
    assert!(
        m.super_options.contains("size=1024k"),
        "{}",
        m.super_options
    );
    let root = std::fs::metadata(&target).unwrap();
    assert_eq!(root.mode() & 0o7777, 0o550);
    assert_eq!(root.gid(), gid);
    for f in ["username", "password", "conf/db.properties"] {
        let meta = std::fs::metadata(target.join(f)).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o440, "{f}");
        assert_eq!(meta.gid(), gid, "{f}");
    }
    let conf = std::fs::metadata(target.join("conf")).unwrap();
    assert_eq!(conf.mode() & 0o7777, 0o550);
    assert_eq!(conf.gid(), gid);
    assert_eq!(
        std::fs::read_to_string(target.join("username")).unwrap(),
        "user-v0001"
    );
    assert_eq!(broker.issues(), 1);

    // Metadata: 0600, resumable, no credential.
    let meta_path = dir.path().join("state/volumes/csi-life.json");
    let meta = std::fs::read_to_string(&meta_path).unwrap();
    assert_eq!(std::fs::metadata(&meta_path).unwrap().mode() & 0o777, 0o600);
    assert!(
        meta.contains("\"version\": 1") && meta.contains("\"db\""),
        "{meta}"
    );
    assert!(!meta.contains(CRED_MARKER) && !meta.contains(POD_TOKEN));

    // Publish again, nothing new at the broker: idempotent, no new Issue.
    let data_dir = std::fs::read_link(target.join("..data")).unwrap();
    d.node.node_publish_volume(req.build()).await.unwrap();
    assert_eq!(broker.issues(), 1);
    assert_eq!(std::fs::read_link(target.join("..data")).unwrap(), data_dir);
    assert_eq!(mounts_at(&target).len(), 1);

    // Same volume, different lease: ALREADY_EXISTS.
    let err = d
        .node
        .node_publish_volume(
            Pub {
                lease: Some("other"),
                ..Pub {
                    gid: Some(gid),
                    ..Pub::new("csi-life", &target)
                }
            }
            .build(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    // Rotations while readers read: never a mix.
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (stop, reads, target) = (stop.clone(), reads.clone(), target.clone());
        std::thread::spawn(move || {
            let dir = leasehold_files::AtomicDir::new(&target);
            let mut last = 0;
            while !stop.load(Ordering::Relaxed) {
                // Both files from one version, via one resolution of ..data.
                let cur = dir.read_current().unwrap().unwrap();
                use secrecy::ExposeSecret;
                let u = version_of_username(
                    std::str::from_utf8(cur.files["username"].expose_secret()).unwrap(),
                );
                let p = version_of_password(
                    std::str::from_utf8(cur.files["password"].expose_secret()).unwrap(),
                );
                assert_eq!(u, p, "username and password from different versions");
                // And the pod's view: each visible file complete.
                if let Ok(s) = std::fs::read_to_string(target.join("password")) {
                    let v = version_of_password(&s);
                    assert!(v + 1 >= last);
                    last = last.max(v);
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    for _ in 0..15 {
        let v = broker.bump_version();
        d.node.node_publish_volume(req.build()).await.unwrap();
        assert_eq!(
            version_of_username(&std::fs::read_to_string(target.join("username")).unwrap()),
            v
        );
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    assert!(reads.load(Ordering::Relaxed) > 0);
    let held = broker.state.lock().unwrap().version;
    assert_eq!(broker.issues(), 16);
    assert!(
        broker
            .state
            .lock()
            .unwrap()
            .acks
            .iter()
            .any(|(id, v)| id == "csi-life" && *v == held)
    );
    let meta = std::fs::read_to_string(&meta_path).unwrap();
    assert!(meta.contains(&format!("\"version\": {held}")));

    // Broker down: republish succeeds and leaves the files alone.
    broker.stop().await;
    let before = std::fs::read(target.join("password")).unwrap();
    let data_dir = std::fs::read_link(target.join("..data")).unwrap();
    d.node.node_publish_volume(req.build()).await.unwrap();
    assert_eq!(std::fs::read(target.join("password")).unwrap(), before);
    assert_eq!(std::fs::read_link(target.join("..data")).unwrap(), data_dir);

    // Unpublish with the broker still down: mount, files and metadata go; the
    // release is recorded and retried later.
    d.node
        .node_unpublish_volume(unpublish_req("csi-life", &target))
        .await
        .unwrap();
    assert!(mounts_at(&target).is_empty());
    assert!(!target.exists());
    assert!(!meta_path.exists());
    let pending = dir.path().join("state/pending-release/csi-life.json");
    assert!(pending.exists());
    broker.restart().await;
    assert_eq!(d.service.retry_pending_releases().await, 0);
    assert_eq!(broker.releases(), vec!["csi-life".to_owned()]);
    assert!(!pending.exists());

    // Repeated unpublish: OK.
    d.node
        .node_unpublish_volume(unpublish_req("csi-life", &target))
        .await
        .unwrap();
    d.node
        .node_unpublish_volume(unpublish_req("csi-life", &target))
        .await
        .unwrap();
    assert_eq!(broker.releases().len(), 1);
    assert_eq!(
        broker.state.lock().unwrap().bad_auth,
        0,
        "node token always sent"
    );

    d.stop().await;
    unmount_all_under(dir.path());
    let logs = logs().text();
    assert!(logs.contains("volume published") && logs.contains("credential refreshed"));
    assert!(logs.contains("broker unavailable on republish"));
    assert_no_secrets_in_logs();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_of_one_volume_mount_once() {
    if skip_unless_root("concurrent_publishes_of_one_volume_mount_once") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let broker = FakeBroker::start().await;
    broker.state.lock().unwrap().issue_delay = Duration::from_millis(300);
    let d = start_driver(dir.path(), &broker).await;
    let target = target_under(dir.path(), "pod-race");

    let mut calls = Vec::new();
    for _ in 0..4 {
        let req = Pub::new("csi-race", &target).build();
        calls.push(publish_in_background(&d.node, req));
    }
    let mut ok = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => ok += 1,
            Err(s) => assert_eq!(s.code(), Code::Aborted, "{}", s.message()),
        }
    }
    assert!(ok >= 1);
    assert_eq!(mounts_at(&target).len(), 1, "exactly one tmpfs");
    assert_eq!(broker.issues(), 1);

    let mut node = d.node.clone();
    node.node_unpublish_volume(unpublish_req("csi-race", &target))
        .await
        .unwrap();
    assert!(mounts_at(&target).is_empty());
    d.stop().await;
    unmount_all_under(dir.path());
    assert_no_secrets_in_logs();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_from_metadata_without_issue() {
    if skip_unless_root("restart_resumes_from_metadata_without_issue") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let broker = FakeBroker::start().await;
    let target = target_under(dir.path(), "pod-restart");
    let req = Pub::new("csi-restart", &target);

    let mut d = start_driver(dir.path(), &broker).await;
    d.node.node_publish_volume(req.build()).await.unwrap();
    assert_eq!(broker.issues(), 1);
    d.stop().await;

    // A new process: same state dir, same socket path.
    let mut d = start_driver(dir.path(), &broker).await;
    let acks_before = broker.acks();
    d.node.node_publish_volume(req.build()).await.unwrap();
    assert_eq!(broker.issues(), 1, "resumed without a new Issue");
    assert_eq!(broker.acks(), acks_before + 1, "held version acknowledged");
    assert_eq!(mounts_at(&target).len(), 1);

    // Renewal window reached: a republish refreshes even without a new version.
    let meta_path = dir.path().join("state/volumes/csi-restart.json");
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    record["renew_at"] = serde_json::Value::String("2000-01-01T00:00:00Z".into());
    std::fs::write(&meta_path, serde_json::to_vec(&record).unwrap()).unwrap();
    d.node.node_publish_volume(req.build()).await.unwrap();
    assert_eq!(broker.issues(), 2, "renewed once due");

    d.node
        .node_unpublish_volume(unpublish_req("csi-restart", &target))
        .await
        .unwrap();
    assert_eq!(broker.releases(), vec!["csi-restart".to_owned()]);
    d.stop().await;
    unmount_all_under(dir.path());
    assert_no_secrets_in_logs();
}

/// An Issue that fails after the broker may have created something (here: no
/// answer within the driver's deadline, then a broker that is down) is
/// released at once or, failing that, by the background retry; a later
/// successful publish of the volume supersedes a queued release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_issue_is_released_now_or_in_the_background() {
    if skip_unless_root("failed_issue_is_released_now_or_in_the_background") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut broker = FakeBroker::start().await;
    broker.state.lock().unwrap().issue_delay = Duration::from_secs(3);
    let target = target_under(dir.path(), "pod-orphan");
    let mut d = start_driver_with(dir.path(), &broker, |c| {
        c.broker_timeout = Duration::from_millis(500);
    })
    .await;

    // Timed out: released right away.
    let err = d
        .node
        .node_publish_volume(Pub::new("csi-orphan-1", &target).build())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(broker.releases(), vec!["csi-orphan-1".to_owned()]);
    assert!(mounts_at(&target).is_empty());

    // Broker down: the release is queued and retried.
    broker.state.lock().unwrap().issue_delay = Duration::ZERO;
    broker.stop().await;
    let err = d
        .node
        .node_publish_volume(Pub::new("csi-orphan-2", &target).build())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    broker.restart().await;
    assert_eq!(d.service.retry_pending_releases().await, 0);
    assert_eq!(
        broker.releases(),
        vec!["csi-orphan-1".to_owned(), "csi-orphan-2".to_owned()]
    );
    assert_eq!(d.service.retry_pending_releases().await, 0, "done once");
    assert_eq!(broker.releases().len(), 2);

    // Queued, then published successfully: the queued release is dropped.
    broker.stop().await;
    assert!(
        d.node
            .node_publish_volume(Pub::new("csi-orphan-3", &target).build())
            .await
            .is_err()
    );
    broker.restart().await;
    d.node
        .node_publish_volume(Pub::new("csi-orphan-3", &target).build())
        .await
        .unwrap();
    assert_eq!(d.service.retry_pending_releases().await, 0);
    assert_eq!(
        broker.releases().len(),
        2,
        "the live volume is not released"
    );

    d.node
        .node_unpublish_volume(unpublish_req("csi-orphan-3", &target))
        .await
        .unwrap();
    d.stop().await;
    unmount_all_under(dir.path());
    assert_no_secrets_in_logs();
}

/// Many pods of one lease starting together (a Deployment scaling up): more publishes
/// than the lease's slots all succeed, waiting their turn instead of being refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_beyond_a_leases_slots_wait_their_turn() {
    if skip_unless_root("publishes_beyond_a_leases_slots_wait_their_turn") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let broker = FakeBroker::start().await;
    let d = start_driver_with(dir.path(), &broker, |c| {
        c.per_lease_concurrency = 1;
    })
    .await;
    let calls: Vec<_> = (0..24)
        .map(|i| {
            let target = target_under(dir.path(), &format!("pod-many{i}"));
            let volume = format!("csi-many{i}");
            publish_in_background(&d.node, Pub::new(&volume, &target).build())
        })
        .collect();
    for call in calls {
        call.await
            .unwrap()
            .expect("published after waiting for the lease's slot");
    }
}

/// A lease whose broker calls hang takes at most its per-lease share of the
/// publish slots (more of its publishes are refused at once), so another
/// lease's publish completes; and renewals of published volumes have slots
/// of their own, so they complete while every fresh slot is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_lease_starves_neither_other_leases_nor_renewals() {
    if skip_unless_root("a_hanging_lease_starves_neither_other_leases_nor_renewals") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let broker = FakeBroker::start().await;
    let mut d = start_driver_with(dir.path(), &broker, |c| {
        c.publish_concurrency = 2;
        c.per_lease_concurrency = 1;
        // No queue: a second publish of a lease with its slot taken is refused at once.
        c.per_lease_waiting = 0;
        c.broker_timeout = Duration::from_secs(4);
    })
    .await;
    let fast1 = target_under(dir.path(), "pod-fast1");
    d.node
        .node_publish_volume(Pub::new("csi-fast1", &fast1).build())
        .await
        .unwrap();

    broker.state.lock().unwrap().hang_leases = ["slow-a".to_owned(), "slow-b".to_owned()].into();
    let client = d.node.clone();
    let hanging = |volume: &str, pod: &str, lease: &str| {
        publish_in_background(&client, lease_pub(dir.path(), volume, pod, lease))
    };
    let slow_a = hanging("csi-slow-a1", "pod-slow-a1", "slow-a");
    // Wait until it is in flight at the broker side (its Issue is pending).
    for _ in 0..500 {
        if broker.hanging() >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(broker.hanging(), 1, "first slow publish in flight");

    // A second publish of the hanging lease: refused at once.
    let err = tokio::time::timeout(
        Duration::from_secs(2),
        d.node.node_publish_volume(lease_pub(
            dir.path(),
            "csi-slow-a2",
            "pod-slow-a2",
            "slow-a",
        )),
    )
    .await
    .expect("refused at once, not queued")
    .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    // Another lease still gets a slot.
    let fast2 = target_under(dir.path(), "pod-fast2");
    tokio::time::timeout(
        Duration::from_secs(2),
        d.node
            .node_publish_volume(Pub::new("csi-fast2", &fast2).build()),
    )
    .await
    .expect("another lease's publish is not starved")
    .unwrap();

    // Every fresh slot taken by hanging leases: renewals still go through.
    let slow_b = hanging("csi-slow-b1", "pod-slow-b1", "slow-b");
    for _ in 0..500 {
        if broker.hanging() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::timeout(
        Duration::from_secs(2),
        d.node
            .node_publish_volume(Pub::new("csi-fast1", &fast1).build()),
    )
    .await
    .expect("a renewal does not wait behind fresh publishes")
    .unwrap();

    for task in [slow_a, slow_b] {
        let err = task.await.unwrap().unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    }
    for (volume, target) in [("csi-fast1", &fast1), ("csi-fast2", &fast2)] {
        d.node
            .node_unpublish_volume(unpublish_req(volume, target))
            .await
            .unwrap();
    }
    d.stop().await;
    unmount_all_under(dir.path());
    assert_no_secrets_in_logs();
}

/// A publish of `volume` for `pod` with `lease`.
fn lease_pub(dir: &Path, volume: &str, pod: &str, lease: &str) -> csi::NodePublishVolumeRequest {
    let target = target_under(dir, pod);
    Pub {
        lease: Some(lease),
        ..Pub::new(volume, &target)
    }
    .build()
}

/// The unpublish of what `request` published.
fn unpublish_of(request: &csi::NodePublishVolumeRequest) -> csi::NodeUnpublishVolumeRequest {
    unpublish_req(&request.volume_id, Path::new(&request.target_path))
}

/// Waits until `count` broker calls hang (`what` names them if they never do).
async fn wait_until_hanging(broker: &FakeBroker, count: usize, what: &str) {
    wait_until(what, Duration::from_secs(10), || async {
        broker.hanging() == count
    })
    .await;
}

/// A lease whose fresh publishes hang (its database stopped answering) still renews
/// its published volumes: renewals have per-lease slots of their own, so they never
/// wait behind the lease's fresh publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_whose_publishes_hang_still_renews_its_volumes() {
    if skip_unless_root("a_lease_whose_publishes_hang_still_renews_its_volumes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let broker = FakeBroker::start().await;
    let mut d = start_driver_with(dir.path(), &broker, |c| {
        c.per_lease_concurrency = 1;
        // No queue: a call that finds its slots taken is refused at once, so
        // sharing the lease's slots with fresh publishes would show as a refusal.
        c.per_lease_waiting = 0;
        c.broker_timeout = Duration::from_secs(3);
    })
    .await;
    let live = lease_pub(dir.path(), "csi-slow-live", "pod-slow-live", "slow");
    d.node.node_publish_volume(live.clone()).await.unwrap();

    broker.state.lock().unwrap().hang_leases = ["slow".to_owned()].into();
    let fresh = lease_pub(dir.path(), "csi-slow-new", "pod-slow-new", "slow");
    let hanging = publish_in_background(&d.node, fresh);
    wait_until_hanging(&broker, 1, "the fresh publish hangs at the broker").await;

    // The lease's only fresh slot is taken: another fresh publish is refused...
    let err = d
        .node
        .node_publish_volume(lease_pub(dir.path(), "csi-slow-2", "pod-slow-2", "slow"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // ... but the renewal of its published volume goes through to the broker.
    let acks = broker.acks();
    d.node
        .node_publish_volume(live.clone())
        .await
        .expect("the lease's renewal does not wait behind its fresh publishes");
    assert_eq!(broker.acks(), acks + 1, "renewed with the broker");

    let err = hanging.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    d.node
        .node_unpublish_volume(unpublish_of(&live))
        .await
        .unwrap();
    d.stop().await;
    unmount_all_under(dir.path());
    assert_no_secrets_in_logs();
}

/// Renewals of three leases whose database hangs take one renewal slot each (a
/// quarter of the node's pool by default), so another lease's renewal still gets
/// the fourth: a few hanging leases cannot starve every other lease's renewals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_leases_leave_renewal_slots_for_other_leases() {
    if skip_unless_root("hanging_leases_leave_renewal_slots_for_other_leases") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let broker = FakeBroker::start().await;
    let mut d = start_driver_with(dir.path(), &broker, |c| {
        // A renewal pool of 4: by default each lease renews with at most 1 of them.
        c.publish_concurrency = 4;
        // No queue: a renewal that finds its lease's slots taken is refused at once.
        c.per_lease_waiting = 0;
        c.broker_timeout = Duration::from_secs(3);
    })
    .await;
    let slow = ["slow-a", "slow-b", "slow-c"];
    let mut published = Vec::new();
    for lease in slow {
        for i in 1..=2 {
            let volume = format!("csi-{lease}{i}");
            let request = lease_pub(dir.path(), &volume, &format!("pod-{lease}{i}"), lease);
            d.node.node_publish_volume(request.clone()).await.unwrap();
            published.push(request);
        }
    }
    let fast = lease_pub(dir.path(), "csi-fast", "pod-fast", "db");
    d.node.node_publish_volume(fast.clone()).await.unwrap();

    // A new version: every renewal now asks the broker for it, and the slow leases'
    // requests hang.
    let newer = broker.bump_version();
    broker.state.lock().unwrap().hang_leases = slow.map(str::to_owned).into();
    let first_renewals: Vec<_> = published
        .iter()
        .step_by(2)
        .map(|request| publish_in_background(&d.node, request.clone()))
        .collect();
    wait_until_hanging(&broker, slow.len(), "one renewal of each slow lease hangs").await;

    // A second renewal of a hanging lease finds the lease's renewal slot taken.
    for request in published.iter().skip(1).step_by(2) {
        let err = d
            .node
            .node_publish_volume(request.clone())
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::ResourceExhausted,
            "{}: {err:?}",
            request.volume_id
        );
    }
    assert_eq!(
        broker.hanging(),
        slow.len(),
        "no more slow renewals in flight"
    );
    // The other lease's renewal takes the slot the hanging leases left.
    d.node
        .node_publish_volume(fast.clone())
        .await
        .expect("the hanging leases left a renewal slot");
    let username = std::fs::read_to_string(Path::new(&fast.target_path).join("username")).unwrap();
    assert_eq!(
        version_of_username(&username),
        newer,
        "renewed to the new version"
    );

    // The hanging renewals give up at the broker deadline and keep their files.
    for renewal in first_renewals {
        renewal.await.unwrap().unwrap();
    }
    for request in published.iter().chain([&fast]) {
        d.node
            .node_unpublish_volume(unpublish_of(request))
            .await
            .unwrap();
    }
    d.stop().await;
    unmount_all_under(dir.path());
    assert_no_secrets_in_logs();
}
