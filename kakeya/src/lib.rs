//! # kakeya
//!
//! A KV-cache codec. For each (layer, kv-head) stream of K or V vectors, blocks of
//! consecutive tokens go through a PCA skeleton (exact or randomized), a seeded
//! Walsh–Hadamard rotation, a per-vector scale, Lloyd–Max scalar codes and sparse exact
//! outliers (or, with `allocation = "variance"`, per-component bit widths that follow the
//! component variances); K may be pre-conditioned by the query covariance. The result is a versioned,
//! self-describing byte string whose length is the measured size of the cache.
//!
//! The algorithm and the bytes are specified in `docs/codec.md`.
//!
//! ```
//! use kakeya::{encode, CodecConfig, Elements, TensorView};
//! let x: Vec<f32> = (0..4 * 2 * 8).map(|i| (i as f32 * 0.1).sin()).collect();
//! let view = TensorView::new(Elements::F32(&x), [4, 2, 8]).unwrap();
//! let enc = encode(view, &CodecConfig::default(), None, None).unwrap();
//! let back = kakeya::Encoded::from_bytes(enc.as_bytes().to_vec()).unwrap().decode(None).unwrap();
//! assert_eq!(back.len(), x.len());
//! ```
#![deny(missing_docs)]

pub mod allocation;
pub mod attention;
pub mod bitpack;
mod codec;
pub mod config;
pub mod eigen;
pub mod entropy;
mod error;
pub mod f16;
pub mod format;
pub mod hadamard;
pub mod lloyd_max;
pub mod log_scale;
mod parallel;
pub mod pca;
pub mod rng;
pub mod simd;
pub mod tensor;

pub use codec::{encode, Encoded};
pub use config::{
    Allocation, Basis, CodecConfig, Metric, PcaMethod, Rotation, ScaleFormat, ScaleGranularity,
    SkeletonDtype,
};
pub use error::{CodecError, Result};
pub use format::{ScaleDtype, FORMAT_VERSION, MIN_FORMAT_VERSION};
pub use parallel::disable_after_fork;
pub use tensor::{DType, Elements, OwnedElements, TensorView};
