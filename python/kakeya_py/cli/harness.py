"""Subcommands of the HF harness: ``eval``, ``attribution``, ``noise``, ``residual``.

The helpers here are shared with other engines: :func:`add_eval_args` (the flags of
``kakeya eval``), :func:`prepare_text` (corpus, split, passages, text usage),
:func:`prepare_policy` (``--config`` plus selections, Σ_q loaded and checked against
the evaluation text), :func:`base_record` / :func:`finish_record` (the JSON fields), and
:func:`emit` (Markdown on stdout, JSON file).

JSON record of ``kakeya eval`` (all engines): ``engine, model, mode, dtype, passages,
eval_tokens, ctx, n_eval, config, dppl, dppl_ci95, top1, kl_mean, kl_rmse, kl_p95,
kl_max, ess`` and the other metrics of :func:`kakeya_py.eval.metrics.summarize`,
``ratio_measured, ratio_k, ratio_v, cache`` (bytes per layer and stream), ``verdict,
verdict_rule, seconds, seconds_reference, seconds_codec, command, argv, version,
versions, seed, corpus`` (name, source, sha256, split), ``text_usage`` (the articles
used) and ``passages_provenance``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import policy as _policy

DEFAULT_CONFIG = "recommended"
DEFAULT_DTYPE = "float32"


# -- arguments --------------------------------------------------------------------------------
def add_eval_args(
    p: argparse.ArgumentParser,
    *,
    passages: int = 16,
    ctx: int = 1024,
    n_eval: int = 256,
    part: str = "test",
) -> None:
    """The flags shared by ``eval`` and the diagnostics (and by other engines).

    ``part``: the default text part; ``test`` for numbers we publish, ``validation`` for
    the diagnostics whose output is used to choose (rankings, attribution).
    """
    from ..eval.harness import MODES
    from ..models import DEFAULT_MODEL

    g = p.add_argument_group("model and text")
    g.add_argument("--model", default=DEFAULT_MODEL, help="smollm2-135m, an HF model id or a local folder")
    g.add_argument(
        "--dtype", default=DEFAULT_DTYPE, help="float32 (default; fastest on CPU), bfloat16, float16"
    )
    g.add_argument(
        "--text",
        default="wikitext",
        choices=["wikitext", "code"],
        help="built-in text: wikitext (WikiText-2, three parts) or code (out-of-domain Python "
        "standard-library source: validation and test parts, other modules each); default wikitext",
    )
    g.add_argument(
        "--part",
        default=part,
        choices=["calibration", "validation", "test"],
        help=f"text part (default {part}): calibration fits, validation chooses, test reports; "
        "nothing is chosen on test",
    )
    g.add_argument("--text-file", default=None, help="evaluate on this UTF-8 text instead of WikiText-2")
    g.add_argument(
        "--wikitext", default=None, help="path of wiki.test.raw (default: $KAKEYA_WIKITEXT or ../shared/...)"
    )
    g.add_argument("--passages", type=int, default=passages, help=f"number of passages (default {passages})")
    g.add_argument("--ctx", type=int, default=ctx, help=f"context tokens per passage (default {ctx})")
    g.add_argument(
        "--n-eval", type=int, default=n_eval, help=f"evaluated positions per passage (default {n_eval})"
    )
    g = p.add_argument_group("codec")
    g.add_argument(
        "--config", default=DEFAULT_CONFIG, help="policy JSON file or preset: identity, recommended, ..."
    )
    g.add_argument(
        "--mode", default="snapshot", choices=MODES, help="where the codec acts (default snapshot)"
    )
    g.add_argument(
        "--layers", default=None, help="layers the codec may touch, e.g. '0-9,12' (default: policy)"
    )
    g.add_argument("--streams", default=None, choices=["k", "v", "kv"], help="streams the codec may touch")
    g.add_argument("--exact-layers", default=None, help="boundary layers kept exact, e.g. '0,-1' or 'none'")
    g.add_argument("--post-rope-k", action="store_true", help="compress K after RoPE (comparison only)")
    g.add_argument("--sigma-q", default=None, help="sigma_q.safetensors for metric=inner_product")
    g.add_argument(
        "--noise-floor",
        action="store_true",
        help="also run the model in bfloat16 codec-off on the same passages and report it as the noise "
        "floor beside the codec's numbers (one more forward per passage; hf engine)",
    )
    g.add_argument(
        "--allow-overlap",
        action="store_true",
        help="evaluate even if the policy was fitted or chosen on the evaluated articles "
        "(the record says overlap: true: an in-sample figure)",
    )
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of noise")
    g.add_argument("--threads", type=int, default=None, help="torch and codec threads (default: all cores)")
    g.add_argument("--json", default=None, metavar="PATH", help="write the full result here")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(sub) -> None:
    p = sub.add_parser("eval", help="measure a codec policy's quality cost (Δppl, top-1, KL, ...)")
    p.add_argument("--engine", default="hf", help="evaluation engine (default hf)")
    add_eval_args(p)
    for action in p._actions:
        if action.dest == "json":
            action.help = "write the full result here (default: runs/eval_CONFIG_ENGINE_TIME.json)"
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("attribution", help="Δppl with the codec on one layer at a time, and per stream")
    add_eval_args(p, passages=16, ctx=512, n_eval=128, part="validation")  # rankings choose: >= 16
    p.add_argument("--by", default="both", choices=["layer", "stream", "both"], help="what to attribute")
    p.add_argument(
        "--rank-by",
        default="dppl",
        choices=["dppl", "kl"],
        help="rank layers by Δppl (default) or mean KL (steadier)",
    )
    p.set_defaults(func=cmd_attribution, diagnostic=True)

    p = sub.add_parser("noise", help="Δppl when K/V get Gaussian noise σ·rms instead of the codec")
    add_eval_args(p, passages=4, ctx=512, n_eval=128, part="validation")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3], help="noise levels")
    p.set_defaults(func=cmd_noise, diagnostic=True)

    p = sub.add_parser("residual", help="relative K/V error of the codec per layer (no model quality)")
    add_eval_args(p, passages=4, ctx=1024, n_eval=1, part="validation")
    p.set_defaults(func=cmd_residual, diagnostic=True)


# -- shared setup ------------------------------------------------------------------------------
def set_threads(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


def prepare_text(args, tokenizer) -> dict[str, Any]:
    """Corpus, split, passages and the record of the text they use."""
    from ..eval.corpus import load_corpus, make_passages, tokenize_articles

    part = getattr(args, "part", "test")
    corpus = load_corpus(args.text_file, args.wikitext, getattr(args, "text", "wikitext"), part)
    split = corpus.split()
    stream = tokenize_articles(tokenizer, corpus.part(part))
    passages = make_passages(stream, args.passages, args.ctx, args.n_eval)
    used = sorted({a["index"] for p in passages for a in p.articles})
    return {
        "corpus": corpus,
        "split": split,
        "passages": passages,
        "usage": split.usage(part, used),
        "stream_tokens": len(stream.ids),
    }


def prepare_policy(args, info, text: dict[str, Any] | None = None):
    """``(policy, sigma_q)`` from ``--config`` and the selection flags.

    The policy's provenance (the text it was fitted or chosen on) and, when it names a Σ_q
    file, that file's calibration text must not overlap the evaluated articles: refused with
    :class:`~kakeya_py.eval.corpus.CorpusOverlapError` unless ``--allow-overlap``, and then the
    record says ``overlap: true``.
    """
    from ..eval.corpus import CorpusError, CorpusOverlapError, check_disjoint
    from ..peers import load_peer_policy
    from ..policy import load_policy, load_sigma_q, provenance_overlap

    # a peer policy file (``kakeya tune`` over a peer ladder) or a peer method spec, else kakeya's
    peer = load_peer_policy(args.config, info.num_layers)
    policy = (load_policy(args.config) if peer is None else peer).with_changes(
        layers=args.layers,
        streams=args.streams,
        exact_layers=args.exact_layers,
        k_position="post_rope" if args.post_rope_k else None,
        sigma_q=args.sigma_q,
    )
    # per-layer settings made for another model, or layers it lacks: refused (--force-model: dropped)
    policy, dropped = _policy.fit_to_model(policy, info, force=getattr(args, "force_model", False))
    if peer is not None and dropped:
        policy = policy.with_changes()  # its layer selection again, after what was dropped
    sigma = None
    if policy.sigma_q:
        sigma = load_sigma_q(
            policy.sigma_q, num_layers=info.num_layers, num_kv_heads=info.num_kv_heads, head_dim=info.head_dim
        )
        if text is not None:
            if sigma.text is None:
                raise CorpusError(
                    f"{sigma.path}: no calibration text recorded (sigma_q.json 'text'); cannot prove it is "
                    "disjoint from the evaluation text"
                )
            try:
                check_disjoint(sigma.text, text["usage"])
            except CorpusOverlapError as e:
                if not getattr(args, "allow_overlap", False):
                    raise CorpusOverlapError(f"{e}; pass --allow-overlap to measure it in-sample") from None
                text.setdefault("overlaps", []).append({"role": "fit", "part": "sigma_q", "error": str(e)})
    if text is not None:
        shared = provenance_overlap(policy, text["usage"])
        # diagnostics (attribution, noise, residual) inform choices on validation text: they
        # record the overlap instead of refusing it
        refuse = not (getattr(args, "allow_overlap", False) or getattr(args, "diagnostic", False))
        if shared and refuse:
            where = "; ".join(f"{r['role']} on {r['part']} articles {r['articles'][:12]}" for r in shared)
            raise CorpusOverlapError(
                f"policy {policy.name!r} was fitted or chosen on the text being evaluated ({where}); "
                "evaluate another part (--part test) or pass --allow-overlap to measure it in-sample"
            )
        text.setdefault("overlaps", []).extend(shared)
    return policy, sigma


def policy_codec(policy, num_layers: int, *, sigma_q=None, threads: int | None = None):
    """The codec of a loaded policy: a :class:`~kakeya_py.policy.PolicyCodec` for a kakeya
    policy; a :class:`~kakeya_py.peers.PeerPolicy` is its own codec."""
    from ..policy import PolicyCodec

    if getattr(policy, "peer", False):
        return policy
    return PolicyCodec(policy, num_layers, sigma_q=sigma_q, threads=threads)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def kakeya_version() -> str:
    import kakeya_py

    return kakeya_py.__version__


def base_record(args, engine: str, info, policy, text: dict[str, Any]) -> dict[str, Any]:
    """The fields every result shares, before the measurement."""
    corpus, split = text["corpus"], text["split"]
    return {
        "engine": engine,
        "model": info.to_dict(),
        "mode": args.mode,
        "dtype": args.dtype,
        "passages": len(text["passages"]),
        "ctx": args.ctx,
        "n_eval": args.n_eval,
        "config": policy.to_dict(),
        "seed": args.seed,
        "threads": args.threads,
        "command": shlex.join(getattr(args, "argv", ["kakeya"])),
        "argv": list(getattr(args, "argv", ["kakeya"])),
        "version": kakeya_version(),
        "versions": versions(),
        "corpus": {
            "name": corpus.name,
            "source": corpus.source,
            "sha256": corpus.sha256,
            "split": split.to_dict(),
            "evaluation_tokens": text["stream_tokens"],
        },
        "text_usage": text["usage"],
        "overlap": bool(text.get("overlaps")),
        "overlaps": text.get("overlaps", []),
        "policy_provenance": getattr(policy, "provenance", []),
        "passages_provenance": [p.provenance() for p in text["passages"]],
        "model_basis": _model_basis_record(policy),
    }


def _model_basis_record(policy) -> dict[str, Any] | None:
    """The per-model constant a basis policy needs: its file, hash and size (not in the ratio;
    the codec loads and checks the tensors)."""
    if getattr(policy, "basis", None) is None:
        return None
    from ..calibration.model_basis import read_basis_sidecar

    path, _, digest = read_basis_sidecar(policy.basis)
    return {"path": str(path), "sha256": digest, "bytes": path.stat().st_size}


def finish_record(record: dict[str, Any], summary: dict[str, Any], ledger, seconds: float) -> dict[str, Any]:
    """Add the metrics, the measured cache size and timings to a record."""
    cache = ledger.to_dict()
    record.update(summary)
    record["passages"] = summary["passages"]
    record.update(
        {
            "ratio_measured": cache["ratio_measured"],
            "ratio_k": cache["ratio_k"],
            "ratio_v": cache["ratio_v"],
            "cache": cache,
            "seconds": seconds,
        }
    )
    return record


def _finite(obj):
    """``obj`` made JSON-safe: non-finite floats become None, numpy scalars Python numbers."""
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def emit(record: dict[str, Any], markdown: str, json_path: str | None) -> None:
    """Print the Markdown summary; write the JSON (non-finite numbers become null)."""
    sys.stdout.write(markdown)
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_finite(record), indent=2, allow_nan=False) + "\n")
        sys.stdout.write(f"\nJSON written to {path}\n")


def load_hf(args):
    from ..models import load_model

    return load_model(args.model, args.dtype, progress=not args.no_progress)


def _runner_and_codec(args):
    from ..eval.harness import HFRunner

    set_threads(args)
    model, tok, info = load_hf(args)
    text = prepare_text(args, tok)
    policy, sigma = prepare_policy(args, info, text)
    codec = policy_codec(policy, info.num_layers, sigma_q=sigma, threads=args.threads)
    return HFRunner(model, k_position=policy.k_position), codec, info, policy, text


# -- eval --------------------------------------------------------------------------------------
def measure_hf(args, desc: str = "eval"):
    """One policy under HF: ``(record, per-passage tokens)``."""
    from ..eval.harness import Variant, codec_transform

    t0 = time.perf_counter()
    runner, codec, info, policy, text = _runner_and_codec(args)
    floor_model = None
    if getattr(args, "noise_floor", False):
        import copy

        import torch

        floor_model = copy.deepcopy(runner.model).to(torch.bfloat16)
    results, ref_seconds = runner.run(
        text["passages"],
        [Variant(policy.name, codec_transform(codec))],
        mode=args.mode,
        progress=not args.no_progress,
        desc=f"{desc} {policy.name}",
        floor_model=floor_model,
    )
    res = results[0]
    record = base_record(args, "hf", info, policy, text)
    finish_record(record, res.summary(seed=args.seed), res.ledger, time.perf_counter() - t0)
    if floor_model is not None:
        s = results[1].summary(seed=args.seed)
        record["noise_floor"] = {
            "what": f"the model in bfloat16 against the {args.dtype} reference, codec off, same passages",
            **{k: s[k] for k in ("dppl", "dppl_ci95", "top1", "top1_ci95", "kl_mean", "kl_p95")},
        }
    record["seconds_reference"] = ref_seconds
    record["seconds_codec"] = res.seconds
    return record, res.tokens


def run_hf_eval(args) -> dict[str, Any]:
    """The ``hf`` engine of ``kakeya eval``: returns the complete record."""
    return measure_hf(args)[0]


def cmd_eval(args) -> int:
    from ..eval.report import eval_markdown
    from . import ENGINES, resolve

    if args.engine not in ENGINES:
        raise SystemExit(f"unknown engine {args.engine!r}; available: {sorted(ENGINES)}")
    if args.json is None:  # the main job writes outside tracked files: runs/ is ignored by git
        from .args import run_path

        args.json = run_path("eval", args.config, args.engine)
    record = resolve(ENGINES[args.engine])(args)
    emit(record, eval_markdown(record), args.json)
    return 0


# -- diagnostics -------------------------------------------------------------------------------
def _row(name: str, res, seed: int) -> dict[str, Any]:
    s = res.summary(seed=seed)
    keep = ("dppl", "dppl_ci95", "top1", "kl_mean", "kl_p95", "kl_max", "ess", "verdict")
    return {"name": name, **{k: s[k] for k in keep}, "ratio": res.ledger.ratio()}


def cmd_attribution(args) -> int:
    from ..eval.harness import layer_variants, stream_interaction, stream_variants
    from ..eval.report import attribution_markdown

    t0 = time.perf_counter()
    runner, codec, info, policy, text = _runner_and_codec(args)
    lv = layer_variants(codec) if args.by in ("layer", "both") else []
    sv = stream_variants(codec) if args.by in ("stream", "both") else []
    results, _ = runner.run(
        text["passages"], lv + sv, mode=args.mode, progress=not args.no_progress, desc="attribution"
    )
    record = base_record(args, "hf", info, policy, text)
    layer_rows = []
    for variant, res in zip(lv, results[: len(lv)], strict=True):
        row = _row(variant.name, res, args.seed)
        row["layer"] = int(variant.name.split()[1])
        row["ratio"] = res.ledger.ratio(layer=row["layer"])
        layer_rows.append(row)
    layer_rows.sort(key=lambda r: -r["dppl" if args.rank_by == "dppl" else "kl_mean"])
    record["rank_by"] = args.rank_by
    record["layers"] = layer_rows
    if sv:
        sres = results[len(lv) :]
        streams = {v.name: _row(v.name, r, args.seed) for v, r in zip(sv, sres, strict=True)}
        streams.update(stream_interaction(sres, seed=args.seed))
        record["streams"] = streams
    record["eval_tokens"] = sum(len(t) for t in results[0].tokens)
    record["seconds"] = time.perf_counter() - t0
    emit(record, attribution_markdown(record), args.json)
    return 0


def cmd_noise(args) -> int:
    from ..eval.harness import Variant, noise_transform
    from ..eval.report import noise_markdown

    t0 = time.perf_counter()
    runner, codec, info, policy, text = _runner_and_codec(args)
    active = set(codec.active())
    variants = [
        Variant(f"sigma={s:g}", noise_transform(s, seed=args.seed, select=lambda la, st: (la, st) in active))
        for s in args.sigmas
    ]
    results, _ = runner.run(
        text["passages"], variants, mode=args.mode, progress=not args.no_progress, desc="noise"
    )
    record = base_record(args, "hf", info, policy, text)
    record["sweep"] = [
        {"sigma": s, **_row(v.name, r, args.seed)}
        for s, v, r in zip(args.sigmas, variants, results, strict=True)
    ]
    for row in record["sweep"]:
        row.pop("ratio")
    record["noise_pairs"] = sorted([list(p) for p in active])
    record["eval_tokens"] = sum(len(t) for t in results[0].tokens) if results else 0
    record["seconds"] = time.perf_counter() - t0
    emit(record, noise_markdown(record), args.json)
    return 0


def cmd_residual(args) -> int:
    from ..eval.harness import codec_residuals, codec_transform
    from ..eval.report import residual_markdown

    t0 = time.perf_counter()
    runner, codec, info, policy, text = _runner_and_codec(args)
    rows, ledger = codec_residuals(
        runner, text["passages"], codec_transform(codec), progress=not args.no_progress
    )
    record = base_record(args, "hf", info, policy, text)
    record["mode"] = "snapshot"
    record["layers"] = rows
    record["ratio_measured"] = ledger.ratio()
    record["cache"] = ledger.to_dict()
    record["seconds"] = time.perf_counter() - t0
    emit(record, residual_markdown(record), args.json)
    return 0
