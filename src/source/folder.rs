//! `folder:DIR`: a dataset folder replayed as a drive, frames spaced at the given rate.

use super::{Frame, FrameSource, SourceError, SourceOptions};
use crate::data::{load_rgb, Dataset, Sample};
use std::path::Path;

pub struct FolderSource {
    spec: String,
    samples: Vec<Sample>,
    next: usize,
    period_ns: u64,
    num_classes: usize,
    ignore: u8,
}

impl FolderSource {
    pub fn open(spec: &str, dir: &Path, opts: &SourceOptions) -> Result<Self, SourceError> {
        let ds = Dataset::open(dir, &opts.filter).map_err(|e| SourceError::Open {
            source_spec: spec.to_string(),
            msg: e.to_string(),
        })?;
        let fps = if opts.fps > 0.0 { opts.fps } else { 30.0 };
        let mut samples = ds.samples;
        samples.truncate(opts.limit.unwrap_or(usize::MAX));
        Ok(Self {
            spec: spec.to_string(),
            samples,
            next: 0,
            period_ns: (1e9 / fps) as u64,
            num_classes: opts.num_classes,
            ignore: opts.ignore,
        })
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

impl FrameSource for FolderSource {
    fn replayable(&self) -> bool {
        true
    }

    fn spec(&self) -> &str {
        &self.spec
    }

    fn next_frame(&mut self) -> Option<Result<Frame, SourceError>> {
        let i = self.next;
        let s = self.samples.get(i)?.clone();
        self.next += 1;
        let bad = |msg: String| SourceError::Frame {
            source_spec: self.spec.clone(),
            frame: s.name.clone(),
            msg,
        };
        let image = match load_rgb(&s.image) {
            Ok(img) => img,
            Err(e) => return Some(Err(bad(e.to_string()))),
        };
        let label = match self.num_classes {
            0 => None,
            n => match s.read_label(image.dimensions(), n, self.ignore) {
                Ok(l) => l,
                Err(e) => return Some(Err(bad(e.to_string()))),
            },
        };
        Some(Ok(Frame {
            seq: i as u64,
            timestamp_ns: i as u64 * self.period_ns,
            image,
            label,
            name: s.name,
        }))
    }
}
