#!/usr/bin/env bash
# The Python the tests run their emulators with (tests/aws/emulator.py, tests/gcp/emulator.py):
# a virtual environment made with python3 from PATH (3.10 or later: the pinned moto's minimum),
# with tests/aws/requirements.txt and tests/gcp/requirements.txt installed from PyPI. Nothing
# is installed into python3 itself, which a distribution's Python refuses anyway (PEP 668,
# EXTERNALLY-MANAGED: Debian 12, Ubuntu 24.04).
#
# The environment is <root>/<key>/, where <root> is the first writable one of
# ${REGCRED_VENV_CACHE:-$HOME/.cache/regcred/venv}, ${CARGO_TARGET_DIR:-target}/regcred-venv
# and ${TMPDIR:-/tmp}/regcred-venv-<uid>, and <key> hashes both requirements files, this script
# and that python3 (its real path and version): a change makes a new one, an unchanged tree
# returns at once. Environments no checkout has used for a week are removed.
#
# Prints the environment's python as the last line of stdout; progress goes to stderr.
# With --find it makes nothing: it prints that python if a complete environment for this tree
# and this python3 exists (tests/testenv does this when REGCRED_PYTHON is unset), else fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

find_only=false
case "${1:-}" in
  --find) find_only=true ;;
  "") ;;
  *) echo "usage: $0 [--find]" >&2; exit 2 ;;
esac

fail() { echo "python-venv: $*" >&2; exit 1; }

command -v python3 >/dev/null 2>&1 || fail "python3 is required but not installed (3.10 or later, with its venv module)"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
  fail "python3 ($(command -v python3)) is $(python3 -V 2>&1); the emulators' packages need Python 3.10 or later"

key=$(
  {
    python3 -c 'import os, sys; print(os.path.realpath(sys.executable)); print(sys.version)'
    sha256sum scripts/python-venv.sh tests/aws/requirements.txt tests/gcp/requirements.txt
  } | sha256sum | cut -c1-16
)
roots=()
if [ -n "${REGCRED_VENV_CACHE:-}" ]; then
  roots+=("$REGCRED_VENV_CACHE")
elif [ -n "${HOME:-}" ]; then
  roots+=("$HOME/.cache/regcred/venv")
fi
roots+=("${CARGO_TARGET_DIR:-$PWD/target}/regcred-venv" "${TMPDIR:-/tmp}/regcred-venv-$(id -u)")

if $find_only; then
  for root in "${roots[@]}"; do
    if [ -f "$root/$key/.complete" ]; then
      touch "$root/$key" 2>/dev/null || true # marks it as in use, see the pruning below
      echo "$(cd "$root/$key" && pwd)/bin/python"
      exit 0
    fi
  done
  fail "no environment for this tree and $(command -v python3) yet (scripts/setup.sh makes it)"
fi

root=""
for candidate in "${roots[@]}"; do
  if mkdir -p "$candidate" 2>/dev/null && [ -w "$candidate" ]; then
    root=$(cd "$candidate" && pwd)
    break
  fi
done
[ -n "$root" ] || fail "none of ${roots[*]} can be written"
venv=$root/$key

if [ -f "$venv/.complete" ]; then
  touch "$venv"
  echo "$venv/bin/python"
  exit 0
fi

# One at a time: parallel runs wait for the first one's environment.
exec 9>"$root/.lock"
flock 9
if [ -f "$venv/.complete" ]; then
  echo "$venv/bin/python"
  exit 0
fi
# An interrupted one of this key (we hold the lock, so none is being made), and those no
# checkout has used for a week.
rm -rf "$venv"
find "$root" -mindepth 1 -maxdepth 1 -type d -regextype posix-extended -regex '.*/[0-9a-f]{16}' -mtime +7 -exec rm -rf {} +

trap 'rm -rf "$venv"' EXIT
echo "python-venv: making $venv with $(command -v python3) ($(python3 -V 2>&1)) for the emulators" >&2
python3 -m venv "$venv" >&2 ||
  fail "python3 -m venv failed: python3's venv module (or ensurepip) is missing; on Debian and Ubuntu install python3-venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  -r tests/aws/requirements.txt -r tests/gcp/requirements.txt >&2
# What the emulators import, so that a broken environment is never marked complete.
"$venv/bin/python" -c 'import jwt, cryptography.hazmat.primitives.asymmetric.ec, werkzeug.serving
import moto.core.responses, moto.ecr.responses, moto.moto_server.werkzeug_app'
touch "$venv/.complete"
trap - EXIT
echo "$venv/bin/python"
