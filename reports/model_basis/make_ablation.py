"""Ablation of the model basis on the validation part: each ingredient alone, K and V apart.

    python reports/model_basis/make_ablation.py          # runs what is missing, writes ablation.md

Every row is one ``kakeya eval --part validation --passages 16`` (ctx 1024 + 256, sink 1)
that compresses one stream and keeps the other exact; its command is in the table. The
plain-metric basis (K and V decorrelated without a metric) is fitted first into
``runs/basis_plain`` with ``kakeya calibrate basis --k-metric plain --v-metric plain``.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BASIS = {
    "metric": "calibration/smollm2-135m/basis/basis.safetensors",
    "plain": "runs/basis_plain/basis.safetensors",
}
SIGMA_Q = "calibration/smollm2-135m/sigma_q_rope/sigma_q.safetensors"
MODEL = {"name": "smollm2-135m", "num_layers": 30, "num_kv_heads": 3, "head_dim": 64}


def basis_config(basis: str, step: float, scales: str = "block") -> dict:
    from kakeya_py.calibration.model_basis import codec_config, load_basis

    return codec_config(load_basis(ROOT / BASIS[basis]).sha256, step, scales=scales)


def hadamard_config(step: float, bits: int = 4, metric: str = "mse") -> dict:
    return {
        "bits": bits,
        "block_size": 4096,
        "share_basis": True,
        "basis": "none",
        "uniform_step": step,
        "entropy_coding": True,
        "scale_format": "log8",
        "outlier_threshold": 4.5,
        "metric": metric,
    }


# name -> (stream, ingredient, policy fields)
ROWS: dict[str, tuple[str, str, dict]] = {
    "k-hadamard-060": (
        "k",
        "Hadamard, log8 scales (the uniform-ec-log8 path), step 0.60",
        {"k": hadamard_config(0.6)},
    ),
    "k-hadamard-078": ("k", "Hadamard, log8 scales, step 0.78", {"k": hadamard_config(0.78)}),
    "k-sigmaq-hadamard-060": (
        "k",
        "Σ_q whitening + Hadamard (L in every encoding), step 0.60",
        {"k": hadamard_config(0.6, metric="inner_product"), "sigma_q": SIGMA_Q},
    ),
    "k-basis-plain-040": ("k", "basis without metric (KLT of K), one step 0.40", {"k": ("plain", 0.4)}),
    "k-basis-sigmaq-040": ("k", "basis in the Σ_q metric, one step 0.40", {"k": ("metric", 0.4)}),
    "k-basis-sigmaq-040-vector": (
        "k",
        "basis in the Σ_q metric, step 0.40, per-vector log8 scales",
        {"k": ("metric", 0.4, "vector")},
    ),
    "k-basis-sigmaq-040-window32": (
        "k",
        "basis in the Σ_q metric, step 0.40, exact window of 32",
        {"k": ("metric", 0.4), "window_tokens": 32},
    ),
    "v-hadamard-095": ("v", "Hadamard, log8 scales, step 0.95", {"v": hadamard_config(0.95)}),
    "v-basis-plain-090": ("v", "basis without metric (KLT of V), one step 0.90", {"v": ("plain", 0.9)}),
    "v-basis-oproj-090": ("v", "basis in the o_proj metric, one step 0.90", {"v": ("metric", 0.9)}),
    "v-basis-oproj-090-vector": (
        "v",
        "basis in the o_proj metric, step 0.90, per-vector log8 scales",
        {"v": ("metric", 0.9, "vector")},
    ),
}


def policy(name: str, fields: dict) -> Path:
    from kakeya_py.calibration.model_basis import load_basis

    d = {"name": name, "sink_tokens": 1, "k": None, "v": None, "model": MODEL, "provenance": []}
    for key, value in fields.items():
        if isinstance(value, tuple):  # (basis, step[, scales]): a model-basis config
            d[key] = basis_config(*value)
            d["basis"] = BASIS[value[0]]
            d["provenance"].append({"role": "fit", **load_basis(ROOT / BASIS[value[0]]).record["text"]})
        else:
            d[key] = value
    path = HERE / "policies" / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(d, indent=1) + "\n")
    return path


def run(cmd: list[str]) -> None:
    print("$", shlex.join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def main() -> int:
    if not (ROOT / BASIS["plain"]).is_file():
        run(
            [sys.executable, "-m", "kakeya_py.cli", "calibrate", "basis", "--k-metric", "plain"]
            + ["--v-metric", "plain", "--out", "runs/basis_plain", "--no-progress"]
        )
    rows = []
    for name, (stream, what, fields) in ROWS.items():
        out = HERE / "ablation" / f"{name}.json"
        pol = policy(name, fields)
        cmd = ["kakeya", "eval", "--part", "validation", "--passages", "16", "--config"]
        cmd += [str(pol.relative_to(ROOT)), "--json", str(out.relative_to(ROOT)), "--no-progress"]
        if not out.is_file():
            out.parent.mkdir(exist_ok=True)
            run([sys.executable, "-m", "kakeya_py.cli"] + cmd[1:])
        r = json.loads(out.read_text())
        q = c = r
        rows.append(
            f"| {stream.upper()} | {what} | {c['ratio_' + stream]:.2f}x | {q['dppl']:+.2%} "
            f"[{q['dppl_ci95'][0]:+.2%}, {q['dppl_ci95'][1]:+.2%}] | {q['top1']:.2%} "
            f"[{q['top1_ci95'][0]:.2%}, {q['top1_ci95'][1]:.2%}] | {q['kl_mean']:.4f} | `{shlex.join(cmd)}` |"
        )
    md = [
        "# Model basis: ablation on the validation part (SmolLM2-135M)",
        "",
        "Generated by `python reports/model_basis/make_ablation.py`. Each row: 16 validation passages ×",
        "(ctx 1024 + 256 evaluated), snapshot mode, sink 1, one stream compressed, the other exact.",
        "Ratios are the compressed stream's, measured from the serialized bytes (sink counted at bf16).",
        "",
        "| stream | ingredient | ratio | Δppl [95% CI] | top-1 [95% CI] | KL | command |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    (HERE / "ablation.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
