//! Row kernels: read + validate + max, shifted `exp` with its sum, sigmoid,
//! scaled accumulation.
//!
//! Three builds, chosen once per routing call through a `Simd` level
//! (`crate::simd`): portable branch-free loops that LLVM vectorizes for the
//! baseline target; the same loops compiled with AVX2 + FMA; and explicit
//! 8-lane kernels (`exp`, read) written once over a small vector type whose
//! AVX2 (two 256-bit halves) and AVX-512 (one register) versions are the only
//! ISA-specific code. Results do not depend on which build runs: every sum is
//! taken over the same fixed lanes in the same order, and FMA is only used
//! where the scalar path uses `mul_add` too.

use crate::simd::{Simd, SimdLevel};
use crate::source::Logit;

/// Lanes of the row kernels.
pub(crate) const LANES: usize = 8;

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
pub(crate) fn exp_f64(x: f64) -> f64 {
    let xc = x.clamp(EXP_LO, EXP_HI);
    let t = xc.mul_add(LOG2E, SHIFT);
    let n = t - SHIFT;
    let r = (-n).mul_add(LN2_HI, xc);
    let r = (-n).mul_add(LN2_LO, r);
    let p = exp_polynomial(r, |i| INV_FACT[i], |a, b| a * b, f64::mul_add);
    // Low bits of t hold n; m = n + 2048 > 0, so logical shifts split it.
    let m = t.to_bits().wrapping_sub(SHIFT.to_bits()).wrapping_add(2048);
    let n1 = (m >> 1).wrapping_sub(1024); // floor(n / 2)
    let n2 = m.wrapping_sub(2048).wrapping_sub(n1); // n - floor(n / 2)
    let s1 = f64::from_bits(n1.wrapping_add(1023) << 52);
    let s2 = f64::from_bits(n2.wrapping_add(1023) << 52);
    (p * s1) * s2
}

/// The degree-11 Taylor polynomial of `e^r` by Estrin's scheme (the same
/// polynomial as Horner's, 4 dependent FMAs deep instead of 11), for any lane
/// type: `c(i)` is the coefficient `1/i!`, `fma(a, b, c) = a * b + c` with one
/// rounding. The scalar and vector `exp` share it, so they round alike.
#[inline(always)]
fn exp_polynomial<V: Copy>(r: V, c: impl Fn(usize) -> V, mul: impl Fn(V, V) -> V, fma: impl Fn(V, V, V) -> V) -> V {
    let r2 = mul(r, r);
    let r4 = mul(r2, r2);
    let r8 = mul(r4, r4);
    let q = |i: usize| fma(c(i + 1), r, c(i));
    let h0 = fma(q(2), r2, q(0));
    let h4 = fma(q(6), r2, q(4));
    let h8 = fma(q(10), r2, q(8));
    fma(h8, r8, fma(h4, r4, h0))
}

const LOG2E: f64 = std::f64::consts::LOG2_E;
const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000); // ln 2, upper bits
const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76); // ln 2 - LN2_HI
const SHIFT: f64 = 6_755_399_441_055_744.0; // 1.5 * 2^52
const EXP_LO: f64 = -746.0; // e^-746 rounds to 0
const EXP_HI: f64 = 709.0; // e^709 is the largest with both factors finite
/// From here up (`n >= -1020`) `p * 2^n` is normal, so one exponent-built
/// factor gives the two factors' bits (both products are exact).
const EXP_NORMAL_LO: f64 = -707.0;
/// `2^n = from_bits((bits(t) + EXP_BIAS_FROM_SHIFT) << 52)` for `n` in `[-1022, 1023]`.
const EXP_BIAS_FROM_SHIFT: i64 = 1023 - SHIFT.to_bits() as i64;
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

/// `ln x` in float64 for positive normal finite `x` (the routers' sums of
/// exponentials and their reciprocals), within 1 ulp of the C library's `log`;
/// a branch hands every other input to the standard library.
///
/// `x = 2^k m` with `m` in `[sqrt(1/2), sqrt(2))` from the bits (integer
/// operations only, so the 8-lane kernels do the same on AVX2), then with
/// `f = m - 1` (exact), `s = f / (2 + f)`: `ln m = 2 atanh(s) = f - (f^2/2 -
/// s (f^2/2 + R(s^2)))`, `R(z) = 2z/3 + 2z^2/5 + ... + 2z^10/21`, the atanh
/// series by Estrin's scheme (`|s| <= 0.1716`, truncation below `2^-60`
/// relative); then `k ln2` in two parts. One definition for the scalar and the
/// lane builds (`ln_parts`), so a token's logsumexp has the same bits whichever
/// kernel routed it.
#[inline(always)]
pub(crate) fn ln_f64(x: f64) -> f64 {
    if !(f64::MIN_POSITIVE..=f64::MAX).contains(&x) {
        return x.ln();
    }
    let (m, k) = split_log2(x);
    ln_parts(m, k, |c| c, |a, b| a + b, |a, b| a - b, |a, b| a * b, |a, b| a / b, f64::mul_add)
}

/// `(m, k)` with `x = 2^k m`, `m` in `[sqrt(1/2), sqrt(2))`, `k` as float64,
/// for positive normal `x`: the bits of `x - bits(sqrt(1/2))` split into an
/// exponent (shifted by 1024 to stay non-negative) and a mantissa offset.
#[inline(always)]
fn split_log2(x: f64) -> (f64, f64) {
    let t = x.to_bits().wrapping_sub(SQRT_HALF_BITS).wrapping_add(1024 << 52);
    let m = f64::from_bits((t & MANTISSA_BITS) + SQRT_HALF_BITS);
    // `t >> 52` < 2048 placed in the mantissa of 2^52, then 2^52 and the 1024 taken off (both exact).
    let k = (f64::from_bits(TWO52.to_bits() | (t >> 52)) - TWO52) - 1024.0;
    (m, k)
}

/// `ln(2^k m)` from `split_log2`'s parts, for any lane type (see `ln_f64`):
/// `c` makes a constant, `fma(a, b, c) = a * b + c` with one rounding.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn ln_parts<V: Copy>(
    m: V,
    k: V,
    c: impl Fn(f64) -> V,
    add: impl Fn(V, V) -> V,
    sub: impl Fn(V, V) -> V,
    mul: impl Fn(V, V) -> V,
    div: impl Fn(V, V) -> V,
    fma: impl Fn(V, V, V) -> V,
) -> V {
    let f = sub(m, c(1.0));
    let s = div(f, add(c(2.0), f));
    let z = mul(s, s);
    let z2 = mul(z, z);
    let z4 = mul(z2, z2);
    let z8 = mul(z4, z4);
    let q = |i: usize| fma(c(ATANH_SERIES[i + 1]), z, c(ATANH_SERIES[i]));
    let h0 = fma(q(2), z2, q(0));
    let h4 = fma(q(6), z2, q(4));
    let r = mul(z, fma(q(8), z8, fma(h4, z4, h0)));
    let hfsq = mul(c(0.5), mul(f, f));
    let lo = fma(k, c(LN2_LO), mul(s, add(hfsq, r)));
    // k * LN2_HI is exact (LN2_HI has 32 significant bits, |k| < 1100).
    fma(k, c(LN2_HI), sub(f, sub(hfsq, lo)))
}

