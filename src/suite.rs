//! The multi-target suite: methods x seeds x targets from a TOML file, one table. A target is a
//! labelled folder streamed as a drive: one condition over several passes (scored after each
//! pass), or several conditions in sequence over several rounds (CoTTA's continual protocol,
//! scored after each condition on that condition's frames). Target labels only score.
//!
//! ```toml
//! methods = ["tent", "plain", "profile"]
//! seeds = [0, 1, 2]
//!
//! [[target]]
//! name = "night"
//! data = "../shared/data/camvid-c"
//! where = ["corruption=night"]
//!
//! [[target]]
//! name = "continual"
//! data = "../shared/data/camvid-c"
//! segments = [["corruption=fog"], ["corruption=night"]]
//! passes = 3
//! ```

use crate::adapt::Method;
use crate::data::{Dataset, Example};
use crate::error::{Error, Result};
use crate::metrics::Scores;
use crate::runtime::session::{Report, Schedule, Session};
use crate::source::{Looped, SourceOptions};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuiteFile {
    /// Method names (`segadapt ablate`'s); `source-only` is always scored.
    pub methods: Vec<String>,
    pub seeds: Vec<u64>,
    /// Frame rate the folders are replayed at.
    #[serde(default = "one")]
    pub fps: f64,
    #[serde(rename = "target")]
    pub targets: Vec<TargetSpec>,
}

fn one() -> f64 {
    1.0
}

fn one_pass() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    pub name: String,
    /// A labelled dataset folder.
    pub data: PathBuf,
    /// `COL=VAL` manifest filters of a one-condition target.
    #[serde(default, rename = "where")]
    pub filter: Vec<String>,
    /// Conditions streamed one after the other (each a filter list), each scored on its own
    /// frames once it has been streamed.
    #[serde(default)]
    pub segments: Vec<Vec<String>>,
    /// Passes over the stream (rounds of a continual one).
    #[serde(default = "one_pass")]
    pub passes: u32,
    /// A separate scoring set (one-condition targets); the streamed frames otherwise.
    pub score: Option<ScoreSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreSpec {
    pub data: PathBuf,
    #[serde(default, rename = "where")]
    pub filter: Vec<String>,
}

impl SuiteFile {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let s: SuiteFile = toml::from_str(&text).map_err(|e| Error::data(path, e.to_string()))?;
        if s.targets.is_empty() || s.seeds.is_empty() {
            return Err(Error::data(path, "a suite needs targets and seeds"));
        }
        for m in &s.methods {
            m.parse::<Method>().map_err(|e| Error::data(path, e))?;
        }
        Ok(s)
    }

    /// The target named `name`.
    pub fn target(&self, name: &str) -> Result<&TargetSpec> {
        self.targets.iter().find(|t| t.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.targets.iter().map(|t| t.name.as_str()).collect();
            Error::Invalid(format!(
                "no target {name:?} (targets: {})",
                names.join(", ")
            ))
        })
    }
}

fn parse_filters(v: &[String]) -> Result<Vec<(String, String)>> {
    v.iter()
        .map(|f| {
            f.split_once('=')
                .map(|(c, v)| (c.to_string(), v.to_string()))
                .ok_or_else(|| Error::Invalid(format!("filter {f:?}: expected COL=VAL")))
        })
        .collect()
}

/// A target ready to stream: its segments, how many frames each has, and its scoring sets.
pub struct Target {
    pub name: String,
    pub segments: Vec<(String, SourceOptions)>,
    pub frames: Vec<u64>,
    pub passes: u32,
    /// One set per segment, or one set scored at every point.
    pub sets: Vec<Arc<Vec<Example>>>,
}

