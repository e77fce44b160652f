//! Supervised source training: the student learns from labelled frames, the EMA teacher follows,
//! checkpoints are written atomically and a run resumes exactly where it stopped.

use crate::checkpoint::CheckpointDir;
use crate::config::{PreprocessConfig, SegformerConfig};
use crate::data::{AugmentConfig, Augmenter, Example};
use crate::error::{Error, Result};
use crate::loss::{cross_entropy, flatten_pixels};
use crate::model::ema::{detached_copy, ema_momentum, ema_update};
use crate::model::weights::{save_model_dir, ModelFiles};
use crate::model::{ops, with_prefix, Segformer, Student, TensorMap};
use crate::optim::{AdamW, AdamWConfig, ParamGroup, PolySchedule, StepOutcome};
use crate::SeededRng;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub iters: u64,
    pub batch: usize,
    pub lr: f64,
    pub head_lr_mult: f64,
    pub weight_decay: f64,
    pub warmup: u64,
    pub max_grad_norm: Option<f64>,
    pub ema: f64,
    pub seed: u64,
    pub augment: AugmentConfig,
    pub checkpoint_every: u64,
    pub keep_checkpoints: usize,
    /// Normalisation and the input size written into the model folder.
    pub preprocess: PreprocessConfig,
}

/// Head parameters get the larger learning rate; norms get no weight decay (DAFormer's groups).
pub fn param_group(name: &str, head_lr_mult: f64) -> ParamGroup {
    ParamGroup {
        lr_mult: if name.starts_with("decode_head.") {
            head_lr_mult
        } else {
            1.0
        },
        decay: !name.contains("norm"),
    }
}

/// The student, its EMA teacher and the optimizer: one supervised step at a time.
pub struct Trainer {
    pub student: Student,
    pub teacher: Segformer,
    pub opt: AdamW,
    pub schedule: PolySchedule,
    pub ema: f64,
    pub ignore: u32,
}

#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    pub loss: f32,
    pub lr: f64,
    pub outcome: StepOutcome,
}

impl Trainer {
    pub fn new(cfg: &SegformerConfig, tensors: &TensorMap, tc: &TrainConfig) -> Result<Self> {
        let student = Student::new(cfg, tensors)?;
        let teacher = Segformer::new(cfg, detached_copy(&student.model)?)?;
        let vars = student
            .vars
            .iter()
            .map(|(n, v)| (n.clone(), v.clone(), param_group(n, tc.head_lr_mult)))
            .collect();
        let opt = AdamW::new(
            vars,
            AdamWConfig {
                weight_decay: tc.weight_decay,
                max_grad_norm: tc.max_grad_norm,
                ..Default::default()
            },
        )?;
        let ignore = u32::try_from(cfg.semantic_loss_ignore_index).unwrap_or(255);
        Ok(Self {
            student,
            teacher,
            opt,
            schedule: PolySchedule::new(tc.lr, tc.iters, tc.warmup),
            ema: tc.ema,
            ignore,
        })
    }

    /// Forward, cross-entropy at label resolution, backward, AdamW, EMA.
    /// `images`: [B, 3, H, W]; `labels`: u32 [B * H * W].
    pub fn step(
        &mut self,
        images: &Tensor,
        labels: &Tensor,
        rng: &mut SeededRng,
    ) -> Result<StepStats> {
        crate::model::ops::on_pool(|| self.step_on_pool(images, labels, rng))
    }

    fn step_on_pool(
        &mut self,
        images: &Tensor,
        labels: &Tensor,
        rng: &mut SeededRng,
    ) -> Result<StepStats> {
        let t = self.opt.step_count();
        let (_, _, h, w) = images.dims4()?;
        let out = {
            let _t = crate::profile::scope("step: forward");
            self.student.model.forward(images, Some(rng))?
        };
        let loss = {
            let _t = crate::profile::scope("step: loss");
            let up = ops::resize_bilinear(&out.logits, h, w)?;
            cross_entropy(&flatten_pixels(&up)?, labels, None, self.ignore)?
        };
        let loss_v = loss.to_scalar::<f32>()?;
        let grads = {
            let _t = crate::profile::scope("step: backward");
            self.student.model.backward(&loss)?
        };
        let lr = self.schedule.lr(t);
        let outcome = if loss_v.is_finite() {
            let _t = crate::profile::scope("step: optimizer");
            self.opt.step(&grads, lr)?
        } else {
            StepOutcome::NonFinite
        };
        if matches!(outcome, StepOutcome::Applied { .. }) {
            let _t = crate::profile::scope("step: EMA");
            ema_update(
                &self.teacher,
                &self.student.model,
                ema_momentum(self.ema, t),
            )?;
        }
        Ok(StepStats {
            loss: loss_v,
            lr,
            outcome,
        })
    }

