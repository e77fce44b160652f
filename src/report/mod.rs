//! What a run leaves for people: class-index PNG masks, colour overlays and `report.html`.

pub mod html;
pub mod plot;
pub mod run;
pub mod tables;
pub mod trace;

use crate::error::{Error, Result};
use image::{GrayImage, RgbImage};
use std::path::Path;

/// CamVid's customary colours for its 11 classes, then a deterministic palette for the rest.
pub fn palette(n: usize) -> Vec<[u8; 3]> {
    const CAMVID: [[u8; 3]; 11] = [
        [128, 128, 128],
        [128, 0, 0],
        [192, 192, 128],
        [128, 64, 128],
        [60, 40, 222],
        [128, 128, 0],
        [192, 128, 128],
        [64, 64, 128],
        [64, 0, 128],
        [64, 64, 0],
        [0, 128, 192],
    ];
    (0..n)
        .map(|i| {
            CAMVID.get(i).copied().unwrap_or_else(|| {
                let h = (i as u32).wrapping_mul(2654435761);
                [(h >> 8) as u8, (h >> 16) as u8, (h >> 24) as u8]
            })
        })
        .collect()
}

/// The frame blended half and half with its class colours.
pub fn overlay(img: &RgbImage, pred: &[u8], n: usize) -> RgbImage {
    let pal = palette(n);
    let mut out = img.clone();
    for (px, &c) in out.pixels_mut().zip(pred) {
        let col = pal.get(c as usize).copied().unwrap_or([0, 0, 0]);
        for k in 0..3 {
            px[k] = ((px[k] as u16 + col[k] as u16) / 2) as u8;
        }
    }
    out
}

/// Writes `out/masks/NAME.png` (class indices) and `out/overlays/NAME.png`.
pub fn write_outputs(out: &Path, name: &str, img: &RgbImage, pred: &[u8], n: usize) -> Result<()> {
    let (w, h) = img.dimensions();
    for sub in ["masks", "overlays"] {
        let d = out.join(sub);
        std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
    }
    let mask = GrayImage::from_raw(w, h, pred.to_vec()).expect("one class per pixel");
    let p = out.join("masks").join(format!("{name}.png"));
    mask.save(&p).map_err(|e| Error::data(&p, e.to_string()))?;
    let p = out.join("overlays").join(format!("{name}.png"));
    overlay(img, pred, n)
        .save(&p)
        .map_err(|e| Error::data(&p, e.to_string()))?;
    Ok(())
}
