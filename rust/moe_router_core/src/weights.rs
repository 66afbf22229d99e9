//! Combine weights of one token: its chosen scores, optionally normalized over
//! the chosen experts (pass 1), and optionally renormalized over the kept ones
//! after drops (pass 3).
//!
//! Both normalizations are exact where the result is representable, whatever
//! the logits: when the chosen scores are so small that their float64 values
//! lose precision (a selection bias can choose experts whose softmax score is
//! subnormal or 0, at a logit gap of about 710 or more), the weights are
//! computed from the scores' logarithms, relative to the largest chosen one:
//! `w_j = scale * exp(l_j - l_max) / sum_i exp(l_i - l_max)`. The sum is then
//! in `[1, k]`, so no tiny sum is ever divided into an overflow. On ordinary
//! inputs the plain quotient `score_j / sum` is used: it is cheaper, and there
//! both give the same float32.

use crate::config::{Overflow, RouterConfig, ScoreFunction};
use crate::math::exp_f64;
use crate::score::log_score;

/// Largest chosen score (as the row's score buffer holds it) below which the
/// pass-1 normalization works from logarithms. Above it the scores are normal
/// float64 values, `weight_scale / sum` is finite, and a chosen score that is
/// subnormal has a weight below 2^-290, which float32 holds as 0 either way.
const PLAIN_QUOTIENT_FLOOR: f64 = f64::from_bits((1023 - 600) << 52); // 2^-600

/// Smallest normal float32: a pre-drop weight below it is stored with less than
/// 24 bits of precision (or as 0).
const F32_NORMAL: f64 = f32::MIN_POSITIVE as f64;

/// Renormalization after drops is computed from logarithms when it would scale
/// the kept float32 weights up by more than this and one of them is below
/// `F32_NORMAL`; up to this factor their rounding stays within one float32
/// step of the result.
const MAX_PLAIN_RENORMALIZATION: f64 = 2.0;

/// Replace log-weights by normalized weights, in place: `l_j` becomes
/// `scale * exp(l_j - m) / sum_i exp(l_i - m)` with `m = max_i l_i`, so the
/// largest term is 1 and the sum is in `[1, n]`. Entries of `-inf` (not routed,
/// or weight 0) become 0; all of them `-inf` gives all 0.
pub(crate) fn normalize_log_weights(logs: &mut [f64], scale: f64) {
    let m = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        logs.fill(0.0);
        return;
    }
    let mut sum = 0.0;
    for l in logs.iter_mut() {
        *l = exp_f64(*l - m);
        sum += *l;
    }
    let factor = scale / sum;
    for l in logs.iter_mut() {
        *l *= factor;
    }
}

/// One token's chosen experts as pass 1 scores them.
pub(crate) struct Chosen<'a> {
    /// The score function of the row.
    pub function: ScoreFunction,
    /// The row's logits as scored (probabilities for `Probabilities`), length E.
    pub logits: &'a [f64],
    /// The row's score buffer: `score_e = buffer[e] * scale`.
    pub buffer: &'a [f64],
    /// See `buffer`.
    pub scale: f64,
    /// The k chosen experts, by rank.
    pub experts: &'a [i32],
    /// Which of them are routed (eligible).
    pub routed: &'a [bool],
}

impl Chosen<'_> {
    /// Log-weights of the k choices (`-inf` where not routed) into `out`.
    fn log_weights(&self, out: &mut [f64]) {
        for ((o, &x), &r) in out.iter_mut().zip(self.experts).zip(self.routed) {
            *o = if r { log_score(self.function, self.logits[x as usize]) } else { f64::NEG_INFINITY };
        }
    }
}

/// The tokens whose pre-drop weights float32 holds with less than full
/// precision, where a later step would scale that error up (renormalization
/// after drops, or a reroute by a factor above 1): one chunk's tokens in
/// order, with k log-weights (`-inf` where not routed) and k unrounded
/// weights each, by rank.
#[derive(Debug, Clone, Default)]
pub(crate) struct TinyWeights {
    tokens: Vec<usize>,
    log_weights: Vec<f64>,
    unrounded: Vec<f64>,
}

impl TinyWeights {
    /// The unrounded pre-drop weight of `token`'s choice of rank `rank`, if recorded.
    pub(crate) fn unrounded(&self, token: usize, rank: usize, k: usize) -> Option<f64> {
        let at = self.tokens.binary_search(&token).ok()?;
        self.unrounded.get(at * k + rank).copied()
    }
}

/// A walk through one chunk's `TinyWeights`, asked for tokens in increasing order.
pub(crate) struct Recorded<'a> {
    tiny: &'a TinyWeights,
    cursor: usize,
}

impl<'a> Recorded<'a> {
    pub(crate) fn new(tiny: &'a TinyWeights) -> Self {
        Recorded { tiny, cursor: 0 }
    }

