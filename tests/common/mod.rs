//! Tiny models and datasets made in memory, so tests need no download and run in milliseconds.
#![allow(dead_code)]

use segadapt::config::SegformerConfig;
use std::path::Path;

/// A four-stage SegFormer small enough for unit tests, with HF's default dropout settings.
pub fn tiny_config(classes: usize) -> SegformerConfig {
    let names: Vec<String> = (0..classes).map(|i| format!("c{i}")).collect();
    let mut cfg = SegformerConfig::preset("b0", &names, 255).unwrap();
    cfg.depths = vec![1, 2, 1, 1];
    cfg.hidden_sizes = vec![8, 16, 24, 32];
    cfg.num_attention_heads = vec![1, 2, 3, 4];
    cfg.sr_ratios = vec![4, 2, 2, 1];
    cfg.decoder_hidden_size = 16;
    cfg.validate().unwrap();
    cfg
}

/// Writes `n` frames of `w` x `h` with labels: left half class 1 on a red-ish ground, right half
/// class 2 on blue, top rows class 0, with per-frame noise.
pub fn write_dataset(root: &Path, n: usize, w: u32, h: u32) {
    std::fs::create_dir_all(root.join("images")).unwrap();
    std::fs::create_dir_all(root.join("labels")).unwrap();
    let mut manifest = String::from("name,role\n");
    for i in 0..n {
        let mut img = image::RgbImage::new(w, h);
        let mut lab = image::GrayImage::new(w, h);
        for y in 0..h {
            for x in 0..w {
                let noise = ((x * 7 + y * 13 + i as u32 * 31) % 23) as u8;
                let (c, px) = if y < h / 4 {
                    (0, [200, 200, 240])
                } else if x < w / 2 {
                    (1, [180, 40, 40])
                } else {
                    (2, [40, 40, 180])
                };
                img.put_pixel(
                    x,
                    y,
                    image::Rgb([px[0] + noise, px[1] + noise, px[2] - noise]),
                );
                lab.put_pixel(x, y, image::Luma([c]));
            }
        }
        let name = format!("f{i:03}");
        img.save(root.join("images").join(format!("{name}.png")))
            .unwrap();
        lab.save(root.join("labels").join(format!("{name}.png")))
            .unwrap();
        manifest.push_str(&format!(
            "{name},{}\n",
            if i % 2 == 0 { "train" } else { "test" }
        ));
    }
    std::fs::write(root.join("manifest.csv"), manifest).unwrap();
}

/// A model folder (config, preprocessor, random weights, source statistics from `data`) as
/// `adapt` reads it.
pub fn write_model_dir(dir: &Path, cfg: &SegformerConfig, data: &Path, size: (usize, usize)) {
    use segadapt::model::{init_tensors, weights, Segformer};
    let dev = candle_core::Device::Cpu;
    let tensors = init_tensors(cfg, &dev, 0).unwrap();
    let pre = segadapt::config::PreprocessConfig::with_size(Some(size));
    let examples =
        segadapt::data::Dataset::open(data, &[])
            .unwrap()
            .load_all(cfg.num_labels(), 255, true);
    let model = Segformer::new(cfg, tensors.clone()).unwrap();
    let stats = segadapt::stats::SourceStats::compute(&model, &pre, &examples, 255).unwrap();
    weights::save_model_dir(
        dir,
        &weights::ModelFiles {
            config: cfg.clone(),
            preprocess: pre,
            tensors,
        },
    )
    .unwrap();
    stats.save(dir).unwrap();
}

/// The largest absolute value of `t`.
pub fn max_abs(t: &candle_core::Tensor) -> f32 {
    let t = t.to_dtype(candle_core::DType::F32).unwrap();
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The arg-max class of each pixel of channel-last logits [B, H, W, C], flattened.
pub fn classes(logits: &candle_core::Tensor) -> Vec<u32> {
    logits
        .argmax(3)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The largest absolute difference between two tensors of one shape, in f32.
pub fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let f32 = |t: &candle_core::Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
    (f32(a) - f32(b))
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The x86-64-cpu profile's text with input and training crop at 64x48, for runs of the CLI on
/// the tiny fixtures.
pub fn tiny_profile_text() -> String {
    std::fs::read_to_string("firmware-configs/x86-64-cpu.toml")
        .unwrap()
        .replace("width = 240", "width = 64")
        .replace("height = 180", "height = 48")
        .replace("crop_width = 240", "crop_width = 64")
        .replace("crop_height = 180", "crop_height = 48")
}
