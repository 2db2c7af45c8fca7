//! IEEE half conversions in plain integer arithmetic, round to nearest even.
//!
//! `half` converts one value at a time through a non-inlined F16C call; inside the AVX2
//! copies of the hot loops (`simd::dispatch`) each such call costs ~50 ns, which made the
//! f16 rounding of a 128 × 128 basis cost as much as its eigendecomposition. These
//! functions inline into their callers and give the same bits as `half` (tested against it).

/// The largest finite half, as f32.
pub const MAX: f32 = 65504.0;

/// `v` as the bits of the nearest half (ties to even; NaN stays NaN, overflow gives ±∞).
#[inline(always)]
pub fn from_f32(v: f32) -> u16 {
    let x = v.to_bits();
    let sign = (x >> 16) & 0x8000;
    let exp = x & 0x7F80_0000;
    let man = x & 0x007F_FFFF;
    if exp == 0x7F80_0000 {
        let nan_bit = if man == 0 { 0 } else { 0x0200 };
        return (sign | 0x7C00 | nan_bit | (man >> 13)) as u16;
    }
    let half_exp = (exp >> 23) as i32 - 127 + 15;
    if half_exp >= 0x1F {
        return (sign | 0x7C00) as u16;
    }
    if half_exp <= 0 {
        if 14 - half_exp > 24 {
            return sign as u16;
        }
        let man = man | 0x0080_0000;
        let shift = (14 - half_exp) as u32;
        let mut half_man = man >> shift;
        let round_bit = 1u32 << (shift - 1);
        if man & round_bit != 0 && man & (3 * round_bit - 1) != 0 {
            half_man += 1;
        }
        return (sign | half_man) as u16;
    }
    let bits = sign | ((half_exp as u32) << 10) | (man >> 13);
    let round_bit = 0x1000;
    // A carry out of the mantissa correctly bumps the exponent (up to ∞).
    if man & round_bit != 0 && man & (3 * round_bit - 1) != 0 {
        (bits + 1) as u16
    } else {
        bits as u16
    }
}

/// `v` as the bits of the nearest half, rounded once (not through f32).
#[inline(always)]
pub fn from_f64(v: f64) -> u16 {
    let t = v as f32;
    if t.is_finite() && f64::from(t) != v {
        // Round to odd on the way to f32 (truncate, set the last bit): f32 keeps 13 bits
        // more than a half, so the one rounding to half then sees which side of a tie
        // `v` lies on.
        let mut bits = t.to_bits();
        if f64::from(t).abs() > v.abs() {
            bits -= 1;
        }
        return from_f32(f32::from_bits(bits | 1));
    }
    from_f32(t)
}

/// The half with bits `h` as f32 (exact).
#[inline(always)]
pub fn to_f32(h: u16) -> f32 {
    let h = u32::from(h);
    let sign = (h & 0x8000) << 16;
    let exp = h & 0x7C00;
    let man = h & 0x03FF;
    if exp == 0x7C00 {
        let nan = if man == 0 { 0 } else { 0x0040_0000 };
        return f32::from_bits(sign | 0x7F80_0000 | nan | (man << 13));
    }
    if exp == 0 {
        // Zero or subnormal: man · 2⁻²⁴, exact in f32.
        let magnitude = man as f32 * (1.0 / 16_777_216.0);
        return f32::from_bits(sign | magnitude.to_bits());
    }
    f32::from_bits(sign | ((exp + ((127 - 15) << 10)) << 13) | (man << 13))
}

/// `v` rounded to the nearest half, as f32.
#[inline(always)]
pub fn round(v: f32) -> f32 {
    to_f32(from_f32(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(v: f32) {
        let want = half::f16::from_f32(v).to_bits();
        let got = from_f32(v);
        if v.is_nan() {
            assert!(half::f16::from_bits(got).is_nan(), "{v:e}");
        } else {
            assert_eq!(got, want, "{v:e}: {got:#06x} vs {want:#06x}");
        }
    }

    #[test]
    fn f64_rounds_once() {
        // Values a hair off a tie between two halves, closer than f32 can tell apart:
        // going through f32 first would round them to the tie, then to even.
        for h in [0x3C00u16, 0x3C01, 0x0001, 0x0002, 0x03FF, 0x7BFE] {
            let lo = f64::from(to_f32(h));
            let hi = f64::from(to_f32(h + 1));
            let mid = (lo + hi) / 2.0;
            let tiny = (hi - lo) * 1e-9;
            assert_eq!(from_f64(mid + tiny), h + 1, "{h:#06x} above");
            assert_eq!(from_f64(mid - tiny), h, "{h:#06x} below");
            assert_eq!(
                from_f64(mid),
                if h % 2 == 0 { h } else { h + 1 },
                "{h:#06x} tie"
            );
            assert_eq!(from_f64(-(mid + tiny)), (h + 1) | 0x8000);
        }
        for v in [
            0.0,
            1.0,
            -2.5,
            65504.0,
            65520.0,
            1e300,
            f64::INFINITY,
            1e-300,
        ] {
            assert_eq!(from_f64(v), from_f32(v as f32), "{v:e}");
        }
        assert!(half::f16::from_bits(from_f64(f64::NAN)).is_nan());
    }

    #[test]
    fn every_half_converts_back_exactly() {
        for h in 0..=u16::MAX {
            let want = half::f16::from_bits(h).to_f32();
            let got = to_f32(h);
            if want.is_nan() {
                assert!(got.is_nan());
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{h:#06x}");
            }
        }
    }

    #[test]
    fn rounding_matches_half_at_every_boundary() {
        // Each half, the midpoints to its neighbours (ties) and one f32 ulp either side of them.
        for h in 0..0x7C00u16 {
            for sign in [0u16, 0x8000] {
                let lo = half::f16::from_bits(h | sign).to_f32();
                let hi = half::f16::from_bits((h + 1) | sign).to_f32();
                let mid = (f64::from(lo) + f64::from(hi)) / 2.0;
                let mid = mid as f32; // exact: halves have 11 significant bits
                for v in [lo, mid, hi] {
                    check(v);
                    check(f32::from_bits(v.to_bits() + 1));
                    check(f32::from_bits(v.to_bits().saturating_sub(1)));
                }
            }
        }
        for v in [
            0.0,
            -0.0,
            f32::MIN_POSITIVE,
            1e-30,
            65504.0,
            65519.99,
            65520.0,
            1e10,
            f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ] {
            check(v);
            check(-v);
        }
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..1_000_000 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            check(f32::from_bits((s >> 32) as u32));
        }
    }
}
