"""Relative reconstruction error of K and V per token: our codec vs the TurboQuant-style peer.

    python reports/sinks/per_token_error.py

One 1024-token prefix of WikiText-2 (characters 20000-60000 of the test file) through SmolLM2-135M, K pre-RoPE and
V of layers 2, 10 and 20, at 4 bits. Prints the whole-tensor relative squared error and
measured ratio of each method, then the per-token error of tokens 0-3 and the median and
maximum over the rest: position 0 (the attention sink) is where ours loses.
"""

from __future__ import annotations

import kakeya_py as kp
import torch
from kakeya_py.eval import corpus as C
from kakeya_py.eval.harness import HFRunner
from kakeya_py.models import load_model
from kakeya_py.peers import parse_method

LAYERS = (2, 10, 20)


def per_token(x_hat, x) -> torch.Tensor:
    return ((x_hat - x).pow(2).sum(-1) / x.pow(2).sum(-1)).mean(-1)


def main() -> None:
    torch.set_num_threads(1)
    model, tok, _ = load_model("smollm2-135m", progress=False)
    text = C.default_wikitext_path().read_text()[20000:60000]  # the prefix the README quotes
    ids = tok(text, return_tensors="pt").input_ids[:, :1024]
    state = HFRunner(model).prefill(ids)
    turbo = parse_method("turbo-4")
    ours = kp.preset("mse-4bit")
    print(f"prefix of {ids.shape[1]} tokens; relative squared error, measured ratio")
    for layer in LAYERS:
        for stream in ("k", "v"):
            x = state.stream(layer, stream, "pre_rope")[0].contiguous().float()
            xt, nt = turbo.roundtrip(layer, stream, x)
            xo, no = kp.roundtrip(x, ours)
            den = x.pow(2).sum()
            print(
                f"L{layer}{stream}: turbo-4 {((xt - x).pow(2).sum() / den).item():.5f} "
                f"{x.numel() * 2 / nt:.2f}x | mse-4bit {((xo - x).pow(2).sum() / den).item():.5f} "
                f"{x.numel() * 2 / no:.2f}x"
            )
            for name, e in (("turbo-4", per_token(xt, x)), ("mse-4bit", per_token(xo, x))):
                first = " ".join(f"{v:.4f}" for v in e[:4].tolist())
                print(
                    f"    {name:9} tokens 0-3: {first}; median {e[4:].median().item():.4f}, max {e.max().item():.4f}"
                )


if __name__ == "__main__":
    main()
