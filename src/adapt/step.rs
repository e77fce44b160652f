//! One online adaptation step on a batch of target frames: the EMA teacher labels the weak view,
//! the switched-on components rectify and select the pseudo labels and change the student's
//! view, the student learns from the strong view under their losses, then the components'
//! state and the teacher move on. Target labels never enter here.

use super::component::{Component, Flow, Labels, Step, StudentOut, View, IGNORE};
use super::config::Statistics;
use super::controller::Event;
use super::region;
use super::replay::Replay;
use super::AdaptConfig;
use crate::loss::cross_entropy;
use crate::model::ema::{detached_copy, ema_update, ema_update_where};
use crate::model::{ClassNorm, Segformer, Student, TensorMap, Tracking};
use crate::optim::{AdamW, AdamWConfig, ParamGroup, StepOutcome};
use crate::stats::SourceStats;
use crate::SeededRng;
use candle_core::{DType, Device, Result, Tensor};
use std::sync::Arc;

/// The decode head's BatchNorm statistics, which the teacher tracks itself (not the counter).
const RUNNING_STATS: [&str; 2] = [
    crate::model::TRACKED_STATISTICS[0],
    crate::model::TRACKED_STATISTICS[1],
];

/// Loss terms of the last step, for logs and tests.
#[derive(Debug, Clone, Default)]
pub struct StepReport {
    pub total: f32,
    pub terms: Vec<(&'static str, f32)>,
    /// Share of pixels kept as pseudo labels.
    pub kept: f32,
    /// Mean confidence of the teacher's labels (before selection).
    pub confidence: f32,
    pub outcome: Option<StepOutcome>,
    /// The predictions left their running band: nothing was updated, and the runner should
    /// roll back.
    pub collapsed: bool,
    /// No training budget left: the step did nothing.
    pub idle: bool,
    /// What the training budgets' shift test saw before the step.
    pub event: Event,
}

pub struct Adapter {
    pub cfg: AdaptConfig,
    pub student: Student,
    pub teacher: Segformer,
    opt: AdamW,
    components: Vec<Box<dyn Component>>,
    /// When to train (None: every step at the configured rate).
    controller: Option<super::controller::Controller>,
    /// The last `budget.window` frames observed, on which a new condition's start is weighed.
    recent: std::collections::VecDeque<Tensor>,
    /// Frames observed since the current condition was told apart (None before the first).
    since_told: Option<usize>,
    /// What the shift test saw since the last training step (the last event), for its report.
    event: Event,
    /// Labelled source frames (shared, never changed by a step).
    pub replay: Option<Arc<Replay>>,
    pub stats: SourceStats,
    /// The weights adaptation started from (shared with the caller's map, never changed).
    source: TensorMap,
    pub step: u64,
    /// The precision of the teacher's labelling forward (a half copy of the f32 teacher, made
    /// for each step); the student always trains in f32.
    pub label_dtype: DType,
}

impl Adapter {
    /// An adapter starting from the source weights `tensors`.
    pub fn new(
        cfg: AdaptConfig,
        model_cfg: &crate::config::SegformerConfig,
        tensors: &TensorMap,
        stats: SourceStats,
    ) -> Result<Self> {
        Self::starting_from(cfg, model_cfg, tensors, tensors, stats)
    }

