//! Codec parameters, validated at construction and serialised into every encoding.

use serde::{Deserialize, Serialize};

use crate::error::{invalid, Result};
use crate::lloyd_max::{uniform_table, validate_centroids, MAX_TABLE_BITS};

/// Largest supported head dimension.
pub const MAX_HEAD_DIM: usize = 4096;
/// Largest supported block size (tokens).
pub const MAX_BLOCK_SIZE: usize = 1 << 24;

/// How the PCA skeleton is fitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PcaMethod {
    /// Symmetric eigendecomposition of the Gram matrix.
    Exact,
    /// Halko–Martinsson–Tropp sketch with power iterations.
    Randomized,
}

/// What the reconstruction error is measured against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Plain squared error.
    Mse,
    /// Squared error after the caller's pre-conditioner `L` (attention-score error for K).
    InnerProduct,
}

/// Storage type of means, bases and the pre-conditioner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkeletonDtype {
    /// IEEE half.
    F16,
    /// IEEE single.
    F32,
}

impl SkeletonDtype {
    /// Bytes per stored value.
    pub fn size(self) -> usize {
        match self {
            Self::F16 => 2,
            Self::F32 => 4,
        }
    }

    /// `v` rounded to this storage type.
    #[inline(always)]
    pub fn round(self, v: f64) -> f32 {
        match self {
            Self::F16 => crate::f16::to_f32(crate::f16::from_f64(v)),
            Self::F32 => v as f32,
        }
    }

    /// [`SkeletonDtype::round`] of an f32 value (the same result, without the f64 path).
    #[inline(always)]
    pub fn round_f32(self, v: f32) -> f32 {
        match self {
            Self::F16 => crate::f16::round(v),
            Self::F32 => v,
        }
    }
}

/// How the bits of a block are spread over its principal components.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Allocation {
    /// Every coordinate gets `bits` after a randomized Hadamard rotation (format version 1).
    #[default]
    Uniform,
    /// `bits · r` bits per vector spread over the `r` components by their variance, no
    /// rotation (format version 2).
    Variance,
}

impl Allocation {
    /// Whether this is the default (uniform) allocation, omitted from the JSON form.
    pub fn is_uniform(&self) -> bool {
        *self == Self::Uniform
    }
}

/// Whether a block's skeleton has a PCA basis or only its mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// Mean plus an orthonormal PCA basis (format versions 1 and 2).
    #[default]
    Pca,
    /// Mean only, every coordinate kept: at full rank a PCA basis followed by the random
    /// rotation is just another rotation, so its `D × D` values buy little (format version 3).
    None,
}

impl Basis {
    /// Whether this is the default (PCA), omitted from the JSON form.
    pub fn is_pca(&self) -> bool {
        *self == Self::Pca
    }
}

/// How many vectors share one scale (allocation "uniform").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleGranularity {
    /// One scale per vector: every vector gets the same relative error.
    #[default]
    Vector,
    /// One scale per block: every vector gets the same absolute error, which is what
    /// minimises the block's MSE; with entropy coding vectors of larger norm then take more
    /// bits, and the `n` stored scales shrink to one (format version 4).
    Block,
}

impl ScaleGranularity {
    /// Whether this is the default (per vector), omitted from the JSON form.
    pub fn is_vector(&self) -> bool {
        *self == Self::Vector
    }
}

/// How the scales are stored (allocation "uniform").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleFormat {
    /// IEEE half, or single where a scale falls outside the half range.
    #[default]
    Float,
    /// One byte per scale on a grid of 1/16 octave below the block's largest scale, the
    /// bytes rANS-coded with `entropy_coding` (format version 5). Quantization divides by
    /// the rounded scale, so the coarser scale costs rate, not error.
    Log8,
}

impl ScaleFormat {
    /// Whether this is the default (float), omitted from the JSON form.
    pub fn is_float(&self) -> bool {
        *self == Self::Float
    }
}

