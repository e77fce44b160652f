//! The fuzz targets: each feeds bytes to one parser the runtime meets in the field, through the
//! same entry point the runtime uses (files through a scratch folder where the parser reads a
//! path), and reports its error as text.

use crate::source::FrameSource;
use candle_core::Device;
use std::path::Path;

/// One parser under fuzzing.
pub struct Target {
    pub name: &'static str,
    /// Text inputs also get number swaps.
    pub text: bool,
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Ok, or the error as text; a panic is a crash. The path is a scratch folder.
    pub run: fn(&[u8], &Path) -> Result<(), String>,
}

pub const TARGETS: &[Target] = &[
    Target {
        name: "frame",
        text: false,
        seeds: frame_seeds,
        run: |b, _| crate::source::convert::decode_compressed(b).map(drop),
    },
    Target {
        name: "mcap",
        text: false,
        seeds: || MCAPS.iter().map(|m| m.to_vec()).collect(),
        run: mcap_file,
    },
    Target {
        name: "image-message",
        text: false,
        seeds: message_seeds,
        run: image_message,
    },
    Target {
        name: "pipe",
        text: false,
        seeds: || {
            vec![
                [b"4x3:rgb24\n".as_slice(), &[7u8; 72]].concat(),
                [b"2x2:bgr24\n".as_slice(), &[200u8; 13]].concat(),
            ]
        },
        run: pipe,
    },
    Target {
        name: "profile",
        text: true,
        seeds: || {
            crate::config::BUILT_IN
                .iter()
                .map(|(_, t)| t.as_bytes().to_vec())
                .collect()
        },
        run: |b, _| {
            crate::config::Profile::parse(&String::from_utf8_lossy(b))
                .map(drop)
                .map_err(|e| e.to_string())
        },
    },
    Target {
        name: "config-json",
        text: true,
        seeds: || vec![TINY_CONFIG.to_vec(), CAMVID_CONFIG.to_vec()],
        run: |b, dir| {
            let p = dir.join("config.json");
            std::fs::write(&p, b).map_err(|e| e.to_string())?;
            crate::config::SegformerConfig::load(&p)
                .map(drop)
                .map_err(|e| e.to_string())
        },
    },
    Target {
        name: "safetensors",
        text: false,
        seeds: safetensors_seeds,
        run: safetensors,
    },
    Target {
        name: "label-map",
        text: true,
        seeds: || vec![LABEL_MAP.as_bytes().to_vec()],
        run: |b, dir| {
            let p = dir.join("map.toml");
            std::fs::write(&p, b).map_err(|e| e.to_string())?;
            let classes: Vec<String> = ["road", "car", "sky"].map(String::from).to_vec();
            crate::data::LabelMap::load(&p, &classes)
                .map(drop)
                .map_err(|e| e.to_string())
        },
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

const MCAPS: [&[u8]; 4] = [
    include_bytes!("../../tests/fixtures/ros2_images.mcap"),
    include_bytes!("../../tests/fixtures/foxglove_images.mcap"),
    include_bytes!("../../tests/fixtures/recorded.mcap"),
    include_bytes!("../../tests/fixtures/truncated.mcap"),
];
const TINY_CONFIG: &[u8] = include_bytes!("../../tests/fixtures/tiny-segformer/config.json");
const CAMVID_CONFIG: &[u8] = include_bytes!("../../models/camvid-day/config.json");
const TINY_WEIGHTS: &[u8] = include_bytes!("../../tests/fixtures/tiny-segformer/model.safetensors");
const LABEL_MAP: &str = "classes = [\"void\", \"road\", \"vehicle\"]\nignore = [0]\n\
[model_to_eval]\nroad = \"road\"\ncar = \"vehicle\"\nsky = \"void\"\n";

/// Small JPEG and PNG frames, colour and grey.
fn frame_seeds() -> Vec<Vec<u8>> {
    let img = image::RgbImage::from_fn(12, 8, |x, y| image::Rgb([x as u8 * 20, y as u8 * 30, 90]));
    let mut out = Vec::new();
    for fmt in [image::ImageFormat::Jpeg, image::ImageFormat::Png] {
        let mut b = Vec::new();
        image::DynamicImage::ImageRgb8(img.clone())
            .write_to(&mut std::io::Cursor::new(&mut b), fmt)
            .expect("encoding a seed frame");
        out.push(b);
    }
    let grey = image::DynamicImage::ImageRgb8(img).to_luma8();
    let mut b = Vec::new();
    grey.write_to(&mut std::io::Cursor::new(&mut b), image::ImageFormat::Png)
        .expect("encoding a seed frame");
    out.push(b);
    out
}

fn mcap_file(b: &[u8], dir: &Path) -> Result<(), String> {
    let p = dir.join("in.mcap");
    std::fs::write(&p, b).map_err(|e| e.to_string())?;
    let mut s = crate::source::McapSource::open("mcap", &p, None).map_err(|e| e.to_string())?;
    let mut errors = Vec::new();
    for f in std::iter::from_fn(|| s.next_frame()).take(64) {
        if let Err(e) = f {
            errors.push(e.to_string());
        }
    }
    errors.extend(s.damage());
    match errors.first() {
        Some(e) => Err(e.clone()),
        None => Ok(()),
    }
}

/// The schemas an image message can come in; an input's first byte picks one.
const SCHEMAS: [(&str, &str); 6] = [
    ("sensor_msgs/msg/Image", "cdr"),
    ("sensor_msgs/msg/CompressedImage", "cdr"),
    ("foxglove.CompressedImage", "protobuf"),
    ("foxglove.RawImage", "protobuf"),
    ("foxglove.CompressedImage", "json"),
    ("foxglove.RawImage", "json"),
];

/// Every message of the fixture recordings, prefixed with its schema's index.
fn message_seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for m in MCAPS.iter().take(3) {
        let Ok(stream) = mcap::MessageStream::new(m) else {
            continue;
        };
        for msg in stream.flatten() {
            let Some(schema) = &msg.channel.schema else {
                continue;
            };
            let enc = msg.channel.message_encoding.as_str();
            if let Some(i) = SCHEMAS
                .iter()
                .position(|&(s, e)| s == schema.name && e == enc)
            {
                out.push([&[i as u8][..], &msg.data].concat());
            }
        }
    }
    out
}

fn image_message(b: &[u8], _: &Path) -> Result<(), String> {
    let (&first, data) = b.split_first().ok_or("empty")?;
    let (schema, enc) = SCHEMAS[first as usize % SCHEMAS.len()];
    crate::source::decode_message(schema, enc, data).map(drop)
}

/// `ARGS\nBYTES`: the pipe's `WxH:format` and the stream on its standard input.
fn pipe(b: &[u8], _: &Path) -> Result<(), String> {
    let cut = b.iter().position(|&c| c == b'\n').unwrap_or(b.len());
    let args = String::from_utf8_lossy(&b[..cut]).into_owned();
    let data = b.get(cut + 1..).unwrap_or_default().to_vec();
    let mut s = crate::source::PipeSource::new("pipe", &args, Box::new(std::io::Cursor::new(data)))
        .map_err(|e| e.to_string())?;
    for f in std::iter::from_fn(|| s.next_frame()).take(16) {
        f.map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn safetensors_seeds() -> Vec<Vec<u8>> {
    let small: crate::model::TensorMap = [
        (
            "a".to_string(),
            candle_core::Tensor::new(&[1f32, 2.0], &Device::Cpu),
        ),
        (
            "b".to_string(),
            candle_core::Tensor::new(&[[3i64]], &Device::Cpu),
        ),
    ]
    .into_iter()
    .map(|(n, t)| (n, t.expect("a seed tensor")))
    .collect();
    let meta = std::collections::HashMap::from([("step".to_string(), "3".to_string())]);
    let small = crate::model::weights::safetensors_bytes(&small, Some(meta))
        .expect("a seed safetensors file");
    vec![TINY_WEIGHTS.to_vec(), small]
}

/// As model weights for the tiny fixture's config, and as a checkpoint.
fn safetensors(b: &[u8], dir: &Path) -> Result<(), String> {
    let p = dir.join("model.safetensors");
    std::fs::write(&p, b).map_err(|e| e.to_string())?;
    let cfg: crate::config::SegformerConfig =
        serde_json::from_slice(TINY_CONFIG).expect("the fixture's config parses");
    let as_model = crate::model::weights::load_safetensors(&p, &cfg, &Device::Cpu);
    let as_checkpoint = crate::checkpoint::load_checkpoint(&p, &Device::Cpu);
    as_model.map_err(|e| e.to_string())?;
    as_checkpoint.map(drop).map_err(|e| e.to_string())
}
