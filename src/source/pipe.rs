//! `pipe:WxH:rgb24` / `pipe:WxH:bgr24`: raw frames back to back on standard input, so any
//! GStreamer pipeline (nvarguscamerasrc on a Jetson) can feed segadapt.

use super::convert::{raw_to_rgb, PixelFormat, MAX_SIDE};
use super::{Frame, FrameSource, SourceError};
use std::io::Read;
use std::time::Instant;

pub struct PipeSource {
    spec: String,
    reader: Box<dyn Read + Send>,
    width: u32,
    height: u32,
    fmt: PixelFormat,
    seq: u64,
    start: Instant,
    done: bool,
}

impl PipeSource {
    pub fn stdin(spec: &str, args: &str) -> Result<Self, SourceError> {
        Self::new(spec, args, Box::new(std::io::stdin()))
    }

    /// `args` is `WxH:rgb24` or `WxH:bgr24`.
    pub fn new(spec: &str, args: &str, reader: Box<dyn Read + Send>) -> Result<Self, SourceError> {
        let err = |msg: String| SourceError::Open {
            source_spec: spec.to_string(),
            msg,
        };
        let (size, fmt) = args
            .split_once(':')
            .ok_or_else(|| err("expected pipe:WxH:rgb24 or pipe:WxH:bgr24".into()))?;
        let fmt = match fmt {
            "rgb24" => PixelFormat::Rgb8,
            "bgr24" => PixelFormat::Bgr8,
            other => {
                return Err(err(format!(
                    "unknown pixel format {other:?} (rgb24 or bgr24)"
                )))
            }
        };
        let (w, h) = size
            .split_once('x')
            .and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)))
            .filter(|&(w, h)| w > 0 && h > 0)
            .ok_or_else(|| err(format!("bad frame size {size:?} (want WxH, e.g. 1280x720)")))?;
        if w > MAX_SIDE || h > MAX_SIDE {
            return Err(err(format!(
                "frame size {w}x{h}: at most {MAX_SIDE}x{MAX_SIDE}"
            )));
        }
        Ok(Self {
            spec: spec.to_string(),
            reader,
            width: w,
            height: h,
            fmt,
            seq: 0,
            start: Instant::now(),
            done: false,
        })
    }
}

impl FrameSource for PipeSource {
    fn spec(&self) -> &str {
        &self.spec
    }

    fn next_frame(&mut self) -> Option<Result<Frame, SourceError>> {
        if self.done {
            return None;
        }
        let n = self.width as usize * self.height as usize * 3;
        let mut buf = vec![0u8; n];
        let mut got = 0;
        while got < n {
            match self.reader.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.done = true;
                    return Some(Err(SourceError::Fatal {
                        source_spec: self.spec.clone(),
                        msg: format!("read failed at frame {}: {e}", self.seq),
                    }));
                }
            }
        }
        if got < n {
            self.done = true;
            if got == 0 {
                return None;
            }
            return Some(Err(SourceError::Fatal {
                source_spec: self.spec.clone(),
                msg: format!(
                    "stream ended inside frame {} ({got} of {n} bytes)",
                    self.seq
                ),
            }));
        }
        let seq = self.seq;
        self.seq += 1;
        let image = raw_to_rgb(&buf, self.width, self.height, 0, self.fmt)
            .expect("buffer sized to the frame");
        Some(Ok(Frame {
            seq,
            timestamp_ns: self.start.elapsed().as_nanos() as u64,
            image,
            label: None,
            name: format!("frame {seq}"),
        }))
    }
}
