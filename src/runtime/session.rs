//! One adaptation run as `segadapt adapt` does it: a model folder and a device profile, the
//! memory plan checked, serving with training beside it, scored before and after, written out.

use super::online::{run_online, OnlineConfig, StepBudget};
use super::resume::Position;
use super::{PipelineConfig, Summary};
use crate::adapt::step::Adapter;
use crate::adapt::{AdaptConfig, Method};
use crate::budget::{measured_plan, Plan};
use crate::checkpoint::CheckpointDir;
use crate::config::Profile;
use crate::data::{Example, LabelMap};
use crate::error::{Error, Result};
use crate::metrics::Scores;
use crate::model::{weights, Segformer};
use crate::report::run::segment_strip;
use crate::report::trace::{RunTrace, StepPoint};
use crate::source::FrameSource;
use rand::SeedableRng;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

pub struct Session {
    pub model: PathBuf,
    pub profile: Profile,
    pub method: Method,
    pub out: PathBuf,
    /// Labelled frames to score on; never trained on.
    pub eval: Option<Arc<Vec<Example>>>,
    /// When to score on `eval` while adapting (besides before and after).
    pub eval_every: Every,
    /// Overrides the profile's cadence: k steps after each frame on the serving thread (not
    /// with `realtime`).
    pub steps_per_frame: Option<u32>,
    pub seed: u64,
    pub realtime: bool,
    /// Adaptation settings after the profile's, e.g. from a tuning file.
    pub adapt: Option<AdaptConfig>,
    /// Labelled source frames for source replay (`adapt.replay`).
    pub replay: Option<Arc<Vec<Example>>>,
    /// Source-only scores computed earlier (the ablation scores them once).
    pub before: Option<Scores>,
    /// Scoring points by frames served (the ablation's passes, a continual drive's conditions).
    pub schedule: Schedule,
    /// Live figures for monitoring (`adapt --metrics`).
    pub metrics: Option<Arc<super::metrics::Metrics>>,
}

/// How often a run scores its labelled frames while it adapts: every N training steps, or every
/// N served frames (a long drive whose training budgets are spent takes no more steps).
/// Written `N` or `Nsteps`, and `Nframes`; 0 is never.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum Every {
    #[default]
    Never,
    Steps(u64),
    Frames(u64),
}

impl Every {
    /// Whether count `n` of the unit it counts is due.
    fn due(n: u64, every: u64) -> bool {
        n > 0 && n % every == 0
    }

    /// What the curve's x counts.
    pub fn unit(self) -> &'static str {
        match self {
            Every::Frames(_) => "frames served",
            _ => "step",
        }
    }
}

impl std::str::FromStr for Every {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (n, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
            Some(i) => s.split_at(i),
            None => (s, "steps"),
        };
        let n: u64 = n
            .parse()
            .map_err(|_| format!("{s:?}: N, Nsteps or Nframes"))?;
        match (n, unit) {
            (0, _) => Ok(Every::Never),
            (n, "steps" | "step") => Ok(Every::Steps(n)),
            (n, "frames" | "frame") => Ok(Every::Frames(n)),
            _ => Err(format!("{s:?}: N, Nsteps or Nframes")),
        }
    }
}

/// Scoring after given numbers of served (and trained-on) frames, each point on its own
/// labelled set: a drive through several conditions is scored after each one on its frames.
#[derive(Clone, Default)]
pub struct Schedule {
    pub sets: Vec<Arc<Vec<Example>>>,
    /// (frames served, index into `sets`), ascending.
    pub at: Vec<(u64, usize)>,
}

/// The served model's scores at one point of the schedule.
#[derive(Debug, Clone, Serialize)]
pub struct CurvePoint {
    pub frames: u64,
    pub set: usize,
    pub scores: Scores,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub method: String,
    /// The switched-on components, in pipeline order.
    pub components: Vec<String>,
    pub seed: u64,
    pub summary: Summary,
    pub source_only: Option<Scores>,
    pub adapted: Option<Scores>,
    /// (step or frames served, mIoU) at every `eval_every`.
    pub curve: Vec<(u64, f64)>,
    /// What the curve's x counts.
    pub curve_x: &'static str,
    /// The schedule's points that were reached.
    pub points: Vec<CurvePoint>,
    pub plan: Plan,
    /// Heap peak of the whole run (counting allocator) and the process's resident peak.
    pub peak_heap_mb: f64,
    pub peak_rss_mb: Option<f64>,
    /// The run's page (`OUT/report.html`); None where it could not be written.
    pub page: Option<PathBuf>,
}

