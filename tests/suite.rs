//! The multi-target suite: the committed suite files parse, and a continual target over a tiny
//! model is scored after every condition of every round.

mod common;

use segadapt::adapt::Method;
use segadapt::suite::{markdown, run_target, Runner, SuiteFile, Target, TargetSpec};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[global_allocator]
static ALLOC: segadapt::budget::CountingAlloc = segadapt::budget::CountingAlloc;

#[test]
fn the_committed_suites_parse() {
    let dev = SuiteFile::load(Path::new("benches/suites/dev.toml")).unwrap();
    assert_eq!(dev.seeds, vec![0, 1, 2]);
    let names: Vec<&str> = dev.targets.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "dusk",
            "fog",
            "night",
            "snow",
            "motion-blur",
            "contrast",
            "continual"
        ]
    );
    let c = dev.targets.last().unwrap();
    assert_eq!((c.segments.len(), c.passes), (5, 3));
    assert_eq!(dev.target("night").unwrap().filter, ["corruption=night"]);
    let e = dev.target("rain").unwrap_err().to_string();
    assert!(e.contains("\"rain\"") && e.contains("dusk, fog"), "{e}");
    let long = SuiteFile::load(Path::new("benches/suites/long-drive.toml")).unwrap();
    assert_eq!(long.targets[0].passes, 10);
    let held = SuiteFile::load(Path::new("benches/suites/holdout.toml")).unwrap();
    let names: Vec<&str> = held.targets.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "clean",
            "noise",
            "defocus",
            "frost",
            "brightness",
            "spatter",
            "jpeg",
            "continual"
        ]
    );
    let c = held.targets.last().unwrap();
    assert_eq!((c.segments.len(), c.passes), (6, 3));
}

#[test]
fn a_continual_target_is_scored_after_each_condition_of_each_round() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    common::write_dataset(&data, 4, 64, 48);
    let cfg = common::tiny_config(3);
    let model = root.path().join("model");
    common::write_model_dir(&model, &cfg, &data, (64, 48));
    let mut profile =
        segadapt::config::Profile::load(Path::new("firmware-configs/x86-64-cpu.toml")).unwrap();
    (profile.input.width, profile.input.height) = (64, 48);
    (profile.train.crop_width, profile.train.crop_height) = (64, 48);
    let spec = TargetSpec {
        name: "two conditions".into(),
        data: data.clone(),
        filter: Vec::new(),
        segments: vec![vec!["role=train".into()], vec!["role=test".into()]],
        passes: 2,
        score: None,
    };
    let target = Target::open(&spec, 1.0, None, (&cfg.class_names(), 255)).unwrap();
    assert_eq!(target.frames, vec![2, 2]);
    assert_eq!(target.schedule().at, vec![(2, 0), (4, 1), (6, 0), (8, 1)]);
    let runner = Runner {
        model,
        profile,
        replay: None,
        steps_per_frame: 1,
        out: root.path().join("out"),
        stop: Arc::new(AtomicBool::new(false)),
    };
    let mut lines = Vec::new();
    let r = run_target(&runner, &target, &[Method::Plain], &[0], &mut |l| {
        lines.push(l.to_string())
    })
    .unwrap();
    assert!(r.continual);
    assert_eq!(lines.len(), 1, "one progress line per run");
    let base = r.cell("source-only").unwrap();
    let plain = r.cell("plain").unwrap();
    assert_eq!(
        plain.points[0].len(),
        4,
        "scored after each condition of each round"
    );
    // Source-only scores each condition's set; the rounds repeat them.
    assert_eq!(base.points[0][0], base.points[0][2]);
    assert_eq!(base.points[0][1], base.points[0][3]);
    // A continual target's score is the mean over its points.
    let mean = plain.points[0].iter().sum::<f64>() / 4.0;
    assert!((plain.scores[0] - mean).abs() < 1e-9);
    let table = markdown(&[r]);
    assert!(table.contains("| two conditions | plain |"), "{table}");
    assert!(table.contains("| plain |"), "{table}");
}
