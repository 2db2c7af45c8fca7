//! Parsing and validating serialized bytes into an [`Encoded`]: preamble, header,
//! pre-conditioner, offset tables and the bounds of every record.

use super::records::read_skeleton;
use super::variance::read_allocation;
use super::{lower_triangular_inverse, Encoded};
use crate::config::{Allocation, Metric};
use crate::error::{CodecError, Result};
use crate::format::{self, Reader};
use crate::tensor::{checked_numel, OwnedElements, TensorView};

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
}
