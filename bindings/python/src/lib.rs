//! Thin PyO3 binding of the `kakeya` crate: converts arguments, releases the GIL around
//! every encode/decode, and maps `CodecError` onto one Python exception hierarchy.
//! The Python API proper (numpy/torch handling, presets) lives in `python/kakeya_py/`.

use kakeya::{
    encode, Allocation, Basis, CodecConfig, CodecError, DType, Elements, Encoded, Metric,
    OwnedElements, PcaMethod, Rotation, ScaleFormat, ScaleGranularity, SkeletonDtype, TensorView,
};
use numpy::{IntoPyArray, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

mod attention;

// See the workspace Cargo.toml: megabyte block buffers are reused instead of faulted in anew.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

create_exception!(
    _kakeya,
    KakeyaError,
    PyValueError,
    "Base of every kakeya error (a ValueError)."
);
create_exception!(
    _kakeya,
    ConfigError,
    KakeyaError,
    "A codec parameter is invalid."
);
create_exception!(
    _kakeya,
    ShapeError,
    KakeyaError,
    "The input is not a contiguous [tokens, kv_heads, head_dim] array."
);
create_exception!(
    _kakeya,
    DTypeError,
    KakeyaError,
    "The input's dtype is not f32, f16 or bf16."
);
create_exception!(
    _kakeya,
    NonFiniteError,
    KakeyaError,
    "The input holds NaN or Inf."
);
create_exception!(
    _kakeya,
    PreconditionerError,
    KakeyaError,
    "The pre-conditioner is missing, superfluous or malformed."
);
create_exception!(
    _kakeya,
    CorruptDataError,
    KakeyaError,
    "Bytes are truncated, damaged or not a kakeya encoding."
);
create_exception!(
    _kakeya,
    UnsupportedVersionError,
    CorruptDataError,
    "Bytes of a format version this library cannot read."
);
create_exception!(
    _kakeya,
    NumericalError,
    KakeyaError,
    "A numerical routine failed."
);

fn to_py_err(err: CodecError) -> PyErr {
    let msg = err.to_string();
    match err {
        CodecError::InvalidConfig { .. } => ConfigError::new_err(msg),
        CodecError::Shape(_) => ShapeError::new_err(msg),
        CodecError::DType(_) => DTypeError::new_err(msg),
        CodecError::NonFinite { .. } => NonFiniteError::new_err(msg),
        CodecError::Preconditioner(_) => PreconditionerError::new_err(msg),
        CodecError::UnsupportedVersion { .. } => UnsupportedVersionError::new_err(msg),
        CodecError::BadMagic(_)
        | CodecError::Truncated { .. }
        | CodecError::ChecksumMismatch { .. }
        | CodecError::Corrupt(_) => CorruptDataError::new_err(msg),
        CodecError::Numerical(_) => NumericalError::new_err(msg),
    }
}

const FIELDS: [&str; 23] = [
    "bits",
    "block_size",
    "pca",
    "variance_ratio",
    "rank",
    "rank_cap",
    "share_basis",
    "outlier_threshold",
    "metric",
    "centroids",
    "skeleton_dtype",
    "seed",
    "oversampling",
    "power_iters",
    "identity",
    "allocation",
    "basis",
    "uniform_step",
    "entropy_coding",
    "scale_granularity",
    "scale_format",
    "rotation",
    "transform",
];

fn py_bool(v: bool) -> &'static str {
    if v {
        "True"
    } else {
        "False"
    }
}

fn parse_choice<T>(field: &'static str, value: &str, choices: &[(&str, T)]) -> PyResult<T>
where
    T: Copy,
{
    choices
        .iter()
        .find(|(name, _)| *name == value)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
            ConfigError::new_err(format!(
                "invalid config field `{field}`: expected one of {names:?}, got {value:?}"
            ))
        })
}

