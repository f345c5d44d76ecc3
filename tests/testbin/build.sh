#!/usr/bin/env bash
# Builds the binaries of the test environment (kube-apiserver, kube-controller-manager,
# kubectl, kubelet, kube-scheduler, testimage, etcd, registry, crane, helm, keyring-lookup,
# token-server, prometheus, promtool) from the published
# Go modules pinned in the go.mod/go.sum files beside this script, and caches them
# in ${REGCRED_TESTBIN_CACHE:-$HOME/.cache/regcred/testbin}/<key>/, where <key>
# hashes those files, this script and the Go version: a version bump rebuilds,
# an unchanged tree returns at once.
#
# Each module also has a key of its own: the Go version, its go.mod, go.sum and *.go
# files, and the text of its build_<module> function below (so a change in how it is
# built counts too). <key>/.keys/<module> holds that key on its first line and the
# module's binaries on the next ones. When a new <key> is built, a module whose key is
# recorded in an existing cache directory (the most recently used first) is not rebuilt:
# its binaries are hard-linked (or copied) from there. So adding or bumping one module
# builds only that module, not Kubernetes again.
#
# All progress goes to stderr; the last line of stdout is the absolute path of
# the directory holding the binaries.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
go=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
modules=(kubernetes node testimage etcd registry crane helm keyring tokenserver prometheus)
export CGO_ENABLED=0

# build_<module> DIR builds that module's binaries into the empty directory DIR and checks
# them before they are published, so a broken build is never cached.