/// What mixes a block's coordinates before quantization (basis "none", allocation "uniform").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rotation {
    /// Seeded randomized Hadamard: every coordinate gets the same spread.
    #[default]
    Hadamard,
    /// None: the coordinates are already decorrelated and ordered by variance (a model
    /// basis applied by the caller, `transform`); one step for all of them is the reverse
    /// water-filling allocation, and entropy coding gives each group of [`COMPONENT_GROUP`]
    /// coordinates its own frequency table (format version 6).
    None,
}

impl Rotation {
    /// Whether this is the default (Hadamard), omitted from the JSON form.
    pub fn is_hadamard(&self) -> bool {
        *self == Self::Hadamard
    }
}

/// Coordinates per frequency table with rotation "none" and entropy coding.
pub const COMPONENT_GROUP: usize = 8;

/// Every parameter of the codec (docs/codec.md, "Configuration").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CodecConfig {
    /// Bits per quantized coordinate, 1..=8 (the alphabet of the codes is `2^bits`).
    pub bits: u8,
    /// Tokens per block.
    pub block_size: usize,
    /// PCA method.
    pub pca: PcaMethod,
    /// Share of variance kept; ≥ 1 keeps every component.
    pub variance_ratio: f64,
    /// Fixed rank, overriding `variance_ratio`.
    pub rank: Option<usize>,
    /// Upper bound on the rank.
    pub rank_cap: Option<usize>,
    /// One skeleton per head instead of one per block.
    pub share_basis: bool,
    /// `|z|` above which a coordinate is stored exactly.
    pub outlier_threshold: Option<f32>,
    /// Error metric.
    pub metric: Metric,
    /// Caller's sorted centroid table (`2^bits` values), or the Gaussian table.
    pub centroids: Option<Vec<f32>>,
    /// Storage type of the skeleton.
    pub skeleton_dtype: SkeletonDtype,
    /// Seed of every random choice.
    pub seed: u64,
    /// Extra sketch columns of randomized PCA.
    pub oversampling: usize,
    /// Power iterations of randomized PCA.
    pub power_iters: usize,
    /// Store the input verbatim (exact round trip, ratio ≤ 1 at bf16).
    pub identity: bool,
    /// Bit allocation across components. Omitted from the JSON form when uniform, so
    /// uniform encodings keep the version-1 header byte for byte.
    #[serde(skip_serializing_if = "Allocation::is_uniform")]
    pub allocation: Allocation,
    /// PCA basis or mean only. Omitted from the JSON form when PCA.
    #[serde(skip_serializing_if = "Basis::is_pca")]
    pub basis: Basis,
    /// Uniform quantizer: `2^bits` levels `(i − (2^bits − 1)/2)·step` in units of the
    /// per-vector scale, instead of the Lloyd–Max table. With entropy coding its rate follows
    /// `step`, not `bits`. Omitted from the JSON form when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uniform_step: Option<f32>,
    /// Code indices entropy-coded (rANS, one frequency table per block) instead of bit-packed.
    /// Lossless: the decoded values are the same. Omitted from the JSON form when false.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub entropy_coding: bool,
    /// One scale per vector or per block. Omitted from the JSON form when per vector.
    #[serde(skip_serializing_if = "ScaleGranularity::is_vector")]
    pub scale_granularity: ScaleGranularity,
    /// Storage of the scales. Omitted from the JSON form when float.
    #[serde(skip_serializing_if = "ScaleFormat::is_float")]
    pub scale_format: ScaleFormat,
    /// Rotation before quantization. Omitted from the JSON form when Hadamard.
    #[serde(skip_serializing_if = "Rotation::is_hadamard")]
    pub rotation: Rotation,
    /// SHA-256 (64 lowercase hex digits) of the per-model basis the caller applied to the
    /// input before encoding and must invert after decoding (`kakeya_py.model_basis`); the
    /// codec only carries it, so that the bytes name the basis they need. Omitted when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transform: Option<String>,
}

