//! Lossless entropy coding of code indices (`entropy_coding = true`, docs/codec.md "Entropy
//! coding"): a block's symbols are coded as [`LANES`] interleaved byte-wise rANS streams
//! under one static frequency table fitted to that block and stored beside it.

use crate::error::{CodecError, Result};
use crate::format::{Reader, Writer};

/// Frequencies sum to `2^PROB_BITS`.
pub const PROB_BITS: u32 = 14;
const PROB_TOTAL: u32 = 1 << PROB_BITS;
/// Lower bound of the normalised coder state.
const STATE_LOW: u32 = 1 << 23;

/// A block's frequency table: symbols `first .. first + freq.len()`, frequencies summing to
/// `2^PROB_BITS`, every symbol that occurs at least 1.
#[derive(Debug, Clone, PartialEq)]
pub struct FrequencyTable {
    first: u8,
    freq: Vec<u32>,
    cumulative: Vec<u32>,
}

impl FrequencyTable {
    /// The table of `symbols` (each `< alphabet`, at least one symbol): counts scaled to
    /// `2^PROB_BITS` by floor with 1 for any symbol that occurs, then the difference taken
    /// from (or given to) the largest frequency, lowest symbol first on ties.
    pub fn fit(symbols: &[u8], alphabet: usize) -> Self {
        let mut counts = vec![0u64; alphabet];
        for &s in symbols {
            counts[usize::from(s)] += 1;
        }
        let first = counts.iter().position(|&c| c > 0).unwrap_or(0);
        let last = counts.iter().rposition(|&c| c > 0).unwrap_or(0);
        let total = symbols.len().max(1) as u64;
        let mut freq: Vec<u32> = counts[first..=last]
            .iter()
            .map(|&c| match c {
                0 => 0,
                c => ((c * u64::from(PROB_TOTAL)) / total).max(1) as u32,
            })
            .collect();
        let largest = |freq: &[u32]| {
            let max = *freq.iter().max().expect("non-empty");
            freq.iter().position(|&f| f == max).expect("present")
        };
        let sum: u32 = freq.iter().sum();
        if sum < PROB_TOTAL {
            let i = largest(&freq);
            freq[i] += PROB_TOTAL - sum;
        } else {
            for _ in 0..sum - PROB_TOTAL {
                let i = largest(&freq);
                freq[i] -= 1;
            }
        }
        Self::from_parts(first as u8, freq)
    }

    fn from_parts(first: u8, freq: Vec<u32>) -> Self {
        let cumulative = freq
            .iter()
            .scan(0u32, |acc, &f| {
                let c = *acc;
                *acc += f;
                Some(c)
            })
            .collect();
        Self {
            first,
            freq,
            cumulative,
        }
    }

    /// Serialised: `u8 first`, `u16 count`, `count × u16` frequencies.
    pub fn write(&self, w: &mut Writer) {
        w.buf.push(self.first);
        w.u16(self.freq.len() as u16);
        for &f in &self.freq {
            w.u16(f as u16);
        }
    }

    /// Reads and checks a table for an alphabet of `alphabet` symbols.
    pub fn read(r: &mut Reader<'_>, alphabet: usize) -> Result<Self> {
        let first = r.take(1, "frequency table")?[0];
        let count = usize::from(r.u16("frequency table")?);
        if count == 0 || usize::from(first) + count > alphabet {
            return Err(CodecError::Corrupt(format!(
                "frequency table of symbols {first}..{} outside an alphabet of {alphabet}",
                usize::from(first) + count
            )));
        }
        let freq: Vec<u32> = r
            .take_array(count, 2, "frequency table")?
            .chunks_exact(2)
            .map(|b| u32::from(u16::from_le_bytes([b[0], b[1]])))
            .collect();
        let sum: u32 = freq.iter().sum();
        if sum != PROB_TOTAL {
            return Err(CodecError::Corrupt(format!(
                "frequencies sum to {sum}, expected {PROB_TOTAL}"
            )));
        }
        Ok(Self::from_parts(first, freq))
    }

    /// Bytes of [`FrequencyTable::write`].
    pub fn serialized_len(&self) -> usize {
        3 + 2 * self.freq.len()
    }
}

