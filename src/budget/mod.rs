//! Memory accounting: a counting global allocator for live and peak heap bytes, measured
//! step and serving peaks, and the plan that fits a profile's parts into its budget.

mod alloc;
pub mod measure;
pub mod plan;

pub use alloc::{current_bytes, peak_bytes, reset_peak, tune_malloc, CountingAlloc};
pub use measure::{measured_plan, Calibrator};
pub use plan::{plan, Measure, Plan};

/// The process's resident set size in bytes (Linux); None where /proc is not available.
pub fn rss_bytes() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = s.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(4096) as usize)
}

/// The process's peak resident set (VmHWM) in bytes; None where /proc is not available.
pub fn peak_rss_bytes() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
