//! The hierarchical gate's backward: from the gradient with respect to its
//! probabilities (`backward_logits` on the gate as the source) and the z-loss
//! of its group router to the gradients of the hidden states, the group
//! router `W_group [D, G]` and the within-group routers `W_g [D, P]`.
//!
//! With `p(e) = p(g) p(j | g)` for `e = g P + j`, group logits `a = x W_group`,
//! expert logits `b_g = x W_g` and `dq = dL/dp`:
//! - `c_g = sum_j dq_{gP+j} p(j | g)`;
//! - `dL/db_{g,j} = p(g) p(j | g) (dq_{gP+j} - c_g)` (softmax Jacobian within the group);
//! - `dL/da_g = p(g) (c_g - sum_h p(h) c_h) + z lse(a) p(g)`, with `z` the
//!   z-loss factor `2 * coeff * grad_auxiliary_loss / T_active` (ST-MoE);
//! - `dL/dx = da W_group^T + sum_g db_g W_g^T`, `dL/dW_group = x^T da`,
//!   `dL/dW_g = x^T db_g`.
//!
//! The sparse gate computes `p(j | g)` only for each token's best groups; the
//! other experts' probabilities are the constant 0, so their `c_g` is 0 and
//! no gradient reaches their `W_g` from that token. The chunks are the
//! routing's; weight gradients are summed per fixed group of chunks and the
//! groups added in order, so the result does not depend on the thread count.

use rayon::prelude::*;

use crate::backward::{backward_logits, Cotangents, SavedRouting};
use crate::config::RouterConfig;
use crate::error::Result;
use crate::gate::{best_groups, softmax_into, HierarchicalGate};
use crate::linear::GemmScalar;
use crate::linear_backward::WEIGHT_GROUPS;
use crate::route::{chunk_tokens, RouteCall};
use crate::simd::Simd;

/// Gradients of the hierarchical gate's inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct GateGrads<F> {
    /// `[T, D]`.
    pub hidden: Vec<F>,
    /// `[D, G]`.
    pub group_weight: Vec<F>,
    /// `[G, D, P]` (0 in the padding columns of a short last group).
    pub expert_weight: Vec<F>,
}

/// Backward of routing the gate's probabilities (the objective of
/// [`backward_logits`]; `options` is the gate's routing configuration, as
/// [`RouterConfig::for_gate`] makes it).
pub fn backward_gate<F: GemmScalar>(
    gate: &HierarchicalGate<'_, F>,
    options: &RouterConfig,
    call: &RouteCall,
    saved: &SavedRouting,
    grads: &Cotangents,
) -> Result<GateGrads<F>> {
    let (t, e, d) = (gate.tokens, gate.shape.experts, gate.dim);
    let (groups, p) = (gate.shape.groups, gate.shape.per_group);
    let mut dq = vec![F::default(); t * e];
    backward_logits(gate, options, call, saved, grads, &mut dq)?;
    let z = grads.auxiliary_loss * options.router_z_loss_coeff * 2.0 / saved.active_tokens.max(1) as f64;

    let transpose = |w: &[F], rows: usize, cols: usize| {
        let mut out = vec![F::default(); rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                out[c * rows + r] = w[r * cols + c];
            }
        }
        out
    };
    let group_t = transpose(gate.group_weight, d, groups);
    let experts_t: Vec<Vec<F>> = (0..groups).map(|g| transpose(gate.expert_router(g), d, p)).collect();
    let weights = Transposed { group: &group_t, experts: &experts_t };

    let chunk = chunk_tokens(t, e).max(1);
    let chunks = t.div_ceil(chunk);
    let parts = chunks.clamp(1, WEIGHT_GROUPS);
    let per_part = chunks.div_ceil(parts).max(1);
    let mut grad_hidden = vec![F::default(); t * d];
    let partials: Vec<(Vec<f64>, Vec<f64>)> = grad_hidden
        .par_chunks_mut((per_part * chunk * d).max(1))
        .enumerate()
        .map(|(part, out)| {
            let mut acc = Partial::new(d, groups, p);
            for c in part * per_part..((part + 1) * per_part).min(chunks) {
                let (lo, hi) = (c * chunk, ((c + 1) * chunk).min(t));
                let local = (lo - part * per_part * chunk) * d;
                let rows = Rows { lo, hi, active: call.token_mask.map(|m| &m[lo..hi]) };
                chunk_backward(gate, &dq, z, &weights, rows, &mut out[local..local + (hi - lo) * d], &mut acc);
            }
            (acc.group, acc.experts)
        })
        .collect();
    if t == 0 {
        return Ok(GateGrads {
            hidden: grad_hidden,
            group_weight: vec![F::default(); d * groups],
            expert_weight: vec![F::default(); groups * d * p],
        });
    }
    let mut group_weight = vec![0.0f64; d * groups];
    let mut expert_weight = vec![0.0f64; groups * d * p];
    for (g, x) in partials {
        add_into(&mut group_weight, &g);
        add_into(&mut expert_weight, &x);
    }
    Ok(GateGrads {
        hidden: grad_hidden,
        group_weight: group_weight.into_iter().map(F::from_f64).collect(),
        expert_weight: expert_weight.into_iter().map(F::from_f64).collect(),
    })
}