const SQRT_HALF_BITS: u64 = 0x3fe6_a09e_667f_3bcd; // the float64 nearest sqrt(1/2)
const MANTISSA_BITS: u64 = (1 << 52) - 1;
const TWO52: f64 = 4_503_599_627_370_496.0; // 2^52
/// `2/3, 2/5, ..., 2/21`: `2 atanh(s) = 2s + s R(s^2)`, `R(z) = sum_i ATANH_SERIES[i] z^(i+1)`.
const ATANH_SERIES: [f64; 10] = [
    2.0 / 3.0,
    2.0 / 5.0,
    2.0 / 7.0,
    2.0 / 9.0,
    2.0 / 11.0,
    2.0 / 13.0,
    2.0 / 15.0,
    2.0 / 17.0,
    2.0 / 19.0,
    2.0 / 21.0,
];

/// `ln_f64` compiled for the level, whose FMA is an instruction (the baseline
/// build's `mul_add` is a call into the C library): the same bits.
#[inline]
pub(crate) fn ln_one(simd: Simd, x: f64) -> f64 {
    dispatch!(simd, ln_one(x))
}

/// `ln_f64` of 8 values at once (the same bits as 8 calls).
#[inline]
pub(crate) fn ln_lanes(simd: Simd, x: &[f64; LANES]) -> [f64; LANES] {
    dispatch!(simd, ln_lanes(x))
}

/// The lanes `ln_lanes` computed outside `ln_f64`'s domain get its answer.
#[inline(always)]
fn ln_fix_domain(x: &[f64; LANES], out: &mut [f64; LANES]) {
    for (o, &v) in out.iter_mut().zip(x) {
        if !(f64::MIN_POSITIVE..=f64::MAX).contains(&v) {
            *o = v.ln();
        }
    }
}

/// What a read pass learns about a row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RowRead {
    /// The largest value.
    pub max: f64,
    /// Whether any value is NaN or +inf.
    pub bad: bool,
    /// `lane_max[l]` = largest value at the positions `e` with `e % 8 == l`
    /// (`-inf` for lanes without elements). Each is an element of the row, so
    /// the k-th largest lane maximum (k <= 8) bounds the k-th largest value from below.
    pub lane_max: [f64; LANES],
}

