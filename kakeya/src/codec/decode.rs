//! Decoding: block records back to `[tokens, heads, dim]` values, block by block or (for
//! the row layout) token range by token range.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

use super::records::{BlockRecord, CodeValues, Codes};
use super::variance::{width_quantizers, BitAllocation};
use super::{coded_width, quantizer_for, right_multiply, unrotated_basis, Encoded};
use crate::bitpack;
use crate::config::{Allocation, Basis, Rotation};
use crate::error::{CodecError, Result};
use crate::hadamard;
use crate::parallel::{for_each_chunk_mut, map_jobs};
use crate::tensor::{DType, OwnedElements};

/// The decoded `[tokens, heads, dim]` buffer while block jobs fill it in parallel: the job of
/// (head `h`, block `b`) writes only head `h`'s values in block `b`'s token rows.
struct BlockRows {
    ptr: *mut f32,
    len: usize,
    heads: usize,
    dim: usize,
}

// SAFETY: jobs write disjoint elements (see `rows`) of a buffer that outlives them.
unsafe impl Sync for BlockRows {}

impl BlockRows {
    /// Head `h`'s values at tokens `first..first + n`: `n × dim` with row stride `heads · dim`.
    ///
    /// # Safety
    /// No two matrices alive at once may share a (token, head) pair.
    unsafe fn rows(&self, first: usize, n: usize, h: usize) -> MatMut<'_, f32> {
        let (heads, dim) = (self.heads, self.dim);
        assert!(n > 0 && h < heads && ((first + n - 1) * heads + h + 1) * dim <= self.len);
        MatMut::from_raw_parts_mut(
            self.ptr.add((first * heads + h) * dim),
            n,
            dim,
            (heads * dim) as isize,
            1,
        )
    }

    /// Head `h`'s `dim` values at token `t`.
    ///
    /// # Safety
    /// As for [`BlockRows::rows`].
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, t: usize, h: usize) -> &mut [f32] {
        let at = (t * self.heads + h) * self.dim;
        assert!(h < self.heads && at + self.dim <= self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(at), self.dim)
    }
}

/// `c_{t,i} = (ẑ_{t,i} · ŝ_t) · σ̂_i` for components with bits, 0 for the others.
#[inline(always)]
fn dequantize_variance(
    record: &BlockRecord<'_>,
    alloc: &BitAllocation,
    rank: usize,
    coef: &mut [f32],
) {
    if alloc.coded() == 0 {
        return;
    }
    let quantizers = width_quantizers();
    let mut codes = vec![0u8; coef.len()];
    if let Codes::Packed(packed) = record.codes {
        bitpack::unpack_widths(packed, &alloc.bits, &mut codes);
    }
    let mut z: Vec<f32> = codes
        .iter()
        .enumerate()
        .map(|(k, &c)| match alloc.bits[k % rank] {
            0 => 0.0,
            b => quantizers[usize::from(b) - 1].value(c),
        })
        .collect();
    for &(i, v) in &record.outliers {
        z[i] = v;
    }
    for ((out, row), &s) in coef
        .chunks_exact_mut(rank)
        .zip(z.chunks_exact(rank))
        .zip(&record.scales)
    {
        for (i, (o, &zi)) in out.iter_mut().zip(row).enumerate() {
            if alloc.bits[i] > 0 {
                *o = (zi * s) * alloc.sigma[i];
            }
        }
    }
}

