//! The ablation: each method adapts the same model on the same looped target stream over
//! several seeds; the table gives mIoU mean and spread, per-class IoU, step time and memory.

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::runtime::session::{Report, Session};
use crate::source::{Looped, SourceOptions};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub struct Ablation {
    pub model: PathBuf,
    pub profile: crate::config::Profile,
    /// A labelled folder; `filter` picks the target frames, streamed and scored (labels only
    /// score).
    pub data: PathBuf,
    pub filter: Vec<(String, String)>,
    /// Labelled source frames for the methods with source replay.
    pub replay: Option<Arc<Vec<crate::data::Example>>>,
    pub fps: f64,
    pub loops: u32,
    /// Training steps after each served frame.
    pub steps_per_frame: u32,
    pub methods: Vec<crate::adapt::Method>,
    pub seeds: Vec<u64>,
    pub out: PathBuf,
}

/// One method's rows over the seeds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub method: String,
    pub miou: Vec<f64>,
    /// mIoU after each pass of each seed, in order.
    pub curves: Vec<Vec<f64>>,
    /// Per-class IoU averaged over seeds (None where the class never appears).
    pub per_class: Vec<(String, Option<f64>)>,
    pub step_ms: f64,
    pub peak_heap_mb: f64,
    /// The switched-on components, in pipeline order.
    pub components: Vec<String>,
    /// Each loss term's mean absolute value per step, averaged over seeds.
    pub loss_terms: Vec<(String, f64)>,
}

impl Row {
    pub fn mean(&self) -> f64 {
        self.miou.iter().sum::<f64>() / self.miou.len().max(1) as f64
    }

    /// Half the range over seeds.
    pub fn spread(&self) -> f64 {
        let max = self.miou.iter().cloned().fold(f64::MIN, f64::max);
        let min = self.miou.iter().cloned().fold(f64::MAX, f64::min);
        (max - min) / 2.0
    }
}

fn row(method: &str, reports: &[Report]) -> Row {
    let scores: Vec<&crate::metrics::Scores> = reports
        .iter()
        .filter_map(|r| {
            if method == "source-only" {
                r.source_only.as_ref()
            } else {
                r.adapted.as_ref()
            }
        })
        .collect();
    let per_class = scores
        .first()
        .map(|s| {
            s.per_class
                .iter()
                .enumerate()
                .map(|(k, (name, _))| {
                    let v: Vec<f64> = scores.iter().filter_map(|s| s.per_class[k].1).collect();
                    let m = (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
                    (name.clone(), m)
                })
                .collect()
        })
        .unwrap_or_default();
    let med = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    Row {
        method: method.to_string(),
        miou: scores.iter().map(|s| s.miou).collect(),
        curves: reports
            .iter()
            .map(|r| r.points.iter().map(|p| p.scores.miou).collect())
            .collect(),
        per_class,
        step_ms: med(reports.iter().map(|r| r.summary.step_ms_p50).collect()),
        peak_heap_mb: reports.iter().map(|r| r.peak_heap_mb).fold(0.0, f64::max),
        components: reports
            .first()
            .map(|r| r.components.clone())
            .unwrap_or_default(),
        loss_terms: mean_terms(reports),
    }
}

/// Each term's mean over the runs that have it, in the first run's order.
fn mean_terms(reports: &[Report]) -> Vec<(String, f64)> {
    let Some(first) = reports.first() else {
        return Vec::new();
    };
    first
        .summary
        .loss_terms
        .iter()
        .map(|(name, _)| {
            let v: Vec<f64> = reports
                .iter()
                .filter_map(|r| r.summary.loss_terms.iter().find(|(n, _)| n == name))
                .map(|(_, v)| *v)
                .collect();
            (name.clone(), v.iter().sum::<f64>() / v.len().max(1) as f64)
        })
        .collect()
}

impl Ablation {
    /// How many runs `run` makes: one per method and seed, one for source-only.
    pub fn runs(&self) -> usize {
        self.methods
            .iter()
            .map(|&m| match m {
                crate::adapt::Method::SourceOnly => 1,
                _ => self.seeds.len(),
            })
            .sum()
    }

    /// Runs every method and seed; `progress` hears of each run as it ends.
    pub fn run(&self, stop: Arc<AtomicBool>, progress: &mut dyn FnMut(&str)) -> Result<Vec<Row>> {
        let cfg = crate::config::SegformerConfig::load(&self.model.join("config.json"))?;
        let (classes, ignore) = (cfg.num_labels(), cfg.ignore_label());
        let ds = Dataset::open(&self.data, &self.filter)?;
        let frames = ds.samples.len() as u64;
        let eval = Arc::new(ds.load_for(&cfg.class_names(), ignore, true)?);
        if eval.is_empty() {
            return Err(Error::data(
                &self.data,
                "no labelled target frames to score",
            ));
        }
        let opts = SourceOptions {
            filter: self.filter.clone(),
            fps: self.fps,
            num_classes: classes,
            ignore,
            camera_size: None,
            limit: None,
        };
        // Scored after every pass.
        let schedule = crate::runtime::session::Schedule {
            sets: vec![eval.clone()],
            at: (1..=self.loops.max(1) as u64)
                .map(|k| (k * frames, 0))
                .collect(),
        };
        let spec = format!("folder:{}", self.data.display());
        let mut before = None;
        let mut rows = Vec::new();
        for method in &self.methods {
            let mut reports = Vec::new();
            for &seed in &self.seeds {
                let out = self.out.join(format!("{method}-seed{seed}"));
                // Every run starts from the source model, not from an earlier run's state.
                if out.exists() {
                    std::fs::remove_dir_all(&out).map_err(|e| Error::io(&out, e))?;
                }
                let s = Session {
                    model: self.model.clone(),
                    profile: self.profile.clone(),
                    method: *method,
                    out,
                    eval: Some(eval.clone()),
                    eval_every: Default::default(),
                    steps_per_frame: Some(self.steps_per_frame),
                    seed,
                    realtime: false,
                    adapt: None,
                    replay: self.replay.clone(),
                    before: before.clone(),
                    schedule: schedule.clone(),
                    metrics: None,
                };
                let source = Looped::open(&spec, &opts, self.loops)
                    .map_err(|e| Error::Invalid(e.to_string()))?;
                let r = s.run(Box::new(source), stop.clone())?;
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(Error::Invalid(format!(
                        "stopped during {method} seed {seed}; the table would be incomplete"
                    )));
                }
                progress(&format!(
                    "{method} seed {seed}: mIoU {:.2} -> {:.2}",
                    r.source_only.as_ref().map_or(f64::NAN, |s| s.miou),
                    r.adapted.as_ref().map_or(f64::NAN, |s| s.miou)
                ));
                before = r.source_only.clone();
                reports.push(r);
                if *method == crate::adapt::Method::SourceOnly {
                    // Nothing random happens without training: one run is every seed's.
                    break;
                }
            }
            let mut r = row(method.name(), &reports);
            if *method == crate::adapt::Method::SourceOnly {
                r.miou = vec![r.miou[0]; self.seeds.len()];
            }
            rows.push(r);
        }
        Ok(rows)
    }
}

