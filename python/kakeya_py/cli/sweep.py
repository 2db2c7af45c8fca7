"""``kakeya sweep``: our codec and the peer methods on one grid, and the frontier report.

``kakeya sweep --methods kakeya:recommended,kivi-2,int4,... --passages 16`` evaluates every
method on the same passages against the same codec-off reference and writes, under
``--out`` (default ``reports/frontier``):

- ``points/<method>.json``: one record per method with the fields of ``kakeya eval
  --json`` (built by the same :func:`~kakeya_py.cli.harness.base_record` /
  :func:`~kakeya_py.cli.harness.finish_record`) plus ``method`` and ``family``; the
  folder is emptied of ``*.json`` first, so it holds exactly the last sweep;
- ``frontier.md``: the table (sorted by family and measured ratio, with the verdict), the
  command, model, text record and versions;
- ``frontier.png``: Δppl (95% CI bars) and top-1 against the measured ratio, one line per
  family, the ACCEPT bands shaded.

Methods: ``kakeya:<policy preset | codec preset | policy JSON file>`` (``kakeya:recommended``,
``kakeya:mse-3bit`` = that codec config on both streams of every layer) and the peers of
:mod:`kakeya_py.peers` (``fp8``, ``int4``, ``int3``, ``kivi-2``, ``kivi-4``, ``turbo-3``,
``turbo-4``, ``kvquant-3``, ``kvquant-4``, options in parentheses). K reaches every method
pre-RoPE unless ``--post-rope-k`` / ``--k-position post_rope``; a ``@post-rope`` or
``@pre-rope`` suffix sets it for one method (``kivi-2@post-rope``: KIVI as deployed, on
rotated K), which is then its own line (family ``kivi (post-rope K)``).

Engines: ``hf`` runs all methods as variants of **one** :meth:`HFRunner.run` (one prefill and
one reference pass per passage, shared); each point's ``seconds`` is the shared reference time
plus that method's own codec-on time. ``vllm`` runs the methods one after the other on one
vLLM engine through the same measurement as ``kakeya eval --engine vllm``
(:func:`kakeya_py.cli.engines.vllm_measure`), each with its own reference request.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import time
from pathlib import Path
from typing import Any

from ..peers.policy import split_methods

DEFAULT_METHODS = (
    "kakeya:recommended,kakeya:mse-4bit,kakeya:mse-3bit,kivi-2,kivi-4,int4,int3,fp8,"
    "turbo-3,turbo-4,kvquant-3,kvquant-4"
)
DEFAULT_OUT = "reports/frontier"
POINTS = "points"


def register(sub) -> None:
    from .harness import add_eval_args

    p = sub.add_parser(
        "sweep", help="our codec and peer methods (KIVI, int4/3, fp8, TurboQuant, KVQuant) on one grid"
    )
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"], help="evaluation engine (default hf)")
    p.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help="comma list: kakeya:<preset|policy.json> and peers fp8, int4, int3, kivi-2, kivi-4, turbo-3, "
        f"turbo-4, kvquant-3, kvquant-4 (options in parentheses, e.g. kivi-2(r=0)); default {DEFAULT_METHODS}",
    )
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument(
        "--sink-tokens",
        type=int,
        default=1,
        help="leading positions every peer keeps exact, as kakeya's presets do (default 1: like-for-like; "
        "KVQuant keeps its own sink= option)",
    )
    p.add_argument(
        "--window-tokens",
        type=int,
        default=0,
        help="last prefix positions every peer keeps exact, as a kakeya policy's window_tokens "
        "(default 0; KIVI / int keep their own r= window)",
    )
    p.add_argument(
        "--k-position",
        default=None,
        choices=["pre_rope", "post_rope"],
        help="K given to every method (default pre_rope; = --post-rope-k); a method's own "
        "@pre-rope / @post-rope suffix wins",
    )
    p.add_argument("--topk", type=int, default=20, help="vLLM only: top-k log-probs (default 20)")
    p.add_argument("--vllm-in-process", action="store_true", default=None, help=argparse.SUPPRESS)
    add_eval_args(p)
    for action in p._actions:  # eval's --config / --json do not apply to a sweep
        if action.dest in ("config", "json"):
            action.help = argparse.SUPPRESS
    p.set_defaults(func=cmd_sweep)


# -- methods ---------------------------------------------------------------------------------
K_SUFFIXES = {"@pre-rope": "pre_rope", "@post-rope": "post_rope"}


def split_k_position(method: str) -> tuple[str, str | None]:
    """``"kivi-2@post-rope"`` -> ``("kivi-2", "post_rope")``; no suffix -> ``(method, None)``."""
    for suffix, pos in K_SUFFIXES.items():
        if method.endswith(suffix):
            return method[: -len(suffix)], pos
    if "@" in method:
        raise ValueError(f"method {method!r}: the only suffixes are {sorted(K_SUFFIXES)}")
    return method, None


def family_of(method: str) -> str:
    """The family of a ``--methods`` entry: ``kakeya``, or a peer's (also for ``kakeya:FILE`` holding
    a peer policy, e.g. one ``kakeya tune`` wrote over a peer ladder)."""
    from ..peers import load_peer_policy, parse_method

    base, pos = split_k_position(method)
    if base.startswith("kakeya:"):
        peer = load_peer_policy(base.split(":", 1)[1])
        fam = "kakeya" if peer is None else peer.family
    else:
        fam = parse_method(base).family
    return fam + (f" ({pos.replace('_', '-')} K)" if pos else "")


def slug(method: str) -> str:
    if method.startswith("kakeya:"):
        spec = method.split(":", 1)[1]
        spec = Path(spec).stem if spec.endswith(".json") else spec
        method = f"kakeya-{spec}"
    return re.sub(r"[^A-Za-z0-9.\-]+", "_", method).strip("_")


def build_method(method: str, args, info, text):
    """``(policy, codec)`` for one method: a kakeya :class:`Policy` + ``PolicyCodec``, or a
    :class:`~kakeya_py.peers.PeerPolicy` (its own codec). The selection flags (``--layers``,
    ``--streams``, ``--exact-layers``, ``--post-rope-k``) apply to every method."""
    from ..codec import PRESETS
    from ..peers import PeerPolicy, parse_method
    from ..policy import POLICY_PRESETS, Policy, _layer_list
    from .harness import policy_codec, prepare_policy

    method_name = method
    method, own_position = split_k_position(method)
    k_position = own_position or ("post_rope" if args.post_rope_k else "pre_rope")
    if method.startswith("kakeya:"):
        spec = method.split(":", 1)[1]
        if spec in PRESETS and spec not in POLICY_PRESETS:
            d = {"name": method, "description": f"codec preset {spec} on both streams of every layer"}
            policy = Policy.from_dict({**d, "k": PRESETS[spec], "v": PRESETS[spec]}).with_changes(
                layers=args.layers,
                streams=args.streams,
                exact_layers=args.exact_layers,
                k_position=k_position,
            )
            sigma = None
        else:
            margs = copy.copy(args)
            margs.config = spec
            margs.post_rope_k = k_position == "post_rope"
            policy, sigma = prepare_policy(margs, info, text)
        policy.name = method_name
        return policy, policy_codec(policy, info.num_layers, sigma_q=sigma, threads=args.threads)
    peer = PeerPolicy(
        parse_method(method),
        info.num_layers,
        exact_layers=_layer_list(args.exact_layers) if args.exact_layers is not None else [],
        layers=None if args.layers is None else _layer_list(args.layers),
        streams=args.streams or "kv",
        k_position=k_position,
        sink_tokens=args.sink_tokens,
        window_tokens=args.window_tokens,
    )
    return peer, peer


# -- engines ---------------------------------------------------------------------------------
def sweep_hf(args, methods: list[str]) -> list[dict[str, Any]]:
    from ..eval.harness import HFRunner, Variant
    from .harness import base_record, finish_record, load_hf, prepare_text, set_threads

    t0 = time.perf_counter()
    set_threads(args)
    model, tok, info = load_hf(args)
    text = prepare_text(args, tok)
    built = [build_method(m, args, info, text) for m in methods]
    runner = HFRunner(model, k_position="post_rope" if args.post_rope_k else "pre_rope")
    variants = [
        Variant(m, codec.roundtrip, k_position=policy.k_position)
        for m, (policy, codec) in zip(methods, built, strict=True)
    ]
    results, ref_seconds = runner.run(
        text["passages"], variants, mode=args.mode, progress=not args.no_progress, desc="sweep"
    )
    total = time.perf_counter() - t0
    records = []
    for policy, res in zip((b[0] for b in built), results, strict=True):
        record = base_record(args, "hf", info, policy, text)
        finish_record(record, res.summary(seed=args.seed), res.ledger, ref_seconds + res.seconds)
        record["seconds_reference"] = ref_seconds
        record["seconds_codec"] = res.seconds
        record["seconds_sweep"] = total
        records.append(record)
    return records


def sweep_vllm(args, methods: list[str]) -> list[dict[str, Any]]:
    from .engines import _engine, model_info, vllm_measure
    from .harness import prepare_text

    path, tok, info = model_info(args.model, args.dtype, progress=not args.no_progress)
    text = prepare_text(args, tok)
    engine = _engine(path, args.dtype, args, args.topk)
    records = []
    try:
        for method in methods:
            policy, _ = build_method(method, args, info, text)
            record, _, _ = vllm_measure(args, engine=engine, topk=args.topk, policy=policy)
            records.append(record)
    finally:
        engine.close()
    return records


# -- command ---------------------------------------------------------------------------------
def cmd_sweep(args) -> int:
    from .harness import DEFAULT_CONFIG, _finite

    if args.config != DEFAULT_CONFIG or args.json:
        raise SystemExit(
            "kakeya sweep takes --methods (e.g. kakeya:my_policy.json) and --out, not --config/--json"
        )
    if args.k_position == "post_rope":
        args.post_rope_k = True
    methods = split_methods(args.methods)
    for m in methods:
        family_of(m)  # unknown names fail before the model loads
    t0 = time.perf_counter()
    records = (sweep_vllm if args.engine == "vllm" else sweep_hf)(args, methods)
    for method, record in zip(methods, records, strict=True):
        record["method"] = method
        record["family"] = family_of(method)
        record["part"] = record["text_usage"]["part"]
    out = Path(args.out)
    points = out / POINTS
    points.mkdir(parents=True, exist_ok=True)
    for old in points.glob("*.json"):
        old.unlink()
    for record in records:
        path = points / f"{slug(record['method'])}.json"
        path.write_text(json.dumps(_finite(record), indent=1, allow_nan=False) + "\n")
    md = frontier_markdown(records, seconds=time.perf_counter() - t0)
    (out / "frontier.md").write_text(md)
    plot_frontier(records, out / "frontier.png")
    print(md)
    print(f"written: {points}/*.json ({len(records)}), {out / 'frontier.md'}, {out / 'frontier.png'}")
    return 0


# -- report ----------------------------------------------------------------------------------
def _sorted(records):
    order = {"kakeya": 0}
    return sorted(records, key=lambda r: (order.get(r["family"], 1), r["family"], r["ratio_measured"] or 0))


def _pct(x, d=2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x * 100:+.{d}f}%"


def _x(x) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def frontier_markdown(records: list[dict[str, Any]], *, seconds: float) -> str:
    from ..eval.metrics import VERDICT_RULE
    from ..eval.report import fmt_num

    r0 = records[0]
    model, corpus = r0["model"], r0["corpus"]
    usage = r0["text_usage"]
    arts = usage.get("articles") if isinstance(usage, dict) else None
    positions = sorted({r["config"].get("k_position", "pre_rope") for r in records})
    k_pos = " and ".join(p.replace("_", "-") for p in positions)
    lines = [
        f"# KV-cache frontier: kakeya and peer methods on {model['name']}",
        "",
        "Regenerate (one command, from the repository root):",
        "",
        "```bash",
        r0["command"],
        "```",
        "",
        f"- **model**: `{model['name']}` ({model['architecture']}, {model['num_layers']} layers, "
        f"{model['num_kv_heads']} KV heads × {model['head_dim']}), {r0['dtype']}; source `{model['source']}`"
        + (f" (sha256 `{model['source_sha256']}`)" if model.get("source_sha256") else ""),
        f"- **text**: {corpus['name']} (sha256 `{corpus['sha256']}`), {r0['text_usage']['part']} part (split: "
        f"{corpus['split'].get('rule', '')}); {r0['passages']} passages × ({r0['ctx']} context + {r0['n_eval']} evaluated) "
        f"tokens = {r0['eval_tokens']} scored positions"
        + (f"; articles used: {arts}" if arts is not None else ""),
        f"- **engine / mode**: {r0['engine']}, {r0['mode']}; K given to the methods **{k_pos}** (column K); "
        "every method shares the same passages and codec-off reference",
        f"- **version**: kakeya {r0['version']}; "
        + ", ".join(f"{k} {v}" for k, v in sorted(r0.get("versions", {}).items()))
        + f"; sweep wall time {seconds:.0f} s",
        "- **ratio**: bf16 bytes of the whole cache / bytes stored, measured from what each method "
        "stores (our codec: the serialized encodings; peers: the `.nbytes` of their arrays; "
        "tensors left exact at 2 bytes/value). Methods: `docs/peers.md`.",
        f"- **verdict**: {VERDICT_RULE}",
        "",
        "| method | family | K | ratio | K / V ratio | Δppl | 95% CI | top-1 | KL mean | KL p95 | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in _sorted(records):
        lo, hi = r["dppl_ci95"] or (None, None)
        lines.append(
            f"| `{r['method']}` | {r['family']} | {r['config'].get('k_position', 'pre_rope').replace('_', '-')} | "
            f"{_x(r['ratio_measured'])} | {_x(r['ratio_k'])} / "
            f"{_x(r['ratio_v'])} | {_pct(r['dppl'])} | [{_pct(lo)}, {_pct(hi)}] | {r['top1'] * 100:.2f}% | "
            f"{fmt_num(r['kl_mean'])} | {fmt_num(r['kl_p95'])} | {r['verdict']} |"
        )
    lines += [
        "",
        "![frontier](frontier.png)",
        "",
        "Per-point records (every `kakeya eval --json` field plus `method`): `points/*.json`.",
    ]
    return "\n".join(lines) + "\n"


def plot_frontier(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..eval.metrics import ACCEPT_DPPL, ACCEPT_TOP1

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.2))
    families = []
    for r in _sorted(records):
        if r["family"] not in families:
            families.append(r["family"])
    markers = "osD^v<>ph*"
    for i, fam in enumerate(families):
        pts = sorted((r for r in records if r["family"] == fam), key=lambda r: r["ratio_measured"] or 0)
        x = [r["ratio_measured"] for r in pts]
        y = [r["dppl"] * 100 for r in pts]
        lo = [(r["dppl"] - r["dppl_ci95"][0]) * 100 for r in pts]
        hi = [(r["dppl_ci95"][1] - r["dppl"]) * 100 for r in pts]
        style = dict(marker=markers[i % len(markers)], label=fam, linewidth=1.6 if fam == "kakeya" else 1.1)
        line = ax1.errorbar(x, y, yerr=[lo, hi], capsize=3, **style)
        color = line[0].get_color()
        ax2.plot(x, [r["top1"] * 100 for r in pts], color=color, **style)
        for r in pts:
            label = r["method"].removeprefix("kakeya:")
            ax1.annotate(
                label,
                (r["ratio_measured"], r["dppl"] * 100),
                fontsize=7,
                xytext=(4, 3),
                textcoords="offset points",
                color=color,
            )
            ax2.annotate(
                label,
                (r["ratio_measured"], r["top1"] * 100),
                fontsize=7,
                xytext=(4, 3),
                textcoords="offset points",
                color=color,
            )
    ax1.axhspan(
        -ACCEPT_DPPL * 100,
        ACCEPT_DPPL * 100,
        color="tab:green",
        alpha=0.15,
        label=f"ACCEPT: |Δppl| ≤ {ACCEPT_DPPL:.0%}",
    )
    ax1.axhline(0, color="black", linewidth=0.6)
    ax1.set_yscale("symlog", linthresh=1.0)
    ax1.set_xlabel("compression ratio (measured, vs bf16)")
    ax1.set_ylabel("Δppl (%), 95% CI; symlog")
    ax1.set_title("Δppl vs measured ratio")
    ax2.axhspan(
        ACCEPT_TOP1 * 100, 100.5, color="tab:green", alpha=0.15, label=f"ACCEPT: top-1 ≥ {ACCEPT_TOP1:.0%}"
    )
    ax2.set_xlabel("compression ratio (measured, vs bf16)")
    ax2.set_ylabel("top-1 agreement with codec off (%)")
    ax2.set_title("top-1 vs measured ratio")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    r0 = records[0]
    fig.suptitle(
        f"{r0['model']['name']}, {r0['corpus']['name']}, {r0['passages']} passages × ({r0['ctx']} + "
        f"{r0['n_eval']}), {r0['engine']} {r0['mode']}; "
        f"kakeya {r0['version']}",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
