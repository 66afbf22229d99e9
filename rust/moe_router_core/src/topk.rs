//! Top-k selection on one token's keys, with the total order of the spec:
//! key descending, then expert index ascending (vLLM's kernels, `jax.lax.top_k`).
//!
//! A key of `-inf` marks an ineligible expert. If fewer than k experts are
//! eligible, the remaining choices are the lowest-index ineligible experts,
//! reported as not routed.

use std::cmp::Ordering;

use crate::simd::{Simd, SimdLevel};

const BLOCK: usize = 8;

/// Above this k the choice is a partition (`select_nth_unstable_by`) and a sort
/// of the k chosen, O(E + k log k) per token, instead of insertion into a
/// sorted list, O(E k) at worst: k = E = 100,000 takes milliseconds instead of
/// seconds. Up to it, insertion behind a lower bound touches only a few
/// candidates and is as fast or faster (measured for E = 64..8192).
pub(crate) const SELECT_MIN_K: usize = 64;

/// Up to this k the branch-free scalar insertion (`select_fixed`) is used at
/// every level: its list fits in two registers, and with the lower bound it
/// sees about k candidates, where `select8_avx2`'s lane shuffles of the full
/// 8-entry list cost more. Measured per token at E = 64: k = 1 26 against 42 ns,
/// k = 2 38 against 43 ns, but k = 3 51 against 44 ns and k = 4 73 against 55 ns.
/// `select_small` covers k = 1..=2.
#[cfg(target_arch = "x86_64")]
const SCALAR_MAX_K: usize = 2;

