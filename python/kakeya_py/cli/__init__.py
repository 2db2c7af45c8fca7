"""The ``kakeya`` command line: a registry of subcommands and of evaluation engines.

This package holds :func:`main` (the ``kakeya`` console script, ``kakeya_py.cli:main``;
``python -m kakeya_py.cli`` runs it too) and the command modules: ``args`` (argument and
model checks, one-line errors), ``harness`` (``kakeya eval`` and its relatives, the fields of
the result record), ``calibration`` (``kakeya calibrate``), ``engines`` (vLLM and engine
comparison), ``sweep`` (``kakeya sweep``), ``tune`` (``kakeya tune``) and ``generation``
(``kakeya generate-eval``).

Each module in :data:`COMMAND_MODULES` has ``register(subparsers)``, which adds its
subcommands and sets ``func`` (``func(args) -> int``) on each. To add a subcommand
(``engines``, ``compare-engines``, ``calibrate``, ``sweep``, ``tune`` ...), write a
module with ``register`` and append it here. Modules are imported when the parser is
built, so they must import torch and transformers lazily, inside their functions.

``kakeya eval --engine NAME`` dispatches through :data:`ENGINES`: ``"module:function"``
with ``function(args) -> dict``, the complete result record (see
:mod:`kakeya_py.cli.harness` for the fields and the shared helpers an engine reuses).

Errors: :func:`main` checks the arguments before a command runs
(:func:`kakeya_py.cli.args.check_args`, then :func:`~kakeya_py.cli.args.check_model` on the
model's ``config.json``: no weights are loaded for a bad command line) and prints every error
as one line, ``kakeya CMD: error: ...``: exit status 2 for bad usage (argparse's errors,
:class:`~kakeya_py.cli.args.UsageError`, a missing model, a policy that does not fit the
model, text too short), 1 for failures at run time. ``--debug`` (or ``KAKEYA_DEBUG=1``)
shows the traceback instead. ``--no-progress`` silences other libraries' progress bars and
logs as well (``--verbose`` keeps the logs).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Sequence

COMMAND_MODULES: list[str] = [
    "kakeya_py.cli.harness",
    "kakeya_py.cli.calibration",
    "kakeya_py.cli.engines",
    "kakeya_py.cli.sweep",
    "kakeya_py.cli.tune",
    "kakeya_py.cli.generation",
]

ENGINES: dict[str, str] = {
    "hf": "kakeya_py.cli.harness:run_hf_eval",
    "vllm": "kakeya_py.cli.engines:run_vllm_eval",
}
ENGINE_HELP: dict[str, str] = {
    "hf": "HF transformers (default)",
    "vllm": "vLLM on CPU or GPU, same passages and metrics (bash scripts/install_vllm_cpu.sh)",
}
DEBUG_ENV = "KAKEYA_DEBUG"


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (argparse prints the usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def resolve(target: str):
    """Import ``"module:attribute"``."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _subparsers(parser: argparse.ArgumentParser):
    """Every parser below ``parser``, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield child
                yield from _subparsers(child)


def _help_epilog() -> str:
    from ..policy import DEFAULT_AGNOSTIC_PRESET, presets_help

    engines = "\n".join(f"  {name:<21} {ENGINE_HELP.get(name, '')}" for name in ENGINES)
    return (
        "presets (--config NAME; ratios measured on SmolLM2-135M; [M only]: per-layer settings made\n"
        f"for model M, refused on another unless --force-model):\n{presets_help()}\n"
        f"  On another model, --config defaults to the model-agnostic {DEFAULT_AGNOSTIC_PRESET}.\n\n"
        f"engines (--engine NAME):\n{engines}\n\n"
        "errors are one line (exit 2: bad usage, 1: run-time failure); --debug or KAKEYA_DEBUG=1 shows\n"
        "the traceback\n"
    )


def _add_common_flags(parser: argparse.ArgumentParser) -> None:
    """``--debug`` everywhere; ``--verbose`` and ``--force-model`` where they apply; the preset
    and engine lists in the help of commands that take ``--config`` or ``--engine``."""
    dests = {a.dest for a in parser._actions}
    if "debug" not in dests:
        parser.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help=f"show the traceback of an error (or {DEBUG_ENV}=1)",
        )
    if "no_progress" in dests and "verbose" not in dests:
        parser.add_argument(
            "--verbose",
            action="store_true",
            help="with --no-progress: keep transformers' and vLLM's logs (only the bars go)",
        )
    if "config" in dests and "model" in dests and "force_model" not in dests:
        parser.add_argument(
            "--force-model",
            action="store_true",
            help="apply a policy made for another model anyway: the per-layer settings that fit are "
            "kept, the others dropped (a warning lists them)",
        )
    if "config" in dests or "engine" in dests or parser.prog == "kakeya":
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.epilog = _help_epilog()
    for action in parser._actions:
        if action.dest == "engine" and action.choices is None:
            action.choices = list(ENGINES)
            action.help = f"evaluation engine: {', '.join(ENGINES)} (default {action.default}; listed below)"
        if action.dest == "config" and action.help and action.help.endswith("..."):
            action.help = "policy JSON file or preset (listed below; default recommended)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="kakeya",
        description="kakeya: KV-cache codec and its quality harness. "
        "`kakeya eval` alone measures the recommended preset on SmolLM2-135M and WikiText-2.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for p in (parser, *_subparsers(parser)):
        _add_common_flags(p)
    return parser


def _debug(args, argv: Sequence[str]) -> bool:
    env = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return env or bool(getattr(args, "debug", False)) or "--debug" in argv


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kakeya ARGV``; returns the exit status (errors: module doc)."""
    from .args import check_args, check_model, describe_failure, quiet_third_party, usage_like

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or its one-line error (2)
        return exc.code if isinstance(exc.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    args.argv = ["kakeya", *argv]
    prog = " ".join(["kakeya", *[w for w in (args.command, getattr(args, "calibrate_command", None)) if w]])
    debug = _debug(args, argv)
    quiet = contextlib.nullcontext()
    if getattr(args, "no_progress", False):
        quiet = quiet_third_party(logs=not getattr(args, "verbose", False))
    try:
        with quiet:
            check_args(args, argv)
            for line in check_model(args, argv):
                sys.stderr.write(line + "\n")
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
    except Exception as exc:  # noqa: BLE001 - every error becomes one line unless --debug
        if debug:
            raise
        hint = "" if usage_like(exc) else f" (--debug or {DEBUG_ENV}=1 shows the traceback)"
        sys.stderr.write(f"{prog}: error: {describe_failure(exc)}{hint}\n")
        return 2 if usage_like(exc) else 1

