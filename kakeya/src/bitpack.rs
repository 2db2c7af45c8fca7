//! Dense bit packing of `bits`-wide codes, least-significant bit first.

/// Bytes needed for `count` codes of `bits` bits.
pub fn packed_len(count: usize, bits: u8) -> usize {
    (count * usize::from(bits)).div_ceil(8)
}

/// Packs `codes` (each `< 2^bits`) into `out`, which must be `packed_len` long and zeroed.
#[inline(always)]
pub fn pack(codes: &[u8], bits: u8, out: &mut [u8]) {
    let width = usize::from(bits);
    // Eight codes fill exactly `bits` bytes: whole groups go through one u64.
    let groups = codes.len() / 8;
    for (group, bytes) in codes
        .chunks_exact(8)
        .zip(out.chunks_exact_mut(width))
        .take(groups)
    {
        let word = group
            .iter()
            .enumerate()
            .fold(0u64, |w, (i, &c)| w | u64::from(c) << (i * width));
        bytes.copy_from_slice(&word.to_le_bytes()[..width]);
    }
    let mut acc: u32 = 0;
    let mut filled = 0usize;
    let mut pos = groups * width;
    for &code in &codes[groups * 8..] {
        acc |= u32::from(code) << filled;
        filled += width;
        while filled >= 8 {
            out[pos] = acc as u8;
            pos += 1;
            acc >>= 8;
            filled -= 8;
        }
    }
    if filled > 0 {
        out[pos] = acc as u8;
    }
}

/// Unpacks `out.len()` codes of `bits` bits from `packed` and writes `table[code]` (one pass
/// instead of codes then values). `table` must hold `2^bits` values.
#[inline(always)]
pub fn unpack_lookup(packed: &[u8], bits: u8, table: &[f32], out: &mut [f32]) {
    let mask = (1u64 << bits) - 1;
    let width = usize::from(bits);
    let groups = match bits {
        1 => lookup_small::<1>(packed, table, out),
        2 => lookup_small::<2>(packed, table, out),
        3 => lookup_small::<3>(packed, table, out),
        4 => lookup_small::<4>(packed, table, out),
        _ => lookup_gather(packed, bits, table, out),
    };
    let mut acc: u64 = 0;
    let mut available = 0usize;
    let mut bytes = packed[groups * width..].iter();
    for v in out[groups * 8..].iter_mut() {
        while available < width {
            acc |= u64::from(*bytes.next().unwrap_or(&0)) << available;
            available += 8;
        }
        *v = table[(acc & mask) as usize];
        acc >>= width;
        available -= width;
    }
}

/// Whole groups of eight `B`-bit codes (`B ≤ 4`) to values, with AVX2 table permutes where
/// [`crate::simd::enabled`], else by indexing (the same values: a lookup is exact).
#[inline(always)]
fn lookup_small<const B: usize>(packed: &[u8], table: &[f32], out: &mut [f32]) -> usize {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::enabled() {
        // SAFETY: `enabled` checked that the CPU has AVX2.
        return unsafe { lookup_small_avx2::<B>(packed, table, out) };
    }
    lookup_gather(packed, B as u8, table, out)
}

/// Whole groups of eight codes (exactly `bits` bytes, one `u64`) to values by indexing.
#[inline(always)]
fn lookup_gather(packed: &[u8], bits: u8, table: &[f32], out: &mut [f32]) -> usize {
    let mask = (1u64 << bits) - 1;
    let width = usize::from(bits);
    let groups = (out.len() / 8).min(packed.len() / width);
    for (values, bytes) in out
        .chunks_exact_mut(8)
        .zip(packed.chunks_exact(width))
        .take(groups)
    {
        let mut word = [0u8; 8];
        word[..width].copy_from_slice(bytes);
        let word = u64::from_le_bytes(word);
        for (i, v) in values.iter_mut().enumerate() {
            *v = table[((word >> (i * width)) & mask) as usize];
        }
    }
    groups
}

/// Eight codes at a time index a register holding the table with `vpermps` (entries 8–15 in
/// a second one, chosen by bit 3).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn lookup_small_avx2<const B: usize>(
    packed: &[u8],
    table: &[f32],
    out: &mut [f32],
) -> usize {
    use std::arch::x86_64::*;
    let entries = 1usize << B;
    let mut t = [0.0f32; 16];
    t[..entries].copy_from_slice(&table[..entries]);
    let (lo, hi) = (
        _mm256_loadu_ps(t.as_ptr()),
        _mm256_loadu_ps(t.as_ptr().add(8)),
    );
    let b = B as i32;
    let shifts = _mm256_setr_epi32(0, b, 2 * b, 3 * b, 4 * b, 5 * b, 6 * b, 7 * b);
    let mask = _mm256_set1_epi32((1 << B) - 1);
    let groups = (out.len() / 8).min(packed.len() / B);
    for (values, bytes) in out
        .chunks_exact_mut(8)
        .zip(packed.chunks_exact(B))
        .take(groups)
    {
        let mut word = [0u8; 4];
        word[..B].copy_from_slice(bytes);
        let word = _mm256_set1_epi32(i32::from_le_bytes(word));
        let codes = _mm256_and_si256(_mm256_srlv_epi32(word, shifts), mask);
        let mut v = _mm256_permutevar8x32_ps(lo, codes);
        if B == 4 {
            let high = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(codes));
            v = _mm256_blendv_ps(v, _mm256_permutevar8x32_ps(hi, codes), high);
        }
        _mm256_storeu_ps(values.as_mut_ptr(), v);
    }
    groups
}

