//! Row kernels of the dispatch moves, per SIMD level (`crate::simd`): copying
//! a row with non-temporal (streaming) stores, and widening, accumulating and
//! narrowing float16 rows for `combine`.
//!
//! An output larger than the last-level cache is written with streaming
//! stores, as glibc's `memcpy` does for large copies: a store through the cache
//! first reads the line it overwrites (read-for-ownership), so it moves twice
//! the bytes. A pass that streams ends each parallel task with a store fence,
//! so the task's rows are visible to the thread that joins it.
//!
//! Every level writes the same bits: the copies are copies, and the float16
//! kernels convert with the F16C/AVX-512 instructions `half` itself uses (IEEE
//! round to nearest even), multiply and add as separate operations exactly as
//! the scalar code does, and add a token's rows in the same order.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::simd::{simd_level, SimdLevel};

/// Outputs of at least this many bytes are written with streaming stores
/// (half the 32 MiB L3 of the 2-core guests measured: beyond it an output is
/// evicted before it is read again).
pub(crate) const STREAM_BYTES: usize = 16 << 20;

/// float16 elements converted per step (a stack buffer of float32 or float16).
const F16_BLOCK: usize = 256;

/// How a pass writes its output: the SIMD level, and whether it streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Writes {
    /// The level of the kernels.
    pub(crate) level: SimdLevel,
    /// Streaming stores for the output rows.
    pub(crate) stream: bool,
}

impl Writes {
    /// The process's level; streaming when the output (`len` elements of `P`)
    /// exceeds [`STREAM_BYTES`].
    pub(crate) fn for_output<P>(len: usize) -> Writes {
        Writes { level: simd_level(), stream: len.saturating_mul(std::mem::size_of::<P>()) >= STREAM_BYTES }
    }

    /// End of a parallel task: order its streaming stores before the join.
    pub(crate) fn fence(self) {
        #[cfg(target_arch = "x86_64")]
        if self.stream {
            // SAFETY: `sfence` is SSE, part of the x86-64 baseline.
            unsafe { std::arch::x86_64::_mm_sfence() };
        }
    }
}

/// The best level at most `level` that this CPU runs: the proof the `unsafe`
/// dispatch below relies on (a caller may ask for any level).
fn supported(level: SimdLevel) -> SimdLevel {
    level.min(SimdLevel::best_available())
}

/// Whether the CPU converts float16 in hardware at `level` (F16C for AVX2;
/// AVX-512F has its own conversions).
fn f16_level(level: SimdLevel) -> SimdLevel {
    match supported(level) {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 if !std::arch::is_x86_feature_detected!("f16c") => SimdLevel::Portable,
        l => l,
    }
}

/// `dst = src` for rows of plain floats (f32, f64, f16: no padding bytes),
/// with streaming stores when `stream` and the level has them.
pub(crate) fn copy<T: Copy>(level: SimdLevel, dst: &mut [T], src: &[T], stream: bool) {
    let n = std::mem::size_of_val(src).min(std::mem::size_of_val(dst));
    let (d, s) = (dst.as_mut_ptr().cast::<u8>(), src.as_ptr().cast::<u8>());
    match (stream, supported(level)) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level is supported; `d` and `s` are valid for `n` bytes
        // (the shorter of the two slices) and cannot overlap (`&mut` and `&`).
        (true, SimdLevel::Avx512) => unsafe { x86::stream_avx512(d, s, n) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        (true, SimdLevel::Avx2) => unsafe { x86::stream_avx2(d, s, n) },
        _ => {
            let m = src.len().min(dst.len());
            dst[..m].copy_from_slice(&src[..m]);
        }
    }
}

/// `acc += weight * x` (or `acc += x` without a weight), elementwise, `x`
/// widened to float32.
pub(crate) fn f16_accumulate(level: SimdLevel, acc: &mut [f32], x: &[f16], weight: Option<f32>) {
    let n = acc.len().min(x.len());
    let (acc, x) = (&mut acc[..n], &x[..n]);
    let done = match f16_level(level) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F is supported.
        SimdLevel::Avx512 => unsafe { x86::accumulate_avx512(acc, x, weight) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 and F16C are supported.
        SimdLevel::Avx2 => unsafe { x86::accumulate_avx2(acc, x, weight) },
        _ => 0,
    };
    let mut wide = [0f32; F16_BLOCK];
    for (acc, x) in acc[done..].chunks_mut(F16_BLOCK).zip(x[done..].chunks(F16_BLOCK)) {
        let wide = &mut wide[..x.len()];
        x.convert_to_f32_slice(wide);
        match weight {
            Some(w) => acc.iter_mut().zip(wide.iter()).for_each(|(a, &v)| *a += w * v),
            None => acc.iter_mut().zip(wide.iter()).for_each(|(a, &v)| *a += v),
        }
    }
}