/// Select the k best experts of `keys` into `experts` (by rank) and mark in
/// `routed` which choices are real (eligible). `best` is scratch of length k;
/// `candidates` is scratch for k above `SELECT_MIN_K`.
///
/// `lower_bound` must be at most the k-th largest key (`-inf` when unknown):
/// only keys at or above it are candidates, found by a vectorizable pass, so
/// the insertion step sees a few keys instead of all E. The result is the same
/// as inserting every key. `narrow`, when given, is the float32 row whose
/// widened values `keys` are (see [`Bound`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn select_top_k(
    simd: Simd,
    keys: &[f64],
    narrow: Option<&[f32]>,
    experts: &mut [i32],
    routed: &mut [bool],
    best: &mut [f64],
    lower_bound: f64,
    candidates: &mut Vec<(f64, u32)>,
) {
    let k = experts.len();
    best.fill(f64::NEG_INFINITY);
    let bound = Bound::new(simd, keys, narrow, lower_bound);
    macro_rules! fixed {
        ($($n:literal)*) => {
            match k {
                $($n => select_fixed::<$n>(simd, keys, bound, experts, best),)*
                _ if k > SELECT_MIN_K => select_by_partition(simd, keys, lower_bound, experts, best, candidates),
                _ => {
                    let mut filled = 0usize;
                    for_each_candidate(simd, keys, bound, |e| insert(keys[e], e, experts, best, &mut filled));
                    filled
                }
            }
        };
    }
    let filled = match simd.level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `Simd` level never exceeds what the CPU supports; both imply AVX2.
        SimdLevel::Avx2 | SimdLevel::Avx512 if k > SCALAR_MAX_K && k <= 8 => unsafe {
            select8_avx2(keys, bound, experts, best)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        SimdLevel::Avx2 if k <= SCALAR_MAX_K => unsafe { select_small_avx2(simd, keys, bound, experts, best) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; this level implies AVX-512F.
        SimdLevel::Avx512 if k <= SCALAR_MAX_K => unsafe { select_small_avx512(simd, keys, bound, experts, best) },
        _ => fixed!(1 2 3 4 5 6 7 8),
    };
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

/// The lower bound of a selection, and the float32 row to compare it with:
/// `keys` are the exact widening of `narrow`, so with `narrow_value` the
/// bound rounded to float32, `narrow[e] >= narrow_value` holds exactly when
/// `keys[e] >= value` if the rounding went up, and for a superset of those
/// keys if it went down (a lower bound that is lower still: the same
/// selection). The routers' bounds are row elements, which round exactly.
/// A 256-bit compare then tests 8 keys instead of 4. Used at the AVX2 level
/// only, where the float32 row is read too; at AVX-512 one compare already
/// tests 8 float64 keys.
#[derive(Clone, Copy)]
struct Bound<'a> {
    value: f64,
    narrow: Option<(&'a [f32], f32)>,
}

impl<'a> Bound<'a> {
    #[inline(always)]
    fn new(simd: Simd, keys: &[f64], narrow: Option<&'a [f32]>, value: f64) -> Self {
        let narrow_value = value as f32;
        let narrow = narrow.filter(|n| simd.level() == SimdLevel::Avx2 && n.len() == keys.len());
        Bound { value, narrow: narrow.map(|n| (n, narrow_value)) }
    }

    /// Bit i set when `keys[offset + i] >= self.value`, for the (up to 64) keys of `chunk`.
    ///
    /// # Safety
    /// `simd` is at least AVX2 (a `Simd` level never exceeds what the CPU supports).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn mask(self, simd: Simd, chunk: &[f64], offset: usize) -> u64 {
        // SAFETY: the caller guarantees AVX2; AVX-512 only when `simd` says so.
        unsafe {
            match self.narrow {
                Some((row, b)) => candidate_mask_avx2_f32(&row[offset..offset + chunk.len()], b),
                None => candidate_mask(simd, chunk, self.value),
            }
        }
    }
}

/// Call `f(e)` for every `e` with `keys[e] >= bound`, in increasing order.
#[inline(always)]
fn for_each_candidate(simd: Simd, keys: &[f64], bound: Bound<'_>, mut f: impl FnMut(usize)) {
    #[cfg(target_arch = "x86_64")]
    {
        if simd.level() >= SimdLevel::Avx2 {
            for (w, chunk) in keys.chunks(64).enumerate() {
                // SAFETY: a `Simd` level never exceeds what the CPU supports.
                let mut mask = unsafe { bound.mask(simd, chunk, w * 64) };
                while mask != 0 {
                    f(w * 64 + mask.trailing_zeros() as usize);
                    mask &= mask - 1;
                }
            }
            return;
        }
    }
    for (e, &key) in keys.iter().enumerate() {
        if key >= bound.value {
            f(e);
        }
    }
}

/// Bit i set when `keys[i] >= bound`, for up to 64 keys, at the widest level `simd` allows.
///
/// # Safety
/// `simd` is at least AVX2 (a `Simd` level never exceeds what the CPU supports).
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn candidate_mask(simd: Simd, keys: &[f64], bound: f64) -> u64 {
    // SAFETY: the caller guarantees AVX2; AVX-512 only when `simd` says so.
    unsafe {
        if simd.level() == SimdLevel::Avx512 {
            candidate_mask_avx512(keys, bound)
        } else {
            candidate_mask_avx2(keys, bound)
        }
    }
}

/// `candidate_mask_avx2` with 8 keys per compare, straight into a mask register.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn candidate_mask_avx512(keys: &[f64], bound: f64) -> u64 {
    use std::arch::x86_64::*;
    let b = _mm512_set1_pd(bound);
    // SAFETY: the chunk holds 8 values.
    lanes_mask::<_, 8>(keys, bound, |c| {
        u64::from(_mm512_cmp_pd_mask::<_CMP_GE_OQ>(unsafe { _mm512_loadu_pd(c.as_ptr()) }, b))
    })
}

/// Bit i set when `keys[i] >= bound`, for up to 64 keys.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn candidate_mask_avx2(keys: &[f64], bound: f64) -> u64 {
    use std::arch::x86_64::*;
    let b = _mm256_set1_pd(bound);
    // SAFETY: the chunk holds 4 values.
    lanes_mask::<_, 4>(keys, bound, |c| {
        _mm256_movemask_pd(_mm256_cmp_pd::<_CMP_GE_OQ>(unsafe { _mm256_loadu_pd(c.as_ptr()) }, b)) as u64
    })
}

/// [`candidate_mask_avx2`] on float32 values: 8 per compare.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn candidate_mask_avx2_f32(values: &[f32], bound: f32) -> u64 {
    use std::arch::x86_64::*;
    let b = _mm256_set1_ps(bound);
    // SAFETY: the chunk holds 8 values.
    lanes_mask::<_, 8>(values, bound, |c| {
        u64::from(_mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(unsafe { _mm256_loadu_ps(c.as_ptr()) }, b)) as u8)
    })
}