/// The gate's weights transposed for the products with the gradients.
struct Transposed<'a, F> {
    /// `[G, D]`.
    group: &'a [F],
    /// per group `[P, D]`.
    experts: &'a [Vec<F>],
}

/// One chunk's token range and mask.
struct Rows<'a> {
    lo: usize,
    hi: usize,
    active: Option<&'a [bool]>,
}

/// A part's running sums of the weight gradients (float64).
struct Partial {
    group: Vec<f64>,
    experts: Vec<f64>,
    dim: usize,
    per_group: usize,
}

impl Partial {
    fn new(dim: usize, groups: usize, per_group: usize) -> Self {
        Partial { group: vec![0.0; dim * groups], experts: vec![0.0; groups * dim * per_group], dim, per_group }
    }

    fn expert(&mut self, g: usize) -> &mut [f64] {
        let size = self.dim * self.per_group;
        &mut self.experts[g * size..(g + 1) * size]
    }
}

fn add_into(acc: &mut [f64], values: &[f64]) {
    for (a, &v) in acc.iter_mut().zip(values) {
        *a += v;
    }
}

/// `acc += x^T @ grad` for `x [m, D]`, `grad [m, n]`.
fn add_outer<F: GemmScalar>(x: &[F], grad: &[F], m: usize, d: usize, n: usize, acc: &mut [f64]) {
    let mut xt = vec![F::default(); d * m];
    for r in 0..m {
        for i in 0..d {
            xt[i * m + r] = x[r * d + i];
        }
    }
    let mut prod = vec![F::default(); d * n];
    F::matmul(d, m, n, &xt, grad, &mut prod);
    for (a, &v) in acc.iter_mut().zip(&prod) {
        *a += v.to_f64();
    }
}

