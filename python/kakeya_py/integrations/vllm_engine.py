"""The harness side of the vLLM engine: prompt log-probs under the codec phases.

:class:`VLLMEngine` starts ``vllm.LLM`` (``enforce_eager``, prefix caching off, one
sequence at a time, the whole prompt in one prefill step) with the kakeya worker
extension, and drives the hooks of :mod:`kakeya_py.integrations.vllm_plugin` by RPC.
For each passage (``ctx + n_eval + 1`` tokens) it asks for the prompt log-probs of the
true tokens and the top-``k`` at the evaluated positions ``ctx .. ctx+n_eval-1``
(targets: the next tokens), exactly the positions the HF harness scores.

Modes, as in :mod:`kakeya_py.eval.harness`:

- ``snapshot``: request 1 runs codec-off and *captures* the exact prefix K/V of every
  layer (it is also the reference); request 2 *substitutes* the round-tripped snapshot
  for the prefix positions at every layer (exact where the policy keeps a tensor exact),
  while the evaluated positions compute their own exact K/V: HF's prefill → compress →
  evaluate, in two requests.
- ``in-forward``: reference codec-off; codec on positions ``[0, ctx+n_eval)`` in one pass
  (the unscored last target token stays exact, as HF never feeds it).
- ``prefix-in-forward``: reference codec-off; codec on ``[0, ctx)`` in one pass.

Only the top-k is available from vLLM, so KL(ref‖alt) is the KL of the two
distributions *lumped* onto the shared top-k tokens plus one "rest" bucket: a lower
bound of the full KL (data-processing inequality), reported with ``kl_estimator``.
"""

from __future__ import annotations

import gc
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..eval import metrics as M
from ..policy import Ledger
from .vllm_plugin import ENV_ENABLE, ENV_MODE, WORKER_EXTENSION

DEFAULT_TOPK = 20
KL_ESTIMATOR = "lumped top-k lower bound: KL over the shared top-{k} tokens plus one rest bucket"


def vllm_available() -> tuple[bool, str]:
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return False, f"vllm is not importable ({type(exc).__name__}: {exc}); run scripts/install_vllm_cpu.sh"
    return True, ""