/// The candidate mask of up to 64 `keys` from `W` at a time: `lanes(chunk)`
/// gives the chunk's bits (bit j for `chunk[j] >= bound`); the rest are compared one by one.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn lanes_mask<T: PartialOrd + Copy, const W: usize>(keys: &[T], bound: T, lanes: impl Fn(&[T; W]) -> u64) -> u64 {
    debug_assert!(keys.len() <= 64);
    let (chunks, rest) = keys.as_chunks::<W>();
    let mask = chunks.iter().enumerate().fold(0u64, |m, (c, chunk)| m | lanes(chunk) << (c * W));
    let first = chunks.len() * W;
    rest.iter().enumerate().fold(mask, |m, (j, &v)| m | u64::from(v >= bound) << (first + j))
}

/// The order of the spec on (key, expert) pairs: key descending, then index
/// ascending. Keys are compared as numbers (`-0.0 == 0.0`, a tie), as the
/// insertion paths compare them; they hold no NaN.
#[inline]
fn rank_order(a: &(f64, u32), b: &(f64, u32)) -> Ordering {
    if a.0 > b.0 {
        Ordering::Less
    } else if a.0 < b.0 {
        Ordering::Greater
    } else {
        a.1.cmp(&b.1)
    }
}

/// Top-k for large k: the eligible candidates (finite keys at or above a lower
/// bound of the k-th largest key), partitioned around the k-th in the spec's
/// order, then the k best sorted. The order is total, so the result is unique:
/// the same as insertion. The bound is the larger of `lower_bound` and the k-th
/// largest block maximum (found by a partition too), so the candidates are
/// few when E is much larger than k. Returns the number of finite keys taken.
fn select_by_partition(
    simd: Simd,
    keys: &[f64],
    lower_bound: f64,
    experts: &mut [i32],
    best: &mut [f64],
    candidates: &mut Vec<(f64, u32)>,
) -> usize {
    let k = experts.len();
    let mut bound = lower_bound;
    if keys.len() / BLOCK >= k {
        candidates.clear();
        candidates.extend(keys.chunks_exact(BLOCK).enumerate().map(|(i, block)| {
            (block.iter().copied().fold(f64::NEG_INFINITY, |a, b| if b > a { b } else { a }), i as u32)
        }));
        candidates.select_nth_unstable_by(k - 1, rank_order);
        bound = bound.max(candidates[k - 1].0);
    }
    candidates.clear();
    for_each_candidate(simd, keys, Bound { value: bound, narrow: None }, |e| {
        if keys[e] > f64::NEG_INFINITY {
            candidates.push((keys[e], e as u32));
        }
    });
    if candidates.len() > k {
        candidates.select_nth_unstable_by(k - 1, rank_order);
        candidates.truncate(k);
    }
    candidates.sort_unstable_by(rank_order);
    for ((x, b), &(key, e)) in experts.iter_mut().zip(best.iter_mut()).zip(candidates.iter()) {
        *x = e as i32;
        *b = key;
    }
    candidates.len()
}

/// A lower bound of the k-th largest key: the k-th largest of the maxima of
/// blocks of 8 (k blocks each hold a key at least that large); `-inf` when
/// there are fewer than k blocks, and above `SELECT_MIN_K`, where the
/// partition needs no bound (and keeping k maxima sorted would cost O(E k)).
/// `scratch` has length k.
pub(crate) fn block_lower_bound(keys: &[f64], k: usize, scratch: &mut [f64]) -> f64 {
    if keys.len() / BLOCK < k.max(2) || k > SELECT_MIN_K {
        return f64::NEG_INFINITY;
    }
    scratch.fill(f64::NEG_INFINITY);
    for block in keys.chunks_exact(BLOCK) {
        let m = block.iter().copied().fold(f64::NEG_INFINITY, |a, b| if b > a { b } else { a });
        push_descending(m, scratch);
    }
    scratch[k - 1]
}

/// The second largest value (the largest if it occurs twice), branch-free,
/// of values without NaN (compare-and-select compiles to one `minsd`/`maxsd`
/// each, where `f64::max` adds the NaN handling).
#[inline(always)]
pub(crate) fn second_largest(values: &[f64]) -> f64 {
    let (mut first, mut second) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    for &v in values {
        let lower = if v < first { v } else { first };
        second = if lower > second { lower } else { second };
        first = if v > first { v } else { first };
    }
    second
}

