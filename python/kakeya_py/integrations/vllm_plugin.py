"""The kakeya K/V round trip inside vLLM: a ``vllm.general_plugins`` entry point.

vLLM calls :func:`register` in every process it starts (the API process, the engine core,
each worker); ``pyproject.toml`` declares it as ``kakeya = "kakeya_py.integrations.vllm_plugin:register"``.
:func:`register` is idempotent and cheap: it wraps ``BaseModelLoader.load_model`` so that,
when the environment asks for it, the hooks are installed on the model right after its
weights are loaded (in the process that runs the model). Environment:

- ``KAKEYA_VLLM_POLICY``: a policy preset name or JSON file (:func:`kakeya_py.policy.load_policy`);
  setting it turns the codec on.
- ``KAKEYA_VLLM_MODE``: ``in-forward`` (default: every prefill position's K/V round-tripped),
  ``prefix-in-forward`` (only positions ``< KAKEYA_VLLM_PREFIX``) or ``off`` (hooks
  installed, codec idle; the harness drives it by RPC).
- ``KAKEYA_VLLM=1``: install the hooks (idle) even without a policy.
- ``KAKEYA_VLLM_THREADS``: codec threads.

**Where the codec acts** (the same places as :mod:`kakeya_py.eval.hooks` in transformers): in
vLLM's Llama / Mistral / Qwen2 / Qwen3 attention, ``qkv_proj`` is split into q, k, v,
(Qwen3: ``k_norm`` applied), then ``rotary_emb(positions, q, k)`` and ``attn(q, k, v)``.
A forward pre-hook on ``rotary_emb`` replaces **K before RoPE** (after ``k_norm``); a
pre-hook on the inner ``attn`` replaces **V as produced** (and K after RoPE with
``k_position="post_rope"``). A pre-hook on the attention module tells them which layer
and which token positions are running. Layer selection, exact boundary layers, per-layer
overrides and streams come from :class:`kakeya_py.policy.PolicyCodec`, as in HF.

vLLM flattens a batch into ``[tokens, heads*dim]``; the hooks split it into sequences by
their positions (a new sequence starts where the position does not follow the previous
one) and give the codec one ``[tokens, kv_heads, head_dim]`` tensor per sequence.

**Phases** (set by the harness through :class:`KakeyaWorkerExtension`):

- ``off``: nothing changes.
- ``in-forward``: positions ``[0, end)`` of each sequence round-tripped (``end=None``: all).
- ``prefix-in-forward``: positions ``[0, prefix)`` round-tripped.
- ``capture``: codec off; the exact K (pre- or post-RoPE) and V of positions
  ``[0, prefix)`` are kept per layer. Used on the reference pass of ``snapshot``.
- ``substitute``: positions ``[0, prefix)`` of **every** layer and stream are replaced by
  the captured snapshot, round-tripped where the policy compresses that (layer, stream)
  and exact elsewhere; later positions keep their own exact K/V. This is HF's
  ``snapshot`` mode (prefill exact, compress the cache once, evaluate against it): the
  evaluated positions see exactly the compressed exact-prefix cache at every layer.

Requires ``enforce_eager=True`` (Python-level hooks must run; no CUDA graphs) and, for
the harness phases, each prompt prefilled in one step (``max_num_batched_tokens`` ≥
prompt length; chunked continuations are refused in the strict harness phases).

**What stays exact, counted.** Outside the strict phases a segment that does not start at
position 0 is left exact: a decode step (one token) or a chunked-prefill continuation /
prefix-cache hit (several). Their tokens are counted per layer and stream
(:meth:`KakeyaVLLMState.take_left_exact`, ``kakeya_take_left_exact`` by RPC, and in
:meth:`~KakeyaVLLMState.info`), so a report can say how much of the cache the codec never saw.
**Tensor parallelism** > 1 is refused: each rank holds a slice of the heads, and a ledger
read from one rank would not describe the cache.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from typing import Any

ENV_POLICY = "KAKEYA_VLLM_POLICY"
ENV_MODE = "KAKEYA_VLLM_MODE"
ENV_PREFIX = "KAKEYA_VLLM_PREFIX"
ENV_ENABLE = "KAKEYA_VLLM"
ENV_THREADS = "KAKEYA_VLLM_THREADS"

PHASES = ("off", "in-forward", "prefix-in-forward", "capture", "substitute")
ENV_MODES = ("off", "in-forward", "prefix-in-forward")

#: ``worker_extension_cls`` to pass to ``vllm.LLM`` for RPC control.
WORKER_EXTENSION = "kakeya_py.integrations.vllm_plugin.KakeyaWorkerExtension"

_LOCK = threading.Lock()
_MARK = "_kakeya_wrapped"


class VLLMHookError(RuntimeError):
    """The vLLM model's attention layout is not one the hooks understand, or a phase is misused."""