    /// An adapter whose student and teacher start from `init`, `source` being the weights
    /// adaptation began from (CoTTA restores towards them, a new condition starts from them).
    fn starting_from(
        cfg: AdaptConfig,
        model_cfg: &crate::config::SegformerConfig,
        init: &TensorMap,
        source: &TensorMap,
        stats: SourceStats,
    ) -> Result<Self> {
        if cfg.statistics == Statistics::Class && stats.norm.is_none() {
            candle_core::bail!(
                "adapt.statistics = \"class\" needs the decode head's class statistics, and this \
                 model's source_stats.safetensors has none: recompute them with \
                 `segadapt stats --model DIR --data SOURCE_DIR`"
            );
        }
        let mut student = Student::with_trainable(model_cfg, init, |n| cfg.trains(n))?;
        student.model.set_recompute(cfg.recompute);
        let teacher = Segformer::new(model_cfg, detached_copy(&student.model)?)?;
        let components = super::components(&cfg, model_cfg, &stats, source)?;
        let mut vars: Vec<(String, candle_core::Var, ParamGroup)> = student
            .vars
            .iter()
            .map(|(n, v)| {
                let group = crate::train::param_group(n, cfg.head_lr_mult);
                (n.clone(), v.clone(), group)
            })
            .collect();
        for c in &components {
            for (n, v, lr_mult) in c.params() {
                let group = ParamGroup {
                    lr_mult,
                    decay: false,
                };
                vars.push((format!("adapt.{}.{n}", c.name()), v, group));
            }
        }
        let opt = AdamW::new(
            vars,
            AdamWConfig {
                weight_decay: cfg.weight_decay,
                max_grad_norm: Some(cfg.max_grad_norm),
                ..Default::default()
            },
        )?;
        Ok(Self {
            controller: cfg.budget.on.then(|| {
                let c = super::controller::Controller::new(&cfg.budget);
                match &stats.frames {
                    Some(f) => c.with_source(f.clone()),
                    None => c,
                }
            }),
            event: Event::Steady,
            recent: Default::default(),
            since_told: None,
            cfg,
            student,
            teacher,
            opt,
            components,
            replay: None,
            stats,
            source: source.clone(),
            step: 0,
            label_dtype: DType::F32,
        })
    }

    /// Optimizer steps taken since the student last started afresh (skipped non-finite steps
    /// excluded).
    pub fn optimizer_steps(&self) -> u64 {
        self.opt.step_count()
    }

    /// Whether training runs on budgets granted by a shift test that watches the stream.
    pub fn has_budgets(&self) -> bool {
        self.controller.is_some()
    }

    /// The names of the switched-on components, in pipeline order.
    pub fn component_names(&self) -> Vec<&'static str> {
        self.components.iter().map(|c| c.name()).collect()
    }

    /// One step on `weak` / `strong` views of the same frames ([B, 3, H, W], same geometry),
    /// the frames standing for the stream: [`Adapter::observe`] on `weak`, then
    /// [`Adapter::train`].
    pub fn step(
        &mut self,
        weak: &Tensor,
        strong: &Tensor,
        rng: &mut SeededRng,
    ) -> Result<StepReport> {
        self.observe(weak)?;
        self.train(weak, strong, rng)
    }

    /// Shows the training budgets' shift test the frames that arrived ([B, 3, H, W],
    /// normalised, in arrival order) and follows what it saw: on a shift the condition left
    /// keeps its weights, a recalled one gets its own back. Without budgets, nothing. Returns
    /// whether the teacher's weights were replaced (a recalled condition's).
    pub fn observe(&mut self, frames: &Tensor) -> Result<bool> {
        let mut replaced = false;
        for i in 0..frames.dim(0)? {
            let Some(c) = self.controller.as_mut() else {
                return Ok(false);
            };
            // Frame by frame: a shift keeps the weights of the condition it left before the
            // next frame can recall them.
            let frame = frames.narrow(0, i, 1)?;
            let e = c.observe(&frame)?;
            let told = c.take_told();
            if self.cfg.budget.judge.weighs() {
                self.recent.push_back(frame);
                if self.recent.len() > self.cfg.budget.window {
                    self.recent.pop_front();
                }
            }
            if e != Event::Steady {
                self.follow(e)?;
                self.event = e;
                replaced |= matches!(e, Event::Recalled(_));
            }
            replaced |= self.weigh_start(told)?;
        }
        Ok(replaced)
    }

    /// One training step on `weak` / `strong` views of frames sampled from the stream, as
    /// much as the training budget grants.
    pub fn train(
        &mut self,
        weak: &Tensor,
        strong: &Tensor,
        rng: &mut SeededRng,
    ) -> Result<StepReport> {
        let event = std::mem::take(&mut self.event);
        let scale = self.controller.as_mut().map_or(1.0, |c| c.spend());
        if scale == 0.0 {
            // The weights stay, but the teacher's normalisation statistics go on following the
            // frames: a running average of the last few frames cannot drift over a long drive,
            // and a condition the shift test missed is still served with its own statistics.
            if !self.cfg.tent.on {
                self.teacher_forward(weak)?;
            }
            return Ok(StepReport {
                idle: true,
                event,
                ..Default::default()
            });
        }
        let lr = self.cfg.lr * scale;
        let report = crate::model::ops::on_pool(|| match self.cfg.tent.on {
            true => self.tent_step(weak, lr, rng),
            false => self.self_training_step(weak, strong, lr, rng),
        })?;
        Ok(StepReport { event, ..report })
    }