def default_env(threads: int | None = None) -> dict[str, str]:
    """CPU defaults for vLLM (applied with setdefault: the caller's environment wins)."""
    cores = (
        sorted(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else list(range(os.cpu_count() or 1))
    )
    if threads:
        cores = cores[:threads]
    return {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(str(c) for c in cores),
    }


@dataclass
class TopK:
    """Prompt log-probs of one passage at the evaluated positions."""

    true_lp: np.ndarray  # [n] log p of the true next token
    top_ids: np.ndarray  # [n, k] token ids by rank
    top_lp: np.ndarray  # [n, k] their log-probs


def topk_from_logits(logits, targets, k: int) -> TopK:
    """The same record from ``[n, vocab]`` logits (HF side), float64 log-softmax."""
    import torch

    lp = torch.log_softmax(logits.double(), dim=-1)
    true = lp.gather(1, torch.as_tensor(targets, dtype=torch.long).reshape(-1, 1))[:, 0]
    top_lp, top_ids = lp.topk(k, dim=-1)
    return TopK(true.numpy(), top_ids.numpy(), top_lp.numpy())


def lumped_kl(p: TopK, q: TopK) -> np.ndarray:
    """KL(p‖q) per position over the shared top-k tokens plus a rest bucket (lower bound)."""
    n = p.true_lp.shape[0]
    out = np.zeros(n)
    for i in range(n):
        pm = dict(zip(p.top_ids[i].tolist(), p.top_lp[i].tolist(), strict=True))
        qm = dict(zip(q.top_ids[i].tolist(), q.top_lp[i].tolist(), strict=True))
        shared = [t for t in pm if t in qm]
        lp = np.array([pm[t] for t in shared], np.float64)
        lq = np.array([qm[t] for t in shared], np.float64)
        kl = float(np.sum(np.exp(lp) * (lp - lq))) if shared else 0.0
        rp = max(0.0, -math.expm1(float(np.logaddexp.reduce(lp)))) if shared else 1.0
        rq = max(0.0, -math.expm1(float(np.logaddexp.reduce(lq)))) if shared else 1.0
        if rp > 0:
            kl += rp * (math.log(rp) - math.log(max(rq, 1e-300)))
        out[i] = max(kl, 0.0)
    return out


def topk_passage_tokens(ref: TopK, alt: TopK) -> M.PassageTokens:
    return M.PassageTokens(
        ref.true_lp,
        alt.true_lp,
        ref.top_ids[:, 0] == alt.top_ids[:, 0],
        lumped_kl(ref, alt),
    )


class VLLMEngine:
    """One ``vllm.LLM`` with the kakeya hooks, for prompts up to ``max_len`` tokens
    (``progress=False``: no weight-loading bar)."""

    def __init__(
        self,
        model_path: str,
        dtype: str = "float32",
        *,
        max_len: int,
        topk: int = DEFAULT_TOPK,
        threads: int | None = None,
        in_process: bool | None = None,
        seed: int = 0,
        progress: bool = True,
    ):
        for key, value in default_env(threads).items():
            os.environ.setdefault(key, value)
        os.environ[ENV_ENABLE] = "1"
        os.environ.setdefault(ENV_MODE, "off")
        if in_process is not None:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
        from vllm import LLM

        self.topk = topk
        self.max_len = max_len
        self.threads = threads
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            enforce_eager=True,
            max_model_len=max_len + 1,  # the prompt plus the one generated token vLLM requires
            max_num_batched_tokens=max(max_len, 256),
            max_num_seqs=1,
            enable_prefix_caching=False,
            seed=seed,
            max_logprobs=topk,
            worker_extension_cls=WORKER_EXTENSION,
            use_tqdm_on_load=progress,  # the weight-loading bar (kakeya --no-progress)
        )
        self.plugin = self.rpc("kakeya_info")
        self.dtype_used = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001
                pass
            del llm
        gc.collect()

    def rpc(self, method: str, *args) -> Any:
        results = self.llm.collective_rpc(method, args=args)
        return results[0]

    def configure(self, policy) -> dict[str, Any]:
        return self.rpc("kakeya_configure", None if policy is None else policy.to_dict(), self.threads)

    def set_phase(self, phase: str, *, end: int | None = None, prefix: int | None = None) -> None:
        self.rpc("kakeya_set_phase", phase, end, prefix, True)

    def take_ledger(self) -> Ledger:
        led = Ledger()
        for layer, stream, raw, stored, compressed in self.rpc("kakeya_take_ledger"):
            key = (int(layer), str(stream))
            led.raw[key] += int(raw)
            led.stored[key] += int(stored)
            led.compressed[key] |= bool(compressed)
        return led

    def prompt_topk(self, ids: Sequence[int], first: int, last: int) -> TopK:
        """Log-probs of ``ids[first:last]`` given their prefixes, with the top-k."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sp = SamplingParams(max_tokens=1, prompt_logprobs=self.topk, detokenize=False, temperature=0.0)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=list(map(int, ids)))], sp, use_tqdm=False)
        plp = out[0].prompt_logprobs
        n = last - first
        true_lp = np.zeros(n)
        top_ids = np.zeros((n, self.topk), dtype=np.int64)
        top_lp = np.full((n, self.topk), -np.inf)
        for i, j in enumerate(range(first, last)):
            d = plp[j]
            true_lp[i] = d[int(ids[j])].logprob
            ranked = sorted(((v.rank, t, v.logprob) for t, v in d.items() if v.rank <= self.topk))
            for r, (_, t, lp) in enumerate(ranked[: self.topk]):
                top_ids[i, r] = t
                top_lp[i, r] = lp
        return TopK(true_lp, top_ids, top_lp)

    # -- harness modes ---------------------------------------------------------------------------
    def run_passage(self, passage, mode: str) -> tuple[TopK, TopK, Ledger, float, float]:
        """``(ref, alt, ledger, ref_seconds, codec_seconds)`` of one passage."""
        ids = list(passage.token_ids[: passage.ctx + passage.n_eval + 1])
        ctx, n_eval = passage.ctx, passage.n_eval
        first, last = ctx + 1, ctx + n_eval + 1
        self.take_ledger()
        t0 = time.perf_counter()
        if mode == "snapshot":
            self.set_phase("capture", prefix=ctx)
        else:
            self.set_phase("off")
        ref = self.prompt_topk(ids, first, last)
        t1 = time.perf_counter()
        if mode == "snapshot":
            self.set_phase("substitute", prefix=ctx)
        elif mode == "in-forward":
            self.set_phase("in-forward", end=ctx + n_eval)
        elif mode == "prefix-in-forward":
            self.set_phase("prefix-in-forward", prefix=ctx)
        else:
            raise ValueError(f"unknown mode {mode!r}")
        alt = self.prompt_topk(ids, first, last)
        t2 = time.perf_counter()
        self.set_phase("off")
        return ref, alt, self.take_ledger(), t1 - t0, t2 - t1

    def run(self, passages, policy, mode: str, *, progress: bool = True, desc: str = "vllm"):
        """Every passage: ``(tokens, ledger, ref_seconds, codec_seconds, raw)``."""
        from tqdm.auto import tqdm

        self.configure(policy)
        self.rpc("kakeya_take_left_exact")
        tokens, ledger, ref_s, codec_s, raw = [], Ledger(), 0.0, 0.0, []
        for passage in tqdm(passages, desc=desc, disable=not progress, unit="passage"):
            ref, alt, led, rs, cs = self.run_passage(passage, mode)
            tokens.append(topk_passage_tokens(ref, alt))
            ledger.merge(led)
            ref_s += rs
            codec_s += cs
            raw.append((ref, alt))
        self.left_exact = self.rpc("kakeya_take_left_exact")
        return tokens, ledger, ref_s, codec_s, raw