/// Codec parameters, validated at construction (docs/codec.md, "Configuration").
#[pyclass(frozen, module = "kakeya_py._kakeya", name = "CodecConfig")]
#[derive(Clone)]
struct PyCodecConfig {
    inner: CodecConfig,
}

#[pymethods]
impl PyCodecConfig {
    #[new]
    #[pyo3(signature = (*, bits=3, block_size=1024, pca="exact", variance_ratio=1.0, rank=None, rank_cap=None,
        share_basis=false, outlier_threshold=None, metric="mse", centroids=None, skeleton_dtype="f16", seed=0,
        oversampling=8, power_iters=2, identity=false, allocation="uniform", basis="pca", uniform_step=None,
        entropy_coding=false, scale_granularity="vector", scale_format="float", rotation="hadamard",
        transform=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        bits: i64,
        block_size: i64,
        pca: &str,
        variance_ratio: f64,
        rank: Option<i64>,
        rank_cap: Option<i64>,
        share_basis: bool,
        outlier_threshold: Option<f32>,
        metric: &str,
        centroids: Option<Vec<f32>>,
        skeleton_dtype: &str,
        seed: u64,
        oversampling: i64,
        power_iters: i64,
        identity: bool,
        allocation: &str,
        basis: &str,
        uniform_step: Option<f32>,
        entropy_coding: bool,
        scale_granularity: &str,
        scale_format: &str,
        rotation: &str,
        transform: Option<String>,
    ) -> PyResult<Self> {
        let count = |field: &'static str, v: i64| -> PyResult<usize> {
            usize::try_from(v).map_err(|_| {
                ConfigError::new_err(format!(
                    "invalid config field `{field}`: must be ≥ 0, got {v}"
                ))
            })
        };
        let inner = CodecConfig {
            bits: u8::try_from(bits).map_err(|_| {
                ConfigError::new_err(format!(
                    "invalid config field `bits`: must be 1..=8, got {bits}"
                ))
            })?,
            block_size: count("block_size", block_size)?,
            pca: parse_choice(
                "pca",
                pca,
                &[
                    ("exact", PcaMethod::Exact),
                    ("randomized", PcaMethod::Randomized),
                ],
            )?,
            variance_ratio,
            rank: rank.map(|r| count("rank", r)).transpose()?,
            rank_cap: rank_cap.map(|r| count("rank_cap", r)).transpose()?,
            share_basis,
            outlier_threshold,
            metric: parse_choice(
                "metric",
                metric,
                &[
                    ("mse", Metric::Mse),
                    ("inner_product", Metric::InnerProduct),
                ],
            )?,
            centroids,
            skeleton_dtype: parse_choice(
                "skeleton_dtype",
                skeleton_dtype,
                &[("f16", SkeletonDtype::F16), ("f32", SkeletonDtype::F32)],
            )?,
            seed,
            oversampling: count("oversampling", oversampling)?,
            power_iters: count("power_iters", power_iters)?,
            identity,
            allocation: parse_choice(
                "allocation",
                allocation,
                &[
                    ("uniform", Allocation::Uniform),
                    ("variance", Allocation::Variance),
                ],
            )?,
            basis: parse_choice(
                "basis",
                basis,
                &[("pca", Basis::Pca), ("none", Basis::None)],
            )?,
            uniform_step,
            entropy_coding,
            scale_granularity: parse_choice(
                "scale_granularity",
                scale_granularity,
                &[
                    ("vector", ScaleGranularity::Vector),
                    ("block", ScaleGranularity::Block),
                ],
            )?,
            scale_format: parse_choice(
                "scale_format",
                scale_format,
                &[("float", ScaleFormat::Float), ("log8", ScaleFormat::Log8)],
            )?,
            rotation: parse_choice(
                "rotation",
                rotation,
                &[("hadamard", Rotation::Hadamard), ("none", Rotation::None)],
            )?,
            transform,
        };
        inner.validate().map_err(to_py_err)?;
        Ok(Self { inner })
    }

    /// The config as JSON text (the form stored in every encoding's header).
    fn to_json(&self) -> String {
        self.inner.to_json()
    }

    /// Builds a validated config from JSON text; missing fields take their defaults.
    #[staticmethod]
    fn from_json(text: &str) -> PyResult<Self> {
        Ok(Self {
            inner: CodecConfig::from_json(text).map_err(to_py_err)?,
        })
    }

    /// The config as a JSON-friendly dict (every field, the ones the JSON form omits included).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let loads = py.import("json")?.getattr("loads")?;
        let dict = loads
            .call1((self.inner.to_json(),))?
            .cast_into::<PyDict>()?;
        // The JSON form omits the defaults of the fields newer than version 1.
        dict.set_item("allocation", self.allocation())?;
        dict.set_item("basis", self.basis())?;
        if self.inner.uniform_step.is_none() {
            dict.set_item("uniform_step", py.None())?;
        }
        dict.set_item("entropy_coding", self.inner.entropy_coding)?;
        dict.set_item("scale_granularity", self.scale_granularity())?;
        dict.set_item("scale_format", self.scale_format())?;
        dict.set_item("rotation", self.rotation())?;
        if self.inner.transform.is_none() {
            dict.set_item("transform", py.None())?;
        }
        Ok(dict)
    }

    /// Builds a validated config from a dict as written by `to_dict` (missing keys: defaults).
    #[staticmethod]
    fn from_dict(py: Python<'_>, data: &Bound<'_, PyDict>) -> PyResult<Self> {
        for key in data.keys() {
            let key: String = key.extract()?;
            if !FIELDS.contains(&key.as_str()) {
                return Err(ConfigError::new_err(format!(
                    "unknown config field {key:?}; expected one of {FIELDS:?}"
                )));
            }
        }
        let made = py.get_type::<Self>().call((), Some(data))?;
        Ok(made.cast::<Self>()?.get().clone())
    }

    fn __repr__(&self) -> String {
        let c = &self.inner;
        let opt = |v: Option<String>| v.unwrap_or_else(|| "None".into());
        format!(
            "CodecConfig(bits={}, block_size={}, pca='{}', variance_ratio={:?}, rank={}, rank_cap={}, share_basis={}, \
             outlier_threshold={}, metric='{}', centroids={}, skeleton_dtype='{}', seed={}, oversampling={}, \
             power_iters={}, identity={}, allocation='{}', basis='{}', uniform_step={}, entropy_coding={}, \
             scale_granularity='{}', scale_format='{}', rotation='{}', transform={})",
            c.bits,
            c.block_size,
            self.pca(),
            c.variance_ratio,
            opt(c.rank.map(|v| v.to_string())),
            opt(c.rank_cap.map(|v| v.to_string())),
            py_bool(c.share_basis),
            opt(c.outlier_threshold.map(|v| format!("{v:?}"))),
            self.metric(),
            opt(c.centroids.as_ref().map(|v| format!("{v:?}"))),
            self.skeleton_dtype(),
            c.seed,
            c.oversampling,
            c.power_iters,
            py_bool(c.identity),
            self.allocation(),
            self.basis(),
            opt(c.uniform_step.map(|v| format!("{v:?}"))),
            py_bool(c.entropy_coding),
            self.scale_granularity(),
            self.scale_format(),
            self.rotation(),
            opt(c.transform.as_ref().map(|v| format!("'{v}'"))),
        )
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyAny>, (String,))> {
        let from_json = slf.get_type().getattr("from_json")?;
        Ok((from_json, (slf.get().inner.to_json(),)))
    }

    #[getter]
    fn bits(&self) -> u8 {
        self.inner.bits
    }
    #[getter]
    fn block_size(&self) -> usize {
        self.inner.block_size
    }
    #[getter]
    fn pca(&self) -> &'static str {
        match self.inner.pca {
            PcaMethod::Exact => "exact",
            PcaMethod::Randomized => "randomized",
        }
    }
    #[getter]
    fn variance_ratio(&self) -> f64 {
        self.inner.variance_ratio
    }
    #[getter]
    fn rank(&self) -> Option<usize> {
        self.inner.rank
    }
    #[getter]
    fn rank_cap(&self) -> Option<usize> {
        self.inner.rank_cap
    }
    #[getter]
    fn share_basis(&self) -> bool {
        self.inner.share_basis
    }
    #[getter]
    fn outlier_threshold(&self) -> Option<f32> {
        self.inner.outlier_threshold
    }
    #[getter]
    fn metric(&self) -> &'static str {
        match self.inner.metric {
            Metric::Mse => "mse",
            Metric::InnerProduct => "inner_product",
        }
    }
    #[getter]
    fn centroids(&self) -> Option<Vec<f32>> {
        self.inner.centroids.clone()
    }
    #[getter]
    fn skeleton_dtype(&self) -> &'static str {
        match self.inner.skeleton_dtype {
            SkeletonDtype::F16 => "f16",
            SkeletonDtype::F32 => "f32",
        }
    }
    #[getter]
    fn seed(&self) -> u64 {
        self.inner.seed
    }
    #[getter]
    fn oversampling(&self) -> usize {
        self.inner.oversampling
    }
    #[getter]
    fn power_iters(&self) -> usize {
        self.inner.power_iters
    }
    #[getter]
    fn identity(&self) -> bool {
        self.inner.identity
    }
    #[getter]
    fn allocation(&self) -> &'static str {
        match self.inner.allocation {
            Allocation::Uniform => "uniform",
            Allocation::Variance => "variance",
        }
    }
    #[getter]
    fn uniform_step(&self) -> Option<f32> {
        self.inner.uniform_step
    }
    #[getter]
    fn entropy_coding(&self) -> bool {
        self.inner.entropy_coding
    }
    #[getter]
    fn scale_granularity(&self) -> &'static str {
        match self.inner.scale_granularity {
            ScaleGranularity::Vector => "vector",
            ScaleGranularity::Block => "block",
        }
    }
    #[getter]
    fn rotation(&self) -> &'static str {
        match self.inner.rotation {
            Rotation::Hadamard => "hadamard",
            Rotation::None => "none",
        }
    }
    #[getter]
    fn transform(&self) -> Option<String> {
        self.inner.transform.clone()
    }
    #[getter]
    fn scale_format(&self) -> &'static str {
        match self.inner.scale_format {
            ScaleFormat::Float => "float",
            ScaleFormat::Log8 => "log8",
        }
    }
    #[getter]
    fn basis(&self) -> &'static str {
        match self.inner.basis {
            Basis::Pca => "pca",
            Basis::None => "none",
        }
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<Self>()
            .map(|o| o.get().inner == self.inner)
            .unwrap_or(false)
    }

    fn __hash__(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.inner.to_json().hash(&mut h);
        h.finish()
    }
}

