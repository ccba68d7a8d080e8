"""Static checks that the Dockerfile, the charts and the workspace agree.

No Docker engine is available to the tests, so the Dockerfile is checked as
text against the contract the chart relies on.
"""

from __future__ import annotations

import pathlib
import re
import sys
import tomllib

import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from chartlib import CHART, CRDS_CHART, REPO  # noqa: E402

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    return steps[last_from:]


def arg_default(name: str) -> str:
    for keyword, rest in instructions():
        if keyword == "ARG" and rest.startswith(name + "="):
            return rest.split("=", 1)[1]
    raise AssertionError(f"ARG {name} not found")


def test_final_stage_is_distroless_nonroot() -> None:
    stage = final_stage()
    base = stage[0][1]
    if base.startswith("${"):
        base = arg_default(base[2:-1])
    assert base == "gcr.io/distroless/cc-debian12:nonroot"
    assert ("USER", "65532:65532") in stage
    assert ("ENTRYPOINT", '["/usr/local/bin/leasehold"]') in stage
    copies = [rest for keyword, rest in stage if keyword == "COPY"]
    assert any(c.endswith(" /usr/local/bin/leasehold") for c in copies), copies


def test_builder_uses_rust_bookworm_and_builds_the_cli_locked() -> None:
    assert re.fullmatch(r"rust:1(\.\d+)*-bookworm", arg_default("RUST_IMAGE"))
    builds = [rest for keyword, rest in instructions() if keyword == "RUN" and "cargo build" in rest]
    assert builds, "no cargo build step"
    for build in builds:
        assert "--release" in build and "--locked" in build and "-p leasehold-cli" in build
    # The manifests are copied before the sources (dependency layer caching).
    steps = instructions()
    first_manifest = next(i for i, (k, r) in enumerate(steps) if k == "COPY" and "Cargo.lock" in r)
    first_build = next(i for i, (k, r) in enumerate(steps) if k == "RUN" and "cargo build" in r)
    assert first_manifest < first_build


def test_cli_binary_is_named_leasehold() -> None:
    manifest = tomllib.loads((REPO / "crates" / "cli" / "Cargo.toml").read_text())
    assert manifest["package"]["name"] == "leasehold-cli"
    bins = [b["name"] for b in manifest.get("bin", [])]
    assert "leasehold" in bins


def test_dockerignore_excludes_build_outputs_and_vcs() -> None:
    entries = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {"target/", ".git/"} <= entries
    # The build needs these: make sure they are not excluded.
    for needed in ("crates", "proto", "Cargo.toml", "Cargo.lock", "crates/", "proto/"):
        assert needed not in entries


def test_chart_versions_follow_the_workspace() -> None:
    workspace = tomllib.loads((REPO / "Cargo.toml").read_text())
    version = workspace["workspace"]["package"]["version"]
    for chart in (CHART, CRDS_CHART):
        meta = yaml.safe_load((chart / "Chart.yaml").read_text())
        assert meta["apiVersion"] == "v2"
        assert meta["appVersion"] == version, f"{chart.name} appVersion != workspace version"
