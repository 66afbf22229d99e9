//! The exact balanced assignment: n tokens to E experts, exactly `n / E` tokens
//! per expert, maximizing the total score (a transportation problem with E
//! sinks; BASE layers, Lewis et al. 2021, solve it approximately).
//!
//! Successive shortest augmenting paths, one token at a time (the Hungarian
//! method's row-by-row form, Jonker and Volgenant 1987), on the E-node exchange
//! graph: inserting token t into expert `e1` may push one of `e1`'s tokens to
//! `e2`, one of those to `e3`, ..., until an expert with room. The cost of the
//! edge `a -> b` is the smallest loss of moving a token of a to b,
//! `min over t' in a of (s[t', a] - s[t', b])`, kept as the top of a max-heap
//! of the gains `s[t', b] - s[t', a]` per pair (a, b). Dual potentials make the
//! reduced costs non-negative, so each insertion is a dense Dijkstra over E
//! nodes plus a sink: O(E^2) per token, O(T E^2 + moves * E log T) in all.
//! After every insertion the assignment is optimal for the tokens inserted so
//! far (each sits at an argmax of `s[t, e] - p_e` for the prices
//! `p = -potential`), so after the last one it is optimal for all.
//!
//! Ties are broken deterministically: Dijkstra settles the expert of lower
//! index first among equal distances, the path ends at the lower-index expert
//! with room among equal ones, and an exchange moves the lower-index token
//! among equal gains. Arithmetic is float64 (exact on float32 input); reduced
//! costs that rounding makes slightly negative are taken as 0.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// A gain with a total order, and the token that has it (lower token first on ties).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Gain {
    value: f64,
    token: u32,
}

impl Eq for Gain {}

impl Ord for Gain {
    fn cmp(&self, other: &Self) -> Ordering {
        self.value.total_cmp(&other.value).then_with(|| other.token.cmp(&self.token))
    }
}

impl PartialOrd for Gain {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

const NONE: u32 = u32::MAX;

/// Why no balanced assignment exists: the first token that could not be
/// placed (its finite scores all point at experts that are full and cannot
/// pass a token on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Infeasible {
    pub token: usize,
}

struct Exchange<'a> {
    scores: &'a [f64],
    experts: usize,
    share: usize,
    assigned: Vec<u32>,
    counts: Vec<usize>,
    /// `[E * E]` gains of moving a token of `a` to `b`, at `a * E + b`; stale
    /// entries (tokens that left `a`) are dropped when they reach the top.
    heaps: Vec<BinaryHeap<Gain>>,
    /// `[E * E]` the valid top gain of each heap (`-inf` when empty) and its token.
    best_gain: Vec<f64>,
    best_token: Vec<u32>,
    potential: Vec<f64>,
    sink_potential: f64,
    dist: Vec<f64>,
    pred: Vec<u32>,
    settled: Vec<bool>,
}

impl<'a> Exchange<'a> {
    fn score(&self, token: usize, expert: usize) -> f64 {
        self.scores[token * self.experts + expert]
    }

    /// Enter `token` into `expert`'s exchange heaps.
    fn push(&mut self, token: usize, expert: usize) {
        let e = self.experts;
        let here = self.score(token, expert);
        for b in (0..e).filter(|&b| b != expert) {
            let to = self.score(token, b);
            if to != f64::NEG_INFINITY {
                self.heaps[expert * e + b].push(Gain { value: to - here, token: token as u32 });
            }
        }
    }

    /// Recompute the valid tops of `expert`'s heaps.
    fn refresh(&mut self, expert: usize) {
        let e = self.experts;
        for b in 0..e {
            let heap = &mut self.heaps[expert * e + b];
            while heap.peek().is_some_and(|g| self.assigned[g.token as usize] != expert as u32) {
                heap.pop();
            }
            let top = heap.peek().copied().unwrap_or(Gain { value: f64::NEG_INFINITY, token: NONE });
            self.best_gain[expert * e + b] = top.value;
            self.best_token[expert * e + b] = top.token;
        }
    }

