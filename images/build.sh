#!/usr/bin/env bash
# Build the operator, trainer and API server images (make images), optionally retag and push them.
#
#   make images                               public bases, CUDA trainer:
#                                             ghcr.io/kubetune/operator:<appVersion>
#                                             ghcr.io/kubetune/trainer:<appVersion>
#                                             ghcr.io/kubetune/api:<appVersion>
#   make images BASE=local VARIANT=cpu        FROM a local Debian bookworm base made here with
#                                             debootstrap (no image registry needed), CPU trainer:
#                                             localhost/kubetune/{operator,trainer,api}:<v>[-cpu]
#   make images REGISTRY=registry.example.com/ml [PUSH_ARGS=--tls-verify=false]
#                                             also tag REGISTRY/{operator,trainer,api}:<v>
#                                             and push them
#
# Settings (environment): BASE=public|local, OPERATOR_BASE / TRAINER_BASE / API_BASE (public
# bases other than the Dockerfiles' defaults, e.g. pinned by digest:
# python:3.11-slim-bookworm@sha256:...), VARIANT=cuda|cpu (trainer), IMAGES="operator trainer
# api", REGISTRY, PUSH_ARGS,
# ENGINE=podman|docker (default: a docker engine that answers, else podman, installed with apt
# when missing). Tags come from charts/kubetune/Chart.yaml's appVersion, which is what the chart
# deploys by default.
#
# Cached under ${XDG_CACHE_HOME:-~/.cache}/kubetune/images: the local base's root filesystem
# (keyed by its recipe) and, with podman, the Dockerfiles' pip cache mounts (useful where the
# network's responses are cacheable). The engine's layer cache does the rest: a rebuild with an
# unchanged lock takes seconds, whatever code changed.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/kubetune/images"
base=${BASE:-public}
variant=${VARIANT:-cuda}
images=${IMAGES:-operator trainer api}
version=$(awk -F'"' '/^appVersion:/ { print $2 }' "$root/charts/kubetune/Chart.yaml")
say() { echo "images: $*" >&2; }
mkdir -p "$cache"

apt_install() {  # apt_install <command> <package...>: only when the command is missing
  local cmd=$1; shift
  command -v "$cmd" >/dev/null && return
  say "installing $* with apt (first time only)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

engine=${ENGINE:-}
if [ -z "$engine" ]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker; else engine=podman; fi
fi
engine_args=()
if [ "$engine" = podman ]; then
  apt_install podman podman runc
  # Without CAP_SYS_RESOURCE containers cannot set rlimits, and crun (podman's default) cannot
  # run on a cgroup v1 host: then the runc runtime, cgroupfs and no default ulimits
  # (docs/images.md). Elsewhere podman's own settings apply.
  cap_eff=$(awk '/^CapEff:/ { print $2 }' /proc/self/status)
  if (((16#$cap_eff >> 24 & 1) == 0)) || [ ! -e /sys/fs/cgroup/cgroup.controllers ]; then
    CONTAINERS_CONF=$(realpath "${CONTAINERS_CONF:-$root/images/containers.conf}")
    export CONTAINERS_CONF
    engine_args=(--runtime runc)
  fi
fi
run_engine() { "$engine" "${engine_args[@]}" "$@"; }

# The local base: Debian bookworm (minbase) with Python 3.11 and its venv module, from the Debian
# mirror apt already uses, imported as an image. pip inside trusts what pip trusts here
# (PIP_CERT: a TLS-inspecting proxy's CA on the project's machines). Keyed by this recipe and
# that CA bundle; rebuilt when either changes.
local_base() {
  local suite=bookworm packages=python3,python3-venv,ca-certificates
  local mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
  local ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
  local key
  key=$( (echo "$suite $packages $mirror v1"; cat "$ca") | sha256sum | cut -c1-12)
  local image=localhost/kubetune/base:$suite-$key tar=$cache/base-$suite-$key.tar
  if ! run_engine image exists "$image" 2>/dev/null; then
    if [ ! -f "$tar" ]; then
      apt_install debootstrap debootstrap
      say "debootstrap $suite + python3 (first time only; cached in $tar)"
      local start=$SECONDS dir
      dir=$(mktemp -d "$cache/rootfs.XXXXXX")
      debootstrap --variant=minbase --include="$packages" "$suite" "$dir" "$mirror" >&2
      rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
      cp "$ca" "$dir/etc/kubetune-host-ca.pem"
      printf '[global]\ncert = /etc/kubetune-host-ca.pem\n' >"$dir/etc/pip.conf"
      tar --numeric-owner -C "$dir" -cf "$dir.tar" . && mv "$dir.tar" "$tar"  # atomic: runs may race
      rm -rf "$dir"
      say "base root filesystem in $((SECONDS - start)) s"
    fi
    run_engine import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      "$tar" "$image" >/dev/null
  fi
  echo "$image"
}

build_args=()
if [ "$engine" = podman ]; then
  # podman keeps RUN --mount=type=cache folders (pip's cache) under $TMPDIR: there, in our cache.
  mkdir -p "$cache/tmp"
  export TMPDIR=$cache/tmp
  build_args=(--network host)
fi
prefix=ghcr.io/kubetune
if [ "$base" = local ]; then
  prefix=localhost/kubetune
  base_image=$(local_base)
  build_args+=(--build-arg "BASE=$base_image")
fi

suffix=""
[ "$variant" = cpu ] && suffix=-cpu
built=()
for name in $images; do
  case $name in
    operator)
      file=Dockerfile tag=$prefix/operator:$version extra=()
      [ -n "${OPERATOR_BASE:-}" ] && extra+=(--build-arg "BASE=$OPERATOR_BASE")
      ;;
    trainer)
      file=trainer_image/Dockerfile tag=$prefix/trainer:$version$suffix
      extra=(--build-arg "VARIANT=$variant")
      [ "$base" = local ] && extra+=(--build-arg PYTHON=python3.11)
      [ -n "${TRAINER_BASE:-}" ] && extra+=(--build-arg "BASE=$TRAINER_BASE")
      ;;
    api)
      file=api_server/Dockerfile tag=$prefix/api:$version extra=()
      [ -n "${API_BASE:-}" ] && extra+=(--build-arg "BASE=$API_BASE")
      ;;
    *) say "unknown image $name (operator, trainer, api)"; exit 2 ;;
  esac
  start=$SECONDS
  say "building $tag"
  run_engine build "${build_args[@]}" "${extra[@]}" -f "$root/$file" -t "$tag" "$root"
  size=$(run_engine image inspect --format '{{.Size}}' "$tag")
  say "built $tag in $((SECONDS - start)) s ($((size / 1000000)) MB)"
  built+=("$name=$tag")
done

if [ -n "${REGISTRY:-}" ]; then
  for entry in "${built[@]}"; do
    name=${entry%%=*} tag=${entry#*=}
    target=${REGISTRY%/}/$name:${tag##*:}
    run_engine tag "$tag" "$target"
    # shellcheck disable=SC2086 # PUSH_ARGS is a list of flags
    run_engine push ${PUSH_ARGS:-} "$target"
    say "pushed $target"
  done
fi
