//! Serving while adapting. The serve loop predicts every frame with the newest published teacher
//! and feeds a bounded ring of recent frames; training samples batches from the ring, either on
//! its own thread (on the vehicle: serving never waits for a step) or, for reproducible
//! experiments, a fixed number of steps after each served frame.
//!
//! On its own thread, training runs on a worker pool of its own whose threads (and the trainer
//! itself) the scheduler ranks below everything else (Linux `SCHED_IDLE`, else the lowest nice
//! level): serving keeps the cores whenever it has a frame, and training takes what is left,
//! at most one step per `every` served frames. The trainer publishes each new teacher by
//! swapping an `Arc` (the copy is made on the trainer's side), so serving never reads a model
//! half-updated and never copies one.

use super::resume::{fast_forward, Position};
use super::{run, Arrived, PipelineConfig, Summary};
use crate::adapt::step::{Adapter, StepReport};
use crate::adapt::views::views;
use crate::checkpoint::CheckpointDir;
use crate::config::PreprocessConfig;
use crate::model::ema::detached_copy;
use crate::model::Segformer;
use crate::source::FrameSource;
use crate::SeededRng;
use candle_core::Device;
use image::RgbImage;
use rand::{Rng, SeedableRng};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

#[derive(Debug, Clone)]
pub struct OnlineConfig {
    pub pipeline: PipelineConfig,
    pub batch: usize,
    /// Training crop (width, height) of the resized frame; None: the whole frame.
    pub crop: Option<(usize, usize)>,
    /// Recent frames kept for training.
    pub ring: usize,
    /// Some(k): k steps after every `every`-th served frame, on the serving thread
    /// (reproducible). None: a training thread below serving's priority steps whenever the
    /// ring has a batch, at most once per `every` served frames (0: no limit).
    pub steps_per_frame: Option<u32>,
    pub every: u32,
    /// Worker threads of the training pool (0: as many as the machine has cores).
    pub train_threads: usize,
    pub seed: u64,
    /// Save the adaptation state here every `checkpoint_every` steps; a collapse rolls back to
    /// the newest one (the caller saves the starting state when the folder has none).
    pub checkpoints: Option<Arc<CheckpointDir>>,
    pub checkpoint_every: u64,
    /// Where a resumed run continues: a replayed source skips the frames served before (the
    /// last `ring` of them refill the ring) and the random stream goes on from where it was.
    pub start: Option<Position>,
    /// A step waits while live heap bytes plus its measured activation peak would pass this.
    pub step_budget: Option<StepBudget>,
    /// The served model's precision (the teacher and the student stay f32).
    pub serve_dtype: candle_core::DType,
}

#[derive(Debug, Clone, Copy)]
pub struct StepBudget {
    pub limit_bytes: usize,
    pub activation_bytes: usize,
}

