"""The Grafana dashboard, the PrometheusRule and the metric names they query.

Every metric the dashboard and the alerts reference must be one the code
exports: charts/leasehold/dashboards/exported-metrics.txt lists them (kept in
step with the real registries by a Rust test). The rules are checked, and
their alerting logic tested, with `promtool` when it is installed (the
Debian package `prometheus`, installed by .ci/setup.sh); without it the tests
skip loudly, except in CI where they fail.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from chartlib import CHART, FULLNAME, NAMESPACE, VALUE_SETS, Rendered, render  # noqa: E402
from promql import metric_names, unexported  # noqa: E402

DASHBOARDS = CHART / "dashboards"
DASHBOARD_FILE = DASHBOARDS / "leasehold.json"
EXPORTED_FILE = DASHBOARDS / "exported-metrics.txt"
README = CHART / "README.md"

# Series Prometheus itself adds to every scrape, not exported by leasehold.
SYNTHETIC_METRICS = {"up"}

EXPECTED_ALERTS = {
    "LeaseholdRotationFailing",
    "LeaseholdVerificationFailures",
    "LeaseholdRevocationStuck",
    "LeaseholdLeaseExpiringSoon",
    "LeaseholdBrokerRefusalsSpike",
    "LeaseholdNodePublishSlow",
    "LeaseholdNodeBrokerUnreachable",
    "LeaseholdKMSUnavailable",
    "LeaseholdKMSTampered",
    "LeaseholdAuditWriteFailures",
    "LeaseholdControllerDown",
}


def exported_metrics() -> set[str]:
    return {line.strip() for line in EXPORTED_FILE.read_text().splitlines() if line.strip()}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_FILE.read_text())


def query_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dash["panels"] if p["type"] != "row"]


def dashboard_exprs(dash: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in query_panels(dash) for t in p["targets"]]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["query"]["query"] if isinstance(var["query"], dict) else var["query"])
    return exprs


def prometheus_rule(values: dict[str, Any] | None = None) -> dict[str, Any]:
    r = render(values if values is not None else VALUE_SETS["monitoring"])
    [rule] = r.of_kind("PrometheusRule")
    return rule


def alerts_of(rule: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["alert"]: a for g in rule["spec"]["groups"] for a in g["rules"]}


def promtool() -> str:
    found = shutil.which("promtool")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("promtool is missing in CI: .ci/setup.sh installs the Debian package prometheus")
    pytest.skip("SKIPPED LOUDLY: promtool not installed (apt-get install prometheus, or bash .ci/setup.sh)")


def run_promtool(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


# --------------------------------------------------------------------------
# The metric-name extractor itself
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        ('sum by (code) (rate(a_total{code!="Ok", x=~"by|on"}[5m]))', {"a_total"}),
        ("a / ignoring (code) group_left (extra) b > bool 0.25", {"a", "b"}),
        ("histogram_quantile(0.99, sum by (le) (rate(h_bucket[$__rate_interval])))", {"h_bucket"}),
        ("max_over_time((g - time())[1d:5m]) offset 1h", {"g"}),
        ('label_values(m{namespace=~"$namespace"}, lease)', {"m"}),
        ("absent(up{job='x'} == 1) or vector(0)", {"up"}),
        ("sum without (instance) (a) unless on () b and c", {"a", "b", "c"}),
        ("1e3 * 0x1F + .5 - Inf", set()),
        ("increase(a_total[${window}]) > ${threshold}", {"a_total"}),
    ],
)
def test_metric_names_extracts_selected_metrics(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_metric_names_refuses_name_matchers() -> None:
    with pytest.raises(ValueError, match="__name__"):
        metric_names('{__name__=~"leasehold_.*"}')


def test_unexported_accepts_histogram_series_only() -> None:
    exported = {"h_seconds", "c_total", "g"}
    assert unexported({"h_seconds_bucket", "h_seconds_sum", "h_seconds_count", "g"}, exported) == set()
    assert unexported({"c_total_count", "nope", "g_total"}, exported) == {
        "c_total_count",
        "nope",
        "g_total",
    }


def test_exported_metrics_file_is_sorted_and_well_formed() -> None:
    lines = EXPORTED_FILE.read_text().splitlines()
    assert lines == sorted(set(lines)), "one name per line, sorted, no duplicates"
    for name in lines:
        assert re.fullmatch(r"leasehold_[a-z0-9_]+", name), name
        assert not name.endswith(("_bucket", "_sum", "_count")), f"{name}: list histograms by base name"


# --------------------------------------------------------------------------
# Dashboard JSON
# --------------------------------------------------------------------------


def test_dashboard_top_level_structure() -> None:
    dash = dashboard()
    assert dash["uid"] == "leasehold-overview"
    assert dash["title"]
    assert dash["schemaVersion"] >= 36
    assert "id" not in dash or dash["id"] is None, "a fixed id clashes on import"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert set(variables) >= {"datasource", "namespace", "lease"}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "lease"):
        var = variables[name]
        assert var["type"] == "query"
        assert var["datasource"]["uid"] == "${datasource}"
        assert var["includeAll"] is True and var["multi"] is True
    assert "$namespace" in variables["lease"]["query"]["query"], "lease follows namespace"


def test_every_panel_has_title_type_grid_targets_and_templated_datasource() -> None:
    dash = dashboard()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert query_panels(dash), "no panels"
    for panel in query_panels(dash):
        where = panel.get("title", panel["id"])
        assert panel["title"] and panel["type"] in {"timeseries", "stat", "gauge", "table", "bargauge"}, where
        grid = panel["gridPos"]
        assert set(grid) == {"h", "w", "x", "y"} and all(isinstance(v, int) for v in grid.values()), where
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, where
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{where}: no unit"
        assert panel["targets"], f"{where}: no targets"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), where
        for target in panel["targets"]:
            assert target["expr"].strip(), where
            assert target.get("datasource", panel["datasource"])["uid"] == "${datasource}", where
            assert metric_names(target["expr"]), f"{where}: {target['expr']!r} queries no metric"


def test_panels_do_not_overlap() -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        g = panel["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


def test_dashboard_covers_every_requested_signal() -> None:
    referenced = set().union(*(metric_names(e) for e in dashboard_exprs(dashboard())))
    for needed in (
        "leasehold_rotations_total",  # success rate, verification failures
        "leasehold_reconcile_duration_seconds_bucket",  # rotation duration
        "leasehold_revocations_pending",  # pending and stuck
        "leasehold_credential_expiry_timestamp_seconds",  # time to expiry per lease
        "leasehold_broker_requests_total",  # requests and refusals by reason
        "leasehold_csi_node_publish_duration_seconds_bucket",  # NodePublishVolume latency
        "leasehold_kms_requests_total",  # KMS calls and failures
        "leasehold_audit_write_failures_total",
        "leasehold_emergency_revocations_total",
    ):
        assert needed in referenced, needed
    exprs = "\n".join(dashboard_exprs(dashboard()))
    assert "histogram_quantile(0.99" in exprs and "histogram_quantile(0.5" in exprs
    assert "- time()" in exprs, "time to expiry is expiry timestamp minus now"


def test_dashboard_queries_only_exported_metrics() -> None:
    referenced = set().union(*(metric_names(e) for e in dashboard_exprs(dashboard())))
    assert unexported(referenced, exported_metrics()) == set()


def test_dashboard_filters_per_lease_metrics_by_the_variables() -> None:
    for expr in dashboard_exprs(dashboard()):
        for metric in ("leasehold_credential_expiry_timestamp_seconds", "leasehold_lease_suspended"):
            if metric in expr and not expr.startswith("label_values"):
                assert 'namespace=~"$namespace"' in expr and 'lease=~"$lease"' in expr, expr


# --------------------------------------------------------------------------
# Dashboard ConfigMap
# --------------------------------------------------------------------------


def test_dashboards_and_rules_are_off_by_default(default: Rendered) -> None:
    assert default.find("ConfigMap", f"{FULLNAME}-dashboards") is None
    assert default.of_kind("PrometheusRule") == []


def test_dashboard_configmap_carries_the_sidecar_label_and_the_json(
    rendered_sets: dict[str, Rendered],
) -> None:
    cm = rendered_sets["monitoring"].get("ConfigMap", f"{FULLNAME}-dashboards")
    assert cm["metadata"]["namespace"] == NAMESPACE
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "leasehold"}
    assert list(cm["data"]) == ["leasehold.json"]
    assert json.loads(cm["data"]["leasehold.json"]) == dashboard()


def test_dashboard_configmap_label_is_configurable() -> None:
    r = render(
        {"monitoring": {"dashboards": {"enabled": True, "labels": {"grafana_dashboard": "leasehold"}}}}
    )
    cm = r.get("ConfigMap", f"{FULLNAME}-dashboards")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "leasehold"
    assert "annotations" not in cm["metadata"]


# --------------------------------------------------------------------------
# PrometheusRule
# --------------------------------------------------------------------------


def readme_anchors() -> set[str]:
    anchors = set()
    for line in README.read_text().splitlines():
        match = re.match(r"^#+\s+(.*)$", line)
        if match:
            title = match.group(1).strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_prometheus_rule_structure() -> None:
    rule = prometheus_rule()
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["kind"] == "PrometheusRule"
    assert rule["metadata"]["name"] == FULLNAME
    assert rule["metadata"]["namespace"] == NAMESPACE
    assert rule["metadata"]["labels"]["release"] == "prom"
    assert set(rule["spec"]) == {"groups"}
    groups = rule["spec"]["groups"]
    names = [g["name"] for g in groups]
    assert len(names) == len(set(names))
    alerts = alerts_of(rule)
    assert set(alerts) == EXPECTED_ALERTS
    anchors = readme_anchors()
    for name, alert in alerts.items():
        assert set(alert) <= {"alert", "expr", "for", "labels", "annotations"}, name
        assert isinstance(alert["expr"], str) and alert["expr"].strip(), name
        if "for" in alert:
            assert re.fullmatch(r"([0-9]+(ms|s|m|h|d|w|y))+", alert["for"]), name
        assert alert["labels"]["severity"] in {"info", "warning", "critical"}, name
        assert alert["labels"]["team"] == "platform", f"{name}: alertLabels"
        annotations = alert["annotations"]
        assert annotations["summary"] and annotations["description"], name
        url = annotations["runbook_url"]
        assert url.startswith("https://"), name
        anchor = url.rsplit("#", 1)[1]
        assert anchor == name.lower(), name
        assert anchor in anchors, f"README has no section #{anchor}"


def test_rules_query_only_exported_metrics() -> None:
    referenced = set().union(*(metric_names(a["expr"]) for a in alerts_of(prometheus_rule()).values()))
    assert unexported(referenced - SYNTHETIC_METRICS, exported_metrics()) == set()
    assert "up" in referenced, "ControllerDown watches the scrape target"


def test_rule_thresholds_follow_values() -> None:
    rule = prometheus_rule(
        {
            "monitoring": {
                "prometheusRule": {
                    "enabled": True,
                    "runbookBaseUrl": "https://wiki.example.com/leasehold",
                    "rules": {
                        "nodePublishSlow": {"p99Seconds": 5, "severity": "critical"},
                        "leaseExpiringSoon": {"remainingFraction": 0.2, "lifetimeLookback": "7d"},
                        "revocationStuck": {"for": "1h"},
                        "controllerDown": {"job": "leasehold-controller"},
                    },
                }
            }
        }
    )
    alerts = alerts_of(rule)
    slow = alerts["LeaseholdNodePublishSlow"]
    assert slow["expr"].rstrip().endswith("> 5") and slow["labels"]["severity"] == "critical"
    expiring = alerts["LeaseholdLeaseExpiringSoon"]["expr"]
    assert "< 0.2 *" in expiring and "[7d:5m]" in expiring
    assert alerts["LeaseholdRevocationStuck"]["for"] == "1h"
    assert 'job="leasehold-controller"' in alerts["LeaseholdControllerDown"]["expr"]
    assert alerts["LeaseholdKMSUnavailable"]["annotations"]["runbook_url"] == (
        "https://wiki.example.com/leasehold#leaseholdkmsunavailable"
    )


def test_controller_down_watches_the_service_monitor_job() -> None:
    expr = alerts_of(prometheus_rule())["LeaseholdControllerDown"]["expr"]
    # prometheus-operator names the job after the scraped Service.
    assert f'job="{FULLNAME}-metrics"' in expr and f'namespace="{NAMESPACE}"' in expr


def test_rules_escape_prometheus_templates() -> None:
    for name, alert in alerts_of(prometheus_rule()).items():
        for text in alert["annotations"].values():
            assert "{{`" not in text and "`}}" not in text, name
    description = alerts_of(prometheus_rule())["LeaseholdLeaseExpiringSoon"]["annotations"]["description"]
    assert "{{ $labels.namespace }}/{{ $labels.lease }}" in description


def test_promtool_checks_the_rendered_rules(tmp_path: pathlib.Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(prometheus_rule()["spec"]))
    result = run_promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in result.stdout, result.stdout


def test_promtool_rejects_a_broken_rule(tmp_path: pathlib.Path) -> None:
    # Guard against a check that accepts everything.
    spec = prometheus_rule()["spec"]
    spec["groups"][0]["rules"][0]["expr"] = "sum by (error (rate(x[5m]))"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    result = run_promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert result.returncode != 0


def series(name: str, labels: dict[str, str]) -> str:
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def test_alerts_fire_when_they_should(tmp_path: pathlib.Path) -> None:
    """`promtool test rules` on synthetic series: each alert fires on a broken
    system and stays quiet on a healthy one. Annotations are left out (their
    text is checked above); expressions, `for` and labels are what runs."""
    spec = prometheus_rule({"monitoring": {"prometheusRule": {"enabled": True}}})["spec"]
    for group in spec["groups"]:
        for alert in group["rules"]:
            alert.pop("annotations")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    lease = {"namespace": "shop", "lease": "orders-db"}
    up = {"job": f"{FULLNAME}-metrics", "namespace": NAMESPACE, "instance": "10.0.0.1:8080"}
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                # A 1h credential that stops being renewed at t=0: fires once a tenth of
                # its life is left (54 min) has lasted 5 minutes.
                "interval": "1m",
                "input_series": [
                    {"series": series("leasehold_credential_expiry_timestamp_seconds", lease), "values": "3600x120"}
                ],
                "alert_rule_test": [
                    {"eval_time": "50m", "alertname": "LeaseholdLeaseExpiringSoon", "exp_alerts": []},
                    {
                        "eval_time": "62m",
                        "alertname": "LeaseholdLeaseExpiringSoon",
                        "exp_alerts": [{"exp_labels": {"severity": "critical", **lease}}],
                    },
                ],
            },
            {
                # The same lease renewed every 40 minutes (two thirds of its TTL): quiet.
                "interval": "1m",
                "input_series": [
                    {
                        "series": series("leasehold_credential_expiry_timestamp_seconds", lease),
                        "values": " ".join(f"{3600 + 2400 * i}x39" for i in range(6)),
                    }
                ],
                "alert_rule_test": [
                    {"eval_time": t, "alertname": "LeaseholdLeaseExpiringSoon", "exp_alerts": []}
                    for t in ("39m", "79m", "119m", "200m")
                ],
            },
            {
                # One node loses the broker at t=10m; another keeps it: only the first fires.
                "interval": "1m",
                "input_series": [
                    {
                        "series": series("leasehold_csi_broker_reachable", {"instance": "node-a:9100"}),
                        "values": "1x10 0x30",
                    },
                    {
                        "series": series("leasehold_csi_broker_reachable", {"instance": "node-b:9100"}),
                        "values": "1x40",
                    },
                ],
                "alert_rule_test": [
                    {"eval_time": "12m", "alertname": "LeaseholdNodeBrokerUnreachable", "exp_alerts": []},
                    {
                        "eval_time": "20m",
                        "alertname": "LeaseholdNodeBrokerUnreachable",
                        "exp_alerts": [
                            {"exp_labels": {"severity": "warning", "instance": "node-a:9100"}}
                        ],
                    },
                ],
            },
            {
                "interval": "1m",
                "input_series": [{"series": series("up", up), "values": "1x10 0x30"}],
                "alert_rule_test": [
                    {"eval_time": "10m", "alertname": "LeaseholdControllerDown", "exp_alerts": []},
                    {
                        "eval_time": "25m",
                        "alertname": "LeaseholdControllerDown",
                        "exp_alerts": [{"exp_labels": {"severity": "critical"}}],
                    },
                ],
            },
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": series(
                            "leasehold_kms_requests_total", {"operation": "decrypt", "outcome": "ok"}
                        ),
                        "values": "0+10x30",
                    },
                    {
                        "series": series(
                            "leasehold_kms_requests_total",
                            {"operation": "decrypt", "outcome": "unavailable"},
                        ),
                        "values": "0x10 0+3x20",
                    },
                ],
                "alert_rule_test": [
                    {"eval_time": "10m", "alertname": "LeaseholdKMSUnavailable", "exp_alerts": []},
                    {
                        "eval_time": "25m",
                        "alertname": "LeaseholdKMSUnavailable",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "critical",
                                    "operation": "decrypt",
                                    "outcome": "unavailable",
                                }
                            }
                        ],
                    },
                ],
            },
            {
                "interval": "1m",
                "input_series": [
                    {"series": "leasehold_revocations_pending", "values": "0x5 2x40"},
                ],
                "alert_rule_test": [
                    {"eval_time": "30m", "alertname": "LeaseholdRevocationStuck", "exp_alerts": []},
                    {
                        "eval_time": "40m",
                        "alertname": "LeaseholdRevocationStuck",
                        "exp_alerts": [{"exp_labels": {"severity": "warning"}}],
                    },
                ],
            },
            {
                # 1 refusal in 10 calls is normal; 1 in 2 is a spike.
                "interval": "1m",
                "input_series": [
                    {
                        "series": series("leasehold_broker_requests_total", {"method": "Issue", "code": "Ok"}),
                        "values": "0+9x60",
                    },
                    {
                        "series": series(
                            "leasehold_broker_requests_total",
                            {"method": "Issue", "code": "PermissionDenied"},
                        ),
                        "values": "0+1x30 30+9x30",
                    },
                ],
                "alert_rule_test": [
                    {"eval_time": "30m", "alertname": "LeaseholdBrokerRefusalsSpike", "exp_alerts": []},
                    {
                        "eval_time": "60m",
                        "alertname": "LeaseholdBrokerRefusalsSpike",
                        "exp_alerts": [
                            {"exp_labels": {"severity": "warning", "code": "PermissionDenied"}}
                        ],
                    },
                ],
            },
        ],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = run_promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
