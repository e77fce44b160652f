//! The arithmetic a GPU runs, checked on the CPU: two adaptation steps with every component on,
//! once through the fused CPU kernels and once with every op, the optimizer and the EMA update
//! forced through their generic twins (what serves CUDA tensors). Loss terms and the updated
//! weights must agree. One test in its own process: the switch is process-wide.

mod common;

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;
use segadapt::adapt::step::{Adapter, StepReport};
use segadapt::adapt::AdaptConfig;
use segadapt::config::PreprocessConfig;
use segadapt::data::Dataset;
use segadapt::model::{init_tensors, Segformer};
use segadapt::stats::SourceStats;

fn frames(seed: u64) -> Tensor {
    let mut r = segadapt::SeededRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..2 * 3 * 48 * 64)
        .map(|_| rand_distr::StandardNormal.sample(&mut r))
        .collect();
    Tensor::from_vec(v, (2, 3, 48, 64), &Device::Cpu).unwrap()
}

/// Two steps from the same start; the reports and the student's weights after them.
fn two_steps(
    cfg: &AdaptConfig,
    model: &segadapt::config::SegformerConfig,
    tensors: &segadapt::model::TensorMap,
    stats: &SourceStats,
) -> (Vec<StepReport>, Vec<(String, Vec<f32>)>) {
    let mut a = Adapter::new(cfg.clone(), model, tensors, stats.clone()).unwrap();
    let mut rng = segadapt::SeededRng::seed_from_u64(5);
    let reports = (0..2)
        .map(|k| {
            let x = frames(k);
            let strong = (&x * 0.9).unwrap();
            a.step(&x, &strong, &mut rng).unwrap()
        })
        .collect();
    let weights = a
        .student
        .vars
        .iter()
        .map(|(n, v)| {
            (
                n.clone(),
                v.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
            )
        })
        .collect();
    (reports, weights)
}

#[test]
fn a_full_adaptation_step_agrees_between_the_cpu_kernels_and_the_generic_ops() {
    let data = tempfile::tempdir().unwrap();
    common::write_dataset(data.path(), 3, 64, 48);
    let examples = Dataset::open(data.path(), &[])
        .unwrap()
        .load_all(3, 255, true);
    let mut model_cfg = common::tiny_config(3);
    model_cfg.drop_path_rate = 0.0;
    let tensors = init_tensors(&model_cfg, &Device::Cpu, 0).unwrap();
    let pre = PreprocessConfig::with_size(Some((64, 48)));
    let stats = SourceStats::compute(
        &Segformer::new(&model_cfg, tensors.clone()).unwrap(),
        &pre,
        &examples,
        255,
    )
    .unwrap();
    let mut cfg = AdaptConfig {
        lr: 1e-4,
        threshold: 0.2,
        ..Default::default()
    };
    (cfg.cpsl.queue, cfg.cpsl.pixels) = (300, 128);
    (cfg.bida.ramp, cfg.bida.per_class, cfg.bida.check) = (10, 8, true);
    (cfg.dida.bank, cfg.dida.blend) = (12, 0.5);
    (cfg.hpla.pool, cfg.hpla.hard) = (3, 2);
    cfg.guard.collapse = false;

    let (fast, fast_w) = two_steps(&cfg, &model_cfg, &tensors, &stats);
    segadapt::model::ops::force_generic(true);
    let (generic, generic_w) = two_steps(&cfg, &model_cfg, &tensors, &stats);
    segadapt::model::ops::force_generic(false);

    for (f, g) in fast.iter().zip(&generic) {
        assert!(f.terms.len() >= 8, "every component's terms: {:?}", f.terms);
        assert_eq!(f.terms.len(), g.terms.len());
        for ((name, a), (_, b)) in f.terms.iter().zip(&g.terms) {
            let tol = 1e-3 * a.abs().max(1.0);
            assert!((a - b).abs() <= tol, "{name}: CPU kernels {a}, generic {b}");
        }
        assert!(
            (f.kept - g.kept).abs() < 1e-3,
            "kept {} vs {}",
            f.kept,
            g.kept
        );
    }
    // AdamW's first steps move each weight by about lr whatever the gradient's size, so a
    // gradient that is nearly zero may move either way: most weights must agree closely,
    // and none may be more than two steps apart.
    // The decode head steps at lr x head_lr_mult.
    let lr = (cfg.lr * cfg.head_lr_mult.max(1.0)) as f32;
    let (mut n, mut close) = (0usize, 0usize);
    for ((name, a), (_, b)) in fast_w.iter().zip(&generic_w) {
        for (x, y) in a.iter().zip(b) {
            let d = (x - y).abs();
            assert!(d <= 4.0 * lr + 1e-6, "{name}: {x} vs {y}");
            n += 1;
            close += (d <= 0.05 * lr) as usize;
        }
    }
    assert!(
        close as f64 >= 0.99 * n as f64,
        "{close} of {n} weights agree"
    );
    // The two paths round differently: equal to the bit, the switch did nothing.
    assert_ne!(fast_w, generic_w, "the generic ops ran");
}
