//! Parity with transformers' SegFormer: a tiny random model saved by `save_pretrained`
//! (tests/fixtures/make_parity.py) must give the same logits, loss, gradients and BatchNorm update.

mod common;

use candle_core::{DType, Device};
use rand::SeedableRng;
use segadapt::loss::{cross_entropy, flatten_pixels};
use segadapt::model::{ops, weights, Recompute, Segformer, Student};
use std::path::Path;

fn fixtures() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
}

#[test]
fn eval_logits_match_transformers() {
    let dev = Device::Cpu;
    let files = weights::load_model_dir(&fixtures().join("tiny-segformer"), &dev).unwrap();
    let refs = candle_core::safetensors::load(fixtures().join("parity.safetensors"), &dev).unwrap();
    let model = Segformer::new(&files.config, files.tensors).unwrap();
    let out = model.forward(&refs["pixel_values"], None).unwrap();
    let logits = out.logits.permute((0, 3, 1, 2)).unwrap(); // HF's [B, C, H/4, W/4]
    assert_eq!(logits.dims(), refs["logits"].dims());
    let d = common::max_diff(&logits, &refs["logits"]);
    assert!(d < 1e-4, "logits differ from transformers by {d}");
}

#[test]
fn train_step_gradients_match_transformers() {
    train_step_matches(Recompute::None);
}

#[test]
fn train_step_gradients_match_transformers_with_recomputation() {
    train_step_matches(Recompute::Blocks);
}

fn train_step_matches(recompute: Recompute) {
    let dev = Device::Cpu;
    let files = weights::load_model_dir(&fixtures().join("tiny-segformer"), &dev).unwrap();
    let refs = candle_core::safetensors::load(fixtures().join("parity.safetensors"), &dev).unwrap();
    let mut student = Student::new(&files.config, &files.tensors).unwrap();
    student.model.set_recompute(recompute);
    let mut rng = segadapt::SeededRng::seed_from_u64(0);
    let out = student
        .model
        .forward(&refs["pixel_values"], Some(&mut rng))
        .unwrap();
    let labels = &refs["labels"];
    let (_, h, w) = labels.dims3().unwrap();
    let up = ops::resize_bilinear(&out.logits, h, w).unwrap();
    let labels = labels.flatten_all().unwrap().to_dtype(DType::U32).unwrap();
    let loss = cross_entropy(&flatten_pixels(&up).unwrap(), &labels, None, 255).unwrap();
    let want = refs["loss"].to_vec1::<f32>().unwrap()[0];
    let got = loss.to_scalar::<f32>().unwrap();
    assert!(
        (got - want).abs() < 1e-5,
        "loss {got} vs transformers {want}"
    );

    let grads = student.model.backward(&loss).unwrap();
    let mut checked = 0;
    for (name, var) in &student.vars {
        let want = refs
            .get(&format!("grad.{name}"))
            .unwrap_or_else(|| panic!("no reference grad for {name}"));
        let got = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name} received no gradient"));
        let d = common::max_diff(got, want);
        let scale = common::max_abs(want).max(1e-3);
        assert!(
            d / scale < 1e-3,
            "{name}: gradient differs by {d} (max |g| {scale})"
        );
        checked += 1;
    }
    assert_eq!(checked, 143, "every trainable tensor is compared");

    let t = student.model.tensors().unwrap();
    for (k, r) in [
        ("running_mean", "running_mean"),
        ("running_var", "running_var"),
    ] {
        let d = common::max_diff(&t[&format!("decode_head.batch_norm.{k}")], &refs[r]);
        assert!(d < 1e-5, "BatchNorm {k} update differs by {d}");
    }
}
