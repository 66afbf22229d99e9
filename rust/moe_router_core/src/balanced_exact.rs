//! The exact balanced assignment: n tokens to E experts, k distinct experts per
//! token and exactly `n * k / E` tokens per expert, maximizing the total score
//! (a transportation problem with E sinks and unit arcs; BASE layers, Lewis et
//! al. 2021, solve the k = 1 case approximately).
//!
//! Successive shortest augmenting paths, one unit (token, choice) at a time
//! (the Hungarian method's row-by-row form, Jonker and Volgenant 1987), on the
//! E-node exchange graph: giving token t expert `e1` (one it does not have yet)
//! may push one of `e1`'s tokens to `e2`, one of those to `e3`, ..., until an
//! expert with room. The cost of the edge `a -> b` is the smallest loss of
//! moving a token of a that b does not have yet to b,
//! `min over such t' of (s[t', a] - s[t', b])`, kept as the top of a max-heap
//! of the gains `s[t', b] - s[t', a]` per pair (a, b). Dual potentials make the
//! reduced costs non-negative, so each insertion is a dense Dijkstra over E
//! nodes plus a sink: O(E^2) per token, O(T E^2 + moves * E log T) in all.
//! After every insertion the assignment is optimal for the units inserted so
//! far (each token's experts are the argmax set of `s[t, e] - p_e` for the
//! prices `p = -potential`), so after the last one it is optimal for all.
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
    top_k: usize,
    share: usize,
    /// `[n, k]` each token's experts (`NONE` for units not yet placed).
    assigned: Vec<u32>,
    counts: Vec<usize>,
    /// `[E * E]` gains of moving a token of `a` to `b`, at `a * E + b`; stale
    /// entries (tokens no longer in `a`, or already in `b`) are dropped when
    /// they reach the top.
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

    fn holds(&self, token: usize, expert: usize) -> bool {
        self.assigned[token * self.top_k..(token + 1) * self.top_k].contains(&(expert as u32))
    }

    /// Offer the move of `token` from `from` to `to` in their exchange heap.
    fn offer(&mut self, token: usize, from: usize, to: usize) {
        let gain = self.score(token, to) - self.score(token, from);
        if gain != f64::NEG_INFINITY {
            self.heaps[from * self.experts + to].push(Gain { value: gain, token: token as u32 });
        }
    }

    /// `token` has just entered `expert` (leaving `left`, if any): the moves
    /// that became possible enter their heaps.
    fn push(&mut self, token: usize, expert: usize, left: Option<usize>) {
        for b in 0..self.experts {
            if !self.holds(token, b) {
                self.offer(token, expert, b);
            }
        }
        if let Some(left) = left {
            for j in 0..self.top_k {
                let c = self.assigned[token * self.top_k + j] as usize;
                if c != expert {
                    self.offer(token, c, left);
                }
            }
        }
    }

    /// Recompute the valid tops of `expert`'s heaps.
    fn refresh(&mut self, expert: usize) {
        let e = self.experts;
        for b in 0..e {
            let heap = &mut self.heaps[expert * e + b];
            let k = self.top_k;
            let assigned = &self.assigned;
            let holds = |t: u32, x: usize| assigned[t as usize * k..(t as usize + 1) * k].contains(&(x as u32));
            while heap.peek().is_some_and(|g| !holds(g.token, expert) || holds(g.token, b)) {
                heap.pop();
            }
            let top = heap.peek().copied().unwrap_or(Gain { value: f64::NEG_INFINITY, token: NONE });
            self.best_gain[expert * e + b] = top.value;
            self.best_token[expert * e + b] = top.token;
        }
    }

    /// Give `token` its unit `unit` (its experts so far are units `0..unit`)
    /// along a shortest augmenting path.
    fn insert(&mut self, token: usize, unit: usize) -> Result<(), Infeasible> {
        let e = self.experts;
        let sink = e;
        for x in 0..e {
            let s = self.score(token, x);
            let open = s != f64::NEG_INFINITY && !self.holds(token, x);
            self.dist[x] = if open { -s - self.potential[x] } else { f64::INFINITY };
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
            path.push((moved, a, b));
            b = a;
        }
        path.push((token, NONE as usize, b));
        for &(t, from, to) in &path {
            let k = self.top_k;
            let slot = self.assigned[t * k..(t + 1) * k].iter().position(|&x| x == from as u32).unwrap_or(unit);
            self.assigned[t * k + slot] = to as u32;
        }
        for &(t, from, to) in &path {
            self.push(t, to, (from != NONE as usize).then_some(from));
        }
        // Rows whose valid tops may have changed: the experts a moved token left
        // or holds.
        let mut rows: Vec<u32> = path.iter().map(|&(_, from, _)| from as u32).collect();
        for &(t, _, _) in &path {
            rows.extend_from_slice(&self.assigned[t * self.top_k..(t + 1) * self.top_k]);
        }
        rows.sort_unstable();
        rows.dedup();
        for x in rows.into_iter().filter(|&x| x != NONE) {
            self.refresh(x as usize);
        }
        Ok(())
    }
}

