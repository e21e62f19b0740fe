#!/usr/bin/env bash
# Run the five Jobs in order, each after the one before has completed.
#   kubectl create secret generic kukla-s3 --from-literal=AWS_ACCESS_KEY_ID=… --from-literal=AWS_SECRET_ACCESS_KEY=…
#   kubectl create secret generic kukla-hf --from-literal=HF_TOKEN=…
#   docker/k8s/run.sh
set -euo pipefail
cd "$(dirname "$0")"
kubectl apply -f storage.yaml
for step in harvest finalize finalize-commit train evaluate; do
  kubectl apply -f "$step.yaml"
  until kubectl wait --for=condition=complete --timeout=60s "job/kukla-$step" 2>/dev/null; do
    if kubectl wait --for=condition=failed --timeout=0s "job/kukla-$step" 2>/dev/null; then
      echo "job/kukla-$step failed: kubectl logs job/kukla-$step" >&2
      exit 1
    fi
  done
done
