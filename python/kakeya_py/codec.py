"""The codec's Python face: numpy arrays and torch tensors in, the same type out.

Arrays cross into Rust without a copy where the layout allows it (f32 as is, f16/bf16 as
their raw uint16 bits); the Rust side releases the GIL and works over (head, block) jobs
in parallel. A CUDA tensor is copied to host and the result is returned on its device.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from . import _kakeya
from ._kakeya import CodecConfig, DTypeError, ShapeError

# Codec-level presets (one stream). Policy presets for whole caches live in policy.py.
PRESETS: dict[str, dict[str, Any]] = {
    "identity": {"identity": True},
    "default": {},
    "mse-4bit": {"bits": 4, "block_size": 4096, "share_basis": True, "outlier_threshold": 3.0},
    "mse-3bit": {"bits": 3, "block_size": 4096, "share_basis": True, "outlier_threshold": 3.0},
    "mse-2bit": {"bits": 2, "block_size": 4096, "share_basis": True, "outlier_threshold": 3.0},
    # Bits follow component variance (docs/codec.md, allocation "variance"); same budget.
    "var-4bit": {
        "bits": 4,
        "block_size": 4096,
        "share_basis": True,
        "outlier_threshold": 3.0,
        "allocation": "variance",
    },
    "var-3bit": {
        "bits": 3,
        "block_size": 4096,
        "share_basis": True,
        "outlier_threshold": 3.0,
        "allocation": "variance",
    },
    "var-2bit": {
        "bits": 2,
        "block_size": 4096,
        "share_basis": True,
        "outlier_threshold": 3.0,
        "allocation": "variance",
    },
}


def preset(name: str) -> CodecConfig:
    """The codec config registered under ``name`` (see ``PRESETS``)."""
    if name not in PRESETS:
        raise _kakeya.ConfigError(f"unknown codec preset {name!r}; known: {sorted(PRESETS)}")
    return CodecConfig.from_dict(dict(PRESETS[name]))


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "device")


def _numpy_raw(x: np.ndarray) -> tuple[np.ndarray, str]:
    if not x.flags.c_contiguous:
        raise ShapeError(f"input must be C-contiguous (got strides {x.strides}); use np.ascontiguousarray")
    if x.dtype == np.float32:
        return x, "f32"
    if x.dtype == np.float16:
        return x.view(np.uint16), "f16"
    if x.dtype.name == "bfloat16":  # ml_dtypes
        return x.view(np.uint16), "bf16"
    raise DTypeError(f"unsupported dtype {x.dtype}; expected float32, float16 or bfloat16")


def _torch_raw(x: Any) -> tuple[np.ndarray, str]:
    import torch

    names = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
    if x.dtype not in names:
        raise DTypeError(f"unsupported dtype {x.dtype}; expected torch.float32, float16 or bfloat16")
    if not x.is_contiguous():
        raise ShapeError(f"input must be contiguous (got stride {tuple(x.stride())}); call .contiguous()")
    host = x.detach()
    if host.device.type == "meta":
        raise DTypeError("a tensor on the meta device holds no values to encode")
    if host.device.type != "cpu":
        host = host.cpu()
    name = names[x.dtype]
    if name == "f32":
        return host.numpy(), name
    return host.view(torch.int16).numpy().view(np.uint16), name


def _as_raw(x: Any) -> tuple[np.ndarray, str, dict[str, Any]]:
    """``(array, dtype name, origin)``; origin says how to rebuild the caller's type."""
    if _is_torch(x):
        raw, name = _torch_raw(x)
        return raw, name, {"kind": "torch", "device": x.device}
    if isinstance(x, np.ndarray):
        raw, name = _numpy_raw(x)
        return raw, name, {"kind": "numpy"}
    raise DTypeError(f"expected a numpy array or torch tensor, got {type(x).__name__}")


def _as_f32_array(matrix: Any) -> np.ndarray:
    if _is_torch(matrix):
        matrix = matrix.detach().cpu().float().numpy()
    return np.ascontiguousarray(matrix, dtype=np.float32)


def _rebuild_encoded(data: bytes, origin: dict[str, Any]) -> Encoded:
    return Encoded(_kakeya.Encoded.from_bytes(data), origin)