fn dtype_of(name: &str) -> PyResult<DType> {
    DType::parse(name).map_err(to_py_err)
}

/// Encodes a C-contiguous `[tokens, kv_heads, head_dim]` array: float32 values, or the raw
/// uint16 bits of f16/bf16 with `dtype` naming which. The GIL is released meanwhile.
#[pyfunction]
#[pyo3(signature = (x, dtype, config, preconditioner=None, threads=None))]
fn encode_array(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    dtype: &str,
    config: &PyCodecConfig,
    preconditioner: Option<PyReadonlyArrayDyn<'_, f32>>,
    threads: Option<usize>,
) -> PyResult<PyEncoded> {
    let dtype = dtype_of(dtype)?;
    let l = match &preconditioner {
        Some(l) => Some(
            l.as_slice()
                .map_err(|_| ShapeError::new_err("pre-conditioner must be C-contiguous"))?,
        ),
        None => None,
    };
    if threads == Some(0) {
        return Err(ConfigError::new_err(
            "threads must be ≥ 1 (or None for every core)",
        ));
    }
    let run = |elements: Elements<'_>, shape: &[usize]| -> PyResult<Encoded> {
        let shape: [usize; 3] = shape.try_into().map_err(|_| {
            ShapeError::new_err(format!(
                "expected a 3-d array [tokens, kv_heads, head_dim], got shape {shape:?}"
            ))
        })?;
        let view = TensorView::new(elements, shape).map_err(to_py_err)?;
        py.detach(|| encode(view, &config.inner, l, threads))
            .map_err(to_py_err)
    };
    let not_contiguous = |_| {
        ShapeError::new_err(
            "input must be C-contiguous (call .contiguous() / np.ascontiguousarray)",
        )
    };
    let encoded = match dtype {
        DType::F32 => {
            let arr: PyReadonlyArrayDyn<'_, f32> = x
                .extract()
                .map_err(|_| DTypeError::new_err("dtype 'f32' needs a float32 numpy array"))?;
            run(
                Elements::F32(arr.as_slice().map_err(not_contiguous)?),
                arr.shape(),
            )?
        }
        DType::F16 | DType::Bf16 => {
            let arr: PyReadonlyArrayDyn<'_, u16> = x.extract().map_err(|_| {
                DTypeError::new_err(format!(
                    "dtype '{}' needs the raw bits as a uint16 numpy array",
                    dtype.name()
                ))
            })?;
            let bits = arr.as_slice().map_err(not_contiguous)?;
            let elements = if dtype == DType::F16 {
                Elements::F16(bits)
            } else {
                Elements::Bf16(bits)
            };
            run(elements, arr.shape())?
        }
    };
    Ok(PyEncoded { inner: encoded })
}

