//! Encoding: pre-conditioning, skeletons, rotation, scales and quantization of each block,
//! then the records written into one byte string.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

use super::records::{
    round_scale, write_codes, write_grouped_codes, write_outliers, write_rounded_scales,
    write_skeleton,
};
use super::variance::{
    allocation_of, variance_scales, width_quantizers, write_allocation, BitAllocation,
};
use super::{
    coded_width, lower_triangular_inverse, quantizer_for, right_multiply, unrotated_basis, Encoded,
};
use crate::bitpack;
use crate::config::{Allocation, CodecConfig, Metric, Rotation, ScaleFormat, ScaleGranularity};
use crate::error::{CodecError, Result};
use crate::format::{self, Header, ScaleDtype, Writer, MAGIC};
use crate::hadamard;
use crate::lloyd_max::Quantizer;
use crate::parallel::map_jobs;
use crate::pca::{self, Skeleton, SHARED_BLOCK_KEY};
use crate::tensor::{checked_numel, TensorView};

const F16_MIN_NORMAL: f32 = 6.103_515_6e-5;

/// Stage-one result of a block: skeleton, rotated coefficients (uniform) or plain
/// coefficients (variance), and raw scales.
struct RotatedBlock {
    own_skeleton: Option<Skeleton>,
    rank: usize,
    /// Uniform: `n × P` rotated rows. Variance: `n × r` coefficients.
    rotated: Vec<f32>,
    scales: Vec<f32>,
}

/// Validates `L` (`[H, D, D]`, lower triangular, positive diagonal) and rounds it.
fn prepare_preconditioner(
    config: &CodecConfig,
    preconditioner: Option<&[f32]>,
    heads: usize,
    dim: usize,
) -> Result<Option<Vec<Vec<f32>>>> {
    let l = match (config.metric, preconditioner) {
        (Metric::Mse, None) => return Ok(None),
        (Metric::Mse, Some(_)) => {
            return Err(CodecError::Preconditioner(
                "metric=\"mse\" takes no pre-conditioner; use metric=\"inner_product\"".into(),
            ))
        }
        (Metric::InnerProduct, None) => {
            return Err(CodecError::Preconditioner(format!(
            "metric=\"inner_product\" needs a pre-conditioner L of shape [{heads}, {dim}, {dim}]"
        )))
        }
        (Metric::InnerProduct, Some(l)) => l,
    };
    let want = checked_numel([heads, dim, dim])?;
    if l.len() != want {
        return Err(CodecError::Preconditioner(format!(
            "expected shape [{heads}, {dim}, {dim}] ({want} values), got {} values",
            l.len()
        )));
    }
    let dtype = config.skeleton_dtype;
    let mut out = Vec::with_capacity(heads);
    for (h, m) in l.chunks_exact(dim * dim).enumerate() {
        let mut rounded = vec![0.0f32; dim * dim];
        for i in 0..dim {
            for j in 0..dim {
                let v = m[i * dim + j];
                if !v.is_finite() {
                    return Err(CodecError::Preconditioner(format!(
                        "head {h}: non-finite L[{i}][{j}] = {v}"
                    )));
                }
                if j > i && v != 0.0 {
                    return Err(CodecError::Preconditioner(format!(
                        "head {h}: not lower triangular, L[{i}][{j}] = {v} above the diagonal"
                    )));
                }
                let r = dtype.round(f64::from(v));
                if !r.is_finite() || (i == j && r <= 0.0) {
                    let rule = if r.is_finite() {
                        "the diagonal must be > 0"
                    } else {
                        "every entry must be finite"
                    };
                    return Err(CodecError::Preconditioner(format!(
                        "head {h}: L[{i}][{j}] = {v} is {r} once stored as {dtype:?}; {rule} \
                         (use skeleton_dtype=\"f32\" for large or tiny values)"
                    )));
                }
                rounded[i * dim + j] = r;
            }
        }
        out.push(rounded);
    }
    Ok(Some(out))
}

