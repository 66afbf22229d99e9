//! The vertical kernels of the E = 8 blocks (`crate::row_block`): eight
//! tokens across the lanes, one array of eight per expert, with explicit AVX2
//! (used at the AVX-512 level too) and a portable version of each.
//!
//! - `shift_by_lane_max`: each token's largest logit, folded over the experts
//!   in order as the read pass does, and the logits minus it.
//! - `add_scaled_lanes`: the loss sums' accumulation of the eight tokens' scores.
//! - `top_k_lanes`: each expert's column of eight keys is inserted into k
//!   ranked lists by compare and blend, so the selection has no branch and no
//!   per-token work. The order is the spec's: key descending, then expert index
//!   ascending. Experts are inserted in increasing index, so a new one goes
//!   below every listed entry of an equal key: it moves in where its key is
//!   strictly larger, and the entries from there down shift by one rank.

use crate::simd::Simd;
#[cfg(target_arch = "x86_64")]
use crate::simd::SimdLevel;

/// Tokens (lanes) and experts of a block.
const LANES: usize = 8;

/// One rank's choice for each of the eight tokens: the expert and its value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct LaneRank {
    pub expert: [i32; LANES],
    pub value: [f64; LANES],
}

/// `(max, shifted)`: `max[t]` is the largest `zt[e][t]` (`if v > m { v } else
/// { m }` over e in order), `shifted[e][t] = zt[e][t] - max[t]`. The logits
/// must be finite or -inf.
#[inline(always)]
pub(crate) fn shift_by_lane_max(simd: Simd, zt: &[[f64; LANES]; LANES]) -> ([f64; LANES], [[f64; LANES]; LANES]) {
    match simd.level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `Simd` level never exceeds what the CPU supports, and AVX-512F implies AVX2.
        SimdLevel::Avx2 | SimdLevel::Avx512 => unsafe { shift_by_lane_max_avx2(zt) },
        _ => shift_by_lane_max_portable(zt),
    }
}

#[inline(always)]
fn shift_by_lane_max_portable(zt: &[[f64; LANES]; LANES]) -> ([f64; LANES], [[f64; LANES]; LANES]) {
    let mut max = [f64::NEG_INFINITY; LANES];
    for column in zt {
        for (m, &v) in max.iter_mut().zip(column) {
            *m = if v > *m { v } else { *m };
        }
    }
    (max, zt.map(|column| std::array::from_fn(|t| column[t] - max[t])))
}

/// `shift_by_lane_max` on two AVX2 halves: `max_pd(v, m)` is `v > m ? v : m`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn shift_by_lane_max_avx2(zt: &[[f64; LANES]; LANES]) -> ([f64; LANES], [[f64; LANES]; LANES]) {
    use std::arch::x86_64::*;
    let (mut max, mut shifted) = ([0.0; LANES], [[0.0; LANES]; LANES]);
    for at in [0, 4] {
        // SAFETY (the loads and stores): each array holds 8 values, and `at + 4 <= 8`.
        let load = |column: &[f64; LANES]| unsafe { _mm256_loadu_pd(column.as_ptr().add(at)) };
        let m = zt.iter().fold(_mm256_set1_pd(f64::NEG_INFINITY), |m, column| _mm256_max_pd(load(column), m));
        unsafe { _mm256_storeu_pd(max.as_mut_ptr().add(at), m) };
        for (s, column) in shifted.iter_mut().zip(zt) {
            unsafe { _mm256_storeu_pd(s.as_mut_ptr().add(at), _mm256_sub_pd(load(column), m)) };
        }
    }
    (max, shifted)
}

/// `acc[e] += scale[t] * st[e][t]` for t = 0..8 in order, each a product then
/// a sum (unfused): `LossSums::add_token`'s accumulation of eight tokens'
/// scores `st` (expert-major, a token per lane).
#[inline(always)]
pub(crate) fn add_scaled_lanes(simd: Simd, acc: &mut [f64; LANES], scale: &[f64; LANES], st: &[[f64; LANES]; LANES]) {
    match simd.level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `Simd` level never exceeds what the CPU supports, and AVX-512F implies AVX2.
        SimdLevel::Avx2 | SimdLevel::Avx512 => unsafe { add_scaled_lanes_avx2(acc, scale, st) },
        _ => {
            for (t, &a) in scale.iter().enumerate() {
                for (sum, column) in acc.iter_mut().zip(st) {
                    *sum += a * column[t];
                }
            }
        }
    }
}

