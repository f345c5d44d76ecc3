#!/usr/bin/env bash
# The full test suite from a clean clone: installs the test binaries and the emulators' Python
# environment, runs promtool on the chart's alerting rules, then runs every test (unit, CLI,
# integration and reliability against the real control plane and registry) of the workspace,
# every test binary even after one fails, then scans every controller log and the test output
# of the whole run for every secret value the tests used (scripts/leak-scan.py, standard
# library only).
set -euo pipefail
cd "$(dirname "$0")/.."
# setup.sh prints REGCRED_PYTHON=<the emulators' python> and, last, the test binaries' directory.
setup_out="$(bash scripts/setup.sh)"
REGCRED_TESTBIN="$(tail -n 1 <<<"$setup_out")"
REGCRED_PYTHON="$(sed -n 's/^REGCRED_PYTHON=//p' <<<"$setup_out")"
export REGCRED_TESTBIN REGCRED_PYTHON
# The chart's alerting rules: promtool checks the rule file and runs its unit tests, which
# prove when each alert fires (its `for`) and what it says (tests/prometheus/).
"$REGCRED_TESTBIN/promtool" check rules charts/regcred/files/alerts.yaml
"$REGCRED_TESTBIN/promtool" test rules tests/prometheus/alerts.test.yaml
# The static binary the controller image is built from (the node runs that image): the build
# .ci/run made just before (the same flags, so cargo has nothing to do), or a build now.
REGCRED_STATIC_BIN="$(CARGO_PROFILE_RELEASE_OPT_LEVEL=0 CARGO_PROFILE_RELEASE_DEBUG=false bash scripts/build-static.sh | tail -n 1)"
export REGCRED_STATIC_BIN
REGCRED_LEAK_DIR="$(mktemp -d -t regcred-leak-scan-XXXXXX)"
export REGCRED_LEAK_DIR
# --no-fail-fast: a failing test binary does not keep the others from running. pipefail (above)
# makes a failure of cargo test, not tee's status, that of the pipeline, so the script fails.
cargo test --workspace --locked --no-fail-fast "$@" 2>&1 | tee "$REGCRED_LEAK_DIR/cargo-test-output.log"
# With a test filter some binaries record nothing; the scan is for the whole run.
if [ $# -eq 0 ]; then
  python3 scripts/leak-scan.py "$REGCRED_LEAK_DIR"
fi
rm -rf "$REGCRED_LEAK_DIR"
