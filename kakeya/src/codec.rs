//! Encode and decode: the stages of docs/codec.md run per (head, block) job.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

use crate::allocation::allocate;
use crate::bitpack;
use crate::config::{
    Allocation, Basis, CodecConfig, Metric, ScaleFormat, ScaleGranularity, SkeletonDtype,
};
use crate::entropy::{self, FrequencyTable};
use crate::error::{CodecError, Result};
use crate::format::{self, Header, Reader, ScaleDtype, Writer, MAGIC};
use crate::hadamard;
use crate::lloyd_max::{gaussian_table, Quantizer, MAX_TABLE_BITS};
use crate::log_scale;
use crate::parallel::{for_each_chunk_mut, map_jobs};
use crate::pca::{self, Skeleton, SHARED_BLOCK_KEY};
use crate::tensor::{checked_numel, DType, OwnedElements, TensorView};

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

/// `M = H_P diag(σ) B / √P` (`P × D`), `B` = the basis rows zero-padded to `P`: the inverse
/// rotation and the basis in one matrix, so a block decodes as `μ̂ + y M`.
#[inline(always)]
fn unrotated_basis(basis_t: &[f32], rank: usize, dim: usize, signs: &[f32]) -> Vec<f32> {
    let padded = signs.len();
    let norm = 1.0 / (padded as f32).sqrt();
    let mut m = vec![0.0f32; padded * dim];
    for (j, (row, &s)) in m.chunks_exact_mut(dim).zip(signs).take(rank).enumerate() {
        row.iter_mut()
            .zip(&basis_t[j * dim..(j + 1) * dim])
            .for_each(|(v, &u)| *v = s * norm * u);
    }
    hadamard::fwht_rows(&mut m, dim);
    m
}

const F16_MIN_NORMAL: f32 = 6.103_515_6e-5;
const SEGMENT_CODES: usize = 65536;

/// A serialized encoding plus what was parsed from it. The bytes are the truth:
/// [`Encoded::nbytes`] and [`Encoded::ratio`] are measured from them.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    bytes: Vec<u8>,
    header: Header,
    body_start: usize,
    /// Rounded pre-conditioner `L̂` per head and its inverse, `D × D` row-major.
    preconditioner: Option<Vec<(Vec<f32>, Vec<f32>)>>,
    /// Shared skeleton per head (share_basis only).
    shared: Vec<Skeleton>,
    /// Bit allocation of each shared skeleton (share_basis with allocation "variance").
    shared_alloc: Vec<BitAllocation>,
    /// `[start, end)` of each block record within the body, head-major.
    blocks: Vec<(usize, usize)>,
}

/// One block of a row-layout encoding, parsed for attention (see [`Encoded::row_blocks`]).
pub(crate) struct RowBlock {
    /// First token of the block.
    pub first: usize,
    /// Tokens in the block.
    pub rows: usize,
    /// The block's (or shared) mean `μ̂`, `D` values.
    pub mean: Vec<f32>,
    /// One scale per row (a block scale repeated).
    pub scales: Vec<f32>,
    /// `rows · D` codes bit-packed at `bits` bits, row-major.
    pub codes: Vec<u8>,
    /// `(row · D + coordinate, z)`, increasing.
    pub outliers: Vec<(usize, f32)>,
}

/// Per-component bits `b_i` and normalisers `σ_i` of one skeleton (allocation
/// "variance"); `σ_i = 0` exactly where `b_i = 0`.
#[derive(Debug, Clone, PartialEq)]
struct BitAllocation {
    bits: Vec<u8>,
    sigma: Vec<f32>,
}

impl BitAllocation {
    /// Number of components that get codes.
    fn coded(&self) -> usize {
        self.bits.iter().filter(|&&b| b > 0).count()
    }
}

/// A block record, parsed but not dequantized.
struct BlockRecord<'a> {
    own_skeleton: Option<Skeleton>,
    own_alloc: Option<BitAllocation>,
    scales: Vec<f32>,
    codes: Codes<'a>,
    /// `(row · P + coordinate, value)` pairs.
    outliers: Vec<(usize, f32)>,
}

