# mecha/autoscaler: the control plane (package `k8s`, binary `autoscaler`) and the
# ApiServerSource receive adapter (binary `apiserver-adapter`, which the adapter Deployments
# the control plane makes start with `command: [/usr/local/bin/apiserver-adapter]`).
# Build from the repository root:
#   docker build -f deploy/docker/autoscaler.Dockerfile -t mecha/autoscaler:0.1.0 .
# The toolchain comes from rust-toolchain.toml; the runtime image has glibc and CA
# certificates and nothing else (no shell), and runs as the unprivileged user 65532.

FROM docker.io/library/rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release -p k8s --bin autoscaler --bin apiserver-adapter \
    && cp target/release/autoscaler target/release/apiserver-adapter /usr/local/bin/

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /usr/local/bin/autoscaler /usr/local/bin/autoscaler
COPY --from=builder /usr/local/bin/apiserver-adapter /usr/local/bin/apiserver-adapter
USER 65532:65532
EXPOSE 8080 8022
ENTRYPOINT ["/usr/local/bin/autoscaler"]
