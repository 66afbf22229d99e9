//! The linear router `logits = hidden @ weight + bias`, computed one chunk of
//! tokens at a time inside the routing pass, so the `[T, E]` logits never
//! exist as a whole: each rayon task multiplies its `[chunk, D]` rows by the
//! `[D, E]` weight into a small buffer and routes them while they are in cache.
//!
//! The product uses the `gemm` crate (cache-blocked, packed, with run-time
//! AVX2 / AVX-512 / NEON kernels), single-threaded inside each task.

use crate::array_arg::ArrayArg;
use crate::error::{Result, RouterError};
use crate::source::{ChunkBuf, ChunkRows, Logit, LogitSource};

/// Element types with a matrix product.
pub trait GemmScalar: Logit + Default {
    /// `out[m, n] = a[m, k] @ b[k, n]`, all row-major and contiguous.
    fn matmul(m: usize, k: usize, n: usize, a: &[Self], b: &[Self], out: &mut [Self]);
    /// `a + b`.
    fn add(self, other: Self) -> Self;
}

macro_rules! gemm_scalar {
    ($t:ty) => {
        impl GemmScalar for $t {
            fn matmul(m: usize, k: usize, n: usize, a: &[Self], b: &[Self], out: &mut [Self]) {
                assert!(a.len() >= m * k && b.len() >= k * n && out.len() >= m * n, "matmul buffer too small");
                if m == 0 || n == 0 {
                    return;
                }
                if k == 0 {
                    out[..m * n].fill(0.0);
                    return;
                }
                // SAFETY: the three buffers are valid for the row-major shapes
                // checked above; `out` does not alias the inputs (distinct borrows).
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        out.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        a.as_ptr(),
                        1,
                        k as isize,
                        b.as_ptr(),
                        1,
                        n as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
            #[inline(always)]
            fn add(self, other: Self) -> Self {
                self + other
            }
        }
    };
}
gemm_scalar!(f32);
gemm_scalar!(f64);

/// Router logits `hidden @ weight + bias` for `[T, D]` hidden states.
#[derive(Debug, Clone, Copy)]
pub struct LinearLogits<'a, F> {
    hidden: &'a [F],
    tokens: usize,
    dim: usize,
    weight: &'a [F],
    bias: Option<&'a [F]>,
    experts: usize,
}

impl<'a, F: GemmScalar> LinearLogits<'a, F> {
    /// `hidden` is `[tokens, dim]`, `weight` `[dim, experts]`, `bias` `[experts]`, all row-major.
    pub fn new(
        hidden: &'a [F],
        tokens: usize,
        dim: usize,
        weight: &'a [F],
        experts: usize,
        bias: Option<&'a [F]>,
    ) -> Result<Self> {
        if tokens.checked_mul(dim) != Some(hidden.len()) {
            return Err(RouterError::shape("hidden", format!("[{tokens}, {dim}]"), format!("{} values", hidden.len())));
        }
        if dim.checked_mul(experts) != Some(weight.len()) {
            return Err(RouterError::shape(
                "weight",
                format!("[{dim}, {experts}] (input_dim x num_experts)"),
                format!("{} values", weight.len()),
            ));
        }
        if let Some(b) = bias {
            if b.len() != experts {
                return Err(RouterError::shape("bias", format!("[{experts}]"), format!("[{}]", b.len())));
            }
        }
        Ok(LinearLogits { hidden, tokens, dim, weight, bias, experts })
    }
}

impl<'a, F: GemmScalar> LinearLogits<'a, F> {
    /// From the caller's arrays: `hidden [T, D]`, `weight [D, E]`, `bias [E]`; the
    /// error names the array whose shape does not fit.
    pub fn from_arrays(
        hidden: ArrayArg<'a, F>,
        weight: ArrayArg<'a, F>,
        bias: Option<ArrayArg<'a, F>>,
    ) -> Result<Self> {
        let h = hidden.check_shape(&[None, None], "[T, D]")?;
        let (t, d) = (hidden.shape[0], hidden.shape[1]);
        let w = weight
            .check_shape(&[Some(d), None], &format!("[{d}, E] (input_dim = {d} rows, one per hidden feature)"))?;
        let e = weight.shape[1];
        let b = bias.map(|b| b.check_shape(&[Some(e)], &format!("[{e}] (one value per expert)"))).transpose()?;
        LinearLogits::new(h, t, d, w, e, b)
    }
}

impl<'a, F: GemmScalar> LinearLogits<'a, F> {
    /// `[T, D]` hidden states, `[D, E]` weight, and D.
    pub(crate) fn parts(&self) -> (&'a [F], &'a [F], usize) {
        (self.hidden, self.weight, self.dim)
    }
}

impl<F: GemmScalar> LogitSource for LinearLogits<'_, F> {
    type Elem = F;
    fn argument(&self) -> &'static str {
        "hidden"
    }
    fn num_tokens(&self) -> usize {
        self.tokens
    }
    fn num_experts(&self) -> usize {
        self.experts
    }
    fn chunk<'s>(&'s self, start: usize, end: usize, buf: &'s mut ChunkBuf<F>) -> ChunkRows<'s, F> {
        let m = end - start;
        let e = self.experts;
        buf.rows.clear();
        buf.rows.resize(m * e, F::default());
        let rows = &self.hidden[start * self.dim..end * self.dim];
        F::matmul(m, self.dim, e, rows, self.weight, &mut buf.rows);
        if let Some(b) = self.bias {
            for row in buf.rows.chunks_exact_mut(e) {
                for (x, &bv) in row.iter_mut().zip(b) {
                    *x = x.add(bv);
                }
            }
        }
        ChunkRows { rows: &buf.rows, z_squared: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_matches_loops() {
        let (m, k, n) = (37, 19, 11);
        let a: Vec<f64> = (0..m * k).map(|i| ((i * 7 % 13) as f64 - 6.0) / 3.0).collect();
        let b: Vec<f64> = (0..k * n).map(|i| ((i * 5 % 11) as f64 - 5.0) / 2.0).collect();
        let mut out = vec![0.0; m * n];
        f64::matmul(m, k, n, &a, &b, &mut out);
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
                assert!((out[i * n + j] - want).abs() < 1e-9);
            }
        }
    }

    #[test]
    fn shapes_are_checked() {
        let h = vec![0.0f32; 6];
        let w = vec![0.0f32; 6];
        assert!(LinearLogits::new(&h, 2, 3, &w, 2, None).is_ok());
        assert!(LinearLogits::new(&h, 2, 3, &w, 3, None).unwrap_err().to_string().contains("weight"));
        assert!(LinearLogits::new(&h, 2, 3, &w, 2, Some(&[0.0])).unwrap_err().to_string().contains("bias"));
    }
}