    /// The k log-weights of `token`, if it was recorded.
    fn find(&mut self, token: usize, k: usize) -> Option<&'a [f64]> {
        let tokens = &self.tiny.tokens;
        while self.cursor < tokens.len() && tokens[self.cursor] < token {
            self.cursor += 1;
        }
        let at = self.cursor;
        (tokens.get(at) == Some(&token)).then(|| &self.tiny.log_weights[at * k..(at + 1) * k])
    }
}

/// Whether pass 1 records the tokens whose weights float32 holds imprecisely
/// (`TinyWeights`): only a later step that scales weights up reads them.
pub(crate) fn records_tiny_weights(options: &RouterConfig) -> bool {
    options.renormalize_after_drop || (options.overflow == Overflow::Reroute && options.reroute_weight_scale > 1.0)
}

/// The factor of the plain quotient (`weight = buffer value * factor`) when
/// normalization over the chosen experts works from the scores themselves:
/// their largest buffer value `top` is at least `PLAIN_QUOTIENT_FLOOR`, or
/// there is no normalization. `sum` is the routed buffer values' sum in rank
/// order, `scale` the row's. `None` where the logarithms are needed.
#[inline(always)]
pub(crate) fn plain_factor(options: &RouterConfig, sum: f64, top: f64, scale: f64) -> Option<f64> {
    if !options.normalize_weights {
        Some(options.weight_scale * scale)
    } else if top < PLAIN_QUOTIENT_FLOOR {
        None
    } else if sum > 0.0 {
        Some(options.weight_scale / sum)
    } else {
        Some(0.0)
    }
}

/// Pass 1: the weights of one token's choices into `weights` (0 where not
/// routed): the scores, divided by their sum with `normalize_weights` (0 when
/// no choice is routed), times `weight_scale`. `logs` is scratch of length k.
/// With `renormalize_after_drop`, or a reroute by a factor above 1, a token
/// whose weights (or rerouted weights) float32 holds with less than full
/// precision is recorded in `tiny`.
#[inline]
pub(crate) fn write_weights(
    options: &RouterConfig,
    token: usize,
    chosen: &Chosen,
    weights: &mut [f32],
    logs: &mut [f64],
    tiny: &mut TinyWeights,
) {
    // The sum and the largest of the routed buffer values, which only normalization reads.
    let (mut sum, mut top) = (0.0f64, 0.0f64);
    if options.normalize_weights {
        for (&x, &r) in chosen.experts.iter().zip(chosen.routed) {
            if r {
                let s = chosen.buffer[x as usize];
                sum += s;
                top = top.max(s);
            }
        }
    }
    // The sum of the buffer values (scores / scale): normalization cancels
    // `scale`, so tiny scores are never divided by a subnormal sum.
    match plain_factor(options, sum, top, chosen.scale) {
        None => {
            chosen.log_weights(logs);
            normalize_log_weights(logs, options.weight_scale);
        }
        Some(factor) => {
            for ((l, &x), &r) in logs.iter_mut().zip(chosen.experts).zip(chosen.routed) {
                *l = if r { chosen.buffer[x as usize] * factor } else { 0.0 };
            }
        }
    }
    for (w, &v) in weights.iter_mut().zip(logs.iter()) {
        *w = v as f32;
    }
    if records_tiny_weights(options) {
        let rws = options.reroute_weight_scale;
        let reroute = options.overflow == Overflow::Reroute;
        // A rerouted weight is scaled by `reroute_weight_scale` first; 0 stays exact.
        let low = if reroute && rws > 0.0 { rws.min(1.0) } else { 1.0 };
        let imprecise = logs.iter().zip(chosen.routed).any(|(&v, &r)| r && v * low < F32_NORMAL);
        if imprecise {
            tiny.tokens.push(token);
            tiny.unrounded.extend_from_slice(logs);
            let at = tiny.log_weights.len();
            tiny.log_weights.resize(at + logs.len(), 0.0);
            chosen.log_weights(&mut tiny.log_weights[at..]);
        }
    }
}

/// The weight of an assignment moved by a reroute: its pre-drop weight `weight`
/// times `reroute_weight_scale`, from the unrounded pre-drop weight (when
/// recorded) if float32 holds `weight` only approximately and the factor, above
/// 1, would scale that error up.
pub(crate) fn rerouted_weight(options: &RouterConfig, weight: f32, unrounded: Option<f64>) -> f32 {
    let rws = options.reroute_weight_scale;
    let base = match unrounded {
        Some(v) if rws > 1.0 && f64::from(weight) < F32_NORMAL => v,
        _ => f64::from(weight),
    };
    // At most weight_scale * reroute_weight_scale <= f32::MAX (validated), but a
    // rounded float32 base can be one step above its value.
    ((base * rws) as f32).min(f32::MAX)
}

