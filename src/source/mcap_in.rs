//! `mcap:FILE[#TOPIC]`: camera frames from MCAP recordings. ROS 2 `sensor_msgs/msg/Image` and
//! `CompressedImage` (CDR) and Foxglove `foxglove.CompressedImage` / `foxglove.RawImage`
//! (protobuf or JSON). A reader thread streams the file, so memory does not grow with its length;
//! a truncated or partly corrupt file yields every frame that can be read, and the damage is kept.

use super::convert::{decode_compressed, raw_to_rgb, PixelFormat};
use super::{Frame, FrameSource, SourceError};
use crossbeam::channel::{bounded, Receiver};
use image::RgbImage;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// What the reader thread sends: a message on the chosen topic, or the end.
struct RawImageMsg {
    topic: String,
    schema: String,
    encoding: String,
    log_time: u64,
    index: u64,
    data: Vec<u8>,
}

pub struct McapSource {
    spec: String,
    rx: Receiver<RawImageMsg>,
    damage: Arc<Mutex<Vec<String>>>,
    seq: u64,
}

const SUPPORTED: [&str; 4] = [
    "sensor_msgs/msg/Image",
    "sensor_msgs/msg/CompressedImage",
    "foxglove.CompressedImage",
    "foxglove.RawImage",
];

impl McapSource {
    pub fn open(spec: &str, file: &Path, topic: Option<String>) -> Result<Self, SourceError> {
        let err = |msg: String| SourceError::Open {
            source_spec: spec.to_string(),
            msg,
        };
        let f = std::fs::File::open(file).map_err(|e| err(format!("{}: {e}", file.display())))?;
        // SAFETY: the file is only read; a writer truncating it underneath would surface as
        // a read error in the stream, which is reported as damage.
        let map = unsafe { memmap2::Mmap::map(&f) }
            .map_err(|e| err(format!("{}: {e}", file.display())))?;
        if map.len() < 8 || &map[..8] != mcap::MAGIC {
            return Err(err(format!(
                "{}: not an MCAP file (bad magic)",
                file.display()
            )));
        }
        let (tx, rx) = bounded::<RawImageMsg>(4);
        let damage = Arc::new(Mutex::new(Vec::new()));
        let dmg = damage.clone();
        let want = topic;
        std::thread::Builder::new()
            .name("mcap-reader".into())
            .spawn(move || {
                let opts = mcap::read::Options::IgnoreEndMagic.into();
                let stream = match mcap::MessageStream::new_with_options(&map, opts) {
                    Ok(s) => s,
                    Err(e) => {
                        dmg.lock()
                            .expect("damage lock")
                            .push(format!("unreadable: {e}"));
                        return;
                    }
                };
                let mut chosen = want;
                let mut index = 0u64;
                for m in stream {
                    let m = match m {
                        Ok(m) => m,
                        Err(e) => {
                            dmg.lock()
                                .expect("damage lock")
                                .push(format!("after message {index}: {e}"));
                            continue;
                        }
                    };
                    let Some(schema) = m.channel.schema.as_ref() else {
                        continue;
                    };
                    if !SUPPORTED.contains(&schema.name.as_str()) {
                        continue;
                    }
                    match &chosen {
                        Some(t) if *t != m.channel.topic => continue,
                        None => chosen = Some(m.channel.topic.clone()),
                        _ => {}
                    }
                    let msg = RawImageMsg {
                        topic: m.channel.topic.clone(),
                        schema: schema.name.clone(),
                        encoding: m.channel.message_encoding.clone(),
                        log_time: m.log_time,
                        index,
                        data: m.data.into_owned(),
                    };
                    index += 1;
                    if tx.send(msg).is_err() {
                        return; // the consumer is gone
                    }
                }
            })
            .map_err(|e| err(format!("cannot start reader thread: {e}")))?;
        Ok(Self {
            spec: spec.to_string(),
            rx,
            damage,
            seq: 0,
        })
    }
}

impl FrameSource for McapSource {
    fn replayable(&self) -> bool {
        true
    }

    fn spec(&self) -> &str {
        &self.spec
    }

    fn next_frame(&mut self) -> Option<Result<Frame, SourceError>> {
        let m = self.rx.recv().ok()?;
        let name = format!("{}#{}", m.topic, m.index);
        let seq = self.seq;
        self.seq += 1;
        Some(match decode_message(&m.schema, &m.encoding, &m.data) {
            Ok(image) => Ok(Frame {
                seq,
                timestamp_ns: m.log_time,
                image,
                label: None,
                name,
            }),
            Err(msg) => Err(SourceError::Frame {
                source_spec: self.spec.clone(),
                frame: name,
                msg,
            }),
        })
    }

    fn damage(&self) -> Vec<String> {
        self.damage.lock().expect("damage lock").clone()
    }
}