/// A serialized encoding; its length is the measured size.
#[pyclass(frozen, module = "kakeya_py._kakeya", name = "Encoded")]
struct PyEncoded {
    inner: Encoded,
}

#[pymethods]
impl PyEncoded {
    /// Parses and validates serialized bytes (magic, version, CRC-32, every record).
    #[staticmethod]
    fn from_bytes(py: Python<'_>, data: &[u8]) -> PyResult<Self> {
        let owned = data.to_vec();
        let inner = py
            .detach(|| Encoded::from_bytes(owned))
            .map_err(to_py_err)?;
        Ok(Self { inner })
    }

    /// The serialized bytes.
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.as_bytes())
    }

    /// Decodes to `dtype` ("f32", "f16" or "bf16"; default the input's). Returns
    /// `(array, dtype_name)`: float32 values, or the uint16 bits of f16/bf16.
    #[pyo3(signature = (dtype=None, threads=None))]
    fn decode<'py>(
        &self,
        py: Python<'py>,
        dtype: Option<&str>,
        threads: Option<usize>,
    ) -> PyResult<(Bound<'py, PyAny>, &'static str)> {
        let dtype = dtype.map(dtype_of).transpose()?;
        if threads == Some(0) {
            return Err(ConfigError::new_err(
                "threads must be ≥ 1 (or None for every core)",
            ));
        }
        let out = py
            .detach(|| self.inner.decode_as(dtype, threads))
            .map_err(to_py_err)?;
        let shape = self.inner.header().shape.to_vec();
        let (array, name) = match out {
            OwnedElements::F32(v) => (v.into_pyarray(py).reshape(shape)?.into_any(), "f32"),
            OwnedElements::F16(v) => (v.into_pyarray(py).reshape(shape)?.into_any(), "f16"),
            OwnedElements::Bf16(v) => (v.into_pyarray(py).reshape(shape)?.into_any(), "bf16"),
        };
        Ok((array, name))
    }

    /// Length of the serialized bytes.
    #[getter]
    fn nbytes(&self) -> usize {
        self.inner.nbytes()
    }

    /// Input size at bf16 over `nbytes`.
    #[getter]
    fn ratio(&self) -> f64 {
        self.inner.ratio()
    }

    /// `(tokens, kv_heads, head_dim)`.
    #[getter]
    fn shape(&self) -> (usize, usize, usize) {
        let [t, h, d] = self.inner.header().shape;
        (t, h, d)
    }

    /// The input's dtype name.
    #[getter]
    fn dtype(&self) -> &'static str {
        self.inner.header().dtype.name()
    }

    /// The codec config stored in the header.
    #[getter]
    fn config(&self) -> PyCodecConfig {
        PyCodecConfig {
            inner: self.inner.header().config.clone(),
        }
    }

    /// `"f16"`, `"f32"` or `"log8"`: storage of the per-vector scales.
    #[getter]
    fn scale_dtype(&self) -> &'static str {
        match self.inner.header().scale_dtype {
            kakeya::ScaleDtype::F16 => "f16",
            kakeya::ScaleDtype::F32 => "f32",
            kakeya::ScaleDtype::Log8 => "log8",
        }
    }

    /// Rank of the skeleton of every block, head-major.
    #[getter]
    fn block_ranks(&self) -> Vec<usize> {
        self.inner.block_ranks()
    }

    /// The header as a dict.
    fn header<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let json = self.inner.header_json();
        let loads = py.import("json")?.getattr("loads")?;
        Ok(loads.call1((json,))?.cast_into::<PyDict>()?)
    }

    fn __len__(&self) -> usize {
        self.inner.nbytes()
    }
}

