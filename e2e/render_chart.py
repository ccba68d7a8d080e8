"""Render the leasehold chart as `helm template` would, for the e2e suite.

Uses the real Helm engine bundled in helm-python-sdk (no helm binary needed):
`python3 e2e/render_chart.py RELEASE NAMESPACE [VALUES_JSON]` prints the
rendered objects as one multi-document YAML stream on stdout.
"""

from __future__ import annotations

import json
import pathlib
import sys

import helm_python as helm

CHART = pathlib.Path(__file__).resolve().parents[1] / "charts" / "leasehold"


def main() -> int:
    if len(sys.argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    release, namespace = sys.argv[1], sys.argv[2]
    values = json.loads(sys.argv[3]) if len(sys.argv) == 4 else None
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=release, namespace=namespace, is_install=True)
    for path, text in sorted(manifests.items()):
        if path.endswith((".yaml", ".yml")) and text.strip():
            sys.stdout.write(f"---\n# Source: {path}\n{text.strip()}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
