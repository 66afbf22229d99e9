//! Vectorizable row kernels: read + validate + max, shifted `exp` with its sum,
//! and scaled accumulation.
//!
//! Each kernel is a branch-free loop that LLVM turns into SIMD code. On x86-64
//! the same body is compiled a second time with AVX2 + FMA enabled and chosen
//! at run time, so a portable build still uses the wide units where present.
//! Results do not depend on which version runs: every sum is taken over the
//! same fixed lanes in the same order, and FMA is only used where the scalar
//! path uses `mul_add` too.

use crate::route::Logit;

/// Lanes of the row kernels.
pub const LANES: usize = 8;

/// `e^x` in float64, branch-free, accurate to a few ulp for `x <= 709`,
/// down into the subnormal range (0 below about -745, and for -inf).
///
/// Cody-Waite range reduction `x = n ln2 + r`, `|r| <= ln2/2`, then the
/// degree-11 Taylor polynomial of `e^r` (truncation error < 7e-15 relative;
/// evaluated by Estrin's scheme), then
/// scaling by `2^n` as two exponent-built factors `2^(n/2) * 2^(n - n/2)`, so
/// results below 2^-1022 come out as subnormals instead of 0. `n` comes from
/// the 1.5 * 2^52 rounding trick, so no float-to-int conversion is needed.
#[inline(always)]
pub fn exp_f64(x: f64) -> f64 {
    let xc = x.clamp(EXP_LO, EXP_HI);
    let t = xc.mul_add(LOG2E, SHIFT);
    let n = t - SHIFT;
    let r = (-n).mul_add(LN2_HI, xc);
    let r = (-n).mul_add(LN2_LO, r);
    // Estrin's scheme: the same polynomial as Horner's, 4 dependent FMAs deep instead of 11.
    let c = |i: usize| INV_FACT[i];
    let r2 = r * r;
    let r4 = r2 * r2;
    let r8 = r4 * r4;
    let q0 = c(1).mul_add(r, c(0));
    let q2 = c(3).mul_add(r, c(2));
    let q4 = c(5).mul_add(r, c(4));
    let q6 = c(7).mul_add(r, c(6));
    let q8 = c(9).mul_add(r, c(8));
    let q10 = c(11).mul_add(r, c(10));
    let h0 = q2.mul_add(r2, q0);
    let h4 = q6.mul_add(r2, q4);
    let h8 = q10.mul_add(r2, q8);
    let p = h8.mul_add(r8, h4.mul_add(r4, h0));
    // Low bits of t hold n; m = n + 2048 > 0, so logical shifts split it.
    let m = t.to_bits().wrapping_sub(SHIFT.to_bits()).wrapping_add(2048);
    let n1 = (m >> 1).wrapping_sub(1024); // floor(n / 2)
    let n2 = m.wrapping_sub(2048).wrapping_sub(n1); // n - floor(n / 2)
    let s1 = f64::from_bits(n1.wrapping_add(1023) << 52);
    let s2 = f64::from_bits(n2.wrapping_add(1023) << 52);
    (p * s1) * s2
}

const LOG2E: f64 = std::f64::consts::LOG2_E;
const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000); // ln 2, upper bits
const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76); // ln 2 - LN2_HI
const SHIFT: f64 = 6_755_399_441_055_744.0; // 1.5 * 2^52
const EXP_LO: f64 = -746.0; // e^-746 rounds to 0
const EXP_HI: f64 = 709.0; // e^709 is the largest with both factors finite
/// 1/0!, 1/1!, ..., 1/11!: the Taylor coefficients of e^r.
const INV_FACT: [f64; 12] = [
    1.0,
    1.0,
    0.5,
    1.0 / 6.0,
    1.0 / 24.0,
    1.0 / 120.0,
    1.0 / 720.0,
    1.0 / 5_040.0,
    1.0 / 40_320.0,
    1.0 / 362_880.0,
    1.0 / 3_628_800.0,
    1.0 / 39_916_800.0,
];

/// Run `$f` compiled for AVX2 + FMA when the CPU has them, else the portable build.
macro_rules! dispatch {
    ($f:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU supports the features the function is compiled for.
                return unsafe { wide::$f($($arg),*) };
            }
        }
        // SAFETY: the portable build needs no CPU feature.
        unsafe { portable::$f($($arg),*) }
    }};
}

