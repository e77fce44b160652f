//! A user's own model and data: a SegFormer folder as transformers' `save_pretrained` writes
//! it (no source statistics) adapts with the built-in default profile from any directory;
//! `segadapt stats` works from unlabelled frames; Cityscapes' layout is read as it ships.

mod common;

use segadapt::stats::{Origin, SourceStats};
use std::path::Path;
use std::process::{Command, Output};

/// `config.json` as transformers 4.x writes it for a SegFormer, at the tiny test sizes.
const HF_CONFIG: &str = r#"{
  "_name_or_path": "nvidia/mit-b0",
  "architectures": ["SegformerForSemanticSegmentation"],
  "attention_probs_dropout_prob": 0.0,
  "classifier_dropout_prob": 0.1,
  "decoder_hidden_size": 16,
  "depths": [1, 2, 1, 1],
  "downsampling_rates": [1, 4, 8, 16],
  "drop_path_rate": 0.1,
  "hidden_act": "gelu",
  "hidden_dropout_prob": 0.0,
  "hidden_sizes": [8, 16, 24, 32],
  "id2label": {"0": "sky", "1": "road", "2": "car"},
  "image_size": 224,
  "initializer_range": 0.02,
  "label2id": {"car": 2, "road": 1, "sky": 0},
  "layer_norm_eps": 1e-06,
  "mlp_ratios": [4, 4, 4, 4],
  "model_type": "segformer",
  "num_attention_heads": [1, 2, 3, 4],
  "num_channels": 3,
  "num_encoder_blocks": 4,
  "patch_sizes": [7, 3, 3, 3],
  "reshape_last_stage": true,
  "semantic_loss_ignore_index": 255,
  "sr_ratios": [4, 2, 2, 1],
  "strides": [4, 2, 2, 2],
  "torch_dtype": "float32",
  "transformers_version": "4.46.3"
}"#;

const HF_PREPROCESSOR: &str = r#"{
  "do_normalize": true,
  "do_reduce_labels": false,
  "do_rescale": true,
  "do_resize": true,
  "image_mean": [0.485, 0.456, 0.406],
  "image_processor_type": "SegformerImageProcessor",
  "image_std": [0.229, 0.224, 0.225],
  "resample": 2,
  "rescale_factor": 0.00392156862745098,
  "size": {"height": 48, "width": 64}
}"#;

/// A model folder holding exactly what `save_pretrained` writes: config, weights, preprocessor.
fn write_hf_folder(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), HF_CONFIG).unwrap();
    std::fs::write(dir.join("preprocessor_config.json"), HF_PREPROCESSOR).unwrap();
    let cfg = segadapt::config::SegformerConfig::load(&dir.join("config.json")).unwrap();
    let tensors = segadapt::model::init_tensors(&cfg, &candle_core::Device::Cpu, 0).unwrap();
    let bytes = segadapt::model::weights::safetensors_bytes(&tensors, None).unwrap();
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
}

