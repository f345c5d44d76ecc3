#!/usr/bin/env bash
# Installs what the tests and the demo need on a fresh machine, from package registries only:
# builds kube-apiserver, kube-controller-manager, kubectl, kubelet, kube-scheduler, etcd, a
# registry and crane from published Go modules (cached under ~/.cache/regcred/testbin when
# present), and, as root on a Debian-like machine, installs containerd and runc with apt-get
# for the test node (tests/testenv's Node) when they are missing.
# Prints the directory holding those binaries as its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1 || { echo "setup: $1 is required but not installed" >&2; exit 1; }; }
need go
need cargo

# The test node runs Debian's containerd and runc, and gives Pods an address with the CNI plugins
# (containernetworking-plugins: bridge, host-local, loopback; the chart's Pods need them). Only
# root can run a node, so only root installs them; elsewhere the node tests say why they cannot
# run (or skip with REGCRED_SKIP_NODE=1).
if ! command -v containerd >/dev/null 2>&1 || ! command -v runc >/dev/null 2>&1 || [ ! -x /usr/lib/cni/bridge ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing containerd, runc and the CNI plugins with apt-get (for the test node)" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      containerd runc containernetworking-plugins >&2
  else
    echo "setup: containerd, runc or the CNI plugins are missing and cannot be installed here (needs root" \
      "and apt-get): the node tests will fail unless REGCRED_SKIP_NODE=1 is set" >&2
  fi
fi

python3 -m pip install --quiet --disable-pip-version-check -r tests/aws/requirements.txt >&2 # AWS emulator (ECR tests)
python3 -m pip install --quiet --disable-pip-version-check -r tests/gcp/requirements.txt >&2 # Google emulator (Artifact Registry tests)
bash tests/testbin/build.sh
