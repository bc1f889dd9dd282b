# mecha/eventing-broker: Broker ingress and Trigger dispatch (package `eventing-broker`,
# binary of the same name), built with the NATS JetStream log (feature `jetstream`).
# Build from the repository root:
#   docker build -f deploy/docker/eventing-broker.Dockerfile -t mecha/eventing-broker:0.1.0 .

FROM docker.io/library/rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release -p eventing-broker --bin eventing-broker --features jetstream \
    && cp target/release/eventing-broker /usr/local/bin/eventing-broker

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /usr/local/bin/eventing-broker /usr/local/bin/eventing-broker
USER 65532:65532
EXPOSE 8080 8022
ENTRYPOINT ["/usr/local/bin/eventing-broker"]