/// Runs the binary in `cwd` (not the repository: the built-in profiles must not need it).
fn segadapt(cwd: &Path, args: &[&str]) -> Output {
    let o = Command::new(env!("CARGO_BIN_EXE_segadapt"))
        .current_dir(cwd)
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "segadapt {args:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// `segadapt adapt` of model `m` in `cwd` on `src`, a step per frame, into `out`, with `extra`
/// arguments: its training steps and its log.
fn adapt(cwd: &Path, src: &str, out: &str, extra: &[&str]) -> (u64, String) {
    let mut args = vec![
        "adapt",
        "--model",
        "m",
        "--source",
        src,
        "--steps-per-frame",
        "1",
    ];
    args.extend(["--out", out, "--json"]);
    args.extend(extra);
    let o = segadapt(cwd, &args);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let steps = v["summary"]["train_steps"].as_u64().unwrap();
    (steps, String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn a_transformers_folder_without_statistics_adapts_with_the_default_profile() {
    let root = tempfile::tempdir().unwrap();
    let (model, data, out) = (
        root.path().join("m"),
        root.path().join("d"),
        root.path().join("o"),
    );
    write_hf_folder(&model);
    common::write_dataset(&data, 8, 96, 72);
    let src = format!("folder:{}", data.display());
    let (steps, log) = adapt(root.path(), &src, "o", &[]);
    assert!(steps > 0, "no training steps:\n{log}");
    // Served at the model's own size, each missing piece named with the command that makes it.
    assert!(
        log.contains("serving at 64x48 (from m/preprocessor_config.json)"),
        "{log}"
    );
    for line in [
        "source statistics: none in m; prototypes, class prior and instances built from the model's confident predictions on the stream's first 8 frames",
        "adapt.statistics = \"class\": no decode-head class statistics",
        "adapt.budget: no statistics of the source frames",
        "adapt.bida: source prototypes built from the model's own confident predictions",
    ] {
        assert!(log.contains(line), "missing {line:?} in:\n{log}");
    }
    assert!(
        log.contains("segadapt stats --model m --data SOURCE_FRAMES"),
        "{log}"
    );
    for f in ["model.safetensors", "config.json", "report.html"] {
        assert!(out.join(f).exists(), "{f} not written");
    }
    let stats = SourceStats::load(&out, &candle_core::Device::Cpu).unwrap();
    assert_eq!(stats.origin, Origin::Stream);
    assert!(stats.frames.is_none() && stats.norm.is_none());

    // The baselines need nothing from the source and run as well.
    for method in ["plain", "tent"] {
        let (steps, _) = adapt(
            root.path(),
            &src,
            &format!("o-{method}"),
            &["--method", method],
        );
        assert!(steps > 0, "{method}: no training steps");
    }
}

#[test]
fn statistics_from_unlabelled_frames_are_made_by_the_models_predictions_and_adapt_uses_them() {
    let root = tempfile::tempdir().unwrap();
    let (model, data) = (root.path().join("m"), root.path().join("d"));
    write_hf_folder(&model);
    common::write_dataset(&data, 6, 96, 72);
    std::fs::remove_dir_all(data.join("labels")).unwrap();
    let o = segadapt(root.path(), &["stats", "--model", "m", "--data", "d"]);
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        said.contains("0 labelled, 6 by the model's confident predictions; origin predictions"),
        "{said}"
    );
    let stats = SourceStats::load(&model, &candle_core::Device::Cpu).unwrap();
    assert_eq!(stats.origin, Origin::Predictions);
    // Every pixel the model labelled counts in the prior; the source frames' statistics are kept.
    let prior: f32 = stats.prior.sum_all().unwrap().to_scalar().unwrap();
    assert!((prior - 1.0).abs() < 1e-4, "prior sums to {prior}");
    assert!(stats.frames.is_some() && stats.norm.is_some());
    assert!(!stats.bank.as_ref().unwrap().labels.is_empty());

    let src = format!("folder:{}", data.display());
    let (steps, log) = adapt(root.path(), &src, "o", &[]);
    assert!(steps > 0);
    assert!(!log.contains("source statistics: none"), "{log}");
    assert!(!log.contains("adapt.statistics = \"class\""), "{log}");

    // Any source spec: the same frames as a drive, labels used where present.
    common::write_dataset(&root.path().join("l"), 6, 96, 72);
    let o = segadapt(
        root.path(),
        &["stats", "--model", "m", "--source", "folder:l"],
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("6 labelled, 0 by the model's"));
    let stats = SourceStats::load(&model, &candle_core::Device::Cpu).unwrap();
    assert_eq!(stats.origin, Origin::Labels);
}

/// The frames of `data` (folder layout, classes sky, road, car) copied into Cityscapes' layout
/// under `root`: images as `leftImg8bit/val/testcity/*_leftImg8bit.png`, labels as label ids
/// in `gtFine`.
fn write_cityscapes_copy(data: &Path, root: &Path) {
    let (img, gt) = (
        root.join("leftImg8bit/val/testcity"),
        root.join("gtFine/val/testcity"),
    );
    std::fs::create_dir_all(&img).unwrap();
    std::fs::create_dir_all(&gt).unwrap();
    // sky 23, road 7, car 26; unlabelled 0.
    let label_id = |v: u8| [23u8, 7, 26].get(v as usize).copied().unwrap_or(0);
    for e in std::fs::read_dir(data.join("images")).unwrap() {
        let p = e.unwrap().path();
        let stem = p.file_stem().unwrap().to_str().unwrap().to_string();
        std::fs::copy(&p, img.join(format!("{stem}_leftImg8bit.png"))).unwrap();
        let mut lab = image::open(data.join("labels").join(format!("{stem}.png")))
            .unwrap()
            .to_luma8();
        lab.pixels_mut().for_each(|px| px.0[0] = label_id(px.0[0]));
        lab.save(gt.join(format!("{stem}_gtFine_labelIds.png")))
            .unwrap();
    }
}

#[test]
fn a_cityscapes_layout_copy_scores_as_the_folder_layout() {
    let root = tempfile::tempdir().unwrap();
    let (model, data, cs) = (
        root.path().join("m"),
        root.path().join("d"),
        root.path().join("cs"),
    );
    write_hf_folder(&model);
    common::write_dataset(&data, 4, 96, 72);
    write_cityscapes_copy(&data, &cs);
    let miou = |args: &[&str]| -> f64 {
        let o = segadapt(root.path(), args);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["frames"], 4);
        v["miou"].as_f64().unwrap()
    };
    let folder = miou(&["eval", "--model", "m", "--data", "d", "--json"]);
    // No label map: the model's class names pair with Cityscapes' own.
    let city = miou(&["eval", "--model", "m", "--data", "cs", "--json"]);
    assert!(
        (folder - city).abs() < 1e-9,
        "folder {folder} against Cityscapes layout {city}"
    );
    let filtered = miou(&[
        "eval",
        "--model",
        "m",
        "--data",
        "cs",
        "--where",
        "split=val",
        "--json",
    ]);
    assert_eq!(filtered, city);

    // Train ids are read as the model's classes by name wherever labelled data is read.
    let ds = segadapt::data::Dataset::open(&cs, &[("city".into(), "testcity".into())]).unwrap();
    let names: Vec<String> = ["sky", "road", "car"].map(String::from).to_vec();
    let ex = ds.load_for(&names, 255, true).unwrap();
    let folder = segadapt::data::Dataset::open(&data, &[])
        .unwrap()
        .load_all(3, 255, true);
    assert_eq!(ex.len(), 4);
    for (a, b) in ex.iter().zip(&folder) {
        assert_eq!(a.name, b.name);
        assert_eq!(a.label, b.label, "{}", a.name);
    }
    // A model class Cityscapes does not have is named.
    let e = ds
        .load_for(&["sky".into(), "lamp".into()], 255, true)
        .err()
        .unwrap();
    assert!(e.to_string().contains("\"lamp\""), "{e}");
    let e = segadapt::data::Dataset::open(&cs, &[("role".into(), "x".into())])
        .err()
        .unwrap();
    assert!(e.to_string().contains("name, split, city, dir"), "{e}");
}

#[test]
fn the_profile_or_input_flag_overrides_the_models_size_with_a_warning_when_far_off() {
    let model = Some(segadapt::config::Size {
        width: 1024,
        height: 512,
    });
    let base = segadapt::config::Profile::resolve("x86-64-cpu").unwrap();
    let mut p = base.clone();
    let (from, warn) = p.fit_input(None, false, model).unwrap();
    assert_eq!(from, segadapt::config::SizeFrom::Model);
    assert_eq!((p.input.width, p.input.height), (1024, 512));
    // The crop keeps its share of the input (all of it here).
    assert_eq!((p.train.crop_width, p.train.crop_height), (1024, 512));
    assert!(warn.is_none());
    let mut p = base.clone();
    let (from, warn) = p.fit_input(None, true, model).unwrap();
    assert_eq!(from, segadapt::config::SizeFrom::Profile);
    assert_eq!((p.input.width, p.input.height), (240, 180));
    assert!(warn.unwrap().contains("more than 2x off the 1024x512"));
    let mut p = base.clone();
    let (from, warn) = p.fit_input(Some((640, 320)), true, model).unwrap();
    assert_eq!(from, segadapt::config::SizeFrom::Flag);
    assert_eq!((p.input.width, p.input.height), (640, 320));
    assert!(warn.is_none(), "within 2x");
    let mut p = base;
    assert_eq!(
        p.fit_input(None, false, None).unwrap().0,
        segadapt::config::SizeFrom::Default
    );
    assert_eq!((p.input.width, p.input.height), (240, 180));
}