/// Decodes one image message of a supported schema.
pub fn decode_message(schema: &str, encoding: &str, data: &[u8]) -> Result<RgbImage, String> {
    match (schema, encoding) {
        ("sensor_msgs/msg/Image", "cdr") => {
            let mut c = Cdr::new(data)?;
            c.header()?;
            let height = c.u32()?;
            let width = c.u32()?;
            let enc = c.string()?;
            let _bigendian = c.u8()?;
            let step = c.u32()? as usize;
            let pixels = c.bytes()?;
            let fmt = PixelFormat::from_encoding(&enc)
                .ok_or_else(|| format!("unknown image encoding {enc:?}"))?;
            raw_to_rgb(pixels, width, height, step, fmt)
        }
        ("sensor_msgs/msg/CompressedImage", "cdr") => {
            let mut c = Cdr::new(data)?;
            c.header()?;
            let _format = c.string()?;
            decode_compressed(c.bytes()?)
        }
        ("foxglove.CompressedImage", "protobuf") => {
            let mut payload = None;
            for f in Proto::new(data) {
                if let (2, Field::Bytes(b)) = f? {
                    payload = Some(b);
                }
            }
            decode_compressed(payload.ok_or("foxglove.CompressedImage without data")?)
        }
        ("foxglove.RawImage", "protobuf") => {
            let (mut w, mut h, mut step, mut enc, mut pixels) = (0, 0, 0, String::new(), None);
            for f in Proto::new(data) {
                match f? {
                    (2, Field::Int(v)) => w = v as u32,
                    (3, Field::Int(v)) => h = v as u32,
                    (4, Field::Bytes(b)) => enc = String::from_utf8_lossy(b).into_owned(),
                    (5, Field::Int(v)) => step = v as usize,
                    (6, Field::Bytes(b)) => pixels = Some(b),
                    _ => {}
                }
            }
            let fmt = PixelFormat::from_encoding(&enc)
                .ok_or_else(|| format!("unknown image encoding {enc:?}"))?;
            raw_to_rgb(
                pixels.ok_or("foxglove.RawImage without data")?,
                w,
                h,
                step,
                fmt,
            )
        }
        ("foxglove.CompressedImage" | "foxglove.RawImage", "json") => {
            decode_foxglove_json(schema, data)
        }
        _ => Err(format!("{schema} in {encoding} encoding is not supported")),
    }
}

fn decode_foxglove_json(schema: &str, data: &[u8]) -> Result<RgbImage, String> {
    use base64::Engine;
    let v: serde_json::Value =
        serde_json::from_slice(data).map_err(|e| format!("bad JSON: {e}"))?;
    let payload = v["data"].as_str().ok_or("JSON image without data")?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(payload)
        .map_err(|e| format!("data is not base64: {e}"))?;
    if schema == "foxglove.CompressedImage" {
        return decode_compressed(&bytes);
    }
    let enc = v["encoding"].as_str().unwrap_or_default();
    let fmt =
        PixelFormat::from_encoding(enc).ok_or_else(|| format!("unknown image encoding {enc:?}"))?;
    let dim = |k: &str| {
        v[k].as_u64()
            .ok_or_else(|| format!("JSON RawImage without {k}"))
    };
    raw_to_rgb(
        &bytes,
        dim("width")? as u32,
        dim("height")? as u32,
        dim("step")? as usize,
        fmt,
    )
}

/// A little CDR reader: alignment is relative to the end of the 4-byte encapsulation header.
struct Cdr<'a> {
    buf: &'a [u8],
    pos: usize,
    le: bool,
}

impl<'a> Cdr<'a> {
    fn new(data: &'a [u8]) -> Result<Self, String> {
        if data.len() < 4 {
            return Err("CDR message shorter than its header".into());
        }
        let le = match data[1] {
            0x00 | 0x02 => false,
            0x01 | 0x03 => true,
            k => return Err(format!("unknown CDR representation {k:#04x}")),
        };
        Ok(Self {
            buf: &data[4..],
            pos: 0,
            le,
        })
    }

    fn take(&mut self, n: usize, align: usize) -> Result<&'a [u8], String> {
        self.pos = self.pos.div_ceil(align) * align;
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| {
            format!(
                "CDR message truncated at byte {} (needs {n} more)",
                self.pos + 4
            )
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1, 1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b: [u8; 4] = self.take(4, 4)?.try_into().expect("4 bytes");
        Ok(if self.le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n, 1)
    }

    fn string(&mut self) -> Result<String, String> {
        let b = self.bytes()?;
        let b = b.strip_suffix(&[0]).unwrap_or(b);
        Ok(String::from_utf8_lossy(b).into_owned())
    }

    /// std_msgs/Header: stamp (sec, nanosec) and frame_id.
    fn header(&mut self) -> Result<(), String> {
        self.u32()?;
        self.u32()?;
        self.string()?;
        Ok(())
    }
}

/// A protobuf field value: integers (varint / fixed) and length-delimited bytes.
enum Field<'a> {
    Int(u64),
    Bytes(&'a [u8]),
}

struct Proto<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Proto<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self
                .buf
                .get(self.pos)
                .ok_or("protobuf varint runs past the end")?;
            self.pos += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("protobuf varint too long".into())
    }

    fn fixed(&mut self, n: usize) -> Result<u64, String> {
        let b = self
            .buf
            .get(self.pos..self.pos + n)
            .ok_or("protobuf fixed field runs past the end")?;
        self.pos += n;
        Ok(b.iter().rev().fold(0u64, |a, &x| (a << 8) | x as u64))
    }
}

impl<'a> Iterator for Proto<'a> {
    type Item = Result<(u64, Field<'a>), String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.buf.len() {
            return None;
        }
        Some((|| {
            let key = self.varint()?;
            let (num, wire) = (key >> 3, key & 7);
            let f = match wire {
                0 => Field::Int(self.varint()?),
                1 => Field::Int(self.fixed(8)?),
                5 => Field::Int(self.fixed(4)?),
                2 => {
                    let n = self.varint()? as usize;
                    let b = self
                        .buf
                        .get(self.pos..self.pos + n)
                        .ok_or("protobuf field runs past the end")?;
                    self.pos += n;
                    Field::Bytes(b)
                }
                w => return Err(format!("unsupported protobuf wire type {w}")),
            };
            Ok((num, f))
        })())
    }
}
