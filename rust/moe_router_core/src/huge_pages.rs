//! Zeroed output buffers that ask the OS for transparent huge pages.
//!
//! A fresh multi-megabyte output (the `[T, E]` probabilities) is first touched
//! inside the routing pass, and with 4 KiB pages every 4 KiB costs a page fault
//! in which the kernel zeroes the page. Advising huge pages for the range, as
//! NumPy does for its own large arrays, takes 512 times fewer faults where the
//! kernel offers them (`transparent_hugepage` set to `madvise` or `always`);
//! elsewhere the advice is ignored and nothing changes.

/// `n` zeros from the allocator: fresh zero pages, touched only by their first
/// write, above glibc's mmap threshold (at least 128 KiB, growing up to 32 MiB
/// as large buffers are freed); below it `calloc` clears heap memory here.
pub(crate) fn zeroed_f32(n: usize) -> Vec<f32> {
    let buffer = vec![0f32; n];
    advise_huge_pages(&buffer);
    buffer
}

/// `n` zero words, allocated lazily by the OS as [`zeroed_f32`], or `None` when
/// the allocator refuses (the caller reports it; nothing aborts).
pub fn try_zeroed_u64(n: usize) -> Option<Vec<u64>> {
    if n == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<u64>(n).ok()?;
    // SAFETY: the layout has a non-zero size; a non-null result points at `n`
    // zeroed, aligned u64 values owned by the returned Vec, whose capacity and
    // length are the layout's, as `Vec::from_raw_parts` requires.
    let buffer = unsafe {
        let ptr = std::alloc::alloc_zeroed(layout).cast::<u64>();
        if ptr.is_null() {
            return None;
        }
        Vec::from_raw_parts(ptr, n, n)
    };
    advise_huge_pages(&buffer);
    Some(buffer)
}

#[cfg(target_os = "linux")]
fn advise_huge_pages<T>(buffer: &[T]) {
    const PAGE: usize = 4096;
    const HUGE_PAGE: usize = 2 << 20;
    let bytes = std::mem::size_of_val(buffer);
    if bytes < HUGE_PAGE {
        return;
    }
    let start = (buffer.as_ptr() as usize).next_multiple_of(PAGE);
    let end = (buffer.as_ptr() as usize + bytes) / PAGE * PAGE;
    if end > start {
        // SAFETY: the range lies inside `buffer`'s allocation and is page-aligned;
        // MADV_HUGEPAGE only changes how later faults are served, never the contents.
        // The result is advisory: a kernel without THP returns an error, ignored.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages<T>(_buffer: &[T]) {}

#[cfg(test)]
mod tests {
    use super::{try_zeroed_u64, zeroed_f32};

    #[test]
    fn zeroed_buffers_are_zero_and_sized() {
        for n in [0, 1, 1000, (4 << 20) + 3] {
            let b = zeroed_f32(n);
            assert_eq!(b.len(), n);
            assert!(b.iter().all(|&x| x == 0.0));
            let w = try_zeroed_u64(n).expect("small allocation");
            assert_eq!(w.len(), n);
            assert!(w.iter().all(|&x| x == 0));
        }
        assert!(try_zeroed_u64(usize::MAX / 4).is_none());
    }
}
