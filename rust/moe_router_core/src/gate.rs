//! The hierarchical gate: group probabilities times within-group
//! probabilities, computed only where they can matter.
//!
//! E experts are split into `G = ceil(sqrt(E))` groups of `P = ceil(E / G)`
//! (the last group may be smaller). A token's probability of expert
//! `e = g * P + j` is `p(g) * p(j | g)`: a softmax over the group logits
//! `x @ W_group` times a softmax over group g's expert logits `x @ W_g`.
//!
//! - Dense (`group_top_k = None`): every group's expert logits. The last
//!   group's softmax runs over its real experts only, so the probabilities
//!   sum to 1.
//! - Sparse (`group_top_k = m`): only each token's m best groups (by group
//!   logit, ties to the lower group) get expert logits; the other experts get
//!   probability 0. The values on the computed experts are the dense values,
//!   at `(G + m P) / (G + G P)` of the dense FLOPs. Tokens are gathered per group
//!   so every product is a GEMM.
//!
//! The z-loss of the gate is that of its group router: `logsumexp(x @ W_group)^2`.

use crate::array_arg::ArrayArg;
use crate::error::{Result, RouterError};
use crate::linear::GemmScalar;
use crate::math::exp_f64;
use crate::route::CHUNK_TOKENS;
use crate::simd::Simd;
use crate::source::{ChunkBuf, ChunkRows, LogitSource};
use crate::topk::select_top_k;
use rayon::prelude::*;

/// Group layout of a hierarchical gate over `experts` experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateShape {
    /// E.
    pub experts: usize,
    /// G = ceil(sqrt(E)).
    pub groups: usize,
    /// P = ceil(E / G).
    pub per_group: usize,
}

impl GateShape {
    /// The layout for E experts.
    pub fn for_experts(experts: usize) -> Self {
        let mut groups = (experts as f64).sqrt().ceil() as usize;
        // Guard the float square root at perfect squares.
        while groups > 1 && (groups - 1) * (groups - 1) >= experts {
            groups -= 1;
        }
        let groups = groups.max(1);
        GateShape { experts, groups, per_group: experts.div_ceil(groups) }
    }

    /// Experts that exist in group g (the last group may be short).
    pub fn group_size(&self, g: usize) -> usize {
        self.per_group.min(self.experts.saturating_sub(g * self.per_group))
    }
}

/// Gate probabilities for `[T, D]` hidden states, computed chunk by chunk.
#[derive(Debug, Clone, Copy)]
pub struct HierarchicalGate<'a, F> {
    pub(crate) hidden: &'a [F],
    pub(crate) tokens: usize,
    pub(crate) dim: usize,
    /// `[D, G]` row-major.
    pub(crate) group_weight: &'a [F],
    /// `[G, D, P]` row-major: group g's `[D, P]` expert router.
    pub(crate) expert_weight: &'a [F],
    pub(crate) shape: GateShape,
    pub(crate) group_top_k: Option<usize>,
}

impl<'a, F: GemmScalar> HierarchicalGate<'a, F> {
    /// Check shapes and build the gate.
    pub fn new(
        hidden: &'a [F],
        tokens: usize,
        dim: usize,
        group_weight: &'a [F],
        expert_weight: &'a [F],
        experts: usize,
        group_top_k: Option<usize>,
    ) -> Result<Self> {
        let shape = GateShape::for_experts(experts);
        if experts == 0 {
            return Err(RouterError::config("num_experts", 0, "must be at least 1"));
        }
        if tokens.checked_mul(dim) != Some(hidden.len()) {
            return Err(RouterError::shape("hidden", format!("[{tokens}, {dim}]"), format!("{} values", hidden.len())));
        }
        if group_weight.len() != dim * shape.groups {
            return Err(RouterError::shape(
                "group_weight",
                format!("[{dim}, {}]", shape.groups),
                format!("{} values", group_weight.len()),
            ));
        }
        if expert_weight.len() != shape.groups * dim * shape.per_group {
            return Err(RouterError::shape(
                "expert_weight",
                format!("[{}, {dim}, {}]", shape.groups, shape.per_group),
                format!("{} values", expert_weight.len()),
            ));
        }
        if let Some(m) = group_top_k {
            if m == 0 || m > shape.groups {
                return Err(RouterError::config(
                    "group_top_k",
                    m,
                    format!("must satisfy 1 <= group_top_k <= num_groups = {}", shape.groups),
                ));
            }
        }
        Ok(HierarchicalGate { hidden, tokens, dim, group_weight, expert_weight, shape, group_top_k })
    }

