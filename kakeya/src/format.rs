//! The byte format (docs/codec.md, "Bytes"): header, layout, bounds-checked reading.

use serde::{Deserialize, Serialize};

use crate::config::{
    Allocation, Basis, CodecConfig, Rotation, ScaleFormat, ScaleGranularity, SkeletonDtype,
};
use crate::error::{CodecError, Result};
use crate::tensor::DType;

/// First bytes of every encoding.
pub const MAGIC: &[u8; 6] = b"KAKEYA";
/// The newest format version this library writes and reads. An encoding is written with
/// the lowest version that can express it: 1 for `allocation = "uniform"` with a PCA basis
/// (byte for byte the version-1 format), 2 for `allocation = "variance"`, 3 for
/// `basis = "none"` (skeletons without basis values), 4 for `uniform_step`,
/// `entropy_coding` (a code-section mode byte in every block record) or
/// `scale_granularity = "block"` (one scale per block record).
/// Version 5 adds `scale_format = "log8"` (one byte per scale and a base per record).
/// Version 6 adds `rotation = "none"` (one code section per group of coordinates with
/// entropy coding) and `transform` (the caller's model basis, named by hash).
pub const FORMAT_VERSION: u16 = 6;
/// The oldest format version this library reads.
pub const MIN_FORMAT_VERSION: u16 = 1;

/// The version an encoding with `config` is written with.
pub fn version_for(config: &CodecConfig) -> u16 {
    if config.rotation == Rotation::None || config.transform.is_some() {
        return 6;
    }
    if config.scale_format == ScaleFormat::Log8 {
        return 5;
    }
    if config.entropy_coding
        || config.uniform_step.is_some()
        || config.scale_granularity == ScaleGranularity::Block
    {
        return 4;
    }
    match (config.allocation, config.basis) {
        (_, Basis::None) => 3,
        (Allocation::Variance, Basis::Pca) => 2,
        (Allocation::Uniform, Basis::Pca) => 1,
    }
}
/// Largest header accepted when reading.
pub const MAX_HEADER_LEN: usize = 1 << 20;
/// Bytes before the header: magic, version, header length.
pub const PREAMBLE_LEN: usize = 6 + 2 + 4;

/// Storage type of per-vector scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleDtype {
    /// IEEE half: every nonzero scale within `[2^-14, 65504]`.
    F16,
    /// IEEE single.
    F32,
    /// `scale_format = "log8"`: an `i32` base per record, then one byte per scale
    /// ([`crate::log_scale`]).
    Log8,
}

impl ScaleDtype {
    /// Bytes per scale.
    pub fn size(self) -> usize {
        match self {
            Self::F16 => 2,
            Self::F32 => 4,
            Self::Log8 => 1,
        }
    }
}

/// The JSON header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// `[tokens, kv_heads, head_dim]`.
    pub shape: [usize; 3],
    /// Input element type.
    pub dtype: DType,
    /// Every codec parameter.
    pub config: CodecConfig,
    /// Storage type of the scales.
    pub scale_dtype: ScaleDtype,
    /// Whether a pre-conditioner `L̂` is stored.
    pub preconditioner: bool,
    /// Blocks of each head.
    pub blocks_per_head: usize,
    /// Writer, informational.
    pub library: String,
    /// Format version read from (or to be written to) the preamble; not part of the JSON.
    #[serde(skip)]
    pub version: u16,
}

/// Little-endian writer of a growing buffer.
#[derive(Default)]
pub struct Writer {
    /// Bytes written so far.
    pub buf: Vec<u8>,
}

impl Writer {
    /// Appends a u16.
    #[inline(always)]
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Appends a u32.
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Appends a u64.
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Appends an IEEE half.
    #[inline(always)]
    pub fn f16(&mut self, v: f32) {
        self.u16(crate::f16::from_f32(v));
    }
    /// Appends values in the skeleton dtype (already rounded, so exact).
    #[inline(always)]
    pub fn skeleton_values(&mut self, values: &[f32], dtype: SkeletonDtype) {
        for &v in values {
            match dtype {
                SkeletonDtype::F16 => self.f16(v),
                SkeletonDtype::F32 => self.buf.extend_from_slice(&v.to_le_bytes()),
            }
        }
    }
    /// Appends scales in the scale dtype.
    pub fn scales(&mut self, values: &[f32], dtype: ScaleDtype) {
        for &v in values {
            match dtype {
                ScaleDtype::F16 => self.f16(v),
                ScaleDtype::F32 => self.buf.extend_from_slice(&v.to_le_bytes()),
                ScaleDtype::Log8 => unreachable!("log8 scales are written as levels"),
            }
        }
    }
}

