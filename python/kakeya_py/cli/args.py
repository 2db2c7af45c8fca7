"""Checks of the ``kakeya`` command line that run before any model is loaded.

:func:`check_args` validates, from the arguments and files alone, every shared argument a
subcommand has: counts (``--passages``, ``--ctx``, ``--n-eval`` ... >= 1), ``--dtype``,
``--model`` (:func:`kakeya_py.models.locate_model`: folder contents, missing paths, a Hub id
offline), the text (``--text-file`` exists, is UTF-8, not blank and not shorter than the
passages need; WikiText's SHA-256; ``--part``), ``--config`` (a preset or a policy JSON that
parses), ``--layers`` / ``--exact-layers`` syntax, ``--sigma-q``. :func:`check_model` then
reads the model's ``config.json`` (never its weights) for what depends on the model: a policy
made for another model or naming layers it lacks (:func:`kakeya_py.policy.fit_to_model`,
``--force-model``), layers beyond its depth, ``--ctx + --n-eval`` beyond its positions.

Both raise :class:`UsageError`; :func:`kakeya_py.cli.main` prints it as one line and exits
with status 2. :func:`quiet_third_party` is what ``--no-progress`` does to other libraries'
progress bars and logs, and :func:`run_path` the default ``--json`` of ``kakeya eval``.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

#: Where ``kakeya eval`` writes its JSON when no ``--json`` is given (ignored by git).
RUNS_DIR = "runs"

#: Count arguments that must be >= 1 (by ``dest``), and those that may be 0.
POSITIVE = (
    "passages",
    "val_passages",
    "ctx",
    "n_eval",
    "val_n_eval",
    "tokens",
    "seq_len",
    "sigma_tokens",
    "topk",
    "threads",
    "check_every",
    "max_rounds",
    "patience",
)
NON_NEGATIVE = ("sink_tokens", "held_out", "rope_window")
#: Commands whose ``--config`` is the policy they evaluate or fit with.
POLICY_COMMANDS = ("eval", "attribution", "noise", "residual", "compare-engines", "calibrate")
_LAYER_ITEM = re.compile(r"-?\d+(--?\d+)?")


class UsageError(ValueError):
    """Bad command-line usage: ``kakeya CMD: error: argument ARG: MESSAGE``, exit status 2."""

    def __init__(self, arg: str | None, message: str):
        self.arg = arg
        super().__init__(f"argument {arg}: {message}" if arg else message)


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def explicit(argv: Sequence[str], name: str) -> bool:
    """Whether ``--name`` was given on the command line (``--name X`` or ``--name=X``)."""
    return any(a == name or a.startswith(name + "=") for a in argv)


# -- arguments alone ------------------------------------------------------------------------------
def parse_layer_spec(spec: str, arg: str) -> list[int]:
    """``'0-9,12,-1'`` -> indices (unchecked against a model); ``'none'`` -> []."""
    text = spec.replace(" ", "")
    if text in ("", "none"):
        return []
    out: list[int] = []
    for part in text.split(","):
        if not _LAYER_ITEM.fullmatch(part):
            raise UsageError(
                arg, f"expected layer indices and ranges like '0-9,12,-1' (or 'none'), got {spec!r}"
            )
        if "-" in part[1:]:
            cut = part.index("-", 1)
            lo, hi = int(part[:cut]), int(part[cut + 1 :])
            if hi < lo:
                raise UsageError(arg, f"range {part!r} is empty (write low-high), in {spec!r}")
            out.extend(range(lo, hi + 1))
        else:
            out.append(int(part))
    return out


def _check_counts(args) -> None:
    for dest in POSITIVE + NON_NEGATIVE:
        value = getattr(args, dest, None)
        if value is None:
            continue
        low = 1 if dest in POSITIVE else 0
        if value < low:
            raise UsageError(flag(dest), f"must be an integer >= {low}, got {value}")


def _check_dtype(args) -> None:
    from ..models import _DTYPES

    accepted = "float32 (fp32), bfloat16 (bf16), float16 (fp16)"
    if getattr(args, "dtype", None) is not None and str(args.dtype).lower() not in _DTYPES:
        raise UsageError("--dtype", f"expected {accepted}, got {args.dtype!r}")
    for d in getattr(args, "dtypes", None) or []:
        if str(d).lower() not in _DTYPES:
            raise UsageError("--dtypes", f"expected some of {accepted}, got {d!r}")


def _check_model_name(args) -> None:
    from ..models import ModelError, locate_model

    if getattr(args, "model", None) is None:
        return
    try:
        locate_model(args.model)
    except ModelError as exc:
        raise UsageError("--model", str(exc)) from None


def _tokens_needed(args) -> int:
    """Tokens the passages need at least (``tune``: search and validation passages)."""
    n_eval = max(args.n_eval, getattr(args, "val_n_eval", None) or 0)
    count = args.passages + (getattr(args, "val_passages", None) or 0)
    return count * (args.ctx + n_eval + 1)


def _check_text(args) -> None:
    """``--text-file`` / ``--wikitext`` / ``--part``: present, readable, hash, long enough.

    A token covers at least one byte of text (byte-level BPE, SentencePiece with byte
    fallback, word-level), so a text of fewer bytes than the passages' tokens is too short.
    """
    has_text = hasattr(args, "text_file") or hasattr(args, "wikitext")
    if not has_text:
        return
    from ..eval.corpus import CorpusError, load_corpus

    text_file = getattr(args, "text_file", None)
    if text_file is not None:
        p = Path(text_file).expanduser()
        if not p.is_file():
            what = "is a folder" if p.is_dir() else "does not exist"
            raise UsageError("--text-file", f"{p} {what}; expected a UTF-8 text file")
        try:
            raw = p.read_bytes()
            raw.decode("utf-8")
        except OSError as exc:
            raise UsageError("--text-file", f"cannot read {p}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise UsageError(
                "--text-file", f"{p} is not UTF-8 text ({exc.reason} at byte {exc.start})"
            ) from None
        if not raw.strip():
            raise UsageError("--text-file", f"{p} is {'empty' if not raw else 'blank'}; expected text")
    try:
        text = getattr(args, "text", None) or "wikitext"  # --text: built-in texts
        corpus = load_corpus(text_file, getattr(args, "wikitext", None), text, getattr(args, "part", None) or "test")
    except CorpusError as exc:
        arg = (
            "--text-file"
            if text_file
            else "--wikitext"
            if getattr(args, "text", "wikitext") == "wikitext"
            else "--text"
        )
        raise UsageError(arg, str(exc)) from None
    part = getattr(args, "part", None)
    articles = corpus.articles
    if part is not None:
        try:
            articles = corpus.part(part)
        except (CorpusError, ValueError) as exc:
            raise UsageError("--part", str(exc)) from None
        if not articles:
            raise UsageError("--part", f"{corpus.name} has no {part} part")
    if not all(hasattr(args, d) for d in ("passages", "ctx", "n_eval")):
        return
    size = sum(len(a.text.encode("utf-8")) for a in articles)
    need = _tokens_needed(args)
    if size < need:
        where = (
            f"--text-file {text_file}" if text_file else f"the {part or 'evaluation'} part of {corpus.name}"
        )
        raise UsageError(
            "--passages",
            f"{need} tokens needed ({args.passages} passages x (ctx {args.ctx} + n_eval {args.n_eval} + 1)) "
            f"but {where} has {size} bytes (a token is at least one byte): fewer passages or a shorter "
            "--ctx / --n-eval",
        )


def _uses_config(args) -> bool:
    command = getattr(args, "command", None)
    if command == "calibrate":
        return getattr(args, "calibrate_command", None) in ("centroids", "all", "policy")
    return command in POLICY_COMMANDS and hasattr(args, "config")


def _load_policy(spec: str, arg: str):
    import json

    from ..peers import load_peer_policy
    from ..policy import load_policy, preset_names

    try:
        return load_peer_policy(spec) or load_policy(spec)  # a peer policy file / spec, else kakeya's
    except json.JSONDecodeError as exc:
        raise UsageError(
            arg, f"{spec} is not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno})"
        ) from None
    except (ValueError, TypeError, KeyError) as exc:
        msg = str(exc)
        if "neither a preset" in msg:
            msg = f"{spec!r} is neither a preset nor a policy JSON file; presets: {', '.join(preset_names())}"
        raise UsageError(arg, msg) from None
    except OSError as exc:
        raise UsageError(arg, f"cannot read {spec}: {exc.strerror or exc}") from None


def _check_policy_args(args) -> None:
    if _uses_config(args):
        _load_policy(args.config, "--config")
    if getattr(args, "command", None) == "tune":
        for spec in [c for c in (getattr(args, "compare", "") or "").split(",") if c]:
            _load_policy(spec, "--compare")
    for dest in ("layers", "exact_layers"):
        spec = getattr(args, dest, None)
        if isinstance(spec, str):
            parse_layer_spec(spec, flag(dest))
    for dest in ("sigma_q", "ladder", "reuse_sensitivity", "reuse_search", "from_artifact"):
        path = getattr(args, dest, None)
        if path is not None and not Path(path).expanduser().exists():
            raise UsageError(flag(dest) if dest != "from_artifact" else "--from", f"{path} does not exist")


def _kakeya_methods(args) -> list[str]:
    """The policies (presets or JSON files) among ``kakeya sweep --methods``."""
    from ..codec import PRESETS
    from ..policy import POLICY_PRESETS
    from .sweep import split_k_position, split_methods

    out = []
    for method in split_methods(args.methods):
        base, _ = split_k_position(method)
        if base.startswith("kakeya:"):
            spec = base.split(":", 1)[1]
            if spec in POLICY_PRESETS or spec not in PRESETS:
                out.append(spec)
    return out


def _check_methods(args, argv: Sequence[str]) -> None:
    if getattr(args, "command", None) != "sweep":
        return
    for name in ("--config", "--json"):
        if explicit(argv, name):
            raise UsageError(
                name, "kakeya sweep takes --methods (e.g. kakeya:my_policy.json) and --out instead"
            )
    from .sweep import family_of, split_methods

    try:
        for method in split_methods(args.methods):
            family_of(method)
        specs = _kakeya_methods(args)
    except (ValueError, KeyError, SystemExit) as exc:
        raise UsageError("--methods", str(exc)) from None
    for spec in specs:
        _load_policy(spec, "--methods")


def check_args(args, argv: Sequence[str] = ()) -> None:
    """Everything that can be checked without the model (module doc). Raises :class:`UsageError`."""
    _check_counts(args)
    _check_dtype(args)
    _check_policy_args(args)
    _check_methods(args, argv)
    _check_text(args)
    _check_model_name(args)


# -- with the model's config ----------------------------------------------------------------------
def _positions_needed(args) -> tuple[int, str] | None:
    command = getattr(args, "command", None)
    if all(hasattr(args, d) for d in ("ctx", "n_eval")):
        n_eval = max(args.n_eval, getattr(args, "val_n_eval", None) or 0)
        vllm = getattr(args, "engine", "hf") == "vllm" or command in ("engines", "compare-engines")
        # vLLM holds the whole passage (ctx + n_eval + 1 tokens) plus the one token it must generate
        extra = 2 if vllm else 0
        what = f"--ctx {args.ctx} + --n-eval {n_eval}" + (" + 2 (vLLM)" if vllm else "")
        return args.ctx + n_eval + extra, what
    if getattr(args, "seq_len", None) is not None:
        return args.seq_len, f"--seq-len {args.seq_len}"
    return None


def _substitute(args, arg: str, spec: str, new: str) -> None:
    """Put preset ``new`` in the place of ``spec`` in a default ``--config`` / ``--compare`` /
    ``--methods`` (a list keeps each entry once)."""
    if arg == "--config":
        args.config = new
        return
    if arg == "--compare":
        items = [new if c == spec else c for c in args.compare.split(",") if c]
        args.compare = ",".join(dict.fromkeys(items))
        return
    from .sweep import split_k_position, split_methods

    items = []
    for method in split_methods(args.methods):
        base, pos = split_k_position(method)
        if base == f"kakeya:{spec}":
            method = f"kakeya:{new}" + (f"@{pos.replace('_', '-')}" if pos else "")
        items.append(method)
    args.methods = ",".join(dict.fromkeys(items))


def check_model(args, argv: Sequence[str] = ()) -> list[str]:
    """The checks that need the model's ``config.json``; returns warnings to print.

    A default policy (``--config``, ``tune --compare``, ``sweep --methods`` not given) made for
    another model (``recommended``) is replaced by
    :data:`~kakeya_py.policy.DEFAULT_AGNOSTIC_PRESET` in ``args``, with a note.
    """
    if getattr(args, "model", None) is None or not hasattr(args, "dtype"):
        return []
    from ..models import ModelError, model_shape
    from ..policy import DEFAULT_AGNOSTIC_PRESET, PolicyModelError, fit_to_model

    try:
        shape = model_shape(args.model)
    except ModelError as exc:
        raise UsageError("--model", str(exc)) from None
    warnings: list[str] = []
    n = shape.num_layers
    for dest in ("layers", "exact_layers"):
        spec = getattr(args, dest, None)
        if isinstance(spec, str):
            bad = [i for i in parse_layer_spec(spec, flag(dest)) if not -n <= i < n]
            if bad:
                raise UsageError(
                    flag(dest),
                    f"layers {bad} are outside model {shape.name!r}, which has {n} layers (accepted: "
                    f"0..{n - 1}, or -{n}..-1 from the end)",
                )
    force = bool(getattr(args, "force_model", False))
    specs: list[tuple[str, str]] = []
    if _uses_config(args) and getattr(args, "calibrate_command", None) != "policy":
        specs.append(("--config", args.config))
    if getattr(args, "command", None) == "tune":
        specs += [("--compare", c) for c in (getattr(args, "compare", "") or "").split(",") if c]
    if getattr(args, "command", None) == "sweep":
        specs += [("--methods", spec) for spec in _kakeya_methods(args)]
    for arg, spec in specs:
        policy = _load_policy(spec, arg)
        try:
            _, dropped = fit_to_model(policy, shape, force=force)
        except PolicyModelError as exc:
            if explicit(argv, arg):
                raise UsageError(arg, str(exc)) from None
            _substitute(args, arg, spec, DEFAULT_AGNOSTIC_PRESET)
            made = policy.model["name"] if policy.model else "another model"
            warnings.append(
                f"note: the default {arg} {spec} was made for {made}; on {shape.name} ({n} layers) "
                f"{DEFAULT_AGNOSTIC_PRESET} (model-agnostic) takes its place"
            )
            continue
        if dropped:
            warnings.append(f"warning: --force-model: {spec} on {shape.name}: dropped {'; '.join(dropped)}")
    need = _positions_needed(args)
    if need is not None and shape.max_positions is not None and need[0] > shape.max_positions:
        raise UsageError(
            "--ctx" if "--ctx" in need[1] else "--seq-len",
            f"{need[1]} = {need[0]} positions, more than the {shape.max_positions} of model "
            f"{shape.name} (max_position_embeddings)",
        )
    return warnings


# -- side effects -----------------------------------------------------------------------------------
QUIET_ENV = {
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "VLLM_LOGGING_LEVEL": "ERROR",
    "PYTHONWARNINGS": "ignore",  # engine processes' deprecation warnings
}


@contextlib.contextmanager
def quiet_third_party(*, logs: bool = True) -> Iterator[None]:
    """Silence other libraries' progress bars (tqdm, Hugging Face) and, with ``logs``, their
    logs (transformers, vLLM and its engine process); restored on exit."""
    keys = [k for k in QUIET_ENV if logs or k in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")]
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: QUIET_ENV[k] for k in keys})
    tf = sys.modules.get("transformers")
    level = None
    if tf is not None:  # already imported: it read the environment at import
        from transformers.utils import logging as tf_logging

        tf_logging.disable_progress_bar()
        if logs:
            level = tf_logging.get_verbosity()
            tf_logging.set_verbosity_error()
    import warnings

    caught = warnings.catch_warnings()
    caught.__enter__()
    if logs:
        warnings.simplefilter("ignore")
    try:
        yield
    finally:
        caught.__exit__(None, None, None)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if tf is not None:
            with warnings.catch_warnings():  # huggingface_hub warns when its import-time env said off
                warnings.simplefilter("ignore")
                tf_logging.enable_progress_bar()
            if level is not None:
                tf_logging.set_verbosity(level)


def run_path(command: str, config: str, engine: str = "hf", *, now: float | None = None) -> str:
    """``runs/<command>_<config>_<engine>_<YYYYmmdd-HHMMSS>.json``: the default ``--json``."""
    stem = Path(config).stem if config.endswith(".json") else config
    stem = re.sub(r"[^A-Za-z0-9.\-]+", "_", stem).strip("_") or "policy"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return str(Path(RUNS_DIR) / f"{command}_{stem}_{engine}_{stamp}.json")


def describe_failure(exc: BaseException) -> str:
    """One line for an error: its message (type name first unless it is a plain value error)."""
    msg = " ".join(str(exc).split()) or type(exc).__name__
    from ..models import ModelError

    if isinstance(exc, ValueError | ModelError | FileNotFoundError):
        return msg
    return f"{type(exc).__name__}: {msg}"


def usage_like(exc: BaseException) -> bool:
    """Errors that are the user's input even when found at run time (exit status 2)."""
    from ..eval.corpus import CorpusError
    from ..models import ModelNotFoundError
    from ..policy import PolicyModelError

    return isinstance(exc, UsageError | ModelNotFoundError | PolicyModelError | CorpusError)