/// A block's code section as stored.
enum Codes<'a> {
    /// Bit-packed codes.
    Packed(&'a [u8]),
    /// The rANS lanes and their frequency table.
    Entropy {
        table: FrequencyTable,
        stream: &'a [u8],
    },
}

/// Code-section mode bytes of format version 4 with `entropy_coding`.
const CODES_PACKED: u8 = 0;
const CODES_RANS: u8 = 1;

/// A block's codes ready to be looked up: packed ones are read in place, rANS lanes are
/// decoded once into one code per byte.
enum CodeValues<'a> {
    Packed(&'a [u8]),
    Symbols(Vec<u8>),
}

impl<'a> Codes<'a> {
    /// The `count` codes of the section, any rANS lanes decoded (an error if damaged).
    fn values(&self, count: usize) -> Result<CodeValues<'a>> {
        Ok(match self {
            Self::Packed(bytes) => CodeValues::Packed(bytes),
            Self::Entropy { table, stream } => {
                let mut symbols = vec![0u8; count];
                entropy::decode(stream, table, &mut symbols)?;
                CodeValues::Symbols(symbols)
            }
        })
    }
}

impl CodeValues<'_> {
    /// The codes one per byte (8-bit codes: packed bytes are the codes).
    fn symbols(&self) -> &[u8] {
        match self {
            Self::Packed(bytes) => bytes,
            Self::Symbols(symbols) => symbols,
        }
    }

    /// Codes `[first, first + out.len())` looked up in `values` (the quantizer's table);
    /// packed codes must start on a byte (`first · bits` a multiple of 8).
    #[inline(always)]
    fn lookup(&self, bits: u8, values: &[f32], first: usize, out: &mut [f32]) {
        match self {
            Self::Packed(bytes) => {
                let from = first * usize::from(bits) / 8;
                bitpack::unpack_lookup(&bytes[from..], bits, values, out);
            }
            Self::Symbols(symbols) => {
                let symbols = &symbols[first..first + out.len()];
                out.iter_mut()
                    .zip(symbols)
                    .for_each(|(o, &c)| *o = values[usize::from(c)]);
            }
        }
    }
}

/// Stage-one result of a block: skeleton, rotated coefficients (uniform) or plain
/// coefficients (variance), and raw scales.
struct RotatedBlock {
    own_skeleton: Option<Skeleton>,
    rank: usize,
    /// Uniform: `n × P` rotated rows. Variance: `n × r` coefficients.
    rotated: Vec<f32>,
    scales: Vec<f32>,
}

fn quantizer_for(config: &CodecConfig) -> Quantizer {
    match (&config.centroids, config.uniform_step) {
        (Some(table), _) => Quantizer::new(table),
        (None, Some(step)) => Quantizer::uniform(config.bits, step),
        (None, None) => Quantizer::new(gaussian_table(config.bits)),
    }
}

/// The Gaussian quantizers of 1..=8 bits, index `b − 1`.
fn width_quantizers() -> Vec<Quantizer> {
    (1..=MAX_TABLE_BITS)
        .map(|b| Quantizer::new(gaussian_table(b)))
        .collect()
}

