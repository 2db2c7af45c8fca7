"""One decode step's attention: the compressed-domain kernel vs torch sdpa over bf16 / fp32 K/V.

For each shape (query heads / kv heads × head_dim) and context length ``T``: K and V of
``T`` tokens (random, with a per-channel mean and heavy tails like real K/V), encoded with
``recommended``'s per-stream configs (K 4-bit, V 3-bit, mean only, outliers beyond 3
sigma, f16 scales; K in the RoPE-mean layout KakeyaCache uses, so the kernel also reads the
``cos``/``sin`` table), and one query token:

- ``kernel_s``: ``kakeya_py._kakeya.attend_compressed`` over the ``T`` encoded tokens
  (Rust, ``--threads`` threads, GIL released; includes the numpy in/out conversion);
- ``step_s``: what a KakeyaCache decode step runs per layer: the kernel over ``T - 64``
  encoded tokens plus exact attention over a 64-token window in torch and the
  log-sum-exp merge (``kakeya_py.generation.attention.PendingAttention.attend``);
- ``sdpa_bf16_s`` / ``sdpa_fp32_s``: ``torch.nn.functional.scaled_dot_product_attention``
  (``enable_gqa``) over ``T`` tokens of bf16 / fp32 K/V; the faster is ``baseline_s``.

``speedup = baseline_s / kernel_s``. Bytes read: the kernel's in-memory chunks (codes,
scales, outliers, means) plus the ``cos``/``sin`` rows of ``T`` positions; the baseline's
K and V at its dtype. Times are medians over ``--repeats`` interleaved runs (each run
``--inner`` calls), measured side by side in one process.

Example:
    python benchmarks/compressed_attention.py --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from _output import command_line, print_row

SHAPES = {
    "smollm2-135m (9q/3kv x 64)": (9, 3, 64),
    "8b-class (32q/8kv x 128)": (32, 8, 128),
}
K_CFG = {"bits": 4, "block_size": 4096, "share_basis": True, "outlier_threshold": 3.0, "basis": "none"}
V_CFG = {**K_CFG, "bits": 3}
WINDOW = 64


def _kv(gen: torch.Generator, t: int, h: int, d: int) -> torch.Tensor:
    x = torch.randn(t, h, d, generator=gen)
    x = x + 0.2 * x**3  # heavy tails: some outliers
    return x + torch.randn(1, h, d, generator=gen) * 2.0  # per-channel mean


def _rope(t: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    inv = 10000.0 ** (-torch.arange(0, d // 2, dtype=torch.float64) / (d // 2))
    theta = torch.arange(t, dtype=torch.float64)[:, None] * inv[None, :]
    return theta.cos().float().numpy()[None], theta.sin().float().numpy()[None]


def _time(fn, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def run(
    shape_name: str, hq: int, hkv: int, d: int, t: int, repeats: int, inner: int, threads: int | None = 1
) -> dict:
    import kakeya_py as kp
    from kakeya_py import _kakeya
    from kakeya_py.generation.attention import PendingAttention

    gen = torch.Generator().manual_seed(t * 31 + d)
    k, v = _kv(gen, t, hkv, d), _kv(gen, t, hkv, d)
    cos, sin = _rope(t, d)
    table = _kakeya.RopeTable(d // 2)
    table.append(0, cos, sin)
    k_cfg, v_cfg = kp.CodecConfig(**K_CFG), kp.CodecConfig(**V_CFG)
    rope_mean = np.ascontiguousarray(torch.randn(hkv, d, generator=gen).numpy())

    def chunks(n: int):
        ke = kp.encode(k[:n].contiguous(), k_cfg)._inner
        ve = kp.encode(v[:n].contiguous(), v_cfg)._inner
        return _kakeya.AttnChunk(ke, 0, rope_mean), _kakeya.AttnChunk(ve, 0)

    kc, vc = chunks(t)
    kc_s, vc_s = chunks(t - WINDOW)
    q = torch.randn(1, hq, 1, d, generator=gen)
    scale = d**-0.5
    q_rows = np.ascontiguousarray(q.reshape(1, hkv, hq // hkv, d).numpy())

    def kernel():
        _kakeya.attend_compressed(q_rows, [[kc]], [[vc]], [0], scale, table, threads)

    # a KakeyaCache step: kernel over T - 64 encoded tokens + exact 64-token window, merged
    class _Layer:  # the pending state only reads the cache flag
        class _cache:  # noqa: N801
            _decode_attention_check = False

    pending = PendingAttention(
        layer=_Layer(),
        k_chunks=[[kc_s]],
        v_chunks=[[vc_s]],
        n_sink=0,
        n_compressed=t - WINDOW,
        rope=table,
        threads=threads,
        k_snapshot=[],
        v_snapshot=[],
    )
    k_win = k[t - WINDOW :].permute(1, 0, 2)[None].contiguous()
    v_win = v[t - WINDOW :].permute(1, 0, 2)[None].contiguous()

    class _Module:
        num_key_value_groups = hq // hkv

    def step():
        pending.attend(_Module(), q, k_win, v_win, None, scale, None, 0.0, {})

    kt = {dt: k.permute(1, 0, 2)[None].to(dt).contiguous() for dt in (torch.bfloat16, torch.float32)}
    vt = {dt: v.permute(1, 0, 2)[None].to(dt).contiguous() for dt in (torch.bfloat16, torch.float32)}
    qt = {dt: q.to(dt) for dt in (torch.bfloat16, torch.float32)}

    def sdpa(dt):
        def f():
            torch.nn.functional.scaled_dot_product_attention(
                qt[dt], kt[dt], vt[dt], scale=scale, enable_gqa=True
            )

        return f

    fns = {
        "kernel": kernel,
        "step": step,
        "sdpa_bf16": sdpa(torch.bfloat16),
        "sdpa_fp32": sdpa(torch.float32),
    }
    for f in fns.values():  # warm up
        f()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            times[name].append(_time(f, inner))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    base_name = "sdpa_bf16" if med["sdpa_bf16"] <= med["sdpa_fp32"] else "sdpa_fp32"
    base_bytes = 2 * t * hkv * d * (2 if base_name == "sdpa_bf16" else 4)
    kernel_bytes = kc.nbytes + vc.nbytes + t * (d // 2) * 2 * 4
    return {
        "shape": shape_name,
        "q_heads": hq,
        "kv_heads": hkv,
        "head_dim": d,
        "context": t,
        "kernel_s": med["kernel"],
        "step_s": med["step"],
        "sdpa_bf16_s": med["sdpa_bf16"],
        "sdpa_fp32_s": med["sdpa_fp32"],
        "baseline": base_name,
        "baseline_s": med[base_name],
        "speedup": med[base_name] / med["kernel"],
        "step_speedup": med[base_name] / med["step"],
        "bytes_read_kernel": kernel_bytes,
        "bytes_read_baseline": base_bytes,
        "bytes_ratio": kernel_bytes / base_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="1024,2048,4096,8192,16384")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names of SHAPES")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inner", type=int, default=5)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads of both torch and the kernel (default 1: on a shared 2-core machine, several threads "
        "measure the neighbours' load more than the code)",
    )
    ap.add_argument("--json", action="store_true", help="one JSON object per line on stdout")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import kakeya_py as kp

    meta = {
        "command": command_line(argv),
        "kakeya": kp.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "simd": kp.simd_level(),
        "threads": args.threads,
    }
    print(("# " if not args.json else "") + json.dumps({"meta": meta}), flush=True)
    if not args.json:
        print(
            f"{'shape':30} {'ctx':>6} {'kernel ms':>10} {'step ms':>9} {'bf16 ms':>9} {'fp32 ms':>9} {'speedup':>8} {'bytes':>7}"
        )
    for name in args.shapes.split(","):
        hq, hkv, d = SHAPES[name]
        for t in (int(c) for c in args.contexts.split(",")):
            row = run(name, hq, hkv, d, t, args.repeats, args.inner, args.threads)
            print_row(
                row,
                args.json,
                f"{name:30} {t:6d} {row['kernel_s'] * 1e3:10.3f} {row['step_s'] * 1e3:9.3f} "
                f"{row['sdpa_bf16_s'] * 1e3:9.3f} {row['sdpa_fp32_s'] * 1e3:9.3f} {row['speedup']:7.2f}x "
                f"{row['bytes_ratio']:6.3f}",
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