/// The values sorted in descending order by a branch-free 19-comparator
/// sorting network (Knuth, TAOCP vol. 3, 5.3.4: optimal for 8 inputs).
#[inline]
pub(crate) fn sort8_descending(mut v: [f64; 8]) -> [f64; 8] {
    const NET: [(usize, usize); 19] = [
        (0, 2),
        (1, 3),
        (4, 6),
        (5, 7),
        (0, 4),
        (1, 5),
        (2, 6),
        (3, 7),
        (0, 1),
        (2, 3),
        (4, 5),
        (6, 7),
        (2, 4),
        (3, 5),
        (1, 4),
        (3, 6),
        (1, 2),
        (3, 4),
        (5, 6),
    ];
    for (a, b) in NET {
        // f64::max/min compile to maxsd/minsd (no branches); the values hold no NaN.
        let (x, y) = (v[a], v[b]);
        v[a] = x.max(y);
        v[b] = x.min(y);
    }
    v
}

/// Insert `v` into the descending list `list` (length fixed), dropping its smallest value.
#[inline(always)]
pub(crate) fn push_descending(v: f64, list: &mut [f64]) {
    let k = list.len();
    if v > list[k - 1] {
        let mut pos = k - 1;
        while pos > 0 && v > list[pos - 1] {
            list[pos] = list[pos - 1];
            pos -= 1;
        }
        list[pos] = v;
    }
}

/// Top-k (k <= 8) with the 8 best keys and their indices held in AVX2
/// registers: each candidate is merged by compare, shift-by-one-lane and blend,
/// without branches. The same strict order as `insert` (an equal key arriving
/// later loses). Returns the number of finite keys taken among the first k.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn select8_avx2(keys: &[f64], bound: Bound<'_>, experts: &mut [i32], best_out: &mut [f64]) -> usize {
    use std::arch::x86_64::*;
    let k = experts.len();
    let ninf = _mm256_set1_pd(f64::NEG_INFINITY);
    let (mut b0, mut b1) = (ninf, ninf);
    let (mut i0, mut i1) = (_mm256_setzero_pd(), _mm256_setzero_pd());
    let lane0 = _mm256_castsi256_pd(_mm256_set_epi64x(0, 0, 0, -1));
    for (w, chunk) in keys.chunks(64).enumerate() {
        // The AVX2 mask, inlined here (an AVX-512 one could not be, and its call costs more than it saves).
        let mut mask = match bound.narrow {
            Some((row, b)) => candidate_mask_avx2_f32(&row[w * 64..w * 64 + chunk.len()], b),
            None => candidate_mask_avx2(chunk, bound.value),
        };
        while mask != 0 {
            let e = w * 64 + mask.trailing_zeros() as usize;
            mask &= mask - 1;
            let kv = _mm256_set1_pd(keys[e]);
            let ev = _mm256_set1_pd(e as f64);
            let gt0 = _mm256_cmp_pd::<_CMP_GT_OQ>(kv, b0);
            let gt1 = _mm256_cmp_pd::<_CMP_GT_OQ>(kv, b1);
            // Lane p of the "from above" vectors holds lane p - 1 of the list.
            let up = |lo: __m256d, hi: __m256d| -> (__m256d, __m256d) {
                let lo_s = _mm256_permute4x64_pd::<0b10_01_00_00>(lo);
                let hi_s = _mm256_permute4x64_pd::<0b10_01_00_00>(hi);
                let carry = _mm256_permute4x64_pd::<0b11_11_11_11>(lo);
                (lo_s, _mm256_blendv_pd(hi_s, carry, lane0))
            };
            let (ga0, ga1) = up(gt0, gt1);
            let ga0 = _mm256_andnot_pd(lane0, ga0); // nothing is above lane 0
            let (sb0, sb1) = up(b0, b1);
            let (si0, si1) = up(i0, i1);
            b0 = _mm256_blendv_pd(_mm256_blendv_pd(b0, kv, gt0), sb0, ga0);
            b1 = _mm256_blendv_pd(_mm256_blendv_pd(b1, kv, gt1), sb1, ga1);
            i0 = _mm256_blendv_pd(_mm256_blendv_pd(i0, ev, gt0), si0, ga0);
            i1 = _mm256_blendv_pd(_mm256_blendv_pd(i1, ev, gt1), si1, ga1);
        }
    }
    let mut best = [0.0f64; 8];
    let mut idx = [0.0f64; 8];
    // SAFETY: both arrays hold 8 values.
    unsafe {
        _mm256_storeu_pd(best.as_mut_ptr(), b0);
        _mm256_storeu_pd(best.as_mut_ptr().add(4), b1);
        _mm256_storeu_pd(idx.as_mut_ptr(), i0);
        _mm256_storeu_pd(idx.as_mut_ptr().add(4), i1);
    }
    let filled = best[..k].iter().filter(|&&b| b > f64::NEG_INFINITY).count();
    for (x, &v) in experts[..filled].iter_mut().zip(&idx[..filled]) {
        *x = v as i32;
    }
    best_out.copy_from_slice(&best[..k]);
    filled
}

