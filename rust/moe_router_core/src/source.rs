//! Where router logits come from: the element types the router reads and the
//! sources that hand rows to the pipeline chunk by chunk (a slice in memory, a
//! GEMM of hidden states, a gate's probabilities).

use crate::error::{Result, RouterError};

/// Element types the router reads: float32 and float64.
pub trait Logit: Copy + Send + Sync + 'static {
    /// Widen to float64 (exact for both types).
    fn to_f64(self) -> f64;
    /// Round a float64 to this type (gradients are computed in float64).
    fn from_f64(value: f64) -> Self;
    /// The slice as float32, if that is what it is (for the vectorized read).
    fn as_f32(values: &[Self]) -> Option<&[f32]>;
    /// The slice as float64, if that is what it is.
    fn as_f64(values: &[Self]) -> Option<&[f64]>;
}

impl Logit for f32 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    #[inline(always)]
    fn from_f64(value: f64) -> Self {
        value as f32
    }
    #[inline(always)]
    fn as_f32(values: &[Self]) -> Option<&[f32]> {
        Some(values)
    }
    #[inline(always)]
    fn as_f64(_: &[Self]) -> Option<&[f64]> {
        None
    }
}

impl Logit for f64 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64(value: f64) -> Self {
        value
    }
    #[inline(always)]
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
    #[inline(always)]
    fn as_f64(values: &[Self]) -> Option<&[f64]> {
        Some(values)
    }
}

/// Reusable per-task buffers a source may compute a chunk into.
#[derive(Debug, Clone)]
pub struct ChunkBuf<E> {
    /// Row-major `[chunk, E]` values.
    pub(crate) rows: Vec<E>,
    /// Per-token z-loss terms, for sources that define their own (the hierarchical gate).
    pub(crate) z_squared: Vec<f64>,
    /// Scratch for intermediate products (group logits, gathered rows).
    pub(crate) work: Vec<E>,
    /// Scratch for intermediate results in float64.
    pub(crate) work64: Vec<f64>,
    /// Scratch token lists.
    pub(crate) index: Vec<u32>,
}

impl<E> ChunkBuf<E> {
    /// The buffer a source computes its rows into (row-major `[chunk, E]`);
    /// it keeps its allocation from one chunk to the next.
    pub fn rows_mut(&mut self) -> &mut Vec<E> {
        &mut self.rows
    }
}

impl<E> Default for ChunkBuf<E> {
    fn default() -> Self {
        ChunkBuf { rows: Vec::new(), z_squared: Vec::new(), work: Vec::new(), work64: Vec::new(), index: Vec::new() }
    }
}

/// One chunk of rows, as a source hands it to the router.
#[derive(Debug, Clone, Copy)]
pub struct ChunkRows<'s, E> {
    /// Row-major `[chunk, E]` logits (or probabilities, for `ScoreFunction::Probabilities`).
    pub rows: &'s [E],
    /// Per-token `z`-loss term replacing `logsumexp(row)^2`, when the source defines one.
    pub z_squared: Option<&'s [f64]>,
}

/// Where router logits come from: an array in memory, or a GEMM computed
/// chunk by chunk (the hidden-state path), so no `[T, E]` array need exist.
pub trait LogitSource: Sync {
    /// Element type of the rows.
    type Elem: Logit;
    /// Argument name used in error messages (`logits`, `hidden`).
    fn argument(&self) -> &'static str;
    /// T.
    fn num_tokens(&self) -> usize;
    /// E.
    fn num_experts(&self) -> usize;
    /// Rows `start..end`, row-major `[(end - start), E]`, either borrowed from
    /// the source or computed into `buf`.
    fn chunk<'s>(&'s self, start: usize, end: usize, buf: &'s mut ChunkBuf<Self::Elem>) -> ChunkRows<'s, Self::Elem>;
}

/// Logits held in a row-major slice.
#[derive(Debug, Clone, Copy)]
pub struct SliceLogits<'a, F> {
    data: &'a [F],
    tokens: usize,
    experts: usize,
}

impl<'a, F: Logit> SliceLogits<'a, F> {
    /// Wrap `data` as `[tokens, experts]`; the length must match.
    pub fn new(data: &'a [F], tokens: usize, experts: usize) -> Result<Self> {
        if tokens.checked_mul(experts) != Some(data.len()) {
            return Err(RouterError::shape(
                "logits",
                format!("[{tokens}, {experts}] ({} values)", tokens.saturating_mul(experts)),
                format!("a buffer of {} values", data.len()),
            ));
        }
        Ok(SliceLogits { data, tokens, experts })
    }
}

impl<F: Logit> LogitSource for SliceLogits<'_, F> {
    type Elem = F;
    fn argument(&self) -> &'static str {
        "logits"
    }
    fn num_tokens(&self) -> usize {
        self.tokens
    }
    fn num_experts(&self) -> usize {
        self.experts
    }
    fn chunk<'s>(&'s self, start: usize, end: usize, _buf: &'s mut ChunkBuf<F>) -> ChunkRows<'s, F> {
        ChunkRows { rows: &self.data[start * self.experts..end * self.experts], z_squared: None }
    }
}
