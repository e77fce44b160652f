//! `segadapt bench`: medians and spread of inference, a supervised training step and the EMA
//! update for a SegFormer config on random input, with the heap peak of each.

use crate::budget;
use crate::config::SegformerConfig;
use crate::error::Result;
use crate::model::ema::{detached_copy, ema_update};
use crate::model::{init_tensors, Segformer};
use crate::train::{TrainConfig, Trainer};
use crate::SeededRng;
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct BenchSpec {
    pub config: String,
    pub width: usize,
    pub height: usize,
    pub batch: usize,
    pub classes: usize,
    pub warmup: usize,
    pub reps: usize,
    /// Also profile the training step by phase, model part and kernel.
    pub ops: bool,
    /// The adaptation steps' settings (None: every component on, all weights training). The
    /// rows vary its training scope and recomputation.
    pub adapt: Option<crate::adapt::AdaptConfig>,
    /// Where everything runs. The heap peaks count host memory only.
    pub device: Device,
}

/// One row of the per-op profile: milliseconds and calls per training step.
#[derive(Debug, Clone, Serialize)]
pub struct OpTime {
    pub name: String,
    pub ms_per_step: f64,
    pub calls_per_step: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    /// Live-heap peak during the timed runs, MB.
    pub peak_mb: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub config: String,
    pub size: String,
    pub batch: usize,
    pub threads: usize,
    pub infer: Timing,
    pub train_step: Timing,
    /// One adaptation step (batch as given) with every component on or the profile's, every
    /// weight training.
    pub adapt_step: Timing,
    /// The same with only the norm layers' affine parameters training.
    pub adapt_step_norm: Timing,
    /// Every weight training, the encoder blocks recomputed in the backward pass.
    pub adapt_step_recompute: Timing,
    pub ema: Timing,
    /// Handing serving a copy of the teacher after a training step, and after an idle step
    /// that moved only the decode head's statistics (the served weights shared).
    pub handover: Timing,
    pub handover_statistics: Timing,
    /// The teacher's labelling forward (batch 1), its decode-head statistics following the
    /// batch's as they are, and under the source's class shares (`adapt.statistics`).
    pub track: Timing,
    pub track_by_class: Timing,
    /// The same led part of the way from the source's statistics (away from the source).
    pub track_anchored: Timing,
    /// Process peak RSS after the inference runs and after the training runs, MB.
    pub infer_peak_rss_mb: f64,
    pub train_peak_rss_mb: f64,
    /// `--ops`: where a training step's time goes, and an adaptation step's (all weights).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ops: Vec<OpTime>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub adapt_ops: Vec<OpTime>,
}

fn rss_mb() -> f64 {
    budget::peak_rss_bytes().unwrap_or(0) as f64 / 1e6
}

fn time(spec: &BenchSpec, f: impl FnMut() -> Result<()>) -> Result<Timing> {
    timing(spec.warmup, spec.reps, f)
}

