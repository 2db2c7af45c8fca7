//! Input and output tensors `[tokens, kv_heads, head_dim]` in f32, f16 or bf16.

use half::bf16;
use serde::{Deserialize, Serialize};

use crate::config::MAX_HEAD_DIM;
use crate::error::{CodecError, Result};

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DType {
    /// IEEE single.
    F32,
    /// IEEE half (raw bits as u16).
    F16,
    /// bfloat16 (raw bits as u16).
    Bf16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }

    /// The name used in headers and Python (`"f32"`, `"f16"`, `"bf16"`).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }

    /// Parses a name as written by [`DType::name`].
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            other => Err(CodecError::DType(format!(
                "unsupported dtype {other:?}; expected f32, f16 or bf16"
            ))),
        }
    }
}

/// Borrowed element storage. Half types are raw bit patterns.
#[derive(Debug, Clone, Copy)]
pub enum Elements<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// IEEE half bit patterns.
    F16(&'a [u16]),
    /// bfloat16 bit patterns.
    Bf16(&'a [u16]),
}

/// Owned element storage, as returned by decode.
#[derive(Debug, Clone, PartialEq)]
pub enum OwnedElements {
    /// f32 values.
    F32(Vec<f32>),
    /// IEEE half bit patterns.
    F16(Vec<u16>),
    /// bfloat16 bit patterns.
    Bf16(Vec<u16>),
}

impl Elements<'_> {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            Self::F32(_) => DType::F32,
            Self::F16(_) => DType::F16,
            Self::Bf16(_) => DType::Bf16,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::F16(v) | Self::Bf16(v) => v.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` as f32 (exact for every type).
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Self::F32(v) => v[i],
            Self::F16(v) => crate::f16::to_f32(v[i]),
            Self::Bf16(v) => bf16::from_bits(v[i]).to_f32(),
        }
    }

    /// Raw little-endian bytes of the elements.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            Self::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Self::F16(v) | Self::Bf16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

impl OwnedElements {
    /// [`OwnedElements::from_f32`], with values beyond `dtype`'s largest finite value
    /// clamped to it instead of becoming infinite: a decoder's error can carry a value
    /// next to the limit of the input's type past it.
    pub fn from_f32_saturating(values: Vec<f32>, dtype: DType) -> Self {
        let limit = match dtype {
            DType::F32 => f32::INFINITY,
            DType::F16 => crate::f16::MAX,
            DType::Bf16 => bf16::MAX.to_f32(),
        };
        Self::from_f32_clamped(values, dtype, limit)
    }

    /// Converts f32 values to `dtype`, rounding to nearest even.
    pub fn from_f32(values: Vec<f32>, dtype: DType) -> Self {
        Self::from_f32_clamped(values, dtype, f32::INFINITY)
    }

    /// Converts f32 values, clamped to `±limit`, to `dtype` (an infinite limit clamps nothing).
    fn from_f32_clamped(values: Vec<f32>, dtype: DType, limit: f32) -> Self {
        match dtype {
            DType::F32 => Self::F32(values),
            DType::F16 => Self::F16(
                values
                    .iter()
                    .map(|&v| crate::f16::from_f32(v.clamp(-limit, limit)))
                    .collect(),
            ),
            DType::Bf16 => Self::Bf16(
                values
                    .iter()
                    .map(|&v| bf16::from_f32(v.clamp(-limit, limit)).to_bits())
                    .collect(),
            ),
        }
    }

    /// Parses little-endian bytes of `dtype` (length already checked).
    pub fn from_le_bytes(bytes: &[u8], dtype: DType) -> Self {
        match dtype {
            DType::F32 => Self::F32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            DType::F16 => Self::F16(
                bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
            DType::Bf16 => Self::Bf16(
                bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
        }
    }

    /// Borrowed view.
    pub fn view(&self) -> Elements<'_> {
        match self {
            Self::F32(v) => Elements::F32(v),
            Self::F16(v) => Elements::F16(v),
            Self::Bf16(v) => Elements::Bf16(v),
        }
    }

    /// Converts to another dtype (exact when widening, nearest-even when narrowing).
    pub fn cast(self, dtype: DType) -> Self {
        if self.view().dtype() == dtype {
            return self;
        }
        let values = match &self {
            Self::F32(v) => v.clone(),
            _ => {
                let view = self.view();
                (0..view.len()).map(|i| view.get(i)).collect()
            }
        };
        Self::from_f32(values, dtype)
    }
}

/// A borrowed `[tokens, kv_heads, head_dim]` tensor, row-major.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    /// The elements, `tokens · kv_heads · head_dim` of them.
    pub elements: Elements<'a>,
    /// `[tokens, kv_heads, head_dim]`.
    pub shape: [usize; 3],
}

/// Most elements one tensor may hold (2^34: 64 GiB of f32).
pub const MAX_ELEMENTS: usize = 1 << 34;

/// Product of a shape, or an error naming it when it exceeds [`MAX_ELEMENTS`].
pub fn checked_numel(shape: [usize; 3]) -> Result<usize> {
    shape[0]
        .checked_mul(shape[1])
        .and_then(|v| v.checked_mul(shape[2]))
        .filter(|&n| n <= MAX_ELEMENTS)
        .ok_or_else(|| {
            CodecError::Shape(format!("shape {shape:?} exceeds {MAX_ELEMENTS} elements"))
        })
}

/// Index of the first value whose masked exponent is `all_ones` (the largest masked value).
/// Each chunk is checked with a branch-free maximum, which vectorises, unlike a search that
/// stops at the first hit.
#[inline(always)]
fn first_all_ones<T: Copy>(
    values: &[T],
    exponent: impl Fn(T) -> u32,
    all_ones: u32,
) -> Option<usize> {
    const CHUNK: usize = 4096;
    values.chunks(CHUNK).enumerate().find_map(|(k, chunk)| {
        let peak = chunk.iter().fold(0, |m, &x| m.max(exponent(x)));
        (peak == all_ones)
            .then(|| chunk.iter().position(|&x| exponent(x) == all_ones))
            .flatten()
            .map(|i| k * CHUNK + i)
    })
}

/// Whether every value is finite (f32 rows gathered from an input).
#[inline(always)]
pub fn all_finite(values: &[f32]) -> bool {
    first_all_ones(values, |x| x.to_bits() & 0x7F80_0000, 0x7F80_0000).is_none()
}

impl<'a> TensorView<'a> {
    /// A view after checking that the buffer matches the shape.
    pub fn new(elements: Elements<'a>, shape: [usize; 3]) -> Result<Self> {
        let [_, heads, dim] = shape;
        if heads == 0 {
            return Err(CodecError::Shape("kv_heads must be ≥ 1, got 0".into()));
        }
        if dim == 0 || dim > MAX_HEAD_DIM {
            return Err(CodecError::Shape(format!(
                "head_dim must be 1..={MAX_HEAD_DIM}, got {dim}"
            )));
        }
        let numel = checked_numel(shape)?;
        if numel != elements.len() {
            return Err(CodecError::Shape(format!(
                "shape {shape:?} needs {numel} elements, buffer has {}",
                elements.len()
            )));
        }
        Ok(Self { elements, shape })
    }

    /// Errors on the first NaN or ±Inf, naming its position.
    #[inline(always)]
    pub fn check_finite(&self) -> Result<()> {
        let [_, heads, dim] = self.shape;
        // Inf and NaN are the values whose exponent bits are all ones.
        let first_bad = match self.elements {
            Elements::F32(v) => first_all_ones(v, |x| x.to_bits() & 0x7F80_0000, 0x7F80_0000),
            Elements::F16(v) => first_all_ones(v, |x| u32::from(x & 0x7C00), 0x7C00),
            Elements::Bf16(v) => first_all_ones(v, |x| u32::from(x & 0x7F80), 0x7F80),
        };
        match first_bad {
            None => Ok(()),
            Some(i) => Err(CodecError::NonFinite {
                token: i / (heads * dim),
                head: (i / dim) % heads,
                dim: i % dim,
                value: self.elements.get(i),
            }),
        }
    }

    /// Rows of head `head` as a dense `[tokens, head_dim]` f32 matrix (row-major).
    #[inline(always)]
    pub fn head_rows(&self, head: usize) -> Vec<f32> {
        self.block_rows(head, 0..self.shape[0])
    }

    /// Rows `tokens` of head `head` as a dense f32 matrix (row-major).
    #[inline(always)]
    pub fn block_rows(&self, head: usize, tokens: std::ops::Range<usize>) -> Vec<f32> {
        let [_, heads, dim] = self.shape;
        let mut out = Vec::with_capacity(tokens.len() * dim);
        for t in tokens {
            let start = (t * heads + head) * dim;
            match self.elements {
                Elements::F32(v) => out.extend_from_slice(&v[start..start + dim]),
                _ => out.extend((start..start + dim).map(|i| self.elements.get(i))),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_non_finite_value_is_located_in_every_dtype() {
        let shape = [100usize, 3, 32];
        let n: usize = shape.iter().product();
        for at in [0usize, 4095, 4096, 5000, n - 1] {
            let mut f = vec![1.5f32; n];
            f[at] = f32::NAN;
            if at + 1 < n {
                f[n - 1] = f32::INFINITY; // a later bad value is not the one reported
            }
            let mut h = vec![0x3C00u16; n];
            h[at] = 0x7C00; // f16 +Inf
            let mut b = vec![0x3F80u16; n];
            b[at] = 0xFFC0; // bf16 NaN
            for elements in [Elements::F32(&f), Elements::F16(&h), Elements::Bf16(&b)] {
                let err = TensorView::new(elements, shape)
                    .unwrap()
                    .check_finite()
                    .unwrap_err();
                let (t, hd, d) = (at / 96, (at / 32) % 3, at % 32);
                assert!(
                    matches!(err, CodecError::NonFinite { token, head, dim, .. } if (token, head, dim) == (t, hd, d)),
                    "{at}: {err}"
                );
            }
        }
        let fine = vec![f32::MAX; n];
        assert!(TensorView::new(Elements::F32(&fine), shape)
            .unwrap()
            .check_finite()
            .is_ok());
    }

    #[test]
    fn shape_mismatch_names_both_sides() {
        let data = [0.0f32; 10];
        let err = TensorView::new(Elements::F32(&data), [2, 2, 3])
            .unwrap_err()
            .to_string();
        assert!(err.contains("12") && err.contains("10"), "{err}");
    }

    #[test]
    fn non_finite_position_is_reported() {
        let mut data = vec![0u16; 2 * 3 * 4];
        data[13] = bf16::from_f32(f32::INFINITY).to_bits();
        let view = TensorView::new(Elements::Bf16(&data), [2, 3, 4]).unwrap();
        match view.check_finite().unwrap_err() {
            CodecError::NonFinite {
                token, head, dim, ..
            } => assert_eq!((token, head, dim), (1, 0, 1)),
            e => panic!("unexpected {e}"),
        }
    }

    #[test]
    fn half_casts_round_to_nearest_even() {
        let v = OwnedElements::from_f32(vec![1.0 + 1.0 / 256.0], DType::Bf16);
        assert_eq!(v, OwnedElements::Bf16(vec![bf16::from_f32(1.0).to_bits()]));
    }
}
