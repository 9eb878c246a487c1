#!/usr/bin/env bash
# Regenerate docs/results.md with its figures and raw results (docs/results/*.json, converge.csv): every
# measurement of the report, under an hour on 2 CPU cores; run it on an otherwise idle machine (memory
# figures are deterministic, step times are not when other jobs share the CPU).
# The transformers+PEFT rows need peft (pip install -e ".[test]"; scripts/dev.sh test builds that .venv).
#   scripts/make_results.sh                      measure everything
#   scripts/make_results.sh --only grads         re-measure one part, read the others from docs/results
#   scripts/make_results.sh --render-only        rewrite docs/results.md from docs/results
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/mesp bench report --out docs "$@"
