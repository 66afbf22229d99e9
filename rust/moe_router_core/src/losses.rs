//! Auxiliary losses, accumulated per chunk and reduced in chunk order.
//!
//! - `load_balance_loss = E * sum_e f_e * P_e` (Switch Transformer, Fedus et al. 2021,
//!   eq. 4; GShard; Megatron-Core `switch_load_balancing_loss_func` with its 1/k):
//!   `f_e` = fraction of the `T_active * k` choices routed to e (before capacity,
//!   after groups and bias), `P_e` = mean over active tokens of e's share of the
//!   token's score distribution. 1.0 when perfectly balanced, for any k.
//!   Hugging Face's `load_balancing_loss_func` equals k times this.
//! - `router_z_loss = mean_t logsumexp(z_t)^2` (ST-MoE, Zoph et al. 2022, eq. 5).
//! - sequence-level balance loss (DeepSeek-V3, Liu et al. 2024, eqs. 17-20): the
//!   load-balance loss of each sequence on its own, averaged over sequences.

use crate::block_lanes::add_scaled_lanes;
use crate::math::{add_scaled, ln_lanes, LANES};
use crate::score::RowScores;
use crate::simd::Simd;

/// Running sums of one chunk.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LossSums {
    /// Sum over active tokens of each token's score distribution, per expert.
    pub prob_sum: Vec<f64>,
    /// `sum_t lse_t^2` over active tokens.
    pub z_sum: f64,
    /// `sum_t lse_t^2 * 2^-64`: the same sum where `z_sum` overflows (each term
    /// is finite, T is below 2^31, so this one cannot).
    pub z_sum_scaled: f64,
    /// Active (unmasked) tokens.
    pub active: u64,
    /// Sum of the per-sequence balance losses of the sequences ending in this chunk.
    pub seq_loss_sum: f64,
    /// Sequences (with at least one active token) ending in this chunk.
    pub sequences: u64,
    /// Tokens whose z-loss term waits for its logarithm, taken for eight at
    /// once (one vector `ln` in place of eight scalar ones, the same bits).
    pending: PendingLse,
}

/// Up to `LANES` tokens' `(max, sum)` with `lse = max + ln(sum)`, in token order.
#[derive(Debug, Clone, PartialEq)]
struct PendingLse {
    max: [f64; LANES],
    sum: [f64; LANES],
    len: usize,
}

impl PendingLse {
    const EMPTY: PendingLse = PendingLse { max: [0.0; LANES], sum: [1.0; LANES], len: 0 };
}

impl LossSums {
    /// Zero sums for `experts` experts.
    pub fn new(experts: usize) -> Self {
        LossSums {
            prob_sum: vec![0.0; experts],
            z_sum: 0.0,
            z_sum_scaled: 0.0,
            active: 0,
            seq_loss_sum: 0.0,
            sequences: 0,
            pending: PendingLse::EMPTY,
        }
    }

    /// Add one active token whose scored row is `scores` (length E, read through `row`).
    #[inline]
    pub fn add_token(&mut self, simd: Simd, scores: &[f64], row: RowScores) {
        if row.prob_scale > 0.0 {
            add_scaled(simd, &mut self.prob_sum, row.prob_scale, scores);
        }
        self.count_token(simd, row);
    }

    /// [`LossSums::add_token`] for a token whose z-loss term is
    /// `(max + ln(sum))^2`, its `ln` taken later with seven others (by
    /// [`LossSums::finish`] at the latest; `row.z_term` is ignored). The caller
    /// guarantees the term is finite (`|max|` well below `sqrt(f64::MAX)`,
    /// `1 <= sum <= E`).
    #[inline]
    pub fn add_token_pending_lse(&mut self, simd: Simd, scores: &[f64], row: RowScores, max: f64, sum: f64) {
        if row.prob_scale > 0.0 {
            add_scaled(simd, &mut self.prob_sum, row.prob_scale, scores);
        }
        let p = &mut self.pending;
        p.max[p.len] = max;
        p.sum[p.len] = sum;
        p.len += 1;
        self.active += 1;
        if p.len == LANES {
            self.flush_lse(simd);
        }
    }

