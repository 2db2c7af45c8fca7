"""Encode/decode throughput of the Rust codec, the numpy reference and a plain memory copy.

Measured side by side in one run on the same data; throughput is MB/s of the input at
bf16 (tokens x heads x dim x 2 bytes). Targets on a 2-core machine: decode >= 500 MB/s,
encode >= 150 MB/s, and >= 20x the numpy reference. The Rust codec runs its hot loops with
AVX2 where the CPU has it (``kp.simd_level()``); the "baseline" columns are the same codec
held to the baseline instruction set (``kp.set_simd(False)``), same bytes. Each basis (``CodecConfig(bits=b,
basis=...)``, otherwise defaults: blocks of 1024 tokens) gets its own verdict: "pca" fits
and stores a basis per block, "none" only a mean (at full rank the basis is one more
rotation).

For "pca" the "GEMM floor" column is what an encoder doing nothing but the two f32 matrix
products every PCA-basis block needs (the DxD Gram matrix of the block and the projection
onto a full-rank basis) would reach with numpy's BLAS on this machine; "floor x numpy" is
that floor over the numpy reference's encode, the highest encode speedup such a codec could
show. "+eigh" adds LAPACK's symmetric eigensolver (``numpy.linalg.eigh``, f32) on every
block's Gram matrix: an encoder doing only the linear algebra, with this machine's BLAS and
LAPACK, and no quantization at all.

    python benchmarks/codec_throughput.py [--json out.json] [--repeats 10] [--basis pca none]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import kakeya_py as kp  # noqa: E402
import reference_codec as ref  # noqa: E402

SHAPES = {"smollm2 (4096x3x64)": (4096, 3, 64), "8B-class (4096x8x128)": (4096, 8, 128)}
TARGETS = {"decode_mb_s": 500.0, "encode_mb_s": 150.0, "speedup_vs_numpy": 20.0}


def best_seconds(fn, repeats: int, min_seconds: float = 0.0) -> float:
    """Fastest of at least ``repeats`` runs, repeated for at least ``min_seconds`` in all
    (OpenBLAS threads spin for ~0.1 s after a numpy call and would slow the first runs)."""
    fn()  # warm up (thread pool, tables)
    times = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_seconds:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def print_table_head(header: str, argv) -> None:
    """Machine, the command line, and a Markdown table header."""
    print(
        f"\nkakeya {kp.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"instruction set {kp.simd_level()}"
    )
    print("command: python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]))
    print(header)
    print("|---" * (header.count("|") - 1) + "|")


def kv_like(shape, seed=0) -> np.ndarray:
    """Correlated data with decaying spectrum, like real K/V, rounded through bf16."""
    rng = np.random.default_rng(seed)
    t, h, d = shape
    mix = rng.standard_normal((h, d, d)).astype(np.float32) * np.geomspace(1.0, 0.05, d, dtype=np.float32)
    x = np.einsum("thd,hde->the", rng.standard_normal(shape, dtype=np.float32), mix)
    return ref.bf16_to_f32(ref.f32_to_bf16(x)).reshape(shape)


def linalg_floor_seconds(x: np.ndarray, block_size: int, repeats: int) -> tuple[float, float]:
    """Seconds for the Gram matrix and the full-rank projection of every (head, block) of
    ``x`` ([T, H, D] f32) with numpy's BLAS, and for LAPACK's eigendecomposition of every
    block's Gram matrix (see the module doc)."""
    t, h, d = x.shape
    blocks = [
        np.ascontiguousarray(x[i : i + block_size, j]) for j in range(h) for i in range(0, t, block_size)
    ]
    basis = np.linalg.qr(np.random.default_rng(0).standard_normal((d, d)))[0].astype(np.float32)
    grams = [(b - b.mean(0)).T @ (b - b.mean(0)) for b in blocks]

    def products():
        for b in blocks:
            np.matmul(b.T, b)
            np.matmul(b, basis)

    def eigh():
        for g in grams:
            np.linalg.eigh(g)

    return best_seconds(products, repeats, 0.5), best_seconds(eigh, repeats, 0.5)


