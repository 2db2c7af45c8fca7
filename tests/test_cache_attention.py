"""Attention on the compressed cache: kernel == decode -> attend, and KakeyaCache on the kernel path."""

from __future__ import annotations

import kakeya_py as kp
import numpy as np
import pytest
import torch
from conftest import random_ids, tiny_model
from kakeya_py import _kakeya
from kakeya_py.generation.cache import KakeyaCache, rotate_rope
from transformers import DynamicCache

MEAN_ONLY = {"block_size": 4096, "share_basis": True, "outlier_threshold": 3.0, "basis": "none"}
# the layouts of the generation presets: recommended (Lloyd-Max 4/3-bit, f16 scales) and
# uniform-ec-log8 (uniform 5/4-bit alphabets, rANS codes, log8 scales)
LAYOUTS = {
    "recommended": ({"bits": 4, **MEAN_ONLY}, {"bits": 3, **MEAN_ONLY}),
    "uniform-ec-log8": (
        {
            **MEAN_ONLY,
            "bits": 5,
            "uniform_step": 0.3376,
            "entropy_coding": True,
            "scale_format": "log8",
            "outlier_threshold": 4.5,
        },
        {
            **MEAN_ONLY,
            "bits": 4,
            "uniform_step": 0.6438,
            "entropy_coding": True,
            "scale_format": "log8",
            "outlier_threshold": 4.5,
        },
    ),
    "per-block means, 2-bit": (
        {"bits": 2, "block_size": 48, "basis": "none", "outlier_threshold": 2.5},
        {"bits": 2, "block_size": 48, "basis": "none", "outlier_threshold": 2.5},
    ),
}


def _policy(layout: str, sink: int = 1) -> dict:
    k, v = LAYOUTS[layout]
    return {"k": k, "v": v, "sink_tokens": sink}


def _kv(gen, t, h, d):
    x = torch.randn(t, h, d, generator=gen)
    return x + 0.3 * x**3 + torch.randn(1, h, d, generator=gen)


def _reference(q, ks, vs, skip, scale):
    """softmax(q K^T) V over decoded K/V with torch sdpa, per batch row: ``[b, hkv, rows, d]``."""
    outs = []
    for b in range(q.shape[0]):
        k = torch.cat(ks[b])[skip[b] :].permute(1, 0, 2)  # [h, n, d]
        v = torch.cat(vs[b])[skip[b] :].permute(1, 0, 2)
        outs.append(torch.nn.functional.scaled_dot_product_attention(q[b], k, v, scale=scale))
    return torch.stack(outs)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("rope_mean", [False, True])
