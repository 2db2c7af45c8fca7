"""``kakeya tune``: search per-(layer, stream) codec settings for the highest measured ratio
within a Δppl budget, and write the winner as a policy (and optionally a preset).

The search space is :mod:`kakeya_py.tuning.ladder`, the algorithm
:mod:`kakeya_py.tuning.search` (its module doc is the reference), the report
:mod:`kakeya_py.tuning.report`; this module is the command.

Outputs (``--out DIR``): ``policy.json`` (complete policy; ``kakeya eval --config
DIR/policy.json``; the description records the budget and the command), ``tune.json``
(settings, passages, sensitivity, every round's candidates with their measurements,
final and validation results, the path and the selection), ``tune.md`` (summary and
command), ``tune_path.png`` (Δppl, top-1 and KL along the path on both passage sets). ``--save-preset NAME``
also writes ``kakeya_py/presets/NAME.json``, which ``load_policy(NAME)`` resolves.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from pathlib import Path
from typing import Any

from .. import policy as _policy
from ..eval.hooks import STREAMS, parse_layers
from ..policy import PolicyCodec, load_policy
from ..tuning.ladder import DEFAULT_CACHE_BYTES, Ladder, LadderCodec, artifact_ref, reusing_runner
from ..tuning.report import plot_path, tune_markdown
from ..tuning.search import (
    COSTS,
    TuneSettings,
    _rungs,
    basis_provenance,
    greedy_path,
    measure,
    replay,
    save_preset,
    search,
    select_on_validation,
    split_passages,
    state_policy,
)

DEFAULT_OUT = "reports/tune"
#: Step 1 of a search, written as soon as it is measured (`--reuse-sensitivity` takes it).
SENSITIVITY_FILE = "sensitivity.json"


# -- command -----------------------------------------------------------------------------------
def register(sub) -> None:
    from ..models import DEFAULT_MODEL
    from .harness import DEFAULT_DTYPE

    p = sub.add_parser(
        "tune", help="search per-layer codec settings for the highest measured ratio within a Δppl budget"
    )
    g = p.add_argument_group("model and text")
    g.add_argument("--model", default=DEFAULT_MODEL, help="smollm2-135m, an HF model id or a local folder")
    g.add_argument("--dtype", default=DEFAULT_DTYPE, help="float32 (default), bfloat16, float16")
    g.add_argument("--text-file", default=None, help="UTF-8 text instead of WikiText-2")
    g.add_argument("--wikitext", default=None, help="path of wiki.test.raw")
    g.add_argument(
        "--passages", type=int, default=16, help="search passages, from the calibration part (default 16)"
    )
    g.add_argument(
        "--val-passages",
        type=int,
        default=16,
        help="selection passages, from the validation part (default 16; selections use >= 16)",
    )
    g.add_argument("--ctx", type=int, default=512, help="context tokens per passage (default 512)")
    g.add_argument("--n-eval", type=int, default=128, help="evaluated positions per passage (default 128)")
    g.add_argument(
        "--val-n-eval",
        type=int,
        default=None,
        help="evaluated positions per validation passage (default --n-eval)",
    )
    g = p.add_argument_group("search")
    g.add_argument("--budget-dppl", type=float, default=0.01, help="|Δppl| budget (default 0.01 = 1%%)")
    g.add_argument("--min-top1", type=float, default=0.95, help="top-1 floor (default 0.95)")
    g.add_argument(
        "--budget-kl",
        type=float,
        default=None,
        help="also bound the mean KL(ref||codec): steadier than the Δppl of a few thousand tokens",
    )
    g.add_argument(
        "--one-sided",
        action="store_true",
        help="budget on Δppl only from above (a lower perplexity does not count; default: |Δppl|)",
    )
    g.add_argument("--ladder", default=None, help="ladder JSON (default: exact -> 4 -> 3 -> 2 bits)")
    g.add_argument("--cost", default="budget", choices=COSTS, help="cost of a step (module doc)")
    g.add_argument("--check-every", type=int, default=8, help="steps per re-measurement (default 8)")
    g.add_argument("--max-rounds", type=int, default=50, help="re-measurement rounds at most (default 50)")
    g.add_argument("--patience", type=int, default=3, help="stop after this many rounds keeping nothing")
    g.add_argument("--layers", default=None, help="layers the search may touch (default all; others exact)")
    g.add_argument(
        "--reuse-sensitivity",
        default=None,
        metavar="TUNE_JSON",
        help="take step 1 from an earlier tune.json (same model, passages, ladder, layers; checked)",
    )
    g.add_argument(
        "--reuse-search",
        default=None,
        metavar="TUNE_JSON",
        help="take steps 1 and 2 from an earlier tune.json (also the same settings; checked) and redo "
        "only the selection and the final measurements",
    )
    g.add_argument(
        "--select",
        default="validation",
        choices=["validation", "greedy"],
        help="which state of the greedy path is written: the most compressed one that also passes on "
        "the validation passages (default), or the end of the path",
    )
    g.add_argument("--streams", default="kv", choices=["k", "v", "kv"], help="streams the search may touch")
    g.add_argument("--post-rope-k", action="store_true", help="compress K after RoPE (comparison only)")
    g.add_argument("--sigma-q", default=None, help="sigma_q.safetensors for rungs with metric=inner_product")
    g.add_argument(
        "--basis",
        default=None,
        help="model basis (basis.safetensors, `kakeya calibrate basis`) for rungs with 'transform' "
        "(default: the ladder's 'basis')",
    )
    g.add_argument(
        "--sink-tokens",
        type=int,
        default=0,
        help="leading positions of each sequence kept exact in every variant and in the policy",
    )
    g.add_argument(
        "--compare",
        default="recommended",
        help="comma list of policies measured next to the winner on the validation passages ('' = none)",
    )
    g = p.add_argument_group("output")
    g.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    g.add_argument("--name", default=None, help="policy name (default: tuned-dppl<budget>)")
    g.add_argument("--save-preset", default=None, metavar="NAME", help="also save as preset NAME")
    g.add_argument("--seed", type=int, default=0, help="passage choice and bootstrap seed")
    g.add_argument("--threads", type=int, default=None, help="torch and codec threads")
    g.add_argument(
        "--cache-gib",
        type=float,
        default=DEFAULT_CACHE_BYTES / (1 << 30),
        help="memory for reused round trips, GiB (default %(default)g; least recently used go first)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_tune)


def _usage(split, part: str, passages) -> dict[str, Any]:
    return split.usage(part, sorted({a["index"] for p in passages for a in p.articles}))


def tune_passages(corpus, tok, args):
    """``(search, validation, usage)``: search passages from the calibration part and validation
    passages from the validation part (a single ``--text-file`` is every part: disjoint windows
    of it, as :func:`split_passages` draws them)."""
    from ..eval.corpus import tokenize_articles

    split = corpus.split()
    if corpus.layout == "single":
        stream = tokenize_articles(tok, corpus.part("calibration"))
        search_p, val_p = split_passages(
            stream, args.passages, args.val_passages, args.ctx, args.n_eval, args.seed, args.val_n_eval
        )
    else:
        search_p, _ = split_passages(
            tokenize_articles(tok, corpus.part("calibration")),
            args.passages,
            0,
            args.ctx,
            args.n_eval,
            args.seed,
        )
        val_p = []
        if args.val_passages:
            val_n = args.val_n_eval or args.n_eval
            val_p, _ = split_passages(
                tokenize_articles(tok, corpus.part("validation")),
                args.val_passages,
                0,
                args.ctx,
                val_n,
                args.seed,
            )
    usage = {
        "search": _usage(split, "calibration", search_p),
        "validation": _usage(split, "validation", val_p),
    }
    return search_p, val_p, usage


def cmd_tune(args) -> int:
    import sys

    from ..calibration.model_basis import load_basis
    from ..eval.corpus import check_disjoint, load_corpus
    from ..eval.harness import Variant, codec_transform
    from ..policy import load_sigma_q
    from .harness import _finite, emit, kakeya_version, load_hf, policy_codec, set_threads, versions

    t0 = time.perf_counter()
    settings = TuneSettings(
        budget_dppl=args.budget_dppl,
        min_top1=args.min_top1,
        cost=args.cost,
        check_every=args.check_every,
        max_rounds=args.max_rounds,
        patience=args.patience,
        seed=args.seed,
        two_sided=not args.one_sided,
        budget_kl=args.budget_kl,
    )
    ladder = Ladder.load(args.ladder)
    if ladder.peer is not None:
        given = [f for f in ("sigma_q", "basis", "save_preset") if getattr(args, f, None)]
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise SystemExit(
                f"{flags}: not for a peer ladder ({ladder.peer}); its policy is evaluated with "
                "`kakeya eval --config OUT/policy.json`"
            )
    if getattr(args, "basis", None):
        ladder.basis = str(Path(args.basis).expanduser().resolve())
    compare = [c for c in (args.compare or "").split(",") if c]
    compare_policies = [load_policy(c) for c in compare]
    command = shlex.join(getattr(args, "argv", ["kakeya", "tune"]))
    progress = not args.no_progress

    set_threads(args)
    model, tok, info = load_hf(args)
    corpus = load_corpus(args.text_file, args.wikitext)
    split = corpus.split()
    search_p, val_p, usage = tune_passages(corpus, tok, args)
    sigma = None
    if args.sigma_q:
        sigma = load_sigma_q(
            args.sigma_q, num_layers=info.num_layers, num_kv_heads=info.num_kv_heads, head_dim=info.head_dim
        )
        if sigma.text is None:
            raise SystemExit(f"{sigma.path}: no calibration text recorded; cannot prove it is disjoint")
        check_disjoint(sigma.text, usage["validation"])  # fits may share the search's calibration text
    basis = None
    if ladder.transforms():
        if ladder.basis is None:
            raise SystemExit(
                "the ladder has rungs with 'transform': give the model basis (--basis or its 'basis')"
            )
        basis = load_basis(ladder.basis, num_kv_heads=info.num_kv_heads, head_dim=info.head_dim)
        if not basis.record.get("text"):
            raise SystemExit(f"{basis.path}: no calibration text recorded; cannot prove it is disjoint")
        check_disjoint(basis.record["text"], usage["validation"])
    k_position = "post_rope" if args.post_rope_k else "pre_rope"
    runner = reusing_runner(model, k_position=k_position)
    codec = LadderCodec(
        ladder,
        sigma_q=sigma,
        basis=basis,
        threads=args.threads,
        sink_tokens=args.sink_tokens,
        max_cache_bytes=int(args.cache_gib * (1 << 30)),
    )
    layers = parse_layers(args.layers, info.num_layers) if args.layers else None
    streams = tuple(STREAMS if args.streams == "kv" else (args.streams,))

    def log(msg: str) -> None:
        sys.stderr.write(f"[tune] {msg}\n")
        sys.stderr.flush()

    out = Path(args.out)
    # fields of tune.json that the step-1 file (--reuse-sensitivity) repeats
    identity = {
        "command": command,
        "model": info.to_dict(),
        "dtype": args.dtype,
        "settings": dataclasses.asdict(settings),
        "ladder": ladder.to_dict(),
    }
    identity_passages = [p.provenance() for p in search_p]
    previous = None
    reused = args.reuse_search or args.reuse_sensitivity
    if args.reuse_search and args.reuse_sensitivity:
        raise SystemExit("--reuse-search already reuses the sensitivity; give one of the two")
    if reused:
        previous = json.loads(Path(reused).read_text())
        same = {
            "model": previous["model"]["path"] == info.path and previous["dtype"] == args.dtype,
            "passages": previous["passages_provenance"]["search"]
            == json.loads(json.dumps(identity_passages)),
            "ladder": previous["ladder"] == json.loads(json.dumps(identity["ladder"])),
            "k_position": previous["policy"]["k_position"] == k_position,
            "sink_tokens": previous["policy"].get("sink_tokens", 0) == args.sink_tokens,
            "seed": previous["settings"]["seed"] == args.seed,
        }
        if args.reuse_search:
            same["settings"] = TuneSettings.from_record(previous["settings"]) == settings
            same["layers"] = previous["layers"] == (None if layers is None else list(layers))
            same["streams"] = previous["streams"] == list(streams)
        if not all(same.values()):
            flag = "--reuse-search" if args.reuse_search else "--reuse-sensitivity"
            raise SystemExit(f"{flag} {reused}: differs in {[k for k, v in same.items() if not v]}")
    if args.reuse_search:
        result = replay(previous)
        log(f"search taken from {args.reuse_search}: {len(result.rounds)} rounds")
    else:

        def checkpoint(base_row, sensitivity) -> None:
            """What ``--reuse-sensitivity`` needs, written as soon as step 1 ends."""
            record = {
                **identity,
                "policy": {"k_position": k_position, "sink_tokens": args.sink_tokens},
                "passages_provenance": {"search": identity_passages},
                "base": base_row,
                "sensitivity": sensitivity,
            }
            out.mkdir(parents=True, exist_ok=True)
            (out / SENSITIVITY_FILE).write_text(json.dumps(_finite(record), indent=1, allow_nan=False) + "\n")
            log(f"step 1 written to {out / SENSITIVITY_FILE} (resume with --reuse-sensitivity)")

        result = search(
            runner,
            search_p,
            ladder,
            codec,
            settings,
            layers=layers,
            streams=streams,
            progress=progress,
            log=log,
            previous=previous,
            on_sensitivity=checkpoint,
        )

    # 4. selection along the greedy path (before the final measurements, which then describe
    # exactly the written policy)
    path = greedy_path(result)
    chosen = len(path) - 1
    select = args.select if val_p else "greedy"
    if select == "validation":
        codec.clear()
        runner.forget()
        chosen = select_on_validation(runner, val_p, codec, path, settings, progress=progress)
        log(f"selected on validation: state {chosen} of {len(path) - 1} (round {path[chosen]['round']})")
    state = path[chosen]["state"]

    name = args.name or args.save_preset or f"tuned-dppl{args.budget_dppl:g}"
    description = (
        f"kakeya tune: per-(layer, stream) ladder search"
        f"{'' if ladder.peer is None else f' over peer family {ladder.peer}'} on {info.name}, |dppl| budget "
        f"{args.budget_dppl:g}{'' if args.budget_kl is None else f', KL budget {args.budget_kl:g}'}, "
        f"top-1 >= {args.min_top1:g}, {args.passages} search passages x (ctx "
        f"{args.ctx} + {args.n_eval}), seed {args.seed}, {args.sink_tokens} sink tokens exact, "
        f"selected: {select}; command: {command}"
    )
    policy = state_policy(
        state,
        ladder,
        info.num_layers,
        name=name,
        description=description,
        sigma_q=args.sigma_q,
        k_position=k_position,
        sink_tokens=args.sink_tokens,
    )
    policy.model = _policy.model_record(info)  # its per-layer steps fit this model only
    policy.provenance = [{"role": "fit", **usage["search"]}, {"role": "selection", **usage["validation"]}]
    if basis is not None:  # the text the basis was fitted on, as calibrated_policy records Σ_q's
        policy.provenance.append(basis_provenance(basis))

    # 3. the written policy, through PolicyCodec (a peer policy: its own codec), on the search and
    # the held-out passages
    codec.clear()
    winner_codec = policy_codec(policy, info.num_layers, sigma_q=sigma, threads=args.threads)
    winner = Variant(name, codec_transform(winner_codec))
    val_variants = [winner]
    for c, pol in zip(compare, compare_policies, strict=True):
        s_c = sigma if pol.sigma_q is None else None
        if pol.sigma_q is not None:
            s_c = load_sigma_q(
                pol.sigma_q,
                num_layers=info.num_layers,
                num_kv_heads=info.num_kv_heads,
                head_dim=info.head_dim,
            )
        pc = PolicyCodec(pol, info.num_layers, sigma_q=s_c, threads=args.threads)
        val_variants.append(Variant(c, codec_transform(pc), k_position=pol.k_position))

    def final(passages, variants, desc: str) -> list[dict[str, Any]]:
        rows, _ = measure(runner, passages, variants, seed=args.seed, progress=progress, desc=desc)
        runner.forget()
        return rows

    # the runner still holds the prefills of the passages it measured last (validation after
    # a selection, search otherwise): measure those first so that none is computed twice
    vrows: list[dict[str, Any]] = []
    if select == "validation":
        vrows = final(val_p, val_variants, "validation")
    (search_row,) = final(search_p, [winner], "final (search passages)")
    if select != "validation" and val_p:
        vrows = final(val_p, val_variants, "validation")
    validation = [{"policy": v.name, **r} for v, r in zip(val_variants, vrows, strict=True)] if vrows else []
    written = policy  # a peer policy names no artifact
    if ladder.peer is None:
        written = dataclasses.replace(policy, basis=artifact_ref(policy.basis))  # portable path in the files

    record = {
        **identity,
        "argv": list(getattr(args, "argv", ["kakeya", "tune"])),
        "version": kakeya_version(),
        "versions": versions(),
        "mode": "snapshot",
        "ctx": args.ctx,
        "n_eval": args.n_eval,
        "val_n_eval": args.val_n_eval or args.n_eval,
        "layers": None if layers is None else list(layers),
        "streams": list(streams),
        "corpus": {
            "name": corpus.name,
            "source": corpus.source,
            "sha256": corpus.sha256,
            "split": split.to_dict(),
        },
        "text_usage": usage,
        "passages_provenance": {
            "search": identity_passages,
            "validation": [p.provenance() for p in val_p],
        },
        "base": result.base,
        "sensitivity": result.sensitivity,
        "sensitivity_from": args.reuse_sensitivity,
        "rounds": result.rounds,
        "stop_reason": result.stop_reason,
        "rungs": result.rungs(),  # the end of the greedy path
        "search_from": args.reuse_search,
        "path": [{k: v for k, v in e.items() if k != "state"} for e in path],
        "selected": {"by": select, "index": chosen, "round": path[chosen]["round"], "rungs": _rungs(state)},
        "policy": written.to_dict(),
        "search_result": search_row,
        "validation": validation,
        "encodes": result.encodes,
        "seconds_search": result.seconds,
        "seconds": time.perf_counter() - t0,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "policy.json").write_text(json.dumps(written.to_dict(), indent=2) + "\n")
    (out / "tune.json").write_text(json.dumps(_finite(record), indent=2, allow_nan=False) + "\n")
    md = tune_markdown(record)
    (out / "tune.md").write_text(md)
    if select == "validation":
        plot_path(record, out / "tune_path.png")
    if args.save_preset:
        path = save_preset(written, args.save_preset)
        md += f"\nPreset written to {path} (`--config {args.save_preset}`)\n"
    emit(record, md + f"\nWritten: {out / 'policy.json'}, {out / 'tune.json'}, {out / 'tune.md'}\n", None)
    return 0
