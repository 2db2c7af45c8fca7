//! One encoding held in the form the attention kernel reads ([`AttnChunk`]): per head and
//! block the mean, the scales, the codes bit-packed at `bits` bits (rANS lanes decoded once
//! and re-packed) and the outliers; no header, offsets or checksum. Each part is held at the
//! width the encoding stores it in (f16 means and scales as their bits, log8 scales as
//! bytes, a block scale once); the Hadamard signs are not held (a function of the seed).

use crate::codec::RowBlock;
use crate::config::{ScaleGranularity, SkeletonDtype};
use crate::error::{CodecError, Result};
use crate::format::ScaleDtype;
use crate::{bitpack, f16, hadamard, log_scale, Encoded};

/// Zero bytes after each block's codes, so the AVX2 loops read whole `u32` words.
pub(crate) const CODE_PADDING: usize = 4;

/// Values held as the bits of halves where they are halves (2 bytes each), else as f32;
/// read back as the same f32 values either way.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Floats {
    F16(Vec<u16>),
    F32(Vec<f32>),
}

impl Floats {
    /// `values` as halves where every one of them is a half (bit for bit, so the read-back
    /// values are `values`), else as f32.
    fn halves_if_exact(values: Vec<f32>) -> Self {
        let halves: Vec<u16> = values.iter().map(|&v| f16::from_f32(v)).collect();
        let exact = halves
            .iter()
            .zip(&values)
            .all(|(&h, v)| f16::to_f32(h).to_bits() == v.to_bits());
        if exact {
            Self::F16(halves)
        } else {
            Self::F32(values)
        }
    }

    /// Values `from..from + out.len()` as f32.
    #[inline(always)]
    pub(crate) fn read(&self, from: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            Self::F16(v) => out
                .iter_mut()
                .zip(&v[from..from + n])
                .for_each(|(o, &h)| *o = f16::to_f32(h)),
            Self::F32(v) => out.copy_from_slice(&v[from..from + n]),
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Self::F16(v) => v.len(),
            Self::F32(v) => v.len(),
        }
    }

    pub(crate) fn to_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        self.read(0, &mut out);
        out
    }

    pub(crate) fn nbytes(&self) -> usize {
        match self {
            Self::F16(v) => v.len() * 2,
            Self::F32(v) => v.len() * 4,
        }
    }
}

/// Per-row scales as stored: f16 where the encoding's scales are f16 (exact) and f32 where
/// they are f32 ([`Floats`]), log8 bytes where they are log8 (1 byte per row), one value
/// where the encoding has one scale per block.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Scales {
    Values(Floats),
    /// `scale_format = "log8"`: the block's base level and one byte per row, read back as
    /// the codec's decoder reads them ([`log_scale::byte_value`]).
    Log8 {
        base: i32,
        bytes: Vec<u8>,
    },
    /// `scale_granularity = "block"`: the one scale every row of the block reads (the value
    /// the per-row form would give, held once).
    Block(f32),
}

impl Scales {
    /// Scales of rows `from..from + out.len()` as f32.
    #[inline(always)]
    pub(crate) fn read(&self, from: usize, out: &mut [f32]) {
        match self {
            Self::Values(v) => v.read(from, out),
            Self::Log8 { base, bytes } => out
                .iter_mut()
                .zip(&bytes[from..])
                .for_each(|(o, &c)| *o = log_scale::byte_value(*base, c)),
            Self::Block(s) => out.fill(*s),
        }
    }

    fn nbytes(&self) -> usize {
        match self {
            Self::Values(v) => v.nbytes(),
            Self::Log8 { bytes, .. } => bytes.len() + 4,
            Self::Block(_) => 4,
        }
    }
}

/// One block of one head.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HeadBlock {
    /// First token of the block within the chunk.
    pub first: usize,
    /// Tokens in the block.
    pub rows: usize,
    /// `μ̂`, `D` values, as the encoding stores them (`skeleton_dtype`).
    pub mean: Floats,
    pub scales: Scales,
    /// `rows · D` codes, `bits` bits each, row-major, least-significant bit first, then
    /// [`CODE_PADDING`] zero bytes.
    pub codes: Vec<u8>,
    /// Outlier positions `row · D + j`, increasing, and their f16 values.
    pub outlier_at: Vec<u32>,
    pub outlier_z: Vec<u16>,
}

