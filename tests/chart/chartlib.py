"""Shared helpers for the Helm chart tests.

Charts are rendered by a real Helm engine (Helm's Go SDK, bundled in the
`helm-python-sdk` wheel) with no cluster and no helm binary. Rendered objects
are checked against the Kubernetes OpenAPI schemas shipped in
`kubernetes-validate`.
"""

from __future__ import annotations

import copy
import pathlib
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "leasehold"
CRDS_CHART = REPO / "charts" / "leasehold-crds"
CRDS_DIR = REPO / "crds"

RELEASE = "lh"
NAMESPACE = "leasehold-system"
FULLNAME = "lh-leasehold"

# Recent Kubernetes minor whose schemas kubernetes-validate ships. Strict mode
# rejects unknown fields as well as wrong types.
KUBE_VERSION = "1.35"

# Kinds that are not core Kubernetes types, so kubernetes-validate has no
# schema for them. ServiceMonitor and PrometheusRule are prometheus-operator
# CRDs; their shape is asserted by hand (test_service_monitor_*,
# test_monitoring.py).
NON_CORE_KINDS = {"ServiceMonitor", "PrometheusRule"}

# Named value sets, each rendered and validated in full. "default" is the
# chart's values.yaml unchanged.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "restricted-namespaces": {"watchNamespaces": ["team-a", "team-b"]},
    "restricted-including-release-ns": {"watchNamespaces": ["team-a", NAMESPACE]},
    "write-namespaces": {"rbac": {"writeNamespaces": ["team-a", "team-b"]}},
    "write-namespaces-including-release-ns": {"rbac": {"writeNamespaces": ["team-a", NAMESPACE]}},
    "broker-tls-existing-secret": {"broker": {"tls": {"existingSecret": "my-broker-tls"}}},
    "custom-kubelet-dir": {
        "node": {"kubeletDir": "/var/lib/k0s/kubelet", "stateDir": "/data/leasehold"}
    },
    "service-monitor": {
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}
    },
    "existing-service-accounts": {
        "serviceAccount": {
            "controller": {"create": False, "name": "ops-leasehold-controller"},
            "node": {"create": False, "name": "ops-leasehold-node"},
        }
    },
    "node-disabled": {"node": {"enabled": False}},
    "encryption-kms": {
        "encryption": {
            "mode": "kms",
            "kms": {
                "keyId": "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
                "region": "eu-west-1",
            },
        },
        "serviceAccount": {
            "controller": {
                "create": True,
                "annotations": {
                    "eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/leasehold"
                },
            }
        },
    },
    "encryption-none": {"encryption": {"mode": "none"}},
    "audit-file-and-webhook": {
        "audit": {
            "log": "/var/log/leasehold/audit.log",
            "webhookUrl": "https://audit.example.com/leasehold",
            "checkpointEvery": 10,
        }
    },
    "monitoring": {
        "monitoring": {
            "dashboards": {"enabled": True, "annotations": {"grafana_folder": "leasehold"}},
            "prometheusRule": {
                "enabled": True,
                "labels": {"release": "prom"},
                "alertLabels": {"team": "platform"},
            },
        }
    },
    "everything": {
        "image": {"digest": "sha256:" + "a" * 64},
        "imagePullSecrets": [{"name": "regcred"}],
        "commonLabels": {"team": "platform"},
        "watchNamespaces": ["apps"],
        "controller": {
            "replicas": 3,
            "priorityClassName": "high",
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops"}],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "ops", "operator": "Exists"}]}
                        ]
                    }
                }
            },
            "extraArgs": ["--verbose"],
            "extraEnv": [{"name": "RUST_LOG", "value": "debug"}],
            "podAnnotations": {"a": "b"},
            "podLabels": {"c": "d"},
        },
        "node": {
            "kubeletDir": "/var/snap/microk8s/common/var/lib/kubelet",
            "priorityClassName": "",
            "tolerations": [],
            "extraArgs": ["--verbose"],
            "livenessProbe": {"port": 19808},
            "perLeaseConcurrency": 6,
            "perLeaseRenewalConcurrency": 2,
            "perLeaseWaiting": 0,
        },
        "csi": {"tokenAudience": "leasehold-broker", "tokenExpirationSeconds": 1800},
        "broker": {"port": 9443, "tls": {"existingSecret": "broker-tls"}},
        "metrics": {"port": 9080, "serviceMonitor": {"enabled": True, "scrapeTimeout": "10s"}},
        "crl": {"port": 9083},
        "acme": {"http01": {"port": 9089}},
        "serviceAccount": {
            "controller": {"create": True, "annotations": {"x": "y"}},
            "node": {"create": False, "name": "existing-node"},
        },
    },
}


class Rendered:
    """The objects one `helm template` produced, with lookups by kind/name."""

    def __init__(self, manifests: dict[str, str], values: dict[str, Any]):
        self.manifests = manifests
        self.values = values
        self.notes = next((v for k, v in manifests.items() if k.endswith("NOTES.txt")), "")
        self.objects: list[dict[str, Any]] = []
        for path, text in sorted(manifests.items()):
            if not path.endswith((".yaml", ".yml")):
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    self.objects.append(doc)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        found = [
            o
            for o in self.of_kind(kind)
            if o["metadata"]["name"] == name
            and (namespace is None or o["metadata"].get("namespace") == namespace)
        ]
        assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
        return found[0]

    def find(self, kind: str, name: str) -> dict[str, Any] | None:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        return found[0] if found else None


def render(
    values: dict[str, Any] | None = None,
    *,
    chart: pathlib.Path = CHART,
    name: str = RELEASE,
    namespace: str = NAMESPACE,
) -> Rendered:
    with helm.Chart.load(chart) as loaded:
        manifests = loaded.render(
            copy.deepcopy(values) if values else None,
            name=name,
            namespace=namespace,
            is_install=True,
        )
    return Rendered(manifests, values or {})


def k8s_validate(obj: dict[str, Any]) -> None:
    """Validate one object against the Kubernetes schemas (strict)."""
    kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in pod_spec["containers"] if c["name"] == name]
    assert len(found) == 1, f"container {name!r} not found"
    return found[0]


def arg_value(args: list[str], flag: str) -> str | None:
    """Value of `flag` in an argv list, as `--flag value` or `--flag=value`."""
    for i, arg in enumerate(args):
        if arg == flag:
            assert i + 1 < len(args), f"{flag} has no value"
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1 :]
    return None
