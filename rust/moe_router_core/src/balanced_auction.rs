//! fairseq's approximate balanced assignment (BASE layers, Lewis et al. 2021;
//! `fairseq/clib/libbase/balanced_assignment.cpp`), step for step, in the
//! scores' own precision.
//!
//! An auction (Bertsekas) in which each of the E experts ("workers") wants
//! `jpw = n / E` tokens ("jobs"). Each round every expert bids on its `jpw`
//! best tokens by value `score - price`, each bid `top_j - top_{jpw+1} + eps`,
//! `eps = max(1e-4, (max - min) / 50)`; in rounds 1 to 99 a round's winners
//! bid `eps` again on what they won (the bid replaces their ordinary one), and
//! the value of a won token is raised to the largest score, so it stays in its
//! winner's top `jpw`. Every token's highest bidder (lower expert on ties) wins
//! it and its price rises by that bid. The auction ends in the first round in
//! which every token has a bid. From round 100 on, a won token's value is reset
//! to its bare score instead (fairseq's "suboptimal approximation that
//! converges quickly"). Result: each expert's top `jpw` tokens of the last round.
//!
//! `torch.topk` leaves the order of equal values unspecified; here equal values
//! rank by lower token index. Non-finite scores must have been replaced by the
//! caller (fairseq's `base_layer.py` replaces them by the smallest finite score).

use std::ops::{Add, Div, Sub};

use rayon::prelude::*;

/// The arithmetic the auction does, in float32 or float64 as fairseq does it
/// in the scores' dtype.
pub(crate) trait AuctionFloat:
    Copy + Send + Sync + PartialOrd + Add<Output = Self> + Sub<Output = Self> + Div<Output = Self>
{
    fn of(value: f64) -> Self;
    fn zero() -> Self;
    fn total_cmp(&self, other: &Self) -> std::cmp::Ordering;
}

impl AuctionFloat for f32 {
    fn of(value: f64) -> Self {
        value as f32
    }
    fn zero() -> Self {
        0.0
    }
    fn total_cmp(&self, other: &Self) -> std::cmp::Ordering {
        f32::total_cmp(self, other)
    }
}

impl AuctionFloat for f64 {
    fn of(value: f64) -> Self {
        value
    }
    fn zero() -> Self {
        0.0
    }
    fn total_cmp(&self, other: &Self) -> std::cmp::Ordering {
        f64::total_cmp(self, other)
    }
}

/// Rounds in which winners keep their bids and their tokens' raised values.
const EXACT_ROUNDS: usize = 100;

/// The auction did not end within `rounds` rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NotConverged {
    pub rounds: usize,
}