/// Variances `λ_i = Σ c_{t,i}² / N` over every row of `blocks` (f64, rows in order), then
/// the greedy allocation of `bits · r` bits and `σ_i = √λ_i` (f32; 0 where `b_i = 0`).
/// A component whose `σ_i` would be 0 in f32 counts as variance 0.
fn allocation_of(blocks: &[&[f32]], rank: usize, bits: u8) -> BitAllocation {
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
fn variance_scales(coef: &[f32], alloc: &BitAllocation) -> Vec<f32> {
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

fn write_allocation(w: &mut Writer, alloc: &BitAllocation, dtype: ScaleDtype) {
    w.buf.extend_from_slice(&alloc.bits);
    w.scales(&alloc.sigma, dtype);
}

fn read_allocation(
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

fn round_scale(s: f32, dtype: ScaleDtype) -> f32 {
    match dtype {
        ScaleDtype::F16 => crate::f16::round(s),
        ScaleDtype::F32 => s,
        // The nearest level (block records round their scales together instead).
        ScaleDtype::Log8 => log_scale::quantize(&[s]).values[0],
    }
}

fn segment_rows(padded: usize) -> usize {
    (SEGMENT_CODES / padded.max(1)).max(1)
}

/// `x · M` for `n` rows of `D` values and a `D × D` row-major matrix.
fn right_multiply(rows: &[f32], dim: usize, m: &[f32]) -> Vec<f32> {
    let n = rows.len() / dim;
    let mut out = vec![0.0f32; rows.len()];
    if n > 0 {
        matmul(
            MatMut::from_row_major_slice_mut(&mut out, n, dim),
            Accum::Replace,
            MatRef::from_row_major_slice(rows, n, dim),
            MatRef::from_row_major_slice(m, dim, dim),
            1.0f32,
            Par::Seq,
        );
    }
    out
}

/// Inverse of a lower-triangular matrix with a positive diagonal (f64 forward substitution).
fn lower_triangular_inverse(l: &[f32], dim: usize) -> Vec<f32> {
    let mut inv = vec![0.0f64; dim * dim];
    for col in 0..dim {
        for row in col..dim {
            let mut acc = if row == col { 1.0 } else { 0.0 };
            for k in col..row {
                acc -= f64::from(l[row * dim + k]) * inv[k * dim + col];
            }
            inv[row * dim + col] = acc / f64::from(l[row * dim + row]);
        }
    }
    inv.into_iter().map(|v| v as f32).collect()
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

#[inline(always)]
fn write_skeleton(w: &mut Writer, sk: &Skeleton, dtype: SkeletonDtype) {
    w.u16(sk.rank as u16);
    w.skeleton_values(&sk.mean, dtype);
    w.skeleton_values(&sk.basis_t, dtype);
}

fn read_skeleton(r: &mut Reader<'_>, dim: usize, config: &CodecConfig) -> Result<Skeleton> {
    let dtype = config.skeleton_dtype;
    let rank = usize::from(r.u16("skeleton rank")?);
    if rank > dim {
        return Err(CodecError::Corrupt(format!(
            "skeleton rank {rank} exceeds head_dim {dim}"
        )));
    }
    let stored_rank = match config.basis {
        Basis::Pca => rank,
        Basis::None if rank == dim => 0,
        Basis::None => {
            return Err(CodecError::Corrupt(format!(
                "basis \"none\" needs rank {dim}, the skeleton says {rank}"
            )))
        }
    };
    let mean = format::read_floats(
        r.take_array(dim, dtype.size(), "skeleton mean")?,
        dtype.size(),
        "mean",
    )?;
    let basis_t = format::read_floats(
        r.take_array(stored_rank * dim, dtype.size(), "skeleton basis")?,
        dtype.size(),
        "basis",
    )?;
    Ok(Skeleton {
        rank,
        mean,
        basis_t,
    })
}

/// Pads and rotates each row; returns the rows and their scales (see [`row_scales`]).
#[inline(always)]
fn rotate_rows(
    coef: Vec<f32>,
    n: usize,
    rank: usize,
    seed: u64,
    block_scale: bool,
) -> (Vec<f32>, Vec<f32>) {
    let padded = hadamard::padded_len(rank);
    let signs = hadamard::signs(seed, padded);
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
                rotate_rows(
                    pca::project(rows, dim, sk),
                    n,
                    rank,
                    config.seed,
                    block_scale,
                )
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
    let padded = hadamard::padded_len(block.rank);
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
    write_codes(&mut w, &codes, config.bits, config.entropy_coding);
    if config.outlier_threshold.is_some() {
        write_outliers(&mut w, &outliers, n, padded);
    }
    w.buf
}

/// A code section of `bits`-bit symbols: bit-packed, or with `entropy` a mode byte and then
/// whichever of the packed codes and the rANS form (frequency table, `u32` length, the
/// lanes) is shorter.
#[inline(always)]
fn write_codes(w: &mut Writer, codes: &[u8], bits: u8, entropy: bool) {
    let packed_len = bitpack::packed_len(codes.len(), bits);
    if entropy {
        let table = FrequencyTable::fit(codes, 1 << bits);
        let stream = entropy::encode(codes, &table);
        if table.serialized_len() + 4 + stream.len() < packed_len {
            w.buf.push(CODES_RANS);
            table.write(w);
            w.u32(stream.len() as u32);
            w.buf.extend_from_slice(&stream);
            return;
        }
        w.buf.push(CODES_PACKED);
    }
    let start = w.buf.len();
    w.buf.resize(start + packed_len, 0);
    bitpack::pack(codes, bits, &mut w.buf[start..]);
}

/// Reads a code section written by [`write_codes`] (`packed_len` bytes when packed).
fn read_codes<'a>(
    r: &mut Reader<'a>,
    packed_len: usize,
    bits: u8,
    entropy: bool,
) -> Result<Codes<'a>> {
    if !entropy {
        return Ok(Codes::Packed(r.take(packed_len, "codes")?));
    }
    match r.take(1, "code mode")?[0] {
        CODES_PACKED => Ok(Codes::Packed(r.take(packed_len, "codes")?)),
        CODES_RANS => {
            let table = FrequencyTable::read(r, 1 << bits)?;
            let len = r.u32("code stream length")? as usize;
            Ok(Codes::Entropy {
                table,
                stream: r.take(len, "code stream")?,
            })
        }
        mode => Err(CodecError::Corrupt(format!(
            "code mode {mode}, expected {CODES_PACKED} (packed) or {CODES_RANS} (rANS)"
        ))),
    }
}

/// Rounds the scales to their storage type, writes them and returns the rounded values
/// (the ones decode will use, so quantization divides by them). Log scales: the `i32` base
/// level, then the bytes as a code section of 8-bit symbols (rANS-coded with
/// `entropy_coding`).
#[inline(always)]
fn write_rounded_scales(
    w: &mut Writer,
    scales: &[f32],
    dtype: ScaleDtype,
    config: &CodecConfig,
) -> Vec<f32> {
    if dtype == ScaleDtype::Log8 {
        let log = log_scale::quantize(scales);
        w.u32(log.base as u32);
        write_codes(w, &log.bytes, 8, config.entropy_coding);
        return log.values;
    }
    let rounded: Vec<f32> = scales.iter().map(|&s| round_scale(s, dtype)).collect();
    w.scales(&rounded, dtype);
    rounded
}

/// Outlier segments of `S = max(1, 65536 / width)` rows: a `u32` count, then
/// `(u16 index within the segment, f16 z)` pairs. `outliers` is sorted by index.
#[inline(always)]
fn write_outliers(w: &mut Writer, outliers: &[(usize, f32)], n: usize, width: usize) {
    let seg_rows = segment_rows(width);
    let seg_codes = seg_rows * width;
    let mut rest = outliers;
    for seg in 0..n.div_ceil(seg_rows) {
        let start = seg * seg_codes;
        let count = rest.partition_point(|&(i, _)| i < start + seg_codes);
        let (here, later) = rest.split_at(count);
        w.u32(count as u32);
        for &(i, z) in here {
            w.u16((i - start) as u16);
            w.f16(z);
        }
        rest = later;
    }
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
    /// Parses and fully validates serialized bytes (magic, version, checksum, header,
    /// every record's bounds). Never panics on arbitrary input.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        let (header, body, body_start) = format::split(&bytes)?;
        header
            .config
            .validate()
            .map_err(|e| CodecError::Corrupt(format!("header config: {e}")))?;
        let [tokens, heads, dim] = header.shape;
        if heads == 0 || dim == 0 || dim > crate::config::MAX_HEAD_DIM {
            return Err(CodecError::Corrupt(format!(
                "invalid shape {:?} in header",
                header.shape
            )));
        }
        let numel = checked_numel(header.shape).map_err(|e| CodecError::Corrupt(e.to_string()))?;
        let config = &header.config;
        let mut enc = Self {
            header: header.clone(),
            body_start,
            preconditioner: None,
            shared: Vec::new(),
            shared_alloc: Vec::new(),
            blocks: Vec::new(),
            bytes: Vec::new(),
        };
        if config.identity {
            let want = numel.checked_mul(header.dtype.size());
            if want != Some(body.len()) || header.preconditioner {
                return Err(CodecError::Corrupt(format!(
                    "identity body has {} bytes, shape {:?} of {} needs {:?}",
                    body.len(),
                    header.shape,
                    header.dtype.name(),
                    want
                )));
            }
            // The encoder refuses non-finite input, so such a value means the bytes are bad.
            let raw = OwnedElements::from_le_bytes(body, header.dtype);
            if let Err(CodecError::NonFinite {
                token,
                head,
                dim,
                value,
            }) = TensorView::new(raw.view(), header.shape)?.check_finite()
            {
                return Err(CodecError::Corrupt(format!(
                    "identity body holds {value} at token {token}, head {head}, dim {dim}"
                )));
            }
            enc.bytes = bytes;
            return Ok(enc);
        }
        if header.blocks_per_head != tokens.div_ceil(config.block_size) {
            return Err(CodecError::Corrupt(format!(
                "blocks_per_head {} does not match {tokens} tokens in blocks of {}",
                header.blocks_per_head, config.block_size
            )));
        }
        if header.preconditioner != (config.metric == Metric::InnerProduct) {
            return Err(CodecError::Corrupt(
                "pre-conditioner presence contradicts the metric".into(),
            ));
        }
        let mut r = Reader::new(body, body_start);
        let sk_dtype = config.skeleton_dtype;
        if header.preconditioner {
            let tri_len = dim * (dim + 1) / 2;
            let mut mats = Vec::with_capacity(heads);
            for h in 0..heads {
                let tri = format::read_floats(
                    r.take_array(tri_len, sk_dtype.size(), "pre-conditioner")?,
                    sk_dtype.size(),
                    "pre-conditioner",
                )?;
                let mut full = vec![0.0f32; dim * dim];
                let mut it = tri.into_iter();
                for i in 0..dim {
                    for j in 0..=i {
                        full[i * dim + j] = it.next().unwrap_or(0.0);
                    }
                    if full[i * dim + i] <= 0.0 {
                        return Err(CodecError::Corrupt(format!(
                            "pre-conditioner head {h}: diagonal entry {i} is not positive"
                        )));
                    }
                }
                let inv = lower_triangular_inverse(&full, dim);
                mats.push((full, inv));
            }
            enc.preconditioner = Some(mats);
        }
        let per_head = header.blocks_per_head;
        let n_shared = if config.share_basis && tokens > 0 {
            heads
        } else {
            0
        };
        let n_blocks = heads
            .checked_mul(per_head)
            .ok_or_else(|| CodecError::Corrupt("block count overflows".into()))?;
        let mut offsets = Vec::new();
        for _ in 0..n_shared.saturating_add(n_blocks) {
            offsets.push(r.u64("offset table")? as usize);
        }
        let (shared_offsets, block_offsets) = offsets.split_at(n_shared);
        // Records follow the tables in head order; each must start where the last ended.
        let check_start = |at: usize, expected: usize, what: &str| -> Result<()> {
            if at != expected {
                return Err(CodecError::Corrupt(format!(
                    "{what} starts at {at}, expected {expected}"
                )));
            }
            Ok(())
        };
        let mut expected = r.position();
        for h in 0..heads {
            if n_shared > 0 {
                check_start(shared_offsets[h], expected, "shared skeleton record")?;
                let mut rr = Reader::new(&body[expected..], body_start + expected);
                let sk = read_skeleton(&mut rr, dim, config)?;
                if config.allocation == Allocation::Variance {
                    enc.shared_alloc.push(read_allocation(
                        &mut rr,
                        sk.rank,
                        config.bits,
                        header.scale_dtype,
                    )?);
                }
                enc.shared.push(sk);
                expected += rr.position();
            }
            for b in 0..per_head {
                let start = block_offsets[h * per_head + b];
                check_start(start, expected, "block record")?;
                let n = enc.block_len(b);
                let (_, used) = enc.parse_block(
                    &body[start..],
                    body_start + start,
                    n,
                    enc.shared.get(h),
                    enc.shared_alloc.get(h),
                )?;
                expected = start + used;
                enc.blocks.push((start, expected));
            }
        }
        if expected != body.len() {
            return Err(CodecError::Corrupt(format!(
                "{} trailing bytes after the last record",
                body.len() - expected
            )));
        }
        enc.bytes = bytes;
        Ok(enc)
    }

    fn block_len(&self, block: usize) -> usize {
        let bs = self.header.config.block_size;
        let tokens = self.header.shape[0];
        (tokens - block * bs).min(bs)
    }

    fn parse_block<'a>(
        &self,
        bytes: &'a [u8],
        base: usize,
        n: usize,
        shared: Option<&Skeleton>,
        shared_alloc: Option<&BitAllocation>,
    ) -> Result<(BlockRecord<'a>, usize)> {
        let config = &self.header.config;
        let dim = self.header.shape[2];
        let variance = config.allocation == Allocation::Variance;
        let scale_dtype = self.header.scale_dtype;
        let mut r = Reader::new(bytes, base);
        let own_skeleton = match shared {
            Some(_) => None,
            None => Some(read_skeleton(&mut r, dim, config)?),
        };
        let own_alloc = match (&own_skeleton, variance) {
            (Some(sk), true) => Some(read_allocation(&mut r, sk.rank, config.bits, scale_dtype)?),
            _ => None,
        };
        let rank = own_skeleton.as_ref().or(shared).map_or(0, |s| s.rank);
        // Codes per row (P for uniform, r for variance) and the bytes of the codes.
        let (width, code_bytes, widths) = if variance {
            let alloc = own_alloc.as_ref().or(shared_alloc).ok_or_else(|| {
                CodecError::Corrupt("shared skeleton without its bit allocation".into())
            })?;
            let len = bitpack::packed_len_widths(n, &alloc.bits)
                .ok_or_else(|| CodecError::Corrupt("code length overflows".into()))?;
            let width = if alloc.coded() == 0 { 0 } else { rank };
            (width, len, Some(alloc.bits.clone()))
        } else {
            let padded = hadamard::padded_len(rank);
            (padded, bitpack::packed_len(n * padded, config.bits), None)
        };
        let mut record = BlockRecord {
            own_skeleton,
            own_alloc,
            scales: Vec::new(),
            codes: Codes::Packed(&[]),
            outliers: Vec::new(),
        };
        if width == 0 {
            return Ok((record, r.position()));
        }
        let stored = if config.scale_granularity == ScaleGranularity::Block {
            1
        } else {
            n
        };
        record.scales = if scale_dtype == ScaleDtype::Log8 {
            let base = r.u32("log scale base")? as i32;
            let symbols = read_codes(&mut r, stored, 8, config.entropy_coding)?.values(stored)?;
            log_scale::dequantize(base, symbols.symbols())?
        } else {
            let scale_size = scale_dtype.size();
            format::read_floats(
                r.take_array(stored, scale_size, "scales")?,
                scale_size,
                "scales",
            )?
        };
        if stored < n {
            record.scales = vec![record.scales[0]; n];
        }
        if let Some(bad) = record.scales.iter().find(|&&s| s < 0.0) {
            return Err(CodecError::Corrupt(format!("negative scale {bad}")));
        }
        record.codes = read_codes(&mut r, code_bytes, config.bits, config.entropy_coding)?;
        if config.outlier_threshold.is_some() {
            let padded = width;
            let seg_rows = segment_rows(padded);
            for seg in 0..n.div_ceil(seg_rows) {
                let rows_here = (n - seg * seg_rows).min(seg_rows);
                let count = r.u32("outlier count")? as usize;
                let pairs = r.take_array(count, 4, "outliers")?;
                for p in pairs.chunks_exact(4) {
                    let idx = usize::from(u16::from_le_bytes([p[0], p[1]]));
                    let value = crate::f16::to_f32(u16::from_le_bytes([p[2], p[3]]));
                    if idx >= rows_here * padded || !value.is_finite() {
                        return Err(CodecError::Corrupt(format!(
                            "outlier ({idx}, {value}) outside a segment of {rows_here} rows × {padded}"
                        )));
                    }
                    if let Some(w) = &widths {
                        if w[idx % padded] == 0 {
                            return Err(CodecError::Corrupt(format!(
                                "outlier ({idx}, {value}) on component {} which has no bits",
                                idx % padded
                            )));
                        }
                    }
                    let at = seg * seg_rows * padded + idx;
                    if record.outliers.last().is_some_and(|&(prev, _)| prev >= at) {
                        return Err(CodecError::Corrupt(format!(
                            "outlier index {at} does not follow the previous one"
                        )));
                    }
                    record.outliers.push((at, value));
                }
            }
        }
        Ok((record, r.position()))
    }

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
        let padded = hadamard::padded_len(sk.rank);
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
                if identity {
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
    fn decodes_by_rows(&self) -> bool {
        let config = &self.header.config;
        let dim = self.header.shape[2];
        config.basis == Basis::None
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

    /// The serialized bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Takes the serialized bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// Length of the serialized bytes.
    pub fn nbytes(&self) -> usize {
        self.bytes.len()
    }

    /// Size of the input at bf16 over [`Encoded::nbytes`].
    pub fn ratio(&self) -> f64 {
        let [t, h, d] = self.header.shape;
        (t * h * d * 2) as f64 / self.bytes.len() as f64
    }

    /// The header as JSON text.
    pub fn header_json(&self) -> String {
        serde_json::to_string(&self.header).expect("a header always serialises")
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Whether [`Encoded::row_blocks`] applies: a lossy encoding that decodes row by row
    /// (mean-only skeletons, uniform allocation, no pre-conditioner, `D` a power of two).
    pub(crate) fn has_row_layout(&self) -> bool {
        !self.header.config.identity && self.decodes_by_rows()
    }

    /// The centroid table the codes index.
    pub(crate) fn centroid_table(&self) -> Vec<f32> {
        quantizer_for(&self.header.config).centroids().to_vec()
    }

    /// Every block's parts in head-major order, codes bit-packed at `bits` bits (rANS lanes
    /// decoded and re-packed), scales as f32 (one per row), outliers as `(row · D + j, z)`.
    /// Only for [`Encoded::has_row_layout`].
    pub(crate) fn row_blocks(&self) -> Result<Vec<RowBlock>> {
        if !self.has_row_layout() {
            return Err(CodecError::InvalidConfig {
                field: "basis",
                reason:
                    "row blocks need a lossy encoding with basis \"none\", allocation \"uniform\", \
                         no pre-conditioner and a power-of-two head_dim"
                        .into(),
            });
        }
        let [_, _, dim] = self.header.shape;
        let config = &self.header.config;
        let per_head = self.header.blocks_per_head;
        let body = &self.bytes[self.body_start..self.bytes.len() - 4];
        (0..self.blocks.len())
            .map(|job| {
                let (h, b) = (job / per_head, job % per_head);
                let start = self.blocks[job].0;
                let n = self.block_len(b);
                let (record, _) = self.parse_block(
                    &body[start..],
                    self.body_start + start,
                    n,
                    self.shared.get(h),
                    None,
                )?;
                let mean = record
                    .own_skeleton
                    .as_ref()
                    .unwrap_or_else(|| &self.shared[h])
                    .mean
                    .clone();
                let codes = match &record.codes {
                    Codes::Packed(bytes) => bytes.to_vec(),
                    Codes::Entropy { .. } => {
                        let values = record.codes.values(n * dim)?;
                        let mut packed = vec![0u8; bitpack::packed_len(n * dim, config.bits)];
                        bitpack::pack(values.symbols(), config.bits, &mut packed);
                        packed
                    }
                };
                Ok(RowBlock {
                    first: b * config.block_size,
                    rows: n,
                    mean,
                    scales: record.scales,
                    codes,
                    outliers: record.outliers,
                })
            })
            .collect()
    }

    /// Ranks of the skeletons, one per block (the shared one repeated under share_basis).
    pub fn block_ranks(&self) -> Vec<usize> {
        let per_head = self.header.blocks_per_head;
        let body = &self.bytes[self.body_start..self.bytes.len().saturating_sub(4)];
        (0..self.blocks.len())
            .map(|job| match self.shared.get(job / per_head.max(1)) {
                Some(sk) => sk.rank,
                None => body
                    .get(self.blocks[job].0..self.blocks[job].0 + 2)
                    .map_or(0, |b| usize::from(u16::from_le_bytes([b[0], b[1]]))),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Basis;
    use crate::tensor::Elements;

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
