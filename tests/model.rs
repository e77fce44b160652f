//! The trainable SegFormer: every parameter learns, the teacher stays graph-free and follows the
//! student by EMA, weights round-trip through HF files, optimizer state restores exactly.

mod common;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use segadapt::loss::{cross_entropy, flatten_pixels};
use segadapt::model::ema::{ema_momentum, ema_update};
use segadapt::model::weights::{load_model_dir, save_model_dir, ModelFiles};
use segadapt::model::{init_tensors, ops, param_specs, Segformer, Student, Tracking};
use segadapt::optim::{AdamW, AdamWConfig, ParamGroup};

/// 64x96 input: at 32x48 the last stages reduce keys to a single position, where softmax is
/// constant and query/key gradients are truly zero.
fn loss_of(student: &Student, seed: u64) -> Tensor {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (2, 3, 64, 96), &dev).unwrap();
    let labels: Vec<u32> = (0..2 * 64 * 96)
        .map(|i| ((i * 7 + seed as usize) % 5) as u32)
        .collect();
    let labels = Tensor::from_vec(labels, 2 * 64 * 96, &dev).unwrap();
    let mut rng = segadapt::SeededRng::seed_from_u64(seed);
    let out = student.model.forward(&x, Some(&mut rng)).unwrap();
    let up = ops::resize_bilinear(&out.logits, 64, 96).unwrap();
    cross_entropy(&flatten_pixels(&up).unwrap(), &labels, None, 255).unwrap()
}

#[test]
fn every_trainable_tensor_receives_a_nonzero_gradient() {
    let cfg = common::tiny_config(5);
    assert!(cfg.drop_path_rate > 0.0 && cfg.classifier_dropout_prob > 0.0);
    let student = Student::new(&cfg, &init_tensors(&cfg, &Device::Cpu, 1).unwrap()).unwrap();
    // Drop path can zero a whole branch for one draw; two seeds cover every block.
    let mut missing: Vec<String> = student.vars.iter().map(|(n, _)| n.clone()).collect();
    for seed in [3, 4] {
        let grads = loss_of(&student, seed).backward().unwrap();
        missing.retain(|name| {
            let var = &student.vars.iter().find(|(n, _)| n == name).unwrap().1;
            let nonzero = grads
                .get(var.as_tensor())
                .map(|g| {
                    g.abs()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                        > 0.0
                })
                .unwrap_or(false);
            !nonzero
        });
    }
    assert!(missing.is_empty(), "no gradient for {missing:?}");
    let trainable = param_specs(&cfg).iter().filter(|s| s.trainable).count();
    assert_eq!(student.vars.len(), trainable);
}

#[test]
fn teacher_is_graph_free_and_follows_the_student_by_ema() {
    let cfg = common::tiny_config(5);
    let dev = Device::Cpu;
    let t0 = init_tensors(&cfg, &dev, 1).unwrap();
    let student = Student::new(&cfg, &t0).unwrap();
    let teacher = Segformer::new(
        &cfg,
        segadapt::model::ema::detached_copy(&student.model).unwrap(),
    )
    .unwrap();
    assert!(teacher.raw_tensors().values().all(|t| !t.is_variable()));

    // Move the student, then one EMA step must give a*t + (1-a)*s for every parameter.
    for (_, v) in &student.vars {
        v.set(&(v.as_tensor() + 1.0).unwrap()).unwrap();
    }
    // Deep copies: the teacher's tensors are updated in place.
    let before: std::collections::BTreeMap<String, Tensor> = teacher
        .tensors()
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.copy().unwrap()))
        .collect();
    let a = 0.9;
    ema_update(&teacher, &student.model, a).unwrap();
    for (name, v) in &student.vars {
        let want = ((&before[name] * a).unwrap() + (v.as_tensor() * (1.0 - a)).unwrap()).unwrap();
        let got = &teacher.raw_tensors()[name];
        let d = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-6, "{name}: EMA off by {d}");
    }
    // DAFormer's warm-up: a_t = min(1 - 1/(t+1), a).
    assert_eq!(ema_momentum(0.999, 0), 0.0);
    assert_eq!(ema_momentum(0.999, 1), 0.5);
    assert!((ema_momentum(0.999, 99) - 0.99).abs() < 1e-12);
    assert_eq!(ema_momentum(0.999, 100_000), 0.999);
}

