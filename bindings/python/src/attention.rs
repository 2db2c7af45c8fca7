//! Attention on the compressed cache: `AttnChunk`, `RopeTable` and `attend_compressed`
//! (the core is `kakeya::attention`). The kernel runs with the GIL released.

use std::sync::RwLock;

use kakeya::attention::{attend, AttnChunk, Request, RopeTable};
use numpy::{IntoPyArray, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::{to_py_err, ConfigError, PyEncoded, ShapeError};

fn contiguous<'a>(a: &'a PyReadonlyArrayDyn<'_, f32>, what: &str) -> PyResult<&'a [f32]> {
    a.as_slice()
        .map_err(|_| ShapeError::new_err(format!("{what} must be a C-contiguous float32 array")))
}

fn check_threads(threads: Option<usize>) -> PyResult<()> {
    if threads == Some(0) {
        return Err(ConfigError::new_err(
            "threads must be ≥ 1 (or None for every core)",
        ));
    }
    Ok(())
}

/// An encoding parsed once into the form the attention kernel reads (codes, scales,
/// outliers, means; no header). `rope_mean` (`[kv_heads, head_dim]` float32) marks a K chunk
/// of the RoPE-mean layout: its keys are `RoPE_p(rope_mean) + decode()`; it is held at 2
/// bytes per value where every value is a float16 (round it so before subtracting it).
#[pyclass(frozen, module = "kakeya_py._kakeya", name = "AttnChunk")]
pub(crate) struct PyAttnChunk {
    inner: AttnChunk,
}

#[pymethods]
impl PyAttnChunk {
    #[new]
    #[pyo3(signature = (encoded, position=0, rope_mean=None))]
    fn new(
        py: Python<'_>,
        encoded: &PyEncoded,
        position: usize,
        rope_mean: Option<PyReadonlyArrayDyn<'_, f32>>,
    ) -> PyResult<Self> {
        let mean = match &rope_mean {
            Some(a) => Some(contiguous(a, "rope_mean")?.to_vec()),
            None => None,
        };
        let inner = py
            .detach(|| AttnChunk::from_encoded(&encoded.inner, position, mean))
            .map_err(to_py_err)?;
        Ok(Self { inner })
    }

    /// `(tokens, kv_heads, head_dim)`.
    #[getter]
    fn shape(&self) -> (usize, usize, usize) {
        let [t, h, d] = self.inner.shape();
        (t, h, d)
    }

    /// Absolute position of the first token.
    #[getter]
    fn position(&self) -> usize {
        self.inner.position()
    }

    /// Bytes held: codes, scales, outliers, means (as the encoding stores them), the pre-RoPE
    /// mean (2 bytes per value where it holds halves) and the centroid table.
    #[getter]
    fn nbytes(&self) -> usize {
        self.inner.nbytes()
    }

    /// The pre-RoPE mean `[kv_heads, head_dim]`, or None.
    #[getter]
    fn rope_mean<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let [_, h, d] = self.inner.shape();
        self.inner
            .rope_mean()
            .map(|m| Ok(m.into_pyarray(py).reshape([h, d])?.into_any()))
            .transpose()
    }

    /// Decoded float32 `[tokens, kv_heads, head_dim]` (the codec's decode of the same bytes;
    /// without the pre-RoPE mean).
    fn decode<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let shape = self.inner.shape();
        let out = py.detach(|| self.inner.decode());
        Ok(out.into_pyarray(py).reshape(shape)?.into_any())
    }

    fn __repr__(&self) -> String {
        let [t, h, d] = self.inner.shape();
        format!(
            "AttnChunk(tokens={t}, kv_heads={h}, head_dim={d}, position={}, nbytes={}, rope_mean={})",
            self.inner.position(),
            self.inner.nbytes(),
            self.inner.rope_mean().is_some()
        )
    }
}

/// `cos`/`sin` of every cached position at half width (`head_dim / 2` frequencies), one row
/// for the whole batch or one per batch row; shared by every layer.
#[pyclass(frozen, module = "kakeya_py._kakeya", name = "RopeTable")]
pub(crate) struct PyRopeTable {
    inner: RwLock<RopeTable>,
}

impl PyRopeTable {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, RopeTable> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, RopeTable> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[pymethods]
impl PyRopeTable {
    #[new]
    fn new(half: usize) -> PyResult<Self> {
        Ok(Self {
            inner: RwLock::new(RopeTable::new(half).map_err(to_py_err)?),
        })
    }

