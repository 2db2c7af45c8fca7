"""Generation with a compressed KV cache: cache bytes, peak memory, speed, greedy agreement.

SmolLM2-135M (``kakeya_py.models``) in ``--dtype`` (default bfloat16, so ``DynamicCache``
holds bf16 K/V: the baseline's bytes are bf16 bytes, rows say ``baseline_dtype``), a prompt
of each of ``--prompt-tokens`` lengths (comma-separated) from the test part of WikiText-2
(``kakeya_py.eval.corpus``), ``--max-new-tokens`` greedy tokens, for each cache in ``--caches``:

- ``dynamic``: transformers' ``DynamicCache`` (the uncompressed reference);
- ``quanto``: transformers' ``QuantizedCache`` (backend optimum-quanto, 4-bit, residual 128),
  or a row saying why it could not run (backend not installable/importable);
- ``kakeya:<preset>``: :class:`kakeya_py.generation.cache.KakeyaCache` with a policy preset
  (``recommended``, ``identity``, or defined here: ``k4v4`` K and V 4-bit, ``k3v2`` K 3-bit,
  V 2-bit, both with the first and last layer exact); ``kakeya:<preset>@decode`` runs it with
  ``attention="decode"`` (every chunk decoded every step, the pre-kernel path), otherwise
  decode steps of supported layers run attention on the codes (``attention="kernel"``).

``decode_tokens_per_s`` times the generated tokens after the first (the prefill is
``prefill_s``); ``identical_to_dynamic`` says whether the greedy tokens equal DynamicCache's.
With ``--plot PATH`` a figure of decode tokens/s and cache bytes against the prompt length
is written (matplotlib).

Each cache runs in a fresh subprocess so that peak RSS (``ru_maxrss``) belongs to that
run alone. ``greedy_agreement`` is the share of generated positions whose token equals
the ``dynamic`` run's token at the same position (no teacher forcing: after a first
divergence the texts differ); ``first_divergence`` is the first such position.

Example:
    python benchmarks/generate_memory.py --prompt-tokens 2048 --max-new-tokens 128 --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time

EXTRA_POLICIES = {
    "k4v4": {
        "description": "K 4-bit, V 4-bit on every layer but the first and last, shared basis per chunk, outliers > 3 sigma",
        "k": {"bits": 4, "block_size": 4096, "share_basis": True, "outlier_threshold": 3.0},
        "v": {"bits": 4, "block_size": 4096, "share_basis": True, "outlier_threshold": 3.0},
        "exact_layers": [0, -1],
    },
    "k3v2": {
        "description": "K 3-bit, V 2-bit, shared basis per chunk, outliers > 3 sigma, first and last layer exact",
        "k": {"bits": 3, "block_size": 4096, "share_basis": True, "outlier_threshold": 3.0},
        "v": {"bits": 2, "block_size": 4096, "share_basis": True, "outlier_threshold": 3.0},
        "exact_layers": [0, -1],
    },
}

DEFAULT_CACHES = "dynamic,kakeya:recommended-log8,kakeya:recommended,kakeya:identity"


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _tensor_bytes(obj, seen=None) -> int:
    """Bytes of every tensor reachable from ``obj`` (quanto tensors through their inner data)."""
    import torch

    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
            names, _ = obj.__tensor_flatten__()
            return sum(_tensor_bytes(getattr(obj, n), seen) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(o, seen) for o in obj.values())
    return 0


def _prompt(tok, n: int, wikitext: str | None) -> list[int]:
    from kakeya_py.eval.corpus import load_wikitext, part_passages

    corpus = load_wikitext(wikitext)
    passage = part_passages(corpus, tok, "test", 1, ctx=n, n_eval=1)[0]
    return list(passage.token_ids[:n])


def _make_cache(name: str, model, args):
    """``(cache, nbytes_fn)`` for a cache name."""
    from transformers import DynamicCache

    if name == "dynamic":
        cache = DynamicCache(config=model.config)
        return cache, lambda: sum(_tensor_bytes([layer.keys, layer.values]) for layer in cache.layers)
    if name == "quanto":
        from transformers import QuantizedCache

        cache = QuantizedCache("quanto", model.config, nbits=4, q_group_size=64, residual_length=128)

        def quanto_bytes():
            total = 0
            for layer in cache.layers:
                total += _tensor_bytes([layer.keys, layer.values])
                total += _tensor_bytes([layer._quantized_keys, layer._quantized_values])
            return total

        return cache, quanto_bytes
    if name.startswith("kakeya:"):
        from kakeya_py.generation.cache import KakeyaCache
        from kakeya_py.policy import Policy

        preset, _, mode = name.split(":", 1)[1].partition("@")
        policy = Policy.from_dict(EXTRA_POLICIES[preset], name=preset) if preset in EXTRA_POLICIES else preset
        cache = KakeyaCache(
            policy,
            model,
            residual_length=args.residual_length,
            block_tokens=args.block_tokens,
            decoded_budget_bytes=args.decoded_budget_bytes,
            threads=args.threads,
            attention=mode or "kernel",
        )
        return cache, lambda: cache.nbytes()["total_bytes"]
    raise ValueError(f"unknown cache {name!r}")


def worker(args) -> dict:
    """One cache, in this process: returns a result row (with the generated tokens)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    torch.set_num_threads(args.threads)
    from kakeya_py.models import load_model

    model, tok, info = load_model(args.model, dtype=args.dtype, progress=False)
    ids = torch.tensor([_prompt(tok, int(args.prompt_tokens), args.wikitext)])
    row: dict = {"cache": args.worker, "prompt_tokens": ids.shape[1], "new_tokens": args.max_new_tokens}
    try:
        cache, nbytes = _make_cache(args.worker, model, args)
    except Exception as exc:  # the quantized backend is optional: report, do not skip silently
        row.update(error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
        return row

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    rss_before = _rss_now()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.max_new_tokens,
            do_sample=False,
            past_key_values=cache,
            logits_processor=LogitsProcessorList([Stamp()]),
            pad_token_id=tok.eos_token_id,
        )
    t1 = time.perf_counter()
    new = out[0, ids.shape[1] :].tolist()
    row.update(
        cache_bytes=int(nbytes()),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        rss_before_generate_bytes=rss_before,
        tokens_per_s=len(new) / (t1 - t0),
        prefill_s=stamps[0] - t0,
        decode_tokens_per_s=(len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None,
        tokens=new,
    )
    if args.worker.startswith("kakeya:"):
        nb = cache.nbytes()
        row["kakeya"] = {k: v for k, v in nb.items() if k != "per_layer"}
        row["dynamic_equivalent_bytes"] = nb["dynamic_cache_bytes"]
        cache.close()
    row["model"] = info.name
    row["baseline_dtype"] = args.dtype
    return row


def _run_worker(name: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name]
    for key in ("model", "prompt_tokens", "max_new_tokens", "threads", "residual_length", "block_tokens", "dtype"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.decoded_budget_bytes is not None:
        cmd += ["--decoded-budget-bytes", str(args.decoded_budget_bytes)]
    else:
        cmd += ["--decoded-budget-bytes", "all"]
    if args.wikitext:
        cmd += ["--wikitext", args.wikitext]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"cache": name, "error": f"worker failed (rc {proc.returncode}): {tail[0][:300]}"}
    return json.loads(lines[-1])


def _quanto_installable() -> str | None:
    try:
        import optimum.quanto  # noqa: F401
    except Exception as exc:
        return f"not installable here (optimum-quanto import failed: {type(exc).__name__}: {exc})"
    return None


def _compare(rows: list[dict]) -> None:
    """Agreement, bytes and speed of each row against the first (DynamicCache) row."""
    ref = rows[0].get("tokens")
    dyn_bytes = rows[0].get("cache_bytes")
    for row in rows:
        toks = row.pop("tokens", None)
        if toks is not None and ref is not None:
            same = [a == b for a, b in zip(toks, ref, strict=False)]
            row["greedy_agreement"] = sum(same) / len(ref)
            row["first_divergence"] = same.index(False) if False in same else None
            row["identical_to_dynamic"] = toks == ref
        else:
            row.setdefault("greedy_agreement", None)
        if row.get("cache_bytes") and dyn_bytes:
            row["bytes_vs_dynamic"] = row["cache_bytes"] / dyn_bytes
        if row.get("tokens_per_s") and rows[0].get("tokens_per_s"):
            row["speed_vs_dynamic"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
        if row.get("decode_tokens_per_s") and rows[0].get("decode_tokens_per_s"):
            row["decode_speed_vs_dynamic"] = row["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"]


def _plot(rows: list[dict], path: str, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["cache"] for r in rows):
        pts = sorted(
            (r["prompt_tokens"], r["decode_tokens_per_s"], r["cache_bytes"])
            for r in rows
            if r["cache"] == name and r.get("decode_tokens_per_s")
        )
        if not pts:
            continue
        x = [p[0] for p in pts]
        a.plot(x, [p[1] for p in pts], "o-", label=name)
        b.plot(x, [p[2] / 2**20 for p in pts], "o-", label=name)
    a.set(xlabel="prompt tokens", ylabel="decode tokens/s", title="decode speed", xscale="log")
    b.set(xlabel="prompt tokens", ylabel="cache MiB (as stored)", title="cache bytes", xscale="log", yscale="log")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(command, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _budget(text: str) -> int | None:
    return None if text == "all" else int(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt-tokens", default="1024,4096,8192", help="comma-separated prompt lengths")
    ap.add_argument("--dtype", default="bfloat16", help="model dtype (the DynamicCache baseline's K/V dtype)")
    ap.add_argument("--plot", default=None, help="write a figure of decode tokens/s and bytes vs prompt length")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--caches", default=DEFAULT_CACHES, help=f"comma-separated (default {DEFAULT_CACHES})")
    ap.add_argument("--residual-length", type=int, default=64, help="KakeyaCache exact window R")
    ap.add_argument("--block-tokens", type=int, default=128, help="KakeyaCache chunk size B")
    ap.add_argument(
        "--decoded-budget-bytes",
        type=_budget,
        default=0,
        help="KakeyaCache decoded-chunk budget ('all' = keep all)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch and codec threads (default 1: on a shared 2-core host, 2 OpenMP threads were 6x slower)",
    )
    ap.add_argument("--wikitext", default=None)
    ap.add_argument("--json", action="store_true", help="print one JSON row per cache")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    names = [n.strip() for n in args.caches.split(",") if n.strip()]
    if "dynamic" in names:
        names.remove("dynamic")
    names.insert(0, "dynamic")  # the reference runs first
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    print(f"# command: {command}", file=sys.stderr, flush=True)
    all_rows = []
    for length in [int(x) for x in str(args.prompt_tokens).split(",")]:
        one = argparse.Namespace(**{**vars(args), "prompt_tokens": length})
        rows = []
        for name in names:
            if name == "quanto" and (why := _quanto_installable()):
                rows.append({"cache": name, "prompt_tokens": length, "error": why})
                continue
            rows.append(_run_worker(name, one))
            print(f"# done {name} at {length}", file=sys.stderr, flush=True)
        _compare(rows)
        all_rows += rows
        if args.json:
            for row in rows:
                print(json.dumps({**row, "command": command}), flush=True)
    rows = all_rows
    if args.plot:
        _plot(rows, args.plot, command)
    import kakeya_py
    import torch
    import transformers

    meta = {
        "kakeya": kakeya_py.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": args.threads,
        "residual_length": args.residual_length,
        "block_tokens": args.block_tokens,
        "decoded_budget_bytes": args.decoded_budget_bytes,
    }
    if args.json:
        print(json.dumps({"meta": meta, "command": command}))
        return 0
    print(f"# command: {command}")
    print(f"# {meta}")
    print(f"# prompt + {args.max_new_tokens} generated, greedy, batch 1, model {args.dtype}")
    head = (
        f"{'cache':26} {'prompt':>6} {'cache MiB':>10} {'vs dyn':>7} {'peak RSS MiB':>12} {'tok/s':>7} "
        f"{'decode tok/s':>12} {'vs dyn':>7} {'agree':>6}"
    )
    print(head)
    for r in rows:
        if "error" in r:
            print(f"{r['cache']:26} {r.get('prompt_tokens', ''):>6} {r['error']}")
            continue
        print(
            f"{r['cache']:26} {r['prompt_tokens']:6d} {r['cache_bytes'] / 2**20:10.2f} {r.get('bytes_vs_dynamic', 0):7.3f} "
            f"{r['peak_rss_bytes'] / 2**20:12.1f} {r['tokens_per_s']:7.2f} "
            f"{(r.get('decode_tokens_per_s') or 0):12.2f} {(r.get('decode_speed_vs_dynamic') or 0):7.3f} "
            f"{r['greedy_agreement']:6.3f}"
        )
    for r in rows:
        if "kakeya" in r:
            k = r["kakeya"]
            print(
                f"# {r['cache']}: encoded {k['encoded_bytes']} + sink {k.get('sink_bytes', 0)} "
                f"+ window {k['window_bytes']} + exact layers "
                f"{k['exact_bytes']} + rope table {k['rope_table_bytes']} + kept decoded {k['decoded_bytes']} "
                f"= {k['total_bytes']} B vs DynamicCache {k['dynamic_cache_bytes']} B (ratio {k['ratio']:.2f}); "
                f"transient decode peak {k['transient_peak_bytes']} B (one layer, freed each step)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