impl Target {
    /// Opens the target's folders. `limit` keeps the first N frames of each segment (and of its
    /// scoring set); `classes`/`ignore` check the labels.
    pub fn open(
        spec: &TargetSpec,
        fps: f64,
        limit: Option<usize>,
        (classes, ignore): (&[String], u8),
    ) -> Result<Self> {
        let filters: Vec<Vec<String>> = match spec.segments.is_empty() {
            true => vec![spec.filter.clone()],
            false => spec.segments.clone(),
        };
        let load = |data: &Path, f: &[(String, String)]| -> Result<(u64, Arc<Vec<Example>>)> {
            let mut ds = Dataset::open(data, f)?;
            ds.samples.truncate(limit.unwrap_or(usize::MAX));
            let n = ds.samples.len() as u64;
            let ex = ds.load_for(classes, ignore, true)?;
            if ex.is_empty() {
                return Err(Error::data(data, "no labelled frames to score"));
            }
            Ok((n, Arc::new(ex)))
        };
        let (mut segments, mut frames, mut sets) = (Vec::new(), Vec::new(), Vec::new());
        for f in &filters {
            let filter = parse_filters(f)?;
            let (n, set) = load(&spec.data, &filter)?;
            let opts = SourceOptions {
                filter,
                fps,
                num_classes: classes.len(),
                ignore,
                camera_size: None,
                limit,
            };
            segments.push((format!("folder:{}", spec.data.display()), opts));
            frames.push(n);
            sets.push(set);
        }
        if let Some(sc) = &spec.score {
            sets = vec![load(&sc.data, &parse_filters(&sc.filter)?)?.1];
        }
        Ok(Self {
            name: spec.name.clone(),
            segments,
            frames,
            passes: spec.passes.max(1),
            sets,
        })
    }

    /// A scoring point after each segment of each pass.
    pub fn schedule(&self) -> Schedule {
        let mut at = Vec::new();
        let mut done = 0;
        for _ in 0..self.passes {
            for (i, n) in self.frames.iter().enumerate() {
                done += n;
                at.push((done, if self.sets.len() == 1 { 0 } else { i }));
            }
        }
        Schedule {
            sets: self.sets.clone(),
            at,
        }
    }

    pub fn source(&self) -> Result<Looped> {
        Looped::playlist(self.segments.clone(), self.passes)
            .map_err(|e| Error::Invalid(e.to_string()))
    }
}

/// What each run of a suite shares.
pub struct Runner {
    pub model: PathBuf,
    pub profile: crate::config::Profile,
    pub replay: Option<Arc<Vec<Example>>>,
    pub steps_per_frame: u32,
    pub out: PathBuf,
    pub stop: Arc<AtomicBool>,
}

impl Runner {
    /// One method and seed on a target, from the source model.
    pub fn run(&self, target: &Target, method: Method, seed: u64) -> Result<Report> {
        let out = self
            .out
            .join(format!("{}-{method}-seed{seed}", slug(&target.name)));
        // Every run starts from the source model, not from an earlier run's state.
        if out.exists() {
            std::fs::remove_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        }
        let s = Session {
            model: self.model.clone(),
            profile: self.profile.clone(),
            method,
            out,
            eval: None,
            eval_every: Default::default(),
            steps_per_frame: Some(self.steps_per_frame),
            seed,
            realtime: false,
            adapt: None,
            replay: self.replay.clone(),
            before: None,
            schedule: target.schedule(),
            metrics: None,
        };
        let r = s.run(Box::new(target.source()?), self.stop.clone())?;
        if self.stop.load(Ordering::Relaxed) {
            return Err(Error::Invalid(format!(
                "stopped during {} {method} seed {seed}; the table would be incomplete",
                target.name
            )));
        }
        Ok(r)
    }
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

/// One score with its per-class IoU (None: the class is absent from the set).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    pub miou: f64,
    pub per_class: Vec<Option<f64>>,
}

impl From<&Scores> for Point {
    fn from(s: &Scores) -> Self {
        Self {
            miou: s.miou,
            per_class: s.per_class.iter().map(|(_, v)| *v).collect(),
        }
    }
}

/// A run's points folded into the target's score: the last point of a one-condition target,
/// the mean over every point of a continual one (CoTTA's protocol).
fn fold(points: &[Point], continual: bool) -> Point {
    let pts: &[Point] = match continual {
        true => points,
        false => points.last().map(std::slice::from_ref).unwrap_or(&[]),
    };
    let n = pts.len().max(1) as f64;
    let classes = pts.first().map_or(0, |p| p.per_class.len());
    let per_class = (0..classes)
        .map(|k| {
            let v: Vec<f64> = pts.iter().filter_map(|p| p.per_class[k]).collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        })
        .collect();
    Point {
        miou: pts.iter().map(|p| p.miou).sum::<f64>() / n,
        per_class,
    }
}

/// One method on one target over the seeds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cell {
    pub method: String,
    /// The target's score per seed.
    pub scores: Vec<f64>,
    /// Every scoring point's mIoU, per seed.
    pub points: Vec<Vec<f64>>,
    /// Per-class IoU of the folded score, averaged over seeds.
    pub per_class: Vec<Option<f64>>,
}

