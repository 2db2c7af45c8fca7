"""The report of ``kakeya tune``: ``tune.md`` and the greedy-path figure ``tune_path.png``, made
from the ``tune.json`` record alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..eval.hooks import STREAMS
from .search import TuneSettings


def _pct(x) -> str:
    return "n/a" if x is None else f"{x * 100:+.2f}%"


def _row_md(label: str, r: Mapping[str, Any]) -> str:
    ci = r.get("dppl_ci95") or [None, None]
    ratio = "n/a" if r.get("ratio") is None else f"{r['ratio']:.3f}x"
    kl = "n/a" if r.get("kl_mean") is None else f"{r['kl_mean']:.4f}"
    return (
        f"| {label} | {_pct(r['dppl'])} | [{_pct(ci[0])}, {_pct(ci[1])}] | {r['top1'] * 100:.2f}% | {kl} "
        f"| {ratio} | {r['eval_tokens']} | {r['verdict']} |"
    )


def tune_markdown(r: Mapping[str, Any]) -> str:
    st = r["settings"]
    nsearch = len(r["passages_provenance"]["search"])
    nval = len(r["passages_provenance"]["validation"])
    lines = [
        f"## kakeya tune: {r['policy']['name']} on {r['model']['name']} (snapshot, {r['dtype']})",
        "",
        f"command: `{r['command']}`",
        "",
        f"Budget {'|Δppl|' if st.get('two_sided', True) else 'Δppl'} ≤ {st['budget_dppl']:g}"
        + ("" if st.get("budget_kl") is None else f", mean KL ≤ {st['budget_kl']:g}")
        + f", top-1 ≥ {st['min_top1']:g}; cost `{st['cost']}`, "
        f"re-measured every {st['check_every']} steps. Search: {nsearch} passages x (ctx {r['ctx']} + "
        f"{r['n_eval']} evaluated), validation (held out): {nval} passages x (ctx {r['ctx']} + "
        f"{r.get('val_n_eval', r['n_eval'])}), from {r['corpus']['name']} "
        f"(evaluation split; windows drawn with seed {st['seed']}). kakeya {r['version']}; "
        f"{r['seconds']:.0f} s ({len(r['sensitivity'])} sensitivity variants, {len(r['rounds'])} rounds, "
        f"stopped: {r['stop_reason']}).",
        "",
        "| policy | Δppl | 95% CI | top-1 | KL mean | ratio (measured) | tokens | verdict |",
        "|---|---|---|---|---|---|---|---|",
        _row_md("base (rung 0 everywhere), search", r["base"]),
        _row_md(f"**{r['policy']['name']}**, search", r["search_result"]),
    ]
    selected = r.get("selected") or {"by": "greedy", "rungs": r["rungs"]}
    on_val = selected["by"] == "validation"
    for v in r["validation"]:
        label = f"**{v['policy']}**" if v["policy"] == r["policy"]["name"] else f"`{v['policy']}`"
        chose = on_val and v["policy"] == r["policy"]["name"]
        lines.append(_row_md(f"{label}, validation{' (selected on)' if chose else ''}", v))
    if on_val:
        lines += [
            "",
            f"Written: the most compressed state of the greedy path that also passes on the validation "
            f"passages (state {selected['index']} of {len(r['path']) - 1}, round {selected['round']}); "
            "the validation passages chose it, so they are no longer held out: measure it on other text "
            "(`kakeya eval --config policy.json`) before trusting it.",
        ]
    lines += ["", "Rungs chosen (0 = first rung of the ladder):", ""]
    rungs = selected["rungs"]
    layers = sorted({int(k) for s in STREAMS for k in rungs[s]})
    lines.append("| stream | " + " | ".join(str(la) for la in layers) + " |")
    lines.append("|---|" + "---|" * len(layers))
    for s in STREAMS:
        lines.append(
            f"| {s.upper()} | " + " | ".join(str(rungs[s].get(str(la), "-")) for la in layers) + " |"
        )
    lines += ["", "Ladder: " + (r["ladder"].get("description") or "")]
    for s in STREAMS:
        lines.append(f"- {s.upper()}: " + " → ".join(json.dumps(x) for x in r["ladder"][s]))
    lines += [
        "",
        "Rounds (kept steps / candidates, measured whole-policy numbers on the search passages):",
        "",
    ]
    lines += ["| round | kept | last kept: Δppl | top-1 | ratio | froze |", "|---|---|---|---|---|---|"]
    for rd in r["rounds"]:
        kept = [c for c in rd["candidates"] if c["kept"]]
        last = kept[-1] if kept else None
        lines.append(
            f"| {rd['round']} | {rd['kept']}/{len(rd['candidates'])} | "
            + (
                f"{_pct(last['dppl'])} | {last['top1'] * 100:.2f}% | {last['ratio']:.3f}x"
                if last
                else "- | - | -"
            )
            + f" | {'' if not rd['frozen'] else str(rd['frozen'][1]).upper() + str(rd['frozen'][0])} |"
        )
    if on_val:
        lines += [
            "",
            "Greedy path (every state measured on the search and on the validation passages):",
            "",
            "| state | after round | ratio | search Δppl | top-1 | KL | validation Δppl | top-1 | KL | passes there |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for i, e in enumerate(r["path"]):
            a, v = e["search"], e["validation"]
            mark = "**" if i == selected["index"] else ""
            ok = TuneSettings.from_record(st).ok(v)
            lines.append(
                f"| {mark}{i}{mark} | {'base' if e['round'] is None else e['round']} | {v['ratio']:.3f}x | "
                f"{_pct(a['dppl'])} | {a['top1'] * 100:.2f}% | {a['kl_mean']:.4f} | {_pct(v['dppl'])} | "
                f"{v['top1'] * 100:.2f}% | {v['kl_mean']:.4f} | {'yes' if ok else 'no'} |"
            )
        lines += ["", "![greedy path](tune_path.png)"]
    return "\n".join(lines) + "\n"


def plot_path(r: Mapping[str, Any], path: Path) -> None:
    """Δppl, top-1 and mean KL along the greedy path, on the search and the validation passages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = r["settings"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.6))
    x = [e["validation"]["ratio"] for e in r["path"]]
    for key, label, marker in (
        ("search", "search passages", "o"),
        ("validation", "validation passages", "s"),
    ):
        rows = [e[key] for e in r["path"]]
        ax1.plot(x, [row["dppl"] * 100 for row in rows], marker=marker, label=label)
        ax2.plot(x, [row["top1"] * 100 for row in rows], marker=marker, label=label)
        ax3.plot(x, [row["kl_mean"] for row in rows], marker=marker, label=label)
    chosen = r["selected"]["index"]
    for ax in (ax1, ax2, ax3):
        ax.axvline(x[chosen], color="black", linestyle="--", linewidth=1, label="written policy")
        ax.set_xlabel("compression ratio (measured, vs bf16)")
        ax.grid(alpha=0.3)
    b = st["budget_dppl"] * 100
    ax1.axhspan(
        -b if st.get("two_sided", True) else ax1.get_ylim()[0],
        b,
        color="tab:green",
        alpha=0.15,
        label="budget",
    )
    ax2.axhspan(st["min_top1"] * 100, 100, color="tab:green", alpha=0.15, label="top-1 floor")
    if st.get("budget_kl") is not None:
        ax3.axhspan(0, st["budget_kl"], color="tab:green", alpha=0.15, label="KL budget")
    ax3.set_ylabel("mean KL(ref ‖ codec)")
    ax3.legend(fontsize=8)
    ax1.set_ylabel("Δppl (%)")
    ax2.set_ylabel("top-1 agreement with codec off (%)")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.suptitle(f"kakeya tune greedy path: {r['policy']['name']} on {r['model']['name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