    /// Add the pending z-loss terms, in their order. Call once a chunk's
    /// tokens are all added, before the sums are read or merged.
    #[inline]
    pub fn finish(&mut self, simd: Simd) {
        if self.pending.len > 0 {
            self.flush_lse(simd);
        }
    }

    #[inline]
    fn flush_lse(&mut self, simd: Simd) {
        let p = &mut self.pending;
        let ln = ln_lanes(simd, &p.sum);
        for (&m, &l) in p.max.iter().zip(&ln).take(p.len) {
            let lse = m + l;
            let z_term = lse * lse;
            self.z_sum += z_term;
            self.z_sum_scaled += z_term * Z_SCALE;
        }
        // Unused lanes hold 1 (`ln` 0; any finite positive value would do) and
        // the emptied buffer compares equal to a new one.
        *p = PendingLse::EMPTY;
    }

    /// A token's z-loss term and count (after its score distribution), after
    /// the pending terms of the tokens before it.
    #[inline(always)]
    fn count_token(&mut self, simd: Simd, row: RowScores) {
        self.finish(simd);
        self.z_sum += row.z_term;
        self.z_sum_scaled += row.z_term * Z_SCALE;
        self.active += 1;
    }

    /// `add_token` for the eight tokens of an E = 8 block, in their order: their
    /// scores `st` are expert-major (a token per lane), every `prob_scale` positive.
    #[inline(always)]
    pub fn add_block(&mut self, simd: Simd, st: &[[f64; 8]; 8], rows: &[RowScores; 8]) {
        debug_assert!(rows.iter().all(|r| r.prob_scale > 0.0));
        if let Some(acc) = self.prob_sum.first_chunk_mut::<8>() {
            add_scaled_lanes(simd, acc, &rows.map(|r| r.prob_scale), st);
        }
        for &row in rows {
            self.count_token(simd, row);
        }
    }

    /// `P_e`: the mean over active tokens of each expert's share (0 when none is active).
    pub fn prob_mean(&self) -> Vec<f64> {
        self.prob_sum.iter().map(|&p| if self.active == 0 { 0.0 } else { p / self.active as f64 }).collect()
    }

    /// Add `other` (the next chunk) to these sums.
    pub fn merge(&mut self, other: &LossSums) {
        debug_assert!(self.pending.len == 0 && other.pending.len == 0, "merge of unfinished sums");
        for (a, b) in self.prob_sum.iter_mut().zip(&other.prob_sum) {
            *a += b;
        }
        self.z_sum += other.z_sum;
        self.z_sum_scaled += other.z_sum_scaled;
        self.active += other.active;
        self.seq_loss_sum += other.seq_loss_sum;
        self.sequences += other.sequences;
    }
}

/// `E * sum_e (routed_e / (T k)) * (prob_sum_e / T)`; 0 when no token is active.
pub(crate) fn load_balance_loss(routed_per_expert: &[u64], prob_sum: &[f64], active_tokens: u64, top_k: usize) -> f64 {
    if active_tokens == 0 {
        return 0.0;
    }
    let t = active_tokens as f64;
    let e = prob_sum.len() as f64;
    let dot: f64 = routed_per_expert.iter().zip(prob_sum).map(|(&n, &p)| n as f64 * p).sum();
    e * dot / (t * top_k as f64 * t)
}

/// `2^-64`, the factor of `LossSums::z_sum_scaled`.
const Z_SCALE: f64 = f64::from_bits((1023 - 64) << 52);

/// Mean of `lse^2`; 0 when no token is active. Finite whenever every term is:
/// a sum that overflows is taken from the scaled one (the mean is at most the
/// largest term).
pub(crate) fn router_z_loss(sums: &LossSums) -> f64 {
    let n = sums.active as f64;
    if sums.active == 0 {
        0.0
    } else if sums.z_sum.is_finite() {
        sums.z_sum / n
    } else {
        (sums.z_sum_scaled / n / Z_SCALE).min(f64::MAX)
    }
}

/// The sums of part of one sequence, for sequences that cross chunk boundaries.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SequencePart {
    /// Which sequence (token index / sequence length).
    pub sequence: usize,
    /// Routed assignments per expert in this part.
    pub counts: Vec<u64>,
    /// Score distributions summed over this part's active tokens.
    pub prob_sum: Vec<f64>,
    /// Active tokens in this part.
    pub active: u64,
}