/// Each expert's `n / E` tokens (expert-major `[E, n / E]`, each expert's in
/// descending value order) for finite row-major `[n, E]` scores, `n` a
/// multiple of E. The result may name a token twice (and miss another) if
/// tied values move a won token out of its winner's top `jpw`: the caller checks.
pub(crate) fn fairseq_auction<F: AuctionFloat>(scores: &[F], experts: usize) -> Result<Vec<u32>, NotConverged> {
    let n = scores.len() / experts;
    let jpw = n / experts;
    if n == 0 || experts == 1 {
        // fairseq's top-(jpw + 1) of jpw values fails there; one expert takes every token.
        return Ok((0..n as u32).collect());
    }
    // Worker-major, as the C++ transposes.
    let worker: Vec<F> = (0..experts * n).map(|i| scores[(i % n) * experts + i / n]).collect();
    let (mut min, mut max) = (worker[0], worker[0]);
    for &v in &worker {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    let mut eps = (max - min) / F::of(50.0);
    if eps < F::of(1e-4) {
        eps = F::of(1e-4);
    }
    let mut value = worker.clone();
    let mut cost = vec![F::zero(); n];
    // Expert-major `[E, jpw + 1]` top tokens of the round.
    let mut top = vec![0u32; experts * (jpw + 1)];
    // The previous round's winner of each token, or none.
    let mut winner: Vec<Option<u32>> = vec![None; n];
    let mut high: Vec<(F, u32)> = vec![(F::zero(), 0); n];
    // Whether the token's previous winner bid on it again from its top jpw.
    let mut kept = vec![false; n];
    // Bound the loop: fairseq's has none, but never needed near this many rounds.
    let limit = EXACT_ROUNDS + 64 * n + 64;
    for round in 0..limit {
        top.par_chunks_mut(jpw + 1).zip(value.par_chunks(n)).for_each(|(best, row)| top_tokens(row, best));
        high.fill((F::zero(), 0));
        let retain = round > 0 && round < EXACT_ROUNDS;
        let mut offer = |bid: F, w: u32, j: usize| {
            let (b, who) = high[j];
            if bid > b || (bid == b && bid > F::zero() && w < who) {
                high[j] = (bid, w);
            }
        };
        kept.fill(false);
        for w in 0..experts {
            let best = &top[w * (jpw + 1)..(w + 1) * (jpw + 1)];
            let row = &value[w * n..(w + 1) * n];
            let floor = row[best[jpw] as usize];
            for &j in &best[..jpw] {
                let j = j as usize;
                let bid = if retain && winner[j] == Some(w as u32) {
                    kept[j] = true;
                    eps
                } else {
                    (row[j] - floor) + eps
                };
                offer(bid, w as u32, j);
            }
        }
        if retain {
            // Kept bids on won tokens now outside their winner's top jpw.
            for (j, who) in winner.iter().enumerate() {
                if let Some(w) = *who {
                    if !kept[j] {
                        offer(eps, w, j);
                    }
                }
            }
        }
        if high.iter().all(|&(b, _)| b > F::zero()) {
            let mut out = Vec::with_capacity(n);
            for w in 0..experts {
                out.extend_from_slice(&top[w * (jpw + 1)..w * (jpw + 1) + jpw]);
            }
            return Ok(out);
        }
        for (c, &(b, _)) in cost.iter_mut().zip(&high) {
            *c = *c + b;
        }
        value.par_chunks_mut(n).zip(worker.par_chunks(n)).for_each(|(v, s)| {
            for ((v, &s), &c) in v.iter_mut().zip(s).zip(&cost) {
                *v = s - c;
            }
        });
        for (j, &(b, w)) in high.iter().enumerate() {
            winner[j] = (b > F::zero()).then_some(w);
            if b > F::zero() {
                let at = w as usize * n + j;
                value[at] = if round < EXACT_ROUNDS { max } else { worker[at] };
            }
        }
    }
    Err(NotConverged { rounds: limit })
}

/// The `best.len()` tokens of largest value in `row`, in descending value
/// order (lower token first among equal values).
fn top_tokens<F: AuctionFloat>(row: &[F], best: &mut [u32]) {
    let m = best.len();
    let order = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    if m < idx.len() {
        idx.select_nth_unstable_by(m - 1, order);
        idx.truncate(m);
    }
    idx.sort_unstable_by(order);
    best[..idx.len()].copy_from_slice(&idx);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clear_preferences_win_in_one_round() {
        // Token 0 and 2 prefer expert 0, tokens 1 and 3 expert 1.
        let scores = [3.0f32, 0.0, 0.0, 3.0, 2.0, 1.0, 1.0, 2.0];
        assert_eq!(fairseq_auction(&scores, 2).unwrap(), vec![0, 2, 1, 3]);
    }

    #[test]
    fn contested_token_goes_to_the_higher_bid() {
        // Both experts want token 0 most; expert 1 loses more without it.
        let scores = [1.0f64, 5.0, 0.9, 0.0];
        let out = fairseq_auction(&scores, 2).unwrap();
        assert_eq!(out, vec![1, 0]);
    }

    #[test]
    fn every_token_once_and_deterministic() {
        let scores: Vec<f32> = (0..64 * 4).map(|i| ((i * 37 + i / 5) % 23) as f32 * 0.25 - 2.0).collect();
        let out = fairseq_auction(&scores, 4).unwrap();
        let mut seen = out.clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..64).collect::<Vec<u32>>());
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        assert_eq!(pool.install(|| fairseq_auction(&scores, 4).unwrap()), out);
    }
}
