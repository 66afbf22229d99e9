//! `exp(z - m)` of a float32 row in float32 arithmetic, with the row's sum,
//! maximum, validity and dot product with a float64 row in one pass: the
//! softmax of the backward for float32 logits.
//!
//! The peers differentiate a float32 router in float32 (torch autograd on
//! Megatron-Core's and Hugging Face's float32 softmax). Here each value is
//! `e^(z - m)` to within about 1 ulp of float32 (relative error below
//! `2^-22`): the argument `z - m` is rounded to float32 and its rounding
//! error, from a TwoSum, is added back after the Cody-Waite reduction, so the
//! result does not lose accuracy for large gaps; `e^r`, `|r| <= ln2 / 2`, is
//! the degree-7 Taylor polynomial (truncation below `2^-27`) by Estrin's
//! scheme in float32 with FMA; the power of two is applied exactly: in
//! float64, which has no float32 subnormals, or, where every power of a SIMD
//! step (8 lanes for AVX2, 16 for AVX-512) is at least `MIN_NORMAL_POWER` (so
//! all its results are normal float32 values), by an exponent add in float32
//! (the same value, widened exactly). Arguments below `LO` give exactly 0
//! (`e^-104` is below half of float32's smallest subnormal, so a float32
//! `exp` rounds it to 0 too; `-inf` logits give 0).
//!
//! The values are float64 and are summed, and multiplied with the float64 row,
//! over the lanes of `math::exp_shifted_dot` (lane `e % 8`, pairwise lane
//! sum, then the tail): every build (portable, AVX2 + FMA, AVX-512F) gives the
//! same bits, because each value is the same exact result (the same IEEE
//! operations in the same order, FMA exactly where the portable code uses
//! `mul_add`, and the power of two applied exactly either way) and the sums
//! take them in the same order.

use crate::math::{dispatch, finish_dot, lane_sum, ExpDot, LANES};
use crate::simd::{Simd, SimdLevel};

/// Below this argument the result is 0.
const LO: f32 = -104.0;
/// Arguments are clamped here (only a wrong guess of the maximum exceeds 0;
/// its values are discarded, but must stay finite).
const HI: f32 = 88.0;
/// The TwoSum error of an argument is at most `2^-24 * 104`; the clamp only
/// keeps the error of a NaN or infinite argument (whose result is refused or
/// masked) from reaching the polynomial as NaN.
const ERR_CAP: f32 = 1.0 / 1024.0;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// `ln 2` in two parts (Cody-Waite): 9 significant bits, and the rest.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// `1.5 * 2^23`: adding it rounds to an integer held in the low mantissa bits.
const SHIFT: f32 = 12_582_912.0;
/// The least power of two `k` at which `p * 2^k` (`p >= 0.7`) is a normal
/// float32 (`2^-126` is the least normal).
#[cfg(target_arch = "x86_64")]
const MIN_NORMAL_POWER: i32 = -125;
/// `1/0!, ..., 1/7!`.
const INV_FACT: [f32; 8] = [1.0, 1.0, 0.5, 1.0 / 6.0, 1.0 / 24.0, 1.0 / 120.0, 1.0 / 720.0, 1.0 / 5040.0];

/// `out[e] = exp(z[e] - m)` (float32 arithmetic, float64 result), with
/// `sum_e out_e`, `dot_lanes(out, w)`, the largest `z_e` (NaN not counted;
/// a zero maximum is `+0`, whatever the order of signed zeros) and whether any `z_e` is NaN or +inf. `m` must be finite; rows whose
/// largest value exceeds `m` give finite values that the caller discards.
#[inline]
pub(crate) fn exp32_shifted_dot(simd: Simd, z: &[f32], m: f32, w: &[f64], out: &mut [f64]) -> ExpDot {
    dispatch!(simd, exp32_shifted_dot(z, m, w, out))
}