# Like the Kubernetes release build (hack/lib/golang.sh, hack/lib/version.sh):
# static, trimmed, stripped, same build tags, version stamped so that /version
# and `kubectl version` report $k8s_version. buildDate is the tag's time, for
# reproducible output.
build_kubernetes() {
  local out=$1 k8s_version=v1.34.4
  local build_date minor ldflags="-s -w" pkg
  build_date=$("$go" -C "$here/kubernetes" list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)
  minor=${k8s_version#v1.}
  minor=${minor%%.*}
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
  done
  "$go" -C "$here/kubernetes" build -trimpath -buildvcs=false -tags selinux,notest,grpcnotrace -ldflags "$ldflags" -o "$out/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kubectl >&2
  "$out/kube-apiserver" --version | grep -qx "Kubernetes $k8s_version"
}

# The node (tests/testenv's Node): kubelet and kube-scheduler, built and stamped exactly like
# the control plane above from the same k8s.io/kubernetes version, in a module of their own
# (./node) so that adding them did not rebuild the control plane.
build_node() {
  local out=$1 k8s_version=v1.34.4
  local build_date minor ldflags="-s -w" pkg
  build_date=$("$go" -C "$here/node" list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)
  minor=${k8s_version#v1.}
  minor=${minor%%.*}
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
  done
  "$go" -C "$here/node" build -trimpath -buildvcs=false -tags selinux,notest,grpcnotrace -ldflags "$ldflags" -o "$out/" \
    k8s.io/kubernetes/cmd/kubelet \
    k8s.io/kubernetes/cmd/kube-scheduler >&2
  "$out/kubelet" --version | grep -qx "Kubernetes $k8s_version"
  "$out/kube-scheduler" --version | grep -qx "Kubernetes $k8s_version"
}

# The one program of the node tests' images (the pause image and the test images), static.
build_testimage() {
  "$go" -C "$here/testimage" build -trimpath -buildvcs=false -ldflags "-s -w" -o "$1/testimage" . >&2
  "$1/testimage" hello there | grep -qx 'hello there'
}

# The kubelet's image-pull credential lookup (./keyring), for tests/keyring.rs. Same
# flags as Kubernetes' own, so it reuses the packages compiled for those.
build_keyring() {
  local out=$1
  "$go" -C "$here/keyring" build -trimpath -buildvcs=false -tags selinux,notest,grpcnotrace -ldflags "-s -w" -o "$out/keyring-lookup" . >&2
  echo '{"auths":{"r.example.com":{"auth":"dTpw"}}}' | "$out/keyring-lookup" - r.example.com/a nginx |
    tr -d '\n' | grep -qx '{"image":"r.example.com/a",.*"found":true,"usernames":\["u"\]}{"image":"nginx",.*"found":false,.*}'
}

build_etcd() {
  "$go" -C "$here/etcd" build -trimpath -buildvcs=false -ldflags "-s -w" -o "$1/etcd" . >&2
}

build_registry() {
  "$go" -C "$here/registry" build -trimpath -buildvcs=false -ldflags "-s -w" -o "$1/registry" github.com/distribution/distribution/v3/cmd/registry >&2
}

build_crane() {
  "$go" -C "$here/crane" build -trimpath -buildvcs=false -ldflags "-s -w" -o "$1/crane" github.com/google/go-containerregistry/cmd/crane >&2
}

# Stamped like helm's Makefile, so that `helm version` reports the pinned release.
build_helm() {
  local out=$1 helm_version
  helm_version=$("$go" -C "$here/helm" list -m -f '{{.Version}}' helm.sh/helm/v3)
  "$go" -C "$here/helm" build -trimpath -buildvcs=false -o "$out/helm" \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version -X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
    helm.sh/helm/v3/cmd/helm >&2
  "$out/helm" version --short | grep -q "^$helm_version"
}

# distribution's example token server, for registries with token auth. -h exits 0 with
# the usage, which must name the flags testenv passes.
build_tokenserver() {
  "$go" -C "$here/tokenserver" build -trimpath -buildvcs=false -ldflags "-s -w" -o "$1/token-server" github.com/docker/distribution/contrib/token-server >&2
  "$1/token-server" -h 2>&1 | grep -q -- '-passwd'
}

# prometheus and promtool, for the chart's alerting rules and dashboard (promtool check and test
# rules in scripts/test.sh, a live Prometheus in tests/integration/alerts.rs). Stamped like
# Prometheus' own release (module v0.316.0 is Prometheus 3.16.0). remove_all_sd leaves out the
# service discovery plugins (cloud SDKs) the tests do not use: static and file discovery stay.
# Without the builtinassets tag the web UI is not embedded; the HTTP API is all the tests use.
build_prometheus() {
  local out=$1 module version release
  module=$("$go" -C "$here/prometheus" list -m -f '{{.Version}}' github.com/prometheus/prometheus)
  version=${module#v0.}
  release="$((${version%%.*} / 100)).$((${version%%.*} % 100)).${version#*.}"
  "$go" -C "$here/prometheus" build -trimpath -buildvcs=false -tags remove_all_sd -o "$out/" \
    -ldflags "-s -w -X github.com/prometheus/common/version.Version=$release -X github.com/prometheus/common/version.Branch=HEAD" \
    github.com/prometheus/prometheus/cmd/prometheus \
    github.com/prometheus/prometheus/cmd/promtool >&2
  "$out/prometheus" --version 2>&1 | grep -q "^prometheus, version $release "
  "$out/promtool" --version 2>&1 | grep -q "^promtool, version $release "
}

module_key() {
  (
    cd "$here"
    shopt -s nullglob
    "$go" version
    "$go" env GOOS GOARCH CGO_ENABLED
    declare -f "build_$1"
    sha256sum "$1"/go.mod "$1"/go.sum "$1"/*.go
  ) | sha256sum | cut -c1-16
}

# Prints the cache directory, most recently used first, that recorded key $2 for module $1
# and still holds all its binaries; fails if there is none.
reusable() {
  local dir bin
  while read -r dir; do
    [[ -f $dir/.keys/$1 && $(head -n1 "$dir/.keys/$1") == "$2" ]] || continue
    while read -r bin; do
      [[ -f $dir/$bin ]] || continue 2
    done < <(tail -n +2 "$dir/.keys/$1")
    echo "$dir"
    return 0
  done < <(find "$cache_root" -mindepth 1 -maxdepth 1 -type d -regextype posix-extended -regex '.*/[0-9a-f]{16}' -printf '%T@ %p\n' | sort -rn | cut -d' ' -f2-)
  return 1
}

cache_root=${REGCRED_TESTBIN_CACHE:-$HOME/.cache/regcred/testbin}
mkdir -p "$cache_root"
cache_root=$(cd "$cache_root" && pwd)

key=$(
  cd "$here"
  shopt -s nullglob
  {
    "$go" version
    "$go" env GOOS GOARCH
    sha256sum build.sh
    for m in "${modules[@]}"; do sha256sum "$m"/go.mod "$m"/go.sum "$m"/*.go; done
  } | sha256sum | cut -c1-16
)
out=$cache_root/$key

if [[ -d $out ]]; then
  touch "$out" # marks it as in use, see the pruning below
  echo "$out"
  exit 0
fi

# One build at a time: parallel test processes wait for the first one's build
# instead of each spending many CPU minutes on their own.
exec 9>"$cache_root/.lock"
flock 9
if [[ -d $out ]]; then
  echo "$out"
  exit 0
fi
# Left-overs of interrupted builds (we hold the lock, so none is running), and
# builds no checkout has used for a week.
rm -rf "$cache_root"/.tmp-*
find "$cache_root" -mindepth 1 -maxdepth 1 -type d -name '[0-9a-f]*' -mtime +7 -exec rm -rf {} +

tmp=$(mktemp -d "$cache_root/.tmp-$key.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS
echo "testbin: building into $out (cold builds take a while)" >&2
mkdir "$tmp/.keys"
for m in "${modules[@]}"; do
  mkey=$(module_key "$m")
  if src=$(reusable "$m" "$mkey"); then
    tail -n +2 "$src/.keys/$m" | while read -r bin; do
      ln "$src/$bin" "$tmp/$bin" 2>/dev/null || cp -p "$src/$bin" "$tmp/$bin"
    done
    cp "$src/.keys/$m" "$tmp/.keys/$m"
    echo "testbin: $m unchanged, reused from $src" >&2
  else
    mkdir "$tmp/.build-$m"
    "build_$m" "$tmp/.build-$m"
    { echo "$mkey" && ls -A "$tmp/.build-$m"; } >"$tmp/.keys/$m"
    # -n and rmdir: two modules making a binary of the same name is an error, not an overwrite.
    mv -n "$tmp/.build-$m"/* "$tmp/"
    rmdir "$tmp/.build-$m"
    echo "testbin: $m built after $((SECONDS - start))s" >&2
  fi
done

chmod 755 "$tmp" # mktemp made it private
# Publish atomically: readers only ever see a complete directory.
mv -T "$tmp" "$out"
trap - EXIT
echo "testbin: done in $((SECONDS - start))s" >&2
echo "$out"
