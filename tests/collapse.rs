//! A stream that turns into one class everywhere makes the student's predictions leave their
//! running band: `segadapt adapt` rolls back to a checkpoint from before the change, serves
//! every frame, and writes its adapted model.

mod common;

use std::path::Path;
use std::process::Command;

/// `n` frames of the fixtures' red ground only (with their noise), named after `from`.
fn write_one_class_frames(images: &Path, from: usize, n: usize, w: u32, h: u32) {
    for i in from..from + n {
        let mut img = image::RgbImage::new(w, h);
        for (x, y, p) in img.enumerate_pixels_mut() {
            let noise = ((x * 7 + y * 13 + i as u32 * 31) % 23) as u8;
            *p = image::Rgb([180 + noise, 40 + noise, 40 - noise]);
        }
        img.save(images.join(format!("f{i:03}.png"))).unwrap();
    }
}

#[test]
fn a_stream_that_collapses_to_one_class_is_rolled_back_and_served() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    common::write_dataset(&data, 40, 64, 48);
    let model = root.path().join("model");
    let random = root.path().join("random");
    common::write_model_dir(&random, &common::tiny_config(3), &data, (64, 48));
    // A model that tells the three regions apart: a random one predicts noise that no band
    // can watch.
    let o = Command::new(env!("CARGO_BIN_EXE_segadapt"))
        .args([
            "train", "--quiet", "--size", "64x48", "--iters", "200", "--batch", "2",
        ])
        .args([
            "--warmup",
            "10",
            "--lr",
            "1e-3",
            "--checkpoint-every",
            "1000",
            "--data",
        ])
        .arg(&data)
        .arg("--init")
        .arg(&random)
        .arg("--config")
        .arg(random.join("config.json"))
        .arg("--out")
        .arg(&model)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // No manifest: a folder of frames in name order, the 40 scenes then 20 of one class.
    std::fs::remove_file(data.join("manifest.csv")).unwrap();
    std::fs::remove_dir_all(data.join("labels")).unwrap();
    write_one_class_frames(&data.join("images"), 40, 20, 64, 48);
    // One set of weights (no training budgets: they would give the new stretch weights of
    // its own), a short warm-up, and checkpoints to go back to.
    let profile = root.path().join("tiny.toml");
    let text = common::tiny_profile_text()
        .replace("checkpoint_every = 100", "checkpoint_every = 5")
        .replace("budget.on = true", "budget.on = false")
        .replace(
            "guard.collapse = true",
            "guard.collapse = true\nguard.warmup = 10",
        );
    std::fs::write(&profile, text).unwrap();
    let out = root.path().join("out");
    let o = Command::new(env!("CARGO_BIN_EXE_segadapt"))
        .args(["adapt", "--json", "--steps-per-frame", "1", "--model"])
        .arg(&model)
        .arg("--source")
        .arg(format!("folder:{}", data.display()))
        .arg("--profile")
        .arg(&profile)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    let run: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let summary = &run["summary"];
    assert_eq!(summary["frames_served"], 60, "{summary}");
    let rollbacks = summary["rollbacks"].as_u64().unwrap();
    assert!(rollbacks >= 1, "no rollback: {summary}\n{log}");
    // Back to a checkpoint taken before the first one-class frame (frame 40) entered the ring.
    let first = log
        .split("rolling back to ")
        .nth(1)
        .unwrap_or_else(|| panic!("no rollback in the log:\n{log}"));
    let step: u64 = first
        .split("step-")
        .nth(1)
        .and_then(|s| s.get(..8))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no checkpoint step in {first}"));
    assert!(step <= 40, "rolled back to step {step}, after the change");
    assert!(out.join("model.safetensors").exists());
}