# -- registration ------------------------------------------------------------------------------
def register() -> None:
    """The ``vllm.general_plugins`` entry point (idempotent; called in every vLLM process)."""
    try:
        from vllm.model_executor.model_loader import base_loader
    except Exception:  # noqa: BLE001 - a vLLM without this module: nothing to wrap
        return
    with _LOCK:
        cls = base_loader.BaseModelLoader
        if getattr(cls.load_model, _MARK, False):
            return
        original = cls.load_model

        def load_model(self, *args, **kwargs):
            model = original(self, *args, **kwargs)
            if enabled_by_env():
                install(model)
            return model

        setattr(load_model, _MARK, True)
        load_model.__wrapped__ = original  # type: ignore[attr-defined]
        cls.load_model = load_model


def enabled_by_env() -> bool:
    return bool(os.environ.get(ENV_POLICY)) or os.environ.get(ENV_ENABLE, "") not in ("", "0")


# -- sites --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VLLMSite:
    """One attention layer of a vLLM model."""

    layer: int
    name: str
    attn_module: Any  # LlamaAttention / Qwen2Attention / Qwen3Attention ...
    rotary: Any  # rotary_emb (may be shared by all layers)
    inner: Any  # the vLLM Attention layer: forward(q, k, v)
    num_kv_heads: int
    head_dim: int


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def find_vllm_sites(model) -> list[VLLMSite]:
    """Attention layers of a vLLM decoder model (split-qkv + rotary + attn layout)."""
    sites = []
    for name, mod in model.named_modules():
        if not all(hasattr(mod, a) for a in ("qkv_proj", "rotary_emb", "attn", "o_proj")):
            continue
        m = _LAYER_RE.search(name)
        if m is None:
            raise VLLMHookError(f"cannot tell the layer index of attention module {name!r}")
        kv_heads = int(getattr(mod, "num_kv_heads", 0))
        head_dim = int(getattr(mod, "head_dim", 0))
        kv_size = int(getattr(mod, "kv_size", 0))
        if not kv_heads or not head_dim or kv_heads * head_dim != kv_size:
            raise VLLMHookError(
                f"{type(mod).__name__} at {name}: num_kv_heads={kv_heads}, head_dim={head_dim}, kv_size={kv_size}"
            )
        sites.append(VLLMSite(int(m.group(1)), name, mod, mod.rotary_emb, mod.attn, kv_heads, head_dim))
    if not sites:
        raise VLLMHookError(
            f"no attention layers with qkv_proj/rotary_emb/attn/o_proj in {type(model).__name__} "
            "(the kakeya vLLM hooks support Llama, Mistral, Qwen2 and Qwen3)"
        )
    sites.sort(key=lambda s: s.layer)
    if [s.layer for s in sites] != list(range(len(sites))):
        raise VLLMHookError(
            f"attention layer indices are not 0..{len(sites) - 1}: {[s.layer for s in sites]}"
        )
    return sites


def _segments(positions) -> list[tuple[int, int, int]]:
    """``[(start, end, first_position)]`` flat token ranges of consecutive positions."""
    pos = positions.reshape(-1).tolist()
    out = []
    start = 0
    for i in range(1, len(pos) + 1):
        if i == len(pos) or pos[i] != pos[i - 1] + 1:
            out.append((start, i, pos[start]))
            start = i
    return out