/// Independent rANS streams per block: code `t` belongs to lane `t mod LANES`, so a decoder
/// can advance the lanes' states side by side instead of waiting on one state's chain.
pub const LANES: usize = 4;

/// Per-symbol constants of the encoder: `⌊x/f⌋·2^14 + (x mod f) + C` computed as
/// `x + bias + q·(2^14 − f)` with `q = ⌊x/f⌋` from a multiply by a rounded-up reciprocal
/// (exact for `x < 2^31`; Alverson's method, as in ryg's rans_byte).
#[derive(Clone, Copy, Default)]
struct EncSymbol {
    x_max: u64,
    rcp_freq: u64,
    rcp_shift: u32,
    bias: u64,
    cmpl_freq: u64,
}

impl EncSymbol {
    fn new(freq: u32, cumulative: u32) -> Self {
        let (rcp_freq, rcp_shift, bias) = if freq < 2 {
            // f = 1: q = x − 1 via the all-ones reciprocal, the bias absorbs the rest.
            (
                u64::from(u32::MAX),
                0,
                u64::from(cumulative + PROB_TOTAL - 1),
            )
        } else {
            let shift = 32 - (freq - 1).leading_zeros(); // ⌈log2 f⌉
            let rcp = (1u64 << (shift + 31)).div_ceil(u64::from(freq));
            (rcp, shift - 1, u64::from(cumulative))
        };
        Self {
            x_max: u64::from(((STATE_LOW >> PROB_BITS) << 8) * freq),
            rcp_freq,
            rcp_shift,
            bias,
            cmpl_freq: u64::from(PROB_TOTAL - freq),
        }
    }

    #[inline(always)]
    fn code(&self, x: u64) -> u64 {
        let q = ((x * self.rcp_freq) >> 32) >> self.rcp_shift;
        x + self.bias + q * self.cmpl_freq
    }
}

/// The coded form of `symbols` (every one in `table` with a nonzero frequency): for each
/// of the [`LANES`] lanes a `u32` length and its stream (4 bytes of final state,
/// big-endian, then the renormalisation bytes in decoding order).
pub fn encode(symbols: &[u8], table: &FrequencyTable) -> Vec<u8> {
    let mut enc = [EncSymbol::default(); 256];
    for (i, (&f, &c)) in table.freq.iter().zip(&table.cumulative).enumerate() {
        if f > 0 {
            enc[i] = EncSymbol::new(f, c);
        }
    }
    // Each lane's bytes are written backwards into its own buffer (at most 2 per code),
    // the lanes interleaved so that their chains overlap.
    let per_lane = symbols.len().div_ceil(LANES);
    let mut bufs: Vec<Vec<u8>> = (0..LANES).map(|_| vec![0u8; 2 * per_lane + 4]).collect();
    let mut ends = [2 * per_lane + 4; LANES];
    let mut x = [u64::from(STATE_LOW); LANES];
    for (t, &s) in symbols.iter().enumerate().rev() {
        let lane = t % LANES;
        let e = &enc[usize::from(s - table.first)];
        // Emit the low bytes while x ≥ x_max (at most two): written unconditionally, kept
        // by moving the end.
        let emit = usize::from(x[lane] >= e.x_max) + usize::from(x[lane] >= e.x_max << 8);
        let (buf, end) = (&mut bufs[lane], &mut ends[lane]);
        buf[*end - 1] = x[lane] as u8;
        buf[*end - 2] = (x[lane] >> 8) as u8;
        *end -= emit;
        x[lane] = e.code(x[lane] >> (8 * emit as u32));
    }
    let mut w = Writer::default();
    for ((buf, end), state) in bufs.iter_mut().zip(ends).zip(x) {
        let start = end - 4;
        buf[start..end].copy_from_slice(&(state as u32).to_be_bytes());
        let stream = &buf[start..];
        w.u32(stream.len() as u32);
        w.buf.extend_from_slice(stream);
    }
    w.buf
}