#[test]
fn weights_round_trip_in_hf_names() {
    let dir = tempfile::tempdir().unwrap();
    let src = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tiny-segformer"
    ));
    let a = load_model_dir(src, &Device::Cpu).unwrap();
    save_model_dir(dir.path(), &a).unwrap();
    let b = load_model_dir(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(
        a.tensors.keys().collect::<Vec<_>>(),
        b.tensors.keys().collect::<Vec<_>>()
    );
    for (k, t) in &a.tensors {
        let u = &b.tensors[k];
        assert_eq!(t.dtype(), u.dtype(), "{k}");
        let same = t
            .to_dtype(DType::F64)
            .unwrap()
            .eq(&u.to_dtype(DType::F64).unwrap())
            .unwrap();
        assert_eq!(
            same.to_dtype(DType::F32)
                .unwrap()
                .min_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            1.0,
            "{k}"
        );
    }
    // The raw file keeps HF's names and the counter's int64 type, as transformers expects.
    let raw =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(
        raw["decode_head.batch_norm.num_batches_tracked"].dtype(),
        DType::I64
    );
    assert!(raw.contains_key("segformer.encoder.block.0.0.attention.self.query.weight"));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["model_type"], "segformer");
    assert_eq!(cfg["id2label"]["4"], "c4");
    let _ = ModelFiles { ..b };
}

#[test]
fn adamw_matches_pytorch_formula_and_restores_exactly() {
    let dev = Device::Cpu;
    let make = |vals: &[f32]| candle_core::Var::from_vec(vals.to_vec(), vals.len(), &dev).unwrap();
    let cfg = AdamWConfig {
        weight_decay: 0.1,
        ..Default::default()
    };
    let group = ParamGroup {
        lr_mult: 2.0,
        decay: true,
    };
    let p = make(&[1.0, -2.0, 0.5]);
    let mut opt = AdamW::new(vec![("p".into(), p.clone(), group)], cfg).unwrap();
    let loss = |p: &candle_core::Var| {
        (p.as_tensor().sqr().unwrap() * 0.5)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let g = loss(&p).backward().unwrap();
    opt.step(&g, 0.01).unwrap();
    // Step 1 of torch.optim.AdamW(lr=0.02, weight_decay=0.1): p*(1 - lr*wd) - lr * g/(|g| + eps).
    let want: Vec<f32> = [1.0f32, -2.0, 0.5]
        .iter()
        .map(|&x| x * (1.0 - 0.02 * 0.1) - 0.02 * x.signum() * (x.abs() / (x.abs() + 1e-8)))
        .collect();
    let got = p.as_tensor().to_vec1::<f32>().unwrap();
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() < 1e-6, "{got:?} vs {want:?}");
    }
    // Save after two steps, continue both the original and a restored copy: identical.
    let g = loss(&p).backward().unwrap();
    opt.step(&g, 0.01).unwrap();
    let state = opt.state().unwrap();
    let q = make(&p.as_tensor().to_vec1::<f32>().unwrap());
    let mut opt2 = AdamW::new(vec![("p".into(), q.clone(), group)], cfg).unwrap();
    opt2.load_state(&state).unwrap();
    assert_eq!(opt2.step_count(), 2);
    for _ in 0..3 {
        let g = loss(&p).backward().unwrap();
        opt.step(&g, 0.01).unwrap();
        let g = loss(&q).backward().unwrap();
        opt2.step(&g, 0.01).unwrap();
    }
    assert_eq!(
        p.as_tensor().to_vec1::<f32>().unwrap(),
        q.as_tensor().to_vec1::<f32>().unwrap()
    );
}