class Encoded:
    """An encoding: its bytes are the measured size of what was compressed.

    Attributes:
        nbytes: length of the serialized bytes.
        ratio: input size at bf16 over ``nbytes``.
        shape, dtype, config, scale_dtype, block_ranks: as stored in the header.
    """

    __slots__ = ("_inner", "_origin")

    def __init__(self, inner: _kakeya.Encoded, origin: dict[str, Any] | None = None):
        self._inner = inner
        self._origin = origin or {"kind": "numpy"}

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Encoded:
        """Parses and validates serialized bytes; decodes to numpy by default."""
        return cls(_kakeya.Encoded.from_bytes(bytes(data)))

    def to_bytes(self) -> bytes:
        return self._inner.to_bytes()

    @property
    def nbytes(self) -> int:
        return self._inner.nbytes

    @property
    def ratio(self) -> float:
        return self._inner.ratio

    @property
    def shape(self) -> tuple[int, int, int]:
        return self._inner.shape

    @property
    def dtype(self) -> str:
        return self._inner.dtype

    @property
    def config(self) -> CodecConfig:
        return self._inner.config

    @property
    def scale_dtype(self) -> str:
        return self._inner.scale_dtype

    @property
    def block_ranks(self) -> list[int]:
        return self._inner.block_ranks

    def header(self) -> dict[str, Any]:
        return self._inner.header()

    def __len__(self) -> int:
        return self.nbytes

    def __bytes__(self) -> bytes:
        return self.to_bytes()

    def __eq__(self, other: object) -> bool:
        """Equal encodings are the same bytes (whatever type each decodes to)."""
        if not isinstance(other, Encoded):
            return NotImplemented
        return self.to_bytes() == other.to_bytes()

    def __hash__(self) -> int:
        return hash(self.to_bytes())

    def __reduce__(self):
        # Pickles as its bytes, plus what decode needs to return the caller's type and device.
        return (_rebuild_encoded, (self.to_bytes(), self._origin))

    def __repr__(self) -> str:
        return (
            f"Encoded(shape={self.shape}, dtype='{self.dtype}', nbytes={self.nbytes}, "
            f"ratio={self.ratio:.3f}, bits={self.config.bits}, allocation='{self.config.allocation}', "
            f"identity={self.config.identity})"
        )


def encode(x: Any, config: CodecConfig, *, preconditioner: Any = None, threads: int | None = None) -> Encoded:
    """Encodes ``x`` of shape ``[tokens, kv_heads, head_dim]``.

    Args:
        x: C-contiguous numpy array (float32/float16/bfloat16) or torch tensor (any device).
        config: a :class:`CodecConfig`.
        preconditioner: ``[kv_heads, D, D]`` lower-triangular factor ``L`` (metric
            ``inner_product`` only); numpy or torch.
        threads: worker threads (``None``: every core). Output bytes never depend on it.

    Returns:
        :class:`Encoded`.

    Example:
        >>> import numpy as np, kakeya_py
        >>> x = np.random.default_rng(0).standard_normal((256, 2, 64), dtype=np.float32)
        >>> enc = kakeya_py.encode(x, kakeya_py.CodecConfig(bits=4))
        >>> kakeya_py.decode(enc).shape
        (256, 2, 64)
    """
    if not isinstance(config, CodecConfig):
        raise TypeError(f"config must be a kakeya_py.CodecConfig, got {type(config).__name__}")
    raw, name, origin = _as_raw(x)
    origin["dtype"] = getattr(x, "dtype", None)
    pre = None if preconditioner is None else _as_f32_array(preconditioner)
    return Encoded(_kakeya.encode_array(raw, name, config, pre, threads), origin)


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None or isinstance(dtype, str):
        return {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}.get(dtype, dtype)
    text = str(dtype).replace("torch.", "")
    names = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
    if text not in names:
        raise DTypeError(f"unsupported output dtype {dtype}; expected float32, float16 or bfloat16")
    return names[text]


def decode(enc: Encoded | bytes, dtype: Any = None, *, threads: int | None = None) -> Any:
    """Decodes to the input's type (numpy/torch), shape, device and dtype.

    ``dtype`` (``"f32"``, ``np.float16``, ``torch.bfloat16``, ...) overrides the dtype. An
    encoding read from bytes decodes to numpy (bf16 as float32, numpy having no bfloat16).
    """
    if not isinstance(enc, Encoded):
        enc = Encoded.from_bytes(enc)
    want = _dtype_name(dtype)
    torch_out = enc._origin["kind"] == "torch"
    if not torch_out and want is None and enc.dtype == "bf16":
        want = "f32"
    if not torch_out and want == "bf16":
        raise DTypeError("numpy has no bfloat16; decode with dtype='f32' or to a torch tensor")
    array, name = enc._inner.decode(want, threads)
    if torch_out:
        import torch

        if name == "f32":
            out = torch.from_numpy(array)
        else:
            out = torch.from_numpy(array.view(np.int16)).view(
                torch.float16 if name == "f16" else torch.bfloat16
            )
        device = enc._origin["device"]
        return out if device.type == "cpu" else out.to(device)
    return array if name == "f32" else array.view(np.float16)


def roundtrip(
    x: Any, config: CodecConfig, *, preconditioner: Any = None, threads: int | None = None
) -> tuple[Any, int]:
    """``(decode(encode(x)), measured nbytes)``: the harness's view of the codec."""
    enc = encode(x, config, preconditioner=preconditioner, threads=threads)
    return decode(enc, threads=threads), enc.nbytes


def _after_fork_in_child() -> None:
    # The parent's Rust thread pools do not exist in a forked child.
    _kakeya.disable_parallelism_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