/// `select_fixed` for k <= `SCALAR_MAX_K` (k = 1 or 2), inlined into the
/// level's own function below so that the candidate mask is inlined too.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn select_small(simd: Simd, keys: &[f64], bound: Bound<'_>, experts: &mut [i32], best: &mut [f64]) -> usize {
    debug_assert!(experts.len() <= SCALAR_MAX_K);
    match experts.len() {
        1 => select_fixed::<1>(simd, keys, bound, experts, best),
        _ => select_fixed::<2>(simd, keys, bound, experts, best),
    }
}

/// `select_small` with AVX2 candidate masks (`simd` is the AVX2 level).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn select_small_avx2(simd: Simd, keys: &[f64], bound: Bound<'_>, experts: &mut [i32], best: &mut [f64]) -> usize {
    select_small(simd, keys, bound, experts, best)
}

/// `select_small` with AVX-512 candidate masks (`simd` is the AVX-512 level).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn select_small_avx512(simd: Simd, keys: &[f64], bound: Bound<'_>, experts: &mut [i32], best: &mut [f64]) -> usize {
    select_small(simd, keys, bound, experts, best)
}

/// Top-k for a k known at compile time: each candidate is inserted without
/// branches (every position selects "keep", "shift down" or "take the new key"
/// from the old list), so unpredictable comparisons near the threshold cost no
/// mispredictions. Returns the number of finite keys taken.
#[inline(always)]
fn select_fixed<const K: usize>(
    simd: Simd,
    keys: &[f64],
    bound: Bound<'_>,
    experts: &mut [i32],
    best_out: &mut [f64],
) -> usize {
    let mut best = [f64::NEG_INFINITY; K];
    let mut idx = [0i32; K];
    for_each_candidate(simd, keys, bound, |e| {
        let key = keys[e];
        let old_best = best;
        let old_idx = idx;
        for p in 0..K {
            // Strictly greater: an equal key arriving later (higher index) loses.
            let beats_here = key > old_best[p];
            let beats_above = p > 0 && key > old_best[p.saturating_sub(1)];
            let from_above = p.saturating_sub(1);
            best[p] = if beats_above {
                old_best[from_above]
            } else if beats_here {
                key
            } else {
                old_best[p]
            };
            idx[p] = if beats_above {
                old_idx[from_above]
            } else if beats_here {
                e as i32
            } else {
                old_idx[p]
            };
        }
    });
    let filled = best.iter().filter(|&&b| b > f64::NEG_INFINITY).count();
    experts[..filled].copy_from_slice(&idx[..filled]);
    best_out.copy_from_slice(&best);
    filled
}

