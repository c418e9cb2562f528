# syntax=docker/dockerfile:1
#
# llm-quota container image.
#
#   docker build -t llm-quota .
#   docker run -p 8000:8000 -p 127.0.0.1:8001:8001 -v llm-quota-data:/data llm-quota
#
# Embedded mode by default (SQLite in the /data volume). Cluster mode: set
# REDIS_URL, DATABASE_URL=postgres://… and ADMIN_PASSWORD, and run
# `llm-quota migrate` once per release (docker-compose.yml and the Helm chart
# do). See docs/deployment.md.

ARG RUST_VERSION=1
ARG DEBIAN_RELEASE=bookworm

############################################################################
# Build stage
############################################################################
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /build

# 1. Dependencies only, so they stay in a cached layer until Cargo.toml or
#    Cargo.lock change: build the real manifests with stub sources. The
#    workspace has two members, so the bench member needs its manifest and a
#    stub too (cargo refuses a member without targets).
COPY Cargo.toml Cargo.lock ./
COPY bench/Cargo.toml bench/Cargo.toml
RUN mkdir -p src bench/src \
 && echo 'fn main() {}' > src/main.rs \
 && : > src/lib.rs \
 && echo 'fn main() {}' > bench/src/main.rs \
 && cargo build --release --locked -p llm-quota --bin llm-quota \
 && rm -rf src bench/src \
    target/release/llm-quota target/release/llm-quota.d \
    target/release/.fingerprint/llm-quota-* \
    target/release/deps/llm_quota-* target/release/deps/libllm_quota-*

# 2. The real sources. Everything the binary embeds at compile time comes
#    with them: migrations/ (sqlx::migrate!), lua/, templates/ and static/
#    (include_str!/include_bytes!); .dockerignore lists what stays out.
#    The stub's fingerprints were removed above, so the crate is rebuilt
#    whatever the files' timestamps are.
#    The release profile keeps line tables (about 90 MB); the image gets the
#    binary without them (about 20 MB, symbols kept, so panics still name
#    functions). --build-arg STRIP_DEBUG=false keeps them.
ARG STRIP_DEBUG=true
COPY . .
RUN cargo build --release --locked -p llm-quota --bin llm-quota \
 && install -D -m 0755 target/release/llm-quota /out/llm-quota \
 && if [ "$STRIP_DEBUG" = true ]; then strip --strip-debug /out/llm-quota; fi \
 && install -d -m 0750 /out/rootfs/data /out/rootfs/data/logs

############################################################################
# Health-check helper: one static busybox binary (about 1 MB). The runtime
# image has no shell, curl or wget; `busybox wget` serves the HEALTHCHECK and
# `busybox sleep` the Kubernetes preStop hook.
############################################################################
FROM busybox:1.37-musl AS busybox

############################################################################
# Runtime: distroless/cc (glibc, libgcc, CA certificates, tzdata, a nonroot
# user; no shell, no package manager). The binary is built on the same
# Debian release, so the glibc matches. TLS to the upstream uses rustls with
# bundled roots; time zones are compiled in (chrono-tz).
############################################################################
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime

COPY --from=busybox /bin/busybox /usr/local/bin/busybox
COPY --from=builder /out/llm-quota /usr/local/bin/llm-quota
# The data volume's mount point, owned by the runtime user (65532, distroless
# "nonroot"): a fresh named volume takes this ownership. A bind mount needs
# `chown 65532:65532` on the host.
COPY --from=builder --chown=65532:65532 /out/rootfs/ /

# Container defaults (all overridable, see the README's configuration table):
# - the admin API listens on every interface of the container, because
#   127.0.0.1 inside a container is unreachable from outside it; publish it
#   to the host's loopback only (`-p 127.0.0.1:8001:8001`). Every admin route
#   still needs ADMIN_PASSWORD.
# - embedded mode keeps its SQLite database and the usage log in /data.
ENV PROXY_HOST=0.0.0.0 \
    PROXY_PORT=8000 \
    ADMIN_HOST=0.0.0.0 \
    ADMIN_PORT=8001 \
    METRICS_PORT=9100 \
    DATABASE_URL=sqlite:///data/llm-quota.db \
    LOG_FILE=/data/logs/usage.log

WORKDIR /data
VOLUME ["/data"]
USER 65532:65532

# proxy, admin API, Prometheus /metrics
EXPOSE 8000 8001 9100

# Liveness of the proxy listener. busybox wget exits non-zero on a refused
# connection, a timeout or any non-2xx answer. The shell form (busybox sh)
# follows a changed PROXY_PORT.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["/usr/local/bin/busybox", "sh", "-c", "exec /usr/local/bin/busybox wget -q -T 4 -O /dev/null http://127.0.0.1:${PROXY_PORT:-8000}/healthz"]

# The gateway handles SIGTERM itself (stops accepting, lets in-flight
# requests finish for up to SHUTDOWN_GRACE, flushes usage), also as PID 1.
# Give it that long: `docker stop -t`, compose `stop_grace_period`,
# Kubernetes `terminationGracePeriodSeconds`.
STOPSIGNAL SIGTERM

# `docker run IMAGE migrate` runs the embedded migrations against
# DATABASE_URL and exits.
ENTRYPOINT ["/usr/local/bin/llm-quota"]
