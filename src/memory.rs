//! How `couponctl` takes memory: mimalloc as the global allocator (set in
//! `src/main.rs`, and in the integration tests' binary so that the
//! measurements living there allocate as the product does), without
//! transparent huge pages.
//!
//! Why mimalloc: a claim allocates and frees a few dozen small buffers on
//! whichever runtime worker polls it (the request, the Redis command, the
//! produced record, the answer). Under the flash sale as users run it,
//! glibc's allocator took about a fifth of the process's CPU
//! (`malloc_consolidate`, `unlink_chunk`, `_int_free`); with mimalloc a
//! claim costs 66-91 CPU-µs of `couponctl` instead of 72-121 (README,
//! *Benchmarks*).
//!
//! Why no huge pages: mimalloc asks the kernel for transparent huge pages on
//! its arenas, and each first touch of one then faults in and zeroes 2 MiB.
//! Where memory grows fast (the rebuild holds the whole log decoded) that
//! was 44% of the rebuild's CPU in `clear_page_erms` and made its read 1.9x
//! slower than with glibc; without them the rebuild is faster than with
//! glibc and the gateway's claims cost the same, in less resident memory.

/// Turns transparent huge pages off for this process (Linux; nothing
/// elsewhere). Call once, early: it applies to pages touched afterwards.
pub fn without_huge_pages() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_THP_DISABLE takes plain integers and only sets a
        // flag of this process's memory map; no memory of ours is touched.
        let refused = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0;
        if refused {
            // An old kernel: the process runs as before, with huge pages.
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "transparent huge pages left on"
            );
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn huge_pages_are_off_for_the_process_after_the_call() {
        super::without_huge_pages();
        // SAFETY: PR_GET_THP_DISABLE only reads the flag.
        let disabled = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(disabled, 1, "the process's THP-disable flag");
    }
}
