//! The row-block layout the attention kernel reads: each block's mean, per-row scales,
//! bit-packed codes and outliers, for encodings that decode row by row.

use super::records::Codes;
use super::{quantizer_for, Encoded};
use crate::bitpack;
use crate::error::{CodecError, Result};

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
    /// Log8 encodings: the base level and one byte per row (a block's byte repeated), the
    /// bytes `scales` were decoded from ([`crate::log_scale`]).
    pub log_scales: Option<(i32, Vec<u8>)>,
    /// `rows · D` codes bit-packed at `bits` bits, row-major.
    pub codes: Vec<u8>,
    /// `(row · D + coordinate, z)`, increasing.
    pub outliers: Vec<(usize, f32)>,
}

impl Encoded {
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
    /// decoded and re-packed), scales as f32 (one per row, and their log8 bytes where the
    /// scales are log8), outliers as `(row · D + j, z)`.
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
                    Codes::Entropy { .. } | Codes::Groups { .. } => {
                        let values = record.codes.values(n * dim)?;
                        let mut packed = vec![0u8; bitpack::packed_len(n * dim, config.bits)];
                        bitpack::pack(values.symbols(), config.bits, &mut packed);
                        packed
                    }
                };
                let log_scales = record.log_scales.as_ref().map(|(base, bytes)| {
                    let bytes = bytes.symbols();
                    let per_row = if bytes.len() == n {
                        bytes.to_vec()
                    } else {
                        vec![bytes[0]; n]
                    };
                    (*base, per_row)
                });
                Ok(RowBlock {
                    first: b * config.block_size,
                    rows: n,
                    mean,
                    scales: record.scales,
                    log_scales,
                    codes,
                    outliers: record.outliers,
                })
            })
            .collect()
    }
}
