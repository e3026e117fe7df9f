# syntax=docker/dockerfile:1
# Chat service image: build with the official Rust image, run on Debian slim.
#
#   docker build -t chat-service .
#
# Build stage. The build command is the one CI exercises (scripts/test.sh
# builds with `cargo … --locked`): `cargo build --release --locked`, limited
# to the service binary.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin chat-service \
 && install -D -m 0755 target/release/chat-service /out/chat-service

# Runtime stage. Debian slim rather than distroless: the chart's `helm test`
# and debugging sessions use its /bin/sh (e.g. `chat-service token > file`).
# The binary needs only glibc (no OpenSSL: nothing speaks TLS itself).
FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 chat \
 && useradd --system --uid 10001 --gid chat --home-dir /data --shell /usr/sbin/nologin chat \
 && install -d -o chat -g chat -m 0750 /data
COPY --from=build /out/chat-service /usr/local/bin/chat-service
# Read-only root filesystem friendly: nothing is written outside /data, and
# only the embedded mode writes at all (its SQLite file). Cluster mode
# (DATABASE_URL=postgres://…, as the Helm chart runs it) writes nothing.
WORKDIR /data
ENV DATABASE_URL=sqlite:///data/chat.db \
    LOG_FORMAT=json
USER 10001:10001
EXPOSE 8001
ENTRYPOINT ["/usr/local/bin/chat-service"]
CMD ["serve"]