/// The table in Markdown: one row per method, per-class IoU after the summary columns.
pub fn markdown(rows: &[Row]) -> String {
    let classes: Vec<&str> = rows
        .first()
        .map(|r| r.per_class.iter().map(|(n, _)| n.as_str()).collect())
        .unwrap_or_default();
    let base = rows
        .iter()
        .find(|r| r.method == "source-only")
        .map(|r| r.mean());
    let mut s = String::from("| method | mIoU mean ± half-range | vs source-only | per seed | after each pass (first seed) | ms/step | heap peak MB |");
    for c in &classes {
        s += &format!(" {c} |");
    }
    s += "\n|---|---|---|---|---|---|---|";
    s += &"---|".repeat(classes.len());
    s += "\n";
    for r in rows {
        let delta = base.map_or(String::from("-"), |b| format!("{:+.2}", r.mean() - b));
        let seeds: Vec<String> = r.miou.iter().map(|m| format!("{m:.2}")).collect();
        let curve: Vec<String> = r
            .curves
            .first()
            .map(|c| c.iter().map(|m| format!("{m:.2}")).collect())
            .unwrap_or_default();
        s += &format!(
            "| {} | {:.2} ± {:.2} | {} | {} | {} | {:.0} | {:.0} |",
            r.method,
            r.mean(),
            r.spread(),
            delta,
            seeds.join(" / "),
            if curve.is_empty() {
                "-".into()
            } else {
                curve.join(" → ")
            },
            r.step_ms,
            r.peak_heap_mb
        );
        for (_, v) in &r.per_class {
            s += &v.map_or(" - |".into(), |v| format!(" {v:.1} |"));
        }
        s += "\n";
    }
    s += "\n| method | components (pipeline order) | loss terms: mean |value| per step |\n|---|---|---|\n";
    for r in rows {
        let terms: Vec<String> = r
            .loss_terms
            .iter()
            .map(|(n, v)| format!("{n} {v:.4}"))
            .collect();
        s += &format!(
            "| {} | {} | {} |\n",
            r.method,
            if r.components.is_empty() {
                "-".into()
            } else {
                r.components.join(", ")
            },
            if terms.is_empty() {
                "-".into()
            } else {
                terms.join(", ")
            }
        );
    }
    s
}