impl Encoded {
    /// Decodes block `job` into its rows of `out`: `x̂ = μ̂ + y M` with `y` the scaled codes
    /// and `M` the inverse rotation folded into the basis (and the inverse pre-conditioner
    /// into both), one matrix product per block; the per-row inverse rotation remains
    /// where the basis is the identity.
    #[inline(always)]
    fn decode_block(&self, job: usize, out: &BlockRows) -> Result<()> {
        let config = &self.header.config;
        let [_, _, dim] = self.header.shape;
        let per_head = self.header.blocks_per_head;
        let (h, b) = (job / per_head, job % per_head);
        let n = self.block_len(b);
        let (start, _) = self.blocks[job];
        let body = &self.bytes[self.body_start..self.bytes.len() - 4];
        let (record, _) = self.parse_block(
            &body[start..],
            self.body_start + start,
            n,
            self.shared.get(h),
            self.shared_alloc.get(h),
        )?;
        let sk = record
            .own_skeleton
            .as_ref()
            .unwrap_or_else(|| &self.shared[h]);
        let identity = sk.has_identity_basis();
        let padded = coded_width(sk.rank, config);
        let rotate = config.rotation == Rotation::Hadamard;
        // y: n × width; map: width × D (None: y's first D columns are the rows).
        let (y, width, mut map) = if config.allocation == Allocation::Variance {
            let alloc = record
                .own_alloc
                .as_ref()
                .unwrap_or_else(|| &self.shared_alloc[h]);
            let mut coef = vec![0.0f32; n * sk.rank];
            dequantize_variance(&record, alloc, sk.rank, &mut coef);
            let map = (!identity).then(|| sk.basis_t.clone());
            (coef, sk.rank, map)
        } else if padded > 0 {
            let quantizer = quantizer_for(config);
            let mut z = vec![0.0f32; n * padded];
            record
                .codes
                .values(n * padded)?
                .lookup(config.bits, quantizer.centroids(), 0, &mut z);
            for &(i, v) in &record.outliers {
                z[i] = v;
            }
            let signs = hadamard::signs(config.seed, padded);
            for (row, &s) in z.chunks_exact_mut(padded).zip(&record.scales) {
                row.iter_mut().for_each(|v| *v *= s);
                if identity && rotate {
                    hadamard::unrotate(row, &signs);
                }
            }
            let map = (!identity).then(|| unrotated_basis(&sk.basis_t, sk.rank, dim, &signs));
            (z, padded, map)
        } else {
            (Vec::new(), 0, Some(Vec::new()))
        };
        let mut mean = sk.mean.clone();
        if let Some(l) = &self.preconditioner {
            let inverse = MatRef::from_row_major_slice(&l[h].1, dim, dim);
            let folded = match &map {
                Some(m) => {
                    let mut folded = vec![0.0f32; width * dim];
                    if width > 0 {
                        matmul(
                            MatMut::from_row_major_slice_mut(&mut folded, width, dim),
                            Accum::Replace,
                            MatRef::from_row_major_slice(m, width, dim),
                            inverse,
                            1.0f32,
                            Par::Seq,
                        );
                    }
                    folded
                }
                None => {
                    // An identity basis has rank D, so y has at least D columns; the rest
                    // (Hadamard padding) get zero rows.
                    let mut folded = vec![0.0f32; width * dim];
                    folded[..dim * dim].copy_from_slice(&l[h].1);
                    folded
                }
            };
            map = Some(folded);
            mean = right_multiply(&mean, dim, &l[h].1);
        }
        let first = b * config.block_size;
        // SAFETY (the `rows` and `row` calls): jobs and (head, block) pairs are one to one,
        // so no other job touches these rows, and each view ends before the next begins.
        match &map {
            Some(m) if width > 0 => matmul(
                unsafe { out.rows(first, n, h) },
                Accum::Replace,
                MatRef::from_row_major_slice(&y, n, width),
                MatRef::from_row_major_slice(m, width, dim),
                1.0f32,
                Par::Seq,
            ),
            Some(_) => (0..n).for_each(|i| unsafe { out.row(first + i, h) }.fill(0.0)),
            None => {
                for (i, values) in y.chunks_exact(width).enumerate() {
                    unsafe { out.row(first + i, h) }.copy_from_slice(&values[..dim]);
                }
            }
        }
        for i in 0..n {
            let row = unsafe { out.row(first + i, h) };
            row.iter_mut().zip(&mean).for_each(|(v, m)| *v += m);
        }
        Ok(())
    }

    /// The decoded tensor's buffer, zeroed; an allocation failure is an error, not an abort.
    fn zeroed_output(&self) -> Result<Vec<f32>> {
        let numel: usize = self.header.shape.iter().product();
        let mut out: Vec<f32> = Vec::new();
        out.try_reserve_exact(numel).map_err(|e| {
            CodecError::Numerical(format!(
                "cannot allocate the decoded tensor {:?}: {e}",
                self.header.shape
            ))
        })?;
        out.resize(numel, 0.0);
        Ok(out)
    }

    /// Whether [`Encoded::decode_rows`] applies: mean-only skeletons, uniform codes, no
    /// pre-conditioner, `D` a power of two and whole bytes per row.
    pub(super) fn decodes_by_rows(&self) -> bool {
        let config = &self.header.config;
        let dim = self.header.shape[2];
        config.basis == Basis::None
            && config.rotation == Rotation::Hadamard
            && config.allocation == Allocation::Uniform
            && self.preconditioner.is_none()
            && dim.is_power_of_two()
            && (dim * usize::from(config.bits)) % 8 == 0
    }

