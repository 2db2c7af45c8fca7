//! Online softmax: a vectorisable `exp`, the running (max, sum) rescaling, and the
//! log-sum-exp merge of partial results.

/// `e^x` for a slice in place: `2^k · p(r)`, `k = round_ties_even(x / ln 2)`, `r = x − k ln 2` (two-part
/// `ln 2`), `p` the degree-6 Taylor polynomial of `e^r` on `|r| ≤ ln 2 / 2` (relative error
/// below 3e-7); inputs below −87 give 0. Plain lane-by-lane arithmetic, so it vectorises
/// under [`crate::simd::dispatch`] and gives the same values on every instruction set.
#[inline(always)]
pub fn exp_in_place(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = exp(*v);
    }
}

/// One `e^x` (see [`exp_in_place`]).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let below = x < -87.0;
    let x = x.clamp(-87.0, 88.0);
    let k = (x * LOG2E).round_ties_even();
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((k as i32 + 127) as u32) << 23);
    if below {
        0.0
    } else {
        p * scale
    }
}

/// Merges partial attention results `(max, sum, out)` (out normalised by its sum):
/// `m = max(m₁, m₂)`, `wᵢ = sᵢ e^{mᵢ − m}`, `out = (w₁ out₁ + w₂ out₂) / (w₁ + w₂)`. A part
/// with `sum = 0` (no key) contributes nothing.
pub fn merge(a: (f32, f32, &[f32]), b: (f32, f32, &[f32]), out: &mut [f32]) -> (f32, f32) {
    let (ma, sa, oa) = a;
    let (mb, sb, ob) = b;
    if sb == 0.0 {
        out.copy_from_slice(oa);
        return (ma, sa);
    }
    if sa == 0.0 {
        out.copy_from_slice(ob);
        return (mb, sb);
    }
    let m = ma.max(mb);
    let (wa, wb) = (sa * (ma - m).exp(), sb * (mb - m).exp());
    let total = wa + wb;
    for ((o, &x), &y) in out.iter_mut().zip(oa).zip(ob) {
        *o = (wa * x + wb * y) / total;
    }
    (m, total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_within_3e7_relative() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp(x));
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn merge_equals_one_softmax_over_both_parts() {
        let (s1, s2) = ([0.3f32, -1.0, 2.0], [1.5f32, 0.1]);
        let (v1, v2) = ([1.0f32, 2.0, 3.0], [-4.0f32, 5.0]);
        let part = |s: &[f32], v: &[f32]| {
            let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let w: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
            let sum: f32 = w.iter().sum();
            let o: f32 = w.iter().zip(v).map(|(a, b)| a * b).sum::<f32>() / sum;
            (m, sum, o)
        };
        let (m1, l1, o1) = part(&s1, &v1);
        let (m2, l2, o2) = part(&s2, &v2);
        let mut out = [0.0f32];
        merge((m1, l1, &[o1]), (m2, l2, &[o2]), &mut out);
        let all_s: Vec<f32> = s1.iter().chain(&s2).cloned().collect();
        let all_v: Vec<f32> = v1.iter().chain(&v2).cloned().collect();
        let (_, _, o) = part(&all_s, &all_v);
        assert!((out[0] - o).abs() < 1e-6, "{} vs {o}", out[0]);
        let mut out = [0.0f32];
        assert_eq!(
            merge((m1, l1, &[o1]), (0.0, 0.0, &[9.0]), &mut out),
            (m1, l1)
        );
        assert_eq!(out[0], o1);
    }
}