/// Pads and rotates each row; returns the rows and their scales (see [`row_scales`]).
#[inline(always)]
fn rotate_rows(
    coef: Vec<f32>,
    n: usize,
    rank: usize,
    config: &CodecConfig,
    block_scale: bool,
) -> (Vec<f32>, Vec<f32>) {
    let padded = coded_width(rank, config);
    if config.rotation == Rotation::None {
        let scales = row_scales(&coef, n, padded, block_scale);
        return (coef, scales);
    }
    let signs = hadamard::signs(config.seed, padded);
    let mut rotated = if padded == rank {
        coef // nothing to pad: rotate in place
    } else {
        let mut out = vec![0.0f32; n * padded];
        for (row, c) in out.chunks_exact_mut(padded).zip(coef.chunks_exact(rank)) {
            row[..rank].copy_from_slice(c);
        }
        out
    };
    if padded > 0 {
        for row in rotated.chunks_exact_mut(padded) {
            hadamard::rotate(row, &signs);
        }
    }
    let scales = row_scales(&rotated, n, padded, block_scale);
    (rotated, scales)
}

/// `y = (x − μ̂) Mᵀ` for centred rows: the coefficients and their rotation in one product,
/// `M` being the decoder's [`unrotated_basis`] (`Mᵀ = [Û 0] diag(σ) H_P / √P`). Returns the
/// rows and their scales (see [`row_scales`]).
#[inline(always)]
fn project_rotated(
    centered: &[f32],
    dim: usize,
    sk: &Skeleton,
    seed: u64,
    block_scale: bool,
) -> (Vec<f32>, Vec<f32>) {
    let n = centered.len() / dim;
    let padded = hadamard::padded_len(sk.rank);
    let m = unrotated_basis(&sk.basis_t, sk.rank, dim, &hadamard::signs(seed, padded));
    let mut rotated = vec![0.0f32; n * padded];
    matmul(
        MatMut::from_row_major_slice_mut(&mut rotated, n, padded),
        Accum::Replace,
        MatRef::from_row_major_slice(centered, n, dim),
        MatRef::from_row_major_slice(&m, padded, dim).transpose(),
        1.0f32,
        Par::Seq,
    );
    let scales = row_scales(&rotated, n, padded, block_scale);
    (rotated, scales)
}

/// Scales `sqrt(mean y²)` of `n` rotated rows of `padded` values, per row or
/// (`block_scale`) one over the whole block, repeated for every row.
#[inline(always)]
fn row_scales(rotated: &[f32], n: usize, padded: usize, block_scale: bool) -> Vec<f32> {
    let mut scales = vec![0.0f32; n];
    if padded == 0 {
        return scales;
    }
    let mut block_power = 0.0f64;
    for (s, row) in scales.iter_mut().zip(rotated.chunks_exact(padded)) {
        let power = crate::simd::sum_squares(row);
        *s = (power / padded as f64).sqrt() as f32;
        block_power += power;
    }
    if block_scale {
        scales.fill((block_power / (n * padded) as f64).sqrt() as f32);
    }
    scales
}

