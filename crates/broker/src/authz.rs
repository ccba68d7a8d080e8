//! Who may have which credential: pure decisions, no I/O.
//!
//! The service gathers the facts (verified tokens, the pod object, the lease,
//! the policy's access rules, namespace labels) and these functions decide.
//! Every refusal is a [`Deny`] with a reason that names objects but never
//! carries a token or a credential.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use leasehold_api::AccessSpec;

/// The service account the node drivers run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeDriverAccount {
    /// Its namespace (where leasehold is installed).
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// The caller, from its verified service-account token.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CallerIdentity {
    /// Service-account namespace.
    pub namespace: String,
    /// Service-account name.
    pub name: String,
    /// The token's `node` claim (Kubernetes ≥ 1.30 for pod-bound tokens).
    pub node_claim: Option<String>,
    /// When the token names no node: the node of the pod it is bound to, as
    /// the pod object says (and only if that pod's UID matched the token).
    pub bound_pod_node: Option<String>,
}

impl CallerIdentity {
    /// The node this caller proves it runs on.
    pub fn node(&self) -> Option<&str> {
        self.node_claim
            .as_deref()
            .or(self.bound_pod_node.as_deref())
            .filter(|n| !n.is_empty())
    }
}

/// A pod as a request or a token names it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodIdentity {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
    /// Service-account name.
    pub service_account: String,
}

/// What the API server says about the pod.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodFacts {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid`.
    pub uid: String,
    /// `spec.serviceAccountName` (`default` when unset).
    pub service_account: String,
    /// `spec.nodeName`, once scheduled.
    pub node_name: Option<String>,
    /// `status.phase`.
    pub phase: Option<String>,
    /// `metadata.deletionTimestamp` is set: the pod is being deleted.
    pub terminating: bool,
    /// Leases (`namespace`, `name`) the pod mounts through leasehold's CSI
    /// driver (its `csi` volumes' `lease` attribute, resolved against its namespace).
    pub csi_leases: Vec<(String, String)>,
}

/// The facts of a `SecretLease` that authorization needs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaseFacts {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `spec.delivery.csi.enabled` (false when `csi` is absent).
    pub csi_enabled: bool,
    /// `spec.perPod`.
    pub per_pod: bool,
}

/// Which part of a pod identity did not match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodField {
    /// Namespace.
    Namespace,
    /// Name.
    Name,
    /// UID.
    Uid,
    /// Service account.
    ServiceAccount,
}

impl fmt::Display for PodField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PodField::Namespace => "namespace",
            PodField::Name => "name",
            PodField::Uid => "uid",
            PodField::ServiceAccount => "service account",
        })
    }
}