/// What a read pass learns about a row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowRead {
    /// The largest value.
    pub max: f64,
    /// Whether any value is NaN or +inf.
    pub bad: bool,
    /// `lane_max[l]` = largest value at the positions `e` with `e % 8 == l`
    /// (`-inf` for lanes without elements). Each is an element of the row, so
    /// the k-th largest lane maximum (k <= 8) bounds the k-th largest value from below.
    pub lane_max: [f64; LANES],
}

/// Copy `raw` into `out` as float64 and summarize it.
#[inline]
pub fn read_row<F: Logit>(raw: &[F], out: &mut [f64]) -> RowRead {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            if let Some(x) = F::as_f32(raw) {
                // SAFETY: the CPU supports AVX-512F.
                return unsafe { wide::read_f32_avx512(x, out) };
            }
            if let Some(x) = F::as_f64(raw) {
                // SAFETY: the CPU supports AVX-512F.
                return unsafe { wide::read_f64_avx512(x, out) };
            }
        }
    }
    dispatch!(read_row_impl(raw, out))
}

/// `out[e] = exp(z[e] - shift)`; returns the sum of `out`.
#[inline]
pub fn exp_shifted(z: &[f64], shift: f64, out: &mut [f64]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F.
            return unsafe { wide::exp_shifted_avx512(z, shift, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA.
            return unsafe { wide::exp_shifted_avx2(z, shift, out) };
        }
    }
    // SAFETY: the portable build needs no CPU feature.
    unsafe { portable::exp_shifted_impl(z, shift, out) }
}

/// `acc[e] += a * x[e]`.
#[inline]
pub fn add_scaled(acc: &mut [f64], a: f64, x: &[f64]) {
    dispatch!(add_scaled_impl(acc, a, x))
}

/// `out[e] = sigmoid(z[e])` (0 for -inf); returns the sum.
#[inline]
pub fn sigmoid_row(z: &[f64], out: &mut [f64]) -> f64 {
    dispatch!(sigmoid_row_impl(z, out))
}

