//! Frames in: one `Frame` type and the sources that produce it, named on the command line as
//! `KIND:ARGS` (`folder:DIR`, `mcap:FILE[#TOPIC]`, `pipe:WxH:rgb24`, `v4l:/dev/videoN`).

pub mod convert;
mod folder;
mod mcap_in;
mod mcap_out;
mod pipe;
#[cfg(feature = "v4l")]
mod v4l_cam;

pub use folder::FolderSource;
pub use mcap_in::{decode_message, McapSource};
pub use mcap_out::McapRecorder;
pub use pipe::PipeSource;

use image::RgbImage;

/// One camera frame as every later stage sees it.
#[derive(Clone)]
pub struct Frame {
    /// Position in the source's delivery order, from 0.
    pub seq: u64,
    /// Capture (or log) time in nanoseconds.
    pub timestamp_ns: u64,
    pub image: RgbImage,
    /// Class-index plane, when the source has labels (scoring only).
    pub label: Option<Vec<u8>>,
    /// What a person would call this frame in a message: file stem, or topic and index.
    pub name: String,
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (w, h) = self.image.dimensions();
        write!(
            f,
            "Frame({} #{} {w}x{h} t={}ns)",
            self.name, self.seq, self.timestamp_ns
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The source cannot be opened at all.
    #[error("{source_spec}: {msg}")]
    Open { source_spec: String, msg: String },
    /// One frame is bad; the source goes on with the next.
    #[error("{source_spec}: frame {frame}: {msg}; skipped")]
    Frame {
        source_spec: String,
        frame: String,
        msg: String,
    },
    /// The source cannot deliver more frames (device gone, stream cut).
    #[error("{source_spec}: {msg}; no more frames")]
    Fatal { source_spec: String, msg: String },
}

/// Something that yields frames in order until it ends.
pub trait FrameSource: Send {
    /// The spec it was opened from, for messages.
    fn spec(&self) -> &str;
    /// The next frame, a recoverable per-frame error, or None at the end.
    fn next_frame(&mut self) -> Option<Result<Frame, SourceError>>;
    /// Damage found while reading (truncation, corrupt records), reported in the summary.
    fn damage(&self) -> Vec<String> {
        Vec::new()
    }
    /// A recording that delivers the same frames every time it is opened: a resumed run skips
    /// the ones it served. Cameras and pipes are not.
    fn replayable(&self) -> bool {
        false
    }
}

/// Options that apply across source kinds.
#[derive(Debug, Clone, Default)]
pub struct SourceOptions {
    /// `COL=VAL` / `COL=LO..HI` manifest filters for folders.
    pub filter: Vec<(String, String)>,
    /// Frame rate for sources without timestamps (folders): spacing of the timestamps.
    pub fps: f64,
    /// Labels are read and checked against this many classes (folders).
    pub num_classes: usize,
    pub ignore: u8,
    /// Capture size (width, height) requested from cameras.
    pub camera_size: Option<(u32, u32)>,
    /// Folders: only the first N frames (after the filters).
    pub limit: Option<usize>,
}

/// Opens `KIND:ARGS`.
pub fn open(spec: &str, opts: &SourceOptions) -> Result<Box<dyn FrameSource>, SourceError> {
    let err = |msg: String| SourceError::Open {
        source_spec: spec.to_string(),
        msg,
    };
    let (kind, args) = spec.split_once(':').ok_or_else(|| {
        err(
            "expected KIND:ARGS (folder:DIR, mcap:FILE[#TOPIC], pipe:WxH:rgb24, v4l:/dev/videoN)"
                .into(),
        )
    })?;
    match kind {
        "folder" => Ok(Box::new(FolderSource::open(spec, args.as_ref(), opts)?)),
        "mcap" => {
            let (file, topic) = match args.split_once('#') {
                Some((f, t)) => (f, Some(t.to_string())),
                None => (args, None),
            };
            Ok(Box::new(McapSource::open(spec, file.as_ref(), topic)?))
        }
        "pipe" => Ok(Box::new(PipeSource::stdin(spec, args)?)),
        #[cfg(feature = "v4l")]
        "v4l" => Ok(Box::new(v4l_cam::V4lSource::open(spec, args, opts)?)),
        #[cfg(not(feature = "v4l"))]
        "v4l" => Err(err(format!(
            "{args}: this build has no V4L2 support (build with --features v4l)"
        ))),
        other => Err(err(format!("unknown source kind {other:?}"))),
    }
}

/// A source replayed `loops` times end to end (an ablation's drive looped), with sequence
/// numbers running on and timestamps shifted so they keep increasing.
pub struct Looped {
    /// The segments played in order each pass: a spec and its options.
    segments: Vec<(String, SourceOptions)>,
    /// Segment being played.
    at: usize,
    left: u32,
    inner: Box<dyn FrameSource>,
    seq: u64,
    offset: u64,
    last: u64,
    step: u64,
    damage: Vec<String>,
}

impl Looped {
    pub fn open(spec: &str, opts: &SourceOptions, loops: u32) -> Result<Self, SourceError> {
        Self::playlist(vec![(spec.to_string(), opts.clone())], loops)
    }

    /// Plays `segments` one after the other (a drive through several conditions), the whole
    /// list `loops` times; sequence numbers and timestamps run on across segments and passes.
    pub fn playlist(
        segments: Vec<(String, SourceOptions)>,
        loops: u32,
    ) -> Result<Self, SourceError> {
        let Some((spec, opts)) = segments.first() else {
            return Err(SourceError::Open {
                source_spec: "playlist".into(),
                msg: "no segments to play".into(),
            });
        };
        let fps = opts.fps;
        Ok(Self {
            inner: open(spec, opts)?,
            segments,
            at: 0,
            left: loops.max(1) - 1,
            seq: 0,
            offset: 0,
            last: 0,
            step: (1e9 / if fps > 0.0 { fps } else { 30.0 }) as u64,
            damage: Vec::new(),
        })
    }

    /// Opens the segment after the current one, wrapping into the next pass; false at the end.
    fn advance(&mut self) -> Result<bool, SourceError> {
        let next = match (self.at + 1 < self.segments.len(), self.left > 0) {
            (true, _) => self.at + 1,
            (false, true) => {
                self.left -= 1;
                0
            }
            (false, false) => return Ok(false),
        };
        self.damage.extend(self.inner.damage());
        let (spec, opts) = &self.segments[next];
        self.inner = open(spec, opts)?;
        self.at = next;
        // The next segment starts one frame period after the last frame.
        self.offset = self.last + self.step;
        Ok(true)
    }
}

impl FrameSource for Looped {
    fn spec(&self) -> &str {
        &self.segments[self.at].0
    }

    fn next_frame(&mut self) -> Option<Result<Frame, SourceError>> {
        loop {
            match self.inner.next_frame() {
                Some(Ok(mut f)) => {
                    f.seq = self.seq;
                    f.timestamp_ns += self.offset;
                    self.seq += 1;
                    self.last = f.timestamp_ns;
                    return Some(Ok(f));
                }
                Some(Err(e)) => return Some(Err(e)),
                None => match self.advance() {
                    Ok(true) => continue,
                    Ok(false) => return None,
                    Err(e) => return Some(Err(e)),
                },
            }
        }
    }

    fn damage(&self) -> Vec<String> {
        let mut d = self.damage.clone();
        d.extend(self.inner.damage());
        d
    }

    fn replayable(&self) -> bool {
        self.inner.replayable()
    }
}