@pytest.mark.parametrize("simd", [True, False])
def test_kernel_equals_decode_then_sdpa(layout, rope_mean, simd):
    gen = torch.Generator().manual_seed(0)
    batch, hkv, rows, d = 2, 2, 3, 64
    kcfg, vcfg = (kp.CodecConfig(**c) for c in LAYOUTS[layout])
    positions = 1 + 100 + 7 + 60
    theta = torch.rand(batch, positions, d // 2, generator=gen) * 6
    table = _kakeya.RopeTable(d // 2)
    table.append(0, theta.cos().numpy(), theta.sin().numpy())
    full_cos, full_sin = torch.cat([theta.cos()] * 2, -1), torch.cat([theta.sin()] * 2, -1)
    kch, vch, kdec, vdec = [], [], [], []
    for b in range(batch):
        krow, vrow, kd, vd = [], [], [], []
        start = 1
        for n in (100, 7, 60):
            k, v = _kv(gen, n, hkv, d), _kv(gen, n, hkv, d)
            mean = torch.randn(hkv, d, generator=gen) if rope_mean else None
            ke, ve = kp.encode(k, kcfg), kp.encode(v, vcfg)
            kc = _kakeya.AttnChunk(ke._inner, start, None if mean is None else mean.numpy())
            vc = _kakeya.AttnChunk(ve._inner, start)
            kx = torch.from_numpy(ke._inner.decode("f32")[0])
            if mean is not None:
                c, s = full_cos[b : b + 1, start : start + n], full_sin[b : b + 1, start : start + n]
                rot = rotate_rope(mean[None, :, None, :].expand(1, hkv, n, d), c, s)[0].permute(1, 0, 2)
                kx = kx + rot
            krow.append(kc)
            vrow.append(vc)
            kd.append(kx)
            vd.append(torch.from_numpy(ve._inner.decode("f32")[0]))
            start += n
        kch.append(krow)
        vch.append(vrow)
        kdec.append(kd)
        vdec.append(vd)
    q = torch.randn(batch, hkv, rows, d, generator=gen)
    skip = [0, 9]
    kp.set_simd(simd)
    try:
        out, mx, sm = _kakeya.attend_compressed(q.numpy(), kch, vch, skip, 0.125, table, 2)
        out1, _, _ = _kakeya.attend_compressed(q.numpy(), kch, vch, skip, 0.125, table, 1)
    finally:
        kp.set_simd(True)
    assert np.array_equal(out, out1), "thread count changed the result"
    want = _reference(q, kdec, vdec, skip, 0.125)
    torch.testing.assert_close(torch.from_numpy(out), want, rtol=2e-4, atol=2e-5)
    assert mx.shape == sm.shape == (batch, hkv, rows)
    assert (sm >= 1.0).all()  # the max term contributes e^0


def test_kernel_errors_are_kakeya_errors():
    gen = torch.Generator().manual_seed(1)
    cfg = kp.CodecConfig(bits=4, basis="none")
    k = _kakeya.AttnChunk(kp.encode(_kv(gen, 10, 1, 16), cfg)._inner)
    v = _kakeya.AttnChunk(kp.encode(_kv(gen, 11, 1, 16), cfg)._inner)
    q = np.zeros((1, 1, 2, 16), np.float32)
    with pytest.raises(kp.ShapeError, match="K has 10 tokens, V has 11"):
        _kakeya.attend_compressed(q, [[k]], [[v]], [0], 1.0)
    with pytest.raises(kp.ShapeError, match=r"expected 1 batch rows"):
        _kakeya.attend_compressed(q, [[k], [k]], [[k]], [0], 1.0)
    with pytest.raises(kp.ConfigError, match='basis "none"'):
        _kakeya.AttnChunk(kp.encode(_kv(gen, 10, 1, 16), kp.CodecConfig(bits=4))._inner)
    with pytest.raises(kp.ShapeError, match="no RoPE table"):
        km = _kakeya.AttnChunk(kp.encode(_kv(gen, 10, 1, 16), cfg)._inner, 0, np.zeros((1, 16), np.float32))
        _kakeya.attend_compressed(q, [[km]], [[k]], [0], 1.0)
    assert "AttnChunk(tokens=10" in repr(k)


def _steps(model, ids, cache, mask, n=10):
    """Prefill then ``n`` greedy steps by hand; the logits of every step."""
    logits = []
    with torch.no_grad():
        out = model(ids, attention_mask=mask, past_key_values=cache)
        logits.append(out.logits[:, -1])
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(n):
            mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], 1)
            out = model(nxt, attention_mask=mask, past_key_values=cache)
            logits.append(out.logits[:, -1])
            nxt = out.logits[:, -1:].argmax(-1)
    return torch.stack(logits)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("layout", ["recommended", "uniform-ec-log8"])
