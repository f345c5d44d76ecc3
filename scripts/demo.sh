#!/usr/bin/env bash
# The demo from a clean clone: builds the test control plane and regcred, then runs the
# end-to-end demo (pass --keep to leave everything running). Where the machine can run a node
# (root, containerd and runc: scripts/setup.sh installs them as root) it runs a real Pod from a
# private image with the Secret regcred wrote; elsewhere it says why it cannot.
set -euo pipefail
cd "$(dirname "$0")/.."
REGCRED_TESTBIN="$(bash scripts/setup.sh | tail -n 1)"
export REGCRED_TESTBIN
cargo build --locked --bin regcred
REGCRED_BIN="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug/regcred"
export REGCRED_BIN
cargo run --locked -q -p regcred-testenv --bin demo -- "$@"
