"""Shared fixtures: tiny random Llama / Mistral / Qwen2 / Qwen3 models built from configs.

No download: each model is created from a config with a fixed seed, float32, eval mode.
They are small enough that a forward pass over 64 tokens takes milliseconds, but keep
the real structure (GQA with 4 query heads per 2 kv heads, RoPE, Qwen3's q/k norms).
"""

from __future__ import annotations

import pytest
import torch

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def tiny_config(arch: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    if arch == "llama":
        return LlamaConfig(**TINY)
    if arch == "mistral":
        return MistralConfig(**TINY, sliding_window=None)
    if arch == "qwen2":
        return Qwen2Config(**TINY, use_sliding_window=False)
    if arch == "qwen3":
        return Qwen3Config(**TINY, head_dim=16, use_sliding_window=False)
    raise ValueError(arch)


def tiny_model(arch: str, attn: str = "sdpa", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    cfg._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _scale_qkv(model)
    return model.eval()


def _scale_qkv(model) -> None:
    """Random init gives near-uniform attention; make Q/K/V larger so the codec matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("k_proj.weight", "q_proj.weight", "v_proj.weight")):
                p.mul_(4.0)


def _save_word_tokenizer(folder) -> None:
    """The word-level tokenizer over ``t0`` … ``t255`` every tiny model folder carries."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(TINY["vocab_size"])}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="t0", bos_token="t1", eos_token="t2"
    ).save_pretrained(folder)


def save_tiny_llama(folder, **overrides) -> None:
    """A tiny random Llama (``TINY`` with ``overrides``, seed 0) and a word-level tokenizer
    over ``t0`` … ``t255``, saved as an HF folder for the CLI and vLLM."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(**{**TINY, **overrides}, architectures=["LlamaForCausalLM"])
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _scale_qkv(model)
    model.save_pretrained(folder)
    _save_word_tokenizer(folder)


def save_tiny(folder, arch: str, **overrides) -> None:
    """:func:`save_tiny_llama` for any of :data:`ARCHS`: ``tiny_config(arch)`` with ``overrides``
    (seed 0, Q/K/V scaled) and the same word-level tokenizer, saved as an HF folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config(arch)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cfg.architectures = [type(AutoModelForCausalLM.from_config(cfg)).__name__]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _scale_qkv(model)
    model.save_pretrained(folder)
    _save_word_tokenizer(folder)


ARCHS = ("llama", "mistral", "qwen2", "qwen3")


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def model(arch):
    return tiny_model(arch)


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    torch.set_num_threads(2)
    yield


def random_ids(n: int, batch: int = 1, seed: int = 1, vocab: int = TINY["vocab_size"]):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, n), generator=g)


# -- vLLM tests (test_vllm.py, test_vllm_archs.py): each module defines ``tiny_dir`` ----------
@pytest.fixture(scope="module")
def vllm_in_process() -> bool:
    """Whether ``engine`` runs vLLM's engine core in the test process (a module may override it)."""
    return True


@pytest.fixture(scope="module")
def engine(tiny_dir, vllm_in_process):
    """A float32 vLLM engine over the module's tiny model folder (top-5 log-probs, 2 threads)."""
    from _vllm_helpers import LEN
    from kakeya_py.integrations.vllm_engine import VLLMEngine

    eng = VLLMEngine(tiny_dir, "float32", max_len=LEN, topk=5, threads=2, in_process=vllm_in_process)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def hf_model(tiny_dir):
    """The module's tiny model folder loaded by HF transformers (float32, eval mode)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
