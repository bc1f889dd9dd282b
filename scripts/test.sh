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

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
