#!/usr/bin/env bash
# Installs what the tests and the demo need on a fresh machine, from package registries only:
# builds kube-apiserver, kube-controller-manager, kubectl, kubelet, kube-scheduler, etcd, a
# registry and crane from published Go modules (cached under ~/.cache/regcred/testbin when
# present), and, as root on a Debian-like machine, installs containerd and runc with apt-get
# for the test node (tests/testenv's Node) when they are missing; makes a Python virtual
# environment with the emulators' packages from PyPI (scripts/python-venv.sh), installing
# python3-venv with apt-get as root on such a machine when python3 lacks it.
# Prints `REGCRED_PYTHON=<that environment's python>` and then, as its last line, the directory
# holding those binaries (scripts/test.sh exports both).
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1 || { echo "setup: $1 is required but not installed" >&2; exit 1; }; }
need go
need cargo
need python3

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

# The emulators' packages (AWS: ECR tests; Google: Artifact Registry tests) go into a virtual
# environment, never into python3 itself: a distribution's Python refuses that (PEP 668). Debian
# and Ubuntu ship venv's ensurepip in a package of its own, python3-venv, which only helps the
# distribution's python3 (/usr/bin).
python_has_venv() { python3 -c 'import venv, ensurepip' >/dev/null 2>&1; }
if ! python_has_venv; then
  python3_path=$(python3 -c 'import os, sys; print(os.path.realpath(sys.executable))')
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1 && [[ $python3_path == /usr/bin/* ]]; then
    echo "setup: installing python3-venv with apt-get ($python3_path cannot make a virtual environment)" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >&2
  fi
  python_has_venv || {
    echo "setup: python3 ($python3_path) cannot make a virtual environment (no venv or ensurepip module):" \
      "install python3-venv (Debian, Ubuntu: apt-get install python3-venv) or put a Python 3.10+ that has it first on PATH" >&2
    exit 1
  }
fi
python=$(bash scripts/python-venv.sh | tail -n 1)
echo "REGCRED_PYTHON=$python"

bash tests/testbin/build.sh