/// Encodes `input` with `config`. `preconditioner` is `L` as `[H, D, D]` row-major
/// (metric `inner_product` only); `threads = None` uses every core. The bytes do not
/// depend on the thread count.
pub fn encode(
    input: TensorView<'_>,
    config: &CodecConfig,
    preconditioner: Option<&[f32]>,
    threads: Option<usize>,
) -> Result<Encoded> {
    config.validate()?;
    let [tokens, heads, dim] = input.shape;
    let mut header = Header {
        shape: input.shape,
        dtype: input.elements.dtype(),
        config: config.clone(),
        // f16 may still become f32 below, where a scale leaves its range.
        scale_dtype: if config.scale_format == ScaleFormat::Log8 {
            ScaleDtype::Log8
        } else {
            ScaleDtype::F16
        },
        preconditioner: false,
        blocks_per_head: tokens.div_ceil(config.block_size),
        library: format!("kakeya {}", env!("CARGO_PKG_VERSION")),
        version: format::version_for(config),
    };
    // Whole heads are gathered only where something works on them whole: the shared basis
    // and the pre-conditioner (one product per head); blocks otherwise gather their own rows
    // and check them there, which saves a pass over the input.
    let whole_heads = config.share_basis || config.metric == Metric::InnerProduct;
    if config.identity || whole_heads {
        crate::simd::dispatch(|| input.check_finite())?;
    }
    if config.identity {
        return Encoded::from_bytes(assemble(&header, &input.elements.to_le_bytes()));
    }
    let l_hat = prepare_preconditioner(config, preconditioner, heads, dim)?;
    header.preconditioner = l_hat.is_some();
    let per_head = header.blocks_per_head;

    // Hot job closures are `#[inline(always)]` so that they compile into the AVX2 copy of
    // `simd::dispatch`, which `map_jobs` runs every job in.
    let head_rows: Vec<Vec<f32>> = if whole_heads {
        map_jobs(
            threads,
            heads,
            #[inline(always)]
            |h| {
                let rows = input.head_rows(h);
                match &l_hat {
                    Some(l) => right_multiply(&rows, dim, &l[h]),
                    None => rows,
                }
            },
        )
    } else {
        Vec::new()
    };
    let shared: Vec<Skeleton> = if config.share_basis && tokens > 0 {
        map_jobs(threads, heads, |h| {
            pca::fit(&head_rows[h], dim, config, h, SHARED_BLOCK_KEY)
        })
        .into_iter()
        .collect::<Result<_>>()?
    } else {
        Vec::new()
    };

    let block_rows = |job: usize| -> Result<(usize, usize, Vec<f32>)> {
        let (h, b) = (job / per_head, job % per_head);
        let start = b * config.block_size;
        let end = (start + config.block_size).min(tokens);
        if whole_heads {
            return Ok((h, b, head_rows[h][start * dim..end * dim].to_vec()));
        }
        let rows = input.block_rows(h, start..end);
        if !crate::tensor::all_finite(&rows) {
            // The error names the input's first non-finite value, whichever block saw one.
            input.check_finite()?;
        }
        Ok((h, b, rows))
    };
    let variance = config.allocation == Allocation::Variance;
    let mut rotated: Vec<RotatedBlock> = map_jobs(
        threads,
        heads * per_head,
        #[inline(always)]
        |job| {
            let (h, b, mut rows) = block_rows(job)?;
            let n = rows.len() / dim;
            let own = if config.share_basis {
                pca::center(&mut rows, &shared[h].mean);
                None
            } else {
                let (sk, centered) = pca::fit_centered(rows, dim, config, h, b as u64)?;
                rows = centered;
                Some(sk)
            };
            let sk = own.as_ref().unwrap_or_else(|| &shared[h]);
            let rank = sk.rank;
            let block_scale = config.scale_granularity == ScaleGranularity::Block;
            let (rotated, scales) = if variance {
                (pca::project(rows, dim, sk), Vec::new())
            } else if sk.has_identity_basis() || rank == 0 {
                rotate_rows(pca::project(rows, dim, sk), n, rank, config, block_scale)
            } else {
                project_rotated(&rows, dim, sk, config.seed, block_scale)
            };
            Ok(RotatedBlock {
                own_skeleton: own,
                rank,
                rotated,
                scales,
            })
        },
    )
    .into_iter()
    .collect::<Result<_>>()?;

    // Allocation "variance": one allocation per skeleton (per head when the basis is
    // shared, over all of the head's rows), then the per-row scales.
    let allocs: Vec<BitAllocation> = if !variance {
        Vec::new()
    } else if config.share_basis {
        map_jobs(threads, shared.len(), |h| {
            let coefs: Vec<&[f32]> = rotated[h * per_head..(h + 1) * per_head]
                .iter()
                .map(|b| &b.rotated[..])
                .collect();
            allocation_of(&coefs, shared[h].rank, config.bits)
        })
    } else {
        map_jobs(threads, rotated.len(), |job| {
            allocation_of(&[&rotated[job].rotated], rotated[job].rank, config.bits)
        })
    };
    let alloc_index = |job: usize| {
        if config.share_basis {
            job / per_head
        } else {
            job
        }
    };
    if variance {
        let scales: Vec<Vec<f32>> = map_jobs(
            threads,
            rotated.len(),
            #[inline(always)]
            |job| variance_scales(&rotated[job].rotated, &allocs[alloc_index(job)]),
        );
        for (block, s) in rotated.iter_mut().zip(scales) {
            block.scales = s;
        }
    }

    let finite = |s: &f32| s.is_finite();
    if !(rotated.iter().all(|b| b.scales.iter().all(finite))
        && allocs.iter().all(|a| a.sigma.iter().all(finite)))
    {
        return Err(CodecError::Numerical(
            "a scale overflows f32: input values beyond about 1e38 (near f32's limit) \
             cannot be centred and rotated; rescale the input"
                .into(),
        ));
    }
    let fits_f16 = |s: &f32| *s == 0.0 || (F16_MIN_NORMAL..=crate::f16::MAX).contains(s);
    if header.scale_dtype == ScaleDtype::F16
        && !(rotated.iter().all(|b| b.scales.iter().all(fits_f16))
            && allocs.iter().all(|a| a.sigma.iter().all(fits_f16)))
    {
        header.scale_dtype = ScaleDtype::F32;
    }
    let scale_dtype = header.scale_dtype;
    let allocs: Vec<BitAllocation> = allocs
        .into_iter()
        .map(|a| BitAllocation {
            sigma: a
                .sigma
                .iter()
                .map(|&s| round_scale(s, scale_dtype))
                .collect(),
            bits: a.bits,
        })
        .collect();
    let records: Vec<Vec<u8>> = if variance {
        let quantizers = width_quantizers();
        map_jobs(
            threads,
            rotated.len(),
            #[inline(always)]
            |job| {
                quantize_block_variance(
                    &rotated[job],
                    config,
                    scale_dtype,
                    &allocs[alloc_index(job)],
                    &quantizers,
                )
            },
        )
    } else {
        let quantizer = quantizer_for(config);
        map_jobs(
            threads,
            rotated.len(),
            #[inline(always)]
            |job| quantize_block(&rotated[job], config, scale_dtype, &quantizer),
        )
    };

    // The output is written once, in place: preamble and header, then the body.
    let json = serde_json::to_vec(&header).expect("a header always serialises");
    let body_start = format::PREAMBLE_LEN + json.len();
    let mut out = Writer::default();
    out.buf.extend_from_slice(MAGIC);
    out.u16(header.version);
    out.u32(json.len() as u32);
    out.buf.extend_from_slice(&json);
    if let Some(l) = &l_hat {
        for m in l {
            let tri: Vec<f32> = (0..dim)
                .flat_map(|i| (0..=i).map(move |j| (i, j)))
                .map(|(i, j)| m[i * dim + j])
                .collect();
            out.skeleton_values(&tri, config.skeleton_dtype);
        }
    }
    let mut skeleton_records = Vec::with_capacity(shared.len());
    for (h, sk) in shared.iter().enumerate() {
        let mut w = Writer::default();
        write_skeleton(&mut w, sk, config.skeleton_dtype);
        if let Some(alloc) = allocs.get(h) {
            write_allocation(&mut w, alloc, scale_dtype);
        }
        skeleton_records.push(w.buf);
    }
    let table_len = 8 * (shared.len() + records.len());
    let mut offset = out.buf.len() - body_start + table_len;
    let mut shared_offsets = Vec::with_capacity(shared.len());
    let mut blocks = Vec::with_capacity(records.len());
    for h in 0..heads {
        if let Some(rec) = skeleton_records.get(h) {
            shared_offsets.push(offset);
            offset += rec.len();
        }
        for rec in &records[h * per_head..(h + 1) * per_head] {
            blocks.push((offset, offset + rec.len()));
            offset += rec.len();
        }
    }
    out.buf
        .reserve_exact(offset + body_start + 4 - out.buf.len());
    shared_offsets
        .iter()
        .chain(blocks.iter().map(|(start, _)| start))
        .for_each(|&o| out.u64(o as u64));
    for h in 0..heads {
        if let Some(rec) = skeleton_records.get(h) {
            out.buf.extend_from_slice(rec);
        }
        for rec in &records[h * per_head..(h + 1) * per_head] {
            out.buf.extend_from_slice(rec);
        }
    }
    let crc = crc32fast::hash(&out.buf);
    out.u32(crc);
    // What `from_bytes` would parse back, from what the encoder holds (tested equal).
    let shared_alloc = if config.share_basis {
        allocs
    } else {
        Vec::new()
    };
    Ok(Encoded {
        bytes: out.buf,
        header,
        body_start,
        preconditioner: l_hat.map(|l| {
            l.into_iter()
                .map(|m| {
                    let inv = lower_triangular_inverse(&m, dim);
                    (m, inv)
                })
                .collect()
        }),
        shared,
        shared_alloc,
        blocks,
    })
}

