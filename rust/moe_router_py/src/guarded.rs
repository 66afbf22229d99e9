//! State that Python threads share: the statistics and the load balancer.
//!
//! One `threading.RLock` per object orders every update and read, and is the
//! object's `_lock`: a caller holding it (`with stats._lock: ...`) reads
//! several figures from one state. Waiting for it releases the GIL, as any
//! Python lock does. The `Mutex` inside gives the frozen class its interior
//! mutability; under the RLock it is never contended.

use std::sync::{Mutex, PoisonError};

use pyo3::intern;
use pyo3::prelude::*;

/// `T` behind a Python `RLock`.
pub struct Guarded<T> {
    lock: Py<PyAny>,
    state: Mutex<T>,
}

impl<T> Guarded<T> {
    /// `state` with a fresh `threading.RLock`.
    pub fn new(py: Python<'_>, state: T) -> PyResult<Self> {
        let lock = py.import(intern!(py, "threading"))?.call_method0(intern!(py, "RLock"))?.unbind();
        Ok(Guarded { lock, state: Mutex::new(state) })
    }

    /// `f` on the state, with the lock held (`f` is plain Rust: it cannot re-enter Python).
    pub fn with<R>(&self, py: Python<'_>, f: impl FnOnce(&mut T) -> R) -> PyResult<R> {
        let lock = self.lock.bind(py);
        lock.call_method0(intern!(py, "acquire"))?;
        let out = f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner));
        lock.call_method0(intern!(py, "release"))?;
        Ok(out)
    }

    /// The `RLock` itself.
    pub fn lock(&self, py: Python<'_>) -> Py<PyAny> {
        self.lock.clone_ref(py)
    }
}
