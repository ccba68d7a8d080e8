"""Encryption-at-rest and audit values, and the controller flags they become."""

from __future__ import annotations

import pathlib
import sys
from typing import Any

import helm_python as helm
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from chartlib import (  # noqa: E402
    FULLNAME,
    NAMESPACE,
    VALUE_SETS,
    Rendered,
    arg_value,
    container,
    render,
)

ALL_SETS = sorted(VALUE_SETS)
CONTROLLER = f"{FULLNAME}-controller"
KEY_ARN = VALUE_SETS["encryption-kms"]["encryption"]["kms"]["keyId"]
ENCRYPTION_FLAGS = (
    "--kms-key-id",
    "--kms-region",
    "--kms-endpoint-url",
    "--local-key-secret",
    "--local-key-secret-create",
    "--data-key-cache-ttl-seconds",
)


def controller_args(r: Rendered) -> list[str]:
    pod = r.get("Deployment", CONTROLLER)["spec"]["template"]
    return container(pod["spec"], "controller")["args"]


def present(args: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in args if a.startswith("--")}


@pytest.mark.parametrize("value_set", ALL_SETS)
def test_encryption_mode_is_always_passed(rendered_sets: dict[str, Rendered], value_set: str) -> None:
    args = controller_args(rendered_sets[value_set])
    mode = VALUE_SETS[value_set].get("encryption", {}).get("mode", "local")
    assert arg_value(args, "--encryption") == mode
    assert args.count("--encryption") == 1


def test_local_mode_is_the_default(default: Rendered) -> None:
    args = controller_args(default)
    assert arg_value(args, "--encryption") == "local"
    assert arg_value(args, "--local-key-secret") == "leasehold-kek"
    assert "--local-key-secret-create" in args
    assert arg_value(args, "--data-key-cache-ttl-seconds") == "300"
    assert not present(args) & {"--kms-key-id", "--kms-region", "--kms-endpoint-url"}


def test_local_mode_with_a_key_you_create() -> None:
    args = controller_args(
        render({"encryption": {"local": {"secretName": "my-kek", "create": False}}})
    )
    assert arg_value(args, "--local-key-secret") == "my-kek"
    assert "--local-key-secret-create" not in args


def test_kms_mode(rendered_sets: dict[str, Rendered]) -> None:
    r = rendered_sets["encryption-kms"]
    args = controller_args(r)
    assert arg_value(args, "--encryption") == "kms"
    assert arg_value(args, "--kms-key-id") == KEY_ARN
    assert arg_value(args, "--kms-region") == "eu-west-1"
    assert "--kms-endpoint-url" not in args
    assert arg_value(args, "--data-key-cache-ttl-seconds") == "300"
    assert not present(args) & {"--local-key-secret", "--local-key-secret-create"}
    # IRSA: the role is on the controller's ServiceAccount.
    account = r.get("ServiceAccount", CONTROLLER)
    assert account["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/leasehold"
    }
    assert f"KMS key: {KEY_ARN}" in r.notes


def test_kms_endpoint_and_cache_ttl() -> None:
    args = controller_args(
        render(
            {
                "encryption": {
                    "mode": "kms",
                    "kms": {"keyId": "alias/leasehold", "endpointUrl": "https://kms.vpce.example"},
                    "dataKeyCacheTTLSeconds": 0,
                }
            }
        )
    )
    assert arg_value(args, "--kms-key-id") == "alias/leasehold"
    assert arg_value(args, "--kms-endpoint-url") == "https://kms.vpce.example"
    assert "--kms-region" not in args
    assert arg_value(args, "--data-key-cache-ttl-seconds") == "0"


def test_none_mode_passes_no_key_flags_and_warns(rendered_sets: dict[str, Rendered]) -> None:
    r = rendered_sets["encryption-none"]
    args = controller_args(r)
    assert arg_value(args, "--encryption") == "none"
    assert not present(args) & set(ENCRYPTION_FLAGS)
    assert "UNENCRYPTED" in r.notes
    assert "UNENCRYPTED" not in rendered_sets["default"].notes


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"encryption": {"mode": "kms"}}, "/encryption/kms/keyId"),
        ({"encryption": {"mode": "kms", "kms": {"region": "eu-west-1"}}}, "/encryption/kms/keyId"),
        ({"encryption": {"mode": "plaintext"}}, "/encryption/mode"),
        ({"encryption": {"mode": ""}}, "/encryption/mode"),
        ({"encryption": {"mode": None}}, "mode"),
        ({"encryption": {"kms": {"keyID": "x"}}}, "keyID"),
        ({"encryption": {"kms": {"endpointUrl": "kms.local"}}}, "/encryption/kms/endpointUrl"),
        ({"encryption": {"local": {"secretName": "Bad_Name"}}}, "/encryption/local/secretName"),
        ({"encryption": {"dataKeyCacheTTLSeconds": -1}}, "/encryption/dataKeyCacheTTLSeconds"),
        ({"audit": {"log": "audit.log"}}, "/audit/log"),
        ({"audit": {"log": "/audit.log"}}, "/audit/log"),
        ({"audit": {"webhookUrl": "audit.example.com"}}, "/audit/webhookUrl"),
        ({"audit": {"checkpointEvery": 0}}, "/audit/checkpointEvery"),
        ({"audit": {"signingKeySecret": ""}}, "/audit/signingKeySecret"),
        ({"monitoring": {"dashboards": {"enabled": "yes"}}}, "/monitoring/dashboards/enabled"),
        (
            {"monitoring": {"prometheusRule": {"rules": {"leaseExpiringSoon": {"remainingFraction": 1.5}}}}},
            "/monitoring/prometheusRule/rules/leaseExpiringSoon/remainingFraction",
        ),
        (
            {"monitoring": {"prometheusRule": {"rules": {"rotationFailing": {"for": "ten minutes"}}}}},
            "/monitoring/prometheusRule/rules/rotationFailing/for",
        ),
        (
            {"monitoring": {"prometheusRule": {"rules": {"nodePublishSlow": {"p99": 1}}}}},
            "p99",
        ),
        ({"monitoring": {"prometheusRule": {"alertLabels": {"bad-label": "x"}}}}, "bad-label"),
    ],
)
def test_schema_rejects_bad_encryption_audit_and_monitoring_values(
    values: dict[str, Any], field: str
) -> None:
    with pytest.raises(helm.HelmValuesError) as err:
        render(values)
    assert field in str(err.value), str(err.value)


