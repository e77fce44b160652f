//! What a training step holds at its peak: the backward pass frees the graph as it goes, and
//! recomputed blocks keep less still, while every tensor the caller holds stays readable. One
//! test in its own process: the heap counters are process-wide.

mod common;

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;
use segadapt::budget::{current_bytes, peak_bytes, reset_peak};
use segadapt::loss::{cross_entropy, flatten_pixels};
use segadapt::model::{init_tensors, Recompute, Student};

#[global_allocator]
static ALLOC: segadapt::budget::CountingAlloc = segadapt::budget::CountingAlloc;

/// Heap bytes a forward and backward needed above what was live before them, and the caller's
/// embedding read after the backward pass.
fn step_peak(recompute: Recompute, releasing: bool) -> (usize, Vec<f32>) {
    let cfg = common::tiny_config(5);
    let mut student = Student::new(&cfg, &init_tensors(&cfg, &Device::Cpu, 1).unwrap()).unwrap();
    student.model.set_recompute(recompute);
    let mut r = segadapt::SeededRng::seed_from_u64(2);
    let (h, w) = (128, 192);
    let x: Vec<f32> = (0..2 * 3 * h * w)
        .map(|_| rand_distr::StandardNormal.sample(&mut r))
        .collect();
    let x = Tensor::from_vec(x, (2, 3, h, w), &Device::Cpu).unwrap();
    let n = 2 * (h / 4) * (w / 4);
    let labels = Tensor::from_vec((0..n as u32).map(|i| i % 5).collect(), n, &Device::Cpu);
    let labels = labels.unwrap();
    let base = current_bytes();
    reset_peak();
    let out = student.model.forward(&x, Some(&mut r)).unwrap();
    let loss = cross_entropy(&flatten_pixels(&out.logits).unwrap(), &labels, None, 255).unwrap();
    let grads = match releasing {
        true => student.model.backward(&loss).unwrap(),
        false => loss.backward().unwrap(),
    };
    let peak = peak_bytes() - base;
    assert!(grads.get(student.vars[0].1.as_tensor()).is_some());
    let embed = out.embed.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (peak, embed)
}

#[test]
fn the_backward_pass_frees_what_it_has_passed_and_recomputation_keeps_less() {
    let (kept, e0) = step_peak(Recompute::None, false);
    let (released, e1) = step_peak(Recompute::None, true);
    let (rerun, e2) = step_peak(Recompute::Blocks, true);
    let mb = |b: usize| b as f64 / 1e6;
    eprintln!(
        "peak MB: graph kept {:.1}, freed as passed {:.1}, blocks recomputed {:.1}",
        mb(kept),
        mb(released),
        mb(rerun)
    );
    assert!(released * 10 < kept * 9, "{released} vs {kept}");
    assert!(rerun * 10 < released * 8, "{rerun} vs {released}");
    // The caller's tensors survive the pass that freed the rest of the graph.
    assert_eq!(e0, e1);
    assert_eq!(e0, e2);
}
