"""Wall-time overhead of the HF harness: one evaluation with the codec on vs off.

Codec off = what a plain perplexity run of the same passages costs (in snapshot mode:
prefill of the context + the evaluation tokens against the exact cache). Codec on = the
whole ``kakeya eval`` measurement (the same reference work, plus one encode/decode per
layer and stream, plus the evaluation tokens against the compressed cache). Both are
measured in this run, after one warm-up passage, and the ratio is printed.
Target (issue 3): at most 1.5x in snapshot mode.

    python benchmarks/harness_overhead.py                # 2 passages x (1024 + 256), recommended
    python benchmarks/harness_overhead.py --mode in-forward --passages 1
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--config", default="recommended")
    p.add_argument("--mode", default="snapshot")
    p.add_argument("--passages", type=int, default=2)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--n-eval", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args()

    import kakeya_py
    import torch
    from kakeya_py.eval.corpus import load_corpus, make_passages, tokenize_articles
    from kakeya_py.eval.harness import HFRunner, Variant
    from kakeya_py.models import load_model
    from kakeya_py.policy import PolicyCodec, load_policy

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, info = load_model(args.model, args.dtype)
    corpus = load_corpus()
    passages = make_passages(
        tokenize_articles(tok, corpus.part("validation")), args.passages + 1, args.ctx, args.n_eval
    )
    warmup, passages = passages[:1], passages[1:]
    policy = load_policy(args.config)
    codec = PolicyCodec(policy, info.num_layers, threads=args.threads)
    runner = HFRunner(model, k_position=policy.k_position)

    codec_seconds = [0.0]

    def timed(layer, stream, x):
        t = time.perf_counter()
        out = codec.roundtrip(layer, stream, x)
        codec_seconds[0] += time.perf_counter() - t
        return out

    variant = Variant(policy.name, timed)
    runner.run(warmup, [variant], mode=args.mode, progress=False)
    codec_seconds[0] = 0.0

    t0 = time.perf_counter()
    runner.run(passages, [], mode=args.mode, progress=False)
    off = time.perf_counter() - t0
    t0 = time.perf_counter()
    (res,), _ = runner.run(passages, [variant], mode=args.mode, progress=False)
    on = time.perf_counter() - t0

    out = {
        "model": info.name,
        "mode": args.mode,
        "config": policy.name,
        "passages": args.passages,
        "ctx": args.ctx,
        "n_eval": args.n_eval,
        "threads": torch.get_num_threads(),
        "seconds_codec_off": off,
        "seconds_codec_on": on,
        "seconds_in_codec": codec_seconds[0],
        "overhead_ratio": on / off,
        "ratio_measured": res.ledger.ratio(),
        "version": kakeya_py.__version__,
    }
    print(
        f"harness overhead ({args.mode}, {policy.name}, {args.passages} x ({args.ctx} + {args.n_eval}) tokens, "
        f"{out['threads']} threads): codec off {off:.2f} s, codec on {on:.2f} s "
        f"(codec {codec_seconds[0]:.2f} s) -> {on / off:.2f}x  [target <= 1.5x]"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