#[test]
fn gradient_clipping_bounds_the_update_and_non_finite_is_skipped() {
    let dev = Device::Cpu;
    let p = candle_core::Var::from_vec(vec![3.0f32, 4.0], 2, &dev).unwrap();
    let cfg = AdamWConfig {
        weight_decay: 0.0,
        max_grad_norm: Some(1.0),
        ..Default::default()
    };
    let mut opt = AdamW::new(
        vec![(
            "p".into(),
            p.clone(),
            ParamGroup {
                lr_mult: 1.0,
                decay: false,
            },
        )],
        cfg,
    )
    .unwrap();
    let g = (p.as_tensor() * 1.0)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap(); // grad (6, 8), norm 10
    match opt.step(&g, 0.1).unwrap() {
        segadapt::optim::StepOutcome::Applied { grad_norm } => {
            assert!((grad_norm - 10.0).abs() < 1e-5)
        }
        other => panic!("{other:?}"),
    }
    let state = opt.state().unwrap();
    let m = state["adamw.m.p"].to_vec1::<f32>().unwrap();
    // First moment holds (1 - beta1) * clipped gradient = 0.1 * (0.6, 0.8).
    assert!(
        (m[0] - 0.06).abs() < 1e-5 && (m[1] - 0.08).abs() < 1e-5,
        "{m:?}"
    );

    let before = p.as_tensor().to_vec1::<f32>().unwrap();
    let bad = (p.as_tensor() * f64::NAN)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(
        opt.step(&bad, 0.1).unwrap(),
        segadapt::optim::StepOutcome::NonFinite
    );
    assert_eq!(p.as_tensor().to_vec1::<f32>().unwrap(), before);
}

#[test]
fn non_finite_weights_are_refused_naming_the_tensor() {
    use segadapt::model::weights;
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    common::write_dataset(&data, 2, 32, 32);
    let cfg = common::tiny_config(3);
    let dir = root.path().join("model");
    common::write_model_dir(&dir, &cfg, &data, (32, 32));
    let dev = candle_core::Device::Cpu;
    let mut files = weights::load_model_dir(&dir, &dev).unwrap();
    let name = "decode_head.classifier.weight";
    let w = &files.tensors[name];
    let nan = (w.zeros_like().unwrap() / 0.0).unwrap();
    files.tensors.insert(name.into(), nan);
    weights::save_model_dir(&dir, &files).unwrap();
    let err = weights::load_model_dir(&dir, &dev)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(name) && err.contains("not finite"), "{err}");

    // A checkpoint with a NaN is damaged: the one before it is used.
    let ck = segadapt::checkpoint::CheckpointDir::new(root.path().join("ck"), 3);
    let good: segadapt::model::TensorMap = [(
        "w".to_string(),
        candle_core::Tensor::new(&[1f32, 2.0], &dev).unwrap(),
    )]
    .into();
    let bad: segadapt::model::TensorMap = [(
        "w".to_string(),
        candle_core::Tensor::new(&[1f32, f32::NAN], &dev).unwrap(),
    )]
    .into();
    ck.save(10, &good, Default::default()).unwrap();
    ck.save(20, &bad, Default::default()).unwrap();
    assert_eq!(ck.latest(&dev).unwrap().step, 10);
}

/// A training forward's gradients, by parameter name, with `recompute`; dropout and drop path on,
/// so the backward pass's rerun must draw the forward's masks again.
fn gradients_with(recompute: segadapt::model::Recompute) -> Vec<(String, Tensor)> {
    use rand_distr::Distribution;
    let mut cfg = common::tiny_config(5);
    cfg.hidden_dropout_prob = 0.1;
    cfg.attention_probs_dropout_prob = 0.1;
    let mut student = Student::new(&cfg, &init_tensors(&cfg, &Device::Cpu, 1).unwrap()).unwrap();
    student.model.set_recompute(recompute);
    let mut r = segadapt::SeededRng::seed_from_u64(9);
    let x: Vec<f32> = (0..2 * 3 * 64 * 96)
        .map(|_| rand_distr::StandardNormal.sample(&mut r))
        .collect();
    let x = Tensor::from_vec(x, (2, 3, 64, 96), &Device::Cpu).unwrap();
    let out = student.model.forward(&x, Some(&mut r)).unwrap();
    let labels: Vec<u32> = (0..2 * 16 * 24).map(|i| (i * 7 % 5) as u32).collect();
    let labels = Tensor::from_vec(labels, 2 * 16 * 24, &Device::Cpu).unwrap();
    let ce = cross_entropy(&flatten_pixels(&out.logits).unwrap(), &labels, None, 255).unwrap();
    let loss = (ce + out.embed.sqr().unwrap().mean_all().unwrap()).unwrap();
    let grads = student.model.backward(&loss).unwrap();
    student
        .vars
        .iter()
        .map(|(n, v)| (n.clone(), grads.get(v.as_tensor()).unwrap().clone()))
        .collect()
}

