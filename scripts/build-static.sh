#!/usr/bin/env bash
# Builds a fully static release binary of regcred against glibc (no musl target needed), then
# checks it: no ELF interpreter (PT_INTERP), `ldd` agrees, and it runs in an empty environment
# (`--version`, and `crdgen` reproduces crds/ exactly). Honours CARGO_TARGET_DIR. The Dockerfile
# runs this same script. Prints the binary's path as its last line.
#
# `--no-check` only builds: the Dockerfile's dependency layer builds stub sources with it.
#
# --target is passed explicitly so that only the binary is linked with +crt-static: without it,
# RUSTFLAGS would also apply to build scripts and proc-macros, which cannot be static.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "build-static: $*" >&2; exit 1; }
check=1
case "${1:-}" in
  --no-check) check=0 ;;
  "") ;;
  *) fail "usage: $0 [--no-check]" ;;
esac

target=$(rustc -vV | sed -n 's/^host: //p')
case "$target" in
  *-linux-gnu) ;;
  *) fail "host $target is not *-linux-gnu; this script links statically against glibc" ;;
esac

export RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static"
cargo build --release --locked --target "$target" -p regcred --bin regcred >&2

target_dir=$(cargo metadata --format-version 1 --no-deps --locked |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
bin="$target_dir/$target/release/regcred"
[ -x "$bin" ] || fail "$bin was not built"
if [ "$check" = 0 ]; then
  echo "$bin"
  exit 0
fi

# 1. No program interpreter: the kernel runs the file without ld.so and no shared library is
# loaded. The program headers are read with od (coreutils), so no binutils or python is needed.
u() { od -An -t "u$2" -j "$1" -N "$2" "$bin" | tr -d ' '; }
[ "$(od -An -c -j 1 -N 3 "$bin" | tr -d ' ')" = ELF ] || fail "$bin is not an ELF file"
[ "$(u 4 1)" = 2 ] || fail "$bin is not a 64-bit ELF file"
phoff=$(u 32 8) phentsize=$(u 54 2) phnum=$(u 56 2)
for ((i = 0; i < phnum; i++)); do
  [ "$(u $((phoff + i * phentsize)) 4)" != 3 ] || fail "$bin has a PT_INTERP program header (dynamically linked)"
done
# ldd (libc-bin, on every glibc system) must agree.
ldd_out=$(ldd "$bin" 2>&1 | sed 's/^[[:space:]]*//' || true)
case "$ldd_out" in
  *"statically linked"* | *"not a dynamic executable"*) ;;
  *) fail "ldd lists shared libraries: $ldd_out" ;;
esac

# 2. Runs with no environment at all (no PATH, HOME, locale), as in a distroless image.
version=$(env -i "$bin" --version) || fail "env -i $bin --version failed"
crd_dir=$(mktemp -d)
trap 'rm -rf "$crd_dir"' EXIT
env -i "$bin" crdgen --dir "$crd_dir" || fail "env -i $bin crdgen failed"
diff -r crds "$crd_dir" >&2 || fail "crdgen of the static binary differs from crds/"
# Without --dir, crdgen prints each CRD after a `---` line, in file-name order (as crd::crds()).
cmp -s <(env -i "$bin" crdgen) <(for f in crds/*.yaml; do printf -- '---\n'; cat "$f"; done) ||
  fail "env -i $bin crdgen does not print crds/*.yaml"

echo "build-static: $version, statically linked ($ldd_out), $(du -h "$bin" | cut -f1) ($(stat -c %s "$bin") bytes)" >&2
echo "$bin"
