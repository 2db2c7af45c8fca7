"""What entropy coding buys and costs: bytes, error and speed, side by side in one run.

For each shape and bit width b, three configs on the same data (``basis="none"``, one mean
per head, blocks of 4096 tokens, outliers beyond the table's reach stored exactly):
fixed-length Lloyd–Max codes, the same codes entropy-coded (lossless: identical values),
and the uniform quantizer whose step gives the Lloyd–Max MSE, entropy-coded. Ratio is
measured from the serialized bytes; speed is MB/s of the input at bf16.

    python benchmarks/entropy_coding.py [--json out.json] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kakeya_py as kp  # noqa: E402
from codec_throughput import SHAPES, best_seconds, kv_like, print_table_head  # noqa: E402

# Gaussian Lloyd–Max MSE per bit width; the uniform step of equal MSE is sqrt(12 · MSE).
LLOYD_MAX_MSE = {3: 0.03454, 4: 0.009497}
BASE = {"basis": "none", "share_basis": True, "block_size": 4096}


def variants(bits: int) -> dict[str, kp.CodecConfig]:
    step = float(np.sqrt(12 * LLOYD_MAX_MSE[bits]))
    return {
        "lloyd-max packed": kp.CodecConfig(bits=bits, outlier_threshold=3.0, **BASE),
        "lloyd-max + rANS": kp.CodecConfig(bits=bits, outlier_threshold=3.0, entropy_coding=True, **BASE),
        f"uniform {step:.4f} + rANS": kp.CodecConfig(
            bits=bits + 1, uniform_step=step, outlier_threshold=4.5, entropy_coding=True, **BASE
        ),
    }


def measure(shape_name: str, x: np.ndarray, bits: int, name: str, cfg, repeats: int) -> dict:
    mb = x.size * 2 / 1e6
    enc = kp.encode(x, cfg)
    y = kp.decode(enc)
    centered = x - x.mean(axis=0, keepdims=True)
    return {
        "shape": shape_name,
        "bits": bits,
        "variant": name,
        "ratio": enc.ratio,
        "bits_per_value": 8 * enc.nbytes / x.size,
        "relative_mse": float(np.sum((y - x) ** 2) / np.sum(centered**2)),
        "encode_mb_s": mb / best_seconds(lambda: kp.encode(x, cfg), repeats),
        "decode_mb_s": mb / best_seconds(lambda: kp.decode(enc), repeats),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    cases = [
        (shape_name, shape, bits, name, cfg)
        for shape_name, shape in SHAPES.items()
        for bits in LLOYD_MAX_MSE
        for name, cfg in variants(bits).items()
    ]
    data = {name: kv_like(shape) for name, shape in SHAPES.items()}
    rows = [
        measure(shape_name, data[shape_name], bits, name, cfg, args.repeats)
        for shape_name, _, bits, name, cfg in tqdm(cases, desc="entropy coding")
    ]

    print_table_head(
        "| shape | bits | variant | ratio | bits/value | rel. MSE | encode MB/s | decode MB/s |", argv
    )
    for r in rows:
        print(
            f"| {r['shape']} | {r['bits']} | {r['variant']} | {r['ratio']:.2f} | {r['bits_per_value']:.3f} | "
            f"{r['relative_mse']:.5f} | {r['encode_mb_s']:.0f} | {r['decode_mb_s']:.0f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
