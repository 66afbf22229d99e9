//! Group-limited routing (DeepSeek-V2/V3): experts form `num_groups`
//! contiguous groups, each token may only use its `group_top_k` best groups.

use crate::config::{GroupLimit, GroupScore};
use crate::topk::push_descending;

/// Group-limited routing: keep the `group_top_k` best groups (by `group_keys`,
/// ties to the lower group index) and set the keys of every other expert to `-inf`.
///
/// `group_keys` are the per-expert values a group is scored on (score plus
/// selection bias; `-inf` for ineligible experts). `group_scores` is scratch of
/// length `num_groups`.
pub(crate) fn limit_to_best_groups(
    limit: &GroupLimit,
    group_keys: &[f64],
    keys: &mut [f64],
    group_scores: &mut [f64],
    scratch: &mut Vec<f64>,
) {
    let size = keys.len() / limit.num_groups;
    for (g, score) in group_scores.iter_mut().enumerate() {
        let members = &group_keys[g * size..(g + 1) * size];
        *score = match limit.group_score {
            GroupScore::Max => members.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            GroupScore::Top2Sum => top2_sum(members),
            GroupScore::TopSum(n) => top_n_sum(members, n, scratch),
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

/// Sum of the n largest finite values (fewer if fewer are finite; `-inf` if none).
fn top_n_sum(values: &[f64], n: usize, scratch: &mut Vec<f64>) -> f64 {
    scratch.clear();
    scratch.resize(n, f64::NEG_INFINITY);
    for &v in values {
        push_descending(v, scratch);
    }
    let finite: Vec<f64> = scratch.iter().copied().filter(|v| *v > f64::NEG_INFINITY).collect();
    if finite.is_empty() {
        f64::NEG_INFINITY
    } else {
        finite.iter().sum()
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
    use crate::simd::Simd;
    use crate::topk::{block_lower_bound, select_top_k};

    fn top(keys: &[f64], k: usize) -> Vec<i32> {
        let mut ex = vec![0; k];
        let mut r = vec![false; k];
        let mut b = vec![0.0; k];
        let bound = block_lower_bound(keys, k, &mut b);
        select_top_k(Simd::current(), keys, None, &mut ex, &mut r, &mut b, bound, &mut Vec::new());
        ex
    }

    #[test]
    fn groups_mask_with_neg_inf_even_for_negative_scores() {
        let limit = GroupLimit { num_groups: 2, group_top_k: 1, group_score: GroupScore::Max };
        let gk = [-0.9, -0.8, -0.1, -0.3];
        let mut keys = gk;
        let mut gs = [0.0; 2];
        limit_to_best_groups(&limit, &gk, &mut keys, &mut gs, &mut Vec::new());
        assert_eq!(top(&keys, 2), vec![2, 3]);
    }

    #[test]
    fn top_n_sum_generalizes_max_and_top2() {
        let v = [0.5, f64::NEG_INFINITY, 0.25, 0.125];
        let mut s = Vec::new();
        assert_eq!(top_n_sum(&v, 1, &mut s), 0.5);
        assert_eq!(top_n_sum(&v, 2, &mut s), top2_sum(&v));
        assert_eq!(top_n_sum(&v, 4, &mut s), 0.875);
        assert_eq!(top_n_sum(&[f64::NEG_INFINITY; 3], 2, &mut s), f64::NEG_INFINITY);
    }

    #[test]
    fn top2_sum_scores_groups() {
        let limit = GroupLimit { num_groups: 2, group_top_k: 1, group_score: GroupScore::Top2Sum };
        // group 0: max 0.9 but top-2 sum 0.9; group 1: 0.6 + 0.5 = 1.1 wins.
        let gk = [0.9, 0.0, 0.6, 0.5];
        let mut keys = gk;
        let mut gs = [0.0; 2];
        limit_to_best_groups(&limit, &gk, &mut keys, &mut gs, &mut Vec::new());
        assert_eq!(top(&keys, 1), vec![2]);
    }
}