/// The gradients of one chunk: its rows of `grad_hidden` (`out`, `[m, D]`)
/// and its share of the weight gradients (`acc`).
fn chunk_backward<F: GemmScalar>(
    gate: &HierarchicalGate<'_, F>,
    dq: &[F],
    z: f64,
    weights: &Transposed<'_, F>,
    rows: Rows<'_>,
    out: &mut [F],
    acc: &mut Partial,
) {
    let (e, d) = (gate.shape.experts, gate.dim);
    let (groups, p) = (gate.shape.groups, gate.shape.per_group);
    let m = rows.hi - rows.lo;
    let x = &gate.hidden[rows.lo * d..rows.hi * d];
    let is_active = |i: usize| rows.active.is_none_or(|a| a[i]);

    // Group probabilities and the log-partition of each row.
    let mut logits = vec![F::default(); m * groups];
    F::matmul(m, d, groups, x, gate.group_weight, &mut logits);
    let mut pg = vec![0.0f64; m * groups];
    let mut lse = vec![0.0f64; m];
    for (i, (row, probs)) in logits.chunks_exact(groups).zip(pg.chunks_exact_mut(groups)).enumerate() {
        lse[i] = softmax_into(row, probs);
    }
    // Which groups each token computed: all of them, or its best `top`.
    let computed: Option<Vec<u32>> = gate.group_top_k.map(|top| {
        let mut chosen = vec![0u32; m * top];
        let (mut best, mut scores) = (vec![f64::NEG_INFINITY; top], vec![0.0f64; groups]);
        let simd = Simd::current();
        for i in 0..m {
            for (s, v) in scores.iter_mut().zip(&logits[i * groups..(i + 1) * groups]) {
                *s = v.to_f64();
            }
            best_groups(simd, &scores, &mut chosen[i * top..(i + 1) * top], &mut best);
        }
        chosen
    });

    let mut c = vec![0.0f64; m * groups];
    let mut within = vec![0.0f64; p];
    let mut product = vec![F::default(); m * d];
    let (mut gathered, mut members) = (Vec::new(), Vec::new());
    for g in 0..groups {
        members.clear();
        match (&computed, gate.group_top_k) {
            (Some(chosen), Some(top)) => {
                members.extend((0..m).filter(|&i| chosen[i * top..(i + 1) * top].contains(&(g as u32))));
            }
            _ => members.extend(0..m),
        }
        let n = members.len();
        if n == 0 {
            continue;
        }
        gathered.clear();
        for &i in &members {
            gathered.extend_from_slice(&x[i * d..(i + 1) * d]);
        }
        let mut expert_logits = vec![F::default(); n * p];
        F::matmul(n, d, p, &gathered, gate.expert_router(g), &mut expert_logits);
        let size = gate.shape.group_size(g);
        let mut db = vec![F::default(); n * p];
        for (r, &i) in members.iter().enumerate() {
            if !is_active(i) {
                continue;
            }
            softmax_into(&expert_logits[r * p..r * p + size], &mut within[..size]);
            let grad = &dq[(rows.lo + i) * e + g * p..(rows.lo + i) * e + g * p + size];
            let cg: f64 = grad.iter().zip(&within[..size]).map(|(&q, &w)| q.to_f64() * w).sum();
            c[i * groups + g] = cg;
            let scale = pg[i * groups + g];
            for ((o, &q), &w) in db[r * p..r * p + size].iter_mut().zip(grad).zip(&within[..size]) {
                *o = F::from_f64(scale * w * (q.to_f64() - cg));
            }
        }
        // grad_hidden rows += db @ W_g^T; W_g += x^T db.
        F::matmul(n, p, d, &db, &weights.experts[g], &mut product[..n * d]);
        for (r, &i) in members.iter().enumerate() {
            for (o, &v) in out[i * d..(i + 1) * d].iter_mut().zip(&product[r * d..(r + 1) * d]) {
                *o = o.add(v);
            }
        }
        add_outer(&gathered, &db, n, d, p, acc.expert(g));
    }

    // Through the group softmax, plus the z-loss of the group router.
    let mut da = vec![F::default(); m * groups];
    for i in 0..m {
        if !is_active(i) {
            continue;
        }
        let (probs, ci) = (&pg[i * groups..(i + 1) * groups], &c[i * groups..(i + 1) * groups]);
        let mean: f64 = probs.iter().zip(ci).map(|(&q, &v)| q * v).sum();
        for ((o, &q), &v) in da[i * groups..(i + 1) * groups].iter_mut().zip(probs).zip(ci) {
            *o = F::from_f64(q * (v - mean) + z * lse[i] * q);
        }
    }
    F::matmul(m, groups, d, &da, weights.group, &mut product);
    for (o, &v) in out.iter_mut().zip(&product) {
        *o = o.add(v);
    }
    add_outer(x, &da, m, d, groups, &mut acc.group);
}
