#!/usr/bin/env bash
# Create .venv and install guard into it (editable), with the test extras when given --test.
# torch is installed first and pinned, because an unpinned torch pulls several GB of CUDA
# packages. GPU users: install the CUDA torch build you want into .venv first, or set
# GUARD_TORCH="torch==X.Y.Z" (see README); an already-installed torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q --disable-pip-version-check "${GUARD_TORCH:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}"