def test_cache_kernel_equals_decode_of_the_same_chunks(arch, layout):
    """Batch 2 with left padding, sink, GQA: the kernel path's logits equal decoding the very
    same chunks and running the model's sdpa on them (the reference path of the cache)."""
    model = tiny_model(arch)
    ids = random_ids(40, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    runs = []
    for check in (False, True):
        cache = KakeyaCache(_policy(layout), model, residual_length=4, block_tokens=8)
        assert all(layer.kernel for layer in cache.layers)
        cache._decode_attention_check = check
        runs.append(_steps(model, ids, cache, mask))
        assert cache.nbytes()["encoded_tokens"] > 40
        cache.close()
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("quantizer", [{}, {"uniform_step": 0.6438, "entropy_coding": True}])
def test_log8_scales_on_the_kernel_path_match_decode_at_one_byte_per_row(quantizer):
    """4-bit Lloyd-Max or uniform codes with log8 scales: the kernel path's logits equal the
    decode path's, and its chunks hold one byte per row and a 4-byte base per block where f16
    scales hold two bytes per row (no outliers, so only the scales differ)."""
    model = tiny_model("llama")
    ids = random_ids(60, batch=2)
    mask = torch.ones_like(ids)
    stream = {**MEAN_ONLY, "bits": 4, "outlier_threshold": None, **quantizer}

    def cache(scale_format, attention):
        cfg = {**stream, "scale_format": scale_format}
        policy = {"k": cfg, "v": cfg, "sink_tokens": 1, "k_position": "post_rope"}
        return KakeyaCache(policy, model, residual_length=4, block_tokens=16, attention=attention)

    log8 = cache("log8", "kernel")
    assert all(layer.kernel for layer in log8.layers)
    kernel_logits = _steps(model, ids, log8, mask)
    decode = cache("log8", "decode")
    assert not any(layer.kernel for layer in decode.layers)
    torch.testing.assert_close(kernel_logits, _steps(model, ids, decode, mask), rtol=1e-4, atol=1e-5)
    f16 = cache("float", "kernel")
    _steps(model, ids, f16, mask)
    chunks = [c for layer in log8.layers for s in (layer.k, layer.v) for c in s.chunks]
    heads = model.config.num_key_value_heads
    rows = sum(c.length * heads * len(c.encodings) for c in chunks)
    blocks = sum(heads * len(c.encodings) for c in chunks)  # one block per head per chunk
    saved = f16.nbytes()["encoded_bytes"] - log8.nbytes()["encoded_bytes"]
    assert rows > 0 and saved == rows - 4 * blocks
    for c in (log8, decode, f16):
        c.close()


def test_identity_policy_matches_dynamic_cache_with_kernel_enabled():
    model = tiny_model("llama")
    ids = random_ids(37, batch=2)
    gen = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=DynamicCache(), **gen)
        cache = KakeyaCache("identity", model, residual_length=4, block_tokens=8, attention="kernel")
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, **gen)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("do_sample", [False, True])
def test_generate_on_the_kernel_path(do_sample):
    model = tiny_model("qwen3")
    ids = random_ids(50, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    cache = KakeyaCache(_policy("recommended"), model, residual_length=4, block_tokens=8)
    assert model.config._attn_implementation == "kakeya_sdpa"
    calls = []
    real = _kakeya.attend_compressed

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    import kakeya_py.generation.attention as ca

    ca._kakeya.attend_compressed = spy
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=mask,
                past_key_values=cache,
                max_new_tokens=12,
                min_new_tokens=12,
                do_sample=do_sample,
                pad_token_id=0,
            )
    finally:
        ca._kakeya.attend_compressed = real
    assert out.shape == (2, 62)
    assert len(calls) == 11 * model.config.num_hidden_layers  # every decode step, every layer
    cache.close()
    assert model.config._attn_implementation == "sdpa"  # restored


def test_rope_mean_layout_decodes_to_post_rope_keys():
    """The RoPE-mean chunk plus RoPE_p(mean) decodes to the post-RoPE keys (lossless codec)."""
    model = tiny_model("llama")
    ids = random_ids(30)
    ident = {"identity": False, "bits": 8, "basis": "none", "block_size": 4096, "outlier_threshold": 0.5}
    cache = KakeyaCache({"k": ident, "v": ident}, model, residual_length=2, block_tokens=4)
    dyn = DynamicCache()
    with torch.no_grad():
        model(ids, past_key_values=cache)
        model(ids, past_key_values=dyn)
    layer = cache.layers[1]
    assert layer.k.rope_mean and layer.k.chunks
    chunk = layer.k.chunks[0]
    got = layer._decoded(layer.k, chunk)
    want = dyn.layers[1].keys[..., chunk.start : chunk.start + chunk.length, :]
    # 8-bit codes with most coordinates stored as f16 outliers: error ~f16 rounding of z times the scale
    torch.testing.assert_close(got, want, rtol=0, atol=1e-2 * float(want.abs().max()))
    assert chunk.encodings[0].rope_mean.shape == (2, 16)
    cache.close()


def test_rope_mean_is_rounded_to_halves_before_encoding_and_held_at_two_bytes():
    """The cache rounds the RoPE-mean layout's pre-RoPE mean to float16 before subtracting it,
    so the chunk holds it at 2 bytes per value (4 only for a mean that is not float16), and the
    kernel path still equals decoding the same chunks."""
    model = tiny_model("llama")
    ids = random_ids(40, batch=2)
    mask = torch.ones_like(ids)
    runs = []
    for check in (False, True):
        cache = KakeyaCache(_policy("recommended"), model, residual_length=4, block_tokens=8)
        cache._decode_attention_check = check
        runs.append(_steps(model, ids, cache, mask, n=4))
        layer = cache.layers[1]
        assert layer.kernel and layer.k.rope_mean and layer.k.chunks
        for chunk in layer.k.chunks:
            for e in chunk.encodings:
                mean = e.rope_mean
                assert mean.dtype == np.float32 and np.array_equal(mean.astype(np.float16), mean)
        cache.close()
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-4, atol=1e-5)

    gen = torch.Generator().manual_seed(3)
    hkv, d = 3, 64
    enc = kp.encode(_kv(gen, 128, hkv, d), kp.CodecConfig(**LAYOUTS["recommended"][0]))._inner
    halves = (3 * torch.randn(hkv, d, generator=gen)).half().float().numpy()
    off = halves.copy()
    off[0, 0] = np.nextafter(off[0, 0], np.float32(np.inf))  # not a float16
    plain = _kakeya.AttnChunk(enc, 0)
    held = _kakeya.AttnChunk(enc, 0, halves)
    assert np.array_equal(held.rope_mean, halves)
    assert held.nbytes - plain.nbytes == hkv * d * 2
    assert _kakeya.AttnChunk(enc, 0, off).nbytes - plain.nbytes == hkv * d * 4