    /// Everything needed to resume: student and teacher weights, optimizer state.
    pub fn state(&self) -> Result<TensorMap> {
        let mut m = crate::model::prefixed(self.student.model.tensors()?, "student.");
        m.extend(crate::model::prefixed(self.teacher.tensors()?, "teacher."));
        m.extend(self.opt.state()?);
        Ok(m)
    }

    pub fn restore(cfg: &SegformerConfig, state: &TensorMap, tc: &TrainConfig) -> Result<Self> {
        let mut tr = Trainer::new(cfg, &with_prefix(state, "student."), tc)?;
        tr.teacher = Segformer::new(cfg, with_prefix(state, "teacher."))?;
        tr.opt.load_state(state)?;
        Ok(tr)
    }
}

/// Trains on `examples`, resuming from `out/checkpoints` when there is one, and writes the
/// student as a HF model folder into `out`. Returns the trainer at the end.
pub fn train(
    cfg: &SegformerConfig,
    init: TensorMap,
    examples: &[Example],
    tc: &TrainConfig,
    out: &PathBuf,
    stop: &AtomicBool,
    progress: &dyn Fn(u64, &StepStats),
) -> Result<Trainer> {
    let dev = Device::Cpu;
    if examples.is_empty() {
        return Err(Error::data(out, "no usable training examples"));
    }
    let ckpts = CheckpointDir::new(out.join("checkpoints"), tc.keep_checkpoints);
    let mut trainer = match ckpts.latest(&dev) {
        Some(ck) => {
            log::info!("resuming from {} (step {})", ck.path.display(), ck.step);
            Trainer::restore(cfg, &ck.tensors, tc)?
        }
        None => Trainer::new(cfg, &init, tc)?,
    };
    let aug = Augmenter {
        cfg: tc.augment,
        ignore: trainer.ignore as u8,
    };
    let meta = || HashMap::from([("kind".to_string(), "segadapt-train".to_string())]);
    while trainer.opt.step_count() < tc.iters {
        let t = trainer.opt.step_count();
        // One RNG per step, derived from (seed, step): a resumed run draws what it would have.
        let mut rng = SeededRng::seed_from_u64(tc.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ t);
        let picks: Vec<&Example> = (0..tc.batch)
            .map(|_| &examples[rng.random_range(0..examples.len())])
            .collect();
        let (x, y) = aug.batch(&picks, &tc.preprocess, &mut rng, &dev)?;
        let stats = trainer.step(&x, &y, &mut rng)?;
        if stats.outcome == StepOutcome::NonFinite {
            log::warn!("step {t}: non-finite loss or gradient, skipped");
            // A skipped step does not advance the optimizer; move on with fresh data.
            trainer.opt.skip_step();
        }
        progress(t + 1, &stats);
        let done = trainer.opt.step_count();
        if (tc.checkpoint_every > 0 && done % tc.checkpoint_every == 0)
            || stop.load(Ordering::Relaxed)
        {
            ckpts.save(done, &trainer.state()?, meta())?;
        }
        if stop.load(Ordering::Relaxed) {
            log::info!("interrupted at step {done}; checkpoint written, run again to resume");
            return Ok(trainer);
        }
    }
    ckpts.save(trainer.opt.step_count(), &trainer.state()?, meta())?;
    save_model_dir(
        out,
        &ModelFiles {
            config: cfg.clone(),
            preprocess: tc.preprocess.clone(),
            tensors: trainer.student.model.tensors()?,
        },
    )?;
    Ok(trainer)
}
