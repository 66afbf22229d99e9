//! The fused kernel of `combine`: one token's output row from its kept expert
//! rows, per SIMD level (`crate::simd`).
//!
//! The row is walked in blocks of columns that fit in registers: for each
//! block, every kept row in rank order is loaded (widened for float16),
//! scaled and added to the block's accumulators, then the block is narrowed
//! and stored once. Each expert row is read once and the output row written
//! once, with no accumulator buffer between them.
//!
//! Every level gives the bits of the scalar formula: per element
//! `((0 + w0*x0) + w1*x1) + ...` in the accumulator type (float32 for float32
//! and float16, float64 for float64), the multiply and the add rounded
//! separately (never fused), float16 widened exactly and narrowed once, to
//! nearest even. The columns the vector loop leaves (the end of the row, and
//! with streaming stores those before the output is aligned to a register's
//! store) take the portable loop, which is that formula.

use std::ops::Range;

use half::f16;

use crate::payload::Payload;
use crate::row_moves::{f16_level, supported};
use crate::simd::SimdLevel;

/// Columns per step of the portable loop (a stack buffer of accumulators).
const BLOCK: usize = 64;

/// Registers of accumulators per block of the vector loops.
#[cfg(target_arch = "x86_64")]
const REGS: usize = 4;

/// The columns every row (and `out`) has.
fn width<P>(out: &[P], rows: &[&[P]]) -> usize {
    rows.iter().fold(out.len(), |n, r| n.min(r.len()))
}

/// `out[j] = sum_i w_i * rows[i][j]` (with `W`; else `sum_i rows[i][j]`) for
/// `j` in `cols`, in the accumulator type, `BLOCK` columns at a time: the
/// formula of the module docs, written plainly. `weights` has one entry per
/// row when `W`.
pub(crate) fn columns<P: Payload, const W: bool>(out: &mut [P], rows: &[&[P]], weights: &[f32], cols: Range<usize>) {
    let mut buf = [P::Acc::default(); BLOCK];
    let mut c = cols.start;
    while c < cols.end {
        let e = (c + BLOCK).min(cols.end);
        // `Default` is +0, so a -0 product gives +0 as `0 + w*x` does.
        let mut acc = [P::Acc::default(); BLOCK];
        let acc = &mut acc[..e - c];
        if W {
            for (row, &w) in rows.iter().zip(weights) {
                let w = P::Acc::from(w);
                for (a, &v) in acc.iter_mut().zip(P::widened(&row[c..e], &mut buf)) {
                    *a = *a + w * v;
                }
            }
        } else {
            for row in rows {
                for (a, &v) in acc.iter_mut().zip(P::widened(&row[c..e], &mut buf)) {
                    *a = *a + v;
                }
            }
        }
        P::narrow(&mut out[c..e], acc);
        c = e;
    }
}