/// Decodes `out.len()` symbols from the bytes of [`encode`]; every lane must be used
/// exactly, ending in the encoder's initial state, so damage is an error rather than wrong
/// symbols.
pub fn decode(coded: &[u8], table: &FrequencyTable, out: &mut [u8]) -> Result<()> {
    let corrupt = |why: &str| CodecError::Corrupt(format!("entropy-coded codes: {why}"));
    // Fixed-size tables indexed by a masked slot or a u8: no bounds checks in the loop.
    let mut slot_symbol = vec![0u8; PROB_TOTAL as usize].into_boxed_slice();
    let mut freq_cum = [(0u64, 0u64); 256];
    for (i, (&f, &c)) in table.freq.iter().zip(&table.cumulative).enumerate() {
        slot_symbol[c as usize..(c + f) as usize].fill(i as u8);
        freq_cum[i] = (u64::from(f), u64::from(c));
    }
    let slot_symbol: &[u8; PROB_TOTAL as usize] =
        (&*slot_symbol).try_into().expect("PROB_TOTAL entries");
    let mut r = Reader::new(coded, 0);
    // u64 states so that a damaged state cannot overflow.
    let mut x = [0u64; LANES];
    let mut lanes: [&[u8]; LANES] = [&[]; LANES];
    for (state, stream) in x.iter_mut().zip(lanes.iter_mut()) {
        let len = r.u32("rANS lane length")? as usize;
        let lane = r.take(len, "rANS lane")?;
        let Some((head, rest)) = lane.split_first_chunk::<4>() else {
            return Err(corrupt("lane shorter than its 4-byte state"));
        };
        *state = u64::from(u32::from_be_bytes(*head));
        *stream = rest;
    }
    if r.remaining() != 0 {
        return Err(corrupt("bytes after the last lane"));
    }
    let mask = u64::from(PROB_TOTAL - 1);
    let low = u64::from(STATE_LOW);
    let mut pos = [0usize; LANES];
    let mut step = |lane: usize| -> u8 {
        let slot = x[lane] & mask;
        let i = slot_symbol[slot as usize];
        let (f, c) = freq_cum[usize::from(i)];
        let v = f * (x[lane] >> PROB_BITS) + slot - c;
        // A valid state is now ≥ 2^9 (x ≥ 2^23 before, f ≥ 1), so at most two bytes bring
        // it back above 2^23: read them without a data-dependent branch, which would
        // mispredict about every other code. Reads past the end give 0 and are caught below.
        let needed = usize::from(v < low) + usize::from(v < low >> 8);
        let (stream, p) = (lanes[lane], pos[lane]);
        let next = |k: usize| u64::from(stream.get(p + k).copied().unwrap_or(0));
        let shift = 8 * needed as u32;
        x[lane] = (v << shift) | (((next(0) << 8) | next(1)) >> (16 - shift));
        pos[lane] = p + needed;
        table.first + i
    };
    let mut groups = out.chunks_exact_mut(LANES);
    for group in &mut groups {
        // A fixed count of independent lanes: their chains overlap.
        for (lane, o) in group.iter_mut().enumerate() {
            *o = step(lane);
        }
    }
    for (lane, o) in groups.into_remainder().iter_mut().enumerate() {
        *o = step(lane);
    }
    if pos.iter().zip(&lanes).any(|(&p, s)| p > s.len()) {
        return Err(corrupt("a lane ends before its symbols"));
    }
    if x.iter().any(|&v| v != low) || pos.iter().zip(&lanes).any(|(&p, s)| p != s.len()) {
        return Err(corrupt("a lane does not end where its symbols do"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(symbols: &[u8], alphabet: usize) -> Vec<u8> {
        let table = FrequencyTable::fit(symbols, alphabet);
        let mut w = Writer::default();
        table.write(&mut w);
        let read = FrequencyTable::read(&mut Reader::new(&w.buf, 0), alphabet).unwrap();
        assert_eq!(read, table);
        let stream = encode(symbols, &table);
        let mut out = vec![0u8; symbols.len()];
        decode(&stream, &read, &mut out).unwrap();
        assert_eq!(out, symbols);
        stream
    }

    #[test]
    fn reciprocal_step_equals_the_division() {
        let mut seed = 7u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            seed >> 33
        };
        for f in (1..=PROB_TOTAL)
            .step_by(7)
            .chain([1, 2, 3, PROB_TOTAL - 1, PROB_TOTAL])
        {
            let c = (next() as u32) % (PROB_TOTAL - f + 1);
            let e = EncSymbol::new(f, c);
            // states the coder meets after renormalisation: [x_max / 256, x_max)
            let lo = e.x_max >> 8;
            for x in [lo, lo + 1, e.x_max - 1, e.x_max / 2]
                .into_iter()
                .chain((0..50).map(|_| lo + next() % (e.x_max - lo)))
            {
                let f64_ = u64::from(f);
                let want = ((x / f64_) << PROB_BITS) + x % f64_ + u64::from(c);
                assert_eq!(e.code(x), want, "f {f} c {c} x {x}");
            }
        }
    }

    #[test]
    fn single_symbol_costs_only_the_states() {
        assert_eq!(roundtrip(&[5; 1000], 16).len(), LANES * (4 + 4));
    }

    #[test]
    fn skewed_symbols_approach_their_entropy() {
        // p = (1/2, 1/4, 1/8, 1/8): 1.75 bits per symbol.
        let symbols: Vec<u8> = (0..8000u32)
            .map(|i| match i % 8 {
                0..=3 => 0,
                4 | 5 => 1,
                6 => 2,
                _ => 3,
            })
            .collect();
        let bits = 8.0 * (roundtrip(&symbols, 4).len() - LANES * 8) as f64 / symbols.len() as f64;
        assert!((1.75..1.76).contains(&bits), "{bits} bits per symbol");
    }

    #[test]
    fn rare_symbols_keep_a_nonzero_frequency() {
        let mut symbols = vec![0u8; 100_000];
        symbols[7] = 255;
        symbols[99] = 128;
        roundtrip(&symbols, 256);
        let t = FrequencyTable::fit(&symbols, 256);
        assert_eq!(t.freq.iter().sum::<u32>(), PROB_TOTAL);
        assert!(t.freq[255] >= 1 && t.freq[128] >= 1);
    }

    #[test]
    fn many_rare_and_many_common_symbols_still_sum_exactly() {
        // 128 symbols seen once next to 128 common ones: rounding up the rare ones
        // overshoots, and the excess must come off the largest frequencies.
        let mut symbols: Vec<u8> = (0..128u8).collect();
        for s in 128..=255u8 {
            symbols.extend(std::iter::repeat_n(s, 1000));
        }
        roundtrip(&symbols, 256);
    }

    #[test]
    fn damaged_streams_are_errors() {
        let symbols: Vec<u8> = (0..4000u32).map(|i| (i * 7 % 13) as u8).collect();
        let table = FrequencyTable::fit(&symbols, 16);
        let stream = encode(&symbols, &table);
        let mut out = vec![0u8; symbols.len()];
        assert!(decode(&stream[..stream.len() - 1], &table, &mut out).is_err());
        assert!(decode(&[], &table, &mut out).is_err());
        let mut longer = stream.clone();
        longer.push(0);
        assert!(decode(&longer, &table, &mut out).is_err());
        for at in [0, 4, 9, stream.len() / 2] {
            // a lane length, a state, a renormalisation byte
            let mut flipped = stream.clone();
            flipped[at] ^= 0x40;
            assert!(decode(&flipped, &table, &mut out).is_err(), "byte {at}");
        }
    }

    #[test]
    fn bad_tables_are_errors() {
        let mut w = Writer::default();
        FrequencyTable::fit(&[3, 4, 4], 8).write(&mut w);
        assert!(FrequencyTable::read(&mut Reader::new(&w.buf, 0), 4).is_err());
        let mut bad_sum = w.buf.clone();
        bad_sum[3] ^= 1;
        assert!(FrequencyTable::read(&mut Reader::new(&bad_sum, 0), 8).is_err());
        assert!(FrequencyTable::read(&mut Reader::new(&w.buf[..4], 0), 8).is_err());
    }

    proptest! {
        #[test]
        fn any_symbols_roundtrip(bits in 1u32..=8, raw in proptest::collection::vec(any::<u8>(), 1..3000)) {
            let alphabet = 1usize << bits;
            let symbols: Vec<u8> = raw.iter().map(|&s| (usize::from(s) % alphabet) as u8).collect();
            roundtrip(&symbols, alphabet);
        }

        #[test]
        fn arbitrary_streams_never_panic(stream in proptest::collection::vec(any::<u8>(), 0..64), n in 0usize..100) {
            let table = FrequencyTable::fit(&[0, 1, 1, 2, 3, 3, 3, 3], 4);
            let mut out = vec![0u8; n];
            let _ = decode(&stream, &table, &mut out);
        }
    }
}