def test_kms_key_id_of_blanks_fails_rendering() -> None:
    # The schema only counts characters; the template refuses a blank id too.
    with pytest.raises(helm.HelmError) as err:
        render({"encryption": {"mode": "kms", "kms": {"keyId": "   "}}})
    assert "encryption.kms.keyId" in str(err.value)


# --------------------------------------------------------------------------
# Audit
# --------------------------------------------------------------------------


def test_audit_defaults_log_to_stdout(default: Rendered) -> None:
    args = controller_args(default)
    assert arg_value(args, "--audit-log") == "-"
    assert "--audit-webhook" not in args
    assert arg_value(args, "--audit-signing-key-secret") == "leasehold-audit-signing-key"
    assert arg_value(args, "--audit-checkpoint-configmap") == "leasehold-audit-checkpoint"
    assert arg_value(args, "--audit-checkpoint-every") == "100"
    pod = default.get("Deployment", CONTROLLER)["spec"]["template"]["spec"]
    assert [v["name"] for v in pod["volumes"]] == ["tmp"]


def test_audit_file_gets_a_writable_volume_and_webhook(rendered_sets: dict[str, Rendered]) -> None:
    r = rendered_sets["audit-file-and-webhook"]
    args = controller_args(r)
    assert arg_value(args, "--audit-log") == "/var/log/leasehold/audit.log"
    assert arg_value(args, "--audit-webhook") == "https://audit.example.com/leasehold"
    assert arg_value(args, "--audit-checkpoint-every") == "10"
    pod = r.get("Deployment", CONTROLLER)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["audit-log"]
    mounts = {m["name"]: m for m in container(pod, "controller")["volumeMounts"]}
    assert mounts["audit-log"]["mountPath"] == "/var/log/leasehold"
    assert not mounts["audit-log"].get("readOnly", False)


def test_audit_log_can_be_off() -> None:
    args = controller_args(render({"audit": {"log": ""}}))
    assert "--audit-log" not in args
    assert arg_value(args, "--audit-signing-key-secret") == "leasehold-audit-signing-key"


def test_audit_log_in_tmp_fails_rendering() -> None:
    with pytest.raises(helm.HelmError) as err:
        render({"audit": {"log": "/tmp/audit.log"}})
    assert "audit.log" in str(err.value)


# --------------------------------------------------------------------------
# RBAC for the key Secrets and the checkpoint ConfigMap
# --------------------------------------------------------------------------


def release_namespace_grants(r: Rendered, account: str) -> set[tuple[str, str, str, str | None]]:
    """(apiGroup, resource, verb, resourceName or None) the account holds in the
    release namespace, through ClusterRoleBindings and RoleBindings there."""
    grants = set()
    bindings = r.of_kind("ClusterRoleBinding") + [
        b for b in r.of_kind("RoleBinding") if b["metadata"]["namespace"] == NAMESPACE
    ]
    for binding in bindings:
        if not any(s["kind"] == "ServiceAccount" and s["name"] == account for s in binding["subjects"]):
            continue
        ref = binding["roleRef"]
        role = r.get(ref["kind"], ref["name"])
        for rule in role.get("rules", []):
            for group in rule.get("apiGroups", []):
                for resource in rule.get("resources", []):
                    for verb in rule["verbs"]:
                        for name in rule.get("resourceNames") or [None]:
                            grants.add((group, resource, verb, name))
    return grants


def allowed(grants: set[tuple[str, str, str, str | None]], resource: str, verb: str, name: str) -> bool:
    return ("", resource, verb, None) in grants or ("", resource, verb, name) in grants


@pytest.mark.parametrize("value_set", ALL_SETS)
def test_controller_may_manage_its_key_secrets_and_checkpoint(
    rendered_sets: dict[str, Rendered], value_set: str
) -> None:
    r = rendered_sets[value_set]
    account = r.get("Deployment", CONTROLLER)["spec"]["template"]["spec"]["serviceAccountName"]
    grants = release_namespace_grants(r, account)
    values = VALUE_SETS[value_set]
    kek = values.get("encryption", {}).get("local", {}).get("secretName", "leasehold-kek")
    for verb in ("get", "create", "patch"):
        assert allowed(grants, "secrets", verb, kek), (value_set, verb)
        assert allowed(grants, "secrets", verb, "leasehold-audit-signing-key"), (value_set, verb)
        assert allowed(grants, "configmaps", verb, "leasehold-audit-checkpoint"), (value_set, verb)
