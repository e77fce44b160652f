//! Serving while adapting. The serve loop predicts every frame with the newest published teacher
//! and feeds a bounded ring of recent frames; training samples batches from the ring, either on
//! its own thread (on the vehicle: serving never waits for a step) or, for reproducible
//! experiments, a fixed number of steps after each served frame.

use super::{run, Arrived, PipelineConfig, Summary};
use crate::adapt::step::Adapter;
use crate::adapt::views::views;
use crate::config::PreprocessConfig;
use crate::model::ema::detached_copy;
use crate::model::Segformer;
use crate::source::FrameSource;
use candle_core::Device;
use image::RgbImage;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

#[derive(Debug, Clone)]
pub struct OnlineConfig {
    pub pipeline: PipelineConfig,
    pub batch: usize,
    /// Recent frames kept for training.
    pub ring: usize,
    /// Some(k): k steps after each served frame, on the serving thread (reproducible).
    /// None: a training thread steps whenever the ring has a batch.
    pub steps_per_frame: Option<u32>,
    pub seed: u64,
}

/// The model serving predictions, replaced after every training step.
pub type Published = Arc<RwLock<Arc<Segformer>>>;

fn publish(slot: &Published, adapter: &Adapter) -> crate::Result<()> {
    let m = Segformer::new(&adapter.teacher.cfg, detached_copy(&adapter.teacher)?)?;
    *slot.write().expect("model slot") = Arc::new(m);
    Ok(())
}

fn train_once(
    adapter: &mut Adapter,
    ring: &Mutex<VecDeque<RgbImage>>,
    cfg: &OnlineConfig,
    pre: &PreprocessConfig,
    rng: &mut StdRng,
) -> crate::Result<bool> {
    let batch: Vec<RgbImage> = {
        let r = ring.lock().expect("ring");
        if r.len() < cfg.batch {
            return Ok(false);
        }
        (0..cfg.batch)
            .map(|_| r[rng.random_range(0..r.len())].clone())
            .collect()
    };
    let refs: Vec<&RgbImage> = batch.iter().collect();
    let (weak, strong) = views(&refs, pre, rng, &Device::Cpu)?;
    let rep = adapter.step(&weak, &strong, rng)?;
    if rep.outcome == Some(crate::optim::StepOutcome::NonFinite) {
        log::warn!(
            "adaptation step {}: non-finite loss or gradient, skipped",
            adapter.step
        );
    }
    Ok(true)
}

/// Runs `source` through serving and adaptation. `serve` gets each frame and the model to use;
/// `after_step` is called with the step count and the published model after every step.
pub fn run_online(
    source: Box<dyn FrameSource>,
    mut adapter: Adapter,
    pre: &PreprocessConfig,
    cfg: &OnlineConfig,
    stop: Arc<AtomicBool>,
    mut serve: impl FnMut(&Arrived, &Segformer) -> crate::Result<()>,
    mut after_step: impl FnMut(u64, &Segformer) -> crate::Result<()> + Send,
) -> crate::Result<(Summary, Adapter)> {
    let slot: Published = Arc::new(RwLock::new(Arc::new(Segformer::new(
        &adapter.teacher.cfg,
        detached_copy(&adapter.teacher)?,
    )?)));
    let ring = Arc::new(Mutex::new(VecDeque::with_capacity(cfg.ring)));
    let push = |img: &RgbImage| {
        let mut r = ring.lock().expect("ring");
        if r.len() == cfg.ring.max(1) {
            r.pop_front();
        }
        r.push_back(img.clone());
    };
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    if let Some(k) = cfg.steps_per_frame {
        let summary = run(source, &cfg.pipeline, stop, |item| -> crate::Result<()> {
            let model = slot.read().expect("model slot").clone();
            serve(item, &model)?;
            push(&item.frame.image);
            for _ in 0..k {
                if train_once(&mut adapter, &ring, cfg, pre, &mut rng)? {
                    publish(&slot, &adapter)?;
                    after_step(adapter.step, &slot.read().expect("model slot"))?;
                }
            }
            Ok(())
        })?;
        let mut summary = summary;
        summary.train_steps = adapter.step;
        return Ok((summary, adapter));
    }
    let done = Arc::new(AtomicBool::new(false));
    let steps = Arc::new(AtomicU64::new(0));
    let result = std::thread::scope(|s| -> crate::Result<(Summary, Adapter)> {
        let trainer = {
            let (ring, slot, done, steps) =
                (ring.clone(), slot.clone(), done.clone(), steps.clone());
            let cfg = cfg.clone();
            s.spawn(move || -> crate::Result<Adapter> {
                while !done.load(Ordering::Relaxed) {
                    if train_once(&mut adapter, &ring, &cfg, pre, &mut rng)? {
                        publish(&slot, &adapter)?;
                        steps.store(adapter.step, Ordering::Relaxed);
                        after_step(adapter.step, &slot.read().expect("model slot"))?;
                    } else {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                }
                Ok(adapter)
            })
        };
        let summary = run(source, &cfg.pipeline, stop, |item| -> crate::Result<()> {
            let model = slot.read().expect("model slot").clone();
            serve(item, &model)?;
            push(&item.frame.image);
            Ok(())
        });
        done.store(true, Ordering::Relaxed);
        let adapter = trainer
            .join()
            .map_err(|_| crate::Error::Invalid("training thread panicked".into()))??;
        let mut summary = summary?;
        summary.train_steps = steps.load(Ordering::Relaxed);
        Ok((summary, adapter))
    });
    result
}