impl Cell {
    pub fn mean(&self) -> f64 {
        self.scores.iter().sum::<f64>() / self.scores.len().max(1) as f64
    }

    /// Adds another run's seeds of the same method; the per-class IoU stays a mean over seeds.
    fn absorb(&mut self, other: Cell) {
        let (n, m) = (self.scores.len() as f64, other.scores.len() as f64);
        self.per_class = (self.per_class.iter().zip(&other.per_class))
            .map(|(a, b)| match (a, b) {
                (Some(a), Some(b)) => Some((a * n + b * m) / (n + m)),
                _ => a.or(*b),
            })
            .collect();
        self.scores.extend(other.scores);
        self.points.extend(other.points);
    }

    /// Against `base`'s points (source-only's, the same on every seed): how many of this
    /// cell's points over every seed fall below it, of how many, and the lowest difference.
    pub fn below(&self, base: &Cell) -> (usize, usize, f64) {
        let base = base.points.first().map_or(&[][..], Vec::as_slice);
        let diffs: Vec<f64> = self
            .points
            .iter()
            .flat_map(|p| p.iter().zip(base).map(|(a, b)| a - b))
            .collect();
        let below = diffs.iter().filter(|&&d| d < 0.0).count();
        (
            below,
            diffs.len(),
            diffs.iter().cloned().fold(f64::MAX, f64::min),
        )
    }

    /// Each scoring point's mIoU, averaged over the seeds.
    pub fn mean_points(&self) -> Vec<f64> {
        let n = self.points.iter().map(Vec::len).min().unwrap_or(0);
        let seeds = self.points.len().max(1) as f64;
        (0..n)
            .map(|i| self.points.iter().map(|p| p[i]).sum::<f64>() / seeds)
            .collect()
    }

