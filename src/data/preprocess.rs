//! HF-style preprocessing: resize, rescale by 1/255, normalise by mean and std, to [1, 3, H, W].

use crate::config::PreprocessConfig;
use candle_core::{Device, Result, Tensor};
use image::RgbImage;

pub fn resize_rgb(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    if img.dimensions() == (w, h) {
        return img.clone();
    }
    image::imageops::resize(img, w, h, image::imageops::FilterType::Triangle)
}

/// Writes `img` normalised into `out` as planar CHW f32.
pub fn normalize_into(img: &RgbImage, pre: &PreprocessConfig, out: &mut [f32]) {
    let n = (img.width() * img.height()) as usize;
    let scale = if pre.do_rescale {
        pre.rescale_factor as f32
    } else {
        1.0
    };
    let (mean, std): ([f32; 3], [f32; 3]) = if pre.do_normalize {
        (
            [
                pre.image_mean[0] as f32,
                pre.image_mean[1] as f32,
                pre.image_mean[2] as f32,
            ],
            [
                pre.image_std[0] as f32,
                pre.image_std[1] as f32,
                pre.image_std[2] as f32,
            ],
        )
    } else {
        ([0.0; 3], [1.0; 3])
    };
    for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * n + i] = (px[c] as f32 * scale - mean[c]) / std[c];
        }
    }
}

/// The model input for one image, resized as the preprocessor config says.
pub fn image_to_tensor(img: &RgbImage, pre: &PreprocessConfig, dev: &Device) -> Result<Tensor> {
    let (w, h) = pre.input_size(img.width() as usize, img.height() as usize);
    let img = resize_rgb(img, w as u32, h as u32);
    let mut buf = vec![0f32; 3 * w * h];
    normalize_into(&img, pre, &mut buf);
    Tensor::from_vec(buf, (1, 3, h, w), dev)
}