    /// Moves with the stream: on a shift the condition left keeps its weights (with slots); the
    /// new condition then goes on from them or from another kept condition's.
    fn follow(&mut self, event: Event) -> Result<()> {
        match event {
            Event::Steady => {}
            Event::Shifted { left: None } => self.components.iter_mut().for_each(|c| c.shift()),
            Event::Shifted { left: Some(i) } => {
                let kept = self.adapted_weights()?;
                self.controller
                    .as_mut()
                    .expect("events come from the controller")
                    .keep(i, kept);
                log::info!("condition {i} left: training waits until the new one is told");
            }
            Event::Recalled(i) => {
                let adapted = self
                    .controller
                    .as_ref()
                    .and_then(|c| c.weights(i))
                    .expect("a recalled condition has weights");
                let init = super::choose::laid_over(&self.source, adapted);
                log::info!("known condition {i}: adapting from its weights");
                self.start_again(&init)?;
            }
        }
        Ok(())
    }

    /// At the frame that told a condition apart (`told`: whether it is known) and every
    /// `budget.recheck` frames after, where it goes on from, as `budget.judge` says; whether the
    /// weights were replaced.
    fn weigh_start(&mut self, told: Option<bool>) -> Result<bool> {
        use super::config::Judge;
        if self.cfg.budget.judge == Judge::Off {
            return Ok(false);
        }
        self.since_told = match told {
            Some(_) => Some(0),
            None => self.since_told.map(|n| n + 1),
        };
        let b = &self.cfg.budget;
        let recheck = b.recheck > 0 && self.since_told.is_some_and(|n| n > 0 && n % b.recheck == 0);
        match (b.judge, told) {
            (Judge::Off, _) => Ok(false),
            // The first condition started from the source and has no kept one to be far from.
            (Judge::Source, Some(false))
                if self.controller.as_ref().is_some_and(|c| c.has_kept()) =>
            {
                log::info!(
                    "new condition, far from every kept one: going on from the source weights"
                );
                let init = self.source.clone();
                self.start_again(&init)?;
                Ok(true)
            }
            (Judge::Source, _) => Ok(false),
            (_, Some(_)) => self.choose_start("new condition"),
            (_, None) if recheck => self.choose_start("condition weighed again"),
            (_, None) => Ok(false),
        }
    }

    /// Weighs where the condition just told apart starts (see [`super::choose`]) and starts
    /// there; whether the weights were replaced.
    fn choose_start(&mut self, why: &str) -> Result<bool> {
        use super::choose::{laid_over, weigh, Start};
        let Some(c) = self.controller.as_ref() else {
            return Ok(false);
        };
        let kept: Vec<(usize, &TensorMap)> = c
            .kept()
            .into_iter()
            .filter_map(|i| c.weights(i).map(|w| (i, w)))
            .collect();
        let frames: Vec<Tensor> = self.recent.iter().cloned().collect();
        let signal = self.cfg.budget.judge;
        let prior: Vec<f32> = self.stats.prior.to_vec1()?;
        let (best, rated) = weigh(signal, &self.teacher, &self.source, &kept, &frames, &prior)?;
        let said: Vec<String> = rated
            .iter()
            .map(|(s, v)| format!("{s} {:.4}", signal.of(v)))
            .collect();
        log::info!(
            "{why}: going on from {best} ({signal:?}: {})",
            said.join(", ")
        );
        let init = match best {
            Start::InPlace => return Ok(false),
            Start::Source => self.source.clone(),
            Start::Kept(i) => {
                let adapted = kept.iter().find(|(k, _)| *k == i);
                laid_over(
                    &self.source,
                    adapted.expect("a weighed condition is kept").1,
                )
            }
        };
        self.start_again(&init)?;
        Ok(true)
    }