/// Insert `key` of expert `e` into the descending list `best`/`experts`.
/// Strictly greater: an equal key arriving later (higher index) loses the tie.
#[inline(always)]
fn insert(key: f64, e: usize, experts: &mut [i32], best: &mut [f64], filled: &mut usize) {
    let k = best.len();
    if key > best[k - 1] {
        let mut pos = k - 1;
        while pos > 0 && key > best[pos - 1] {
            best[pos] = best[pos - 1];
            experts[pos] = experts[pos - 1];
            pos -= 1;
        }
        best[pos] = key;
        experts[pos] = e as i32;
        *filled = (*filled + 1).min(k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn top_with(simd: Simd, keys: &[f64], k: usize) -> (Vec<i32>, Vec<bool>) {
        let mut ex = vec![0; k];
        let mut r = vec![false; k];
        let mut b = vec![0.0; k];
        let bound = block_lower_bound(keys, k, &mut b);
        select_top_k(simd, keys, None, &mut ex, &mut r, &mut b, bound, &mut Vec::new());
        (ex, r)
    }

    /// Insertion of every key, in index order: the definition the fast paths must match.
    fn by_insertion(keys: &[f64], k: usize) -> (Vec<i32>, usize) {
        let (mut ex, mut best, mut filled) = (vec![0i32; k], vec![f64::NEG_INFINITY; k], 0usize);
        for (e, &key) in keys.iter().enumerate() {
            insert(key, e, &mut ex, &mut best, &mut filled);
        }
        (ex, filled)
    }

    #[test]
    fn partition_selection_equals_insertion_with_ties_and_signed_zeros() {
        let mut next = crate::rng::xorshift(0x1234_5678_9abc_def1u64);
        for trial in 0..3000 {
            let e = 1 + (next() % 400) as usize;
            let k = if trial % 3 == 0 { e } else { 1 + (next() as usize) % e };
            let keys: Vec<f64> = (0..e)
                .map(|_| match next() % 12 {
                    0 => f64::NEG_INFINITY,
                    1 => -0.0,
                    2 => 0.0,
                    3..=6 => (next() % 5) as f64 - 2.0, // many ties
                    _ => (next() % 100_000) as f64 / 777.0 - 60.0,
                })
                .collect();
            let (want, filled) = by_insertion(&keys, k);
            for simd in Simd::all() {
                let (ex, r) = top_with(simd, &keys, k);
                assert_eq!(r.iter().filter(|&&x| x).count(), filled, "k {k} e {e}");
                assert_eq!(&ex[..filled], &want[..filled], "{simd:?} k {k} keys {keys:?}");
                // And directly, whatever k (the dispatch picks insertion up to SELECT_MIN_K).
                let (mut ex2, mut b2, mut c2) = (vec![0i32; k], vec![0.0; k], Vec::new());
                let n = select_by_partition(simd, &keys, f64::NEG_INFINITY, &mut ex2, &mut b2, &mut c2);
                assert_eq!((n, &ex2[..n]), (filled, &want[..filled]), "partition, k {k}");
            }
        }
    }

    fn top(keys: &[f64], k: usize) -> (Vec<i32>, Vec<bool>) {
        top_with(Simd::current(), keys, k)
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn candidate_masks_agree_with_the_comparison_at_every_level() {
        let mut next = crate::rng::xorshift(0x0bad_5eed_1234_4321u64);
        for len in 0..=64 {
            let keys: Vec<f64> = (0..len)
                .map(|_| match next() % 6 {
                    0 => f64::NEG_INFINITY,
                    1 => -0.0,
                    2 => 0.0,
                    _ => (next() % 9) as f64 - 4.0,
                })
                .collect();
            for bound in [f64::NEG_INFINITY, -4.0, 0.0, -0.0, 1.0, 4.0] {
                let want = keys.iter().enumerate().fold(0u64, |m, (i, &k)| m | u64::from(k >= bound) << i);
                for simd in Simd::all().into_iter().filter(|s| s.level() >= SimdLevel::Avx2) {
                    // SAFETY: `Simd::all` lists only levels the CPU supports.
                    assert_eq!(unsafe { candidate_mask(simd, &keys, bound) }, want, "{simd:?} len {len}");
                }
            }
        }
    }

    /// Float32 rows with ties, signed zeros, -inf and neighbours one float32 ulp apart.
    fn float32_row(next: &mut impl FnMut() -> u64, len: usize) -> Vec<f32> {
        (0..len)
            .map(|_| match next() % 8 {
                0 => f32::NEG_INFINITY,
                1 => -0.0,
                2 => 0.0,
                3 => f32::from_bits(0x3f80_0000 + (next() % 3) as u32), // 1.0 and its next two
                4 | 5 => (next() % 5) as f32 - 2.0,
                _ => (next() % 100_000) as f32 / 777.0 - 60.0,
            })
            .collect()
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn float32_candidate_masks_agree_with_the_float64_comparison() {
        if !Simd::all().iter().any(|s| s.level() >= SimdLevel::Avx2) {
            return;
        }
        let mut next = crate::rng::xorshift(0x5eed_f32f_32f3_2f32u64);
        for len in 0..=64 {
            let row = float32_row(&mut next, len);
            let bounds = row.iter().copied().chain([f32::NEG_INFINITY, 0.0, -0.0, 1.0, f32::from_bits(0x3f80_0001)]);
            for bound in bounds {
                let want = row
                    .iter()
                    .enumerate()
                    .fold(0u64, |m, (i, &v)| m | u64::from(f64::from(v) >= f64::from(bound)) << i);
                // SAFETY: the CPU has AVX2 (checked above).
                assert_eq!(unsafe { candidate_mask_avx2_f32(&row, bound) }, want, "len {len} bound {bound}");
            }
        }
    }

    #[test]
    fn selection_on_the_float32_row_equals_the_float64_one() {
        let mut next = crate::rng::xorshift(0x0123_4567_f32f_0f32u64);
        for trial in 0..3000 {
            let e = 1 + (next() % 300) as usize;
            let k = 1 + (next() as usize) % e.min(9);
            let row = float32_row(&mut next, e);
            let keys: Vec<f64> = row.iter().map(|&v| f64::from(v)).collect();
            let (mut b, mut c) = (vec![0.0; k], Vec::new());
            let exact = block_lower_bound(&keys, k, &mut b);
            // A row element (what the routers pass), -inf, and bounds that round to float32 up and down.
            // (all at most the k-th largest key, as `select_top_k` requires)
            let off = exact.abs() * 1e-12 + 1e-300;
            let (rounds_up, rounds_down) = if exact.is_finite() {
                (exact - off, f64::from((exact as f32).next_down()) + off)
            } else {
                (exact, exact)
            };
            for bound in [exact, f64::NEG_INFINITY, rounds_up, rounds_down] {
                for simd in Simd::all() {
                    let run = |narrow: Option<&[f32]>, c: &mut Vec<(f64, u32)>| {
                        let (mut ex, mut r, mut best) = (vec![0i32; k], vec![false; k], vec![0.0; k]);
                        select_top_k(simd, &keys, narrow, &mut ex, &mut r, &mut best, bound, c);
                        (ex, r, best)
                    };
                    let want = run(None, &mut c);
                    assert_eq!(run(Some(&row), &mut c), want, "{simd:?} trial {trial} e {e} k {k} bound {bound}");
                }
            }
        }
    }

    #[test]
    fn ties_go_to_the_lower_index() {
        assert_eq!(top(&[0.0; 8], 3).0, vec![0, 1, 2]);
        assert_eq!(top(&[1.0, 2.0, 2.0, 1.0], 3).0, vec![1, 2, 0]);
    }

    #[test]
    fn prefiltered_selection_equals_plain_insertion() {
        let mut next = crate::rng::xorshift(0x2545_f491_4f6c_dd1d);
        for trial in 0..2000 {
            let e = 1 + trial % 70;
            let k = 1 + trial % e.min(9);
            let keys: Vec<f64> = (0..e)
                .map(|_| {
                    let state = next();
                    match state % 10 {
                        0 => f64::NEG_INFINITY,
                        1..=3 => (state % 4) as f64, // many ties
                        _ => (state % 1000) as f64 / 37.0,
                    }
                })
                .collect();
            // Plain insertion over all keys, in index order.
            let mut order: Vec<usize> = (0..e).filter(|&i| keys[i] > f64::NEG_INFINITY).collect();
            order.sort_by(|&a, &b| keys[b].total_cmp(&keys[a]).then(a.cmp(&b)));
            order.truncate(k);
            let (ex, r) = top(&keys, k);
            for simd in Simd::all() {
                assert_eq!(top_with(simd, &keys, k), (ex.clone(), r.clone()), "{simd:?}");
            }
            let got: Vec<usize> = ex.iter().zip(&r).filter(|(_, &r)| r).map(|(&x, _)| x as usize).collect();
            assert_eq!(got, order, "keys {keys:?} k {k}");
        }
    }

    #[test]
    fn sorting_network_sorts() {
        let mut state = 7u64;
        for _ in 0..5000 {
            let mut v = [0.0; 8];
            for x in v.iter_mut() {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                *x = if state >> 60 == 0 { f64::NEG_INFINITY } else { ((state >> 33) % 7) as f64 };
            }
            let mut want = v;
            want.sort_by(|a, b| b.total_cmp(a));
            assert_eq!(sort8_descending(v), want);
            assert_eq!(second_largest(&v), want[1]);
        }
    }

    #[test]
    fn ineligible_experts_pad_the_choice() {
        let ninf = f64::NEG_INFINITY;
        let (ex, r) = top(&[ninf, 3.0, ninf, ninf], 3);
        assert_eq!(ex, vec![1, 0, 2]);
        assert_eq!(r, vec![true, false, false]);
    }
}
