//! `cargo bench`: SegFormer-B0 at 512x256, inference and a batch-2 training step (forward, loss,
//! backward, AdamW, EMA), medians and peak memory; the same figures as `segadapt bench`.

#[global_allocator]
static ALLOC: segadapt::budget::CountingAlloc = segadapt::budget::CountingAlloc;

fn main() {
    segadapt::budget::tune_malloc();
    let spec = segadapt::bench::BenchSpec {
        config: "b0".into(),
        width: 512,
        height: 256,
        batch: 2,
        classes: 19,
        warmup: 2,
        reps: 5,
        ops: false,
        adapt: None,
        device: candle_core::Device::Cpu,
    };
    let r = segadapt::bench::run(&spec).expect("benchmark runs");
    println!(
        "segformer-b0 512x256, {} threads, median of {} after {} warm-up",
        r.threads, spec.reps, spec.warmup
    );
    for (name, t) in [
        ("inference batch 1", &r.infer),
        ("train step batch 2", &r.train_step),
        ("EMA update", &r.ema),
        ("handover, weights", &r.handover),
        ("handover, statistics", &r.handover_statistics),
        ("tracking forward", &r.track),
        ("tracking by class", &r.track_by_class),
        ("tracking anchored", &r.track_anchored),
    ] {
        println!(
            "{name:<20} {:>9.1} ms (min {:.1}, max {:.1})  heap peak {:.0} MB",
            t.median_ms, t.min_ms, t.max_ms, t.peak_mb
        );
    }
    println!(
        "peak RSS {:.0} MB after inference, {:.0} MB after training",
        r.infer_peak_rss_mb, r.train_peak_rss_mb
    );
}