    /// Insert `token` along a shortest augmenting path.
    fn insert(&mut self, token: usize) -> Result<(), Infeasible> {
        let e = self.experts;
        let sink = e;
        for x in 0..e {
            let s = self.score(token, x);
            self.dist[x] = if s == f64::NEG_INFINITY { f64::INFINITY } else { -s - self.potential[x] };
            self.pred[x] = NONE;
        }
        self.dist[sink] = f64::INFINITY;
        self.pred[sink] = NONE;
        self.settled.fill(false);
        loop {
            let (mut next, mut low) = (sink, f64::INFINITY);
            for v in 0..=sink {
                if !self.settled[v] && self.dist[v] < low {
                    next = v;
                    low = self.dist[v];
                }
            }
            if self.dist[next] == f64::INFINITY {
                return Err(Infeasible { token });
            }
            self.settled[next] = true;
            if next == sink {
                break;
            }
            let a = next;
            let da = self.dist[a];
            if self.counts[a] < self.share {
                let nd = da + (self.potential[a] - self.sink_potential).max(0.0);
                if nd < self.dist[sink] {
                    self.dist[sink] = nd;
                    self.pred[sink] = a as u32;
                }
            }
            // An empty heap has gain -inf: its edge never improves a distance.
            let pa = self.potential[a];
            let gains = &self.best_gain[a * e..(a + 1) * e];
            for (b, &gain) in gains.iter().enumerate() {
                let nd = da + (pa - self.potential[b] - gain).max(0.0);
                if nd < self.dist[b] && !self.settled[b] {
                    self.dist[b] = nd;
                    self.pred[b] = a as u32;
                }
            }
        }
        let reach = self.dist[sink];
        for x in 0..e {
            self.potential[x] += self.dist[x].min(reach);
        }
        self.sink_potential += reach;

        // Walk back from the sink: each edge a -> b moves best(a, b)'s token.
        let mut path = Vec::new();
        let mut b = self.pred[sink] as usize;
        self.counts[b] += 1;
        while self.pred[b] != NONE {
            let a = self.pred[b] as usize;
            let moved = self.best_token[a * e + b] as usize;
            path.push((moved, b));
            b = a;
        }
        path.push((token, b));
        for &(t, to) in &path {
            self.assigned[t] = to as u32;
        }
        for &(t, to) in &path {
            self.push(t, to);
        }
        for &(_, to) in &path {
            self.refresh(to);
        }
        Ok(())
    }
}

/// The expert of each of the `scores.len() / experts` tokens (row-major
/// `[n, E]` scores; `-inf` marks an expert the token may not use) in an
/// assignment with exactly `n / E` tokens per expert and the largest total
/// score. `n` must be a multiple of `experts`.
pub(crate) fn solve_exact(scores: &[f64], experts: usize) -> Result<Vec<u32>, Infeasible> {
    let n = scores.len() / experts;
    let mut x = Exchange {
        scores,
        experts,
        share: n / experts,
        assigned: vec![NONE; n],
        counts: vec![0; experts],
        heaps: (0..experts * experts).map(|_| BinaryHeap::new()).collect(),
        best_gain: vec![f64::NEG_INFINITY; experts * experts],
        best_token: vec![NONE; experts * experts],
        potential: vec![0.0; experts],
        sink_potential: 0.0,
        dist: vec![0.0; experts + 1],
        pred: vec![NONE; experts + 1],
        settled: vec![false; experts + 1],
    };
    for token in 0..n {
        x.insert(token)?;
    }
    Ok(x.assigned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total(scores: &[f64], e: usize, assigned: &[u32]) -> f64 {
        assigned.iter().enumerate().map(|(t, &x)| scores[t * e + x as usize]).sum()
    }

    /// Every assignment with `share` tokens per expert, by enumeration.
    fn brute_force(scores: &[f64], e: usize) -> f64 {
        let n = scores.len() / e;
        let share = n / e;
        let mut best = f64::NEG_INFINITY;
        let mut pick = vec![0usize; n];
        loop {
            let mut counts = vec![0; e];
            pick.iter().for_each(|&x| counts[x] += 1);
            if counts.iter().all(|&c| c == share) {
                best = best.max(pick.iter().enumerate().map(|(t, &x)| scores[t * e + x]).sum());
            }
            let mut i = 0;
            while i < n && pick[i] == e - 1 {
                pick[i] = 0;
                i += 1;
            }
            if i == n {
                return best;
            }
            pick[i] += 1;
        }
    }

    #[test]
    fn matches_enumeration() {
        let mut state = 12345u64;
        for case in 0..60 {
            let e = 2 + case % 3;
            let n = e * (1 + (case / 3) % 2);
            let scores: Vec<f64> = (0..n * e)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((state >> 40) % 7) as f64 - 3.0
                })
                .collect();
            let assigned = solve_exact(&scores, e).unwrap();
            let mut counts = vec![0; e];
            assigned.iter().for_each(|&x| counts[x as usize] += 1);
            assert!(counts.iter().all(|&c| c == n / e), "{counts:?}");
            assert_eq!(total(&scores, e, &assigned), brute_force(&scores, e), "case {case}");
        }
    }

    #[test]
    fn respects_ineligible_experts() {
        let ninf = f64::NEG_INFINITY;
        // Both tokens prefer expert 0; token 0 may only use expert 0.
        let scores = [1.0, ninf, 5.0, 0.0];
        assert_eq!(solve_exact(&scores, 2).unwrap(), vec![0, 1]);
        let impossible = [1.0, ninf, 2.0, ninf];
        assert_eq!(solve_exact(&impossible, 2), Err(Infeasible { token: 1 }));
    }

    #[test]
    fn equal_scores_fill_experts_in_order() {
        assert_eq!(solve_exact(&[0.0; 18], 3).unwrap(), vec![0, 0, 1, 1, 2, 2]);
    }
}