impl Default for CodecConfig {
    fn default() -> Self {
        Self {
            bits: 3,
            block_size: 1024,
            pca: PcaMethod::Exact,
            variance_ratio: 1.0,
            rank: None,
            rank_cap: None,
            share_basis: false,
            outlier_threshold: None,
            metric: Metric::Mse,
            centroids: None,
            skeleton_dtype: SkeletonDtype::F16,
            seed: 0,
            oversampling: 8,
            power_iters: 2,
            identity: false,
            allocation: Allocation::Uniform,
            basis: Basis::Pca,
            uniform_step: None,
            entropy_coding: false,
            scale_granularity: ScaleGranularity::Vector,
            scale_format: ScaleFormat::Float,
            rotation: Rotation::Hadamard,
            transform: None,
        }
    }
}

impl CodecConfig {
    /// The identity codec: every stage bypassed.
    pub fn identity() -> Self {
        Self {
            identity: true,
            ..Self::default()
        }
    }

    /// Checks every field; the first bad one is named in the error.
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_TABLE_BITS).contains(&self.bits) {
            return Err(invalid(
                "bits",
                format!("must be 1..={MAX_TABLE_BITS}, got {}", self.bits),
            ));
        }
        if self.block_size == 0 || self.block_size > MAX_BLOCK_SIZE {
            return Err(invalid(
                "block_size",
                format!("must be 1..={MAX_BLOCK_SIZE}, got {}", self.block_size),
            ));
        }
        if !(self.variance_ratio.is_finite()
            && self.variance_ratio > 0.0
            && self.variance_ratio <= 1.0)
        {
            return Err(invalid(
                "variance_ratio",
                format!("must be in (0, 1], got {}", self.variance_ratio),
            ));
        }
        if let Some(rank) = self.rank {
            if rank > MAX_HEAD_DIM {
                return Err(invalid(
                    "rank",
                    format!("must be ≤ {MAX_HEAD_DIM}, got {rank}"),
                ));
            }
        }
        if let Some(cap) = self.rank_cap {
            if cap == 0 || cap > MAX_HEAD_DIM {
                return Err(invalid(
                    "rank_cap",
                    format!("must be 1..={MAX_HEAD_DIM}, got {cap}"),
                ));
            }
        }
        if let Some(t) = self.outlier_threshold {
            if !(t.is_finite() && t > 0.0) {
                return Err(invalid(
                    "outlier_threshold",
                    format!("must be a finite number > 0 (or None), got {t}"),
                ));
            }
        }
        if let Some(table) = &self.centroids {
            if self.allocation == Allocation::Variance {
                return Err(invalid(
                    "centroids",
                    "a caller's table applies to allocation=\"uniform\" only; allocation=\"variance\" \
                     uses the Gaussian table of each component's bit width (set centroids to None)",
                ));
            }
            validate_centroids(table, self.bits)?;
        }
        if let Some(step) = self.uniform_step {
            if !(step.is_finite() && step > 0.0) {
                return Err(invalid(
                    "uniform_step",
                    format!("must be a finite number > 0 (or None), got {step}"),
                ));
            }
            validate_centroids(&uniform_table(self.bits, step), self.bits).map_err(|e| {
                invalid("uniform_step", format!("{step} gives no usable table: {e}"))
            })?;
            if self.centroids.is_some() || self.allocation == Allocation::Variance {
                return Err(invalid(
                    "uniform_step",
                    "the uniform quantizer replaces the Lloyd–Max table of allocation=\"uniform\"; \
                     it cannot be combined with centroids or allocation=\"variance\"",
                ));
            }
        }
        if self.entropy_coding && self.allocation == Allocation::Variance {
            return Err(invalid(
                "entropy_coding",
                "applies to allocation=\"uniform\" only",
            ));
        }
        if self.scale_granularity == ScaleGranularity::Block
            && self.allocation == Allocation::Variance
        {
            return Err(invalid(
                "scale_granularity",
                "\"block\" applies to allocation=\"uniform\" only",
            ));
        }
        if self.scale_format == ScaleFormat::Log8 && self.allocation == Allocation::Variance {
            return Err(invalid(
                "scale_format",
                "\"log8\" applies to allocation=\"uniform\" only",
            ));
        }
        if self.rotation == Rotation::None
            && (self.basis != Basis::None || self.allocation != Allocation::Uniform)
        {
            return Err(invalid(
                "rotation",
                "\"none\" needs basis=\"none\" and allocation=\"uniform\" (the caller's model basis \
                 replaces the PCA skeleton and the variance allocation)",
            ));
        }
        if let Some(t) = &self.transform {
            if t.len() != 64
                || !t
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(invalid(
                    "transform",
                    format!("must be a SHA-256 of 64 lowercase hex digits, got {t:?}"),
                ));
            }
        }
        if self.basis == Basis::None {
            let reduced = if self.rank.is_some() {
                Some("rank")
            } else if self.rank_cap.is_some() {
                Some("rank_cap")
            } else if self.variance_ratio < 1.0 {
                Some("variance_ratio < 1")
            } else if self.allocation == Allocation::Variance {
                Some("allocation=\"variance\"")
            } else {
                None
            };
            if let Some(what) = reduced {
                return Err(invalid(
                    "basis",
                    format!("basis=\"none\" keeps every coordinate; {what} needs basis=\"pca\""),
                ));
            }
        }
        if self.oversampling > MAX_HEAD_DIM {
            return Err(invalid(
                "oversampling",
                format!("must be ≤ {MAX_HEAD_DIM}, got {}", self.oversampling),
            ));
        }
        if self.power_iters > 32 {
            return Err(invalid(
                "power_iters",
                format!("must be ≤ 32, got {}", self.power_iters),
            ));
        }
        Ok(())
    }

    /// Builds a config from its JSON form (the header's `config`), validated.
    pub fn from_json(text: &str) -> Result<Self> {
        let config: Self =
            serde_json::from_str(text).map_err(|e| invalid("config", e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// JSON form of the config (`allocation` omitted when uniform, `basis` when PCA).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a config always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_rounding_matches_the_f64_path() {
        let mut x = 0x9E37_79B9u32;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let v = f32::from_bits(x);
            if !v.is_finite() {
                continue;
            }
            for dtype in [SkeletonDtype::F16, SkeletonDtype::F32] {
                assert_eq!(
                    dtype.round_f32(v).to_bits(),
                    dtype.round(f64::from(v)).to_bits(),
                    "{v:e}"
                );
            }
        }
    }

    #[test]
    fn default_is_valid_and_json_roundtrips() {
        let c = CodecConfig::default();
        c.validate().unwrap();
        assert_eq!(CodecConfig::from_json(&c.to_json()).unwrap(), c);
        assert!(!c.to_json().contains("allocation"));
        let v = CodecConfig {
            allocation: Allocation::Variance,
            ..Default::default()
        };
        assert!(v.to_json().ends_with(r#","allocation":"variance"}"#));
        assert_eq!(CodecConfig::from_json(&v.to_json()).unwrap(), v);
        assert!(!c.to_json().contains(r#""basis""#));
        let m = CodecConfig {
            basis: Basis::None,
            ..Default::default()
        };
        assert!(m.to_json().ends_with(r#","basis":"none"}"#));
        assert_eq!(CodecConfig::from_json(&m.to_json()).unwrap(), m);
        assert!(!c.to_json().contains("uniform_step") && !c.to_json().contains("entropy"));
        let e = CodecConfig {
            bits: 5,
            uniform_step: Some(0.25),
            entropy_coding: true,
            ..Default::default()
        };
        assert!(e
            .to_json()
            .ends_with(r#","uniform_step":0.25,"entropy_coding":true}"#));
        assert_eq!(CodecConfig::from_json(&e.to_json()).unwrap(), e);
        let b = CodecConfig {
            scale_granularity: ScaleGranularity::Block,
            ..e.clone()
        };
        assert!(b.to_json().ends_with(r#","scale_granularity":"block"}"#));
        assert_eq!(CodecConfig::from_json(&b.to_json()).unwrap(), b);
        assert!(!b.to_json().contains("scale_format"));
        let l = CodecConfig {
            scale_format: ScaleFormat::Log8,
            ..e
        };
        assert!(l.to_json().ends_with(r#","scale_format":"log8"}"#));
        assert_eq!(CodecConfig::from_json(&l.to_json()).unwrap(), l);
    }

    #[test]
    fn every_bad_field_is_named() {
        let cases: Vec<(&str, CodecConfig)> = vec![
            (
                "bits",
                CodecConfig {
                    bits: 9,
                    ..Default::default()
                },
            ),
            (
                "bits",
                CodecConfig {
                    bits: 0,
                    ..Default::default()
                },
            ),
            (
                "block_size",
                CodecConfig {
                    block_size: 0,
                    ..Default::default()
                },
            ),
            (
                "variance_ratio",
                CodecConfig {
                    variance_ratio: 0.0,
                    ..Default::default()
                },
            ),
            (
                "variance_ratio",
                CodecConfig {
                    variance_ratio: f64::NAN,
                    ..Default::default()
                },
            ),
            (
                "rank_cap",
                CodecConfig {
                    rank_cap: Some(0),
                    ..Default::default()
                },
            ),
            (
                "outlier_threshold",
                CodecConfig {
                    outlier_threshold: Some(-1.0),
                    ..Default::default()
                },
            ),
            (
                "centroids",
                CodecConfig {
                    centroids: Some(vec![0.0; 3]),
                    ..Default::default()
                },
            ),
            (
                "centroids",
                CodecConfig {
                    centroids: Some(vec![-1.0, -0.3, 0.3, 1.0, 1.5, 2.0, 2.5, 3.0]),
                    allocation: Allocation::Variance,
                    ..Default::default()
                },
            ),
            (
                "basis",
                CodecConfig {
                    basis: Basis::None,
                    rank: Some(8),
                    ..Default::default()
                },
            ),
            (
                "basis",
                CodecConfig {
                    basis: Basis::None,
                    variance_ratio: 0.9,
                    ..Default::default()
                },
            ),
            (
                "basis",
                CodecConfig {
                    basis: Basis::None,
                    allocation: Allocation::Variance,
                    ..Default::default()
                },
            ),
            (
                "uniform_step",
                CodecConfig {
                    uniform_step: Some(0.0),
                    ..Default::default()
                },
            ),
            (
                "uniform_step",
                CodecConfig {
                    uniform_step: Some(0.5),
                    centroids: Some(vec![-1.0, -0.3, 0.3, 1.0, 1.5, 2.0, 2.5, 3.0]),
                    ..Default::default()
                },
            ),
            (
                "entropy_coding",
                CodecConfig {
                    entropy_coding: true,
                    allocation: Allocation::Variance,
                    ..Default::default()
                },
            ),
            (
                "scale_granularity",
                CodecConfig {
                    scale_granularity: ScaleGranularity::Block,
                    allocation: Allocation::Variance,
                    ..Default::default()
                },
            ),
            (
                "scale_format",
                CodecConfig {
                    scale_format: ScaleFormat::Log8,
                    allocation: Allocation::Variance,
                    ..Default::default()
                },
            ),
            (
                "power_iters",
                CodecConfig {
                    power_iters: 99,
                    ..Default::default()
                },
            ),
        ];
        for (field, config) in cases {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn unknown_json_fields_are_refused() {
        let err = CodecConfig::from_json(r#"{"bitz": 3}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bitz"), "{err}");
    }
}