#[inline(always)]
fn quantize_block(
    block: &RotatedBlock,
    config: &CodecConfig,
    scale_dtype: ScaleDtype,
    q: &Quantizer,
) -> Vec<u8> {
    let mut w = Writer::default();
    if let Some(sk) = &block.own_skeleton {
        write_skeleton(&mut w, sk, config.skeleton_dtype);
    }
    let padded = coded_width(block.rank, config);
    if padded == 0 {
        return w.buf;
    }
    let n = block.scales.len();
    let scales = if config.scale_granularity == ScaleGranularity::Block {
        // n ≥ 1: a block record always has rows.
        let s = write_rounded_scales(&mut w, &block.scales[..1], scale_dtype, config)[0];
        vec![s; n]
    } else {
        write_rounded_scales(&mut w, &block.scales, scale_dtype, config)
    };
    let mut codes = vec![0u8; n * padded];
    let mut outliers: Vec<(usize, f32)> = Vec::new();
    let mut z = vec![0.0f32; padded];
    for (i, ((row, &s), row_codes)) in block
        .rotated
        .chunks_exact(padded)
        .zip(&scales)
        .zip(codes.chunks_exact_mut(padded))
        .enumerate()
    {
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        if inv.is_finite() {
            z.iter_mut().zip(row).for_each(|(z, &y)| *z = y * inv);
        } else {
            // A subnormal scale, whose reciprocal overflows f32.
            z.iter_mut().zip(row).for_each(|(z, &y)| *z = y / s);
        }
        q.codes(&z, row_codes);
        if let Some(t) = config.outlier_threshold {
            for (j, &zj) in z.iter().enumerate() {
                if zj.abs() > t {
                    outliers.push((i * padded + j, zj));
                }
            }
        }
    }
    if config.rotation == Rotation::None && config.entropy_coding {
        write_grouped_codes(&mut w, &codes, padded, config.bits);
    } else {
        write_codes(&mut w, &codes, config.bits, config.entropy_coding);
    }
    if config.outlier_threshold.is_some() {
        write_outliers(&mut w, &outliers, n, padded);
    }
    w.buf
}