/// `f` run `warmup` times untimed, then `reps` times timed: median, min, max and the heap peak
/// over the timed runs (zero unless the binary counts allocations, see [`budget::CountingAlloc`]).
pub fn timing(warmup: usize, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<Timing> {
    for _ in 0..warmup {
        f()?;
    }
    budget::reset_peak();
    let mut ms = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    Ok(Timing {
        median_ms: ms[ms.len() / 2],
        min_ms: ms[0],
        max_ms: ms[ms.len() - 1],
        peak_mb: budget::peak_bytes() as f64 / 1e6,
    })
}

pub fn run(spec: &BenchSpec) -> Result<BenchReport> {
    let dev = spec.device.clone();
    let classes: Vec<String> = (0..spec.classes).map(|i| format!("c{i}")).collect();
    let cfg = SegformerConfig::preset(&spec.config, &classes, 255)?;
    let tensors = init_tensors(&cfg, &dev, 0)?;
    let mut rng = SeededRng::seed_from_u64(0);

    let infer = {
        let model = Segformer::new(&cfg, tensors.clone())?;
        let x = Tensor::randn(0f32, 1.0, (1, 3, spec.height, spec.width), &dev)?;
        time(spec, || {
            let out = model.forward(&x, None)?;
            out.logits.argmax(3)?;
            Ok(())
        })?
    };
    let infer_peak_rss_mb = rss_mb();

    let tc = TrainConfig {
        iters: 1000,
        batch: spec.batch,
        lr: 6e-5,
        head_lr_mult: 10.0,
        weight_decay: 0.01,
        warmup: 0,
        max_grad_norm: None,
        ema: 0.999,
        seed: 0,
        augment: crate::data::AugmentConfig {
            base: (spec.width as u32, spec.height as u32),
            ratio_range: (1.0, 1.0),
            crop: (spec.width as u32, spec.height as u32),
            cat_max_ratio: 1.0,
            flip_prob: 0.0,
            photometric: false,
        },
        checkpoint_every: 0,
        keep_checkpoints: 1,
        preprocess: crate::config::PreprocessConfig::with_size(Some((spec.width, spec.height))),
    };
    let mut trainer = Trainer::new(&cfg, &tensors, &tc)?;
    let x = Tensor::randn(0f32, 1.0, (spec.batch, 3, spec.height, spec.width), &dev)?;
    let y = Tensor::rand(
        0f32,
        spec.classes as f32,
        spec.batch * spec.height * spec.width,
        &dev,
    )?
    .floor()?
    .to_dtype(DType::U32)?;
    let train_step = time(spec, || {
        trainer.step(&x, &y, &mut rng)?;
        Ok(())
    })?;
    let train_peak_rss_mb = rss_mb();
    let ops = if spec.ops {
        profile_steps(spec.reps, || trainer.step(&x, &y, &mut rng).map(|_| ()))?
    } else {
        Vec::new()
    };
    let ema = time(spec, || {
        Ok(ema_update(&trainer.teacher, &trainer.student.model, 0.999)?)
    })?;
    let mut served = Segformer::new(&cfg, detached_copy(&trainer.teacher)?)?;
    let handover = time(spec, || {
        served = Segformer::new(&cfg, detached_copy(&trainer.teacher)?)?;
        Ok(())
    })?;
    let handover_statistics = time(spec, || {
        served = served.with_statistics_of(&trainer.teacher)?;
        Ok(())
    })?;
    // The adaptation step's peak is its own: models, optimizer, state and activations.
    drop((trainer, served));
    // Source statistics from the random model on one random labelled frame.
    let img = image::RgbImage::from_fn(spec.width as u32, spec.height as u32, |x, y| {
        image::Rgb([(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8])
    });
    let label: Vec<u8> = (0..spec.width * spec.height)
        .map(|i| (i % spec.classes) as u8)
        .collect();
    let ex = crate::data::Example {
        name: "bench".into(),
        image: img,
        label: Some(label),
    };
    let source = Segformer::new(&cfg, tensors.clone())?;
    let stats =
        crate::stats::SourceStats::compute(&source, &tc.preprocess, &[ex], 255)?.to_device(&dev)?;
    let (track, track_by_class, track_anchored) = {
        use crate::model::Tracking;
        // Its own copy: tracking moves the statistics in place.
        let teacher = Segformer::new(&cfg, detached_copy(&source)?)?;
        let x1 = x.narrow(0, 0, 1)?;
        let timed = |track| {
            time(spec, || {
                Ok(teacher.forward_tracking(&x1, track).map(|_| ())?)
            })
        };
        let norm = stats
            .norm
            .as_ref()
            .expect("computed with the class statistics");
        let [mean, var, _] = crate::model::TRACKED_STATISTICS;
        let anchored = Tracking::Anchored {
            share: 0.5,
            source: (&tensors[mean], &tensors[var]),
            norm: Some(norm),
        };
        (
            timed(Tracking::Batch)?,
            timed(Tracking::ByClass(norm))?,
            timed(anchored)?,
        )
    };
    use crate::adapt::config::TrainScope;
    use crate::model::Recompute;
    let adapter =
        |train: TrainScope, recompute: Recompute| -> Result<crate::adapt::step::Adapter> {
            let mut full = crate::adapt::AdaptConfig {
                train,
                recompute,
                ..spec.adapt.clone().unwrap_or_default()
            };
            // A collapse would skip the step's work and flatter the figure.
            full.guard.collapse = false;
            Ok(crate::adapt::step::Adapter::new(
                full,
                &cfg,
                &tensors,
                stats.clone(),
            )?)
        };
    let strong = (&x * 0.9)?;
    let adapt_step = |train: TrainScope, recompute: Recompute| -> Result<Timing> {
        let mut adapter = adapter(train, recompute)?;
        let mut rng = SeededRng::seed_from_u64(1);
        time(spec, || {
            Ok(adapter.step(&x, &strong, &mut rng).map(|_| ())?)
        })
    };
    let adapt_step_norm = adapt_step(TrainScope::Norm, Recompute::None)?;
    let adapt_step_recompute = adapt_step(TrainScope::All, Recompute::Blocks)?;
    let adapt_step = adapt_step(TrainScope::All, Recompute::None)?;
    let adapt_ops = if spec.ops {
        let mut adapter = adapter(TrainScope::All, Recompute::None)?;
        let mut rng = SeededRng::seed_from_u64(1);
        adapter.step(&x, &strong, &mut rng)?; // warm-up
        profile_steps(spec.reps, || {
            Ok(adapter.step(&x, &strong, &mut rng).map(|_| ())?)
        })?
    } else {
        Vec::new()
    };
    Ok(BenchReport {
        config: spec.config.clone(),
        size: format!("{}x{}", spec.width, spec.height),
        batch: spec.batch,
        threads: rayon::current_num_threads(),
        infer,
        train_step,
        adapt_step,
        adapt_step_norm,
        adapt_step_recompute,
        ema,
        handover,
        handover_statistics,
        track,
        track_by_class,
        track_anchored,
        infer_peak_rss_mb,
        train_peak_rss_mb,
        ops,
        adapt_ops,
    })
}

/// Runs `step` `reps` times with the profiler on: per-step time of every named scope.
fn profile_steps(reps: usize, mut step: impl FnMut() -> Result<()>) -> Result<Vec<OpTime>> {
    crate::profile::enable(true);
    let run = (0..reps).try_for_each(|_| step());
    crate::profile::enable(false);
    run?;
    let n = reps.max(1) as f64;
    Ok(crate::profile::take()
        .into_iter()
        .map(|(name, ms, calls)| OpTime {
            name: name.to_string(),
            ms_per_step: ms / n,
            calls_per_step: calls as f64 / n,
        })
        .collect())
}
