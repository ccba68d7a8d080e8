"""Tests of charts/leasehold rendered by a real Helm engine."""

from __future__ import annotations

import json
import pathlib
import posixpath
import sys
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from chartlib import (  # noqa: E402
    CHART,
    FULLNAME,
    NAMESPACE,
    NON_CORE_KINDS,
    RELEASE,
    VALUE_SETS,
    Rendered,
    arg_value,
    container,
    k8s_validate,
    render,
)

ALL_SETS = sorted(VALUE_SETS)
NODE_SETS = [name for name in ALL_SETS if name != "node-disabled"]

DRIVER = "csi.leasehold.dev"
CONTROLLER = f"{FULLNAME}-controller"
NODE = f"{FULLNAME}-node"


def controller_pod(r: Rendered) -> dict[str, Any]:
    return r.get("Deployment", CONTROLLER)["spec"]["template"]


def node_pod(r: Rendered) -> dict[str, Any]:
    return r.get("DaemonSet", NODE)["spec"]["template"]


def merged_values(overrides: dict[str, Any]) -> dict[str, Any]:
    with helm.Chart.load(CHART) as chart:
        return chart.merge_values(overrides)


def kubelet_dir(values: dict[str, Any]) -> str:
    return merged_values(values)["node"]["kubeletDir"].rstrip("/")