def test_crop_and_beam_search_on_the_kernel_path():
    model = tiny_model("llama")
    ids = random_ids(40)
    cache = KakeyaCache(_policy("recommended"), model, residual_length=4, block_tokens=8)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        layer = cache.layers[1]
        encoded = layer.k.encoded_tokens
        assert encoded > 8 and layer.kernel
        cache.crop(30)  # into the chunk: decoded back into the window
        assert cache.get_seq_length() == 30 and layer.k.encoded_tokens < encoded
        assert layer.k.sink_tokens + layer.k.encoded_tokens + layer.k.window_tokens == 30
        out = model(random_ids(1), past_key_values=cache)
        assert torch.isfinite(out.logits).all()
    cache.close()
    cache = KakeyaCache(_policy("recommended"), model, residual_length=4, block_tokens=8)
    with torch.no_grad():
        out = model.generate(
            random_ids(30, batch=2),
            attention_mask=torch.ones(2, 30, dtype=torch.long),
            past_key_values=cache,
            max_new_tokens=10,
            min_new_tokens=10,
            num_beams=2,
            do_sample=False,
            pad_token_id=0,
        )
    assert out.shape == (2, 40)
    cache.close()


def test_two_caches_share_the_model_attention_switch():
    model = tiny_model("llama")
    a = KakeyaCache(_policy("recommended"), model)
    b = KakeyaCache(_policy("recommended"), model)
    assert model.config._attn_implementation == "kakeya_sdpa"
    a.close()
    assert model.config._attn_implementation == "kakeya_sdpa"  # b still needs it
    b.close()
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="attention must be"):
        KakeyaCache(_policy("recommended"), model, attention="fast")


@pytest.mark.slow
def test_real_model_kernel_equals_decode_of_the_same_chunks():
    """SmolLM2-135M, `recommended`: logits of the kernel path equal decoding the same chunks."""
    from kakeya_py.models import load_model

    model, tok, _ = load_model("smollm2-135m", progress=False)
    text = "The history of the city begins in the Roman period, when a small fort was built. " * 30
    ids = tok(text, return_tensors="pt").input_ids[:, :300]
    runs = []
    for check in (False, True):
        cache = KakeyaCache("recommended", model, residual_length=16, block_tokens=32)
        assert all(layer.kernel for layer in cache.layers)
        cache._decode_attention_check = check
        runs.append(_steps(model, ids, cache, torch.ones_like(ids), n=4))
        cache.close()
    scale = float(runs[1].abs().max())
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=1e-4 * scale)


def test_attend_compressed_releases_the_gil():
    """While one thread runs a long kernel call, another thread's Python keeps running."""
    import threading
    import time

    gen = torch.Generator().manual_seed(2)
    cfg = kp.CodecConfig(bits=4, basis="none", block_size=4096, share_basis=True)
    chunk = _kakeya.AttnChunk(kp.encode(_kv(gen, 4096, 4, 128), cfg)._inner)
    q = np.zeros((1, 4, 8, 128), np.float32)
    keys = [[chunk] * 200]  # one long call (~0.5 s on an idle 2-core machine)
    entered = threading.Event()
    span = {}

    def work():
        entered.set()
        t0 = time.perf_counter()
        _kakeya.attend_compressed(q, keys, keys, [0], 0.1, None, 1)
        span["call"] = time.perf_counter() - t0

    thread = threading.Thread(target=work)
    thread.start()
    entered.wait()
    time.sleep(0.02)  # let the worker enter the call
    t0 = time.perf_counter()
    ticks = sum(1 for _ in range(1000))
    main_loop = time.perf_counter() - t0
    thread.join()
    assert ticks == 1000
    assert span["call"] > 0.1, f"the call was too short to tell ({span['call']:.3f} s)"
    assert main_loop < span["call"] / 4, f"main loop {main_loop:.3f} s during a {span['call']:.3f} s call"