/// Bounds-checked little-endian reader over a slice.
pub struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    base: usize,
}

impl<'a> Reader<'a> {
    /// Reader of `bytes`, whose first byte sits at offset `base` of the encoding (for messages).
    pub fn new(bytes: &'a [u8], base: usize) -> Self {
        Self {
            bytes,
            pos: 0,
            base,
        }
    }

    /// Bytes consumed.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// The next `len` bytes.
    pub fn take(&mut self, len: usize, what: &'static str) -> Result<&'a [u8]> {
        if len > self.remaining() {
            return Err(CodecError::Truncated {
                what,
                offset: self.base + self.pos,
                needed: len,
                available: self.remaining(),
            });
        }
        let out = &self.bytes[self.pos..self.pos + len];
        self.pos += len;
        Ok(out)
    }

    /// `count · size` bytes, with the product checked.
    pub fn take_array(
        &mut self,
        count: usize,
        size: usize,
        what: &'static str,
    ) -> Result<&'a [u8]> {
        let len = count.checked_mul(size).ok_or_else(|| {
            CodecError::Corrupt(format!("{what}: size {count} × {size} overflows"))
        })?;
        self.take(len, what)
    }

    /// A u16.
    pub fn u16(&mut self, what: &'static str) -> Result<u16> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    /// A u32.
    pub fn u32(&mut self, what: &'static str) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A u64.
    pub fn u64(&mut self, what: &'static str) -> Result<u64> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
}

/// Decodes `count` finite values stored as f16 (`size == 2`) or f32 (`size == 4`).
#[inline(always)]
pub fn read_floats(bytes: &[u8], size: usize, what: &str) -> Result<Vec<f32>> {
    let values: Vec<f32> = match size {
        2 => bytes
            .chunks_exact(2)
            .map(|c| crate::f16::to_f32(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        _ => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    };
    if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
        return Err(CodecError::Corrupt(format!(
            "non-finite value {bad} in {what}"
        )));
    }
    Ok(values)
}

/// Checks magic, version and checksum; returns the header and the body slice.
pub fn split(bytes: &[u8]) -> Result<(Header, &[u8], usize)> {
    let mut r = Reader::new(bytes, 0);
    let magic = r.take(MAGIC.len(), "magic")?;
    if magic != MAGIC {
        return Err(CodecError::BadMagic(magic.to_vec()));
    }
    let version = r.u16("version")?;
    if !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(CodecError::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let header_len = r.u32("header length")? as usize;
    if header_len > MAX_HEADER_LEN {
        return Err(CodecError::Corrupt(format!(
            "header length {header_len} exceeds the limit {MAX_HEADER_LEN}"
        )));
    }
    let header_bytes = r.take(header_len, "header")?;
    let body_start = r.position();
    if r.remaining() < 4 {
        return Err(CodecError::Truncated {
            what: "checksum",
            offset: body_start,
            needed: 4,
            available: r.remaining(),
        });
    }
    let crc_at = bytes.len() - 4;
    let stored = u32::from_le_bytes(bytes[crc_at..].try_into().expect("4 bytes"));
    let computed = crc32fast::hash(&bytes[..crc_at]);
    if stored != computed {
        return Err(CodecError::ChecksumMismatch { stored, computed });
    }
    let mut header: Header = serde_json::from_slice(header_bytes).map_err(|e| {
        CodecError::Corrupt(format!("header is not valid JSON of this version: {e}"))
    })?;
    header.version = version;
    if version < version_for(&header.config) {
        return Err(CodecError::Corrupt(format!(
            "allocation {:?}, basis {:?}, uniform_step {:?}, entropy_coding {}, \
             scale_granularity {:?}, scale_format {:?}, rotation {:?} and transform {:?} need format \
             version {}, the bytes say {version}",
            header.config.allocation,
            header.config.basis,
            header.config.uniform_step,
            header.config.entropy_coding,
            header.config.scale_granularity,
            header.config.scale_format,
            header.config.rotation,
            header.config.transform,
            version_for(&header.config)
        )));
    }
    if (header.scale_dtype == ScaleDtype::Log8) != (header.config.scale_format == ScaleFormat::Log8)
    {
        return Err(CodecError::Corrupt(format!(
            "scale_dtype {:?} does not match scale_format {:?}",
            header.scale_dtype, header.config.scale_format
        )));
    }
    Ok((header, &bytes[body_start..crc_at], body_start))
}