/// What training did beside serving, for the run's summary.
#[derive(Debug, Default)]
struct Counters {
    /// Skipped steps, rollbacks, budget waits and the last step's figures: the run's live
    /// metrics, or counters of its own without `--metrics`.
    live: Arc<super::metrics::Metrics>,
    /// Wall time spent inside training steps (views, step, publishing), in microseconds.
    busy_us: AtomicU64,
    step_ms: Mutex<Vec<f64>>,
    /// Per loss term: sum of absolute values and steps seen.
    terms: Mutex<Vec<(&'static str, f64, u64)>>,
}

impl Counters {
    fn add_terms(&self, terms: &[(&'static str, f32)]) {
        let mut all = self.terms.lock().expect("loss terms");
        for &(name, v) in terms {
            match all.iter_mut().find(|(n, _, _)| *n == name) {
                Some(t) => {
                    t.1 += v.abs() as f64;
                    t.2 += 1;
                }
                None => all.push((name, v.abs() as f64, 1)),
            }
        }
    }

    fn mean_terms(&self) -> Vec<(String, f64)> {
        let all = self.terms.lock().expect("loss terms");
        all.iter()
            .map(|(n, s, k)| (n.to_string(), s / (*k).max(1) as f64))
            .collect()
    }
}

/// What a run leaves: its summary, the adapter as training left it, and where the run was.
pub struct Ended {
    pub summary: Summary,
    pub adapter: Adapter,
    pub at: Position,
}

/// The model serving predictions, replaced after every training step.
pub type Published = Arc<RwLock<Arc<Segformer>>>;

fn publish(slot: &Published, adapter: &Adapter, dtype: candle_core::DType) -> crate::Result<()> {
    *slot.write().expect("model slot") = Arc::new(served_copy(adapter, dtype)?);
    Ok(())
}

/// Hands serving the teacher's tracked statistics on the weights it already serves: an idle
/// step moved nothing else, and copying every weight on every idle frame of a long drive
/// would cost the training thread more than the statistics' forward.
fn publish_statistics(slot: &Published, adapter: &Adapter) -> crate::Result<()> {
    let served = slot.read().expect("model slot").clone();
    let next = served.with_statistics_of(&adapter.teacher)?;
    *slot.write().expect("model slot") = Arc::new(next);
    Ok(())
}

/// Publishes what `trained` changed.
fn hand_over(
    slot: &Published,
    adapter: &Adapter,
    dtype: candle_core::DType,
    trained: &Trained,
) -> crate::Result<()> {
    match trained {
        Trained::Nothing => Ok(()),
        Trained::Statistics => publish_statistics(slot, adapter),
        Trained::Recalled | Trained::Step(_) => publish(slot, adapter, dtype),
    }
}

/// A copy of the teacher to serve from, in `dtype`.
fn served_copy(adapter: &Adapter, dtype: candle_core::DType) -> crate::Result<Segformer> {
    let m = match dtype {
        candle_core::DType::F32 => {
            Segformer::new(&adapter.teacher.cfg, detached_copy(&adapter.teacher)?)?
        }
        _ => adapter.teacher.to_dtype(dtype)?,
    };
    Ok(m)
}

/// Saves the adaptation state with the run's position when a checkpoint is due (the step count
/// has passed a multiple of `checkpoint_every` since `last`). A checkpoint that cannot be
/// written (disk full, read-only folder) is reported and counted, and serving goes on: the
/// newest written checkpoint stays what a restart or a rollback uses.
fn checkpoint(
    adapter: &Adapter,
    cfg: &OnlineConfig,
    last: &mut u64,
    at: impl FnOnce() -> Position,
    live: &super::metrics::Metrics,
) -> crate::Result<()> {
    let (Some(dir), every) = (&cfg.checkpoints, cfg.checkpoint_every) else {
        return Ok(());
    };
    if every == 0 || adapter.step / every == *last / every {
        return Ok(());
    }
    *last = adapter.step;
    if let Err(e) = dir.save(adapter.step, &adapter.state()?, at().meta()) {
        let n = live.checkpoint_failures.fetch_add(1, Ordering::Relaxed) + 1;
        log::error!(
            "step {}: checkpoint not written ({n} so far): {e}; adaptation goes on, the newest written checkpoint is kept",
            adapter.step
        );
    }
    Ok(())
}

/// What a call of [`train_once`] changed in the teacher.
enum Trained {
    /// No batch yet, or memory is short: nothing ran.
    Nothing,
    /// No training budget left: only the teacher's BatchNorm statistics followed the frames.
    Statistics,
    /// No training budget left, but a recalled condition's weights replaced the teacher's.
    Recalled,
    /// A step ran, or was rolled back.
    Step(StepReport),
}

/// The recent frames training samples from, and which of them the shift test has not seen.
#[derive(Default)]
struct Ring {
    frames: VecDeque<RgbImage>,
    entered: u64,
    shown: u64,
}

impl Ring {
    fn push(&mut self, img: &RgbImage, capacity: usize) {
        if self.frames.len() == capacity.max(1) {
            self.frames.pop_front();
        }
        self.frames.push_back(img.clone());
        self.entered += 1;
    }

    /// The frames that entered since the last call, oldest first (as many as are still held).
    fn unshown(&mut self) -> Vec<RgbImage> {
        let new = (self.entered - self.shown).min(self.frames.len() as u64) as usize;
        self.shown = self.entered;
        self.frames
            .iter()
            .skip(self.frames.len() - new)
            .cloned()
            .collect()
    }
}

/// One training step if the ring holds a batch and memory allows; the frames that entered the
/// ring since the last step go to the adapter's shift test first.
fn train_once(
    adapter: &mut Adapter,
    ring: &Mutex<Ring>,
    cfg: &OnlineConfig,
    pre: &PreprocessConfig,
    rng: &mut SeededRng,
    counters: &Counters,
) -> crate::Result<Trained> {
    if let Some(b) = cfg.step_budget {
        if crate::budget::current_bytes() + b.activation_bytes > b.limit_bytes {
            counters.live.budget_waits.fetch_add(1, Ordering::Relaxed);
            return Ok(Trained::Nothing);
        }
    }
    let (batch, fresh): (Vec<RgbImage>, Vec<RgbImage>) = {
        let mut r = ring.lock().expect("ring");
        if r.frames.len() < cfg.batch {
            return Ok(Trained::Nothing);
        }
        let fresh = match adapter.has_budgets() {
            true => r.unshown(),
            false => Vec::new(),
        };
        let batch = (0..cfg.batch)
            .map(|_| r.frames[rng.random_range(0..r.frames.len())].clone())
            .collect();
        (batch, fresh)
    };
    let dev = adapter.teacher.device().clone();
    let mut recalled = false;
    for f in &fresh {
        recalled |= adapter.observe(&crate::data::image_to_tensor(f, pre, &dev)?)?;
    }
    let refs: Vec<&RgbImage> = batch.iter().collect();
    let (weak, strong) = views(&refs, pre, cfg.crop, rng, &dev)?;
    let t0 = std::time::Instant::now();
    let rep = adapter.train(&weak, &strong, rng)?;
    if rep.idle {
        return Ok(match recalled {
            true => Trained::Recalled,
            false => Trained::Statistics,
        });
    }
    // Steps that trained only: an idle one (no budget left) costs one forward.
    counters
        .step_ms
        .lock()
        .expect("step times")
        .push(t0.elapsed().as_secs_f64() * 1e3);
    if rep.collapsed {
        counters.live.rollbacks.fetch_add(1, Ordering::Relaxed);
        // Back past the guard's warm-up: the newest checkpoint may already hold the drift.
        let margin = adapter.cfg.guard.warmup;
        let ck = cfg
            .checkpoints
            .as_ref()
            .and_then(|d| d.latest_at_or_before(adapter.step.saturating_sub(margin), &Device::Cpu));
        match ck {
            Some(ck) => {
                log::warn!(
                    "step {}: predictions left their running band; rolling back to {}",
                    adapter.step,
                    ck.path.display()
                );
                adapter.rollback(&ck.tensors)?;
            }
            None => log::warn!(
                "step {}: predictions left their running band; no checkpoint to roll back to, step skipped",
                adapter.step
            ),
        }
        return Ok(Trained::Step(rep));
    }
    if rep.outcome == Some(crate::optim::StepOutcome::NonFinite) {
        counters.live.steps_skipped.fetch_add(1, Ordering::Relaxed);
        log::warn!(
            "adaptation step {}: non-finite loss or gradient, skipped",
            adapter.step
        );
        return Ok(Trained::Nothing);
    }
    counters.add_terms(&rep.terms);
    counters.live.stepped(rep.kept, rep.confidence);
    Ok(Trained::Step(rep))
}

/// The training thread's worker pool, its threads below serving's priority.
fn training_pool(threads: usize) -> crate::Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("train-{i}"))
        .start_handler(|_| lower_priority())
        .build()
        .map_err(|e| crate::Error::Invalid(format!("training thread pool: {e}")))
}

/// Ranks the calling thread below every normal one: Linux's `SCHED_IDLE` runs it only on cores
/// nothing else wants; where that is refused, the lowest nice level.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: plain system calls on the calling thread (pid 0), with a valid parameter.
        let ok = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } == 0;
        if !ok {
            // SAFETY: as above; on Linux PRIO_PROCESS with 0 names the calling thread.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
        }
    }
    #[cfg(all(unix, not(target_os = "linux")))]
    // SAFETY: a plain system call on the calling process.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
    }
}

