//! Block and skeleton records: their parsed form, the writers of their sections (skeleton,
//! scales, codes, outliers) and the parser of one block record.

use super::variance::{read_allocation, BitAllocation};
use super::{coded_width, Encoded};
use crate::bitpack;
use crate::config::{
    Allocation, Basis, CodecConfig, Rotation, ScaleGranularity, SkeletonDtype, COMPONENT_GROUP,
};
use crate::entropy::{self, FrequencyTable};
use crate::error::{CodecError, Result};
use crate::format::{self, Reader, ScaleDtype, Writer};
use crate::log_scale;
use crate::pca::Skeleton;

const SEGMENT_CODES: usize = 65536;

/// A block record, parsed but not dequantized.
pub(super) struct BlockRecord<'a> {
    pub(super) own_skeleton: Option<Skeleton>,
    pub(super) own_alloc: Option<BitAllocation>,
    pub(super) scales: Vec<f32>,
    /// Log8 scales as stored (`scale_format = "log8"`): the base level and one byte per
    /// stored scale (one per block with block granularity); `scales` holds their values.
    pub(super) log_scales: Option<(i32, CodeValues<'a>)>,
    pub(super) codes: Codes<'a>,
    /// `(row · P + coordinate, value)` pairs.
    pub(super) outliers: Vec<(usize, f32)>,
}

/// A block's code section as stored.
pub(super) enum Codes<'a> {
    /// Bit-packed codes.
    Packed(&'a [u8]),
    /// The rANS lanes and their frequency table.
    Entropy {
        table: FrequencyTable,
        stream: &'a [u8],
    },
    /// Rotation "none" with entropy coding: one section per group of [`COMPONENT_GROUP`]
    /// coordinates (rows of `width` values), each holding that group's codes row by row.
    Groups {
        width: usize,
        bits: u8,
        sections: Vec<Codes<'a>>,
    },
}

/// Code-section mode bytes of format version 4 with `entropy_coding`.
const CODES_PACKED: u8 = 0;
const CODES_RANS: u8 = 1;

/// A block's codes ready to be looked up: packed ones are read in place, rANS lanes are
/// decoded once into one code per byte.
pub(super) enum CodeValues<'a> {
    Packed(&'a [u8]),
    Symbols(Vec<u8>),
}

impl<'a> Codes<'a> {
    /// The `count` codes of the section, any rANS lanes decoded (an error if damaged).
    pub(super) fn values(&self, count: usize) -> Result<CodeValues<'a>> {
        Ok(match self {
            Self::Packed(bytes) => CodeValues::Packed(bytes),
            Self::Entropy { table, stream } => {
                let mut symbols = vec![0u8; count];
                entropy::decode(stream, table, &mut symbols)?;
                CodeValues::Symbols(symbols)
            }
            Self::Groups {
                width,
                bits,
                sections,
            } => {
                let rows = count / width;
                let mut symbols = vec![0u8; count];
                for (section, (first, w)) in sections.iter().zip(component_groups(*width)) {
                    let group = section.group_symbols(rows * w, *bits)?;
                    for (row, codes) in symbols.chunks_exact_mut(*width).zip(group.chunks_exact(w))
                    {
                        row[first..first + w].copy_from_slice(codes);
                    }
                }
                CodeValues::Symbols(symbols)
            }
        })
    }

    /// One group's `count` codes, one per byte.
    fn group_symbols(&self, count: usize, bits: u8) -> Result<Vec<u8>> {
        Ok(match self {
            Self::Packed(bytes) => {
                let table: Vec<f32> = (0..1u32 << bits).map(|i| i as f32).collect();
                let mut values = vec![0.0f32; count];
                bitpack::unpack_lookup(bytes, bits, &table, &mut values);
                values.into_iter().map(|v| v as u8).collect()
            }
            Self::Entropy { table, stream } => {
                let mut symbols = vec![0u8; count];
                entropy::decode(stream, table, &mut symbols)?;
                symbols
            }
            Self::Groups { .. } => {
                return Err(CodecError::Corrupt("nested code groups".into()));
            }
        })
    }
}

