//! Row kernels of the dispatch moves, per SIMD level (`crate::simd`): copying
//! a row with non-temporal (streaming) stores, and the level checks the
//! kernels' `unsafe` dispatch relies on (also `combine_kernel`'s).
//!
//! An output larger than the last-level cache is written with streaming
//! stores, as glibc's `memcpy` does for large copies: a store through the cache
//! first reads the line it overwrites (read-for-ownership), so it moves twice
//! the bytes. A pass that streams ends each parallel task with a store fence,
//! so the task's rows are visible to the thread that joins it.
//!
//! Every level writes the same bits: the copies are copies.

use crate::simd::{simd_level, SimdLevel};

/// Outputs of at least this many bytes are written with streaming stores
/// (half the 32 MiB L3 of the 2-core guests measured: beyond it an output is
/// evicted before it is read again).
pub(crate) const STREAM_BYTES: usize = 16 << 20;

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
pub(crate) fn supported(level: SimdLevel) -> SimdLevel {
    level.min(SimdLevel::best_available())
}

/// Whether the CPU converts float16 in hardware at `level` (F16C for AVX2;
/// AVX-512F has its own conversions).
pub(crate) fn f16_level(level: SimdLevel) -> SimdLevel {
    match supported(level) {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 if !std::arch::is_x86_feature_detected!("f16c") => SimdLevel::Portable,
        l => l,
    }
}

/// How many rows ahead of the one being moved a pass prefetches: the rows a
/// pass reads are scattered (a few KiB each), so the hardware prefetcher only
/// follows a row once it has missed on its first lines; a cold row costs a
/// memory latency that the prefetch overlaps with the rows before it.
pub(crate) const PREFETCH_AHEAD: usize = 2;

/// Ask the caches for `row`'s bytes before they are read. A hint: it never
/// faults and changes no result.
#[inline]
pub(crate) fn prefetch<T>(row: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let p = row.as_ptr().cast::<i8>();
        for offset in (0..std::mem::size_of_val(row)).step_by(64) {
            // SAFETY: `p + offset` is inside `row`; a prefetch only reads the address as a hint.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.add(offset)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
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

#[cfg(target_arch = "x86_64")]
mod x86 {
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
}