/// `max` and `min` as the x86 `maxps`/`minps` instructions define them (the
/// second operand when either is NaN), so every build clamps alike.
#[inline(always)]
fn max32(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

#[inline(always)]
fn min32(a: f32, b: f32) -> f32 {
    if a < b {
        a
    } else {
        b
    }
}

/// One value, in the operations the vector builds perform lane by lane (the
/// tests' reference).
#[cfg(test)]
fn exp32(v: f32, m: f32) -> f64 {
    exp32_with(v, m, f32::mul_add)
}

/// `exp32` with `fma(a, b, c) = a * b + c` rounded once: the FMA instruction
/// (`f32::mul_add` in a build with FMA) or, in the portable build, where
/// `mul_add` is a C library call, [`fma32_soft`] (the same bits).
#[inline(always)]
fn exp32_with(v: f32, m: f32, fma: impl Fn(f32, f32, f32) -> f32 + Copy) -> f64 {
    let d = v - m;
    // TwoSum of v + (-m): d + err = v - m exactly.
    let bb = d - v;
    let err = (v - (d - bb)) + (-m - bb);
    let err = min32(max32(err, -ERR_CAP), ERR_CAP);
    let dc = min32(max32(d, LO), HI);
    let t = fma(dc, LOG2E, SHIFT);
    let n = t - SHIFT;
    let r = fma(-n, LN2_HI, dc);
    let r = fma(-n, LN2_LO, r) + err;
    let p = polynomial(r, |i| INV_FACT[i], |a, b| a * b, fma);
    let p = if d >= LO { p } else { 0.0 };
    f64::from(p) * pow2(t.to_bits() as i32 - SHIFT.to_bits() as i32)
}

/// `a * b + c` rounded once to float32, from float64 operations: the product
/// of two float32 values is exact in float64; the sum is rounded to odd (its
/// TwoSum error decides the last bit), and rounding a round-to-odd value of
/// at least 2 more bits to float32 is correctly rounded (Boldo and Melquiond,
/// "Emulation of FMA and correctly rounded sums: proved algorithms using
/// rounding to odd", IEEE Trans. Computers 57(4), 2008). So the bits are the
/// FMA instruction's, at a few float64 operations instead of a call.
#[inline(always)]
fn fma32_soft(a: f32, b: f32, c: f32) -> f32 {
    let p = f64::from(a) * f64::from(b);
    let c = f64::from(c);
    let s = p + c;
    let bb = s - p;
    let err = (p - (s - bb)) + (c - bb);
    let bits = s.to_bits();
    // inexact and even: the other neighbour of the exact sum (one ulp towards it) is the odd one
    let odd = if err != 0.0 && err.is_finite() && bits & 1 == 0 {
        f64::from_bits(if (err > 0.0) == (s > 0.0) { bits + 1 } else { bits - 1 })
    } else {
        s
    };
    odd as f32
}

/// The degree-7 Taylor polynomial of `e^r` by Estrin's scheme (3 dependent
/// FMAs deep, so several chunks overlap in the pipeline), for any lane type:
/// `c(i) = 1/i!`, `fma(a, b, c) = a * b + c` rounded once.
#[inline(always)]
fn polynomial<V: Copy>(r: V, c: impl Fn(usize) -> V, mul: impl Fn(V, V) -> V, fma: impl Fn(V, V, V) -> V) -> V {
    let r2 = mul(r, r);
    let r4 = mul(r2, r2);
    let q = |i: usize| fma(c(i + 1), r, c(i));
    let h0 = fma(q(2), r2, q(0));
    let h4 = fma(q(6), r2, q(4));
    fma(h4, r4, h0)
}

/// `2^n` for `-1022 <= n <= 1023`.
#[inline(always)]
fn pow2(n: i32) -> f64 {
    f64::from_bits(((n + 1023) as u64) << 52)
}

/// The tail (fewer than `LANES` values), summed in order; folds into `max` and `bad`.
#[inline(always)]
fn tail(z: &[f32], m: f32, out: &mut [f64], max: &mut f64, bad: &mut bool) -> f64 {
    tail_with(z, m, out, max, bad, f32::mul_add)
}

/// `tail` with the given `fma` (see [`exp32_with`]).
#[inline(always)]
fn tail_with(
    z: &[f32],
    m: f32,
    out: &mut [f64],
    max: &mut f64,
    bad: &mut bool,
    fma: impl Fn(f32, f32, f32) -> f32 + Copy,
) -> f64 {
    let mut sum = 0.0;
    for (&v, o) in z.iter().zip(out.iter_mut()) {
        *bad |= v.is_nan() | (v == f32::INFINITY);
        let v64 = f64::from(v);
        *max = if v64 > *max { v64 } else { *max };
        *o = exp32_with(v, m, fma);
        sum += *o;
    }
    sum
}

/// The lane maxima in order (`-inf` when empty).
#[inline(always)]
fn fold_max(tops: &[f32; LANES]) -> f64 {
    tops.iter().fold(f64::NEG_INFINITY, |a, &v| if f64::from(v) > a { f64::from(v) } else { a })
}

mod portable {
    use super::*;

    pub(crate) fn exp32_shifted_dot(z: &[f32], m: f32, w: &[f64], out: &mut [f64]) -> ExpDot {
        let n = z.len().min(w.len()).min(out.len());
        let (zc, ztail) = z[..n].as_chunks::<LANES>();
        let (wc, wtail) = w[..n].as_chunks::<LANES>();
        let (oc, otail) = out[..n].as_chunks_mut::<LANES>();
        let (mut acc, mut dot, mut tops, mut bad) =
            ([0.0f64; LANES], [0.0f64; LANES], [f32::NEG_INFINITY; LANES], false);
        for ((zs, ws), os) in zc.iter().zip(wc).zip(oc.iter_mut()) {
            for l in 0..LANES {
                let v = zs[l];
                bad |= v.is_nan() | (v == f32::INFINITY);
                tops[l] = max32(v, tops[l]);
                os[l] = exp32_with(v, m, fma32_soft);
                acc[l] += os[l];
                dot[l] += os[l] * ws[l];
            }
        }
        let mut max = fold_max(&tops);
        let sum = lane_sum(&acc) + tail_with(ztail, m, otail, &mut max, &mut bad, fma32_soft);
        ExpDot { sum, dot: finish_dot(&dot, otail, wtail), max: max + 0.0, bad }
    }
}

/// The 8-lane float32 part, shared by the AVX2 and AVX-512 builds (AVX-512F
/// implies AVX2 and FMA).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// `exp32` on 8 lanes before the power of two: the polynomial (0 where
    /// the argument is below `LO`) and `n`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp8(v: __m256, m: __m256, neg_m: __m256) -> (__m256, __m256i) {
        let d = _mm256_sub_ps(v, m);
        let bb = _mm256_sub_ps(d, v);
        let err = _mm256_add_ps(_mm256_sub_ps(v, _mm256_sub_ps(d, bb)), _mm256_sub_ps(neg_m, bb));
        let err = _mm256_min_ps(_mm256_max_ps(err, _mm256_set1_ps(-ERR_CAP)), _mm256_set1_ps(ERR_CAP));
        let dc = _mm256_min_ps(_mm256_max_ps(d, _mm256_set1_ps(LO)), _mm256_set1_ps(HI));
        let shift = _mm256_set1_ps(SHIFT);
        let t = _mm256_fmadd_ps(dc, _mm256_set1_ps(LOG2E), shift);
        let n = _mm256_sub_ps(t, shift);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), dc);
        let r = _mm256_add_ps(_mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r), err);
        let p = polynomial(
            r,
            |i| _mm256_set1_ps(INV_FACT[i]),
            |a, b| _mm256_mul_ps(a, b),
            |a, b, c| _mm256_fmadd_ps(a, b, c),
        );
        let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(d, _mm256_set1_ps(LO));
        let k = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(SHIFT.to_bits() as i32));
        (_mm256_and_ps(p, keep), k)
    }

    /// Lane bits of NaN or +inf values.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn bad8(v: __m256) -> i32 {
        let inf = _mm256_set1_ps(f32::INFINITY);
        _mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v), _mm256_cmp_ps::<_CMP_EQ_OQ>(v, inf)))
    }

    /// `p * 2^k` as float64, for 4 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn scale4(p: __m128, k: __m128i) -> __m256d {
        let e = _mm256_slli_epi64::<52>(_mm256_add_epi64(_mm256_cvtepi32_epi64(k), _mm256_set1_epi64x(1023)));
        _mm256_mul_pd(_mm256_cvtps_pd(p), _mm256_castsi256_pd(e))
    }

    /// Whether every lane of `k` is at least `min_normal` (`MIN_NORMAL_POWER`):
    /// then every `p * 2^k` is a normal float32 (`p` is in [0.7, 1.5), or 0
    /// where the argument is below `LO` or NaN, and there `k` is -150).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn all_normal(k: __m256i, min_normal: __m256i) -> bool {
        _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(min_normal, k))) == 0
    }

    /// `p * 2^k` as float64 (4 + 4 lanes) where all are normal float32 values:
    /// the product is exact in float32 too (an exponent add), and widening it is exact.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn widen_normal(p: __m256, k: __m256i) -> (__m256d, __m256d) {
        let scaled = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32::<23>(k)));
        (_mm256_cvtps_pd(_mm256_castps256_ps128(scaled)), _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(scaled)))
    }

    /// `p * 2^k` as float64 (4 + 4 lanes), any `k`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn widen(p: __m256, k: __m256i, min_normal: __m256i) -> (__m256d, __m256d) {
        if all_normal(k, min_normal) {
            widen_normal(p, k)
        } else {
            (
                scale4(_mm256_castps256_ps128(p), _mm256_castsi256_si128(k)),
                scale4(_mm256_extractf128_ps::<1>(p), _mm256_extracti128_si256::<1>(k)),
            )
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn exp32_shifted_dot(z: &[f32], m: f32, w: &[f64], out: &mut [f64]) -> ExpDot {
        let n = z.len().min(w.len()).min(out.len());
        let (zc, ztail) = z[..n].as_chunks::<LANES>();
        let (wc, wtail) = w[..n].as_chunks::<LANES>();
        let (oc, otail) = out[..n].as_chunks_mut::<LANES>();
        let (mv, neg_m) = (_mm256_set1_ps(m), _mm256_set1_ps(-m));
        let (mut acc0, mut acc1, mut dot0, mut dot1) =
            (_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd());
        let mut top = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut bad = 0;
        let min_normal = _mm256_set1_epi32(MIN_NORMAL_POWER);
        // One step: 8 values into `os`, the sums, the dot products.
        let mut add = |(lo, hi): (__m256d, __m256d), ws: &[f64; LANES], os: &mut [f64; LANES]| {
            // SAFETY: `ws` and `os` hold 8 values each.
            let (w0, w1) = unsafe { (_mm256_loadu_pd(ws.as_ptr()), _mm256_loadu_pd(ws.as_ptr().add(4))) };
            // SAFETY: as above.
            unsafe {
                _mm256_storeu_pd(os.as_mut_ptr(), lo);
                _mm256_storeu_pd(os.as_mut_ptr().add(4), hi);
            }
            acc0 = _mm256_add_pd(acc0, lo);
            acc1 = _mm256_add_pd(acc1, hi);
            dot0 = _mm256_add_pd(dot0, _mm256_mul_pd(lo, w0));
            dot1 = _mm256_add_pd(dot1, _mm256_mul_pd(hi, w1));
        };
        // Two steps per iteration share the constants' registers; the order of
        // the sums is that of one step at a time.
        let (zp, zrest) = zc.as_chunks::<2>();
        let (wp, wrest) = wc.as_chunks::<2>();
        let (op, orest) = oc.as_chunks_mut::<2>();
        for ((zs, ws), os) in zp.iter().zip(wp).zip(op.iter_mut()) {
            // SAFETY: `zs` holds 2 x 8 values.
            let (va, vb) = unsafe { (_mm256_loadu_ps(zs[0].as_ptr()), _mm256_loadu_ps(zs[1].as_ptr())) };
            bad |= bad8(va) | bad8(vb);
            top = _mm256_max_ps(vb, _mm256_max_ps(va, top));
            let (pa, ka) = exp8(va, mv, neg_m);
            let (pb, kb) = exp8(vb, mv, neg_m);
            if all_normal(_mm256_min_epi32(ka, kb), min_normal) {
                add(widen_normal(pa, ka), &ws[0], &mut os[0]);
                add(widen_normal(pb, kb), &ws[1], &mut os[1]);
            } else {
                add(widen(pa, ka, min_normal), &ws[0], &mut os[0]);
                add(widen(pb, kb, min_normal), &ws[1], &mut os[1]);
            }
        }
        for ((zs, ws), os) in zrest.iter().zip(wrest).zip(orest.iter_mut()) {
            // SAFETY: `zs` holds 8 values.
            let v = unsafe { _mm256_loadu_ps(zs.as_ptr()) };
            bad |= bad8(v);
            top = _mm256_max_ps(v, top);
            let (p, k) = exp8(v, mv, neg_m);
            add(widen(p, k, min_normal), ws, os);
        }
        let lanes = |a: __m256d, b: __m256d| {
            let mut v = [0.0f64; LANES];
            // SAFETY: `v` holds 8 values.
            unsafe {
                _mm256_storeu_pd(v.as_mut_ptr(), a);
                _mm256_storeu_pd(v.as_mut_ptr().add(4), b);
            }
            v
        };
        let mut tops = [0.0f32; LANES];
        // SAFETY: `tops` holds 8 values.
        unsafe { _mm256_storeu_ps(tops.as_mut_ptr(), top) };
        let (mut max, mut bad) = (fold_max(&tops), bad != 0);
        let sum = lane_sum(&lanes(acc0, acc1)) + tail(ztail, m, otail, &mut max, &mut bad);
        ExpDot { sum, dot: finish_dot(&lanes(dot0, dot1), otail, wtail), max: max + 0.0, bad }
    }
}