impl SequencePart {
    fn add(&mut self, other: &SequencePart) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        for (a, b) in self.prob_sum.iter_mut().zip(&other.prob_sum) {
            *a += b;
        }
        self.active += other.active;
    }
}

/// Accumulates the sequences of one chunk (tokens arrive in order). A sequence
/// that lies wholly in the chunk adds its balance loss to the chunk's sums; the
/// parts of a sequence that crosses a chunk boundary are handed out as
/// `SequencePart`s, merged in chunk order by `merge_sequence_parts`, so the
/// chunking never depends on the sequence length.
#[derive(Debug, Clone)]
pub(crate) struct SequenceLoss {
    length: usize,
    top_k: usize,
    current: SequencePart,
    /// Whether the current sequence started inside this chunk.
    whole: bool,
    /// Parts of sequences that cross this chunk's boundaries, in order.
    pub parts: Vec<SequencePart>,
}

impl SequenceLoss {
    /// For sequences of `length` tokens, in a chunk starting at token `first_token`.
    pub fn new(length: usize, experts: usize, top_k: usize, first_token: usize) -> Self {
        let length = length.max(1);
        SequenceLoss {
            length,
            top_k,
            current: SequencePart {
                sequence: first_token / length,
                counts: vec![0; experts],
                prob_sum: vec![0.0; experts],
                active: 0,
            },
            whole: first_token.is_multiple_of(length),
            parts: Vec::new(),
        }
    }

    /// Add an active token's routed experts and scores.
    pub fn add_token(
        &mut self,
        simd: Simd,
        routed_experts: impl Iterator<Item = usize>,
        scores: &[f64],
        row: RowScores,
    ) {
        for e in routed_experts {
            self.current.counts[e] += 1;
        }
        if row.prob_scale > 0.0 {
            add_scaled(simd, &mut self.current.prob_sum, row.prob_scale, scores);
        }
        self.current.active += 1;
    }

    /// Call after every token (active or not) with its index; closes the
    /// sequence when `token` is its last.
    pub fn end_token(&mut self, token: usize, sums: &mut LossSums) {
        if !(token + 1).is_multiple_of(self.length) {
            return;
        }
        if self.whole {
            add_sequence(&self.current, self.top_k, sums);
        } else {
            self.parts.push(self.current.clone());
        }
        self.current.sequence = (token + 1) / self.length;
        self.current.counts.fill(0);
        self.current.prob_sum.fill(0.0);
        self.current.active = 0;
        self.whole = true;
    }

    /// Call after the chunk's last token `end - 1`: an unfinished sequence is a part.
    pub fn finish_chunk(&mut self, end: usize) {
        if !end.is_multiple_of(self.length) {
            self.parts.push(self.current.clone());
        }
    }
}

/// Add one complete sequence's balance loss (if it has active tokens).
fn add_sequence(sequence: &SequencePart, top_k: usize, sums: &mut LossSums) {
    if sequence.active > 0 {
        sums.seq_loss_sum += load_balance_loss(&sequence.counts, &sequence.prob_sum, sequence.active, top_k);
        sums.sequences += 1;
    }
}