    /// Copies of the teacher's tensors that adaptation moves (the trained parameters and the
    /// BatchNorm statistics); the others equal the source's.
    fn adapted_weights(&self) -> Result<TensorMap> {
        let specs = self.teacher.specs();
        let moved = |n: &str| {
            specs
                .iter()
                .find(|s| s.name == n)
                .is_none_or(|s| !s.trainable || self.cfg.trains(n))
        };
        detached_copy(&self.teacher).map(|m| m.into_iter().filter(|(n, _)| moved(n)).collect())
    }

    /// Student and teacher start from `init` with fresh optimizer moments and component state;
    /// the controller, the source frames and the step count stay.
    fn start_again(&mut self, init: &TensorMap) -> Result<()> {
        let model_cfg = self.teacher.cfg.clone();
        let fresh = Self::starting_from(
            self.cfg.clone(),
            &model_cfg,
            init,
            &self.source,
            self.stats.clone(),
        )?;
        self.student = fresh.student;
        self.teacher = fresh.teacher;
        self.opt = fresh.opt;
        self.components = fresh.components;
        Ok(())
    }

    /// The teacher's probabilities and embedding on the weak view, as unselected labels.
    fn teacher_labels(&self, weak: &Tensor) -> Result<Labels> {
        let out = self.teacher_forward(weak)?;
        let (b, h, w, c) = out.logits.dims4()?;
        let d = out.embed.dim(3)?;
        let n = b * h * w;
        let probs = candle_nn::ops::softmax_last_dim(&out.logits.reshape((n, c))?)?;
        let feats = out.embed.reshape((n, d))?;
        Labels::from_scores(probs.clone(), feats, (b, h, w), probs)
    }

    /// The source's class statistics when the teacher tracks by class: near the source
    /// domain, where the stream's statistics move with what it shows. Without training
    /// budgets there is no shift test to tell, and the teacher always tracks by class.
    fn class_norm(&self) -> Option<&ClassNorm> {
        let near = self.controller.as_ref().is_none_or(|c| c.near_source());
        match self.cfg.statistics {
            Statistics::Class if near => self.stats.norm.as_ref(),
            _ => None,
        }
    }

    /// The teacher's forward on the weak view (f32 outputs), moving its BatchNorm statistics
    /// towards the view's. Near the source, by class. Elsewhere, with the shift test's view of
    /// the source frames, only part of the way from the source's statistics: as far as the
    /// frames look shifted (their pixel statistics) or the network sees them shifted (the
    /// decode head's features against the source frames' spread), whichever is further. So a
    /// blur that leaves the features where the source's were keeps the source's statistics,
    /// and a stream that comes back from another condition takes them back.
    fn teacher_forward(&self, weak: &Tensor) -> Result<crate::model::SegOutput> {
        let _phase = crate::profile::scope("adapt: teacher");
        let track = match (self.class_norm(), &self.controller) {
            (Some(norm), _) => Tracking::ByClass(norm),
            (None, Some(c)) => Tracking::Anchored {
                share: c.source_share(),
                source: (
                    &self.source[RUNNING_STATS[0]],
                    &self.source[RUNNING_STATS[1]],
                ),
                norm: self.stats.norm.as_ref(),
            },
            (None, None) => Tracking::Batch,
        };
        Ok(match self.label_dtype {
            DType::F32 => self.teacher.forward_tracking(weak, track)?,
            half => {
                let copy = self.teacher.to_dtype(half)?;
                let out = copy.forward_tracking(weak, track)?;
                for n in RUNNING_STATS {
                    let moved = copy.raw_tensors()[n].to_dtype(DType::F32)?;
                    self.teacher.raw_tensors()[n].slice_set(&moved, 0, 0)?;
                }
                crate::model::SegOutput {
                    logits: out.logits.to_dtype(DType::F32)?,
                    embed: out.embed.to_dtype(DType::F32)?,
                }
            }
        })
    }

