#!/usr/bin/env bash
# End-to-end tests against the cluster in KUBECONFIG (or ~/.kube/config).
# Without a cluster this prints SKIPPED and exits 0, so `make e2e` is safe anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."

config="${KUBECONFIG:-$HOME/.kube/config}"
if [[ -z "${KUBECONFIG:-}" && ! -f "$HOME/.kube/config" ]] || [[ -n "${KUBECONFIG:-}" && ! -f "${KUBECONFIG%%:*}" ]]; then
  echo "e2e: SKIPPED — no cluster (set KUBECONFIG to run against kind or k3d)"
  exit 0
fi
if command -v kubectl >/dev/null 2>&1 && ! kubectl --request-timeout=5s version >/dev/null 2>&1; then
  echo "e2e: cluster in $config does not answer" >&2
  exit 1
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/leasehold-target}"
echo "e2e: running against $(kubectl config current-context 2>/dev/null || echo "$config")"
exec cargo test -p leasehold-operator --test e2e -- --ignored --nocapture --test-threads=1 "$@"
