"""Markdown summaries of harness results (stdout of the ``kakeya`` subcommands)."""

from __future__ import annotations

from typing import Any


def fmt_pct(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x * 100:+.{digits}f}%"


def fmt_num(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if x == 0 or 1e-3 <= abs(x) < 1e5:
        return f"{x:.{digits}f}"
    return f"{x:.{digits - 1}e}"


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _ci(ci: list[float] | None) -> str:
    return "n/a" if not ci else f"[{fmt_pct(ci[0])}, {fmt_pct(ci[1])}]"


def _header(r: dict[str, Any], title: str) -> list[str]:
    model = r["model"]
    return [
        f"## {title}: {r['config']['name']} on {model['name']} ({r['engine']}, {r['mode']}, {r['dtype']})",
        "",
        f"{r['passages']} passages x (ctx {r['ctx']} + {r['n_eval']} evaluated) from {r['corpus']['name']}, "
        f"part **{r.get('text_usage', {}).get('part', 'n/a')}**; kakeya {r['version']}; {r['seconds']:.1f} s",
        "",
        *(
            ["**In-sample**: the policy was fitted or chosen on these articles (`--allow-overlap`).", ""]
            if r.get("overlap")
            else []
        ),
        *([f"command: `{r['command']}`", ""] if r.get("command") else []),
    ]


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def ratio_note(r: dict[str, Any]) -> str:
    """Why ``identity`` is not 1x on a model that is not bf16: it stores the model's values as they are."""
    cfg = r.get("config") or {}
    streams = [cfg.get(s) for s in ("k", "v") if cfg.get(s) is not None]
    dtype = (r.get("model") or {}).get("dtype") or r.get("dtype")
    if not streams or not all(s.get("identity") for s in streams) or dtype not in _DTYPE_BYTES:
        return ""
    size = _DTYPE_BYTES[dtype]
    if dtype == "bfloat16":
        return ""
    return (
        f"; identity stores the model's dtype ({dtype}, {size} bytes per value) verbatim: at most "
        f"{2 / size:.2f}x against bf16"
    )


def eval_markdown(r: dict[str, Any]) -> str:
    """The summary of ``kakeya eval``."""
    lines = _header(r, "kakeya eval")
    rows = [
        ("verdict (CI rule)", f"**{r['verdict']}**"),
        ("verdict (point estimates, the rule before the protocol)", r.get("verdict_point", "n/a")),
        ("Δppl (pooled NLL)", f"{fmt_pct(r['dppl'])}  95% CI {_ci(r['dppl_ci95'])}"),
        ("ppl ref -> codec", f"{fmt_num(r['ppl_ref'])} -> {fmt_num(r['ppl_alt'])}"),
        (
            "top-1 agreement",
            f"{r['top1'] * 100:.2f}%"
            + (f"  95% CI [{r['top1_ci95'][0] * 100:.2f}, {r['top1_ci95'][1] * 100:.2f}]" if r.get("top1_ci95") else ""),
        ),
        (
            "KL(ref‖codec) mean / rmse / p95 / max",
            " / ".join(fmt_num(r[k]) for k in ("kl_mean", "kl_rmse", "kl_p95", "kl_max")),
        ),
        *(
            [
                (
                    "KL top-k lower bound (vLLM) mean / rmse / p95 / max",
                    " / ".join(fmt_num(r.get("kl_topk_lb_" + k)) for k in ("mean", "rmse", "p95", "max")),
                )
            ]
            if "kl_topk_lb_mean" in r
            else []
        ),
        ("\\|Δ log p\\| mean / max", f"{fmt_num(r['dlogp_mean'])} / {fmt_num(r['dlogp_max'])}"),
        ("ESS", fmt_num(r["ess"])),
        (
            "ρ outside [1/2, 2] / [1/5, 5]",
            f"{r['frac_outside_2x'] * 100:.2f}% / {r['frac_outside_5x'] * 100:.2f}%",
        ),
        *(
            [
                (
                    "clipped (\\|log ρ\\| > 20) / vetoed (> 30) tokens; passages with a veto",
                    f"{r['frac_clipped'] * 100:.3f}% / {r['frac_veto'] * 100:.3f}%; {r['seq_veto'] * 100:.1f}%",
                ),
                ("share of Σ\\|Δ log p\\| in its top 1% of tokens", f"{r['dlogp_top1pct_mass'] * 100:.1f}%"),
                (
                    "sequence log-ratio Σ log ρ per passage: mean / max \\|·\\|",
                    f"{fmt_num(r['seq_log_ratio_mean'])} / {fmt_num(r['seq_log_ratio_abs_max'])}",
                ),
            ]
            if "frac_clipped" in r
            else []
        ),
        ("k3 KL", fmt_num(r["k3_kl"])),
        ("mean exp\\|Δ log p\\|", fmt_num(r["mean_exp_abs_dlogp"])),
        ("log-prob Pearson", fmt_num(r["logprob_pearson"], 6)),
        (
            "compression ratio (measured)",
            f"{fmt_ratio(r['ratio_measured'])} (K {fmt_ratio(r['ratio_k'])}, V {fmt_ratio(r['ratio_v'])})"
            + ratio_note(r),
        ),
        ("eval tokens", str(r["eval_tokens"])),
    ]
    if r.get("model_basis"):
        mb = r["model_basis"]
        rows.append(
            (
                "model basis (per-model constant, not in the ratio)",
                f"{mb['bytes'] / 1e6:.2f} MB, sha256 {mb['sha256'][:16]}…",
            )
        )
    if r.get("underflow_ref") or r.get("underflow_alt"):
        rows.append(("log-probs at floor (ref / codec)", f"{r['underflow_ref']} / {r['underflow_alt']}"))
    lines += ["| metric | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    lines += ["", f"Verdict rule: {r['verdict_rule']}."]
    if r.get("rho_orientation"):
        lines += ["", f"ρ = {r['rho_orientation']}."]
    return "\n".join(lines) + "\n"


def attribution_markdown(r: dict[str, Any]) -> str:
    lines = _header(r, "kakeya attribution")
    if r.get("layers"):
        lines += [
            f"### Per layer (codec on one layer only), ranked by {'Δppl' if r.get('rank_by') != 'kl' else 'mean KL'}",
            "",
            "| rank | layer | Δppl | 95% CI | top-1 | KL mean | ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for rank, row in enumerate(r["layers"], 1):
            lines.append(
                f"| {rank} | {row['layer']} | {fmt_pct(row['dppl'])} | {_ci(row['dppl_ci95'])} | "
                f"{row['top1'] * 100:.2f}% | {fmt_num(row['kl_mean'])} | {fmt_ratio(row['ratio'])} |"
            )
        lines.append("")
    if r.get("streams"):
        s = r["streams"]
        lines += [
            "### Per stream",
            "",
            "| streams | Δppl | 95% CI | top-1 | verdict |",
            "|---|---|---|---|---|",
        ]
        for name in ("k", "v", "kv"):
            row = s[name]
            lines.append(
                f"| {name.upper()} | {fmt_pct(row['dppl'])} | {_ci(row['dppl_ci95'])} | "
                f"{row['top1'] * 100:.2f}% | {row['verdict']} |"
            )
        lines += [
            "",
            f"Interaction Δppl(KV) − Δppl(K) − Δppl(V): {fmt_pct(s['interaction'])} {_ci(s['interaction_ci95'])}",
        ]
    return "\n".join(lines) + "\n"


def noise_markdown(r: dict[str, Any]) -> str:
    lines = _header(r, "kakeya noise")
    lines += [
        "K/V + σ·rms·N(0,1) on the (layer, stream) pairs the policy compresses.",
        "",
        "| σ | Δppl | 95% CI | top-1 | KL mean | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["sweep"]:
        lines.append(
            f"| {row['sigma']:g} | {fmt_pct(row['dppl'])} | {_ci(row['dppl_ci95'])} | {row['top1'] * 100:.2f}% | "
            f"{fmt_num(row['kl_mean'])} | {row['verdict']} |"
        )
    return "\n".join(lines) + "\n"


def residual_markdown(r: dict[str, Any]) -> str:
    lines = _header(r, "kakeya residual")
    lines += [
        "Relative error ‖x̂ − x‖ / ‖x‖ of the codec on each layer's prefix (pooled over passages).",
        "",
        "| layer | K rel. error | V rel. error | K ratio | V ratio |",
        "|---|---|---|---|---|",
    ]
    for row in r["layers"]:
        ke, ve = row["k_rel_error"], row["v_rel_error"]
        lines.append(
            f"| {row['layer']} | {'exact' if ke is None else f'{ke:.4f}'} | {'exact' if ve is None else f'{ve:.4f}'} | "
            f"{fmt_ratio(row['k_ratio'])} | {fmt_ratio(row['v_ratio'])} |"
        )
    lines += ["", f"Whole cache: {fmt_ratio(r['ratio_measured'])}"]
    return "\n".join(lines) + "\n"