# -- state ----------------------------------------------------------------------------------------
class KakeyaVLLMState:
    """The hooks and codec state of one process (one per model; see :func:`install`)."""

    def __init__(self, model, origin: str = "plugin"):
        self.model = model
        self.origin = origin
        self.sites = find_vllm_sites(model)
        self.num_layers = len(self.sites)
        self.codec = None  # PolicyCodec
        self.policy = None
        self.k_position = "pre_rope"
        self.phase = "off"
        self.end: int | None = None
        self.prefix: int | None = None
        self.strict = False
        self.ledger = None
        self.snapshot: dict[tuple[int, str], Any] = {}
        self.replacement: dict[tuple[int, str], Any] = {}
        self.record_events = False
        self.events: list[tuple[int, str, str, int]] = []  # (layer, stream, where, tokens)
        #: tokens left exact since the last take: {"decode" | "continuation": tokens} over
        #: every (layer, stream) the phase would have touched
        self.left_exact: dict[str, int] = {"decode": 0, "continuation": 0}
        self._current: tuple[int, Any] | None = None
        self._handles: list[Any] = []
        self._install()

    # -- installation ----------------------------------------------------------------------------
    def _install(self) -> None:
        rotaries = {}
        for site in self.sites:
            self._handles.append(
                site.attn_module.register_forward_pre_hook(self._enter(site), with_kwargs=True)
            )
            self._handles.append(site.attn_module.register_forward_hook(self._leave))
            self._handles.append(site.inner.register_forward_pre_hook(self._inner_hook, with_kwargs=True))
            rotaries[id(site.rotary)] = site.rotary
        for rotary in rotaries.values():
            self._handles.append(rotary.register_forward_pre_hook(self._rotary_hook, with_kwargs=True))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _enter(self, site: VLLMSite):
        def hook(_module, args, kwargs):
            positions = kwargs.get("positions", args[0] if args else None)
            self._current = (site.layer, positions)

        return hook

    def _leave(self, _module, _inputs, _output):
        self._current = None

    # -- configuration ---------------------------------------------------------------------------
    def configure(self, policy: Any = None, *, threads: int | None = None) -> dict[str, Any]:
        """Set the policy (a :class:`Policy`, its dict, a preset name or file; None = no codec)."""
        from ..policy import Ledger, Policy, PolicyCodec, load_policy, load_sigma_q

        if policy is None:
            self.policy, self.codec = None, None
        else:
            if isinstance(policy, str) and policy.lstrip().startswith("{"):
                policy = json.loads(policy)
            if isinstance(policy, str):
                policy = load_policy(policy)
            elif isinstance(policy, dict) and "peer" in policy:  # a peer method (kakeya_py.peers)
                from ..peers import PeerPolicy

                policy = PeerPolicy.from_dict(policy)
            elif isinstance(policy, dict):
                policy = Policy.from_dict(policy, name=policy.get("name"))
            sigma = None
            if getattr(policy, "peer", False):
                self.policy, self.codec, self.k_position = policy, policy, policy.k_position
                self.ledger = Ledger()
                self.snapshot.clear()
                self.replacement.clear()
                return self.info()
            if policy.sigma_q:
                s0 = self.sites[0]
                sigma = load_sigma_q(
                    policy.sigma_q,
                    num_layers=self.num_layers,
                    num_kv_heads=s0.num_kv_heads,
                    head_dim=s0.head_dim,
                )
            self.policy = policy
            self.codec = PolicyCodec(policy, self.num_layers, sigma_q=sigma, threads=threads)
            self.k_position = policy.k_position
        self.ledger = Ledger()
        self.snapshot.clear()
        self.replacement.clear()
        return self.info()

    def set_phase(
        self, phase: str, *, end: int | None = None, prefix: int | None = None, strict: bool = True
    ) -> None:
        if phase not in PHASES:
            raise VLLMHookError(f"phase must be one of {PHASES}, got {phase!r}")
        if phase in ("prefix-in-forward", "capture", "substitute") and not prefix:
            raise VLLMHookError(f"phase {phase!r} needs prefix > 0")
        if phase in ("in-forward", "prefix-in-forward", "substitute") and self.codec is None:
            raise VLLMHookError(f"phase {phase!r} needs a policy (configure first)")
        if phase == "substitute" and not self.snapshot:
            raise VLLMHookError("phase 'substitute' needs a captured snapshot (run a 'capture' pass first)")
        if phase == "capture":
            self.snapshot.clear()
            self.replacement.clear()
        self.phase, self.end, self.prefix, self.strict = phase, end, prefix, strict

    def info(self) -> dict[str, Any]:
        s0 = self.sites[0]
        return {
            "installed": True,
            "num_layers": self.num_layers,
            "num_kv_heads": s0.num_kv_heads,
            "head_dim": s0.head_dim,
            "attention_class": type(s0.attn_module).__name__,
            "rotary_class": type(s0.rotary).__name__,
            "inner_class": type(s0.inner).__name__,
            "rotary_shared": len({id(s.rotary) for s in self.sites}) == 1,
            "policy": None if self.policy is None else self.policy.to_dict(),
            "k_position": self.k_position,
            "phase": self.phase,
            "pid": os.getpid(),
            "origin": self.origin,
            "left_exact": dict(self.left_exact),
            "tensor_parallel_size": 1,
        }

    def take_left_exact(self) -> dict[str, int]:
        """Tokens × (layer, stream) left exact since the last call (module doc), then reset."""
        out = dict(self.left_exact)
        self.left_exact = {"decode": 0, "continuation": 0}
        return out

    def take_ledger(self) -> list[list[Any]]:
        """The byte ledger since the last call, as ``[layer, stream, raw, stored, compressed]`` rows."""
        from ..policy import Ledger

        led = self.ledger or Ledger()
        rows = [[k[0], k[1], led.raw[k], led.stored[k], bool(led.compressed[k])] for k in sorted(led.raw)]
        self.ledger = Ledger()
        return rows

    # -- hooks -----------------------------------------------------------------------------------
    def _rotary_hook(self, _module, args, kwargs):
        if self._current is None or self.phase == "off":
            return None
        layer, positions = self._current
        key_in_kwargs = "key" in kwargs
        k = kwargs["key"] if key_in_kwargs else (args[2] if len(args) > 2 else None)
        if k is None or self.k_position != "pre_rope":
            return None
        new = self._process(layer, "k", k, positions)
        if new is None:
            return None
        if key_in_kwargs:
            return args, {**kwargs, "key": new}
        return (*args[:2], new, *args[3:]), kwargs

    def _inner_hook(self, _module, args, kwargs):
        if self._current is None or self.phase == "off":
            return None
        layer, positions = self._current
        names = ("query", "key", "value")
        vals = [
            kwargs[n] if n in kwargs else (args[i] if len(args) > i else None) for i, n in enumerate(names)
        ]
        changed = False
        if self.k_position == "post_rope" and vals[1] is not None:
            new_k = self._process(layer, "k", vals[1], positions)
            if new_k is not None:
                vals[1], changed = new_k, True
        if vals[2] is not None:
            new_v = self._process(layer, "v", vals[2], positions)
            if new_v is not None:
                vals[2], changed = new_v, True
        if not changed:
            return None
        new_args = list(args)
        new_kwargs = dict(kwargs)
        for i, n in enumerate(names):
            if n in kwargs:
                new_kwargs[n] = vals[i]
            elif len(args) > i:
                new_args[i] = vals[i]
        return tuple(new_args), new_kwargs

    def _window(self) -> tuple[int, int | None]:
        if self.phase == "in-forward":
            return 0, self.end
        return 0, self.prefix

    def _process(self, layer: int, stream: str, x, positions):
        """Apply the phase to ``x [tokens, kv_heads*head_dim]``; the replacement or None."""
        site = self.sites[layer]
        heads, dim = site.num_kv_heads, site.head_dim
        n_tok = x.shape[0]
        if positions is None or positions.reshape(-1).shape[0] < n_tok:
            raise VLLMHookError(f"layer {layer}: no positions for {n_tok} tokens")
        pos = positions.reshape(-1)[:n_tok]
        out = None
        for a, b, p0 in _segments(pos):
            lo, hi = self._window()
            first = max(lo, p0)
            last = (p0 + (b - a)) if hi is None else min(hi, p0 + (b - a))
            if last <= first:
                continue
            if p0 != 0:
                if self.strict:
                    raise VLLMHookError(
                        f"layer {layer}: a sequence arrives from position {p0} (chunked prefill or a cached "
                        "prefix); the harness needs each prompt prefilled in one step "
                        "(raise max_num_batched_tokens, disable prefix caching)"
                    )
                self.left_exact["decode" if b - a == 1 else "continuation"] += last - first
                continue
            s, e = a + first - p0, a + last - p0
            xs = x[s:e].reshape(e - s, heads, dim)
            if self.record_events:
                self.events.append((layer, stream, self.phase, e - s))
            rep = self._phase_tensor(layer, stream, xs)
            if rep is None:
                continue
            if out is None:
                out = x.clone() if x.is_contiguous() else x.contiguous().clone()
            out[s:e] = rep.reshape(e - s, heads * dim).to(out.dtype)
        return out

    def _phase_tensor(self, layer: int, stream: str, xs):
        """The replacement of one sequence's window ``[n, heads, dim]`` (None = unchanged)."""
        phase = self.phase
        if phase == "capture":
            self.snapshot[(layer, stream)] = xs.detach().clone()
            return None
        if phase == "substitute":
            key = (layer, stream)
            if key not in self.replacement:
                exact = self.snapshot.get(key)
                if exact is None:
                    raise VLLMHookError(f"no captured snapshot for layer {layer} {stream}")
                new, nbytes = self.codec.roundtrip(layer, stream, exact)
                self.ledger.add(layer, stream, exact.numel(), nbytes)
                self.replacement[key] = new
            rep = self.replacement[key]
            if rep.shape[0] < xs.shape[0]:
                raise VLLMHookError(
                    f"layer {layer} {stream}: snapshot holds {rep.shape[0]} positions, {xs.shape[0]} needed"
                )
            return rep[: xs.shape[0]]
        # in-forward / prefix-in-forward
        new, nbytes = self.codec.roundtrip(layer, stream, xs.contiguous())
        self.ledger.add(layer, stream, xs.numel(), nbytes)
        return None if nbytes is None else new