/// Bytes needed for `rows` rows of codes whose widths are `widths` (one per component).
/// `None` on overflow.
pub fn packed_len_widths(rows: usize, widths: &[u8]) -> Option<usize> {
    let per_row: usize = widths.iter().map(|&w| usize::from(w)).sum();
    Some(rows.checked_mul(per_row)?.div_ceil(8))
}

/// Packs `codes` (`rows × widths.len()`, row-major; code `j` of a row `< 2^widths[j]`) into
/// one LSB-first bit stream, each row's codes in component order; width-0 components
/// take no bits. `out` must be [`packed_len_widths`] long and zeroed.
pub fn pack_widths(codes: &[u8], widths: &[u8], out: &mut [u8]) {
    let mut acc: u32 = 0;
    let mut filled = 0usize;
    let mut pos = 0usize;
    for row in codes.chunks_exact(widths.len().max(1)) {
        for (&code, &w) in row.iter().zip(widths) {
            acc |= u32::from(code) << filled;
            filled += usize::from(w);
            while filled >= 8 {
                out[pos] = acc as u8;
                pos += 1;
                acc >>= 8;
                filled -= 8;
            }
        }
    }
    if filled > 0 {
        out[pos] = acc as u8;
    }
}

/// Inverse of [`pack_widths`]: fills `out` (`rows × widths.len()`); width-0 codes are 0.
pub fn unpack_widths(packed: &[u8], widths: &[u8], out: &mut [u8]) {
    let mut acc: u32 = 0;
    let mut available = 0usize;
    let mut bytes = packed.iter();
    for row in out.chunks_exact_mut(widths.len().max(1)) {
        for (code, &w) in row.iter_mut().zip(widths) {
            let w = usize::from(w);
            while available < w {
                acc |= u32::from(*bytes.next().unwrap_or(&0)) << available;
                available += 8;
            }
            *code = (acc & ((1u32 << w) - 1)) as u8;
            acc >>= w;
            available -= w;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lsb_first_layout() {
        let mut out = [0u8; 2];
        pack(&[1, 2, 3, 4, 5], 3, &mut out);
        // 001 010 011 100 101 -> bits LSB first: 1 | 2<<3 | 3<<6 | 4<<9 | 5<<12
        let v = 1u16 | 2 << 3 | 3 << 6 | 4 << 9 | 5 << 12;
        assert_eq!(out, v.to_le_bytes());
    }

    proptest! {
        #[test]
        fn pack_roundtrip(bits in 1u8..=8, raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            let codes: Vec<u8> = raw.iter().map(|c| (u32::from(*c) & ((1u32 << bits) - 1)) as u8).collect();
            let mut packed = vec![0u8; packed_len(codes.len(), bits)];
            pack(&codes, bits, &mut packed);
            let identity: Vec<f32> = (0..1u32 << bits).map(|c| c as f32).collect();
            let mut back = vec![f32::NAN; codes.len()];
            unpack_lookup(&packed, bits, &identity, &mut back);
            prop_assert_eq!(back, codes.iter().map(|&c| f32::from(c)).collect::<Vec<_>>());
            let table: Vec<f32> = (0..1u32 << bits).map(|c| c as f32 * 0.5 - 3.0).collect();
            let mut values = vec![f32::NAN; codes.len()];
            unpack_lookup(&packed, bits, &table, &mut values);
            let expected: Vec<f32> = codes.iter().map(|&c| table[usize::from(c)]).collect();
            prop_assert_eq!(values, expected);
        }

        #[test]
        fn pack_widths_roundtrip(
            widths in proptest::collection::vec(0u8..=8, 1..20),
            rows in 0usize..12,
            seed in any::<u64>(),
        ) {
            let mut rng = crate::rng::SplitMix64::new(seed, 0, 0, 0);
            let codes: Vec<u8> = (0..rows * widths.len())
                .map(|i| (rng.next_u64() & ((1u64 << widths[i % widths.len()]) - 1)) as u8)
                .collect();
            let mut packed = vec![0u8; packed_len_widths(rows, &widths).unwrap()];
            pack_widths(&codes, &widths, &mut packed);
            let mut back = vec![0u8; codes.len()];
            unpack_widths(&packed, &widths, &mut back);
            prop_assert_eq!(&back, &codes);
            // Equal widths give the fixed-width layout.
            if widths.iter().all(|&w| w == widths[0]) && widths[0] > 0 {
                let mut fixed = vec![0u8; packed_len(codes.len(), widths[0])];
                pack(&codes, widths[0], &mut fixed);
                prop_assert_eq!(fixed, packed);
            }
        }
    }

    #[test]
    fn widths_layout_is_lsb_first() {
        // Widths [3, 0, 5]: row codes 0b101, (none), 0b10011 -> 101 | 10011 << 3.
        let mut out = [0u8; 1];
        pack_widths(&[0b101, 0, 0b10011], &[3, 0, 5], &mut out);
        assert_eq!(out[0], 0b1001_1101);
    }
}