impl CodeValues<'_> {
    /// The codes one per byte (8-bit codes: packed bytes are the codes).
    pub(super) fn symbols(&self) -> &[u8] {
        match self {
            Self::Packed(bytes) => bytes,
            Self::Symbols(symbols) => symbols,
        }
    }

    /// Codes `[first, first + out.len())` looked up in `values` (the quantizer's table);
    /// packed codes must start on a byte (`first · bits` a multiple of 8).
    #[inline(always)]
    pub(super) fn lookup(&self, bits: u8, values: &[f32], first: usize, out: &mut [f32]) {
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

pub(super) fn round_scale(s: f32, dtype: ScaleDtype) -> f32 {
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

#[inline(always)]
pub(super) fn write_skeleton(w: &mut Writer, sk: &Skeleton, dtype: SkeletonDtype) {
    w.u16(sk.rank as u16);
    w.skeleton_values(&sk.mean, dtype);
    w.skeleton_values(&sk.basis_t, dtype);
}

pub(super) fn read_skeleton(
    r: &mut Reader<'_>,
    dim: usize,
    config: &CodecConfig,
) -> Result<Skeleton> {
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

/// A code section of `bits`-bit symbols: bit-packed, or with `entropy` a mode byte and then
/// whichever of the packed codes and the rANS form (frequency table, `u32` length, the
/// lanes) is shorter.
#[inline(always)]
pub(super) fn write_codes(w: &mut Writer, codes: &[u8], bits: u8, entropy: bool) {
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

/// `(first coordinate, width)` of each group of [`COMPONENT_GROUP`] coordinates in a row of `width`.
fn component_groups(width: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..width)
        .step_by(COMPONENT_GROUP)
        .map(move |first| (first, COMPONENT_GROUP.min(width - first)))
}

/// Rotation "none" with entropy coding: the `n × width` codes as one [`write_codes`]
/// section per group of [`COMPONENT_GROUP`] coordinates, so that coordinates of similar
/// spread share a frequency table.
pub(super) fn write_grouped_codes(w: &mut Writer, codes: &[u8], width: usize, bits: u8) {
    for (first, gw) in component_groups(width) {
        let group: Vec<u8> = codes
            .chunks_exact(width)
            .flat_map(|row| row[first..first + gw].iter().copied())
            .collect();
        write_codes(w, &group, bits, true);
    }
}

/// Reads the sections of [`write_grouped_codes`] for `n` rows of `width` codes.
fn read_grouped_codes<'a>(
    r: &mut Reader<'a>,
    n: usize,
    width: usize,
    bits: u8,
) -> Result<Codes<'a>> {
    let mut sections = Vec::with_capacity(width.div_ceil(COMPONENT_GROUP));
    for (_, gw) in component_groups(width) {
        sections.push(read_codes(
            r,
            bitpack::packed_len(n * gw, bits),
            bits,
            true,
        )?);
    }
    Ok(Codes::Groups {
        width,
        bits,
        sections,
    })
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
pub(super) fn write_rounded_scales(
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
pub(super) fn write_outliers(w: &mut Writer, outliers: &[(usize, f32)], n: usize, width: usize) {
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

impl Encoded {
    pub(super) fn parse_block<'a>(
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
            let padded = coded_width(rank, config);
            (padded, bitpack::packed_len(n * padded, config.bits), None)
        };
        let mut record = BlockRecord {
            own_skeleton,
            own_alloc,
            scales: Vec::new(),
            log_scales: None,
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
            let values = log_scale::dequantize(base, symbols.symbols())?;
            record.log_scales = Some((base, symbols));
            values
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
        record.codes = if config.rotation == Rotation::None && config.entropy_coding {
            read_grouped_codes(&mut r, n, width, config.bits)?
        } else {
            read_codes(&mut r, code_bytes, config.bits, config.entropy_coding)?
        };
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
}
