//! Shared test helpers: a tiny deterministic PRNG, input generators, a plain
//! sequential reference router (docs/semantics.md items 1-14, float64, simple
//! loops) and a field-by-field comparison against the core's `Routing`.
//!
//! The reference is deliberately naive: it sorts where the core partitions, it
//! walks the assignments one by one in each drop policy's order, and it keeps
//! no per-chunk state, so agreement with the parallel core is meaningful.

#![allow(dead_code)]

use moe_router_core::{
    keyed_normal, keyed_uniform, CapacityFactor, CapacityRounding, Decimal, DropPolicy, GroupScore, Overflow,
    RngStream, RouteCall, RouterConfig, Routing, ScoreFunction,
};

// ---------------------------------------------------------------------------
// PRNG
// ---------------------------------------------------------------------------

/// xorshift64* (Vigna 2016): small, fast, deterministic, good enough for test data.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        // Scramble so that small seeds give unrelated streams; never zero.
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xd1b5_4a32_d192_ed03;
        if s == 0 {
            s = 1;
        }
        let mut r = XorShift(s);
        for _ in 0..4 {
            r.next_u64();
        }
        r
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability p.
    pub fn chance(&mut self, p: f64) -> bool {
        self.uniform() < p
    }

    /// Approximately N(0, 1): Box-Muller.
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    pub fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())].clone()
    }
}

// ---------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------

/// Kinds of logit matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// N(0, 1) * scale.
    Gaussian,
    /// Values in {-1, -0.5, 0, 0.5, 1}: many exact ties within and across tokens.
    Ties,
    /// Gaussian with about 40 % of the entries -inf (at least one finite per row):
    /// rows with fewer than k eligible experts get filler choices.
    Sparse,
    /// N(0, 1) * 40: saturated softmax, scores that underflow in float32.
    Wide,
}

pub const ALL_LOGITS: [Logits; 4] = [Logits::Gaussian, Logits::Ties, Logits::Sparse, Logits::Wide];

/// A `[t, e]` row-major matrix of logits of the given kind.
pub fn make_logits(rng: &mut XorShift, kind: Logits, t: usize, e: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(t * e);
    for _ in 0..t {
        let start = out.len();
        for _ in 0..e {
            let v = match kind {
                Logits::Gaussian => rng.normal(),
                Logits::Ties => (rng.below(5) as f64 - 2.0) * 0.5,
                Logits::Sparse => {
                    if rng.chance(0.4) {
                        f64::NEG_INFINITY
                    } else {
                        rng.normal()
                    }
                }
                Logits::Wide => rng.normal() * 40.0,
            };
            out.push(v);
        }
        if kind == Logits::Sparse && out[start..].iter().all(|v| *v == f64::NEG_INFINITY) {
            let x = rng.below(e);
            out[start + x] = rng.normal();
        }
    }
    out
}

/// A mask with about `p_masked` of the tokens masked out; the masked rows of
/// `logits` are overwritten with garbage (NaN, +inf, all -inf) that the router
/// must never read.
pub fn make_mask(rng: &mut XorShift, logits: &mut [f64], t: usize, e: usize, p_masked: f64) -> Vec<bool> {
    let mut mask = vec![true; t];
    for (i, m) in mask.iter_mut().enumerate() {
        if rng.chance(p_masked) {
            *m = false;
            let garbage = match rng.below(3) {
                0 => f64::NAN,
                1 => f64::INFINITY,
                _ => f64::NEG_INFINITY,
            };
            logits[i * e..(i + 1) * e].fill(garbage);
        }
    }
    mask
}

pub fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

pub fn factor(text: &str) -> CapacityFactor {
    CapacityFactor::Factor(Decimal::from_decimal_str(text).expect("a decimal"))
}

// ---------------------------------------------------------------------------
// Reference router
// ---------------------------------------------------------------------------