    /// The largest drop of a class against `base` (negative: a loss), over classes both score.
    pub fn worst_class(&self, base: &Cell) -> Option<f64> {
        self.per_class
            .iter()
            .zip(&base.per_class)
            .filter_map(|(a, b)| Some(a.as_ref()? - b.as_ref()?))
            .min_by(|a, b| a.total_cmp(b))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetResult {
    pub name: String,
    pub continual: bool,
    pub class_names: Vec<String>,
    /// Source-only first, then the methods in order.
    pub cells: Vec<Cell>,
}

impl TargetResult {
    pub fn cell(&self, method: &str) -> Option<&Cell> {
        self.cells.iter().find(|c| c.method == method)
    }

    /// max(plain, TENT): what a component set has to beat.
    pub fn best_baseline(&self) -> Option<f64> {
        let v: Vec<f64> = ["plain", "tent"]
            .iter()
            .filter_map(|m| self.cell(m))
            .map(Cell::mean)
            .collect();
        (!v.is_empty()).then(|| v.iter().cloned().fold(f64::MIN, f64::max))
    }
}

/// Source-only scores of every scoring point of `target`, computed once.
fn source_only(model: &Path, target: &Target) -> Result<Vec<Point>> {
    let files = crate::model::weights::load_model_dir(model, &candle_core::Device::Cpu)?;
    let classes = files.config.class_names();
    let map = crate::data::LabelMap::identity(&classes, files.config.ignore_label());
    let m = crate::model::Segformer::new(&files.config, files.tensors)?;
    let per_set: Vec<Point> = target
        .sets
        .iter()
        .map(|set| {
            let s =
                crate::eval::evaluate(&m, &files.preprocess, set, &map, &candle_core::Device::Cpu)?;
            Ok(Point::from(&s))
        })
        .collect::<Result<_>>()?;
    Ok(target
        .schedule()
        .at
        .iter()
        .map(|&(_, set)| per_set[set].clone())
        .collect())
}

/// Runs every method and seed on `target`; `progress` is told after each run.
pub fn run_target(
    runner: &Runner,
    target: &Target,
    methods: &[Method],
    seeds: &[u64],
    progress: &mut dyn FnMut(&str),
) -> Result<TargetResult> {
    let continual = target.segments.len() > 1;
    let files = crate::config::SegformerConfig::load(&runner.model.join("config.json"))?;
    let base = source_only(&runner.model, target)?;
    let mut cells = vec![Cell {
        method: Method::SourceOnly.to_string(),
        scores: vec![fold(&base, continual).miou; seeds.len()],
        points: vec![base.iter().map(|p| p.miou).collect(); seeds.len()],
        per_class: fold(&base, continual).per_class,
    }];
    for &method in methods.iter().filter(|&&m| m != Method::SourceOnly) {
        let mut runs: Vec<Vec<Point>> = Vec::new();
        for &seed in seeds {
            let r = runner.run(target, method, seed)?;
            let pts: Vec<Point> = r.points.iter().map(|p| Point::from(&p.scores)).collect();
            progress(&format!(
                "{} {method} seed {seed}: {:.2}",
                target.name,
                fold(&pts, continual).miou
            ));
            runs.push(pts);
        }
        let folded: Vec<Point> = runs.iter().map(|p| fold(p, continual)).collect();
        let classes = files.num_labels();
        let per_class = (0..classes)
            .map(|k| {
                let v: Vec<f64> = folded
                    .iter()
                    .filter_map(|p| p.per_class.get(k).copied().flatten())
                    .collect();
                (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
            })
            .collect();
        cells.push(Cell {
            method: method.to_string(),
            scores: folded.iter().map(|p| p.miou).collect(),
            points: runs
                .iter()
                .map(|r| r.iter().map(|p| p.miou).collect())
                .collect(),
            per_class,
        });
    }
    Ok(TargetResult {
        name: target.name.clone(),
        continual,
        class_names: files.class_names(),
        cells,
    })
}

/// Results of several runs of one suite (methods or seeds split over processes) as one: per
/// target, every method once with the seeds of every run, source-only once.
pub fn join(parts: Vec<Vec<TargetResult>>) -> Vec<TargetResult> {
    let mut out: Vec<TargetResult> = Vec::new();
    for t in parts.into_iter().flatten() {
        let Some(o) = out.iter_mut().find(|o| o.name == t.name) else {
            out.push(t);
            continue;
        };
        for c in t.cells {
            match o.cells.iter_mut().find(|k| k.method == c.method) {
                Some(_) if c.method == Method::SourceOnly.name() => {}
                Some(k) => k.absorb(c),
                None => o.cells.push(c),
            }
        }
    }
    out
}

fn opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:+.2}"))
}

/// Every method scored on any target, in the order they first appear.
pub fn methods(results: &[TargetResult]) -> Vec<String> {
    let mut methods: Vec<String> = Vec::new();
    for c in results.iter().flat_map(|t| &t.cells) {
        if !methods.contains(&c.method) {
            methods.push(c.method.clone());
        }
    }
    methods
}

/// The suite's table in Markdown: a row per target and method, then the mean over targets.
pub fn markdown(results: &[TargetResult]) -> String {
    let mut s = String::from(
        "| target | method | mIoU mean ± half-range | gain vs source-only | margin vs best baseline | worst class change | points (first seed) |\n|---|---|---|---|---|---|---|\n",
    );
    for t in results {
        let base = t.cell("source-only").expect("source-only is always scored");
        let best = t.best_baseline();
        for c in &t.cells {
            let (lo, hi) = c
                .scores
                .iter()
                .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
            let pts: Vec<String> = c
                .points
                .first()
                .map(|p| p.iter().map(|v| format!("{v:.2}")).collect())
                .unwrap_or_default();
            s += &format!(
                "| {} | {} | {:.2} ± {:.2} | {} | {} | {} | {} |\n",
                t.name,
                c.method,
                c.mean(),
                (hi - lo) / 2.0,
                opt(Some(c.mean() - base.mean())),
                opt(best.map(|b| c.mean() - b)),
                opt(c.worst_class(base)),
                pts.join(" → ")
            );
        }
    }
    s += "\n| method | mean mIoU over targets | mean gain | mean margin vs best baseline | lowest margin | worst class change |\n|---|---|---|---|---|---|\n";
    // Joined runs may lack a method on some target: its means are over the targets it has.
    for m in &methods(results) {
        let (mut sum, mut gain, mut margins, mut worst) = (0.0, 0.0, Vec::new(), f64::MAX);
        let mut n = 0usize;
        for t in results {
            let Some(c) = t.cell(m) else { continue };
            let base = t.cell("source-only").expect("scored");
            n += 1;
            sum += c.mean();
            gain += c.mean() - base.mean();
            if let Some(b) = t.best_baseline() {
                margins.push(c.mean() - b);
            }
            worst = worst.min(c.worst_class(base).unwrap_or(0.0));
        }
        let missing = results.len() - n;
        let n = n.max(1) as f64;
        let mean_margin =
            (!margins.is_empty()).then(|| margins.iter().sum::<f64>() / margins.len() as f64);
        let low = margins.iter().cloned().reduce(f64::min);
        let m = match missing {
            0 => m.clone(),
            k => format!("{m} ({k} target(s) missing)"),
        };
        s += &format!(
            "| {m} | {:.2} | {:+.2} | {} | {} | {:+.2} |\n",
            sum / n,
            gain / n,
            opt(mean_margin),
            opt(low),
            worst
        );
    }
    s + &points_table(results)
}

/// For targets scored at several points (continual streams, several passes of a drive): each
/// method's points as means over the seeds, and how many points of every seed fall below
/// source-only's at the same point. Empty when no target has several points.
fn points_table(results: &[TargetResult]) -> String {
    let mut s = String::from(
        "\n| target | method | points below source-only (all seeds) | lowest point vs source-only | points (mean over seeds) |\n|---|---|---|---|---|\n",
    );
    let mut rows = 0;
    for t in results {
        let base = t.cell("source-only").expect("source-only is always scored");
        if base.points.first().map_or(0, Vec::len) < 2 {
            continue;
        }
        for c in &t.cells {
            let (below, of, low) = c.below(base);
            let pts: Vec<String> = c.mean_points().iter().map(|v| format!("{v:.2}")).collect();
            s += &format!(
                "| {} | {} | {below} of {of} | {:+.2} | {} |\n",
                t.name,
                c.method,
                low,
                pts.join(" → ")
            );
            rows += 1;
        }
    }
    match rows {
        0 => String::new(),
        _ => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seeds: &[f64], car: f64) -> Vec<TargetResult> {
        let cell = |method: &str, scores: &[f64], car: f64| Cell {
            method: method.into(),
            scores: scores.to_vec(),
            points: scores.iter().map(|&s| vec![s]).collect(),
            per_class: vec![Some(car), None],
        };
        vec![TargetResult {
            name: "fog".into(),
            continual: false,
            class_names: vec!["car".into(), "pole".into()],
            cells: vec![
                cell("source-only", &[20.0], 40.0),
                cell("profile", seeds, car),
            ],
        }]
    }

    #[test]
    fn the_points_table_counts_every_seeds_points_below_source_only() {
        let cell = |method: &str, points: Vec<Vec<f64>>| Cell {
            method: method.into(),
            scores: points
                .iter()
                .map(|p| p.iter().sum::<f64>() / p.len() as f64)
                .collect(),
            points,
            per_class: vec![None],
        };
        let t = TargetResult {
            name: "loop".into(),
            continual: false,
            class_names: vec!["car".into()],
            cells: vec![
                cell("source-only", vec![vec![30.0, 32.0, 31.0]; 2]),
                cell(
                    "profile",
                    vec![vec![31.0, 31.5, 33.0], vec![29.0, 33.0, 34.0]],
                ),
            ],
        };
        let p = t.cell("profile").unwrap();
        assert_eq!(p.below(t.cell("source-only").unwrap()), (2, 6, -1.0));
        assert_eq!(p.mean_points(), [30.0, 32.25, 33.5]);
        let table = markdown(&[t]);
        assert!(
            table.contains("| loop | profile | 2 of 6 | -1.00 | 30.00 → 32.25 → 33.50 |"),
            "{table}"
        );
        // One point per seed: no table.
        assert!(!markdown(&run(&[30.0], 36.0)).contains("points below"));
    }

    #[test]
    fn joining_runs_of_other_seeds_merges_them_into_one_cell() {
        let joined = join(vec![run(&[30.0, 31.0], 36.0), run(&[33.0], 39.0)]);
        assert_eq!(joined.len(), 1);
        let methods: Vec<&str> = joined[0].cells.iter().map(|c| c.method.as_str()).collect();
        assert_eq!(methods, ["source-only", "profile"]);
        let p = joined[0].cell("profile").unwrap();
        assert_eq!(p.scores, [30.0, 31.0, 33.0]);
        assert_eq!(p.points.len(), 3);
        assert_eq!(p.per_class, [Some(37.0), None], "weighted by seeds");
        assert_eq!(
            p.worst_class(joined[0].cell("source-only").unwrap()),
            Some(-3.0)
        );
    }
}
