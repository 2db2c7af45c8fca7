"""Where the bytes of a policy go: codes, scales, skeletons, outliers, headers, the exact sink.

Captures the 1024-token prefixes of evaluation passages (pre-RoPE K and V, as `kakeya eval`
compresses them), encodes every (layer, stream) with each policy and sums the sections of
the bytes (`tests/reference_codec.body_sections`).

    python reports/entropy/byte_breakdown.py uniform-ec uniform-ec-log8 > reports/entropy/byte_breakdown.md
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
import kakeya_py as kp  # noqa: E402
import reference_codec as ref  # noqa: E402
from kakeya_py.eval.corpus import load_corpus, part_passages  # noqa: E402
from kakeya_py.eval.harness import HFRunner  # noqa: E402
from kakeya_py.models import load_model  # noqa: E402
from kakeya_py.policy import BF16_BYTES, load_policy  # noqa: E402


def capture(passages: list[int], ctx: int) -> list[dict[tuple[int, str], torch.Tensor]]:
    model, tok, _ = load_model("smollm2-135m", progress=False)
    chosen = part_passages(load_corpus(), tok, "validation", 16, ctx, 256)
    runner = HFRunner(model)
    out = []
    for j in tqdm(passages, desc="prefill"):
        state = runner.prefill(torch.tensor([list(chosen[j].token_ids[:ctx])]))
        out.append({(la, s): state.stream(la, s, "pre_rope")[0] for la in state.v for s in "kv"})
    return out


def breakdown(policy_name: str, prefixes) -> collections.Counter:
    policy = load_policy(policy_name)
    num_layers = 1 + max(la for la, _ in prefixes[0])
    parts: collections.Counter = collections.Counter()
    for streams in prefixes:
        for (layer, stream), x in streams.items():
            parts["input at bf16"] += x.numel() * BF16_BYTES
            cfg = policy.config_for(layer, stream, num_layers)
            sink = min(policy.sink_tokens, x.shape[0])
            parts["sink (exact, bf16)"] += x[:sink].numel() * BF16_BYTES
            if cfg is None:
                parts["exact streams"] += x[sink:].numel() * BF16_BYTES
                continue
            data = kp.encode(x[sink:].contiguous(), cfg).to_bytes()
            header_len = int.from_bytes(data[8:12], "little")
            parts["header, preamble, CRC"] += 12 + header_len + 4
            sections = ref.body_sections(data)
            for key, value in sections.items():
                depth = key.count("/")
                if key.startswith("skeleton/") or (depth == 3 and key.endswith("/skeleton")):
                    parts["skeletons (means)"] += len(value)
                elif depth == 3:
                    parts[key.rsplit("/", 1)[1]] += len(value)
            records = sum(
                len(v) for k, v in sections.items() if k.count("/") in (1, 2) and k != "preconditioner"
            )
            parts["offset tables"] += (
                len(data) - (12 + header_len + 4) - records - len(sections["preconditioner"])
            )
            parts["stored"] += len(data)
    parts["stored"] += parts["sink (exact, bf16)"] + parts["exact streams"]
    return parts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("policies", nargs="+")
    p.add_argument("--passages", default="0,5,10,15", help="evaluation passages (of 16) to capture")
    p.add_argument("--ctx", type=int, default=1024)
    args = p.parse_args(argv)
    prefixes = capture([int(v) for v in args.passages.split(",")], args.ctx)
    print("# Byte breakdown\n")
    print(
        "command: `python " + " ".join(["reports/entropy/byte_breakdown.py", *(argv or sys.argv[1:])]) + "`\n"
    )
    print(f"SmolLM2-135M, prefixes of {args.ctx} tokens of WikiText-2 evaluation passages {args.passages}.\n")
    for name in args.policies:
        parts = breakdown(name, prefixes)
        stored = parts.pop("stored")
        raw = parts.pop("input at bf16")
        print(f"## {name}: ratio {raw / stored:.3f}x\n")
        print("| part | bytes | share |\n|---|---|---|")
        for key, value in parts.most_common():
            print(f"| {key} | {value} | {100 * value / stored:.2f}% |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
