#!/usr/bin/env bash
# Build (once) and link the local environment's binaries into .dev/bin:
#   kube     - kube-apiserver, kube-controller-manager, kube-scheduler and kubectl in one binary
#   etcd     - etcd server
#   helm     - helm v3 client
#   minio    - S3-compatible object store
#   kueue    - Kueue's controller manager, with its CRDs and webhook definitions in
#              .dev/kueue/config (only the Kueue tests start it: tests/localenv/kueue.py)
# Each comes from the Go module proxy through a wrapper module under tests/localenv/go/<name>,
# whose go.mod/go.sum pin every version. Built binaries are cached under
# ${XDG_CACHE_HOME:-~/.cache}/kubetune/bin/<name>-<key>, where the key hashes the wrapper module,
# so a repeat run only re-links. Go's own module and build caches are reused as usual.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
gomods="$root/tests/localenv/go"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/kubetune/bin"
bindir="$root/.dev/bin"
mkdir -p "$cache" "$bindir"

export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-buildvcs=false

# Version of a module as pinned in a wrapper's go.mod (for ldflags and messages).
pinned() { awk -v m="$2" '$1 == m { print $2; exit }' "$gomods/$1/go.mod"; }

# Content key: the wrapper module's files plus the Go version that builds them.
cache_key() {
  (cd "$gomods/$1" && cat go.mod go.sum ./*.go 2>/dev/null; go env GOVERSION) | sha256sum | cut -c1-16
}

build() {  # build <wrapper> <output-name> <go build args...>
  local wrapper=$1 out=$2; shift 2
  local dir="$cache/$wrapper-$(cache_key "$wrapper")"
  if [ ! -x "$dir/$out" ]; then
    echo "build-binaries: building $out (first time only; cached in $dir)" >&2
    local start=$SECONDS
    mkdir -p "$dir.tmp"
    (cd "$gomods/$wrapper" && go build -trimpath -o "$dir.tmp/$out" "$@")
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
    echo "build-binaries: built $out in $((SECONDS - start))s" >&2
  fi
  ln -sf "$dir/$out" "$bindir/$out"
}

kube_version=$(pinned kube k8s.io/kubernetes)
kube_minor=$(echo "$kube_version" | cut -d. -f2)
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  # Without these the server reports v0.0.0-master and Helm's kubeVersion checks fail.
  ldflags+=" -X $pkg.gitVersion=$kube_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$kube_minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

helm_version=$(pinned helm helm.sh/helm/v3)
helm_ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version"
helm_ldflags+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1"
helm_ldflags+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$kube_minor"
helm_ldflags+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1"
helm_ldflags+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$kube_minor"

build etcd etcd -ldflags "-s -w" go.etcd.io/etcd/server/v3
build helm helm -ldflags "$helm_ldflags" helm.sh/helm/v3/cmd/helm
build s3 minio -ldflags "-s -w" github.com/minio/minio
build kube kube -tags selinux,notest,grpcnotrace -ldflags "$ldflags" .
ln -sf kube "$bindir/kubectl"

kueue_version=$(pinned kueue sigs.k8s.io/kueue)
build kueue kueue -ldflags "-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$kueue_version" \
  sigs.k8s.io/kueue/cmd/kueue
# Kueue's CRDs and webhook definitions come from the same module version as the binary.
kueue_config="$(dirname "$(readlink -f "$bindir/kueue")")/config"
if [ ! -d "$kueue_config" ]; then
  src=$(cd "$gomods/kueue" && go list -m -f '{{.Dir}}' sigs.k8s.io/kueue)/config/components
  mkdir -p "$kueue_config.tmp"
  cp "$src"/crd/bases/*.yaml "$src"/webhook/manifests.yaml "$kueue_config.tmp/"
  chmod -R u+w "$kueue_config.tmp" && mv "$kueue_config.tmp" "$kueue_config"
fi
mkdir -p "$root/.dev/kueue" && ln -sfn "$kueue_config" "$root/.dev/kueue/config"
echo "build-binaries: kubernetes $kube_version, etcd $(pinned etcd go.etcd.io/etcd/server/v3)," \
  "helm $helm_version, minio $(pinned s3 github.com/minio/minio), kueue $kueue_version in $bindir" >&2