#[test]
fn recomputed_blocks_give_the_gradients_of_the_kept_graph() {
    let kept = gradients_with(segadapt::model::Recompute::None);
    let rerun = gradients_with(segadapt::model::Recompute::Blocks);
    assert_eq!(kept.len(), rerun.len());
    let blocks = kept.iter().filter(|(n, _)| n.contains(".block.")).count();
    assert!(blocks > 50, "{blocks} block tensors");
    for ((name, a), (_, b)) in kept.iter().zip(&rerun) {
        let scale = common::max_abs(a);
        let d = common::max_diff(a, b);
        assert!(d <= 1e-5 * scale.max(1e-3), "{name}: {d} (largest {scale})");
    }
}

#[test]
fn a_served_model_takes_the_teachers_statistics_without_its_weights_moving() {
    let cfg = common::tiny_config(5);
    let dev = Device::Cpu;
    let teacher = Segformer::new(&cfg, init_tensors(&cfg, &dev, 1).unwrap()).unwrap();
    let copy = || segadapt::model::ema::detached_copy(&teacher).unwrap();
    let served = Segformer::new(&cfg, copy()).unwrap();
    let dark =
        ((Tensor::randn(0f32, 1.0, (1, 3, 64, 96), &dev).unwrap() * 0.2).unwrap() - 1.5).unwrap();
    teacher.forward_tracking(&dark, Tracking::Batch).unwrap();
    let next = served.with_statistics_of(&teacher).unwrap();
    let whole = Segformer::new(&cfg, copy()).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, 3, 64, 96), &dev).unwrap();
    let logits = |m: &Segformer| m.forward(&x, None).unwrap().logits;
    assert_eq!(
        common::max_diff(&logits(&next), &logits(&whole)),
        0.0,
        "serves as a whole copy of the teacher would"
    );
    assert!(common::max_diff(&logits(&next), &logits(&served)) > 0.0);
    let counter = "decode_head.batch_norm.num_batches_tracked";
    let n = |m: &Segformer| m.tensors().unwrap()[counter].to_scalar::<i64>().unwrap();
    assert_eq!(n(&next), n(&teacher));
    // The teacher goes on tracking in place; what serving was given must not move with it.
    let before = logits(&next);
    teacher.forward_tracking(&x, Tracking::Batch).unwrap();
    assert_eq!(common::max_diff(&logits(&next), &before), 0.0);
    // Shared, not copied: the served weights are the tensors it already had.
    let w = "decode_head.classifier.weight";
    assert_eq!(next.raw_tensors()[w].id(), served.raw_tensors()[w].id());
}

/// A tiny 5-class model and its weights, for the tracking tests.
fn tiny_source() -> (Segformer, segadapt::model::TensorMap) {
    let cfg = common::tiny_config(5);
    let tensors = init_tensors(&cfg, &Device::Cpu, 3).unwrap();
    (Segformer::new(&cfg, tensors.clone()).unwrap(), tensors)
}

/// A model on its own copy of `m`'s weights: tracking moves statistics in place.
fn fresh(m: &Segformer) -> Segformer {
    Segformer::new(&m.cfg, segadapt::model::ema::detached_copy(m).unwrap()).unwrap()
}