/// Call `$f` of the build for `$simd`'s level: the caller's scope has the
/// modules `avx512`, `avx2` and `portable` (one build of the same kernels each)
/// and `SimdLevel` in scope.
macro_rules! dispatch {
    ($simd:expr, $f:ident($($arg:expr),*)) => {
        match $simd.level() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a `Simd` level never exceeds what the CPU supports.
            SimdLevel::Avx512 => unsafe { avx512::$f($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            SimdLevel::Avx2 => unsafe { avx2::$f($($arg),*) },
            _ => portable::$f($($arg),*),
        }
    };
}
pub(crate) use dispatch;

/// Copy `raw` into `out` as float64 and summarize it.
#[inline]
pub(crate) fn read_row<F: Logit>(simd: Simd, raw: &[F], out: &mut [f64]) -> RowRead {
    dispatch!(simd, read_row(raw, out))
}

/// `out[e] = exp(z[e] - shift)`; returns the sum of `out`.
#[inline]
pub(crate) fn exp_shifted(simd: Simd, z: &[f64], shift: f64, out: &mut [f64]) -> f64 {
    dispatch!(simd, exp_shifted(z, shift, out))
}

/// `acc[e] += a * x[e]`.
#[inline]
pub(crate) fn add_scaled(simd: Simd, acc: &mut [f64], a: f64, x: &[f64]) {
    dispatch!(simd, add_scaled(acc, a, x))
}

/// `out[e] = sigmoid(z[e])` (0 for -inf); returns the sum.
#[inline]
pub(crate) fn sigmoid_row(simd: Simd, z: &[f64], out: &mut [f64]) -> f64 {
    dispatch!(simd, sigmoid_row(z, out))
}

/// The loops LLVM vectorizes by itself, compiled with the given target features.
macro_rules! auto_vectorized {
    ($($feature:literal)?) => {
        /// `acc[e] += a * x[e]`.
        $(#[target_feature(enable = $feature)])?
        pub(crate) fn add_scaled(acc: &mut [f64], a: f64, x: &[f64]) {
            for (s, &v) in acc.iter_mut().zip(x) {
                *s += a * v;
            }
        }

        /// `out[e] = sigmoid(z[e])`; returns the sum over the fixed lanes.
        $(#[target_feature(enable = $feature)])?
        pub(crate) fn sigmoid_row(z: &[f64], out: &mut [f64]) -> f64 {
            map_and_sum(z, out, sigmoid)
        }
    };
}

/// `out[e] = f(z[e])`; returns the sum of `out` over the fixed lanes, then the tail.
#[inline(always)]
fn map_and_sum(z: &[f64], out: &mut [f64], f: impl Fn(f64) -> f64) -> f64 {
    let n = z.len().min(out.len());
    let (zc, ztail) = z[..n].as_chunks::<LANES>();
    let (oc, otail) = out[..n].as_chunks_mut::<LANES>();
    let mut acc = [0.0f64; LANES];
    for (zs, os) in zc.iter().zip(oc.iter_mut()) {
        for l in 0..LANES {
            let v = f(zs[l]);
            os[l] = v;
            acc[l] += v;
        }
    }
    let mut tail = 0.0;
    for (&zv, ov) in ztail.iter().zip(otail) {
        let v = f(zv);
        *ov = v;
        tail += v;
    }
    lane_sum(&acc) + tail
}

/// Fold the lane maxima of the full lanes with the tail (lane = tail index).
#[inline(always)]
fn finish_read<F: Logit>(mut max: [f64; LANES], mut bad: bool, tail: &[F], out: &mut [f64]) -> RowRead {
    for (l, (&rv, ov)) in tail.iter().zip(out.iter_mut()).enumerate() {
        let v = rv.to_f64();
        *ov = v;
        bad |= v.is_nan() | (v == f64::INFINITY);
        max[l] = if v > max[l] { v } else { max[l] };
    }
    let m = max.iter().copied().fold(f64::NEG_INFINITY, |a, v| if v > a { v } else { a });
    RowRead { max: m, bad, lane_max: max }
}

/// Eight values as float64 (exact for both element types).
#[inline(always)]
fn widen<F: Logit>(values: &[F; LANES]) -> [f64; LANES] {
    values.map(|v| v.to_f64())
}

/// Logistic sigmoid in its stable form: `1 / (1 + e^-z)` for `z >= 0`,
/// `e^z / (1 + e^z)` below, so it is accurate down to about -745 (0 for -inf).
#[inline(always)]
pub(crate) fn sigmoid(z: f64) -> f64 {
    let e = exp_f64(-z.abs());
    let num = if z >= 0.0 { 1.0 } else { e };
    num / (1.0 + e)
}

/// Below this logit `sqrt(softplus(z)) = e^(z/2) sqrt(1 - e^z / 2 + ...)` is
/// `e^(z/2)` to float64 precision (`e^-37 / 4 < 2^-55`), which stays
/// representable where `e^z` underflows.
const SOFTPLUS_TAIL: f64 = -37.0;

/// `sqrt(softplus(z))` (Megatron-Core `sqrtsoftplus`), with softplus in its stable
/// form `max(z, 0) + log1p(e^-|z|)`, and `e^(z/2)` below `SOFTPLUS_TAIL`
/// (0 for -inf). Scalar in every build, with the standard library's `exp` and
/// `log1p` (the same calls whatever the build): they have no vector kernel here.
#[inline(always)]
pub(crate) fn sqrt_softplus(z: f64) -> f64 {
    if z < SOFTPLUS_TAIL {
        (0.5 * z).exp()
    } else {
        (z.max(0.0) + (-z.abs()).exp().ln_1p()).sqrt()
    }
}

/// `log(sqrt(softplus(z)))`, finite for every finite `z` (-inf for -inf).
pub(crate) fn log_sqrt_softplus(z: f64) -> f64 {
    if z < SOFTPLUS_TAIL {
        0.5 * z
    } else {
        sqrt_softplus(z).ln()
    }
}

/// `d sqrt(softplus(z)) / dz = sigmoid(z) / (2 sqrt(softplus(z)))`
/// (`e^(z/2) / 2` below `SOFTPLUS_TAIL`; 0 for -inf).
pub(crate) fn sqrt_softplus_slope(z: f64) -> f64 {
    if z < SOFTPLUS_TAIL {
        0.5 * (0.5 * z).exp()
    } else {
        sigmoid(z) / (2.0 * sqrt_softplus(z))
    }
}

/// `out[e] = sqrt(softplus(z[e]))` (0 for -inf); returns the sum over the fixed lanes.
pub(crate) fn sqrt_softplus_row(z: &[f64], out: &mut [f64]) -> f64 {
    map_and_sum(z, out, sqrt_softplus)
}

/// Sum of the lanes in a fixed order (pairwise), the same in every build.
#[inline(always)]
pub(crate) fn lane_sum(acc: &[f64; LANES]) -> f64 {
    lane_sum_by(acc, |a, b| a + b)
}

/// `lane_sum`'s pairing for any lane type (for example whole columns of
/// tokens, summed vertically): the one place that fixes the order.
#[inline(always)]
pub(crate) fn lane_sum_by<V: Copy>(acc: &[V; LANES], add: impl Fn(V, V) -> V) -> V {
    add(add(add(acc[0], acc[4]), add(acc[2], acc[6])), add(add(acc[1], acc[5]), add(acc[3], acc[7])))
}

mod portable {
    use super::*;

    auto_vectorized!();

    pub(crate) fn read_row<F: Logit>(raw: &[F], out: &mut [f64]) -> RowRead {
        let n = raw.len().min(out.len());
        let (rc, rtail) = raw[..n].as_chunks::<LANES>();
        let (oc, otail) = out[..n].as_chunks_mut::<LANES>();
        let mut max = [f64::NEG_INFINITY; LANES];
        let mut bad = [false; LANES];
        for (r, o) in rc.iter().zip(oc.iter_mut()) {
            for l in 0..LANES {
                let v = r[l].to_f64();
                o[l] = v;
                bad[l] |= v.is_nan() | (v == f64::INFINITY);
                max[l] = if v > max[l] { v } else { max[l] };
            }
        }
        finish_read(max, bad.iter().any(|&b| b), rtail, otail)
    }

    pub(crate) fn exp_shifted(z: &[f64], shift: f64, out: &mut [f64]) -> f64 {
        map_and_sum(z, out, |v| exp_f64(v - shift))
    }

    pub(crate) fn ln_lanes(x: &[f64; LANES]) -> [f64; LANES] {
        x.map(ln_f64)
    }

    pub(crate) fn ln_one(x: f64) -> f64 {
        ln_f64(x)
    }

    pub(crate) fn exp_shifted_dot<F: Logit>(z: &[F], shift: f64, w: &[f64], out: &mut [f64]) -> ExpDot {
        let n = z.len().min(out.len());
        let (zc, ztail) = z[..n].as_chunks::<LANES>();
        let (oc, otail) = out[..n].as_chunks_mut::<LANES>();
        let (mut acc, mut max, mut bad) = ([0.0f64; LANES], f64::NEG_INFINITY, false);
        for (zs, os) in zc.iter().zip(oc.iter_mut()) {
            for l in 0..LANES {
                let v = zs[l].to_f64();
                bad |= v.is_nan() | (v == f64::INFINITY);
                max = if v > max { v } else { max };
                let a = exp_f64(v - shift);
                os[l] = a;
                acc[l] += a;
            }
        }
        let tail = exp_dot_tail(ztail, shift, otail, &mut max, &mut bad);
        ExpDot { sum: lane_sum(&acc) + tail, dot: dot_lanes(&out[..n], w), max, bad }
    }
}

/// The explicit 8-lane kernels, written once over `F8`; `$feature` is the
/// instruction set `F8`'s methods need.
#[cfg(target_arch = "x86_64")]
macro_rules! vector_kernels {
    ($feature:literal) => {
        /// `exp_f64` on 8 lanes: the same operations in the same order, except that
        /// `2^n` is one factor where every lane's result is normal (the same exact product).
        #[inline]
        #[target_feature(enable = $feature)]
        fn exp8(x: F8) -> F8 {
            let shift = F8::splat(SHIFT);
            let xc = x.max(F8::splat(EXP_LO)).min(F8::splat(EXP_HI));
            let t = xc.mul_add(F8::splat(LOG2E), shift);
            let n = t.sub(shift);
            let r = n.neg_mul_add(F8::splat(LN2_HI), xc);
            let r = n.neg_mul_add(F8::splat(LN2_LO), r);
            let p = exp_polynomial(r, |i| F8::splat(INV_FACT[i]), |a, b| a.mul(b), |a, b, c| a.mul_add(b, c));
            if xc.any_below(F8::splat(EXP_NORMAL_LO)) {
                p.scale_by_exponent_of(t)
            } else {
                p.scale_normal(t)
            }
        }

        /// `ln_one`: `ln_f64` with the level's FMA instruction.
        #[target_feature(enable = $feature)]
        pub(crate) fn ln_one(x: f64) -> f64 {
            ln_f64(x)
        }

        /// `ln_lanes`: `ln_f64`'s operations on 8 lanes.
        #[target_feature(enable = $feature)]
        pub(crate) fn ln_lanes(x: &[f64; LANES]) -> [f64; LANES] {
            let (m, k) = F8::load(x).split_log2();
            let v = ln_parts(
                m,
                k,
                |c| F8::splat(c),
                |a, b| a.add(b),
                |a, b| a.sub(b),
                |a, b| a.mul(b),
                |a, b| a.div(b),
                |a, b, c| a.mul_add(b, c),
            );
            let mut out = [0.0f64; LANES];
            v.store(&mut out);
            ln_fix_domain(x, &mut out);
            out
        }

        /// `exp_shifted`: lane l of the accumulator is lane l of the portable sum.
        #[target_feature(enable = $feature)]
        pub(crate) fn exp_shifted(z: &[f64], shift: f64, out: &mut [f64]) -> f64 {
            let n = z.len().min(out.len());
            let (zc, ztail) = z[..n].as_chunks::<LANES>();
            let (oc, otail) = out[..n].as_chunks_mut::<LANES>();
            let s = F8::splat(shift);
            let mut acc = F8::splat(0.0);
            for (zs, os) in zc.iter().zip(oc.iter_mut()) {
                let a = exp8(F8::load(zs).sub(s));
                a.store(os);
                acc = acc.add(a);
            }
            let mut lanes = [0.0f64; LANES];
            acc.store(&mut lanes);
            let mut tail = 0.0;
            for (&zv, ov) in ztail.iter().zip(otail) {
                let v = exp_f64(zv - shift);
                *ov = v;
                tail += v;
            }
            lane_sum(&lanes) + tail
        }

        /// `read_row`: the same lanes as the portable version.
        #[target_feature(enable = $feature)]
        pub(crate) fn read_row<F: Logit>(raw: &[F], out: &mut [f64]) -> RowRead {
            if let Some(read) = read_row_narrow(raw, out) {
                return read;
            }
            let n = raw.len().min(out.len());
            let (rc, rtail) = raw[..n].as_chunks::<LANES>();
            let (oc, otail) = out[..n].as_chunks_mut::<LANES>();
            let inf = F8::splat(f64::INFINITY);
            let mut acc = F8::splat(f64::NEG_INFINITY);
            let mut bad = 0u32;
            for (r, o) in rc.iter().zip(oc.iter_mut()) {
                let v = F8::load(&widen(r));
                v.store(o);
                bad |= v.nan_or_equal_bits(inf);
                acc = acc.max(v);
            }
            let mut max = [0.0f64; LANES];
            acc.store(&mut max);
            finish_read(max, bad != 0, rtail, otail)
        }

        /// `exp_shifted` and `dot_lanes` of its output with `w`, in one pass
        /// that also reads (widens) and summarizes `z`: the lanes and the order of both.
        #[target_feature(enable = $feature)]
        pub(crate) fn exp_shifted_dot<F: Logit>(z: &[F], shift: f64, w: &[f64], out: &mut [f64]) -> ExpDot {
            let n = z.len().min(w.len()).min(out.len());
            let (zc, ztail) = z[..n].as_chunks::<LANES>();
            let (wc, wtail) = w[..n].as_chunks::<LANES>();
            let (oc, otail) = out[..n].as_chunks_mut::<LANES>();
            let (s, inf) = (F8::splat(shift), F8::splat(f64::INFINITY));
            let (mut acc, mut dot, mut top) = (F8::splat(0.0), F8::splat(0.0), F8::splat(f64::NEG_INFINITY));
            let mut bad = 0u32;
            for ((zs, ws), os) in zc.iter().zip(wc).zip(oc.iter_mut()) {
                let v = F8::load(&widen(zs));
                bad |= v.nan_or_equal_bits(inf);
                top = top.max(v);
                let a = exp8(v.sub(s));
                a.store(os);
                acc = acc.add(a);
                dot = dot.add(a.mul(F8::load(ws)));
            }
            let (mut lanes, mut dots, mut tops) = ([0.0f64; LANES], [0.0f64; LANES], [0.0f64; LANES]);
            acc.store(&mut lanes);
            dot.store(&mut dots);
            top.store(&mut tops);
            let mut max = tops.iter().copied().fold(f64::NEG_INFINITY, |a, v| if v > a { v } else { a });
            let mut bad = bad != 0;
            let tail = exp_dot_tail(ztail, shift, otail, &mut max, &mut bad);
            ExpDot { sum: lane_sum(&lanes) + tail, dot: finish_dot(&dots, otail, wtail), max, bad }
        }
    };
}

/// `F8`'s lane-wise operations (`mul_add(b, c)` = `self * b + c` and
/// `neg_mul_add(b, c)` = `c - self * b`, one rounding each): one intrinsic
/// each, applied to `F8`'s registers by `$apply`.
#[cfg(target_arch = "x86_64")]
macro_rules! lane_ops {
    ($feature:literal, $apply:ident; $($name:ident($($arg:ident),*) => $intrinsic:ident;)*) => {
        $(
            #[inline]
            #[target_feature(enable = $feature)]
            fn $name(self, $($arg: F8),*) -> F8 {
                $apply!($intrinsic(self, $($arg),*))
            }
        )*
    };
}

/// AVX2 + FMA: `F8` is two 256-bit halves.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    auto_vectorized!("avx2,fma");
    vector_kernels!("avx2,fma");

    #[derive(Clone, Copy)]
    struct F8(__m256d, __m256d);

    /// `$f` applied to both halves.
    macro_rules! halves {
        ($f:ident($($a:ident),*)) => {
            F8($f($($a.0),*), $f($($a.1),*))
        };
    }

    impl F8 {
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        fn splat(x: f64) -> F8 {
            F8(_mm256_set1_pd(x), _mm256_set1_pd(x))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        fn load(v: &[f64; LANES]) -> F8 {
            // SAFETY: `v` holds 8 values.
            unsafe { F8(_mm256_loadu_pd(v.as_ptr()), _mm256_loadu_pd(v.as_ptr().add(4))) }
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        fn store(self, v: &mut [f64; LANES]) {
            // SAFETY: `v` holds 8 values.
            unsafe {
                _mm256_storeu_pd(v.as_mut_ptr(), self.0);
                _mm256_storeu_pd(v.as_mut_ptr().add(4), self.1);
            }
        }
        lane_ops! { "avx2,fma", halves;
            add(b) => _mm256_add_pd;
            sub(b) => _mm256_sub_pd;
            mul(b) => _mm256_mul_pd;
            div(b) => _mm256_div_pd;
            min(b) => _mm256_min_pd;
            max(b) => _mm256_max_pd;
            mul_add(b, c) => _mm256_fmadd_pd;
            neg_mul_add(b, c) => _mm256_fnmadd_pd;
        }
        /// Bit l set when lane l is NaN or equal to `b`'s.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        fn nan_or_equal_bits(self, b: F8) -> u32 {
            let half = |v: __m256d, w: __m256d| {
                _mm256_movemask_pd(_mm256_or_pd(_mm256_cmp_pd::<_CMP_UNORD_Q>(v, v), _mm256_cmp_pd::<_CMP_EQ_OQ>(v, w)))
                    as u32
            };
            half(self.0, b.0) | (half(self.1, b.1) << 4)
        }
        /// `split_log2` on each lane.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        fn split_log2(self) -> (F8, F8) {
            let (a, b) = (split_log2_4(self.0), split_log2_4(self.1));
            (F8(a.0, b.0), F8(a.1, b.1))
        }
        /// `self * 2^n`, n held in the low bits of `t` by the 1.5 * 2^52 trick.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        fn scale_by_exponent_of(self, t: F8) -> F8 {
            halves!(scale4(self, t))
        }
        /// `scale_by_exponent_of` for `n >= -1020`, with one factor.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        fn scale_normal(self, t: F8) -> F8 {
            halves!(scale4_normal(self, t))
        }
        /// Whether any lane is below `b`'s.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        fn any_below(self, b: F8) -> bool {
            let below =
                _mm256_or_pd(_mm256_cmp_pd::<_CMP_LT_OQ>(self.0, b.0), _mm256_cmp_pd::<_CMP_LT_OQ>(self.1, b.1));
            _mm256_movemask_pd(below) != 0
        }
    }

    /// `read_row` of a float32 row here; `None` for float64 rows.
    #[inline(always)]
    fn read_row_narrow<F: Logit>(raw: &[F], out: &mut [f64]) -> Option<RowRead> {
        // SAFETY: this module's kernels run only where the CPU has AVX2 and FMA.
        F::as_f32(raw).map(|raw| unsafe { read_row_f32(raw, out) })
    }

    /// `read_row` of a float32 row, its checks and lane maxima taken in float32
    /// (eight lanes per register, where the float64 loop needs two; widening is
    /// exact and monotone and keeps NaN and infinities, so they are the float64
    /// answers), each value widened once.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn read_row_f32(raw: &[f32], out: &mut [f64]) -> RowRead {
        let n = raw.len().min(out.len());
        let (rc, rtail) = raw[..n].as_chunks::<LANES>();
        let (oc, otail) = out[..n].as_chunks_mut::<LANES>();
        let inf = _mm256_set1_ps(f32::INFINITY);
        let mut top = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut bad = _mm256_setzero_ps();
        for (r, o) in rc.iter().zip(oc.iter_mut()) {
            // SAFETY: `r` and `o` hold 8 values each.
            let v = unsafe { _mm256_loadu_ps(r.as_ptr()) };
            // SAFETY: as above.
            unsafe {
                _mm256_storeu_pd(o.as_mut_ptr(), _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
                _mm256_storeu_pd(o.as_mut_ptr().add(4), _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v)));
            }
            let nan_or_inf = _mm256_or_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v), _mm256_cmp_ps::<_CMP_EQ_OQ>(v, inf));
            bad = _mm256_or_ps(bad, nan_or_inf);
            top = _mm256_max_ps(top, v);
        }
        let mut tops = [0.0f32; LANES];
        // SAFETY: `tops` holds 8 values.
        unsafe { _mm256_storeu_ps(tops.as_mut_ptr(), top) };
        finish_read(tops.map(f64::from), _mm256_movemask_ps(bad) != 0, rtail, otail)
    }

    /// `scale_normal` on one half.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn scale4_normal(p: __m256d, t: __m256d) -> __m256d {
        let biased = _mm256_add_epi64(_mm256_castpd_si256(t), _mm256_set1_epi64x(EXP_BIAS_FROM_SHIFT));
        _mm256_mul_pd(p, _mm256_castsi256_pd(_mm256_slli_epi64::<52>(biased)))
    }

    /// `split_log2` on one half, with the same integer operations.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn split_log2_4(x: __m256d) -> (__m256d, __m256d) {
        let c = _mm256_set1_epi64x(SQRT_HALF_BITS as i64);
        let t = _mm256_add_epi64(_mm256_sub_epi64(_mm256_castpd_si256(x), c), _mm256_set1_epi64x(1024 << 52));
        let m = _mm256_add_epi64(_mm256_and_si256(t, _mm256_set1_epi64x(MANTISSA_BITS as i64)), c);
        let kb = _mm256_or_si256(_mm256_srli_epi64::<52>(t), _mm256_set1_epi64x(TWO52.to_bits() as i64));
        let k = _mm256_sub_pd(_mm256_sub_pd(_mm256_castsi256_pd(kb), _mm256_set1_pd(TWO52)), _mm256_set1_pd(1024.0));
        (_mm256_castsi256_pd(m), k)
    }

    /// `scale_by_exponent_of` on one half, as `exp_f64` does it.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn scale4(p: __m256d, t: __m256d) -> __m256d {
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
}

