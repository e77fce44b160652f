//! Source-training augmentations as mmseg's pipeline does them: random rescale, random crop
//! (no class over `cat_max_ratio`), horizontal flip, photometric distortion, pad to crop size.

use super::dataset::Example;
use super::preprocess::normalize_into;
use crate::config::PreprocessConfig;
use crate::SeededRng;
use candle_core::{Device, Result, Tensor};
use image::{imageops, GrayImage, RgbImage};
use rand::Rng;

#[derive(Debug, Clone, Copy)]
pub struct AugmentConfig {
    /// The scale (width, height) the ratio range is relative to.
    pub base: (u32, u32),
    pub ratio_range: (f64, f64),
    /// Crop (width, height): also the training input size.
    pub crop: (u32, u32),
    pub cat_max_ratio: f64,
    pub flip_prob: f64,
    pub photometric: bool,
}

pub struct Augmenter {
    pub cfg: AugmentConfig,
    pub ignore: u8,
}

impl Augmenter {
    /// One augmented (image, label) pair of exactly the crop size.
    pub fn sample(&self, ex: &Example, rng: &mut SeededRng) -> (RgbImage, Vec<u8>) {
        let c = self.cfg;
        let (iw, ih) = ex.image.dimensions();
        let label = GrayImage::from_raw(
            iw,
            ih,
            ex.label
                .clone()
                .unwrap_or_else(|| vec![self.ignore; (iw * ih) as usize]),
        )
        .expect("label plane matches image size");
        let r = rng.random_range(c.ratio_range.0..=c.ratio_range.1);
        let f = (c.base.0 as f64 * r / iw as f64).min(c.base.1 as f64 * r / ih as f64);
        let (nw, nh) = (
            ((iw as f64 * f).round() as u32).max(1),
            ((ih as f64 * f).round() as u32).max(1),
        );
        let img = imageops::resize(&ex.image, nw, nh, imageops::FilterType::Triangle);
        let lab = imageops::resize(&label, nw, nh, imageops::FilterType::Nearest);

        let (cw, ch) = (c.crop.0.min(nw), c.crop.1.min(nh));
        let mut pos = (0, 0);
        for _ in 0..10 {
            pos = (rng.random_range(0..=nw - cw), rng.random_range(0..=nh - ch));
            if self.class_ratio_ok(&lab, pos, (cw, ch)) {
                break;
            }
        }
        let mut img = imageops::crop_imm(&img, pos.0, pos.1, cw, ch).to_image();
        let mut lab = imageops::crop_imm(&lab, pos.0, pos.1, cw, ch).to_image();
        if rng.random_bool(c.flip_prob) {
            imageops::flip_horizontal_in_place(&mut img);
            imageops::flip_horizontal_in_place(&mut lab);
        }
        if c.photometric {
            photometric(&mut img, rng);
        }
        // Pad to the crop size: zeros in the image, `ignore` in the label.
        let mut out = RgbImage::new(c.crop.0, c.crop.1);
        imageops::replace(&mut out, &img, 0, 0);
        let mut lout = GrayImage::from_pixel(c.crop.0, c.crop.1, image::Luma([self.ignore]));
        imageops::replace(&mut lout, &lab, 0, 0);
        (out, lout.into_raw())
    }

    fn class_ratio_ok(&self, lab: &GrayImage, pos: (u32, u32), size: (u32, u32)) -> bool {
        let mut cnt = [0u32; 256];
        for y in pos.1..pos.1 + size.1 {
            for x in pos.0..pos.0 + size.0 {
                cnt[lab.get_pixel(x, y).0[0] as usize] += 1;
            }
        }
        cnt[self.ignore as usize] = 0;
        let total: u32 = cnt.iter().sum();
        let classes = cnt.iter().filter(|&&c| c > 0).count();
        let max = *cnt.iter().max().unwrap_or(&0);
        classes > 1 && (max as f64) < self.cfg.cat_max_ratio * total as f64
    }

    /// A training batch: normalised images [B, 3, h, w] and labels u32 [B * h * w].
    pub fn batch(
        &self,
        examples: &[&Example],
        pre: &PreprocessConfig,
        rng: &mut SeededRng,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let (w, h) = (self.cfg.crop.0 as usize, self.cfg.crop.1 as usize);
        let mut imgs = vec![0f32; examples.len() * 3 * w * h];
        let mut labels = Vec::with_capacity(examples.len() * w * h);
        for (i, ex) in examples.iter().enumerate() {
            let (img, lab) = self.sample(ex, rng);
            normalize_into(&img, pre, &mut imgs[i * 3 * w * h..(i + 1) * 3 * w * h]);
            labels.extend(lab.into_iter().map(u32::from));
        }
        Ok((
            Tensor::from_vec(imgs, (examples.len(), 3, h, w), dev)?,
            Tensor::from_vec(labels, examples.len() * w * h, dev)?,
        ))
    }
}

