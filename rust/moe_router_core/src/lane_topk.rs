//! The top k experts of eight tokens at once, one token per lane (the E = 8
//! blocks of `crate::row_block`): each expert's column of eight keys is
//! inserted into k ranked lists of eight lanes by compare and blend, so the
//! selection has no branch and no per-token work.
//!
//! The order is the spec's: key descending, then expert index ascending.
//! Experts are inserted in increasing index, so a new one goes below every
//! listed entry of an equal key: it moves in where its key is strictly
//! larger, and the entries from there down shift by one rank.

use crate::simd::Simd;
#[cfg(target_arch = "x86_64")]
use crate::simd::SimdLevel;

/// Tokens (lanes) and experts of a block.
const LANES: usize = 8;

/// One rank's choice for each of the eight tokens: the expert (as a float, so
/// that the selects share the keys' lane width) and its value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct LaneRank {
    pub expert: [f64; LANES],
    pub value: [f64; LANES],
}

/// The top `K` (K <= 8) of each lane: `keys[e][t]` is token t's key for expert
/// e, `values[e][t]` what the rank carries along (its score). Keys must be
/// finite (NaN would break the order; -inf only fills empty ranks).
#[inline(always)]
pub(crate) fn top_k_lanes<const K: usize>(
    simd: Simd,
    keys: &[[f64; LANES]; LANES],
    values: &[[f64; LANES]; LANES],
) -> [LaneRank; K] {
    match simd.level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `Simd` level never exceeds what the CPU supports, and AVX-512F implies AVX2.
        SimdLevel::Avx2 | SimdLevel::Avx512 => unsafe { top_k_lanes_avx2::<K>(keys, values) },
        _ => top_k_lanes_portable::<K>(keys, values),
    }
}

/// `top_k_lanes` on arrays: rank j takes rank j - 1's entry where the new key
/// beats that, else the new entry where the new key beats rank j.
#[inline(always)]
fn top_k_lanes_portable<const K: usize>(keys: &[[f64; LANES]; LANES], values: &[[f64; LANES]; LANES]) -> [LaneRank; K] {
    let mut best = [[f64::NEG_INFINITY; LANES]; K];
    let mut ranks = [LaneRank { expert: [0.0; LANES], value: [0.0; LANES] }; K];
    for (e, (column, carried)) in keys.iter().zip(values).enumerate() {
        let (old_best, old) = (best, ranks);
        for j in 0..K {
            for t in 0..LANES {
                let key = column[t];
                if j > 0 && key > old_best[j - 1][t] {
                    best[j][t] = old_best[j - 1][t];
                    ranks[j].expert[t] = old[j - 1].expert[t];
                    ranks[j].value[t] = old[j - 1].value[t];
                } else if key > old_best[j][t] {
                    best[j][t] = key;
                    ranks[j].expert[t] = e as f64;
                    ranks[j].value[t] = carried[t];
                }
            }
        }
    }
    ranks
}

/// `top_k_lanes` with each rank's keys, experts and values in two AVX2 registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn top_k_lanes_avx2<const K: usize>(keys: &[[f64; LANES]; LANES], values: &[[f64; LANES]; LANES]) -> [LaneRank; K] {
    use std::arch::x86_64::*;
    let (ninf, zero) = (_mm256_set1_pd(f64::NEG_INFINITY), _mm256_setzero_pd());
    let mut ranks = [LaneRank { expert: [0.0; LANES], value: [0.0; LANES] }; K];
    for half in 0..2 {
        let at = half * 4;
        let (mut best, mut expert, mut value) = ([ninf; K], [zero; K], [zero; K]);
        for (e, (column, carried)) in keys.iter().zip(values).enumerate() {
            // SAFETY: each row holds 8 values, and `at + 4 <= 8`.
            let (key, carried) =
                unsafe { (_mm256_loadu_pd(column.as_ptr().add(at)), _mm256_loadu_pd(carried.as_ptr().add(at))) };
            let index = _mm256_set1_pd(e as f64);
            let beats: [__m256d; K] = std::array::from_fn(|j| _mm256_cmp_pd::<_CMP_GT_OQ>(key, best[j]));
            for j in (0..K).rev() {
                let mut b = _mm256_blendv_pd(best[j], key, beats[j]);
                let mut x = _mm256_blendv_pd(expert[j], index, beats[j]);
                let mut v = _mm256_blendv_pd(value[j], carried, beats[j]);
                if j > 0 {
                    b = _mm256_blendv_pd(b, best[j - 1], beats[j - 1]);
                    x = _mm256_blendv_pd(x, expert[j - 1], beats[j - 1]);
                    v = _mm256_blendv_pd(v, value[j - 1], beats[j - 1]);
                }
                (best[j], expert[j], value[j]) = (b, x, v);
            }
        }
        for (r, (x, v)) in ranks.iter_mut().zip(expert.iter().zip(&value)) {
            // SAFETY: each array holds 8 values, and `at + 4 <= 8`.
            unsafe {
                _mm256_storeu_pd(r.expert.as_mut_ptr().add(at), *x);
                _mm256_storeu_pd(r.value.as_mut_ptr().add(at), *v);
            }
        }
    }
    ranks
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each lane's top k by a stable sort of (key descending, index ascending).
    fn by_sorting(keys: &[[f64; LANES]; LANES], values: &[[f64; LANES]; LANES], k: usize) -> Vec<LaneRank> {
        let mut ranks = vec![LaneRank { expert: [0.0; LANES], value: [0.0; LANES] }; k];
        for t in 0..LANES {
            let mut order: Vec<usize> = (0..LANES).collect();
            order.sort_by(|&a, &b| keys[b][t].partial_cmp(&keys[a][t]).expect("finite").then(a.cmp(&b)));
            for (j, &e) in order.iter().take(k).enumerate() {
                ranks[j].expert[t] = e as f64;
                ranks[j].value[t] = values[e][t];
            }
        }
        ranks
    }

    fn check<const K: usize>(keys: &[[f64; LANES]; LANES], values: &[[f64; LANES]; LANES]) {
        let want = by_sorting(keys, values, K);
        for simd in Simd::all() {
            let got = top_k_lanes::<K>(simd, keys, values);
            assert_eq!(got.to_vec(), want, "{simd:?} k={K} keys={keys:?}");
        }
    }

    #[test]
    fn lanes_select_as_a_stable_sort_with_ties_and_signed_zeros() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for case in 0..400 {
            let mut keys = [[0.0; LANES]; LANES];
            let mut values = [[0.0; LANES]; LANES];
            for (e, (kr, vr)) in keys.iter_mut().zip(values.iter_mut()).enumerate() {
                for (t, (kv, vv)) in kr.iter_mut().zip(vr.iter_mut()).enumerate() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *kv = match case % 3 {
                        0 => (x % 1000) as f64 / 7.0 - 70.0,
                        // Few distinct values: ties everywhere, and both zeros.
                        1 => [-1.0, -0.0, 0.0, 1.0][(x % 4) as usize],
                        _ => -1e300 * (x % 3) as f64,
                    };
                    *vv = (e * 10 + t) as f64;
                }
            }
            check::<1>(&keys, &values);
            check::<2>(&keys, &values);
            check::<3>(&keys, &values);
            check::<5>(&keys, &values);
            check::<8>(&keys, &values);
        }
    }
}