/// Merge the parts of sequences that cross chunk boundaries (given in chunk
/// order) and add each merged sequence's loss.
pub(crate) fn merge_sequence_parts<'a>(
    parts: impl Iterator<Item = &'a SequencePart>,
    top_k: usize,
    sums: &mut LossSums,
) {
    let mut open: Option<SequencePart> = None;
    for part in parts {
        match &mut open {
            Some(seq) if seq.sequence == part.sequence => seq.add(part),
            _ => {
                if let Some(done) = open.take() {
                    add_sequence(&done, top_k, sums);
                }
                open = Some(part.clone());
            }
        }
    }
    if let Some(done) = open {
        add_sequence(&done, top_k, sums);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::math::ln_one;

    #[test]
    fn pending_logarithms_give_the_bits_of_immediate_ones_in_token_order() {
        // 29 tokens, some with an immediate term between pending ones, a
        // partial vector at the end: the sums must equal adding every term at once.
        for simd in Simd::all() {
            let (mut pending, mut immediate) = (LossSums::new(2), LossSums::new(2));
            let scores = [0.25, 0.75];
            for t in 0..29u32 {
                let max = f64::from(t) * 0.37 - 4.0;
                let sum = 1.0 + f64::from(t % 5) * 0.61;
                let lse = max + ln_one(simd, sum);
                let row = RowScores { z_term: lse * lse, scale: 1.0, prob_scale: 1.0 };
                immediate.add_token(simd, &scores, row);
                if t % 7 == 3 {
                    pending.add_token(simd, &scores, row);
                } else {
                    let unused = RowScores { z_term: f64::NAN, ..row };
                    pending.add_token_pending_lse(simd, &scores, unused, max, sum);
                }
            }
            pending.finish(simd);
            assert_eq!(pending.z_sum.to_bits(), immediate.z_sum.to_bits(), "{simd:?}");
            assert_eq!(pending.z_sum_scaled.to_bits(), immediate.z_sum_scaled.to_bits(), "{simd:?}");
            assert_eq!(pending, immediate, "{simd:?}");
        }
    }

    #[test]
    fn balanced_routing_gives_one_for_any_k() {
        // 4 tokens, 4 experts, uniform scores, every expert chosen k times in total.
        for k in [1usize, 2, 4] {
            let routed = vec![k as u64; 4];
            let prob_sum = vec![1.0; 4];
            assert!((load_balance_loss(&routed, &prob_sum, 4, k) - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn sequence_parts_merge_to_the_whole_sequence() {
        // One sequence of 6 tokens split over chunks [0, 4) and [4, 6): same loss as unsplit.
        let row = RowScores { z_term: 0.0, scale: 1.0, prob_scale: 1.0 };
        let tokens: Vec<(usize, [f64; 2])> =
            (0..6).map(|t| (t % 2, [0.25 + 0.1 * t as f64, 0.75 - 0.1 * t as f64])).collect();
        let mut whole = LossSums::new(2);
        let mut one = SequenceLoss::new(6, 2, 1, 0);
        for (t, (x, p)) in tokens.iter().enumerate() {
            one.add_token(Simd::current(), std::iter::once(*x), p, row);
            one.end_token(t, &mut whole);
        }
        let mut split = LossSums::new(2);
        let mut parts = Vec::new();
        for (start, end) in [(0usize, 4usize), (4, 6)] {
            let mut s = SequenceLoss::new(6, 2, 1, start);
            for (t, (x, p)) in tokens.iter().enumerate().take(end).skip(start) {
                s.add_token(Simd::current(), std::iter::once(*x), p, row);
                s.end_token(t, &mut split);
            }
            s.finish_chunk(end);
            parts.extend(s.parts);
        }
        merge_sequence_parts(parts.iter(), 1, &mut split);
        assert_eq!(whole.sequences, 1);
        assert_eq!(split.sequences, 1);
        assert!((whole.seq_loss_sum - split.seq_loss_sum).abs() < 1e-15);
    }

    #[test]
    fn empty_batch_has_zero_losses() {
        assert_eq!(load_balance_loss(&[0, 0], &[0.0, 0.0], 0, 1), 0.0);
        assert_eq!(router_z_loss(&LossSums::new(2)), 0.0);
    }

    #[test]
    fn z_loss_mean_stays_finite_when_the_sum_overflows() {
        let mut sums = LossSums::new(1);
        let row = RowScores { z_term: f64::MAX / 3.0, scale: 1.0, prob_scale: 0.0 };
        for _ in 0..6 {
            sums.add_token(Simd::current(), &[0.0], row);
        }
        assert_eq!(sums.z_sum, f64::INFINITY);
        let z = router_z_loss(&sums);
        assert!((z / (f64::MAX / 3.0) - 1.0).abs() < 1e-15, "{z}");
        let mut all_max = LossSums::new(1);
        for _ in 0..3 {
            all_max.add_token(Simd::current(), &[0.0], RowScores { z_term: f64::MAX, ..row });
        }
        assert_eq!(router_z_loss(&all_max), f64::MAX);
    }
}
