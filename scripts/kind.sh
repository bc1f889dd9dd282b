#!/usr/bin/env bash
# docs/kubernetes.md's walk-through on a kind cluster: build the images, load them into kind,
# install Mecha with the development NATS, deploy examples/hello-python, call it through the
# gateway, let it scale to zero and call it again.
#
# Needs docker, kind, kubectl and curl. KIND_CLUSTER names the cluster (mecha); KIND_DELETE=1
# deletes it at the end. Not run on the development machines (no Docker daemon there).
set -euo pipefail
cd "$(dirname "$0")/.."

cluster="${KIND_CLUSTER:-mecha}"
tag="0.1.0"
example_image="mecha-examples/hello-python:$tag"
host="hello.default.example.com"
local_port="${GATEWAY_LOCAL_PORT:-8080}"

for tool in docker kind kubectl curl; do
  command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool is needed" >&2; exit 1; }
done

step() { printf '\n=== %s\n' "$*"; }

# Waits up to $1 seconds for the command after it to succeed.
wait_for() {
  local timeout="$1"; shift
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "error: timed out after ${timeout}s waiting for: $*" >&2
      return 1
    fi
    sleep 1
  done
}

step "kind cluster $cluster"
if ! kind get clusters | grep -qx "$cluster"; then
  kind create cluster --name "$cluster" --wait 120s
fi
kubectl config use-context "kind-$cluster" >/dev/null

step "building the images"
for image in autoscaler activator-sidecar eventing-broker importers; do
  docker build -f "deploy/docker/$image.Dockerfile" -t "mecha/$image:$tag" .
done
docker build -t "$example_image" examples/hello-python

step "loading them into kind"
for image in "mecha/autoscaler:$tag" "mecha/activator-sidecar:$tag" \
  "mecha/eventing-broker:$tag" "mecha/importers:$tag" "$example_image"; do
  kind load docker-image --name "$cluster" "$image"
done

step "installing Mecha (deploy/overlays/dev: deploy/ plus a one-server NATS)"
kubectl apply --server-side -k deploy/overlays/dev/
kubectl wait --for condition=Established --timeout=60s \
  crd/services.serving.knative.dev crd/revisions.serving.knative.dev \
  crd/brokers.eventing.knative.dev crd/triggers.eventing.knative.dev \
  crd/pingsources.sources.knative.dev
kubectl -n mecha-system rollout status statefulset/mecha-nats --timeout=180s
for deployment in mecha-autoscaler mecha-gateway mecha-broker mecha-importers; do
  kubectl -n mecha-system rollout status "deployment/$deployment" --timeout=180s
done

step "deploying examples/hello-python as $example_image"
sed "s#docker.io/library/python:3.11-slim#$example_image#" examples/hello-python/service.yaml \
  | kubectl apply -f -
kubectl wait ksvc/hello --for condition=Ready --timeout=180s
kubectl get ksvc hello
kubectl get revisions

step "calling it through the gateway"
kubectl -n mecha-system port-forward service/mecha-gateway "$local_port:80" >/dev/null &
forward=$!
cleanup() {
  kill "$forward" 2>/dev/null || true
  if [ "${KIND_DELETE:-0}" = 1 ]; then kind delete cluster --name "$cluster"; fi
}
trap cleanup EXIT
call() { curl -fsS --max-time 60 -H "Host: $host" "http://127.0.0.1:$local_port/"; }
wait_for 30 call
call

step "scaling to zero (windows shortened in config-autoscaler for the demo)"
kubectl -n mecha-system patch configmap config-autoscaler --type merge \
  -p '{"data":{"stable-window":"6s","scale-to-zero-grace-period":"6s"}}'
replicas() {
  kubectl get deployment hello-00001-deployment -o jsonpath='{.spec.replicas}'
}
at_zero() { [ "$(replicas)" = 0 ]; }
wait_for 180 at_zero
kubectl get revisions

step "calling it at zero: the gateway holds the request and pokes the autoscaler"
start=$(date +%s%N)
call
echo "answered after $(( ($(date +%s%N) - start) / 1000000 )) ms"
kubectl get revisions

echo
echo "Mecha runs on kind cluster $cluster; try: curl -H 'Host: $host' http://127.0.0.1:$local_port/"
echo "(the port-forward ends with this script; start your own with"
echo " kubectl -n mecha-system port-forward service/mecha-gateway $local_port:80)"
