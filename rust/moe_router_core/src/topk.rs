//! Top-k selection on one token's keys, with the total order of the spec:
//! key descending, then expert index ascending (vLLM's kernels, `jax.lax.top_k`).
//!
//! A key of `-inf` marks an ineligible expert. If fewer than k experts are
//! eligible, the remaining choices are the lowest-index ineligible experts,
//! reported as not routed.

use crate::config::{GroupLimit, GroupScore};

/// Select the k best experts of `keys` into `experts` (by rank) and mark in
/// `routed` which choices are real (eligible). `best` is scratch of length k.
pub fn select_top_k(keys: &[f64], experts: &mut [i32], routed: &mut [bool], best: &mut [f64]) {
    let k = experts.len();
    best.fill(f64::NEG_INFINITY);
    let mut filled = 0usize;
    for (e, &key) in keys.iter().enumerate() {
        // Strictly greater: an equal key at a higher index loses the tie.
        if key > best[k - 1] {
            let mut pos = k - 1;
            while pos > 0 && key > best[pos - 1] {
                best[pos] = best[pos - 1];
                experts[pos] = experts[pos - 1];
                pos -= 1;
            }
            best[pos] = key;
            experts[pos] = e as i32;
            filled = (filled + 1).min(k);
        }
    }
    routed[..filled].fill(true);
    routed[filled..].fill(false);
    if filled < k {
        // Every eligible expert is already chosen: pad with ineligible ones, lowest index first.
        let mut slot = filled;
        for (e, &key) in keys.iter().enumerate() {
            if slot == k {
                break;
            }
            if key == f64::NEG_INFINITY {
                experts[slot] = e as i32;
                slot += 1;
            }
        }
    }
}

/// Group-limited routing: keep the `group_top_k` best groups (by `group_keys`,
/// ties to the lower group index) and set the keys of every other expert to `-inf`.
///
/// `group_keys` are the per-expert values a group is scored on (score plus
/// selection bias; `-inf` for ineligible experts). `group_scores` is scratch of
/// length `num_groups`.
pub fn limit_to_best_groups(limit: &GroupLimit, group_keys: &[f64], keys: &mut [f64], group_scores: &mut [f64]) {
    let size = keys.len() / limit.num_groups;
    for (g, score) in group_scores.iter_mut().enumerate() {
        let members = &group_keys[g * size..(g + 1) * size];
        *score = match limit.group_score {
            GroupScore::Max => members.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            GroupScore::Top2Sum => top2_sum(members),
        };
    }
    // Mark the winners by rank: a group is kept if fewer than group_top_k groups beat it.
    for g in 0..limit.num_groups {
        let s = group_scores[g];
        let better = group_scores.iter().enumerate().filter(|&(h, &o)| o > s || (o == s && h < g)).count();
        if better >= limit.group_top_k {
            keys[g * size..(g + 1) * size].fill(f64::NEG_INFINITY);
        }
    }
}

/// Sum of the two largest finite values (the one value if only one is finite; `-inf` if none).
fn top2_sum(values: &[f64]) -> f64 {
    let (mut a, mut b) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    for &v in values {
        if v > a {
            b = a;
            a = v;
        } else if v > b {
            b = v;
        }
    }
    if b == f64::NEG_INFINITY {
        a
    } else {
        a + b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn top(keys: &[f64], k: usize) -> (Vec<i32>, Vec<bool>) {
        let mut ex = vec![0; k];
        let mut r = vec![false; k];
        let mut b = vec![0.0; k];
        select_top_k(keys, &mut ex, &mut r, &mut b);
        (ex, r)
    }

    #[test]
    fn ties_go_to_the_lower_index() {
        assert_eq!(top(&[0.0; 8], 3).0, vec![0, 1, 2]);
        assert_eq!(top(&[1.0, 2.0, 2.0, 1.0], 3).0, vec![1, 2, 0]);
    }

    #[test]
    fn ineligible_experts_pad_the_choice() {
        let ninf = f64::NEG_INFINITY;
        let (ex, r) = top(&[ninf, 3.0, ninf, ninf], 3);
        assert_eq!(ex, vec![1, 0, 2]);
        assert_eq!(r, vec![true, false, false]);
    }

    #[test]
    fn groups_mask_with_neg_inf_even_for_negative_scores() {
        let limit = GroupLimit { num_groups: 2, group_top_k: 1, group_score: GroupScore::Max };
        let gk = [-0.9, -0.8, -0.1, -0.3];
        let mut keys = gk;
        let mut gs = [0.0; 2];
        limit_to_best_groups(&limit, &gk, &mut keys, &mut gs);
        assert_eq!(top(&keys, 2).0, vec![2, 3]);
    }

    #[test]
    fn top2_sum_scores_groups() {
        let limit = GroupLimit { num_groups: 2, group_top_k: 1, group_score: GroupScore::Top2Sum };
        // group 0: max 0.9 but top-2 sum 0.9; group 1: 0.6 + 0.5 = 1.1 wins.
        let gk = [0.9, 0.0, 0.6, 0.5];
        let mut keys = gk;
        let mut gs = [0.0; 2];
        limit_to_best_groups(&limit, &gk, &mut keys, &mut gs);
        assert_eq!(top(&keys, 1).0, vec![2]);
    }
}
