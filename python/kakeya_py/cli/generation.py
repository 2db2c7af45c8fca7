"""``kakeya generate-eval``: the command of the generation measurements.

The measurements, the record and the report are :mod:`kakeya_py.generation.quality` (its
module doc is the reference); this module parses the flags, runs the methods over the prompts
and haystacks, merges records of separate runs (``--merge``) and writes the outputs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..generation.quality import (
    BOOTSTRAP_SAMPLES,
    GENERATION_VERDICT_RULE,
    NEEDLE_LABELS,
    CacheSettings,
    GenerationEvalError,
    MethodBatch,
    build_haystacks,
    generation_markdown,
    parse_methods,
    prefill_haystack,
    quanto_available,
    reference_batch,
    run_method_batch,
    run_retrieval,
    summarize_retrieval,
    summarize_rl,
    summarize_trajectory,
    verdicts,
    write_report,
)

DEFAULT_METHODS = "dynamic,kivi-4,int4,turbo-4,kakeya:recommended"
DEFAULT_CONTEXTS = "1024,2048,4096,8192"


# -- the command -------------------------------------------------------------------------------------
def register(sub) -> None:
    p = sub.add_parser(
        "generate-eval",
        help="generation quality with compressed caches: trajectory, free running, retrieval, RL view",
    )
    from ..models import DEFAULT_MODEL

    g = p.add_argument_group("model and text")
    g.add_argument("--model", default=DEFAULT_MODEL, help="smollm2-135m, an HF model id or a local folder")
    g.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16")
    g.add_argument("--text", default="wikitext", help="built-in text: wikitext (default) or code (validation and test parts)")
    g.add_argument(
        "--text-file", default=None, help="use this UTF-8 text instead (every part is the whole file)"
    )
    g.add_argument("--wikitext", default=None, help="path of wiki.test.raw")
    g.add_argument("--part", default="test", help="text part for prompts and haystacks (default test)")
    g = p.add_argument_group("methods")
    g.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"comma list; dynamic is always run first (default {DEFAULT_METHODS}); "
        "kakeya:<preset>, peers (kivi-4, int4, turbo-4, fp8, kvquant-4 ...), quanto",
    )
    g.add_argument(
        "--force-model",
        action="store_true",
        help="apply a kakeya preset made for another model where it fits (warned), instead of an error",
    )
    g.add_argument("--residual-length", type=int, default=64, help="exact recent window R of every cache")
    g.add_argument("--block-tokens", type=int, default=128, help="encode when the window reaches R + B")
    g.add_argument("--peer-sink-tokens", type=int, default=0, help="first positions peers keep exact")
    g = p.add_argument_group("trajectory, free running and RL view")
    g.add_argument("--prompts", type=int, default=32, help="number of prompts (default 32; 0 skips)")
    g.add_argument("--prompt-tokens", type=int, default=512, help="tokens per prompt (default 512)")
    g.add_argument("--gen-tokens", type=int, default=64, help="generated tokens per prompt (default 64)")
    g.add_argument("--batch", type=int, default=8, help="prompts per forward batch (default 8)")
    g = p.add_argument_group("retrieval")
    g.add_argument(
        "--contexts", default=DEFAULT_CONTEXTS, help=f"context lengths (default {DEFAULT_CONTEXTS}; '' skips)"
    )
    g.add_argument(
        "--haystacks",
        default="3",
        help="haystacks per context length: one count, or one per length ('3,3,2,1'; default 3)",
    )
    g.add_argument("--needles", type=int, default=1, help="needles (questions) per haystack (default 1)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed of sampling, haystacks and bootstrap")
    g.add_argument("--threads", type=int, default=None, help="torch and codec threads")
    g.add_argument("--json", default=None, metavar="PATH", help="write the full result here")
    g.add_argument("--out", default=None, metavar="DIR", help="write report.md and plots here")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="measure nothing: combine records of runs of the same model and text (e.g. a trajectory run "
        "and a retrieval run) into one record, report and verdicts",
    )
    p.set_defaults(func=cmd_generate_eval)


def _contexts(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise GenerationEvalError(f"--contexts must be integers, got {text!r}") from None
    if any(c < 16 for c in out):
        raise GenerationEvalError(f"context lengths must be >= 16, got {out}")
    return out


def _haystack_counts(text: str, contexts: Sequence[int]) -> list[int]:
    try:
        counts = [int(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        raise GenerationEvalError(f"--haystacks must be integers, got {text!r}") from None
    if len(counts) == 1:
        counts = counts * len(contexts)
    if len(counts) != len(contexts) or any(c < 0 for c in counts):
        raise GenerationEvalError(
            f"--haystacks needs one count >= 0, or one per context length ({len(contexts)}), got {text!r}"
        )
    return counts


def _load_text(args, tok):
    from ..eval.corpus import load_corpus, tokenize_articles

    corpus = load_corpus(args.text_file, args.wikitext, args.text, args.part)
    arts = corpus.part(args.part)
    return corpus, tokenize_articles(tok, arts)


def cmd_generate_eval(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..models import load_model
    from .harness import kakeya_version, versions

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.merge:
        return merge_records(args)
    if args.prompts < 0:
        raise GenerationEvalError("--prompts must be >= 0")
    if args.gen_tokens < 1 or args.prompt_tokens < 1 or args.batch < 1:
        raise GenerationEvalError("--gen-tokens, --prompt-tokens and --batch must be >= 1")
    methods = parse_methods(args.methods)
    contexts = _contexts(args.contexts)
    counts = _haystack_counts(args.haystacks, contexts)
    settings = CacheSettings(
        args.residual_length,
        args.block_tokens,
        args.peer_sink_tokens,
        threads=args.threads,
        force_model=args.force_model,
    )
    skipped = {}
    if "quanto" in methods and (why := quanto_available()):
        skipped["quanto"] = why
        methods = [m for m in methods if m != "quanto"]
    t0 = time.time()
    model, tok, info = load_model(args.model, args.dtype, progress=not args.no_progress)
    corpus, stream = _load_text(args, tok)
    max_ctx = getattr(model.config, "max_position_embeddings", None)
    if max_ctx and contexts and max(contexts) > max_ctx:
        raise GenerationEvalError(f"context {max(contexts)} exceeds the model's {max_ctx} positions")
    quiet = args.no_progress
    record: dict[str, Any] = {
        "command": shlex.join(getattr(args, "argv", ["kakeya", "generate-eval"])),
        "argv": list(getattr(args, "argv", ["kakeya", "generate-eval"])),
        "version": kakeya_version(),
        "versions": versions(),
        "model": info.to_dict(),
        "dtype": args.dtype,
        "methods": methods,
        "skipped_methods": skipped,
        "settings": {
            "residual_length": settings.residual_length,
            "block_tokens": settings.block_tokens,
            "peer_sink_tokens": settings.peer_sink_tokens,
            "kakeya_decoded_budget_bytes": None,
            "peer_k_position": "post_rope",
            "prompts": args.prompts,
            "prompt_tokens": args.prompt_tokens,
            "gen_tokens": args.gen_tokens,
            "batch": args.batch,
            "contexts": contexts,
            "haystacks_per_context": counts,
            "needles_per_haystack": args.needles,
            "seed": args.seed,
            "threads": args.threads,
            "bootstrap_samples": BOOTSTRAP_SAMPLES,
        },
        "corpus": {"name": corpus.name, "source": corpus.source, "sha256": corpus.sha256, "part": args.part},
        "verdict_rule": GENERATION_VERDICT_RULE,
    }
    trajectory, rl = [], []
    if args.prompts:
        from ..eval.corpus import make_passages

        passages = make_passages(stream, args.prompts, args.prompt_tokens, 1)
        record["text_usage"] = corpus.split().usage(
            args.part, sorted({a["index"] for p in passages for a in p.articles})
        )
        record["prompts_provenance"] = [p.provenance() for p in passages]
        parts: dict[str, list[MethodBatch]] = {m: [] for m in methods}
        ref_nll: list[np.ndarray] = []
        batches = [passages[i : i + args.batch] for i in range(0, len(passages), args.batch)]
        bar = tqdm(total=len(batches) * (len(methods) + 1), desc="trajectory", disable=quiet)
        for bi, chunk in enumerate(batches):
            ids = torch.tensor([list(p.token_ids[: args.prompt_tokens]) for p in chunk])
            bar.set_postfix_str("reference")
            ref = reference_batch(model, ids, args.gen_tokens)
            lp = torch.log_softmax(ref.ref_logits.double(), -1).gather(2, ref.ref_tokens[..., None])[..., 0]
            ref_nll.append((-lp.mean(1)).numpy())
            bar.update()
            for m in methods:
                bar.set_postfix_str(m)
                mb = run_method_batch(model, m, ref, settings, seed=args.seed * 1_000_003 + bi)
                mb.ref_tokens = ref.ref_tokens.numpy()
                parts[m].append(mb)
                bar.update()
        bar.close()
        for m in methods:
            trajectory.append(summarize_trajectory(m, parts[m], ref_nll, seed=args.seed))
            rl.append(summarize_rl(m, parts[m], seed=args.seed))
    record["trajectory"] = trajectory
    record["rl"] = rl
    retrieval_trials = []
    if contexts and any(counts):
        hays = build_haystacks(tok, stream.ids, contexts, counts, args.needles, args.seed)
        record["retrieval_task"] = {
            "needle": "\\nThe special magic {label} number is: {key}.\\n",
            "question": "\\nWhat is the special magic {label} number? The special magic {label} number is:",
            "answer": " {key} (five digits, 10000-99999); correct iff greedy decoding writes the key exactly",
            "labels": list(NEEDLE_LABELS),
            "chance_guess": 1 / 90000,
            "chance_pick_in_context": 1 / args.needles,
            "haystacks": [
                {
                    "context": h.context,
                    "index": h.index,
                    "tokens": len(h.tokens),
                    "offset": h.offset,
                    "needles": [
                        {"label": n.label, "key": n.key, "depth": n.depth, "position": n.position}
                        for n in h.needles
                    ],
                }
                for h in hays
            ],
        }
        bar = tqdm(total=len(hays) * len(methods), desc="retrieval", disable=quiet)
        for h in hays:
            bar.set_postfix_str(f"{h.context} prefill")
            source = prefill_haystack(model, h)
            for m in methods:
                bar.set_postfix_str(f"{h.context} {m}")
                retrieval_trials += run_retrieval(model, m, h, settings, source)
                bar.update()
            del source
        bar.close()
    record["retrieval"] = summarize_retrieval(retrieval_trials, methods, contexts)
    record["retrieval_trials"] = retrieval_trials
    record["verdicts"] = verdicts(record)
    record["seconds"] = time.time() - t0
    _emit(record, args)
    return 0


def merge_records(args) -> int:
    """``--merge``: one record from several runs (their trajectories, RL rows and retrieval trials).

    The runs must share the model, dtype, text part and cache settings; a method may have
    its trajectory in one run only, and a retrieval trial (method, context, haystack,
    needle) may appear once, except for ``dynamic``, which every run measures: its repeats
    must agree (first-divergence positions, correctness of each trial) and the first is kept.
    """
    recs = [json.loads(Path(p).read_text()) for p in args.merge]
    keys = ("residual_length", "block_tokens", "peer_sink_tokens")
    first = recs[0]
    for path, r in zip(args.merge, recs, strict=True):
        for what, a, b in (
            ("model", r["model"]["path"], first["model"]["path"]),
            ("dtype", r["dtype"], first["dtype"]),
            (
                "text",
                (r["corpus"]["sha256"], r["corpus"]["part"]),
                (first["corpus"]["sha256"], first["corpus"]["part"]),
            ),
            ("cache settings", [r["settings"][k] for k in keys], [first["settings"][k] for k in keys]),
        ):
            if a != b:
                raise GenerationEvalError(f"{path}: {what} {a!r} differs from {args.merge[0]}'s {b!r}")
    traj_keys = ("prompts", "prompt_tokens", "gen_tokens")
    with_rows = [(p, r) for p, r in zip(args.merge, recs, strict=True) if r["trajectory"]]
    for path, r in with_rows[1:]:
        a = [r["settings"][k] for k in traj_keys]
        b = [with_rows[0][1]["settings"][k] for k in traj_keys]
        if a != b:
            raise GenerationEvalError(
                f"{path}: trajectory of {dict(zip(traj_keys, a, strict=True))} cannot join "
                f"{with_rows[0][0]}'s {dict(zip(traj_keys, b, strict=True))}"
            )
    methods = list(dict.fromkeys(m for r in recs for m in r["methods"]))
    trajectory, rl, trials, seen = [], [], [], set()
    for path, r in zip(args.merge, recs, strict=True):
        for row, rl_row in zip(r["trajectory"], r["rl"], strict=True):
            prev = next((t for t in trajectory if t["method"] == row["method"]), None)
            if prev is not None:
                _check_repeat(path, row["method"], prev["first_divergence"], row["first_divergence"])
                continue
            trajectory.append(row)
            rl.append(rl_row)
        for t in r.get("retrieval_trials", []):
            key = (t["method"], t["context"], t.get("seed", 0), t["haystack"], t["label"])
            if key in seen:
                prev = next(
                    x
                    for x in trials
                    if (x["method"], x["context"], x.get("seed", 0), x["haystack"], x["label"]) == key
                )
                _check_repeat(path, f"retrieval trial {key}", prev["correct"], t["correct"])
                continue
            seen.add(key)
            trials.append(t)
    order = {m: i for i, m in enumerate(methods)}
    trajectory.sort(key=lambda t: order[t["method"]])
    rl.sort(key=lambda t: order[t["method"]])
    contexts = sorted({t["context"] for t in trials})
    with_traj = next((r for r in recs if r["trajectory"]), first)
    with_ret = next((r for r in recs if r.get("retrieval_trials")), None)
    settings = dict(with_traj["settings"])
    if with_ret is not None:
        for k in ("contexts", "haystacks_per_context", "needles_per_haystack"):
            settings[k] = with_ret["settings"][k]
    record = {
        **{
            k: v
            for k, v in with_traj.items()
            if k not in ("trajectory", "rl", "retrieval", "retrieval_trials")
        },
        "command": shlex.join(getattr(args, "argv", ["kakeya", "generate-eval"])),
        "argv": list(getattr(args, "argv", ["kakeya", "generate-eval"])),
        "merged_from": [
            {"path": p, "command": r["command"], "seconds": r.get("seconds"), "methods": r["methods"]}
            for p, r in zip(args.merge, recs, strict=True)
        ],
        "methods": methods,
        "skipped_methods": {k: v for r in recs for k, v in r.get("skipped_methods", {}).items()},
        "settings": settings,
        "trajectory": trajectory,
        "rl": rl,
        "retrieval": summarize_retrieval(trials, methods, contexts),
        "retrieval_trials": trials,
        "seconds": sum(r.get("seconds") or 0 for r in recs),
    }
    if with_ret is not None:
        task = dict(with_ret["retrieval_task"])
        hays, names = [], set()
        for r in recs:
            seed = r["settings"]["seed"]
            for h in r.get("retrieval_task", {}).get("haystacks", []):
                name = (seed, h["context"], h["index"])
                if name not in names:
                    names.add(name)
                    hays.append({"seed": seed, **h})
        task["haystacks"] = hays
        record["retrieval_task"] = task
        counts = {c: sum(1 for h in hays if h["context"] == c) for c in contexts}
        settings["contexts"], settings["haystacks_per_context"] = contexts, [counts[c] for c in contexts]
    record["verdicts"] = verdicts(record)
    _emit(record, args)
    return 0


def _check_repeat(path, what: str, first, again) -> None:
    """A method measured twice (the reference ``dynamic`` in every run) must give the same result."""
    if not str(what).startswith(("dynamic", "retrieval trial ('dynamic'")):
        raise GenerationEvalError(f"{path}: {what} was measured in two runs (only dynamic may repeat)")
    if first != again:
        raise GenerationEvalError(f"{path}: {what} differs between runs ({first!r} vs {again!r})")


def _emit(record: dict[str, Any], args) -> None:
    print(generation_markdown(record))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    if args.out:
        write_report(record, Path(args.out))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kakeya")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["generate-eval", *(argv or [])])
    args.argv = ["kakeya", "generate-eval", *(argv or [])]
    return args.func(args)
