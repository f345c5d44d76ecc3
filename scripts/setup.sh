#!/usr/bin/env bash
# Installs what the tests and the demo need on a fresh machine, from package registries only:
# builds kube-apiserver, kube-controller-manager, kubectl, etcd, a registry and crane from
# published Go modules (cached under ~/.cache/regcred/testbin when present).
# Prints the directory holding those binaries as its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1 || { echo "setup: $1 is required but not installed" >&2; exit 1; }; }
need go
need cargo

python3 -m pip install --quiet --disable-pip-version-check -r tests/aws/requirements.txt >&2 # AWS emulator (ECR tests)
python3 -m pip install --quiet --disable-pip-version-check -r tests/gcp/requirements.txt >&2 # Google emulator (Artifact Registry tests)
bash tests/testbin/build.sh