/// `add_scaled_lanes` with the scores transposed in registers (four 4x4
/// transposes), so that each token adds one row of eight.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn add_scaled_lanes_avx2(acc: &mut [f64; LANES], scale: &[f64; LANES], st: &[[f64; LANES]; LANES]) {
    use std::arch::x86_64::*;
    /// Rows `r..r + 4`, lanes `at..at + 4` of `st`, transposed: lane i of result j is `st[r + i][at + j]`.
    #[target_feature(enable = "avx2")]
    fn transpose4(st: &[[f64; LANES]; LANES], r: usize, at: usize) -> [__m256d; 4] {
        // SAFETY: rows r..r + 4 exist (r is 0 or 4), each holds 8 values, and `at + 4 <= 8`.
        let row = |i: usize| unsafe { _mm256_loadu_pd(st[r + i].as_ptr().add(at)) };
        let (a, b, c, d) = (row(0), row(1), row(2), row(3));
        let (ab_lo, ab_hi) = (_mm256_unpacklo_pd(a, b), _mm256_unpackhi_pd(a, b));
        let (cd_lo, cd_hi) = (_mm256_unpacklo_pd(c, d), _mm256_unpackhi_pd(c, d));
        [
            _mm256_permute2f128_pd::<0x20>(ab_lo, cd_lo),
            _mm256_permute2f128_pd::<0x20>(ab_hi, cd_hi),
            _mm256_permute2f128_pd::<0x31>(ab_lo, cd_lo),
            _mm256_permute2f128_pd::<0x31>(ab_hi, cd_hi),
        ]
    }
    // SAFETY: `acc` holds 8 values.
    let (mut lo, mut hi) = unsafe { (_mm256_loadu_pd(acc.as_ptr()), _mm256_loadu_pd(acc.as_ptr().add(4))) };
    for at in [0, 4] {
        // Token at + j's scores of experts 0..4 (`low[j]`) and 4..8 (`high[j]`).
        let (low, high) = (transpose4(st, 0, at), transpose4(st, 4, at));
        for j in 0..4 {
            let a = _mm256_set1_pd(scale[at + j]);
            lo = _mm256_add_pd(lo, _mm256_mul_pd(a, low[j]));
            hi = _mm256_add_pd(hi, _mm256_mul_pd(a, high[j]));
        }
    }
    // SAFETY: as above.
    unsafe {
        _mm256_storeu_pd(acc.as_mut_ptr(), lo);
        _mm256_storeu_pd(acc.as_mut_ptr().add(4), hi);
    }
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
    let mut ranks = [LaneRank { expert: [0; LANES], value: [0.0; LANES] }; K];
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
                    ranks[j].expert[t] = e as i32;
                    ranks[j].value[t] = carried[t];
                }
            }
        }
    }
    ranks
}

/// `top_k_lanes` with each rank's keys, experts (as floats, the keys' lane
/// width, until the end) and values in two AVX2 registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn top_k_lanes_avx2<const K: usize>(keys: &[[f64; LANES]; LANES], values: &[[f64; LANES]; LANES]) -> [LaneRank; K] {
    use std::arch::x86_64::*;
    let (ninf, zero) = (_mm256_set1_pd(f64::NEG_INFINITY), _mm256_setzero_pd());
    let mut ranks = [LaneRank { expert: [0; LANES], value: [0.0; LANES] }; K];
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
                _mm_storeu_si128(r.expert.as_mut_ptr().add(at).cast(), _mm256_cvttpd_epi32(*x));
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
        let mut ranks = vec![LaneRank { expert: [0; LANES], value: [0.0; LANES] }; k];
        for t in 0..LANES {
            let mut order: Vec<usize> = (0..LANES).collect();
            order.sort_by(|&a, &b| keys[b][t].partial_cmp(&keys[a][t]).expect("finite").then(a.cmp(&b)));
            for (j, &e) in order.iter().take(k).enumerate() {
                ranks[j].expert[t] = e as i32;
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
    fn lane_maxima_and_shifts_agree_at_every_level() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for case in 0..200 {
            let mut zt = [[0.0; LANES]; LANES];
            for v in zt.as_flattened_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *v = match (x >> 40) % 8 {
                    0 => f64::NEG_INFINITY,
                    1 => -0.0,
                    2 => 0.0,
                    _ => ((x % 2001) as f64 - 1000.0) * if case % 2 == 0 { 1e-3 } else { 1e300 },
                };
            }
            let mut want_max = [f64::NEG_INFINITY; LANES];
            for column in &zt {
                for t in 0..LANES {
                    if column[t] > want_max[t] {
                        want_max[t] = column[t];
                    }
                }
            }
            for simd in Simd::all() {
                let (max, shifted) = shift_by_lane_max(simd, &zt);
                let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&max), bits(&want_max), "{simd:?}");
                for (s, column) in shifted.iter().zip(&zt) {
                    let want: Vec<f64> = (0..LANES).map(|t| column[t] - want_max[t]).collect();
                    assert_eq!(bits(s), bits(&want), "{simd:?}");
                }
            }
        }
    }

    #[test]
    fn scaled_sums_agree_with_the_sequential_order_at_every_level() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 53) as f64
        };
        for _ in 0..200 {
            let st: [[f64; LANES]; LANES] = std::array::from_fn(|_| std::array::from_fn(|_| next()));
            let scale: [f64; LANES] = std::array::from_fn(|_| 0.125 + next());
            let start: [f64; LANES] = std::array::from_fn(|_| 1e3 * next());
            let mut want = start;
            for (t, &a) in scale.iter().enumerate() {
                for (e, w) in want.iter_mut().enumerate() {
                    *w += a * st[e][t];
                }
            }
            for simd in Simd::all() {
                let mut acc = start;
                add_scaled_lanes(simd, &mut acc, &scale, &st);
                assert_eq!(acc.map(f64::to_bits), want.map(f64::to_bits), "{simd:?}");
            }
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
