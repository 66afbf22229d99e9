//! The linear router's backward: from the gradient of its logits `G = dL/dx`
//! (`x = hidden @ weight + bias`, see `backward`) to the gradients of the
//! hidden states (`G @ weight^T`), the weight (`hidden^T @ G`) and the bias
//! (`sum_t G`).
//!
//! The token dimension is cut into the routing chunks; `hidden^T @ G` and the
//! bias sums are accumulated per fixed group of chunks and the groups added
//! in order, so the result does not depend on the thread count.

use rayon::prelude::*;

use crate::backward::{backward_logits, Cotangents, SavedRouting};
use crate::config::RouterConfig;
use crate::error::Result;
use crate::linear::{GemmScalar, LinearLogits};
use crate::route::{chunk_tokens, RouteCall};

/// Most partial sums of `hidden^T @ G` kept at once (each `[D, E]`).
pub(crate) const WEIGHT_GROUPS: usize = 16;

/// Gradients of the linear router's inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearGrads<F> {
    /// `[T, D]`.
    pub hidden: Vec<F>,
    /// `[D, E]`.
    pub weight: Vec<F>,
    /// `[E]`.
    pub bias: Vec<F>,
}

/// Backward of routing `source` (the gradient of the same objective as
/// [`backward_logits`]), the logits recomputed chunk by chunk.
pub fn backward_linear<F: GemmScalar>(
    source: &LinearLogits<'_, F>,
    options: &RouterConfig,
    call: &RouteCall,
    saved: &SavedRouting,
    grads: &Cotangents,
) -> Result<LinearGrads<F>> {
    use crate::source::LogitSource;
    let (t, e) = (source.num_tokens(), source.num_experts());
    let (hidden, weight, d) = source.parts();
    let mut g = vec![F::default(); t * e];
    backward_logits(source, options, call, saved, grads, &mut g)?;

    // weight^T, [E, D], for G @ weight^T.
    let mut weight_t = vec![F::default(); e * d];
    for i in 0..d {
        for j in 0..e {
            weight_t[j * d + i] = weight[i * e + j];
        }
    }
    let chunk = chunk_tokens(t, e).max(1);
    let mut grad_hidden = vec![F::default(); t * d];
    if d > 0 && e > 0 {
        grad_hidden.par_chunks_mut(chunk * d).zip(g.par_chunks(chunk * e)).for_each(|(out, rows)| {
            F::matmul(rows.len() / e, e, d, rows, &weight_t, out);
        });
    }

    let chunks = t.div_ceil(chunk);
    let groups = chunks.clamp(1, WEIGHT_GROUPS);
    let per_group = chunks.div_ceil(groups).max(1);
    let partials: Vec<(Vec<F>, Vec<F>)> = (0..groups)
        .into_par_iter()
        .map(|group| {
            let mut acc_w = vec![F::default(); d * e];
            let mut acc_b = vec![F::default(); e];
            let (mut ht, mut prod) = (Vec::new(), vec![F::default(); d * e]);
            for c in group * per_group..((group + 1) * per_group).min(chunks) {
                let (lo, hi) = (c * chunk, ((c + 1) * chunk).min(t));
                let m = hi - lo;
                // hidden rows^T, [D, m]
                ht.clear();
                ht.resize(d * m, F::default());
                for r in 0..m {
                    for i in 0..d {
                        ht[i * m + r] = hidden[(lo + r) * d + i];
                    }
                }
                let rows = &g[lo * e..hi * e];
                F::matmul(d, m, e, &ht, rows, &mut prod);
                for (a, &p) in acc_w.iter_mut().zip(&prod) {
                    *a = a.add(p);
                }
                for row in rows.chunks_exact(e.max(1)) {
                    for (a, &v) in acc_b.iter_mut().zip(row) {
                        *a = a.add(v);
                    }
                }
            }
            (acc_w, acc_b)
        })
        .collect();
    let mut grad_weight = vec![F::default(); d * e];
    let mut grad_bias = vec![F::default(); e];
    for (w, b) in partials {
        for (a, p) in grad_weight.iter_mut().zip(w) {
            *a = a.add(p);
        }
        for (a, p) in grad_bias.iter_mut().zip(b) {
            *a = a.add(p);
        }
    }
    Ok(LinearGrads { hidden: grad_hidden, weight: grad_weight, bias: grad_bias })
}