/// `x`'s class statistics under the labels `m` gives it, its mean the frames' spread is measured from.
fn own_class_norm(m: &Segformer, x: &Tensor) -> segadapt::model::ClassNorm {
    let (out, fused) = m.forward_fused(x).unwrap();
    let labels = out.logits.flatten_to(2).unwrap().argmax(1).unwrap();
    let classes = m.cfg.num_labels();
    let moments = segadapt::model::ClassMoments::of(&fused, &labels, classes).unwrap();
    segadapt::model::ClassNorm::from_moments(&moments, &fused.mean_keepdim(0).unwrap()).unwrap()
}

#[test]
fn tracking_by_class_on_the_frames_the_class_statistics_came_from_is_plain_tracking() {
    let (model, tensors) = tiny_source();
    let (by_batch, by_class) = (fresh(&model), fresh(&model));
    let x = Tensor::randn(0f32, 1.0, (2, 3, 64, 96), &Device::Cpu).unwrap();
    // The frames' own class statistics, under the labels the model gives them: their
    // mixture at the frames' own class shares is the frames' statistics.
    let norm = own_class_norm(&model, &x);
    by_batch.forward_tracking(&x, Tracking::Batch).unwrap();
    by_class
        .forward_tracking(&x, Tracking::ByClass(&norm))
        .unwrap();
    for n in [
        "decode_head.batch_norm.running_mean",
        "decode_head.batch_norm.running_var",
    ] {
        let (a, b) = (&by_batch.raw_tensors()[n], &by_class.raw_tensors()[n]);
        let source = &tensors[n];
        assert!(common::max_diff(a, source) > 1e-3, "{n} moved");
        assert!(
            common::max_diff(a, b) < 1e-4,
            "{n}: {}",
            common::max_diff(a, b)
        );
    }
}

#[test]
fn anchored_tracking_goes_back_to_the_source_statistics_unless_the_features_have_moved() {
    let (source_model, tensors) = tiny_source();
    let model = || fresh(&source_model);
    let (mean, var) = (
        "decode_head.batch_norm.running_mean",
        "decode_head.batch_norm.running_var",
    );
    let source = (&tensors[mean], &tensors[var]);
    let x = Tensor::randn(0f32, 1.0, (2, 3, 64, 96), &Device::Cpu).unwrap();
    let dark = ((&x * 0.2).unwrap() - 1.5).unwrap();
    // The source's class statistics on `x` itself, with a spread set by the test.
    let with_spread = |spread| {
        let mut n = own_class_norm(&source_model, &x);
        n.spread = spread;
        n
    };
    let (wide, narrow) = (with_spread(1e9), with_spread(1e-9));
    let from_source = |t: &Segformer| common::max_diff(&t.raw_tensors()[mean], &tensors[mean]);
    let anchored = |share, norm| Tracking::Anchored {
        share,
        source,
        norm: Some(norm),
    };

    // Taken away by dark frames, then shown frames whose features sit within the source's own
    // spread, at no share: the statistics go back at the momentum's pace (0.1 a step).
    let teacher = model();
    for _ in 0..5 {
        teacher.forward_tracking(&dark, Tracking::Batch).unwrap();
    }
    let away = from_source(&teacher);
    assert!(away > 1e-2, "{away}");
    for _ in 0..10 {
        teacher
            .forward_tracking(&dark, anchored(0.0, &wide))
            .unwrap();
    }
    let back = from_source(&teacher);
    assert!(
        (back / away - 0.9f32.powi(10)).abs() < 1e-3,
        "{back} of {away}"
    );

    // At a full share, or with the features past twice the spread, it is plain tracking.
    let plain = model();
    plain.forward_tracking(&dark, Tracking::Batch).unwrap();
    for track in [anchored(1.0, &wide), anchored(0.0, &narrow)] {
        let t = model();
        t.forward_tracking(&dark, track).unwrap();
        for n in [mean, var] {
            let d = common::max_diff(&t.raw_tensors()[n], &plain.raw_tensors()[n]);
            assert!(d < 1e-5, "{n}: {d}");
        }
    }
    // Half way: the mean goes half as far.
    let half = model();
    half.forward_tracking(&dark, anchored(0.5, &wide)).unwrap();
    let ratio = from_source(&half) / from_source(&plain);
    assert!((ratio - 0.5).abs() < 1e-3, "{ratio}");
}
