//! Device profiles: each committed one parses, plans and adapts (on CPU, scaled down where its
//! input is larger than 512x256) with the measured heap peak under its budget; bad profiles and
//! budgets too small are refused with a message naming what is wrong.

mod common;

use segadapt::config::Profile;
use segadapt::runtime::session::Session;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[global_allocator]
static ALLOC: segadapt::budget::CountingAlloc = segadapt::budget::CountingAlloc;

const PROFILES: &[&str] = &[
    "x86-64-cpu",
    "jetson-orin-nano-4gb",
    "jetson-orin-nano-8gb",
    "jetson-xavier-nx-8gb",
    "jetson-orin-nx-16gb",
    "jetson-agx-xavier-32gb",
    "jetson-agx-orin-32gb",
    "jetson-agx-orin-64gb",
];

fn load(name: &str) -> Profile {
    Profile::load(&Path::new("firmware-configs").join(format!("{name}.toml"))).unwrap()
}

/// A B0 with 11 classes (the size the budgets are planned for), random weights.
fn b0_dir(root: &Path) -> std::path::PathBuf {
    let data = root.join("data");
    common::write_dataset(&data, 3, 96, 64);
    let names: Vec<String> = (0..11).map(|i| format!("c{i}")).collect();
    let cfg = segadapt::config::SegformerConfig::preset("b0", &names, 255).unwrap();
    let model = root.join("model");
    common::write_model_dir(&model, &cfg, &data, (96, 64));
    model
}

fn session(model: &Path, profile: Profile, out: &Path) -> Session {
    Session {
        model: model.to_path_buf(),
        profile,
        method: segadapt::adapt::Method::Profile,
        out: out.to_path_buf(),
        eval: None,
        eval_every: Default::default(),
        steps_per_frame: Some(1),
        seed: 0,
        realtime: false,
        adapt: None,
        replay: None,
        before: None,
        schedule: Default::default(),
        metrics: None,
    }
}

// One test, so no other test's allocations share the counting allocator's peak.
#[test]
fn every_profile_adapts_under_its_budget_and_small_budgets_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let model = b0_dir(root.path());
    let frames = root.path().join("data");
    for name in PROFILES {
        let mut p = load(name);
        assert_eq!(p.device.name, *name);
        p.device.device = "cpu".into();
        let (w, h) = (p.input.width, p.input.height);
        if w * h > 512 * 256 {
            p.input.width = 512;
            p.input.height = 256;
        }
        p.train.crop_width = p.train.crop_width.min(p.input.width).min(512);
        p.train.crop_height = p.train.crop_height.min(p.input.height).min(256);
        p.train.batch = p.train.batch.min(2);
        if p.train.crop_width * p.train.crop_height * p.train.batch > 512 * 256 {
            p.train.batch = 1;
        }
        let out = root.path().join(format!("out-{name}"));
        let source =
            segadapt::source::open(&format!("folder:{}", frames.display()), &Default::default())
                .unwrap();
        let r = session(&model, p.clone(), &out)
            .run(source, Arc::new(AtomicBool::new(false)))
            .unwrap();
        assert!(r.summary.train_steps >= 2, "{name}: {:?}", r.summary);
        assert!(
            r.plan.problems().is_empty(),
            "{name}: {:?}",
            r.plan.problems()
        );
        let budget_mb = p.memory.total_mb;
        assert!(
            r.peak_heap_mb < budget_mb,
            "{name}: heap peak {:.0} MB over the budget {budget_mb} MB",
            r.peak_heap_mb
        );
        eprintln!(
            "{name}: heap peak {:.0} MB of {budget_mb} MB (plan {:.0} MB)",
            r.peak_heap_mb,
            r.plan.total as f64 / (1 << 20) as f64
        );
    }

    // Models alone need ~42 MB for B0: a 10 MB share is refused before anything runs.
    let mut p = load("x86-64-cpu");
    p.memory.models_mb = 10.0;
    let source =
        segadapt::source::open(&format!("folder:{}", frames.display()), &Default::default())
            .unwrap();
    let err = session(&model, p, &root.path().join("out-small"))
        .run(source, Arc::new(AtomicBool::new(false)))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("models needs") && err.contains("over by"),
        "{err}"
    );
    assert!(!root.path().join("out-small/model.safetensors").exists());
}

/// Where the profile's GPU is not there (no CUDA in the build, or no device), `adapt` stops at
/// start-up with one line naming the device, before it writes anything.
#[test]
fn a_cuda_profile_without_its_gpu_fails_in_one_line_naming_the_device() {
    if cfg!(feature = "cuda") && candle_core::Device::new_cuda(0).is_ok() {
        return; // a GPU is here: the profile's device opens
    }
    let root = tempfile::tempdir().unwrap();
    let model = b0_dir(root.path());
    let frames = root.path().join("data");
    let p = load("jetson-orin-nano-8gb");
    assert_eq!(p.device.device, "cuda:0");
    let source =
        segadapt::source::open(&format!("folder:{}", frames.display()), &Default::default())
            .unwrap();
    let out = root.path().join("out");
    let err = session(&model, p, &out)
        .run(source, Arc::new(AtomicBool::new(false)))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("config device.device = cuda:0: "), "{err}");
    assert!(err.contains("--device cpu"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!out.join("checkpoints").exists());
}

#[test]
fn bad_profiles_are_refused_naming_key_value_and_what_is_allowed() {
    let good = std::fs::read_to_string("firmware-configs/jetson-xavier-nx-8gb.toml").unwrap();
    for (edit, needle) in [
        (("[device]", "[device]\ncolour = 1"), "colour"),
        (("batch = 1", "batch = 0"), "train.batch = 0: 1 to 64"),
        (
            ("dtype = \"f32\"", "dtype = \"bf16\""),
            "bf16 needs CUDA compute capability 80",
        ),
        (
            ("total_mb = 1400", "total_mb = 100"),
            "memory.total_mb = 100",
        ),
        (
            ("ias.on = true", "ias.on = true\nias.alpha = 2.0"),
            "adapt.ias.alpha = 2",
        ),
        (
            ("device = \"cuda:0\"", "device = \"tpu\""),
            "\"cpu\" or \"cuda:N\"",
        ),
        (
            ("[adapt]", "[adapt]\nsepico.variant = \"mean\""),
            "unknown variant `mean`, expected `dist` or `proto`",
        ),
    ] {
        let text = good.replacen(edit.0, edit.1, 1);
        assert_ne!(text, good, "{edit:?} changed nothing");
        let err = Profile::parse(&text).unwrap_err().to_string();
        assert!(err.contains(needle), "{edit:?}: {err}");
    }
    assert!(Profile::parse(&good).is_ok());
}

#[test]
fn built_in_profiles_are_the_committed_files_and_resolve_by_name() {
    assert_eq!(segadapt::config::built_in_names(), PROFILES);
    for name in PROFILES {
        let built_in = Profile::resolve(name).unwrap();
        let file = load(name);
        assert_eq!(
            toml::to_string(&built_in).unwrap(),
            toml::to_string(&file).unwrap(),
            "{name}"
        );
    }
    let by_path = Profile::resolve("firmware-configs/x86-64-cpu.toml").unwrap();
    assert_eq!(by_path.device.name, "x86-64-cpu");
    let err = Profile::resolve("no-such-board").unwrap_err().to_string();
    assert!(
        err.contains("no-such-board") && err.contains("jetson-orin-nano-8gb"),
        "{err}"
    );
}