def host_path_of(pod_spec: dict[str, Any], ctr: dict[str, Any], path: str) -> str | None:
    """Map a path inside `ctr` to the node path it reaches through a hostPath
    volume, or None when it is not on a hostPath."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    best: tuple[int, str] | None = None
    for mount in ctr.get("volumeMounts", []):
        mount_path = mount["mountPath"].rstrip("/")
        if path != mount_path and not path.startswith(mount_path + "/"):
            continue
        volume = volumes[mount["name"]]
        if "hostPath" not in volume:
            continue
        rest = path[len(mount_path) :]
        candidate = volume["hostPath"]["path"].rstrip("/") + rest
        if best is None or len(mount_path) > best[0]:
            best = (len(mount_path), candidate)
    return best[1] if best else None


# --------------------------------------------------------------------------
# Lint and schema validity of every rendered object
# --------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", ALL_SETS)
def test_helm_lint_is_clean(value_set: str) -> None:
    report = helm.lint(
        CHART, VALUE_SETS[value_set] or None, strict=True, namespace=NAMESPACE
    )
    assert report["errors"] == [], report
    # Severity 1 is informational ("icon is recommended"); warnings fail.
    serious = [m for m in report["messages"] if m["severity"] >= 2]
    assert serious == [], serious


@pytest.mark.parametrize("value_set", ALL_SETS)
def test_every_object_validates_against_kubernetes_schemas(
    rendered_sets: dict[str, Rendered], value_set: str
) -> None:
    r = rendered_sets[value_set]
    assert r.objects, "nothing rendered"
    skipped = []
    for obj in r.objects:
        if obj["kind"] in NON_CORE_KINDS:
            skipped.append(obj["kind"])
            continue
        try:
            k8s_validate(obj)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {err.message}")
    # ServiceMonitor is the only kind allowed to skip validation.
    assert set(skipped) <= NON_CORE_KINDS


def test_validator_rejects_a_broken_object(default: Rendered) -> None:
    # Guard against a validator that silently accepts everything.
    deployment = json.loads(json.dumps(default.get("Deployment", CONTROLLER)))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(deployment)
    deployment["spec"]["replicas"] = 2
    deployment["spec"]["template"]["spec"]["containers"][0]["unknownField"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(deployment)


@pytest.mark.parametrize("value_set", ALL_SETS)
def test_common_labels_and_namespaces(rendered_sets: dict[str, Rendered], value_set: str) -> None:
    r = rendered_sets[value_set]
    watched = set(VALUE_SETS[value_set].get("watchNamespaces", []))
    watched |= set(VALUE_SETS[value_set].get("rbac", {}).get("writeNamespaces", []))
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "CSIDriver"}
    for obj in r.objects:
        meta = obj["metadata"]
        labels = meta.get("labels", {})
        for key in (
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/managed-by",
            "app.kubernetes.io/version",
            "app.kubernetes.io/part-of",
            "helm.sh/chart",
        ):
            assert key in labels, f"{obj['kind']}/{meta['name']} lacks label {key}"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        if obj["kind"] in cluster_scoped:
            assert "namespace" not in meta
        elif obj["kind"] == "RoleBinding" and meta["namespace"] in watched:
            pass
        elif meta["name"] == f"{FULLNAME}-controller-cluster-events":
            # Events about cluster-scoped objects land in "default" (writeNamespaces).
            assert obj["kind"] in {"Role", "RoleBinding"} and meta["namespace"] == "default"
        else:
            assert meta.get("namespace") == NAMESPACE, f"{obj['kind']}/{meta['name']}"
    names = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in r.objects]
    assert len(names) == len(set(names)), "duplicate objects"


def test_names_fit_in_63_characters_for_long_release_names() -> None:
    r = render(name="a-very-long-release-name-for-testing-the-truncation-logic-x")
    for obj in r.objects:
        name = obj["metadata"]["name"]
        assert len(name) <= 63, name
        for value in obj["metadata"].get("labels", {}).values():
            assert len(value) <= 63, value
        if obj["kind"] in {"Service", "ServiceAccount", "Deployment", "DaemonSet"}:
            assert not name.endswith("-") and "--" not in name, name


# --------------------------------------------------------------------------
# CSIDriver
# --------------------------------------------------------------------------


def test_csidriver_fields(default: Rendered) -> None:
    csidriver = default.get("CSIDriver", DRIVER)
    assert csidriver["apiVersion"] == "storage.k8s.io/v1"
    assert csidriver["spec"] == {
        "attachRequired": False,
        "podInfoOnMount": True,
        "volumeLifecycleModes": ["Ephemeral"],
        "tokenRequests": [{"audience": "csi.leasehold.dev", "expirationSeconds": 3600}],
        "requiresRepublish": True,
        "fsGroupPolicy": "File",
    }


@pytest.mark.parametrize("value_set", NODE_SETS)
def test_token_audience_matches_between_csidriver_and_node(
    rendered_sets: dict[str, Rendered], value_set: str
) -> None:
    r = rendered_sets[value_set]
    audience = merged_values(VALUE_SETS[value_set])["csi"]["tokenAudience"]
    requests = r.get("CSIDriver", DRIVER)["spec"]["tokenRequests"]
    assert [t["audience"] for t in requests] == [audience]
    driver = container(node_pod(r)["spec"], "leasehold")
    assert arg_value(driver["args"], "--token-audience") == audience
    # The broker re-verifies the same pod tokens: one setting configures both.
    controller = container(controller_pod(r)["spec"], "controller")
    assert arg_value(controller["args"], "--pod-token-audience") == audience


def test_node_disabled_renders_no_node_objects(rendered_sets: dict[str, Rendered]) -> None:
    r = rendered_sets["node-disabled"]
    assert r.of_kind("DaemonSet") == []
    assert r.of_kind("CSIDriver") == []
    assert r.find("ClusterRole", NODE) is None
    assert r.find("ServiceAccount", NODE) is None
    assert r.of_kind("Deployment"), "the controller must still render"


# --------------------------------------------------------------------------
# Controller
# --------------------------------------------------------------------------


def test_controller_defaults(default: Rendered) -> None:
    deployment = default.get("Deployment", CONTROLLER)
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]
    ctr = container(pod["spec"], "controller")
    assert ctr["image"] == "ghcr.io/leasehold-dev/leasehold:0.1.0"
    assert ctr["args"] == [
        "controller",
        "--metrics-addr", "0.0.0.0:8080",
        "--broker-addr", "0.0.0.0:8443",
        "--crl-addr", "0.0.0.0:8083",
        "--acme-http01-addr", "0.0.0.0:8089",
        "--leader-election-namespace", NAMESPACE,
        "--leader-election-lease", f"{FULLNAME}-controller",
        "--broker-ca-configmap", f"{FULLNAME}-broker-ca",
        "--broker-tls-generated-secret", f"{FULLNAME}-broker-tls",
        "--broker-service", f"{FULLNAME}-broker",
        "--broker-token-audience", "leasehold-broker",
        "--pod-token-audience", "csi.leasehold.dev",
        "--node-service-account", f"{FULLNAME}-node",
        "--broker-max-concurrent-issues-per-lease", "8",
        "--broker-max-per-pod-users-per-lease", "1000",
        "--broker-max-connections", "1024",
        "--per-pod-sweep-seconds", "300",
        "--encryption", "local",
        "--local-key-secret", "leasehold-kek",
        "--local-key-secret-create",
        "--data-key-cache-ttl-seconds", "300",
        "--audit-log", "-",
        "--audit-signing-key-secret", "leasehold-audit-signing-key",
        "--audit-checkpoint-configmap", "leasehold-audit-checkpoint",
        "--audit-checkpoint-every", "100",
        "--log-format", "json",
    ]  # fmt: skip
    ports = {p["name"]: p["containerPort"] for p in ctr["ports"]}
    assert ports == {"metrics": 8080, "broker": 8443, "crl": 8083, "acme-http01": 8089}
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in ctr["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    assert ctr["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert ctr["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert ctr["resources"]["requests"] and ctr["resources"]["limits"]
    assert pod["spec"]["serviceAccountName"] == f"{FULLNAME}-controller"


@pytest.mark.parametrize("value_set", ALL_SETS)
def test_controller_is_non_root_with_read_only_rootfs(
    rendered_sets: dict[str, Rendered], value_set: str
) -> None:
    spec = controller_pod(rendered_sets[value_set])["spec"]
    pod_sc = spec["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc["runAsUser"] == 65532
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    for ctr in spec["containers"]:
        sc = ctr["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc["runAsUser"] == 65532
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc.get("privileged", False) is False
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not any("hostPath" in v for v in spec.get("volumes", []))
    assert not spec.get("hostNetwork") and not spec.get("hostPID")


def test_controller_pdb_and_anti_affinity(default: Rendered) -> None:
    pod = controller_pod(default)
    pdb = default.get("PodDisruptionBudget", CONTROLLER)
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    terms = pod["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert len(terms) == 1
    term = terms[0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in pod["spec"]["affinity"][
        "podAntiAffinity"
    ]


def test_controller_scheduling_overrides(rendered_sets: dict[str, Rendered]) -> None:
    r = rendered_sets["everything"]
    values = VALUE_SETS["everything"]["controller"]
    spec = controller_pod(r)["spec"]
    assert r.get("Deployment", CONTROLLER)["spec"]["replicas"] == 3
    assert spec["affinity"] == values["affinity"]
    assert spec["tolerations"] == values["tolerations"]
    assert spec["priorityClassName"] == "high"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    ctr = container(spec, "controller")
    assert ctr["image"] == "ghcr.io/leasehold-dev/leasehold@sha256:" + "a" * 64
    assert ctr["args"][-1] == "--verbose"
    assert {"name": "RUST_LOG", "value": "debug"} in ctr["env"]
    assert controller_pod(r)["metadata"]["labels"]["c"] == "d"
    assert controller_pod(r)["metadata"]["annotations"] == {"a": "b"}


def test_broker_limits_are_passed_to_the_controller() -> None:
    r = render(
        {"broker": {"limits": {"maxConcurrentIssuesPerLease": 3, "maxPerPodUsersPerLease": 40}}}
    )
    args = container(controller_pod(r)["spec"], "controller")["args"]
    assert arg_value(args, "--broker-max-concurrent-issues-per-lease") == "3"
    assert arg_value(args, "--broker-max-per-pod-users-per-lease") == "40"
    r = render({"broker": {"limits": {"maxConnections": 64}, "perPodSweepSeconds": 60}})
    args = container(controller_pod(r)["spec"], "controller")["args"]
    assert arg_value(args, "--broker-max-connections") == "64"
    assert arg_value(args, "--per-pod-sweep-seconds") == "60"


def test_broker_network_policy_admits_only_node_drivers(default: Rendered) -> None:
    policy = default.get("NetworkPolicy", f"{FULLNAME}-controller")
    assert policy["metadata"]["namespace"] == NAMESPACE
    controller_labels = controller_pod(default)["metadata"]["labels"]
    node_labels = node_pod(default)["metadata"]["labels"]
    spec = policy["spec"]
    selector = spec["podSelector"]["matchLabels"]
    assert selector.items() <= controller_labels.items()
    assert spec["policyTypes"] == ["Ingress"]
    broker_rule, metrics_rule, crl_rule, acme_rule = spec["ingress"]
    assert broker_rule["ports"] == [{"protocol": "TCP", "port": 8443}]
    (peer,) = broker_rule["from"]
    assert set(peer) == {"podSelector"}, "same namespace only"
    drivers = peer["podSelector"]["matchLabels"]
    assert drivers.items() <= node_labels.items()
    assert not drivers.items() <= controller_labels.items(), "selects node drivers only"
    assert metrics_rule == {"ports": [{"protocol": "TCP", "port": 8080}]}
    # Relying parties anywhere fetch CRLs and CA certificates.
    assert crl_rule == {"ports": [{"protocol": "TCP", "port": 8083}]}
    # The ACME CA validates HTTP-01 challenges from anywhere (through an Ingress).
    assert acme_rule == {"ports": [{"protocol": "TCP", "port": 8089}]}
    ports = {p["containerPort"] for p in container(controller_pod(default)["spec"], "controller")["ports"]}
    assert ports == {8443, 8080, 8083, 8089}


def test_broker_network_policy_follows_ports_and_can_be_disabled() -> None:
    r = render(
        {
            "broker": {"port": 9443},
            "metrics": {"port": 9080},
            "crl": {"port": 9083},
            "acme": {"http01": {"port": 9089}},
        }
    )
    policy = r.get("NetworkPolicy", f"{FULLNAME}-controller")
    assert [rule["ports"][0]["port"] for rule in policy["spec"]["ingress"]] == [
        9443,
        9080,
        9083,
        9089,
    ]
    r = render({"broker": {"networkPolicy": {"enabled": False}}})
    assert r.of_kind("NetworkPolicy") == []


def test_pdb_can_be_disabled() -> None:
    r = render({"controller": {"podDisruptionBudget": {"enabled": False}}})
    assert r.of_kind("PodDisruptionBudget") == []


@pytest.mark.parametrize("value_set", ALL_SETS)
def test_services_target_controller_ports(
    rendered_sets: dict[str, Rendered], value_set: str
) -> None:
    r = rendered_sets[value_set]
    values = merged_values(VALUE_SETS[value_set])
    pod = controller_pod(r)
    ctr = container(pod["spec"], "controller")
    ports = {p["name"]: p["containerPort"] for p in ctr["ports"]}
    expected = {
        f"{FULLNAME}-broker": ("broker", values["broker"]["port"]),
        f"{FULLNAME}-metrics": ("metrics", values["metrics"]["port"]),
        f"{FULLNAME}-crl": ("crl", values["crl"]["port"]),
    }
    for name, (target, port) in expected.items():
        svc = r.get("Service", name)
        assert svc["spec"]["type"] == "ClusterIP"
        selector = dict(svc["spec"]["selector"])
        if target in ("broker", "crl"):
            # Only the elected leader (which labels its own pod) serves the broker
            # and holds the current CRLs.
            assert selector.pop("leasehold.dev/leader") == "true"
        assert selector.items() <= pod["metadata"]["labels"].items()
        assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(port, target)]
        assert ports[target] == port
    # The ACME CA reaches the solver on port 80, on the leader (it holds the tokens).
    solver = r.get("Service", f"{FULLNAME}-acme-solver")
    assert solver["spec"]["type"] == "ClusterIP"
    selector = dict(solver["spec"]["selector"])
    assert selector.pop("leasehold.dev/leader") == "true"
    assert selector.items() <= pod["metadata"]["labels"].items()
    assert [(p["port"], p["targetPort"]) for p in solver["spec"]["ports"]] == [(80, "acme-http01")]
    assert ports["acme-http01"] == values["acme"]["http01"]["port"]
    assert (
        arg_value(ctr["args"], "--acme-http01-addr")
        == f"0.0.0.0:{values['acme']['http01']['port']}"
    )
    assert arg_value(ctr["args"], "--broker-addr") == f"0.0.0.0:{values['broker']['port']}"
    assert arg_value(ctr["args"], "--metrics-addr") == f"0.0.0.0:{values['metrics']['port']}"
    assert arg_value(ctr["args"], "--crl-addr") == f"0.0.0.0:{values['crl']['port']}"


# --------------------------------------------------------------------------
# Node DaemonSet
# --------------------------------------------------------------------------


def test_node_defaults(default: Rendered) -> None:
    spec = node_pod(default)["spec"]
    driver = container(spec, "leasehold")
    assert driver["image"] == "ghcr.io/leasehold-dev/leasehold:0.1.0"
    assert driver["args"] == [
        "node",
        "--csi-socket", "/csi/csi.sock",
        "--node-name", "$(NODE_NAME)",
        "--broker-url", f"https://{FULLNAME}-broker.{NAMESPACE}.svc:8443",
        "--broker-ca", "/etc/leasehold/broker-ca/ca.crt",
        "--token-audience", "csi.leasehold.dev",
        "--node-token", "/var/run/secrets/leasehold/broker-token/token",
        "--state-dir", "/var/lib/leasehold",
        "--kubelet-dir", "/var/lib/kubelet",
        "--metrics-addr", "0.0.0.0:9090",
        "--log-format", "json",
        "--per-lease-concurrency", "8",
        "--per-lease-waiting", "512",
    ]  # fmt: skip
    env = {e["name"]: e for e in driver["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["serviceAccountName"] == f"{FULLNAME}-node"
    assert [c["name"] for c in spec["containers"]] == [
        "leasehold",
        "node-driver-registrar",
        "livenessprobe",
    ]
    registrar = container(spec, "node-driver-registrar")
    assert registrar["image"].startswith("registry.k8s.io/sig-storage/csi-node-driver-registrar:")
    probe = container(spec, "livenessprobe")
    assert probe["image"].startswith("registry.k8s.io/sig-storage/livenessprobe:")
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["state-dir"]["hostPath"]["path"] == "/var/lib/leasehold"
    # The driver's identity towards the broker: a token for the broker's audience only.
    token_source = volumes["broker-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token_source["audience"] == "leasehold-broker"
    assert token_source["expirationSeconds"] == 3600
    assert volumes["registration-dir"]["hostPath"]["path"] == "/var/lib/kubelet/plugins_registry"


@pytest.mark.parametrize("value_set", NODE_SETS)
def test_node_driver_is_privileged_and_sidecars_are_not(
    rendered_sets: dict[str, Rendered], value_set: str
) -> None:
    spec = node_pod(rendered_sets[value_set])["spec"]
    driver = container(spec, "leasehold")
    assert driver["securityContext"]["privileged"] is True
    assert driver["securityContext"]["runAsUser"] == 0
    for name in ("node-driver-registrar", "livenessprobe"):
        sc = container(spec, name)["securityContext"]
        assert sc.get("privileged", False) is False
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}


@pytest.mark.parametrize("value_set", NODE_SETS)
def test_pods_dir_is_mounted_bidirectional_at_the_host_path(
    rendered_sets: dict[str, Rendered], value_set: str
) -> None:
    spec = node_pod(rendered_sets[value_set])["spec"]
    pods_dir = kubelet_dir(VALUE_SETS[value_set]) + "/pods"
    driver = container(spec, "leasehold")
    mounts = [m for m in driver["volumeMounts"] if m["mountPath"] == pods_dir]
    assert len(mounts) == 1, f"no mount at {pods_dir}"
    assert mounts[0]["mountPropagation"] == "Bidirectional"
    # The kubelet hands over host paths: the mount must be at the same path.
    assert host_path_of(spec, driver, pods_dir) == pods_dir
    # Only the privileged driver may use Bidirectional propagation.
    for ctr in spec["containers"]:
        if ctr["name"] != "leasehold":
            for mount in ctr.get("volumeMounts", []):
                assert mount.get("mountPropagation", "None") != "Bidirectional"


@pytest.mark.parametrize("value_set", NODE_SETS)
def test_socket_path_is_consistent(rendered_sets: dict[str, Rendered], value_set: str) -> None:
    spec = node_pod(rendered_sets[value_set])["spec"]
    plugin_dir = f"{kubelet_dir(VALUE_SETS[value_set])}/plugins/{DRIVER}"
    driver = container(spec, "leasehold")
    registrar = container(spec, "node-driver-registrar")
    probe = container(spec, "livenessprobe")

    driver_socket = arg_value(driver["args"], "--csi-socket")
    assert driver_socket == "/csi/csi.sock"
    host_socket = host_path_of(spec, driver, driver_socket)
    assert host_socket == f"{plugin_dir}/csi.sock"

    # The sidecars reach the same host file through their own mounts...
    for sidecar in (registrar, probe):
        address = arg_value(sidecar["args"], "--csi-address")
        assert address is not None, sidecar["name"]
        assert host_path_of(spec, sidecar, address) == host_socket, sidecar["name"]
    # ...and the kubelet is told the socket's host path.
    assert arg_value(registrar["args"], "--kubelet-registration-path") == host_socket
    # The registrar writes its registration socket into plugins_registry.
    assert host_path_of(spec, registrar, "/registration") == (
        f"{kubelet_dir(VALUE_SETS[value_set])}/plugins_registry"
    )


@pytest.mark.parametrize("value_set", NODE_SETS)
def test_driver_liveness_probe_targets_livenessprobe_sidecar(
    rendered_sets: dict[str, Rendered], value_set: str
) -> None:
    spec = node_pod(rendered_sets[value_set])["spec"]
    driver = container(spec, "leasehold")
    probe = driver["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in driver["ports"]}
    port = ports[probe["port"]] if isinstance(probe["port"], str) else probe["port"]
    expected = merged_values(VALUE_SETS[value_set])["node"]["livenessProbe"]["port"]
    assert port == expected
    sidecar = container(spec, "livenessprobe")
    assert arg_value(sidecar["args"], "--health-port") == str(expected)


@pytest.mark.parametrize("value_set", NODE_SETS)
def test_node_broker_url_and_ca(rendered_sets: dict[str, Rendered], value_set: str) -> None:
    r = rendered_sets[value_set]
    values = merged_values(VALUE_SETS[value_set])
    spec = node_pod(r)["spec"]
    driver = container(spec, "leasehold")
    svc = r.get("Service", f"{FULLNAME}-broker")
    port = svc["spec"]["ports"][0]["port"]
    assert arg_value(driver["args"], "--broker-url") == (
        f"https://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc:{port}"
    )
    ca_file = arg_value(driver["args"], "--broker-ca")
    mount = next(m for m in driver["volumeMounts"] if ca_file.startswith(m["mountPath"] + "/"))
    assert mount.get("readOnly") is True
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    key = posixpath.basename(ca_file)
    ctr_args = container(controller_pod(r)["spec"], "controller")["args"]
    existing = values["broker"]["tls"]["existingSecret"]
    if existing:
        # User-provided TLS: only the CA item of that Secret, never the key.
        assert volume["secret"]["secretName"] == existing
        assert volume["secret"]["items"] == [{"key": "ca.crt", "path": key}]
        assert arg_value(ctr_args, "--broker-tls-secret") == existing
    else:
        assert "secret" not in volume
        assert volume["configMap"]["name"] == f"{FULLNAME}-broker-ca"
        assert volume["configMap"]["items"] == [{"key": "ca.crt", "path": key}]
        assert arg_value(ctr_args, "--broker-tls-secret") is None
    # The controller always learns where to publish the CA and generated cert.
    assert arg_value(ctr_args, "--broker-ca-configmap") == f"{FULLNAME}-broker-ca"
    assert arg_value(ctr_args, "--broker-tls-generated-secret") == f"{FULLNAME}-broker-tls"


def test_custom_kubelet_and_state_dir(rendered_sets: dict[str, Rendered]) -> None:
    spec = node_pod(rendered_sets["custom-kubelet-dir"])["spec"]
    host_paths = sorted(v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v)
    assert host_paths == [
        "/data/leasehold",
        "/var/lib/k0s/kubelet/plugins/csi.leasehold.dev",
        "/var/lib/k0s/kubelet/plugins_registry",
        "/var/lib/k0s/kubelet/pods",
    ]
    driver = container(spec, "leasehold")
    assert arg_value(driver["args"], "--state-dir") == "/var/lib/leasehold"
    assert host_path_of(spec, driver, "/var/lib/leasehold") == "/data/leasehold"
    # Target paths are confined to the kubelet's pod directories.
    assert arg_value(driver["args"], "--kubelet-dir") == "/var/lib/k0s/kubelet"
    all_text = json.dumps(spec)
    assert "/var/lib/kubelet" not in all_text


def test_node_per_lease_slots(rendered_sets: dict[str, Rendered]) -> None:
    # Unset renewal slots: no flag, the driver's default (a quarter of its pool).
    default = container(node_pod(rendered_sets["default"])["spec"], "leasehold")["args"]
    assert arg_value(default, "--per-lease-renewal-concurrency") is None
    driver = container(node_pod(rendered_sets["everything"])["spec"], "leasehold")
    args = driver["args"]
    assert arg_value(args, "--per-lease-concurrency") == "6"
    assert arg_value(args, "--per-lease-renewal-concurrency") == "2"
    assert arg_value(args, "--per-lease-waiting") == "0"
    # Before extraArgs, so a flag there still wins.
    assert args.index("--per-lease-waiting") < args.index("--verbose")


def test_node_scheduling_overrides(rendered_sets: dict[str, Rendered]) -> None:
    spec = node_pod(rendered_sets["everything"])["spec"]
    assert "priorityClassName" not in spec
    assert "tolerations" not in spec
    assert spec["serviceAccountName"] == "existing-node"


# --------------------------------------------------------------------------
# RBAC
# --------------------------------------------------------------------------


def rules_of(obj: dict[str, Any]) -> set[tuple[str, str, str]]:
    """Expand rules into (apiGroup, resource, verb) triples."""
    out = set()
    for rule in obj.get("rules", []):
        if "nonResourceURLs" in rule:
            assert "apiGroups" not in rule and "resources" not in rule, obj["metadata"]["name"]
            for url in rule["nonResourceURLs"]:
                for verb in rule["verbs"]:
                    out.add(("url", url, verb))
            continue
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    out.add((group, resource, verb))
    return out


def triples(group: str, resources: list[str], verbs: list[str]) -> set[tuple[str, str, str]]:
    return {(group, r, v) for r in resources for v in verbs}


CONTROLLER_NAMESPACED_RULES = (
    triples("leasehold.dev", ["rotationpolicies", "issuers"], ["get", "list", "watch"])
    # The finalizer is added and removed by patching the lease (seen refused on a
    # real API server without this verb).
    | triples("leasehold.dev", ["secretleases"], ["get", "list", "watch", "patch"])
    | triples("leasehold.dev", ["secretleases/status", "rotationpolicies/status"], ["get", "patch"])
    | triples("leasehold.dev", ["issuers/status"], ["patch"])
    # Revocation ledgers and CRLs (`<issuer>-crl`).
    | triples("", ["configmaps"], ["get", "list", "watch", "create", "update", "patch"])
    | triples("leasehold.dev", ["secretleases/finalizers"], ["update"])
    | triples("", ["secrets"], ["get", "list", "watch", "create", "update", "patch", "delete"])
    | triples("", ["events"], ["create", "patch"])
    | triples("events.k8s.io", ["events"], ["create", "patch"])
    | triples("", ["pods"], ["get", "list", "watch"])
    | triples("apps", ["deployments", "statefulsets", "daemonsets"], ["get", "list", "watch", "patch"])
)
CONTROLLER_CLUSTER_ONLY_RULES = (
    triples("leasehold.dev", ["clusterissuers"], ["get", "list", "watch"])
    | triples("leasehold.dev", ["clusterissuers/status"], ["patch"])
    | triples("url", ["/.well-known/openid-configuration", "/openid/v1/jwks"], ["get"])
)
# The broker's watch cache of namespace labels: every namespace when watching all
# of them; with watchNamespaces, list and watch only the watched ones by name.
NAMESPACES_ALL = triples("", ["namespaces"], ["get", "list", "watch"])
NAMESPACES_RESTRICTED = triples("", ["namespaces"], ["get", "list", "watch"])
# With watchNamespaces not including the release namespace: the broker's cache
# of the node drivers' pods.
DRIVER_PODS = triples("", ["pods"], ["list", "watch"])
CONTROLLER_RELEASE_NS_RULES = (
    triples("coordination.k8s.io", ["leases"], ["get", "list", "watch", "create", "update", "patch"])
    | triples("", ["configmaps"], ["get", "list", "watch", "create", "patch", "update"])
    | triples("", ["pods"], ["get", "patch"])
)


@pytest.mark.parametrize("value_set", ALL_SETS)
def test_no_wildcards_in_rbac(rendered_sets: dict[str, Rendered], value_set: str) -> None:
    for obj in rendered_sets[value_set].of_kind("ClusterRole") + rendered_sets[value_set].of_kind(
        "Role"
    ):
        assert "aggregationRule" not in obj
        for rule in obj["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                for item in rule.get(field, []):
                    assert "*" not in item, f"{obj['metadata']['name']}: {field} has {item!r}"


@pytest.mark.parametrize("value_set", NODE_SETS)
def test_node_clusterrole_grants_only_oidc_discovery(
    rendered_sets: dict[str, Rendered], value_set: str
) -> None:
    r = rendered_sets[value_set]
    role = r.get("ClusterRole", NODE)
    assert len(role["rules"]) == 1
    rule = role["rules"][0]
    assert set(rule) == {"nonResourceURLs", "verbs"}
    assert sorted(rule["nonResourceURLs"]) == ["/.well-known/openid-configuration", "/openid/v1/jwks"]
    assert rule["verbs"] == ["get"]
    node_sa = node_pod(r)["spec"]["serviceAccountName"]
    # The node account is bound to that role and nothing else.
    for kind in ("ClusterRoleBinding", "RoleBinding"):
        for binding in r.of_kind(kind):
            subjects = {(s["kind"], s["name"]) for s in binding["subjects"]}
            if ("ServiceAccount", node_sa) in subjects:
                assert binding["roleRef"] == {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": NODE,
                }


def test_controller_rbac_cluster_wide(default: Rendered) -> None:
    assert rules_of(default.get("ClusterRole", CONTROLLER)) == (
        CONTROLLER_NAMESPACED_RULES | CONTROLLER_CLUSTER_ONLY_RULES | NAMESPACES_ALL
    )
    namespace_rules = [
        rule
        for rule in default.get("ClusterRole", CONTROLLER)["rules"]
        if "namespaces" in rule.get("resources", [])
    ]
    assert all("resourceNames" not in rule for rule in namespace_rules)
    role = default.get("Role", CONTROLLER, NAMESPACE)
    assert rules_of(role) == CONTROLLER_RELEASE_NS_RULES
    assert default.of_kind("ClusterRole") and len(default.of_kind("ClusterRole")) == 2
    # No per-namespace bindings besides the release namespace's.
    assert [b["metadata"]["namespace"] for b in default.of_kind("RoleBinding")] == [NAMESPACE]


@pytest.mark.parametrize(
    "value_set", ["restricted-namespaces", "restricted-including-release-ns"]
)
def test_controller_rbac_restricted_namespaces(
    rendered_sets: dict[str, Rendered], value_set: str
) -> None:
    r = rendered_sets[value_set]
    watched = VALUE_SETS[value_set]["watchNamespaces"]
    ctr = container(controller_pod(r)["spec"], "controller")
    assert arg_value(ctr["args"], "--namespaces") == ",".join(watched)
    # Cluster-wide: only what has no namespace.
    assert rules_of(r.get("ClusterRole", CONTROLLER)) == (
        CONTROLLER_CLUSTER_ONLY_RULES | NAMESPACES_RESTRICTED
    )
    # Listing and watching namespaces: only the watched ones, by name.
    for rule in r.get("ClusterRole", CONTROLLER)["rules"]:
        if "namespaces" in rule.get("resources", []) and {"list", "watch"} & set(rule["verbs"]):
            assert sorted(rule["resourceNames"]) == sorted(set(watched)), rule
            assert set(rule["verbs"]) == {"list", "watch"}, rule
    namespaced = r.get("ClusterRole", f"{CONTROLLER}-namespaced")
    assert rules_of(namespaced) == CONTROLLER_NAMESPACED_RULES
    bound_in = sorted(
        b["metadata"]["namespace"]
        for b in r.of_kind("RoleBinding")
        if b["roleRef"]["name"] == f"{CONTROLLER}-namespaced"
    )
    assert bound_in == sorted(watched)
    assert not any(
        b["roleRef"]["name"] == f"{CONTROLLER}-namespaced" for b in r.of_kind("ClusterRoleBinding")
    )
    role_rules = rules_of(r.get("Role", CONTROLLER, NAMESPACE))
    secrets = triples(
        "", ["secrets"], ["get", "list", "watch", "create", "update", "patch", "delete"]
    )
    if NAMESPACE in watched:
        assert role_rules == CONTROLLER_RELEASE_NS_RULES
    else:
        # The broker TLS Secret still lives in the release namespace, and so do
        # the node drivers' pods.
        assert role_rules == CONTROLLER_RELEASE_NS_RULES | secrets | DRIVER_PODS


WRITE_VERBS = {"create", "update", "patch", "delete"}


@pytest.mark.parametrize(
    "value_set", ["write-namespaces", "write-namespaces-including-release-ns"]
)
def test_controller_rbac_write_namespaces(rendered_sets: dict[str, Rendered], value_set: str) -> None:
    r = rendered_sets[value_set]
    writable = VALUE_SETS[value_set]["rbac"]["writeNamespaces"]
    ctr = container(controller_pod(r)["spec"], "controller")
    assert arg_value(ctr["args"], "--namespaces") is None, "still watches every namespace"
    # Cluster-wide: every read, no write on namespaced objects.
    cluster = rules_of(r.get("ClusterRole", CONTROLLER))
    reads = {t for t in CONTROLLER_NAMESPACED_RULES if t[2] not in WRITE_VERBS}
    writes = CONTROLLER_NAMESPACED_RULES - reads
    assert cluster == reads | CONTROLLER_CLUSTER_ONLY_RULES | NAMESPACES_ALL
    assert writes, "some writes exist"
    # Writes: bound per listed namespace only.
    assert rules_of(r.get("ClusterRole", f"{CONTROLLER}-write")) == writes
    bound_in = sorted(
        b["metadata"]["namespace"]
        for b in r.of_kind("RoleBinding")
        if b["roleRef"]["name"] == f"{CONTROLLER}-write"
    )
    assert bound_in == sorted(writable)
    assert not any(
        b["roleRef"]["name"] == f"{CONTROLLER}-write" for b in r.of_kind("ClusterRoleBinding")
    )
    # Together, a listed namespace gets exactly the full set.
    assert reads | writes == CONTROLLER_NAMESPACED_RULES
    role_rules = rules_of(r.get("Role", CONTROLLER, NAMESPACE))
    secrets = triples(
        "", ["secrets"], ["get", "list", "watch", "create", "update", "patch", "delete"]
    )
    if NAMESPACE in writable:
        assert role_rules == CONTROLLER_RELEASE_NS_RULES
    else:
        # The broker TLS Secret still lives in the release namespace.
        assert role_rules == CONTROLLER_RELEASE_NS_RULES | secrets
    # Events about cluster-scoped objects (ClusterIssuers) land in "default": events only.
    events = f"{CONTROLLER}-cluster-events"
    if "default" in writable:
        assert not [x for x in r.of_kind("Role") if x["metadata"]["name"] == events]
    else:
        assert rules_of(r.get("Role", events, "default")) == triples(
            "", ["events"], ["create", "patch"]
        ) | triples("events.k8s.io", ["events"], ["create", "patch"])
        binding = r.get("RoleBinding", events, "default")
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": events,
        }


def test_write_namespaces_and_watch_namespaces_do_not_combine() -> None:
    with pytest.raises(Exception, match="rbac.writeNamespaces"):
        render({"watchNamespaces": ["a"], "rbac": {"writeNamespaces": ["a"]}})


@pytest.mark.parametrize("value_set", ALL_SETS)
def test_bindings_reference_rendered_roles_and_accounts(
    rendered_sets: dict[str, Rendered], value_set: str
) -> None:
    r = rendered_sets[value_set]
    values = merged_values(VALUE_SETS[value_set])
    accounts = {controller_pod(r)["spec"]["serviceAccountName"]}
    if values["node"]["enabled"]:
        accounts.add(node_pod(r)["spec"]["serviceAccountName"])
    for binding in r.of_kind("ClusterRoleBinding") + r.of_kind("RoleBinding"):
        ref = binding["roleRef"]
        if ref["kind"] == "Role":
            assert r.find("Role", ref["name"]) is not None
            assert r.get("Role", ref["name"])["metadata"]["namespace"] == binding["metadata"][
                "namespace"
            ]
        else:
            assert r.find("ClusterRole", ref["name"]) is not None, ref
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount"
            assert subject["namespace"] == NAMESPACE
            assert subject["name"] in accounts


def test_existing_service_accounts(rendered_sets: dict[str, Rendered]) -> None:
    r = rendered_sets["existing-service-accounts"]
    assert r.of_kind("ServiceAccount") == []
    assert controller_pod(r)["spec"]["serviceAccountName"] == "ops-leasehold-controller"
    assert node_pod(r)["spec"]["serviceAccountName"] == "ops-leasehold-node"
    subjects = {
        s["name"]
        for b in r.of_kind("ClusterRoleBinding") + r.of_kind("RoleBinding")
        for s in b["subjects"]
    }
    assert subjects == {"ops-leasehold-controller", "ops-leasehold-node"}


def test_default_service_accounts(default: Rendered) -> None:
    names = sorted(sa["metadata"]["name"] for sa in default.of_kind("ServiceAccount"))
    assert names == [f"{FULLNAME}-controller", f"{FULLNAME}-node"]


def test_existing_service_account_without_name_fails() -> None:
    with pytest.raises(helm.HelmError) as err:
        render({"serviceAccount": {"controller": {"create": False}}})
    assert "serviceAccount.controller.name" in str(err.value)


def test_rbac_can_be_disabled() -> None:
    r = render({"rbac": {"create": False}})
    for kind in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"):
        assert r.of_kind(kind) == []


# --------------------------------------------------------------------------
# ServiceMonitor
# --------------------------------------------------------------------------


def test_service_monitor_off_by_default(default: Rendered) -> None:
    assert default.of_kind("ServiceMonitor") == []


def test_service_monitor_selects_only_the_metrics_service(
    rendered_sets: dict[str, Rendered],
) -> None:
    r = rendered_sets["service-monitor"]
    [monitor] = r.of_kind("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [
        s["metadata"]["name"]
        for s in r.of_kind("Service")
        if selector.items() <= s["metadata"]["labels"].items()
    ]
    assert selected == [f"{FULLNAME}-metrics"]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    metrics_svc = r.get("Service", f"{FULLNAME}-metrics")
    assert endpoint["port"] in [p["name"] for p in metrics_svc["spec"]["ports"]]


# --------------------------------------------------------------------------
# values.schema.json
# --------------------------------------------------------------------------


def test_default_values_match_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    jsonschema.Draft7Validator.check_schema(schema)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(values)
    # Every top-level value is declared in the schema, and vice versa.
    assert set(values) == set(schema["properties"])


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"replicas": 3}, "replicas"),  # unknown top-level key (belongs under controller)
        ({"controller": {"replicas": "two"}}, "/controller/replicas"),
        ({"controller": {"replicas": 0}}, "/controller/replicas"),
        ({"controller": {"replicaCount": 2}}, "replicaCount"),
        ({"node": {"kubeletDir": "var/lib/kubelet"}}, "/node/kubeletDir"),
        ({"node": {"perLeaseConcurrency": 0}}, "/node/perLeaseConcurrency"),
        ({"node": {"perLeaseRenewalConcurrency": 0}}, "/node/perLeaseRenewalConcurrency"),
        ({"node": {"perLeaseRenewalConcurrency": "4"}}, "/node/perLeaseRenewalConcurrency"),
        ({"node": {"perLeaseWaiting": -1}}, "/node/perLeaseWaiting"),
        ({"csi": {"tokenExpirationSeconds": 60}}, "/csi/tokenExpirationSeconds"),
        ({"csi": {"tokenAudience": ""}}, "/csi/tokenAudience"),
        ({"watchNamespaces": "team-a"}, "/watchNamespaces"),
        ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0"),
        ({"rbac": {"writeNamespaces": ["Team_A"]}}, "/rbac/writeNamespaces/0"),
        ({"broker": {"tls": {"existingSecret": 123}}}, "/broker/tls/existingSecret"),
        (
            {"broker": {"limits": {"maxPerPodUsersPerLease": 0}}},
            "/broker/limits/maxPerPodUsersPerLease",
        ),
        ({"metrics": {"serviceMonitor": {"enabled": "yes"}}}, "/metrics/serviceMonitor/enabled"),
        ({"metrics": {"port": 70000}}, "/metrics/port"),
        ({"crl": {"port": 0}}, "/crl/port"),
        ({"acme": {"http01": {"port": 0}}}, "/acme/http01/port"),
        ({"acme": {"solver": {}}}, "/acme"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"node": {"tolerations": {"operator": "Exists"}}}, "/node/tolerations"),
    ],
)
def test_schema_rejects_bad_values(values: dict[str, Any], field: str) -> None:
    with pytest.raises(helm.HelmValuesError) as err:
        render(values)
    assert field in str(err.value), str(err.value)


def test_notes_render(rendered_sets: dict[str, Rendered]) -> None:
    assert "leasehold-crds" in rendered_sets["default"].notes
    assert f"{FULLNAME}-broker-ca" in rendered_sets["default"].notes
    assert "team-a, team-b" in rendered_sets["restricted-namespaces"].notes
    assert "my-broker-tls" in rendered_sets["broker-tls-existing-secret"].notes
