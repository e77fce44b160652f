//! `segadapt adapt` killed with SIGKILL at a random step leaves only whole checkpoints, and
//! the same command run again resumes the replayed drive where the newest checkpoint left it:
//! it ends with the step count and the weights of a run that was never interrupted.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn steps(dir: &Path) -> Vec<u64> {
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

fn weights(out: &Path) -> segadapt::model::TensorMap {
    candle_core::safetensors::load(out.join("model.safetensors"), &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

#[test]
fn a_killed_replay_resumes_where_the_drive_was_and_ends_as_an_uninterrupted_one() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    common::write_dataset(&data, 4, 64, 48);
    let model = root.path().join("model");
    common::write_model_dir(&model, &common::tiny_config(3), &data, (64, 48));
    let profile = root.path().join("tiny.toml");
    let text =
        common::tiny_profile_text().replace("checkpoint_every = 100", "checkpoint_every = 2");
    std::fs::write(&profile, text).unwrap();
    let cmd = |out: &Path| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_segadapt"));
        c.args(["adapt", "--model"])
            .arg(&model)
            .arg("--source")
            .arg(format!("folder:{}", data.display()))
            .args(["--loops", "60", "--steps-per-frame", "1", "--profile"])
            .arg(&profile)
            .arg("--out")
            .arg(out);
        c
    };
    let whole = root.path().join("whole");
    let o = cmd(&whole).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let last = *steps(&whole.join("checkpoints")).last().unwrap();

    // A step to kill at, different from run to run; printed so a failure can be replayed.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    let kill_at = 6 + nanos % (last / 2);
    eprintln!("killing after the checkpoint of step {kill_at} of {last}");
    let out = root.path().join("out");
    let ckdir = out.join("checkpoints");
    let mut child = cmd(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while steps(&ckdir).last().copied().unwrap_or(0) < kill_at {
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint");
        std::thread::sleep(Duration::from_millis(2));
    }
    // SIGKILL: no handler runs, whatever was being written stays as it was.
    child.kill().unwrap();
    child.wait().unwrap();
    let killed_at = *steps(&ckdir).last().unwrap();
    assert!(
        killed_at < last,
        "killed before the end ({killed_at} of {last})"
    );
    for s in steps(&ckdir) {
        let p = ckdir.join(format!("step-{s:08}.safetensors"));
        segadapt::checkpoint::load_checkpoint(&p, &candle_core::Device::Cpu)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    let o = cmd(&out).output().unwrap();
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(log.contains("resuming adaptation from"), "{log}");
    assert!(log.contains("resuming the drive after frame"), "{log}");
    assert_eq!(*steps(&ckdir).last().unwrap(), last, "the same step count");
    let (a, b) = (weights(&whole), weights(&out));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        let d = common::max_diff(t, &b[name]);
        assert_eq!(d, 0.0, "{name} differs from the uninterrupted run's by {d}");
    }
}
