"""Ablation of the offline calibration (issue 5): Δppl with and without Σ_q, Gaussian vs
calibrated centroids, at 2/3/4 bits, on SmolLM2-135M with the HF harness.

    python reports/calibration/make_ablation.py            # writes ablation.json, ablation.md, policies/

Every variant is a policy file in ``policies/`` that ``kakeya eval --config FILE`` runs
on its own (the command of each is in the JSON). This script runs them all against one
shared codec-off reference (``HFRunner.run`` with several variants: same passages, same
reference logits, the same record fields as ``kakeya eval --json``), which costs one
reference pass instead of one per variant.

Grid: one basis per head over the prefix, outliers > 3σ exact, first and last layer
exact, at ``bits`` for K and V;

- K rows compress **K only** (V exact) so the K calibrations are measured alone:
  {mse metric, Σ_q whitening (``inner_product``)} × {Gaussian, calibrated} tables, plus,
  when ``sigma_q_rope/`` exists, the RoPE-averaged Σ_q with Gaussian tables;
- V rows compress **V only**: Gaussian vs calibrated tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from kakeya_py.cli.harness import _finite

HERE = Path(__file__).resolve().parent
# fixed here (not the moving ``recommended`` preset) so the ablation stays comparable
SHARED_BASIS = {"block_size": 4096, "share_basis": True, "outlier_threshold": 3.0}
ROOT = HERE.parents[1]


def build_policies(cal_dir: Path, bits_list, out_dir: Path) -> list[dict]:
    from kakeya_py.calibration.core import SIGMA_Q_FILE, calibrated_policy, load_centroids
    from kakeya_py.policy import Policy

    plain = load_centroids(cal_dir / "centroids")
    white = load_centroids(cal_dir / "centroids-sigma-q")
    sigmas = {"pre": cal_dir / SIGMA_Q_FILE, "rope": cal_dir / "sigma_q_rope" / SIGMA_Q_FILE}
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for bits in bits_list:
        stream_config = {"bits": bits, **SHARED_BASIS}
        base = {"k": stream_config, "v": stream_config, "exact_layers": [0, -1]}
        specs = [
            ("k", "gaussian", None),
            ("k", "calibrated", None),
            ("k", "gaussian", "pre"),
            ("k", "calibrated", "pre"),
            ("v", "gaussian", None),
            ("v", "calibrated", None),
        ]
        if sigmas["rope"].is_file():
            specs.insert(4, ("k", "gaussian", "rope"))
        for stream, tables, use_sigma in specs:
            d = json.loads(json.dumps(base))
            d["streams"] = [stream]
            pol = Policy.from_dict(d)
            cents = None if tables == "gaussian" else (white if use_sigma else plain)
            pd = calibrated_policy(pol, centroids=cents, sigma_q=sigmas[use_sigma] if use_sigma else None)
            tag = {None: "mse", "pre": "sigmaq", "rope": "sigmaq_rope"}[use_sigma]
            name = f"{stream}{bits}-{tag}-{tables}"
            pd["name"] = name
            path = out_dir / f"{name}.json"
            if pd.get("sigma_q"):  # relative to the policy file, as load_policy resolves it
                sigma_file = Path(pd["sigma_q"]).resolve()
                pd["sigma_q"] = os.path.relpath(sigma_file, path.parent.resolve())
                pd["description"] = pd["description"].replace(
                    str(sigma_file), os.path.relpath(sigma_file, ROOT)
                )
            path.write_text(json.dumps(pd, indent=1) + "\n")
            rows.append(
                {
                    "name": name,
                    "stream": stream,
                    "bits": bits,
                    "sigma_q": {None: "no", "pre": "pre-RoPE", "rope": "RoPE-averaged"}[use_sigma],
                    "centroids": tables,
                    "policy_file": str(path.relative_to(ROOT)),
                }
            )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calibration", default=str(ROOT / "calibration" / "smollm2-135m"))
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--passages", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--n-eval", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--progress", action="store_true")
    a = ap.parse_args(argv)
    command = shlex.join(["python", "reports/calibration/make_ablation.py", *(argv or sys.argv[1:])])

    import torch
    from kakeya_py.cli.harness import base_record, finish_record, prepare_policy, prepare_text
    from kakeya_py.eval.harness import HFRunner, Variant, codec_transform
    from kakeya_py.models import load_model
    from kakeya_py.policy import PolicyCodec

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    rows = build_policies(Path(a.calibration), a.bits, out / "policies")
    t0 = time.perf_counter()
    model, tok, info = load_model("smollm2-135m", "float32", progress=a.progress)
    common = dict(
        model="smollm2-135m", dtype="float32", text_file=None, wikitext=None, passages=a.passages,
        ctx=a.ctx, n_eval=a.n_eval, layers=None, streams=None, exact_layers=None, post_rope_k=False,
        sigma_q=None, mode="snapshot", seed=a.seed, threads=a.threads,
    )  # fmt: skip
    text = prepare_text(SimpleNamespace(**common), tok)
    variants, per = [], []
    for row in rows:
        argv_eval = ["kakeya", "eval", "--config", row["policy_file"], "--passages", str(a.passages)]
        argv_eval += [
            "--ctx",
            str(a.ctx),
            "--n-eval",
            str(a.n_eval),
            "--threads",
            str(a.threads),
            "--json",
            "OUT",
        ]
        args = SimpleNamespace(**common, config=str(ROOT / row["policy_file"]), argv=argv_eval)
        policy, sigma = prepare_policy(args, info, text)  # refuses Σ_q text overlapping the evaluation text
        codec = PolicyCodec(policy, info.num_layers, sigma_q=sigma, threads=a.threads)
        variants.append(Variant(row["name"], codec_transform(codec)))
        per.append((args, policy))
    runner = HFRunner(model)
    results, ref_seconds = runner.run(text["passages"], variants, progress=a.progress, desc="ablation")
    records = []
    for row, (args, policy), res in zip(rows, per, results, strict=True):
        rec = base_record(args, "hf", info, policy, text)
        finish_record(rec, res.summary(seed=a.seed), res.ledger, res.seconds)
        rec["seconds_reference"] = ref_seconds
        rec["seconds_codec"] = res.seconds
        row.update(
            {
                k: rec[k]
                for k in (
                    "dppl",
                    "dppl_ci95",
                    "top1",
                    "kl_mean",
                    "kl_p95",
                    "ratio_measured",
                    "ratio_k",
                    "ratio_v",
                )
            }
        )
        row["command"] = rec["command"]
        records.append(rec)
    import kakeya_py

    summary = {
        "command": command,
        "kakeya_version": kakeya_py.__version__,
        "settings": {
            "model": "smollm2-135m",
            "passages": a.passages,
            "ctx": a.ctx,
            "n_eval": a.n_eval,
            "mode": "snapshot",
            "dtype": "float32",
            "seed": a.seed,
            "base_policy": "block 4096, share_basis, outliers > 3, exact layers 0 and -1",
        },
        "calibration": {
            "sigma_q": json.loads((Path(a.calibration) / "sigma_q.json").read_text())["command"],
            "text": json.loads((Path(a.calibration) / "sigma_q.json").read_text())["text"],
        },
        "evaluation_text": text["usage"],
        "seconds": time.perf_counter() - t0,
        "rows": rows,
        "records": records,
    }
    (out / "ablation.json").write_text(json.dumps(_finite(summary), indent=1) + "\n")
    (out / "ablation.md").write_text(markdown(summary))
    sys.stdout.write(markdown(summary))
    return 0


def _pct(x):
    return "n/a" if x is None else f"{100 * x:+.2f}%"


def markdown(s: dict) -> str:
    st = s["settings"]
    lines = [
        "# Calibration ablation: Σ_q and Lloyd–Max centroids (SmolLM2-135M)",
        "",
        f"Generated by `{s['command']}` with kakeya {s['kakeya_version']} in {s['seconds']:.0f} s.",
        f"Settings: {st['passages']} passages × (ctx {st['ctx']} + {st['n_eval']} evaluated), mode {st['mode']}, "
        f"{st['dtype']}, bootstrap seed {st['seed']}; base policy {st['base_policy']}.",
        f"Calibration artifacts: `{s['calibration']['sigma_q']}` (articles {s['calibration']['text']['articles']}); "
        f"evaluation articles {s['evaluation_text']['articles']} (disjoint, checked).",
        "",
        "Δppl is exp(NLL_codec − NLL_ref) − 1 pooled over the evaluated tokens, with its 95% bootstrap CI over "
        "passages; KL is the mean KL(ref‖codec) per token (steadier than Δppl at this size). Each row compresses "
        "one stream only; the other stays exact.",
        "",
        "| stream | bits | Σ_q | centroids | Δppl | 95% CI | top-1 | KL mean | ratio (stream) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s["rows"]:
        ci = r.get("dppl_ci95") or [None, None]
        ratio = r["ratio_k"] if r["stream"] == "k" else r["ratio_v"]
        lines.append(
            f"| {r['stream'].upper()} | {r['bits']} | {r['sigma_q']} | {r['centroids']} | "
            f"{_pct(r['dppl'])} | [{_pct(ci[0])}, {_pct(ci[1])}] | {100 * r['top1']:.2f}% | {r['kl_mean']:.4f} | "
            f"{ratio:.2f}x |"
        )
    lines += [
        "",
        "Each row alone: `kakeya eval --config reports/calibration/policies/NAME.json --passages "
        f"{st['passages']} --ctx {st['ctx']} --n-eval {st['n_eval']} --json OUT` (see `command` per record in "
        "ablation.json).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
