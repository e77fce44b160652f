//! Source training end to end on a tiny generated dataset: it learns, an interrupted run resumes
//! bit-exactly, checkpoints survive damage, bad files are reported and skipped.

mod common;

use candle_core::Device;
use segadapt::checkpoint::CheckpointDir;
use segadapt::config::PreprocessConfig;
use segadapt::data::{AugmentConfig, Dataset, LabelMap};
use segadapt::model::init_tensors;
use segadapt::train::{train, TrainConfig};
use std::sync::atomic::{AtomicBool, Ordering};

fn config(iters: u64) -> TrainConfig {
    TrainConfig {
        iters,
        batch: 2,
        lr: 2e-3,
        head_lr_mult: 10.0,
        weight_decay: 0.01,
        warmup: 2,
        max_grad_norm: Some(1.0),
        ema: 0.99,
        seed: 5,
        augment: AugmentConfig {
            base: (64, 48),
            ratio_range: (0.5, 2.0),
            crop: (64, 48),
            cat_max_ratio: 0.75,
            flip_prob: 0.5,
            photometric: true,
        },
        checkpoint_every: 2,
        keep_checkpoints: 2,
        preprocess: PreprocessConfig::with_size(Some((64, 48))),
    }
}

#[test]
fn interrupted_training_resumes_bit_exactly() {
    let data = tempfile::tempdir().unwrap();
    common::write_dataset(data.path(), 6, 64, 48);
    let examples = Dataset::open(data.path(), &[("role".into(), "train".into())])
        .unwrap()
        .load_all(3, 255, true);
    assert_eq!(examples.len(), 3);
    let cfg = common::tiny_config(3);
    let init = init_tensors(&cfg, &Device::Cpu, 0).unwrap();
    let tc = config(6);

    let straight = tempfile::tempdir().unwrap();
    let never = AtomicBool::new(false);
    let a = train(
        &cfg,
        init.clone(),
        &examples,
        &tc,
        &straight.path().to_path_buf(),
        &never,
        &|_, _| {},
    )
    .unwrap();

    let split = tempfile::tempdir().unwrap();
    let out = split.path().to_path_buf();
    let stop = AtomicBool::new(false);
    let first = train(&cfg, init.clone(), &examples, &tc, &out, &stop, &|t, _| {
        if t == 3 {
            stop.store(true, Ordering::Relaxed);
        }
    })
    .unwrap();
    assert_eq!(
        first.opt.step_count(),
        3,
        "stopped after the step that raised the flag"
    );
    assert!(
        !out.join("model.safetensors").exists(),
        "no final model from an interrupted run"
    );
    let b = train(&cfg, init, &examples, &tc, &out, &never, &|_, _| {}).unwrap();

    let (ta, tb) = (a.state().unwrap(), b.state().unwrap());
    assert_eq!(ta.len(), tb.len());
    for (k, t) in &ta {
        let u = &tb[k];
        let d = (t.to_dtype(candle_core::DType::F64).unwrap()
            - u.to_dtype(candle_core::DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
        assert_eq!(d, 0.0, "{k} differs after resume by {d}");
    }
    assert!(out.join("model.safetensors").exists() && out.join("config.json").exists());
    let kept = std::fs::read_dir(out.join("checkpoints")).unwrap().count();
    assert!(kept <= 2, "keep_checkpoints = 2, found {kept}");
}

#[test]
fn training_reduces_the_loss() {
    let data = tempfile::tempdir().unwrap();
    common::write_dataset(data.path(), 4, 64, 48);
    let examples = Dataset::open(data.path(), &[])
        .unwrap()
        .load_all(3, 255, true);
    let cfg = common::tiny_config(3);
    let init = init_tensors(&cfg, &Device::Cpu, 0).unwrap();
    let mut tc = config(40);
    tc.checkpoint_every = 0;
    let out = tempfile::tempdir().unwrap();
    let losses = std::sync::Mutex::new(Vec::new());
    let never = AtomicBool::new(false);
    train(
        &cfg,
        init,
        &examples,
        &tc,
        &out.path().to_path_buf(),
        &never,
        &|_, s| losses.lock().unwrap().push(s.loss),
    )
    .unwrap();
    let l = losses.into_inner().unwrap();
    let head: f32 = l[..5].iter().sum::<f32>() / 5.0;
    let tail: f32 = l[l.len() - 5..].iter().sum::<f32>() / 5.0;
    assert!(tail < 0.7 * head, "loss went from {head} to {tail}");
}

#[test]
fn damaged_newest_checkpoint_falls_back_to_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let ck = CheckpointDir::new(dir.path(), 3);
    let dev = Device::Cpu;
    for step in [10u64, 20] {
        let mut m = segadapt::model::TensorMap::new();
        m.insert(
            "w".into(),
            candle_core::Tensor::new(&[step as f32], &dev).unwrap(),
        );
        ck.save(step, &m, Default::default()).unwrap();
    }
    let newest = dir.path().join("step-00000020.safetensors");
    let len = std::fs::metadata(&newest).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&newest)
        .unwrap();
    f.set_len(len / 2).unwrap();
    let got = ck.latest(&dev).expect("an older checkpoint loads");
    assert_eq!(got.step, 10);
    assert_eq!(got.tensors["w"].to_vec1::<f32>().unwrap(), vec![10.0]);
    assert_eq!(got.meta["step"], "10");
}

