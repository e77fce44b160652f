//! `segadapt record`: frames into an MCAP file as ROS 2 `sensor_msgs/msg/CompressedImage` (CDR,
//! JPEG), which the `mcap` CLI, Foxglove and segadapt's own `mcap:` source all open.
//! The committed fixture `tests/fixtures/recorded.mcap` was written by this recorder.

use super::Frame;
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

const SCHEMA: &str = "std_msgs/Header header
string format
uint8[] data
================================================================================
MSG: std_msgs/Header
builtin_interfaces/Time stamp
string frame_id
================================================================================
MSG: builtin_interfaces/Time
int32 sec
uint32 nanosec
";

pub struct McapRecorder {
    path: PathBuf,
    writer: mcap::Writer<BufWriter<std::fs::File>>,
    channel: u16,
    count: u32,
    quality: u8,
}

fn werr(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::data(path, format!("mcap: {e}"))
}

impl McapRecorder {
    pub fn create(path: &Path, topic: &str) -> Result<Self> {
        let f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
        // Unchunked: frames are JPEG already, and a recording cut by a power loss keeps every
        // message written before the cut instead of losing the open chunk.
        let mut writer = mcap::WriteOptions::new()
            .profile("ros2")
            .use_chunks(false)
            .create(BufWriter::new(f))
            .map_err(|e| werr(path, e))?;
        let schema = writer
            .add_schema(
                "sensor_msgs/msg/CompressedImage",
                "ros2msg",
                SCHEMA.as_bytes(),
            )
            .map_err(|e| werr(path, e))?;
        let channel = writer
            .add_channel(schema, topic, "cdr", &BTreeMap::new())
            .map_err(|e| werr(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            writer,
            channel,
            count: 0,
            quality: 90,
        })
    }

    pub fn write(&mut self, frame: &Frame) -> Result<()> {
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, self.quality)
            .encode_image(&frame.image)
            .map_err(|e| werr(&self.path, e))?;
        let data = cdr_compressed_image(frame.timestamp_ns, "camera", "jpeg", &jpeg);
        let header = mcap::records::MessageHeader {
            channel_id: self.channel,
            sequence: self.count,
            log_time: frame.timestamp_ns,
            publish_time: frame.timestamp_ns,
        };
        self.writer
            .write_to_known_channel(&header, &data)
            .map_err(|e| werr(&self.path, e))?;
        self.count += 1;
        Ok(())
    }

    /// Writes the summary and index; without it the file is still readable, as a truncated one.
    pub fn finish(mut self) -> Result<u32> {
        self.writer.finish().map_err(|e| werr(&self.path, e))?;
        Ok(self.count)
    }
}

/// CDR (little endian) of sensor_msgs/msg/CompressedImage.
pub fn cdr_compressed_image(stamp_ns: u64, frame_id: &str, format: &str, data: &[u8]) -> Vec<u8> {
    let mut b = vec![0x00, 0x01, 0x00, 0x00];
    let align = |b: &mut Vec<u8>, n: usize| {
        while (b.len() - 4) % n != 0 {
            b.push(0);
        }
    };
    let put_str = |b: &mut Vec<u8>, s: &str| {
        align(b, 4);
        b.extend(((s.len() + 1) as u32).to_le_bytes());
        b.extend(s.as_bytes());
        b.push(0);
    };
    b.extend(((stamp_ns / 1_000_000_000) as i32).to_le_bytes());
    b.extend(((stamp_ns % 1_000_000_000) as u32).to_le_bytes());
    put_str(&mut b, frame_id);
    put_str(&mut b, format);
    align(&mut b, 4);
    b.extend((data.len() as u32).to_le_bytes());
    b.extend(data);
    b
}
