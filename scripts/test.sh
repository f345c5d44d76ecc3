#!/usr/bin/env bash
# The full test suite from a clean clone: installs the test binaries, then runs every test
# (unit, CLI, integration and reliability against the real control plane and registry) of the
# workspace, then scans every controller log and the test output of the whole run for every
# secret value the tests used (scripts/leak-scan.py).
set -euo pipefail
cd "$(dirname "$0")/.."
REGCRED_TESTBIN="$(bash scripts/setup.sh | tail -n 1)"
export REGCRED_TESTBIN
REGCRED_LEAK_DIR="$(mktemp -d -t regcred-leak-scan-XXXXXX)"
export REGCRED_LEAK_DIR
cargo test --workspace --locked "$@" 2>&1 | tee "$REGCRED_LEAK_DIR/cargo-test-output.log"
# With a test filter some binaries record nothing; the scan is for the whole run.
if [ $# -eq 0 ]; then
  python3 scripts/leak-scan.py "$REGCRED_LEAK_DIR"
fi
rm -rf "$REGCRED_LEAK_DIR"
