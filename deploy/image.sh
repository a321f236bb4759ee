#!/usr/bin/env bash
# Build the CPU image (deploy/Containerfile) with podman where no image registry can be reached:
#   1. a base image from Debian's own packages: mmdebstrap (bookworm, python3, python3-venv), then
#      `podman import` (kept as localhost/guard-base:bookworm; rebuilt only when missing);
#   2. a wheelhouse on the host (deploy/wheelhouse/: torch's CPU build, guard's dependencies), so
#      the build installs with no network (PIP_NO_INDEX=1);
#   3. `podman build` of deploy/Containerfile on that base, tagged ${GUARD_IMAGE:-localhost/guard:cpu}.
# Where containers cannot set their resource limits (a sandbox without CAP_SYS_RESOURCE, hybrid
# cgroups: crun refuses with "setrlimit RLIMIT_NOFILE: Operation not permitted"), it finds that out
# with a trial run and uses runc with limits no higher than the host's; `deploy/image.sh run-opts`
# prints the options it chose, for `podman run`.
# With a reachable registry none of this is needed: podman build -f deploy/Containerfile -t guard:cpu .
#
# usage: deploy/image.sh [build|run-opts]
set -euo pipefail
cd "$(dirname "$0")/.."
BASE_IMAGE=${GUARD_BASE_IMAGE:-localhost/guard-base:bookworm}
IMAGE=${GUARD_IMAGE:-localhost/guard:cpu}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python

base() {
  podman image exists "$BASE_IMAGE" && return
  local tar
  tar=$(mktemp --suffix=.tar)
  mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$tar" \
    "${GUARD_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
  podman import --change 'CMD ["/bin/bash"]' "$tar" "$BASE_IMAGE" > /dev/null
  rm -f "$tar"
}

# Options under which a container starts here: none, or runc with limits the host allows.
run_opts() {
  if podman run --rm "$BASE_IMAGE" true > /dev/null 2>&1; then
    return
  fi
  local opts="--runtime runc --ulimit nofile=$(ulimit -Hn):$(ulimit -Hn) --ulimit nproc=4096:4096"
  # shellcheck disable=SC2086
  if podman run --rm $opts "$BASE_IMAGE" true > /dev/null; then
    echo "$opts"
    return
  fi
  echo "deploy/image.sh: no container starts here, even with: $opts" >&2
  return 1
}

wheelhouse() {
  # pip wheel copies wheels it finds and builds the rest; the image installs from here offline.
  "$PY" -m pip wheel --quiet --disable-pip-version-check -w deploy/wheelhouse \
    "${GUARD_TORCH:-torch==2.13.0}" ".[postgres,otel]" "setuptools>=68" wheel
  rm -f deploy/wheelhouse/guard-*.whl  # the image installs guard from its source (editable)
}

case "${1:-build}" in
  run-opts) base; run_opts ;;
  build)
    base
    opts=$(run_opts)
    wheelhouse
    # shellcheck disable=SC2086
    # docker format: the OCI format has no HEALTHCHECK
    podman build $opts --format docker --build-arg BASE="$BASE_IMAGE" --build-arg PIP_NO_INDEX=1 \
      -f deploy/Containerfile -t "$IMAGE" .
    ;;
  *) echo "usage: deploy/image.sh [build|run-opts]" >&2; exit 2 ;;
esac
