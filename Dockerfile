# syntax=docker/dockerfile:1
#
# One image with both binaries, run as a non-root user on a read-only root
# filesystem (the Helm chart picks the binary with `command`):
#   /usr/local/bin/tracker-api     HTTP + WebSocket on 8080 (/metrics, /healthz, /readyz too)
#   /usr/local/bin/tracker-reaper  /metrics, /healthz, /readyz on 9090
#
#   docker build -t tracker:0.1.0 .
#   docker run --rm -p 8080:8080 tracker:0.1.0                     # the API
#   docker run --rm --entrypoint /usr/local/bin/tracker-reaper tracker:0.1.0
#
# The reaper embeds migrations/ at compile time (sqlx::migrate!), so the
# runtime image needs no SQL files. Needs BuildKit (cache mounts).

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# target/ lives in a cache mount, so the binaries are copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p tracker-api -p tracker-reaper \
    && mkdir -p /out \
    && cp target/release/tracker-api target/release/tracker-reaper /out/

# glibc, libgcc, CA certificates and a "nonroot" user (65532); no shell.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/tracker-api /out/tracker-reaper /usr/local/bin/
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/tracker-api"]