def measure(name: str, shape: tuple[int, int, int], bits: int, basis: str, args: argparse.Namespace) -> dict:
    x = kv_like(shape)
    mb = x.size * 2 / 1e6
    cfg = kp.CodecConfig(bits=bits, basis=basis)
    enc = kp.encode(x, cfg)
    data = enc.to_bytes()

    def rust_seconds() -> dict:
        out = {"enc": best_seconds(lambda: kp.encode(x, cfg), args.repeats, 0.5)}
        out["dec"] = best_seconds(lambda: kp.decode(enc), args.repeats, 0.5)
        kp.set_simd(False)
        try:
            out["base_enc"] = best_seconds(lambda: kp.encode(x, cfg), args.repeats, 0.5)
            out["base_dec"] = best_seconds(lambda: kp.decode(enc), args.repeats, 0.5)
        finally:
            kp.set_simd(True)
        return out

    # The Rust timings are taken before and after the reference's (best of both): a slow
    # spell of the machine during one window does not decide a ratio.
    before = rust_seconds()
    ref_enc = best_seconds(lambda: ref.encode(x, cfg.to_dict()), args.reference_repeats)
    ref_dec = best_seconds(lambda: ref.decode(data), args.reference_repeats)
    after = rust_seconds()
    rust_enc, rust_dec, base_enc, base_dec = (
        min(before[k], after[k]) for k in ("enc", "dec", "base_enc", "base_dec")
    )
    copy = best_seconds(lambda: x.copy(), args.repeats)
    floor, eigh = linalg_floor_seconds(x, cfg.block_size, args.repeats) if basis == "pca" else (None, None)
    return {
        "shape": name,
        "basis": basis,
        "bits": bits,
        "ratio": round(enc.ratio, 3),
        "encode_mb_s": mb / rust_enc,
        "decode_mb_s": mb / rust_dec,
        "baseline_encode_mb_s": mb / base_enc,
        "baseline_decode_mb_s": mb / base_dec,
        "numpy_encode_mb_s": mb / ref_enc,
        "numpy_decode_mb_s": mb / ref_dec,
        "memcpy_mb_s": mb / copy,
        "encode_speedup_vs_numpy": ref_enc / rust_enc,
        "decode_speedup_vs_numpy": ref_dec / rust_dec,
        "gemm_floor_encode_mb_s": None if floor is None else mb / floor,
        "gemm_floor_speedup_vs_numpy": None if floor is None else ref_enc / floor,
        "linalg_floor_encode_mb_s": None if floor is None else mb / (floor + eigh),
        "linalg_floor_speedup_vs_numpy": None if floor is None else ref_enc / (floor + eigh),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--reference-repeats", type=int, default=1)
    parser.add_argument("--basis", nargs="+", default=["pca", "none"], choices=["pca", "none"])
    args = parser.parse_args(argv)

    cases = [
        (name, shape, bits, basis)
        for basis in args.basis
        for name, shape in SHAPES.items()
        for bits in (2, 3, 4)
    ]
    rows = [measure(*case, args) for case in tqdm(cases, desc="codec throughput")]

    header = (
        "| basis | shape | bits | ratio | encode MB/s | decode MB/s | baseline enc | baseline dec "
        "| numpy enc | numpy dec | memcpy | enc x numpy | dec x numpy | GEMM floor | floor x numpy "
        "| +eigh floor | +eigh x numpy |"
    )
    print_table_head(header, argv)
    for r in rows:
        print(
            f"| {r['basis']} | {r['shape']} | {r['bits']} | {r['ratio']:.2f} | {r['encode_mb_s']:.0f} | {r['decode_mb_s']:.0f} | "
            f"{r['baseline_encode_mb_s']:.0f} | {r['baseline_decode_mb_s']:.0f} | "
            f"{r['numpy_encode_mb_s']:.1f} | {r['numpy_decode_mb_s']:.1f} | {r['memcpy_mb_s']:.0f} | "
            f"{r['encode_speedup_vs_numpy']:.1f} | {r['decode_speedup_vs_numpy']:.1f} | "
            + (
                "- | - | - | - |"
                if r["gemm_floor_encode_mb_s"] is None
                else f"{r['gemm_floor_encode_mb_s']:.0f} | {r['gemm_floor_speedup_vs_numpy']:.1f} | "
                f"{r['linalg_floor_encode_mb_s']:.0f} | {r['linalg_floor_speedup_vs_numpy']:.1f} |"
            )
        )
    worst = {}
    for basis in args.basis:
        mine = [r for r in rows if r["basis"] == basis]
        worst[basis] = {
            "encode_mb_s": min(r["encode_mb_s"] for r in mine),
            "decode_mb_s": min(r["decode_mb_s"] for r in mine),
            "speedup_vs_numpy": min(
                min(r["encode_speedup_vs_numpy"], r["decode_speedup_vs_numpy"]) for r in mine
            ),
        }
        for key, target in TARGETS.items():
            verdict = "meets" if worst[basis][key] >= target else "MISSES"
            print(f"basis {basis}: worst {key}: {worst[basis][key]:.1f} ({verdict} target {target:g})")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rows": rows, "worst": worst, "targets": TARGETS, "simd": kp.simd_level()}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
