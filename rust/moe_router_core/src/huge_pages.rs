//! Zeroed output buffers that ask the OS for transparent huge pages.
//!
//! A fresh multi-megabyte output (the `[T, E]` probabilities) is first touched
//! inside the routing pass, and with 4 KiB pages every 4 KiB costs a page fault
//! in which the kernel zeroes the page. Advising huge pages for the range, as
//! NumPy does for its own large arrays, takes 512 times fewer faults where the
//! kernel offers them (`transparent_hugepage` set to `madvise` or `always`);
//! elsewhere the advice is ignored and nothing changes.

/// `n` zeros, allocated lazily by the OS (nothing is touched here).
pub(crate) fn zeroed_f32(n: usize) -> Vec<f32> {
    let buffer = vec![0f32; n];
    advise_huge_pages(&buffer);
    buffer
}

#[cfg(target_os = "linux")]
fn advise_huge_pages(buffer: &[f32]) {
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
fn advise_huge_pages(_buffer: &[f32]) {}

#[cfg(test)]
mod tests {
    use super::zeroed_f32;

    #[test]
    fn zeroed_buffers_are_zero_and_sized() {
        for n in [0, 1, 1000, (4 << 20) + 3] {
            let b = zeroed_f32(n);
            assert_eq!(b.len(), n);
            assert!(b.iter().all(|&x| x == 0.0));
        }
    }
}