    /// From the caller's arrays: `hidden [T, D]`, `group_weight [D, G]`,
    /// `expert_weight [G, D, P]` with the layout of `experts` experts.
    pub fn from_arrays(
        hidden: ArrayArg<'a, F>,
        group_weight: ArrayArg<'a, F>,
        expert_weight: ArrayArg<'a, F>,
        experts: usize,
        group_top_k: Option<usize>,
    ) -> Result<Self> {
        let h = hidden.check_shape(&[None, None], "[T, D]")?;
        let (t, d) = (hidden.shape[0], hidden.shape[1]);
        let s = GateShape::for_experts(experts);
        let (g, p) = (s.groups, s.per_group);
        let gw = group_weight.check_shape(&[Some(d), Some(g)], &format!("[{d}, {g}] (input_dim x groups)"))?;
        let ew = expert_weight.check_shape(
            &[Some(g), Some(d), Some(p)],
            &format!("[{g}, {d}, {p}] (groups x input_dim x experts per group)"),
        )?;
        HierarchicalGate::new(h, t, d, gw, ew, experts, group_top_k)
    }

    /// The group layout.
    pub fn shape(&self) -> GateShape {
        self.shape
    }

    /// D, the hidden size.
    pub fn dim(&self) -> usize {
        self.dim
    }

    pub(crate) fn expert_router(&self, g: usize) -> &'a [F] {
        let size = self.dim * self.shape.per_group;
        &self.expert_weight[g * size..(g + 1) * size]
    }
}

impl<F: GemmScalar> LogitSource for HierarchicalGate<'_, F> {
    type Elem = F;
    fn argument(&self) -> &'static str {
        "hidden"
    }
    fn num_tokens(&self) -> usize {
        self.tokens
    }
    fn num_experts(&self) -> usize {
        self.shape.experts
    }

    fn chunk<'s>(&'s self, start: usize, end: usize, buf: &'s mut ChunkBuf<F>) -> ChunkRows<'s, F> {
        let m = end - start;
        let (d, e) = (self.dim, self.shape.experts);
        let (g_count, p) = (self.shape.groups, self.shape.per_group);
        let x = &self.hidden[start * d..end * d];

        // Group softmax and the z-loss terms.
        buf.work.clear();
        buf.work.resize(m * g_count, F::default());
        F::matmul(m, d, g_count, x, self.group_weight, &mut buf.work);
        buf.work64.clear();
        buf.work64.resize(m * g_count, 0.0);
        buf.z_squared.clear();
        for (logits, probs) in buf.work.chunks_exact(g_count).zip(buf.work64.chunks_exact_mut(g_count)) {
            let lse = softmax_into(logits, probs);
            buf.z_squared.push(lse * lse);
        }

        buf.rows.clear();
        buf.rows.resize(m * e, F::default());
        let mut expert_logits: Vec<F> = Vec::new();
        let mut within = vec![0.0f64; p];
        match self.group_top_k {
            None => {
                expert_logits.resize(m * p, F::default());
                for g in 0..g_count {
                    let size = self.shape.group_size(g);
                    F::matmul(m, d, p, x, self.expert_router(g), &mut expert_logits);
                    for t in 0..m {
                        let pg = buf.work64[t * g_count + g];
                        softmax_into(&expert_logits[t * p..t * p + size], &mut within[..size]);
                        let row = &mut buf.rows[t * e + g * p..t * e + g * p + size];
                        for (o, &q) in row.iter_mut().zip(&within[..size]) {
                            *o = F::from_f64(pg * q);
                        }
                    }
                }
            }
            Some(top) => {
                // Each token's best groups, then one gathered GEMM per group.
                buf.index.clear();
                let mut chosen = vec![0u32; m * top];
                let mut best = vec![f64::NEG_INFINITY; top];
                let mut logits = vec![0.0f64; g_count];
                let simd = Simd::current();
                for t in 0..m {
                    // Rank by group logit: rounded probabilities could tie where logits do not.
                    for (l, v) in logits.iter_mut().zip(&buf.work[t * g_count..(t + 1) * g_count]) {
                        *l = v.to_f64();
                    }
                    best_groups(simd, &logits, &mut chosen[t * top..(t + 1) * top], &mut best);
                }
                let mut gathered: Vec<F> = Vec::new();
                for g in 0..g_count {
                    buf.index.clear();
                    for t in 0..m {
                        if chosen[t * top..(t + 1) * top].contains(&(g as u32)) {
                            buf.index.push(t as u32);
                        }
                    }
                    let n = buf.index.len();
                    if n == 0 {
                        continue;
                    }
                    gathered.clear();
                    for &t in &buf.index {
                        gathered.extend_from_slice(&x[t as usize * d..(t as usize + 1) * d]);
                    }
                    expert_logits.clear();
                    expert_logits.resize(n * p, F::default());
                    F::matmul(n, d, p, &gathered, self.expert_router(g), &mut expert_logits);
                    let size = self.shape.group_size(g);
                    for (i, &t) in buf.index.iter().enumerate() {
                        let t = t as usize;
                        let pg = buf.work64[t * g_count + g];
                        softmax_into(&expert_logits[i * p..i * p + size], &mut within[..size]);
                        let row = &mut buf.rows[t * e + g * p..t * e + g * p + size];
                        for (o, &q) in row.iter_mut().zip(&within[..size]) {
                            *o = F::from_f64(pg * q);
                        }
                    }
                }
            }
        }
        ChunkRows { rows: &buf.rows, z_squared: Some(&buf.z_squared) }
    }
}