    /// Decodes straight into the output, token range by token range (each one a contiguous
    /// part of `[tokens, heads, dim]`), with no per-block buffers: the same operations in
    /// the same order as [`Encoded::decode_block`], so the same values.
    fn decode_rows(&self, threads: Option<usize>) -> Result<Vec<f32>> {
        const TOKENS_PER_JOB: usize = 128;
        let [_, heads, dim] = self.header.shape;
        let config = &self.header.config;
        let per_head = self.header.blocks_per_head;
        let body = &self.bytes[self.body_start..self.bytes.len() - 4];
        let records: Vec<(BlockRecord<'_>, CodeValues<'_>)> =
            map_jobs(threads, self.blocks.len(), |job| {
                let (h, b) = (job / per_head, job % per_head);
                let start = self.blocks[job].0;
                self.parse_block(
                    &body[start..],
                    self.body_start + start,
                    self.block_len(b),
                    self.shared.get(h),
                    None,
                )
                .and_then(|(record, _)| {
                    let values = record.codes.values(record.scales.len() * dim)?;
                    Ok((record, values))
                })
            })
            .into_iter()
            .collect::<Result<_>>()?;
        let quantizer = quantizer_for(config);
        let signs = hadamard::signs(config.seed, dim);
        let mut out = self.zeroed_output()?;
        let job_len = TOKENS_PER_JOB * heads * dim;
        for_each_chunk_mut(
            threads,
            &mut out,
            job_len,
            #[inline(always)]
            |job, chunk| {
                for (k, token_rows) in chunk.chunks_exact_mut(heads * dim).enumerate() {
                    let t = job * TOKENS_PER_JOB + k;
                    let (b, i) = (t / config.block_size, t % config.block_size);
                    for (h, row) in token_rows.chunks_exact_mut(dim).enumerate() {
                        let (record, codes) = &records[h * per_head + b];
                        let sk = record
                            .own_skeleton
                            .as_ref()
                            .unwrap_or_else(|| &self.shared[h]);
                        codes.lookup(config.bits, quantizer.centroids(), i * dim, row);
                        let first = record.outliers.partition_point(|&(at, _)| at < i * dim);
                        for &(at, v) in record.outliers[first..]
                            .iter()
                            .take_while(|&&(at, _)| at < (i + 1) * dim)
                        {
                            row[at - i * dim] = v;
                        }
                        let s = record.scales[i];
                        row.iter_mut().for_each(|v| *v *= s);
                        hadamard::unrotate(row, &signs);
                        row.iter_mut().zip(&sk.mean).for_each(|(v, m)| *v += m);
                    }
                }
            },
        );
        Ok(out)
    }

    /// Decodes to f32 `[tokens, kv_heads, head_dim]` values.
    pub fn decode(&self, threads: Option<usize>) -> Result<Vec<f32>> {
        if self.header.config.identity {
            return Ok(match self.raw_identity().cast(DType::F32) {
                OwnedElements::F32(v) => v,
                _ => unreachable!("cast to f32 yields f32"),
            });
        }
        if self.decodes_by_rows() {
            return self.decode_rows(threads);
        }
        self.decode_blocks(threads)
    }

    /// Decodes block by block, each job writing its rows of the output.
    fn decode_blocks(&self, threads: Option<usize>) -> Result<Vec<f32>> {
        let [_, heads, dim] = self.header.shape;
        let mut out = self.zeroed_output()?;
        let rows = BlockRows {
            ptr: out.as_mut_ptr(),
            len: out.len(),
            heads,
            dim,
        };
        map_jobs(
            threads,
            self.blocks.len(),
            #[inline(always)]
            |job| self.decode_block(job, &rows),
        )
        .into_iter()
        .collect::<Result<()>>()?;
        Ok(out)
    }

    /// Decodes to `dtype` (default: the input's dtype), where a value beyond the type's
    /// largest finite one saturates there. The identity codec is bit-exact.
    pub fn decode_as(&self, dtype: Option<DType>, threads: Option<usize>) -> Result<OwnedElements> {
        let dtype = dtype.unwrap_or(self.header.dtype);
        if self.header.config.identity {
            return Ok(self.raw_identity().cast(dtype));
        }
        Ok(OwnedElements::from_f32_saturating(
            self.decode(threads)?,
            dtype,
        ))
    }

    fn raw_identity(&self) -> OwnedElements {
        OwnedElements::from_le_bytes(
            &self.bytes[self.body_start..self.bytes.len() - 4],
            self.header.dtype,
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::codec::encode;
    use crate::config::{Basis, CodecConfig};
    use crate::tensor::{Elements, TensorView};

    #[test]
    fn row_decode_equals_block_decode_bit_for_bit() {
        let shape = [700usize, 3, 32];
        let n: usize = shape.iter().product();
        let mut g = vec![0.0f64; n];
        crate::rng::SplitMix64::new(4, 5, 6, 7).fill_gaussian(&mut g);
        // Heavy tails so outliers are stored, and a per-head offset for the mean.
        let x: Vec<f32> = g
            .iter()
            .enumerate()
            .map(|(i, &v)| (v * v * v) as f32 + (i % 96) as f32 * 0.01)
            .collect();
        for (bits, block_size, share_basis) in [(4u8, 256, false), (3, 128, true), (1, 700, false)]
        {
            let config = CodecConfig {
                bits,
                block_size,
                share_basis,
                basis: Basis::None,
                outlier_threshold: Some(2.0),
                ..Default::default()
            };
            let view = TensorView::new(Elements::F32(&x), shape).unwrap();
            let enc = encode(view, &config, None, None).unwrap();
            assert!(enc.decodes_by_rows());
            let by_blocks = enc.decode_blocks(Some(1)).unwrap();
            assert_eq!(enc.decode_rows(Some(1)).unwrap(), by_blocks);
            assert_eq!(enc.decode_rows(Some(2)).unwrap(), by_blocks);
            assert_eq!(enc.decode(None).unwrap(), by_blocks);
        }
    }
}
