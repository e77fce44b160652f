//! `segadapt adapt` killed with SIGKILL mid-run leaves only whole checkpoints, and a restart
//! resumes from the newest one.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn steps(dir: &std::path::Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.strip_prefix("step-")?
                        .strip_suffix(".safetensors")?
                        .parse()
                        .ok()
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn killed_adapt_resumes_from_its_last_checkpoint() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    common::write_dataset(&data, 4, 64, 48);
    let model = root.path().join("model");
    common::write_model_dir(&model, &common::tiny_config(3), &data, (64, 48));
    let profile = root.path().join("tiny.toml");
    let text = std::fs::read_to_string("firmware-configs/x86-64-cpu.toml")
        .unwrap()
        .replace("width = 240", "width = 64")
        .replace("height = 180", "height = 48")
        .replace("crop_width = 240", "crop_width = 64")
        .replace("crop_height = 180", "crop_height = 48")
        .replace("checkpoint_every = 100", "checkpoint_every = 2");
    std::fs::write(&profile, text).unwrap();
    let out = root.path().join("out");
    let ckdir = out.join("checkpoints");
    let cmd = |loops: &str| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_segadapt"));
        c.args(["adapt", "--model"])
            .arg(&model)
            .arg("--source")
            .arg(format!("folder:{}", data.display()))
            .args(["--loops", loops, "--steps-per-frame", "1", "--profile"])
            .arg(&profile)
            .arg("--out")
            .arg(&out);
        c
    };
    let mut child = cmd("100000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while steps(&ckdir).last().copied().unwrap_or(0) < 6 {
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SIGKILL: no handler runs, whatever was being written stays as it was.
    child.kill().unwrap();
    child.wait().unwrap();
    let killed_at = *steps(&ckdir).last().unwrap();
    for s in steps(&ckdir) {
        let p = ckdir.join(format!("step-{s:08}.safetensors"));
        segadapt::checkpoint::load_checkpoint(&p, &candle_core::Device::Cpu)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    let o = cmd("1").output().unwrap();
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(log.contains("resuming adaptation from"), "{log}");
    assert!(
        *steps(&ckdir).last().unwrap() > killed_at,
        "{:?} after {killed_at}",
        steps(&ckdir)
    );
    assert!(out.join("model.safetensors").exists());
}
