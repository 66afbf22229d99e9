//! Zeroed output buffers that ask the OS for transparent huge pages.
//!
//! A fresh multi-megabyte output (the `[T, E]` probabilities) is first touched
//! inside the routing pass, and with 4 KiB pages every 4 KiB costs a page fault
//! in which the kernel zeroes the page. Advising huge pages for the range, as
//! NumPy does for its own large arrays, takes 512 times fewer faults where the
//! kernel offers them (`transparent_hugepage` set to `madvise` or `always`);
//! elsewhere the advice is ignored and nothing changes.
//!
//! A buffer held for reuse (the bindings' pool of freed outputs) is advised
//! `MADV_FREE`: the kernel may take its pages back when memory runs short,
//! without writing them anywhere, and until then a write reuses them without
//! a fault. Its contents are then undefined (old data or zeros), which its
//! users never read: they write every element first.

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

/// Let the OS reclaim `buffer`'s whole pages lazily (`MADV_FREE`; see the
/// module docs): from here on its contents are old data or zeros, until
/// written. Elsewhere than Linux nothing happens.
pub fn release_lazily(buffer: &mut [u64]) {
    #[cfg(target_os = "linux")]
    if let Some((start, len)) = whole_pages(buffer) {
        // SAFETY: the range lies inside `buffer`, which the caller lends mutably;
        // MADV_FREE only lets the kernel replace those pages by zero pages. An
        // error (a kernel without MADV_FREE) leaves the memory as it was.
        unsafe {
            libc::madvise(start as *mut libc::c_void, len, libc::MADV_FREE);
        }
    }
}

/// The machine's physical memory in bytes (`None` where the OS does not say).
pub fn physical_memory() -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sysconf reads system constants and has no preconditions.
        let (pages, size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
        if pages > 0 && size > 0 {
            return (pages as usize).checked_mul(size as usize);
        }
    }
    None
}

/// The page-aligned `(start, length)` inside `buffer`, if any.
#[cfg(target_os = "linux")]
fn whole_pages<T>(buffer: &[T]) -> Option<(usize, usize)> {
    const PAGE: usize = 4096;
    let start = (buffer.as_ptr() as usize).next_multiple_of(PAGE);
    let end = (buffer.as_ptr() as usize + std::mem::size_of_val(buffer)) / PAGE * PAGE;
    (end > start).then(|| (start, end - start))
}

#[cfg(target_os = "linux")]
fn advise_huge_pages<T>(buffer: &[T]) {
    const HUGE_PAGE: usize = 2 << 20;
    if std::mem::size_of_val(buffer) < HUGE_PAGE {
        return;
    }
    if let Some((start, len)) = whole_pages(buffer) {
        // SAFETY: the range lies inside `buffer`'s allocation and is page-aligned;
        // MADV_HUGEPAGE only changes how later faults are served, never the contents.
        // The result is advisory: a kernel without THP returns an error, ignored.
        unsafe {
            libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages<T>(_buffer: &[T]) {}

#[cfg(test)]
mod tests {
    use super::{physical_memory, release_lazily, try_zeroed_u64, zeroed_f32};

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

    #[test]
    fn a_lazily_released_buffer_takes_writes_again() {
        let n = (8 << 20) / 8 + 5;
        let mut w = try_zeroed_u64(n).expect("an 8 MiB allocation");
        w.fill(u64::MAX);
        release_lazily(&mut w);
        // Old data or zeros, page by page, until written; then what was written.
        assert!(w.iter().all(|&x| x == 0 || x == u64::MAX));
        for (i, x) in w.iter_mut().enumerate() {
            *x = i as u64;
        }
        assert!(w.iter().enumerate().all(|(i, &x)| x == i as u64));
        assert!(physical_memory().is_none_or(|b| b >= 1 << 20));
    }
}