/// Why a request is refused (all `PERMISSION_DENIED`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Deny {
    /// The caller is not the node driver's service account.
    #[error("caller {namespace}/{name} is not the node driver's service account")]
    NotNodeDriver {
        /// Caller's namespace.
        namespace: String,
        /// Caller's name.
        name: String,
    },
    /// The node driver's token is bound to no pod.
    #[error("the node driver's token is not bound to a pod")]
    DriverTokenNotBound,
    /// The pod the node driver's token is bound to is gone (or was replaced).
    #[error("the node driver's pod {namespace}/{name} no longer exists")]
    DriverPodGone {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// The pod the node driver's token is bound to is being deleted or has terminated.
    #[error("the node driver's pod {namespace}/{name} is terminating")]
    DriverPodTerminating {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// The caller's token is bound to no node (and no pod with a node).
    #[error("the node driver's token is not bound to a node")]
    CallerNodeUnknown,
    /// The caller runs on another node than the request names.
    #[error("the node driver runs on node {caller_node:?}, not on {requested_node:?}")]
    CallerOnOtherNode {
        /// Where the caller runs.
        caller_node: String,
        /// The node named in the request.
        requested_node: String,
    },
    /// The pod token is bound to another pod than the request names.
    #[error("the pod token is bound to another pod ({0} differs)")]
    PodTokenMismatch(PodField),
    /// The pod object does not match the request (recreated pod, other SA).
    #[error("the pod object does not match the request ({0} differs)")]
    PodMismatch(PodField),
    /// The pod is not scheduled on the node named in the request.
    #[error("pod {namespace}/{name} is not on node {node:?}")]
    PodNotOnNode {
        /// Pod namespace.
        namespace: String,
        /// Pod name.
        name: String,
        /// The node named in the request.
        node: String,
    },
    /// The pod no longer exists.
    #[error("pod {namespace}/{name} does not exist")]
    PodNotFound {
        /// Pod namespace.
        namespace: String,
        /// Pod name.
        name: String,
    },
    /// The pod has terminated.
    #[error("pod {namespace}/{name} has terminated ({phase})")]
    PodTerminated {
        /// Pod namespace.
        namespace: String,
        /// Pod name.
        name: String,
        /// `Succeeded` or `Failed`.
        phase: String,
    },
    /// The lease does not allow CSI delivery.
    #[error("lease {namespace}/{name} does not allow CSI delivery")]
    CsiDisabled {
        /// Lease namespace.
        namespace: String,
        /// Lease name.
        name: String,
    },
    /// The pod's namespace may not use the lease.
    #[error("namespace {pod_namespace} may not use lease {lease_namespace}/{lease_name}")]
    NamespaceNotAllowed {
        /// The pod's namespace.
        pod_namespace: String,
        /// Lease namespace.
        lease_namespace: String,
        /// Lease name.
        lease_name: String,
    },
    /// The pod has no CSI volume of the lease.
    #[error("pod {namespace}/{name} has no leasehold volume of lease {lease}")]
    NoVolumeOfLease {
        /// Pod namespace.
        namespace: String,
        /// Pod name.
        name: String,
        /// `namespace/name` of the lease.
        lease: String,
    },
    /// The pod's service account may not use the lease.
    #[error("service account {namespace}/{name} may not use the lease")]
    ServiceAccountNotAllowed {
        /// SA namespace.
        namespace: String,
        /// SA name.
        name: String,
    },
}

/// The caller is the node driver and runs on `node`.
pub fn authorize_node(
    caller: &CallerIdentity,
    driver: &NodeDriverAccount,
    node: &str,
) -> Result<(), Deny> {
    if caller.namespace != driver.namespace || caller.name != driver.name {
        return Err(Deny::NotNodeDriver {
            namespace: caller.namespace.clone(),
            name: caller.name.clone(),
        });
    }
    let caller_node = caller.node().ok_or(Deny::CallerNodeUnknown)?;
    if caller_node != node {
        return Err(Deny::CallerOnOtherNode {
            caller_node: caller_node.to_owned(),
            requested_node: node.to_owned(),
        });
    }
    Ok(())
}

fn compare(a: &PodIdentity, b: &PodIdentity) -> Option<PodField> {
    if a.namespace != b.namespace {
        Some(PodField::Namespace)
    } else if a.name != b.name {
        Some(PodField::Name)
    } else if a.uid != b.uid {
        Some(PodField::Uid)
    } else if a.service_account != b.service_account {
        Some(PodField::ServiceAccount)
    } else {
        None
    }
}

/// The pod token is bound to exactly the requested pod.
pub fn authorize_pod_token(token: &PodIdentity, requested: &PodIdentity) -> Result<(), Deny> {
    match compare(token, requested) {
        Some(field) => Err(Deny::PodTokenMismatch(field)),
        None => Ok(()),
    }
}

/// The pod object is the requested pod and is scheduled on `node` (alive or
/// not: used by `Release`, which may come after the pod terminated).
pub fn authorize_pod_placement(
    pod: &PodFacts,
    requested: &PodIdentity,
    node: &str,
) -> Result<(), Deny> {
    let actual = PodIdentity {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: pod.uid.clone(),
        service_account: pod.service_account.clone(),
    };
    if let Some(field) = compare(&actual, requested) {
        return Err(Deny::PodMismatch(field));
    }
    if pod.node_name.as_deref() != Some(node) {
        return Err(Deny::PodNotOnNode {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            node: node.to_owned(),
        });
    }
    Ok(())
}

/// The pod object is the requested pod, alive, and scheduled on `node`.
pub fn authorize_pod_on_node(
    pod: &PodFacts,
    requested: &PodIdentity,
    node: &str,
) -> Result<(), Deny> {
    authorize_pod_placement(pod, requested, node)?;
    if let Some(phase) = pod
        .phase
        .as_deref()
        .filter(|p| matches!(*p, "Succeeded" | "Failed"))
    {
        return Err(Deny::PodTerminated {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            phase: phase.to_owned(),
        });
    }
    Ok(())
}

/// Whether `labels` satisfy `selector`, with Kubernetes semantics: every
/// `matchLabels` pair and every expression must hold; an empty selector
/// matches everything; an unknown operator or an `In`/`NotIn` without values
/// matches nothing.
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|req| {
        let values = req.values.as_deref().unwrap_or_default();
        let value = labels.get(&req.key);
        match req.operator.as_str() {
            "In" => !values.is_empty() && value.is_some_and(|v| values.contains(v)),
            "NotIn" => !values.is_empty() && value.is_none_or(|v| !values.contains(v)),
            "Exists" => values.is_empty() && value.is_some(),
            "DoesNotExist" => values.is_empty() && value.is_none(),
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

/// Whether the lease's namespace rules admit `pod_namespace`. `namespace_labels`
/// is `None` when they are unknown (then only a selector cannot match).
pub fn namespace_allowed(
    lease: &LeaseFacts,
    access: &AccessSpec,
    pod_namespace: &str,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> bool {
    pod_namespace == lease.namespace
        || access.namespaces.iter().any(|n| n == pod_namespace)
        || access
            .namespace_selector
            .as_ref()
            .zip(namespace_labels)
            .is_some_and(|(selector, labels)| selector_matches(selector, labels))
}

/// Whether the access rules admit the pod's service account: any, when the
/// list is empty; otherwise `name` (in the pod's namespace) or `namespace/name`.
pub fn service_account_allowed(access: &AccessSpec, pod_namespace: &str, sa: &str) -> bool {
    access.service_accounts.is_empty()
        || access
            .service_accounts
            .iter()
            .any(|entry| match entry.split_once('/') {
                Some((ns, name)) => ns == pod_namespace && name == sa,
                None => entry == sa,
            })
}

/// The lease allows CSI delivery to the pod's namespace and service account.
pub fn authorize_access(
    lease: &LeaseFacts,
    access: &AccessSpec,
    pod: &PodIdentity,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> Result<(), Deny> {
    if !lease.csi_enabled {
        return Err(Deny::CsiDisabled {
            namespace: lease.namespace.clone(),
            name: lease.name.clone(),
        });
    }
    if !namespace_allowed(lease, access, &pod.namespace, namespace_labels) {
        return Err(Deny::NamespaceNotAllowed {
            pod_namespace: pod.namespace.clone(),
            lease_namespace: lease.namespace.clone(),
            lease_name: lease.name.clone(),
        });
    }
    if !service_account_allowed(access, &pod.namespace, &pod.service_account) {
        return Err(Deny::ServiceAccountNotAllowed {
            namespace: pod.namespace.clone(),
            name: pod.service_account.clone(),
        });
    }
    Ok(())
}

/// The pod a node driver's token is bound to (`kubernetes.io.pod`) still
/// exists as that pod (same UID) and is neither being deleted nor terminated,
/// as the pod-token path requires of pods: a token outlives its pod.
/// `pod` is the pod object by the bound name, if any.
pub fn authorize_driver_pod(
    namespace: &str,
    bound: Option<(&str, &str)>,
    pod: Option<&PodFacts>,
) -> Result<(), Deny> {
    let (name, uid) = bound.ok_or(Deny::DriverTokenNotBound)?;
    let gone = || Deny::DriverPodGone {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    };
    let pod = pod.ok_or_else(gone)?;
    if pod.uid != uid {
        return Err(gone());
    }
    let terminated = pod
        .phase
        .as_deref()
        .is_some_and(|p| matches!(p, "Succeeded" | "Failed"));
    if pod.terminating || terminated {
        return Err(Deny::DriverPodTerminating {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// The pod mounts the lease through leasehold's CSI driver.
pub fn authorize_pod_has_volume(pod: &PodFacts, lease: &LeaseFacts) -> Result<(), Deny> {
    if pod
        .csi_leases
        .iter()
        .any(|(ns, name)| *ns == lease.namespace && *name == lease.name)
    {
        Ok(())
    } else {
        Err(Deny::NoVolumeOfLease {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            lease: format!("{}/{}", lease.namespace, lease.name),
        })
    }
}

impl Deny {
    /// Whether the refusal means the pod lost access to the lease (rather
    /// than a request that was never right): its credential is withdrawn.
    pub fn withdraws_access(&self) -> bool {
        matches!(
            self,
            Deny::NamespaceNotAllowed { .. }
                | Deny::ServiceAccountNotAllowed { .. }
                | Deny::CsiDisabled { .. }
        )
    }
}

/// Everything an `Acknowledge` is decided on.
#[derive(Debug, Clone, Copy)]
pub struct AcknowledgeFacts<'a> {
    /// The configured node-driver account.
    pub driver: &'a NodeDriverAccount,
    /// The verified caller.
    pub caller: &'a CallerIdentity,
    /// The pod the request names.
    pub requested: &'a PodIdentity,
    /// The node the request names.
    pub node: &'a str,
    /// The pod object.
    pub pod: &'a PodFacts,
    /// The lease.
    pub lease: &'a LeaseFacts,
    /// The policy's access rules.
    pub access: &'a AccessSpec,
    /// Labels of the pod's namespace, when known.
    pub namespace_labels: Option<&'a BTreeMap<String, String>>,
}

/// The whole `Acknowledge` decision: the caller and the pod as for `Issue`
/// (there is no pod token), the pod has a volume of the lease, and the
/// lease's access rules still admit it.
pub fn authorize_acknowledge(facts: &AcknowledgeFacts<'_>) -> Result<(), Deny> {
    authorize_node(facts.caller, facts.driver, facts.node)?;
    authorize_pod_on_node(facts.pod, facts.requested, facts.node)?;
    authorize_pod_has_volume(facts.pod, facts.lease)?;
    authorize_access(
        facts.lease,
        facts.access,
        facts.requested,
        facts.namespace_labels,
    )
}

/// Everything an `Issue` is decided on.
#[derive(Debug, Clone, Copy)]
pub struct IssueFacts<'a> {
    /// The configured node-driver account.
    pub driver: &'a NodeDriverAccount,
    /// The verified caller.
    pub caller: &'a CallerIdentity,
    /// The pod the verified pod token is bound to.
    pub pod_token: &'a PodIdentity,
    /// The pod the request names.
    pub requested: &'a PodIdentity,
    /// The node the request names.
    pub node: &'a str,
    /// The pod object.
    pub pod: &'a PodFacts,
    /// The lease.
    pub lease: &'a LeaseFacts,
    /// The policy's access rules.
    pub access: &'a AccessSpec,
    /// Labels of the pod's namespace, when known.
    pub namespace_labels: Option<&'a BTreeMap<String, String>>,
}

/// The whole `Issue` decision, checks in order: caller, pod token, pod object
/// and node, lease and access rules.
pub fn authorize_issue(facts: &IssueFacts<'_>) -> Result<(), Deny> {
    authorize_node(facts.caller, facts.driver, facts.node)?;
    authorize_pod_token(facts.pod_token, facts.requested)?;
    authorize_pod_on_node(facts.pod, facts.requested, facts.node)?;
    authorize_access(
        facts.lease,
        facts.access,
        facts.requested,
        facts.namespace_labels,
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn driver() -> NodeDriverAccount {
        NodeDriverAccount {
            namespace: "leasehold-system".into(),
            name: "leasehold-csi".into(),
        }
    }

    fn caller() -> CallerIdentity {
        CallerIdentity {
            namespace: "leasehold-system".into(),
            name: "leasehold-csi".into(),
            node_claim: Some("node-a".into()),
            bound_pod_node: None,
        }
    }

    fn pod_id() -> PodIdentity {
        PodIdentity {
            namespace: "shop".into(),
            name: "web-0".into(),
            uid: "uid-web-0".into(),
            service_account: "web".into(),
        }
    }

    fn pod_facts() -> PodFacts {
        PodFacts {
            namespace: "shop".into(),
            name: "web-0".into(),
            uid: "uid-web-0".into(),
            service_account: "web".into(),
            node_name: Some("node-a".into()),
            phase: Some("Pending".into()),
            terminating: false,
            csi_leases: vec![("shop".into(), "db".into())],
        }
    }

    #[test]
    fn driver_pod_must_exist_and_be_alive() {
        let ns = "leasehold-system";
        let alive = PodFacts {
            namespace: ns.into(),
            name: "csi-x".into(),
            uid: "u1".into(),
            phase: Some("Running".into()),
            ..PodFacts::default()
        };
        let bound = Some(("csi-x", "u1"));
        assert_eq!(authorize_driver_pod(ns, bound, Some(&alive)), Ok(()));
        assert_eq!(
            authorize_driver_pod(ns, None, Some(&alive)),
            Err(Deny::DriverTokenNotBound)
        );
        assert!(matches!(
            authorize_driver_pod(ns, bound, None),
            Err(Deny::DriverPodGone { .. })
        ));
        assert!(matches!(
            authorize_driver_pod(ns, Some(("csi-x", "u0")), Some(&alive)),
            Err(Deny::DriverPodGone { .. })
        ));
        let deleting = PodFacts {
            terminating: true,
            ..alive.clone()
        };
        assert!(matches!(
            authorize_driver_pod(ns, bound, Some(&deleting)),
            Err(Deny::DriverPodTerminating { .. })
        ));
        let failed = PodFacts {
            phase: Some("Failed".into()),
            ..alive
        };
        assert!(matches!(
            authorize_driver_pod(ns, bound, Some(&failed)),
            Err(Deny::DriverPodTerminating { .. })
        ));
    }

    #[test]
    fn acknowledge_needs_a_volume_of_the_lease_and_access() {
        let (d, c, p, l) = (driver(), caller(), pod_id(), lease());
        let access = AccessSpec::default();
        let pf = pod_facts();
        let facts = AcknowledgeFacts {
            driver: &d,
            caller: &c,
            requested: &p,
            node: "node-a",
            pod: &pf,
            lease: &l,
            access: &access,
            namespace_labels: None,
        };
        assert_eq!(authorize_acknowledge(&facts), Ok(()));
        let other = PodFacts {
            csi_leases: vec![
                ("shop".into(), "other".into()),
                ("billing".into(), "db".into()),
            ],
            ..pod_facts()
        };
        let err = authorize_acknowledge(&AcknowledgeFacts {
            pod: &other,
            ..facts
        })
        .unwrap_err();
        assert!(matches!(err, Deny::NoVolumeOfLease { .. }), "{err}");
        assert!(!err.withdraws_access());
        let only_api: AccessSpec =
            serde_json::from_value(serde_json::json!({"serviceAccounts": ["api"]})).unwrap();
        let err = authorize_acknowledge(&AcknowledgeFacts {
            access: &only_api,
            ..facts
        })
        .unwrap_err();
        assert!(
            matches!(err, Deny::ServiceAccountNotAllowed { .. }),
            "{err}"
        );
        assert!(err.withdraws_access());
        let no_csi = LeaseFacts {
            csi_enabled: false,
            ..lease()
        };
        let err = authorize_acknowledge(&AcknowledgeFacts {
            lease: &no_csi,
            ..facts
        })
        .unwrap_err();
        assert!(err.withdraws_access());
    }

    fn lease() -> LeaseFacts {
        LeaseFacts {
            namespace: "shop".into(),
            name: "db".into(),
            csi_enabled: true,
            per_pod: false,
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| (*v).into()).collect()),
        }
    }

    /// One scenario: start from an allowed request and change one thing.
    struct Case {
        name: &'static str,
        caller: CallerIdentity,
        token: PodIdentity,
        requested: PodIdentity,
        node: &'static str,
        pod: PodFacts,
        lease: LeaseFacts,
        access: AccessSpec,
        ns_labels: Option<BTreeMap<String, String>>,
    }

    fn base(name: &'static str) -> Case {
        Case {
            name,
            caller: caller(),
            token: pod_id(),
            requested: pod_id(),
            node: "node-a",
            pod: pod_facts(),
            lease: lease(),
            access: AccessSpec::default(),
            ns_labels: None,
        }
    }

    fn in_namespace(mut c: Case, ns: &str) -> Case {
        c.token.namespace = ns.into();
        c.requested.namespace = ns.into();
        c.pod.namespace = ns.into();
        c
    }

    fn decide(c: &Case) -> Result<(), Deny> {
        authorize_issue(&IssueFacts {
            driver: &driver(),
            caller: &c.caller,
            pod_token: &c.token,
            requested: &c.requested,
            node: c.node,
            pod: &c.pod,
            lease: &c.lease,
            access: &c.access,
            namespace_labels: c.ns_labels.as_ref(),
        })
    }

    #[test]
    fn issue_decisions() {
        type Expect = fn(&Deny) -> bool;
        let mut refused: Vec<(Case, Expect)> = Vec::new();

        let mut c = base("pod on another node");
        c.pod.node_name = Some("node-b".into());
        refused.push((c, |d| matches!(d, Deny::PodNotOnNode { .. })));

        let mut c = base("pod not scheduled yet");
        c.pod.node_name = None;
        refused.push((c, |d| matches!(d, Deny::PodNotOnNode { .. })));

        let mut c = base("node driver token bound to another node");
        c.caller.node_claim = Some("node-b".into());
        refused.push((c, |d| matches!(d, Deny::CallerOnOtherNode { .. })));

        let mut c = base("node driver bound pod on another node");
        c.caller.node_claim = None;
        c.caller.bound_pod_node = Some("node-b".into());
        refused.push((c, |d| matches!(d, Deny::CallerOnOtherNode { .. })));

        let mut c = base("node driver token without node");
        c.caller.node_claim = None;
        refused.push((c, |d| *d == Deny::CallerNodeUnknown));

        let mut c = base("caller is another service account");
        c.caller.name = "default".into();
        refused.push((c, |d| matches!(d, Deny::NotNodeDriver { .. })));

        let mut c = base("caller in another namespace");
        c.caller.namespace = "shop".into();
        refused.push((c, |d| matches!(d, Deny::NotNodeDriver { .. })));

        for (name, field) in [
            ("pod token uid", PodField::Uid),
            ("pod token name", PodField::Name),
            ("pod token namespace", PodField::Namespace),
            ("pod token service account", PodField::ServiceAccount),
        ] {
            let mut c = base(name);
            match field {
                PodField::Uid => c.token.uid = "other".into(),
                PodField::Name => c.token.name = "other".into(),
                PodField::Namespace => c.token.namespace = "other".into(),
                PodField::ServiceAccount => c.token.service_account = "other".into(),
            }
            let expect: Expect = match field {
                PodField::Uid => |d| *d == Deny::PodTokenMismatch(PodField::Uid),
                PodField::Name => |d| *d == Deny::PodTokenMismatch(PodField::Name),
                PodField::Namespace => |d| *d == Deny::PodTokenMismatch(PodField::Namespace),
                PodField::ServiceAccount => {
                    |d| *d == Deny::PodTokenMismatch(PodField::ServiceAccount)
                }
            };
            refused.push((c, expect));
        }

        let mut c = base("recreated pod (uid differs from the object)");
        c.pod.uid = "uid-new".into();
        refused.push((c, |d| *d == Deny::PodMismatch(PodField::Uid)));

        let mut c = base("pod object runs as another service account");
        c.pod.service_account = "admin".into();
        refused.push((c, |d| *d == Deny::PodMismatch(PodField::ServiceAccount)));

        let mut c = base("terminated pod");
        c.pod.phase = Some("Succeeded".into());
        refused.push((c, |d| matches!(d, Deny::PodTerminated { .. })));

        let mut c = base("csi disabled");
        c.lease.csi_enabled = false;
        refused.push((c, |d| matches!(d, Deny::CsiDisabled { .. })));

        let mut c = base("service account outside access");
        c.access.service_accounts = vec!["api".into(), "shop/worker".into()];
        refused.push((c, |d| matches!(d, Deny::ServiceAccountNotAllowed { .. })));

        let mut c = base("ns/name entry for another namespace");
        c.access.service_accounts = vec!["other/web".into()];
        refused.push((c, |d| matches!(d, Deny::ServiceAccountNotAllowed { .. })));

        let c = in_namespace(base("other namespace, not listed"), "billing");
        refused.push((c, |d| matches!(d, Deny::NamespaceNotAllowed { .. })));

        let mut c = in_namespace(base("other namespace, selector mismatch"), "billing");
        c.access.namespaces = vec!["analytics".into()];
        c.access.namespace_selector = Some(LabelSelector {
            match_labels: Some(labels(&[("team", "shop")])),
            match_expressions: None,
        });
        c.ns_labels = Some(labels(&[("team", "billing")]));
        refused.push((c, |d| matches!(d, Deny::NamespaceNotAllowed { .. })));

        let mut c = in_namespace(base("selector but labels unknown"), "billing");
        c.access.namespace_selector = Some(LabelSelector::default());
        refused.push((c, |d| matches!(d, Deny::NamespaceNotAllowed { .. })));

        let mut c = in_namespace(base("name-only SA entry in other namespace"), "billing");
        c.access.namespaces = vec!["billing".into()];
        c.access.service_accounts = vec!["shop/web".into()];
        refused.push((c, |d| matches!(d, Deny::ServiceAccountNotAllowed { .. })));

        for (case, expect) in &refused {
            match decide(case) {
                Ok(()) => panic!("{}: allowed, expected a refusal", case.name),
                Err(deny) => assert!(expect(&deny), "{}: wrong reason {deny:?}", case.name),
            }
        }

        let mut allowed = vec![base("same namespace")];

        let mut c = base("node from the bound pod");
        c.caller.node_claim = None;
        c.caller.bound_pod_node = Some("node-a".into());
        allowed.push(c);

        let mut c = in_namespace(base("listed namespace"), "billing");
        c.access.namespaces = vec!["billing".into()];
        allowed.push(c);

        let mut c = in_namespace(base("selector match"), "billing");
        c.access.namespace_selector = Some(LabelSelector {
            match_labels: Some(labels(&[("team", "shop")])),
            match_expressions: Some(vec![
                expr("env", "In", &["prod", "staging"]),
                expr("tier", "Exists", &[]),
                expr("quarantine", "DoesNotExist", &[]),
                expr("region", "NotIn", &["eu"]),
            ]),
        });
        c.ns_labels = Some(labels(&[("team", "shop"), ("env", "prod"), ("tier", "db")]));
        allowed.push(c);

        let mut c = in_namespace(base("ns/name service account"), "billing");
        c.access.namespaces = vec!["billing".into()];
        c.access.service_accounts = vec!["billing/web".into()];
        allowed.push(c);

        let mut c = base("name service account in the pod's namespace");
        c.access.service_accounts = vec!["api".into(), "web".into()];
        allowed.push(c);

        let mut c = base("running pod");
        c.pod.phase = Some("Running".into());
        allowed.push(c);

        for case in &allowed {
            assert_eq!(decide(case), Ok(()), "{}", case.name);
        }
    }

    #[test]
    fn selector_semantics() {
        let l = labels(&[("a", "1"), ("b", "2")]);
        let sel = |exprs: Vec<LabelSelectorRequirement>| LabelSelector {
            match_labels: None,
            match_expressions: Some(exprs),
        };
        assert!(selector_matches(&LabelSelector::default(), &l));
        assert!(selector_matches(
            &sel(vec![expr("a", "In", &["1", "3"])]),
            &l
        ));
        assert!(!selector_matches(&sel(vec![expr("a", "In", &["3"])]), &l));
        assert!(!selector_matches(&sel(vec![expr("z", "In", &["1"])]), &l));
        assert!(!selector_matches(&sel(vec![expr("a", "In", &[])]), &l));
        assert!(selector_matches(&sel(vec![expr("a", "NotIn", &["3"])]), &l));
        assert!(selector_matches(&sel(vec![expr("z", "NotIn", &["3"])]), &l));
        assert!(!selector_matches(
            &sel(vec![expr("a", "NotIn", &["1"])]),
            &l
        ));
        assert!(selector_matches(&sel(vec![expr("b", "Exists", &[])]), &l));
        assert!(!selector_matches(&sel(vec![expr("z", "Exists", &[])]), &l));
        assert!(!selector_matches(
            &sel(vec![expr("b", "Exists", &["2"])]),
            &l
        ));
        assert!(selector_matches(
            &sel(vec![expr("z", "DoesNotExist", &[])]),
            &l
        ));
        assert!(!selector_matches(
            &sel(vec![expr("a", "DoesNotExist", &[])]),
            &l
        ));
        assert!(!selector_matches(&sel(vec![expr("a", "Gt", &["0"])]), &l));
        let both = LabelSelector {
            match_labels: Some(labels(&[("a", "1")])),
            match_expressions: Some(vec![expr("b", "In", &["9"])]),
        };
        assert!(!selector_matches(&both, &l));
    }

    #[test]
    fn deny_messages_name_objects_only() {
        let d = Deny::PodNotOnNode {
            namespace: "shop".into(),
            name: "web-0".into(),
            node: "node-a".into(),
        };
        assert_eq!(d.to_string(), "pod shop/web-0 is not on node \"node-a\"");
        assert_eq!(
            Deny::PodTokenMismatch(PodField::Uid).to_string(),
            "the pod token is bound to another pod (uid differs)"
        );
    }
}
