//! Dense bit packing of `bits`-wide codes, least-significant bit first.

/// Bytes needed for `count` codes of `bits` bits.
pub fn packed_len(count: usize, bits: u8) -> usize {
    (count * usize::from(bits)).div_ceil(8)
}

/// Packs `codes` (each `< 2^bits`) into `out`, which must be `packed_len` long and zeroed.
pub fn pack(codes: &[u8], bits: u8, out: &mut [u8]) {
    let bits = usize::from(bits);
    let mut acc: u32 = 0;
    let mut filled = 0usize;
    let mut pos = 0usize;
    for &code in codes {
        acc |= u32::from(code) << filled;
        filled += bits;
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

/// Unpacks `out.len()` codes of `bits` bits from `packed`.
pub fn unpack(packed: &[u8], bits: u8, out: &mut [u8]) {
    let mask = (1u32 << bits) - 1;
    let bits = usize::from(bits);
    let mut acc: u32 = 0;
    let mut available = 0usize;
    let mut bytes = packed.iter();
    for code in out.iter_mut() {
        while available < bits {
            acc |= u32::from(*bytes.next().unwrap_or(&0)) << available;
            available += 8;
        }
        *code = (acc & mask) as u8;
        acc >>= bits;
        available -= bits;
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
            let mut back = vec![0u8; codes.len()];
            unpack(&packed, bits, &mut back);
            prop_assert_eq!(back, codes);
        }
    }
}
