//! The two views of a target frame: weak (the frame at model size, flipped or not) for the
//! teacher, strong (the same geometry with colour distortion and blur) for the student.

use crate::config::PreprocessConfig;
use crate::data::augment::photometric;
use crate::data::{normalize_into, resize_rgb};
use crate::SeededRng;
use candle_core::{Device, Result, Tensor};
use image::RgbImage;
use rand::Rng;

/// Builds ([B, 3, H, W] weak, [B, 3, H, W] strong) at the model's input size, or a random
/// `crop` (width, height) of it.
pub fn views(
    frames: &[&RgbImage],
    pre: &PreprocessConfig,
    crop: Option<(usize, usize)>,
    rng: &mut SeededRng,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let (w0, h0) = frames.first().map(|f| f.dimensions()).unwrap_or((1, 1));
    let (iw, ih) = pre.input_size(w0 as usize, h0 as usize);
    let (w, h) = crop.map_or((iw, ih), |(cw, ch)| (cw.min(iw), ch.min(ih)));
    let plane = 3 * w * h;
    let mut weak = vec![0f32; frames.len() * plane];
    let mut strong = vec![0f32; frames.len() * plane];
    for (i, f) in frames.iter().enumerate() {
        let mut img = resize_rgb(f, iw as u32, ih as u32);
        if (w, h) != (iw, ih) {
            let x = rng.random_range(0..=iw - w) as u32;
            let y = rng.random_range(0..=ih - h) as u32;
            img = image::imageops::crop_imm(&img, x, y, w as u32, h as u32).to_image();
        }
        if rng.random_bool(0.5) {
            image::imageops::flip_horizontal_in_place(&mut img);
        }
        normalize_into(&img, pre, &mut weak[i * plane..(i + 1) * plane]);
        photometric(&mut img, rng);
        if rng.random_bool(0.5) {
            img = image::imageops::blur(&img, rng.random_range(0.1f32..=1.5));
        }
        normalize_into(&img, pre, &mut strong[i * plane..(i + 1) * plane]);
    }
    Ok((
        Tensor::from_vec(weak, (frames.len(), 3, h, w), dev)?,
        Tensor::from_vec(strong, (frames.len(), 3, h, w), dev)?,
    ))
}