/// What the reference computes; weights and losses in float64.
#[derive(Debug, Clone)]
pub struct Reference {
    pub expert_indices: Vec<i32>,
    pub expert_weights: Vec<f64>,
    pub expert_slots: Vec<i32>,
    pub kept: Vec<bool>,
    pub rerouted: Vec<bool>,
    pub tokens_per_expert: Vec<i64>,
    pub pre_drop_tokens_per_expert: Vec<i64>,
    /// Active tokens per expert of their rank-0 choice (before capacity).
    pub first_choice_tokens_per_expert: Vec<i64>,
    /// Active tokens per expert of the plain top-k (no bias, no groups).
    pub plain_tokens_per_expert: Vec<i64>,
    /// `[T, E]` each token's scores (0 for masked tokens).
    pub router_probs: Vec<f64>,
    pub capacity: usize,
    pub dropless: bool,
    pub active_tokens: usize,
    pub kept_assignments: usize,
    pub dropped_assignments: usize,
    pub tokens_dropped: usize,
    pub load_balance_loss: f64,
    pub router_z_loss: f64,
    pub seq_load_balance_loss: Option<f64>,
}

/// The logarithm of an eligible expert's score up to a constant of the token:
/// the logit (softmax), or `log(sigmoid(z))`.
fn log_score(function: ScoreFunction, z: f64) -> f64 {
    if function == ScoreFunction::Softmax {
        z
    } else if z > 0.0 {
        -(-z).exp().ln_1p()
    } else {
        z - z.exp().ln_1p()
    }
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// "digits e exp10" (the `Display` form of `Decimal`) as an exact fraction num/den.
fn decimal_fraction(d: &Decimal) -> (u128, u128) {
    let text = d.to_string();
    let (digits, exp) = text.split_once('e').expect("Decimal prints as <digits>e<exp>");
    let digits: u128 = digits.parse().expect("digits");
    let exp: i32 = exp.parse().expect("exponent");
    if exp >= 0 {
        (digits * 10u128.pow(exp as u32), 1)
    } else {
        (digits, 10u128.pow((-exp) as u32))
    }
}

/// The capacity rule of semantics.md item 8, written independently of the core.
pub fn reference_capacity(
    factor: &CapacityFactor,
    rounding: CapacityRounding,
    min_capacity: usize,
    t_active: usize,
    k: usize,
    e: usize,
) -> Option<usize> {
    let CapacityFactor::Factor(d) = factor else { return None };
    let raw = match rounding {
        CapacityRounding::Exact => {
            let (num, den) = decimal_fraction(d);
            let top = num * (t_active as u128) * (k as u128);
            let bottom = den * e as u128;
            top.div_ceil(bottom) as usize
        }
        CapacityRounding::Megatron => {
            let cf: f64 = d.to_string().parse().expect("float");
            ((t_active * k) as f64 / e as f64 * cf).ceil() as usize
        }
        CapacityRounding::DeepSpeed => {
            let cf: f64 = d.to_string().parse().expect("float");
            let a = (t_active as f64 / e as f64) as f32;
            let b = (cf * k as f64) as f32;
            (a * b).ceil() as usize
        }
        CapacityRounding::Tutel | CapacityRounding::Fairseq => {
            let (num, den) = decimal_fraction(d);
            let per_expert = t_active.div_ceil(e) as u128;
            let floored = (num * per_expert / den) as usize;
            match (rounding, k) {
                (CapacityRounding::Tutel, _) => k * floored,
                (_, 1) => floored,
                _ => k * per_expert as usize,
            }
        }
    };
    Some(raw.max(min_capacity))
}

/// Route `[t, e]` logits by the letter of docs/semantics.md, sequentially.
pub fn reference<F: Copy + Into<f64>>(logits: &[F], t: usize, o: &RouterConfig, call: &RouteCall) -> Reference {
    let (e, k) = (o.num_experts, o.top_k);
    assert_eq!(logits.len(), t * e);
    let is_active = |i: usize| call.token_mask.is_none_or(|m| m[i]);
    let n = t * k;
    let mut idx = vec![0i32; n];
    let mut w = vec![0f64; n];
    // Log of each routed choice's score (up to a constant of the token), for item 10.
    let mut log_w = vec![f64::NEG_INFINITY; n];
    let mut routed = vec![false; n];
    let mut top1 = vec![0f32; t];
    // Per token: its normalized score distribution (for the losses) and lse.
    let mut dist = vec![0f64; t * e];
    let mut lse = vec![0f64; t];
    // Per token: the experts it may use at all (finite key after groups): reroute candidates.
    let mut allowed = vec![false; t * e];
    let noise = call.training && (o.jitter_eps > 0.0 || o.noise_std > 0.0);
    let mut probs = vec![0f64; t * e];
    let mut first_choice = vec![0i64; e];
    let mut plain = vec![0i64; e];

    for i in 0..t {
        if !is_active(i) {
            // Item 7.
            for j in 0..k {
                idx[i * k + j] = j as i32;
            }
            continue;
        }
        // Items 14, 2.
        let mut z: Vec<f64> = logits[i * e..(i + 1) * e].iter().map(|&v| v.into()).collect();
        if noise {
            for (x, v) in z.iter_mut().enumerate() {
                if o.jitter_eps > 0.0 {
                    let u = keyed_uniform(o.seed, RngStream::Jitter, call.step, i as u64, x as u64);
                    *v *= 1.0 - o.jitter_eps + 2.0 * o.jitter_eps * u;
                }
                if o.noise_std > 0.0 {
                    *v += o.noise_std * keyed_normal(o.seed, RngStream::Gaussian, call.step, i as u64, x as u64);
                }
            }
        }
        let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let exps: Vec<f64> = z.iter().map(|&v| (v - m).exp()).collect();
        let exp_sum: f64 = exps.iter().sum();
        lse[i] = m + exp_sum.ln();
        // if/else rather than `match`: the reference covers the two score
        // functions of semantics.md item 2 and refuses any other.
        let scores: Vec<f64> = if o.score_function == ScoreFunction::Softmax {
            let inv = 1.0 / exp_sum;
            exps.iter().map(|&x| x * inv).collect()
        } else if o.score_function == ScoreFunction::Sigmoid {
            z.iter().map(|&v| sigmoid(v)).collect()
        } else {
            unimplemented!("the reference does not cover {:?}", o.score_function)
        };
        probs[i * e..(i + 1) * e].copy_from_slice(&scores);
        // The distribution from the scores' logarithms: exact even where every
        // score underflows.
        let logs: Vec<f64> = z.iter().map(|&v| log_score(o.score_function, v)).collect();
        let top = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let relative_sum: f64 = logs.iter().map(|&l| (l - top).exp()).sum();
        for x in 0..e {
            dist[i * e + x] = (logs[x] - top).exp() / relative_sum;
        }

        // Items 3, 4.
        let eligible: Vec<bool> = z.iter().map(|&v| v > f64::NEG_INFINITY).collect();
        let mut keys: Vec<f64> = (0..e)
            .map(|x| match (eligible[x], call.expert_bias) {
                (false, _) => f64::NEG_INFINITY,
                (true, None) => z[x],
                (true, Some(b)) => scores[x] + b[x],
            })
            .collect();
        if let Some(g) = o.groups() {
            let size = e / g.num_groups;
            let gkey = |x: usize| {
                if eligible[x] {
                    scores[x] + call.expert_bias.map_or(0.0, |b| b[x])
                } else {
                    f64::NEG_INFINITY
                }
            };
            let mut group_scores = Vec::with_capacity(g.num_groups);
            for q in 0..g.num_groups {
                let mut members: Vec<f64> = (q * size..(q + 1) * size).map(gkey).collect();
                members.sort_by(|a, b| b.partial_cmp(a).expect("no NaN"));
                let s = match g.group_score {
                    GroupScore::Max => members[0],
                    GroupScore::Top2Sum | GroupScore::TopSum(_) => {
                        let n = if let GroupScore::TopSum(n) = g.group_score { n } else { 2 };
                        let finite: Vec<f64> = members.iter().copied().filter(|v| v.is_finite()).collect();
                        if finite.is_empty() {
                            f64::NEG_INFINITY
                        } else {
                            finite.iter().take(n).sum()
                        }
                    }
                };
                group_scores.push(s);
            }
            let mut order: Vec<usize> = (0..g.num_groups).collect();
            order.sort_by(|&a, &b| group_scores[b].partial_cmp(&group_scores[a]).expect("no NaN").then(a.cmp(&b)));
            for &q in &order[g.group_top_k..] {
                for key in &mut keys[q * size..(q + 1) * size] {
                    *key = f64::NEG_INFINITY;
                }
            }
        }

        for x in 0..e {
            allowed[i * e + x] = keys[x] > f64::NEG_INFINITY;
        }

        // The plain top-k: keys are the (noised) logits, no bias, no groups.
        let mut plain_cands: Vec<usize> = (0..e).filter(|&x| eligible[x]).collect();
        plain_cands.sort_by(|&a, &b| z[b].partial_cmp(&z[a]).expect("no NaN").then(a.cmp(&b)));
        for &x in plain_cands.iter().take(k) {
            plain[x] += 1;
        }

        // Item 5.
        let mut cands: Vec<usize> = (0..e).filter(|&x| keys[x] > f64::NEG_INFINITY).collect();
        cands.sort_by(|&a, &b| keys[b].partial_cmp(&keys[a]).expect("no NaN").then(a.cmp(&b)));
        cands.truncate(k);
        let real = cands.len();
        if real > 0 {
            first_choice[cands[0]] += 1;
        }
        let mut chosen = cands;
        let mut filler = 0usize;
        while chosen.len() < k {
            if !chosen.contains(&filler) {
                chosen.push(filler);
            }
            filler += 1;
        }

        // Item 6: normalized relative to the largest chosen score, from the
        // scores' logarithms (exact where the quotient is representable).
        let chosen_logs: Vec<f64> = chosen[..real].iter().map(|&x| log_score(o.score_function, z[x])).collect();
        let top = chosen_logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let routed_sum: f64 = chosen_logs.iter().map(|&l| (l - top).exp()).sum();
        for j in 0..k {
            let p = i * k + j;
            idx[p] = chosen[j] as i32;
            routed[p] = j < real;
            if j < real {
                log_w[p] = chosen_logs[j];
                let v = if o.normalize_weights { (chosen_logs[j] - top).exp() / routed_sum } else { scores[chosen[j]] };
                w[p] = v * o.weight_scale;
            }
        }
        // Item 9 (bpr): float32 of the unbiased, unnormalized score of the rank-0 choice.
        top1[i] = if real > 0 { scores[chosen[0]] as f32 } else { 0.0 };
    }

    // Item 11 (pre-drop), item 8 (capacity). `idx` may later be rewritten by
    // reroutes; the pre-drop counts and the losses use the routing as selected.
    let pre_idx = idx.clone();
    let t_active = (0..t).filter(|&i| is_active(i)).count();
    let active_tokens: Vec<usize> = (0..t).filter(|&i| is_active(i)).collect();
    let routed_counts = |tokens: &[usize]| -> Vec<i64> {
        let mut counts = vec![0i64; e];
        for &i in tokens {
            for j in 0..k {
                if routed[i * k + j] {
                    counts[pre_idx[i * k + j] as usize] += 1;
                }
            }
        }
        counts
    };
    let pre = routed_counts(&active_tokens);
    let cf = match (&o.eval_capacity_factor, call.training) {
        (Some(eval), false) => eval,
        _ => &o.capacity_factor,
    };
    let limit = match (&o.eval_capacity_token_fraction, call.training) {
        (Some(fraction), false) => {
            let (num, den) = decimal_fraction(fraction);
            Some(((num * t_active as u128).div_ceil(den) as usize).max(o.min_capacity))
        }
        _ => reference_capacity(cf, o.capacity_rounding, o.min_capacity, t_active, k, e),
    };
    let limit = limit.map(|c| c.div_ceil(o.capacity_alignment) * o.capacity_alignment);
    let cap = limit.unwrap_or(usize::MAX);

    // Item 9: the policy's order over (token, rank).
    let token_major = |tokens: &[usize]| -> Vec<(usize, usize)> {
        let mut v = Vec::new();
        for &i in tokens {
            for j in 0..k {
                v.push((i, j));
            }
        }
        v
    };
    let by_token: Vec<usize> = (0..t).collect();
    let order: Vec<(usize, usize)> = match o.drop_policy {
        DropPolicy::Position | DropPolicy::Probs => token_major(&by_token),
        DropPolicy::Rank => {
            let mut v = Vec::new();
            for j in 0..k {
                for i in 0..t {
                    v.push((i, j));
                }
            }
            v
        }
        DropPolicy::Bpr | DropPolicy::BprRank => {
            let mut toks = by_token.clone();
            toks.sort_by(|&a, &b| top1[b].partial_cmp(&top1[a]).expect("no NaN").then(a.cmp(&b)));
            if o.drop_policy == DropPolicy::Bpr {
                token_major(&toks)
            } else {
                (0..k).flat_map(|j| toks.iter().map(move |&i| (i, j))).collect()
            }
        }
    };
    let mut kept = vec![false; n];
    let mut slots = vec![-1i32; n];
    match o.drop_policy {
        DropPolicy::Probs => {
            // Each expert keeps its `cap` best (float32 weight desc, token asc).
            for x in 0..e {
                let mut mine: Vec<usize> = (0..n).filter(|&p| routed[p] && idx[p] as usize == x).collect();
                mine.sort_by(|&a, &b| {
                    let (wa, wb) = (w[a] as f32, w[b] as f32);
                    wb.partial_cmp(&wa).expect("no NaN").then((a / k).cmp(&(b / k)))
                });
                for &p in mine.iter().take(cap) {
                    kept[p] = true;
                }
            }
            let mut next = vec![0i32; e];
            for p in 0..n {
                if kept[p] {
                    let x = idx[p] as usize;
                    slots[p] = next[x];
                    next[x] += 1;
                }
            }
        }
        _ => {
            let mut seen = vec![0usize; e];
            for &(i, j) in &order {
                let p = i * k + j;
                if !routed[p] {
                    continue;
                }
                let x = idx[p] as usize;
                if seen[x] < cap {
                    kept[p] = true;
                    slots[p] = seen[x] as i32;
                }
                seen[x] += 1;
            }
        }
    }

    // Item 13: reroute.
    let mut rerouted = vec![false; n];
    if o.overflow == Overflow::Reroute && limit.is_some() {
        let mut load = vec![0usize; e];
        for p in 0..n {
            if kept[p] {
                load[idx[p] as usize] += 1;
            }
        }
        let probability = if call.training { o.expert_dropout } else { 1.0 };
        for &(i, j) in &order {
            let p = i * k + j;
            if !routed[p] || kept[p] {
                continue;
            }
            if probability < 1.0 {
                let u = keyed_uniform(o.seed, RngStream::Reroute, call.step, i as u64, j as u64);
                if u >= probability {
                    continue;
                }
            }
            let mine: Vec<i32> = idx[i * k..(i + 1) * k].to_vec();
            let mut best: Option<usize> = None;
            for x in 0..e {
                if load[x] >= cap || !allowed[i * e + x] || mine.contains(&(x as i32)) {
                    continue;
                }
                if best.is_none_or(|b| load[x] < load[b]) {
                    best = Some(x);
                }
            }
            if let Some(x) = best {
                idx[p] = x as i32;
                slots[p] = load[x] as i32;
                kept[p] = true;
                rerouted[p] = true;
                // From the stored float32 weight, or from the exact one where float32
                // holds it only approximately and the factor would scale that error up.
                let stored = f64::from(w[p] as f32);
                let approximate = o.reroute_weight_scale > 1.0 && stored < f64::from(f32::MIN_POSITIVE);
                w[p] = if approximate { w[p] } else { stored } * o.reroute_weight_scale;
                load[x] += 1;
            }
        }
    }

    // Item 10.
    for p in 0..n {
        if !kept[p] {
            w[p] = 0.0;
        }
    }
    if o.renormalize_after_drop {
        for i in 0..t {
            let row = i * k..(i + 1) * k;
            if !kept[row.clone()].iter().any(|&b| b) {
                continue;
            }
            let sum: f64 = row.clone().filter(|&p| kept[p]).map(|p| f64::from(w[p] as f32)).sum();
            let subnormal = row.clone().any(|p| kept[p] && (w[p] as f32) < f32::MIN_POSITIVE);
            if subnormal && 2.0 * sum < o.weight_scale {
                // From the unrounded weights: the kept scores' logarithms.
                let top = row.clone().filter(|&p| kept[p]).map(|p| log_w[p]).fold(f64::NEG_INFINITY, f64::max);
                let rel = |p: usize| {
                    let factor = if rerouted[p] { o.reroute_weight_scale } else { 1.0 };
                    if kept[p] {
                        (log_w[p] - top).exp() * factor
                    } else {
                        0.0
                    }
                };
                let total: f64 = row.clone().map(rel).sum();
                for p in row {
                    w[p] = if total > 0.0 { rel(p) / total * o.weight_scale } else { 0.0 };
                }
                continue;
            }
            for p in row {
                w[p] = if sum != 0.0 { f64::from(w[p] as f32) / sum * o.weight_scale } else { 0.0 };
            }
        }
    }

    // Item 11.
    let mut tpe = vec![0i64; e];
    for p in 0..n {
        if kept[p] {
            tpe[idx[p] as usize] += 1;
        }
    }
    let kept_assignments = kept.iter().filter(|&&b| b).count();
    let tokens_dropped = (0..t).filter(|&i| is_active(i) && !kept[i * k..(i + 1) * k].iter().any(|&b| b)).count();

    // Item 12.
    let balance = |tokens: &[usize]| -> f64 {
        let ta = tokens.len() as f64;
        let counts = routed_counts(tokens);
        let mut dot = 0.0;
        for x in 0..e {
            let p_x: f64 = tokens.iter().map(|&i| dist[i * e + x]).sum::<f64>() / ta;
            dot += counts[x] as f64 / (ta * k as f64) * p_x;
        }
        e as f64 * dot
    };
    let lb = if t_active == 0 { 0.0 } else { balance(&active_tokens) };
    let z =
        if t_active == 0 { 0.0 } else { active_tokens.iter().map(|&i| lse[i] * lse[i]).sum::<f64>() / t_active as f64 };
    let seq = call.sequence_length.map(|s| {
        let mut total = 0.0;
        let mut count = 0usize;
        for q in 0..t / s {
            let act: Vec<usize> = (q * s..(q + 1) * s).filter(|&i| is_active(i)).collect();
            if !act.is_empty() {
                total += balance(&act);
                count += 1;
            }
        }
        if count == 0 {
            0.0
        } else {
            total / count as f64
        }
    });
    let capacity = limit.unwrap_or_else(|| tpe.iter().copied().max().unwrap_or(0) as usize);

    Reference {
        expert_indices: idx,
        expert_weights: w,
        expert_slots: slots,
        kept,
        rerouted,
        tokens_per_expert: tpe,
        pre_drop_tokens_per_expert: pre,
        first_choice_tokens_per_expert: first_choice,
        plain_tokens_per_expert: plain,
        router_probs: probs,
        capacity,
        dropless: limit.is_none(),
        active_tokens: t_active,
        kept_assignments,
        dropped_assignments: t_active * k - kept_assignments,
        tokens_dropped,
        load_balance_loss: lb,
        router_z_loss: z,
        seq_load_balance_loss: seq,
    }
}

// ---------------------------------------------------------------------------
// Comparison
// ---------------------------------------------------------------------------

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

macro_rules! ensure_eq {
    ($a:expr, $b:expr, $($fmt:tt)+) => {
        if $a != $b {
            return Err(format!("{}: left {:?} right {:?}", format!($($fmt)+), $a, $b));
        }
    };
}

/// `|a - b| <= rel * max(|a|, |b|) + abs`.
pub fn close(a: f64, b: f64, rel: f64, abs: f64) -> bool {
    a == b || (a - b).abs() <= rel * a.abs().max(b.abs()) + abs
}

/// Compare the core's result with the reference: every integer field exactly,
/// weights and losses within 1e-6 relative. Panics with `what` and the first
/// difference (token, rank) on mismatch.
pub fn assert_matches(what: &str, got: &Routing, want: &Reference) {
    if let Err(msg) = check_matches(what, got, want) {
        panic!("{msg}");
    }
}

/// `assert_matches` as a `Result`, for callers that collect failures.
pub fn check_matches(what: &str, got: &Routing, want: &Reference) -> Result<(), String> {
    let k = got.top_k.max(1);
    let n = want.expert_indices.len();
    let lengths = [
        got.expert_indices.len(),
        got.expert_weights.len(),
        got.expert_slots.len(),
        got.kept.len(),
        // Empty when no reroute could happen.
        if got.rerouted.is_empty() { n } else { got.rerouted.len() },
    ];
    if lengths.iter().any(|&l| l != n) || got.num_tokens * got.top_k != n {
        return Err(format!("{what}: [T, k] arrays have lengths {lengths:?}, expected {n}"));
    }
    let first_diff = |name: &str, same: &dyn Fn(usize) -> bool| -> Result<(), String> {
        match (0..n).find(|&p| !same(p)) {
            None => Ok(()),
            Some(p) => {
                let row = p / k * k..(p / k + 1) * k;
                Err(format!(
                    "{what}: {name} differs first at token {} rank {}\n  core      indices {:?} slots {:?} kept {:?} weights {:?}\n  reference indices {:?} slots {:?} kept {:?} weights {:?}",
                    p / k,
                    p % k,
                    &got.expert_indices[row.clone()],
                    &got.expert_slots[row.clone()],
                    &got.kept[row.clone()],
                    &got.expert_weights[row.clone()],
                    &want.expert_indices[row.clone()],
                    &want.expert_slots[row.clone()],
                    &want.kept[row.clone()],
                    &want.expert_weights[row],
                ))
            }
        }
    };
    first_diff("expert_indices", &|p| got.expert_indices[p] == want.expert_indices[p])?;
    first_diff("kept", &|p| got.kept[p] == want.kept[p])?;
    first_diff("expert_slots", &|p| got.expert_slots[p] == want.expert_slots[p])?;
    first_diff("rerouted", &|p| got.rerouted.get(p).copied().unwrap_or(false) == want.rerouted[p])?;
    first_diff("expert_weights", &|p| {
        close(f64::from(got.expert_weights[p]), want.expert_weights[p], 1e-6, f64::from(f32::MIN_POSITIVE))
    })?;
    let exact = |name: &str, a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug, same: bool| -> Result<(), String> {
        if same {
            Ok(())
        } else {
            Err(format!("{what}: {name} core {a:?} reference {b:?}"))
        }
    };
    macro_rules! same_fields {
        ($($field:ident),*) => {
            $(exact(stringify!($field), &got.$field, &want.$field, got.$field == want.$field)?;)*
        };
    }
    same_fields!(tokens_per_expert, pre_drop_tokens_per_expert, first_choice_tokens_per_expert);
    // The optional outputs, when the call asked for them.
    if !got.plain_tokens_per_expert.is_empty() {
        same_fields!(plain_tokens_per_expert);
    }
    if !got.router_probs.is_empty() {
        let e = got.num_experts;
        ensure_eq!(got.router_probs.len(), want.router_probs.len(), "{what}: router_probs length");
        if let Some(p) = (0..want.router_probs.len())
            .find(|&p| !close(f64::from(got.router_probs[p]), want.router_probs[p], 1e-6, f64::from(f32::MIN_POSITIVE)))
        {
            return Err(format!(
                "{what}: router_probs differs first at token {} expert {}: core {} reference {}",
                p / e,
                p % e,
                got.router_probs[p],
                want.router_probs[p]
            ));
        }
    }
    same_fields!(capacity, dropless, active_tokens, kept_assignments, dropped_assignments, tokens_dropped);
    let loss = |name: &str, a: f64, b: f64| exact(name, &a, &b, close(a, b, 1e-6, 1e-12));
    loss("load_balance_loss", got.load_balance_loss, want.load_balance_loss)?;
    loss("router_z_loss", got.router_z_loss, want.router_z_loss)?;
    match (got.seq_load_balance_loss, want.seq_load_balance_loss) {
        (None, None) => Ok(()),
        (Some(a), Some(b)) => loss("seq_load_balance_loss", a, b),
        (a, b) => Err(format!("{what}: seq_load_balance_loss core {a:?} reference {b:?}")),
    }
}

/// Structural invariants every routing must satisfy, whatever the options.
pub fn assert_invariants(what: &str, r: &Routing) {
    if let Err(msg) = check_invariants(what, r) {
        panic!("{msg}");
    }
}

/// `assert_invariants` as a `Result`.
pub fn check_invariants(what: &str, r: &Routing) -> Result<(), String> {
    let (t, e, k) = (r.num_tokens, r.num_experts, r.top_k);
    let mut per_expert_slots: Vec<Vec<i32>> = vec![Vec::new(); e];
    for i in 0..t {
        let row = &r.expert_indices[i * k..(i + 1) * k];
        for (j, &x) in row.iter().enumerate() {
            ensure!(x >= 0 && (x as usize) < e, "{what}: token {i} rank {j}: expert {x} out of range");
            ensure!(!row[..j].contains(&x), "{what}: token {i} has expert {x} twice: {row:?}");
            let p = i * k + j;
            if r.kept[p] {
                let s = r.expert_slots[p];
                ensure!(s >= 0, "{what}: kept assignment ({i}, {j}) has slot {s}");
                if !r.dropless {
                    ensure!((s as usize) < r.capacity, "{what}: slot {s} >= capacity {}", r.capacity);
                }
                per_expert_slots[x as usize].push(s);
            } else {
                ensure_eq!(r.expert_slots[p], -1, "{what}: dropped ({i}, {j}) has a slot");
                ensure_eq!(r.expert_weights[p], 0.0, "{what}: dropped ({i}, {j}) has a weight");
                ensure!(!r.rerouted.get(p).copied().unwrap_or(false), "{what}: dropped ({i}, {j}) is marked rerouted");
            }
        }
    }
    for (x, slots) in per_expert_slots.iter_mut().enumerate() {
        ensure_eq!(slots.len() as i64, r.tokens_per_expert[x], "{what}: tokens_per_expert[{x}]");
        if !r.dropless {
            ensure!(slots.len() <= r.capacity, "{what}: expert {x} keeps {} > capacity {}", slots.len(), r.capacity);
        }
        slots.sort_unstable();
        let expected: Vec<i32> = (0..slots.len() as i32).collect();
        ensure_eq!(*slots, expected, "{what}: slots of expert {x} are not 0..{}", slots.len());
    }
    ensure_eq!(r.kept_assignments, r.kept.iter().filter(|&&b| b).count(), "{what}: kept_assignments");
    ensure_eq!(r.kept_assignments + r.dropped_assignments, r.active_tokens * k, "{what}: kept + dropped");
    Ok(())
}