/// AVX-512F: two 8-lane chunks per 16-lane register.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::avx2::{bad8, exp8};
    use super::*;
    use std::arch::x86_64::*;

    /// `exp8` on 16 lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp16(v: __m512, m: __m512, neg_m: __m512) -> (__m512, __m512i) {
        let d = _mm512_sub_ps(v, m);
        let bb = _mm512_sub_ps(d, v);
        let err = _mm512_add_ps(_mm512_sub_ps(v, _mm512_sub_ps(d, bb)), _mm512_sub_ps(neg_m, bb));
        let err = _mm512_min_ps(_mm512_max_ps(err, _mm512_set1_ps(-ERR_CAP)), _mm512_set1_ps(ERR_CAP));
        let dc = _mm512_min_ps(_mm512_max_ps(d, _mm512_set1_ps(LO)), _mm512_set1_ps(HI));
        let shift = _mm512_set1_ps(SHIFT);
        let t = _mm512_fmadd_ps(dc, _mm512_set1_ps(LOG2E), shift);
        let n = _mm512_sub_ps(t, shift);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), dc);
        let r = _mm512_add_ps(_mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r), err);
        let p = polynomial(
            r,
            |i| _mm512_set1_ps(INV_FACT[i]),
            |a, b| _mm512_mul_ps(a, b),
            |a, b, c| _mm512_fmadd_ps(a, b, c),
        );
        let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(d, _mm512_set1_ps(LO));
        let k = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(SHIFT.to_bits() as i32));
        (_mm512_maskz_mov_ps(keep, p), k)
    }

    /// `p * 2^k` as float64, for 8 lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn scale8(p: __m256, k: __m256i) -> __m512d {
        let e = _mm512_slli_epi64::<52>(_mm512_add_epi64(_mm512_cvtepi32_epi64(k), _mm512_set1_epi64(1023)));
        _mm512_mul_pd(_mm512_cvtps_pd(p), _mm512_castsi512_pd(e))
    }

    /// `p * 2^k` as float64 (8 + 8 lanes) where every lane of `k` is at least
    /// `min_normal`: an exponent add in float32 (exact: all results are normal
    /// float32 values), widened exactly.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn widen_normal16(p: __m512, k: __m512i) -> (__m512d, __m512d) {
        let scaled = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), _mm512_slli_epi32::<23>(k)));
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(scaled)));
        (_mm512_cvtps_pd(_mm512_castps512_ps256(scaled)), _mm512_cvtps_pd(hi))
    }

    #[target_feature(enable = "avx512f")]
    pub(crate) fn exp32_shifted_dot(z: &[f32], m: f32, w: &[f64], out: &mut [f64]) -> ExpDot {
        let n = z.len().min(w.len()).min(out.len());
        let (zc, ztail) = z[..n].as_chunks::<LANES>();
        let (wc, wtail) = w[..n].as_chunks::<LANES>();
        let (oc, otail) = out[..n].as_chunks_mut::<LANES>();
        let (m16, neg_m16) = (_mm512_set1_ps(m), _mm512_set1_ps(-m));
        let (mut acc, mut dot) = (_mm512_setzero_pd(), _mm512_setzero_pd());
        let mut top = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut bad = 0u32;
        let min_normal = _mm512_set1_epi32(MIN_NORMAL_POWER);
        let mut put = |v: __m512d, ws: &[f64; LANES], os: &mut [f64; LANES]| {
            // SAFETY: `ws` and `os` hold 8 values.
            unsafe {
                _mm512_storeu_pd(os.as_mut_ptr(), v);
                dot = _mm512_add_pd(dot, _mm512_mul_pd(v, _mm512_loadu_pd(ws.as_ptr())));
            }
            acc = _mm512_add_pd(acc, v);
        };
        let (zp, zrest) = zc.as_chunks::<2>();
        let (wp, wrest) = wc.as_chunks::<2>();
        let (op, orest) = oc.as_chunks_mut::<2>();
        for ((zs, ws), os) in zp.iter().zip(wp).zip(op.iter_mut()) {
            // SAFETY: `zs` holds 16 values.
            let v = unsafe { _mm512_loadu_ps(zs.as_ptr().cast()) };
            bad |= u32::from(
                _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v)
                    | _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(v, _mm512_set1_ps(f32::INFINITY)),
            );
            // per lane of 8, the two chunks in order, as `max(v, top)` twice
            top = _mm512_max_ps(v, top);
            let (p, k) = exp16(v, m16, neg_m16);
            let (lo, hi) = if _mm512_cmplt_epi32_mask(k, min_normal) == 0 {
                widen_normal16(p, k)
            } else {
                let (p_lo, p_hi) =
                    (_mm512_castps512_ps256(p), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(p))));
                let (k_lo, k_hi) = (_mm512_castsi512_si256(k), _mm512_extracti64x4_epi64::<1>(k));
                (scale8(p_lo, k_lo), scale8(p_hi, k_hi))
            };
            let [o0, o1] = os;
            put(lo, &ws[0], o0);
            put(hi, &ws[1], o1);
        }
        // an odd chunk: the 8-lane part
        let mut top8 = _mm256_set1_ps(f32::NEG_INFINITY);
        for ((zs, ws), os) in zrest.iter().zip(wrest).zip(orest.iter_mut()) {
            // SAFETY: `zs` holds 8 values.
            let v = unsafe { _mm256_loadu_ps(zs.as_ptr()) };
            bad |= bad8(v) as u32;
            top8 = _mm256_max_ps(v, top8);
            let (p, k) = exp8(v, _mm512_castps512_ps256(m16), _mm512_castps512_ps256(neg_m16));
            put(scale8(p, k), ws, os);
        }
        let mut tops = [0.0f32; 2 * LANES];
        let mut odd = [0.0f32; LANES];
        // SAFETY: `tops` holds 16 values, `odd` 8.
        unsafe {
            _mm512_storeu_ps(tops.as_mut_ptr(), top);
            _mm256_storeu_ps(odd.as_mut_ptr(), top8);
        }
        // The maximum does not depend on the order (NaN is never taken, and
        // the sign of a zero maximum is dropped), so the lanes fold in any order.
        let mut max = fold_max(&std::array::from_fn(|l| max32(max32(tops[l], tops[l + LANES]), odd[l])));
        let mut bad = bad != 0;
        let (mut lanes, mut dots) = ([0.0f64; LANES], [0.0f64; LANES]);
        // SAFETY: both hold 8 values.
        unsafe {
            _mm512_storeu_pd(lanes.as_mut_ptr(), acc);
            _mm512_storeu_pd(dots.as_mut_ptr(), dot);
        }
        let sum = lane_sum(&lanes) + tail(ztail, m, otail, &mut max, &mut bad);
        ExpDot { sum, dot: finish_dot(&dots, otail, wtail), max: max + 0.0, bad }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::math::dot_lanes;

    /// Float32 values spread over the range softmax rows use, with the edge cases.
    fn row(e: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..e)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                match i % 37 {
                    5 => f32::NEG_INFINITY,
                    11 => -0.0,
                    _ => (x as f32 / u32::MAX as f32 - 0.5) * [2.0, 30.0, 250.0, 1e-3][(i / 7) % 4],
                }
            })
            .collect()
    }

    #[test]
    fn the_float64_fma_gives_the_bits_of_a_single_rounding() {
        let mut next = crate::rng::xorshift(0x9e37_79b9_7f4a_7c15);
        let special = [0.0, -0.0, 1.0, f32::MIN_POSITIVE, 1e-45, f32::MAX, f32::INFINITY, f32::NEG_INFINITY, f32::NAN];
        let mut checked = 0;
        for i in 0..2_000_000u32 {
            let bits = next();
            let (a, b) = (f32::from_bits(bits as u32), f32::from_bits((bits >> 32) as u32));
            let c = match i % 4 {
                // any value, any exponent
                0 => f32::from_bits(next() as u32),
                // near cancellation: c within a few ulp of -a*b, where one rounding matters most
                1 => -(a * b) * (1.0 + (next() % 64) as f32 * f32::EPSILON / 8.0),
                // the exact sum halfway-ish between floats: c a little above a*b's ulp
                2 => (a * b) * f32::EPSILON * ((next() % 16) as f32 / 8.0 - 1.0),
                _ => special[(next() % special.len() as u64) as usize],
            };
            let (a, b) = if i % 5 == 0 { (a, special[i as usize % special.len()]) } else { (a, b) };
            let (want, got) = (a.mul_add(b, c), fma32_soft(a, b, c));
            if want.is_nan() {
                assert!(got.is_nan(), "a={a:e} b={b:e} c={c:e}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "a={a:e} b={b:e} c={c:e}: {got:e} vs {want:e}");
                checked += 1;
            }
        }
        assert!(checked > 1_000_000);
        let mut double_rounded = 0;
        // double rounding: a * a halfway between two float32 values (u odd), c far below
        // float64's last bit of it, so that rounding the float64 sum to nearest would land
        // on the tie and round it to even whichever side c is on
        for u in (1..2048u32).step_by(2) {
            for (k, sign) in [(60, 1.0), (60, -1.0), (75, 1.0), (75, -1.0), (120, 1.0), (120, -1.0)] {
                for scale in [1.0f32, 2.0f32.powi(-40), 2.0f32.powi(40)] {
                    let a = (1.0 + u as f32 * 2f32.powi(-12)) * scale;
                    let c = sign * 2f32.powi(-k) * scale * scale;
                    let (want, got) = (a.mul_add(a, c), fma32_soft(a, a, c));
                    assert_eq!(got.to_bits(), want.to_bits(), "a={a:e} c={c:e}: {got:e} vs {want:e}");
                    let rounded_twice = (f64::from(a) * f64::from(a) + f64::from(c)) as f32;
                    double_rounded += usize::from(rounded_twice.to_bits() != want.to_bits());
                }
            }
        }
        // the family does reach the cases a plain float64 sum gets wrong
        assert!(double_rounded > 1000, "{double_rounded}");
        // the exp's own arguments
        for seed in 0..20 {
            let z = row(300, seed);
            for &v in &z {
                for (a, b, c) in [(v, LOG2E, SHIFT), (v * 1e-3, INV_FACT[7], INV_FACT[6]), (-v, LN2_HI, v)] {
                    assert_eq!(fma32_soft(a, b, c).to_bits(), a.mul_add(b, c).to_bits(), "{a:e} {b:e} {c:e}");
                }
            }
        }
    }

    #[test]
    fn values_are_within_two_ulp_of_float32_and_zero_below_the_limit() {
        for seed in 0..50 {
            let z = row(300, seed);
            let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for &v in &z {
                let got = exp32(v, m);
                let exact = (f64::from(v) - f64::from(m)).exp();
                if f64::from(v) - f64::from(m) < f64::from(LO) - 1e-3 {
                    assert_eq!(got.to_bits(), 0, "v={v} m={m}");
                } else if exact > 1e-300 {
                    assert!((got - exact).abs() <= exact * 2f64.powi(-22), "v={v} m={m} got={got} exact={exact}");
                }
            }
        }
        assert_eq!(exp32(f32::NEG_INFINITY, 3.0), 0.0);
        assert_eq!(exp32(-3e38, 3e38), 0.0);
        assert_eq!(exp32(1.5, 1.5), 1.0);
    }

    #[test]
    fn every_build_gives_the_bits_of_the_portable_one() {
        for e in [0usize, 1, 7, 8, 9, 15, 16, 17, 24, 64, 67, 256, 263] {
            let z = row(e, e as u32);
            let w: Vec<f64> = (0..e).map(|i| (i as f64 * 0.37).sin()).collect();
            let finite_max = z.iter().copied().filter(|v| v.is_finite()).fold(-1.0f32, f32::max);
            for m in [finite_max, finite_max - 3.0, 0.0] {
                let run = |simd: Simd| {
                    let mut out = vec![f64::NAN; e];
                    let r = exp32_shifted_dot(simd, &z, m, &w, &mut out);
                    (r, out)
                };
                let (want, want_out) = run(Simd::all()[0]);
                // the sum over the fixed lanes, pairwise, then the tail in order
                let full = e / LANES * LANES;
                let mut lanes = [0.0f64; LANES];
                for (i, v) in want_out[..full].iter().enumerate() {
                    lanes[i % LANES] += v;
                }
                let sum = want_out[full..].iter().fold(lane_sum(&lanes), |a, v| a + v);
                assert_eq!(want.sum.to_bits(), sum.to_bits(), "e={e}");
                assert_eq!(want.dot.to_bits(), dot_lanes(&want_out, &w).to_bits(), "e={e}");
                let top = z.iter().fold(f64::NEG_INFINITY, |a, &v| if f64::from(v) > a { f64::from(v) } else { a });
                assert_eq!(want.max, top, "e={e}");
                assert!(!want.bad);
                for simd in Simd::all() {
                    let (got, out) = run(simd);
                    assert_eq!(
                        (got.sum.to_bits(), got.dot.to_bits(), got.max.to_bits(), got.bad),
                        (want.sum.to_bits(), want.dot.to_bits(), want.max.to_bits(), want.bad),
                        "{simd:?} e={e} m={m}"
                    );
                    assert!(out.iter().zip(&want_out).all(|(a, b)| a.to_bits() == b.to_bits()), "{simd:?} e={e}");
                }
            }
        }
    }

    #[test]
    fn gaps_where_float32_results_turn_subnormal_give_the_portable_bits() {
        // z - m from -84 to -90 (results from normal float32 to subnormal, 2^-125
        // near -86.6), whole vectors on each side of the boundary and mixed ones
        let m = 1.25f32;
        let z: Vec<f32> = (0..4096).map(|i| m - 84.0 - i as f32 * (6.0 / 4096.0)).collect();
        let w: Vec<f64> = (0..z.len()).map(|i| 1.0 + (i % 5) as f64).collect();
        for shuffle in [false, true] {
            let z: Vec<f32> = if shuffle { (0..z.len()).map(|i| z[(i * 1031) % z.len()]).collect() } else { z.clone() };
            let mut want = vec![0.0; z.len()];
            let r0 = exp32_shifted_dot(Simd::all()[0], &z, m, &w, &mut want);
            for (v, o) in z.iter().zip(&want) {
                assert_eq!(o.to_bits(), exp32(*v, m).to_bits(), "v={v}");
            }
            for simd in Simd::all() {
                let mut out = vec![f64::NAN; z.len()];
                let r = exp32_shifted_dot(simd, &z, m, &w, &mut out);
                assert_eq!((r.sum.to_bits(), r.dot.to_bits()), (r0.sum.to_bits(), r0.dot.to_bits()), "{simd:?}");
                assert!(out.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{simd:?} {shuffle}");
            }
        }
    }

    #[test]
    fn nan_and_positive_infinity_are_reported_in_every_build() {
        for e in [3usize, 8, 16, 40] {
            for bad in [f32::NAN, f32::INFINITY] {
                for at in [0, e / 2, e - 1] {
                    let mut z = row(e, 7);
                    z[at] = bad;
                    let w = vec![1.0; e];
                    for simd in Simd::all() {
                        let mut out = vec![0.0; e];
                        let r = exp32_shifted_dot(simd, &z, 1.0, &w, &mut out);
                        assert!(r.bad, "{simd:?} e={e} at={at}");
                        assert!(out.iter().all(|v| v.is_finite()), "{simd:?} e={e} at={at}");
                    }
                }
            }
        }
    }
}
