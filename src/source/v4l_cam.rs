//! `v4l:/dev/videoN`: a V4L2 camera through the `v4l` crate, mmap streaming, YUYV or MJPEG
//! (whichever the camera grants, YUYV first), at the requested size and rate.

use super::convert::{decode_compressed, raw_to_rgb, PixelFormat};
use super::{Frame, FrameSource, SourceError, SourceOptions};
use v4l::buffer::Type;
use v4l::io::mmap::Stream;
use v4l::io::traits::CaptureStream;
use v4l::video::Capture;
use v4l::{Device, FourCC};

pub struct V4lSource {
    spec: String,
    stream: Stream<'static>,
    width: u32,
    height: u32,
    stride: usize,
    mjpeg: bool,
    seq: u64,
    _dev: Device,
}

impl V4lSource {
    pub fn open(spec: &str, path: &str, opts: &SourceOptions) -> Result<Self, SourceError> {
        let err = |msg: String| SourceError::Open {
            source_spec: spec.to_string(),
            msg,
        };
        let dev = Device::with_path(path).map_err(|e| err(format!("cannot open {path}: {e}")))?;
        let mut want = dev
            .format()
            .map_err(|e| err(format!("{path}: cannot read the format: {e}")))?;
        if let Some((w, h)) = opts.camera_size {
            want.width = w;
            want.height = h;
        }
        let (yuyv, mjpg) = (FourCC::new(b"YUYV"), FourCC::new(b"MJPG"));
        want.fourcc = yuyv;
        let mut got = dev
            .set_format(&want)
            .map_err(|e| err(format!("{path}: cannot set YUYV: {e}")))?;
        if got.fourcc != yuyv {
            want.fourcc = mjpg;
            got = dev
                .set_format(&want)
                .map_err(|e| err(format!("{path}: cannot set MJPEG: {e}")))?;
        }
        if got.fourcc != yuyv && got.fourcc != mjpg {
            return Err(err(format!(
                "{path} offers {}, segadapt reads YUYV or MJPEG",
                got.fourcc
            )));
        }
        if opts.fps > 0.0 {
            if let Err(e) = dev.set_params(&v4l::video::capture::Parameters::with_fps(
                opts.fps.round() as u32,
            )) {
                log::warn!(
                    "{spec}: cannot set {} fps: {e}; using the camera's rate",
                    opts.fps
                );
            }
        }
        let stream = Stream::with_buffers(&dev, Type::VideoCapture, 4)
            .map_err(|e| err(format!("{path}: cannot start mmap streaming: {e}")))?;
        log::info!("{spec}: {}x{} {}", got.width, got.height, got.fourcc);
        Ok(Self {
            spec: spec.to_string(),
            stream,
            width: got.width,
            height: got.height,
            stride: got.stride as usize,
            mjpeg: got.fourcc == mjpg,
            seq: 0,
            _dev: dev,
        })
    }
}

impl FrameSource for V4lSource {
    fn spec(&self) -> &str {
        &self.spec
    }

    fn next_frame(&mut self) -> Option<Result<Frame, SourceError>> {
        let (buf, meta) = match self.stream.next() {
            Ok(x) => x,
            Err(e) => {
                return Some(Err(SourceError::Fatal {
                    source_spec: self.spec.clone(),
                    msg: format!("capture failed after frame {}: {e}", self.seq),
                }))
            }
        };
        let data = &buf[..(meta.bytesused as usize).min(buf.len())];
        let ts = meta.timestamp.sec as u64 * 1_000_000_000 + meta.timestamp.usec as u64 * 1_000;
        let seq = self.seq;
        self.seq += 1;
        let image = if self.mjpeg {
            decode_compressed(data)
        } else {
            raw_to_rgb(
                data,
                self.width,
                self.height,
                self.stride,
                PixelFormat::Yuyv,
            )
        };
        Some(match image {
            Ok(image) => Ok(Frame {
                seq,
                timestamp_ns: ts,
                image,
                label: None,
                name: format!("frame {seq}"),
            }),
            Err(msg) => Err(SourceError::Frame {
                source_spec: self.spec.clone(),
                frame: format!("{seq}"),
                msg,
            }),
        })
    }
}