#[test]
fn bad_files_are_reported_with_their_path_and_skipped() {
    let data = tempfile::tempdir().unwrap();
    common::write_dataset(data.path(), 4, 32, 24);
    let img = |n: &str| data.path().join("images").join(format!("{n}.png"));
    let lab = |n: &str| data.path().join("labels").join(format!("{n}.png"));
    std::fs::write(img("f000"), b"\x89PNG\r\n\x1a\nnot really a png").unwrap();
    image::GrayImage::new(10, 10).save(lab("f001")).unwrap();
    image::GrayImage::from_pixel(32, 24, image::Luma([9]))
        .save(lab("f002"))
        .unwrap();
    let ds = Dataset::open(data.path(), &[]).unwrap();
    assert_eq!(ds.samples.len(), 4);
    let ok = ds.load_all(3, 255, true);
    assert_eq!(
        ok.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        ["f003"]
    );

    let e = segadapt::data::Dataset::open(data.path(), &[("nope".into(), "x".into())])
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("manifest.csv") && e.contains("no column nope"),
        "{e}"
    );
    let e = segadapt::data::load_label(&lab("f002"), (32, 24), 3, 255)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("f002.png") && e.contains("class index 9") && e.contains("out of range"),
        "{e}"
    );
    let e = segadapt::data::load_label(&lab("f001"), (32, 24), 3, 255)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("f001.png") && e.contains("10x10"), "{e}");
}

#[test]
fn label_map_maps_model_classes_onto_dataset_classes() {
    let dir = tempfile::tempdir().unwrap();
    let model: Vec<String> = ["road", "car", "truck"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let p = dir.path().join("map.toml");
    std::fs::write(
        &p,
        "classes = [\"void\", \"road\", \"vehicle\"]\nignore = [0]\n[model_to_eval]\nroad = \"road\"\ncar = \"vehicle\"\ntruck = \"vehicle\"\n",
    )
    .unwrap();
    let m = LabelMap::load(&p, &model).unwrap();
    assert_eq!(m.model_to_eval, vec![1, 2, 2]);
    assert_eq!(m.ignore, vec![0]);
    std::fs::write(
        &p,
        "classes = [\"road\"]\n[model_to_eval]\nroad = \"road\"\ncar = \"road\"\n",
    )
    .unwrap();
    let e = LabelMap::load(&p, &model).err().unwrap().to_string();
    assert!(e.contains("truck"), "{e}");
}

#[test]
fn manifest_filters_combine_and_take_ranges() {
    let data = tempfile::tempdir().unwrap();
    common::write_dataset(data.path(), 6, 16, 12);
    let f = |pairs: &[(&str, &str)]| -> Vec<String> {
        let v: Vec<(String, String)> = pairs
            .iter()
            .map(|(c, v)| (c.to_string(), v.to_string()))
            .collect();
        Dataset::open(data.path(), &v)
            .unwrap()
            .samples
            .into_iter()
            .map(|s| s.name)
            .collect()
    };
    assert_eq!(
        f(&[("name", "f001..f004")]),
        ["f001", "f002", "f003", "f004"]
    );
    assert_eq!(
        f(&[("name", "f001..f004"), ("role", "train")]),
        ["f002", "f004"]
    );
    assert_eq!(f(&[]).len(), 6);
}