    /// Appends positions `start .. start + n` from float32 `cos`, `sin` of shape
    /// `[batch, n, half]` (batch 1: shared by every row); already-held positions are skipped.
    fn append(
        &self,
        start: usize,
        cos: PyReadonlyArrayDyn<'_, f32>,
        sin: PyReadonlyArrayDyn<'_, f32>,
    ) -> PyResult<()> {
        let shape = cos.shape().to_vec();
        if shape.len() != 3 || sin.shape() != shape.as_slice() {
            return Err(ShapeError::new_err(format!(
                "cos and sin must both be [batch, n, half], got {:?} and {:?}",
                shape,
                sin.shape()
            )));
        }
        if shape[2] != self.read().half() {
            return Err(ShapeError::new_err(format!(
                "cos/sin have {} frequencies, the table {}",
                shape[2],
                self.read().half()
            )));
        }
        let (c, s) = (contiguous(&cos, "cos")?, contiguous(&sin, "sin")?);
        self.write()
            .append(start, shape[0], c, s)
            .map_err(to_py_err)
    }

    /// Keeps the first `length` positions.
    fn truncate(&self, length: usize) {
        self.write().truncate(length);
    }

    /// Keeps batch rows `indices` (a shared table stays shared).
    fn select(&self, indices: Vec<usize>) -> PyResult<()> {
        self.write().select(&indices).map_err(to_py_err)
    }

    /// `(cos, sin)` of positions `start .. end` of batch row `row`, float32 `[n, half]`.
    fn slice<'py>(
        &self,
        py: Python<'py>,
        start: usize,
        end: usize,
        row: usize,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let t = self.read();
        if start > end || end > t.len() || (t.rows() > 1 && row >= t.rows()) {
            return Err(ShapeError::new_err(format!(
                "slice {start}..{end} of row {row}: the table holds {} positions in {} rows",
                t.len(),
                t.rows()
            )));
        }
        let h = t.half();
        let (c, s) = t.row(row);
        let c = c[start * h..end * h].to_vec().into_pyarray(py);
        let s = s[start * h..end * h].to_vec().into_pyarray(py);
        Ok((
            c.reshape([end - start, h])?.into_any(),
            s.reshape([end - start, h])?.into_any(),
        ))
    }

    #[getter]
    fn half(&self) -> usize {
        self.read().half()
    }

    #[getter]
    fn rows(&self) -> usize {
        self.read().rows()
    }

    #[getter]
    fn nbytes(&self) -> usize {
        self.read().nbytes()
    }

    fn __len__(&self) -> usize {
        self.read().len()
    }

    fn __repr__(&self) -> String {
        let t = self.read();
        format!(
            "RopeTable(half={}, positions={}, rows={})",
            t.half(),
            t.len(),
            t.rows()
        )
    }
}

/// Attention over compressed chunks for one step: `queries` float32
/// `[batch, kv_heads, rows, head_dim]` (the query rows of each kv head), `keys`/`values`
/// one list of `AttnChunk` per batch row, `skip` leading compressed tokens masked per row.
/// Returns `(out [b, kv_heads, rows, d], max [b, kv_heads, rows], sum [b, kv_heads, rows])`,
/// the partial softmax over the compressed tokens only (merge with the exact part by
/// log-sum-exp). The GIL is released.
#[pyfunction]
#[pyo3(signature = (queries, keys, values, skip, scale, rope=None, threads=None))]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub(crate) fn attend_compressed<'py>(
    py: Python<'py>,
    queries: PyReadonlyArrayDyn<'py, f32>,
    keys: Vec<Vec<Py<PyAttnChunk>>>,
    values: Vec<Vec<Py<PyAttnChunk>>>,
    skip: Vec<usize>,
    scale: f32,
    rope: Option<Py<PyRopeTable>>,
    threads: Option<usize>,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    check_threads(threads)?;
    let shape = queries.shape().to_vec();
    let [batch, kv_heads, rows, dim]: [usize; 4] = shape.clone().try_into().map_err(|_| {
        ShapeError::new_err(format!(
            "queries must be [batch, kv_heads, rows, head_dim], got shape {shape:?}"
        ))
    })?;
    let q = contiguous(&queries, "queries")?;
    let k: Vec<Vec<&AttnChunk>> = keys
        .iter()
        .map(|row| row.iter().map(|c| &c.get().inner).collect())
        .collect();
    let v: Vec<Vec<&AttnChunk>> = values
        .iter()
        .map(|row| row.iter().map(|c| &c.get().inner).collect())
        .collect();
    let table = rope.as_ref().map(|t| t.get().read());
    let partial = py
        .detach(|| {
            attend(
                &Request {
                    queries: q,
                    batch,
                    kv_heads,
                    rows,
                    dim,
                    keys: &k,
                    values: &v,
                    skip: &skip,
                    rope: table.as_deref(),
                    scale,
                },
                threads,
            )
        })
        .map_err(to_py_err)?;
    drop(table);
    Ok((
        partial.out.into_pyarray(py).reshape(shape)?.into_any(),
        partial
            .max
            .into_pyarray(py)
            .reshape([batch, kv_heads, rows])?
            .into_any(),
        partial
            .sum
            .into_pyarray(py)
            .reshape([batch, kv_heads, rows])?
            .into_any(),
    ))
}