# -- installation --------------------------------------------------------------------------------
_STATES: dict[int, KakeyaVLLMState] = {}


def install(
    model, *, policy: Any = "env", mode: str | None = None, origin: str = "plugin"
) -> KakeyaVLLMState:
    """Install the hooks on a loaded vLLM model (idempotent: the same state is returned).

    ``policy="env"`` reads :data:`ENV_POLICY`, :data:`ENV_MODE`, :data:`ENV_PREFIX`.
    """
    with _LOCK:
        state = getattr(model, "_kakeya_state", None)
        if state is not None:
            return state
        tp = tensor_parallel_size()
        if tp > 1:
            raise VLLMHookError(
                f"tensor_parallel_size={tp}: kakeya's vLLM hooks support one rank only (each rank holds a "
                "slice of the kv heads, and the byte ledger and the harness read rank 0); run with "
                "tensor_parallel_size=1"
            )
        state = KakeyaVLLMState(model, origin)
        model._kakeya_state = state
        _STATES[id(model)] = state
    threads = os.environ.get(ENV_THREADS)
    threads_n = int(threads) if threads else None
    if policy == "env":
        spec = os.environ.get(ENV_POLICY) or None
        mode = mode or os.environ.get(ENV_MODE) or ("in-forward" if spec else "off")
        if mode not in ENV_MODES:
            raise VLLMHookError(f"{ENV_MODE} must be one of {ENV_MODES}, got {mode!r}")
        state.configure(spec, threads=threads_n)
        if spec and mode != "off":
            prefix = int(os.environ.get(ENV_PREFIX, "0")) or None
            state.set_phase(mode, prefix=prefix, strict=False)
    else:
        state.configure(policy, threads=threads_n)
        if mode:
            state.set_phase(mode, strict=False)
    return state


