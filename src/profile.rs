//! Where a step's time goes: named scopes (step phases, model parts, custom kernels) add their
//! wall time to a global table while profiling is on; off, a scope costs one atomic load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ON: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<Option<HashMap<&'static str, (f64, u64)>>> = Mutex::new(None);

/// Adds the time until it is dropped to `name`'s total.
pub struct Scope {
    name: &'static str,
    start: Option<Instant>,
}

pub fn scope(name: &'static str) -> Scope {
    Scope {
        name,
        start: ON.load(Ordering::Relaxed).then(Instant::now),
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some(t0) = self.start {
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            let mut t = TABLE.lock().expect("profile table");
            let e = t
                .get_or_insert_with(HashMap::new)
                .entry(self.name)
                .or_default();
            e.0 += ms;
            e.1 += 1;
        }
    }
}

/// Starts collecting (from an empty table) or stops.
pub fn enable(on: bool) {
    if on {
        *TABLE.lock().expect("profile table") = None;
    }
    ON.store(on, Ordering::Relaxed);
}

/// The table so far: (name, total ms, calls), largest total first.
pub fn take() -> Vec<(&'static str, f64, u64)> {
    let t = TABLE
        .lock()
        .expect("profile table")
        .take()
        .unwrap_or_default();
    let mut v: Vec<(&'static str, f64, u64)> =
        t.into_iter().map(|(k, (ms, n))| (k, ms, n)).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_add_up_only_while_on() {
        {
            let _s = scope("test-off");
        }
        enable(true);
        for _ in 0..3 {
            let _s = scope("test-on");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        enable(false);
        let t = take();
        let on = t.iter().find(|(n, _, _)| *n == "test-on").unwrap();
        assert_eq!(on.2, 3);
        assert!(on.1 >= 6.0);
        assert!(!t.iter().any(|(n, _, _)| *n == "test-off"));
    }
}
