//! Half-precision serving: the served model in f16 or bf16 runs the generic ops (what a GPU
//! runs; on the CPU the fused kernels are f32 only), and its predictions must match the f32
//! model's on nearly every pixel.

mod common;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;
use segadapt::model::{init_tensors, Segformer};

#[test]
fn a_half_precision_served_model_predicts_what_the_f32_one_does() {
    let cfg = common::tiny_config(5);
    let model = Segformer::new(&cfg, init_tensors(&cfg, &Device::Cpu, 3).unwrap()).unwrap();
    let mut r = segadapt::SeededRng::seed_from_u64(1);
    let x: Vec<f32> = (0..2 * 3 * 64 * 96)
        .map(|_| rand_distr::StandardNormal.sample(&mut r))
        .collect();
    let x = Tensor::from_vec(x, (2, 3, 64, 96), &Device::Cpu).unwrap();
    let full = model.forward(&x, None).unwrap().logits;
    let want = common::classes(&full);
    let scale = common::max_abs(&full);
    for (dtype, tol) in [(DType::F16, 0.01), (DType::BF16, 0.05)] {
        let half = model.to_dtype(dtype).unwrap();
        assert_eq!(half.dtype(), dtype);
        let logits = half.forward(&x, None).unwrap().logits;
        assert_eq!(logits.dtype(), dtype);
        let d = common::max_diff(&logits, &full) / scale;
        assert!(d < tol, "{dtype:?}: logits differ by {d} of their largest");
        let got = common::classes(&logits);
        let agree = got.iter().zip(&want).filter(|(a, b)| a == b).count();
        assert!(
            agree * 100 >= want.len() * 97,
            "{dtype:?}: {agree} of {} pixels agree",
            want.len()
        );
    }
}

/// The teacher labelling in half precision: one adaptation step keeps nearly the same pixels at
/// nearly the same confidence as with f32 labels.
#[test]
fn half_precision_labels_select_what_f32_labels_do() {
    use segadapt::adapt::step::Adapter;
    let data = tempfile::tempdir().unwrap();
    common::write_dataset(data.path(), 3, 64, 48);
    let examples = segadapt::data::Dataset::open(data.path(), &[])
        .unwrap()
        .load_all(3, 255, true);
    let cfg = common::tiny_config(3);
    let tensors = init_tensors(&cfg, &Device::Cpu, 0).unwrap();
    let pre = segadapt::config::PreprocessConfig::with_size(Some((64, 48)));
    let stats = segadapt::stats::SourceStats::compute(
        &Segformer::new(&cfg, tensors.clone()).unwrap(),
        &pre,
        &examples,
        255,
    )
    .unwrap();
    let x = segadapt::data::image_to_tensor(&examples[0].image, &pre, &Device::Cpu).unwrap();
    let strong = (&x * 0.9).unwrap();
    let ac = segadapt::adapt::AdaptConfig {
        threshold: 0.2,
        ..Default::default()
    };
    let report = |dtype: DType| {
        let mut a = Adapter::new(ac.clone(), &cfg, &tensors, stats.clone()).unwrap();
        a.label_dtype = dtype;
        let mut rng = segadapt::SeededRng::seed_from_u64(4);
        a.step(&x, &strong, &mut rng).unwrap()
    };
    let full = report(DType::F32);
    assert!(full.kept > 0.0, "{full:?}");
    let half = report(DType::F16);
    // Rounded in f16, the mean confidence cannot come out to the same f32 bits.
    assert_ne!(half.confidence, full.confidence, "the labels ran in f16");
    assert!(
        (half.confidence - full.confidence).abs() < 0.01,
        "{half:?} vs {full:?}"
    );
    assert!((half.kept - full.kept).abs() < 0.03, "{half:?} vs {full:?}");
}
