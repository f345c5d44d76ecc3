#!/usr/bin/env bash
# The full test suite from a clean clone: installs the test binaries, then runs every test
# (unit, CLI, integration against the real control plane and registry) of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
REGCRED_TESTBIN="$(bash scripts/setup.sh | tail -n 1)"
export REGCRED_TESTBIN
cargo test --workspace --locked "$@"
