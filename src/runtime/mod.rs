//! The running pipeline: a capture thread and the serving loop joined by a bounded channel.
//! In real time the camera never waits: when serving falls behind, the oldest queued frame is
//! dropped and counted. Replaying as fast as possible, capture waits instead (nothing dropped).

pub mod bootstrap;
pub mod metrics;
pub mod online;
pub mod resume;
pub mod session;

use crate::source::{Frame, FrameSource, SourceError};
use crossbeam::channel::{bounded, TrySendError};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Pace frames by their timestamps and drop the oldest when serving lags.
    pub realtime: bool,
    /// Frames waiting between capture and serving.
    pub queue: usize,
    /// Live figures for monitoring (`--metrics`), updated as frames go: one run's, as the
    /// summary's counts are read from them.
    pub metrics: Option<Arc<metrics::Metrics>>,
}

/// What a run did, as `replay --json` prints it.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Summary {
    pub frames_in: u64,
    pub frames_served: u64,
    pub frames_dropped: u64,
    /// Frames the source could not deliver (corrupt, wrong size), reported and skipped.
    pub frame_errors: u64,
    /// Frames without content (uniform), served but kept out of training.
    pub frames_blank: u64,
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    pub latency_ms_max: f64,
    pub train_steps: u64,
    /// Training steps per second of wall time.
    pub train_steps_per_s: f64,
    /// Shares of the wall time the serving loop spent serving and the training thread spent
    /// in steps (0 where training runs after frames on the serving thread).
    pub serve_busy: f64,
    pub train_busy: f64,
    /// Median wall time of one adaptation step (views, step, bookkeeping).
    pub step_ms_p50: f64,
    /// Steps skipped for a non-finite loss or gradient.
    pub steps_skipped: u64,
    /// Collapses caught by the monitor (each rolled back to the newest checkpoint).
    pub rollbacks: u64,
    /// Times a step waited because memory would have passed the budget.
    pub budget_waits: u64,
    /// Checkpoints that could not be written (the newest written one was kept).
    pub checkpoint_failures: u64,
    /// Each loss term's mean absolute value over the steps taken, in pipeline order: a term
    /// that stays constant or at zero does nothing.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub loss_terms: Vec<(String, f64)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub miou: Option<f64>,
    /// Damage found in the recording (truncation, corrupt records).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub damage: Vec<String>,
    pub wall_s: f64,
}

/// A frame with the moment it entered the pipeline, for latency.
pub struct Arrived {
    pub frame: Frame,
    pub at: Instant,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// Runs `source` through `serve` until the source ends or `stop` is raised; `serve` is called
/// once per served frame. Returns the summary (serve's own errors end the run).
pub fn run<E>(
    mut source: Box<dyn FrameSource>,
    cfg: &PipelineConfig,
    stop: Arc<AtomicBool>,
    mut serve: impl FnMut(&Arrived) -> Result<(), E>,
) -> Result<Summary, E> {
    let start = Instant::now();
    let (tx, rx) = bounded::<Arrived>(cfg.queue.max(1));
    // Only real-time capture drains the queue itself; a spare receiver would keep a blocked
    // send alive after serving stops.
    let oldest = cfg.realtime.then(|| rx.clone());
    // The run's counters; without `--metrics` nobody else reads them.
    let live = cfg.metrics.clone().unwrap_or_default();
    let (counts, st) = (live.clone(), stop.clone());
    let realtime = cfg.realtime;
    let capture = std::thread::Builder::new()
        .name("capture".into())
        .spawn(move || {
            let mut clock: Option<(u64, Instant)> = None;
            while !st.load(Ordering::Relaxed) {
                let frame = match source.next_frame() {
                    None => break,
                    Some(Ok(f)) => f,
                    Some(Err(e)) => {
                        log::error!("{e}");
                        counts.frame_errors.fetch_add(1, Ordering::Relaxed);
                        if matches!(e, SourceError::Fatal { .. }) {
                            break;
                        }
                        continue;
                    }
                };
                counts.frames_in.fetch_add(1, Ordering::Relaxed);
                if realtime {
                    let (t0, i0) = *clock.get_or_insert((frame.timestamp_ns, Instant::now()));
                    let due = i0 + Duration::from_nanos(frame.timestamp_ns.saturating_sub(t0));
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                }
                let mut item = Arrived {
                    frame,
                    at: Instant::now(),
                };
                if let Some(oldest) = &oldest {
                    loop {
                        match tx.try_send(item) {
                            Ok(()) => break,
                            Err(TrySendError::Full(back)) => {
                                if oldest.try_recv().is_ok() {
                                    counts.frames_dropped.fetch_add(1, Ordering::Relaxed);
                                }
                                item = back;
                            }
                            Err(TrySendError::Disconnected(_)) => return source.damage(),
                        }
                    }
                } else if tx.send(item).is_err() {
                    break;
                }
            }
            source.damage()
        })
        .expect("spawn capture thread");

    let mut latencies = Vec::new();
    let mut result = Ok(());
    for item in rx.iter() {
        if let Err(e) = serve(&item) {
            result = Err(e);
            stop.store(true, Ordering::Relaxed);
            break;
        }
        let ms = item.at.elapsed().as_secs_f64() * 1e3;
        live.served(ms);
        latencies.push(ms);
    }
    drop(rx);
    let damage = capture
        .join()
        .unwrap_or_else(|_| vec!["capture thread panicked".into()]);
    result?;
    latencies.sort_by(|a, b| a.total_cmp(b));
    Ok(Summary {
        frames_in: live.frames_in.load(Ordering::Relaxed),
        frames_served: latencies.len() as u64,
        frames_dropped: live.frames_dropped.load(Ordering::Relaxed),
        frame_errors: live.frame_errors.load(Ordering::Relaxed),
        latency_ms_p50: percentile(&latencies, 0.5),
        latency_ms_p99: percentile(&latencies, 0.99),
        latency_ms_max: latencies.last().copied().unwrap_or(0.0),
        miou: None,
        damage,
        wall_s: start.elapsed().as_secs_f64(),
        ..Default::default()
    })
}
