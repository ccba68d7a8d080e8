# leasehold — common tasks. `make help` lists them.
CARGO_TARGET_DIR ?= /var/tmp/leasehold-target
export CARGO_TARGET_DIR
PYTHON ?= python3

.PHONY: help setup test test-rust test-chart lint fmt crds demo bench bench-e2e e2e image

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: ## Install what the tests need on a fresh Debian machine (database servers, Python packages)
	bash .ci/setup.sh

test: setup test-rust test-chart ## Run every test (Rust workspace with real databases, Helm chart render-and-validate)

test-rust: ## Rust tests: unit, real PostgreSQL/MariaDB, CRD drift and schema
	cargo test --workspace --locked

test-chart: ## Lint and render the Helm charts with a real Helm engine; validate against Kubernetes schemas
	$(PYTHON) -m pytest -q -p no:cacheprovider tests/chart

lint: ## rustfmt check and clippy with warnings as errors
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

fmt: ## Format the Rust code
	cargo fmt --all

crds: ## Regenerate crds/ and charts/leasehold-crds/files/ from the Rust types
	cargo run -q -p leasehold-api --bin crdgen

demo: setup ## Rotate a credential against a throwaway PostgreSQL (and MariaDB) in local mode, with real logins
	cargo run -q -p leasehold-engine --example demo

bench: ## Print every benchmark figure: rotations/minute (PostgreSQL, MariaDB) beside the database floor, what encryption (local key, KMS) adds per rotation and its KMS calls, seal/open rates, audit records/s, token verifications/s, NodePublishVolume latency and driver memory, certificates issued+verified/s
	cargo run -q --release -p leasehold-engine --example rotation-bench
	cargo run -q --release -p leasehold-engine --example kms-rotation-bench
	cargo bench -q -p leasehold-envelope --bench envelope
	cargo bench -q -p leasehold-audit
	cargo bench -q -p leasehold-auth --bench verify
	cargo bench -q -p leasehold-csi --bench csi-bench
	cargo bench -q -p leasehold-certs --bench issue

bench-e2e: ## NodePublishVolume as the kubelet sees it, against the cluster in KUBECONFIG (controller, broker over TLS, node driver, real API server): p50/p99/max and API requests per call for fresh publishes (BENCH_SEQUENTIAL=100 one at a time, the rest at once), republishes (unchanged, after a rotation) and unpublishes of BENCH_PODS=200 pods on one node
	cargo test -q --locked --release -p leasehold-cli --test e2e -- --ignored --nocapture --exact bench_real_path

e2e: ## End-to-end tests against the cluster in KUBECONFIG (skipped, loudly, without one)
	bash e2e/run.sh

image: ## Build the container image (needs a Docker engine)
	docker build -t ghcr.io/leasehold-dev/leasehold:0.1.0 .