/// mmseg's PhotoMetricDistortion: brightness, contrast (before or after the HSV part),
/// saturation, hue; each applied with probability 1/2.
pub fn photometric(img: &mut RgbImage, rng: &mut SeededRng) {
    let brightness = rng
        .random_bool(0.5)
        .then(|| rng.random_range(-32.0f32..=32.0));
    let contrast_first = rng.random_bool(0.5);
    let contrast = rng.random_bool(0.5).then(|| rng.random_range(0.5f32..=1.5));
    let saturation = rng.random_bool(0.5).then(|| rng.random_range(0.5f32..=1.5));
    // OpenCV hue units (0..180) -> degrees.
    let hue = rng
        .random_bool(0.5)
        .then(|| rng.random_range(-18i32..=18) as f32 * 2.0);
    for px in img.pixels_mut() {
        let mut v = [px[0] as f32, px[1] as f32, px[2] as f32];
        if let Some(b) = brightness {
            v.iter_mut().for_each(|c| *c = (*c + b).clamp(0.0, 255.0));
        }
        if contrast_first {
            if let Some(a) = contrast {
                v.iter_mut().for_each(|c| *c = (*c * a).clamp(0.0, 255.0));
            }
        }
        if saturation.is_some() || hue.is_some() {
            let (mut hh, mut s, val) = rgb_to_hsv(v);
            if let Some(k) = saturation {
                s = (s * k).clamp(0.0, 1.0);
            }
            if let Some(d) = hue {
                hh = (hh + d).rem_euclid(360.0);
            }
            v = hsv_to_rgb(hh, s, val);
        }
        if !contrast_first {
            if let Some(a) = contrast {
                v.iter_mut().for_each(|c| *c = (*c * a).clamp(0.0, 255.0));
            }
        }
        *px = image::Rgb([v[0].round() as u8, v[1].round() as u8, v[2].round() as u8]);
    }
}

fn rgb_to_hsv([r, g, b]: [f32; 3]) -> (f32, f32, f32) {
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let d = max - min;
    let h = if d == 0.0 {
        0.0
    } else if max == r {
        60.0 * ((g - b) / d).rem_euclid(6.0)
    } else if max == g {
        60.0 * ((b - r) / d + 2.0)
    } else {
        60.0 * ((r - g) / d + 4.0)
    };
    let s = if max == 0.0 { 0.0 } else { d / max };
    (h, s, max)
}

fn hsv_to_rgb(h: f32, s: f32, v: f32) -> [f32; 3] {
    let c = v * s;
    let x = c * (1.0 - ((h / 60.0).rem_euclid(2.0) - 1.0).abs());
    let m = v - c;
    let (r, g, b) = match (h / 60.0) as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    [
        (r + m).clamp(0.0, 255.0),
        (g + m).clamp(0.0, 255.0),
        (b + m).clamp(0.0, 255.0),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn hsv_round_trip() {
        for rgb in [
            [10.0, 200.0, 30.0],
            [255.0, 0.0, 0.0],
            [40.0, 40.0, 40.0],
            [12.0, 34.0, 250.0],
        ] {
            let (h, s, v) = rgb_to_hsv(rgb);
            let back = hsv_to_rgb(h, s, v);
            for c in 0..3 {
                assert!((back[c] - rgb[c]).abs() < 1e-3, "{rgb:?} -> {back:?}");
            }
        }
    }

    #[test]
    fn crop_has_fixed_size_and_flip_moves_labels_with_pixels() {
        // Left half class 1 (red), right half class 2 (blue).
        let (w, h) = (40u32, 20u32);
        let mut img = RgbImage::new(w, h);
        let mut lab = vec![0u8; (w * h) as usize];
        for y in 0..h {
            for x in 0..w {
                let left = x < w / 2;
                img.put_pixel(
                    x,
                    y,
                    image::Rgb(if left { [255, 0, 0] } else { [0, 0, 255] }),
                );
                lab[(y * w + x) as usize] = if left { 1 } else { 2 };
            }
        }
        let ex = Example {
            name: "t".into(),
            image: img,
            label: Some(lab),
        };
        let aug = Augmenter {
            cfg: AugmentConfig {
                base: (40, 20),
                ratio_range: (0.5, 2.0),
                crop: (16, 16),
                cat_max_ratio: 0.75,
                flip_prob: 0.5,
                photometric: false,
            },
            ignore: 255,
        };
        let mut rng = SeededRng::seed_from_u64(1);
        for _ in 0..20 {
            let (im, l) = aug.sample(&ex, &mut rng);
            assert_eq!(im.dimensions(), (16, 16));
            assert_eq!(l.len(), 256);
            for (i, (p, &c)) in im.pixels().zip(&l).enumerate() {
                // Resizing blends colours across the class edge; labels (nearest) do not.
                let x = i % 16;
                let edge = (x > 0 && l[i - 1] != c) || (x < 15 && l[i + 1] != c);
                if edge {
                    continue;
                }
                match c {
                    1 => assert!(p[0] > 128 && p[2] < 128),
                    2 => assert!(p[2] > 128 && p[0] < 128),
                    255 => assert_eq!(p.0, [0, 0, 0]),
                    other => panic!("unexpected label {other}"),
                }
            }
        }
    }
}