/// AVX-512F: `F8` is one 512-bit register. The auto-vectorized loops are the
/// AVX2 build's (the level implies AVX2 + FMA).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    pub(crate) use super::avx2::{add_scaled, sigmoid_row};

    /// No separate float32 read: one 512-bit register already holds a chunk's
    /// eight values widened, with its NaN/+inf checks in mask registers.
    #[inline(always)]
    fn read_row_narrow<F: Logit>(_: &[F], _: &mut [f64]) -> Option<RowRead> {
        None
    }
    vector_kernels!("avx512f");

    #[derive(Clone, Copy)]
    struct F8(__m512d);

    /// `$f` applied to the register.
    macro_rules! whole {
        ($f:ident($($a:ident),*)) => {
            F8($f($($a.0),*))
        };
    }

    impl F8 {
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn splat(x: f64) -> F8 {
            F8(_mm512_set1_pd(x))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn load(v: &[f64; LANES]) -> F8 {
            // SAFETY: `v` holds 8 values.
            F8(unsafe { _mm512_loadu_pd(v.as_ptr()) })
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn store(self, v: &mut [f64; LANES]) {
            // SAFETY: `v` holds 8 values.
            unsafe { _mm512_storeu_pd(v.as_mut_ptr(), self.0) }
        }
        lane_ops! { "avx512f", whole;
            add(b) => _mm512_add_pd;
            sub(b) => _mm512_sub_pd;
            mul(b) => _mm512_mul_pd;
            div(b) => _mm512_div_pd;
            min(b) => _mm512_min_pd;
            max(b) => _mm512_max_pd;
            mul_add(b, c) => _mm512_fmadd_pd;
            neg_mul_add(b, c) => _mm512_fnmadd_pd;
        }
        /// Bit l set when lane l is NaN or equal to `b`'s.
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn nan_or_equal_bits(self, b: F8) -> u32 {
            u32::from(
                _mm512_cmp_pd_mask::<_CMP_UNORD_Q>(self.0, self.0) | _mm512_cmp_pd_mask::<_CMP_EQ_OQ>(self.0, b.0),
            )
        }
        /// `split_log2` on each lane, with the same integer operations.
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn split_log2(self) -> (F8, F8) {
            let c = _mm512_set1_epi64(SQRT_HALF_BITS as i64);
            let t = _mm512_add_epi64(_mm512_sub_epi64(_mm512_castpd_si512(self.0), c), _mm512_set1_epi64(1024 << 52));
            let m = _mm512_add_epi64(_mm512_and_si512(t, _mm512_set1_epi64(MANTISSA_BITS as i64)), c);
            let kb = _mm512_or_si512(_mm512_srli_epi64::<52>(t), _mm512_set1_epi64(TWO52.to_bits() as i64));
            let k =
                _mm512_sub_pd(_mm512_sub_pd(_mm512_castsi512_pd(kb), _mm512_set1_pd(TWO52)), _mm512_set1_pd(1024.0));
            (F8(_mm512_castsi512_pd(m)), F8(k))
        }
        /// `self * 2^n`, n held in the low bits of `t` by the 1.5 * 2^52 trick.
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn scale_by_exponent_of(self, t: F8) -> F8 {
            let m = _mm512_add_epi64(
                _mm512_sub_epi64(_mm512_castpd_si512(t.0), _mm512_set1_epi64(SHIFT.to_bits() as i64)),
                _mm512_set1_epi64(2048),
            );
            let n1 = _mm512_sub_epi64(_mm512_srli_epi64::<1>(m), _mm512_set1_epi64(1024));
            let n2 = _mm512_sub_epi64(_mm512_sub_epi64(m, _mm512_set1_epi64(2048)), n1);
            let bias = _mm512_set1_epi64(1023);
            let s1 = _mm512_castsi512_pd(_mm512_slli_epi64::<52>(_mm512_add_epi64(n1, bias)));
            let s2 = _mm512_castsi512_pd(_mm512_slli_epi64::<52>(_mm512_add_epi64(n2, bias)));
            F8(_mm512_mul_pd(_mm512_mul_pd(self.0, s1), s2))
        }
        /// `scale_by_exponent_of` for `n >= -1020`, with one factor.
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn scale_normal(self, t: F8) -> F8 {
            let biased = _mm512_add_epi64(_mm512_castpd_si512(t.0), _mm512_set1_epi64(EXP_BIAS_FROM_SHIFT));
            F8(_mm512_mul_pd(self.0, _mm512_castsi512_pd(_mm512_slli_epi64::<52>(biased))))
        }
        /// Whether any lane is below `b`'s.
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn any_below(self, b: F8) -> bool {
            _mm512_cmp_pd_mask::<_CMP_LT_OQ>(self.0, b.0) != 0
        }
    }
}

/// What `exp_shifted_dot` computes besides `out`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ExpDot {
    /// `sum_e out_e` (as `exp_shifted` sums).
    pub sum: f64,
    /// `dot_lanes(out, w)`.
    pub dot: f64,
    /// The largest `z_e` (`-inf` for an empty row; NaN is not counted).
    pub max: f64,
    /// Whether any `z_e` is NaN or +inf.
    pub bad: bool,
}

