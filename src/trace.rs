//! NVTX ranges, so that a profiler's timeline (`nsys profile --trace=cuda,nvtx kdx …`) shows which
//! phase and layer each kernel belongs to. Ranges nest per thread (push/pop); without a profiler
//! attached each is a cheap call into NVTX's no-op stub.

use std::fmt::Display;

/// An open NVTX range; it closes when dropped.
#[must_use = "the range closes as soon as this guard is dropped"]
pub struct Range(());

/// Opens a range named `name` on this thread, closed when the guard drops.
pub fn range(name: impl Display) -> Range {
    nvtx::range_push!("{name}");
    Range(())
}

impl Drop for Range {
    fn drop(&mut self) {
        nvtx::range_pop!();
    }
}
