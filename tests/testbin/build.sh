#!/usr/bin/env bash
# Builds the binaries of the test environment (kube-apiserver,
# kube-controller-manager, kubectl, etcd, registry, crane, helm, keyring-lookup) from the
# published Go modules pinned in the go.mod/go.sum files beside this script, and caches them
# in ${REGCRED_TESTBIN_CACHE:-$HOME/.cache/regcred/testbin}/<key>/, where <key>
# hashes those files, this script and the Go version: a version bump rebuilds,
# an unchanged tree returns at once.
#
# All progress goes to stderr; the last line of stdout is the absolute path of
# the directory holding the binaries.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
go=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
modules=(kubernetes etcd registry crane helm keyring)
k8s_version=v1.34.4

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

# Like the Kubernetes release build (hack/lib/golang.sh, hack/lib/version.sh):
# static, trimmed, stripped, same build tags, version stamped so that /version
# and `kubectl version` report $k8s_version. buildDate is the tag's time, for
# reproducible output.
build_date=$("$go" -C "$here/kubernetes" list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)
minor=${k8s_version#v1.}
minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
done

export CGO_ENABLED=0
"$go" -C "$here/kubernetes" build -trimpath -buildvcs=false -tags selinux,notest,grpcnotrace -ldflags "$ldflags" -o "$tmp/" \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kubectl >&2
# The kubelet's image-pull credential lookup (./keyring), for tests/keyring.rs. Same
# flags as above, so it reuses the packages compiled for those.
"$go" -C "$here/keyring" build -trimpath -buildvcs=false -tags selinux,notest,grpcnotrace -ldflags "-s -w" -o "$tmp/keyring-lookup" . >&2
echo "testbin: kubernetes done after $((SECONDS - start))s" >&2
"$go" -C "$here/etcd" build -trimpath -buildvcs=false -ldflags "-s -w" -o "$tmp/etcd" . >&2
"$go" -C "$here/registry" build -trimpath -buildvcs=false -ldflags "-s -w" -o "$tmp/registry" github.com/distribution/distribution/v3/cmd/registry >&2
"$go" -C "$here/crane" build -trimpath -buildvcs=false -ldflags "-s -w" -o "$tmp/crane" github.com/google/go-containerregistry/cmd/crane >&2
# Stamped like helm's Makefile, so that `helm version` reports the pinned release.
helm_version=$("$go" -C "$here/helm" list -m -f '{{.Version}}' helm.sh/helm/v3)
"$go" -C "$here/helm" build -trimpath -buildvcs=false -o "$tmp/helm" \
  -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version -X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
  helm.sh/helm/v3/cmd/helm >&2

# Sanity check before publishing, so a broken build is never cached.
"$tmp/kube-apiserver" --version | grep -qx "Kubernetes $k8s_version"
"$tmp/helm" version --short | grep -q "^$helm_version"
echo '{"auths":{"r.example.com":{"auth":"dTpw"}}}' | "$tmp/keyring-lookup" - r.example.com/a nginx |
  tr -d '\n' | grep -qx '{"image":"r.example.com/a",.*"found":true,"usernames":\["u"\]}{"image":"nginx",.*"found":false,.*}'

chmod 755 "$tmp" # mktemp made it private
# Publish atomically: readers only ever see a complete directory.
mv -T "$tmp" "$out"
trap - EXIT
echo "testbin: built in $((SECONDS - start))s" >&2
echo "$out"
