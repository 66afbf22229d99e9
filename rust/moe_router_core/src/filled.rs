//! `[T, k]` output buffers filled by the thread pool.
//!
//! `vec![v; n]` fills (or, for zeros, `calloc` clears) the buffer on the
//! calling thread before any parallel pass starts. Once glibc's dynamic mmap
//! threshold has grown past the outputs' size (it does after the first few
//! calls free such buffers), even zeros are a `memset` of heap memory: at
//! T=262144, k=2 about 7 MB, which was 5% of an E=8 call spent on one core.
//! Filling through rayon spreads those writes and their page faults over the
//! pool; small buffers keep `vec!`, whose cost is below a fork's.

use rayon::prelude::*;

/// Buffers below this many bytes are filled on the calling thread.
const PARALLEL_BYTES: usize = 1 << 20;

/// `n` copies of `value`.
pub(crate) fn filled<T: Copy + Send + Sync>(n: usize, value: T) -> Vec<T> {
    if n.saturating_mul(std::mem::size_of::<T>()) < PARALLEL_BYTES {
        return vec![value; n];
    }
    let mut out = Vec::with_capacity(n);
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(PARALLEL_BYTES / std::mem::size_of::<T>().max(1) / 4)
        .for_each(|chunk| chunk.fill(std::mem::MaybeUninit::new(value)));
    // SAFETY: the first n elements of the capacity were all written just above.
    unsafe { out.set_len(n) };
    out
}

/// A copy of `source`, written by the pool when large.
pub(crate) fn copied<T: Copy + Send + Sync>(source: &[T]) -> Vec<T> {
    if std::mem::size_of_val(source) < PARALLEL_BYTES {
        return source.to_vec();
    }
    let mut out = Vec::with_capacity(source.len());
    out.par_extend(source.par_iter().copied());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_hold_the_value_or_the_source_on_both_sides_of_the_threshold() {
        for n in [0, 1, 1000, PARALLEL_BYTES / 4 - 1, PARALLEL_BYTES / 4, 3 * PARALLEL_BYTES + 7] {
            let v = filled(n, -1i32);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|&x| x == -1));
            let source: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
            assert_eq!(copied(&source), source);
        }
    }
}