/// The Gaussian Lloyd–Max centroids for `bits` (1..=8; 5..=8 are used by
/// `allocation="variance"`).
#[pyfunction]
fn gaussian_centroids(bits: u8) -> PyResult<Vec<f32>> {
    if !(1..=kakeya::lloyd_max::MAX_TABLE_BITS).contains(&bits) {
        return Err(ConfigError::new_err(format!(
            "bits must be 1..=8, got {bits}"
        )));
    }
    Ok(kakeya::lloyd_max::gaussian_table(bits).to_vec())
}

/// Switches this process to serial execution (registered as an after-fork hook).
#[pyfunction]
fn disable_parallelism_after_fork() {
    kakeya::disable_after_fork();
}

/// The instruction set the codec's hot loops use now: ``"avx2"`` or ``"baseline"``.
#[pyfunction]
fn simd_level() -> &'static str {
    kakeya::simd::level()
}

/// Lets the hot loops use AVX2 where the CPU has it (``True``, the default) or keeps them on
/// the baseline instruction set (``False``), process-wide. The bytes are the same either way;
/// benchmarks use it to measure the difference.
#[pyfunction]
fn set_simd(enabled: bool) {
    kakeya::simd::set_enabled(enabled);
}

#[pymodule]
fn _kakeya(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("FORMAT_VERSION", kakeya::FORMAT_VERSION)?;
    m.add_class::<PyCodecConfig>()?;
    m.add_class::<PyEncoded>()?;
    m.add_function(wrap_pyfunction!(encode_array, m)?)?;
    m.add_function(wrap_pyfunction!(gaussian_centroids, m)?)?;
    m.add_function(wrap_pyfunction!(disable_parallelism_after_fork, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(set_simd, m)?)?;
    m.add_class::<attention::PyAttnChunk>()?;
    m.add_class::<attention::PyRopeTable>()?;
    m.add_function(wrap_pyfunction!(attention::attend_compressed, m)?)?;
    m.add("KakeyaError", py.get_type::<KakeyaError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("ShapeError", py.get_type::<ShapeError>())?;
    m.add("DTypeError", py.get_type::<DTypeError>())?;
    m.add("NonFiniteError", py.get_type::<NonFiniteError>())?;
    m.add("PreconditionerError", py.get_type::<PreconditionerError>())?;
    m.add("CorruptDataError", py.get_type::<CorruptDataError>())?;
    m.add(
        "UnsupportedVersionError",
        py.get_type::<UnsupportedVersionError>(),
    )?;
    m.add("NumericalError", py.get_type::<NumericalError>())?;
    Ok(())
}