/// The combine of one token at `level` (lowered to what the CPU runs, as
/// `$level` says): `out` is the (weighted) sum of `rows`, streamed when
/// `stream` and the level has streaming stores.
macro_rules! combine_at_level {
    ($name:ident, $elem:ty, $level:ident) => {
        pub(crate) fn $name(
            level: SimdLevel,
            out: &mut [$elem],
            rows: &[&[$elem]],
            weights: Option<&[f32]>,
            stream: bool,
        ) {
            let n = width(out, rows);
            match ($level(level), weights) {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the level is supported (`$level`).
                (SimdLevel::Avx512, Some(w)) => unsafe { x86::avx512::$name::<true>(out, rows, w, stream) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                (SimdLevel::Avx512, None) => unsafe { x86::avx512::$name::<false>(out, rows, &[], stream) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                (SimdLevel::Avx2, Some(w)) => unsafe { x86::avx2::$name::<true>(out, rows, w, stream) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                (SimdLevel::Avx2, None) => unsafe { x86::avx2::$name::<false>(out, rows, &[], stream) },
                (_, Some(w)) => columns::<$elem, true>(out, rows, w, 0..n),
                (_, None) => columns::<$elem, false>(out, rows, &[], 0..n),
            }
        }
    };
}

combine_at_level!(combine_f32, f32, supported);
combine_at_level!(combine_f64, f64, supported);
combine_at_level!(combine_f16, f16, f16_level);

#[cfg(target_arch = "x86_64")]
mod x86 {
    /// The vector kernel for one element type: `$acc` is its accumulator
    /// register type (methods `zero`, `splat`, `load`, `add`, `mul`, `store`,
    /// `stream`, constant `LANES`), `$feature` the instruction set they need.
    macro_rules! fused_kernel {
        ($feature:literal, $name:ident, $elem:ty, $acc:ident) => {
            /// The combine of one token (see the module docs); streaming
            /// stores where `stream`.
            #[target_feature(enable = $feature)]
            pub(crate) fn $name<const W: bool>(out: &mut [$elem], rows: &[&[$elem]], weights: &[f32], stream: bool) {
                use crate::combine_kernel::{columns, width, REGS};
                let n = width(out, rows);
                let lanes = $acc::LANES;
                // Streaming stores need the output aligned to a whole register's store.
                let head =
                    if stream { out.as_ptr().align_offset(lanes * std::mem::size_of::<$elem>()).min(n) } else { 0 };
                let body = head + (n - head) / lanes * lanes;
                columns::<$elem, W>(out, rows, weights, 0..head);
                let o = out.as_mut_ptr();
                let mut c = head;
                while c + REGS * lanes <= body {
                    let mut acc = [$acc::zero(); REGS];
                    for (i, row) in rows.iter().enumerate() {
                        let p = row.as_ptr();
                        // SAFETY (both arms): `c + REGS * lanes <= n`, and every row
                        // holds at least `n` elements (`width`); unaligned loads.
                        if W {
                            let w = $acc::splat(weights[i]);
                            for (r, a) in acc.iter_mut().enumerate() {
                                *a = a.add(w.mul(unsafe { $acc::load(p.add(c + r * lanes)) }));
                            }
                        } else {
                            for (r, a) in acc.iter_mut().enumerate() {
                                *a = a.add(unsafe { $acc::load(p.add(c + r * lanes)) });
                            }
                        }
                    }
                    for (r, a) in acc.iter().enumerate() {
                        // SAFETY: `c + REGS * lanes <= n <= out.len()`; when
                        // streaming, `o + c` is aligned to a register's store
                        // (`o + head` is, and `c - head` is a multiple of `lanes`).
                        unsafe {
                            if stream {
                                a.stream(o.add(c + r * lanes))
                            } else {
                                a.store(o.add(c + r * lanes))
                            }
                        }
                    }
                    c += REGS * lanes;
                }
                while c < body {
                    let mut a = $acc::zero();
                    for (i, row) in rows.iter().enumerate() {
                        // SAFETY: `c + lanes <= body <= n`, as above.
                        let x = unsafe { $acc::load(row.as_ptr().add(c)) };
                        a = if W { a.add($acc::splat(weights[i]).mul(x)) } else { a.add(x) };
                    }
                    // SAFETY: as for the blocks.
                    unsafe {
                        if stream {
                            a.stream(o.add(c))
                        } else {
                            a.store(o.add(c))
                        }
                    }
                    c += lanes;
                }
                columns::<$elem, W>(out, rows, weights, body..n);
            }
        };
    }

    /// One register of accumulators, the `$elem` it loads and stores, and
    /// how (`$load`: widened to float32 / float64; `$store`, `$stream`
    /// narrowed back).
    macro_rules! accumulator {
        ($feature:literal, $name:ident, $reg:ty, $elem:ty, $lanes:expr, $zero:ident, $set1:ident, $add:ident,
         $mul:ident, |$lp:ident| $load:expr, |$sv:ident, $sp:ident| $store:expr,
         |$tv:ident, $tp:ident| $stream:expr) => {
            #[derive(Clone, Copy)]
            pub(crate) struct $name($reg);

            impl $name {
                const LANES: usize = $lanes;
                #[inline]
                #[target_feature(enable = $feature)]
                fn zero() -> Self {
                    $name($zero())
                }
                #[inline]
                #[target_feature(enable = $feature)]
                fn splat(w: f32) -> Self {
                    $name($set1(w.into()))
                }
                #[inline]
                #[target_feature(enable = $feature)]
                fn add(self, b: Self) -> Self {
                    $name($add(self.0, b.0))
                }
                #[inline]
                #[target_feature(enable = $feature)]
                fn mul(self, b: Self) -> Self {
                    $name($mul(self.0, b.0))
                }
                /// # Safety
                /// `LANES` elements readable at the pointer.
                #[inline]
                #[target_feature(enable = $feature)]
                unsafe fn load($lp: *const $elem) -> Self {
                    // SAFETY: the caller's contract; an unaligned load.
                    $name(unsafe { $load })
                }
                /// # Safety
                /// `LANES` elements writable at the pointer.
                #[inline]
                #[target_feature(enable = $feature)]
                unsafe fn store(self, $sp: *mut $elem) {
                    let $sv = self.0;
                    // SAFETY: the caller's contract; an unaligned store.
                    unsafe { $store }
                }
                /// # Safety
                /// `LANES` elements writable at the pointer, aligned to their bytes.
                #[inline]
                #[target_feature(enable = $feature)]
                unsafe fn stream(self, $tp: *mut $elem) {
                    let $tv = self.0;
                    // SAFETY: the caller's contract.
                    unsafe { $stream }
                }
            }
        };
    }

    /// The accumulator types of one level (float16 accumulates in the
    /// float32 register), and its three kernels.
    macro_rules! level {
        ($feature:literal, $nearest:expr;
         $ps:ty, $pd:ty, $ph:ty, $f32_lanes:literal, $f64_lanes:literal;
         $zero_ps:ident, $zero_pd:ident, $set1_ps:ident, $set1_pd:ident, $add_ps:ident, $add_pd:ident,
         $mul_ps:ident, $mul_pd:ident, $loadu_ps:ident, $loadu_pd:ident, $storeu_ps:ident, $storeu_pd:ident,
         $stream_ps:ident, $stream_pd:ident, $load_ph:ident, $store_ph:ident, $stream_ph:ident,
         $to_f32:ident, $to_f16:ident) => {
            use half::f16;
            use std::arch::x86_64::*;

            accumulator!(
                $feature,
                F32s,
                $ps,
                f32,
                $f32_lanes,
                $zero_ps,
                $set1_ps,
                $add_ps,
                $mul_ps,
                |p| $loadu_ps(p),
                |v, p| $storeu_ps(p, v),
                |v, p| $stream_ps(p, v)
            );
            accumulator!(
                $feature,
                F64s,
                $pd,
                f64,
                $f64_lanes,
                $zero_pd,
                $set1_pd,
                $add_pd,
                $mul_pd,
                |p| $loadu_pd(p),
                |v, p| $storeu_pd(p, v),
                |v, p| $stream_pd(p, v)
            );
            accumulator!(
                $feature,
                F16s,
                $ps,
                f16,
                $f32_lanes,
                $zero_ps,
                $set1_ps,
                $add_ps,
                $mul_ps,
                |p| $to_f32($load_ph(p.cast::<$ph>())),
                |v, p| $store_ph(p.cast::<$ph>(), $to_f16::<{ $nearest }>(v)),
                |v, p| $stream_ph(p.cast::<$ph>(), $to_f16::<{ $nearest }>(v))
            );

            fused_kernel!($feature, combine_f32, f32, F32s);
            fused_kernel!($feature, combine_f64, f64, F64s);
            fused_kernel!($feature, combine_f16, f16, F16s);
        };
    }

    /// AVX2 + FMA (+ F16C for float16): 256-bit registers.
    pub(super) mod avx2 {
        level!("avx2,fma,f16c", _MM_FROUND_TO_NEAREST_INT;
            __m256, __m256d, __m128i, 8, 4;
            _mm256_setzero_ps, _mm256_setzero_pd, _mm256_set1_ps, _mm256_set1_pd, _mm256_add_ps, _mm256_add_pd,
            _mm256_mul_ps, _mm256_mul_pd, _mm256_loadu_ps, _mm256_loadu_pd, _mm256_storeu_ps, _mm256_storeu_pd,
            _mm256_stream_ps, _mm256_stream_pd, _mm_loadu_si128, _mm_storeu_si128, _mm_stream_si128,
            _mm256_cvtph_ps, _mm256_cvtps_ph);
    }

    /// AVX-512F: 512-bit registers.
    pub(super) mod avx512 {
        level!("avx512f", _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
            __m512, __m512d, __m256i, 16, 8;
            _mm512_setzero_ps, _mm512_setzero_pd, _mm512_set1_ps, _mm512_set1_pd, _mm512_add_ps, _mm512_add_pd,
            _mm512_mul_ps, _mm512_mul_pd, _mm512_loadu_ps, _mm512_loadu_pd, _mm512_storeu_ps, _mm512_storeu_pd,
            _mm512_stream_ps, _mm512_stream_pd, _mm256_loadu_si256, _mm256_storeu_si256, _mm256_stream_si256,
            _mm512_cvtph_ps, _mm512_cvtps_ph);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The formula of the module docs, one element at a time: `acc` starts at
    /// +0, then `acc = acc + w * x` (or `acc + x`) per row in order. Also
    /// whether two NaNs met in an add: IEEE 754 (and Rust) leave which
    /// payload survives to the implementation, so only NaN-ness is defined.
    fn reference<A: Copy + std::ops::Add<Output = A> + std::ops::Mul<Output = A> + From<f32>>(
        xs: &[A],
        weights: Option<&[f32]>,
        is_nan: impl Fn(A) -> bool,
    ) -> (A, bool) {
        let (mut acc, mut ambiguous) = (A::from(0.0), false);
        for (i, &x) in xs.iter().enumerate() {
            let p = match weights {
                Some(w) => A::from(w[i]) * x,
                None => x,
            };
            ambiguous |= is_nan(acc) && is_nan(p);
            acc = acc + p;
        }
        (acc, ambiguous)
    }

    /// Every level, streaming or not, at output offsets that move the
    /// streaming head, against `reference` (`widen` / `narrow`: exact
    /// software conversions to and from the accumulator type).
    fn levels_match_the_reference<P: Payload>(
        values: &[P],
        widen: impl Fn(P) -> P::Acc,
        narrow: impl Fn(P::Acc) -> P,
        is_nan: impl Fn(P::Acc) -> bool + Copy,
        bits: impl Fn(P) -> u64,
    ) {
        let weights_pool = [0.75f32, -0.0, 0.0, -2.5, 1e-30, 3e38, 1.0, 0.1];
        for d in [1, 7, 37, 64, 300, 1024 + 3] {
            let rows: Vec<Vec<P>> =
                (0..9).map(|r| (0..d).map(|j| values[(j * 7 + r * 5 + j / 3) % values.len()]).collect()).collect();
            for k in [0, 1, 2, 8] {
                let picked: Vec<&[P]> = (0..k).map(|i| &rows[(i * 4 + 1) % rows.len()][..]).collect();
                let weights: Vec<f32> = (0..k).map(|i| weights_pool[(i * 3 + d) % weights_pool.len()]).collect();
                for weighted in [true, false] {
                    let w = weighted.then_some(&weights[..]);
                    // The bits, or None where only NaN-ness is defined.
                    let want: Vec<Option<u64>> = (0..d)
                        .map(|j| {
                            let xs: Vec<P::Acc> = picked.iter().map(|r| widen(r[j])).collect();
                            let (sum, ambiguous) = reference(&xs, w, is_nan);
                            (!ambiguous).then(|| bits(narrow(sum)))
                        })
                        .collect();
                    assert!(want.iter().filter(|b| b.is_some()).count() * 4 > d * 3);
                    for simd in crate::simd::Simd::all() {
                        for stream in [false, true] {
                            for offset in [0, 1, 3, 8] {
                                let mut out = vec![values[0]; d + offset];
                                P::combine(simd.level(), &mut out[offset..], &picked, w, stream);
                                crate::row_moves::Writes { level: simd.level(), stream }.fence();
                                let got = &out[offset..];
                                let agree = got.iter().zip(&want).all(|(&g, b)| match b {
                                    Some(b) => bits(g) == *b,
                                    None => is_nan(widen(g)),
                                });
                                assert!(
                                    agree,
                                    "d={d} k={k} weighted={weighted} {:?} stream={stream} offset={offset}",
                                    simd.level()
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Ordinary values and the ones that test the formula: signed zeros
    /// (-0 products, `0 + -0`), infinities (inf * 0), NaN with payloads,
    /// values that overflow or underflow when scaled.
    fn specials() -> Vec<f32> {
        let mut v = vec![
            -0.0,
            0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7fc0_1234),
            f32::from_bits(0xffc0_0001),
            3e38,
            -1e-38,
            1e-45,
            65504.0,
        ];
        v.extend((0..53).map(|i| (i as f32 * 0.73).sin() * 9.0));
        v
    }

    #[test]
    fn float32_at_every_level_is_the_sequential_formula() {
        levels_match_the_reference(&specials(), |x| x, |a| a, f32::is_nan, |x: f32| x.to_bits() as u64);
    }

    #[test]
    fn float64_at_every_level_is_the_sequential_formula() {
        let mut v: Vec<f64> = specials().into_iter().map(f64::from).collect();
        v.extend([f64::from_bits(0x7ff8_0000_dead_beef), 1e308, 5e-324]);
        levels_match_the_reference(&v, |x| x, |a| a, f64::is_nan, |x: f64| x.to_bits());
    }

    #[test]
    fn float16_at_every_level_is_the_sequential_formula() {
        let mut v: Vec<f16> = specials().into_iter().map(f16::from_f32_const).collect();
        // Subnormals, the largest finite value, NaN with payloads (quiet and signalling).
        v.extend([0x0001u16, 0x03ff, 0x8200, 0x7bff, 0x7e01, 0xfd55, 0x7c01].map(f16::from_bits));
        levels_match_the_reference(&v, f16::to_f32_const, f16::from_f32_const, f32::is_nan, |x: f16| {
            x.to_bits() as u64
        });
    }
}