def tensor_parallel_size() -> int:
    """vLLM's tensor-parallel world size in this process (1 when it is not initialised)."""
    try:
        from vllm.distributed import get_tensor_model_parallel_world_size

        return int(get_tensor_model_parallel_world_size())
    except Exception:  # noqa: BLE001  (no vLLM, or its parallel state is not set up: one rank)
        return 1


def state_of(model) -> KakeyaVLLMState | None:
    return getattr(model, "_kakeya_state", None)


def policy_env(policy, mode: str = "off") -> dict[str, str]:
    """Environment for an engine whose workers should load ``policy`` (a Policy or spec)."""
    env = {ENV_ENABLE: "1", ENV_MODE: mode}
    if policy is not None:
        env[ENV_POLICY] = policy if isinstance(policy, str) else json.dumps(policy.to_dict())
    return env


class KakeyaWorkerExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``); methods are called by
    ``LLM.collective_rpc("kakeya_...", args=...)`` and return plain data."""

    def _kakeya_state(self) -> KakeyaVLLMState:
        model = self.model_runner.model  # type: ignore[attr-defined]
        state = state_of(model)
        if state is None:  # the plugin did not run in this process: install now, idle
            state = install(model, policy=None, origin="worker-extension")
        return state

    def kakeya_info(self) -> dict[str, Any]:
        return self._kakeya_state().info()

    def kakeya_configure(self, policy: Any = None, threads: int | None = None) -> dict[str, Any]:
        return self._kakeya_state().configure(policy, threads=threads)

    def kakeya_set_phase(
        self, phase: str, end: int | None = None, prefix: int | None = None, strict: bool = True
    ) -> str:
        self._kakeya_state().set_phase(phase, end=end, prefix=prefix, strict=strict)
        return phase

    def kakeya_take_ledger(self) -> list[list[Any]]:
        return self._kakeya_state().take_ledger()

    def kakeya_take_left_exact(self) -> dict[str, int]:
        return self._kakeya_state().take_left_exact()

    def kakeya_snapshot(self) -> dict[str, list]:
        """The captured exact prefix K/V as nested lists ``{"layer.stream": [n][heads][dim]}`` (tests)."""
        state = self._kakeya_state()
        return {
            f"{layer}.{stream}": t.float().tolist() for (layer, stream), t in sorted(state.snapshot.items())
        }

    def kakeya_record_events(self, on: bool = True) -> list[list[Any]]:
        """Start (``on``) or stop recording hook calls; returns and clears what was recorded."""
        state = self._kakeya_state()
        events = [list(e) for e in state.events]
        state.events.clear()
        state.record_events = bool(on)
        return events