/// `out[e] = exp(z[e] - shift)` with `z` widened to float64, and the row's
/// sum, dot product with `w`, maximum and validity, from one pass over the
/// row: a caller that knows the maximum beforehand reads the row once, and
/// checks `max` and `bad` to see whether it knew right.
#[inline]
pub(crate) fn exp_shifted_dot<F: Logit>(simd: Simd, z: &[F], shift: f64, w: &[f64], out: &mut [f64]) -> ExpDot {
    dispatch!(simd, exp_shifted_dot(z, shift, w, out))
}

/// The tail of `exp_shifted_dot` (fewer than `LANES` values): their `exp`
/// into `out`, summed in order; folds them into `max` and `bad`.
#[inline(always)]
fn exp_dot_tail<F: Logit>(z: &[F], shift: f64, out: &mut [f64], max: &mut f64, bad: &mut bool) -> f64 {
    let mut tail = 0.0;
    for (&zv, ov) in z.iter().zip(out.iter_mut()) {
        let v = zv.to_f64();
        *bad |= v.is_nan() | (v == f64::INFINITY);
        *max = if v > *max { v } else { *max };
        let a = exp_f64(v - shift);
        *ov = a;
        tail += a;
    }
    tail
}

/// `sum_e a_e b_e` over the fixed lanes (products, then sums: no FMA, so
/// every build rounds alike), the lanes in order, then the tail.
#[inline(always)]
pub(crate) fn dot_lanes(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    let (ac, at) = a[..n].as_chunks::<LANES>();
    let (bc, bt) = b[..n].as_chunks::<LANES>();
    let mut acc = [0.0f64; LANES];
    for (x, y) in ac.iter().zip(bc) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    finish_dot(&acc, at, bt)
}