/// Pass 3: rescale the kept weights `w` of token `token` (`kept` flags,
/// `rerouted` flags or empty) to sum to `weight_scale`, from the float32
/// pre-drop weights (as DeepSpeed does); 0 when they sum to 0. When that would
/// scale a weight float32 holds only approximately (below its normal range) up
/// by more than 2, the token's recorded log-weights give the exact result
/// instead. `w` holds 0 for every assignment not kept.
pub(crate) fn renormalize_kept(
    options: &RouterConfig,
    token: usize,
    w: &mut [f32],
    kept: &[bool],
    rerouted: &[bool],
    recorded: &mut Recorded,
    logs: &mut [f64],
) {
    let scale = options.weight_scale;
    let mut sum = 0.0f64;
    let mut approximate = false;
    for (&x, &keep) in w.iter().zip(kept) {
        if keep {
            sum += f64::from(x);
            approximate |= f64::from(x) < F32_NORMAL;
        }
    }
    if approximate && sum * MAX_PLAIN_RENORMALIZATION < scale {
        if let Some(found) = recorded.find(token, w.len()) {
            // Relative to the largest kept log-score before the reroute factor is
            // added, so that a large logit does not absorb log(reroute_weight_scale).
            let top = found.iter().zip(kept).filter(|(_, &k)| k).map(|(&r, _)| r).fold(f64::NEG_INFINITY, f64::max);
            let log_rws = options.reroute_weight_scale.ln();
            for (j, (l, &r)) in logs.iter_mut().zip(found).enumerate() {
                *l = if !kept[j] {
                    f64::NEG_INFINITY
                } else if rerouted.get(j) == Some(&true) {
                    (r - top) + log_rws
                } else {
                    r - top
                };
            }
            normalize_log_weights(logs, scale);
            for (x, &v) in w.iter_mut().zip(logs.iter()) {
                *x = v as f32;
            }
            return;
        }
    }
    let factor = if sum != 0.0 { scale / sum } else { 0.0 };
    for x in w.iter_mut() {
        *x = (f64::from(*x) * factor) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chosen<'a>(function: ScoreFunction, logits: &'a [f64], buffer: &'a [f64], experts: &'a [i32]) -> Chosen<'a> {
        const ROUTED: [bool; 8] = [true; 8];
        Chosen { function, logits, buffer, scale: 1.0, experts, routed: &ROUTED[..experts.len()] }
    }

    #[test]
    fn gate_probabilities_too_small_for_a_plain_quotient_normalize_exactly() {
        // 2024 and 1 times the smallest subnormal: their ratio is exact, their float64 sum is not usable.
        let p = [1.0, 1e-320, 5e-324];
        let mut o = RouterConfig::new(3, 2);
        o.normalize_weights = true;
        let (mut w, mut logs, mut tiny) = ([0f32; 2], [0.0; 2], TinyWeights::default());
        write_weights(&o, 0, &chosen(ScoreFunction::Probabilities, &p, &p, &[1, 2]), &mut w, &mut logs, &mut tiny);
        assert_eq!(w, [(2024.0f64 / 2025.0) as f32, (1.0f64 / 2025.0) as f32]);
    }

    #[test]
    fn renormalization_of_weights_that_underflow_in_float32_is_exact() {
        // Softmax scores e^-120 and e^-121 (0 in float32), kept after their token's best choice was dropped.
        let z = [0.0, -120.0, -121.0];
        let buffer: Vec<f64> = z.iter().map(|v: &f64| v.exp()).collect();
        let mut o = RouterConfig::new(3, 2);
        o.renormalize_after_drop = true;
        o.weight_scale = 3.0;
        let (mut w, mut logs, mut tiny) = ([0f32; 2], [0.0; 2], TinyWeights::default());
        write_weights(&o, 7, &chosen(ScoreFunction::Softmax, &z, &buffer, &[1, 2]), &mut w, &mut logs, &mut tiny);
        assert_eq!(w, [0.0, 0.0]);
        renormalize_kept(&o, 7, &mut w, &[true, true], &[], &mut Recorded::new(&tiny), &mut logs);
        let e = (-1.0f64).exp();
        assert_eq!(w, [(3.0 / (1.0 + e)) as f32, (3.0 * e / (1.0 + e)) as f32]);
        // A token that was not recorded keeps the plain quotient (0 / 0 gives 0).
        let mut other = [0f32; 2];
        renormalize_kept(&o, 8, &mut other, &[true, true], &[], &mut Recorded::new(&tiny), &mut logs);
        assert_eq!(other, [0.0, 0.0]);
    }

    #[test]
    fn log_weights_normalize_across_any_gap() {
        // Gaps of 720 and 800: the scores underflow to a subnormal and to 0.
        let mut w = [80.0, 0.0, f64::NEG_INFINITY];
        normalize_log_weights(&mut w, 2.0);
        assert_eq!(w[2], 0.0);
        assert!((w[0] - 2.0).abs() < 1e-15 && (w[1] / 2.0 - (-80.0f64).exp()).abs() < 1e-48, "{w:?}");
        let mut none = [f64::NEG_INFINITY; 2];
        normalize_log_weights(&mut none, 1.0);
        assert_eq!(none, [0.0, 0.0]);
    }
}
