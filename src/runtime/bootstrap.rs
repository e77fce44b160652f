//! A model folder as `save_pretrained` writes it carries no source statistics. A run then
//! makes what it can from the stream itself and switches off what it cannot, naming each on
//! one line with the command that would provide the real thing.

use crate::adapt::config::Statistics;
use crate::adapt::AdaptConfig;
use crate::config::PreprocessConfig;
use crate::data::Example;
use crate::error::Result;
use crate::model::Segformer;
use crate::source::{Frame, FrameSource, SourceError};
use crate::stats::{Origin, SourceStats};
use candle_core::Device;
use std::collections::VecDeque;
use std::path::Path;

/// Frames read ahead to build statistics from the stream: two seconds of a 15 fps camera.
pub const STREAM_FRAMES: usize = 30;

/// A source whose first frames were read ahead; it delivers them first, errors included, as
/// they came.
pub struct ReadAhead {
    held: VecDeque<std::result::Result<Frame, SourceError>>,
    inner: Box<dyn FrameSource>,
}

impl ReadAhead {
    /// Reads up to `n` frames of `inner` (fewer where it ends or fails for good).
    pub fn new(mut inner: Box<dyn FrameSource>, n: usize) -> Self {
        let mut held: VecDeque<std::result::Result<Frame, SourceError>> = VecDeque::new();
        while held.iter().filter(|f| f.is_ok()).count() < n {
            match inner.next_frame() {
                Some(Err(e @ SourceError::Fatal { .. })) => {
                    held.push_back(Err(e));
                    break;
                }
                Some(f) => held.push_back(f),
                None => break,
            }
        }
        Self { held, inner }
    }

    /// Copies of the frames read ahead, without their labels: target labels only score.
    pub fn frames(&self) -> Vec<Example> {
        self.held
            .iter()
            .filter_map(|f| f.as_ref().ok())
            .map(|f| Example {
                name: f.name.clone(),
                image: f.image.clone(),
                label: None,
            })
            .collect()
    }
}

impl FrameSource for ReadAhead {
    fn spec(&self) -> &str {
        self.inner.spec()
    }

    fn next_frame(&mut self) -> Option<std::result::Result<Frame, SourceError>> {
        self.held.pop_front().or_else(|| self.inner.next_frame())
    }

    fn damage(&self) -> Vec<String> {
        self.inner.damage()
    }

    fn replayable(&self) -> bool {
        self.inner.replayable()
    }
}

/// The source statistics a run adapts with, and the source to stream from: the model folder's
/// statistics; or those an interrupted run of this `out` built from the stream; or, built now
/// from the stream's first frames by the source model's confident predictions and saved in
/// `out`.
pub fn source_stats(
    model_dir: &Path,
    out: &Path,
    (model, pre): (&Segformer, &PreprocessConfig),
    source: Box<dyn FrameSource>,
    dev: &Device,
) -> Result<(SourceStats, Box<dyn FrameSource>)> {
    if let Some(s) = SourceStats::load_if_present(model_dir, dev)? {
        return Ok((s, source));
    }
    if let Some(s) = SourceStats::load_if_present(out, dev)?.filter(|s| s.origin == Origin::Stream)
    {
        log::info!(
            "source statistics: none in {}; those built from the stream at the run's start are \
             read from {}",
            model_dir.display(),
            out.display()
        );
        return Ok((s, source));
    }
    let ahead = ReadAhead::new(source, STREAM_FRAMES);
    let frames = ahead.frames();
    let n = frames.len();
    let stats = SourceStats::of_stream(model, pre, frames)?.to_device(dev)?;
    std::fs::create_dir_all(out).map_err(|e| crate::error::Error::io(out, e))?;
    stats.save(out)?;
    log::info!(
        "source statistics: none in {}; prototypes, class prior and instances built from the \
         model's confident predictions on the stream's first {} frames (`segadapt stats --model \
         {} --data SOURCE_FRAMES` makes the source's, labels optional)",
        model_dir.display(),
        n,
        model_dir.display()
    );
    Ok((stats, Box::new(ahead)))
}

/// `cfg` with every component that needs a piece `stats` lacks switched to what it can do
/// without it, one line each naming what is missing and the command that would provide it.
pub fn fit(cfg: &mut AdaptConfig, stats: &SourceStats, model_dir: &Path) {
    let cmd = format!(
        "`segadapt stats --model {} --data SOURCE_FRAMES` (or --source SPEC) provides it",
        model_dir.display()
    );
    if cfg.statistics == Statistics::Class && stats.norm.is_none() {
        cfg.statistics = Statistics::Batch;
        log::warn!(
            "adapt.statistics = \"class\": no decode-head class statistics of the source; the \
             teacher's statistics follow each batch instead; {cmd}"
        );
    }
    if cfg.budget.on && stats.frames.is_none() {
        log::warn!(
            "adapt.budget: no statistics of the source frames; the shift test takes the stream's \
             first frames as the shift from the source and the teacher's statistics follow the \
             frames all of the way; {cmd}"
        );
    }
    if stats.origin == Origin::Stream {
        let built = [
            (cfg.bida.on, "bida", "source prototypes"),
            (cfg.sepico.on, "sepico", "source class statistics"),
            (cfg.cpsl.on, "cpsl", "class prior and prototypes"),
            (cfg.dida.on, "dida", "instance bank"),
        ];
        for (_, name, what) in built.iter().filter(|(on, ..)| *on) {
            log::warn!(
                "adapt.{name}: {what} built from the model's own confident predictions on the \
                 stream's first frames, not from source frames; {cmd}"
            );
        }
    }
}