/// Runs `source` through serving and adaptation. `serve` gets the count of frames served before
/// (a resumed drive's included), each frame and the model to use;
/// `after_step` is called with the step count, the step's report and the published model
/// after every step.
pub fn run_online(
    mut source: Box<dyn FrameSource>,
    mut adapter: Adapter,
    pre: &PreprocessConfig,
    cfg: &OnlineConfig,
    stop: Arc<AtomicBool>,
    mut serve: impl FnMut(u64, &Arrived, &Segformer) -> crate::Result<()>,
    mut after_step: impl FnMut(u64, &StepReport, &Segformer) -> crate::Result<()> + Send,
) -> crate::Result<Ended> {
    let slot: Published = Arc::new(RwLock::new(Arc::new(served_copy(
        &adapter,
        cfg.serve_dtype,
    )?)));
    let ring = Arc::new(Mutex::new(Ring::default()));
    let counters = Counters {
        live: cfg.pipeline.metrics.clone().unwrap_or_default(),
        ..Default::default()
    };
    // A frame without content is served but never trained on (see `data::has_content`);
    // false when `img` was kept out.
    let enter = |img: &RgbImage| {
        if !crate::data::has_content(img) {
            return false;
        }
        ring.lock().expect("ring").push(img, cfg.ring);
        true
    };
    // A served frame; the frames a resume refills the ring with were counted when served.
    let push = |img: &RgbImage| {
        if !enter(img) {
            counters.live.frames_blank.fetch_add(1, Ordering::Relaxed);
        }
    };
    let mut rng = match &cfg.start {
        Some(p) => p.rng(),
        None => SeededRng::seed_from_u64(cfg.seed),
    };
    let first = match (&cfg.start, source.replayable()) {
        (Some(p), true) => {
            let passed = fast_forward(&mut *source, p.frames, cfg.ring, |img| {
                enter(img);
            });
            log::info!(
                "resuming the drive after frame {passed} of {}",
                source.spec()
            );
            passed
        }
        _ => 0,
    };
    {
        // The frames a resume refilled the ring with were shown to the shift test before.
        let mut r = ring.lock().expect("ring");
        r.shown = r.entered;
    }
    let fill = |mut s: Summary, steps: u64| {
        s.train_steps = steps;
        let live = &counters.live;
        s.steps_skipped = live.steps_skipped.load(Ordering::Relaxed);
        s.frames_blank = live.frames_blank.load(Ordering::Relaxed);
        s.rollbacks = live.rollbacks.load(Ordering::Relaxed);
        s.budget_waits = live.budget_waits.load(Ordering::Relaxed);
        s.checkpoint_failures = live.checkpoint_failures.load(Ordering::Relaxed);
        let mut t = counters.step_ms.lock().expect("step times").clone();
        t.sort_by(|a, b| a.total_cmp(b));
        s.step_ms_p50 = super::percentile(&t, 0.5);
        s.train_steps_per_s = steps as f64 / s.wall_s.max(1e-9);
        s.loss_terms = counters.mean_terms();
        s
    };
    let mut saved = adapter.step;
    if let Some(k) = cfg.steps_per_frame {
        let mut served = first;
        let summary = run(source, &cfg.pipeline, stop, |item| -> crate::Result<()> {
            let model = slot.read().expect("model slot").clone();
            serve(served, item, &model)?;
            push(&item.frame.image);
            served += 1;
            if served % cfg.every.max(1) as u64 != 0 {
                return Ok(());
            }
            for _ in 0..k {
                let trained = train_once(&mut adapter, &ring, cfg, pre, &mut rng, &counters)?;
                hand_over(&slot, &adapter, cfg.serve_dtype, &trained)?;
                if let Trained::Step(rep) = trained {
                    after_step(adapter.step, &rep, &slot.read().expect("model slot"))?;
                }
            }
            // At a frame's end, so a resumed run continues with the next frame.
            let at = || Position::new(served, &rng);
            checkpoint(&adapter, cfg, &mut saved, at, &counters.live)
        })?;
        let steps = adapter.step;
        let at = Position::new(first + summary.frames_served, &rng);
        return Ok(Ended {
            summary: fill(summary, steps),
            adapter,
            at,
        });
    }
    let done = Arc::new(AtomicBool::new(false));
    let steps = Arc::new(AtomicU64::new(0));
    let served = Arc::new(AtomicU64::new(first));
    let serve_us = AtomicU64::new(0);
    let result = std::thread::scope(|s| -> crate::Result<Ended> {
        let trainer = {
            let (ring, slot, done, steps, served, counters) = (
                ring.clone(),
                slot.clone(),
                done.clone(),
                steps.clone(),
                served.clone(),
                &counters,
            );
            let cfg = cfg.clone();
            s.spawn(move || -> crate::Result<(Adapter, SeededRng)> {
                lower_priority();
                let pool = training_pool(cfg.train_threads)?;
                let mut last = 0u64;
                while !done.load(Ordering::Relaxed) {
                    let now = served.load(Ordering::Relaxed);
                    if now < last + cfg.every as u64 {
                        std::thread::sleep(std::time::Duration::from_millis(2));
                        continue;
                    }
                    let t0 = std::time::Instant::now();
                    let moved = pool.install(|| {
                        train_once(&mut adapter, &ring, &cfg, pre, &mut rng, counters)
                    })?;
                    hand_over(&slot, &adapter, cfg.serve_dtype, &moved)?;
                    match moved {
                        Trained::Nothing => {
                            std::thread::sleep(std::time::Duration::from_millis(5));
                            continue;
                        }
                        Trained::Statistics | Trained::Recalled => {}
                        Trained::Step(rep) => {
                            steps.store(adapter.step, Ordering::Relaxed);
                            after_step(adapter.step, &rep, &slot.read().expect("model slot"))?;
                            let at = || Position::new(served.load(Ordering::Relaxed), &rng);
                            checkpoint(&adapter, &cfg, &mut saved, at, &counters.live)?;
                        }
                    }
                    last = now;
                    let us = t0.elapsed().as_micros() as u64;
                    counters.busy_us.fetch_add(us, Ordering::Relaxed);
                }
                Ok((adapter, rng))
            })
        };
        let summary = run(source, &cfg.pipeline, stop, |item| -> crate::Result<()> {
            let t0 = std::time::Instant::now();
            let model = slot.read().expect("model slot").clone();
            // Only this thread counts served frames: the load is exact.
            serve(served.load(Ordering::Relaxed), item, &model)?;
            push(&item.frame.image);
            served.fetch_add(1, Ordering::Relaxed);
            serve_us.fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
            Ok(())
        });
        done.store(true, Ordering::Relaxed);
        let (adapter, rng) = trainer
            .join()
            .map_err(|_| crate::Error::Invalid("training thread panicked".into()))??;
        let mut summary = fill(summary?, steps.load(Ordering::Relaxed));
        let wall_us = (summary.wall_s * 1e6).max(1.0);
        summary.serve_busy = serve_us.load(Ordering::Relaxed) as f64 / wall_us;
        summary.train_busy = counters.busy_us.load(Ordering::Relaxed) as f64 / wall_us;
        let at = Position::new(served.load(Ordering::Relaxed), &rng);
        Ok(Ended {
            summary,
            adapter,
            at,
        })
    });
    result
}