/// `out = acc` narrowed to float16 (round to nearest even), streamed when `stream`.
pub(crate) fn f16_narrow(level: SimdLevel, out: &mut [f16], acc: &[f32], stream: bool) {
    let mut narrow = [f16::ZERO; F16_BLOCK];
    for (out, acc) in out.chunks_mut(F16_BLOCK).zip(acc.chunks(F16_BLOCK)) {
        let narrow = &mut narrow[..acc.len()];
        let done = match f16_level(level) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512F is supported.
            SimdLevel::Avx512 => unsafe { x86::narrow_avx512(narrow, acc) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 and F16C are supported.
            SimdLevel::Avx2 => unsafe { x86::narrow_avx2(narrow, acc) },
            _ => 0,
        };
        narrow[done..].convert_from_f32_slice(&acc[done..]);
        copy(level, out, narrow, stream);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

    /// Copy `n` bytes from `s` to `d` with streaming stores of `$width` bytes
    /// where `d` is aligned to them, 16-byte streaming stores on the way there
    /// and at the end, plain stores for the unaligned bytes at either end.
    macro_rules! stream_copy {
        ($name:ident, $feature:literal, $width:literal, $block:ident) => {
            /// # Safety
            /// The CPU has the feature; `d` and `s` are valid for `n` bytes and disjoint.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn $name(d: *mut u8, s: *const u8, n: usize) {
                let head = d.align_offset(16).min(n);
                // SAFETY: every access below is at offsets `i .. i + w <= n`
                // of the caller's valid, disjoint ranges; streaming stores are
                // at addresses aligned to their width (16 after the head, then
                // `$width` once `d + i` is a multiple of it).
                unsafe {
                    std::ptr::copy_nonoverlapping(s, d, head);
                    let mut i = head;
                    while i + 16 <= n && !(d as usize + i).is_multiple_of($width) {
                        _mm_stream_si128(d.add(i).cast(), _mm_loadu_si128(s.add(i).cast()));
                        i += 16;
                    }
                    while i + $width <= n {
                        $block(d.add(i), s.add(i));
                        i += $width;
                    }
                    while i + 16 <= n {
                        _mm_stream_si128(d.add(i).cast(), _mm_loadu_si128(s.add(i).cast()));
                        i += 16;
                    }
                    std::ptr::copy_nonoverlapping(s.add(i), d.add(i), n - i);
                }
            }
        };
    }

    /// # Safety
    /// AVX2; `d` 32-byte aligned and `s` readable, for 32 bytes.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn block32(d: *mut u8, s: *const u8) {
        // SAFETY: the caller's contract.
        unsafe { _mm256_stream_si256(d.cast(), _mm256_loadu_si256(s.cast())) }
    }

    /// # Safety
    /// AVX-512F; `d` 64-byte aligned and `s` readable, for 64 bytes.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn block64(d: *mut u8, s: *const u8) {
        // SAFETY: the caller's contract.
        unsafe { _mm512_stream_si512(d.cast(), _mm512_loadu_si512(s.cast())) }
    }

    stream_copy!(stream_avx2, "avx2", 32, block32);
    stream_copy!(stream_avx512, "avx512f", 64, block64);

    /// The float16 kernels of one level: `$lanes` lanes per step; returns the
    /// elements done (a multiple of `$lanes`; the caller does the rest).
    macro_rules! f16_kernels {
        ($accumulate:ident, $narrow:ident, $feature:literal, $lanes:literal, $half:ty, $wide:ty,
         $load_half:ident, $store_half:ident, $to_f32:ident, $to_f16:ident, $nearest:expr,
         $load:ident, $store:ident, $set1:ident, $add:ident, $mul:ident) => {
            /// `acc += weight * x` (or `+= x`), `$lanes` elements per step.
            #[target_feature(enable = $feature)]
            pub(super) fn $accumulate(acc: &mut [f32], x: &[f16], weight: Option<f32>) -> usize {
                let n = acc.len().min(x.len()) / $lanes * $lanes;
                let (a, p) = (acc.as_mut_ptr(), x.as_ptr().cast::<$half>());
                match weight {
                    Some(w) => {
                        let w = $set1(w);
                        for i in (0..n).step_by($lanes) {
                            // SAFETY: `i + $lanes <= n`, within both slices; unaligned loads and stores.
                            unsafe {
                                let v = $to_f32($load_half(p.add(i / $lanes)));
                                $store(a.add(i), $add($load(a.add(i)), $mul(w, v)));
                            }
                        }
                    }
                    None => {
                        for i in (0..n).step_by($lanes) {
                            // SAFETY: as above.
                            unsafe { $store(a.add(i), $add($load(a.add(i)), $to_f32($load_half(p.add(i / $lanes))))) };
                        }
                    }
                }
                n
            }

            /// `out = acc` narrowed (IEEE round to nearest even, as `f16::from_f32`),
            /// `$lanes` elements per step.
            #[target_feature(enable = $feature)]
            pub(super) fn $narrow(out: &mut [f16], acc: &[f32]) -> usize {
                let n = out.len().min(acc.len()) / $lanes * $lanes;
                for i in (0..n).step_by($lanes) {
                    // SAFETY: `i + $lanes <= n`, within both slices; unaligned loads and stores.
                    unsafe {
                        let v: $wide = $load(acc.as_ptr().add(i));
                        $store_half(out.as_mut_ptr().cast::<$half>().add(i / $lanes), $to_f16::<{ $nearest }>(v));
                    }
                }
                n
            }
        };
    }

    f16_kernels!(
        accumulate_avx2,
        narrow_avx2,
        "avx2,fma,f16c",
        8,
        __m128i,
        __m256,
        _mm_loadu_si128,
        _mm_storeu_si128,
        _mm256_cvtph_ps,
        _mm256_cvtps_ph,
        _MM_FROUND_TO_NEAREST_INT,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_set1_ps,
        _mm256_add_ps,
        _mm256_mul_ps
    );
    f16_kernels!(
        accumulate_avx512,
        narrow_avx512,
        "avx512f",
        16,
        __m256i,
        __m512,
        _mm256_loadu_si256,
        _mm256_storeu_si256,
        _mm512_cvtph_ps,
        _mm512_cvtps_ph,
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_set1_ps,
        _mm512_add_ps,
        _mm512_mul_ps
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn levels() -> Vec<SimdLevel> {
        crate::simd::Simd::all().into_iter().map(|s| s.level()).collect()
    }

    #[test]
    fn streaming_copies_every_offset_and_length() {
        let src: Vec<u8> = (0..1000u32).map(|v| (v * 7 % 251) as u8).collect();
        for level in levels() {
            for start in 0..70 {
                for len in [0, 1, 15, 16, 17, 63, 64, 65, 200, 929] {
                    let mut dst = vec![0u8; 1000];
                    copy(level, &mut dst[start..start + len], &src[3..3 + len], true);
                    Writes { level, stream: true }.fence();
                    assert_eq!(&dst[start..start + len], &src[3..3 + len], "{level:?} {start} {len}");
                    assert!(dst[..start].iter().chain(&dst[start + len..]).all(|&b| b == 0));
                }
            }
        }
    }

    #[test]
    fn float16_kernels_match_half_bit_for_bit() {
        let special = [f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -0.0, 0.0, 65504.0, 65520.0, 6e-8, -3e-5, 1e-9];
        let x: Vec<f16> = (0..523)
            .map(|i: usize| {
                f16::from_f32(if i.is_multiple_of(9) {
                    special[i / 9 % special.len()]
                } else {
                    (i as f32 * 0.37).sin() * 300.0
                })
            })
            .collect();
        let start: Vec<f32> = (0..523)
            .map(|i: usize| if i.is_multiple_of(13) { special[i % special.len()] } else { i as f32 * 1.5 })
            .collect();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for weight in [None, Some(0.3f32), Some(-2.5)] {
            let mut want = start.clone();
            f16_accumulate(SimdLevel::Portable, &mut want, &x, weight);
            let mut want16 = vec![f16::ZERO; 523];
            f16_narrow(SimdLevel::Portable, &mut want16, &want, false);
            for level in levels() {
                let mut got = start.clone();
                f16_accumulate(level, &mut got, &x, weight);
                assert_eq!(bits(&got), bits(&want), "{level:?} {weight:?}");
                for stream in [false, true] {
                    let mut got16 = vec![f16::ONE; 523];
                    f16_narrow(level, &mut got16, &got, stream);
                    let b16 = |v: &[f16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(b16(&got16), b16(&want16), "{level:?} {weight:?} {stream}");
                }
            }
        }
    }
}
