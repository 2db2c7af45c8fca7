"""Write reports/test/README.md: the headline table from the test-part records in this folder.

    python reports/test/make_readme.py

Each row is one ``kakeya eval --json`` record (the command that produced it is in the
record and in the table); nothing here is measured again.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def pct(x: float) -> str:
    return f"{x * 100:+.2f}%"


def row(r: dict) -> str:
    lo, hi = r["dppl_ci95"]
    tlo, thi = r["top1_ci95"]
    text = "WikiText-2 test" if r["corpus"]["name"].startswith("wikitext") else f"{r['corpus']['name']} (out of domain)"
    engine = "vLLM" if r.get("engine") == "vllm" else "HF"
    # vLLM returns top-k log-probs only: its KL is a lower bound, never tabulated as the full KL
    kl = f"{r['kl_mean']:.4f}" if r.get("kl_mean") is not None else f"≥ {r['kl_topk_lb_mean']:.4f} (top-k bound)"
    return (
        f"| `{r['config']['name']}` | {engine} | {text} | {r['passages']} × ({r['ctx']} + {r['n_eval']}) | "
        f"{pct(r['dppl'])} [{pct(lo)}, {pct(hi)}] | {r['top1'] * 100:.2f}% [{tlo * 100:.2f}, {thi * 100:.2f}] | "
        f"{kl} | **{r['ratio_measured']:.2f}×** (K {r['ratio_k']:.2f}×, V {r['ratio_v']:.2f}×) | "
        f"**{r['verdict']}** ({r['verdict_point']}) | `{r['command']}` |"
    )


#: test-part records measured before the candidate was named: (file, preset it became)
MEASURED_AS_CANDIDATE = {
    f"../model_basis/v_layer_steps/test_{t}.json": "model-basis-vlayers"
    for t in ("wikitext", "code", "vllm_wikitext", "vllm_code")
}


def named(r: dict, preset: str) -> dict:
    """The record under the preset's name, after checking that the policy is the preset's."""
    from kakeya_py.policy import load_policy

    want = load_policy(preset).to_dict()
    # the basis path may be spelled differently; k names the basis by its hash
    for key in ("k", "v", "overrides", "exact_layers", "sink_tokens", "k_position"):
        assert r["config"][key] == want[key], (preset, key)
    measured_as = r["config"]["name"]
    return {**r, "config": {**r["config"], "name": f"{preset}` (measured as `{measured_as}"}}


def main() -> None:
    records = [
        named(json.loads((HERE / f).read_text()), preset)
        for f, preset in MEASURED_AS_CANDIDATE.items()
        if (HERE / f).exists()
    ]
    records += [json.loads(p.read_text()) for p in sorted(HERE.glob("eval_*.json"))]
    for r in records:
        assert r["text_usage"]["part"] == "test" and not r["overlap"], r["command"]
    lines = [
        "# Headline figures: the test part only",
        "",
        "Every row is a `kakeya eval` record in this folder: SmolLM2-135M (float32, snapshot mode, HF or vLLM) on",
        "passages of the **test** part of WikiText-2 (the 25 articles no earlier report touched; nothing",
        "was chosen on them) or of the out-of-domain code text (13 Python standard-library modules, test",
        "only). The presets were chosen on the validation part and fitted on the calibration part",
        "(their `provenance`; `kakeya eval` refuses an overlap). Verdict: ACCEPT iff the 95% CI of Δppl",
        "lies within ±1% and the lower bound of top-1's 95% CI is ≥ 95% (bootstrap over passages); in",
        "parentheses the point-estimate verdict the reports before the protocol used.",
        "",
        "Regenerate: `bash scripts/make_reports.sh headline` (4–6 minutes a row on 2 idle cores),",
        "then `python reports/test/make_readme.py`.",
        "",
        "| preset | engine | text | passages | Δppl [95% CI] | top-1 [95% CI] | KL mean | ratio (measured) "
        "| verdict (point) | command |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[row(r) for r in records],
        "",
    ]
    (HERE / "README.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