/// Softmax of `logits` into `out` (float64); returns `logsumexp(logits)`.
pub(crate) fn softmax_into<F: GemmScalar>(logits: &[F], out: &mut [f64]) -> f64 {
    let max = logits.iter().map(|v| v.to_f64()).fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for (o, v) in out.iter_mut().zip(logits) {
        *o = exp_f64(v.to_f64() - max);
        sum += *o;
    }
    for o in out.iter_mut() {
        *o /= sum;
    }
    max + sum.ln()
}

/// The `chosen.len()` best groups by score (ties to the lower index).
pub(crate) fn best_groups(simd: Simd, scores: &[f64], chosen: &mut [u32], best: &mut [f64]) {
    let (mut experts, mut routed) = (vec![0i32; chosen.len()], vec![false; chosen.len()]);
    select_top_k(simd, scores, None, &mut experts, &mut routed, best, f64::NEG_INFINITY, &mut Vec::new());
    for (c, &g) in chosen.iter_mut().zip(&experts) {
        *c = g as u32;
    }
}

/// The gate's probabilities for every token, `[T, E]` row-major, and the
/// per-token z-loss terms (`logsumexp(group logits)^2`).
pub fn gate_probabilities<F: GemmScalar>(gate: &HierarchicalGate<F>) -> (Vec<F>, Vec<f64>) {
    let (t, e) = (gate.tokens, gate.shape.experts);
    let mut out = vec![F::default(); t * e];
    let mut z = vec![0.0; t];
    out.par_chunks_mut(CHUNK_TOKENS * e.max(1)).zip(z.par_chunks_mut(CHUNK_TOKENS)).enumerate().for_each_init(
        ChunkBuf::default,
        |buf, (c, (rows_out, z_out))| {
            let start = c * CHUNK_TOKENS;
            let end = (start + CHUNK_TOKENS).min(t);
            let rows = gate.chunk(start, end, buf);
            rows_out.copy_from_slice(rows.rows);
            if let Some(zs) = rows.z_squared {
                z_out.copy_from_slice(zs);
            }
        },
    );
    (out, z)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_square_root_groups() {
        assert_eq!(GateShape::for_experts(64), GateShape { experts: 64, groups: 8, per_group: 8 });
        assert_eq!(GateShape::for_experts(256), GateShape { experts: 256, groups: 16, per_group: 16 });
        let s = GateShape::for_experts(50);
        assert_eq!((s.groups, s.per_group, s.group_size(7)), (8, 7, 1));
    }

    fn weights(n: usize, salt: u64) -> Vec<f64> {
        (0..n).map(|i| (((i as u64 * 2654435761 + salt) % 1000) as f64 / 500.0 - 1.0) * 0.3).collect()
    }

    #[test]
    fn dense_rows_sum_to_one_and_sparse_matches_on_computed_experts() {
        let (t, d, e) = (600, 12, 50);
        let shape = GateShape::for_experts(e);
        let h = weights(t * d, 1);
        let wg = weights(d * shape.groups, 2);
        let we = weights(shape.groups * d * shape.per_group, 3);
        let dense = HierarchicalGate::new(&h, t, d, &wg, &we, e, None).unwrap();
        let (pd, _) = gate_probabilities(&dense);
        for row in pd.chunks(e) {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
        let sparse = HierarchicalGate::new(&h, t, d, &wg, &we, e, Some(2)).unwrap();
        let (ps, _) = gate_probabilities(&sparse);
        for (rd, rs) in pd.chunks(e).zip(ps.chunks(e)) {
            let nonzero = rs.iter().filter(|&&v| v > 0.0).count();
            assert!(nonzero <= 2 * shape.per_group);
            for (a, b) in rd.iter().zip(rs) {
                assert!(*b == 0.0 || (a - b).abs() < 1e-15);
            }
        }
    }
}
