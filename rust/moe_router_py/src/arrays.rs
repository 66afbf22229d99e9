//! Moving core results into NumPy arrays without copying.

use ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

/// A row-major `[rows, cols]` vector as a 2-D NumPy array (ownership moves).
pub fn matrix<'py, T: numpy::Element>(
    py: Python<'py>,
    data: Vec<T>,
    rows: usize,
    cols: usize,
) -> PyResult<Bound<'py, PyArray2<T>>> {
    let array = Array2::from_shape_vec((rows, cols), data)
        .map_err(|e| PyRuntimeError::new_err(format!("internal shape error: {e}")))?;
    Ok(array.into_pyarray(py))
}

/// A vector as a 1-D NumPy array (ownership moves).
pub fn vector<'py, T: numpy::Element>(py: Python<'py>, data: Vec<T>) -> Bound<'py, PyArray1<T>> {
    data.into_pyarray(py)
}
