//! The one error type of the codec: every failure is a value, never a panic.

use thiserror::Error;

/// Everything that can go wrong while configuring, encoding or decoding.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum CodecError {
    /// A configuration field has an invalid value.
    #[error("invalid config field `{field}`: {reason}")]
    InvalidConfig {
        /// Name of the offending field, as in the Python keyword argument.
        field: &'static str,
        /// What was expected versus what was given.
        reason: String,
    },
    /// The input's shape does not fit `[tokens, kv_heads, head_dim]` or its buffer.
    #[error("shape error: {0}")]
    Shape(String),
    /// The input's element type is not supported.
    #[error("dtype error: {0}")]
    DType(String),
    /// The input holds NaN or ±Inf.
    #[error("non-finite input value {value} at token {token}, head {head}, dim {dim}")]
    NonFinite {
        /// Token index of the first non-finite value.
        token: usize,
        /// kv-head index of the first non-finite value.
        head: usize,
        /// Dimension index of the first non-finite value.
        dim: usize,
        /// The value itself (NaN or ±Inf).
        value: f32,
    },
    /// The pre-conditioner is missing, superfluous or malformed.
    #[error("pre-conditioner error: {0}")]
    Preconditioner(String),
    /// The bytes do not start with the format's magic.
    #[error("not a kakeya encoding: bad magic {0:?} (expected \"KAKEYA\")")]
    BadMagic(Vec<u8>),
    /// The bytes were written by a format version this library cannot read.
    #[error("unsupported format version {found} (this library reads versions 1 to {supported})")]
    UnsupportedVersion {
        /// Version found in the bytes.
        found: u16,
        /// Newest version this library reads (it reads every version from 1 up).
        supported: u16,
    },
    /// The bytes end before a section does.
    #[error("truncated encoding: {what} needs {needed} bytes at offset {offset}, only {available} available")]
    Truncated {
        /// The section being read.
        what: &'static str,
        /// Offset of the section.
        offset: usize,
        /// Bytes the section needs.
        needed: usize,
        /// Bytes left.
        available: usize,
    },
    /// The stored checksum does not match the bytes.
    #[error("corrupt encoding: CRC-32 stored {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch {
        /// Checksum stored in the bytes.
        stored: u32,
        /// Checksum of the bytes as read.
        computed: u32,
    },
    /// The bytes are internally inconsistent.
    #[error("corrupt encoding: {0}")]
    Corrupt(String),
    /// A numerical routine failed (e.g. an eigendecomposition did not converge).
    #[error("numerical failure: {0}")]
    Numerical(String),
}

/// Result alias of the crate.
pub type Result<T> = std::result::Result<T, CodecError>;

pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> CodecError {
    CodecError::InvalidConfig {
        field,
        reason: reason.into(),
    }
}