macro_rules! kernels {
    ($($attr:meta)?) => {
        #[allow(unused_imports)]
        use super::*;

        $(#[$attr])?
        pub unsafe fn read_row_impl<F: Logit>(raw: &[F], out: &mut [f64]) -> RowRead {
            let mut max = [f64::NEG_INFINITY; LANES];
            let mut bad = [false; LANES];
            let mut r = raw.chunks_exact(LANES);
            let mut o = out.chunks_exact_mut(LANES);
            for (rc, oc) in (&mut r).zip(&mut o) {
                for l in 0..LANES {
                    let v = rc[l].to_f64();
                    oc[l] = v;
                    bad[l] |= v.is_nan() | (v == f64::INFINITY);
                    max[l] = if v > max[l] { v } else { max[l] };
                }
            }
            let mut b = bad.iter().any(|&x| x);
            for (l, (&rv, ov)) in r.remainder().iter().zip(o.into_remainder()).enumerate() {
                let v = rv.to_f64();
                *ov = v;
                b |= v.is_nan() | (v == f64::INFINITY);
                max[l] = if v > max[l] { v } else { max[l] };
            }
            let m = max.iter().copied().fold(f64::NEG_INFINITY, |a, v| if v > a { v } else { a });
            RowRead { max: m, bad: b, lane_max: max }
        }

        $(#[$attr])?
        #[allow(dead_code)] // the x86-64 build has a hand-vectorized version
        pub unsafe fn exp_shifted_impl(z: &[f64], shift: f64, out: &mut [f64]) -> f64 {
            let mut acc = [0.0f64; LANES];
            let mut zc = z.chunks_exact(LANES);
            let mut oc = out.chunks_exact_mut(LANES);
            for (zs, os) in (&mut zc).zip(&mut oc) {
                for l in 0..LANES {
                    let v = exp_f64(zs[l] - shift);
                    os[l] = v;
                    acc[l] += v;
                }
            }
            let mut tail = 0.0;
            for (&zv, ov) in zc.remainder().iter().zip(oc.into_remainder()) {
                let v = exp_f64(zv - shift);
                *ov = v;
                tail += v;
            }
            lane_sum(&acc) + tail
        }

        $(#[$attr])?
        pub unsafe fn add_scaled_impl(acc: &mut [f64], a: f64, x: &[f64]) {
            for (s, &v) in acc.iter_mut().zip(x) {
                *s += a * v;
            }
        }

        $(#[$attr])?
        pub unsafe fn sigmoid_row_impl(z: &[f64], out: &mut [f64]) -> f64 {
            let mut acc = [0.0f64; LANES];
            let mut zc = z.chunks_exact(LANES);
            let mut oc = out.chunks_exact_mut(LANES);
            for (zs, os) in (&mut zc).zip(&mut oc) {
                for l in 0..LANES {
                    let v = sigmoid(zs[l]);
                    os[l] = v;
                    acc[l] += v;
                }
            }
            let mut tail = 0.0;
            for (&zv, ov) in zc.remainder().iter().zip(oc.into_remainder()) {
                let v = sigmoid(zv);
                *ov = v;
                tail += v;
            }
            lane_sum(&acc) + tail
        }
    };
}

/// Logistic sigmoid in its stable form: `1 / (1 + e^-z)` for `z >= 0`,
/// `e^z / (1 + e^z)` below, so it is accurate down to about -745 (0 for -inf).
#[inline(always)]
pub fn sigmoid(z: f64) -> f64 {
    let e = exp_f64(-z.abs());
    let num = if z >= 0.0 { 1.0 } else { e };
    num / (1.0 + e)
}

/// Sum of the lanes in a fixed order (pairwise), the same in every build.
#[inline(always)]
fn lane_sum(acc: &[f64; LANES]) -> f64 {
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

mod portable {
    kernels!();
}

#[cfg(target_arch = "x86_64")]
mod wide {
    kernels!(target_feature(enable = "avx2,fma"));

    use std::arch::x86_64::*;

    /// `exp_f64` on 4 lanes, the same operations in the same order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp4(x: __m256d) -> __m256d {
        let shift = _mm256_set1_pd(SHIFT);
        let xc = _mm256_min_pd(_mm256_max_pd(x, _mm256_set1_pd(EXP_LO)), _mm256_set1_pd(EXP_HI));
        let t = _mm256_fmadd_pd(xc, _mm256_set1_pd(LOG2E), shift);
        let n = _mm256_sub_pd(t, shift);
        let r = _mm256_fnmadd_pd(n, _mm256_set1_pd(LN2_HI), xc);
        let r = _mm256_fnmadd_pd(n, _mm256_set1_pd(LN2_LO), r);
        let c = |i: usize| _mm256_set1_pd(INV_FACT[i]);
        let r2 = _mm256_mul_pd(r, r);
        let r4 = _mm256_mul_pd(r2, r2);
        let r8 = _mm256_mul_pd(r4, r4);
        let q0 = _mm256_fmadd_pd(c(1), r, c(0));
        let q2 = _mm256_fmadd_pd(c(3), r, c(2));
        let q4 = _mm256_fmadd_pd(c(5), r, c(4));
        let q6 = _mm256_fmadd_pd(c(7), r, c(6));
        let q8 = _mm256_fmadd_pd(c(9), r, c(8));
        let q10 = _mm256_fmadd_pd(c(11), r, c(10));
        let h0 = _mm256_fmadd_pd(q2, r2, q0);
        let h4 = _mm256_fmadd_pd(q6, r2, q4);
        let h8 = _mm256_fmadd_pd(q10, r2, q8);
        let p = _mm256_fmadd_pd(h8, r8, _mm256_fmadd_pd(h4, r4, h0));
        let m = _mm256_add_epi64(
            _mm256_sub_epi64(_mm256_castpd_si256(t), _mm256_set1_epi64x(SHIFT.to_bits() as i64)),
            _mm256_set1_epi64x(2048),
        );
        let n1 = _mm256_sub_epi64(_mm256_srli_epi64::<1>(m), _mm256_set1_epi64x(1024));
        let n2 = _mm256_sub_epi64(_mm256_sub_epi64(m, _mm256_set1_epi64x(2048)), n1);
        let bias = _mm256_set1_epi64x(1023);
        let s1 = _mm256_castsi256_pd(_mm256_slli_epi64::<52>(_mm256_add_epi64(n1, bias)));
        let s2 = _mm256_castsi256_pd(_mm256_slli_epi64::<52>(_mm256_add_epi64(n2, bias)));
        _mm256_mul_pd(_mm256_mul_pd(p, s1), s2)
    }

    /// `read_row` for float32 rows on AVX-512: the same lanes as the portable version.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn read_f32_avx512(raw: &[f32], out: &mut [f64]) -> RowRead {
        let n = raw.len().min(out.len());
        let full = n / LANES * LANES;
        let mut i = 0;
        let (mut acc, mut bad, inf) = (_mm512_set1_pd(f64::NEG_INFINITY), 0u8, _mm512_set1_pd(f64::INFINITY));
        while i < full {
            // SAFETY: i + 8 <= n <= both lengths.
            let v = unsafe { _mm512_cvtps_pd(_mm256_loadu_ps(raw.as_ptr().add(i))) };
            // SAFETY: as above.
            unsafe { _mm512_storeu_pd(out.as_mut_ptr().add(i), v) };
            bad |= _mm512_cmp_pd_mask::<_CMP_UNORD_Q>(v, v) | _mm512_cmp_pd_mask::<_CMP_EQ_OQ>(v, inf);
            acc = _mm512_max_pd(acc, v);
            i += LANES;
        }
        finish_read(acc, bad != 0, &raw[full..n], &mut out[full..n])
    }

    /// `read_row` for float64 rows on AVX-512.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn read_f64_avx512(raw: &[f64], out: &mut [f64]) -> RowRead {
        let n = raw.len().min(out.len());
        let full = n / LANES * LANES;
        let mut i = 0;
        let (mut acc, mut bad, inf) = (_mm512_set1_pd(f64::NEG_INFINITY), 0u8, _mm512_set1_pd(f64::INFINITY));
        while i < full {
            // SAFETY: i + 8 <= n <= both lengths.
            let v = unsafe { _mm512_loadu_pd(raw.as_ptr().add(i)) };
            // SAFETY: as above.
            unsafe { _mm512_storeu_pd(out.as_mut_ptr().add(i), v) };
            bad |= _mm512_cmp_pd_mask::<_CMP_UNORD_Q>(v, v) | _mm512_cmp_pd_mask::<_CMP_EQ_OQ>(v, inf);
            acc = _mm512_max_pd(acc, v);
            i += LANES;
        }
        finish_read(acc, bad != 0, &raw[full..n], &mut out[full..n])
    }

    /// Fold the vector part's lane maxima with the scalar tail (lane = tail index).
    #[target_feature(enable = "avx512f")]
    fn finish_read<F: Logit>(acc: __m512d, bad: bool, tail: &[F], out: &mut [f64]) -> RowRead {
        let mut max = [0.0f64; LANES];
        // SAFETY: `max` holds 8 values.
        unsafe { _mm512_storeu_pd(max.as_mut_ptr(), acc) };
        let mut b = bad;
        for (l, (&rv, ov)) in tail.iter().zip(out.iter_mut()).enumerate() {
            let v = rv.to_f64();
            *ov = v;
            b |= v.is_nan() | (v == f64::INFINITY);
            max[l] = if v > max[l] { v } else { max[l] };
        }
        let m = max.iter().copied().fold(f64::NEG_INFINITY, |a, v| if v > a { v } else { a });
        RowRead { max: m, bad: b, lane_max: max }
    }

    /// `exp_f64` on 8 lanes (AVX-512F), the same operations in the same order.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp8(x: __m512d) -> __m512d {
        let shift = _mm512_set1_pd(SHIFT);
        let xc = _mm512_min_pd(_mm512_max_pd(x, _mm512_set1_pd(EXP_LO)), _mm512_set1_pd(EXP_HI));
        let t = _mm512_fmadd_pd(xc, _mm512_set1_pd(LOG2E), shift);
        let n = _mm512_sub_pd(t, shift);
        let r = _mm512_fnmadd_pd(n, _mm512_set1_pd(LN2_HI), xc);
        let r = _mm512_fnmadd_pd(n, _mm512_set1_pd(LN2_LO), r);
        let c = |i: usize| _mm512_set1_pd(INV_FACT[i]);
        let r2 = _mm512_mul_pd(r, r);
        let r4 = _mm512_mul_pd(r2, r2);
        let r8 = _mm512_mul_pd(r4, r4);
        let q0 = _mm512_fmadd_pd(c(1), r, c(0));
        let q2 = _mm512_fmadd_pd(c(3), r, c(2));
        let q4 = _mm512_fmadd_pd(c(5), r, c(4));
        let q6 = _mm512_fmadd_pd(c(7), r, c(6));
        let q8 = _mm512_fmadd_pd(c(9), r, c(8));
        let q10 = _mm512_fmadd_pd(c(11), r, c(10));
        let h0 = _mm512_fmadd_pd(q2, r2, q0);
        let h4 = _mm512_fmadd_pd(q6, r2, q4);
        let h8 = _mm512_fmadd_pd(q10, r2, q8);
        let p = _mm512_fmadd_pd(h8, r8, _mm512_fmadd_pd(h4, r4, h0));
        let m = _mm512_add_epi64(
            _mm512_sub_epi64(_mm512_castpd_si512(t), _mm512_set1_epi64(SHIFT.to_bits() as i64)),
            _mm512_set1_epi64(2048),
        );
        let n1 = _mm512_sub_epi64(_mm512_srli_epi64::<1>(m), _mm512_set1_epi64(1024));
        let n2 = _mm512_sub_epi64(_mm512_sub_epi64(m, _mm512_set1_epi64(2048)), n1);
        let bias = _mm512_set1_epi64(1023);
        let s1 = _mm512_castsi512_pd(_mm512_slli_epi64::<52>(_mm512_add_epi64(n1, bias)));
        let s2 = _mm512_castsi512_pd(_mm512_slli_epi64::<52>(_mm512_add_epi64(n2, bias)));
        _mm512_mul_pd(_mm512_mul_pd(p, s1), s2)
    }

    /// `exp_shifted` on 8-lane AVX-512 vectors: lane l of the accumulator is
    /// lane l of the portable sum, so the result is bit-identical.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_shifted_avx512(z: &[f64], shift: f64, out: &mut [f64]) -> f64 {
        let n = z.len().min(out.len());
        let full = n / LANES * LANES;
        let s = _mm512_set1_pd(shift);
        let mut acc = _mm512_setzero_pd();
        let mut i = 0;
        while i < full {
            // SAFETY: i + 8 <= n <= both lengths.
            unsafe {
                let a = exp8(_mm512_sub_pd(_mm512_loadu_pd(z.as_ptr().add(i)), s));
                _mm512_storeu_pd(out.as_mut_ptr().add(i), a);
                acc = _mm512_add_pd(acc, a);
            }
            i += LANES;
        }
        let mut lanes = [0.0f64; LANES];
        // SAFETY: `lanes` holds 8 values.
        unsafe { _mm512_storeu_pd(lanes.as_mut_ptr(), acc) };
        let mut tail = 0.0;
        for (&zv, ov) in z[full..n].iter().zip(&mut out[full..n]) {
            let v = exp_f64(zv - shift);
            *ov = v;
            tail += v;
        }
        lane_sum(&lanes) + tail
    }

    /// `exp_shifted` with explicit 256-bit vectors (LLVM's SLP vectorizer
    /// chose 128-bit ones for the generic body); lanes as in the portable sum.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted_avx2(z: &[f64], shift: f64, out: &mut [f64]) -> f64 {
        let n = z.len().min(out.len());
        let full = n / LANES * LANES;
        let s = _mm256_set1_pd(shift);
        let mut acc0 = _mm256_setzero_pd();
        let mut acc1 = _mm256_setzero_pd();
        let mut i = 0;
        while i < full {
            // SAFETY: i + 8 <= n <= both lengths.
            unsafe {
                let a = exp4(_mm256_sub_pd(_mm256_loadu_pd(z.as_ptr().add(i)), s));
                let b = exp4(_mm256_sub_pd(_mm256_loadu_pd(z.as_ptr().add(i + 4)), s));
                _mm256_storeu_pd(out.as_mut_ptr().add(i), a);
                _mm256_storeu_pd(out.as_mut_ptr().add(i + 4), b);
                acc0 = _mm256_add_pd(acc0, a);
                acc1 = _mm256_add_pd(acc1, b);
            }
            i += LANES;
        }
        let mut lanes = [0.0f64; LANES];
        // SAFETY: `lanes` holds 8 values.
        unsafe {
            _mm256_storeu_pd(lanes.as_mut_ptr(), acc0);
            _mm256_storeu_pd(lanes.as_mut_ptr().add(4), acc1);
        }
        let mut tail = 0.0;
        for (&zv, ov) in z[full..n].iter().zip(&mut out[full..n]) {
            let v = exp_f64(zv - shift);
            *ov = v;
            tail += v;
        }
        lane_sum(&lanes) + tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0.0f64;
        let mut x = -708.0;
        while x < 709.0 {
            let rel = ((exp_f64(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 2e-14, "worst relative error {worst}");
        assert_eq!(exp_f64(f64::NEG_INFINITY), 0.0);
        assert_eq!(exp_f64(-800.0), 0.0);
        // Subnormal results keep their value (to the precision subnormals have).
        for x in [-709.5, -720.0, -740.0] {
            assert!((exp_f64(x) / x.exp() - 1.0).abs() < 1e-6, "{x}");
        }
        assert_eq!(exp_f64(0.0), 1.0);
    }

    #[test]
    fn every_build_gives_the_same_bits() {
        let z: Vec<f64> =
            (0..203).map(|i| (i as f64 * 1.37).sin() * 40.0 - if i % 17 == 0 { f64::INFINITY } else { 0.0 }).collect();
        let mut a = vec![0.0; z.len()];
        let mut b = vec![0.0; z.len()];
        // SAFETY: portable code.
        let sa = unsafe { portable::exp_shifted_impl(&z, 3.0, &mut a) };
        let sb = exp_shifted(&z, 3.0, &mut b);
        assert_eq!(sa.to_bits(), sb.to_bits());
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            let mut c = vec![0.0; z.len()];
            // SAFETY: the CPU supports AVX2 and FMA.
            let sc = unsafe { wide::exp_shifted_avx2(&z, 3.0, &mut c) };
            assert_eq!(sa.to_bits(), sc.to_bits());
            assert!(a.iter().zip(&c).all(|(x, y)| x.to_bits() == y.to_bits()));
        }
    }

    #[test]
    fn sigmoid_limits() {
        assert_eq!(sigmoid(f64::NEG_INFINITY), 0.0);
        assert_eq!(sigmoid(0.0), 0.5);
        assert!((sigmoid(800.0) - 1.0).abs() < 1e-300);
        assert_eq!(sigmoid(-800.0), 0.0);
        assert!((sigmoid(-705.0) / (-705.0f64).exp() - 1.0).abs() < 1e-12);
        assert!((sigmoid(-720.0) / sigmoid(-721.0) - 1f64.exp()).abs() < 1e-6);
    }

    #[test]
    fn kernels_agree_with_scalar_code() {
        let z: Vec<f64> = (0..37).map(|i| (i as f64 * 0.77).sin() * 5.0).collect();
        let mut out = vec![0.0; z.len()];
        let s = exp_shifted(&z, 5.0, &mut out);
        for (o, &v) in out.iter().zip(&z) {
            assert!((o - (v - 5.0).exp()).abs() < 1e-14);
        }
        assert!((s - out.iter().sum::<f64>()).abs() < 1e-12);
        let raw: Vec<f32> = z.iter().map(|&v| v as f32).collect();
        let mut back = vec![0.0; z.len()];
        let read = read_row(&raw, &mut back);
        for l in 0..LANES {
            let lane = raw.iter().skip(l).step_by(LANES).copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(read.lane_max[l], lane as f64);
        }
        let mut raw2 = raw.clone();
        raw2[33] = f32::NAN;
        assert!(read_row(&raw2, &mut back).bad);
        raw2[33] = 1.0;
        raw2[3] = f32::INFINITY;
        assert!(read_row(&raw2, &mut back).bad);
        // Every build agrees with the portable one, for both element types.
        for n in [0usize, 5, 8, 37, 64] {
            let r32: Vec<f32> = (0..n).map(|i| ((i * 7919 % 23) as f32) - 11.5).collect();
            let r64: Vec<f64> = r32.iter().map(|&v| f64::from(v)).collect();
            let (mut a, mut b) = (vec![0.0; n], vec![0.0; n]);
            // SAFETY: portable code.
            let want = unsafe { portable::read_row_impl(&r32, &mut a) };
            assert_eq!(read_row(&r32, &mut b), want);
            assert_eq!(read_row(&r64, &mut b), want);
            assert_eq!(a, b);
        }
    }
}
