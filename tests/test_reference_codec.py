"""Tests of the pure-numpy reference codec (tests/reference_codec.py) against docs/codec.md."""

from __future__ import annotations

import json
import math
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_codec as rc  # noqa: E402

LLOYD_MAX_SPEC = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}
# The Lloyd fixed points, checked with mpmath at 40 digits.
LLOYD_MAX_EXACT = {1: 0.363380227632, 2: 0.117481847829, 3: 0.0345477607885, 4: 0.00950100800819}


def gaussian(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def rel_mse(x_hat, x):
    x = np.asarray(x, dtype=np.float64)
    return float(np.sum((np.asarray(x_hat, dtype=np.float64) - x) ** 2) / np.sum(x**2))


def refresh_crc(data: bytes) -> bytes:
    body = data[:-4]
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


def with_header(data: bytes, header: dict) -> bytes:
    """Rebuild `data` with another JSON header (same body), CRC recomputed."""
    hlen = struct.unpack_from("<I", data, 8)[0]
    body = data[12 + hlen : -4]
    hj = json.dumps(header, separators=(",", ":")).encode()
    return refresh_crc(b"KAKEYA" + struct.pack("<HI", 1, len(hj)) + hj + body + b"\0\0\0\0")


# ------------------------------------------------------------------------ generator


def test_splitmix64_known_vectors():
    # SplitMix64 from state 0 (rng(0, 0, 0, 0)) and Vigna's seed 1234567 test vector.
    assert [int(v) for v in rc.rng_outputs(0, 0, 0, 0, 4)] == [
        0xE220A8397B1DCDAF,
        0x6E789E6AA1B965F4,
        0x06C45D188009454F,
        0xF88BB8A8724C81EC,
    ]
    assert rc.rng(1234567, 0, 0, 0).next_u64() == 6457827717110365317


@pytest.mark.parametrize(
    "args", [(0, 1, 64, 0), (7, 2, 3, 5), (2**64 - 1, 2, 2**32, rc.SHARED_BLOCK_INDEX), (12345, 1, 1, 0)]
)
def test_rng_scalar_matches_vectorised(args):
    seed, domain, a, b = args
    expected_state = (
        seed
        ^ (domain * 0xD1B54A32D192ED03 % 2**64)
        ^ (a * 0x8CB92BA72F3D8DD7 % 2**64)
        ^ (b * 0x9E3779B97F4A7C15 % 2**64)
    )
    g = rc.rng(seed, domain, a, b)
    assert g.state == expected_state
    scalar = [g.next_u64() for _ in range(37)]
    assert scalar == [int(v) for v in rc.rng_outputs(seed, domain, a, b, 37)]
    g = rc.rng(seed, domain, a, b)
    pairs = [v for _ in range(4) for v in g.next_gaussian_pair()]
    np.testing.assert_array_equal(rc.rng_gaussians(seed, domain, a, b, 7), pairs[:7])


def test_box_muller_is_standard_normal():
    g = rc.rng_gaussians(3, 2, 0, 0, 40001)
    assert g.shape == (40001,)
    assert abs(g.mean()) < 0.02 and abs(g.var() - 1) < 0.03
    o = rc.rng_outputs(3, 2, 0, 0, 2)
    u1 = ((int(o[0]) >> 11) + 1) * 2.0**-53
    u2 = (int(o[1]) >> 11) * 2.0**-53
    assert g[0] == math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)
    assert g[1] == math.sqrt(-2 * math.log(u1)) * math.sin(2 * math.pi * u2)


# ------------------------------------------------------------------------ Lloyd–Max


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_lloyd_max_mse(bits):
    c, mse = rc.lloyd_max_gaussian(bits)
    assert c.shape == (1 << bits,)
    assert np.all(np.diff(c) > 0) and np.all(np.diff(c.astype(np.float32)) > 0)
    np.testing.assert_array_equal(c, -c[::-1])
    assert mse == pytest.approx(LLOYD_MAX_EXACT[bits], rel=1e-9)
    # The spec prints Max's (1960) values; 3 and 4 bits differ from the Lloyd fixed point
    # in the 4th significant digit (0.03455, 0.009501), so compare at 1e-3 relative.
    assert mse == pytest.approx(LLOYD_MAX_SPEC[bits], rel=1e-3)
    if bits <= 2:
        assert f"{mse:.4g}" == f"{LLOYD_MAX_SPEC[bits]:.4g}"
    # Empirical check of the MSE of the f32 table with the codec's quantize().
    g = rc.rng_gaussians(bits, 9, 0, 0, 200_000).astype(np.float32)
    table = rc.centroid_table(rc.make_config(bits=bits))
    err = np.mean((table[rc.quantize(g, table)].astype(np.float64) - g) ** 2)
    assert err == pytest.approx(mse, rel=0.02)


def test_quantize_counts_boundaries_strictly_below():
    cents = np.array([-1.5, -0.5, 0.5, 1.5], dtype=np.float32)
    z = np.array([-9, -1.0, -0.999, 0.0, 1e-7, 1.0, 1.0001, 9], dtype=np.float32)
    assert rc.quantize(z, cents).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


# ------------------------------------------------------------------------- Hadamard


def sylvester(p):
    h = np.ones((1, 1))
    while h.shape[0] < p:
        h = np.block([[h, h], [h, -h]])
    return h


def scalar_butterfly(v):
    v = list(v)
    h = 1
    while h < len(v):
        for i in range(0, len(v), 2 * h):
            for j in range(i, i + h):
                a, b = v[j], v[j + h]
                v[j], v[j + h] = np.float32(a + b), np.float32(a - b)
        h *= 2
    return np.array(v, dtype=np.float32)


@pytest.mark.parametrize("p", [1, 2, 4, 8, 16, 64, 128])
def test_hadamard_orthonormal_and_inverse(p):
    np.testing.assert_array_equal(rc.fwht(np.eye(p)), sylvester(p))
    a = gaussian((3, p), seed=p)
    np.testing.assert_array_equal(rc.fwht(a)[1], scalar_butterfly(a[1]))  # same f32 operation order
    np.testing.assert_allclose(rc.fwht(rc.fwht(a)), p * a, rtol=1e-5, atol=1e-4)
    sig = rc.hadamard_signs(5, p)
    bit63 = [int(o) >> 63 for o in rc.rng_outputs(5, 1, p, 0, p)]
    assert sig.tolist() == [1.0 if b == 0 else -1.0 for b in bit63]
    m = rc.rotate(np.eye(p, dtype=np.float32), seed=5)  # row i = rotation of e_i
    np.testing.assert_allclose(m @ m.T, np.eye(p), atol=1e-6)
    np.testing.assert_allclose(m, (sylvester(p) * sig).T / math.sqrt(p), atol=1e-6)
    np.testing.assert_allclose(rc.unrotate(rc.rotate(a, 5), 5, p), a, atol=1e-5)


def test_rotation_pads_to_power_of_two():
    assert [rc.next_pow2(r) for r in (0, 1, 2, 3, 5, 64, 65)] == [0, 1, 2, 4, 8, 64, 128]
    c = gaussian((4, 5))
    y = rc.rotate(c, 3)
    assert y.shape == (4, 8)
    np.testing.assert_allclose(np.sum(y**2, axis=1), np.sum(c**2, axis=1), rtol=1e-5)
    np.testing.assert_allclose(rc.unrotate(y, 3, 5), c, atol=1e-5)
    assert rc.rotate(np.zeros((3, 0), np.float32), 0).shape == (3, 0)


