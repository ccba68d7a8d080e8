# leasehold: one image for the controller (`leasehold controller`) and the
# CSI node driver (`leasehold node`).
#
#   docker build -t ghcr.io/leasehold-dev/leasehold:0.1.0 .
#
# The image runs as 65532:65532 (distroless "nonroot"). The Helm chart runs
# the node DaemonSet's container as root because it mounts tmpfs.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

# ---------------------------------------------------------------------------
# skeleton: the workspace manifests with every Rust source replaced by a stub.
# Its output only changes when a Cargo.toml or Cargo.lock changes, so the
# dependency build below stays cached across source edits.
# ---------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS skeleton
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
RUN printf 'fn main() {}\n' > /tmp/main.rs \
 && find crates -type f ! -name Cargo.toml ! -name '*.rs' -delete \
 && find crates -type f -name '*.rs' ! -name lib.rs -exec cp /tmp/main.rs {} \; \
 && find crates -type f -name lib.rs -exec truncate -s 0 {} +

# ---------------------------------------------------------------------------
# builder: compile dependencies against the skeleton, then the real sources.
# ---------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS builder
WORKDIR /src
ENV CARGO_TERM_COLOR=never
COPY --from=skeleton /src ./
RUN cargo build --release --locked -p leasehold-cli

COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
COPY proto ./proto
# The real files may carry mtimes older than the stub build; touch them so
# cargo rebuilds the workspace crates instead of shipping the stubs.
RUN find crates -type f -exec touch {} + \
 && cargo build --release --locked -p leasehold-cli \
 && install -D -m 0755 target/release/leasehold /out/leasehold

# ---------------------------------------------------------------------------
# runtime: glibc + libgcc from distroless, nothing else (no shell).
# ---------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="leasehold" \
      org.opencontainers.image.description="Short-lived, rotating database credentials for Kubernetes: controller and CSI node driver" \
      org.opencontainers.image.source="https://github.com/leasehold-dev/leasehold" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/leasehold /usr/local/bin/leasehold
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/leasehold"]