/// Block record of allocation "variance": own skeleton and allocation (unless shared),
/// then, if some component has bits, the scales, the variable-width codes and outliers.
#[inline(always)]
fn quantize_block_variance(
    block: &RotatedBlock,
    config: &CodecConfig,
    scale_dtype: ScaleDtype,
    alloc: &BitAllocation,
    quantizers: &[Quantizer],
) -> Vec<u8> {
    let mut w = Writer::default();
    if let Some(sk) = &block.own_skeleton {
        write_skeleton(&mut w, sk, config.skeleton_dtype);
        write_allocation(&mut w, alloc, scale_dtype);
    }
    let rank = block.rank;
    if alloc.coded() == 0 {
        return w.buf;
    }
    let n = block.scales.len();
    let scales = write_rounded_scales(&mut w, &block.scales, scale_dtype, config);
    let mut codes = vec![0u8; n * rank];
    let mut outliers: Vec<(usize, f32)> = Vec::new();
    for (t, (row, &s)) in block.rotated.chunks_exact(rank).zip(&scales).enumerate() {
        for (i, &c) in row.iter().enumerate() {
            let b = alloc.bits[i];
            if b == 0 {
                continue;
            }
            let z = if s > 0.0 {
                (c / alloc.sigma[i]) / s
            } else {
                0.0
            };
            codes[t * rank + i] = quantizers[usize::from(b) - 1].code(z);
            if config.outlier_threshold.is_some_and(|th| z.abs() > th) {
                outliers.push((t * rank + i, z));
            }
        }
    }
    let len = bitpack::packed_len_widths(n, &alloc.bits).expect("n · Σb_i fits: n ≤ 2^24");
    let start = w.buf.len();
    w.buf.resize(start + len, 0);
    bitpack::pack_widths(&codes, &alloc.bits, &mut w.buf[start..]);
    if config.outlier_threshold.is_some() {
        write_outliers(&mut w, &outliers, n, rank);
    }
    w.buf
}

fn assemble(header: &Header, body: &[u8]) -> Vec<u8> {
    let json = serde_json::to_vec(header).expect("a header always serialises");
    let mut w = Writer::default();
    w.buf
        .reserve(format::PREAMBLE_LEN + json.len() + body.len() + 4);
    w.buf.extend_from_slice(MAGIC);
    w.u16(header.version);
    w.u32(json.len() as u32);
    w.buf.extend_from_slice(&json);
    w.buf.extend_from_slice(body);
    let crc = crc32fast::hash(&w.buf);
    w.u32(crc);
    w.buf
}
