# syntax=docker/dockerfile:1.7
#
# One build, three images. The builder compiles the workspace once; each final
# stage is a small runtime image with a single entrypoint:
#
#   docker build --target core-bank -t bank-core-bank .
#   docker build --target transfer  -t bank-transfer  .
#   docker build --target projector -t bank-projector .
#
# BuildKit cache mounts keep the cargo registry and the target directory
# between builds, so a rebuild recompiles only what changed. Binaries are
# copied out of the cache mount (it is not part of the image layer).

FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --bins --locked -p core-bank -p transfer -p projector \
    && mkdir -p /out \
    && cp target/release/core-bank target/release/transfer target/release/projector /out/

# Runtime: CA certificates only (TLS is rustls; time zones are compiled in),
# no shell tools beyond the Debian base, no compilers, a fixed non-root user.
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 bank \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin bank
COPY --from=builder /out/core-bank /out/transfer /out/projector /usr/local/bin/
LABEL org.opencontainers.image.title="bank-backbone" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 10001:10001
WORKDIR /
# On SIGTERM a service turns /readyz to 503, waits SHUTDOWN_DRAIN_DELAY_MS,
# closes its listener, finishes in-flight work and exits 0.
STOPSIGNAL SIGTERM

FROM runtime AS core-bank
ENV CORE_HTTP_ADDR=0.0.0.0:8081
EXPOSE 8081
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/core-bank"]

FROM runtime AS transfer
ENV TRANSFER_HTTP_ADDR=0.0.0.0:8080
EXPOSE 8080
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/transfer"]

FROM runtime AS projector
ENV PROJECTOR_HTTP_ADDR=0.0.0.0:8082
EXPOSE 8082
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/projector"]