/// The `top_k` distinct experts of each of the `scores.len() / experts`
/// tokens (row-major `[n, E]` scores; `-inf` marks an expert the token may not
/// use), as `[n, k]` in the order they were given, in an assignment with
/// exactly `n * k / E` tokens per expert and the largest total score.
/// `n * k` must be a multiple of `experts`.
pub(crate) fn solve_exact(scores: &[f64], experts: usize, top_k: usize) -> Result<Vec<u32>, Infeasible> {
    let n = scores.len() / experts;
    let mut x = Exchange {
        scores,
        experts,
        top_k,
        share: n * top_k / experts,
        assigned: vec![NONE; n * top_k],
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
        for unit in 0..top_k {
            x.insert(token, unit)?;
        }
    }
    Ok(x.assigned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total(scores: &[f64], e: usize, assigned: &[u32], k: usize) -> f64 {
        assigned.iter().enumerate().map(|(i, &x)| scores[i / k * e + x as usize]).sum()
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
            let assigned = solve_exact(&scores, e, 1).unwrap();
            let mut counts = vec![0; e];
            assigned.iter().for_each(|&x| counts[x as usize] += 1);
            assert!(counts.iter().all(|&c| c == n / e), "{counts:?}");
            assert_eq!(total(&scores, e, &assigned, 1), brute_force_k(&scores, e, 1), "case {case}");
        }
    }

    #[test]
    fn respects_ineligible_experts() {
        let ninf = f64::NEG_INFINITY;
        // Both tokens prefer expert 0; token 0 may only use expert 0.
        let scores = [1.0, ninf, 5.0, 0.0];
        assert_eq!(solve_exact(&scores, 2, 1).unwrap(), vec![0, 1]);
        let impossible = [1.0, ninf, 2.0, ninf];
        assert_eq!(solve_exact(&impossible, 2, 1), Err(Infeasible { token: 1 }));
    }

    #[test]
    fn equal_scores_fill_experts_in_order() {
        assert_eq!(solve_exact(&[0.0; 18], 3, 1).unwrap(), vec![0, 0, 1, 1, 2, 2]);
    }

    /// The best total over assignments of k distinct experts per token with
    /// `n * k / E` tokens per expert, by enumeration of each token's k-subsets.
    fn brute_force_k(scores: &[f64], e: usize, k: usize) -> f64 {
        let n = scores.len() / e;
        let subsets: Vec<u32> = (0..1u32 << e).filter(|m| m.count_ones() as usize == k).collect();
        let mut best = f64::NEG_INFINITY;
        let mut pick = vec![0usize; n];
        loop {
            let mut counts = vec![0; e];
            let mut sum = 0.0;
            for (t, &p) in pick.iter().enumerate() {
                for (x, c) in counts.iter_mut().enumerate().filter(|(x, _)| subsets[p] >> x & 1 == 1) {
                    *c += 1;
                    sum += scores[t * e + x];
                }
            }
            if counts.iter().all(|&c| c == n * k / e) {
                best = best.max(sum);
            }
            let mut i = 0;
            while i < n && pick[i] == subsets.len() - 1 {
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
    fn distinct_experts_per_token_match_enumeration() {
        let mut state = 99u64;
        for case in 0..40 {
            let (e, k, n) = [(3, 2, 3), (4, 2, 4), (4, 3, 4), (4, 2, 6), (5, 2, 5)][case % 5];
            let scores: Vec<f64> = (0..n * e)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((state >> 40) % 9) as f64 - 4.0
                })
                .collect();
            let assigned = solve_exact(&scores, e, k).unwrap();
            let mut counts = vec![0; e];
            for row in assigned.chunks(k) {
                let mut r = row.to_vec();
                r.sort_unstable();
                r.dedup();
                assert_eq!(r.len(), k, "case {case}: {row:?}");
                row.iter().for_each(|&x| counts[x as usize] += 1);
            }
            assert!(counts.iter().all(|&c| c == n * k / e), "{counts:?}");
            assert_eq!(total(&scores, e, &assigned, k), brute_force_k(&scores, e, k), "case {case}");
        }
    }
}
