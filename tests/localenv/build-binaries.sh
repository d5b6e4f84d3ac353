#!/usr/bin/env bash
# Build (once) and link the local environment's binaries into .dev/bin:
#   build-binaries.sh [NAME...]     (no NAME: all of them; `make binaries`)
#   kube     - kube-apiserver, kube-controller-manager, kube-scheduler and kubectl in one binary
#   etcd     - etcd server, from the same module graph as kube (shares its compiled packages)
#   minio    - S3-compatible object store
#   helm     - helm v3 client
#   kueue    - Kueue's controller manager, with its CRDs and webhook definitions in
#              .dev/kueue/config (only the Kueue tests start it: tests/localenv/kueue.py)
# Each binary is built when the first command that needs it runs: `cluster.py up` asks for kube,
# etcd and minio; the chart steps (make demo, the tests' cluster fixture, the chart unit tests)
# for helm; `running_kueue` for kueue.
# Each comes from the Go module proxy through a wrapper module under tests/localenv/go/<module>,
# whose go.mod/go.sum pin every version. Built binaries are cached under
# ${XDG_CACHE_HOME:-~/.cache}/kubetune/bin/<name>-<key>, where the key hashes the wrapper module,
# the Go version and the build flags, so a repeat run only re-links. Go's own module and build
# caches are reused as usual. Concurrent runs wait for each other per binary (flock).
set -euo pipefail
shopt -s inherit_errexit

root=$(cd "$(dirname "$0")/../.." && pwd)
gomods="$root/tests/localenv/go"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/kubetune/bin"
bindir="$root/.dev/bin"
mkdir -p "$cache" "$bindir"

export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-buildvcs=false
goversion=$(go env GOVERSION)

# Version of a module as pinned in a wrapper's go.mod (for ldflags and messages).
pinned() { awk -v m="$2" '$1 == m { print $2; exit }' "$gomods/$1/go.mod"; }

# Content key: the wrapper module's files, the Go version and the build arguments.
cache_key() {  # cache_key <wrapper> <build args...>
  local wrapper=$1; shift
  (cd "$gomods/$wrapper" && shopt -s nullglob && cat go.mod go.sum ./*.go; echo "$goversion" "$@") |
    sha256sum | cut -c1-16
}

build() {  # build <wrapper> <output-name> <go build args...>
  local wrapper=$1 out=$2; shift 2
  local dir; dir="$cache/$out-$(cache_key "$wrapper" "$@")"
  if [ ! -x "$dir/$out" ]; then
    exec 9>"$cache/.$out.lock"
    flock 9  # another run building the same binary: wait for it, then use its result
    if [ ! -x "$dir/$out" ]; then
      echo "build-binaries: building $out (first time only; cached in $dir)" >&2
      local start=$SECONDS
      rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
      (cd "$gomods/$wrapper" && go build -trimpath -o "$dir.tmp/$out" "$@")
      rm -rf "$dir" && mv "$dir.tmp" "$dir"
      echo "build-binaries: built $out in $((SECONDS - start))s" >&2
    fi
    exec 9>&-
  fi
  ln -sfn "$dir/$out" "$bindir/$out"
}

kube_version=$(pinned kube k8s.io/kubernetes)
kube_minor=$(echo "$kube_version" | cut -d. -f2)

build_kube() {
  local ldflags="-s -w" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    # Without these the server reports v0.0.0-master and Helm's kubeVersion checks fail.
    ldflags+=" -X $pkg.gitVersion=$kube_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$kube_minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  build kube kube -tags selinux,notest,grpcnotrace -ldflags "$ldflags" .
  ln -sfn kube "$bindir/kubectl"
  echo "kubernetes $kube_version"
}

build_etcd() {
  # The etcd server version that k8s.io/kubernetes itself requires and tests with
  # (hack/lib/etcd.sh), built in the kube wrapper module: same grpc, otel, protobuf, etcd client,
  # so `go build` reuses what the kube build compiled.
  build kube etcd -ldflags "-s -w" go.etcd.io/etcd/server/v3
  echo "etcd $(pinned kube go.etcd.io/etcd/server/v3)"
}

build_minio() {
  build s3 minio -ldflags "-s -w" github.com/minio/minio
  echo "minio $(pinned s3 github.com/minio/minio)"
}

build_helm() {
  local version ldflags
  version=$(pinned helm helm.sh/helm/v3)
  ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$version"
  ldflags+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1"
  ldflags+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$kube_minor"
  ldflags+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1"
  ldflags+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$kube_minor"
  build helm helm -ldflags "$ldflags" helm.sh/helm/v3/cmd/helm
  echo "helm $version"
}

build_kueue() {
  local version config src
  version=$(pinned kueue sigs.k8s.io/kueue)
  build kueue kueue -ldflags "-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$version" \
    sigs.k8s.io/kueue/cmd/kueue
  # Kueue's CRDs and webhook definitions come from the same module version as the binary.
  config="$(dirname "$(readlink -f "$bindir/kueue")")/config"
  if [ ! -d "$config" ]; then
    src=$(cd "$gomods/kueue" && go list -m -f '{{.Dir}}' sigs.k8s.io/kueue)/config/components
    rm -rf "$config.tmp" && mkdir -p "$config.tmp"
    cp "$src"/crd/bases/*.yaml "$src"/webhook/manifests.yaml "$config.tmp/"
    chmod -R u+w "$config.tmp" && mv "$config.tmp" "$config"
  fi
  mkdir -p "$root/.dev/kueue" && ln -sfn "$config" "$root/.dev/kueue/config"
  echo "kueue $version"
}

names=("$@")
[ ${#names[@]} -gt 0 ] || names=(kube etcd minio helm kueue)
built=()
for name in "${names[@]}"; do
  case $name in
    kube | etcd | minio | helm | kueue) built+=("$("build_$name")") ;;
    *) echo "build-binaries: unknown binary '$name' (kube, etcd, minio, helm, kueue)" >&2; exit 2 ;;
  esac
done
summary=$(IFS=,; echo "${built[*]}")
echo "build-binaries: ${summary//,/, } in $bindir" >&2
