fn main() {
    keep_freed_memory_mapped();
    if let Err(e) = kdx::cli::run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Training frees and reallocates the same activation buffers (tens of MB each) every step. glibc's
/// default hands such blocks back to the kernel on free, so each step pays a page fault and a page
/// clear per 4 KiB again (about 8% of a MiniLM training step). Serving them from the heap and never
/// trimming it keeps them mapped; the cost is memory that stays reserved at the peak of a step.
fn keep_freed_memory_mapped() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
    }
}
