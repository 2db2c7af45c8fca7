"""``kakeya calibrate``: ``sigma-q``, ``centroids``, ``basis``, ``policy`` and ``all``.

```
kakeya calibrate sigma-q   --model smollm2-135m --out DIR            # DIR/sigma_q.safetensors + .json
kakeya calibrate centroids --model smollm2-135m --bits 2 3 4 --stream k v --out DIR [--sigma-q FILE]
kakeya calibrate basis     --model smollm2-135m --sigma-q FILE --out DIR   # DIR/basis.safetensors + .json
kakeya calibrate policy    --config recommended --centroids DIR [--sigma-q FILE] --out policy.json
kakeya calibrate all       --model smollm2-135m --out calibration/smollm2-135m
```

Calibration reads only the calibration part of the corpus (see :mod:`kakeya_py.calibration.core`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _common(p: argparse.ArgumentParser, *, tokens: int, seq_len: int) -> None:
    from ..models import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help="smollm2-135m, an HF model id or a local folder")
    p.add_argument("--dtype", default="float32", help="model dtype (default float32)")
    p.add_argument(
        "--wikitext", default=None, help="path of wiki.test.raw (default: $KAKEYA_WIKITEXT or ../shared/...)"
    )
    p.add_argument("--tokens", type=int, default=tokens, help=f"calibration tokens to use (default {tokens})")
    p.add_argument(
        "--seq-len", type=int, default=seq_len, help=f"tokens per calibration sequence (default {seq_len})"
    )
    p.add_argument("--threads", type=int, default=None, help="torch and codec threads (default: all cores)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _sigma_args(p: argparse.ArgumentParser) -> None:
    from ..calibration.core import DEFAULT_MAX_COND, DEFAULT_RIDGE

    p.add_argument(
        "--ridge",
        type=float,
        default=DEFAULT_RIDGE,
        help=f"ridge after normalising Σ_q to mean eigenvalue 1 (default {DEFAULT_RIDGE:g})",
    )
    p.add_argument(
        "--max-cond",
        type=float,
        default=DEFAULT_MAX_COND,
        help=f"condition number cap (default {DEFAULT_MAX_COND:g})",
    )


def _rope_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rope-window",
        type=int,
        default=0,
        help="average Σ_q over RoPE rotations of relative distances 0..N-1 (default 0: pre-RoPE Σ_q)",
    )


def _centroid_args(p: argparse.ArgumentParser, *, sigma: bool) -> None:
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4], help="bit widths (default 2 3 4)")
    p.add_argument(
        "--stream", nargs="+", default=["k", "v"], choices=["k", "v"], help="streams (default k v)"
    )
    p.add_argument(
        "--config",
        default="recommended",
        help="policy (preset or JSON) whose per-layer configs fix the transform (default recommended)",
    )
    if sigma:
        p.add_argument(
            "--sigma-q", default=None, help="whiten K by this Σ_q (sigma_q.safetensors or its folder)"
        )
    p.add_argument("--per-layer", action="store_true", help="also fit one table per layer")
    p.add_argument("--held-out", type=int, default=2, help="sequences kept out of the fit (default 2)")
    p.add_argument(
        "--max-samples-per-layer",
        type=int,
        default=400_000,
        help="z samples kept per (layer, stream) (default 400000)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sample thinning (default 0)")


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="offline calibration: Σ_q pre-conditioning and Lloyd–Max centroids")
    csub = p.add_subparsers(dest="calibrate_command", metavar="WHAT")

    q = csub.add_parser("sigma-q", help="query covariance Cholesky factors per (layer, kv-head)")
    _common(q, tokens=16384, seq_len=1024)
    _sigma_args(q)
    _rope_arg(q)
    q.add_argument(
        "--from",
        dest="from_artifact",
        default=None,
        help="derive from this pre-RoPE sigma_q.safetensors (needs --rope-window) instead of capturing queries",
    )
    q.set_defaults(func=cmd_sigma_q)

    c = csub.add_parser(
        "centroids", help="Lloyd–Max tables fitted on the codec's rotated, scaled coefficients"
    )
    _common(c, tokens=12288, seq_len=1024)
    _centroid_args(c, sigma=True)
    c.set_defaults(func=cmd_centroids)

    a = csub.add_parser(
        "all",
        help="one pass: Σ_q (DIR), centroids plain (DIR/centroids) and whitened (DIR/centroids-sigma-q)",
    )
    _common(a, tokens=12288, seq_len=1024)
    _sigma_args(a)
    _rope_arg(a)
    _centroid_args(a, sigma=False)
    a.add_argument(
        "--sigma-tokens", type=int, default=32768, help="calibration tokens for Σ_q (default 32768)"
    )
    a.set_defaults(func=cmd_all)

    b = csub.add_parser(
        "basis", help="per-model coefficient bases: K in the Σ_q metric, V in the o_proj metric (model_basis)"
    )
    _common(b, tokens=16384, seq_len=1024)
    b.add_argument(
        "--sigma-q", default=None, help="Σ_q artifact for K's metric (sigma_q.safetensors or folder)"
    )
    b.add_argument(
        "--k-metric", default="sigma_q", choices=["plain", "sigma_q"], help="K metric (default sigma_q)"
    )
    b.add_argument(
        "--v-metric", default="o_proj", choices=["plain", "o_proj"], help="V metric (default o_proj)"
    )
    b.add_argument("--sink-tokens", type=int, default=1, help="leading positions left out (default 1)")
    b.set_defaults(func=cmd_basis)

    o = csub.add_parser("policy", help="write a policy JSON with fitted centroids (and Σ_q for K) applied")
    o.add_argument("--config", default="recommended", help="base policy: preset or JSON file")
    o.add_argument("--centroids", default=None, help="centroid folder (or centroids.json)")
    o.add_argument("--sigma-q", default=None, help="sigma_q.safetensors: K metric becomes inner_product")
    o.add_argument("--bits", type=int, default=None, help="set both streams' bits first")
    o.add_argument("--streams", default=None, choices=["k", "v", "kv"], help="streams the codec may touch")
    o.add_argument("--per-layer", action="store_true", help="use per-layer tables (overrides)")
    o.add_argument("--out", required=True, help="policy JSON to write")
    o.set_defaults(func=cmd_policy)

    def _help(args) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=_help)


# -- shared ----------------------------------------------------------------------------------
def _setup(args):
    import torch

    from ..calibration.core import calibration_text
    from ..eval.corpus import load_wikitext
    from ..models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, info = load_model(args.model, args.dtype, progress=not args.no_progress)
    corpus = load_wikitext(args.wikitext)
    return model, tok, info, corpus, calibration_text


def _command(args) -> str:
    from ..calibration.core import command_line

    return command_line(getattr(args, "argv", None))


def _sigma_q(args, model, tok, info, corpus, text_fn, out: Path, tokens: int) -> Path:
    from ..calibration.core import run_sigma_q, save_sigma_q

    text = text_fn(corpus, tok, tokens=tokens, seq_len=args.seq_len)
    fits, rows = run_sigma_q(
        model, info, text, ridge=args.ridge, max_cond=args.max_cond, progress=not args.no_progress
    )
    path = save_sigma_q(
        out,
        fits,
        rows,
        info=info,
        text=text,
        command=_command(args),
        ridge=args.ridge,
        max_cond=args.max_cond,
    )
    _print_sigma(fits, info, text, path)
    return path


def _print_sigma(fits, info, text, path) -> None:
    conds = [h for fit in fits.values() for h in fit.heads]
    worst = max(conds, key=lambda h: h["cond_before"])
    capped = sum(h["cond_cap_hit"] for h in conds)
    print(
        f"Σ_q: {len(fits)} layers x {info.num_kv_heads} kv-heads from {text.tokens} tokens "
        f"({len(text.usage['articles'])} calibration articles); worst cond before {worst['cond_before']:.3g}, "
        f"cap hit on {capped}/{len(conds)} heads -> {path}"
    )


def _centroids(
    args, model, tok, info, corpus, text_fn, variants: dict, outs: dict, *, text=None, captured=None
):
    from ..calibration.core import run_centroids, save_centroids
    from ..policy import load_policy

    policy = load_policy(args.config)
    if text is None:
        text = text_fn(corpus, tok, tokens=args.tokens, seq_len=args.seq_len)
    results = run_centroids(
        model,
        info,
        text,
        policy,
        streams=args.stream,
        bits=args.bits,
        variants=variants,
        held_out=args.held_out,
        max_samples_per_layer=args.max_samples_per_layer,
        per_layer=args.per_layer,
        seed=args.seed,
        threads=args.threads,
        progress=not args.no_progress,
        captured=captured,
    )
    for name, result in results.items():
        path = save_centroids(
            outs[name],
            result,
            info=info,
            text=text,
            command=_command(args),
            sigma_q=variants[name],
            policy_name=policy.name,
        )
        print(f"\ncentroids ({name}) -> {path}")
        print(
            "| stream | bits | held-out MSE Gaussian | calibrated | ratio | codec rel. err Gaussian | calibrated |"
        )
        print("|---|---|---|---|---|---|---|")
        for e in result["tables"]:
            ce = e["codec_rel_err"]
            print(
                f"| {e['stream']} | {e['bits']} | {e['heldout_mse_gaussian']:.5f} | {e['heldout_mse']:.5f} | "
                f"{e['heldout_mse_ratio']:.3f} | {ce['gaussian']:.5f} | {ce['calibrated']:.5f} |"
            )


# -- commands --------------------------------------------------------------------------------
def cmd_sigma_q(args) -> int:
    if args.from_artifact:
        return _derive_rope(args)
    model, tok, info, corpus, text_fn = _setup(args)
    _sigma_q(args, model, tok, info, corpus, text_fn, Path(args.out), args.tokens)
    return 0


def _derive_rope(args) -> int:
    from ..calibration.core import (
        CalibrationText,
        derive_rope_averaged,
        load_sigma_q_artifact,
        model_inv_freq,
        save_sigma_q,
    )
    from ..models import load_model

    if not args.rope_window:
        raise SystemExit("--from needs --rope-window N")
    model, _, info = load_model(args.model, args.dtype, progress=not args.no_progress)
    src = load_sigma_q_artifact(args.from_artifact, info)
    fits, rows = derive_rope_averaged(
        src, model_inv_freq(model), args.rope_window, ridge=args.ridge, max_cond=args.max_cond
    )
    rec = src.record
    text = CalibrationText([], rec["text"], rec["tokens"], rec["seq_len"])
    path = save_sigma_q(
        Path(args.out),
        fits,
        rows,
        info=info,
        text=text,
        command=_command(args),
        ridge=args.ridge,
        max_cond=args.max_cond,
        rope_window=args.rope_window,
        derived_from={
            "file": str(src.path),
            "sha256": rec.get("safetensors_sha256"),
            "command": rec["command"],
        },
    )
    _print_sigma(fits, info, text, path)
    return 0


def cmd_centroids(args) -> int:
    from ..calibration.core import load_sigma_q_artifact

    model, tok, info, corpus, text_fn = _setup(args)
    sigma = None if args.sigma_q is None else load_sigma_q_artifact(args.sigma_q, info)
    name = "plain" if sigma is None else "sigma_q"
    _centroids(args, model, tok, info, corpus, text_fn, {name: sigma}, {name: Path(args.out)})
    return 0


def cmd_all(args) -> int:
    """One pass over the calibration sequences captures queries, K and V together."""
    from ..calibration.core import (
        QueryGramCollector,
        collect_kv,
        fit_collected,
        load_sigma_q_artifact,
        save_sigma_q,
    )

    out = Path(args.out)
    model, tok, info, corpus, text_fn = _setup(args)
    text = text_fn(corpus, tok, tokens=args.tokens, seq_len=args.seq_len)
    from tqdm.auto import tqdm

    with QueryGramCollector(model) as qc:
        it = collect_kv(model, text.sequences, range(info.num_layers), args.stream)
        captured = list(tqdm(it, total=len(text.sequences), desc="queries, K, V", disable=args.no_progress))
    fits, rows = fit_collected(qc, ridge=args.ridge, max_cond=args.max_cond)
    path = save_sigma_q(
        out,
        fits,
        rows,
        info=info,
        text=text,
        command=_command(args),
        ridge=args.ridge,
        max_cond=args.max_cond,
    )
    _print_sigma(fits, info, text, path)
    sigma = load_sigma_q_artifact(path, info)
    variants = {"plain": None, "sigma_q": sigma}
    outs = {"plain": out / "centroids", "sigma_q": out / "centroids-sigma-q"}
    _centroids(args, model, tok, info, corpus, text_fn, variants, outs, text=text, captured=captured)
    return 0


def cmd_basis(args) -> int:
    from ..calibration.core import load_sigma_q_artifact
    from ..calibration.model_basis import fit_basis, save_basis

    model, tok, info, corpus, text_fn = _setup(args)
    sigma = None if args.sigma_q is None else load_sigma_q_artifact(args.sigma_q, info)
    text = text_fn(corpus, tok, tokens=args.tokens, seq_len=args.seq_len)
    metrics = {"k": args.k_metric, "v": args.v_metric}
    fits = fit_basis(
        model,
        info,
        text.sequences,
        metrics=metrics,
        sigma_q=sigma,
        sink_tokens=args.sink_tokens,
        progress=not args.no_progress,
    )
    extra = {"tokens": text.tokens, "seq_len": text.seq_len, "sink_tokens": args.sink_tokens}
    if sigma is not None:
        extra["sigma_q"] = {"file": str(sigma.path), "sha256": sigma.record.get("safetensors_sha256")}
    from ..calibration.core import _model_dict

    path = save_basis(
        args.out,
        fits,
        model=_model_dict(info),
        text=text.usage,
        metrics=metrics,
        command=_command(args),
        extra=extra,
    )
    from ..calibration.model_basis import load_basis

    basis = load_basis(path)
    print(
        f"basis: {info.num_layers} layers x {len(metrics)} streams x {info.num_kv_heads} kv-heads from "
        f"{text.tokens} calibration tokens -> {path} ({basis.nbytes / 1e6:.2f} MB, sha256 {basis.sha256[:16]}…)"
    )
    return 0


def cmd_policy(args) -> int:
    from ..calibration.core import calibrated_policy, load_centroids
    from ..policy import load_policy

    policy = load_policy(args.config)
    if args.streams is not None:
        policy = policy.with_changes(streams=args.streams)
    if args.bits is not None:
        d = policy.to_dict()
        for s in ("k", "v"):
            if d[s] is not None:
                d[s]["bits"] = args.bits
        from ..policy import Policy

        policy = Policy.from_dict(d)
    cents = None if args.centroids is None else load_centroids(args.centroids)
    d = calibrated_policy(policy, centroids=cents, sigma_q=args.sigma_q, per_layer=args.per_layer)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(d, indent=1) + "\n")
    sys.stdout.write(f"policy written to {out}\n")
    return 0
