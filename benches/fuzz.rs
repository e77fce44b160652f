//! Runs the fuzz targets (`segadapt::fuzz`) and prints, per target, executions, crashes,
//! distinct errors, the slowest input and the process's peak resident memory so far. Crashing inputs are written to `target/fuzz-crashes/`.
//!
//!     cargo bench --bench fuzz -- [--seconds N] [--seed S] [TARGET ...]
//!
//! Without targets it runs them all, each for N seconds (default 60); it exits non-zero when
//! any input crashed.

use std::time::Duration;

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut seconds, mut seed, mut names) = (60u64, 0u64, Vec::new());
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => {
                seconds = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--seconds N")
            }
            "--seed" => seed = args.next().and_then(|s| s.parse().ok()).expect("--seed S"),
            // What `cargo bench` passes to every bench target.
            "--bench" => {}
            t => names.push(t.to_string()),
        }
    }
    let targets: Vec<&segadapt::fuzz::Target> = match names.is_empty() {
        true => segadapt::fuzz::TARGETS.iter().collect(),
        false => names
            .iter()
            .map(|n| {
                segadapt::fuzz::target(n).unwrap_or_else(|| {
                    let all: Vec<&str> = segadapt::fuzz::TARGETS.iter().map(|t| t.name).collect();
                    panic!("no fuzz target {n:?}; there are {all:?}")
                })
            })
            .collect(),
    };
    let crash_dir = std::path::Path::new("target/fuzz-crashes");
    let mut crashed = 0;
    println!(
        "{:<14} {:>10} {:>8} {:>8} {:>7} {:>10} {:>12}",
        "target", "execs", "execs/s", "crashes", "errors", "slowest ms", "peak RSS MB"
    );
    for t in targets {
        let o = segadapt::fuzz::run(t, Duration::from_secs(seconds), seed, crash_dir)
            .expect("scratch folder");
        let rss =
            segadapt::budget::peak_rss_bytes().map_or(f64::NAN, |b| b as f64 / (1 << 20) as f64);
        println!(
            "{:<14} {:>10} {:>8.0} {:>8} {:>7} {:>10.1} {:>12.0}",
            t.name,
            o.executions,
            o.executions as f64 / seconds.max(1) as f64,
            o.crashes.len(),
            o.errors,
            o.slowest_ms,
            rss
        );
        for c in &o.crashes {
            println!("  crash: {}", c.display());
        }
        crashed += o.crashes.len();
    }
    if crashed > 0 {
        std::process::exit(1);
    }
}
