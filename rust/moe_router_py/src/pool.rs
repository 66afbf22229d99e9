//! Recycled memory for large outputs that a kernel writes in every element.
//!
//! A fresh multi-megabyte array is untouched pages: the kernel's first write
//! to each page faults and the OS clears it (a 64 MB float32 gradient costs
//! about 7 ms of page clearing with huge pages, three times that without).
//! A training loop drops one step's gradient before it asks for the next, so
//! the memory of a dropped output goes back to a small free list, and the
//! next output of the same size reuses it. Only outputs whose every element
//! is written before they are returned come from here: the old contents are
//! never seen. At most [`MAX_FREE`] buffers, of at most a quarter of the
//! machine's memory in all ([`max_free_bytes`]), stay held once their arrays
//! are gone, and the kernel may take their pages back whenever memory runs
//! short (`huge_pages::release_lazily`): holding them costs memory only while
//! nothing else needs it. (An output of that size was alive just before; a
//! MoE layer's step at D = 4096 drops permute and combine outputs of 1-2 GB.)

use std::sync::Mutex;

use numpy::ndarray::{ArrayViewD, IxDyn};
use numpy::{Element, PyArrayDyn};
use pyo3::exceptions::PyMemoryError;
use pyo3::prelude::*;

/// Outputs smaller than this are ordinary NumPy arrays (their page faults are few).
const MIN_BYTES: usize = 4 << 20;
/// Freed buffers kept for reuse (a MoE layer's step drops a permute, a combine
/// and a gradient output, of three sizes).
const MAX_FREE: usize = 4;
/// Bytes of freed buffers kept for reuse where the OS does not give its memory size.
const FALLBACK_MAX_FREE_BYTES: usize = 512 << 20;

/// Bytes of freed buffers kept for reuse: a quarter of the physical memory.
fn max_free_bytes() -> usize {
    static BYTES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BYTES.get_or_init(|| moe_router_core::huge_pages::physical_memory().map_or(FALLBACK_MAX_FREE_BYTES, |b| b / 4))
}

static FREE: Mutex<Vec<Vec<u64>>> = Mutex::new(Vec::new());

/// The owner of a pooled output's memory (the NumPy array's base object):
/// dropping it gives the memory back to the free list.
#[pyclass(module = "moe_router._core", name = "_PooledBuffer")]
struct PooledBuffer {
    words: Vec<u64>,
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        let mut words = std::mem::take(&mut self.words);
        if words.len() * 8 > max_free_bytes() {
            return;
        }
        moe_router_core::huge_pages::release_lazily(&mut words);
        let Ok(mut free) = FREE.lock() else { return };
        free.push(words);
        // the oldest go first when the list is over either bound
        while free.len() > MAX_FREE || free.iter().map(|w| w.len() * 8).sum::<usize>() > max_free_bytes() {
            free.remove(0);
        }
    }
}

/// Give the freed output buffers the package holds back to the OS at once.
///
/// Outputs of 4 MiB or more made without ``out=`` (``DispatchPlan.permute``,
/// ``combine``, ``unpermute``, ``gather_rows``, ``RoutingDecision.backward``)
/// reuse the memory of dropped ones: up to 4 freed buffers, a quarter of the
/// physical memory in all, stay held, and the OS may already take their pages
/// back when memory runs short (``MADV_FREE``). This drops them now, as
/// ``torch.cuda.empty_cache()`` does for PyTorch's caching allocator; the next
/// such output is fresh memory again. Arrays still alive are not affected.
///
/// Returns
/// -------
/// int
///     Bytes released (0 when none were held).
///
/// Raises
/// ------
/// TypeError
///     Given any argument (it takes none).
#[pyfunction]
pub(crate) fn release_memory() -> usize {
    let Ok(mut free) = FREE.lock() else { return 0 };
    let bytes = free.iter().map(|w| w.len() * 8).sum();
    free.clear();
    bytes
}

/// A C-contiguous array of `shape` whose every element the caller writes
/// before anyone reads it: recycled memory when a freed buffer of the same size
/// is held, else fresh zero pages (huge pages advised); small outputs are
/// `numpy.zeros`. `MemoryError` when the memory cannot be had.
pub(crate) fn written_output<'py, P: Element>(py: Python<'py>, shape: &[usize]) -> PyResult<Bound<'py, PyArrayDyn<P>>> {
    let elements = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    let bytes = elements.and_then(|n| n.checked_mul(std::mem::size_of::<P>()));
    let Some(bytes) = bytes.filter(|&b| b >= MIN_BYTES && std::mem::align_of::<P>() <= 8) else {
        return crate::plan::zeros::<P>(py, shape);
    };
    let words = bytes.div_ceil(8);
    let reused = FREE.lock().ok().and_then(|mut free| {
        // the latest freed first: its pages are the likeliest to be in cache
        let at = free.iter().rposition(|w| w.len() == words)?;
        Some(free.remove(at))
    });
    let buffer = match reused {
        Some(buffer) => buffer,
        None => moe_router_core::huge_pages::try_zeroed_u64(words)
            .ok_or_else(|| PyMemoryError::new_err(format!("cannot allocate an output of {bytes} bytes")))?,
    };
    let data = buffer.as_ptr().cast::<P>();
    let owner = Bound::new(py, PooledBuffer { words: buffer })?;
    // SAFETY: `data` points at `bytes` >= shape's product * size_of::<P>() bytes,
    // aligned for P (align <= 8, the u64 buffer's), owned by `owner`, which the
    // array holds as its base and which never moves or resizes the buffer; every
    // bit pattern is a valid P for the float element types this serves.
    let array = unsafe {
        let view = ArrayViewD::from_shape_ptr(IxDyn(shape), data);
        PyArrayDyn::<P>::borrow_from_array(&view, owner.into_any())
    };
    Ok(array)
}