impl Session {
    pub fn run(&self, source: Box<dyn FrameSource>, stop: Arc<AtomicBool>) -> Result<Report> {
        let _lock = crate::checkpoint::OutLock::acquire(&self.out)?;
        let p = &self.profile;
        let dev = p.open_device()?;
        let mut files = weights::load_model_dir(&self.model, &dev)?;
        files.preprocess.size = Some(crate::config::Size {
            width: p.input.width,
            height: p.input.height,
        });
        files.preprocess.do_resize = true;
        let pre = files.preprocess.clone();
        let source_model = Segformer::new(&files.config, files.tensors.clone())?;
        let (stats, source) = super::bootstrap::source_stats(
            &self.model,
            &self.out,
            (&source_model, &pre),
            source,
            &dev,
        )?;
        let classes = files.config.class_names();
        let map = LabelMap::identity(&classes, files.config.ignore_label());
        let score = |m: &Segformer| -> Result<Option<Scores>> {
            match &self.eval {
                Some(ex) => Ok(Some(crate::eval::evaluate(m, &pre, ex, &map, &dev)?)),
                None => Ok(None),
            }
        };
        let source_only = self.method == Method::SourceOnly;
        let base = self.adapt.clone().unwrap_or_else(|| p.adapt.clone());
        let mut cfg = self.method.config(&base);
        super::bootstrap::fit(&mut cfg, &stats, &self.model);

        if cfg.replay.on && self.replay.is_none() {
            return Err(Error::config(
                "adapt.replay.on",
                true,
                "false, or labelled source frames to replay (adapt --replay DIR)",
            ));
        }
        let plan = measured_plan(p, &files.config, &files.tensors, &stats, &cfg)?;
        log::info!("{}", plan.table().trim_end());
        plan.check()?;

        let before = match &self.before {
            Some(s) => Some(s.clone()),
            None => score(&source_model)?,
        };
        // A restarted run continues from the adaptation state it saved.
        let ckpts = Arc::new(CheckpointDir::new(
            self.out.join("checkpoints"),
            p.train.keep,
        ));
        for dir in [&self.out, &ckpts.dir] {
            let n = crate::checkpoint::remove_stale_temps(dir);
            if n > 0 {
                log::info!(
                    "{}: removed {n} partial file(s) of an interrupted run",
                    dir.display()
                );
            }
        }
        let mut start = None;
        let mut adapter = match ckpts.latest(&dev) {
            Some(ck) => {
                log::info!(
                    "resuming adaptation from {} (step {})",
                    ck.path.display(),
                    ck.step
                );
                start = Position::from_meta(&ck.meta);
                Adapter::restore(cfg, &files.config, &files.tensors, stats, &ck.tensors)?
            }
            None => {
                let a = Adapter::new(cfg, &files.config, &files.tensors, stats)?;
                // The state a first collapse rolls back to.
                ckpts.save(a.step, &a.state()?, Default::default())?;
                a
            }
        };
        adapter.label_dtype = p.device.dtype.dtype();
        if let (true, Some(ex)) = (adapter.cfg.replay.on, &self.replay) {
            // Seeded by the run's seed, so a resumed run keeps the same frames.
            let mut rng = crate::SeededRng::seed_from_u64(self.seed);
            let r = crate::adapt::replay::Replay::new(
                ex,
                &pre,
                (p.input.width as u32, p.input.height as u32),
                adapter.cfg.replay.size,
                adapter.cfg.replay.temp,
                files.config.num_labels(),
                &mut rng,
            );
            log::info!(
                "source replay: {} of {} labelled frames kept ({:.1} MB)",
                r.len(),
                ex.len(),
                r.bytes() as f64 / (1 << 20) as f64
            );
            adapter.replay = Some(Arc::new(r));
        }
        let act = plan
            .parts
            .iter()
            .find(|x| x.name == "activations")
            .map_or(0, |x| x.bytes);
        let online = OnlineConfig {
            pipeline: PipelineConfig {
                realtime: self.realtime,
                queue: 2,
                metrics: self.metrics.clone(),
            },
            batch: plan.batch,
            crop: Some(plan.crop),
            ring: p.train.ring,
            // In real time training never runs on the serving thread; replayed as fast as
            // possible, a step after every `every`-th frame keeps runs reproducible.
            steps_per_frame: match (source_only, self.steps_per_frame) {
                (true, _) => Some(0),
                (false, Some(k)) => Some(k),
                (false, None) if self.realtime || p.train.every == 0 => None,
                (false, None) => Some(1),
            },
            every: match self.steps_per_frame {
                Some(_) => 1,
                None => p.train.every,
            },
            train_threads: p.device.threads,
            seed: self.seed,
            checkpoints: Some(ckpts.clone()),
            checkpoint_every: p.train.checkpoint_every,
            start,
            serve_dtype: p.device.dtype.dtype(),
            step_budget: Some(StepBudget {
                limit_bytes: plan.budget,
                activation_bytes: act,
            }),
        };
        let curve = Mutex::new(Vec::new());
        let components: Vec<String> = match (source_only, adapter.cfg.tent.on) {
            (true, _) => Vec::new(),
            (false, true) => vec!["tent".into()],
            (false, false) => adapter
                .component_names()
                .iter()
                .map(|n| n.to_string())
                .collect(),
        };
        let points = Mutex::new(Vec::new());
        let trace = Mutex::new(RunTrace::default());
        let mut next = 0usize;
        let mut due = |frames: u64, model: &Segformer| -> Result<Vec<CurvePoint>> {
            let mut out = Vec::new();
            while let Some(&(at, set)) = self.schedule.at.get(next) {
                // Points a resumed run has passed were scored before the interruption.
                if at < frames {
                    next += 1;
                    continue;
                }
                if at != frames {
                    break;
                }
                let scores =
                    crate::eval::evaluate(model, &pre, &self.schedule.sets[set], &map, &dev)?;
                log::info!("{frames} frames: mIoU {:.2} on set {set}", scores.miou);
                out.push(CurvePoint {
                    frames,
                    set,
                    scores,
                });
                next += 1;
            }
            Ok(out)
        };
        crate::budget::reset_peak();
        let ended = run_online(
            source,
            adapter,
            &pre,
            &online,
            stop,
            |before, item, model| {
                // Frames before this one are served and trained on: the schedule's points there.
                points.lock().expect("points").extend(due(before, model)?);
                if let Every::Frames(n) = self.eval_every {
                    if let (true, Some(s)) = (Every::due(before, n), score(model)?) {
                        log::info!("{before} frames: mIoU {:.2}", s.miou);
                        curve.lock().expect("curve").push((before, s.miou));
                    }
                }
                let served = before + 1;
                let pred = crate::eval::predict_image(model, &pre, &item.frame.image, &dev)?;
                let ms = item.at.elapsed().as_secs_f64() * 1e3;
                trace
                    .lock()
                    .expect("trace")
                    .served(served, ms, &item.frame, &pred, classes.len());
                if served % 500 == 0 {
                    // The soak's figures: memory must not grow with the length of a drive.
                    let mb = |b: usize| b as f64 / (1 << 20) as f64;
                    log::info!(
                        "{served} frames: heap {:.1} MB, resident {}",
                        mb(crate::budget::current_bytes()),
                        crate::budget::rss_bytes()
                            .map_or("n/a".into(), |b| format!("{:.1} MB", mb(b)))
                    );
                }
                Ok(())
            },
            |step, rep, model| {
                trace
                    .lock()
                    .expect("trace")
                    .steps
                    .push(StepPoint::new(step, rep));
                if matches!(self.eval_every, Every::Steps(n) if Every::due(step, n)) {
                    if let Some(s) = score(model)? {
                        log::info!("step {step}: mIoU {:.2}", s.miou);
                        curve.lock().expect("curve").push((step, s.miou));
                    }
                }
                Ok(())
            },
        )?;
        let (summary, adapter) = (ended.summary, ended.adapter);
        let peak_heap_mb = crate::budget::peak_bytes() as f64 / (1 << 20) as f64;
        let mut points = points.into_inner().expect("points");
        points.extend(due(ended.at.frames, &adapter.teacher)?);
        let adapted = score(&adapter.teacher)?;
        if let Err(e) = ckpts.save(adapter.step, &adapter.state()?, ended.at.meta()) {
            // The adapted model is still written below; a restart resumes from the newest
            // checkpoint that was written.
            log::error!("the final checkpoint was not written: {e}");
        }
        weights::save_model_dir(
            &self.out,
            &weights::ModelFiles {
                config: files.config.clone(),
                preprocess: files.preprocess.clone(),
                tensors: adapter.teacher.tensors()?,
            },
        )?;
        adapter.stats.save(&self.out)?;
        let mut report = Report {
            method: self.method.to_string(),
            components,
            seed: self.seed,
            summary,
            source_only: before,
            adapted,
            curve: curve.into_inner().expect("curve"),
            curve_x: self.eval_every.unit(),
            points,
            plan,
            peak_heap_mb,
            peak_rss_mb: crate::budget::peak_rss_bytes().map(|b| b as f64 / (1 << 20) as f64),
            page: None,
        };
        let trace = trace.into_inner().expect("trace");
        let page = self.out.join("report.html");
        // The adapted weights are saved by now: a page that cannot be written costs nothing else.
        match write_page(
            &report,
            &trace,
            &classes,
            &source_model,
            &adapter.teacher,
            &pre,
            &page,
        ) {
            Ok(()) => report.page = Some(page),
            Err(e) => log::warn!("{}: run report not written: {e}", page.display()),
        }
        Ok(report)
    }
}

/// The run's page, with its strip's frames segmented by the source and the adapted model.
fn write_page(
    report: &Report,
    trace: &RunTrace,
    classes: &[String],
    source: &Segformer,
    adapted: &Segformer,
    pre: &crate::config::PreprocessConfig,
    path: &std::path::Path,
) -> Result<()> {
    let models = [("source-only", source), ("adapted", adapted)];
    let frames = segment_strip(&trace.strip, pre, classes.len(), &models)?;
    crate::report::run::adaptation_page(report, trace, classes, frames)?.write(path)
}
