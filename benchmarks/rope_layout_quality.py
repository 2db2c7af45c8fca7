"""Teacher-forced quality of KakeyaCache's K layouts on the real model, decode step by decode step.

For each passage (``--ctx`` context tokens from WikiText-2's test part, then ``--n-eval``
tokens), the prompt is prefilled into a :class:`kakeya_py.generation.cache.KakeyaCache` and the next
``--n-eval`` tokens are fed one per step (teacher forcing), so every scored position went
through the cache exactly as in generation (encoded chunks, window, sink). Logits are
compared with one exact forward pass over the whole passage (no cache):

- ``kl``: mean KL(exact || cached) over the scored positions (nats);
- ``top1``: share of positions whose argmax agrees;
- ``dppl``: relative change of perplexity on the passage's next tokens.

Setups (``--setups``): ``decode`` = the pre-kernel cache (K encoded pre-RoPE, chunks decoded
every step); ``kernel`` = the attention kernel with K in the RoPE-mean layout
(``RoPE_p(x - mean_pre)`` encoded, mean term from ``cos``/``sin``); ``kernel-post-rope`` =
the kernel with K encoded post-RoPE (the codec's own mean only). All use ``--policy``.

Example:
    python benchmarks/rope_layout_quality.py --passages 4 --ctx 1024 --n-eval 128 --json
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from _output import command_line, print_row

SETUPS = {
    "decode": {"attention": "decode"},
    "kernel": {"attention": "kernel"},
    "kernel-post-rope": {"attention": "kernel", "k_position": "post_rope"},
}


def run_setup(model, passages, policy, setup: str, residual: int, block: int) -> dict:
    from kakeya_py.generation.cache import KakeyaCache

    kls, agree, nll_ref, nll_got, n = 0.0, 0, 0.0, 0.0, 0
    t0 = time.perf_counter()
    for ids, ref_logits, n_eval in passages:
        ctx = ids.shape[1] - n_eval - 1
        cache = KakeyaCache(policy, model, residual_length=residual, block_tokens=block, **SETUPS[setup])
        with torch.no_grad():
            out = model(ids[:, :ctx], past_key_values=cache, use_cache=True)
            logits = [out.logits[:, -1]]
            for t in range(ctx, ctx + n_eval - 1):
                logits.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1])
        cache.close()
        got = torch.cat(logits).float().log_softmax(-1)  # predictions of tokens ctx .. ctx + n_eval - 1
        ref = ref_logits.float().log_softmax(-1)
        target = ids[0, ctx : ctx + n_eval]
        kls += float((ref.exp() * (ref - got)).sum(-1).sum())
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        nll_ref -= float(ref.gather(1, target[:, None]).sum())
        nll_got -= float(got.gather(1, target[:, None]).sum())
        n += n_eval
    return {
        "setup": setup,
        "kl": kls / n,
        "top1": agree / n,
        "dppl": math.exp((nll_got - nll_ref) / n) - 1.0,
        "ppl_exact": math.exp(nll_ref / n),
        "positions": n,
        "wall_s": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--policy", default="recommended")
    ap.add_argument("--passages", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--n-eval", type=int, default=128)
    ap.add_argument("--residual-length", type=int, default=64)
    ap.add_argument("--block-tokens", type=int, default=128)
    ap.add_argument("--setups", default=",".join(SETUPS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--wikitext", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from kakeya_py.eval.corpus import load_wikitext, part_passages
    from kakeya_py.models import load_model

    print("# command: " + command_line(argv))
    model, tok, _ = load_model(args.model)
    corpus = load_wikitext(args.wikitext)
    passages = []
    for p in part_passages(corpus, tok, "test", args.passages, ctx=args.ctx, n_eval=args.n_eval):
        ids = torch.tensor([p.token_ids[: args.ctx + args.n_eval + 1]])
        with torch.no_grad():
            full = model(ids[:, : args.ctx + args.n_eval]).logits[0]
        passages.append((ids, full[args.ctx - 1 : args.ctx - 1 + args.n_eval], args.n_eval))
    for setup in args.setups.split(","):
        row = run_setup(model, passages, args.policy, setup, args.residual_length, args.block_tokens)
        row.update(policy=args.policy, passages=args.passages, ctx=args.ctx, n_eval=args.n_eval)
        print_row(
            row,
            args.json,
            f"{setup:18} KL {row['kl']:.5f}  top-1 {row['top1']:.2%}  dppl {row['dppl']:+.2%}  "
            f"({row['positions']} positions, {row['wall_s']:.0f} s)",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
