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
                let mut chosen = want;
                let mut index = 0u64;
                let mut report = |msg: String| dmg.lock().expect("damage lock").push(msg);
                read_images(&map, &mut report, |m| {
                    match &chosen {
                        Some(t) if *t != m.topic => return true,
                        None => chosen = Some(m.topic.clone()),
                        _ => {}
                    }
                    let msg = RawImageMsg { index, ..m };
                    index += 1;
                    // False once the consumer is gone.
                    tx.send(msg).is_ok()
                });
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

/// The most any one record may ask to be buffered: a 4K raw frame is 26 MB, and a corrupt
/// length cannot make the reader allocate more than this.
const RECORD_LIMIT: usize = 256 << 20;

/// Reads every image message of a supported schema in `file` (the whole file, with its
/// magic) in order, handing each to `each` until it returns false; damage goes to `report`.
/// Record by record through the `mcap` crate's sans-io reader with every length bounded by
/// [`RECORD_LIMIT`] (its message stream trusts the lengths in chunk headers).
fn read_images(
    file: &[u8],
    report: &mut dyn FnMut(String),
    mut each: impl FnMut(RawImageMsg) -> bool,
) {
    use mcap::records::Record;
    use mcap::sans_io::linear_reader::{LinearReadEvent, LinearReader, LinearReaderOptions};
    use std::collections::HashMap;
    let opts = LinearReaderOptions::default()
        .with_skip_end_magic(true)
        .with_record_length_limit(RECORD_LIMIT);
    let mut reader = LinearReader::new_with_options(opts);
    let mut schemas: HashMap<u16, String> = HashMap::new();
    let mut channels: HashMap<u16, (String, String, String)> = HashMap::new();
    let (mut at, mut messages) = (0usize, 0u64);
    while let Some(event) = reader.next_event() {
        let record = match event {
            Ok(LinearReadEvent::ReadRequest(need)) => {
                let n = need.min(file.len() - at);
                reader.insert(n).copy_from_slice(&file[at..at + n]);
                reader.notify_read(n);
                at += n;
                continue;
            }
            Ok(LinearReadEvent::Record { opcode, data }) => mcap::parse_record(opcode, data),
            Err(e) => {
                // The reader cannot resynchronise after a bad record: what follows is lost.
                report(format!("after message {messages}: {e}"));
                return;
            }
        };
        match record {
            Ok(Record::Schema { header, .. }) => {
                schemas.insert(header.id, header.name);
            }
            Ok(Record::Channel(c)) => {
                if let Some(schema) = schemas.get(&c.schema_id) {
                    channels.insert(c.id, (c.topic, schema.clone(), c.message_encoding));
                }
            }
            Ok(Record::Message { header, data }) => {
                messages += 1;
                let Some((topic, schema, encoding)) = channels.get(&header.channel_id) else {
                    continue;
                };
                if !SUPPORTED.contains(&schema.as_str()) {
                    continue;
                }
                let m = RawImageMsg {
                    topic: topic.clone(),
                    schema: schema.clone(),
                    encoding: encoding.clone(),
                    log_time: header.log_time,
                    index: 0,
                    data: data.into_owned(),
                };
                if !each(m) {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => report(format!("after message {messages}: {e}")),
        }
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
