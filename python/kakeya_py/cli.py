"""The ``kakeya`` command line: a registry of subcommands and of evaluation engines.

Each module in :data:`COMMAND_MODULES` has ``register(subparsers)``, which adds its
subcommands and sets ``func`` (``func(args) -> int``) on each. To add a subcommand
(``engines``, ``compare-engines``, ``calibrate``, ``sweep``, ``tune`` ...), write a
module with ``register`` and append it here. Modules are imported when the parser is
built, so they must import torch and transformers lazily, inside their functions.

``kakeya eval --engine NAME`` dispatches through :data:`ENGINES`: ``"module:function"``
with ``function(args) -> dict``, the complete result record (see
:mod:`kakeya_py.harness_cli` for the fields and the shared helpers an engine reuses).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMAND_MODULES: list[str] = [
    "kakeya_py.harness_cli",
    "kakeya_py.calibration_cli",
    "kakeya_py.engines_cli",
    "kakeya_py.sweep_cli",
    "kakeya_py.tune",
]

ENGINES: dict[str, str] = {
    "hf": "kakeya_py.harness_cli:run_hf_eval",
    "vllm": "kakeya_py.engines_cli:run_vllm_eval",
}


def resolve(target: str):
    """Import ``"module:attribute"``."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kakeya",
        description="kakeya: KV-cache codec and its quality harness. "
        "`kakeya eval` alone measures the recommended preset on SmolLM2-135M and WikiText-2.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    args.argv = ["kakeya", *argv]
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
