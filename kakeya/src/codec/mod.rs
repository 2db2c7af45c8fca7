//! Encode and decode: the stages of docs/codec.md run per (head, block) job.
//!
//! This module holds [`Encoded`], its accessors and the helpers that encode and decode share;
//! the stages live in the submodules.

mod decode;
mod encode;
mod layout;
mod parse;
mod records;
mod variance;

pub use encode::encode;
pub(crate) use layout::RowBlock;

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

use crate::config::{CodecConfig, Rotation};
use crate::format::Header;
use crate::hadamard;
use crate::lloyd_max::{gaussian_table, Quantizer};
use crate::pca::Skeleton;
use variance::BitAllocation;

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

/// Coded values per row of a uniform-allocation block of rank `rank`: padded to the
/// Hadamard size, or `rank` itself with rotation "none".
fn coded_width(rank: usize, config: &CodecConfig) -> usize {
    match config.rotation {
        Rotation::Hadamard => hadamard::padded_len(rank),
        Rotation::None => rank,
    }
}

fn quantizer_for(config: &CodecConfig) -> Quantizer {
    match (&config.centroids, config.uniform_step) {
        (Some(table), _) => Quantizer::new(table),
        (None, Some(step)) if config.rotation == Rotation::None => {
            Quantizer::midtread(config.bits, step)
        }
        (None, Some(step)) => Quantizer::uniform(config.bits, step),
        (None, None) => Quantizer::new(gaussian_table(config.bits)),
    }
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

impl Encoded {
    fn block_len(&self, block: usize) -> usize {
        let bs = self.header.config.block_size;
        let tokens = self.header.shape[0];
        (tokens - block * bs).min(bs)
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
