"""Entropy-coded chunks on the attention path: hold decoded codes, or decode rANS every step?

One layer of SmolLM2's shape (4096 tokens x 3 kv heads x 64, random K/V), encoded with
``uniform-ec-log8``'s K and V configs (layer 5). Prints, medians of 7 runs on 1 thread:

- the bytes of the encodings and the bytes an ``AttnChunk`` holds (codes re-packed at
  ``bits`` bits, log8 scales as f32);
- building the two ``AttnChunk``s (rANS decode + re-pack): what a step would pay per layer
  if chunks were kept entropy-coded;
- the codec's full decode of both (rANS, dequantize, inverse rotation);
- the attention kernel over the held chunks (one query, 3 query heads per kv head).

Example:
    python benchmarks/attention_entropy_chunks.py
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import torch


def _median_ms(f, n: int = 7) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main() -> int:
    import kakeya_py as kp
    from kakeya_py import _kakeya
    from kakeya_py.policy import load_policy

    print("# command: python " + " ".join([sys.argv[0], *sys.argv[1:]]))
    torch.set_num_threads(1)
    pol = load_policy("uniform-ec-log8")
    k_cfg, v_cfg = pol.config_for(5, "k", 30), pol.config_for(5, "v", 30)
    g = torch.Generator().manual_seed(0)
    t, h, d = 4096, 3, 64
    k, v = torch.randn(t, h, d, generator=g), torch.randn(t, h, d, generator=g)
    ke, ve = kp.encode(k, k_cfg), kp.encode(v, v_cfg)
    kc, vc = _kakeya.AttnChunk(ke._inner), _kakeya.AttnChunk(ve._inner)
    q = np.random.default_rng(0).standard_normal((1, h, 3, d)).astype(np.float32)
    print(
        f"entropy-coded bytes (K+V): {ke.nbytes + ve.nbytes}; held by the AttnChunks: {kc.nbytes + vc.nbytes}"
    )
    build = _median_ms(lambda: (_kakeya.AttnChunk(ke._inner), _kakeya.AttnChunk(ve._inner)))
    print(f"AttnChunk construction (rANS decode + re-pack), K+V: {build:.2f} ms")
    full = _median_ms(lambda: (ke._inner.decode("f32", 1), ve._inner.decode("f32", 1)))
    print(f"codec decode (rANS + dequantize + unrotate), K+V: {full:.2f} ms")
    kern = _median_ms(lambda: _kakeya.attend_compressed(q, [[kc]], [[vc]], [0], 0.125, None, 1))
    print(f"attention kernel over the held chunks: {kern:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
