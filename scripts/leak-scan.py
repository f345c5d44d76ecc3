#!/usr/bin/env python3
"""The end-of-run leak check: no secret value that any test used appears in any controller
log of the whole run or in the captured test output.

The tests write every value they use (and its base64 `auth` form) to used-secrets-<pid>.txt
in $REGCRED_LEAK_DIR and log their controllers there (regcred-<pid>-<name>.log); the in-test
`assert_no_leaks` also covers Events, statuses and metrics while the cluster is up. This
check runs after every test binary has finished, so it sees the logs of all of them.
"""
import pathlib
import sys

directory = pathlib.Path(sys.argv[1])
values = set()
for path in directory.glob("used-secrets-*.txt"):
    values.update(line for line in path.read_text().splitlines() if len(line) >= 8)
haystacks = sorted(p for p in directory.iterdir() if p.suffix == ".log")
if not values or not haystacks:
    sys.exit(f"leak scan: nothing to check in {directory} ({len(values)} values, {len(haystacks)} logs)")

leaks = []
size = 0
for path in haystacks:
    text = path.read_text(errors="replace")
    size += len(text)
    leaks += [(path.name, value[:6]) for value in values if value in text]
if leaks:
    for name, prefix in leaks:
        print(f"leak scan: a secret value ({prefix}…) appears in {name}", file=sys.stderr)
    sys.exit(1)
print(f"leak scan: {len(values)} secret values, {len(haystacks)} logs ({size / 1e6:.1f} MB): none found")