/// An encoding ready for [`crate::attention::attend`]: what the codec's row decoder reads,
/// parsed once. Optionally carries the pre-RoPE mean of a K chunk stored in the RoPE-mean
/// layout (`docs/cache.md`): the encoded values are then `RoPE_p(x_p − μ)` and the key at
/// position `p` is `RoPE_p(μ) + decode(...)`. The Hadamard signs are not held: they are
/// `hadamard::signs(seed, dim)`, made again where needed ([`AttnChunk::signs`]).
#[derive(Debug, Clone, PartialEq)]
pub struct AttnChunk {
    pub(crate) tokens: usize,
    pub(crate) heads: usize,
    pub(crate) dim: usize,
    pub(crate) bits: u8,
    pub(crate) centroids: Vec<f32>,
    pub(crate) seed: u64,
    /// Head-major; each head's blocks in token order.
    pub(crate) blocks: Vec<HeadBlock>,
    pub(crate) blocks_per_head: usize,
    /// `[heads, dim]` pre-RoPE mean (RoPE-mean K layout), or none; as halves where the
    /// caller's values are all halves (`kakeya_py.cache` rounds it so before subtracting it).
    pub(crate) rope_mean: Option<Floats>,
    /// Absolute position of the first token.
    pub(crate) position: usize,
}

impl AttnChunk {
    /// Parses `enc` (a lossy encoding with `basis = "none"`, `allocation = "uniform"`, no
    /// pre-conditioner and a power-of-two `head_dim` ≥ 8); `position` is the absolute
    /// position of its first token; `rope_mean`, if given, `[heads, dim]` values (held at 2
    /// bytes each where every value is a half, else 4).
    pub fn from_encoded(
        enc: &Encoded,
        position: usize,
        rope_mean: Option<Vec<f32>>,
    ) -> Result<Self> {
        let header = enc.header();
        let [tokens, heads, dim] = header.shape;
        if !enc.has_row_layout() || dim < 8 {
            let c = &header.config;
            return Err(CodecError::InvalidConfig {
                field: "basis",
                reason: format!(
                    "attention on codes needs a lossy encoding with basis \"none\", allocation \
                     \"uniform\", no pre-conditioner and a power-of-two head_dim >= 8; got \
                     identity={}, basis={:?}, allocation={:?}, metric={:?}, head_dim={dim}",
                    c.identity, c.basis, c.allocation, c.metric
                ),
            });
        }
        if let Some(m) = &rope_mean {
            if m.len() != heads * dim {
                return Err(CodecError::Shape(format!(
                    "rope_mean has {} values, expected heads × dim = {heads} × {dim} = {}",
                    m.len(),
                    heads * dim
                )));
            }
            if let Some(bad) = m.iter().find(|v| !v.is_finite()) {
                return Err(CodecError::Shape(format!(
                    "rope_mean holds a non-finite value {bad}"
                )));
            }
        }
        let config = &header.config;
        let f16_scales = header.scale_dtype == ScaleDtype::F16;
        let block_scales = config.scale_granularity == ScaleGranularity::Block;
        let blocks = enc
            .row_blocks()?
            .into_iter()
            .map(|b: RowBlock| HeadBlock {
                first: b.first,
                rows: b.rows,
                mean: match config.skeleton_dtype {
                    // Read from halves: exact as halves.
                    SkeletonDtype::F16 => {
                        Floats::F16(b.mean.iter().map(|&m| f16::from_f32(m)).collect())
                    }
                    SkeletonDtype::F32 => Floats::F32(b.mean),
                },
                scales: {
                    let per_row = match b.log_scales {
                        Some((base, bytes)) => Scales::Log8 { base, bytes },
                        None if f16_scales => Scales::Values(Floats::F16(
                            b.scales.iter().map(|&s| f16::from_f32(s)).collect(),
                        )),
                        None => Scales::Values(Floats::F32(b.scales)),
                    };
                    if block_scales && b.rows > 0 {
                        // Every row holds the block's scale: read it once.
                        let mut one = [0.0f32];
                        per_row.read(0, &mut one);
                        Scales::Block(one[0])
                    } else {
                        per_row
                    }
                },
                codes: {
                    let mut codes = b.codes;
                    codes.extend_from_slice(&[0; CODE_PADDING]);
                    codes
                },
                outlier_at: b.outliers.iter().map(|&(i, _)| i as u32).collect(),
                outlier_z: b.outliers.iter().map(|&(_, z)| f16::from_f32(z)).collect(),
            })
            .collect();
        Ok(Self {
            tokens,
            heads,
            dim,
            bits: config.bits,
            centroids: enc.centroid_table(),
            seed: config.seed,
            blocks,
            blocks_per_head: header.blocks_per_head,
            rope_mean: rope_mean.map(Floats::halves_if_exact),
            position,
        })
    }