# -------------------------------------------------------------------------- packing


def scalar_pack(codes, bits):
    out = bytearray(-(-len(codes) * bits // 8))
    pos = 0
    for code in codes:
        for k in range(bits):
            if (int(code) >> k) & 1:
                out[pos // 8] |= 1 << (pos % 8)
            pos += 1
    return bytes(out)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_pack_codes_lsb_first(bits):
    codes = np.random.default_rng(bits).integers(0, 1 << bits, size=77).astype(np.uint8)
    packed = rc.pack_codes(codes, bits)
    assert packed == scalar_pack(codes, bits)
    assert len(packed) == math.ceil(77 * bits / 8)
    np.testing.assert_array_equal(rc.unpack_codes(packed, 77, bits), codes)
    assert rc.pack_codes(np.array([1, 0, 0, 0], np.uint8), 3) == bytes([0b1, 0b0])
    assert rc.pack_codes(np.array([0b101, 0b011], np.uint8), 3) == bytes([0b011101])


# ---------------------------------------------------------------------- conversions


def test_bf16_round_to_nearest_even():
    x = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-8 + 2**-20, -2.5, 0.0], dtype=np.float32)
    u = rc.f32_to_bf16(x)
    back = rc.bf16_to_f32(u)
    assert back.tolist() == [1.0, 1.0, 1.0 + 4 * 2**-8, 1.0 + 2**-7, -2.5, 0.0]
    assert u[0] == 0x3F80


# ------------------------------------------------------------------------ skeleton


def test_choose_rank_rules():
    cfg = rc.make_config()
    lam = np.array([5.0, 3.0, 1.5, 0.5, 0.0])
    tau = 10.0
    assert rc.choose_rank(lam, tau, 5, cfg) == 5
    assert rc.choose_rank(lam, tau, 5, rc.make_config(variance_ratio=0.8)) == 2
    assert rc.choose_rank(lam, tau, 5, rc.make_config(variance_ratio=0.81)) == 3
    assert rc.choose_rank(lam, tau, 5, rc.make_config(variance_ratio=0.1)) == 1
    assert rc.choose_rank(lam, tau, 5, rc.make_config(variance_ratio=0.81, rank_cap=2)) == 2
    assert rc.choose_rank(lam, tau, 5, rc.make_config(rank=4, variance_ratio=0.1)) == 4
    assert rc.choose_rank(lam, tau, 5, rc.make_config(rank=9)) == 5
    assert rc.choose_rank(lam, tau, 5, rc.make_config(rank=4, rank_cap=3)) == 3
    assert rc.choose_rank(lam, tau, 5, rc.make_config(rank_cap=3)) == 3
    assert rc.choose_rank(lam * 0, 0.0, 5, rc.make_config(variance_ratio=0.5)) == 0
    assert rc.choose_rank(lam * 0, 0.0, 5, cfg) == 5
    # never more components than rows
    assert rc.choose_rank(lam, tau, 5, cfg, n=3) == 3
    assert rc.choose_rank(lam, tau, 5, rc.make_config(rank=4), n=2) == 2
    assert rc.choose_rank(lam, tau, 5, rc.make_config(variance_ratio=0.99), n=3) == 3
    # randomized: capped by the number of computed components
    assert rc.choose_rank(lam[:2], tau, 5, cfg, computed=2) == 2
    assert rc.choose_rank(lam[:2], tau, 5, rc.make_config(variance_ratio=0.99), computed=2) == 2


def low_rank_data(t, h, d, spectrum, seed=0):
    rng = np.random.default_rng(seed)
    out = np.empty((t, h, d), dtype=np.float32)
    for k in range(h):
        basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
        out[:, k, :] = (rng.standard_normal((t, d)) * spectrum) @ basis.T + 3.0
    return out


def ranks(data):
    ps = rc.parse(data)
    if ps.shared:
        return [s.rank for s in ps.shared]
    return [b.skeleton.rank for row in ps.blocks for b in row]


def test_rank_rules_in_encodings():
    d = 16
    spectrum = np.array([8, 6, 4, 2] + [0.05] * 12)
    x = low_rank_data(512, 2, d, spectrum)
    assert ranks(rc.encode(x, {"block_size": 256})) == [d] * 4
    assert ranks(rc.encode(x, {"block_size": 256, "variance_ratio": 0.99})) == [4] * 4
    assert ranks(rc.encode(x, {"block_size": 256, "variance_ratio": 0.6})) == [2] * 4
    assert ranks(rc.encode(x, {"block_size": 256, "rank": 3})) == [3] * 4
    assert ranks(rc.encode(x, {"block_size": 256, "rank": 40})) == [d] * 4
    assert ranks(rc.encode(x, {"block_size": 256, "rank_cap": 5})) == [5] * 4
    assert ranks(rc.encode(x, {"block_size": 256, "rank": 6, "rank_cap": 5})) == [5] * 4
    assert ranks(rc.encode(x, {"share_basis": True, "variance_ratio": 0.99})) == [4, 4]
    for cfg in (
        {"pca": "randomized", "rank": 4},
        {"pca": "randomized", "variance_ratio": 0.99, "rank_cap": 6},
    ):
        assert ranks(rc.encode(x, {"block_size": 256, **cfg})) == [4] * 4
    # A constant block: τ = 0 gives rank 0 below full variance; randomized computes nothing.
    const = np.full((8, 1, d), 0.5, dtype=np.float32)
    assert ranks(rc.encode(const, {"variance_ratio": 0.9})) == [0]
    assert ranks(rc.encode(const, {"pca": "randomized", "variance_ratio": 0.9})) == [0]
    assert ranks(rc.encode(const, {})) == [8]  # cap = min(D, n)
    np.testing.assert_array_equal(rc.decode(rc.encode(const, {"variance_ratio": 0.9})), const)
    # Never more components than rows (both methods), here a short last block.
    few = gaussian((37, 1, d))
    for pca in ("exact", "randomized"):
        assert ranks(rc.encode(few, {"pca": pca, "block_size": 32})) == [d, 5]


@pytest.mark.parametrize("pca", ["exact", "randomized"])
@pytest.mark.parametrize("share", [False, True])
def test_stored_skeleton_matches_fit_and_is_sign_canonical(pca, share):
    x = low_rank_data(96, 2, 8, np.array([5, 4, 3, 2, 1, 0.5, 0.2, 0.1]), seed=3)
    cfg = rc.make_config(pca=pca, share_basis=share, block_size=40, rank=5, seed=11)
    ps = rc.parse(rc.encode(x, cfg))
    for h in range(2):
        if share:
            recs = [(ps.shared[h], x[:, h], rc.SHARED_BLOCK_INDEX)]
        else:
            recs = [(b.skeleton, x[i * 40 : (i + 1) * 40, h], i) for i, b in enumerate(ps.blocks[h])]
        for rec, rows, index in recs:
            mu, basis = rc.fit_skeleton(rows, cfg, h, index)
            np.testing.assert_array_equal(rec.mean, mu)
            np.testing.assert_array_equal(rec.basis_t, basis.T)
            idx = np.argmax(np.abs(rec.basis_t), axis=1)
            assert np.all(rec.basis_t[np.arange(rec.rank), idx] > 0)
            if pca == "randomized":  # the sketch recovers the leading subspace
                _, _, vt = np.linalg.svd(rows - rows.mean(0))
                overlap = np.linalg.svd(vt[:5] @ basis)[1]
                assert overlap.min() > 0.99


# ---------------------------------------------------------------------- round trips


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_full_rank_gaussian_mse_near_lloyd_max(bits):
    x = gaussian((1024, 2, 64), seed=bits)
    data = rc.encode(x, {"bits": bits, "block_size": 512})
    err = rel_mse(rc.decode(data), x)
    _, lm = rc.lloyd_max_gaussian(bits)
    assert 0.7 * lm < err < 1.3 * lm
    assert rc.compression_ratio(data) == x.size * 2 / len(data)


def test_randomized_full_rank_gaussian_mse():
    x = gaussian((512, 1, 32), seed=5)
    err = rel_mse(rc.decode(rc.encode(x, {"bits": 3, "pca": "randomized"})), x)
    assert err < 1.3 * rc.lloyd_max_gaussian(3)[1]


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_identity_round_trip_is_exact(dtype):
    x32 = gaussian((7, 3, 5), seed=1)
    x = {"f32": x32, "f16": x32.astype(np.float16), "bf16": rc.f32_to_bf16(x32)}[dtype]
    data = rc.encode(x, {"identity": True}, dtype=dtype)
    ps = rc.parse(data)
    assert ps.body == x.tobytes()
    out = rc.decode(data)
    assert out.dtype == np.float32
    ref = rc.bf16_to_f32(x) if dtype == "bf16" else x.astype(np.float32)
    np.testing.assert_array_equal(out, ref)
    same = rc.decode(data, dtype=None)
    assert same.dtype == x.dtype
    np.testing.assert_array_equal(same, x)


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_low_precision_inputs(dtype):
    x32 = gaussian((256, 2, 32), seed=2)
    x = x32.astype(np.float16) if dtype == "f16" else rc.f32_to_bf16(x32)
    data = rc.encode(x, {"bits": 4}, dtype=dtype)
    assert rc.parse(data).header["dtype"] == dtype
    out = rc.decode(data, dtype=None)
    assert out.dtype == x.dtype and out.shape == x.shape
    ref = rc.bf16_to_f32(x) if dtype == "bf16" else x.astype(np.float32)
    assert rel_mse(rc.decode(data), ref) < 0.0095 * 1.3


def spd_cholesky(h, d, seed):
    rng = np.random.default_rng(seed)
    out = np.empty((h, d, d))
    for k in range(h):
        w = rng.standard_normal((d, d)) * np.linspace(0.3, 2.0, d)
        out[k] = np.linalg.cholesky(w @ w.T / d + 0.2 * np.eye(d))
    return out


@pytest.mark.parametrize("bits", [2, 4])
def test_inner_product_keeps_scale_and_bounds_error(bits):
    t, h, d = 1024, 2, 32
    x = low_rank_data(t, h, d, np.linspace(3, 0.3, d), seed=4)
    l_mat = spd_cholesky(h, d, seed=5)
    data = rc.encode(x, {"bits": bits, "metric": "inner_product"}, preconditioner=l_mat)
    ps = rc.parse(data)
    assert ps.header["preconditioner"] is True
    l_hat = np.stack([rc._round_to(m, "f16") for m in l_mat])
    np.testing.assert_array_equal(ps.preconditioner, l_hat)
    x_hat = rc.decode(data)
    lm = rc.lloyd_max_gaussian(bits)[1]
    # Whitened space: the error is the quantizer's (x̃ = x L̂, centred per block).
    xc = x - x.mean(axis=0)
    err_w = np.einsum("thd,hde->the", (x_hat - x).astype(np.float64), l_hat)
    ref_w = np.einsum("thd,hde->the", xc.astype(np.float64), l_hat)
    assert np.sum(err_w**2) / np.sum(ref_w**2) < 1.3 * lm
    # Attention scores with queries q ~ N(0, L Lᵀ): relative error ≈ sqrt(lm), far below 0.94.
    q = np.einsum("hde,qhe->qhd", l_hat, gaussian((64, h, d), seed=6).astype(np.float64))
    scores = np.einsum("thd,qhd->tqh", xc.astype(np.float64), q)
    score_err = np.einsum("thd,qhd->tqh", (x_hat - x).astype(np.float64), q)
    assert np.sqrt(np.sum(score_err**2) / np.sum(scores**2)) < 1.15 * math.sqrt(lm)
    if bits == 4:
        assert rel_mse(x_hat, x) < 0.05
        assert rel_mse(x_hat - x.mean(axis=0), xc) < 0.05


def test_inner_product_with_identity_l_matches_mse_body():
    x = gaussian((100, 2, 16), seed=8)
    eye = np.broadcast_to(np.eye(16), (2, 16, 16))
    a = rc.body_sections(rc.encode(x, {"bits": 2, "block_size": 64}))
    b = rc.body_sections(rc.encode(x, {"bits": 2, "block_size": 64, "metric": "inner_product"}, eye))
    assert len(b["preconditioner"]) == 2 * 16 * 17 // 2 * 2 and a["preconditioner"] == b""
    assert {k: v for k, v in a.items() if k != "preconditioner"} == {
        k: v for k, v in b.items() if k != "preconditioner"
    }


def test_short_last_block_is_encoded():
    x = gaussian((100, 2, 16), seed=9)
    data = rc.encode(x, {"bits": 4, "block_size": 32})
    ps = rc.parse(data)
    assert ps.header["blocks_per_head"] == 4
    assert [b.rows for b in ps.blocks[0]] == [32, 32, 32, 4]
    assert ps.blocks[1][3].scales.shape == (4,) and ps.blocks[1][3].codes.shape == (4, 4)
    assert ps.blocks[1][3].skeleton.rank == 4  # rank <= n
    x_hat = rc.decode(data)
    assert rel_mse(x_hat[96:], x[96:]) < 0.02
    assert rel_mse(x_hat, x) < 0.013
    single = gaussian((1, 1, 8), seed=10)
    assert rel_mse(rc.decode(rc.encode(single, {"bits": 4})), single) < 1e-3


def test_empty_tensor():
    x = np.zeros((0, 2, 8), dtype=np.float32)
    for cfg in ({}, {"share_basis": True}, {"share_basis": True, "pca": "randomized"}):
        data = rc.encode(x, cfg)
        assert rc.parse(data).header["blocks_per_head"] == 0
        assert rc.decode(data).shape == (0, 2, 8)
        assert rc.parse(data).body == b""  # no shared skeletons, no offsets at T = 0


def test_share_basis_round_trip():
    x = low_rank_data(300, 2, 16, np.linspace(2, 0.2, 16), seed=12)
    data = rc.encode(x, {"bits": 3, "share_basis": True, "block_size": 128})
    ps = rc.parse(data)
    assert len(ps.shared) == 2 and all(b.skeleton is None for row in ps.blocks for b in row)
    assert len(ps.shared_offsets) == 2
    xc = x - x.mean(axis=0)
    assert rel_mse(rc.decode(data) - x.mean(axis=0), xc) < 1.3 * rc.lloyd_max_gaussian(3)[1]
    per_block = rc.encode(x, {"bits": 3, "block_size": 128})
    assert len(data) < len(per_block)


def test_outliers_reduce_error_on_heavy_tails():
    rng = np.random.default_rng(13)
    x = rng.standard_t(2.0, size=(512, 1, 64)).astype(np.float32)
    base = rc.encode(x, {"bits": 2})
    with_out = rc.encode(x, {"bits": 2, "outlier_threshold": 2.0})
    segs = rc.parse(with_out).blocks[0][0].outliers
    assert len(segs) == 1 and len(segs[0]) > 0
    assert np.all(np.abs(segs[0]["value"].astype(np.float32)) >= 2.0)  # f16 may round to 2.0
    assert rel_mse(rc.decode(with_out), x) < 0.9 * rel_mse(rc.decode(base), x)


def test_outlier_segments():
    # P = 64 gives S = 1024 rows per segment: a block of 2100 rows has 3 segments.
    x = gaussian((2100, 1, 64), seed=14)
    data = rc.encode(x, {"bits": 1, "block_size": 4096, "outlier_threshold": 1.5})
    ps = rc.parse(data)
    blk = ps.blocks[0][0]
    assert rc.segment_rows(64) == 1024 and len(blk.outliers) == 3
    for seg, pairs in enumerate(blk.outliers):
        rows = min(1024, 2100 - seg * 1024)
        assert len(pairs) > 0 and int(pairs["index"].max()) < rows * 64
        assert np.all(np.diff(pairs["index"].astype(int)) > 0)
    # Recompute z for the last segment and check the stored indices and values.
    c = (x[:, 0].astype(np.float64) - blk.skeleton.mean) @ blk.skeleton.basis_t.T.astype(np.float64)
    z = rc.rotate(c.astype(np.float32), 0) / blk.scales[:, None]
    rr, jj = np.nonzero(np.abs(z[2048:]) > 1.5)
    np.testing.assert_array_equal(blk.outliers[2]["index"], rr * 64 + jj)
    np.testing.assert_array_equal(blk.outliers[2]["value"], z[2048:][rr, jj].astype(np.float16))
    base = rel_mse(rc.decode(rc.encode(x, {"bits": 1, "block_size": 4096})), x)
    assert rel_mse(rc.decode(data), x) < base


def test_scale_dtype_rule():
    x = gaussian((64, 1, 8), seed=15)
    assert rc.parse(rc.encode(x, {})).header["scale_dtype"] == "f16"
    for factor in (1e-6, 1e6):
        data = rc.encode(x * np.float32(factor), {"bits": 4, "skeleton_dtype": "f32"})
        ps = rc.parse(data)
        assert ps.header["scale_dtype"] == "f32"
        assert len(ps.blocks[0][0].scales.tobytes()) == 64 * 4
        assert rel_mse(rc.decode(data), x * np.float32(factor)) < 0.02


def test_literal_block_encoding():
    """One block encoded step by step with scalar loops, against the parsed record."""
    x = gaussian((6, 1, 5), seed=16)
    cfg = rc.make_config(bits=2, seed=99, skeleton_dtype="f32", outlier_threshold=1.0)
    ps = rc.parse(rc.encode(x, cfg))
    blk = ps.blocks[0][0]
    mu, basis = blk.skeleton.mean, blk.skeleton.basis_t.T
    r = blk.skeleton.rank
    assert r == 5 and blk.padded == 8
    sig = [1.0 if (int(o) >> 63) == 0 else -1.0 for o in rc.rng_outputs(99, 1, 8, 0, 8)]
    table = rc.lloyd_max_gaussian(2)[0].astype(np.float32)
    codes, scales, outliers = [], [], []
    for i in range(6):
        c = [
            np.float32(sum((float(x[i, 0, k]) - float(mu[k])) * float(basis[k, j]) for k in range(5)))
            for j in range(r)
        ]
        v = [np.float32(sig[j] * (c[j] if j < r else 0.0)) for j in range(8)]
        y = scalar_butterfly(v) / np.float32(math.sqrt(8))
        s = np.float16(math.sqrt(sum(float(t) ** 2 for t in y) / 8))
        scales.append(s)
        for j in range(8):
            z = np.float32(y[j] / np.float32(s))
            codes.append(sum(1 for b in range(3) if z > np.float32((table[b] + table[b + 1]) / 2)))
            if abs(z) > 1.0:
                outliers.append((i * 8 + j, np.float16(z)))
    np.testing.assert_array_equal(blk.scales, np.array(scales, dtype=np.float32))
    assert blk.codes.ravel().tolist() == codes
    assert [(int(a), b) for a, b in blk.outliers[0].tolist()] == [(a, float(b)) for a, b in outliers]


def test_custom_centroids_and_f32_skeleton():
    x = gaussian((200, 1, 16), seed=17)
    cents = [-2.0, -1.0, -0.25, 0.25, 1.0, 2.0, 3.0, 4.0]
    data = rc.encode(x, {"centroids": cents, "skeleton_dtype": "f32"})
    ps = rc.parse(data)
    assert ps.header["config"]["centroids"] == cents
    assert ps.blocks[0][0].codes.max() <= 6  # |z| <= sqrt(P) = 4, never above the 3.5 boundary
    e32 = rel_mse(rc.decode(data), x)
    e16 = rel_mse(rc.decode(rc.encode(x, {"centroids": cents})), x)
    assert e32 < 0.2 and abs(e32 - e16) < 0.01


def test_determinism_and_seed():
    x = gaussian((64, 2, 16), seed=18)
    for cfg in ({}, {"pca": "randomized", "rank": 6}):
        a = rc.encode(x, {"seed": 5, **cfg})
        assert a == rc.encode(x, {"seed": 5, **cfg})
        b = rc.encode(x, {"seed": 6, **cfg})
        assert rc.parse(a).body != rc.parse(b).body


# ------------------------------------------------------------------- byte format


def test_header_and_layout():
    x = gaussian((70, 2, 8), seed=19)
    data = rc.encode(x, {"bits": 2, "block_size": 32, "outlier_threshold": 2.5})
    assert data[:6] == b"KAKEYA" and struct.unpack_from("<H", data, 6)[0] == 1
    hlen = struct.unpack_from("<I", data, 8)[0]
    raw = data[12 : 12 + hlen]
    header = json.loads(raw)
    assert raw == json.dumps(header, separators=(",", ":")).encode()
    assert list(header) == [
        "shape",
        "dtype",
        "config",
        "scale_dtype",
        "preconditioner",
        "blocks_per_head",
        "library",
    ]
    assert header["shape"] == [70, 2, 8] and header["dtype"] == "f32"
    assert header["library"] == "kakeya-reference" and header["blocks_per_head"] == 3
    # Version 1: every config field but the newer ones.
    v1_defaults = {k: v for k, v in rc.DEFAULT_CONFIG.items() if k not in rc.NEWER_FIELDS}
    assert header["config"] == {**v1_defaults, "bits": 2, "block_size": 32, "outlier_threshold": 2.5}
    assert b'"rank":null' in raw
    assert struct.unpack_from("<I", data, len(data) - 4)[0] == zlib.crc32(data[:-4])
    ps = rc.parse(data)
    offsets = [o for row in ps.block_offsets for o in row]
    assert offsets[0] == 8 * 6 and offsets == sorted(offsets)
    secs = rc.body_sections(data)
    for h in range(2):
        for i in range(3):
            k = f"block/{h}/{i}"
            parts = [secs[f"{k}/{p}"] for p in ("skeleton", "scales", "codes", "outliers")]
            assert b"".join(parts) == secs[k]
            n = ps.blocks[h][i].rows
            r = min(8, n)
            assert len(secs[f"{k}/skeleton"]) == 2 + (1 + r) * 8 * 2
            p = rc.next_pow2(r)
            assert len(secs[f"{k}/scales"]) == 2 * n and len(secs[f"{k}/codes"]) == math.ceil(n * p * 2 / 8)
            assert struct.unpack_from("<I", secs[f"{k}/outliers"])[0] == len(ps.blocks[h][i].outliers[0])
    assert len(ps.body) == offsets[-1] + len(secs["block/1/2"])


def test_decoder_reads_reordered_records():
    """Records may be laid out in any order: only the offsets count."""
    x = gaussian((40, 2, 4), seed=20)
    data = rc.encode(x, {"block_size": 16, "share_basis": True})
    ps = rc.parse(data)
    recs = [(ps.shared[h].raw) for h in range(2)] + [b.raw for row in ps.blocks for b in row]
    order = list(reversed(range(len(recs))))
    tables = 8 * len(recs)
    pos, offs = tables, [0] * len(recs)
    for idx in order:
        offs[idx] = pos
        pos += len(recs[idx])
    body = struct.pack(f"<{len(offs)}Q", *offs) + b"".join(recs[i] for i in order)
    hlen = struct.unpack_from("<I", data, 8)[0]
    moved = refresh_crc(data[: 12 + hlen] + body + b"\0\0\0\0")
    np.testing.assert_array_equal(rc.decode(moved), rc.decode(data))


def corrupt_variants(data):
    hlen = struct.unpack_from("<I", data, 8)[0]
    header = json.loads(data[12 : 12 + hlen])
    yield "bad magic", b"KAKEYB" + data[6:]
    yield "bad magic, crc fixed", refresh_crc(b"XAKEYA" + data[6:])
    yield "bad crc", data[:-1] + bytes([data[-1] ^ 1])
    yield "flipped body byte", data[:40] + bytes([data[40] ^ 0x10]) + data[41:]
    yield "unknown version", refresh_crc(data[:6] + struct.pack("<H", 6) + data[8:])
    yield "version 0", refresh_crc(data[:6] + struct.pack("<H", 0) + data[8:])
    yield "header length too long", refresh_crc(data[:8] + struct.pack("<I", len(data)) + data[12:])
    yield "not json", refresh_crc(data[:12] + b"{" * hlen + data[12 + hlen :])
    yield "empty", b""
    for cut in (3, 10, 12 + hlen // 2, 12 + hlen, len(data) - 5, len(data) - 1):
        yield f"truncated to {cut}", data[:cut]
    yield "truncated body, crc fixed", refresh_crc(data[: len(data) - 20] + b"\0\0\0\0")
    yield "bad shape", with_header(data, {**header, "shape": [64, 2]})
    yield "more rows", with_header(data, {**header, "shape": [65, 2, 8]})
    yield "bad config", with_header(data, {**header, "config": {**header["config"], "bits": 9}})
    yield (
        "missing config field",
        with_header(data, {**header, "config": {k: v for k, v in header["config"].items() if k != "seed"}}),
    )
    yield "blocks_per_head", with_header(data, {**header, "blocks_per_head": 7})
    body_start = 12 + hlen
    yield (
        "offset out of range",
        refresh_crc(data[:body_start] + struct.pack("<Q", 10**6) + data[body_start + 8 :]),
    )


def test_corrupt_bytes_raise_value_error():
    x = gaussian((64, 2, 8), seed=21)
    data = rc.encode(x, {"bits": 3, "block_size": 32, "outlier_threshold": 2.0})
    rc.decode(data)
    for name, bad in corrupt_variants(data):
        with pytest.raises(ValueError):
            rc.decode(bad)
        assert name  # for the failure message
    with pytest.raises(ValueError, match="version"):
        rc.decode(refresh_crc(data[:6] + struct.pack("<H", 6) + data[8:]))
    with pytest.raises(ValueError, match="magic"):
        rc.decode(b"KAKEYB" + data[6:])
    with pytest.raises(ValueError, match="checksum"):
        rc.decode(data[:-1] + bytes([data[-1] ^ 1]))


def test_mutated_bytes_never_raise_other_errors():
    x = gaussian((20, 1, 4), seed=22)
    data = rc.encode(x, {"bits": 2, "block_size": 8, "outlier_threshold": 1.0})
    rng = np.random.default_rng(23)
    for _ in range(300):
        buf = bytearray(data)
        for pos in rng.integers(0, len(buf) - 4, size=rng.integers(1, 4)):
            buf[pos] = int(rng.integers(0, 256))
        try:
            rc.decode(refresh_crc(bytes(buf)))
        except ValueError:
            pass


# ------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "cfg",
    [
        {"bits": 0},
        {"bits": 9},
        {"block_size": 0},
        {"pca": "svd"},
        {"variance_ratio": 0},
        {"rank": -1},
        {"metric": "cosine"},
        {"skeleton_dtype": "bf16"},
        {"seed": -1},
        {"seed": 2**64},
        {"centroids": [0.0, 1.0]},
        {"centroids": [3, 2, 1, 0, 4, 5, 6, 7]},
        {"outlier_threshold": -1.0},
        {"share_basis": 1},
        {"colour": "red"},
    ],
)
def test_bad_config_raises(cfg):
    with pytest.raises(ValueError):
        rc.make_config(cfg)


def test_bad_inputs_raise():
    x = gaussian((4, 1, 8))
    with pytest.raises(ValueError, match="non-finite"):
        rc.encode(np.where(x > 1, np.inf, x).astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        rc.encode(x[:, 0])
    with pytest.raises(ValueError):
        rc.encode(np.zeros((1, 1, 4097), np.float32))
    with pytest.raises(ValueError, match="bf16"):
        rc.encode(rc.f32_to_bf16(x))
    with pytest.raises(ValueError):
        rc.encode(x.astype(np.float64))
    with pytest.raises(ValueError, match="preconditioner"):
        rc.encode(x, {"metric": "inner_product"})
    bad_l = np.ones((1, 8, 8))
    with pytest.raises(ValueError, match="lower triangular"):
        rc.encode(x, {"metric": "inner_product"}, bad_l)
    with pytest.raises(ValueError, match="positive diagonal"):
        rc.encode(x, {"metric": "inner_product"}, -np.eye(8)[None])
    with pytest.raises(ValueError):
        rc.encode(x, {"metric": "inner_product"}, np.eye(4)[None])


# ------------------------------------------------------- allocation "variance"

# MSE of the Lloyd–Max fixed point for 5..8 bits, mpmath at 40 digits (quadrature per cell).
LLOYD_MAX_WIDE = {
    5: 0.0025046683556748,
    6: 0.000644239665317262,
    7: 0.000163478229980237,
    8: 4.11850828671175e-5,
}


@pytest.mark.parametrize("bits", [5, 6, 7, 8])
def test_wide_lloyd_max_tables(bits):
    c, mse = rc.lloyd_max_gaussian(bits)
    assert c.shape == (1 << bits,) and np.all(np.diff(c.astype(np.float32)) > 0)
    np.testing.assert_array_equal(c, -c[::-1])
    assert mse == pytest.approx(LLOYD_MAX_WIDE[bits], rel=1e-9)
    assert rc.distortion(bits) == mse and rc.distortion(0) == 1.0
    g = rc.rng_gaussians(bits, 9, 0, 0, 200_000).astype(np.float32)
    table = c.astype(np.float32)
    err = np.mean((table[rc.quantize(g, table)].astype(np.float64) - g) ** 2)
    assert err == pytest.approx(mse, rel=0.03)


def test_allocate_rules():
    assert rc.allocate(np.ones(4), 10).tolist() == [3, 3, 2, 2]
    assert rc.allocate(np.array([16.0, 1.0, 0.0]), 6).tolist() == [4, 2, 0]
    assert rc.allocate(np.array([1.0, 0.0]), 20).tolist() == [8, 0]
    rng = np.random.default_rng(3)
    for _ in range(50):
        lam = rng.lognormal(0, 3, size=rng.integers(1, 30)) * (rng.random(1) > 0.2)
        lam[rng.random(lam.size) < 0.2] = 0.0
        bits = int(rng.integers(1, 5))
        b = rc.allocate(lam, bits * lam.size)
        assert int(b.sum()) == min(bits * lam.size, 8 * int(np.count_nonzero(lam)))
        assert np.all(b[lam == 0] == 0) and b.max(initial=0) <= 8
        order = np.argsort(-lam, kind="stable")
        assert np.all(np.diff(b[order].astype(int)) <= 0)  # monotone in λ


@pytest.mark.parametrize("widths", [[3, 0, 5], [8, 8, 1], [0, 0, 0], [2, 7, 4, 1, 0, 6]])
def test_pack_widths_lsb_first(widths):
    widths = np.array(widths, dtype=np.uint8)
    rng = np.random.default_rng(int(widths.sum()))
    codes = np.stack([rng.integers(0, 1 << int(w), size=9) for w in widths], axis=1).astype(np.uint8)
    flat = [int(codes[t, j]) for t in range(9) for j in range(len(widths))]
    wide = [int(w) for _ in range(9) for w in widths]
    out = bytearray(-(-sum(wide) // 8))
    pos = 0
    for code, w in zip(flat, wide, strict=True):
        for k in range(w):
            if (code >> k) & 1:
                out[pos // 8] |= 1 << (pos % 8)
            pos += 1
    assert rc.pack_widths(codes, widths) == bytes(out)
    np.testing.assert_array_equal(rc.unpack_widths(bytes(out), 9, widths), codes)


def decaying_data(t, h, d, decay, seed=0):
    return low_rank_data(t, h, d, np.exp(-np.arange(d) / (2 * decay)), seed=seed)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("share", [False, True])
def test_variance_allocation_beats_uniform(bits, share):
    x = decaying_data(1024, 2, 32, decay=6.0, seed=bits)
    cfg = {"bits": bits, "block_size": 512, "share_basis": share, "outlier_threshold": 3.0}
    uni = rc.encode(x, cfg)
    var = rc.encode(x, {**cfg, "allocation": "variance"})
    xc = x - x.mean(axis=0)
    eu = rel_mse(rc.decode(uni) - x.mean(axis=0), xc)
    ev = rel_mse(rc.decode(var) - x.mean(axis=0), xc)
    assert ev < 0.67 * eu, (ev, eu)
    assert ev < 1.3 * rc.lloyd_max_gaussian(bits)[1]
    assert abs(len(var) / len(uni) - 1) < 0.03


def test_variance_layout_and_version():
    x = decaying_data(70, 2, 8, decay=3.0, seed=5)
    data = rc.encode(x, {"bits": 2, "block_size": 32, "outlier_threshold": 2.0, "allocation": "variance"})
    assert struct.unpack_from("<H", data, 6)[0] == 2
    hlen = struct.unpack_from("<I", data, 8)[0]
    raw = data[12 : 12 + hlen]
    assert raw.endswith(
        b',"allocation":"variance"},"scale_dtype":"f16","preconditioner":false,'
        b'"blocks_per_head":3,"library":"kakeya-reference"}'
    )
    ps = rc.parse(data)
    secs = rc.body_sections(data)
    for h in range(2):
        for i, blk in enumerate(ps.blocks[h]):
            r, n = blk.skeleton.rank, blk.rows
            k = f"block/{h}/{i}"
            assert len(secs[f"{k}/skeleton"]) == 2 + (1 + r) * 8 * 2 + r + 2 * r
            b = blk.skeleton.bits
            assert int(b.sum()) == min(2 * r, 8 * int(np.count_nonzero(blk.skeleton.sigma)))
            assert len(secs[f"{k}/scales"]) == 2 * n
            assert len(secs[f"{k}/codes"]) == math.ceil(n * int(b.sum()) / 8)
            assert np.all(blk.codes[:, b == 0] == 0)
    # Version 1 cannot carry allocation "variance"; versions 0 and 6 are unknown.
    with pytest.raises(ValueError, match="version"):
        rc.parse(refresh_crc(data[:6] + struct.pack("<H", 1) + data[8:]))
    for v in (0, 6):
        with pytest.raises(ValueError, match="unknown format version"):
            rc.parse(refresh_crc(data[:6] + struct.pack("<H", v) + data[8:]))


def test_basis_none_layout_and_version():
    x = gaussian((70, 2, 8), seed=20)
    data = rc.encode(x, {"bits": 2, "block_size": 32, "basis": "none"})
    assert struct.unpack_from("<H", data, 6)[0] == 3
    hlen = struct.unpack_from("<I", data, 8)[0]
    assert data[12 : 12 + hlen].endswith(
        b',"identity":false,"basis":"none"},"scale_dtype":"f16",'
        b'"preconditioner":false,"blocks_per_head":3,"library":"kakeya-reference"}'
    )
    ps = rc.parse(data)
    secs = rc.body_sections(data)
    for h in range(2):
        for i, blk in enumerate(ps.blocks[h]):
            assert blk.skeleton.rank == 8  # every coordinate, mean only
            np.testing.assert_array_equal(blk.skeleton.basis_t, np.eye(8, dtype=np.float32))
            assert len(secs[f"block/{h}/{i}/skeleton"]) == 2 + 8 * 2
    pca = rc.decode(rc.encode(x, {"bits": 2, "block_size": 32}))
    none = rc.decode(data)
    assert rel_mse(none, x) <= 1.25 * rel_mse(pca, x)  # 32 x 8 blocks: noisy
    for v in (1, 2):  # older versions cannot carry basis "none"
        with pytest.raises(ValueError, match="version"):
            rc.parse(refresh_crc(data[:6] + struct.pack("<H", v) + data[8:]))
    with pytest.raises(ValueError, match="basis"):
        rc.make_config(basis="none", rank=4)


def test_variance_literal_block_encoding():
    """One block of allocation "variance" encoded with scalar loops, against the record."""
    x = decaying_data(12, 1, 4, decay=1.0, seed=6)
    cfg = rc.make_config(bits=2, skeleton_dtype="f32", outlier_threshold=1.5, allocation="variance")
    blk = rc.parse(rc.encode(x, cfg)).blocks[0][0]
    sk = blk.skeleton
    c = [
        [
            np.float32(
                sum((float(x[t, 0, k]) - float(sk.mean[k])) * float(sk.basis_t[j, k]) for k in range(4))
            )
            for j in range(4)
        ]
        for t in range(12)
    ]
    lam = [sum(float(c[t][j]) ** 2 for t in range(12)) / 12 for j in range(4)]
    bits = [0] * 4
    dd = [rc.distortion(b) - rc.distortion(b + 1) for b in range(8)]
    for _ in range(8):
        j = max((j for j in range(4) if lam[j] > 0 and bits[j] < 8), key=lambda j: (lam[j] * dd[bits[j]], -j))
        bits[j] += 1
    assert sk.bits.tolist() == bits
    sigma = [np.float16(math.sqrt(lam[j])) if bits[j] else 0.0 for j in range(4)]
    np.testing.assert_array_equal(sk.sigma, np.array(sigma, dtype=np.float32))
    live = [j for j in range(4) if bits[j]]
    codes, outliers = [], []
    for t in range(12):
        s = math.sqrt(
            sum((float(c[t][j]) / float(np.float32(math.sqrt(lam[j])))) ** 2 for j in live) / len(live)
        )
        s = np.float16(s)
        assert blk.scales[t] == np.float32(s)
        for j in live:
            z = np.float32(np.float32(c[t][j] / np.float32(sigma[j])) / np.float32(s))
            table = rc.lloyd_max_gaussian(bits[j])[0].astype(np.float32)
            codes.append(
                sum(1 for a, b in zip(table, table[1:], strict=False) if z > np.float32((a + b) / 2))
            )
            if abs(z) > 1.5:
                outliers.append((t * 4 + j, np.float16(z)))
    assert [int(blk.codes[t, j]) for t in range(12) for j in live] == codes
    assert [(int(a), b) for a, b in blk.outliers[0].tolist()] == [(a, float(b)) for a, b in outliers]


def test_variance_zero_variance_and_empty():
    const = np.full((8, 2, 6), 0.5, dtype=np.float32)
    data = rc.encode(const, {"allocation": "variance", "outlier_threshold": 2.0})
    assert all(
        int(b.skeleton.bits.sum()) == 0 and b.padded == 0 for row in rc.parse(data).blocks for b in row
    )
    np.testing.assert_array_equal(rc.decode(data), const)
    for cfg in ({"allocation": "variance"}, {"allocation": "variance", "share_basis": True}):
        assert rc.decode(rc.encode(np.zeros((0, 2, 8), np.float32), cfg)).shape == (0, 2, 8)
    with pytest.raises(ValueError, match="centroids"):
        rc.make_config(allocation="variance", centroids=[-1.0, -0.3, 0.3, 1.0, 1.5, 2.0, 2.5, 3.0])
    with pytest.raises(ValueError, match="allocation"):
        rc.make_config(allocation="kvtc")


def test_variance_corrupt_and_mutated_bytes():
    x = decaying_data(64, 2, 8, decay=3.0, seed=7)
    for share in (False, True):
        data = rc.encode(
            x,
            {
                "bits": 3,
                "block_size": 32,
                "outlier_threshold": 2.0,
                "allocation": "variance",
                "share_basis": share,
            },
        )
        rc.decode(data)
        for _name, bad in corrupt_variants(data):
            with pytest.raises(ValueError):
                rc.decode(bad)
        rng = np.random.default_rng(24)
        for _ in range(200):
            buf = bytearray(data)
            for pos in rng.integers(0, len(buf) - 4, size=rng.integers(1, 4)):
                buf[pos] = int(rng.integers(0, 256))
            try:
                rc.decode(refresh_crc(bytes(buf)))
            except ValueError:
                pass


# ------------------------------------------------------------------- entropy coding


def test_frequency_table_rule():
    first, freq = rc.frequency_table(np.array([2, 2, 2, 5], np.uint8), 8)
    # counts 3 and 1 of 4 (symbols 3, 4 absent): floor(3/4·2^14), floor(1/4·2^14), exact
    assert (first, freq) == (2, [12288, 0, 0, 4096])
    first, freq = rc.frequency_table(np.array([0] * 99_998 + [1, 7], np.uint8), 8)
    assert first == 0 and freq[1] == 1 and freq[7] == 1 and sum(freq) == 1 << 14
    # Rounding rare symbols up overshoots; the excess comes off the largest frequency.
    codes = np.concatenate([np.arange(128), np.repeat(np.arange(128, 256), 1000)]).astype(np.uint8)
    first, freq = rc.frequency_table(codes, 256)
    assert first == 0 and sum(freq) == 1 << 14 and min(freq) >= 1


def test_rans_literal_stream():
    # p(0) = 3/4, p(1) = 1/4: coding [0, 1] from x = 2^23 by the spec's formulas.
    first, freq = rc.frequency_table(np.array([0, 0, 0, 1], np.uint8), 2)
    assert freq == [12288, 4096]
    # Code 0 alone in lane 0, code 1 alone in lane 1, lanes 2 and 3 empty (state 2^23).
    y = 1 << 23
    y = (y // 4096 << 14) + y % 4096 + 12288
    x = 1 << 23
    x = (x // 12288 << 14) + x % 12288 + 0
    lanes = [struct.pack(">I", v) for v in (x, y, 1 << 23, 1 << 23)]
    coded = rc.rans_encode(np.array([0, 1], np.uint8), first, freq)
    assert coded == b"".join(struct.pack("<I", 4) + lane for lane in lanes)
    np.testing.assert_array_equal(rc.rans_decode(coded, first, freq, 2), [0, 1])


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_rans_roundtrip_and_rate(bits):
    rng = np.random.default_rng(bits)
    p = np.exp(-0.5 * ((np.arange(1 << bits) - (1 << bits) / 2) / max(1, (1 << bits) / 6)) ** 2)
    codes = rng.choice(1 << bits, size=5000, p=p / p.sum()).astype(np.uint8)
    first, freq = rc.frequency_table(codes, 1 << bits)
    stream = rc.rans_encode(codes, first, freq)
    np.testing.assert_array_equal(rc.rans_decode(stream, first, freq, codes.size), codes)
    counts = np.bincount(codes, minlength=1 << bits) / codes.size
    entropy = -sum(q * math.log2(q) for q in counts if q > 0)
    assert 8 * (len(stream) - 8 * rc.RANS_LANES) <= codes.size * entropy * 1.01 + 64
    flip = [
        bytes(stream[:at]) + bytes([stream[at] ^ 0x40]) + stream[at + 1 :] for at in (0, 4, len(stream) // 2)
    ]
    for damaged in (stream[:-1], stream + b"\0", *flip):
        with pytest.raises(ValueError, match="entropy-coded"):
            rc.rans_decode(damaged, first, freq, codes.size)


def test_entropy_coding_layout_and_version():
    x = gaussian((600, 2, 16), seed=21)
    packed = rc.encode(x, {"bits": 4, "block_size": 256, "outlier_threshold": 3.0})
    data = rc.encode(x, {"bits": 4, "block_size": 256, "outlier_threshold": 3.0, "entropy_coding": True})
    assert struct.unpack_from("<H", data, 6)[0] == 4
    hlen = struct.unpack_from("<I", data, 8)[0]
    assert b',"basis"' not in data[12 : 12 + hlen]
    assert b',"allocation":"uniform","basis":"pca"' not in data[12 : 12 + hlen]
    assert b'"identity":false,"entropy_coding":true},' in data[12 : 12 + hlen]
    np.testing.assert_array_equal(rc.decode(data), rc.decode(packed))
    assert len(data) < len(packed)
    secs, secs_packed = rc.body_sections(data), rc.body_sections(packed)
    for h in range(2):
        for i in range(3):
            codes, packed_codes = secs[f"block/{h}/{i}/codes"], secs_packed[f"block/{h}/{i}/codes"]
            if i < 2:  # 256 x 16 codes: the stream is shorter
                assert codes[0] == rc.CODES_RANS and len(codes) < len(packed_codes)
            else:  # 88 x 16: table and lanes cost more than they save, so the codes stay packed
                assert codes == bytes([rc.CODES_PACKED]) + packed_codes
            assert secs[f"block/{h}/{i}/outliers"] == secs_packed[f"block/{h}/{i}/outliers"]
    # A block too small for a table and a stream stays packed, behind mode byte 0.
    tiny = rc.encode(x[:2], {"bits": 4, "entropy_coding": True})
    for h in range(2):
        assert rc.body_sections(tiny)[f"block/{h}/0/codes"][0] == rc.CODES_PACKED
    np.testing.assert_array_equal(rc.decode(tiny), rc.decode(rc.encode(x[:2], {"bits": 4})))
    for v in (1, 2, 3):  # older versions cannot carry entropy coding
        with pytest.raises(ValueError, match="version"):
            rc.parse(refresh_crc(data[:6] + struct.pack("<H", v) + data[8:]))
    for bad in ({"entropy_coding": True, "allocation": "variance"}, {"entropy_coding": 1}):
        with pytest.raises(ValueError, match="entropy_coding"):
            rc.make_config(bad)


def test_uniform_table_and_error():
    np.testing.assert_array_equal(rc.uniform_table(2, 0.5), np.array([-0.75, -0.25, 0.25, 0.75], np.float32))
    x = gaussian((2048, 1, 64), seed=22)
    cfg = {"bits": 5, "uniform_step": 0.25, "basis": "none", "share_basis": True, "block_size": 4096}
    data = rc.encode(x, cfg)
    assert struct.unpack_from("<H", data, 6)[0] == 4
    assert rel_mse(rc.decode(data), x) == pytest.approx(0.25**2 / 12, rel=0.1)
    for bad in ({"uniform_step": 0.0}, {"uniform_step": 0.5, "bits": 1, "centroids": [-1.0, 1.0]}):
        with pytest.raises(ValueError, match="uniform_step"):
            rc.make_config(bad)


def test_log_scale_layout_and_values():
    rng = np.random.default_rng(29)
    x = gaussian((300, 2, 16), seed=29) * rng.uniform(0.2, 3.0, size=(300, 1, 1)).astype(np.float32)
    cfg = {"bits": 6, "block_size": 128, "uniform_step": 0.3, "basis": "none", "entropy_coding": False}
    data = rc.encode(x, {**cfg, "scale_format": "log8"})
    assert struct.unpack_from("<H", data, 6)[0] == 5
    ps, secs = rc.parse(data), rc.body_sections(data)
    assert ps.header["scale_dtype"] == "log8"
    for h in range(2):
        for i, blk in enumerate(ps.blocks[h]):
            raw = secs[f"block/{h}/{i}/scales"]
            assert len(raw) == 4 + blk.rows  # i32 base, one byte per vector
            base = struct.unpack_from("<i", raw)[0]
            codes = np.frombuffer(raw[4:], dtype=np.uint8)
            live = codes > 0
            levels = base + codes[live].astype(np.int64) - 1
            np.testing.assert_array_equal(blk.scales[live], (2.0 ** (levels / 16)).astype(np.float32))
            assert codes.max() == 255  # the block's largest scale takes the top byte
            rows = x[i * 128 : (i + 1) * 128, h, :].astype(np.float64)
            y = rc.rotate(rows - blk.skeleton.mean.astype(np.float64), 0)
            rms = np.sqrt(np.mean(y.astype(np.float64) ** 2, axis=1))
            # Within 1/32 octave of the true scale.
            assert np.all(np.abs(np.log2(blk.scales[live] / rms[live])) <= 1 / 32 + 1e-9)
    # The quantizer divides by the rounded scale: the error is the float-scale error.
    assert rel_mse(rc.decode(data), x) == pytest.approx(rel_mse(rc.decode(rc.encode(x, cfg)), x), rel=0.05)
    with pytest.raises(ValueError, match="scale_format"):
        rc.make_config(scale_format="log4")
    with pytest.raises(ValueError, match="scale_format"):
        rc.make_config(scale_format="log8", allocation="variance")


def test_block_scale_layout_and_error():
    rng = np.random.default_rng(23)
    x = gaussian((300, 2, 16), seed=23) * rng.uniform(0.2, 3.0, size=(300, 1, 1)).astype(np.float32)
    cfg = {"bits": 6, "block_size": 128, "uniform_step": 0.3, "basis": "none", "outlier_threshold": 9.0}
    per_vector = rc.encode(x, cfg)
    data = rc.encode(x, {**cfg, "scale_granularity": "block"})
    assert struct.unpack_from("<H", data, 6)[0] == 4
    hlen = struct.unpack_from("<I", data, 8)[0]
    assert data[12 : 12 + hlen].find(b',"scale_granularity":"block"}') > 0
    ps, secs = rc.parse(data), rc.body_sections(data)
    for h in range(2):
        for i, blk in enumerate(ps.blocks[h]):
            assert len(secs[f"block/{h}/{i}/scales"]) == 2  # one f16 scale for the whole block
            assert np.all(blk.scales == blk.scales[0])
            rows = x[i * 128 : (i + 1) * 128, h, :].astype(np.float64)
            y = rc.rotate(rows - blk.skeleton.mean.astype(np.float64), 0)  # basis none: rotate x − μ̂
            rms = np.sqrt(np.mean(y.astype(np.float64) ** 2))
            assert blk.scales[0] == pytest.approx(rms, rel=1e-3)
    # Same total MSE as one scale per vector (each vector's relative error is step²/12).
    assert rel_mse(rc.decode(data), x) == pytest.approx(rel_mse(rc.decode(per_vector), x), rel=0.1)
    with pytest.raises(ValueError, match="scale_granularity"):
        rc.make_config(scale_granularity="token")
    with pytest.raises(ValueError, match="scale_granularity"):
        rc.make_config(scale_granularity="block", allocation="variance")