    fn self_training_step(
        &mut self,
        weak: &Tensor,
        strong: &Tensor,
        lr: f64,
        rng: &mut SeededRng,
    ) -> Result<StepReport> {
        let mut labels = self.teacher_labels(weak)?;
        let phase = crate::profile::scope("adapt: pseudo labels and views");
        for c in &mut self.components {
            if c.label(&mut labels, self.step)? == Flow::Collapse {
                return Ok(collapsed());
            }
        }
        let confidence = labels.conf.iter().sum::<f32>() / labels.conf.len().max(1) as f32;
        let selected = labels.selected();
        let n = selected.len();
        let mut step = Step {
            labels,
            view: View {
                image: strong.clone(),
                train: selected.clone(),
                labels: selected,
                pasted: vec![false; n],
                source: None,
            },
            student: None,
            t: self.step,
            stats: &self.stats,
            replay: self.replay.as_deref(),
        };
        for c in &mut self.components {
            c.view(&mut step, rng)?;
        }
        drop(phase);
        let (ce, kept) = {
            let _phase = crate::profile::scope("adapt: student forward");
            let (out, kept) = student_forward(&self.student, &step.view, rng)?;
            let ce = cross_entropy(&out.logits, &out.y, None, IGNORE)?;
            step.student = Some(out);
            (ce, kept)
        };
        for c in &mut self.components {
            if c.inspect(&step)? == Flow::Collapse {
                return Ok(collapsed());
            }
        }
        let phase = crate::profile::scope("adapt: losses");
        let mut terms: Vec<(&'static str, Tensor)> = vec![("ce", ce)];
        for c in &mut self.components {
            terms.extend(c.losses(&mut step, &self.student, rng)?);
        }
        drop(phase);
        let (mut report, applied) = optimize(
            &mut self.opt,
            &self.student.model,
            lr,
            terms,
            kept,
            self.step,
        )?;
        report.confidence = confidence;
        if applied {
            let _phase = crate::profile::scope("adapt: EMA and state");
            for c in &mut self.components {
                c.update(&step, &self.student, rng)?;
            }
            // The teacher starts as a trained model, not a random one: no momentum warm-up.
            let cfg = &self.cfg;
            // The teacher's BatchNorm statistics are its own, tracked on the clean frames it
            // labels: the student's follow the strong views.
            ema_update_where(&self.teacher, &self.student.model, cfg.ema, |n| {
                cfg.trains(n) && !RUNNING_STATS.contains(&n)
            })?;
            self.step += 1;
        }
        Ok(report)
    }

    /// TENT: minimise the entropy of the model's own predictions; only norm affines move.
    fn tent_step(&mut self, x: &Tensor, lr: f64, rng: &mut SeededRng) -> Result<StepReport> {
        let out = self.student.model.forward(x, Some(rng))?;
        let c = out.logits.dim(3)?;
        let logits = out.logits.reshape(((), c))?;
        let all = Tensor::ones(logits.dim(0)?, DType::U8, x.device())?;
        let loss = region::entropy(&logits, &all)?;
        let terms = vec![("entropy", loss)];
        let (report, applied) = optimize(
            &mut self.opt,
            &self.student.model,
            lr,
            terms,
            1.0,
            self.step,
        )?;
        // The served model is the adapted one itself.
        if applied {
            ema_update(&self.teacher, &self.student.model, 0.0)?;
        }
        self.step += 1;
        Ok(report)
    }
}

/// Sums the terms, backpropagates and steps AdamW unless the loss is not finite; true when
/// the student moved.
fn optimize(
    opt: &mut AdamW,
    model: &Segformer,
    lr: f64,
    terms: Vec<(&'static str, Tensor)>,
    kept: f32,
    step: u64,
) -> Result<(StepReport, bool)> {
    let mut total = terms[0].1.clone();
    for (_, t) in &terms[1..] {
        total = (total + t)?;
    }
    let total_v = total.to_scalar::<f32>()?;
    let outcome = if total_v.is_finite() {
        let grads = {
            let _t = crate::profile::scope("adapt: backward");
            model.backward(&total)?
        };
        let _t = crate::profile::scope("adapt: optimizer");
        opt.step(&grads, lr)?
    } else {
        StepOutcome::NonFinite
    };
    let report = StepReport {
        total: total_v,
        terms: terms
            .iter()
            .map(|(k, t)| (*k, t.to_scalar::<f32>().unwrap_or(f32::NAN)))
            .collect(),
        kept,
        outcome: Some(outcome),
        ..Default::default()
    };
    log::debug!("step {step}: {:?}", report.terms);
    Ok((report, outcome != StepOutcome::NonFinite))
}

fn collapsed() -> StepReport {
    StepReport {
        collapsed: true,
        ..Default::default()
    }
}

/// The student on the view with its training labels and masks; the share of pixels trained on.
fn student_forward(student: &Student, v: &View, rng: &mut SeededRng) -> Result<(StudentOut, f32)> {
    let n = v.train.len();
    let dev = v.image.device();
    let keep: Vec<bool> = v
        .labels
        .iter()
        .zip(&v.pasted)
        .map(|(&l, &p)| l != IGNORE || p)
        .collect();
    let kept = keep.iter().filter(|&&k| k).count() as f32 / n.max(1) as f32;
    let mask = |v: Vec<bool>| Tensor::from_vec(v.into_iter().map(u8::from).collect(), n, dev);
    let out = student.model.forward(&v.image, Some(rng))?;
    let (c, d) = (out.logits.dim(3)?, out.embed.dim(3)?);
    Ok((
        StudentOut {
            logits: out.logits.reshape((n, c))?,
            feats: out.embed.reshape((n, d))?,
            y: Tensor::from_vec(v.train.clone(), n, dev)?,
            ignored: mask(keep.iter().map(|k| !k).collect())?,
            kept: mask(keep)?,
            same: mask(v.pasted.iter().map(|p| !p).collect())?,
            source_cells: None,
        },
        kept,
    ))
}

impl Adapter {
    /// Everything a restarted run needs: both models, optimizer, each component's state under
    /// `adapt.<component>.` and the step count.
    pub fn state(&self) -> Result<TensorMap> {
        let mut m = crate::model::prefixed(self.student.model.tensors()?, "student.");
        m.extend(crate::model::prefixed(self.teacher.tensors()?, "teacher."));
        m.extend(self.opt.state()?);
        for c in &self.components {
            for (k, t) in c.state()? {
                m.insert(format!("adapt.{}.{k}", c.name()), t);
            }
        }
        if let Some(c) = &self.controller {
            for (k, t) in c.state()? {
                m.insert(format!("adapt.budget.{k}"), t);
            }
        }
        m.insert(
            "adapt.step".into(),
            Tensor::new(self.step as i64, &Device::Cpu)?,
        );
        Ok(m)
    }

    /// Goes back to a saved state in place. The source frames stay on board, and the collapse
    /// guard keeps the band it has built and its count of flagged steps: restarting it would
    /// blind it for its warm-up, and a level that keeps being flagged is then accepted.
    pub fn rollback(&mut self, state: &TensorMap) -> Result<()> {
        let cfg = self.teacher.cfg.clone();
        let replay = self.replay.take();
        let source = self.source.clone();
        let mut back =
            Adapter::restore(self.cfg.clone(), &cfg, &source, self.stats.clone(), state)?;
        let guard = |a: &Adapter| a.components.iter().position(|c| c.name() == "guard");
        if let (Some(i), Some(j)) = (guard(self), guard(&back)) {
            std::mem::swap(&mut self.components[i], &mut back.components[j]);
        }
        *self = back;
        self.replay = replay;
        Ok(())
    }

    /// Rebuilds an adapter from [`Adapter::state`]; `cfg` must switch on the same parts, and
    /// `source` is the model adaptation began from.
    pub fn restore(
        cfg: AdaptConfig,
        model_cfg: &crate::config::SegformerConfig,
        source: &TensorMap,
        stats: SourceStats,
        state: &TensorMap,
    ) -> Result<Self> {
        let mut a = Adapter::starting_from(
            cfg,
            model_cfg,
            &crate::model::with_prefix(state, "student."),
            source,
            stats,
        )?;
        a.teacher = Segformer::new(model_cfg, crate::model::with_prefix(state, "teacher."))?;
        a.opt.load_state(state)?;
        for c in &mut a.components {
            let prefix = format!("adapt.{}.", c.name());
            c.load(&|k: &str| state.get(&format!("{prefix}{k}")).cloned())?;
        }
        let names: Vec<String> = a.teacher.tensors()?.into_keys().collect();
        if let Some(c) = &mut a.controller {
            c.load(
                &|k: &str| state.get(&format!("adapt.budget.{k}")).cloned(),
                &names,
            )?;
        }
        let step = state
            .get("adapt.step")
            .ok_or_else(|| candle_core::Error::Msg("adaptation state lacks adapt.step".into()))?;
        a.step = step.to_dtype(DType::I64)?.to_scalar::<i64>()? as u64;
        Ok(a)
    }
}
