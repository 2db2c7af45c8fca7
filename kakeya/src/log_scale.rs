//! Scales on a logarithmic grid (`scale_format = "log8"`, docs/codec.md "Log scales"):
//! level `k` is `2^(k/16)`; a block record stores a base level `e0` and one byte per
//! scale, `0` for a zero scale and `c ≥ 1` for level `e0 + c − 1`.

use crate::error::{CodecError, Result};

/// Levels per octave.
pub const PER_OCTAVE: i32 = 16;
/// Largest byte: 254 levels above the base, so a block spans 15.9 octaves.
const TOP: i32 = 254;
/// Levels whose values are normal f32 numbers: `2^(-126) ..= 2^(127 + 15/16)`.
const LOWEST: i32 = -126 * PER_OCTAVE;
const HIGHEST: i32 = 128 * PER_OCTAVE - 1;

/// `2^(j/16)` rounded to f32, `j = 0..16` (the spec's table).
const FRACTIONS: [f32; 16] = [
    f32::from_bits(0x3F800000),
    f32::from_bits(0x3F85AAC3),
    f32::from_bits(0x3F8B95C2),
    f32::from_bits(0x3F91C3D3),
    f32::from_bits(0x3F9837F0),
    f32::from_bits(0x3F9EF532),
    f32::from_bits(0x3FA5FED7),
    f32::from_bits(0x3FAD583F),
    f32::from_bits(0x3FB504F3),
    f32::from_bits(0x3FBD08A4),
    f32::from_bits(0x3FC5672A),
    f32::from_bits(0x3FCE248C),
    f32::from_bits(0x3FD744FD),
    f32::from_bits(0x3FE0CCDF),
    f32::from_bits(0x3FEAC0C7),
    f32::from_bits(0x3FF5257D),
];

/// The value of level `k` (`LOWEST ≤ k ≤ HIGHEST`): an exact product of the table entry
/// and a power of two.
#[inline(always)]
fn level_value(k: i32) -> f32 {
    let octave = k.div_euclid(PER_OCTAVE);
    let power = f32::from_bits(((octave + 127) as u32) << 23);
    FRACTIONS[k.rem_euclid(PER_OCTAVE) as usize] * power
}

/// The nearest level of a positive scale: `round_half_even(16 · log2 s)`, kept to the
/// normal range.
fn nearest_level(s: f32) -> i32 {
    let k = (f64::from(PER_OCTAVE) * f64::from(s).log2()).round_ties_even();
    k.clamp(f64::from(LOWEST), f64::from(HIGHEST)) as i32
}

/// A block's scales on the grid: the base level, one byte per scale and the values the
/// bytes stand for.
#[derive(Debug, Clone, PartialEq)]
pub struct LogScales {
    /// Level of byte 1.
    pub base: i32,
    /// `0` for a zero scale, else `1 +` the level above the base.
    pub bytes: Vec<u8>,
    /// The rounded scales (what decode reads back).
    pub values: Vec<f32>,
}

/// Rounds a block's scales (each `≥ 0` and finite) to the grid. Scales more than 15.9
/// octaves below the largest take the lowest level.
pub fn quantize(scales: &[f32]) -> LogScales {
    let levels: Vec<Option<i32>> = scales
        .iter()
        .map(|&s| (s > 0.0).then(|| nearest_level(s)))
        .collect();
    let top = levels.iter().flatten().max().copied();
    let base = top.map_or(0, |t| (t - TOP).max(LOWEST));
    let bytes = levels
        .iter()
        .map(|l| l.map_or(0, |k| ((k - base).max(0) + 1) as u8))
        .collect();
    let values = levels
        .iter()
        .map(|l| l.map_or(0.0, |k| level_value(k.max(base))))
        .collect();
    LogScales {
        base,
        bytes,
        values,
    }
}

/// The scales of `bytes` above `base`; an error if a byte names a level outside the normal
/// f32 range.
pub fn dequantize(base: i32, bytes: &[u8]) -> Result<Vec<f32>> {
    if !(LOWEST..=HIGHEST).contains(&base) {
        return Err(CodecError::Corrupt(format!(
            "log scale base {base} outside [{LOWEST}, {HIGHEST}]"
        )));
    }
    bytes
        .iter()
        .map(|&c| {
            let k = base + i32::from(c) - 1;
            if k > HIGHEST {
                return Err(CodecError::Corrupt(format!(
                    "log scale level {k} above {HIGHEST}"
                )));
            }
            Ok(byte_value(base, c))
        })
        .collect()
}

/// The scale of one byte above `base`, as [`dequantize`] reads it; `base` and the byte
/// must be ones [`dequantize`] accepted.
#[inline(always)]
pub(crate) fn byte_value(base: i32, byte: u8) -> f32 {
    match byte {
        0 => 0.0,
        c => level_value(base + i32::from(c) - 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_two_to_the_sixteenths() {
        for (j, &f) in FRACTIONS.iter().enumerate() {
            assert_eq!(f, 2f64.powf(j as f64 / 16.0) as f32, "{j}");
        }
        assert_eq!(level_value(0), 1.0);
        assert_eq!(level_value(-16), 0.5);
        assert_eq!(
            level_value(HIGHEST),
            2f64.powf(f64::from(HIGHEST) / 16.0) as f32
        );
        assert!(level_value(LOWEST).is_normal());
    }

    #[test]
    fn rounded_scales_are_within_a_thirty_second_octave() {
        let scales: Vec<f32> = (0..1500).map(|i| 1e-3 * 1.0071f32.powi(i)).collect(); // 15.3 octaves
        let q = quantize(&scales);
        let back = dequantize(q.base, &q.bytes).unwrap();
        assert_eq!(back, q.values);
        for (s, r) in scales.iter().zip(&back) {
            let octaves = (r / s).log2().abs();
            assert!(octaves <= 1.0 / 32.0 + 1e-6, "{s} -> {r}");
        }
    }

    #[test]
    fn zeros_extremes_and_wide_blocks() {
        let zeros = quantize(&[0.0, 0.0]);
        assert_eq!(
            (zeros.base, zeros.bytes, zeros.values),
            (0, vec![0, 0], vec![0.0, 0.0])
        );
        let wide = quantize(&[0.0, f32::MAX, 1e-30, f32::MIN_POSITIVE]);
        assert_eq!(wide.bytes[0], 0);
        assert_eq!(wide.bytes[2], 1, "far below the largest: lowest level");
        let back = dequantize(wide.base, &wide.bytes).unwrap();
        assert_eq!(back, wide.values);
        assert!(back.iter().all(|v| v.is_finite()));
        let tiny = quantize(&[1e-40]);
        assert_eq!((tiny.base, tiny.bytes[0]), (LOWEST, 1));
        assert!(tiny.values[0].is_normal());
    }

    #[test]
    fn bad_bases_and_levels_are_errors() {
        assert!(dequantize(LOWEST - 1, &[1]).is_err());
        assert!(dequantize(HIGHEST + 1, &[]).is_err());
        assert!(dequantize(HIGHEST, &[2]).is_err());
        assert!(dequantize(HIGHEST - 1, &[2]).is_ok());
    }
}
