//! Allocation "variance": per-component bit widths and normalisers of a skeleton, their
//! per-row scales, and the allocation's bytes in a skeleton record.

use crate::allocation::allocate;
use crate::error::{CodecError, Result};
use crate::format::{self, Reader, ScaleDtype, Writer};
use crate::lloyd_max::{gaussian_table, Quantizer, MAX_TABLE_BITS};

/// Per-component bits `b_i` and normalisers `σ_i` of one skeleton (allocation
/// "variance"); `σ_i = 0` exactly where `b_i = 0`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct BitAllocation {
    pub(super) bits: Vec<u8>,
    pub(super) sigma: Vec<f32>,
}

impl BitAllocation {
    /// Number of components that get codes.
    pub(super) fn coded(&self) -> usize {
        self.bits.iter().filter(|&&b| b > 0).count()
    }
}

/// The Gaussian quantizers of 1..=8 bits, index `b − 1`.
pub(super) fn width_quantizers() -> Vec<Quantizer> {
    (1..=MAX_TABLE_BITS)
        .map(|b| Quantizer::new(gaussian_table(b)))
        .collect()
}

/// Variances `λ_i = Σ c_{t,i}² / N` over every row of `blocks` (f64, rows in order), then
/// the greedy allocation of `bits · r` bits and `σ_i = √λ_i` (f32; 0 where `b_i = 0`).
/// A component whose `σ_i` would be 0 in f32 counts as variance 0.
pub(super) fn allocation_of(blocks: &[&[f32]], rank: usize, bits: u8) -> BitAllocation {
    if rank == 0 {
        return BitAllocation {
            bits: Vec::new(),
            sigma: Vec::new(),
        };
    }
    let mut sum = vec![0.0f64; rank];
    let mut rows = 0usize;
    for coef in blocks {
        for row in coef.chunks_exact(rank) {
            for (s, &v) in sum.iter_mut().zip(row) {
                *s += f64::from(v) * f64::from(v);
            }
            rows += 1;
        }
    }
    let lambda: Vec<f64> = sum
        .iter()
        .map(|s| {
            let l = s / rows.max(1) as f64;
            if (l.sqrt() as f32) > 0.0 {
                l
            } else {
                0.0
            }
        })
        .collect();
    let bits = allocate(&lambda, usize::from(bits) * rank);
    let sigma = lambda
        .iter()
        .zip(&bits)
        .map(|(l, &b)| if b > 0 { l.sqrt() as f32 } else { 0.0 })
        .collect();
    BitAllocation { bits, sigma }
}

/// Per-row scale `s_t = sqrt(mean over b_i > 0 of (c_{t,i} / σ_i)²)` (f64, then f32).
pub(super) fn variance_scales(coef: &[f32], alloc: &BitAllocation) -> Vec<f32> {
    let rank = alloc.bits.len();
    let coded = alloc.coded();
    if coded == 0 {
        return vec![0.0; coef.len().checked_div(rank).unwrap_or(0)];
    }
    coef.chunks_exact(rank)
        .map(|row| {
            let power: f64 = row
                .iter()
                .zip(alloc.bits.iter().zip(&alloc.sigma))
                .filter(|(_, (&b, _))| b > 0)
                .map(|(&c, (_, &sigma))| {
                    let u = f64::from(c) / f64::from(sigma);
                    u * u
                })
                .sum();
            (power / coded as f64).sqrt() as f32
        })
        .collect()
}

pub(super) fn write_allocation(w: &mut Writer, alloc: &BitAllocation, dtype: ScaleDtype) {
    w.buf.extend_from_slice(&alloc.bits);
    w.scales(&alloc.sigma, dtype);
}

pub(super) fn read_allocation(
    r: &mut Reader<'_>,
    rank: usize,
    bits: u8,
    dtype: ScaleDtype,
) -> Result<BitAllocation> {
    let widths = r.take(rank, "bit allocation")?.to_vec();
    let sigma = format::read_floats(
        r.take_array(rank, dtype.size(), "component scales")?,
        dtype.size(),
        "component scales",
    )?;
    let mut spent = 0usize;
    for (i, (&b, &s)) in widths.iter().zip(&sigma).enumerate() {
        if b > MAX_TABLE_BITS || (b > 0) != (s > 0.0) || s < 0.0 {
            return Err(CodecError::Corrupt(format!(
                "component {i}: {b} bits with scale {s} (bits must be 0..=8, and the scale > 0 \
                 exactly when bits > 0)"
            )));
        }
        spent += usize::from(b);
    }
    if spent > usize::from(bits) * rank {
        return Err(CodecError::Corrupt(format!(
            "bit allocation spends {spent} bits on {rank} components, more than bits={bits} allows"
        )));
    }
    Ok(BitAllocation {
        bits: widths,
        sigma,
    })
}
