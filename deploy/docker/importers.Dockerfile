# mecha/importers: the event sources (package `importers`, binary of the same name), built
# with its default feature `standalone` (the binary, with the Redis, NATS and MQTT clients).
# Build from the repository root:
#   docker build -f deploy/docker/importers.Dockerfile -t mecha/importers:0.1.0 .

FROM docker.io/library/rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release -p importers --bin importers \
    && cp target/release/importers /usr/local/bin/importers

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /usr/local/bin/importers /usr/local/bin/importers
USER 65532:65532
EXPOSE 8080 8022
ENTRYPOINT ["/usr/local/bin/importers"]