/// The lanes of a dot product in order, plus the products of the tails.
#[inline(always)]
pub(crate) fn finish_dot(acc: &[f64; LANES], a_tail: &[f64], b_tail: &[f64]) -> f64 {
    acc.iter().sum::<f64>() + a_tail.iter().zip(b_tail).map(|(&x, &y)| x * y).sum::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in float64 steps between two finite values of the same sign.
    fn ulps(a: f64, b: f64) -> u64 {
        a.to_bits().abs_diff(b.to_bits())
    }

    /// Positive normal values: log-uniform over the whole range, dense in [1, 512]
    /// (the sums of exponentials the router takes logarithms of), and the
    /// reduction's edges (powers of two, either side of sqrt(2) and sqrt(1/2)).
    fn ln_inputs() -> Vec<f64> {
        let mut xs = Vec::new();
        let mut bits = crate::rng::xorshift(0x9e37_79b9_7f4a_7c15);
        let mut next = move || (bits() >> 11) as f64 / (1u64 << 53) as f64;
        for _ in 0..200_000 {
            xs.push((next() * 1416.0 - 708.0).exp());
            xs.push(1.0 + 511.0 * next());
            xs.push(1.0 + 1e-6 * next());
        }
        for e in -1022..1024 {
            let p = 2f64.powi(e);
            for v in [p, p * std::f64::consts::SQRT_2, p * std::f64::consts::FRAC_1_SQRT_2] {
                for d in -3i64..=3 {
                    xs.push(f64::from_bits((v.to_bits() as i64 + d) as u64));
                }
            }
        }
        xs.extend([f64::MIN_POSITIVE, f64::MAX, 1.0, 2.0, 8.0, 64.0, 256.0]);
        xs.retain(|v| (f64::MIN_POSITIVE..=f64::MAX).contains(v));
        xs
    }

    #[test]
    fn ln_is_within_one_ulp_of_libm_and_exact_at_one() {
        let mut worst = 0u64;
        for x in ln_inputs() {
            let (got, want) = (ln_f64(x), x.ln());
            if want == 0.0 {
                assert_eq!(got, 0.0, "ln({x})");
                continue;
            }
            let d = ulps(got, want);
            assert!(d <= 1, "ln({x:e}) = {got:e}, libm {want:e}: {d} ulp");
            worst = worst.max(d);
        }
        assert_eq!(ln_f64(1.0).to_bits(), 0.0f64.to_bits());
        assert!((ln_f64(2.0) - std::f64::consts::LN_2).abs() <= f64::EPSILON);
        // Outside the domain: the standard library's answers.
        for x in [0.0, -0.0, -1.0, 1e-310, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(ln_f64(x).to_bits(), x.ln().to_bits(), "{x}");
        }
        assert!(ln_f64(f64::NAN).is_nan());
        assert!(worst <= 1);
    }

    #[test]
    fn read_row_gives_the_definitions_answers_for_float32_and_float64_rows_in_every_build() {
        let specials = [0.0f32, -0.0, f32::NEG_INFINITY, f32::INFINITY, f32::NAN, f32::MAX, -f32::MAX, 1e-45];
        let mut next = crate::rng::xorshift(0x2545_f491_4f6c_dd1d);
        for trial in 0..4000 {
            let n = trial % 71;
            let row: Vec<f32> = (0..n)
                .map(|_| {
                    let r = next();
                    if r.is_multiple_of(9) {
                        specials[(r >> 8) as usize % specials.len()]
                    } else {
                        ((r >> 11) % 4001) as f32 / 64.0 - 30.0
                    }
                })
                .collect();
            let wide: Vec<f64> = row.iter().map(|&v| f64::from(v)).collect();
            let bad = wide.iter().any(|v| v.is_nan() || *v == f64::INFINITY);
            let mut lane_max = [f64::NEG_INFINITY; LANES];
            for (e, &v) in wide.iter().enumerate() {
                if v > lane_max[e % LANES] {
                    lane_max[e % LANES] = v;
                }
            }
            let max = lane_max.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            for simd in Simd::all() {
                let mut out32 = vec![7.0; n];
                let mut out64 = vec![7.0; n];
                for (read, out) in
                    [(read_row(simd, &row, &mut out32), &out32), (read_row(simd, &wide, &mut out64), &out64)]
                {
                    for (g, w) in out.iter().zip(&wide) {
                        assert!(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()), "{simd:?} {row:?}");
                    }
                    assert_eq!(read.bad, bad, "{simd:?} {row:?}");
                    if !bad {
                        // as numbers: the sign of a zero maximum is not part of the answer
                        assert!(read.max == max, "{simd:?} {row:?}: {} against {max}", read.max);
                        assert!(read.lane_max.iter().zip(&lane_max).all(|(a, b)| a == b), "{simd:?} {row:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn ln_lanes_and_ln_one_give_the_scalar_bits_in_every_build() {
        let mut xs = ln_inputs();
        xs.extend([0.0, -2.0, 1e-310, f64::INFINITY, f64::NAN, 1.0]);
        while !xs.len().is_multiple_of(LANES) {
            xs.push(3.0);
        }
        for simd in Simd::all() {
            for chunk in xs.as_chunks::<LANES>().0 {
                let got = ln_lanes(simd, chunk);
                for (g, &x) in got.iter().zip(chunk) {
                    let want = ln_f64(x);
                    let one = ln_one(simd, x);
                    let same = |v: f64| v.to_bits() == want.to_bits() || (v.is_nan() && want.is_nan());
                    assert!(same(*g) && same(one), "{simd:?} ln({x:e}): lanes {g:e}, one {one:e}, scalar {want:e}");
                }
            }
        }
    }

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

    fn bits(v: &[f64]) -> Vec<u64> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn every_build_gives_the_same_bits() {
        let z: Vec<f64> =
            (0..203).map(|i| (i as f64 * 1.37).sin() * 40.0 - if i % 17 == 0 { f64::INFINITY } else { 0.0 }).collect();
        let portable = Simd::all()[0];
        assert_eq!(portable.level(), SimdLevel::Portable);
        let run = |simd: Simd| {
            let (mut e, mut s, mut acc) = (vec![0.0; z.len()], vec![0.0; z.len()], vec![0.5; z.len()]);
            let es = exp_shifted(simd, &z, 3.0, &mut e);
            let ss = sigmoid_row(simd, &z, &mut s);
            add_scaled(simd, &mut acc, 0.375, &e);
            (es.to_bits(), bits(&e), ss.to_bits(), bits(&s), bits(&acc))
        };
        let want = run(portable);
        for simd in Simd::all() {
            assert_eq!(run(simd), want, "{simd:?}");
        }
    }

    #[test]
    fn exp_gives_the_scalar_bits_on_both_sides_of_the_subnormal_edge() {
        // Vectors wholly above the edge take one scale factor, vectors with a
        // lane below it take two; the offsets put the edge inside vectors too.
        let mut z: Vec<f64> = (0..4000).map(|i| -722.0 + i as f64 * 0.00731).collect();
        z.extend((0..3000).map(|i| 686.0 + i as f64 * 0.0077)); // up to 2^1023
        z.extend([EXP_NORMAL_LO, EXP_NORMAL_LO.next_down(), EXP_NORMAL_LO.next_up(), -745.5, f64::NEG_INFINITY]);
        for offset in 0..LANES {
            let z = &z[offset..];
            let want: Vec<u64> = z.iter().map(|&v| exp_f64(v).to_bits()).collect();
            for simd in Simd::all() {
                let mut got = vec![0.0; z.len()];
                exp_shifted(simd, z, 0.0, &mut got);
                assert_eq!(bits(&got), want, "{simd:?} offset {offset}");
            }
        }
    }

    #[test]
    fn exp_with_dot_is_exp_then_dot_in_every_build() {
        for n in [0usize, 3, 8, 21, 64, 67] {
            let z: Vec<f64> =
                (0..n).map(|i| (i as f64 * 0.91).cos() * 6.0 - if i % 5 == 1 { f64::INFINITY } else { 0.0 }).collect();
            let w: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).sin() * 1e-3).collect();
            let mut want = vec![0.0; n];
            let sum = exp_shifted(Simd::all()[0], &z, 2.0, &mut want);
            let dot = dot_lanes(&want, &w);
            let finite = z.iter().copied().filter(|v| v.is_finite());
            let max = finite.fold(f64::NEG_INFINITY, f64::max);
            let z32: Vec<f32> = z.iter().map(|&v| v as f32).collect();
            let mut want32 = vec![0.0; n];
            let sum32 =
                exp_shifted(Simd::all()[0], &z32.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(), 2.0, &mut want32);
            let dot32 = dot_lanes(&want32, &w);
            for simd in Simd::all() {
                let mut got = vec![0.0; n];
                let r = exp_shifted_dot(simd, &z, 2.0, &w, &mut got);
                assert_eq!((r.sum.to_bits(), r.dot.to_bits()), (sum.to_bits(), dot.to_bits()), "{simd:?} n={n}");
                assert_eq!(bits(&got), bits(&want), "{simd:?} n={n}");
                assert_eq!((r.max, r.bad), (max, false), "{simd:?} n={n}");
                // float32 input: the bits of its float64 widening
                let r = exp_shifted_dot(simd, &z32, 2.0, &w, &mut got);
                assert_eq!((r.sum.to_bits(), r.dot.to_bits()), (sum32.to_bits(), dot32.to_bits()), "{simd:?} n={n}");
                assert_eq!(bits(&got), bits(&want32), "{simd:?} n={n}");
                // NaN and +inf anywhere (in the lanes or the tail) are reported
                for at in [0, n / 2, n.saturating_sub(1)].into_iter().filter(|&i| i < n) {
                    for bad in [f32::NAN, f32::INFINITY] {
                        let mut zb = z32.clone();
                        zb[at] = bad;
                        assert!(exp_shifted_dot(simd, &zb, 2.0, &w, &mut got).bad, "{simd:?} n={n} at={at}");
                    }
                    let mut zb = z32.clone();
                    zb[at] = 1e30;
                    assert_eq!(exp_shifted_dot(simd, &zb, 2.0, &w, &mut got).max, 1e30f32 as f64);
                }
            }
        }
    }

    #[test]
    fn sqrt_softplus_is_stable_and_its_slope_matches_differences() {
        assert_eq!(sqrt_softplus(f64::NEG_INFINITY), 0.0);
        assert_eq!(sqrt_softplus_slope(f64::NEG_INFINITY), 0.0);
        assert!((sqrt_softplus(0.0) - 2f64.ln().sqrt()).abs() < 1e-15);
        assert!((sqrt_softplus(1e4) - 100.0).abs() < 1e-12);
        assert!((sqrt_softplus(-800.0) / (-400.0f64).exp() - 1.0).abs() < 1e-12);
        for z in [-50.0f64, -37.5, -36.5, -3.0, -0.2, 0.0, 0.7, 5.0, 40.0] {
            let h = 1e-6 * (1.0f64).max(z.abs());
            let fd = (sqrt_softplus(z + h) - sqrt_softplus(z - h)) / (2.0 * h);
            let slope = sqrt_softplus_slope(z);
            assert!((fd - slope).abs() <= 1e-7 * slope.abs() + 1e-12, "{z}: {fd} vs {slope}");
            assert!((log_sqrt_softplus(z).exp() / sqrt_softplus(z) - 1.0).abs() < 1e-14, "{z}");
        }
        // Continuous across the tail's threshold.
        let (a, b) = (sqrt_softplus(-37.0 - 1e-12), sqrt_softplus(-37.0));
        assert!((a / b - 1.0).abs() < 1e-11);
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
        let simd = Simd::current();
        let s = exp_shifted(simd, &z, 5.0, &mut out);
        for (o, &v) in out.iter().zip(&z) {
            assert!((o - (v - 5.0).exp()).abs() < 1e-14);
        }
        assert!((s - out.iter().sum::<f64>()).abs() < 1e-12);
        let raw: Vec<f32> = z.iter().map(|&v| v as f32).collect();
        let mut back = vec![0.0; z.len()];
        let read = read_row(simd, &raw, &mut back);
        for l in 0..LANES {
            let lane = raw.iter().skip(l).step_by(LANES).copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(read.lane_max[l], lane as f64);
        }
        let mut raw2 = raw.clone();
        raw2[33] = f32::NAN;
        assert!(read_row(simd, &raw2, &mut back).bad);
        raw2[33] = 1.0;
        raw2[3] = f32::INFINITY;
        assert!(read_row(simd, &raw2, &mut back).bad);
        // Every build agrees with the portable one, for both element types.
        for n in [0usize, 5, 8, 37, 64] {
            let r32: Vec<f32> = (0..n).map(|i| ((i * 7919 % 23) as f32) - 11.5).collect();
            let r64: Vec<f64> = r32.iter().map(|&v| f64::from(v)).collect();
            let mut a = vec![0.0; n];
            let want = portable::read_row(&r32, &mut a);
            for simd in Simd::all() {
                let mut b = vec![0.0; n];
                assert_eq!(read_row(simd, &r32, &mut b), want, "{simd:?}");
                assert_eq!(read_row(simd, &r64, &mut b), want, "{simd:?}");
                assert_eq!(bits(&a), bits(&b));
            }
        }
    }
}
