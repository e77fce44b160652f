//! The page a run leaves: `adapt` and `replay` write `OUT/report.html` with its charts and its
//! frames inline. Where Debian's Chromium is installed (CI installs it), the page is loaded
//! headless and must come up with every chart and frame.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn tiny_profile(root: &Path) -> PathBuf {
    let p = root.join("tiny.toml");
    std::fs::write(&p, common::tiny_profile_text()).unwrap();
    p
}

fn count(hay: &str, needle: &str) -> usize {
    hay.matches(needle).count()
}

/// The page as headless Chromium sees it once loaded: its `<body ...>` tag, where the page's
/// check marks whether every image decoded and how many charts it holds. None without Chromium.
fn loaded_body(page: &Path) -> Option<String> {
    let bin = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })?;
    let o = Command::new(bin)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--dump-dom"])
        .arg(format!("file://{}", page.canonicalize().unwrap().display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dom = String::from_utf8_lossy(&o.stdout).into_owned();
    let start = dom.find("<body").expect("a body");
    Some(dom[start..start + dom[start..].find('>').unwrap() + 1].to_string())
}

fn attr(tag: &str, name: &str) -> usize {
    let key = format!("{name}=\"");
    let at = tag
        .find(&key)
        .unwrap_or_else(|| panic!("{name} missing in {tag}"))
        + key.len();
    tag[at..at + tag[at..].find('"').unwrap()].parse().unwrap()
}

/// `adapt` of `root`'s `model` over its `data` folder, twice through, a step per frame on the
/// tiny profile, scored on the same frames, into `out`, with `extra` arguments.
fn adapt_twice_through(root: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let (model, data) = (root.join("model"), root.join("data"));
    Command::new(env!("CARGO_BIN_EXE_segadapt"))
        .args(["--quiet", "adapt", "--model"])
        .arg(&model)
        .arg("--source")
        .arg(format!("folder:{}", data.display()))
        .args(["--loops", "2", "--steps-per-frame", "1", "--profile"])
        .arg(tiny_profile(root))
        .arg("--eval-data")
        .arg(&data)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn adapt_and_replay_write_a_page_that_loads_with_its_charts_and_frames() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    common::write_dataset(&data, 4, 64, 48);
    let model = root.path().join("model");
    common::write_model_dir(&model, &common::tiny_config(3), &data, (64, 48));
    let out = root.path().join("out");
    let o = adapt_twice_through(root.path(), &out, &[]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let page = out.join("report.html");
    assert!(
        stdout.contains(&format!("report: {}", page.display())),
        "{stdout}"
    );
    let html = std::fs::read_to_string(&page).unwrap();
    for section in [
        "Run",
        "Scores",
        "Memory plan",
        "Adaptation steps",
        "Predictions",
        "Latency",
        "Frames",
    ] {
        assert!(
            html.contains(&format!("<h2>{section}</h2>")),
            "{section} missing"
        );
    }
    for chart in [
        "IoU per class",
        "Loss terms",
        "Pseudo labels",
        "Predicted class shares",
        "Serving latency",
    ] {
        assert!(html.contains(chart), "chart {chart} missing");
    }
    // Four strip frames (served frames 1, 2, 4, 8), each source-only and adapted, and a legend.
    assert_eq!(count(&html, "src=\"data:image/png;base64,"), 8);
    assert!(html.contains("class=\"legend\""));
    for fetch in ["src=\"http", "href=\"http", "url(http"] {
        assert!(!html.contains(fetch), "nothing from the network: {fetch}");
    }
    if let Some(body) = loaded_body(&page) {
        assert!(body.contains("data-ready=\"ok\""), "{body}");
        assert_eq!(attr(&body, "data-charts"), 5, "{body}");
        assert_eq!(attr(&body, "data-frames"), 8, "{body}");
    } else {
        eprintln!("no Chromium here: the page was checked as text only");
    }

    let replay_out = root.path().join("replay");
    let o = Command::new(env!("CARGO_BIN_EXE_segadapt"))
        .args(["--quiet", "replay", "--model"])
        .arg(&model)
        .arg("--source")
        .arg(format!("folder:{}", data.display()))
        .arg("--out")
        .arg(&replay_out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let html = std::fs::read_to_string(replay_out.join("report.html")).unwrap();
    assert!(html.contains("Serving latency") && html.contains("Predicted class shares"));
    assert_eq!(
        count(&html, "src=\"data:image/png;base64,"),
        3,
        "frames 1, 2 and 4"
    );
    if let Some(body) = loaded_body(&replay_out.join("report.html")) {
        assert!(body.contains("data-ready=\"ok\""), "{body}");
        assert_eq!(attr(&body, "data-charts"), 2, "{body}");
    }
}

#[test]
fn eval_every_counts_training_steps_or_served_frames() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    common::write_dataset(&data, 4, 64, 48);
    let model = root.path().join("model");
    common::write_model_dir(&model, &common::tiny_config(3), &data, (64, 48));
    let curve = |every: &str| -> (Vec<u64>, String) {
        let out = root.path().join(format!("out-{every}"));
        let o = adapt_twice_through(root.path(), &out, &["--json", "--eval-every", every]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let x = v["curve"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[0].as_u64().unwrap())
            .collect();
        (x, v["curve_x"].as_str().unwrap().to_string())
    };
    // Eight frames, a step after each: scored after every third frame served before the next,
    // or after every third training step.
    assert_eq!(curve("3frames"), (vec![3, 6], "frames served".into()));
    assert_eq!(curve("3"), (vec![3, 6], "step".into()));
    assert_eq!(curve("3steps").0, vec![3, 6]);
    let bad = Command::new(env!("CARGO_BIN_EXE_segadapt"))
        .args([
            "adapt", "--model", "m", "--source", "folder:d", "--out", "o",
        ])
        .args(["--eval-every", "3laps"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("N, Nsteps or Nframes"));
}
