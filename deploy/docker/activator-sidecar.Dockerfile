# mecha/activator-sidecar: the data path (package `activator-sidecar`, binary of the same
# name). One image for its three roles: `gateway` (the mecha-gateway Deployment), `inbound`
# (every revision's pod) and `outbound` (pods that opt into the mesh).
# Build from the repository root:
#   docker build -f deploy/docker/activator-sidecar.Dockerfile -t mecha/activator-sidecar:0.1.0 .

FROM docker.io/library/rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release -p activator-sidecar --bin activator-sidecar \
    && cp target/release/activator-sidecar /usr/local/bin/activator-sidecar

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /usr/local/bin/activator-sidecar /usr/local/bin/activator-sidecar
USER 65532:65532
EXPOSE 8080 8012 8022
ENTRYPOINT ["/usr/local/bin/activator-sidecar"]