    /// `[tokens, kv_heads, head_dim]`.
    pub fn shape(&self) -> [usize; 3] {
        [self.tokens, self.heads, self.dim]
    }

    /// Absolute position of the first token.
    pub fn position(&self) -> usize {
        self.position
    }

    /// The pre-RoPE mean `[heads, dim]` of the RoPE-mean K layout, if any (as f32).
    pub fn rope_mean(&self) -> Option<Vec<f32>> {
        self.rope_mean.as_ref().map(Floats::to_vec)
    }

    /// The seeded signs of the Hadamard rotation, `dim` values (made from the seed, not held).
    pub(crate) fn signs(&self) -> Vec<f32> {
        hadamard::signs(self.seed, self.dim)
    }

    /// Bytes held: per block the codes (and their [`CODE_PADDING`]), the scales (2 bytes per
    /// row as f16, 4 as f32, 1 per row and a 4-byte base as log8, 4 per block for a block
    /// scale), the outliers (6 bytes each) and the mean (2 or 4 bytes per value, as the
    /// encoding stores it); the pre-RoPE mean (2 bytes per value as halves, else 4) and the
    /// centroid table (f32). Not the struct and `Vec` headers (a few hundred bytes), nor the
    /// Hadamard signs (not held).
    pub fn nbytes(&self) -> usize {
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| b.codes.len() + b.scales.nbytes() + b.outlier_at.len() * 6 + b.mean.nbytes())
            .sum();
        blocks + self.rope_mean.as_ref().map_or(0, Floats::nbytes) + self.centroids.len() * 4
    }

    /// The blocks of head `h`, in token order.
    pub(crate) fn head_blocks(&self, h: usize) -> &[HeadBlock] {
        &self.blocks[h * self.blocks_per_head..(h + 1) * self.blocks_per_head]
    }

    /// Dequantizes rows `from..from + n` of `block` (relative to the block) into `out`
    /// (`n · D` values, rotated domain, unscaled, outliers in place).
    #[inline(always)]
    pub(crate) fn dequantize_rows(&self, block: &HeadBlock, from: usize, out: &mut [f32]) {
        let dim = self.dim;
        let n = out.len() / dim;
        let start = from * dim * usize::from(self.bits) / 8;
        bitpack::unpack_lookup(&block.codes[start..], self.bits, &self.centroids, out);
        let (lo, hi) = ((from * dim) as u32, ((from + n) * dim) as u32);
        let first = block.outlier_at.partition_point(|&i| i < lo);
        for (&at, &z) in block.outlier_at[first..]
            .iter()
            .zip(&block.outlier_z[first..])
            .take_while(|(&at, _)| at < hi)
        {
            out[(at - lo) as usize] = f16::to_f32(z);
        }
    }

    /// Decodes to f32 `[tokens, heads, dim]`: the codec's decode of the same encoding, the
    /// same operations in the same order (so the same values); without the pre-RoPE mean.
    pub fn decode(&self) -> Vec<f32> {
        let (heads, dim) = (self.heads, self.dim);
        let mut out = vec![0.0f32; self.tokens * heads * dim];
        let mut row = vec![0.0f32; dim];
        let mut scale = [0.0f32; 1];
        let signs = self.signs();
        for h in 0..heads {
            for block in self.head_blocks(h) {
                let mean = block.mean.to_vec();
                for i in 0..block.rows {
                    self.dequantize_rows(block, i, &mut row);
                    block.scales.read(i, &mut scale);
                    row.iter_mut().for_each(|v| *v *= scale[0]);
                    hadamard::unrotate(&mut row, &signs);
                    row.iter_mut().zip(&mean).for_each(|(v, m)| *v += m);
                    let t = block.first + i;
                    out[(t * heads + h) * dim..][..dim].copy_from_slice(&row);
                }
            }
        }
        out
    }
}
