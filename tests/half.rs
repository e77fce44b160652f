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
