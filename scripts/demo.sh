#!/usr/bin/env bash
# The demo from a clean clone: builds the test control plane and regcred, then runs the
# end-to-end demo (pass --keep to leave everything running).
set -euo pipefail
cd "$(dirname "$0")/.."
REGCRED_TESTBIN="$(bash scripts/setup.sh | tail -n 1)"
export REGCRED_TESTBIN
cargo build --locked --bin regcred
REGCRED_BIN="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug/regcred"
export REGCRED_BIN
cargo run --locked -q -p regcred-testenv --bin demo -- "$@"
