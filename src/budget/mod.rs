//! Memory accounting. For now: a counting global allocator for live and peak heap bytes.

mod alloc;

pub use alloc::{current_bytes, peak_bytes, reset_peak, tune_malloc, CountingAlloc};
