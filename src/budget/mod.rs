//! Memory accounting. For now: a counting global allocator for live and peak heap bytes.

mod alloc;

pub use alloc::{current_bytes, peak_bytes, reset_peak, tune_malloc, CountingAlloc};

/// The process's peak resident set (VmHWM) in bytes; None where /proc is not available.
pub fn peak_rss_bytes() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
